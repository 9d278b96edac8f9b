-- Keep a record's row whole and uncompressed up to a page (8160 bytes) instead of about 2 KB.
-- A request or response row carries its body twice (bytea and jsonb), so a 1 KB JSON body
-- makes a row of about 2.5 KB, which PostgreSQL's default would compress (pglz) on every
-- insert. Uncompressed, the database spends less CPU per record and the tables take more disk
-- (docs/performance.md has the figures of bench/recorder_bench.py); the database's write
-- rate is what limits the recorder, disk rarely is. Rows over 8160 bytes are still compressed.
-- Revert with ALTER TABLE ... RESET (toast_tuple_target) to trade CPU back for disk.
ALTER TABLE shadowproxy.requests SET (toast_tuple_target = 8160);
ALTER TABLE shadowproxy.responses SET (toast_tuple_target = 8160);

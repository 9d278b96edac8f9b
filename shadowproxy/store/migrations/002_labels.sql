-- Ground truth that arrives after the fact: one label per recorded request id.
-- `label` is JSON: a number, a string, a boolean, or an array for a batch request (element k
-- labels the k-th prediction). `shadowproxy labels import` upserts, so a re-import is a no-op
-- and a corrected file replaces earlier labels. No foreign key: labels may arrive before the
-- records they label are replayed from the proxy's spool.
CREATE TABLE shadowproxy.labels (
    request_id  text PRIMARY KEY,
    label       jsonb NOT NULL,
    imported_at timestamptz NOT NULL DEFAULT now()
);

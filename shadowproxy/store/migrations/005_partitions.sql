-- Time-partitioned records: requests and responses partitioned by range of received_at.
--
-- responses gets its request's received_at, so that a request and its answers live in
-- partitions of the same range (co-partitioned: same bounds, same names after the table's)
-- and whole time ranges can be dropped at once. Each table has a DEFAULT partition, so that
-- no record is ever refused for want of a partition; the time partitions themselves are
-- created ahead of time by `shadowproxy migrate` and by the running proxy
-- (shadowproxy/store/partitions.py), which also move rows out of DEFAULT when a partition
-- for their range appears.
--
-- In place: the tables of migrations 001-004 are renamed requests_legacy and
-- responses_legacy (with their indexes), the partitioned tables take their names, and the
-- rows are moved across in small batches afterwards, while the proxy keeps writing
-- (shadowproxy/store/legacy.py, run by `shadowproxy migrate` and the proxy's maintenance
-- task); the legacy tables are dropped once empty. This transaction holds an ACCESS
-- EXCLUSIVE lock on both tables only for the renames and CREATEs: no row is read or written
-- in it (docs/operations.md, "Upgrading to partitioned storage").

ALTER TABLE shadowproxy.requests RENAME TO requests_legacy;
ALTER INDEX shadowproxy.requests_pkey RENAME TO requests_legacy_pkey;
ALTER INDEX shadowproxy.requests_received_at RENAME TO requests_legacy_received_at;
ALTER INDEX shadowproxy.requests_request_id RENAME TO requests_legacy_request_id;
ALTER TABLE shadowproxy.responses RENAME TO responses_legacy;
ALTER INDEX shadowproxy.responses_pkey RENAME TO responses_legacy_pkey;
-- The pairs view follows the renamed tables until it is pointed at the new ones below.

CREATE TABLE shadowproxy.requests (
    id             uuid NOT NULL,
    request_id     text NOT NULL,
    route          text NOT NULL,
    received_at    timestamptz NOT NULL,
    method         text NOT NULL,
    path           text NOT NULL,
    query          text NOT NULL DEFAULT '',
    headers        jsonb NOT NULL DEFAULT '{}',
    body           bytea,
    body_json      jsonb,
    body_size      bigint NOT NULL DEFAULT 0,
    body_truncated boolean NOT NULL DEFAULT false,
    client_addr    text,
    config_version text,
    -- The partition key must be part of every unique constraint of a partitioned table.
    PRIMARY KEY (id, received_at)
) PARTITION BY RANGE (received_at);
CREATE INDEX requests_received_at ON shadowproxy.requests (received_at);
CREATE INDEX requests_request_id ON shadowproxy.requests (request_id);

-- `request` refers to requests.id and `received_at` is that request's: no foreign key, as
-- before (batched COPY stays cheap; the tables can be distributed on `request`).
CREATE TABLE shadowproxy.responses (
    request        uuid NOT NULL,
    target         text NOT NULL,
    role           text NOT NULL
        CONSTRAINT responses_role_check CHECK (role IN ('primary', 'shadow', 'replay')),
    status         int,
    headers        jsonb,
    body           bytea,
    body_json      jsonb,
    body_size      bigint,
    body_truncated boolean NOT NULL DEFAULT false,
    latency_ms     double precision,
    error          text,
    started_at     timestamptz,
    error_kind     text
        CONSTRAINT responses_error_kind_check
        CHECK (error_kind IN ('timeout', 'connect', 'reset', 'closed', 'protocol',
                              'dropped', 'skipped', 'shutdown')),
    stream         jsonb,
    received_at    timestamptz NOT NULL,
    PRIMARY KEY (request, target, received_at)
) PARTITION BY RANGE (received_at);

-- Rows up to a page stay uncompressed (migration 003): a storage parameter of each
-- partition, since a partitioned table holds no rows of its own.
CREATE TABLE shadowproxy.requests_default PARTITION OF shadowproxy.requests DEFAULT
    WITH (toast_tuple_target = 8160);
CREATE TABLE shadowproxy.responses_default PARTITION OF shadowproxy.responses DEFAULT
    WITH (toast_tuple_target = 8160);

-- Privileges granted on the old tables (a read-only role for reports, say) carry over: on
-- the table and on single columns (a role that may read some columns only), with their
-- grant option. A role's name as regrole prints it is already quoted where it needs to be
-- ("ReportReader"): quoting it again named a role that does not exist.
DO $$
DECLARE
    pair text[];
    acl record;
BEGIN
    FOREACH pair SLICE 1 IN ARRAY ARRAY[['requests_legacy', 'requests'],
                                        ['responses_legacy', 'responses']] LOOP
        FOR acl IN
            SELECT a.privilege_type, a.grantee, a.is_grantable, NULL::name AS col
            FROM pg_class c, aclexplode(c.relacl) a
            WHERE c.oid = format('shadowproxy.%I', pair[1])::regclass
              AND a.grantee <> c.relowner
            UNION ALL
            SELECT a.privilege_type, a.grantee, a.is_grantable, t.attname
            FROM pg_class c JOIN pg_attribute t ON t.attrelid = c.oid,
                 aclexplode(t.attacl) a
            WHERE c.oid = format('shadowproxy.%I', pair[1])::regclass
              AND t.attnum > 0 AND NOT t.attisdropped AND a.grantee <> c.relowner
        LOOP
            EXECUTE format('GRANT %s%s ON shadowproxy.%I TO %s%s', acl.privilege_type,
                           CASE WHEN acl.col IS NULL THEN '' ELSE format(' (%I)', acl.col) END,
                           pair[2],
                           CASE WHEN acl.grantee = 0 THEN 'PUBLIC'
                                ELSE acl.grantee::regrole::text END,
                           CASE WHEN acl.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END);
        END LOOP;
    END LOOP;
END $$;

-- The pairs view, its columns as in migration 004. The joins match received_at too, so that
-- a condition on received_at selects the partitions of both tables (partition pruning): of
-- requests from the condition, of responses through the join, which PostgreSQL does
-- partition by partition (the two tables have the same bounds) with
-- enable_partitionwise_join, set below for the database's new sessions. Replaced, not
-- dropped and made again, so that the privileges granted on it (a role of analysts that
-- reads only the view, as THREAT_MODEL.md advises), its owner, and views built on it stay
-- as they are: a DROP would lose the grants, and is refused while such a view exists.
CREATE OR REPLACE VIEW shadowproxy.pairs AS
SELECT q.id,
       q.request_id,
       q.route,
       q.received_at,
       q.method,
       q.path,
       q.body_json       AS request_body_json,
       p.status          AS primary_status,
       p.body_json       AS primary_body_json,
       p.latency_ms      AS primary_latency_ms,
       p.error           AS primary_error,
       s.target          AS shadow_name,
       s.status          AS shadow_status,
       s.body_json       AS shadow_body_json,
       s.latency_ms      AS shadow_latency_ms,
       s.error           AS shadow_error,
       q.config_version,
       p.error_kind      AS primary_error_kind,
       s.role            AS shadow_role,
       s.error_kind      AS shadow_error_kind
FROM shadowproxy.requests q
JOIN shadowproxy.responses s
    ON s.request = q.id AND s.received_at = q.received_at AND s.role IN ('shadow', 'replay')
LEFT JOIN shadowproxy.responses p
    ON p.request = q.id AND p.received_at = q.received_at AND p.role = 'primary';

-- A fresh database has nothing to move: its empty legacy tables go at once. While an
-- object of the user's depends on them (a view over the old tables follows the rename),
-- they stay, and the move (shadowproxy/store/legacy.py) names that object: failing here
-- would leave every proxy of this version unable to write.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM shadowproxy.requests_legacy)
       AND NOT EXISTS (SELECT 1 FROM shadowproxy.responses_legacy) THEN
        DROP TABLE shadowproxy.requests_legacy, shadowproxy.responses_legacy;
    END IF;
EXCEPTION WHEN dependent_objects_still_exist THEN
    NULL;
END $$;

-- Off by default because it costs planning time on tables that are not co-partitioned;
-- here it lets a query over a window of `pairs` read that window's partitions of both tables
-- and none other. Setting it needs the database's owner: without that, a notice, and the
-- query planner reads every partition of responses for the inner join (docs/sql.md).
DO $$
BEGIN
    EXECUTE format('ALTER DATABASE %I SET enable_partitionwise_join = on', current_database());
EXCEPTION WHEN insufficient_privilege THEN
    RAISE NOTICE 'enable_partitionwise_join not set for database %: not its owner; run '
                 'ALTER DATABASE % SET enable_partitionwise_join = on as its owner',
                 current_database(), current_database();
END $$;

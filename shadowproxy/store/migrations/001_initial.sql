-- The paired-records schema: one row per request, one per upstream call, and the pairs view.
CREATE SCHEMA IF NOT EXISTS shadowproxy;

CREATE TABLE shadowproxy.requests (
    id             uuid PRIMARY KEY,
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
    client_addr    text
);
CREATE INDEX requests_received_at ON shadowproxy.requests (received_at);
CREATE INDEX requests_request_id ON shadowproxy.requests (request_id);

-- `request` refers to requests.id. The reference is not enforced by a foreign key so that
-- batched COPY stays cheap and the tables can be distributed (Citus) or partitioned on it.
CREATE TABLE shadowproxy.responses (
    request        uuid NOT NULL,
    target         text NOT NULL,
    role           text NOT NULL CHECK (role IN ('primary', 'shadow')),
    status         int,
    headers        jsonb,
    body           bytea,
    body_json      jsonb,
    body_size      bigint,
    body_truncated boolean NOT NULL DEFAULT false,
    latency_ms     double precision,
    error          text,
    started_at     timestamptz,
    PRIMARY KEY (request, target)
);

-- Text to jsonb when it parses, else NULL (used by the recorder's INSERT ... SELECT).
DO $$
BEGIN
    IF current_setting('server_version_num')::int >= 160000 THEN
        EXECUTE $f$
            CREATE FUNCTION shadowproxy.try_jsonb(t text) RETURNS jsonb
            LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $g$
            BEGIN
                -- plpgsql, not sql: an inlined CASE would be constant-folded and raise.
                IF t IS NOT NULL AND pg_input_is_valid(t, 'jsonb') THEN
                    RETURN t::jsonb;
                END IF;
                RETURN NULL;
            END $g$
        $f$;
    ELSE
        EXECUTE $f$
            CREATE FUNCTION shadowproxy.try_jsonb(t text) RETURNS jsonb
            LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $g$
            BEGIN
                RETURN t::jsonb;
            EXCEPTION WHEN others THEN
                RETURN NULL;
            END $g$
        $f$;
    END IF;
END $$;

CREATE VIEW shadowproxy.pairs AS
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
       s.error           AS shadow_error
FROM shadowproxy.requests q
JOIN shadowproxy.responses s ON s.request = q.id AND s.role = 'shadow'
LEFT JOIN shadowproxy.responses p ON p.request = q.id AND p.role = 'primary';

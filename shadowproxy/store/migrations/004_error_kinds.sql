-- Failure kinds, replayed targets, stream timing, configuration versions.
--
-- responses.error_kind: one word from shadowproxy/failures.py, matched by code and SQL
-- instead of the free-text `error` (which keeps the detail). Existing rows are mapped from
-- their text, as shadowproxy.failures.kind_of_legacy_error does for old spool files.
ALTER TABLE shadowproxy.responses
    ADD COLUMN error_kind text
        CHECK (error_kind IN ('timeout', 'connect', 'reset', 'closed', 'protocol',
                              'dropped', 'skipped', 'shutdown')),
    ADD COLUMN stream jsonb;

UPDATE shadowproxy.responses SET error_kind = CASE
        WHEN error LIKE 'timeout%' THEN 'timeout'
        WHEN error LIKE 'connect%' THEN 'connect'
        WHEN error LIKE 'dropped%' THEN 'dropped'
        WHEN error LIKE 'skipped%' THEN 'skipped'
        WHEN error LIKE 'malformed%' THEN 'protocol'
        WHEN error LIKE '%shutting down%' THEN 'shutdown'
        WHEN error LIKE '%reset by peer%' OR error LIKE '%Broken pipe%' THEN 'reset'
        ELSE 'closed'
    END
WHERE error IS NOT NULL;

-- A replayed target (`shadowproxy replay --as NAME`) is stored beside live shadows.
ALTER TABLE shadowproxy.responses DROP CONSTRAINT responses_role_check;
ALTER TABLE shadowproxy.responses
    ADD CONSTRAINT responses_role_check CHECK (role IN ('primary', 'shadow', 'replay'));

-- The configuration (a short hash of its normalized content) that handled the request.
ALTER TABLE shadowproxy.requests ADD COLUMN config_version text;

-- The pairs view covers replayed targets as it covers live shadows; the added columns go
-- last so that queries written against the view's first columns keep working.
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
JOIN shadowproxy.responses s ON s.request = q.id AND s.role IN ('shadow', 'replay')
LEFT JOIN shadowproxy.responses p ON p.request = q.id AND p.role = 'primary';

-- Per-minute aggregates of settled hours, so that the report's exact counts and rates over
-- a large window read a few rows a minute instead of every pair (shadowproxy/store/rollups.py
-- makes and invalidates them; shadowproxy/compare/operational.py reads them).
--
-- An hour is summarized in one transaction once it ended long enough ago that no live
-- record of it is still on its way (rollups.SETTLE); rollup_hours says which hours are, and
-- deleting an hour's row there deletes its minutes (ON DELETE CASCADE). A record written
-- into a summarized hour later (a spooled batch, a replayed answer, the upgrade's move)
-- deletes that hour's row in the writing transaction, and the hour is summarized again.
-- Minutes are aligned on the Unix epoch, whatever the session's time zone.

CREATE TABLE shadowproxy.rollup_hours (
    hour      timestamptz PRIMARY KEY,
    requests  bigint NOT NULL,
    rolled_at timestamptz NOT NULL DEFAULT now()
);

-- The requests of a minute, by route and configuration version (the report's request counts
-- and its list of configuration versions).
CREATE TABLE shadowproxy.request_rollups (
    hour           timestamptz NOT NULL REFERENCES shadowproxy.rollup_hours ON DELETE CASCADE,
    minute         timestamptz NOT NULL,
    route          text NOT NULL,
    config_version text,
    requests       bigint NOT NULL,
    first_at       timestamptz NOT NULL,
    last_at        timestamptz NOT NULL
);
CREATE INDEX request_rollups_route_minute ON shadowproxy.request_rollups (route, minute);
CREATE INDEX request_rollups_hour ON shadowproxy.request_rollups (hour);

-- The pairs of a minute grouped as the report's counts and rates tell them apart: both
-- statuses, both outcomes, the shadow's error kind, replayed or live, comparable; with each
-- side's latency count, sum, minimum and maximum.
CREATE TABLE shadowproxy.pair_rollups (
    hour           timestamptz NOT NULL REFERENCES shadowproxy.rollup_hours ON DELETE CASCADE,
    minute         timestamptz NOT NULL,
    route          text NOT NULL,
    shadow_name    text NOT NULL,
    config_version text,
    ps             int,
    ss             int,
    po             text,
    so             text,
    sek            text,
    replayed       boolean NOT NULL,
    comparable     boolean NOT NULL,
    n              bigint NOT NULL,
    pn             bigint NOT NULL,
    psum           double precision,
    pmin           double precision,
    pmax           double precision,
    sn             bigint NOT NULL,
    ssum           double precision,
    smin           double precision,
    smax           double precision
);
CREATE INDEX pair_rollups_route_shadow_minute
    ON shadowproxy.pair_rollups (route, shadow_name, minute);
CREATE INDEX pair_rollups_hour ON shadowproxy.pair_rollups (hour);

-- The report's sample (compare/sampling.py) is the requests of its window with the smallest
-- keys hashtextextended(id::text, seed). For the default seed, each summarized hour keeps
-- the keys of its first requests in key order, per route (at most rollups.SAMPLE_KEYS):
-- the smallest keys of a window of summarized hours are among them, so the default sample
-- of a large window is drawn from these rows, not from every request of the window.
-- sample_key_limits says where each hour's kept keys end: up to `last_k` when the hour had
-- more requests than were kept (`complete` false), all of them otherwise.
CREATE TABLE shadowproxy.sample_keys (
    hour        timestamptz NOT NULL REFERENCES shadowproxy.rollup_hours ON DELETE CASCADE,
    route       text NOT NULL,
    k           bigint NOT NULL,
    id          uuid NOT NULL,
    received_at timestamptz NOT NULL
);
CREATE INDEX sample_keys_route_hour_k ON shadowproxy.sample_keys (route, hour, k);

CREATE TABLE shadowproxy.sample_key_limits (
    hour     timestamptz NOT NULL REFERENCES shadowproxy.rollup_hours ON DELETE CASCADE,
    route    text NOT NULL,
    kept     bigint NOT NULL,
    complete boolean NOT NULL,
    last_k   bigint NOT NULL,
    PRIMARY KEY (hour, route)
);

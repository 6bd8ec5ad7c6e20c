-- Web tracking (seed 000): sites of a client, hits accepted into an outbox, and the
-- rollups and raw-page index the questions are answered from.

CREATE TABLE sites (
    id          uuid        PRIMARY KEY,
    client_id   uuid        NOT NULL REFERENCES clients (id) ON DELETE CASCADE,
    name        text        NOT NULL CHECK (char_length(name) BETWEEN 1 AND 200),
    -- Origins (`https://shop.example.com`) whose pages may send hits; `*` for any.
    origins     text[]      NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX sites_client_name_key ON sites (client_id, lower(name));
CREATE INDEX sites_client_created ON sites (client_id, created_at DESC, id DESC);
CREATE INDEX sites_created ON sites (created_at DESC, id DESC);
CREATE INDEX sites_origins ON sites USING gin (origins);

-- Hits answered 202: one row per group commit (a JSON array of hits), until the relay
-- has moved them to MongoDB (`tracking_hits`) and into the rollups.
CREATE TABLE tracking_outbox (
    id          bigserial   PRIMARY KEY,
    created_at  timestamptz NOT NULL DEFAULT now(),
    hits        bytea       NOT NULL,
    count       integer     NOT NULL
);
DO $$
BEGIN
    ALTER TABLE tracking_outbox ALTER COLUMN hits SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported OR invalid_parameter_value THEN
    RAISE NOTICE 'lz4 is not available: tracking_outbox.hits keeps pglz';
END
$$;

-- The raw store's index: one MongoDB document per site per outbox row (more when the
-- row's hits span over a minute: `part`), holding that site's hits of the row received
-- between first_at and last_at; its `_id` is `<site_id>:<row_id in hex>:<part>`.
CREATE TABLE tracking_pages (
    site_id     uuid        NOT NULL,
    last_at     timestamptz NOT NULL,
    row_id      bigint      NOT NULL,
    part        integer     NOT NULL,
    first_at    timestamptz NOT NULL,
    hits        integer     NOT NULL,
    PRIMARY KEY (site_id, last_at, row_id, part)
);

-- Rollups per 15 minutes (every zone's offset is a multiple of 15 minutes, so local
-- days are whole buckets).
CREATE TABLE tracking_site_counts (
    site_id     uuid        NOT NULL,
    bucket      timestamptz NOT NULL,
    hits        bigint      NOT NULL,
    PRIMARY KEY (site_id, bucket)
);
CREATE TABLE tracking_url_counts (
    site_id     uuid        NOT NULL,
    bucket      timestamptz NOT NULL,
    url         text        NOT NULL,
    hits        bigint      NOT NULL,
    PRIMARY KEY (site_id, bucket, url)
);
CREATE TABLE tracking_context_counts (
    site_id     uuid        NOT NULL,
    bucket      timestamptz NOT NULL,
    context     text        NOT NULL,
    hits        bigint      NOT NULL,
    PRIMARY KEY (site_id, bucket, context)
);
-- Every context a tracked user (the site's own user id) accessed, per site per bucket.
CREATE TABLE tracking_user_contexts (
    user_id     text        NOT NULL,
    bucket      timestamptz NOT NULL,
    site_id     uuid        NOT NULL,
    context     text        NOT NULL,
    hits        bigint      NOT NULL,
    first_seen  timestamptz NOT NULL,
    last_seen   timestamptz NOT NULL,
    PRIMARY KEY (user_id, bucket, site_id, context)
);

-- Ingest: each sensor's latest reading, 15-minute rollup buckets, and the journal that
-- makes bucket updates exactly-once across PostgreSQL and MongoDB.

-- The newest reading of each sensor by measurement time (ties broken by reading id).
CREATE TABLE sensor_latest (
    sensor_id    uuid             PRIMARY KEY REFERENCES sensors (id) ON DELETE CASCADE,
    reading_id   uuid             NOT NULL,
    ts           timestamptz      NOT NULL,
    temperature  double precision NOT NULL,
    received_at  timestamptz      NOT NULL,
    extra        jsonb            NOT NULL DEFAULT '{}'::jsonb,
    updated_at   timestamptz      NOT NULL DEFAULT now()
);

-- count/sum/min/max of a sensor's readings per 15-minute bucket (UTC-aligned). Every
-- real time-zone offset today is a multiple of 15 minutes, so local days are unions of
-- whole buckets. The sum is NUMERIC: exact and independent of the order readings were
-- added in, so a bucket can be compared with a recomputation from the raw readings.
CREATE TABLE reading_buckets (
    sensor_id  uuid             NOT NULL REFERENCES sensors (id) ON DELETE CASCADE,
    bucket     timestamptz      NOT NULL,
    count      bigint           NOT NULL CHECK (count > 0),
    sum        numeric          NOT NULL,
    min        double precision NOT NULL,
    max        double precision NOT NULL,
    PRIMARY KEY (sensor_id, bucket)
);

-- A batch of readings between "about to insert into MongoDB" and "rolled up here".
-- The raw documents carry the batch id, so after a crash the readings this batch really
-- inserted can be told apart from duplicates inserted by earlier batches, and rolled up
-- exactly once (the row is deleted in the transaction that applies the rollup).
CREATE TABLE ingest_batches (
    id           uuid        PRIMARY KEY,
    reading_ids  uuid[]      NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ingest_batches_created_idx ON ingest_batches (created_at);

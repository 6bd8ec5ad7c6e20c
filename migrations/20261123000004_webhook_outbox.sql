-- Raw webhook deliveries on their way to MongoDB (`webhook_events`). Each row is one
-- group of deliveries, written with the events it applies (same transaction or same
-- statement), with the answers they got; the relay deletes it once MongoDB has them.
CREATE TABLE webhook_outbox (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    created_at  timestamptz NOT NULL DEFAULT now(),
    -- The records (raw delivery, without its answer) as BSON documents, one after another.
    documents   bytea       NOT NULL,
    -- Each record's answer, in order: HTTP status and code.
    statuses    smallint[]  NOT NULL,
    codes       text[]      NOT NULL,
    CHECK (cardinality(codes) > 0 AND cardinality(statuses) = cardinality(codes))
);

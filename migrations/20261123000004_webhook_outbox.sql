-- Raw webhook deliveries on their way to MongoDB (`webhook_events`). Each row is one
-- group of deliveries, written in the transaction that applies them, with the answers
-- they got; the relay deletes it once MongoDB has its records.
CREATE TABLE webhook_outbox (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    created_at  timestamptz NOT NULL DEFAULT now(),
    -- How many records `documents` holds.
    records     integer     NOT NULL CHECK (records > 0),
    -- The records as BSON documents, one after another.
    documents   bytea       NOT NULL
);

-- Lead pipeline (seed 003): three systems, a website (lead and customer forms), a
-- marketing automation system and a CRM, each keeping its own people. One table holds
-- them all, told apart by `system` and `kind`; the jobs that carry a record from one
-- system to the next live in apalis's own schema (`apalis.jobs`, created by its
-- migrations at start).

CREATE TABLE pipeline_records (
    id               uuid        PRIMARY KEY,
    -- 'website', 'marketing' or 'crm'.
    system           text        NOT NULL CHECK (system IN ('website', 'marketing', 'crm')),
    -- 'lead' or 'customer'.
    kind             text        NOT NULL CHECK (kind IN ('lead', 'customer')),
    client_id        uuid        NOT NULL REFERENCES clients (id) ON DELETE CASCADE,
    -- The site a website form came from.
    site_id          uuid        REFERENCES sites (id) ON DELETE SET NULL,
    name             text        NOT NULL CHECK (char_length(name) BETWEEN 1 AND 200),
    email            text        NOT NULL CHECK (char_length(email) BETWEEN 3 AND 254),
    phone            text        CHECK (char_length(phone) <= 40),
    company          text        CHECK (char_length(company) <= 200),
    message          text        CHECK (char_length(message) <= 5000),
    -- CRM leads only: qualified by a salesperson; the e-mail to the lead follows.
    qualified        boolean,
    qualified_at     timestamptz,
    -- When the e-mail of the latest qualification was handed to the SMTP server.
    emailed_at       timestamptz,
    -- What created it on behalf of another system (`Idempotency-Key`): a retried job
    -- finds the record it created the first time instead of creating another.
    idempotency_key  text        CHECK (char_length(idempotency_key) BETWEEN 1 AND 200),
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX pipeline_records_idempotency
    ON pipeline_records (system, kind, client_id, idempotency_key);
CREATE INDEX pipeline_records_client_created
    ON pipeline_records (system, kind, client_id, created_at DESC, id DESC);
CREATE INDEX pipeline_records_created
    ON pipeline_records (system, kind, created_at DESC, id DESC);

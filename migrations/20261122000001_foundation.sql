-- Foundation: clients (tenants), users, refresh tokens and sensors.

CREATE TABLE clients (
    id          uuid        PRIMARY KEY,
    name        text        NOT NULL CHECK (char_length(name) BETWEEN 1 AND 200),
    timezone    text        NOT NULL CHECK (char_length(timezone) BETWEEN 1 AND 64),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
-- Two tenants may not share a name, whatever its case.
CREATE UNIQUE INDEX clients_name_key ON clients (lower(name));
-- Lists are newest first.
CREATE INDEX clients_created_idx ON clients (created_at DESC, id DESC);

CREATE TABLE users (
    id             uuid        PRIMARY KEY,
    email          text        NOT NULL CHECK (char_length(email) BETWEEN 3 AND 254),
    password_hash  text        NOT NULL,
    role           text        NOT NULL CHECK (role IN ('admin', 'operator', 'viewer')),
    -- Deleting a client that still has users is refused: users must be moved or
    -- deleted first, so nobody silently loses access.
    client_id      uuid        REFERENCES clients (id) ON DELETE RESTRICT,
    -- Bumped whenever a password, role or tenant changes: every token issued before
    -- carries the old value and stops working.
    token_version  integer     NOT NULL DEFAULT 0,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT users_role_client_check CHECK ((role = 'admin') = (client_id IS NULL))
);
CREATE UNIQUE INDEX users_email_key ON users (lower(email));
CREATE INDEX users_created_idx ON users (created_at DESC, id DESC);
CREATE INDEX users_client_idx ON users (client_id, created_at DESC, id DESC);

CREATE TABLE refresh_tokens (
    id           uuid        PRIMARY KEY,
    user_id      uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    expires_at   timestamptz NOT NULL,
    revoked_at   timestamptz,
    replaced_by  uuid,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX refresh_tokens_user_idx ON refresh_tokens (user_id) WHERE revoked_at IS NULL;

CREATE TABLE sensors (
    id           uuid        PRIMARY KEY,
    -- A client with sensors cannot be deleted: its readings would be orphaned.
    client_id    uuid        NOT NULL REFERENCES clients (id) ON DELETE RESTRICT,
    name         text        NOT NULL CHECK (char_length(name) BETWEEN 1 AND 200),
    location     text        CHECK (char_length(location) <= 500),
    unit         text        NOT NULL DEFAULT 'celsius' CHECK (char_length(unit) BETWEEN 1 AND 32),
    metadata     jsonb       NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(metadata) = 'object'),
    -- SHA-256 of the device secret (see core/src/secrets.rs for why not argon2).
    secret_hash  bytea       NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX sensors_client_name_key ON sensors (client_id, lower(name));
CREATE INDEX sensors_created_idx ON sensors (created_at DESC, id DESC);
CREATE INDEX sensors_client_created_idx ON sensors (client_id, created_at DESC, id DESC);

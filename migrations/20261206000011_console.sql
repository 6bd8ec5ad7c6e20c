-- The web console (issue 16): login sessions, and the trigram indexes behind the `q`
-- search of the lists (clients, users, sensors, sites) so that a substring search stays
-- an index scan at any table size.

CREATE EXTENSION IF NOT EXISTS pg_trgm;

CREATE INDEX clients_name_trgm ON clients USING gin (name gin_trgm_ops);
CREATE INDEX users_email_trgm ON users USING gin (email gin_trgm_ops);
CREATE INDEX sensors_name_trgm ON sensors USING gin (name gin_trgm_ops);
CREATE INDEX sensors_location_trgm ON sensors USING gin (location gin_trgm_ops);
CREATE INDEX sites_name_trgm ON sites USING gin (name gin_trgm_ops);

-- A console login. The cookie holds a random secret; only its SHA-256 is stored, so a
-- copy of this table opens no session. `token_version` is the user's at login: a
-- password change or a role change (which bump it) ends the session.
CREATE TABLE console_sessions (
    id_hash        bytea       PRIMARY KEY,
    user_id        uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    token_version  integer     NOT NULL,
    -- The synchronizer token every state-changing request of the session must carry.
    csrf           text        NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    last_seen_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX console_sessions_user ON console_sessions (user_id);
CREATE INDEX console_sessions_last_seen ON console_sessions (last_seen_at);

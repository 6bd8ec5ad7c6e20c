-- Alarms (issue 18): rules on one sensor or on every sensor of a client, and the
-- excursions they found, evaluated in event time as readings are stored. An alarm is
-- one excursion; its events (opened, cleared, reopened, retracted, acknowledged) are its
-- history, newest last, and what notifications and the live feed are made of.

CREATE TABLE alarm_rules (
    id             uuid        PRIMARY KEY,
    client_id      uuid        NOT NULL REFERENCES clients (id) ON DELETE CASCADE,
    -- One sensor of the client, or NULL: every sensor of the client.
    sensor_id      uuid        REFERENCES sensors (id) ON DELETE CASCADE,
    name           text        NOT NULL CHECK (char_length(name) BETWEEN 1 AND 200),
    -- 'above' / 'below' a threshold, 'outside' a band, 'rate' of change (°C a minute),
    -- 'no_data' for longer than the duration.
    kind           text        NOT NULL CHECK (kind IN ('above', 'below', 'outside', 'rate', 'no_data')),
    threshold      double precision,
    low            double precision,
    high           double precision,
    -- How long the condition must hold before it is an alarm.
    duration_secs  integer     NOT NULL DEFAULT 0 CHECK (duration_secs BETWEEN 0 AND 31622400),
    -- How far back inside the limit a reading must be to end an excursion.
    hysteresis     double precision NOT NULL DEFAULT 0 CHECK (hysteresis >= 0),
    severity       text        NOT NULL CHECK (severity IN ('info', 'warning', 'critical')),
    enabled        boolean     NOT NULL DEFAULT true,
    -- Who hears of its alarms opening, clearing, reopening or being retracted: e-mail
    -- addresses, and a URL posted to (signed with HMAC-SHA256 when it has a secret).
    emails         text[]      NOT NULL DEFAULT '{}' CHECK (cardinality(emails) <= 20),
    webhook_url    text        CHECK (char_length(webhook_url) <= 2000),
    webhook_secret text        CHECK (char_length(webhook_secret) BETWEEN 16 AND 200),
    -- After a notified opening, openings of the same sensor under the rule are not
    -- notified for this long (nor what follows them): a flapping sensor is heard once.
    quiet_secs     integer     NOT NULL DEFAULT 0 CHECK (quiet_secs BETWEEN 0 AND 604800),
    -- Readings measured before this are not the rule's business: its creation.
    effective_from timestamptz NOT NULL DEFAULT now(),
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    CHECK (CASE kind
        WHEN 'outside' THEN low IS NOT NULL AND high IS NOT NULL AND low < high
                            AND threshold IS NULL
        WHEN 'rate' THEN threshold > 0 AND low IS NULL AND high IS NULL
        WHEN 'no_data' THEN duration_secs > 0 AND threshold IS NULL AND low IS NULL
                            AND high IS NULL
        ELSE threshold IS NOT NULL AND low IS NULL AND high IS NULL
    END)
);
CREATE INDEX alarm_rules_client_created ON alarm_rules (client_id, created_at DESC, id DESC);
CREATE INDEX alarm_rules_created ON alarm_rules (created_at DESC, id DESC);
CREATE INDEX alarm_rules_sensor ON alarm_rules (sensor_id) WHERE sensor_id IS NOT NULL;

-- Bumped by every change to the rules, in the changing transaction: evaluators reload
-- the rules when it moved (a sequence would move before the change is visible).
CREATE TABLE alarm_rules_version (
    only_row  boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    version   bigint  NOT NULL
);
INSERT INTO alarm_rules_version (version) VALUES (0);

CREATE FUNCTION bump_alarm_rules_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE alarm_rules_version SET version = version + 1;
    RETURN NULL;
END
$$;

CREATE TRIGGER alarm_rules_changed
    AFTER INSERT OR UPDATE OR DELETE ON alarm_rules
    FOR EACH STATEMENT EXECUTE FUNCTION bump_alarm_rules_version();

CREATE TABLE alarms (
    id               uuid        PRIMARY KEY,
    rule_id          uuid        NOT NULL REFERENCES alarm_rules (id) ON DELETE CASCADE,
    client_id        uuid        NOT NULL REFERENCES clients (id) ON DELETE CASCADE,
    sensor_id        uuid        NOT NULL REFERENCES sensors (id) ON DELETE CASCADE,
    severity         text        NOT NULL,
    -- 'active' while it lasts, 'cleared' once ended, 'retracted' when late readings
    -- showed it was no excursion (kept for the audit trail).
    state            text        NOT NULL CHECK (state IN ('active', 'cleared', 'retracted')),
    -- Event time: the first reading of the excursion, the one that made it an alarm,
    -- the one that ended it.
    started_at       timestamptz NOT NULL,
    confirmed_at     timestamptz NOT NULL,
    ended_at         timestamptz,
    peak             double precision NOT NULL,
    peak_at          timestamptz NOT NULL,
    acknowledged_at  timestamptz,
    acknowledged_by  uuid        REFERENCES users (id) ON DELETE SET NULL,
    ack_comment      text        CHECK (char_length(ack_comment) <= 2000),
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    CHECK ((state = 'active') = (ended_at IS NULL) OR state = 'retracted')
);
-- Lists are newest first (by start), per client or for everyone.
CREATE INDEX alarms_client_started ON alarms (client_id, started_at DESC, id DESC);
CREATE INDEX alarms_started ON alarms (started_at DESC, id DESC);
-- A rule has at most one excursion in progress per sensor (evaluators in two processes
-- cannot both open it).
CREATE UNIQUE INDEX alarms_one_active ON alarms (rule_id, sensor_id) WHERE state = 'active';
-- What an evaluation may touch: a rule and sensor's alarms not retracted.
CREATE INDEX alarms_rule_sensor ON alarms (rule_id, sensor_id, started_at)
    WHERE state <> 'retracted';

CREATE TABLE alarm_events (
    id           bigserial   PRIMARY KEY,
    alarm_id     uuid        NOT NULL REFERENCES alarms (id) ON DELETE CASCADE,
    client_id    uuid        NOT NULL REFERENCES clients (id) ON DELETE CASCADE,
    -- 'opened', 'cleared', 'reopened', 'retracted', 'acknowledged'.
    kind         text        NOT NULL CHECK (kind IN ('opened', 'cleared', 'reopened', 'retracted', 'acknowledged')),
    -- When it happened: event time for what readings decided, the clock for the rest.
    at           timestamptz NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT now(),
    user_id      uuid        REFERENCES users (id) ON DELETE SET NULL,
    comment      text,
    -- Whether notifications were enqueued for it (in its transaction).
    notified     boolean     NOT NULL DEFAULT false
);
CREATE INDEX alarm_events_alarm ON alarm_events (alarm_id, id);
CREATE INDEX alarm_events_client ON alarm_events (client_id, id);

-- What a notification job delivered, per channel and target: a retried job sends only
-- what its earlier attempts did not.
CREATE TABLE alarm_deliveries (
    event_id      bigint      NOT NULL REFERENCES alarm_events (id) ON DELETE CASCADE,
    -- 'email' or 'webhook'.
    channel       text        NOT NULL CHECK (channel IN ('email', 'webhook')),
    -- The address, or the URL.
    target        text        NOT NULL,
    delivered_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (event_id, channel, target)
);

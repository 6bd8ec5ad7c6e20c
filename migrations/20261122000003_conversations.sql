-- Chat webhook processor: conversations and their messages.

CREATE TABLE conversations (
    id           uuid        PRIMARY KEY,
    state        text        NOT NULL DEFAULT 'OPEN' CHECK (state IN ('OPEN', 'CLOSED')),
    -- Event times, as the sender stamped them.
    created_at   timestamptz NOT NULL,
    closed_at    timestamptz,
    -- When termopar received the events.
    received_at  timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT conversations_closed_check CHECK ((state = 'CLOSED') = (closed_at IS NOT NULL))
);
CREATE INDEX conversations_created_idx ON conversations (created_at DESC, id DESC);
CREATE INDEX conversations_state_created_idx ON conversations (state, created_at DESC, id DESC);

CREATE TABLE messages (
    id               uuid        PRIMARY KEY,
    conversation_id  uuid        NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    direction        text        NOT NULL CHECK (direction IN ('SENT', 'RECEIVED')),
    content          text        NOT NULL,
    "timestamp"      timestamptz NOT NULL,
    received_at      timestamptz NOT NULL DEFAULT now()
);
-- A conversation's messages in order.
CREATE INDEX messages_conversation_idx ON messages (conversation_id, "timestamp", id);

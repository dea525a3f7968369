-- Hark's schema on PostgreSQL: the same tables and rules as migrations/sqlite/0001_init.sql,
-- with native types. Ids are uuid; times stay Unix milliseconds (bigint), as on SQLite, so both
-- stores hand the rest of Hark the same values.

CREATE TABLE settings (
    name  text PRIMARY KEY,
    value bytea NOT NULL
);

CREATE TABLE sites (
    id              uuid PRIMARY KEY,
    name            text NOT NULL,
    site_key        text NOT NULL UNIQUE,
    allowed_origins jsonb NOT NULL DEFAULT '[]',  -- array of origins
    identity_secret text NOT NULL,
    widget_settings jsonb NOT NULL DEFAULT '{}',  -- object owned by the widget
    created_at      bigint NOT NULL
);

CREATE TABLE agents (
    id            uuid PRIMARY KEY,
    email         text NOT NULL UNIQUE,
    name          text NOT NULL,
    role          text NOT NULL CHECK (role IN ('admin', 'agent')),
    password_hash text NOT NULL,
    disabled      boolean NOT NULL DEFAULT false,
    created_at    bigint NOT NULL
);

CREATE TABLE agent_sites (
    agent_id uuid NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
    site_id  uuid NOT NULL REFERENCES sites(id) ON DELETE CASCADE,
    PRIMARY KEY (agent_id, site_id)
);

CREATE TABLE sessions (
    token_hash text PRIMARY KEY,                  -- SHA-256 of the bearer token, hex
    agent_id   uuid NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
    csrf_token text NOT NULL,
    created_at bigint NOT NULL,
    expires_at bigint NOT NULL
);
CREATE INDEX sessions_agent ON sessions(agent_id);
CREATE INDEX sessions_expiry ON sessions(expires_at);

CREATE TABLE visitors (
    id         uuid PRIMARY KEY,
    site_id    uuid NOT NULL REFERENCES sites(id) ON DELETE CASCADE,
    created_at bigint NOT NULL
);

CREATE TABLE conversations (
    id          uuid PRIMARY KEY,
    site_id     uuid NOT NULL REFERENCES sites(id) ON DELETE CASCADE,
    visitor_id  uuid NOT NULL REFERENCES visitors(id) ON DELETE CASCADE,
    status      text NOT NULL CHECK (status IN ('open', 'closed')),
    assignee_id uuid REFERENCES agents(id) ON DELETE SET NULL,
    last_seq    bigint NOT NULL DEFAULT 0,        -- reserved by UPDATE … RETURNING in the commit
    first_seq   bigint NOT NULL DEFAULT 1,        -- messages below were removed by retention
    created_at  bigint NOT NULL,
    updated_at  bigint NOT NULL
);
-- A visitor has at most one open conversation; this is what makes "open or create" race-free,
-- across nodes too.
CREATE UNIQUE INDEX conversations_one_open ON conversations(visitor_id) WHERE status = 'open';
CREATE INDEX conversations_site_recent ON conversations(site_id, updated_at DESC, id DESC);
CREATE INDEX conversations_recent ON conversations(updated_at DESC, id DESC);

CREATE TABLE messages (
    conversation_id uuid NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    seq             bigint NOT NULL,
    id              uuid NOT NULL UNIQUE,
    author_kind     text NOT NULL CHECK (author_kind IN ('visitor', 'agent', 'system')),
    author_id       uuid,
    author_name     text,
    text            text NOT NULL,
    client_id       uuid,
    created_at      bigint NOT NULL,
    PRIMARY KEY (conversation_id, seq)
);
-- Idempotent send: one message per (sender, client id). Not partial, unlike SQLite's: NULLs are
-- distinct in a PostgreSQL unique index, so messages without a client id never collide, and a
-- plain index is usable by every lookup without proving `client_id IS NOT NULL`.
CREATE UNIQUE INDEX messages_client_id ON messages(client_id, author_id);

-- Hark's schema on SQLite. Ids are UUID text; times are Unix milliseconds.

CREATE TABLE settings (
    name  TEXT PRIMARY KEY,
    value BLOB NOT NULL
);

CREATE TABLE sites (
    id              TEXT PRIMARY KEY,
    name            TEXT NOT NULL,
    site_key        TEXT NOT NULL UNIQUE,
    allowed_origins TEXT NOT NULL DEFAULT '[]',   -- JSON array of origins
    identity_secret TEXT NOT NULL,
    widget_settings TEXT NOT NULL DEFAULT '{}',   -- JSON object owned by the widget
    created_at      INTEGER NOT NULL
);

CREATE TABLE agents (
    id            TEXT PRIMARY KEY,
    email         TEXT NOT NULL UNIQUE,
    name          TEXT NOT NULL,
    role          TEXT NOT NULL CHECK (role IN ('admin', 'agent')),
    password_hash TEXT NOT NULL,
    disabled      INTEGER NOT NULL DEFAULT 0,
    created_at    INTEGER NOT NULL
);

CREATE TABLE agent_sites (
    agent_id TEXT NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
    site_id  TEXT NOT NULL REFERENCES sites(id) ON DELETE CASCADE,
    PRIMARY KEY (agent_id, site_id)
) WITHOUT ROWID;

CREATE TABLE sessions (
    token_hash TEXT PRIMARY KEY,                  -- SHA-256 of the bearer token, hex
    agent_id   TEXT NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
    csrf_token TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE INDEX sessions_agent ON sessions(agent_id);

CREATE TABLE visitors (
    id         TEXT PRIMARY KEY,
    site_id    TEXT NOT NULL REFERENCES sites(id) ON DELETE CASCADE,
    created_at INTEGER NOT NULL
);

CREATE TABLE conversations (
    id          TEXT PRIMARY KEY,
    site_id     TEXT NOT NULL REFERENCES sites(id) ON DELETE CASCADE,
    visitor_id  TEXT NOT NULL REFERENCES visitors(id) ON DELETE CASCADE,
    status      TEXT NOT NULL CHECK (status IN ('open', 'closed')),
    assignee_id TEXT REFERENCES agents(id) ON DELETE SET NULL,
    last_seq    INTEGER NOT NULL DEFAULT 0,
    first_seq   INTEGER NOT NULL DEFAULT 1,       -- messages below were removed by retention
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
);
-- A visitor has at most one open conversation; this is what makes "open or create" race-free.
CREATE UNIQUE INDEX conversations_one_open ON conversations(visitor_id) WHERE status = 'open';
CREATE INDEX conversations_site_recent ON conversations(site_id, updated_at DESC, id DESC);
CREATE INDEX conversations_recent ON conversations(updated_at DESC, id DESC);

CREATE TABLE messages (
    conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    seq             INTEGER NOT NULL,
    id              TEXT NOT NULL UNIQUE,
    author_kind     TEXT NOT NULL CHECK (author_kind IN ('visitor', 'agent', 'system')),
    author_id       TEXT,
    author_name     TEXT,
    text            TEXT NOT NULL,
    client_id       TEXT,
    created_at      INTEGER NOT NULL,
    PRIMARY KEY (conversation_id, seq)
) WITHOUT ROWID;
-- Idempotent send: one message per (sender, client id).
CREATE UNIQUE INDEX messages_client_id ON messages(client_id, author_id) WHERE client_id IS NOT NULL;

-- Read receipts ("read up to seq N") per reader and conversation, and the visitor's profile.

CREATE TABLE read_marks (
    conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    reader_id       TEXT NOT NULL,                -- a visitor id or an agent id
    seq             INTEGER NOT NULL,             -- never above the conversation's last_seq
    updated_at      INTEGER NOT NULL,
    PRIMARY KEY (conversation_id, reader_id)
) WITHOUT ROWID;

ALTER TABLE visitors ADD COLUMN name TEXT;
ALTER TABLE visitors ADD COLUMN email TEXT;

-- Read receipts ("read up to seq N") per reader and conversation, and the visitor's profile.
-- Same meaning as migrations/sqlite/0002.

CREATE TABLE read_marks (
    conversation_id uuid NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    reader_id       uuid NOT NULL,                -- a visitor id or an agent id
    seq             bigint NOT NULL,              -- never above the conversation's last_seq
    updated_at      bigint NOT NULL,
    PRIMARY KEY (conversation_id, reader_id)
);

ALTER TABLE visitors ADD COLUMN name text;
ALTER TABLE visitors ADD COLUMN email text;

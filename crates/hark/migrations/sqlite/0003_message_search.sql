-- Full-text search over message text (FTS5, compiled into the bundled SQLite).
--
-- `messages` is WITHOUT ROWID, and an FTS5 index is keyed by an integer rowid, so
-- `message_index` gives every message one, and `message_text` is a contentless index over it: the
-- text is stored once (in `messages`), searched through the index, and read back by joining.
-- Triggers keep both in the committing transaction of every insert or delete, whichever
-- connection writes (the message writer thread or sqlx). The tokenizer keeps diacritics, like
-- PostgreSQL's 'simple' configuration, so both stores match the same words.

CREATE TABLE message_index (
    rowid           INTEGER PRIMARY KEY,
    conversation_id TEXT NOT NULL,
    seq             INTEGER NOT NULL,
    UNIQUE (conversation_id, seq)
);

CREATE VIRTUAL TABLE message_text USING fts5(
    text,
    content = '',
    contentless_delete = 1,
    tokenize = 'unicode61 remove_diacritics 0'
);

INSERT INTO message_index (conversation_id, seq)
    SELECT conversation_id, seq FROM messages ORDER BY created_at, conversation_id, seq;
INSERT INTO message_text (rowid, text)
    SELECT i.rowid, m.text FROM message_index i
    JOIN messages m ON m.conversation_id = i.conversation_id AND m.seq = i.seq;

-- Inside a trigger, last_insert_rowid() is the row the trigger itself just inserted.
CREATE TRIGGER messages_search_insert AFTER INSERT ON messages BEGIN
    INSERT INTO message_index (conversation_id, seq) VALUES (new.conversation_id, new.seq);
    INSERT INTO message_text (rowid, text) VALUES (last_insert_rowid(), new.text);
END;

CREATE TRIGGER messages_search_delete AFTER DELETE ON messages BEGIN
    DELETE FROM message_text WHERE rowid =
        (SELECT rowid FROM message_index WHERE conversation_id = old.conversation_id AND seq = old.seq);
    DELETE FROM message_index WHERE conversation_id = old.conversation_id AND seq = old.seq;
END;

CREATE TRIGGER messages_search_update AFTER UPDATE OF text ON messages BEGIN
    DELETE FROM message_text WHERE rowid =
        (SELECT rowid FROM message_index WHERE conversation_id = old.conversation_id AND seq = old.seq);
    INSERT INTO message_text (rowid, text)
        SELECT rowid, new.text FROM message_index
        WHERE conversation_id = new.conversation_id AND seq = new.seq;
END;

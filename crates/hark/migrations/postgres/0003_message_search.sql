-- Full-text search over message text: a tsvector kept by PostgreSQL itself (a stored generated
-- column, so every writer on every node fills it in the committing transaction) and a GIN index.
-- 'simple' configuration: lower-cased words, no stemming and no stop words, because messages
-- are in any language; it matches what the SQLite store's FTS5 tokenizer does.

ALTER TABLE messages
    ADD COLUMN text_search tsvector GENERATED ALWAYS AS (to_tsvector('simple', text)) STORED;
CREATE INDEX messages_text_search ON messages USING gin (text_search);

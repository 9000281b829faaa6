-- Dead letters kept for an operator (engine/src/store/dead_letters.rs): every message of the
-- deployment that could never be handled, with why and where from, until it is replayed or
-- purged. The engine moves them here from the broker's dead-letter queue.
CREATE TABLE IF NOT EXISTS dead_letters (
    id           TEXT PRIMARY KEY,
    source_queue TEXT NOT NULL,
    reason       TEXT NOT NULL,
    dead_at      BIGINT NOT NULL,
    message_id   TEXT NOT NULL,
    message_key  TEXT NOT NULL,
    payload      BYTEA NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_letters_by_time ON dead_letters (dead_at, id);

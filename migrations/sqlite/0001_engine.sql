-- The engine's tables. Times are milliseconds since the Unix epoch; JSON is stored as TEXT.

-- Every definition a saga ever started with, by content hash: a running saga stays pinned to it.
CREATE TABLE IF NOT EXISTS saga_definitions (
    hash       TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    version    BIGINT NOT NULL,
    source     TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

-- One row per saga; `state` is the state machine's whole state, `version` the optimistic lock.
CREATE TABLE IF NOT EXISTS sagas (
    id              TEXT PRIMARY KEY,
    name            TEXT NOT NULL,
    definition_hash TEXT NOT NULL REFERENCES saga_definitions (hash),
    sequence_key    TEXT NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('queued', 'running', 'compensating', 'completed', 'compensated', 'failed')),
    state           TEXT NOT NULL,
    version         BIGINT NOT NULL,
    idempotency_key TEXT UNIQUE,
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL,
    finished_at     BIGINT
);
CREATE INDEX IF NOT EXISTS sagas_by_status ON sagas (status, created_at);
CREATE INDEX IF NOT EXISTS sagas_by_key ON sagas (sequence_key, created_at);
CREATE INDEX IF NOT EXISTS sagas_unfinished ON sagas (created_at) WHERE finished_at IS NULL;

-- A projection of each saga's steps, for status queries and operators.
CREATE TABLE IF NOT EXISTS saga_steps (
    saga_id    TEXT NOT NULL,
    step_index BIGINT NOT NULL,
    step_id    TEXT NOT NULL,
    status     TEXT NOT NULL,
    attempts   BIGINT NOT NULL,
    last_error TEXT,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (saga_id, step_index)
);

-- The timeline: append-only.
CREATE TABLE IF NOT EXISTS saga_history (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    saga_id TEXT NOT NULL,
    at      BIGINT NOT NULL,
    kind    TEXT NOT NULL,
    step    TEXT,
    detail  TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS saga_history_by_saga ON saga_history (saga_id, id);

-- Transactional outbox: written with the state change, sent by the relay, marked after confirm.
CREATE TABLE IF NOT EXISTS outbox (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id  TEXT NOT NULL UNIQUE,
    destination TEXT NOT NULL,
    routing_key TEXT NOT NULL,
    payload     TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    sent_at     BIGINT
);
CREATE INDEX IF NOT EXISTS outbox_unsent ON outbox (id) WHERE sent_at IS NULL;

-- Processed message ids: a redelivered reply is recognised and ignored.
CREATE TABLE IF NOT EXISTS inbox (
    message_id  TEXT PRIMARY KEY,
    saga_id     TEXT NOT NULL,
    received_at BIGINT NOT NULL
);

-- Durable timers (retry backoff, step timeouts); a timer is claimed by deleting its row.
CREATE TABLE IF NOT EXISTS timers (
    id      TEXT PRIMARY KEY,
    saga_id TEXT NOT NULL,
    due_at  BIGINT NOT NULL,
    event   TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS timers_by_due ON timers (due_at);

-- Per-key sequencing: the holder runs, the others wait in arrival order.
CREATE TABLE IF NOT EXISTS sequence_keys (
    seq_key TEXT PRIMARY KEY,
    holder  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS sequence_queue (
    position INTEGER PRIMARY KEY AUTOINCREMENT,
    seq_key  TEXT NOT NULL,
    saga_id  TEXT NOT NULL UNIQUE
);
CREATE INDEX IF NOT EXISTS sequence_queue_by_key ON sequence_queue (seq_key, position);

-- The sagas' status CHECK without an `IN` list. SQLite evaluates `status IN ('queued', …)`
-- (three values or more) by building a temporary b-tree of the list for every row the batch
-- update (`UPDATE … FROM (VALUES …)`) writes: one per decision, on the embedded mode's one
-- writer. The same check spelled with `=` and `OR` is a few comparisons. SQLite cannot alter a
-- CHECK: the table is rebuilt with the same columns, rows and indexes (once; running this
-- again rebuilds it again). `sagas_to_purge` keeps its two-value `IN`, which SQLite compares
-- without a b-tree and which retention's look-up names.
CREATE TABLE sagas_rebuilt (
    id              TEXT PRIMARY KEY,
    name            TEXT NOT NULL,
    definition_hash TEXT NOT NULL REFERENCES saga_definitions (hash),
    sequence_key    TEXT NOT NULL,
    status          TEXT NOT NULL CHECK (status = 'queued' OR status = 'running'
        OR status = 'compensating' OR status = 'completed' OR status = 'compensated'
        OR status = 'failed'),
    state           TEXT NOT NULL,
    version         BIGINT NOT NULL,
    idempotency_key TEXT UNIQUE,
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL,
    finished_at     BIGINT,
    purged_at       BIGINT
);
INSERT INTO sagas_rebuilt (id, name, definition_hash, sequence_key, status, state, version,
        idempotency_key, created_at, updated_at, finished_at, purged_at)
    SELECT id, name, definition_hash, sequence_key, status, state, version,
        idempotency_key, created_at, updated_at, finished_at, purged_at
    FROM sagas;
DROP TABLE sagas;
ALTER TABLE sagas_rebuilt RENAME TO sagas;
CREATE INDEX sagas_by_status ON sagas (status, created_at);
CREATE INDEX sagas_by_key ON sagas (sequence_key, created_at);
CREATE INDEX sagas_unfinished ON sagas (created_at) WHERE finished_at IS NULL;
CREATE INDEX sagas_to_purge ON sagas (finished_at, id)
    WHERE purged_at IS NULL AND status IN ('completed', 'compensated');

-- The barrier's `op` CHECK without an `IN` list. SQLite evaluates `op IN ('action', …)` (three
-- values or more) by building a temporary b-tree of the list for every row the batch's insert
-- writes: one per command. The same check spelled with `=` and `OR` is a few comparisons.
-- SQLite cannot alter a CHECK: the table is rebuilt with the same columns, rows and index
-- (once; running this again rebuilds it again).
CREATE TABLE barrier_rebuilt (
    saga_id    TEXT NOT NULL,
    step       TEXT NOT NULL,
    op         TEXT NOT NULL CHECK (op = 'action' OR op = 'compensate' OR op = 'try'
        OR op = 'confirm' OR op = 'cancel'),
    outcome    TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (saga_id, step, op)
);
INSERT INTO barrier_rebuilt (saga_id, step, op, outcome, created_at)
    SELECT saga_id, step, op, outcome, created_at FROM barrier;
DROP TABLE barrier;
ALTER TABLE barrier_rebuilt RENAME TO barrier;
CREATE INDEX barrier_by_age ON barrier (created_at);

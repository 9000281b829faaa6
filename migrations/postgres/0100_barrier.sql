-- The worker SDK's idempotency barrier: one row per (saga, step, operation). `outcome` is the
-- recorded answer (JSON); a duplicate command gets it back and changes nothing. An undo that
-- arrives before its forward operation is recorded as a null undo, and the late forward
-- operation finds that row and is refused.
CREATE TABLE IF NOT EXISTS barrier (
    saga_id    TEXT NOT NULL,
    step       TEXT NOT NULL,
    op         TEXT NOT NULL CHECK (op IN ('action', 'compensate', 'try', 'confirm', 'cancel')),
    outcome    TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (saga_id, step, op)
);

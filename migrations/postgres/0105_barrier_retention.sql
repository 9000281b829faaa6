-- Barrier retention (workers/src/barrier.rs `purge`): rows are purged by age, oldest first.
CREATE INDEX IF NOT EXISTS barrier_by_age ON barrier (created_at);

-- Retention goes by `finished_at` (set once, when the saga becomes final) instead of
-- `updated_at` (rewritten by every decision), so the index is not touched by every update.
DROP INDEX IF EXISTS sagas_to_purge;
CREATE INDEX IF NOT EXISTS sagas_to_purge ON sagas (finished_at, id)
    WHERE purged_at IS NULL AND status IN ('completed', 'compensated');

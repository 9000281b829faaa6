-- A saga row is rewritten by every decision. With `updated_at` indexed (0002's sagas_to_purge),
-- no rewrite could be a HOT update: each one inserted into every index of the table. Retention
-- now goes by `finished_at` (set once, when the saga becomes final, which is what "finished long
-- ago" means anyway), and pages keep room for the new row version.
DROP INDEX IF EXISTS sagas_to_purge;
CREATE INDEX IF NOT EXISTS sagas_to_purge ON sagas (finished_at, id)
    WHERE purged_at IS NULL AND status IN ('completed', 'compensated');
ALTER TABLE sagas SET (fillfactor = 70);
ALTER TABLE saga_steps SET (fillfactor = 70);

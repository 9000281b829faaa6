-- The outbox is a queue of messages not yet confirmed by the broker: the relay deletes a row
-- once its confirm arrived, instead of marking it sent. An update that set `sent_at` changed a
-- column of the `outbox_unsent` predicate, so it could never be HOT: each one wrote a new row
-- version into every index (measured: 10 non-HOT updates per order saga, the largest write cost
-- of the engine's database). A delete writes no index entry, the table stays as small as the
-- backlog, and a claim (`lease_until`, in no index) finds room on its page for a HOT update.
-- What was sent is in each saga's history (`dispatch`).
DELETE FROM outbox WHERE sent_at IS NOT NULL;
DROP INDEX IF EXISTS outbox_unsent;
DROP INDEX IF EXISTS outbox_by_saga;
ALTER TABLE outbox DROP COLUMN IF EXISTS sent_at;
ALTER TABLE outbox SET (fillfactor = 70);

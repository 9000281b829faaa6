-- The outbox is a queue of messages not yet confirmed by the broker: the relay deletes a row
-- once its confirm arrived, instead of marking it sent (see the PostgreSQL migration of the same
-- name). What was sent is in each saga's history (`dispatch`).
DELETE FROM outbox WHERE sent_at IS NOT NULL;
DROP INDEX IF EXISTS outbox_unsent;
DROP INDEX IF EXISTS outbox_by_saga;
ALTER TABLE outbox DROP COLUMN sent_at;

-- Retention (engine/src/retention.rs): the bulky per-saga rows of sagas finished long ago are
-- purged in small batches; the `sagas` row and its `saga_steps` projection stay, so status still
-- answers. `updated_at` (set by every state change) is the saga's last update; `purged_at` marks
-- a saga whose rows are gone, so that it is never looked at again.
ALTER TABLE sagas ADD COLUMN IF NOT EXISTS purged_at BIGINT;

-- The sagas still to purge, oldest update first: finished cleanly (Failed waits for an operator)
-- and not purged yet. Purged and running sagas are not in it, so finding a batch stays cheap
-- however many sagas were purged before.
CREATE INDEX IF NOT EXISTS sagas_to_purge ON sagas (updated_at, id)
    WHERE purged_at IS NULL AND status IN ('completed', 'compensated');

-- A saga's rows, by saga. The history already has `saga_history_by_saga`.
CREATE INDEX IF NOT EXISTS inbox_by_saga ON inbox (saga_id);
CREATE INDEX IF NOT EXISTS timers_by_saga ON timers (saga_id);
-- Outbox rows carry no saga id column: their message id is the command id
-- `<saga id>/<step>/<op>/<attempt>`, so they are found by its first segment. The purge query
-- must spell this expression exactly like this for the index to be used.
CREATE INDEX IF NOT EXISTS outbox_by_saga ON outbox (split_part(message_id, '/', 1));

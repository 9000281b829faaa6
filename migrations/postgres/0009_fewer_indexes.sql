-- Fewer index entries per row on the hot path (docs/architecture.md, "Measured choices"):
-- * `saga_history` is read by saga only (the timeline, newest first) and purged by saga, so its
--   primary key becomes (saga_id, id) and the separate (saga_id, id) index goes: one index
--   entry per timeline line instead of two (13 lines per order saga).
-- * `timers` is read by due time and by id only: the by-saga index (5 entries per order saga)
--   served retention, which finds a finished saga's leftover timers without it (the timers table
--   holds only live timers, and a final saga has none: its leftovers fire and are dropped).
ALTER TABLE saga_history DROP CONSTRAINT IF EXISTS saga_history_pkey;
ALTER TABLE saga_history ADD PRIMARY KEY (saga_id, id);
DROP INDEX IF EXISTS saga_history_by_saga;
DROP INDEX IF EXISTS timers_by_saga;

-- Fewer index entries per row on the hot path (see the PostgreSQL migration of the same name).
-- SQLite's `saga_history` keeps its rowid key and its (saga_id, id) index: that is one index
-- already. `timers` loses its by-saga index, which only retention read.
DROP INDEX IF EXISTS timers_by_saga;

-- Nothing to do on PostgreSQL: the SQLite migration of this name spells the barrier's `op`
-- CHECK without an `IN` list, which SQLite turns into a temporary b-tree per row written.
SELECT 1;

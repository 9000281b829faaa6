-- Nothing to do on PostgreSQL: the SQLite migration of this name spells the demo services'
-- CHECKs without `IN` lists, which SQLite turns into a temporary b-tree per statement.
SELECT 1;

-- A saga's state (`sagas.state`) is the one record of its steps and of the replies it applied,
-- so two tables that repeated it are gone (docs/architecture.md, "Measured choices"):
-- * `saga_steps`, a projection of each step's status, attempts and last error, rewritten by
--   every decision (12 rows written per order saga) and read only to name the steps of a saga
--   whose definition no longer compiles (now read from the stored definition's YAML);
-- * `inbox`, one row per applied reply. The state machine already ignores a reply that matches
--   nothing in flight (a duplicate, a late or stale attempt), and the version-checked saga
--   write makes two engines that apply one reply at once conflict, so a redelivered reply has
--   one effect without it; it is now recorded in the timeline as `ignored`.
-- An engine of an earlier version must not run on this database any more.
DROP TABLE IF EXISTS saga_steps;
DROP TABLE IF EXISTS inbox;

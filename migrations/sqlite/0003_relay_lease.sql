-- The outbox relay claims rows with a lease (engine/src/store/outbox.rs): one UPDATE marks a
-- batch as taken until `lease_until`; a relay that dies leaves rows that are claimed again once
-- their lease runs out.
ALTER TABLE outbox ADD COLUMN lease_until INTEGER;

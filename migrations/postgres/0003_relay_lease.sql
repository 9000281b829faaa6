-- The outbox relay claims rows with a lease (engine/src/store/outbox.rs): one UPDATE marks a
-- batch as taken until `lease_until`, so several engines share the work without holding a
-- transaction open while the broker confirms; a relay that dies leaves rows that are claimed
-- again once their lease runs out.
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS lease_until BIGINT;

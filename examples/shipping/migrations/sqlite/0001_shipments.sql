-- The shipping service's own table: one row per (saga, step) that took effect, written on the
-- connection the SDK hands the handler, so in the transaction that writes the step's barrier
-- row. A compensation changes the row's state; it never deletes it.
CREATE TABLE IF NOT EXISTS shipments (
    saga_id  TEXT NOT NULL,
    step     TEXT NOT NULL,
    order_id TEXT NOT NULL,
    detail   TEXT NOT NULL,  -- reserve: how many parcels; book: the tracking number
    -- `=` and `OR`, not `IN (…)`: SQLite builds a temporary b-tree for a CHECK's list of three
    -- or more values at every row written (see the README, "Migrations").
    state    TEXT NOT NULL CHECK (state = 'reserved' OR state = 'released' OR state = 'booked'
        OR state = 'cancelled'),
    PRIMARY KEY (saga_id, step)
);
CREATE INDEX IF NOT EXISTS shipments_by_order ON shipments (order_id);

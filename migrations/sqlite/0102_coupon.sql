-- coupon: each coupon's state, and the ledger of every transition, keyed by (saga, step, kind).
-- saga_id / order_id say who holds a 'frozen' or 'used' coupon (NULL when 'available').
CREATE TABLE IF NOT EXISTS coupons (
    coupon_id TEXT PRIMARY KEY,
    owner     TEXT NOT NULL,
    state     TEXT NOT NULL CHECK (state IN ('available', 'frozen', 'used')),
    saga_id   TEXT NULL,
    order_id  TEXT NULL,
    CHECK ((state = 'available') = (saga_id IS NULL))
);

CREATE TABLE IF NOT EXISTS coupon_ledger (
    saga_id   TEXT NOT NULL,
    step      TEXT NOT NULL,
    kind      TEXT NOT NULL CHECK (kind IN ('freeze', 'use', 'unfreeze', 'restore')),
    coupon_id TEXT NOT NULL,
    order_id  TEXT NOT NULL,
    PRIMARY KEY (saga_id, step, kind)
);

-- The demo services' CHECKs without `IN` lists. SQLite evaluates `kind IN ('charge', …)` (three
-- or more values) by building a temporary b-tree of the list once per statement that writes the
-- table; each service operation is its own statement, so that was a temporary b-tree per
-- command (callgrind, `sagaflow dev --orders 1000`: ~8,600 of them, a tenth of the embedded
-- mode's instructions with their writes). The same check spelled with `=` and `OR` is a few
-- comparisons. SQLite cannot alter a CHECK: each table is rebuilt with the same columns, rows
-- and indexes (once; running this again rebuilds them again).
CREATE TABLE payment_ledger_rebuilt (
    saga_id  TEXT NOT NULL,
    step     TEXT NOT NULL,
    kind     TEXT NOT NULL CHECK (kind = 'charge' OR kind = 'charge_reversal' OR kind = 'refund'),
    account  TEXT NOT NULL,
    order_id TEXT NOT NULL,
    amount   BIGINT NOT NULL CHECK (amount >= 0),
    PRIMARY KEY (saga_id, step, kind)
);
INSERT INTO payment_ledger_rebuilt (saga_id, step, kind, account, order_id, amount)
    SELECT saga_id, step, kind, account, order_id, amount FROM payment_ledger;
DROP TABLE payment_ledger;
ALTER TABLE payment_ledger_rebuilt RENAME TO payment_ledger;
CREATE INDEX payment_ledger_order ON payment_ledger (order_id);

CREATE TABLE coupons_rebuilt (
    coupon_id TEXT PRIMARY KEY,
    owner     TEXT NOT NULL,
    state     TEXT NOT NULL CHECK (state = 'available' OR state = 'frozen' OR state = 'used'),
    saga_id   TEXT NULL,
    order_id  TEXT NULL,
    CHECK ((state = 'available') = (saga_id IS NULL))
);
INSERT INTO coupons_rebuilt (coupon_id, owner, state, saga_id, order_id)
    SELECT coupon_id, owner, state, saga_id, order_id FROM coupons;
DROP TABLE coupons;
ALTER TABLE coupons_rebuilt RENAME TO coupons;

CREATE TABLE coupon_ledger_rebuilt (
    saga_id   TEXT NOT NULL,
    step      TEXT NOT NULL,
    kind      TEXT NOT NULL CHECK (kind = 'freeze' OR kind = 'use' OR kind = 'unfreeze'
        OR kind = 'restore'),
    coupon_id TEXT NOT NULL,
    order_id  TEXT NOT NULL,
    PRIMARY KEY (saga_id, step, kind)
);
INSERT INTO coupon_ledger_rebuilt (saga_id, step, kind, coupon_id, order_id)
    SELECT saga_id, step, kind, coupon_id, order_id FROM coupon_ledger;
DROP TABLE coupon_ledger;
ALTER TABLE coupon_ledger_rebuilt RENAME TO coupon_ledger;

CREATE TABLE points_ledger_rebuilt (
    saga_id TEXT NOT NULL,
    step    TEXT NOT NULL,
    kind    TEXT NOT NULL CHECK (kind = 'grant' OR kind = 'grant_reversal' OR kind = 'revoke'
        OR kind = 'revoke_reversal'),
    user_id TEXT NOT NULL,
    delta   BIGINT NOT NULL,
    reason  TEXT NULL,
    PRIMARY KEY (saga_id, step, kind)
);
INSERT INTO points_ledger_rebuilt (saga_id, step, kind, user_id, delta, reason)
    SELECT saga_id, step, kind, user_id, delta, reason FROM points_ledger;
DROP TABLE points_ledger;
ALTER TABLE points_ledger_rebuilt RENAME TO points_ledger;

CREATE TABLE gmv_ledger_rebuilt (
    saga_id     TEXT NOT NULL,
    step        TEXT NOT NULL,
    kind        TEXT NOT NULL CHECK (kind = 'add' OR kind = 'add_reversal' OR kind = 'subtract'
        OR kind = 'subtract_reversal'),
    campaign_id TEXT NOT NULL,
    delta       BIGINT NOT NULL,
    PRIMARY KEY (saga_id, step, kind)
);
INSERT INTO gmv_ledger_rebuilt (saga_id, step, kind, campaign_id, delta)
    SELECT saga_id, step, kind, campaign_id, delta FROM gmv_ledger;
DROP TABLE gmv_ledger;
ALTER TABLE gmv_ledger_rebuilt RENAME TO gmv_ledger;

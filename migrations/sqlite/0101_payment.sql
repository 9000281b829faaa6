-- payment: account balances and the ledger of every movement, keyed by (saga, step, kind).
-- Amounts are cents; the kind says the direction: 'charge' debits the account (order-paid's
-- action), 'charge_reversal' credits back a charge (its compensation), 'refund' credits an
-- order-refund.
CREATE TABLE IF NOT EXISTS payment_accounts (
    account TEXT PRIMARY KEY,
    balance BIGINT NOT NULL CHECK (balance >= 0),
    initial BIGINT NOT NULL CHECK (initial >= 0)
);

CREATE TABLE IF NOT EXISTS payment_ledger (
    saga_id  TEXT NOT NULL,
    step     TEXT NOT NULL,
    kind     TEXT NOT NULL CHECK (kind IN ('charge', 'charge_reversal', 'refund')),
    account  TEXT NOT NULL,
    order_id TEXT NOT NULL,
    amount   BIGINT NOT NULL CHECK (amount >= 0),
    PRIMARY KEY (saga_id, step, kind)
);

-- A refund looks up what its order was charged.
CREATE INDEX IF NOT EXISTS payment_ledger_order ON payment_ledger (order_id);

-- points: each user's balance (initial = what seeding gave them) and the ledger of signed
-- deltas, keyed by (saga, step, kind): 'grant' / 'grant_reversal' (order-paid's action and its
-- compensation), 'revoke' / 'revoke_reversal' (order-refund's). balance = initial + sum(delta).
-- A balance may go negative only through a compensation (it must not fail).
CREATE TABLE IF NOT EXISTS points_balances (
    user_id TEXT PRIMARY KEY,
    points  BIGINT NOT NULL,
    initial BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE IF NOT EXISTS points_ledger (
    saga_id TEXT NOT NULL,
    step    TEXT NOT NULL,
    kind    TEXT NOT NULL CHECK (kind IN ('grant', 'grant_reversal', 'revoke', 'revoke_reversal')),
    user_id TEXT NOT NULL,
    delta   BIGINT NOT NULL,
    reason  TEXT NULL,
    PRIMARY KEY (saga_id, step, kind)
);

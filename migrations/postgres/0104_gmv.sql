-- gmv: each campaign's gross merchandise value in cents, and the ledger of signed deltas keyed
-- by (saga, step, kind): 'add' / 'add_reversal' (order-paid's action and its compensation),
-- 'subtract' / 'subtract_reversal' (order-refund's). gmv = sum(delta) for the campaign.
CREATE TABLE IF NOT EXISTS campaign_gmv (
    campaign_id TEXT PRIMARY KEY,
    gmv         BIGINT NOT NULL
);

CREATE TABLE IF NOT EXISTS gmv_ledger (
    saga_id     TEXT NOT NULL,
    step        TEXT NOT NULL,
    kind        TEXT NOT NULL CHECK (kind IN ('add', 'add_reversal', 'subtract', 'subtract_reversal')),
    campaign_id TEXT NOT NULL,
    delta       BIGINT NOT NULL,
    PRIMARY KEY (saga_id, step, kind)
);

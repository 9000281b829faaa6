//! The payment service: account balances in cents.
//!
//! * [`Charge`] — order-paid's `payment` step: `charge` debits the buyer, its compensation
//!   `refund` credits back exactly what the ledger says this (saga, step) charged.
//! * [`Refund`] — order-refund's `refund` step (the pivot, never compensated): credits the buyer,
//!   at most what the order was charged and not yet given back.
//!
//! Ledger kinds: `charge` (debit), `charge_reversal` (credit undoing a charge), `refund` (credit of
//! an order-refund), so the invariant check can tell the two credits apart.

use std::collections::{BTreeMap, HashMap};

use async_trait::async_trait;
use serde_json::{Value, json};
use sqlx::{AnyConnection, Row};

use super::{
    Finished, ORDER_PAID, ORDER_REFUND, Outcome, OutcomeState, irreversible, money, param_cents,
};
use crate::sdk::{SagaStep, StepContext, StepError, param_str};

const SERVICE: &str = "payment";

/// order-paid's `payment` step: action `charge`, compensation `refund`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Charge;

/// order-refund's `refund` step: action `refund`, compensation none.
#[derive(Debug, Clone, Copy, Default)]
pub struct Refund;

/// One ledger row of a (saga, step).
struct Entry {
    account: String,
    order_id: String,
    amount: i64,
}

async fn entry(
    conn: &mut AnyConnection,
    ctx: &StepContext,
    kind: &str,
) -> Result<Option<Entry>, sqlx::Error> {
    let row = sqlx::query(
        "SELECT account, order_id, amount FROM payment_ledger \
         WHERE saga_id = $1 AND step = $2 AND kind = $3",
    )
    .bind(&ctx.saga_id)
    .bind(&ctx.step)
    .bind(kind)
    .fetch_optional(&mut *conn)
    .await?;
    row.map(|r| {
        Ok(Entry {
            account: r.try_get("account")?,
            order_id: r.try_get("order_id")?,
            amount: r.try_get("amount")?,
        })
    })
    .transpose()
}

async fn record(
    conn: &mut AnyConnection,
    ctx: &StepContext,
    kind: &str,
    entry: &Entry,
) -> Result<(), sqlx::Error> {
    super::first_entry(
        record_once(conn, ctx, kind, entry).await?,
        "payment",
        ctx,
        kind,
    )
}

/// Records the entry unless this (saga, step, kind) already has one; false for a replay. Done
/// first, before the effect: a replay then costs this one statement, and when the effect is
/// refused the handler's error rolls the entry back with everything else.
async fn record_once(
    conn: &mut AnyConnection,
    ctx: &StepContext,
    kind: &str,
    entry: &Entry,
) -> Result<bool, sqlx::Error> {
    let inserted = sqlx::query(
        "INSERT INTO payment_ledger (saga_id, step, kind, account, order_id, amount) \
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (saga_id, step, kind) DO NOTHING",
    )
    .bind(&ctx.saga_id)
    .bind(&ctx.step)
    .bind(kind)
    .bind(&entry.account)
    .bind(&entry.order_id)
    .bind(entry.amount)
    .execute(&mut *conn)
    .await?;
    Ok(inserted.rows_affected() == 1)
}

async fn balance(conn: &mut AnyConnection, account: &str) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query("SELECT balance FROM payment_accounts WHERE account = $1")
        .bind(account)
        .fetch_optional(&mut *conn)
        .await?
        .map(|r| r.try_get("balance"))
        .transpose()
}

/// Credits an account; `false` if it does not exist.
async fn credit(conn: &mut AnyConnection, account: &str, amount: i64) -> Result<bool, sqlx::Error> {
    let done = sqlx::query("UPDATE payment_accounts SET balance = balance + $1 WHERE account = $2")
        .bind(amount)
        .bind(account)
        .execute(&mut *conn)
        .await?;
    Ok(done.rows_affected() == 1)
}

fn unknown_account(account: &str) -> StepError {
    StepError::business(
        "unknown_account",
        format!("there is no account `{account}`"),
    )
}

fn txn_id(ctx: &StepContext) -> String {
    format!("{}/{}", ctx.saga_id, ctx.step)
}

#[async_trait]
impl SagaStep for Charge {
    /// `charge {account, amount, order_id}` → `{"txn_id"}`.
    async fn action(
        &self,
        conn: &mut AnyConnection,
        ctx: &StepContext,
        params: &Value,
    ) -> Result<Value, StepError> {
        let charge = Entry {
            account: param_str(params, "account")?.to_owned(),
            order_id: param_str(params, "order_id")?.to_owned(),
            amount: param_cents(params, "amount")?,
        };
        // The barrier already filters duplicates; this keeps a replay harmless even without it.
        if !record_once(conn, ctx, "charge", &charge).await? {
            return Ok(json!({ "txn_id": txn_id(ctx) }));
        }
        // One conditional statement, so two sagas charging one account cannot both pass a check.
        let debited = sqlx::query(
            "UPDATE payment_accounts SET balance = balance - $1 \
             WHERE account = $2 AND balance >= $1",
        )
        .bind(charge.amount)
        .bind(&charge.account)
        .execute(&mut *conn)
        .await?;
        if debited.rows_affected() == 0 {
            return Err(match balance(conn, &charge.account).await? {
                None => unknown_account(&charge.account),
                Some(has) => StepError::business(
                    "insufficient_funds",
                    format!(
                        "account `{}` has {} but order {} needs {}",
                        charge.account,
                        money(has),
                        charge.order_id,
                        money(charge.amount)
                    ),
                ),
            });
        }
        Ok(json!({ "txn_id": txn_id(ctx) }))
    }

    /// `refund`: gives back what this (saga, step) charged, or nothing if it charged nothing.
    async fn compensate(
        &self,
        conn: &mut AnyConnection,
        ctx: &StepContext,
        _params: &Value,
    ) -> Result<Value, StepError> {
        if let Some(done) = entry(conn, ctx, "charge_reversal").await? {
            return Ok(json!({ "refunded_cents": done.amount }));
        }
        let Some(charge) = entry(conn, ctx, "charge").await? else {
            return Ok(json!({ "refunded_cents": 0 }));
        };
        if !credit(conn, &charge.account, charge.amount).await? {
            // The account was deleted after the charge: only an operator can decide where the
            // money goes.
            return Err(unknown_account(&charge.account));
        }
        record(conn, ctx, "charge_reversal", &charge).await?;
        Ok(json!({ "refunded_cents": charge.amount }))
    }
}

#[async_trait]
impl SagaStep for Refund {
    /// `refund {account, amount, order_id}` → `{"refund_id", "refunded_cents"}`.
    async fn action(
        &self,
        conn: &mut AnyConnection,
        ctx: &StepContext,
        params: &Value,
    ) -> Result<Value, StepError> {
        let refund = Entry {
            account: param_str(params, "account")?.to_owned(),
            order_id: param_str(params, "order_id")?.to_owned(),
            amount: param_cents(params, "amount")?,
        };
        if let Some(done) = entry(conn, ctx, "refund").await? {
            return Ok(json!({ "refund_id": txn_id(ctx), "refunded_cents": done.amount }));
        }
        // Credit first: on PostgreSQL the row lock it takes serialises refunds of one account, so
        // the ledger read below sees every refund committed before ours. A business error after
        // it is fine: the SDK rolls the whole transaction back.
        if !credit(conn, &refund.account, refund.amount).await? {
            return Err(unknown_account(&refund.account));
        }
        let rows = sqlx::query(
            "SELECT kind, amount FROM payment_ledger WHERE order_id = $1 AND account = $2",
        )
        .bind(&refund.order_id)
        .bind(&refund.account)
        .fetch_all(&mut *conn)
        .await?;
        let mut refundable = 0i64;
        for row in rows {
            let amount: i64 = row.try_get("amount")?;
            match row.try_get::<String, _>("kind")?.as_str() {
                "charge" => refundable += amount,
                _ => refundable -= amount,
            }
        }
        if refund.amount > refundable {
            return Err(StepError::business(
                "refund_exceeds_charge",
                format!(
                    "order {} has {} left to refund to `{}`, asked for {}",
                    refund.order_id,
                    money(refundable),
                    refund.account,
                    money(refund.amount)
                ),
            ));
        }
        record(conn, ctx, "refund", &refund).await?;
        Ok(json!({ "refund_id": txn_id(ctx), "refunded_cents": refund.amount }))
    }

    async fn compensate(
        &self,
        _conn: &mut AnyConnection,
        _ctx: &StepContext,
        _params: &Value,
    ) -> Result<Value, StepError> {
        Err(irreversible("a refund"))
    }
}

/// Creates the accounts `(account, balance in cents)` that do not exist yet; `initial` is the
/// seeded balance, which the money-conservation check starts from.
pub async fn seed(conn: &mut AnyConnection, accounts: &[(String, i64)]) -> Result<(), sqlx::Error> {
    for (account, balance) in accounts {
        sqlx::query(
            "INSERT INTO payment_accounts (account, balance, initial) VALUES ($1, $2, $2) \
             ON CONFLICT (account) DO NOTHING",
        )
        .bind(account)
        .bind(*balance)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// What the ledger holds for one saga.
#[derive(Default)]
struct SagaMoney {
    charges: Vec<i64>,
    reversed: i64,
    reversals: usize,
    refunds: Vec<i64>,
}

impl SagaMoney {
    fn charged(&self) -> i64 {
        self.charges.iter().sum()
    }

    fn refunded(&self) -> i64 {
        self.refunds.iter().sum()
    }

    fn describe(&self) -> String {
        format!(
            "charged {} ({} charges), reversed {}, refunded {}",
            money(self.charged()),
            self.charges.len(),
            money(self.reversed),
            money(self.refunded())
        )
    }
}

#[derive(Default)]
struct AccountMoney {
    balance: i64,
    initial: i64,
    /// initial − charges + reversals + refunds, from the ledger.
    expected: i64,
}

/// The payment invariants: money is conserved (overall and per account), each completed
/// order-paid saga charged its amount exactly once and kept it, each compensated one is net zero,
/// each completed order-refund refunded its amount once, and no saga that did not finish cleanly
/// left money moved.
pub async fn check(
    conn: &mut AnyConnection,
    outcomes: &[Outcome],
) -> Result<Vec<String>, sqlx::Error> {
    let mut violations = Vec::new();
    let finished = Finished::new(outcomes);

    let mut accounts: BTreeMap<String, AccountMoney> = BTreeMap::new();
    for row in sqlx::query("SELECT account, balance, initial FROM payment_accounts")
        .fetch_all(&mut *conn)
        .await?
    {
        let initial: i64 = row.try_get("initial")?;
        accounts.insert(
            row.try_get("account")?,
            AccountMoney {
                balance: row.try_get("balance")?,
                initial,
                expected: initial,
            },
        );
    }

    let mut sagas: HashMap<String, SagaMoney> = HashMap::new();
    for row in sqlx::query("SELECT saga_id, kind, account, amount FROM payment_ledger")
        .fetch_all(&mut *conn)
        .await?
    {
        let saga_id: String = row.try_get("saga_id")?;
        let account: String = row.try_get("account")?;
        let amount: i64 = row.try_get("amount")?;
        let saga = sagas.entry(saga_id).or_default();
        let signed = match row.try_get::<String, _>("kind")?.as_str() {
            "charge" => {
                saga.charges.push(amount);
                -amount
            }
            "charge_reversal" => {
                saga.reversed += amount;
                saga.reversals += 1;
                amount
            }
            _ => {
                saga.refunds.push(amount);
                amount
            }
        };
        match accounts.get_mut(&account) {
            Some(a) => a.expected += signed,
            None => violations.push(format!(
                "payment: the ledger moves {} on account `{account}`, which does not exist",
                money(signed)
            )),
        }
    }

    let (mut balances, mut initials) = (0i64, 0i64);
    for (account, a) in &accounts {
        balances += a.balance;
        initials += a.initial;
        if a.balance != a.expected {
            violations.push(format!(
                "payment: account `{account}` holds {} but its initial {} and its ledger say {}",
                money(a.balance),
                money(a.initial),
                money(a.expected)
            ));
        }
    }
    let charged: i64 = sagas.values().map(SagaMoney::charged).sum();
    let reversed: i64 = sagas.values().map(|s| s.reversed).sum();
    let refunded: i64 = sagas.values().map(SagaMoney::refunded).sum();
    if balances + charged - reversed - refunded != initials {
        violations.push(format!(
            "payment: money is not conserved: balances {} + charges {} - reversals {} - refunds \
             {} = {}, but the accounts started with {}",
            money(balances),
            money(charged),
            money(reversed),
            money(refunded),
            money(balances + charged - reversed - refunded),
            money(initials)
        ));
    }

    for o in outcomes {
        let none = SagaMoney::default();
        let got = sagas.get(&o.saga_id).unwrap_or(&none);
        let label = o.label();
        match (o.saga.as_str(), o.state) {
            (ORDER_PAID, OutcomeState::Completed) => {
                let amount = match o.require_cents(SERVICE, "amount") {
                    Ok(a) => a,
                    Err(v) => {
                        violations.push(v);
                        continue;
                    }
                };
                if got.charges.len() != 1 {
                    violations.push(format!(
                        "payment: {label} completed but was charged {} times",
                        got.charges.len()
                    ));
                } else if got.charged() != amount {
                    violations.push(format!(
                        "payment: {label} completed but was charged {} instead of {}",
                        money(got.charged()),
                        money(amount)
                    ));
                }
                if got.reversals > 0 {
                    violations.push(format!(
                        "payment: {label} completed but its charge was reversed ({})",
                        money(got.reversed)
                    ));
                }
            }
            (ORDER_PAID, OutcomeState::Compensated) if got.charged() != got.reversed => {
                violations.push(format!(
                    "payment: {label} was compensated but is not net zero: {}",
                    got.describe()
                ));
            }
            (ORDER_REFUND, OutcomeState::Completed) => {
                let amount = match o.require_cents(SERVICE, "amount") {
                    Ok(a) => a,
                    Err(v) => {
                        violations.push(v);
                        continue;
                    }
                };
                if got.refunds.len() != 1 || got.refunded() != amount {
                    violations.push(format!(
                        "payment: {label} completed a refund of {} but the ledger has {} refunds \
                         totalling {}",
                        money(amount),
                        got.refunds.len(),
                        money(got.refunded())
                    ));
                }
            }
            (ORDER_REFUND, OutcomeState::Compensated) if !got.refunds.is_empty() => {
                violations.push(format!(
                    "payment: {label} was compensated but refunded {} (a refund cannot be \
                     undone)",
                    money(got.refunded())
                ));
            }
            _ => {}
        }
    }

    let mut ids: Vec<&String> = sagas.keys().collect();
    ids.sort();
    for saga_id in ids {
        if let Some(v) = finished.unsettled(SERVICE, saga_id, &sagas[saga_id].describe()) {
            violations.push(v);
        }
    }
    Ok(violations)
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use sqlx::AnyPool;

    use super::*;
    use crate::services::testing::{
        Backend, Migration, Op, TestDb, assert_reported, on_both_backends, outcome, run,
    };

    const MIGRATION: Migration = (
        include_str!("../../../migrations/sqlite/0101_payment.sql"),
        include_str!("../../../migrations/postgres/0101_payment.sql"),
    );

    async fn setup(backend: Backend, test: &str) -> Option<TestDb> {
        let db = TestDb::new(backend, test, &[MIGRATION]).await?;
        let mut conn = db.pool.acquire().await.unwrap();
        let accounts = [("u1".to_owned(), 10_000), ("u2".to_owned(), 500)];
        seed(&mut conn, &accounts).await.unwrap();
        seed(&mut conn, &accounts).await.unwrap(); // idempotent
        drop(conn);
        Some(db)
    }

    on_both_backends!(
        charge_then_refund_compensation_is_net_zero_and_idempotent,
        compensation_without_a_charge_does_nothing,
        charge_refuses_what_it_cannot_do_and_leaves_nothing_behind,
        refund_gives_back_at_most_what_the_order_was_charged,
        check_reports_broken_states,
    );

    async fn balance_of(pool: &AnyPool, account: &str) -> i64 {
        let mut conn = pool.acquire().await.unwrap();
        balance(&mut conn, account).await.unwrap().unwrap()
    }

    async fn violations(pool: &AnyPool, outcomes: &[Outcome]) -> Vec<String> {
        let mut conn = pool.acquire().await.unwrap();
        check(&mut conn, outcomes).await.unwrap()
    }

    fn order(order_id: &str, user: &str, amount: &str) -> Value {
        json!({ "order_id": order_id, "user_id": user, "amount": amount, "coupon_id": "c1",
                "points": 10, "campaign_id": "camp" })
    }

    fn charge_params(order_id: &str, account: &str, amount: &str) -> Value {
        json!({ "account": account, "amount": amount, "order_id": order_id })
    }

    fn code(r: Result<Value, StepError>) -> String {
        match r {
            Err(StepError::Business { code, .. }) => code,
            other => panic!("expected a business error, got {other:?}"),
        }
    }

    async fn charge_then_refund_compensation_is_net_zero_and_idempotent(pool: &AnyPool) {
        let p = charge_params("o-1", "u1", "30.50");
        let out = run(pool, Op::Action(&Charge), "s1", "payment", &p)
            .await
            .unwrap();
        assert_eq!(out, json!({ "txn_id": "s1/payment" }));
        assert_eq!(balance_of(pool, "u1").await, 6_950);
        run(pool, Op::Action(&Charge), "s1", "payment", &p)
            .await
            .unwrap();
        assert_eq!(
            balance_of(pool, "u1").await,
            6_950,
            "a replayed charge debits once"
        );

        let back = run(pool, Op::Compensate(&Charge), "s1", "payment", &p)
            .await
            .unwrap();
        assert_eq!(back, json!({ "refunded_cents": 3_050 }));
        run(pool, Op::Compensate(&Charge), "s1", "payment", &p)
            .await
            .unwrap();
        assert_eq!(
            balance_of(pool, "u1").await,
            10_000,
            "a replayed refund credits once"
        );

        let outcomes = [outcome(
            "s1",
            ORDER_PAID,
            OutcomeState::Compensated,
            order("o-1", "u1", "30.50"),
        )];
        assert_eq!(violations(pool, &outcomes).await, Vec::<String>::new());
    }

    async fn compensation_without_a_charge_does_nothing(pool: &AnyPool) {
        let p = charge_params("o-1", "u1", "30.00");
        let back = run(pool, Op::Compensate(&Charge), "s1", "payment", &p)
            .await
            .unwrap();
        assert_eq!(back, json!({ "refunded_cents": 0 }));
        assert_eq!(balance_of(pool, "u1").await, 10_000);
        let outcomes = [outcome(
            "s1",
            ORDER_PAID,
            OutcomeState::Compensated,
            order("o-1", "u1", "30.00"),
        )];
        assert_eq!(violations(pool, &outcomes).await, Vec::<String>::new());
    }

    async fn charge_refuses_what_it_cannot_do_and_leaves_nothing_behind(pool: &AnyPool) {
        let r = run(
            pool,
            Op::Action(&Charge),
            "s1",
            "payment",
            &charge_params("o-1", "u2", "5.01"),
        )
        .await;
        assert_eq!(code(r), "insufficient_funds");
        let r = run(
            pool,
            Op::Action(&Charge),
            "s2",
            "payment",
            &charge_params("o-2", "nobody", "1"),
        )
        .await;
        assert_eq!(code(r), "unknown_account");
        let r = run(
            pool,
            Op::Action(&Charge),
            "s3",
            "payment",
            &charge_params("o-3", "u1", "1.234"),
        )
        .await;
        assert_eq!(code(r), "bad_amount");
        let r = run(
            pool,
            Op::Action(&Charge),
            "s4",
            "payment",
            &json!({ "account": "u1", "order_id": "o-4" }),
        )
        .await;
        assert_eq!(code(r), "bad_params");
        assert_eq!(balance_of(pool, "u2").await, 500);
        // The whole balance can be spent, to the cent.
        run(
            pool,
            Op::Action(&Charge),
            "s5",
            "payment",
            &charge_params("o-5", "u2", "5.00"),
        )
        .await
        .unwrap();
        assert_eq!(balance_of(pool, "u2").await, 0);

        let outcomes = [
            outcome(
                "s1",
                ORDER_PAID,
                OutcomeState::Compensated,
                order("o-1", "u2", "5.01"),
            ),
            outcome(
                "s5",
                ORDER_PAID,
                OutcomeState::Completed,
                order("o-5", "u2", "5.00"),
            ),
        ];
        assert_eq!(violations(pool, &outcomes).await, Vec::<String>::new());
    }

    async fn refund_gives_back_at_most_what_the_order_was_charged(pool: &AnyPool) {
        let p = charge_params("o-1", "u1", "40");
        run(pool, Op::Action(&Charge), "paid", "payment", &p)
            .await
            .unwrap();
        let out = run(pool, Op::Action(&Refund), "r1", "refund", &p)
            .await
            .unwrap();
        assert_eq!(out["refunded_cents"], json!(4_000));
        run(pool, Op::Action(&Refund), "r1", "refund", &p)
            .await
            .unwrap();
        assert_eq!(
            balance_of(pool, "u1").await,
            10_000,
            "a replayed refund credits once"
        );

        let r = run(pool, Op::Action(&Refund), "r2", "refund", &p).await;
        assert_eq!(
            code(r),
            "refund_exceeds_charge",
            "a second refund of the same order"
        );
        let r = run(
            pool,
            Op::Action(&Refund),
            "r3",
            "refund",
            &charge_params("o-9", "u1", "1"),
        )
        .await;
        assert_eq!(code(r), "refund_exceeds_charge", "an order never charged");
        let r = run(
            pool,
            Op::Action(&Refund),
            "r4",
            "refund",
            &charge_params("o-1", "ghost", "1"),
        )
        .await;
        assert_eq!(code(r), "unknown_account");
        assert_eq!(balance_of(pool, "u1").await, 10_000);
        let r = run(pool, Op::Compensate(&Refund), "r1", "refund", &p).await;
        assert_eq!(code(r), "irreversible");

        let outcomes = [
            outcome(
                "paid",
                ORDER_PAID,
                OutcomeState::Completed,
                order("o-1", "u1", "40"),
            ),
            outcome(
                "r1",
                ORDER_REFUND,
                OutcomeState::Completed,
                order("o-1", "u1", "40"),
            ),
            outcome(
                "r2",
                ORDER_REFUND,
                OutcomeState::Compensated,
                order("o-1", "u1", "40"),
            ),
        ];
        assert_eq!(violations(pool, &outcomes).await, Vec::<String>::new());
    }

    async fn check_reports_broken_states(pool: &AnyPool) {
        run(
            pool,
            Op::Action(&Charge),
            "kept",
            "payment",
            &charge_params("o-1", "u1", "10"),
        )
        .await
        .unwrap();
        run(
            pool,
            Op::Action(&Charge),
            "failed",
            "payment",
            &charge_params("o-2", "u1", "20"),
        )
        .await
        .unwrap();
        run(
            pool,
            Op::Action(&Charge),
            "stray",
            "payment",
            &charge_params("o-3", "u1", "1"),
        )
        .await
        .unwrap();
        run(
            pool,
            Op::Action(&Charge),
            "twice",
            "payment",
            &charge_params("o-4", "u1", "2"),
        )
        .await
        .unwrap();
        run(
            pool,
            Op::Action(&Charge),
            "twice",
            "payment-again",
            &charge_params("o-4", "u1", "2"),
        )
        .await
        .unwrap();
        sqlx::query("UPDATE payment_accounts SET balance = balance + 7 WHERE account = 'u2'")
            .execute(pool)
            .await
            .unwrap();

        let outcomes = [
            outcome(
                "kept",
                ORDER_PAID,
                OutcomeState::Compensated,
                order("o-1", "u1", "10"),
            ),
            outcome(
                "failed",
                ORDER_PAID,
                OutcomeState::Failed,
                order("o-2", "u1", "20"),
            ),
            outcome(
                "never",
                ORDER_PAID,
                OutcomeState::Completed,
                order("o-5", "u1", "3"),
            ),
            outcome(
                "twice",
                ORDER_PAID,
                OutcomeState::Completed,
                order("o-4", "u1", "2"),
            ),
        ];
        let v = violations(pool, &outcomes).await;
        assert_reported(
            &v,
            &[
                "saga kept (order o-1)",
                "compensated",
                "not net zero",
                "charged 10.00",
            ],
        );
        assert_reported(
            &v,
            &[
                "saga failed (order o-2)",
                "failed",
                "operator",
                "charged 20.00",
            ],
        );
        assert_reported(
            &v,
            &["saga stray", "not among the finished sagas", "charged 1.00"],
        );
        assert_reported(
            &v,
            &[
                "saga never (order o-5)",
                "completed but was charged 0 times",
            ],
        );
        assert_reported(
            &v,
            &[
                "saga twice (order o-4)",
                "completed but was charged 2 times",
            ],
        );
        assert_reported(&v, &["account `u2` holds 5.07", "say 5.00"]);
        assert_reported(
            &v,
            &["money is not conserved", "= 105.07", "started with 105.00"],
        );
        assert_eq!(v.len(), 7, "{v:#?}");
    }
}

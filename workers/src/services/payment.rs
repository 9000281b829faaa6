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
    Finished, ORDER_PAID, ORDER_REFUND, Outcome, OutcomeState, Ran, irreversible, money,
    nothing_applied, on_postgres, param_cents, report_sqlite,
};
use crate::sdk::{SagaStep, StepContext, StepError, param_str};

const SERVICE: &str = "payment";

/// order-paid's `payment` step: action `charge`, compensation `refund`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Charge;

/// order-refund's `refund` step: action `refund`, compensation none.
#[derive(Debug, Clone, Copy, Default)]
pub struct Refund;

/// One ledger row of a (saga, step), as an operation asks for it.
struct Entry {
    account: String,
    order_id: String,
    amount: i64,
}

async fn balance(conn: &mut AnyConnection, account: &str) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query("SELECT balance FROM payment_accounts WHERE account = $1")
        .bind(account)
        .fetch_optional(&mut *conn)
        .await?
        .map(|r| r.try_get("balance"))
        .transpose()
}

// The PostgreSQL statements: one per operation, shaped as the module docs of `services` say
// (`done`, the guarded effect, the ledger row from its RETURNING, the report).

/// `charge`: debits the account if it holds the amount and this (saga, step) charged nothing
/// yet, and records the charge only if the debit happened (so a refusal writes nothing).
const CHARGE_PG: &str = "WITH done AS (SELECT 1 FROM payment_ledger \
         WHERE saga_id = $1 AND step = $2 AND kind = 'charge'), \
     debit AS (UPDATE payment_accounts SET balance = balance - $5 \
         WHERE account = $3 AND balance >= $5 AND NOT EXISTS (SELECT 1 FROM done) \
         RETURNING account), \
     written AS (INSERT INTO payment_ledger (saga_id, step, kind, account, order_id, amount) \
         SELECT $1, $2, 'charge', $3, $4, $5 FROM debit \
         ON CONFLICT (saga_id, step, kind) DO NOTHING RETURNING 1) \
     SELECT EXISTS (SELECT 1 FROM done) AS replayed, (SELECT count(*) FROM debit) AS applied, \
         (SELECT count(*) FROM written) AS recorded";

/// `charge_reversal`: credits back what this (saga, step)'s `charge` row says, unless it was
/// reversed already; `charged` is NULL when there was no charge (nothing to undo), and an
/// account that is gone credits nothing (`applied` 0).
const CHARGE_REVERSAL_PG: &str = "WITH charge AS (SELECT account, order_id, amount \
         FROM payment_ledger WHERE saga_id = $1 AND step = $2 AND kind = 'charge'), \
     done AS (SELECT amount FROM payment_ledger \
         WHERE saga_id = $1 AND step = $2 AND kind = 'charge_reversal'), \
     credit AS (UPDATE payment_accounts a SET balance = a.balance + c.amount FROM charge c \
         WHERE a.account = c.account AND NOT EXISTS (SELECT 1 FROM done) RETURNING a.account), \
     written AS (INSERT INTO payment_ledger (saga_id, step, kind, account, order_id, amount) \
         SELECT $1, $2, 'charge_reversal', account, order_id, amount FROM charge \
         WHERE EXISTS (SELECT 1 FROM credit) \
         ON CONFLICT (saga_id, step, kind) DO NOTHING RETURNING 1) \
     SELECT (SELECT amount FROM done) AS reversed, (SELECT account FROM charge) AS account, \
         (SELECT amount FROM charge) AS charged, (SELECT count(*) FROM credit) AS applied, \
         (SELECT count(*) FROM written) AS recorded";

/// `refund`: credits the account if the order has that much left to refund to it, and records
/// the refund. What is left is read from the statement's snapshot, so the credit also requires
/// the account row to be the version that snapshot saw (`xmin`): every ledger write of an
/// account updates its row in the same transaction, so a refund, reversal or charge committed
/// after the snapshot (which the sum missed) makes the credit apply to nothing, and the caller
/// locks the row and runs the statement again on a fresh snapshot.
const REFUND_PG: &str = "WITH done AS (SELECT amount FROM payment_ledger \
         WHERE saga_id = $1 AND step = $2 AND kind = 'refund'), \
     account AS (SELECT xmin AS version FROM payment_accounts WHERE account = $3), \
     refundable AS (SELECT coalesce(sum(CASE kind WHEN 'charge' THEN amount ELSE -amount END), \
         0)::bigint AS cents FROM payment_ledger WHERE order_id = $4 AND account = $3), \
     credit AS (UPDATE payment_accounts SET balance = balance + $5 \
         WHERE account = $3 AND xmin = (SELECT version FROM account) \
         AND NOT EXISTS (SELECT 1 FROM done) AND $5 <= (SELECT cents FROM refundable) \
         RETURNING account), \
     written AS (INSERT INTO payment_ledger (saga_id, step, kind, account, order_id, amount) \
         SELECT $1, $2, 'refund', $3, $4, $5 FROM credit \
         ON CONFLICT (saga_id, step, kind) DO NOTHING RETURNING 1) \
     SELECT (SELECT amount FROM done) AS refunded, EXISTS (SELECT 1 FROM account) AS known, \
         (SELECT cents FROM refundable) AS refundable, (SELECT count(*) FROM credit) AS applied, \
         (SELECT count(*) FROM written) AS recorded";

// The SQLite statements: one call per operation, shaped as the module docs of `services` say
// (the guarded effect; the ledger row if it changed a row; the report).

/// `charge`: the debit as [`CHARGE_PG`]'s, the charge recorded only if it happened; the report
/// says whether this (saga, step) has its charge now.
const CHARGE_SQLITE: &str = "UPDATE payment_accounts SET balance = balance - $5 \
         WHERE account = $3 AND balance >= $5 AND NOT EXISTS (SELECT 1 FROM payment_ledger \
             WHERE saga_id = $1 AND step = $2 AND kind = 'charge'); \
     INSERT INTO payment_ledger (saga_id, step, kind, account, order_id, amount) \
         SELECT $1, $2, 'charge', $3, $4, $5 WHERE changes() = 1; \
     SELECT changes() AS applied, EXISTS (SELECT 1 FROM payment_ledger \
         WHERE saga_id = $1 AND step = $2 AND kind = 'charge') AS entry";

/// `charge_reversal`: credits back what this (saga, step)'s `charge` row says, unless it was
/// reversed already, and copies that row as the reversal only if the credit happened. The
/// report: what was reversed (now or before), else the charged account (NULL: nothing was
/// charged; else the account is gone).
const CHARGE_REVERSAL_SQLITE: &str = "UPDATE payment_accounts SET balance = balance + c.amount \
         FROM payment_ledger c WHERE c.saga_id = $1 AND c.step = $2 AND c.kind = 'charge' \
         AND payment_accounts.account = c.account AND NOT EXISTS (SELECT 1 FROM payment_ledger \
             WHERE saga_id = $1 AND step = $2 AND kind = 'charge_reversal'); \
     INSERT INTO payment_ledger (saga_id, step, kind, account, order_id, amount) \
         SELECT saga_id, step, 'charge_reversal', account, order_id, amount FROM payment_ledger \
         WHERE saga_id = $1 AND step = $2 AND kind = 'charge' AND changes() = 1; \
     SELECT (SELECT amount FROM payment_ledger \
             WHERE saga_id = $1 AND step = $2 AND kind = 'charge_reversal') AS reversed, \
         (SELECT account FROM payment_ledger \
             WHERE saga_id = $1 AND step = $2 AND kind = 'charge') AS account";

/// `refund`: credits the account if the order has that much left to refund to it, unless this
/// (saga, step) refunded already, and records the refund only if the credit happened. One
/// writer at a time, so what is left is read under the lock the credit holds. The report says
/// what the message of a refusal needs too, so a refusal takes no second call.
const REFUND_SQLITE: &str = "UPDATE payment_accounts SET balance = balance + $5 \
         WHERE account = $3 AND NOT EXISTS (SELECT 1 FROM payment_ledger \
             WHERE saga_id = $1 AND step = $2 AND kind = 'refund') \
         AND $5 <= (SELECT coalesce(sum(CASE kind WHEN 'charge' THEN amount ELSE -amount END), \
             0) FROM payment_ledger WHERE order_id = $4 AND account = $3); \
     INSERT INTO payment_ledger (saga_id, step, kind, account, order_id, amount) \
         SELECT $1, $2, 'refund', $3, $4, $5 WHERE changes() = 1; \
     SELECT (SELECT amount FROM payment_ledger \
             WHERE saga_id = $1 AND step = $2 AND kind = 'refund') AS refunded, \
         EXISTS (SELECT 1 FROM payment_accounts WHERE account = $3) AS known, \
         (SELECT coalesce(sum(CASE kind WHEN 'charge' THEN amount ELSE -amount END), 0) \
             FROM payment_ledger WHERE order_id = $4 AND account = $3) AS refundable";

/// Debits `charge` once for this (saga, step): `Refused` when the account does not exist or
/// does not hold the amount.
async fn debit_once(
    conn: &mut AnyConnection,
    ctx: &StepContext,
    charge: &Entry,
) -> Result<Ran, sqlx::Error> {
    let postgres = on_postgres(conn);
    let operation = sqlx::query(if postgres { CHARGE_PG } else { CHARGE_SQLITE })
        .bind(&ctx.saga_id)
        .bind(&ctx.step)
        .bind(&charge.account)
        .bind(&charge.order_id)
        .bind(charge.amount);
    if postgres {
        let row = operation.fetch_one(&mut *conn).await?;
        let replay = row.try_get::<bool, _>("replayed")?.then_some(());
        return Ran::read(&row, replay, "payment", ctx, "charge");
    }
    let row = report_sqlite(conn, operation).await?;
    let recorded = (row.try_get::<i64, _>("entry")? == 1).then_some(());
    Ran::sqlite(&row, recorded)
}

/// Why `charge` was refused: the account is unknown, or it holds less than the amount.
async fn charge_refused(
    conn: &mut AnyConnection,
    charge: &Entry,
) -> Result<StepError, sqlx::Error> {
    Ok(match balance(conn, &charge.account).await? {
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
    })
}

/// What undoing this (saga, step)'s charge came to.
enum Reversal {
    /// This many cents were credited back (now, or by an earlier run).
    Credited(i64),
    /// There was no charge: nothing to undo.
    NothingCharged,
    /// The charged account no longer exists.
    AccountGone(String),
}

/// Credits back what this (saga, step) charged, once.
async fn reverse_charge(
    conn: &mut AnyConnection,
    ctx: &StepContext,
) -> Result<Reversal, sqlx::Error> {
    if on_postgres(conn) {
        let row = sqlx::query(CHARGE_REVERSAL_PG)
            .bind(&ctx.saga_id)
            .bind(&ctx.step)
            .fetch_one(&mut *conn)
            .await?;
        if let Some(cents) = row.try_get::<Option<i64>, _>("reversed")? {
            return Ok(Reversal::Credited(cents));
        }
        let (Some(account), Some(charged)) = (
            row.try_get::<Option<String>, _>("account")?,
            row.try_get::<Option<i64>, _>("charged")?,
        ) else {
            return Ok(Reversal::NothingCharged);
        };
        return Ok(
            match Ran::read(&row, None, "payment", ctx, "charge_reversal")? {
                Ran::Applied | Ran::Replay(()) => Reversal::Credited(charged),
                Ran::Refused => Reversal::AccountGone(account),
            },
        );
    }
    let operation = sqlx::query(CHARGE_REVERSAL_SQLITE)
        .bind(&ctx.saga_id)
        .bind(&ctx.step);
    let row = report_sqlite(conn, operation).await?;
    Ok(
        match (
            row.try_get::<Option<i64>, _>("reversed")?,
            row.try_get::<Option<String>, _>("account")?,
        ) {
            (Some(cents), _) => Reversal::Credited(cents),
            (None, None) => Reversal::NothingCharged,
            (None, Some(account)) => Reversal::AccountGone(account),
        },
    )
}

/// What an order-refund's credit came to.
enum Refunded {
    /// This (saga, step) refunded this many cents (now, or by an earlier run).
    Credited(i64),
    UnknownAccount,
    /// The order has only this much left to refund to the account.
    TooMuch {
        refundable: i64,
    },
}

/// Credits `refund` once, if its order has that much charged and not yet given back.
async fn refund_once(
    conn: &mut AnyConnection,
    ctx: &StepContext,
    refund: &Entry,
) -> Result<Refunded, sqlx::Error> {
    if on_postgres(conn) {
        return refund_once_postgres(conn, ctx, refund).await;
    }
    let operation = sqlx::query(REFUND_SQLITE)
        .bind(&ctx.saga_id)
        .bind(&ctx.step)
        .bind(&refund.account)
        .bind(&refund.order_id)
        .bind(refund.amount);
    let row = report_sqlite(conn, operation).await?;
    // Refunded now or before: either way its ledger row is there.
    if let Some(cents) = row.try_get::<Option<i64>, _>("refunded")? {
        return Ok(Refunded::Credited(cents));
    }
    if row.try_get::<i64, _>("known")? == 0 {
        return Ok(Refunded::UnknownAccount);
    }
    let refundable: i64 = row.try_get("refundable")?;
    if refund.amount > refundable {
        return Ok(Refunded::TooMuch { refundable });
    }
    Err(nothing_applied("payment", ctx, "refund"))
}

/// [`REFUND_PG`], and when the account changed under its snapshot (another transaction
/// touched it), once more with the account row locked first: then nothing can change it
/// between the new statement's snapshot and its credit.
async fn refund_once_postgres(
    conn: &mut AnyConnection,
    ctx: &StepContext,
    refund: &Entry,
) -> Result<Refunded, sqlx::Error> {
    for locked in [false, true] {
        if locked {
            sqlx::query("SELECT 1 FROM payment_accounts WHERE account = $1 FOR UPDATE")
                .bind(&refund.account)
                .fetch_optional(&mut *conn)
                .await?;
        }
        let row = sqlx::query(REFUND_PG)
            .bind(&ctx.saga_id)
            .bind(&ctx.step)
            .bind(&refund.account)
            .bind(&refund.order_id)
            .bind(refund.amount)
            .fetch_one(&mut *conn)
            .await?;
        if let Some(cents) = row.try_get::<Option<i64>, _>("refunded")? {
            return Ok(Refunded::Credited(cents));
        }
        if !row.try_get::<bool, _>("known")? {
            return Ok(Refunded::UnknownAccount);
        }
        let refundable: i64 = row.try_get("refundable")?;
        if refund.amount > refundable {
            return Ok(Refunded::TooMuch { refundable });
        }
        if Ran::<()>::read(&row, None, "payment", ctx, "refund")? != Ran::Refused {
            return Ok(Refunded::Credited(refund.amount));
        }
        // Not applied, though nothing refused it: the account changed under the snapshot.
    }
    Err(sqlx::Error::Protocol(format!(
        "payment: account `{}` changed under a refund that holds its lock",
        refund.account
    )))
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
        match debit_once(conn, ctx, &charge).await? {
            Ran::Applied | Ran::Replay(()) => Ok(json!({ "txn_id": txn_id(ctx) })),
            Ran::Refused => Err(charge_refused(conn, &charge).await?),
        }
    }

    /// `refund`: gives back what this (saga, step) charged, or nothing if it charged nothing.
    async fn compensate(
        &self,
        conn: &mut AnyConnection,
        ctx: &StepContext,
        _params: &Value,
    ) -> Result<Value, StepError> {
        match reverse_charge(conn, ctx).await? {
            Reversal::Credited(cents) => Ok(json!({ "refunded_cents": cents })),
            Reversal::NothingCharged => Ok(json!({ "refunded_cents": 0 })),
            // The account was deleted after the charge: only an operator can decide where the
            // money goes.
            Reversal::AccountGone(account) => Err(unknown_account(&account)),
        }
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
        match refund_once(conn, ctx, &refund).await? {
            Refunded::Credited(cents) => {
                Ok(json!({ "refund_id": txn_id(ctx), "refunded_cents": cents }))
            }
            Refunded::UnknownAccount => Err(unknown_account(&refund.account)),
            Refunded::TooMuch { refundable } => Err(StepError::business(
                "refund_exceeds_charge",
                format!(
                    "order {} has {} left to refund to `{}`, asked for {}",
                    refund.order_id,
                    money(refundable),
                    refund.account,
                    money(refund.amount)
                ),
            )),
        }
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
        Backend, Migration, Op, TestDb, assert_reported, kinds, on_both_backends, outcome, refusal,
        run,
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
        a_charge_and_its_reversal_apply_once_and_a_refused_charge_writes_nothing,
        a_refund_applies_once_and_a_refused_refund_writes_nothing,
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

    /// Every path of `charge` and its compensation: a first run, a replay (the same answer, one
    /// debit), a refusal (no ledger row, no debit), the undo, its replay, and the undo of a
    /// charge that never happened (or was refused).
    async fn a_charge_and_its_reversal_apply_once_and_a_refused_charge_writes_nothing(
        pool: &AnyPool,
    ) {
        let p = charge_params("o-1", "u1", "30.50");
        let first = run(pool, Op::Action(&Charge), "s1", "payment", &p).await;
        let again = run(pool, Op::Action(&Charge), "s1", "payment", &p).await;
        assert_eq!(first, Ok(json!({ "txn_id": "s1/payment" })));
        assert_eq!(again, first, "a replay answers as the first run did");
        assert_eq!(balance_of(pool, "u1").await, 6_950, "and debits once");
        assert_eq!(kinds(pool, "payment_ledger", "s1").await, ["charge"]);

        let r = run(
            pool,
            Op::Action(&Charge),
            "s2",
            "payment",
            &charge_params("o-2", "u2", "5.01"),
        )
        .await;
        assert_eq!(
            refusal(r),
            (
                "insufficient_funds".to_owned(),
                "account `u2` has 5.00 but order o-2 needs 5.01".to_owned()
            )
        );
        let r = run(
            pool,
            Op::Action(&Charge),
            "s3",
            "payment",
            &charge_params("o-3", "ghost", "1"),
        )
        .await;
        assert_eq!(
            refusal(r),
            (
                "unknown_account".to_owned(),
                "there is no account `ghost`".to_owned()
            )
        );
        for saga in ["s2", "s3"] {
            assert!(
                kinds(pool, "payment_ledger", saga).await.is_empty(),
                "{saga}"
            );
        }
        assert_eq!(balance_of(pool, "u2").await, 500);

        let undo = run(pool, Op::Compensate(&Charge), "s1", "payment", &p).await;
        let again = run(pool, Op::Compensate(&Charge), "s1", "payment", &p).await;
        assert_eq!(undo, Ok(json!({ "refunded_cents": 3_050 })));
        assert_eq!(again, undo);
        assert_eq!(balance_of(pool, "u1").await, 10_000, "credited once");
        assert_eq!(
            kinds(pool, "payment_ledger", "s1").await,
            ["charge", "charge_reversal"]
        );

        // Nothing charged (never run, or refused): nothing to give back, now or on a replay.
        for saga in ["s2", "never", "never"] {
            let undo = run(pool, Op::Compensate(&Charge), saga, "payment", &p).await;
            assert_eq!(undo, Ok(json!({ "refunded_cents": 0 })), "{saga}");
            assert!(
                kinds(pool, "payment_ledger", saga).await.is_empty(),
                "{saga}"
            );
        }
        assert_eq!(balance_of(pool, "u2").await, 500);

        // The charged account is gone: the undo is refused, and writes nothing.
        let p = charge_params("o-4", "u2", "1");
        run(pool, Op::Action(&Charge), "s4", "payment", &p)
            .await
            .unwrap();
        sqlx::query("DELETE FROM payment_accounts WHERE account = 'u2'")
            .execute(pool)
            .await
            .unwrap();
        let r = run(pool, Op::Compensate(&Charge), "s4", "payment", &p).await;
        assert_eq!(refusal(r).0, "unknown_account");
        assert_eq!(kinds(pool, "payment_ledger", "s4").await, ["charge"]);
    }

    /// Every path of an order-refund's `refund`: a first run, a replay (the same answer, one
    /// credit), refusals (no ledger row, no credit); it has no compensation.
    async fn a_refund_applies_once_and_a_refused_refund_writes_nothing(pool: &AnyPool) {
        run(
            pool,
            Op::Action(&Charge),
            "paid",
            "payment",
            &charge_params("o-1", "u1", "40"),
        )
        .await
        .unwrap();
        let p = charge_params("o-1", "u1", "15");
        let first = run(pool, Op::Action(&Refund), "r1", "refund", &p).await;
        assert_eq!(
            first,
            Ok(json!({ "refund_id": "r1/refund", "refunded_cents": 1_500 }))
        );
        // A replay answers what was recorded, whatever it is asked.
        let other = charge_params("o-1", "u1", "16");
        assert_eq!(
            run(pool, Op::Action(&Refund), "r1", "refund", &other).await,
            first
        );
        assert_eq!(balance_of(pool, "u1").await, 7_500, "credited once");
        assert_eq!(kinds(pool, "payment_ledger", "r1").await, ["refund"]);

        let r = run(
            pool,
            Op::Action(&Refund),
            "r2",
            "refund",
            &charge_params("o-1", "u1", "25.01"),
        )
        .await;
        assert_eq!(
            refusal(r),
            (
                "refund_exceeds_charge".to_owned(),
                "order o-1 has 25.00 left to refund to `u1`, asked for 25.01".to_owned()
            )
        );
        let r = run(
            pool,
            Op::Action(&Refund),
            "r3",
            "refund",
            &charge_params("o-1", "ghost", "1"),
        )
        .await;
        assert_eq!(refusal(r).0, "unknown_account");
        for saga in ["r2", "r3"] {
            assert!(
                kinds(pool, "payment_ledger", saga).await.is_empty(),
                "{saga}"
            );
        }
        assert_eq!(balance_of(pool, "u1").await, 7_500);
        // What is left can be refunded, to the cent.
        run(
            pool,
            Op::Action(&Refund),
            "r4",
            "refund",
            &charge_params("o-1", "u1", "25"),
        )
        .await
        .unwrap();
        assert_eq!(balance_of(pool, "u1").await, 10_000);
        let r = run(pool, Op::Compensate(&Refund), "r4", "refund", &p).await;
        assert_eq!(refusal(r).0, "irreversible");
    }
}

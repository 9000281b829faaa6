//! The GMV service: gross merchandise value per campaign, in cents.
//!
//! * [`Add`] — order-paid's `gmv` step: `add` counts the order's amount towards its campaign, its
//!   compensation `subtract` takes back exactly what the ledger says this (saga, step) added.
//! * [`Subtract`] — order-refund's `gmv` step: `subtract` takes a refunded order's amount out, its
//!   compensation `add` puts back exactly what it took.
//!
//! Ledger kinds: `add`, `add_reversal`, `subtract`, `subtract_reversal`, with signed deltas, so a
//! campaign's GMV is always the sum of its ledger. GMV is a statistic: nothing here refuses a
//! refund because of it (it may go below zero if an order is refunded that was never counted, and
//! `check` reports that).

use std::collections::{BTreeMap, HashMap};

use async_trait::async_trait;
use serde_json::{Value, json};
use sqlx::{AnyConnection, Row};

use super::{
    Finished, ORDER_PAID, ORDER_REFUND, Outcome, OutcomeState, Ran, Reversal, money,
    nothing_applied, on_postgres, param_cents, report_sqlite,
};
use crate::sdk::{SagaStep, StepContext, StepError, param_str};

const SERVICE: &str = "gmv";

/// order-paid's `gmv` step: action `add`, compensation `subtract`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Add;

/// order-refund's `gmv` step: action `subtract`, compensation `add`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Subtract;

struct Entry {
    campaign_id: String,
    delta: i64,
}

// The PostgreSQL statements: one per operation, shaped as the module docs of `services` say
// (`done`, the effect, the ledger row from its RETURNING, the report). Nothing refuses a GMV
// change, so their effects are upserts that apply unless it is a replay.

/// `add` / `subtract` (`$3`): adds the delta to the campaign (creating it at 0 first) unless
/// this (saga, step) recorded its `$3` already, and records it; a replay reports the recorded
/// delta.
const ONCE_PG: &str = "WITH done AS (SELECT delta FROM gmv_ledger \
         WHERE saga_id = $1 AND step = $2 AND kind = $3), \
     added AS (INSERT INTO campaign_gmv (campaign_id, gmv) \
         SELECT $4, $5 WHERE NOT EXISTS (SELECT 1 FROM done) \
         ON CONFLICT (campaign_id) DO UPDATE SET gmv = campaign_gmv.gmv + excluded.gmv \
         RETURNING 1), \
     written AS (INSERT INTO gmv_ledger (saga_id, step, kind, campaign_id, delta) \
         SELECT $1, $2, $3, $4, $5 FROM added \
         ON CONFLICT (saga_id, step, kind) DO NOTHING RETURNING 1) \
     SELECT (SELECT delta FROM done) AS replayed, (SELECT count(*) FROM added) AS applied, \
         (SELECT count(*) FROM written) AS recorded";

/// Undoes this (saga, step)'s `$3` entry as a `$4` entry: adds its negated delta to its
/// campaign (creating it at 0 first) unless it was undone already. `original` is NULL when
/// there is nothing to undo.
const REVERSE_PG: &str = "WITH original AS (SELECT campaign_id, delta FROM gmv_ledger \
         WHERE saga_id = $1 AND step = $2 AND kind = $3), \
     done AS (SELECT delta FROM gmv_ledger WHERE saga_id = $1 AND step = $2 AND kind = $4), \
     added AS (INSERT INTO campaign_gmv (campaign_id, gmv) \
         SELECT campaign_id, -delta FROM original WHERE NOT EXISTS (SELECT 1 FROM done) \
         ON CONFLICT (campaign_id) DO UPDATE SET gmv = campaign_gmv.gmv + excluded.gmv \
         RETURNING 1), \
     written AS (INSERT INTO gmv_ledger (saga_id, step, kind, campaign_id, delta) \
         SELECT $1, $2, $4, campaign_id, -delta FROM original WHERE EXISTS (SELECT 1 FROM added) \
         ON CONFLICT (saga_id, step, kind) DO NOTHING RETURNING 1) \
     SELECT (SELECT delta FROM done) AS replayed, (SELECT delta FROM original) AS original, \
         (SELECT count(*) FROM added) AS applied, (SELECT count(*) FROM written) AS recorded";

// The SQLite statements: one call per operation, shaped as the module docs of `services` say
// (the effect; the ledger row if it ran; the report of the ledger row).

/// `add` / `subtract` (`$3`): the upsert [`ONCE_PG`] makes, recorded only if it ran (it always
/// changes a row when it runs).
const ONCE_SQLITE: &str = "INSERT INTO campaign_gmv (campaign_id, gmv) \
         SELECT $4, $5 WHERE NOT EXISTS (SELECT 1 FROM gmv_ledger \
             WHERE saga_id = $1 AND step = $2 AND kind = $3) \
         ON CONFLICT (campaign_id) DO UPDATE SET gmv = campaign_gmv.gmv + excluded.gmv; \
     INSERT INTO gmv_ledger (saga_id, step, kind, campaign_id, delta) \
         SELECT $1, $2, $3, $4, $5 WHERE changes() = 1; \
     SELECT changes() AS applied, (SELECT delta FROM gmv_ledger \
         WHERE saga_id = $1 AND step = $2 AND kind = $3) AS entry";

/// Undoes this (saga, step)'s `$3` entry as a `$4` entry: adds its negated delta to its
/// campaign (creating it at 0 first) unless it was undone already, and copies the entry
/// negated only if that ran. The report: the `$4` entry's delta (now or before), NULL when
/// there was nothing to undo.
const REVERSE_SQLITE: &str = "INSERT INTO campaign_gmv (campaign_id, gmv) \
         SELECT campaign_id, -delta FROM gmv_ledger \
         WHERE saga_id = $1 AND step = $2 AND kind = $3 AND NOT EXISTS (SELECT 1 \
             FROM gmv_ledger WHERE saga_id = $1 AND step = $2 AND kind = $4) \
         ON CONFLICT (campaign_id) DO UPDATE SET gmv = campaign_gmv.gmv + excluded.gmv; \
     INSERT INTO gmv_ledger (saga_id, step, kind, campaign_id, delta) \
         SELECT saga_id, step, $4, campaign_id, -delta FROM gmv_ledger \
         WHERE saga_id = $1 AND step = $2 AND kind = $3 AND changes() = 1; \
     SELECT (SELECT delta FROM gmv_ledger \
         WHERE saga_id = $1 AND step = $2 AND kind = $4) AS reversal";

/// Applies this (saga, step)'s `kind` entry once: a replay returns the recorded delta.
async fn once(
    conn: &mut AnyConnection,
    ctx: &StepContext,
    kind: &str,
    params: &Value,
    sign: i64,
) -> Result<Value, StepError> {
    let wanted = Entry {
        campaign_id: param_str(params, "campaign_id")?.to_owned(),
        delta: sign * param_cents(params, "amount")?,
    };
    let postgres = on_postgres(conn);
    let operation = sqlx::query(if postgres { ONCE_PG } else { ONCE_SQLITE })
        .bind(&ctx.saga_id)
        .bind(&ctx.step)
        .bind(kind)
        .bind(&wanted.campaign_id)
        .bind(wanted.delta);
    let ran = if postgres {
        let row = operation.fetch_one(&mut *conn).await?;
        Ran::<i64>::read(&row, row.try_get("replayed")?, "gmv", ctx, kind)?
    } else {
        let row = report_sqlite(conn, operation).await?;
        Ran::sqlite(&row, row.try_get("entry")?)?
    };
    match ran {
        Ran::Applied => Ok(json!({ "delta_cents": wanted.delta })),
        Ran::Replay(delta) => Ok(json!({ "delta_cents": delta })),
        Ran::Refused => Err(nothing_applied("gmv", ctx, kind).into()),
    }
}

/// Undoes this (saga, step)'s `kind` entry, once; nothing if it never happened.
const REVERSAL: Reversal = Reversal {
    ledger: "gmv",
    postgres: REVERSE_PG,
    sqlite: REVERSE_SQLITE,
};

#[async_trait]
impl SagaStep for Add {
    /// `add {campaign_id, amount}` → `{"delta_cents"}`.
    async fn action(
        &self,
        conn: &mut AnyConnection,
        ctx: &StepContext,
        params: &Value,
    ) -> Result<Value, StepError> {
        once(conn, ctx, "add", params, 1).await
    }

    /// `subtract`: takes back what this (saga, step) added.
    async fn compensate(
        &self,
        conn: &mut AnyConnection,
        ctx: &StepContext,
        _params: &Value,
    ) -> Result<Value, StepError> {
        Ok(json!({ "delta_cents": REVERSAL.undo(conn, ctx, "add", "add_reversal").await? }))
    }
}

#[async_trait]
impl SagaStep for Subtract {
    /// `subtract {campaign_id, amount}` → `{"delta_cents"}`.
    async fn action(
        &self,
        conn: &mut AnyConnection,
        ctx: &StepContext,
        params: &Value,
    ) -> Result<Value, StepError> {
        once(conn, ctx, "subtract", params, -1).await
    }

    /// `add`: puts back what this (saga, step) subtracted.
    async fn compensate(
        &self,
        conn: &mut AnyConnection,
        ctx: &StepContext,
        _params: &Value,
    ) -> Result<Value, StepError> {
        Ok(
            json!({ "delta_cents": REVERSAL.undo(conn, ctx, "subtract", "subtract_reversal").await? }),
        )
    }
}

/// Creates the campaigns that do not exist yet, at zero GMV (a campaign's GMV is only ever what
/// its ledger says, so there is no initial value to seed).
pub async fn seed(conn: &mut AnyConnection, campaigns: &[String]) -> Result<(), sqlx::Error> {
    for campaign_id in campaigns {
        sqlx::query(
            "INSERT INTO campaign_gmv (campaign_id, gmv) VALUES ($1, 0) \
             ON CONFLICT (campaign_id) DO NOTHING",
        )
        .bind(campaign_id)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

#[derive(Default)]
struct SagaGmv {
    net: i64,
    kinds: BTreeMap<String, usize>,
}

impl SagaGmv {
    fn count(&self, kind: &str) -> usize {
        self.kinds.get(kind).copied().unwrap_or(0)
    }

    fn describe(&self) -> String {
        let kinds: Vec<String> = self.kinds.iter().map(|(k, n)| format!("{n} {k}")).collect();
        format!(
            "a net GMV change of {} ({})",
            money(self.net),
            kinds.join(", ")
        )
    }
}

/// Per campaign: the stored GMV, its ledger's sum, and what the finished sagas say it should be.
#[derive(Default)]
struct CampaignGmv {
    stored: Option<i64>,
    ledger: i64,
    expected: i64,
}

/// The GMV invariants: every campaign's GMV is the sum of its ledger and equals its completed
/// orders minus its completed refunds (and so does the total), each completed saga moved its
/// amount once and kept it, each compensated one is net zero, and no saga that did not finish
/// cleanly left GMV moved.
pub async fn check(
    conn: &mut AnyConnection,
    outcomes: &[Outcome],
) -> Result<Vec<String>, sqlx::Error> {
    let mut violations = Vec::new();
    let finished = Finished::new(outcomes);

    let mut campaigns: BTreeMap<String, CampaignGmv> = BTreeMap::new();
    for row in sqlx::query("SELECT campaign_id, gmv FROM campaign_gmv")
        .fetch_all(&mut *conn)
        .await?
    {
        campaigns
            .entry(row.try_get("campaign_id")?)
            .or_default()
            .stored = Some(row.try_get("gmv")?);
    }
    let mut sagas: HashMap<String, SagaGmv> = HashMap::new();
    for row in sqlx::query("SELECT saga_id, kind, campaign_id, delta FROM gmv_ledger")
        .fetch_all(&mut *conn)
        .await?
    {
        let delta: i64 = row.try_get("delta")?;
        campaigns
            .entry(row.try_get("campaign_id")?)
            .or_default()
            .ledger += delta;
        let saga = sagas.entry(row.try_get("saga_id")?).or_default();
        saga.net += delta;
        *saga.kinds.entry(row.try_get("kind")?).or_default() += 1;
    }

    let mut expected_total = 0i64;
    for o in outcomes {
        let none = SagaGmv::default();
        let got = sagas.get(&o.saga_id).unwrap_or(&none);
        let label = o.label();
        let (kind, sign) = match o.saga.as_str() {
            ORDER_PAID => ("add", 1),
            ORDER_REFUND => ("subtract", -1),
            _ => continue,
        };
        match o.state {
            OutcomeState::Completed => {
                let wanted = o
                    .require_cents(SERVICE, "amount")
                    .and_then(|a| Ok((o.require_str(SERVICE, "campaign_id")?, sign * a)));
                let (campaign, delta) = match wanted {
                    Ok(w) => w,
                    Err(v) => {
                        violations.push(v);
                        continue;
                    }
                };
                expected_total += delta;
                campaigns.entry(campaign.to_owned()).or_default().expected += delta;
                if got.count(kind) != 1 || got.net != delta {
                    violations.push(format!(
                        "gmv: {label} completed and should have moved {} once, but its ledger \
                         has {}",
                        money(delta),
                        got.describe()
                    ));
                }
            }
            OutcomeState::Compensated => {
                if got.net != 0 {
                    violations.push(format!(
                        "gmv: {label} was compensated but is not net zero: {}",
                        got.describe()
                    ));
                }
            }
            OutcomeState::Failed => {}
        }
    }

    let mut total = 0i64;
    for (campaign, c) in &campaigns {
        let stored = c.stored.unwrap_or(0);
        total += stored;
        if c.stored.is_none() {
            violations.push(format!(
                "gmv: campaign `{campaign}` does not exist but its ledger says {}",
                money(c.ledger)
            ));
        } else if stored != c.ledger {
            violations.push(format!(
                "gmv: campaign `{campaign}` has a GMV of {} but its ledger sums to {}",
                money(stored),
                money(c.ledger)
            ));
        }
        if stored != c.expected {
            violations.push(format!(
                "gmv: campaign `{campaign}` has a GMV of {} but its completed orders minus \
                 refunds come to {}",
                money(stored),
                money(c.expected)
            ));
        }
    }
    if total != expected_total {
        violations.push(format!(
            "gmv: the total GMV is {} but completed orders minus completed refunds come to {}",
            money(total),
            money(expected_total)
        ));
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
        Backend, Migration, Op, TestDb, assert_reported, kinds, on_both_backends, outcome, run,
    };

    const MIGRATION: Migration = (
        include_str!("../../../migrations/sqlite/0104_gmv.sql"),
        include_str!("../../../migrations/postgres/0104_gmv.sql"),
    );

    async fn setup(backend: Backend, test: &str) -> Option<TestDb> {
        let db = TestDb::new(backend, test, &[MIGRATION]).await?;
        let mut conn = db.pool.acquire().await.unwrap();
        seed(&mut conn, &["spring".to_owned()]).await.unwrap();
        seed(&mut conn, &["spring".to_owned()]).await.unwrap();
        drop(conn);
        Some(db)
    }

    on_both_backends!(
        add_subtract_and_their_compensations_move_gmv_exactly_once,
        check_reports_broken_states,
        add_subtract_and_their_undos_apply_once,
    );

    async fn gmv_of(pool: &AnyPool, campaign: &str) -> Option<i64> {
        sqlx::query("SELECT gmv FROM campaign_gmv WHERE campaign_id = $1")
            .bind(campaign)
            .fetch_optional(pool)
            .await
            .unwrap()
            .map(|r| r.try_get("gmv").unwrap())
    }

    async fn violations(pool: &AnyPool, outcomes: &[Outcome]) -> Vec<String> {
        let mut conn = pool.acquire().await.unwrap();
        check(&mut conn, outcomes).await.unwrap()
    }

    fn params(campaign: &str, amount: &str) -> Value {
        json!({ "campaign_id": campaign, "amount": amount, "payment_txn": "s/payment" })
    }

    fn input(order_id: &str, campaign: &str, amount: &str) -> Value {
        json!({ "order_id": order_id, "user_id": "u1", "amount": amount, "campaign_id": campaign })
    }

    async fn add_subtract_and_their_compensations_move_gmv_exactly_once(pool: &AnyPool) {
        let p = params("spring", "129.90");
        run(pool, Op::Action(&Add), "paid", "gmv", &p)
            .await
            .unwrap();
        run(pool, Op::Action(&Add), "paid", "gmv", &p)
            .await
            .unwrap();
        assert_eq!(
            gmv_of(pool, "spring").await,
            Some(12_990),
            "a replayed add counts once"
        );
        run(
            pool,
            Op::Action(&Add),
            "undone",
            "gmv",
            &params("autumn", "10"),
        )
        .await
        .unwrap();
        assert_eq!(
            gmv_of(pool, "autumn").await,
            Some(1_000),
            "created on demand"
        );
        let back = run(pool, Op::Compensate(&Add), "undone", "gmv", &p)
            .await
            .unwrap();
        assert_eq!(back, json!({ "delta_cents": -1_000 }));
        run(pool, Op::Compensate(&Add), "undone", "gmv", &p)
            .await
            .unwrap();
        assert_eq!(gmv_of(pool, "autumn").await, Some(0));
        let none = run(pool, Op::Compensate(&Add), "never", "gmv", &p)
            .await
            .unwrap();
        assert_eq!(none, json!({ "delta_cents": 0 }));

        run(pool, Op::Action(&Subtract), "refund-undone", "gmv", &p)
            .await
            .unwrap();
        assert_eq!(gmv_of(pool, "spring").await, Some(0));
        run(pool, Op::Compensate(&Subtract), "refund-undone", "gmv", &p)
            .await
            .unwrap();
        assert_eq!(gmv_of(pool, "spring").await, Some(12_990));
        run(
            pool,
            Op::Action(&Subtract),
            "refund",
            "gmv",
            &params("spring", "100"),
        )
        .await
        .unwrap();

        let r = run(
            pool,
            Op::Action(&Add),
            "bad",
            "gmv",
            &params("spring", "-1"),
        )
        .await;
        assert!(matches!(&r, Err(StepError::Business { code, .. }) if code == "bad_amount"));
        let r = run(
            pool,
            Op::Action(&Add),
            "bad",
            "gmv",
            &json!({ "amount": "1" }),
        )
        .await;
        assert!(matches!(&r, Err(StepError::Business { code, .. }) if code == "bad_params"));

        let outcomes = [
            outcome(
                "paid",
                ORDER_PAID,
                OutcomeState::Completed,
                input("o-1", "spring", "129.90"),
            ),
            outcome(
                "undone",
                ORDER_PAID,
                OutcomeState::Compensated,
                input("o-2", "autumn", "10"),
            ),
            outcome(
                "never",
                ORDER_PAID,
                OutcomeState::Compensated,
                input("o-3", "spring", "1"),
            ),
            outcome(
                "refund-undone",
                ORDER_REFUND,
                OutcomeState::Compensated,
                input("o-1", "spring", "129.90"),
            ),
            outcome(
                "refund",
                ORDER_REFUND,
                OutcomeState::Completed,
                input("o-4", "spring", "100"),
            ),
        ];
        assert_eq!(violations(pool, &outcomes).await, Vec::<String>::new());
        assert_eq!(gmv_of(pool, "spring").await, Some(2_990));
    }

    async fn check_reports_broken_states(pool: &AnyPool) {
        run(
            pool,
            Op::Action(&Add),
            "paid",
            "gmv",
            &params("spring", "20"),
        )
        .await
        .unwrap();
        run(
            pool,
            Op::Action(&Add),
            "kept",
            "gmv",
            &params("spring", "3"),
        )
        .await
        .unwrap();
        run(
            pool,
            Op::Action(&Add),
            "stray",
            "gmv",
            &params("summer", "4"),
        )
        .await
        .unwrap();
        sqlx::query("UPDATE campaign_gmv SET gmv = gmv + 100 WHERE campaign_id = 'summer'")
            .execute(pool)
            .await
            .unwrap();

        let outcomes = [
            outcome(
                "paid",
                ORDER_PAID,
                OutcomeState::Completed,
                input("o-1", "spring", "25"),
            ),
            outcome(
                "kept",
                ORDER_PAID,
                OutcomeState::Compensated,
                input("o-2", "spring", "3"),
            ),
        ];
        let v = violations(pool, &outcomes).await;
        assert_reported(
            &v,
            &[
                "saga paid (order o-1)",
                "should have moved 25.00 once",
                "20.00",
            ],
        );
        assert_reported(&v, &["saga kept (order o-2)", "compensated", "3.00"]);
        assert_reported(&v, &["saga stray", "not among the finished sagas", "4.00"]);
        assert_reported(
            &v,
            &["campaign `summer` has a GMV of 5.00", "ledger sums to 4.00"],
        );
        assert_reported(&v, &["campaign `summer` has a GMV of 5.00", "come to 0.00"]);
        assert_reported(
            &v,
            &["campaign `spring` has a GMV of 23.00", "come to 25.00"],
        );
        assert_reported(&v, &["total GMV is 28.00", "come to 25.00"]);
        assert_eq!(v.len(), 7, "{v:#?}");
    }

    /// Every path of `add`, `subtract` and their compensations: first runs, replays (the same
    /// answer, one change), undos, their replays, and undos of nothing. Nothing refuses a GMV
    /// change.
    async fn add_subtract_and_their_undos_apply_once(pool: &AnyPool) {
        let p = params("spring", "10");
        for (action, undo, saga, kind, delta) in [
            (Op::Action(&Add), Op::Compensate(&Add), "a1", "add", 1_000),
            (
                Op::Action(&Subtract),
                Op::Compensate(&Subtract),
                "s1",
                "subtract",
                -1_000,
            ),
        ] {
            let first = run(pool, action, saga, "gmv", &p).await;
            assert_eq!(first, Ok(json!({ "delta_cents": delta })));
            // A replay answers what was recorded, whatever it is asked.
            let other = params("spring", "99");
            assert_eq!(run(pool, action, saga, "gmv", &other).await, first);
            assert_eq!(gmv_of(pool, "spring").await, Some(delta), "{kind} once");
            assert_eq!(kinds(pool, "gmv_ledger", saga).await, [kind]);
            for _ in 0..2 {
                let back = run(pool, undo, saga, "gmv", &Value::Null).await;
                assert_eq!(back, Ok(json!({ "delta_cents": -delta })));
            }
            assert_eq!(gmv_of(pool, "spring").await, Some(0), "{kind} undone once");
            assert_eq!(
                kinds(pool, "gmv_ledger", saga).await,
                [kind.to_owned(), format!("{kind}_reversal")]
            );
            for _ in 0..2 {
                let none = run(pool, undo, "never", "gmv", &Value::Null).await;
                assert_eq!(none, Ok(json!({ "delta_cents": 0 })));
            }
            assert!(kinds(pool, "gmv_ledger", "never").await.is_empty());
        }
    }
}

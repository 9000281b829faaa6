//! The points service: loyalty points per user.
//!
//! * [`Grant`] — order-paid's `points` step: `grant` adds points, its compensation `revoke` takes
//!   back exactly what the ledger says this (saga, step) granted.
//! * [`Revoke`] — order-refund's `points` step: `revoke` takes points back (refused with
//!   `insufficient_points` if the user no longer has them), its compensation `grant` returns
//!   exactly what it took.
//!
//! Ledger kinds: `grant`, `grant_reversal`, `revoke`, `revoke_reversal`, with signed deltas, so a
//! balance is always `initial + sum(delta)`. Compensations never fail on a low balance (a
//! compensation must succeed), which is the only way a balance can go negative.

use std::collections::{BTreeMap, HashMap};

use async_trait::async_trait;
use serde_json::{Value, json};
use sqlx::{AnyConnection, Row};

use super::{
    Finished, ORDER_PAID, ORDER_REFUND, Outcome, OutcomeState, Ran, Reversal, nothing_applied,
    on_postgres, param_count, report_sqlite,
};
use crate::sdk::{SagaStep, StepContext, StepError, param_str};

const SERVICE: &str = "points";

/// order-paid's `points` step: action `grant`, compensation `revoke`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Grant;

/// order-refund's `points` step: action `revoke`, compensation `grant`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Revoke;

struct Entry {
    user_id: String,
    delta: i64,
    reason: Option<String>,
}

// The PostgreSQL statements: one per operation, shaped as the module docs of `services` say
// (`done`, the guarded effect, the ledger row from its RETURNING, the report).

/// `grant`: adds the points (creating the balance at 0 first) unless this (saga, step) granted
/// already, and records the grant; a replay reports the recorded delta.
const GRANT_PG: &str = "WITH done AS (SELECT delta FROM points_ledger \
         WHERE saga_id = $1 AND step = $2 AND kind = 'grant'), \
     added AS (INSERT INTO points_balances (user_id, points, initial) \
         SELECT $3, $4, 0 WHERE NOT EXISTS (SELECT 1 FROM done) \
         ON CONFLICT (user_id) DO UPDATE SET points = points_balances.points + excluded.points \
         RETURNING 1), \
     written AS (INSERT INTO points_ledger (saga_id, step, kind, user_id, delta, reason) \
         SELECT $1, $2, 'grant', $3, $4, $5 FROM added \
         ON CONFLICT (saga_id, step, kind) DO NOTHING RETURNING 1) \
     SELECT (SELECT delta FROM done) AS replayed, (SELECT count(*) FROM added) AS applied, \
         (SELECT count(*) FROM written) AS recorded";

/// `revoke`: takes the points ($4 is negative) if the user has them, unless this (saga, step)
/// revoked already, and records the revoke only if they were taken. Zero points are taken from
/// anyone, even a user without a balance (`applied`), as on SQLite.
const REVOKE_PG: &str = "WITH done AS (SELECT delta FROM points_ledger \
         WHERE saga_id = $1 AND step = $2 AND kind = 'revoke'), \
     taken AS (UPDATE points_balances SET points = points + $4 \
         WHERE user_id = $3 AND points + $4 >= 0 AND NOT EXISTS (SELECT 1 FROM done) \
         RETURNING 1), \
     applied AS (SELECT 1 FROM taken \
         UNION SELECT 1 WHERE $4 = 0 AND NOT EXISTS (SELECT 1 FROM done)), \
     written AS (INSERT INTO points_ledger (saga_id, step, kind, user_id, delta, reason) \
         SELECT $1, $2, 'revoke', $3, $4, $5 FROM applied \
         ON CONFLICT (saga_id, step, kind) DO NOTHING RETURNING 1) \
     SELECT (SELECT delta FROM done) AS replayed, (SELECT count(*) FROM applied) AS applied, \
         (SELECT count(*) FROM written) AS recorded";

/// Undoes this (saga, step)'s `$3` entry as a `$4` entry: adds its negated delta to its user
/// (creating the balance at 0 first) unless it was undone already. `original` is NULL when
/// there is nothing to undo.
const REVERSE_PG: &str = "WITH original AS (SELECT user_id, delta, reason FROM points_ledger \
         WHERE saga_id = $1 AND step = $2 AND kind = $3), \
     done AS (SELECT delta FROM points_ledger WHERE saga_id = $1 AND step = $2 AND kind = $4), \
     added AS (INSERT INTO points_balances (user_id, points, initial) \
         SELECT user_id, -delta, 0 FROM original WHERE NOT EXISTS (SELECT 1 FROM done) \
         ON CONFLICT (user_id) DO UPDATE SET points = points_balances.points + excluded.points \
         RETURNING 1), \
     written AS (INSERT INTO points_ledger (saga_id, step, kind, user_id, delta, reason) \
         SELECT $1, $2, $4, user_id, -delta, reason FROM original \
         WHERE EXISTS (SELECT 1 FROM added) \
         ON CONFLICT (saga_id, step, kind) DO NOTHING RETURNING 1) \
     SELECT (SELECT delta FROM done) AS replayed, (SELECT delta FROM original) AS original, \
         (SELECT count(*) FROM added) AS applied, (SELECT count(*) FROM written) AS recorded";

// The SQLite statements: one call per operation, shaped as the module docs of `services` say
// (the guarded effect; the ledger row if it changed a row; the report of the ledger row).

/// `grant`: the upsert [`GRANT_PG`] makes, recorded only if it ran (it always changes a row
/// when it runs).
const GRANT_SQLITE: &str = "INSERT INTO points_balances (user_id, points, initial) \
         SELECT $3, $4, 0 WHERE NOT EXISTS (SELECT 1 FROM points_ledger \
             WHERE saga_id = $1 AND step = $2 AND kind = 'grant') \
         ON CONFLICT (user_id) DO UPDATE SET points = points_balances.points + excluded.points; \
     INSERT INTO points_ledger (saga_id, step, kind, user_id, delta, reason) \
         SELECT $1, $2, 'grant', $3, $4, $5 WHERE changes() = 1; \
     SELECT changes() AS applied, (SELECT delta FROM points_ledger \
         WHERE saga_id = $1 AND step = $2 AND kind = 'grant') AS entry";

/// `revoke`: takes the points ($4 is negative) if the user has them, unless this (saga, step)
/// revoked already, and records the revoke only if they were taken — or if they are zero,
/// taken from anyone, even a user without a balance (which the update does not change), as
/// [`REVOKE_PG`] does; the ledger's own check is then what keeps a replay from recording twice.
const REVOKE_SQLITE: &str = "UPDATE points_balances SET points = points + $4 \
         WHERE user_id = $3 AND points + $4 >= 0 AND NOT EXISTS (SELECT 1 FROM points_ledger \
             WHERE saga_id = $1 AND step = $2 AND kind = 'revoke'); \
     INSERT INTO points_ledger (saga_id, step, kind, user_id, delta, reason) \
         SELECT $1, $2, 'revoke', $3, $4, $5 WHERE (changes() = 1 OR $4 = 0) \
         AND NOT EXISTS (SELECT 1 FROM points_ledger \
             WHERE saga_id = $1 AND step = $2 AND kind = 'revoke'); \
     SELECT changes() AS applied, (SELECT delta FROM points_ledger \
         WHERE saga_id = $1 AND step = $2 AND kind = 'revoke') AS entry";

/// Undoes this (saga, step)'s `$3` entry as a `$4` entry: adds its negated delta to its user
/// (creating the balance at 0 first) unless it was undone already, and copies the entry negated
/// only if that ran. The report: the `$4` entry's delta (now or before), NULL when there was
/// nothing to undo.
const REVERSE_SQLITE: &str = "INSERT INTO points_balances (user_id, points, initial) \
         SELECT user_id, -delta, 0 FROM points_ledger \
         WHERE saga_id = $1 AND step = $2 AND kind = $3 AND NOT EXISTS (SELECT 1 \
             FROM points_ledger WHERE saga_id = $1 AND step = $2 AND kind = $4) \
         ON CONFLICT (user_id) DO UPDATE SET points = points_balances.points + excluded.points; \
     INSERT INTO points_ledger (saga_id, step, kind, user_id, delta, reason) \
         SELECT saga_id, step, $4, user_id, -delta, reason FROM points_ledger \
         WHERE saga_id = $1 AND step = $2 AND kind = $3 AND changes() = 1; \
     SELECT (SELECT delta FROM points_ledger \
         WHERE saga_id = $1 AND step = $2 AND kind = $4) AS reversal";

/// Runs an operation shaped like [`GRANT_PG`] or [`REVOKE_PG`] on PostgreSQL, like
/// [`GRANT_SQLITE`] or [`REVOKE_SQLITE`] on SQLite, for `entry`; a replay answers the recorded
/// delta.
async fn once(
    conn: &mut AnyConnection,
    ctx: &StepContext,
    (postgres, sqlite): (&'static str, &'static str),
    kind: &str,
    entry: &Entry,
) -> Result<Ran<i64>, sqlx::Error> {
    let on_postgres = on_postgres(conn);
    let operation = sqlx::query(if on_postgres { postgres } else { sqlite })
        .bind(&ctx.saga_id)
        .bind(&ctx.step)
        .bind(&entry.user_id)
        .bind(entry.delta)
        .bind(entry.reason.as_deref());
    if on_postgres {
        let row = operation.fetch_one(&mut *conn).await?;
        return Ran::read(&row, row.try_get("replayed")?, "points", ctx, kind);
    }
    let row = report_sqlite(conn, operation).await?;
    Ran::sqlite(&row, row.try_get("entry")?)
}

/// Grants `grant` once; a replay answers the recorded delta.
async fn grant_once(
    conn: &mut AnyConnection,
    ctx: &StepContext,
    grant: &Entry,
) -> Result<i64, StepError> {
    match once(conn, ctx, (GRANT_PG, GRANT_SQLITE), "grant", grant).await? {
        Ran::Applied => Ok(grant.delta),
        Ran::Replay(delta) => Ok(delta),
        Ran::Refused => Err(nothing_applied("points", ctx, "grant").into()),
    }
}

/// Revokes `revoke` once (`revoke.delta` ≤ 0): `Refused` when the user has fewer points left.
async fn revoke_once(
    conn: &mut AnyConnection,
    ctx: &StepContext,
    revoke: &Entry,
) -> Result<Ran<i64>, sqlx::Error> {
    once(conn, ctx, (REVOKE_PG, REVOKE_SQLITE), "revoke", revoke).await
}

/// Undoes this (saga, step)'s `kind` entry, once; nothing if it never happened.
const REVERSAL: Reversal = Reversal {
    ledger: "points",
    postgres: REVERSE_PG,
    sqlite: REVERSE_SQLITE,
};

fn requested(params: &Value, sign: i64) -> Result<Entry, StepError> {
    Ok(Entry {
        user_id: param_str(params, "user_id")?.to_owned(),
        delta: sign * param_count(params, "points")?,
        reason: params
            .get("reason")
            .and_then(Value::as_str)
            .map(str::to_owned),
    })
}

#[async_trait]
impl SagaStep for Grant {
    /// `grant {user_id, points, reason}` → `{"delta"}`.
    async fn action(
        &self,
        conn: &mut AnyConnection,
        ctx: &StepContext,
        params: &Value,
    ) -> Result<Value, StepError> {
        let grant = requested(params, 1)?;
        Ok(json!({ "delta": grant_once(conn, ctx, &grant).await? }))
    }

    /// `revoke`: takes back what this (saga, step) granted, even below zero.
    async fn compensate(
        &self,
        conn: &mut AnyConnection,
        ctx: &StepContext,
        _params: &Value,
    ) -> Result<Value, StepError> {
        Ok(json!({ "delta": REVERSAL.undo(conn, ctx, "grant", "grant_reversal").await? }))
    }
}

#[async_trait]
impl SagaStep for Revoke {
    /// `revoke {user_id, points, reason}` → `{"delta"}`; `insufficient_points` if the user has
    /// fewer points than that left.
    async fn action(
        &self,
        conn: &mut AnyConnection,
        ctx: &StepContext,
        params: &Value,
    ) -> Result<Value, StepError> {
        let revoke = requested(params, -1)?;
        match revoke_once(conn, ctx, &revoke).await? {
            Ran::Applied => Ok(json!({ "delta": revoke.delta })),
            Ran::Replay(delta) => Ok(json!({ "delta": delta })),
            Ran::Refused => {
                let has: Option<i64> =
                    sqlx::query("SELECT points FROM points_balances WHERE user_id = $1")
                        .bind(&revoke.user_id)
                        .fetch_optional(&mut *conn)
                        .await?
                        .map(|r| r.try_get("points"))
                        .transpose()?;
                Err(StepError::business(
                    "insufficient_points",
                    format!(
                        "user `{}` has {} points, {} cannot be revoked",
                        revoke.user_id,
                        has.unwrap_or(0),
                        -revoke.delta
                    ),
                ))
            }
        }
    }

    /// `grant`: gives back what this (saga, step) revoked.
    async fn compensate(
        &self,
        conn: &mut AnyConnection,
        ctx: &StepContext,
        _params: &Value,
    ) -> Result<Value, StepError> {
        Ok(json!({ "delta": REVERSAL.undo(conn, ctx, "revoke", "revoke_reversal").await? }))
    }
}

/// Creates the balances `(user_id, points)` that do not exist yet; `initial` is the seeded
/// balance, which the check starts from.
pub async fn seed(conn: &mut AnyConnection, balances: &[(String, i64)]) -> Result<(), sqlx::Error> {
    for (user_id, points) in balances {
        sqlx::query(
            "INSERT INTO points_balances (user_id, points, initial) VALUES ($1, $2, $2) \
             ON CONFLICT (user_id) DO NOTHING",
        )
        .bind(user_id)
        .bind(*points)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// What the ledger holds for one saga: its net delta and how many entries of each kind.
#[derive(Default)]
struct SagaPoints {
    net: i64,
    kinds: BTreeMap<String, usize>,
}

impl SagaPoints {
    fn count(&self, kind: &str) -> usize {
        self.kinds.get(kind).copied().unwrap_or(0)
    }

    fn describe(&self) -> String {
        let kinds: Vec<String> = self.kinds.iter().map(|(k, n)| format!("{n} {k}")).collect();
        format!("a net {:+} points ({})", self.net, kinds.join(", "))
    }
}

/// The points invariants: every balance is its initial points plus its ledger, each completed
/// order-paid saga granted its points once and kept them, each completed order-refund revoked
/// them once, each compensated saga is net zero, and no saga that did not finish cleanly left
/// points moved.
pub async fn check(
    conn: &mut AnyConnection,
    outcomes: &[Outcome],
) -> Result<Vec<String>, sqlx::Error> {
    let mut violations = Vec::new();
    let finished = Finished::new(outcomes);

    // user → (balance, initial + ledger)
    let mut users: BTreeMap<String, (Option<i64>, i64)> = BTreeMap::new();
    for row in sqlx::query("SELECT user_id, points, initial FROM points_balances")
        .fetch_all(&mut *conn)
        .await?
    {
        let initial: i64 = row.try_get("initial")?;
        users.insert(
            row.try_get("user_id")?,
            (Some(row.try_get("points")?), initial),
        );
    }
    let mut sagas: HashMap<String, SagaPoints> = HashMap::new();
    for row in sqlx::query("SELECT saga_id, kind, user_id, delta FROM points_ledger")
        .fetch_all(&mut *conn)
        .await?
    {
        let delta: i64 = row.try_get("delta")?;
        users.entry(row.try_get("user_id")?).or_insert((None, 0)).1 += delta;
        let saga = sagas.entry(row.try_get("saga_id")?).or_default();
        saga.net += delta;
        *saga.kinds.entry(row.try_get("kind")?).or_default() += 1;
    }
    for (user, (balance, expected)) in &users {
        match balance {
            Some(b) if b == expected => {}
            Some(b) => violations.push(format!(
                "points: user `{user}` has {b} points but their initial points and ledger say \
                 {expected}"
            )),
            None => violations.push(format!(
                "points: user `{user}` has no balance but their ledger says {expected}"
            )),
        }
    }

    for o in outcomes {
        let none = SagaPoints::default();
        let got = sagas.get(&o.saga_id).unwrap_or(&none);
        let label = o.label();
        let (kind, sign) = match o.saga.as_str() {
            ORDER_PAID => ("grant", 1),
            ORDER_REFUND => ("revoke", -1),
            _ => continue,
        };
        match o.state {
            OutcomeState::Completed => {
                let points = match o.require_i64(SERVICE, "points") {
                    Ok(p) => p,
                    Err(v) => {
                        violations.push(v);
                        continue;
                    }
                };
                if got.count(kind) != 1 || got.net != sign * points {
                    violations.push(format!(
                        "points: {label} completed and should have moved {:+} points once, but \
                         its ledger has {}",
                        sign * points,
                        got.describe()
                    ));
                }
            }
            OutcomeState::Compensated => {
                if got.net != 0 {
                    violations.push(format!(
                        "points: {label} was compensated but is not net zero: {}",
                        got.describe()
                    ));
                }
            }
            OutcomeState::Failed => {}
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
        include_str!("../../../migrations/sqlite/0103_points.sql"),
        include_str!("../../../migrations/postgres/0103_points.sql"),
    );

    async fn setup(backend: Backend, test: &str) -> Option<TestDb> {
        let db = TestDb::new(backend, test, &[MIGRATION]).await?;
        let mut conn = db.pool.acquire().await.unwrap();
        let balances = [("u1".to_owned(), 50)];
        seed(&mut conn, &balances).await.unwrap();
        seed(&mut conn, &balances).await.unwrap();
        drop(conn);
        Some(db)
    }

    on_both_backends!(
        grant_creates_the_balance_and_its_compensation_takes_it_back_once,
        revoke_refuses_more_than_the_balance_and_its_compensation_gives_back,
        check_reports_broken_states,
        grant_and_revoke_apply_once_and_a_refused_revoke_writes_nothing,
    );

    async fn points_of(pool: &AnyPool, user: &str) -> Option<i64> {
        sqlx::query("SELECT points FROM points_balances WHERE user_id = $1")
            .bind(user)
            .fetch_optional(pool)
            .await
            .unwrap()
            .map(|r| r.try_get("points").unwrap())
    }

    async fn violations(pool: &AnyPool, outcomes: &[Outcome]) -> Vec<String> {
        let mut conn = pool.acquire().await.unwrap();
        check(&mut conn, outcomes).await.unwrap()
    }

    fn params(user: &str, points: i64) -> Value {
        json!({ "user_id": user, "points": points, "reason": "order o-1" })
    }

    fn input(order_id: &str, user: &str, points: i64) -> Value {
        json!({ "order_id": order_id, "user_id": user, "amount": "1", "points": points })
    }

    async fn grant_creates_the_balance_and_its_compensation_takes_it_back_once(pool: &AnyPool) {
        let p = params("new", 30);
        run(pool, Op::Action(&Grant), "s1", "points", &p)
            .await
            .unwrap();
        run(pool, Op::Action(&Grant), "s1", "points", &p)
            .await
            .unwrap();
        assert_eq!(
            points_of(pool, "new").await,
            Some(30),
            "a replayed grant counts once"
        );
        let back = run(pool, Op::Compensate(&Grant), "s1", "points", &p)
            .await
            .unwrap();
        assert_eq!(back, json!({ "delta": -30 }));
        run(pool, Op::Compensate(&Grant), "s1", "points", &p)
            .await
            .unwrap();
        assert_eq!(points_of(pool, "new").await, Some(0));
        // A compensation whose action never ran does nothing.
        let none = run(pool, Op::Compensate(&Grant), "s2", "points", &p)
            .await
            .unwrap();
        assert_eq!(none, json!({ "delta": 0 }));

        let outcomes = [
            outcome(
                "s1",
                ORDER_PAID,
                OutcomeState::Compensated,
                input("o-1", "new", 30),
            ),
            outcome(
                "s2",
                ORDER_PAID,
                OutcomeState::Compensated,
                input("o-2", "new", 30),
            ),
        ];
        assert_eq!(violations(pool, &outcomes).await, Vec::<String>::new());
    }

    async fn revoke_refuses_more_than_the_balance_and_its_compensation_gives_back(pool: &AnyPool) {
        let r = run(pool, Op::Action(&Revoke), "r1", "points", &params("u1", 51)).await;
        assert!(
            matches!(&r, Err(StepError::Business { code, .. }) if code == "insufficient_points"),
            "{r:?}"
        );
        let r = run(
            pool,
            Op::Action(&Revoke),
            "r2",
            "points",
            &params("ghost", 1),
        )
        .await;
        assert!(
            matches!(&r, Err(StepError::Business { code, .. }) if code == "insufficient_points")
        );
        let r = run(pool, Op::Action(&Revoke), "r3", "points", &params("u1", -1)).await;
        assert!(matches!(&r, Err(StepError::Business { code, .. }) if code == "bad_params"));
        assert_eq!(points_of(pool, "u1").await, Some(50));

        run(pool, Op::Action(&Revoke), "r4", "points", &params("u1", 50))
            .await
            .unwrap();
        assert_eq!(points_of(pool, "u1").await, Some(0));
        run(
            pool,
            Op::Compensate(&Revoke),
            "r4",
            "points",
            &params("u1", 50),
        )
        .await
        .unwrap();
        assert_eq!(points_of(pool, "u1").await, Some(50));
        run(pool, Op::Action(&Revoke), "r5", "points", &params("u1", 20))
            .await
            .unwrap();

        let outcomes = [
            outcome(
                "r1",
                ORDER_REFUND,
                OutcomeState::Compensated,
                input("o-1", "u1", 51),
            ),
            outcome(
                "r4",
                ORDER_REFUND,
                OutcomeState::Compensated,
                input("o-4", "u1", 50),
            ),
            outcome(
                "r5",
                ORDER_REFUND,
                OutcomeState::Completed,
                input("o-5", "u1", 20),
            ),
        ];
        assert_eq!(violations(pool, &outcomes).await, Vec::<String>::new());
    }

    async fn check_reports_broken_states(pool: &AnyPool) {
        run(
            pool,
            Op::Action(&Grant),
            "short",
            "points",
            &params("u1", 5),
        )
        .await
        .unwrap();
        run(pool, Op::Action(&Grant), "kept", "points", &params("u1", 7))
            .await
            .unwrap();
        run(
            pool,
            Op::Action(&Grant),
            "failed",
            "points",
            &params("u2", 3),
        )
        .await
        .unwrap();
        run(
            pool,
            Op::Action(&Grant),
            "stray",
            "points",
            &params("u2", 4),
        )
        .await
        .unwrap();
        sqlx::query("UPDATE points_balances SET points = points - 1 WHERE user_id = 'u2'")
            .execute(pool)
            .await
            .unwrap();

        let outcomes = [
            outcome(
                "short",
                ORDER_PAID,
                OutcomeState::Completed,
                input("o-1", "u1", 6),
            ),
            outcome(
                "kept",
                ORDER_PAID,
                OutcomeState::Compensated,
                input("o-2", "u1", 7),
            ),
            outcome(
                "failed",
                ORDER_PAID,
                OutcomeState::Failed,
                input("o-3", "u2", 3),
            ),
        ];
        let v = violations(pool, &outcomes).await;
        assert_reported(
            &v,
            &["saga short (order o-1)", "+6 points once", "net +5 points"],
        );
        assert_reported(
            &v,
            &["saga kept (order o-2)", "compensated", "net +7 points"],
        );
        assert_reported(
            &v,
            &["saga failed (order o-3)", "operator", "net +3 points"],
        );
        assert_reported(
            &v,
            &[
                "saga stray",
                "not among the finished sagas",
                "net +4 points",
            ],
        );
        assert_reported(&v, &["user `u2` has 6 points", "say 7"]);
        assert_eq!(v.len(), 5, "{v:#?}");
    }

    /// Every path of `grant`, `revoke` and their compensations: first runs, replays (the same
    /// answer, one change), a refusal (no ledger row, no change), undos, their replays, and
    /// undos of nothing.
    async fn grant_and_revoke_apply_once_and_a_refused_revoke_writes_nothing(pool: &AnyPool) {
        let granted = run(pool, Op::Action(&Grant), "g1", "points", &params("u1", 10)).await;
        assert_eq!(granted, Ok(json!({ "delta": 10 })));
        // A replay answers what was recorded, whatever it is asked.
        let again = run(pool, Op::Action(&Grant), "g1", "points", &params("u1", 99)).await;
        assert_eq!(again, granted);
        assert_eq!(points_of(pool, "u1").await, Some(60));
        assert_eq!(kinds(pool, "points_ledger", "g1").await, ["grant"]);
        for _ in 0..2 {
            let undo = run(pool, Op::Compensate(&Grant), "g1", "points", &Value::Null).await;
            assert_eq!(undo, Ok(json!({ "delta": -10 })));
        }
        assert_eq!(points_of(pool, "u1").await, Some(50));
        assert_eq!(
            kinds(pool, "points_ledger", "g1").await,
            ["grant", "grant_reversal"]
        );

        let revoked = run(pool, Op::Action(&Revoke), "r1", "points", &params("u1", 20)).await;
        assert_eq!(revoked, Ok(json!({ "delta": -20 })));
        assert_eq!(
            run(pool, Op::Action(&Revoke), "r1", "points", &params("u1", 20)).await,
            revoked
        );
        assert_eq!(points_of(pool, "u1").await, Some(30));
        assert_eq!(kinds(pool, "points_ledger", "r1").await, ["revoke"]);

        let r = run(pool, Op::Action(&Revoke), "r2", "points", &params("u1", 31)).await;
        assert_eq!(
            refusal(r),
            (
                "insufficient_points".to_owned(),
                "user `u1` has 30 points, 31 cannot be revoked".to_owned()
            )
        );
        assert!(kinds(pool, "points_ledger", "r2").await.is_empty());
        assert_eq!(points_of(pool, "u1").await, Some(30));
        // Zero points can be revoked from anyone: recorded, nothing else; replayed alike.
        for _ in 0..2 {
            let zero = run(
                pool,
                Op::Action(&Revoke),
                "r3",
                "points",
                &params("ghost", 0),
            )
            .await;
            assert_eq!(zero, Ok(json!({ "delta": 0 })));
            assert_eq!(kinds(pool, "points_ledger", "r3").await, ["revoke"]);
            assert_eq!(points_of(pool, "ghost").await, None);
        }

        for _ in 0..2 {
            let undo = run(pool, Op::Compensate(&Revoke), "r1", "points", &Value::Null).await;
            assert_eq!(undo, Ok(json!({ "delta": 20 })));
        }
        assert_eq!(points_of(pool, "u1").await, Some(50));
        assert_eq!(
            kinds(pool, "points_ledger", "r1").await,
            ["revoke", "revoke_reversal"]
        );

        // Undos of what never happened (or was refused): nothing, now or on a replay.
        for (op, saga) in [
            (Op::Compensate(&Grant), "never"),
            (Op::Compensate(&Revoke), "r2"),
            (Op::Compensate(&Revoke), "r2"),
        ] {
            let none = run(pool, op, saga, "points", &Value::Null).await;
            assert_eq!(none, Ok(json!({ "delta": 0 })), "{saga}");
            assert!(
                kinds(pool, "points_ledger", saga).await.is_empty(),
                "{saga}"
            );
        }
        assert_eq!(points_of(pool, "u1").await, Some(50));
    }
}

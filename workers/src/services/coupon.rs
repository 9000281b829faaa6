//! The coupon service: each coupon is `available`, `frozen` (reserved by one saga) or `used`.
//!
//! * [`Coupon`] — order-paid's `coupon` step, TCC: `freeze` reserves the buyer's coupon for this
//!   saga, `use` spends the reservation, `unfreeze` releases it.
//! * [`Restore`] — order-refund's `coupon` step (after the refund pivot, never compensated):
//!   `restore` makes a coupon used by the refunded order available again.
//!
//! Every transition is recorded in `coupon_ledger` under `(saga, step, kind)` with kinds
//! `freeze`, `use`, `unfreeze`, `restore`: confirm and cancel find the coupon their try froze
//! there, and `check` proves from it that no coupon was spent twice.

use std::collections::{BTreeMap, HashMap};

use async_trait::async_trait;
use serde_json::{Value, json};
use sqlx::{AnyConnection, Row};

use super::{
    Finished, ORDER_PAID, ORDER_REFUND, Outcome, OutcomeState, Ran, irreversible, on_postgres,
    report_sqlite,
};
use crate::sdk::{SagaStep, StepContext, StepError, TccStep, param_str};

const SERVICE: &str = "coupon";

/// order-paid's `coupon` step: try `freeze`, confirm `use`, cancel `unfreeze`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Coupon;

/// order-refund's `coupon` step: action `restore`, compensation none.
#[derive(Debug, Clone, Copy, Default)]
pub struct Restore;

/// A coupon row.
struct State {
    owner: String,
    state: String,
    saga_id: Option<String>,
    order_id: Option<String>,
}

impl State {
    fn describe(&self) -> String {
        match (&self.saga_id, &self.order_id) {
            (Some(saga), Some(order)) => {
                format!("{} by saga {saga} (order {order})", self.state)
            }
            (Some(saga), None) => format!("{} by saga {saga}", self.state),
            _ => self.state.clone(),
        }
    }
}

async fn load(conn: &mut AnyConnection, coupon_id: &str) -> Result<Option<State>, sqlx::Error> {
    sqlx::query("SELECT owner, state, saga_id, order_id FROM coupons WHERE coupon_id = $1")
        .bind(coupon_id)
        .fetch_optional(&mut *conn)
        .await?
        .map(|r| {
            Ok(State {
                owner: r.try_get("owner")?,
                state: r.try_get("state")?,
                saga_id: r.try_get("saga_id")?,
                order_id: r.try_get("order_id")?,
            })
        })
        .transpose()
}

// The PostgreSQL statements: one per operation, shaped as the module docs of `services` say
// (`done`, the guarded transition, the ledger row from its RETURNING, the report).

/// `freeze`: the buyer's `available` coupon → `frozen` by this saga, unless this (saga, step)
/// froze already; the ledger row only if the coupon moved (so a refusal writes nothing).
const FREEZE_PG: &str = "WITH done AS (SELECT 1 FROM coupon_ledger \
         WHERE saga_id = $1 AND step = $2 AND kind = 'freeze'), \
     moved AS (UPDATE coupons SET state = 'frozen', saga_id = $1, order_id = $5 \
         WHERE coupon_id = $3 AND owner = $4 AND state = 'available' \
         AND NOT EXISTS (SELECT 1 FROM done) RETURNING coupon_id), \
     written AS (INSERT INTO coupon_ledger (saga_id, step, kind, coupon_id, order_id) \
         SELECT $1, $2, 'freeze', $3, $5 FROM moved \
         ON CONFLICT (saga_id, step, kind) DO NOTHING RETURNING 1) \
     SELECT EXISTS (SELECT 1 FROM done) AS replayed, (SELECT count(*) FROM moved) AS applied, \
         (SELECT count(*) FROM written) AS recorded";

/// The statement that settles this (saga, step)'s reservation as `$kind`: the coupon its
/// `freeze` row names gets `SET $set` if this saga still holds it frozen, unless it was settled
/// so already. `coupon_id` is NULL when the saga froze nothing.
macro_rules! settle_pg {
    ($kind:literal, $set:literal) => {
        concat!(
            "WITH held AS (SELECT coupon_id, order_id FROM coupon_ledger \
                 WHERE saga_id = $1 AND step = $2 AND kind = 'freeze'), \
             done AS (SELECT 1 FROM coupon_ledger \
                 WHERE saga_id = $1 AND step = $2 AND kind = '",
            $kind,
            "'), \
             moved AS (UPDATE coupons c SET ",
            $set,
            " FROM held h WHERE c.coupon_id = h.coupon_id AND c.state = 'frozen' \
                 AND c.saga_id = $1 AND NOT EXISTS (SELECT 1 FROM done) RETURNING c.coupon_id), \
             written AS (INSERT INTO coupon_ledger (saga_id, step, kind, coupon_id, order_id) \
                 SELECT $1, $2, '",
            $kind,
            "', coupon_id, order_id FROM held WHERE EXISTS (SELECT 1 FROM moved) \
                 ON CONFLICT (saga_id, step, kind) DO NOTHING RETURNING 1) \
             SELECT (SELECT coupon_id FROM held) AS coupon_id, \
                 EXISTS (SELECT 1 FROM done) AS replayed, (SELECT count(*) FROM moved) AS applied, \
                 (SELECT count(*) FROM written) AS recorded"
        )
    };
}

/// `use`: the reservation spent (the coupon keeps naming its saga and order).
const USE_PG: &str = settle_pg!("use", "state = 'used'");
/// `unfreeze`: the reservation released.
const UNFREEZE_PG: &str = settle_pg!(
    "unfreeze",
    "state = 'available', saga_id = NULL, order_id = NULL"
);

/// `restore`: the coupon `used` by the refunded order → `available`, unless this (saga, step)
/// restored it already; the ledger row only if it moved.
const RESTORE_PG: &str = "WITH done AS (SELECT 1 FROM coupon_ledger \
         WHERE saga_id = $1 AND step = $2 AND kind = 'restore'), \
     moved AS (UPDATE coupons SET state = 'available', saga_id = NULL, order_id = NULL \
         WHERE coupon_id = $3 AND owner = $4 AND state = 'used' AND order_id = $5 \
         AND NOT EXISTS (SELECT 1 FROM done) RETURNING coupon_id), \
     written AS (INSERT INTO coupon_ledger (saga_id, step, kind, coupon_id, order_id) \
         SELECT $1, $2, 'restore', $3, $5 FROM moved \
         ON CONFLICT (saga_id, step, kind) DO NOTHING RETURNING 1) \
     SELECT EXISTS (SELECT 1 FROM done) AS replayed, (SELECT count(*) FROM moved) AS applied, \
         (SELECT count(*) FROM written) AS recorded";

// The SQLite statements: one call per operation, shaped as the module docs of `services` say
// (the guarded transition; the ledger row if it moved the coupon; the report).

/// `freeze`: the transition [`FREEZE_PG`] makes, recorded only if the coupon moved; the report
/// says whether this (saga, step) has its freeze now.
const FREEZE_SQLITE: &str = "UPDATE coupons SET state = 'frozen', saga_id = $1, order_id = $5 \
         WHERE coupon_id = $3 AND owner = $4 AND state = 'available' \
         AND NOT EXISTS (SELECT 1 FROM coupon_ledger \
             WHERE saga_id = $1 AND step = $2 AND kind = 'freeze'); \
     INSERT INTO coupon_ledger (saga_id, step, kind, coupon_id, order_id) \
         SELECT $1, $2, 'freeze', $3, $5 WHERE changes() = 1; \
     SELECT changes() AS applied, EXISTS (SELECT 1 FROM coupon_ledger \
         WHERE saga_id = $1 AND step = $2 AND kind = 'freeze') AS entry";

/// [`settle_pg!`] on SQLite: the coupon this (saga, step)'s `freeze` row names gets `SET $set`
/// if this saga still holds it frozen, unless it was settled so already; the `freeze` row is
/// copied as the `$kind` row only if the coupon moved. `coupon_id` is NULL when the saga froze
/// nothing.
macro_rules! settle_sqlite {
    ($kind:literal, $set:literal) => {
        concat!(
            "UPDATE coupons SET ",
            $set,
            " WHERE coupon_id = (SELECT coupon_id FROM coupon_ledger \
                 WHERE saga_id = $1 AND step = $2 AND kind = 'freeze') \
                 AND state = 'frozen' AND saga_id = $1 \
                 AND NOT EXISTS (SELECT 1 FROM coupon_ledger \
                     WHERE saga_id = $1 AND step = $2 AND kind = '",
            $kind,
            "'); \
             INSERT INTO coupon_ledger (saga_id, step, kind, coupon_id, order_id) \
                 SELECT saga_id, step, '",
            $kind,
            "', coupon_id, order_id FROM coupon_ledger \
                 WHERE saga_id = $1 AND step = $2 AND kind = 'freeze' AND changes() = 1; \
             SELECT (SELECT coupon_id FROM coupon_ledger \
                     WHERE saga_id = $1 AND step = $2 AND kind = 'freeze') AS coupon_id, \
                 changes() AS applied, EXISTS (SELECT 1 FROM coupon_ledger \
                     WHERE saga_id = $1 AND step = $2 AND kind = '",
            $kind,
            "') AS entry"
        )
    };
}

const USE_SQLITE: &str = settle_sqlite!("use", "state = 'used'");
const UNFREEZE_SQLITE: &str = settle_sqlite!(
    "unfreeze",
    "state = 'available', saga_id = NULL, order_id = NULL"
);

/// `restore`: the transition [`RESTORE_PG`] makes, recorded only if the coupon moved.
const RESTORE_SQLITE: &str = "UPDATE coupons SET state = 'available', saga_id = NULL, \
         order_id = NULL \
         WHERE coupon_id = $3 AND owner = $4 AND state = 'used' AND order_id = $5 \
         AND NOT EXISTS (SELECT 1 FROM coupon_ledger \
             WHERE saga_id = $1 AND step = $2 AND kind = 'restore'); \
     INSERT INTO coupon_ledger (saga_id, step, kind, coupon_id, order_id) \
         SELECT $1, $2, 'restore', $3, $5 WHERE changes() = 1; \
     SELECT changes() AS applied, EXISTS (SELECT 1 FROM coupon_ledger \
         WHERE saga_id = $1 AND step = $2 AND kind = 'restore') AS entry";

/// The coupon an operation names, as its params give it.
struct Request<'a> {
    coupon_id: &'a str,
    user_id: &'a str,
    order_id: &'a str,
}

impl<'a> Request<'a> {
    fn of(params: &'a Value) -> Result<Self, StepError> {
        Ok(Request {
            coupon_id: param_str(params, "coupon_id")?,
            user_id: param_str(params, "user_id")?,
            order_id: param_str(params, "order_id")?,
        })
    }
}

/// Runs a transition shaped like [`FREEZE_PG`] or [`RESTORE_PG`] on PostgreSQL, like
/// [`FREEZE_SQLITE`] or [`RESTORE_SQLITE`] on SQLite, for `req`.
async fn transition(
    conn: &mut AnyConnection,
    ctx: &StepContext,
    (postgres, sqlite): (&'static str, &'static str),
    kind: &str,
    req: &Request<'_>,
) -> Result<Ran, sqlx::Error> {
    let on_postgres = on_postgres(conn);
    let operation = sqlx::query(if on_postgres { postgres } else { sqlite })
        .bind(&ctx.saga_id)
        .bind(&ctx.step)
        .bind(req.coupon_id)
        .bind(req.user_id)
        .bind(req.order_id);
    if on_postgres {
        let row = operation.fetch_one(&mut *conn).await?;
        let replay = row.try_get::<bool, _>("replayed")?.then_some(());
        return Ran::read(&row, replay, "coupon", ctx, kind);
    }
    let row = report_sqlite(conn, operation).await?;
    let recorded = (row.try_get::<i64, _>("entry")? == 1).then_some(());
    Ran::sqlite(&row, recorded)
}

/// Freezes the buyer's coupon for this saga once: `Refused` when it is not theirs or not
/// available.
async fn freeze_once(
    conn: &mut AnyConnection,
    ctx: &StepContext,
    req: &Request<'_>,
) -> Result<Ran, sqlx::Error> {
    transition(conn, ctx, (FREEZE_PG, FREEZE_SQLITE), "freeze", req).await
}

/// Why the freeze of `req` was refused.
async fn freeze_refused(
    conn: &mut AnyConnection,
    req: &Request<'_>,
) -> Result<StepError, sqlx::Error> {
    let coupon_id = req.coupon_id;
    let Some(coupon) = load(conn, coupon_id).await? else {
        return Ok(StepError::business(
            "unknown_coupon",
            format!("there is no coupon `{coupon_id}`"),
        ));
    };
    let (code, why) = if coupon.owner != req.user_id {
        (
            "not_owner",
            format!("belongs to `{}`, not `{}`", coupon.owner, req.user_id),
        )
    } else if coupon.state == "used" {
        ("coupon_used", format!("is already {}", coupon.describe()))
    } else if coupon.state == "frozen" {
        ("coupon_frozen", format!("is {}", coupon.describe()))
    } else {
        // Available and ours, yet the update missed it: it changed under us, try again.
        return Ok(StepError::retryable(format!(
            "coupon `{coupon_id}` changed while being frozen"
        )));
    };
    Ok(StepError::business(
        code,
        format!("coupon `{coupon_id}` {why}"),
    ))
}

/// How a reservation is settled.
#[derive(Debug, Clone, Copy)]
enum Settle {
    /// Confirm: `frozen` → `used`.
    Use,
    /// Cancel: `frozen` → `available`.
    Unfreeze,
}

/// Settles this (saga, step)'s reservation once: the coupon its freeze named and what became of
/// it (`Refused`: this saga no longer holds it frozen), or None if the saga froze nothing.
async fn settle(
    conn: &mut AnyConnection,
    ctx: &StepContext,
    how: Settle,
) -> Result<Option<(String, Ran)>, sqlx::Error> {
    let (postgres, sqlite, kind) = match how {
        Settle::Use => (USE_PG, USE_SQLITE, "use"),
        Settle::Unfreeze => (UNFREEZE_PG, UNFREEZE_SQLITE, "unfreeze"),
    };
    if on_postgres(conn) {
        let row = sqlx::query(postgres)
            .bind(&ctx.saga_id)
            .bind(&ctx.step)
            .fetch_one(&mut *conn)
            .await?;
        let Some(coupon_id) = row.try_get::<Option<String>, _>("coupon_id")? else {
            return Ok(None);
        };
        let replay = row.try_get::<bool, _>("replayed")?.then_some(());
        return Ok(Some((
            coupon_id,
            Ran::read(&row, replay, "coupon", ctx, kind)?,
        )));
    }
    let operation = sqlx::query(sqlite).bind(&ctx.saga_id).bind(&ctx.step);
    let row = report_sqlite(conn, operation).await?;
    let Some(coupon_id) = row.try_get::<Option<String>, _>("coupon_id")? else {
        return Ok(None);
    };
    let recorded = (row.try_get::<i64, _>("entry")? == 1).then_some(());
    Ok(Some((coupon_id, Ran::sqlite(&row, recorded)?)))
}

/// Makes the coupon `used` by the refunded order available again, once: `Refused` when it is
/// not (the answer is then a success that says why).
async fn restore_once(
    conn: &mut AnyConnection,
    ctx: &StepContext,
    req: &Request<'_>,
) -> Result<Ran, sqlx::Error> {
    transition(conn, ctx, (RESTORE_PG, RESTORE_SQLITE), "restore", req).await
}

#[async_trait]
impl TccStep for Coupon {
    /// `freeze {coupon_id, user_id, order_id}`: `available` → `frozen` by this saga. Refuses with
    /// `unknown_coupon`, `not_owner`, `coupon_used` or `coupon_frozen`.
    async fn try_(
        &self,
        conn: &mut AnyConnection,
        ctx: &StepContext,
        params: &Value,
    ) -> Result<Value, StepError> {
        let req = Request::of(params)?;
        match freeze_once(conn, ctx, &req).await? {
            Ran::Applied | Ran::Replay(()) => {
                Ok(json!({ "coupon_id": req.coupon_id, "state": "frozen" }))
            }
            Ran::Refused => Err(freeze_refused(conn, &req).await?),
        }
    }

    /// `use`: the coupon this saga froze → `used`. Refuses with `not_frozen` if this saga holds
    /// no frozen coupon (only an operator can sort that out).
    async fn confirm(
        &self,
        conn: &mut AnyConnection,
        ctx: &StepContext,
        _params: &Value,
    ) -> Result<Value, StepError> {
        let Some((coupon_id, ran)) = settle(conn, ctx, Settle::Use).await? else {
            return Err(StepError::business(
                "not_frozen",
                format!(
                    "saga {} froze no coupon in step `{}`",
                    ctx.saga_id, ctx.step
                ),
            ));
        };
        if ran == Ran::Refused {
            let now = load(conn, &coupon_id).await?.map(|c| c.describe());
            return Err(StepError::business(
                "not_frozen",
                format!(
                    "coupon `{coupon_id}` is no longer frozen by saga {}: it is {}",
                    ctx.saga_id,
                    now.as_deref().unwrap_or("gone")
                ),
            ));
        }
        Ok(json!({ "coupon_id": coupon_id, "state": "used" }))
    }

    /// `unfreeze`: the coupon this saga froze → `available`; nothing if it froze none.
    async fn cancel(
        &self,
        conn: &mut AnyConnection,
        ctx: &StepContext,
        _params: &Value,
    ) -> Result<Value, StepError> {
        Ok(match settle(conn, ctx, Settle::Unfreeze).await? {
            None => json!({ "unfrozen": false }),
            Some((coupon_id, ran)) => {
                json!({ "coupon_id": coupon_id, "unfrozen": ran != Ran::Refused })
            }
        })
    }
}

#[async_trait]
impl SagaStep for Restore {
    /// `restore {coupon_id, user_id, order_id}`: `used` by that order → `available`. It runs
    /// after the refund pivot and is retried until it succeeds, so a coupon it must not touch is
    /// a success with `"restored": false` and the reason, never an error.
    async fn action(
        &self,
        conn: &mut AnyConnection,
        ctx: &StepContext,
        params: &Value,
    ) -> Result<Value, StepError> {
        let req = Request::of(params)?;
        let coupon_id = req.coupon_id;
        if restore_once(conn, ctx, &req).await? != Ran::Refused {
            return Ok(json!({ "coupon_id": coupon_id, "restored": true }));
        }
        let reason = match load(conn, coupon_id).await? {
            None => "no such coupon".to_owned(),
            Some(c) if c.owner != req.user_id => format!("it belongs to `{}`", c.owner),
            Some(c) => format!("it is {}, not used by order {}", c.describe(), req.order_id),
        };
        Ok(json!({ "coupon_id": coupon_id, "restored": false, "reason": reason }))
    }

    async fn compensate(
        &self,
        _conn: &mut AnyConnection,
        _ctx: &StepContext,
        _params: &Value,
    ) -> Result<Value, StepError> {
        Err(irreversible("restoring a coupon"))
    }
}

/// Creates the coupons `(coupon_id, owner)` that do not exist yet, `available`.
pub async fn seed(
    conn: &mut AnyConnection,
    coupons: &[(String, String)],
) -> Result<(), sqlx::Error> {
    for (coupon_id, owner) in coupons {
        sqlx::query(
            "INSERT INTO coupons (coupon_id, owner, state) VALUES ($1, $2, 'available') \
             ON CONFLICT (coupon_id) DO NOTHING",
        )
        .bind(coupon_id)
        .bind(owner)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// How many transitions of each kind the ledger holds (for one coupon, or one saga).
#[derive(Default)]
struct Transitions(BTreeMap<String, usize>);

impl Transitions {
    fn add(&mut self, kind: String) {
        *self.0.entry(kind).or_default() += 1;
    }

    fn count(&self, kind: &str) -> i64 {
        self.0.get(kind).copied().unwrap_or(0) as i64
    }

    fn describe(&self) -> String {
        if self.0.is_empty() {
            return "no transitions".to_owned();
        }
        let kinds: Vec<String> = self.0.iter().map(|(k, n)| format!("{n} {k}")).collect();
        kinds.join(", ")
    }
}

/// The coupon invariants: every coupon's state is what its ledger adds up to (so none was used
/// twice), no finished saga still holds a frozen coupon, each completed order-paid saga used its
/// coupon (and still holds it unless a refund of its order restored it), each compensated one
/// neither used nor holds it, and no saga that did not finish cleanly left transitions.
pub async fn check(
    conn: &mut AnyConnection,
    outcomes: &[Outcome],
) -> Result<Vec<String>, sqlx::Error> {
    let mut violations = Vec::new();
    let finished = Finished::new(outcomes);

    let mut coupons: BTreeMap<String, State> = BTreeMap::new();
    for row in sqlx::query("SELECT coupon_id, owner, state, saga_id, order_id FROM coupons")
        .fetch_all(&mut *conn)
        .await?
    {
        coupons.insert(
            row.try_get("coupon_id")?,
            State {
                owner: row.try_get("owner")?,
                state: row.try_get("state")?,
                saga_id: row.try_get("saga_id")?,
                order_id: row.try_get("order_id")?,
            },
        );
    }
    let mut per_coupon: BTreeMap<String, Transitions> = BTreeMap::new();
    let mut per_saga: HashMap<String, (Transitions, String)> = HashMap::new();
    // (coupon, order) pairs a refund restored.
    let mut restored: Vec<(String, String)> = Vec::new();
    for row in sqlx::query("SELECT saga_id, kind, coupon_id, order_id FROM coupon_ledger")
        .fetch_all(&mut *conn)
        .await?
    {
        let kind: String = row.try_get("kind")?;
        let coupon_id: String = row.try_get("coupon_id")?;
        if kind == "restore" {
            restored.push((coupon_id.clone(), row.try_get("order_id")?));
        }
        per_coupon
            .entry(coupon_id.clone())
            .or_default()
            .add(kind.clone());
        per_saga
            .entry(row.try_get("saga_id")?)
            .or_insert_with(|| (Transitions::default(), coupon_id))
            .0
            .add(kind);
    }

    for (coupon_id, t) in &per_coupon {
        let Some(coupon) = coupons.get(coupon_id) else {
            violations.push(format!(
                "coupon: the ledger has {} for coupon `{coupon_id}`, which does not exist",
                t.describe()
            ));
            continue;
        };
        // Each freeze ends in one use or one unfreeze, or is still held; each use is undone
        // only by a restore. So the counts pin down the state.
        let held = t.count("freeze") - t.count("use") - t.count("unfreeze");
        let spent = t.count("use") - t.count("restore");
        let expected = match coupon.state.as_str() {
            "frozen" => (1, 0),
            "used" => (0, 1),
            _ => (0, 0),
        };
        if (held, spent) != expected {
            violations.push(format!(
                "coupon: coupon `{coupon_id}` is {} but its ledger has {}",
                coupon.describe(),
                t.describe()
            ));
        }
    }
    for (coupon_id, coupon) in &coupons {
        if coupon.state != "frozen" {
            continue;
        }
        if let Some(o) = coupon.saga_id.as_deref().and_then(|s| finished.get(s)) {
            violations.push(format!(
                "coupon: coupon `{coupon_id}` is still frozen by {}, which ended {}",
                o.label(),
                o.state
            ));
        }
    }

    for o in outcomes {
        let none = (Transitions::default(), String::new());
        let (got, _) = per_saga.get(&o.saga_id).unwrap_or(&none);
        let label = o.label();
        match (o.saga.as_str(), o.state) {
            (ORDER_PAID, OutcomeState::Completed) => {
                let coupon_id = match o.require_str(SERVICE, "coupon_id") {
                    Ok(c) => c,
                    Err(v) => {
                        violations.push(v);
                        continue;
                    }
                };
                if got.count("freeze") != 1 || got.count("use") != 1 || got.count("unfreeze") != 0 {
                    violations.push(format!(
                        "coupon: {label} completed but its ledger has {} for coupon `{coupon_id}`",
                        got.describe()
                    ));
                }
                let holds = coupons.get(coupon_id).is_some_and(|c| {
                    c.state == "used" && c.saga_id.as_deref() == Some(o.saga_id.as_str())
                });
                let given_back = o.input_str("order_id").is_some_and(|order| {
                    restored.iter().any(|(c, r)| c == coupon_id && r == order)
                });
                if !holds && !given_back {
                    violations.push(format!(
                        "coupon: {label} completed but coupon `{coupon_id}` is {}",
                        coupons
                            .get(coupon_id)
                            .map_or("missing".to_owned(), State::describe)
                    ));
                }
            }
            (ORDER_PAID, OutcomeState::Compensated) => {
                let held: Vec<String> = coupons
                    .iter()
                    .filter(|(_, c)| c.saga_id.as_deref() == Some(o.saga_id.as_str()))
                    .map(|(id, c)| format!("`{id}` ({})", c.state))
                    .collect();
                if got.count("use") != 0 || !held.is_empty() {
                    violations.push(format!(
                        "coupon: {label} was compensated but its ledger has {} and it holds \
                         coupons [{}]",
                        got.describe(),
                        held.join(", ")
                    ));
                }
            }
            (ORDER_REFUND, OutcomeState::Compensated) if got.count("restore") != 0 => {
                violations.push(format!(
                    "coupon: {label} was compensated but restored a coupon (it runs only after \
                     the refund)"
                ));
            }
            _ => {}
        }
    }

    let mut ids: Vec<&String> = per_saga.keys().collect();
    ids.sort();
    for saga_id in ids {
        let (t, coupon_id) = &per_saga[saga_id];
        let left = format!("{} on coupon `{coupon_id}`", t.describe());
        if let Some(v) = finished.unsettled(SERVICE, saga_id, &left) {
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
        include_str!("../../../migrations/sqlite/0102_coupon.sql"),
        include_str!("../../../migrations/postgres/0102_coupon.sql"),
    );

    async fn setup(backend: Backend, test: &str) -> Option<TestDb> {
        let db = TestDb::new(backend, test, &[MIGRATION]).await?;
        let mut conn = db.pool.acquire().await.unwrap();
        let coupons = [
            ("c1".to_owned(), "u1".to_owned()),
            ("c2".to_owned(), "u1".to_owned()),
            ("c3".to_owned(), "u2".to_owned()),
        ];
        seed(&mut conn, &coupons).await.unwrap();
        seed(&mut conn, &coupons).await.unwrap();
        drop(conn);
        Some(db)
    }

    on_both_backends!(
        freeze_then_use_spends_the_coupon_once,
        freeze_refuses_coupons_it_cannot_take,
        unfreeze_releases_only_what_this_saga_froze,
        restore_gives_back_a_coupon_used_by_the_refunded_order_only,
        check_reports_broken_states,
        every_transition_applies_once_and_a_refused_one_writes_nothing,
    );

    async fn state_of(pool: &AnyPool, coupon: &str) -> String {
        let mut conn = pool.acquire().await.unwrap();
        load(&mut conn, coupon).await.unwrap().unwrap().describe()
    }

    async fn violations(pool: &AnyPool, outcomes: &[Outcome]) -> Vec<String> {
        let mut conn = pool.acquire().await.unwrap();
        check(&mut conn, outcomes).await.unwrap()
    }

    fn params(coupon: &str, user: &str, order: &str) -> Value {
        json!({ "coupon_id": coupon, "user_id": user, "order_id": order })
    }

    fn code(r: Result<Value, StepError>) -> String {
        match r {
            Err(StepError::Business { code, .. }) => code,
            other => panic!("expected a business error, got {other:?}"),
        }
    }

    async fn freeze_then_use_spends_the_coupon_once(pool: &AnyPool) {
        let p = params("c1", "u1", "o-1");
        for _ in 0..2 {
            run(pool, Op::Try(&Coupon), "s1", "coupon", &p)
                .await
                .unwrap();
        }
        assert_eq!(state_of(pool, "c1").await, "frozen by saga s1 (order o-1)");
        for _ in 0..2 {
            let out = run(pool, Op::Confirm(&Coupon), "s1", "coupon", &p)
                .await
                .unwrap();
            assert_eq!(out, json!({ "coupon_id": "c1", "state": "used" }));
        }
        assert_eq!(state_of(pool, "c1").await, "used by saga s1 (order o-1)");
        let outcomes = [outcome("s1", ORDER_PAID, OutcomeState::Completed, p)];
        assert_eq!(violations(pool, &outcomes).await, Vec::<String>::new());
    }

    async fn freeze_refuses_coupons_it_cannot_take(pool: &AnyPool) {
        run(
            pool,
            Op::Try(&Coupon),
            "s1",
            "coupon",
            &params("c1", "u1", "o-1"),
        )
        .await
        .unwrap();
        run(
            pool,
            Op::Try(&Coupon),
            "s2",
            "coupon",
            &params("c2", "u1", "o-2"),
        )
        .await
        .unwrap();
        run(pool, Op::Confirm(&Coupon), "s2", "coupon", &Value::Null)
            .await
            .unwrap();

        let r = run(
            pool,
            Op::Try(&Coupon),
            "s3",
            "coupon",
            &params("c1", "u1", "o-3"),
        )
        .await;
        assert_eq!(code(r), "coupon_frozen");
        let r = run(
            pool,
            Op::Try(&Coupon),
            "s3",
            "coupon",
            &params("c2", "u1", "o-3"),
        )
        .await;
        assert_eq!(code(r), "coupon_used");
        let r = run(
            pool,
            Op::Try(&Coupon),
            "s3",
            "coupon",
            &params("c3", "u1", "o-3"),
        )
        .await;
        assert_eq!(code(r), "not_owner");
        let r = run(
            pool,
            Op::Try(&Coupon),
            "s3",
            "coupon",
            &params("c9", "u1", "o-3"),
        )
        .await;
        assert_eq!(code(r), "unknown_coupon");
        let r = run(
            pool,
            Op::Try(&Coupon),
            "s3",
            "coupon",
            &json!({ "coupon_id": "c3" }),
        )
        .await;
        assert_eq!(code(r), "bad_params");
        let r = run(pool, Op::Confirm(&Coupon), "s3", "coupon", &Value::Null).await;
        assert_eq!(code(r), "not_frozen", "confirm without a freeze");
        assert_eq!(state_of(pool, "c3").await, "available");
    }

    async fn unfreeze_releases_only_what_this_saga_froze(pool: &AnyPool) {
        let p = params("c1", "u1", "o-1");
        run(pool, Op::Try(&Coupon), "s1", "coupon", &p)
            .await
            .unwrap();
        // A cancel of a saga that froze nothing leaves s1's reservation alone.
        let out = run(pool, Op::Cancel(&Coupon), "s2", "coupon", &p)
            .await
            .unwrap();
        assert_eq!(out, json!({ "unfrozen": false }));
        assert_eq!(state_of(pool, "c1").await, "frozen by saga s1 (order o-1)");
        for _ in 0..2 {
            let out = run(pool, Op::Cancel(&Coupon), "s1", "coupon", &p)
                .await
                .unwrap();
            assert_eq!(out, json!({ "coupon_id": "c1", "unfrozen": true }));
        }
        assert_eq!(state_of(pool, "c1").await, "available");

        let outcomes = [
            outcome("s1", ORDER_PAID, OutcomeState::Compensated, p.clone()),
            outcome("s2", ORDER_PAID, OutcomeState::Compensated, p),
        ];
        assert_eq!(violations(pool, &outcomes).await, Vec::<String>::new());
    }

    async fn restore_gives_back_a_coupon_used_by_the_refunded_order_only(pool: &AnyPool) {
        let p = params("c1", "u1", "o-1");
        run(pool, Op::Try(&Coupon), "s1", "coupon", &p)
            .await
            .unwrap();
        run(pool, Op::Confirm(&Coupon), "s1", "coupon", &p)
            .await
            .unwrap();

        let out = run(
            pool,
            Op::Action(&Restore),
            "r0",
            "coupon",
            &params("c1", "u1", "o-9"),
        )
        .await
        .unwrap();
        assert_eq!(
            out["restored"],
            json!(false),
            "used by another order: {out}"
        );
        let out = run(
            pool,
            Op::Action(&Restore),
            "r0",
            "coupon",
            &params("c1", "u2", "o-1"),
        )
        .await
        .unwrap();
        assert_eq!(
            out["restored"],
            json!(false),
            "someone else's coupon: {out}"
        );
        let out = run(
            pool,
            Op::Action(&Restore),
            "r0",
            "coupon",
            &params("c9", "u1", "o-1"),
        )
        .await
        .unwrap();
        assert_eq!(out["restored"], json!(false), "no such coupon: {out}");
        for _ in 0..2 {
            let out = run(pool, Op::Action(&Restore), "r1", "coupon", &p)
                .await
                .unwrap();
            assert_eq!(out["restored"], json!(true));
        }
        assert_eq!(state_of(pool, "c1").await, "available");
        let r = run(pool, Op::Compensate(&Restore), "r1", "coupon", &p).await;
        assert_eq!(code(r), "irreversible");

        // Given back, the coupon can serve another order.
        let again = params("c1", "u1", "o-2");
        run(pool, Op::Try(&Coupon), "s2", "coupon", &again)
            .await
            .unwrap();
        run(pool, Op::Confirm(&Coupon), "s2", "coupon", &again)
            .await
            .unwrap();
        let outcomes = [
            outcome("s1", ORDER_PAID, OutcomeState::Completed, p.clone()),
            outcome(
                "r0",
                ORDER_REFUND,
                OutcomeState::Completed,
                params("c1", "u1", "o-9"),
            ),
            outcome("r1", ORDER_REFUND, OutcomeState::Completed, p),
            outcome("s2", ORDER_PAID, OutcomeState::Completed, again),
        ];
        assert_eq!(violations(pool, &outcomes).await, Vec::<String>::new());
    }

    async fn check_reports_broken_states(pool: &AnyPool) {
        let first = params("c1", "u1", "o-1");
        run(pool, Op::Try(&Coupon), "first", "coupon", &first)
            .await
            .unwrap();
        run(pool, Op::Confirm(&Coupon), "first", "coupon", &first)
            .await
            .unwrap();
        // Someone resets the coupon behind the service's back, and it is spent a second time.
        sqlx::query("UPDATE coupons SET state = 'available', saga_id = NULL, order_id = NULL")
            .execute(pool)
            .await
            .unwrap();
        let second = params("c1", "u1", "o-2");
        run(pool, Op::Try(&Coupon), "second", "coupon", &second)
            .await
            .unwrap();
        run(pool, Op::Confirm(&Coupon), "second", "coupon", &second)
            .await
            .unwrap();
        // A reservation whose cancel never ran, and one nobody knows about.
        run(
            pool,
            Op::Try(&Coupon),
            "hung",
            "coupon",
            &params("c2", "u1", "o-3"),
        )
        .await
        .unwrap();
        run(
            pool,
            Op::Try(&Coupon),
            "stray",
            "coupon",
            &params("c3", "u2", "o-4"),
        )
        .await
        .unwrap();

        let outcomes = [
            outcome("first", ORDER_PAID, OutcomeState::Completed, first),
            outcome("second", ORDER_PAID, OutcomeState::Completed, second),
            outcome(
                "hung",
                ORDER_PAID,
                OutcomeState::Compensated,
                params("c2", "u1", "o-3"),
            ),
        ];
        let v = violations(pool, &outcomes).await;
        assert_reported(
            &v,
            &["coupon `c1` is used by saga second", "2 freeze", "2 use"],
        );
        assert_reported(
            &v,
            &["saga first (order o-1) completed but coupon `c1` is used by saga second"],
        );
        assert_reported(
            &v,
            &[
                "coupon `c2` is still frozen by saga hung (order o-3)",
                "ended compensated",
            ],
        );
        assert_reported(
            &v,
            &[
                "saga hung (order o-3) was compensated",
                "1 freeze",
                "[`c2` (frozen)]",
            ],
        );
        assert_reported(
            &v,
            &[
                "saga stray",
                "not among the finished sagas",
                "1 freeze on coupon `c3`",
            ],
        );
        assert_eq!(v.len(), 5, "{v:#?}");
    }

    /// Every path of `freeze`, `use`, `unfreeze` and `restore`: first runs, replays (the same
    /// answer, one transition), refusals (no ledger row, the coupon untouched), the cancel of a
    /// freeze, of nothing and of a used coupon.
    async fn every_transition_applies_once_and_a_refused_one_writes_nothing(pool: &AnyPool) {
        let p = params("c1", "u1", "o-1");
        let first = run(pool, Op::Try(&Coupon), "s1", "coupon", &p).await;
        assert_eq!(first, Ok(json!({ "coupon_id": "c1", "state": "frozen" })));
        assert_eq!(run(pool, Op::Try(&Coupon), "s1", "coupon", &p).await, first);
        assert_eq!(state_of(pool, "c1").await, "frozen by saga s1 (order o-1)");
        assert_eq!(kinds(pool, "coupon_ledger", "s1").await, ["freeze"]);

        let r = run(
            pool,
            Op::Try(&Coupon),
            "s2",
            "coupon",
            &params("c1", "u1", "o-2"),
        )
        .await;
        assert_eq!(
            refusal(r),
            (
                "coupon_frozen".to_owned(),
                "coupon `c1` is frozen by saga s1 (order o-1)".to_owned()
            )
        );
        assert!(kinds(pool, "coupon_ledger", "s2").await.is_empty());
        assert_eq!(state_of(pool, "c1").await, "frozen by saga s1 (order o-1)");

        let used = run(pool, Op::Confirm(&Coupon), "s1", "coupon", &Value::Null).await;
        assert_eq!(used, Ok(json!({ "coupon_id": "c1", "state": "used" })));
        assert_eq!(
            run(pool, Op::Confirm(&Coupon), "s1", "coupon", &Value::Null).await,
            used
        );
        assert_eq!(state_of(pool, "c1").await, "used by saga s1 (order o-1)");
        assert_eq!(kinds(pool, "coupon_ledger", "s1").await, ["freeze", "use"]);

        // A confirm without a freeze, and one whose coupon was taken from it.
        let r = run(pool, Op::Confirm(&Coupon), "s3", "coupon", &Value::Null).await;
        assert_eq!(
            refusal(r),
            (
                "not_frozen".to_owned(),
                "saga s3 froze no coupon in step `coupon`".to_owned()
            )
        );
        assert!(kinds(pool, "coupon_ledger", "s3").await.is_empty());
        run(
            pool,
            Op::Try(&Coupon),
            "s4",
            "coupon",
            &params("c2", "u1", "o-4"),
        )
        .await
        .unwrap();
        sqlx::query(
            "UPDATE coupons SET state = 'available', saga_id = NULL, order_id = NULL \
             WHERE coupon_id = 'c2'",
        )
        .execute(pool)
        .await
        .unwrap();
        let r = run(pool, Op::Confirm(&Coupon), "s4", "coupon", &Value::Null).await;
        assert_eq!(
            refusal(r),
            (
                "not_frozen".to_owned(),
                "coupon `c2` is no longer frozen by saga s4: it is available".to_owned()
            )
        );
        assert_eq!(kinds(pool, "coupon_ledger", "s4").await, ["freeze"]);
        assert_eq!(state_of(pool, "c2").await, "available");

        // Cancels: of a freeze (once), of nothing, of a coupon already used.
        run(
            pool,
            Op::Try(&Coupon),
            "s5",
            "coupon",
            &params("c3", "u2", "o-5"),
        )
        .await
        .unwrap();
        let undone = run(pool, Op::Cancel(&Coupon), "s5", "coupon", &Value::Null).await;
        assert_eq!(undone, Ok(json!({ "coupon_id": "c3", "unfrozen": true })));
        assert_eq!(
            run(pool, Op::Cancel(&Coupon), "s5", "coupon", &Value::Null).await,
            undone
        );
        assert_eq!(state_of(pool, "c3").await, "available");
        assert_eq!(
            kinds(pool, "coupon_ledger", "s5").await,
            ["freeze", "unfreeze"]
        );
        for _ in 0..2 {
            let none = run(pool, Op::Cancel(&Coupon), "s6", "coupon", &Value::Null).await;
            assert_eq!(none, Ok(json!({ "unfrozen": false })));
        }
        assert!(kinds(pool, "coupon_ledger", "s6").await.is_empty());
        let late = run(pool, Op::Cancel(&Coupon), "s1", "coupon", &Value::Null).await;
        assert_eq!(late, Ok(json!({ "coupon_id": "c1", "unfrozen": false })));
        assert_eq!(kinds(pool, "coupon_ledger", "s1").await, ["freeze", "use"]);
        assert_eq!(state_of(pool, "c1").await, "used by saga s1 (order o-1)");

        // Restore: once; then the coupon is not used by that order any more.
        let restored = run(pool, Op::Action(&Restore), "r1", "coupon", &p).await;
        assert_eq!(restored, Ok(json!({ "coupon_id": "c1", "restored": true })));
        assert_eq!(
            run(pool, Op::Action(&Restore), "r1", "coupon", &p).await,
            restored
        );
        assert_eq!(state_of(pool, "c1").await, "available");
        assert_eq!(kinds(pool, "coupon_ledger", "r1").await, ["restore"]);
        let not = run(pool, Op::Action(&Restore), "r2", "coupon", &p).await;
        assert_eq!(
            not,
            Ok(json!({ "coupon_id": "c1", "restored": false,
                       "reason": "it is available, not used by order o-1" }))
        );
        assert!(kinds(pool, "coupon_ledger", "r2").await.is_empty());
    }
}

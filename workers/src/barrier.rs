//! The idempotency barrier: one row per (saga, step, operation), written in the same transaction
//! as the handler's effect.
//!
//! * a command whose row exists gets the recorded outcome back and changes nothing;
//! * a forward operation claims its row first (the primary key serialises concurrent duplicates),
//!   runs the handler, and stores the outcome; a business failure rolls the effect back and
//!   stores the failure (durably: the engine may rely on "no effect");
//! * an undo (compensate/cancel) whose forward operation never ran records a null undo, and the
//!   late forward operation is then refused — no hanging reservation;
//! * a transient failure rolls everything back and records nothing, so a retry runs again.
//!
//! Rows are kept until [`purge`] (driven by [`retention_loop`]) removes them by age: the barrier
//! cannot tell when a saga is over, so the retention must exceed the longest saga.

use sagaflow_engine::machine::{Op, Outcome};
use sagaflow_engine::store::now_ms;
use sqlx::{AnyConnection, AnyPool, Row};

use crate::sdk::{StepContext, StepError};

/// The handler for one step kind, as the runtime looks it up.
#[derive(Clone)]
pub enum Handler {
    Saga(std::sync::Arc<dyn crate::sdk::SagaStep>),
    Tcc(std::sync::Arc<dyn crate::sdk::TccStep>),
    /// Answers any forward operation with this business failure (fault injection); the answer
    /// is recorded like a real one, so a duplicate gets the same.
    Refuse {
        code: String,
        message: String,
    },
}

impl std::fmt::Debug for Handler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Handler::Saga(_) => f.write_str("Handler::Saga"),
            Handler::Tcc(_) => f.write_str("Handler::Tcc"),
            Handler::Refuse { code, .. } => write!(f, "Handler::Refuse({code})"),
        }
    }
}

async fn recorded(
    conn: &mut AnyConnection,
    ctx: &StepContext,
    op: Op,
) -> Result<Option<Outcome>, sqlx::Error> {
    let row =
        sqlx::query("SELECT outcome FROM barrier WHERE saga_id = $1 AND step = $2 AND op = $3")
            .bind(ctx.saga_id.as_str())
            .bind(ctx.step.as_str())
            .bind(op.as_str())
            .fetch_optional(conn)
            .await?;
    let Some(row) = row else { return Ok(None) };
    let text: String = row.try_get("outcome")?;
    Ok(Some(serde_json::from_str(&text).unwrap_or(
        Outcome::Business {
            code: "corrupt_barrier".into(),
            message: format!("unreadable barrier outcome: {text}"),
        },
    )))
}

/// Inserts the row; false when it already exists (a concurrent duplicate won).
async fn record(
    conn: &mut AnyConnection,
    ctx: &StepContext,
    op: Op,
    outcome: &Outcome,
) -> Result<bool, sqlx::Error> {
    let r = sqlx::query("INSERT INTO barrier (saga_id, step, op, outcome, created_at) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (saga_id, step, op) DO NOTHING")
        .bind(ctx.saga_id.as_str())
        .bind(ctx.step.as_str())
        .bind(op.as_str())
        .bind(serde_json::to_string(outcome).unwrap_or_default())
        .bind(now_ms())
        .execute(conn)
        .await?;
    Ok(r.rows_affected() == 1)
}

async fn update(
    conn: &mut AnyConnection,
    ctx: &StepContext,
    op: Op,
    outcome: &Outcome,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE barrier SET outcome = $1 WHERE saga_id = $2 AND step = $3 AND op = $4")
        .bind(serde_json::to_string(outcome).unwrap_or_default())
        .bind(ctx.saga_id.as_str())
        .bind(ctx.step.as_str())
        .bind(op.as_str())
        .execute(conn)
        .await?;
    Ok(())
}

impl Handler {
    /// Whether this kind of step has operation `op` (a saga step: action and compensate; a TCC
    /// step: try, confirm and cancel). A command for another operation can never be handled.
    pub fn accepts(&self, op: Op) -> bool {
        match self {
            Handler::Saga(_) => matches!(op, Op::Action | Op::Compensate),
            Handler::Tcc(_) => matches!(op, Op::Try | Op::Confirm | Op::Cancel),
            Handler::Refuse { .. } => op.is_forward(),
        }
    }
}

/// Calls the handler's method for `op` on `conn` (shared by the barrier and weak mode).
pub(crate) async fn run_handler(
    handler: &Handler,
    op: Op,
    conn: &mut AnyConnection,
    ctx: &StepContext,
    params: &serde_json::Value,
) -> Result<serde_json::Value, StepError> {
    match (handler, op) {
        (Handler::Saga(h), Op::Action) => h.action(conn, ctx, params).await,
        (Handler::Saga(h), Op::Compensate) => h.compensate(conn, ctx, params).await,
        (Handler::Tcc(h), Op::Try) => h.try_(conn, ctx, params).await,
        (Handler::Tcc(h), Op::Confirm) => h.confirm(conn, ctx, params).await,
        (Handler::Tcc(h), Op::Cancel) => h.cancel(conn, ctx, params).await,
        (Handler::Refuse { code, message }, op) if op.is_forward() => {
            Err(StepError::business(code.clone(), message.clone()))
        }
        _ => Err(StepError::business(
            "wrong_step_kind",
            format!("{op} sent to a step of another kind"),
        )),
    }
}

/// Whether the answer came from the barrier (a duplicate) or from running the handler.
#[derive(Debug, Clone, PartialEq)]
pub struct Executed {
    pub outcome: Outcome,
    pub duplicate: bool,
}

/// Runs `op` of a step behind the barrier, in its own transaction(s) on `pool`.
pub async fn execute(
    pool: &AnyPool,
    handler: &Handler,
    op: Op,
    ctx: &StepContext,
    params: &serde_json::Value,
) -> Result<Executed, sqlx::Error> {
    let mut tx = pool.begin().await?;
    if let Some(outcome) = recorded(&mut tx, ctx, op).await? {
        return Ok(Executed {
            outcome,
            duplicate: true,
        });
    }
    let fresh = |outcome| {
        Ok(Executed {
            outcome,
            duplicate: false,
        })
    };
    if op.is_forward() {
        if recorded(&mut tx, ctx, op.undo()).await?.is_some() {
            let refused = Outcome::Business {
                code: "cancelled_before_run".into(),
                message: format!("{op} refused: its {} already ran", op.undo()),
            };
            record(&mut tx, ctx, op, &refused).await?;
            tx.commit().await?;
            return fresh(refused);
        }
    } else {
        let forward = recorded(&mut tx, ctx, op.forward()).await?;
        let took_effect = matches!(forward, Some(Outcome::Ok { .. }));
        if op.is_undo() && !took_effect {
            // Nothing to undo: the forward operation failed, or never ran (and now never will).
            let null = Outcome::Ok {
                output: serde_json::json!({"null_compensation": true}),
            };
            record(&mut tx, ctx, op, &null).await?;
            tx.commit().await?;
            return fresh(null);
        }
        if op == Op::Confirm && !took_effect {
            return fresh(Outcome::Business {
                code: "not_tried".into(),
                message: "confirm without a successful try".into(),
            });
        }
    }
    // Claim the row first: a concurrent duplicate blocks on it (PostgreSQL) or finds it.
    let pending = Outcome::Retryable {
        message: "in progress".into(),
    };
    if !record(&mut tx, ctx, op, &pending).await? {
        // A concurrent duplicate committed first (under READ COMMITTED the insert waited for it).
        let outcome = recorded(&mut tx, ctx, op).await?.unwrap_or(pending);
        return Ok(Executed {
            outcome,
            duplicate: true,
        });
    }
    let result = run_handler(handler, op, &mut tx, ctx, params).await;
    match result {
        Ok(output) => {
            let outcome = Outcome::Ok { output };
            update(&mut tx, ctx, op, &outcome).await?;
            tx.commit().await?;
            fresh(outcome)
        }
        Err(StepError::Business { code, message }) => {
            // Undo the handler's writes, keep the decision.
            tx.rollback().await?;
            let outcome = Outcome::Business { code, message };
            let mut tx = pool.begin().await?;
            if !record(&mut tx, ctx, op, &outcome).await? {
                let existing = recorded(&mut tx, ctx, op).await?;
                return Ok(Executed {
                    outcome: existing.unwrap_or(outcome),
                    duplicate: true,
                });
            }
            tx.commit().await?;
            fresh(outcome)
        }
        Err(StepError::Retryable(message)) => {
            tx.rollback().await?;
            fresh(Outcome::Retryable { message })
        }
    }
}

/// Retention: deletes up to `batch` barrier rows created more than `keep` ago, oldest first, in
/// one short statement; returns how many went. Call it again while it returns `batch`.
///
/// The barrier knows nothing of saga completion, so rows go by age alone, and `keep` **must
/// exceed the longest a saga can run** (with its retries and an operator's `retry` of a Failed
/// saga): a purged forward row makes a late compensation look like a null compensation (the
/// effect would stay), and a purged null-undo row lets a late forward operation run (a hanging
/// reservation). The engine's default, 7 days, is meant for sagas of minutes to hours.
pub async fn purge(
    pool: &AnyPool,
    keep: std::time::Duration,
    batch: usize,
) -> Result<u64, sqlx::Error> {
    let cutoff = now_ms().saturating_sub(i64::try_from(keep.as_millis()).unwrap_or(i64::MAX));
    let r = sqlx::query(
        "DELETE FROM barrier WHERE (saga_id, step, op) IN \
         (SELECT saga_id, step, op FROM barrier WHERE created_at < $1 ORDER BY created_at LIMIT $2)",
    )
    .bind(cutoff)
    .bind(i64::try_from(batch.max(1)).unwrap_or(i64::MAX))
    .execute(pool)
    .await?;
    Ok(r.rows_affected())
}

/// Purges the barrier until shutdown, on the engine's retention schedule: batches of
/// `cfg.batch` rows with `cfg.pause` between them while there is work, then every
/// [`sagaflow_engine::retention::IDLE`]. Errors are logged and retried. See [`purge`] for what
/// `cfg.keep` must be.
pub async fn retention_loop(
    pool: AnyPool,
    cfg: sagaflow_engine::retention::Retention,
    shutdown: tokio::sync::watch::Receiver<bool>,
) {
    sagaflow_engine::retention::drive("barrier", &cfg, shutdown, || {
        let pool = pool.clone();
        async move { purge(&pool, cfg.keep, cfg.batch).await }
    })
    .await;
}

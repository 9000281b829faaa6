//! The idempotency barrier: one row per (saga, step, operation), written in the same transaction
//! as the handler's effect.
//!
//! * a command whose row exists gets the recorded outcome back and changes nothing;
//! * a forward operation runs its handler and its row is written with the outcome, in the same
//!   transaction; a business failure rolls the effect back and stores the failure (durably:
//!   the engine may rely on "no effect");
//! * an undo (compensate/cancel) whose forward operation never ran records a null undo, and the
//!   late forward operation is then refused — no hanging reservation;
//! * a confirm without a successful try is answered `not_tried` and not recorded;
//! * a transient failure rolls the effect back and records nothing, so a retry runs again.
//!
//! # Batches
//!
//! The runtime hands over a lane's commands in batches ([`execute_batch`]; [`execute`] is a
//! batch of one), and a batch is ONE transaction:
//!
//! 1. one statement reads every barrier row the batch needs (each command's own, and the undo a
//!    forward operation checks or the forward an undo or confirm checks);
//! 2. the commands run in order against those rows plus the decisions the batch has taken so
//!    far, so a batch behaves as if its commands had come one by one: a duplicate inside the
//!    batch is answered from the first one's outcome without running the handler, and an undo
//!    sees the forward operation before it;
//! 3. each handler runs in a savepoint of its own: a business or transient failure, or a
//!    database error, rolls back that command's writes only;
//! 4. one statement inserts the batch's new rows (`ON CONFLICT DO NOTHING`). If one already
//!    existed, a concurrent duplicate (another worker, during a consumer takeover) committed it
//!    after our read: the whole batch is rolled back and redone, and the redo answers that
//!    command from the row (on PostgreSQL the insert waits for the other transaction first, so
//!    the redo sees its outcome);
//! 5. one commit.
//!
//! So a batch costs 2 barrier statements, plus one savepoint round trip per handler that runs
//! (see `Savepoints`), plus one commit, instead of 3 to 4 barrier statements and a commit per command. What a
//! batch guarantees is what each command had alone: every effect applied at most once and
//! together with its barrier row, every recorded outcome final. What it adds: the commands of a
//! batch commit together, so none of their replies is sent before all of them are durable.
//! If the batch's transaction fails as a whole (a lost connection, a failed commit, duplicates
//! that keep racing), each of its commands is run again in a transaction of its own, so one bad
//! command never holds the others back.
//!
//! Handlers must keep every effect inside the connection they are given: a batch may be rolled
//! back and redone, and then its handlers run again.
//!
//! Rows are kept until [`purge`] (driven by [`retention_loop`]) removes them by age: the barrier
//! cannot tell when a saga is over, so the retention must exceed the longest saga.

use std::collections::{BTreeSet, HashMap};

use sagaflow_engine::machine::{Op, Outcome};
use sagaflow_engine::store::now_ms;
use serde_json::json;
use sqlx::{Any, AnyConnection, AnyPool, Row, Transaction};
use tracing::{debug, warn};

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

fn fresh(outcome: Outcome) -> Executed {
    Executed {
        outcome,
        duplicate: false,
    }
}

/// One command of a batch, as the barrier runs it.
#[derive(Debug, Clone, Copy)]
pub struct Job<'a> {
    pub handler: &'a Handler,
    pub op: Op,
    pub ctx: &'a StepContext,
    pub params: &'a serde_json::Value,
    /// False for a command deduplicated elsewhere (weak mode, [`crate::weak`]): it only gets
    /// the savepoint around its handler — no barrier checks and no barrier row.
    pub barrier: bool,
}

/// What a batch came to: one result per job, in order, and how many transactions committed.
///
/// A job's `Err` means its command was not run to a decision (its transaction failed even on
/// its own): answer it as retryable.
#[derive(Debug)]
pub struct BatchRun {
    pub results: Vec<Result<Executed, sqlx::Error>>,
    pub commits: u64,
}

/// How often a transaction is redone when a concurrent duplicate committed one of its barrier
/// rows first. The redo reads that row, so one redo settles a command; more are for a batch
/// whose commands race another worker one after the other.
const REDOS: usize = 3;

/// (saga_id, step, op): the barrier's primary key.
type Key = (String, String, Op);

fn key_of(ctx: &StepContext, op: Op) -> Key {
    (ctx.saga_id.clone(), ctx.step.clone(), op)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    /// Told from the connection itself, so a pool opened by anyone (not only `Store`) works.
    fn of(conn: &AnyConnection) -> Dialect {
        if conn.backend_name().eq_ignore_ascii_case("postgresql") {
            Dialect::Postgres
        } else {
            Dialect::Sqlite
        }
    }
}

// The keys and rows travel as one JSON text parameter, so each statement's text is fixed
// whatever the batch size (one prepared statement, reused).
const LOOKUP_SQLITE: &str = "SELECT saga_id, step, op, outcome FROM barrier \
     WHERE (saga_id, step, op) IN (SELECT json_extract(value, '$.saga_id'), \
     json_extract(value, '$.step'), json_extract(value, '$.op') FROM json_each($1))";
const LOOKUP_POSTGRES: &str = "SELECT saga_id, step, op, outcome FROM barrier \
     WHERE (saga_id, step, op) IN (SELECT saga_id, step, op FROM \
     json_to_recordset($1::json) AS k(saga_id text, step text, op text))";
// `WHERE true`: SQLite needs it to parse `INSERT … SELECT … ON CONFLICT`.
const INSERT_SQLITE: &str = "INSERT INTO barrier (saga_id, step, op, outcome, created_at) \
     SELECT json_extract(value, '$.saga_id'), json_extract(value, '$.step'), \
     json_extract(value, '$.op'), json_extract(value, '$.outcome'), \
     json_extract(value, '$.created_at') FROM json_each($1) WHERE true \
     ON CONFLICT (saga_id, step, op) DO NOTHING RETURNING saga_id";
const INSERT_POSTGRES: &str = "INSERT INTO barrier (saga_id, step, op, outcome, created_at) \
     SELECT saga_id, step, op, outcome, created_at FROM json_to_recordset($1::json) \
     AS x(saga_id text, step text, op text, outcome text, created_at bigint) \
     ON CONFLICT (saga_id, step, op) DO NOTHING RETURNING saga_id";

/// The recorded outcomes of `keys` that exist, in one statement.
async fn lookup(
    conn: &mut AnyConnection,
    keys: &[Key],
) -> Result<HashMap<Key, Outcome>, sqlx::Error> {
    let mut found = HashMap::new();
    if keys.is_empty() {
        return Ok(found);
    }
    let sql = match Dialect::of(conn) {
        Dialect::Sqlite => LOOKUP_SQLITE,
        Dialect::Postgres => LOOKUP_POSTGRES,
    };
    let param: Vec<serde_json::Value> = keys
        .iter()
        .map(|(saga_id, step, op)| json!({"saga_id": saga_id, "step": step, "op": op.as_str()}))
        .collect();
    let rows = sqlx::query(sql)
        .bind(serde_json::Value::Array(param).to_string())
        .fetch_all(&mut *conn)
        .await?;
    for row in rows {
        let op: String = row.try_get("op")?;
        // The table's CHECK admits only known operations.
        let Some(op) = Op::parse(&op) else { continue };
        let text: String = row.try_get("outcome")?;
        let outcome = serde_json::from_str(&text).unwrap_or(Outcome::Business {
            code: "corrupt_barrier".into(),
            message: format!("unreadable barrier outcome: {text}"),
        });
        found.insert((row.try_get("saga_id")?, row.try_get("step")?, op), outcome);
    }
    Ok(found)
}

/// Inserts `rows` in one statement; false when some already existed, i.e. a concurrent
/// duplicate committed one of them after our lookup (on PostgreSQL the insert waited for it).
async fn insert(
    conn: &mut AnyConnection,
    rows: &mut [(Key, Outcome)],
) -> Result<bool, sqlx::Error> {
    if rows.is_empty() {
        return Ok(true);
    }
    // One order for every worker: two batches inserting overlapping keys wait for each other
    // instead of deadlocking.
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    let now = now_ms();
    let param: Vec<serde_json::Value> = rows
        .iter()
        .map(|((saga_id, step, op), outcome)| {
            json!({
                "saga_id": saga_id,
                "step": step,
                "op": op.as_str(),
                "outcome": serde_json::to_string(outcome).unwrap_or_default(),
                "created_at": now,
            })
        })
        .collect();
    let sql = match Dialect::of(conn) {
        Dialect::Sqlite => INSERT_SQLITE,
        Dialect::Postgres => INSERT_POSTGRES,
    };
    let inserted = sqlx::query(sql)
        .bind(serde_json::Value::Array(param).to_string())
        .fetch_all(&mut *conn)
        .await?;
    Ok(inserted.len() == rows.len())
}

/// The savepoint each handler of a batch runs in, at one round trip per handler instead of
/// two: one savepoint name, `sf`, opened before the first handler; after a handler succeeds,
/// `RELEASE SAVEPOINT sf; SAVEPOINT sf` (one simple-protocol message) keeps its writes and
/// opens the next handler's; after it fails, `ROLLBACK TO SAVEPOINT sf` takes its writes back
/// and leaves `sf` open for the next. The savepoint open when the batch ends is released by
/// the commit.
#[derive(Default)]
struct Savepoints {
    open: bool,
}

impl Savepoints {
    /// Runs a job's handler inside the savepoint, so that a failure takes back its own writes
    /// only. `Err` only when the transaction itself is unusable.
    async fn run(
        &mut self,
        tx: &mut Transaction<'_, Any>,
        job: &Job<'_>,
    ) -> Result<Result<serde_json::Value, StepError>, sqlx::Error> {
        if !self.open {
            sqlx::raw_sql("SAVEPOINT sf").execute(&mut **tx).await?;
            self.open = true;
        }
        match run_handler(job.handler, job.op, &mut *tx, job.ctx, job.params).await {
            Ok(output) => match sqlx::raw_sql("RELEASE SAVEPOINT sf; SAVEPOINT sf")
                .execute(&mut **tx)
                .await
            {
                Ok(_) => Ok(Ok(output)),
                // E.g. the handler swallowed a PostgreSQL error, which leaves the transaction
                // aborted: the release fails (and the new savepoint is not made), `sf` is
                // still this handler's. Take its writes back; a retry runs it again.
                Err(e) => {
                    sqlx::raw_sql("ROLLBACK TO SAVEPOINT sf")
                        .execute(&mut **tx)
                        .await?;
                    Ok(Err(StepError::Retryable(format!("database: {e}"))))
                }
            },
            Err(e) => {
                sqlx::raw_sql("ROLLBACK TO SAVEPOINT sf")
                    .execute(&mut **tx)
                    .await?;
                Ok(Err(e))
            }
        }
    }
}

/// One try of a batch in `tx`: the answers, or `None` when a concurrent duplicate won a row
/// (the caller rolls back and redoes).
async fn run_in(
    tx: &mut Transaction<'_, Any>,
    jobs: &[Job<'_>],
) -> Result<Option<Vec<Executed>>, sqlx::Error> {
    // Every row the batch's checks read: each command's own, and its forward or undo.
    let mut wanted = BTreeSet::new();
    for job in jobs.iter().filter(|j| j.barrier) {
        wanted.insert(key_of(job.ctx, job.op));
        let other = if job.op.is_forward() {
            job.op.undo()
        } else {
            job.op.forward()
        };
        wanted.insert(key_of(job.ctx, other));
    }
    let wanted: Vec<Key> = wanted.into_iter().collect();
    // The database's rows plus the batch's own decisions so far: commands of one batch see
    // each other as if they had run one after the other.
    let mut overlay = lookup(tx, &wanted).await?;
    let mut new_rows: Vec<(Key, Outcome)> = Vec::new();
    let mut done = Vec::with_capacity(jobs.len());
    let mut savepoints = Savepoints::default();
    for job in jobs {
        if !job.barrier {
            let outcome = match savepoints.run(tx, job).await? {
                Ok(output) => Outcome::Ok { output },
                Err(StepError::Business { code, message }) => Outcome::Business { code, message },
                Err(StepError::Retryable(message)) => Outcome::Retryable { message },
            };
            done.push(fresh(outcome));
            continue;
        }
        let (op, own) = (job.op, key_of(job.ctx, job.op));
        if let Some(outcome) = overlay.get(&own) {
            done.push(Executed {
                outcome: outcome.clone(),
                duplicate: true,
            });
            continue;
        }
        let decided = if op.is_forward() {
            overlay
                .contains_key(&key_of(job.ctx, op.undo()))
                .then(|| Outcome::Business {
                    code: "cancelled_before_run".into(),
                    message: format!("{op} refused: its {} already ran", op.undo()),
                })
        } else {
            let took_effect = matches!(
                overlay.get(&key_of(job.ctx, op.forward())),
                Some(Outcome::Ok { .. })
            );
            if op == Op::Confirm && !took_effect {
                // Not recorded: a confirm is only sent after a successful try, so this is a
                // stray; if the try's success is recorded later, a retry confirms.
                done.push(fresh(Outcome::Business {
                    code: "not_tried".into(),
                    message: "confirm without a successful try".into(),
                }));
                continue;
            }
            // Nothing to undo: the forward operation failed, or never ran (and now never will).
            (op.is_undo() && !took_effect).then(|| Outcome::Ok {
                output: json!({"null_compensation": true}),
            })
        };
        let outcome = match decided {
            Some(outcome) => outcome,
            None => match savepoints.run(tx, job).await? {
                Ok(output) => Outcome::Ok { output },
                // Its writes are gone with the savepoint; the decision is kept.
                Err(StepError::Business { code, message }) => Outcome::Business { code, message },
                Err(StepError::Retryable(message)) => {
                    done.push(fresh(Outcome::Retryable { message }));
                    continue;
                }
            },
        };
        overlay.insert(own.clone(), outcome.clone());
        new_rows.push((own, outcome.clone()));
        done.push(fresh(outcome));
    }
    if !insert(tx, &mut new_rows).await? {
        return Ok(None);
    }
    Ok(Some(done))
}

/// A batch in one transaction, redone while concurrent duplicates win rows.
async fn transaction(pool: &AnyPool, jobs: &[Job<'_>]) -> Result<Vec<Executed>, sqlx::Error> {
    for _ in 0..REDOS {
        let mut tx = pool.begin().await?;
        match run_in(&mut tx, jobs).await {
            Ok(Some(done)) => {
                tx.commit().await?;
                return Ok(done);
            }
            Ok(None) => {
                debug!(
                    commands = jobs.len(),
                    "a concurrent duplicate committed a barrier row first; redoing the batch"
                );
                tx.rollback().await?;
            }
            Err(e) => {
                let _ = tx.rollback().await;
                return Err(e);
            }
        }
    }
    Err(sqlx::Error::Protocol(format!(
        "barrier: concurrent duplicates won rows of this batch {REDOS} times in a row"
    )))
}

/// Runs a batch of commands behind the barrier in ONE transaction on `pool`, each handler in
/// a savepoint of its own (see the module docs). If that transaction fails as a whole, each
/// command is run again in a transaction of its own, so one bad command never holds the
/// others back.
pub async fn execute_batch(pool: &AnyPool, jobs: &[Job<'_>]) -> BatchRun {
    if jobs.is_empty() {
        return BatchRun {
            results: Vec::new(),
            commits: 0,
        };
    }
    match transaction(pool, jobs).await {
        Ok(done) => BatchRun {
            results: done.into_iter().map(Ok).collect(),
            commits: 1,
        },
        Err(e) if jobs.len() == 1 => BatchRun {
            results: vec![Err(e)],
            commits: 0,
        },
        Err(e) => {
            warn!(commands = jobs.len(), error = %e, "batch transaction failed; running its commands one by one");
            let mut run = BatchRun {
                results: Vec::with_capacity(jobs.len()),
                commits: 0,
            };
            for job in jobs {
                let one = transaction(pool, std::slice::from_ref(job)).await;
                run.commits += u64::from(one.is_ok());
                run.results.push(one.and_then(|mut done| {
                    done.pop()
                        .ok_or_else(|| sqlx::Error::Protocol("barrier: no answer".into()))
                }));
            }
            run
        }
    }
}

/// Runs `op` of a step behind the barrier: a batch of one, in its own transaction on `pool`.
pub async fn execute(
    pool: &AnyPool,
    handler: &Handler,
    op: Op,
    ctx: &StepContext,
    params: &serde_json::Value,
) -> Result<Executed, sqlx::Error> {
    let job = Job {
        handler,
        op,
        ctx,
        params,
        barrier: true,
    };
    execute_batch(pool, &[job])
        .await
        .results
        .pop()
        .unwrap_or_else(|| Err(sqlx::Error::Protocol("barrier: no answer".into())))
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

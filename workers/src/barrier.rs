//! The idempotency barrier: one row per (saga, step, operation), written in the same transaction
//! as the handler's effect.
//!
//! * a command whose row exists gets the recorded outcome back and changes nothing — except
//!   that a business refusal answers only its own attempt and earlier ones: a later attempt
//!   (sent after an operator's retry) runs the handler again, its row replacing the refusal;
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
//! 3. a business or transient failure of a handler, or a database error in it, rolls back that
//!    command's writes only, by savepoints. A batch is first tried without
//!    savepoints ([`Optimism`]). If a handler fails, that try is rolled back whole and the
//!    batch runs again with them, the failed command without its handler: it answers, and
//!    records, the failure of its one run (the handlers before it run twice). That redo, and
//!    the next batches for a while, take a savepoint every [`CAUTIOUS_CHUNK`] handlers; a
//!    failure inside a chunk rolls the chunk back and runs its handlers through the failed one
//!    again, a savepoint each;
//! 4. one statement inserts the batch's new rows (`ON CONFLICT DO NOTHING`). If one already
//!    existed, a concurrent duplicate (another worker, during a consumer takeover) committed it
//!    after our read: the whole batch is rolled back and redone, and the redo answers that
//!    command from the row (on PostgreSQL the insert waits for the other transaction first, so
//!    the redo sees its outcome);
//! 5. one commit.
//!
//! So a batch costs 2 barrier statements, plus (only after a handler failed) one savepoint
//! round trip per chunk of handlers that run (see `Savepoints`), plus one commit, instead of 3 to 4 barrier statements and a commit per command. What a
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
//!
//! # Schema
//!
//! [`MIGRATIONS`] (also [`crate::BARRIER_MIGRATIONS`]) is what the SDK needs in a worker's
//! database and nothing else: `0100_barrier` (the table), `0105_barrier_retention` (the index
//! [`purge`] reads), `0106_deployment` (the `sagaflow_deployment` row that
//! `Store::bind_prefix` keeps: one database, one deployment) and
//! `0107_barrier_check_without_list` (on SQLite the table rebuilt with its `op` CHECK spelled
//! with `=` and `OR`: SQLite builds a temporary b-tree for a CHECK's list of three or more
//! values at every row written; nothing on PostgreSQL). Apply it with your own table's
//! migrations after it, `store.migrate(&[BARRIER_MIGRATIONS, YOURS])`. The same SQL, one file per
//! dialect, is in `migrations/{postgres,sqlite}/` under those names for a migration tool of your
//! own (the first three are `IF NOT EXISTS`, so a later `Store::migrate` over them changes
//! nothing; the fourth rebuilds the table again if run again). The demo services' set
//! ([`crate::services::MIGRATIONS`]) holds these same four entries under the same names: a
//! database migrated with that set takes this one without running anything again, and the
//! other way round only the demo services' tables are added.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU32, Ordering};

use sagaflow_engine::machine::{Op, Outcome};
use sagaflow_engine::store::now_ms;
use sagaflow_engine::store::sql::{Text, rows_per_statement};
use serde_json::json;
use sqlx::{Any, AnyConnection, AnyPool, Row, Transaction};
use tracing::{debug, warn};

use crate::sdk::{StepContext, StepError};

/// One migration: its name (recorded in `schema_migrations`), its SQLite and its PostgreSQL SQL.
type Migration = (&'static str, &'static str, &'static str);

/// The barrier's table.
pub(crate) const BARRIER_TABLE: Migration = (
    "0100_barrier",
    include_str!("../../migrations/sqlite/0100_barrier.sql"),
    include_str!("../../migrations/postgres/0100_barrier.sql"),
);

/// The index barrier retention ([`purge`]) reads.
pub(crate) const BARRIER_RETENTION: Migration = (
    "0105_barrier_retention",
    include_str!("../../migrations/sqlite/0105_barrier_retention.sql"),
    include_str!("../../migrations/postgres/0105_barrier_retention.sql"),
);

/// `sagaflow_deployment`, for `Store::bind_prefix` on a workers' database of its own (the same
/// table as the engine's `0006_deployment`: the two may be one database).
pub(crate) const DEPLOYMENT: Migration = (
    "0106_deployment",
    include_str!("../../migrations/sqlite/0106_deployment.sql"),
    include_str!("../../migrations/postgres/0106_deployment.sql"),
);

/// The barrier's `op` CHECK without an `IN` list: a table rebuild on SQLite (which builds a
/// temporary b-tree for such a list at every row written), nothing on PostgreSQL.
pub(crate) const BARRIER_CHECK: Migration = (
    "0107_barrier_check_without_list",
    include_str!("../../migrations/sqlite/0107_barrier_check_without_list.sql"),
    include_str!("../../migrations/postgres/0107_barrier_check_without_list.sql"),
);

/// The SDK's tables in a worker's database, without any service's (see the module docs,
/// "Schema"): the barrier, its retention index, the deployment binding, and the barrier's
/// CHECK without a list.
pub const MIGRATIONS: sagaflow_engine::store::Migrations =
    &[BARRIER_TABLE, BARRIER_RETENTION, DEPLOYMENT, BARRIER_CHECK];

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
    /// Optimistic tries given up because a handler failed (the batch was then redone with
    /// savepoints).
    pub abandoned: u64,
}

/// Whether a batch first runs its handlers without savepoints.
///
/// Savepoints cost round trips, and most batches do not need them: every handler succeeds.
/// So a batch is first tried without: if every handler succeeds it commits as it is; if one
/// fails, its writes cannot be taken back alone, so the whole try is rolled back and the batch
/// is run again with savepoints, the failed one answered from its one run (the handlers
/// before it run again, which the module docs already ask them to allow). After such a try is given up, the next
/// [`CAUTIOUS_BATCHES`] batches of several commands go straight to savepoints, so a run of
/// business failures costs little. A lone command is always tried without (unless
/// [`Optimism::never`]): its redo runs no handler, which costs no more than its savepoint
/// would have.
///
/// A cautious batch takes a savepoint every [`CAUTIOUS_CHUNK`] handlers, not before each (one
/// round trip per chunk instead of per handler): when a handler fails inside a chunk, the chunk
/// is rolled back to its savepoint and its handlers run again through the failed one, one
/// savepoint each, so the failed one answers from a run alone (see `Savepoints`).
#[derive(Debug)]
pub struct Optimism {
    enabled: bool,
    cautious_left: AtomicU32,
    chunk: usize,
}

/// Batches run with savepoints after an optimistic try was given up.
pub const CAUTIOUS_BATCHES: u32 = 32;

/// Handlers a cautious batch runs under one savepoint. Measured with the bench's faults
/// (`--fail coupon=0.1 --fail payment=0.05`), a savepoint per handler was a quarter of the
/// workers' database round trips. With one failure in ten handlers, a chunk of 4 costs ~1.6
/// round trips a handler instead of 2 (a handler statement each, a savepoint a chunk, and for
/// a chunk with a failure its rollback and the rerun of its handlers through the failed one).
pub const CAUTIOUS_CHUNK: usize = 4;

impl Default for Optimism {
    fn default() -> Self {
        Optimism {
            enabled: true,
            cautious_left: AtomicU32::new(0),
            chunk: CAUTIOUS_CHUNK,
        }
    }
}

impl Optimism {
    /// Always a savepoint before each handler.
    pub fn never() -> Self {
        Optimism {
            enabled: false,
            cautious_left: AtomicU32::new(0),
            chunk: 1,
        }
    }

    /// Always savepoints, one every [`CAUTIOUS_CHUNK`] handlers (what a batch after a given-up
    /// optimistic try does).
    pub fn chunked() -> Self {
        Optimism {
            enabled: false,
            cautious_left: AtomicU32::new(0),
            chunk: CAUTIOUS_CHUNK,
        }
    }

    fn try_now(&self) -> bool {
        self.enabled
            && self
                .cautious_left
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                    left.checked_sub(1)
                })
                .is_err()
    }

    fn abandoned(&self) {
        self.cautious_left
            .store(CAUTIOUS_BATCHES, Ordering::Relaxed);
    }
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

/// Which SQL a connection speaks (the demo services branch on it too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    /// Told from the connection itself, so a pool opened by anyone (not only `Store`) works.
    pub(crate) fn of(conn: &AnyConnection) -> Dialect {
        if conn.backend_name().eq_ignore_ascii_case("postgresql") {
            Dialect::Postgres
        } else {
            Dialect::Sqlite
        }
    }
}

// Keys and rows are bound one value per placeholder (an `IN` list, a multi-row `VALUES`), the
// same text on both dialects, built for the batch's size (see `sagaflow_engine::store::sql`).
// Neither is kept prepared: a generic plan made while the table was still small stays a
// sequential scan for the life of the connection (measured: 8-50 ms per lookup at 50,000 rows,
// against 0.1 ms).

/// Every barrier row of `sagas` sagas (a few each; the caller keeps the keys it wants), by
/// the primary key's first column (see `Text::any_of` for why not a plain `IN` list on
/// PostgreSQL; a row-value `IN` of the wanted keys is exact but took 2 ms to plan).
fn lookup_sql(postgres: bool, sagas: usize) -> String {
    let mut t = Text::new(
        postgres,
        "SELECT saga_id, step, op, outcome FROM barrier WHERE ",
    );
    t.any_of("saga_id", sagas);
    t.sql
}

/// `rows` new rows, those that already exist left as they are; returns the inserted ones.
fn insert_sql(postgres: bool, rows: usize) -> String {
    let mut t = Text::new(
        postgres,
        "INSERT INTO barrier (saga_id, step, op, outcome, created_at) VALUES ",
    );
    t.rows(rows, "(?,?,?,?,?)");
    t.push(" ON CONFLICT (saga_id, step, op) DO NOTHING RETURNING saga_id");
    t.sql
}

/// A row's outcome and the attempt that recorded it. Rows written before the attempt was
/// stored answer every attempt (`u32::MAX`), as they always did.
type Recorded = (Outcome, u32);

/// The recorded outcomes of `keys` that exist, in one statement.
async fn lookup(
    conn: &mut AnyConnection,
    keys: &[Key],
) -> Result<HashMap<Key, Recorded>, sqlx::Error> {
    let mut found = HashMap::new();
    if keys.is_empty() {
        return Ok(found);
    }
    let sagas: BTreeSet<&str> = keys
        .iter()
        .map(|(saga_id, _, _)| saga_id.as_str())
        .collect();
    let sagas: Vec<&str> = sagas.into_iter().collect();
    let wanted: std::collections::HashSet<&Key> = keys.iter().collect();
    let postgres = Dialect::of(conn) == Dialect::Postgres;
    let mut rows = Vec::new();
    for chunk in sagas.chunks(rows_per_statement(1)) {
        // Not kept prepared, so PostgreSQL plans it with the table's current size (see above).
        let mut q =
            sqlx::query(sqlx::AssertSqlSafe(lookup_sql(postgres, chunk.len()))).persistent(false);
        for saga in chunk {
            q = q.bind(*saga);
        }
        rows.extend(q.fetch_all(&mut *conn).await?);
    }
    for row in rows {
        let op: String = row.try_get("op")?;
        // The table's CHECK admits only known operations.
        let Some(op) = Op::parse(&op) else { continue };
        let key: Key = (row.try_get("saga_id")?, row.try_get("step")?, op);
        if !wanted.contains(&key) {
            continue;
        }
        let text: String = row.try_get("outcome")?;
        // Parsed once: the outcome, and the attempt that recorded it beside its fields.
        let value: Option<serde_json::Value> = serde_json::from_str(&text).ok();
        let attempt = value
            .as_ref()
            .and_then(|v| v.get("attempt").and_then(serde_json::Value::as_u64))
            .and_then(|a| u32::try_from(a).ok())
            .unwrap_or(u32::MAX);
        let outcome = value
            .and_then(|v| serde_json::from_value(v).ok())
            .unwrap_or(Outcome::Business {
                code: "corrupt_barrier".into(),
                message: format!("unreadable barrier outcome: {text}"),
            });
        found.insert(key, (outcome, attempt));
    }
    Ok(found)
}

/// Inserts `rows` in one statement; false when some already existed, i.e. a concurrent
/// duplicate committed one of them after our lookup (on PostgreSQL the insert waited for it).
async fn insert(
    conn: &mut AnyConnection,
    rows: &mut [(Key, Recorded)],
) -> Result<bool, sqlx::Error> {
    if rows.is_empty() {
        return Ok(true);
    }
    // One order for every worker: two batches inserting overlapping keys wait for each other
    // instead of deadlocking.
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    let now = now_ms();
    // The outcome as the SDK reads it back, plus the attempt that recorded it.
    let recorded: Vec<String> = rows
        .iter()
        .map(|(_, (outcome, attempt))| {
            let mut recorded = serde_json::to_value(outcome).unwrap_or_default();
            if let Some(fields) = recorded.as_object_mut() {
                fields.insert("attempt".into(), json!(attempt));
            }
            recorded.to_string()
        })
        .collect();
    let postgres = Dialect::of(conn) == Dialect::Postgres;
    let per = rows_per_statement(5);
    let mut inserted = 0;
    for (chunk, recorded) in rows.chunks(per).zip(recorded.chunks(per)) {
        let mut q =
            sqlx::query(sqlx::AssertSqlSafe(insert_sql(postgres, chunk.len()))).persistent(false);
        for (((saga_id, step, op), _), outcome) in chunk.iter().zip(recorded) {
            q = q
                .bind(saga_id.as_str())
                .bind(step.as_str())
                .bind(op.as_str())
                .bind(outcome.as_str())
                .bind(now);
        }
        inserted += q.fetch_all(&mut *conn).await?.len();
    }
    Ok(inserted == rows.len())
}

/// The savepoints the handlers of a batch run in: one savepoint name, `sf`, opened before the
/// first handler; after `chunk` handlers succeeded, `RELEASE SAVEPOINT sf; SAVEPOINT sf` (one
/// simple-protocol message) keeps their writes and opens the next chunk's. After a handler
/// fails, `ROLLBACK TO SAVEPOINT sf` takes back its writes and those of the handlers before
/// it in its chunk, and leaves `sf` open: alone in its savepoint, the failure is its answer;
/// otherwise the batch is [`Handled::Rewind`]ed to the chunk's start and its handlers run
/// again through the failed one, one savepoint each (`careful_until`), so the failed one
/// answers alone (its failure may have been caused by a handler before it that left a
/// PostgreSQL transaction aborted). The savepoint open when the batch ends is released by the
/// commit. With a chunk of 1 (see [`Optimism::never`]) there is a savepoint per handler and
/// never a rewind.
///
/// In the optimistic first try of a batch (see [`Optimism`]) there are no savepoints at all: a
/// handler that fails makes the whole try [`Handled::Abandon`]ed, and the batch is run again
/// with savepoints; in that redo the failed command gets its handler's failure (`answer`)
/// instead of a second run: what is answered is what its one run did.
struct Savepoints {
    open: bool,
    optimistic: bool,
    /// Handlers per savepoint.
    chunk: usize,
    /// Handlers run since the open savepoint was taken.
    since: usize,
    /// Through this job (by index), one savepoint per handler: the rerun after a rewind.
    careful_until: Option<usize>,
    /// Whether a handler ran in this try.
    ran: bool,
    /// The job (by index in the batch) whose handler failed in the optimistic try, and how:
    /// answered so, never run again.
    answer: Option<(usize, StepError)>,
}

/// A handler's answer inside a batch.
enum Handled {
    Done(Result<serde_json::Value, StepError>),
    /// Optimistic try: a handler failed (with this), and without its savepoint its writes
    /// cannot be taken back alone.
    Abandon(StepError),
    /// The chunk was rolled back to its savepoint: go back to where it started (the job the
    /// first handler after the savepoint was run for) and run on from there.
    Rewind,
}

impl Savepoints {
    /// Runs a job's handler inside the savepoint, so that a failure takes back its own writes
    /// only. `Err` only when the transaction itself is unusable.
    async fn run(
        &mut self,
        tx: &mut Transaction<'_, Any>,
        index: usize,
        job: &Job<'_>,
    ) -> Result<Handled, sqlx::Error> {
        if let Some((_, failure)) = self.answer.as_ref().filter(|(i, _)| *i == index) {
            // The redo of the command whose handler failed in the optimistic try: its writes
            // went with that try, its failure is the answer (also when a rewind passes it again).
            return Ok(Handled::Done(Err(failure.clone())));
        }
        self.ran = true;
        if self.optimistic {
            return Ok(
                match run_handler(job.handler, job.op, &mut *tx, job.ctx, job.params).await {
                    Ok(output) => Handled::Done(Ok(output)),
                    Err(e) => Handled::Abandon(e),
                },
            );
        }
        if !self.open {
            sqlx::raw_sql("SAVEPOINT sf").execute(&mut **tx).await?;
            self.open = true;
            self.since = 0;
        }
        let chunk = if self.careful_until.is_some_and(|until| index <= until) {
            1
        } else {
            self.chunk
        };
        let ran = run_handler(job.handler, job.op, &mut *tx, job.ctx, job.params).await;
        self.since += 1;
        let alone = self.since == 1;
        match ran {
            Ok(output) if self.since < chunk => Ok(Handled::Done(Ok(output))),
            Ok(output) => match sqlx::raw_sql("RELEASE SAVEPOINT sf; SAVEPOINT sf")
                .execute(&mut **tx)
                .await
            {
                Ok(_) => {
                    self.since = 0;
                    Ok(Handled::Done(Ok(output)))
                }
                // E.g. a handler swallowed a PostgreSQL error, which leaves the transaction
                // aborted: the release fails (and the new savepoint is not made), `sf` is
                // still this chunk's. Take its writes back: alone, this handler's answer is a
                // retry (which runs it again); in a chunk, the chunk runs again one savepoint
                // per handler, which finds the one.
                Err(e) => {
                    self.rollback(tx).await?;
                    if alone {
                        return Ok(Handled::Done(Err(StepError::Retryable(format!(
                            "database: {e}"
                        )))));
                    }
                    self.careful_until = Some(index);
                    Ok(Handled::Rewind)
                }
            },
            Err(e) => {
                self.rollback(tx).await?;
                if alone {
                    return Ok(Handled::Done(Err(e)));
                }
                // Run again alone, it answers for itself: its failure may have been another's
                // doing (a handler before it that swallowed a PostgreSQL error aborts the
                // transaction, and the next statement fails).
                self.careful_until = Some(index);
                Ok(Handled::Rewind)
            }
        }
    }

    /// Back to the open savepoint, which stays open: nothing run since.
    async fn rollback(&mut self, tx: &mut Transaction<'_, Any>) -> Result<(), sqlx::Error> {
        sqlx::raw_sql("ROLLBACK TO SAVEPOINT sf")
            .execute(&mut **tx)
            .await?;
        self.since = 0;
        Ok(())
    }

    /// At the batch's end, before its last statements and the commit, finds a handler that
    /// left the transaction aborted (it swallowed a PostgreSQL error; PostgreSQL answers the
    /// COMMIT of an aborted transaction with a rollback, not an error): with savepoints, by
    /// releasing the last chunk's, when handlers ran under it since the last release (false:
    /// it failed, and the chunk was rolled back to run again a savepoint per handler, through
    /// `last`); in the optimistic try, when no barrier statement follows (a batch of weak
    /// commands), by a `SELECT 1` (an error: the batch then runs again one command at a time).
    async fn settle(
        &mut self,
        tx: &mut Transaction<'_, Any>,
        last: usize,
        inserting: bool,
    ) -> Result<bool, sqlx::Error> {
        if self.optimistic {
            if self.ran && !inserting {
                sqlx::raw_sql("SELECT 1").execute(&mut **tx).await?;
            }
            return Ok(true);
        }
        if !self.open || self.since == 0 {
            return Ok(true);
        }
        match sqlx::raw_sql("RELEASE SAVEPOINT sf")
            .execute(&mut **tx)
            .await
        {
            Ok(_) => {
                self.open = false;
                self.since = 0;
                Ok(true)
            }
            Err(_) => {
                self.rollback(tx).await?;
                self.careful_until = Some(last);
                Ok(false)
            }
        }
    }

    /// Whether no handler ran since the open savepoint (or none is open yet): where a rewind
    /// comes back to.
    fn at_savepoint(&self) -> bool {
        !self.optimistic && self.since == 0
    }
}

/// What the batch had decided when a savepoint's first handler was about to run: a rewind
/// starts again from here.
struct Checkpoint {
    index: usize,
    overlay: HashMap<Key, Recorded>,
    new_rows: usize,
    superseded: usize,
    done: usize,
}

/// What a batch has decided so far: the overlay, the new rows, the superseded refusals, the
/// answers.
type Decided<'r> = (
    &'r HashMap<Key, Recorded>,
    &'r Vec<(Key, Recorded)>,
    &'r Vec<Key>,
    &'r Vec<Executed>,
);

/// Runs a job's handler in the savepoints, first marking where a rewind comes back to if this
/// is the first handler of a savepoint (commands between a savepoint and that handler ran
/// none, so replaying them decides the same).
async fn run_marked(
    savepoints: &mut Savepoints,
    checkpoint: &mut Option<Checkpoint>,
    tx: &mut Transaction<'_, Any>,
    (index, job): (usize, &Job<'_>),
    (overlay, new_rows, superseded, done): Decided<'_>,
) -> Result<Handled, sqlx::Error> {
    if savepoints.at_savepoint() {
        *checkpoint = Some(Checkpoint {
            index,
            overlay: overlay.clone(),
            new_rows: new_rows.len(),
            superseded: superseded.len(),
            done: done.len(),
        });
    }
    savepoints.run(tx, index, job).await
}

/// How one try of a batch ended.
enum Try {
    Done(Vec<Executed>),
    /// A concurrent duplicate won a barrier row: roll back and redo.
    Raced,
    /// Optimistic try: a handler failed (with this): roll back and redo.
    Abandoned(usize, StepError),
}

/// One try of a batch in `tx`.
async fn run_in(
    tx: &mut Transaction<'_, Any>,
    jobs: &[Job<'_>],
    optimistic: bool,
    chunk: usize,
    answer: Option<(usize, StepError)>,
) -> Result<Try, sqlx::Error> {
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
    let mut new_rows: Vec<(Key, Recorded)> = Vec::new();
    // Refusals that a later attempt supersedes: deleted before the new rows go in.
    let mut superseded: Vec<Key> = Vec::new();
    let mut done = Vec::with_capacity(jobs.len());
    let mut savepoints = Savepoints {
        open: false,
        optimistic,
        chunk: chunk.max(1),
        since: 0,
        careful_until: None,
        ran: false,
        answer,
    };
    let mut checkpoint: Option<Checkpoint> = None;
    let mut index = 0;
    loop {
        macro_rules! rewind {
            () => {{
                let Some(cp) = checkpoint.take() else {
                    return Err(sqlx::Error::Protocol(
                        "barrier: a chunk rolled back without its start".into(),
                    ));
                };
                overlay = cp.overlay;
                new_rows.truncate(cp.new_rows);
                superseded.truncate(cp.superseded);
                done.truncate(cp.done);
                index = cp.index;
                continue;
            }};
        }
        if index == jobs.len() {
            let inserting = !new_rows.is_empty() || !superseded.is_empty();
            if savepoints
                .settle(tx, index.saturating_sub(1), inserting)
                .await?
            {
                break;
            }
            rewind!();
        }
        let job = &jobs[index];
        // The job's handler, in the savepoints (a rewind's mark taken first).
        macro_rules! run {
            () => {
                run_marked(
                    &mut savepoints,
                    &mut checkpoint,
                    tx,
                    (index, job),
                    (&overlay, &new_rows, &superseded, &done),
                )
                .await?
            };
        }
        if !job.barrier {
            let handled = match run!() {
                Handled::Done(handled) => handled,
                Handled::Abandon(failure) => return Ok(Try::Abandoned(index, failure)),
                Handled::Rewind => rewind!(),
            };
            let outcome = match handled {
                Ok(output) => Outcome::Ok { output },
                Err(StepError::Business { code, message }) => Outcome::Business { code, message },
                Err(StepError::Retryable(message)) => Outcome::Retryable { message },
            };
            done.push(fresh(outcome));
            index += 1;
            continue;
        }
        let (op, own) = (job.op, key_of(job.ctx, job.op));
        match overlay.get(&own) {
            // A business refusal answers its own attempt and the ones before it (duplicates,
            // stragglers), not a later attempt: an operator's retry must reach the handler, or
            // a refused step could never be retried to success. (A later attempt may also be
            // one the engine sent after a timeout while the refusal was on its way; the engine
            // therefore takes a refusal only from the latest attempt it sent.)
            Some((Outcome::Business { .. }, recorded)) if job.ctx.attempt > *recorded => {
                overlay.remove(&own);
                superseded.push(own.clone());
            }
            Some((outcome, _)) => {
                done.push(Executed {
                    outcome: outcome.clone(),
                    duplicate: true,
                });
                index += 1;
                continue;
            }
            None => {}
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
                Some((Outcome::Ok { .. }, _))
            );
            if op == Op::Confirm && !took_effect {
                // Not recorded: a confirm is only sent after a successful try, so this is a
                // stray; if the try's success is recorded later, a retry confirms.
                done.push(fresh(Outcome::Business {
                    code: "not_tried".into(),
                    message: "confirm without a successful try".into(),
                }));
                index += 1;
                continue;
            }
            // Nothing to undo: the forward operation failed, or never ran (and now never will).
            (op.is_undo() && !took_effect).then(|| Outcome::Ok {
                output: json!({"null_compensation": true}),
            })
        };
        let outcome = match decided {
            Some(outcome) => outcome,
            None => match run!() {
                Handled::Abandon(failure) => return Ok(Try::Abandoned(index, failure)),
                Handled::Rewind => rewind!(),
                Handled::Done(Ok(output)) => Outcome::Ok { output },
                // Its writes are gone with the savepoint; the decision is kept.
                Handled::Done(Err(StepError::Business { code, message })) => {
                    Outcome::Business { code, message }
                }
                Handled::Done(Err(StepError::Retryable(message))) => {
                    done.push(fresh(Outcome::Retryable { message }));
                    index += 1;
                    continue;
                }
            },
        };
        let recorded = (outcome.clone(), job.ctx.attempt);
        overlay.insert(own.clone(), recorded.clone());
        new_rows.push((own, recorded));
        done.push(fresh(outcome));
        index += 1;
    }
    for (saga_id, step, op) in &superseded {
        sqlx::query("DELETE FROM barrier WHERE saga_id = $1 AND step = $2 AND op = $3")
            .bind(saga_id.as_str())
            .bind(step.as_str())
            .bind(op.as_str())
            .execute(&mut **tx)
            .await?;
    }
    if !insert(tx, &mut new_rows).await? {
        return Ok(Try::Raced);
    }
    Ok(Try::Done(done))
}

/// A batch in one transaction, redone while concurrent duplicates win rows.
async fn transaction(
    pool: &AnyPool,
    jobs: &[Job<'_>],
    optimism: &Optimism,
    abandoned: &mut u64,
) -> Result<Vec<Executed>, sqlx::Error> {
    // When a handler fails in the optimistic try, the redo does not run it again (a second
    // run could answer otherwise: a transient failure gone, a refusal that depended on the
    // moment): it answers, and records, the failure of the one run, whose writes went with
    // the first try. Only the handlers before it run twice. A lone command (a quiet lane's)
    // is therefore always tried without its savepoint, which saves two round trips when its
    // handler succeeds and costs no more than the savepoint when it fails, so a lone failure
    // does not make the next batches cautious.
    let lone = jobs.len() == 1;
    let mut optimistic = if lone {
        optimism.enabled
    } else {
        optimism.try_now()
    };
    let mut answer: Option<(usize, StepError)> = None;
    let mut redos = 0;
    loop {
        let mut tx = pool.begin().await?;
        match run_in(&mut tx, jobs, optimistic, optimism.chunk, answer.clone()).await {
            Ok(Try::Done(done)) => {
                tx.commit().await?;
                return Ok(done);
            }
            Ok(Try::Abandoned(index, failure)) => {
                debug!(
                    commands = jobs.len(),
                    "a handler failed in the optimistic try; redoing the batch"
                );
                tx.rollback().await?;
                if !lone {
                    optimism.abandoned();
                }
                answer = Some((index, failure));
                *abandoned += 1;
                optimistic = false;
            }
            Ok(Try::Raced) => {
                debug!(
                    commands = jobs.len(),
                    "a concurrent duplicate committed a barrier row first; redoing the batch"
                );
                tx.rollback().await?;
                redos += 1;
                if redos == REDOS {
                    return Err(sqlx::Error::Protocol(format!(
                        "barrier: concurrent duplicates won rows of this batch {REDOS} times in a row"
                    )));
                }
            }
            Err(e) => {
                let _ = tx.rollback().await;
                return Err(e);
            }
        }
    }
}

/// Runs a batch of commands behind the barrier in ONE transaction on `pool`, a failed
/// handler's writes taken back alone by savepoints (see the module docs). If that transaction fails as a whole, each
/// command is run again in a transaction of its own, so one bad command never holds the
/// others back.
pub async fn execute_batch(pool: &AnyPool, jobs: &[Job<'_>]) -> BatchRun {
    execute_batch_with(pool, jobs, &Optimism::default()).await
}

/// [`execute_batch`], with the worker's [`Optimism`] deciding whether the batch first runs
/// without savepoints.
pub async fn execute_batch_with(pool: &AnyPool, jobs: &[Job<'_>], optimism: &Optimism) -> BatchRun {
    let mut run = BatchRun {
        results: Vec::with_capacity(jobs.len()),
        commits: 0,
        abandoned: 0,
    };
    if jobs.is_empty() {
        return run;
    }
    match transaction(pool, jobs, optimism, &mut run.abandoned).await {
        Ok(done) => {
            run.results = done.into_iter().map(Ok).collect();
            run.commits = 1;
        }
        Err(e) if jobs.len() == 1 => run.results = vec![Err(e)],
        Err(e) => {
            warn!(commands = jobs.len(), error = %e, "batch transaction failed; running its commands one by one");
            for job in jobs {
                let one = transaction(
                    pool,
                    std::slice::from_ref(job),
                    optimism,
                    &mut run.abandoned,
                )
                .await;
                run.commits += u64::from(one.is_ok());
                run.results.push(one.and_then(|mut done| {
                    done.pop()
                        .ok_or_else(|| sqlx::Error::Protocol("barrier: no answer".into()))
                }));
            }
        }
    }
    run
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

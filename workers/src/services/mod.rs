//! The four demo order services, each owning its own tables (what `sagaflow dev`, `sagaflow
//! worker` and `sagaflow bench` run; a service of your own is a program of its own, see
//! `examples/shipping/`).
//!
//! | module | tables (migration `01xx`) | handlers |
//! |---|---|---|
//! | [`payment`] | `payment_accounts`, `payment_ledger` (0101) | `Charge` (charge / refund), `Refund` (refund) |
//! | [`coupon`] | `coupons`, `coupon_ledger` (0102) | `Coupon` (TCC freeze / use / unfreeze), `Restore` (restore) |
//! | [`points`] | `points_balances`, `points_ledger` (0103) | `Grant` (grant / revoke), `Revoke` (revoke / grant) |
//! | [`gmv`] | `campaign_gmv`, `gmv_ledger` (0104) | `Add` (add / subtract), `Subtract` (subtract / add) |
//!
//! Every effect is written together with a ledger row keyed by `(saga_id, step, kind)`. The
//! ledger is what a compensation reverses (exactly what its action did, nothing if the action
//! never ran) and what `check` reads to prove the services' invariants after a run: each module
//! has a `seed` that creates demo data and a `check` that lists invariant violations against the
//! [`Outcome`]s of the finished sagas (an empty list means all is well).
//!
//! # One statement per operation on PostgreSQL
//!
//! A handler runs inside the worker's batch transaction, and on PostgreSQL each of its statements
//! is a round trip, so the common path of every operation is ONE statement: a data-modifying
//! CTE that
//!
//! 1. reads this (saga, step)'s ledger row of the operation's kind (`done`),
//! 2. applies the effect — an `UPDATE` or upsert guarded by `NOT EXISTS (SELECT 1 FROM done)`
//!    and by the business condition (enough money, coupon available, …),
//! 3. inserts the ledger row from the effect's `RETURNING` (`ON CONFLICT DO NOTHING`), and
//! 4. reports what happened: the recorded values a replay answers with, and how many rows the
//!    effect (`applied`) and the ledger insert (`recorded`) wrote (`Ran::read`).
//!
//! So a replay changes nothing, a refused effect writes nothing (no ledger row to roll back),
//! and only a refusal takes a second statement, to read what its message says (and an
//! order-refund whose account another transaction changed meanwhile, see `payment`). The parts of
//! one statement share one snapshot: a duplicate that commits after it is not seen by `done`,
//! but its ledger row makes our insert do nothing, and an effect applied without its row is an
//! error (`first_entry`) that rolls the effect back; the retry is then a replay.
//!
//! # One call per operation on SQLite
//!
//! On SQLite a statement is no round trip, but every sqlx call is a hand-off to the driver's
//! worker thread and back, and in the embedded mode (`sagaflow dev`: the engine and the four
//! services on one connection) that thread, busy mostly with hand-offs, is what a saga waits
//! for. So there too the common path of every operation is ONE call. SQLite has no
//! data-modifying CTEs, but sqlx's SQLite driver runs every statement of a query string in one
//! command on its worker thread, binding the same arguments to `$N` in each; so an operation is
//! three statements in one string (see [`report_sqlite`]):
//!
//! 1. the effect, guarded as on PostgreSQL by the absence of this (saga, step)'s ledger row of
//!    the operation's kind and by the business condition;
//! 2. the ledger row, `INSERT … SELECT … WHERE changes() = 1`: written only if the effect
//!    changed a row (`changes()` is the count of the last INSERT, UPDATE or DELETE that
//!    completed — while this statement runs, the effect's); an undo's is the original row
//!    copied (negated, where it holds a delta);
//! 3. the report, a `SELECT`: `changes()` again, now the ledger insert's (`applied`: 1 when
//!    this call applied the effect and recorded it), and what the ledger row says after the
//!    call (`entry`): the answer of a replay, which applied nothing (`Ran::sqlite`). An undo
//!    reports its own row only: there (undone now or before) or not (nothing to undo).
//!
//! So, as on PostgreSQL, a replay and a refusal write nothing, and only a refusal takes a
//! second call, to read what its message says. There is no snapshot to reason about: SQLite
//! has one writer per database, and the effect, a write even when it changes no row, takes the
//! write lock for the rest of the transaction (or fails, with a transient error), so the three
//! statements see each other's rows and no one else's. A batch that is redone runs the
//! operation again only after the first try was rolled back (`barrier`, "Batches").

use std::collections::HashMap;

use serde_json::Value;

use sqlx::any::{AnyArguments, AnyRow};
use sqlx::query::Query;
use sqlx::{Any, AnyConnection, Row};

use crate::barrier::Dialect;
use crate::sdk::{StepContext, StepError, cents, param_i64};

pub mod coupon;
pub mod gmv;
pub mod payment;
pub mod points;

/// The service names, as the saga definitions' `service:` fields spell them.
pub const SERVICES: &[&str] = &["payment", "coupon", "points", "gmv"];

/// The saga definition names `check` knows the expected effects of (`sagas/*.yaml`).
pub const ORDER_PAID: &str = "order-paid";
pub const ORDER_REFUND: &str = "order-refund";

/// A finished saga, as `check` needs to know it.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub saga_id: String,
    /// The definition name, e.g. `order-paid`.
    pub saga: String,
    pub state: OutcomeState,
    /// The saga's input (`order_id`, `user_id`, `amount`, …).
    pub input: Value,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutcomeState {
    Completed,
    Compensated,
    /// Compensation could not succeed: an operator has to look at it.
    Failed,
}

impl std::fmt::Display for OutcomeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            OutcomeState::Completed => "completed",
            OutcomeState::Compensated => "compensated",
            OutcomeState::Failed => "failed",
        })
    }
}

impl Outcome {
    /// `saga 0193… (order o-17)`: how violation messages name a saga.
    pub(crate) fn label(&self) -> String {
        match self.input_str("order_id") {
            Some(order) => format!("saga {} (order {order})", self.saga_id),
            None => format!("saga {}", self.saga_id),
        }
    }

    pub(crate) fn input_str(&self, name: &str) -> Option<&str> {
        self.input.get(name).and_then(Value::as_str)
    }

    /// A required string input, or the violation that says it is missing.
    pub(crate) fn require_str(&self, service: &str, name: &str) -> Result<&str, String> {
        self.input_str(name)
            .ok_or_else(|| format!("{service}: {} has no `{name}` in its input", self.label()))
    }

    /// A required money input as cents, or the violation that says it is unreadable.
    pub(crate) fn require_cents(&self, service: &str, name: &str) -> Result<i64, String> {
        self.input
            .get(name)
            .and_then(|v| cents(v).ok())
            .ok_or_else(|| {
                format!(
                    "{service}: {} has no readable amount `{name}` in its input",
                    self.label()
                )
            })
    }

    /// A required integer input, or the violation that says it is unreadable.
    pub(crate) fn require_i64(&self, service: &str, name: &str) -> Result<i64, String> {
        param_i64(&self.input, name).map_err(|_| {
            format!(
                "{service}: {} has no integer `{name}` in its input",
                self.label()
            )
        })
    }
}

/// The finished sagas by id.
pub(crate) struct Finished<'a>(HashMap<&'a str, &'a Outcome>);

impl<'a> Finished<'a> {
    pub(crate) fn new(outcomes: &'a [Outcome]) -> Self {
        Self(outcomes.iter().map(|o| (o.saga_id.as_str(), o)).collect())
    }

    pub(crate) fn get(&self, saga_id: &str) -> Option<&'a Outcome> {
        self.0.get(saga_id).copied()
    }

    /// The violation for effects left by a saga that did not end Completed or Compensated:
    /// a Failed one (an operator must settle it) or one that is not among the finished sagas
    /// at all (still running, or unknown). `None` for a saga that ended cleanly.
    pub(crate) fn unsettled(&self, service: &str, saga_id: &str, left: &str) -> Option<String> {
        match self.get(saga_id) {
            Some(o) if o.state == OutcomeState::Failed => Some(format!(
                "{service}: {} failed (needs an operator) and left {left}",
                o.label()
            )),
            Some(_) => None,
            None => Some(format!(
                "{service}: saga {saga_id} is not among the finished sagas (still running, or \
                 unknown) but left {left}"
            )),
        }
    }
}

/// Cents as a human-readable amount: `12990` → `129.90`.
pub(crate) fn money(cents: i64) -> String {
    let sign = if cents < 0 { "-" } else { "" };
    let abs = cents.unsigned_abs();
    format!("{sign}{}.{:02}", abs / 100, abs % 100)
}

/// A required money parameter as cents; names the parameter when it is missing.
pub(crate) fn param_cents(params: &Value, name: &str) -> Result<i64, StepError> {
    match params.get(name) {
        Some(v) => cents(v),
        None => Err(StepError::business(
            "bad_params",
            format!("parameter `{name}` is missing"),
        )),
    }
}

/// A required non-negative integer parameter (points can be 0, never negative).
pub(crate) fn param_count(params: &Value, name: &str) -> Result<i64, StepError> {
    let n = param_i64(params, name)?;
    if n < 0 {
        return Err(StepError::business(
            "bad_params",
            format!("parameter `{name}` must not be negative, got {n}"),
        ));
    }
    Ok(n)
}

/// Whether the service statements take their PostgreSQL form (one statement per operation,
/// see the module docs) or their SQLite form (one call of several statements).
pub(crate) fn on_postgres(conn: &AnyConnection) -> bool {
    Dialect::of(conn) == Dialect::Postgres
}

/// What an operation did to its effect and its ledger row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ran<T = ()> {
    /// Applied now, and recorded.
    Applied,
    /// This (saga, step) had recorded it already: nothing was done. What the ledger says.
    Replay(T),
    /// The effect's condition did not hold: nothing was written.
    Refused,
}

impl<T> Ran<T> {
    /// Reads a one-statement operation's report (see the module docs): `replay` is the value
    /// its `done` part found, if any; otherwise the `applied` and `recorded` counts say whether
    /// it applied the effect with its ledger row, or refused.
    pub(crate) fn read(
        row: &AnyRow,
        replay: Option<T>,
        ledger: &str,
        ctx: &StepContext,
        kind: &str,
    ) -> Result<Ran<T>, sqlx::Error> {
        if let Some(recorded) = replay {
            return Ok(Ran::Replay(recorded));
        }
        if row.try_get::<i64, _>("applied")? == 0 {
            return Ok(Ran::Refused);
        }
        first_entry(row.try_get::<i64, _>("recorded")? == 1, ledger, ctx, kind)?;
        Ok(Ran::Applied)
    }
}

impl<T> Ran<T> {
    /// Reads a SQLite operation's report (see the module docs): `applied` says whether this
    /// call applied the effect and recorded it; if not, `entry`, what the ledger row says, is
    /// there for a replay and absent for a refusal.
    pub(crate) fn sqlite(row: &AnyRow, entry: Option<T>) -> Result<Ran<T>, sqlx::Error> {
        Ok(match (row.try_get::<i64, _>("applied")?, entry) {
            (1, _) => Ran::Applied,
            (_, Some(recorded)) => Ran::Replay(recorded),
            (_, None) => Ran::Refused,
        })
    }
}

/// Runs a SQLite operation — its statements in one query string, which sqlx's SQLite driver
/// runs as ONE command on its worker thread (see the module docs) — and returns its report, the
/// one row its last statement returns.
///
/// Read with `fetch_all`, never `fetch_one` or `fetch_optional`: those ask the worker for the
/// first row only, so it stops running statements there, and the `Any` driver's take the first
/// result of the first statement — the effect's row count, not a row — for "no row" and stop
/// listening, whether or not the worker ran the rest.
pub(crate) async fn report_sqlite(
    conn: &mut AnyConnection,
    operation: Query<'_, Any, AnyArguments>,
) -> Result<AnyRow, sqlx::Error> {
    let mut rows = operation.fetch_all(&mut *conn).await?;
    match rows.len() {
        1 => Ok(rows.remove(0)),
        n => Err(sqlx::Error::Protocol(format!(
            "an operation's statements returned {n} rows, not its one report"
        ))),
    }
}

/// Whether a ledger row was written, where a replay was already ruled out: an entry that is
/// there already (a concurrent duplicate committed it first) is an error, transient, so the
/// effect is rolled back and the retry sees the replay it is.
pub(crate) fn first_entry(
    inserted: bool,
    ledger: &str,
    ctx: &StepContext,
    kind: &str,
) -> Result<(), sqlx::Error> {
    if inserted {
        return Ok(());
    }
    Err(sqlx::Error::Protocol(format!(
        "{ledger} ledger: ({}, {}, {kind}) is already recorded",
        ctx.saga_id, ctx.step
    )))
}

/// An effect that nothing refused (an upsert, or an order-refund on SQLite whose account and
/// sum allowed it) that applied nothing: the statement and the code disagree, which no retry
/// mends either — but it is reported, not hidden.
pub(crate) fn nothing_applied(ledger: &str, ctx: &StepContext, kind: &str) -> sqlx::Error {
    sqlx::Error::Protocol(format!(
        "{ledger} ledger: ({}, {}, {kind}) applied nothing",
        ctx.saga_id, ctx.step
    ))
}

/// The statements that undo a ledger entry once, in their two forms (see the module docs):
/// PostgreSQL's one statement reports `replayed` (the reversal's delta, when it was recorded
/// before), `original` (the entry's delta, absent when there was none) and the `applied` /
/// `recorded` counts; SQLite's call reports `reversal`, the reversal entry's delta.
pub(crate) struct Reversal {
    pub ledger: &'static str,
    pub postgres: &'static str,
    pub sqlite: &'static str,
}

impl Reversal {
    /// Undoes this (saga, step)'s `kind` entry with its `reversal` entry, once; nothing if the
    /// entry never happened. Returns by how much the total changed (0 when nothing was undone,
    /// and on a replay what the first undo changed).
    pub(crate) async fn undo(
        &self,
        conn: &mut AnyConnection,
        ctx: &StepContext,
        kind: &str,
        reversal: &str,
    ) -> Result<i64, StepError> {
        let postgres = on_postgres(conn);
        let operation = sqlx::query(if postgres { self.postgres } else { self.sqlite })
            .bind(&ctx.saga_id)
            .bind(&ctx.step)
            .bind(kind)
            .bind(reversal);
        if postgres {
            let row = operation.fetch_one(&mut *conn).await?;
            if let Some(delta) = row.try_get::<Option<i64>, _>("replayed")? {
                return Ok(delta);
            }
            let Some(original) = row.try_get::<Option<i64>, _>("original")? else {
                return Ok(0);
            };
            return match Ran::read(&row, None, self.ledger, ctx, reversal)? {
                Ran::Applied | Ran::Replay(()) => Ok(-original),
                Ran::Refused => Err(nothing_applied(self.ledger, ctx, reversal).into()),
            };
        }
        // Undone now or before, the reversal entry says by how much; without one there was
        // nothing to undo (an entry to undo always is).
        let row = report_sqlite(conn, operation).await?;
        Ok(row.try_get::<Option<i64>, _>("reversal")?.unwrap_or(0))
    }
}

/// The handler's answer to a compensation the definition says never happens (`compensation:
/// none`): if the engine ever sends one, the saga must stop for an operator, not pretend.
pub(crate) fn irreversible(what: &str) -> StepError {
    StepError::business("irreversible", format!("{what} cannot be undone"))
}

/// What the unit tests of every service share: a database on either backend (in-memory SQLite
/// behind the `Any` driver, or a PostgreSQL database of the test's own), running one operation
/// in its own transaction the way the SDK does (commit on success, roll back on error), and
/// reading a saga's ledger rows.
#[cfg(test)]
pub(crate) mod testing {
    use serde_json::Value;
    use sqlx::AnyPool;
    use sqlx::any::AnyPoolOptions;

    use super::{Outcome, OutcomeState};
    use crate::sdk::{SagaStep, StepContext, StepError, TccStep};

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(crate) enum Backend {
        Sqlite,
        Postgres,
    }

    /// A migration of a service's tables, in both dialects: (SQLite, PostgreSQL).
    pub(crate) type Migration = (&'static str, &'static str);

    /// One test's database. A PostgreSQL one is a database of its own, dropped when this is
    /// dropped (also when the test panics); it is named like the root tests' databases
    /// (`sagaflow_t<pid>_…`), so their sweep drops it if the process is killed first.
    pub(crate) struct TestDb {
        pub(crate) pool: AnyPool,
        /// The database's URL, to connect to it otherwise.
        pub(crate) url: String,
        /// (admin URL, database name) to drop it with.
        admin: Option<(String, String)>,
    }

    /// The server the PostgreSQL tests use: `SAGAFLOW_TEST_DATABASE_URL`, else the local one.
    pub(crate) fn postgres_url() -> String {
        std::env::var("SAGAFLOW_TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
    }

    impl TestDb {
        /// A fresh database with `migrations` applied; `None` (the test is skipped) when
        /// PostgreSQL is unreachable, unless `CI=true`, where that fails the test.
        pub(crate) async fn new(
            backend: Backend,
            test: &str,
            migrations: &[Migration],
        ) -> Option<TestDb> {
            sqlx::any::install_default_drivers();
            let db = match backend {
                Backend::Sqlite => TestDb {
                    pool: AnyPoolOptions::new()
                        .max_connections(1)
                        .connect("sqlite::memory:")
                        .await
                        .expect("in-memory sqlite"),
                    url: "sqlite::memory:".to_owned(),
                    admin: None,
                },
                Backend::Postgres => Self::postgres(test).await?,
            };
            for (sqlite, postgres) in migrations {
                let sql = match backend {
                    Backend::Sqlite => *sqlite,
                    Backend::Postgres => *postgres,
                };
                sqlx::raw_sql(sql)
                    .execute(&db.pool)
                    .await
                    .expect("migration");
            }
            Some(db)
        }

        async fn postgres(test: &str) -> Option<TestDb> {
            use sqlx::Connection;
            let url = postgres_url();
            let mut admin = match sqlx::AnyConnection::connect(&url).await {
                Ok(c) => c,
                Err(e) if std::env::var("CI").as_deref() != Ok("true") => {
                    eprintln!("skipping {test} on PostgreSQL: {url} is unreachable: {e}");
                    return None;
                }
                Err(e) => panic!("PostgreSQL at {url} is unreachable (CI=true): {e}"),
            };
            let short: String = test.chars().take(30).collect();
            let name = format!(
                "sagaflow_t{}_w{short}_{:08x}",
                std::process::id(),
                fastrand::u32(..)
            );
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                .execute(&mut admin)
                .await
                .expect("create test database");
            let _ = admin.close().await;
            let (base, _) = url.split_once('?').unwrap_or((&url, ""));
            let (server, _) = base
                .rsplit_once('/')
                .expect("a database URL names a database");
            let db_url = format!("{server}/{name}");
            // Handlers, the checks and a concurrent test's second transaction and observer.
            let pool = AnyPoolOptions::new()
                .max_connections(3)
                .connect(&db_url)
                .await
                .expect("connect to the test database");
            Some(TestDb {
                pool,
                url: db_url,
                admin: Some((url, name)),
            })
        }
    }

    impl Drop for TestDb {
        fn drop(&mut self) {
            let Some((admin, name)) = self.admin.take() else {
                return;
            };
            // Drop cannot await: on a thread of its own, which forces the pool's connections out.
            let _ = std::thread::spawn(move || {
                use sqlx::Connection;
                let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    return;
                };
                rt.block_on(async {
                    if let Ok(mut c) = sqlx::AnyConnection::connect(&admin).await {
                        let drop = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                        if let Err(e) = sqlx::raw_sql(sqlx::AssertSqlSafe(drop))
                            .execute(&mut c)
                            .await
                        {
                            eprintln!("could not drop test database {name}: {e}");
                        }
                        let _ = c.close().await;
                    }
                });
            })
            .join();
        }
    }

    /// Runs each named `async fn test(pool: &AnyPool)` of the calling test module on both
    /// backends, as `test::sqlite` and `test::postgres`, on a database from that module's
    /// `async fn setup(backend: Backend, test: &str) -> Option<TestDb>`.
    macro_rules! on_both_backends {
        ($($test:ident),* $(,)?) => {$(
            mod $test {
                use crate::services::testing::Backend;

                #[tokio::test]
                async fn sqlite() {
                    let db = super::setup(Backend::Sqlite, stringify!($test))
                        .await
                        .expect("SQLite is always there");
                    super::$test(&db.pool).await;
                }

                #[tokio::test]
                async fn postgres() {
                    if let Some(db) = super::setup(Backend::Postgres, stringify!($test)).await {
                        super::$test(&db.pool).await;
                    }
                }
            }
        )*};
    }
    pub(crate) use on_both_backends;

    /// The kinds of the ledger rows `saga_id` has in `ledger` (a table name), sorted.
    pub(crate) async fn kinds(pool: &AnyPool, ledger: &str, saga_id: &str) -> Vec<String> {
        let sql = format!("SELECT kind FROM {ledger} WHERE saga_id = $1 ORDER BY kind");
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .bind(saga_id)
            .fetch_all(pool)
            .await
            .expect("ledger rows")
    }

    /// A business failure's (code, message); panics on anything else.
    pub(crate) fn refusal(r: Result<Value, StepError>) -> (String, String) {
        match r {
            Err(StepError::Business { code, message }) => (code, message),
            other => panic!("expected a business failure, got {other:?}"),
        }
    }

    #[derive(Clone, Copy)]
    pub(crate) enum Op<'h> {
        Action(&'h dyn SagaStep),
        Compensate(&'h dyn SagaStep),
        Try(&'h dyn TccStep),
        Confirm(&'h dyn TccStep),
        Cancel(&'h dyn TccStep),
    }

    /// Runs `op` for (saga, step) in one transaction.
    pub(crate) async fn run(
        pool: &AnyPool,
        op: Op<'_>,
        saga_id: &str,
        step: &str,
        params: &Value,
    ) -> Result<Value, StepError> {
        run_counted(pool, op, saga_id, step, params, None).await.0
    }

    /// Counts what a backend is sent, for the tests that pin how many calls an operation costs:
    /// [`RoundTrips`] on PostgreSQL's wire, [`SqliteCalls`] at sqlx's SQLite worker.
    pub(crate) trait Calls {
        /// The calls counted so far.
        fn count(&self) -> u64;
        /// Whether a transaction's `COMMIT` or `ROLLBACK` is counted as a call. When it is not,
        /// a count is read after it, when every call made in the transaction is in.
        fn counts_transaction_end(&self) -> bool;
    }

    /// [`run`], and how many calls `calls` counted the handler making (0 without a counter):
    /// the transaction's `BEGIN` and `COMMIT` (or `ROLLBACK`) are not counted.
    pub(crate) async fn run_counted(
        pool: &AnyPool,
        op: Op<'_>,
        saga_id: &str,
        step: &str,
        params: &Value,
        calls: Option<&dyn Calls>,
    ) -> (Result<Value, StepError>, u64) {
        let count = || calls.map_or(0, |c| c.count());
        let ends_counted = calls.is_some_and(|c| c.counts_transaction_end());
        let mut tx = pool.begin().await.expect("begin");
        let before = count();
        let result = call(&mut tx, op, saga_id, step, params).await;
        let in_handler = count();
        if result.is_ok() {
            tx.commit().await.expect("commit");
        } else {
            tx.rollback().await.expect("rollback");
        }
        let made = if ends_counted { in_handler } else { count() } - before;
        (result, made)
    }

    /// Runs `op` for (saga, step) on `conn`, in whatever transaction it is in.
    pub(crate) async fn call(
        conn: &mut sqlx::AnyConnection,
        op: Op<'_>,
        saga_id: &str,
        step: &str,
        params: &Value,
    ) -> Result<Value, StepError> {
        let operation = match op {
            Op::Action(_) => "action",
            Op::Compensate(_) => "compensate",
            Op::Try(_) => "try",
            Op::Confirm(_) => "confirm",
            Op::Cancel(_) => "cancel",
        };
        let ctx = StepContext {
            saga_id: saga_id.to_owned(),
            step: step.to_owned(),
            operation: operation.to_owned(),
            attempt: 1,
            key: params
                .get("order_id")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned(),
        };
        match op {
            Op::Action(h) => h.action(conn, &ctx, params).await,
            Op::Compensate(h) => h.compensate(conn, &ctx, params).await,
            Op::Try(h) => h.try_(conn, &ctx, params).await,
            Op::Confirm(h) => h.confirm(conn, &ctx, params).await,
            Op::Cancel(h) => h.cancel(conn, &ctx, params).await,
        }
    }

    /// A TCP relay between a test and PostgreSQL that counts the client's round trips: the
    /// messages that make the server answer with `ReadyForQuery` — `Sync`, which ends an
    /// extended-protocol exchange (a prepared statement's bind and execute, or its first
    /// parse and describe), and `Query`, a simple-protocol one. A message is counted before it
    /// is passed on, so its count is in by the time the client has its answer.
    pub(crate) struct RoundTrips {
        /// `url` with the relay in place of the server, and without TLS (which it could not
        /// read).
        pub(crate) url: String,
        count: std::sync::Arc<std::sync::atomic::AtomicU64>,
        accept: tokio::task::JoinHandle<()>,
    }

    impl RoundTrips {
        pub(crate) async fn relay(url: &str) -> RoundTrips {
            use std::sync::Arc;
            use std::sync::atomic::AtomicU64;
            // postgres://[user[:password]@]host[:port]/database[?options]
            let (scheme, rest) = url.split_once("://").expect("a URL");
            let (authority, path) = rest.split_once('/').expect("a URL with a database");
            let (userinfo, server) = match authority.rsplit_once('@') {
                Some((user, server)) => (format!("{user}@"), server.to_owned()),
                None => (String::new(), authority.to_owned()),
            };
            let server = if server.contains(':') {
                server
            } else {
                format!("{server}:5432")
            };
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("listen");
            let port = listener.local_addr().expect("local address").port();
            let separator = if path.contains('?') { '&' } else { '?' };
            let count = Arc::new(AtomicU64::new(0));
            let counted = count.clone();
            let accept = tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    let Ok(upstream) = tokio::net::TcpStream::connect(&server).await else {
                        continue;
                    };
                    // Each message is passed on at once (no Nagle delay on a round trip).
                    let _ = (client.set_nodelay(true), upstream.set_nodelay(true));
                    let (from_client, mut to_client) = client.into_split();
                    let (mut from_server, to_server) = upstream.into_split();
                    tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut from_server, &mut to_client).await;
                    });
                    tokio::spawn(Self::pump(from_client, to_server, counted.clone()));
                }
            });
            RoundTrips {
                url: format!(
                    "{scheme}://{userinfo}127.0.0.1:{port}/{path}{separator}sslmode=disable"
                ),
                count,
                accept,
            }
        }

        /// Passes the client's messages on, one by one, counting the round trips.
        async fn pump(
            mut from: tokio::net::tcp::OwnedReadHalf,
            mut to: tokio::net::tcp::OwnedWriteHalf,
            count: std::sync::Arc<std::sync::atomic::AtomicU64>,
        ) -> std::io::Result<()> {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            // The startup messages have no type byte: an SSL or GSS encryption request (which
            // the server declines, as the URL asks for none) and the startup message itself.
            let mut startup = true;
            loop {
                let mut message = Vec::new();
                let kind = if startup {
                    None
                } else {
                    let kind = from.read_u8().await?;
                    message.push(kind);
                    Some(kind)
                };
                let len = from.read_u32().await?;
                message.extend_from_slice(&len.to_be_bytes());
                let mut body = vec![0; (len as usize).saturating_sub(4)];
                from.read_exact(&mut body).await?;
                message.extend_from_slice(&body);
                match kind {
                    None => {
                        let code = body.get(..4).map(|c| [c[0], c[1], c[2], c[3]]);
                        let code = code.map(u32::from_be_bytes);
                        startup = matches!(code, Some(80_877_103 | 80_877_104));
                    }
                    Some(b'S' | b'Q') => {
                        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                    Some(_) => {}
                }
                to.write_all(&message).await?;
            }
        }

        pub(crate) fn count(&self) -> u64 {
            self.count.load(std::sync::atomic::Ordering::SeqCst)
        }
    }

    impl Drop for RoundTrips {
        fn drop(&mut self) {
            self.accept.abort();
        }
    }

    impl Calls for RoundTrips {
        fn count(&self) -> u64 {
            RoundTrips::count(self)
        }

        /// `COMMIT` is a round trip of its own.
        fn counts_transaction_end(&self) -> bool {
            true
        }
    }

    /// Counts the calls that reach the worker thread of one SQLite connection of sqlx's: the
    /// driver logs each query it runs (tracing target `sqlx::query`) once, on that thread, when
    /// it is done — one event per call, however many statements its text holds, so an
    /// operation's statements sent as two calls count two. A process-wide subscriber
    /// ([`sqlite_calls`]) counts the events per thread (every connection has a thread of its
    /// own, so tests running beside this one do not add to its count), and a marker query run
    /// on the connection tells which thread is its. `BEGIN`, `COMMIT` and `ROLLBACK` are not
    /// queries to the driver (not logged); the thread runs a connection's commands in order,
    /// so a count read after the transaction's end has every call of the transaction in.
    pub(crate) struct SqliteCalls {
        thread: std::thread::ThreadId,
    }

    impl SqliteCalls {
        /// The counter of the connection `pool` (of one connection) hands out.
        pub(crate) async fn of(pool: &AnyPool) -> SqliteCalls {
            use std::sync::atomic::{AtomicU32, Ordering};
            static MARKERS: AtomicU32 = AtomicU32::new(0);
            sqlite_calls::install();
            let marker = format!(
                "{}{}",
                sqlite_calls::MARKER,
                MARKERS.fetch_add(1, Ordering::Relaxed)
            );
            let mut conn = pool.acquire().await.expect("the connection");
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!("SELECT '{marker}'")))
                .execute(&mut *conn)
                .await
                .expect("the marker query");
            let thread = sqlite_calls::thread_of(&marker)
                .expect("sqlx logged the marker query on the connection's worker thread");
            SqliteCalls { thread }
        }
    }

    impl Calls for SqliteCalls {
        fn count(&self) -> u64 {
            sqlite_calls::count(self.thread)
        }

        fn counts_transaction_end(&self) -> bool {
            false
        }
    }

    /// The process-wide tracing subscriber behind [`SqliteCalls`]: it takes sqlx's query
    /// events and nothing else, and counts them per thread.
    pub(crate) mod sqlite_calls {
        use std::collections::HashMap;
        use std::sync::{LazyLock, Mutex, Once};
        use std::thread::ThreadId;

        use tracing::field::{Field, Visit};
        use tracing::level_filters::LevelFilter;
        use tracing::subscriber::Interest;
        use tracing::{Event, Metadata, Subscriber, span};

        /// How a marker query's text starts.
        pub(crate) const MARKER: &str = "sagaflow-sqlite-calls-marker-";

        #[derive(Default)]
        struct Counts {
            per_thread: HashMap<ThreadId, u64>,
            /// The thread each marker query was logged on.
            markers: HashMap<String, ThreadId>,
        }

        static COUNTS: LazyLock<Mutex<Counts>> = LazyLock::new(Mutex::default);

        /// Sets the subscriber as the process's default, once (nothing else in this test
        /// binary sets one).
        pub(crate) fn install() {
            static ONCE: Once = Once::new();
            ONCE.call_once(|| {
                tracing::subscriber::set_global_default(QueryEvents)
                    .expect("no other global tracing subscriber in the workers' tests");
            });
        }

        pub(crate) fn count(thread: ThreadId) -> u64 {
            let counts = COUNTS.lock().expect("counts");
            counts.per_thread.get(&thread).copied().unwrap_or(0)
        }

        pub(crate) fn thread_of(marker: &str) -> Option<ThreadId> {
            COUNTS.lock().expect("counts").markers.get(marker).copied()
        }

        struct QueryEvents;

        /// An event's fields as text, to find a marker in.
        struct Text(String);

        impl Visit for Text {
            fn record_debug(&mut self, _: &Field, value: &dyn std::fmt::Debug) {
                self.0.push_str(&format!("{value:?} "));
            }
        }

        impl Subscriber for QueryEvents {
            fn register_callsite(&self, metadata: &'static Metadata<'static>) -> Interest {
                if self.enabled(metadata) {
                    Interest::always()
                } else {
                    Interest::never()
                }
            }

            fn enabled(&self, metadata: &Metadata<'_>) -> bool {
                // Not only events: `tracing::enabled!`, which sqlx asks first, is a hint.
                metadata.target() == "sqlx::query"
            }

            fn max_level_hint(&self) -> Option<LevelFilter> {
                Some(LevelFilter::TRACE)
            }

            fn new_span(&self, _: &span::Attributes<'_>) -> span::Id {
                span::Id::from_u64(1)
            }

            fn record(&self, _: &span::Id, _: &span::Record<'_>) {}

            fn record_follows_from(&self, _: &span::Id, _: &span::Id) {}

            fn event(&self, event: &Event<'_>) {
                let thread = std::thread::current().id();
                let mut text = Text(String::new());
                event.record(&mut text);
                let mut counts = COUNTS.lock().expect("counts");
                *counts.per_thread.entry(thread).or_default() += 1;
                if let Some(at) = text.0.find(MARKER) {
                    let marker: String = text.0[at..]
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                        .collect();
                    counts.markers.insert(marker, thread);
                }
            }

            fn enter(&self, _: &span::Id) {}

            fn exit(&self, _: &span::Id) {}
        }
    }

    pub(crate) fn outcome(saga_id: &str, saga: &str, state: OutcomeState, input: Value) -> Outcome {
        Outcome {
            saga_id: saga_id.to_owned(),
            saga: saga.to_owned(),
            state,
            input,
        }
    }

    /// Asserts that some violation mentions every one of `needles`.
    pub(crate) fn assert_reported(violations: &[String], needles: &[&str]) {
        assert!(
            violations
                .iter()
                .any(|v| needles.iter().all(|n| v.contains(n))),
            "no violation mentions all of {needles:?}; got {violations:#?}"
        );
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use sqlx::AnyPool;

    use super::testing::{Backend, Migration, Op, TestDb, on_both_backends, outcome, run};
    use super::*;
    use crate::sdk::StepError;

    const SERVICES_MIGRATIONS: [Migration; 4] = [
        (
            include_str!("../../../migrations/sqlite/0101_payment.sql"),
            include_str!("../../../migrations/postgres/0101_payment.sql"),
        ),
        (
            include_str!("../../../migrations/sqlite/0102_coupon.sql"),
            include_str!("../../../migrations/postgres/0102_coupon.sql"),
        ),
        (
            include_str!("../../../migrations/sqlite/0103_points.sql"),
            include_str!("../../../migrations/postgres/0103_points.sql"),
        ),
        (
            include_str!("../../../migrations/sqlite/0104_gmv.sql"),
            include_str!("../../../migrations/postgres/0104_gmv.sql"),
        ),
    ];

    async fn setup(backend: Backend, test: &str) -> Option<TestDb> {
        TestDb::new(backend, test, &SERVICES_MIGRATIONS).await
    }

    on_both_backends!(order_flows);

    /// One order paid and later refunded, one order compensated after its coupon was refused,
    /// one refused for lack of funds — through all four services, then every check: the same
    /// scenario on every backend proves the SQL is portable.
    async fn order_flows(pool: &AnyPool) {
        let mut conn = pool.acquire().await.unwrap();
        payment::seed(&mut conn, &[("u1".into(), 100_000), ("u2".into(), 100)])
            .await
            .unwrap();
        coupon::seed(
            &mut conn,
            &[("c1".into(), "u1".into()), ("c2".into(), "u2".into())],
        )
        .await
        .unwrap();
        points::seed(&mut conn, &[("u1".into(), 100)])
            .await
            .unwrap();
        gmv::seed(&mut conn, &["spring".into()]).await.unwrap();
        drop(conn);

        let order = |order_id: &str, user: &str, amount: &str, coupon: &str| {
            json!({ "order_id": order_id, "user_id": user, "amount": amount, "coupon_id": coupon,
                    "points": 13, "campaign_id": "spring" })
        };
        let (a, b, c) = (
            order("o-1", "u1", "129.90", "c1"),
            order("o-2", "u1", "20", "c1"),
            order("o-3", "u2", "5", "c2"),
        );
        let pay = |o: &Value| json!({ "account": o["user_id"], "amount": o["amount"], "order_id": o["order_id"] });
        let pts =
            |o: &Value| json!({ "user_id": o["user_id"], "points": o["points"], "reason": "test" });

        // order-paid A: everything succeeds.
        run(pool, Op::Action(&payment::Charge), "A", "payment", &pay(&a))
            .await
            .unwrap();
        run(pool, Op::Try(&coupon::Coupon), "A", "coupon", &a)
            .await
            .unwrap();
        run(pool, Op::Action(&points::Grant), "A", "points", &pts(&a))
            .await
            .unwrap();
        run(pool, Op::Action(&gmv::Add), "A", "gmv", &a)
            .await
            .unwrap();
        run(pool, Op::Confirm(&coupon::Coupon), "A", "coupon", &a)
            .await
            .unwrap();

        // order-paid B: its coupon is taken, so what did happen is compensated.
        run(pool, Op::Action(&payment::Charge), "B", "payment", &pay(&b))
            .await
            .unwrap();
        run(pool, Op::Action(&points::Grant), "B", "points", &pts(&b))
            .await
            .unwrap();
        run(pool, Op::Action(&gmv::Add), "B", "gmv", &b)
            .await
            .unwrap();
        run(pool, Op::Try(&coupon::Coupon), "B", "coupon", &b)
            .await
            .unwrap_err();
        run(pool, Op::Compensate(&gmv::Add), "B", "gmv", &b)
            .await
            .unwrap();
        run(
            pool,
            Op::Compensate(&points::Grant),
            "B",
            "points",
            &pts(&b),
        )
        .await
        .unwrap();
        run(
            pool,
            Op::Compensate(&payment::Charge),
            "B",
            "payment",
            &pay(&b),
        )
        .await
        .unwrap();

        // order-paid C: refused at the charge, nothing to undo.
        run(pool, Op::Action(&payment::Charge), "C", "payment", &pay(&c))
            .await
            .unwrap_err();

        // order-refund D of order A.
        run(pool, Op::Action(&points::Revoke), "D", "points", &pts(&a))
            .await
            .unwrap();
        run(pool, Op::Action(&gmv::Subtract), "D", "gmv", &a)
            .await
            .unwrap();
        run(pool, Op::Action(&payment::Refund), "D", "refund", &pay(&a))
            .await
            .unwrap();
        run(pool, Op::Action(&coupon::Restore), "D", "coupon", &a)
            .await
            .unwrap();

        let outcomes = [
            outcome("A", ORDER_PAID, OutcomeState::Completed, a),
            outcome("B", ORDER_PAID, OutcomeState::Compensated, b),
            outcome("C", ORDER_PAID, OutcomeState::Compensated, c),
            outcome(
                "D",
                ORDER_REFUND,
                OutcomeState::Completed,
                order("o-1", "u1", "129.90", "c1"),
            ),
        ];
        let mut conn = pool.acquire().await.unwrap();
        let mut violations = payment::check(&mut conn, &outcomes).await.unwrap();
        violations.extend(coupon::check(&mut conn, &outcomes).await.unwrap());
        violations.extend(points::check(&mut conn, &outcomes).await.unwrap());
        violations.extend(gmv::check(&mut conn, &outcomes).await.unwrap());
        assert_eq!(violations, Vec::<String>::new());

        // Paid and refunded, compensated, refused: every balance is back where it started.
        let one = |sql: &'static str| sqlx::query_scalar::<_, i64>(sql);
        let balance = one("SELECT balance FROM payment_accounts WHERE account = 'u1'");
        assert_eq!(balance.fetch_one(&mut *conn).await.unwrap(), 100_000);
        let points = one("SELECT points FROM points_balances WHERE user_id = 'u1'");
        assert_eq!(points.fetch_one(&mut *conn).await.unwrap(), 100);
        let gmv = one("SELECT gmv FROM campaign_gmv WHERE campaign_id = 'spring'");
        assert_eq!(gmv.fetch_one(&mut *conn).await.unwrap(), 0);
        let state =
            sqlx::query_scalar::<_, String>("SELECT state FROM coupons WHERE coupon_id = 'c1'");
        assert_eq!(state.fetch_one(&mut *conn).await.unwrap(), "available");
    }

    /// Runs every path of every operation once, for sagas and rows named `p-…` (seeded on
    /// `seed`, run on `pool`, counted by `calls`): (label, calls counted, calls wanted) each.
    /// Every common path — a first run, a replay, an undo, an undo of nothing, an undo
    /// replayed — is wanted as ONE call, and a refusal at most two (the operation, then what
    /// its message needs).
    async fn count_operations(
        seed: &AnyPool,
        pool: &AnyPool,
        p: &str,
        calls: &dyn super::testing::Calls,
    ) -> Vec<(&'static str, u64, u64)> {
        let mut conn = seed.acquire().await.unwrap();
        payment::seed(
            &mut conn,
            &[(format!("{p}-u1"), 100_000), (format!("{p}-u2"), 100)],
        )
        .await
        .unwrap();
        let coupons: Vec<(String, String)> = (1..=3)
            .map(|i| (format!("{p}-c{i}"), format!("{p}-u1")))
            .collect();
        coupon::seed(&mut conn, &coupons).await.unwrap();
        points::seed(&mut conn, &[(format!("{p}-u1"), 100)])
            .await
            .unwrap();
        drop(conn);

        let pay = |account: &str, amount: &str| {
            json!({ "account": format!("{p}-{account}"), "amount": amount,
                    "order_id": format!("{p}-o1") })
        };
        let coupon = |coupon: &str| {
            json!({ "coupon_id": format!("{p}-{coupon}"), "user_id": format!("{p}-u1"),
                    "order_id": format!("{p}-o1") })
        };
        let pts = |n: i64| json!({ "user_id": format!("{p}-u1"), "points": n, "reason": "t" });
        let gmv = json!({ "campaign_id": format!("{p}-spring"), "amount": "10" });
        let none = json!({});
        #[rustfmt::skip]
        let steps: Vec<(&'static str, u64, bool, Op<'static>, &str, Value)> = vec![
            ("charge", 1, true, Op::Action(&payment::Charge), "A", pay("u1", "10")),
            ("charge, replayed", 1, true, Op::Action(&payment::Charge), "A", pay("u1", "10")),
            ("charge refused (insufficient funds)", 2, false, Op::Action(&payment::Charge), "B", pay("u2", "5")),
            ("refund", 1, true, Op::Action(&payment::Refund), "R", pay("u1", "4")),
            ("refund, replayed", 1, true, Op::Action(&payment::Refund), "R", pay("u1", "4")),
            ("refund refused (more than charged)", 1, false, Op::Action(&payment::Refund), "R2", pay("u1", "7")),
            ("refund refused (unknown account)", 1, false, Op::Action(&payment::Refund), "R3", pay("u9", "1")),
            ("charge of another saga", 1, true, Op::Action(&payment::Charge), "C", pay("u1", "3")),
            ("charge reversal", 1, true, Op::Compensate(&payment::Charge), "C", none.clone()),
            ("charge reversal, replayed", 1, true, Op::Compensate(&payment::Charge), "C", none.clone()),
            ("charge reversal, nothing charged", 1, true, Op::Compensate(&payment::Charge), "N", none.clone()),
            ("freeze", 1, true, Op::Try(&coupon::Coupon), "A", coupon("c1")),
            ("freeze, replayed", 1, true, Op::Try(&coupon::Coupon), "A", coupon("c1")),
            ("freeze refused (frozen by another saga)", 2, false, Op::Try(&coupon::Coupon), "B", coupon("c1")),
            ("use", 1, true, Op::Confirm(&coupon::Coupon), "A", none.clone()),
            ("use, replayed", 1, true, Op::Confirm(&coupon::Coupon), "A", none.clone()),
            ("use refused (nothing frozen)", 1, false, Op::Confirm(&coupon::Coupon), "N", none.clone()),
            ("freeze of another saga", 1, true, Op::Try(&coupon::Coupon), "C", coupon("c2")),
            ("unfreeze", 1, true, Op::Cancel(&coupon::Coupon), "C", none.clone()),
            ("unfreeze, replayed", 1, true, Op::Cancel(&coupon::Coupon), "C", none.clone()),
            ("unfreeze, nothing frozen", 1, true, Op::Cancel(&coupon::Coupon), "N", none.clone()),
            ("restore", 1, true, Op::Action(&coupon::Restore), "R", coupon("c1")),
            ("restore, replayed", 1, true, Op::Action(&coupon::Restore), "R", coupon("c1")),
            ("restore refused (not used by the order)", 2, true, Op::Action(&coupon::Restore), "R2", coupon("c3")),
            ("grant", 1, true, Op::Action(&points::Grant), "A", pts(10)),
            ("grant, replayed", 1, true, Op::Action(&points::Grant), "A", pts(10)),
            ("grant reversal", 1, true, Op::Compensate(&points::Grant), "A", none.clone()),
            ("grant reversal, replayed", 1, true, Op::Compensate(&points::Grant), "A", none.clone()),
            ("grant reversal, nothing granted", 1, true, Op::Compensate(&points::Grant), "N", none.clone()),
            ("revoke", 1, true, Op::Action(&points::Revoke), "R", pts(5)),
            ("revoke, replayed", 1, true, Op::Action(&points::Revoke), "R", pts(5)),
            ("revoke refused (insufficient points)", 2, false, Op::Action(&points::Revoke), "R2", pts(1_000)),
            ("revoke reversal", 1, true, Op::Compensate(&points::Revoke), "R", none.clone()),
            ("revoke reversal, replayed", 1, true, Op::Compensate(&points::Revoke), "R", none.clone()),
            ("revoke reversal, nothing revoked", 1, true, Op::Compensate(&points::Revoke), "N", none.clone()),
            ("add", 1, true, Op::Action(&gmv::Add), "A", gmv.clone()),
            ("add, replayed", 1, true, Op::Action(&gmv::Add), "A", gmv.clone()),
            ("add reversal", 1, true, Op::Compensate(&gmv::Add), "A", none.clone()),
            ("add reversal, replayed", 1, true, Op::Compensate(&gmv::Add), "A", none.clone()),
            ("add reversal, nothing added", 1, true, Op::Compensate(&gmv::Add), "N", none.clone()),
            ("subtract", 1, true, Op::Action(&gmv::Subtract), "R", gmv.clone()),
            ("subtract, replayed", 1, true, Op::Action(&gmv::Subtract), "R", gmv.clone()),
            ("subtract reversal", 1, true, Op::Compensate(&gmv::Subtract), "R", none.clone()),
            ("subtract reversal, replayed", 1, true, Op::Compensate(&gmv::Subtract), "R", none.clone()),
            ("subtract reversal, nothing subtracted", 1, true, Op::Compensate(&gmv::Subtract), "N", none.clone()),
        ];
        let mut got = Vec::new();
        for (label, want, succeeds, op, saga, params) in steps {
            let saga = format!("{p}-{saga}");
            let (result, made) =
                super::testing::run_counted(pool, op, &saga, "s", &params, Some(calls)).await;
            assert_eq!(result.is_ok(), succeeds, "{label}: {result:?}");
            got.push((label, made, want));
        }
        got
    }

    /// Fails with the whole table unless every operation made the calls it is wanted to.
    fn assert_counts(what: &str, got: &[(&str, u64, u64)]) {
        let table: Vec<String> = got
            .iter()
            .map(|(label, made, want)| format!("{made} (want {want}): {label}"))
            .collect();
        assert!(
            got.iter().all(|(_, made, want)| made == want),
            "{what} per operation:\n{}",
            table.join("\n")
        );
    }

    /// Every operation's common path is ONE round trip on PostgreSQL, and a refusal at most
    /// two ([`count_operations`]); counted on the wire by a relay, so a second statement, or a
    /// statement that is not kept prepared (two round trips), fails it.
    #[tokio::test]
    async fn every_operation_is_one_round_trip_on_postgres() {
        use super::testing::RoundTrips;
        let Some(db) = setup(Backend::Postgres, "round_trips").await else {
            return;
        };
        let relay = RoundTrips::relay(&db.url).await;
        // One connection, so the warm-up prepares the statements the count then uses.
        let pool = sqlx::any::AnyPoolOptions::new()
            .max_connections(1)
            .connect(&relay.url)
            .await
            .expect("connect through the relay");

        // Run twice: for sagas and rows named `warm-…` first (preparing each statement on the
        // connection), then for `count-…`, counted.
        count_operations(&db.pool, &pool, "warm", &relay).await;
        let got = count_operations(&db.pool, &pool, "count", &relay).await;
        assert_counts("round trips", &got);
        // The control: the relay counts a prepared statement once, two statements twice.
        let mut conn = pool.acquire().await.unwrap();
        let one = || sqlx::query("SELECT 1");
        one().execute(&mut *conn).await.unwrap();
        let before = relay.count();
        one().execute(&mut *conn).await.unwrap();
        assert_eq!(relay.count() - before, 1, "one statement");
        one().execute(&mut *conn).await.unwrap();
        one().execute(&mut *conn).await.unwrap();
        assert_eq!(relay.count() - before, 3, "two statements more");
        drop(conn);
        pool.close().await;
    }

    /// Every operation's common path is ONE call to sqlx's SQLite worker thread, and a refusal
    /// at most two ([`count_operations`]): what the embedded mode's one connection spends its
    /// thread on is the hand-off per call, not the statements. Counted by the driver's own
    /// query log ([`super::testing::SqliteCalls`]), so an operation sent as two calls fails it.
    #[tokio::test]
    async fn every_operation_is_one_call_on_sqlite() {
        use super::testing::{Calls, SqliteCalls};
        let db = setup(Backend::Sqlite, "calls")
            .await
            .expect("SQLite is always there");
        let calls = SqliteCalls::of(&db.pool).await;
        let got = count_operations(&db.pool, &db.pool, "count", &calls).await;
        assert_counts("calls", &got);
        // The control: two statements in one call count once, two calls twice.
        let mut conn = db.pool.acquire().await.unwrap();
        let before = calls.count();
        sqlx::query("SELECT 1; SELECT 2")
            .fetch_all(&mut *conn)
            .await
            .unwrap();
        assert_eq!(calls.count() - before, 1, "two statements, one call");
        for _ in 0..2 {
            sqlx::query("SELECT 1").fetch_all(&mut *conn).await.unwrap();
        }
        assert_eq!(calls.count() - before, 3, "two calls more");
    }

    /// One operation: (operation, saga, step, params).
    type Call<'h> = (Op<'h>, &'h str, &'h str, Value);

    /// Runs `first` in a transaction and keeps it open; runs `second` in another, which waits
    /// for `first`'s locks; commits `first` once `second` waits (PostgreSQL says so), and
    /// returns `second`'s answer, its transaction committed if it succeeded, rolled back if not.
    async fn behind(pool: &AnyPool, first: Call<'_>, second: Call<'_>) -> Result<Value, StepError> {
        use super::testing::call;
        let mut a = pool.begin().await.unwrap();
        let (op, saga, step, params) = &first;
        call(&mut a, *op, saga, step, params)
            .await
            .expect("the first one succeeds");
        let mut b = pool.begin().await.unwrap();
        let (op, saga, step, params) = &second;
        let waiting = async {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            loop {
                let waiters: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM pg_stat_activity \
                     WHERE datname = current_database() AND wait_event_type = 'Lock'",
                )
                .fetch_one(pool)
                .await
                .unwrap();
                if waiters > 0 {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "the second one never waited"
                );
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            a.commit().await.unwrap();
        };
        let (result, ()) = tokio::join!(call(&mut b, *op, saga, step, params), waiting);
        if result.is_ok() {
            b.commit().await.unwrap();
        } else {
            b.rollback().await.unwrap();
        }
        result
    }

    async fn one(pool: &AnyPool, sql: &'static str) -> i64 {
        sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
    }

    /// Two runs of one operation at once, without the barrier that normally keeps them apart:
    /// the second's statement started before the first committed, so it did not see its ledger
    /// row, applied its effect, and found the row there when it came to write it — a transient
    /// error that takes its effect back. So the effect happens once, and the retry is a replay.
    #[tokio::test]
    async fn a_concurrent_duplicate_applies_its_effect_once_on_postgres() {
        let Some(db) = setup(Backend::Postgres, "concurrent_duplicate").await else {
            return;
        };
        let pool = &db.pool;
        let mut conn = pool.acquire().await.unwrap();
        payment::seed(&mut conn, &[("u1".into(), 10_000)])
            .await
            .unwrap();
        drop(conn);

        let pay = json!({ "account": "u1", "amount": "10", "order_id": "o-1" });
        let charge = || (Op::Action(&payment::Charge), "s1", "payment", pay.clone());
        let second = behind(pool, charge(), charge()).await;
        assert!(
            matches!(&second, Err(StepError::Retryable(m)) if m.contains("already recorded")),
            "{second:?}"
        );
        let balance = "SELECT balance FROM payment_accounts WHERE account = 'u1'";
        assert_eq!(one(pool, balance).await, 9_000, "debited once");
        let (op, saga, step, params) = charge();
        let retried = run(pool, op, saga, step, &params).await;
        assert_eq!(retried, Ok(json!({ "txn_id": "s1/payment" })));
        assert_eq!(one(pool, balance).await, 9_000);

        let spring = json!({ "campaign_id": "spring", "amount": "10" });
        let add = || (Op::Action(&gmv::Add), "s1", "gmv", spring.clone());
        let second = behind(pool, add(), add()).await;
        assert!(matches!(second, Err(StepError::Retryable(_))), "{second:?}");
        let gmv = "SELECT gmv FROM campaign_gmv WHERE campaign_id = 'spring'";
        assert_eq!(one(pool, gmv).await, 1_000, "added once");
    }

    /// Two order-refunds of one order at once: the second read what was left to refund before
    /// the first committed, so its credit must not apply on that stale sum (the account row
    /// changed under it): it locks the row, reads again, and refuses what is no longer there —
    /// or refunds it, when enough is left.
    #[tokio::test]
    async fn concurrent_refunds_of_one_order_refund_at_most_its_charge_on_postgres() {
        let Some(db) = setup(Backend::Postgres, "concurrent_refunds").await else {
            return;
        };
        let pool = &db.pool;
        let mut conn = pool.acquire().await.unwrap();
        payment::seed(&mut conn, &[("u1".into(), 10_000)])
            .await
            .unwrap();
        drop(conn);
        let pay = |order: &str, amount: &str| json!({ "account": "u1", "amount": amount, "order_id": order });
        let balance = "SELECT balance FROM payment_accounts WHERE account = 'u1'";

        run(
            pool,
            Op::Action(&payment::Charge),
            "paid-1",
            "payment",
            &pay("o-1", "40"),
        )
        .await
        .unwrap();
        let refund = |saga| {
            (
                Op::Action(&payment::Refund),
                saga,
                "refund",
                pay("o-1", "30"),
            )
        };
        let second = behind(pool, refund("r1"), refund("r2")).await;
        assert_eq!(
            second,
            Err(StepError::business(
                "refund_exceeds_charge",
                "order o-1 has 10.00 left to refund to `u1`, asked for 30.00"
            ))
        );
        assert_eq!(one(pool, balance).await, 9_000, "refunded 30 of 40, once");

        run(
            pool,
            Op::Action(&payment::Charge),
            "paid-2",
            "payment",
            &pay("o-2", "80"),
        )
        .await
        .unwrap();
        let refund = |saga| {
            (
                Op::Action(&payment::Refund),
                saga,
                "refund",
                pay("o-2", "30"),
            )
        };
        let second = behind(pool, refund("r3"), refund("r4")).await;
        assert_eq!(
            second,
            Ok(json!({ "refund_id": "r4/refund", "refunded_cents": 3_000 }))
        );
        assert_eq!(one(pool, balance).await, 7_000, "refunded 60 of 80");

        let outcomes = [
            outcome(
                "paid-1",
                ORDER_PAID,
                OutcomeState::Completed,
                pay("o-1", "40"),
            ),
            outcome(
                "r1",
                ORDER_REFUND,
                OutcomeState::Completed,
                pay("o-1", "30"),
            ),
            outcome(
                "r2",
                ORDER_REFUND,
                OutcomeState::Compensated,
                pay("o-1", "30"),
            ),
            outcome(
                "paid-2",
                ORDER_PAID,
                OutcomeState::Completed,
                pay("o-2", "80"),
            ),
            outcome(
                "r3",
                ORDER_REFUND,
                OutcomeState::Completed,
                pay("o-2", "30"),
            ),
            outcome(
                "r4",
                ORDER_REFUND,
                OutcomeState::Completed,
                pay("o-2", "30"),
            ),
        ];
        let mut conn = pool.acquire().await.unwrap();
        let violations = payment::check(&mut conn, &outcomes).await.unwrap();
        assert_eq!(violations, Vec::<String>::new());
    }

    /// The SDK's migrations on their own make a worker database the barrier runs on, and they
    /// and the demo services' set agree, entry for entry: a database migrated with one set
    /// (before the split: with `MIGRATIONS` only) takes the other without re-running anything.
    #[tokio::test]
    async fn barrier_migrations_stand_alone_and_agree_with_the_services_set() {
        use sagaflow_engine::store::Store;
        for (name, sqlite, postgres) in crate::BARRIER_MIGRATIONS {
            assert!(
                MIGRATIONS.contains(&(name, sqlite, postgres)),
                "{name} differs between the two sets"
            );
        }
        let dir = std::env::temp_dir().join(format!(
            "sagaflow-barrier-migrations-{}-{:08x}",
            std::process::id(),
            fastrand::u32(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let names = |store: Store| async move { store.applied_migrations().await.unwrap() };
        let set = |m: sagaflow_engine::store::Migrations| {
            let mut v: Vec<String> = m.iter().map(|(n, _, _)| (*n).to_owned()).collect();
            v.sort();
            v
        };

        // The barrier alone: its tables, no service's.
        let alone = Store::connect(&dir.join("alone.db").display().to_string(), 1)
            .await
            .unwrap();
        alone.migrate(&[crate::BARRIER_MIGRATIONS]).await.unwrap();
        assert_eq!(names(alone.clone()).await, set(crate::BARRIER_MIGRATIONS));
        let tables: Vec<String> = sqlx::query_scalar(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name <> 'schema_migrations' \
             ORDER BY name",
        )
        .fetch_all(alone.pool())
        .await
        .unwrap();
        assert_eq!(tables, ["barrier", "sagaflow_deployment"]);
        alone.bind_prefix("shop").await.unwrap();
        // … then the services' set adds only the services' tables.
        alone.migrate(&[MIGRATIONS]).await.unwrap();
        assert_eq!(names(alone.clone()).await, set(MIGRATIONS));
        alone.pool().close().await;

        // Migrated the old way (the services' set): the barrier's set finds nothing to do.
        let old = Store::connect(&dir.join("old.db").display().to_string(), 1)
            .await
            .unwrap();
        old.migrate(&[MIGRATIONS]).await.unwrap();
        let before = names(old.clone()).await;
        old.migrate(&[crate::BARRIER_MIGRATIONS, MIGRATIONS])
            .await
            .unwrap();
        assert_eq!(names(old.clone()).await, before);
        old.pool().close().await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// `0107_barrier_check_without_list` and `0108_service_checks_without_lists` rebuild the
    /// barrier's and the services' tables on SQLite with their CHECKs spelled without `IN`
    /// lists: the rows and the indexes stay, every value the old CHECKs admitted is admitted
    /// and every other refused, and no list is left.
    #[tokio::test]
    async fn checks_rebuilt_without_lists_keep_rows_and_refuse_the_same() {
        use sagaflow_engine::store::Store;
        let (last, ..) = MIGRATIONS[MIGRATIONS.len() - 1];
        assert_eq!(last, "0108_service_checks_without_lists");
        let dir = std::env::temp_dir().join(format!(
            "sagaflow-service-checks-{}-{:08x}",
            std::process::id(),
            fastrand::u32(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let store = Store::connect(&dir.join("services.db").display().to_string(), 1)
            .await
            .unwrap();
        let (before, ..) = MIGRATIONS[MIGRATIONS.len() - 3];
        assert_eq!(
            before, "0106_deployment",
            "the last before the two rebuilds"
        );
        store
            .migrate(&[&MIGRATIONS[..MIGRATIONS.len() - 2]])
            .await
            .unwrap();
        let run = |sql: &'static str| {
            let pool = store.pool().clone();
            async move { sqlx::raw_sql(sql).execute(&pool).await.map(|_| ()) }
        };
        run(
            "INSERT INTO payment_ledger VALUES ('s1', 'payment', 'charge', 'a1', 'o1', 500);
             INSERT INTO coupons VALUES ('c1', 'u1', 'frozen', 's1', 'o1');
             INSERT INTO coupons VALUES ('c2', 'u1', 'available', NULL, NULL);
             INSERT INTO coupon_ledger VALUES ('s1', 'coupon', 'freeze', 'c1', 'o1');
             INSERT INTO points_ledger VALUES ('s1', 'points', 'grant', 'u1', 5, NULL);
             INSERT INTO gmv_ledger VALUES ('s1', 'gmv', 'add', 'spring', 500);
             INSERT INTO barrier VALUES ('s1', 'payment', 'action', '{}', 7);",
        )
        .await
        .unwrap();
        let tables = [
            "barrier",
            "payment_ledger",
            "coupons",
            "coupon_ledger",
            "points_ledger",
            "gmv_ledger",
        ];
        let snapshot = || async {
            let mut all = Vec::new();
            for table in tables {
                let lines = sagaflow_engine::store::sqlite_table_snapshot(store.pool(), table)
                    .await
                    .unwrap();
                all.extend(lines.into_iter().map(|l| format!("{table}: {l}")));
            }
            all
        };
        let before = snapshot().await;

        store.migrate(&[MIGRATIONS]).await.unwrap();

        // Every column, index, foreign key and row as it was (the CHECKs are in the tables' SQL).
        assert_eq!(snapshot().await, before);
        assert!(
            before
                .iter()
                .any(|l| l.starts_with("barrier: index sqlite_autoindex_barrier_1")),
            "the barrier's key is among what is compared: {before:?}"
        );

        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT kind || '/' || account || '/' || order_id, amount FROM payment_ledger \
             UNION ALL SELECT state || '/' || coalesce(saga_id, '-'), 0 FROM coupons \
             UNION ALL SELECT kind || '/' || coupon_id, 0 FROM coupon_ledger \
             UNION ALL SELECT kind || '/' || user_id, delta FROM points_ledger \
             UNION ALL SELECT kind || '/' || campaign_id, delta FROM gmv_ledger \
             UNION ALL SELECT op || '/' || step || '/' || outcome, created_at FROM barrier",
        )
        .fetch_all(store.pool())
        .await
        .unwrap();
        let mut rows: Vec<String> = rows.into_iter().map(|(r, n)| format!("{r}:{n}")).collect();
        rows.sort();
        assert_eq!(
            rows,
            [
                "action/payment/{}:7",
                "add/spring:500",
                "available/-:0",
                "charge/a1/o1:500",
                "freeze/c1:0",
                "frozen/s1:0",
                "grant/u1:5",
            ],
            "every row is kept"
        );

        // Every value the old CHECKs admitted still goes in…
        for (table, kinds, row) in [
            (
                "barrier",
                &["action", "compensate", "try", "confirm", "cancel"][..],
                "'{}', 1",
            ),
            (
                "payment_ledger",
                &["charge", "charge_reversal", "refund"][..],
                "'a1', 'o1', 1",
            ),
            (
                "coupon_ledger",
                &["freeze", "use", "unfreeze", "restore"][..],
                "'c1', 'o1'",
            ),
            (
                "points_ledger",
                &["grant", "grant_reversal", "revoke", "revoke_reversal"][..],
                "'u1', 1, NULL",
            ),
            (
                "gmv_ledger",
                &["add", "add_reversal", "subtract", "subtract_reversal"][..],
                "'spring', 1",
            ),
        ] {
            for kind in kinds {
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                    "INSERT INTO {table} VALUES ('s2', 'x', '{kind}', {row})"
                )))
                .execute(store.pool())
                .await
                .unwrap_or_else(|e| panic!("{table} refused {kind}: {e}"));
            }
            // … and no other.
            let refused = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "INSERT INTO {table} VALUES ('s3', 'x', 'bogus', {row})"
            )))
            .execute(store.pool())
            .await
            .expect_err("an unknown kind");
            assert!(refused.to_string().contains("CHECK"), "{table}: {refused}");
        }
        run("INSERT INTO coupons VALUES ('c3', 'u1', 'used', 's2', 'o2')")
            .await
            .unwrap();
        for bad in [
            "INSERT INTO coupons VALUES ('c4', 'u1', 'lost', 's2', 'o2')",
            // The table's own CHECK: only an available coupon has no holder.
            "INSERT INTO coupons VALUES ('c5', 'u1', 'available', 's2', 'o2')",
            "INSERT INTO payment_ledger VALUES ('s4', 'payment', 'charge', 'a1', 'o1', -1)",
        ] {
            let refused = run(bad).await.expect_err(bad);
            assert!(refused.to_string().contains("CHECK"), "{bad}: {refused}");
        }

        let mut indexes: Vec<(String, String)> = sqlx::query_as(
            "SELECT name, tbl_name FROM sqlite_master WHERE type = 'index' \
             AND name IN ('payment_ledger_order', 'barrier_by_age')",
        )
        .fetch_all(store.pool())
        .await
        .unwrap();
        indexes.sort();
        let named = |i: &str, t: &str| (i.to_owned(), t.to_owned());
        assert_eq!(
            indexes,
            [
                named("barrier_by_age", "barrier"),
                named("payment_ledger_order", "payment_ledger")
            ]
        );
        let lists: Vec<String> = sqlx::query_scalar(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND sql LIKE '% IN (%' \
             AND name IN ('barrier', 'payment_ledger', 'coupons', 'coupon_ledger', \
             'points_ledger', 'gmv_ledger')",
        )
        .fetch_all(store.pool())
        .await
        .unwrap();
        assert_eq!(lists, Vec::<String>::new());
        store.pool().close().await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn money_formats_cents() {
        assert_eq!(money(12990), "129.90");
        assert_eq!(money(5), "0.05");
        assert_eq!(money(-150), "-1.50");
        assert_eq!(money(0), "0.00");
    }
}

/// The barrier's and the services' tables, applied after the engine's: the SDK's own
/// ([`crate::BARRIER_MIGRATIONS`], the same entries under the same names, so a database migrated
/// with this set validates with that one and the other way round) and the four services'.
pub const MIGRATIONS: sagaflow_engine::store::Migrations = &[
    crate::barrier::BARRIER_TABLE,
    (
        "0101_payment",
        include_str!("../../../migrations/sqlite/0101_payment.sql"),
        include_str!("../../../migrations/postgres/0101_payment.sql"),
    ),
    (
        "0102_coupon",
        include_str!("../../../migrations/sqlite/0102_coupon.sql"),
        include_str!("../../../migrations/postgres/0102_coupon.sql"),
    ),
    (
        "0103_points",
        include_str!("../../../migrations/sqlite/0103_points.sql"),
        include_str!("../../../migrations/postgres/0103_points.sql"),
    ),
    (
        "0104_gmv",
        include_str!("../../../migrations/sqlite/0104_gmv.sql"),
        include_str!("../../../migrations/postgres/0104_gmv.sql"),
    ),
    crate::barrier::BARRIER_RETENTION,
    crate::barrier::DEPLOYMENT,
    crate::barrier::BARRIER_CHECK,
    (
        "0108_service_checks_without_lists",
        include_str!("../../../migrations/sqlite/0108_service_checks_without_lists.sql"),
        include_str!("../../../migrations/postgres/0108_service_checks_without_lists.sql"),
    ),
];

/// The worker for `service` with all its handlers registered, or None for an unknown service.
pub fn worker(
    service: &str,
    pool: sqlx::AnyPool,
    transport: std::sync::Arc<dyn sagaflow_engine::transport::Transport>,
) -> Option<crate::runtime::Worker> {
    use crate::runtime::Worker;
    let w = Worker::new(service, pool, transport);
    Some(match service {
        "payment" => w
            .saga_step("charge", payment::Charge)
            .saga_step("refund", payment::Refund),
        "coupon" => w
            .tcc_step("freeze", coupon::Coupon)
            .saga_step("restore", coupon::Restore),
        "points" => w
            .saga_step("grant", points::Grant)
            .saga_step("revoke", points::Revoke),
        "gmv" => w
            .saga_step("add", gmv::Add)
            .saga_step("subtract", gmv::Subtract),
        _ => return None,
    })
}

/// Runs every service's invariant check; the list of violations (empty: all good).
pub async fn check_all(
    conn: &mut sqlx::AnyConnection,
    outcomes: &[Outcome],
) -> Result<Vec<String>, sqlx::Error> {
    let mut violations = Vec::new();
    for service in SERVICES {
        violations.extend(check(service, conn, outcomes).await?);
    }
    Ok(violations)
}

/// The invariants of one service's tables (see [`check_all`]), for a database that holds that
/// service's tables (`sagaflow dev` gives each service a file of its own). An unknown service
/// has none.
pub async fn check(
    service: &str,
    conn: &mut sqlx::AnyConnection,
    outcomes: &[Outcome],
) -> Result<Vec<String>, sqlx::Error> {
    match service {
        "payment" => payment::check(conn, outcomes).await,
        "coupon" => coupon::check(conn, outcomes).await,
        "points" => points::check(conn, outcomes).await,
        "gmv" => gmv::check(conn, outcomes).await,
        _ => Ok(Vec::new()),
    }
}

/// Whether the services' tables in this database hold any row: a run's barrier records, its
/// effects, or what `sagaflow dev` seeds before its first saga (accounts, coupons, campaigns;
/// a file of one service's holds only that service's). (Migrate first.)
pub async fn hold_rows(conn: &mut sqlx::AnyConnection) -> Result<bool, sqlx::Error> {
    let row = sqlx::query(
        "SELECT 1 AS held WHERE EXISTS (SELECT 1 FROM barrier) \
         OR EXISTS (SELECT 1 FROM payment_accounts) OR EXISTS (SELECT 1 FROM payment_ledger) \
         OR EXISTS (SELECT 1 FROM coupons) OR EXISTS (SELECT 1 FROM coupon_ledger) \
         OR EXISTS (SELECT 1 FROM points_balances) OR EXISTS (SELECT 1 FROM points_ledger) \
         OR EXISTS (SELECT 1 FROM campaign_gmv) OR EXISTS (SELECT 1 FROM gmv_ledger)",
    )
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row.is_some())
}

/// Every finished saga in the engine's `sagas` table, as the checks need them.
pub async fn outcomes(conn: &mut sqlx::AnyConnection) -> Result<Vec<Outcome>, sqlx::Error> {
    use sqlx::Row;
    let rows =
        sqlx::query("SELECT id, name, status, state FROM sagas WHERE finished_at IS NOT NULL")
            .fetch_all(&mut *conn)
            .await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let status: String = r.try_get("status")?;
        let state = match status.as_str() {
            "completed" => OutcomeState::Completed,
            "compensated" => OutcomeState::Compensated,
            _ => OutcomeState::Failed,
        };
        let text: String = r.try_get("state")?;
        let parsed: Value = serde_json::from_str(&text).unwrap_or_default();
        out.push(Outcome {
            saga_id: r.try_get("id")?,
            saga: r.try_get("name")?,
            state,
            input: parsed.get("input").cloned().unwrap_or_default(),
        });
    }
    Ok(out)
}

//! Persistence on sqlx, for SQLite (embedded default) and PostgreSQL (production).
//!
//! One implementation serves both through sqlx's `Any` driver: runtime queries with `$N`
//! placeholders, JSON as TEXT, times as epoch milliseconds. Where the dialects differ (row locks)
//! the query is chosen by [`Backend`]. The same test suite runs against both databases.
//!
//! Concurrency: sagas carry an optimistic `version` (a write that lost a race is retried by the
//! caller); per-key sequencing locks the key's row (`FOR UPDATE` on PostgreSQL; SQLite has one
//! writer). SQLite gets a single connection: it serialises writers anyway, and one connection
//! avoids `SQLITE_BUSY` on lock upgrades.

pub mod dead_letters;
pub mod deployment;
pub mod outbox;
pub mod read;
pub mod retention;
pub mod sql;
pub mod timers;
pub mod tx;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyConnection, AnyPool, Row};

use crate::machine::{SagaState, StepStatus, Timer};
use crate::redact::redact_url as redact;
pub use read::{
    Latencies, Minute, SagaCounts, SagaFilter, SagaHeader, SagaQueries, SagaRecord, SagaSummary,
    Timeline, TimelineRow,
};
pub use retention::PurgeReport;
use sql::Sql;
pub use tx::{
    Changes, DefinitionTable, HistoryRow, HistoryTable, KeyedSaga, NewSaga, OutboxMessage,
    OutboxTable, SagaTable, SagaWrite, SequenceKeyTable, StoreTx, TimerRow, TimerTable, Tx,
};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The message carries sqlx's whole text, so it is not also exposed as a `source` (an
    /// error chain printer would print it twice).
    #[error("database: {0}")]
    Db(sqlx::Error),
    #[error("cannot open database {url}: {reason}")]
    Connect { url: String, reason: String },
    /// An address sagaflow cannot use, refused before anything is opened or created.
    #[error("{0}")]
    BadUrl(String),
    #[error("migration {name} failed: {error}")]
    Migration { name: String, error: sqlx::Error },
    #[error("saga {0} was changed concurrently")]
    Conflict(String),
    #[error("corrupt row in {table}: {detail}")]
    Corrupt { table: &'static str, detail: String },
}

impl StoreError {
    /// Lost a race with another transaction (a moved version, a deadlock, a serialization
    /// failure): trying again is the answer.
    pub fn is_race(&self) -> bool {
        match self {
            StoreError::Conflict(_) => true,
            StoreError::Db(sqlx::Error::Database(db)) => {
                matches!(db.code().as_deref(), Some("40P01" | "40001"))
            }
            _ => false,
        }
    }

    /// Can never succeed as it is (a corrupt row): retrying will not help.
    pub fn is_permanent(&self) -> bool {
        matches!(self, StoreError::Corrupt { .. })
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        StoreError::Db(e)
    }
}

/// Which SQL dialect the pool speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Counts what the store sends, for `sagaflow dev`/`bench` figures (statements and commits per
/// saga) and for tests that pin the batch path's statement count.
#[derive(Debug, Default)]
pub struct Counters {
    statements: AtomicU64,
    commits: AtomicU64,
}

impl Counters {
    pub(crate) fn statement(&self) {
        self.statements.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn commit(&self) {
        self.commits.fetch_add(1, Ordering::Relaxed);
    }

    /// Statements sent so far (batch statements count once).
    pub fn statements(&self) -> u64 {
        self.statements.load(Ordering::Relaxed)
    }

    /// Transactions committed so far (statements outside a transaction count as one each).
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }
}

/// A set of migrations: (name, SQLite SQL, PostgreSQL SQL), applied in order, each once.
pub type Migrations = &'static [(&'static str, &'static str, &'static str)];

/// The engine's own tables.
pub const ENGINE_MIGRATIONS: Migrations = &[
    (
        "0001_engine",
        include_str!("../../../migrations/sqlite/0001_engine.sql"),
        include_str!("../../../migrations/postgres/0001_engine.sql"),
    ),
    (
        "0002_retention",
        include_str!("../../../migrations/sqlite/0002_retention.sql"),
        include_str!("../../../migrations/postgres/0002_retention.sql"),
    ),
    (
        "0003_relay_lease",
        include_str!("../../../migrations/sqlite/0003_relay_lease.sql"),
        include_str!("../../../migrations/postgres/0003_relay_lease.sql"),
    ),
    (
        "0004_hot_saga_updates",
        include_str!("../../../migrations/sqlite/0004_hot_saga_updates.sql"),
        include_str!("../../../migrations/postgres/0004_hot_saga_updates.sql"),
    ),
    (
        "0005_outbox_queue",
        include_str!("../../../migrations/sqlite/0005_outbox_queue.sql"),
        include_str!("../../../migrations/postgres/0005_outbox_queue.sql"),
    ),
    (
        "0006_deployment",
        include_str!("../../../migrations/sqlite/0006_deployment.sql"),
        include_str!("../../../migrations/postgres/0006_deployment.sql"),
    ),
    (
        "0007_dead_letters",
        include_str!("../../../migrations/sqlite/0007_dead_letters.sql"),
        include_str!("../../../migrations/postgres/0007_dead_letters.sql"),
    ),
    (
        "0008_state_is_the_record",
        include_str!("../../../migrations/sqlite/0008_state_is_the_record.sql"),
        include_str!("../../../migrations/postgres/0008_state_is_the_record.sql"),
    ),
    (
        "0009_fewer_indexes",
        include_str!("../../../migrations/sqlite/0009_fewer_indexes.sql"),
        include_str!("../../../migrations/postgres/0009_fewer_indexes.sql"),
    ),
    (
        "0010_timeline_by_batch",
        include_str!("../../../migrations/sqlite/0010_timeline_by_batch.sql"),
        include_str!("../../../migrations/postgres/0010_timeline_by_batch.sql"),
    ),
    (
        "0011_status_check_without_list",
        include_str!("../../../migrations/sqlite/0011_status_check_without_list.sql"),
        include_str!("../../../migrations/postgres/0011_status_check_without_list.sql"),
    ),
];

#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    /// The relay's connection (see `connect`).
    relay_pool: AnyPool,
    backend: Backend,
    counters: Arc<Counters>,
    /// The engine's look-ups (padded `IN` lists) are kept prepared: SQLite, or PostgreSQL
    /// connections that plan every statement afresh ([`Store::connect_engine`]).
    keep_lookups: bool,
}

/// A pooled connection that sat idle longer than this is pinged before it is handed out.
const PING_AFTER_IDLE: Duration = Duration::from_secs(1);

/// sqlx pings every connection it hands out (and again when it takes one back): one round trip
/// more per transaction, on every hot loop's critical path. A connection that was in use a
/// moment ago is alive, or its last user saw the error and the ping on its return closed it;
/// so only one that sat idle (and may have been cut by a server restart meanwhile) is pinged.
/// One that slipped through fails its transaction, which every loop retries.
async fn ping_if_idle(
    conn: &mut AnyConnection,
    meta: sqlx::pool::PoolConnectionMetadata,
) -> Result<bool, sqlx::Error> {
    if meta.idle_for >= PING_AFTER_IDLE {
        sqlx::Connection::ping(conn).await?;
    }
    Ok(true)
}

/// An engine's PostgreSQL connection plans every statement afresh (see [`Store::connect_engine`]).
async fn plans(conn: &mut AnyConnection, engine: bool) -> Result<(), sqlx::Error> {
    if engine {
        sqlx::raw_sql("SET plan_cache_mode = force_custom_plan")
            .execute(conn)
            .await?;
    }
    Ok(())
}

/// A database address as users write it: `postgres://…`, `sqlite://file.db`, or a plain path
/// (a SQLite file, created if missing). Any other scheme (`mysql://…`) is refused, naming the
/// supported ones, rather than taken for a file name.
pub fn normalize_url(url: &str) -> Result<String, StoreError> {
    normalize(url, true)
}

fn normalize(url: &str, create: bool) -> Result<String, StoreError> {
    if url.starts_with("postgres://")
        || url.starts_with("postgresql://")
        || url.starts_with("sqlite:")
    {
        return Ok(url.to_owned());
    }
    if let Some((scheme, _)) = url.split_once("://") {
        return Err(StoreError::BadUrl(format!(
            "`{}`: sagaflow cannot use a `{scheme}://` database; the supported addresses are postgres://… (or postgresql://…), sqlite://FILE, and a plain path to a SQLite file",
            redact(url)
        )));
    }
    if url.trim().is_empty() {
        return Err(StoreError::BadUrl(
            "the database address is empty; give postgres://… or the path of a SQLite file"
                .to_owned(),
        ));
    }
    if create {
        Ok(format!("sqlite://{url}?mode=rwc"))
    } else {
        if !std::path::Path::new(url).is_file() {
            return Err(StoreError::BadUrl(format!(
                "no SQLite database at {url} (this command only reads an existing one and creates none; check --db or --database-url)"
            )));
        }
        Ok(format!("sqlite://{url}?mode=rw"))
    }
}

impl Store {
    /// Opens the database (a SQLite file is created if missing); PostgreSQL gets
    /// `max_connections` connections, SQLite one.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Store, StoreError> {
        Self::open(normalize(url, true)?, max_connections, false).await
    }

    /// [`Store::connect`] for a process that runs the engine. On PostgreSQL its connections
    /// plan every statement with the tables as they are when it runs (`plan_cache_mode =
    /// force_custom_plan`), so the engine's look-ups can be kept prepared — one round trip a
    /// run instead of sqlx's describe-then-run two — without the trap of the generic plan:
    /// PostgreSQL switches a prepared statement to a generic plan after five runs and keeps it
    /// for the connection's life, and one made while a table was small (a fresh deployment, a
    /// queue like the outbox that is mostly empty, a server without autovacuum) is a sequential
    /// scan the table then outgrows (measured: a relay's delete of confirmed outbox rows went
    /// from 0.1 to 2.5 ms, a barrier look-up to 2 ms). A worker's store ([`Store::connect`])
    /// keeps PostgreSQL's default: the services' statements are kept prepared for their generic
    /// plans (planning their statements at every run doubled a saga's latency at 500 starts/s),
    /// and nothing of the store's is.
    pub async fn connect_engine(url: &str, max_connections: u32) -> Result<Store, StoreError> {
        Self::open(normalize(url, true)?, max_connections, true).await
    }

    /// Opens a database that must exist already: a SQLite path that names no file is an error
    /// instead of a new empty database (for the commands that only read, so that a typo in
    /// `--db` does not leave a stray file behind).
    pub async fn connect_existing(url: &str, max_connections: u32) -> Result<Store, StoreError> {
        Self::open(normalize(url, false)?, max_connections, false).await
    }

    async fn open(url: String, max_connections: u32, engine: bool) -> Result<Store, StoreError> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else {
            Backend::Postgres
        };
        let connect_err = |e: sqlx::Error| StoreError::Connect {
            url: redact(&url),
            reason: match &e {
                sqlx::Error::Database(db) => db.message().to_owned(),
                other => other.to_string(),
            },
        };
        let options: AnyConnectOptions = url.parse().map_err(connect_err)?;
        let pool = match backend {
            Backend::Sqlite => AnyPoolOptions::new()
                .max_connections(1)
                .test_before_acquire(false)
                .before_acquire(|conn, meta| Box::pin(ping_if_idle(conn, meta)))
                .acquire_timeout(Duration::from_secs(60))
                .after_connect(|conn, _| {
                    Box::pin(async move {
                        // WAL: readers (status commands) never block the writer; NORMAL sync is
                        // durable across process crashes, which is what the embedded mode needs.
                        sqlx::raw_sql(
                            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA busy_timeout = 10000; PRAGMA foreign_keys = ON;",
                        )
                        .execute(conn)
                        .await?;
                        Ok(())
                    })
                })
                .connect_with(options.clone())
                .await
                .map_err(connect_err)?,
            Backend::Postgres => {
                // One direct attempt first: the pool would retry a refused connection until its
                // timeout and then report only "timed out", hiding the reason.
                let probe = <AnyConnection as sqlx::Connection>::connect_with(&options)
                    .await
                    .map_err(connect_err)?;
                let _ = sqlx::Connection::close(probe).await;
                // A short acquire timeout: a server that answers "too many clients" fails one
                // round of a loop in seconds (it backs off and tries again) instead of stalling
                // it for half a minute.
                AnyPoolOptions::new()
                    .max_connections(max_connections.max(2))
                    .test_before_acquire(false)
                    .before_acquire(|conn, meta| Box::pin(ping_if_idle(conn, meta)))
                    .acquire_timeout(Duration::from_secs(5))
                    .after_connect(move |conn, _| Box::pin(plans(conn, engine)))
                    .connect_with(options.clone())
                    .await
                    .map_err(connect_err)?
            }
        };
        // The relay's leases and sent marks need no fsync: one lost in a crash only means the
        // rows are claimed, or sent, once more, and every receiver deduplicates. So on
        // PostgreSQL they go through one connection with `synchronous_commit = off`, off the
        // critical path of the state changes' own commits (which stay synchronous).
        let relay_pool = match backend {
            Backend::Sqlite => pool.clone(),
            Backend::Postgres => AnyPoolOptions::new()
                .max_connections(1)
                .test_before_acquire(false)
                .before_acquire(|conn, meta| Box::pin(ping_if_idle(conn, meta)))
                .acquire_timeout(Duration::from_secs(5))
                .after_connect(move |conn, _| {
                    Box::pin(async move {
                        sqlx::raw_sql("SET synchronous_commit = off")
                            .execute(&mut *conn)
                            .await?;
                        plans(conn, engine).await
                    })
                })
                .connect_lazy_with(options),
        };
        Ok(Store {
            pool,
            relay_pool,
            backend,
            counters: Arc::default(),
            keep_lookups: engine || backend == Backend::Sqlite,
        })
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Closes every connection this store opened: its pool's, and the relay's own one on
    /// PostgreSQL (which `pool().close()` leaves open). Waits until they are closed.
    pub async fn close(&self) {
        self.pool.close().await;
        self.relay_pool.close().await;
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The statements of this store's dialect.
    pub(crate) fn sql(&self) -> &'static Sql {
        match self.backend {
            Backend::Postgres => &sql::POSTGRES,
            Backend::Sqlite => &sql::SQLITE,
        }
    }

    /// What this store has sent so far.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Opens a write transaction.
    pub async fn begin(&self) -> Result<Tx, StoreError> {
        Ok(Tx {
            tx: self.pool.begin().await?,
            sql: self.sql(),
            counters: self.counters.clone(),
            freed_keys: Vec::new(),
            keep_lookups: self.keep_lookups,
        })
    }

    /// Applies every migration of `sets` not applied yet, each in its own transaction.
    pub async fn migrate(&self, sets: &[Migrations]) -> Result<(), StoreError> {
        let mut conn = self.pool.acquire().await?;
        // Processes starting together on a fresh PostgreSQL database (an engine and its workers)
        // would race on CREATE TABLE IF NOT EXISTS; one migrates at a time.
        if self.backend == Backend::Postgres {
            sqlx::query("SELECT pg_advisory_lock(7317001)")
                .execute(&mut *conn)
                .await?;
        }
        let result = self.migrate_on(&mut conn, sets).await;
        if self.backend == Backend::Postgres {
            let unlocked = sqlx::query("SELECT pg_advisory_unlock(7317001)")
                .execute(&mut *conn)
                .await;
            if unlocked.is_err() {
                // Never hand a connection that may still hold the lock back to the pool.
                let _ = conn.detach();
            }
        }
        result
    }

    /// The names of the migrations recorded as applied, sorted (an error on a database never
    /// migrated: it has no `schema_migrations`).
    pub async fn applied_migrations(&self) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query("SELECT name FROM schema_migrations ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| Ok(r.try_get("name")?)).collect()
    }

    async fn applied(conn: &mut AnyConnection, name: &str) -> Result<bool, StoreError> {
        Ok(
            sqlx::query("SELECT 1 FROM schema_migrations WHERE name = $1")
                .bind(name)
                .fetch_optional(&mut *conn)
                .await?
                .is_some(),
        )
    }

    async fn migrate_on(
        &self,
        conn: &mut AnyConnection,
        sets: &[Migrations],
    ) -> Result<(), StoreError> {
        sqlx::raw_sql("CREATE TABLE IF NOT EXISTS schema_migrations (name TEXT PRIMARY KEY, applied_at BIGINT NOT NULL)")
            .execute(&mut *conn)
            .await?;
        for set in sets {
            for (name, sqlite, postgres) in set.iter() {
                let (sql, begin) = match self.backend {
                    // IMMEDIATE: the write lock before the look-up, so that two processes
                    // opening a fresh file at once (`sagaflow dev` and a `sagaflow list`
                    // beside it) take turns instead of both applying an ALTER TABLE.
                    Backend::Sqlite => (*sqlite, "BEGIN IMMEDIATE"),
                    // The advisory lock (`migrate`) already makes them take turns.
                    Backend::Postgres => (*postgres, "BEGIN"),
                };
                let failed = |error| StoreError::Migration {
                    name: (*name).to_owned(),
                    error,
                };
                // Looked up first without a transaction (a process that finds everything applied
                // takes no write lock), then again inside it.
                if Self::applied(&mut *conn, name).await? {
                    continue;
                }
                let mut tx = sqlx::Connection::begin_with(&mut *conn, begin).await?;
                if Self::applied(&mut tx, name).await? {
                    tx.rollback().await?;
                    continue;
                }
                sqlx::raw_sql(sql).execute(&mut *tx).await.map_err(failed)?;
                // ON CONFLICT: belt and braces; the look-up inside the transaction (SQLite's
                // IMMEDIATE, PostgreSQL's advisory lock) already keeps a second process from
                // applying it again (which matters: a SQLite table rebuild is not IF NOT EXISTS).
                sqlx::query("INSERT INTO schema_migrations (name, applied_at) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING")
                    .bind(*name)
                    .bind(now_ms())
                    .execute(&mut *tx)
                    .await
                    .map_err(failed)?;
                tx.commit().await?;
            }
        }
        Ok(())
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A saga row as the driver needs it.
#[derive(Debug, Clone)]
pub struct SagaRow {
    pub id: String,
    pub name: String,
    pub definition_hash: String,
    pub sequence_key: String,
    pub state: SagaState,
    pub version: i64,
    pub created_at: i64,
    pub finished_at: Option<i64>,
}

fn saga_from_row(row: &sqlx::any::AnyRow) -> Result<SagaRow, StoreError> {
    let id: String = row.try_get("id")?;
    let state_text: String = row.try_get("state")?;
    let state = read::decode_state(&id, &state_text)?;
    Ok(SagaRow {
        id,
        name: row.try_get("name")?,
        definition_hash: row.try_get("definition_hash")?,
        sequence_key: row.try_get("sequence_key")?,
        state,
        version: row.try_get("version")?,
        created_at: row.try_get("created_at")?,
        finished_at: row.try_get("finished_at")?,
    })
}

pub fn timer_id(saga_id: &str, t: &Timer) -> String {
    format!(
        "{saga_id}/{}/{}/{}/{}",
        t.step,
        t.op,
        t.attempt,
        match t.kind {
            crate::machine::TimerKind::Timeout => "timeout",
            crate::machine::TimerKind::Retry => "retry",
            crate::machine::TimerKind::Deadline => "deadline",
        }
    )
}

pub(crate) fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".to_owned())
}

pub fn step_status_name(s: &StepStatus) -> String {
    match s {
        StepStatus::Pending => "pending".into(),
        StepStatus::Active { op, waiting, .. } => {
            if *waiting {
                format!("{op}: waiting to retry")
            } else {
                format!("{op}: running")
            }
        }
        StepStatus::Succeeded => "succeeded".into(),
        StepStatus::Confirmed => "confirmed".into(),
        StepStatus::Failed { business: true, .. } => "failed".into(),
        StepStatus::Failed {
            business: false, ..
        } => "failed (may have taken effect)".into(),
        StepStatus::Skipped => "skipped".into(),
        StepStatus::Compensated => "compensated".into(),
        StepStatus::Stuck { op, .. } => format!("{op}: stuck"),
    }
}

/// What a SQLite table is, as lines to compare: its columns (name, type, NOT NULL, default,
/// key), its indexes (name, SQL, indexed columns), its foreign keys and all its rows, each
/// list sorted. For checking that a migration which rebuilds a table kept all of it (the
/// CHECKs aside: they are in the table's SQL, which a rebuild changes on purpose).
#[doc(hidden)]
pub async fn sqlite_table_snapshot(pool: &AnyPool, table: &str) -> Result<Vec<String>, StoreError> {
    let lines = |sql: String| async move {
        sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(sql))
            .bind(table)
            .fetch_all(pool)
            .await
    };
    let columns = lines(
        "SELECT name || ' ' || type || ' notnull=' || \"notnull\" || ' default=' || \
         coalesce(dflt_value, '-') || ' pk=' || pk FROM pragma_table_xinfo($1) ORDER BY cid"
            .to_owned(),
    )
    .await?;
    let mut all: Vec<String> = columns.iter().map(|c| format!("column {c}")).collect();
    for index in lines(
        "SELECT m.name || ' ' || coalesce(m.sql, '-') || ' on ' || (SELECT group_concat( \
         coalesce(x.name, '?') || ':' || x.\"desc\" || ':' || x.\"key\", ',') FROM \
         pragma_index_xinfo(m.name) x) FROM sqlite_master m WHERE m.type = 'index' \
         AND m.tbl_name = $1 ORDER BY m.name"
            .to_owned(),
    )
    .await?
    {
        all.push(format!("index {index}"));
    }
    for fk in lines(
        "SELECT \"from\" || ' -> ' || \"table\" || '(' || coalesce(\"to\", '') || ')' FROM \
         pragma_foreign_key_list($1) ORDER BY id, seq"
            .to_owned(),
    )
    .await?
    {
        all.push(format!("foreign key {fk}"));
    }
    let names: Vec<String> = columns
        .iter()
        .filter_map(|c| c.split(' ').next())
        .map(|n| format!("quote(\"{n}\")"))
        .collect();
    // `lines` binds the table's name to every statement; this one names the table in its text
    // (a table cannot be a parameter) and takes the bind as a no-op condition.
    let mut rows = lines(format!(
        "SELECT {} AS r FROM \"{table}\" WHERE $1 IS NOT NULL ORDER BY r",
        names.join(" || '|' || ")
    ))
    .await?;
    rows.iter_mut().for_each(|r| r.insert_str(0, "row "));
    all.append(&mut rows);
    Ok(all)
}

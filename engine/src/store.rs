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

use std::time::Duration;

use sagaflow_dsl::SagaGraph;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyConnection, AnyPool, Row};

use crate::machine::{Decision, HistoryEntry, SagaState, StepStatus, Timer};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The message carries sqlx's whole text, so it is not also exposed as a `source` (an
    /// error chain printer would print it twice).
    #[error("database: {0}")]
    Db(sqlx::Error),
    #[error("cannot open database {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("migration {name} failed: {error}")]
    Migration { name: String, error: sqlx::Error },
    #[error("saga {0} was changed concurrently")]
    Conflict(String),
    #[error("corrupt row in {table}: {detail}")]
    Corrupt { table: &'static str, detail: String },
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

/// A set of migrations: (name, SQLite SQL, PostgreSQL SQL), applied in order, each once.
pub type Migrations = &'static [(&'static str, &'static str, &'static str)];

/// The engine's own tables.
pub const ENGINE_MIGRATIONS: Migrations = &[
    (
        "0001_engine",
        include_str!("../../migrations/sqlite/0001_engine.sql"),
        include_str!("../../migrations/postgres/0001_engine.sql"),
    ),
    (
        "0002_retention",
        include_str!("../../migrations/sqlite/0002_retention.sql"),
        include_str!("../../migrations/postgres/0002_retention.sql"),
    ),
];

#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
}

/// A database address as users write it: `postgres://…`, `sqlite://file.db`, or a plain path.
pub fn normalize_url(url: &str) -> String {
    if url.starts_with("postgres://")
        || url.starts_with("postgresql://")
        || url.starts_with("sqlite:")
    {
        url.to_owned()
    } else {
        format!("sqlite://{url}?mode=rwc")
    }
}

impl Store {
    /// Opens the database; PostgreSQL gets `max_connections` connections, SQLite one.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Store, StoreError> {
        sqlx::any::install_default_drivers();
        let url = normalize_url(url);
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
                .connect_with(options)
                .await
                .map_err(connect_err)?,
            Backend::Postgres => {
                // One direct attempt first: the pool would retry a refused connection until its
                // timeout and then report only "timed out", hiding the reason.
                let probe = <AnyConnection as sqlx::Connection>::connect_with(&options)
                    .await
                    .map_err(connect_err)?;
                let _ = sqlx::Connection::close(probe).await;
                AnyPoolOptions::new()
                .max_connections(max_connections.max(2))
                .acquire_timeout(Duration::from_secs(30))
                .connect_with(options)
                .await
                .map_err(connect_err)?
            }
        };
        Ok(Store { pool, backend })
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    pub fn backend(&self) -> Backend {
        self.backend
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
                let applied = sqlx::query("SELECT 1 FROM schema_migrations WHERE name = $1")
                    .bind(*name)
                    .fetch_optional(&mut *conn)
                    .await?
                    .is_some();
                if applied {
                    continue;
                }
                let sql = match self.backend {
                    Backend::Sqlite => *sqlite,
                    Backend::Postgres => *postgres,
                };
                let failed = |error| StoreError::Migration {
                    name: (*name).to_owned(),
                    error,
                };
                let mut tx = sqlx::Acquire::begin(&mut *conn).await?;
                sqlx::raw_sql(sql).execute(&mut *tx).await.map_err(failed)?;
                // ON CONFLICT: another process may have applied it concurrently (same SQL,
                // idempotent thanks to IF NOT EXISTS).
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

fn redact(url: &str) -> String {
    // postgres://user:secret@host → postgres://user:***@host
    match (url.find("://"), url.find('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
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
    let state = serde_json::from_str(&state_text).map_err(|e| StoreError::Corrupt {
        table: "sagas",
        detail: format!("saga {id}: state is not valid JSON: {e}"),
    })?;
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

/// Operations inside a caller's transaction: everything a decision writes goes through here.
pub mod tx {
    use super::*;

    pub async fn put_definition(
        conn: &mut AnyConnection,
        hash: &str,
        name: &str,
        version: u32,
        source: &str,
    ) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO saga_definitions (hash, name, version, source, created_at) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (hash) DO NOTHING")
            .bind(hash)
            .bind(name)
            .bind(i64::from(version))
            .bind(source)
            .bind(now_ms())
            .execute(conn)
            .await?;
        Ok(())
    }

    pub async fn load_saga(
        conn: &mut AnyConnection,
        id: &str,
    ) -> Result<Option<SagaRow>, StoreError> {
        let row = sqlx::query("SELECT id, name, definition_hash, sequence_key, state, version, created_at, finished_at FROM sagas WHERE id = $1")
            .bind(id)
            .fetch_optional(conn)
            .await?;
        row.as_ref().map(saga_from_row).transpose()
    }

    pub async fn saga_by_idempotency_key(
        conn: &mut AnyConnection,
        key: &str,
    ) -> Result<Option<String>, StoreError> {
        let row = sqlx::query("SELECT id FROM sagas WHERE idempotency_key = $1")
            .bind(key)
            .fetch_optional(conn)
            .await?;
        Ok(row.map(|r| r.try_get("id")).transpose()?)
    }

    /// Inserts a new saga (version 0) with its initial state.
    #[allow(clippy::too_many_arguments)]
    pub async fn insert_saga(
        conn: &mut AnyConnection,
        id: &str,
        name: &str,
        hash: &str,
        sequence_key: &str,
        state: &SagaState,
        idempotency_key: Option<&str>,
        now: i64,
    ) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO sagas (id, name, definition_hash, sequence_key, status, state, version, idempotency_key, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, 0, $7, $8, $8)")
            .bind(id)
            .bind(name)
            .bind(hash)
            .bind(sequence_key)
            .bind(state.status.name())
            .bind(json(state))
            .bind(idempotency_key.map(str::to_owned))
            .bind(now)
            .execute(conn)
            .await?;
        Ok(())
    }

    /// Records that a message was processed; false when it already was (a duplicate).
    pub async fn inbox_insert(
        conn: &mut AnyConnection,
        message_id: &str,
        saga_id: &str,
        now: i64,
    ) -> Result<bool, StoreError> {
        let r = sqlx::query("INSERT INTO inbox (message_id, saga_id, received_at) VALUES ($1, $2, $3) ON CONFLICT (message_id) DO NOTHING")
            .bind(message_id)
            .bind(saga_id)
            .bind(now)
            .execute(conn)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Claims a timer by deleting it; false when another engine (or an earlier run) already did.
    pub async fn claim_timer(conn: &mut AnyConnection, id: &str) -> Result<bool, StoreError> {
        let r = sqlx::query("DELETE FROM timers WHERE id = $1")
            .bind(id)
            .execute(conn)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Writes a decision: the new state (if the version still matches), the step projection,
    /// history, outbox messages and timers. `messages` are (message id, destination, routing
    /// key, payload) built by the driver from the decision's commands.
    pub async fn write_decision(
        conn: &mut AnyConnection,
        graph: &SagaGraph,
        saga: &SagaRow,
        decision: &Decision,
        messages: &[OutboxMessage],
        now: i64,
    ) -> Result<(), StoreError> {
        let state = &decision.state;
        let finished = state.status.is_final().then_some(now);
        if !decision.ignored {
            let r = sqlx::query("UPDATE sagas SET status = $1, state = $2, version = version + 1, updated_at = $3, finished_at = COALESCE(finished_at, $4) WHERE id = $5 AND version = $6")
                .bind(state.status.name())
                .bind(json(state))
                .bind(now)
                .bind(finished)
                .bind(saga.id.as_str())
                .bind(saga.version)
                .execute(&mut *conn)
                .await?;
            if r.rows_affected() != 1 {
                return Err(StoreError::Conflict(saga.id.clone()));
            }
            write_steps(conn, graph, saga, decision, now).await?;
            cancel_stale_timers(conn, saga, decision).await?;
        }
        for h in &decision.history {
            history(conn, &saga.id, h, now).await?;
        }
        for m in messages {
            sqlx::query("INSERT INTO outbox (message_id, destination, routing_key, payload, created_at) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (message_id) DO NOTHING")
                .bind(m.message_id.as_str())
                .bind(m.destination.as_str())
                .bind(m.routing_key.as_str())
                .bind(m.payload.as_str())
                .bind(now)
                .execute(&mut *conn)
                .await?;
        }
        for t in &decision.timers {
            let event = crate::machine::Event::Timer {
                step: t.step,
                op: t.op,
                attempt: t.attempt,
                kind: t.kind,
            };
            sqlx::query("INSERT INTO timers (id, saga_id, due_at, event) VALUES ($1, $2, $3, $4) ON CONFLICT (id) DO NOTHING")
                .bind(timer_id(&saga.id, t))
                .bind(saga.id.as_str())
                .bind(t.at)
                .bind(json(&event))
                .execute(&mut *conn)
                .await?;
        }
        Ok(())
    }

    /// A step that left the attempt a timer was guarding no longer needs that timer: delete it
    /// now instead of letting it fire only to be ignored (half the engine's writes otherwise).
    async fn cancel_stale_timers(
        conn: &mut AnyConnection,
        saga: &SagaRow,
        decision: &Decision,
    ) -> Result<(), StoreError> {
        for (i, old) in saga.state.steps.iter().enumerate() {
            let StepStatus::Active {
                op,
                attempt,
                waiting,
            } = old
            else {
                continue;
            };
            if decision.state.steps.get(i) == Some(old) {
                continue;
            }
            let kind = if *waiting {
                crate::machine::TimerKind::Retry
            } else {
                crate::machine::TimerKind::Timeout
            };
            let timer = Timer {
                step: i,
                op: *op,
                attempt: *attempt,
                kind,
                at: 0,
            };
            sqlx::query("DELETE FROM timers WHERE id = $1")
                .bind(timer_id(&saga.id, &timer))
                .execute(&mut *conn)
                .await?;
        }
        Ok(())
    }

    async fn write_steps(
        conn: &mut AnyConnection,
        graph: &SagaGraph,
        saga: &SagaRow,
        decision: &Decision,
        now: i64,
    ) -> Result<(), StoreError> {
        let old = &saga.state;
        let new = &decision.state;
        for (i, step) in new.steps.iter().enumerate() {
            let changed = old.steps.get(i) != Some(step)
                || old.attempts.get(i) != new.attempts.get(i)
                || saga.version == 0;
            if !changed {
                continue;
            }
            sqlx::query("INSERT INTO saga_steps (saga_id, step_index, step_id, status, attempts, last_error, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (saga_id, step_index) DO UPDATE SET status = $4, attempts = $5, last_error = $6, updated_at = $7")
                .bind(saga.id.as_str())
                .bind(i as i64)
                .bind(graph.step(i).id.as_str())
                .bind(step_status_name(step))
                .bind(i64::from(new.attempts.get(i).copied().unwrap_or(0)))
                .bind(new.last_errors.get(i).cloned().flatten())
                .bind(now)
                .execute(&mut *conn)
                .await?;
        }
        Ok(())
    }

    pub async fn history(
        conn: &mut AnyConnection,
        saga_id: &str,
        h: &HistoryEntry,
        now: i64,
    ) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO saga_history (saga_id, at, kind, step, detail) VALUES ($1, $2, $3, $4, $5)")
            .bind(saga_id)
            .bind(now)
            .bind(h.kind.as_str())
            .bind(h.step.clone())
            .bind(h.detail.as_str())
            .execute(conn)
            .await?;
        Ok(())
    }

    /// Takes the sequence key for `saga_id` if it is free; otherwise queues the saga behind the
    /// holder. Returns true when the saga may start now.
    pub async fn acquire_key(
        conn: &mut AnyConnection,
        backend: Backend,
        key: &str,
        saga_id: &str,
    ) -> Result<bool, StoreError> {
        let inserted = sqlx::query("INSERT INTO sequence_keys (seq_key, holder) VALUES ($1, $2) ON CONFLICT (seq_key) DO NOTHING")
            .bind(key)
            .bind(saga_id)
            .execute(&mut *conn)
            .await?
            .rows_affected()
            == 1;
        if inserted {
            return Ok(true);
        }
        // Lock the key row so that a concurrent release sees our queue entry (PostgreSQL).
        let holder: Option<String> = lock_key(conn, backend, key).await?;
        if holder.as_deref() == Some(saga_id) {
            return Ok(true);
        }
        sqlx::query("INSERT INTO sequence_queue (seq_key, saga_id) VALUES ($1, $2) ON CONFLICT (saga_id) DO NOTHING")
            .bind(key)
            .bind(saga_id)
            .execute(conn)
            .await?;
        Ok(false)
    }

    async fn lock_key(
        conn: &mut AnyConnection,
        backend: Backend,
        key: &str,
    ) -> Result<Option<String>, StoreError> {
        let q = match backend {
            Backend::Postgres => {
                sqlx::query("SELECT holder FROM sequence_keys WHERE seq_key = $1 FOR UPDATE")
            }
            Backend::Sqlite => sqlx::query("SELECT holder FROM sequence_keys WHERE seq_key = $1"),
        };
        let row = q.bind(key).fetch_optional(conn).await?;
        Ok(row.map(|r| r.try_get("holder")).transpose()?)
    }

    /// A final saga gives up its key (or its place in the queue). Returns the saga that holds
    /// the key now and must be begun, if any.
    pub async fn release_key(
        conn: &mut AnyConnection,
        backend: Backend,
        key: &str,
        saga_id: &str,
    ) -> Result<Option<String>, StoreError> {
        let holder = lock_key(conn, backend, key).await?;
        if holder.as_deref() != Some(saga_id) {
            sqlx::query("DELETE FROM sequence_queue WHERE saga_id = $1")
                .bind(saga_id)
                .execute(conn)
                .await?;
            return Ok(None);
        }
        let next = sqlx::query(
            "SELECT saga_id FROM sequence_queue WHERE seq_key = $1 ORDER BY position LIMIT 1",
        )
        .bind(key)
        .fetch_optional(&mut *conn)
        .await?;
        match next {
            Some(row) => {
                let next: String = row.try_get("saga_id")?;
                sqlx::query("DELETE FROM sequence_queue WHERE saga_id = $1")
                    .bind(next.as_str())
                    .execute(&mut *conn)
                    .await?;
                sqlx::query("UPDATE sequence_keys SET holder = $1 WHERE seq_key = $2")
                    .bind(next.as_str())
                    .bind(key)
                    .execute(conn)
                    .await?;
                Ok(Some(next))
            }
            None => {
                sqlx::query("DELETE FROM sequence_keys WHERE seq_key = $1")
                    .bind(key)
                    .execute(conn)
                    .await?;
                Ok(None)
            }
        }
    }
}

/// A message written to the outbox with the state change that produced it.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxMessage {
    pub message_id: String,
    pub destination: String,
    pub routing_key: String,
    pub payload: String,
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
        }
    )
}

fn json<T: serde::Serialize>(v: &T) -> String {
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

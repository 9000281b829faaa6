//! Retention: the bulky rows of sagas that finished long ago are purged, in small batches.
//!
//! What goes, for a saga that is **Completed or Compensated** and finished
//! (`sagas.finished_at`) longer ago than [`Retention::keep`]:
//!
//! | table | rows purged |
//! |---|---|
//! | `saga_history` | the whole timeline |
//! | `inbox` | its processed reply ids (a reply that arrives after that finds a final saga and changes nothing) |
//! | `outbox` | its **sent** commands; an unsent one is left for the relay. Outbox rows have no saga id column: they are matched by their message id, the command id `<saga id>/<step>/<op>/<attempt>` (see [`crate::wire::command_id`]) |
//! | `timers` | leftovers (a final saga ignores its timers anyway) |
//!
//! What stays: the `sagas` row (state, input, outputs) and the `saga_steps` projection, so
//! `sagaflow status` still answers — with an empty timeline — and `sagaflow list` still lists
//! it. A **Failed** saga is never purged (it waits for an operator, who needs its history), nor
//! is a running, compensating or queued one, however old. A purged saga is marked
//! (`sagas.purged_at`) and never looked at again, so finding work stays cheap however many
//! sagas were purged before (migration `0002_retention`).
//!
//! Live traffic is not blocked: each [`purge_once`] is one short transaction that deletes at
//! most `batch` rows from each table, and [`run`] pauses between batches. The workers' barrier
//! rows are purged by age on the same schedule (`sagaflow_workers::barrier::purge`).
//!
//! Known leak, by design: a reply or event for a saga that arrives *after* its purge (later than
//! `keep`) may leave an inbox or history row behind, which is not purged again.

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use sqlx::Row;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::store::{Backend, Store, StoreError, now_ms};

/// How long finished sagas keep their rows, and how fast they are purged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// How long after its last update a finished saga keeps its history, inbox, outbox and
    /// timer rows (and a barrier row after its creation: it must exceed the longest saga).
    pub keep: Duration,
    /// At most this many rows are deleted from each table per transaction.
    pub batch: usize,
    /// The pause between two batches while there is work.
    pub pause: Duration,
}

impl Default for Retention {
    /// 7 days, 500 rows per batch, 100 ms between batches.
    fn default() -> Self {
        Retention {
            keep: Duration::from_secs(7 * 24 * 3600),
            batch: 500,
            pause: Duration::from_millis(100),
        }
    }
}

/// How long [`run`] sleeps when a batch found nothing to purge (or failed).
pub const IDLE: Duration = Duration::from_secs(60);

/// At most this many sagas are taken per batch (their ids are bound as query parameters).
pub const MAX_SAGAS_PER_BATCH: usize = 1000;

/// What one [`purge_once`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PurgeReport {
    /// Sagas whose rows are now all gone (marked purged in this batch).
    pub sagas: u64,
    pub history: u64,
    pub inbox: u64,
    pub outbox: u64,
    pub timers: u64,
}

impl PurgeReport {
    /// Rows deleted, all tables together.
    pub fn rows(&self) -> u64 {
        self.history + self.inbox + self.outbox + self.timers
    }

    /// True when the batch found nothing to do.
    pub fn is_empty(&self) -> bool {
        self.rows() == 0 && self.sagas == 0
    }

    fn add(&mut self, other: &PurgeReport) {
        self.sagas += other.sagas;
        self.history += other.history;
        self.inbox += other.inbox;
        self.outbox += other.outbox;
        self.timers += other.timers;
    }
}

/// The first segment of an outbox message id (the saga id), as the `outbox_by_saga` index of
/// migration `0002_retention` spells it: the query must use the same expression.
fn outbox_saga_expr(backend: Backend) -> &'static str {
    match backend {
        Backend::Sqlite => "substr(message_id, 1, instr(message_id, '/') - 1)",
        Backend::Postgres => "split_part(message_id, '/', 1)",
    }
}

/// `$first, $first+1, …` for `n` parameters.
fn placeholders(first: usize, n: usize) -> String {
    (first..first + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Purges one batch: takes up to `batch` of the oldest finished sagas not purged yet whose last
/// update is older than `keep`, deletes up to `batch` of their rows from each table, and marks
/// them purged once nothing of theirs is left — all in one short transaction. Call it again
/// while the report is not empty.
pub async fn purge_once(
    store: &Store,
    keep: Duration,
    batch: usize,
) -> Result<PurgeReport, StoreError> {
    let batch = batch.max(1);
    let limit = i64::try_from(batch).unwrap_or(i64::MAX);
    let now = now_ms();
    let cutoff = now.saturating_sub(i64::try_from(keep.as_millis()).unwrap_or(i64::MAX));
    let mut report = PurgeReport::default();

    let mut tx = store.pool().begin().await?;
    // SQLite, without statistics, would rather walk `sagas_by_status` — every completed saga
    // ever, purged ones included — and sort: name the partial index (an error if it no longer
    // fits the query, rather than a slow purge). PostgreSQL picks it by itself.
    let candidates = match store.backend() {
        Backend::Sqlite => {
            "SELECT id FROM sagas INDEXED BY sagas_to_purge WHERE purged_at IS NULL \
             AND status IN ('completed', 'compensated') AND finished_at < $1 \
             ORDER BY finished_at, id LIMIT $2"
        }
        Backend::Postgres => {
            "SELECT id FROM sagas WHERE purged_at IS NULL \
             AND status IN ('completed', 'compensated') AND finished_at < $1 \
             ORDER BY finished_at, id LIMIT $2"
        }
    };
    let rows = sqlx::query(candidates)
        .bind(cutoff)
        .bind(i64::try_from(batch.min(MAX_SAGAS_PER_BATCH)).unwrap_or(1))
        .fetch_all(&mut *tx)
        .await?;
    let ids: Vec<String> = rows
        .iter()
        .map(|r| r.try_get("id"))
        .collect::<Result<_, _>>()?;
    if ids.is_empty() {
        return Ok(report);
    }

    // $1 is the row limit, $2… the saga ids.
    let list = placeholders(2, ids.len());
    let outbox_saga = outbox_saga_expr(store.backend());
    let deletes = [
        format!(
            "DELETE FROM saga_history WHERE id IN (SELECT id FROM saga_history WHERE saga_id IN ({list}) LIMIT $1)"
        ),
        format!(
            "DELETE FROM inbox WHERE message_id IN (SELECT message_id FROM inbox WHERE saga_id IN ({list}) LIMIT $1)"
        ),
        format!(
            "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE {outbox_saga} IN ({list}) AND sent_at IS NOT NULL LIMIT $1)"
        ),
        format!(
            "DELETE FROM timers WHERE id IN (SELECT id FROM timers WHERE saga_id IN ({list}) LIMIT $1)"
        ),
    ];
    let mut counts = [0u64; 4];
    for (sql, count) in deletes.into_iter().zip(counts.iter_mut()) {
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(limit);
        for id in &ids {
            q = q.bind(id.as_str());
        }
        *count = q.execute(&mut *tx).await?.rows_affected();
    }
    [report.history, report.inbox, report.outbox, report.timers] = counts;

    // Every table gave less than its limit: nothing of these sagas is left. Otherwise the next
    // batch takes the same sagas again and goes on.
    if counts.iter().all(|&n| n < batch as u64) {
        let sql = format!(
            "UPDATE sagas SET purged_at = $1 WHERE id IN ({}) AND purged_at IS NULL \
             AND status IN ('completed', 'compensated') AND finished_at < $2",
            placeholders(3, ids.len())
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(now).bind(cutoff);
        for id in &ids {
            q = q.bind(id.as_str());
        }
        report.sagas = q.execute(&mut *tx).await?.rows_affected();
    }
    tx.commit().await?;
    Ok(report)
}

/// Purges until shutdown: batch after batch with `cfg.pause` between them while there is work,
/// then every [`IDLE`]. A failing batch is logged and tried again after [`IDLE`].
pub async fn run(store: Store, cfg: Retention, shutdown: watch::Receiver<bool>) {
    // What the current run of batches purged, logged once it is over.
    let total = std::sync::Arc::new(std::sync::Mutex::new(PurgeReport::default()));
    drive("engine", &cfg, shutdown, || {
        let store = store.clone();
        let total = total.clone();
        async move {
            let report = purge_once(&store, cfg.keep, cfg.batch).await?;
            let mut total = total.lock().unwrap_or_else(|e| e.into_inner());
            total.add(&report);
            if report.is_empty() && !total.is_empty() {
                info!(
                    sagas = total.sagas,
                    history = total.history,
                    inbox = total.inbox,
                    outbox = total.outbox,
                    timers = total.timers,
                    "retention: purged the rows of finished sagas"
                );
                *total = PurgeReport::default();
            }
            Ok::<_, StoreError>(report.rows() + report.sagas)
        }
    })
    .await;
}

/// The loop shared by every retention task: runs `batch` (which returns how much it did) until
/// shutdown, pausing `cfg.pause` after a batch that did something and [`IDLE`] after one that
/// did nothing or failed. `what` names the task in logs.
pub async fn drive<F, Fut, E>(
    what: &str,
    cfg: &Retention,
    mut shutdown: watch::Receiver<bool>,
    mut batch: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<u64, E>>,
    E: Display,
{
    loop {
        if *shutdown.borrow() {
            return;
        }
        // A batch is one short transaction: let it finish rather than cut it off.
        let wait = match batch().await {
            Ok(0) => IDLE,
            Ok(n) => {
                debug!(task = what, purged = n, "retention batch");
                cfg.pause
            }
            Err(e) => {
                warn!(task = what, error = %e, "retention batch failed; trying again later");
                IDLE
            }
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            r = shutdown.changed() => if r.is_err() || *shutdown.borrow() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::Op;

    #[test]
    fn outbox_ids_start_with_the_saga_id() {
        // The outbox purge finds a saga's rows by the first `/`-separated segment.
        let id = crate::wire::command_id("0193aa-bb", 2, Op::Compensate, 3);
        assert_eq!(id.split('/').next(), Some("0193aa-bb"));
    }

    #[test]
    fn placeholders_are_numbered() {
        assert_eq!(placeholders(2, 3), "$2, $3, $4");
    }

    #[test]
    fn defaults() {
        let r = Retention::default();
        assert_eq!(r.keep, Duration::from_secs(604_800));
        assert_eq!((r.batch, r.pause), (500, Duration::from_millis(100)));
    }
}

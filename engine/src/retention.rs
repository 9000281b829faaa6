//! Retention: the bulky rows of sagas that finished long ago are purged, in small batches.
//!
//! What goes, for a saga that is **Completed or Compensated** and finished
//! (`sagas.finished_at`) longer ago than [`Retention::keep`]:
//!
//! | table | rows purged |
//! |---|---|
//! | `saga_history` | the whole timeline |
//! | `timers` | leftovers (a final saga ignores its timers anyway) |
//!
//! The outbox needs no purge: a row leaves it once the broker confirmed it. What stays: the
//! `sagas` row (state, input, outputs), so `sagaflow status` still answers — with an empty timeline — and `sagaflow list` still lists
//! it. A **Failed** saga is never purged (it waits for an operator, who needs its history), nor
//! is a running, compensating or queued one, however old. A purged saga is marked
//! (`sagas.purged_at`) and never looked at again, so finding work stays cheap however many
//! sagas were purged before (migration `0002_retention`).
//!
//! The statements are the store's ([`Store::purge_finished`]); this module holds the policy.
//! Live traffic is not blocked: each [`purge_once`] is one short transaction that deletes at
//! most `batch` rows from each table, and [`run`] pauses between batches. The workers' barrier
//! rows are purged by age on the same schedule (`sagaflow_workers::barrier::purge`).
//!
//! Known leak, by design: a reply or event for a saga that arrives *after* its purge (later than
//! `keep`) may leave a history row (`ignored`) behind, which is not purged again.

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{debug, info, warn};

pub use crate::store::PurgeReport;
use crate::store::{Store, StoreError, now_ms};

/// How long finished sagas keep their rows, and how fast they are purged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// How long after its last update a finished saga keeps its history and timer rows (and a barrier row after its creation: it must exceed the longest saga).
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

/// At most this many sagas are taken per batch (however large `batch` is).
pub const MAX_SAGAS_PER_BATCH: usize = 1000;

/// Purges one batch: takes up to `batch` (at most [`MAX_SAGAS_PER_BATCH`]) of the oldest
/// Completed or Compensated sagas not purged yet that finished longer ago than `keep`, deletes up to `batch` of their rows from each table, and marks
/// them purged once nothing of theirs is left — all in one short transaction. Call it again
/// while the report is not empty.
pub async fn purge_once(
    store: &Store,
    keep: Duration,
    batch: usize,
) -> Result<PurgeReport, StoreError> {
    let batch = batch.max(1);
    let now = now_ms();
    let cutoff = now.saturating_sub(i64::try_from(keep.as_millis()).unwrap_or(i64::MAX));
    store
        .purge_finished(cutoff, now, batch.min(MAX_SAGAS_PER_BATCH), batch)
        .await
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
    fn defaults() {
        let r = Retention::default();
        assert_eq!(r.keep, Duration::from_secs(604_800));
        assert_eq!((r.batch, r.pause), (500, Duration::from_millis(100)));
    }
}

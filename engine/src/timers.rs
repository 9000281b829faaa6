//! The timer loop: fires due timers (retry backoff, step timeouts).
//!
//! One statement reads the earliest timers; the due ones are applied as a batch (each claimed
//! by deleting its row in the transaction that applies it, so two engines never fire one
//! timer twice), and the loop sleeps until the first one that is not due — or until a batch
//! commits a timer due earlier than that.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::warn;

use crate::apply::Inbound;
use crate::engine::{Engine, EngineError, Incoming, backoff};
use crate::store::{StoreTx, TimerTable, now_ms};

/// Timers read at once.
const BATCH: usize = 200;
/// The longest the loop sleeps without looking (another engine may have set a timer).
const IDLE_MS: i64 = 500;

impl Engine {
    pub(crate) async fn timer_loop(
        self: Arc<Self>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), EngineError> {
        let mut failures = 0u32;
        while !*shutdown.borrow() {
            match self.fire_due_timers().await {
                Ok(Some(wait)) => {
                    failures = 0;
                    tokio::select! {
                        () = self.timers_changed_notified() => {}
                        () = tokio::time::sleep(wait) => {}
                        _ = shutdown.changed() => {}
                    }
                }
                Ok(None) => failures = 0,
                Err(e) => {
                    failures += 1;
                    warn!(error = %e, "timer loop failed; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(backoff(failures)) => {}
                        _ = shutdown.changed() => {}
                    }
                }
            }
        }
        Ok(())
    }

    /// Fires a batch of due timers. Returns how long to wait when none is due.
    pub async fn fire_due_timers(&self) -> Result<Option<Duration>, EngineError> {
        let now = now_ms();
        // Until this round has planned its next look, any timer committed meanwhile wakes it.
        self.plan_timer_check(i64::MAX);
        let timers = self.store().due_timers(now, BATCH).await?;
        let next_due = timers.next_at;
        let mut batch = Vec::new();
        let mut undecodable = Vec::new();
        for r in timers.due {
            match r.event {
                Some(event) => batch.push(Incoming {
                    saga_id: r.saga_id,
                    event,
                    timer_id: Some(r.id),
                }),
                None => {
                    warn!(timer = %r.id, "undecodable timer row; deleting it");
                    undecodable.push(r.id);
                }
            }
        }
        if !undecodable.is_empty() {
            let mut tx = self.store().begin().await?;
            tx.claim_timers(&undecodable).await?;
            tx.commit().await?;
            if batch.is_empty() {
                // More may be due behind them: look again at once rather than sleep.
                return Ok(None);
            }
        }
        if batch.is_empty() {
            let wait = next_due.map_or(IDLE_MS, |n| (n - now).clamp(1, IDLE_MS));
            self.plan_timer_check(now + wait);
            return Ok(Some(Duration::from_millis(wait as u64)));
        }
        // Looking again right away: a timer set meanwhile needs no wake-up.
        self.plan_timer_check(now);
        let n = batch.len();
        // One timer that cannot be applied must not hold the others back: they are applied
        // (and deleted) all the same; the failed one stays and is tried again next round.
        let batch: Vec<Inbound> = batch.into_iter().map(Inbound::Event).collect();
        let (_, results) = self.apply_grouped(batch).await;
        let failed: Vec<EngineError> = results.into_iter().filter_map(Result::err).collect();
        let all_failed = failed.len() == n;
        if let Some(e) = failed.into_iter().next() {
            warn!(error = %e, "a due timer could not be applied; it is tried again");
            if all_failed {
                return Err(e);
            }
        }
        Ok(None)
    }
}

//! The outbox relay: publishes committed outbox rows and deletes them once the broker has
//! confirmed them.
//!
//! A round never holds a database transaction open while the broker works: take a batch,
//! publish it pipelined in order — every message sent, then every confirm awaited — and hand
//! the confirmed rows to the engine's next apply transaction to delete ([`crate::handoff`]; the
//! relay deletes them itself, in one statement, when none came within
//! [`crate::handoff::SENT_WAIT`]). The next round is taken once this one is on the wire,
//! not once it is confirmed. What was not confirmed is given back at once and sent again later;
//! receivers deduplicate.
//!
//! A batch comes from one of two places:
//! - **the hand-off**: the rows this engine's own transactions just committed, passed in memory
//!   in commit order ([`crate::handoff::Handoff`]). No claim statement, and no wait for a poll: the usual path.
//! - **a claim** (one statement, a lease: [`crate::store::outbox`]) for the rest: rows written
//!   by a process without a relay (an operator's CLI), given back after a failed publish, or
//!   left by an engine that died. The relay claims when the hand-off is idle, at most every
//!   [`CLAIM_EVERY`], and at least every [`CLAIM_AT_LEAST`] under load.
//!
//! Per-key order on the wire: one relay publishes a batch in outbox order on one channel. Rows
//! of one key claimed by two engines' relays at once could cross, but the engine writes a
//! saga's next command only after the reply to the previous one, so commands of one key are
//! causally ordered anyway; what may cross are retries of one step, which the worker's barrier
//! and attempt numbers make harmless.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, watch};
use tracing::warn;

use crate::engine::{Engine, EngineError, backoff};
use crate::handoff::{Active, SENT_WAIT};
use crate::store::now_ms;
use crate::store::outbox::Claimed;

/// Rows sent in one round at most.
const BATCH: usize = 500;
/// How long a claim is ours; a relay that died is replaced after this. Longer than the
/// transport's confirm timeout (30 s), so rows still waiting for a confirm are never claimed
/// and sent again by another round.
const LEASE_MS: i64 = 60_000;

/// Batches waiting for their confirms at once. The next batch is taken once the previous one
/// is on the wire (not confirmed), so batches go out in order. Measured (one run each,
/// `sagaflow bench`): 4 against 2 rounds, 638 against 622 sagas/s closed loop and p50 259
/// against 301 ms at `--rate 300` — within the noise, so no more than that.
const ROUNDS: usize = 4;

/// The idle relay claims this often (rows of other writers, see the module's doc). A claim
/// walks the outbox's dead rows since the last vacuum (about 17 ms each in a bench on a
/// server without autovacuum; every 200 ms, a sixth of the engine database's time), and what
/// it finds is rare and not urgent: a CLI's command waits up to a second.
const CLAIM_EVERY: Duration = Duration::from_secs(1);
/// And a busy one at least this often, so a steady hand-off cannot starve the others.
const CLAIM_AT_LEAST: Duration = Duration::from_secs(1);

impl Engine {
    /// Runs this engine's outbox relay alone (what [`Engine::run`] runs beside the other
    /// loops) until `shutdown` turns true.
    pub async fn relay(
        self: Arc<Self>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<(), EngineError> {
        let active = Active::new(self.handoff_shared());
        self.relay_loop(shutdown, active).await
    }

    /// Whether this engine's relay runs (its commits hand their outbox rows to it).
    pub fn relay_running(&self) -> bool {
        self.handoff().active()
    }

    pub(crate) async fn relay_loop(
        self: Arc<Self>,
        mut shutdown: watch::Receiver<bool>,
        active: Active,
    ) -> Result<(), EngineError> {
        let handoff = self.handoff();
        let rounds = Arc::new(Semaphore::new(ROUNDS));
        let failures = Arc::new(AtomicU32::new(0));
        let mut last_claim: Option<Instant> = None;
        // Sent rows no apply transaction took are deleted by a task of their own, so a round
        // waiting for a slow broker or a backoff never keeps them past their wait.
        let sweeper = {
            let (engine, mut shutdown) = (self.clone(), shutdown.clone());
            tokio::spawn(async move {
                while !*shutdown.borrow() {
                    let wait = engine.handoff().sent_due_in().unwrap_or(SENT_WAIT);
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        _ = shutdown.changed() => {}
                    }
                    if engine.handoff().sent_due_in() == Some(Duration::ZERO) {
                        engine.delete_sent_now().await;
                    }
                }
            })
        };
        while !*shutdown.borrow() {
            let failed = failures.load(Ordering::Relaxed);
            if failed > 0 {
                tokio::select! {
                    () = tokio::time::sleep(backoff(failed)) => {}
                    _ = shutdown.changed() => {}
                }
            }
            let Ok(permit) = rounds.clone().acquire_owned().await else {
                break;
            };
            let since_claim = last_claim.map_or(Duration::MAX, |t| t.elapsed());
            let mut batch = if since_claim >= CLAIM_AT_LEAST {
                Vec::new()
            } else {
                handoff.take(BATCH)
            };
            if batch.is_empty() && since_claim >= CLAIM_EVERY {
                last_claim = Some(Instant::now());
                match self.store().claim_outbox(now_ms(), LEASE_MS, BATCH).await {
                    Ok(claimed) => {
                        self.metrics().claimed(claimed.len());
                        batch = claimed;
                    }
                    Err(e) => {
                        failures.fetch_add(1, Ordering::Relaxed);
                        warn!(error = %e, "outbox relay could not claim rows; retrying");
                    }
                }
                if batch.is_empty() {
                    batch = handoff.take(BATCH);
                }
            }
            if batch.is_empty() {
                drop(permit);
                let wait =
                    CLAIM_EVERY.saturating_sub(last_claim.map_or(Duration::ZERO, |t| t.elapsed()));
                tokio::select! {
                    () = handoff.ready.notified() => {}
                    () = tokio::time::sleep(wait) => {}
                    _ = shutdown.changed() => {}
                }
                continue;
            }
            let (engine, failures) = (self.clone(), failures.clone());
            let (sent, on_the_wire) = tokio::sync::oneshot::channel();
            tokio::spawn(async move {
                match engine.send_claimed(batch, sent, Deleted::ByNextWrite).await {
                    Ok(_) => failures.store(0, Ordering::Relaxed),
                    Err(e) => {
                        failures.fetch_add(1, Ordering::Relaxed);
                        warn!(error = %e, "outbox relay failed; retrying");
                    }
                }
                drop(permit);
            });
            // The next batch goes out behind this one, not beside it: wire order is outbox
            // order. Its confirms are awaited meanwhile.
            let _ = on_the_wire.await;
        }
        drop(active);
        // What is in flight finishes (or its lease runs out if we are killed first); what was
        // handed off and not sent yet is given back for the next relay to claim at once.
        let _ = rounds.acquire_many(ROUNDS as u32).await;
        let _ = sweeper.await;
        // Every sent row, not only one write's worth.
        while self.handoff().sent_due_in().is_some() {
            if !self.delete_sent_now().await {
                break;
            }
        }
        let left: Vec<String> = handoff.drain().into_iter().map(|c| c.message.id).collect();
        if let Err(e) = self.store().release_lease(&left).await {
            warn!(error = %e, rows = left.len(), "could not give unsent outbox rows back; they are claimed after their grace");
        }
        Ok(())
    }

    /// Publishes one batch of outbox rows that any relay may claim now; returns how many were
    /// sent.
    pub async fn relay_once(&self) -> Result<usize, EngineError> {
        let claimed = self.store().claim_outbox(now_ms(), LEASE_MS, BATCH).await?;
        if claimed.is_empty() {
            return Ok(0);
        }
        self.metrics().claimed(claimed.len());
        let (sent, _) = tokio::sync::oneshot::channel();
        self.send_claimed(claimed, sent, Deleted::Now).await
    }

    /// Deletes the sent rows no apply transaction took (see [`crate::handoff`]); on failure
    /// they wait for the next transaction or look. False if that failed.
    async fn delete_sent_now(&self) -> bool {
        let sent = self.handoff().take_sent();
        if sent.ids.is_empty() {
            return true;
        }
        if let Err(e) = self.store().delete_sent(&sent.ids).await {
            warn!(error = %e, rows = sent.ids.len(), "could not delete sent outbox rows; trying again");
            self.handoff().sent_again(sent);
            return false;
        }
        true
    }

    /// Publishes rows in order, then deletes the confirmed ones and gives the others back.
    async fn send_claimed(
        &self,
        claimed: Vec<Claimed>,
        sent: tokio::sync::oneshot::Sender<()>,
        deleted: Deleted,
    ) -> Result<usize, EngineError> {
        let total = claimed.len();
        let ids: Vec<String> = claimed.iter().map(|c| c.message.id.clone()).collect();
        let messages = claimed
            .into_iter()
            .map(|c| (c.destination, c.message))
            .collect();
        let confirms = self.transport().publish_batch_staged(messages, sent).await;
        let mut sent = Vec::with_capacity(total);
        let mut back = Vec::new();
        for (id, confirm) in ids.into_iter().zip(confirms) {
            match confirm {
                Ok(()) => sent.push(id),
                Err(e) => {
                    warn!(error = %e, "publish not confirmed; will resend");
                    back.push(id);
                }
            }
        }
        let confirmed = sent.len();
        match deleted {
            Deleted::Now => self.store().delete_sent(&sent).await?,
            Deleted::ByNextWrite => self.handoff().sent(sent),
        }
        if let Err(e) = self.store().release_lease(&back).await {
            // Their lease (or grace) runs out on its own.
            warn!(error = %e, "could not give unconfirmed outbox rows back");
        }
        self.metrics().published(confirmed);
        if confirmed == 0 {
            // Nothing went out (broker down?): an error, so the relay loop backs off.
            return Err(EngineError::Refused(format!(
                "none of {total} outbox messages was confirmed by the broker"
            )));
        }
        Ok(confirmed)
    }
}

/// Who deletes the rows a round sent.
#[derive(Debug, Clone, Copy)]
enum Deleted {
    /// The round, at once (a relay without an engine's transactions beside it).
    Now,
    /// The engine's next apply transaction, or the relay loop after
    /// [`crate::handoff::SENT_WAIT`].
    ByNextWrite,
}

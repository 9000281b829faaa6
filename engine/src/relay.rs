//! The outbox relay: publishes committed outbox rows and marks them sent once the broker has
//! confirmed them.
//!
//! A round is three steps and never holds a database transaction open while the broker works:
//! claim a batch (one statement, a lease: [`crate::store::outbox`]), publish it pipelined in
//! outbox order — every message sent, then every confirm awaited — and mark the confirmed ones
//! sent (one statement). What was not confirmed is given back at once and sent again later;
//! receivers deduplicate.
//!
//! Per-key order on the wire: one relay publishes a batch in outbox order on one channel. Rows
//! of one key claimed by two engines' relays at once could cross, but the engine writes a
//! saga's next command only after the reply to the previous one, so commands of one key are
//! causally ordered anyway; what may cross are retries of one step, which the worker's barrier
//! and attempt numbers make harmless.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::warn;

use crate::engine::{Engine, EngineError, backoff};
use crate::store::now_ms;

/// Rows claimed at once.
const BATCH: usize = 500;
/// How long a claim is ours; a relay that died is replaced after this.
const LEASE_MS: i64 = 10_000;

impl Engine {
    pub(crate) async fn relay_loop(
        self: Arc<Self>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), EngineError> {
        let mut failures = 0u32;
        while !*shutdown.borrow() {
            match self.relay_once().await {
                Ok(0) => {
                    failures = 0;
                    tokio::select! {
                        () = self.outbox_ready_notified() => {}
                        () = tokio::time::sleep(Duration::from_millis(200)) => {}
                        _ = shutdown.changed() => {}
                    }
                }
                Ok(_) => failures = 0,
                Err(e) => {
                    failures += 1;
                    warn!(error = %e, "outbox relay failed; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(backoff(failures)) => {}
                        _ = shutdown.changed() => {}
                    }
                }
            }
        }
        Ok(())
    }

    /// Publishes one batch of unsent outbox rows; returns how many were sent.
    pub async fn relay_once(&self) -> Result<usize, EngineError> {
        let claimed = self.store().claim_outbox(now_ms(), LEASE_MS, BATCH).await?;
        if claimed.is_empty() {
            return Ok(0);
        }
        let messages = claimed
            .iter()
            .map(|c| (c.destination.clone(), c.message.clone()))
            .collect();
        let confirms = self.transport().publish_batch(messages).await;
        let mut sent = Vec::with_capacity(claimed.len());
        let mut back = Vec::new();
        for (c, confirm) in claimed.iter().zip(confirms) {
            match confirm {
                Ok(()) => sent.push(c.id),
                Err(e) => {
                    warn!(error = %e, "publish not confirmed; will resend");
                    back.push(c.id);
                }
            }
        }
        self.store().mark_sent(&sent, now_ms()).await?;
        if let Err(e) = self.store().release_lease(&back).await {
            // Their lease runs out on its own.
            warn!(error = %e, "could not give unconfirmed outbox rows back");
        }
        self.metrics().published(sent.len());
        if sent.is_empty() {
            // Nothing went out (broker down?): an error, so the relay loop backs off.
            return Err(EngineError::Refused(format!(
                "none of {} outbox messages was confirmed by the broker",
                claimed.len()
            )));
        }
        Ok(sent.len())
    }
}

//! The engine keeps the deployment's dead letters: it consumes the transport's dead-letter
//! queue (the engine's own, every worker's, and what the broker set aside itself) into the
//! database ([`crate::store::dead_letters`]), where `sagaflow dead-letters` and the HTTP API
//! list, show, replay and purge them. A letter is acknowledged only after it is stored.

use std::sync::Arc;

use tokio::sync::watch;
use tracing::{debug, warn};

use crate::engine::{Engine, EngineError, backoff};
use crate::transport::TransportError;

impl Engine {
    /// Moves dead letters into the database until shutdown.
    pub(crate) async fn dead_letter_loop(
        self: Arc<Self>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), EngineError> {
        let mut failures = 0u32;
        loop {
            let consumer = tokio::select! {
                c = self.transport().consume_dead_letters() => c,
                _ = shutdown.changed() => return Ok(()),
            };
            let mut consumer = match consumer {
                Ok(c) => c,
                Err(TransportError::Closed) => return Ok(()),
                Err(e) => {
                    failures += 1;
                    warn!(error = %e, "cannot consume the dead-letter queue; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(backoff(failures)) => continue,
                        _ = shutdown.changed() => return Ok(()),
                    }
                }
            };
            loop {
                let next = tokio::select! {
                    n = consumer.next() => n,
                    _ = shutdown.changed() => return Ok(()),
                };
                let Some(delivery) = next else {
                    return Ok(());
                };
                match self.store().keep_dead_letters(&delivery.letters).await {
                    Ok(new) => {
                        failures = 0;
                        debug!(new, "dead letters kept");
                        if let Err(e) = delivery.ack().await {
                            // Redelivered, and kept once: the letter's id is the same.
                            warn!(error = %e, "acknowledging a kept dead letter failed");
                        }
                    }
                    Err(e) => {
                        failures += 1;
                        warn!(error = %e, "cannot keep dead letters in the database; they go back to their queue");
                        let _ = delivery.nack().await;
                        tokio::select! {
                            () = tokio::time::sleep(backoff(failures)) => {}
                            _ = shutdown.changed() => return Ok(()),
                        }
                    }
                }
            }
        }
    }
}

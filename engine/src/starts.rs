//! Saga starts requested by applications through their own outbox (the `sagaflow-client`
//! crate): the consumer of the [`START_QUEUE`].
//!
//! An application writes a start request in its own database transaction; its relay publishes
//! the committed request at least once. Here each request is decoded, its definition looked up
//! by name and the saga started with the request's idempotency key, then the message is
//! acknowledged — after the start committed. A request delivered twice, or by two relays, finds
//! the saga its key already started: one saga per key.
//!
//! A request that can never be acted on — not a start message, no idempotency key, a saga name
//! the engine does not know, an input its definition refuses — is dead-lettered with its reason:
//! kept for an operator, never dropped, never blocking the queue. A database error gives the
//! message back (and the rest of its key's messages, in order) and backs off.
//!
//! Messages are taken in batches and handled in lanes by their key: one key's messages one after
//! another and in queue order, different keys concurrently.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{debug, warn};

use crate::engine::{Engine, EngineError, Started};
use crate::transport::{Delivery, Message, START_QUEUE, Transport};
use crate::wire::StartMsg;

/// Deliveries taken from the queue at once.
const BATCH: usize = 128;

/// Why a start message was not acted on.
#[derive(Debug)]
enum StartFailure {
    /// It never can be: dead-letter it with this reason.
    Poison(String),
    /// The database failed: give it back and try again later.
    Transient(EngineError),
}

impl Engine {
    /// Consumes [`START_QUEUE`] until `shutdown` turns true.
    pub(crate) async fn start_loop(
        self: Arc<Self>,
        transport: Arc<dyn Transport>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), EngineError> {
        let Some(mut consumer) =
            crate::engine::consume_retrying(&*transport, START_QUEUE, &mut shutdown).await
        else {
            return Ok(());
        };
        let mut failures = 0u32;
        loop {
            let first = tokio::select! {
                d = consumer.next() => d,
                _ = shutdown.changed() => None,
            };
            let Some(first) = first else { return Ok(()) };
            let mut deliveries = vec![first];
            while deliveries.len() < BATCH {
                match consumer.try_next() {
                    Some(d) => deliveries.push(d),
                    None => break,
                }
            }
            let lanes = lanes(deliveries);
            let done =
                futures::future::join_all(lanes.into_iter().map(|lane| self.start_lane(lane)))
                    .await;
            if done.iter().all(|ok| *ok) {
                failures = 0;
            } else {
                failures += 1;
                tokio::select! {
                    () = tokio::time::sleep(backoff(failures)) => {}
                    _ = shutdown.changed() => return Ok(()),
                }
            }
        }
    }

    /// Handles one key's deliveries in order. On a database error, that delivery and the rest
    /// of the lane are given back (last first, so they come again in their order); returns false.
    async fn start_lane(&self, lane: Vec<Delivery>) -> bool {
        let mut lane = lane.into_iter();
        while let Some(d) = lane.next() {
            match self.start_from_message(&d.message).await {
                Ok(started) => {
                    debug!(
                        message = %d.message.id,
                        saga.id = %started.id,
                        existing = started.existing,
                        "start request handled"
                    );
                    if let Err(e) = d.ack().await {
                        // Redelivered later and found by its idempotency key: still one saga.
                        warn!(error = %e, "acknowledging a start request failed");
                    }
                }
                Err(StartFailure::Poison(reason)) => {
                    self.dead_letter(d, START_QUEUE, &reason).await;
                }
                Err(StartFailure::Transient(e)) => {
                    warn!(message = %d.message.id, error = %e, "starting a saga failed; the request will be redelivered");
                    let back: Vec<Delivery> = std::iter::once(d).chain(lane).collect();
                    for d in back.into_iter().rev() {
                        let _ = d.nack().await;
                    }
                    return false;
                }
            }
        }
        true
    }

    /// Decodes a start request and starts its saga (idempotently by its key).
    async fn start_from_message(&self, message: &Message) -> Result<Started, StartFailure> {
        let start: StartMsg = serde_json::from_slice(&message.payload)
            .map_err(|e| StartFailure::Poison(format!("undecodable start message: {e}")))?;
        if start.idempotency_key.is_empty() {
            return Err(StartFailure::Poison(format!(
                "start message for saga `{}` without an idempotency key (it could start twice)",
                start.saga
            )));
        }
        let refused = |e: EngineError| match e {
            EngineError::Store(_) => StartFailure::Transient(e),
            other => StartFailure::Poison(format!(
                "cannot start saga `{}` (idempotency key `{}`): {other}",
                start.saga, start.idempotency_key
            )),
        };
        let graph = self
            .definition_by_name(&start.saga)
            .await
            .map_err(refused)?;
        self.start(&graph, start.input.clone(), Some(&start.idempotency_key))
            .await
            .map_err(refused)
    }
}

/// Splits a batch into lanes by message key, each lane in queue order, lanes in order of their
/// first message.
fn lanes(deliveries: Vec<Delivery>) -> Vec<Vec<Delivery>> {
    let mut lanes: Vec<Vec<Delivery>> = Vec::new();
    let mut index = std::collections::HashMap::<String, usize>::new();
    for d in deliveries {
        match index.get(&d.message.key) {
            Some(&i) => lanes[i].push(d),
            None => {
                index.insert(d.message.key.clone(), lanes.len());
                lanes.push(vec![d]);
            }
        }
    }
    lanes
}

fn backoff(failures: u32) -> Duration {
    Duration::from_millis((50u64 << failures.min(7)).min(5_000))
}

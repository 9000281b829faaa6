//! The inbound loop, one for each queue the engine consumes: replies from the workers and
//! saga starts relayed from applications' own outboxes (the `sagaflow-client` crate).
//!
//! Both do the same: take what is ready (up to [`BATCH`] deliveries), decode each message,
//! apply the batch in one transaction ([`crate::apply`]), and only then acknowledge. What
//! comes back per message decides what happens to its delivery:
//!
//! | result | delivery |
//! |---|---|
//! | applied, ignored, or a duplicate | acknowledged |
//! | undecodable; a reply for an unknown saga or for a step its saga does not have; a start without an idempotency key, for an unknown definition or with an input its definition refuses | dead-lettered with the reason (kept for an operator, never blocking the queue) |
//! | a database error | given back (redelivered), and the loop backs off |
//!
//! A start is idempotent by its key, a reply by the saga's state (the machine applies a reply
//! only to the operation and attempt it is waiting for, see [`crate::machine`]), so a message
//! delivered twice — or applied and then redelivered because its ack was lost — has one effect.

use std::sync::Arc;

use tokio::sync::watch;
use tracing::{debug, warn};

use crate::apply::{Done, Inbound, StartRequest};
use crate::engine::{Applied, Engine, EngineError, Incoming, backoff, consume_retrying};
use crate::machine::Event;
use crate::transport::{Delivery, REPLY_QUEUE, START_QUEUE};
use crate::wire::{ReplyMsg, StartMsg};

/// Deliveries applied in one transaction at most.
pub const BATCH: usize = 256;

/// Batches applied at once per queue (each in its own transaction, on its own connection).
/// Measured: one lane per queue makes batches 6× larger than four (71 items against 12) and
/// the whole system faster (232 against ~180 sagas/s), since the database is CPU-bound on
/// statements; the lanes stay for when that changes.
pub const LANES: usize = 1;

/// An error that no redelivery can mend (the saga's definition is gone or no longer compiles,
/// its row is corrupt): the message is dead-lettered with it rather than redelivered forever.
fn is_permanent(e: &EngineError) -> bool {
    match e {
        EngineError::UnknownDefinition(_) | EngineError::BrokenDefinition { .. } => true,
        EngineError::Store(s) => s.is_permanent(),
        _ => false,
    }
}

/// Batches applied and waiting for their deliveries to be settled, per lane.
const SETTLING: usize = 8;

/// An applied batch's deliveries, each with its work and what applying it did.
type Settlement = Vec<((Delivery, Inbound), Result<Done, EngineError>)>;

/// What becomes of a delivery once its batch was applied: the one decision both the loop (which
/// backs off when something comes again) and [`Engine::settle`] act on.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// Applied, ignored or a duplicate.
    Ack,
    /// Kept for an operator with this reason, never blocking the queue.
    DeadLetter(String),
    /// Given back to be redelivered (a database error, or a reply that failed otherwise).
    Again,
}

fn verdict(inbound: &Inbound, result: &Result<Done, EngineError>) -> Verdict {
    let saga = || match inbound {
        Inbound::Event(e) => e.saga_id.as_str(),
        Inbound::Start(_) => "?",
    };
    match result {
        Ok(Done::Applied(Applied::UnknownSaga)) => {
            Verdict::DeadLetter(format!("reply for unknown saga {}", saga()))
        }
        Ok(Done::Applied(Applied::UnknownStep(step))) => {
            Verdict::DeadLetter(format!("reply for unknown step #{step} of saga {}", saga()))
        }
        Ok(_) => Verdict::Ack,
        Err(e) if is_permanent(e) => Verdict::DeadLetter(format!("cannot be applied: {e}")),
        Err(EngineError::Store(_) | EngineError::Interrupted(_)) => Verdict::Again,
        Err(e) => match inbound {
            Inbound::Start(s) => Verdict::DeadLetter(format!(
                "cannot start saga `{}` (idempotency key `{}`): {e}",
                s.graph.name(),
                s.idempotency_key.as_deref().unwrap_or("")
            )),
            Inbound::Event(_) => Verdict::Again,
        },
    }
}

/// Which queue an inbound loop consumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queue {
    Replies,
    Starts,
}

impl Queue {
    fn name(self) -> &'static str {
        match self {
            Queue::Replies => REPLY_QUEUE,
            Queue::Starts => START_QUEUE,
        }
    }
}

/// Why a message was not turned into inbound work.
#[derive(Debug)]
enum Refusal {
    /// It never can be: dead-letter it with this reason.
    Poison(String),
    /// The database failed while looking something up: give it back.
    Transient(EngineError),
}

impl Engine {
    /// Consumes `queue` until `shutdown` turns true.
    pub(crate) async fn inbound_loop(
        self: Arc<Self>,
        queue: Queue,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), EngineError> {
        let Some(mut consumer) =
            consume_retrying(&**self.transport(), queue.name(), &mut shutdown).await
        else {
            return Ok(());
        };
        // Lanes by key (one by default, see LANES): one key's messages always go to the same
        // lane, and a lane waits for its batch's answer before it sends the next, so a key's
        // messages are applied in queue order.
        let mut lanes = Vec::with_capacity(LANES);
        let mut tasks = Vec::with_capacity(LANES);
        for _ in 0..LANES {
            let (tx, mut rx) = tokio::sync::mpsc::channel::<Delivery>(BATCH);
            lanes.push(tx);
            let engine = self.clone();
            let mut shutdown = shutdown.clone();
            // A batch's deliveries are settled (acknowledged, given back, dead-lettered) by a
            // task of their own, in batch order, while the lane applies the next batch: the
            // acknowledgements are not on the path of the next batch's messages.
            let (settle, mut to_settle) = tokio::sync::mpsc::channel::<Settlement>(SETTLING);
            let settler = {
                let engine = self.clone();
                tokio::spawn(async move {
                    while let Some(batch) = to_settle.recv().await {
                        engine.settle(queue, batch).await;
                    }
                })
            };
            tasks.push(tokio::spawn(async move {
                let mut failures = 0u32;
                while let Some(first) = rx.recv().await {
                    let mut deliveries = vec![first];
                    while deliveries.len() < BATCH {
                        match rx.try_recv() {
                            Ok(d) => deliveries.push(d),
                            Err(_) => break,
                        }
                    }
                    let (ok, settlement) = engine.handle_batch(queue, deliveries).await;
                    if let Err(tokio::sync::mpsc::error::SendError(settlement)) =
                        settle.send(settlement).await
                    {
                        engine.settle(queue, settlement).await;
                    }
                    if ok {
                        failures = 0;
                    } else {
                        failures += 1;
                        tokio::select! {
                            () = tokio::time::sleep(backoff(failures)) => {}
                            _ = shutdown.changed() => {}
                        }
                    }
                }
                // What was applied is settled before the loop ends.
                drop(settle);
                let _ = settler.await;
            }));
        }
        loop {
            let next = tokio::select! {
                d = consumer.next() => d,
                _ = shutdown.changed() => None,
            };
            let Some(d) = next else { break };
            let lane = crate::transport::lane_of(&d.message.key, lanes.len());
            if lanes[lane].send(d).await.is_err() {
                break;
            }
        }
        drop(lanes);
        for t in tasks {
            let _ = t.await;
        }
        Ok(())
    }

    /// Decodes and applies one batch of deliveries; returns false if some must come again (the
    /// loop backs off), and what to do with each delivery once the batch committed.
    async fn handle_batch(&self, queue: Queue, deliveries: Vec<Delivery>) -> (bool, Settlement) {
        let mut work = Vec::with_capacity(deliveries.len());
        let mut held = Vec::with_capacity(deliveries.len());
        // The replies' `apply` spans (when traces are on), open while their batch is applied.
        let mut spans = Vec::new();
        let mut ok = true;
        for d in deliveries {
            match self.decode(queue, &d).await {
                Ok((inbound, span)) => {
                    work.push(inbound);
                    held.push(d);
                    if let Some(span) = span {
                        spans.push(span);
                    }
                }
                Err(Refusal::Poison(reason)) => self.dead_letter(d, queue.name(), &reason).await,
                Err(Refusal::Transient(e)) => {
                    warn!(message = %d.message.id, error = %e, "cannot handle a message now; it will be redelivered");
                    ok = false;
                    let _ = d.nack().await;
                }
            }
        }
        if work.is_empty() {
            return (ok, Vec::new());
        }
        let (work, results) = self.apply_grouped(work).await;
        drop(spans);
        if work.len() != held.len() {
            // No answer (the group commit's task died): all of it comes again; the saga's
            // state and the starts' idempotency keys make a second apply harmless.
            for d in held {
                let _ = d.nack().await;
            }
            return (false, Vec::new());
        }
        ok &= !results
            .iter()
            .zip(&work)
            .any(|(result, inbound)| verdict(inbound, result) == Verdict::Again);
        let settlement = held.into_iter().zip(work).zip(results).collect();
        (ok, settlement)
    }

    /// Acknowledges, gives back or dead-letters each delivery of an applied batch, by what
    /// applying it did.
    async fn settle(&self, queue: Queue, settlement: Settlement) {
        for ((d, inbound), result) in settlement {
            match verdict(&inbound, &result) {
                Verdict::Ack => {
                    if let Ok(Done::Started(s)) = &result {
                        debug!(message = %d.message.id, saga.id = %s.id, existing = s.existing, "start request handled");
                    }
                    if let Err(e) = d.ack().await {
                        // Redelivered later and recognised (state, idempotency key).
                        warn!(error = %e, "acknowledging a message failed");
                    }
                }
                Verdict::DeadLetter(reason) => self.dead_letter(d, queue.name(), &reason).await,
                Verdict::Again => {
                    if let Err(e) = &result {
                        warn!(message = %d.message.id, error = %e, "applying a message failed; it will be redelivered");
                    }
                    let _ = d.nack().await;
                }
            }
        }
    }

    /// The work in a delivery, and for a reply its `apply` span when traces are on.
    async fn decode(
        &self,
        queue: Queue,
        d: &Delivery,
    ) -> Result<(Inbound, Option<tracing::Span>), Refusal> {
        match queue {
            Queue::Replies => {
                let reply: ReplyMsg = serde_json::from_slice(&d.message.payload)
                    .map_err(|e| Refusal::Poison(format!("undecodable reply: {e}")))?;
                let span =
                    crate::trace::enabled().then(|| crate::trace::apply(&reply, &d.message.key));
                let incoming = Inbound::Event(Incoming {
                    saga_id: reply.saga_id.clone(),
                    event: Event::Reply {
                        step: reply.step,
                        op: reply.op,
                        attempt: reply.attempt,
                        outcome: reply.outcome,
                    },
                    timer_id: None,
                });
                Ok((incoming, span))
            }
            Queue::Starts => {
                let start: StartMsg = serde_json::from_slice(&d.message.payload)
                    .map_err(|e| Refusal::Poison(format!("undecodable start message: {e}")))?;
                if start.idempotency_key.is_empty() {
                    return Err(Refusal::Poison(format!(
                        "start message for saga `{}` without an idempotency key (it could start twice)",
                        start.saga
                    )));
                }
                let refused = |e: EngineError| match e {
                    EngineError::Store(_) => Refusal::Transient(e),
                    other => Refusal::Poison(format!(
                        "cannot start saga `{}` (idempotency key `{}`): {other}",
                        start.saga, start.idempotency_key
                    )),
                };
                let graph = self
                    .definition_by_name(&start.saga)
                    .await
                    .map_err(refused)?;
                let sequence_key =
                    crate::input::sequence_key(&graph, &start.input).map_err(refused)?;
                Ok((
                    Inbound::Start(StartRequest {
                        graph,
                        input: start.input,
                        sequence_key,
                        idempotency_key: Some(start.idempotency_key),
                        trace: start.traceparent,
                        tracestate: start.tracestate,
                    }),
                    None,
                ))
            }
        }
    }

    /// Sets a message aside that can never be handled, with its reason (logged and counted).
    pub(crate) async fn dead_letter(&self, d: Delivery, queue: &str, reason: &str) {
        warn!(message = %d.message.id, queue, reason, "dead-lettering a message");
        match d.dead_letter(reason).await {
            Ok(()) => self.metrics().dead_lettered(queue),
            Err(e) => {
                warn!(error = %e, "dead-lettering failed; the message goes back to its queue")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreError;

    #[test]
    fn each_result_has_one_verdict_for_a_reply() {
        let reply = Inbound::Event(Incoming {
            saga_id: "s-1".into(),
            event: Event::Begin,
            timer_id: None,
        });
        let v = |r: Result<Done, EngineError>| verdict(&reply, &r);
        assert_eq!(v(Ok(Done::Applied(Applied::Changed))), Verdict::Ack);
        assert_eq!(v(Ok(Done::Applied(Applied::Ignored))), Verdict::Ack);
        assert_eq!(v(Ok(Done::Applied(Applied::Duplicate))), Verdict::Ack);
        assert_eq!(
            v(Ok(Done::Applied(Applied::UnknownSaga))),
            Verdict::DeadLetter("reply for unknown saga s-1".into())
        );
        assert_eq!(
            v(Ok(Done::Applied(Applied::UnknownStep(7)))),
            Verdict::DeadLetter("reply for unknown step #7 of saga s-1".into())
        );
        // A database error comes again; a definition that is gone never will be applied.
        assert_eq!(
            v(Err(EngineError::Store(StoreError::Conflict("s-1".into())))),
            Verdict::Again
        );
        assert_eq!(
            v(Err(EngineError::UnknownDefinition("order".into()))),
            Verdict::DeadLetter(
                "cannot be applied: no saga definition named `order` (register it by starting it from its YAML file)".into()
            )
        );
        assert_eq!(
            v(Err(EngineError::Store(StoreError::Corrupt {
                table: "sagas",
                detail: "bad state".into()
            }))),
            Verdict::DeadLetter("cannot be applied: corrupt row in sagas: bad state".into())
        );
        // Any other failure of a reply: redelivered (the saga may accept it later).
        assert_eq!(v(Err(EngineError::Refused("busy".into()))), Verdict::Again);
    }
}

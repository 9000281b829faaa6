//! The worker runtime: what the SDK does around a handler.
//!
//! It consumes its service's command queue, routes each command to a *lane* by a stable hash of
//! its order key (one key, one lane, handled in arrival order; different keys in parallel),
//! runs it behind the barrier, publishes the reply (waiting for the confirm), and only then
//! acknowledges the command. A crash anywhere in between redelivers the command, and the barrier
//! answers it again without a second effect.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use sagaflow_engine::machine::Outcome;
use sagaflow_engine::transport::{Delivery, Message, REPLY_QUEUE, Transport, command_queue};
use sagaflow_engine::wire::{CommandMsg, ReplyMsg};
use sqlx::AnyPool;
use tokio::sync::{mpsc, watch};
use tracing::{debug, warn};

use crate::barrier::{self, Handler};
use crate::sdk::{SagaStep, StepContext, TccStep};

/// Failures to inject on purpose (demos and fault tests). Rates are probabilities per command.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Faults {
    /// Business failures of forward operations (`insufficient funds`-like answers).
    pub business: f64,
    /// Transient failures of any operation (rolled back, retried by the engine).
    pub transient: f64,
    /// Slow answers: the handler waits `slow_for` first (may exceed the step timeout).
    pub slow: f64,
    pub slow_for: Duration,
}

/// Counters for summaries and tests.
#[derive(Debug, Default)]
pub struct Stats {
    pub handled: std::sync::atomic::AtomicU64,
    pub duplicates: std::sync::atomic::AtomicU64,
    pub undecodable: std::sync::atomic::AtomicU64,
}

/// A service's worker: its handlers, database, transport and fault settings.
#[derive(Debug)]
pub struct Worker {
    service: String,
    pool: AnyPool,
    transport: Arc<dyn Transport>,
    /// (forward operation name, is TCC) → handler.
    handlers: HashMap<String, Handler>,
    faults: Faults,
    lanes: usize,
    pub stats: Arc<Stats>,
}

impl Worker {
    pub fn new(service: &str, pool: AnyPool, transport: Arc<dyn Transport>) -> Self {
        Worker {
            service: service.to_owned(),
            pool,
            transport,
            handlers: HashMap::new(),
            faults: Faults::default(),
            lanes: 16,
            stats: Arc::default(),
        }
    }

    /// Registers a saga step under its action's name.
    pub fn saga_step(mut self, action: &str, step: impl SagaStep + 'static) -> Self {
        self.handlers
            .insert(action.to_owned(), Handler::Saga(Arc::new(step)));
        self
    }

    /// Registers a TCC step under its try's name.
    pub fn tcc_step(mut self, r#try: &str, step: impl TccStep + 'static) -> Self {
        self.handlers
            .insert(r#try.to_owned(), Handler::Tcc(Arc::new(step)));
        self
    }

    pub fn with_faults(mut self, faults: Faults) -> Self {
        self.faults = faults;
        self
    }

    pub fn with_lanes(mut self, lanes: usize) -> Self {
        self.lanes = lanes.max(1);
        self
    }

    pub fn service(&self) -> &str {
        &self.service
    }

    /// Whether this worker can run the forward operation `name` (definition checks at start).
    pub fn handles(&self, name: &str) -> bool {
        self.handlers.contains_key(name)
    }

    /// Consumes commands until `shutdown`; then stops taking new ones, lets the lanes finish
    /// what they hold, and returns.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) -> Result<(), String> {
        let queue = command_queue(&self.service);
        let mut consumer = tokio::select! {
            c = self.transport.consume(&queue) => c.map_err(|e| format!("{}: {e}", self.service))?,
            _ = shutdown.changed() => return Ok(()),
        };
        let this = Arc::new(self);
        let mut lanes = Vec::with_capacity(this.lanes);
        let mut tasks = Vec::with_capacity(this.lanes);
        for _ in 0..this.lanes {
            // Bounded: a slow lane applies backpressure instead of buffering without limit.
            let (tx, mut rx) = mpsc::channel::<Delivery>(64);
            lanes.push(tx);
            let worker = this.clone();
            tasks.push(tokio::spawn(async move {
                while let Some(d) = rx.recv().await {
                    worker.handle(d).await;
                }
            }));
        }
        loop {
            let next = tokio::select! {
                d = consumer.next() => d,
                _ = shutdown.changed() => None,
            };
            let Some(delivery) = next else { break };
            let lane = lane_of(&delivery.message.key, lanes.len());
            if lanes[lane].send(delivery).await.is_err() {
                break;
            }
        }
        drop(lanes);
        for t in tasks {
            let _ = t.await;
        }
        drop(consumer); // anything not acknowledged goes back to the queue
        Ok(())
    }

    async fn handle(&self, delivery: Delivery) {
        let cmd: CommandMsg = match serde_json::from_slice(&delivery.message.payload) {
            Ok(c) => c,
            Err(e) => {
                self.stats
                    .undecodable
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                warn!(service = %self.service, message = %delivery.message.id, error = %e, "undecodable command; dropping it");
                let _ = delivery.ack().await;
                return;
            }
        };
        let outcome = self.execute(&cmd).await;
        let reply = ReplyMsg {
            saga_id: cmd.saga_id.clone(),
            step: cmd.step,
            op: cmd.op,
            attempt: cmd.attempt,
            outcome,
        };
        let message = Message {
            id: reply.message_id(),
            key: cmd.key.clone(),
            payload: serde_json::to_vec(&reply).unwrap_or_default(),
        };
        match self.transport.publish(REPLY_QUEUE, message).await {
            Ok(()) => {
                let _ = delivery.ack().await;
            }
            Err(e) => {
                // Not acknowledged: the command comes again and the barrier answers it again.
                warn!(service = %self.service, error = %e, "reply not confirmed; command will be redelivered");
                let _ = delivery.nack().await;
            }
        }
    }

    async fn execute(&self, cmd: &CommandMsg) -> Outcome {
        let Some(handler) = self.handlers.get(&cmd.forward) else {
            return Outcome::Business {
                code: "unknown_operation".into(),
                message: format!(
                    "service `{}` has no step whose forward operation is `{}`",
                    self.service, cmd.forward
                ),
            };
        };
        let ctx = StepContext {
            saga_id: cmd.saga_id.clone(),
            step: cmd.step_id.clone(),
            operation: cmd.operation.clone(),
            attempt: cmd.attempt,
            key: cmd.key.clone(),
        };
        let f = self.faults;
        if f.slow > 0.0 && fastrand::f64() < f.slow {
            tokio::time::sleep(f.slow_for).await;
        }
        if f.transient > 0.0 && fastrand::f64() < f.transient {
            return Outcome::Retryable {
                message: format!("injected transient failure in {}", self.service),
            };
        }
        let injected;
        let handler = if cmd.op.is_forward() && f.business > 0.0 && fastrand::f64() < f.business {
            injected = Handler::Refuse {
                code: "injected".into(),
                message: format!("injected business failure in {}", self.service),
            };
            &injected
        } else {
            handler
        };
        let result = barrier::execute(&self.pool, handler, cmd.op, &ctx, &cmd.params).await;
        match result {
            Ok(executed) => {
                self.stats
                    .handled
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if executed.duplicate {
                    self.stats
                        .duplicates
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    debug!(service = %self.service, saga.id = %cmd.saga_id, step.id = %cmd.step_id, "duplicate command answered from the barrier");
                }
                executed.outcome
            }
            Err(e) => Outcome::Retryable {
                message: format!("{} database: {e}", self.service),
            },
        }
    }
}

/// A stable lane for a key: FNV-1a, the same in every process and release.
pub fn lane_of(key: &str, lanes: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % lanes.max(1) as u64) as usize
}

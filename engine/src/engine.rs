//! The engine: what it holds, and the loops it runs.
//!
//! Everything an engine does is in the database first, so each loop can stop and restart at
//! any point:
//! * **inbound** ([`crate::inbound`]): consume the reply queue and the start queue, apply
//!   what arrives in batches ([`crate::apply`]), acknowledge after commit;
//! * **relay** ([`crate::relay`]): publish committed outbox rows, mark them sent after the
//!   broker confirmed them;
//! * **timers** ([`crate::timers`]): fire due timers (retry backoff, step timeouts), claimed by
//!   deleting their row in the transaction that applies them.
//!
//! Starting sagas ([`Engine::start`], [`Engine::start_many`]) and the operator actions
//! ([`crate::operator`]) go through the same apply path.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use sagaflow_dsl::SagaGraph;
use serde_json::Value;
use tokio::sync::{Notify, watch};
use tracing::warn;

use crate::apply::{Done, Inbound, StartRequest};
use crate::machine::Event;
use crate::metrics::Metrics;
use crate::store::{Store, StoreError};
use crate::transport::Transport;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("no saga with id {0}")]
    UnknownSaga(String),
    #[error("no saga definition named `{0}` (register it by starting it from its YAML file)")]
    UnknownDefinition(String),
    #[error("definition {hash} is stored but does not compile any more: {detail}")]
    BrokenDefinition { hash: String, detail: String },
    #[error("invalid input for saga `{saga}`: {detail}")]
    InvalidInput { saga: String, detail: String },
    #[error("{0}")]
    Refused(String),
}

impl From<sqlx::Error> for EngineError {
    fn from(e: sqlx::Error) -> Self {
        EngineError::Store(StoreError::Db(e))
    }
}

/// One event to apply to one saga.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub saga_id: String,
    pub event: Event,
    /// For replies: the message id, recorded in the inbox so a redelivery is dropped.
    pub message_id: Option<String>,
    /// For timers: the timer row, deleted in the same transaction (the claim).
    pub timer_id: Option<String>,
}

/// What applying an event did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    Changed,
    Ignored,
    Duplicate,
    UnknownSaga,
    /// A reply naming a step its saga does not have (step index): it can never apply, so the
    /// inbound loop dead-letters it with that reason.
    UnknownStep(usize),
}

/// A saga that was started (or found by its idempotency key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Started {
    pub id: String,
    /// True when the idempotency key matched an existing saga: nothing new was started.
    pub existing: bool,
}

#[derive(Debug)]
pub struct Engine {
    store: Store,
    transport: Arc<dyn Transport>,
    /// Definition hash → compiled graph.
    pub(crate) graphs: RwLock<HashMap<String, Arc<SagaGraph>>>,
    /// Definition name → hash of the latest registered version.
    pub(crate) names: RwLock<HashMap<String, String>>,
    /// Outbox rows this engine committed, on their way to its relay.
    handoff: Arc<crate::handoff::Handoff>,
    metrics: Metrics,
    timers_changed: Notify,
    /// When the timer loop plans to look next (ms); a timer due earlier wakes it.
    next_timer_check: AtomicI64,
}

impl Engine {
    pub fn new(store: Store, transport: Arc<dyn Transport>) -> Arc<Engine> {
        Arc::new(Engine {
            store,
            transport,
            graphs: RwLock::default(),
            names: RwLock::default(),
            handoff: Arc::default(),
            metrics: Metrics::new(),
            timers_changed: Notify::new(),
            next_timer_check: AtomicI64::new(0),
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub(crate) fn transport(&self) -> &Arc<dyn Transport> {
        &self.transport
    }

    /// This engine's Prometheus metrics (served by `GET /metrics`, see [`crate::http`]).
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Where committed outbox rows go to this engine's relay.
    pub(crate) fn handoff(&self) -> &crate::handoff::Handoff {
        &self.handoff
    }

    pub(crate) fn handoff_shared(&self) -> Arc<crate::handoff::Handoff> {
        self.handoff.clone()
    }

    /// A timer due at `due` was committed: wake the timer loop if it planned to sleep past it.
    pub(crate) fn timer_set(&self, due: i64) {
        if due < self.next_timer_check.load(Ordering::Relaxed) {
            self.timers_changed.notify_one();
        }
    }

    /// The timer loop's plan: it looks again at `at` (ms) unless woken earlier.
    pub(crate) fn plan_timer_check(&self, at: i64) {
        self.next_timer_check.store(at, Ordering::Relaxed);
    }

    pub(crate) async fn timers_changed_notified(&self) {
        self.timers_changed.notified().await;
    }

    /// Starts a saga: checks the input, writes the saga and (if its sequence key is free) its
    /// first commands in one transaction. With an idempotency key, starting twice starts once.
    pub async fn start(
        &self,
        graph: &Arc<SagaGraph>,
        input: Value,
        idempotency_key: Option<&str>,
    ) -> Result<Started, EngineError> {
        let mut done = self
            .start_many(graph, vec![(input, idempotency_key.map(str::to_owned))])
            .await;
        done.pop()
            .unwrap_or_else(|| Err(EngineError::Refused("no start was applied".into())))
    }

    /// Starts many sagas of one definition in one transaction (falling back to smaller ones
    /// if it fails); one result per input, in order.
    pub async fn start_many(
        &self,
        graph: &Arc<SagaGraph>,
        inputs: Vec<(Value, Option<String>)>,
    ) -> Vec<Result<Started, EngineError>> {
        let mut results: Vec<Option<Result<Started, EngineError>>> = Vec::new();
        let mut batch = Vec::new();
        let mut slots = Vec::new();
        for (input, idempotency_key) in inputs {
            match crate::input::sequence_key(graph, &input) {
                Ok(sequence_key) => {
                    slots.push(results.len());
                    results.push(None);
                    batch.push(Inbound::Start(StartRequest {
                        graph: graph.clone(),
                        input,
                        sequence_key,
                        idempotency_key,
                    }));
                }
                Err(e) => results.push(Some(Err(e))),
            }
        }
        for (slot, done) in slots.into_iter().zip(self.apply_inbound(&batch).await) {
            results[slot] = Some(done.and_then(|d| match d {
                Done::Started(s) => Ok(s),
                Done::Refused(why) => Err(EngineError::Refused(why)),
                Done::Applied(a) => Err(EngineError::Refused(format!(
                    "a start was applied as an event ({a:?})"
                ))),
            }));
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(EngineError::Refused("start lost".into()))))
            .collect()
    }

    /// Applies events (one transaction for all when it can); the first error if any failed.
    pub async fn apply(&self, batch: &[Incoming]) -> Result<Vec<Applied>, EngineError> {
        let inbound: Vec<Inbound> = batch.iter().cloned().map(Inbound::Event).collect();
        self.apply_inbound(&inbound)
            .await
            .into_iter()
            .map(crate::apply::applied)
            .collect()
    }

    /// Runs the loops until `shutdown` turns true.
    pub async fn run(self: Arc<Self>, shutdown: watch::Receiver<bool>) -> Result<(), EngineError> {
        let active = crate::handoff::Active::new(self.handoff_shared());
        let relay = tokio::spawn(self.clone().relay_loop(shutdown.clone(), active));
        let timers = tokio::spawn(self.clone().timer_loop(shutdown.clone()));
        let replies = tokio::spawn(
            self.clone()
                .inbound_loop(crate::inbound::Queue::Replies, shutdown.clone()),
        );
        let starts = tokio::spawn(
            self.clone()
                .inbound_loop(crate::inbound::Queue::Starts, shutdown.clone()),
        );
        let dead = tokio::spawn(self.clone().dead_letter_loop(shutdown.clone()));
        let (a, b, c, d, e) = tokio::join!(relay, timers, replies, starts, dead);
        for r in [a, b, c, d, e] {
            match r {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(join) => return Err(EngineError::Refused(format!("engine task died: {join}"))),
            }
        }
        Ok(())
    }
}

/// Starts consuming `queue`, retrying with backoff (logged) until it works or shutdown: a loop
/// must never die quietly while the rest of the engine runs on. None on shutdown.
pub(crate) async fn consume_retrying(
    transport: &dyn Transport,
    queue: &str,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<Box<dyn crate::transport::Consumer>> {
    let mut failures = 0u32;
    loop {
        tokio::select! {
            c = transport.consume(queue) => match c {
                Ok(c) => return Some(c),
                Err(e) => {
                    failures += 1;
                    warn!(queue, error = %e, "cannot consume; retrying");
                }
            },
            _ = shutdown.changed() => return None,
        }
        tokio::select! {
            () = tokio::time::sleep(backoff(failures)) => {}
            _ = shutdown.changed() => return None,
        }
    }
}

/// How long a loop waits after `failures` failures in a row.
pub(crate) fn backoff(failures: u32) -> Duration {
    Duration::from_millis((50u64 << failures.min(7)).min(5_000))
}

pub(crate) fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

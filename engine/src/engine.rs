//! The engine: what it holds (store, transport, definitions, hand-off, metrics), its errors and
//! results. The loops it runs, each in its own file and started together by [`crate::run`]:
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
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use sagaflow_dsl::SagaGraph;
use serde_json::Value;
use tokio::sync::{Notify, watch};
use tracing::warn;

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
    /// The group commit's task died while applying the work: whether it committed is unknown
    /// (a redelivered reply or a start with an idempotency key is safe to apply again).
    #[error("interrupted: {0}")]
    Interrupted(String),
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
    /// For timers: the timer row, deleted in the same transaction (the claim).
    pub timer_id: Option<String>,
}

/// A saga start, its input already checked (see [`crate::input`]).
#[derive(Debug, Clone)]
pub struct StartRequest {
    pub graph: Arc<SagaGraph>,
    pub input: Value,
    pub sequence_key: String,
    pub idempotency_key: Option<String>,
    /// The caller's W3C trace context (a `traceparent`), if it sent one: the saga's trace
    /// continues it (see [`crate::trace`]).
    pub trace: Option<String>,
    /// The `tracestate` that came with it, if any: carried on beside it.
    pub tracestate: Option<String>,
}

/// One piece of inbound work.
#[derive(Debug, Clone)]
pub enum Inbound {
    Event(Incoming),
    Start(StartRequest),
}

/// What applying one piece of inbound work did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Done {
    Applied(Applied),
    Started(Started),
    /// Refused for a reason no retry changes (a reused idempotency key with another input).
    /// Only inside the apply path: [`Engine::apply_inbound`](crate::Engine::apply_inbound) hands it out as
    /// [`EngineError::Refused`].
    Refused(String),
}

/// What applying an event did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    Changed,
    /// The machine found nothing it applies to (a redelivered or late reply, a stale attempt):
    /// recorded in the timeline as `ignored`, nothing else changed.
    Ignored,
    /// A timer another transaction claimed first.
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
    /// The group commit every apply goes through ([`crate::group`]).
    group: crate::group::Group<Inbound, Result<Done, EngineError>>,
    /// This engine, for the group commit's task (which must not keep it alive).
    me: Weak<Engine>,
}

impl Engine {
    pub fn new(store: Store, transport: Arc<dyn Transport>) -> Arc<Engine> {
        Arc::new_cyclic(|me| Engine {
            store,
            transport,
            graphs: RwLock::default(),
            names: RwLock::default(),
            handoff: Arc::default(),
            metrics: Metrics::new(),
            timers_changed: Notify::new(),
            next_timer_check: AtomicI64::new(0),
            group: crate::group::Group::default(),
            me: me.clone(),
        })
    }

    pub(crate) fn group(&self) -> &crate::group::Group<Inbound, Result<Done, EngineError>> {
        &self.group
    }

    pub(crate) fn weak(&self) -> Weak<Engine> {
        self.me.clone()
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

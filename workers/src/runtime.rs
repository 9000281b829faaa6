//! The worker runtime: what the SDK does around a handler.
//!
//! It consumes its service's command queue and routes each command to a *lane* by a stable hash
//! of its order key (one key, one lane, handled in arrival order; different keys in parallel).
//! A lane works in **batches**: it waits for a command, takes whatever else is already queued
//! for it (up to [`Worker::with_batch`], default [`DEFAULT_BATCH`]), runs the batch behind the
//! barrier in one database transaction ([`crate::barrier`]), then publishes the batch's replies
//! all at once and acknowledges each command only when its own reply is confirmed. The next
//! batch starts after that, so a key's commands are handled, answered and acknowledged in
//! arrival order. A crash anywhere in between redelivers the commands, and the barrier answers
//! them again without a second effect. (A handler registered with [`Idempotency::Weak`] is
//! deduplicated by a Redis key instead, claimed for the whole batch in one round trip: see
//! [`crate::weak`].)
//!
//! Each lane holds at most one database connection at a time, so a worker needs at most
//! [`DEFAULT_LANES`] connections by default (plus one for barrier retention).
//!
//! A **poison command** — one that can never be handled: not a command at all, meant for another
//! service, naming an operation this worker has no handler for, or an operation its step kind
//! does not have — is dead-lettered with a reason saying what is wrong
//! ([`Delivery::dead_letter`]): kept aside for an operator, never silently dropped, and its lane
//! goes on with the next command. The saga's step then times out and is retried or compensated
//! by the engine as usual.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sagaflow_engine::machine::{Op, Outcome};
use sagaflow_engine::transport::{Delivery, Message, REPLY_QUEUE, Transport, command_queue};
use sagaflow_engine::wire::{CommandMsg, ReplyMsg};
use sqlx::AnyPool;
use tokio::sync::{mpsc, watch};
use tracing::{debug, warn};

use crate::barrier::{self, Executed, Handler, Job};
use crate::sdk::{SagaStep, StepContext, TccStep};
use crate::weak::{Claim, Finish, WeakError, WeakIdempotency};

/// How a handler's commands are deduplicated (chosen per handler at registration).
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub enum Idempotency {
    /// Strong: a barrier row per (saga, step, operation), committed with the effect
    /// ([`crate::barrier`]).
    #[default]
    Barrier,
    /// Weak: a Redis key per (saga, step, operation) holding the reply ([`crate::weak`]).
    Weak(WeakIdempotency),
}

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
    pub handled: AtomicU64,
    pub duplicates: AtomicU64,
    /// Commands that were not even a command (also counted in `dead_lettered`).
    pub undecodable: AtomicU64,
    /// Poison commands set aside in the dead-letter queue.
    pub dead_lettered: AtomicU64,
    /// Database transactions the worker committed: one per batch, plus one per command of a
    /// batch that had to be run one by one.
    pub commits: AtomicU64,
    /// Batches first tried without savepoints and redone with them because a handler failed
    /// (see [`barrier::Optimism`]).
    pub redone_with_savepoints: AtomicU64,
}

/// Lanes by default: each holds at most one database connection at a time, so a worker
/// process needs at most this many (plus one for barrier retention).
pub const DEFAULT_LANES: usize = 1;

/// Commands a lane takes into one batch (one transaction) by default.
pub const DEFAULT_BATCH: usize = 64;

/// A registered handler and how its commands are deduplicated.
#[derive(Debug, Clone)]
struct Registered {
    handler: Handler,
    idempotency: Idempotency,
}

/// A service's worker: its handlers, database, transport and fault settings.
#[derive(Debug)]
pub struct Worker {
    service: String,
    pool: AnyPool,
    transport: Arc<dyn Transport>,
    /// Forward operation name → handler.
    handlers: HashMap<String, Registered>,
    faults: Faults,
    lanes: usize,
    batch: usize,
    optimism: barrier::Optimism,
    pub stats: Arc<Stats>,
}

/// Reply batches a lane lets wait for their confirms while it goes on with the next batch.
const REPLYING: usize = 8;

/// A batch's replies and the commands they answer, for the lane's reply task.
type Answered = (Vec<Message>, Vec<Delivery>);

impl Worker {
    pub fn new(service: &str, pool: AnyPool, transport: Arc<dyn Transport>) -> Self {
        Worker {
            service: service.to_owned(),
            pool,
            transport,
            handlers: HashMap::new(),
            faults: Faults::default(),
            lanes: DEFAULT_LANES,
            batch: DEFAULT_BATCH,
            optimism: barrier::Optimism::default(),
            stats: Arc::default(),
        }
    }

    /// Registers a saga step under its action's name, behind the barrier (strong idempotency).
    pub fn saga_step(self, action: &str, step: impl SagaStep + 'static) -> Self {
        self.saga_step_with(action, step, Idempotency::Barrier)
    }

    /// Registers a TCC step under its try's name, behind the barrier (strong idempotency).
    pub fn tcc_step(self, r#try: &str, step: impl TccStep + 'static) -> Self {
        self.tcc_step_with(r#try, step, Idempotency::Barrier)
    }

    /// Registers a saga step under its action's name, deduplicated as `idempotency` says
    /// (e.g. `Idempotency::Weak(weak.clone())`; see [`crate::weak`] for what that gives up).
    pub fn saga_step_with(
        mut self,
        action: &str,
        step: impl SagaStep + 'static,
        idempotency: Idempotency,
    ) -> Self {
        let handler = Handler::Saga(Arc::new(step));
        self.handlers.insert(
            action.to_owned(),
            Registered {
                handler,
                idempotency,
            },
        );
        self
    }

    /// Registers a TCC step under its try's name, deduplicated as `idempotency` says.
    pub fn tcc_step_with(
        mut self,
        r#try: &str,
        step: impl TccStep + 'static,
        idempotency: Idempotency,
    ) -> Self {
        let handler = Handler::Tcc(Arc::new(step));
        self.handlers.insert(
            r#try.to_owned(),
            Registered {
                handler,
                idempotency,
            },
        );
        self
    }

    pub fn with_faults(mut self, faults: Faults) -> Self {
        self.faults = faults;
        self
    }

    /// How many keys are handled in parallel ([`DEFAULT_LANES`]); each lane holds at most one
    /// database connection at a time.
    pub fn with_lanes(mut self, lanes: usize) -> Self {
        self.lanes = lanes.max(1);
        self
    }

    /// The most commands a lane takes into one batch, i.e. one database transaction
    /// ([`DEFAULT_BATCH`]); 1 handles every command in a transaction of its own.
    /// Whether batches first run without savepoints (the default, see
    /// [`barrier::Optimism`]) or always with one per handler.
    pub fn with_optimistic_batches(mut self, on: bool) -> Self {
        self.optimism = if on {
            barrier::Optimism::default()
        } else {
            barrier::Optimism::never()
        };
        self
    }

    pub fn with_batch(mut self, max: usize) -> Self {
        self.batch = max.max(1);
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
            let (tx, mut rx) = mpsc::channel::<Delivery>(this.batch.max(64));
            lanes.push(tx);
            let worker = this.clone();
            // The lane's replies go out in its batches' order, from a task of their own, so the
            // lane does not wait a confirm round trip per batch (see `handle_batch`).
            let (answered, mut to_send) = mpsc::channel::<Answered>(REPLYING);
            let transport = this.transport.clone();
            let service = this.service.clone();
            let replier = tokio::spawn(async move {
                while let Some((replies, deliveries)) = to_send.recv().await {
                    send_replies(&*transport, &service, replies, deliveries).await;
                }
            });
            tasks.push(tokio::spawn(async move {
                // A batch is whatever arrived while the previous one ran: no waiting to fill
                // it, so a lone command is not delayed. One batch at a time keeps each key's
                // commands in arrival order.
                while let Some(first) = rx.recv().await {
                    let mut batch = vec![first];
                    while batch.len() < worker.batch {
                        match rx.try_recv() {
                            Ok(d) => batch.push(d),
                            Err(_) => break,
                        }
                    }
                    worker.handle_batch(batch, &answered).await;
                }
                drop(answered);
                // The last replies are confirmed and their commands acknowledged before we go.
                let _ = replier.await;
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
        // The last replies are confirmed and their commands acknowledged before we go.
        drop(consumer); // anything not acknowledged goes back to the queue
        Ok(())
    }

    /// Handles a lane's batch: decodes it, runs every command it can in one database
    /// transaction, then publishes the replies pipelined and acknowledges each command once
    /// its reply is confirmed.
    async fn handle_batch(&self, deliveries: Vec<Delivery>, answered: &mpsc::Sender<Answered>) {
        let mut todo = Vec::with_capacity(deliveries.len());
        for delivery in deliveries {
            match self.decode(&delivery.message.payload) {
                Ok((cmd, registered)) => todo.push((delivery, cmd, registered)),
                Err(reason) => {
                    self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
                    warn!(service = %self.service, message = %delivery.message.id, %reason, "poison command; dead-lettering it");
                    if let Err(e) = delivery.dead_letter(&reason).await {
                        warn!(service = %self.service, error = %e, "dead-lettering failed; the command goes back to its queue");
                    }
                }
            }
        }
        if todo.is_empty() {
            return;
        }
        let cmds: Vec<(&CommandMsg, &Registered)> =
            todo.iter().map(|(_, cmd, r)| (cmd, *r)).collect();
        // Each command's `worker` span (when traces are on), open while its batch runs.
        let spans: Vec<tracing::Span> = if sagaflow_engine::trace::enabled() {
            cmds.iter()
                .map(|(cmd, _)| sagaflow_engine::trace::worker(cmd, &self.service))
                .collect()
        } else {
            Vec::new()
        };
        let outcomes = self.execute_batch(&cmds).await;
        let replies: Vec<Message> = todo
            .iter()
            .zip(outcomes)
            .enumerate()
            .map(|(i, ((_, cmd, _), outcome))| {
                let mut reply = ReplyMsg {
                    traceparent: None,
                    tracestate: None,
                    saga_id: cmd.saga_id.clone(),
                    step: cmd.step,
                    op: cmd.op,
                    attempt: cmd.attempt,
                    outcome,
                };
                let carried = match spans.get(i) {
                    Some(span) => sagaflow_engine::trace::reply(span, &reply, &cmd.key),
                    // No spans here: the command's context goes back unchanged, so the
                    // engine's `apply` span stays in the saga's trace (the child of its
                    // `dispatch` span) even when this process exports nothing.
                    None => sagaflow_engine::trace::pass_on_carried(
                        cmd.traceparent.as_deref(),
                        cmd.tracestate.as_deref(),
                    ),
                };
                (reply.traceparent, reply.tracestate) = (carried.traceparent, carried.tracestate);
                Message {
                    id: reply.message_id(),
                    key: cmd.key.clone(),
                    payload: serde_json::to_vec(&reply).unwrap_or_default(),
                }
            })
            .collect();
        // The replies go out while the lane runs its next batch: waiting here for the broker's
        // confirms would leave the lane (and its connection) idle for a confirm round trip per
        // batch. Each command is acknowledged only once its own reply is confirmed (what is not
        // confirmed comes again, and the barrier answers it again).
        let deliveries: Vec<Delivery> = todo.into_iter().map(|(d, _, _)| d).collect();
        if let Err(mpsc::error::SendError((replies, deliveries))) =
            answered.send((replies, deliveries)).await
        {
            send_replies(&*self.transport, &self.service, replies, deliveries).await;
        }
    }

    /// The command in a payload and its handler, or why it can never be handled (the reason
    /// the dead letter carries).
    fn decode(&self, payload: &[u8]) -> Result<(CommandMsg, &Registered), String> {
        let cmd: CommandMsg = serde_json::from_slice(payload).map_err(|e| {
            self.stats.undecodable.fetch_add(1, Ordering::Relaxed);
            format!("undecodable command: {e}")
        })?;
        let what = format!(
            "command {} ({} of step `{}` of saga {})",
            cmd.message_id(),
            cmd.operation,
            cmd.step_id,
            cmd.saga_id
        );
        if cmd.service != self.service {
            return Err(format!(
                "{what} is for service `{}` but was delivered to `{}`'s queue",
                cmd.service, self.service
            ));
        }
        if cmd.saga_id.is_empty() || cmd.step_id.is_empty() {
            return Err(format!("{what} has no saga id or no step id"));
        }
        let Some(registered) = self.handlers.get(&cmd.forward) else {
            let mut known: Vec<&str> = self.handlers.keys().map(String::as_str).collect();
            known.sort_unstable();
            return Err(format!(
                "{what}: service `{}` has no step whose forward operation is `{}` (it has: {})",
                self.service,
                cmd.forward,
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                }
            ));
        };
        if !registered.handler.accepts(cmd.op) {
            let kind = match registered.handler {
                Handler::Tcc(_) => "a TCC step (try, confirm, cancel)",
                _ => "a saga step (action, compensate)",
            };
            return Err(format!(
                "{what}: `{}` is {kind}, which has no `{}` operation",
                cmd.forward, cmd.op
            ));
        }
        Ok((cmd, registered))
    }

    /// The outcomes of a batch of decoded commands, in order: injected faults first, then the
    /// weak commands' claims (one Redis round trip per weak store), then one database
    /// transaction for everything that runs a handler, then the weak answers recorded (one
    /// round trip again).
    async fn execute_batch(&self, cmds: &[(&CommandMsg, &Registered)]) -> Vec<Outcome> {
        let mut slots = Vec::with_capacity(cmds.len());
        for &(cmd, registered) in cmds {
            slots.push(self.prepare(cmd, registered).await);
        }
        let stores = self.claim_weak(&mut slots).await;

        // One transaction for every command that runs a handler.
        let mut job_of = Vec::new();
        let mut jobs = Vec::new();
        for (i, slot) in slots.iter().enumerate() {
            let barrier = match (&slot.registered.idempotency, &slot.claim) {
                _ if slot.injected.is_some() || slot.executed.is_some() => continue,
                (Idempotency::Barrier, _) => true,
                (_, Some(Claim::Run { .. })) => false,
                _ => continue,
            };
            jobs.push(Job {
                handler: &slot.handler,
                op: slot.cmd.op,
                ctx: &slot.ctx,
                params: &slot.cmd.params,
                barrier,
            });
            job_of.push(i);
        }
        let run = barrier::execute_batch_with(&self.pool, &jobs, &self.optimism).await;
        self.stats.commits.fetch_add(run.commits, Ordering::Relaxed);
        self.stats
            .redone_with_savepoints
            .fetch_add(run.abandoned, Ordering::Relaxed);
        let mut weak_results = HashMap::new();
        for (i, result) in job_of.into_iter().zip(run.results) {
            match slots[i].registered.idempotency {
                Idempotency::Barrier => {
                    slots[i].executed =
                        Some(result.map_err(|e| format!("{} database: {e}", self.service)));
                }
                _ => {
                    weak_results.insert(i, result.map_err(WeakError::Db));
                }
            }
        }
        self.finish_weak(&mut slots, &stores, weak_results).await;
        slots.into_iter().map(|slot| self.answer(slot)).collect()
    }

    /// A command's context, and the faults injected into it. The sleep of a slow answer comes
    /// before the batch's transaction opens, so it does not hold a connection.
    async fn prepare<'a>(&self, cmd: &'a CommandMsg, registered: &'a Registered) -> Slot<'a> {
        let f = self.faults;
        if f.slow > 0.0 && fastrand::f64() < f.slow {
            tokio::time::sleep(f.slow_for).await;
        }
        let injected =
            (f.transient > 0.0 && fastrand::f64() < f.transient).then(|| Outcome::Retryable {
                message: format!("injected transient failure in {}", self.service),
            });
        let handler = if cmd.op.is_forward() && f.business > 0.0 && fastrand::f64() < f.business {
            Handler::Refuse {
                code: "injected".into(),
                message: format!("injected business failure in {}", self.service),
            }
        } else {
            registered.handler.clone()
        };
        Slot {
            cmd,
            registered,
            ctx: StepContext {
                saga_id: cmd.saga_id.clone(),
                step: cmd.step_id.clone(),
                operation: cmd.operation.clone(),
                attempt: cmd.attempt,
                key: cmd.key.clone(),
            },
            handler,
            injected,
            claim: None,
            executed: None,
        }
    }

    /// Claims the weak commands' keys, one round trip per Redis store, in batch order; returns
    /// the stores and their commands' indices (for [`Self::finish_weak`]).
    async fn claim_weak<'a>(
        &self,
        slots: &mut [Slot<'a>],
    ) -> Vec<(&'a WeakIdempotency, Vec<usize>)> {
        let mut stores: Vec<(&'a WeakIdempotency, Vec<usize>)> = Vec::new();
        for (i, slot) in slots.iter().enumerate() {
            if let (Idempotency::Weak(w), None) = (&slot.registered.idempotency, &slot.injected) {
                match stores.iter_mut().find(|(s, _)| s.same(w)) {
                    Some((_, members)) => members.push(i),
                    None => stores.push((w, vec![i])),
                }
            }
        }
        for (weak, members) in &stores {
            let asked: Vec<(&StepContext, Op)> = members
                .iter()
                .map(|&i| (&slots[i].ctx, slots[i].cmd.op))
                .collect();
            let claims = weak.claim_batch(&asked).await;
            for (&i, claim) in members.iter().zip(claims) {
                match claim {
                    Claim::Answered(r) => {
                        slots[i].executed = Some(r.map_err(|e| format!("{}: {e}", self.service)));
                    }
                    Claim::Same(j) => slots[i].claim = Some(Claim::Same(members[j])),
                    other => slots[i].claim = Some(other),
                }
            }
        }
        stores
    }

    /// Records or releases the claimed keys (one round trip per store) and answers the weak
    /// commands: those that ran with their results, a repeat inside the batch with its first
    /// occurrence's answer.
    async fn finish_weak(
        &self,
        slots: &mut [Slot<'_>],
        stores: &[(&WeakIdempotency, Vec<usize>)],
        mut ran: HashMap<usize, Result<Executed, WeakError>>,
    ) {
        for (weak, members) in stores {
            let mut finishes = Vec::new();
            for &i in members {
                let result = match slots[i].claim.take() {
                    Some(Claim::Run {
                        key,
                        token,
                        attempt,
                    }) => {
                        let result = ran.remove(&i).unwrap_or_else(|| {
                            Err(WeakError::Db(sqlx::Error::Protocol("no answer".into())))
                        });
                        finishes.push(Finish::after(key, token, attempt, &result));
                        result
                    }
                    Some(Claim::Decided {
                        key,
                        token,
                        attempt,
                        outcome,
                    }) => {
                        finishes.push(Finish::Record {
                            key,
                            token,
                            attempt,
                            outcome: outcome.clone(),
                        });
                        Ok(Executed {
                            outcome,
                            duplicate: false,
                        })
                    }
                    other => {
                        slots[i].claim = other;
                        continue;
                    }
                };
                slots[i].executed = Some(result.map_err(|e| format!("{}: {e}", self.service)));
            }
            weak.finish_batch(finishes).await;
        }
        for i in 0..slots.len() {
            if let Some(Claim::Same(j)) = slots[i].claim {
                slots[i].executed = slots[j].executed.clone().map(|r| {
                    r.map(|e| Executed {
                        duplicate: true,
                        ..e
                    })
                });
            }
        }
    }

    /// The reply's outcome for a command, counted in the stats.
    fn answer(&self, slot: Slot<'_>) -> Outcome {
        if let Some(outcome) = slot.injected {
            return outcome;
        }
        match slot.executed {
            Some(Ok(executed)) => {
                self.stats.handled.fetch_add(1, Ordering::Relaxed);
                if executed.duplicate {
                    self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                    debug!(service = %self.service, saga.id = %slot.cmd.saga_id, step.id = %slot.cmd.step_id, "duplicate command answered from its record");
                }
                executed.outcome
            }
            Some(Err(message)) => Outcome::Retryable { message },
            None => Outcome::Retryable {
                message: format!("{}: the command was not run", self.service),
            },
        }
    }
}

/// A decoded command on its way through a batch.
struct Slot<'a> {
    cmd: &'a CommandMsg,
    registered: &'a Registered,
    ctx: StepContext,
    /// The registered handler, or an injected business failure.
    handler: Handler,
    /// An injected transient failure: answered as it is, not counted as handled.
    injected: Option<Outcome>,
    /// A weak command's key, between its claim and its finish.
    claim: Option<Claim>,
    executed: Option<Result<Executed, String>>,
}

/// Publishes a batch's replies in order, then acknowledges each command whose reply was
/// confirmed and gives back the others.
async fn send_replies(
    transport: &dyn Transport,
    service: &str,
    replies: Vec<Message>,
    deliveries: Vec<Delivery>,
) {
    let messages = replies
        .into_iter()
        .map(|m| (REPLY_QUEUE.to_owned(), m))
        .collect();
    let confirms = transport.publish_batch(messages).await;
    if confirms.iter().any(Result::is_err) {
        // The broker refused or lost them: give the commands back after a pause, not at once,
        // or each comes straight back to be answered and refused again (and counts against a
        // quorum queue's delivery limit every time).
        tokio::time::sleep(REFUSED_REPLY_PAUSE).await;
    }
    for (delivery, confirmed) in deliveries.into_iter().zip(confirms) {
        match confirmed {
            Ok(()) => {
                let _ = delivery.ack().await;
            }
            Err(e) => {
                warn!(service = %service, error = %e, "reply not confirmed; command will be redelivered");
                let _ = delivery.nack().await;
            }
        }
    }
}

/// How long a worker waits before giving back commands whose replies the broker did not
/// confirm.
const REFUSED_REPLY_PAUSE: std::time::Duration = std::time::Duration::from_millis(500);

/// A stable lane for a key (the transport's hash: the same in every process and release).
pub fn lane_of(key: &str, lanes: usize) -> usize {
    sagaflow_engine::transport::lane_of(key, lanes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_trait::async_trait;
    use sagaflow_engine::machine::Op;
    use sagaflow_engine::store::{ENGINE_MIGRATIONS, Store};
    use sagaflow_engine::transport::memory::MemoryTransport;
    use serde_json::{Value, json};
    use std::sync::atomic::{AtomicU64, Ordering};

    use crate::sdk::StepError;

    /// Counts its actions.
    struct Count(Arc<AtomicU64>);

    #[async_trait]
    impl SagaStep for Count {
        async fn action(
            &self,
            _: &mut sqlx::AnyConnection,
            _: &StepContext,
            _: &Value,
        ) -> Result<Value, StepError> {
            Ok(json!({ "n": self.0.fetch_add(1, Ordering::SeqCst) + 1 }))
        }
        async fn compensate(
            &self,
            _: &mut sqlx::AnyConnection,
            _: &StepContext,
            _: &Value,
        ) -> Result<Value, StepError> {
            Ok(Value::Null)
        }
    }

    fn command(saga: &str, forward: &str, op: Op, service: &str) -> CommandMsg {
        CommandMsg {
            traceparent: None,
            tracestate: None,
            saga_id: saga.into(),
            saga: "test".into(),
            key: "order-1".into(),
            step: 0,
            step_id: "count".into(),
            service: service.into(),
            op,
            operation: forward.into(),
            forward: forward.into(),
            attempt: 1,
            params: json!({}),
        }
    }

    fn message(id: &str, payload: Vec<u8>) -> Message {
        Message {
            id: id.into(),
            key: "order-1".into(),
            payload,
        }
    }

    fn encoded(cmd: &CommandMsg) -> Message {
        message(
            &cmd.message_id(),
            serde_json::to_vec(cmd).expect("serializable"),
        )
    }

    #[tokio::test]
    async fn poison_commands_are_dead_lettered_with_their_reason_and_the_key_flows_on() {
        let dir = std::env::temp_dir().join(format!(
            "sagaflow-poison-{}-{:08x}",
            std::process::id(),
            fastrand::u32(..)
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let store = Store::connect(&dir.join("t.db").display().to_string(), 1)
            .await
            .expect("connect");
        store
            .migrate(&[ENGINE_MIGRATIONS, crate::services::MIGRATIONS])
            .await
            .expect("migrate");
        let transport = Arc::new(MemoryTransport::default());
        let queue = command_queue("counter");
        // All on one key (one lane), poison first, then a good command.
        let poison = [
            message("junk", b"{not json".to_vec()),
            encoded(&command("s-1", "nope", Op::Action, "counter")),
            encoded(&command("s-2", "count", Op::Action, "payment")),
            encoded(&command("s-3", "count", Op::Try, "counter")),
            encoded(&command("", "count", Op::Action, "counter")),
        ];
        for m in poison.iter().cloned() {
            transport.publish(&queue, m).await.expect("publish");
        }
        let mut good = command("s-ok", "count", Op::Action, "counter");
        let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        good.traceparent = Some(traceparent.into());
        good.tracestate = Some("vendor=x".into());
        transport
            .publish(&queue, encoded(&good))
            .await
            .expect("publish");

        let effects = Arc::new(AtomicU64::new(0));
        let worker = Worker::new(
            "counter",
            store.pool().clone(),
            transport.clone() as Arc<dyn Transport>,
        )
        .saga_step("count", Count(effects.clone()))
        .with_lanes(1);
        let stats = worker.stats.clone();
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(worker.run(stopped));
        let mut replies = transport.consume(REPLY_QUEUE).await.expect("consume");
        let reply = tokio::time::timeout(Duration::from_secs(10), replies.next())
            .await
            .expect("the good command is answered")
            .expect("a reply");
        let reply: ReplyMsg = serde_json::from_slice(&reply.message.payload).expect("a reply");
        assert_eq!(reply.saga_id, "s-ok");
        // Spans are off in this process: the command's context goes back as it came.
        assert_eq!(
            (reply.traceparent.as_deref(), reply.tracestate.as_deref()),
            (Some(traceparent), Some("vendor=x"))
        );
        assert_eq!(
            reply.outcome,
            Outcome::Ok {
                output: json!({"n": 1})
            }
        );
        assert_eq!(effects.load(Ordering::SeqCst), 1);
        let _ = stop.send(true);
        let _ = task.await;

        let dead = transport.dead_letters();
        let reasons: Vec<&str> = dead.iter().map(|d| d.reason.as_str()).collect();
        assert_eq!(dead.len(), poison.len(), "{reasons:#?}");
        for (d, sent) in dead.iter().zip(&poison) {
            assert_eq!(d.queue, queue);
            assert_eq!(&d.message, sent, "dead-lettered as it came");
        }
        assert!(
            reasons[0].starts_with("undecodable command:"),
            "{}",
            reasons[0]
        );
        assert!(
            reasons[1].contains("has no step whose forward operation is `nope` (it has: count)"),
            "{}",
            reasons[1]
        );
        assert!(
            reasons[2].contains("is for service `payment` but was delivered to `counter`'s queue"),
            "{}",
            reasons[2]
        );
        assert!(
            reasons[3].contains(
                "`count` is a saga step (action, compensate), which has no `try` operation"
            ),
            "{}",
            reasons[3]
        );
        assert!(reasons[4].contains("has no saga id"), "{}", reasons[4]);
        assert_eq!(stats.dead_lettered.load(Ordering::Relaxed), 5);
        assert_eq!(stats.undecodable.load(Ordering::Relaxed), 1);
        assert_eq!(transport.depth(&queue), 0, "nothing left unacknowledged");
        // Nothing reached the barrier but the good command.
        let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM barrier")
            .fetch_one(store.pool())
            .await
            .expect("count");
        assert_eq!(rows, 1);
        store.pool().close().await;
        let _ = std::fs::remove_dir_all(&dir);
    }
}

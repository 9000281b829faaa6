//! The apply path: a batch of inbound work (replies, due timers, operator events, starts) for
//! many sagas, applied in **one transaction with a fixed number of statements per table**.
//!
//! ```text
//!  claim timers ─ load sagas ─ new sagas take their keys
//!        │                                          │
//!        └──────── decide every event in memory, in batch order ──────┐
//!                                                                     │
//!  release keys of sagas that became final (and begin who was next) ◀─┘
//!        │
//!  write: new sagas · sagas (version-checked) · history · outbox · timers
//!         · the outbox rows the relay sent meanwhile (crate::handoff) ─ commit
//! ```
//!
//! What a batch guarantees is what one event alone does: a reply seen before (also twice in
//! one batch) finds its saga no longer waiting for it and is ignored by the machine, a timer
//! fires once (its row is deleted by the transaction that applies it), two events of one saga
//! are decided one after the other on the state the first left, and nothing is visible — no
//! outbox row, no state — unless all of it commits. If the batch fails (a concurrent engine moved a saga's version, a bad row, the
//! database), it is split in halves and each half applied on its own, down to single events,
//! so one bad event never holds the others back; a single event that loses an optimistic-lock
//! race is retried a few times.
//!
//! The engine's entry points into it are here too: [`Engine::start`], [`Engine::start_many`]
//! and [`Engine::apply`].

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use sagaflow_dsl::SagaGraph;
use serde_json::Value;

use crate::engine::{Applied, Engine, EngineError, Incoming, Started};
pub use crate::engine::{Done, Inbound, StartRequest};
use crate::machine::{self, Context, Decision, Event, HistoryEntry, SagaState, StepStatus};
use crate::machine::{TimerKind, decide, forward_op, operation_name};
use crate::store::KeyedSaga;
use crate::store::outbox::Claimed;
use crate::store::{
    Changes, HistoryRow, NewSaga, OutboxMessage, SagaRow, SagaTable, SagaWrite, StoreError,
    StoreTx, TimerRow, now_ms, timer_id,
};
use crate::transport::{Message, command_queue};
use crate::wire::CommandMsg;

impl Engine {
    /// Starts a saga: checks the input, writes the saga and (if its sequence key is free) its
    /// first commands in one transaction. With an idempotency key, starting twice starts once.
    pub async fn start(
        &self,
        graph: &Arc<SagaGraph>,
        input: Value,
        idempotency_key: Option<&str>,
    ) -> Result<Started, EngineError> {
        self.start_traced(graph, input, idempotency_key, None).await
    }

    /// [`start`](Engine::start), the saga's trace continuing `traceparent` (the caller's W3C
    /// trace context; a malformed one is ignored).
    pub async fn start_traced(
        &self,
        graph: &Arc<SagaGraph>,
        input: Value,
        idempotency_key: Option<&str>,
        traceparent: Option<&str>,
    ) -> Result<Started, EngineError> {
        let trace = crate::trace::Carried {
            traceparent: traceparent.map(str::to_owned),
            tracestate: None,
        };
        self.start_with_trace(graph, input, idempotency_key, &trace)
            .await
    }

    /// [`start_traced`](Engine::start_traced) with the `tracestate` that came with the
    /// caller's context, carried on beside it (a malformed one is dropped).
    pub async fn start_with_trace(
        &self,
        graph: &Arc<SagaGraph>,
        input: Value,
        idempotency_key: Option<&str>,
        trace: &crate::trace::Carried,
    ) -> Result<Started, EngineError> {
        let mut done = self
            .start_many_traced(
                graph,
                vec![(input, idempotency_key.map(str::to_owned))],
                trace,
            )
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
        self.start_many_traced(graph, inputs, &Default::default())
            .await
    }

    async fn start_many_traced(
        &self,
        graph: &Arc<SagaGraph>,
        inputs: Vec<(Value, Option<String>)>,
        trace: &crate::trace::Carried,
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
                        trace: trace.traceparent.clone(),
                        tracestate: trace.tracestate.clone(),
                    }));
                }
                Err(e) => results.push(Some(Err(e))),
            }
        }
        for (slot, done) in slots.into_iter().zip(self.apply_grouped(batch).await.1) {
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
        self.apply_grouped(inbound)
            .await
            .1
            .into_iter()
            .map(applied)
            .collect()
    }
}

/// A start whose idempotency key already started `saga`: the same start again (its answer is
/// that saga), or a different one under a reused key (refused, saying why).
fn same_start(key: &str, saga: &KeyedSaga, s: &StartRequest) -> Done {
    if saga.name == s.graph.name() && saga.input == s.input {
        return Done::Started(Started {
            id: saga.id.clone(),
            existing: true,
        });
    }
    let what = if saga.name != s.graph.name() {
        format!("saga `{}`, not `{}`", saga.name, s.graph.name())
    } else {
        "a different input".to_owned()
    };
    Done::Refused(format!(
        "idempotency key `{key}` already started saga {} with {what}; a key names one start, so a different start needs a new key",
        saga.id
    ))
}

/// What [`Engine::apply_grouped`] gives back: the items, and one result per item.
pub type Grouped = (Vec<Inbound>, Vec<Result<Done, EngineError>>);

impl Engine {
    /// Applies `work` together with whatever else is waiting to be applied (the group commit,
    /// see [`crate::group`]); gives the items back with one result per item, in order.
    pub async fn apply_grouped(&self, work: Vec<Inbound>) -> Grouped {
        let n = work.len();
        let me = self.weak();
        // What the group's task applies a group with: one try in one transaction.
        let applier = move || {
            move |items: Vec<Inbound>| {
                let me = me.clone();
                async move {
                    let Some(engine) = me.upgrade() else {
                        return (items, None);
                    };
                    match engine.apply_together(&items).await {
                        Ok(results) => (items, Some(results)),
                        Err(e) => {
                            tracing::debug!(error = %e, items = items.len(), "group failed; each job is applied alone");
                            (items, None)
                        }
                    }
                }
            }
        };
        match self.group().submit(work, applier).await {
            crate::group::Answer::Applied(work, results) => (work, results),
            // Its group failed as a whole: applied alone, in halves if need be, outside the
            // group, so one caller's bad item or a lost version race never holds the others
            // back.
            crate::group::Answer::Alone(work) => {
                let results = self.apply_inbound(&work).await;
                (work, results)
            }
            // The group's task died while applying (a panic): whether it committed is unknown.
            crate::group::Answer::Lost => (
                Vec::new(),
                (0..n)
                    .map(|_| {
                        Err(EngineError::Interrupted(
                            "the group commit failed while applying; the outcome is unknown".into(),
                        ))
                    })
                    .collect(),
            ),
        }
    }
}

/// Retries of a single event that lost an optimistic-lock race to another engine.
const CONFLICT_RETRIES: u32 = 8;

impl Engine {
    /// Applies a batch; one result per item, in order. Never fails as a whole: an item that
    /// cannot be applied gets its own error.
    pub async fn apply_inbound(&self, batch: &[Inbound]) -> Vec<Result<Done, EngineError>> {
        let mut results = Vec::with_capacity(batch.len());
        // Halves are applied in order, so two events of one saga keep their order.
        let mut work = vec![batch];
        while let Some(part) = work.pop() {
            match self.apply_with_retries(part).await {
                Ok(done) => results.extend(done.into_iter().map(|d| match d {
                    Done::Refused(why) => Err(EngineError::Refused(why)),
                    d => Ok(d),
                })),
                Err(e) if part.len() <= 1 => results.push(Err(e)),
                Err(e) => {
                    tracing::debug!(error = %e, size = part.len(), "batch failed; splitting it");
                    let (first, second) = part.split_at(part.len() / 2);
                    work.push(second);
                    work.push(first);
                }
            }
        }
        results
    }

    /// One try of a batch in one transaction, without [`Engine::apply_inbound`]'s halving and
    /// retries: one result per item, or the error that failed the whole (the group commit's
    /// try, see [`crate::group`]).
    pub(crate) async fn apply_together(
        &self,
        batch: &[Inbound],
    ) -> Result<Vec<Result<Done, EngineError>>, EngineError> {
        Ok(self
            .apply_once(batch)
            .await?
            .into_iter()
            .map(|d| match d {
                Done::Refused(why) => Err(EngineError::Refused(why)),
                d => Ok(d),
            })
            .collect())
    }

    async fn apply_with_retries(&self, batch: &[Inbound]) -> Result<Vec<Done>, EngineError> {
        let mut attempt = 0;
        loop {
            match self.apply_once(batch).await {
                Err(EngineError::Store(e))
                    if batch.len() == 1 && attempt < CONFLICT_RETRIES && e.is_race() =>
                {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(2 << attempt)).await;
                }
                // A concurrent start with the same idempotency key committed first: its saga
                // is the answer.
                Err(EngineError::Store(StoreError::Db(sqlx::Error::Database(db))))
                    if db.is_unique_violation()
                        && let [Inbound::Start(s)] = batch
                        && let Some(key) = &s.idempotency_key =>
                {
                    let mut tx = self.store().begin().await?;
                    let found = tx
                        .sagas_by_idempotency_key(std::slice::from_ref(key))
                        .await?;
                    tx.rollback().await?;
                    return match found.get(key) {
                        Some(saga) => Ok(vec![same_start(key, saga, s)]),
                        None => Err(StoreError::Db(sqlx::Error::Database(db)).into()),
                    };
                }
                other => return other,
            }
        }
    }

    async fn apply_once(&self, batch: &[Inbound]) -> Result<Vec<Done>, EngineError> {
        let started = std::time::Instant::now();
        let now = now_ms();
        let mut tx = self.store().begin().await?;
        let mut plan = Plan::default();
        let outcome = self.plan(&mut tx, &mut plan, batch, now).await;
        let results = match outcome {
            Ok(results) => results,
            Err(e) => {
                let _ = tx.rollback().await;
                return Err(e);
            }
        };
        // Outbox rows the relay sent meanwhile go with this write (see `crate::handoff`).
        let sent = self.handoff().take_sent();
        if let Err(e) = plan.write(&mut tx, now, &sent.ids).await {
            let _ = tx.rollback().await;
            self.handoff().sent_again(sent);
            return Err(e.into());
        }
        let planned = started.elapsed();
        if let Err(e) = tx.commit().await {
            self.handoff().sent_again(sent);
            return Err(e.into());
        }
        tracing::debug!(
            items = batch.len(),
            sagas = plan.sagas.len(),
            plan_ms = planned.as_secs_f64() * 1e3,
            total_ms = started.elapsed().as_secs_f64() * 1e3,
            "batch applied"
        );
        for done in &results {
            if let Done::Started(Started {
                existing: false, ..
            }) = done
            {
                self.metrics().saga_started();
            }
        }
        let handed_off: Vec<Claimed> = std::mem::take(&mut plan.outbox)
            .into_iter()
            .filter(|m| m.handed_off)
            .map(|m| Claimed {
                destination: m.destination,
                message: Message {
                    id: m.message_id,
                    key: m.routing_key,
                    payload: m.payload.into_bytes(),
                },
            })
            .collect();
        self.handoff().push(handed_off);
        if let Some(due) = plan.timers.values().map(|t| t.due_at).min() {
            self.timer_set(due);
        }
        Ok(results)
    }

    /// Reads what the batch needs and decides every item in memory; returns the results.
    async fn plan(
        &self,
        tx: &mut impl StoreTx,
        plan: &mut Plan,
        batch: &[Inbound],
        now: i64,
    ) -> Result<Vec<Done>, EngineError> {
        let mut results: Vec<Option<Done>> = vec![None; batch.len()];
        let events: Vec<(usize, &Incoming)> = batch
            .iter()
            .enumerate()
            .filter_map(|(i, b)| match b {
                Inbound::Event(e) => Some((i, e)),
                Inbound::Start(_) => None,
            })
            .collect();

        // Timers: claimed by deleting their rows; one claimed twice in a batch fires once.
        let timer_ids: Vec<String> = events
            .iter()
            .filter_map(|(_, e)| e.timer_id.clone())
            .collect();
        let mut claimed = tx.claim_timers(&timer_ids).await?;
        let mut live: Vec<(usize, &Incoming)> = Vec::with_capacity(events.len());
        for (i, e) in events {
            match &e.timer_id {
                Some(t) if !claimed.remove(t) => {
                    results[i] = Some(Done::Applied(Applied::Duplicate));
                }
                _ => live.push((i, e)),
            }
        }

        // The sagas the events are for.
        let mut ids: Vec<String> = live.iter().map(|(_, e)| e.saga_id.clone()).collect();
        ids.sort_unstable();
        ids.dedup();
        for row in tx.load_sagas(&ids).await? {
            let graph = self.graph_in(tx, &row.definition_hash).await?;
            plan.sagas
                .insert(row.id.clone(), Working::loaded(row, graph));
        }

        // Starts: idempotency keys, new sagas (written at the end, in the state this batch
        // leaves them in), sequence keys.
        let begins = self.plan_starts(tx, plan, batch, &mut results, now).await?;

        // Decide, in batch order.
        let mut releasing = Vec::new();
        for (i, e) in live {
            if !plan.sagas.contains_key(&e.saga_id) {
                tracing::warn!(saga.id = %e.saga_id, "event for an unknown saga");
                results[i] = Some(Done::Applied(Applied::UnknownSaga));
                continue;
            }
            if let Event::Reply { step, .. } = &e.event
                && plan
                    .sagas
                    .get(&e.saga_id)
                    .is_some_and(|w| *step >= w.graph.steps().len())
            {
                tracing::warn!(saga.id = %e.saga_id, step, "reply for a step the saga does not have");
                results[i] = Some(Done::Applied(Applied::UnknownStep(*step)));
                continue;
            }
            let changed = self.decide_into(plan, &e.saga_id, &e.event, now, &mut releasing);
            results[i] = Some(Done::Applied(if changed {
                Applied::Changed
            } else {
                Applied::Ignored
            }));
        }
        for id in begins {
            self.decide_into(plan, &id, &Event::Begin, now, &mut releasing);
        }

        // Sagas that gave up their keys hand them on; whoever was next begins (and may finish
        // at once).
        while !releasing.is_empty() {
            let next = tx.release_keys(&std::mem::take(&mut releasing)).await?;
            let missing: Vec<String> = next
                .iter()
                .filter(|id| !plan.sagas.contains_key(*id))
                .cloned()
                .collect();
            for row in tx.load_sagas(&missing).await? {
                let graph = self.graph_in(tx, &row.definition_hash).await?;
                plan.sagas
                    .insert(row.id.clone(), Working::loaded(row, graph));
            }
            for id in next {
                if plan.sagas.contains_key(&id) {
                    self.decide_into(plan, &id, &Event::Begin, now, &mut releasing);
                }
            }
        }
        results
            .into_iter()
            .map(|r| {
                r.ok_or_else(|| EngineError::Refused("an item of the batch got no result".into()))
            })
            .collect()
    }

    /// Makes the batch's new sagas (inserted by [`Plan::write`], in the state the batch leaves
    /// them in) and takes their sequence keys; fills in the starts' results; returns the sagas
    /// that hold their key and begin now.
    async fn plan_starts(
        &self,
        tx: &mut impl StoreTx,
        plan: &mut Plan,
        batch: &[Inbound],
        results: &mut [Option<Done>],
        now: i64,
    ) -> Result<Vec<String>, EngineError> {
        let starts: Vec<(usize, &StartRequest)> = batch
            .iter()
            .enumerate()
            .filter_map(|(i, b)| match b {
                Inbound::Start(s) => Some((i, s)),
                Inbound::Event(_) => None,
            })
            .collect();
        if starts.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = starts
            .iter()
            .filter_map(|(_, s)| s.idempotency_key.clone())
            .collect();
        let mut existing = tx.sagas_by_idempotency_key(&keys).await?;
        let mut requests = Vec::new();
        for (i, s) in starts {
            if let Some(k) = &s.idempotency_key
                && let Some(saga) = existing.get(k)
            {
                results[i] = Some(same_start(k, saga, s));
                continue;
            }
            let id = uuid::Uuid::now_v7().to_string();
            if let Some(k) = &s.idempotency_key {
                existing.insert(
                    k.clone(),
                    KeyedSaga {
                        id: id.clone(),
                        name: s.graph.name().to_owned(),
                        input: s.input.clone(),
                    },
                );
            }
            let mut state = SagaState::new(&s.graph, s.input.clone());
            let trace = crate::trace::start(
                s.trace.as_deref(),
                s.tracestate.as_deref(),
                &id,
                s.graph.name(),
                &s.sequence_key,
            );
            (state.trace, state.tracestate) = (trace.traceparent, trace.tracestate);
            plan.history.push(HistoryRow {
                saga_id: id.clone(),
                entry: HistoryEntry {
                    kind: "created".into(),
                    step: None,
                    detail: format!(
                        "{} v{} with sequence key `{}`",
                        s.graph.name(),
                        s.graph.def().version,
                        s.sequence_key
                    ),
                },
            });
            requests.push((s.sequence_key.clone(), id.clone()));
            let row = SagaRow {
                id: id.clone(),
                name: s.graph.name().to_owned(),
                definition_hash: s.graph.content_hash().to_owned(),
                sequence_key: s.sequence_key.clone(),
                state,
                version: 0,
                created_at: now,
                finished_at: None,
            };
            let mut working = Working::loaded(row, s.graph.clone());
            working.new = Some(s.idempotency_key.clone());
            plan.sagas.insert(id.clone(), working);
            results[i] = Some(Done::Started(Started {
                id,
                existing: false,
            }));
        }
        let holding = tx.acquire_keys(&requests).await?;
        let holds: HashSet<&String> = holding.iter().collect();
        for (key, id) in &requests {
            if !holds.contains(id) {
                plan.history.push(HistoryRow {
                    saga_id: id.clone(),
                    entry: HistoryEntry {
                        kind: "queued".into(),
                        step: None,
                        detail: format!("waiting for the saga that holds sequence key `{key}`"),
                    },
                });
            }
        }
        Ok(holding)
    }

    /// Decides one event for a saga of the plan and records what it writes; returns whether
    /// it changed the saga.
    fn decide_into(
        &self,
        plan: &mut Plan,
        saga_id: &str,
        event: &Event,
        now: i64,
        releasing: &mut Vec<(String, String)>,
    ) -> bool {
        let Some(w) = plan.sagas.get_mut(saga_id) else {
            return false;
        };
        let ctx = Context {
            now,
            random: fastrand::f64(),
        };
        let decision = decide(&w.graph, &w.state, event, ctx);
        self.metrics().decided(
            &w.graph,
            saga_id,
            w.row.version + w.changes,
            &w.state,
            event,
            &decision,
            now,
        );
        let Decision {
            state,
            commands,
            timers,
            history,
            ignored,
        } = decision;
        for entry in history {
            plan.history.push(HistoryRow {
                saga_id: saga_id.to_owned(),
                entry,
            });
        }
        if ignored {
            return false;
        }
        for c in &commands {
            plan.outbox.push(outbox_message(
                &w.graph,
                &w.row,
                &w.state,
                c,
                self.handoff().active(),
            ));
        }
        for t in &timers {
            let id = timer_id(saga_id, t);
            plan.cancelled.remove(&id);
            plan.timers.insert(
                id.clone(),
                TimerRow {
                    id,
                    saga_id: saga_id.to_owned(),
                    due_at: t.at,
                    event: Event::Timer {
                        step: t.step,
                        op: t.op,
                        attempt: t.attempt,
                        kind: t.kind,
                    },
                },
            );
        }
        // A saga that stopped going forward (final, or compensating) no longer needs its
        // deadline.
        if w.graph.def().deadline.is_some()
            && w.state.status == machine::SagaStatus::Running
            && state.status != machine::SagaStatus::Running
        {
            let id = timer_id(saga_id, &machine::deadline_timer(0));
            if plan.timers.remove(&id).is_none() {
                plan.cancelled.insert(id);
            }
        }
        // A step that left the attempt a timer was guarding no longer needs that timer: delete
        // it instead of letting it fire only to be ignored.
        for (i, old) in w.state.steps.iter().enumerate() {
            let StepStatus::Active {
                op,
                attempt,
                waiting,
            } = old
            else {
                continue;
            };
            if state.steps.get(i) == Some(old) {
                continue;
            }
            let kind = if *waiting {
                TimerKind::Retry
            } else {
                TimerKind::Timeout
            };
            let id = timer_id(
                saga_id,
                &machine::Timer {
                    step: i,
                    op: *op,
                    attempt: *attempt,
                    kind,
                    at: 0,
                },
            );
            if plan.timers.remove(&id).is_none() {
                plan.cancelled.insert(id);
            }
        }
        // Completed and Compensated sagas give up their key; a Failed one keeps it until it
        // is resolved (see `SagaState::releases_key`).
        if state.releases_key() && !w.state.releases_key() {
            releasing.push((w.row.sequence_key.clone(), saga_id.to_owned()));
        }
        w.state = state;
        w.changes += 1;
        true
    }

    /// The graph a saga is pinned to, read through this transaction on a cache miss.
    async fn graph_in(
        &self,
        tx: &mut impl StoreTx,
        hash: &str,
    ) -> Result<Arc<SagaGraph>, EngineError> {
        match self.cached_graph(hash) {
            Some(g) => Ok(g),
            None => self.load_graph(tx, hash).await,
        }
    }
}

/// A saga as the batch changes it.
#[derive(Debug)]
struct Working {
    /// As loaded (or inserted by this batch).
    row: SagaRow,
    graph: Arc<SagaGraph>,
    state: SagaState,
    /// Changing decisions so far.
    changes: i64,
    /// Started by this batch, with this idempotency key: inserted at the end, not updated.
    new: Option<Option<String>>,
}

impl Working {
    /// The row's state is moved into `state`, not copied: the row keeps the rest.
    fn loaded(mut row: SagaRow, graph: Arc<SagaGraph>) -> Working {
        Working {
            state: std::mem::replace(&mut row.state, vacated()),
            row,
            graph,
            changes: 0,
            new: None,
        }
    }
}

/// What is left where a state was moved out: nothing, and nothing allocated.
fn vacated() -> SagaState {
    SagaState {
        status: machine::SagaStatus::Queued,
        steps: Vec::new(),
        input: Value::Null,
        outputs: BTreeMap::new(),
        attempts: Vec::new(),
        last_errors: Vec::new(),
        key_released: false,
        retry_base: Vec::new(),
        paused: None,
        trace: None,
        tracestate: None,
    }
}

/// Everything a batch writes, gathered in memory and written set-based at the end.
#[derive(Debug, Default)]
struct Plan {
    sagas: BTreeMap<String, Working>,
    history: Vec<HistoryRow>,
    outbox: Vec<OutboxMessage>,
    timers: BTreeMap<String, TimerRow>,
    cancelled: HashSet<String>,
}

impl Plan {
    /// Writes the batch's changes. The sagas' states are moved into the write, not copied: a
    /// plan is not decided on after it is written.
    async fn write(
        &mut self,
        tx: &mut impl StoreTx,
        now: i64,
        sent: &[String],
    ) -> Result<(), StoreError> {
        let mut inserts = Vec::new();
        let mut writes = Vec::new();
        for (id, w) in &mut self.sagas {
            if let Some(idempotency_key) = &w.new {
                inserts.push(NewSaga {
                    id: id.clone(),
                    name: w.row.name.clone(),
                    definition_hash: w.row.definition_hash.clone(),
                    sequence_key: w.row.sequence_key.clone(),
                    state: std::mem::replace(&mut w.state, vacated()),
                    idempotency_key: idempotency_key.clone(),
                    version: w.changes,
                });
            } else if w.changes > 0 {
                writes.push(SagaWrite {
                    id: id.clone(),
                    expected_version: w.row.version,
                    changes: w.changes,
                    state: std::mem::replace(&mut w.state, vacated()),
                });
            }
        }
        // Timers before sagas (`write_changes` deletes the cancelled ones first): a timer batch
        // locks the timer row (its claim) and then the saga, so a reply batch cancelling that
        // timer must take them in the same order, or the two deadlock.
        let cancelled: Vec<String> = self.cancelled.iter().cloned().collect();
        let timers: Vec<TimerRow> = self.timers.values().cloned().collect();
        tx.write_changes(
            &Changes {
                cancelled_timers: &cancelled,
                new_sagas: &inserts,
                sagas: &writes,
                history: &self.history,
                outbox: &self.outbox,
                timers: &timers,
                sent,
            },
            now,
        )
        .await?;
        Ok(())
    }
}

/// `handed_off`: this engine's relay runs, and is given the row after the commit.
fn outbox_message(
    graph: &SagaGraph,
    saga: &SagaRow,
    state: &SagaState,
    c: &machine::Command,
    handed_off: bool,
) -> OutboxMessage {
    let kind = &graph.step(c.step).kind;
    let mut msg = CommandMsg {
        traceparent: None,
        tracestate: None,
        saga_id: saga.id.clone(),
        saga: saga.name.clone(),
        key: saga.sequence_key.clone(),
        step: c.step,
        step_id: c.step_id.clone(),
        service: c.service.clone(),
        op: c.op,
        operation: c.operation.clone(),
        forward: operation_name(kind, forward_op(kind)).to_owned(),
        attempt: c.attempt,
        params: c.params.clone(),
    };
    let carried = crate::trace::dispatch(state.trace.as_deref(), state.tracestate.as_deref(), &msg);
    (msg.traceparent, msg.tracestate) = (carried.traceparent, carried.tracestate);
    OutboxMessage {
        message_id: msg.message_id(),
        destination: command_queue(&c.service),
        routing_key: saga.sequence_key.clone(),
        payload: serde_json::to_string(&msg).unwrap_or_default(),
        handed_off,
    }
}

/// Maps the per-item results of a batch of events back to `Applied` values (for callers that
/// only send events).
pub(crate) fn applied(done: Result<Done, EngineError>) -> Result<Applied, EngineError> {
    match done? {
        Done::Applied(a) => Ok(a),
        Done::Started(_) => Ok(Applied::Changed),
        Done::Refused(why) => Err(EngineError::Refused(why)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{ENGINE_MIGRATIONS, OutboxTable, Store};

    /// The next apply transaction deletes the rows the relay sent, in its one write: no relay
    /// runs here, so nothing else could have.
    #[tokio::test]
    async fn the_next_apply_deletes_the_sent_rows() {
        let store = Store::connect("sqlite::memory:", 1).await.expect("SQLite");
        store.migrate(&[ENGINE_MIGRATIONS]).await.expect("migrate");
        let mut tx = store.begin().await.expect("begin");
        let row = |id: &str| OutboxMessage {
            message_id: id.into(),
            destination: "q".into(),
            routing_key: "k".into(),
            payload: "{}".into(),
            handed_off: true,
        };
        tx.enqueue_outbox(&[row("m-1"), row("m-2"), row("m-3")], 1)
            .await
            .expect("enqueue");
        tx.commit().await.expect("commit");
        let engine = Engine::new(
            store.clone(),
            Arc::new(crate::transport::memory::MemoryTransport::default()),
        );
        engine.handoff().sent(vec!["m-1".into(), "m-3".into()]);
        let commits = store.counters().commits();
        // An event that changes nothing (its saga is unknown): the write is the delete alone.
        let applied = engine
            .apply(&[Incoming {
                saga_id: "unknown".into(),
                event: crate::machine::Event::Timer {
                    step: 0,
                    op: crate::machine::Op::Action,
                    attempt: 0,
                    kind: crate::machine::TimerKind::Deadline,
                },
                timer_id: None,
            }])
            .await
            .expect("apply");
        assert_eq!(applied, [Applied::UnknownSaga]);
        assert_eq!(store.counters().commits() - commits, 1, "one transaction");
        let left: Vec<String> = sqlx::query_scalar("SELECT message_id FROM outbox ORDER BY id")
            .fetch_all(store.pool())
            .await
            .expect("outbox");
        assert_eq!(left, ["m-2"]);
        assert_eq!(
            engine.handoff().sent_due_in(),
            None,
            "nothing left to delete"
        );
    }
}

//! The driver around the state machine: load, decide, write in one transaction, commit.
//!
//! Three loops run while the engine runs, each restartable at any point because everything they
//! do is in the database first:
//! * **replies**: consume the reply queue, apply each reply (inbox dedup + decide + write), ack
//!   after commit;
//! * **relay**: publish committed outbox rows, mark them sent after the transport confirmed;
//! * **timers**: fire due timers (retry backoff, step timeouts), claimed by deleting their row
//!   in the transaction that applies them.
//!
//! Events are applied in batches (one transaction for many sagas); if a batch fails, each event
//! is retried alone, so batching never changes what happens, only how many commits it takes.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use sagaflow_dsl::template::Values;
use sagaflow_dsl::{SagaGraph, compile};
use serde_json::Value;
use sqlx::{AnyConnection, Row};
use tokio::sync::{Notify, watch};
use tracing::{debug, warn};

use crate::machine::{self, Context, Event, SagaState, decide, forward_op, operation_name};
use crate::metrics::Metrics;
use crate::store::{Backend, OutboxMessage, SagaRow, Store, StoreError, now_ms, tx};
use crate::transport::{Delivery, Message, REPLY_QUEUE, Transport, command_queue};
use crate::wire::{CommandMsg, ReplyMsg};

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
    graphs: RwLock<HashMap<String, Arc<SagaGraph>>>,
    /// Definition name → hash of the latest registered version.
    names: RwLock<HashMap<String, String>>,
    outbox_ready: Notify,
    metrics: Metrics,
    timers_changed: Notify,
}

impl Engine {
    pub fn new(store: Store, transport: Arc<dyn Transport>) -> Arc<Engine> {
        Arc::new(Engine {
            store,
            transport,
            graphs: RwLock::default(),
            names: RwLock::default(),
            outbox_ready: Notify::new(),
            metrics: Metrics::new(),
            timers_changed: Notify::new(),
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// This engine's Prometheus metrics (served by `GET /metrics`, see [`crate::http`]).
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Compiles and stores a definition; returns its graph. Running sagas of older versions
    /// keep the definition (content hash) they started with.
    pub async fn register(&self, source: &str) -> Result<Arc<SagaGraph>, EngineError> {
        let compiled = compile(source);
        let Some(graph) = compiled.graph else {
            let detail = compiled
                .errors()
                .map(|d| format!("line {}: {}", d.span.line, d.message))
                .collect::<Vec<_>>()
                .join("; ");
            return Err(EngineError::Refused(format!(
                "invalid saga definition: {detail}"
            )));
        };
        let graph = Arc::new(graph);
        let mut conn = self.store.pool().acquire().await?;
        tx::put_definition(
            &mut conn,
            graph.content_hash(),
            graph.name(),
            graph.def().version,
            source,
        )
        .await?;
        let hash = graph.content_hash().to_owned();
        write(&self.graphs).insert(hash.clone(), graph.clone());
        write(&self.names).insert(graph.name().to_owned(), hash);
        Ok(graph)
    }

    /// The graph a saga is pinned to, from the cache or compiled from the stored source.
    async fn graph(
        &self,
        conn: &mut AnyConnection,
        hash: &str,
    ) -> Result<Arc<SagaGraph>, EngineError> {
        if let Some(g) = read(&self.graphs).get(hash) {
            return Ok(g.clone());
        }
        let row = sqlx::query("SELECT source FROM saga_definitions WHERE hash = $1")
            .bind(hash)
            .fetch_optional(&mut *conn)
            .await?;
        let source: String = match row {
            Some(r) => r.try_get("source")?,
            None => return Err(EngineError::UnknownDefinition(hash.to_owned())),
        };
        let graph = compile(&source)
            .graph
            .ok_or_else(|| EngineError::BrokenDefinition {
                hash: hash.to_owned(),
                detail: "it no longer validates with this version of sagaflow".into(),
            })?;
        if graph.content_hash() != hash {
            return Err(EngineError::BrokenDefinition {
                hash: hash.to_owned(),
                detail: format!("it now hashes to {}", graph.content_hash()),
            });
        }
        let graph = Arc::new(graph);
        write(&self.graphs).insert(hash.to_owned(), graph.clone());
        Ok(graph)
    }

    /// The latest registered definition with this name (this process, else the database).
    pub async fn definition_by_name(&self, name: &str) -> Result<Arc<SagaGraph>, EngineError> {
        let cached = read(&self.names).get(name).cloned();
        let mut conn = self.store.pool().acquire().await?;
        let hash = match cached {
            Some(h) => h,
            None => {
                let row = sqlx::query("SELECT hash FROM saga_definitions WHERE name = $1 ORDER BY version DESC, created_at DESC LIMIT 1")
                    .bind(name)
                    .fetch_optional(&mut *conn)
                    .await?;
                match row {
                    Some(r) => r.try_get("hash")?,
                    None => return Err(EngineError::UnknownDefinition(name.to_owned())),
                }
            }
        };
        self.graph(&mut conn, &hash).await
    }

    /// Starts a saga: checks the input, writes the saga and (if its sequence key is free) its
    /// first commands in one transaction. With an idempotency key, starting twice starts once.
    pub async fn start(
        &self,
        graph: &SagaGraph,
        input: Value,
        idempotency_key: Option<&str>,
    ) -> Result<Started, EngineError> {
        let key = sequence_key(graph, &input)?;
        let id = uuid::Uuid::now_v7().to_string();
        let now = now_ms();
        let mut conn = self.store.pool().begin().await?;
        if let Some(k) = idempotency_key
            && let Some(existing) = tx::saga_by_idempotency_key(&mut conn, k).await?
        {
            return Ok(Started {
                id: existing,
                existing: true,
            });
        }
        let state = SagaState::new(graph, input);
        let inserted = tx::insert_saga(
            &mut conn,
            &id,
            graph.name(),
            graph.content_hash(),
            &key,
            &state,
            idempotency_key,
            now,
        )
        .await;
        match (inserted, idempotency_key) {
            (Ok(()), _) => {}
            // A concurrent start with the same idempotency key committed first: return its saga.
            (Err(StoreError::Db(sqlx::Error::Database(db))), Some(k))
                if db.is_unique_violation() =>
            {
                conn.rollback().await?;
                let mut conn = self.store.pool().acquire().await?;
                if let Some(existing) = tx::saga_by_idempotency_key(&mut conn, k).await? {
                    return Ok(Started {
                        id: existing,
                        existing: true,
                    });
                }
                return Err(StoreError::Db(sqlx::Error::Database(db)).into());
            }
            (Err(e), _) => return Err(e.into()),
        }
        tx::history(
            &mut conn,
            &id,
            &machine::HistoryEntry {
                kind: "created".into(),
                step: None,
                detail: format!(
                    "{} v{} with sequence key `{key}`",
                    graph.name(),
                    graph.def().version
                ),
            },
            now,
        )
        .await?;
        if tx::acquire_key(&mut conn, self.store.backend(), &key, &id).await? {
            self.begin(&mut conn, &id, now).await?;
        } else {
            tx::history(
                &mut conn,
                &id,
                &machine::HistoryEntry {
                    kind: "queued".into(),
                    step: None,
                    detail: format!("waiting for the saga that holds sequence key `{key}`"),
                },
                now,
            )
            .await?;
        }
        conn.commit().await?;
        self.metrics.saga_started();
        self.outbox_ready.notify_one();
        self.timers_changed.notify_one();
        Ok(Started {
            id,
            existing: false,
        })
    }

    /// Applies `Begin` to a saga that just got its sequence key (inside the caller's transaction).
    async fn begin(&self, conn: &mut AnyConnection, id: &str, now: i64) -> Result<(), EngineError> {
        let mut next = Some(id.to_owned());
        while let Some(id) = next.take() {
            let saga = tx::load_saga(conn, &id)
                .await?
                .ok_or_else(|| EngineError::UnknownSaga(id.clone()))?;
            next = self
                .decide_and_write(conn, &saga, &Event::Begin, now)
                .await?
                .1;
        }
        Ok(())
    }

    /// Decides and writes one event; returns whether it changed anything and, when the saga
    /// became final, the saga that now holds its sequence key (to be begun).
    async fn decide_and_write(
        &self,
        conn: &mut AnyConnection,
        saga: &SagaRow,
        event: &Event,
        now: i64,
    ) -> Result<(bool, Option<String>), EngineError> {
        let graph = self.graph(conn, &saga.definition_hash).await?;
        let ctx = Context {
            now,
            random: fastrand::f64(),
        };
        let decision = decide(&graph, &saga.state, event, ctx);
        let messages: Vec<OutboxMessage> = decision
            .commands
            .iter()
            .map(|c| outbox_message(&graph, saga, c))
            .collect();
        tx::write_decision(conn, &graph, saga, &decision, &messages, now).await?;
        self.metrics.decided(&graph, saga, event, &decision, now);
        let mut next = None;
        let became_final = decision.state.status.is_final() && !saga.state.status.is_final();
        if became_final {
            next =
                tx::release_key(conn, self.store.backend(), &saga.sequence_key, &saga.id).await?;
        }
        Ok((!decision.ignored, next))
    }

    /// Applies a batch of events in one transaction; if that fails, each one alone (with a few
    /// retries for optimistic-lock conflicts between engine instances).
    pub async fn apply(&self, batch: &[Incoming]) -> Result<Vec<Applied>, EngineError> {
        if batch.len() > 1 {
            match self.apply_in_one_transaction(batch).await {
                Ok(results) => return Ok(results),
                Err(e) => debug!(error = %e, "batch failed; applying its events one by one"),
            }
        }
        let mut results = Vec::with_capacity(batch.len());
        for incoming in batch {
            let mut attempt = 0;
            loop {
                match self
                    .apply_in_one_transaction(std::slice::from_ref(incoming))
                    .await
                {
                    Ok(mut r) => {
                        results.push(r.pop().unwrap_or(Applied::Ignored));
                        break;
                    }
                    Err(EngineError::Store(StoreError::Conflict(_))) if attempt < 8 => {
                        attempt += 1;
                        tokio::time::sleep(Duration::from_millis(2 << attempt)).await;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(results)
    }

    async fn apply_in_one_transaction(
        &self,
        batch: &[Incoming],
    ) -> Result<Vec<Applied>, EngineError> {
        let now = now_ms();
        let mut conn = self.store.pool().begin().await?;
        let mut results = Vec::with_capacity(batch.len());
        for incoming in batch {
            results.push(self.apply_one(&mut conn, incoming, now).await?);
        }
        conn.commit().await?;
        if results.contains(&Applied::Changed) {
            self.outbox_ready.notify_one();
            self.timers_changed.notify_one();
        }
        Ok(results)
    }

    async fn apply_one(
        &self,
        conn: &mut AnyConnection,
        incoming: &Incoming,
        now: i64,
    ) -> Result<Applied, EngineError> {
        if let Some(tid) = &incoming.timer_id
            && !tx::claim_timer(conn, tid).await?
        {
            return Ok(Applied::Duplicate);
        }
        let Some(saga) = tx::load_saga(conn, &incoming.saga_id).await? else {
            warn!(saga.id = %incoming.saga_id, "event for an unknown saga");
            return Ok(Applied::UnknownSaga);
        };
        if let Some(mid) = &incoming.message_id
            && !tx::inbox_insert(conn, mid, &saga.id, now).await?
        {
            return Ok(Applied::Duplicate);
        }
        let (changed, next) = self
            .decide_and_write(conn, &saga, &incoming.event, now)
            .await?;
        if let Some(next) = next {
            self.begin(conn, &next, now).await?;
        }
        Ok(if changed {
            Applied::Changed
        } else {
            Applied::Ignored
        })
    }

    /// Operator: compensate a running saga.
    pub async fn abort(&self, saga_id: &str, reason: &str) -> Result<Applied, EngineError> {
        self.operator(
            saga_id,
            Event::Abort {
                reason: reason.to_owned(),
            },
        )
        .await
    }

    /// Operator: resume a failed saga.
    pub async fn retry(&self, saga_id: &str) -> Result<Applied, EngineError> {
        self.operator(saga_id, Event::Retry).await
    }

    async fn operator(&self, saga_id: &str, event: Event) -> Result<Applied, EngineError> {
        let r = self
            .apply(&[Incoming {
                saga_id: saga_id.to_owned(),
                event,
                message_id: None,
                timer_id: None,
            }])
            .await?;
        match r.first() {
            Some(Applied::UnknownSaga) | None => Err(EngineError::UnknownSaga(saga_id.to_owned())),
            Some(other) => Ok(other.clone()),
        }
    }

    /// Runs the three loops until `shutdown` turns true.
    pub async fn run(self: Arc<Self>, shutdown: watch::Receiver<bool>) -> Result<(), EngineError> {
        let relay = tokio::spawn(self.clone().relay_loop(shutdown.clone()));
        let timers = tokio::spawn(self.clone().timer_loop(shutdown.clone()));
        let replies = tokio::spawn(self.clone().reply_loop(shutdown.clone()));
        let starts = tokio::spawn(
            self.clone()
                .start_loop(self.transport.clone(), shutdown.clone()),
        );
        let (a, b, c, d) = tokio::join!(relay, timers, replies, starts);
        for r in [a, b, c, d] {
            match r {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(join) => return Err(EngineError::Refused(format!("engine task died: {join}"))),
            }
        }
        Ok(())
    }

    async fn relay_loop(
        self: Arc<Self>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), EngineError> {
        let mut failures = 0u32;
        while !*shutdown.borrow() {
            match self.relay_once().await {
                Ok(0) => {
                    failures = 0;
                    tokio::select! {
                        () = self.outbox_ready.notified() => {}
                        () = tokio::time::sleep(Duration::from_millis(200)) => {}
                        _ = shutdown.changed() => {}
                    }
                }
                Ok(_) => failures = 0,
                Err(e) => {
                    failures += 1;
                    warn!(error = %e, "outbox relay failed; retrying");
                    tokio::time::sleep(backoff(failures)).await;
                }
            }
        }
        Ok(())
    }

    /// Publishes one batch of unsent outbox rows; returns how many were sent.
    pub async fn relay_once(&self) -> Result<usize, EngineError> {
        let mut conn = self.store.pool().begin().await?;
        let q = match self.store.backend() {
            Backend::Postgres => sqlx::query(
                "SELECT id, message_id, destination, routing_key, payload FROM outbox WHERE sent_at IS NULL ORDER BY id LIMIT 500 FOR UPDATE SKIP LOCKED",
            ),
            Backend::Sqlite => sqlx::query(
                "SELECT id, message_id, destination, routing_key, payload FROM outbox WHERE sent_at IS NULL ORDER BY id LIMIT 500",
            ),
        };
        let rows = q.fetch_all(&mut *conn).await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let mut batch = Vec::with_capacity(rows.len());
        for r in &rows {
            let id: i64 = r.try_get("id")?;
            let destination: String = r.try_get("destination")?;
            let payload: String = r.try_get("payload")?;
            let message = Message {
                id: r.try_get("message_id")?,
                key: r.try_get("routing_key")?,
                payload: payload.into_bytes(),
            };
            batch.push((id, destination, message));
        }
        // Publish the whole batch, then wait for all confirms (pipelined), in outbox order.
        let confirms = futures::future::join_all(
            batch
                .iter()
                .map(|(_, dest, m)| self.transport.publish(dest, m.clone())),
        )
        .await;
        let now = now_ms();
        let mut sent = 0;
        for ((id, _, _), confirm) in batch.iter().zip(confirms) {
            match confirm {
                Ok(()) => {
                    sqlx::query("UPDATE outbox SET sent_at = $1 WHERE id = $2")
                        .bind(now)
                        .bind(*id)
                        .execute(&mut *conn)
                        .await?;
                    sent += 1;
                }
                // Not confirmed: the row stays unsent and goes again (the receiver dedups).
                Err(e) => warn!(error = %e, "publish not confirmed; will resend"),
            }
        }
        conn.commit().await?;
        self.metrics.published(sent);
        if sent == 0 {
            // Nothing went out (broker down?): an error, so the relay loop backs off.
            return Err(EngineError::Refused(format!(
                "none of {} outbox messages was confirmed by the broker",
                batch.len()
            )));
        }
        Ok(sent)
    }

    async fn timer_loop(
        self: Arc<Self>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), EngineError> {
        let mut failures = 0u32;
        while !*shutdown.borrow() {
            match self.fire_due_timers().await {
                Ok(Some(wait)) => {
                    failures = 0;
                    tokio::select! {
                        () = self.timers_changed.notified() => {}
                        () = tokio::time::sleep(wait) => {}
                        _ = shutdown.changed() => {}
                    }
                }
                Ok(None) => failures = 0,
                Err(e) => {
                    failures += 1;
                    warn!(error = %e, "timer loop failed; retrying");
                    tokio::time::sleep(backoff(failures)).await;
                }
            }
        }
        Ok(())
    }

    /// Fires a batch of due timers. Returns how long to wait when none is due.
    pub async fn fire_due_timers(&self) -> Result<Option<Duration>, EngineError> {
        let now = now_ms();
        let rows = {
            let mut conn = self.store.pool().acquire().await?;
            sqlx::query("SELECT id, saga_id, event FROM timers WHERE due_at <= $1 ORDER BY due_at LIMIT 200")
                .bind(now)
                .fetch_all(&mut *conn)
                .await?
        };
        if rows.is_empty() {
            let mut conn = self.store.pool().acquire().await?;
            let next: Option<i64> = sqlx::query("SELECT MIN(due_at) AS next FROM timers")
                .fetch_one(&mut *conn)
                .await?
                .try_get("next")?;
            let wait = next.map_or(500, |n| (n - now).clamp(1, 500));
            return Ok(Some(Duration::from_millis(wait as u64)));
        }
        let mut batch = Vec::with_capacity(rows.len());
        for r in rows {
            let id: String = r.try_get("id")?;
            let text: String = r.try_get("event")?;
            match serde_json::from_str::<Event>(&text) {
                Ok(event) => batch.push(Incoming {
                    saga_id: r.try_get("saga_id")?,
                    event,
                    message_id: None,
                    timer_id: Some(id),
                }),
                Err(e) => {
                    warn!(timer = %id, error = %e, "undecodable timer row; deleting it");
                    let mut conn = self.store.pool().acquire().await?;
                    tx::claim_timer(&mut conn, &id).await?;
                }
            }
        }
        self.apply(&batch).await?;
        Ok(None)
    }

    async fn reply_loop(
        self: Arc<Self>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), EngineError> {
        let Some(mut consumer) =
            consume_retrying(&*self.transport, REPLY_QUEUE, &mut shutdown).await
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
            while deliveries.len() < 128 {
                match consumer.try_next() {
                    Some(d) => deliveries.push(d),
                    None => break,
                }
            }
            let mut batch = Vec::new();
            let mut good = Vec::new();
            for d in deliveries {
                match serde_json::from_slice::<ReplyMsg>(&d.message.payload) {
                    Ok(reply) => {
                        batch.push(Incoming {
                            saga_id: reply.saga_id.clone(),
                            message_id: Some(reply.message_id()),
                            event: Event::Reply {
                                step: reply.step,
                                op: reply.op,
                                attempt: reply.attempt,
                                outcome: reply.outcome,
                            },
                            timer_id: None,
                        });
                        good.push(d);
                    }
                    Err(e) => {
                        self.dead_letter(d, REPLY_QUEUE, &format!("undecodable reply: {e}"))
                            .await;
                    }
                }
            }
            match self.apply(&batch).await {
                Ok(applied) => {
                    failures = 0;
                    for ((d, incoming), applied) in good.into_iter().zip(&batch).zip(applied) {
                        if applied == Applied::UnknownSaga {
                            let reason = format!("reply for unknown saga {}", incoming.saga_id);
                            self.dead_letter(d, REPLY_QUEUE, &reason).await;
                        } else {
                            let _ = d.ack().await;
                        }
                    }
                }
                Err(e) => {
                    failures += 1;
                    warn!(error = %e, "applying replies failed; they will be redelivered");
                    for d in good {
                        let _ = d.nack().await;
                    }
                    tokio::time::sleep(backoff(failures)).await;
                }
            }
        }
    }

    /// Sets a message aside that can never be handled, with its reason (logged and counted).
    pub(crate) async fn dead_letter(&self, d: Delivery, queue: &str, reason: &str) {
        warn!(message = %d.message.id, queue, reason, "dead-lettering a message");
        match d.dead_letter(reason).await {
            Ok(()) => self.metrics.dead_lettered(queue),
            Err(e) => {
                warn!(error = %e, "dead-lettering failed; the message goes back to its queue")
            }
        }
    }
}

fn outbox_message(graph: &SagaGraph, saga: &SagaRow, c: &machine::Command) -> OutboxMessage {
    let kind = &graph.step(c.step).kind;
    let msg = CommandMsg {
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
    OutboxMessage {
        message_id: msg.message_id(),
        destination: command_queue(&c.service),
        routing_key: saga.sequence_key.clone(),
        payload: serde_json::to_string(&msg).unwrap_or_default(),
    }
}

/// The saga's sequence key, and the input checked against the definition's `input` section.
pub fn sequence_key(graph: &SagaGraph, input: &Value) -> Result<String, EngineError> {
    let def = graph.def();
    let invalid = |detail: String| EngineError::InvalidInput {
        saga: def.name.clone(),
        detail,
    };
    let Some(obj) = input.as_object() else {
        return Err(invalid(format!(
            "the input must be a JSON object, got {input}"
        )));
    };
    let mut problems = Vec::new();
    for (name, field) in &def.input {
        match obj.get(name) {
            None | Some(Value::Null) if field.required => {
                problems.push(format!("`{name}` is required"))
            }
            Some(v) if !v.is_null() && !field.r#type.accepts(v) => {
                let ty = format!("{:?}", field.r#type).to_lowercase();
                problems.push(format!("`{name}` must be {ty}, got {v}"));
            }
            _ => {}
        }
    }
    for name in obj.keys() {
        if !def.input.contains_key(name) {
            problems.push(format!("`{name}` is not an input of this saga"));
        }
    }
    if !problems.is_empty() {
        return Err(invalid(problems.join("; ")));
    }
    let none = |_: &str| None;
    let values = Values {
        input,
        outputs: &none,
    };
    let key = def
        .sequence_key
        .resolve(&values)
        .map_err(|e| invalid(e.to_string()))?;
    Ok(match key {
        Value::String(s) => s,
        other => other.to_string(),
    })
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

fn backoff(failures: u32) -> Duration {
    Duration::from_millis((50u64 << failures.min(7)).min(5_000))
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

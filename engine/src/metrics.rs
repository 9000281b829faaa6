//! Prometheus metrics of one engine process, exposed by `GET /metrics` (see [`crate::http`]).
//!
//! | metric | type | what |
//! |---|---|---|
//! | `sagaflow_sagas_started_total` | counter | sagas started (a start found by its idempotency key is not counted) |
//! | `sagaflow_sagas_finished_total{outcome}` | counter | sagas that became `completed`, `compensated` or `failed` |
//! | `sagaflow_step_duration_seconds{service,op}` | histogram | step operation latency: dispatch → its reply applied |
//! | `sagaflow_step_retries_total` | counter | step operations sent again (attempt 2 and later, operator retries included) |
//! | `sagaflow_compensations_total` | counter | undo operations (compensate, TCC cancel) started on steps |
//! | `sagaflow_dead_letters_total{queue}` | counter | messages set aside because they can never be handled |
//! | `sagaflow_outbox_published_total` | counter | outbox rows published and confirmed by the relay |
//! | `sagaflow_outbox_claimed_total` | counter | outbox rows the relay had to claim rather than being handed them by its own engine's commits: written by another process (an operator's CLI), given back after a failed publish, or left by an engine that died |
//! | `sagaflow_dead_letters_kept` | gauge | dead letters of the whole deployment (engines', workers', the broker's) kept in the database for an operator (`sagaflow dead-letters list`), read at scrape time |
//! | `sagaflow_outbox_pending` | gauge | unsent outbox rows (read from the database at scrape time) |
//! | `sagaflow_outbox_lag_seconds` | gauge | age of the oldest unsent outbox row, 0 when none (scrape time) |
//!
//! Everything on the hot path is in memory: the engine reports each decision it wrote
//! ([`Metrics::decided`]) and this module derives the counters from the old and the new state.
//! Only the two outbox gauges read the database, once per scrape.
//!
//! **Step latency** is measured from the decision that dispatched an operation (the `now` of
//! the transaction that wrote the command to the outbox: the `dispatch` timeline entry's time)
//! to the decision that applied the reply to that same attempt (the `now` of its transaction).
//! The dispatch time is kept in memory, per (saga, step), from the command's decision until the
//! step leaves that attempt. So replies are measured when the same engine process dispatched
//! the command: an attempt dispatched before a restart, or by another engine instance, is not
//! observed (rather than observed wrongly). Attempts that end without a reply (a timeout) and
//! replies from an older attempt than the one in flight are not observed either.
//!
//! **Rolled-back transactions.** The engine reports a decision once it is written, before its
//! transaction commits; a transaction that fails is retried event by event (same saga, same
//! version). Counters are therefore counted once per (saga, version) transition: the retry of a
//! rolled-back decision is not counted twice.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, MutexGuard};

use crate::machine::{Decision, Event, Millis, Op, SagaState, StepStatus};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use sagaflow_dsl::SagaGraph;

/// The `Content-Type` of [`Metrics::encode`]'s output (OpenMetrics text, which Prometheus reads).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Step latency buckets, in seconds: from in-process answers to a slow service's timeouts.
const DURATION_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// At most this many dispatch times are kept; beyond it the oldest (over ten minutes) go, and
/// if that is not enough, all of them (an engine with that many steps in flight loses a few
/// observations, never memory).
const MAX_IN_FLIGHT: usize = 200_000;
const STALE_IN_FLIGHT_MS: Millis = 10 * 60 * 1000;

/// Transitions remembered as counted (see the module documentation): enough for a retried
/// batch, which happens right after the failed one.
const RECENT_TRANSITIONS: usize = 16_384;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StepLabels {
    service: String,
    op: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabels {
    queue: String,
}

/// The engine's metrics and their registry. One per [`crate::Engine`] (`engine.metrics()`).
pub struct Metrics {
    registry: Registry,
    sagas_started: Counter,
    sagas_finished: Family<OutcomeLabels, Counter>,
    step_duration: Family<StepLabels, Histogram>,
    step_retries: Counter,
    compensations: Counter,
    dead_letters: Family<QueueLabels, Counter>,
    outbox_published: Counter,
    outbox_claimed: Counter,
    outbox_pending: Gauge,
    outbox_lag: Gauge<f64, AtomicU64>,
    dead_letters_kept: Gauge,
    /// (saga id, step index) → the attempt in flight and when it was dispatched.
    in_flight: Mutex<HashMap<(String, usize), Flight>>,
    /// (saga id, version) of the transitions counted lately, and their order.
    counted: Mutex<Recent>,
}

#[derive(Debug, Clone, Copy)]
struct Flight {
    op: Op,
    attempt: u32,
    at: Millis,
}

#[derive(Debug, Default)]
struct Recent {
    set: HashSet<(String, i64)>,
    order: VecDeque<(String, i64)>,
}

impl Recent {
    /// False when this transition was counted already.
    fn insert(&mut self, id: &str, version: i64) -> bool {
        let key = (id.to_owned(), version);
        if self.set.contains(&key) {
            return false;
        }
        if self.order.len() >= RECENT_TRANSITIONS
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
        self.set.insert(key.clone());
        self.order.push_back(key);
        true
    }
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics")
            .field("registry", &self.registry)
            .field("in_flight", &lock(&self.in_flight).len())
            .finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let sagas_started = Counter::default();
        registry.register(
            "sagaflow_sagas_started",
            "Sagas started (a start that found its idempotency key's saga is not counted)",
            sagas_started.clone(),
        );
        let sagas_finished = Family::<OutcomeLabels, Counter>::default();
        for outcome in ["completed", "compensated", "failed"] {
            // Present from the start, at 0, so that rates work before the first saga ends.
            let _ = sagas_finished.get_or_create(&OutcomeLabels { outcome });
        }
        registry.register(
            "sagaflow_sagas_finished",
            "Sagas that reached a final state, by outcome (a failed saga retried by an operator ends again)",
            sagas_finished.clone(),
        );
        let step_duration = Family::<StepLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(DURATION_BUCKETS)) as fn() -> Histogram,
        );
        registry.register_with_unit(
            "sagaflow_step_duration",
            "Step operation latency: from the decision that dispatched the operation to the one that applied its reply",
            Unit::Seconds,
            step_duration.clone(),
        );
        let step_retries = Counter::default();
        registry.register(
            "sagaflow_step_retries",
            "Step operations sent again: attempt 2 and later, operator retries included",
            step_retries.clone(),
        );
        let compensations = Counter::default();
        registry.register(
            "sagaflow_compensations",
            "Undo operations (compensate, TCC cancel) started on steps",
            compensations.clone(),
        );
        let dead_letters = Family::<QueueLabels, Counter>::default();
        registry.register(
            "sagaflow_dead_letters",
            "Messages set aside because they can never be handled, by the queue they came from",
            dead_letters.clone(),
        );
        let outbox_published = Counter::default();
        registry.register(
            "sagaflow_outbox_published",
            "Outbox rows published and confirmed by this engine's relay",
            outbox_published.clone(),
        );
        let outbox_claimed = Counter::default();
        registry.register(
            "sagaflow_outbox_claimed",
            "Outbox rows this engine's relay claimed instead of being handed them by its own commits",
            outbox_claimed.clone(),
        );
        let outbox_pending = Gauge::default();
        registry.register(
            "sagaflow_outbox_pending",
            "Unsent outbox rows, read from the database at scrape time",
            outbox_pending.clone(),
        );
        let outbox_lag = Gauge::<f64, AtomicU64>::default();
        registry.register_with_unit(
            "sagaflow_outbox_lag",
            "Age of the oldest unsent outbox row (0 when none), read from the database at scrape time",
            Unit::Seconds,
            outbox_lag.clone(),
        );
        let dead_letters_kept = Gauge::default();
        registry.register(
            "sagaflow_dead_letters_kept",
            "Dead letters of the whole deployment kept in the database for an operator, read at scrape time",
            dead_letters_kept.clone(),
        );
        Metrics {
            registry,
            sagas_started,
            sagas_finished,
            step_duration,
            step_retries,
            compensations,
            dead_letters,
            outbox_published,
            outbox_claimed,
            outbox_pending,
            outbox_lag,
            dead_letters_kept,
            in_flight: Mutex::default(),
            counted: Mutex::default(),
        }
    }

    /// A saga was started (its transaction committed).
    pub(crate) fn saga_started(&self) {
        self.sagas_started.inc();
    }

    /// The relay published `n` outbox rows, and the broker confirmed them.
    pub(crate) fn published(&self, n: usize) {
        self.outbox_published.inc_by(n as u64);
    }

    /// The relay claimed `n` outbox rows.
    pub(crate) fn claimed(&self, n: usize) {
        self.outbox_claimed.inc_by(n as u64);
    }

    /// (published, claimed) outbox rows so far: what the two counters say.
    pub fn outbox_rows(&self) -> (u64, u64) {
        (self.outbox_published.get(), self.outbox_claimed.get())
    }

    /// A message of `queue` was dead-lettered.
    pub(crate) fn dead_lettered(&self, queue: &str) {
        self.dead_letters
            .get_or_create(&QueueLabels {
                queue: queue.to_owned(),
            })
            .inc();
    }

    /// The engine decided `decision` for `event` on saga `saga_id`, which was at `version`
    /// with state `old`, at `now`. Memory only: no IO.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn decided(
        &self,
        graph: &SagaGraph,
        saga_id: &str,
        version: i64,
        old: &SagaState,
        event: &Event,
        decision: &Decision,
        now: Millis,
    ) {
        if decision.ignored {
            return;
        }
        self.step_latency(graph, saga_id, old, event, decision, now);
        if !lock(&self.counted).insert(saga_id, version) {
            return;
        }
        let status = &decision.state.status;
        if status.is_final() && !old.status.is_final() {
            self.sagas_finished
                .get_or_create(&OutcomeLabels {
                    outcome: status.name(),
                })
                .inc();
        }
        for c in &decision.commands {
            if c.attempt > 1 {
                self.step_retries.inc();
            } else if c.op.is_undo() {
                self.compensations.inc();
            }
        }
    }

    /// Observes the attempts in flight that this decision's reply ended, and remembers when the
    /// decision's commands were dispatched.
    fn step_latency(
        &self,
        graph: &SagaGraph,
        saga_id: &str,
        old_state: &SagaState,
        event: &Event,
        decision: &Decision,
        now: Millis,
    ) {
        let mut in_flight = lock(&self.in_flight);
        for (i, old) in old_state.steps.iter().enumerate() {
            let StepStatus::Active {
                op,
                attempt,
                waiting: false,
            } = old
            else {
                continue;
            };
            if decision.state.steps.get(i) == Some(old) {
                continue;
            }
            // The attempt in flight ended (a reply, a timeout, compensation interrupting it).
            let Some(flight) = in_flight.remove(&(saga_id.to_owned(), i)) else {
                continue;
            };
            let replied = matches!(
                event,
                Event::Reply { step, op: o, attempt: a, .. } if *step == i && o == op && a == attempt
            );
            if replied && flight.op == *op && flight.attempt == *attempt && i < graph.steps().len()
            {
                let seconds = (now - flight.at).max(0) as f64 / 1000.0;
                self.step_duration
                    .get_or_create(&StepLabels {
                        service: graph.step(i).service.clone(),
                        op: op.as_str(),
                    })
                    .observe(seconds);
            }
        }
        if decision.commands.is_empty() {
            return;
        }
        if in_flight.len() + decision.commands.len() > MAX_IN_FLIGHT {
            in_flight.retain(|_, f| now - f.at < STALE_IN_FLIGHT_MS);
            if in_flight.len() + decision.commands.len() > MAX_IN_FLIGHT {
                in_flight.clear();
            }
        }
        for c in &decision.commands {
            in_flight.insert(
                (saga_id.to_owned(), c.step),
                Flight {
                    op: c.op,
                    attempt: c.attempt,
                    at: now,
                },
            );
        }
    }

    /// Sets the outbox gauges: `pending` unsent rows, the oldest created at `oldest`.
    pub fn set_outbox(&self, pending: i64, oldest: Option<Millis>, now: Millis) {
        self.outbox_pending.set(pending);
        let lag = oldest.map_or(0.0, |t| (now - t).max(0) as f64 / 1000.0);
        self.outbox_lag.set(lag);
    }

    /// Sets the dead-letter gauge: `kept` letters in the database.
    pub fn set_dead_letters_kept(&self, kept: i64) {
        self.dead_letters_kept.set(kept);
    }

    /// The OpenMetrics text exposition of every metric (serve it as [`CONTENT_TYPE`]).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::{Context, Outcome, SagaState, decide};
    use crate::store::SagaRow;

    const SAGA: &str = r#"
name: two
version: 1
sequence_key: ${input.k}
input: { k: string }
steps:
  - id: a
    service: alpha
    action: do
    compensation: undo
  - id: b
    service: beta
    depends_on: [a]
    action: do
    compensation: undo
"#;

    fn graph() -> SagaGraph {
        match sagaflow_dsl::compile(SAGA).graph {
            Some(g) => g,
            None => panic!("test saga does not compile"),
        }
    }

    /// Applies `event` as the engine would: decide, report, move to the new state.
    fn step(m: &Metrics, g: &SagaGraph, row: &mut SagaRow, event: Event, now: Millis) -> Decision {
        let d = decide(g, &row.state, &event, Context { now, random: 0.5 });
        m.decided(g, &row.id, row.version, &row.state, &event, &d, now);
        if !d.ignored {
            row.state = d.state.clone();
            row.version += 1;
        }
        d
    }

    fn row(g: &SagaGraph) -> SagaRow {
        SagaRow {
            id: "s-1".into(),
            name: "two".into(),
            definition_hash: g.content_hash().to_owned(),
            sequence_key: "k".into(),
            state: SagaState::new(g, serde_json::json!({"k": "k"})),
            version: 0,
            created_at: 0,
            finished_at: None,
        }
    }

    fn reply(step: usize, op: Op, attempt: u32, outcome: Outcome) -> Event {
        Event::Reply {
            step,
            op,
            attempt,
            outcome,
        }
    }

    fn ok() -> Outcome {
        Outcome::Ok {
            output: serde_json::json!({}),
        }
    }

    #[test]
    fn latency_retries_compensations_and_outcomes_are_counted() {
        let (m, g) = (Metrics::new(), graph());
        let mut r = row(&g);
        step(&m, &g, &mut r, Event::Begin, 1_000);
        step(&m, &g, &mut r, reply(0, Op::Action, 1, ok()), 1_250);
        let transient = Outcome::Retryable {
            message: "busy".into(),
        };
        step(&m, &g, &mut r, reply(1, Op::Action, 1, transient), 1_300);
        let retry = Event::Timer {
            step: 1,
            op: Op::Action,
            attempt: 2,
            kind: crate::machine::TimerKind::Retry,
        };
        step(&m, &g, &mut r, retry, 1_400);
        let no = Outcome::Business {
            code: "no".into(),
            message: "refused".into(),
        };
        step(&m, &g, &mut r, reply(1, Op::Action, 2, no), 1_900);
        step(&m, &g, &mut r, reply(0, Op::Compensate, 1, ok()), 2_000);
        assert_eq!(r.state.status.name(), "compensated");

        let text = m.encode();
        for line in [
            "sagaflow_sagas_finished_total{outcome=\"compensated\"} 1",
            "sagaflow_sagas_finished_total{outcome=\"completed\"} 0",
            "sagaflow_step_retries_total 1",
            "sagaflow_compensations_total 1",
            // alpha's action (250ms), beta's two attempts (50ms, 500ms), alpha's undo (100ms).
            "sagaflow_step_duration_seconds_count{service=\"alpha\",op=\"action\"} 1",
            "sagaflow_step_duration_seconds_sum{service=\"alpha\",op=\"action\"} 0.25",
            "sagaflow_step_duration_seconds_count{service=\"beta\",op=\"action\"} 2",
            "sagaflow_step_duration_seconds_count{service=\"alpha\",op=\"compensate\"} 1",
        ] {
            assert!(text.contains(line), "missing `{line}` in:\n{text}");
        }
        assert!(lock(&m.in_flight).is_empty(), "every attempt ended");
    }

    #[test]
    fn a_decision_redone_after_a_rollback_is_counted_once() {
        let (m, g) = (Metrics::new(), graph());
        let mut r = row(&g);
        step(&m, &g, &mut r, Event::Begin, 0);
        step(&m, &g, &mut r, reply(0, Op::Action, 1, ok()), 10);
        // The transaction that applied b's success rolled back and is applied again.
        let last = reply(1, Op::Action, 1, ok());
        let first = decide(
            &g,
            &r.state,
            &last,
            Context {
                now: 20,
                random: 0.5,
            },
        );
        m.decided(&g, &r.id, r.version, &r.state, &last, &first, 20);
        step(&m, &g, &mut r, last, 30);
        assert_eq!(r.state.status.name(), "completed");
        let text = m.encode();
        assert!(
            text.contains("sagaflow_sagas_finished_total{outcome=\"completed\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "sagaflow_step_duration_seconds_count{service=\"beta\",op=\"action\"} 1\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn timeouts_and_stale_replies_are_not_observed() {
        let (m, g) = (Metrics::new(), graph());
        let mut r = row(&g);
        step(&m, &g, &mut r, Event::Begin, 0);
        let timeout = Event::Timer {
            step: 0,
            op: Op::Action,
            attempt: 1,
            kind: crate::machine::TimerKind::Timeout,
        };
        step(&m, &g, &mut r, timeout, 5_000);
        let text = m.encode();
        assert!(
            !text.contains("sagaflow_step_duration_seconds_count"),
            "{text}"
        );
        assert!(lock(&m.in_flight).is_empty());
    }

    #[test]
    fn outbox_gauges_and_dead_letters() {
        let m = Metrics::new();
        m.set_outbox(3, Some(1_000), 3_500);
        m.dead_lettered("reply");
        m.dead_lettered("reply");
        m.published(4);
        let text = m.encode();
        for line in [
            "sagaflow_outbox_pending 3\n",
            "sagaflow_outbox_lag_seconds 2.5\n",
            "sagaflow_dead_letters_total{queue=\"reply\"} 2\n",
            "sagaflow_outbox_published_total 4\n",
            "sagaflow_sagas_started_total 0\n",
            "# EOF\n",
        ] {
            assert!(text.contains(line), "missing `{line}` in:\n{text}");
        }
        m.set_outbox(0, None, 4_000);
        assert!(m.encode().contains("sagaflow_outbox_lag_seconds 0.0\n"));
    }
}

//! The saga state machine: a pure function from (definition, state, event, now) to a
//! [`Decision`] — the new state, the commands to send, the timers to set and the history to
//! append. No IO: the driver loads, decides, and writes everything of a decision in one
//! transaction, so every transition is testable without a database or a broker.
//!
//! Rules, in one place:
//! * a step dispatches when all its dependencies succeeded; independent steps dispatch together;
//! * each dispatched attempt gets a timeout timer; a timeout counts as a retryable failure;
//! * retryable failures retry with exponential backoff and jitter up to the step's policy
//!   (`on_failure: retry` steps retry without limit); business failures do not retry;
//! * a required step that fails (business, or retries exhausted) makes the saga compensate;
//!   an optional one (`continue`) is undone alone and its dependents are skipped;
//! * a forward operation *may have taken effect* unless its final answer was a business failure:
//!   only that answer is durable in the worker's barrier, while a retryable answer is not (a
//!   duplicated older command may still apply). Compensation covers every such step; for a
//!   step that never ran, the worker's barrier turns it into a null compensation;
//! * compensation runs in reverse dependency order: a step is undone after all its dependents;
//! * when every step succeeded, TCC steps are confirmed; confirm, cancel and compensate retry
//!   with `compensation_retry` and, when that is exhausted, the saga is Failed for an operator;
//! * a success for the operation in flight is accepted from any attempt — the barrier keeps one
//!   success per (saga, step, operation) and answers it to every later attempt; a business
//!   failure only from the latest attempt sent — the barrier lets a later attempt past an
//!   earlier refusal, so an older refusal says nothing about a newer attempt; replies that match
//!   nothing in flight (duplicates, late, stale attempts) are recorded and ignored.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use sagaflow_dsl::template::{ResolveError, Values};
use sagaflow_dsl::{Compensation, FailurePolicy, SagaGraph, StepKind};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Milliseconds since the Unix epoch: the machine's only notion of time.
pub type Millis = i64;

/// An operation on a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Op {
    Action,
    Compensate,
    Try,
    Confirm,
    Cancel,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Action => "action",
            Op::Compensate => "compensate",
            Op::Try => "try",
            Op::Confirm => "confirm",
            Op::Cancel => "cancel",
        }
    }

    pub fn parse(s: &str) -> Option<Op> {
        Some(match s {
            "action" => Op::Action,
            "compensate" => Op::Compensate,
            "try" => Op::Try,
            "confirm" => Op::Confirm,
            "cancel" => Op::Cancel,
            _ => return None,
        })
    }

    /// Action or try: the operation that moves the saga forward.
    pub fn is_forward(self) -> bool {
        matches!(self, Op::Action | Op::Try)
    }

    /// Compensate or cancel: the operation that undoes a forward one.
    pub fn is_undo(self) -> bool {
        matches!(self, Op::Compensate | Op::Cancel)
    }

    /// The forward operation this one belongs to (`compensate` → `action`; `confirm`, `cancel`
    /// → `try`; forward operations are their own).
    pub fn forward(self) -> Op {
        match self {
            Op::Compensate => Op::Action,
            Op::Cancel | Op::Confirm => Op::Try,
            other => other,
        }
    }

    /// The operation that undoes this one's step (`action` → `compensate`, else `cancel`).
    pub fn undo(self) -> Op {
        match self.forward() {
            Op::Action => Op::Compensate,
            _ => Op::Cancel,
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a saga is. Variants carry what only they need.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum SagaStatus {
    /// Waiting behind another saga with the same sequence key.
    Queued,
    Running,
    Compensating {
        reason: String,
    },
    Completed,
    Compensated {
        reason: String,
    },
    /// A compensation, confirm or retriable-to-success step cannot succeed: an operator decides.
    /// `compensating` says which phase an operator retry resumes (Some: compensation).
    Failed {
        reason: String,
        compensating: Option<String>,
    },
}

impl SagaStatus {
    pub fn name(&self) -> &'static str {
        match self {
            SagaStatus::Queued => "queued",
            SagaStatus::Running => "running",
            SagaStatus::Compensating { .. } => "compensating",
            SagaStatus::Completed => "completed",
            SagaStatus::Compensated { .. } => "compensated",
            SagaStatus::Failed { .. } => "failed",
        }
    }

    pub const NAMES: &'static [&'static str] = &[
        "queued",
        "running",
        "compensating",
        "completed",
        "compensated",
        "failed",
    ];

    /// Completed, Compensated or Failed: nothing more happens without an operator.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            SagaStatus::Completed | SagaStatus::Compensated { .. } | SagaStatus::Failed { .. }
        )
    }
}

/// Where a step is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum StepStatus {
    Pending,
    /// `op` is in flight (`waiting: false`) or waiting for its retry timer (`waiting: true`).
    Active {
        op: Op,
        attempt: u32,
        waiting: bool,
    },
    /// The forward operation succeeded (for TCC: tried, awaiting confirm or cancel).
    Succeeded,
    /// TCC confirm succeeded.
    Confirmed,
    /// The forward operation failed for good. `business`: the answer was a business failure,
    /// so the worker's barrier guarantees it had no effect.
    Failed {
        error: String,
        business: bool,
    },
    /// Never ran: a dependency failed or was skipped.
    Skipped,
    /// Undone (or recorded as a null compensation by the worker).
    Compensated,
    /// `op` could not succeed; the saga is Failed until an operator retries.
    Stuck {
        op: Op,
        attempt: u32,
        error: String,
    },
}

/// The whole state of one saga instance, stored as one value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SagaState {
    pub status: SagaStatus,
    /// Indexed like the graph's steps.
    pub steps: Vec<StepStatus>,
    pub input: Value,
    /// Outputs of steps that succeeded, by step id.
    pub outputs: BTreeMap<String, Value>,
    /// Attempts made per step, all operations together (for status displays).
    pub attempts: Vec<u32>,
    /// Last error per step (for status displays).
    pub last_errors: Vec<Option<String>>,
    /// A Failed saga whose sequence key an operator released ([`Event::ReleaseKey`]): the next
    /// saga of its order may run, so this one never runs again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub key_released: bool,
    /// Per step, the attempt after which its current retry budget began (0: the first
    /// attempt): an operator retry gives a stuck step a fresh budget while its attempt numbers
    /// keep counting up (they name its messages). Empty until the first operator retry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retry_base: Vec<u32>,
    /// Paused by an operator ([`Event::Pause`]): nothing is dispatched until
    /// [`Event::Resume`]; replies and timers are still applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<Paused>,
    /// The saga's W3C trace context (its `start` span's, see [`crate::trace`]): every command
    /// of the saga is a span of this trace. Kept in the state, so it survives the outbox and a
    /// change of engine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<String>,
    /// The W3C `tracestate` that came with the caller's context, kept beside `trace` and
    /// carried with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracestate: Option<String>,
}

/// Who paused a saga, why, and what it holds back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
pub struct Paused {
    pub actor: String,
    pub reason: String,
    #[serde(with = "crate::time::rfc3339")]
    #[cfg_attr(feature = "http", schema(value_type = String, format = DateTime))]
    pub since: Millis,
    /// Steps whose next operation would have been dispatched meanwhile: each waits as
    /// `Active { waiting: true }` and is dispatched when the saga resumes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub held: Vec<usize>,
}

/// How an operator resolves a stuck step ([`Event::Skip`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "as", rename_all = "snake_case")]
pub enum Resolution {
    /// Its operation is done (by hand): a forward step succeeded with `output`, a confirm is
    /// confirmed, an undo is compensated.
    Done { output: Value },
    /// It has no effect any more (it never took one, or it was undone by hand).
    Compensated,
}

impl SagaState {
    /// A new saga, Queued until the driver hands it its sequence key with [`Event::Begin`].
    pub fn new(graph: &SagaGraph, input: Value) -> Self {
        let n = graph.steps().len();
        SagaState {
            status: SagaStatus::Queued,
            steps: vec![StepStatus::Pending; n],
            input,
            outputs: BTreeMap::new(),
            attempts: vec![0; n],
            last_errors: vec![None; n],
            key_released: false,
            retry_base: Vec::new(),
            paused: None,
            trace: None,
            tracestate: None,
        }
    }

    /// Attempts of `step` made within its current retry budget, counting `attempt`.
    pub fn attempts_in_budget(&self, step: usize, attempt: u32) -> u32 {
        attempt.saturating_sub(self.retry_base.get(step).copied().unwrap_or(0))
    }

    /// Whether the saga has given up its sequence key: Completed or Compensated, or Failed with
    /// the key released by an operator. A Failed saga keeps it: a retry may still resume it
    /// (and it may still compensate), so no newer saga of its order may run meanwhile.
    pub fn releases_key(&self) -> bool {
        match self.status {
            SagaStatus::Completed | SagaStatus::Compensated { .. } => true,
            SagaStatus::Failed { .. } => self.key_released,
            SagaStatus::Queued | SagaStatus::Running | SagaStatus::Compensating { .. } => false,
        }
    }
}

/// What a worker answered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    Ok { output: Value },
    Retryable { message: String },
    Business { code: String, message: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimerKind {
    /// The attempt did not answer in time.
    Timeout,
    /// The backoff before the next attempt is over.
    Retry,
    /// The saga's `deadline` passed (a saga-level timer: its step, op and attempt are 0,
    /// `Action`, 0).
    Deadline,
}

/// Everything that can happen to a saga.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The sequence key is ours: start.
    Begin,
    Reply {
        step: usize,
        op: Op,
        attempt: u32,
        outcome: Outcome,
    },
    Timer {
        step: usize,
        op: Op,
        attempt: u32,
        kind: TimerKind,
    },
    /// Operator: compensate a Running (or Queued) saga.
    Abort { actor: String, reason: String },
    /// Operator: resume a Failed saga where it stopped.
    Retry { actor: String },
    /// Operator: a Failed saga gives its sequence key to the next saga of its order (it was
    /// resolved outside the engine). It stays Failed and can never be retried.
    ReleaseKey { actor: String, reason: String },
    /// Operator: resolve a Failed saga's stuck step by hand (`step` is its id), then go on.
    Skip {
        step: String,
        resolution: Resolution,
        actor: String,
        reason: String,
    },
    /// Operator: dispatch nothing until [`Event::Resume`] (replies are still recorded).
    Pause { actor: String, reason: String },
    /// Operator: end a pause; what it held back is dispatched now.
    Resume { actor: String },
}

/// A message for a worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Command {
    pub step: usize,
    pub step_id: String,
    pub service: String,
    pub op: Op,
    /// The operation's name in the definition (`charge`, `refund`, `freeze`, …).
    pub operation: String,
    pub attempt: u32,
    pub params: Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Timer {
    pub step: usize,
    pub op: Op,
    pub attempt: u32,
    pub kind: TimerKind,
    pub at: Millis,
}

/// One line of the saga's timeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// Short stable word: `begin`, `dispatch`, `succeeded`, `failed`, `retry`, `timeout`,
    /// `compensate`, `compensated`, `skipped`, `completed`, `ignored`, …
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    pub detail: String,
}

/// What to do after an event.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub state: SagaState,
    pub commands: Vec<Command>,
    pub timers: Vec<Timer>,
    pub history: Vec<HistoryEntry>,
    /// The event changed nothing (a duplicate, a stale timer): the driver still records it.
    pub ignored: bool,
}

/// The clock and the randomness a decision may use, passed in so that `decide` stays pure.
#[derive(Debug, Clone, Copy)]
pub struct Context {
    pub now: Millis,
    /// In 0.0..1.0: picks the jitter of any backoff set by this decision.
    pub random: f64,
}

/// Applies `event` to `state`.
pub fn decide(graph: &SagaGraph, state: &SagaState, event: &Event, ctx: Context) -> Decision {
    let mut m = Machine {
        graph,
        ctx,
        state: state.clone(),
        commands: Vec::new(),
        timers: Vec::new(),
        history: Vec::new(),
    };
    let applied = m.apply(event);
    if applied {
        m.progress();
        m.end_pause_if_finished();
    }
    Decision {
        state: m.state,
        commands: m.commands,
        timers: m.timers,
        history: m.history,
        ignored: !applied,
    }
}

struct Machine<'g> {
    graph: &'g SagaGraph,
    ctx: Context,
    state: SagaState,
    commands: Vec<Command>,
    timers: Vec<Timer>,
    history: Vec<HistoryEntry>,
}

impl Machine<'_> {
    fn log(&mut self, kind: &str, step: Option<usize>, detail: impl Into<String>) {
        self.history.push(HistoryEntry {
            kind: kind.to_owned(),
            step: step.map(|i| self.graph.step(i).id.0.clone()),
            detail: detail.into(),
        });
    }

    fn ignore(&mut self, step: Option<usize>, why: impl Into<String>) -> bool {
        self.log("ignored", step, why);
        false
    }

    /// Returns false when the event does not apply (recorded as `ignored`).
    fn apply(&mut self, event: &Event) -> bool {
        match event {
            Event::Begin => match self.state.status {
                SagaStatus::Queued => {
                    self.state.status = SagaStatus::Running;
                    self.log("begin", None, "sequence key acquired; starting");
                    if let Some(d) = self.graph.def().deadline {
                        self.timers.push(deadline_timer(self.ctx.now + millis(d)));
                    }
                    true
                }
                _ => self.ignore(None, "begin: the saga has already started"),
            },
            Event::Reply {
                step,
                op,
                attempt,
                outcome,
            } => self.reply(*step, *op, *attempt, outcome),
            Event::Timer {
                step,
                op,
                attempt,
                kind,
            } => self.timer(*step, *op, *attempt, *kind),
            Event::Abort { actor, reason } => self.abort(actor, reason),
            Event::Retry { actor } => self.operator_retry(actor),
            Event::ReleaseKey { actor, reason } => self.release_key(actor, reason),
            Event::Skip {
                step,
                resolution,
                actor,
                reason,
            } => self.skip(step, resolution, actor, reason),
            Event::Pause { actor, reason } => self.pause(actor, reason),
            Event::Resume { actor } => self.resume(actor),
        }
    }

    fn reply(&mut self, step: usize, op: Op, attempt: u32, outcome: &Outcome) -> bool {
        if step >= self.state.steps.len() {
            return self.ignore(None, format!("reply for unknown step #{step}"));
        }
        let StepStatus::Active {
            op: current,
            attempt: current_attempt,
            waiting,
        } = self.state.steps[step].clone()
        else {
            return self.ignore(
                Some(step),
                format!("{op} reply (attempt {attempt}): nothing in flight; duplicate or late"),
            );
        };
        if current != op {
            return self.ignore(
                Some(step),
                format!("{op} reply (attempt {attempt}) while {current} is in flight; stale"),
            );
        }
        match outcome {
            Outcome::Ok { output } => {
                self.succeeded(step, op, attempt, output.clone());
                true
            }
            Outcome::Business { code, message } => {
                // The worker's barrier lets a later attempt past an earlier attempt's refusal
                // (an operator's retry must reach the handler), so a refusal says nothing about
                // an attempt sent after it: that one may still take effect. Wait for its answer.
                let last_sent = if waiting {
                    current_attempt.saturating_sub(1)
                } else {
                    current_attempt
                };
                if attempt < last_sent {
                    return self.ignore(
                        Some(step),
                        format!("{op} attempt {attempt} refused ([{code}]), but attempt {last_sent} was sent since; waiting for its answer"),
                    );
                }
                let error = format!("[{code}] {message}");
                self.state.last_errors[step] = Some(error.clone());
                self.log(
                    "failed",
                    Some(step),
                    format!("{op} attempt {attempt}: business failure {error}"),
                );
                if op.is_forward() {
                    self.forward_failed(step, error, true);
                } else {
                    self.stuck(
                        step,
                        op,
                        current_attempt,
                        format!("{op} cannot succeed: {error}"),
                    );
                }
                true
            }
            Outcome::Retryable { message } => {
                if attempt != current_attempt || waiting {
                    return self.ignore(
                        Some(step),
                        format!("{op} attempt {attempt} failed transiently, but attempt {current_attempt} is current; stale"),
                    );
                }
                self.state.last_errors[step] = Some(message.clone());
                self.transient(step, op, attempt, format!("transient failure: {message}"));
                true
            }
        }
    }

    fn timer(&mut self, step: usize, op: Op, attempt: u32, kind: TimerKind) -> bool {
        if kind == TimerKind::Deadline {
            return self.deadline_passed();
        }
        let current = self.state.steps.get(step).cloned();
        match (kind, current) {
            (
                TimerKind::Timeout,
                Some(StepStatus::Active {
                    op: o,
                    attempt: a,
                    waiting: false,
                }),
            ) if o == op && a == attempt => {
                let secs = self.graph.step(step).timeout;
                let error = format!("timed out after {}", fmt_duration(secs));
                self.state.last_errors[step] = Some(error.clone());
                self.log(
                    "timeout",
                    Some(step),
                    format!("{op} attempt {attempt} {error}"),
                );
                self.transient(step, op, attempt, error);
                true
            }
            (
                TimerKind::Retry,
                Some(StepStatus::Active {
                    op: o,
                    attempt: a,
                    waiting: true,
                }),
            ) if o == op && a == attempt => {
                self.dispatch(step, op, attempt);
                true
            }
            _ => self.ignore(
                (step < self.state.steps.len()).then_some(step),
                format!(
                    "{} timer for {op} attempt {attempt}: no longer current",
                    timer_word(kind)
                ),
            ),
        }
    }

    /// Why a Running saga can no longer be compensated, if it cannot.
    fn forward_only(&self) -> Option<&'static str> {
        let past_pivot = self.state.steps.iter().enumerate().any(|(i, s)| {
            !self.graph.step(i).is_reversible()
                && !matches!(s, StepStatus::Pending | StepStatus::Skipped)
        });
        if past_pivot {
            return Some("an irreversible step has started, so the saga can only go forward");
        }
        let confirming = self.state.steps.iter().any(|s| {
            matches!(
                s,
                StepStatus::Confirmed
                    | StepStatus::Active {
                        op: Op::Confirm,
                        ..
                    }
            )
        });
        confirming.then_some("TCC confirmation has begun, so the saga can only complete")
    }

    /// The saga's `deadline` passed: a Running saga stops going forward and compensates,
    /// unless it is past its pivot; the history says which.
    fn deadline_passed(&mut self) -> bool {
        let limit = self.graph.def().deadline.map_or_else(
            || "its deadline".to_owned(),
            |d| format!("its deadline of {}", fmt_whole(d)),
        );
        match &self.state.status {
            SagaStatus::Running => match self.forward_only() {
                Some(why) => {
                    self.log("deadline", None, format!("{limit} passed, but {why}"));
                    true
                }
                None => {
                    self.log("deadline", None, format!("{limit} passed: compensating"));
                    self.start_compensation(format!("{limit} passed"));
                    true
                }
            },
            other => {
                let name = other.name();
                self.ignore(None, format!("{limit} passed; the saga is {name}"))
            }
        }
    }

    fn abort(&mut self, actor: &str, reason: &str) -> bool {
        match &self.state.status {
            SagaStatus::Queued => {
                self.state.status = SagaStatus::Compensated {
                    reason: format!("aborted before it started: {reason}"),
                };
                self.log("aborted", None, format!("operator {actor}: {reason}"));
                true
            }
            SagaStatus::Running => {
                if let Some(why) = self.forward_only() {
                    return self.ignore(None, format!("abort refused: {why}"));
                }
                self.log("aborted", None, format!("operator {actor}: {reason}"));
                self.start_compensation(format!("aborted by operator: {reason}"));
                true
            }
            other => {
                let name = other.name();
                self.ignore(None, format!("abort refused: the saga is {name}"))
            }
        }
    }

    fn operator_retry(&mut self, actor: &str) -> bool {
        let SagaStatus::Failed { compensating, .. } = self.state.status.clone() else {
            let name = self.state.status.name();
            return self.ignore(
                None,
                format!("retry refused: the saga is {name}, not failed"),
            );
        };
        if self.state.key_released {
            return self.ignore(
                None,
                "retry refused: its sequence key was released, so it could run beside a newer saga of its order; start a new saga instead",
            );
        }
        self.state.status = match compensating {
            Some(reason) => SagaStatus::Compensating { reason },
            None => SagaStatus::Running,
        };
        self.log(
            "retry",
            None,
            format!("operator {actor}: retry, resuming with a fresh retry budget"),
        );
        for i in 0..self.state.steps.len() {
            if let StepStatus::Stuck { op, attempt, .. } = self.state.steps[i].clone() {
                // A fresh budget: the next attempt is the first of it again.
                if self.state.retry_base.len() < self.state.steps.len() {
                    self.state.retry_base.resize(self.state.steps.len(), 0);
                }
                self.state.retry_base[i] = attempt;
                self.dispatch(i, op, attempt + 1);
            }
        }
        true
    }

    fn release_key(&mut self, actor: &str, reason: &str) -> bool {
        if !matches!(self.state.status, SagaStatus::Failed { .. }) {
            let name = self.state.status.name();
            return self.ignore(
                None,
                format!("release refused: the saga is {name}; only a Failed saga's key can be released (a saga gives it up by itself when it completes or compensates)"),
            );
        }
        if self.state.key_released {
            return self.ignore(
                None,
                "release refused: its sequence key was released already",
            );
        }
        self.state.key_released = true;
        self.log(
            "key-released",
            None,
            format!("operator {actor} released the sequence key: {reason}; the next saga of this order may begin, and this one is never retried"),
        );
        true
    }

    /// Resolves a Failed saga's stuck step as the operator says, then resumes the saga's phase
    /// if nothing else is stuck.
    fn skip(&mut self, step_id: &str, resolution: &Resolution, actor: &str, reason: &str) -> bool {
        let SagaStatus::Failed { compensating, .. } = self.state.status.clone() else {
            let name = self.state.status.name();
            return self.ignore(
                None,
                format!("skip refused: the saga is {name}; only a Failed saga's stuck step can be skipped"),
            );
        };
        if self.state.key_released {
            return self.ignore(
                None,
                "skip refused: its sequence key was released, so it never runs again",
            );
        }
        let Some(step) = self.graph.steps().iter().position(|s| s.id.0 == step_id) else {
            let ids: Vec<&str> = self.graph.steps().iter().map(|s| s.id.0.as_str()).collect();
            return self.ignore(
                None,
                format!(
                    "skip refused: the saga has no step `{step_id}`; its steps are {}",
                    ids.join(", ")
                ),
            );
        };
        let StepStatus::Stuck { op, .. } = self.state.steps[step].clone() else {
            let stuck: Vec<&str> = (0..self.state.steps.len())
                .filter(|&i| matches!(self.state.steps[i], StepStatus::Stuck { .. }))
                .map(|i| self.graph.step(i).id.0.as_str())
                .collect();
            return self.ignore(
                Some(step),
                format!(
                    "skip refused: step `{step_id}` is not stuck; the stuck steps are {}",
                    stuck.join(", ")
                ),
            );
        };
        let (new, detail) = match (resolution, op) {
            (Resolution::Done { output }, Op::Action | Op::Try) => {
                let def = self.graph.step(step);
                let missing: Vec<&str> = def
                    .outputs
                    .iter()
                    .flatten()
                    .filter(|k| output.get(k.as_str()).is_none())
                    .map(String::as_str)
                    .collect();
                if !missing.is_empty() {
                    return self.ignore(
                        Some(step),
                        format!(
                            "skip refused: step `{step_id}` declares the outputs {}; the output given lacks {}",
                            def.outputs.iter().flatten().cloned().collect::<Vec<_>>().join(", "),
                            missing.join(", ")
                        ),
                    );
                }
                let id = def.id.0.clone();
                self.state.outputs.insert(id, output.clone());
                (
                    StepStatus::Succeeded,
                    format!("{op} marked done with output {output}"),
                )
            }
            (Resolution::Done { .. }, Op::Confirm) => {
                (StepStatus::Confirmed, "confirm marked done".to_owned())
            }
            (Resolution::Done { .. } | Resolution::Compensated, Op::Compensate | Op::Cancel) => {
                (StepStatus::Compensated, format!("{op} marked done"))
            }
            (Resolution::Compensated, Op::Action | Op::Try) => (
                StepStatus::Compensated,
                format!("{op} marked as without effect"),
            ),
            (Resolution::Compensated, Op::Confirm) => {
                return self.ignore(
                    Some(step),
                    "skip refused: a confirm cannot be marked compensated (the saga is past its reservation); mark it done",
                );
            }
        };
        self.log(
            "skip",
            Some(step),
            format!("operator {actor}: {detail}: {reason}"),
        );
        self.state.steps[step] = new.clone();
        self.state.last_errors[step] = None;
        let other_stuck = self
            .state
            .steps
            .iter()
            .enumerate()
            .find_map(|(i, s)| match s {
                StepStatus::Stuck { error, .. } => Some((i, error.clone())),
                _ => None,
            });
        if let Some((i, error)) = other_stuck {
            let id = &self.graph.step(i).id;
            self.state.status = SagaStatus::Failed {
                reason: format!("step `{id}`: {error}"),
                compensating,
            };
            return true;
        }
        match compensating {
            Some(reason) => self.state.status = SagaStatus::Compensating { reason },
            None => {
                self.state.status = SagaStatus::Running;
                // A required forward step without effect: the saga cannot complete.
                let def = self.graph.step(step);
                if new == StepStatus::Compensated
                    && op.is_forward()
                    && def.on_failure != FailurePolicy::Continue
                {
                    let id = &def.id;
                    self.start_compensation(format!(
                        "step `{id}` was marked as without effect by operator {actor}"
                    ));
                }
            }
        }
        true
    }

    fn pause(&mut self, actor: &str, reason: &str) -> bool {
        if let SagaStatus::Completed | SagaStatus::Compensated { .. } = self.state.status {
            let name = self.state.status.name();
            return self.ignore(None, format!("pause refused: the saga is {name}"));
        }
        if let Some(p) = &self.state.paused {
            let by = p.actor.clone();
            return self.ignore(None, format!("pause refused: already paused by {by}"));
        }
        self.state.paused = Some(Paused {
            actor: actor.to_owned(),
            reason: reason.to_owned(),
            since: self.ctx.now,
            held: Vec::new(),
        });
        self.log(
            "paused",
            None,
            format!("operator {actor}: {reason}; nothing is dispatched until it resumes"),
        );
        true
    }

    fn resume(&mut self, actor: &str) -> bool {
        let Some(paused) = self.state.paused.take() else {
            return self.ignore(None, "resume refused: the saga is not paused");
        };
        let held: Vec<usize> = paused
            .held
            .iter()
            .copied()
            .filter(|&i| {
                matches!(
                    self.state.steps.get(i),
                    Some(StepStatus::Active { waiting: true, .. })
                )
            })
            .collect();
        let names: Vec<&str> = held
            .iter()
            .map(|&i| self.graph.step(i).id.0.as_str())
            .collect();
        let what = if names.is_empty() {
            "nothing was held back".to_owned()
        } else {
            format!("dispatching what was held back: {}", names.join(", "))
        };
        self.log("resumed", None, format!("operator {actor}: {what}"));
        for i in held {
            if let StepStatus::Active { op, attempt, .. } = self.state.steps[i] {
                self.dispatch(i, op, attempt);
            }
        }
        true
    }

    /// A pause ends by itself when the saga completes or compensates (nothing is left to hold).
    fn end_pause_if_finished(&mut self) {
        if self.state.paused.is_some()
            && matches!(
                self.state.status,
                SagaStatus::Completed | SagaStatus::Compensated { .. }
            )
        {
            self.state.paused = None;
            self.log("resumed", None, "the pause ended: the saga finished");
        }
    }

    fn succeeded(&mut self, step: usize, op: Op, attempt: u32, output: Value) {
        let id = self.graph.step(step).id.0.clone();
        self.log(
            "succeeded",
            Some(step),
            format!("{op} attempt {attempt} succeeded"),
        );
        self.state.steps[step] = match op {
            Op::Action | Op::Try => {
                self.state.outputs.insert(id, output);
                StepStatus::Succeeded
            }
            Op::Confirm => StepStatus::Confirmed,
            Op::Compensate | Op::Cancel => StepStatus::Compensated,
        };
    }

    /// A retryable failure or a timeout of the attempt in flight.
    fn transient(&mut self, step: usize, op: Op, attempt: u32, error: String) {
        let def = self.graph.step(step);
        let policy = if op.is_forward() {
            def.retry
        } else {
            def.compensation_retry
        };
        // Retriable-to-success steps retry without limit, and so does a pivot: an irreversible
        // action whose outcome is unknown may have taken effect, so the saga can neither go on
        // nor compensate until it answers definitively.
        let unlimited =
            op.is_forward() && (def.on_failure == FailurePolicy::Retry || !def.is_reversible());
        let tried = self.state.attempts_in_budget(step, attempt);
        if unlimited || tried < policy.max_attempts {
            let delay = policy.backoff(tried, self.ctx.random);
            self.state.steps[step] = StepStatus::Active {
                op,
                attempt: attempt + 1,
                waiting: true,
            };
            self.timers.push(Timer {
                step,
                op,
                attempt: attempt + 1,
                kind: TimerKind::Retry,
                at: self.ctx.now + millis(delay),
            });
            self.log(
                "retry",
                Some(step),
                format!("{op} attempt {} in {}", attempt + 1, fmt_duration(delay)),
            );
        } else if op.is_forward() {
            self.forward_failed(step, format!("{error} (after {tried} attempts)"), false);
        } else {
            self.stuck(
                step,
                op,
                attempt,
                format!("{op} still failing after {tried} attempts: {error}"),
            );
        }
    }

    /// The forward operation failed for good.
    fn forward_failed(&mut self, step: usize, error: String, business: bool) {
        let def = self.graph.step(step);
        match def.on_failure {
            FailurePolicy::Retry => {
                // Retriable-to-success steps never run out of retries; a business failure
                // contradicts the declaration: an operator must look.
                let op = forward_op(&def.kind);
                let attempt = match self.state.steps[step] {
                    StepStatus::Active { attempt, .. } => attempt,
                    _ => 1,
                };
                self.stuck(
                    step,
                    op,
                    attempt,
                    format!("declared retriable-to-success, but: {error}"),
                );
            }
            FailurePolicy::Continue => {
                self.log(
                    "failed",
                    Some(step),
                    format!("optional step failed, continuing: {error}"),
                );
                self.state.steps[step] = StepStatus::Failed { error, business };
                if !business && def.is_reversible() {
                    // It may have taken effect: undo it alone, the saga goes on.
                    let undo = undo_op(&def.kind);
                    self.dispatch(step, undo, 1);
                }
            }
            FailurePolicy::Compensate => {
                self.state.steps[step] = StepStatus::Failed {
                    error: error.clone(),
                    business,
                };
                let id = &def.id;
                self.start_compensation(format!("step `{id}` failed: {error}"));
            }
        }
    }

    fn stuck(&mut self, step: usize, op: Op, attempt: u32, error: String) {
        self.state.steps[step] = StepStatus::Stuck {
            op,
            attempt,
            error: error.clone(),
        };
        let compensating = match &self.state.status {
            SagaStatus::Compensating { reason } => Some(reason.clone()),
            SagaStatus::Failed { compensating, .. } => compensating.clone(),
            _ => None,
        };
        let id = &self.graph.step(step).id;
        let reason = format!("step `{id}`: {error}");
        self.log(
            "failed",
            Some(step),
            format!("saga needs an operator: {reason}"),
        );
        self.state.status = SagaStatus::Failed {
            reason,
            compensating,
        };
    }

    fn start_compensation(&mut self, reason: String) {
        match &self.state.status {
            SagaStatus::Compensating { .. }
            | SagaStatus::Failed {
                compensating: Some(_),
                ..
            } => {
                return;
            }
            _ => {}
        }
        self.log("compensating", None, reason.clone());
        for i in 0..self.state.steps.len() {
            match self.state.steps[i].clone() {
                // Held by a pause before anything was ever sent: it cannot have taken effect.
                StepStatus::Active { op, .. } if op.is_forward() && self.state.attempts[i] == 0 => {
                    self.state.steps[i] = StepStatus::Skipped;
                    self.log(
                        "skipped",
                        Some(i),
                        "held by the pause, never sent; the saga compensates",
                    );
                }
                // Forward operations in flight or waiting for a retry may take effect: stop them
                // (their replies will be ignored) and let compensation cover them.
                StepStatus::Active { op, .. } if op.is_forward() => {
                    self.state.steps[i] = StepStatus::Failed {
                        error: "interrupted by compensation".into(),
                        business: false,
                    };
                }
                // A stuck forward operation's last answer was a business failure: no effect, and
                // once the saga compensates nobody needs it to succeed any more.
                StepStatus::Stuck { op, error, .. } if op.is_forward() => {
                    self.state.steps[i] = StepStatus::Failed {
                        error,
                        business: true,
                    };
                }
                _ => {}
            }
        }
        // An undo that is itself stuck keeps the saga with the operator; retry resumes here.
        let stuck = self
            .state
            .steps
            .iter()
            .any(|s| matches!(s, StepStatus::Stuck { .. }));
        self.state.status = match (&self.state.status, stuck) {
            (SagaStatus::Failed { reason: why, .. }, true) => SagaStatus::Failed {
                reason: why.clone(),
                compensating: Some(reason),
            },
            _ => SagaStatus::Compensating { reason },
        };
    }

    /// Dispatches whatever can run now, and detects the end of the saga.
    fn progress(&mut self) {
        match self.state.status {
            SagaStatus::Running => self.progress_forward(),
            SagaStatus::Compensating { .. } => self.progress_compensation(),
            _ => {}
        }
    }

    fn progress_forward(&mut self) {
        let order = self.graph.topological_order().to_vec();
        for &i in &order {
            if self.state.steps[i] != StepStatus::Pending {
                continue;
            }
            let deps = self.graph.dependencies(i);
            let dead = deps.iter().any(|&d| {
                matches!(
                    self.state.steps[d],
                    StepStatus::Failed { .. } | StepStatus::Skipped | StepStatus::Compensated
                ) || matches!(self.state.steps[d], StepStatus::Active { op, .. } if op.is_undo())
            });
            if dead {
                self.state.steps[i] = StepStatus::Skipped;
                self.log("skipped", Some(i), "a dependency did not succeed");
                continue;
            }
            let ready = deps.iter().all(|&d| {
                matches!(
                    self.state.steps[d],
                    StepStatus::Succeeded | StepStatus::Confirmed
                )
            });
            if ready {
                let op = forward_op(&self.graph.step(i).kind);
                self.dispatch(i, op, 1);
                if !matches!(self.state.status, SagaStatus::Running) {
                    return self.progress();
                }
            }
        }
        let busy = self
            .state
            .steps
            .iter()
            .any(|s| matches!(s, StepStatus::Pending | StepStatus::Active { .. }));
        if busy {
            return;
        }
        // Every forward operation is done: confirm the TCC reservations, then complete.
        let to_confirm: Vec<usize> = (0..self.state.steps.len())
            .filter(|&i| {
                self.state.steps[i] == StepStatus::Succeeded
                    && matches!(self.graph.step(i).kind, StepKind::Tcc { .. })
            })
            .collect();
        if !to_confirm.is_empty() {
            for i in to_confirm {
                self.dispatch(i, Op::Confirm, 1);
            }
            return;
        }
        self.state.status = SagaStatus::Completed;
        self.log("completed", None, "every step succeeded");
    }

    /// Whether step `i`'s forward operation may have taken effect and is not yet undone.
    fn needs_undo(&self, i: usize) -> bool {
        match &self.state.steps[i] {
            StepStatus::Succeeded => true,
            StepStatus::Failed { business, .. } => !business,
            _ => false,
        }
    }

    fn progress_compensation(&mut self) {
        let order = self.graph.compensation_order();
        for &i in &order {
            if !self.needs_undo(i) {
                continue;
            }
            let def = self.graph.step(i);
            if !def.is_reversible() {
                // The pivot rule makes this unreachable for valid definitions: a pivot is retried
                // until it answers, and nothing after it can demand compensation. Never pretend
                // to undo it: stop for an operator.
                let op = forward_op(&def.kind);
                self.stuck(
                    i,
                    op,
                    0,
                    "irreversible step took effect but the saga must compensate".into(),
                );
                return;
            }
            let dependents_done = self.graph.dependents(i).iter().all(|&d| {
                !self.needs_undo(d)
                    && !matches!(
                        self.state.steps[d],
                        StepStatus::Active { .. } | StepStatus::Stuck { .. }
                    )
            });
            if dependents_done {
                let undo = undo_op(&def.kind);
                self.dispatch(i, undo, 1);
            }
        }
        let busy = (0..self.state.steps.len()).any(|i| {
            self.needs_undo(i) || matches!(self.state.steps[i], StepStatus::Active { .. })
        });
        if !busy && let SagaStatus::Compensating { reason } = &self.state.status {
            let reason = reason.clone();
            self.log(
                "compensated",
                None,
                "every step that may have taken effect is undone",
            );
            self.state.status = SagaStatus::Compensated { reason };
        }
    }

    /// Sends `op` for `step` (attempt `attempt`) with its timeout timer. Parameters that cannot
    /// be resolved are a business failure of the step (the definition and the data disagree).
    fn dispatch(&mut self, step: usize, op: Op, attempt: u32) {
        let def = self.graph.step(step);
        let params = match self.params(step) {
            Ok(p) => p,
            Err(e) => {
                let error = format!("[bad_params] {e}");
                self.state.last_errors[step] = Some(error.clone());
                if op.is_forward() {
                    self.state.steps[step] = StepStatus::Active {
                        op,
                        attempt,
                        waiting: false,
                    };
                    self.forward_failed(step, error, true);
                } else {
                    self.stuck(step, op, attempt, error);
                }
                return;
            }
        };
        if let Some(paused) = &mut self.state.paused {
            // Held: it waits like a step waiting for a retry, with no timer, until resumed.
            self.state.steps[step] = StepStatus::Active {
                op,
                attempt,
                waiting: true,
            };
            if !paused.held.contains(&step) {
                paused.held.push(step);
            }
            let name = operation_name(&def.kind, op);
            self.log(
                "held",
                Some(step),
                format!("{op} `{name}` attempt {attempt} waits: the saga is paused"),
            );
            return;
        }
        self.state.steps[step] = StepStatus::Active {
            op,
            attempt,
            waiting: false,
        };
        self.state.attempts[step] += 1;
        self.commands.push(Command {
            step,
            step_id: def.id.0.clone(),
            service: def.service.clone(),
            op,
            operation: operation_name(&def.kind, op).to_owned(),
            attempt,
            params,
        });
        self.timers.push(Timer {
            step,
            op,
            attempt,
            kind: TimerKind::Timeout,
            at: self.ctx.now + millis(def.timeout),
        });
        let name = operation_name(&def.kind, op);
        self.log(
            "dispatch",
            Some(step),
            format!("{op} `{name}` attempt {attempt}"),
        );
    }

    fn params(&self, step: usize) -> Result<Value, ResolveError> {
        let outputs = &self.state.outputs;
        let lookup = |id: &str| outputs.get(id);
        let values = Values {
            input: &self.state.input,
            outputs: &lookup,
        };
        let mut map = serde_json::Map::new();
        for (k, expr) in &self.graph.step(step).params {
            map.insert(k.clone(), expr.resolve(&values)?);
        }
        Ok(Value::Object(map))
    }
}

pub fn forward_op(kind: &StepKind) -> Op {
    match kind {
        StepKind::Saga { .. } => Op::Action,
        StepKind::Tcc { .. } => Op::Try,
    }
}

pub fn undo_op(kind: &StepKind) -> Op {
    match kind {
        StepKind::Saga { .. } => Op::Compensate,
        StepKind::Tcc { .. } => Op::Cancel,
    }
}

/// The definition's name for `op` on a step of this kind (`charge`, `refund`, `freeze`, …).
pub fn operation_name(kind: &StepKind, op: Op) -> &str {
    match (kind, op) {
        (StepKind::Saga { action, .. }, Op::Action) => action,
        (
            StepKind::Saga {
                compensation: Compensation::Operation(c),
                ..
            },
            Op::Compensate,
        ) => c,
        (StepKind::Tcc { r#try, .. }, Op::Try) => r#try,
        (StepKind::Tcc { confirm, .. }, Op::Confirm) => confirm,
        (StepKind::Tcc { cancel, .. }, Op::Cancel) => cancel,
        _ => "none",
    }
}

fn millis(d: Duration) -> Millis {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 4)
}

fn fmt_duration(d: Duration) -> String {
    if d.as_millis() < 1000 {
        format!("{}ms", d.as_millis())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

/// `30m`, `2h`, `90s`: a duration as a definition writes it, when it is whole minutes or hours.
fn fmt_whole(d: Duration) -> String {
    let s = d.as_secs();
    if d.subsec_millis() == 0 && s > 0 {
        if s.is_multiple_of(3600) {
            return format!("{}h", s / 3600);
        }
        if s.is_multiple_of(60) {
            return format!("{}m", s / 60);
        }
        return format!("{s}s");
    }
    fmt_duration(d)
}

fn timer_word(kind: TimerKind) -> &'static str {
    match kind {
        TimerKind::Timeout => "timeout",
        TimerKind::Retry => "retry",
        TimerKind::Deadline => "deadline",
    }
}

/// The saga-level timer of its `deadline`, due at `at`.
pub fn deadline_timer(at: Millis) -> Timer {
    Timer {
        step: 0,
        op: Op::Action,
        attempt: 0,
        kind: TimerKind::Deadline,
        at,
    }
}

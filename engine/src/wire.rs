//! What travels between the engine and the workers, as JSON. Ids are deterministic, so a
//! message re-sent after a crash is recognised as the same message downstream.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::machine::{Op, Outcome};

/// Engine → worker: run one operation of one step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandMsg {
    /// W3C trace context (see [`crate::trace`]). First, so the transport finds it by a prefix
    /// check; absent in messages from before traces, and ignored when malformed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// The W3C `tracestate` that came with the trace context, if any (see [`crate::trace`]).
    /// Second, right after `traceparent`, for the same prefix check; ignored when malformed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracestate: Option<String>,
    pub saga_id: String,
    /// The saga definition's name (`order-paid`).
    pub saga: String,
    /// The saga's sequence key: commands of one key are handled in order.
    pub key: String,
    pub step: usize,
    pub step_id: String,
    pub service: String,
    pub op: Op,
    /// This operation's name in the definition (`refund`).
    pub operation: String,
    /// The step's forward operation name (`charge`): with `op` it selects the handler, since
    /// one name can be an action in one step and a compensation in another.
    pub forward: String,
    pub attempt: u32,
    pub params: Value,
}

impl CommandMsg {
    pub fn message_id(&self) -> String {
        command_id(&self.saga_id, self.step, self.op, self.attempt)
    }
}

pub fn command_id(saga_id: &str, step: usize, op: Op, attempt: u32) -> String {
    format!("{saga_id}/{step}/{op}/{attempt}")
}

/// Worker → engine: the outcome of one command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplyMsg {
    /// W3C trace context (see [`crate::trace`]). First, so the transport finds it by a prefix
    /// check; absent in messages from before traces, and ignored when malformed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// The W3C `tracestate` that came with the trace context, if any (see [`crate::trace`]).
    /// Second, right after `traceparent`, for the same prefix check; ignored when malformed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracestate: Option<String>,
    pub saga_id: String,
    pub step: usize,
    pub op: Op,
    pub attempt: u32,
    pub outcome: Outcome,
}

impl ReplyMsg {
    /// The same command answered twice (a duplicate delivery) yields the same reply id (the AMQP
    /// message id; the engine recognises the second one by the saga's state).
    pub fn message_id(&self) -> String {
        format!(
            "{}/reply",
            command_id(&self.saga_id, self.step, self.op, self.attempt)
        )
    }
}

/// Application → engine (through the client library's outbox): start a saga. Idempotent by
/// `idempotency_key`: delivered twice, it still starts one saga.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StartMsg {
    /// The saga definition's name (`order-paid`); the engine must have it registered.
    pub saga: String,
    pub input: Value,
    pub idempotency_key: String,
    /// The application's W3C trace context when it started the saga, if any (see
    /// [`crate::trace`]); absent in older messages, ignored when malformed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// The `tracestate` that came with it, if any; ignored when malformed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracestate: Option<String>,
}

//! The worker SDK's handler side: what a service implements.
//!
//! A handler owns only its business effect. The SDK (see `runtime.rs` and `barrier.rs`) owns
//! receiving commands, per-order ordering, idempotency, replies and acknowledgement. It opens a
//! database transaction for a batch of commands, calls each handler with that transaction's
//! connection (inside a savepoint of its own), writes the barrier rows for (saga, step,
//! operation), and commits effects and rows together — so an effect is applied once however
//! often its command arrives.
//!
//! Rules for handlers:
//! * write the effect only through the connection you are given (never another pool): that is
//!   what makes the effect and the barrier row commit together or not at all;
//! * return [`StepError::Business`] for a decision ("insufficient funds", "coupon already used"):
//!   the SDK rolls the effect back, records the failure in the barrier, and the saga compensates;
//! * return [`StepError::Retryable`] for a transient fault: the SDK rolls back and records
//!   nothing, so the engine's retry runs the handler again;
//! * key your own ledger rows by `(ctx.saga_id, ctx.step)`, so a compensation can find exactly
//!   what its action did;
//! * keep no effect outside the connection (an in-memory cache, a call to another system): a
//!   batch's transaction can be rolled back and redone, and its handlers then run again.
//!
//! # Strong or weak idempotency, per handler
//!
//! Each handler is registered with an [`Idempotency`](crate::runtime::Idempotency):
//!
//! * [`Idempotency::Barrier`](crate::runtime::Idempotency::Barrier) (the default, `Worker::saga_step` / `Worker::tcc_step`): the
//!   barrier row above, in the effect's transaction. Exactly once, durably, with null
//!   compensations and refused late forward operations. Use it for money, stock, anything a
//!   compensation must mirror exactly.
//! * [`Idempotency::Weak`](crate::runtime::Idempotency::Weak) (`Worker::saga_step_with(name, step, Idempotency::Weak(w))`): a
//!   Redis key `SET NX PX` before the effect, holding the reply afterwards (see
//!   [`crate::weak`]). No dedup row in the database, but not atomic with the effect and
//!   forgotten after its TTL: for effects where a rare loss or late repeat is acceptable.

use async_trait::async_trait;
use serde_json::Value;
use sqlx::AnyConnection;

/// The database every service and the engine use (SQLite embedded, PostgreSQL in production).
pub type Db = sqlx::Any;

/// Why a handler did not succeed. The variant decides what happens next.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StepError {
    /// Transient (a timeout, a lock, a flaky dependency): retried with backoff.
    #[error("transient failure: {0}")]
    Retryable(String),
    /// A business decision: not retried; the saga compensates (unless the step is optional).
    /// `code` is stable and machine-matchable (`insufficient_funds`, `coupon_used`, …).
    #[error("business failure [{code}]: {message}")]
    Business { code: String, message: String },
}

impl StepError {
    pub fn business(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Business {
            code: code.into(),
            message: message.into(),
        }
    }

    pub fn retryable(message: impl Into<String>) -> Self {
        Self::Retryable(message.into())
    }
}

/// A database error inside a handler is transient by default (deadlock, lost connection): the
/// SDK rolls back and the engine retries. Constraint violations that mean "no" should be turned
/// into [`StepError::Business`] by the handler itself.
impl From<sqlx::Error> for StepError {
    fn from(e: sqlx::Error) -> Self {
        StepError::Retryable(format!("database: {e}"))
    }
}

/// What the handler knows about the command it is running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepContext {
    pub saga_id: String,
    /// The step id in the saga definition (`payment`, `coupon`, …).
    pub step: String,
    /// The operation name from the definition (`charge`, `refund`, `freeze`, …).
    pub operation: String,
    /// 1 for the first attempt of this operation.
    pub attempt: u32,
    /// The saga's sequence key (the order id for order flows).
    pub key: String,
}

/// A saga step: an action and the compensation that semantically undoes it.
///
/// `compensate` is called only when the action took effect (the SDK's barrier knows): it never
/// sees an action that failed or never ran. It should not fail with a business error: a
/// compensation that cannot succeed leaves the saga Failed for an operator.
#[async_trait]
pub trait SagaStep: Send + Sync {
    async fn action(
        &self,
        conn: &mut AnyConnection,
        ctx: &StepContext,
        params: &Value,
    ) -> Result<Value, StepError>;

    async fn compensate(
        &self,
        conn: &mut AnyConnection,
        ctx: &StepContext,
        params: &Value,
    ) -> Result<Value, StepError>;
}

/// A TCC step: reserve (`try_`), then `confirm` or `cancel` the reservation.
///
/// `confirm` is called only after a successful `try_`; `cancel` only after a `try_` that took
/// effect (a cancel that arrives first is recorded as a null cancel and the late try is refused).
#[async_trait]
pub trait TccStep: Send + Sync {
    async fn try_(
        &self,
        conn: &mut AnyConnection,
        ctx: &StepContext,
        params: &Value,
    ) -> Result<Value, StepError>;

    async fn confirm(
        &self,
        conn: &mut AnyConnection,
        ctx: &StepContext,
        params: &Value,
    ) -> Result<Value, StepError>;

    async fn cancel(
        &self,
        conn: &mut AnyConnection,
        ctx: &StepContext,
        params: &Value,
    ) -> Result<Value, StepError>;
}

/// Reads a money amount (`"129.90"`, `129.9`, `130`) as integer cents, refusing anything else.
pub fn cents(value: &Value) -> Result<i64, StepError> {
    let text = match value {
        Value::String(s) => s.trim().to_owned(),
        Value::Number(n) if n.is_i64() || n.is_u64() => n.to_string(),
        Value::Number(n) => {
            return Err(StepError::business(
                "bad_amount",
                format!(
                    "amount {n} is a JSON number with a fraction, which is not exact; send it as a decimal string such as \"129.90\""
                ),
            ));
        }
        other => {
            return Err(StepError::business(
                "bad_amount",
                format!("amount must be a number, got {other}"),
            ));
        }
    };
    let bad = || StepError::business("bad_amount", format!("`{text}` is not an amount"));
    let (whole, frac) = match text.split_once('.') {
        Some((w, f)) => (w, f),
        None => (text.as_str(), ""),
    };
    if frac.len() > 2 || !frac.chars().all(|c| c.is_ascii_digit()) {
        return Err(bad());
    }
    let whole: i64 = whole.parse().map_err(|_| bad())?;
    let frac: i64 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<2}").parse().map_err(|_| bad())?
    };
    let sign = if text.starts_with('-') { -1 } else { 1 };
    whole
        .checked_mul(100)
        .and_then(|w| w.checked_add(sign * frac))
        .filter(|c| *c >= 0)
        .ok_or_else(bad)
}

/// A required string parameter, or a business error naming it.
pub fn param_str<'a>(params: &'a Value, name: &str) -> Result<&'a str, StepError> {
    params.get(name).and_then(Value::as_str).ok_or_else(|| {
        StepError::business(
            "bad_params",
            format!("parameter `{name}` is missing or not a string"),
        )
    })
}

/// A required integer parameter (a JSON integer or a string of digits).
pub fn param_i64(params: &Value, name: &str) -> Result<i64, StepError> {
    let v = params.get(name);
    v.and_then(Value::as_i64)
        .or_else(|| {
            v.and_then(Value::as_str)
                .and_then(|s| s.trim().parse().ok())
        })
        .ok_or_else(|| {
            StepError::business(
                "bad_params",
                format!("parameter `{name}` is missing or not an integer"),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn cents_reads_amounts_exactly() {
        assert_eq!(cents(&json!("129.90")).unwrap(), 12990);
        assert_eq!(cents(&json!("129.9")).unwrap(), 12990);
        assert_eq!(cents(&json!(130)).unwrap(), 13000);
        assert_eq!(cents(&json!("0.05")).unwrap(), 5);
        assert!(cents(&json!("1.234")).is_err());
        assert!(cents(&json!("-1")).is_err());
        assert!(cents(&json!("abc")).is_err());
        assert!(cents(&json!(true)).is_err());
        // Through a float: refused, not rounded.
        assert!(cents(&json!(129.9)).is_err());
        assert!(cents(&json!(0.1)).is_err());
    }
}

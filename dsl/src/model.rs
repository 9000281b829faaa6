//! Stage 2 of 3: a validated saga definition. These types can only hold what validation
//! accepted: a step is a saga step *or* a TCC step, a compensation is an operation *or* a
//! declared irreversibility with its reason, durations are durations.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use serde::{Serialize, Serializer};
use serde_json::Value;

use crate::template::{Reference, Resolve, ResolveError, Template};

/// A step's id, unique within its saga.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct StepId(pub String);

impl fmt::Display for StepId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl StepId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SagaDef {
    pub name: String,
    pub version: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub sequence_key: Template,
    /// Past this long after it began, the saga stops going forward and compensates (if no
    /// irreversible step has started).
    /// (Left out of the serialized form when absent, so definitions without one keep their
    /// content hash.)
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "opt_millis")]
    pub deadline: Option<Duration>,
    pub input: BTreeMap<String, InputField>,
    pub steps: Vec<StepDef>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum InputType {
    String,
    Integer,
    /// Exact decimal amounts; `money` is an alias. Carried as a JSON number or a decimal string.
    Decimal,
    Boolean,
}

impl InputType {
    pub const NAMES: &'static [&'static str] =
        &["string", "integer", "decimal", "money", "boolean"];

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "string" => Some(Self::String),
            "integer" => Some(Self::Integer),
            "decimal" | "money" => Some(Self::Decimal),
            "boolean" => Some(Self::Boolean),
            _ => None,
        }
    }

    /// Whether a JSON value is acceptable for this type.
    /// What a value of this type must look like, for error messages.
    pub fn describe(self) -> &'static str {
        match self {
            Self::String => "a string",
            Self::Integer => "an integer",
            Self::Decimal => {
                "an exact decimal: a string like \"129.90\" or a whole number (a JSON number with a fraction would pass through binary floating point)"
            }
            Self::Boolean => "true or false",
        }
    }

    pub fn accepts(self, v: &Value) -> bool {
        match self {
            Self::String => v.is_string(),
            Self::Integer => v.is_i64() || v.is_u64(),
            // Exact only: a whole JSON number, or a decimal string. A JSON number with a
            // fraction has been through binary floating point already (0.1 is not 0.1).
            Self::Decimal => v.is_i64() || v.is_u64() || v.as_str().is_some_and(is_exact_decimal),
            Self::Boolean => v.is_boolean(),
        }
    }
}

/// `-12`, `129.90`, `0.5`: an optional sign, digits, and optionally a point and more digits.
pub fn is_exact_decimal(s: &str) -> bool {
    let s = s.trim();
    let s = s.strip_prefix('-').unwrap_or(s);
    let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
    !whole.is_empty()
        && whole.chars().all(|c| c.is_ascii_digit())
        && (!s.contains('.') || (!frac.is_empty() && frac.chars().all(|c| c.is_ascii_digit())))
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InputField {
    pub r#type: InputType,
    pub required: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepDef {
    pub id: StepId,
    pub service: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub kind: StepKind,
    pub depends_on: Vec<StepId>,
    pub params: BTreeMap<String, ParamExpr>,
    /// Declared output fields; `None` means undeclared (any field may be referenced).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outputs: Option<BTreeSet<String>>,
    pub retry: RetryPolicy,
    pub compensation_retry: RetryPolicy,
    #[serde(serialize_with = "millis")]
    pub timeout: Duration,
    pub on_failure: FailurePolicy,
}

impl StepDef {
    /// Whether this step's forward operation can be undone (saga compensation or TCC cancel).
    pub fn is_reversible(&self) -> bool {
        !matches!(
            self.kind,
            StepKind::Saga {
                compensation: Compensation::None { .. },
                ..
            }
        )
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum StepKind {
    /// A forward action and the compensation that semantically undoes it.
    Saga {
        action: String,
        compensation: Compensation,
    },
    /// Reserve (`try`), then `confirm` or `cancel` the reservation.
    Tcc {
        r#try: String,
        confirm: String,
        cancel: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Compensation {
    Operation(String),
    /// Declared irreversible (`compensation: none`), which makes the step a pivot.
    None {
        reason: String,
    },
}

/// What a business failure (or exhausted retries) of the step means for the saga.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FailurePolicy {
    /// Undo everything done so far (the default).
    Compensate,
    /// The step is optional: record the failure, skip its dependents, carry on.
    Continue,
    /// Retriable-to-success: retry without an attempt limit (with capped backoff). A business
    /// failure from such a step is a bug for an operator: the saga stops as Failed.
    Retry,
}

impl FailurePolicy {
    pub const NAMES: &'static [&'static str] = &["compensate", "continue", "retry"];

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "compensate" => Some(Self::Compensate),
            "continue" => Some(Self::Continue),
            "retry" => Some(Self::Retry),
            _ => None,
        }
    }
}

/// Exponential backoff with jitter.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (≥ 1). Ignored for `on_failure: retry`.
    pub max_attempts: u32,
    #[serde(serialize_with = "millis")]
    pub initial_backoff: Duration,
    #[serde(serialize_with = "millis")]
    pub max_backoff: Duration,
    /// ≥ 1.0
    pub multiplier: f64,
    /// Fraction of the delay randomised, 0.0..=1.0.
    pub jitter: f64,
}

impl RetryPolicy {
    pub const DEFAULT_STEP: RetryPolicy = RetryPolicy {
        max_attempts: 3,
        initial_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_secs(10),
        multiplier: 2.0,
        jitter: 0.2,
    };
    pub const DEFAULT_COMPENSATION: RetryPolicy = RetryPolicy {
        max_attempts: 10,
        initial_backoff: Duration::from_millis(200),
        max_backoff: Duration::from_secs(30),
        multiplier: 2.0,
        jitter: 0.2,
    };

    /// The wait before attempt `attempt + 1`, after `attempt` (≥ 1) failed attempts.
    /// `random` in 0.0..1.0 picks the jitter, so this stays a pure function.
    pub fn backoff(&self, attempt: u32, random: f64) -> Duration {
        let exp = self
            .multiplier
            .powi(attempt.saturating_sub(1).min(64) as i32);
        let base = (self.initial_backoff.as_secs_f64() * exp).min(self.max_backoff.as_secs_f64());
        // Jitter takes up to `jitter` of the delay away, never adds: the cap stays a cap.
        let factor = 1.0 - self.jitter * random.clamp(0.0, 1.0);
        Duration::from_secs_f64((base * factor).max(0.0))
    }
}

pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// A parameter value: a literal, a template, or a list/map of them.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamExpr {
    Literal(Value),
    Template(Template),
    List(Vec<ParamExpr>),
    Map(BTreeMap<String, ParamExpr>),
}

impl ParamExpr {
    /// Every reference inside, depth first.
    pub fn references(&self) -> Vec<&Reference> {
        match self {
            ParamExpr::Literal(_) => Vec::new(),
            ParamExpr::Template(t) => t.references().collect(),
            ParamExpr::List(items) => items.iter().flat_map(ParamExpr::references).collect(),
            ParamExpr::Map(m) => m.values().flat_map(ParamExpr::references).collect(),
        }
    }

    pub fn resolve(&self, ctx: &dyn Resolve) -> Result<Value, ResolveError> {
        Ok(match self {
            ParamExpr::Literal(v) => v.clone(),
            ParamExpr::Template(t) => t.resolve(ctx)?,
            ParamExpr::List(items) => Value::Array(
                items
                    .iter()
                    .map(|i| i.resolve(ctx))
                    .collect::<Result<_, _>>()?,
            ),
            ParamExpr::Map(m) => Value::Object(
                m.iter()
                    .map(|(k, v)| Ok((k.clone(), v.resolve(ctx)?)))
                    .collect::<Result<_, ResolveError>>()?,
            ),
        })
    }
}

fn millis<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u128(d.as_millis())
}

fn opt_millis<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => millis(d, s),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_decimals_only() {
        for ok in ["0", "12", "-3", "129.90", "0.5", " 7.25 "] {
            assert!(is_exact_decimal(ok), "{ok}");
        }
        for bad in [
            "", "-", "12.", ".5", "1e3", "NaN", "inf", "1,5", "+1", "1.2.3",
        ] {
            assert!(!is_exact_decimal(bad), "{bad}");
        }
        use serde_json::json;
        assert!(InputType::Decimal.accepts(&json!(12)));
        assert!(InputType::Decimal.accepts(&json!("12.30")));
        assert!(!InputType::Decimal.accepts(&json!(12.3)));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RetryPolicy {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            multiplier: 2.0,
            jitter: 0.5,
        };
        assert_eq!(p.backoff(1, 0.0), Duration::from_millis(100));
        assert_eq!(p.backoff(3, 0.0), Duration::from_millis(400));
        assert_eq!(p.backoff(30, 0.0), Duration::from_secs(1));
        assert_eq!(p.backoff(1, 1.0), Duration::from_millis(50));
        assert_eq!(p.backoff(u32::MAX, 0.5), Duration::from_millis(750));
    }

    #[test]
    fn input_types_accept_their_values() {
        use serde_json::json;
        assert!(InputType::Decimal.accepts(&json!("12.50")));
        assert!(InputType::Decimal.accepts(&json!(12)));
        assert!(!InputType::Decimal.accepts(&json!("twelve")));
        assert!(!InputType::Integer.accepts(&json!(1.5)));
        assert!(InputType::Boolean.accepts(&json!(false)));
    }
}

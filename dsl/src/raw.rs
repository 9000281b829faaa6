//! Stage 1 of 3: serde structs that mirror the YAML text exactly.
//!
//! Everything is optional here so that a missing key becomes a located `missing-field`
//! diagnostic (all of them at once) instead of serde's first-error-wins. Unknown keys are not
//! denied by serde: `yaml.rs` collects every one of them with `serde_ignored`. Nothing here knows
//! YAML; `serde_json::Value` carries free-form parameter values.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};

#[derive(Debug, Default, Deserialize)]
pub struct RawSaga {
    pub name: Option<String>,
    pub version: Option<serde_json::Value>,
    pub description: Option<String>,
    pub sequence_key: Option<String>,
    pub deadline: Option<RawDuration>,
    pub input: Option<BTreeMap<String, RawInput>>,
    pub defaults: Option<RawDefaults>,
    pub steps: Option<Vec<RawStep>>,
}

/// `input.NAME`: either a bare type (`amount: money`) or a map with `type`, `required`, ….
#[derive(Debug, Default)]
pub struct RawInput {
    pub r#type: Option<String>,
    pub required: Option<bool>,
    pub description: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct RawInputMap {
    r#type: Option<String>,
    required: Option<bool>,
    description: Option<String>,
}

impl<'de> Deserialize<'de> for RawInput {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawInput;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "a type name (string, integer, decimal, money, boolean) or a map with `type`",
                )
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawInput, E> {
                Ok(RawInput {
                    r#type: Some(v.to_owned()),
                    ..RawInput::default()
                })
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawInput, A::Error> {
                // Delegating through MapAccessDeserializer keeps serde_ignored's view of the keys.
                let m = RawInputMap::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(RawInput {
                    r#type: m.r#type,
                    required: m.required,
                    description: m.description,
                })
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Default, Deserialize)]
pub struct RawDefaults {
    pub retry: Option<RawRetry>,
    pub compensation_retry: Option<RawRetry>,
    pub timeout: Option<RawDuration>,
}

#[derive(Debug, Default, Clone, Deserialize)]
pub struct RawRetry {
    pub max_attempts: Option<i64>,
    pub initial_backoff: Option<RawDuration>,
    pub max_backoff: Option<RawDuration>,
    pub multiplier: Option<f64>,
    pub jitter: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawStep {
    pub id: Option<String>,
    pub service: Option<String>,
    pub description: Option<String>,
    pub action: Option<String>,
    pub compensation: Option<String>,
    pub irreversible_reason: Option<String>,
    pub r#try: Option<String>,
    pub confirm: Option<String>,
    pub cancel: Option<String>,
    pub depends_on: Option<OneOrMany>,
    pub params: Option<BTreeMap<String, serde_json::Value>>,
    pub outputs: Option<Vec<String>>,
    pub retry: Option<RawRetry>,
    pub compensation_retry: Option<RawRetry>,
    pub timeout: Option<RawDuration>,
    pub on_failure: Option<String>,
}

/// A duration as written: text such as `500ms`, or a bare number (which is refused later with
/// a hint, because a number without a unit is ambiguous).
#[derive(Debug, Clone, PartialEq)]
pub enum RawDuration {
    Text(String),
    Number(f64),
}

impl<'de> Deserialize<'de> for RawDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = RawDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as 500ms, 5s or 2m")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawDuration, E> {
                Ok(RawDuration::Text(v.to_owned()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawDuration, E> {
                Ok(RawDuration::Number(v as f64))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawDuration, E> {
                Ok(RawDuration::Number(v as f64))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<RawDuration, E> {
                Ok(RawDuration::Number(v))
            }
        }
        d.deserialize_any(V)
    }
}

/// `depends_on: payment` or `depends_on: [payment, coupon]`.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct OneOrMany {
    pub items: Vec<String>,
    /// True when written as a single string (its location is the value, not `[0]`).
    pub single: bool,
}

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OneOrMany;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a step id or a list of step ids")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<OneOrMany, E> {
                Ok(OneOrMany {
                    items: vec![v.to_owned()],
                    single: true,
                })
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<OneOrMany, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element::<String>()? {
                    items.push(item);
                }
                Ok(OneOrMany {
                    items,
                    single: false,
                })
            }
        }
        d.deserialize_any(V)
    }
}

/// The keys each mapping accepts, for "did you mean" hints on unknown fields.
pub fn known_fields(context: FieldContext) -> &'static [&'static str] {
    match context {
        FieldContext::Saga => &[
            "name",
            "version",
            "description",
            "sequence_key",
            "deadline",
            "input",
            "defaults",
            "steps",
        ],
        FieldContext::Input => &["type", "required", "description"],
        FieldContext::Defaults => &["retry", "compensation_retry", "timeout"],
        FieldContext::Retry => &[
            "max_attempts",
            "initial_backoff",
            "max_backoff",
            "multiplier",
            "jitter",
        ],
        FieldContext::Step => &[
            "id",
            "service",
            "description",
            "action",
            "compensation",
            "irreversible_reason",
            "try",
            "confirm",
            "cancel",
            "depends_on",
            "params",
            "outputs",
            "retry",
            "compensation_retry",
            "timeout",
            "on_failure",
        ],
    }
}

/// Which mapping an unknown key was found in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldContext {
    Saga,
    Input,
    Defaults,
    Retry,
    Step,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hint tables must list exactly what serde accepts, or a hint would suggest a key that
    /// is itself refused. Each known key is fed through serde; none may come back as ignored.
    #[test]
    fn known_fields_are_accepted_by_serde() {
        fn ignored<T: for<'de> Deserialize<'de>>(fields: &[&str]) -> Vec<String> {
            let map: serde_json::Map<String, serde_json::Value> = fields
                .iter()
                .map(|f| ((*f).to_owned(), serde_json::Value::Null))
                .collect();
            let mut out = Vec::new();
            let _ = serde_ignored::deserialize(serde_json::Value::Object(map), |p| {
                out.push(p.to_string())
            })
            .map(|_: T| ());
            out
        }
        assert!(ignored::<RawSaga>(known_fields(FieldContext::Saga)).is_empty());
        assert!(ignored::<RawInputMap>(known_fields(FieldContext::Input)).is_empty());
        assert!(ignored::<RawDefaults>(known_fields(FieldContext::Defaults)).is_empty());
        assert!(ignored::<RawRetry>(known_fields(FieldContext::Retry)).is_empty());
        assert!(ignored::<RawStep>(known_fields(FieldContext::Step)).is_empty());
    }
}

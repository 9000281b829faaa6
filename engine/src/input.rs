//! Input checks: a start's input against the definition's `input` section, and the sequence
//! key it resolves to. Done before a start reaches the database, so a bad input is refused
//! with every problem named at once and nothing written.

use sagaflow_dsl::SagaGraph;
use sagaflow_dsl::template::Values;
use serde_json::Value;

use crate::engine::EngineError;

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
                let ty = field.r#type.describe();
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

//! `${…}` templates: references to the saga input and to earlier steps' outputs.
//!
//! Grammar (whole string): text with embedded `${input.NAME}` or
//! `${steps.ID.output[.FIELD…]}`; `$${` writes a literal `${`. A string that is exactly one
//! reference keeps the referenced value's type (`amount: ${input.amount}` stays a number);
//! a reference inside other text is interpolated as text.

use std::fmt;

use serde::Serialize;
use serde_json::Value;

/// What a `${…}` points at.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(tag = "from", rename_all = "snake_case")]
pub enum Reference {
    /// `${input.NAME}`
    Input { name: String },
    /// `${steps.ID.output}` (path empty) or `${steps.ID.output.a.b}`
    StepOutput { step: String, path: Vec<String> },
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Input { name } => write!(f, "${{input.{name}}}"),
            Reference::StepOutput { step, path } => {
                write!(f, "${{steps.{step}.output")?;
                for p in path {
                    write!(f, ".{p}")?;
                }
                f.write_str("}")
            }
        }
    }
}

/// One piece of a template.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Part {
    Text(String),
    Ref(Reference),
}

/// A parsed template string.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(transparent)]
pub struct Template {
    pub parts: Vec<Part>,
}

/// Why a template could not be parsed; `column` counts characters from the string's start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateError {
    pub column: usize,
    pub message: String,
    pub hint: String,
}

impl Template {
    pub fn parse(text: &str) -> Result<Template, TemplateError> {
        let chars: Vec<char> = text.chars().collect();
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut i = 0;
        while i < chars.len() {
            if chars[i] == '$' && chars.get(i + 1) == Some(&'$') && chars.get(i + 2) == Some(&'{') {
                literal.push_str("${");
                i += 3;
                continue;
            }
            if chars[i] == '$' && chars.get(i + 1) == Some(&'{') {
                let start = i;
                let Some(len) = chars[i + 2..].iter().position(|c| *c == '}') else {
                    return Err(TemplateError {
                        column: start,
                        message: "`${` is never closed".into(),
                        hint: "close the reference with `}`, or write `$${` for a literal `${`"
                            .into(),
                    });
                };
                let inner: String = chars[i + 2..i + 2 + len].iter().collect();
                let reference =
                    parse_reference(inner.trim()).map_err(|(message, hint)| TemplateError {
                        column: start,
                        message,
                        hint,
                    })?;
                if !literal.is_empty() {
                    parts.push(Part::Text(std::mem::take(&mut literal)));
                }
                parts.push(Part::Ref(reference));
                i += 3 + len;
                continue;
            }
            literal.push(chars[i]);
            i += 1;
        }
        if !literal.is_empty() {
            parts.push(Part::Text(literal));
        }
        Ok(Template { parts })
    }

    pub fn references(&self) -> impl Iterator<Item = &Reference> {
        self.parts.iter().filter_map(|p| match p {
            Part::Ref(r) => Some(r),
            Part::Text(_) => None,
        })
    }

    /// True when the template is plain text (no reference at all).
    pub fn is_literal(&self) -> bool {
        self.references().next().is_none()
    }

    /// Evaluates the template. A template that is exactly one reference returns the referenced
    /// value unchanged; otherwise the parts are joined as text (strings without quotes).
    pub fn resolve(&self, ctx: &dyn Resolve) -> Result<Value, ResolveError> {
        if let [Part::Ref(r)] = self.parts.as_slice() {
            return ctx.lookup(r);
        }
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Ref(r) => match ctx.lookup(r)? {
                    Value::String(s) => out.push_str(&s),
                    Value::Null => {}
                    other => out.push_str(&other.to_string()),
                },
            }
        }
        Ok(Value::String(out))
    }
}

fn parse_reference(inner: &str) -> Result<Reference, (String, String)> {
    let segments: Vec<&str> = inner.split('.').collect();
    let bad_segment = segments.iter().find(|s| {
        s.is_empty()
            || !s
                .chars()
                .all(|c| c.is_alphanumeric() || c == '_' || c == '-')
    });
    if inner.is_empty() || bad_segment.is_some() {
        return Err((
            format!("`${{{inner}}}` is not a reference"),
            "write `${input.NAME}` or `${steps.STEP.output.FIELD}`".into(),
        ));
    }
    match segments.as_slice() {
        ["input", name] => Ok(Reference::Input {
            name: (*name).to_owned(),
        }),
        ["input", ..] => Err((
            format!("`${{{inner}}}`: an input reference has exactly one name after `input.`"),
            "inputs are flat: write `${input.NAME}`".into(),
        )),
        ["steps", step, "output", path @ ..] => Ok(Reference::StepOutput {
            step: (*step).to_owned(),
            path: path.iter().map(|s| (*s).to_owned()).collect(),
        }),
        ["steps", ..] => Err((
            format!("`${{{inner}}}`: a step reference reads a step's output"),
            "write `${steps.STEP.output.FIELD}`".into(),
        )),
        [root, ..] => {
            let hint = match crate::diagnostic::did_you_mean(root, ["input", "steps"]) {
                Some(c) => {
                    format!("did you mean `{c}`? References start with `input.` or `steps.`")
                }
                None => "references start with `input.` or `steps.`".into(),
            };
            Err((
                format!("`${{{inner}}}`: unknown reference root `{root}`"),
                hint,
            ))
        }
        [] => Err(("empty reference".into(), "write `${input.NAME}`".into())),
    }
}

/// Where template references get their values at run time (the engine implements it).
pub trait Resolve {
    fn lookup(&self, reference: &Reference) -> Result<Value, ResolveError>;
}

/// A reference that has no value when the step is about to run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reference} has no value: {reason}")]
pub struct ResolveError {
    pub reference: String,
    pub reason: String,
}

/// The usual context: the saga's input object and a map from step id to that step's output.
pub struct Values<'a> {
    pub input: &'a Value,
    pub outputs: &'a dyn Fn(&str) -> Option<&'a Value>,
}

impl fmt::Debug for Values<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Values")
            .field("input", self.input)
            .finish_non_exhaustive()
    }
}

impl Resolve for Values<'_> {
    fn lookup(&self, reference: &Reference) -> Result<Value, ResolveError> {
        let missing = |reason: &str| ResolveError {
            reference: reference.to_string(),
            reason: reason.to_owned(),
        };
        match reference {
            Reference::Input { name } => match self.input.get(name) {
                Some(v) => Ok(v.clone()),
                // An optional input that was not given reads as null.
                None => Ok(Value::Null),
            },
            Reference::StepOutput { step, path } => {
                let mut v =
                    (self.outputs)(step).ok_or_else(|| missing("the step has no output yet"))?;
                for p in path {
                    v = v
                        .get(p)
                        .ok_or_else(|| missing(&format!("the output has no field `{p}`")))?;
                }
                Ok(v.clone())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_text_and_references() {
        let t = Template::parse("order-${input.order_id}/${steps.pay.output.txn.id}").unwrap();
        assert_eq!(
            t.parts,
            vec![
                Part::Text("order-".into()),
                Part::Ref(Reference::Input {
                    name: "order_id".into()
                }),
                Part::Text("/".into()),
                Part::Ref(Reference::StepOutput {
                    step: "pay".into(),
                    path: vec!["txn".into(), "id".into()]
                }),
            ]
        );
    }

    #[test]
    fn escapes_and_errors() {
        assert_eq!(
            Template::parse("cost $${x}").unwrap().parts,
            vec![Part::Text("cost ${x}".into())]
        );
        let e = Template::parse("a ${input.x").unwrap_err();
        assert_eq!(e.column, 2);
        assert!(
            Template::parse("${inputs.x}")
                .unwrap_err()
                .hint
                .contains("`input`")
        );
        assert!(Template::parse("${steps.a.result}").is_err());
        assert!(Template::parse("${input.a.b}").is_err());
        assert!(Template::parse("${}").is_err());
    }

    #[test]
    fn resolve_keeps_types_for_whole_references() {
        let input = json!({"amount": 125, "order_id": "o-1"});
        let pay = json!({"txn": "t-9"});
        let outputs = |s: &str| if s == "pay" { Some(&pay) } else { None };
        let ctx = Values {
            input: &input,
            outputs: &outputs,
        };
        let whole = Template::parse("${input.amount}").unwrap();
        assert_eq!(whole.resolve(&ctx).unwrap(), json!(125));
        let mixed =
            Template::parse("${input.order_id}:${steps.pay.output.txn}:${input.amount}").unwrap();
        assert_eq!(mixed.resolve(&ctx).unwrap(), json!("o-1:t-9:125"));
        let missing = Template::parse("${steps.coupon.output}").unwrap();
        assert!(missing.resolve(&ctx).is_err());
    }
}

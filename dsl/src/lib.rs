//! sagaflow's saga language: YAML saga definitions, validated and compiled into a step graph.
//!
//! A definition goes through three typed stages, each in its own module:
//!
//! | stage | module | what it holds |
//! |---|---|---|
//! | text → raw | [`yaml`] (the only module that knows YAML) and [`raw`] | serde structs mirroring the file, plus a path → line/column index |
//! | raw → validated | [`validate`] → [`model`] | types that can only hold a valid saga; every problem collected with its location |
//! | validated → compiled | [`graph`] | the petgraph step graph: order, parallel layers, compensation order, content hash |
//!
//! Around them: [`diagnostic`] (codes, locations, rendering), [`template`] (`${input.x}` and
//! `${steps.s.output.f}` references) and [`render`] (text, DOT and Mermaid drawings).
//!
//! ```
//! let source = r#"
//! name: hello
//! version: 1
//! sequence_key: ${input.order_id}
//! input:
//!   order_id: string
//! steps:
//!   - id: pay
//!     service: payment
//!     action: charge
//!     compensation: refund
//!     params: { order: "${input.order_id}" }
//! "#;
//! let compiled = sagaflow_dsl::compile(source);
//! let graph = compiled.graph.expect("valid");
//! assert_eq!(graph.steps()[0].id.as_str(), "pay");
//! ```

pub mod diagnostic;
pub mod graph;
pub mod model;
pub mod raw;
pub mod render;
pub mod template;
pub mod validate;
pub mod yaml;

use std::path::Path;

pub use diagnostic::{Code, Diagnostic, Report, Severity, Span};
pub use graph::SagaGraph;
pub use model::{
    Compensation, FailurePolicy, InputField, InputType, ParamExpr, RetryPolicy, SagaDef, StepDef,
    StepId, StepKind,
};

/// Larger files are refused before parsing: no saga needs a megabyte, and the checks are
/// quadratic in the number of steps.
pub const MAX_SOURCE_BYTES: usize = 1 << 20;
/// More steps than any order flow needs; refusing them bounds the graph checks.
pub const MAX_STEPS: usize = 500;

/// The outcome of compiling one definition: the graph when it is valid, and every diagnostic
/// (errors and warnings, in file order).
#[derive(Debug)]
pub struct Compiled {
    pub graph: Option<SagaGraph>,
    pub diagnostics: Vec<Diagnostic>,
}

impl Compiled {
    pub fn is_valid(&self) -> bool {
        self.graph.is_some()
    }

    pub fn errors(&self) -> impl Iterator<Item = &Diagnostic> {
        self.diagnostics.iter().filter(|d| d.is_error())
    }

    pub fn warnings(&self) -> impl Iterator<Item = &Diagnostic> {
        self.diagnostics.iter().filter(|d| !d.is_error())
    }
}

/// Compiles a saga definition from text. Never panics, whatever the text.
pub fn compile(source: &str) -> Compiled {
    // A byte-order mark is an editor's habit, not content (spans are relative to the text after it).
    let source = source.strip_prefix('\u{feff}').unwrap_or(source);
    let mut diagnostics = Vec::new();
    if source.len() > MAX_SOURCE_BYTES {
        diagnostics.push(
            Diagnostic::error(
                Code::TooLarge,
                Span::START,
                format!(
                    "the file is {} bytes; saga definitions are limited to {MAX_SOURCE_BYTES}",
                    source.len()
                ),
            )
            .with_label("too large")
            .with_hint("split it; is this really a saga definition?"),
        );
        return Compiled {
            graph: None,
            diagnostics,
        };
    }
    let parsed = yaml::parse(source);
    diagnostics.extend(parsed.diagnostics);
    let mut graph = None;
    if let Some(raw) = parsed.saga {
        let step_count = raw.steps.as_ref().map_or(0, Vec::len);
        if step_count > MAX_STEPS {
            diagnostics.push(
                Diagnostic::error(
                    Code::TooLarge,
                    parsed.spans.key("steps"),
                    format!("the saga has {step_count} steps; the limit is {MAX_STEPS}"),
                )
                .with_label("too many steps")
                .with_hint("split the flow into several sagas chained by their inputs"),
            );
        } else {
            let validated = validate::validate(raw, &parsed.spans, &mut diagnostics);
            if let Some(def) = validated.saga {
                graph = graph::build(
                    def,
                    &validated.sites,
                    &validated.ref_sites,
                    !validated.steps_incomplete,
                    &parsed.spans,
                    &mut diagnostics,
                );
            }
        }
    }
    diagnostics.sort_by_key(|d| (d.span.line, d.span.column));
    if diagnostics.iter().any(Diagnostic::is_error) {
        graph = None;
    }
    Compiled { graph, diagnostics }
}

/// Compiles bytes that may not be UTF-8 (a file as read from disk).
pub fn compile_bytes(bytes: &[u8]) -> Compiled {
    match std::str::from_utf8(bytes) {
        Ok(text) => compile(text),
        Err(e) => {
            let valid = &bytes[..e.valid_up_to()];
            let line = 1 + valid.iter().filter(|b| **b == b'\n').count();
            let column = 1 + valid.iter().rev().take_while(|b| **b != b'\n').count();
            Compiled {
                graph: None,
                diagnostics: vec![
                    Diagnostic::error(
                        Code::YamlSyntax,
                        Span {
                            line,
                            column,
                            offset: e.valid_up_to(),
                            len: 1,
                        },
                        format!(
                            "the file is not UTF-8 text (invalid byte at line {line}, column {column})"
                        ),
                    )
                    .with_label("not UTF-8")
                    .with_hint("save the file as UTF-8"),
                ],
            }
        }
    }
}

/// A definition read from disk: its text (lossy if it was not UTF-8, for rendering) and the
/// compile outcome.
#[derive(Debug)]
pub struct SourceFile {
    pub path: String,
    pub text: String,
    pub compiled: Compiled,
}

impl SourceFile {
    pub fn report(&self) -> Report<'_> {
        Report {
            file: &self.path,
            source: &self.text,
            diagnostics: &self.compiled.diagnostics,
        }
    }
}

/// Reads and compiles a definition file.
pub fn compile_file(path: &Path) -> std::io::Result<SourceFile> {
    let bytes = std::fs::read(path)?;
    let compiled = compile_bytes(&bytes);
    Ok(SourceFile {
        path: path.display().to_string(),
        text: {
            let text = String::from_utf8_lossy(&bytes);
            text.strip_prefix('\u{feff}').unwrap_or(&text).to_owned()
        },
        compiled,
    })
}

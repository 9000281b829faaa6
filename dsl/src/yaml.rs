//! The only module that knows YAML.
//!
//! * `serde_yaml` turns the text into [`RawSaga`] (it is frozen upstream, so it stays behind this
//!   file: a maintained fork replaces it here and nowhere else);
//! * `serde_ignored` reports *every* unknown key in one pass, where `deny_unknown_fields` would
//!   stop at the first;
//! * `yaml-rust2`'s event parser, which carries positions, builds a [`SpanIndex`] from a node's
//!   path (`steps[2].depends_on[0]`) to its line and column, so that errors found long after
//!   parsing (a cycle, a bad reference) still point at the exact spot in the file.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

use crate::diagnostic::{Code, Diagnostic, Span, did_you_mean, span_at};
use crate::raw::{FieldContext, RawSaga, known_fields};

/// What parsing produced: the raw saga if the text had its shape, the locations of every node,
/// and the problems found so far (syntax, types, unknown keys).
#[derive(Debug)]
pub struct Parsed {
    pub saga: Option<RawSaga>,
    pub spans: SpanIndex,
    pub diagnostics: Vec<Diagnostic>,
}

/// The `id` of each step, read from the text as plain YAML data (no validation), for a
/// definition that no longer compiles but whose steps an operator still needs named: `None`
/// for a step without a string `id`; empty when the text is not a mapping with a `steps` list.
pub fn step_ids(source: &str) -> Vec<Option<String>> {
    let Ok(value) = serde_yaml::from_str::<serde_yaml::Value>(source) else {
        return Vec::new();
    };
    let Some(steps) = value.get("steps").and_then(serde_yaml::Value::as_sequence) else {
        return Vec::new();
    };
    steps
        .iter()
        .map(|step| {
            step.get("id")
                .and_then(serde_yaml::Value::as_str)
                .map(str::to_owned)
        })
        .collect()
}

pub fn parse(source: &str) -> Parsed {
    let spans = SpanIndex::build(source);
    let mut diagnostics = Vec::new();

    if (spans.get("").is_none() || spans.root_is_null) && spans.syntax_error.is_none() {
        diagnostics.push(
            Diagnostic::error(Code::EmptySaga, Span::START, "the file defines no saga: it is empty")
                .with_label("nothing here")
                .with_hint("start with `name:`, `version:`, `sequence_key:` and `steps:` (see the README's saga language reference)"),
        );
        return Parsed {
            saga: None,
            spans,
            diagnostics,
        };
    }

    // Duplicate keys: serde_yaml rejects them in structs (with a vague location) but silently
    // keeps the last one in maps (`input`, `params`). The index saw them all, precisely.
    for (key, first, again) in &spans.duplicates {
        diagnostics.push(
            Diagnostic::error(Code::YamlSyntax, *again, format!("duplicate key `{key}`"))
                .with_label("written again here")
                .with_note(*first, "first written here")
                .with_hint("each key may appear once per mapping; remove or merge one of them"),
        );
    }
    let mut unknown = Vec::new();
    let de = serde_yaml::Deserializer::from_str(source);
    let result: Result<RawSaga, _> = serde_ignored::deserialize(de, |path| {
        unknown.push(path_string(&path));
    });
    match result {
        Ok(saga) => {
            for path in unknown {
                diagnostics.push(unknown_field(&spans, &path));
            }
            Parsed {
                saga: Some(saga),
                spans,
                diagnostics,
            }
        }
        Err(err) => {
            let text = err.to_string();
            let duplicate = text.contains("duplicate field") || text.contains("duplicate entry");
            if !duplicate || spans.duplicates.is_empty() {
                diagnostics.push(serde_error(source, &spans, &err));
            }
            Parsed {
                saga: None,
                spans,
                diagnostics,
            }
        }
    }
}

/// `serde_ignored`'s path in the same notation as the span index.
fn path_string(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", path_string(parent)),
        Path::Map { parent, key } => child(&path_string(parent), key),
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => path_string(parent),
    }
}

fn child(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_owned()
    } else {
        format!("{parent}.{key}")
    }
}

fn unknown_field(spans: &SpanIndex, path: &str) -> Diagnostic {
    let (parent, key) = match path.rsplit_once('.') {
        Some((p, k)) => (p, k),
        None => ("", path),
    };
    let context = if parent.is_empty() {
        FieldContext::Saga
    } else if parent == "defaults" {
        FieldContext::Defaults
    } else if parent.ends_with("retry") {
        FieldContext::Retry
    } else if parent.starts_with("input.") {
        FieldContext::Input
    } else {
        FieldContext::Step
    };
    let known = known_fields(context);
    let place = match context {
        FieldContext::Saga => "at the top level of the saga".to_owned(),
        FieldContext::Defaults => "in `defaults`".to_owned(),
        FieldContext::Retry => match parent.split_once('.') {
            Some((step, policy)) if step.starts_with("steps[") => {
                format!("in `{policy}` of step {}", spans.step_name(step))
            }
            _ => format!("in `{parent}`"),
        },
        FieldContext::Input => format!("in input field `{}`", parent.trim_start_matches("input.")),
        FieldContext::Step => format!("in step {}", spans.step_name(parent)),
    };
    let hint = match did_you_mean(key, known.iter().copied()) {
        Some(candidate) => format!("did you mean `{candidate}`?"),
        None => format!("the keys allowed here are: {}", known.join(", ")),
    };
    Diagnostic::error(
        Code::UnknownField,
        spans.key(path),
        format!("unknown field `{key}` {place}"),
    )
    .with_label("not a known field")
    .with_hint(hint)
}

/// serde_yaml's error, moved to its place and reworded without our internal type names.
fn serde_error(source: &str, spans: &SpanIndex, err: &serde_yaml::Error) -> Diagnostic {
    let raw = err.to_string();
    // serde_yaml appends " at line L column C"; the span says that better.
    let mut message = strip_locations(&raw);
    for (internal, human) in [
        (
            "struct RawSaga",
            "a saga (a mapping with `name`, `version`, `steps`, …)",
        ),
        (
            "struct RawStep",
            "a step (a mapping with `id`, `service`, `action`, …)",
        ),
        (
            "struct RawRetry",
            "a retry policy (a mapping with `max_attempts`, `initial_backoff`, …)",
        ),
        (
            "struct RawDefaults",
            "defaults (a mapping with `retry`, `timeout`, …)",
        ),
        ("struct RawInputMap", "an input field"),
        ("i64", "an integer"),
        ("f64", "a number"),
        ("a boolean", "true or false"),
    ] {
        message = message.replace(internal, human);
    }
    let (code, hint) = if message.contains("invalid type") || message.contains("invalid value") {
        (
            Code::InvalidType,
            "check the value's type against the saga language reference in the README",
        )
    } else if message.contains("more than one document") {
        (Code::YamlSyntax, "put each saga in its own file")
    } else if message.contains("duplicate entry") {
        (
            Code::YamlSyntax,
            "each key may appear once per mapping; remove or rename one of them",
        )
    } else if message.contains("recursion limit") {
        (
            Code::YamlSyntax,
            "the document nests deeper than any saga needs",
        )
    } else {
        (
            Code::YamlSyntax,
            "check indentation (spaces, not tabs), quotes and colons around this place",
        )
    };
    let span = match (err.location(), message.contains("more than one document")) {
        (_, true) => spans.documents.get(1).copied().unwrap_or(Span::START),
        (Some(loc), false) => span_at(source, loc.line(), loc.column(), 1),
        (None, false) => spans.syntax_error.unwrap_or(Span::START),
    };
    let label = if code == Code::InvalidType {
        "wrong type"
    } else {
        "here"
    };
    Diagnostic::error(code, span, message)
        .with_label(label)
        .with_hint(hint)
}

/// Removes every " at line L column C" that serde_yaml writes into its messages.
fn strip_locations(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find(" at line ") {
        out.push_str(&rest[..i]);
        let after = &rest[i + " at line ".len()..];
        let digits = after.chars().take_while(char::is_ascii_digit).count();
        let after = &after[digits..];
        match after.strip_prefix(" column ") {
            Some(col) => {
                let digits = col.chars().take_while(char::is_ascii_digit).count();
                rest = &col[digits..];
            }
            None => rest = after,
        }
    }
    out.push_str(rest);
    out
}

/// Where a node is: its key (for mapping entries) and its value.
#[derive(Debug, Clone, Copy)]
pub struct NodeSpan {
    pub key: Option<Span>,
    pub value: Span,
}

/// Locations of every node of the document, by path (`steps[1].retry.max_attempts`).
#[derive(Debug, Default)]
pub struct SpanIndex {
    nodes: HashMap<String, NodeSpan>,
    /// Each `---` (or implicit) document start, for "more than one document".
    documents: Vec<Span>,
    /// Where yaml-rust2 gave up, if it did (serde_yaml's own location is preferred).
    syntax_error: Option<Span>,
    /// `steps[i]` → the step's id, for messages.
    step_ids: HashMap<String, String>,
    /// The document is a bare null (`---` alone, `~`): no saga in it.
    root_is_null: bool,
    /// Keys written twice in one mapping: (key, first, second).
    duplicates: Vec<(String, Span, Span)>,
}

impl SpanIndex {
    fn build(source: &str) -> Self {
        let mut builder = Builder {
            source,
            index: SpanIndex::default(),
            stack: Vec::new(),
        };
        let mut parser = Parser::new_from_str(source);
        if let Err(e) = parser.load(&mut builder, true) {
            let m = e.marker();
            builder.index.syntax_error = Some(span_at(source, m.line(), m.col() + 1, 1));
        }
        let mut index = builder.index;
        // Remember step ids for readable messages ("in step `coupon`").
        let mut i = 0;
        while index.nodes.contains_key(&format!("steps[{i}]")) {
            let id_path = format!("steps[{i}].id");
            if let Some(node) = index.nodes.get(&id_path) {
                let text = &source[node.value.offset..node.value.offset + node.value.len];
                index.step_ids.insert(
                    format!("steps[{i}]"),
                    text.trim_matches(['"', '\'']).to_owned(),
                );
            }
            i += 1;
        }
        index
    }

    pub fn get(&self, path: &str) -> Option<NodeSpan> {
        self.nodes.get(path).copied()
    }

    /// The value at `path`, or the closest enclosing node that exists.
    pub fn value(&self, path: &str) -> Span {
        let mut p = path;
        loop {
            if let Some(n) = self.nodes.get(p) {
                return n.value;
            }
            match parent_path(p) {
                Some(parent) => p = parent,
                None => return Span::START,
            }
        }
    }

    /// The key of the mapping entry at `path` (its value if it is a list item).
    pub fn key(&self, path: &str) -> Span {
        match self.nodes.get(path) {
            Some(NodeSpan { key: Some(k), .. }) => *k,
            _ => self.value(path),
        }
    }

    /// "`coupon`" for `steps[1]` when that step has an id, else "#2".
    pub fn step_name(&self, step_path: &str) -> String {
        match self.step_ids.get(step_path) {
            Some(id) => format!("`{id}`"),
            None => {
                let n = step_path
                    .trim_start_matches("steps[")
                    .trim_end_matches(']')
                    .parse::<usize>()
                    .map(|i| i + 1)
                    .unwrap_or(0);
                format!("#{n}")
            }
        }
    }
}

fn parent_path(path: &str) -> Option<&str> {
    if path.is_empty() {
        return None;
    }
    let cut = path.rfind(['.', '[']).unwrap_or(0);
    Some(&path[..cut])
}

enum Frame {
    Map {
        path: String,
        /// The key just read, waiting for its value.
        key: Option<(String, Span)>,
        /// Keys seen so far, for duplicate detection.
        seen: HashMap<String, Span>,
    },
    Seq {
        path: String,
        next: usize,
    },
}

struct Builder<'a> {
    source: &'a str,
    index: SpanIndex,
    stack: Vec<Frame>,
}

impl Builder<'_> {
    fn span(&self, mark: Marker, len_chars: usize) -> Span {
        span_at(self.source, mark.line(), mark.col() + 1, len_chars)
    }

    /// The path of the node that starts now, and its key span if it is a mapping value.
    /// Returns None when the node is a mapping *key* (recorded by the caller).
    fn next_value_path(&mut self) -> Option<(String, Option<Span>)> {
        match self.stack.last_mut() {
            None => Some((String::new(), None)),
            Some(Frame::Seq { path, next }) => {
                let p = format!("{path}[{next}]");
                *next += 1;
                Some((p, None))
            }
            Some(Frame::Map { path, key, .. }) => {
                key.take().map(|(k, span)| (child(path, &k), Some(span)))
            }
        }
    }

    fn record(&mut self, path: String, key: Option<Span>, value: Span) {
        self.index
            .nodes
            .entry(path)
            .or_insert(NodeSpan { key, value });
    }
}

impl Builder<'_> {
    /// A mapping key: remember it until its value arrives; note duplicates; and let a block
    /// mapping's location be its first key (the parser marks it after that key).
    fn key(&mut self, value: String, span: Span) {
        let Some(Frame::Map { path, key, seen }) = self.stack.last_mut() else {
            return;
        };
        if seen.is_empty()
            && let Some(node) = self.index.nodes.get_mut(path.as_str())
            && span.offset < node.value.offset
        {
            node.value = span;
        }
        match seen.get(&value) {
            Some(first) => self.index.duplicates.push((value.clone(), *first, span)),
            None => {
                seen.insert(value.clone(), span);
            }
        }
        *key = Some((value, span));
    }
}

impl MarkedEventReceiver for Builder<'_> {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        match ev {
            Event::DocumentStart => {
                let span = self.span(mark, 3);
                self.index.documents.push(span);
            }
            Event::Scalar(value, style, _, _) => {
                let len = match style {
                    TScalarStyle::Plain => value.chars().count(),
                    TScalarStyle::SingleQuoted | TScalarStyle::DoubleQuoted => {
                        value.chars().count() + 2
                    }
                    _ => 1,
                };
                let span = self.span(mark, len.max(1));
                match self.next_value_path() {
                    Some((path, key)) => {
                        if path.is_empty() && style == TScalarStyle::Plain {
                            self.index.root_is_null = matches!(value.as_str(), "" | "~" | "null");
                        }
                        self.record(path, key, span)
                    }
                    None => self.key(value, span),
                }
            }
            Event::Alias(_) => {
                let span = self.span(mark, 1);
                match self.next_value_path() {
                    Some((path, key)) => self.record(path, key, span),
                    None => {
                        if let Some(Frame::Map { key, .. }) = self.stack.last_mut() {
                            *key = Some(("*alias".to_owned(), span));
                        }
                    }
                }
            }
            Event::MappingStart(..) | Event::SequenceStart(..) => {
                let span = self.span(mark, 1);
                let path = match self.next_value_path() {
                    Some((path, key)) => {
                        self.record(path.clone(), key, span);
                        path
                    }
                    // A complex key (a mapping used as a key): index it under a path nothing
                    // asks for, and give its value a placeholder key.
                    None => {
                        if let Some(Frame::Map { key, .. }) = self.stack.last_mut() {
                            *key = Some(("?complex-key".to_owned(), span));
                        }
                        "?complex-key".to_owned()
                    }
                };
                self.stack.push(if matches!(ev, Event::MappingStart(..)) {
                    Frame::Map {
                        path,
                        key: None,
                        seen: HashMap::new(),
                    }
                } else {
                    Frame::Seq { path, next: 0 }
                });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            Event::Nothing | Event::StreamStart | Event::StreamEnd | Event::DocumentEnd => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_ids_read_a_definition_that_does_not_compile() {
        let src = "name: x\nsteps:\n  - id: pay\n  - service: s\n  - id: 7\n  - id: ship\n    action: [1]\n";
        assert_eq!(
            step_ids(src),
            [Some("pay".to_owned()), None, None, Some("ship".to_owned())]
        );
        assert!(step_ids("name: x").is_empty());
        assert!(step_ids("steps: 3").is_empty());
        assert!(step_ids("[not: a mapping").is_empty());
    }

    #[test]
    fn span_index_locates_nested_nodes() {
        let src = "name: x\nsteps:\n  - id: a\n    depends_on: [b, c]\n";
        let idx = SpanIndex::build(src);
        let dep = idx.value("steps[0].depends_on[1]");
        assert_eq!((dep.line, dep.column), (4, 21));
        let key = idx.key("steps[0].depends_on");
        assert_eq!((key.line, key.column), (4, 5));
        assert_eq!(idx.step_name("steps[0]"), "`a`");
        // A path that does not exist falls back to its closest ancestor.
        assert_eq!(idx.value("steps[0].params.x").line, 3);
    }

    #[test]
    fn all_unknown_fields_are_reported_at_once() {
        let src = "name: x\nverison: 1\nsteps:\n  - id: a\n    depend_on: [b]\n    retry: {max_attempt: 2}\n";
        let parsed = parse(src);
        let codes: Vec<_> = parsed
            .diagnostics
            .iter()
            .map(|d| (d.code, d.span.line))
            .collect();
        assert_eq!(
            codes,
            vec![
                (Code::UnknownField, 2),
                (Code::UnknownField, 5),
                (Code::UnknownField, 6)
            ]
        );
        assert!(parsed.saga.is_some());
        assert_eq!(
            parsed.diagnostics[1].hint.as_deref(),
            Some("did you mean `depends_on`?")
        );
    }

    #[test]
    fn syntax_errors_are_located() {
        let parsed = parse("name: x\nsteps:\n  - id: a\n   bad: [\n");
        assert!(parsed.saga.is_none());
        assert_eq!(parsed.diagnostics.len(), 1);
        assert_eq!(parsed.diagnostics[0].code, Code::YamlSyntax);
        assert!(parsed.diagnostics[0].span.line >= 3);
    }

    #[test]
    fn empty_file_is_an_empty_saga() {
        for src in ["", "# just a comment\n", "---\n"] {
            let parsed = parse(src);
            assert!(parsed.saga.is_none(), "{src:?}");
            assert_eq!(parsed.diagnostics[0].code, Code::EmptySaga, "{src:?}");
        }
    }
}

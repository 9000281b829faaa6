//! Diagnostics: what is wrong (or suspicious) in a saga file, where, and what to do about it.
//!
//! Every problem the DSL finds is a [`Diagnostic`] with a stable [`Code`] (users and editors match
//! on the code string, never on the message), a primary location, optional secondary locations
//! and a hint. Rendering is done by `codespan-reporting`, so the snippet and underline look like
//! the Rust compiler's; [`Report::to_json`] gives the same facts to tools.

use std::fmt;

use codespan_reporting::diagnostic as cs;
use codespan_reporting::files::SimpleFile;
use codespan_reporting::term;
use serde::Serialize;

/// Error or warning. Errors make a file invalid; warnings never do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

macro_rules! codes {
    ($( $(#[$doc:meta])* $variant:ident = $text:literal, )*) => {
        /// The stable identity of a diagnostic. The string form (`Code::as_str`) is part of the
        /// public interface: golden tests and editor integrations match on it.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum Code { $( $(#[$doc])* $variant, )* }

        impl Code {
            /// Every code, in declaration order (for documentation and tests).
            pub const ALL: &'static [Code] = &[ $( Code::$variant, )* ];

            pub fn as_str(self) -> &'static str {
                match self { $( Code::$variant => $text, )* }
            }
        }
    };
}

codes! {
    // --- errors: the file cannot be read as YAML or does not have the saga's shape ---
    /// Not YAML at all (bad indentation, unclosed quote, tab, …) or not valid UTF-8.
    YamlSyntax = "yaml-syntax",
    /// A value of the wrong type (a list where a string belongs, a string for a number, …).
    InvalidType = "invalid-type",
    /// A key the saga language does not know (usually a typo such as `depend_on`).
    UnknownField = "unknown-field",
    /// A key the saga language requires is absent.
    MissingField = "missing-field",
    /// An empty document or a saga without steps.
    EmptySaga = "empty-saga",
    /// A file over 1 MiB or a saga over 500 steps.
    TooLarge = "too-large",
    /// A name, id or service that is empty or has characters outside `[A-Za-z0-9_-]`.
    InvalidName = "invalid-name",
    /// `version` is not a positive integer.
    InvalidVersion = "invalid-version",
    /// An input field with an unknown type.
    InvalidInputType = "invalid-input-type",
    // --- errors: steps ---
    /// Two steps share an id.
    DuplicateStep = "duplicate-step",
    /// `depends_on` names a step that does not exist.
    UnknownStep = "unknown-step",
    /// Steps depend on each other in a circle; none of them could ever start.
    Cycle = "cycle",
    /// A step has neither `action` (saga step) nor `try` (TCC step), or has both.
    StepKind = "step-kind",
    /// A saga step has no `compensation` and is not declared irreversible.
    MissingCompensation = "missing-compensation",
    /// `compensation: none` without an `irreversible_reason`.
    MissingReason = "missing-reason",
    /// A TCC step is missing `confirm` or `cancel`.
    IncompleteTcc = "incomplete-tcc",
    /// A step that may run after an irreversible step (a pivot) may fail in a way that would
    /// need the pivot undone.
    PivotViolation = "pivot-violation",
    /// `on_failure` is not one of `compensate`, `continue`, `retry`.
    InvalidFailurePolicy = "invalid-failure-policy",
    // --- errors: values ---
    /// A duration that cannot be read (`five seconds`, `-1s`, a bare number without unit, zero).
    InvalidDuration = "invalid-duration",
    /// A retry policy that cannot work (zero attempts, multiplier below 1, jitter outside 0..1,
    /// max backoff below initial backoff).
    InvalidRetry = "invalid-retry",
    /// A `${…}` expression that cannot be parsed.
    InvalidTemplate = "invalid-template",
    /// `${input.x}` where `x` is not declared in `input`.
    UndeclaredInput = "undeclared-input",
    /// `${steps.x.output…}` where `x` is not a step.
    UnknownReference = "unknown-reference",
    /// `${steps.x.output…}` where `x` is not guaranteed to have finished before this step runs.
    ReferenceNotAncestor = "reference-not-ancestor",
    /// `${steps.x.output.f}` where step `x` declares its `outputs` and `f` is not one of them.
    UndeclaredOutput = "undeclared-output",
    /// `sequence_key` is empty or refers to an optional input.
    InvalidSequenceKey = "invalid-sequence-key",
    // --- warnings: legal but suspicious ---
    /// A `continue` step that other steps depend on: when it fails they are skipped.
    OptionalDependency = "optional-dependency",
    /// A `depends_on` entry already implied through another dependency.
    RedundantDependency = "redundant-dependency",
    /// A declared input that nothing uses.
    UnusedInput = "unused-input",
    /// A retry setting that has no effect (e.g. `max_attempts` on an `on_failure: retry` step).
    IgnoredSetting = "ignored-setting",
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Code {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// A place in the source: 1-based line and column (in characters), the byte range for snippets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Span {
    pub line: usize,
    pub column: usize,
    /// Byte offset of the first character.
    pub offset: usize,
    /// Length in bytes of what is underlined (at least 1 when the source is not empty).
    pub len: usize,
}

impl Span {
    /// The start of the file: used when a problem has no better place (an empty file).
    pub const START: Span = Span {
        line: 1,
        column: 1,
        offset: 0,
        len: 0,
    };
}

/// A secondary location with its own short message (e.g. the other steps of a cycle).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Note {
    pub span: Span,
    pub message: String,
}

/// One problem found in a saga file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Diagnostic {
    pub severity: Severity,
    pub code: Code,
    pub message: String,
    /// Where the problem is.
    pub span: Span,
    /// What the underline says (short; the message says the whole thing).
    pub label: String,
    /// Other places involved.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<Note>,
    /// What to do about it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

impl Diagnostic {
    pub fn error(code: Code, span: Span, message: impl Into<String>) -> Self {
        Self::new(Severity::Error, code, span, message)
    }

    pub fn warning(code: Code, span: Span, message: impl Into<String>) -> Self {
        Self::new(Severity::Warning, code, span, message)
    }

    fn new(severity: Severity, code: Code, span: Span, message: impl Into<String>) -> Self {
        Self {
            severity,
            code,
            message: message.into(),
            span,
            label: String::new(),
            notes: Vec::new(),
            hint: None,
        }
    }

    pub fn with_label(mut self, label: impl Into<String>) -> Self {
        self.label = label.into();
        self
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    pub fn with_note(mut self, span: Span, message: impl Into<String>) -> Self {
        self.notes.push(Note {
            span,
            message: message.into(),
        });
        self
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

/// The diagnostics of one file, with the file's name and text so they can be rendered.
#[derive(Debug, Clone)]
pub struct Report<'a> {
    pub file: &'a str,
    pub source: &'a str,
    pub diagnostics: &'a [Diagnostic],
}

impl Report<'_> {
    /// Human-readable text: one block per diagnostic with the offending snippet underlined.
    pub fn render(&self) -> String {
        let file = SimpleFile::new(self.file, self.source);
        let config = term::Config::default();
        let mut out = String::new();
        for d in self.diagnostics {
            let rendered = term::emit_into_string(&config, &file, &to_codespan(d, self.source));
            match rendered {
                Ok(text) => out.push_str(&text),
                // A span outside the text would be our bug; still say what is wrong.
                Err(_) => out.push_str(&format!(
                    "{}[{}]: {}\n  --> {}:{}:{}\n\n",
                    severity_word(d.severity),
                    d.code,
                    d.message,
                    self.file,
                    d.span.line,
                    d.span.column
                )),
            }
        }
        out
    }

    /// The same facts for tools and editors: `{file, valid, errors, warnings, diagnostics}`.
    pub fn to_json(&self) -> serde_json::Value {
        let errors = self.diagnostics.iter().filter(|d| d.is_error()).count();
        serde_json::json!({
            "file": self.file,
            "valid": errors == 0,
            "errors": errors,
            "warnings": self.diagnostics.len() - errors,
            "diagnostics": self.diagnostics,
        })
    }
}

fn severity_word(s: Severity) -> &'static str {
    match s {
        Severity::Error => "error",
        Severity::Warning => "warning",
    }
}

fn to_codespan(d: &Diagnostic, source: &str) -> cs::Diagnostic<()> {
    let base = match d.severity {
        Severity::Error => cs::Diagnostic::error(),
        Severity::Warning => cs::Diagnostic::warning(),
    };
    let mut labels = vec![cs::Label::primary((), clamp(d.span, source)).with_message(&d.label)];
    labels.extend(
        d.notes
            .iter()
            .map(|n| cs::Label::secondary((), clamp(n.span, source)).with_message(&n.message)),
    );
    let mut diag = base
        .with_code(d.code.as_str())
        .with_message(&d.message)
        .with_labels(labels);
    if let Some(hint) = &d.hint {
        diag = diag.with_notes(vec![format!("hint: {hint}")]);
    }
    diag
}

/// A byte range that lies inside `source` and on character boundaries.
fn clamp(span: Span, source: &str) -> std::ops::Range<usize> {
    let mut start = span.offset.min(source.len());
    while !source.is_char_boundary(start) {
        start -= 1;
    }
    let mut end = (start + span.len).min(source.len());
    while !source.is_char_boundary(end) {
        end += 1;
    }
    start..end
}

/// Turns 1-based line and character column into a [`Span`] over `len_chars` characters.
pub(crate) fn span_at(source: &str, line: usize, column: usize, len_chars: usize) -> Span {
    let line = line.max(1);
    let column = column.max(1);
    let line_start = source
        .split_inclusive('\n')
        .take(line - 1)
        .map(str::len)
        .sum::<usize>()
        .min(source.len());
    let rest = &source[line_start..];
    let line_text = rest.split('\n').next().unwrap_or("");
    let mut chars = line_text.char_indices().skip(column - 1);
    let start = chars.next().map(|(i, _)| i).unwrap_or(line_text.len());
    let end = line_text[start..]
        .char_indices()
        .nth(len_chars)
        .map(|(i, _)| start + i)
        .unwrap_or(line_text.len());
    Span {
        line,
        column,
        offset: line_start + start,
        len: end - start,
    }
}

/// The closest candidate to `word` if it is a plausible typo (for "did you mean" hints).
pub fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let limit = (word.chars().count() / 3).max(1);
    candidates
        .into_iter()
        .map(|c| (edit_distance(word, c), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Optimal-string-alignment distance: insertions, deletions, substitutions and swaps of two
/// neighbouring characters (`retyr` → `retry`) each count as one edit.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[a.len()][b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn span_at_counts_characters_not_bytes() {
        let src = "a: 1\nname: «x» y\n";
        let span = span_at(src, 2, 7, 3);
        assert_eq!(&src[span.offset..span.offset + span.len], "«x»");
    }

    #[test]
    fn span_at_past_the_end_is_clamped() {
        let span = span_at("abc", 9, 40, 5);
        assert!(span.offset <= 3);
    }

    #[test]
    fn did_you_mean_finds_typos_only() {
        let fields = ["depends_on", "service", "retry"];
        assert_eq!(did_you_mean("depend_on", fields), Some("depends_on"));
        assert_eq!(did_you_mean("servce", fields), Some("service"));
        assert_eq!(did_you_mean("colour", fields), None);
        assert_eq!(did_you_mean("retyr", fields), Some("retry"));
    }

    #[test]
    fn codes_are_unique_kebab_case() {
        let mut seen = std::collections::HashSet::new();
        for code in Code::ALL {
            assert!(seen.insert(code.as_str()), "duplicate code {code}");
            assert!(
                code.as_str()
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c == '-')
            );
        }
    }
}

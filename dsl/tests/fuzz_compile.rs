//! Fuzzing the DSL compiler (issue 9, item 10): the bounded run that `cargo test` does. The
//! longer, coverage-guided run is `fuzz/` (cargo-fuzz), see the README.
//!
//! Whatever the input — arbitrary bytes, arbitrary text, a soup of the language's own tokens, or
//! a real definition (every file of the diagnostics corpus and both shipped sagas) mutated line
//! by line and byte by byte — `compile` must answer without panicking, and its answer must be
//! coherent: a graph exactly when there is no error, every diagnostic with a message and a span
//! that lies inside the text (on character boundaries, its line and column matching its offset),
//! every report renderable, and a graph that is a real topological order and renders. The case
//! count is bounded for `cargo test` in debug builds; `PROPTEST_CASES=100000` runs longer.

use std::collections::BTreeSet;
use std::sync::OnceLock;

use proptest::prelude::*;
use proptest::sample::Index;
use sagaflow_dsl::template::{Part, Template};
use sagaflow_dsl::{Code, Compiled, Report, compile, compile_bytes, render};

/// Cases per property unless `PROPTEST_CASES` says otherwise.
const CASES: u32 = 384;

fn config() -> ProptestConfig {
    // `ProptestConfig::default()` reads PROPTEST_CASES; only the default count is ours.
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(CASES);
    ProptestConfig {
        cases,
        // A failure is shrunk, but not for minutes.
        max_shrink_iters: 2_000,
        ..ProptestConfig::default()
    }
}

/// Every definition we have: the shipped sagas and the diagnostics corpus (valid and invalid).
fn seeds() -> &'static [String] {
    static SEEDS: OnceLock<Vec<String>> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut out = vec![
            include_str!("../../sagas/order.yaml").to_owned(),
            include_str!("../../sagas/order-refund.yaml").to_owned(),
        ];
        let mut corpus: Vec<_> = std::fs::read_dir(root.join("tests/corpus"))
            .expect("dsl/tests/corpus")
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
            .collect();
        corpus.sort();
        for path in corpus {
            // One corpus file is deliberately not UTF-8: its text, lossily, is still a seed.
            let bytes = std::fs::read(&path).expect("corpus file");
            out.push(String::from_utf8_lossy(&bytes).into_owned());
        }
        assert!(
            out.len() > 50,
            "the corpus went missing: {} seeds",
            out.len()
        );
        out
    })
}

/// The checks every compile outcome must pass, whatever the input.
fn check(source: &str) -> Result<Compiled, TestCaseError> {
    let compiled = compile(source);
    check_outcome(source, &compiled)?;
    Ok(compiled)
}

fn check_outcome(source: &str, compiled: &Compiled) -> Result<(), TestCaseError> {
    // Spans are relative to the text after a byte-order mark.
    let text = source.strip_prefix('\u{feff}').unwrap_or(source);
    let errors = compiled.errors().count();
    prop_assert_eq!(
        compiled.graph.is_some(),
        errors == 0,
        "a graph exactly when there is no error: {:#?}",
        compiled.diagnostics
    );
    for d in &compiled.diagnostics {
        prop_assert!(!d.message.trim().is_empty(), "empty message: {:?}", d);
        check_span(
            text,
            d.span.offset,
            d.span.len,
            d.span.line,
            d.span.column,
            d,
        )?;
        for note in &d.notes {
            check_span(
                text,
                note.span.offset,
                note.span.len,
                note.span.line,
                note.span.column,
                d,
            )?;
        }
    }
    let sorted = compiled
        .diagnostics
        .windows(2)
        .all(|w| (w[0].span.line, w[0].span.column) <= (w[1].span.line, w[1].span.column));
    prop_assert!(sorted, "diagnostics in file order");
    let report = Report {
        file: "fuzz.yaml",
        source: text,
        diagnostics: &compiled.diagnostics,
    };
    let rendered = report.render();
    prop_assert!(compiled.diagnostics.is_empty() || !rendered.is_empty());
    let json = report.to_json();
    prop_assert_eq!(json["errors"].as_u64(), Some(errors as u64));
    prop_assert_eq!(json["valid"].as_bool(), Some(errors == 0));
    if let Some(graph) = &compiled.graph {
        let n = graph.steps().len();
        prop_assert!(n > 0, "a valid saga has steps");
        let order = graph.topological_order();
        let as_set: BTreeSet<usize> = order.iter().copied().collect();
        prop_assert_eq!(as_set, (0..n).collect::<BTreeSet<_>>());
        let position = |i: usize| order.iter().position(|&x| x == i);
        for step in 0..n {
            for dep in graph.dependencies(step) {
                prop_assert!(position(dep) < position(step), "{dep} runs before {step}");
                prop_assert!(graph.is_ancestor(dep, step));
            }
        }
        prop_assert_eq!(graph.layers().iter().map(Vec::len).sum::<usize>(), n);
        prop_assert_eq!(graph.compensation_order().len(), n);
        prop_assert!(graph.content_hash().starts_with("sha256:"));
        prop_assert!(!render::text(graph, &|_| None).is_empty());
        prop_assert!(render::dot(graph).starts_with("digraph"));
        prop_assert!(!render::mermaid(graph).is_empty());
        let svg = render::svg_with(graph, &|_| None);
        prop_assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        prop_assert_eq!(
            svg.matches("<g class=\"step\"").count(),
            graph.steps().len()
        );
        // Deterministic: the same text is the same definition.
        let again = compile(source);
        prop_assert_eq!(
            again.graph.as_ref().map(|g| g.content_hash().to_owned()),
            Some(graph.content_hash().to_owned())
        );
    }
    Ok(())
}

/// A span lies inside the text, on character boundaries, and its line and column are those of
/// its offset (columns count characters, 1-based).
fn check_span(
    text: &str,
    offset: usize,
    len: usize,
    line: usize,
    column: usize,
    d: &sagaflow_dsl::Diagnostic,
) -> Result<(), TestCaseError> {
    let end = offset.checked_add(len);
    prop_assert!(
        end.is_some_and(|end| end <= text.len()),
        "span {offset}+{len} outside the {}-byte text: {:?}",
        text.len(),
        d
    );
    prop_assert!(
        line >= 1 && column >= 1,
        "lines and columns are 1-based: {:?}",
        d
    );
    prop_assert!(
        text.is_char_boundary(offset) && text.is_char_boundary(offset + len),
        "span {offset}+{len} not on character boundaries: {:?}",
        d
    );
    // YAML breaks lines at `\r` too, and places "end of input" on the line after the last:
    // a line number may be one past the last `\n`-line, never further.
    // (`\u{85}`, `\u{2028}` and `\u{2029}` count as breaks for the YAML parser too.)
    let breaks = text.matches(BREAKS).count();
    prop_assert!(
        line <= breaks + 2,
        "line {} of a text with {} breaks: {:?}",
        line,
        breaks,
        d
    );
    // Inside a text with plain `\n` breaks, line and column are exactly those of the offset.
    if offset < text.len() && !text.contains(['\r', '\u{85}', '\u{2028}', '\u{2029}']) {
        let before = &text[..offset];
        let want_line = 1 + before.matches('\n').count();
        let want_column = 1 + before.rsplit('\n').next().unwrap_or("").chars().count();
        prop_assert_eq!(
            (line, column),
            (want_line, want_column),
            "line and column of offset {}: {:?}",
            offset,
            d
        );
    }
    Ok(())
}

/// What the YAML parser may count as a line break.
const BREAKS: [char; 5] = ['\n', '\r', '\u{85}', '\u{2028}', '\u{2029}'];

/// One edit of a definition's text.
#[derive(Debug, Clone)]
enum Mutation {
    DeleteLine(Index),
    DuplicateLine(Index, Index),
    SwapLines(Index, Index),
    /// Indent (true) or dedent a line by `n` spaces.
    Indent(Index, bool, u8),
    /// Replace what follows the first `:` of a line by a nasty scalar.
    ReplaceValue(Index, Index),
    /// Insert a token of the language (or of YAML) into a line.
    InsertToken(Index, Index, Index),
    /// A line of another seed, inserted.
    Splice(Index, Index, Index),
    /// Overwrite one byte (the text is then read back lossily).
    FlipByte(Index, u8),
    /// Cut the text at some character.
    Truncate(Index),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let i = any::<Index>;
    prop_oneof![
        i().prop_map(Mutation::DeleteLine),
        (i(), i()).prop_map(|(a, b)| Mutation::DuplicateLine(a, b)),
        (i(), i()).prop_map(|(a, b)| Mutation::SwapLines(a, b)),
        (i(), any::<bool>(), 1u8..9).prop_map(|(a, up, n)| Mutation::Indent(a, up, n)),
        (i(), i()).prop_map(|(a, b)| Mutation::ReplaceValue(a, b)),
        (i(), i(), i()).prop_map(|(a, b, c)| Mutation::InsertToken(a, b, c)),
        (i(), i(), i()).prop_map(|(a, b, c)| Mutation::Splice(a, b, c)),
        (i(), any::<u8>()).prop_map(|(a, b)| Mutation::FlipByte(a, b)),
        i().prop_map(Mutation::Truncate),
    ]
}

/// Values that stress the validator: wrong types, extremes, YAML's odd corners, broken templates.
const SCALARS: &[&str] = &[
    "",
    "~",
    "null",
    "[]",
    "{}",
    "[a, b]",
    "{a: 1}",
    "0",
    "-1",
    "1.5",
    "1e999",
    "-0",
    "18446744073709551616",
    "99999999999999999999999999999999",
    "0x1F",
    ".nan",
    ".inf",
    "true",
    "\"\"",
    "''",
    "\"\\u0000\"",
    "|\n  multi\n  line",
    ">-",
    "&anchor x",
    "*anchor",
    "*undefined",
    "!!binary aGVsbG8=",
    "!custom tag",
    "${",
    "${}",
    "${input}",
    "${input.}",
    "${input.order_id",
    "${steps.payment.output}",
    "${steps.payment.output.txn_id.deep}",
    "${steps..output}",
    "${steps.nope.output.x}",
    "$${input.x}",
    "${input.order_id}${input.order_id}",
    "0s",
    "1ns",
    "5",
    "5 s",
    "-1s",
    "10000000000000000000h",
    "584542046091y",
    "0.0",
    "-2.0",
    "2.0e308",
    "none",
    "compensate",
    "continue",
    "retry",
    "money",
    "integer",
    "string",
    "boolean",
    "object",
    "ünïcödé-名前",
    "a\tb",
    "'unterminated",
    "\"unterminated",
    "- - -",
    "? complex key",
];

/// Keys and indicators: inserted anywhere, they make new structure out of old.
const TOKENS: &[&str] = &[
    "name: ",
    "version: ",
    "sequence_key: ",
    "input:",
    "steps:",
    "- id: ",
    "  - id: x\n    service: s\n    action: a\n    compensation: c",
    "service: ",
    "action: ",
    "compensation: ",
    "compensation: none",
    "irreversible_reason: ",
    "try: ",
    "confirm: ",
    "cancel: ",
    "depends_on: ",
    "depends_on: [payment, payment]",
    "depends_on: [gmv]",
    "on_failure: ",
    "timeout: ",
    "deadline: ",
    "retry:",
    "max_attempts: ",
    "initial_backoff: ",
    "max_backoff: ",
    "multiplier: ",
    "jitter: ",
    "outputs: ",
    "params:",
    "defaults:",
    "type: ",
    "required: ",
    ": ",
    "- ",
    "? ",
    "#",
    "---",
    "...",
    "&a ",
    "*a",
    "<<: *a",
    "!!str ",
    "%YAML 1.2",
    "\t",
    "{",
    "}",
    "[",
    "]",
    ",",
    "\"",
    "'",
    "|",
    ">",
    "\u{feff}",
    "\r",
    "\u{0}",
];

fn lines_of(text: &str) -> Vec<String> {
    text.split('\n').map(str::to_owned).collect()
}

fn apply(text: &str, mutations: &[Mutation]) -> String {
    let seeds = seeds();
    let mut lines = lines_of(text);
    for m in mutations {
        if lines.is_empty() {
            lines.push(String::new());
        }
        let n = lines.len();
        match m {
            Mutation::DeleteLine(a) => {
                lines.remove(a.index(n));
            }
            Mutation::DuplicateLine(a, b) => {
                let l = lines[a.index(n)].clone();
                lines.insert(b.index(n + 1), l);
            }
            Mutation::SwapLines(a, b) => lines.swap(a.index(n), b.index(n)),
            Mutation::Indent(a, up, k) => {
                let l = &mut lines[a.index(n)];
                if *up {
                    l.insert_str(0, &" ".repeat(usize::from(*k)));
                } else {
                    let spaces = l.len() - l.trim_start_matches(' ').len();
                    l.drain(..spaces.min(usize::from(*k)));
                }
            }
            Mutation::ReplaceValue(a, b) => {
                let l = &mut lines[a.index(n)];
                if let Some(colon) = l.find(':') {
                    l.truncate(colon + 1);
                    l.push(' ');
                }
                l.push_str(SCALARS[b.index(SCALARS.len())]);
            }
            Mutation::InsertToken(a, b, c) => {
                let l = &mut lines[a.index(n)];
                let at = char_boundary(l, b.index(l.len() + 1));
                l.insert_str(at, TOKENS[c.index(TOKENS.len())]);
            }
            Mutation::Splice(a, b, c) => {
                let other = lines_of(&seeds[a.index(seeds.len())]);
                let l = other[b.index(other.len())].clone();
                lines.insert(c.index(n + 1), l);
            }
            Mutation::FlipByte(a, byte) => {
                let mut bytes = lines.join("\n").into_bytes();
                if !bytes.is_empty() {
                    let at = a.index(bytes.len());
                    bytes[at] = *byte;
                }
                lines = lines_of(&String::from_utf8_lossy(&bytes));
            }
            Mutation::Truncate(a) => {
                let mut joined = lines.join("\n");
                let at = char_boundary(&joined, a.index(joined.len() + 1));
                joined.truncate(at);
                lines = lines_of(&joined);
            }
        }
    }
    lines.join("\n")
}

/// The last character boundary at or before `at`.
fn char_boundary(s: &str, mut at: usize) -> usize {
    at = at.min(s.len());
    while !s.is_char_boundary(at) {
        at -= 1;
    }
    at
}

/// Text made of the language's keys, YAML indicators and nasty scalars, with random line breaks
/// and indentation: closer to a definition than random characters, further than a mutation.
fn token_soup() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        any::<Index>().prop_map(|i| TOKENS[i.index(TOKENS.len())].to_owned()),
        any::<Index>().prop_map(|i| SCALARS[i.index(SCALARS.len())].to_owned()),
        (0usize..8).prop_map(|k| format!("\n{}", " ".repeat(k * 2))),
        "[a-z_]{1,8}",
    ];
    proptest::collection::vec(piece, 0..80).prop_map(|p| p.concat())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_bytes_are_answered(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let compiled = compile_bytes(&bytes);
        match std::str::from_utf8(&bytes) {
            Ok(text) => check_outcome(text, &compiled)?,
            Err(_) => {
                prop_assert!(compiled.graph.is_none());
                let first = compiled.errors().next();
                prop_assert!(first.is_some_and(|d| d.message.contains("UTF-8")), "{:?}", first);
            }
        }
    }

    #[test]
    fn arbitrary_text_is_answered(text in any::<String>()) {
        check(&text)?;
    }

    #[test]
    fn token_soup_is_answered(text in token_soup()) {
        check(&text)?;
    }

    /// The deepest reach: real definitions, a few edits away from valid.
    #[test]
    fn mutated_definitions_are_answered(
        seed in any::<Index>(),
        mutations in proptest::collection::vec(mutation(), 1..8),
    ) {
        let seeds = seeds();
        let text = apply(&seeds[seed.index(seeds.len())], &mutations);
        check(&text)?;
    }

    /// One edit of a shipped saga: most stay valid or fail with a located error, none panics.
    #[test]
    fn one_edit_of_a_valid_saga_is_answered(
        order in any::<bool>(),
        edit in mutation(),
    ) {
        let seeds = seeds();
        let text = apply(&seeds[usize::from(!order)], std::slice::from_ref(&edit));
        let compiled = check(&text)?;
        if compiled.graph.is_none() {
            let lines = text.split('\n').count();
            let first = compiled.errors().next();
            prop_assert!(
                // One past the last: YAML's "end of input" (a truncated flow mapping).
                first.is_some_and(|d| d.span.line >= 1 && d.span.line <= lines + 1),
                "an invalid saga has an error on one of its {} lines (or at its end): {:?}",
                lines,
                first
            );
        }
    }

    /// `${…}` templates: never a panic; an error says where (a character of the text) and what;
    /// a parsed reference prints back to itself.
    #[test]
    fn templates_parse_or_say_where(
        text in proptest::collection::vec(
            prop_oneof![
                Just("${".to_owned()),
                Just("$${".to_owned()),
                Just("}".to_owned()),
                Just("$".to_owned()),
                Just(".".to_owned()),
                Just("input".to_owned()),
                Just("steps".to_owned()),
                Just("output".to_owned()),
                "[ -~]{0,6}",
                ".{0,3}",
            ],
            0..16,
        ).prop_map(|p| p.concat())
    ) {
        match Template::parse(&text) {
            Ok(template) => {
                for part in &template.parts {
                    if let Part::Ref(r) = part {
                        let printed = r.to_string();
                        let back = Template::parse(&printed);
                        prop_assert_eq!(
                            back.map(|t| t.parts),
                            Ok(vec![Part::Ref(r.clone())]),
                            "{} prints as {}", text, printed
                        );
                    }
                }
            }
            Err(e) => {
                prop_assert!(!e.message.trim().is_empty());
                prop_assert!(e.column < text.chars().count(), "column {} of {:?}", e.column, text);
            }
        }
    }
}

/// The mutator itself works: without edits the seeds come back unchanged, and every seed that
/// the corpus calls valid compiles (so the mutations start from the real thing).
#[test]
fn seeds_round_trip_through_the_mutator() {
    for seed in seeds() {
        assert_eq!(&apply(seed, &[]), seed);
    }
    assert!(compile(&seeds()[0]).is_valid(), "order.yaml compiles");
    assert!(
        compile(&seeds()[1]).is_valid(),
        "order-refund.yaml compiles"
    );
}

/// Found by this fuzzing: a template error in a value with non-ASCII text was located one
/// byte off (`validate.rs` compared the value's character count with the source span's byte
/// length to tell a quoted value, so an unquoted one whose byte length was its character count
/// + 2 was taken for quoted), and the span ended inside a character.
#[test]
fn template_error_spans_with_non_ascii_text() {
    let text = "name: x\nversion: 1\nsequence_key: ${\u{fffd}nput.order_id}\ninput:\n  order_id: string\nsteps:\n  - id: a\n    service: s\n    action: b\n    compensation: c\n";
    let compiled = compile(text);
    let d = compiled
        .errors()
        .find(|d| d.code == Code::InvalidTemplate)
        .expect("a template error");
    let at = &text[d.span.offset..];
    assert!(at.starts_with("${"), "the span starts at {at:?}");
    assert_eq!((d.span.line, d.span.column), (3, 15));
}

//! Golden tests over `tests/corpus/*.yaml`.
//!
//! Each file declares what it must produce in header comments:
//!
//! ```text
//! # expect: cycle line 14
//! # expect-warning: optional-dependency line 9
//! ```
//!
//! The test checks that every declared error and warning is reported with that code at that line,
//! that no undeclared *error* is reported, and that the rendered report equals the file's
//! `.expected` twin (so a wording regression shows in review). Regenerate the twins after an
//! intended change with `SAGAFLOW_BLESS=1 cargo test -p sagaflow-dsl --test corpus`.

use std::fs;
use std::path::{Path, PathBuf};

use sagaflow_dsl::{Report, Severity, compile_bytes};

#[derive(Debug, PartialEq, Eq, Clone)]
struct Expectation {
    severity: Severity,
    code: String,
    line: usize,
}

fn expectations(text: &str) -> Vec<Expectation> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        let (severity, rest) = if let Some(r) = line.strip_prefix("# expect:") {
            (Severity::Error, r)
        } else if let Some(r) = line.strip_prefix("# expect-warning:") {
            (Severity::Warning, r)
        } else {
            continue;
        };
        let mut words = rest.split_whitespace();
        let code = words.next().expect("a code after `expect:`").to_owned();
        assert_eq!(words.next(), Some("line"), "write `# expect: CODE line N`");
        let line = words
            .next()
            .and_then(|n| n.parse().ok())
            .expect("a line number");
        out.push(Expectation {
            severity,
            code,
            line,
        });
    }
    out
}

fn corpus() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .expect("tests/corpus exists")
        .map(|e| e.expect("readable dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn corpus_is_large_enough() {
    let invalid = corpus()
        .iter()
        .filter(|p| {
            let text = fs::read_to_string(p).unwrap_or_default();
            expectations(&text)
                .iter()
                .any(|e| e.severity == Severity::Error)
        })
        .count();
    assert!(
        invalid >= 30,
        "the corpus should hold at least 30 invalid definitions, it has {invalid}"
    );
}

#[test]
fn every_corpus_file_reports_what_it_declares() {
    let bless = std::env::var_os("SAGAFLOW_BLESS").is_some();
    let mut failures = Vec::new();
    for path in corpus() {
        let bytes = fs::read(&path).expect("readable");
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let expected = expectations(&text);
        let name = path.file_name().expect("file name").to_string_lossy();
        if expected.is_empty() {
            failures.push(format!("{name}: declares no `# expect:` line"));
            continue;
        }
        let compiled = compile_bytes(&bytes);
        let got: Vec<Expectation> = compiled
            .diagnostics
            .iter()
            .map(|d| Expectation {
                severity: d.severity,
                code: d.code.as_str().to_owned(),
                line: d.span.line,
            })
            .collect();
        for e in &expected {
            if !got.contains(e) {
                failures.push(format!("{name}: expected {e:?}, got {got:?}"));
            }
        }
        for g in got.iter().filter(|g| g.severity == Severity::Error) {
            if !expected.contains(g) {
                failures.push(format!("{name}: unexpected error {g:?}"));
            }
        }
        let has_error = expected.iter().any(|e| e.severity == Severity::Error);
        if compiled.is_valid() == has_error {
            failures.push(format!(
                "{name}: valid = {}, but it declares errors = {has_error}",
                compiled.is_valid()
            ));
        }
        let rendered = Report {
            file: &format!("tests/corpus/{name}"),
            source: &text,
            diagnostics: &compiled.diagnostics,
        }
        .render();
        let golden = path.with_extension("expected");
        if bless {
            fs::write(&golden, &rendered).expect("write golden");
        } else {
            match fs::read_to_string(&golden) {
                Ok(g) if g == rendered => {}
                Ok(g) => failures.push(format!(
                    "{name}: rendered report differs from {}\n--- expected\n{g}\n--- got\n{rendered}",
                    golden.display()
                )),
                Err(_) => failures.push(format!(
                    "{name}: no golden file; run with SAGAFLOW_BLESS=1 and review it"
                )),
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn shipped_sagas_are_valid_without_warnings() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sagas");
    let mut count = 0;
    for entry in fs::read_dir(dir).expect("sagas/ exists") {
        let path = entry.expect("entry").path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        count += 1;
        let file = sagaflow_dsl::compile_file(&path).expect("readable");
        assert!(
            file.compiled.is_valid() && file.compiled.diagnostics.is_empty(),
            "{}",
            file.report().render()
        );
    }
    assert!(
        count >= 2,
        "sagas/ should ship order.yaml and order-refund.yaml"
    );
}

#[test]
fn order_saga_has_payment_then_three_parallel_branches() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sagas/order.yaml");
    let file = sagaflow_dsl::compile_file(&path).expect("readable");
    let g = file.compiled.graph.expect("valid");
    let ids =
        |layer: &[usize]| -> Vec<&str> { layer.iter().map(|&i| g.step(i).id.as_str()).collect() };
    assert_eq!(g.layers().len(), 2);
    assert_eq!(ids(&g.layers()[0]), ["payment"]);
    assert_eq!(ids(&g.layers()[1]), ["coupon", "points", "gmv"]);
    let comp = g.compensation_order();
    assert_eq!(g.step(*comp.last().expect("steps")).id.as_str(), "payment");
}

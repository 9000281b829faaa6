//! The DSL compiler on arbitrary bytes: never a panic; a graph exactly when there is no
//! error; every diagnostic has a message and a span inside the text, and renders.
//! Seeds: `cargo +nightly fuzz run compile corpus/compile ../dsl/tests/corpus ../sagas`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sagaflow_dsl::{Report, compile_bytes};

fuzz_target!(|data: &[u8]| {
    let compiled = compile_bytes(data);
    let errors = compiled.errors().count();
    assert_eq!(compiled.graph.is_some(), errors == 0);
    let text = String::from_utf8_lossy(data);
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    for d in &compiled.diagnostics {
        assert!(!d.message.trim().is_empty(), "{d:?}");
        assert!(d.span.line >= 1 && d.span.column >= 1, "{d:?}");
        assert!(d.span.offset + d.span.len <= text.len(), "{d:?}");
    }
    let report = Report {
        file: "fuzz.yaml",
        source: text,
        diagnostics: &compiled.diagnostics,
    };
    let _ = report.render();
    let _ = report.to_json();
    if let Some(graph) = &compiled.graph {
        assert_eq!(graph.topological_order().len(), graph.steps().len());
        let _ = sagaflow_dsl::render::text(graph, &|_| None);
        let _ = sagaflow_dsl::render::dot(graph);
        let _ = sagaflow_dsl::render::mermaid(graph);
    }
});

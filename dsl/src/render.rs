//! Drawings of a compiled saga: text for the terminal, DOT (Graphviz) and Mermaid.
//!
//! The text drawing takes an optional per-step annotation so that `sagaflow status` can draw the
//! same picture with each step's state next to it.

use std::fmt::Write as _;

use petgraph::dot::{Config, Dot};

use crate::graph::SagaGraph;
use crate::model::{Compensation, FailurePolicy, StepDef, StepKind};

/// One line describing what a step does: `payment: charge / refund`, `coupon: freeze → use / unfreeze`.
pub fn operations(step: &StepDef) -> String {
    match &step.kind {
        StepKind::Saga {
            action,
            compensation: Compensation::Operation(c),
        } => format!("{}: {action} / {c}", step.service),
        StepKind::Saga {
            action,
            compensation: Compensation::None { .. },
        } => format!("{}: {action} (irreversible)", step.service),
        StepKind::Tcc {
            r#try,
            confirm,
            cancel,
        } => format!("{}: {try} → {confirm} / {cancel}", step.service),
    }
}

fn kind_tag(step: &StepDef) -> &'static str {
    match step.kind {
        StepKind::Saga { .. } => "saga",
        StepKind::Tcc { .. } => "tcc ",
    }
}

fn undo(step: &StepDef) -> Option<String> {
    match &step.kind {
        StepKind::Saga {
            compensation: Compensation::Operation(c),
            ..
        } => Some(format!("{}.{c}", step.id)),
        StepKind::Saga { .. } => None,
        StepKind::Tcc { cancel, .. } => Some(format!("{}.{cancel}", step.id)),
    }
}

/// The step graph as terminal text: layers (steps of one layer run in parallel), each step's
/// kind, operations and dependencies, then the compensation order.
pub fn text(graph: &SagaGraph, annotate: &dyn Fn(usize) -> Option<String>) -> String {
    let def = graph.def();
    let mut out = String::new();
    let short_hash = graph
        .content_hash()
        .trim_start_matches("sha256:")
        .get(..12)
        .unwrap_or("");
    let _ = writeln!(
        out,
        "{} v{}  ·  sequence key {}  ·  {}",
        def.name,
        def.version,
        template_text(&def.sequence_key),
        short_hash
    );
    if let Some(d) = &def.description {
        let _ = writeln!(out, "{}", d.trim());
    }
    out.push('\n');
    let width = def
        .steps
        .iter()
        .map(|s| s.id.0.chars().count())
        .max()
        .unwrap_or(0);
    let ops_width = def
        .steps
        .iter()
        .map(|s| operations(s).chars().count())
        .max()
        .unwrap_or(0);
    let layers = graph.layers();
    for (k, layer) in layers.iter().enumerate() {
        let parallel = if layer.len() > 1 {
            format!("  ({} in parallel)", layer.len())
        } else {
            String::new()
        };
        let corner = if k == 0 { '┌' } else { '├' };
        let _ = writeln!(out, "{corner}─ layer {}{parallel}", k + 1);
        for &i in layer {
            let step = graph.step(i);
            let deps: Vec<String> = graph
                .dependencies(i)
                .into_iter()
                .map(|d| graph.step(d).id.0.clone())
                .collect();
            let mut line = format!(
                "│  {:<width$}  [{}] {:<ops_width$}",
                step.id.0,
                kind_tag(step),
                operations(step),
            );
            if !deps.is_empty() {
                let _ = write!(line, "  after {}", deps.join(", "));
            }
            match step.on_failure {
                FailurePolicy::Compensate => {}
                FailurePolicy::Continue => line.push_str("  (optional)"),
                FailurePolicy::Retry => line.push_str("  (retried until it succeeds)"),
            }
            if let Some(note) = annotate(i) {
                let _ = write!(line, "  {note}");
            }
            let _ = writeln!(out, "{}", line.trim_end());
        }
        if k + 1 < layers.len() {
            out.push_str("│\n");
        }
    }
    out.push_str("└─ done\n\ncompensation order (reverse dependencies; a step is undone only if it may have taken effect):\n");
    let mut n = 0;
    for layer in layers.iter().rev() {
        let undos: Vec<String> = layer.iter().filter_map(|&i| undo(graph.step(i))).collect();
        if undos.is_empty() {
            continue;
        }
        n += 1;
        let parallel = if undos.len() > 1 {
            "  (in parallel)"
        } else {
            ""
        };
        let _ = writeln!(out, "  {n}. {}{parallel}", undos.join(", "));
    }
    let pivots: Vec<String> = def
        .steps
        .iter()
        .filter_map(|s| match &s.kind {
            StepKind::Saga {
                compensation: Compensation::None { reason },
                ..
            } => Some(format!("  {} is irreversible: {reason}", s.id)),
            _ => None,
        })
        .collect();
    if !pivots.is_empty() {
        out.push_str("pivots:\n");
        for p in pivots {
            let _ = writeln!(out, "{p}");
        }
    }
    out
}

fn template_text(t: &crate::template::Template) -> String {
    t.parts
        .iter()
        .map(|p| match p {
            crate::template::Part::Text(s) => s.replace("${", "$${"),
            crate::template::Part::Ref(r) => r.to_string(),
        })
        .collect()
}

/// What a drawing shows on a step beside its definition: a running saga's state of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overlay {
    /// One line, e.g. `● succeeded (1 attempt)`.
    pub note: String,
    /// A fill colour (`#rrggbb`).
    pub fill: &'static str,
}

/// Graphviz DOT: saga steps as boxes, TCC steps as hexagons, optional steps dashed.
pub fn dot(graph: &SagaGraph) -> String {
    dot_with(graph, &|_| None)
}

/// [`dot`] with each step's overlay (a third label line and a fill colour) where there is one.
pub fn dot_with(graph: &SagaGraph, overlay: &dyn Fn(usize) -> Option<Overlay>) -> String {
    let g = graph.petgraph();
    let node_attrs = |_, (_, &i): (petgraph::graph::NodeIndex, &usize)| {
        let step = graph.step(i);
        let shape = match step.kind {
            StepKind::Saga { .. } => "box",
            StepKind::Tcc { .. } => "hexagon",
        };
        let style = match step.on_failure {
            FailurePolicy::Continue => ", style=dashed",
            _ => "",
        };
        let (note, fill) = match overlay(i) {
            Some(o) => (
                format!("\\n{}", dot_escape(&o.note)),
                format!(
                    ", style=\"{}\", fillcolor=\"{}\"",
                    if style.is_empty() {
                        "filled"
                    } else {
                        "filled,dashed"
                    },
                    o.fill
                ),
            ),
            None => (String::new(), style.to_owned()),
        };
        format!(
            "label=\"{}\\n{}{note}\", shape={shape}{fill}",
            dot_escape(&step.id.0),
            dot_escape(&operations(step))
        )
    };
    let body = Dot::with_attr_getters(
        g,
        &[
            Config::EdgeNoLabel,
            Config::NodeNoLabel,
            Config::GraphContentOnly,
        ],
        &|_, _| String::new(),
        &node_attrs,
    );
    format!(
        "digraph \"{}\" {{\n    rankdir=TB;\n    label=\"{} v{}\";\n    node [fontname=\"Helvetica\"];\n{body:?}}}\n",
        dot_escape(&graph.def().name),
        dot_escape(&graph.def().name),
        graph.def().version
    )
}

fn dot_escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

/// Mermaid flowchart: paste into any Markdown renderer that supports Mermaid.
pub fn mermaid(graph: &SagaGraph) -> String {
    mermaid_with(graph, &|_| None)
}

/// [`mermaid`] with each step's overlay (a third label line and a fill colour) where there is
/// one.
pub fn mermaid_with(graph: &SagaGraph, overlay: &dyn Fn(usize) -> Option<Overlay>) -> String {
    let mut out = String::from("flowchart TD\n");
    let mut fills = Vec::new();
    for (i, step) in graph.steps().iter().enumerate() {
        let mut label = format!(
            "{}<br/>{}",
            mermaid_escape(&step.id.0),
            mermaid_escape(&operations(step))
        );
        if let Some(o) = overlay(i) {
            label = format!("{label}<br/>{}", mermaid_escape(&o.note));
            fills.push((i, o.fill));
        }
        let _ = match step.kind {
            StepKind::Saga { .. } => writeln!(out, "    s{i}[\"{label}\"]"),
            StepKind::Tcc { .. } => writeln!(out, "    s{i}{{{{\"{label}\"}}}}"),
        };
    }
    for &i in graph.topological_order() {
        for dep in graph.dependencies(i) {
            let _ = writeln!(out, "    s{dep} --> s{i}");
        }
    }
    for (i, fill) in fills {
        let _ = writeln!(out, "    style s{i} fill:{fill}");
    }
    out
}

fn mermaid_escape(s: &str) -> String {
    s.replace('"', "#quot;")
        .replace('<', "#lt;")
        .replace('>', "#gt;")
}

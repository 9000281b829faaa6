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

/// SVG, laid out by layer (top to bottom; the steps of one layer run in parallel): one box per
/// step with its id, its operations and the overlay's note, filled with the overlay's colour; TCC
/// steps have round corners, optional steps a dashed border. A line too long for its box is
/// shortened with `…`; the box's tooltip (`<title>`) holds it whole. Every text is escaped, so a
/// step id or an error message cannot inject markup into a page that inlines the drawing.
pub fn svg_with(graph: &SagaGraph, overlay: &dyn Fn(usize) -> Option<Overlay>) -> String {
    const W: usize = 240;
    const H: usize = 66;
    const GAP_X: usize = 28;
    const GAP_Y: usize = 46;
    const MARGIN: usize = 16;
    const CHARS: usize = 36;
    let layers = graph.layers();
    let widest = layers.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let width = MARGIN * 2 + widest * W + (widest - 1) * GAP_X;
    let height = MARGIN * 2 + layers.len().max(1) * H + layers.len().saturating_sub(1) * GAP_Y;
    // Top-left corner of each step's box.
    let mut at = vec![(0usize, 0usize); graph.steps().len()];
    for (row, layer) in layers.iter().enumerate() {
        let used = layer.len() * W + layer.len().saturating_sub(1) * GAP_X;
        let left = (width - used) / 2;
        for (col, &i) in layer.iter().enumerate() {
            at[i] = (left + col * (W + GAP_X), MARGIN + row * (H + GAP_Y));
        }
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" class=\"saga-graph\" width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\" font-family=\"Helvetica, Arial, sans-serif\" font-size=\"12\">"
    );
    let _ = writeln!(
        out,
        "<title>{} v{}</title>\n<defs><marker id=\"arrow\" viewBox=\"0 0 10 10\" refX=\"10\" refY=\"5\" markerWidth=\"7\" markerHeight=\"7\" orient=\"auto-start-reverse\"><path d=\"M 0 0 L 10 5 L 0 10 z\" fill=\"#666\"/></marker></defs>",
        xml_escape(&graph.def().name),
        graph.def().version
    );
    for &i in graph.topological_order() {
        let (x, y) = at[i];
        for dep in graph.dependencies(i) {
            let (dx, dy) = at[dep];
            let (x1, y1) = (dx + W / 2, dy + H);
            let (x2, y2) = (x + W / 2, y);
            let mid = (y1 + y2) / 2;
            let _ = writeln!(
                out,
                "<path class=\"edge\" d=\"M {x1} {y1} C {x1} {mid}, {x2} {mid}, {x2} {y2}\" fill=\"none\" stroke=\"#666\" stroke-width=\"1.3\" marker-end=\"url(#arrow)\"/>"
            );
        }
    }
    for (i, step) in graph.steps().iter().enumerate() {
        let (x, y) = at[i];
        let o = overlay(i);
        let fill = o.as_ref().map_or("#ffffff", |o| o.fill);
        let rx = match step.kind {
            StepKind::Saga { .. } => 3,
            StepKind::Tcc { .. } => 16,
        };
        let dash = match step.on_failure {
            FailurePolicy::Continue => " stroke-dasharray=\"5 3\"",
            _ => "",
        };
        let ops = operations(step);
        let note = o.as_ref().map(|o| o.note.as_str()).unwrap_or("");
        let mut tip = format!("{} ({})\n{ops}", step.id.0, kind_tag(step).trim());
        if !note.is_empty() {
            tip.push('\n');
            tip.push_str(note);
        }
        let _ = writeln!(
            out,
            "<g class=\"step\" data-step=\"{}\"><title>{}</title><rect x=\"{x}\" y=\"{y}\" width=\"{W}\" height=\"{H}\" rx=\"{rx}\" fill=\"{fill}\" stroke=\"#444\"{dash}/>",
            xml_escape(&step.id.0),
            xml_escape(&tip)
        );
        let cx = x + W / 2;
        let lines = [
            (format!("{} · {}", step.id.0, kind_tag(step).trim()), "bold"),
            (ops, "normal"),
            (note.to_owned(), "normal"),
        ];
        for (n, (text, weight)) in lines.iter().enumerate() {
            if text.is_empty() {
                continue;
            }
            let _ = writeln!(
                out,
                "<text x=\"{cx}\" y=\"{}\" text-anchor=\"middle\" font-weight=\"{weight}\">{}</text>",
                y + 20 + n * 17,
                xml_escape(&shorten(text, CHARS))
            );
        }
        out.push_str("</g>\n");
    }
    out.push_str("</svg>\n");
    out
}

/// `s` cut to at most `max` characters, the cut marked with `…`.
fn shorten(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_owned();
    }
    let mut cut: String = s.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            // Control characters are not allowed in XML 1.0 text (tab and newline are).
            c if c.is_control() && c != '\n' && c != '\t' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO_LAYERS: &str = r#"
name: shop
version: 1
sequence_key: ${input.order_id}
input:
  order_id: string
steps:
  - id: pay
    service: payment
    action: charge
    compensation: refund
  - id: ship
    service: shipping
    depends_on: [pay]
    action: book
    compensation: cancel
  - id: mail
    service: mail
    depends_on: [pay]
    action: send
    compensation: recall
"#;

    #[test]
    fn svg_escapes_every_text_and_lays_out_by_layer() {
        let compiled = crate::compile(TWO_LAYERS);
        let graph = compiled
            .graph
            .unwrap_or_else(|| panic!("invalid: {:?}", compiled.diagnostics));
        let svg = svg_with(&graph, &|i| {
            (i == 1).then(|| Overlay {
                note: "✗ failed: <script>alert('x')</script> & more".into(),
                fill: "#ffd6cc",
            })
        });
        assert!(!svg.contains("<script>"), "{svg}");
        assert!(
            svg.contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; more"),
            "{svg}"
        );
        assert!(svg.contains("<title>shop v1</title>"), "{svg}");
        assert!(svg.contains("fill=\"#ffd6cc\""), "{svg}");
        // One box per step, one edge per dependency.
        assert_eq!(svg.matches("<g class=\"step\"").count(), 3);
        assert_eq!(svg.matches("class=\"edge\"").count(), 2);
        // `pay` alone on the first layer, `ship` and `mail` side by side below it.
        let y_of = |id: &str| -> usize {
            let at = svg.find(&format!("data-step=\"{id}\"")).expect(id);
            let rest = &svg[at..];
            let y = rest.find(" y=\"").expect("y") + 4;
            rest[y..y + rest[y..].find('"').expect("end")]
                .parse()
                .expect("number")
        };
        assert!(y_of("pay") < y_of("ship"));
        assert_eq!(y_of("ship"), y_of("mail"));
    }

    #[test]
    fn long_lines_are_cut_with_an_ellipsis() {
        assert_eq!(shorten("abcdef", 4), "abc…");
        assert_eq!(shorten("abc", 4), "abc");
        assert_eq!(shorten("äöüß", 4), "äöüß");
    }
}

//! `sagaflow validate` and `sagaflow graph`: commands that read saga definitions.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use sagaflow_dsl::{SourceFile, compile_file, render};

use crate::GraphFormat;

pub fn validate(files: &[PathBuf], json: bool) -> anyhow::Result<ExitCode> {
    let mut all_valid = true;
    let mut reports = Vec::new();
    let mut stdout = std::io::stdout().lock();
    for path in files {
        let source = match read(path) {
            Ok(s) => s,
            Err(err) => {
                all_valid = false;
                if json {
                    reports.push(serde_json::json!({
                        "file": path.display().to_string(),
                        "valid": false,
                        "errors": 1,
                        "warnings": 0,
                        "diagnostics": [{"severity": "error", "code": "unreadable", "message": format!("{err:#}")}],
                    }));
                } else {
                    writeln!(stdout, "error: {err:#}\n")?;
                }
                continue;
            }
        };
        let valid = source.compiled.is_valid();
        all_valid &= valid;
        if json {
            reports.push(source.report().to_json());
            continue;
        }
        write!(stdout, "{}", source.report().render())?;
        let errors = source.compiled.errors().count();
        let warnings = source.compiled.warnings().count();
        match &source.compiled.graph {
            Some(g) => writeln!(
                stdout,
                "ok  {}: {} v{}, {} steps in {} layers, {}{}",
                source.path,
                g.name(),
                g.def().version,
                g.steps().len(),
                g.layers().len(),
                g.content_hash(),
                plural(warnings, "warning", ", ")
            )?,
            None => writeln!(
                stdout,
                "FAIL {}: {}{}",
                source.path,
                plural(errors, "error", ""),
                plural(warnings, "warning", ", ")
            )?,
        }
    }
    if json {
        let doc = serde_json::json!({"valid": all_valid, "files": reports});
        writeln!(stdout, "{}", serde_json::to_string_pretty(&doc)?)?;
    }
    Ok(if all_valid {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

pub fn graph(path: &Path, format: GraphFormat) -> anyhow::Result<ExitCode> {
    let source = read(path)?;
    let Some(graph) = &source.compiled.graph else {
        eprint!("{}", source.report().render());
        eprintln!(
            "error: {} is not a valid saga; fix the errors above to draw it",
            source.path
        );
        return Ok(ExitCode::from(1));
    };
    let text = match format {
        GraphFormat::Text => render::text(graph, &|_| None),
        GraphFormat::Dot => render::dot(graph),
        GraphFormat::Mermaid => render::mermaid(graph),
        GraphFormat::Svg => render::svg_with(graph, &|_| None),
    };
    print!("{text}");
    Ok(ExitCode::SUCCESS)
}

fn read(path: &Path) -> anyhow::Result<SourceFile> {
    compile_file(path).with_context(|| format!("cannot read {}", path.display()))
}

/// "2 errors" / "1 warning" with a prefix, or nothing for zero (warnings) — errors always show.
fn plural(n: usize, word: &str, prefix: &str) -> String {
    match (n, word) {
        (0, "warning") => String::new(),
        (1, _) => format!("{prefix}1 {word}"),
        _ => format!("{prefix}{n} {word}s"),
    }
}

//! The `sagaflow` binary as a user runs it: exit codes, output formats, errors for bad input.

use std::path::PathBuf;
use std::process::{Command, Output};

fn sagaflow(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sagaflow"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run sagaflow")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn temp_file(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sagaflow-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write temp file");
    path
}

#[test]
fn validate_accepts_the_shipped_sagas() {
    let out = sagaflow(&["validate", "sagas/order.yaml", "sagas/order-refund.yaml"]);
    assert!(out.status.success(), "{}", stdout(&out));
    let text = stdout(&out);
    assert!(text.contains("ok  sagas/order.yaml: order-paid v1, 4 steps in 2 layers"));
    assert!(text.contains("ok  sagas/order-refund.yaml: order-refund v1"));
}

#[test]
fn validate_fails_with_located_errors_and_exit_1() {
    let bad = temp_file(
        "bad.yaml",
        "name: bad\nversion: 1\nsequence_key: ${input.id}\ninput: {id: string}\nsteps:\n  - id: a\n    service: s\n    action: do\n    params: {x: \"${input.id}\"}\n",
    );
    let bad = bad.to_str().expect("utf-8 path");
    let out = sagaflow(&["validate", "sagas/order.yaml", bad]);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    assert!(text.contains("error[missing-compensation]"), "{text}");
    assert!(text.contains(&format!("{bad}:8:5")), "{text}");
    assert!(text.contains(&format!("FAIL {bad}: 1 error")), "{text}");
}

#[test]
fn validate_json_is_machine_readable() {
    let bad = temp_file(
        "cycle.yaml",
        "name: c\nversion: 1\nsequence_key: k\nsteps:\n  - {id: a, service: s, action: x, compensation: y, depends_on: [a]}\n",
    );
    let out = sagaflow(&[
        "validate",
        "--format",
        "json",
        "sagas/order.yaml",
        bad.to_str().expect("utf-8 path"),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(doc["valid"], false);
    assert_eq!(doc["files"][0]["valid"], true);
    let d = &doc["files"][1]["diagnostics"][0];
    assert_eq!(d["code"], "cycle");
    assert_eq!(d["span"]["line"], 5);
}

#[test]
fn validate_reports_unreadable_files() {
    let out = sagaflow(&["validate", "no/such/file.yaml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).contains("cannot read no/such/file.yaml"));
}

#[test]
fn graph_draws_payment_before_three_parallel_branches() {
    let out = sagaflow(&["graph", "sagas/order.yaml"]);
    assert!(out.status.success());
    let text = stdout(&out);
    let payment = text.find("│  payment").expect("payment drawn");
    let layer2 = text
        .find("layer 2  (3 in parallel)")
        .expect("parallel layer");
    assert!(payment < layer2, "{text}");
    for branch in ["coupon", "points", "gmv"] {
        let at = text.find(&format!("│  {branch}")).expect("branch drawn");
        assert!(at > layer2, "{branch} should be in layer 2:\n{text}");
    }
    assert!(text.contains("1. coupon.unfreeze, points.revoke, gmv.subtract  (in parallel)"));
    assert!(text.contains("2. payment.refund"));
}

#[test]
fn graph_renders_dot_and_mermaid() {
    let dot = stdout(&sagaflow(&["graph", "sagas/order.yaml", "--format", "dot"]));
    assert!(dot.starts_with("digraph \"order-paid\""));
    assert_eq!(dot.matches(" -> ").count(), 3);
    let mermaid = stdout(&sagaflow(&[
        "graph",
        "sagas/order.yaml",
        "--format",
        "mermaid",
    ]));
    assert!(mermaid.starts_with("flowchart TD"));
    assert_eq!(mermaid.matches(" --> ").count(), 3);
}

#[test]
fn graph_of_an_invalid_saga_explains_why_and_exits_1() {
    let bad = temp_file("empty.yaml", "# nothing\n");
    let out = sagaflow(&["graph", bad.to_str().expect("utf-8 path")]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("error[empty-saga]"), "{err}");
}

#[test]
fn a_database_url_of_another_kind_is_refused_naming_the_supported_ones() {
    let dir = std::env::temp_dir().join(format!("sagaflow-cli-url-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    for url in ["mysql://app:hunter2@db/shop", "not a url", "redis://h:6379"] {
        for args in [
            vec!["status", "x"],
            vec!["list"],
            vec!["migrate"],
            vec!["start", "order-paid", "--input", "{}"],
            vec!["engine"],
            vec!["dev", "--orders", "1"],
        ] {
            let out = Command::new(env!("CARGO_BIN_EXE_sagaflow"))
                .args(&args)
                .args(["--database-url", url])
                .current_dir(&dir)
                .output()
                .expect("run sagaflow");
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{args:?} {url}: {err}");
            assert!(
                err.contains("is not a database URL sagaflow can use")
                    && err.contains("postgres://")
                    && err.contains("sqlite://FILE"),
                "{args:?} {url}: {err}"
            );
            assert!(!err.contains("hunter2"), "{err}");
        }
    }
    // Nothing was created under any of those names.
    let left: Vec<_> = std::fs::read_dir(&dir).expect("dir").collect();
    assert!(left.is_empty(), "{left:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn reading_commands_do_not_create_a_database_for_a_mistyped_path() {
    let dir = std::env::temp_dir().join(format!("sagaflow-cli-typo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let typo = dir.join("sagaflw.db");
    let typo = typo.to_str().expect("utf-8 path");
    for args in [
        vec!["status", "some-id"],
        vec!["list"],
        vec!["retry", "some-id"],
        vec!["abort", "some-id"],
        vec!["release-key", "some-id", "--reason", "x"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_sagaflow"))
            .args(&args)
            .args(["--db", typo])
            .output()
            .expect("run sagaflow");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains(&format!("no SQLite database at {typo}")),
            "{args:?}: {err}"
        );
        assert!(
            !std::path::Path::new(typo).exists(),
            "{args:?} created {typo}"
        );
    }
    // `start` writes, so it creates the file (the documented first run).
    let out = Command::new(env!("CARGO_BIN_EXE_sagaflow"))
        .args(["start", "sagas/order.yaml", "--input", "{}", "--db", typo])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run sagaflow");
    assert!(std::path::Path::new(typo).exists(), "{out:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn completions_for_each_shell_name_every_command() {
    for shell in ["bash", "zsh", "fish"] {
        let out = sagaflow(&["completions", shell]);
        assert!(out.status.success(), "{shell}: {:?}", out);
        let script = stdout(&out);
        for word in ["dead-letters", "release-key", "--database-url", "--server"] {
            assert!(script.contains(word), "{shell} completion lacks {word}");
        }
    }
    let out = sagaflow(&["completions", "tcsh"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bash") && err.contains("zsh") && err.contains("fish"),
        "{err}"
    );
}

//! `sagaflow start`, `status`, `list`, `retry` and `abort` as an operator runs them, against a
//! database per test (a SQLite file, and a PostgreSQL database when one is reachable) that
//! `sagaflow dev` fills.

mod support;

use std::process::{Command, Output};

use serde_json::Value;
use support::{Backend, TestDb, fresh_db};

/// A fresh database for one test, and the binary run against it.
struct Db {
    db: TestDb,
}

impl Db {
    /// `None` when PostgreSQL is unreachable outside CI (the test is skipped).
    fn new(backend: Backend, test: &str) -> Option<Db> {
        let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
        let db = rt.block_on(fresh_db(backend, &format!("ops_{test}")))?;
        Some(Db { db })
    }

    /// Runs `sagaflow ARGS --database-url URL` from the repository root (for
    /// `sagas/order.yaml`).
    fn run(&self, args: &[&str]) -> Output {
        let out = Command::new(env!("CARGO_BIN_EXE_sagaflow"))
            .args(args)
            .args(["--database-url", &self.db.url])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("run sagaflow");
        assert!(
            !stderr(&out).contains("panicked"),
            "sagaflow {args:?} panicked:\n{}",
            stderr(&out)
        );
        out
    }

    /// Runs a command that must succeed; returns its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "sagaflow {args:?} failed:\n{}{}",
            stdout(&out),
            stderr(&out)
        );
        stdout(&out)
    }

    /// Runs a command that must fail with exit code 1; returns its stderr.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert_eq!(
            out.status.code(),
            Some(1),
            "sagaflow {args:?} should exit 1:\n{}{}",
            stdout(&out),
            stderr(&out)
        );
        stderr(&out)
    }

    fn json(&self, args: &[&str]) -> Value {
        let text = self.ok(args);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{args:?}: {e}:\n{text}"))
    }

    /// Ids of the sagas `list` shows with these filters, newest first.
    fn ids(&self, filters: &[&str]) -> Vec<String> {
        let mut args = vec!["list", "--format", "json"];
        args.extend_from_slice(filters);
        self.json(&args)["sagas"]
            .as_array()
            .expect("sagas")
            .iter()
            .map(|s| s["id"].as_str().expect("id").to_owned())
            .collect()
    }
}

/// Each test below runs once per backend: `sqlite::NAME` and `postgres::NAME`.
macro_rules! on_each_backend {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $(#[test]
            fn $test() {
                super::$test(super::Backend::Sqlite)
            })*
        }
        mod postgres {
            $(#[test]
            fn $test() {
                super::$test(super::Backend::Postgres)
            })*
        }
    };
}

on_each_backend!(
    list_and_status_of_sagas_that_dev_ran,
    list_filters_and_pages,
    start_then_abort_compensates_once_an_engine_delivers,
    a_queued_saga_aborts_at_once_and_idempotency_keys_start_once,
    operator_actions_on_a_completed_saga_are_refused_with_the_reason,
    bad_requests_exit_1_with_one_line_errors,
);

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn order(order_id: &str) -> String {
    serde_json::json!({
        "order_id": order_id,
        "user_id": "u-ops",
        "amount": "12.50",
        "coupon_id": "c-ops",
        "points": 12,
        "campaign_id": "spring-sale",
    })
    .to_string()
}

fn list_and_status_of_sagas_that_dev_ran(backend: Backend) {
    let Some(db) = Db::new(backend, "list_status") else {
        return;
    };
    db.ok(&["dev", "--orders", "5"]);

    let page = db.json(&["list", "--format", "json"]);
    let sagas = page["sagas"].as_array().expect("sagas");
    assert_eq!(sagas.len(), 5, "{page}");
    assert!(sagas.iter().all(|s| s["state"] == "completed"), "{page}");
    assert_eq!(page["next"], Value::Null);

    let table = db.ok(&["list"]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 6, "a header and 5 rows:\n{table}");
    assert!(lines[0].starts_with("ID"), "{table}");

    let id = sagas[0]["id"].as_str().expect("id");
    let text = db.ok(&["status", id]);
    for needle in [
        id,
        "state     completed",
        "order-paid v1",
        "│  payment",
        "│  coupon",
        "│  points",
        "│  gmv",
        "● succeeded (1 attempt)",
        "● confirmed",
        "timeline",
        "completed",
    ] {
        assert!(text.contains(needle), "status lacks {needle:?}:\n{text}");
    }

    let detail = db.json(&["status", id, "--format", "json"]);
    assert_eq!(detail["id"], id);
    assert_eq!(detail["state"], "completed");
    let steps = detail["steps"].as_array().expect("steps");
    let ids: Vec<&str> = steps.iter().filter_map(|s| s["id"].as_str()).collect();
    assert_eq!(ids, ["payment", "coupon", "points", "gmv"]);
    assert_eq!(steps[0]["status"], "succeeded");
    assert_eq!(steps[0]["attempts"], 1);
    let timeline = detail["timeline"].as_array().expect("timeline");
    assert_eq!(timeline[0]["kind"], "created");
    assert_eq!(timeline.last().expect("rows")["kind"], "completed");

    // The saga's graph with its states, in each format.
    let text = db.ok(&["graph", "--saga", id]);
    assert!(
        text.contains("│  payment") && text.contains("● succeeded (1 attempt)"),
        "{text}"
    );
    let dot = db.ok(&["graph", "--saga", id, "--format", "dot"]);
    assert!(dot.starts_with("digraph \"order-paid\""), "{dot}");
    assert!(
        dot.contains("fillcolor=\"#c8f2c2\"") && dot.contains("● confirmed"),
        "{dot}"
    );
    let mermaid = db.ok(&["graph", "--saga", id, "--format", "mermaid"]);
    assert!(mermaid.contains("style s0 fill:#c8f2c2"), "{mermaid}");
    assert!(
        db.fails(&["graph", "--saga", "no-such-id"])
            .contains("no saga with id no-such-id")
    );
    // A final saga: --watch prints it once and ends.
    let watched = db.ok(&["status", id, "--watch", "--interval", "100ms"]);
    assert_eq!(
        watched.matches("state     completed").count(),
        1,
        "{watched}"
    );
}

fn list_filters_and_pages(backend: Backend) {
    let Some(db) = Db::new(backend, "list_pages") else {
        return;
    };
    db.ok(&["dev", "--orders", "5"]);
    let all = db.ids(&[]);
    assert_eq!(all.len(), 5);

    // Pages of two, newest first, cover every saga once.
    let mut paged = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut args = vec!["list", "--format", "json", "--limit", "2"];
        if let Some(a) = &after {
            args.extend_from_slice(&["--after", a]);
        }
        let page = db.json(&args);
        for s in page["sagas"].as_array().expect("sagas") {
            paged.push(s["id"].as_str().expect("id").to_owned());
        }
        match page["next"].as_str() {
            Some(next) => after = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(paged, all);

    assert_eq!(db.ids(&["--state", "completed"]).len(), 5);
    assert!(db.ids(&["--state", "failed"]).is_empty());
    let detail = db.json(&["status", &all[2], "--format", "json"]);
    let key = detail["sequence_key"].as_str().expect("key");
    assert_eq!(db.ids(&["--key", key]), [all[2].clone()]);
    assert_eq!(
        db.ok(&["list", "--key", "no-such-order"]).trim(),
        "no sagas"
    );
}

fn start_then_abort_compensates_once_an_engine_delivers(backend: Backend) {
    let Some(db) = Db::new(backend, "start_abort") else {
        return;
    };
    // A fresh file: start creates the tables and registers the definition.
    let out = db.run(&["start", "sagas/order.yaml", "--input", &order("o-ops-1")]);
    assert!(out.status.success(), "{}", stderr(&out));
    let id = stdout(&out).trim().to_owned();
    uuid::Uuid::parse_str(&id).unwrap_or_else(|e| panic!("`{id}` is not an id: {e}"));
    assert!(stderr(&out).contains("is running"), "{}", stderr(&out));

    let text = db.ok(&["status", &id]);
    assert!(text.contains("state     running"), "{text}");
    assert!(text.contains("… action running (attempt 1)"), "{text}");
    assert!(text.contains("· pending"), "{text}");

    let out = db.ok(&["abort", &id, "--reason", "customer cancelled"]);
    assert!(
        out.contains("is compensating — aborted by operator: customer cancelled"),
        "{out}"
    );
    assert!(
        out.contains("an engine running on this database delivers"),
        "{out}"
    );

    // An engine on the database delivers the compensation.
    db.ok(&["dev", "--orders", "0"]);
    let detail = db.json(&["status", &id, "--format", "json"]);
    assert_eq!(detail["state"], "compensated", "{detail}");
    assert_eq!(detail["reason"], "aborted by operator: customer cancelled");
    let kinds: Vec<&str> = detail["timeline"]
        .as_array()
        .expect("timeline")
        .iter()
        .filter_map(|r| r["kind"].as_str())
        .collect();
    assert!(kinds.contains(&"aborted"), "{kinds:?}");
}

fn a_queued_saga_aborts_at_once_and_idempotency_keys_start_once(backend: Backend) {
    let Some(db) = Db::new(backend, "queued") else {
        return;
    };
    let first = db.json(&[
        "start",
        "sagas/order.yaml",
        "--input",
        &order("o-ops-2"),
        "--idempotency-key",
        "k-1",
        "--format",
        "json",
    ]);
    assert_eq!(first["existing"], false);
    let again = db.json(&[
        "start",
        "order-paid",
        "--input",
        &order("o-ops-2"),
        "--idempotency-key",
        "k-1",
        "--format",
        "json",
    ]);
    assert_eq!(again["id"], first["id"]);
    assert_eq!(again["existing"], true);

    // Same order, no key: a second saga that waits behind the first (by definition name).
    let second = db.ok(&["start", "order-paid", "--input", &order("o-ops-2")]);
    let second = second.trim();
    assert!(db.ok(&["status", second]).contains("state     queued"));
    assert_eq!(db.ids(&["--state", "queued"]), [second.to_owned()]);

    let out = db.ok(&["abort", second]);
    assert!(
        out.contains("is compensated — aborted before it started"),
        "{out}"
    );
    assert!(!out.contains("outbox"), "nothing to deliver:\n{out}");
}

fn operator_actions_on_a_completed_saga_are_refused_with_the_reason(backend: Backend) {
    let Some(db) = Db::new(backend, "refused") else {
        return;
    };
    db.ok(&["dev", "--orders", "1"]);
    let id = db.ids(&[]).remove(0);

    let err = db.fails(&["retry", &id]);
    assert!(
        err.contains("retry refused: the saga is completed, not failed"),
        "{err}"
    );
    let err = db.fails(&["abort", &id]);
    assert!(
        err.contains("abort refused: the saga is completed"),
        "{err}"
    );
    assert!(db.ok(&["status", &id]).contains("state     completed"));
}

fn bad_requests_exit_1_with_one_line_errors(backend: Backend) {
    let Some(db) = Db::new(backend, "bad") else {
        return;
    };
    let cases: &[(&[&str], &str)] = &[
        (
            &["start", "sagas/order.yaml", "--input", "{not json"],
            "--input is not valid JSON",
        ),
        (
            &["start", "sagas/order.yaml", "--input", r#"{"order_id": 1}"#],
            "invalid input for saga `order-paid`: `amount` is required",
        ),
        (
            &["start", "no-such-saga", "--input", "{}"],
            "no saga definition named `no-such-saga`",
        ),
        (
            &["start", "sagas/missing.yaml"],
            "cannot read sagas/missing.yaml",
        ),
        (
            &[
                "start",
                "sagas/order.yaml",
                "--input",
                "@/no/such/input.json",
            ],
            "cannot read the input file /no/such/input.json",
        ),
        (&["status", "no-such-id"], "no saga with id no-such-id"),
        (&["retry", "no-such-id"], "no saga with id no-such-id"),
        (&["abort", "no-such-id"], "no saga with id no-such-id"),
        (
            &["list", "--state", "done"],
            "unknown state `done`; the states are queued, running, compensating, completed, compensated, failed",
        ),
        (&["list", "--after", "garbage"], "is not a list cursor"),
    ];
    for (args, expected) in cases {
        let err = db.fails(args);
        assert!(
            err.starts_with("error: ") && err.contains(expected),
            "sagaflow {args:?}: expected {expected:?} in:\n{err}"
        );
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    }
}

#[test]
fn db_flag_and_environment_choose_the_database() {
    let Some(db) = Db::new(Backend::Sqlite, "db_flag") else {
        return;
    };
    db.ok(&["dev", "--orders", "2"]);
    let count = |extra: &[&str], env: Option<&str>| -> usize {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sagaflow"));
        cmd.args(["list", "--format", "json"])
            .args(extra)
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        match env {
            Some(url) => cmd.env("SAGAFLOW_DATABASE_URL", url),
            None => cmd.env_remove("SAGAFLOW_DATABASE_URL"),
        };
        let out = cmd.output().expect("run sagaflow");
        assert!(out.status.success(), "{}", stderr(&out));
        let page: Value = serde_json::from_slice(&out.stdout).expect("json");
        page["sagas"].as_array().expect("sagas").len()
    };
    // The SQLite file as --db, and as SAGAFLOW_DATABASE_URL (which wins over --db's default).
    let by_flag = count(&["--db", &db.db.url], None);
    let by_env = count(&[], Some(&db.db.url));
    assert_eq!((by_flag, by_env), (2, 2));
}

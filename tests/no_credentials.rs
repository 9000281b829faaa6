//! No credential is ever printed: a password planted in every address (the database URL, the
//! broker URL, the `--server` URL), given as a flag and through the environment, appears in no
//! output of any command — help texts, `migrate`, `dev`, operator commands, and the errors of
//! an engine and a worker that the broker refuses.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{Backend, fresh_db};

/// The planted password: unlikely to appear anywhere by chance.
const SECRET: &str = "Pw4Leak9xQ";

/// A database URL with the password added (the local PostgreSQL trusts, so it still works).
fn with_password(url: &str) -> String {
    url.replacen(
        "postgres://postgres@",
        &format!("postgres://postgres:{SECRET}@"),
        1,
    )
}

/// Runs sagaflow with `env` set; a process still running after `limit` is killed (an engine
/// that keeps retrying a broker that refuses it). Returns everything it printed.
fn run(args: &[&str], env: &[(&str, String)], limit: Duration) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sagaflow"))
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("SAGAFLOW_LOG", "info")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run sagaflow");
    let started = Instant::now();
    while child.try_wait().expect("wait").is_none() && started.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let out = child.wait_with_output().expect("output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !text.contains("panicked"),
        "sagaflow {args:?} panicked:\n{text}"
    );
    text
}

const COMMANDS: &[&str] = &[
    "dev",
    "engine",
    "worker",
    "bench",
    "validate",
    "graph",
    "start",
    "status",
    "list",
    "retry",
    "abort",
    "release-key",
    "skip",
    "pause",
    "resume",
    "dead-letters",
    "completions",
    "migrate",
];

#[test]
fn no_command_prints_a_password() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let Some(db) = rt.block_on(fresh_db(Backend::Postgres, "no_credentials")) else {
        return;
    };
    let db_url = with_password(&db.url);
    assert!(db_url.contains(SECRET), "{db_url}");
    let amqp_url = format!("amqp://guest:{SECRET}@127.0.0.1:5672/%2f");
    let server_url = format!("http://ops:{SECRET}@127.0.0.1:9");
    let env = [
        ("SAGAFLOW_DATABASE_URL", db_url.clone()),
        ("SAGAFLOW_AMQP_URL", amqp_url.clone()),
    ];
    let quick = Duration::from_secs(30);
    let mut outputs: Vec<(String, String)> = Vec::new();
    let mut check = |what: String, text: String| {
        assert!(
            !text.contains(SECRET),
            "`{what}` printed the password:\n{text}"
        );
        outputs.push((what, text));
    };

    // Help texts, with the addresses in the environment (clap shows `[env: …]` values).
    let help = run(&["--help"], &env, quick);
    // Every command is in the list (a new one is checked too).
    let listed: Vec<&str> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .collect();
    assert!(listed.len() > 10, "{help}");
    for c in &listed {
        assert!(COMMANDS.contains(c), "`{c}` is not checked here");
    }
    check("--help".into(), help);
    for cmd in COMMANDS {
        check(format!("{cmd} --help"), run(&[cmd, "--help"], &env, quick));
    }
    let with_server = [
        ("SAGAFLOW_DATABASE_URL", db_url.clone()),
        ("SAGAFLOW_SERVER", server_url.clone()),
    ];
    check(
        "status --help (server in env)".into(),
        run(&["status", "--help"], &with_server, quick),
    );

    // Commands that print the database's address, from the environment and from the flag.
    check("migrate".into(), run(&["migrate"], &env, quick));
    check(
        "migrate --database-url".into(),
        run(&["migrate", "--database-url", &db_url], &[], quick),
    );
    let unreachable = format!("postgres://postgres:{SECRET}@127.0.0.1:1/nothing");
    check(
        "migrate (unreachable database)".into(),
        run(&["migrate", "--database-url", &unreachable], &[], quick),
    );
    check("list".into(), run(&["list"], &env, quick));
    check(
        "status unknown".into(),
        run(&["status", "no-such-saga"], &env, quick),
    );
    check(
        "dev --orders 1".into(),
        run(&["dev", "--orders", "1"], &env, Duration::from_secs(60)),
    );

    // The server, unreachable, named in the flag and in the environment.
    check(
        "status --server".into(),
        run(&["status", "x", "--server", &server_url], &[], quick),
    );
    check(
        "list (server in env)".into(),
        run(&["list"], &with_server, quick),
    );
    check(
        "retry --server".into(),
        run(&["retry", "x", "--server", &server_url], &[], quick),
    );
    check(
        "dead-letters list --server".into(),
        run(
            &["dead-letters", "list", "--server", &server_url],
            &[],
            quick,
        ),
    );
    check(
        "dead-letters list".into(),
        run(&["dead-letters", "list"], &env, quick),
    );
    check(
        "pause (server in env)".into(),
        run(&["pause", "x"], &with_server, quick),
    );

    // An engine and a worker that the broker refuses (a wrong password): what they log.
    let refused = Duration::from_secs(6);
    check(
        "engine".into(),
        run(&["engine", "--http", "127.0.0.1:0"], &env, refused),
    );
    check(
        "worker payment".into(),
        run(
            &["worker", "payment", "--amqp-url", &amqp_url],
            &env,
            refused,
        ),
    );

    // The checks above must have seen the addresses printed at all (redacted), or they prove
    // nothing.
    let shown = |what: &str| &outputs.iter().find(|(w, _)| w == what).expect("ran it").1;
    assert!(
        shown("migrate").contains("postgres://postgres:***@127.0.0.1:5432/"),
        "{}",
        shown("migrate")
    );
    assert!(
        shown("dev --orders 1").contains("postgres://postgres:***@"),
        "{}",
        shown("dev --orders 1")
    );
    assert!(
        shown("status --server").contains("http://ops:***@127.0.0.1:9"),
        "{}",
        shown("status --server")
    );
    assert!(
        shown("engine").contains("amqp://guest:***@127.0.0.1:5672"),
        "{}",
        shown("engine")
    );
    assert!(
        shown("engine --help").contains("SAGAFLOW_DATABASE_URL"),
        "{}",
        shown("engine --help")
    );
}

//! `sagaflow bench` end to end over the real RabbitMQ and PostgreSQL: it launches an engine and
//! the four workers, sends one warm-up order through every service before its clock starts
//! (so the processes' start-up is not the first sagas' latency), and counts only the run's own
//! sagas — while the invariant check covers the warm-up order too — and times each exchange in
//! its two halves.

mod support;

use std::process::Command;

use sagaflow_engine::transport::amqp::{AmqpConfig, AmqpTransport};
use support::deploy::amqp_url;
use support::{Backend, fresh_db};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_warms_up_then_counts_only_its_run() {
    let Some(db) = fresh_db(Backend::Postgres, "bench_cli").await else {
        return;
    };
    // Is the broker there? (A prefix of its own: connecting declares the prefix's topology
    // and dead-letter queues, removed again here.)
    let mut probe = AmqpConfig::new(&amqp_url());
    probe.prefix = format!(
        "e2e-bench-cli-probe-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    match AmqpTransport::connect(probe).await {
        Ok(t) => {
            let _ = t.delete_topology(&[]).await;
            t.close().await;
        }
        Err(e) if std::env::var("CI").as_deref() != Ok("true") => {
            eprintln!("skipping: RabbitMQ is not reachable ({e})");
            return;
        }
        Err(e) => panic!("RabbitMQ is not reachable under CI=true: {e}"),
    }
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sagaflow"));
    cmd.args([
        "bench",
        "--orders",
        "12",
        "--database-url",
        &db.url,
        "--amqp-url",
        &amqp_url(),
        "--stall-timeout",
        "60s",
    ]);
    let out = tokio::task::spawn_blocking(move || cmd.output().expect("run sagaflow bench"))
        .await
        .expect("join");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let line = |head: &str| {
        stdout
            .lines()
            .find(|l| l.trim_start().starts_with(head))
            .unwrap_or_else(|| panic!("no `{head}` line in:\n{stdout}"))
            .to_owned()
    };
    let warm = line("warm-up:");
    assert!(
        warm.contains("before the clock") && warm.contains("ms after the processes were launched"),
        "{warm}"
    );
    // The run's twelve, not the warm-up's thirteenth.
    assert_eq!(line("sagas:").trim(), "sagas:           12 completed");
    assert!(
        line("throughput:").contains("(12 sagas final in"),
        "{stdout}"
    );
    // Each exchange of the order saga timed in its two halves (the engine's history, the
    // workers' barrier rows).
    line("exchanges:");
    for exchange in [
        "payment action:",
        "coupon try:",
        "points action:",
        "gmv action:",
        "coupon confirm:",
    ] {
        let l = line(exchange);
        assert!(l.contains(" → ") && l.contains(" commands)"), "{l}");
    }
    // The invariants check every order the run's services hold: the warm-up's too.
    let invariants = line("invariants:");
    assert!(
        invariants.contains("OK") && invariants.contains("(13 sagas checked)"),
        "{invariants}"
    );
}

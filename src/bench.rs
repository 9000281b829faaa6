//! `sagaflow bench`: N orders through a deployment over RabbitMQ and PostgreSQL — engine and
//! worker *processes* — with a progress bar, a summary (sagas/s, p50/p99 latency) and the
//! invariant check of `sagaflow dev`.
//!
//! By default it launches the deployment itself (`--engines` engine processes and one process
//! per service, the fault flags passed to the workers) on a fresh queue prefix, and stops them
//! with SIGTERM at the end. With `--external` it drives a deployment that is already running
//! (started with the same `--prefix` and `--partitions`); faults are then the workers' own flags.
//!
//! The bench starts sagas in the shared database and relays their first commands itself (a
//! relay among the engines' relays: rows are claimed with SKIP LOCKED), so a start is on the
//! broker within milliseconds instead of waiting for an engine's idle poll.

use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use sagaflow_engine::Engine;
use sagaflow_engine::store::{ENGINE_MIGRATIONS, Store};
use sagaflow_engine::transport::{REPLY_QUEUE, START_QUEUE, Transport, command_queue};
use sagaflow_workers::services;
use sqlx::Row;
use tokio::sync::watch;

use crate::dev::{
    fmt_counts, pick, report_invariants, sample_orders, seed, service_rate, summarize,
};
use crate::serve::AmqpArgs;

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// The deployment's PostgreSQL database.
    #[arg(long, env = "SAGAFLOW_DATABASE_URL", value_name = "URL")]
    pub database_url: String,
    #[command(flatten)]
    pub amqp: AmqpArgs,
    /// How many orders.
    #[arg(long, default_value_t = 1000)]
    pub orders: u64,
    /// Sagas in flight at once.
    #[arg(long, default_value_t = 256)]
    pub concurrency: u64,
    /// Business failures of a service's forward operations, e.g. `--fail coupon=0.1`.
    #[arg(long, value_name = "SERVICE=RATE", value_parser = service_rate)]
    pub fail: Vec<(String, f64)>,
    /// Transient failures of a service (retried with backoff), e.g. `--flaky points=0.2`.
    #[arg(long, value_name = "SERVICE=RATE", value_parser = service_rate)]
    pub flaky: Vec<(String, f64)>,
    /// Slow answers of a service (longer than the step timeout), e.g. `--slow gmv=0.01`.
    #[arg(long, value_name = "SERVICE=RATE", value_parser = service_rate)]
    pub slow: Vec<(String, f64)>,
    /// Engine processes to launch.
    #[arg(long, default_value_t = 1)]
    pub engines: u32,
    /// Kill (SIGKILL) and restart one worker process at this interval, e.g. `5s`.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub kill_every: Option<Duration>,
    /// Drive an already running deployment instead of launching one.
    #[arg(long, conflicts_with_all = ["fail", "flaky", "slow", "engines", "kill_every"])]
    pub external: bool,
    /// Give up waiting when no saga finishes for this long.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub stall_timeout: Duration,
    /// Keep the launched processes' logs here (default: discarded).
    #[arg(long, value_name = "DIR")]
    pub logs: Option<std::path::PathBuf>,
}

/// The processes this bench launched.
struct Deployment {
    children: Vec<(String, Vec<String>, Child)>,
    logs: Option<std::path::PathBuf>,
}

impl Deployment {
    fn spawn(&mut self, name: &str, args: Vec<String>) -> anyhow::Result<()> {
        let exe = std::env::current_exe().context("cannot find the sagaflow executable")?;
        let (out, err) = match &self.logs {
            Some(dir) => {
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dir.join(format!("{name}.log")))?;
                (Stdio::from(f.try_clone()?), Stdio::from(f))
            }
            None => (Stdio::null(), Stdio::null()),
        };
        let child = Command::new(exe)
            .args(&args)
            .env("SAGAFLOW_LOG", "warn")
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("cannot launch {name}"))?;
        self.children.push((name.to_owned(), args, child));
        Ok(())
    }

    /// SIGKILL one worker and start it again (redelivery + barrier must make it harmless).
    fn kill_and_restart_a_worker(&mut self, round: usize) -> anyhow::Result<String> {
        let workers: Vec<usize> = (0..self.children.len())
            .filter(|i| self.children[*i].0.starts_with("worker"))
            .collect();
        let Some(&i) = workers.get(round % workers.len().max(1)) else {
            bail!("no worker to kill");
        };
        let (name, args, mut child) = self.children.remove(i);
        child.kill()?;
        child.wait()?;
        self.spawn(&name, args)?;
        Ok(name)
    }

    fn all_alive(&mut self) -> anyhow::Result<()> {
        for (name, _, child) in &mut self.children {
            if let Some(status) = child.try_wait()? {
                bail!("{name} exited early ({status}); run with --logs DIR to see why");
            }
        }
        Ok(())
    }

    /// SIGTERM everyone (graceful), then wait.
    fn stop(&mut self) {
        for (_, _, child) in &self.children {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
        }
        for (_, _, child) in &mut self.children {
            let _ = child.wait();
        }
        self.children.clear();
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        for (_, _, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub async fn run(mut args: BenchArgs) -> anyhow::Result<ExitCode> {
    let run_id = uuid::Uuid::now_v7().simple().to_string()[..12].to_owned();
    // A launched deployment gets queues of its own, removed at the end; queues under a prefix
    // the user named are never deleted.
    let own_prefix = !args.external && args.amqp.prefix == "sagaflow";
    if own_prefix {
        args.amqp.prefix = format!("sagaflow-bench-{run_id}");
    }
    let store = Store::connect(&args.database_url, 16).await?;
    store
        .migrate(&[ENGINE_MIGRATIONS, services::MIGRATIONS])
        .await?;
    let transport = args.amqp.connect("bench").await?;
    let engine = Engine::new(store.clone(), transport.clone() as Arc<dyn Transport>);
    crate::serve::register_sagas(&engine, &[]).await?;
    let graph = engine.definition_by_name("order-paid").await?;
    let orders = sample_orders(&run_id, args.orders);
    seed(&store, &orders).await?;

    let mut deployment = Deployment {
        children: Vec::new(),
        logs: args.logs.clone(),
    };
    if let Some(dir) = &deployment.logs {
        std::fs::create_dir_all(dir)?;
    }
    if !args.external {
        let common = |cmd: &[&str]| {
            let mut v: Vec<String> = cmd.iter().map(|s| (*s).to_owned()).collect();
            v.extend([
                "--database-url".into(),
                args.database_url.clone(),
                "--amqp-url".into(),
                args.amqp.amqp_url.clone(),
                "--partitions".into(),
                args.amqp.partitions.to_string(),
                "--queue-type".into(),
                args.amqp.queue_type.as_str().into(),
                "--prefix".into(),
                args.amqp.prefix.clone(),
            ]);
            v
        };
        for i in 0..args.engines {
            let mut a = common(&["engine"]);
            a.extend(["--http".into(), "127.0.0.1:0".into()]);
            deployment.spawn(&format!("engine-{i}"), a)?;
        }
        for service in services::SERVICES {
            let mut a = common(&["worker", service]);
            for (flag, list) in [
                ("--fail", &args.fail),
                ("--flaky", &args.flaky),
                ("--slow", &args.slow),
            ] {
                let r = pick(list, service);
                if r > 0.0 {
                    a.extend([flag.to_owned(), r.to_string()]);
                }
            }
            deployment.spawn(&format!("worker-{service}"), a)?;
        }
    }

    // This process relays the outbox too (its starts' first commands, promptly).
    let (stop, stopped) = watch::channel(false);
    let relay = tokio::spawn(relay(engine.clone(), stopped));

    let bar = ProgressBar::new(args.orders);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} sagas final ({per_sec}) {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let run_started_ms = sagaflow_engine::store::now_ms() - 1;
    let started_at = Instant::now();
    let mut next = 0usize;
    let mut last_final = 0u64;
    let mut last_progress = Instant::now();
    let mut kills = 0usize;
    let mut last_kill = Instant::now();
    let outcome = loop {
        if !args.external {
            deployment.all_alive()?;
        }
        let (finished, unfinished) = count(&store, run_started_ms).await?;
        bar.set_position(finished);
        if finished != last_final {
            last_final = finished;
            last_progress = Instant::now();
        }
        if finished == args.orders {
            break Ok(());
        }
        let room = args.concurrency.saturating_sub(unfinished) as usize;
        for order in orders.iter().skip(next).take(room) {
            engine
                .start(&graph, order.clone(), None)
                .await
                .context("starting an order")?;
            next += 1;
        }
        if let Some(every) = args.kill_every
            && last_kill.elapsed() >= every
        {
            let name = deployment.kill_and_restart_a_worker(kills)?;
            kills += 1;
            last_kill = Instant::now();
            bar.set_message(format!("(killed {name}; {kills} kills)"));
        }
        if last_progress.elapsed() > args.stall_timeout {
            break Err(anyhow::anyhow!(
                "no saga finished for {}; {unfinished} are unfinished",
                humantime::format_duration(args.stall_timeout)
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let elapsed = started_at.elapsed();
    bar.finish_and_clear();
    let _ = stop.send(true);
    let _ = relay.await;
    deployment.stop();
    if own_prefix {
        let logicals: Vec<String> = services::SERVICES
            .iter()
            .map(|s| command_queue(s))
            .chain([REPLY_QUEUE.to_owned(), START_QUEUE.to_owned()])
            .collect();
        let refs: Vec<&str> = logicals.iter().map(String::as_str).collect();
        if let Err(e) = transport.delete_topology(&refs).await {
            eprintln!("warning: could not remove the bench's queues: {e}");
        }
    }
    outcome?;

    let summary = summarize(&store, run_started_ms).await?;
    let mut conn = store.pool().acquire().await?;
    let outcomes = services::outcomes(&mut conn).await?;
    let violations = services::check_all(&mut conn, &outcomes).await?;
    let commands: i64 = sqlx::query("SELECT COUNT(*) AS n FROM outbox WHERE created_at >= $1")
        .bind(run_started_ms)
        .fetch_one(&mut *conn)
        .await
        .and_then(|r| r.try_get("n"))
        .unwrap_or(0);
    drop(conn);
    let secs = elapsed.as_secs_f64();
    println!(
        "sagaflow bench: {} orders over RabbitMQ ({} partitions, {}) and PostgreSQL",
        args.orders,
        args.amqp.partitions,
        args.amqp.queue_type.as_str()
    );
    if args.external {
        println!(
            "  deployment:      external (prefix `{}`)",
            args.amqp.prefix
        );
    } else {
        println!(
            "  deployment:      {} engine process(es), 4 worker processes{}",
            args.engines,
            if kills > 0 {
                format!(", {kills} worker SIGKILLs")
            } else {
                String::new()
            }
        );
    }
    println!("  sagas:           {}", fmt_counts(&summary.this_run));
    println!(
        "  throughput:      {:.0} sagas/s ({} sagas final in {:.2}s)",
        args.orders as f64 / secs.max(1e-9),
        args.orders,
        secs
    );
    if let (Some(p50), Some(p99)) = (summary.p50, summary.p99) {
        println!("  latency:         p50 {p50} ms, p99 {p99} ms (start to final state)");
    }
    if args.orders > 0 && commands > 0 {
        println!(
            "  messages:        {:.1} per saga ({commands} commands + their replies)",
            2.0 * commands as f64 / args.orders as f64
        );
    }
    transport.close().await;
    Ok(report_invariants(outcomes.len(), &violations))
}

async fn relay(engine: Arc<Engine>, mut stop: watch::Receiver<bool>) {
    while !*stop.borrow() {
        match engine.relay_once().await {
            Ok(n) if n > 0 => {}
            _ => {
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(5)) => {}
                    _ = stop.changed() => {}
                }
            }
        }
    }
}

/// (final, unfinished) among the sagas started since `since`.
async fn count(store: &Store, since: i64) -> anyhow::Result<(u64, u64)> {
    let mut conn = store.pool().acquire().await?;
    let row = sqlx::query(
        "SELECT COUNT(finished_at) AS done, COUNT(*) - COUNT(finished_at) AS open FROM sagas WHERE created_at >= $1",
    )
    .bind(since)
    .fetch_one(&mut *conn)
    .await?;
    let done: i64 = row.try_get("done")?;
    let open: i64 = row.try_get("open")?;
    Ok((done as u64, open as u64))
}

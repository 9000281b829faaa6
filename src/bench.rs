//! `sagaflow bench`: N orders through a deployment over RabbitMQ and PostgreSQL — engine and
//! worker *processes* — with a progress bar, a summary (sagas/s, latency percentiles, database
//! commits per saga, CPU and memory per process kind) and the invariant check of `sagaflow dev`.
//!
//! By default it launches the deployment itself (`--engines` engine processes and one process
//! per service, the fault flags passed to the workers) on queues of its own
//! (`sagaflow-bench-<database>`, removed at the end; the database must be the bench's own, see
//! [`sagaflow_engine::store::deployment`]), and stops them with SIGTERM at the end. The
//! workers get a database of their own (`<db>_workers`, created and dropped by the bench) so
//! that the engine's and the workers' commits are counted apart;
//! `--shared-database` puts everything in one. With `--external` it drives a deployment that is
//! already running (started with the same `--prefix` and `--partitions`); faults are then the
//! workers' own flags, and `--workers-database-url` names the workers' database if it is not
//! the engine's.
//!
//! Load: closed loop by default (`--concurrency` sagas in flight), or open loop with `--rate R`
//! (R starts per second, whatever completes). Starts go through [`crate::dev::start_orders`].
//!
//! The bench starts sagas in the shared database and relays the outbox itself (a relay among
//! the engines' relays: rows are claimed with SKIP LOCKED), so a start is on the broker within
//! milliseconds instead of waiting for an engine's idle poll.
//!
//! Memory stays flat in the number of orders while it runs: orders are generated when they are
//! seeded and started, and the summary (counts, percentiles) is computed by the database. The
//! invariant check at the end reads the services' tables whole.

use std::collections::BTreeMap;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressState, ProgressStyle};
use sagaflow_dsl::SagaGraph;
use sagaflow_engine::Engine;
use sagaflow_engine::store::{ENGINE_MIGRATIONS, SagaCounts, Store};
use sagaflow_engine::transport::{REPLY_QUEUE, START_QUEUE, Transport, command_queue};
use sagaflow_workers::services;
use serde_json::Value;
use sqlx::{AnyConnection, Row};
use tokio::sync::watch;

use crate::dev::{
    fmt_counts, pick, report_invariants, sample_order, seed, service_rate, summarize,
};
use crate::serve::AmqpArgs;

/// The bench's own pool: the starts, its relay and its count.
const BENCH_POOL: u32 = 4;
/// How often the bench looks for final sagas when it does not refill (open loop): one
/// statement, which PostgreSQL counts as a commit.
const POLL_EVERY: Duration = Duration::from_millis(200);
/// How often the closed loop refills what finished (one look-up of the sagas in flight, see
/// [`InFlight`]): a finished saga's slot waits at most this long, not a whole `POLL_EVERY`.
const REFILL_EVERY: Duration = Duration::from_millis(20);
/// Orders seeded per transaction, and the most the open loop starts in one go.
const CHUNK: u64 = 1000;
/// Linux reports CPU time in clock ticks of `USER_HZ`, which is 100 on every architecture
/// sagaflow runs on (`getconf CLK_TCK`); reading it with `sysconf` would need `unsafe`.
const CLOCK_TICKS_PER_SECOND: f64 = 100.0;

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// The deployment's PostgreSQL database.
    #[arg(
        long,
        env = "SAGAFLOW_DATABASE_URL",
        hide_env_values = true,
        value_name = "URL",
        value_parser = crate::database_url()
    )]
    pub database_url: String,
    #[command(flatten)]
    pub amqp: AmqpArgs,
    /// How many orders.
    #[arg(long, default_value_t = 1000)]
    pub orders: u64,
    /// Closed loop (the default): keep this many sagas in flight.
    #[arg(long, default_value_t = 256)]
    pub concurrency: u64,
    /// Open loop: start this many sagas per second, whatever completes (instead of
    /// `--concurrency`).
    #[arg(long, value_name = "PER_SECOND", value_parser = positive_rate, conflicts_with = "concurrency")]
    pub rate: Option<f64>,
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
    /// The launched workers use `--database-url` too, instead of a database of their own
    /// (`<db>_workers`, created and dropped by the bench); commits are then not split.
    #[arg(long)]
    pub shared_database: bool,
    /// Drive an already running deployment instead of launching one.
    #[arg(long, conflicts_with_all = ["fail", "flaky", "slow", "engines", "kill_every", "shared_database"])]
    pub external: bool,
    /// With `--external`: the database of the deployment's workers, if not `--database-url`
    /// (orders are seeded and checked there, and its commits are counted apart).
    #[arg(long, value_name = "URL", requires = "external", value_parser = crate::database_url())]
    pub workers_database_url: Option<String>,
    /// Give up waiting when no saga finishes for this long.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub stall_timeout: Duration,
    /// Keep the launched processes' logs here (default: discarded).
    #[arg(long, value_name = "DIR")]
    pub logs: Option<std::path::PathBuf>,
}

fn positive_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 => Ok(r),
        _ => Err(format!(
            "`{s}` is not a positive number of starts per second"
        )),
    }
}

/// CPU time (user + system) of a process in clock ticks, from `/proc/<pid>/stat`.
fn cpu_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces; the fields after it are plain numbers.
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 (utime) and 15 (stime) of proc(5); `rest` starts at field 3.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// The machine's CPU time so far in clock ticks, all cores and processes: (busy, busy + idle),
/// from the `cpu` line of `/proc/stat` (user, nice, system, idle, iowait, irq, softirq, steal).
fn machine_ticks() -> Option<(u64, u64)> {
    parse_machine_ticks(&std::fs::read_to_string("/proc/stat").ok()?)
}

fn parse_machine_ticks(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|v| v.parse().ok())
        .collect::<Option<_>>()?;
    let [user, nice, system, idle, iowait, irq, softirq, steal] = f[..] else {
        return None;
    };
    let busy = user + nice + system + irq + softirq + steal;
    Some((busy, busy + idle + iowait))
}

/// Context switches of a process so far, voluntary (it waited: a lock, a socket, a channel)
/// and not (preempted), summed over its live threads from `/proc/<pid>/task/*/status`.
/// Threads that already ended are not counted.
fn switches(pid: &str) -> Option<u64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    Some(
        tasks
            .flatten()
            .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
            .map(|status| parse_switches(&status))
            .sum(),
    )
}

fn parse_switches(status: &str) -> u64 {
    status
        .lines()
        .filter_map(|l| {
            l.strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| l.strip_prefix("nonvoluntary_ctxt_switches:"))
        })
        .filter_map(|v| v.trim().parse::<u64>().ok())
        .sum()
}

/// The machine's context switches so far, all processes (the `ctxt` line of `/proc/stat`).
fn machine_switches() -> Option<u64> {
    parse_machine_switches(&std::fs::read_to_string("/proc/stat").ok()?)
}

fn parse_machine_switches(stat: &str) -> Option<u64> {
    stat.lines()
        .find_map(|l| l.strip_prefix("ctxt "))?
        .trim()
        .parse()
        .ok()
}

/// A `kB` line of `/proc/<pid>/status`, e.g. `VmRSS` (resident now) or `VmHWM` (peak).
fn status_kb(pid: &str, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// CPU and memory of one kind of process (`engine`, `worker payment`, `bench`).
#[derive(Debug, Default, Clone)]
struct Usage {
    processes: usize,
    /// Of processes that were SIGKILLed and restarted (read just before the kill).
    killed: usize,
    cpu_ticks: u64,
    /// Context switches (see [`switches`]).
    switches: u64,
    /// Resident memory of the processes alive at the end, summed.
    rss_kb: u64,
    peak_kb: Option<u64>,
}

/// The processes this bench launched.
struct Deployment {
    children: Vec<(String, Launch, Child)>,
    logs: Option<std::path::PathBuf>,
    /// CPU ticks and context switches of killed processes by kind.
    retired: BTreeMap<String, (usize, u64, u64)>,
}

/// `engine-0` → `engine`, `worker-payment` → `worker payment`.
fn kind_of(name: &str) -> String {
    match name.strip_prefix("worker-") {
        Some(service) => format!("worker {service}"),
        None => name.split('-').next().unwrap_or(name).to_owned(),
    }
}

/// How a child process is started: its arguments, and the addresses it gets through its
/// environment (never as arguments: those are visible to anyone on the machine in `ps`, and
/// may hold passwords).
#[derive(Debug, Clone)]
struct Launch {
    args: Vec<String>,
    env: Vec<(&'static str, String)>,
}

impl Deployment {
    fn spawn(&mut self, name: &str, launch: Launch) -> anyhow::Result<()> {
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
            .args(&launch.args)
            .envs(launch.env.iter().map(|(k, v)| (*k, v.as_str())))
            // The children's log filter: `warn`, or what SAGAFLOW_BENCH_LOG says (with --logs,
            // e.g. `sagaflow_engine::apply=debug` shows every batch's size and time).
            .env(
                "SAGAFLOW_LOG",
                std::env::var("SAGAFLOW_BENCH_LOG").unwrap_or_else(|_| "warn".to_owned()),
            )
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("cannot launch {name}"))?;
        self.children.push((name.to_owned(), launch, child));
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
        let (name, launch, mut child) = self.children.remove(i);
        let pid = child.id().to_string();
        let (ticks, switched) = (cpu_ticks(&pid).unwrap_or(0), switches(&pid).unwrap_or(0));
        let retired = self.retired.entry(kind_of(&name)).or_default();
        retired.0 += 1;
        retired.1 += ticks;
        retired.2 += switched;
        child.kill()?;
        child.wait()?;
        self.spawn(&name, launch)?;
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

    /// CPU so far and resident memory now, by kind (killed processes' CPU included).
    fn usage(&self) -> BTreeMap<String, Usage> {
        let mut by_kind: BTreeMap<String, Usage> = BTreeMap::new();
        for (name, _, child) in &self.children {
            let pid = child.id().to_string();
            let u = by_kind.entry(kind_of(name)).or_default();
            u.processes += 1;
            u.cpu_ticks += cpu_ticks(&pid).unwrap_or(0);
            u.switches += switches(&pid).unwrap_or(0);
            u.rss_kb += status_kb(&pid, "VmRSS").unwrap_or(0);
        }
        for (kind, (n, ticks, switched)) in &self.retired {
            let u = by_kind.entry(kind.clone()).or_default();
            u.killed += n;
            u.cpu_ticks += ticks;
            u.switches += switched;
        }
        by_kind
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

/// `postgres://…/sagaflow?x=y` → (`postgres://…/sagaflow_workers?x=y`, `sagaflow_workers`).
fn workers_db_url(url: &str) -> anyhow::Result<(String, String)> {
    let mut parsed = url::Url::parse(url).context("--database-url is not a URL")?;
    let db = parsed.path().trim_start_matches('/').to_owned();
    if db.is_empty() || db.contains('/') {
        bail!("--database-url names no database; write postgres://HOST/DATABASE");
    }
    let name = format!("{db}_workers");
    parsed.set_path(&format!("/{name}"));
    Ok((parsed.to_string(), name))
}

/// `"name"` with inner quotes doubled: an identifier PostgreSQL takes literally.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Starts the run id of the orders of a run whose workers had a database of their own.
const SPLIT_MARK: &str = "split";

fn order_id(o: &services::Outcome) -> Option<&str> {
    o.input.get("order_id").and_then(Value::as_str)
}

/// Where the sagas and the services' tables are.
struct Databases {
    engine_url: String,
    engine_name: String,
    workers_url: String,
    workers_name: String,
    /// The workers' database was created by this run (and is dropped at its end).
    own_workers_db: bool,
    postgres: bool,
}

impl Databases {
    fn split(&self) -> bool {
        self.workers_name != self.engine_name
    }
}

pub async fn run(mut args: BenchArgs) -> anyhow::Result<ExitCode> {
    let run_id = uuid::Uuid::now_v7().simple().to_string()[..12].to_owned();
    // A launched deployment gets queues of its own, removed at the end; queues under a prefix
    // the user named are never deleted.
    let own_prefix = !args.external && args.amqp.prefix == "sagaflow";
    sqlx::any::install_default_drivers();
    let mut admin = connect_one(&args.database_url).await?;
    let postgres = !args.database_url.starts_with("sqlite:")
        && (args.database_url.starts_with("postgres://")
            || args.database_url.starts_with("postgresql://"));
    let engine_name = if postgres {
        sqlx::query("SELECT current_database()::text AS d")
            .fetch_one(&mut admin)
            .await?
            .try_get::<String, _>("d")?
    } else {
        args.database_url.clone()
    };
    if own_prefix {
        // Named after the database (bound to it, see below), so a later bench on the same
        // database is the same deployment again.
        let db: String = engine_name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        let db = db.trim_matches('-');
        let db = &db[db.len().saturating_sub(40)..];
        args.amqp.prefix = format!("sagaflow-bench-{db}");
    }
    // One database, one deployment: a bench on a running deployment's database (without
    // --external) is refused here, before anything is launched or seeded.
    {
        let check = Store::connect(&args.database_url, 2).await?;
        check.migrate(&[ENGINE_MIGRATIONS]).await?;
        check.bind_prefix(&args.amqp.prefix).await.map_err(|e| {
            anyhow::anyhow!(
                "{e}\n(to bench a running deployment, pass --external with its --prefix; otherwise give the bench a database of its own)"
            )
        })?;
    }
    let mut dbs = Databases {
        engine_url: args.database_url.clone(),
        engine_name: engine_name.clone(),
        workers_url: args.database_url.clone(),
        workers_name: engine_name,
        own_workers_db: false,
        postgres,
    };
    if let Some(url) = &args.workers_database_url {
        let mut c = connect_one(url).await?;
        dbs.workers_name = sqlx::query("SELECT current_database()::text AS d")
            .fetch_one(&mut c)
            .await?
            .try_get("d")?;
        dbs.workers_url = url.clone();
        let _ = sqlx::Connection::close(c).await;
    } else if !args.external && !args.shared_database && postgres {
        let (url, name) = workers_db_url(&args.database_url)?;
        let created = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "CREATE DATABASE {}",
            quote_ident(&name)
        )))
        .execute(&mut admin)
        .await;
        if let Err(e) = created {
            bail!(
                "cannot create the workers' database {name} ({}); if an interrupted bench left it, \
                 drop it (DROP DATABASE {}), or run with --shared-database",
                db_reason(&e),
                quote_ident(&name)
            );
        }
        dbs.workers_url = url;
        dbs.workers_name = name;
        dbs.own_workers_db = true;
    }
    // Orders whose services' tables live in a per-run database (dropped at the end) are marked,
    // so that a later whole-database check of a shared database leaves them out.
    let orders_id = if dbs.own_workers_db {
        format!("{SPLIT_MARK}{run_id}")
    } else {
        run_id.clone()
    };
    let outcome = bench(args, &orders_id, own_prefix, &dbs, &mut admin).await;
    if dbs.own_workers_db {
        let drop_sql = |force: &str| {
            format!(
                "DROP DATABASE IF EXISTS {}{force}",
                quote_ident(&dbs.workers_name)
            )
        };
        let dropped = sqlx::raw_sql(sqlx::AssertSqlSafe(drop_sql(" WITH (FORCE)")))
            .execute(&mut admin)
            .await;
        if dropped.is_err()
            && let Err(e) = sqlx::raw_sql(sqlx::AssertSqlSafe(drop_sql("")))
                .execute(&mut admin)
                .await
        {
            eprintln!(
                "warning: could not drop the workers' database {}: {}",
                dbs.workers_name,
                db_reason(&e)
            );
        }
    }
    let _ = sqlx::Connection::close(admin).await;
    outcome
}

fn db_reason(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(db) => db.message().to_owned(),
        other => other.to_string(),
    }
}

async fn connect_one(url: &str) -> anyhow::Result<AnyConnection> {
    let url = sagaflow_engine::store::normalize_url(url)?;
    <AnyConnection as sqlx::Connection>::connect(&url)
        .await
        .map_err(|e| anyhow::anyhow!("cannot open database: {}", db_reason(&e)))
}

/// What the open-loop starter achieved.
#[derive(Debug, Default)]
struct Starts {
    /// From the first start to the last one's commit.
    span: Duration,
    /// The most a start was committed after its scheduled time.
    max_lag: Duration,
}

async fn bench(
    args: BenchArgs,
    run_id: &str,
    own_prefix: bool,
    dbs: &Databases,
    reader: &mut AnyConnection,
) -> anyhow::Result<ExitCode> {
    let transport = args.amqp.connect("bench").await?;

    // Set-up (schema, definitions, seeds) on pools closed before the commits are counted.
    {
        let setup = Store::connect(&dbs.engine_url, 2).await?;
        if dbs.split() {
            setup.migrate(&[ENGINE_MIGRATIONS]).await?;
        } else {
            setup
                .migrate(&[ENGINE_MIGRATIONS, services::MIGRATIONS])
                .await?;
        }
        let workers = if dbs.split() {
            let w = Store::connect(&dbs.workers_url, 2).await?;
            w.migrate(&[services::MIGRATIONS]).await?;
            w
        } else {
            setup.clone()
        };
        let engine = Engine::new(setup.clone(), transport.clone() as Arc<dyn Transport>);
        crate::serve::register_sagas(&engine, &[]).await?;
        // The run's orders and the warm-up order after them (see `warm_up`).
        let mut first = 0;
        while first <= args.orders {
            let end = (first + CHUNK).min(args.orders + 1);
            let chunk: Vec<Value> = (first..end).map(|i| sample_order(run_id, i)).collect();
            seed(&workers, &chunk).await?;
            first = end;
        }
        setup.pool().close().await;
        workers.pool().close().await;
    }

    let mut deployment = Deployment {
        children: Vec::new(),
        logs: args.logs.clone(),
        retired: BTreeMap::new(),
    };
    if let Some(dir) = &deployment.logs {
        std::fs::create_dir_all(dir)?;
    }
    let before = if dbs.postgres {
        if !args.external {
            let _ = settle(reader, dbs).await;
        }
        Some(commits(reader, dbs).await?)
    } else {
        None
    };
    let bench_ticks_before = cpu_ticks("self").unwrap_or(0);
    let machine_before = machine_ticks();
    let (bench_switches_before, machine_switches_before) =
        (switches("self").unwrap_or(0), machine_switches());

    if !args.external {
        let common = |cmd: &[&str], url: &str| {
            let mut v: Vec<String> = cmd.iter().map(|s| (*s).to_owned()).collect();
            v.extend([
                "--partitions".into(),
                transport.config().partitions.to_string(),
                "--queue-type".into(),
                args.amqp.queue_type.as_str().into(),
                "--prefix".into(),
                args.amqp.prefix.clone(),
                "--prefetch".into(),
                args.amqp.prefetch.to_string(),
                "--bundle".into(),
                args.amqp.bundle.to_string(),
                "--delivery-limit".into(),
                args.amqp.delivery_limit.to_string(),
            ]);
            Launch {
                args: v,
                env: vec![
                    ("SAGAFLOW_DATABASE_URL", url.to_owned()),
                    ("SAGAFLOW_AMQP_URL", args.amqp.amqp_url.clone()),
                ],
            }
        };
        for i in 0..args.engines {
            let mut a = common(&["engine"], &dbs.engine_url);
            a.args.extend(["--http".into(), "127.0.0.1:0".into()]);
            deployment.spawn(&format!("engine-{i}"), a)?;
        }
        for service in services::SERVICES {
            let mut a = common(&["worker", service], &dbs.workers_url);
            for (flag, list) in [
                ("--fail", &args.fail),
                ("--flaky", &args.flaky),
                ("--slow", &args.slow),
            ] {
                let r = pick(list, service);
                if r > 0.0 {
                    a.args.extend([flag.to_owned(), r.to_string()]);
                }
            }
            deployment.spawn(&format!("worker-{service}"), a)?;
        }
    }

    let launched = Instant::now();
    let store = Store::connect_engine(&dbs.engine_url, BENCH_POOL).await?;
    let engine = Engine::new(store.clone(), transport.clone() as Arc<dyn Transport>);
    let graph = engine.definition_by_name("order-paid").await?;

    // This process relays the outbox too (its starts' first commands, promptly).
    let (stop, stopped) = watch::channel(false);
    let relay = tokio::spawn(engine.clone().relay(stopped.clone()));

    let warmed = warm_up(
        &engine,
        &graph,
        &store,
        sample_order(run_id, args.orders),
        args.stall_timeout,
        &mut deployment,
        args.external,
    )
    .await;
    let ready_after = launched.elapsed();

    let bar = ProgressBar::new(args.orders);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} sagas final ({rate}) {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .with_key(
            "rate",
            |state: &ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = write!(w, "{:.0}/s", state.per_sec());
            },
        ),
    );
    let run_started_ms = sagaflow_engine::store::now_ms() - 1;
    let started_at = Instant::now();
    let in_flight = InFlight::default();
    let mut open_loop = args.rate.filter(|_| warmed.is_ok()).map(|rate| {
        tokio::spawn(start_at_rate(
            engine.clone(),
            graph.clone(),
            run_id.to_owned(),
            args.orders,
            rate,
            in_flight.clone(),
            stopped.clone(),
        ))
    });
    let mut open_loop_result = None;
    let mut next = 0u64;
    let mut polls = 0u64;
    let mut last_final = 0u64;
    let mut last_progress = Instant::now();
    let mut kills = 0usize;
    let mut last_kill = Instant::now();
    let closed_loop = args.rate.is_none();
    let mut refills = 0u64;
    let mut poll = tokio::time::interval(if closed_loop {
        REFILL_EVERY
    } else {
        POLL_EVERY
    });
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_poll: Option<Instant> = None;
    let outcome = if let Err(e) = warmed {
        Err(e)
    } else {
        loop {
            poll.tick().await;
            if closed_loop {
                let unfinished = match in_flight.refresh(&store).await {
                    Ok((_, n)) => n,
                    Err(e) => break Err(e),
                };
                refills += 1;
                let room = args.concurrency.saturating_sub(unfinished);
                let end = (next + room).min(args.orders);
                let batch: Vec<Value> = (next..end).map(|i| sample_order(run_id, i)).collect();
                match crate::dev::start_orders(&engine, &graph, &batch).await {
                    Ok(ids) => in_flight.add(ids),
                    Err(e) => break Err(e),
                }
                next = end;
                let all_final = next == args.orders && unfinished == 0;
                if !all_final && last_poll.is_some_and(|at| at.elapsed() < POLL_EVERY) {
                    continue;
                }
            }
            last_poll = Some(Instant::now());
            if !args.external
                && let Err(e) = deployment.all_alive()
            {
                break Err(e);
            }
            // The open-loop starter stops early only on an error: say it now.
            if let Some(task) = &mut open_loop
                && open_loop_result.is_none()
                && task.is_finished()
            {
                match task.await {
                    Ok(Ok(s)) => open_loop_result = Some(s),
                    Ok(Err(e)) => break Err(e),
                    Err(e) => break Err(anyhow::anyhow!("the starter panicked: {e}")),
                }
            }
            let (finished, unfinished) = if closed_loop {
                in_flight.counts()
            } else {
                polls += 1;
                match in_flight.refresh(&store).await {
                    Ok(c) => c,
                    Err(e) => break Err(e),
                }
            };
            bar.set_position(finished);
            if finished != last_final {
                last_final = finished;
                last_progress = Instant::now();
            }
            if finished == args.orders {
                break Ok(());
            }
            if let Some(every) = args.kill_every
                && last_kill.elapsed() >= every
            {
                match deployment.kill_and_restart_a_worker(kills) {
                    Ok(name) => {
                        kills += 1;
                        last_kill = Instant::now();
                        bar.set_message(format!("(killed {name}; {kills} kills)"));
                    }
                    Err(e) => break Err(e),
                }
            }
            if last_progress.elapsed() > args.stall_timeout {
                break Err(anyhow::anyhow!(
                    "no saga finished for {}; {unfinished} are unfinished",
                    humantime::format_duration(args.stall_timeout)
                ));
            }
        }
    };
    let elapsed = started_at.elapsed();
    bar.finish_and_clear();
    let _ = stop.send(true);
    let _ = relay.await;
    let mut starts = open_loop_result;
    if let Some(task) = open_loop
        && starts.is_none()
        && outcome.is_ok()
    {
        starts = Some(task.await.context("the starter panicked")??);
    }

    // CPU and memory just before the stop; the bench's own CPU counts from the launch on.
    let machine = machine_before
        .zip(machine_ticks())
        .map(|((b0, t0), (b1, t1))| (b1.saturating_sub(b0), t1.saturating_sub(t0)));
    let machine_switched = machine_switches_before
        .zip(machine_switches())
        .map(|(s0, s1)| s1.saturating_sub(s0));
    let mut usage = deployment.usage();
    usage.insert(
        "bench".to_owned(),
        Usage {
            processes: 1,
            killed: 0,
            cpu_ticks: cpu_ticks("self")
                .unwrap_or(0)
                .saturating_sub(bench_ticks_before),
            switches: switches("self")
                .unwrap_or(0)
                .saturating_sub(bench_switches_before),
            rss_kb: status_kb("self", "VmRSS").unwrap_or(0),
            peak_kb: status_kb("self", "VmHWM"),
        },
    );
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
    let partitions = transport.config().partitions;
    transport.close().await;
    // Backends publish their counters when their connection closes (or at most once a second
    // while busy): close ours, let the launched processes' go, then read.
    // The relay's connection too: an open one holds its commit counter back (see `settle`).
    store.close().await;
    outcome?;
    let after = match before {
        Some(before) => {
            if args.external {
                // The deployment keeps running: whatever it did in the last second may be
                // unpublished yet (and shows up in a later reading instead).
                tokio::time::sleep(Duration::from_millis(1100)).await;
            } else if !settle(reader, dbs).await {
                eprintln!(
                    "warning: connections to the bench's databases were still open after 5 s; the commit counts may miss their last second"
                );
            }
            let _ = sqlx::query("SELECT pg_stat_force_next_flush()")
                .execute(&mut *reader)
                .await;
            Some((before, commits(reader, dbs).await?))
        }
        None => None,
    };

    let check = Store::connect(&dbs.engine_url, 2).await?;
    let summary = summarize(&check, run_started_ms).await?;
    // Before `conn` is taken: the store reads on a connection of its own.
    let commands = check.dispatched_since(run_started_ms).await.unwrap_or(0);
    let lines = check
        .exchange_lines_since(run_started_ms)
        .await
        .unwrap_or_default();
    let barrier;
    let mut conn = check.pool().acquire().await?;
    let mut outcomes = services::outcomes(&mut conn).await?;
    let violations = if dbs.split() {
        if dbs.own_workers_db {
            // The workers' database holds this run's orders only: check this run's sagas.
            let mine = format!("o-{run_id}-");
            outcomes.retain(|o| order_id(o).is_some_and(|id| id.starts_with(&mine)));
        }
        let workers = Store::connect(&dbs.workers_url, 2).await?;
        let mut wconn = workers.pool().acquire().await?;
        let v = services::check_all(&mut wconn, &outcomes).await?;
        barrier = barrier_rows_since(&mut wconn, run_started_ms).await;
        drop(wconn);
        workers.pool().close().await;
        v
    } else {
        // The whole database, except the sagas of earlier split runs: their services' tables
        // were in a database of their own, dropped since.
        let split = format!("o-{SPLIT_MARK}");
        outcomes.retain(|o| !order_id(o).is_some_and(|id| id.starts_with(&split)));
        barrier = barrier_rows_since(&mut conn, run_started_ms).await;
        services::check_all(&mut conn, &outcomes).await?
    };
    drop(conn);
    check.pool().close().await;

    let n = args.orders.max(1) as f64;
    let secs = elapsed.as_secs_f64();
    println!(
        "sagaflow bench: {} orders over RabbitMQ ({} partitions, {}) and PostgreSQL",
        args.orders,
        partitions,
        args.amqp.queue_type.as_str()
    );
    if args.external {
        println!(
            "  deployment:      external (prefix `{}`; workers' tables in {})",
            args.amqp.prefix,
            if dbs.split() {
                format!("database {}", dbs.workers_name)
            } else {
                "the same database".to_owned()
            }
        );
    } else {
        println!(
            "  deployment:      {} engine process(es), 4 worker processes{}; {}",
            args.engines,
            if kills > 0 {
                format!(", {kills} worker SIGKILLs")
            } else {
                String::new()
            },
            if dbs.split() {
                format!(
                    "engine database {}, workers' database {} (made for this run)",
                    dbs.engine_name, dbs.workers_name
                )
            } else {
                format!("one database {} for all", dbs.engine_name)
            }
        );
    }
    match (args.rate, &starts) {
        (Some(rate), Some(s)) => println!(
            "  load:            open loop, {rate} starts/s offered, {:.0}/s achieved, start lag max {} ms (scheduled → committed)",
            args.orders as f64 / s.span.as_secs_f64().max(1e-9),
            s.max_lag.as_millis()
        ),
        _ => println!(
            "  load:            closed loop, {} sagas in flight",
            args.concurrency
        ),
    }
    println!(
        "  warm-up:         one order through every service before the clock, final {} ms after {}; not in the sagas, throughput, latency, exchanges and messages below (in the commits and CPU, like the start-up; the invariants check it)",
        ready_after.as_millis(),
        if args.external {
            "the bench connected"
        } else {
            "the processes were launched"
        }
    );
    println!("  sagas:           {}", fmt_counts(&summary.this_run));
    println!(
        "  throughput:      {:.0} sagas/s ({} sagas final in {:.2}s)",
        args.orders as f64 / secs.max(1e-9),
        args.orders,
        secs
    );
    if let (Some(p50), Some(p90), Some(p99), Some(max)) =
        (summary.p50, summary.p90, summary.p99, summary.max)
    {
        println!(
            "  latency:         p50 {p50} ms, p90 {p90} ms, p99 {p99} ms, max {max} ms (start to final state)"
        );
    }
    // Three processes' clocks compared: only where the bench launched them all on this machine.
    let exchanges = if args.external {
        BTreeMap::new()
    } else {
        match_exchanges(&lines, &barrier)
    };
    if !exchanges.is_empty() {
        println!(
            "  exchanges:       ms, p50 / p99, of each command's first attempt that succeeded: the engine's batch that sent it → the worker's transaction that ran it (its barrier row) → the engine's batch that applied the reply"
        );
        for (what, (there, back)) in &exchanges {
            println!(
                "    {:<18}{:>5} /{:>5}  →{:>5} /{:>5}   ({} commands)",
                format!("{what}:"),
                quantile(there, 0.5),
                quantile(there, 0.99),
                quantile(back, 0.5),
                quantile(back, 0.99),
                there.len()
            );
        }
    }
    if args.orders > 0 && commands > 0 {
        println!(
            "  messages:        {:.1} per saga ({commands} commands + their replies)",
            2.0 * commands as f64 / n
        );
    }
    if let Some((before, after)) = &after {
        let delta = |db: &str| {
            let (c1, r1) = after.get(db).copied().unwrap_or_default();
            let (c0, r0) = before.get(db).copied().unwrap_or_default();
            (c1 - c0, r1 - r0)
        };
        let (ec, er) = delta(&dbs.engine_name);
        let (wc, wr) = if dbs.split() {
            delta(&dbs.workers_name)
        } else {
            (0, 0)
        };
        println!(
            "  db commits:      {:.1} per saga ({} commits, {} rollbacks; pg_stat_database.xact_commit delta over the run{}; read-only statements count as commits there)",
            (ec + wc) as f64 / n,
            ec + wc,
            er + wr,
            if args.external {
                ""
            } else {
                ", start-up and shutdown of the processes included"
            }
        );
        let (looks, every) = if closed_loop {
            (refills, REFILL_EVERY)
        } else {
            (polls, POLL_EVERY)
        };
        let own = format!(
            "incl. the bench's own: {looks} look-ups of the sagas in flight (one every {} ms), its starts and its outbox relay",
            every.as_millis()
        );
        if dbs.split() {
            println!(
                "    engine db:     {:.1} per saga ({ec}; {own})",
                ec as f64 / n
            );
            println!("    workers db:    {:.1} per saga ({wc})", wc as f64 / n);
        } else {
            println!(
                "    not split:     engine and workers share {} ({own}){}",
                dbs.engine_name,
                if args.external {
                    "; pass --workers-database-url if the workers have their own"
                } else {
                    "; run without --shared-database to split"
                }
            );
        }
        if args.external {
            println!(
                "    external:      includes whatever else the deployment did meanwhile (±1 s of its activity)"
            );
        }
    }
    {
        println!(
            "  cpu, memory:     user+system CPU and context switches until just before the stop; resident memory then{}",
            if args.external {
                " (the bench's only: the deployment is external)"
            } else {
                ""
            }
        );
        for (kind, u) in &usage {
            let secs = u.cpu_ticks as f64 / CLOCK_TICKS_PER_SECOND;
            let mut line = format!(
                "    {:<15}{:>7.2} s  {:>6.2} ms/saga  {:>5.0} switches/saga  RSS {:>6.1} MB",
                format!("{kind}:"),
                secs,
                secs * 1000.0 / n,
                u.switches as f64 / n,
                u.rss_kb as f64 / 1024.0
            );
            if let Some(peak) = u.peak_kb {
                line.push_str(&format!(" (peak {:.1} MB)", peak as f64 / 1024.0));
            }
            if u.processes > 1 {
                line.push_str(&format!(" ({} processes)", u.processes));
            }
            if u.killed > 0 {
                line.push_str(&format!(" (+ {} killed ones' CPU)", u.killed));
            }
            println!("{line}");
        }
        if let Some((busy, all)) = machine.filter(|&(_, all)| all > 0) {
            // Everything the machine did meanwhile: PostgreSQL and RabbitMQ, whose share is
            // what the lines above leave, but also anything else that ran.
            let secs = busy as f64 / CLOCK_TICKS_PER_SECOND;
            let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
            // Context switches are what a low rate costs: a thread that sleeps and is woken
            // per message instead of per batch, in every process on the path.
            let switched = machine_switched.map_or(String::new(), |s| {
                format!("{:>5.0} switches/saga  ", s as f64 / n)
            });
            println!(
                "    {:<15}{:>7.2} s  {:>6.2} ms/saga  {switched}busy {:.0} % of {cores} cores (all \
                 processes: the database and the broker too, and anything else that ran)",
                "machine:",
                secs,
                secs * 1000.0 / n,
                busy as f64 * 100.0 / all as f64
            );
        }
    }
    Ok(report_invariants(outcomes.len(), &violations))
}

/// Starts `order` and waits until it is final: the deployment's start-up (the processes
/// connecting, migrating, declaring their queues and taking their first deliveries) is then
/// behind the clock instead of in the first sagas' latency (measured: the first 0.3 s of starts
/// all waited for the workers, 330 ms at the median, which alone set the p99 of a 10,000-saga
/// run at 500 starts/s).
async fn warm_up(
    engine: &Arc<Engine>,
    graph: &Arc<SagaGraph>,
    store: &Store,
    order: Value,
    stall_timeout: Duration,
    deployment: &mut Deployment,
    external: bool,
) -> anyhow::Result<()> {
    let began = Instant::now();
    let ids = crate::dev::start_orders(engine, graph, &[order])
        .await
        .context("starting the warm-up order")?;
    let warm = InFlight::default();
    warm.add(ids);
    loop {
        let (_, left) = warm
            .refresh(store)
            .await
            .context("waiting for the warm-up order")?;
        if left == 0 {
            return Ok(());
        }
        if !external {
            deployment.all_alive()?;
        }
        if began.elapsed() > stall_timeout {
            bail!(
                "the warm-up order was not final after {}: is every worker running? (--logs DIR keeps the processes' logs)",
                humantime::format_duration(stall_timeout)
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The barrier rows (`saga_id, step, op, created_at`) the workers wrote since `since`; none
/// when the services keep no barrier (weak idempotency) or it cannot be read.
async fn barrier_rows_since(
    conn: &mut AnyConnection,
    since: i64,
) -> Vec<(String, String, String, i64)> {
    let rows =
        sqlx::query("SELECT saga_id, step, op, created_at FROM barrier WHERE created_at >= $1")
            .bind(since)
            .fetch_all(&mut *conn)
            .await
            .unwrap_or_default();
    rows.iter()
        .filter_map(|r| {
            Some((
                r.try_get("saga_id").ok()?,
                r.try_get("step").ok()?,
                r.try_get("op").ok()?,
                r.try_get("created_at").ok()?,
            ))
        })
        .collect()
}

/// Each exchange's two halves, by step and operation (`payment action`), in ms: from the
/// engine's batch that sent the command's first attempt (its `dispatch` line) to the worker's
/// transaction that ran it (its barrier row, stamped just before that transaction commits),
/// and from there to the engine's batch that applied the reply (its `succeeded` line). Only
/// first attempts that succeeded, with all three times in that order, count: a retried or
/// failed one has no single path to time. The three clocks are this machine's one clock.
fn match_exchanges(
    lines: &[(String, String, String, i64, String)],
    barrier: &[(String, String, String, i64)],
) -> BTreeMap<String, (Vec<i64>, Vec<i64>)> {
    use std::collections::HashMap;
    type Key<'a> = (&'a str, &'a str, &'a str);
    let mut sent: HashMap<Key, i64> = HashMap::new();
    let mut applied: HashMap<Key, i64> = HashMap::new();
    for (saga, kind, step, at, detail) in lines {
        // `action `charge` attempt 1`, `action attempt 1 succeeded` (machine.rs).
        let mut words = detail.split(' ');
        let Some(op) = words.next() else { continue };
        let first = match kind.as_str() {
            "dispatch" => detail.ends_with(" attempt 1"),
            "succeeded" => detail == &format!("{op} attempt 1 succeeded"),
            _ => false,
        };
        if !first {
            continue;
        }
        let key = (saga.as_str(), step.as_str(), op);
        if kind == "dispatch" {
            sent.insert(key, *at);
        } else {
            applied.insert(key, *at);
        }
    }
    let mut out: BTreeMap<String, (Vec<i64>, Vec<i64>)> = BTreeMap::new();
    for (saga, step, op, ran) in barrier {
        let key = (saga.as_str(), step.as_str(), op.as_str());
        let (Some(&sent), Some(&applied)) = (sent.get(&key), applied.get(&key)) else {
            continue;
        };
        if sent <= *ran && *ran <= applied {
            let e = out.entry(format!("{step} {op}")).or_default();
            e.0.push(ran - sent);
            e.1.push(applied - ran);
        }
    }
    for (there, back) in out.values_mut() {
        there.sort_unstable();
        back.sort_unstable();
    }
    out
}

/// The `q` quantile of sorted `v` (nearest rank); 0 for none.
fn quantile(v: &[i64], q: f64) -> i64 {
    if v.is_empty() {
        return 0;
    }
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// Open loop: `rate` starts per second from now on, whatever completes.
async fn start_at_rate(
    engine: Arc<Engine>,
    graph: Arc<SagaGraph>,
    run_id: String,
    total: u64,
    rate: f64,
    in_flight: InFlight,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<Starts> {
    let t0 = Instant::now();
    let scheduled = |i: u64| t0 + Duration::from_secs_f64(i as f64 / rate);
    let mut next = 0u64;
    let mut max_lag = Duration::ZERO;
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while next < total && !*stop.borrow() {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => break,
        }
        // Orders 0..=due are due by now (the first at once).
        let due = ((t0.elapsed().as_secs_f64() * rate).floor() as u64 + 1).min(total);
        if due <= next {
            continue;
        }
        let end = due.min(next + CHUNK);
        let batch: Vec<Value> = (next..end).map(|i| sample_order(&run_id, i)).collect();
        in_flight.add(crate::dev::start_orders(&engine, &graph, &batch).await?);
        max_lag = max_lag.max(Instant::now().saturating_duration_since(scheduled(next)));
        next = end;
    }
    Ok(Starts {
        span: t0.elapsed(),
        max_lag,
    })
}

/// Waits (up to 5 s) until no connection but `reader` is open to the bench's databases: a
/// backend publishes its commit counter when it exits. False when some stayed open.
async fn settle(reader: &mut AnyConnection, dbs: &Databases) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let others: Result<i64, sqlx::Error> = sqlx::query(
            "SELECT COUNT(*) AS n FROM pg_stat_activity WHERE datname IN ($1, $2) AND pid <> pg_backend_pid()",
        )
        .bind(&dbs.engine_name)
        .bind(&dbs.workers_name)
        .fetch_one(&mut *reader)
        .await
        .and_then(|r| r.try_get("n"));
        match others {
            Ok(n) if n > 0 => {}
            Ok(_) => return true,
            Err(e) => {
                eprintln!(
                    "warning: cannot see who is connected ({}); reading the commit counters now",
                    db_reason(&e)
                );
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// (commits, rollbacks) by database name, from `pg_stat_database`.
async fn commits(
    reader: &mut AnyConnection,
    dbs: &Databases,
) -> anyhow::Result<BTreeMap<String, (i64, i64)>> {
    let rows = sqlx::query(
        "SELECT datname::text AS d, xact_commit AS c, xact_rollback AS r FROM pg_stat_database WHERE datname IN ($1, $2)",
    )
    .bind(&dbs.engine_name)
    .bind(&dbs.workers_name)
    .fetch_all(&mut *reader)
    .await
    .context("reading pg_stat_database")?;
    let mut out = BTreeMap::new();
    for r in rows {
        out.insert(r.try_get("d")?, (r.try_get("c")?, r.try_get("r")?));
    }
    Ok(out)
}

/// The sagas this run started and has not seen final yet, and how many it has. The bench asks
/// the store only about these ([`SagaCounts::finished_among`]): a count over the sagas table
/// would cost the whole run so far, and on a server without autovacuum every dead row the
/// run's updates left (measured: 8–15 ms a count after 10,000 sagas, a fifth of the engine
/// database's time at one count every 20 ms).
#[derive(Debug, Clone, Default)]
struct InFlight(Arc<std::sync::Mutex<Flight>>);

#[derive(Debug, Default)]
struct Flight {
    pending: std::collections::HashSet<String>,
    finished: u64,
}

impl InFlight {
    fn lock(&self) -> std::sync::MutexGuard<'_, Flight> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn add(&self, ids: Vec<String>) {
        self.lock().pending.extend(ids);
    }

    /// `(final, not final)` as last seen.
    fn counts(&self) -> (u64, u64) {
        let f = self.lock();
        (f.finished, f.pending.len() as u64)
    }

    /// Looks up which of the pending sagas are final now; then [`InFlight::counts`].
    async fn refresh(&self, store: &Store) -> anyhow::Result<(u64, u64)> {
        let ids: Vec<String> = self.lock().pending.iter().cloned().collect();
        let done = store
            .finished_among(&ids)
            .await
            .context("looking up the sagas in flight")?;
        {
            let mut f = self.lock();
            for id in &done {
                if f.pending.remove(id) {
                    f.finished += 1;
                }
            }
        }
        Ok(self.counts())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exchanges_are_timed_from_first_attempts_that_succeeded() {
        let line = |saga: &str, kind: &str, step: &str, at: i64, detail: &str| {
            (
                saga.to_owned(),
                kind.to_owned(),
                step.to_owned(),
                at,
                detail.to_owned(),
            )
        };
        let row = |saga: &str, step: &str, op: &str, at: i64| {
            (saga.to_owned(), step.to_owned(), op.to_owned(), at)
        };
        let lines = vec![
            line(
                "s1",
                "dispatch",
                "payment",
                100,
                "action `charge` attempt 1",
            ),
            line(
                "s1",
                "succeeded",
                "payment",
                130,
                "action attempt 1 succeeded",
            ),
            line("s1", "dispatch", "coupon", 130, "try `freeze` attempt 1"),
            line("s1", "succeeded", "coupon", 150, "try attempt 1 succeeded"),
            line("s1", "dispatch", "coupon", 150, "confirm `use` attempt 1"),
            line(
                "s1",
                "succeeded",
                "coupon",
                190,
                "confirm attempt 1 succeeded",
            ),
            // A second attempt: no single path to time.
            line(
                "s2",
                "dispatch",
                "payment",
                100,
                "action `charge` attempt 1",
            ),
            line(
                "s2",
                "dispatch",
                "payment",
                5100,
                "action `charge` attempt 2",
            ),
            line(
                "s2",
                "succeeded",
                "payment",
                5120,
                "action attempt 2 succeeded",
            ),
            // Sent, never applied (yet).
            line(
                "s3",
                "dispatch",
                "payment",
                100,
                "action `charge` attempt 1",
            ),
        ];
        let barrier = vec![
            row("s1", "payment", "action", 110),
            row("s1", "coupon", "try", 145),
            row("s1", "coupon", "confirm", 160),
            row("s2", "payment", "action", 5110),
            row("s3", "payment", "action", 120),
        ];
        let got = match_exchanges(&lines, &barrier);
        assert_eq!(
            got.keys().map(String::as_str).collect::<Vec<_>>(),
            ["coupon confirm", "coupon try", "payment action"]
        );
        assert_eq!(got["payment action"], (vec![10], vec![20]));
        assert_eq!(got["coupon try"], (vec![15], vec![5]));
        assert_eq!(got["coupon confirm"], (vec![10], vec![30]));
        assert_eq!(quantile(&[1, 2, 3, 4], 0.5), 2);
        assert_eq!(quantile(&[1, 2, 3, 4], 0.99), 4);
        assert_eq!(quantile(&[], 0.5), 0);
    }

    #[test]
    fn workers_database_is_named_after_the_engines() {
        let (url, name) =
            workers_db_url("postgres://u:p@127.0.0.1:5432/shop?sslmode=disable").expect("url");
        assert_eq!(name, "shop_workers");
        assert_eq!(
            url,
            "postgres://u:p@127.0.0.1:5432/shop_workers?sslmode=disable"
        );
        assert!(workers_db_url("postgres://127.0.0.1:5432").is_err());
    }

    #[test]
    fn proc_readings() {
        assert!(cpu_ticks("self").is_some());
        assert!(status_kb("self", "VmRSS").is_some_and(|kb| kb > 0));
        assert!(machine_ticks().is_some_and(|(busy, all)| busy <= all && all > 0));
        assert_eq!(
            parse_machine_ticks("cpu  10 1 5 80 4 0 2 3 0 0\ncpu0 5 0 2 40 2 0 1 1 0 0\n"),
            Some((21, 105))
        );
        assert_eq!(parse_machine_ticks("cpu  10 1\n"), None);
        assert_eq!(
            parse_machine_switches("cpu  10 1 5 80 4 0 2 3 0 0\nintr 7 1\nctxt 123456\nbtime 9\n"),
            Some(123456)
        );
        assert_eq!(parse_machine_switches("cpu  10 1\n"), None);
        assert_eq!(
            parse_switches(
                "Name:\tx\nvoluntary_ctxt_switches:\t40\nnonvoluntary_ctxt_switches:\t2\n"
            ),
            42
        );
        assert!(machine_switches().is_some_and(|n| n > 0));
        assert!(switches("self").is_some_and(|n| n > 0));
        assert_eq!(kind_of("engine-1"), "engine");
        assert_eq!(kind_of("worker-payment"), "worker payment");
    }

    #[test]
    fn rates() {
        assert!(positive_rate("100").is_ok());
        assert!(positive_rate("0").is_err());
        assert!(positive_rate("x").is_err());
        assert!(positive_rate("inf").is_err());
    }
}

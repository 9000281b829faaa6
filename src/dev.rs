//! `sagaflow dev`: the engine and the four order services in one process, on an embedded SQLite
//! file and the in-process transport. It finishes whatever an earlier run left unfinished, runs
//! N sample orders (with optional injected faults), and proves the outcome from the services' own
//! tables.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use sagaflow_engine::Engine;
use sagaflow_engine::store::{ENGINE_MIGRATIONS, SagaCounts, Store};
use sagaflow_engine::transport::Transport;
use sagaflow_engine::transport::amqp::{AmqpConfig, AmqpTransport};
use sagaflow_engine::transport::memory::{Faults as NetFaults, MemoryTransport};
use sagaflow_workers::runtime::Faults;
use sagaflow_workers::services;
use serde_json::json;
use tokio::sync::watch;

/// The shipped order flow, so `sagaflow dev` works from any directory.
const ORDER_SAGA: &str = include_str!("../sagas/order.yaml");

#[derive(Debug, clap::Args)]
pub struct DevArgs {
    /// The engine's SQLite file (created if missing; an existing one is resumed first).
    #[arg(long, default_value = "sagaflow.db", value_name = "FILE")]
    pub db: PathBuf,
    /// The services' SQLite files: one per service, named from this (default: beside `--db`,
    /// `sagaflow.db` → `sagaflow.services.db` → `sagaflow.services.payment.db`, …). A file of
    /// this very name is an earlier version's, with all four services inside: it is kept.
    #[arg(long, value_name = "FILE")]
    pub services_db: Option<PathBuf>,
    /// Use this database instead of the SQLite files (e.g. postgres://…), for the engine and
    /// the services alike.
    #[arg(
        long,
        env = "SAGAFLOW_DATABASE_URL",
        hide_env_values = true,
        value_name = "URL",
        value_parser = crate::database_url()
    )]
    pub database_url: Option<String>,
    /// How many sample orders to run (0: only finish what an earlier run left).
    #[arg(long, default_value_t = 100)]
    pub orders: u64,
    /// Business failures of a service's forward operations, e.g. `--fail coupon=0.1`.
    #[arg(long, value_name = "SERVICE=RATE", value_parser = service_rate)]
    pub fail: Vec<(String, f64)>,
    /// Transient failures of a service (retried with backoff), e.g. `--flaky points=0.2`.
    #[arg(long, value_name = "SERVICE=RATE", value_parser = service_rate)]
    pub flaky: Vec<(String, f64)>,
    /// Slow answers of a service (longer than the step timeout), e.g. `--slow gmv=0.01`.
    #[arg(long, value_name = "SERVICE=RATE", value_parser = service_rate)]
    pub slow: Vec<(String, f64)>,
    /// Deliver this share of all messages twice.
    #[arg(long, default_value_t = 0.0, value_name = "RATE", value_parser = rate)]
    pub duplicate: f64,
    /// How many sagas may be in flight at once.
    #[arg(long, default_value_t = 256)]
    pub concurrency: u64,
    /// The saga to run (default: the shipped sagas/order.yaml).
    #[arg(long, value_name = "FILE")]
    pub saga: Option<PathBuf>,
    /// Run over this RabbitMQ instead of the in-process transport (with `--database-url`, the
    /// whole production data path in one process).
    #[arg(long, value_name = "URL")]
    pub amqp_url: Option<String>,
    /// With `--amqp-url`: the prefix of the queues this run declares.
    #[arg(long, default_value = "sagaflow-dev", requires = "amqp_url")]
    pub amqp_prefix: String,
    /// Give up waiting when no saga finishes for this long.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub stall_timeout: Duration,
    /// Also serve the HTTP API and the web console on this address (e.g. 127.0.0.1:8080). The
    /// engine and the services then keep running after the orders are final, so that sagas can
    /// be looked at and acted on, until Ctrl-C; the summary follows.
    #[arg(long, value_name = "ADDR")]
    pub http: Option<std::net::SocketAddr>,
}

pub(crate) fn rate(s: &str) -> Result<f64, String> {
    let r: f64 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a number between 0 and 1"))?;
    if (0.0..=1.0).contains(&r) {
        Ok(r)
    } else {
        Err(format!("`{s}` is not between 0 and 1"))
    }
}

pub(crate) fn service_rate(s: &str) -> Result<(String, f64), String> {
    let (service, r) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}`: write SERVICE=RATE, e.g. coupon=0.1"))?;
    if !services::SERVICES.contains(&service) {
        return Err(format!(
            "unknown service `{service}`; the services are {}",
            services::SERVICES.join(", ")
        ));
    }
    Ok((service.to_owned(), rate(r)?))
}

pub async fn run(args: DevArgs) -> anyhow::Result<ExitCode> {
    let url = match &args.database_url {
        Some(u) => u.clone(),
        None => args.db.display().to_string(),
    };
    let files = match &args.database_url {
        Some(_) if args.services_db.is_some() => bail!(
            "--services-db names a SQLite file beside --db; with --database-url (or SAGAFLOW_DATABASE_URL) the services' tables are in that one database"
        ),
        Some(_) => None,
        None => Some(Files::of(&args.db, args.services_db.as_deref())?),
    };
    let store = Store::connect_engine(&url, 16).await?;
    // Before anything is written to it: a file of a `sagaflow dev` set that is not an engine's
    // to run this way is refused (the table may not exist yet: no mark then).
    match (store.pair_mark().await.ok().flatten(), &files) {
        (Some(mark), Some(_)) if mark.contains('/') => bail!(
            "{} is a service's file of a sagaflow dev set (its mark says `{}`), not an engine's: give the engine's file with --db",
            args.db.display(),
            mark.rsplit('/').next().unwrap_or_default()
        ),
        (Some(_), None) => bail!(
            "{} is the engine's file of a sagaflow dev set whose services have files of their own: run it with --db, not --database-url (its sagas would run against empty services' tables)",
            sagaflow_engine::redact::redact_url(&url)
        ),
        _ => {}
    }
    store.migrate(&[ENGINE_MIGRATIONS]).await?;
    let (svc, svc_shown) = match &files {
        None => {
            store.migrate(&[services::MIGRATIONS]).await?;
            (ServiceStores::One(store.clone()), None)
        }
        Some(files) => files.open_services(&store).await?,
    };
    let net = match &args.amqp_url {
        None => Net::Memory(Arc::new(MemoryTransport::new(NetFaults {
            duplicate: args.duplicate,
            ..NetFaults::default()
        }))),
        Some(url) => {
            if args.duplicate > 0.0 {
                bail!(
                    "--duplicate injects duplicates in the in-process transport; it cannot be combined with --amqp-url"
                );
            }
            store.bind_prefix(&args.amqp_prefix).await?;
            if svc_shown.is_some() {
                for (s, _) in svc.groups() {
                    s.bind_prefix(&args.amqp_prefix).await?;
                }
            }
            let mut config = AmqpConfig::new(url);
            config.prefix = args.amqp_prefix.clone();
            config.join_declared_partitions = true;
            config.connection_name = format!("sagaflow dev (pid {})", std::process::id());
            Net::Amqp(AmqpTransport::connect(config).await?)
        }
    };
    let transport = net.transport();
    let engine = Engine::new(store.clone(), transport.clone());
    let source = match &args.saga {
        Some(p) => {
            std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?
        }
        None => ORDER_SAGA.to_owned(),
    };
    let graph = engine.register(&source).await?;

    // Every step of the saga needs a worker that can run it: say so now, not in a timeout later.
    let faults_of = |service: &str| Faults {
        business: pick(&args.fail, service),
        transient: pick(&args.flaky, service),
        slow: pick(&args.slow, service),
        slow_for: Duration::from_secs(6),
    };
    let mut workers = Vec::new();
    for service in services::SERVICES {
        let pool = svc
            .of(service)
            .with_context(|| format!("no database was opened for the service `{service}`"))?
            .pool()
            .clone();
        let w = services::worker(service, pool, transport.clone())
            .context("a shipped service has no worker")?
            .with_faults(faults_of(service));
        workers.push(w);
    }
    for step in graph.steps() {
        let kind = &step.kind;
        let fwd = sagaflow_engine::machine::operation_name(
            kind,
            sagaflow_engine::machine::forward_op(kind),
        );
        let ok = workers
            .iter()
            .any(|w| w.service() == step.service && w.handles(fwd));
        if !ok {
            bail!(
                "step `{}` needs service `{}` to run `{fwd}`, and no worker in this process does",
                step.id,
                step.service
            );
        }
    }

    let (stop, stopped) = watch::channel(false);
    let http = match args.http {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} for the HTTP API"))?;
            let shown = listener.local_addr().unwrap_or(addr);
            eprintln!("web console and HTTP API at http://{shown}/");
            Some((
                shown,
                tokio::spawn(sagaflow_engine::http::serve(
                    engine.clone(),
                    listener,
                    stopped.clone(),
                )),
            ))
        }
        None => None,
    };
    let engine_task = tokio::spawn(engine.clone().run(stopped.clone()));
    let worker_stats: Vec<_> = workers.iter().map(|w| w.stats.clone()).collect();
    let worker_tasks: Vec<_> = workers
        .into_iter()
        .map(|w| tokio::spawn(w.run(stopped.clone())))
        .collect();

    let unfinished_before = count_unfinished(&store).await?;
    if unfinished_before > 0 {
        eprintln!("resuming {unfinished_before} unfinished sagas from an earlier run");
    }
    let run_id = uuid::Uuid::now_v7().simple().to_string()[..12].to_owned();
    let orders = sample_orders(&run_id, args.orders);
    for (s, held) in svc.groups() {
        seed_services(s, &orders, &held).await?;
    }

    let total = unfinished_before + args.orders;
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} sagas final ({rate})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .with_key("rate", rounded_rate),
    );
    let started_at = Instant::now();
    let run_started_ms = sagaflow_engine::store::now_ms();
    let mut next = 0usize;
    let mut last_progress = Instant::now();
    let mut last_final = 0u64;
    loop {
        let unfinished = count_unfinished(&store).await?;
        let started = next as u64;
        let finished = total - unfinished - (args.orders - started);
        bar.set_position(finished);
        if finished != last_final {
            last_final = finished;
            last_progress = Instant::now();
        }
        if unfinished == 0 && next == orders.len() {
            break;
        }
        // Keep `concurrency` sagas in flight (resumed ones count too).
        let room = args.concurrency.saturating_sub(unfinished) as usize;
        let end = (next + room).min(orders.len());
        start_orders(&engine, &graph, &orders[next..end])
            .await
            .context("starting a sample order")?;
        next = end;
        if last_progress.elapsed() > args.stall_timeout {
            bar.abandon();
            let _ = stop.send(true);
            bail!(
                "no saga finished for {}; {unfinished} are unfinished (see `sagaflow list --state running`)",
                humantime::format_duration(args.stall_timeout)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bar.finish_and_clear();
    let elapsed = started_at.elapsed();
    if let Some((shown, _)) = &http {
        eprintln!(
            "all {total} sagas are final; the console stays at http://{shown}/ (engine and services running) until Ctrl-C"
        );
        tokio::signal::ctrl_c()
            .await
            .context("cannot wait for Ctrl-C")?;
    }
    let _ = stop.send(true);
    if let Some((_, task)) = http {
        let _ = task.await;
    }
    let _ = engine_task.await;
    for t in worker_tasks {
        let _ = t.await;
    }
    net.close().await;

    let summary = summarize(&store, run_started_ms).await?;
    let mut conn = store.pool().acquire().await?;
    let outcomes = services::outcomes(&mut conn).await?;
    // Given back first: with one SQLite file both stores are its one connection.
    drop(conn);
    let mut violations = Vec::new();
    for (s, held) in svc.groups() {
        let mut conn = s.pool().acquire().await?;
        for service in held {
            violations.extend(services::check(service, &mut conn, &outcomes).await?);
        }
    }
    let this_run = summary.this_run.values().sum::<u64>();
    println!(
        "sagaflow dev: {} ({}{})",
        graph.name(),
        sagaflow_engine::redact::redact_url(&url),
        svc_shown
            .map(|s| format!("; services in {s}"))
            .unwrap_or_default()
    );
    println!(
        "  sagas this run:  {this_run} ({})",
        fmt_counts(&summary.this_run)
    );
    if unfinished_before > 0 {
        println!("  resumed:         {unfinished_before} from an earlier run");
    }
    println!(
        "  all sagas in db: {} ({})",
        summary.all.values().sum::<u64>(),
        fmt_counts(&summary.all)
    );
    let secs = elapsed.as_secs_f64();
    println!(
        "  throughput:      {:.0} sagas/s ({} sagas final in {:.2}s)",
        total as f64 / secs.max(1e-9),
        total,
        secs
    );
    if let (Some(p50), Some(p99)) = (summary.p50, summary.p99) {
        println!("  latency:         p50 {p50} ms, p99 {p99} ms (start to final state)");
    }
    if total > 0 {
        println!(
            "  messages:        {:.1} per saga ({} published, duplicates included)",
            net.published() as f64 / total as f64,
            net.published()
        );
        let c = store.counters();
        println!(
            "  engine database: {:.2} commits and {:.1} statements per saga ({} commits, {} statements)",
            c.commits() as f64 / total as f64,
            c.statements() as f64 / total as f64,
            c.commits(),
            c.statements()
        );
        let worker_commits: u64 = worker_stats
            .iter()
            .map(|s| s.commits.load(std::sync::atomic::Ordering::Relaxed))
            .sum();
        println!(
            "  worker database: {:.2} commits per saga ({worker_commits} commits, four services)",
            worker_commits as f64 / total as f64
        );
    }
    Ok(report_invariants(outcomes.len(), &violations))
}

/// Prints the invariant line (and the violations); exit 0 when they hold, 1 otherwise.
pub(crate) fn report_invariants(checked: usize, violations: &[String]) -> ExitCode {
    if violations.is_empty() {
        println!(
            "  invariants:      OK — money conserved, each completed order charged once, coupon used once, points granted once, GMV = sum of completed orders; compensated orders net zero ({} sagas checked)",
            checked
        );
        ExitCode::SUCCESS
    } else {
        println!("  invariants:      {} VIOLATED", violations.len());
        for v in violations.iter().take(50) {
            println!("    - {v}");
        }
        ExitCode::from(1)
    }
}

/// The SQLite files of a run: the engine's, and one per service. The services have their own,
/// as they have their own databases in production: SQLite has one writer per file, and sqlx
/// runs a file's statements one at a time on a thread of its own, each a hand-off and back.
/// With one file the engine's batches and the workers' waited for each other (measured,
/// `sagaflow dev --orders 10000` alternating: 923–1,234 sagas/s with one, 1,349–1,969 with
/// two); with one services' file the four workers' transactions did (813–884 sagas/s with one
/// for the four, 1,124–1,236 with one each, alternating on a slower machine).
///
/// They belong together: the first run writes one random mark into every one (`pair_mark`;
/// in a service's file with the service's name after it, [`Files::mark_of`]), and a run
/// starts only on a set, never with a file missing, from another run or taken for another
/// service's — a services' file without the effects of the engine's sagas (or with another
/// run's) would have the sagas charge, or not charge, against the wrong accounts. An engine's file without a mark
/// whose services' tables hold rows is from before the engine's and the services' files were
/// apart (or `--database-url`'s one database): it keeps them inside. A services' file of the
/// services' name itself (`sagaflow.services.db`) is from before each service had its own: it
/// keeps all four.
struct Files {
    engine: PathBuf,
    /// The services' name, each service's file named from it ([`service_path`]).
    services: PathBuf,
    /// Given with `--services-db` (not derived from `--db`).
    named: bool,
    /// The services' one file of an earlier version (`services` itself) is there.
    one_file: bool,
    /// Each service's file, and whether it was there before this run opened it.
    each: Vec<(&'static str, PathBuf, bool)>,
}

impl Files {
    /// Before any is opened (and so created): a services' file without its engine's is
    /// refused, and so are names that would make one file play two parts.
    fn of(db: &Path, services: Option<&Path>) -> anyhow::Result<Files> {
        let named = services.is_some();
        let services = services.map_or_else(|| services_path(db), Path::to_path_buf);
        if named && let Some(service) = service_named(&services) {
            bail!(
                "--services-db {} names the {service} service's file: give the services' name it was made from (e.g. `--services-db sagaflow.services.db` for sagaflow.services.payment.db, sagaflow.services.coupon.db, …)",
                services.display()
            );
        }
        let each: Vec<(&'static str, PathBuf, bool)> = services::SERVICES
            .iter()
            .map(|s| {
                let path = service_path(&services, s);
                let existed = plain_path(&path).is_file();
                (*s, path, existed)
            })
            .collect();
        let engine = plain_path(db);
        let engine_at = resolved(db);
        if resolved(&services) == engine_at {
            bail!(
                "--services-db names the engine's own file {}: give the services a file of their own",
                db.display()
            );
        }
        if let Some((service, path, _)) = each.iter().find(|(_, p, _)| resolved(p) == engine_at) {
            bail!(
                "the {service} service's file, named from the services' name {} (`--services-db`), would be the engine's own file {}: give the services another name",
                services.display(),
                path.display()
            );
        }
        let files = Files {
            engine: db.to_path_buf(),
            one_file: plain_path(&services).is_file(),
            services,
            named,
            each,
        };
        let per_service: Vec<&Path> = files
            .each
            .iter()
            .filter(|(_, _, existed)| *existed)
            .map(|(_, p, _)| p.as_path())
            .collect();
        if files.one_file && !per_service.is_empty() {
            bail!(
                "both {} (the four services in one file, as earlier versions kept them) and {} are there: only one of the two can be the services' database of {}; move the other away",
                files.services.display(),
                list_and(&per_service),
                files.engine.display()
            );
        }
        let existing = files.existing();
        if let Some(first) = existing.first()
            && !engine.is_file()
        {
            bail!(
                "{} holds the services' tables of an earlier run, but their engine database {} is missing: restore it, or delete {} to start afresh",
                first.display(),
                files.engine.display(),
                with_companions(&existing)
            );
        }
        Ok(files)
    }

    /// The services' files there before this run.
    fn existing(&self) -> Vec<&Path> {
        if self.one_file {
            return vec![self.services.as_path()];
        }
        self.each
            .iter()
            .filter(|(_, _, existed)| *existed)
            .map(|(_, p, _)| p.as_path())
            .collect()
    }

    /// The services' files as a summary names them.
    fn shown(&self) -> String {
        if self.one_file {
            return self.services.display().to_string();
        }
        let names = format!("{{{}}}", services::SERVICES.join(","));
        service_path(&self.services, &names).display().to_string()
    }

    /// The mark a services' file of `service` carries in a set whose engine's file carries
    /// `mark`: the service's name after it, so that no file is taken for another service's (a
    /// file of the four services of an earlier version carries the engine's mark as it is).
    fn mark_of(&self, mark: &str, service: &str) -> String {
        if self.one_file {
            mark.to_owned()
        } else {
            format!("{mark}/{service}")
        }
    }

    /// Opens the services' stores, and says which files they are (None: inside the engine's).
    async fn open_services(
        &self,
        store: &Store,
    ) -> anyhow::Result<(ServiceStores, Option<String>)> {
        let (engine, shown) = (self.engine.display(), self.shown());
        let afresh = || {
            let mut files = vec![self.engine.as_path()];
            if self.one_file {
                files.push(&self.services);
            } else {
                files.extend(self.each.iter().map(|(_, p, _)| p.as_path()));
            }
            format!("delete {} to start afresh", with_companions(&files))
        };
        let by_name = || {
            format!(
                "give the services' name it was run with in --services-db (`--services-db {}` names {shown})",
                self.services.display()
            )
        };
        let mark = store.pair_mark().await?;
        let existing = self.existing();
        let inside = services_inside(store).await?;
        if inside && mark.is_some() {
            bail!(
                "{engine} was run with the services' database {shown}, yet it holds services' rows inside (was it run with --database-url?): its sagas' effects are not all in one place, so it cannot be resumed; {}",
                afresh()
            );
        }
        if existing.is_empty() {
            if mark.is_some() {
                bail!(
                    "{engine} was run with the services' database {shown} (or {}, as earlier versions kept it), which is missing: restore it, {}, or {}",
                    self.services.display(),
                    by_name(),
                    afresh()
                );
            }
            if inside {
                if self.named {
                    bail!(
                        "{engine} keeps the services' tables inside (written before they had a file of their own, or with --database-url): run it without --services-db"
                    );
                }
                store.migrate(&[services::MIGRATIONS]).await?;
                return Ok((ServiceStores::One(store.clone()), None));
            }
        } else if inside {
            bail!(
                "{engine} keeps the services' tables inside (written before they had a file of their own, or with --database-url), so {} beside it cannot be its: move {} away",
                list_and(&existing),
                if existing.len() == 1 { "it" } else { "them" }
            );
        }
        let missing: Vec<&Path> = if self.one_file {
            Vec::new()
        } else {
            self.each
                .iter()
                .filter(|(_, _, existed)| !existed)
                .map(|(_, p, _)| p.as_path())
                .collect()
        };
        if mark.is_some() && !missing.is_empty() {
            bail!(
                "{engine} was run with the services' database {shown}, of which {} {} missing: restore {}, or {}",
                list_and(&missing),
                if missing.len() == 1 { "is" } else { "are" },
                if missing.len() == 1 { "it" } else { "them" },
                afresh()
            );
        }
        // The files that are there first, so that a set refused makes no file.
        let there: Vec<(&'static str, &Path)> = if self.one_file {
            vec![("", self.services.as_path())]
        } else {
            self.each
                .iter()
                .filter(|(_, _, existed)| *existed)
                .map(|(s, p, _)| (*s, p.as_path()))
                .collect()
        };
        let mut opened = Vec::with_capacity(self.each.len());
        let mut odd = Vec::new();
        let mut holding = false;
        // Whether every file there could start a new set: unmarked, or marked for its own service
        // by a first run that stopped before the engine's mark.
        let mut unclaimed = true;
        for (service, path) in there {
            let svc = open_services_file(path).await?;
            let found = svc.pair_mark().await?;
            let expected = mark.as_deref().map(|m| self.mark_of(m, service));
            if found != expected {
                odd.push(path);
            }
            unclaimed &= match &found {
                None => true,
                Some(m) => self.one_file || m.ends_with(&format!("/{service}")),
            };
            holding |= services_inside(&svc).await?;
            opened.push((service, svc));
        }
        let paired = mark.is_some() && odd.is_empty();
        // A new set, or one whose first run stopped between the marks: only while the services'
        // files hold nothing yet.
        let fresh = mark.is_none() && !holding && unclaimed;
        if !paired && !fresh {
            let named = if odd.is_empty() { self.existing() } else { odd };
            let one = named.len() == 1;
            if mark.is_none() {
                bail!(
                    "{engine} and {shown} do not belong together: {engine} never ran with services' files, and {} {} a run's data or another set's mark: {}",
                    list_and(&named),
                    if one { "holds" } else { "hold" },
                    afresh()
                );
            }
            bail!(
                "{engine} and {shown} do not belong together: {} {} not carry the mark of {engine}'s run (written by another run, or for another service): {}, or {}",
                list_and(&named),
                if one { "does" } else { "do" },
                by_name(),
                afresh()
            );
        }
        for (service, path) in self
            .each
            .iter()
            .filter(|(_, _, existed)| !existed && !self.one_file)
            .map(|(s, p, _)| (*s, p))
        {
            opened.push((service, open_services_file(path).await?));
        }
        if !paired {
            let new = uuid::Uuid::now_v7().simple().to_string();
            for (service, svc) in &opened {
                svc.set_pair_mark(&self.mark_of(&new, service)).await?;
            }
            store.set_pair_mark(&new).await?;
        }
        let stores = if self.one_file {
            let (_, svc) = opened.remove(0);
            ServiceStores::One(svc)
        } else {
            ServiceStores::Each(opened)
        };
        Ok((stores, Some(shown)))
    }
}

/// The services' stores: one for all four (the engine's own with `--database-url`, or a file of
/// an earlier version), or each service's own.
enum ServiceStores {
    One(Store),
    Each(Vec<(&'static str, Store)>),
}

impl ServiceStores {
    /// The store `service`'s worker writes to.
    fn of(&self, service: &str) -> Option<&Store> {
        match self {
            ServiceStores::One(s) => Some(s),
            ServiceStores::Each(each) => each
                .iter()
                .find(|(name, _)| *name == service)
                .map(|(_, s)| s),
        }
    }

    /// Each store once, with the services whose tables it holds.
    fn groups(&self) -> Vec<(&Store, Vec<&'static str>)> {
        match self {
            ServiceStores::One(s) => vec![(s, services::SERVICES.to_vec())],
            ServiceStores::Each(each) => each.iter().map(|(name, s)| (s, vec![*name])).collect(),
        }
    }
}

/// A path as the file system has it (`./x.db`, `sqlite://x.db`, a symlink and `x.db` alike),
/// to tell whether two names are one file: the file itself when it exists, else its directory.
fn resolved(path: &Path) -> PathBuf {
    let plain = plain_path(path);
    if let Ok(real) = plain.canonicalize() {
        return real;
    }
    let dir = match plain.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    match (dir.canonicalize(), plain.file_name()) {
        (Ok(dir), Some(name)) => dir.join(name),
        _ => plain,
    }
}

/// A services' file, opened (made if missing) with the services' tables; an engine's database
/// is refused before anything is written to it.
async fn open_services_file(path: &Path) -> anyhow::Result<Store> {
    let svc = Store::connect(&path.display().to_string(), 1).await?;
    if is_engines(&svc).await {
        bail!(
            "{} is an engine's database, not a services' file: give the services another name with --services-db",
            path.display()
        );
    }
    svc.migrate(&[services::MIGRATIONS]).await?;
    Ok(svc)
}

/// Whether this database has the engine's tables (a services' file never has).
async fn is_engines(store: &Store) -> bool {
    let (first, ..) = ENGINE_MIGRATIONS[0];
    store
        .applied_migrations()
        .await
        .is_ok_and(|applied| applied.iter().any(|m| m == first))
}

/// `a`, `a and b`, `a, b and c`.
fn list_and(paths: &[&Path]) -> String {
    let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    match names.split_last() {
        None => String::new(),
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
    }
}

/// The service whose file `services` names, if it is one (`x.services.payment.db`): given as
/// the services' name, it would be taken for a file of all four.
fn service_named(services: &Path) -> Option<&'static str> {
    let plain = plain_path(services);
    let name = plain.file_name()?.to_string_lossy().into_owned();
    let sqlite = ["db", "sqlite", "sqlite3", "db3"];
    let stem = match name.rsplit_once('.') {
        Some((stem, ext)) if sqlite.contains(&ext.to_ascii_lowercase().as_str()) => stem,
        _ => name.as_str(),
    };
    let (_, last) = stem.rsplit_once('.')?;
    services::SERVICES.iter().find(|s| **s == last).copied()
}

/// SQLite files and the WAL files SQLite keeps beside each: `x.db (and x.db-wal, x.db-shm)`,
/// or `x.db, y.db and their -wal and -shm files`.
fn with_companions(paths: &[&Path]) -> String {
    match paths {
        [one] => {
            let p = one.display();
            format!("{p} (and {p}-wal, {p}-shm)")
        }
        _ => {
            let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
            format!("{} and their -wal and -shm files", names.join(", "))
        }
    }
}

/// Whether the services' tables of this database exist and hold rows.
async fn services_inside(store: &Store) -> anyhow::Result<bool> {
    let (first, ..) = services::MIGRATIONS[0];
    if !store.applied_migrations().await?.iter().any(|m| m == first) {
        return Ok(false);
    }
    let mut conn = store.pool().acquire().await?;
    Ok(services::hold_rows(&mut conn).await?)
}

/// The file a `--db` value names (`sqlite://x.db?mode=rwc` → `x.db`).
fn plain_path(db: &Path) -> PathBuf {
    let text = db.to_string_lossy();
    let path = text
        .strip_prefix("sqlite://")
        .or_else(|| text.strip_prefix("sqlite:"))
        .unwrap_or(&text);
    PathBuf::from(path.split_once('?').map_or(path, |(p, _)| p))
}

/// The services' name beside the engine's file (each service's file is named from it, see
/// [`service_path`]): `sagaflow.db` → `sagaflow.services.db`, `run` →
/// `run.services`.
fn services_path(db: &Path) -> PathBuf {
    let db = plain_path(db);
    let stem = db.file_stem().map(|s| s.to_string_lossy().into_owned());
    let name = match (stem, db.extension()) {
        (Some(stem), Some(ext)) => format!("{stem}.services.{}", ext.to_string_lossy()),
        (Some(stem), None) => format!("{stem}.services"),
        (None, _) => "sagaflow.services.db".to_owned(),
    };
    db.with_file_name(name)
}

/// A service's file, named from the services' name: before its SQLite extension
/// (`sagaflow.services.db` → `sagaflow.services.payment.db`), or after a name without one
/// (`run.services` → `run.services.payment`).
fn service_path(services: &Path, service: &str) -> PathBuf {
    let plain = plain_path(services);
    let name = plain.file_name().map_or_else(
        || "sagaflow.services".to_owned(),
        |n| n.to_string_lossy().into_owned(),
    );
    let sqlite = ["db", "sqlite", "sqlite3", "db3"];
    let name = match name.rsplit_once('.') {
        Some((stem, ext)) if sqlite.contains(&ext.to_ascii_lowercase().as_str()) => {
            format!("{stem}.{service}.{ext}")
        }
        _ => format!("{name}.{service}"),
    };
    plain.with_file_name(name)
}

/// The transport a dev run uses.
enum Net {
    Memory(Arc<MemoryTransport>),
    Amqp(Arc<AmqpTransport>),
}

impl Net {
    fn transport(&self) -> Arc<dyn Transport> {
        match self {
            Net::Memory(t) => t.clone(),
            Net::Amqp(t) => t.clone(),
        }
    }

    fn published(&self) -> u64 {
        match self {
            Net::Memory(t) => t.published(),
            Net::Amqp(t) => t.published(),
        }
    }

    async fn close(&self) {
        match self {
            Net::Memory(t) => t.close(),
            Net::Amqp(t) => t.close().await,
        }
    }
}

pub(crate) fn pick(list: &[(String, f64)], service: &str) -> f64 {
    list.iter()
        .rev()
        .find(|(s, _)| s == service)
        .map_or(0.0, |(_, r)| *r)
}

/// A progress bar's `{rate}`: items per second, rounded.
pub(crate) fn rounded_rate(state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write) {
    let _ = write!(w, "{:.0}/s", state.per_sec());
}

pub(crate) fn sample_orders(run_id: &str, n: u64) -> Vec<serde_json::Value> {
    (0..n).map(|i| sample_order(run_id, i)).collect()
}

/// Sample order `i` of a run: its user, coupon and campaign are what [`seed`] provides; the
/// amount is random (seeding does not depend on it).
pub(crate) fn sample_order(run_id: &str, i: u64) -> serde_json::Value {
    let campaigns = ["spring-sale", "summer-sale", "autumn-sale"];
    let cents = 100 + fastrand::u64(..50_000);
    json!({
        "order_id": format!("o-{run_id}-{i}"),
        "user_id": format!("u-{run_id}-{i}"),
        "amount": format!("{}.{:02}", cents / 100, cents % 100),
        "coupon_id": format!("c-{run_id}-{i}"),
        "points": cents / 100,
        "campaign_id": campaigns[(i % 3) as usize],
    })
}

/// Accounts with enough money, one coupon per order, the campaigns.
pub(crate) async fn seed(store: &Store, orders: &[serde_json::Value]) -> anyhow::Result<()> {
    seed_services(store, orders, services::SERVICES).await
}

/// [`seed`] for the tables of these services only (those a services' file holds).
async fn seed_services(
    store: &Store,
    orders: &[serde_json::Value],
    held: &[&str],
) -> anyhow::Result<()> {
    let mut tx = store.pool().begin().await?;
    let accounts: Vec<(String, i64)> = orders
        .iter()
        .map(|o| {
            (
                o["user_id"].as_str().unwrap_or_default().to_owned(),
                100_000, // 1000.00 in cents
            )
        })
        .collect();
    let coupons: Vec<(String, String)> = orders
        .iter()
        .map(|o| {
            (
                o["coupon_id"].as_str().unwrap_or_default().to_owned(),
                o["user_id"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    if held.contains(&"payment") {
        services::payment::seed(&mut tx, &accounts).await?;
    }
    if held.contains(&"coupon") {
        services::coupon::seed(&mut tx, &coupons).await?;
    }
    let campaigns: Vec<String> = ["spring-sale", "summer-sale", "autumn-sale"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    if held.contains(&"gmv") {
        services::gmv::seed(&mut tx, &campaigns).await?;
    }
    tx.commit().await?;
    Ok(())
}

async fn count_unfinished(store: &Store) -> anyhow::Result<u64> {
    Ok(store.unfinished_count().await?)
}

pub(crate) struct Summary {
    pub this_run: BTreeMap<String, u64>,
    pub all: BTreeMap<String, u64>,
    pub p50: Option<i64>,
    pub p90: Option<i64>,
    pub p99: Option<i64>,
    pub max: Option<i64>,
}

/// Counts by status (this run's and all) and start-to-final latency percentiles of the sagas
/// created since `since`, computed by the database (nothing per saga is held here).
pub(crate) async fn summarize(store: &Store, since: i64) -> anyhow::Result<Summary> {
    let this_run = store.status_counts(Some(since)).await?;
    let all = store.status_counts(None).await?;
    let latencies = store.latencies(since, &[0.50, 0.90, 0.99, 1.0]).await?;
    let [p50, p90, p99, max] = latencies.at[..] else {
        bail!(
            "the store answered {} latencies for 4 quantiles",
            latencies.at.len()
        );
    };
    Ok(Summary {
        this_run,
        all,
        p50,
        p90,
        p99,
        max,
    })
}

pub(crate) fn fmt_counts(m: &BTreeMap<String, u64>) -> String {
    if m.is_empty() {
        return "none".into();
    }
    m.iter()
        .map(|(k, v)| format!("{v} {k}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Starts per transaction in [`start_orders`].
const START_CHUNK: usize = 256;

/// Starts these orders of `graph`. The one place `sagaflow dev` and the bench start sagas: in
/// chunks of [`START_CHUNK`], one transaction each (the engine's batch path, as the start
/// queue's consumer uses it). Returns the sagas' ids, in order.
pub async fn start_orders(
    engine: &Engine,
    graph: &Arc<sagaflow_dsl::SagaGraph>,
    orders: &[serde_json::Value],
) -> anyhow::Result<Vec<String>> {
    // One transaction per chunk: the engine's batch path, as the start queue's consumer uses it.
    let mut ids = Vec::with_capacity(orders.len());
    for chunk in orders.chunks(START_CHUNK) {
        let batch = chunk.iter().map(|o| (o.clone(), None)).collect();
        for started in engine.start_many(graph, batch).await {
            ids.push(started.context("starting an order")?.id);
        }
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_service_has_a_file_named_from_the_services_name() {
        let p = |base: &str, s: &str| service_path(Path::new(base), s);
        assert_eq!(
            p("sagaflow.services.db", "payment"),
            PathBuf::from("sagaflow.services.payment.db")
        );
        assert_eq!(p("a/s.SQLITE", "gmv"), PathBuf::from("a/s.gmv.SQLITE"));
        assert_eq!(
            p("data/run.services", "coupon"),
            PathBuf::from("data/run.services.coupon")
        );
        assert_eq!(
            p("sqlite://a/b.services.db?mode=rwc", "points"),
            PathBuf::from("a/b.services.points.db")
        );
    }

    #[test]
    fn an_earlier_versions_one_services_file_is_kept_and_files_are_not_the_engines() {
        struct Gone(PathBuf);
        impl Drop for Gone {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        let dir =
            std::env::temp_dir().join(format!("sagaflow-dev-files-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let _gone = Gone(dir.clone());
        let engine = dir.join("e.db");
        let services = dir.join("e.services.db");
        let fresh = Files::of(&engine, None).expect("a fresh set");
        assert!(!fresh.one_file);
        assert_eq!(fresh.each.len(), services::SERVICES.len());
        assert!(fresh.existing().is_empty());
        assert_eq!(
            fresh.shown(),
            dir.join("e.services.{payment,coupon,points,gmv}.db")
                .display()
                .to_string()
        );
        // An earlier version's services' file, and its engine's.
        std::fs::write(&engine, b"").expect("engine file");
        std::fs::write(&services, b"").expect("services file");
        let old = Files::of(&engine, None).expect("an earlier version's pair");
        assert!(old.one_file);
        assert_eq!(old.existing(), vec![services.as_path()]);
        assert_eq!(old.shown(), services.display().to_string());
        // Without its engine's file: refused.
        std::fs::remove_file(&engine).expect("remove");
        let err = Files::of(&engine, None).err().expect("refused").to_string();
        assert!(err.contains("but their engine database"), "{err}");
        // A service's file that is the engine's own: refused.
        let err = Files::of(&dir.join("s.payment.db"), Some(&dir.join("s.db")))
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains("would be the engine's own file"), "{err}");
        // A service's file given as the services' name: refused before anything is opened.
        let err = Files::of(&engine, Some(&dir.join("e.services.points.db")))
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains("names the points service's file"), "{err}");
        // Both layouts beside one engine: refused, naming both.
        std::fs::write(&engine, b"").expect("engine file");
        std::fs::write(dir.join("e.services.gmv.db"), b"").expect("a service's file");
        let err = Files::of(&engine, None).err().expect("refused").to_string();
        assert!(err.contains("only one of the two"), "{err}");
        assert!(err.contains("e.services.gmv.db"), "{err}");
    }

    #[test]
    fn names_of_services_files_and_lists() {
        assert_eq!(
            service_named(Path::new("x.services.payment.db")),
            Some("payment")
        );
        assert_eq!(service_named(Path::new("a/x.gmv")), Some("gmv"));
        assert_eq!(service_named(Path::new("x.services.db")), None);
        assert_eq!(service_named(Path::new("payment.db")), None);
        let p = |s: &'static str| Path::new(s);
        assert_eq!(list_and(&[p("a")]), "a");
        assert_eq!(list_and(&[p("a"), p("b")]), "a and b");
        assert_eq!(list_and(&[p("a"), p("b"), p("c")]), "a, b and c");
        assert_eq!(
            with_companions(&[p("a.db")]),
            "a.db (and a.db-wal, a.db-shm)"
        );
        assert_eq!(
            with_companions(&[p("a.db"), p("b.db")]),
            "a.db, b.db and their -wal and -shm files"
        );
    }

    #[test]
    fn the_services_file_sits_beside_the_engines() {
        let p = |s: &str| services_path(Path::new(s));
        assert_eq!(p("sagaflow.db"), PathBuf::from("sagaflow.services.db"));
        assert_eq!(
            p("/var/run/x.sqlite"),
            PathBuf::from("/var/run/x.services.sqlite")
        );
        assert_eq!(p("data/run"), PathBuf::from("data/run.services"));
        assert_eq!(
            p("sqlite://a/b.db?mode=rwc"),
            PathBuf::from("a/b.services.db")
        );
        assert_eq!(p("sqlite:b.db"), PathBuf::from("b.services.db"));
    }
}

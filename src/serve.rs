//! Production processes: `sagaflow engine` and `sagaflow worker SERVICE`, over RabbitMQ and
//! PostgreSQL. Any number of each may run against one broker and database: partitions are
//! consumed by one process at a time (single-active-consumer), the outbox relay and timers are
//! claimed row by row, and a saga's version check refuses a second writer.
//!
//! Shutdown on SIGTERM or ctrl-c is graceful: stop taking messages, finish what is in flight,
//! acknowledge it, close the connection (anything unacknowledged goes back to its queue).
//!
//! At start a process waits for its database and its broker: while PostgreSQL refuses
//! connections, is starting up, has no free connection slot or lacks the database, and while
//! RabbitMQ cannot be reached, it retries with exponential backoff (250 ms up to 10 s, jittered)
//! and prints each failure with its reason; SIGTERM or ctrl-c meanwhile ends it with success.
//! Errors that waiting cannot fix (a malformed URL, a refused password, a partition count that
//! disagrees with the deployment's) end it at once.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use sagaflow_engine::store::ENGINE_MIGRATIONS;
use sagaflow_engine::transport::Transport;
use sagaflow_engine::transport::amqp::{AmqpConfig, AmqpTransport, DEFAULT_PARTITIONS, QueueType};
use sagaflow_engine::{Engine, startup};
use sagaflow_workers::runtime::Faults;
use sagaflow_workers::services;
use tokio::sync::watch;

/// The sagas shipped with sagaflow, registered by every engine (and `dev`).
pub const SHIPPED_SAGAS: [(&str, &str); 2] = [
    ("sagas/order.yaml", include_str!("../sagas/order.yaml")),
    (
        "sagas/order-refund.yaml",
        include_str!("../sagas/order-refund.yaml"),
    ),
];

/// Where the broker is and how the deployment's queues are laid out; every process of one
/// deployment must agree (a different partition count is refused at start).
#[derive(Debug, Clone, clap::Args)]
pub struct AmqpArgs {
    /// The RabbitMQ address [default: amqp://guest:***@127.0.0.1:5672/%2f, RabbitMQ's own
    /// guest account on this machine].
    #[arg(
        long,
        env = "SAGAFLOW_AMQP_URL",
        hide_env_values = true,
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_default_value = true,
        value_name = "URL"
    )]
    pub amqp_url: String,
    /// Partitions per queue: each order key maps to one (per-order FIFO), and up to this many
    /// processes of a service consume at once. Without it, a process joins the deployment with
    /// the count it was declared with, and a new deployment gets 1 (see
    /// `docs/architecture.md`, "Measured choices").
    #[arg(long, env = "SAGAFLOW_PARTITIONS")]
    pub partitions: Option<u16>,
    /// `classic` for one RabbitMQ node, `quorum` (replicated) for a cluster.
    #[arg(long, env = "SAGAFLOW_QUEUE_TYPE", default_value = "classic")]
    pub queue_type: QueueType,
    /// Prefix of every exchange and queue: separate deployments on one broker.
    #[arg(long, env = "SAGAFLOW_PREFIX", default_value = "sagaflow")]
    pub prefix: String,
    /// Unacknowledged messages per partition consumer.
    #[arg(long, env = "SAGAFLOW_PREFETCH", default_value_t = 64)]
    pub prefetch: u16,
    /// At most this many messages for one partition queue travel in one AMQP message (a
    /// bundle; each message in it is still acknowledged, deduplicated and dead-lettered on its
    /// own). 1 sends every message on its own.
    #[arg(long, env = "SAGAFLOW_BUNDLE", default_value_t = 128)]
    pub bundle: u16,
    /// With `--queue-type quorum`: a message delivered this many times without being settled
    /// (its consumer crashed on it every time) goes to the dead-letter queue with the reason,
    /// instead of blocking its partition (0: no limit). Classic queues have no such limit.
    #[arg(long, env = "SAGAFLOW_DELIVERY_LIMIT", default_value_t = sagaflow_engine::transport::amqp::DEFAULT_DELIVERY_LIMIT)]
    pub delivery_limit: u32,
}

impl AmqpArgs {
    pub async fn connect(&self, role: &str) -> anyhow::Result<Arc<AmqpTransport>> {
        Ok(AmqpTransport::connect(self.config(role)).await?)
    }

    fn config(&self, role: &str) -> AmqpConfig {
        let mut config = AmqpConfig::new(&self.amqp_url);
        config.partitions = self.partitions.unwrap_or(DEFAULT_PARTITIONS);
        config.join_declared_partitions = self.partitions.is_none();
        config.queue_type = self.queue_type;
        config.prefix = self.prefix.clone();
        config.prefetch = self.prefetch;
        config.bundle = self.bundle;
        config.delivery_limit = self.delivery_limit;
        config.connection_name = format!("sagaflow {role} (pid {})", std::process::id());
        config
    }
}

/// When a worker's batch uses savepoints (`--savepoints`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Savepoints {
    /// Run a batch without savepoints first; only when a handler fails, run it again with
    /// savepoints, one every 4 handlers (a chunk with a failure runs again with one per
    /// handler), and so the next 32 batches.
    OnFailure,
    /// A savepoint around every handler from the start.
    Always,
}

#[derive(Debug, clap::Args)]
pub struct EngineArgs {
    /// The engine's PostgreSQL database.
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
    /// Serve the HTTP API (status, start, retry, abort, /metrics, /healthz) here.
    #[arg(long, env = "SAGAFLOW_HTTP", default_value = "127.0.0.1:8080")]
    pub http: SocketAddr,
    /// More saga definitions to register (the shipped ones always are).
    #[arg(long = "saga", value_name = "FILE")]
    pub sagas: Vec<PathBuf>,
    /// Keep the history and timer rows of finished sagas this long.
    #[arg(long, env = "SAGAFLOW_RETENTION", default_value = "7d", value_parser = humantime::parse_duration)]
    pub retention: Duration,
    /// Database connections of this process (at most; the outbox relay has one more of its
    /// own). The budget: engines × 9 + worker processes × 5 must stay below PostgreSQL's
    /// max_connections (default 100) with room for operators and migrations, e.g. 2 engines
    /// and 2 processes of each of the 4 workers: 2·9 + 8·5 = 58.
    #[arg(long, env = "SAGAFLOW_POOL", default_value_t = 8)]
    pub pool: u32,
}

#[derive(Debug, clap::Args)]
pub struct WorkerArgs {
    /// The service to run: payment, coupon, points or gmv.
    #[arg(value_parser = known_service)]
    pub service: String,
    /// The service's PostgreSQL database (its tables and its barrier).
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
    /// Lanes: batches handled concurrently, one database connection each (each order key
    /// stays on one lane, in order).
    #[arg(long, default_value_t = sagaflow_workers::runtime::DEFAULT_LANES)]
    pub lanes: usize,
    /// Commands a lane takes into one database transaction at most.
    #[arg(long, default_value_t = sagaflow_workers::runtime::DEFAULT_BATCH)]
    pub batch: usize,
    /// `on-failure`: a batch first runs its handlers without savepoints and is redone with
    /// them (one every 4 handlers) only when a handler fails (one round trip less per
    /// command); `always`: a savepoint per handler from the start.
    #[arg(long, env = "SAGAFLOW_SAVEPOINTS", default_value = "on-failure")]
    pub savepoints: Savepoints,
    /// For demos and fault tests: business failures of forward operations (0..1).
    #[arg(long, default_value_t = 0.0, value_parser = crate::dev::rate)]
    pub fail: f64,
    /// For demos and fault tests: transient failures (retried with backoff) (0..1).
    #[arg(long, default_value_t = 0.0, value_parser = crate::dev::rate)]
    pub flaky: f64,
    /// For demos and fault tests: answers slower than the step timeout (0..1).
    #[arg(long, default_value_t = 0.0, value_parser = crate::dev::rate)]
    pub slow: f64,
    /// Keep barrier rows this long (longer than any saga runs).
    #[arg(long, env = "SAGAFLOW_RETENTION", default_value = "7d", value_parser = humantime::parse_duration)]
    pub retention: Duration,
    /// Database connections of this process (at most). The budget: engines × 9 (8 and the
    /// relay's one) + worker processes × 5 must stay below PostgreSQL's max_connections
    /// (default 100) with room for operators and migrations, e.g. 2 engines and 2 processes of
    /// each of the 4 workers: 2·9 + 8·5 = 58. Lanes wait for a connection when all are busy.
    #[arg(long, env = "SAGAFLOW_POOL", default_value_t = 5)]
    pub pool: u32,
    /// Serve the worker's counters (commands, duplicates, dead letters, commits) as Prometheus
    /// metrics at `GET /metrics` on this address, e.g. 127.0.0.1:9101.
    #[arg(long, env = "SAGAFLOW_METRICS", value_name = "ADDR")]
    pub metrics: Option<std::net::SocketAddr>,
}

/// `--metrics ADDR`: the worker's counters at `GET /metrics` until shutdown.
async fn serve_worker_metrics(
    addr: std::net::SocketAddr,
    service: String,
    stats: Arc<sagaflow_workers::runtime::Stats>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    use axum::http::header;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for the worker's metrics"))?;
    let address = listener.local_addr()?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let text = sagaflow_workers::metrics::encode(&service, &stats);
            async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        sagaflow_workers::metrics::CONTENT_TYPE,
                    )],
                    text,
                )
            }
        }),
    );
    eprintln!("metrics at http://{address}/metrics");
    Ok(tokio::spawn(async move {
        let stop = async move {
            let _ = shutdown.wait_for(|s| *s).await;
        };
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(stop)
            .await
        {
            tracing::warn!(error = %e, "the metrics server stopped");
        }
    }))
}

fn known_service(s: &str) -> Result<String, String> {
    if services::SERVICES.contains(&s) {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "unknown service `{s}`; the services are {}",
            services::SERVICES.join(", ")
        ))
    }
}

/// How long the engine waits, after SIGTERM or ctrl-c, for its in-flight work.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(15);

impl AmqpArgs {
    /// [`AmqpArgs::connect`], waiting while the broker is unreachable; `None` on shutdown.
    pub async fn connect_waiting(
        &self,
        role: &str,
        who: &str,
        shutdown: &mut watch::Receiver<bool>,
    ) -> anyhow::Result<Option<Arc<AmqpTransport>>> {
        Ok(startup::connect_amqp(who, self.config(role), shutdown).await?)
    }
}

pub async fn register_sagas(engine: &Engine, extra: &[PathBuf]) -> anyhow::Result<Vec<String>> {
    let mut names = Vec::new();
    for (path, source) in SHIPPED_SAGAS {
        let g = engine
            .register(source)
            .await
            .with_context(|| format!("registering the shipped {path}"))?;
        names.push(g.name().to_owned());
    }
    for path in extra {
        let source = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let g = engine
            .register(&source)
            .await
            .with_context(|| format!("registering {}", path.display()))?;
        names.push(g.name().to_owned());
    }
    Ok(names)
}

/// The exit of a process stopped by a signal while it waited for its database or broker.
fn stopped_while_waiting(who: &str) -> anyhow::Result<ExitCode> {
    eprintln!("{who}: stopped before it was ready");
    Ok(ExitCode::SUCCESS)
}

pub async fn engine(args: EngineArgs) -> anyhow::Result<ExitCode> {
    let who = "sagaflow engine";
    let mut shutdown = startup::shutdown_on_signal("sagaflow");
    let Some(store) = startup::connect_store(
        who,
        &args.database_url,
        args.pool,
        &[ENGINE_MIGRATIONS],
        true,
        &mut shutdown,
    )
    .await?
    else {
        return stopped_while_waiting(who);
    };
    // Before the broker: a process of another deployment touches none of its queues.
    store.bind_prefix(&args.amqp.prefix).await?;
    let Some(transport) = args
        .amqp
        .connect_waiting("engine", who, &mut shutdown)
        .await?
    else {
        return stopped_while_waiting(who);
    };
    let engine = Engine::new(store.clone(), transport.clone() as Arc<dyn Transport>);
    let names = register_sagas(&engine, &args.sagas).await?;
    let listener = tokio::net::TcpListener::bind(args.http)
        .await
        .with_context(|| format!("cannot listen on {} for the HTTP API", args.http))?;
    let address = listener.local_addr()?;
    eprintln!(
        "sagaflow engine: sagas {}; RabbitMQ {} partitions ({}, prefix `{}`); HTTP on http://{address}",
        names.join(", "),
        transport.config().partitions,
        args.amqp.queue_type.as_str(),
        args.amqp.prefix,
    );
    let http = tokio::spawn(sagaflow_engine::http::serve(
        engine.clone(),
        listener,
        shutdown.clone(),
    ));
    let retention = tokio::spawn(sagaflow_engine::retention::run(
        store.clone(),
        sagaflow_engine::retention::Retention {
            keep: args.retention,
            ..Default::default()
        },
        shutdown.clone(),
    ));
    // After the signal, in-flight work gets a bounded grace: one bench run of 10,000 orders saw
    // the engine never return from its shutdown (not reproduced since, not diagnosed). Leaving
    // then loses nothing: unacknowledged messages go back to the broker, and claimed outbox
    // rows are claimed again once their lease runs out.
    let mut signalled = shutdown.clone();
    let grace = async move {
        let _ = signalled.wait_for(|stop| *stop).await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    let finished = async {
        let result = engine.run(shutdown).await;
        let _ = http.await;
        let _ = retention.await;
        transport.close().await;
        result
    };
    tokio::select! {
        result = finished => {
            result?;
            eprintln!(
                "sagaflow engine: stopped ({} messages published in {} AMQP messages)",
                transport.published(),
                transport.frames_published()
            );
        }
        () = grace => {
            eprintln!(
                "sagaflow engine: in-flight work did not finish within {}s of the signal; leaving anyway (unacknowledged messages go back to the broker)",
                SHUTDOWN_GRACE.as_secs()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn worker(args: WorkerArgs) -> anyhow::Result<ExitCode> {
    let who = format!("sagaflow worker {}", args.service);
    let mut shutdown = startup::shutdown_on_signal("sagaflow");
    let Some(store) = startup::connect_store(
        &who,
        &args.database_url,
        args.pool,
        &[services::MIGRATIONS],
        false,
        &mut shutdown,
    )
    .await?
    else {
        return stopped_while_waiting(&who);
    };
    store.bind_prefix(&args.amqp.prefix).await?;
    let role = format!("{} worker", args.service);
    let Some(transport) = args
        .amqp
        .connect_waiting(&role, &who, &mut shutdown)
        .await?
    else {
        return stopped_while_waiting(&who);
    };
    let worker = services::worker(
        &args.service,
        store.pool().clone(),
        transport.clone() as Arc<dyn Transport>,
    )
    .context("no worker for this service")?
    .with_lanes(args.lanes)
    .with_batch(args.batch)
    .with_optimistic_batches(args.savepoints == Savepoints::OnFailure)
    .with_faults(Faults {
        business: args.fail,
        transient: args.flaky,
        slow: args.slow,
        slow_for: Duration::from_secs(6),
    });
    eprintln!(
        "sagaflow worker {}: consuming {} partitions of {}.cmd.{}",
        args.service,
        transport.config().partitions,
        args.amqp.prefix,
        args.service
    );
    let retention = tokio::spawn(sagaflow_workers::barrier::retention_loop(
        store.pool().clone(),
        sagaflow_engine::retention::Retention {
            keep: args.retention,
            ..Default::default()
        },
        shutdown.clone(),
    ));
    let metrics = match args.metrics {
        Some(addr) => Some(
            serve_worker_metrics(
                addr,
                args.service.clone(),
                worker.stats.clone(),
                shutdown.clone(),
            )
            .await?,
        ),
        None => None,
    };
    let result = worker.run(shutdown).await;
    let _ = retention.await;
    if let Some(m) = metrics {
        let _ = m.await;
    }
    transport.close().await;
    result.map_err(anyhow::Error::msg)?;
    eprintln!(
        "sagaflow worker {}: stopped ({} messages published in {} AMQP messages)",
        args.service,
        transport.published(),
        transport.frames_published()
    );
    Ok(ExitCode::SUCCESS)
}

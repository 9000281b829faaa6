//! Production processes: `sagaflow engine` and `sagaflow worker SERVICE`, over RabbitMQ and
//! PostgreSQL. Any number of each may run against one broker and database: partitions are
//! consumed by one process at a time (single-active-consumer), the outbox relay and timers are
//! claimed row by row, and a saga's version check refuses a second writer.
//!
//! Shutdown on SIGTERM or ctrl-c is graceful: stop taking messages, finish what is in flight,
//! acknowledge it, close the connection (anything unacknowledged goes back to its queue).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use sagaflow_engine::Engine;
use sagaflow_engine::store::{ENGINE_MIGRATIONS, Store};
use sagaflow_engine::transport::Transport;
use sagaflow_engine::transport::amqp::{AmqpConfig, AmqpTransport, QueueType};
use sagaflow_workers::runtime::Faults;
use sagaflow_workers::services;
use tokio::sync::watch;
use tracing::info;

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
    /// The RabbitMQ address.
    #[arg(
        long,
        env = "SAGAFLOW_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        value_name = "URL"
    )]
    pub amqp_url: String,
    /// Partitions per queue: each order key maps to one (per-order FIFO).
    #[arg(long, env = "SAGAFLOW_PARTITIONS", default_value_t = 8)]
    pub partitions: u16,
    /// `classic` for one RabbitMQ node, `quorum` (replicated) for a cluster.
    #[arg(long, env = "SAGAFLOW_QUEUE_TYPE", default_value = "classic")]
    pub queue_type: QueueType,
    /// Prefix of every exchange and queue: separate deployments on one broker.
    #[arg(long, env = "SAGAFLOW_PREFIX", default_value = "sagaflow")]
    pub prefix: String,
    /// Unacknowledged messages per partition consumer.
    #[arg(long, env = "SAGAFLOW_PREFETCH", default_value_t = 64)]
    pub prefetch: u16,
}

impl AmqpArgs {
    pub async fn connect(&self, role: &str) -> anyhow::Result<Arc<AmqpTransport>> {
        let mut config = AmqpConfig::new(&self.amqp_url);
        config.partitions = self.partitions;
        config.queue_type = self.queue_type;
        config.prefix = self.prefix.clone();
        config.prefetch = self.prefetch;
        config.connection_name = format!("sagaflow {role} (pid {})", std::process::id());
        Ok(AmqpTransport::connect(config).await?)
    }
}

#[derive(Debug, clap::Args)]
pub struct EngineArgs {
    /// The engine's PostgreSQL database.
    #[arg(long, env = "SAGAFLOW_DATABASE_URL", value_name = "URL")]
    pub database_url: String,
    #[command(flatten)]
    pub amqp: AmqpArgs,
    /// Serve the HTTP API (status, start, retry, abort, /metrics, /healthz) here.
    #[arg(long, env = "SAGAFLOW_HTTP", default_value = "127.0.0.1:8080")]
    pub http: SocketAddr,
    /// More saga definitions to register (the shipped ones always are).
    #[arg(long = "saga", value_name = "FILE")]
    pub sagas: Vec<PathBuf>,
    /// Keep history, inbox and outbox rows of finished sagas this long.
    #[arg(long, env = "SAGAFLOW_RETENTION", default_value = "7d", value_parser = humantime::parse_duration)]
    pub retention: Duration,
    /// Database connections.
    #[arg(long, default_value_t = 16)]
    pub pool: u32,
}

#[derive(Debug, clap::Args)]
pub struct WorkerArgs {
    /// The service to run: payment, coupon, points or gmv.
    #[arg(value_parser = known_service)]
    pub service: String,
    /// The service's PostgreSQL database (its tables and its barrier).
    #[arg(long, env = "SAGAFLOW_DATABASE_URL", value_name = "URL")]
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
    /// Database connections.
    #[arg(long, default_value_t = 16)]
    pub pool: u32,
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

/// A watch that turns true on SIGTERM or ctrl-c.
pub fn shutdown_on_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        info!("shutting down: finishing in-flight work");
        eprintln!("sagaflow: shutting down (finishing in-flight work)");
        let _ = tx.send(true);
    });
    rx
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
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

pub async fn engine(args: EngineArgs) -> anyhow::Result<ExitCode> {
    let store = Store::connect(&args.database_url, args.pool).await?;
    store.migrate(&[ENGINE_MIGRATIONS]).await?;
    let transport = args.amqp.connect("engine").await?;
    let engine = Engine::new(store.clone(), transport.clone() as Arc<dyn Transport>);
    let names = register_sagas(&engine, &args.sagas).await?;
    let listener = tokio::net::TcpListener::bind(args.http)
        .await
        .with_context(|| format!("cannot listen on {} for the HTTP API", args.http))?;
    let address = listener.local_addr()?;
    let shutdown = shutdown_on_signal();
    eprintln!(
        "sagaflow engine: sagas {}; RabbitMQ {} partitions ({}, prefix `{}`); HTTP on http://{address}",
        names.join(", "),
        args.amqp.partitions,
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
    let result = engine.run(shutdown).await;
    let _ = http.await;
    let _ = retention.await;
    transport.close().await;
    result?;
    eprintln!("sagaflow engine: stopped");
    Ok(ExitCode::SUCCESS)
}

pub async fn worker(args: WorkerArgs) -> anyhow::Result<ExitCode> {
    let store = Store::connect(&args.database_url, args.pool).await?;
    store.migrate(&[services::MIGRATIONS]).await?;
    let transport = args
        .amqp
        .connect(&format!("{} worker", args.service))
        .await?;
    let worker = services::worker(
        &args.service,
        store.pool().clone(),
        transport.clone() as Arc<dyn Transport>,
    )
    .context("no worker for this service")?
    .with_lanes(args.lanes)
    .with_batch(args.batch)
    .with_faults(Faults {
        business: args.fail,
        transient: args.flaky,
        slow: args.slow,
        slow_for: Duration::from_secs(6),
    });
    let shutdown = shutdown_on_signal();
    eprintln!(
        "sagaflow worker {}: consuming {} partitions of {}.cmd.{}",
        args.service, args.amqp.partitions, args.amqp.prefix, args.service
    );
    let retention = tokio::spawn(sagaflow_workers::barrier::retention_loop(
        store.pool().clone(),
        sagaflow_engine::retention::Retention {
            keep: args.retention,
            ..Default::default()
        },
        shutdown.clone(),
    ));
    let result = worker.run(shutdown).await;
    let _ = retention.await;
    transport.close().await;
    result.map_err(anyhow::Error::msg)?;
    eprintln!("sagaflow worker {}: stopped", args.service);
    Ok(ExitCode::SUCCESS)
}

//! The shipping service as a process, configured by the environment like sagaflow's own, until
//! SIGTERM or ctrl-c. Embedded (no `SAGAFLOW_AMQP_URL`): the engine and this worker in one
//! process, on the SQLite file `shipping.db` (or `SAGAFLOW_DATABASE_URL`) and the in-process
//! transport; `sagaflow start … --db shipping.db` starts sagas. With `SAGAFLOW_AMQP_URL`: this
//! worker alone, beside `sagaflow engine --saga examples/shipping/shipping.yaml`.
use std::sync::Arc;

use anyhow::Context;
use sagaflow_engine::store::{ENGINE_MIGRATIONS, Store};
use sagaflow_engine::transport::{Transport, amqp::AmqpConfig, amqp::AmqpTransport};
use sagaflow_engine::{Engine, redact::redact_url, transport::memory::MemoryTransport};
use sagaflow_example_shipping as shipping;
use sagaflow_workers::{BARRIER_MIGRATIONS, barrier::retention_loop};
use tokio::signal::unix::{SignalKind, signal};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let db = std::env::var("SAGAFLOW_DATABASE_URL").unwrap_or_else(|_| "shipping.db".into());
    let store = Store::connect(&db, 4).await?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut term = signal(SignalKind::terminate())?;
    tokio::spawn(async move {
        tokio::select! { _ = tokio::signal::ctrl_c() => {}, _ = term.recv() => {} }
        let _ = stop.send(true); // stop taking commands, finish and acknowledge what is in flight
    });
    let (mut engine, mut amqp) = (None, None);
    let transport: Arc<dyn Transport> = if let Ok(url) = std::env::var("SAGAFLOW_AMQP_URL") {
        store
            .migrate(&[BARRIER_MIGRATIONS, shipping::MIGRATIONS])
            .await?;
        let mut config = AmqpConfig::new(&url); // the same defaults as `sagaflow engine`
        config.prefix = std::env::var("SAGAFLOW_PREFIX").unwrap_or(config.prefix);
        if let Ok(partitions) = std::env::var("SAGAFLOW_PARTITIONS") {
            config.partitions = partitions.parse().context("SAGAFLOW_PARTITIONS")?;
        }
        if let Ok(kind) = std::env::var("SAGAFLOW_QUEUE_TYPE") {
            config.queue_type = kind.parse().map_err(anyhow::Error::msg)?; // quorum on a cluster
        }
        store.bind_prefix(&config.prefix).await?; // one database, one deployment
        let broker = AmqpTransport::connect(config).await?;
        amqp = Some(broker.clone());
        broker
    } else {
        let all = [ENGINE_MIGRATIONS, BARRIER_MIGRATIONS, shipping::MIGRATIONS];
        store.migrate(&all).await?; // the engine's tables too: it runs on this database
        let memory = Arc::new(MemoryTransport::default());
        let embedded = Engine::new(store.clone(), memory.clone());
        embedded.register(shipping::SAGA).await?;
        engine = Some(tokio::spawn(embedded.run(stopped.clone())));
        memory
    };
    let pool = store.pool().clone();
    let retention = retention_loop(pool.clone(), Default::default(), stopped.clone());
    tokio::spawn(retention); // barrier rows older than 7 days
    eprintln!("shipping: running on {} until SIGTERM", redact_url(&db));
    let worker = shipping::worker(pool, transport);
    worker.run(stopped).await.map_err(anyhow::Error::msg)?;
    if let Some(engine) = engine {
        engine.await??;
    }
    if let Some(amqp) = amqp {
        amqp.close().await;
    }
    Ok(())
}

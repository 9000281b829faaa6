//! The README's "Your own service": `examples/shipping/` run for real. Its worker is the example
//! crate's own code (`sagaflow_example_shipping::SERVICE`, which the example's `main` runs too),
//! on a database that has only the SDK's tables (`BARRIER_MIGRATIONS`) and the example's
//! table, driven by sagas of the example's `shipping.yaml`: the orders the carrier serves
//! complete, the PO boxes are refused and their parcels released, and the `shipments` table
//! holds exactly one row per effect — with the transport delivering messages twice, and over the
//! real RabbitMQ and PostgreSQL beside a `sagaflow engine --saga …/shipping.yaml` process.

mod support;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use sagaflow_dsl::SagaGraph;
use sagaflow_engine::Engine;
use sagaflow_engine::machine::{Op, SagaStatus};
use sagaflow_engine::store::{ENGINE_MIGRATIONS, SagaQueries, Store};
use sagaflow_engine::transport::amqp::{AmqpConfig, AmqpTransport};
use sagaflow_engine::transport::memory::{Faults as NetFaults, MemoryTransport};
use sagaflow_engine::transport::{Message, Transport, command_queue};
use sagaflow_engine::wire::CommandMsg;
use sagaflow_example_shipping as shipping;
use sagaflow_workers::BARRIER_MIGRATIONS;
use sagaflow_workers::runtime::{Faults, Stats};
use sagaflow_workers::service::{self, Config};
use serde_json::{Value, json};
use sqlx::Row;
use tokio::sync::watch;

use support::deploy::{Deployment, amqp_url};
use support::{Backend, fresh_db};

/// `n` shipments; every fourth goes to a PO box, which the carrier refuses.
fn orders(prefix: &str, n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| {
            let address = if i % 4 == 3 {
                format!("PO Box {i}, Leeds")
            } else {
                format!("{i} Harbour Street, Bristol")
            };
            json!({"order_id": format!("{prefix}-{i}"), "address": address, "parcels": 1 + i % 3})
        })
        .collect()
}

fn refused(input: &Value) -> bool {
    input["address"]
        .as_str()
        .is_some_and(|a| a.starts_with("PO Box"))
}

/// Starts every order's saga; (saga id, input) in order.
async fn start_all(
    engine: &Engine,
    saga: &Arc<SagaGraph>,
    inputs: Vec<Value>,
) -> Vec<(String, Value)> {
    let mut started = Vec::new();
    for input in inputs {
        let id = engine
            .start(saga, input.clone(), None)
            .await
            .expect("start")
            .id;
        started.push((id, input));
    }
    started
}

/// Each saga ended as its address says: Completed with its tracking number, or Compensated
/// because the carrier refused it.
async fn assert_outcomes(engine_store: &Store, started: &[(String, Value)]) {
    for (id, input) in started {
        let state = engine_store
            .saga_state(id)
            .await
            .expect("read")
            .expect("saga");
        if refused(input) {
            match &state.status {
                SagaStatus::Compensated { reason } => {
                    assert!(reason.contains("unserviceable"), "{id}: {reason}")
                }
                other => panic!("{id} ({input}) should be compensated, is {other:?}"),
            }
        } else {
            assert_eq!(state.status, SagaStatus::Completed, "{id} ({input})");
            assert_eq!(state.outputs["book"]["tracking"], format!("TRK-{id}"));
            assert_eq!(
                state.outputs["reserve"]["detail"],
                input["parcels"].to_string()
            );
        }
    }
}

/// The example's table and the barrier, exactly: per completed saga its reservation and its
/// booking, per compensated one its released reservation and nothing booked; one barrier row
/// per operation that was decided (the refused booking included), whatever came twice.
async fn assert_tables(worker_store: &Store, started: &[(String, Value)]) {
    let mut want_rows = Vec::new();
    let mut want_barrier = Vec::new();
    for (id, input) in started {
        let order = input["order_id"].as_str().expect("order").to_owned();
        let parcels = input["parcels"].to_string();
        let id = id.clone();
        want_barrier.push((id.clone(), "book".into(), "action".into()));
        want_barrier.push((id.clone(), "reserve".into(), "action".into()));
        if refused(input) {
            want_barrier.push((id.clone(), "reserve".into(), "compensate".into()));
            want_rows.push((id, "reserve".into(), order, parcels, "released".into()));
        } else {
            let tracking = format!("TRK-{id}");
            want_rows.push((
                id.clone(),
                "book".into(),
                order.clone(),
                tracking,
                "booked".into(),
            ));
            want_rows.push((id, "reserve".into(), order, parcels, "reserved".into()));
        }
    }
    want_rows.sort();
    want_barrier.sort();
    let rows: Vec<(String, String, String, String, String)> = sqlx::query(
        "SELECT saga_id, step, order_id, detail, state FROM shipments ORDER BY saga_id, step",
    )
    .fetch_all(worker_store.pool())
    .await
    .expect("shipments")
    .iter()
    .map(|r| {
        (
            r.get("saga_id"),
            r.get("step"),
            r.get("order_id"),
            r.get("detail"),
            r.get("state"),
        )
    })
    .collect();
    assert_eq!(rows, want_rows, "the shipments table");
    let barrier: Vec<(String, String, String)> =
        sqlx::query("SELECT saga_id, step, op FROM barrier ORDER BY saga_id, step, op")
            .fetch_all(worker_store.pool())
            .await
            .expect("barrier")
            .iter()
            .map(|r| (r.get("saga_id"), r.get("step"), r.get("op")))
            .collect();
    assert_eq!(barrier, want_barrier, "the barrier");
}

/// The reserve action of a completed saga once more, as a broker redelivers it.
fn reserve_again(id: &str, input: &Value) -> Message {
    let cmd = CommandMsg {
        traceparent: None,
        tracestate: None,
        saga_id: id.to_owned(),
        saga: "ship-order".into(),
        key: input["order_id"].as_str().expect("order").to_owned(),
        step: 0,
        step_id: "reserve".into(),
        service: "shipping".into(),
        op: Op::Action,
        operation: "reserve".into(),
        forward: "reserve".into(),
        attempt: 1,
        params: json!({"order_id": input["order_id"], "parcels": input["parcels"]}),
    };
    Message {
        id: cmd.message_id(),
        key: cmd.key.clone(),
        payload: serde_json::to_vec(&cmd).expect("encode"),
    }
}

async fn wait_for_duplicates(stats: &Stats, at_least: u64) {
    let start = Instant::now();
    while stats.duplicates.load(Ordering::Relaxed) < at_least {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the redelivered command was not answered"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Embedded, as the example's `main` runs without `SAGAFLOW_AMQP_URL`: the engine and the
/// example's worker in one process, on a SQLite file, over an in-process transport that
/// delivers 30% of all messages twice and delays some, with 5% of the worker's commands
/// failing transiently (retried by the engine).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipping_example_embedded_with_duplicates_and_transient_failures() {
    let db = fresh_db(Backend::Sqlite, "shipping_example")
        .await
        .expect("sqlite");
    let store = Store::connect(&db.url, 4).await.expect("connect");
    store
        .migrate(&[
            ENGINE_MIGRATIONS,
            BARRIER_MIGRATIONS,
            shipping::SERVICE.migrations,
        ])
        .await
        .expect("migrate");
    let transport = Arc::new(MemoryTransport::new(NetFaults {
        duplicate: 0.3,
        delay: 0.1,
        delay_for: Duration::from_millis(30),
        ..NetFaults::default()
    }));
    let engine = Engine::new(store.clone(), transport.clone());
    let saga = engine
        .register(shipping::SERVICE.sagas[0])
        .await
        .expect("the example's saga");
    let (stop, stopped) = watch::channel(false);
    let engine_task = tokio::spawn(engine.clone().run(stopped.clone()));
    let worker = shipping::SERVICE
        .worker(store.pool().clone(), transport.clone())
        .with_faults(Faults {
            transient: 0.05,
            ..Faults::default()
        });
    let stats = worker.stats.clone();
    let worker_task = tokio::spawn(worker.run(stopped));

    let started = start_all(&engine, &saga, orders("emb", 24)).await;
    support::wait_all_final(&store, Duration::from_secs(60)).await;
    assert_outcomes(&store, &started).await;
    assert_tables(&store, &started).await;
    assert!(
        stats.duplicates.load(Ordering::Relaxed) > 0,
        "the transport delivered nothing twice: the test proved nothing about duplicates"
    );

    // One more redelivery of a completed saga's first command: answered from the barrier.
    let before = stats.duplicates.load(Ordering::Relaxed);
    let (id, input) = started
        .iter()
        .find(|(_, i)| !refused(i))
        .expect("a completed one");
    transport
        .publish(&command_queue("shipping"), reserve_again(id, input))
        .await
        .expect("publish");
    wait_for_duplicates(&stats, before + 1).await;
    assert_tables(&store, &started).await;

    let _ = stop.send(true);
    transport.close();
    let _ = engine_task.await;
    let _ = worker_task.await;
    store.pool().close().await;
}

/// Production, as the README runs it: `sagaflow engine --saga examples/shipping/shipping.yaml`
/// as a process over RabbitMQ and PostgreSQL, and the example's worker (in this test process,
/// as the example's `main` runs it with `SAGAFLOW_AMQP_URL`) on a PostgreSQL database of its
/// own that holds only `BARRIER_MIGRATIONS` and the example's table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipping_example_over_rabbitmq_and_postgres() {
    let Some(mut d) = Deployment::new("shipping_example", 2).await else {
        return;
    };
    d.extra_services.push("shipping".to_owned());
    let Some(worker_db) = fresh_db(Backend::Postgres, "shipping_worker").await else {
        return;
    };
    let worker_store = Store::connect(&worker_db.url, 3).await.expect("connect");
    worker_store
        .migrate(&[BARRIER_MIGRATIONS, shipping::SERVICE.migrations])
        .await
        .expect("migrate");
    worker_store.bind_prefix(&d.prefix).await.expect("bind");
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename",
    )
    .fetch_all(worker_store.pool())
    .await
    .expect("tables");
    assert_eq!(
        tables,
        [
            "barrier",
            "sagaflow_deployment",
            "schema_migrations",
            "shipments"
        ],
        "the SDK's tables and the example's, no demo service's"
    );

    let mut config = AmqpConfig::new(&amqp_url());
    config.prefix = d.prefix.clone();
    config.partitions = d.partitions;
    config.connection_name = "test shipping worker".into();
    let worker_transport = AmqpTransport::connect(config).await.expect("RabbitMQ");
    let worker = shipping::SERVICE.worker(worker_store.pool().clone(), worker_transport.clone());
    let stats = worker.stats.clone();
    let (stop, stopped) = watch::channel(false);
    let worker_task = tokio::spawn(worker.run(stopped));

    let saga_file = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/shipping/shipping.yaml"
    );
    d.engine_process_with(&["--saga", saga_file]);
    // The test's engine only writes the starts; the engine process relays and drives them.
    let saga = d
        .engine
        .register(shipping::SERVICE.sagas[0])
        .await
        .expect("saga");
    let started = start_all(&d.engine, &saga, orders("amqp", 12)).await;
    d.wait_all_final(Duration::from_secs(90)).await;
    assert_outcomes(&d.store, &started).await;
    assert_tables(&worker_store, &started).await;

    // A command the broker delivers again changes nothing.
    let before = stats.duplicates.load(Ordering::Relaxed);
    let (id, input) = started
        .iter()
        .find(|(_, i)| !refused(i))
        .expect("a completed one");
    d.transport
        .publish(&command_queue("shipping"), reserve_again(id, input))
        .await
        .expect("publish");
    wait_for_duplicates(&stats, before + 1).await;
    assert_tables(&worker_store, &started).await;
    d.assert_no_double_transitions().await;

    let _ = stop.send(true);
    let _ = worker_task.await;
    worker_transport.close().await;
    worker_store.pool().close().await;
    d.finish().await;
}

/// The example's process over RabbitMQ as its `main` runs it with `SAGAFLOW_AMQP_URL` set
/// (`sagaflow_workers::service::run`, configured from those variables), beside a `sagaflow
/// engine --saga …/shipping.yaml` process: it migrates and binds its own database, runs the
/// sagas' commands, and stops cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipping_service_run_over_rabbitmq() {
    let Some(mut d) = Deployment::new("shipping_service", 2).await else {
        return;
    };
    d.extra_services.push("shipping".to_owned());
    let Some(worker_db) = fresh_db(Backend::Postgres, "shipping_service_worker").await else {
        return;
    };
    let env = [
        ("SAGAFLOW_DATABASE_URL", worker_db.url.clone()),
        ("SAGAFLOW_AMQP_URL", amqp_url()),
        ("SAGAFLOW_PREFIX", d.prefix.clone()),
        ("SAGAFLOW_PARTITIONS", d.partitions.to_string()),
        ("SAGAFLOW_QUEUE_TYPE", "classic".to_owned()),
    ];
    let config = Config::from_vars("shipping", |var| {
        Ok(env.iter().find(|(k, _)| *k == var).map(|(_, v)| v.clone()))
    })
    .expect("config");
    let (stop, stopped) = watch::channel(false);
    let service =
        tokio::spawn(async move { service::run(&shipping::SERVICE, config, stopped).await });

    let saga_file = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/shipping/shipping.yaml"
    );
    d.engine_process_with(&["--saga", saga_file]);
    let saga = d
        .engine
        .register(shipping::SERVICE.sagas[0])
        .await
        .expect("saga");
    let started = start_all(&d.engine, &saga, orders("run", 8)).await;
    d.wait_all_final(Duration::from_secs(90)).await;
    assert_outcomes(&d.store, &started).await;

    let _ = stop.send(true);
    let ended = tokio::time::timeout(Duration::from_secs(30), service).await;
    ended
        .expect("run stops")
        .expect("no panic")
        .expect("a clean stop");
    let worker_store = Store::connect(&worker_db.url, 1).await.expect("connect");
    assert_tables(&worker_store, &started).await;
    assert_eq!(
        worker_store.bound_prefix().await.expect("read").as_deref(),
        Some(d.prefix.as_str()),
        "its database is bound to the deployment"
    );
    worker_store.pool().close().await;
    d.finish().await;
}

/// A service started before its database exists waits for it (as `sagaflow worker` does),
/// rather than exiting; once the database is created it migrates and runs; a stop while it
/// waits ends it cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_waits_for_its_database() {
    let Some(db) = fresh_db(Backend::Postgres, "shipping_waits").await else {
        return;
    };
    let (server, name) = db.url.rsplit_once('/').expect("a database URL");
    let admin_url = format!("{server}/postgres");
    let admin = |sql: String| {
        let admin_url = admin_url.clone();
        async move {
            let mut c = support::connect_patiently(&admin_url).await.expect("admin");
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                .execute(&mut c)
                .await
                .expect("admin statement");
        }
    };
    // Not there yet (the test's guard still drops it at the end, whatever happens).
    admin(format!("DROP DATABASE {name} WITH (FORCE)")).await;
    let config = |url: &str| Config {
        database_url: url.to_owned(),
        amqp: None,
    };

    // A stop while it waits ends the run, cleanly.
    let (stop, stopped) = watch::channel(false);
    let url = db.url.clone();
    let waiting =
        tokio::spawn(async move { service::run(&shipping::SERVICE, config(&url), stopped).await });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!waiting.is_finished(), "it waits for the database");
    let _ = stop.send(true);
    let ended = tokio::time::timeout(Duration::from_secs(20), waiting).await;
    ended
        .expect("a stop ends the wait")
        .expect("no panic")
        .expect("a clean stop");

    // Created while it waits: it migrates and runs.
    let (stop, stopped) = watch::channel(false);
    let url = db.url.clone();
    let service =
        tokio::spawn(async move { service::run(&shipping::SERVICE, config(&url), stopped).await });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!service.is_finished(), "it waits for the database");
    admin(format!("CREATE DATABASE {name}")).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let migrated = loop {
        if let Ok(store) = Store::connect(&db.url, 1).await {
            let found = sqlx::query("SELECT 1 FROM shipments LIMIT 1")
                .fetch_optional(store.pool())
                .await
                .is_ok();
            store.pool().close().await;
            if found {
                break true;
            }
        }
        if Instant::now() > deadline || service.is_finished() {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        migrated,
        "the service migrated its database once it existed"
    );
    let _ = stop.send(true);
    let ended = tokio::time::timeout(Duration::from_secs(30), service).await;
    ended
        .expect("run stops")
        .expect("no panic")
        .expect("a clean stop");
}

//! Starting sagas from the application's own transaction (`sagaflow-client`): the application's
//! database is a PostgreSQL database of its own; the engine (with the four services) runs
//! in-process on SQLite or on PostgreSQL, over the in-process transport.

mod support;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sagaflow_client::{ClientError, Relay, Start, install, start_saga};
use sagaflow_engine::store::{ENGINE_MIGRATIONS, Store};
use sagaflow_engine::transport::memory::{Faults as NetFaults, MemoryTransport};
use sagaflow_engine::transport::{Message, START_QUEUE, Transport};
use sagaflow_engine::wire::StartMsg;
use sagaflow_engine::{Engine, Started};
use serde_json::{Value, json};
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgPool, Row};
use support::{Backend, Setup, System, TestDb, assert_invariants, counts, wait_all_final};

const LIMIT: Duration = Duration::from_secs(60);

/// The application's database: an `orders` table and the start outbox.
struct App {
    pool: PgPool,
    _db: TestDb,
}

async fn app_db(test: &str) -> Option<App> {
    let db = support::fresh_db(Backend::Postgres, &format!("app_{test}")).await?;
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .connect(&db.url)
        .await
        .expect("connect to the application database");
    sqlx::raw_sql("CREATE TABLE orders (id TEXT PRIMARY KEY, amount TEXT NOT NULL)")
        .execute(&pool)
        .await
        .expect("orders table");
    let mut conn = pool.acquire().await.expect("conn");
    install(&mut conn).await.expect("install");
    install(&mut conn).await.expect("install is idempotent");
    drop(conn);
    Some(App { pool, _db: db })
}

/// Runs `body` with an application database and an engine database on `engine`.
async fn with_dbs<F, Fut>(engine: Backend, test: &str, body: F)
where
    F: FnOnce(App, String) -> Fut,
    Fut: Future<Output = ()>,
{
    let Some(app) = app_db(test).await else {
        return;
    };
    let Some(engine_db) = support::fresh_db(engine, &format!("eng_{test}")).await else {
        return;
    };
    body(app, engine_db.url.clone()).await;
}

/// The application database on PostgreSQL; the engine on SQLite and on PostgreSQL.
macro_rules! engine_on_both_backends {
    ($name:ident, $body:expr) => {
        mod $name {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn engine_on_sqlite() {
                with_dbs(Backend::Sqlite, stringify!($name), $body).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn engine_on_postgres() {
                with_dbs(Backend::Postgres, stringify!($name), $body).await;
            }
        }
    };
}

fn order_id(input: &Value) -> String {
    input["order_id"].as_str().expect("order_id").to_owned()
}

/// The application's business write and its saga start, in one transaction.
async fn place_order(pool: &PgPool, input: &Value, commit: bool) {
    let mut tx = pool.begin().await.expect("begin");
    sqlx::query("INSERT INTO orders (id, amount) VALUES ($1, $2)")
        .bind(order_id(input))
        .bind(input["amount"].as_str().unwrap_or_default())
        .execute(&mut *tx)
        .await
        .expect("insert order");
    start_saga(&mut tx, "order-paid", input, &order_id(input))
        .await
        .expect("start_saga");
    if commit {
        tx.commit().await.expect("commit");
    } else {
        tx.rollback().await.expect("rollback");
    }
}

async fn app_count(pool: &PgPool, sql: &'static str, key: &str) -> i64 {
    sqlx::query(sql)
        .bind(key)
        .fetch_one(pool)
        .await
        .expect("count")
        .try_get(0)
        .expect("count")
}

async fn outbox_rows(pool: &PgPool, key: &str) -> i64 {
    app_count(
        pool,
        "SELECT COUNT(*) FROM sagaflow_start_outbox WHERE idempotency_key = $1",
        key,
    )
    .await
}

async fn sagas_with_key(store: &Store, key: &str) -> i64 {
    let mut conn = store.pool().acquire().await.expect("conn");
    sqlx::query("SELECT COUNT(*) AS n FROM sagas WHERE idempotency_key = $1")
        .bind(key)
        .fetch_one(&mut *conn)
        .await
        .expect("count")
        .try_get("n")
        .expect("n")
}

async fn all_sagas(store: &Store) -> i64 {
    counts(store).await.values().sum()
}

/// Polls `check` until it holds; panics with `what` after `LIMIT`.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < LIMIT, "not after {LIMIT:?}: {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn relay(app: &App, sys: &System) -> Relay {
    Relay::new(
        app.pool.clone(),
        sys.transport.clone() as Arc<dyn Transport>,
    )
}

engine_on_both_backends!(
    rollback_starts_nothing,
    |app: App, url: String| async move {
        let sys = System::start(&url, Setup::default()).await;
        let orders = sys.orders("rb", 3).await;
        let relay = relay(&app, &sys);

        // An open transaction: its start request is visible to itself, to no relay.
        let mut tx = app.pool.begin().await.expect("begin");
        sqlx::query("INSERT INTO orders (id, amount) VALUES ($1, $2)")
            .bind(order_id(&orders[0]))
            .bind("1.00")
            .execute(&mut *tx)
            .await
            .expect("insert order");
        start_saga(&mut tx, "order-paid", &orders[0], &order_id(&orders[0]))
            .await
            .expect("start_saga");
        let inside: i64 = sqlx::query("SELECT COUNT(*) FROM sagaflow_start_outbox")
            .fetch_one(&mut *tx)
            .await
            .expect("count")
            .try_get(0)
            .expect("count");
        assert_eq!(inside, 1);
        assert_eq!(relay.relay_once().await.expect("relay"), 0);
        tx.rollback().await.expect("rollback");

        // Rolled back explicitly, and a transaction dropped without commit (a failed request).
        place_order(&app.pool, &orders[1], false).await;
        {
            let mut tx = app.pool.begin().await.expect("begin");
            start_saga(&mut tx, "order-paid", &orders[2], &order_id(&orders[2]))
                .await
                .expect("start_saga");
        }

        for o in &orders {
            let id = order_id(o);
            assert_eq!(outbox_rows(&app.pool, &id).await, 0, "{id}");
            assert_eq!(
                app_count(&app.pool, "SELECT COUNT(*) FROM orders WHERE id = $1", &id).await,
                0
            );
        }
        assert_eq!(relay.relay_once().await.expect("relay"), 0);
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let running = {
            let relay = relay.clone();
            tokio::spawn(async move { relay.run(stopped).await })
        };
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(sys.transport.published(), 0, "nothing may be published");
        assert_eq!(sys.transport.depth(START_QUEUE), 0);
        assert_eq!(all_sagas(&sys.store).await, 0, "no saga may start");
        assert!(sys.transport.dead_letters().is_empty());

        // The same pipeline with a commit does start the saga: the silence above is the rollback's.
        place_order(&app.pool, &orders[0], true).await;
        eventually("the committed order's saga completes", || async {
            counts(&sys.store).await.get("completed") == Some(&1)
        })
        .await;
        assert_eq!(sagas_with_key(&sys.store, &order_id(&orders[0])).await, 1);
        assert_eq!(all_sagas(&sys.store).await, 1);
        eventually("the outbox is drained", || async {
            relay.pending().await.expect("pending") == 0
        })
        .await;
        let _ = stop.send(true);
        running.await.expect("relay task");
        assert_invariants(&sys.store).await;
        sys.stop().await;
    }
);

engine_on_both_backends!(
    commit_one_saga_despite_duplicates,
    |app: App, url: String| async move {
        let setup = Setup {
            net: NetFaults {
                duplicate: 1.0,
                ..NetFaults::default()
            },
            ..Setup::default()
        };
        let sys = System::start(&url, setup).await;
        let orders = sys.orders("dup", 6).await;
        for o in &orders {
            place_order(&app.pool, o, true).await;
        }
        // Two relays at once: each row is taken by one of them.
        let (r1, r2) = (
            relay(&app, &sys).with_batch_size(2),
            relay(&app, &sys).with_batch_size(2),
        );
        let mut sent = 0;
        while r1.pending().await.expect("pending") > 0 {
            let (a, b) = tokio::join!(r1.relay_once(), r2.relay_once());
            sent += a.expect("relay 1") + b.expect("relay 2");
        }
        assert_eq!(sent, orders.len(), "every row published once by the relays");
        // A relay that crashed after the confirm, before marking its rows: they go again.
        sqlx::query("UPDATE sagaflow_start_outbox SET sent_at = NULL")
            .execute(&app.pool)
            .await
            .expect("unmark");
        let (a, b) = tokio::join!(r1.relay_once(), r2.relay_once());
        let (a, b) = (a.expect("relay 1"), b.expect("relay 2"));
        assert!(a + b > 0, "the unmarked rows are relayed again");
        while r1.relay_once().await.expect("relay") > 0 {}
        assert_eq!(r1.pending().await.expect("pending"), 0);

        eventually("every start message is consumed", || async {
            sys.transport.depth(START_QUEUE) == 0
        })
        .await;
        wait_all_final(&sys.store, LIMIT).await;
        for o in &orders {
            assert_eq!(sagas_with_key(&sys.store, &order_id(o)).await, 1);
        }
        assert_eq!(all_sagas(&sys.store).await, orders.len() as i64);
        assert_eq!(
            counts(&sys.store).await.get("completed"),
            Some(&(orders.len() as i64))
        );
        assert_eq!(assert_invariants(&sys.store).await, orders.len());
        assert!(
            sys.transport.dead_letters().is_empty(),
            "{:?}",
            sys.transport.dead_letters()
        );
        sys.stop().await;
    }
);

engine_on_both_backends!(
    same_key_twice_one_saga,
    |app: App, url: String| async move {
        let sys = System::start(&url, Setup::default()).await;
        let orders = sys.orders("twice", 2).await;
        let relay = relay(&app, &sys);

        // Two transactions, one after the other, with the same key: the second is a no-op.
        let key = order_id(&orders[0]);
        place_order(&app.pool, &orders[0], true).await;
        let mut tx = app.pool.begin().await.expect("begin");
        let mut other = orders[0].clone();
        other["points"] = json!(999_999);
        start_saga(&mut tx, "order-paid", &other, &key)
            .await
            .expect("second start_saga");
        tx.commit().await.expect("commit");
        assert_eq!(outbox_rows(&app.pool, &key).await, 1);

        // Two transactions at once with the same key: the second waits for the first, then does
        // nothing.
        let key2 = order_id(&orders[1]);
        let mut first = app.pool.begin().await.expect("begin");
        start_saga(&mut first, "order-paid", &orders[1], &key2)
            .await
            .expect("start_saga");
        let second = {
            let (pool, input, key2) = (app.pool.clone(), orders[1].clone(), key2.clone());
            tokio::spawn(async move {
                let mut tx = pool.begin().await.expect("begin");
                start_saga(&mut tx, "order-paid", &input, &key2)
                    .await
                    .expect("concurrent start_saga");
                tx.commit().await.expect("commit");
            })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        first.commit().await.expect("commit");
        second.await.expect("second transaction");
        assert_eq!(outbox_rows(&app.pool, &key2).await, 1);

        while relay.relay_once().await.expect("relay") > 0 {}
        eventually("both sagas exist", || async {
            all_sagas(&sys.store).await == 2
        })
        .await;
        wait_all_final(&sys.store, LIMIT).await;
        assert_eq!(sagas_with_key(&sys.store, &key).await, 1);
        assert_eq!(sagas_with_key(&sys.store, &key2).await, 1);
        assert_eq!(counts(&sys.store).await.get("completed"), Some(&2));
        // The first request won: the saga has the original points, not the second call's.
        let mut conn = sys.store.pool().acquire().await.expect("conn");
        let state: String = sqlx::query("SELECT state FROM sagas WHERE idempotency_key = $1")
            .bind(key.as_str())
            .fetch_one(&mut *conn)
            .await
            .expect("saga")
            .try_get("state")
            .expect("state");
        assert!(!state.contains("999999"), "{state}");
        drop(conn);
        assert_invariants(&sys.store).await;
        sys.stop().await;
    }
);

engine_on_both_backends!(
    poison_starts_dead_lettered,
    |app: App, url: String| async move {
        let sys = System::start(&url, Setup::default()).await;
        let orders = sys.orders("poison", 2).await;
        let publish = |id: &str, payload: Vec<u8>| {
            let t = sys.transport.clone();
            let message = Message {
                id: id.to_owned(),
                // One key for all: the good message shares the poison messages' lane.
                key: "lane".to_owned(),
                payload,
            };
            async move { t.publish(START_QUEUE, message).await.expect("publish") }
        };
        let start = |saga: &str, input: &Value, key: &str| {
            serde_json::to_vec(&StartMsg {
                traceparent: None,
                tracestate: None,
                saga: saga.to_owned(),
                input: input.clone(),
                idempotency_key: key.to_owned(),
            })
            .expect("encode")
        };
        publish("start/junk", b"not json at all".to_vec()).await;
        publish(
            "start/k-unknown",
            start("no-such-saga", &orders[0], "k-unknown"),
        )
        .await;
        publish(
            "start/k-invalid",
            start("order-paid", &json!({"order_id": "o-x"}), "k-invalid"),
        )
        .await;
        publish("start/", start("order-paid", &orders[0], "")).await;
        publish("start/k-good", start("order-paid", &orders[0], "k-good")).await;
        // And one through the client, behind them all.
        place_order(&app.pool, &orders[1], true).await;
        while relay(&app, &sys).relay_once().await.expect("relay") > 0 {}

        eventually("both good starts are handled", || async {
            all_sagas(&sys.store).await == 2
        })
        .await;
        wait_all_final(&sys.store, LIMIT).await;
        assert_eq!(sagas_with_key(&sys.store, "k-good").await, 1);
        assert_eq!(sagas_with_key(&sys.store, &order_id(&orders[1])).await, 1);
        assert_eq!(counts(&sys.store).await.get("completed"), Some(&2));
        eventually("the start queue is empty", || async {
            sys.transport.depth(START_QUEUE) == 0
        })
        .await;

        let dead = sys.transport.dead_letters();
        let reasons: Vec<(&str, &str, &str)> = dead
            .iter()
            .map(|d| (d.queue.as_str(), d.message.id.as_str(), d.reason.as_str()))
            .collect();
        assert_eq!(dead.len(), 4, "{reasons:#?}");
        let reason = |id: &str| {
            let found = reasons.iter().find(|(_, m, _)| *m == id);
            let (queue, _, reason) = found.unwrap_or_else(|| panic!("{id} not dead-lettered"));
            assert_eq!(*queue, START_QUEUE);
            (*reason).to_owned()
        };
        let r = reason("start/junk");
        assert!(r.starts_with("undecodable start message:"), "{r}");
        let r = reason("start/k-unknown");
        assert!(
            r.contains("cannot start saga `no-such-saga` (idempotency key `k-unknown`)")
                && r.contains("no saga definition named `no-such-saga`"),
            "{r}"
        );
        let r = reason("start/k-invalid");
        assert!(
            r.contains("invalid input for saga `order-paid`")
                && r.contains("`user_id` is required"),
            "{r}"
        );
        let r = reason("start/");
        assert!(r.contains("without an idempotency key"), "{r}");
        assert_invariants(&sys.store).await;
        sys.stop().await;
    }
);

/// Concurrent starts with one idempotency key (engines on several nodes handling a duplicated
/// start): every caller gets the one saga.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_engine_starts_with_one_key_start_one_saga() {
    let Some(db) = support::fresh_db(Backend::Postgres, "concurrent_start").await else {
        return;
    };
    let store = Store::connect(&db.url, 16).await.expect("connect");
    store.migrate(&[ENGINE_MIGRATIONS]).await.expect("migrate");
    let engine = Engine::new(store.clone(), Arc::new(MemoryTransport::default()));
    let graph = engine
        .register(&support::order_saga())
        .await
        .expect("order saga");
    for round in 0..6 {
        let key = format!("race-{round}");
        let input = json!({
            "order_id": format!("o-race-{round}"), "user_id": "u-1", "amount": "10.00",
            "coupon_id": "c-1", "points": 10, "campaign_id": "spring",
        });
        let gate = Arc::new(tokio::sync::Barrier::new(8));
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let (engine, graph, input, key, gate) = (
                    engine.clone(),
                    graph.clone(),
                    input.clone(),
                    key.clone(),
                    gate.clone(),
                );
                tokio::spawn(async move {
                    gate.wait().await;
                    engine.start(&graph, input, Some(&key)).await
                })
            })
            .collect();
        let mut started: Vec<Started> = Vec::new();
        for t in tasks {
            started.push(t.await.expect("task").expect("start"));
        }
        let id = &started[0].id;
        assert!(started.iter().all(|s| &s.id == id), "{started:?}");
        assert_eq!(
            started.iter().filter(|s| !s.existing).count(),
            1,
            "{started:?}"
        );
        assert_eq!(sagas_with_key(&store, &key).await, 1);
    }
    assert_eq!(all_sagas(&store).await, 6);
}

#[tokio::test]
async fn start_saga_checks_its_arguments_and_the_table() {
    let Some(db) = support::fresh_db(Backend::Postgres, "app_checks").await else {
        return;
    };
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect(&db.url)
        .await
        .expect("connect");
    let mut tx = pool.begin().await.expect("begin");
    let e = start_saga(&mut tx, "order-paid", &json!({}), "k")
        .await
        .unwrap_err();
    assert!(matches!(e, ClientError::NotInstalled), "{e}");
    assert!(e.to_string().contains("install"), "{e}");
    drop(tx);
    install(&mut pool.acquire().await.expect("conn"))
        .await
        .expect("install");
    let mut tx = pool.begin().await.expect("begin");
    let e = start_saga(&mut tx, "order paid", &json!({}), "k")
        .await
        .unwrap_err();
    assert!(matches!(e, ClientError::InvalidSagaName(_)), "{e}");
    let e = start_saga(&mut tx, "order-paid", &json!([1]), "k")
        .await
        .unwrap_err();
    assert!(matches!(e, ClientError::InputNotAnObject { .. }), "{e}");
    let e = start_saga(&mut tx, "order-paid", &json!({}), "")
        .await
        .unwrap_err();
    assert!(matches!(e, ClientError::EmptyIdempotencyKey), "{e}");
    // Refused arguments touch nothing: the transaction is still usable.
    start_saga(&mut tx, "order-paid", &json!({}), "k")
        .await
        .expect("a valid call");
    tx.commit().await.expect("commit");
    assert_eq!(outbox_rows(&pool, "k").await, 1);
    pool.close().await;
}

/// A broker that takes messages and never confirms them.
#[derive(Debug)]
struct NeverConfirms;

#[async_trait::async_trait]
impl Transport for NeverConfirms {
    async fn publish(
        &self,
        _: &str,
        _: Message,
    ) -> Result<(), sagaflow_engine::transport::TransportError> {
        std::future::pending().await
    }
    async fn consume(
        &self,
        _: &str,
    ) -> Result<
        Box<dyn sagaflow_engine::transport::Consumer>,
        sagaflow_engine::transport::TransportError,
    > {
        Err(sagaflow_engine::transport::TransportError::Closed)
    }
    async fn consume_dead_letters(
        &self,
    ) -> Result<
        Box<dyn sagaflow_engine::transport::DeadLetterConsumer>,
        sagaflow_engine::transport::TransportError,
    > {
        Err(sagaflow_engine::transport::TransportError::Closed)
    }
}

#[tokio::test]
async fn an_unconfirmed_batch_times_out_and_its_rows_stay_unsent() {
    let Some(app) = app_db("unconfirmed").await else {
        return;
    };
    let orders: Vec<Value> = (0..3)
        .map(|i| json!({"order_id": format!("nc-{i}"), "user_id": "u", "amount": "1.00"}))
        .collect();
    for o in &orders {
        place_order(&app.pool, o, true).await;
    }
    let relay = Relay::new(app.pool.clone(), Arc::new(NeverConfirms))
        .with_publish_timeout(Duration::from_millis(200));
    match relay.relay_once().await {
        Err(ClientError::PublishTimeout { after, .. }) => {
            assert_eq!(after, Duration::from_millis(200));
        }
        other => panic!("expected a publish timeout, got {other:?}"),
    }
    let unsent = app_count(
        &app.pool,
        "SELECT COUNT(*) FROM sagaflow_start_outbox WHERE sent_at IS NULL AND idempotency_key LIKE $1",
        "nc-%",
    )
    .await;
    assert_eq!(unsent, 3, "no row is marked sent without a confirm");
    // A broker that confirms takes them all on the next round.
    let transport = Arc::new(MemoryTransport::new(NetFaults::default()));
    let relay = Relay::new(app.pool.clone(), transport.clone() as Arc<dyn Transport>);
    assert_eq!(relay.relay_once().await.expect("relay"), 3);
    assert_eq!(transport.depth(START_QUEUE), 3);
}

engine_on_both_backends!(
    a_start_keeps_the_callers_trace_context,
    |app: App, url: String| async move {
        const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let sys = System::start(&url, Setup::default()).await;
        let orders = sys.orders("traced", 3).await;
        let mut tx = app.pool.begin().await.expect("begin");
        let keys: Vec<String> = orders.iter().map(order_id).collect();
        Start::new("order-paid", &orders[0], &keys[0])
            .traceparent(TP)
            .write(&mut tx)
            .await
            .expect("traced start");
        // A malformed context is dropped, not an error; no context is the plain start.
        Start::new("order-paid", &orders[1], &keys[1])
            .traceparent("00-nonsense-01")
            .write(&mut tx)
            .await
            .expect("start with a malformed context");
        start_saga(&mut tx, "order-paid", &orders[2], &keys[2])
            .await
            .expect("start_saga");
        tx.commit().await.expect("commit");
        let kept: Vec<(String, Option<String>)> = sqlx::query_as(
            "SELECT idempotency_key, traceparent FROM sagaflow_start_outbox ORDER BY id",
        )
        .fetch_all(&app.pool)
        .await
        .expect("rows");
        assert_eq!(
            kept,
            [
                (keys[0].clone(), Some(TP.to_owned())),
                (keys[1].clone(), None),
                (keys[2].clone(), None)
            ]
        );
        while relay(&app, &sys).relay_once().await.expect("relay") > 0 {}
        eventually("the three sagas exist", || async {
            all_sagas(&sys.store).await == 3
        })
        .await;
        wait_all_final(&sys.store, LIMIT).await;
        // Without spans (no OpenTelemetry layer here) the saga keeps the caller's context as
        // it came; tests/traces.rs shows the start span as that span's child.
        let mut ids = Vec::new();
        for key in &keys {
            let mut conn = sys.store.pool().acquire().await.expect("conn");
            let id: String = sqlx::query("SELECT id FROM sagas WHERE idempotency_key = $1")
                .bind(key.as_str())
                .fetch_one(&mut *conn)
                .await
                .expect("saga")
                .try_get("id")
                .expect("id");
            ids.push(id);
        }
        let rows = {
            use sagaflow_engine::store::SagaTable as _;
            let mut tx = sys.store.begin().await.expect("begin");
            let rows = tx.load_sagas(&ids).await.expect("load");
            tx.rollback().await.expect("rollback");
            rows
        };
        let traces: Vec<Option<String>> = ids
            .iter()
            .map(|id| {
                let row = rows.iter().find(|r| &r.id == id).expect("the saga");
                row.state.trace.clone()
            })
            .collect();
        assert_eq!(traces, [Some(TP.to_owned()), None, None]);
        assert_eq!(counts(&sys.store).await.get("completed"), Some(&3));
        sys.stop().await;
    }
);

/// A table made by an earlier sagaflow-client (without the trace context's columns): a start
/// without a trace context still goes in, a traced one is a clear error naming the fix, and
/// the relay brings the table up to date itself (what `install` does) and sends every row.
#[tokio::test]
async fn an_outdated_outbox_table_keeps_working_and_the_relay_upgrades_it() {
    let Some(db) = support::fresh_db(Backend::Postgres, "app_outdated").await else {
        return;
    };
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect(&db.url)
        .await
        .expect("connect");
    sqlx::raw_sql(
        "CREATE TABLE sagaflow_start_outbox (id BIGSERIAL PRIMARY KEY, saga TEXT NOT NULL, \
         input JSONB NOT NULL, idempotency_key TEXT NOT NULL UNIQUE, \
         created_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(), sent_at TIMESTAMPTZ); \
         INSERT INTO sagaflow_start_outbox (saga, input, idempotency_key) \
         VALUES ('order-paid', '{}', 'old')",
    )
    .execute(&pool)
    .await
    .expect("the 0.1 table");
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let columns = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT COUNT(*) FROM information_schema.columns \
             WHERE table_name = 'sagaflow_start_outbox' AND column_name IN ('traceparent', 'tracestate')",
        )
        .fetch_one(&pool)
        .await
        .expect("columns")
    };

    let mut tx = pool.begin().await.expect("begin");
    start_saga(&mut tx, "order-paid", &json!({}), "k")
        .await
        .expect("an untraced start on the old table");
    tx.commit().await.expect("commit");
    let mut tx = pool.begin().await.expect("begin");
    let e = Start::new("order-paid", &json!({}), "traced")
        .traceparent(traceparent)
        .write(&mut tx)
        .await
        .unwrap_err();
    assert!(matches!(e, ClientError::OutdatedTable(_)), "{e}");
    assert!(
        e.to_string().contains("run sagaflow_client::install again"),
        "{e}"
    );
    drop(tx);
    assert_eq!(columns().await, 0);

    let transport = Arc::new(MemoryTransport::new(NetFaults::default()));
    let relay = Relay::new(pool.clone(), transport.clone() as Arc<dyn Transport>);
    // An application transaction holds the table: the upgrade cannot have its lock at once,
    // and the relay sends the rows as they are rather than wait or stop.
    let mut app = pool.begin().await.expect("begin");
    sqlx::query("LOCK TABLE sagaflow_start_outbox IN ROW EXCLUSIVE MODE")
        .execute(&mut *app)
        .await
        .expect("lock");
    assert_eq!(
        relay.relay_once().await.expect("relay on the old table"),
        2,
        "the old row and the new one, sent without the upgrade"
    );
    assert_eq!(columns().await, 0, "not upgraded while the table was held");
    app.commit().await.expect("commit");
    assert_eq!(relay.relay_once().await.expect("relay"), 0);
    assert_eq!(columns().await, 2, "the relay added the columns");
    let mut tx = pool.begin().await.expect("begin");
    Start::new("order-paid", &json!({}), "traced")
        .traceparent(traceparent)
        .write(&mut tx)
        .await
        .expect("a traced start after the upgrade");
    tx.commit().await.expect("commit");
    assert_eq!(relay.relay_once().await.expect("relay"), 1);
    assert_eq!(transport.depth(START_QUEUE), 3);
    pool.close().await;
}

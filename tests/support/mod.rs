//! Shared by the end-to-end tests: fresh databases (a SQLite file, or a PostgreSQL database of
//! its own per test), and the whole system (engine + the four services) started in-process.
//!
//! PostgreSQL comes from `SAGAFLOW_TEST_DATABASE_URL` (default: the local server). Without it a
//! test is skipped, except under `CI=true`, where a missing service is a failure.
#![allow(dead_code)]

pub mod deploy;

use std::sync::Arc;
use std::time::{Duration, Instant};

use sagaflow_dsl::SagaGraph;
use sagaflow_engine::Engine;
use sagaflow_engine::store::{ENGINE_MIGRATIONS, Store};
use sagaflow_engine::transport::Transport;
use sagaflow_engine::transport::memory::{Faults as NetFaults, MemoryTransport};
use sagaflow_workers::runtime::Faults;
use sagaflow_workers::services;
use serde_json::{Value, json};
use sqlx::Row;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// One step that retries until it succeeds: a business failure makes the saga Failed.
pub const ONE_STEP: &str = r#"
name: hold
version: 1
sequence_key: ${input.order_id}
input:
  order_id: string
steps:
  - id: charge
    service: payment
    action: charge
    compensation: refund
    on_failure: retry
    params: { order_id: "${input.order_id}" }
"#;

/// An engine on `url` (migrated, the services' tables too) whose loops do not run: the test
/// plays the workers' replies and the due timers itself.
pub async fn engine_alone(url: &str) -> Arc<Engine> {
    let store = Store::connect(url, 2).await.expect("connect");
    store
        .migrate(&[ENGINE_MIGRATIONS, services::MIGRATIONS])
        .await
        .expect("migrate");
    Engine::new(store, Arc::new(MemoryTransport::default()))
}

/// A reply to step 0's `op`, attempt `attempt`.
pub fn reply(
    saga: &str,
    op: sagaflow_engine::machine::Op,
    attempt: u32,
    outcome: sagaflow_engine::machine::Outcome,
) -> sagaflow_engine::Incoming {
    sagaflow_engine::Incoming {
        saga_id: saga.to_owned(),
        event: sagaflow_engine::machine::Event::Reply {
            step: 0,
            op,
            attempt,
            outcome,
        },
        timer_id: None,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A database for one test; PostgreSQL databases are dropped when the test ends well.
#[derive(Debug)]
pub struct TestDb {
    pub url: String,
    admin: Option<(String, String)>,
    _dir: Option<TempDir>,
}

#[derive(Debug)]
pub struct TempDir(pub std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Connects, retrying for a while what a busy server answers ("too many clients", a refused or
/// reset connection while it restarts): on a machine shared by many test processes that is a
/// wait, not a failure. Other errors (a wrong password, no such database) come back at once.
pub async fn connect_patiently(url: &str) -> Result<sqlx::AnyConnection, sqlx::Error> {
    let mut delay = std::time::Duration::from_millis(100);
    for _ in 0..12 {
        match <sqlx::AnyConnection as sqlx::Connection>::connect(url).await {
            Ok(c) => return Ok(c),
            Err(e) if busy(&e) => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(std::time::Duration::from_secs(2));
            }
            Err(e) => return Err(e),
        }
    }
    <sqlx::AnyConnection as sqlx::Connection>::connect(url).await
}

fn busy(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut => true,
        // too_many_connections, cannot_connect_now (starting up / shutting down).
        sqlx::Error::Database(db) => {
            matches!(db.code().as_deref(), Some("53300" | "57P03" | "57P01"))
        }
        _ => false,
    }
}

pub async fn fresh_db(backend: Backend, test: &str) -> Option<TestDb> {
    match backend {
        Backend::Sqlite => {
            let dir = std::env::temp_dir().join(format!(
                "sagaflow-{test}-{}-{:08x}",
                std::process::id(),
                fastrand::u32(..)
            ));
            std::fs::create_dir_all(&dir).expect("temp dir");
            Some(TestDb {
                // A URL, as `--database-url` takes it (a plain path would be refused there).
                url: format!("sqlite://{}?mode=rwc", dir.join("test.db").display()),
                admin: None,
                _dir: Some(TempDir(dir)),
            })
        }
        Backend::Postgres => {
            sqlx::any::install_default_drivers();
            let url = std::env::var("SAGAFLOW_TEST_DATABASE_URL")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
            let mut admin = match connect_patiently(&url).await {
                Ok(c) => c,
                Err(e) if std::env::var("CI").as_deref() != Ok("true") => {
                    eprintln!("skipping {test} on PostgreSQL: {url} is unreachable: {e}");
                    return None;
                }
                Err(e) => panic!("PostgreSQL at {url} is unreachable (CI=true): {e}"),
            };
            sweep_dead_processes_databases(&mut admin).await;
            let name = test_database_name(test);
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                .execute(&mut admin)
                .await
                .expect("create test database");
            let base = url.split('?').next().unwrap_or(&url);
            let server = base.rsplit_once('/').map_or(base, |(s, _)| s);
            Some(TestDb {
                url: format!("{server}/{name}"),
                admin: Some((url.clone(), name)),
                _dir: None,
            })
        }
    }
}

/// `sagaflow_t<pid>_<test>_<random>`: the creating process's id in the name, so that a later
/// run can tell a database left by a killed test process (whose Drop never ran) from one in
/// use; at most 63 bytes, PostgreSQL's limit (a longer name would be cut, and not found).
fn test_database_name(test: &str) -> String {
    let short: String = test.replace('-', "_").chars().take(30).collect();
    format!(
        "sagaflow_t{}_{short}_{:08x}",
        std::process::id(),
        fastrand::u32(..)
    )
}

/// Drops, once per test process, the test databases of processes that are gone (killed, or
/// stopped at a timeout, before their databases' Drop ran). A database whose process id is
/// alive is left alone, whoever that process is now.
async fn sweep_dead_processes_databases(admin: &mut sqlx::AnyConnection) {
    static SWEPT: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    SWEPT
        .get_or_init(|| async {
            sweep_leftovers(admin).await;
        })
        .await;
}

/// Drops every test database whose creating process is gone; returns their names.
pub async fn sweep_leftovers(admin: &mut sqlx::AnyConnection) -> Vec<String> {
    let mut dropped = Vec::new();
    {
        {
            let rows =
                sqlx::query("SELECT datname::text AS datname FROM pg_database WHERE datname LIKE 'sagaflow\\_t%'")
                    .fetch_all(&mut *admin)
                    .await
                    .unwrap_or_default();
            for row in rows {
                let Ok(name) = row.try_get::<String, _>("datname") else {
                    continue;
                };
                let Some(pid) = name
                    .strip_prefix("sagaflow_t")
                    .and_then(|rest| rest.split('_').next())
                    .and_then(|p| p.parse::<u32>().ok())
                else {
                    continue;
                };
                let alive = std::path::Path::new(&format!("/proc/{pid}")).exists();
                if !alive {
                    eprintln!("dropping {name}, left by test process {pid}, which is gone");
                    let gone = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                    )))
                    .execute(&mut *admin)
                    .await;
                    if gone.is_ok() {
                        dropped.push(name);
                    }
                }
            }
        }
    }
    dropped
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some((admin, name)) = self.admin.take() {
            // Best effort, on a thread of its own: Drop cannot await.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                if let Ok(rt) = rt {
                    rt.block_on(async {
                        if let Ok(mut c) = connect_patiently(&admin).await {
                            let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                            )))
                            .execute(&mut c)
                            .await;
                        }
                    });
                }
            })
            .join();
        }
    }
}

/// The shipped order flow with a short step timeout, so that lost messages are recovered fast.
pub fn order_saga() -> String {
    include_str!("../../sagas/order.yaml").replace("timeout: 5s", "timeout: 700ms")
}

pub fn refund_saga() -> String {
    include_str!("../../sagas/order-refund.yaml").to_owned()
}

/// The engine and the four services, running.
pub struct System {
    pub store: Store,
    pub engine: Arc<Engine>,
    pub transport: Arc<MemoryTransport>,
    pub order: Arc<SagaGraph>,
    pub refund: Arc<SagaGraph>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Setup {
    pub net: NetFaults,
    pub payment: Faults,
    pub coupon: Faults,
    pub points: Faults,
    pub gmv: Faults,
}

impl System {
    pub async fn start(url: &str, setup: Setup) -> System {
        let store = Store::connect(url, 8).await.expect("connect");
        store
            .migrate(&[ENGINE_MIGRATIONS, services::MIGRATIONS])
            .await
            .expect("migrate");
        let transport = Arc::new(MemoryTransport::new(setup.net));
        let engine = Engine::new(store.clone(), transport.clone());
        let order = engine.register(&order_saga()).await.expect("order saga");
        let refund = engine.register(&refund_saga()).await.expect("refund saga");
        let (stop, stopped) = watch::channel(false);
        let mut tasks = Vec::new();
        let e = engine.clone();
        let s = stopped.clone();
        tasks.push(tokio::spawn(async move {
            let _ = e.run(s).await;
        }));
        // From here on every commit of this engine hands its outbox rows to its relay.
        for _ in 0..2_000 {
            if engine.relay_running() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert!(engine.relay_running(), "the engine's relay did not start");
        for (service, faults) in [
            ("payment", setup.payment),
            ("coupon", setup.coupon),
            ("points", setup.points),
            ("gmv", setup.gmv),
        ] {
            let w = services::worker(
                service,
                store.pool().clone(),
                transport.clone() as Arc<dyn Transport>,
            )
            .expect("known service")
            .with_faults(faults);
            let s = stopped.clone();
            tasks.push(tokio::spawn(async move {
                let _ = w.run(s).await;
            }));
        }
        System {
            store,
            engine,
            transport,
            order,
            refund,
            stop,
            tasks,
        }
    }

    /// Graceful stop: loops finish what they hold.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        self.transport.close();
        for t in self.tasks {
            let _ = t.await;
        }
    }

    /// Abrupt stop: every task aborted mid-flight, in-process messages lost (a crash).
    pub async fn crash(self) {
        for t in &self.tasks {
            t.abort();
        }
        self.transport.close();
        for t in self.tasks {
            let _ = t.await;
        }
    }

    /// Seeds accounts, coupons and campaigns for `n` orders and returns their inputs.
    pub async fn orders(&self, prefix: &str, n: usize) -> Vec<Value> {
        seed_orders(&self.store, prefix, n).await
    }
}

/// Seeds accounts, coupons and campaigns for `n` orders in `store` and returns their inputs.
pub async fn seed_orders(store: &Store, prefix: &str, n: usize) -> Vec<Value> {
    let orders: Vec<Value> = (0..n)
        .map(|i| {
            let cents = 100 + (i as u64 * 7919) % 40_000;
            json!({
                "order_id": format!("o-{prefix}-{i}"),
                "user_id": format!("u-{prefix}-{i}"),
                "amount": format!("{}.{:02}", cents / 100, cents % 100),
                "coupon_id": format!("c-{prefix}-{i}"),
                "points": cents / 100,
                "campaign_id": if i % 2 == 0 { "spring" } else { "summer" },
            })
        })
        .collect();
    let mut tx = store.pool().begin().await.expect("begin");
    let accounts: Vec<(String, i64)> = orders
        .iter()
        .map(|o| {
            (
                o["user_id"].as_str().unwrap_or_default().to_owned(),
                100_000,
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
    services::payment::seed(&mut tx, &accounts)
        .await
        .expect("seed payment");
    services::coupon::seed(&mut tx, &coupons)
        .await
        .expect("seed coupons");
    services::gmv::seed(&mut tx, &["spring".to_owned(), "summer".to_owned()])
        .await
        .expect("seed gmv");
    tx.commit().await.expect("commit seed");
    orders
}

/// Waits until no saga is unfinished; panics with the stragglers after `limit`.
pub async fn wait_all_final(store: &Store, limit: Duration) {
    let start = Instant::now();
    loop {
        let mut conn = store.pool().acquire().await.expect("conn");
        let rows = sqlx::query("SELECT id, status FROM sagas WHERE finished_at IS NULL")
            .fetch_all(&mut *conn)
            .await
            .expect("query");
        if rows.is_empty() {
            return;
        }
        if start.elapsed() > limit {
            let left: Vec<String> = rows
                .iter()
                .map(|r| {
                    format!(
                        "{} {}",
                        r.try_get::<String, _>("id").unwrap_or_default(),
                        r.try_get::<String, _>("status").unwrap_or_default()
                    )
                })
                .collect();
            panic!("{} sagas not final after {limit:?}: {left:?}", left.len());
        }
        drop(conn);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Counts of sagas by status.
pub async fn counts(store: &Store) -> std::collections::BTreeMap<String, i64> {
    let mut conn = store.pool().acquire().await.expect("conn");
    let rows = sqlx::query("SELECT status, COUNT(*) AS n FROM sagas GROUP BY status")
        .fetch_all(&mut *conn)
        .await
        .expect("query");
    rows.iter()
        .map(|r| {
            (
                r.try_get("status").expect("status"),
                r.try_get("n").expect("n"),
            )
        })
        .collect()
}

/// The services' invariant check over every finished saga; panics with the violations.
pub async fn assert_invariants(store: &Store) -> usize {
    let mut conn = store.pool().acquire().await.expect("conn");
    let outcomes = services::outcomes(&mut conn).await.expect("outcomes");
    let violations = services::check_all(&mut conn, &outcomes)
        .await
        .expect("check");
    assert!(
        violations.is_empty(),
        "invariants violated:\n{}",
        violations.join("\n")
    );
    outcomes.len()
}

/// Runs `body` once per backend (SQLite file, PostgreSQL database of its own).
#[macro_export]
macro_rules! on_both_backends {
    ($name:ident, $body:expr) => {
        mod $name {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                if let Some(db) =
                    support::fresh_db(support::Backend::Sqlite, stringify!($name)).await
                {
                    ($body)(db.url.clone()).await;
                }
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                if let Some(db) =
                    support::fresh_db(support::Backend::Postgres, stringify!($name)).await
                {
                    ($body)(db.url.clone()).await;
                }
            }
        }
    };
}

//! A production deployment for end-to-end tests: `sagaflow engine` and `sagaflow worker`
//! *processes* over the real RabbitMQ and a PostgreSQL database of the test's own, on a queue
//! prefix of the test's own. Processes can be SIGKILLed and restarted; logs go to files whose
//! tails are printed when a wait fails.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sagaflow_dsl::SagaGraph;
use sagaflow_engine::Engine;
use sagaflow_engine::store::{ENGINE_MIGRATIONS, Store};
use sagaflow_engine::transport::amqp::{AmqpConfig, AmqpTransport};
use sagaflow_engine::transport::{REPLY_QUEUE, START_QUEUE, Transport, command_queue};
use sagaflow_workers::services;
use serde_json::Value;
use sqlx::Row;

use super::{Backend, TempDir, TestDb, fresh_db};

pub fn amqp_url() -> String {
    std::env::var("SAGAFLOW_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// The order flow with a 2 s step timeout (a lost message is retried sooner than with 5 s) and
/// 12 attempts for transient failures (so a test's injected flakiness never exhausts them).
pub fn order_saga() -> String {
    include_str!("../../sagas/order.yaml")
        .replace("timeout: 5s", "timeout: 2s")
        .replacen("max_attempts: 5", "max_attempts: 12", 1)
}

pub struct Proc {
    pub name: String,
    args: Vec<String>,
    child: Child,
}

pub struct Deployment {
    pub db: TestDb,
    pub store: Store,
    /// The test's own connection to the broker (publishing, dead letters, cleanup).
    pub transport: Arc<AmqpTransport>,
    /// A driver without loops: starts sagas in the database (the engine processes relay them).
    pub engine: Arc<Engine>,
    pub order: Arc<SagaGraph>,
    pub prefix: String,
    pub partitions: u16,
    pub procs: Vec<Proc>,
    logs: TempDir,
    /// Command queues of services other than the four (a test's own worker), removed with the
    /// deployment's.
    pub extra_services: Vec<String>,
    /// `finish` removed the queues; else Drop does (a test that failed).
    queues_removed: bool,
}

impl Deployment {
    /// None (skip) when PostgreSQL or RabbitMQ is missing, except under CI=true.
    pub async fn new(test: &str, partitions: u16) -> Option<Deployment> {
        let db = fresh_db(Backend::Postgres, test).await?;
        let prefix = format!(
            "e2e-{test}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let mut config = AmqpConfig::new(&amqp_url());
        config.prefix = prefix.clone();
        config.partitions = partitions;
        config.connection_name = format!("test {test}");
        let transport = match AmqpTransport::connect(config).await {
            Ok(t) => t,
            Err(e) if std::env::var("CI").as_deref() != Ok("true") => {
                eprintln!("skipping {test}: RabbitMQ is not reachable ({e})");
                return None;
            }
            Err(e) => panic!("RabbitMQ is not reachable under CI=true: {e}"),
        };
        let store = Store::connect(&db.url, 4).await.expect("connect");
        store
            .migrate(&[ENGINE_MIGRATIONS, services::MIGRATIONS])
            .await
            .expect("migrate");
        let engine = Engine::new(store.clone(), transport.clone() as Arc<dyn Transport>);
        let order = engine.register(&order_saga()).await.expect("order saga");
        let logs = std::env::temp_dir().join(format!("sagaflow-e2e-{prefix}"));
        std::fs::create_dir_all(&logs).expect("log dir");
        Some(Deployment {
            db,
            store,
            transport,
            engine,
            order,
            prefix,
            partitions,
            procs: Vec::new(),
            logs: TempDir(logs),
            extra_services: Vec::new(),
            queues_removed: false,
        })
    }

    fn common(&self) -> Vec<String> {
        [
            "--database-url",
            &self.db.url,
            "--amqp-url",
            &amqp_url(),
            "--partitions",
            &self.partitions.to_string(),
            "--prefix",
            &self.prefix,
            "--pool",
            "4",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect()
    }

    fn spawn(&mut self, name: &str, args: Vec<String>) -> usize {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.logs.0.join(format!("{name}.log")))
            .expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_sagaflow"))
            .args(&args)
            .env("SAGAFLOW_LOG", "warn")
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn sagaflow");
        self.procs.push(Proc {
            name: name.to_owned(),
            args,
            child,
        });
        self.procs.len() - 1
    }

    /// An engine process; returns (index, HTTP address).
    pub fn engine_process(&mut self) -> (usize, String) {
        self.engine_process_with(&[])
    }

    /// An engine process with extra flags (e.g. `--saga FILE`); returns (index, HTTP address).
    pub fn engine_process_with(&mut self, extra: &[&str]) -> (usize, String) {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let address = format!("127.0.0.1:{port}");
        let mut args = vec!["engine".to_owned()];
        args.extend(self.common());
        args.extend(["--http".to_owned(), address.clone()]);
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let n = self
            .procs
            .iter()
            .filter(|p| p.name.starts_with("engine"))
            .count();
        (self.spawn(&format!("engine-{n}"), args), address)
    }

    /// A worker process for `service` with extra flags (e.g. `--flaky 0.3`).
    pub fn worker_process(&mut self, service: &str, extra: &[&str]) -> usize {
        let mut args = vec!["worker".to_owned(), service.to_owned()];
        args.extend(self.common());
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let n = self
            .procs
            .iter()
            .filter(|p| p.name.starts_with(service))
            .count();
        self.spawn(&format!("{service}-{n}"), args)
    }

    /// One worker process per service.
    pub fn all_workers(&mut self) {
        for s in services::SERVICES {
            self.worker_process(s, &[]);
        }
    }

    /// SIGKILL: no cleanup, no acknowledgements.
    pub fn kill(&mut self, i: usize) {
        let p = &mut self.procs[i];
        p.child.kill().expect("kill");
        p.child.wait().expect("wait");
    }

    /// Starts the same process again (after a kill).
    pub fn restart(&mut self, i: usize) {
        let name = self.procs[i].name.clone();
        let args = self.procs[i].args.clone();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.logs.0.join(format!("{name}.log")))
            .expect("log file");
        self.procs[i].child = Command::new(env!("CARGO_BIN_EXE_sagaflow"))
            .args(&args)
            .env("SAGAFLOW_LOG", "warn")
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn sagaflow");
    }

    /// SIGTERM and wait: graceful shutdown must end the process with success.
    pub fn terminate(&mut self, i: usize) -> std::process::ExitStatus {
        let p = &mut self.procs[i];
        let ok = Command::new("kill")
            .args(["-TERM", &p.child.id().to_string()])
            .status()
            .expect("kill -TERM");
        assert!(ok.success());
        p.child.wait().expect("wait")
    }

    /// The tail of every process's log (for failure messages).
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for p in &self.procs {
            let text = std::fs::read_to_string(self.logs.0.join(format!("{}.log", p.name)))
                .unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(15)..].join("\n");
            out.push_str(&format!("--- {} ---\n{tail}\n", p.name));
        }
        out
    }

    /// Seeds accounts, coupons and campaigns for `n` orders and returns their inputs.
    pub async fn orders(&self, prefix: &str, n: usize) -> Vec<Value> {
        super::seed_orders(&self.store, prefix, n).await
    }

    pub async fn start(&self, input: Value) -> String {
        self.engine
            .start(&self.order, input, None)
            .await
            .expect("start")
            .id
    }

    /// Waits until every saga is final; panics with the stragglers and the logs after `limit`.
    pub async fn wait_all_final(&self, limit: Duration) {
        let start = Instant::now();
        loop {
            let mut conn = self.store.pool().acquire().await.expect("conn");
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
                    .take(10)
                    .map(|r| {
                        format!(
                            "{} {}",
                            r.try_get::<String, _>("id").unwrap_or_default(),
                            r.try_get::<String, _>("status").unwrap_or_default()
                        )
                    })
                    .collect();
                panic!(
                    "{} sagas not final after {limit:?}: {left:?}\n{}",
                    rows.len(),
                    self.logs()
                );
            }
            drop(conn);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until at least `n` sagas are final.
    pub async fn wait_final_at_least(&self, n: i64, limit: Duration) {
        let start = Instant::now();
        loop {
            let done = self
                .scalar("SELECT COUNT(*) AS n FROM sagas WHERE finished_at IS NOT NULL")
                .await;
            if done >= n {
                return;
            }
            assert!(
                start.elapsed() < limit,
                "only {done} of {n} sagas final after {limit:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A number from a query with one `$1` text parameter (NULL reads as 0).
    pub async fn scalar_for(&self, sql: &'static str, arg: &str) -> i64 {
        let mut conn = self.store.pool().acquire().await.expect("conn");
        let n: Option<i64> = sqlx::query(sql)
            .bind(arg)
            .fetch_one(&mut *conn)
            .await
            .expect("query")
            .try_get("n")
            .expect("n");
        n.unwrap_or(0)
    }

    pub async fn scalar(&self, sql: &'static str) -> i64 {
        let mut conn = self.store.pool().acquire().await.expect("conn");
        sqlx::query(sql)
            .fetch_one(&mut *conn)
            .await
            .expect("query")
            .try_get("n")
            .expect("n")
    }

    /// No saga advanced twice: no transition appears twice in any saga's history, and every
    /// final saga reached its final state once.
    pub async fn assert_no_double_transitions(&self) {
        let doubled = self
            .scalar(
                "SELECT COUNT(*) AS n FROM (SELECT saga_id, step, kind, detail FROM saga_history \
                 WHERE kind IN ('succeeded', 'failed', 'compensated', 'completed', 'dispatch') \
                 GROUP BY saga_id, step, kind, detail HAVING COUNT(*) > 1) d",
            )
            .await;
        assert_eq!(doubled, 0, "a transition was applied twice");
    }

    /// Statuses of all sagas, counted.
    pub async fn counts(&self) -> std::collections::BTreeMap<String, i64> {
        super::counts(&self.store).await
    }
}

/// The logical queues of a deployment (each with its partitions), `extra` services' included.
fn logical_queues(extra: &[String]) -> Vec<String> {
    let mut logicals: Vec<String> = services::SERVICES
        .iter()
        .copied()
        .chain(extra.iter().map(String::as_str))
        .map(command_queue)
        .collect();
    logicals.push(REPLY_QUEUE.to_owned());
    logicals.push(START_QUEUE.to_owned());
    logicals
}

impl Deployment {
    /// Stops every process and removes the test's queues.
    pub async fn finish(mut self) {
        for p in &mut self.procs {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
        let logicals = logical_queues(&self.extra_services);
        let refs: Vec<&str> = logicals.iter().map(String::as_str).collect();
        let _ = self.transport.delete_topology(&refs).await;
        self.transport.close().await;
        self.queues_removed = true;
    }
}

impl Drop for Deployment {
    /// A failed test still kills its processes and removes its queues (on a connection and a
    /// runtime of its own: Drop cannot await, and the test's runtime may be going away).
    fn drop(&mut self) {
        for p in &mut self.procs {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
        if self.queues_removed {
            return;
        }
        let (prefix, partitions) = (self.prefix.clone(), self.partitions);
        let extra = self.extra_services.clone();
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                let mut config = AmqpConfig::new(&amqp_url());
                config.prefix = prefix;
                config.partitions = partitions;
                config.connection_name = "test cleanup".into();
                if let Ok(t) = AmqpTransport::connect(config).await {
                    let logicals = logical_queues(&extra);
                    let refs: Vec<&str> = logicals.iter().map(String::as_str).collect();
                    let _ = t.delete_topology(&refs).await;
                    t.close().await;
                }
            });
        })
        .join();
    }
}

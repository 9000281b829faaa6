//! A production process started before its database exists waits for it (retrying with
//! backoff and saying why), becomes ready once it is created, and ends with success on SIGTERM
//! — also while it is still waiting.
//!
//! Needs PostgreSQL (`SAGAFLOW_TEST_DATABASE_URL`, default the local server) and RabbitMQ
//! (`SAGAFLOW_TEST_AMQP_URL`); skipped without them, except under `CI=true`.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sagaflow_engine::transport::amqp::{AmqpConfig, AmqpTransport};
use sagaflow_engine::transport::{REPLY_QUEUE, START_QUEUE, command_queue};
use sqlx::{AnyConnection, Connection, Row};

fn admin_url() -> String {
    std::env::var("SAGAFLOW_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

fn amqp_url() -> String {
    std::env::var("SAGAFLOW_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// Drops the database when the test ends, however it ends.
struct DropDb {
    admin: String,
    name: String,
}

impl Drop for DropDb {
    fn drop(&mut self) {
        let (admin, name) = (self.admin.clone(), self.name.clone());
        // Drop cannot await: a runtime of its own on a thread of its own.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                if let Ok(mut c) = AnyConnection::connect(&admin).await {
                    let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                    )))
                    .execute(&mut c)
                    .await;
                }
            });
        })
        .join();
    }
}

/// A `sagaflow` process whose stderr goes to a file; killed if the test ends before it does.
struct Proc {
    child: Child,
    log: std::path::PathBuf,
}

impl Proc {
    fn spawn(args: &[&str]) -> Proc {
        let log = std::env::temp_dir().join(format!(
            "sagaflow-startup-wait-{}-{:08x}.log",
            std::process::id(),
            fastrand::u32(..)
        ));
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_sagaflow"))
            .args(args)
            .env("SAGAFLOW_LOG", "warn")
            .stdout(Stdio::from(file.try_clone().expect("log")))
            .stderr(Stdio::from(file))
            .spawn()
            .expect("spawn sagaflow");
        Proc { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn wait_for_log(&mut self, needle: &str, limit: Duration) {
        let start = Instant::now();
        while !self.log().contains(needle) {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "exited ({status}) before logging `{needle}`:\n{}",
                    self.log()
                );
            }
            assert!(
                start.elapsed() < limit,
                "no `{needle}` after {limit:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM, then the exit status (within 10 s).
    async fn terminate(&mut self) -> std::process::ExitStatus {
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill -TERM");
        assert!(sent.success());
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "still running 10 s after SIGTERM:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// An admin connection, or None (skip) when PostgreSQL is missing outside CI.
async fn admin(test: &str) -> Option<AnyConnection> {
    sqlx::any::install_default_drivers();
    match AnyConnection::connect(&admin_url()).await {
        Ok(c) => Some(c),
        Err(e) if std::env::var("CI").as_deref() != Ok("true") => {
            eprintln!("skipping {test}: PostgreSQL is unreachable: {e}");
            None
        }
        Err(e) => panic!("PostgreSQL is unreachable under CI=true: {e}"),
    }
}

/// A database name nobody has, and its URL on the admin server.
fn missing_database(test: &str) -> (String, String) {
    let name = format!("sagaflow_{test}_{:08x}", fastrand::u32(..));
    let url = admin_url();
    let base = url.split('?').next().unwrap_or(&url);
    let server = base.rsplit_once('/').map_or(base, |(s, _)| s);
    (format!("{server}/{name}"), name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_waits_for_a_missing_database_then_serves_and_stops_on_sigterm() {
    let test = "wait_db";
    let Some(mut admin) = admin(test).await else {
        return;
    };
    let prefix = format!("e2e-{test}-{:08x}", fastrand::u32(..));
    let mut config = AmqpConfig::new(&amqp_url());
    config.prefix = prefix.clone();
    config.partitions = 1;
    config.connection_name = format!("test {test}");
    let transport = match AmqpTransport::connect(config).await {
        Ok(t) => t,
        Err(e) if std::env::var("CI").as_deref() != Ok("true") => {
            eprintln!("skipping {test}: RabbitMQ is not reachable ({e})");
            return;
        }
        Err(e) => panic!("RabbitMQ is not reachable under CI=true: {e}"),
    };
    let (url, name) = missing_database(test);
    let _drop = DropDb {
        admin: admin_url(),
        name: name.clone(),
    };
    let mut worker = Proc::spawn(&[
        "worker",
        "payment",
        "--database-url",
        &url,
        "--amqp-url",
        &amqp_url(),
        "--prefix",
        &prefix,
        "--partitions",
        "1",
        "--pool",
        "2",
    ]);

    // It keeps running, saying why, attempt after attempt.
    worker
        .wait_for_log("database not ready (attempt 2)", Duration::from_secs(5))
        .await;
    assert!(
        worker.log().contains("does not exist"),
        "the reason is missing:\n{}",
        worker.log()
    );

    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut admin)
        .await
        .expect("create the database");
    worker
        .wait_for_log("consuming 1 partitions", Duration::from_secs(15))
        .await;
    // It migrated its tables into the new database.
    let mut db = AnyConnection::connect(&url)
        .await
        .expect("the new database");
    let tables: i64 = sqlx::query(
        "SELECT COUNT(*) AS n FROM information_schema.tables WHERE table_name IN ('payment_accounts', 'payment_ledger')",
    )
    .fetch_one(&mut db)
    .await
    .expect("query")
    .try_get("n")
    .expect("n");
    assert_eq!(tables, 2, "payment tables after start:\n{}", worker.log());
    let _ = db.close().await;

    let status = worker.terminate().await;
    assert!(status.success(), "{status}:\n{}", worker.log());
    assert!(
        worker.log().contains("sagaflow worker payment: stopped"),
        "{}",
        worker.log()
    );

    let logicals = [
        command_queue("payment"),
        REPLY_QUEUE.to_owned(),
        START_QUEUE.to_owned(),
    ];
    let refs: Vec<&str> = logicals.iter().map(String::as_str).collect();
    let _ = transport.delete_topology(&refs).await;
    transport.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_stopped_while_waiting_for_its_database_exits_with_success() {
    let test = "wait_stop";
    let Some(admin) = admin(test).await else {
        return;
    };
    let _ = admin.close().await;
    let (url, name) = missing_database(test);
    let _drop = DropDb {
        admin: admin_url(),
        name,
    };
    let mut engine = Proc::spawn(&[
        "engine",
        "--database-url",
        &url,
        "--amqp-url",
        &amqp_url(),
        "--http",
        "127.0.0.1:0",
        "--pool",
        "2",
    ]);
    engine
        .wait_for_log("database not ready (attempt 1)", Duration::from_secs(5))
        .await;
    let status = engine.terminate().await;
    assert!(status.success(), "{status}:\n{}", engine.log());
    assert!(
        engine.log().contains("stopped before it was ready"),
        "{}",
        engine.log()
    );
}

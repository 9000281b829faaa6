//! The example's process as a user first runs it: embedded, on a fresh SQLite file. Sagas
//! started in that file from outside (what `sagaflow start … --db shipping.db` does) are run by
//! its engine and its worker: the PO box is refused and compensated, the others complete; and
//! SIGTERM stops it cleanly.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sagaflow_engine::Engine;
use sagaflow_engine::machine::SagaStatus;
use sagaflow_engine::store::{SagaQueries, Store};
use sagaflow_engine::transport::memory::MemoryTransport;
use serde_json::json;

/// Kills the process and removes the directory, also when the test fails.
struct Running(Child, std::path::PathBuf);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

/// Removes the directory, also when the test fails.
struct Dir(std::path::PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test]
async fn embedded_mode_runs_sagas_started_in_its_database() {
    let dir = std::env::temp_dir().join(format!("sagaflow-shipping-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let db = dir.join("shipping.db");
    let child = Command::new(env!("CARGO_BIN_EXE_shipping"))
        .env("SAGAFLOW_DATABASE_URL", &db)
        .env_remove("SAGAFLOW_AMQP_URL")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut running = Running(child, dir);
    // It says so once its tables and its saga are in the database.
    let mut line = String::new();
    let mut stderr = BufReader::new(running.0.stderr.take().unwrap()); // open until the end
    stderr.read_line(&mut line).unwrap();
    assert!(line.starts_with("shipping: running on"), "{line}");

    let store = Store::connect(&db.display().to_string(), 1).await.unwrap();
    let engine = Engine::new(
        store.clone(),
        std::sync::Arc::new(MemoryTransport::default()),
    );
    let saga = engine
        .register(sagaflow_example_shipping::SERVICE.sagas[0])
        .await
        .unwrap();
    let mut ids = Vec::new();
    for (order, address) in [
        ("o-1", "1 Harbour Street"),
        ("o-2", "PO Box 17"),
        ("o-3", "9 Mill Lane"),
    ] {
        let input = json!({"order_id": order, "address": address, "parcels": 2});
        ids.push(engine.start(&saga, input, None).await.unwrap().id);
    }
    let start = Instant::now();
    let mut states = Vec::new();
    for id in &ids {
        loop {
            let state = store.saga_state(id).await.unwrap().unwrap();
            if state.status.is_final() {
                states.push(state.status);
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{id}: {:?}",
                state.status
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert_eq!(states[0], SagaStatus::Completed);
    assert!(
        matches!(&states[1], SagaStatus::Compensated { reason } if reason.contains("unserviceable")),
        "{:?}",
        states[1]
    );
    assert_eq!(states[2], SagaStatus::Completed);
    store.pool().close().await;

    let pid = running.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let exit = running.0.wait().unwrap();
    assert!(exit.success(), "SIGTERM: {exit}");
}

/// A value the process cannot use ends it at once with exit code 1 and one line naming the
/// variable and the value, never a panic; nothing is created.
#[test]
fn a_bad_environment_is_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("sagaflow-shipping-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let _removed = Dir(dir.clone());
    let db = dir.join("shipping.db");
    for (var, value, says) in [
        (
            "SAGAFLOW_PARTITIONS",
            "eight",
            "a whole number from 1 to 65535",
        ),
        ("SAGAFLOW_PARTITIONS", "0", "a whole number from 1 to 65535"),
        (
            "SAGAFLOW_QUEUE_TYPE",
            "mirrored",
            "expected `classic` or `quorum`",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_shipping"))
            .env("SAGAFLOW_DATABASE_URL", &db)
            .env("SAGAFLOW_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
            .env(var, value)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{var}={value}: {stderr}");
        assert!(
            stderr.starts_with(&format!("shipping: {var}=`{value}`: ")) && stderr.contains(says),
            "{stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(
            !db.exists(),
            "nothing is opened before the environment is checked"
        );
    }
}

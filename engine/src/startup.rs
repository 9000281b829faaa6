//! Start-up: a process waits for its database and its broker instead of exiting when one is
//! not up yet (unreachable, starting, shutting down, out of connection slots, the database not
//! created yet), retrying with a jittered exponential backoff (the `backon` crate) and printing
//! each failure with its reason; a mistake no waiting cures (a malformed address, a refused
//! login, failing SQL) is returned at once. `sagaflow engine`, `sagaflow worker` and a service
//! of one's own (`sagaflow_workers::service`) start through here.

use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use tokio::sync::watch;

use crate::store::{Migrations, Store, StoreError};
use crate::transport::TransportError;
use crate::transport::amqp::{AmqpConfig, AmqpTransport};

/// Backoff between start-up attempts: 250 ms doubling up to 10 s, jittered, without end.
pub fn startup_backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(250))
        .with_max_delay(Duration::from_secs(10))
        .with_jitter()
        .without_max_times()
}

/// Runs `attempt` until it succeeds, retrying (with [`startup_backoff`]) the failures
/// `transient` accepts and printing each one with its reason; `None` when a shutdown signal
/// comes first.
pub async fn wait_for<T, E, F, Fut>(
    who: &str,
    what: &str,
    attempt: F,
    transient: fn(&E) -> bool,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Option<T>, E>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut failures = 0u32;
    let retrying = attempt
        .retry(startup_backoff())
        .sleep(tokio::time::sleep)
        .when(transient)
        .notify(|e: &E, wait: Duration| {
            failures += 1;
            eprintln!(
                "{who}: {what} not ready (attempt {failures}): {e}; retrying in {:.1}s",
                wait.as_secs_f64()
            );
        });
    tokio::select! {
        result = retrying => result.map(Some),
        _ = shutdown.wait_for(|stop| *stop) => Ok(None),
    }
}

/// Whether waiting may cure a failure to open or migrate the database: refused or reset
/// connections, a server starting up or shutting down, no free connection slot, a database
/// that does not exist yet. Not: a malformed URL, a SQLite file that cannot be opened,
/// authentication failures, failing SQL.
pub fn store_transient(e: &StoreError) -> bool {
    match e {
        // A SQLite file that cannot be opened (no such folder, no permission) stays so.
        StoreError::Connect { url, .. } if !url.starts_with("postgres") => false,
        StoreError::Connect { reason, .. } => {
            let r = reason.to_ascii_lowercase();
            ![
                "error with configuration",
                "password authentication failed",
                "pg_hba.conf",
            ]
            .iter()
            .any(|permanent| r.contains(permanent))
        }
        StoreError::Db(e) | StoreError::Migration { error: e, .. } => sqlx_transient(e),
        _ => false,
    }
}

fn sqlx_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::PoolTimedOut => true,
        // SQLSTATE classes 08 (connection exception) and 57P (operator intervention: shutting
        // down, starting up), 53300 too_many_connections, 3D000 invalid_catalog_name.
        sqlx::Error::Database(db) => db.code().is_some_and(|c| {
            c.starts_with("08") || c.starts_with("57P") || c == "53300" || c == "3D000"
        }),
        _ => false,
    }
}

/// Whether waiting may cure a failure to connect to RabbitMQ (unreachable, not answering);
/// not a refused login or a topology that disagrees with the deployment's.
pub fn amqp_transient(e: &TransportError) -> bool {
    matches!(e, TransportError::Other(m)
        if m.starts_with("cannot connect to RabbitMQ") && !m.contains("ACCESS_REFUSED"))
}

/// Opens and migrates the database, waiting while it is unreachable (or starting, or full);
/// `None` when `shutdown` turns true first. `who` names the process in the lines it prints;
/// `engine`: the process runs the engine on this store ([`Store::connect_engine`]).
pub async fn connect_store(
    who: &str,
    url: &str,
    pool: u32,
    migrations: &[Migrations],
    engine: bool,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Option<Store>, StoreError> {
    let attempt = || async {
        let store = if engine {
            Store::connect_engine(url, pool).await?
        } else {
            Store::connect(url, pool).await?
        };
        store.migrate(migrations).await?;
        Ok::<_, StoreError>(store)
    };
    wait_for(who, "database", attempt, store_transient, shutdown).await
}

/// Connects to RabbitMQ, waiting while it is unreachable; `None` when `shutdown` turns true
/// first.
pub async fn connect_amqp(
    who: &str,
    config: AmqpConfig,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Option<Arc<AmqpTransport>>, TransportError> {
    let attempt = || async { AmqpTransport::connect(config.clone()).await };
    wait_for(who, "RabbitMQ", attempt, amqp_transient, shutdown).await
}

/// A watch that turns true on SIGTERM or ctrl-c (ctrl-c alone where SIGTERM cannot be
/// listened for), printing `<who>: shutting down (finishing in-flight work)`. Call inside a
/// Tokio runtime.
pub fn shutdown_on_signal(who: &str) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    let who = who.to_owned();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down: finishing in-flight work");
        eprintln!("{who}: shutting down (finishing in-flight work)");
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

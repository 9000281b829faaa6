//! A service of your own as a process: what every such program would otherwise copy (the
//! environment, the embedded engine or the AMQP transport, migrations, barrier retention,
//! SIGTERM and ctrl-c, closing), so that its `main` is one call:
//!
//! ```no_run
//! # use sagaflow_workers::service::Service;
//! # const SERVICE: Service = Service { name: "shipping", sagas: &[], migrations: &[], handlers: |w| w };
//! fn main() -> std::process::ExitCode {
//!     sagaflow_workers::service::main(SERVICE)
//! }
//! ```
//!
//! The environment, as `sagaflow engine` and `sagaflow worker` read it ([`Config::from_env`]).
//! An empty variable counts as unset; a value the service cannot use is an error naming the
//! variable and the value (checked in either mode), before anything is opened:
//!
//! | variable | default | what |
//! |---|---|---|
//! | `SAGAFLOW_DATABASE_URL` | `<name>.db` | the service's database: `postgres://…` or a SQLite file |
//! | `SAGAFLOW_AMQP_URL` | unset: embedded | set: the worker alone, over RabbitMQ, beside a `sagaflow engine` that knows the sagas |
//! | `SAGAFLOW_PREFIX` | `sagaflow` | the deployment's queue prefix (the database is bound to it) |
//! | `SAGAFLOW_PARTITIONS` | the deployment's, or 1 for a new one | partitions per queue, 1–65535, as every process of the deployment has |
//! | `SAGAFLOW_QUEUE_TYPE` | `classic` | `classic`, or `quorum` on a cluster |
//! | `SAGAFLOW_PREFETCH` | `64` | unacknowledged messages per partition consumer |
//! | `SAGAFLOW_BUNDLE` | `128` | messages per bundle on the wire (1: none) |
//! | `SAGAFLOW_DELIVERY_LIMIT` | the engine's | quorum queues: deliveries before a message is dead-lettered, as every process of the deployment declares it |
//!
//! **Embedded** (no `SAGAFLOW_AMQP_URL`): the engine and the worker in one process, on the
//! database (the engine's tables too) and the in-process transport, the service's sagas
//! registered; sagas started in that database (`sagaflow start … --db <name>.db`) run. **Over
//! RabbitMQ**: the worker alone; its database gets [`BARRIER_MIGRATIONS`](crate::BARRIER_MIGRATIONS)
//! and the service's own migrations, nothing of the engine's. Either way barrier rows older
//! than 7 days are purged, and a stop (SIGTERM, ctrl-c, or the `shutdown` given to [`run`])
//! finishes and acknowledges what is in flight before the process ends. A database or broker
//! that is not up yet is waited for, as `sagaflow worker` waits ([`sagaflow_engine::startup`]);
//! unlike it, a service serves no metrics.

use std::process::ExitCode;
use std::sync::Arc;

use sagaflow_engine::redact::redact_url;
use sagaflow_engine::startup;
use sagaflow_engine::store::{ENGINE_MIGRATIONS, Migrations, StoreError};
use sagaflow_engine::transport::amqp::{AmqpConfig, QueueType};
use sagaflow_engine::transport::memory::MemoryTransport;
use sagaflow_engine::transport::{Transport, TransportError};
use sagaflow_engine::{Engine, EngineError};
use sqlx::AnyPool;
use tokio::sync::watch;

use crate::runtime::Worker;

/// A service: its name, the sagas it takes part in, its tables and its handlers.
#[derive(Debug, Clone, Copy)]
pub struct Service {
    /// The `service:` of its steps in the saga YAML: its command queue is `cmd.<name>`, and its
    /// default database the SQLite file `<name>.db`.
    pub name: &'static str,
    /// Saga definitions (YAML) the embedded engine registers; a worker over RabbitMQ needs none
    /// (its engine knows them).
    pub sagas: &'static [&'static str],
    /// The service's own tables, applied after the SDK's barrier.
    pub migrations: Migrations,
    /// Registers the handlers on the service's worker (and tunes it: lanes, batch size).
    pub handlers: fn(Worker) -> Worker,
}

impl Service {
    /// The service's worker on `pool` and `transport`, its handlers registered.
    pub fn worker(&self, pool: AnyPool, transport: Arc<dyn Transport>) -> Worker {
        (self.handlers)(Worker::new(self.name, pool, transport))
    }
}

/// Where a service's process runs: its database, and the broker unless embedded.
#[derive(Clone)]
pub struct Config {
    pub database_url: String,
    /// None: embedded, with the engine and the in-process transport.
    pub amqp: Option<AmqpConfig>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let amqp = self.amqp.as_ref().map(|a| {
            let url = redact_url(&a.url);
            (url, a.prefix.clone(), a.partitions, a.queue_type)
        });
        f.debug_struct("Config")
            .field("database_url", &redact_url(&self.database_url))
            .field("amqp (url, prefix, partitions, queue type)", &amqp)
            .finish()
    }
}

/// Why a service's process could not start or stopped with an error; each says what it was
/// doing, addresses redacted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServiceError {
    /// An environment variable with a value the service cannot use.
    #[error("{var}=`{value}`: {why}")]
    Env {
        var: &'static str,
        value: String,
        why: String,
    },
    #[error("{doing}: {error}")]
    Store { doing: String, error: StoreError },
    /// The broker's own text says what failed (`cannot connect to RabbitMQ at …`).
    #[error("{0}")]
    Broker(TransportError),
    #[error("{doing}: {error}")]
    Engine { doing: String, error: EngineError },
    #[error("the worker stopped: {0}")]
    Worker(String),
    #[error("the embedded engine's task failed: {0}")]
    EngineTask(String),
    #[error("{doing}: {error}")]
    Io {
        doing: &'static str,
        error: std::io::Error,
    },
}

/// Pool size: the worker's lane, barrier retention, the embedded engine's loops (SQLite has
/// one connection whatever this says).
const POOL: u32 = 4;

impl Config {
    /// The configuration from this process's environment (see the [module](self) docs).
    pub fn from_env(service: &str) -> Result<Config, ServiceError> {
        Config::from_vars(service, |var| match std::env::var(var) {
            Ok(value) => Ok(Some(value)),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(raw)) => Err(ServiceError::Env {
                var,
                value: raw.to_string_lossy().into_owned(),
                why: "not valid UTF-8".into(),
            }),
        })
    }

    /// The configuration from `lookup`, which answers for each variable its value (None:
    /// unset) as [`from_env`](Config::from_env) reads the environment.
    pub fn from_vars(
        service: &str,
        lookup: impl Fn(&'static str) -> Result<Option<String>, ServiceError>,
    ) -> Result<Config, ServiceError> {
        let var = |name| Ok(lookup(name)?.filter(|v: &String| !v.is_empty()));
        let database_url = var("SAGAFLOW_DATABASE_URL")?.unwrap_or_else(|| format!("{service}.db"));
        let url = var("SAGAFLOW_AMQP_URL")?;
        // Checked in either mode: a bad value is a mistake even where it is not used.
        let prefix = var("SAGAFLOW_PREFIX")?;
        // A whole number in `min..=max`, or the error saying what it must be.
        fn number<T: std::str::FromStr + PartialOrd + Copy>(
            var: &'static str,
            value: Option<String>,
            min: T,
            max: T,
            why: &str,
        ) -> Result<Option<T>, ServiceError> {
            let Some(value) = value else { return Ok(None) };
            match value.trim().parse::<T>() {
                Ok(n) if n >= min && n <= max => Ok(Some(n)),
                _ => Err(ServiceError::Env {
                    var,
                    value,
                    why: why.to_owned(),
                }),
            }
        }
        let partitions = number(
            "SAGAFLOW_PARTITIONS",
            var("SAGAFLOW_PARTITIONS")?,
            1u16,
            u16::MAX,
            "the partitions per queue are a whole number from 1 to 65535, the same in every process of the deployment",
        )?;
        let prefetch = number(
            "SAGAFLOW_PREFETCH",
            var("SAGAFLOW_PREFETCH")?,
            1u16,
            u16::MAX,
            "the unacknowledged messages per partition consumer are a whole number from 1 to 65535",
        )?;
        let bundle = number(
            "SAGAFLOW_BUNDLE",
            var("SAGAFLOW_BUNDLE")?,
            1u16,
            u16::MAX,
            "the messages per bundle are a whole number from 1 (no bundles) to 65535",
        )?;
        let delivery_limit = number(
            "SAGAFLOW_DELIVERY_LIMIT",
            var("SAGAFLOW_DELIVERY_LIMIT")?,
            0u32,
            u32::MAX,
            "the delivery limit of quorum queues is a whole number (0: none), the same in every process of the deployment",
        )?;
        let queue_type = match var("SAGAFLOW_QUEUE_TYPE")? {
            None => None,
            Some(value) => Some(
                value
                    .parse::<QueueType>()
                    .map_err(|why| ServiceError::Env {
                        var: "SAGAFLOW_QUEUE_TYPE",
                        value,
                        why,
                    })?,
            ),
        };
        let amqp = url.map(|url| {
            let mut amqp = AmqpConfig::new(&url); // the same defaults as `sagaflow engine`
            amqp.connection_name = format!("{service} worker (pid {})", std::process::id());
            amqp.prefix = prefix.unwrap_or(amqp.prefix);
            amqp.partitions = partitions.unwrap_or(amqp.partitions);
            // Unset: join the deployment with the count it was declared with.
            amqp.join_declared_partitions = partitions.is_none();
            amqp.queue_type = queue_type.unwrap_or(amqp.queue_type);
            amqp.prefetch = prefetch.unwrap_or(amqp.prefetch);
            amqp.bundle = bundle.unwrap_or(amqp.bundle);
            amqp.delivery_limit = delivery_limit.unwrap_or(amqp.delivery_limit);
            amqp
        });
        Ok(Config { database_url, amqp })
    }
}

/// Runs `service` as `config` says until `shutdown` turns true (or its sender is dropped), then
/// lets the worker (and the embedded engine) finish what they hold. Prints one line to stderr
/// once the database is ready and the sagas registered: `<name>: running on …`.
pub async fn run(
    service: &Service,
    config: Config,
    shutdown: watch::Receiver<bool>,
) -> Result<(), ServiceError> {
    let db = redact_url(&config.database_url);
    let store_err = |doing: String| move |error| ServiceError::Store { doing, error };
    // A database or broker that is not up yet is waited for (a stop meanwhile ends the run).
    let mut waiting = shutdown.clone();
    let migrations: &[Migrations] = match config.amqp {
        Some(_) => &[crate::BARRIER_MIGRATIONS, service.migrations],
        // Embedded: the engine's tables too, it runs on this database.
        None => &[
            ENGINE_MIGRATIONS,
            crate::BARRIER_MIGRATIONS,
            service.migrations,
        ],
    };
    // Embedded, the engine runs on this store too (see `Store::connect_engine`).
    let engine = config.amqp.is_none();
    let opened = startup::connect_store(
        service.name,
        &config.database_url,
        POOL,
        migrations,
        engine,
        &mut waiting,
    )
    .await
    .map_err(store_err(format!("opening and migrating {db}")))?;
    let Some(store) = opened else {
        return Ok(());
    };
    // One stop for everything inside: the caller's `shutdown`, or the worker or engine ending.
    let stop = watch::Sender::new(false);
    let stopped = stop.subscribe();
    let mut amqp = None;
    let mut engine = None;
    let (transport, mode): (Arc<dyn Transport>, String) = match config.amqp {
        Some(broker) => {
            // One database, one deployment (before anything touches the broker).
            store
                .bind_prefix(&broker.prefix)
                .await
                .map_err(store_err(format!("binding {db} to its deployment")))?;
            let mode = format!(
                "RabbitMQ {} (prefix `{}`, {} partitions)",
                redact_url(&broker.url),
                broker.prefix,
                broker.partitions
            );
            let connected = startup::connect_amqp(service.name, broker, &mut waiting).await;
            let Some(broker) = connected.map_err(ServiceError::Broker)? else {
                store.pool().close().await;
                return Ok(());
            };
            amqp = Some(broker.clone());
            (broker, mode)
        }
        None => {
            let memory = Arc::new(MemoryTransport::default());
            let embedded = Engine::new(store.clone(), memory.clone());
            for (i, saga) in service.sagas.iter().enumerate() {
                embedded
                    .register(saga)
                    .await
                    .map_err(|error| ServiceError::Engine {
                        doing: format!("registering saga {} of {}", i + 1, service.name),
                        error,
                    })?;
            }
            engine = Some(tokio::spawn(embedded.run(stopped.clone())));
            (memory, "embedded with the engine".to_owned())
        }
    };
    let pool = store.pool().clone();
    let retention =
        crate::barrier::retention_loop(pool.clone(), Default::default(), stopped.clone());
    let retention = tokio::spawn(retention); // barrier rows older than 7 days
    eprintln!("{}: running on {db}, {mode}", service.name);
    let worker = async {
        let worked = service.worker(pool, transport).run(stopped).await;
        stop.send_replace(true);
        worked.map_err(ServiceError::Worker)
    };
    let engine = async {
        let Some(task) = engine else { return Ok(()) };
        let ended = task.await;
        stop.send_replace(true);
        match ended {
            Ok(stopped) => stopped.map_err(|error| ServiceError::Engine {
                doing: "the embedded engine".into(),
                error,
            }),
            Err(gone) => Err(ServiceError::EngineTask(gone.to_string())),
        }
    };
    let work = async { tokio::join!(worker, engine) };
    tokio::pin!(work);
    let (worked, engine_stopped) = tokio::select! {
        done = &mut work => done,
        () = until_stopped(shutdown) => {
            stop.send_replace(true);
            work.await
        }
    };
    let _ = retention.await;
    if let Some(amqp) = amqp {
        amqp.close().await;
    }
    store.pool().close().await;
    worked.and(engine_stopped)
}

/// Returns once `shutdown` is true or its sender is gone.
async fn until_stopped(mut shutdown: watch::Receiver<bool>) {
    while !*shutdown.borrow_and_update() {
        if shutdown.changed().await.is_err() {
            return;
        }
    }
}

/// A watch that turns true on SIGTERM or ctrl-c: the `shutdown` [`run`] takes (the one
/// `sagaflow engine` and `sagaflow worker` use).
pub use sagaflow_engine::startup::shutdown_on_signal;

/// The whole process: [`Config::from_env`], then [`run`] until SIGTERM or ctrl-c. An error is
/// printed to stderr as `<name>: <what went wrong>` and the exit code is 1.
pub fn main(service: Service) -> ExitCode {
    let runtime = tokio::runtime::Runtime::new().map_err(|error| ServiceError::Io {
        doing: "starting the Tokio runtime",
        error,
    });
    let done = runtime.and_then(|rt| {
        rt.block_on(async {
            let config = Config::from_env(service.name)?;
            run(&service, config, shutdown_on_signal(service.name)).await
        })
    });
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}: {e}", service.name);
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::time::{Duration, Instant};

    use async_trait::async_trait;
    use sagaflow_engine::machine::SagaStatus;
    use sagaflow_engine::store::{SagaQueries, Store};
    use serde_json::{Value, json};

    use super::*;
    use crate::sdk::{SagaStep, StepContext, StepError, param_str};

    fn config(vars: &[(&str, &str)]) -> Result<Config, ServiceError> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Config::from_vars("notes", |var| Ok(vars.get(var).cloned()))
    }

    #[test]
    fn without_an_amqp_url_it_is_embedded_on_a_file_named_after_the_service() {
        let c = config(&[]).unwrap();
        assert_eq!(c.database_url, "notes.db");
        assert!(c.amqp.is_none());
        // An empty variable is an unset one.
        let c = config(&[("SAGAFLOW_AMQP_URL", ""), ("SAGAFLOW_DATABASE_URL", "")]).unwrap();
        assert_eq!(
            (c.database_url.as_str(), c.amqp.is_none()),
            ("notes.db", true)
        );
    }

    #[test]
    fn with_an_amqp_url_the_broker_is_configured_as_sagaflow_engine_is() {
        let url = "amqp://guest:secret@127.0.0.1:5672/%2f";
        let c = config(&[("SAGAFLOW_AMQP_URL", url)]).unwrap();
        let amqp = c.amqp.as_ref().unwrap();
        let defaults = AmqpConfig::new(url);
        assert_eq!(
            (amqp.prefix.as_str(), amqp.partitions, amqp.queue_type),
            (
                defaults.prefix.as_str(),
                defaults.partitions,
                defaults.queue_type
            )
        );
        assert!(amqp.connection_name.starts_with("notes worker"));
        assert!(
            amqp.join_declared_partitions,
            "no count asked for: the deployment's"
        );
        let c = config(&[
            ("SAGAFLOW_AMQP_URL", url),
            ("SAGAFLOW_DATABASE_URL", "postgres://app:hunter2@db/notes"),
            ("SAGAFLOW_PREFIX", "prod"),
            ("SAGAFLOW_PARTITIONS", "16"),
            ("SAGAFLOW_QUEUE_TYPE", "quorum"),
            ("SAGAFLOW_PREFETCH", "32"),
            ("SAGAFLOW_BUNDLE", "1"),
            ("SAGAFLOW_DELIVERY_LIMIT", "0"),
        ])
        .unwrap();
        let amqp = c.amqp.as_ref().unwrap();
        assert_eq!(
            (amqp.prefix.as_str(), amqp.partitions, amqp.queue_type),
            ("prod", 16, QueueType::Quorum)
        );
        assert!(
            !amqp.join_declared_partitions,
            "16 asked for: 16 or refused"
        );
        assert_eq!(
            (amqp.prefetch, amqp.bundle, amqp.delivery_limit),
            (32, 1, 0)
        );
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("secret") && !shown.contains("hunter2"),
            "{shown}"
        );
    }

    #[test]
    fn a_bad_value_is_an_error_naming_the_variable_and_the_value() {
        for bad in ["eight", "0", "-1", "65536", "8.5"] {
            for amqp in ["", "amqp://127.0.0.1"] {
                let vars = [("SAGAFLOW_AMQP_URL", amqp), ("SAGAFLOW_PARTITIONS", bad)];
                let e = config(&vars).unwrap_err().to_string();
                assert!(
                    e.starts_with(&format!("SAGAFLOW_PARTITIONS=`{bad}`: "))
                        && e.contains("1 to 65535"),
                    "{e}"
                );
            }
        }
        for (var, bad) in [
            ("SAGAFLOW_PREFETCH", "0"),
            ("SAGAFLOW_BUNDLE", "many"),
            ("SAGAFLOW_DELIVERY_LIMIT", "-3"),
        ] {
            let e = config(&[(var, bad)]).unwrap_err().to_string();
            assert!(e.starts_with(&format!("{var}=`{bad}`: ")), "{e}");
        }
        let e = config(&[("SAGAFLOW_QUEUE_TYPE", "mirrored")]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "SAGAFLOW_QUEUE_TYPE=`mirrored`: unknown queue type `mirrored` (expected `classic` or `quorum`)"
        );
        let e = Config::from_vars("notes", |var| {
            Err(ServiceError::Env {
                var,
                value: "\u{fffd}".into(),
                why: "not valid UTF-8".into(),
            })
        });
        assert!(e.unwrap_err().to_string().contains("not valid UTF-8"));
    }

    /// `note`: one row per saga in the service's own table.
    struct Note;

    #[async_trait]
    impl SagaStep for Note {
        async fn action(
            &self,
            c: &mut sqlx::AnyConnection,
            ctx: &StepContext,
            p: &Value,
        ) -> Result<Value, StepError> {
            sqlx::query("INSERT INTO notes (saga_id, text) VALUES ($1, $2)")
                .bind(&ctx.saga_id)
                .bind(param_str(p, "text")?)
                .execute(c)
                .await?;
            Ok(json!({}))
        }
        async fn compensate(
            &self,
            c: &mut sqlx::AnyConnection,
            ctx: &StepContext,
            _: &Value,
        ) -> Result<Value, StepError> {
            sqlx::query("DELETE FROM notes WHERE saga_id = $1")
                .bind(&ctx.saga_id)
                .execute(c)
                .await?;
            Ok(json!({}))
        }
    }

    const SAGA: &str = "name: note
version: 1
sequence_key: ${input.id}
input: { id: string, text: string }
steps:
  - id: note
    service: notes
    action: note
    compensation: unnote
    params: { text: \"${input.text}\" }
";
    const TABLE: &str = "CREATE TABLE notes (saga_id TEXT PRIMARY KEY, text TEXT NOT NULL)";
    const NOTES: Service = Service {
        name: "notes",
        sagas: &[SAGA],
        migrations: &[("notes_0001", TABLE, TABLE)],
        handlers: |w| w.saga_step("note", Note),
    };

    /// A directory of its own, removed also when the test fails.
    struct Dir(std::path::PathBuf);

    impl Dir {
        fn new(test: &str) -> Dir {
            let name = format!(
                "sagaflow-{test}-{}-{}",
                std::process::id(),
                fastrand::u32(..)
            );
            let dir = std::env::temp_dir().join(name);
            std::fs::create_dir_all(&dir).expect("temp dir");
            Dir(dir)
        }
        fn db(&self) -> String {
            self.0.join("notes.db").display().to_string()
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Embedded, end to end on SQLite: the service's tables and saga are set up by `run`, a
    /// saga started in its database (as `sagaflow start --db` does) runs through its worker,
    /// and a stop ends `run` cleanly.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn embedded_it_runs_sagas_started_in_its_database_until_stopped() {
        let dir = Dir::new("service-embedded");
        let config = Config {
            database_url: dir.db(),
            amqp: None,
        };
        let (stop, stopped) = watch::channel(false);
        let running = tokio::spawn(async move { run(&NOTES, config, stopped).await });

        let store = Store::connect(&dir.db(), 1).await.expect("open");
        // A driver without loops, as `sagaflow start --db` is: it only writes the start.
        let engine = Engine::new(store.clone(), Arc::new(MemoryTransport::default()));
        let start = Instant::now();
        let saga = loop {
            // Until `run` has migrated and registered the saga.
            if let Ok(saga) = engine.definition_by_name("note").await {
                break saga;
            }
            assert!(start.elapsed() < Duration::from_secs(30), "not set up");
            assert!(!running.is_finished(), "run ended early");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let input = json!({"id": "n-1", "text": "hello"});
        let id = engine.start(&saga, input, None).await.expect("start").id;
        loop {
            let state = store.saga_state(&id).await.expect("read").expect("saga");
            if state.status.is_final() {
                assert_eq!(state.status, SagaStatus::Completed);
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{:?}",
                state.status
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let text: String = sqlx::query_scalar("SELECT text FROM notes WHERE saga_id = $1")
            .bind(&id)
            .fetch_one(store.pool())
            .await
            .expect("the worker's row");
        assert_eq!(text, "hello");
        store.pool().close().await;

        let _ = stop.send(true);
        let ended = tokio::time::timeout(Duration::from_secs(30), running).await;
        ended
            .expect("run stops")
            .expect("no panic")
            .expect("a clean stop");
    }

    /// A broker that does not answer is waited for (as `sagaflow worker` waits), and a stop
    /// during the wait ends the run cleanly; what no waiting cures is an error saying what it
    /// was doing.
    #[tokio::test]
    async fn what_cannot_start_is_waited_for_or_a_clear_error() {
        let dir = Dir::new("service-errors");
        let (stop, stopped) = watch::channel(false);
        let nobody = "amqp://guest:hunter2@127.0.0.1:1/%2f"; // nothing listens on port 1
        let config = config(&[
            ("SAGAFLOW_AMQP_URL", nobody),
            ("SAGAFLOW_DATABASE_URL", &dir.db()),
        ])
        .unwrap();
        let waiting = tokio::spawn(async move { run(&NOTES, config, stopped).await });
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert!(!waiting.is_finished(), "it waits for the broker");
        let _ = stop.send(true);
        let ended = tokio::time::timeout(Duration::from_secs(20), waiting).await;
        ended
            .expect("a stop ends the wait")
            .expect("no panic")
            .expect("a stop while waiting is a clean end");

        let (_stop, stopped) = watch::channel(false);
        let broken = Service {
            sagas: &["name: note\nsteps: [nonsense"],
            ..NOTES
        };
        let embedded = Config {
            database_url: dir.db(),
            amqp: None,
        };
        let e = run(&broken, embedded, stopped.clone()).await.unwrap_err();
        assert!(
            e.to_string().starts_with("registering saga 1 of notes: "),
            "{e}"
        );

        let nowhere = Config {
            database_url: "mysql://db/notes".into(),
            amqp: None,
        };
        let e = run(&NOTES, nowhere, stopped.clone()).await.unwrap_err();
        assert!(e.to_string().starts_with("opening and migrating "), "{e}");

        // A SQLite file that cannot be opened is not waited for.
        let missing_dir = Config {
            database_url: format!("sqlite://{}/no/such/dir/notes.db", dir.0.display()),
            amqp: None,
        };
        let e = tokio::time::timeout(Duration::from_secs(20), run(&NOTES, missing_dir, stopped))
            .await
            .expect("not waited for")
            .unwrap_err();
        assert!(e.to_string().starts_with("opening and migrating "), "{e}");
    }
}

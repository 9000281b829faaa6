//! What a batch costs in statements, counted from sqlx's own statement log (target
//! `sqlx::query`: an event per query run through its executor), on SQLite and PostgreSQL: the
//! barrier's statements per batch are fixed (one lookup, one insert), whatever the batch size.
//! The totals undercount transaction control (sqlx sends `BEGIN` and `SAVEPOINT`, and on
//! SQLite also `RELEASE` and `COMMIT`, without an event); the barrier count is exact.
//!
//! One test in its own binary, because the counting subscriber is process-wide.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

mod support;

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use sagaflow_engine::machine::{Op, Outcome};
use sagaflow_engine::store::{ENGINE_MIGRATIONS, Store};
use sagaflow_workers::barrier::{Handler, Job, execute_batch};
use sagaflow_workers::sdk::{SagaStep, StepContext, StepError};
use sagaflow_workers::services;
use serde_json::{Value, json};
use sqlx::AnyConnection;
use tracing_subscriber::layer::SubscriberExt as _;

static STATEMENTS: AtomicU64 = AtomicU64::new(0);
static BARRIER_STATEMENTS: AtomicU64 = AtomicU64::new(0);

/// Counts sqlx's statement events, and those that name the barrier table.
struct CountStatements;

struct Text(String);

impl tracing::field::Visit for Text {
    fn record_debug(&mut self, _: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        let _ = write!(self.0, "{value:?} ");
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for CountStatements {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if event.metadata().target() != "sqlx::query" {
            return;
        }
        let mut text = Text(String::new());
        event.record(&mut text);
        STATEMENTS.fetch_add(1, Ordering::SeqCst);
        if text.0.contains("barrier") {
            BARRIER_STATEMENTS.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// Writes one row per call into the handler's own table.
struct Insert;

#[async_trait::async_trait]
impl SagaStep for Insert {
    async fn action(
        &self,
        conn: &mut AnyConnection,
        ctx: &StepContext,
        _: &Value,
    ) -> Result<Value, StepError> {
        sqlx::query("INSERT INTO effects (saga_id) VALUES ($1)")
            .bind(&ctx.saga_id)
            .execute(&mut *conn)
            .await?;
        Ok(Value::Null)
    }
    async fn compensate(
        &self,
        _: &mut AnyConnection,
        _: &StepContext,
        _: &Value,
    ) -> Result<Value, StepError> {
        Ok(Value::Null)
    }
}

fn ctx(saga: String) -> StepContext {
    StepContext {
        saga_id: saga,
        step: "insert".into(),
        operation: "insert".into(),
        attempt: 1,
        key: "k".into(),
    }
}

/// (all statements, barrier statements) one batch of these sagas' actions ran.
async fn measure(store: &Store, sagas: &[String]) -> (u64, u64) {
    let handler = Handler::Saga(Arc::new(Insert));
    let params = json!({});
    let ctxs: Vec<StepContext> = sagas.iter().cloned().map(ctx).collect();
    let jobs: Vec<Job> = ctxs
        .iter()
        .map(|ctx| Job {
            handler: &handler,
            op: Op::Action,
            ctx,
            params: &params,
            barrier: true,
        })
        .collect();
    let (s0, b0) = (
        STATEMENTS.load(Ordering::SeqCst),
        BARRIER_STATEMENTS.load(Ordering::SeqCst),
    );
    let run = execute_batch(store.pool(), &jobs).await;
    assert_eq!(run.commits, 1);
    for r in &run.results {
        assert!(
            matches!(r.as_ref().unwrap().outcome, Outcome::Ok { .. }),
            "{r:?}"
        );
    }
    (
        STATEMENTS.load(Ordering::SeqCst) - s0,
        BARRIER_STATEMENTS.load(Ordering::SeqCst) - b0,
    )
}

async fn check(backend: support::Backend) {
    let Some(db) = support::fresh_db(backend, "batch_statements").await else {
        return;
    };
    let store = Store::connect(&db.url, 2).await.expect("connect");
    store
        .migrate(&[ENGINE_MIGRATIONS, services::MIGRATIONS])
        .await
        .expect("migrate");
    sqlx::query("CREATE TABLE effects (saga_id TEXT NOT NULL)")
        .execute(store.pool())
        .await
        .unwrap();
    let names = |prefix: &str, n: usize| -> Vec<String> {
        (0..n).map(|i| format!("{prefix}-{i}")).collect()
    };
    let one = measure(&store, &names("one", 1)).await;
    let twenty = measure(&store, &names("twenty", 20)).await;
    let duplicates = measure(&store, &names("twenty", 20)).await;
    eprintln!(
        "{backend:?}: (statements, barrier statements) for 1 command {one:?}, 20 commands \
         {twenty:?}, 20 duplicates {duplicates:?}"
    );
    assert_eq!(one.1, 2, "one lookup and one insert");
    assert_eq!(twenty.1, 2, "the same for a batch of 20");
    assert_eq!(
        duplicates.1, 1,
        "duplicates only: the lookup, nothing to insert"
    );
    // The rest grows by what each handler does (one insert) and one savepoint round trip
    // (`RELEASE SAVEPOINT sf; SAVEPOINT sf` in one message), not more.
    assert_eq!(twenty.0 - one.0, 19 * 2, "{one:?} {twenty:?}");
    let effects: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM effects")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(effects, 21);
    store.pool().close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn barrier_statements_per_batch_are_fixed() {
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(CountStatements))
        .expect("the only subscriber of this test binary");
    check(support::Backend::Sqlite).await;
    check(support::Backend::Postgres).await;
}

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
use sagaflow_workers::barrier::{
    CAUTIOUS_BATCHES, CAUTIOUS_CHUNK, Handler, Job, Optimism, execute_batch_with,
};
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
async fn measure(store: &Store, sagas: &[String], optimism: &Optimism) -> (u64, u64) {
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
    let run = execute_batch_with(store.pool(), &jobs, optimism).await;
    assert_eq!(run.abandoned, 0, "every handler succeeds");
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
    let optimistic = Optimism::default();
    let savepoints = Optimism::never();
    let one = measure(&store, &names("one", 1), &optimistic).await;
    let two = measure(&store, &names("two", 2), &optimistic).await;
    let twenty = measure(&store, &names("twenty", 20), &optimistic).await;
    let duplicates = measure(&store, &names("twenty", 20), &optimistic).await;
    let two_sp = measure(&store, &names("two-sp", 2), &savepoints).await;
    let twenty_sp = measure(&store, &names("twenty-sp", 20), &savepoints).await;
    eprintln!(
        "{backend:?}: (statements, barrier statements) for 1 command {one:?}, 2 {two:?}, \
         20 {twenty:?}, 20 duplicates {duplicates:?}; with savepoints: 2 {two_sp:?}, 20 \
         {twenty_sp:?}"
    );
    assert_eq!(one.1, 2, "one lookup and one insert");
    assert_eq!(twenty.1, 2, "the same for a batch of 20");
    assert_eq!(twenty_sp.1, 2, "and with savepoints");
    assert_eq!(
        duplicates.1, 1,
        "duplicates only: the lookup, nothing to insert"
    );
    // The rest grows by what each handler does (one insert), and with savepoints by one
    // round trip more per handler (`RELEASE SAVEPOINT sf; SAVEPOINT sf` in one message).
    assert_eq!(twenty.0 - two.0, 18, "optimistic: {two:?} {twenty:?}");
    // A lone command (a quiet lane's batch) is tried without its savepoint too: one handler
    // statement less than a batch of two, not two savepoint round trips more.
    assert_eq!(two.0 - one.0, 1, "one {one:?}, two {two:?}");

    assert_eq!(
        twenty_sp.0 - two_sp.0,
        18 * 2,
        "savepoints: {two_sp:?} {twenty_sp:?}"
    );
    // Chunked savepoints (what cautious batches take): one round trip per CAUTIOUS_CHUNK
    // handlers instead of one per handler.
    let twenty_chunked = measure(&store, &names("twenty-chunked", 20), &Optimism::chunked()).await;
    assert_eq!(twenty_chunked.1, 2, "the barrier's two");
    assert_eq!(
        twenty_sp.0 - twenty_chunked.0,
        (20 - 20 / CAUTIOUS_CHUNK) as u64,
        "per handler {twenty_sp:?}, chunked {twenty_chunked:?}"
    );
    // A batch whose handler fails gives its optimistic try up, and the next CAUTIOUS_BATCHES
    // batches go straight to chunked savepoints: they cost what a chunked batch costs.
    let refuse = Handler::Refuse {
        code: "no".into(),
        message: "refused".into(),
    };
    let insert = Handler::Saga(Arc::new(Insert));
    let (ctx_a, ctx_b) = (ctx("mixed-a".into()), ctx("mixed-b".into()));
    let params = json!({});
    let mixed = [
        Job {
            handler: &insert,
            op: Op::Action,
            ctx: &ctx_a,
            params: &params,
            barrier: true,
        },
        Job {
            handler: &refuse,
            op: Op::Action,
            ctx: &ctx_b,
            params: &params,
            barrier: true,
        },
    ];
    let run = execute_batch_with(store.pool(), &mixed, &optimistic).await;
    assert_eq!(run.abandoned, 1, "{run:?}");
    assert!(matches!(
        run.results[0].as_ref().unwrap().outcome,
        Outcome::Ok { .. }
    ));
    assert!(matches!(
        run.results[1].as_ref().unwrap().outcome,
        Outcome::Business { .. }
    ));
    for i in 0..CAUTIOUS_BATCHES {
        let cautious = measure(&store, &names(&format!("cautious-{i}"), 20), &optimistic).await;
        assert_eq!(
            cautious, twenty_chunked,
            "batch {i} after the failure uses savepoints"
        );
    }
    let bold = measure(&store, &names("bold", 20), &optimistic).await;
    assert_eq!(bold, twenty, "then optimistic again");
    let effects: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM effects")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(
        effects,
        1 + 2 + 20 + 2 + 20 + 20 + 1 + 20 * (CAUTIOUS_BATCHES as i64 + 1)
    );
    store.pool().close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn barrier_statements_per_batch_are_fixed() {
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(CountStatements))
        .expect("the only subscriber of this test binary");
    check(support::Backend::Sqlite).await;
    check(support::Backend::Postgres).await;
}

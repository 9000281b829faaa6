//! PostgreSQL keeps a prepared statement's generic plan for the life of the connection, and a
//! plan made while a table was still small (a fresh deployment, the first seconds of a run, a
//! queue that is mostly empty) can be a sequential scan that the table then outgrows:
//! measured on the bench, 8-50 ms per saga update and per barrier lookup at 50,000 rows
//! instead of 0.1 ms, 2.5 ms per relay delete. So a worker's store keeps nothing of its own
//! prepared (PostgreSQL plans those statements with the tables' current sizes), and an engine's
//! store (`Store::connect_engine`), whose look-ups are kept prepared, plans every statement
//! afresh (`plan_cache_mode = force_custom_plan`). These tests run the statements on small
//! tables first, fill the tables, run them again and count the sequential scans PostgreSQL made
//! (`pg_stat_user_tables`); a control shows that a statement kept prepared with the default
//! does fall into the trap, and the engine store's cases fail without the setting.

mod support;

use sagaflow_engine::machine::Op;
use sagaflow_engine::store::{ENGINE_MIGRATIONS, SagaTable, Store};
use sagaflow_workers::barrier::{self, Handler, Job};
use sagaflow_workers::sdk::StepContext;
use sagaflow_workers::services;
use serde_json::json;
use sqlx::{AssertSqlSafe, Connection};

/// Sequential scans of `table` so far, once every backend's counts have reached the shared
/// statistics: each of the store's connections (both at once, so the pool hands out both) is
/// told to flush its counts, since an idle backend reports only every 10 s; then read until two
/// reads a second and more apart agree.
async fn seq_scans(store: &Store, table: &str) -> i64 {
    let read = || async {
        let mut a = store.pool().acquire().await.expect("connection");
        let mut b = store.pool().acquire().await.expect("connection");
        for conn in [&mut a, &mut b] {
            sqlx::raw_sql("SELECT pg_stat_force_next_flush()")
                .execute(&mut **conn)
                .await
                .expect("flush");
        }
        drop(b);
        sqlx::query_scalar::<_, i64>("SELECT seq_scan FROM pg_stat_user_tables WHERE relname = $1")
            .bind(table)
            .fetch_one(&mut *a)
            .await
            .expect("seq_scan")
    };
    let mut last = read().await;
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
        let now = read().await;
        if now == last {
            return now;
        }
        last = now;
    }
}

/// A store on ONE connection, so every statement below runs on the same connection (and its
/// cached plans, if any); `engine`: [`Store::connect_engine`], whose look-ups are kept
/// prepared (and planned afresh at every run).
async fn postgres_store(test: &str, engine: bool) -> Option<(Store, support::TestDb)> {
    let db = support::fresh_db(support::Backend::Postgres, test).await?;
    let store = if engine {
        Store::connect_engine(&db.url, 1).await
    } else {
        Store::connect(&db.url, 1).await
    }
    .expect("connect");
    store
        .migrate(&[ENGINE_MIGRATIONS, services::MIGRATIONS])
        .await
        .expect("migrate");
    Some((store, db))
}

async fn fill(store: &Store, statements: &str) {
    sqlx::raw_sql(AssertSqlSafe(statements.to_owned()))
        .execute(store.pool())
        .await
        .expect("fill");
}

const FILL_SAGAS: &str = "INSERT INTO saga_definitions (hash, name, version, source, created_at) \
    VALUES ('h', 'd', 1, '', 0); \
    INSERT INTO sagas (id, name, definition_hash, sequence_key, status, state, version, created_at, updated_at) \
    SELECT 'saga-' || g, 'd', 'h', 'k' || g, 'running', '{}', 0, g, g FROM generate_series(1, 20000) g; \
    ANALYZE saga_definitions";

#[tokio::test]
async fn saga_loads_read_by_index_after_the_table_grew_and_a_prepared_one_would_not() {
    saga_loads_read_by_index(false).await;
}

#[tokio::test]
async fn an_engine_stores_kept_look_ups_read_by_index_after_the_table_grew() {
    saga_loads_read_by_index(true).await;
}

/// The outbox is a queue, mostly empty: the relay's delete of confirmed rows, kept prepared by
/// an engine's store, must not keep a plan made on the empty table (measured: 2.5 ms a delete
/// when it did, a sequential scan of the rows deleted since the last vacuum).
#[tokio::test]
async fn an_engine_stores_relay_deletes_by_index_after_the_outbox_grew() {
    let Some((store, _db)) = postgres_store("plan_outbox", true).await else {
        return;
    };
    // A page of rows, as a relay that keeps up leaves: PostgreSQL plans an empty table as if
    // it had ten pages, and one page as the one page it is, where scanning it all is cheapest.
    fill(
        &store,
        "INSERT INTO outbox (message_id, destination, routing_key, payload, created_at) \
         SELECT 'early-' || g, 'cmd.x', 'k', 'p', 0 FROM generate_series(1, 5) g",
    )
    .await;
    let ids: Vec<String> = (0..4).map(|i| format!("absent-{i}")).collect();
    for _ in 0..7 {
        store.delete_sent(&ids).await.expect("delete");
    }
    fill(
        &store,
        "INSERT INTO outbox (message_id, destination, routing_key, payload, created_at) \
         SELECT 'm-' || g, 'cmd.x', 'k', repeat('x', 500), 0 FROM generate_series(1, 20000) g",
    )
    .await;
    // The relay's connection is not one the counting can tell to flush its counts: it does so
    // at the end of a transaction a second after its last flush. So one delete more, a second
    // on, flushes the first ones' (and is itself counted in `before`).
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    store.delete_sent(&ids).await.expect("delete");
    let before = seq_scans(&store, "outbox").await;
    // Three more a second apart: the first two are counted by the time the third has run.
    for _ in 0..3 {
        tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
        store.delete_sent(&ids).await.expect("delete");
    }
    assert!(
        seq_scans(&store, "outbox").await <= before + 1,
        "the relay's deletes read the outbox by index (a plan kept from the one-page outbox \
         scans it whole: at least 2 more)"
    );
    store.pool().close().await;
}

async fn saga_loads_read_by_index(engine: bool) {
    let test = if engine { "plan_sagas_e" } else { "plan_sagas" };
    let Some((store, db)) = postgres_store(test, engine).await else {
        return;
    };
    // A page of sagas first (an empty table is planned as if it had ten pages, one page as
    // the one page it is, where a kept generic plan would scan it whole).
    fill(
        &store,
        "INSERT INTO saga_definitions (hash, name, version, source, created_at) \
         VALUES ('h0', 'd', 1, '', 0); \
         INSERT INTO sagas (id, name, definition_hash, sequence_key, status, state, version, created_at, updated_at) \
         SELECT 'early-' || g, 'd', 'h0', 'e' || g, 'running', '{}', 0, g, g FROM generate_series(1, 3) g",
    )
    .await;
    // Ids the table does not hold (its filler rows' states are not sagas): what matters is
    // how PostgreSQL looks for them.
    let ids = vec!["absent-7".to_owned(), "absent-9".to_owned()];
    // The control: the store's earlier text (ids as one JSON parameter, which PostgreSQL's
    // generic plan cannot size), kept prepared on the empty table, then used on the full one.
    let mut kept = sqlx::AnyConnection::connect(&db.url)
        .await
        .expect("connect");
    sqlx::raw_sql(AssertSqlSafe(format!(
        "PREPARE kept(text) AS {}",
        "SELECT id, state, version FROM sagas \
         WHERE id = ANY(ARRAY(SELECT json_array_elements_text($1::json)))"
    )))
    .execute(&mut kept)
    .await
    .expect("prepare");
    for _ in 0..7 {
        sqlx::raw_sql("EXECUTE kept('[\"saga-7\"]')")
            .execute(&mut kept)
            .await
            .expect("execute");
    }
    sqlx::raw_sql("SELECT pg_stat_force_next_flush()")
        .execute(&mut kept)
        .await
        .expect("flush");
    // Seven loads on each of the store's connections (two transactions at once).
    for _ in 0..7 {
        let mut a = store.begin().await.expect("begin");
        let mut b = store.begin().await.expect("begin");
        assert!(a.load_sagas(&ids).await.expect("load").is_empty());
        assert!(b.load_sagas(&ids).await.expect("load").is_empty());
        a.rollback().await.expect("rollback");
        b.rollback().await.expect("rollback");
    }
    fill(&store, FILL_SAGAS).await;

    let before = seq_scans(&store, "sagas").await;
    let mut tx = store.begin().await.expect("begin");
    assert!(tx.load_sagas(&ids).await.expect("load").is_empty());
    tx.rollback().await.expect("rollback");
    assert_eq!(
        seq_scans(&store, "sagas").await,
        before,
        "the store's load read the sagas by index"
    );

    sqlx::raw_sql("EXECUTE kept('[\"saga-7\"]'); SELECT pg_stat_force_next_flush()")
        .execute(&mut kept)
        .await
        .expect("execute");
    assert_eq!(
        seq_scans(&store, "sagas").await,
        before + 1,
        "control: the statement kept prepared since the table was empty scans it whole"
    );
    let _ = kept.close().await;
    store.pool().close().await;
}

#[tokio::test]
async fn barrier_lookups_read_by_index_after_the_table_grew() {
    let Some((store, _db)) = postgres_store("plan_barrier", false).await else {
        return;
    };
    let refuse = Handler::Refuse {
        code: "no".into(),
        message: "refused".into(),
    };
    let params = json!({});
    // A batch of 20 commands of as many sagas: a generic plan, costed for keys it does not
    // know, then looks cheaper than the plans made for the batch's own keys, and a kept
    // statement would switch to it (with one command, it did not).
    let run = |saga: String| {
        let (store, refuse, params) = (&store, &refuse, &params);
        async move {
            let contexts: Vec<StepContext> = (0..20)
                .map(|i| StepContext {
                    saga_id: format!("{saga}-{i}"),
                    step: "payment".into(),
                    operation: "charge".into(),
                    attempt: 1,
                    key: format!("k{i}"),
                })
                .collect();
            let jobs: Vec<Job<'_>> = contexts
                .iter()
                .map(|ctx| Job {
                    handler: refuse,
                    op: Op::Action,
                    ctx,
                    params,
                    barrier: true,
                })
                .collect();
            let run = barrier::execute_batch(store.pool(), &jobs).await;
            assert_eq!(run.commits, 1, "{run:?}");
        }
    };
    // A few hundred rows first, as the bench's first half second leaves them: a table of a few
    // pages, which PostgreSQL plans as what it is (an empty one it never analyzed, as ten
    // pages), so a generic plan kept from now on is a sequential scan. Then seven batches on
    // each of the store's connections (two at once), more than PostgreSQL runs before it
    // considers keeping a generic plan.
    fill(
        &store,
        "INSERT INTO barrier (saga_id, step, op, outcome, created_at) \
         SELECT 'first-' || g, 'payment', 'action', '{}', g FROM generate_series(1, 400) g",
    )
    .await;
    for i in 0..7 {
        futures::join!(run(format!("small-a{i}")), run(format!("small-b{i}")));
    }
    fill(
        &store,
        "INSERT INTO barrier (saga_id, step, op, outcome, created_at) \
         SELECT 'saga-' || g, 'payment', 'action', '{}', g FROM generate_series(1, 20000) g",
    )
    .await;
    let before = seq_scans(&store, "barrier").await;
    run("saga-7".into()).await;
    run("new-saga".into()).await;
    assert_eq!(
        seq_scans(&store, "barrier").await,
        before,
        "the lookups read the barrier by index"
    );
    store.pool().close().await;
}

/// The demo services' one-statement operations read their ledger by primary key on every run
/// (is this (saga, step) done? what did the action record?), and they are kept prepared (a
/// second round trip each otherwise): on a fresh deployment, where the ledger was never
/// analyzed, PostgreSQL plans that read as an index scan, and the plan stays good as the ledger
/// grows. (A ledger analyzed while nearly empty would be planned as a sequential scan until the
/// next analyze, as any prepared statement's; with autovacuum that comes as the table grows.)
#[tokio::test]
async fn service_operations_read_the_ledger_by_index_after_it_grew() {
    let Some((store, _db)) = postgres_store("plan_ledger", false).await else {
        return;
    };
    let mut conn = store.pool().acquire().await.expect("connection");
    services::payment::seed(&mut conn, &[("u1".into(), 1_000_000_000)])
        .await
        .expect("seed");
    drop(conn);
    let charge = Handler::Saga(std::sync::Arc::new(services::payment::Charge));
    let params = json!({ "account": "u1", "amount": "1", "order_id": "o" });
    let run = |saga: String, op: Op| {
        let (store, charge, params) = (&store, &charge, &params);
        async move {
            let ctx = StepContext {
                saga_id: saga,
                step: "payment".into(),
                operation: "charge".into(),
                attempt: 1,
                key: "k".into(),
            };
            let job = Job {
                handler: charge,
                op,
                ctx: &ctx,
                params,
                barrier: true,
            };
            let run = barrier::execute_batch(store.pool(), &[job]).await;
            assert_eq!(run.commits, 1, "{run:?}");
            let done = run.results[0].as_ref().expect("ran");
            assert!(
                matches!(done.outcome, sagaflow_engine::machine::Outcome::Ok { .. }),
                "{done:?}"
            );
        }
    };
    // Seven charges and their reversals on each of the store's connections (two at once).
    for i in 0..7 {
        futures::join!(
            run(format!("empty-a{i}"), Op::Action),
            run(format!("empty-b{i}"), Op::Action)
        );
        futures::join!(
            run(format!("empty-a{i}"), Op::Compensate),
            run(format!("empty-b{i}"), Op::Compensate)
        );
    }
    fill(
        &store,
        "INSERT INTO payment_ledger (saga_id, step, kind, account, order_id, amount) \
         SELECT 'saga-' || g, 'payment', 'charge', 'u1', 'o', 1 FROM generate_series(1, 20000) g",
    )
    .await;
    let before = seq_scans(&store, "payment_ledger").await;
    run("new-saga".into(), Op::Action).await;
    run("new-saga".into(), Op::Compensate).await;
    run("saga-7".into(), Op::Compensate).await;
    assert_eq!(
        seq_scans(&store, "payment_ledger").await,
        before,
        "the operations read the ledger by index"
    );
    store.pool().close().await;
}

//! The store's conformance suite: every case runs against SQLite (a temp file) and the real
//! PostgreSQL (a fresh database per test, dropped at the end even when the test fails), so the
//! two dialects' statement texts in `engine/src/store/sql.rs` are held to one behaviour.
//!
//! Each case is an `async fn(Store)`; [`conformance!`] turns it into `sqlite::<case>` and
//! `postgres::<case>`. PostgreSQL comes from `SAGAFLOW_TEST_DATABASE_URL` (default: the local
//! server, trust auth). Without it a case is skipped with a message, except under `CI=true`,
//! where a missing server is a failure.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;

use sagaflow_engine::EngineError;
use sagaflow_engine::machine::TimerKind;
use sagaflow_engine::machine::{Event, HistoryEntry, Op, SagaState, SagaStatus, StepStatus};
use sagaflow_engine::status::{self, ListQuery};
use sagaflow_engine::store::outbox::{Claimed, HANDOFF_GRACE_MS};
use sagaflow_engine::store::{
    Changes, DefinitionTable, ENGINE_MIGRATIONS, HistoryRow, HistoryTable, NewSaga, OutboxMessage,
    OutboxTable, PurgeReport, SagaCounts, SagaFilter, SagaQueries, SagaTable, SagaWrite,
    SequenceKeyTable, Store, StoreError, StoreTx, TimelineRow, TimerRow, TimerTable,
};
use serde_json::json;
use sqlx::Row;

/// A fixed clock: the cases pass `now` explicitly.
const NOW: i64 = 1_700_000_000_000;
const HASH: &str = "hash-order-v1";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Sqlite,
    Postgres,
    /// PostgreSQL opened as an engine opens it (`Store::connect_engine`): look-ups and the write
    /// kept prepared, every run planned afresh.
    PostgresEngine,
}

/// What a test's database leaves behind: a temp directory, or a PostgreSQL database. Dropped
/// when the test ends, also while unwinding from a failed assertion.
enum Guard {
    Dir(std::path::PathBuf),
    Database { admin: String, name: String },
}

impl Drop for Guard {
    fn drop(&mut self) {
        match self {
            Guard::Dir(dir) => {
                let _ = std::fs::remove_dir_all(dir);
            }
            Guard::Database { admin, name } => {
                let (admin, name) = (admin.clone(), name.clone());
                // Drop cannot await, and the test's runtime may be unwinding: a blocking client
                // on a thread (and runtime) of its own. FORCE ends the pool's connections.
                let dropped = std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map_err(|e| e.to_string())?;
                    rt.block_on(async {
                        let mut c = <sqlx::AnyConnection as sqlx::Connection>::connect(&admin)
                            .await
                            .map_err(|e| e.to_string())?;
                        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                        )))
                        .execute(&mut c)
                        .await
                        .map_err(|e| e.to_string())?;
                        Ok::<(), String>(())
                    })
                })
                .join();
                match dropped {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => eprintln!("could not drop test database: {e}"),
                    Err(_) => {
                        eprintln!("could not drop test database: the dropping thread panicked")
                    }
                }
            }
        }
    }
}

/// A migrated store on a fresh database, or None when PostgreSQL is absent (outside CI).
async fn fresh(backend: Backend, test: &str) -> Option<(Store, Guard)> {
    let tag = format!("{:08x}", fastrand::u32(..));
    match backend {
        Backend::Sqlite => {
            let dir = std::env::temp_dir()
                .join(format!("sagaflow-conf-{test}-{}-{tag}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("temp dir");
            let guard = Guard::Dir(dir.clone());
            let url = format!("sqlite://{}?mode=rwc", dir.join("test.db").display());
            let store = Store::connect(&url, 1).await.expect("open SQLite");
            store.migrate(&[ENGINE_MIGRATIONS]).await.expect("migrate");
            Some((store, guard))
        }
        Backend::Postgres | Backend::PostgresEngine => {
            sqlx::any::install_default_drivers();
            let admin = std::env::var("SAGAFLOW_TEST_DATABASE_URL")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
            let mut conn = match <sqlx::AnyConnection as sqlx::Connection>::connect(&admin).await {
                Ok(c) => c,
                Err(e) if std::env::var("CI").as_deref() != Ok("true") => {
                    eprintln!("skipping {test} on PostgreSQL: {admin} is unreachable: {e}");
                    return None;
                }
                Err(e) => panic!("PostgreSQL at {admin} is unreachable (CI=true): {e}"),
            };
            let name = format!("sagaflow_conf_{test}_{tag}");
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                .execute(&mut conn)
                .await
                .expect("create test database");
            let _ = sqlx::Connection::close(conn).await;
            // From here on the database is dropped whatever happens.
            let guard = Guard::Database {
                admin: admin.clone(),
                name: name.clone(),
            };
            let base = admin.split('?').next().unwrap_or(&admin);
            let server = base.rsplit_once('/').map_or(base, |(s, _)| s);
            let url = format!("{server}/{name}");
            let store = if backend == Backend::PostgresEngine {
                Store::connect_engine(&url, 2).await
            } else {
                Store::connect(&url, 2).await
            }
            .expect("open PostgreSQL");
            store.migrate(&[ENGINE_MIGRATIONS]).await.expect("migrate");
            Some((store, guard))
        }
    }
}

/// Runs one case on one backend.
async fn run<F, Fut>(backend: Backend, test: &str, case: F)
where
    F: FnOnce(Store) -> Fut,
    Fut: Future<Output = ()>,
{
    let Some((store, guard)) = fresh(backend, test).await else {
        return;
    };
    case(store.clone()).await;
    store.close().await;
    drop(guard);
}

/// `Store::close` closes the relay's own connection too (PostgreSQL keeps it apart): nothing of
/// the store stays connected, so nothing holds a backend's counters back.
#[tokio::test]
async fn close_leaves_no_connection_open() {
    let Some((store, guard)) = fresh(Backend::Postgres, "close").await else {
        return;
    };
    let Guard::Database { admin, name } = &guard else {
        panic!("a PostgreSQL store has a database guard");
    };
    // The relay's connection opens with its first claim; the pool's with any statement.
    store.claim_outbox(NOW, 1_000, 10).await.expect("claim");
    store.ping().await.expect("ping");
    let mut c = <sqlx::AnyConnection as sqlx::Connection>::connect(admin)
        .await
        .expect("admin");
    // Client connections only: an autovacuum worker may be on the database too.
    let mut connected = async || -> i64 {
        sqlx::query(
            "SELECT COUNT(*) AS n FROM pg_stat_activity WHERE datname = $1 \
             AND backend_type = 'client backend'",
        )
        .bind(name.as_str())
        .fetch_one(&mut c)
        .await
        .expect("count")
        .try_get("n")
        .expect("n")
    };
    let n = connected().await;
    assert!(n >= 2, "the pool's and the relay's: {n}");
    store.close().await;
    // A backend leaves the list a moment after its client closed the connection.
    let mut n = -1;
    for _ in 0..50 {
        n = connected().await;
        if n == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(n, 0, "connections left open after close");
    let _ = sqlx::Connection::close(c).await;
    drop(guard);
}

/// Each case three times: `sqlite::<case>`, `postgres::<case>` and `postgres_engine::<case>`.
macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $case() {
                    super::run(super::Backend::Sqlite, stringify!($case), super::$case).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $case() {
                    super::run(super::Backend::Postgres, stringify!($case), super::$case).await;
                }
            )*
        }
        mod postgres_engine {
            $(
                #[tokio::test]
                async fn $case() {
                    super::run(super::Backend::PostgresEngine, stringify!($case), super::$case).await;
                }
            )*
        }
    };
}

conformance!(
    empty_batches_are_free_no_ops,
    sagas_round_trip_at_version_zero,
    update_moves_version_by_changes,
    stale_version_conflicts_and_rolls_back,
    one_stale_saga_fails_the_whole_update,
    idempotency_keys_find_and_stay_unique,
    history_keeps_slice_order,
    history_is_one_row_per_saga_per_batch,
    outbox_keeps_order_and_first_copy,
    outbox_claim_leases_rows,
    outbox_sent_rows_are_never_claimed,
    outbox_released_rows_are_claimable_at_once,
    outbox_handed_off_rows_wait_their_grace,
    outbox_claims_split_without_overlap,
    timers_claim_once_cancel_and_order,
    due_timers_are_the_due_ones_and_the_next,
    keys_one_call_first_holds_second_queues,
    keys_held_earlier_queue_the_newcomer,
    keys_release_hands_over_in_arrival_order,
    keys_release_by_waiter_leaves_the_queue,
    keys_release_without_waiters_frees_the_key,
    keys_different_keys_both_hold,
    batches_cost_one_statement_whatever_their_size,
    definitions_are_idempotent_and_latest_is_highest,
    write_changes_writes_every_table_in_order,
    write_changes_with_a_stale_saga_writes_nothing,
    write_changes_keeps_every_character,
    write_changes_larger_than_one_statement_goes_table_by_table,
    read_unknown_saga_is_none_everywhere,
    read_saga_record_header_status_and_timeline,
    read_corrupt_state_is_an_error_naming_the_saga,
    read_list_filters_and_pages,
    read_counts_by_status_and_latencies,
    read_definition_names_migrations_and_ping,
    retention_purges_only_old_cleanly_finished_sagas,
    retention_purges_in_batches_of_rows_and_sagas,
);

// ---------------------------------------------------------------------------------------------
// Helpers

fn state(status: SagaStatus, n: u64) -> SagaState {
    SagaState {
        trace: None,
        tracestate: None,
        status,
        steps: vec![
            StepStatus::Succeeded,
            StepStatus::Active {
                op: Op::Action,
                attempt: 2,
                waiting: true,
            },
            StepStatus::Failed {
                error: "insufficient funds: «ü»".into(),
                business: true,
            },
        ],
        input: json!({"order": n, "amount": 1299, "note": "quote \" and \\ backslash", "tags": ["a", null]}),
        outputs: BTreeMap::from([("pay".to_owned(), json!({"charge": format!("ch-{n}")}))]),
        attempts: vec![1, 2, 1],
        last_errors: vec![
            None,
            Some("timeout".into()),
            Some("insufficient funds".into()),
        ],
        key_released: false,
        retry_base: Vec::new(),
        paused: None,
    }
}

fn saga(id: &str, key: &str, idem: Option<&str>) -> NewSaga {
    NewSaga {
        id: id.to_owned(),
        name: "order".to_owned(),
        definition_hash: HASH.to_owned(),
        sequence_key: key.to_owned(),
        state: state(SagaStatus::Queued, 0),
        idempotency_key: idem.map(str::to_owned),
        version: 0,
    }
}

fn ids(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

fn set(v: &[&str]) -> HashSet<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter()
        .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
        .collect()
}

fn message(id: &str, payload: &str) -> OutboxMessage {
    OutboxMessage {
        message_id: id.to_owned(),
        destination: "payment.commands".to_owned(),
        routing_key: format!("key-{id}"),
        payload: payload.to_owned(),
        handed_off: false,
    }
}

fn timer(id: &str, due_at: i64) -> TimerRow {
    TimerRow {
        id: id.to_owned(),
        saga_id: "s1".to_owned(),
        due_at,
        event: Event::Timer {
            step: 1,
            op: Op::Action,
            attempt: 2,
            kind: TimerKind::Retry,
        },
    }
}

/// The definition the sagas reference (`sagas.definition_hash` is a foreign key), committed.
async fn with_definition(store: &Store) {
    let mut tx = store.begin().await.unwrap();
    tx.put_definition(HASH, "order", 1, "name: order", NOW)
        .await
        .unwrap();
    tx.commit().await.unwrap();
}

/// Inserts sagas in a transaction of their own.
async fn insert(store: &Store, sagas: &[NewSaga]) {
    let mut tx = store.begin().await.unwrap();
    tx.insert_sagas(sagas, NOW).await.unwrap();
    tx.commit().await.unwrap();
}

/// The id of the saga started with idempotency key `key`.
async fn by_idempotency_key(store: &Store, key: &str) -> String {
    let mut tx = store.begin().await.unwrap();
    let keyed = tx.sagas_by_idempotency_key(&ids(&[key])).await.unwrap();
    tx.rollback().await.unwrap();
    keyed[key].id.clone()
}

async fn load(store: &Store, id: &str) -> sagaflow_engine::store::SagaRow {
    let mut tx = store.begin().await.unwrap();
    let mut rows = tx.load_sagas(&ids(&[id])).await.unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(rows.len(), 1, "saga {id} not found");
    rows.remove(0)
}

/// A version-checked write of `id` from version `expected`.
fn write(id: &str, expected: i64, changes: i64, state: SagaState) -> SagaWrite {
    SagaWrite {
        id: id.to_owned(),
        expected_version: expected,
        changes,
        state,
    }
}

async fn update(store: &Store, id: &str, expected: i64, changes: i64, st: SagaState) {
    let mut tx = store.begin().await.unwrap();
    tx.update_sagas(&[write(id, expected, changes, st)], NOW + 1)
        .await
        .unwrap();
    tx.commit().await.unwrap();
}

async fn acquire(store: &Store, requests: &[(&str, &str)]) -> Vec<String> {
    let mut tx = store.begin().await.unwrap();
    let holding = tx.acquire_keys(&pairs(requests)).await.unwrap();
    tx.commit().await.unwrap();
    holding
}

async fn release(store: &Store, released: &[(&str, &str)]) -> Vec<String> {
    let mut tx = store.begin().await.unwrap();
    let next = tx.release_keys(&pairs(released)).await.unwrap();
    tx.commit().await.unwrap();
    next
}

async fn holder(store: &Store, key: &str) -> Option<String> {
    sqlx::query("SELECT holder FROM sequence_keys WHERE seq_key = $1")
        .bind(key)
        .fetch_optional(store.pool())
        .await
        .unwrap()
        .map(|r| r.try_get("holder").unwrap())
}

/// Who waits behind `key`, in queue order.
async fn queue(store: &Store, key: &str) -> Vec<String> {
    sqlx::query("SELECT saga_id FROM sequence_queue WHERE seq_key = $1 ORDER BY position")
        .bind(key)
        .fetch_all(store.pool())
        .await
        .unwrap()
        .iter()
        .map(|r| r.try_get("saga_id").unwrap())
        .collect()
}

/// The message ids of the outbox's rows, in queue order.
async fn queued_messages(store: &Store) -> Vec<String> {
    outbox_ids(store)
        .await
        .into_iter()
        .map(|(_, m, _)| m)
        .collect()
}

async fn outbox_ids(store: &Store) -> Vec<(i64, String, String)> {
    sqlx::query("SELECT id, message_id, payload FROM outbox ORDER BY id")
        .fetch_all(store.pool())
        .await
        .unwrap()
        .iter()
        .map(|r| {
            (
                r.try_get("id").unwrap(),
                r.try_get("message_id").unwrap(),
                r.try_get("payload").unwrap(),
            )
        })
        .collect()
}

async fn enqueue(store: &Store, messages: &[OutboxMessage]) {
    let mut tx = store.begin().await.unwrap();
    tx.enqueue_outbox(messages, NOW).await.unwrap();
    tx.commit().await.unwrap();
}

fn claimed_ids(c: &[Claimed]) -> Vec<String> {
    c.iter().map(|c| c.message.id.clone()).collect()
}

fn assert_unique_violation(e: StoreError) {
    match e {
        StoreError::Db(sqlx::Error::Database(db)) => {
            assert!(db.is_unique_violation(), "not a unique violation: {db}")
        }
        other => panic!("expected a unique violation, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Cases

async fn empty_batches_are_free_no_ops(store: Store) {
    with_definition(&store).await;
    let before = store.counters().statements();
    let mut tx = store.begin().await.unwrap();
    assert!(tx.load_sagas(&[]).await.unwrap().is_empty());
    tx.insert_sagas(&[], NOW).await.unwrap();
    tx.update_sagas(&[], NOW).await.unwrap();
    assert!(tx.sagas_by_idempotency_key(&[]).await.unwrap().is_empty());
    tx.append_history(&[], NOW).await.unwrap();
    tx.enqueue_outbox(&[], NOW).await.unwrap();
    assert!(tx.claim_timers(&[]).await.unwrap().is_empty());
    tx.set_timers(&[]).await.unwrap();
    tx.cancel_timers(&[]).await.unwrap();
    assert!(tx.acquire_keys(&[]).await.unwrap().is_empty());
    assert!(tx.release_keys(&[]).await.unwrap().is_empty());
    tx.commit().await.unwrap();
    store.delete_sent(&[]).await.unwrap();
    store.release_lease(&[]).await.unwrap();
    assert_eq!(
        store.counters().statements(),
        before,
        "an empty batch sent a statement"
    );
    // And nothing was written.
    for table in [
        "sagas",
        "saga_history",
        "outbox",
        "timers",
        "sequence_keys",
        "sequence_queue",
    ] {
        let n: i64 = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT COUNT(*) AS n FROM {table}"
        )))
        .fetch_one(store.pool())
        .await
        .unwrap()
        .try_get("n")
        .unwrap();
        assert_eq!(n, 0, "{table} has rows");
    }
}

async fn sagas_round_trip_at_version_zero(store: Store) {
    with_definition(&store).await;
    let mut a = saga("s-a", "order-1", Some("idem-a"));
    a.state = state(SagaStatus::Queued, 1);
    let mut b = saga("s-b", "order-2", None);
    b.state = state(
        SagaStatus::Failed {
            reason: "stuck".into(),
            compensating: Some("refund".into()),
        },
        2,
    );
    insert(&store, &[a.clone(), b.clone()]).await;

    let mut tx = store.begin().await.unwrap();
    let rows = tx
        .load_sagas(&ids(&["s-b", "s-a", "unknown"]))
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(rows.len(), 2, "unknown ids are ignored, known ones found");
    let by_id: HashMap<&str, _> = rows.iter().map(|r| (r.id.as_str(), r)).collect();
    for want in [&a, &b] {
        let got = by_id[want.id.as_str()];
        assert_eq!(got.version, 0);
        assert_eq!(got.state, want.state, "state round-trips");
        assert_eq!(got.name, "order");
        assert_eq!(got.definition_hash, HASH);
        assert_eq!(got.sequence_key, want.sequence_key);
        assert_eq!(got.created_at, NOW);
        // A saga inserted in a final state (a batch that started and finished it) is finished
        // at once.
        let finished = want.state.status.is_final().then_some(NOW);
        assert_eq!(got.finished_at, finished);
    }
}

async fn update_moves_version_by_changes(store: Store) {
    with_definition(&store).await;
    insert(&store, &[saga("s1", "k1", None)]).await;
    update(&store, "s1", 0, 3, state(SagaStatus::Running, 7)).await;
    let row = load(&store, "s1").await;
    assert_eq!(row.version, 3);
    assert_eq!(row.state, state(SagaStatus::Running, 7));
    assert_eq!(row.finished_at, None);

    update(&store, "s1", 3, 1, state(SagaStatus::Completed, 8)).await;
    let row = load(&store, "s1").await;
    assert_eq!(row.version, 4);
    assert_eq!(row.state, state(SagaStatus::Completed, 8));
    assert_eq!(
        row.finished_at,
        Some(NOW + 1),
        "a final state sets finished_at"
    );
    let status: String = sqlx::query("SELECT status FROM sagas WHERE id = $1")
        .bind("s1")
        .fetch_one(store.pool())
        .await
        .unwrap()
        .try_get("status")
        .unwrap();
    assert_eq!(status, "completed");
}

async fn stale_version_conflicts_and_rolls_back(store: Store) {
    with_definition(&store).await;
    insert(&store, &[saga("s1", "k1", None)]).await;
    update(&store, "s1", 0, 2, state(SagaStatus::Running, 1)).await;

    let mut tx = store.begin().await.unwrap();
    let err = tx
        .update_sagas(
            &[write("s1", 0, 1, state(SagaStatus::Completed, 99))],
            NOW + 5,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "got {err:?}");
    tx.rollback().await.unwrap();

    let row = load(&store, "s1").await;
    assert_eq!(row.version, 2);
    assert_eq!(row.state, state(SagaStatus::Running, 1));
    assert_eq!(row.finished_at, None);
}

async fn one_stale_saga_fails_the_whole_update(store: Store) {
    with_definition(&store).await;
    insert(
        &store,
        &[saga("fresh", "k1", None), saga("stale", "k2", None)],
    )
    .await;
    update(&store, "stale", 0, 2, state(SagaStatus::Running, 1)).await;

    let mut tx = store.begin().await.unwrap();
    let err = tx
        .update_sagas(
            &[
                write("fresh", 0, 1, state(SagaStatus::Running, 50)),
                write("stale", 0, 1, state(SagaStatus::Running, 51)),
            ],
            NOW + 5,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "got {err:?}");
    tx.rollback().await.unwrap();

    let fresh = load(&store, "fresh").await;
    assert_eq!(
        fresh.version, 0,
        "the fresh saga's write was rolled back too"
    );
    assert_eq!(fresh.state, state(SagaStatus::Queued, 0));
    let stale = load(&store, "stale").await;
    assert_eq!(stale.version, 2);
    assert_eq!(stale.state, state(SagaStatus::Running, 1));
}

async fn idempotency_keys_find_and_stay_unique(store: Store) {
    with_definition(&store).await;
    insert(
        &store,
        &[
            saga("s1", "k1", Some("idem-1")),
            saga("s2", "k2", None),
            saga("s3", "k3", Some("idem-3")),
        ],
    )
    .await;

    let mut tx = store.begin().await.unwrap();
    let found = tx
        .sagas_by_idempotency_key(&ids(&["idem-3", "idem-unknown", "idem-1"]))
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let found: HashMap<String, String> = found
        .into_iter()
        .map(|(k, saga)| {
            assert_eq!(saga.name, "order");
            assert_eq!(saga.input, state(SagaStatus::Queued, 0).input, "{k}");
            (k, saga.id)
        })
        .collect();
    let want: HashMap<String, String> = [("idem-1", "s1"), ("idem-3", "s3")]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    assert_eq!(found, want);

    // Against a committed saga.
    let mut tx = store.begin().await.unwrap();
    let err = tx
        .insert_sagas(&[saga("s4", "k4", Some("idem-1"))], NOW)
        .await
        .unwrap_err();
    assert_unique_violation(err);
    tx.rollback().await.unwrap();

    // Two in one batch.
    let mut tx = store.begin().await.unwrap();
    let err = tx
        .insert_sagas(
            &[
                saga("s5", "k5", Some("idem-5")),
                saga("s6", "k6", Some("idem-5")),
            ],
            NOW,
        )
        .await
        .unwrap_err();
    assert_unique_violation(err);
    tx.rollback().await.unwrap();

    let mut tx = store.begin().await.unwrap();
    let rows = tx.load_sagas(&ids(&["s4", "s5", "s6"])).await.unwrap();
    tx.rollback().await.unwrap();
    assert!(rows.is_empty(), "a failed insert left rows");
}

/// A batch's lines are one `saga_timeline` row per saga; `saga_history` reads them one line a
/// row, in order, as before.
async fn history_is_one_row_per_saga_per_batch(store: Store) {
    let line = |saga: &str, kind: &str, step: Option<&str>| HistoryRow {
        saga_id: saga.into(),
        entry: HistoryEntry {
            kind: kind.into(),
            step: step.map(str::to_owned),
            detail: format!("{kind} of {saga}: «quote \" and \\»"),
        },
    };
    let mut tx = store.begin().await.unwrap();
    tx.append_history(
        &[
            line("a", "begin", None),
            line("b", "begin", None),
            line("a", "dispatch", Some("pay")),
            line("b", "dispatch", Some("pay")),
            line("a", "dispatch", Some("ship")),
        ],
        NOW,
    )
    .await
    .unwrap();
    tx.append_history(&[line("a", "succeeded", Some("pay"))], NOW + 5)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM saga_timeline")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(rows, 3, "a twice (two batches), b once");
    let t = store.timeline("a", 100).await.unwrap();
    assert_eq!(t.total, 4);
    let got: Vec<(i64, &str, Option<&str>)> = t
        .rows
        .iter()
        .map(|r| (r.at, r.kind.as_str(), r.step.as_deref()))
        .collect();
    assert_eq!(
        got,
        [
            (NOW, "begin", None),
            (NOW, "dispatch", Some("pay")),
            (NOW, "dispatch", Some("ship")),
            (NOW + 5, "succeeded", Some("pay")),
        ]
    );
    assert_eq!(t.rows[0].detail, "begin of a: «quote \" and \\»");
    // The newest 2 of 4 cut through a batch's row.
    let newest = store.timeline("a", 2).await.unwrap();
    assert_eq!((newest.total, newest.rows.len()), (4, 2));
    assert_eq!(newest.rows[0].step.as_deref(), Some("ship"));
    assert_eq!(
        store
            .last_history("a", "dispatch")
            .await
            .unwrap()
            .map(|r| r.step),
        Some(Some("ship".to_owned()))
    );
    assert_eq!(store.timeline("b", 100).await.unwrap().total, 2);
}

async fn history_keeps_slice_order(store: Store) {
    // Kinds in an order that is neither sorted nor reverse-sorted, with another saga's rows
    // interleaved.
    let kinds: Vec<String> = (0..25).map(|i| format!("e{:02}", (i * 7) % 25)).collect();
    let mut rows = Vec::new();
    for (i, kind) in kinds.iter().enumerate() {
        rows.push(HistoryRow {
            saga_id: "s1".into(),
            entry: HistoryEntry {
                kind: kind.clone(),
                step: (i % 2 == 0).then(|| format!("step-{i}")),
                detail: format!("detail {i}"),
            },
        });
        if i % 5 == 0 {
            rows.push(HistoryRow {
                saga_id: "other".into(),
                entry: HistoryEntry {
                    kind: "noise".into(),
                    step: None,
                    detail: String::new(),
                },
            });
        }
    }
    let mut tx = store.begin().await.unwrap();
    tx.append_history(&rows[..10], NOW).await.unwrap();
    tx.append_history(&rows[10..], NOW).await.unwrap();
    tx.commit().await.unwrap();

    let got: Vec<(String, Option<String>, String)> =
        sqlx::query("SELECT kind, step, detail FROM saga_history WHERE saga_id = $1 ORDER BY id")
            .bind("s1")
            .fetch_all(store.pool())
            .await
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r.try_get("kind").unwrap(),
                    r.try_get("step").unwrap(),
                    r.try_get("detail").unwrap(),
                )
            })
            .collect();
    let want: Vec<(String, Option<String>, String)> = rows
        .iter()
        .filter(|r| r.saga_id == "s1")
        .map(|r| {
            (
                r.entry.kind.clone(),
                r.entry.step.clone(),
                r.entry.detail.clone(),
            )
        })
        .collect();
    assert_eq!(got, want);
}

async fn outbox_keeps_order_and_first_copy(store: Store) {
    let order = ["m-7", "m-2", "m-9", "m-0", "m-5", "m-1", "m-8", "m-3"];
    let messages: Vec<OutboxMessage> = order.iter().map(|m| message(m, "first")).collect();
    enqueue(&store, &messages).await;
    // A message id queued before (and one twice in this batch) keeps its first copy.
    enqueue(
        &store,
        &[
            message("m-2", "second"),
            message("m-new", "first"),
            message("m-new", "second"),
        ],
    )
    .await;

    let rows = outbox_ids(&store).await;
    let got: Vec<(&str, &str)> = rows
        .iter()
        .map(|(_, m, p)| (m.as_str(), p.as_str()))
        .collect();
    let mut want: Vec<(&str, &str)> = order.iter().map(|m| (*m, "first")).collect();
    want.push(("m-new", "first"));
    assert_eq!(
        got, want,
        "ids increase in slice order; duplicates are kept as they were"
    );
}

async fn outbox_claim_leases_rows(store: Store) {
    enqueue(
        &store,
        &[message("c", "pc"), message("a", "pa"), message("b", "pb")],
    )
    .await;
    let rows = outbox_ids(&store).await;

    let first = store.claim_outbox(NOW, 1_000, 10).await.unwrap();
    assert_eq!(claimed_ids(&first), ids(&["c", "a", "b"]), "outbox order");
    assert_eq!(
        claimed_ids(&first),
        rows.iter().map(|r| r.1.clone()).collect::<Vec<_>>(),
        "claimed in the rows' id order"
    );
    assert_eq!(first[0].destination, "payment.commands");
    assert_eq!(first[0].message.key, "key-c");
    assert_eq!(first[0].message.payload, b"pc".to_vec());

    assert!(
        store
            .claim_outbox(NOW + 10, 1_000, 10)
            .await
            .unwrap()
            .is_empty(),
        "the lease holds"
    );
    assert!(
        store
            .claim_outbox(NOW + 999, 1_000, 10)
            .await
            .unwrap()
            .is_empty(),
        "the lease holds until it runs out"
    );
    let again = store.claim_outbox(NOW + 1_001, 1_000, 10).await.unwrap();
    assert_eq!(
        claimed_ids(&again),
        ids(&["c", "a", "b"]),
        "the lease ran out"
    );
}

async fn outbox_sent_rows_are_never_claimed(store: Store) {
    enqueue(
        &store,
        &[message("a", "p"), message("b", "p"), message("c", "p")],
    )
    .await;
    let claimed = store.claim_outbox(NOW, 1_000, 10).await.unwrap();
    assert_eq!(claimed.len(), 3);
    store
        .delete_sent(&[claimed[0].message.id.clone(), claimed[2].message.id.clone()])
        .await
        .unwrap();
    assert_eq!(
        store.outbox_stats().await.unwrap().pending,
        1,
        "sent rows leave"
    );
    let later = store
        .claim_outbox(NOW + 1_000_000, 1_000, 10)
        .await
        .unwrap();
    assert_eq!(claimed_ids(&later), ids(&["b"]));
    store
        .delete_sent(&[later[0].message.id.clone()])
        .await
        .unwrap();
    assert!(
        store
            .claim_outbox(NOW + 2_000_000, 1_000, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let stats = store.outbox_stats().await.unwrap();
    assert_eq!(stats.pending, 0);
}

async fn outbox_released_rows_are_claimable_at_once(store: Store) {
    enqueue(
        &store,
        &[message("a", "p"), message("b", "p"), message("c", "p")],
    )
    .await;
    let claimed = store.claim_outbox(NOW, 60_000, 10).await.unwrap();
    assert_eq!(claimed.len(), 3);
    store
        .release_lease(&[claimed[0].message.id.clone(), claimed[2].message.id.clone()])
        .await
        .unwrap();
    let again = store.claim_outbox(NOW, 60_000, 10).await.unwrap();
    assert_eq!(
        claimed_ids(&again),
        ids(&["a", "c"]),
        "released rows at once, the leased one not"
    );
}

async fn outbox_handed_off_rows_wait_their_grace(store: Store) {
    let handed = |id: &str| OutboxMessage {
        handed_off: true,
        ..message(id, "p")
    };
    enqueue(&store, &[handed("h1"), message("free", "p"), handed("h2")]).await;
    // The writer's relay sends h1 and h2 itself: a claim leaves them alone meanwhile.
    let now = NOW + 1;
    assert_eq!(
        claimed_ids(&store.claim_outbox(now, 60_000, 10).await.unwrap()),
        ids(&["free"])
    );
    let before_grace = NOW + HANDOFF_GRACE_MS - 1;
    assert!(
        store
            .claim_outbox(before_grace, 60_000, 10)
            .await
            .unwrap()
            .is_empty()
    );
    // A publish that failed gives h2 back: claimable at once.
    store.release_lease(&ids(&["h2"])).await.unwrap();
    assert_eq!(
        claimed_ids(&store.claim_outbox(now, 60_000, 10).await.unwrap()),
        ids(&["h2"])
    );
    // h1's writer died: after the grace, any relay takes it.
    let after_grace = NOW + HANDOFF_GRACE_MS + 1;
    assert_eq!(
        claimed_ids(&store.claim_outbox(after_grace, 60_000, 10).await.unwrap()),
        ids(&["h1"])
    );
    store
        .delete_sent(&ids(&["h1", "h2", "free"]))
        .await
        .unwrap();
    assert_eq!(store.outbox_stats().await.unwrap().pending, 0);
}

async fn outbox_claims_split_without_overlap(store: Store) {
    let names: Vec<String> = (0..7).map(|i| format!("m{i}")).collect();
    let messages: Vec<OutboxMessage> = names.iter().map(|m| message(m, "p")).collect();
    enqueue(&store, &messages).await;

    let first = store.claim_outbox(NOW, 1_000, 4).await.unwrap();
    let second = store.claim_outbox(NOW, 1_000, 4).await.unwrap();
    assert_eq!(claimed_ids(&first), names[..4].to_vec());
    assert_eq!(claimed_ids(&second), names[4..].to_vec());

    // Two relays at once (on PostgreSQL two connections, SKIP LOCKED): disjoint batches.
    let now = NOW + 10_000;
    let (a, b) = tokio::join!(
        store.claim_outbox(now, 1_000, 4),
        store.claim_outbox(now, 1_000, 4)
    );
    let (a, b) = (claimed_ids(&a.unwrap()), claimed_ids(&b.unwrap()));
    assert!(a.len() <= 4 && b.len() <= 4);
    let a_set: HashSet<&String> = a.iter().collect();
    assert!(
        b.iter().all(|m| !a_set.contains(m)),
        "overlap: {a:?} and {b:?}"
    );
    let rest = store.claim_outbox(now, 1_000, 10).await.unwrap();
    let mut all: Vec<String> = a.into_iter().chain(b).chain(claimed_ids(&rest)).collect();
    all.sort();
    assert_eq!(all, names, "every row claimed exactly once");
}

/// The timer loop's look: the due timers earliest first, at most the limit, with only their
/// events read, and when the first one that is not due is due.
async fn due_timers_are_the_due_ones_and_the_next(store: Store) {
    let none = store.due_timers(NOW, 10).await.unwrap();
    assert!(none.due.is_empty() && none.next_at.is_none(), "{none:?}");

    let mut tx = store.begin().await.unwrap();
    // The first two due rows inserted are not the two earliest: an order the statement
    // forgot would show.
    tx.set_timers(&[
        timer("t-now", NOW),
        timer("t-later", NOW + 500),
        timer("t-due-2", NOW - 10),
        timer("t-next", NOW + 50),
        timer("t-due-1", NOW - 20),
    ])
    .await
    .unwrap();
    tx.commit().await.unwrap();

    let look = store.due_timers(NOW, 10).await.unwrap();
    let due: Vec<&str> = look.due.iter().map(|t| t.id.as_str()).collect();
    assert_eq!(
        due,
        ["t-due-1", "t-due-2", "t-now"],
        "due at NOW counts as due"
    );
    assert_eq!(look.due[0].saga_id, "s1");
    assert_eq!(look.due[0].due_at, NOW - 20);
    assert_eq!(look.due[0].event, Some(timer("x", 0).event));
    assert_eq!(
        look.next_at,
        Some(NOW + 50),
        "the earliest timer not due yet"
    );

    let limited = store.due_timers(NOW, 2).await.unwrap();
    let due: Vec<&str> = limited.due.iter().map(|t| t.id.as_str()).collect();
    assert_eq!(
        due,
        ["t-due-1", "t-due-2"],
        "at most the limit, earliest first"
    );
    assert_eq!(limited.next_at, Some(NOW + 50));

    let early = store.due_timers(NOW - 100, 10).await.unwrap();
    assert!(early.due.is_empty(), "{early:?}");
    assert_eq!(early.next_at, Some(NOW - 20));

    let late = store.due_timers(NOW + 1_000, 10).await.unwrap();
    assert_eq!(late.due.len(), 5);
    assert_eq!(late.next_at, None, "nothing left that is not due");

    // A due row whose event does not decode comes back without it (the loop deletes it), and
    // the look does not fail.
    sqlx::query(
        "INSERT INTO timers (id, saga_id, due_at, event) VALUES ('t-bad', 's1', $1, 'not json')",
    )
    .bind(NOW - 30)
    .execute(store.pool())
    .await
    .unwrap();
    let bad = store.due_timers(NOW, 10).await.unwrap();
    assert_eq!(bad.due[0].id, "t-bad");
    assert_eq!(bad.due[0].event, None);
    assert_eq!(bad.due[1].event, Some(timer("x", 0).event));
}

async fn timers_claim_once_cancel_and_order(store: Store) {
    let mut tx = store.begin().await.unwrap();
    tx.set_timers(&[
        timer("t-late", NOW + 300),
        timer("t-early", NOW + 100),
        timer("t-mid", NOW + 200),
        timer("t-cancel", NOW + 150),
    ])
    .await
    .unwrap();
    tx.commit().await.unwrap();

    let next = store.next_timers(10).await.unwrap();
    let order: Vec<&str> = next.iter().map(|t| t.id.as_str()).collect();
    assert_eq!(order, ["t-early", "t-cancel", "t-mid", "t-late"]);
    assert_eq!(next[0].saga_id, "s1");
    assert_eq!(next[0].due_at, NOW + 100);
    assert_eq!(next[0].event, Some(timer("x", 0).event));
    let first_two: Vec<String> = store
        .next_timers(2)
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.id)
        .collect();
    assert_eq!(first_two, ids(&["t-early", "t-cancel"]));

    let mut tx = store.begin().await.unwrap();
    let claimed = tx
        .claim_timers(&ids(&["t-early", "t-late", "t-unknown"]))
        .await
        .unwrap();
    assert_eq!(claimed, set(&["t-early", "t-late"]));
    tx.commit().await.unwrap();

    let mut tx = store.begin().await.unwrap();
    assert!(
        tx.claim_timers(&ids(&["t-early", "t-late"]))
            .await
            .unwrap()
            .is_empty(),
        "a timer is claimed once"
    );
    tx.cancel_timers(&ids(&["t-cancel"])).await.unwrap();
    tx.commit().await.unwrap();

    let left: Vec<String> = store
        .next_timers(10)
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.id)
        .collect();
    assert_eq!(left, ids(&["t-mid"]));
}

async fn keys_one_call_first_holds_second_queues(store: Store) {
    let holding = acquire(&store, &[("order-1", "a"), ("order-1", "b")]).await;
    assert_eq!(holding, ids(&["a"]));
    assert_eq!(holder(&store, "order-1").await.as_deref(), Some("a"));
    assert_eq!(queue(&store, "order-1").await, ids(&["b"]));
}

async fn keys_held_earlier_queue_the_newcomer(store: Store) {
    assert_eq!(acquire(&store, &[("order-1", "a")]).await, ids(&["a"]));
    assert!(acquire(&store, &[("order-1", "b")]).await.is_empty());
    assert!(acquire(&store, &[("order-1", "c")]).await.is_empty());
    assert_eq!(holder(&store, "order-1").await.as_deref(), Some("a"));
    assert_eq!(queue(&store, "order-1").await, ids(&["b", "c"]));
}

async fn keys_release_hands_over_in_arrival_order(store: Store) {
    assert_eq!(acquire(&store, &[("k", "a")]).await, ids(&["a"]));
    assert!(acquire(&store, &[("k", "b")]).await.is_empty());
    assert!(acquire(&store, &[("k", "c")]).await.is_empty());

    assert_eq!(
        release(&store, &[("k", "a")]).await,
        ids(&["b"]),
        "b must begin"
    );
    assert_eq!(holder(&store, "k").await.as_deref(), Some("b"));
    assert_eq!(queue(&store, "k").await, ids(&["c"]));

    // A newcomer queues behind c, not ahead of it.
    assert!(acquire(&store, &[("k", "d")]).await.is_empty());
    assert_eq!(release(&store, &[("k", "b")]).await, ids(&["c"]));
    assert_eq!(holder(&store, "k").await.as_deref(), Some("c"));
    assert_eq!(release(&store, &[("k", "c")]).await, ids(&["d"]));
    assert_eq!(release(&store, &[("k", "d")]).await, Vec::<String>::new());
    assert_eq!(holder(&store, "k").await, None);
    assert!(queue(&store, "k").await.is_empty());
}

async fn keys_release_by_waiter_leaves_the_queue(store: Store) {
    assert_eq!(acquire(&store, &[("k", "a")]).await, ids(&["a"]));
    assert!(acquire(&store, &[("k", "b"), ("k", "c")]).await.is_empty());
    assert_eq!(queue(&store, "k").await, ids(&["b", "c"]));

    assert!(
        release(&store, &[("k", "b")]).await.is_empty(),
        "a waiter's release hands nothing"
    );
    assert_eq!(holder(&store, "k").await.as_deref(), Some("a"));
    assert_eq!(queue(&store, "k").await, ids(&["c"]));

    assert_eq!(
        release(&store, &[("k", "a")]).await,
        ids(&["c"]),
        "b is gone"
    );
}

async fn keys_release_without_waiters_frees_the_key(store: Store) {
    assert_eq!(acquire(&store, &[("k", "a")]).await, ids(&["a"]));
    assert!(release(&store, &[("k", "a")]).await.is_empty());
    assert_eq!(holder(&store, "k").await, None, "the key row is gone");
    assert_eq!(acquire(&store, &[("k", "e")]).await, ids(&["e"]));
    assert_eq!(holder(&store, "k").await.as_deref(), Some("e"));
    assert!(queue(&store, "k").await.is_empty());
}

async fn keys_different_keys_both_hold(store: Store) {
    let holding = acquire(&store, &[("k1", "a"), ("k2", "b")]).await;
    assert_eq!(holding, ids(&["a", "b"]));
    assert_eq!(holder(&store, "k1").await.as_deref(), Some("a"));
    assert_eq!(holder(&store, "k2").await.as_deref(), Some("b"));
    assert!(queue(&store, "k1").await.is_empty());
    assert!(queue(&store, "k2").await.is_empty());
}

async fn batches_cost_one_statement_whatever_their_size(store: Store) {
    with_definition(&store).await;
    let c = store.counters();
    let mut tx = store.begin().await.unwrap();

    let mut costs: Vec<(&str, u64, u64)> = Vec::new();
    macro_rules! cost {
        ($e:expr) => {{
            let before = c.statements();
            $e.await.unwrap();
            c.statements() - before
        }};
    }

    let sagas = |prefix: &str, n: usize| -> Vec<NewSaga> {
        (0..n)
            .map(|i| saga(&format!("{prefix}-{i}"), &format!("{prefix}-k{i}"), None))
            .collect()
    };
    let one = cost!(tx.insert_sagas(&sagas("one", 1), NOW));
    let many = cost!(tx.insert_sagas(&sagas("many", 50), NOW));
    costs.push(("insert_sagas", one, many));

    let writes = |prefix: &str, n: usize| -> Vec<SagaWrite> {
        (0..n)
            .map(|i| {
                write(
                    &format!("{prefix}-{i}"),
                    0,
                    1,
                    state(SagaStatus::Running, i as u64),
                )
            })
            .collect()
    };
    let one = cost!(tx.update_sagas(&writes("one", 1), NOW));
    let many = cost!(tx.update_sagas(&writes("many", 50), NOW));
    costs.push(("update_sagas", one, many));

    let history = |n: usize| -> Vec<HistoryRow> {
        (0..n)
            .map(|i| HistoryRow {
                saga_id: format!("many-{i}"),
                entry: HistoryEntry {
                    kind: "dispatch".into(),
                    step: Some("pay".into()),
                    detail: format!("{i}"),
                },
            })
            .collect()
    };
    let one = cost!(tx.append_history(&history(1), NOW));
    let many = cost!(tx.append_history(&history(50), NOW));
    costs.push(("append_history", one, many));

    let outbox = |prefix: &str, n: usize| -> Vec<OutboxMessage> {
        (0..n)
            .map(|i| message(&format!("{prefix}-{i}"), "{}"))
            .collect()
    };
    let one = cost!(tx.enqueue_outbox(&outbox("one", 1), NOW));
    let many = cost!(tx.enqueue_outbox(&outbox("many", 50), NOW));
    costs.push(("enqueue_outbox", one, many));

    let timers = |prefix: &str, n: usize| -> Vec<TimerRow> {
        (0..n)
            .map(|i| timer(&format!("{prefix}-{i}"), NOW + i as i64))
            .collect()
    };
    let one = cost!(tx.set_timers(&timers("one", 1)));
    let many = cost!(tx.set_timers(&timers("many", 50)));
    costs.push(("set_timers", one, many));
    tx.commit().await.unwrap();

    for (method, one, many) in &costs {
        assert_eq!(
            one, many,
            "{method}: 1 row cost {one} statements, 50 rows {many}"
        );
        assert_eq!(*one, 1, "{method} costs one statement");
    }

    // The 50-row batches really wrote 50 rows each.
    for (sql, want) in [
        ("SELECT COUNT(*) AS n FROM sagas WHERE version = 1", 51),
        ("SELECT COUNT(*) AS n FROM saga_history", 51),
        ("SELECT COUNT(*) AS n FROM outbox", 51),
        ("SELECT COUNT(*) AS n FROM timers", 51),
    ] {
        let n: i64 = sqlx::query(sql)
            .fetch_one(store.pool())
            .await
            .unwrap()
            .try_get("n")
            .unwrap();
        assert_eq!(n, want, "{sql}");
    }
}

async fn definitions_are_idempotent_and_latest_is_highest(store: Store) {
    let mut tx = store.begin().await.unwrap();
    tx.put_definition("h1", "order", 1, "source v1", NOW)
        .await
        .unwrap();
    // Registered out of order: the highest version wins, not the last registered.
    tx.put_definition("h3", "order", 3, "source v3", NOW + 1)
        .await
        .unwrap();
    tx.put_definition("h2", "order", 2, "source v2", NOW + 2)
        .await
        .unwrap();
    tx.put_definition("r1", "refund", 7, "refund v7", NOW + 3)
        .await
        .unwrap();
    tx.commit().await.unwrap();

    // The same hash again (another engine registering the same file): a no-op, whatever else
    // it says.
    let mut tx = store.begin().await.unwrap();
    tx.put_definition("h1", "order", 9, "other text", NOW + 4)
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let mut tx = store.begin().await.unwrap();
    assert_eq!(
        tx.definition_source("h1").await.unwrap().as_deref(),
        Some("source v1")
    );
    assert_eq!(tx.definition_source("nope").await.unwrap(), None);
    assert_eq!(
        tx.latest_definition("order").await.unwrap().as_deref(),
        Some("h3")
    );
    assert_eq!(
        tx.latest_definition("refund").await.unwrap().as_deref(),
        Some("r1")
    );
    assert_eq!(tx.latest_definition("unknown").await.unwrap(), None);
    tx.rollback().await.unwrap();

    let n: i64 = sqlx::query("SELECT COUNT(*) AS n FROM saga_definitions WHERE hash = $1")
        .bind("h1")
        .fetch_one(store.pool())
        .await
        .unwrap()
        .try_get("n")
        .unwrap();
    assert_eq!(n, 1);
}

// ---------------------------------------------------------------------------------------------
// The read side (store/read.rs) and retention (store/retention.rs)

/// A saga of definition `order` inserted at `at` (its `created_at`), in a batch of its own.
async fn insert_at(store: &Store, id: &str, key: &str, at: i64) {
    let mut tx = store.begin().await.unwrap();
    tx.insert_sagas(&[saga(id, key, None)], at).await.unwrap();
    tx.commit().await.unwrap();
}

/// Moves a saga at version `expected` to `status` at `at` (a final status sets `finished_at`).
async fn move_to(store: &Store, id: &str, expected: i64, status: SagaStatus, at: i64) {
    let mut tx = store.begin().await.unwrap();
    tx.update_sagas(&[write(id, expected, 1, state(status, 0))], at)
        .await
        .unwrap();
    tx.commit().await.unwrap();
}

fn compensated() -> SagaStatus {
    SagaStatus::Compensated {
        reason: "coupon refused".into(),
    }
}

fn failed() -> SagaStatus {
    SagaStatus::Failed {
        reason: "refund stuck".into(),
        compensating: Some("pay".into()),
    }
}

fn history(saga_id: &str, kind: &str, detail: &str) -> HistoryRow {
    HistoryRow {
        saga_id: saga_id.to_owned(),
        entry: HistoryEntry {
            kind: kind.to_owned(),
            step: Some("pay".to_owned()),
            detail: detail.to_owned(),
        },
    }
}

async fn scalar(store: &Store, sql: &'static str, bind: &str) -> i64 {
    sqlx::query(sql)
        .bind(bind)
        .fetch_one(store.pool())
        .await
        .unwrap()
        .try_get("n")
        .unwrap()
}

fn summary_ids(rows: &[sagaflow_engine::store::SagaSummary]) -> Vec<String> {
    rows.iter().map(|r| r.id.clone()).collect()
}

async fn read_unknown_saga_is_none_everywhere(store: Store) {
    with_definition(&store).await;
    insert(&store, &[saga("known", "k1", None)]).await;
    assert!(store.saga_record("known").await.unwrap().is_some());
    assert!(store.saga_header("known").await.unwrap().is_some());

    assert!(store.saga_record("nope").await.unwrap().is_none());
    assert_eq!(store.saga_header("nope").await.unwrap(), None);
    assert_eq!(store.saga_state("nope").await.unwrap(), None);
    let timeline = store.timeline("nope", 10).await.unwrap();
    assert_eq!((timeline.rows.len(), timeline.total), (0, 0));
    assert_eq!(store.last_history("nope", "ignored").await.unwrap(), None);
    // What `sagaflow status` and `GET /sagas/{id}` build on: None, which they answer as
    // "no saga with id …" (404).
    assert!(status::saga(&store, "nope").await.unwrap().is_none());
    // Odd ids are just ids.
    for id in ["", "'; DROP TABLE sagas; --", "%", "ü/1/action/2"] {
        assert!(store.saga_record(id).await.unwrap().is_none(), "{id:?}");
    }
    assert!(store.saga_record("known").await.unwrap().is_some());
}

async fn read_saga_record_header_status_and_timeline(store: Store) {
    with_definition(&store).await;
    insert(&store, &[saga("s1", "order-1", Some("idem-1"))]).await;
    move_to(&store, "s1", 0, failed(), NOW + 40).await;
    let mut tx = store.begin().await.unwrap();
    tx.append_history(
        &[
            history("s1", "dispatch", "d0"),
            history("other", "ignored", "not mine"),
            history("s1", "ignored", "i1"),
            history("s1", "dispatch", "d2"),
        ],
        NOW + 10,
    )
    .await
    .unwrap();
    tx.append_history(
        &[
            history("s1", "ignored", "i3"),
            history("s1", "failed", "f4"),
        ],
        NOW + 20,
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();

    let r = store.saga_record("s1").await.unwrap().expect("s1");
    assert_eq!(r.id, "s1");
    assert_eq!(r.name, "order");
    assert_eq!(r.definition_hash, HASH);
    assert_eq!(r.sequence_key, "order-1");
    assert_eq!(r.state, state(failed(), 0));
    assert_eq!(r.idempotency_key.as_deref(), Some("idem-1"));
    assert_eq!(
        (r.created_at, r.updated_at, r.finished_at),
        (NOW, NOW + 40, Some(NOW + 40))
    );
    assert_eq!(r.definition_version, Some(1));
    assert_eq!(r.definition_source.as_deref(), Some("name: order"));

    let h = store.saga_header("s1").await.unwrap().expect("s1");
    assert_eq!(
        (
            h.name.as_str(),
            h.status.as_str(),
            h.definition_hash.as_str()
        ),
        ("order", "failed", HASH)
    );
    assert_eq!(h.definition_version, Some(1));
    assert_eq!(
        store.saga_state("s1").await.unwrap().map(|s| s.status),
        Some(failed())
    );

    // The newest 3 of 5, oldest first; the other saga's row is not counted.
    let t = store.timeline("s1", 3).await.unwrap();
    assert_eq!(t.total, 5);
    let details: Vec<&str> = t.rows.iter().map(|r| r.detail.as_str()).collect();
    assert_eq!(details, ["d2", "i3", "f4"]);
    assert_eq!(
        t.rows[1],
        TimelineRow {
            at: NOW + 20,
            kind: "ignored".into(),
            step: Some("pay".into()),
            detail: "i3".into(),
        }
    );
    let all = store.timeline("s1", 100).await.unwrap();
    assert_eq!((all.rows.len(), all.total), (5, 5));
    assert_eq!(all.rows[0].detail, "d0");
    assert_eq!(
        store
            .last_history("s1", "ignored")
            .await
            .unwrap()
            .map(|r| r.detail),
        Some("i3".to_owned()),
        "the newest of its kind"
    );
    assert_eq!(store.last_history("s1", "completed").await.unwrap(), None);

    // status::saga on top: the stored source does not compile, so the steps are named from its
    // YAML read as plain data (a step without an id by its index) and the detail says why.
    sqlx::query("UPDATE saga_definitions SET source = $1 WHERE hash = $2")
        .bind("name: order\nsteps:\n  - id: pay\n  - service: x\n  - id: ship\n    action: [1]\n")
        .bind(HASH)
        .execute(store.pool())
        .await
        .unwrap();
    let d = status::saga(&store, "s1").await.unwrap().expect("s1");
    assert!(d.definition_problem.is_some());
    let step_ids: Vec<&str> = d.steps.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(step_ids, ["pay", "#1", "ship"]);
    assert_eq!(d.steps[1].attempts, 2);
    assert_eq!(d.timeline.len(), 5);
    assert_eq!(d.timeline_omitted, 0);
    assert_eq!(d.status, failed());
    assert_eq!(d.version, 1);
}

async fn read_corrupt_state_is_an_error_naming_the_saga(store: Store) {
    with_definition(&store).await;
    insert(&store, &[saga("broken", "k", None)]).await;
    sqlx::query("UPDATE sagas SET state = $1 WHERE id = $2")
        .bind("{not json")
        .bind("broken")
        .execute(store.pool())
        .await
        .unwrap();
    let corrupt = |e: StoreError| match e {
        StoreError::Corrupt { table, detail } => {
            assert_eq!(table, "sagas");
            assert!(detail.contains("saga broken"), "{detail}");
        }
        other => panic!("expected a corrupt row, got {other:?}"),
    };
    corrupt(store.saga_record("broken").await.unwrap_err());
    corrupt(store.saga_state("broken").await.unwrap_err());
    match status::saga(&store, "broken").await {
        Err(EngineError::Store(e)) => corrupt(e),
        other => panic!("expected a store error, got {other:?}"),
    }
    // What does not decode the state still answers.
    let h = store.saga_header("broken").await.unwrap().expect("broken");
    assert_eq!(h.status, "queued");
    let listed = store.list_sagas(&SagaFilter::default(), 10).await.unwrap();
    assert_eq!(summary_ids(&listed), ids(&["broken"]));
}

async fn read_list_filters_and_pages(store: Store) {
    with_definition(&store).await;
    // Created one after the other, except b1 and b2 (one batch, one `created_at`: ordered by
    // id, descending).
    insert_at(&store, "a", "k1", NOW).await;
    let mut tx = store.begin().await.unwrap();
    tx.insert_sagas(&[saga("b1", "k2", None), saga("b2", "k1", None)], NOW + 1)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    insert_at(&store, "c", "k1", NOW + 2).await;
    insert_at(&store, "d", "k2", NOW + 3).await;
    insert_at(&store, "e", "k1", NOW + 4).await;
    move_to(&store, "a", 0, SagaStatus::Running, NOW + 10).await;
    move_to(&store, "b2", 0, SagaStatus::Running, NOW + 10).await;
    move_to(&store, "d", 0, SagaStatus::Running, NOW + 10).await;
    move_to(&store, "c", 0, SagaStatus::Completed, NOW + 11).await;

    let list = |status: Option<&str>, key: Option<&str>, after: Option<(i64, &str)>| SagaFilter {
        status: status.map(str::to_owned),
        sequence_key: key.map(str::to_owned),
        after: after.map(|(c, i)| (c, i.to_owned())),
        ..SagaFilter::default()
    };
    let all = store
        .list_sagas(&list(None, None, None), 100)
        .await
        .unwrap();
    assert_eq!(summary_ids(&all), ids(&["e", "d", "c", "b2", "b1", "a"]));
    let c = all.iter().find(|s| s.id == "c").unwrap();
    assert_eq!(
        (c.name.as_str(), c.state.as_str(), c.sequence_key.as_str()),
        ("order", "completed", "k1")
    );
    assert_eq!(
        (c.created_at, c.updated_at, c.finished_at),
        (NOW + 2, NOW + 11, Some(NOW + 11))
    );
    assert_eq!(all[0].finished_at, None);

    let got = |f: SagaFilter, limit: usize| {
        let store = store.clone();
        async move { summary_ids(&store.list_sagas(&f, limit).await.unwrap()) }
    };
    assert_eq!(
        got(list(Some("running"), None, None), 100).await,
        ids(&["d", "b2", "a"])
    );
    assert_eq!(
        got(list(None, Some("k1"), None), 100).await,
        ids(&["e", "c", "b2", "a"])
    );
    assert_eq!(
        got(list(Some("running"), Some("k1"), None), 100).await,
        ids(&["b2", "a"])
    );
    assert!(got(list(Some("failed"), None, None), 100).await.is_empty());
    assert_eq!(got(list(None, None, None), 2).await, ids(&["e", "d"]));
    // Keyset: strictly after (created_at, id), through a tie on created_at.
    assert_eq!(
        got(list(None, None, Some((NOW + 1, "b2"))), 100).await,
        ids(&["b1", "a"])
    );
    assert_eq!(
        got(list(Some("running"), None, Some((NOW + 3, "d"))), 1).await,
        ids(&["b2"])
    );
    // By definition name and by creation time: `from` inclusive, `to` exclusive.
    let named = |name: &str| SagaFilter {
        name: Some(name.to_owned()),
        ..SagaFilter::default()
    };
    assert_eq!(got(named("order"), 100).await.len(), 6);
    assert!(got(named("other"), 100).await.is_empty());
    let window = SagaFilter {
        created_from: Some(NOW + 1),
        created_before: Some(NOW + 3),
        ..SagaFilter::default()
    };
    assert_eq!(got(window.clone(), 100).await, ids(&["c", "b2", "b1"]));
    let running_in_window = SagaFilter {
        status: Some("running".into()),
        ..window
    };
    assert_eq!(got(running_in_window, 100).await, ids(&["b2"]));

    // status::list pages through all of them, `limit` at a time, and says when it is done.
    for (state, want) in [
        (None, ids(&["e", "d", "c", "b2", "b1", "a"])),
        (Some("running"), ids(&["d", "b2", "a"])),
    ] {
        let mut q = ListQuery {
            state: state.map(str::to_owned),
            limit: 2,
            ..ListQuery::default()
        };
        let mut seen = Vec::new();
        let mut sizes = Vec::new();
        loop {
            let page = status::list(&store, &q).await.unwrap();
            sizes.push(page.sagas.len());
            seen.extend(summary_ids(&page.sagas));
            match page.next {
                Some(next) => q.after = Some(next),
                None => break,
            }
            assert!(sizes.len() < 10, "paging does not end");
        }
        assert_eq!(seen, want, "state {state:?}");
        let full_pages = want.len() / 2;
        assert!(sizes[..full_pages].iter().all(|&n| n == 2), "{sizes:?}");
    }
    let bad = ListQuery {
        after: Some("not-a-cursor".into()),
        limit: 2,
        ..ListQuery::default()
    };
    match status::list(&store, &bad).await {
        Err(EngineError::Refused(why)) => assert!(why.contains("not-a-cursor"), "{why}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

async fn read_counts_by_status_and_latencies(store: Store) {
    with_definition(&store).await;
    // Older sagas, then this "run" from NOW + 100 on.
    insert_at(&store, "old-1", "k", NOW).await;
    insert_at(&store, "old-2", "k", NOW).await;
    move_to(&store, "old-1", 0, SagaStatus::Completed, NOW + 5).await;
    let run = NOW + 100;
    for (i, id) in ["r0", "r1", "r2", "r3", "r4", "r5"].iter().enumerate() {
        insert_at(&store, id, "k", run + i as i64).await;
    }
    // Start-to-final latencies 10, 20, 30 and 40 ms; r4 is running, r5 queued.
    move_to(&store, "r0", 0, SagaStatus::Completed, run + 10).await;
    move_to(&store, "r1", 0, compensated(), run + 1 + 40).await;
    move_to(&store, "r2", 0, failed(), run + 2 + 20).await;
    move_to(&store, "r3", 0, SagaStatus::Completed, run + 3 + 30).await;
    move_to(&store, "r4", 0, SagaStatus::Running, run + 50).await;

    let counts = |v: &[(&str, u64)]| -> BTreeMap<String, u64> {
        v.iter().map(|(k, n)| ((*k).to_owned(), *n)).collect()
    };
    assert_eq!(
        store.status_counts(None).await.unwrap(),
        counts(&[
            ("completed", 3),
            ("compensated", 1),
            ("failed", 1),
            ("queued", 2),
            ("running", 1)
        ])
    );
    assert_eq!(
        store.status_counts(Some(run)).await.unwrap(),
        counts(&[
            ("completed", 2),
            ("compensated", 1),
            ("failed", 1),
            ("queued", 1),
            ("running", 1)
        ])
    );
    assert!(
        store
            .status_counts(Some(run + 1_000))
            .await
            .unwrap()
            .is_empty()
    );
    // Failed is final: it waits for an operator, not for the engine.
    assert_eq!(store.unfinished_count().await.unwrap(), 3);
    let among = |ids: &[&str]| ids.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    let mut finished = store
        .finished_among(&among(&[
            "r0",
            "r1",
            "r2",
            "r3",
            "r4",
            "r5",
            "no-such-saga",
        ]))
        .await
        .unwrap();
    finished.sort();
    assert_eq!(finished, among(&["r0", "r1", "r2", "r3"]));
    assert_eq!(
        store.finished_among(&among(&["r4", "r5"])).await.unwrap(),
        Vec::<String>::new()
    );
    assert!(store.finished_among(&[]).await.unwrap().is_empty());

    let l = store
        .latencies(run, &[0.0, 0.5, 0.9, 0.99, 1.0])
        .await
        .unwrap();
    assert_eq!(l.finished, 4);
    // Nearest rank over [10, 20, 30, 40]: offsets 0, 2 (1.5 rounds up), 3, 3, 3.
    assert_eq!(l.at, vec![Some(10), Some(30), Some(40), Some(40), Some(40)]);
    let none = store.latencies(run + 1_000, &[0.5, 1.0]).await.unwrap();
    assert_eq!((none.finished, none.at), (0, vec![None, None]));

    let mut tx = store.begin().await.unwrap();
    tx.append_history(&[history("r0", "dispatch", "payment charge #1")], NOW)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(store.dispatched_since(NOW).await.unwrap(), 1);
    assert_eq!(store.dispatched_since(NOW + 1).await.unwrap(), 0);

    // Per minute: NOW is 20 s into its minute, so everything above is in that one; a saga
    // started a minute later finishes two minutes later.
    insert_at(&store, "late", "k2", NOW + 60_000).await;
    move_to(&store, "late", 0, SagaStatus::Completed, NOW + 120_000).await;
    let minute = NOW / 60_000 * 60_000;
    let minutes = store.per_minute(NOW - 30_000).await.unwrap();
    let got: Vec<(i64, u64, BTreeMap<String, u64>)> = minutes
        .iter()
        .map(|m| (m.at - minute, m.started, m.finished.clone()))
        .collect();
    assert_eq!(
        got,
        vec![
            (
                0,
                8,
                counts(&[("completed", 3), ("compensated", 1), ("failed", 1)])
            ),
            (60_000, 1, counts(&[])),
            (120_000, 0, counts(&[("completed", 1)])),
        ]
    );
    // Only what happened since: `late`'s start and end.
    let since = store.per_minute(NOW + 1_000).await.unwrap();
    assert_eq!(
        since
            .iter()
            .map(|m| (m.started, m.finished.values().sum::<u64>()))
            .collect::<Vec<_>>(),
        vec![(1, 0), (0, 1)]
    );
}

async fn read_definition_names_migrations_and_ping(store: Store) {
    store.ping().await.unwrap();
    assert!(store.definition_names(50).await.unwrap().is_empty());
    let mut tx = store.begin().await.unwrap();
    for (hash, name, version) in [
        ("h-r", "refund", 1),
        ("h-o1", "order", 1),
        ("h-o2", "order", 2),
        ("h-a", "audit", 1),
    ] {
        tx.put_definition(hash, name, version, "src", NOW)
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    assert_eq!(
        store.definition_names(50).await.unwrap(),
        ids(&["audit", "order", "refund"]),
        "distinct and sorted"
    );
    assert_eq!(
        store.definition_names(2).await.unwrap(),
        ids(&["audit", "order"])
    );

    let applied = store.applied_migrations().await.unwrap();
    let want: Vec<String> = ENGINE_MIGRATIONS
        .iter()
        .map(|(name, _, _)| (*name).to_owned())
        .collect();
    assert_eq!(applied, want);

    // A closed pool: a store error, not a panic.
    store.pool().close().await;
    match store.ping().await {
        Err(StoreError::Db(_)) => {}
        other => panic!("expected a database error, got {other:?}"),
    }
    assert!(store.saga_record("x").await.is_err());
}

/// Gives saga `id` rows in every table retention looks at: 3 history rows, 1 unsent outbox row
/// (2 more are sent, which takes them out), 1 timer.
async fn with_rows(store: &Store, id: &str) {
    let mut tx = store.begin().await.unwrap();
    // Three lines written by three batches: three timeline rows.
    for (kind, detail) in [("dispatch", "1"), ("reply", "2"), ("final", "3")] {
        tx.append_history(&[history(id, kind, detail)], NOW)
            .await
            .unwrap();
    }
    tx.enqueue_outbox(
        &[
            message(&format!("{id}/0/action/1"), "sent"),
            message(&format!("{id}/1/action/1"), "sent"),
            message(&format!("{id}/2/action/1"), "unsent"),
        ],
        NOW,
    )
    .await
    .unwrap();
    tx.set_timers(&[TimerRow {
        saga_id: id.to_owned(),
        ..timer(&format!("{id}/timer"), NOW + 1_000)
    }])
    .await
    .unwrap();
    tx.commit().await.unwrap();
    // Send what says so.
    let claimed = store.claim_outbox(NOW, 1_000, 100).await.unwrap();
    let sent: Vec<String> = claimed
        .iter()
        .filter(|c| c.message.payload == b"sent".to_vec())
        .map(|c| c.message.id.clone())
        .collect();
    store.delete_sent(&sent).await.unwrap();
    let unsent: Vec<String> = claimed
        .iter()
        .filter(|c| c.message.payload != b"sent".to_vec())
        .map(|c| c.message.id.clone())
        .collect();
    store.release_lease(&unsent).await.unwrap();
}

/// A saga's rows: [history, outbox (unsent: sent rows leave it), timers].
async fn rows_of(store: &Store, id: &str) -> [i64; 3] {
    let prefix = format!("{id}/%");
    [
        scalar(
            store,
            "SELECT COUNT(*) AS n FROM saga_history WHERE saga_id = $1",
            id,
        )
        .await,
        scalar(
            store,
            "SELECT COUNT(*) AS n FROM outbox WHERE message_id LIKE $1",
            &prefix,
        )
        .await,
        scalar(
            store,
            "SELECT COUNT(*) AS n FROM timers WHERE saga_id = $1",
            id,
        )
        .await,
    ]
}

async fn purged_at(store: &Store, id: &str) -> Option<i64> {
    sqlx::query("SELECT purged_at FROM sagas WHERE id = $1")
        .bind(id)
        .fetch_one(store.pool())
        .await
        .unwrap()
        .try_get("purged_at")
        .unwrap()
}

async fn retention_purges_only_old_cleanly_finished_sagas(store: Store) {
    with_definition(&store).await;
    let cutoff = NOW + 50_000;
    let now = NOW + 200_000;
    // "old-done2" starts with "old-done": its rows must not be taken for old-done's.
    for id in [
        "old-done",
        "old-comp",
        "old-failed",
        "old-done2",
        "running",
        "queued",
        "recent-done",
    ] {
        insert_at(&store, id, id, NOW).await;
        with_rows(&store, id).await;
    }
    move_to(&store, "old-done", 0, SagaStatus::Completed, NOW + 10).await;
    move_to(&store, "old-comp", 0, compensated(), NOW + 20).await;
    move_to(&store, "old-failed", 0, failed(), NOW + 30).await;
    move_to(&store, "running", 0, SagaStatus::Running, NOW + 40).await;
    move_to(&store, "recent-done", 0, SagaStatus::Completed, cutoff + 1).await;
    // Finished exactly at the cutoff: not older than it.
    move_to(&store, "old-done2", 0, SagaStatus::Completed, cutoff).await;

    let report = store.purge_finished(cutoff, now, 100, 100).await.unwrap();
    assert_eq!(
        report,
        PurgeReport {
            sagas: 2,
            history: 6,
            timers: 2,
        }
    );
    for id in ["old-done", "old-comp"] {
        assert_eq!(
            rows_of(&store, id).await,
            [0, 1, 0],
            "{id}: history and timers go; the unsent outbox row stays"
        );
        assert_eq!(purged_at(&store, id).await, Some(now), "{id}");
    }
    for id in [
        "old-failed",
        "old-done2",
        "running",
        "queued",
        "recent-done",
    ] {
        assert_eq!(rows_of(&store, id).await, [3, 1, 1], "{id} kept");
        assert_eq!(purged_at(&store, id).await, None, "{id}");
    }
    // The saga row stays: status still answers, with an empty timeline.
    let d = status::saga(&store, "old-done")
        .await
        .unwrap()
        .expect("old-done");
    assert_eq!(d.status, SagaStatus::Completed);
    assert!(d.timeline.is_empty());
    // Purged sagas are not looked at again: the next batch finds nothing.
    let again = store
        .purge_finished(cutoff, now + 1, 100, 100)
        .await
        .unwrap();
    assert!(again.is_empty(), "{again:?}");
    assert_eq!(purged_at(&store, "old-done").await, Some(now));
    // A later cutoff takes the ones that were too recent; Failed and unfinished never go.
    let later = store.purge_finished(now, now + 2, 100, 100).await.unwrap();
    assert_eq!(later.sagas, 2, "{later:?}");
    assert_eq!(rows_of(&store, "old-done2").await, [0, 1, 0]);
    assert_eq!(rows_of(&store, "recent-done").await, [0, 1, 0]);
    for id in ["old-failed", "running", "queued"] {
        assert_eq!(rows_of(&store, id).await, [3, 1, 1], "{id} kept");
    }
}

async fn retention_purges_in_batches_of_rows_and_sagas(store: Store) {
    with_definition(&store).await;
    let cutoff = NOW + 50_000;
    // Finished in this order: a, b, c.
    for (id, finished) in [("c", NOW + 30), ("a", NOW + 10), ("b", NOW + 20)] {
        insert_at(&store, id, id, NOW).await;
        with_rows(&store, id).await;
        move_to(&store, id, 0, SagaStatus::Completed, finished).await;
    }
    // Two sagas and two rows per table at a time: a and b first, oldest finish first.
    let mut reports = Vec::new();
    loop {
        let r = store
            .purge_finished(cutoff, NOW + 100_000, 2, 2)
            .await
            .unwrap();
        if r.is_empty() {
            break;
        }
        reports.push(r);
        assert!(reports.len() < 20, "the purge does not end: {reports:?}");
    }
    let r = |sagas, history, timers| PurgeReport {
        sagas,
        history,
        timers,
    };
    assert_eq!(
        reports,
        vec![
            // a and b: 6 history, 2 timers, 2 at a time.
            r(0, 2, 2),
            // History gave a full 2: there may be more, so a and b are not marked yet.
            r(0, 2, 0),
            r(0, 2, 0),
            // Every table gave fewer than 2: a and b are marked.
            r(2, 0, 0),
            // Then c alone, marked in the batch that took its last history row.
            r(0, 2, 1),
            r(1, 1, 0),
        ]
    );
    let mut total = PurgeReport::default();
    for report in &reports {
        total.add(report);
    }
    assert_eq!(total, r(3, 9, 3));
    assert_eq!(total.rows(), 12);
    for id in ["a", "b", "c"] {
        assert_eq!(rows_of(&store, id).await, [0, 1, 0], "{id}");
        assert!(purged_at(&store, id).await.is_some(), "{id}");
    }
}

fn history_row(saga: &str, kind: &str) -> HistoryRow {
    HistoryRow {
        saga_id: saga.into(),
        entry: HistoryEntry {
            kind: kind.into(),
            step: None,
            detail: format!("{kind} of {saga}"),
        },
    }
}

async fn kinds(store: &Store, saga: &str) -> Vec<String> {
    sqlx::query("SELECT kind FROM saga_history WHERE saga_id = $1 ORDER BY id")
        .bind(saga)
        .fetch_all(store.pool())
        .await
        .unwrap()
        .iter()
        .map(|r| r.try_get("kind").unwrap())
        .collect()
}

/// The ids of the timers there are, in id order.
async fn timer_ids(store: &Store) -> Vec<String> {
    sqlx::query("SELECT id FROM timers ORDER BY id")
        .fetch_all(store.pool())
        .await
        .unwrap()
        .iter()
        .map(|r| r.try_get("id").unwrap())
        .collect()
}

/// The apply path's one write (one statement on PostgreSQL): what the six table methods
/// write, in the same order.
async fn write_changes_writes_every_table_in_order(store: Store) {
    with_definition(&store).await;
    insert(&store, &[saga("s1", "k1", None), saga("s2", "k2", None)]).await;
    let mut tx = store.begin().await.unwrap();
    tx.set_timers(&[
        timer("t-old", NOW),
        timer("t-keep", NOW + 1),
        timer("t-moved", NOW),
    ])
    .await
    .unwrap();
    // Rows already sent (the relay hands their ids to the next write) and one not yet.
    tx.enqueue_outbox(
        &[
            message("m-sent-1", "p"),
            message("m-unsent", "p"),
            message("m-sent-2", "p"),
        ],
        NOW,
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let writes = [
        write("s1", 0, 2, state(SagaStatus::Running, 1)),
        write("s2", 0, 1, state(SagaStatus::Completed, 3)),
    ];
    // Sagas started by the batch go in as the batch left them: begun, or already final.
    let new_sagas = [
        NewSaga {
            state: state(SagaStatus::Running, 4),
            version: 1,
            ..saga("n1", "k3", Some("idem-n1"))
        },
        NewSaga {
            state: state(SagaStatus::Completed, 5),
            version: 3,
            ..saga("n2", "k4", None)
        },
    ];
    let history = [
        history_row("s1", "z-first"),
        history_row("s2", "only"),
        history_row("s1", "a-second"),
    ];
    let outbox = [message("m-9", "p9"), message("m-1", "p1")];
    let timers = [timer("t-new", NOW + 100), timer("t-moved", NOW + 200)];
    let mut tx = store.begin().await.unwrap();
    let before = store.counters().statements();
    tx.write_changes(
        &Changes {
            cancelled_timers: &ids(&["t-old", "t-never-was"]),
            new_sagas: &new_sagas,
            sagas: &writes,
            history: &history,
            outbox: &outbox,
            timers: &timers,
            sent: &ids(&["m-sent-1", "m-sent-2", "m-gone-already"]),
        },
        NOW + 7,
    )
    .await
    .unwrap();
    assert_eq!(
        store.counters().statements(),
        before + 1,
        "every part in one statement (PostgreSQL) or one call (SQLite)"
    );
    tx.commit().await.unwrap();
    assert_eq!(timer_ids(&store).await, ["t-keep", "t-moved", "t-new"]);
    let due: i64 = sqlx::query_scalar("SELECT due_at FROM timers WHERE id = 't-moved'")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(due, NOW + 200, "a timer set again moves");

    let s1 = load(&store, "s1").await;
    assert_eq!((s1.version, s1.finished_at), (2, None));
    assert_eq!(s1.state, state(SagaStatus::Running, 1));
    let s2 = load(&store, "s2").await;
    assert_eq!((s2.version, s2.finished_at), (1, Some(NOW + 7)));
    let n1 = load(&store, "n1").await;
    assert_eq!((n1.version, n1.finished_at), (1, None));
    assert_eq!(n1.state, state(SagaStatus::Running, 4));
    assert_eq!((n1.created_at, n1.sequence_key.as_str()), (NOW + 7, "k3"));
    let n2 = load(&store, "n2").await;
    assert_eq!((n2.version, n2.finished_at), (3, Some(NOW + 7)));
    assert_eq!(n2.state, state(SagaStatus::Completed, 5));
    assert_eq!(by_idempotency_key(&store, "idem-n1").await, "n1");
    let statuses: Vec<(String, String)> =
        sqlx::query("SELECT id, status FROM sagas WHERE id IN ('n1', 'n2') ORDER BY id")
            .fetch_all(store.pool())
            .await
            .unwrap()
            .iter()
            .map(|r| (r.try_get("id").unwrap(), r.try_get("status").unwrap()))
            .collect();
    assert_eq!(
        statuses,
        [
            ("n1".into(), "running".into()),
            ("n2".into(), "completed".into())
        ]
    );
    assert_eq!(kinds(&store, "s1").await, ["z-first", "a-second"]);
    assert_eq!(kinds(&store, "s2").await, ["only"]);
    let queued = queued_messages(&store).await;
    assert_eq!(
        queued,
        ["m-unsent", "m-9", "m-1"],
        "the sent rows deleted, the new ones queued in slice order"
    );

    // Nothing to write is no statement at all.
    let before = store.counters().statements();
    let mut tx = store.begin().await.unwrap();
    tx.write_changes(&Changes::default(), NOW + 8)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(store.counters().statements(), before);
}

/// Values that an array literal (PostgreSQL's write) or a placeholder (SQLite's) could bend:
/// quotes, backslashes, braces, commas, the word NULL, an empty text, line breaks, non-ASCII.
async fn write_changes_keeps_every_character(store: Store) {
    with_definition(&store).await;
    let odd = [
        r#"{"a": "b \"c\" \\ d", "e": [1, 2]}"#,
        "NULL",
        "",
        "line one\nline\ttwo, {three}",
        "ünïcødé ✓ \\\"",
    ];
    let outbox: Vec<OutboxMessage> = odd
        .iter()
        .enumerate()
        .map(|(i, p)| message(&format!("m,{i} \"x\""), p))
        .collect();
    let new_sagas = [
        NewSaga {
            version: 1,
            ..saga("n \"1\"", "key, {1}", Some("idem \\ \"NULL\""))
        },
        NewSaga {
            version: 1,
            ..saga("n2", "NULL", None)
        },
    ];
    let history: Vec<HistoryRow> = odd.iter().map(|k| history_row("n2", k)).collect();
    let timers = [timer("t \"1\", {x}", NOW + 5)];
    let mut tx = store.begin().await.unwrap();
    tx.write_changes(
        &Changes {
            new_sagas: &new_sagas,
            history: &history,
            outbox: &outbox,
            timers: &timers,
            ..Changes::default()
        },
        NOW,
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();

    let queued = outbox_ids(&store).await;
    let got: Vec<(String, String)> = queued.into_iter().map(|(_, m, p)| (m, p)).collect();
    let want: Vec<(String, String)> = outbox
        .iter()
        .map(|m| (m.message_id.clone(), m.payload.clone()))
        .collect();
    assert_eq!(got, want, "every payload as it was, in slice order");
    let n1 = load(&store, "n \"1\"").await;
    assert_eq!(n1.sequence_key, "key, {1}");
    let n2 = load(&store, "n2").await;
    assert_eq!(n2.sequence_key, "NULL");
    assert_eq!(
        by_idempotency_key(&store, "idem \\ \"NULL\"").await,
        "n \"1\""
    );
    let unkeyed: Option<String> =
        sqlx::query_scalar("SELECT idempotency_key FROM sagas WHERE id = 'n2'")
            .fetch_one(store.pool())
            .await
            .unwrap();
    assert_eq!(unkeyed, None, "no key is NULL, not the text NULL");
    assert_eq!(kinds(&store, "n2").await, odd);
    assert_eq!(timer_ids(&store).await, ["t \"1\", {x}"]);
}

async fn write_changes_with_a_stale_saga_writes_nothing(store: Store) {
    with_definition(&store).await;
    insert(
        &store,
        &[saga("fresh", "k1", None), saga("stale", "k2", None)],
    )
    .await;
    update(&store, "stale", 0, 2, state(SagaStatus::Running, 1)).await;
    let mut tx = store.begin().await.unwrap();
    tx.set_timers(&[timer("t-cancel", NOW)]).await.unwrap();
    tx.enqueue_outbox(&[message("m-sent", "p")], NOW)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let writes = [
        write("fresh", 0, 1, state(SagaStatus::Running, 50)),
        write("stale", 0, 1, state(SagaStatus::Running, 51)),
    ];
    let history = [history_row("fresh", "moved")];
    let outbox = [message("m-x", "p")];
    let mut tx = store.begin().await.unwrap();
    let err = tx
        .write_changes(
            &Changes {
                cancelled_timers: &ids(&["t-cancel"]),
                new_sagas: &[saga("newborn", "k9", None)],
                sagas: &writes,
                history: &history,
                outbox: &outbox,
                timers: &[timer("t-set", NOW + 9)],
                sent: &ids(&["m-sent"]),
            },
            NOW + 5,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "got {err:?}");
    tx.rollback().await.unwrap();
    assert_eq!(load(&store, "fresh").await.version, 0);
    assert_eq!(load(&store, "stale").await.version, 2);
    assert!(kinds(&store, "fresh").await.is_empty());
    let queued = queued_messages(&store).await;
    assert_eq!(
        queued,
        ["m-sent"],
        "nothing queued, the sent row not deleted"
    );
    assert_eq!(timer_ids(&store).await, ["t-cancel"], "timers as they were");
    let mut tx = store.begin().await.unwrap();
    assert!(tx.load_sagas(&ids(&["newborn"])).await.unwrap().is_empty());
    tx.rollback().await.unwrap();
}

/// A batch with more values than one statement takes is written a table at a time, with the
/// same rows and the same version check.
async fn write_changes_larger_than_one_statement_goes_table_by_table(store: Store) {
    with_definition(&store).await;
    insert(&store, &[saga("s1", "k1", None)]).await;
    // 4 values a timer: 7,501 timers are more than MAX_PARAMS (30,000).
    let timers: Vec<TimerRow> = (0..7_501)
        .map(|i| timer(&format!("t-{i:05}"), NOW + i))
        .collect();
    let writes = [write("s1", 0, 1, state(SagaStatus::Running, 9))];
    let history = [history_row("s1", "moved")];
    let mut tx = store.begin().await.unwrap();
    let before = store.counters().statements();
    tx.write_changes(
        &Changes {
            sagas: &writes,
            history: &history,
            timers: &timers,
            ..Changes::default()
        },
        NOW + 1,
    )
    .await
    .unwrap();
    assert_eq!(
        store.counters().statements() - before,
        4,
        "sagas and timeline one statement each, the timers two of at most MAX_PARAMS values"
    );
    tx.commit().await.unwrap();
    assert_eq!(timer_ids(&store).await.len(), 7_501);
    assert_eq!(load(&store, "s1").await.version, 1);
    assert_eq!(kinds(&store, "s1").await, ["moved"]);

    // The version check holds there too: s1 is at 1 now, not 0.
    let mut tx = store.begin().await.unwrap();
    let err = tx
        .write_changes(
            &Changes {
                sagas: &writes,
                timers: &timers,
                ..Changes::default()
            },
            NOW + 2,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "got {err:?}");
    tx.rollback().await.unwrap();
}

/// Two processes opening one fresh SQLite file at once (`sagaflow dev` and a `sagaflow list`
/// beside it) both migrate it: they take turns, and neither applies a migration the other
/// applied (seen: `duplicate column name: purged_at` from migration 0002).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_stores_migrating_one_fresh_sqlite_file_take_turns() {
    for round in 0..12 {
        let dir = std::env::temp_dir().join(format!(
            "sagaflow-conf-migrate-race-{}-{round}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let guard = Guard::Dir(dir.clone());
        let url = format!("sqlite://{}?mode=rwc", dir.join("test.db").display());
        let a = Store::connect(&url, 1).await.expect("open SQLite");
        let b = Store::connect(&url, 1).await.expect("open SQLite again");
        let (ra, rb) = tokio::join!(
            a.migrate(&[ENGINE_MIGRATIONS]),
            b.migrate(&[ENGINE_MIGRATIONS])
        );
        ra.expect("the first store migrates");
        rb.expect("the second store migrates");
        let mut all: Vec<String> = ENGINE_MIGRATIONS
            .iter()
            .map(|(name, ..)| (*name).to_owned())
            .collect();
        all.sort();
        assert_eq!(a.applied_migrations().await.expect("applied"), all);
        a.pool().close().await;
        b.pool().close().await;
        drop(guard);
    }
}

/// `0011_status_check_without_list` rebuilds `sagas` on SQLite with its status CHECK spelled
/// without an `IN` list: the rows and every index stay (retention's look-up still names
/// `sagas_to_purge`), every status is admitted and any other refused, and no list is left.
#[tokio::test]
async fn sqlite_sagas_rebuilt_without_a_status_list_keep_rows_and_indexes() {
    let (last, ..) = ENGINE_MIGRATIONS[ENGINE_MIGRATIONS.len() - 1];
    assert_eq!(last, "0011_status_check_without_list");
    let dir = std::env::temp_dir().join(format!(
        "sagaflow-conf-status-check-{}-{:08x}",
        std::process::id(),
        fastrand::u32(..)
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let guard = Guard::Dir(dir.clone());
    let url = format!("sqlite://{}?mode=rwc", dir.join("test.db").display());
    let store = Store::connect(&url, 1).await.expect("open SQLite");
    store
        .migrate(&[&ENGINE_MIGRATIONS[..ENGINE_MIGRATIONS.len() - 1]])
        .await
        .expect("the migrations before");
    let run = |sql: String| {
        let pool = store.pool().clone();
        async move {
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                .execute(&pool)
                .await
                .map(|_| ())
        }
    };
    let saga = |id: &str, status: &str, key: &str, finished: &str| {
        format!(
            "INSERT INTO sagas (id, name, definition_hash, sequence_key, status, state, version, \
             idempotency_key, created_at, updated_at, finished_at, purged_at) VALUES ('{id}', \
             'order', 'h1', 'o-{id}', '{status}', '{{}}', 3, {key}, 10, 20, {finished}, NULL)"
        )
    };
    run(
        "INSERT INTO saga_definitions (hash, name, version, source, created_at) \
         VALUES ('h1', 'order', 1, 'name: order', 1)"
            .to_owned(),
    )
    .await
    .expect("a definition");
    run(saga("s1", "running", "'k1'", "NULL"))
        .await
        .expect("a running saga");
    run(saga("s2", "completed", "NULL", "30"))
        .await
        .expect("a finished saga");
    let snapshot = || sagaflow_engine::store::sqlite_table_snapshot(store.pool(), "sagas");
    let before = snapshot().await.expect("the table before");

    store
        .migrate(&[ENGINE_MIGRATIONS])
        .await
        .expect("the rebuild");

    // Every column, index, foreign key and row as it was (the CHECK is in the table's SQL).
    assert_eq!(snapshot().await.expect("the table after"), before);
    assert!(
        before.iter().any(|l| l.starts_with("row 's2'")),
        "{before:?}"
    );

    // id, status, version, idempotency key, finished at.
    type Kept = (String, String, i64, Option<String>, Option<i64>);
    let rows: Vec<Kept> = sqlx::query_as(
        "SELECT id, status, version, idempotency_key, finished_at FROM sagas ORDER BY id",
    )
    .fetch_all(store.pool())
    .await
    .expect("rows");
    assert_eq!(
        rows,
        [
            ("s1".into(), "running".into(), 3, Some("k1".into()), None),
            ("s2".into(), "completed".into(), 3, None, Some(30)),
        ]
    );
    let mut indexes: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'sagas'",
    )
    .fetch_all(store.pool())
    .await
    .expect("indexes");
    indexes.sort();
    assert_eq!(
        indexes,
        [
            "sagas_by_key",
            "sagas_by_status",
            "sagas_to_purge",
            "sagas_unfinished",
            // The primary key's and the idempotency key's.
            "sqlite_autoindex_sagas_1",
            "sqlite_autoindex_sagas_2",
        ]
    );
    let purgeable: Vec<String> =
        sqlx::query_scalar(sagaflow_engine::store::sql::SQLITE.purge_candidates)
            .bind(100_i64)
            .bind(10_i64)
            .fetch_all(store.pool())
            .await
            .expect("retention's look-up, by its named index");
    assert_eq!(purgeable, ["s2"]);
    // Every status the machine names.
    for (i, status) in SagaStatus::NAMES.iter().enumerate() {
        run(saga(&format!("n{i}"), status, "NULL", "NULL"))
            .await
            .unwrap_or_else(|e| panic!("{status} refused: {e}"));
    }
    let refused = run(saga("bad", "bogus", "NULL", "NULL"))
        .await
        .expect_err("an unknown status");
    assert!(refused.to_string().contains("CHECK"), "{refused}");
    let duplicate = run(saga("dup", "running", "'k1'", "NULL"))
        .await
        .expect_err("an idempotency key twice");
    assert!(duplicate.to_string().contains("UNIQUE"), "{duplicate}");
    let table: String =
        sqlx::query_scalar("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'sagas'")
            .fetch_one(store.pool())
            .await
            .expect("the table");
    assert!(!table.contains(" IN ("), "{table}");
    store.pool().close().await;
    drop(guard);
}

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

use sagaflow_engine::machine::TimerKind;
use sagaflow_engine::machine::{Event, HistoryEntry, Op, SagaState, SagaStatus, StepStatus};
use sagaflow_engine::store::outbox::Claimed;
use sagaflow_engine::store::{
    DefinitionTable, ENGINE_MIGRATIONS, HistoryRow, HistoryTable, InboxTable, NewSaga,
    OutboxMessage, OutboxTable, SagaTable, SagaWrite, SequenceKeyTable, StepRow, StepTable, Store,
    StoreError, StoreTx, TimerRow, TimerTable,
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
        Backend::Postgres => {
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
            let store = Store::connect(&format!("{server}/{name}"), 2)
                .await
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
    store.pool().close().await;
    drop(guard);
}

/// Each case twice: `sqlite::<case>` and `postgres::<case>`.
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
    };
}

conformance!(
    empty_batches_are_free_no_ops,
    sagas_round_trip_at_version_zero,
    update_moves_version_by_changes,
    stale_version_conflicts_and_rolls_back,
    one_stale_saga_fails_the_whole_update,
    idempotency_keys_find_and_stay_unique,
    inbox_returns_only_new_messages,
    history_keeps_slice_order,
    steps_upsert_by_saga_and_index,
    outbox_keeps_order_and_first_copy,
    outbox_claim_leases_rows,
    outbox_sent_rows_are_never_claimed,
    outbox_released_rows_are_claimable_at_once,
    outbox_claims_split_without_overlap,
    timers_claim_once_cancel_and_order,
    keys_one_call_first_holds_second_queues,
    keys_held_earlier_queue_the_newcomer,
    keys_release_hands_over_in_arrival_order,
    keys_release_by_waiter_leaves_the_queue,
    keys_release_without_waiters_frees_the_key,
    keys_different_keys_both_hold,
    batches_cost_one_statement_whatever_their_size,
    definitions_are_idempotent_and_latest_is_highest,
);

// ---------------------------------------------------------------------------------------------
// Helpers

fn state(status: SagaStatus, n: u64) -> SagaState {
    SagaState {
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

async fn load(store: &Store, id: &str) -> sagaflow_engine::store::SagaRow {
    let mut tx = store.begin().await.unwrap();
    let mut rows = tx.load_sagas(&ids(&[id])).await.unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(rows.len(), 1, "saga {id} not found");
    rows.remove(0)
}

async fn update(store: &Store, id: &str, expected: i64, changes: i64, st: SagaState) {
    let mut tx = store.begin().await.unwrap();
    tx.update_sagas(
        &[SagaWrite {
            id: id.to_owned(),
            expected_version: expected,
            changes,
            state: st,
        }],
        NOW + 1,
    )
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
    tx.upsert_steps(&[], NOW).await.unwrap();
    tx.append_history(&[], NOW).await.unwrap();
    assert!(tx.record_inbox(&[], NOW).await.unwrap().is_empty());
    tx.enqueue_outbox(&[], NOW).await.unwrap();
    assert!(tx.claim_timers(&[]).await.unwrap().is_empty());
    tx.set_timers(&[]).await.unwrap();
    tx.cancel_timers(&[]).await.unwrap();
    assert!(tx.acquire_keys(&[]).await.unwrap().is_empty());
    assert!(tx.release_keys(&[]).await.unwrap().is_empty());
    tx.commit().await.unwrap();
    store.mark_sent(&[], NOW).await.unwrap();
    store.release_lease(&[]).await.unwrap();
    assert_eq!(
        store.counters().statements(),
        before,
        "an empty batch sent a statement"
    );
    // And nothing was written.
    for table in [
        "sagas",
        "saga_steps",
        "saga_history",
        "inbox",
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
        assert_eq!(got.finished_at, None);
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
            &[SagaWrite {
                id: "s1".into(),
                expected_version: 0,
                changes: 1,
                state: state(SagaStatus::Completed, 99),
            }],
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
                SagaWrite {
                    id: "fresh".into(),
                    expected_version: 0,
                    changes: 1,
                    state: state(SagaStatus::Running, 50),
                },
                SagaWrite {
                    id: "stale".into(),
                    expected_version: 0,
                    changes: 1,
                    state: state(SagaStatus::Running, 51),
                },
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

async fn inbox_returns_only_new_messages(store: Store) {
    let mut tx = store.begin().await.unwrap();
    let fresh = tx
        .record_inbox(&pairs(&[("m1", "s1"), ("m2", "s1")]), NOW)
        .await
        .unwrap();
    assert_eq!(fresh, set(&["m1", "m2"]));
    tx.commit().await.unwrap();

    let mut tx = store.begin().await.unwrap();
    let fresh = tx
        .record_inbox(&pairs(&[("m2", "s1"), ("m3", "s2"), ("m3", "s2")]), NOW)
        .await
        .unwrap();
    assert_eq!(fresh, set(&["m3"]), "m2 is an inbox hit; m3 is new once");
    tx.commit().await.unwrap();

    let rows: Vec<(String, String)> =
        sqlx::query("SELECT message_id, saga_id FROM inbox ORDER BY message_id")
            .fetch_all(store.pool())
            .await
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r.try_get("message_id").unwrap(),
                    r.try_get("saga_id").unwrap(),
                )
            })
            .collect();
    assert_eq!(rows, pairs(&[("m1", "s1"), ("m2", "s1"), ("m3", "s2")]));
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

async fn steps_upsert_by_saga_and_index(store: Store) {
    let row = |i: usize, status: &str, attempts: u32, err: Option<&str>| StepRow {
        saga_id: "s1".into(),
        index: i,
        step_id: format!("step-{i}"),
        status: status.into(),
        attempts,
        last_error: err.map(str::to_owned),
    };
    let mut tx = store.begin().await.unwrap();
    tx.upsert_steps(
        &[
            row(0, "action: running", 1, None),
            row(1, "pending", 0, None),
        ],
        NOW,
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let mut tx = store.begin().await.unwrap();
    tx.upsert_steps(&[row(0, "failed", 2, Some("boom"))], NOW + 1)
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let got: Vec<(i64, String, String, i64, Option<String>, i64)> = sqlx::query(
        "SELECT step_index, step_id, status, attempts, last_error, updated_at FROM saga_steps \
         WHERE saga_id = $1 ORDER BY step_index",
    )
    .bind("s1")
    .fetch_all(store.pool())
    .await
    .unwrap()
    .iter()
    .map(|r| {
        (
            r.try_get("step_index").unwrap(),
            r.try_get("step_id").unwrap(),
            r.try_get("status").unwrap(),
            r.try_get("attempts").unwrap(),
            r.try_get("last_error").unwrap(),
            r.try_get("updated_at").unwrap(),
        )
    })
    .collect();
    assert_eq!(
        got,
        vec![
            (
                0,
                "step-0".into(),
                "failed".into(),
                2,
                Some("boom".into()),
                NOW + 1
            ),
            (1, "step-1".into(), "pending".into(), 0, None, NOW),
        ]
    );
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
    let ids_in_order: Vec<i64> = first.iter().map(|c| c.id).collect();
    assert_eq!(
        ids_in_order,
        rows.iter().map(|r| r.0).collect::<Vec<_>>(),
        "claimed ids are the rows' ids"
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
        .mark_sent(&[claimed[0].id, claimed[2].id], NOW + 1)
        .await
        .unwrap();
    let later = store
        .claim_outbox(NOW + 1_000_000, 1_000, 10)
        .await
        .unwrap();
    assert_eq!(claimed_ids(&later), ids(&["b"]));
    store.mark_sent(&[later[0].id], NOW + 2).await.unwrap();
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
        .release_lease(&[claimed[0].id, claimed[2].id])
        .await
        .unwrap();
    let again = store.claim_outbox(NOW, 60_000, 10).await.unwrap();
    assert_eq!(
        claimed_ids(&again),
        ids(&["a", "c"]),
        "released rows at once, the leased one not"
    );
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
            .map(|i| SagaWrite {
                id: format!("{prefix}-{i}"),
                expected_version: 0,
                changes: 1,
                state: state(SagaStatus::Running, i as u64),
            })
            .collect()
    };
    let one = cost!(tx.update_sagas(&writes("one", 1), NOW));
    let many = cost!(tx.update_sagas(&writes("many", 50), NOW));
    costs.push(("update_sagas", one, many));

    let inbox = |prefix: &str, n: usize| -> Vec<(String, String)> {
        (0..n)
            .map(|i| (format!("{prefix}-m{i}"), format!("{prefix}-{i}")))
            .collect()
    };
    let one = cost!(tx.record_inbox(&inbox("one", 1), NOW));
    let many = cost!(tx.record_inbox(&inbox("many", 50), NOW));
    costs.push(("record_inbox", one, many));

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
        ("SELECT COUNT(*) AS n FROM inbox", 51),
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

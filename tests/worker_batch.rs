//! Batched workers, on SQLite and PostgreSQL: a lane's batch of commands is one database
//! transaction with a savepoint per handler. Duplicates inside a batch have one effect; a
//! business failure, a transient failure or a database error inside a handler rolls back only
//! that command; an undo before its forward operation in the same batch is a null undo and the
//! forward is refused; a batch whose commit fails is run again command by command; per-key
//! order holds across batches; weak and barrier commands share a batch and keep their promises;
//! concurrent duplicates in two workers' batches (PostgreSQL) have one effect (the
//! conflict-and-redo path).

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sagaflow_engine::machine::{Op, Outcome};
use sagaflow_engine::store::{ENGINE_MIGRATIONS, Store};
use sagaflow_engine::transport::memory::MemoryTransport;
use sagaflow_engine::transport::{Message, REPLY_QUEUE, Transport, command_queue};
use sagaflow_engine::wire::{CommandMsg, ReplyMsg};
use sagaflow_workers::barrier::{BatchRun, Handler, Job, execute_batch};
use sagaflow_workers::runtime::Idempotency;
use sagaflow_workers::runtime::Worker;
use sagaflow_workers::sdk::{SagaStep, StepContext, StepError};
use sagaflow_workers::services::{self, payment};
use sagaflow_workers::weak::WeakIdempotency;
use serde_json::{Value, json};
use sqlx::{AnyConnection, Row};

async fn store(url: &str) -> Store {
    let store = Store::connect(url, 4).await.expect("connect");
    store
        .migrate(&[ENGINE_MIGRATIONS, services::MIGRATIONS])
        .await
        .expect("migrate");
    let mut tx = store.pool().begin().await.unwrap();
    payment::seed(&mut tx, &[("alice".to_owned(), 10_000)])
        .await
        .unwrap();
    sqlx::query("CREATE TABLE batch_counter (id TEXT PRIMARY KEY, n BIGINT NOT NULL)")
        .execute(&mut *tx)
        .await
        .unwrap();
    for id in ["a", "b", "c", "d", "e", "taken"] {
        sqlx::query("INSERT INTO batch_counter (id, n) VALUES ($1, 0)")
            .bind(id)
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    store
}

/// One command of a test batch.
struct Cmd {
    ctx: StepContext,
    op: Op,
    params: Value,
}

fn cmd(saga: &str, op: Op, params: Value) -> Cmd {
    Cmd {
        ctx: StepContext {
            saga_id: saga.into(),
            step: "step".into(),
            operation: op.as_str().into(),
            attempt: 1,
            key: format!("order-{saga}"),
        },
        op,
        params,
    }
}

/// The batch's jobs, behind the barrier (`barrier`) or not (weak mode's).
fn jobs_of<'a>(handler: &'a Handler, cmds: &'a [Cmd], barrier: bool) -> Vec<Job<'a>> {
    cmds.iter()
        .map(|c| Job {
            handler,
            op: c.op,
            ctx: &c.ctx,
            params: &c.params,
            barrier,
        })
        .collect()
}

async fn batch(store: &Store, handler: &Handler, cmds: &[Cmd]) -> BatchRun {
    execute_batch(store.pool(), &jobs_of(handler, cmds, true)).await
}

fn outcomes(run: &BatchRun) -> Vec<Outcome> {
    run.results
        .iter()
        .map(|r| r.as_ref().expect("answered").outcome.clone())
        .collect()
}

fn business_code(o: &Outcome) -> &str {
    match o {
        Outcome::Business { code, .. } => code,
        other => panic!("expected a business failure, got {other:?}"),
    }
}

async fn balance(store: &Store) -> i64 {
    sqlx::query_scalar("SELECT balance FROM payment_accounts WHERE account = 'alice'")
        .fetch_one(store.pool())
        .await
        .unwrap()
}

async fn counter(store: &Store, id: &str) -> i64 {
    sqlx::query_scalar("SELECT n FROM batch_counter WHERE id = $1")
        .bind(id)
        .fetch_one(store.pool())
        .await
        .unwrap()
}

/// The recorded barrier outcome of (saga, "step", op), if any.
async fn recorded(store: &Store, saga: &str, op: Op) -> Option<Outcome> {
    let row = sqlx::query("SELECT outcome FROM barrier WHERE saga_id = $1 AND op = $2")
        .bind(saga)
        .bind(op.as_str())
        .fetch_optional(store.pool())
        .await
        .unwrap()?;
    let text: String = row.try_get("outcome").unwrap();
    Some(serde_json::from_str(&text).unwrap())
}

async fn barrier_rows(store: &Store) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM barrier")
        .fetch_one(store.pool())
        .await
        .unwrap()
}

fn charge(amount: &str) -> Value {
    json!({"account": "alice", "amount": amount, "order_id": "o-1"})
}

/// Adds one to `batch_counter[params.id]`, then fails as `params.fail` says (after its write,
/// so a failure proves that its write was rolled back): `business`, `retryable`, or `db` (an
/// insert that violates the primary key, not caught). Counts its calls per saga and may sleep
/// first.
#[derive(Clone, Default)]
struct Bump {
    calls: Arc<Mutex<HashMap<String, u64>>>,
    delay: Duration,
}

impl Bump {
    fn calls(&self, saga: &str) -> u64 {
        self.calls.lock().unwrap().get(saga).copied().unwrap_or(0)
    }
}

#[async_trait::async_trait]
impl SagaStep for Bump {
    async fn action(
        &self,
        conn: &mut AnyConnection,
        ctx: &StepContext,
        params: &Value,
    ) -> Result<Value, StepError> {
        *self
            .calls
            .lock()
            .unwrap()
            .entry(ctx.saga_id.clone())
            .or_default() += 1;
        tokio::time::sleep(self.delay).await;
        let id = params["id"].as_str().unwrap_or_default();
        sqlx::query("UPDATE batch_counter SET n = n + 1 WHERE id = $1")
            .bind(id)
            .execute(&mut *conn)
            .await?;
        match params["fail"].as_str() {
            Some("business") => return Err(StepError::business("no", "refused")),
            Some("retryable") => return Err(StepError::retryable("busy")),
            Some("db") => {
                sqlx::query("INSERT INTO batch_counter (id, n) VALUES ('taken', 0)")
                    .execute(&mut *conn)
                    .await?;
            }
            _ => {}
        }
        let n: i64 = sqlx::query_scalar("SELECT n FROM batch_counter WHERE id = $1")
            .bind(id)
            .fetch_one(&mut *conn)
            .await?;
        Ok(json!({ "n": n, "nonce": fastrand::u64(..) }))
    }

    async fn compensate(
        &self,
        conn: &mut AnyConnection,
        ctx: &StepContext,
        params: &Value,
    ) -> Result<Value, StepError> {
        *self
            .calls
            .lock()
            .unwrap()
            .entry(format!("{}/undo", ctx.saga_id))
            .or_default() += 1;
        sqlx::query("UPDATE batch_counter SET n = n - 1 WHERE id = $1")
            .bind(params["id"].as_str().unwrap_or_default())
            .execute(&mut *conn)
            .await?;
        Ok(Value::Null)
    }
}

on_both_backends!(
    duplicates_inside_one_batch_have_one_effect,
    |url: String| async move {
        let store = store(&url).await;
        let h = Handler::Saga(Arc::new(payment::Charge));
        let run = batch(
            &store,
            &h,
            &[
                cmd("s-1", Op::Action, charge("30.00")),
                cmd("s-1", Op::Action, charge("30.00")),
                cmd("s-1", Op::Action, charge("30.00")),
            ],
        )
        .await;
        assert_eq!(run.commits, 1, "one transaction");
        let got = outcomes(&run);
        assert!(matches!(got[0], Outcome::Ok { .. }), "{got:?}");
        assert_eq!(got[1], got[0]);
        assert_eq!(got[2], got[0]);
        let dup: Vec<bool> = run
            .results
            .iter()
            .map(|r| r.as_ref().unwrap().duplicate)
            .collect();
        assert_eq!(dup, [false, true, true]);
        assert_eq!(balance(&store).await, 10_000 - 3_000, "one charge");
        assert_eq!(barrier_rows(&store).await, 1);
        assert_eq!(
            recorded(&store, "s-1", Op::Action).await,
            Some(got[0].clone())
        );
    }
);

on_both_backends!(
    a_business_failure_rolls_back_only_its_own_command,
    |url: String| async move {
        let store = store(&url).await;
        let bump = Bump::default();
        let h = Handler::Saga(Arc::new(bump.clone()));
        let run = batch(
            &store,
            &h,
            &[
                cmd("s-a", Op::Action, json!({"id": "a"})),
                cmd("s-b", Op::Action, json!({"id": "b", "fail": "business"})),
                cmd("s-c", Op::Action, json!({"id": "c"})),
            ],
        )
        .await;
        assert_eq!(run.commits, 1);
        let got = outcomes(&run);
        assert!(matches!(got[0], Outcome::Ok { .. }), "{got:?}");
        assert_eq!(business_code(&got[1]), "no");
        assert!(matches!(got[2], Outcome::Ok { .. }), "{got:?}");
        assert_eq!(counter(&store, "a").await, 1);
        assert_eq!(counter(&store, "b").await, 0, "its write was rolled back");
        assert_eq!(counter(&store, "c").await, 1);
        // The "no" is durable: a later duplicate gets it without running the handler.
        assert_eq!(
            recorded(&store, "s-b", Op::Action).await,
            Some(got[1].clone())
        );
        // The batch was first tried without savepoints; b's failure gave that try up and
        // the batch ran again with a savepoint per handler, b answered from its one run
        // without a second: a's handler ran twice, b's once.
        assert_eq!(run.abandoned, 1);
        assert_eq!(bump.calls("s-a"), 2);
        assert_eq!(bump.calls("s-b"), 1);
        assert_eq!(bump.calls("s-c"), 1);
        let again = batch(&store, &h, &[cmd("s-b", Op::Action, json!({"id": "b"}))]).await;
        assert_eq!(outcomes(&again), [got[1].clone()]);
        assert_eq!(bump.calls("s-b"), 1, "the duplicate did not run it");
        assert_eq!(barrier_rows(&store).await, 3);
    }
);

on_both_backends!(
    a_lone_command_refused_is_rolled_back_and_recorded,
    |url: String| async move {
        let store = store(&url).await;
        let bump = Bump::default();
        let h = Handler::Saga(Arc::new(bump.clone()));
        let run = batch(
            &store,
            &h,
            &[cmd(
                "s-1",
                Op::Action,
                json!({"id": "a", "fail": "business"}),
            )],
        )
        .await;
        assert_eq!(run.commits, 1);
        let got = outcomes(&run);
        assert_eq!(business_code(&got[0]), "no");
        // Tried without a savepoint; the refusal gave that try up, and the redo answered and
        // recorded the refusal without running the handler again: one run, its answer.
        assert_eq!(run.abandoned, 1);
        assert_eq!(bump.calls("s-1"), 1);
        assert_eq!(counter(&store, "a").await, 0, "its write was rolled back");
        assert_eq!(
            recorded(&store, "s-1", Op::Action).await,
            Some(got[0].clone())
        );
        assert_eq!(barrier_rows(&store).await, 1);
        // A lone transient failure: rolled back, answered from its one run, not recorded.
        let run = batch(
            &store,
            &h,
            &[cmd(
                "s-2",
                Op::Action,
                json!({"id": "b", "fail": "retryable"}),
            )],
        )
        .await;
        assert!(
            matches!(outcomes(&run)[..], [Outcome::Retryable { .. }]),
            "{run:?}"
        );
        assert_eq!(bump.calls("s-2"), 1);
        assert_eq!(counter(&store, "b").await, 0, "its write was rolled back");
        assert_eq!(recorded(&store, "s-2", Op::Action).await, None);
        assert_eq!(barrier_rows(&store).await, 1);
    }
);

on_both_backends!(
    a_failing_handler_rolls_back_only_itself_and_records_nothing,
    |url: String| async move {
        let store = store(&url).await;
        let bump = Bump::default();
        let h = Handler::Saga(Arc::new(bump.clone()));
        let run = batch(
            &store,
            &h,
            &[
                cmd("s-a", Op::Action, json!({"id": "a"})),
                cmd("s-b", Op::Action, json!({"id": "b", "fail": "db"})),
                cmd("s-c", Op::Action, json!({"id": "c"})),
                cmd("s-d", Op::Action, json!({"id": "d", "fail": "retryable"})),
                cmd("s-e", Op::Action, json!({"id": "e"})),
            ],
        )
        .await;
        assert_eq!(run.commits, 1, "the others committed in the batch");
        let got = outcomes(&run);
        for i in [0, 2, 4] {
            assert!(matches!(got[i], Outcome::Ok { .. }), "{i}: {got:?}");
        }
        assert!(
            matches!(&got[1], Outcome::Retryable { message } if message.contains("database")),
            "{got:?}"
        );
        assert!(
            matches!(&got[3], Outcome::Retryable { message } if message == "busy"),
            "{got:?}"
        );
        for (id, n) in [("a", 1), ("b", 0), ("c", 1), ("d", 0), ("e", 1)] {
            assert_eq!(counter(&store, id).await, n, "counter {id}");
        }
        assert_eq!(recorded(&store, "s-b", Op::Action).await, None);
        assert_eq!(recorded(&store, "s-d", Op::Action).await, None);
        assert_eq!(barrier_rows(&store).await, 3);
        // Nothing was recorded, so the retry runs the effect.
        let retry = batch(&store, &h, &[cmd("s-d", Op::Action, json!({"id": "d"}))]).await;
        assert!(matches!(outcomes(&retry)[0], Outcome::Ok { .. }));
        assert_eq!(counter(&store, "d").await, 1);
        // s-d's handler ran in the redo's chunk, where it failed, then alone (a failure inside
        // a chunk is run again alone, so that it answers for itself), then in the retry.
        assert_eq!(bump.calls("s-d"), 3);
    }
);

on_both_backends!(
    an_undo_before_its_forward_in_one_batch_is_null_and_refuses_it,
    |url: String| async move {
        let store = store(&url).await;
        let h = Handler::Saga(Arc::new(payment::Charge));
        let run = batch(
            &store,
            &h,
            &[
                // Undo first: nothing to undo, and the late charge is refused.
                cmd("s-late", Op::Compensate, charge("30.00")),
                cmd("s-late", Op::Action, charge("30.00")),
                // Forward first: the undo in the same batch sees it and really refunds.
                cmd("s-real", Op::Action, charge("20.00")),
                cmd("s-real", Op::Compensate, charge("20.00")),
            ],
        )
        .await;
        assert_eq!(run.commits, 1);
        let got = outcomes(&run);
        assert_eq!(
            got[0],
            Outcome::Ok {
                output: json!({"null_compensation": true})
            }
        );
        assert_eq!(business_code(&got[1]), "cancelled_before_run");
        assert!(matches!(got[2], Outcome::Ok { .. }), "{got:?}");
        match &got[3] {
            Outcome::Ok { output } => assert_ne!(output, &json!({"null_compensation": true})),
            other => panic!("expected a real refund, got {other:?}"),
        }
        assert_eq!(
            balance(&store).await,
            10_000,
            "no hanging charge, one refund"
        );
        assert_eq!(barrier_rows(&store).await, 4);
        // A later duplicate of the late charge is still refused.
        let again = batch(&store, &h, &[cmd("s-late", Op::Action, charge("30.00"))]).await;
        assert_eq!(business_code(&outcomes(&again)[0]), "cancelled_before_run");
        assert_eq!(balance(&store).await, 10_000);
    }
);

/// Inserts a child row whose parent is checked only at commit (a deferred foreign key), so a
/// missing parent fails the whole transaction's commit, not the handler.
struct Child;

#[async_trait::async_trait]
impl SagaStep for Child {
    async fn action(
        &self,
        conn: &mut AnyConnection,
        ctx: &StepContext,
        params: &Value,
    ) -> Result<Value, StepError> {
        sqlx::query("INSERT INTO batch_child (id, parent) VALUES ($1, $2)")
            .bind(&ctx.saga_id)
            .bind(params["parent"].as_str().unwrap_or_default())
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

on_both_backends!(
    a_batch_whose_commit_fails_is_run_command_by_command,
    |url: String| async move {
        let store = store(&url).await;
        for ddl in [
            "CREATE TABLE batch_parent (id TEXT PRIMARY KEY)",
            "CREATE TABLE batch_child (id TEXT PRIMARY KEY, parent TEXT NOT NULL \
             REFERENCES batch_parent (id) DEFERRABLE INITIALLY DEFERRED)",
            "INSERT INTO batch_parent (id) VALUES ('p')",
        ] {
            sqlx::query(ddl).execute(store.pool()).await.unwrap();
        }
        let h = Handler::Saga(Arc::new(Child));
        let run = batch(
            &store,
            &h,
            &[
                cmd("s-1", Op::Action, json!({"parent": "p"})),
                cmd("s-bad", Op::Action, json!({"parent": "nobody"})),
                cmd("s-2", Op::Action, json!({"parent": "p"})),
            ],
        )
        .await;
        assert_eq!(run.commits, 2, "the batch failed; then s-1 and s-2 alone");
        assert!(matches!(&run.results[0], Ok(e) if matches!(e.outcome, Outcome::Ok { .. })));
        assert!(run.results[1].is_err(), "{:?}", run.results[1]);
        assert!(matches!(&run.results[2], Ok(e) if matches!(e.outcome, Outcome::Ok { .. })));
        let children: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM batch_child")
            .fetch_one(store.pool())
            .await
            .unwrap();
        assert_eq!(children, 2);
        assert_eq!(recorded(&store, "s-bad", Op::Action).await, None);
        assert_eq!(barrier_rows(&store).await, 2);
    }
);

/// Appends (key, seq) to a list, as it handles commands.
struct Append(Arc<Mutex<Vec<(String, u64)>>>);

#[async_trait::async_trait]
impl SagaStep for Append {
    async fn action(
        &self,
        _: &mut AnyConnection,
        ctx: &StepContext,
        params: &Value,
    ) -> Result<Value, StepError> {
        tokio::time::sleep(Duration::from_micros(fastrand::u64(..1_000))).await;
        let seq = params["seq"].as_u64().unwrap_or(0);
        self.0.lock().unwrap().push((ctx.key.clone(), seq));
        Ok(json!({"seq": seq}))
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

on_both_backends!(
    per_key_order_holds_across_batches,
    |url: String| async move {
        let store = store(&url).await;
        let transport = Arc::new(MemoryTransport::default());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let keys = ["k-1", "k-2", "k-3", "k-4", "k-5", "k-6"];
        let per_key = 25u64;
        for seq in 0..per_key {
            for key in keys {
                let cmd = CommandMsg {
                    traceparent: None,
                    tracestate: None,
                    saga_id: format!("{key}-{seq}"),
                    saga: "test".into(),
                    key: key.into(),
                    step: 0,
                    step_id: "append".into(),
                    service: "append".into(),
                    op: Op::Action,
                    operation: "append".into(),
                    forward: "append".into(),
                    attempt: 1,
                    params: json!({"seq": seq}),
                };
                let msg = Message {
                    id: cmd.message_id(),
                    key: key.into(),
                    payload: serde_json::to_vec(&cmd).unwrap(),
                };
                transport
                    .publish(&command_queue("append"), msg)
                    .await
                    .unwrap();
            }
        }
        let worker = Worker::new(
            "append",
            store.pool().clone(),
            transport.clone() as Arc<dyn Transport>,
        )
        .saga_step("append", Append(seen.clone()))
        .with_lanes(2)
        .with_batch(16);
        let stats = worker.stats.clone();
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(worker.run(stopped));
        let total = per_key as usize * keys.len();
        let mut replies = transport.consume(REPLY_QUEUE).await.unwrap();
        let mut answered: HashMap<String, Vec<u64>> = HashMap::new();
        for _ in 0..total {
            let d = tokio::time::timeout(Duration::from_secs(20), replies.next())
                .await
                .expect("a reply in time")
                .expect("a reply");
            let reply: ReplyMsg = serde_json::from_slice(&d.message.payload).unwrap();
            let Outcome::Ok { output } = &reply.outcome else {
                panic!("{reply:?}");
            };
            answered
                .entry(d.message.key.clone())
                .or_default()
                .push(output["seq"].as_u64().unwrap());
            d.ack().await.unwrap();
        }
        let _ = stop.send(true);
        let _ = task.await;
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), total, "each command handled once");
        for key in keys {
            let order: Vec<u64> = seen
                .iter()
                .filter(|(k, _)| k == key)
                .map(|(_, s)| *s)
                .collect();
            let expected: Vec<u64> = (0..per_key).collect();
            assert_eq!(order, expected, "key {key} handled out of order");
            assert_eq!(answered[key], expected, "key {key} answered out of order");
        }
        let commits = stats.commits.load(std::sync::atomic::Ordering::Relaxed);
        assert!(
            commits >= (total as u64).div_ceil(16) && commits < total as u64,
            "{commits} commits for {total} commands: batched"
        );
        assert_eq!(barrier_rows(&store).await, total as i64);
        assert_eq!(
            transport.depth(&command_queue("append")),
            0,
            "all acknowledged"
        );
    }
);

// Two workers run overlapping batches at the same time (a single-active-consumer takeover):
// the second finds the shared command's row committed by the first when it inserts, rolls its
// whole batch back and redoes it. One effect each; the shared command gets the same answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_duplicates_in_two_batches_have_one_effect_postgres() {
    let Some(db) = support::fresh_db(support::Backend::Postgres, "batch_race").await else {
        return;
    };
    let store = store(&db.url).await;
    let bump = Bump {
        delay: Duration::from_millis(300),
        ..Bump::default()
    };
    let h = Handler::Saga(Arc::new(bump.clone()));
    let first = [
        cmd("s-shared", Op::Action, json!({"id": "a"})),
        cmd("s-first", Op::Action, json!({"id": "b"})),
    ];
    let second = [
        cmd("s-shared", Op::Action, json!({"id": "a"})),
        cmd("s-second", Op::Action, json!({"id": "c"})),
    ];
    let (r1, r2) = tokio::join!(batch(&store, &h, &first), async {
        // Starts while the first batch's handlers sleep: both read "no row" for s-shared.
        tokio::time::sleep(Duration::from_millis(100)).await;
        batch(&store, &h, &second).await
    });
    let (o1, o2) = (outcomes(&r1), outcomes(&r2));
    assert_eq!(o1[0], o2[0], "the shared command answered the same by both");
    assert!(matches!(o1[0], Outcome::Ok { .. }), "{o1:?}");
    assert!(!r1.results[0].as_ref().unwrap().duplicate);
    assert!(r2.results[0].as_ref().unwrap().duplicate);
    assert!(matches!(o2[1], Outcome::Ok { .. }), "{o2:?}");
    for id in ["a", "b", "c"] {
        assert_eq!(counter(&store, id).await, 1, "one effect on {id}");
    }
    // The second batch ran s-shared's handler once before it found the conflict, then redid
    // the batch: s-shared answered from the row, s-second run again.
    assert_eq!(bump.calls("s-shared"), 2);
    assert_eq!(bump.calls("s-second"), 2);
    assert_eq!(bump.calls("s-first"), 1);
    assert_eq!(barrier_rows(&store).await, 3);
    store.pool().close().await;
}

// What a batch costs, counted honestly from the outside: a batch of 20 fresh commands is one
// committed transaction, with one handler call and one barrier row per command.
on_both_backends!(
    a_batch_is_one_transaction_with_one_row_per_command,
    |url: String| async move {
        let store = store(&url).await;
        let bump = Bump::default();
        let h = Handler::Saga(Arc::new(bump.clone()));
        let cmds: Vec<Cmd> = (0..20)
            .map(|i| cmd(&format!("s-{i}"), Op::Action, json!({"id": "a"})))
            .collect();
        let run = batch(&store, &h, &cmds).await;
        assert_eq!(run.commits, 1);
        assert!(
            outcomes(&run)
                .iter()
                .all(|o| matches!(o, Outcome::Ok { .. }))
        );
        assert_eq!(counter(&store, "a").await, 20);
        assert_eq!(barrier_rows(&store).await, 20);
        for i in 0..20 {
            assert_eq!(bump.calls(&format!("s-{i}")), 1);
        }
        // All duplicates now: one transaction again, no handler call.
        let again = batch(&store, &h, &cmds).await;
        assert_eq!(again.commits, 1);
        assert!(again.results.iter().all(|r| r.as_ref().unwrap().duplicate));
        assert_eq!(counter(&store, "a").await, 20);
    }
);

/// Weak mode on the test Redis with a key prefix of its own, or None (skip) when Redis is
/// unreachable outside CI.
async fn weak(test: &str) -> Option<WeakIdempotency> {
    let url = std::env::var("SAGAFLOW_TEST_REDIS_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let prefix = format!(
        "sagaflow-test:{test}:{}:{:016x}",
        std::process::id(),
        fastrand::u64(..)
    );
    let weak = WeakIdempotency::new(&url, &prefix, Duration::from_secs(120)).expect("Redis URL");
    match weak.ping().await {
        Ok(()) => Some(weak),
        Err(e) if std::env::var("CI").as_deref() != Ok("true") => {
            eprintln!("skipping {test}: Redis at {url} is unreachable: {e}");
            None
        }
        Err(e) => panic!("Redis at {url} is unreachable (CI=true): {e}"),
    }
}

fn command(saga: &str, forward: &str, op: Op, params: Value) -> CommandMsg {
    CommandMsg {
        traceparent: None,
        tracestate: None,
        saga_id: saga.into(),
        saga: "test".into(),
        key: "one-key".into(),
        step: 0,
        step_id: "step".into(),
        service: "mixed".into(),
        op,
        operation: forward.into(),
        forward: forward.into(),
        attempt: 1,
        params,
    }
}

async fn publish(transport: &MemoryTransport, cmd: &CommandMsg) {
    let msg = Message {
        id: cmd.message_id(),
        key: cmd.key.clone(),
        payload: serde_json::to_vec(cmd).unwrap(),
    };
    transport
        .publish(&command_queue("mixed"), msg)
        .await
        .unwrap();
}

// Weak and barrier commands in one batch, through the runtime: the weak keys are claimed
// together, every handler runs in the batch's one transaction, and each command keeps what weak
// mode promises alone: a repeat has one effect and the same answer, a forward after its undo is
// refused, a transient failure frees its key, a business failure is kept.
on_both_backends!(
    weak_and_barrier_commands_share_a_batch,
    |url: String| async move {
        let Some(weak) = weak("batch").await else {
            return;
        };
        let store = store(&url).await;
        let transport = Arc::new(MemoryTransport::default());
        let bump = Bump::default();
        let blocker = Bump {
            delay: Duration::from_millis(300),
            ..bump.clone()
        };
        let worker = Worker::new(
            "mixed",
            store.pool().clone(),
            transport.clone() as Arc<dyn Transport>,
        )
        .saga_step("block", blocker)
        .saga_step("strong", bump.clone())
        .saga_step_with("weak", bump.clone(), Idempotency::Weak(weak.clone()))
        .with_lanes(1);
        let stats = worker.stats.clone();
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(worker.run(stopped));
        let mut replies = transport.consume(REPLY_QUEUE).await.unwrap();

        // The blocker holds the lane while the rest queue up behind it: they come as one batch.
        publish(
            &transport,
            &command("s-block", "block", Op::Action, json!({"id": "a"})),
        )
        .await;
        while bump.calls("s-block") == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let rest = [
            command("w-a", "weak", Op::Action, json!({"id": "b"})),
            command("w-a", "weak", Op::Action, json!({"id": "b"})),
            command("w-b", "weak", Op::Compensate, json!({"id": "c"})),
            command("w-b", "weak", Op::Action, json!({"id": "c"})),
            command("s-c", "strong", Op::Action, json!({"id": "d"})),
            command(
                "w-d",
                "weak",
                Op::Action,
                json!({"id": "e", "fail": "retryable"}),
            ),
            command(
                "w-e",
                "weak",
                Op::Action,
                json!({"id": "e", "fail": "business"}),
            ),
        ];
        for cmd in &rest {
            publish(&transport, cmd).await;
        }
        let mut got = Vec::new();
        for _ in 0..=rest.len() {
            let d = tokio::time::timeout(Duration::from_secs(20), replies.next())
                .await
                .expect("a reply in time")
                .expect("a reply");
            let reply: ReplyMsg = serde_json::from_slice(&d.message.payload).unwrap();
            d.ack().await.unwrap();
            got.push(reply);
        }
        let _ = stop.send(true);
        let _ = task.await;

        let sagas: Vec<(&str, Op)> = got.iter().map(|r| (r.saga_id.as_str(), r.op)).collect();
        let mut expected = vec![("s-block", Op::Action)];
        expected.extend(rest.iter().map(|c| (c.saga_id.as_str(), c.op)));
        assert_eq!(sagas, expected, "answered in arrival order");
        assert_eq!(
            stats.commits.load(std::sync::atomic::Ordering::Relaxed),
            2,
            "the blocker's transaction, then one for the whole batch"
        );
        assert!(matches!(got[1].outcome, Outcome::Ok { .. }), "{got:?}");
        assert_eq!(
            got[2].outcome, got[1].outcome,
            "a repeat gets the same answer"
        );
        // The batch holds failures, so its first try (without savepoints) was given up and
        // it ran again with them: handlers before the failures ran more than once, their
        // effects committed once.
        assert_eq!(
            stats
                .redone_with_savepoints
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
        // w-a ran in the optimistic try, in the redo's first chunk, and again when w-e failed
        // in that chunk (its handlers run again, one savepoint each); the repeat never.
        assert_eq!(
            bump.calls("w-a"),
            3,
            "once per run of its chunk, the repeat never"
        );
        assert_eq!(counter(&store, "b").await, 1, "and one effect");
        assert_eq!(business_code(&got[4].outcome), "cancelled_before_run");
        assert_eq!(bump.calls("w-b"), 0, "the late forward did not run");
        assert_eq!(
            bump.calls("w-b/undo"),
            3,
            "a weak undo runs its handler (in each run of its chunk, as w-a)"
        );
        assert!(matches!(got[5].outcome, Outcome::Ok { .. }), "{got:?}");
        assert_eq!(counter(&store, "d").await, 1);
        assert!(
            matches!(&got[6].outcome, Outcome::Retryable { message } if message == "busy"),
            "{got:?}"
        );
        assert_eq!(business_code(&got[7].outcome), "no");
        assert_eq!(counter(&store, "e").await, 0, "both failures rolled back");
        let answer = |saga: &str| {
            let weak = weak.clone();
            let ctx = StepContext {
                saga_id: saga.into(),
                step: "step".into(),
                operation: "weak".into(),
                attempt: 1,
                key: "one-key".into(),
            };
            async move { weak.recorded_answer(&ctx, Op::Action).await.unwrap() }
        };
        assert_eq!(answer("w-a").await, Some(got[1].outcome.clone()));
        assert_eq!(answer("w-b").await, Some(got[4].outcome.clone()));
        assert_eq!(
            answer("w-d").await,
            None,
            "the transient failure freed its key"
        );
        assert_eq!(answer("w-e").await, Some(got[7].outcome.clone()));
        // Weak commands write no barrier rows: the blocker's and s-c's only.
        assert_eq!(barrier_rows(&store).await, 2);
    }
);

/// Adds one to its row of `batch_counter` (`params.id`), then fails as `params.fail` says:
/// `business`, `retry`, or (PostgreSQL) `swallow`: a failing statement whose error it ignores,
/// which leaves the transaction aborted.
struct CountThenFail;

#[async_trait::async_trait]
impl SagaStep for CountThenFail {
    async fn action(
        &self,
        conn: &mut AnyConnection,
        _: &StepContext,
        params: &Value,
    ) -> Result<Value, StepError> {
        sqlx::query("UPDATE batch_counter SET n = n + 1 WHERE id = $1")
            .bind(params["id"].as_str().unwrap_or_default())
            .execute(&mut *conn)
            .await?;
        match params["fail"].as_str() {
            Some("business") => Err(StepError::business("no", "refused after writing")),
            Some("retry") => Err(StepError::Retryable("flaky after writing".into())),
            Some("swallow") => {
                let _ = sqlx::query("SELECT 1/0").execute(&mut *conn).await;
                Ok(Value::Null)
            }
            _ => Ok(Value::Null),
        }
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

on_both_backends!(
    a_failure_inside_a_savepoint_chunk_takes_back_only_its_own_writes,
    |url: String| async move {
        use sagaflow_workers::barrier::{CAUTIOUS_CHUNK, Optimism, execute_batch_with};
        let store = store(&url).await;
        let postgres = url.starts_with("postgres");
        let handler = Handler::Saga(Arc::new(CountThenFail));
        // Failures in the middle of chunks (CAUTIOUS_CHUNK is 4): after two, three and one
        // handlers that succeeded under the same savepoint, and (PostgreSQL) a handler that
        // leaves the transaction aborted.
        assert_eq!(
            CAUTIOUS_CHUNK, 4,
            "the failures below are placed for chunks of 4"
        );
        let fails: HashMap<usize, &str> = if postgres {
            HashMap::from([
                (2, "business"),
                (7, "retry"),
                (9, "swallow"),
                (13, "business"),
            ])
        } else {
            HashMap::from([(2, "business"), (7, "retry"), (13, "business")])
        };
        for (mode, optimism) in [
            ("chunked", Optimism::chunked()),
            ("one savepoint per handler", Optimism::never()),
            ("optimistic first", Optimism::default()),
        ] {
            let n = 16;
            let mut cmds = Vec::new();
            for i in 0..n {
                let id = format!("{mode}-{i}");
                sqlx::query("INSERT INTO batch_counter (id, n) VALUES ($1, 0)")
                    .bind(&id)
                    .execute(store.pool())
                    .await
                    .unwrap();
                let mut params = json!({ "id": id });
                if let Some(f) = fails.get(&i) {
                    params["fail"] = json!(f);
                }
                cmds.push(cmd(&id, Op::Action, params));
            }
            let jobs = jobs_of(&handler, &cmds, true);
            let run = execute_batch_with(store.pool(), &jobs, &optimism).await;
            assert_eq!(run.commits, 1, "{mode}: one transaction");
            let got = outcomes(&run);
            assert_eq!(got.len(), n);
            for (i, got) in got.iter().enumerate() {
                let id = format!("{mode}-{i}");
                let effect = counter(&store, &id).await;
                match fails.get(&i) {
                    Some(&"business") => {
                        assert_eq!(business_code(got), "no", "{mode} #{i}");
                        assert_eq!(effect, 0, "{mode} #{i}: its write taken back");
                        assert!(recorded(&store, &id, Op::Action).await.is_some());
                    }
                    Some(_) => {
                        assert!(
                            matches!(got, Outcome::Retryable { .. }),
                            "{mode} #{i}: {got:?}"
                        );
                        assert_eq!(effect, 0, "{mode} #{i}: its write taken back");
                        assert!(recorded(&store, &id, Op::Action).await.is_none());
                    }
                    None => {
                        assert!(matches!(got, Outcome::Ok { .. }), "{mode} #{i}: {got:?}");
                        assert_eq!(effect, 1, "{mode} #{i}: its effect once, reruns included");
                    }
                }
            }
        }
        store.pool().close().await;
    }
);

on_both_backends!(
    a_rewound_chunk_replays_its_duplicates_and_the_last_chunk_is_checked,
    |url: String| async move {
        use sagaflow_workers::barrier::{Optimism, execute_batch_with};
        let store = store(&url).await;
        let postgres = url.starts_with("postgres");
        let handler = Handler::Saga(Arc::new(CountThenFail));
        let rows = ["r-0", "r-1", "r-2", "w-0", "w-1", "w-2"];
        for id in rows {
            sqlx::query("INSERT INTO batch_counter (id, n) VALUES ($1, 0)")
                .bind(id)
                .execute(store.pool())
                .await
                .unwrap();
        }
        // One chunk: a handler, its duplicate (answered from the batch's overlay, no handler
        // run), a second handler, then a failure: the chunk is rolled back and replayed, the
        // duplicate with it.
        let cmds = [
            cmd("r-0", Op::Action, json!({"id": "r-0"})),
            cmd("r-0", Op::Action, json!({"id": "r-0"})),
            cmd("r-1", Op::Action, json!({"id": "r-1"})),
            cmd("r-2", Op::Action, json!({"id": "r-2", "fail": "business"})),
        ];
        let jobs = jobs_of(&handler, &cmds, true);
        let run = execute_batch_with(store.pool(), &jobs, &Optimism::chunked()).await;
        assert_eq!(run.commits, 1);
        let got = outcomes(&run);
        assert!(matches!(got[0], Outcome::Ok { .. }), "{got:?}");
        assert_eq!(got[1], got[0], "the duplicate answers as the first");
        assert!(run.results[1].as_ref().unwrap().duplicate);
        assert!(matches!(got[2], Outcome::Ok { .. }), "{got:?}");
        assert_eq!(business_code(&got[3]), "no");
        for (id, n) in [("r-0", 1), ("r-1", 1), ("r-2", 0)] {
            assert_eq!(counter(&store, id).await, n, "{id}");
        }
        assert_eq!(barrier_rows(&store).await, 3);
        if !postgres {
            return;
        }
        // Commands without barrier rows (weak mode's), the last of which leaves the transaction
        // aborted: no barrier statement follows it, and PostgreSQL answers the COMMIT of an
        // aborted transaction with a rollback, not an error. Each mode must find it before
        // the commit: the others' effects committed, the swallower's not.
        for (mode, optimism) in [
            ("chunked", Optimism::chunked()),
            ("per handler", Optimism::never()),
            ("optimistic", Optimism::default()),
        ] {
            for id in ["w-0", "w-1", "w-2"] {
                sqlx::query("UPDATE batch_counter SET n = 0 WHERE id = $1")
                    .bind(id)
                    .execute(store.pool())
                    .await
                    .unwrap();
            }
            let cmds = [
                cmd("w-0", Op::Action, json!({"id": "w-0"})),
                cmd("w-1", Op::Action, json!({"id": "w-1"})),
                cmd("w-2", Op::Action, json!({"id": "w-2", "fail": "swallow"})),
            ];
            let jobs = jobs_of(&handler, &cmds, false);
            let run = execute_batch_with(store.pool(), &jobs, &optimism).await;
            for (i, id) in ["w-0", "w-1"].into_iter().enumerate() {
                assert!(
                    matches!(
                        run.results[i].as_ref().map(|e| &e.outcome),
                        Ok(Outcome::Ok { .. })
                    ),
                    "{mode}: {:?}",
                    run.results
                );
                assert_eq!(counter(&store, id).await, 1, "{mode}: {id} committed");
            }
            assert!(
                !matches!(
                    run.results[2].as_ref().map(|e| &e.outcome),
                    Ok(Outcome::Ok { .. })
                ),
                "{mode}: the swallower is not answered as done: {:?}",
                run.results
            );
            assert_eq!(counter(&store, "w-2").await, 0, "{mode}: w-2 rolled back");
        }
    }
);

//! Weak idempotency (a Redis key per command) next to the barrier, through the worker runtime:
//! the same command delivered twice has one effect and gets the same reply twice in both modes;
//! a transient failure in weak mode frees the key so the retry runs the effect, once; a business
//! failure is kept; an unreachable Redis is a retryable failure, not a panic.
//!
//! Redis comes from `SAGAFLOW_TEST_REDIS_URL` (default `redis://127.0.0.1:6379`); each test uses
//! a key prefix of its own. Without Redis the tests that need it are skipped, except under
//! `CI=true`, where that is a failure.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use sagaflow_engine::machine::{Op, Outcome};
use sagaflow_engine::store::{ENGINE_MIGRATIONS, Store};
use sagaflow_engine::transport::memory::MemoryTransport;
use sagaflow_engine::transport::{Consumer, Message, REPLY_QUEUE, Transport, command_queue};
use sagaflow_engine::wire::{CommandMsg, ReplyMsg};
use sagaflow_workers::runtime::Idempotency;
use sagaflow_workers::runtime::Worker;
use sagaflow_workers::sdk::{SagaStep, StepContext, StepError};
use sagaflow_workers::services;
use sagaflow_workers::weak::WeakIdempotency;
use serde_json::{Value, json};
use tokio::sync::watch;

const SERVICE: &str = "notify";

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

async fn store(url: &str) -> Store {
    let store = Store::connect(url, 4).await.expect("connect");
    store
        .migrate(&[ENGINE_MIGRATIONS, services::MIGRATIONS])
        .await
        .expect("migrate");
    store
}

/// An effect that counts how often it ran; its output names the run and carries a nonce, so
/// identical replies prove that the recorded output was answered again, not recomputed.
/// Fails transiently the first `fail_first` times, without effect.
struct Effect {
    runs: Arc<AtomicU64>,
    calls: AtomicU64,
    fail_first: u64,
    refuse: bool,
}

impl Effect {
    fn new(runs: &Arc<AtomicU64>) -> Effect {
        Effect {
            runs: runs.clone(),
            calls: AtomicU64::new(0),
            fail_first: 0,
            refuse: false,
        }
    }
}

#[async_trait]
impl SagaStep for Effect {
    async fn action(
        &self,
        _: &mut sqlx::AnyConnection,
        ctx: &StepContext,
        _: &Value,
    ) -> Result<Value, StepError> {
        if self.calls.fetch_add(1, Ordering::SeqCst) < self.fail_first {
            return Err(StepError::retryable("the mail server is busy"));
        }
        if self.refuse {
            return Err(StepError::business("opted_out", "the user opted out"));
        }
        let run = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
        Ok(json!({ "run": run, "attempt": ctx.attempt, "nonce": fastrand::u64(..) }))
    }

    async fn compensate(
        &self,
        _: &mut sqlx::AnyConnection,
        _: &StepContext,
        _: &Value,
    ) -> Result<Value, StepError> {
        Ok(Value::Null)
    }
}

fn command(saga_id: &str, forward: &str, attempt: u32) -> CommandMsg {
    CommandMsg {
        traceparent: None,
        tracestate: None,
        saga_id: saga_id.into(),
        saga: "welcome".into(),
        key: format!("order-{saga_id}"),
        step: 0,
        step_id: "mail".into(),
        service: SERVICE.into(),
        op: Op::Action,
        operation: forward.into(),
        forward: forward.into(),
        attempt,
        params: json!({"to": "someone@example.invalid"}),
    }
}

fn ctx_of(cmd: &CommandMsg) -> StepContext {
    StepContext {
        saga_id: cmd.saga_id.clone(),
        step: cmd.step_id.clone(),
        operation: cmd.operation.clone(),
        attempt: cmd.attempt,
        key: cmd.key.clone(),
    }
}

async fn publish(transport: &MemoryTransport, cmd: &CommandMsg) {
    let msg = Message {
        id: cmd.message_id(),
        key: cmd.key.clone(),
        payload: serde_json::to_vec(cmd).expect("serializable"),
    };
    transport
        .publish(&command_queue(SERVICE), msg)
        .await
        .expect("publish");
}

/// The next reply, decoded (acknowledged).
async fn next_reply(replies: &mut Box<dyn Consumer>) -> ReplyMsg {
    let d = tokio::time::timeout(Duration::from_secs(15), replies.next())
        .await
        .expect("a reply in time")
        .expect("transport open");
    let reply = serde_json::from_slice(&d.message.payload).expect("a reply");
    d.ack().await.expect("ack");
    reply
}

/// A running worker and the reply queue's consumer.
struct Running {
    transport: Arc<MemoryTransport>,
    replies: Box<dyn Consumer>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), String>>,
}

async fn run(worker: impl FnOnce(Arc<dyn Transport>) -> Worker) -> Running {
    let transport = Arc::new(MemoryTransport::default());
    let w = worker(transport.clone() as Arc<dyn Transport>);
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(w.run(stopped));
    let replies = transport.consume(REPLY_QUEUE).await.expect("consume");
    Running {
        transport,
        replies,
        stop,
        task,
    }
}

impl Running {
    async fn stop(self) {
        let _ = self.stop.send(true);
        self.transport.close();
        let _ = self.task.await;
    }
}

async fn barrier_rows(store: &Store, saga_id: &str) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM barrier WHERE saga_id = $1")
        .bind(saga_id)
        .fetch_one(store.pool())
        .await
        .expect("count")
}

// The same command delivered twice, in both modes side by side: one effect each, two identical
// success replies each. Weak mode keeps its record in Redis, the barrier in the database.
on_both_backends!(
    same_command_twice_one_effect_in_weak_and_barrier_mode,
    |url: String| async move {
        let Some(weak) = weak("twice").await else {
            return;
        };
        let store = store(&url).await;
        let (weak_runs, barrier_runs) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (pool, w) = (store.pool().clone(), weak.clone());
        let (wr, br) = (weak_runs.clone(), barrier_runs.clone());
        let mut sys = run(move |t| {
            Worker::new(SERVICE, pool, t)
                .saga_step_with("send_weak", Effect::new(&wr), Idempotency::Weak(w))
                .saga_step("send_barrier", Effect::new(&br))
        })
        .await;

        let weak_cmd = command("saga-weak", "send_weak", 1);
        let barrier_cmd = command("saga-barrier", "send_barrier", 1);
        for cmd in [&weak_cmd, &weak_cmd, &barrier_cmd, &barrier_cmd] {
            publish(&sys.transport, cmd).await;
        }
        let mut replies = Vec::new();
        for _ in 0..4 {
            replies.push(next_reply(&mut sys.replies).await);
        }
        sys.stop().await;

        for (mode, cmd, runs) in [
            ("weak", &weak_cmd, &weak_runs),
            ("barrier", &barrier_cmd, &barrier_runs),
        ] {
            let mine: Vec<&ReplyMsg> = replies
                .iter()
                .filter(|r| r.saga_id == cmd.saga_id)
                .collect();
            assert_eq!(mine.len(), 2, "{mode}: two replies");
            assert_eq!(mine[0], mine[1], "{mode}: identical replies");
            match &mine[0].outcome {
                Outcome::Ok { output } => assert_eq!(output["run"], 1, "{mode}: {output}"),
                other => panic!("{mode}: expected success, got {other:?}"),
            }
            assert_eq!(runs.load(Ordering::SeqCst), 1, "{mode}: one effect");
        }
        // Where each mode keeps its record.
        let weak_answer = weak
            .recorded_answer(&ctx_of(&weak_cmd), Op::Action)
            .await
            .expect("Redis");
        let weak_reply = replies.iter().find(|r| r.saga_id == weak_cmd.saga_id);
        assert_eq!(weak_answer.as_ref(), weak_reply.map(|r| &r.outcome));
        assert_eq!(barrier_rows(&store, &weak_cmd.saga_id).await, 0);
        assert_eq!(barrier_rows(&store, &barrier_cmd.saga_id).await, 1);
        assert_eq!(
            weak.recorded_answer(&ctx_of(&barrier_cmd), Op::Action)
                .await
                .expect("Redis"),
            None
        );
    }
);

/// A transient failure frees the key: the retry runs the effect, once; later duplicates and
/// attempts get its recorded reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weak_failure_then_retry_runs_the_effect_once() {
    let Some(weak) = weak("retry").await else {
        return;
    };
    let db = support::fresh_db(support::Backend::Sqlite, "weak_retry")
        .await
        .expect("sqlite");
    let store = store(&db.url).await;
    let runs = Arc::new(AtomicU64::new(0));
    let flaky = Effect {
        fail_first: 1,
        ..Effect::new(&runs)
    };
    let (pool, w) = (store.pool().clone(), weak.clone());
    let mut sys = run(move |t| {
        Worker::new(SERVICE, pool, t).saga_step_with("send", flaky, Idempotency::Weak(w))
    })
    .await;

    let first = command("saga-retry", "send", 1);
    publish(&sys.transport, &first).await;
    let failed = next_reply(&mut sys.replies).await;
    match &failed.outcome {
        Outcome::Retryable { message } => assert!(message.contains("busy"), "{message}"),
        other => panic!("expected a transient failure, got {other:?}"),
    }
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    assert_eq!(
        weak.recorded_answer(&ctx_of(&first), Op::Action)
            .await
            .expect("Redis"),
        None,
        "the failure deleted the key"
    );

    // The engine's retry: attempt 2 of the same operation runs the effect.
    let retry = command("saga-retry", "send", 2);
    publish(&sys.transport, &retry).await;
    let done = next_reply(&mut sys.replies).await;
    let Outcome::Ok { output } = &done.outcome else {
        panic!("expected success, got {:?}", done.outcome);
    };
    assert_eq!(
        (output["run"].as_u64(), output["attempt"].as_u64()),
        (Some(1), Some(2))
    );

    // A duplicate of attempt 2, and a later attempt 3 (e.g. after a lost reply): no effect,
    // the recorded output.
    publish(&sys.transport, &retry).await;
    assert_eq!(next_reply(&mut sys.replies).await, done);
    publish(&sys.transport, &command("saga-retry", "send", 3)).await;
    let third = next_reply(&mut sys.replies).await;
    assert_eq!(third.attempt, 3);
    assert_eq!(third.outcome, done.outcome);
    sys.stop().await;
    assert_eq!(runs.load(Ordering::SeqCst), 1, "one effect in all");
}

/// A business "no" is recorded like a success (the engine relies on it meaning "no effect"):
/// a duplicate gets the same "no" without running the handler again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weak_business_failure_is_kept() {
    let Some(weak) = weak("business").await else {
        return;
    };
    let db = support::fresh_db(support::Backend::Sqlite, "weak_business")
        .await
        .expect("sqlite");
    let store = store(&db.url).await;
    let runs = Arc::new(AtomicU64::new(0));
    let refuse = Effect {
        refuse: true,
        ..Effect::new(&runs)
    };
    let (pool, w) = (store.pool().clone(), weak.clone());
    let mut sys = run(move |t| {
        Worker::new(SERVICE, pool, t).saga_step_with("send", refuse, Idempotency::Weak(w))
    })
    .await;
    let cmd = command("saga-no", "send", 1);
    publish(&sys.transport, &cmd).await;
    publish(&sys.transport, &command("saga-no", "send", 2)).await;
    let (a, b) = (
        next_reply(&mut sys.replies).await,
        next_reply(&mut sys.replies).await,
    );
    sys.stop().await;
    assert!(
        matches!(&a.outcome, Outcome::Business { code, .. } if code == "opted_out"),
        "{a:?}"
    );
    assert_eq!(a.outcome, b.outcome);
    assert_eq!(
        weak.recorded_answer(&ctx_of(&cmd), Op::Action)
            .await
            .expect("Redis"),
        Some(a.outcome)
    );
}

/// Redis unreachable: a retryable failure that says so; the effect does not run; no panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_redis_is_a_retryable_failure() {
    let db = support::fresh_db(support::Backend::Sqlite, "weak_down")
        .await
        .expect("sqlite");
    let store = store(&db.url).await;
    // Port 1 on the loopback: nothing listens there.
    let down = WeakIdempotency::new("redis://127.0.0.1:1", "down", Duration::from_secs(60))
        .expect("a valid URL");
    assert!(down.ping().await.is_err());
    let runs = Arc::new(AtomicU64::new(0));
    let effect = Effect::new(&runs);
    let pool = store.pool().clone();
    let mut sys = run(move |t| {
        Worker::new(SERVICE, pool, t).saga_step_with("send", effect, Idempotency::Weak(down))
    })
    .await;
    publish(&sys.transport, &command("saga-down", "send", 1)).await;
    let reply = next_reply(&mut sys.replies).await;
    sys.stop().await;
    match &reply.outcome {
        Outcome::Retryable { message } => {
            assert!(
                message.contains("Redis at redis://127.0.0.1:1 is unreachable")
                    && message.contains("the effect was not run"),
                "{message}"
            );
        }
        other => panic!("expected a retryable failure, got {other:?}"),
    }
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

/// Refuses its first call (a business "no"), then does its effect.
struct RefusesOnce {
    calls: AtomicU64,
    runs: Arc<AtomicU64>,
}

#[async_trait]
impl SagaStep for RefusesOnce {
    async fn action(
        &self,
        _: &mut sqlx::AnyConnection,
        ctx: &StepContext,
        _: &Value,
    ) -> Result<Value, StepError> {
        if self.calls.fetch_add(1, Ordering::SeqCst) == 0 {
            return Err(StepError::business("opted_out", "the user opted out"));
        }
        let run = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
        Ok(json!({ "run": run, "attempt": ctx.attempt }))
    }

    async fn compensate(
        &self,
        _: &mut sqlx::AnyConnection,
        _: &StepContext,
        _: &Value,
    ) -> Result<Value, StepError> {
        Ok(Value::Null)
    }
}

/// A business refusal answers its own attempt (a duplicate gets it again, the handler does not
/// run), but a later attempt — what an operator's retry sends — runs the handler, as the
/// barrier does. The bug this pins: weak mode answered the old refusal to every attempt, so a
/// retried step could never succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weak_refusal_answers_its_attempt_but_not_a_later_one() {
    let Some(weak) = weak("refusal_attempts").await else {
        return;
    };
    let db = support::fresh_db(support::Backend::Sqlite, "weak_refusal_attempts")
        .await
        .expect("sqlite");
    let store = store(&db.url).await;
    let runs = Arc::new(AtomicU64::new(0));
    let step = RefusesOnce {
        calls: AtomicU64::new(0),
        runs: runs.clone(),
    };
    let (pool, w) = (store.pool().clone(), weak.clone());
    let mut sys = run(move |t| {
        Worker::new(SERVICE, pool, t).saga_step_with("send", step, Idempotency::Weak(w))
    })
    .await;
    let first = command("saga-retried", "send", 1);
    publish(&sys.transport, &first).await;
    let refused = next_reply(&mut sys.replies).await;
    assert!(
        matches!(&refused.outcome, Outcome::Business { code, .. } if code == "opted_out"),
        "{refused:?}"
    );
    // The same attempt again: the recorded refusal, the handler not run.
    publish(&sys.transport, &first).await;
    let again = next_reply(&mut sys.replies).await;
    assert_eq!(again.outcome, refused.outcome);
    // Attempt 2 (an operator retry): the handler runs, and succeeds.
    let retried = command("saga-retried", "send", 2);
    publish(&sys.transport, &retried).await;
    let done = next_reply(&mut sys.replies).await;
    sys.stop().await;
    assert!(matches!(done.outcome, Outcome::Ok { .. }), "{done:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert!(
        matches!(
            weak.recorded_answer(&ctx_of(&retried), Op::Action)
                .await
                .expect("Redis"),
            Some(Outcome::Ok { .. })
        ),
        "the success is now the recorded answer"
    );
}

//! The worker SDK's guarantees, on SQLite and PostgreSQL: the barrier (a duplicate has no second
//! effect; an undo before its forward operation is a null undo and the late forward operation is
//! refused; business failures are recorded) and per-key ordering across lanes.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use sagaflow_engine::machine::{Op, Outcome};
use sagaflow_engine::store::{ENGINE_MIGRATIONS, Store};
use sagaflow_engine::transport::memory::MemoryTransport;
use sagaflow_engine::transport::{Message, Transport, command_queue};
use sagaflow_engine::wire::CommandMsg;
use sagaflow_workers::barrier::{Handler, execute};
use sagaflow_workers::runtime::Worker;
use sagaflow_workers::sdk::{SagaStep, StepContext, StepError};
use sagaflow_workers::services::{self, payment};
use serde_json::{Value, json};
use sqlx::Row;

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
    tx.commit().await.unwrap();
    store
}

fn ctx(op: &str) -> StepContext {
    StepContext {
        saga_id: "saga-1".into(),
        step: "payment".into(),
        operation: op.into(),
        attempt: 1,
        key: "o-1".into(),
    }
}

async fn balance(store: &Store) -> i64 {
    let mut conn = store.pool().acquire().await.unwrap();
    sqlx::query("SELECT balance FROM payment_accounts WHERE account = 'alice'")
        .fetch_one(&mut *conn)
        .await
        .unwrap()
        .try_get("balance")
        .unwrap()
}

fn charge(amount: &str) -> Value {
    json!({"account": "alice", "amount": amount, "order_id": "o-1"})
}

on_both_backends!(duplicate_command_has_one_effect, |url: String| async move {
    let store = store(&url).await;
    let h = Handler::Saga(Arc::new(payment::Charge));
    let first = execute(
        store.pool(),
        &h,
        Op::Action,
        &ctx("charge"),
        &charge("30.00"),
    )
    .await
    .unwrap();
    let again = execute(
        store.pool(),
        &h,
        Op::Action,
        &ctx("charge"),
        &charge("30.00"),
    )
    .await
    .unwrap();
    assert!(matches!(first.outcome, Outcome::Ok { .. }) && !first.duplicate);
    assert_eq!(again.outcome, first.outcome);
    assert!(again.duplicate);
    assert_eq!(balance(&store).await, 10_000 - 3_000);
    // Compensate twice: one refund.
    execute(
        store.pool(),
        &h,
        Op::Compensate,
        &ctx("refund"),
        &charge("30.00"),
    )
    .await
    .unwrap();
    let dup = execute(
        store.pool(),
        &h,
        Op::Compensate,
        &ctx("refund"),
        &charge("30.00"),
    )
    .await
    .unwrap();
    assert!(dup.duplicate);
    assert_eq!(balance(&store).await, 10_000);
});

on_both_backends!(
    undo_before_forward_is_null_and_refuses_the_late_forward,
    |url: String| async move {
        let store = store(&url).await;
        let h = Handler::Saga(Arc::new(payment::Charge));
        let undo = execute(
            store.pool(),
            &h,
            Op::Compensate,
            &ctx("refund"),
            &charge("30.00"),
        )
        .await
        .unwrap();
        assert!(matches!(undo.outcome, Outcome::Ok { .. }));
        let late = execute(
            store.pool(),
            &h,
            Op::Action,
            &ctx("charge"),
            &charge("30.00"),
        )
        .await
        .unwrap();
        match late.outcome {
            Outcome::Business { code, .. } => assert_eq!(code, "cancelled_before_run"),
            other => panic!("the late charge must be refused, got {other:?}"),
        }
        assert_eq!(balance(&store).await, 10_000, "no hanging charge");
    }
);

on_both_backends!(
    business_failure_is_recorded_and_rolled_back,
    |url: String| async move {
        let store = store(&url).await;
        let h = Handler::Saga(Arc::new(payment::Charge));
        let first = execute(
            store.pool(),
            &h,
            Op::Action,
            &ctx("charge"),
            &charge("500.00"),
        )
        .await
        .unwrap();
        match &first.outcome {
            Outcome::Business { code, .. } => assert_eq!(code, "insufficient_funds"),
            other => panic!("expected insufficient funds, got {other:?}"),
        }
        let again = execute(
            store.pool(),
            &h,
            Op::Action,
            &ctx("charge"),
            &charge("5.00"),
        )
        .await
        .unwrap();
        assert_eq!(again.outcome, first.outcome, "the decision is durable");
        // Its compensation is a no-op: nothing took effect.
        execute(
            store.pool(),
            &h,
            Op::Compensate,
            &ctx("refund"),
            &charge("500.00"),
        )
        .await
        .unwrap();
        assert_eq!(balance(&store).await, 10_000);
    }
);

/// Records the order in which each key's commands were handled.
struct Recorder(Arc<Mutex<Vec<(String, u64)>>>);

#[async_trait::async_trait]
impl SagaStep for Recorder {
    async fn action(
        &self,
        _: &mut sqlx::AnyConnection,
        ctx: &StepContext,
        params: &Value,
    ) -> Result<Value, StepError> {
        // Uneven work per command, so lanes race each other.
        tokio::time::sleep(Duration::from_micros(fastrand::u64(..2_000))).await;
        let seq = params["seq"].as_u64().unwrap_or(0);
        self.0.lock().unwrap().push((ctx.key.clone(), seq));
        Ok(Value::Null)
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

on_both_backends!(
    commands_of_one_key_are_handled_in_send_order,
    |url: String| async move {
        let store = store(&url).await;
        let transport = Arc::new(MemoryTransport::default());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let keys = ["order-a", "order-b", "order-c", "order-d", "order-e"];
        let per_key = 30u64;
        for seq in 0..per_key {
            for key in keys {
                let cmd = CommandMsg {
                    traceparent: None,
                    tracestate: None,
                    saga_id: format!("{key}-{seq}"),
                    saga: "test".into(),
                    key: key.into(),
                    step: 0,
                    step_id: "record".into(),
                    service: "recorder".into(),
                    op: Op::Action,
                    operation: "record".into(),
                    forward: "record".into(),
                    attempt: 1,
                    params: json!({"seq": seq}),
                };
                let msg = Message {
                    id: cmd.message_id(),
                    key: key.into(),
                    payload: serde_json::to_vec(&cmd).unwrap(),
                };
                transport
                    .publish(&command_queue("recorder"), msg)
                    .await
                    .unwrap();
            }
        }
        let worker = Worker::new(
            "recorder",
            store.pool().clone(),
            transport.clone() as Arc<dyn Transport>,
        )
        .saga_step("record", Recorder(seen.clone()))
        .with_lanes(4)
        .with_batch(8);
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(worker.run(stopped));
        let total = per_key as usize * keys.len();
        for _ in 0..600 {
            if seen.lock().unwrap().len() >= total {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = stop.send(true);
        let _ = task.await;
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), total);
        for key in keys {
            let order: Vec<u64> = seen
                .iter()
                .filter(|(k, _)| k == key)
                .map(|(_, s)| *s)
                .collect();
            assert_eq!(
                order,
                (0..per_key).collect::<Vec<_>>(),
                "key {key} out of order"
            );
        }
        // Different keys did interleave (they ran in parallel lanes): another key was handled
        // before the first key was done. Lanes interleave batch by batch at least (SQLite's one
        // connection serialises their transactions), hence the small batches.
        let first = &seen[0].0;
        let other = seen.iter().position(|(k, _)| k != first);
        let last = seen.iter().rposition(|(k, _)| k == first);
        assert!(
            matches!((other, last), (Some(o), Some(l)) if o < l),
            "{seen:?}"
        );
    }
);

//! A reply delivered more than once has one effect, on SQLite and on the real PostgreSQL,
//! without any record of message ids: the saga's state says what it waits for, and the machine
//! ignores a reply that matches nothing in flight — a copy in the same batch (decided on the
//! state the first copy left), a copy in a later batch, a stale attempt. Each ignored copy is
//! one `ignored` line in the timeline and changes nothing else. The engine's loops do not run
//! here: the tests play the replies themselves.

mod support;

use sagaflow_engine::machine::{Op, Outcome};
use sagaflow_engine::status;
use sagaflow_engine::store::SagaQueries;
use sagaflow_engine::{Applied, Engine};
use serde_json::json;

use support::{ONE_STEP, engine_alone as engine};

fn reply(saga: &str, attempt: u32, outcome: Outcome) -> sagaflow_engine::Incoming {
    support::reply(saga, Op::Action, attempt, outcome)
}

fn ok() -> Outcome {
    Outcome::Ok {
        output: json!({"txn_id": "t-1"}),
    }
}

fn flaky() -> Outcome {
    Outcome::Retryable {
        message: "try again".into(),
    }
}

async fn version(engine: &Engine, id: &str) -> i64 {
    sqlx::query_scalar("SELECT version FROM sagas WHERE id = $1")
        .bind(id)
        .fetch_one(engine.store().pool())
        .await
        .expect("version")
}

/// The saga's timeline as (kind, detail), oldest first.
async fn timeline(engine: &Engine, id: &str) -> Vec<(String, String)> {
    status::saga(engine.store(), id)
        .await
        .expect("status")
        .expect("saga")
        .timeline
        .into_iter()
        .map(|r| (r.kind, r.detail))
        .collect()
}

fn count(lines: &[(String, String)], kind: &str) -> usize {
    lines.iter().filter(|(k, _)| k == kind).count()
}

on_both_backends!(
    a_reply_twice_in_one_batch_applies_once,
    |url: String| async move {
        let engine = engine(&url).await;
        let graph = engine.register(ONE_STEP).await.expect("register");
        let id = engine
            .start(&graph, json!({"order_id": "o-1"}), None)
            .await
            .expect("start")
            .id;
        let v0 = version(&engine, &id).await;

        // A transient failure, twice in one batch: one retry, not two.
        let done = engine
            .apply(&[reply(&id, 1, flaky()), reply(&id, 1, flaky())])
            .await
            .expect("apply");
        assert_eq!(done, [Applied::Changed, Applied::Ignored]);
        assert_eq!(version(&engine, &id).await, v0 + 1);
        let state = engine.store().saga_state(&id).await.unwrap().unwrap();
        assert_eq!(state.attempts[0], 1, "no second attempt counted");

        // The success, twice in one batch: completed once.
        let done = engine
            .apply(&[reply(&id, 1, ok()), reply(&id, 1, ok())])
            .await
            .expect("apply");
        assert_eq!(done, [Applied::Changed, Applied::Ignored]);
        assert_eq!(version(&engine, &id).await, v0 + 2);
        let lines = timeline(&engine, &id).await;
        assert_eq!(count(&lines, "completed"), 1, "{lines:?}");
        assert_eq!(count(&lines, "ignored"), 2, "{lines:?}");
    }
);

on_both_backends!(
    a_reply_redelivered_later_changes_nothing,
    |url: String| async move {
        let engine = engine(&url).await;
        let graph = engine.register(ONE_STEP).await.expect("register");
        // Two sagas of one order: the second waits for the first's key.
        let first = engine
            .start(&graph, json!({"order_id": "o-2"}), None)
            .await
            .expect("start")
            .id;
        let second = engine
            .start(&graph, json!({"order_id": "o-2"}), None)
            .await
            .expect("start")
            .id;
        let done = engine
            .apply(&[reply(&first, 1, ok())])
            .await
            .expect("apply");
        assert_eq!(done, [Applied::Changed]);
        let (v_first, v_second) = (
            version(&engine, &first).await,
            version(&engine, &second).await,
        );
        let lines_before = timeline(&engine, &first).await;

        // Its ack was lost: the same reply comes again, twice, each in a batch of its own.
        for _ in 0..2 {
            let done = engine
                .apply(&[reply(&first, 1, ok())])
                .await
                .expect("apply");
            assert_eq!(done, [Applied::Ignored]);
        }
        assert_eq!(version(&engine, &first).await, v_first);
        assert_eq!(
            version(&engine, &second).await,
            v_second,
            "the key was handed over once, so the second saga began once"
        );
        let lines = timeline(&engine, &first).await;
        assert_eq!(lines.len(), lines_before.len() + 2, "{lines:?}");
        for (kind, detail) in &lines[lines_before.len()..] {
            assert_eq!(kind, "ignored");
            assert!(
                detail.contains("nothing in flight; duplicate or late"),
                "{detail}"
            );
        }
        assert_eq!(count(&lines, "completed"), 1);
        let second_lines = timeline(&engine, &second).await;
        assert_eq!(count(&second_lines, "begin"), 1, "{second_lines:?}");
    }
);

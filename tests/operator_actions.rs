//! Operator actions at the edges, on SQLite and on the real PostgreSQL: a Failed saga keeps its
//! order's sequence key until it is resolved (so no two sagas of one order ever run at once),
//! `release-key` resolves it by hand, and `retry` gives a stuck step a fresh retry budget and
//! makes the saga unfinished again. The engine's loops do not run here: the tests play the
//! workers' replies and the due timers themselves.

mod support;

use sagaflow_engine::machine::{Event, Op, Outcome, Resolution, SagaStatus, TimerKind};
use sagaflow_engine::status;
use sagaflow_engine::{Applied, Engine, Incoming};
use serde_json::json;

use support::{ONE_STEP as HOLD, engine_alone as engine, reply};

fn declined() -> Outcome {
    Outcome::Business {
        code: "declined".into(),
        message: "card declined".into(),
    }
}

fn ok() -> Outcome {
    Outcome::Ok { output: json!({}) }
}

async fn detail(engine: &Engine, id: &str) -> status::SagaDetail {
    status::saga(engine.store(), id)
        .await
        .expect("status")
        .expect("saga")
}

async fn state(engine: &Engine, id: &str) -> String {
    detail(engine, id).await.status.name().to_owned()
}

/// Why the last event was ignored, as the timeline says.
async fn ignored_because(engine: &Engine, id: &str) -> String {
    status::last_history(engine.store(), id, "ignored")
        .await
        .expect("history")
        .expect("an ignored entry")
        .detail
}

/// Two sagas of one order, the first of them Failed (its charge declined for good).
async fn first_failed(engine: &Engine, order: &str) -> (String, String) {
    let (first, second) = two_of_one_order(engine, order).await;
    engine
        .apply(&[reply(&first, Op::Action, 1, declined())])
        .await
        .expect("apply");
    (first, second)
}

/// Starts two sagas of one order: the first runs, the second waits behind it.
async fn two_of_one_order(engine: &Engine, order: &str) -> (String, String) {
    let graph = engine.register(HOLD).await.expect("register");
    let input = json!({ "order_id": order });
    let first = engine
        .start(&graph, input.clone(), None)
        .await
        .expect("first")
        .id;
    let second = engine.start(&graph, input, None).await.expect("second").id;
    assert_eq!(state(engine, &first).await, "running");
    assert_eq!(state(engine, &second).await, "queued");
    (first, second)
}

on_both_backends!(
    a_failed_saga_keeps_its_orders_key,
    |url: String| async move {
        let engine = engine(&url).await;
        let (first, second) = first_failed(&engine, "o-failed").await;
        assert_eq!(state(&engine, &first).await, "failed");
        // The bug this pins: Failed released the key, and the second saga began while the first
        // still had to be retried (and could then compensate) — two sagas of one order at once.
        assert_eq!(
            state(&engine, &second).await,
            "queued",
            "a Failed saga holds its order's key"
        );
        assert_eq!(
            detail(&engine, &first).await.waiting,
            vec![second.clone()],
            "status shows who waits"
        );

        // Resolved by a retry that succeeds: the key goes to the next saga.
        assert_eq!(
            engine.retry(&first, "ops").await.expect("retry"),
            Applied::Changed
        );
        assert_eq!(state(&engine, &second).await, "queued");
        engine
            .apply(&[reply(&first, Op::Action, 2, ok())])
            .await
            .expect("apply");
        assert_eq!(state(&engine, &first).await, "completed");
        assert_eq!(state(&engine, &second).await, "running");
        assert!(detail(&engine, &first).await.waiting.is_empty());
    }
);

on_both_backends!(
    an_operator_can_release_a_failed_sagas_key,
    |url: String| async move {
        let engine = engine(&url).await;
        let (first, second) = first_failed(&engine, "o-release").await;
        assert_eq!(state(&engine, &second).await, "queued");

        // Releasing a running saga's key is refused: it would let two run at once.
        let refused = engine
            .release_key(&second, "ops", "not mine")
            .await
            .expect("release");
        assert_eq!(refused, Applied::Ignored);
        assert!(
            ignored_because(&engine, &second)
                .await
                .contains("the saga is queued")
        );

        let released = engine
            .release_key(&first, "ops@desk", "refunded by hand, ticket 42")
            .await
            .expect("release");
        assert_eq!(released, Applied::Changed);
        assert_eq!(state(&engine, &first).await, "failed", "it stays Failed");
        assert_eq!(
            state(&engine, &second).await,
            "running",
            "the next saga begins"
        );
        let detail = status::saga(engine.store(), &first)
            .await
            .expect("status")
            .expect("saga");
        assert!(
            detail.timeline.iter().any(|t| t.kind == "key-released"
                && t.detail.contains("ops@desk")
                && t.detail.contains("ticket 42")),
            "{:?}",
            detail.timeline
        );
        // Its key is gone: retrying it now could run it beside the next saga, so that is refused.
        assert_eq!(
            engine.retry(&first, "ops").await.expect("retry"),
            Applied::Ignored
        );
        assert!(
            ignored_because(&engine, &first)
                .await
                .contains("its sequence key was released")
        );
        assert!(matches!(
            status::saga(engine.store(), &first)
                .await
                .expect("status")
                .expect("saga")
                .status,
            SagaStatus::Failed { .. }
        ));
    }
);

/// Runs `sagaflow ARGS --database-url URL` off the test's runtime thread.
async fn cli(url: &str, args: &[&str]) -> std::process::Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_sagaflow"));
    cmd.args(args).args(["--database-url", url]);
    let out = tokio::task::spawn_blocking(move || cmd.output().expect("run sagaflow"))
        .await
        .expect("join");
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("panicked"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

on_both_backends!(
    release_key_from_the_command_line,
    |url: String| async move {
        let engine = engine(&url).await;
        let (first, second) = first_failed(&engine, "o-cli").await;

        let status = cli(&url, &["status", &first]).await;
        let text = String::from_utf8_lossy(&status.stdout).into_owned();
        assert!(status.status.success(), "{text}");
        assert!(
            text.contains(&format!("waiting   {second} (for this saga's key)")),
            "{text}"
        );

        // A running (here: queued) saga's key is not released: exit 1 with the machine's reason.
        let refused = cli(&url, &["release-key", &second, "--reason", "x"]).await;
        assert_eq!(refused.status.code(), Some(1));
        assert!(
            String::from_utf8_lossy(&refused.stderr)
                .contains("release refused: the saga is queued"),
            "{}",
            String::from_utf8_lossy(&refused.stderr)
        );
        // --reason is required.
        let no_reason = cli(&url, &["release-key", &first]).await;
        assert_eq!(no_reason.status.code(), Some(2));
        assert_eq!(state(&engine, &second).await, "queued");

        let released = cli(
            &url,
            &[
                "release-key",
                &first,
                "--reason",
                "refunded by hand",
                "--actor",
                "dana",
            ],
        )
        .await;
        assert!(
            released.status.success(),
            "{}",
            String::from_utf8_lossy(&released.stderr)
        );
        assert!(
            String::from_utf8_lossy(&released.stdout).contains(&format!("saga {first} is failed"))
        );
        assert_eq!(state(&engine, &second).await, "running");
        let entry = status::last_history(engine.store(), &first, "key-released")
            .await
            .expect("history")
            .expect("entry");
        assert!(entry.detail.contains("operator dana"), "{}", entry.detail);
        // Without --actor, the history names user@host.
        let aborted = cli(&url, &["abort", &second, "--reason", "customer called"]).await;
        assert!(
            aborted.status.success(),
            "{}",
            String::from_utf8_lossy(&aborted.stderr)
        );
        let entry = status::last_history(engine.store(), &second, "aborted")
            .await
            .expect("history")
            .expect("entry");
        assert!(
            entry.detail.starts_with("operator ")
                && entry.detail.contains('@')
                && entry.detail.ends_with(": customer called"),
            "{}",
            entry.detail
        );
    }
);

/// A charge, then points; when the points are declined, the charge's refund may fail
/// transiently twice before the saga is Failed.
const UNDO: &str = r#"
name: undo
version: 1
sequence_key: ${input.order_id}
input:
  order_id: string
defaults:
  compensation_retry: { max_attempts: 2, initial_backoff: 10ms, max_backoff: 10ms }
steps:
  - id: charge
    service: payment
    action: charge
    compensation: refund
    params: { order_id: "${input.order_id}" }
  - id: points
    service: points
    depends_on: [charge]
    action: grant
    compensation: revoke
    params: { order_id: "${input.order_id}" }
"#;

fn refund_failed(saga: &str, attempt: u32) -> Incoming {
    reply(
        saga,
        Op::Compensate,
        attempt,
        Outcome::Retryable {
            message: "bank offline".into(),
        },
    )
}

/// The retry backoff before the refund's `attempt` is over.
fn refund_due(saga: &str, attempt: u32) -> Incoming {
    Incoming {
        saga_id: saga.to_owned(),
        event: Event::Timer {
            step: 0,
            op: Op::Compensate,
            attempt,
            kind: TimerKind::Retry,
        },
        timer_id: None,
    }
}

async fn apply(engine: &Engine, event: Incoming) {
    engine.apply(&[event]).await.expect("apply");
}

on_both_backends!(
    retry_gives_a_fresh_budget_and_unfinishes_the_saga,
    |url: String| async move {
        let engine = engine(&url).await;
        let graph = engine.register(UNDO).await.expect("register");
        let id = engine
            .start(&graph, json!({ "order_id": "o-undo" }), None)
            .await
            .expect("start")
            .id;
        // Charged, then the points are declined: refund the charge. The refund fails twice
        // (its whole budget): Failed.
        apply(&engine, reply(&id, Op::Action, 1, ok())).await;
        let points_declined = Incoming {
            event: Event::Reply {
                step: 1,
                op: Op::Action,
                attempt: 1,
                outcome: declined(),
            },
            ..reply(&id, Op::Action, 1, ok())
        };
        apply(&engine, points_declined).await;
        apply(&engine, refund_failed(&id, 1)).await;
        apply(&engine, refund_due(&id, 2)).await;
        apply(&engine, refund_failed(&id, 2)).await;
        let failed = detail(&engine, &id).await;
        assert_eq!(failed.status.name(), "failed");
        assert!(failed.finished_at.is_some());

        // The retry resumes with attempt 3, a first attempt of a new budget of 2.
        assert_eq!(
            engine.retry(&id, "ops").await.expect("retry"),
            Applied::Changed
        );
        let resumed = detail(&engine, &id).await;
        assert!(
            resumed
                .timeline
                .iter()
                .any(|t| t.kind == "retry" && t.detail.starts_with("operator ops: retry")),
            "who retried is in the history: {:?}",
            resumed.timeline
        );
        assert_eq!(resumed.status.name(), "compensating");
        assert_eq!(
            resumed.finished_at, None,
            "a retried saga is unfinished again (so `sagaflow dev --orders 0` drives it)"
        );
        apply(&engine, refund_failed(&id, 3)).await;
        // The bug this pins: attempt 3 counted against the old budget, and the saga was Failed
        // again after one try.
        assert_eq!(
            state(&engine, &id).await,
            "compensating",
            "attempt 3 is the first of a fresh budget"
        );
        apply(&engine, refund_due(&id, 4)).await;
        apply(&engine, refund_failed(&id, 4)).await;
        let again = detail(&engine, &id).await;
        assert_eq!(
            again.status.name(),
            "failed",
            "the fresh budget was 2 attempts"
        );
        assert!(
            again
                .timeline
                .iter()
                .any(|t| t.detail.contains("still failing after 2 attempts")),
            "{:?}",
            again.timeline
        );
        // A second retry, and a refund that works: Compensated.
        assert_eq!(
            engine.retry(&id, "ops").await.expect("retry"),
            Applied::Changed
        );
        apply(&engine, reply(&id, Op::Compensate, 5, ok())).await;
        assert_eq!(state(&engine, &id).await, "compensated");
    }
);

/// A charge then points, within 30 minutes; `pivot` makes the charge irreversible.
fn with_deadline(pivot: bool) -> String {
    let compensation = if pivot {
        "compensation: none\n    irreversible_reason: \"a wire transfer\""
    } else {
        "compensation: refund"
    };
    format!(
        r#"
name: timed
version: 1
sequence_key: ${{input.order_id}}
deadline: 30m
input:
  order_id: string
steps:
  - id: charge
    service: payment
    action: charge
    {compensation}
    params: {{ order_id: "${{input.order_id}}" }}
  - id: points
    service: points
    depends_on: [charge]
    action: grant
    compensation: revoke
    on_failure: retry
    params: {{ order_id: "${{input.order_id}}" }}
"#
    )
}

fn deadline_due(saga: &str) -> Incoming {
    Incoming {
        saga_id: saga.to_owned(),
        event: Event::Timer {
            step: 0,
            op: Op::Action,
            attempt: 0,
            kind: TimerKind::Deadline,
        },
        timer_id: None,
    }
}

on_both_backends!(
    past_its_deadline_a_saga_compensates_unless_past_its_pivot,
    |url: String| async move {
        let engine = engine(&url).await;

        // Reversible: past the deadline it stops going forward and compensates.
        let graph = engine
            .register(&with_deadline(false))
            .await
            .expect("register");
        let id = engine
            .start(&graph, json!({ "order_id": "o-late" }), None)
            .await
            .expect("start")
            .id;
        let started = detail(&engine, &id).await;
        let due = engine
            .store()
            .next_timers(10)
            .await
            .expect("timers")
            .into_iter()
            .find(|t| t.saga_id == id && t.id.ends_with("/deadline"))
            .expect("a deadline timer");
        assert_eq!(due.due_at, started.created_at + 30 * 60 * 1000);
        apply(&engine, reply(&id, Op::Action, 1, ok())).await;
        apply(&engine, deadline_due(&id)).await;
        let late = detail(&engine, &id).await;
        assert_eq!(late.status.name(), "compensating");
        assert!(
            late.timeline
                .iter()
                .any(|t| t.kind == "deadline"
                    && t.detail == "its deadline of 30m passed: compensating"),
            "{:?}",
            late.timeline
        );

        // Irreversible and started: it can only go forward, and the history says why.
        let graph = engine
            .register(&with_deadline(true))
            .await
            .expect("register");
        let id = engine
            .start(&graph, json!({ "order_id": "o-pivot" }), None)
            .await
            .expect("start")
            .id;
        apply(&engine, deadline_due(&id)).await;
        let pivot = detail(&engine, &id).await;
        assert_eq!(pivot.status.name(), "running");
        assert!(
            pivot.timeline.iter().any(|t| t.kind == "deadline"
                && t.detail
                    .contains("passed, but an irreversible step has started")),
            "{:?}",
            pivot.timeline
        );
        // Once final, its deadline timer is gone.
        apply(&engine, reply(&id, Op::Action, 1, ok())).await;
        let points = Incoming {
            event: Event::Reply {
                step: 1,
                op: Op::Action,
                attempt: 1,
                outcome: ok(),
            },
            ..reply(&id, Op::Action, 1, ok())
        };
        apply(&engine, points).await;
        assert_eq!(state(&engine, &id).await, "completed");
        let left = engine.store().next_timers(100).await.expect("timers");
        assert!(!left.iter().any(|t| t.saga_id == id), "{left:?}");
    }
);

on_both_backends!(
    bulk_actions_by_filter_with_a_dry_run,
    |url: String| async move {
        let engine = engine(&url).await;
        let (failed_a, queued_a) = first_failed(&engine, "o-bulk-a").await;
        let (failed_b, queued_b) = first_failed(&engine, "o-bulk-b").await;

        let dry = cli(
            &url,
            &["retry", "--state", "failed", "--saga", "hold", "--dry-run"],
        )
        .await;
        let text = String::from_utf8_lossy(&dry.stdout).into_owned();
        assert!(dry.status.success(), "{text}");
        assert!(
            text.starts_with("retry would touch 2 sagas (dry run: nothing changed)"),
            "{text}"
        );
        assert!(
            text.contains(&failed_a) && text.contains(&failed_b),
            "{text}"
        );
        assert_eq!(
            state(&engine, &failed_a).await,
            "failed",
            "a dry run changes nothing"
        );
        // Another definition's name matches nothing.
        let none = cli(
            &url,
            &["retry", "--state", "failed", "--saga", "other", "--dry-run"],
        )
        .await;
        assert!(String::from_utf8_lossy(&none.stdout).starts_with("retry would touch 0 sagas"));

        let done = cli(
            &url,
            &[
                "retry", "--state", "failed", "--saga", "hold", "--actor", "bulk-ops",
            ],
        )
        .await;
        let text = String::from_utf8_lossy(&done.stdout).into_owned();
        assert!(done.status.success(), "{text}");
        assert!(
            text.contains("retry: 2 of 2 sagas done, 0 refused"),
            "{text}"
        );
        for id in [&failed_a, &failed_b] {
            assert_eq!(state(&engine, id).await, "running");
            let entry = status::last_history(engine.store(), id, "retry")
                .await
                .expect("history")
                .expect("entry");
            assert!(
                entry.detail.starts_with("operator bulk-ops: retry"),
                "{}",
                entry.detail
            );
        }
        // Aborting the queued ones by filter; one refusal (here: none left) would exit 1.
        let aborted = cli(
            &url,
            &["abort", "--state", "queued", "--reason", "duplicate orders"],
        )
        .await;
        let text = String::from_utf8_lossy(&aborted.stdout).into_owned();
        assert!(aborted.status.success(), "{text}");
        assert!(
            text.contains("abort: 2 of 2 sagas done, 0 refused"),
            "{text}"
        );
        for id in [&queued_a, &queued_b] {
            assert_eq!(state(&engine, id).await, "compensated");
        }
        // A filter and an id at once, or neither: refused by the command line.
        let both = cli(&url, &["retry", &failed_a, "--state", "failed"]).await;
        assert_eq!(both.status.code(), Some(2));
        let neither = cli(&url, &["retry"]).await;
        assert_eq!(neither.status.code(), Some(2));
    }
);

/// The commands waiting in the outbox: (step, op, attempt) of each, oldest first.
async fn outbox_commands(engine: &Engine) -> Vec<(String, String, u64)> {
    let rows = sqlx::query("SELECT payload FROM outbox ORDER BY id")
        .fetch_all(engine.store().pool())
        .await
        .expect("outbox");
    rows.iter()
        .map(|r| {
            let payload: String = sqlx::Row::try_get(r, "payload").expect("payload");
            let doc: serde_json::Value = serde_json::from_str(&payload).expect("json");
            let c = &doc;
            (
                c["step_id"].as_str().unwrap_or_default().to_owned(),
                c["op"].as_str().unwrap_or_default().to_owned(),
                c["attempt"].as_u64().unwrap_or_default(),
            )
        })
        .collect()
}

on_both_backends!(
    a_paused_saga_dispatches_nothing_until_it_resumes,
    |url: String| async move {
        let engine = engine(&url).await;
        let graph = engine
            .register(&support::order_saga())
            .await
            .expect("register");
        let input = json!({"order_id": "p-1", "user_id": "u-1", "amount": "5.00", "coupon_id": "c-1", "points": 5, "campaign_id": "x"});
        let id = engine.start(&graph, input, None).await.expect("start").id;
        assert_eq!(outbox_commands(&engine).await.len(), 1, "the charge");
        assert_eq!(
            engine
                .pause(&id, "ops@desk", "fraud check")
                .await
                .expect("pause"),
            Applied::Changed
        );
        // The charge succeeds while paused: recorded, but nothing new goes out.
        apply(
            &engine,
            reply(
                &id,
                Op::Action,
                1,
                Outcome::Ok {
                    output: json!({"txn_id": "t-1"}),
                },
            ),
        )
        .await;
        let paused = detail(&engine, &id).await;
        assert_eq!(paused.steps[0].status, "succeeded");
        assert_eq!(
            outbox_commands(&engine).await.len(),
            1,
            "nothing dispatched while paused"
        );
        let p = paused.paused.clone().expect("paused");
        assert_eq!(
            (p.actor.as_str(), p.reason.as_str()),
            ("ops@desk", "fraud check")
        );
        assert_eq!(p.held, vec![1, 2, 3]);
        assert!(
            paused
                .timeline
                .iter()
                .any(|t| t.kind == "paused" && t.detail.contains("operator ops@desk")),
            "{:?}",
            paused.timeline
        );
        assert_eq!(
            engine.pause(&id, "ops", "again").await.expect("pause"),
            Applied::Ignored
        );
        assert!(
            ignored_because(&engine, &id)
                .await
                .contains("already paused by ops@desk")
        );

        assert_eq!(
            engine.resume(&id, "ops@desk").await.expect("resume"),
            Applied::Changed
        );
        let mut sent = outbox_commands(&engine).await;
        sent.sort();
        assert_eq!(
            sent,
            vec![
                ("coupon".to_owned(), "try".to_owned(), 1),
                ("gmv".to_owned(), "action".to_owned(), 1),
                ("payment".to_owned(), "action".to_owned(), 1),
                ("points".to_owned(), "action".to_owned(), 1),
            ]
        );
        assert!(detail(&engine, &id).await.paused.is_none());
        assert_eq!(
            engine.resume(&id, "ops").await.expect("resume"),
            Applied::Ignored
        );
        assert!(ignored_because(&engine, &id).await.contains("not paused"));
    }
);

on_both_backends!(
    skip_resolves_a_stuck_step_and_the_next_saga_of_the_order_runs,
    |url: String| async move {
        let engine = engine(&url).await;
        let (first, second) = first_failed(&engine, "o-skip").await;
        assert_eq!(
            engine
                .skip(
                    &first,
                    "nope",
                    Resolution::Done { output: json!({}) },
                    "ops",
                    "x"
                )
                .await
                .expect("skip"),
            Applied::Ignored
        );
        assert!(
            ignored_because(&engine, &first)
                .await
                .contains("no step `nope`; its steps are charge")
        );
        assert_eq!(
            engine
                .skip(
                    &first,
                    "charge",
                    Resolution::Done {
                        output: json!({"txn_id": "by-hand"})
                    },
                    "ops@desk",
                    "charged by phone",
                )
                .await
                .expect("skip"),
            Applied::Changed
        );
        let done = detail(&engine, &first).await;
        assert_eq!(done.status.name(), "completed");
        assert!(
            done.timeline.iter().any(|t| t.kind == "skip"
                && t.detail.contains("operator ops@desk")
                && t.detail.contains("charged by phone")),
            "{:?}",
            done.timeline
        );
        // Completed: the key goes to the order's next saga.
        assert_eq!(state(&engine, &second).await, "running");
    }
);

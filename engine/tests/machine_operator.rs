//! The operator's events on the pure state machine: pause and resume (nothing is dispatched
//! while paused, replies still apply, what was held goes out on resume) and skip (a stuck step
//! resolved by hand, done with an output or without effect, and the saga goes on).

use sagaflow_dsl::{SagaGraph, compile};
use sagaflow_engine::machine::{
    Context, Decision, Event, Op, Outcome, Resolution, SagaState, SagaStatus, StepStatus,
    TimerKind, decide,
};
use serde_json::{Value, json};

fn order() -> SagaGraph {
    compile(include_str!("../../sagas/order.yaml"))
        .graph
        .expect("the shipped saga is valid")
}

fn input() -> Value {
    json!({"order_id": "o-1", "user_id": "u-1", "amount": "10.00", "coupon_id": "c-1", "points": 10, "campaign_id": "spring"})
}

/// A saga driven by hand: every decision is kept for inspection.
struct Run<'g> {
    graph: &'g SagaGraph,
    state: SagaState,
    now: i64,
}

impl<'g> Run<'g> {
    fn new(graph: &'g SagaGraph, input: Value) -> Self {
        let mut run = Run {
            graph,
            state: SagaState::new(graph, input),
            now: 1_000,
        };
        run.event(Event::Begin);
        run
    }

    fn event(&mut self, event: Event) -> Decision {
        self.now += 10;
        let d = decide(
            self.graph,
            &self.state,
            &event,
            Context {
                now: self.now,
                random: 0.5,
            },
        );
        self.state = d.state.clone();
        d
    }

    fn ok(&mut self, step: usize, op: Op, attempt: u32, output: Value) -> Decision {
        self.event(Event::Reply {
            step,
            op,
            attempt,
            outcome: Outcome::Ok { output },
        })
    }

    fn business(&mut self, step: usize, op: Op, attempt: u32) -> Decision {
        self.event(Event::Reply {
            step,
            op,
            attempt,
            outcome: Outcome::Business {
                code: "no".into(),
                message: "refused".into(),
            },
        })
    }

    fn pause(&mut self) -> Decision {
        self.event(Event::Pause {
            actor: "ops@desk".into(),
            reason: "fraud check".into(),
        })
    }

    fn resume(&mut self) -> Decision {
        self.event(Event::Resume {
            actor: "ops@desk".into(),
        })
    }

    fn skip(&mut self, step: &str, resolution: Resolution) -> Decision {
        self.event(Event::Skip {
            step: step.into(),
            resolution,
            actor: "ops@desk".into(),
            reason: "fixed by hand, ticket 7".into(),
        })
    }
}

/// The detail of the decision's `ignored` history line.
fn refusal(d: &Decision) -> String {
    assert!(d.ignored, "expected a refusal, got {d:?}");
    d.history
        .iter()
        .find(|h| h.kind == "ignored")
        .map(|h| h.detail.clone())
        .expect("an ignored line")
}

fn kinds(d: &Decision) -> Vec<&str> {
    d.history.iter().map(|h| h.kind.as_str()).collect()
}

#[test]
fn a_paused_saga_dispatches_nothing_and_resume_sends_what_was_held() {
    let g = order();
    let mut run = Run::new(&g, input());
    assert_eq!(
        run.state.steps[0],
        StepStatus::Active {
            op: Op::Action,
            attempt: 1,
            waiting: false
        }
    );

    let d = run.pause();
    assert!(!d.ignored && d.commands.is_empty());
    assert!(run.state.paused.is_some());

    // The payment answers while paused: recorded, but its dependents wait.
    let d = run.ok(0, Op::Action, 1, json!({"txn_id": "t-1"}));
    assert!(!d.ignored);
    assert_eq!(run.state.steps[0], StepStatus::Succeeded);
    assert!(
        d.commands.is_empty(),
        "dispatched while paused: {:?}",
        d.commands
    );
    assert!(
        d.timers.is_empty(),
        "a held step has no timer: {:?}",
        d.timers
    );
    assert_eq!(kinds(&d).iter().filter(|k| **k == "held").count(), 3);
    for i in 1..4 {
        assert!(matches!(
            run.state.steps[i],
            StepStatus::Active {
                attempt: 1,
                waiting: true,
                ..
            }
        ));
    }
    assert_eq!(
        run.state.paused.as_ref().map(|p| p.held.clone()),
        Some(vec![1, 2, 3])
    );
    assert_eq!(run.state.status, SagaStatus::Running);

    assert!(refusal(&run.pause()).contains("already paused by ops@desk"));

    let d = run.resume();
    assert!(!d.ignored);
    assert!(run.state.paused.is_none());
    let sent: Vec<(usize, Op, u32)> = d
        .commands
        .iter()
        .map(|c| (c.step, c.op, c.attempt))
        .collect();
    assert_eq!(
        sent,
        vec![(1, Op::Try, 1), (2, Op::Action, 1), (3, Op::Action, 1)]
    );
    assert_eq!(d.commands[2].params["payment_txn"], json!("t-1"));
    assert_eq!(
        d.timers
            .iter()
            .filter(|t| t.kind == TimerKind::Timeout)
            .count(),
        3
    );
    assert!(
        d.history
            .iter()
            .any(|h| h.kind == "resumed" && h.detail.contains("coupon, points, gmv"))
    );

    assert!(refusal(&run.resume()).contains("not paused"));
}

#[test]
fn a_retry_due_while_paused_waits_for_the_resume() {
    let g = order();
    let mut run = Run::new(&g, input());
    let d = run.event(Event::Reply {
        step: 0,
        op: Op::Action,
        attempt: 1,
        outcome: Outcome::Retryable {
            message: "flaky".into(),
        },
    });
    let retry = d
        .timers
        .iter()
        .find(|t| t.kind == TimerKind::Retry)
        .expect("a retry timer")
        .clone();
    run.pause();
    let d = run.event(Event::Timer {
        step: 0,
        op: Op::Action,
        attempt: retry.attempt,
        kind: TimerKind::Retry,
    });
    assert!(d.commands.is_empty(), "dispatched while paused");
    assert!(kinds(&d).contains(&"held"));
    let d = run.resume();
    assert_eq!(d.commands.len(), 1);
    assert_eq!((d.commands[0].step, d.commands[0].attempt), (0, 2));
}

#[test]
fn an_abort_while_paused_compensates_only_after_the_resume() {
    let g = order();
    let mut run = Run::new(&g, input());
    run.pause();
    // The charge answers while paused: its three dependents are held, never sent.
    run.ok(0, Op::Action, 1, json!({"txn_id": "t-1"}));
    let d = run.event(Event::Abort {
        actor: "ops".into(),
        reason: "customer cancelled".into(),
    });
    assert!(!d.ignored);
    assert!(
        d.commands.is_empty(),
        "compensation dispatched while paused"
    );
    assert!(matches!(run.state.status, SagaStatus::Compensating { .. }));
    // The three held steps were never sent: they cannot have taken effect.
    for i in 1..4 {
        assert_eq!(run.state.steps[i], StepStatus::Skipped);
    }
    let d = run.resume();
    let ops: Vec<(usize, Op)> = d.commands.iter().map(|c| (c.step, c.op)).collect();
    assert_eq!(ops, vec![(0, Op::Compensate)]);
    run.ok(0, Op::Compensate, 1, json!(null));
    assert!(matches!(run.state.status, SagaStatus::Compensated { .. }));
}

#[test]
fn a_saga_that_finishes_while_paused_ends_its_pause() {
    let g = order();
    let mut run = Run::new(&g, input());
    run.ok(0, Op::Action, 1, json!({"txn_id": "t-1"}));
    run.ok(1, Op::Try, 1, json!({}));
    run.ok(2, Op::Action, 1, json!({}));
    run.pause();
    // Only the confirm is left after gmv: it is held, so the saga cannot finish yet.
    let d = run.ok(3, Op::Action, 1, json!({}));
    assert!(d.commands.is_empty());
    assert_eq!(run.state.status, SagaStatus::Running);
    let d = run.resume();
    assert_eq!(d.commands.len(), 1);
    assert_eq!(d.commands[0].op, Op::Confirm);
    run.ok(1, Op::Confirm, 1, json!({}));
    assert_eq!(run.state.status, SagaStatus::Completed);

    // Paused with nothing left to hold: the last answer completes it and ends the pause.
    let mut run = Run::new(&g, input());
    run.ok(0, Op::Action, 1, json!({"txn_id": "t-1"}));
    run.ok(1, Op::Try, 1, json!({}));
    run.ok(2, Op::Action, 1, json!({}));
    run.ok(3, Op::Action, 1, json!({}));
    run.pause();
    let d = run.ok(1, Op::Confirm, 1, json!({}));
    assert_eq!(run.state.status, SagaStatus::Completed);
    assert!(run.state.paused.is_none());
    assert!(kinds(&d).contains(&"resumed"));
    assert!(refusal(&run.pause()).contains("completed"));
}

/// The coupon's confirm refused for good: the saga is Failed with it stuck.
fn confirm_stuck(g: &SagaGraph) -> Run<'_> {
    let mut run = Run::new(g, input());
    run.ok(0, Op::Action, 1, json!({"txn_id": "t-1"}));
    run.ok(1, Op::Try, 1, json!({}));
    run.ok(2, Op::Action, 1, json!({}));
    run.ok(3, Op::Action, 1, json!({}));
    run.business(1, Op::Confirm, 1);
    assert!(
        matches!(run.state.status, SagaStatus::Failed { .. }),
        "{:?}",
        run.state.status
    );
    assert!(matches!(
        run.state.steps[1],
        StepStatus::Stuck {
            op: Op::Confirm,
            ..
        }
    ));
    run
}

#[test]
fn skip_marks_a_stuck_confirm_done_and_the_saga_completes() {
    let g = order();
    let mut run = confirm_stuck(&g);
    assert!(
        refusal(&run.skip("coupon", Resolution::Compensated))
            .contains("cannot be marked compensated")
    );
    assert!(
        refusal(&run.skip("points", Resolution::Done { output: json!({}) }))
            .contains("not stuck; the stuck steps are coupon")
    );
    assert!(
        refusal(&run.skip("shipping", Resolution::Done { output: json!({}) }))
            .contains("no step `shipping`; its steps are payment, coupon, points, gmv")
    );

    let d = run.skip("coupon", Resolution::Done { output: json!({}) });
    assert!(!d.ignored);
    assert_eq!(run.state.steps[1], StepStatus::Confirmed);
    assert_eq!(run.state.status, SagaStatus::Completed);
    let line = d
        .history
        .iter()
        .find(|h| h.kind == "skip")
        .expect("a skip line");
    assert!(
        line.detail.contains("operator ops@desk") && line.detail.contains("ticket 7"),
        "{line:?}"
    );

    assert!(
        refusal(&run.skip("coupon", Resolution::Done { output: json!({}) }))
            .contains("the saga is completed")
    );
}

#[test]
fn skip_marks_a_stuck_compensation_done_and_the_saga_compensates() {
    let g = order();
    let mut run = Run::new(&g, input());
    run.ok(0, Op::Action, 1, json!({"txn_id": "t-1"}));
    run.business(1, Op::Try, 1);
    assert!(matches!(run.state.status, SagaStatus::Compensating { .. }));
    // points and gmv are undone; the refund is refused for good.
    run.ok(2, Op::Compensate, 1, json!(null));
    run.ok(3, Op::Compensate, 1, json!(null));
    run.business(0, Op::Compensate, 1);
    assert!(matches!(
        run.state.status,
        SagaStatus::Failed {
            compensating: Some(_),
            ..
        }
    ));

    let d = run.skip("payment", Resolution::Compensated);
    assert!(!d.ignored, "{d:?}");
    assert_eq!(run.state.steps[0], StepStatus::Compensated);
    assert!(
        matches!(run.state.status, SagaStatus::Compensated { .. }),
        "{:?}",
        run.state.status
    );
}

const RETRY_TO_SUCCESS: &str = r#"
name: two
version: 1
sequence_key: ${input.k}
input: {k: string}
steps:
  - id: a
    service: svc
    action: go
    compensation: undo
    on_failure: retry
    outputs: [x]
    params: {k: "${input.k}"}
  - id: b
    service: svc
    action: go
    compensation: undo
    depends_on: [a]
    params: {x: "${steps.a.output.x}"}
"#;

#[test]
fn skip_gives_a_stuck_forward_step_its_output_or_compensates_the_saga() {
    let g = compile(RETRY_TO_SUCCESS).graph.expect("valid");
    let stuck = || {
        let mut run = Run::new(&g, json!({"k": "o-1"}));
        run.business(0, Op::Action, 1);
        assert!(matches!(
            run.state.steps[0],
            StepStatus::Stuck { op: Op::Action, .. }
        ));
        run
    };

    let mut run = stuck();
    let why = refusal(&run.skip(
        "a",
        Resolution::Done {
            output: json!({"y": 1}),
        },
    ));
    assert!(
        why.contains("declares the outputs x; the output given lacks x"),
        "{why}"
    );
    let d = run.skip(
        "a",
        Resolution::Done {
            output: json!({"x": 42}),
        },
    );
    assert_eq!(run.state.steps[0], StepStatus::Succeeded);
    assert_eq!(run.state.status, SagaStatus::Running);
    assert_eq!(d.commands.len(), 1);
    assert_eq!(d.commands[0].params["x"], json!(42));
    run.ok(1, Op::Action, 1, json!({}));
    assert_eq!(run.state.status, SagaStatus::Completed);

    // Without effect: a required step did not happen, so the saga compensates (nothing to undo).
    let mut run = stuck();
    let d = run.skip("a", Resolution::Compensated);
    assert!(!d.ignored);
    assert!(
        matches!(run.state.status, SagaStatus::Compensated { .. }),
        "{:?}",
        run.state.status
    );
    assert_eq!(run.state.steps[1], StepStatus::Pending, "b never ran");
}

#[test]
fn skip_and_pause_are_refused_where_they_make_no_sense() {
    let g = order();
    let mut run = Run::new(&g, input());
    assert!(
        refusal(&run.skip("payment", Resolution::Done { output: json!({}) }))
            .contains("the saga is running")
    );
    // A Failed saga whose key was released never runs again.
    let mut run = confirm_stuck(&g);
    run.event(Event::ReleaseKey {
        actor: "ops".into(),
        reason: "by hand".into(),
    });
    assert!(
        refusal(&run.skip("coupon", Resolution::Done { output: json!({}) }))
            .contains("sequence key was released")
    );
}

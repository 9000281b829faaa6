//! The whole system in one process — engine, the four services, the in-process transport — on
//! SQLite and on the real PostgreSQL, each test in a database of its own.

mod support;

use std::time::Duration;

use sagaflow_engine::Applied;
use sagaflow_engine::transport::memory::Faults as NetFaults;
use sagaflow_workers::runtime::Faults;
use sqlx::Row;
use support::{Setup, System, assert_invariants, counts, wait_all_final};

const LIMIT: Duration = Duration::from_secs(90);

async fn start_all(sys: &System, orders: &[serde_json::Value]) -> Vec<String> {
    let mut ids = Vec::new();
    for o in orders {
        ids.push(
            sys.engine
                .start(&sys.order, o.clone(), None)
                .await
                .expect("start")
                .id,
        );
    }
    ids
}

on_both_backends!(happy_path_each_effect_once, |url: String| async move {
    let sys = System::start(&url, Setup::default()).await;
    let orders = sys.orders("happy", 20).await;
    start_all(&sys, &orders).await;
    wait_all_final(&sys.store, LIMIT).await;
    assert_eq!(counts(&sys.store).await.get("completed"), Some(&20));
    assert_eq!(assert_invariants(&sys.store).await, 20);
    // One barrier row per operation that ran: charge, freeze, grant, add, use.
    let mut conn = sys.store.pool().acquire().await.unwrap();
    let n: i64 = sqlx::query("SELECT COUNT(*) AS n FROM barrier")
        .fetch_one(&mut *conn)
        .await
        .unwrap()
        .try_get("n")
        .unwrap();
    assert_eq!(n, 20 * 5);
    drop(conn);
    let engine = sys.engine.clone();
    sys.stop().await;
    // Every command went from the commit that wrote it straight to the relay: none had to be
    // claimed, and the outbox is empty.
    assert_eq!(engine.metrics().outbox_rows(), (20 * 5, 0));
    assert_eq!(engine.store().outbox_stats().await.unwrap().pending, 0);
});

on_both_backends!(
    faults_and_duplicates_reach_final_states,
    |url: String| async move {
        let setup = Setup {
            net: NetFaults {
                duplicate: 0.2,
                ..NetFaults::default()
            },
            coupon: Faults {
                business: 0.25,
                ..Faults::default()
            },
            payment: Faults {
                business: 0.1,
                ..Faults::default()
            },
            points: Faults {
                transient: 0.3,
                ..Faults::default()
            },
            ..Setup::default()
        };
        let sys = System::start(&url, setup).await;
        let orders = sys.orders("faults", 60).await;
        start_all(&sys, &orders).await;
        wait_all_final(&sys.store, LIMIT).await;
        let c = counts(&sys.store).await;
        assert_eq!(c.get("failed"), None, "{c:?}");
        assert!(
            c.get("compensated").copied().unwrap_or(0) > 0,
            "some orders should compensate: {c:?}"
        );
        assert!(c.get("completed").copied().unwrap_or(0) > 0, "{c:?}");
        assert_invariants(&sys.store).await;
        sys.stop().await;
    }
);

on_both_backends!(
    same_key_sagas_run_one_after_another,
    |url: String| async move {
        let sys = System::start(&url, Setup::default()).await;
        let orders = sys.orders("seq", 3).await;
        let mut pairs = Vec::new();
        for o in &orders {
            let paid = sys
                .engine
                .start(&sys.order, o.clone(), None)
                .await
                .unwrap()
                .id;
            let refund = sys
                .engine
                .start(&sys.refund, o.clone(), None)
                .await
                .unwrap()
                .id;
            pairs.push((paid, refund));
        }
        wait_all_final(&sys.store, LIMIT).await;
        assert_eq!(counts(&sys.store).await.get("completed"), Some(&6));
        let mut conn = sys.store.pool().acquire().await.unwrap();
        for (paid, refund) in &pairs {
            let finished: i64 = sqlx::query("SELECT finished_at FROM sagas WHERE id = $1")
                .bind(paid.as_str())
                .fetch_one(&mut *conn)
                .await
                .unwrap()
                .try_get("finished_at")
                .unwrap();
            let kinds: Vec<(String, i64)> =
                sqlx::query("SELECT kind, at FROM saga_history WHERE saga_id = $1 ORDER BY id")
                    .bind(refund.as_str())
                    .fetch_all(&mut *conn)
                    .await
                    .unwrap()
                    .iter()
                    .map(|r| (r.try_get("kind").unwrap(), r.try_get("at").unwrap()))
                    .collect();
            assert_eq!(
                kinds[1].0, "queued",
                "the refund waits behind the payment saga: {kinds:?}"
            );
            let begun = kinds
                .iter()
                .find(|(k, _)| k == "begin")
                .expect("refund began")
                .1;
            assert!(
                begun >= finished,
                "refund began at {begun}, before the payment saga finished at {finished}"
            );
        }
        drop(conn);
        // The refund undid the order: net zero everywhere, and the invariants say so.
        assert_invariants(&sys.store).await;
        sys.stop().await;
    }
);

on_both_backends!(
    engine_crash_mid_run_then_restart,
    |url: String| async move {
        let setup = Setup {
            net: NetFaults {
                duplicate: 0.1,
                ..NetFaults::default()
            },
            points: Faults {
                transient: 0.2,
                ..Faults::default()
            },
            ..Setup::default()
        };
        let sys = System::start(&url, setup).await;
        let orders = sys.orders("crash", 40).await;
        start_all(&sys, &orders).await;
        // Let some finish, then kill everything without cleanup: in-flight messages are lost.
        for _ in 0..200 {
            let done = counts(&sys.store)
                .await
                .get("completed")
                .copied()
                .unwrap_or(0);
            if done >= 8 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let store = sys.store.clone();
        sys.crash().await;
        let unfinished: i64 = {
            let mut conn = store.pool().acquire().await.unwrap();
            sqlx::query("SELECT COUNT(*) AS n FROM sagas WHERE finished_at IS NULL")
                .fetch_one(&mut *conn)
                .await
                .unwrap()
                .try_get("n")
                .unwrap()
        };
        assert!(unfinished > 0, "the crash should leave work unfinished");
        drop(store);
        let sys = System::start(&url, setup).await;
        wait_all_final(&sys.store, LIMIT).await;
        assert_eq!(counts(&sys.store).await.values().sum::<i64>(), 40);
        assert_invariants(&sys.store).await;
        sys.stop().await;
    }
);

on_both_backends!(
    operator_abort_compensates_a_running_saga,
    |url: String| async move {
        let slow = Faults {
            slow: 1.0,
            slow_for: Duration::from_millis(300),
            ..Faults::default()
        };
        let sys = System::start(
            &url,
            Setup {
                payment: slow,
                ..Setup::default()
            },
        )
        .await;
        let orders = sys.orders("abort", 1).await;
        let id = start_all(&sys, &orders).await.remove(0);
        assert_eq!(
            sys.engine
                .abort(&id, "ops", "customer cancelled")
                .await
                .unwrap(),
            Applied::Changed
        );
        wait_all_final(&sys.store, LIMIT).await;
        assert_eq!(counts(&sys.store).await.get("compensated"), Some(&1));
        assert_invariants(&sys.store).await;
        // Abort of a finished saga is refused, and says why.
        assert_eq!(
            sys.engine.abort(&id, "ops", "again").await.unwrap(),
            Applied::Ignored
        );
        assert!(sys.engine.abort("no-such-saga", "ops", "x").await.is_err());
        sys.stop().await;
    }
);

on_both_backends!(
    start_is_idempotent_and_checks_input,
    |url: String| async move {
        let sys = System::start(&url, Setup::default()).await;
        let orders = sys.orders("idem", 1).await;
        let a = sys
            .engine
            .start(&sys.order, orders[0].clone(), Some("client-key-1"))
            .await
            .unwrap();
        let b = sys
            .engine
            .start(&sys.order, orders[0].clone(), Some("client-key-1"))
            .await
            .unwrap();
        assert_eq!(a.id, b.id);
        assert!(!a.existing && b.existing);
        let mut bad = orders[0].clone();
        bad["amount"] = serde_json::json!("a lot");
        bad.as_object_mut().unwrap().remove("user_id");
        let err = sys
            .engine
            .start(&sys.order, bad, None)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`user_id` is required")
                && err.contains("`amount` must be an exact decimal"),
            "{err}"
        );
        // Money through a float is refused, not rounded: 0.1 + 0.2 is not 0.3 in binary.
        for inexact in [
            serde_json::json!(129.9),
            serde_json::json!("1e3"),
            serde_json::json!("NaN"),
        ] {
            let mut order = orders[0].clone();
            order["amount"] = inexact.clone();
            let err = sys
                .engine
                .start(&sys.order, order, None)
                .await
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(&format!("`amount` must be an exact decimal: a string like \"129.90\" or a whole number (a JSON number with a fraction would pass through binary floating point), got {inexact}")),
                "{err}"
            );
        }

        wait_all_final(&sys.store, LIMIT).await;
        assert_eq!(counts(&sys.store).await.get("completed"), Some(&1));
        sys.stop().await;
    }
);

/// One charge that must succeed in the end (`on_failure: retry`): a refusal makes it Failed.
const CHARGE_ONLY: &str = r#"
name: charge-only
version: 1
sequence_key: ${input.order_id}
input:
  order_id: string
  user_id: string
  amount: money
  coupon_id: { type: string, required: false }
  points: { type: integer, required: false }
  campaign_id: { type: string, required: false }
steps:
  - id: payment
    service: payment
    action: charge
    compensation: refund
    on_failure: retry
    params:
      account: ${input.user_id}
      amount: ${input.amount}
      order_id: ${input.order_id}
"#;

on_both_backends!(
    a_retry_reaches_the_handler_after_a_business_refusal,
    |url: String| async move {
        // First run: the payment service refuses every charge, so the saga is Failed.
        let refusing = Setup {
            payment: Faults {
                business: 1.0,
                ..Faults::default()
            },
            ..Setup::default()
        };
        let sys = System::start(&url, refusing).await;
        let graph = sys.engine.register(CHARGE_ONLY).await.expect("register");
        let order = sys.orders("refused", 1).await.remove(0);
        let id = sys
            .engine
            .start(&graph, order, None)
            .await
            .expect("start")
            .id;
        wait_all_final(&sys.store, LIMIT).await;
        assert_eq!(counts(&sys.store).await.get("failed"), Some(&1));
        // An operator retries it while no engine runs (as `sagaflow retry` does)...
        assert_eq!(
            sys.engine.retry(&id, "ops").await.expect("retry"),
            Applied::Changed
        );
        sys.stop().await;
        // ...and the next run, with a payment service that now accepts, completes it. The bug
        // this pins: the barrier answered the retried charge with the recorded refusal, so the
        // handler never ran and the saga was Failed again.
        let sys = System::start(&url, Setup::default()).await;
        wait_all_final(&sys.store, LIMIT).await;
        assert_eq!(counts(&sys.store).await.get("completed"), Some(&1));
        let charged: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM payment_ledger WHERE saga_id = $1 AND kind = 'charge'",
        )
        .bind(id.as_str())
        .fetch_one(sys.store.pool())
        .await
        .expect("ledger");
        assert_eq!(charged, 1, "charged exactly once");
        sys.stop().await;
    }
);

on_both_backends!(
    callers_applying_at_once_share_a_transaction_and_get_their_own_answers,
    |url: String| async move {
        let engine = support::engine_alone(&url).await;
        let graph = engine.register(&support::order_saga()).await.expect("saga");
        let orders = support::seed_orders(engine.store(), "group", 64).await;
        // Every connection of the engine's pool held: the first caller's transaction waits
        // for one, and the other callers queue behind it meanwhile.
        let pool = engine.store().pool().clone();
        let mut held = Vec::new();
        for _ in 0..pool.options().get_max_connections() {
            held.push(pool.acquire().await.expect("connection"));
        }
        let commits = engine.store().counters().commits();
        let mut callers = Vec::new();
        for (caller, chunk) in orders.chunks(4).enumerate() {
            let (engine, graph) = (engine.clone(), graph.clone());
            let batch: Vec<(serde_json::Value, Option<String>)> = chunk
                .iter()
                .enumerate()
                .map(|(i, o)| (o.clone(), Some(format!("caller-{caller}-{i}"))))
                .collect();
            callers.push(tokio::spawn(async move {
                let ids: Vec<String> = engine
                    .start_many(&graph, batch.clone())
                    .await
                    .into_iter()
                    .map(|s| s.expect("started").id)
                    .collect();
                (batch, ids)
            }));
        }
        // A wait for the callers to queue, not a timing assertion: had some not queued yet,
        // they would go in a transaction of their own and the count below would say so.
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(held);
        let mut answered = Vec::new();
        for c in callers {
            answered.push(c.await.expect("caller"));
        }
        let used = engine.store().counters().commits() - commits;
        assert!(
            (1..=2).contains(&used),
            "16 callers at once took {used} transactions (the first one's, then the rest together)"
        );
        // Each caller got its own sagas, in its order: starting the same again answers with the
        // saga it was given.
        let mut all = std::collections::BTreeSet::new();
        for (batch, ids) in answered {
            assert_eq!(ids.len(), batch.len());
            let again = engine.start_many(&graph, batch).await;
            for (id, again) in ids.iter().zip(again) {
                let again = again.expect("started again");
                assert!(again.existing, "the same start again finds its saga");
                assert_eq!(&again.id, id, "a caller was answered with another's saga");
                all.insert(id.clone());
            }
        }
        assert_eq!(all.len(), 64, "64 starts, 64 sagas");
    }
);

on_both_backends!(
    sent_rows_are_deleted_by_the_relay_when_no_transaction_follows,
    |url: String| async move {
        let engine = support::engine_alone(&url).await;
        let graph = engine.register(&support::order_saga()).await.expect("saga");
        let orders = support::seed_orders(engine.store(), "sent", 3).await;
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let run = tokio::spawn(engine.clone().run(stopped));
        for _ in 0..2_000 {
            if engine.relay_running() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert!(engine.relay_running(), "the relay did not start");
        // No worker runs, so no reply (and no transaction) follows the starts: the commands'
        // rows, once sent, wait for the relay to delete them itself.
        for o in orders {
            engine.start(&graph, o, None).await.expect("start");
        }
        let deadline = std::time::Instant::now() + LIMIT;
        let sent = loop {
            let (published, _) = engine.metrics().outbox_rows();
            let pending = engine.store().outbox_stats().await.expect("stats").pending;
            if published == 3 && pending == 0 {
                break published;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{published} published, {pending} still in the outbox"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(sent, 3);
        let _ = stop.send(true);
        run.await.expect("engine").expect("engine stopped cleanly");
    }
);

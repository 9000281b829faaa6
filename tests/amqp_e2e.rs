//! Production mode end to end: `sagaflow engine` and `sagaflow worker` processes over the real
//! RabbitMQ and PostgreSQL (each test: a database, a queue prefix and processes of its own).
//! The tests run one at a time: they start several processes each, and one of them force-closes
//! every broker connection.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use sagaflow_engine::machine::{Op, Outcome};
use sagaflow_engine::store::dead_letters::DeadLetterQuery;
use sagaflow_engine::transport::{Message, REPLY_QUEUE, Transport, command_queue};
use sagaflow_engine::wire::{CommandMsg, ReplyMsg};
use serde_json::json;
use sqlx::Row;
use support::deploy::Deployment;
use tokio::sync::Mutex;

static SERIAL: Mutex<()> = Mutex::const_new(());

const FINAL: Duration = Duration::from_secs(120);

/// Every saga final, `n` of them completed, the services' invariants hold, no transition twice.
async fn all_completed_once(d: &Deployment, n: i64) {
    d.wait_all_final(FINAL).await;
    let counts = d.counts().await;
    assert_eq!(counts.get("completed"), Some(&n), "{counts:?}");
    support::assert_invariants(&d.store).await;
    d.assert_no_double_transitions().await;
}

/// A deployment (an engine process and the four workers) in the middle of a run: the first 30
/// of 60 orders started, at least 3 of them final. What a disruption test strikes.
async fn mid_run(test: &str, prefix: &str) -> Option<(Deployment, Vec<serde_json::Value>)> {
    let mut d = Deployment::new(test, 4).await?;
    d.engine_process();
    d.all_workers();
    let orders = d.orders(prefix, 60).await;
    for o in &orders[..30] {
        d.start(o.clone()).await;
    }
    d.wait_final_at_least(3, FINAL).await;
    Some((d, orders))
}

/// After the disruption: the other 30 orders started, and all 60 complete once.
async fn the_rest_completes(d: Deployment, orders: &[serde_json::Value]) {
    for o in &orders[30..] {
        d.start(o.clone()).await;
    }
    all_completed_once(&d, 60).await;
    d.finish().await;
}

async fn rows(d: &Deployment, sql: &'static str, saga: &str) -> Vec<(String, i64)> {
    let mut conn = d.store.pool().acquire().await.expect("conn");
    sqlx::query(sql)
        .bind(saga)
        .fetch_all(&mut *conn)
        .await
        .expect("query")
        .iter()
        .map(|r| (r.try_get(0).expect("text"), r.try_get(1).expect("number")))
        .collect()
}

async fn status(d: &Deployment, saga: &str) -> String {
    let mut conn = d.store.pool().acquire().await.expect("conn");
    sqlx::query("SELECT status FROM sagas WHERE id = $1")
        .bind(saga)
        .fetch_one(&mut *conn)
        .await
        .expect("saga")
        .try_get("status")
        .expect("status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_path_each_effect_once() {
    let _one = SERIAL.lock().await;
    let Some(mut d) = Deployment::new("happy", 4).await else {
        return;
    };
    d.engine_process();
    d.all_workers();
    let orders = d.orders("happy", 3).await;
    let mut ids = Vec::new();
    for o in &orders {
        ids.push(d.start(o.clone()).await);
    }
    d.wait_all_final(FINAL).await;
    for (id, o) in ids.iter().zip(&orders) {
        assert_eq!(status(&d, id).await, "completed");
        let pay = rows(
            &d,
            "SELECT kind, amount FROM payment_ledger WHERE saga_id = $1",
            id,
        )
        .await;
        assert_eq!(pay.len(), 1, "{pay:?}");
        assert_eq!(pay[0].0, "charge");
        let points = rows(
            &d,
            "SELECT kind, delta FROM points_ledger WHERE saga_id = $1",
            id,
        )
        .await;
        assert_eq!(
            points,
            [("grant".to_owned(), o["points"].as_i64().expect("points"))]
        );
        let gmv = rows(
            &d,
            "SELECT kind, delta FROM gmv_ledger WHERE saga_id = $1",
            id,
        )
        .await;
        assert_eq!(gmv.len(), 1, "{gmv:?}");
        let coupon = rows(
            &d,
            "SELECT state, 0::BIGINT FROM coupons WHERE saga_id = $1",
            id,
        )
        .await;
        assert_eq!(coupon, [("used".to_owned(), 0)]);
    }
    support::assert_invariants(&d.store).await;
    d.assert_no_double_transitions().await;
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_used_coupon_compensates_everything() {
    let _one = SERIAL.lock().await;
    let Some(mut d) = Deployment::new("coupon_used", 4).await else {
        return;
    };
    d.engine_process();
    d.all_workers();
    let orders = d.orders("used", 2).await;
    // The second order's coupon was already used by an earlier order.
    {
        let mut conn = d.store.pool().acquire().await.expect("conn");
        sqlx::query("UPDATE coupons SET state = 'used', saga_id = 'earlier', order_id = 'o-earlier' WHERE coupon_id = $1")
            .bind(orders[1]["coupon_id"].as_str().expect("coupon"))
            .execute(&mut *conn)
            .await
            .expect("use coupon");
    }
    let ok = d.start(orders[0].clone()).await;
    let bad = d.start(orders[1].clone()).await;
    d.wait_all_final(FINAL).await;
    assert_eq!(status(&d, &ok).await, "completed");
    assert_eq!(status(&d, &bad).await, "compensated");
    let mut pay = rows(
        &d,
        "SELECT kind, amount FROM payment_ledger WHERE saga_id = $1",
        &bad,
    )
    .await;
    pay.sort();
    assert_eq!(pay.len(), 2, "charged, then refunded: {pay:?}");
    assert_eq!(
        (pay[0].0.as_str(), pay[1].0.as_str()),
        ("charge", "charge_reversal")
    );
    assert_eq!(pay[0].1, pay[1].1, "refunded in full");
    let points: i64 = rows(
        &d,
        "SELECT kind, delta FROM points_ledger WHERE saga_id = $1",
        &bad,
    )
    .await
    .iter()
    .map(|(_, v)| v)
    .sum();
    assert_eq!(points, 0, "points granted (if at all) were revoked");
    let gmv: i64 = rows(
        &d,
        "SELECT kind, delta FROM gmv_ledger WHERE saga_id = $1",
        &bad,
    )
    .await
    .iter()
    .map(|(_, v)| v)
    .sum();
    assert_eq!(gmv, 0, "GMV added (if at all) was subtracted");
    let coupon = rows(
        &d,
        "SELECT state, 0::BIGINT FROM coupons WHERE saga_id = $1",
        &bad,
    )
    .await;
    assert!(coupon.is_empty(), "no freeze of ours is left: {coupon:?}");
    let other = rows(
        &d,
        "SELECT saga_id, 0::BIGINT FROM coupons WHERE coupon_id = $1",
        orders[1]["coupon_id"].as_str().expect("coupon"),
    )
    .await;
    assert_eq!(other[0].0, "earlier", "the earlier order keeps its coupon");
    support::assert_invariants(&d.store).await;
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_are_retried_to_completion() {
    let _one = SERIAL.lock().await;
    let Some(mut d) = Deployment::new("transient", 4).await else {
        return;
    };
    d.engine_process();
    d.worker_process("payment", &[]);
    d.worker_process("coupon", &[]);
    d.worker_process("points", &["--flaky", "0.3"]);
    d.worker_process("gmv", &["--flaky", "0.3"]);
    let orders = d.orders("flaky", 12).await;
    for o in &orders {
        d.start(o.clone()).await;
    }
    d.wait_all_final(FINAL).await;
    let counts = d.counts().await;
    assert_eq!(counts.get("completed"), Some(&12), "{counts:?}");
    let retries = d
        .scalar("SELECT COUNT(*) AS n FROM saga_history WHERE kind = 'retry'")
        .await;
    assert!(retries > 0, "transient failures were retried");
    support::assert_invariants(&d.store).await;
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_and_a_reply_published_twice_have_one_effect_and_one_transition() {
    let _one = SERIAL.lock().await;
    let Some(mut d) = Deployment::new("twice", 2).await else {
        return;
    };
    let orders = d.orders("twice", 1).await;
    // No process yet: the start waits in the outbox.
    let id = d.start(orders[0].clone()).await;
    let (dest, key, message_id, payload) = {
        let mut conn = d.store.pool().acquire().await.expect("conn");
        let r = sqlx::query(
            "SELECT destination, routing_key, message_id, payload FROM outbox ORDER BY id LIMIT 1",
        )
        .fetch_one(&mut *conn)
        .await
        .expect("the first command");
        let s = |c: &str| r.try_get::<String, _>(c).expect("column");
        (
            s("destination"),
            s("routing_key"),
            s("message_id"),
            s("payload"),
        )
    };
    assert_eq!(dest, command_queue("payment"));
    // The same command, twice more, straight onto the broker (what a redelivery looks like).
    for _ in 0..2 {
        d.transport
            .publish(
                &dest,
                Message {
                    id: message_id.clone(),
                    key: key.clone(),
                    payload: payload.clone().into_bytes(),
                },
            )
            .await
            .expect("published");
    }
    d.engine_process();
    d.all_workers();
    d.wait_all_final(FINAL).await;
    assert_eq!(status(&d, &id).await, "completed");
    let pay = rows(
        &d,
        "SELECT kind, amount FROM payment_ledger WHERE saga_id = $1",
        &id,
    )
    .await;
    assert_eq!(pay.len(), 1, "one charge: {pay:?}");
    // A reply delivered twice more after the fact: the saga waits for nothing it answers.
    let cmd: CommandMsg = serde_json::from_str(&payload).expect("command");
    let reply = ReplyMsg {
        traceparent: None,
        tracestate: None,
        saga_id: id.clone(),
        step: cmd.step,
        op: cmd.op,
        attempt: cmd.attempt,
        outcome: Outcome::Ok {
            output: json!({"txn_id": "forged"}),
        },
    };
    let version_before = d
        .scalar_for("SELECT version AS n FROM sagas WHERE id = $1", &id)
        .await;
    // A reply the machine ignores is logged in the timeline, and changes nothing else.
    let history_before = d
        .scalar_for(
            "SELECT COUNT(*) AS n FROM saga_history WHERE saga_id = $1",
            &id,
        )
        .await;
    for _ in 0..2 {
        d.transport
            .publish(
                REPLY_QUEUE,
                Message {
                    id: reply.message_id(),
                    key: key.clone(),
                    payload: serde_json::to_vec(&reply).expect("json"),
                },
            )
            .await
            .expect("published");
    }
    // Let the engine see them: a later saga of the same key finishing proves the partition moved on.
    let later = d.start(orders[0].clone()).await;
    d.wait_all_final(FINAL).await;
    // (It is compensated: the first saga used the order's coupon.)
    assert_eq!(status(&d, &later).await, "compensated");
    let version_after = d
        .scalar_for("SELECT version AS n FROM sagas WHERE id = $1", &id)
        .await;
    assert_eq!(
        version_before, version_after,
        "the duplicate replies changed nothing"
    );
    let history_after = d
        .scalar_for(
            "SELECT COUNT(*) AS n FROM saga_history WHERE saga_id = $1",
            &id,
        )
        .await;
    assert_eq!(
        history_after,
        history_before + 2,
        "each duplicate reply is one `ignored` line"
    );
    let ignored = rows(
        &d,
        "SELECT kind || ': ' || detail, id FROM saga_history WHERE saga_id = $1 ORDER BY id DESC LIMIT 2",
        &id,
    )
    .await;
    for (line, _) in &ignored {
        assert!(
            line.starts_with("ignored") && line.contains("nothing in flight; duplicate or late"),
            "{ignored:?}"
        );
    }
    d.assert_no_double_transitions().await;
    let pay = rows(
        &d,
        "SELECT kind, amount FROM payment_ledger WHERE saga_id = $1",
        &id,
    )
    .await;
    assert_eq!(pay.len(), 1, "still one charge");
    support::assert_invariants(&d.store).await;
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_of_one_key_are_handled_in_send_order_while_keys_interleave() {
    let _one = SERIAL.lock().await;
    let Some(mut d) = Deployment::new("fifo", 2).await else {
        return;
    };
    // Only the points worker: the test reads the replies itself, in the order they were sent.
    d.worker_process("points", &["--lanes", "4"]);
    let keys = ["k-a", "k-b", "k-c", "k-d", "k-e"];
    const N: u32 = 30;
    for i in 0..N {
        for k in keys {
            let cmd = CommandMsg {
                traceparent: None,
                tracestate: None,
                saga_id: format!("fifo-{k}-{i:03}"),
                saga: "order-paid".into(),
                key: k.into(),
                step: 2,
                step_id: "points".into(),
                service: "points".into(),
                op: Op::Action,
                operation: "grant".into(),
                forward: "grant".into(),
                attempt: 1,
                params: json!({"user_id": format!("u-{k}"), "points": 1, "reason": "fifo"}),
            };
            d.transport
                .publish(
                    &command_queue("points"),
                    Message {
                        id: cmd.message_id(),
                        key: k.into(),
                        payload: serde_json::to_vec(&cmd).expect("json"),
                    },
                )
                .await
                .expect("published");
        }
    }
    let mut replies = d
        .transport
        .consume(REPLY_QUEUE)
        .await
        .expect("consume replies");
    let mut order: Vec<String> = Vec::new();
    while order.len() < keys.len() * N as usize {
        let r = tokio::time::timeout(Duration::from_secs(60), replies.next())
            .await
            .unwrap_or_else(|_| panic!("replies stopped at {}\n{}", order.len(), d.logs()))
            .expect("open");
        let reply: ReplyMsg = serde_json::from_slice(&r.message.payload).expect("reply");
        assert!(matches!(reply.outcome, Outcome::Ok { .. }), "{reply:?}");
        order.push(reply.saga_id);
        r.ack().await.expect("ack");
    }
    let mut per_key: HashMap<&str, Vec<String>> = HashMap::new();
    for saga in &order {
        let k = keys
            .iter()
            .find(|k| saga.starts_with(&format!("fifo-{k}-")))
            .expect("key");
        per_key.entry(k).or_default().push(saga.clone());
    }
    for k in keys {
        let got = &per_key[k];
        let mut sorted = got.clone();
        sorted.sort();
        assert_eq!(got, &sorted, "{k}: handled in send order");
        assert_eq!(got.len(), N as usize);
    }
    // Other keys did not wait for one key to finish: the replies of the keys interleave.
    let first_of_last_key = order
        .iter()
        .position(|s| s.starts_with("fifo-k-e-"))
        .expect("k-e");
    let last_of_first_key = order
        .iter()
        .rposition(|s| s.starts_with("fifo-k-a-"))
        .expect("k-a");
    assert!(
        first_of_last_key < last_of_first_key,
        "keys proceed in parallel"
    );
    drop(replies);
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sagas_of_one_order_run_one_after_the_other() {
    let _one = SERIAL.lock().await;
    let Some(mut d) = Deployment::new("sequence", 4).await else {
        return;
    };
    d.engine_process();
    d.all_workers();
    let refund = d
        .engine
        .register(include_str!("../sagas/order-refund.yaml"))
        .await
        .expect("refund saga");
    let orders = d.orders("seq", 1).await;
    let paid = d.start(orders[0].clone()).await;
    let refunded = d
        .engine
        .start(&refund, orders[0].clone(), None)
        .await
        .expect("start")
        .id;
    d.wait_all_final(FINAL).await;
    assert_eq!(status(&d, &paid).await, "completed");
    assert_eq!(status(&d, &refunded).await, "completed");
    let paid_done = d
        .scalar_for("SELECT finished_at AS n FROM sagas WHERE id = $1", &paid)
        .await;
    let refund_began = d
        .scalar_for(
            "SELECT MIN(at) AS n FROM saga_history WHERE saga_id = $1 AND kind = 'dispatch'",
            &refunded,
        )
        .await;
    assert!(
        refund_began >= paid_done,
        "the refund's first step ran after the payment saga ended"
    );
    support::assert_invariants(&d.store).await;
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_step_is_replaced_and_each_effect_happens_once() {
    let _one = SERIAL.lock().await;
    let Some(mut d) = Deployment::new("kill_worker", 4).await else {
        return;
    };
    d.engine_process();
    // Slow payments (longer than the 2 s step timeout): some are mid-step when the worker dies.
    // Lanes, so that one slow batch does not hold up every other order (a slow handler holds
    // its lane).
    let payment = d.worker_process("payment", &["--slow", "0.2", "--lanes", "4"]);
    for s in ["coupon", "points", "gmv"] {
        d.worker_process(s, &[]);
    }
    let orders = d.orders("killw", 40).await;
    for o in &orders {
        d.start(o.clone()).await;
    }
    d.wait_final_at_least(5, FINAL).await;
    d.kill(payment);
    // A standby takes over (a fresh process: the broker redelivers what the dead one held).
    d.worker_process("payment", &[]);
    all_completed_once(&d, 40).await;
    let charges = d
        .scalar("SELECT COUNT(*) AS n FROM payment_ledger WHERE kind = 'charge'")
        .await;
    assert_eq!(charges, 40, "one charge per order");
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_killed_mid_run_and_restarted_finishes_every_saga() {
    let _one = SERIAL.lock().await;
    let Some(mut d) = Deployment::new("kill_engine", 4).await else {
        return;
    };
    let (engine, _) = d.engine_process();
    d.all_workers();
    let orders = d.orders("kille", 60).await;
    for o in &orders[..30] {
        d.start(o.clone()).await;
    }
    d.wait_final_at_least(5, FINAL).await;
    d.kill(engine);
    // Half the orders arrive while no engine runs: they wait in the outbox.
    for o in &orders[30..] {
        d.start(o.clone()).await;
    }
    let done_at_kill = d
        .scalar("SELECT COUNT(*) AS n FROM sagas WHERE finished_at IS NOT NULL")
        .await;
    assert!(done_at_kill < 60, "killed mid-run ({done_at_kill} final)");
    d.restart(engine);
    all_completed_once(&d, 60).await;
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_closed_broker_connections_are_survived() {
    let _one = SERIAL.lock().await;
    let Some((d, orders)) = mid_run("close_conns", "closec").await else {
        return;
    };
    // Only this deployment's connections (the engine's, the workers', the test's own).
    let closed = sagaflow_engine::transport::amqp::close_connections(
        &d.prefix,
        "sagaflow e2e: force-closed",
    )
    .expect("rabbitmqctl runs");
    assert!(
        closed >= 6,
        "engine, four workers and the test's own: {closed}"
    );
    the_rest_completes(d, &orders).await;
}

/// Every database connection of the deployment cut at once (what a PostgreSQL restart or a
/// proxy's idle cut does to the engine's and the workers' pools): the loops that find their
/// connection dead fail that round, the connection is dropped, and they go on with new ones.
/// The pools ping only connections that sat idle (`ping_if_idle`), so the busy ones are found
/// dead by the loops themselves, which is what this proves harmless.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_database_connections_are_survived() {
    let _one = SERIAL.lock().await;
    let Some((d, orders)) = mid_run("cut_db_conns", "cutdb").await else {
        return;
    };
    let cut = {
        let mut conn = d.store.pool().acquire().await.expect("conn");
        sqlx::query(
            "SELECT COUNT(*) AS n FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()) AS t",
        )
        .fetch_one(&mut *conn)
        .await
        .expect("terminate")
        .try_get::<i64, _>("n")
        .expect("n")
    };
    // The engine's pool, its relay's, and four workers' at least.
    assert!(cut >= 6, "connections cut: {cut}");
    // The test's own pool pings what sat idle this long before handing it out again.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    the_rest_completes(d, &orders).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_are_dead_lettered_and_their_partition_keeps_flowing() {
    let _one = SERIAL.lock().await;
    let Some(mut d) = Deployment::new("poison", 1).await else {
        return;
    };
    let (_, http) = d.engine_process();
    // The payment worker serves its counters.
    let metrics_addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        l.local_addr().expect("address")
    };
    d.worker_process("payment", &["--metrics", &metrics_addr.to_string()]);
    for service in ["coupon", "points", "gmv"] {
        d.worker_process(service, &[]);
    }
    // One partition: the poison sits in the very queue the orders need.
    for (queue, id) in [
        (command_queue("payment"), "poison-cmd"),
        (REPLY_QUEUE.to_owned(), "poison-reply"),
    ] {
        d.transport
            .publish(
                &queue,
                Message {
                    id: id.into(),
                    key: "o-poison-0".into(),
                    payload: b"{not json".to_vec(),
                },
            )
            .await
            .expect("published");
    }
    let orders = d.orders("poison", 3).await;
    let mut ids = Vec::new();
    for o in &orders {
        ids.push(d.start(o.clone()).await);
    }
    // A well-formed reply for a real saga, naming a step it does not have.
    let stray = ReplyMsg {
        traceparent: None,
        tracestate: None,
        saga_id: ids[0].clone(),
        step: 99,
        op: Op::Action,
        attempt: 1,
        outcome: Outcome::Ok { output: json!({}) },
    };
    d.transport
        .publish(
            REPLY_QUEUE,
            Message {
                id: stray.message_id(),
                key: "o-poison-0".into(),
                payload: serde_json::to_vec(&stray).expect("json"),
            },
        )
        .await
        .expect("published");
    d.wait_all_final(FINAL).await;
    assert_eq!(d.counts().await.get("completed"), Some(&3));
    // The engine keeps every dead letter of the deployment in its database: the worker's
    // poison command, its own poison reply, and the stray reply.
    let query = DeadLetterQuery {
        limit: 10,
        ..DeadLetterQuery::default()
    };
    let mut dead = Vec::new();
    for _ in 0..100 {
        dead = d.store.dead_letters(&query).await.expect("dead letters");
        if dead.len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The stray reply (its id starts with the saga's) sorts first.
    dead.sort_by(|a, b| a.message_id.cmp(&b.message_id));
    assert_eq!(dead.len(), 3, "{dead:?}");
    let stray_dead = dead.remove(0);
    assert_eq!(stray_dead.message_id, stray.message_id());
    assert_eq!(stray_dead.queue, "reply");
    assert_eq!(
        stray_dead.reason,
        format!("reply for unknown step #99 of saga {}", ids[0])
    );
    assert_eq!(
        (dead[0].message_id.as_str(), dead[0].queue.as_str()),
        ("poison-cmd", "cmd.payment")
    );
    assert!(
        dead[0].reason.contains("decode") || dead[0].reason.contains("undecodable"),
        "{dead:?}"
    );
    assert_eq!(dead[0].payload, b"{not json".to_vec());
    assert_eq!(
        (dead[1].message_id.as_str(), dead[1].queue.as_str()),
        ("poison-reply", "reply")
    );
    assert!(dead[1].reason.starts_with("undecodable reply"), "{dead:?}");
    // The worker counted its dead letter.
    let worker_metrics = ureq::get(&format!("http://{metrics_addr}/metrics"))
        .call()
        .expect("worker metrics")
        .into_body()
        .read_to_string()
        .expect("body");
    assert!(
        worker_metrics.contains("sagaflow_worker_dead_letters_total{service=\"payment\"} 1\n"),
        "{worker_metrics}"
    );
    // A replay puts the command back on its queue: still poison, the worker sets it aside
    // again, as a new letter of the same message.
    let replayed = d
        .store
        .replay_dead_letters(
            std::slice::from_ref(&dead[0].id),
            sagaflow_engine::store::now_ms(),
        )
        .await
        .expect("replay");
    assert_eq!(
        replayed[0].queue.as_deref(),
        Some("cmd.payment"),
        "{replayed:?}"
    );
    let mut again = Vec::new();
    for _ in 0..100 {
        again = d.store.dead_letters(&query).await.expect("dead letters");
        if again
            .iter()
            .any(|l| l.message_id == "poison-cmd" && l.id != dead[0].id)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        again
            .iter()
            .any(|l| l.message_id == "poison-cmd" && l.id != dead[0].id),
        "the replayed command came back as a new dead letter: {again:?}"
    );
    assert!(again.iter().all(|l| l.id != dead[0].id), "{again:?}");
    // The engine counted its dead letter.
    let metrics = ureq::get(&format!("http://{http}/metrics"))
        .call()
        .expect("metrics")
        .into_body()
        .read_to_string()
        .expect("body");
    let line = metrics
        .lines()
        .find(|l| l.starts_with("sagaflow_dead_letters_total") && l.contains("reply"))
        .unwrap_or_else(|| panic!("no dead-letter metric in:\n{metrics}"));
    assert!(line.ends_with(" 2"), "{line}");
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_engines_at_once_never_advance_a_saga_twice() {
    let _one = SERIAL.lock().await;
    let Some(mut d) = Deployment::new("two_engines", 4).await else {
        return;
    };
    d.engine_process();
    d.engine_process();
    d.all_workers();
    let orders = d.orders("twoe", 60).await;
    for o in &orders {
        d.start(o.clone()).await;
    }
    d.wait_all_final(FINAL).await;
    let counts = d.counts().await;
    assert_eq!(counts.get("completed"), Some(&60), "{counts:?}");
    d.assert_no_double_transitions().await;
    let completions = d
        .scalar("SELECT COUNT(*) AS n FROM saga_history WHERE kind = 'completed'")
        .await;
    assert_eq!(completions, 60, "each saga completed once");
    support::assert_invariants(&d.store).await;
    // Graceful shutdown on SIGTERM: every process exits with success.
    for i in 0..d.procs.len() {
        let status = d.terminate(i);
        assert!(
            status.success(),
            "{} exited with {status}\n{}",
            d.procs[i].name,
            d.logs()
        );
    }
    d.finish().await;
}

/// The queues under `prefix` on the local broker.
fn queues_named(prefix: &str) -> Vec<String> {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["-q", "list_queues", "name"])
        .output()
        .expect("rabbitmqctl");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|q| q.starts_with(&format!("{prefix}.")))
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_test_that_fails_still_removes_its_queues() {
    let Some(mut d) = Deployment::new("cleanup", 2).await else {
        return;
    };
    let prefix = d.prefix.clone();
    d.engine_process();
    let mut declared = Vec::new();
    for _ in 0..300 {
        declared = queues_named(&prefix);
        if declared.iter().any(|q| q.contains(".reply.")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        declared.iter().any(|q| q.contains(".reply.")),
        "the engine declared its queues: {declared:?}"
    );
    // What a failing test does: the deployment is dropped without `finish`.
    drop(d);
    assert_eq!(queues_named(&prefix), Vec::<String>::new());
}

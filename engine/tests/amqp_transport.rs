//! The RabbitMQ transport against the real broker (SAGAFLOW_TEST_AMQP_URL, default the local
//! one). Each test declares its own prefix, so tests do not see each other's queues, and the
//! test that force-closes connections closes only its own (`close_connections`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use sagaflow_engine::transport::amqp::{
    AmqpConfig, AmqpTransport, close_connections, partition_of,
};
use sagaflow_engine::transport::{Consumer, Message, Transport};
use tokio::sync::RwLock;

static BROKER: RwLock<()> = RwLock::const_new(());

fn url() -> String {
    std::env::var("SAGAFLOW_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

fn config(partitions: u16) -> AmqpConfig {
    let mut c = AmqpConfig::new(&url());
    c.prefix = format!("test-{}", uuid::Uuid::new_v4().simple());
    c.partitions = partitions;
    c.prefetch = 16;
    c
}

/// Connects, or skips the test when no broker runs (a failure under CI=true).
async fn connect(config: AmqpConfig) -> Option<Arc<AmqpTransport>> {
    match AmqpTransport::connect(config).await {
        Ok(t) => Some(t),
        Err(e) if std::env::var("CI").as_deref() != Ok("true") => {
            eprintln!("skipping: RabbitMQ is not reachable ({e})");
            None
        }
        Err(e) => panic!("RabbitMQ is not reachable under CI=true: {e}"),
    }
}

fn msg(id: &str, key: &str) -> Message {
    Message {
        id: id.into(),
        key: key.into(),
        payload: format!("{{\"id\":\"{id}\"}}").into_bytes(),
    }
}

async fn next(c: &mut Box<dyn Consumer>) -> sagaflow_engine::transport::Delivery {
    tokio::time::timeout(Duration::from_secs(20), c.next())
        .await
        .expect("a delivery within 20 s")
        .expect("consumer open")
}

async fn cleanup(t: &AmqpTransport, logicals: &[&str]) {
    t.delete_topology(logicals).await.expect("cleanup");
    t.close().await;
}

#[tokio::test]
async fn per_key_fifo_across_partitions_with_confirms() {
    let _shared = BROKER.read().await;
    let Some(t) = connect(config(4)).await else {
        return;
    };
    let keys = ["order-1", "order-2", "order-3", "order-4", "order-5"];
    let partitions: std::collections::HashSet<u16> =
        keys.iter().map(|k| partition_of(k, 4)).collect();
    assert!(partitions.len() > 1, "the keys spread over partitions");
    // Interleave 5 keys × 40 messages, publishing concurrently within each round.
    for i in 0..40 {
        let sends = keys
            .iter()
            .map(|k| t.publish("cmd.test", msg(&format!("{k}/{i}"), k)));
        for r in futures::future::join_all(sends).await {
            r.expect("confirmed");
        }
    }
    assert_eq!(t.published(), 200);
    let mut c = t.consume("cmd.test").await.expect("consume");
    let mut seen: HashMap<String, Vec<u32>> = HashMap::new();
    for _ in 0..200 {
        let d = next(&mut c).await;
        let (key, n) = d.message.id.rsplit_once('/').expect("id");
        assert_eq!(key, d.message.key, "the key travels in a header");
        seen.entry(key.to_owned())
            .or_default()
            .push(n.parse().expect("number"));
        d.ack().await.expect("ack");
    }
    for k in keys {
        assert_eq!(seen[k], (0..40).collect::<Vec<_>>(), "{k} in send order");
    }
    assert!(c.try_next().is_none(), "nothing more");
    drop(c);
    cleanup(&t, &["cmd.test"]).await;
}

#[tokio::test]
async fn one_active_consumer_per_partition_and_a_standby_takes_over() {
    let _shared = BROKER.read().await;
    let Some(t) = connect(config(2)).await else {
        return;
    };
    let cfg = t.config().clone();
    let standby_transport = connect(cfg).await.expect("second connection");
    let mut active = t.consume("reply").await.expect("consume");
    // The first consumer must be registered on every partition before the standby subscribes,
    // so that it is the active one.
    for q in t.partition_queues("reply") {
        while t.queue_stats(&q).await.expect("stats").1 < 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let mut standby = standby_transport.consume("reply").await.expect("consume");
    for i in 0..10 {
        t.publish("reply", msg(&format!("m{i}"), &format!("k{}", i % 3)))
            .await
            .expect("confirmed");
    }
    // The active consumer receives everything; acknowledge half, keep the rest unacked.
    let mut unacked = Vec::new();
    for i in 0..10 {
        let d = next(&mut active).await;
        if i < 5 {
            d.ack().await.expect("ack");
        } else {
            unacked.push(d.message.id.clone());
            std::mem::forget(d); // never acknowledged
        }
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(500), standby.next())
            .await
            .is_err(),
        "the standby gets nothing while the active consumer lives"
    );
    // The active process dies: its unacked messages go to the standby.
    drop(active);
    t.close().await;
    let mut redelivered = Vec::new();
    for _ in 0..unacked.len() {
        let d = next(&mut standby).await;
        assert!(d.redelivered, "{} is a redelivery", d.message.id);
        redelivered.push(d.message.id.clone());
        d.ack().await.expect("ack");
    }
    redelivered.sort();
    unacked.sort();
    assert_eq!(redelivered, unacked);
    drop(standby);
    cleanup(&standby_transport, &["reply"]).await;
}

#[tokio::test]
async fn poison_messages_are_dead_lettered_with_their_reason_and_the_partition_flows() {
    let _shared = BROKER.read().await;
    let Some(t) = connect(config(1)).await else {
        return;
    };
    t.publish("cmd.svc", msg("poison", "k"))
        .await
        .expect("confirmed");
    t.publish("cmd.svc", msg("fine", "k"))
        .await
        .expect("confirmed");
    let mut c = t.consume("cmd.svc").await.expect("consume");
    let d = next(&mut c).await;
    assert_eq!(d.message.id, "poison");
    d.dead_letter("undecodable command: expected value at line 1")
        .await
        .expect("dead-lettered");
    let d = next(&mut c).await;
    assert_eq!(d.message.id, "fine", "the partition keeps flowing");
    d.ack().await.expect("ack");
    let dead = t.take_dead_letters(10).await.expect("read DLQ");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].queue, "cmd.svc");
    assert!(
        dead[0].reason.starts_with("undecodable command"),
        "{dead:?}"
    );
    assert_eq!(dead[0].message.id, "poison");
    assert_eq!(dead[0].message.key, "k");
    drop(c);
    cleanup(&t, &["cmd.svc"]).await;
}

#[tokio::test]
async fn a_different_partition_count_is_refused_at_start() {
    let _shared = BROKER.read().await;
    let Some(t) = connect(config(4)).await else {
        return;
    };
    let mut other = t.config().clone();
    other.partitions = 8;
    let err = AmqpTransport::connect(other)
        .await
        .expect_err("8 partitions against a deployment of 4");
    let text = err.to_string();
    assert!(text.contains("partition count mismatch"), "{text}");
    assert!(text.contains("8 partitions"), "{text}");
    assert!(
        matches!(
            &err,
            sagaflow_engine::transport::TransportError::PartitionMismatch {
                configured: 8,
                declared: Some(4),
                ..
            }
        ),
        "{err:?}"
    );
    // The same count is fine.
    let same = AmqpTransport::connect(t.config().clone())
        .await
        .expect("same count");
    same.close().await;
    cleanup(&t, &[]).await;
}

#[tokio::test]
async fn a_process_without_a_count_of_its_own_joins_the_deployments() {
    let _shared = BROKER.read().await;
    let Some(t) = connect(config(4)).await else {
        return;
    };
    // The default count (1), but only as a default: the deployment's 4 is taken.
    let mut joiner = t.config().clone();
    joiner.partitions = sagaflow_engine::transport::amqp::DEFAULT_PARTITIONS;
    joiner.join_declared_partitions = true;
    let joined = AmqpTransport::connect(joiner).await.expect("joined");
    assert_eq!(joined.config().partitions, 4);
    assert_eq!(
        joined.partition_queues("cmd.svc"),
        t.partition_queues("cmd.svc")
    );
    // A message it routes lands where the deployment's consumers read it.
    let mut c = t.consume("cmd.svc").await.expect("consume");
    joined
        .publish("cmd.svc", msg("m-1", "order-7"))
        .await
        .expect("published");
    let d = next(&mut c).await;
    assert_eq!(d.message.id, "m-1");
    d.ack().await.expect("ack");
    drop(c);
    joined.close().await;
    cleanup(&t, &["cmd.svc"]).await;
}

#[tokio::test]
async fn an_unreachable_broker_is_a_clear_error() {
    let mut c = config(1);
    c.url = "amqp://guest:secret@127.0.0.1:1/%2f".into();
    let err = AmqpTransport::connect(c)
        .await
        .expect_err("nothing listens on port 1");
    let text = err.to_string();
    assert!(
        text.contains("cannot connect to RabbitMQ at amqp://guest:***@127.0.0.1:1"),
        "{text}"
    );
}

#[tokio::test]
async fn consumers_and_publishers_survive_force_closed_connections() {
    // Only this test's connection is closed, so the other tests may run beside it.
    let _shared = BROKER.read().await;
    let Some(t) = connect(config(2)).await else {
        return;
    };
    let mut c = t.consume("reply").await.expect("consume");
    for i in 0..5 {
        t.publish("reply", msg(&format!("a{i}"), "k"))
            .await
            .expect("confirmed");
    }
    for _ in 0..5 {
        next(&mut c).await.ack().await.expect("ack");
    }
    // A bystander: another deployment's connection on the same broker.
    let bystander = lapin::Connection::connect(
        &url(),
        lapin::ConnectionProperties::default()
            .with_connection_name("bystander [other-deployment]".into()),
    )
    .await
    .expect("bystander connects");
    let closed = close_connections(&t.config().prefix, "sagaflow test: force-closed")
        .expect("rabbitmqctl runs");
    assert_eq!(closed, 1, "this transport's one connection");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        bystander.status().connected(),
        "another deployment's connection is left alone"
    );
    let _ = bystander.close(200, "bye".into()).await;
    // Publishing resumes (the first attempts may fail while the connection is re-established;
    // the outbox relay retries the same way).
    let mut published = 0;
    for attempt in 0..100 {
        if t.publish("reply", msg(&format!("b{published}"), "k"))
            .await
            .is_ok()
        {
            published += 1;
            if published == 5 {
                break;
            }
        } else {
            tokio::time::sleep(Duration::from_millis(100 + attempt * 10)).await;
        }
    }
    assert_eq!(
        published, 5,
        "publishing resumed after the connections were closed"
    );
    let mut got = Vec::new();
    while got.len() < 5 {
        let d = next(&mut c).await;
        got.push(d.message.id.clone());
        d.ack().await.expect("ack");
    }
    assert_eq!(
        got,
        ["b0", "b1", "b2", "b3", "b4"],
        "the consumer resumed, in order"
    );
    drop(c);
    cleanup(&t, &["reply"]).await;
}

/// `publish_batch` of `n` messages per key, all on one logical queue.
fn batch(queue: &str, keys: &[&str], n: usize) -> Vec<(String, Message)> {
    (0..n)
        .flat_map(|i| {
            keys.iter()
                .map(move |k| (queue.to_owned(), msg(&format!("{k}/{i}"), k)))
        })
        .collect()
}

/// Opens a new consumer and returns the ids it gets until (and without) `sentinel`.
async fn ids_before(t: &AmqpTransport, queue: &str, sentinel: &str) -> Vec<(String, bool)> {
    t.publish(queue, msg(sentinel, "k"))
        .await
        .expect("confirmed");
    let mut c = t.consume(queue).await.expect("consume");
    let mut ids = Vec::new();
    loop {
        let d = next(&mut c).await;
        let id = d.message.id.clone();
        let redelivered = d.redelivered;
        d.ack().await.expect("ack");
        if id == sentinel {
            return ids;
        }
        ids.push((id, redelivered));
    }
}

#[tokio::test]
async fn a_batch_travels_in_bundles_and_each_key_keeps_its_order() {
    let _shared = BROKER.read().await;
    let mut cfg = config(2);
    cfg.bundle = 50;
    let Some(t) = connect(cfg).await else {
        return;
    };
    let keys = ["order-1", "order-2", "order-3", "order-4", "order-5"];
    let sent = batch("cmd.test", &keys, 60);
    assert_eq!(sent.len(), 300);
    for r in t.publish_batch(sent).await {
        r.expect("confirmed");
    }
    assert_eq!(t.published(), 300, "every part counts as published");
    // 300 messages over 2 partitions in bundles of at most 50: 6 to 8 AMQP messages.
    let frames = t.frames_published();
    assert!((6..=8).contains(&frames), "{frames} AMQP messages for 300");
    let mut c = t.consume("cmd.test").await.expect("consume");
    let mut seen: HashMap<String, Vec<u32>> = HashMap::new();
    for _ in 0..300 {
        let d = next(&mut c).await;
        let (key, n) = d.message.id.rsplit_once('/').expect("id");
        assert_eq!(key, d.message.key, "each part keeps its key");
        assert_eq!(d.message.payload, msg(&d.message.id, key).payload);
        seen.entry(key.to_owned())
            .or_default()
            .push(n.parse().expect("number"));
        d.ack().await.expect("ack");
    }
    for k in keys {
        assert_eq!(seen[k], (0..60).collect::<Vec<_>>(), "{k} in batch order");
    }
    drop(c);
    // Everything was acknowledged: a new consumer sees only what comes next, on each partition.
    let mut c = t.consume("cmd.test").await.expect("consume");
    for p in 0..2u16 {
        let key = (0..)
            .map(|i| format!("s{i}"))
            .find(|k| partition_of(k, 2) == p)
            .expect("a key");
        t.publish("cmd.test", msg(&format!("after-{p}"), &key))
            .await
            .expect("confirmed");
        let d = next(&mut c).await;
        assert_eq!(
            d.message.id,
            format!("after-{p}"),
            "nothing of the bundles came again"
        );
        d.ack().await.expect("ack");
    }
    drop(c);
    cleanup(&t, &["cmd.test"]).await;
}

#[tokio::test]
async fn a_returned_part_gives_back_its_whole_bundle() {
    let _shared = BROKER.read().await;
    let Some(t) = connect(config(1)).await else {
        return;
    };
    for r in t.publish_batch(batch("cmd.test", &["k"], 3)).await {
        r.expect("confirmed");
    }
    assert_eq!(t.frames_published(), 1, "one bundle");
    let mut c = t.consume("cmd.test").await.expect("consume");
    let (a, b, cc) = (next(&mut c).await, next(&mut c).await, next(&mut c).await);
    assert!(!a.redelivered);
    a.ack().await.expect("ack");
    b.nack().await.expect("given back");
    cc.ack().await.expect("ack");
    drop(c);
    let again = ids_before(&t, "cmd.test", "sentinel").await;
    assert_eq!(
        again,
        vec![
            ("k/0".to_owned(), true),
            ("k/1".to_owned(), true),
            ("k/2".to_owned(), true)
        ],
        "all three come again (the receivers drop the done ones as duplicates)"
    );
    cleanup(&t, &["cmd.test"]).await;
}

#[tokio::test]
async fn a_poison_part_is_dead_lettered_alone_and_its_siblings_flow() {
    let _shared = BROKER.read().await;
    let Some(t) = connect(config(1)).await else {
        return;
    };
    for r in t.publish_batch(batch("cmd.svc", &["k"], 3)).await {
        r.expect("confirmed");
    }
    assert_eq!(t.frames_published(), 1, "one bundle");
    let mut c = t.consume("cmd.svc").await.expect("consume");
    let (a, b, cc) = (next(&mut c).await, next(&mut c).await, next(&mut c).await);
    a.ack().await.expect("ack");
    b.dead_letter("undecodable command: expected value")
        .await
        .expect("dead-lettered");
    cc.ack().await.expect("ack");
    drop(c);
    let dead = t.take_dead_letters(10).await.expect("read DLQ");
    assert_eq!(dead.len(), 1, "only the poison part: {dead:?}");
    assert_eq!(dead[0].message.id, "k/1");
    assert_eq!(dead[0].message.key, "k");
    assert_eq!(dead[0].message.payload, msg("k/1", "k").payload);
    assert_eq!(dead[0].queue, "cmd.svc");
    assert!(dead[0].reason.starts_with("undecodable command"));
    assert!(
        ids_before(&t, "cmd.svc", "sentinel").await.is_empty(),
        "the bundle was acknowledged once all its parts were settled"
    );
    cleanup(&t, &["cmd.svc"]).await;
}

#[tokio::test]
async fn a_malformed_bundle_is_dead_lettered_whole_with_the_reason() {
    use lapin::options::BasicPublishOptions;
    use lapin::types::{AMQPValue, FieldTable, ShortString};
    let _shared = BROKER.read().await;
    let cfg = config(1);
    let prefix = cfg.prefix.clone();
    let Some(t) = connect(cfg).await else {
        return;
    };
    t.declare("cmd.svc").await.expect("declare");
    let conn = lapin::Connection::connect(&url(), lapin::ConnectionProperties::default())
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    let mut headers = FieldTable::default();
    headers.insert(
        sagaflow_engine::transport::amqp::BUNDLE_HEADER.into(),
        AMQPValue::LongUInt(2),
    );
    ch.basic_publish(
        ShortString::from(format!("{prefix}.cmd")),
        ShortString::from("cmd.svc.0"),
        BasicPublishOptions::default(),
        b"SFB1\0\0\0\x02garbage",
        lapin::BasicProperties::default()
            .with_message_id(ShortString::from("forged"))
            .with_headers(headers),
    )
    .await
    .expect("publish")
    .await
    .expect("sent");
    let _ = conn.close(200, ShortString::from("bye")).await;
    t.publish("cmd.svc", msg("fine", "k"))
        .await
        .expect("confirmed");
    let mut c = t.consume("cmd.svc").await.expect("consume");
    let d = next(&mut c).await;
    assert_eq!(
        d.message.id, "fine",
        "the malformed bundle never reached the receiver"
    );
    d.ack().await.expect("ack");
    drop(c);
    let dead = t.take_dead_letters(10).await.expect("read DLQ");
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].message.id, "forged");
    assert!(
        dead[0].reason.starts_with("malformed bundle:"),
        "{}",
        dead[0].reason
    );
    cleanup(&t, &["cmd.svc"]).await;
}

#[tokio::test]
async fn bundle_one_sends_every_message_on_its_own() {
    let _shared = BROKER.read().await;
    let mut cfg = config(1);
    cfg.bundle = 1;
    let Some(t) = connect(cfg).await else {
        return;
    };
    for r in t.publish_batch(batch("cmd.test", &["k"], 5)).await {
        r.expect("confirmed");
    }
    assert_eq!((t.published(), t.frames_published()), (5, 5));
    let got: Vec<String> = ids_before(&t, "cmd.test", "sentinel")
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(got, (0..5).map(|i| format!("k/{i}")).collect::<Vec<_>>());
    cleanup(&t, &["cmd.test"]).await;
}

/// On quorum queues a message its consumers never settle (each dies on it: here, each consumer
/// is dropped with the message unacknowledged) is set aside by the broker after the delivery
/// limit, with the reason, instead of blocking its partition; the dead-letter consumer hands it
/// over with its source queue, and the partition flows on.
#[tokio::test]
async fn quorum_queues_dead_letter_what_exceeds_the_delivery_limit() {
    let _shared = BROKER.read().await;
    let mut c = config(1);
    c.queue_type = sagaflow_engine::transport::amqp::QueueType::Quorum;
    c.delivery_limit = 2;
    c.bundle = 1;
    // One message in flight at a time: a consumer that dies returns everything it had taken,
    // and each of those deliveries counts.
    c.prefetch = 1;
    let Some(t) = connect(c.clone()).await else {
        return;
    };
    t.publish("cmd.crash", msg("crasher", "k"))
        .await
        .expect("confirmed");
    t.publish("cmd.crash", msg("after", "k"))
        .await
        .expect("confirmed");
    // Three consumer processes in turn take the first message and die without settling it
    // (their connection closes: the broker takes the message back and counts the delivery).
    for _ in 0..3 {
        let crashing = connect(c.clone()).await.expect("connect");
        let mut consumer = crashing.consume("cmd.crash").await.expect("consume");
        let d = next(&mut consumer).await;
        assert_eq!(d.message.id, "crasher");
        crashing.close().await;
        drop(d);
        drop(consumer);
    }
    // Past the limit: the broker dead-letters it, and the next message comes.
    let mut consumer = t.consume("cmd.crash").await.expect("consume");
    let d = next(&mut consumer).await;
    assert_eq!(d.message.id, "after", "the partition flows on");
    d.ack().await.expect("ack");
    let mut dead = t.consume_dead_letters().await.expect("dead letters");
    let delivery = tokio::time::timeout(Duration::from_secs(20), dead.next())
        .await
        .expect("a dead letter within 20 s")
        .expect("consumer open");
    assert_eq!(delivery.letters.len(), 1, "{:?}", delivery.letters);
    let letter = delivery.letters[0].clone();
    assert_eq!(letter.message.id, "crasher");
    assert_eq!(letter.queue, "cmd.crash");
    assert!(
        letter.reason.contains("without being settled") && letter.reason.contains("limit of 2"),
        "{}",
        letter.reason
    );
    assert!(letter.at > 0);
    delivery.ack().await.expect("ack");
    drop(dead);
    drop(consumer);
    cleanup(&t, &["cmd.crash"]).await;
}

/// A TCP proxy in front of the broker whose connections can be aborted at once (a reset, as
/// when the broker node the process was connected to is killed): the kind of loss a graceful
/// `close_connection` does not show.
struct Proxy {
    url: String,
    conns: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start() -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let broker = url();
        let target = broker
            .split('@')
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .unwrap_or("127.0.0.1:5672")
            .to_owned();
        let conns: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let kept = conns.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let target = target.clone();
                let task = tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    let _ = client.set_zero_linger();
                    let _ = server.set_zero_linger();
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                });
                kept.lock().expect("lock").push(task);
            }
        });
        let url = broker.replacen(
            broker
                .split('@')
                .nth(1)
                .and_then(|rest| rest.split('/').next())
                .unwrap_or("127.0.0.1:5672"),
            &format!("127.0.0.1:{port}"),
            1,
        );
        Proxy { url, conns, accept }
    }

    /// Resets every connection through the proxy (new ones are still accepted).
    fn abort_all(&self) {
        for t in self.conns.lock().expect("lock").drain(..) {
            t.abort();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.abort_all();
        self.accept.abort();
    }
}

/// The bug this pins (seen on a 3-node cluster when a worker's node was killed): settling a
/// delivery of a connection that was reset never returned, so the worker's lane, then its
/// whole consumer, stopped for good. Settling now gives up after a bound (the broker
/// redelivers what a dead channel held), and the reconnected consumer gets the message again.
#[tokio::test]
async fn settling_a_delivery_of_a_reset_connection_returns_and_it_comes_again() {
    let _shared = BROKER.read().await;
    let proxy = Proxy::start().await;
    let mut c = config(1);
    c.url = proxy.url.clone();
    let Some(t) = connect(c).await else {
        return;
    };
    t.publish("cmd.reset", msg("m-1", "k"))
        .await
        .expect("confirmed");
    let mut consumer = t.consume("cmd.reset").await.expect("consume");
    let taken = next(&mut consumer).await;
    assert_eq!(taken.message.id, "m-1");
    proxy.abort_all();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let settled = tokio::time::timeout(Duration::from_secs(30), taken.ack()).await;
    assert!(
        settled.is_ok(),
        "acknowledging on a reset connection must return (with an error), not hang"
    );
    // Redelivered to the consumer once it has reconnected.
    let again = next(&mut consumer).await;
    assert_eq!(again.message.id, "m-1");
    assert!(again.redelivered);
    tokio::time::timeout(Duration::from_secs(30), again.ack())
        .await
        .expect("settled in time")
        .expect("acknowledged");
    drop(consumer);
    cleanup(&t, &["cmd.reset"]).await;
}

/// Publishing and consuming go on across repeated resets of every connection (a broker node
/// killed under the process, again and again): each round's batch is confirmed or refused in
/// bounded time, and what was published reaches the consumer.
#[tokio::test]
async fn publish_and_consume_go_on_across_repeated_connection_resets() {
    let _shared = BROKER.read().await;
    let proxy = Proxy::start().await;
    let mut c = config(2);
    c.url = proxy.url.clone();
    let Some(t) = connect(c).await else {
        return;
    };
    let mut consumer = t.consume("cmd.resets").await.expect("consume");
    let mut seen = std::collections::HashSet::new();
    for round in 0..6 {
        let batch: Vec<(String, Message)> = (0..20)
            .map(|i| {
                (
                    "cmd.resets".to_owned(),
                    msg(&format!("r{round}-{i}"), &format!("k{i}")),
                )
            })
            .collect();
        // Publish until the whole batch is confirmed (a reset refuses what was in flight).
        let mut todo = batch;
        for _ in 0..20 {
            let results =
                tokio::time::timeout(Duration::from_secs(60), t.publish_batch(todo.clone()))
                    .await
                    .unwrap_or_else(|_| {
                        panic!("round {round}: a publish batch must end in bounded time")
                    });
            todo = todo
                .into_iter()
                .zip(results)
                .filter(|(_, r)| r.is_err())
                .map(|(m, _)| m)
                .collect();
            if todo.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(
            todo.is_empty(),
            "round {round}: {} never confirmed",
            todo.len()
        );
        // Take some, reset mid-way, take the rest (redeliveries included).
        let mut taken = 0;
        while !(0..20).all(|i| seen.contains(&format!("r{round}-{i}"))) {
            let d = tokio::time::timeout(Duration::from_secs(60), consumer.next())
                .await
                .unwrap_or_else(|_| {
                    panic!("round {round}: deliveries stopped; seen {}", seen.len())
                })
                .expect("open");
            seen.insert(d.message.id.clone());
            taken += 1;
            if taken == 5 {
                proxy.abort_all();
            }
            let _ = tokio::time::timeout(Duration::from_secs(30), d.ack())
                .await
                .unwrap_or_else(|_| panic!("round {round}: an ack must end in bounded time"));
        }
    }
    drop(consumer);
    cleanup(&t, &["cmd.resets"]).await;
}

/// The W3C trace context a message carries (its payload's leading `traceparent` field, and the
/// `tracestate` right after it if any) is also its AMQP `traceparent` (and `tracestate`)
/// header, for tools that read headers; a bundle carries its first part's; a message without
/// one gets none.
#[tokio::test]
async fn the_trace_context_travels_in_the_amqp_traceparent_header() {
    use lapin::options::BasicGetOptions;
    use lapin::types::{AMQPValue, ShortString};
    let _shared = BROKER.read().await;
    let Some(t) = connect(config(1)).await else {
        return;
    };
    t.declare("cmd.svc").await.expect("declare");
    let queue = t.partition_queues("cmd.svc")[0].clone();
    let tp = |span: &str| format!("00-4bf92f3577b34da6a3ce929d0e0e4736-{span}-01");
    let traced = |id: &str, span: &str, state: Option<&str>| {
        let state = state.map_or(String::new(), |s| {
            format!(
                ",\"tracestate\":{}",
                serde_json::to_string(s).expect("json")
            )
        });
        Message {
            id: id.into(),
            key: "k".into(),
            payload: format!(
                "{{\"traceparent\":\"{}\"{state},\"id\":\"{id}\"}}",
                tp(span)
            )
            .into_bytes(),
        }
    };
    // A `"` is allowed in a tracestate value (escaped in the JSON, not in the header).
    let quoted = r#"rojo=00f067aa0ba902b7,congo=t"61"#;
    t.publish("cmd.svc", traced("one", "00f067aa0ba902b7", Some(quoted)))
        .await
        .expect("confirmed");
    t.publish("cmd.svc", msg("plain", "k"))
        .await
        .expect("confirmed");
    t.publish("cmd.svc", traced("two", "3333333333333333", None))
        .await
        .expect("confirmed");
    for sent in t
        .publish_batch(vec![
            (
                "cmd.svc".to_owned(),
                traced("b1", "1111111111111111", Some("a=1")),
            ),
            ("cmd.svc".to_owned(), traced("b2", "2222222222222222", None)),
        ])
        .await
    {
        sent.expect("confirmed");
    }

    let conn = lapin::Connection::connect(&url(), lapin::ConnectionProperties::default())
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    let mut headers_seen = Vec::new();
    for _ in 0..4 {
        let got = ch
            .basic_get(
                ShortString::from(queue.as_str()),
                BasicGetOptions { no_ack: true },
            )
            .await
            .expect("get")
            .expect("a message");
        let header = |name: &str| {
            let value = got
                .delivery
                .properties
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get(name).cloned());
            match value {
                Some(AMQPValue::LongString(s)) => Some(s.to_string()),
                Some(other) => Some(format!("{other:?}")),
                None => None,
            }
        };
        headers_seen.push((header("traceparent"), header("tracestate")));
    }
    let _ = conn.close(200, ShortString::from("bye")).await;
    assert_eq!(
        headers_seen,
        vec![
            (Some(tp("00f067aa0ba902b7")), Some(quoted.to_owned())),
            (None, None),
            (Some(tp("3333333333333333")), None),
            (Some(tp("1111111111111111")), Some("a=1".to_owned())),
        ]
    );
    cleanup(&t, &["cmd.svc"]).await;
}

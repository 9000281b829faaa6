//! The RabbitMQ transport (lapin), with the same contract as the in-process one.
//!
//! Topology, declared idempotently by every process for the queues it touches:
//!
//! | what | name |
//! |---|---|
//! | command exchange (direct) | `<prefix>.cmd`, routing key `<service>.<partition>` |
//! | command queues | `<prefix>.cmd.<service>.<partition>` |
//! | reply exchange / queues | `<prefix>.reply`, `<prefix>.reply.<partition>` |
//! | start exchange / queues (client outbox) | `<prefix>.start`, `<prefix>.start.<partition>` |
//! | dead-letter exchange (fanout) / queue | `<prefix>.dead`, `<prefix>.dead-letters` |
//! | topology marker (holds the partition count) | `<prefix>.topology` |
//!
//! * **Partitions.** A message goes to partition `stable_hash(key) % P` of its logical queue,
//!   so all messages of one order land in one queue. Every queue is declared with
//!   `x-single-active-consumer`: each partition has exactly one consumer at a time (per-order
//!   FIFO) and a standby takes over when it dies.
//! * **Partition count.** P is configuration. The marker queue carries it as its
//!   `x-max-length` (it never holds a message), and RabbitMQ refuses to redeclare a queue with
//!   different arguments, so a process configured with another P fails at start with a clear
//!   error instead of silently routing one order to two queues.
//! * **Durability.** Durable queues, persistent messages, publisher confirms (`publish` returns
//!   after the broker's ack, and `mandatory` makes an unroutable message an error, not a silent
//!   drop), manual acknowledgement, bounded prefetch.
//! * **Loss of the connection or a channel.** Publishing fails fast (the outbox keeps the row,
//!   the relay sends it again); consumers reconnect with exponential backoff, redeclare and
//!   resume. Deliveries that were not acknowledged are redelivered by the broker and dropped as
//!   duplicates by the engine's inbox and the workers' barrier.

use crate::redact::redact_url as redact;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use backon::{ExponentialBuilder, Retryable};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use super::{
    Acker, Consumer, DeadDelivery, DeadLetter, DeadLetterConsumer, Delivery, Message, Transport,
    TransportError, bundle,
};

/// How long a connection attempt and a publisher confirm may take before they count as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

/// Header carrying the message's ordering key.
pub const KEY_HEADER: &str = "x-sagaflow-key";
/// Headers set on a dead-lettered message.
pub const REASON_HEADER: &str = "x-sagaflow-reason";
pub const QUEUE_HEADER: &str = "x-sagaflow-queue";
pub const DEAD_ID_HEADER: &str = "x-sagaflow-dead-id";
pub const DEAD_AT_HEADER: &str = "x-sagaflow-dead-at";
/// Header marking a bundle (several messages in one AMQP message, see [`super::bundle`]): the
/// number of parts.
pub const BUNDLE_HEADER: &str = "x-sagaflow-bundle";

/// The W3C trace context header: a command's or reply's own, or a bundle's first part's
/// (each part carries its own in its payload, see [`crate::trace`]).
pub const TRACEPARENT_HEADER: &str = "traceparent";
/// The W3C `tracestate` header, beside [`TRACEPARENT_HEADER`] when the message carries one.
pub const TRACESTATE_HEADER: &str = "tracestate";
/// A bundle's encoded size stays under this (RabbitMQ's own limit is far above it).
const BUNDLE_MAX_BYTES: usize = 512 * 1024;

/// Classic queues for one node, quorum queues (replicated) for a cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QueueType {
    #[default]
    Classic,
    Quorum,
}

impl QueueType {
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
        }
    }
}

impl std::str::FromStr for QueueType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "classic" => Ok(QueueType::Classic),
            "quorum" => Ok(QueueType::Quorum),
            other => Err(format!(
                "unknown queue type `{other}` (expected `classic` or `quorum`)"
            )),
        }
    }
}

/// Partitions per logical queue when none are asked for.
///
/// One. Every process consumes every partition of its queues with single-active-consumer, so
/// partitions spread the work over processes only as far as the processes happen to win
/// different partitions, while each one splits the batches on the wire: a batch's messages for
/// one service travel as one bundle per partition, the broker keeps a queue (with its own
/// persistence) per partition, and a worker's batches are made of what one consumer delivered.
/// Measured (`sagaflow bench --orders 20000`, same binary, alternating): 8 partitions 1,250
/// sagas/s and 1.55 ms of CPU per saga on the machine, 4 partitions 1,440 and 1.34 ms, 2
/// partitions 1,540 and 1.22 ms, 1 partition 1,660 and 1.12 ms (the broker's share 0.28 ->
/// 0.10 ms). More processes of a service still take over from one another (a standby per
/// partition); give every process of a deployment `--partitions N` to let up to N of them
/// consume at once.
pub const DEFAULT_PARTITIONS: u16 = 1;

#[derive(Debug, Clone)]
pub struct AmqpConfig {
    /// `amqp://user:pass@host:port/vhost`
    pub url: String,
    /// Prefix of every exchange and queue name: separate deployments (or tests) on one broker.
    pub prefix: String,
    /// Partitions per logical queue. Every process of a deployment must agree.
    pub partitions: u16,
    /// `partitions` is only this process's default: a deployment already declared on the
    /// broker with another count is joined with that count instead of refused (see
    /// [`DEFAULT_PARTITIONS`]). False: a different count is an error.
    pub join_declared_partitions: bool,
    pub queue_type: QueueType,
    /// Unacknowledged deliveries per partition consumer.
    pub prefetch: u16,
    /// Shown in the broker's connection list, followed by ` [<prefix>]` (so the connections of
    /// one deployment can be told apart, see [`close_connections`]).
    pub connection_name: String,
    /// At most this many messages of one partition travel in one AMQP message (see
    /// [`super::bundle`]); 1 sends every message on its own.
    pub bundle: u16,
    /// Quorum queues only: a message delivered this many times without being settled (its
    /// consumer died on it each time) goes to the dead-letter queue with the broker's reason,
    /// rather than blocking its partition for ever. 0: no limit.
    pub delivery_limit: u32,
}

impl AmqpConfig {
    pub fn new(url: &str) -> AmqpConfig {
        AmqpConfig {
            url: url.to_owned(),
            prefix: "sagaflow".to_owned(),
            partitions: DEFAULT_PARTITIONS,
            join_declared_partitions: false,
            queue_type: QueueType::Classic,
            prefetch: 64,
            connection_name: format!("sagaflow-{}", std::process::id()),
            bundle: 128,
            delivery_limit: DEFAULT_DELIVERY_LIMIT,
        }
    }
}

/// The default [`AmqpConfig::delivery_limit`]. The engine gives back a reply it cannot apply
/// yet (its database is down) after a backoff of up to 5 s, so 100 deliveries take over 8
/// minutes of outage — and a reply set aside even then is kept, while the step's timeout sends
/// the command again. A message that kills its consumer every time is set aside after 100
/// restarts instead of blocking its partition for ever.
pub const DEFAULT_DELIVERY_LIMIT: u32 = 100;

/// The name a connection shows in the broker's connection list.
fn broker_connection_name(name: &str, prefix: &str) -> String {
    format!("{name} [{prefix}]")
}

/// Force-closes, through `rabbitmqctl` on this machine, every broker connection of the
/// deployment with `prefix` (and no other): what the fault tests do to one deployment without
/// disturbing another on the same broker. Returns how many were closed.
pub fn close_connections(prefix: &str, reason: &str) -> Result<usize, String> {
    let run = |args: &[&str]| -> Result<String, String> {
        let out = std::process::Command::new("rabbitmqctl")
            .args(args)
            .output()
            .map_err(|e| format!("rabbitmqctl {}: {e}", args[0]))?;
        if !out.status.success() {
            return Err(format!(
                "rabbitmqctl {}: {}",
                args[0],
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    // The name a client gives is in its client properties (`connection_name`).
    let listed = run(&[
        "-q",
        "list_connections",
        "--no-table-headers",
        "pid",
        "client_properties",
    ])?;
    let tag = format!("[{prefix}]");
    let mut closed = 0;
    for line in listed.lines() {
        let Some((pid, properties)) = line.split_once('\t') else {
            continue;
        };
        if properties.contains(&tag) {
            run(&["-q", "close_connection", pid.trim(), reason])?;
            closed += 1;
        }
    }
    Ok(closed)
}

/// The stable hash used for partitioning: 64-bit FNV-1a over the key's UTF-8 bytes. It is part
/// of the wire contract — the same in every process and every release (never `DefaultHasher`,
/// which is randomly seeded) — and pinned by a test.
pub fn stable_hash(key: &str) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    key.bytes()
        .fold(OFFSET, |h, b| (h ^ u64::from(b)).wrapping_mul(PRIME))
}

/// The partition count a deployment was declared with, from the broker's refusal of another
/// one (`… inequivalent arg 'x-max-length' for queue '<prefix>.topology' …: received '1' but
/// current is '8'`).
fn declared_partitions(refusal: &str) -> Option<u16> {
    if !refusal.contains("x-max-length") {
        return None;
    }
    let (_, current) = refusal.rsplit_once("current is '")?;
    current.split('\'').next()?.parse().ok()
}

/// The partition of `key` among `partitions`.
pub fn partition_of(key: &str, partitions: u16) -> u16 {
    (stable_hash(key) % u64::from(partitions.max(1))) as u16
}

/// One live connection with its publishing channel (confirms on).
#[derive(Debug)]
struct Link {
    connection: Connection,
    publisher: Channel,
    generation: u64,
    /// Logical queues whose exchange, queues and bindings are declared on this connection.
    declared: Mutex<HashSet<String>>,
}

#[derive(Debug)]
struct Shared {
    config: AmqpConfig,
    link: tokio::sync::Mutex<Option<Arc<Link>>>,
    generations: AtomicU64,
    closed: watch::Sender<bool>,
    published: AtomicU64,
    /// AMQP messages confirmed (a bundle is one).
    frames: AtomicU64,
    /// When a refused publish last made the link be opened anew (ms since the epoch).
    last_refusal_reset: AtomicI64,
}

/// The RabbitMQ transport. Cheap to clone; clones share one connection.
#[derive(Debug, Clone)]
pub struct AmqpTransport {
    shared: Arc<Shared>,
}

fn amqp_err(context: &str, e: impl std::fmt::Display) -> TransportError {
    TransportError::Other(format!("{context}: {e}"))
}

/// At most this long for any one exchange with the broker that has no bound of its own (a
/// declare, opening a channel, settling a delivery, closing a dead connection). A node that
/// dies under a connection can leave such an exchange unanswered for ever (seen on a 3-node
/// cluster: a worker's reply path stopped, then its lanes, then its consumer); bounded, it
/// fails, the connection is dropped and the work is redone on a new one.
const BROKER_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a consumer may go without a delivery while its queue holds ready messages before
/// it subscribes again (see `consume_queue`).
const CONSUMER_WATCHDOG: Duration = Duration::from_secs(15);

/// `fut`, or an error naming `what` once [`BROKER_TIMEOUT`] has passed.
async fn bounded<T>(
    what: &str,
    fut: impl std::future::Future<Output = Result<T, TransportError>>,
) -> Result<T, TransportError> {
    match tokio::time::timeout(BROKER_TIMEOUT, fut).await {
        Ok(r) => r,
        Err(_) => Err(TransportError::Other(format!(
            "{what}: no answer from RabbitMQ within {BROKER_TIMEOUT:?}"
        ))),
    }
}

fn table(entries: Vec<(&str, AMQPValue)>) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in entries {
        t.insert(ShortString::from(k), v);
    }
    t
}

fn long_string(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

impl AmqpTransport {
    /// Connects, declares the shared topology and checks the partition count against the
    /// broker's. Fails with a clear error when the broker is unreachable or the count differs
    /// (unless [`AmqpConfig::join_declared_partitions`]: then the deployment's count is taken).
    pub async fn connect(config: AmqpConfig) -> Result<Arc<AmqpTransport>, TransportError> {
        let join = config.join_declared_partitions;
        let wanted = config.partitions;
        match Self::connect_as(config.clone()).await {
            Err(TransportError::PartitionMismatch {
                declared: Some(declared),
                ..
            }) if join && declared != wanted => {
                tracing::info!(
                    prefix = %config.prefix,
                    partitions = declared,
                    "joining the deployment with the partition count it was declared with"
                );
                Self::connect_as(AmqpConfig {
                    partitions: declared,
                    ..config
                })
                .await
            }
            other => other,
        }
    }

    async fn connect_as(config: AmqpConfig) -> Result<Arc<AmqpTransport>, TransportError> {
        if config.partitions == 0 {
            return Err(TransportError::Other(
                "the partition count (--partitions, SAGAFLOW_PARTITIONS) must be at least 1".into(),
            ));
        }
        if config.bundle == 0 {
            return Err(TransportError::Other(
                "the bundle size (--bundle, SAGAFLOW_BUNDLE) must be at least 1; 1 sends every message on its own".into(),
            ));
        }
        if config.prefetch == 0 {
            return Err(TransportError::Other(
                "the prefetch (--prefetch, SAGAFLOW_PREFETCH) must be at least 1; 0 would mean unbounded".into(),
            ));
        }
        let (closed, _) = watch::channel(false);
        let transport = AmqpTransport {
            shared: Arc::new(Shared {
                config,
                link: tokio::sync::Mutex::new(None),
                generations: AtomicU64::new(0),
                closed,
                published: AtomicU64::new(0),
                frames: AtomicU64::new(0),
                last_refusal_reset: AtomicI64::new(0),
            }),
        };
        transport.link().await?;
        Ok(Arc::new(transport))
    }

    pub fn config(&self) -> &AmqpConfig {
        &self.shared.config
    }

    /// Messages published and confirmed by this process (each part of a bundle counts).
    pub fn published(&self) -> u64 {
        self.shared.published.load(Ordering::Relaxed)
    }

    /// AMQP messages published and confirmed by this process: `published()` less what
    /// bundling saved.
    pub fn frames_published(&self) -> u64 {
        self.shared.frames.load(Ordering::Relaxed)
    }

    /// Stops every consumer and closes the connection. Unacknowledged deliveries go back to
    /// their queues.
    pub async fn close(&self) {
        self.shared.closed.send_replace(true);
        let link = self.shared.link.lock().await.take();
        if let Some(link) = link {
            let _ = link.connection.close(200, ShortString::from("bye")).await;
        }
    }

    fn is_closed(&self) -> bool {
        *self.shared.closed.borrow()
    }

    fn name(&self, suffix: &str) -> String {
        format!("{}.{suffix}", self.shared.config.prefix)
    }

    /// The exchange a logical queue's messages are published to.
    fn exchange_of(&self, logical: &str) -> String {
        match logical.split_once('.') {
            Some(("cmd", _)) => self.name("cmd"),
            _ => self.name(logical),
        }
    }

    fn partition_queue(&self, logical: &str, partition: u16) -> String {
        self.name(&format!("{logical}.{partition}"))
    }

    fn routing_key(logical: &str, partition: u16) -> String {
        format!("{logical}.{partition}")
    }

    /// Names of the queues behind a logical queue, one per partition.
    pub fn partition_queues(&self, logical: &str) -> Vec<String> {
        (0..self.shared.config.partitions)
            .map(|p| self.partition_queue(logical, p))
            .collect()
    }

    pub fn dead_letter_queue(&self) -> String {
        self.name("dead-letters")
    }

    /// The current connection, connecting (once, for all callers) if there is none.
    async fn link(&self) -> Result<Arc<Link>, TransportError> {
        if self.is_closed() {
            return Err(TransportError::Closed);
        }
        let mut guard = self.shared.link.lock().await;
        if let Some(link) = guard.as_ref()
            && link.connection.status().connected()
            && link.publisher.status().connected()
        {
            return Ok(link.clone());
        }
        let link = Arc::new(bounded("connecting", self.open()).await?);
        *guard = Some(link.clone());
        Ok(link)
    }

    /// Forgets a broken connection (only if nobody replaced it already).
    async fn broken(&self, generation: u64) {
        let old = {
            let mut guard = self.shared.link.lock().await;
            if guard.as_ref().is_some_and(|l| l.generation == generation) {
                guard.take()
            } else {
                None
            }
        };
        // Closed outside the lock, and bounded: a dead connection may never answer.
        if let Some(old) = old {
            let closing = old.connection.close(200, ShortString::from("reconnecting"));
            let _ = tokio::time::timeout(Duration::from_secs(2), closing).await;
        }
    }

    async fn open(&self) -> Result<Link, TransportError> {
        let config = &self.shared.config;
        let properties = ConnectionProperties::default().with_connection_name(LongString::from(
            broker_connection_name(&config.connection_name, &config.prefix).into_bytes(),
        ));
        let connecting = Connection::connect(&config.url, properties);
        let connection = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                return Err(TransportError::Other(format!(
                    "cannot connect to RabbitMQ at {}: {e}",
                    redact(&config.url)
                )));
            }
            Err(_) => {
                return Err(TransportError::Other(format!(
                    "cannot connect to RabbitMQ at {}: no answer within {CONNECT_TIMEOUT:?}",
                    redact(&config.url)
                )));
            }
        };
        let generation = self.shared.generations.fetch_add(1, Ordering::Relaxed) + 1;
        self.declare_base(&connection).await?;
        let publisher = connection
            .create_channel()
            .await
            .map_err(|e| amqp_err("opening the publishing channel", e))?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| amqp_err("enabling publisher confirms", e))?;
        info!(generation, prefix = %config.prefix, "connected to RabbitMQ");
        Ok(Link {
            connection,
            publisher,
            generation,
            declared: Mutex::default(),
        })
    }

    /// The dead-letter exchange and queue, and the partition-count check.
    async fn declare_base(&self, connection: &Connection) -> Result<(), TransportError> {
        let config = &self.shared.config;
        let ch = connection
            .create_channel()
            .await
            .map_err(|e| amqp_err("opening a channel", e))?;
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        ch.exchange_declare(
            ShortString::from(self.name("dead")),
            ExchangeKind::Fanout,
            durable,
            FieldTable::default(),
        )
        .await
        .map_err(|e| amqp_err("declaring the dead-letter exchange", e))?;
        self.declare_queue(&ch, &self.dead_letter_queue(), false)
            .await?;
        ch.queue_bind(
            ShortString::from(self.dead_letter_queue()),
            ShortString::from(self.name("dead")),
            ShortString::from(""),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| amqp_err("binding the dead-letter queue", e))?;
        let marker = self.name("topology");
        let args = table(vec![
            (
                "x-max-length",
                AMQPValue::LongLongInt(i64::from(config.partitions)),
            ),
            // Quorum on a cluster: a classic marker would live on one node only.
            ("x-queue-type", long_string(config.queue_type.as_str())),
        ]);
        let declared = ch
            .queue_declare(
                ShortString::from(marker.as_str()),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                args,
            )
            .await;
        if let Err(e) = declared {
            let text = e.to_string();
            if text.contains("PRECONDITION_FAILED") || text.contains("inequivalent") {
                return Err(TransportError::PartitionMismatch {
                    configured: config.partitions,
                    declared: declared_partitions(&text),
                    prefix: config.prefix.clone(),
                    broker: text,
                });
            }
            return Err(amqp_err("declaring the topology marker", e));
        }
        let _ = ch.close(200, ShortString::from("declared")).await;
        Ok(())
    }

    async fn declare_queue(
        &self,
        ch: &Channel,
        name: &str,
        single_active: bool,
    ) -> Result<(), TransportError> {
        let mut args = vec![(
            "x-queue-type",
            long_string(self.shared.config.queue_type.as_str()),
        )];
        if single_active {
            args.push(("x-single-active-consumer", AMQPValue::Boolean(true)));
            args.push(("x-dead-letter-exchange", long_string(&self.name("dead"))));
            let limit = self.shared.config.delivery_limit;
            if self.shared.config.queue_type == QueueType::Quorum && limit > 0 {
                args.push(("x-delivery-limit", AMQPValue::LongLongInt(i64::from(limit))));
            }
        }
        ch.queue_declare(
            ShortString::from(name),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            table(args),
        )
        .await
        .map_err(|e| amqp_err(&format!("declaring queue {name}"), e))?;
        Ok(())
    }

    /// Declares a logical queue's exchange, partition queues and bindings (once per connection).
    async fn ensure_declared(&self, link: &Link, logical: &str) -> Result<(), TransportError> {
        if lock(&link.declared).contains(logical) {
            return Ok(());
        }
        let ch = link
            .connection
            .create_channel()
            .await
            .map_err(|e| amqp_err("opening a channel", e))?;
        let exchange = self.exchange_of(logical);
        ch.exchange_declare(
            ShortString::from(exchange.as_str()),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| amqp_err(&format!("declaring exchange {exchange}"), e))?;
        for p in 0..self.shared.config.partitions {
            let queue = self.partition_queue(logical, p);
            self.declare_queue(&ch, &queue, true).await?;
            ch.queue_bind(
                ShortString::from(queue.as_str()),
                ShortString::from(exchange.as_str()),
                ShortString::from(Self::routing_key(logical, p)),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| amqp_err(&format!("binding queue {queue}"), e))?;
        }
        let _ = ch.close(200, ShortString::from("declared")).await;
        lock(&link.declared).insert(logical.to_owned());
        debug!(logical, "declared");
        Ok(())
    }

    /// Declares the topology of `logical` queues without consuming (for tools and tests).
    pub async fn declare(&self, logical: &str) -> Result<(), TransportError> {
        let link = self.link().await?;
        bounded("declaring", self.ensure_declared(&link, logical)).await
    }

    /// Messages ready in a queue (by its full name), without consuming.
    pub async fn queue_depth(&self, queue: &str) -> Result<u32, TransportError> {
        Ok(self.queue_stats(queue).await?.0)
    }

    /// (messages ready, consumers) of a queue (by its full name).
    pub async fn queue_stats(&self, queue: &str) -> Result<(u32, u32), TransportError> {
        let link = self.link().await?;
        let ch = link
            .connection
            .create_channel()
            .await
            .map_err(|e| amqp_err("opening a channel", e))?;
        let q = ch
            .queue_declare(
                ShortString::from(queue),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| amqp_err(&format!("inspecting queue {queue}"), e))?;
        let _ = ch.close(200, ShortString::from("done")).await;
        Ok((q.message_count(), q.consumer_count()))
    }

    /// Takes (and acknowledges) up to `max` dead letters: (queue, reason, message).
    pub async fn take_dead_letters(
        &self,
        max: usize,
    ) -> Result<Vec<super::DeadLetter>, TransportError> {
        let link = self.link().await?;
        let ch = link
            .connection
            .create_channel()
            .await
            .map_err(|e| amqp_err("opening a channel", e))?;
        let mut out = Vec::new();
        while out.len() < max {
            let got = ch
                .basic_get(
                    ShortString::from(self.dead_letter_queue()),
                    lapin::options::BasicGetOptions { no_ack: true },
                )
                .await
                .map_err(|e| amqp_err("reading the dead-letter queue", e))?;
            let Some(got) = got else { break };
            let d = got.delivery;
            out.extend(self.letters_of(&d.properties, &d.data));
        }
        let _ = ch.close(200, ShortString::from("done")).await;
        Ok(out)
    }

    /// Deletes every queue and exchange of the given logical queues, plus the dead-letter queue
    /// and the marker (test cleanup and `drain-and-repartition`).
    pub async fn delete_topology(&self, logicals: &[&str]) -> Result<(), TransportError> {
        let link = self.link().await?;
        let ch = link
            .connection
            .create_channel()
            .await
            .map_err(|e| amqp_err("opening a channel", e))?;
        let mut queues = vec![self.dead_letter_queue(), self.name("topology")];
        let mut exchanges = vec![self.name("dead")];
        for l in logicals {
            queues.extend(self.partition_queues(l));
            exchanges.push(self.exchange_of(l));
        }
        for q in queues {
            ch.queue_delete(ShortString::from(q.as_str()), QueueDeleteOptions::default())
                .await
                .map_err(|e| amqp_err(&format!("deleting queue {q}"), e))?;
        }
        exchanges.sort();
        exchanges.dedup();
        for x in exchanges {
            ch.exchange_delete(
                ShortString::from(x.as_str()),
                ExchangeDeleteOptions::default(),
            )
            .await
            .map_err(|e| amqp_err(&format!("deleting exchange {x}"), e))?;
        }
        lock(&link.declared).clear();
        let _ = ch.close(200, ShortString::from("done")).await;
        Ok(())
    }

    async fn publish_raw(
        &self,
        exchange: &str,
        routing_key: &str,
        message: &Message,
        extra_headers: Vec<(&str, AMQPValue)>,
    ) -> Result<(), TransportError> {
        let link = self.link().await?;
        let sent = self
            .send_raw(&link, exchange, routing_key, message, extra_headers)
            .await;
        self.confirmed(&link, exchange, routing_key, 1, sent).await
    }

    /// The first half of a publish: the frame is written, the confirm is still to come (so a
    /// batch can be sent in order and its confirms awaited together).
    async fn send_raw(
        &self,
        link: &Link,
        exchange: &str,
        routing_key: &str,
        message: &Message,
        extra_headers: Vec<(&str, AMQPValue)>,
    ) -> Result<lapin::PublisherConfirm, String> {
        let mut headers = vec![(KEY_HEADER, long_string(&message.key))];
        if let Some(tp) = crate::trace::traceparent_in(&message.payload) {
            headers.push((TRACEPARENT_HEADER, long_string(tp)));
            if let Some(ts) = crate::trace::tracestate_in(&message.payload) {
                headers.push((TRACESTATE_HEADER, long_string(&ts)));
            }
        }
        headers.extend(extra_headers);
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type(ShortString::from("application/json"))
            .with_message_id(ShortString::from(message.id.as_str()))
            .with_headers(table(headers));
        let publishing = link.publisher.basic_publish(
            ShortString::from(exchange),
            ShortString::from(routing_key),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            &message.payload,
            properties,
        );
        match tokio::time::timeout(BROKER_TIMEOUT, publishing).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err(format!(
                "the frame was not written within {BROKER_TIMEOUT:?}"
            )),
        }
    }

    /// The second half: the broker's answer.
    async fn confirmed(
        &self,
        link: &Link,
        exchange: &str,
        routing_key: &str,
        parts: u64,
        sent: Result<lapin::PublisherConfirm, String>,
    ) -> Result<(), TransportError> {
        let not_confirmed = |reason: String| TransportError::NotConfirmed {
            queue: format!("{exchange}/{routing_key}"),
            reason,
        };
        let confirm = match sent {
            Ok(confirm) => match tokio::time::timeout(CONFIRM_TIMEOUT, confirm).await {
                Ok(c) => c,
                Err(_) => {
                    return Err(not_confirmed(format!(
                        "no confirm within {CONFIRM_TIMEOUT:?} (is the broker blocked by a resource alarm?)"
                    )));
                }
            },
            Err(e) => {
                self.broken(link.generation).await;
                return Err(not_confirmed(format!("connection problem: {e}")));
            }
        };
        match confirm {
            Ok(Confirmation::Ack(None)) => {
                self.shared.published.fetch_add(parts, Ordering::Relaxed);
                self.shared.frames.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Ok(Confirmation::Ack(Some(returned))) => Err(not_confirmed(format!(
                "unroutable ({}): no queue is bound for it",
                returned.reply_text
            ))),
            Ok(Confirmation::Nack(_)) => {
                // A quorum queue refuses publishes while it has no leader, and a channel that
                // published through the leader's death can go on being refused (seen on the
                // 3-node cluster: a worker's replies to four partitions were refused from the
                // kill to the end of the run, its commands redelivered in a loop). So a
                // refusal opens the link anew, at most once a second.
                let now = super::epoch_ms();
                let last = self.shared.last_refusal_reset.load(Ordering::Relaxed);
                if now - last >= 1000
                    && self
                        .shared
                        .last_refusal_reset
                        .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                        .is_ok()
                {
                    warn!(
                        exchange,
                        routing_key, "the broker refused a publish; opening the connection anew"
                    );
                    self.broken(link.generation).await;
                }
                Err(not_confirmed("the broker refused it".into()))
            }
            Ok(Confirmation::NotRequested) => Err(not_confirmed("confirms are not enabled".into())),
            Err(e) => {
                self.broken(link.generation).await;
                Err(not_confirmed(format!("connection problem: {e}")))
            }
        }
    }

    /// A broker delivery as the transport's deliveries: itself, or the parts of a bundle (each
    /// settled on its own, the broker's message settled when the last part is). A bundle that
    /// does not decode is dead-lettered whole here, with the reason.
    async fn unpack(&self, logical: &str, d: lapin::message::Delivery) -> Vec<Delivery> {
        let acker = AmqpAcker {
            acker: d.acker,
            transport: self.clone(),
            queue: logical.to_owned(),
        };
        let is_bundle = d
            .properties
            .headers()
            .as_ref()
            .is_some_and(|h| h.inner().contains_key(BUNDLE_HEADER));
        let message = to_message(&d.properties, d.data);
        if !is_bundle {
            return vec![Delivery::new(message, d.redelivered, Box::new(acker))];
        }
        match bundle::decode(&message.payload) {
            Ok(parts) => {
                let shared = Arc::new(BundleAck {
                    acker: tokio::sync::Mutex::new(Some(acker)),
                    unsettled: AtomicUsize::new(parts.len()),
                    give_back: AtomicBool::new(false),
                });
                parts
                    .into_iter()
                    .map(|part| {
                        Delivery::new(
                            part,
                            d.redelivered,
                            Box::new(PartAcker {
                                bundle: shared.clone(),
                            }),
                        )
                    })
                    .collect()
            }
            Err(reason) => {
                let reason = format!("malformed bundle: {reason}");
                warn!(queue = %logical, id = %message.id, %reason, "dead-lettering");
                if let Err(e) = Box::new(acker).dead_letter(&message, &reason).await {
                    warn!(queue = %logical, error = %e, "dead-lettering a malformed bundle failed; it was given back");
                }
                Vec::new()
            }
        }
    }

    /// Publishes `message` to the dead-letter exchange with its reason and source queue.
    async fn publish_dead_letter(
        &self,
        queue: &str,
        message: &Message,
        reason: &str,
    ) -> Result<(), TransportError> {
        let exchange = self.name("dead");
        let letter = DeadLetter::now(queue, reason, message.clone());
        let headers = vec![
            (REASON_HEADER, long_string(reason)),
            (QUEUE_HEADER, long_string(queue)),
            (DEAD_ID_HEADER, long_string(&letter.id)),
            (DEAD_AT_HEADER, AMQPValue::LongLongInt(letter.at)),
        ];
        self.publish_raw(&exchange, "", message, headers).await
    }

    /// What a broker delivery from the dead-letter queue holds: the letter we published (our
    /// headers), or a message the broker set aside itself (its `x-death` headers: a quorum
    /// queue's delivery limit). A bundle yields one letter per part.
    fn letters_of(&self, props: &BasicProperties, data: &[u8]) -> Vec<DeadLetter> {
        let message = to_message(props, data.to_vec());
        let ours = header_str(props, REASON_HEADER);
        let (queue, reason) = match ours {
            Some(reason) => (header_str(props, QUEUE_HEADER).unwrap_or_default(), reason),
            None => {
                let death = header_str(props, "x-first-death-reason").unwrap_or_default();
                let physical = header_str(props, "x-first-death-queue").unwrap_or_default();
                let count = death_count(props);
                let why = match death.as_str() {
                    "delivery_limit" => format!(
                        "delivered {count} times without being settled (the queue's delivery limit of {}): its consumer failed on it every time",
                        self.shared.config.delivery_limit
                    ),
                    "" => "set aside by the broker (no reason given)".to_owned(),
                    other => format!("set aside by the broker: {other}"),
                };
                (self.logical_of(&physical), why)
            }
        };
        let id = header_str(props, DEAD_ID_HEADER).unwrap_or_else(|| {
            // The broker's own: the same on every redelivery of this letter.
            format!("dl-broker-{}-{}-{}", message.id, death_count(props), queue)
        });
        let at = header_i64(props, DEAD_AT_HEADER)
            .or_else(|| death_time(props))
            .unwrap_or_else(super::epoch_ms);
        let letter = |n: usize, message: Message| DeadLetter {
            id: if n == 0 {
                id.clone()
            } else {
                format!("{id}.{n}")
            },
            queue: queue.clone(),
            reason: reason.clone(),
            at,
            message,
        };
        let is_bundle = props
            .headers()
            .as_ref()
            .is_some_and(|h| h.inner().contains_key(BUNDLE_HEADER));
        if !is_bundle {
            return vec![letter(0, message)];
        }
        match bundle::decode(&message.payload) {
            Ok(parts) => parts
                .into_iter()
                .enumerate()
                .map(|(n, part)| letter(n + 1, part))
                .collect(),
            // Kept as it is: an operator sees the bytes and why.
            Err(e) => {
                let mut whole = letter(0, message);
                whole.reason = format!("{} (and the bundle does not decode: {e})", whole.reason);
                vec![whole]
            }
        }
    }

    /// `cmd.payment` for `<prefix>.cmd.payment.3`; the name itself if it is not one of ours.
    fn logical_of(&self, physical: &str) -> String {
        let prefix = format!("{}.", self.shared.config.prefix);
        let rest = physical.strip_prefix(&prefix).unwrap_or(physical);
        match rest.rsplit_once('.') {
            Some((logical, p)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
                logical.to_owned()
            }
            _ => rest.to_owned(),
        }
    }

    /// One partition's consumer: connect, consume, forward; on any loss, back off and resume.
    async fn consume_partition(self, logical: String, partition: u16, tx: mpsc::Sender<Delivery>) {
        let queue = self.partition_queue(&logical, partition);
        self.consume_queue(queue, Sink::Partition { logical, tx })
            .await;
    }

    /// Consumes one broker queue into `sink`: connect, consume, forward; on any loss, back off
    /// and resume.
    async fn consume_queue(self, queue: String, sink: Sink) {
        let mut closed = self.shared.closed.subscribe();
        let mut recovering = false;
        loop {
            if self.is_closed() || sink.is_closed() {
                return;
            }
            let attempt = || {
                bounded("starting a consumer", async {
                    let link = self.link().await?;
                    if let Sink::Partition { logical, .. } = &sink {
                        bounded("declaring", self.ensure_declared(&link, logical)).await?;
                    }
                    let ch = link
                        .connection
                        .create_channel()
                        .await
                        .map_err(|e| amqp_err("opening a channel", e))?;
                    ch.basic_qos(self.shared.config.prefetch, BasicQosOptions::default())
                        .await
                        .map_err(|e| amqp_err("setting the prefetch", e))?;
                    let consumer = ch
                        .basic_consume(
                            ShortString::from(queue.as_str()),
                            ShortString::from(format!(
                                "{}-{}",
                                self.shared.config.connection_name, queue
                            )),
                            BasicConsumeOptions::default(),
                            FieldTable::default(),
                        )
                        .await
                        .map_err(|e| amqp_err(&format!("consuming {queue}"), e))?;
                    Ok::<_, TransportError>((link.generation, ch, consumer))
                })
            };
            let started = attempt
                .retry(
                    ExponentialBuilder::default()
                        .with_min_delay(Duration::from_millis(100))
                        .with_max_delay(Duration::from_secs(5))
                        .with_jitter()
                        .without_max_times(),
                )
                .when(|e| !matches!(e, TransportError::Closed))
                .notify(|e, wait| warn!(queue = %queue, error = %e, ?wait, "RabbitMQ consumer: retrying"));
            let (generation, channel, mut consumer) = tokio::select! {
                r = started => match r {
                    Ok(x) => x,
                    Err(_) => return,
                },
                _ = closed.wait_for(|c| *c) => return,
            };
            if recovering {
                warn!(queue = %queue, "consuming again");
            }
            recovering = true;
            // The watchdog: a consumer that got nothing for a whole period while its queue
            // holds ready messages subscribes again. Seen on a 3-node cluster after the node a
            // worker was connected to was killed: the worker reconnected, but three of its
            // partitions had no consumer registered any more, and their commands waited for
            // ever. (A standby of a single-active-consumer queue just subscribes again as a
            // standby.)
            let mut watchdog = tokio::time::interval(CONSUMER_WATCHDOG);
            watchdog.tick().await;
            let mut delivered = false;
            let mut resubscribe = false;
            loop {
                let next = tokio::select! {
                    n = consumer.next() => Some(n),
                    _ = watchdog.tick() => None,
                    _ = closed.wait_for(|c| *c) => return,
                };
                let Some(next) = next else {
                    debug!(queue = %queue, delivered, "consumer watchdog");
                    if std::mem::take(&mut delivered) {
                        continue;
                    }
                    let stats = bounded("inspecting a queue", self.queue_stats(&queue)).await;
                    debug!(queue = %queue, ?stats, "consumer watchdog: the queue");
                    match stats {
                        Ok((ready, consumers)) if ready > 0 => {
                            warn!(queue = %queue, ready, consumers, "nothing delivered for {CONSUMER_WATCHDOG:?} while messages wait; subscribing again");
                            let closing =
                                channel.close(200, ShortString::from("subscribing again"));
                            let _ = tokio::time::timeout(Duration::from_secs(2), closing).await;
                            resubscribe = true;
                            break;
                        }
                        Ok(_) => continue,
                        Err(e) => {
                            warn!(queue = %queue, error = %e, "nothing delivered for {CONSUMER_WATCHDOG:?}, and the queue cannot be inspected; subscribing again");
                            resubscribe = true;
                            break;
                        }
                    }
                };
                delivered = true;
                match next {
                    Some(Ok(d)) => {
                        if !sink.forward(&self, &queue, d).await {
                            let _ = channel
                                .close(200, ShortString::from("consumer dropped"))
                                .await;
                            return;
                        }
                    }
                    Some(Err(e)) => {
                        warn!(queue = %queue, error = %e, "RabbitMQ delivery failed; reconnecting");
                        break;
                    }
                    None => {
                        warn!(queue = %queue, "RabbitMQ consumer ended; reconnecting");
                        break;
                    }
                }
            }
            if !resubscribe {
                self.broken(generation).await;
            }
            warn!(queue = %queue, "subscribing again");
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = closed.wait_for(|c| *c) => return,
            }
        }
    }
}

/// Where a queue consumer's deliveries go.
enum Sink {
    /// A logical queue's partition: unpacked into the logical queue's deliveries.
    Partition {
        logical: String,
        tx: mpsc::Sender<Delivery>,
    },
    /// The dead-letter queue.
    Dead { tx: mpsc::Sender<DeadDelivery> },
}

impl Sink {
    fn is_closed(&self) -> bool {
        match self {
            Sink::Partition { tx, .. } => tx.is_closed(),
            Sink::Dead { tx } => tx.is_closed(),
        }
    }

    /// False once the receiving side is gone.
    async fn forward(&self, t: &AmqpTransport, queue: &str, d: lapin::message::Delivery) -> bool {
        match self {
            Sink::Partition { logical, tx } => {
                for delivery in t.unpack(logical, d).await {
                    if tx.send(delivery).await.is_err() {
                        return false;
                    }
                }
                true
            }
            Sink::Dead { tx } => {
                let letters = t.letters_of(&d.properties, &d.data);
                let acker = AmqpAcker {
                    acker: d.acker,
                    transport: t.clone(),
                    queue: queue.to_owned(),
                };
                tx.send(DeadDelivery::new(letters, Box::new(acker)))
                    .await
                    .is_ok()
            }
        }
    }
}

/// The dead-letter queue's deliveries.
#[derive(Debug)]
struct AmqpDeadConsumer {
    rx: mpsc::Receiver<DeadDelivery>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for AmqpDeadConsumer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[async_trait]
impl DeadLetterConsumer for AmqpDeadConsumer {
    async fn next(&mut self) -> Option<DeadDelivery> {
        self.rx.recv().await
    }
}

/// How often the broker set this message aside (`x-death`'s count for its latest death).
fn death_count(props: &BasicProperties) -> i64 {
    first_death(props)
        .and_then(|t| t.inner().get("count").and_then(amqp_i64))
        .unwrap_or(1)
}

/// When the broker last set it aside, in ms.
fn death_time(props: &BasicProperties) -> Option<i64> {
    match first_death(props)?.inner().get("time")? {
        AMQPValue::Timestamp(secs) => i64::try_from(*secs).ok().map(|s| s * 1000),
        _ => None,
    }
}

fn first_death(props: &BasicProperties) -> Option<FieldTable> {
    match props.headers().as_ref()?.inner().get("x-death")? {
        AMQPValue::FieldArray(deaths) => match deaths.as_slice().first()? {
            AMQPValue::FieldTable(t) => Some(t.clone()),
            _ => None,
        },
        _ => None,
    }
}

fn amqp_i64(v: &AMQPValue) -> Option<i64> {
    match v {
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::LongUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortInt(n) => Some(i64::from(*n)),
        AMQPValue::Timestamp(n) => i64::try_from(*n).ok(),
        _ => None,
    }
}

fn header_i64(props: &BasicProperties, name: &str) -> Option<i64> {
    amqp_i64(props.headers().as_ref()?.inner().get(name)?)
}

fn header_str(props: &BasicProperties, name: &str) -> Option<String> {
    let headers = props.headers().as_ref()?;
    match headers.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        other => Some(format!("{other:?}")),
    }
}

fn to_message(props: &BasicProperties, payload: Vec<u8>) -> Message {
    Message {
        id: props
            .message_id()
            .as_ref()
            .map(|s| s.as_str().to_owned())
            .unwrap_or_default(),
        key: header_str(props, KEY_HEADER).unwrap_or_default(),
        payload,
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[async_trait]
impl Transport for AmqpTransport {
    async fn publish(&self, queue: &str, message: Message) -> Result<(), TransportError> {
        let link = self.link().await?;
        if let Err(e) = bounded("declaring", self.ensure_declared(&link, queue)).await {
            // A channel-level refusal (e.g. PRECONDITION_FAILED) leaves the connection usable.
            if !link.connection.status().connected() {
                self.broken(link.generation).await;
            }
            return Err(e);
        }
        let partition = partition_of(&message.key, self.shared.config.partitions);
        let exchange = self.exchange_of(queue);
        let routing_key = Self::routing_key(queue, partition);
        self.publish_raw(&exchange, &routing_key, &message, Vec::new())
            .await
    }

    /// Sends every message in order on the one publishing channel, then awaits the confirms
    /// together: a batch costs about one broker round trip, and a key's messages keep their
    /// order on the wire. Messages of the batch that go to one partition queue travel in
    /// bundles of up to `bundle` (see [`super::bundle`]), in batch order; a message's result
    /// is its bundle's.
    async fn publish_batch(
        &self,
        messages: Vec<(String, Message)>,
    ) -> Vec<Result<(), TransportError>> {
        let (sent, _) = tokio::sync::oneshot::channel();
        self.publish_batch_staged(messages, sent).await
    }

    async fn publish_batch_staged(
        &self,
        messages: Vec<(String, Message)>,
        sent: tokio::sync::oneshot::Sender<()>,
    ) -> Vec<Result<(), TransportError>> {
        let link = match self.link().await {
            Ok(link) => link,
            Err(e) => {
                let reason = e.to_string();
                return messages
                    .iter()
                    .map(|_| Err(TransportError::Other(reason.clone())))
                    .collect();
            }
        };
        let mut results: Vec<Option<Result<(), TransportError>>> =
            messages.iter().map(|_| None).collect();
        // Group by destination queue, keeping batch order inside each group.
        let mut groups: Vec<(&str, u16, Vec<usize>)> = Vec::new();
        let mut group_of: std::collections::HashMap<(&str, u16), usize> = Default::default();
        let mut refused: std::collections::HashMap<&str, String> = Default::default();
        for (i, (queue, message)) in messages.iter().enumerate() {
            if let Some(reason) = refused.get(queue.as_str()) {
                results[i] = Some(Err(TransportError::Other(reason.clone())));
                continue;
            }
            if let Err(e) = bounded("declaring", self.ensure_declared(&link, queue)).await {
                if !link.connection.status().connected() {
                    self.broken(link.generation).await;
                }
                refused.insert(queue, e.to_string());
                results[i] = Some(Err(e));
                continue;
            }
            let partition = partition_of(&message.key, self.shared.config.partitions);
            let g = *group_of.entry((queue, partition)).or_insert_with(|| {
                groups.push((queue, partition, Vec::new()));
                groups.len() - 1
            });
            groups[g].2.push(i);
        }
        // Cut each group into frames: bundles bounded in parts and bytes, or single messages.
        let max_parts = usize::from(self.shared.config.bundle.max(1));
        let mut frames: Vec<(&str, u16, Vec<usize>)> = Vec::new();
        for (queue, partition, members) in groups {
            let mut current: Vec<usize> = Vec::new();
            let mut bytes = 0;
            for i in members {
                let m = &messages[i].1;
                if !bundle::fits(m) {
                    frames.push((queue, partition, vec![i]));
                    continue;
                }
                let size = bundle::part_size(m);
                if !current.is_empty()
                    && (current.len() == max_parts || bytes + size > BUNDLE_MAX_BYTES)
                {
                    frames.push((queue, partition, std::mem::take(&mut current)));
                    bytes = 0;
                }
                current.push(i);
                bytes += size;
            }
            if !current.is_empty() {
                frames.push((queue, partition, current));
            }
        }
        let mut pending = Vec::with_capacity(frames.len());
        for (queue, partition, members) in frames {
            let exchange = self.exchange_of(queue);
            let routing_key = Self::routing_key(queue, partition);
            let sent = if let [only] = members[..] {
                self.send_raw(
                    &link,
                    &exchange,
                    &routing_key,
                    &messages[only].1,
                    Vec::new(),
                )
                .await
            } else {
                let first = &messages[members[0]].1;
                let frame = Message {
                    id: format!("bundle:{}+{}", first.id, members.len() - 1),
                    key: first.key.clone(),
                    payload: bundle::encode(members.iter().map(|&i| &messages[i].1)),
                };
                let count = AMQPValue::LongUInt(members.len() as u32);
                let mut headers = vec![(BUNDLE_HEADER, count)];
                if let Some(tp) = crate::trace::traceparent_in(&first.payload) {
                    headers.push((TRACEPARENT_HEADER, long_string(tp)));
                    if let Some(ts) = crate::trace::tracestate_in(&first.payload) {
                        headers.push((TRACESTATE_HEADER, long_string(&ts)));
                    }
                }
                self.send_raw(&link, &exchange, &routing_key, &frame, headers)
                    .await
            };
            pending.push((exchange, routing_key, members, sent));
        }
        // Every frame is written: the caller may send its next batch behind these.
        let _ = sent.send(());
        let link = &link;
        let confirmed = futures::future::join_all(pending.into_iter().map(
            |(exchange, routing_key, members, sent)| async move {
                let parts = members.len() as u64;
                let r = self
                    .confirmed(link, &exchange, &routing_key, parts, sent)
                    .await;
                (members, r)
            },
        ))
        .await;
        for (members, r) in confirmed {
            for i in members {
                results[i] = Some(match &r {
                    Ok(()) => Ok(()),
                    Err(TransportError::NotConfirmed { queue, reason }) => {
                        Err(TransportError::NotConfirmed {
                            queue: queue.clone(),
                            reason: reason.clone(),
                        })
                    }
                    Err(e) => Err(TransportError::Other(e.to_string())),
                });
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(TransportError::Other("not sent".into()))))
            .collect()
    }

    async fn consume(&self, queue: &str) -> Result<Box<dyn Consumer>, TransportError> {
        // Declare up front so a bad configuration fails here, not in a background task.
        self.declare(queue).await?;
        let partitions = self.shared.config.partitions;
        let capacity = usize::from(self.shared.config.prefetch.max(1)) * usize::from(partitions);
        let (tx, rx) = mpsc::channel(capacity);
        let tasks = (0..partitions)
            .map(|p| {
                tokio::spawn(
                    self.clone()
                        .consume_partition(queue.to_owned(), p, tx.clone()),
                )
            })
            .collect();
        Ok(Box::new(AmqpConsumer { rx, tasks }))
    }

    async fn consume_dead_letters(&self) -> Result<Box<dyn DeadLetterConsumer>, TransportError> {
        // Connect up front so a bad configuration fails here (the queue is declared on connect).
        self.link().await?;
        let (tx, rx) = mpsc::channel(usize::from(self.shared.config.prefetch.max(1)));
        let task = tokio::spawn(
            self.clone()
                .consume_queue(self.dead_letter_queue(), Sink::Dead { tx }),
        );
        Ok(Box::new(AmqpDeadConsumer { rx, task }))
    }
}

/// Deliveries of all partitions of one logical queue, merged (each partition stays FIFO).
#[derive(Debug)]
struct AmqpConsumer {
    rx: mpsc::Receiver<Delivery>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for AmqpConsumer {
    fn drop(&mut self) {
        // Their channels close with them; what was not acknowledged goes back to the broker.
        for t in &self.tasks {
            t.abort();
        }
    }
}

#[async_trait]
impl Consumer for AmqpConsumer {
    async fn next(&mut self) -> Option<Delivery> {
        self.rx.recv().await
    }

    fn try_next(&mut self) -> Option<Delivery> {
        self.rx.try_recv().ok()
    }
}

#[derive(Debug)]
struct AmqpAcker {
    acker: lapin::Acker,
    transport: AmqpTransport,
    queue: String,
}

#[async_trait]
impl Acker for AmqpAcker {
    async fn ack(self: Box<Self>) -> Result<(), TransportError> {
        // On a dead channel this fails, and the broker redelivers: the receiver deduplicates.
        // On a dead channel lapin answers Ok(false): the broker redelivers, the receiver dedups.
        let acking = self.acker.ack(BasicAckOptions::default());
        let Ok(answer) = tokio::time::timeout(BROKER_TIMEOUT, acking).await else {
            return Err(TransportError::Other(
                "acknowledging: no answer from the connection; the message will be redelivered"
                    .into(),
            ));
        };
        match answer {
            Ok(true) => Ok(()),
            Ok(false) => Err(TransportError::Other(
                "acknowledging: the channel is gone; the message will be redelivered".into(),
            )),
            Err(e) => Err(amqp_err("acknowledging", e)),
        }
    }

    async fn nack(self: Box<Self>) -> Result<(), TransportError> {
        let returning = self.acker.nack(BasicNackOptions {
            requeue: true,
            multiple: false,
        });
        let Ok(answer) = tokio::time::timeout(BROKER_TIMEOUT, returning).await else {
            return Err(TransportError::Other(
                "returning a message: no answer from the connection; the broker requeues it".into(),
            ));
        };
        match answer {
            Ok(true) => Ok(()),
            Ok(false) => Err(TransportError::Other(
                "returning a message: the channel is gone; the broker requeues it".into(),
            )),
            Err(e) => Err(amqp_err("returning a message", e)),
        }
    }

    async fn dead_letter(
        self: Box<Self>,
        message: &Message,
        reason: &str,
    ) -> Result<(), TransportError> {
        match self
            .transport
            .publish_dead_letter(&self.queue, message, reason)
            .await
        {
            Ok(()) => self.ack().await,
            Err(e) => {
                // Keep it: back to its queue, to be dead-lettered again once the DLQ takes it.
                let _ = self.nack().await;
                Err(e)
            }
        }
    }
}

/// The broker's message behind a bundle's parts: acknowledged once every part is settled, or
/// given back (all of it; the receivers drop the parts they had done as duplicates) if any
/// part was.
#[derive(Debug)]
struct BundleAck {
    acker: tokio::sync::Mutex<Option<AmqpAcker>>,
    unsettled: AtomicUsize,
    give_back: AtomicBool,
}

impl BundleAck {
    async fn settle(&self, give_back: bool) -> Result<(), TransportError> {
        if give_back {
            self.give_back.store(true, Ordering::SeqCst);
        }
        if self.unsettled.fetch_sub(1, Ordering::SeqCst) != 1 {
            return Ok(());
        }
        let Some(acker) = self.acker.lock().await.take() else {
            return Ok(());
        };
        if self.give_back.load(Ordering::SeqCst) {
            Box::new(acker).nack().await
        } else {
            Box::new(acker).ack().await
        }
    }
}

/// One part of a bundle.
#[derive(Debug)]
struct PartAcker {
    bundle: Arc<BundleAck>,
}

#[async_trait]
impl Acker for PartAcker {
    async fn ack(self: Box<Self>) -> Result<(), TransportError> {
        self.bundle.settle(false).await
    }

    async fn nack(self: Box<Self>) -> Result<(), TransportError> {
        self.bundle.settle(true).await
    }

    /// The part alone goes to the dead-letter queue; its siblings flow on.
    async fn dead_letter(
        self: Box<Self>,
        message: &Message,
        reason: &str,
    ) -> Result<(), TransportError> {
        let sent = {
            let guard = self.bundle.acker.lock().await;
            match guard.as_ref() {
                Some(a) => {
                    a.transport
                        .publish_dead_letter(&a.queue, message, reason)
                        .await
                }
                None => Err(TransportError::Other(
                    "the bundle is already settled".into(),
                )),
            }
        };
        match sent {
            Ok(()) => self.bundle.settle(false).await,
            Err(e) => {
                let _ = self.bundle.settle(true).await;
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_declared_partition_count_is_read_from_the_refusal() {
        // The broker's refusal, as lapin words it.
        let refusal = "protocol error: AMQP soft error: PRECONDITION-FAILED: \
            PRECONDITION_FAILED - inequivalent arg 'x-max-length' for queue 'shop.topology' in \
            vhost '/': received '1' but current is '8'";
        assert_eq!(declared_partitions(refusal), Some(8));
        assert_eq!(declared_partitions("connection refused"), None);
        assert_eq!(
            declared_partitions(&refusal.replace("current is '8'", "current is 'x'")),
            None
        );
        // Another argument of the marker (its queue type) is no partition count.
        assert_eq!(
            declared_partitions(&refusal.replace("x-max-length", "x-queue-type")),
            None
        );
    }

    #[test]
    fn the_stable_hash_never_changes() {
        // Pinned values: changing the hash would re-route live orders to other partitions.
        assert_eq!(stable_hash(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(stable_hash("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(stable_hash("order-42"), stable_hash("order-42"));
        assert_eq!(partition_of("a", 8), (0xaf63_dc4c_8601_ec8c_u64 % 8) as u16);
        assert_eq!(partition_of("anything", 1), 0);
    }

    #[test]
    fn passwords_are_not_printed() {
        assert_eq!(
            redact("amqp://guest:secret@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact("amqp://127.0.0.1"), "amqp://127.0.0.1");
    }

    #[test]
    fn queue_types_parse() {
        assert_eq!("quorum".parse::<QueueType>(), Ok(QueueType::Quorum));
        assert!("fast".parse::<QueueType>().unwrap_err().contains("classic"));
    }
}

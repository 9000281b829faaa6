//! Moving messages between the engine and the workers.
//!
//! The contract, the same for every implementation (in-process now, RabbitMQ next):
//! * `publish` returns once the message is durably accepted (a broker confirm), so the outbox
//!   row is marked sent only after that;
//! * delivery is at least once: a message is redelivered until it is acknowledged, and a
//!   consumer that goes away without acknowledging gives its messages back;
//! * one consumer is active per queue at a time, and a queue delivers in FIFO order, so messages
//!   of one key (all routed to one queue) arrive in the order they were published.
//!
//! Queue names (logical; the AMQP transport spreads each over P partitions): `cmd.<service>` for
//! commands, `reply` for replies, `start` for saga starts relayed from applications' outboxes.
//! A message that cannot be handled (undecodable, unknown saga or step) is dead-lettered with
//! its reason: kept aside for an operator, never dropped, never blocking its queue.

pub mod amqp;
pub mod bundle;
pub mod memory;

use async_trait::async_trait;

/// A message on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Unique per logical message; redeliveries and duplicates keep it.
    pub id: String,
    /// The ordering key (the saga's sequence key): messages of one key keep their order.
    pub key: String,
    pub payload: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    #[error("transport closed")]
    Closed,
    #[error("publish to {queue} was not confirmed: {reason}")]
    NotConfirmed { queue: String, reason: String },
    #[error("transport: {0}")]
    Other(String),
    /// The deployment on this broker was declared with another partition count.
    #[error(
        "transport: partition count mismatch: this process is configured with {configured} partitions, but the deployment `{prefix}` on this broker was declared with a different count (the broker said: {broker}). Every engine and worker must use the same --partitions; to change it, drain and delete the `{prefix}.*` queues first"
    )]
    PartitionMismatch {
        configured: u16,
        /// The count it was declared with, as the broker's refusal quotes it.
        declared: Option<u16>,
        prefix: String,
        broker: String,
    },
}

/// A stable lane for a key: FNV-1a, the same in every process and release (the AMQP
/// transport's partitions use the same hash).
pub fn lane_of(key: &str, lanes: usize) -> usize {
    (amqp::stable_hash(key) % lanes.max(1) as u64) as usize
}

/// The queue a service's commands go to.
pub fn command_queue(service: &str) -> String {
    format!("cmd.{service}")
}

/// The queue replies go to.
pub const REPLY_QUEUE: &str = "reply";

/// The queue saga starts written by applications (the client library's outbox) go to.
pub const START_QUEUE: &str = "start";

/// A message set aside because it could not be handled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// Unique per dead-lettering (the same message set aside twice is two letters); the same
    /// on every redelivery of one letter, so whoever keeps them can deduplicate.
    pub id: String,
    /// The logical queue it came from (`cmd.payment`, `reply`, …).
    pub queue: String,
    pub reason: String,
    /// When it was set aside (ms since the Unix epoch).
    pub at: i64,
    pub message: Message,
}

impl DeadLetter {
    /// A letter set aside now, with a fresh id.
    pub fn now(queue: &str, reason: &str, message: Message) -> DeadLetter {
        let at = epoch_ms();
        DeadLetter {
            id: format!("dl-{at:x}-{:016x}", fastrand::u64(..)),
            queue: queue.to_owned(),
            reason: reason.to_owned(),
            at,
            message,
        }
    }
}

/// Milliseconds since the Unix epoch.
pub(crate) fn epoch_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Dead letters delivered to whoever keeps them (the engine stores them in its database);
/// acknowledge once they are stored.
#[derive(Debug)]
pub struct DeadDelivery {
    /// One letter, or every part of a bundle the broker set aside whole.
    pub letters: Vec<DeadLetter>,
    acker: Box<dyn Acker>,
}

impl DeadDelivery {
    pub fn new(letters: Vec<DeadLetter>, acker: Box<dyn Acker>) -> Self {
        DeadDelivery { letters, acker }
    }

    /// Stored: it will not come again.
    pub async fn ack(self) -> Result<(), TransportError> {
        self.acker.ack().await
    }

    /// Not stored: give it back.
    pub async fn nack(self) -> Result<(), TransportError> {
        self.acker.nack().await
    }
}

/// The dead-letter queue's consumer (see [`Transport::consume_dead_letters`]).
#[async_trait]
pub trait DeadLetterConsumer: Send + std::fmt::Debug {
    /// The next dead letters; None once the transport is closed.
    async fn next(&mut self) -> Option<DeadDelivery>;
}

#[async_trait]
pub trait Transport: Send + Sync + std::fmt::Debug {
    /// Publishes and waits for the confirm.
    async fn publish(&self, queue: &str, message: Message) -> Result<(), TransportError>;

    /// Publishes many messages, in order, and waits for all their confirms; one result per
    /// message. Implementations pipeline it (send all, then await the confirms).
    async fn publish_batch(
        &self,
        messages: Vec<(String, Message)>,
    ) -> Vec<Result<(), TransportError>> {
        let mut results = Vec::with_capacity(messages.len());
        for (queue, message) in messages {
            results.push(self.publish(&queue, message).await);
        }
        results
    }

    /// [`publish_batch`](Transport::publish_batch), telling `sent` once every message is
    /// handed to the broker (before the confirms are in), so a caller can send its next batch
    /// behind this one — on the wire in order — while the confirms are awaited.
    async fn publish_batch_staged(
        &self,
        messages: Vec<(String, Message)>,
        sent: tokio::sync::oneshot::Sender<()>,
    ) -> Vec<Result<(), TransportError>> {
        let results = self.publish_batch(messages).await;
        let _ = sent.send(());
        results
    }

    /// Starts consuming `queue`. Waits while another consumer is active on it.
    async fn consume(&self, queue: &str) -> Result<Box<dyn Consumer>, TransportError>;

    /// Starts consuming the deployment's dead letters (every process's, and what the broker
    /// set aside itself), for the engine that keeps them in its database.
    async fn consume_dead_letters(&self) -> Result<Box<dyn DeadLetterConsumer>, TransportError>;
}

#[async_trait]
pub trait Consumer: Send + std::fmt::Debug {
    /// The next delivery; None once the transport is closed.
    async fn next(&mut self) -> Option<Delivery>;

    /// Whatever else is ready right now, up to `max` (for batching), without waiting.
    fn try_next(&mut self) -> Option<Delivery>;
}

/// A delivered message; acknowledge it after its effects are committed.
#[derive(Debug)]
pub struct Delivery {
    pub message: Message,
    /// True when this message was delivered before and not acknowledged.
    pub redelivered: bool,
    acker: Box<dyn Acker>,
}

impl Delivery {
    pub fn new(message: Message, redelivered: bool, acker: Box<dyn Acker>) -> Self {
        Delivery {
            message,
            redelivered,
            acker,
        }
    }

    /// Done with it: it will not come again.
    pub async fn ack(self) -> Result<(), TransportError> {
        self.acker.ack().await
    }

    /// Not processed: give it back for redelivery.
    pub async fn nack(self) -> Result<(), TransportError> {
        self.acker.nack().await
    }

    /// The message and what settles it, for a transport that wraps deliveries.
    pub(crate) fn into_parts(self) -> (Message, Box<dyn Acker>) {
        (self.message, self.acker)
    }

    /// Cannot ever be processed: move it to the dead-letter queue with `reason`, then
    /// acknowledge it, so its queue keeps flowing. If the dead-letter queue cannot take it, the
    /// message is given back instead (never lost).
    pub async fn dead_letter(self, reason: &str) -> Result<(), TransportError> {
        self.acker.dead_letter(&self.message, reason).await
    }
}

#[async_trait]
pub trait Acker: Send + Sync + std::fmt::Debug {
    async fn ack(self: Box<Self>) -> Result<(), TransportError>;
    async fn nack(self: Box<Self>) -> Result<(), TransportError>;
    async fn dead_letter(
        self: Box<Self>,
        message: &Message,
        reason: &str,
    ) -> Result<(), TransportError>;
}

//! The in-process transport: the broker's contract inside one process, for `sagaflow dev` and
//! fast tests — FIFO queues, at-least-once delivery, redelivery of what a consumer did not
//! acknowledge, one active consumer per queue — plus fault injection (duplicates, delays, drops)
//! to prove that the rest of the system does not depend on a well-behaved network.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;

use super::{
    Acker, Consumer, DeadDelivery, DeadLetter, DeadLetterConsumer, Delivery, Message, Transport,
    TransportError,
};

/// The internal queue the dead letters wait in for [`Transport::consume_dead_letters`] (a name
/// no logical queue can have).
const DEAD_QUEUE: &str = " dead-letters";

/// Faults applied to every published message.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Faults {
    /// Chance that a message is delivered twice.
    pub duplicate: f64,
    /// Chance that a message is lost after its confirm (what a broker crash without replication
    /// does); timeouts and retries must recover.
    pub drop: f64,
    /// Chance that a message is held back for `delay` before it is queued.
    pub delay: f64,
    pub delay_for: Duration,
}

#[derive(Debug, Default)]
struct Queue {
    ready: VecDeque<(u64, Message, bool)>,
    unacked: BTreeMap<u64, Message>,
    /// The active consumer's id; others wait.
    active: Option<u64>,
    notify: Arc<Notify>,
}

#[derive(Debug, Default)]
struct Inner {
    queues: HashMap<String, Queue>,
    dead: Vec<DeadLetter>,
    next_tag: u64,
    next_consumer: u64,
    closed: bool,
}

#[derive(Debug, Clone)]
pub struct MemoryTransport {
    inner: Arc<Mutex<Inner>>,
    faults: Faults,
    /// Counts published messages (duplicates included), for `messages per saga` figures.
    published: Arc<std::sync::atomic::AtomicU64>,
}

impl Default for MemoryTransport {
    fn default() -> Self {
        Self::new(Faults::default())
    }
}

impl MemoryTransport {
    pub fn new(faults: Faults) -> Self {
        MemoryTransport {
            inner: Arc::default(),
            faults,
            published: Arc::default(),
        }
    }

    pub fn published(&self) -> u64 {
        self.published.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stops every consumer (their `next` returns None).
    pub fn close(&self) {
        let mut inner = lock(&self.inner);
        inner.closed = true;
        for q in inner.queues.values() {
            q.notify.notify_waiters();
        }
    }

    /// Everything dead-lettered so far, oldest first.
    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        lock(&self.inner).dead.clone()
    }

    /// Messages waiting or unacknowledged in `queue` (for tests).
    pub fn depth(&self, queue: &str) -> usize {
        let inner = lock(&self.inner);
        inner
            .queues
            .get(queue)
            .map_or(0, |q| q.ready.len() + q.unacked.len())
    }

    fn enqueue(inner: &Arc<Mutex<Inner>>, queue: &str, message: Message) {
        let mut guard = lock(inner);
        guard.next_tag += 1;
        let tag = guard.next_tag;
        let q = guard.queues.entry(queue.to_owned()).or_default();
        q.ready.push_back((tag, message, false));
        q.notify.notify_waiters();
    }
}

fn lock(m: &Mutex<Inner>) -> std::sync::MutexGuard<'_, Inner> {
    // A panic while holding this lock cannot leave the queues half-updated in a way that
    // matters more than losing the whole process: keep going with the data as it is.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[async_trait]
impl Transport for MemoryTransport {
    async fn publish(&self, queue: &str, message: Message) -> Result<(), TransportError> {
        if lock(&self.inner).closed {
            return Err(TransportError::Closed);
        }
        self.published
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let f = self.faults;
        if f.drop > 0.0 && fastrand::f64() < f.drop {
            return Ok(());
        }
        let copies = if f.duplicate > 0.0 && fastrand::f64() < f.duplicate {
            2
        } else {
            1
        };
        for _ in 0..copies {
            if f.delay > 0.0 && fastrand::f64() < f.delay {
                let inner = self.inner.clone();
                let (queue, message) = (queue.to_owned(), message.clone());
                let delay = f.delay_for;
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    MemoryTransport::enqueue(&inner, &queue, message);
                });
            } else {
                MemoryTransport::enqueue(&self.inner, queue, message.clone());
            }
        }
        Ok(())
    }

    async fn consume(&self, queue: &str) -> Result<Box<dyn Consumer>, TransportError> {
        let id = {
            let mut inner = lock(&self.inner);
            inner.next_consumer += 1;
            inner.next_consumer
        };
        // Single active consumer: wait until the queue has none.
        loop {
            let notify = {
                let mut inner = lock(&self.inner);
                if inner.closed {
                    return Err(TransportError::Closed);
                }
                let q = inner.queues.entry(queue.to_owned()).or_default();
                if q.active.is_none() {
                    q.active = Some(id);
                    break;
                }
                q.notify.clone()
            };
            let notified = notify.notified();
            tokio::select! {
                () = notified => {}
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
        Ok(Box::new(MemoryConsumer {
            inner: self.inner.clone(),
            queue: queue.to_owned(),
            id,
        }))
    }

    async fn consume_dead_letters(&self) -> Result<Box<dyn DeadLetterConsumer>, TransportError> {
        Ok(Box::new(MemoryDeadConsumer {
            inner: self.inner.clone(),
            queue: self.consume(DEAD_QUEUE).await?,
        }))
    }
}

/// The dead letters, in the order they were set aside.
#[derive(Debug)]
struct MemoryDeadConsumer {
    inner: Arc<Mutex<Inner>>,
    queue: Box<dyn Consumer>,
}

#[async_trait]
impl DeadLetterConsumer for MemoryDeadConsumer {
    async fn next(&mut self) -> Option<DeadDelivery> {
        let delivery = self.queue.next().await?;
        let (token, acker) = delivery.into_parts();
        let letter = lock(&self.inner)
            .dead
            .iter()
            .find(|l| l.id == token.id)
            .cloned();
        Some(DeadDelivery::new(letter.into_iter().collect(), acker))
    }
}

#[derive(Debug)]
struct MemoryConsumer {
    inner: Arc<Mutex<Inner>>,
    queue: String,
    id: u64,
}

impl MemoryConsumer {
    fn take(&self) -> Option<Delivery> {
        let mut inner = lock(&self.inner);
        let q = inner.queues.get_mut(&self.queue)?;
        let (tag, message, redelivered) = q.ready.pop_front()?;
        q.unacked.insert(tag, message.clone());
        Some(Delivery::new(
            message,
            redelivered,
            Box::new(MemoryAcker {
                inner: self.inner.clone(),
                queue: self.queue.clone(),
                tag,
            }),
        ))
    }
}

#[async_trait]
impl Consumer for MemoryConsumer {
    async fn next(&mut self) -> Option<Delivery> {
        loop {
            let notify = {
                let mut inner = lock(&self.inner);
                if inner.closed {
                    return None;
                }
                inner
                    .queues
                    .entry(self.queue.clone())
                    .or_default()
                    .notify
                    .clone()
            };
            let notified = notify.notified();
            if let Some(d) = self.take() {
                return Some(d);
            }
            tokio::select! {
                () = notified => {}
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
    }

    fn try_next(&mut self) -> Option<Delivery> {
        if lock(&self.inner).closed {
            return None;
        }
        self.take()
    }
}

impl Drop for MemoryConsumer {
    /// A consumer that goes away gives back what it did not acknowledge, in order, at the front
    /// of the queue (like a broker requeueing on channel close), and lets a standby take over.
    fn drop(&mut self) {
        let mut inner = lock(&self.inner);
        if let Some(q) = inner.queues.get_mut(&self.queue)
            && q.active == Some(self.id)
        {
            q.active = None;
            let unacked = std::mem::take(&mut q.unacked);
            for (tag, message) in unacked.into_iter().rev() {
                q.ready.push_front((tag, message, true));
            }
            q.notify.notify_waiters();
        }
    }
}

#[derive(Debug)]
struct MemoryAcker {
    inner: Arc<Mutex<Inner>>,
    queue: String,
    tag: u64,
}

#[async_trait]
impl Acker for MemoryAcker {
    async fn ack(self: Box<Self>) -> Result<(), TransportError> {
        let mut inner = lock(&self.inner);
        if let Some(q) = inner.queues.get_mut(&self.queue) {
            q.unacked.remove(&self.tag);
        }
        Ok(())
    }

    async fn nack(self: Box<Self>) -> Result<(), TransportError> {
        let mut inner = lock(&self.inner);
        if let Some(q) = inner.queues.get_mut(&self.queue)
            && let Some(message) = q.unacked.remove(&self.tag)
        {
            q.ready.push_front((self.tag, message, true));
            q.notify.notify_waiters();
        }
        Ok(())
    }

    async fn dead_letter(
        self: Box<Self>,
        message: &Message,
        reason: &str,
    ) -> Result<(), TransportError> {
        let mut inner = lock(&self.inner);
        if let Some(q) = inner.queues.get_mut(&self.queue) {
            q.unacked.remove(&self.tag);
        }
        let letter = DeadLetter::now(&self.queue, reason, message.clone());
        let id = letter.id.clone();
        inner.dead.push(letter);
        drop(inner);
        // Its id travels through the internal queue; the letter is looked up on delivery.
        let token = Message {
            id,
            key: String::new(),
            payload: Vec::new(),
        };
        MemoryTransport::enqueue(&self.inner, DEAD_QUEUE, token);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(id: &str) -> Message {
        Message {
            id: id.into(),
            key: "k".into(),
            payload: id.as_bytes().to_vec(),
        }
    }

    #[tokio::test]
    async fn fifo_and_redelivery_of_unacked_messages() {
        let t = MemoryTransport::default();
        for i in 0..3 {
            t.publish("q", msg(&format!("m{i}"))).await.unwrap();
        }
        let mut c = t.consume("q").await.unwrap();
        let a = c.next().await.unwrap();
        let b = c.next().await.unwrap();
        assert_eq!((a.message.id.as_str(), b.message.id.as_str()), ("m0", "m1"));
        a.ack().await.unwrap();
        drop(b); // never acknowledged
        drop(c); // consumer dies
        let mut c2 = t.consume("q").await.unwrap();
        let again = c2.next().await.unwrap();
        assert_eq!(again.message.id, "m1");
        assert!(again.redelivered);
        assert_eq!(c2.next().await.unwrap().message.id, "m2");
    }

    #[tokio::test]
    async fn one_active_consumer_per_queue() {
        let t = MemoryTransport::default();
        let first = t.consume("q").await.unwrap();
        let t2 = t.clone();
        let standby = tokio::spawn(async move { t2.consume("q").await.map(|_| ()) });
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(!standby.is_finished(), "a second consumer must wait");
        drop(first);
        tokio::time::timeout(Duration::from_secs(2), standby)
            .await
            .expect("standby takes over")
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn dead_letters_are_kept_with_their_reason_and_the_queue_flows_on() {
        let t = MemoryTransport::default();
        t.publish("q", msg("poison")).await.unwrap();
        t.publish("q", msg("fine")).await.unwrap();
        let mut c = t.consume("q").await.unwrap();
        c.next()
            .await
            .unwrap()
            .dead_letter("not JSON")
            .await
            .unwrap();
        assert_eq!(c.next().await.unwrap().message.id, "fine");
        let dead = t.dead_letters();
        assert_eq!(dead.len(), 1);
        assert_eq!(
            (dead[0].queue.as_str(), dead[0].reason.as_str()),
            ("q", "not JSON")
        );
        assert_eq!(dead[0].message.id, "poison");
        assert_eq!(t.depth("q"), 1, "only the unacked `fine` is left");
    }

    #[tokio::test]
    async fn duplicates_are_injected() {
        let t = MemoryTransport::new(Faults {
            duplicate: 1.0,
            ..Faults::default()
        });
        t.publish("q", msg("m")).await.unwrap();
        assert_eq!(t.depth("q"), 2);
    }
}

//! The outbox hand-off: the rows an engine's own transactions committed, passed to its relay in
//! memory and in commit order, so that the usual path needs no claim statement and no poll (see
//! [`crate::relay`] and [`crate::store::outbox`]).
//!
//! And the way back: the rows the relay sent (the broker confirmed them), by message id, are
//! deleted by the engine's next apply transaction, as one more part of its one write
//! ([`crate::store::Changes::sent`]), instead of by a statement and a commit of their own. A
//! relay whose rows found no transaction within [`SENT_WAIT`] deletes them itself (a task of
//! its own looks every [`SENT_WAIT`], whatever the relay's rounds wait for). Until then
//! they are still in the outbox, handed off (no claim takes them before
//! [`crate::store::outbox::HANDOFF_GRACE_MS`]) or leased; an engine that dies meanwhile leaves
//! them to be sent once more, which every receiver deduplicates, as it does a row sent and not
//! yet deleted today.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tracing::debug;

use crate::store::outbox::Claimed;

/// Messages the hand-off holds at most; the rows of a commit that finds it full are left to a
/// claim (after their grace), so a stalled broker cannot grow the engine's memory.
const HANDOFF_CAPACITY: usize = 50_000;

/// How long sent rows wait for an apply transaction to delete them before the relay does. Far
/// below [`crate::store::outbox::HANDOFF_GRACE_MS`], so no claim sends them again meanwhile.
pub(crate) const SENT_WAIT: Duration = Duration::from_millis(100);

/// Sent rows one apply transaction deletes at most (the rest wait for the next).
const SENT_PER_WRITE: usize = 4_096;

/// Outbox rows committed by this engine, waiting for its relay, in commit order.
#[derive(Debug, Default)]
pub(crate) struct Handoff {
    queue: Mutex<VecDeque<Claimed>>,
    pub(crate) ready: Notify,
    /// This engine's relay loop runs: its transactions may hand rows off.
    active: AtomicBool,
    /// Rows sent, by message id, not yet deleted; and since when the oldest waits.
    sent: Mutex<(Vec<String>, Option<Instant>)>,
}

impl Handoff {
    /// Whether rows written now will be sent by this engine's relay (else they are written
    /// free for any relay to claim).
    pub(crate) fn active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    /// Queues a commit's rows; false if the hand-off is full (they are claimed later instead).
    pub(crate) fn push(&self, rows: Vec<Claimed>) -> bool {
        if rows.is_empty() {
            return true;
        }
        {
            let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            if queue.len() + rows.len() > HANDOFF_CAPACITY {
                debug!(
                    rows = rows.len(),
                    "outbox hand-off full; the rows wait for a claim"
                );
                return false;
            }
            queue.extend(rows);
        }
        self.ready.notify_one();
        true
    }

    /// Up to `max` rows, oldest first.
    pub(crate) fn take(&self, max: usize) -> Vec<Claimed> {
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let n = queue.len().min(max);
        queue.drain(..n).collect()
    }

    pub(crate) fn drain(&self) -> Vec<Claimed> {
        self.take(usize::MAX)
    }

    /// Rows the broker confirmed: to be deleted (see the module docs).
    pub(crate) fn sent(&self, ids: Vec<String>) {
        if ids.is_empty() {
            return;
        }
        let mut sent = self.sent.lock().unwrap_or_else(|e| e.into_inner());
        sent.0.extend(ids);
        sent.1.get_or_insert_with(Instant::now);
    }

    /// Sent rows for a transaction to delete (up to [`SENT_PER_WRITE`], oldest first), with
    /// since when they wait. If it does not commit, they are given back with
    /// [`Handoff::sent_again`].
    pub(crate) fn take_sent(&self) -> Sent {
        let mut sent = self.sent.lock().unwrap_or_else(|e| e.into_inner());
        let n = sent.0.len().min(SENT_PER_WRITE);
        let ids: Vec<String> = sent.0.drain(..n).collect();
        let since = sent.1;
        if sent.0.is_empty() {
            sent.1 = None;
        }
        Sent { ids, since }
    }

    /// Sent rows taken by a transaction that did not commit: still to be deleted, and waiting
    /// since they first did (a run of failed transactions does not put the relay's delete off).
    pub(crate) fn sent_again(&self, taken: Sent) {
        if taken.ids.is_empty() {
            return;
        }
        let mut sent = self.sent.lock().unwrap_or_else(|e| e.into_inner());
        sent.0.splice(0..0, taken.ids);
        sent.1 = match (sent.1, taken.since) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b).or_else(|| Some(Instant::now())),
        };
    }

    /// How long until the oldest sent row has waited [`SENT_WAIT`] (zero: it has); None when
    /// none waits.
    pub(crate) fn sent_due_in(&self) -> Option<Duration> {
        let sent = self.sent.lock().unwrap_or_else(|e| e.into_inner());
        sent.1
            .map(|since| SENT_WAIT.saturating_sub(since.elapsed()))
    }
}

/// Sent rows taken by a transaction ([`Handoff::take_sent`]).
#[derive(Debug, Default)]
pub(crate) struct Sent {
    pub(crate) ids: Vec<String>,
    since: Option<Instant>,
}

/// Marks the hand-off active from before a relay loop is spawned until it ends (however it
/// ends), so that every commit after [`crate::Engine::run`] or [`crate::Engine::relay`] was called hands its
/// rows off.
pub(crate) struct Active(Arc<Handoff>);

impl Active {
    pub(crate) fn new(handoff: Arc<Handoff>) -> Self {
        handoff.active.store(true, Ordering::Release);
        Active(handoff)
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.active.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sent_rows_given_back_keep_their_first_wait_and_their_order() {
        let h = Handoff::default();
        assert_eq!(h.sent_due_in(), None, "nothing waits");
        h.sent(vec!["a".into(), "b".into()]);
        let first = h.sent.lock().unwrap().1;
        let taken = h.take_sent();
        assert_eq!(taken.ids, ["a", "b"]);
        assert_eq!(h.sent_due_in(), None, "all taken");
        h.sent(vec!["c".into()]);
        // The transaction that took a and b failed: they come back first, and the wait counts
        // from when they were first sent, not from now.
        h.sent_again(taken);
        assert_eq!(h.sent.lock().unwrap().1, first);
        assert_eq!(h.take_sent().ids, ["a", "b", "c"]);
        h.sent((0..SENT_PER_WRITE + 1).map(|i| i.to_string()).collect());
        assert_eq!(h.take_sent().ids.len(), SENT_PER_WRITE, "one write's worth");
        assert_eq!(h.take_sent().ids, [SENT_PER_WRITE.to_string()]);
    }
}

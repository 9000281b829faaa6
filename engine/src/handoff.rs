//! The outbox hand-off: the rows an engine's own transactions committed, passed to its relay in
//! memory and in commit order, so that the usual path needs no claim statement and no poll (see
//! [`crate::relay`] and [`crate::store::outbox`]).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Notify;
use tracing::debug;

use crate::store::outbox::Claimed;

/// Messages the hand-off holds at most; the rows of a commit that finds it full are left to a
/// claim (after their grace), so a stalled broker cannot grow the engine's memory.
const HANDOFF_CAPACITY: usize = 50_000;

/// Outbox rows committed by this engine, waiting for its relay, in commit order.
#[derive(Debug, Default)]
pub(crate) struct Handoff {
    queue: Mutex<VecDeque<Claimed>>,
    pub(crate) ready: Notify,
    /// This engine's relay loop runs: its transactions may hand rows off.
    active: AtomicBool,
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

//! Group commit: the batches an engine applies — replies, starts, due timers, operator events
//! — all go through one queue, and one task applies everything queued at that moment in one
//! transaction ([`crate::apply`]).
//!
//! Before, each inbound loop and the timer loop applied its own batches, each in its own
//! transaction. Under load they arrive at once: a reply batch, a chunk of starts, two retries
//! whose backoff ran out. Each paid a whole transaction (a connection, the reads, the write, the
//! commit) for a few items, and on SQLite, whose one connection every transaction queues for,
//! they also waited for each other. Now what arrives while a transaction is running is applied
//! by the next one, together.
//!
//! What a caller gets is what applying its items alone would give: one result per item, in
//! order. Items of one caller stay in order and consecutive in the group (jobs are taken
//! whole, in arrival order), and [`Engine::apply_inbound`] keeps a batch's order, also when
//! it splits a failed batch. A caller that stops waiting (a dropped HTTP request) leaves its
//! items to be applied all the same; nothing another caller queued depends on it.

use tokio::sync::{mpsc, oneshot};

use crate::apply::{Done, Inbound};
use crate::engine::{Engine, EngineError};

/// Items applied in one transaction at most. A job is never split, so a larger one (a start
/// chunk, a reply batch) goes alone; below this, whatever waits joins.
pub const MAX_ITEMS: usize = 512;

/// What applying a job gave: its items, given back, and one result per item.
pub type Applied = (Vec<Inbound>, Vec<Result<Done, EngineError>>);

/// One caller's items and where their results go.
struct Job {
    work: Vec<Inbound>,
    done: oneshot::Sender<Applied>,
}

/// The queue of one engine's group commit (its task is started with the first job).
#[derive(Debug, Default)]
pub(crate) struct Group {
    queue: std::sync::OnceLock<mpsc::UnboundedSender<Job>>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Job({} items)", self.work.len())
    }
}

impl Engine {
    /// Applies `work` together with whatever else is waiting to be applied (see the module
    /// docs); gives the items back with one result per item, in order.
    pub async fn apply_grouped(&self, work: Vec<Inbound>) -> Applied {
        if work.is_empty() {
            return (work, Vec::new());
        }
        let queue = self.group().queue.get_or_init(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(group_task(self.weak(), rx));
            tx
        });
        let (done, answer) = oneshot::channel();
        let n = work.len();
        let job = Job { work, done };
        if let Err(mpsc::error::SendError(job)) = queue.send(job) {
            // The task is gone (its runtime shut down): apply here.
            let results = self.apply_inbound(&job.work).await;
            return (job.work, results);
        }
        match answer.await {
            Ok(applied) => applied,
            Err(_) => (
                Vec::new(),
                (0..n)
                    .map(|_| {
                        Err(EngineError::Interrupted(
                            "the engine stopped while applying".into(),
                        ))
                    })
                    .collect(),
            ),
        }
    }
}

/// Applies what is queued, a group at a time, until the engine is dropped.
async fn group_task(engine: std::sync::Weak<Engine>, mut queue: mpsc::UnboundedReceiver<Job>) {
    while let Some(first) = queue.recv().await {
        let mut jobs = vec![first];
        let mut items = jobs[0].work.len();
        while items < MAX_ITEMS {
            match queue.try_recv() {
                Ok(job) if items + job.work.len() <= MAX_ITEMS => {
                    items += job.work.len();
                    jobs.push(job);
                }
                Ok(job) => {
                    // Too large to join: it goes first in the next group.
                    apply_group(&engine, jobs).await;
                    jobs = vec![job];
                    items = jobs[0].work.len();
                }
                Err(_) => break,
            }
        }
        apply_group(&engine, jobs).await;
    }
}

async fn apply_group(engine: &std::sync::Weak<Engine>, jobs: Vec<Job>) {
    let Some(engine) = engine.upgrade() else {
        return;
    };
    let sizes: Vec<usize> = jobs.iter().map(|j| j.work.len()).collect();
    let mut senders = Vec::with_capacity(jobs.len());
    let mut all = Vec::with_capacity(sizes.iter().sum());
    for job in jobs {
        all.extend(job.work);
        senders.push(job.done);
    }
    let mut results = engine.apply_inbound(&all).await.into_iter();
    let mut all = all.into_iter();
    for (size, done) in sizes.into_iter().zip(senders) {
        let work: Vec<Inbound> = all.by_ref().take(size).collect();
        let mine: Vec<Result<Done, EngineError>> = results.by_ref().take(size).collect();
        // A caller that stopped waiting: its items are applied all the same.
        let _ = done.send((work, mine));
    }
}

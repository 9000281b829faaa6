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
//! it splits a failed batch. A group is tried once, in one transaction; if that fails, each
//! job goes back to its caller and is applied alone there ([`Engine::apply_inbound`]: halves
//! down to single items, retries after a lost version race), so one caller's bad item never
//! holds the others' back, nor the next groups. A caller that stops waiting (a dropped HTTP
//! request) leaves its items to be applied all the same; nothing another caller queued depends
//! on it.

use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use crate::apply::{Done, Inbound};
use crate::engine::{Engine, EngineError};

/// Items a group takes at most. A job is never split, so a larger one goes alone; below this,
/// whatever waits joins (a reply batch and a start chunk are 256 each at most).
pub const MAX_ITEMS: usize = 512;

/// What applying a job gave: its items, given back, and one result per item.
pub type Applied = (Vec<Inbound>, Vec<Result<Done, EngineError>>);

/// One caller's items and where their results go: applied, or handed back to apply alone.
struct Job {
    work: Vec<Inbound>,
    done: oneshot::Sender<Result<Applied, Vec<Inbound>>>,
}

/// The queue of one engine's group commit (its task is started with the first job, and again
/// if it ever died).
#[derive(Debug, Default)]
pub(crate) struct Group {
    queue: std::sync::Mutex<Option<mpsc::UnboundedSender<Job>>>,
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
        let n = work.len();
        let (done, answer) = oneshot::channel();
        let job = Job { work, done };
        let refused = {
            let mut queue = self.group().queue.lock().unwrap_or_else(|e| e.into_inner());
            let sender = match queue.as_ref() {
                Some(sender) if !sender.is_closed() => sender,
                dead => {
                    if dead.is_some() {
                        warn!("the group commit's task died; starting another");
                    }
                    let (tx, rx) = mpsc::unbounded_channel();
                    tokio::spawn(group_task(self.weak(), rx));
                    queue.insert(tx)
                }
            };
            sender.send(job).err()
        };
        if let Some(mpsc::error::SendError(job)) = refused {
            // Cannot happen (the receiver was alive a moment ago), but never lose work.
            let results = self.apply_inbound(&job.work).await;
            return (job.work, results);
        }
        match answer.await {
            Ok(Ok(applied)) => applied,
            // Its group failed as a whole: applied alone, in halves if need be (as
            // `apply_inbound` does), outside the group, so one caller's bad item or a lost
            // version race never holds the others back.
            Ok(Err(work)) => {
                let results = self.apply_inbound(&work).await;
                (work, results)
            }
            // The task died while applying (a panic): whether the group committed is unknown.
            Err(_) => (
                Vec::new(),
                (0..n)
                    .map(|_| {
                        Err(EngineError::Interrupted(
                            "the group commit failed while applying; the outcome is unknown".into(),
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

/// One try of a group in one transaction. If it fails as a whole, each job goes back to its
/// caller to be applied alone (the slow paths — halving, retries after a lost version race —
/// run there, beside the next groups).
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
    let outcome = engine.apply_together(&all).await;
    let mut all = all.into_iter();
    match outcome {
        Ok(results) => {
            let mut results = results.into_iter();
            for (size, done) in sizes.into_iter().zip(senders) {
                let work: Vec<Inbound> = all.by_ref().take(size).collect();
                let mine: Vec<Result<Done, EngineError>> = results.by_ref().take(size).collect();
                // A caller that stopped waiting: its items are applied all the same.
                let _ = done.send(Ok((work, mine)));
            }
        }
        Err(e) => {
            debug!(error = %e, jobs = sizes.len(), "group failed; each job is applied alone");
            for (size, done) in sizes.into_iter().zip(senders) {
                let _ = done.send(Err(all.by_ref().take(size).collect()));
            }
        }
    }
}

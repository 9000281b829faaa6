//! Group commit: the batches an engine applies — replies, starts, due timers, operator events
//! — all go through one queue, and one task applies everything queued at that moment in one
//! transaction ([`crate::apply`]; `Engine::apply_grouped` is the engine's side).
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
//! whole, in arrival order). A group is tried once, in one transaction; if that fails, each
//! job goes back to its caller ([`Answer::Alone`]), to be applied alone there (halves down to
//! single items, retries after a lost version race), so one caller's bad item never holds the
//! others' back, nor the next groups. A caller that stops waiting (a dropped HTTP request)
//! leaves its items to be applied all the same; nothing another caller queued depends on it.
//!
//! This file knows nothing of sagas: the queue and its task, generic over the items and their
//! results, and the function that applies a group, given by the engine.

use std::future::Future;
use std::sync::Mutex;

use tokio::sync::{mpsc, oneshot};
use tracing::warn;

/// Items a group takes at most. A job is never split, so a larger one goes alone; below this,
/// whatever waits joins (a reply batch and a start chunk are 256 each at most).
pub const MAX_ITEMS: usize = 512;

/// What became of a caller's items.
#[derive(Debug)]
pub(crate) enum Answer<I, R> {
    /// Applied with their group: the items given back, one result each.
    Applied(Vec<I>, Vec<R>),
    /// The group failed as a whole: the caller applies them alone.
    Alone(Vec<I>),
    /// The task died while applying them (a panic): whether they committed is unknown.
    Lost,
}

/// One caller's items and where their answer goes.
struct Job<I, R> {
    work: Vec<I>,
    done: oneshot::Sender<Answer<I, R>>,
}

/// The queue of one engine's group commit; its task is started with the first job, and again
/// if it ever died.
pub(crate) struct Group<I, R> {
    queue: Mutex<Option<mpsc::UnboundedSender<Job<I, R>>>>,
}

impl<I, R> Default for Group<I, R> {
    fn default() -> Self {
        Group {
            queue: Mutex::new(None),
        }
    }
}

impl<I, R> std::fmt::Debug for Group<I, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Group")
    }
}

impl<I: Send + 'static, R: Send + 'static> Group<I, R> {
    /// Queues `work` to be applied with whatever else waits. `applier` makes the function a
    /// new task applies groups with: it gets a group's items and gives them back, with one
    /// result per item, or without when the group failed as a whole.
    pub(crate) async fn submit<A, F, Fut>(&self, work: Vec<I>, applier: A) -> Answer<I, R>
    where
        A: FnOnce() -> F,
        F: FnMut(Vec<I>) -> Fut + Send + 'static,
        Fut: Future<Output = (Vec<I>, Option<Vec<R>>)> + Send + 'static,
    {
        if work.is_empty() {
            return Answer::Applied(work, Vec::new());
        }
        let (done, answer) = oneshot::channel();
        let refused = {
            let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            let sender = match queue.as_ref() {
                Some(sender) if !sender.is_closed() => sender,
                dead => {
                    if dead.is_some() {
                        warn!("the group commit's task died; starting another");
                    }
                    let (tx, rx) = mpsc::unbounded_channel();
                    tokio::spawn(group_task(applier(), rx));
                    queue.insert(tx)
                }
            };
            sender.send(Job { work, done }).err()
        };
        match refused {
            // Cannot happen (the receiver was alive a moment ago), but never lose work.
            Some(mpsc::error::SendError(job)) => Answer::Alone(job.work),
            None => answer.await.unwrap_or(Answer::Lost),
        }
    }
}

/// Applies what is queued, a group at a time, until the queue's owner is dropped.
async fn group_task<I, R, F, Fut>(mut apply: F, mut queue: mpsc::UnboundedReceiver<Job<I, R>>)
where
    F: FnMut(Vec<I>) -> Fut,
    Fut: Future<Output = (Vec<I>, Option<Vec<R>>)>,
{
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
                    apply_group(&mut apply, jobs).await;
                    jobs = vec![job];
                    items = jobs[0].work.len();
                }
                Err(_) => break,
            }
        }
        apply_group(&mut apply, jobs).await;
    }
}

/// One try of a group; each job's answer to its caller.
async fn apply_group<I, R, F, Fut>(apply: &mut F, jobs: Vec<Job<I, R>>)
where
    F: FnMut(Vec<I>) -> Fut,
    Fut: Future<Output = (Vec<I>, Option<Vec<R>>)>,
{
    let sizes: Vec<usize> = jobs.iter().map(|j| j.work.len()).collect();
    let mut senders = Vec::with_capacity(jobs.len());
    let mut all = Vec::with_capacity(sizes.iter().sum());
    for job in jobs {
        all.extend(job.work);
        senders.push(job.done);
    }
    let (all, results) = apply(all).await;
    let mut all = all.into_iter();
    let mut results = results.map(Vec::into_iter);
    for (size, done) in sizes.into_iter().zip(senders) {
        let work: Vec<I> = all.by_ref().take(size).collect();
        let answer = match results.as_mut() {
            Some(results) => Answer::Applied(work, results.by_ref().take(size).collect()),
            None => Answer::Alone(work),
        };
        // A caller that stopped waiting: its items are applied all the same.
        let _ = done.send(answer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Callers queued together are answered with their own items' results, in order; a group
    /// that fails sends each job back whole.
    #[tokio::test]
    async fn each_caller_gets_its_own_items_back() {
        let group: std::sync::Arc<Group<u32, u32>> = std::sync::Arc::default();
        let applier = || {
            |items: Vec<u32>| async move {
                // A group holding a 0 fails as a whole.
                let results = (!items.contains(&0)).then(|| items.iter().map(|i| i * 10).collect());
                (items, results)
            }
        };
        let mut callers = Vec::new();
        for c in 1..=8u32 {
            let group = group.clone();
            callers.push(tokio::spawn(async move {
                let work = vec![c * 100 + 1, c * 100 + 2, c * 100 + 3];
                (c, group.submit(work, applier).await)
            }));
        }
        for caller in callers {
            let (c, answer) = caller.await.expect("caller");
            match answer {
                Answer::Applied(work, results) => {
                    assert_eq!(work, [c * 100 + 1, c * 100 + 2, c * 100 + 3]);
                    assert_eq!(results, [c * 1000 + 10, c * 1000 + 20, c * 1000 + 30]);
                }
                other => panic!("caller {c}: {other:?}"),
            }
        }
        match group.submit(vec![7, 0], applier).await {
            Answer::Alone(work) => assert_eq!(work, [7, 0], "given back whole"),
            other => panic!("{other:?}"),
        }
    }
}

//! Weak idempotency: a Redis key per command instead of a barrier row in the database.
//!
//! For effects where a dedup row written in the effect's own transaction is not worth it (a
//! notification, a counter in another store, a cache warm-up), a service author registers the
//! handler with [`Idempotency::Weak`](crate::runtime::Idempotency::Weak) instead of the default
//! barrier. Per command the SDK then does:
//!
//! 1. `SET <prefix>:<saga_id>:<step>:<op> <pending token> NX PX <ttl>` — the same command (any
//!    attempt, any redelivery) has the same key;
//! 2. if the key already existed, the command is a **duplicate** and the effect is not run: the
//!    key's value is the **recorded reply** (the handler's outcome as JSON, its output included),
//!    which is answered again — the same reply the first delivery got. While the first run has
//!    not recorded its reply yet (in progress, or its worker died), a duplicate answers a
//!    *retryable* failure, never a success for an effect that may not have happened;
//! 3. otherwise the handler runs in a database transaction, as in barrier mode.
//!    Its outcome then goes into the key (`PX ttl` again): a success and a business failure are
//!    kept (a duplicate gets the same answer; a business "no" must stay "no", the engine relies
//!    on it), a **transient failure deletes the key**, so the engine's retry runs the effect.
//!    The attempt that recorded an outcome is kept with it: a business refusal answers its own
//!    attempt and earlier ones (duplicates, stragglers) but not a later one — the engine sends
//!    a later attempt after a refusal only when an operator retries the step — which takes the
//!    key over and runs the effect, as the barrier does.
//!
//! In a worker's batch (see [`crate::runtime`]) these steps are shared: the claims of all the
//! batch's weak commands go to Redis as one pipeline (in batch order), their handlers run in the
//! batch's database transaction, each in a savepoint of its own (a failure rolls back only its
//! own writes), and the outcomes are recorded with one more pipeline after the commit. A
//! command repeated inside one batch is answered with its first occurrence's outcome.
//!
//! A forward operation whose undo already ran (its undo key exists) is refused like the
//! barrier does (`cancelled_before_run`), as long as that key lives. The barrier's other checks
//! (a null compensation when the action never ran, a confirm refused without a successful try)
//! are not made: an undo or confirm in weak mode always runs its handler.
//!
//! # What weak mode gives up (compared with the barrier)
//!
//! * **Not atomic with the effect.** The key and the effect are two systems. A worker that dies
//!   after the `SET` and before the effect committed leaves a pending key: the command's
//!   retries answer "in progress" until the key expires (`ttl`), so the engine most likely
//!   exhausts its retries first and compensates a step that **never took effect** — the effect
//!   is lost for this saga. Compensations of weak steps must therefore tolerate an action that
//!   never ran (find their own trace of it, or be harmless); weak mode has no null-compensation
//!   bookkeeping past what the Redis keys say. A worker that dies after the commit and before
//!   recording the reply is the same case from the saga's point of view, and the compensation
//!   then undoes a real effect.
//! * **Bounded memory.** After `ttl` the key is gone: a duplicate delivered later than that
//!   (a very late redelivery, an operator replaying a dead letter) runs the effect **again**.
//!   Choose `ttl` longer than any saga can take to finish retrying a step.
//! * **Redis is the record.** A Redis that loses writes (no persistence, a failover to a replica
//!   that lagged) forgets keys, with the same consequence as an expired key.
//! * **Redis unreachable** ⇒ the command answers a retryable failure saying so (the effect was
//!   not run) and the engine retries with backoff; nothing panics. If Redis goes away *after*
//!   the effect, the real outcome is still answered (and logged as unrecorded).
//!
//! Use the barrier (the default) for money, stock and anything a compensation must mirror
//! exactly.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use sagaflow_engine::machine::{Op, Outcome};
use sagaflow_engine::redact::redact_url as redact;
use serde_json::Value;
use sqlx::AnyPool;
use tokio::sync::Mutex;
use tracing::warn;

use crate::barrier::{self, Executed, Handler, Job};
use crate::sdk::StepContext;

/// How long a key lives by default: a day.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);

/// The value of a key whose effect is running (or whose worker died before recording it).
const PENDING: &str = "pending:";

/// Writes ARGV[2] only if the key still holds ARGV[1]: an outcome over our pending token (it
/// may have expired and been taken by another run meanwhile), or our pending token over a
/// refusal a later attempt supersedes.
const RECORD: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then \
                      return redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) else return false end";

/// Deletes the key only if it still holds our pending token.
const RELEASE: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then \
                       return redis.call('DEL', KEYS[1]) else return 0 end";

/// Why weak mode could not run a command. Each is a transient failure for the saga: the
/// runtime answers it as retryable, with this message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WeakError {
    #[error("weak idempotency: invalid Redis URL {url}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error(
        "weak idempotency: Redis at {url} is unreachable or failed ({reason}); the effect was not run"
    )]
    Redis { url: String, reason: String },
    #[error("weak idempotency: database: {0}; the effect was not run")]
    Db(#[from] sqlx::Error),
}

/// Weak-mode settings and the Redis connection, shared by every handler registered with it
/// (cheap to clone). Connects lazily, and again after a failure.
#[derive(Clone)]
pub struct WeakIdempotency {
    inner: Arc<Inner>,
}

struct Inner {
    client: redis::Client,
    /// The URL without its password, for messages.
    url: String,
    prefix: String,
    ttl: Duration,
    conn: Mutex<Option<MultiplexedConnection>>,
}

impl std::fmt::Debug for WeakIdempotency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeakIdempotency")
            .field("url", &self.inner.url)
            .field("prefix", &self.inner.prefix)
            .field("ttl", &self.inner.ttl)
            .finish_non_exhaustive()
    }
}

impl WeakIdempotency {
    /// Keys `<prefix>:<saga_id>:<step>:<op>` on the Redis at `redis_url`
    /// (`redis://[:password@]host:port[/db]`), each living `ttl` (see [`DEFAULT_TTL`]). Only
    /// the URL is checked here; the connection is made on first use.
    pub fn new(redis_url: &str, prefix: &str, ttl: Duration) -> Result<Self, WeakError> {
        let url = redact(redis_url);
        let client = redis::Client::open(redis_url).map_err(|e| WeakError::BadUrl {
            url: url.clone(),
            reason: e.to_string(),
        })?;
        Ok(WeakIdempotency {
            inner: Arc::new(Inner {
                client,
                url,
                prefix: prefix.to_owned(),
                ttl: ttl.max(Duration::from_millis(1)),
                conn: Mutex::new(None),
            }),
        })
    }

    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    pub fn ttl(&self) -> Duration {
        self.inner.ttl
    }

    /// The key of a command: `<prefix>:<saga_id>:<step>:<op>` (every attempt of one operation
    /// shares it, like the barrier's row).
    pub fn key(&self, ctx: &StepContext, op: Op) -> String {
        format!(
            "{}:{}:{}:{}",
            self.inner.prefix,
            ctx.saga_id,
            ctx.step,
            op.as_str()
        )
    }

    fn ttl_ms(&self) -> u64 {
        u64::try_from(self.inner.ttl.as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    fn redis_error(&self, e: &redis::RedisError) -> WeakError {
        WeakError::Redis {
            url: self.inner.url.clone(),
            reason: e.to_string(),
        }
    }

    async fn connection(&self) -> Result<MultiplexedConnection, WeakError> {
        let mut cached = self.inner.conn.lock().await;
        if let Some(c) = cached.as_ref() {
            return Ok(c.clone());
        }
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(Duration::from_secs(2)));
        let c = self
            .inner
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| self.redis_error(&e))?;
        *cached = Some(c.clone());
        Ok(c)
    }

    /// Runs one Redis command; a failure drops the cached connection so the next call
    /// reconnects.
    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, WeakError> {
        let mut conn = self.connection().await?;
        match cmd.query_async(&mut conn).await {
            Ok(v) => Ok(v),
            Err(e) => {
                *self.inner.conn.lock().await = None;
                Err(self.redis_error(&e))
            }
        }
    }

    /// Checks that Redis answers (for a service's start-up check: weak mode itself connects
    /// lazily and never fails at start).
    pub async fn ping(&self) -> Result<(), WeakError> {
        let _: String = self.query(&redis::cmd("PING")).await?;
        Ok(())
    }

    /// What a duplicate of this command would be answered now: the recorded outcome, a
    /// retryable "in progress" while the first run has not recorded one, or `None` when there
    /// is no key (the command would run its effect).
    pub async fn recorded_answer(
        &self,
        ctx: &StepContext,
        op: Op,
    ) -> Result<Option<Outcome>, WeakError> {
        let key = self.key(ctx, op);
        let value: Option<String> = self.query(redis::cmd("GET").arg(&key)).await?;
        Ok(value.map(|v| self.recorded(&key, &v)))
    }

    /// Runs `op` of a step in weak mode (see the module docs): a batch of one. `Err` only when
    /// the effect was not run (Redis or the database unreachable before it): answer it as
    /// retryable.
    pub async fn execute(
        &self,
        pool: &AnyPool,
        handler: &Handler,
        op: Op,
        ctx: &StepContext,
        params: &Value,
    ) -> Result<Executed, WeakError> {
        let claim = self.claim_batch(&[(ctx, op)]).await.pop();
        match claim {
            Some(Claim::Answered(result)) => result,
            Some(Claim::Decided {
                key,
                token,
                attempt,
                outcome,
            }) => {
                self.finish_batch(vec![Finish::Record {
                    key,
                    token,
                    attempt,
                    outcome: outcome.clone(),
                }])
                .await;
                Ok(fresh(outcome))
            }
            Some(Claim::Run {
                key,
                token,
                attempt,
            }) => {
                let job = Job {
                    handler,
                    op,
                    ctx,
                    params,
                    barrier: false,
                };
                let result = match barrier::execute_batch(pool, &[job]).await.results.pop() {
                    Some(r) => r.map_err(WeakError::Db),
                    None => Err(WeakError::Db(sqlx::Error::Protocol("no answer".into()))),
                };
                self.finish_batch(vec![Finish::after(key, token, attempt, &result)])
                    .await;
                result
            }
            Some(Claim::Same(_)) | None => Err(WeakError::Redis {
                url: self.inner.url.clone(),
                reason: "no claim for the command".into(),
            }),
        }
    }

    /// What an existing key says: the recorded outcome, or "in progress" for a pending one.
    fn recorded(&self, key: &str, value: &str) -> Outcome {
        if value.starts_with(PENDING) {
            return Outcome::Retryable {
                message: format!(
                    "weak idempotency: {key} is in progress elsewhere, or its worker stopped \
                     before recording the outcome (the key expires within {:?})",
                    self.inner.ttl
                ),
            };
        }
        serde_json::from_str(value).unwrap_or_else(|e| Outcome::Retryable {
            message: format!("weak idempotency: {key} holds an unreadable outcome ({e})"),
        })
    }
}

/// Where a weak command of a batch stands after the claim round trip.
#[derive(Debug)]
pub(crate) enum Claim {
    /// Answered without running the effect: a duplicate (its recorded reply), or a failure
    /// to reach Redis (`Err`: the effect was not run).
    Answered(Result<Executed, WeakError>),
    /// The key is ours and the outcome decided without running the effect (a forward
    /// operation whose undo key exists); it is recorded like a real answer.
    Decided {
        key: String,
        token: String,
        attempt: u32,
        outcome: Outcome,
    },
    /// The key is ours: run the effect, then [`Finish`] the key.
    Run {
        key: String,
        token: String,
        attempt: u32,
    },
    /// The same key as the batch's command at this index: answered with its outcome, as a
    /// duplicate, without a key of its own (its `SET NX` would only find ours pending).
    Same(usize),
}

/// What to do with a claimed key once its effect's transaction is over.
#[derive(Debug)]
pub(crate) enum Finish {
    /// Keep the answer for duplicates (a success or a business failure), with the attempt
    /// that gave it.
    Record {
        key: String,
        token: String,
        attempt: u32,
        outcome: Outcome,
    },
    /// Free the key (a transient failure, or the effect not run): a retry runs the effect.
    Release { key: String, token: String },
}

impl Finish {
    /// What happens to the key of a command that ran to `result`.
    pub(crate) fn after(
        key: String,
        token: String,
        attempt: u32,
        result: &Result<Executed, WeakError>,
    ) -> Self {
        match result {
            Ok(Executed {
                outcome: outcome @ (Outcome::Ok { .. } | Outcome::Business { .. }),
                ..
            }) => Finish::Record {
                key,
                token,
                attempt,
                outcome: outcome.clone(),
            },
            _ => Finish::Release { key, token },
        }
    }
}

impl WeakIdempotency {
    /// Whether two handles share one Redis connection and key space (their commands can share
    /// a pipeline).
    pub(crate) fn same(&self, other: &WeakIdempotency) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// Runs a pipeline in one round trip; a failure drops the cached connection so the next
    /// call reconnects.
    async fn query_pipe(&self, pipe: &redis::Pipeline) -> Result<Vec<redis::Value>, WeakError> {
        let mut conn = self.connection().await?;
        match pipe.query_async(&mut conn).await {
            Ok(v) => Ok(v),
            Err(e) => {
                *self.inner.conn.lock().await = None;
                Err(self.redis_error(&e))
            }
        }
    }

    /// Claims the keys of a batch's weak commands, in one round trip (a second one only for
    /// keys that expired between their `SET` and their `GET`). The commands are claimed in
    /// batch order, so an undo earlier in the batch makes a later forward operation refused,
    /// as if they had come one by one.
    pub(crate) async fn claim_batch(&self, cmds: &[(&StepContext, Op)]) -> Vec<Claim> {
        let keys: Vec<String> = cmds.iter().map(|(ctx, op)| self.key(ctx, *op)).collect();
        let tokens: Vec<String> = cmds
            .iter()
            .map(|_| format!("{PENDING}{:016x}", fastrand::u64(..)))
            .collect();
        let mut claims: Vec<Option<Claim>> = cmds.iter().map(|_| None).collect();
        let mut first: HashMap<&str, usize> = HashMap::new();
        let mut open = Vec::new();
        let mut superseding: Vec<(usize, String)> = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            match first.get(key.as_str()) {
                Some(&j) => claims[i] = Some(Claim::Same(j)),
                None => {
                    first.insert(key, i);
                    open.push(i);
                }
            }
        }
        for _ in 0..2 {
            if open.is_empty() {
                break;
            }
            let mut pipe = redis::pipe();
            for &i in &open {
                let (ctx, op) = cmds[i];
                pipe.cmd("SET")
                    .arg(&keys[i])
                    .arg(&tokens[i])
                    .arg("NX")
                    .arg("PX")
                    .arg(self.ttl_ms());
                pipe.cmd("GET").arg(&keys[i]);
                if op.is_forward() {
                    pipe.cmd("EXISTS").arg(self.key(ctx, op.undo()));
                }
            }
            let mut values = match self.query_pipe(&pipe).await {
                Ok(v) => v.into_iter(),
                Err(e) => {
                    // Some of the SETs may have gone through: free whatever may be ours.
                    let release = open
                        .iter()
                        .map(|&i| Finish::Release {
                            key: keys[i].clone(),
                            token: tokens[i].clone(),
                        })
                        .collect();
                    self.finish_batch(release).await;
                    for &i in &open {
                        claims[i] = Some(Claim::Answered(Err(WeakError::Redis {
                            url: self.inner.url.clone(),
                            reason: match &e {
                                WeakError::Redis { reason, .. } => reason.clone(),
                                other => other.to_string(),
                            },
                        })));
                    }
                    open.clear();
                    break;
                }
            };
            let mut again = Vec::new();
            for &i in &open {
                let (_, op) = cmds[i];
                let set = values.next();
                let existing: Option<String> = values
                    .next()
                    .and_then(|v| redis::from_redis_value(v).ok())
                    .flatten();
                let undone = if op.is_forward() {
                    match values.next() {
                        Some(redis::Value::Int(n)) => Some(n > 0),
                        _ => None,
                    }
                } else {
                    Some(false)
                };
                let claimed = !matches!(set, None | Some(redis::Value::Nil));
                let attempt = cmds[i].0.attempt;
                claims[i] = Some(match (claimed, undone, existing) {
                    (true, Some(false), _) => Claim::Run {
                        key: keys[i].clone(),
                        token: tokens[i].clone(),
                        attempt,
                    },
                    (true, Some(true), _) => Claim::Decided {
                        key: keys[i].clone(),
                        token: tokens[i].clone(),
                        attempt,
                        outcome: Outcome::Business {
                            code: "cancelled_before_run".into(),
                            message: format!("{op} refused: its {} already ran", op.undo()),
                        },
                    },
                    (true, None, _) => {
                        self.finish_batch(vec![Finish::Release {
                            key: keys[i].clone(),
                            token: tokens[i].clone(),
                        }])
                        .await;
                        Claim::Answered(Err(WeakError::Redis {
                            url: self.inner.url.clone(),
                            reason: format!("unexpected reply to EXISTS for {}", keys[i]),
                        }))
                    }
                    (false, Some(false), Some(value))
                        if matches!(
                            recorded_refusal(&value),
                            Some(by) if attempt > by
                        ) =>
                    {
                        // A later attempt than the refusal's: it takes the key over.
                        superseding.push((i, value));
                        continue;
                    }
                    (false, _, Some(value)) => Claim::Answered(Ok(Executed {
                        outcome: self.recorded(&keys[i], &value),
                        duplicate: true,
                    })),
                    (false, _, None) => {
                        again.push(i);
                        continue;
                    }
                });
            }
            open = again;
        }
        for &i in &open {
            claims[i] = Some(Claim::Answered(Err(WeakError::Redis {
                url: self.inner.url.clone(),
                reason: format!("key {} could neither be set nor read", keys[i]),
            })));
        }
        if !superseding.is_empty() {
            let mut pipe = redis::pipe();
            for (i, old) in &superseding {
                pipe.cmd("EVAL")
                    .arg(RECORD)
                    .arg(1)
                    .arg(&keys[*i])
                    .arg(old)
                    .arg(&tokens[*i])
                    .arg(self.ttl_ms());
            }
            let swapped = self.query_pipe(&pipe).await;
            for (n, (i, _)) in superseding.into_iter().enumerate() {
                let took = match &swapped {
                    Ok(values) => !matches!(values.get(n), None | Some(redis::Value::Nil)),
                    Err(_) => false,
                };
                claims[i] = Some(if took {
                    Claim::Run {
                        key: keys[i].clone(),
                        token: tokens[i].clone(),
                        attempt: cmds[i].0.attempt,
                    }
                } else {
                    // Another worker took it over first, or Redis failed: not run here.
                    Claim::Answered(Ok(Executed {
                        outcome: Outcome::Retryable {
                            message: format!(
                                "weak idempotency: {} changed while this attempt took it over",
                                keys[i]
                            ),
                        },
                        duplicate: true,
                    }))
                });
            }
        }
        claims
            .into_iter()
            .map(|c| {
                c.unwrap_or_else(|| {
                    Claim::Answered(Err(WeakError::Redis {
                        url: self.inner.url.clone(),
                        reason: "no answer to the claim".into(),
                    }))
                })
            })
            .collect()
    }

    /// Records or releases a batch's keys, in one round trip. Failures are logged: the
    /// effects already happened (or not), their outcomes are answered anyway, and a key left
    /// pending answers "in progress" until it expires.
    pub(crate) async fn finish_batch(&self, finishes: Vec<Finish>) {
        if finishes.is_empty() {
            return;
        }
        let mut pipe = redis::pipe();
        for f in &finishes {
            match f {
                Finish::Record {
                    key,
                    token,
                    attempt,
                    outcome,
                } => {
                    pipe.cmd("EVAL")
                        .arg(RECORD)
                        .arg(1)
                        .arg(key)
                        .arg(token)
                        .arg(recorded_value(outcome, *attempt))
                        .arg(self.ttl_ms());
                }
                Finish::Release { key, token } => {
                    pipe.cmd("EVAL").arg(RELEASE).arg(1).arg(key).arg(token);
                }
            }
        }
        match self.query_pipe(&pipe).await {
            Ok(values) => {
                for (f, v) in finishes.iter().zip(values) {
                    if let (Finish::Record { key, .. }, redis::Value::Nil) = (f, v) {
                        warn!(
                            key,
                            "weak idempotency: the key expired while the effect ran; its outcome is not recorded"
                        );
                    }
                }
            }
            Err(e) => {
                for f in &finishes {
                    match f {
                        Finish::Record { key, .. } => {
                            warn!(key, error = %e, "weak idempotency: outcome not recorded")
                        }
                        Finish::Release { key, .. } => {
                            warn!(key, error = %e, "weak idempotency: pending key not deleted; \
                                  retries answer 'in progress' until it expires")
                        }
                    }
                }
            }
        }
    }
}

/// A key's recorded value: the outcome as JSON with the attempt that gave it beside its fields.
fn recorded_value(outcome: &Outcome, attempt: u32) -> String {
    let mut value = serde_json::to_value(outcome).unwrap_or_default();
    if let Some(fields) = value.as_object_mut() {
        fields.insert("attempt".into(), serde_json::json!(attempt));
    }
    value.to_string()
}

/// The attempt whose business refusal a recorded value is, if it is one (a value recorded
/// before attempts were kept answers every attempt: `u32::MAX`).
fn recorded_refusal(value: &str) -> Option<u32> {
    if value.starts_with(PENDING) {
        return None;
    }
    let doc: Value = serde_json::from_str(value).ok()?;
    if doc.get("outcome").and_then(Value::as_str) != Some("business") {
        return None;
    }
    Some(
        doc.get("attempt")
            .and_then(Value::as_u64)
            .and_then(|a| u32::try_from(a).ok())
            .unwrap_or(u32::MAX),
    )
}

fn fresh(outcome: Outcome) -> Executed {
    Executed {
        outcome,
        duplicate: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> StepContext {
        StepContext {
            saga_id: "s-1".into(),
            step: "notify".into(),
            operation: "send".into(),
            attempt: 3,
            key: "o-1".into(),
        }
    }

    #[test]
    fn keys_name_the_command_not_the_attempt() {
        let w = WeakIdempotency::new("redis://127.0.0.1:6379", "svc", DEFAULT_TTL).unwrap();
        assert_eq!(w.key(&ctx(), Op::Action), "svc:s-1:notify:action");
        assert_eq!(w.key(&ctx(), Op::Compensate), "svc:s-1:notify:compensate");
    }

    #[test]
    fn passwords_are_not_shown() {
        assert_eq!(redact("redis://:pw@h:6379/0"), "redis://:***@h:6379/0");
        assert_eq!(redact("redis://u:pw@h"), "redis://u:***@h");
        assert_eq!(redact("redis://h:6379"), "redis://h:6379");
    }

    #[test]
    fn a_bad_url_is_an_error_not_a_panic() {
        let e = WeakIdempotency::new("nonsense://x", "p", DEFAULT_TTL).unwrap_err();
        assert!(e.to_string().contains("invalid Redis URL"), "{e}");
    }

    #[test]
    fn pending_and_recorded_values() {
        let w = WeakIdempotency::new("redis://127.0.0.1:6379", "p", DEFAULT_TTL).unwrap();
        assert!(matches!(
            w.recorded("k", "pending:00ff"),
            Outcome::Retryable { .. }
        ));
        let ok = Outcome::Ok {
            output: serde_json::json!({"n": 1}),
        };
        assert_eq!(w.recorded("k", &serde_json::to_string(&ok).unwrap()), ok);
        assert!(matches!(
            w.recorded("k", "{oops"),
            Outcome::Retryable { .. }
        ));
    }
}

//! The engine's write transaction: the table traits and their implementation on sqlx.
//!
//! Each trait is one table or concern, and every method takes a whole batch of rows and costs
//! one statement (see [`super::sql`]), whatever the batch size. The driver asks only for what
//! it touches; [`StoreTx`] bundles them with `commit`. One implementation, [`Tx`], serves
//! PostgreSQL and SQLite with the dialect's statement texts; the conformance suite
//! (`engine/tests/store_conformance.rs`) runs the same cases against both.

use std::collections::{HashMap, HashSet};

use serde_json::{Value, json};
use sqlx::Row;
use sqlx::any::AnyRow;

use super::sql::Sql;
use super::{Counters, SagaRow, StoreError, json, saga_from_row};
use crate::machine::{Event, HistoryEntry, SagaState};

/// A saga to insert, in the state the batch that starts it leaves it in (so a saga that begins
/// at once is written once, not inserted queued and then updated).
#[derive(Debug, Clone)]
pub struct NewSaga {
    pub id: String,
    pub name: String,
    pub definition_hash: String,
    pub sequence_key: String,
    pub state: SagaState,
    pub idempotency_key: Option<String>,
    /// The changing decisions the batch already applied to it (0: inserted as it was made).
    pub version: i64,
}

/// A saga's new state, written only if its row is still at `expected_version`.
#[derive(Debug, Clone)]
pub struct SagaWrite {
    pub id: String,
    pub expected_version: i64,
    /// How many changing decisions this write carries: the version moves by that much.
    pub changes: i64,
    pub state: SagaState,
}

/// One line of a saga's timeline.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryRow {
    pub saga_id: String,
    pub entry: HistoryEntry,
}

/// A durable timer.
#[derive(Debug, Clone, PartialEq)]
pub struct TimerRow {
    pub id: String,
    pub saga_id: String,
    pub due_at: i64,
    pub event: Event,
}

/// A message written to the outbox with the state change that produced it.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxMessage {
    pub message_id: String,
    pub destination: String,
    pub routing_key: String,
    pub payload: String,
    /// The writer's own relay publishes this row straight after the commit, without claiming
    /// it; any relay claims it only once it is older than [`super::outbox::HANDOFF_GRACE_MS`]
    /// (its writer died first). False: any relay claims it at once.
    pub handed_off: bool,
}

/// The `sagas` table.
#[allow(async_fn_in_trait)]
pub trait SagaTable {
    /// The rows of those of `ids` that exist (any order).
    async fn load_sagas(&mut self, ids: &[String]) -> Result<Vec<SagaRow>, StoreError>;
    async fn insert_sagas(&mut self, sagas: &[NewSaga], now: i64) -> Result<(), StoreError>;
    /// Writes every saga whose version still matches; [`StoreError::Conflict`] if any moved
    /// (another engine wrote it first): the caller rolls back and retries.
    async fn update_sagas(&mut self, writes: &[SagaWrite], now: i64) -> Result<(), StoreError>;
    /// Idempotency key → the saga it started, for those of `keys` that started one.
    async fn sagas_by_idempotency_key(
        &mut self,
        keys: &[String],
    ) -> Result<HashMap<String, KeyedSaga>, StoreError>;
}

/// The saga an idempotency key started: what a later start with the same key must match.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyedSaga {
    pub id: String,
    /// The definition's name.
    pub name: String,
    pub input: Value,
}

/// The append-only `saga_history`.
#[allow(async_fn_in_trait)]
pub trait HistoryTable {
    /// Appended in slice order.
    async fn append_history(&mut self, rows: &[HistoryRow], now: i64) -> Result<(), StoreError>;
}

/// The transactional `outbox`.
#[allow(async_fn_in_trait)]
pub trait OutboxTable {
    /// Queued in slice order (the relay sends in that order); a message id already queued is
    /// kept as it was.
    async fn enqueue_outbox(
        &mut self,
        messages: &[OutboxMessage],
        now: i64,
    ) -> Result<(), StoreError>;
}

/// The durable `timers`.
#[allow(async_fn_in_trait)]
pub trait TimerTable {
    /// Claims timers by deleting them; returns the ids this transaction claimed.
    async fn claim_timers(&mut self, ids: &[String]) -> Result<HashSet<String>, StoreError>;
    /// Rows must be unique by id.
    async fn set_timers(&mut self, rows: &[TimerRow]) -> Result<(), StoreError>;
    async fn cancel_timers(&mut self, ids: &[String]) -> Result<(), StoreError>;
}

/// Per-key sequencing: `sequence_keys` (the holder of each key) and `sequence_queue` (who
/// waits behind it, in arrival order).
#[allow(async_fn_in_trait)]
pub trait SequenceKeyTable {
    /// Takes each (key, saga) whose key is free, or queues the saga behind the holder. Returns
    /// the sagas that hold their key now (in request order), the others queued. Two requests
    /// for one key in one call: the first gets it.
    async fn acquire_keys(
        &mut self,
        requests: &[(String, String)],
    ) -> Result<Vec<String>, StoreError>;
    /// Final sagas give up their key (a holder) or their place in the queue (a waiter).
    /// Returns the sagas that were handed a key and must now begin.
    async fn release_keys(
        &mut self,
        released: &[(String, String)],
    ) -> Result<Vec<String>, StoreError>;
}

/// `saga_definitions`: every definition a saga ever started with, by content hash.
#[allow(async_fn_in_trait)]
pub trait DefinitionTable {
    async fn put_definition(
        &mut self,
        hash: &str,
        name: &str,
        version: u32,
        source: &str,
        now: i64,
    ) -> Result<(), StoreError>;
    async fn definition_source(&mut self, hash: &str) -> Result<Option<String>, StoreError>;
    /// The hash of the latest version registered under `name`.
    async fn latest_definition(&mut self, name: &str) -> Result<Option<String>, StoreError>;
}

/// Everything the engine writes, in one transaction.
#[allow(async_fn_in_trait)]
pub trait StoreTx:
    SagaTable + HistoryTable + OutboxTable + TimerTable + SequenceKeyTable + DefinitionTable
{
    /// Writes a batch's changes: the new sagas (as [`SagaTable::insert_sagas`]), the changed
    /// ones (version-checked, as [`SagaTable::update_sagas`]), their history and outbox
    /// messages. One statement on PostgreSQL ([`super::sql::postgres_write_changes`]), one per
    /// table on SQLite; the same rows and the same errors either way.
    async fn write_changes(&mut self, changes: &Changes<'_>, now: i64) -> Result<(), StoreError>;

    async fn commit(self) -> Result<(), StoreError>;
}

/// What [`StoreTx::write_changes`] writes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Changes<'a> {
    pub new_sagas: &'a [NewSaga],
    pub sagas: &'a [SagaWrite],
    pub history: &'a [HistoryRow],
    pub outbox: &'a [OutboxMessage],
}

/// A transaction on the engine's database.
#[derive(Debug)]
pub struct Tx {
    pub(super) tx: sqlx::Transaction<'static, sqlx::Any>,
    pub(super) sql: &'static Sql,
    pub(super) counters: std::sync::Arc<Counters>,
}

fn ids_json(ids: &[String]) -> String {
    json(&ids)
}

fn saga_write_rows(writes: &[SagaWrite], now: i64) -> String {
    let rows: Vec<Value> = writes
        .iter()
        .map(|w| {
            json!({
                "id": w.id,
                "status": w.state.status.name(),
                "state": json(&w.state),
                "version": w.expected_version,
                "n": w.changes,
                "finished": w.state.status.is_final().then_some(now),
            })
        })
        .collect();
    json(&rows)
}

/// A version-checked update wrote `written` of `writes`: anything less is a stale version.
fn check_written(writes: &[SagaWrite], written: u64) -> Result<(), StoreError> {
    if written == writes.len() as u64 {
        return Ok(());
    }
    let ids: Vec<&str> = writes.iter().map(|w| w.id.as_str()).collect();
    Err(StoreError::Conflict(format!(
        "{} of {} sagas ({})",
        writes.len() as u64 - written.min(writes.len() as u64),
        writes.len(),
        ids.join(", ")
    )))
}

fn new_saga_rows(sagas: &[NewSaga], now: i64) -> String {
    let rows: Vec<Value> = sagas
        .iter()
        .map(|s| {
            json!({
                "id": s.id,
                "name": s.name,
                "hash": s.definition_hash,
                "k": s.sequence_key,
                "status": s.state.status.name(),
                "state": json(&s.state),
                "idem": s.idempotency_key,
                "version": s.version,
                "finished": s.state.status.is_final().then_some(now),
            })
        })
        .collect();
    json(&rows)
}

fn history_rows(rows: &[HistoryRow]) -> String {
    let rows: Vec<Value> = rows
        .iter()
        .map(|h| {
            json!({
                "saga": h.saga_id,
                "kind": h.entry.kind,
                "step": h.entry.step,
                "detail": h.entry.detail,
            })
        })
        .collect();
    json(&rows)
}

fn outbox_rows(messages: &[OutboxMessage]) -> String {
    let rows: Vec<Value> = messages
        .iter()
        .map(|m| {
            json!({
                "id": m.message_id,
                "dest": m.destination,
                "key": m.routing_key,
                "payload": m.payload,
                // NULL: handed off (see `OutboxMessage::handed_off`); 0: free to claim now.
                "lease": if m.handed_off { None } else { Some(0) },
            })
        })
        .collect();
    json(&rows)
}

impl Tx {
    /// A statement that takes the rows as `$1` (and `now` as `$2` where given).
    ///
    /// Not kept prepared: PostgreSQL plans it at each run with the tables' current sizes. A
    /// prepared statement keeps its generic plan for the life of the connection, and one made
    /// while the tables were small (a fresh deployment, the first seconds of a run) is a
    /// sequential scan the tables then outgrow (measured: 8-50 ms per saga update at 50,000
    /// sagas instead of 0.1 ms). Planning a batch statement costs far less than that.
    async fn exec(
        &mut self,
        sql: &'static str,
        rows: String,
        now: Option<i64>,
    ) -> Result<u64, StoreError> {
        self.counters.statement();
        let mut q = sqlx::query(sql).persistent(false).bind(rows);
        if let Some(now) = now {
            q = q.bind(now);
        }
        Ok(q.execute(&mut *self.tx).await?.rows_affected())
    }

    async fn fetch(
        &mut self,
        sql: &'static str,
        rows: String,
        now: Option<i64>,
    ) -> Result<Vec<AnyRow>, StoreError> {
        self.counters.statement();
        let mut q = sqlx::query(sql).persistent(false).bind(rows);
        if let Some(now) = now {
            q = q.bind(now);
        }
        Ok(q.fetch_all(&mut *self.tx).await?)
    }

    /// The raw connection, for the rare per-row paths.
    pub(super) fn conn(&mut self) -> &mut sqlx::AnyConnection {
        &mut self.tx
    }

    pub async fn rollback(self) -> Result<(), StoreError> {
        Ok(self.tx.rollback().await?)
    }
}

impl SagaTable for Tx {
    async fn load_sagas(&mut self, ids: &[String]) -> Result<Vec<SagaRow>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let rows = self.fetch(self.sql.load_sagas, ids_json(ids), None).await?;
        rows.iter().map(saga_from_row).collect()
    }

    async fn insert_sagas(&mut self, sagas: &[NewSaga], now: i64) -> Result<(), StoreError> {
        if sagas.is_empty() {
            return Ok(());
        }
        self.exec(self.sql.insert_sagas, new_saga_rows(sagas, now), Some(now))
            .await?;
        Ok(())
    }

    async fn update_sagas(&mut self, writes: &[SagaWrite], now: i64) -> Result<(), StoreError> {
        if writes.is_empty() {
            return Ok(());
        }
        let written = self
            .exec(
                self.sql.update_sagas,
                saga_write_rows(writes, now),
                Some(now),
            )
            .await?;
        check_written(writes, written)
    }

    async fn sagas_by_idempotency_key(
        &mut self,
        keys: &[String],
    ) -> Result<HashMap<String, KeyedSaga>, StoreError> {
        if keys.is_empty() {
            return Ok(HashMap::new());
        }
        let rows = self
            .fetch(self.sql.sagas_by_idempotency_key, ids_json(keys), None)
            .await?;
        rows.iter()
            .map(|r| {
                let id: String = r.try_get("id")?;
                let state: String = r.try_get("state")?;
                let input = super::read::decode_state(&id, &state)?.input;
                Ok((
                    r.try_get("idempotency_key")?,
                    KeyedSaga {
                        id,
                        name: r.try_get("name")?,
                        input,
                    },
                ))
            })
            .collect()
    }
}

impl HistoryTable for Tx {
    async fn append_history(&mut self, rows: &[HistoryRow], now: i64) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        self.exec(self.sql.append_history, history_rows(rows), Some(now))
            .await?;
        Ok(())
    }
}

impl OutboxTable for Tx {
    async fn enqueue_outbox(
        &mut self,
        messages: &[OutboxMessage],
        now: i64,
    ) -> Result<(), StoreError> {
        if messages.is_empty() {
            return Ok(());
        }
        self.exec(self.sql.enqueue_outbox, outbox_rows(messages), Some(now))
            .await?;
        Ok(())
    }
}

impl TimerTable for Tx {
    async fn claim_timers(&mut self, ids: &[String]) -> Result<HashSet<String>, StoreError> {
        if ids.is_empty() {
            return Ok(HashSet::new());
        }
        let rows = self
            .fetch(self.sql.claim_timers, ids_json(ids), None)
            .await?;
        rows.iter().map(|r| Ok(r.try_get("id")?)).collect()
    }

    async fn set_timers(&mut self, rows: &[TimerRow]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        let rows: Vec<Value> = rows
            .iter()
            .map(|t| {
                json!({
                    "id": t.id,
                    "saga": t.saga_id,
                    "due": t.due_at,
                    "event": json(&t.event),
                })
            })
            .collect();
        self.exec(self.sql.set_timers, json(&rows), None).await?;
        Ok(())
    }

    async fn cancel_timers(&mut self, ids: &[String]) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        self.exec(self.sql.cancel_timers, ids_json(ids), None)
            .await?;
        Ok(())
    }
}

impl SequenceKeyTable for Tx {
    async fn acquire_keys(
        &mut self,
        requests: &[(String, String)],
    ) -> Result<Vec<String>, StoreError> {
        if requests.is_empty() {
            return Ok(Vec::new());
        }
        // In key order (inserts and row locks alike): two batches taking overlapping keys
        // then wait for each other in one direction only, never in a cycle.
        let mut ordered: Vec<&(String, String)> = requests.iter().collect();
        ordered.sort_by(|a, b| a.0.cmp(&b.0));
        let rows: Vec<Value> = ordered
            .iter()
            .map(|(k, s)| json!({"k": k, "s": s}))
            .collect();
        let taken: HashSet<String> = self
            .fetch(self.sql.acquire_keys, json(&rows), None)
            .await?
            .iter()
            .map(|r| r.try_get::<String, _>("holder"))
            .collect::<Result<_, _>>()?;
        let mut holds = HashSet::new();
        for (key, saga) in ordered {
            if taken.contains(saga) || self.queue_behind(key, saga).await? {
                holds.insert(saga.clone());
            }
        }
        Ok(requests
            .iter()
            .filter(|(_, s)| holds.contains(s))
            .map(|(_, s)| s.clone())
            .collect())
    }

    async fn release_keys(
        &mut self,
        released: &[(String, String)],
    ) -> Result<Vec<String>, StoreError> {
        if released.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = released.iter().map(|(k, _)| k.clone()).collect();
        // Lock first, then read the queue in a later statement: its snapshot then sees every
        // waiter queued by a transaction that held the key's lock before us.
        let holders: HashMap<String, String> = self
            .fetch(self.sql.lock_keys, ids_json(&keys), None)
            .await?
            .iter()
            .map(|r| Ok((r.try_get("seq_key")?, r.try_get("holder")?)))
            .collect::<Result<_, StoreError>>()?;
        let mut held = Vec::new();
        let mut waiters = Vec::new();
        for (key, saga) in released {
            if holders.get(key) == Some(saga) {
                held.push(key.clone());
            } else {
                waiters.push(saga.clone());
            }
        }
        if !waiters.is_empty() {
            self.exec(self.sql.leave_queue, ids_json(&waiters), None)
                .await?;
        }
        if held.is_empty() {
            return Ok(Vec::new());
        }
        let heads: HashMap<String, String> = self
            .fetch(self.sql.queue_heads, ids_json(&held), None)
            .await?
            .iter()
            .map(|r| Ok((r.try_get("seq_key")?, r.try_get("saga_id")?)))
            .collect::<Result<_, StoreError>>()?;
        let free: Vec<String> = held
            .iter()
            .filter(|k| !heads.contains_key(*k))
            .cloned()
            .collect();
        if !free.is_empty() {
            self.exec(self.sql.delete_keys, ids_json(&free), None)
                .await?;
        }
        // Hand-overs are rare (two sagas of one order close together): one row at a time.
        let mut next = Vec::new();
        for key in &held {
            let Some(saga) = heads.get(key) else { continue };
            self.counters.statement();
            sqlx::query("DELETE FROM sequence_queue WHERE saga_id = $1")
                .bind(saga.as_str())
                .execute(self.conn())
                .await?;
            self.counters.statement();
            sqlx::query("UPDATE sequence_keys SET holder = $1 WHERE seq_key = $2")
                .bind(saga.as_str())
                .bind(key.as_str())
                .execute(self.conn())
                .await?;
            next.push(saga.clone());
        }
        Ok(next)
    }
}

impl Tx {
    /// The key was taken when we tried: queue behind its holder, unless it was released in the
    /// meantime (then take it after all: returns true).
    async fn queue_behind(&mut self, key: &str, saga: &str) -> Result<bool, StoreError> {
        loop {
            self.counters.statement();
            let holder: Option<String> = sqlx::query(self.sql.lock_key)
                .bind(key)
                .fetch_optional(self.conn())
                .await?
                .map(|r| r.try_get("holder"))
                .transpose()?;
            match holder {
                Some(h) if h == saga => return Ok(true),
                Some(_) => {
                    self.counters.statement();
                    sqlx::query("INSERT INTO sequence_queue (seq_key, saga_id) VALUES ($1, $2) ON CONFLICT (saga_id) DO NOTHING")
                        .bind(key)
                        .bind(saga)
                        .execute(self.conn())
                        .await?;
                    return Ok(false);
                }
                // Released between our insert and the lock: try to take it again.
                None => {
                    self.counters.statement();
                    let taken = sqlx::query("INSERT INTO sequence_keys (seq_key, holder) VALUES ($1, $2) ON CONFLICT (seq_key) DO NOTHING")
                        .bind(key)
                        .bind(saga)
                        .execute(self.conn())
                        .await?
                        .rows_affected()
                        == 1;
                    if taken {
                        return Ok(true);
                    }
                }
            }
        }
    }
}

impl DefinitionTable for Tx {
    async fn put_definition(
        &mut self,
        hash: &str,
        name: &str,
        version: u32,
        source: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        self.counters.statement();
        sqlx::query("INSERT INTO saga_definitions (hash, name, version, source, created_at) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (hash) DO NOTHING")
            .bind(hash)
            .bind(name)
            .bind(i64::from(version))
            .bind(source)
            .bind(now)
            .execute(self.conn())
            .await?;
        Ok(())
    }

    async fn definition_source(&mut self, hash: &str) -> Result<Option<String>, StoreError> {
        self.counters.statement();
        let row = sqlx::query("SELECT source FROM saga_definitions WHERE hash = $1")
            .bind(hash)
            .fetch_optional(self.conn())
            .await?;
        Ok(row.map(|r| r.try_get("source")).transpose()?)
    }

    async fn latest_definition(&mut self, name: &str) -> Result<Option<String>, StoreError> {
        self.counters.statement();
        let row = sqlx::query("SELECT hash FROM saga_definitions WHERE name = $1 ORDER BY version DESC, created_at DESC LIMIT 1")
            .bind(name)
            .fetch_optional(self.conn())
            .await?;
        Ok(row.map(|r| r.try_get("hash")).transpose()?)
    }
}

impl StoreTx for Tx {
    async fn write_changes(&mut self, c: &Changes<'_>, now: i64) -> Result<(), StoreError> {
        if !self.sql.postgres {
            self.insert_sagas(c.new_sagas, now).await?;
            self.update_sagas(c.sagas, now).await?;
            self.append_history(c.history, now).await?;
            return self.enqueue_outbox(c.outbox, now).await;
        }
        if c.new_sagas.is_empty()
            && c.sagas.is_empty()
            && c.history.is_empty()
            && c.outbox.is_empty()
        {
            return Ok(());
        }
        self.counters.statement();
        let row = sqlx::query(super::sql::postgres_write_changes())
            .persistent(false)
            .bind(new_saga_rows(c.new_sagas, now))
            .bind(saga_write_rows(c.sagas, now))
            .bind(history_rows(c.history))
            .bind(outbox_rows(c.outbox))
            .bind(now)
            .fetch_one(&mut *self.tx)
            .await?;
        let written: i64 = row.try_get("updated")?;
        check_written(c.sagas, u64::try_from(written).unwrap_or(0))
    }

    async fn commit(self) -> Result<(), StoreError> {
        self.counters.commit();
        Ok(self.tx.commit().await?)
    }
}

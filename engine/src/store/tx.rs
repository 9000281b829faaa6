//! The engine's write transaction: the table traits and their implementation on sqlx.
//!
//! Each trait is one table or concern, and every method takes a whole batch of rows and costs
//! one statement (see [`super::sql`]), whatever the batch size (up to [`sql::MAX_PARAMS`]
//! values; a larger batch is a few statements). The driver asks only for what
//! it touches; [`StoreTx`] bundles them with `commit`. One implementation, [`Tx`], serves
//! PostgreSQL and SQLite with the dialect's statement texts; the conformance suite
//! (`engine/tests/store_conformance.rs`) runs the same cases against both.

use std::collections::{HashMap, HashSet};

use serde_json::Value;
use sqlx::Row;
use sqlx::any::{AnyArguments, AnyRow};

use super::sql::{self, Sql, Text, rows_per_statement};
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
    /// Writes a batch's changes: the cancelled timers (as [`TimerTable::cancel_timers`]), the
    /// new sagas (as [`SagaTable::insert_sagas`]), the changed ones (version-checked, as
    /// [`SagaTable::update_sagas`]), their history and outbox messages, and the timers set (as
    /// [`TimerTable::set_timers`]), and last the outbox rows the broker confirmed (as
    /// [`super::Store::delete_sent`]), in that order. One statement on PostgreSQL, one call of
    /// several statements on SQLite ([`Sql::write_changes`]); one per table when the batch has
    /// more values than one statement takes; the same rows and the same errors every way.
    async fn write_changes(&mut self, changes: &Changes<'_>, now: i64) -> Result<(), StoreError>;

    async fn commit(self) -> Result<(), StoreError>;
}

/// What [`StoreTx::write_changes`] writes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Changes<'a> {
    /// Timer ids, deleted first: a batch locks timers before sagas.
    pub cancelled_timers: &'a [String],
    pub new_sagas: &'a [NewSaga],
    pub sagas: &'a [SagaWrite],
    pub history: &'a [HistoryRow],
    pub outbox: &'a [OutboxMessage],
    /// Rows must be unique by id, and none of `cancelled_timers`.
    pub timers: &'a [TimerRow],
    /// Outbox rows (by message id) the broker confirmed: deleted, as
    /// [`super::Store::delete_sent`] does (see [`crate::handoff`]).
    pub sent: &'a [String],
}

/// A transaction on the engine's database.
#[derive(Debug)]
pub struct Tx {
    pub(super) tx: sqlx::Transaction<'static, sqlx::Any>,
    pub(super) sql: &'static Sql,
    pub(super) counters: std::sync::Arc<Counters>,
    /// Keys [`SequenceKeyTable::release_keys`] found without a waiter (their rows are locked):
    /// deleted by the next [`StoreTx::write_changes`], or at the commit.
    pub(super) freed_keys: Vec<String>,
    /// Look-ups may be kept prepared (see [`super::Store::connect_engine`]).
    pub(super) keep_lookups: bool,
}

/// A statement with its values bound one by one.
type Query<'q> = sqlx::query::Query<'q, sqlx::Any, AnyArguments>;

/// The statement of a built text.
///
/// Not kept prepared: PostgreSQL plans it at each run with the tables' current sizes. A
/// prepared statement keeps its generic plan for the life of the connection, and one made
/// while the tables were small (a fresh deployment, the first seconds of a run) is a
/// sequential scan the tables then outgrow (measured: 8-50 ms per saga update at 50,000
/// sagas instead of 0.1 ms). Planning a batch statement costs far less than that. (Its text
/// depends on the batch's size anyway.)
fn query<'q>(text: Text) -> Query<'q> {
    sqlx::query(sqlx::AssertSqlSafe(text.sql)).persistent(false)
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

/// `now` if the state is final: when it became so.
fn finished(state: &SagaState, now: i64) -> Option<i64> {
    state.status.is_final().then_some(now)
}

/// The values of [`Sql::insert_sagas`]' rows; `states` are the sagas' states as JSON.
fn bind_new_sagas<'q>(
    mut q: Query<'q>,
    sagas: &'q [NewSaga],
    states: &'q [String],
    now: i64,
) -> Query<'q> {
    for (s, state) in sagas.iter().zip(states) {
        q = q
            .bind(s.id.as_str())
            .bind(s.name.as_str())
            .bind(s.definition_hash.as_str())
            .bind(s.sequence_key.as_str())
            .bind(s.state.status.name())
            .bind(state.as_str())
            .bind(s.version)
            .bind(s.idempotency_key.as_deref())
            .bind(now)
            .bind(now)
            .bind(finished(&s.state, now));
    }
    q
}

/// The values of [`Sql::update_sagas`]' rows; `states` are the new states as JSON.
fn bind_saga_writes<'q>(
    mut q: Query<'q>,
    writes: &'q [SagaWrite],
    states: &'q [String],
    now: i64,
) -> Query<'q> {
    q = q.bind(now);
    for (w, state) in writes.iter().zip(states) {
        q = q
            .bind(w.id.as_str())
            .bind(w.state.status.name())
            .bind(state.as_str())
            .bind(w.expected_version)
            .bind(w.changes)
            .bind(finished(&w.state, now));
    }
    q
}

/// A batch's timeline lines as one row per saga (its lines in slice order, as a JSON array),
/// the sagas in the order they first appear.
fn timeline_rows(rows: &[HistoryRow]) -> Vec<(&str, String)> {
    let mut at: HashMap<&str, usize> = HashMap::new();
    let mut grouped: Vec<(&str, Vec<&HistoryEntry>)> = Vec::new();
    for h in rows {
        let i = *at.entry(h.saga_id.as_str()).or_insert_with(|| {
            grouped.push((h.saga_id.as_str(), Vec::new()));
            grouped.len() - 1
        });
        grouped[i].1.push(&h.entry);
    }
    grouped
        .into_iter()
        .map(|(saga, lines)| (saga, json(&lines)))
        .collect()
}

fn bind_history<'q>(mut q: Query<'q>, rows: &'q [(&'q str, String)], now: i64) -> Query<'q> {
    for (saga, lines) in rows {
        q = q.bind(*saga).bind(now).bind(lines.as_str());
    }
    q
}

fn bind_outbox<'q>(mut q: Query<'q>, messages: &'q [OutboxMessage], now: i64) -> Query<'q> {
    for m in messages {
        // NULL: handed off (see `OutboxMessage::handed_off`); 0: free to claim now.
        let lease: Option<i64> = if m.handed_off { None } else { Some(0) };
        q = q
            .bind(m.message_id.as_str())
            .bind(m.destination.as_str())
            .bind(m.routing_key.as_str())
            .bind(m.payload.as_str())
            .bind(now)
            .bind(lease);
    }
    q
}

fn timer_events(rows: &[TimerRow]) -> Vec<String> {
    rows.iter().map(|t| json(&t.event)).collect()
}

/// The values of [`Sql::set_timers`]' rows; `events` are the timers' events as JSON.
fn bind_timers<'q>(mut q: Query<'q>, rows: &'q [TimerRow], events: &'q [String]) -> Query<'q> {
    for (t, event) in rows.iter().zip(events) {
        q = q
            .bind(t.id.as_str())
            .bind(t.saga_id.as_str())
            .bind(t.due_at)
            .bind(event.as_str());
    }
    q
}

/// An `IN`-list statement for `values`, written at the [`sql::padded`] length (the last value
/// repeated): one text per power of two, kept prepared when `keep` (see
/// [`super::Store::connect_engine`]).
pub(super) fn in_list<'q>(
    sql: &Sql,
    keep: bool,
    text: fn(&Sql, usize) -> Text,
    values: &'q [String],
) -> Query<'q> {
    let n = sql::padded(values.len());
    let mut q =
        sqlx::query(sqlx::AssertSqlSafe(text(sql, n).sql)).persistent(keep && n <= sql::PADDED_MAX);
    for v in values {
        q = q.bind(v.as_str());
    }
    if let Some(last) = values.last() {
        for _ in values.len()..n {
            q = q.bind(last.as_str());
        }
    }
    q
}

/// One value [`Sql::write_changes`] binds on PostgreSQL: the batch's time, or a column's values
/// as an array literal.
enum ArrayParam {
    Now,
    Literal(String),
}

/// The values of the PostgreSQL [`Sql::write_changes`], in its bind order (the parts present,
/// in the order of [`sql::Counts`]' fields; each part's columns as one array each).
#[allow(clippy::too_many_arguments)]
fn write_arrays(
    c: &Changes<'_>,
    n: &sql::Counts,
    new_states: &[String],
    write_states: &[String],
    timeline: &[(&str, String)],
    events: &[String],
    freed: &[String],
    now: i64,
) -> Vec<ArrayParam> {
    use ArrayParam::{Literal, Now};
    use sql::{int_array, text_array};
    let strs = |v: &[String]| text_array(v.iter().map(|s| Some(s.as_str())));
    let mut out = Vec::new();
    if n.cancelled > 0 {
        out.push(Literal(strs(c.cancelled_timers)));
    }
    if n.new_sagas > 0 {
        let s = c.new_sagas;
        out.push(Now);
        out.push(Literal(text_array(s.iter().map(|s| Some(s.id.as_str())))));
        out.push(Literal(text_array(s.iter().map(|s| Some(s.name.as_str())))));
        out.push(Literal(text_array(
            s.iter().map(|s| Some(s.definition_hash.as_str())),
        )));
        out.push(Literal(text_array(
            s.iter().map(|s| Some(s.sequence_key.as_str())),
        )));
        out.push(Literal(text_array(
            s.iter().map(|s| Some(s.state.status.name())),
        )));
        out.push(Literal(strs(new_states)));
        out.push(Literal(int_array(s.iter().map(|s| Some(s.version)))));
        out.push(Literal(text_array(
            s.iter().map(|s| s.idempotency_key.as_deref()),
        )));
        out.push(Literal(int_array(
            s.iter().map(|s| finished(&s.state, now)),
        )));
    }
    if n.sagas > 0 {
        let w = c.sagas;
        out.push(Now);
        out.push(Literal(text_array(w.iter().map(|w| Some(w.id.as_str())))));
        out.push(Literal(text_array(
            w.iter().map(|w| Some(w.state.status.name())),
        )));
        out.push(Literal(strs(write_states)));
        out.push(Literal(int_array(
            w.iter().map(|w| Some(w.expected_version)),
        )));
        out.push(Literal(int_array(w.iter().map(|w| Some(w.changes)))));
        out.push(Literal(int_array(
            w.iter().map(|w| finished(&w.state, now)),
        )));
    }
    if n.history > 0 {
        out.push(Now);
        out.push(Literal(text_array(timeline.iter().map(|(s, _)| Some(*s)))));
        out.push(Literal(text_array(
            timeline.iter().map(|(_, l)| Some(l.as_str())),
        )));
    }
    if n.outbox > 0 {
        let m = c.outbox;
        out.push(Now);
        out.push(Literal(text_array(
            m.iter().map(|m| Some(m.message_id.as_str())),
        )));
        out.push(Literal(text_array(
            m.iter().map(|m| Some(m.destination.as_str())),
        )));
        out.push(Literal(text_array(
            m.iter().map(|m| Some(m.routing_key.as_str())),
        )));
        out.push(Literal(text_array(
            m.iter().map(|m| Some(m.payload.as_str())),
        )));
        // NULL: handed off (see `OutboxMessage::handed_off`); 0: free to claim now.
        out.push(Literal(int_array(
            m.iter().map(|m| if m.handed_off { None } else { Some(0) }),
        )));
    }
    if n.timers > 0 {
        let t = c.timers;
        out.push(Literal(text_array(t.iter().map(|t| Some(t.id.as_str())))));
        out.push(Literal(text_array(
            t.iter().map(|t| Some(t.saga_id.as_str())),
        )));
        out.push(Literal(int_array(t.iter().map(|t| Some(t.due_at)))));
        out.push(Literal(strs(events)));
    }
    if n.freed_keys > 0 {
        out.push(Literal(strs(freed)));
    }
    if n.sent > 0 {
        out.push(Literal(strs(c.sent)));
    }
    out
}

fn bind_all<'q>(mut q: Query<'q>, values: &'q [String]) -> Query<'q> {
    for v in values {
        q = q.bind(v.as_str());
    }
    q
}

fn states<'a>(states: impl Iterator<Item = &'a SagaState>) -> Vec<String> {
    states.map(json).collect()
}

impl Tx {
    /// A batch's timeline rows ([`timeline_rows`]), as many statements as their values need.
    async fn append_timeline(
        &mut self,
        rows: &[(&str, String)],
        now: i64,
    ) -> Result<(), StoreError> {
        for chunk in rows.chunks(rows_per_statement(sql::HISTORY_COLS)) {
            let q = bind_history(query(self.sql.append_history(chunk.len())), chunk, now);
            self.exec(q).await?;
        }
        Ok(())
    }

    async fn exec(&mut self, q: Query<'_>) -> Result<u64, StoreError> {
        self.counters.statement();
        Ok(q.execute(&mut *self.tx).await?.rows_affected())
    }

    async fn fetch(&mut self, q: Query<'_>) -> Result<Vec<AnyRow>, StoreError> {
        self.counters.statement();
        Ok(q.fetch_all(&mut *self.tx).await?)
    }

    /// A statement per chunk of `values` (an `IN` list), all rows returned.
    async fn fetch_in(
        &mut self,
        text: fn(&Sql, usize) -> Text,
        values: &[String],
    ) -> Result<Vec<AnyRow>, StoreError> {
        let mut rows = Vec::new();
        for chunk in values.chunks(rows_per_statement(1)) {
            let q = in_list(self.sql, self.keep_lookups, text, chunk);
            rows.extend(self.fetch(q).await?);
        }
        Ok(rows)
    }

    /// A statement per chunk of `values` (an `IN` list); rows affected in all.
    async fn exec_in(
        &mut self,
        text: fn(&Sql, usize) -> Text,
        values: &[String],
    ) -> Result<u64, StoreError> {
        let mut n = 0;
        for chunk in values.chunks(rows_per_statement(1)) {
            let q = in_list(self.sql, self.keep_lookups, text, chunk);
            n += self.exec(q).await?;
        }
        Ok(n)
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
        let rows = self.fetch_in(Sql::load_sagas, ids).await?;
        rows.iter().map(saga_from_row).collect()
    }

    async fn insert_sagas(&mut self, sagas: &[NewSaga], now: i64) -> Result<(), StoreError> {
        let json = states(sagas.iter().map(|s| &s.state));
        let per = rows_per_statement(sql::NEW_SAGA_COLS);
        for (rows, json) in sagas.chunks(per).zip(json.chunks(per)) {
            let q = bind_new_sagas(query(self.sql.insert_sagas(rows.len())), rows, json, now);
            self.exec(q).await?;
        }
        Ok(())
    }

    async fn update_sagas(&mut self, writes: &[SagaWrite], now: i64) -> Result<(), StoreError> {
        let json = states(writes.iter().map(|w| &w.state));
        let per = rows_per_statement(sql::SAGA_WRITE_COLS);
        let mut written = 0;
        for (rows, json) in writes.chunks(per).zip(json.chunks(per)) {
            let q = bind_saga_writes(query(self.sql.update_sagas(rows.len())), rows, json, now);
            written += self.exec(q).await?;
        }
        check_written(writes, written)
    }

    async fn sagas_by_idempotency_key(
        &mut self,
        keys: &[String],
    ) -> Result<HashMap<String, KeyedSaga>, StoreError> {
        let rows = self.fetch_in(Sql::sagas_by_idempotency_key, keys).await?;
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
        self.append_timeline(&timeline_rows(rows), now).await
    }
}

impl OutboxTable for Tx {
    async fn enqueue_outbox(
        &mut self,
        messages: &[OutboxMessage],
        now: i64,
    ) -> Result<(), StoreError> {
        for chunk in messages.chunks(rows_per_statement(sql::OUTBOX_COLS)) {
            let q = bind_outbox(query(self.sql.enqueue_outbox(chunk.len())), chunk, now);
            self.exec(q).await?;
        }
        Ok(())
    }
}

impl TimerTable for Tx {
    async fn claim_timers(&mut self, ids: &[String]) -> Result<HashSet<String>, StoreError> {
        let rows = self.fetch_in(Sql::claim_timers, ids).await?;
        rows.iter().map(|r| Ok(r.try_get("id")?)).collect()
    }

    async fn set_timers(&mut self, rows: &[TimerRow]) -> Result<(), StoreError> {
        let events = timer_events(rows);
        let per = rows_per_statement(sql::TIMER_COLS);
        for (chunk, events) in rows.chunks(per).zip(events.chunks(per)) {
            let q = bind_timers(query(self.sql.set_timers(chunk.len())), chunk, events);
            self.exec(q).await?;
        }
        Ok(())
    }

    async fn cancel_timers(&mut self, ids: &[String]) -> Result<(), StoreError> {
        self.exec_in(Sql::cancel_timers, ids).await?;
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
        let mut taken = HashSet::new();
        for chunk in ordered.chunks(rows_per_statement(2)) {
            let mut q = query(self.sql.acquire_keys(chunk.len()));
            for (k, s) in chunk {
                q = q.bind(k.as_str()).bind(s.as_str());
            }
            for r in self.fetch(q).await? {
                taken.insert(r.try_get::<String, _>("holder")?);
            }
        }
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
        let mut keys: Vec<String> = released.iter().map(|(k, _)| k.clone()).collect();
        keys.sort_unstable();
        keys.dedup();
        // Lock first, then read the queue in a later statement: its snapshot then sees every
        // waiter queued by a transaction that held the key's lock before us.
        let holders: HashMap<String, String> = self
            .fetch_in(Sql::lock_keys, &keys)
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
            self.exec_in(Sql::leave_queue, &waiters).await?;
        }
        if held.is_empty() {
            return Ok(Vec::new());
        }
        let heads: HashMap<String, String> = self
            .fetch_in(Sql::queue_heads, &held)
            .await?
            .iter()
            .map(|r| Ok((r.try_get("seq_key")?, r.try_get("saga_id")?)))
            .collect::<Result<_, StoreError>>()?;
        let free: Vec<String> = held
            .iter()
            .filter(|k| !heads.contains_key(*k))
            .cloned()
            .collect();
        // Deleted with the batch's other writes (they are locked meanwhile).
        self.freed_keys.extend(free);
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
        let timeline = timeline_rows(c.history);
        let freed = std::mem::take(&mut self.freed_keys);
        let n = sql::Counts {
            cancelled: c.cancelled_timers.len(),
            new_sagas: c.new_sagas.len(),
            sagas: c.sagas.len(),
            history: timeline.len(),
            outbox: c.outbox.len(),
            timers: c.timers.len(),
            freed_keys: freed.len(),
            sent: c.sent.len(),
        };
        if n.params() > sql::MAX_PARAMS {
            self.exec_in(Sql::delete_keys, &freed).await?;
            self.cancel_timers(c.cancelled_timers).await?;
            self.insert_sagas(c.new_sagas, now).await?;
            self.update_sagas(c.sagas, now).await?;
            self.append_timeline(&timeline, now).await?;
            self.enqueue_outbox(c.outbox, now).await?;
            self.set_timers(c.timers).await?;
            self.exec_in(Sql::delete_sent, c.sent).await?;
            return Ok(());
        }
        if n.is_empty() {
            return Ok(());
        }
        let new_states = states(c.new_sagas.iter().map(|s| &s.state));
        let write_states = states(c.sagas.iter().map(|w| &w.state));
        let events = timer_events(c.timers);
        if self.sql.postgres {
            let arrays = write_arrays(
                c,
                &n,
                &new_states,
                &write_states,
                &timeline,
                &events,
                &freed,
                now,
            );
            // Kept prepared where every run is planned afresh (an engine's connections, see
            // `keep_lookups`); elsewhere a generic plan could outlive the tables' sizes.
            let mut q = sqlx::query(sqlx::AssertSqlSafe(self.sql.write_changes(&n).sql))
                .persistent(self.keep_lookups);
            for a in &arrays {
                q = match a {
                    ArrayParam::Now => q.bind(now),
                    ArrayParam::Literal(l) => q.bind(l.as_str()),
                };
            }
            self.counters.statement();
            let row = q.fetch_one(&mut *self.tx).await?;
            let written: i64 = row.try_get("updated")?;
            return check_written(c.sagas, u64::try_from(written).unwrap_or(0));
        }
        let mut q = query(self.sql.write_changes(&n));
        // The parts' values in the order the parts were written.
        q = bind_all(q, c.cancelled_timers);
        if !c.new_sagas.is_empty() {
            q = bind_new_sagas(q, c.new_sagas, &new_states, now);
        }
        if !c.sagas.is_empty() {
            q = bind_saga_writes(q, c.sagas, &write_states, now);
        }
        q = bind_history(q, &timeline, now);
        q = bind_outbox(q, c.outbox, now);
        q = bind_timers(q, c.timers, &events);
        q = bind_all(q, &freed);
        q = bind_all(q, c.sent);
        self.counters.statement();
        // `fetch_all`: on SQLite the text is several statements, and every one must run.
        let rows = q.fetch_all(&mut *self.tx).await?;
        let row = rows
            .first()
            .ok_or(StoreError::Db(sqlx::Error::RowNotFound))?;
        let written: i64 = row.try_get("updated")?;
        check_written(c.sagas, u64::try_from(written).unwrap_or(0))
    }

    async fn commit(mut self) -> Result<(), StoreError> {
        let freed = std::mem::take(&mut self.freed_keys);
        self.exec_in(Sql::delete_keys, &freed).await?;
        self.counters.commit();
        Ok(self.tx.commit().await?)
    }
}

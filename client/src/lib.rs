//! Start a sagaflow saga from inside your application's own database transaction.
//!
//! An order service that has just written "order paid" must make sure the `order-paid` saga
//! starts — and must make sure it does **not** start when that write is rolled back. Publishing
//! to the broker from the request handler cannot give both: the publish may happen and the
//! commit fail, or the commit happen and the process die before the publish. This crate is the
//! transactional outbox for saga starts, on the application's own PostgreSQL database:
//!
//! 1. [`install`] creates the table `sagaflow_start_outbox` (or put [`INSTALL_SQL`] into your
//!    own migrations).
//! 2. [`start_saga`] inserts one row into it, **on the connection of your open transaction**,
//!    next to your business writes. The row commits or rolls back with them.
//! 3. A [`Relay`] (one or more, anywhere) publishes committed rows to the engine's
//!    [`START_QUEUE`] and marks each row sent only after the broker confirmed it.
//! 4. The engine consumes the start queue and starts the saga with the row's idempotency key.
//!
//! ```no_run
//! # async fn example(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
//! let mut tx = pool.begin().await?;
//! sqlx::query("INSERT INTO orders (id, status) VALUES ($1, 'paid')")
//!     .bind("o-1")
//!     .execute(&mut *tx)
//!     .await?;
//! let input = serde_json::json!({
//!     "order_id": "o-1", "user_id": "u-1", "amount": "129.90",
//!     "coupon_id": "c-1", "points": 129, "campaign_id": "spring-sale",
//! });
//! sagaflow_client::start_saga(&mut *tx, "order-paid", &input, "o-1").await?;
//! tx.commit().await?; // the saga starts if and only if this commit succeeds
//! # Ok(()) }
//! ```
//!
//! # The guarantee
//!
//! * **Rolled back ⇒ nothing.** The outbox row is part of the rolled-back transaction, so no
//!   relay ever sees it: nothing is published, no saga starts.
//! * **Committed ⇒ exactly one saga.** The committed row stays until a relay has a broker
//!   confirm for it, whatever crashes in between, so the start request is delivered *at least
//!   once*. It may be delivered more than once (a relay that crashed after the confirm but
//!   before marking the row sent publishes it again; the broker may redeliver), and the engine
//!   starts sagas idempotently by the request's idempotency key — concurrent duplicates
//!   included — so at-least-once delivery yields *exactly one* saga per key.
//!
//! Choose the idempotency key from your business data (the order id, or `"paid-" + order id`):
//! calling [`start_saga`] again with the same key — a retried request, a second transaction —
//! is a no-op, and the engine shares the key space with `sagaflow start --idempotency-key`.
//!
//! A start request the engine can never act on (a saga name it does not know, an input that does
//! not match the definition) is dead-lettered there with its reason; it never blocks the queue.
//!
//! # Traces
//!
//! A saga started with [`Start`] and the caller's W3C `traceparent` joins the caller's trace:
//! the context (and its `tracestate`, if any) is kept in the outbox row, carried by the start
//! message, and the engine's `start` span is the caller's span's child (as `POST /sagas` with a
//! `traceparent` header).
//!
//! ```no_run
//! # async fn example(tx: &mut sqlx::PgConnection, input: serde_json::Value) -> Result<(), sagaflow_client::ClientError> {
//! // e.g. from your OpenTelemetry propagator, or the request's own `traceparent` header
//! let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
//! sagaflow_client::Start::new("order-paid", &input, "o-1")
//!     .traceparent(traceparent)
//!     .write(tx)
//!     .await?;
//! # Ok(()) }
//! ```

use std::sync::Arc;
use std::time::Duration;

use sagaflow_engine::trace::Carried;
use sagaflow_engine::transport::{Message, START_QUEUE, Transport, TransportError};
use sagaflow_engine::wire::StartMsg;
use serde_json::Value;
use sqlx::types::Json;
use sqlx::{PgConnection, PgPool};
use tokio::sync::watch;
use tracing::{debug, warn};

/// The outbox table's name.
pub const OUTBOX_TABLE: &str = "sagaflow_start_outbox";

/// The outbox table, for your own migrations (idempotent: safe to run again, and running it
/// again brings a table made by an earlier version up to date — add it as a new migration when
/// you upgrade). [`install`] runs exactly this.
pub const INSTALL_SQL: &str = "\
CREATE TABLE IF NOT EXISTS sagaflow_start_outbox (
    id              BIGSERIAL PRIMARY KEY,
    saga            TEXT NOT NULL,
    input           JSONB NOT NULL,
    idempotency_key TEXT NOT NULL UNIQUE,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    sent_at         TIMESTAMPTZ,
    traceparent     TEXT, -- the caller's W3C trace context, if it gave one
    tracestate      TEXT  -- and the tracestate that came with it
);
CREATE INDEX IF NOT EXISTS sagaflow_start_outbox_unsent
    ON sagaflow_start_outbox (id) WHERE sent_at IS NULL;
-- A table made before the trace context was kept gets its columns.
ALTER TABLE sagaflow_start_outbox ADD COLUMN IF NOT EXISTS traceparent TEXT;
ALTER TABLE sagaflow_start_outbox ADD COLUMN IF NOT EXISTS tracestate TEXT;
";

/// Serialises concurrent [`install`]s (`CREATE TABLE IF NOT EXISTS` races otherwise).
const INSTALL_LOCK: i64 = 0x5a6a_f10e_0057_a127;

/// Longest saga name the engine accepts.
const MAX_SAGA_NAME: usize = 128;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error(
        "invalid saga name `{0}`: a saga name is 1–128 of the characters A–Z a–z 0–9 - _ (the `name:` of its YAML definition)"
    )]
    InvalidSagaName(String),
    #[error("the idempotency key must not be empty: it is what makes starting twice start once")]
    EmptyIdempotencyKey,
    #[error("the input of saga `{saga}` must be a JSON object, got {got}")]
    InputNotAnObject { saga: String, got: String },
    #[error(
        "the table sagaflow_start_outbox does not exist: run sagaflow_client::install (or INSTALL_SQL in your migrations) first"
    )]
    NotInstalled,
    #[error(
        "the table sagaflow_start_outbox was made by an earlier sagaflow-client and lacks a column ({0}): run sagaflow_client::install again (or INSTALL_SQL as a new migration)"
    )]
    OutdatedTable(String),
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("publishing start {message} was not confirmed within {after:?}")]
    PublishTimeout { message: String, after: Duration },
    #[error("cannot encode start message: {0}")]
    Encode(#[from] serde_json::Error),
}

/// Creates the outbox table and its index if they do not exist ([`INSTALL_SQL`]). Safe to call
/// at every application start, from several processes at once.
pub async fn install(conn: &mut PgConnection) -> Result<(), ClientError> {
    let mut tx = sqlx::Connection::begin(conn).await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(INSTALL_LOCK)
        .execute(&mut *tx)
        .await?;
    sqlx::raw_sql(INSTALL_SQL).execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(())
}

/// Requests that the saga `saga` be started with `input`, as part of the transaction open on
/// `conn` — pass your transaction (`&mut *tx`), next to your business writes.
///
/// Nothing is sent now: one row is inserted into `sagaflow_start_outbox`. If the transaction
/// commits, a [`Relay`] delivers the request and the engine starts exactly one saga for
/// `idempotency_key`; if it rolls back, nothing happens at all. Calling this again with the same
/// key (in this or another transaction) is a no-op, whatever the saga and input.
///
/// Checked here, cheaply: a well-formed saga name, a non-empty key, an object as input. Whether
/// the engine knows the saga and the input matches its definition is checked by the engine
/// (a mismatch is dead-lettered there, with its reason).
///
/// If the table does not exist the insert fails with [`ClientError::NotInstalled`], and on
/// PostgreSQL that aborts your transaction: no business write commits without its start.
///
/// The same as `Start::new(saga, input, idempotency_key).write(conn)`; [`Start`] also carries
/// the caller's trace context.
pub async fn start_saga(
    conn: &mut PgConnection,
    saga: &str,
    input: &Value,
    idempotency_key: &str,
) -> Result<(), ClientError> {
    Start::new(saga, input, idempotency_key).write(conn).await
}

/// A saga start to write into the outbox: [`start_saga`] with more to say.
#[derive(Debug, Clone)]
#[must_use = "a Start does nothing until it is written"]
pub struct Start<'a> {
    saga: &'a str,
    input: &'a Value,
    idempotency_key: &'a str,
    traceparent: Option<&'a str>,
    tracestate: Option<&'a str>,
}

impl<'a> Start<'a> {
    /// The saga `saga`, started with `input`, once for `idempotency_key` (see [`start_saga`]).
    pub fn new(saga: &'a str, input: &'a Value, idempotency_key: &'a str) -> Start<'a> {
        Start {
            saga,
            input,
            idempotency_key,
            traceparent: None,
            tracestate: None,
        }
    }

    /// The caller's W3C trace context (`00-<trace id>-<span id>-<flags>`): the saga's trace
    /// continues it, its `start` span the child of that span. A malformed one is dropped here
    /// (the saga then starts a trace of its own), never an error.
    pub fn traceparent(mut self, traceparent: &'a str) -> Start<'a> {
        self.traceparent = Some(traceparent);
        self
    }

    /// The W3C `tracestate` that came with the caller's context (vendors' `key=value` list):
    /// carried on beside it, as W3C Trace Context asks. Kept only beside a valid
    /// [`traceparent`](Start::traceparent), and dropped if malformed (or over 512 characters).
    pub fn tracestate(mut self, tracestate: &'a str) -> Start<'a> {
        self.tracestate = Some(tracestate);
        self
    }

    fn trace(&self) -> Carried {
        sagaflow_engine::trace::pass_on_carried(self.traceparent, self.tracestate)
    }

    /// Inserts the start's row on `conn`, in the transaction open there (see [`start_saga`]).
    pub async fn write(self, conn: &mut PgConnection) -> Result<(), ClientError> {
        validate(self.saga, self.input, self.idempotency_key)?;
        let trace = self.trace();
        // Without a trace context, the columns every version of the table has: an application
        // that upgraded the library before its table keeps starting sagas (its relay brings
        // the table up to date, see `Relay::relay_once`).
        let query = if trace.traceparent.is_none() {
            sqlx::query(
                "INSERT INTO sagaflow_start_outbox (saga, input, idempotency_key) \
                 VALUES ($1, $2, $3) ON CONFLICT (idempotency_key) DO NOTHING",
            )
            .bind(self.saga)
            .bind(Json(self.input))
            .bind(self.idempotency_key)
        } else {
            sqlx::query(
                "INSERT INTO sagaflow_start_outbox \
                 (saga, input, idempotency_key, traceparent, tracestate) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (idempotency_key) DO NOTHING",
            )
            .bind(self.saga)
            .bind(Json(self.input))
            .bind(self.idempotency_key)
            .bind(trace.traceparent)
            .bind(trace.tracestate)
        };
        query.execute(conn).await.map_err(db_error)?;
        Ok(())
    }

    /// The wire message this start becomes when a [`Relay`] publishes its row.
    pub fn message(&self) -> Result<Message, ClientError> {
        encode(
            self.saga,
            self.input.clone(),
            self.idempotency_key,
            self.trace(),
        )
    }
}

fn validate(saga: &str, input: &Value, idempotency_key: &str) -> Result<(), ClientError> {
    let name_ok = !saga.is_empty()
        && saga.len() <= MAX_SAGA_NAME
        && saga
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !name_ok {
        return Err(ClientError::InvalidSagaName(saga.to_owned()));
    }
    if idempotency_key.is_empty() {
        return Err(ClientError::EmptyIdempotencyKey);
    }
    if !input.is_object() {
        let mut got = input.to_string();
        if got.len() > 80 {
            let cut = (0..=77)
                .rev()
                .find(|&i| got.is_char_boundary(i))
                .unwrap_or(0);
            got.truncate(cut);
            got.push('…');
        }
        return Err(ClientError::InputNotAnObject {
            saga: saga.to_owned(),
            got,
        });
    }
    Ok(())
}

/// `undefined_table` gets its own error: the most likely mistake is a missing [`install`]; and
/// `undefined_column`, a table from before a column was added, one saying to run it again.
fn db_error(e: sqlx::Error) -> ClientError {
    match &e {
        sqlx::Error::Database(db) if db.code().as_deref() == Some("42P01") => {
            ClientError::NotInstalled
        }
        sqlx::Error::Database(db) if db.code().as_deref() == Some("42703") => {
            ClientError::OutdatedTable(db.message().to_owned())
        }
        _ => ClientError::Db(e),
    }
}

/// The wire message for one outbox row: id `start/<key>` (a re-send is the same message), routed
/// by the idempotency key, payload a [`StartMsg`]. Without a trace context; [`Start::message`]
/// is the same with one.
pub fn start_message(
    saga: &str,
    input: Value,
    idempotency_key: &str,
) -> Result<Message, ClientError> {
    encode(saga, input, idempotency_key, Carried::default())
}

fn encode(
    saga: &str,
    input: Value,
    idempotency_key: &str,
    trace: Carried,
) -> Result<Message, ClientError> {
    let payload = serde_json::to_vec(&StartMsg {
        saga: saga.to_owned(),
        input,
        idempotency_key: idempotency_key.to_owned(),
        traceparent: trace.traceparent,
        tracestate: trace.tracestate,
    })?;
    Ok(Message {
        id: format!("start/{idempotency_key}"),
        key: idempotency_key.to_owned(),
        payload,
    })
}

/// An outbox row as the relay reads it: id, saga, input, idempotency key, traceparent,
/// tracestate.
type OutboxRow = (
    i64,
    String,
    Json<Value>,
    String,
    Option<String>,
    Option<String>,
);

/// Publishes committed start requests from `sagaflow_start_outbox` to the engine's
/// [`START_QUEUE`].
///
/// Each round ([`Relay::relay_once`]) takes a batch of unsent rows with
/// `FOR UPDATE SKIP LOCKED`, publishes them all, waits for every confirm
/// ([`Transport::publish`] returns after the broker's confirm), and marks exactly the confirmed
/// rows sent, in the same transaction. A row whose publish failed, timed out, or whose marking
/// did not commit (the relay crashed) is published again later: delivery is at least once, and
/// the engine's idempotent start turns that into exactly one saga per idempotency key.
///
/// Several relays may run at once (in every application instance, say): `SKIP LOCKED` gives each
/// row to one of them at a time.
#[derive(Debug, Clone)]
pub struct Relay {
    pool: PgPool,
    transport: Arc<dyn Transport>,
    batch_size: usize,
    poll_interval: Duration,
    publish_timeout: Duration,
}

impl Relay {
    /// A relay over the application's database `pool` (where [`install`] created the table),
    /// publishing through `transport`. Defaults: batches of 200 rows, a poll every 200 ms while
    /// idle, 30 s for a confirm.
    pub fn new(pool: PgPool, transport: Arc<dyn Transport>) -> Relay {
        Relay {
            pool,
            transport,
            batch_size: 200,
            poll_interval: Duration::from_millis(200),
            publish_timeout: Duration::from_secs(30),
        }
    }

    /// Rows taken (and locked) per round; at least 1.
    pub fn with_batch_size(mut self, rows: usize) -> Relay {
        self.batch_size = rows.max(1);
        self
    }

    /// How long [`Relay::run`] sleeps when the outbox is empty: the most a start waits for its
    /// relay.
    pub fn with_poll_interval(mut self, every: Duration) -> Relay {
        self.poll_interval = every;
        self
    }

    /// A publish not confirmed within this counts as failed; its row is published again later.
    pub fn with_publish_timeout(mut self, after: Duration) -> Relay {
        self.publish_timeout = after;
        self
    }

    /// Publishes one batch of committed, unsent rows and marks the confirmed ones sent. Returns
    /// how many were sent (0: nothing to do, or every row was locked by another relay). Fails
    /// on a database error, or when rows were taken and not one of them was confirmed.
    pub async fn relay_once(&self) -> Result<usize, ClientError> {
        match self.relay_batch(true).await {
            // A table made by an earlier version: bring it up to date (what `install` does,
            // idempotent and serialised) and go on, rather than stop relaying after an upgrade.
            // A role that may not alter the table (or a lock it cannot get at once) relays
            // the table as it is: its rows have no trace context anyway.
            Err(ClientError::OutdatedTable(column)) => {
                warn!(%column, "sagaflow_start_outbox lacks a column of this version; adding it (INSTALL_SQL)");
                if let Err(e) = self.upgrade().await {
                    warn!(error = %e, "could not bring sagaflow_start_outbox up to date; relaying it without trace contexts until install runs");
                    return self.relay_batch(false).await;
                }
                self.relay_batch(true).await
            }
            other => other,
        }
    }

    /// [`install`] on a connection of the pool, giving up at once rather than queueing its
    /// table lock behind the application's open transactions (and every insert behind it).
    async fn upgrade(&self) -> Result<(), ClientError> {
        let mut conn = self.pool.acquire().await?;
        sqlx::query("SET lock_timeout = '2s'")
            .execute(&mut *conn)
            .await?;
        let installed = install(&mut conn).await;
        let reset = sqlx::query("RESET lock_timeout").execute(&mut *conn).await;
        installed?;
        reset?;
        Ok(())
    }

    /// One round; `traced`: the table has the trace context's columns.
    async fn relay_batch(&self, traced: bool) -> Result<usize, ClientError> {
        let mut tx = self.pool.begin().await?;
        let select = if traced {
            "SELECT id, saga, input, idempotency_key, traceparent, tracestate \
             FROM sagaflow_start_outbox \
             WHERE sent_at IS NULL ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED"
        } else {
            "SELECT id, saga, input, idempotency_key, NULL::text, NULL::text \
             FROM sagaflow_start_outbox \
             WHERE sent_at IS NULL ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED"
        };
        let rows: Vec<OutboxRow> = sqlx::query_as(select)
            .bind(i64::try_from(self.batch_size).unwrap_or(i64::MAX))
            .fetch_all(&mut *tx)
            .await
            .map_err(db_error)?;
        if rows.is_empty() {
            return Ok(0);
        }
        let mut batch = Vec::with_capacity(rows.len());
        for (id, saga, Json(input), key, traceparent, tracestate) in rows {
            let trace = Carried {
                traceparent,
                tracestate,
            };
            batch.push((id, encode(&saga, input, &key, trace)?));
        }
        // Publish the whole batch, then wait for all confirms (pipelined; over RabbitMQ the
        // starts of one partition travel in bundles).
        let messages = batch
            .iter()
            .map(|(_, m)| (START_QUEUE.to_owned(), m.clone()))
            .collect();
        let confirms: Vec<Result<(), ClientError>> = match tokio::time::timeout(
            self.publish_timeout,
            self.transport.publish_batch(messages),
        )
        .await
        {
            Ok(results) => results
                .into_iter()
                .map(|r| r.map_err(ClientError::from))
                .collect(),
            Err(_) => batch
                .iter()
                .map(|(_, m)| {
                    Err(ClientError::PublishTimeout {
                        message: m.id.clone(),
                        after: self.publish_timeout,
                    })
                })
                .collect(),
        };
        let mut sent = Vec::with_capacity(batch.len());
        let mut first_error = None;
        for ((id, message), confirm) in batch.iter().zip(confirms) {
            match confirm {
                Ok(()) => sent.push(*id),
                Err(e) => {
                    // Not confirmed: the row stays unsent and goes again (the engine dedups).
                    warn!(message = %message.id, error = %e, "start not confirmed; will resend");
                    first_error.get_or_insert(e);
                }
            }
        }
        if !sent.is_empty() {
            sqlx::query(
                "UPDATE sagaflow_start_outbox SET sent_at = clock_timestamp() WHERE id = ANY($1)",
            )
            .bind(&sent)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        match first_error {
            Some(e) if sent.is_empty() => Err(e),
            _ => {
                debug!(sent = sent.len(), "relayed saga starts");
                Ok(sent.len())
            }
        }
    }

    /// Relays until `shutdown` turns true (or its sender is dropped): a round right after a full
    /// batch, otherwise every poll interval; failures are logged and retried with backoff.
    pub async fn run(&self, mut shutdown: watch::Receiver<bool>) {
        let mut failures = 0u32;
        while !*shutdown.borrow() {
            let wait = match self.relay_once().await {
                Ok(n) if n >= self.batch_size => {
                    failures = 0;
                    continue;
                }
                Ok(_) => {
                    failures = 0;
                    self.poll_interval
                }
                Err(e) => {
                    failures += 1;
                    warn!(error = %e, "start relay failed; retrying");
                    backoff(failures)
                }
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                changed = shutdown.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
            }
        }
    }

    /// Committed start requests not yet confirmed by the broker.
    pub async fn pending(&self) -> Result<u64, ClientError> {
        let (n,): (i64,) =
            sqlx::query_as("SELECT COUNT(*) FROM sagaflow_start_outbox WHERE sent_at IS NULL")
                .fetch_one(&self.pool)
                .await
                .map_err(db_error)?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Deletes rows sent more than `older_than` ago; returns how many. Harmless for correctness:
    /// a later [`start_saga`] with a purged key is relayed again and the engine finds the saga
    /// it already started for that key.
    pub async fn purge_sent(&self, older_than: Duration) -> Result<u64, ClientError> {
        let done = sqlx::query(
            "DELETE FROM sagaflow_start_outbox \
             WHERE sent_at < clock_timestamp() - make_interval(secs => $1)",
        )
        .bind(older_than.as_secs_f64())
        .execute(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(done.rows_affected())
    }
}

fn backoff(failures: u32) -> Duration {
    Duration::from_millis((50u64 << failures.min(7)).min(5_000))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn validation_says_what_is_wrong() {
        let input = json!({"order_id": "o-1"});
        assert!(validate("order-paid", &input, "o-1").is_ok());
        assert!(validate("order_paid_2", &input, "k").is_ok());
        for bad in ["", "order paid", "order.paid", "ordér", &"x".repeat(129)] {
            let e = validate(bad, &input, "k").unwrap_err();
            assert!(matches!(e, ClientError::InvalidSagaName(_)), "{bad}: {e}");
            assert!(e.to_string().contains("A–Z a–z 0–9 - _"), "{e}");
        }
        let e = validate("order-paid", &input, "").unwrap_err();
        assert!(matches!(e, ClientError::EmptyIdempotencyKey), "{e}");
        for bad in [json!(null), json!([1, 2]), json!("o-1"), json!(7)] {
            let e = validate("order-paid", &bad, "k").unwrap_err();
            assert!(
                e.to_string()
                    .starts_with("the input of saga `order-paid` must be a JSON object, got"),
                "{e}"
            );
        }
        let long = json!("é".repeat(100));
        let e = validate("order-paid", &long, "k").unwrap_err().to_string();
        assert!(e.ends_with('…') && e.len() < 200, "{e}");
    }

    #[test]
    fn the_message_is_a_start_msg_keyed_by_the_idempotency_key() {
        let input = json!({"order_id": "o-1", "points": 12});
        let m = start_message("order-paid", input.clone(), "o-1").unwrap();
        assert_eq!(m.id, "start/o-1");
        assert_eq!(m.key, "o-1");
        let decoded: StartMsg = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(
            decoded,
            StartMsg {
                saga: "order-paid".into(),
                input,
                idempotency_key: "o-1".into(),
                traceparent: None,
                tracestate: None,
            }
        );
    }

    #[test]
    fn a_start_carries_the_callers_traceparent_and_drops_a_malformed_one() {
        const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let input = json!({"order_id": "o-1"});
        let decode = |m: Message| serde_json::from_slice::<StartMsg>(&m.payload).unwrap();
        let traced = Start::new("order-paid", &input, "o-1").traceparent(TP);
        let m = traced.message().unwrap();
        assert_eq!((m.id.as_str(), m.key.as_str()), ("start/o-1", "o-1"));
        assert_eq!(decode(m).traceparent.as_deref(), Some(TP));
        let junk = Start::new("order-paid", &input, "o-1").traceparent("00-nonsense-01");
        assert_eq!(decode(junk.message().unwrap()).traceparent, None);
        // The tracestate goes beside a valid traceparent only, and only a valid one.
        let state = |start: Start| decode(start.message().unwrap()).tracestate;
        let with = Start::new("order-paid", &input, "o-1").traceparent(TP);
        assert_eq!(
            state(with.clone().tracestate("a=1,b=2")).as_deref(),
            Some("a=1,b=2")
        );
        assert_eq!(state(with.tracestate("no equals")), None);
        let alone = Start::new("order-paid", &input, "o-1").tracestate("a=1");
        assert_eq!(state(alone), None);
        let plain = Start::new("order-paid", &input, "o-1").message().unwrap();
        assert_eq!(
            plain,
            start_message("order-paid", input.clone(), "o-1").unwrap()
        );
        assert_eq!(decode(plain).traceparent, None);
    }

    #[test]
    fn install_sql_is_idempotent_ddl() {
        assert!(INSTALL_SQL.contains("CREATE TABLE IF NOT EXISTS sagaflow_start_outbox"));
        assert!(INSTALL_SQL.contains("idempotency_key TEXT NOT NULL UNIQUE"));
        assert!(INSTALL_SQL.contains("CREATE INDEX IF NOT EXISTS"));
        assert!(INSTALL_SQL.contains("ADD COLUMN IF NOT EXISTS traceparent TEXT"));
        assert!(INSTALL_SQL.contains("ADD COLUMN IF NOT EXISTS tracestate TEXT"));
        assert_eq!(OUTBOX_TABLE, "sagaflow_start_outbox");
    }
}

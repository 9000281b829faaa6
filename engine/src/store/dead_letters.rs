//! Dead letters kept in the engine's database, for an operator: every message of the
//! deployment that could never be handled (the engine's, the workers', and what the broker set
//! aside itself), with its reason, source queue and time, until it is replayed or purged.
//!
//! The engine moves them here from the transport's dead-letter queue
//! ([`crate::transport::Transport::consume_dead_letters`]) and acknowledges them after the
//! commit: a letter delivered twice has the same id and is kept once. A replay puts the
//! message back on its source queue through the outbox, in the transaction that deletes the
//! letter, so a replayed message is never lost and never sent twice by the engine.

use serde::{Deserialize, Serialize};
use sqlx::Row;
use sqlx::any::AnyRow;

use super::tx::{OutboxMessage, OutboxTable, StoreTx};
use super::{Store, StoreError};
use crate::transport::DeadLetter;

/// One kept dead letter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
pub struct DeadLetterRow {
    pub id: String,
    /// The logical queue it came from (`cmd.payment`, `reply`, `start`).
    pub queue: String,
    pub reason: String,
    /// When it was set aside (RFC 3339 in JSON).
    #[serde(with = "crate::time::rfc3339")]
    #[cfg_attr(feature = "http", schema(value_type = String, format = DateTime))]
    pub dead_at: i64,
    pub message_id: String,
    /// The message's ordering key (its saga's sequence key).
    pub message_key: String,
    /// The message as it was: UTF-8 text (JSON) for every message sagaflow writes.
    #[serde(with = "payload_text")]
    #[cfg_attr(feature = "http", schema(value_type = String))]
    pub payload: Vec<u8>,
}

/// Which dead letters to list: oldest first, `limit` at a time, after a previous page's last id.
#[derive(Debug, Clone, Default)]
pub struct DeadLetterQuery {
    pub queue: Option<String>,
    pub limit: usize,
    /// The last id of the previous page.
    pub after: Option<String>,
}

/// What a replay did with one letter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
pub struct Replayed {
    pub id: String,
    /// The queue it went back to, or `None` with `error` when it could not be replayed.
    pub queue: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

const COLUMNS: &str = "id, source_queue, reason, dead_at, message_id, message_key, payload";

fn row(r: &AnyRow) -> Result<DeadLetterRow, StoreError> {
    Ok(DeadLetterRow {
        id: r.try_get("id")?,
        queue: r.try_get("source_queue")?,
        reason: r.try_get("reason")?,
        dead_at: r.try_get("dead_at")?,
        message_id: r.try_get("message_id")?,
        message_key: r.try_get("message_key")?,
        payload: r.try_get("payload")?,
    })
}

impl Store {
    /// Keeps `letters` (a letter already kept, by id, is skipped); returns how many are new.
    pub async fn keep_dead_letters(&self, letters: &[DeadLetter]) -> Result<u64, StoreError> {
        if letters.is_empty() {
            return Ok(0);
        }
        let mut tx = self.pool.begin().await?;
        let mut new = 0;
        for l in letters {
            self.counters.statement();
            new += sqlx::query(
                "INSERT INTO dead_letters (id, source_queue, reason, dead_at, message_id, message_key, payload) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO NOTHING",
            )
            .bind(&l.id)
            .bind(&l.queue)
            .bind(&l.reason)
            .bind(l.at)
            .bind(&l.message.id)
            .bind(&l.message.key)
            .bind(l.message.payload.clone())
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
        self.counters.commit();
        tx.commit().await?;
        Ok(new)
    }

    /// A page of kept dead letters, oldest first.
    pub async fn dead_letters(
        &self,
        q: &DeadLetterQuery,
    ) -> Result<Vec<DeadLetterRow>, StoreError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM dead_letters \
             WHERE ($1 IS NULL OR source_queue = $1) \
             AND ($2 IS NULL OR (dead_at, id) > (SELECT dead_at, id FROM dead_letters WHERE id = $2)) \
             ORDER BY dead_at, id LIMIT $3"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(q.queue.as_deref())
            .bind(q.after.as_deref())
            .bind(i64::try_from(q.limit.max(1)).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(row).collect()
    }

    /// One kept dead letter.
    pub async fn dead_letter(&self, id: &str) -> Result<Option<DeadLetterRow>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM dead_letters WHERE id = $1");
        let r = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        r.as_ref().map(row).transpose()
    }

    /// How many dead letters are kept (the metrics' gauge).
    pub async fn dead_letter_count(&self) -> Result<i64, StoreError> {
        let r = sqlx::query("SELECT COUNT(*) AS n FROM dead_letters")
            .fetch_one(&self.pool)
            .await?;
        Ok(r.try_get("n")?)
    }

    /// Puts each letter's message back on its source queue (through the outbox, claimed by the
    /// next relay) and deletes the letter, in one transaction. An unknown id, or a message
    /// that is not text (the outbox holds text), is reported and left as it is.
    pub async fn replay_dead_letters(
        &self,
        ids: &[String],
        now: i64,
    ) -> Result<Vec<Replayed>, StoreError> {
        let mut tx = self.begin().await?;
        let mut report = Vec::with_capacity(ids.len());
        let mut outbox = Vec::new();
        for id in ids {
            let sql = format!("SELECT {COLUMNS} FROM dead_letters WHERE id = $1");
            let found = sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(id)
                .fetch_optional(tx.conn())
                .await?;
            let refused = |why: &str| Replayed {
                id: id.clone(),
                queue: None,
                error: Some(why.to_owned()),
            };
            let Some(found) = found.as_ref().map(row).transpose()? else {
                report.push(refused("no dead letter with this id"));
                continue;
            };
            let Ok(payload) = String::from_utf8(found.payload) else {
                report.push(refused(
                    "its message is not text, so it can never be handled; purge it",
                ));
                continue;
            };
            let deleted = sqlx::query("DELETE FROM dead_letters WHERE id = $1")
                .bind(id)
                .execute(tx.conn())
                .await?
                .rows_affected();
            if deleted == 0 {
                report.push(refused("replayed or purged meanwhile by someone else"));
                continue;
            }
            outbox.push(OutboxMessage {
                message_id: found.message_id,
                destination: found.queue.clone(),
                routing_key: found.message_key,
                payload,
                handed_off: false,
            });
            report.push(Replayed {
                id: id.clone(),
                queue: Some(found.queue),
                error: None,
            });
        }
        tx.enqueue_outbox(&outbox, now).await?;
        tx.commit().await?;
        Ok(report)
    }

    /// Deletes the given letters, or every letter (of `queue`, if given) when `ids` is None;
    /// returns how many went.
    pub async fn purge_dead_letters(
        &self,
        ids: Option<&[String]>,
        queue: Option<&str>,
    ) -> Result<u64, StoreError> {
        self.counters.statement();
        let n = match ids {
            Some(ids) => {
                let mut tx = self.pool.begin().await?;
                let mut n = 0;
                for id in ids {
                    n += sqlx::query("DELETE FROM dead_letters WHERE id = $1")
                        .bind(id)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                }
                tx.commit().await?;
                n
            }
            None => sqlx::query("DELETE FROM dead_letters WHERE ($1 IS NULL OR source_queue = $1)")
                .bind(queue)
                .execute(&self.pool)
                .await?
                .rows_affected(),
        };
        Ok(n)
    }
}

/// A payload as JSON text when it is UTF-8 (every message sagaflow writes), else as the
/// lossy text with a marker, for reading; never used to write a message back.
mod payload_text {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(p: &[u8], s: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(p) {
            Ok(text) => s.serialize_str(text),
            Err(_) => s.serialize_str(&format!(
                "(not text, {} bytes) {}",
                p.len(),
                String::from_utf8_lossy(p)
            )),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        Ok(String::deserialize(d)?.into_bytes())
    }
}

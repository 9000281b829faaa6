//! The outbox as the relay sees it: a queue of committed messages, claimed with a lease.
//!
//! A claim is one autocommitted statement that marks a batch of unsent rows as taken until
//! `lease_until` (on PostgreSQL with `FOR UPDATE SKIP LOCKED`, so several engines' relays take
//! disjoint batches). No transaction stays open while the broker confirms; a relay that dies
//! mid-batch leaves rows that any relay claims again once the lease has run out (the receivers
//! deduplicate what was sent twice).

use sqlx::Row;

use super::{Store, StoreError, json};
use crate::transport::Message;

/// An outbox row claimed for sending.
#[derive(Debug, Clone, PartialEq)]
pub struct Claimed {
    pub id: i64,
    pub destination: String,
    pub message: Message,
}

/// What the outbox holds right now (the metrics' gauges).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxStats {
    pub pending: i64,
    pub oldest: Option<i64>,
}

impl Store {
    /// Claims up to `limit` unsent rows whose lease (if any) ran out before `now`, leasing them
    /// until `now + lease_ms`; returns them in outbox order (the order they were written).
    pub async fn claim_outbox(
        &self,
        now: i64,
        lease_ms: i64,
        limit: usize,
    ) -> Result<Vec<Claimed>, StoreError> {
        self.counters.statement();
        self.counters.commit();
        let rows = sqlx::query(self.sql().claim_outbox)
            .bind(now + lease_ms)
            .bind(now)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.relay_pool)
            .await?;
        let mut claimed = rows
            .iter()
            .map(|r| {
                let payload: String = r.try_get("payload")?;
                Ok(Claimed {
                    id: r.try_get("id")?,
                    destination: r.try_get("destination")?,
                    message: Message {
                        id: r.try_get("message_id")?,
                        key: r.try_get("routing_key")?,
                        payload: payload.into_bytes(),
                    },
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        // RETURNING promises no order.
        claimed.sort_by_key(|c| c.id);
        Ok(claimed)
    }

    /// Marks rows sent (after the broker confirmed them).
    pub async fn mark_sent(&self, ids: &[i64], now: i64) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        self.counters.statement();
        self.counters.commit();
        sqlx::query(self.sql().mark_sent)
            .persistent(false)
            .bind(id_list(ids))
            .bind(now)
            .execute(&self.relay_pool)
            .await?;
        Ok(())
    }

    /// Gives claimed rows back at once (the broker did not confirm them), instead of letting
    /// their lease run out.
    pub async fn release_lease(&self, ids: &[i64]) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        self.counters.statement();
        self.counters.commit();
        sqlx::query(self.sql().release_lease)
            .persistent(false)
            .bind(id_list(ids))
            .execute(&self.relay_pool)
            .await?;
        Ok(())
    }

    /// Unsent rows and the oldest one's creation time.
    pub async fn outbox_stats(&self) -> Result<OutboxStats, StoreError> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS n, MIN(created_at) AS oldest FROM outbox WHERE sent_at IS NULL",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(OutboxStats {
            pending: row.try_get("n")?,
            oldest: row.try_get("oldest")?,
        })
    }

    /// Outbox rows (sent or not) written since `since`: the commands a run produced.
    pub async fn outbox_written_since(&self, since: i64) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query("SELECT COUNT(*) AS n FROM outbox WHERE created_at >= $1")
            .bind(since)
            .fetch_one(&self.pool)
            .await?
            .try_get("n")?;
        Ok(u64::try_from(n).unwrap_or(0))
    }
}

/// Ids as a JSON array of numbers: PostgreSQL's `json_array_elements_text` yields their text,
/// cast to bigint in the statement; SQLite's `json_each` yields integers.
fn id_list(ids: &[i64]) -> String {
    json(&ids)
}

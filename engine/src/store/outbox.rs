//! The outbox as the relay sees it: a queue of committed messages not yet confirmed by the
//! broker, claimed with a lease and deleted once confirmed.
//!
//! A claim is one autocommitted statement that marks a batch of rows as taken until
//! `lease_until` (on PostgreSQL with `FOR UPDATE SKIP LOCKED`, so several engines' relays take
//! disjoint batches). No transaction stays open while the broker confirms; a relay that dies
//! mid-batch leaves rows that any relay claims again once the lease has run out (the receivers
//! deduplicate what was sent twice).
//!
//! Most rows are never claimed: an engine whose relay runs hands the rows it commits to that
//! relay in memory ([`super::OutboxMessage::handed_off`], `lease_until` NULL), which publishes
//! and deletes them. A claim takes such a row only once it is older than [`HANDOFF_GRACE_MS`]:
//! its writer died before sending it.
//!
//! | `lease_until` | the row is |
//! |---|---|
//! | NULL | handed off by its writer; claimable after [`HANDOFF_GRACE_MS`] |
//! | 0, or in the past | free: the next claim takes it |
//! | in the future | claimed, being sent |

use sqlx::Row;

use super::sql::{Sql, rows_per_statement};
use super::{Store, StoreError};
use crate::transport::Message;

/// How long a handed-off row is left to its writer's relay before any relay claims it. Long
/// enough for a loaded relay to get to it (a row sent twice is only a duplicate, which the
/// receivers drop), short enough that a crashed engine's last commands wait seconds, not the
/// whole lease.
pub const HANDOFF_GRACE_MS: i64 = 5_000;

/// An outbox row to send: claimed, or handed off by the transaction that wrote it.
#[derive(Debug, Clone, PartialEq)]
pub struct Claimed {
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
    /// Claims up to `limit` rows whose lease (if any) ran out before `now`, leasing them
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
            .bind(now - HANDOFF_GRACE_MS)
            .fetch_all(&self.relay_pool)
            .await?;
        let mut claimed = rows
            .iter()
            .map(|r| {
                let payload: String = r.try_get("payload")?;
                let id: i64 = r.try_get("id")?;
                Ok((
                    id,
                    Claimed {
                        destination: r.try_get("destination")?,
                        message: Message {
                            id: r.try_get("message_id")?,
                            key: r.try_get("routing_key")?,
                            payload: payload.into_bytes(),
                        },
                    },
                ))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        // RETURNING promises no order.
        claimed.sort_by_key(|(id, _)| *id);
        Ok(claimed.into_iter().map(|(_, c)| c).collect())
    }

    /// Takes rows the broker confirmed out of the queue. (What was sent stays in each saga's
    /// history as its `dispatch` entries.) Rows are named by message id.
    pub async fn delete_sent(&self, ids: &[String]) -> Result<(), StoreError> {
        self.by_message_ids(Sql::delete_sent, ids).await
    }

    /// Gives claimed or handed-off rows (by message id) back at once: the broker did not confirm
    /// them, so the next claim takes them, instead of waiting for their lease or grace to run
    /// out.
    pub async fn release_lease(&self, ids: &[String]) -> Result<(), StoreError> {
        self.by_message_ids(Sql::release_lease, ids).await
    }

    /// One autocommitted statement per [`rows_per_statement`] ids (none for none), padded and
    /// kept prepared as the transactions' look-ups are.
    async fn by_message_ids(
        &self,
        text: fn(&Sql, usize) -> super::sql::Text,
        ids: &[String],
    ) -> Result<(), StoreError> {
        for chunk in ids.chunks(rows_per_statement(1)) {
            self.counters.statement();
            self.counters.commit();
            super::tx::in_list(self.sql(), self.keep_lookups, text, chunk)
                .execute(&self.relay_pool)
                .await?;
        }
        Ok(())
    }

    /// Unsent rows and the oldest one's creation time.
    pub async fn outbox_stats(&self) -> Result<OutboxStats, StoreError> {
        let row = sqlx::query("SELECT COUNT(*) AS n, MIN(created_at) AS oldest FROM outbox")
            .fetch_one(&self.pool)
            .await?;
        Ok(OutboxStats {
            pending: row.try_get("n")?,
            oldest: row.try_get("oldest")?,
        })
    }
}

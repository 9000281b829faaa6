//! Retention's side of the store: one batch of the purge of sagas finished long ago, in one
//! short transaction (the policy — what `keep` means, how often — is [`crate::retention`]'s).
//!
//! Saga ids are passed as one JSON parameter, as on the hot path, so each statement's text is
//! fixed. The outbox needs no purge: a row leaves it once the broker confirmed it
//! ([`super::outbox`]).

use sqlx::Row;

use super::{Store, StoreError, json};

/// What one purge batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PurgeReport {
    /// Sagas whose rows are now all gone (marked purged in this batch).
    pub sagas: u64,
    pub history: u64,
    pub timers: u64,
}

impl PurgeReport {
    /// Rows deleted, all tables together.
    pub fn rows(&self) -> u64 {
        self.history + self.timers
    }

    /// True when the batch found nothing to do.
    pub fn is_empty(&self) -> bool {
        self.rows() == 0 && self.sagas == 0
    }

    /// Adds another batch's counts to these.
    pub fn add(&mut self, other: &PurgeReport) {
        self.sagas += other.sagas;
        self.history += other.history;
        self.timers += other.timers;
    }
}

impl Store {
    /// Purges one batch, in one transaction: takes up to `sagas` of the oldest sagas not purged
    /// yet that are Completed or Compensated and finished before `cutoff`, deletes up to `rows`
    /// of their rows from each of `saga_timeline` and `timers`, and marks them purged at `now`
    /// once nothing of theirs is left (every table gave fewer than `rows`; otherwise the next
    /// batch takes the same sagas again). The report counts timeline lines, not rows. The `sagas` row stays. Running, compensating, queued
    /// and Failed sagas are never touched.
    pub async fn purge_finished(
        &self,
        cutoff: i64,
        now: i64,
        sagas: usize,
        rows: usize,
    ) -> Result<PurgeReport, StoreError> {
        let rows = rows.max(1);
        let limit = i64::try_from(rows).unwrap_or(i64::MAX);
        let sql = self.sql();
        let mut report = PurgeReport::default();

        let mut tx = self.pool.begin().await?;
        let candidates = sqlx::query(sql.purge_candidates)
            .bind(cutoff)
            .bind(i64::try_from(sagas.max(1)).unwrap_or(i64::MAX))
            .fetch_all(&mut *tx)
            .await?;
        let ids: Vec<String> = candidates
            .iter()
            .map(|r| r.try_get("id"))
            .collect::<Result<_, _>>()?;
        if ids.is_empty() {
            return Ok(report);
        }
        let ids = json(&ids);

        // The timeline's rows are a batch's lines each: the report counts lines, the limit rows.
        let timeline = sqlx::query(sql.purge_history)
            .bind(limit)
            .bind(ids.as_str())
            .fetch_all(&mut *tx)
            .await?;
        for row in &timeline {
            let lines: i64 = row.try_get("n")?;
            report.history += u64::try_from(lines).unwrap_or(0);
        }
        report.timers = sqlx::query(sql.purge_timers)
            .bind(limit)
            .bind(ids.as_str())
            .execute(&mut *tx)
            .await?
            .rows_affected();

        if timeline.len() < rows && report.timers < rows as u64 {
            report.sagas = sqlx::query(sql.mark_purged)
                .bind(now)
                .bind(cutoff)
                .bind(ids.as_str())
                .execute(&mut *tx)
                .await?
                .rows_affected();
        }
        tx.commit().await?;
        Ok(report)
    }
}

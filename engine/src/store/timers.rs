//! The timers as the timer loop sees them: a queue ordered by due time.

use sqlx::Row;

use super::{Store, StoreError};
use crate::machine::Event;

/// A timer row read by the timer loop.
#[derive(Debug, Clone, PartialEq)]
pub struct DueTimer {
    pub id: String,
    pub saga_id: String,
    pub due_at: i64,
    /// None when the row does not decode (it is claimed and dropped, with a warning).
    pub event: Option<Event>,
}

impl Store {
    /// The `limit` earliest timers, due or not (one statement: the loop fires the due ones and
    /// sleeps until the first that is not).
    pub async fn next_timers(&self, limit: usize) -> Result<Vec<DueTimer>, StoreError> {
        self.counters.statement();
        let rows = sqlx::query(self.sql().next_timers)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                let text: String = r.try_get("event")?;
                Ok(DueTimer {
                    id: r.try_get("id")?,
                    saga_id: r.try_get("saga_id")?,
                    due_at: r.try_get("due_at")?,
                    event: serde_json::from_str(&text).ok(),
                })
            })
            .collect()
    }
}

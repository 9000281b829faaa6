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

/// What the timer loop sees in one look: the due timers, and when the next one is due.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DueTimers {
    /// Due now, earliest first (at most the limit asked for).
    pub due: Vec<DueTimer>,
    /// When the earliest timer that is not due yet is due, if there is one.
    pub next_at: Option<i64>,
}

impl Store {
    /// The `limit` earliest timers, due or not (for looking at them: the timer loop reads
    /// [`Store::due_timers`]).
    pub async fn next_timers(&self, limit: usize) -> Result<Vec<DueTimer>, StoreError> {
        self.counters.statement();
        let rows = sqlx::query(self.sql().next_timers)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(timer_from_row).collect()
    }

    /// The timers due at `now` (at most `limit`, earliest first) and when the next one is due,
    /// in one statement. Only the due timers' events are decoded: the loop looks often, and
    /// most of the timers it would otherwise read are step timeouts far ahead.
    pub async fn due_timers(&self, now: i64, limit: usize) -> Result<DueTimers, StoreError> {
        self.counters.statement();
        let rows = sqlx::query(self.sql().due_timers)
            .bind(now)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await?;
        let mut found = DueTimers::default();
        for r in &rows {
            let due_at: i64 = r.try_get("due_at")?;
            if due_at > now {
                found.next_at = Some(found.next_at.map_or(due_at, |n: i64| n.min(due_at)));
                continue;
            }
            found.due.push(timer_from_row(r)?);
        }
        // A UNION ALL promises no order: the due ones are put back in theirs.
        found.due.sort_by_key(|t| t.due_at);
        Ok(found)
    }
}

/// A timer row; its event is None when it does not decode (the loop claims and drops it).
fn timer_from_row(r: &sqlx::any::AnyRow) -> Result<DueTimer, StoreError> {
    let text: String = r.try_get("event")?;
    Ok(DueTimer {
        id: r.try_get("id")?,
        saga_id: r.try_get("saga_id")?,
        due_at: r.try_get("due_at")?,
        event: serde_json::from_str(&text).ok(),
    })
}

//! The read side: what `sagaflow status` and `list`, the HTTP API and the CLI's summaries read.
//!
//! Plain autocommitted reads on the pool, one statement each; the texts are the same on both
//! dialects. They are not counted in [`super::Counters`] (which count the engine's work per
//! saga, not what an operator or a progress poll reads). The types here are the rows as read;
//! [`crate::status`] turns them into what operators see (compiled steps, pages with cursors).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sqlx::Row;
use sqlx::any::AnyRow;

use super::{Store, StoreError};
use crate::machine::{Millis, SagaState};

/// One saga with the definition it is pinned to, as stored.
#[derive(Debug, Clone)]
pub struct SagaRecord {
    pub id: String,
    pub name: String,
    pub definition_hash: String,
    pub sequence_key: String,
    pub state: SagaState,
    pub idempotency_key: Option<String>,
    pub created_at: Millis,
    pub updated_at: Millis,
    pub finished_at: Option<Millis>,
    /// `None` when the definition row is missing.
    pub definition_version: Option<i64>,
    pub definition_source: Option<String>,
}

/// What a start answers about the saga it started: its name, status column and definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SagaHeader {
    pub name: String,
    /// The `status` column: one of [`crate::machine::SagaStatus::NAMES`].
    pub status: String,
    pub definition_hash: String,
    /// `None` when the definition row is missing.
    pub definition_version: Option<i64>,
}

/// One line of a saga's timeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
pub struct TimelineRow {
    #[serde(with = "crate::time::rfc3339")]
    #[cfg_attr(feature = "http", schema(value_type = String, format = DateTime))]
    pub at: Millis,
    pub kind: String,
    pub step: Option<String>,
    pub detail: String,
}

/// The newest part of a saga's timeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timeline {
    /// Oldest first.
    pub rows: Vec<TimelineRow>,
    /// Rows the saga has in all (`rows` holds at most the limit asked for).
    pub total: u64,
}

/// One line of `sagaflow list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
pub struct SagaSummary {
    pub id: String,
    pub name: String,
    pub state: String,
    pub sequence_key: String,
    #[serde(with = "crate::time::rfc3339")]
    #[cfg_attr(feature = "http", schema(value_type = String, format = DateTime))]
    pub created_at: Millis,
    #[serde(with = "crate::time::rfc3339")]
    #[cfg_attr(feature = "http", schema(value_type = String, format = DateTime))]
    pub updated_at: Millis,
    #[serde(with = "crate::time::rfc3339_opt")]
    #[cfg_attr(feature = "http", schema(value_type = Option<String>, format = DateTime))]
    pub finished_at: Option<Millis>,
}

/// Which sagas [`SagaQueries::list_sagas`] reads, newest first (`created_at`, then `id`,
/// descending).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SagaFilter {
    /// The `status` column: one of [`crate::machine::SagaStatus::NAMES`].
    pub status: Option<String>,
    pub sequence_key: Option<String>,
    /// The definition's name.
    pub name: Option<String>,
    /// Only sagas created at or after this time.
    pub created_from: Option<Millis>,
    /// Only sagas created before this time.
    pub created_before: Option<Millis>,
    /// Keyset paging: only sagas listed after this `(created_at, id)`.
    pub after: Option<(Millis, String)>,
}

/// Start-to-final latencies of the sagas created since some time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Latencies {
    /// Sagas created since then that are final.
    pub finished: u64,
    /// The latency (ms) at each quantile asked for (nearest rank); `None` when none finished.
    pub at: Vec<Option<i64>>,
}

/// The sagas as operators and tools read them. Reading an unknown id is not an error: `None`
/// (or nothing). A row that does not decode is [`StoreError::Corrupt`], naming the saga.
#[allow(async_fn_in_trait)]
pub trait SagaQueries {
    /// The saga and its definition (version and source), or `None`.
    async fn saga_record(&self, id: &str) -> Result<Option<SagaRecord>, StoreError>;
    /// Name, status column and definition of a saga, without decoding its state.
    async fn saga_header(&self, id: &str) -> Result<Option<SagaHeader>, StoreError>;
    /// The saga's state (its status with its reason, steps, pause), or `None`.
    async fn saga_state(&self, id: &str) -> Result<Option<SagaState>, StoreError>;
    /// The newest `limit` timeline rows (oldest first) and how many there are in all.
    async fn timeline(&self, id: &str, limit: usize) -> Result<Timeline, StoreError>;
    /// The newest timeline row of this kind.
    async fn last_history(&self, id: &str, kind: &str) -> Result<Option<TimelineRow>, StoreError>;
    /// The sagas that wait for the sequence key this saga holds, in the order they will run
    /// (empty when it holds none).
    async fn waiting_behind(&self, id: &str) -> Result<Vec<String>, StoreError>;
    /// At most `limit` sagas matching `filter`, newest first.
    async fn list_sagas(
        &self,
        filter: &SagaFilter,
        limit: usize,
    ) -> Result<Vec<SagaSummary>, StoreError>;
    /// The names of the registered definitions, sorted, at most `limit`.
    async fn definition_names(&self, limit: usize) -> Result<Vec<String>, StoreError>;
}

/// Counts over all sagas, for `sagaflow dev` and `bench`: each one statement (the latencies
/// one per quantile), computed by the database so that nothing per saga is held.
#[allow(async_fn_in_trait)]
pub trait SagaCounts {
    /// Sagas by status column, of all sagas or of those created since `since`.
    async fn status_counts(
        &self,
        since: Option<Millis>,
    ) -> Result<BTreeMap<String, u64>, StoreError>;
    /// Sagas not final yet.
    async fn unfinished_count(&self) -> Result<u64, StoreError>;
    /// Which of `ids` are final now (unknown ids are not). One statement of primary-key
    /// lookups: it costs the ids asked about, never the sagas that ran before or the dead rows
    /// their updates left (a count over the index of unfinished sagas walks every one of them
    /// until a vacuum, and a bitmap scan never marks them dead).
    async fn finished_among(&self, ids: &[String]) -> Result<Vec<String>, StoreError>;
    /// Start-to-final latencies at `quantiles` (0.0 ..= 1.0) among the sagas created since
    /// `since`; portable (SQLite has no `percentile_disc`).
    async fn latencies(&self, since: Millis, quantiles: &[f64]) -> Result<Latencies, StoreError>;
    /// Per minute since `since` (oldest first, only minutes with something in them): sagas
    /// started, and sagas finished by final state. Two statements.
    async fn per_minute(&self, since: Millis) -> Result<Vec<Minute>, StoreError>;
}

/// What one minute saw: see [`SagaCounts::per_minute`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
pub struct Minute {
    /// The minute's start.
    #[serde(with = "crate::time::rfc3339")]
    #[cfg_attr(feature = "http", schema(value_type = String, format = DateTime))]
    pub at: Millis,
    pub started: u64,
    /// By the state they ended in (`completed`, `compensated`, `failed`).
    pub finished: BTreeMap<String, u64>,
}

fn limit_param(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

fn count_of(row: &AnyRow, column: &str) -> Result<u64, StoreError> {
    let n: i64 = row.try_get(column)?;
    Ok(u64::try_from(n).unwrap_or(0))
}

/// A saga's `state` column, decoded.
pub(super) fn decode_state(id: &str, text: &str) -> Result<SagaState, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt {
        table: "sagas",
        detail: format!("saga {id}: state is not valid JSON: {e}"),
    })
}

fn timeline_row(r: &AnyRow) -> Result<TimelineRow, StoreError> {
    Ok(TimelineRow {
        at: r.try_get("at")?,
        kind: r.try_get("kind")?,
        step: r.try_get("step")?,
        detail: r.try_get("detail")?,
    })
}

/// The text of a list statement: constant fragments and numbered placeholders only (the values
/// are bound by [`SagaQueries::list_sagas`] in the same order), so that each filter combination
/// keeps an index-friendly statement of its own.
fn list_sql(filter: &SagaFilter) -> String {
    let mut sql = String::from(
        "SELECT id, name, status, sequence_key, created_at, updated_at, finished_at FROM sagas WHERE 1 = 1",
    );
    let mut n = 0;
    let mut next_param = || {
        n += 1;
        format!("${n}")
    };
    if filter.status.is_some() {
        sql += &format!(" AND status = {}", next_param());
    }
    if filter.sequence_key.is_some() {
        sql += &format!(" AND sequence_key = {}", next_param());
    }
    if filter.name.is_some() {
        sql += &format!(" AND name = {}", next_param());
    }
    if filter.created_from.is_some() {
        sql += &format!(" AND created_at >= {}", next_param());
    }
    if filter.created_before.is_some() {
        sql += &format!(" AND created_at < {}", next_param());
    }
    if filter.after.is_some() {
        let (c, i, c2) = (next_param(), next_param(), next_param());
        sql += &format!(" AND (created_at < {c} OR (created_at = {c2} AND id < {i}))");
    }
    sql += &format!(" ORDER BY created_at DESC, id DESC LIMIT {}", next_param());
    sql
}

impl SagaQueries for Store {
    async fn saga_record(&self, id: &str) -> Result<Option<SagaRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT s.id, s.name, s.definition_hash, s.sequence_key, s.state, s.idempotency_key, \
             s.created_at, s.updated_at, s.finished_at, d.version, d.source \
             FROM sagas s LEFT JOIN saga_definitions d ON d.hash = s.definition_hash WHERE s.id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let state_text: String = row.try_get("state")?;
        Ok(Some(SagaRecord {
            state: decode_state(id, &state_text)?,
            id: row.try_get("id")?,
            name: row.try_get("name")?,
            definition_hash: row.try_get("definition_hash")?,
            sequence_key: row.try_get("sequence_key")?,
            idempotency_key: row.try_get("idempotency_key")?,
            created_at: row.try_get("created_at")?,
            updated_at: row.try_get("updated_at")?,
            finished_at: row.try_get("finished_at")?,
            definition_version: row.try_get("version")?,
            definition_source: row.try_get("source")?,
        }))
    }

    async fn saga_header(&self, id: &str) -> Result<Option<SagaHeader>, StoreError> {
        let row = sqlx::query(
            "SELECT s.name, s.status, s.definition_hash, d.version FROM sagas s \
             LEFT JOIN saga_definitions d ON d.hash = s.definition_hash WHERE s.id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        Ok(Some(SagaHeader {
            name: row.try_get("name")?,
            status: row.try_get("status")?,
            definition_hash: row.try_get("definition_hash")?,
            definition_version: row.try_get("version")?,
        }))
    }

    async fn saga_state(&self, id: &str) -> Result<Option<SagaState>, StoreError> {
        let row = sqlx::query("SELECT state FROM sagas WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let text: String = row.try_get("state")?;
        Ok(Some(decode_state(id, &text)?))
    }

    async fn timeline(&self, id: &str, limit: usize) -> Result<Timeline, StoreError> {
        let total = sqlx::query("SELECT COUNT(*) AS n FROM saga_history WHERE saga_id = $1")
            .bind(id)
            .fetch_one(&self.pool)
            .await?;
        let total = count_of(&total, "n")?;
        let rows = sqlx::query(
            "SELECT at, kind, step, detail FROM saga_history WHERE saga_id = $1 ORDER BY id DESC LIMIT $2",
        )
        .bind(id)
        .bind(limit_param(limit))
        .fetch_all(&self.pool)
        .await?;
        let mut rows = rows
            .iter()
            .map(timeline_row)
            .collect::<Result<Vec<_>, _>>()?;
        rows.reverse();
        Ok(Timeline { rows, total })
    }

    async fn last_history(&self, id: &str, kind: &str) -> Result<Option<TimelineRow>, StoreError> {
        let row = sqlx::query(
            "SELECT at, kind, step, detail FROM saga_history WHERE saga_id = $1 AND kind = $2 ORDER BY id DESC LIMIT 1",
        )
        .bind(id)
        .bind(kind)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(timeline_row).transpose()
    }

    async fn waiting_behind(&self, id: &str) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query(
            "SELECT q.saga_id FROM sequence_keys k JOIN sequence_queue q ON q.seq_key = k.seq_key \
             WHERE k.holder = $1 ORDER BY q.position",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| r.try_get("saga_id"))
            .collect::<Result<_, _>>()?)
    }

    async fn list_sagas(
        &self,
        filter: &SagaFilter,
        limit: usize,
    ) -> Result<Vec<SagaSummary>, StoreError> {
        // Safe: the text is built from constant fragments and placeholders only; values are bound.
        let mut q = sqlx::query(sqlx::AssertSqlSafe(list_sql(filter)));
        if let Some(s) = &filter.status {
            q = q.bind(s.as_str());
        }
        if let Some(k) = &filter.sequence_key {
            q = q.bind(k.as_str());
        }
        if let Some(n) = &filter.name {
            q = q.bind(n.as_str());
        }
        if let Some(t) = filter.created_from {
            q = q.bind(t);
        }
        if let Some(t) = filter.created_before {
            q = q.bind(t);
        }
        if let Some((created, id)) = &filter.after {
            q = q.bind(*created).bind(id.as_str()).bind(*created);
        }
        let rows = q.bind(limit_param(limit)).fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| {
                Ok(SagaSummary {
                    id: r.try_get("id")?,
                    name: r.try_get("name")?,
                    state: r.try_get("status")?,
                    sequence_key: r.try_get("sequence_key")?,
                    created_at: r.try_get("created_at")?,
                    updated_at: r.try_get("updated_at")?,
                    finished_at: r.try_get("finished_at")?,
                })
            })
            .collect()
    }

    async fn definition_names(&self, limit: usize) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query("SELECT DISTINCT name FROM saga_definitions ORDER BY name LIMIT $1")
            .bind(limit_param(limit))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| Ok(r.try_get("name")?)).collect()
    }
}

impl SagaCounts for Store {
    async fn status_counts(
        &self,
        since: Option<Millis>,
    ) -> Result<BTreeMap<String, u64>, StoreError> {
        let rows = match since {
            Some(since) => sqlx::query(
                "SELECT status, COUNT(*) AS n FROM sagas WHERE created_at >= $1 GROUP BY status",
            )
            .bind(since)
            .fetch_all(&self.pool)
            .await?,
            None => {
                sqlx::query("SELECT status, COUNT(*) AS n FROM sagas GROUP BY status")
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        rows.iter()
            .map(|r| Ok((r.try_get("status")?, count_of(r, "n")?)))
            .collect()
    }

    async fn unfinished_count(&self) -> Result<u64, StoreError> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM sagas WHERE finished_at IS NULL")
            .fetch_one(&self.pool)
            .await?;
        count_of(&row, "n")
    }

    async fn finished_among(&self, ids: &[String]) -> Result<Vec<String>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let sql = if self.sql().postgres {
            "SELECT id FROM sagas WHERE id = ANY(ARRAY(SELECT json_array_elements_text($1::json))) \
             AND finished_at IS NOT NULL"
        } else {
            "SELECT id FROM sagas WHERE id IN (SELECT value FROM json_each($1)) \
             AND finished_at IS NOT NULL"
        };
        let rows = sqlx::query(sql)
            .bind(super::json(&ids))
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok(r.try_get::<String, _>("id")?))
            .collect()
    }

    async fn latencies(&self, since: Millis, quantiles: &[f64]) -> Result<Latencies, StoreError> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS n FROM sagas WHERE created_at >= $1 AND finished_at IS NOT NULL",
        )
        .bind(since)
        .fetch_one(&self.pool)
        .await?;
        let finished = count_of(&row, "n")?;
        let mut at = Vec::with_capacity(quantiles.len());
        for &p in quantiles {
            if finished == 0 {
                at.push(None);
                continue;
            }
            // Nearest rank; a quantile outside 0..=1 (or NaN) is held to the range.
            let p = if p.is_nan() { 0.0 } else { p.clamp(0.0, 1.0) };
            let offset = ((finished as f64 - 1.0) * p).round() as i64;
            let row = sqlx::query(
                "SELECT finished_at - created_at AS ms FROM sagas \
                 WHERE created_at >= $1 AND finished_at IS NOT NULL ORDER BY ms LIMIT 1 OFFSET $2",
            )
            .bind(since)
            .bind(offset)
            .fetch_optional(&self.pool)
            .await?;
            at.push(row.map(|r| r.try_get("ms")).transpose()?);
        }
        Ok(Latencies { finished, at })
    }

    async fn per_minute(&self, since: Millis) -> Result<Vec<Minute>, StoreError> {
        let started = sqlx::query(
            "SELECT created_at / 60000 AS m, COUNT(*) AS n FROM sagas WHERE created_at >= $1 GROUP BY created_at / 60000",
        )
        .bind(since)
        .fetch_all(&self.pool)
        .await?;
        let finished = sqlx::query(
            "SELECT finished_at / 60000 AS m, status, COUNT(*) AS n FROM sagas WHERE finished_at >= $1 GROUP BY finished_at / 60000, status",
        )
        .bind(since)
        .fetch_all(&self.pool)
        .await?;
        let mut out: BTreeMap<i64, Minute> = BTreeMap::new();
        fn minute(out: &mut BTreeMap<i64, Minute>, m: i64) -> &mut Minute {
            out.entry(m).or_insert_with(|| Minute {
                at: m * 60_000,
                ..Minute::default()
            })
        }
        for r in &started {
            minute(&mut out, r.try_get("m")?).started = count_of(r, "n")?;
        }
        for r in &finished {
            let status: String = r.try_get("status")?;
            minute(&mut out, r.try_get("m")?)
                .finished
                .insert(status, count_of(r, "n")?);
        }
        Ok(out.into_values().collect())
    }
}

impl Store {
    /// Commands dispatched since `since` (their `dispatch` history entries, since a sent row
    /// leaves the outbox): the commands a run produced.
    pub async fn dispatched_since(&self, since: i64) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query(
            "SELECT COUNT(*) AS n FROM saga_history WHERE kind = 'dispatch' AND at >= $1",
        )
        .bind(since)
        .fetch_one(&self.pool)
        .await?
        .try_get("n")?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// The `dispatch` and `succeeded` history lines written since `since`, as
    /// `(saga id, kind, step, at, detail)`: what `sagaflow bench` times each exchange by.
    pub async fn exchange_lines_since(
        &self,
        since: i64,
    ) -> Result<Vec<(String, String, String, i64, String)>, StoreError> {
        let rows = sqlx::query(
            "SELECT saga_id, kind, step, at, detail FROM saga_history \
             WHERE at >= $1 AND kind IN ('dispatch', 'succeeded')",
        )
        .bind(since)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get("saga_id")?,
                    r.try_get("kind")?,
                    r.try_get::<Option<String>, _>("step")?.unwrap_or_default(),
                    r.try_get("at")?,
                    r.try_get::<Option<String>, _>("detail")?
                        .unwrap_or_default(),
                ))
            })
            .collect()
    }

    /// The database answers a trivial query (`/healthz`).
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").fetch_one(&self.pool).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_statements_number_their_placeholders_in_bind_order() {
        assert_eq!(
            list_sql(&SagaFilter::default()),
            "SELECT id, name, status, sequence_key, created_at, updated_at, finished_at FROM sagas \
             WHERE 1 = 1 ORDER BY created_at DESC, id DESC LIMIT $1"
        );
        let all = SagaFilter {
            status: Some("running".into()),
            sequence_key: Some("k".into()),
            name: Some("order-paid".into()),
            created_from: Some(1),
            created_before: Some(9),
            after: Some((5, "id".into())),
        };
        assert!(list_sql(&all).ends_with(
            "WHERE 1 = 1 AND status = $1 AND sequence_key = $2 AND name = $3 \
             AND created_at >= $4 AND created_at < $5 \
             AND (created_at < $6 OR (created_at = $8 AND id < $7)) \
             ORDER BY created_at DESC, id DESC LIMIT $9"
        ));
    }
}

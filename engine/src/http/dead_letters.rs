//! The dead-letter routes of the HTTP API (see [`crate::store::dead_letters`]).
//!
//! | method and path | what | success |
//! |---|---|---|
//! | `GET /dead-letters?queue=&limit=&after=` | kept dead letters, oldest first, paged | 200 `{"dead_letters": […], "next": ID or null}` |
//! | `GET /dead-letters/{id}` | one letter: reason, source queue, time, message | 200 |
//! | `POST /dead-letters/replay` | put letters back on their source queue; body `{"ids": […]}` or `{"all": true, "queue": Q?}` | 200 `{"replayed": [{"id", "queue"} or {"id", "error"}]}` |
//! | `POST /dead-letters/purge` | delete letters; body `{"ids": […]}` or `{"all": true, "queue": Q?}` | 200 `{"purged": N}` |

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{ApiError, ApiResult, DEFAULT_LIMIT, ErrorBody, MAX_LIMIT, json_body};
use crate::engine::{Engine, EngineError};
use crate::store::dead_letters::{DeadLetterQuery, DeadLetterRow, Replayed};
use crate::store::now_ms;

/// One page of `GET /dead-letters`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DeadLetterPage {
    pub dead_letters: Vec<DeadLetterRow>,
    /// Pass as `after` for the next page; `null` on the last page.
    pub next: Option<String>,
}

/// Which letters a replay or purge takes: listed ids (`{"ids": […]}`), or all of them, of one
/// source queue if `queue` is given (`{"all": true, "queue": …}`).
#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Selection {
    /// These letters (at least one); not with `all` or `queue`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ids: Option<Vec<String>>,
    /// Every letter (of `queue`, if given); not with `ids`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub all: bool,
    /// With `all`: only the letters of this source queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
}

/// What `POST /dead-letters/replay` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ReplayResponse {
    /// Per letter, the queue it went back to, or why it could not.
    pub replayed: Vec<Replayed>,
}

/// What `POST /dead-letters/purge` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PurgeResponse {
    /// How many letters were deleted.
    pub purged: u64,
}

const SELECTION: &str = r#"{"ids": ["…"]} or {"all": true, "queue": "…" (optional)}"#;

impl Selection {
    fn check(&self) -> Result<(), ApiError> {
        match (&self.ids, self.all) {
            (Some(ids), false) if !ids.is_empty() => {
                if self.queue.is_some() {
                    return Err(ApiError::bad_request(
                        "`queue` narrows `all`; with `ids` leave it out",
                    ));
                }
                Ok(())
            }
            (None, true) => Ok(()),
            _ => Err(ApiError::bad_request(format!(
                "say which dead letters: {SELECTION}"
            ))),
        }
    }
}

/// List dead letters
///
/// The deployment's kept dead letters, oldest first, `limit` at a time; pass a page's `next`
/// as `after` for the next page.
#[utoipa::path(
    get,
    path = "/dead-letters",
    tag = "dead letters",
    operation_id = "list_dead_letters",
    params(
        ("queue" = Option<String>, Query, description = "Only letters from this source queue (`cmd.payment`, `reply`, `start`, …)"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 1000, description = "Letters per page, 1 to 1000 (default 50)"),
        ("after" = Option<String>, Query, description = "The `next` of the previous page"),
    ),
    responses(
        (status = 200, description = "One page of dead letters", body = DeadLetterPage),
        (status = 400, description = "An unknown or invalid query parameter", body = ErrorBody),
        (status = 500, description = "The database failed", body = ErrorBody),
    )
)]
pub(super) async fn list(
    State(engine): State<Arc<Engine>>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> ApiResult {
    let Query(params) = query.map_err(|r| {
        ApiError::bad_request(format!("unreadable query string: {}", r.body_text()))
    })?;
    let mut q = DeadLetterQuery {
        limit: DEFAULT_LIMIT as usize,
        ..DeadLetterQuery::default()
    };
    for (name, value) in params {
        match name.as_str() {
            "queue" => q.queue = Some(value),
            "after" => q.after = Some(value),
            "limit" => {
                q.limit = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_LIMIT as usize).contains(n))
                    .ok_or_else(|| {
                        ApiError::bad_request(format!(
                            "`limit` must be a whole number from 1 to {MAX_LIMIT}, got `{value}`"
                        ))
                    })?;
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter `{other}`; /dead-letters takes queue, limit and after"
                )));
            }
        }
    }
    Ok(axum::Json(page(&engine, &q).await?).into_response())
}

/// A page, with the cursor of the next one.
pub async fn page(engine: &Engine, q: &DeadLetterQuery) -> Result<DeadLetterPage, EngineError> {
    let mut ask = q.clone();
    ask.limit = q.limit + 1;
    let mut rows = engine.store().dead_letters(&ask).await?;
    let next = if rows.len() > q.limit {
        rows.truncate(q.limit);
        rows.last().map(|r| r.id.clone())
    } else {
        None
    };
    Ok(DeadLetterPage {
        dead_letters: rows,
        next,
    })
}

/// One dead letter
///
/// Its reason, source queue, time and message.
#[utoipa::path(
    get,
    path = "/dead-letters/{id}",
    tag = "dead letters",
    operation_id = "show_dead_letter",
    params(("id" = String, Path, description = "The letter's id")),
    responses(
        (status = 200, description = "The letter", body = DeadLetterRow),
        (status = 400, description = "The id in the path does not decode", body = ErrorBody),
        (status = 404, description = "No dead letter with that id", body = ErrorBody),
        (status = 500, description = "The database failed", body = ErrorBody),
    )
)]
pub(super) async fn show(
    State(engine): State<Arc<Engine>>,
    id: Result<Path<String>, PathRejection>,
) -> ApiResult {
    let Path(id) = id.map_err(|r| {
        ApiError::bad_request(format!("unreadable id in the path: {}", r.body_text()))
    })?;
    match engine
        .store()
        .dead_letter(&id)
        .await
        .map_err(EngineError::from)?
    {
        Some(row) => Ok(axum::Json(row).into_response()),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no dead letter with id {id}"),
        )),
    }
}

/// Every id the selection names (all pages, for `all`).
pub async fn selected(engine: &Engine, s: &Selection) -> Result<Vec<String>, EngineError> {
    if let Some(ids) = &s.ids {
        return Ok(ids.clone());
    }
    let mut q = DeadLetterQuery {
        queue: s.queue.clone(),
        limit: 1000,
        after: None,
    };
    let mut ids = Vec::new();
    loop {
        let rows = engine.store().dead_letters(&q).await?;
        let Some(last) = rows.last() else { break };
        q.after = Some(last.id.clone());
        let full = rows.len() == q.limit;
        ids.extend(rows.into_iter().map(|r| r.id));
        if !full {
            break;
        }
    }
    Ok(ids)
}

/// Replay dead letters
///
/// Puts the letters back on their source queue, through the outbox, in the transaction that
/// deletes them.
#[utoipa::path(
    post,
    path = "/dead-letters/replay",
    tag = "dead letters",
    operation_id = "replay_dead_letters",
    request_body(content = Selection, content_type = "application/json"),
    responses(
        (status = 200, description = "What became of each letter", body = ReplayResponse),
        (status = 400, description = "No body, or one that does not say which letters", body = ErrorBody),
        (status = 500, description = "The database failed", body = ErrorBody),
    )
)]
pub(super) async fn replay(
    State(engine): State<Arc<Engine>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let s: Selection = json_body(&headers, &body?, SELECTION)?;
    s.check()?;
    let ids = selected(&engine, &s).await?;
    let mut replayed = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(500) {
        replayed.extend(
            engine
                .store()
                .replay_dead_letters(chunk, now_ms())
                .await
                .map_err(EngineError::from)?,
        );
    }
    Ok(axum::Json(ReplayResponse { replayed }).into_response())
}

/// Purge dead letters
///
/// Deletes the letters for good.
#[utoipa::path(
    post,
    path = "/dead-letters/purge",
    tag = "dead letters",
    operation_id = "purge_dead_letters",
    request_body(content = Selection, content_type = "application/json"),
    responses(
        (status = 200, description = "How many were deleted", body = PurgeResponse),
        (status = 400, description = "No body, or one that does not say which letters", body = ErrorBody),
        (status = 500, description = "The database failed", body = ErrorBody),
    )
)]
pub(super) async fn purge(
    State(engine): State<Arc<Engine>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let s: Selection = json_body(&headers, &body?, SELECTION)?;
    s.check()?;
    let purged = engine
        .store()
        .purge_dead_letters(s.ids.as_deref(), s.queue.as_deref())
        .await
        .map_err(EngineError::from)?;
    Ok(axum::Json(PurgeResponse { purged }).into_response())
}

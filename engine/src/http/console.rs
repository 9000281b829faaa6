//! The web console, served by the engine at `/`: one HTML page, one script and one stylesheet,
//! embedded in the binary (nothing is fetched from elsewhere, no build step). The page reads and
//! acts through the JSON API the CLI uses, and draws a saga's graph from
//! `GET /sagas/{id}/graph?format=svg`, so whatever the console can do, a script can too.
//!
//! | method and path | what | success |
//! |---|---|---|
//! | `GET /` | the console (pages: sagas, one saga, dead letters, dashboard) | 200 HTML |
//! | `GET /console/app.js`, `GET /console/app.css` | its script and style | 200 |
//! | `GET /stats?minutes=N` | the dashboard's figures: sagas by state, per minute of the last N (default 60, at most 1440; 0: counts only) started and finished by outcome, start-to-final latency percentiles of the sagas started in that window, outbox backlog and lag, dead letters kept, definition names | 200 JSON |
//!
//! The console has no login of its own, like the rest of the API: serve it on a private
//! address or behind the proxy that guards the API.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{ApiError, ApiResult, ErrorBody};
use crate::engine::{Engine, EngineError};
use crate::store::{Minute, SagaCounts, SagaQueries, now_ms};

const INDEX: &str = include_str!("console/index.html");
const APP_JS: &str = include_str!("console/app.js");
const APP_CSS: &str = include_str!("console/app.css");

/// The page may run only its own script and style: a step id or an error message that reaches
/// the page can never run as code.
const CSP: &str = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'";

/// The default and the longest window of `GET /stats`, in minutes.
pub const DEFAULT_MINUTES: u32 = 60;
pub const MAX_MINUTES: u32 = 1440;

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CONTENT_SECURITY_POLICY, CSP),
        ],
        body,
    )
        .into_response()
}

/// The web console
///
/// One HTML page (sagas, one saga, dead letters, dashboard) over this JSON API.
#[utoipa::path(
    get,
    path = "/",
    tag = "console",
    operation_id = "console_page",
    responses(
        (status = 200, description = "The page", content((String = "text/html"))),
    )
)]
pub async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX)
}

/// The web console's script
#[utoipa::path(
    get,
    path = "/console/app.js",
    tag = "console",
    operation_id = "console_script",
    responses(
        (status = 200, description = "The script", content((String = "text/javascript"))),
    )
)]
pub async fn script() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

/// The web console's stylesheet
#[utoipa::path(
    get,
    path = "/console/app.css",
    tag = "console",
    operation_id = "console_style",
    responses(
        (status = 200, description = "The stylesheet", content((String = "text/css"))),
    )
)]
pub async fn style() -> Response {
    asset("text/css; charset=utf-8", APP_CSS)
}

/// What `GET /stats` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Stats {
    /// When the figures were read.
    #[serde(with = "crate::time::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub now: i64,
    /// All sagas by state.
    pub counts: BTreeMap<String, u64>,
    /// The window the figures below cover, in minutes.
    pub window_minutes: u32,
    /// Per minute of the window, oldest first; minutes with nothing in them are left out.
    pub minutes: Vec<Minute>,
    /// Start-to-final latency of the sagas started in the window.
    pub latency: LatencyStats,
    pub outbox: OutboxLag,
    /// Dead letters kept (see `GET /dead-letters`).
    pub dead_letters: u64,
    /// The registered definitions' names.
    pub definitions: Vec<String>,
}

/// Start-to-final latency percentiles, in milliseconds (`null` when no saga finished).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LatencyStats {
    /// Sagas started in the window that are final.
    pub finished: u64,
    pub p50_ms: Option<i64>,
    pub p90_ms: Option<i64>,
    pub p99_ms: Option<i64>,
}

/// The outbox's backlog.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct OutboxLag {
    /// Commands and replies written but not yet confirmed by the broker.
    pub pending: u64,
    /// Age of the oldest of them, 0 when there is none.
    pub lag_ms: i64,
}

/// The dashboard's figures
///
/// Sagas by state; per minute of the last `minutes` started and finished by outcome;
/// start-to-final latency percentiles of the sagas started in that window; outbox backlog and
/// lag; dead letters kept; definition names.
#[utoipa::path(
    get,
    path = "/stats",
    tag = "console",
    params(
        ("minutes" = Option<u32>, Query, minimum = 0, maximum = 1440, description = "The window, in minutes: 0 to 1440 (default 60; 0: counts only)"),
    ),
    responses(
        (status = 200, description = "The figures", body = Stats),
        (status = 400, description = "An unknown or invalid query parameter", body = ErrorBody),
        (status = 500, description = "The database failed", body = ErrorBody),
    )
)]
pub async fn stats(
    State(engine): State<Arc<Engine>>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> ApiResult {
    let Query(params) = query.map_err(|r| {
        ApiError::bad_request(format!("unreadable query string: {}", r.body_text()))
    })?;
    let mut minutes = DEFAULT_MINUTES;
    for (name, value) in &params {
        match name.as_str() {
            "minutes" => {
                minutes = value
                    .parse()
                    .ok()
                    .filter(|m| *m <= MAX_MINUTES)
                    .ok_or_else(|| {
                        ApiError::bad_request(format!(
                            "`minutes` must be a whole number from 0 to {MAX_MINUTES}, got `{value}`"
                        ))
                    })?;
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter `{other}`; /stats takes minutes"
                )));
            }
        }
    }
    let store = engine.store();
    let now = now_ms();
    let since = now - i64::from(minutes) * 60_000;
    let counts = store.status_counts(None).await.map_err(EngineError::from)?;
    let (per_minute, latency) = if minutes == 0 {
        (
            Vec::new(),
            LatencyStats {
                finished: 0,
                p50_ms: None,
                p90_ms: None,
                p99_ms: None,
            },
        )
    } else {
        let per_minute = store.per_minute(since).await.map_err(EngineError::from)?;
        let l = store
            .latencies(since, &[0.5, 0.9, 0.99])
            .await
            .map_err(EngineError::from)?;
        let at = |i: usize| l.at.get(i).copied().flatten();
        (
            per_minute,
            LatencyStats {
                finished: l.finished,
                p50_ms: at(0),
                p90_ms: at(1),
                p99_ms: at(2),
            },
        )
    };
    let outbox = store.outbox_stats().await.map_err(EngineError::from)?;
    let dead_letters = store.dead_letter_count().await.map_err(EngineError::from)?;
    let definitions = store
        .definition_names(200)
        .await
        .map_err(EngineError::from)?;
    Ok(axum::Json(Stats {
        now,
        counts,
        window_minutes: minutes,
        minutes: per_minute,
        latency,
        outbox: OutboxLag {
            pending: u64::try_from(outbox.pending).unwrap_or(0),
            lag_ms: outbox.oldest.map_or(0, |t| (now - t).max(0)),
        },
        dead_letters: u64::try_from(dead_letters).unwrap_or(0),
        definitions,
    })
    .into_response())
}

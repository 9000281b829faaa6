//! The engine's HTTP API (axum): start sagas, read them, operator actions, health and metrics.
//!
//! | method and path | what | success |
//! |---|---|---|
//! | `POST /sagas` | start `{"saga": NAME, "input": {…}, "idempotency_key": K?, "definition_hash": H?}` | 201 `{"id", "existing": false, …}`; 200 with `existing: true` when the key matched |
//! | `GET /sagas/{id}` | state, steps (state, attempts, last error), timeline: what `sagaflow status` shows | 200 |
//! | `GET /sagas/{id}/graph?format=text|dot|mermaid|svg` | the saga's step graph with each step's state drawn on it (default `text`) | 200 text (`text/vnd.graphviz` for dot, `image/svg+xml` for svg) |
//! | `GET /sagas?state=&key=&saga=&from=&to=&limit=&after=` | newest first, paged; `saga` a definition name, `from`/`to` bound the creation time (RFC 3339 or ms) | 200 `{"sagas": […], "next": CURSOR or null}` |
//! | `POST /sagas/{id}/retry` | operator: resume a Failed saga; body `{"actor": …}` optional | 200 `{"id", "state", …}` |
//! | `POST /sagas/{id}/abort` | operator: compensate a Running or Queued saga; body `{"reason": …, "actor": …}` optional | 200 `{"id", "state", …}` |
//! | `POST /sagas/{id}/skip` | operator: resolve a Failed saga's stuck step by hand; body `{"step": ID, "as": "done" or "compensated", "output": {…}?, "reason": …, "actor": …?}` (step and reason required; `output` is a done forward step's output) | 200 `{"id", "state", …}` |
//! | `POST /sagas/{id}/pause` | operator: dispatch nothing for the saga until it resumes; body `{"reason": …, "actor": …}` optional | 200 `{"id", "state", …}` |
//! | `POST /sagas/{id}/resume` | operator: end a pause, dispatch what it held back; body `{"actor": …}` optional | 200 `{"id", "state", …}` |
//! | `POST /sagas/{id}/release-key` | operator: a Failed saga resolved by hand gives its order's sequence key to the next saga; body `{"actor": …, "reason": …}` (reason required) | 200 `{"id", "state", …}` |
//! | `GET /dead-letters…`, `POST /dead-letters/replay`, `…/purge` | the deployment's dead letters: see [`dead_letters`] | 200 |
//! | `GET /`, `GET /stats?minutes=` | the web console and its dashboard's figures: see [`console`] | 200 |
//! | `GET /healthz` | the database answers a trivial query | 200 `{"status": "ok"}`, else 503 |
//! | `GET /metrics` | Prometheus (OpenMetrics text), see [`crate::metrics`] | 200 |
//!
//! Every failure has a JSON body `{"error": "…"}` saying what is wrong: 400 for a malformed or
//! invalid request (the engine's input check included), 404 for an unknown saga, definition or
//! route, 405 for a wrong method, 409 for an operator action the saga refuses (and a start whose
//! `definition_hash` is not the engine's latest for that name), 413 for a body over the limit,
//! 415 for a body that is not `application/json`; 500 only when the database fails.
//!
//! The API only writes through [`Engine`]: the engine process serving it also runs its loops
//! (`Engine::run`), which deliver what a start, retry or abort wrote to the outbox.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::error;

pub mod console;
pub mod dead_letters;

use crate::engine::{Applied, Engine, EngineError};
use crate::machine::{Paused, Resolution, SagaState, SagaStatus};
use crate::metrics;
use crate::status::{self, ListQuery};
use crate::store::{SagaQueries, StoreError, now_ms};

/// Sagas per page when `limit` is not given, and the most a page may hold.
pub const DEFAULT_LIMIT: u32 = 50;
pub const MAX_LIMIT: u32 = 1000;

/// What `/healthz` waits for the database.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(5);

/// The API's routes, on `engine`.
pub fn router(engine: Arc<Engine>) -> Router {
    Router::new()
        .route("/", get(console::index))
        .route("/console/app.js", get(console::script))
        .route("/console/app.css", get(console::style))
        .route("/stats", get(console::stats))
        .route("/sagas", post(start_saga).get(list_sagas))
        .route("/sagas/{id}", get(get_saga))
        .route("/sagas/{id}/graph", get(saga_graph))
        .route("/sagas/{id}/retry", post(retry_saga))
        .route("/sagas/{id}/abort", post(abort_saga))
        .route("/sagas/{id}/release-key", post(release_key))
        .route("/sagas/{id}/skip", post(skip_step))
        .route("/sagas/{id}/pause", post(pause_saga))
        .route("/sagas/{id}/resume", post(resume_saga))
        .route("/dead-letters", get(dead_letters::list))
        .route("/dead-letters/replay", post(dead_letters::replay))
        .route("/dead-letters/purge", post(dead_letters::purge))
        .route("/dead-letters/{id}", get(dead_letters::show))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .with_state(engine)
}

/// Serves the API on `listener` until `shutdown` turns true (or its sender is dropped), then
/// finishes the requests in progress and returns.
pub async fn serve(
    engine: Arc<Engine>,
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    axum::serve(listener, router(engine))
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        })
        .await
}

/// A failed request: its status and the message of its JSON body `{"error": …}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            error!(status = %self.status, error = %self.message, "HTTP API request failed");
        }
        (self.status, axum::Json(json!({ "error": self.message }))).into_response()
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> ApiError {
        let status = match &e {
            EngineError::UnknownSaga(_) | EngineError::UnknownDefinition(_) => {
                StatusCode::NOT_FOUND
            }
            EngineError::InvalidInput { .. } => StatusCode::BAD_REQUEST,
            EngineError::Refused(_) | EngineError::Store(StoreError::Conflict(_)) => {
                StatusCode::CONFLICT
            }
            // The database failed, or holds what this version cannot read (a corrupt row, a
            // definition that no longer compiles).
            EngineError::Store(_) | EngineError::BrokenDefinition { .. } => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            #[allow(unreachable_patterns)]
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.to_string())
    }
}

impl From<BytesRejection> for ApiError {
    fn from(r: BytesRejection) -> ApiError {
        ApiError::new(
            r.status(),
            format!("cannot read the request body: {}", r.body_text()),
        )
    }
}

type ApiResult = Result<Response, ApiError>;

/// `POST /sagas`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StartRequest {
    /// The name of a registered definition (its latest version is started).
    saga: String,
    #[serde(default = "empty_object")]
    input: Value,
    #[serde(default)]
    idempotency_key: Option<String>,
    /// When given, the definition the caller means: refused (409) if the engine's latest
    /// definition of that name is another one.
    #[serde(default)]
    definition_hash: Option<String>,
}

fn empty_object() -> Value {
    Value::Object(serde_json::Map::new())
}

/// What `POST /sagas` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartResponse {
    pub id: String,
    /// True when the idempotency key matched a saga started before: nothing new was started.
    pub existing: bool,
    /// The saga's definition name, version and content hash.
    pub saga: String,
    pub version: u32,
    pub definition_hash: String,
    /// Its state now (`running`, or `queued` behind another saga with the same sequence key).
    pub state: String,
}

async fn start_saga(
    State(engine): State<Arc<Engine>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let req: StartRequest = json_body(&headers, &body?, START_SHAPE)?;
    if req.saga.trim().is_empty() {
        return Err(ApiError::bad_request(
            "`saga` must name a saga definition, e.g. \"order-paid\"",
        ));
    }
    if req.idempotency_key.as_deref() == Some("") {
        return Err(ApiError::bad_request(
            "`idempotency_key` must not be empty (leave it out to start without one)",
        ));
    }
    let graph = match engine.definition_by_name(&req.saga).await {
        Ok(g) => g,
        Err(EngineError::UnknownDefinition(name)) => {
            let known = definition_names(&engine).await?;
            let known = if known.is_empty() {
                "none is registered yet".to_owned()
            } else {
                format!("registered: {}", known.join(", "))
            };
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("no saga definition named `{name}` ({known})"),
            ));
        }
        Err(e) => return Err(e.into()),
    };
    if let Some(hash) = &req.definition_hash
        && hash != graph.content_hash()
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "the engine's latest `{}` is definition {} (v{}), not {hash}: register that definition with the engine first, or start it by name alone",
                graph.name(),
                graph.content_hash(),
                graph.def().version
            ),
        ));
    }
    let started = engine
        .start(&graph, req.input, req.idempotency_key.as_deref())
        .await?;
    let header = engine
        .store()
        .saga_header(&started.id)
        .await
        .map_err(EngineError::from)?
        .ok_or_else(|| EngineError::UnknownSaga(started.id.clone()))?;
    let response = StartResponse {
        saga: header.name,
        version: header
            .definition_version
            .and_then(|v| u32::try_from(v).ok())
            .unwrap_or(0),
        definition_hash: header.definition_hash,
        state: header.status,
        id: started.id,
        existing: started.existing,
    };
    let status = if response.existing {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, axum::Json(response)).into_response())
}

/// Names of the registered definitions (for a helpful 404).
async fn definition_names(engine: &Engine) -> Result<Vec<String>, ApiError> {
    Ok(engine
        .store()
        .definition_names(50)
        .await
        .map_err(EngineError::from)?)
}

/// `GET /sagas/{id}`.
async fn get_saga(
    State(engine): State<Arc<Engine>>,
    id: Result<Path<String>, PathRejection>,
) -> ApiResult {
    let id = saga_id(id)?;
    match status::saga(engine.store(), &id).await? {
        Some(detail) => Ok(axum::Json(detail).into_response()),
        None => Err(EngineError::UnknownSaga(id).into()),
    }
}

/// `GET /sagas/{id}/graph?format=`.
async fn saga_graph(
    State(engine): State<Arc<Engine>>,
    id: Result<Path<String>, PathRejection>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> ApiResult {
    let id = saga_id(id)?;
    let Query(params) = query.map_err(|r| {
        ApiError::bad_request(format!("unreadable query string: {}", r.body_text()))
    })?;
    let mut format = status::DrawFormat::Text;
    for (name, value) in &params {
        match name.as_str() {
            "format" => {
                format = status::DrawFormat::parse(value).ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "`format` must be text, dot, mermaid or svg, got `{value}`"
                    ))
                })?;
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter `{other}`; /sagas/{{id}}/graph takes format"
                )));
            }
        }
    }
    let detail = status::saga(engine.store(), &id)
        .await?
        .ok_or_else(|| EngineError::UnknownSaga(id.clone()))?;
    let text = status::draw(&detail, format).map_err(|why| {
        ApiError::new(
            StatusCode::CONFLICT,
            format!("cannot draw saga {id}: {why}"),
        )
    })?;
    let content_type = match format {
        status::DrawFormat::Dot => "text/vnd.graphviz; charset=utf-8",
        status::DrawFormat::Svg => "image/svg+xml; charset=utf-8",
        _ => "text/plain; charset=utf-8",
    };
    Ok(([(header::CONTENT_TYPE, content_type)], text).into_response())
}

/// `GET /sagas?state=&key=&saga=&from=&to=&limit=&after=`.
async fn list_sagas(
    State(engine): State<Arc<Engine>>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> ApiResult {
    let Query(params) = query.map_err(|r| {
        ApiError::bad_request(format!("unreadable query string: {}", r.body_text()))
    })?;
    let mut q = ListQuery {
        limit: DEFAULT_LIMIT,
        ..ListQuery::default()
    };
    let mut seen: Vec<&str> = Vec::new();
    for (name, value) in &params {
        if seen.contains(&name.as_str()) {
            return Err(ApiError::bad_request(format!(
                "query parameter `{name}` is given more than once"
            )));
        }
        seen.push(name);
        match name.as_str() {
            "state" => {
                if !SagaStatus::NAMES.contains(&value.as_str()) {
                    return Err(ApiError::bad_request(format!(
                        "unknown state `{value}`; the states are {}",
                        SagaStatus::NAMES.join(", ")
                    )));
                }
                q.state = Some(value.clone());
            }
            "key" => q.sequence_key = Some(value.clone()),
            "saga" => q.saga = Some(value.clone()),
            "from" | "to" => {
                let t = crate::time::parse(value).ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "`{name}` must be a time in RFC 3339 (e.g. 2026-12-01T10:00:00Z) or milliseconds since the epoch, got `{value}`"
                    ))
                })?;
                if name == "from" {
                    q.created_from = Some(t);
                } else {
                    q.created_before = Some(t);
                }
            }
            "after" => q.after = Some(value.clone()),
            "limit" => {
                q.limit = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_LIMIT).contains(n))
                    .ok_or_else(|| {
                        ApiError::bad_request(format!(
                            "`limit` must be a whole number from 1 to {MAX_LIMIT}, got `{value}`"
                        ))
                    })?;
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter `{other}`; /sagas takes state, key, saga, from, to, limit and after"
                )));
            }
        }
    }
    match status::list(engine.store(), &q).await {
        Ok(page) => Ok(axum::Json(page).into_response()),
        // The only refusal of a list: a cursor that is not one.
        Err(EngineError::Refused(why)) => Err(ApiError::bad_request(why)),
        Err(e) => Err(e.into()),
    }
}

/// The body of `POST /sagas/{id}/retry`: nothing, or `{"actor": …}`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RetryRequest {
    /// Who retries it, for the history (default: `api`).
    #[serde(default)]
    actor: Option<String>,
}

/// The body of `POST /sagas/{id}/abort`: nothing, or `{"reason": …, "actor": …}`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AbortRequest {
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    actor: Option<String>,
}

/// The actor an API caller named, or `api`.
fn actor_or_api(actor: Option<String>) -> String {
    actor
        .filter(|a| !a.trim().is_empty())
        .unwrap_or_else(|| "api".to_owned())
}

/// The body of `POST /sagas/{id}/release-key`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReleaseKeyRequest {
    /// Who releases it (default: `api`).
    #[serde(default)]
    actor: Option<String>,
    /// Why: recorded in the saga's timeline.
    reason: String,
}

/// What `retry` and `abort` answer: the saga's state after the action.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionResponse {
    pub id: String,
    /// `state` and, depending on it, `reason` and `compensating` (like `GET /sagas/{id}`).
    #[serde(flatten)]
    pub status: SagaStatus,
    /// Set while an operator has the saga paused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<Paused>,
}

/// `POST /sagas/{id}/retry`.
async fn retry_saga(
    State(engine): State<Arc<Engine>>,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let id = saga_id(id)?;
    let applied = engine.retry(&id, &actor_only(&headers, &body?)?).await?;
    operator_outcome(&engine, &id, applied).await
}

/// `POST /sagas/{id}/abort`.
async fn abort_saga(
    State(engine): State<Arc<Engine>>,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let id = saga_id(id)?;
    let (actor, reason) = actor_and_reason(&headers, &body?)?;
    let applied = engine.abort(&id, &actor, &reason).await?;
    operator_outcome(&engine, &id, applied).await
}

/// The actor of an optional `{"actor": …}` body (default `api`).
fn actor_only(headers: &HeaderMap, body: &Bytes) -> Result<String, ApiError> {
    let req: RetryRequest = optional_json_body(headers, body, r#"{"actor": "…"} (or nothing)"#)?;
    Ok(actor_or_api(req.actor))
}

/// The actor and reason of an optional `{"reason": …, "actor": …}` body (defaults `api`, `no
/// reason given`).
fn actor_and_reason(headers: &HeaderMap, body: &Bytes) -> Result<(String, String), ApiError> {
    let req: AbortRequest = optional_json_body(
        headers,
        body,
        r#"{"reason": "…", "actor": "…"} (or nothing)"#,
    )?;
    let reason = req
        .reason
        .filter(|r| !r.trim().is_empty())
        .unwrap_or_else(|| "no reason given".to_owned());
    Ok((actor_or_api(req.actor), reason))
}

/// `POST /sagas/{id}/release-key`.
async fn release_key(
    State(engine): State<Arc<Engine>>,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let id = saga_id(id)?;
    let req: Option<ReleaseKeyRequest> =
        optional_json_body(&headers, &body?, r#"{"reason": "…", "actor": "…"}"#)?;
    let Some(req) = req.filter(|r| !r.reason.trim().is_empty()) else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "releasing a sequence key needs a body {\"reason\": \"…\"} saying how the saga was resolved",
        ));
    };
    let applied = engine
        .release_key(&id, &actor_or_api(req.actor), &req.reason)
        .await?;
    operator_outcome(&engine, &id, applied).await
}

/// The body of `POST /sagas/{id}/skip`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SkipRequest {
    step: String,
    /// `done` (default) or `compensated`.
    #[serde(default, rename = "as")]
    resolution: Option<String>,
    /// A done forward step's output (default `{}`).
    #[serde(default)]
    output: Option<Value>,
    reason: String,
    #[serde(default)]
    actor: Option<String>,
}

/// `POST /sagas/{id}/skip`.
async fn skip_step(
    State(engine): State<Arc<Engine>>,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let id = saga_id(id)?;
    const SHAPE: &str = r#"{"step": "…", "as": "done" or "compensated", "output": {…}, "reason": "…", "actor": "…"}"#;
    let req: Option<SkipRequest> = optional_json_body(&headers, &body?, SHAPE)?;
    let Some(req) = req.filter(|r| !r.reason.trim().is_empty() && !r.step.trim().is_empty()) else {
        return Err(ApiError::bad_request(format!(
            "skipping a step needs a body {SHAPE} naming the step and saying why"
        )));
    };
    let resolution = match (req.resolution.as_deref().unwrap_or("done"), req.output) {
        ("done", output) => Resolution::Done {
            output: output.unwrap_or_else(|| json!({})),
        },
        ("compensated", None) => Resolution::Compensated,
        ("compensated", Some(_)) => {
            return Err(ApiError::bad_request(
                "`output` is for a step marked done, not compensated",
            ));
        }
        (other, _) => {
            return Err(ApiError::bad_request(format!(
                "`as` must be `done` or `compensated`, got `{other}`"
            )));
        }
    };
    let applied = engine
        .skip(
            &id,
            &req.step,
            resolution,
            &actor_or_api(req.actor),
            &req.reason,
        )
        .await?;
    operator_outcome(&engine, &id, applied).await
}

/// `POST /sagas/{id}/pause`.
async fn pause_saga(
    State(engine): State<Arc<Engine>>,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let id = saga_id(id)?;
    let (actor, reason) = actor_and_reason(&headers, &body?)?;
    let applied = engine.pause(&id, &actor, &reason).await?;
    operator_outcome(&engine, &id, applied).await
}

/// `POST /sagas/{id}/resume`.
async fn resume_saga(
    State(engine): State<Arc<Engine>>,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let id = saga_id(id)?;
    let applied = engine.resume(&id, &actor_only(&headers, &body?)?).await?;
    operator_outcome(&engine, &id, applied).await
}

/// The saga's new state, or 409 with the reason the machine recorded for refusing.
async fn operator_outcome(engine: &Engine, id: &str, applied: Applied) -> ApiResult {
    match applied {
        Applied::Changed => {
            let state = saga_state(engine, id)
                .await?
                .ok_or_else(|| EngineError::UnknownSaga(id.to_owned()))?;
            let response = ActionResponse {
                id: id.to_owned(),
                status: state.status,
                paused: state.paused,
            };
            Ok(axum::Json(response).into_response())
        }
        Applied::Ignored => {
            let why = status::last_history(engine.store(), id, "ignored")
                .await?
                .map_or_else(|| "the saga refused it".to_owned(), |r| r.detail);
            Err(ApiError::new(
                StatusCode::CONFLICT,
                format!("saga {id}: {why}"),
            ))
        }
        Applied::UnknownSaga => Err(EngineError::UnknownSaga(id.to_owned()).into()),
        Applied::Duplicate | Applied::UnknownStep(_) => Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("saga {id}: the engine did not apply the request ({applied:?})"),
        )),
    }
}

/// The saga's state column (one query; no definition compiled).
async fn saga_state(engine: &Engine, id: &str) -> Result<Option<SagaState>, ApiError> {
    Ok(engine
        .store()
        .saga_state(id)
        .await
        .map_err(EngineError::from)?)
}

/// `GET /healthz`.
async fn healthz(State(engine): State<Arc<Engine>>) -> Response {
    let problem = match tokio::time::timeout(HEALTH_TIMEOUT, engine.store().ping()).await {
        Ok(Ok(())) => return axum::Json(json!({ "status": "ok" })).into_response(),
        // `database: …` (a store error says where it came from).
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!("database: no answer within {}s", HEALTH_TIMEOUT.as_secs()),
    };
    (
        StatusCode::SERVICE_UNAVAILABLE,
        axum::Json(json!({ "status": "unavailable", "error": problem })),
    )
        .into_response()
}

/// `GET /metrics`.
async fn metrics(State(engine): State<Arc<Engine>>) -> ApiResult {
    let outbox = engine
        .store()
        .outbox_stats()
        .await
        .map_err(EngineError::from)?;
    engine
        .metrics()
        .set_outbox(outbox.pending, outbox.oldest, now_ms());
    let kept = engine
        .store()
        .dead_letter_count()
        .await
        .map_err(EngineError::from)?;
    engine.metrics().set_dead_letters_kept(kept);
    Ok((
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        engine.metrics().encode(),
    )
        .into_response())
}

async fn no_route(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!(
            "no route for {method} {}; the API serves /sagas, /sagas/{{id}}, /sagas/{{id}}/retry, /sagas/{{id}}/abort, /sagas/{{id}}/release-key, /healthz and /metrics",
            uri.path()
        ),
    )
}

async fn wrong_method(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not allowed on {}", uri.path()),
    )
}

/// The request body as `T`: it must be JSON, declared as such.
/// What `POST /sagas` takes, as its errors say it.
const START_SHAPE: &str = r#"a JSON object {"saga": NAME, "input": {…}, "idempotency_key": "…"}"#;

/// A JSON error as the API's user can act on it: serde names the Rust type it wanted ("expected
/// struct StartRequest"), which says nothing to a caller; say what the API wants instead.
fn body_error(e: &serde_json::Error, shape: &str) -> String {
    let text = e.to_string();
    for marker in [
        "expected struct ",
        "expected unit struct ",
        "expected enum ",
    ] {
        if let Some(i) = text.find(marker) {
            let rest = &text[i + marker.len()..];
            let end = rest
                .find(|c: char| !c.is_alphanumeric() && c != '_')
                .unwrap_or(rest.len());
            return format!("{}expected {shape}{}", &text[..i], &rest[end..]);
        }
    }
    text
}

/// `shape`: what the endpoint wants, for the error message.
fn json_body<T: DeserializeOwned>(
    headers: &HeaderMap,
    body: &Bytes,
    shape: &str,
) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request(
            "the request body is empty; send a JSON object",
        ));
    }
    check_content_type(headers)?;
    serde_json::from_slice(body).map_err(|e| {
        let what = if e.is_data() {
            "invalid request body"
        } else {
            "malformed JSON body"
        };
        ApiError::bad_request(format!("{what}: {}", body_error(&e, shape)))
    })
}

/// Like [`json_body`], but an empty body means the defaults.
fn optional_json_body<T: DeserializeOwned + Default>(
    headers: &HeaderMap,
    body: &Bytes,
    shape: &str,
) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    json_body(headers, body, shape)
}

fn check_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "the request body must be JSON with `Content-Type: application/json`; the request has no Content-Type",
        ));
    };
    let text = String::from_utf8_lossy(value.as_bytes());
    let essence = text
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    if essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
    {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "the request body must be JSON with `Content-Type: application/json`, not `{text}`"
            ),
        ))
    }
}

/// The `{id}` of the path (400 if it does not decode, e.g. invalid UTF-8).
fn saga_id(id: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    id.map(|Path(id)| id).map_err(|r| {
        ApiError::bad_request(format!("unreadable saga id in the path: {}", r.body_text()))
    })
}

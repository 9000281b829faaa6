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
//! | `GET /openapi.json` | this API as an OpenAPI 3.1 document, see [`openapi`] | 200 |
//!
//! Every failure has a JSON body `{"error": "…"}` saying what is wrong: 400 for a malformed or
//! invalid request (the engine's input check included), 404 for an unknown saga, definition or
//! route, 405 for a wrong method, 409 for an operator action the saga refuses (and a start whose
//! `definition_hash` is not the engine's latest for that name), 413 for a body over the limit,
//! 415 for a body that is not `application/json`; 500 only when the database fails.
//!
//! The API only writes through [`Engine`]: the engine process serving it also runs its loops
//! (`Engine::run`), which deliver what a start, retry or abort wrote to the outbox.
//!
//! Every route is registered once, through `utoipa_axum`'s [`routes!`] with the handler's
//! `#[utoipa::path]`: the router and the OpenAPI document come from the same registrations, and
//! the schemas from the types the handlers (de)serialize, so the document cannot list a route
//! the router lacks or miss one it serves.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::error;
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::openapi::{RefOr, Tag};
use utoipa::{PartialSchema, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub mod console;
pub mod dead_letters;

use crate::engine::{Applied, Engine, EngineError};
use crate::machine::{Paused, Resolution, SagaState, SagaStatus};
use crate::metrics;
use crate::status::{self, ListQuery, SagaDetail};
use crate::store::{SagaQueries, StoreError, now_ms};

/// Sagas per page when `limit` is not given, and the most a page may hold.
pub const DEFAULT_LIMIT: u32 = 50;
pub const MAX_LIMIT: u32 = 1000;

/// What `/healthz` waits for the database.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(5);

/// The API's routes, on `engine`.
pub fn router(engine: Arc<Engine>) -> Router {
    let (routes, _) = api();
    routes
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .with_state(engine)
}

/// The API as an OpenAPI 3.1 document (what `GET /openapi.json` answers): every route the
/// router serves, with its parameters, body and every response, and the schemas of the JSON
/// they exchange.
pub fn openapi() -> utoipa::openapi::OpenApi {
    api().1
}

/// Every route, each registered once with its documentation: the router and the document.
fn api() -> (Router<Arc<Engine>>, utoipa::openapi::OpenApi) {
    let (routes, doc) = OpenApiRouter::with_openapi(document())
        .routes(routes!(console::index))
        .routes(routes!(console::script))
        .routes(routes!(console::style))
        .routes(routes!(console::stats))
        .routes(routes!(start_saga, list_sagas))
        .routes(routes!(get_saga))
        .routes(routes!(saga_graph))
        .routes(routes!(retry_saga))
        .routes(routes!(abort_saga))
        .routes(routes!(release_key))
        .routes(routes!(skip_step))
        .routes(routes!(pause_saga))
        .routes(routes!(resume_saga))
        .routes(routes!(dead_letters::list))
        .routes(routes!(dead_letters::replay))
        .routes(routes!(dead_letters::purge))
        .routes(routes!(dead_letters::show))
        .routes(routes!(healthz))
        .routes(routes!(metrics))
        .routes(routes!(openapi_json))
        .split_for_parts();
    (routes, router_answers(optional_bodies(doc)))
}

/// The answers the router itself gives, whatever the handler: 405 on every path (another
/// method; `method_not_allowed_fallback`), and 413 and 415 wherever a JSON body is read
/// (`json_body`). Declared here once, where they come from, rather than on every route.
fn router_answers(mut doc: utoipa::openapi::OpenApi) -> utoipa::openapi::OpenApi {
    use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
    let error = |description: &str| {
        RefOr::T(
            ResponseBuilder::new()
                .description(description)
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name(ErrorBody::name())))
                        .build(),
                )
                .build(),
        )
    };
    for item in doc.paths.paths.values_mut() {
        let operations = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.options,
            &mut item.head,
            &mut item.patch,
            &mut item.trace,
        ];
        for operation in operations.into_iter().flatten() {
            let answers = &mut operation.responses.responses;
            answers
                .entry("405".to_owned())
                .or_insert_with(|| error("A method the path does not serve"));
            if operation.request_body.is_some() {
                answers
                    .entry("413".to_owned())
                    .or_insert_with(|| error("The body is over the limit (2 MiB)"));
                answers
                    .entry("415".to_owned())
                    .or_insert_with(|| error("A body that is not declared `application/json`"));
            }
        }
    }
    doc
}

/// utoipa writes an optional body (`request_body(content = Option<T>)`) as "`T` or `null`",
/// and leaves it not required; but what is optional here is the body itself (an empty one
/// means the defaults), and a `null` body is refused. So such a body's schema is `T`.
fn optional_bodies(mut doc: utoipa::openapi::OpenApi) -> utoipa::openapi::OpenApi {
    use utoipa::openapi::schema::OneOf;
    let operations = doc.paths.paths.values_mut().flat_map(|item| {
        [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.options,
            &mut item.head,
            &mut item.patch,
            &mut item.trace,
        ]
    });
    for operation in operations.flatten() {
        let Some(body) = &mut operation.request_body else {
            continue;
        };
        for content in body.content.values_mut() {
            if let Some(RefOr::T(Schema::OneOf(OneOf { items, .. }))) = &content.schema
                && let [RefOr::T(Schema::Object(null)), other] = items.as_slice()
                && null.schema_type == Type::Null.into()
            {
                content.schema = Some(other.clone());
            }
        }
    }
    doc
}

/// What the document says before the routes are added: title, version, what holds everywhere.
fn document() -> utoipa::openapi::OpenApi {
    #[derive(utoipa::OpenApi)]
    #[openapi(info(
        title = "sagaflow engine HTTP API",
        description = "Start sagas, read them, act on them as an operator, manage dead letters; \
            health, metrics and the web console.\n\n\
            Every failure has a JSON body `{\"error\": \"…\"}` (`ErrorBody`) saying what is wrong. \
            A path no route serves answers 404 and a method a path does not serve 405, both \
            with that body. Times are RFC 3339 in UTC with milliseconds. The API has no login \
            of its own: serve it on a private address or behind a proxy that guards it."
    ))]
    struct Document;

    let mut doc = <Document as utoipa::OpenApi>::openapi();
    doc.tags = Some(
        [
            ("sagas", "Start and read sagas."),
            (
                "operator",
                "Act on one saga by hand; each action is the saga's state machine's to accept or refuse (409).",
            ),
            ("dead letters", "The deployment's dead letters, kept in the engine's database."),
            ("console", "The web console and its dashboard's figures."),
            ("service", "Health, metrics and this document."),
        ]
        .into_iter()
        .map(|(name, description)| {
            let mut tag = Tag::new(name);
            tag.description = Some(description.to_owned());
            tag
        })
        .collect(),
    );
    doc
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

/// The body of every failure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// What is wrong, in words a caller can act on.
    pub error: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            error!(status = %self.status, error = %self.message, "HTTP API request failed");
        }
        let body = ErrorBody {
            error: self.message,
        };
        (self.status, axum::Json(body)).into_response()
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

/// What `POST /sagas` takes: which saga to start, with what input.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct StartRequest {
    /// The name of a registered definition (its latest version is started), e.g. `order-paid`.
    saga: String,
    /// The saga's input, checked against the definition's (default `{}`).
    #[serde(default = "empty_object")]
    #[schema(value_type = Object)]
    input: Value,
    /// Names one start: the same key again with the same saga and input answers the first
    /// saga (200, `existing: true`), with another saga or input 409. Not empty.
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
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

/// Start a saga
///
/// Starts the latest version of the named definition with the input; with an idempotency key,
/// a start already made with that key is answered instead of starting another.
#[utoipa::path(
    post,
    path = "/sagas",
    tag = "sagas",
    request_body(content = StartRequest, content_type = "application/json"),
    responses(
        (status = 201, description = "Started", body = StartResponse),
        (status = 200, description = "The idempotency key matched a saga started before: nothing new was started (`existing: true`)", body = StartResponse),
        (status = 400, description = "Malformed or invalid body, the engine's input check included", body = ErrorBody),
        (status = 404, description = "No saga definition of that name", body = ErrorBody),
        (status = 409, description = "The idempotency key names another start, or `definition_hash` is not the engine's latest definition of that name", body = ErrorBody),
        (status = 500, description = "The database failed", body = ErrorBody),
    )
)]
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
    // The caller's W3C trace context, if any: the saga's trace continues it (a malformed one
    // is ignored, see `crate::trace`).
    // Its `tracestate` is carried beside it; several `tracestate` headers are one list.
    let traceparent = headers.get("traceparent").and_then(|v| v.to_str().ok());
    let tracestate: Vec<&str> = headers
        .get_all("tracestate")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let trace = crate::trace::Carried {
        traceparent: traceparent.map(str::to_owned),
        tracestate: (!tracestate.is_empty()).then(|| tracestate.join(",")),
    };
    let started = engine
        .start_with_trace(&graph, req.input, req.idempotency_key.as_deref(), &trace)
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

/// One saga
///
/// Its state, steps (state, attempts, last error) and timeline: what `sagaflow status` shows.
#[utoipa::path(
    get,
    path = "/sagas/{id}",
    tag = "sagas",
    params(("id" = String, Path, description = "The saga's id")),
    responses(
        (status = 200, description = "The saga", body = SagaDetail),
        (status = 400, description = "The id in the path does not decode", body = ErrorBody),
        (status = 404, description = "No saga with that id", body = ErrorBody),
        (status = 500, description = "The database failed, or holds what this version cannot read", body = ErrorBody),
    )
)]
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

/// A saga's graph
///
/// The saga's step graph with each step's state drawn on it, in the format asked for (what
/// `sagaflow graph --saga ID` prints; `svg` is what the console shows).
#[utoipa::path(
    get,
    path = "/sagas/{id}/graph",
    tag = "sagas",
    params(
        ("id" = String, Path, description = "The saga's id"),
        ("format" = inline(Option<status::DrawFormat>), Query, description = "How to draw it (default `text`)"),
    ),
    responses(
        (status = 200, description = "The drawing: text and mermaid as `text/plain`, dot as `text/vnd.graphviz`, svg as `image/svg+xml`", content(
            (String = "text/plain"),
            (String = "text/vnd.graphviz"),
            (String = "image/svg+xml"),
        )),
        (status = 400, description = "An unknown format or query parameter, or an id that does not decode", body = ErrorBody),
        (status = 404, description = "No saga with that id", body = ErrorBody),
        (status = 409, description = "The saga cannot be drawn: its stored definition no longer compiles to the one it was pinned to", body = ErrorBody),
        (status = 500, description = "The database failed", body = ErrorBody),
    )
)]
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

/// List sagas
///
/// Newest first, `limit` at a time; pass a page's `next` as `after` for the next page. Each
/// parameter may be given once.
#[utoipa::path(
    get,
    path = "/sagas",
    tag = "sagas",
    params(
        ("state" = Option<String>, Query, description = "Only sagas in this state: queued, running, compensating, completed, compensated or failed"),
        ("key" = Option<String>, Query, description = "Only sagas of this sequence key (their order)"),
        ("saga" = Option<String>, Query, description = "Only sagas of this definition name"),
        ("from" = Option<String>, Query, description = "Only sagas created at or after this time: RFC 3339 (e.g. 2026-12-01T10:00:00Z) or milliseconds since the epoch"),
        ("to" = Option<String>, Query, description = "Only sagas created before this time: RFC 3339 or milliseconds since the epoch"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 1000, description = "Sagas per page, 1 to 1000 (default 50)"),
        ("after" = Option<String>, Query, description = "The `next` of the previous page"),
    ),
    responses(
        (status = 200, description = "One page of sagas", body = status::Page),
        (status = 400, description = "An unknown, repeated or invalid query parameter, or a cursor that is not one", body = ErrorBody),
        (status = 500, description = "The database failed", body = ErrorBody),
    )
)]
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

/// The body of `POST /sagas/{id}/retry` and `…/resume`: nothing, or `{"actor": …}`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct RetryRequest {
    /// Who acts, for the saga's timeline (default: `api`).
    #[serde(default)]
    actor: Option<String>,
}

/// The body of `POST /sagas/{id}/abort` and `…/pause`: nothing, or `{"reason": …, "actor": …}`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct AbortRequest {
    /// Why, for the saga's timeline (default: `no reason given`).
    #[serde(default)]
    reason: Option<String>,
    /// Who acts, for the saga's timeline (default: `api`).
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
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct ReleaseKeyRequest {
    /// Who releases it (default: `api`).
    #[serde(default)]
    actor: Option<String>,
    /// How the saga was resolved, recorded in its timeline (not empty).
    reason: String,
}

/// What the operator actions answer: the saga's state after the action.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ActionResponse {
    pub id: String,
    /// `state` and, depending on it, `reason` and `compensating` (like `GET /sagas/{id}`).
    #[serde(flatten)]
    pub status: SagaStatus,
    /// Set while an operator has the saga paused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<Paused>,
}

/// Retry a failed saga
///
/// Resumes a Failed saga where it stopped, with a fresh retry budget for its stuck step.
#[utoipa::path(
    post,
    path = "/sagas/{id}/retry",
    tag = "operator",
    params(("id" = String, Path, description = "The saga's id")),
    request_body(content = Option<RetryRequest>, content_type = "application/json", description = "Optional: who retries it"),
    responses(
        (status = 200, description = "Retried: the saga's state now", body = ActionResponse),
        (status = 400, description = "Malformed or invalid body, or an id that does not decode", body = ErrorBody),
        (status = 404, description = "No saga with that id", body = ErrorBody),
        (status = 409, description = "The saga refuses it (it is not Failed, or its key was released): the message says why", body = ErrorBody),
        (status = 500, description = "The database failed", body = ErrorBody),
    )
)]
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

/// Abort a saga
///
/// Compensates a Running or Queued saga: what it did is undone.
#[utoipa::path(
    post,
    path = "/sagas/{id}/abort",
    tag = "operator",
    params(("id" = String, Path, description = "The saga's id")),
    request_body(content = Option<AbortRequest>, content_type = "application/json", description = "Optional: why, and who aborts it"),
    responses(
        (status = 200, description = "Aborted: the saga's state now", body = ActionResponse),
        (status = 400, description = "Malformed or invalid body, or an id that does not decode", body = ErrorBody),
        (status = 404, description = "No saga with that id", body = ErrorBody),
        (status = 409, description = "The saga refuses it (it is not Running or Queued): the message says why", body = ErrorBody),
        (status = 500, description = "The database failed", body = ErrorBody),
    )
)]
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

/// Release a failed saga's sequence key
///
/// A Failed saga resolved by hand gives its order's sequence key to the next saga of that order; it never runs again.
#[utoipa::path(
    post,
    path = "/sagas/{id}/release-key",
    tag = "operator",
    params(("id" = String, Path, description = "The saga's id")),
    request_body(content = ReleaseKeyRequest, content_type = "application/json", description = "Required: how the saga was resolved"),
    responses(
        (status = 200, description = "Released: the saga's state now", body = ActionResponse),
        (status = 400, description = "No body or no reason, a malformed or invalid body, or an id that does not decode", body = ErrorBody),
        (status = 404, description = "No saga with that id", body = ErrorBody),
        (status = 409, description = "The saga refuses it (it is not Failed, or holds no key): the message says why", body = ErrorBody),
        (status = 500, description = "The database failed", body = ErrorBody),
    )
)]
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
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct SkipRequest {
    /// The stuck step's id (not empty).
    step: String,
    /// How it was resolved (default `done`).
    #[serde(default, rename = "as")]
    #[schema(value_type = Option<SkipAs>)]
    resolution: Option<String>,
    /// A done forward step's output (default `{}`); not with `compensated`.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    output: Option<Value>,
    /// Why, for the saga's timeline (not empty).
    reason: String,
    /// Who acts, for the saga's timeline (default: `api`).
    #[serde(default)]
    actor: Option<String>,
}

/// How the step was resolved: its operation is `done` by hand, or it has no effect any more
/// (`compensated`).
// Only the schema of `SkipRequest::resolution`: the handler reads the text, to answer a wrong
// one with what it accepts.
#[derive(ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code)]
enum SkipAs {
    Done,
    Compensated,
}

/// Resolve a failed saga's stuck step by hand
///
/// Marks the stuck step `done` (a forward step with `output`) or `compensated`, and the saga goes on from there.
#[utoipa::path(
    post,
    path = "/sagas/{id}/skip",
    tag = "operator",
    params(("id" = String, Path, description = "The saga's id")),
    request_body(content = SkipRequest, content_type = "application/json", description = "Required: the step, how it was resolved, and why"),
    responses(
        (status = 200, description = "Resolved: the saga's state now", body = ActionResponse),
        (status = 400, description = "No body, no step or reason, an `as` other than done or compensated, `output` with compensated, a malformed body, or an id that does not decode", body = ErrorBody),
        (status = 404, description = "No saga with that id", body = ErrorBody),
        (status = 409, description = "The saga refuses it (it is not Failed, or the step is not stuck): the message says why", body = ErrorBody),
        (status = 500, description = "The database failed", body = ErrorBody),
    )
)]
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

/// Pause a saga
///
/// Nothing is dispatched for the saga until it resumes; replies and timers are still applied. The answer has `paused` while it is paused.
#[utoipa::path(
    post,
    path = "/sagas/{id}/pause",
    tag = "operator",
    params(("id" = String, Path, description = "The saga's id")),
    request_body(content = Option<AbortRequest>, content_type = "application/json", description = "Optional: why, and who pauses it"),
    responses(
        (status = 200, description = "Paused: the saga's state now", body = ActionResponse),
        (status = 400, description = "Malformed or invalid body, or an id that does not decode", body = ErrorBody),
        (status = 404, description = "No saga with that id", body = ErrorBody),
        (status = 409, description = "The saga refuses it (it is final, or already paused): the message says why", body = ErrorBody),
        (status = 500, description = "The database failed", body = ErrorBody),
    )
)]
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

/// Resume a paused saga
///
/// Ends a pause and dispatches what it held back.
#[utoipa::path(
    post,
    path = "/sagas/{id}/resume",
    tag = "operator",
    params(("id" = String, Path, description = "The saga's id")),
    request_body(content = Option<RetryRequest>, content_type = "application/json", description = "Optional: who resumes it"),
    responses(
        (status = 200, description = "Resumed: the saga's state now", body = ActionResponse),
        (status = 400, description = "Malformed or invalid body, or an id that does not decode", body = ErrorBody),
        (status = 404, description = "No saga with that id", body = ErrorBody),
        (status = 409, description = "The saga refuses it (it is not paused): the message says why", body = ErrorBody),
        (status = 500, description = "The database failed", body = ErrorBody),
    )
)]
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

/// What `GET /healthz` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// `ok`, or `unavailable` (503).
    pub status: String,
    /// Why it is unavailable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Health
///
/// Whether the database answers a trivial query (within 5 s).
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "service",
    responses(
        (status = 200, description = "The database answers: `{\"status\": \"ok\"}`", body = Health),
        (status = 503, description = "The database does not answer: `{\"status\": \"unavailable\", \"error\": \"…\"}`", body = Health),
    )
)]
async fn healthz(State(engine): State<Arc<Engine>>) -> Response {
    let problem = match tokio::time::timeout(HEALTH_TIMEOUT, engine.store().ping()).await {
        Ok(Ok(())) => {
            let ok = Health {
                status: "ok".to_owned(),
                error: None,
            };
            return axum::Json(ok).into_response();
        }
        // `database: …` (a store error says where it came from).
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!("database: no answer within {}s", HEALTH_TIMEOUT.as_secs()),
    };
    let unavailable = Health {
        status: "unavailable".to_owned(),
        error: Some(problem),
    };
    (StatusCode::SERVICE_UNAVAILABLE, axum::Json(unavailable)).into_response()
}

/// Metrics
///
/// Prometheus metrics in the OpenMetrics text format (the README lists them).
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "service",
    responses(
        (status = 200, description = "The metrics", content(
            (String = "application/openmetrics-text; version=1.0.0; charset=utf-8"),
        )),
        (status = 500, description = "The database failed (the outbox and dead-letter figures are read at scrape time)", body = ErrorBody),
    )
)]
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

/// This API's OpenAPI document
///
/// What [`openapi`] returns: every route, its parameters, bodies and responses, and the schemas
/// of the JSON they exchange.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "service",
    responses(
        (status = 200, description = "The document", body = OpenApiDocument),
    )
)]
async fn openapi_json() -> Response {
    static DOCUMENT: std::sync::LazyLock<utoipa::openapi::OpenApi> =
        std::sync::LazyLock::new(openapi);
    axum::Json(&*DOCUMENT).into_response()
}

/// The schema of `GET /openapi.json`'s answer: an OpenAPI document, not described further here.
struct OpenApiDocument;

impl PartialSchema for OpenApiDocument {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::Object)
            .description(Some(
                "An OpenAPI 3.1 document: this one (see https://spec.openapis.org/oas/v3.1.0)",
            ))
            .into()
    }
}

impl ToSchema for OpenApiDocument {}

async fn no_route(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!(
            "no route for {method} {}; GET /openapi.json lists the API's routes",
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

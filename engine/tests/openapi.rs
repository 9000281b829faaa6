//! The HTTP API's OpenAPI document (`http::openapi()`, served at `GET /openapi.json`) against
//! the router it comes from, driven in-process (`tower::ServiceExt::oneshot`) over an engine on
//! SQLite and the in-process transport:
//!
//! - it is an OpenAPI 3 document with a title and a version;
//! - its (method, path) pairs are exactly the routes below, each of which reaches its handler
//!   (no fallback), answers a status the document declares for it with a declared content type,
//!   and a JSON body that its declared schema accounts for key by key;
//! - a path or method the document does not list gets the router's fallback (404 / 405);
//! - every response and request body refers to a schema in `components`, every error to
//!   `ErrorBody`, every `$ref` resolves and every component is used;
//! - `GET /openapi.json` answers that same document, as `application/json`;
//! - real answers (a saga, a page, an action, a start, stats, dead letters, health, errors)
//!   match their declared schemas, so a schema that drifts from what serde writes fails here.

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use sagaflow_engine::store::{ENGINE_MIGRATIONS, Store};
use sagaflow_engine::transport::memory::MemoryTransport;
use sagaflow_engine::transport::{DeadLetter, Message};
use sagaflow_engine::{Engine, http};
use serde_json::{Map, Value, json};
use tower::ServiceExt;

const ORDER: &str = include_str!("../../sagas/order.yaml");

/// Every route the router serves, as the document must list it. The three console assets are
/// documented too (as HTML, JavaScript and CSS): there is no exception.
const ROUTES: &[(&str, &str)] = &[
    ("GET", "/"),
    ("GET", "/console/app.js"),
    ("GET", "/console/app.css"),
    ("GET", "/stats"),
    ("POST", "/sagas"),
    ("GET", "/sagas"),
    ("GET", "/sagas/{id}"),
    ("GET", "/sagas/{id}/graph"),
    ("POST", "/sagas/{id}/retry"),
    ("POST", "/sagas/{id}/abort"),
    ("POST", "/sagas/{id}/release-key"),
    ("POST", "/sagas/{id}/skip"),
    ("POST", "/sagas/{id}/pause"),
    ("POST", "/sagas/{id}/resume"),
    ("GET", "/dead-letters"),
    ("POST", "/dead-letters/replay"),
    ("POST", "/dead-letters/purge"),
    ("GET", "/dead-letters/{id}"),
    ("GET", "/healthz"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
];

/// The methods tried on every path for the 405 fallback.
const METHODS: &[&str] = &["GET", "POST", "PUT", "DELETE", "PATCH"];

// --- fixture ----------------------------------------------------------------------------------

struct Fixture {
    router: Router,
    engine: Arc<Engine>,
    /// A running saga, and one paused by an operator.
    running: String,
    paused: String,
    /// Two kept dead letters.
    letters: Vec<String>,
    _dir: TempDir,
}

#[derive(Debug)]
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn fixture() -> Fixture {
    let dir = std::env::temp_dir().join(format!(
        "sagaflow-openapi-{}-{:08x}",
        std::process::id(),
        fastrand::u32(..)
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let url = format!("sqlite://{}?mode=rwc", dir.join("test.db").display());
    let store = Store::connect(&url, 1).await.expect("connect");
    store.migrate(&[ENGINE_MIGRATIONS]).await.expect("migrate");
    let engine = Engine::new(store, Arc::new(MemoryTransport::default()));
    let graph = engine.register(ORDER).await.expect("order saga");
    let running = engine
        .start(&graph, order_input("o-1"), None)
        .await
        .expect("start")
        .id;
    let paused = engine
        .start(&graph, order_input("o-2"), None)
        .await
        .expect("start")
        .id;
    let mut letters = Vec::new();
    for i in 0..2 {
        let letter = DeadLetter::now(
            "cmd.payment",
            "cannot be decoded",
            Message {
                id: format!("m-{i}"),
                key: "o-9".to_owned(),
                payload: br#"{"not": "a command"}"#.to_vec(),
            },
        );
        letters.push(letter.id.clone());
        engine
            .store()
            .keep_dead_letters(&[letter])
            .await
            .expect("keep a dead letter");
    }
    let router = http::router(engine.clone());
    let fixture = Fixture {
        router,
        engine,
        running,
        paused,
        letters,
        _dir: TempDir(dir),
    };
    let (status, _, body) = fixture
        .call(
            "POST",
            &format!("/sagas/{}/pause", fixture.paused),
            Some(r#"{"reason": "looking into it", "actor": "ops"}"#),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "pause: {}", text(&body));
    fixture
}

fn order_input(order: &str) -> Value {
    json!({
        "order_id": order, "user_id": "u-1", "amount": "12.50",
        "coupon_id": "c-1", "points": 10, "campaign_id": "spring",
    })
}

impl Fixture {
    /// `method path` with a JSON body, if given: status, content type, body.
    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> (StatusCode, Option<String>, Vec<u8>) {
        let mut request = Request::builder()
            .method(Method::from_bytes(method.as_bytes()).expect("method"))
            .uri(path);
        if body.is_some() {
            request = request.header(header::CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(body.map_or_else(Body::empty, |b| Body::from(b.to_owned())))
            .expect("request");
        let response = self
            .router
            .clone()
            .oneshot(request)
            .await
            .expect("infallible");
        let status = response.status();
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().expect("ASCII content type").to_owned());
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .expect("body");
        (status, content_type, body.to_vec())
    }

    /// `template` with its `{id}` filled in: a real saga or dead letter.
    fn concrete(&self, template: &str) -> String {
        if template.starts_with("/dead-letters/") {
            template.replace("{id}", &self.letters[0])
        } else {
            template.replace("{id}", &self.running)
        }
    }
}

fn text(body: &[u8]) -> String {
    String::from_utf8_lossy(body).into_owned()
}

fn error_of(body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_default()
}

/// Whether an answer is the router's fallback rather than a handler's.
fn is_fallback(status: StatusCode, body: &[u8]) -> bool {
    let error = error_of(body);
    (status == StatusCode::NOT_FOUND && error.starts_with("no route for "))
        || (status == StatusCode::METHOD_NOT_ALLOWED && error.contains(" is not allowed on "))
}

// --- the document -----------------------------------------------------------------------------

fn document() -> Value {
    serde_json::to_value(http::openapi()).expect("the document serializes")
}

/// (method, path) of every operation in the document.
fn operations(doc: &Value) -> BTreeSet<(String, String)> {
    let mut ops = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("path item").keys() {
            if [
                "get", "put", "post", "delete", "options", "head", "patch", "trace",
            ]
            .contains(&method.as_str())
            {
                ops.insert((method.to_ascii_uppercase(), path.clone()));
            }
        }
    }
    ops
}

fn operation<'d>(doc: &'d Value, method: &str, path: &str) -> &'d Value {
    let op = &doc["paths"][path][method.to_ascii_lowercase()];
    assert!(op.is_object(), "{method} {path} is not in the document");
    op
}

/// The media type without its parameters, lowercased.
fn essence(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
}

/// Whether `path` is one a document path template (`/sagas/{id}`) matches.
fn matches_template(template: &str, path: &str) -> bool {
    let t: Vec<&str> = template.split('/').collect();
    let p: Vec<&str> = path.split('/').collect();
    t.len() == p.len()
        && t.iter()
            .zip(&p)
            .all(|(t, p)| (t.starts_with('{') && t.ends_with('}') && !p.is_empty()) || t == p)
}

/// Checks that an answer is one the document declares for `method path`: its status, its
/// content type and, for JSON, its body against the declared schema (every key accounted for).
fn assert_declared(
    doc: &Value,
    method: &str,
    path: &str,
    status: StatusCode,
    content_type: Option<&str>,
    body: &[u8],
) {
    let what = format!("{method} {path} answering {status}");
    let response = &operation(doc, method, path)["responses"][status.as_str()];
    assert!(
        response.is_object(),
        "{what}: the document declares no {status} for it (body: {})",
        text(body)
    );
    let content = response["content"]
        .as_object()
        .unwrap_or_else(|| panic!("{what}: no content declared"));
    let answered = essence(content_type.unwrap_or_else(|| panic!("{what}: no content type")));
    let (_, media) = content
        .iter()
        .find(|(declared, _)| essence(declared) == answered)
        .unwrap_or_else(|| {
            panic!(
                "{what}: content type {answered} is not among the declared {:?}",
                content.keys().collect::<Vec<_>>()
            )
        });
    let schema = &media["schema"];
    if answered == "application/json" {
        let value: Value = serde_json::from_slice(body)
            .unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {}", text(body)));
        Checker::new(doc)
            .full(&value, schema, "body")
            .unwrap_or_else(|e| {
                panic!("{what}: the body does not match its schema: {e}\n{value:#}")
            });
    } else {
        assert_eq!(schema["type"], "string", "{what}: a text body's schema");
        assert!(
            std::str::from_utf8(body).is_ok(),
            "{what}: text that is not UTF-8"
        );
    }
}

/// A small JSON Schema checker for what utoipa writes (`$ref`, `allOf`, `oneOf`, `type`,
/// `enum`, `required`, `properties`, `additionalProperties`, `items`, `format: date-time`),
/// strict about keys: every key of every object must be declared by its schema (a free-form
/// object, one with no `properties`, takes any).
struct Checker<'d> {
    schemas: &'d Map<String, Value>,
}

impl<'d> Checker<'d> {
    fn new(doc: &'d Value) -> Checker<'d> {
        Checker {
            schemas: doc["components"]["schemas"]
                .as_object()
                .expect("components.schemas"),
        }
    }

    fn resolve<'s>(&'s self, schema: &'s Value) -> Result<&'s Value, String>
    where
        'd: 's,
    {
        match schema.get("$ref").and_then(Value::as_str) {
            None => Ok(schema),
            Some(r) => {
                let name = r
                    .strip_prefix("#/components/schemas/")
                    .ok_or_else(|| format!("a $ref outside components: {r}"))?;
                let target = self
                    .schemas
                    .get(name)
                    .ok_or_else(|| format!("a $ref to a missing schema: {r}"))?;
                self.resolve(target)
            }
        }
    }

    /// `value` against `schema`, every key of an object accounted for.
    fn full(&self, value: &Value, schema: &Value, at: &str) -> Result<(), String> {
        let covered = self.check(value, schema, at)?;
        if let Value::Object(map) = value
            && let Some(key) = map.keys().find(|k| !covered.contains(*k))
        {
            return Err(format!("{at}: `{key}` is not in its schema"));
        }
        Ok(())
    }

    /// `value` against `schema`; for an object, the keys the schema accounts for.
    fn check(&self, value: &Value, schema: &Value, at: &str) -> Result<BTreeSet<String>, String> {
        let schema = self.resolve(schema)?;
        let mut covered = BTreeSet::new();
        if let Some(all) = schema.get("allOf").and_then(Value::as_array) {
            for member in all {
                covered.extend(self.check(value, member, at)?);
            }
        }
        if let Some(variants) = schema.get("oneOf").and_then(Value::as_array) {
            let results: Vec<_> = variants.iter().map(|v| self.check(value, v, at)).collect();
            let passing: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
            match passing.as_slice() {
                [one] => covered.extend(one.iter().cloned()),
                [] => {
                    let why: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
                    return Err(format!("{at}: no variant of oneOf matches: {why:?}"));
                }
                more => return Err(format!("{at}: {} variants of oneOf match", more.len())),
            }
        }
        if let Some(types) = schema.get("type") {
            let types: Vec<&str> = match types {
                Value::String(t) => vec![t.as_str()],
                Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
                other => return Err(format!("{at}: a type that is neither: {other}")),
            };
            if !types.iter().any(|t| is_type(value, t)) {
                return Err(format!("{at}: {value} is not of type {types:?}"));
            }
        }
        if let Some(values) = schema.get("enum").and_then(Value::as_array)
            && !values.contains(value)
        {
            return Err(format!("{at}: {value} is not one of {values:?}"));
        }
        if schema.get("format").and_then(Value::as_str) == Some("date-time")
            && let Value::String(t) = value
        {
            chrono::DateTime::parse_from_rfc3339(t)
                .map_err(|e| format!("{at}: `{t}` is not an RFC 3339 time: {e}"))?;
        }
        if let Value::Object(map) = value {
            for key in schema
                .get("required")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
            {
                if !map.contains_key(key) {
                    return Err(format!("{at}: required `{key}` is missing"));
                }
            }
            let properties = schema.get("properties").and_then(Value::as_object);
            for (key, property) in properties.into_iter().flatten() {
                if let Some(v) = map.get(key) {
                    self.full(v, property, &format!("{at}.{key}"))?;
                    covered.insert(key.clone());
                }
            }
            let declared = |k: &String| properties.is_some_and(|p| p.contains_key(k));
            match schema.get("additionalProperties") {
                Some(extra @ Value::Object(_)) => {
                    for (key, v) in map.iter().filter(|(k, _)| !declared(k)) {
                        self.full(v, extra, &format!("{at}.{key}"))?;
                        covered.insert(key.clone());
                    }
                }
                Some(Value::Bool(false)) => {}
                _ => {
                    let free_form = properties.is_none()
                        && schema.get("allOf").is_none()
                        && schema.get("oneOf").is_none();
                    if free_form {
                        covered.extend(map.keys().cloned());
                    }
                }
            }
        }
        if let (Value::Array(items), Some(item)) = (value, schema.get("items")) {
            for (i, v) in items.iter().enumerate() {
                self.full(v, item, &format!("{at}[{i}]"))?;
            }
        }
        Ok(covered)
    }
}

fn is_type(value: &Value, t: &str) -> bool {
    match t {
        "null" => value.is_null(),
        "boolean" => value.is_boolean(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "string" => value.is_string(),
        "array" => value.is_array(),
        "object" => value.is_object(),
        _ => false,
    }
}

/// Every `$ref` string anywhere in `value`.
fn refs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("$ref", Value::String(r)) => out.push(r.clone()),
                    _ => refs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| refs(v, out)),
        _ => {}
    }
}

// --- tests ------------------------------------------------------------------------------------

#[test]
fn the_document_is_openapi_3_with_a_title_and_a_version() {
    let doc = document();
    let version = doc["openapi"].as_str().expect("`openapi`");
    assert!(version.starts_with("3."), "OpenAPI {version}");
    let title = doc["info"]["title"].as_str().expect("info.title");
    assert!(title.contains("sagaflow"), "title {title}");
    assert_eq!(
        doc["info"]["version"].as_str(),
        Some(env!("CARGO_PKG_VERSION")),
        "info.version is the engine's"
    );
}

#[tokio::test]
async fn the_document_lists_exactly_the_routes_the_router_serves() {
    let doc = document();
    let expected: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| ((*m).to_owned(), (*p).to_owned()))
        .collect();
    let documented = operations(&doc);
    assert_eq!(
        documented,
        expected,
        "documented but not expected: {:?}; expected but not documented: {:?}",
        documented.difference(&expected).collect::<Vec<_>>(),
        expected.difference(&documented).collect::<Vec<_>>()
    );

    let f = fixture().await;
    for (method, template) in ROUTES {
        let path = f.concrete(template);
        // A POST gets a body no handler takes (unknown field): each one answers 400 from the
        // handler, and nothing changes.
        let body = (*method == "POST").then_some(r#"{"no such field": true}"#);
        let (status, content_type, answer) = f.call(method, &path, body).await;
        assert!(
            !is_fallback(status, &answer),
            "{method} {path}: the router's fallback answered: {status} {}",
            text(&answer)
        );
        if *method == "POST" {
            assert_eq!(
                status,
                StatusCode::BAD_REQUEST,
                "{method} {path}: {}",
                text(&answer)
            );
        } else {
            assert_eq!(status, StatusCode::OK, "{method} {path}: {}", text(&answer));
        }
        assert_declared(
            &doc,
            method,
            template,
            status,
            content_type.as_deref(),
            &answer,
        );

        // An unknown id reaches the handler too, which says what it does not know (with a
        // body the handler takes where it needs one).
        if template.contains("{id}") {
            let path = template.replace("{id}", "no-such-id");
            let body = match *template {
                "/sagas/{id}/release-key" => Some(r#"{"reason": "resolved by hand"}"#),
                "/sagas/{id}/skip" => Some(r#"{"step": "payment", "reason": "paid by hand"}"#),
                _ => None,
            };
            let (status, content_type, answer) = f.call(method, &path, body).await;
            let error = error_of(&answer);
            assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path}: {error}");
            assert!(
                error.starts_with("no saga with id no-such-id")
                    || error.starts_with("no dead letter with id no-such-id"),
                "{method} {path}: {error}"
            );
            assert_declared(
                &doc,
                method,
                template,
                status,
                content_type.as_deref(),
                &answer,
            );
        }
    }
}

#[tokio::test]
async fn paths_and_methods_not_in_the_document_get_the_fallback() {
    let doc = document();
    let f = fixture().await;
    let templates: Vec<String> = doc["paths"]
        .as_object()
        .expect("paths")
        .keys()
        .cloned()
        .collect();
    let nowhere = [
        "/nowhere".to_owned(),
        "/openapi.yaml".to_owned(),
        "/api/sagas".to_owned(),
        "/console".to_owned(),
        "/console/app.ts".to_owned(),
        "/saga".to_owned(),
        format!("/sagas/{}/nothing", f.running),
        format!("/sagas/{}/graph/svg", f.running),
        format!("/dead-letters/{}/replay", f.letters[0]),
        "/metrics/sagaflow_sagas_started_total".to_owned(),
        "/healthz/db".to_owned(),
    ];
    for path in &nowhere {
        assert!(
            !templates.iter().any(|t| matches_template(t, path)),
            "{path} is in the document: pick another"
        );
        for method in METHODS {
            let (status, content_type, answer) = f.call(method, path, None).await;
            assert_eq!(
                status,
                StatusCode::NOT_FOUND,
                "{method} {path}: {}",
                text(&answer)
            );
            assert!(
                error_of(&answer).starts_with(&format!("no route for {method} {path}")),
                "{method} {path}: {}",
                text(&answer)
            );
            assert_eq!(content_type.as_deref(), Some("application/json"));
        }
    }

    // Every documented path answers 405 to the methods the document does not give it.
    let documented = operations(&doc);
    for template in &templates {
        let path = f.concrete(template);
        for method in METHODS {
            if documented.contains(&((*method).to_owned(), template.clone())) {
                continue;
            }
            let (status, _, answer) = f.call(method, &path, None).await;
            assert_eq!(
                status,
                StatusCode::METHOD_NOT_ALLOWED,
                "{method} {path}: {}",
                text(&answer)
            );
            assert_eq!(
                error_of(&answer),
                format!("{method} is not allowed on {path}"),
                "{method} {path}"
            );
        }
    }
}

#[test]
fn every_response_and_body_refers_to_a_schema_in_components() {
    let doc = document();
    let schemas = doc["components"]["schemas"]
        .as_object()
        .expect("components.schemas");
    let component = |schema: &Value, what: &str| -> String {
        let r = schema["$ref"]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: the schema is not a $ref to a component: {schema}"));
        let name = r
            .strip_prefix("#/components/schemas/")
            .unwrap_or_else(|| panic!("{what}: {r} is not in components"));
        assert!(schemas.contains_key(name), "{what}: {r} does not exist");
        name.to_owned()
    };

    let mut operation_ids = BTreeSet::new();
    for (method, path) in operations(&doc) {
        let op = operation(&doc, &method, &path);
        let what = format!("{method} {path}");
        assert!(
            operation_ids.insert(op["operationId"].as_str().expect("operationId").to_owned()),
            "{what}: operationId used twice"
        );
        assert!(
            op["summary"].as_str().is_some_and(|s| !s.is_empty()),
            "{what}: summary"
        );

        // Path parameters: each `{name}` declared, in the path, required.
        let declared: Vec<&Value> = op["parameters"].as_array().into_iter().flatten().collect();
        for segment in path.split('/').filter(|s| s.starts_with('{')) {
            let name = segment.trim_matches(|c| c == '{' || c == '}');
            assert!(
                declared
                    .iter()
                    .any(|p| p["name"] == name && p["in"] == "path" && p["required"] == true),
                "{what}: path parameter {name} not declared"
            );
        }

        if let Some(body) = op.get("requestBody") {
            let content = body["content"].as_object().expect("request content");
            assert_eq!(
                content.keys().collect::<Vec<_>>(),
                ["application/json"],
                "{what}: request body"
            );
            component(
                &content["application/json"]["schema"],
                &format!("{what} request"),
            );
        } else {
            assert_ne!(method, "POST", "{what}: a POST without a request body");
        }

        let responses = op["responses"].as_object().expect("responses");
        assert!(
            responses.keys().any(|s| s.starts_with('2')),
            "{what}: no success response"
        );
        for (status, response) in responses {
            let what = format!("{what} {status}");
            assert!(
                response["description"]
                    .as_str()
                    .is_some_and(|d| !d.is_empty()),
                "{what}: description"
            );
            let content = response["content"]
                .as_object()
                .filter(|c| !c.is_empty())
                .unwrap_or_else(|| panic!("{what}: no content"));
            for (media_type, media) in content {
                let schema = &media["schema"];
                if essence(media_type) == "application/json" {
                    let name = component(schema, &what);
                    if status.starts_with('4') || status.starts_with('5') {
                        let expected = if path == "/healthz" && status == "503" {
                            "Health"
                        } else {
                            "ErrorBody"
                        };
                        assert_eq!(name, expected, "{what}: an error's schema");
                    }
                } else {
                    assert!(status.starts_with('2'), "{what}: an error that is not JSON");
                    assert_eq!(schema["type"], "string", "{what} {media_type}: text schema");
                }
            }
        }
        // The errors every request can meet where it applies.
        let has = |s: &str| responses.contains_key(s);
        assert!(has("405"), "{what}: 405");
        if op.get("requestBody").is_some() {
            for s in ["400", "413", "415"] {
                assert!(has(s), "{what}: a body can be refused with {s}");
            }
        }
        if path.contains("{id}") {
            assert!(
                has("400") && has("404"),
                "{what}: an id can be unreadable or unknown"
            );
        }
        if path.starts_with("/sagas/{id}/") && method == "POST" {
            assert!(has("409"), "{what}: an operator action can be refused");
        }
    }

    let error = &schemas["ErrorBody"];
    assert_eq!(error["type"], "object");
    assert_eq!(error["required"], json!(["error"]));
    assert_eq!(error["properties"]["error"]["type"], "string");

    // Every $ref resolves, and every component is used.
    let mut all = Vec::new();
    refs(&doc, &mut all);
    let used: BTreeSet<&str> = all
        .iter()
        .map(|r| {
            let name = r
                .strip_prefix("#/components/schemas/")
                .unwrap_or_else(|| panic!("{r} is not in components"));
            assert!(schemas.contains_key(name), "{r} does not exist");
            name
        })
        .collect();
    for name in schemas.keys() {
        assert!(
            used.contains(name.as_str()),
            "component {name} is never used"
        );
    }
}

#[tokio::test]
async fn get_openapi_json_answers_the_same_document() {
    let f = fixture().await;
    let (status, content_type, body) = f.call("GET", "/openapi.json", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        content_type.as_deref().map(essence).as_deref(),
        Some("application/json")
    );
    let served: Value = serde_json::from_slice(&body).expect("JSON");
    assert_eq!(served, document(), "GET /openapi.json is http::openapi()");
}

#[tokio::test]
async fn real_answers_match_their_declared_schemas() {
    let doc = document();
    let f = fixture().await;
    let checker = Checker::new(&doc);

    // A saga's detail: every top-level key is a property of the declared SagaDetail (its own,
    // or its status's), and the whole body matches it.
    let saga_schema = json!({"$ref": "#/components/schemas/SagaDetail"});
    for id in [&f.running, &f.paused] {
        let (status, content_type, body) = f.call("GET", &format!("/sagas/{id}"), None).await;
        assert_eq!(status, StatusCode::OK);
        let detail: Value = serde_json::from_slice(&body).expect("JSON");
        let declared = checker
            .check(&detail, &saga_schema, "saga")
            .expect("a saga matches SagaDetail");
        for key in detail.as_object().expect("an object").keys() {
            assert!(
                declared.contains(key),
                "`{key}` of GET /sagas/{{id}} is not a property of SagaDetail"
            );
        }
        assert!(declared.contains("state") && declared.contains("steps"));
        assert_declared(
            &doc,
            "GET",
            "/sagas/{id}",
            status,
            content_type.as_deref(),
            &body,
        );
    }
    let paused: Value = {
        let (_, _, body) = f.call("GET", &format!("/sagas/{}", f.paused), None).await;
        serde_json::from_slice(&body).expect("JSON")
    };
    assert!(
        paused["paused"]["since"].is_string(),
        "the paused saga: {paused:#}"
    );

    // Each answer below is checked against what the document declares for it.
    let start =
        json!({"saga": "order-paid", "input": order_input("o-3"), "idempotency_key": "k-3"})
            .to_string();
    let skip = r#"{"step": "payment", "as": "done", "reason": "paid by hand"}"#;
    let replay = format!(r#"{{"ids": ["{}", "no-such-letter"]}}"#, f.letters[1]);
    let cases: Vec<(&str, String, Option<&str>, StatusCode)> = vec![
        ("POST", "/sagas".into(), Some(&start), StatusCode::CREATED),
        ("POST", "/sagas".into(), Some(&start), StatusCode::OK),
        (
            "POST",
            "/sagas".into(),
            Some(r#"{"saga": "nope"}"#),
            StatusCode::NOT_FOUND,
        ),
        ("POST", "/sagas".into(), Some("{"), StatusCode::BAD_REQUEST),
        ("GET", "/sagas?limit=1".into(), None, StatusCode::OK),
        (
            "GET",
            "/sagas?state=paused".into(),
            None,
            StatusCode::BAD_REQUEST,
        ),
        (
            "GET",
            format!("/sagas/{}/graph?format=svg", f.running),
            None,
            StatusCode::OK,
        ),
        (
            "GET",
            format!("/sagas/{}/graph?format=dot", f.running),
            None,
            StatusCode::OK,
        ),
        (
            "GET",
            format!("/sagas/{}/graph?format=mermaid", f.running),
            None,
            StatusCode::OK,
        ),
        (
            "POST",
            format!("/sagas/{}/resume", f.paused),
            Some(r#"{"actor": "ops"}"#),
            StatusCode::OK,
        ),
        (
            "POST",
            format!("/sagas/{}/pause", f.paused),
            None,
            StatusCode::OK,
        ),
        (
            "POST",
            format!("/sagas/{}/pause", f.paused),
            None,
            StatusCode::CONFLICT,
        ),
        (
            "POST",
            format!("/sagas/{}/retry", f.running),
            None,
            StatusCode::CONFLICT,
        ),
        (
            "POST",
            format!("/sagas/{}/skip", f.running),
            Some(skip),
            StatusCode::CONFLICT,
        ),
        (
            "POST",
            format!("/sagas/{}/release-key", f.running),
            None,
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            format!("/sagas/{}/abort", f.running),
            Some(r#"{"reason": "test"}"#),
            StatusCode::OK,
        ),
        ("GET", "/stats".into(), None, StatusCode::OK),
        ("GET", "/stats?minutes=0".into(), None, StatusCode::OK),
        (
            "GET",
            "/stats?minutes=9999".into(),
            None,
            StatusCode::BAD_REQUEST,
        ),
        ("GET", "/dead-letters".into(), None, StatusCode::OK),
        ("GET", "/dead-letters?limit=1".into(), None, StatusCode::OK),
        (
            "GET",
            format!("/dead-letters/{}", f.letters[1]),
            None,
            StatusCode::OK,
        ),
        (
            "POST",
            "/dead-letters/replay".into(),
            Some(&replay),
            StatusCode::OK,
        ),
        (
            "POST",
            "/dead-letters/purge".into(),
            Some(r#"{"ids": ["no-such-letter"]}"#),
            StatusCode::OK,
        ),
        (
            "POST",
            "/dead-letters/purge".into(),
            Some(r#"{}"#),
            StatusCode::BAD_REQUEST,
        ),
        ("GET", "/healthz".into(), None, StatusCode::OK),
        ("GET", "/metrics".into(), None, StatusCode::OK),
    ];
    for (method, path, body, expected) in cases {
        let (status, content_type, answer) = f.call(method, &path, body).await;
        assert_eq!(status, expected, "{method} {path}: {}", text(&answer));
        let bare = path.split('?').next().unwrap_or_default();
        let template = ROUTES
            .iter()
            .find(|(m, t)| *m == method && matches_template(t, bare))
            .map(|(_, t)| *t)
            .unwrap_or_else(|| panic!("{method} {path} matches no route"));
        assert_declared(
            &doc,
            method,
            template,
            status,
            content_type.as_deref(),
            &answer,
        );
    }

    // A body that is not declared JSON (415) and one over the limit (413).
    let cases = [
        (
            "text/plain",
            start.clone().into_bytes(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        (
            "application/json",
            vec![b' '; 3 * 1024 * 1024],
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
    ];
    for (declared_type, body, expected) in cases {
        let request = Request::builder()
            .method(Method::POST)
            .uri("/sagas")
            .header(header::CONTENT_TYPE, declared_type)
            .body(Body::from(body))
            .expect("request");
        let response = f.router.clone().oneshot(request).await.expect("infallible");
        let status = response.status();
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().expect("ASCII").to_owned());
        let answer = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .expect("body");
        assert_eq!(status, expected, "{}", text(&answer));
        assert_declared(
            &doc,
            "POST",
            "/sagas",
            status,
            content_type.as_deref(),
            &answer,
        );
    }

    // The engine's database gone: health is 503 with its declared body, the rest 500.
    f.engine.store().pool().close().await;
    let (status, content_type, answer) = f.call("GET", "/healthz", None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{}", text(&answer));
    assert_declared(
        &doc,
        "GET",
        "/healthz",
        status,
        content_type.as_deref(),
        &answer,
    );
    let (status, content_type, answer) = f.call("GET", "/sagas", None).await;
    assert_eq!(
        status,
        StatusCode::INTERNAL_SERVER_ERROR,
        "{}",
        text(&answer)
    );
    assert_declared(
        &doc,
        "GET",
        "/sagas",
        status,
        content_type.as_deref(),
        &answer,
    );
}

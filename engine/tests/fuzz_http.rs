//! Fuzzing the HTTP API (issue 9, item 10): the real router (`http::router`) driven in-process
//! (`tower::ServiceExt::oneshot`) over an engine on SQLite and the in-process transport.
//!
//! Requests: any method, any path (the API's routes with existing, random, percent-encoded and
//! non-UTF-8 ids, and random paths), any query string on `GET /sagas`, any `Content-Type`, any
//! body — arbitrary bytes, arbitrary JSON, and each endpoint's real body with its fields
//! removed, replaced by random JSON, renamed or added to, or cut short. Property: never a panic
//! or a hang; the status is one the API documents (200, 201, 400, 404, 405, 409, 413, 415 — a
//! 500 is only for a failing database, and this one does not fail); every failure has a JSON
//! body `{"error": "…"}` with a message; every success but `/metrics`, the console's page and assets and a saga's drawing is JSON; 415 only for a
//! body that is not declared JSON; 201 only for a start. `PROPTEST_CASES=20000` runs longer.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderValue, Method, Request, StatusCode, header};
use proptest::prelude::*;
use proptest::sample::Index;
use sagaflow_engine::store::{ENGINE_MIGRATIONS, Store};
use sagaflow_engine::transport::memory::MemoryTransport;
use sagaflow_engine::{Engine, http};
use serde_json::{Value, json};
use tower::ServiceExt;

/// Cases per property unless `PROPTEST_CASES` says otherwise.
const CASES: u32 = 400;

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(CASES);
    ProptestConfig {
        cases,
        max_shrink_iters: 1_000,
        ..ProptestConfig::default()
    }
}

const ORDER: &str = include_str!("../../sagas/order.yaml");

/// One engine for every case: its sagas pile up as the fuzzing starts and aborts them, which
/// only widens what the requests meet.
struct Fixture {
    rt: tokio::runtime::Runtime,
    router: Router,
    ids: Vec<String>,
    hash: String,
    _dir: TempDir,
}

#[derive(Debug)]
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let dir = std::env::temp_dir().join(format!(
            "sagaflow-fuzz-http-{}-{:08x}",
            std::process::id(),
            fastrand::u32(..)
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let url = format!("sqlite://{}?mode=rwc", dir.join("test.db").display());
        let (router, ids, hash) = rt.block_on(async {
            let store = Store::connect(&url, 1).await.expect("connect");
            store.migrate(&[ENGINE_MIGRATIONS]).await.expect("migrate");
            let engine = Engine::new(store, Arc::new(MemoryTransport::default()));
            let graph = engine.register(ORDER).await.expect("order saga");
            let mut ids = Vec::new();
            for i in 0..3 {
                let started = engine
                    .start(&graph, order_input(&format!("o-{i}")), None)
                    .await
                    .expect("start");
                ids.push(started.id);
            }
            (http::router(engine), ids, graph.content_hash().to_owned())
        });
        Fixture {
            rt,
            router,
            ids,
            hash,
            _dir: TempDir(dir),
        }
    })
}

fn order_input(order: &str) -> Value {
    json!({
        "order_id": order, "user_id": "u-1", "amount": "12.50",
        "coupon_id": "c-1", "points": 10, "campaign_id": "spring",
    })
}

// --- strategies -------------------------------------------------------------------------------

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        Just(json!(1.5)),
        ".{0,12}".prop_map(Value::from),
        Just(json!("")),
        Just(json!("   ")),
        Just(json!("order-paid")),
        Just(json!("done")),
        Just(json!("compensated")),
        Just(json!("payment")),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map("[a-z_]{0,10}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A path segment, percent-encoded as a client would (or not quite).
fn id() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => any::<Index>().prop_map(|i| {
            let ids = &fixture().ids;
            ids[i.index(ids.len())].clone()
        }),
        2 => "[A-Za-z0-9_.~-]{0,40}",
        1 => proptest::collection::vec(any::<u8>(), 0..12).prop_map(|b| encode(&b)),
        1 => ".{0,8}".prop_map(|s| encode(s.as_bytes())),
        1 => Just("%FF%FE".to_owned()),
        1 => Just("%".to_owned()),
        1 => Just("%zz".to_owned()),
        1 => Just("..".to_owned()),
    ]
}

fn encode(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(b) {
                char::from(*b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

const ACTIONS: &[&str] = &["retry", "abort", "release-key", "skip", "pause", "resume"];

fn query() -> impl Strategy<Value = String> {
    let name = prop_oneof![
        Just("state".to_owned()),
        Just("key".to_owned()),
        Just("limit".to_owned()),
        Just("after".to_owned()),
        "[a-z]{0,6}",
    ];
    let value = prop_oneof![
        Just("running".to_owned()),
        Just("failed".to_owned()),
        Just("50".to_owned()),
        Just("0".to_owned()),
        Just("1001".to_owned()),
        Just("-1".to_owned()),
        Just("99999999999999999999".to_owned()),
        Just("o-1".to_owned()),
        "[A-Za-z0-9]{0,12}",
        proptest::collection::vec(any::<u8>(), 0..10).prop_map(|b| encode(&b)),
        Just("%FF".to_owned()),
    ];
    proptest::collection::vec((name, value, any::<bool>()), 0..4).prop_map(|params| {
        params
            .into_iter()
            .map(|(n, v, with_value)| if with_value { format!("{n}={v}") } else { n })
            .collect::<Vec<_>>()
            .join("&")
    })
}

/// The routes whose success is not JSON: Prometheus text, the console's page and assets, and
/// a saga's drawing.
fn answers_text(path: &str) -> bool {
    let route = path.split('?').next().unwrap_or(path);
    route == "/metrics"
        || route == "/"
        || route.starts_with("/console/")
        || route.ends_with("/graph")
}

fn path() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => query().prop_map(|q| if q.is_empty() { "/sagas".to_owned() } else { format!("/sagas?{q}") }),
        3 => id().prop_map(|id| format!("/sagas/{id}")),
        6 => (id(), any::<Index>()).prop_map(|(id, a)| format!("/sagas/{id}/{}", ACTIONS[a.index(ACTIONS.len())])),
        1 => (id(), "[a-z-]{0,12}").prop_map(|(id, a)| format!("/sagas/{id}/{a}")),
        1 => Just("/healthz".to_owned()),
        1 => Just("/metrics".to_owned()),
        1 => prop_oneof![Just("/"), Just("/console/app.js"), Just("/openapi.json"), Just("/stats")].prop_map(str::to_owned),
        1 => "/[A-Za-z0-9/._~%?=&-]{0,30}",
    ]
}

fn method() -> impl Strategy<Value = Method> {
    prop_oneof![
        4 => Just(Method::POST),
        3 => Just(Method::GET),
        1 => Just(Method::PUT),
        1 => Just(Method::DELETE),
        1 => Just(Method::PATCH),
        1 => Just(Method::HEAD),
        1 => Just(Method::OPTIONS),
    ]
}

fn content_type() -> impl Strategy<Value = Option<Vec<u8>>> {
    prop_oneof![
        6 => Just(Some(b"application/json".to_vec())),
        1 => Just(None),
        1 => Just(Some(b"application/json; charset=utf-8".to_vec())),
        1 => Just(Some(b"APPLICATION/JSON ;x=y".to_vec())),
        1 => Just(Some(b"application/merge-patch+json".to_vec())),
        1 => Just(Some(b"text/plain".to_vec())),
        1 => Just(Some(b"".to_vec())),
        1 => "[ -~]{0,24}".prop_map(|s| Some(s.into_bytes())),
        1 => proptest::collection::vec(any::<u8>(), 0..24).prop_map(Some),
    ]
}

/// Edits of a body's top-level fields, as in `fuzz_wire`.
#[derive(Debug, Clone)]
enum FieldEdit {
    Remove(Index),
    Replace(Index, Value),
    Add(String, Value),
    Rename(Index, String),
}

/// The fields the API's bodies know, so that an added or renamed field is often a real one.
const FIELDS: &[&str] = &[
    "saga",
    "input",
    "idempotency_key",
    "definition_hash",
    "actor",
    "reason",
    "step",
    "as",
    "output",
];

fn field_name() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => any::<Index>().prop_map(|i| FIELDS[i.index(FIELDS.len())].to_owned()),
        1 => "[a-z_]{0,10}",
    ]
}

fn field_edit() -> impl Strategy<Value = FieldEdit> {
    prop_oneof![
        2 => any::<Index>().prop_map(FieldEdit::Remove),
        3 => (any::<Index>(), json_value()).prop_map(|(i, v)| FieldEdit::Replace(i, v)),
        1 => (field_name(), json_value()).prop_map(|(k, v)| FieldEdit::Add(k, v)),
        1 => (any::<Index>(), field_name()).prop_map(|(i, k)| FieldEdit::Rename(i, k)),
    ]
}

fn edit_fields(doc: &mut Value, edits: &[FieldEdit]) {
    let Some(obj) = doc.as_object_mut() else {
        return;
    };
    for e in edits {
        let keys: Vec<String> = obj.keys().cloned().collect();
        let pick = |i: &Index| (!keys.is_empty()).then(|| keys[i.index(keys.len())].clone());
        match e {
            FieldEdit::Remove(i) => {
                if let Some(k) = pick(i) {
                    obj.remove(&k);
                }
            }
            FieldEdit::Replace(i, v) => {
                if let Some(k) = pick(i) {
                    obj.insert(k, v.clone());
                }
            }
            FieldEdit::Add(k, v) => {
                obj.insert(k.clone(), v.clone());
            }
            FieldEdit::Rename(i, to) => {
                if let Some(k) = pick(i)
                    && let Some(v) = obj.remove(&k)
                {
                    obj.insert(to.clone(), v);
                }
            }
        }
    }
}

/// A route and its real body, before edits: `None` for `POST /sagas`, else the action.
fn real_body() -> impl Strategy<Value = (Option<&'static str>, Value)> {
    let text = || prop_oneof![Just(String::new()), Just("  ".to_owned()), ".{0,16}"];
    let step = prop_oneof![
        Just("payment".to_owned()),
        Just("coupon".to_owned()),
        Just("gmv".to_owned()),
        "[a-z]{0,8}",
    ];
    let resolution = prop_oneof![
        Just("done".to_owned()),
        Just("compensated".to_owned()),
        "[a-z]{0,8}"
    ];
    prop_oneof![
        (
            prop_oneof![Just("order-paid".to_owned()), text()],
            "[a-z0-9-]{1,10}",
            proptest::option::of(text()),
            any::<bool>(),
        )
            .prop_map(|(saga, order, key, real_hash)| {
                let hash = if real_hash {
                    fixture().hash.clone()
                } else {
                    "sha256:00".to_owned()
                };
                (None, json!({ "saga": saga, "input": order_input(&order), "idempotency_key": key, "definition_hash": hash }))
            }),
        (prop_oneof![Just("retry"), Just("resume")], text())
            .prop_map(|(a, actor)| (Some(a), json!({ "actor": actor }))),
        (prop_oneof![Just("abort"), Just("pause"), Just("release-key")], text(), text())
            .prop_map(|(a, reason, actor)| (Some(a), json!({ "reason": reason, "actor": actor }))),
        (step, resolution, proptest::option::of(json_value()), text(), text()).prop_map(
            |(step, r, output, reason, actor)| {
                (Some("skip"), json!({ "step": step, "as": r, "output": output, "reason": reason, "actor": actor }))
            }
        ),
    ]
}

/// A real body with its fields edited and maybe cut short.
fn edited(doc: Value, edits: &[FieldEdit], cut: Option<Index>) -> Vec<u8> {
    let mut doc = doc;
    edit_fields(&mut doc, edits);
    let mut bytes = serde_json::to_vec(&doc).expect("encode");
    if let Some(cut) = cut {
        bytes.truncate(cut.index(bytes.len() + 1));
    }
    bytes
}

/// A POST route with its own body, edited (so the body usually gets past the shape check and
/// into the engine).
fn post_route_and_body() -> impl Strategy<Value = (String, Vec<u8>)> {
    (
        real_body(),
        id(),
        proptest::collection::vec(field_edit(), 0..3),
        proptest::option::weighted(0.2, any::<Index>()),
    )
        .prop_map(|((action, doc), id, edits, cut)| {
            let path = match action {
                None => "/sagas".to_owned(),
                Some(a) => format!("/sagas/{id}/{a}"),
            };
            (path, edited(doc, &edits, cut))
        })
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        1 => Just(Vec::new()),
        1 => Just(b" \n\t ".to_vec()),
        2 => proptest::collection::vec(any::<u8>(), 0..256),
        2 => json_value().prop_map(|v| serde_json::to_vec(&v).expect("encode")),
        8 => (
            real_body(),
            proptest::collection::vec(field_edit(), 0..3),
            proptest::option::of(any::<Index>()),
        )
            .prop_map(|((_, doc), edits, cut)| edited(doc, &edits, cut)),
    ]
}

// --- the property -----------------------------------------------------------------------------

/// What the API documents it answers.
const DOCUMENTED: &[u16] = &[200, 201, 400, 404, 405, 409, 413, 415];

fn is_json_type(ct: Option<&[u8]>) -> bool {
    let Some(ct) = ct else { return false };
    let text = String::from_utf8_lossy(ct);
    let essence = text
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

fn check(
    method: Method,
    path: &str,
    content_type: Option<Vec<u8>>,
    body: Vec<u8>,
) -> Result<(), TestCaseError> {
    let f = fixture();
    let mut builder = Request::builder().method(method.clone()).uri(path);
    if let Some(ct) = &content_type {
        // A value no client could send is not a request.
        let Ok(v) = HeaderValue::from_bytes(ct) else {
            return Ok(());
        };
        builder = builder.header(header::CONTENT_TYPE, v);
    }
    let Ok(request) = builder.body(Body::from(body.clone())) else {
        // Not a URI the `http` crate accepts: no server would see it either.
        return Ok(());
    };
    let (status, response_type, bytes) = f.rt.block_on(async {
        let response =
            tokio::time::timeout(Duration::from_secs(20), f.router.clone().oneshot(request))
                .await
                .expect("an answer within 20s")
                .expect("the router is infallible");
        let status = response.status();
        let ct = response
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        let bytes = axum::body::to_bytes(response.into_body(), 4 << 20)
            .await
            .expect("the body reads");
        (status, ct, bytes)
    });
    let answer = String::from_utf8_lossy(&bytes);
    prop_assert!(
        DOCUMENTED.contains(&status.as_u16()),
        "{} {} answered {}: {}",
        method,
        path,
        status,
        answer
    );
    if status == StatusCode::CREATED {
        prop_assert!(
            method == Method::POST && path.split('?').next() == Some("/sagas"),
            "201 for {} {}",
            method,
            path
        );
    }
    if status == StatusCode::UNSUPPORTED_MEDIA_TYPE {
        prop_assert!(
            !is_json_type(content_type.as_deref()),
            "415 for a JSON body"
        );
    }
    if method == Method::HEAD {
        return Ok(());
    }
    if status.is_client_error() || status.is_server_error() {
        prop_assert!(
            response_type
                .as_deref()
                .is_some_and(|t| t.starts_with("application/json")),
            "error bodies are JSON, got {:?}",
            response_type
        );
        let doc: Value = serde_json::from_slice(&bytes)
            .map_err(|e| TestCaseError::fail(format!("not JSON ({e}): {answer}")))?;
        let message = doc["error"].as_str().unwrap_or("");
        prop_assert!(!message.trim().is_empty(), "no error message: {}", doc);
    } else if !answers_text(path) {
        prop_assert!(
            serde_json::from_slice::<Value>(&bytes).is_ok(),
            "{} {} answered {} with a body that is not JSON: {}",
            method,
            path,
            status,
            answer
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn any_request_gets_a_documented_answer(
        method in method(),
        path in path(),
        content_type in content_type(),
        body in body(),
    ) {
        check(method, &path, content_type, body)?;
    }

    /// The start and operator routes with their own bodies, edited: what reaches the engine.
    #[test]
    fn edited_real_bodies_get_a_documented_answer(
        (path, body) in post_route_and_body(),
        json in proptest::bool::weighted(0.9),
        content_type in content_type(),
    ) {
        let content_type = if json { Some(b"application/json".to_vec()) } else { content_type };
        check(Method::POST, &path, content_type, body)?;
    }
}

/// The fixture works: a real start is answered 201, so the fuzzing reaches the engine.
#[test]
fn a_real_start_is_created() {
    let body = json!({ "saga": "order-paid", "input": order_input("o-real") });
    let f = fixture();
    let request = Request::post("/sagas")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(serde_json::to_vec(&body).expect("encode")))
        .expect("request");
    let status =
        f.rt.block_on(f.router.clone().oneshot(request))
            .expect("infallible")
            .status();
    assert_eq!(status, StatusCode::CREATED);
}

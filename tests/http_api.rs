//! The engine's HTTP API (`sagaflow_engine::http`) served on 127.0.0.1 by the test, and the
//! `sagaflow` CLI's `--server` mode against it: every endpoint, every refusal with its JSON
//! error, and the metrics the sagas leave behind. SQLite for most tests; the round trip also runs
//! on the real PostgreSQL.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use sagaflow_engine::machine::{Event, Op, Outcome};
use sagaflow_engine::store::{ENGINE_MIGRATIONS, Store};
use sagaflow_engine::transport::memory::MemoryTransport;
use sagaflow_engine::transport::{Message, REPLY_QUEUE, Transport};
use sagaflow_engine::{Engine, Incoming, http};
use sagaflow_workers::services;
use serde_json::{Value, json};
use support::{Backend, Setup, System, fresh_db, wait_all_final};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

const LIMIT: Duration = Duration::from_secs(90);

/// The API served on a free port of 127.0.0.1.
struct Server {
    base: String,
    stop: watch::Sender<bool>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Server {
    async fn start(engine: Arc<Engine>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("address"));
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(http::serve(engine, listener, stopped));
        Server { base, stop, task }
    }

    /// Graceful shutdown: `serve` returns Ok once the watch turns true.
    async fn shutdown(self) {
        self.stop.send(true).expect("server still listening");
        let served = tokio::time::timeout(LIMIT, self.task)
            .await
            .expect("serve returns after the shutdown signal")
            .expect("serve task");
        assert!(served.is_ok(), "serve failed: {served:?}");
    }
}

/// One HTTP answer.
#[derive(Debug)]
struct Answer {
    status: u16,
    content_type: String,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// Asserts a failure with this status and a JSON `{"error": …}` containing `needle`.
    fn error(&self, status: u16, needle: &str) -> String {
        assert_eq!(self.status, status, "{}", self.body);
        assert!(
            self.content_type.starts_with("application/json"),
            "error bodies are JSON, got {}: {}",
            self.content_type,
            self.body
        );
        let doc = self.json();
        let message = doc["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no `error` in {doc}"));
        assert!(
            message.contains(needle),
            "error `{message}` should contain `{needle}`"
        );
        message.to_owned()
    }
}

/// `method url` with an optional body and its content type, on a blocking thread.
async fn call(method: &str, url: &str, body: Option<(&str, &str)>) -> Answer {
    let (method, url) = (method.to_owned(), url.to_owned());
    let body = body.map(|(ct, b)| (ct.to_owned(), b.to_owned()));
    tokio::task::spawn_blocking(move || {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(LIMIT))
            .build()
            .new_agent();
        let answer = match (method.as_str(), body) {
            ("GET", None) => agent.get(&url).call(),
            ("DELETE", None) => agent.delete(&url).call(),
            ("POST", None) => agent.post(&url).send_empty(),
            ("POST", Some((ct, b))) if ct.is_empty() => agent.post(&url).send(b.as_str()),
            ("POST", Some((ct, b))) => agent.post(&url).header("content-type", ct).send(b.as_str()),
            other => panic!("unsupported request {other:?}"),
        };
        let mut response = answer.unwrap_or_else(|e| panic!("{method} {url}: {e}"));
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        Answer {
            status: response.status().as_u16(),
            content_type,
            body: response.body_mut().read_to_string().expect("body"),
        }
    })
    .await
    .expect("request thread")
}

async fn get(url: &str) -> Answer {
    call("GET", url, None).await
}

async fn post_json(url: &str, body: &Value) -> Answer {
    call("POST", url, Some(("application/json", &body.to_string()))).await
}

/// The value of the sample `series` (name and labels exactly as exposed).
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        value.split(' ').next()?.parse().ok()
    })
}

/// Polls `check` until it returns Some, at most `LIMIT`.
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(start.elapsed() < LIMIT, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The full system (engine, workers) behind the API: start through POST, read through GET,
/// page through the list, and the metrics the sagas leave.
async fn round_trip(url: String) {
    let sys = System::start(&url, Setup::default()).await;
    let server = Server::start(sys.engine.clone()).await;
    let base = server.base.clone();
    let mut orders = sys.orders("api", 3).await;
    // An unknown coupon: the coupon step fails for good and the saga compensates.
    orders[2]["coupon_id"] = json!("c-does-not-exist");

    let mut ids = Vec::new();
    for (i, order) in orders.iter().enumerate() {
        let req =
            json!({"saga": "order-paid", "input": order, "idempotency_key": format!("api-{i}")});
        let first = post_json(&format!("{base}/sagas"), &req).await;
        assert_eq!(first.status, 201, "{}", first.body);
        let started = first.json();
        assert_eq!(started["existing"], json!(false));
        assert_eq!(started["saga"], json!("order-paid"));
        assert_eq!(started["definition_hash"], json!(sys.order.content_hash()));
        let id = started["id"].as_str().expect("id").to_owned();
        // The same key again: the same saga, nothing new.
        let again = post_json(&format!("{base}/sagas"), &req).await;
        assert_eq!(again.status, 200, "{}", again.body);
        assert_eq!(again.json()["id"], json!(id));
        assert_eq!(again.json()["existing"], json!(true));
        ids.push(id);
    }
    wait_all_final(&sys.store, LIMIT).await;

    // GET /sagas/{id}: state, steps with status and attempts, timeline.
    let done = get(&format!("{base}/sagas/{}", ids[0])).await;
    assert_eq!(done.status, 200, "{}", done.body);
    let doc = done.json();
    assert_eq!(doc["id"], json!(ids[0]));
    assert_eq!(doc["state"], json!("completed"));
    assert_eq!(doc["idempotency_key"], json!("api-0"));
    let steps = doc["steps"].as_array().expect("steps");
    let names: Vec<&str> = steps
        .iter()
        .map(|s| s["id"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(names, ["payment", "coupon", "points", "gmv"]);
    for s in steps {
        assert!(s["attempts"].as_u64().unwrap_or(0) >= 1, "{s}");
    }
    assert_eq!(steps[0]["status"], json!("succeeded"));
    assert_eq!(steps[1]["status"], json!("confirmed"));
    let kinds: Vec<&str> = doc["timeline"]
        .as_array()
        .expect("timeline")
        .iter()
        .map(|r| r["kind"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(kinds.first(), Some(&"created"));
    assert_eq!(kinds.last(), Some(&"completed"));
    let compensated = get(&format!("{base}/sagas/{}", ids[2])).await.json();
    assert_eq!(compensated["state"], json!("compensated"));
    assert!(
        compensated["reason"]
            .as_str()
            .unwrap_or("")
            .contains("c-does-not-exist"),
        "{compensated}"
    );

    // GET /sagas: newest first, paged with the cursor, filtered by state and key.
    let first = get(&format!("{base}/sagas?limit=2")).await.json();
    let page: Vec<&str> = first["sagas"]
        .as_array()
        .expect("sagas")
        .iter()
        .map(|s| s["id"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(page, [ids[2].as_str(), ids[1].as_str()]);
    let next = first["next"].as_str().expect("a next page");
    let second = get(&format!("{base}/sagas?limit=2&after={next}"))
        .await
        .json();
    assert_eq!(second["sagas"][0]["id"], json!(ids[0]));
    assert_eq!(second["sagas"].as_array().map(Vec::len), Some(1));
    assert_eq!(second["next"], Value::Null);
    let completed = get(&format!("{base}/sagas?state=completed")).await.json();
    assert_eq!(completed["sagas"].as_array().map(Vec::len), Some(2));
    let by_key = get(&format!("{base}/sagas?key=o-api-2")).await.json();
    assert_eq!(by_key["sagas"][0]["id"], json!(ids[2]));
    assert_eq!(by_key["sagas"][0]["state"], json!("compensated"));

    // A reply nobody can read is dead-lettered, and counted.
    sys.transport
        .publish(
            REPLY_QUEUE,
            Message {
                id: "poison".into(),
                key: "k".into(),
                payload: b"not a reply".to_vec(),
            },
        )
        .await
        .expect("publish");

    let health = get(&format!("{base}/healthz")).await;
    assert_eq!(
        (health.status, health.json()),
        (200, json!({"status": "ok"}))
    );

    let metrics = eventually("the dead letter in /metrics", || {
        let url = format!("{base}/metrics");
        async move {
            let m = get(&url).await;
            assert_eq!(m.status, 200, "{}", m.body);
            sample(&m.body, "sagaflow_dead_letters_total{queue=\"reply\"}").map(|_| m)
        }
    })
    .await;
    assert!(
        metrics
            .content_type
            .starts_with("application/openmetrics-text"),
        "{}",
        metrics.content_type
    );
    let text = &metrics.body;
    let value =
        |series: &str| sample(text, series).unwrap_or_else(|| panic!("no {series} in:\n{text}"));
    assert_eq!(value("sagaflow_sagas_started_total"), 3.0);
    assert_eq!(
        value("sagaflow_sagas_finished_total{outcome=\"completed\"}"),
        2.0
    );
    assert_eq!(
        value("sagaflow_sagas_finished_total{outcome=\"compensated\"}"),
        1.0
    );
    assert_eq!(
        value("sagaflow_sagas_finished_total{outcome=\"failed\"}"),
        0.0
    );
    assert_eq!(value("sagaflow_dead_letters_total{queue=\"reply\"}"), 1.0);
    // Payment refunded at least (points and gmv too, unless they had not run).
    assert!(value("sagaflow_compensations_total") >= 1.0, "{text}");
    assert!(
        value("sagaflow_step_duration_seconds_count{service=\"payment\",op=\"action\"}") >= 1.0,
        "{text}"
    );
    assert!(
        value("sagaflow_step_duration_seconds_count{service=\"coupon\",op=\"try\"}") >= 1.0,
        "{text}"
    );
    assert!(value("sagaflow_outbox_published_total") > 0.0, "{text}");
    assert!(value("sagaflow_outbox_pending") >= 0.0, "{text}");
    assert!(value("sagaflow_outbox_lag_seconds") >= 0.0, "{text}");
    assert!(
        text.contains("# TYPE sagaflow_step_retries counter"),
        "{text}"
    );
    assert!(text.ends_with("# EOF\n"), "{text}");

    server.shutdown().await;
    sys.stop().await;
}

on_both_backends!(api_round_trip, round_trip);

/// A saga that stays where the test puts it: one step that retries until it succeeds, so a
/// business failure makes the saga Failed, for an operator.
const HOLD: &str = r#"
name: hold
version: 1
sequence_key: ${input.order_id}
input:
  order_id: string
  amount: money
steps:
  - id: charge
    service: payment
    action: charge
    compensation: refund
    on_failure: retry
    params: { order_id: "${input.order_id}", amount: "${input.amount}" }
"#;

/// The reply a worker sends when the one step of `hold` is declined for good: the saga is
/// then Failed, for an operator.
fn declined_for_good(saga: &str) -> Incoming {
    Incoming {
        saga_id: saga.to_owned(),
        event: Event::Reply {
            step: 0,
            op: Op::Action,
            attempt: 1,
            outcome: Outcome::Business {
                code: "declined".into(),
                message: "card declined".into(),
            },
        },
        timer_id: None,
    }
}

/// An engine whose loops do not run: what the API writes stays in the outbox, and the test
/// applies the workers' replies itself.
async fn idle_engine(test: &str) -> (support::TestDb, Arc<Engine>) {
    let db = fresh_db(Backend::Sqlite, test).await.expect("sqlite");
    let store = Store::connect(&db.url, 4).await.expect("connect");
    store
        .migrate(&[ENGINE_MIGRATIONS, services::MIGRATIONS])
        .await
        .expect("migrate");
    let engine = Engine::new(store, Arc::new(MemoryTransport::default()));
    engine.register(HOLD).await.expect("hold saga");
    (db, engine)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_actions_and_outbox_gauges() {
    let (_db, engine) = idle_engine("http_operator").await;
    let server = Server::start(engine.clone()).await;
    let base = server.base.clone();
    let input = json!({"order_id": "h-1", "amount": "10.00"});

    let started = post_json(
        &format!("{base}/sagas"),
        &json!({"saga": "hold", "input": input}),
    )
    .await;
    assert_eq!(started.status, 201, "{}", started.body);
    assert_eq!(started.json()["state"], json!("running"));
    let id = started.json()["id"].as_str().expect("id").to_owned();
    let doc = get(&format!("{base}/sagas/{id}")).await.json();
    assert_eq!(doc["steps"][0]["status"], json!("action: running"));
    assert_eq!(doc["steps"][0]["attempts"], json!(1));

    // Nothing relays: the charge command waits in the outbox.
    let m = get(&format!("{base}/metrics")).await.body;
    assert_eq!(sample(&m, "sagaflow_outbox_pending"), Some(1.0), "{m}");
    assert!(
        sample(&m, "sagaflow_outbox_lag_seconds").is_some_and(|v| v >= 0.0),
        "{m}"
    );
    assert_eq!(sample(&m, "sagaflow_sagas_started_total"), Some(1.0), "{m}");

    // A second saga of the same order waits behind the first.
    let queued = post_json(
        &format!("{base}/sagas"),
        &json!({"saga": "hold", "input": input}),
    )
    .await;
    assert_eq!(queued.status, 201, "{}", queued.body);
    assert_eq!(queued.json()["state"], json!("queued"));
    let queued_id = queued.json()["id"].as_str().expect("id").to_owned();

    // Abort without a body: the queued saga ends before it started.
    let aborted = call("POST", &format!("{base}/sagas/{queued_id}/abort"), None).await;
    assert_eq!(aborted.status, 200, "{}", aborted.body);
    assert_eq!(aborted.json()["state"], json!("compensated"));
    assert!(
        aborted.json()["reason"]
            .as_str()
            .unwrap_or("")
            .contains("no reason given"),
        "{}",
        aborted.body
    );

    // Retrying a running saga is refused, with the machine's reason.
    post_json(&format!("{base}/sagas/{id}/retry"), &json!({}))
        .await
        .error(409, "retry refused: the saga is running, not failed");

    // The step that must succeed answers with a business failure: the saga is Failed.
    let failure = declined_for_good(&id);
    engine.apply(&[failure]).await.expect("apply");
    assert_eq!(
        get(&format!("{base}/sagas/{id}")).await.json()["state"],
        json!("failed")
    );

    // Retry (no body at all) resumes it: the charge goes again as attempt 2.
    let retried = call("POST", &format!("{base}/sagas/{id}/retry"), None).await;
    assert_eq!(retried.status, 200, "{}", retried.body);
    assert_eq!(retried.json(), json!({"id": id, "state": "running"}));
    let m = get(&format!("{base}/metrics")).await.body;
    assert_eq!(sample(&m, "sagaflow_step_retries_total"), Some(1.0), "{m}");

    // Abort with a reason: the first compensates (its charge may have taken effect).
    let aborted = post_json(
        &format!("{base}/sagas/{id}/abort"),
        &json!({"reason": "customer called"}),
    )
    .await;
    assert_eq!(aborted.status, 200, "{}", aborted.body);
    let doc = aborted.json();
    assert_eq!(doc["state"], json!("compensating"));
    assert!(
        doc["reason"]
            .as_str()
            .unwrap_or("")
            .contains("customer called"),
        "{doc}"
    );
    post_json(&format!("{base}/sagas/{id}/abort"), &json!({}))
        .await
        .error(409, "abort refused: the saga is compensating");
    let m = get(&format!("{base}/metrics")).await.body;
    assert_eq!(sample(&m, "sagaflow_compensations_total"), Some(1.0), "{m}");

    let m = get(&format!("{base}/metrics")).await.body;
    assert_eq!(
        sample(&m, "sagaflow_sagas_finished_total{outcome=\"compensated\"}"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        sample(&m, "sagaflow_sagas_finished_total{outcome=\"failed\"}"),
        Some(1.0),
        "{m}"
    );

    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_request_gets_a_json_error() {
    let (_db, engine) = idle_engine("http_errors").await;
    let server = Server::start(engine.clone()).await;
    let base = server.base.clone();
    let sagas = format!("{base}/sagas");
    let input = json!({"order_id": "e-1", "amount": "1.00"});

    // Bodies: malformed, not JSON, not an object of the right shape.
    call(
        "POST",
        &sagas,
        Some(("application/json", "{\"saga\": \"hold\",")),
    )
    .await
    .error(400, "malformed JSON body");
    call("POST", &sagas, Some(("text/plain", "{\"saga\": \"hold\"}")))
        .await
        .error(415, "not `text/plain`");
    call("POST", &sagas, Some(("", "{\"saga\": \"hold\"}")))
        .await
        .error(415, "no Content-Type");
    call("POST", &sagas, None)
        .await
        .error(400, "the request body is empty");
    post_json(&sagas, &json!({"input": input}))
        .await
        .error(400, "missing field `saga`");
    // A body of the wrong kind: the error says what the API wants, not which Rust type.
    for wrong in [json!("order-paid"), json!([1, 2]), json!(7)] {
        let answer = post_json(&sagas, &wrong).await;
        assert_eq!(answer.status, 400, "{}", answer.body);
        assert!(
            !answer.body.contains("StartRequest") && !answer.body.contains("struct"),
            "{}",
            answer.body
        );
        // (An array is read field by field, and fails on its first element instead.)
        if !wrong.is_array() {
            assert!(
                answer
                    .body
                    .contains(r#"expected a JSON object {\"saga\": NAME"#),
                "{}",
                answer.body
            );
        }
    }
    post_json(&format!("{sagas}/x/abort"), &json!("why"))
        .await
        .error(
            400,
            r#"expected {"reason": "…", "actor": "…"} (or nothing)"#,
        );
    post_json(
        &sagas,
        &json!({"saga": "hold", "input": input, "idempotency-key": "k"}),
    )
    .await
    .error(400, "unknown field `idempotency-key`");
    post_json(
        &sagas,
        &json!({"saga": "hold", "input": input, "idempotency_key": ""}),
    )
    .await
    .error(400, "`idempotency_key` must not be empty");
    post_json(&sagas, &json!({"saga": 7}))
        .await
        .error(400, "invalid request body");

    // Unknown definition (404, naming the registered ones); a definition other than the one meant.
    let message = post_json(&sagas, &json!({"saga": "nope", "input": {}}))
        .await
        .error(404, "no saga definition named `nope`");
    assert!(message.contains("registered: hold"), "{message}");
    post_json(
        &sagas,
        &json!({"saga": "hold", "input": input, "definition_hash": "sha256:0000"}),
    )
    .await
    .error(409, "not sha256:0000");

    // Invalid input: the engine's own detail.
    let message = post_json(
        &sagas,
        &json!({"saga": "hold", "input": {"amount": 5, "extra": 1}}),
    )
    .await
    .error(400, "invalid input for saga `hold`");
    assert!(message.contains("`order_id` is required"), "{message}");
    assert!(
        message.contains("`extra` is not an input of this saga"),
        "{message}"
    );
    post_json(&sagas, &json!({"saga": "hold", "input": [1, 2]}))
        .await
        .error(400, "the input must be a JSON object");

    // Unknown sagas.
    get(&format!("{sagas}/no-such-id"))
        .await
        .error(404, "no saga with id no-such-id");
    post_json(&format!("{sagas}/no-such-id/retry"), &json!({}))
        .await
        .error(404, "no saga with id no-such-id");
    call("POST", &format!("{sagas}/no-such-id/abort"), None)
        .await
        .error(404, "no saga with id no-such-id");

    // Operator bodies.
    let id = post_json(&sagas, &json!({"saga": "hold", "input": input}))
        .await
        .json()["id"]
        .as_str()
        .expect("id")
        .to_owned();
    post_json(&format!("{sagas}/{id}/abort"), &json!({"why": "x"}))
        .await
        .error(400, "unknown field `why`");
    call(
        "POST",
        &format!("{sagas}/{id}/abort"),
        Some(("application/json", "{reason")),
    )
    .await
    .error(400, "malformed JSON body");
    call(
        "POST",
        &format!("{sagas}/{id}/abort"),
        Some(("text/plain", "stop")),
    )
    .await
    .error(415, "Content-Type");
    post_json(&format!("{sagas}/{id}/retry"), &json!({"force": true}))
        .await
        .error(400, "unknown field `force`");
    // None of that touched the saga.
    assert_eq!(
        get(&format!("{sagas}/{id}")).await.json()["state"],
        json!("running")
    );

    // List parameters.
    get(&format!("{sagas}?state=done"))
        .await
        .error(400, "unknown state `done`; the states are queued, running");
    get(&format!("{sagas}?limit=0"))
        .await
        .error(400, "`limit` must be a whole number");
    get(&format!("{sagas}?limit=lots"))
        .await
        .error(400, "got `lots`");
    get(&format!("{sagas}?after=garbage"))
        .await
        .error(400, "`garbage` is not a list cursor");
    get(&format!("{sagas}?status=failed"))
        .await
        .error(400, "unknown query parameter `status`");
    get(&format!("{sagas}?state=failed&state=running"))
        .await
        .error(400, "given more than once");
    get(&format!("{sagas}?from=yesterday"))
        .await
        .error(400, "`from` must be a time in RFC 3339");
    get(&format!("{sagas}?to=2026-13-01T00:00:00Z"))
        .await
        .error(400, "`to` must be a time");
    // By definition and creation time: the saga started above is a `hold` of the last hour.
    let hour_ago = sagaflow_engine::time::format(sagaflow_engine::store::now_ms() - 3_600_000);
    let listed = get(&format!("{sagas}?saga=hold&from={hour_ago}"))
        .await
        .json();
    assert!(
        listed["sagas"]
            .as_array()
            .is_some_and(|l| l.iter().any(|s| s["id"] == json!(id))),
        "{listed}"
    );
    let none = get(&format!("{sagas}?saga=other")).await.json();
    assert_eq!(none["sagas"], json!([]), "{none}");
    let none = get(&format!("{sagas}?to={hour_ago}")).await.json();
    assert_eq!(none["sagas"], json!([]), "{none}");

    // The console and its figures.
    let page = get(&format!("{base}/")).await;
    assert_eq!(page.status, 200);
    assert!(
        page.content_type.starts_with("text/html"),
        "{}",
        page.content_type
    );
    assert!(page.body.contains("/console/app.js"), "{}", page.body);
    for asset in ["/console/app.js", "/console/app.css"] {
        let a = get(&format!("{base}{asset}")).await;
        assert_eq!(a.status, 200, "{asset}");
        assert!(!a.body.is_empty(), "{asset}");
    }
    let stats = get(&format!("{base}/stats?minutes=5")).await.json();
    assert_eq!(stats["window_minutes"], json!(5), "{stats}");
    assert!(
        stats["counts"]["running"].as_u64().is_some_and(|n| n >= 1),
        "{stats}"
    );
    assert!(
        stats["minutes"][0]["started"]
            .as_u64()
            .is_some_and(|n| n >= 1),
        "{stats}"
    );
    assert_eq!(stats["definitions"], json!(["hold"]), "{stats}");
    assert!(stats["outbox"]["pending"].as_u64().is_some(), "{stats}");
    let counts_only = get(&format!("{base}/stats?minutes=0")).await.json();
    assert_eq!(counts_only["minutes"], json!([]), "{counts_only}");
    get(&format!("{base}/stats?minutes=100000"))
        .await
        .error(400, "`minutes` must be a whole number from 0 to 1440");
    get(&format!("{base}/stats?window=5"))
        .await
        .error(400, "unknown query parameter `window`");

    get(&format!("{sagas}/%FF%FE"))
        .await
        .error(400, "unreadable saga id in the path");

    // Routes and methods.
    get(&format!("{base}/nowhere"))
        .await
        .error(404, "no route for GET /nowhere");
    call("DELETE", &format!("{sagas}/{id}"), None)
        .await
        .error(405, "DELETE is not allowed");
    get(&format!("{sagas}/{id}/retry"))
        .await
        .error(405, "GET is not allowed");

    // After all that, the API still answers.
    let health = get(&format!("{base}/healthz")).await;
    assert_eq!(health.status, 200, "{}", health.body);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_reports_a_database_that_does_not_answer() {
    let (_db, engine) = idle_engine("http_health").await;
    let server = Server::start(engine.clone()).await;
    engine.store().pool().close().await;
    let answer = get(&format!("{}/healthz", server.base)).await;
    assert_eq!(answer.status, 503, "{}", answer.body);
    let doc = answer.json();
    assert_eq!(doc["status"], json!("unavailable"));
    assert!(
        doc["error"]
            .as_str()
            .unwrap_or("")
            .starts_with("database: "),
        "{doc}"
    );
    // Reading sagas is a database error: 500, still with a JSON body.
    get(&format!("{}/sagas", server.base))
        .await
        .error(500, "database");
    server.shutdown().await;
}

/// `sagaflow ARGS` with the environment the test gives; (exit code, stdout, stderr).
async fn sagaflow(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_sagaflow"));
    cmd.args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("SAGAFLOW_SERVER")
        .env_remove("SAGAFLOW_DATABASE_URL");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(LIMIT, cmd.output())
        .await
        .expect("sagaflow finishes")
        .expect("run sagaflow");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !stderr.contains("panicked"),
        "sagaflow {args:?} panicked:\n{stderr}"
    );
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr,
    )
}

async fn sagaflow_ok(args: &[&str]) -> (String, String) {
    let (code, out, err) = sagaflow(args, &[]).await;
    assert_eq!(code, 0, "sagaflow {args:?} failed:\n{out}{err}");
    (out, err)
}

async fn sagaflow_fails(args: &[&str]) -> String {
    let (code, out, err) = sagaflow(args, &[]).await;
    assert_eq!(code, 1, "sagaflow {args:?} should exit 1:\n{out}{err}");
    err
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_server_mode() {
    let db = fresh_db(Backend::Sqlite, "http_cli").await.expect("sqlite");
    let sys = System::start(&db.url, Setup::default()).await;
    let server = Server::start(sys.engine.clone()).await;
    let base = server.base.clone();
    let orders = sys.orders("cli", 2).await;
    let input = orders[0].to_string();

    // start by name, with an idempotency key: the second start finds the first saga.
    let start = [
        "start",
        "order-paid",
        "--input",
        &input,
        "--idempotency-key",
        "cli-0",
        "--server",
        &base,
    ];
    let (out, err) = sagaflow_ok(&start).await;
    let id = out.trim().to_owned();
    assert_eq!(id.len(), 36, "stdout is the id alone: {out}");
    assert!(
        err.contains(&format!("saga {id} (order-paid v1) is ")),
        "{err}"
    );
    let (again, err) = sagaflow_ok(&start).await;
    assert_eq!(again.trim(), id);
    assert!(err.contains("already started saga"), "{err}");
    let json_start = [
        "start",
        "order-paid",
        "--input",
        &input,
        "--idempotency-key",
        "cli-0",
        "--format",
        "json",
        "--server",
        &base,
    ];
    let (doc, _) = sagaflow_ok(&json_start).await;
    assert_eq!(
        serde_json::from_str::<Value>(&doc).expect("json"),
        json!({"id": id, "existing": true})
    );
    // SAGAFLOW_SERVER works as --server does.
    let second = orders[1].to_string();
    let (code, out, err) = sagaflow(
        &["start", "order-paid", "--input", &second],
        &[("SAGAFLOW_SERVER", &base)],
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    let second_id = out.trim().to_owned();
    wait_all_final(&sys.store, LIMIT).await;

    // status: readable, and the same JSON as the database mode.
    let (text, _) = sagaflow_ok(&["status", &id, "--server", &base]).await;
    assert!(text.contains(&format!("id        {id}")), "{text}");
    assert!(text.contains("state     completed"), "{text}");
    assert!(text.contains("idem key  cli-0"), "{text}");
    assert!(
        text.contains("payment") && text.contains("● succeeded (1 attempt)"),
        "{text}"
    );
    assert!(
        text.contains("coupon") && text.contains("● confirmed"),
        "{text}"
    );
    assert!(text.contains("timeline"), "{text}");
    let (doc, _) = sagaflow_ok(&["status", &id, "--format", "json", "--server", &base]).await;
    let via_api: Value = serde_json::from_str(&doc).expect("json");
    let (doc, _) =
        sagaflow_ok(&["status", &id, "--format", "json", "--database-url", &db.url]).await;
    let via_db: Value = serde_json::from_str(&doc).expect("json");
    assert_eq!(via_api, via_db);

    // list: the table, paging, filters.
    let (table, _) = sagaflow_ok(&["list", "--server", &base]).await;
    assert!(table.starts_with("ID"), "{table}");
    assert!(table.contains(&id) && table.contains(&second_id), "{table}");
    let (page, _) = sagaflow_ok(&[
        "list", "--limit", "1", "--format", "json", "--server", &base,
    ])
    .await;
    let page: Value = serde_json::from_str(&page).expect("json");
    assert_eq!(page["sagas"][0]["id"], json!(second_id));
    let next = page["next"].as_str().expect("next").to_owned();
    let (rest, _) = sagaflow_ok(&["list", "--after", &next, "--server", &base]).await;
    assert!(rest.contains(&id) && !rest.contains(&second_id), "{rest}");
    let (none, _) = sagaflow_ok(&["list", "--state", "failed", "--server", &base]).await;
    assert_eq!(none.trim(), "no sagas");

    // Refusals and unknowns: the server's message, exit 1.
    let err = sagaflow_fails(&["retry", &id, "--server", &base]).await;
    assert!(
        err.contains(&format!(
            "saga {id}: retry refused: the saga is completed, not failed"
        )),
        "{err}"
    );
    assert!(err.contains("HTTP 409"), "{err}");
    let err = sagaflow_fails(&["abort", &id, "--reason", "late", "--server", &base]).await;
    assert!(
        err.contains("abort refused: the saga is completed"),
        "{err}"
    );
    let err = sagaflow_fails(&["status", "no-such-saga", "--server", &base]).await;
    assert!(
        err.contains("no saga with id no-such-saga (HTTP 404"),
        "{err}"
    );
    let err = sagaflow_fails(&["start", "nope", "--server", &base]).await;
    assert!(err.contains("no saga definition named `nope`"), "{err}");
    let err = sagaflow_fails(&["start", "order-paid", "--input", "{}", "--server", &base]).await;
    assert!(err.contains("`order_id` is required"), "{err}");
    // The shipped file differs from what the engine registered (a shorter timeout): refused,
    // rather than silently starting another definition than the file.
    let err = sagaflow_fails(&[
        "start",
        "sagas/order.yaml",
        "--input",
        &input,
        "--server",
        &base,
    ])
    .await;
    assert!(
        err.contains("the engine's latest `order-paid` is definition"),
        "{err}"
    );

    server.shutdown().await;
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_operator_actions_through_the_server() {
    let (_db, engine) = idle_engine("http_cli_ops").await;
    let server = Server::start(engine.clone()).await;
    let base = server.base.clone();
    let input = json!({"order_id": "c-1", "amount": "3.00"}).to_string();
    let (out, err) = sagaflow_ok(&["start", "hold", "--input", &input, "--server", &base]).await;
    let id = out.trim().to_owned();
    assert!(
        err.contains(&format!("saga {id} (hold v1) is running")),
        "{err}"
    );

    // The charge is refused for good: the saga is Failed, and `retry` resumes it.
    let failure = declined_for_good(&id);
    engine.apply(&[failure]).await.expect("apply");
    let (text, _) = sagaflow_ok(&["status", &id, "--server", &base]).await;
    assert!(text.contains("state     failed — step `charge`"), "{text}");
    assert!(text.contains("[declined] card declined"), "{text}");
    let (out, _) = sagaflow_ok(&["retry", &id, "--server", &base]).await;
    assert_eq!(out.trim(), format!("saga {id} is running"));

    // `abort` with a reason: compensating, the reason shown.
    let (out, _) = sagaflow_ok(&[
        "abort",
        &id,
        "--reason",
        "customer called",
        "--server",
        &base,
    ])
    .await;
    assert_eq!(
        out.trim(),
        format!("saga {id} is compensating — aborted by operator: customer called")
    );
    let err = sagaflow_fails(&["abort", &id, "--server", &base]).await;
    assert!(
        err.contains(&format!(
            "saga {id}: abort refused: the saga is compensating"
        )),
        "{err}"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_reused_with_another_input_is_refused() {
    let (_db, engine) = idle_engine("http_idem_conflict").await;
    let server = Server::start(engine.clone()).await;
    let base = server.base.clone();
    let sagas = format!("{base}/sagas");
    let first = json!({"saga": "hold", "input": {"order_id": "i-1", "amount": "3.00"}, "idempotency_key": "pay-i-1"});
    let created = post_json(&sagas, &first).await;
    assert_eq!(created.status, 201, "{}", created.body);
    let id = created.json()["id"].as_str().expect("id").to_owned();
    // The same start again: the same saga.
    let again = post_json(&sagas, &first).await;
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(again.json()["id"], json!(id));
    assert_eq!(again.json()["existing"], json!(true));
    // The bug this pins: another input under the same key silently answered the old saga.
    let other = json!({"saga": "hold", "input": {"order_id": "i-1", "amount": "30.00"}, "idempotency_key": "pay-i-1"});
    post_json(&sagas, &other)
        .await
        .error(409, "idempotency key `pay-i-1` already started saga");
    let message = post_json(&sagas, &other).await.json()["error"].clone();
    assert!(
        message
            .as_str()
            .unwrap_or("")
            .contains("with a different input"),
        "{message}"
    );
    // And through the CLI: exit 1 with the same reason; nothing new was started.
    let err = sagaflow_fails(&[
        "start",
        "hold",
        "--input",
        r#"{"order_id": "i-1", "amount": "30.00"}"#,
        "--idempotency-key",
        "pay-i-1",
        "--server",
        &base,
    ])
    .await;
    assert!(err.contains("already started saga"), "{err}");
    let list = get(&format!("{base}/sagas")).await.json();
    assert_eq!(list["sagas"].as_array().map(Vec::len), Some(1), "{list}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_key_through_the_api_and_the_server() {
    let (_db, engine) = idle_engine("http_release_key").await;
    let server = Server::start(engine.clone()).await;
    let base = server.base.clone();
    let input = json!({"order_id": "r-1", "amount": "3.00"});
    let sagas = format!("{base}/sagas");
    let body = json!({"saga": "hold", "input": input});
    let first = post_json(&sagas, &body).await.json()["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let second = post_json(&sagas, &body).await.json()["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let failure = declined_for_good(&first);
    engine.apply(&[failure]).await.expect("apply");
    // The Failed saga holds the key: the second waits, and the first's detail says so.
    let detail = get(&format!("{base}/sagas/{first}")).await.json();
    assert_eq!(detail["state"], json!("failed"));
    assert_eq!(detail["waiting"], json!([second]));
    assert_eq!(
        get(&format!("{base}/sagas/{second}")).await.json()["state"],
        json!("queued")
    );

    let release = format!("{base}/sagas/{first}/release-key");
    call("POST", &release, None)
        .await
        .error(400, "needs a body {\"reason\"");
    let done = post_json(
        &release,
        &json!({"actor": "dana", "reason": "refunded by hand"}),
    )
    .await;
    assert_eq!(done.status, 200, "{}", done.body);
    assert_eq!(done.json()["state"], json!("failed"));
    assert_eq!(
        get(&format!("{base}/sagas/{second}")).await.json()["state"],
        json!("running")
    );
    // Through `--server`: a second release is refused with the machine's reason.
    let err = sagaflow_fails(&[
        "release-key",
        &first,
        "--reason",
        "again",
        "--server",
        &base,
    ])
    .await;
    assert!(err.contains("released already"), "{err}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_names_an_unreachable_server() {
    // A port that was free a moment ago: nothing listens there.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    drop(listener);
    for args in [
        vec!["status", "some-id", "--server", &url],
        vec!["list", "--server", &url],
        vec!["start", "order-paid", "--server", &url],
        vec!["retry", "some-id", "--server", &url],
        vec!["abort", "some-id", "--server", &url],
    ] {
        let err = sagaflow_fails(&args).await;
        assert!(
            err.contains(&format!("cannot reach the sagaflow server at {url}")),
            "{args:?}: {err}"
        );
    }
    let err = sagaflow_fails(&["list", "--server", "https://127.0.0.1:1"]).await;
    assert!(err.contains("https is not supported"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skip_pause_and_resume_through_the_api_and_the_server() {
    let (_db, engine) = idle_engine("http_skip_pause").await;
    let server = Server::start(engine.clone()).await;
    let base = server.base.clone();
    let sagas = format!("{base}/sagas");
    let body = json!({"saga": "hold", "input": {"order_id": "s-1", "amount": "3.00"}});
    let id = post_json(&sagas, &body).await.json()["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let skip = format!("{sagas}/{id}/skip");
    // A running saga has nothing stuck to skip; a bad body is refused before that.
    call("POST", &skip, None)
        .await
        .error(400, "skipping a step needs a body");
    post_json(
        &skip,
        &json!({"step": "charge", "reason": "x", "as": "maybe"}),
    )
    .await
    .error(400, "`as` must be `done` or `compensated`, got `maybe`");
    post_json(&skip, &json!({"step": "charge", "reason": "x"}))
        .await
        .error(409, "skip refused: the saga is running");

    // Paused: the API answers with who paused it; a second pause is refused.
    let paused = post_json(
        &format!("{sagas}/{id}/pause"),
        &json!({"actor": "dana", "reason": "fraud check"}),
    )
    .await;
    assert_eq!(paused.status, 200, "{}", paused.body);
    assert_eq!(paused.json()["state"], json!("running"));
    assert_eq!(paused.json()["paused"]["actor"], json!("dana"));
    assert_eq!(paused.json()["paused"]["reason"], json!("fraud check"));
    call("POST", &format!("{sagas}/{id}/pause"), None)
        .await
        .error(409, "pause refused: already paused by dana");
    let detail = get(&format!("{sagas}/{id}")).await.json();
    assert_eq!(detail["paused"]["actor"], json!("dana"), "{detail}");
    // Times are RFC 3339 in UTC with milliseconds, everywhere in the API.
    for time in [
        &detail["created_at"],
        &detail["updated_at"],
        &detail["paused"]["since"],
        &detail["timeline"][0]["at"],
    ] {
        let text = time
            .as_str()
            .unwrap_or_else(|| panic!("not a string: {time}"));
        assert!(
            chrono::DateTime::parse_from_rfc3339(text).is_ok() && text.ends_with('Z'),
            "{text}"
        );
    }
    let listed = get(&format!("{sagas}?limit=1")).await.json();
    assert!(
        listed["sagas"][0]["created_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "{listed}"
    );
    let (text, _) = sagaflow_ok(&["status", &id, "--server", &base]).await;
    assert!(
        text.contains("state     running, paused by dana since"),
        "{text}"
    );

    // The charge is declined for good while paused (replies are still applied): Failed, with
    // the charge stuck. Skipping it as done completes the saga, even paused (nothing is left
    // to dispatch), and ends the pause.
    engine
        .apply(&[declined_for_good(&id)])
        .await
        .expect("apply");
    assert_eq!(
        get(&format!("{sagas}/{id}")).await.json()["state"],
        json!("failed")
    );
    post_json(&skip, &json!({"step": "refund", "reason": "x"}))
        .await
        .error(409, "no step `refund`; its steps are charge");
    let (code, _, err) = sagaflow(&["skip", &id, "charge", "--server", &base], &[]).await;
    assert_eq!(code, 2, "a missing --reason is a usage error: {err}");
    assert!(err.contains("--reason"), "{err}");
    let (out, _) = sagaflow_ok(&[
        "skip",
        &id,
        "charge",
        "--output",
        r#"{"txn_id": "manual-1"}"#,
        "--reason",
        "charged by phone, ticket 9",
        "--actor",
        "dana",
        "--server",
        &base,
    ])
    .await;
    assert_eq!(out.trim(), format!("saga {id} is completed"));
    let detail = get(&format!("{sagas}/{id}")).await.json();
    assert!(detail.get("paused").is_none(), "{detail}");
    let timeline = detail["timeline"].as_array().expect("timeline").clone();
    let skip_line = timeline
        .iter()
        .find(|t| t["kind"] == json!("skip"))
        .unwrap_or_else(|| panic!("no skip line: {timeline:?}"));
    assert!(
        skip_line["detail"]
            .as_str()
            .is_some_and(|d| d.contains("operator dana") && d.contains("ticket 9")),
        "{skip_line}"
    );

    // Its graph with the states, from the API and through the server.
    let drawn = get(&format!("{sagas}/{id}/graph")).await;
    assert_eq!(drawn.status, 200, "{}", drawn.body);
    assert!(
        drawn.content_type.starts_with("text/plain"),
        "{}",
        drawn.content_type
    );
    assert!(
        drawn.body.contains("charge") && drawn.body.contains("● succeeded"),
        "{}",
        drawn.body
    );
    let dot = get(&format!("{sagas}/{id}/graph?format=dot")).await;
    assert!(
        dot.content_type.starts_with("text/vnd.graphviz"),
        "{}",
        dot.content_type
    );
    let svg = get(&format!("{sagas}/{id}/graph?format=svg")).await;
    assert_eq!(svg.status, 200, "{}", svg.body);
    assert!(
        svg.content_type.starts_with("image/svg+xml"),
        "{}",
        svg.content_type
    );
    assert!(
        svg.body.starts_with("<svg") && svg.body.contains("data-step=\"charge\""),
        "{}",
        svg.body
    );
    get(&format!("{sagas}/{id}/graph?format=png"))
        .await
        .error(400, "`format` must be text, dot, mermaid or svg, got `png`");
    get(&format!("{sagas}/nope/graph")).await.error(404, "nope");
    let (text, _) = sagaflow_ok(&[
        "graph", "--saga", &id, "--format", "mermaid", "--server", &base,
    ])
    .await;
    assert!(text.starts_with("flowchart TD"), "{text}");
    // `status` through the server now draws the graph too.
    let (text, _) = sagaflow_ok(&["status", &id, "--server", &base]).await;
    assert!(text.contains("● succeeded"), "{text}");

    // Pause and resume through the CLI on a second saga; resume of an unpaused one is refused.
    let second = post_json(&sagas, &body).await.json()["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let (out, _) = sagaflow_ok(&["pause", &second, "--reason", "look", "--server", &base]).await;
    assert!(out.contains("paused by"), "{out}");
    let (out, _) = sagaflow_ok(&["resume", &second, "--server", &base]).await;
    assert_eq!(out.trim(), format!("saga {second} is running"));
    let err = sagaflow_fails(&["resume", &second, "--server", &base]).await;
    assert!(
        err.contains("resume refused: the saga is not paused"),
        "{err}"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_list_show_replay_and_purge() {
    let db = fresh_db(Backend::Sqlite, "http_dead_letters")
        .await
        .expect("sqlite");
    let sys = System::start(&db.url, Setup::default()).await;
    let server = Server::start(sys.engine.clone()).await;
    let base = server.base.clone();
    // Three replies no saga can take: the engine dead-letters them, and keeps them.
    for i in 0..3 {
        let message = Message {
            id: format!("stray-{i}"),
            key: format!("k-{i}"),
            payload: if i == 2 {
                b"not json".to_vec()
            } else {
                serde_json::to_vec(&sagaflow_engine::wire::ReplyMsg {
                    traceparent: None,
                    tracestate: None,
                    saga_id: format!("nope-{i}"),
                    step: 0,
                    op: Op::Action,
                    attempt: 1,
                    outcome: Outcome::Ok { output: json!({}) },
                })
                .expect("json")
            },
        };
        sys.transport
            .publish(REPLY_QUEUE, message)
            .await
            .expect("publish");
    }
    let page = eventually("three dead letters kept", || async {
        let page = get(&format!("{base}/dead-letters")).await.json();
        (page["dead_letters"].as_array().map(Vec::len) == Some(3)).then_some(page)
    })
    .await;
    let letters = page["dead_letters"].as_array().expect("letters").clone();
    assert!(
        letters.iter().all(|l| l["queue"] == json!("reply")),
        "{page}"
    );
    let undecodable = letters
        .iter()
        .find(|l| l["message_id"] == json!("stray-2"))
        .expect("the undecodable one");
    assert!(
        undecodable["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("undecodable reply")),
        "{undecodable}"
    );
    let unknown = letters
        .iter()
        .find(|l| l["message_id"] == json!("stray-0"))
        .expect("an unknown saga's reply");
    let unknown_id = unknown["id"].as_str().expect("id").to_owned();
    assert!(
        unknown["reason"]
            .as_str()
            .is_some_and(|r| r.contains("unknown saga nope-0")),
        "{unknown}"
    );

    // Paged, one at a time.
    let first = get(&format!("{base}/dead-letters?limit=1")).await.json();
    let next = first["next"].as_str().expect("a next page").to_owned();
    let second = get(&format!("{base}/dead-letters?limit=1&after={next}"))
        .await
        .json();
    assert_ne!(
        first["dead_letters"][0]["id"],
        second["dead_letters"][0]["id"]
    );

    // Show, through the CLI and the server; an unknown id is a clear error.
    let (text, _) = sagaflow_ok(&["dead-letters", "show", &unknown_id, "--server", &base]).await;
    assert!(text.contains("queue     reply"), "{text}");
    assert!(text.contains("unknown saga nope-0"), "{text}");
    assert!(text.contains("\"saga_id\": \"nope-0\""), "{text}");
    let err = sagaflow_fails(&["dead-letters", "show", "dl-none", "--server", &base]).await;
    assert!(err.contains("no dead letter with id dl-none"), "{err}");
    get(&format!("{base}/dead-letters/dl-none"))
        .await
        .error(404, "no dead letter with id dl-none");

    // Replay one: it goes back to `reply` and, still for no saga, is dead-lettered again as a
    // new letter; the old one is gone.
    let (out, _) = sagaflow_ok(&["dead-letters", "replay", &unknown_id, "--server", &base]).await;
    assert!(
        out.contains(&format!("{unknown_id}  back on reply")),
        "{out}"
    );
    eventually("the replayed reply is dead-lettered again", || async {
        let page = get(&format!("{base}/dead-letters")).await.json();
        let ids: Vec<Value> = page["dead_letters"]
            .as_array()?
            .iter()
            .map(|l| l["id"].clone())
            .collect();
        (ids.len() == 3 && !ids.contains(&json!(unknown_id))).then_some(())
    })
    .await;
    post_json(&format!("{base}/dead-letters/replay"), &json!({}))
        .await
        .error(400, "say which dead letters");

    // Purge all of `reply`'s: none left; the metrics saw them.
    let metrics = get(&format!("{base}/metrics")).await.body;
    assert_eq!(
        sample(&metrics, "sagaflow_dead_letters_kept"),
        Some(3.0),
        "{metrics}"
    );
    let (out, _) = sagaflow_ok(&[
        "dead-letters",
        "purge",
        "--all",
        "--queue",
        "reply",
        "--server",
        &base,
    ])
    .await;
    assert_eq!(out.trim(), "purged 3 dead letters");
    let (out, _) = sagaflow_ok(&["dead-letters", "list", "--server", &base]).await;
    assert_eq!(out.trim(), "no dead letters");
    server.shutdown().await;
    sys.stop().await;
}

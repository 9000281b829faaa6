//! Traces across the transport: one saga is one trace, and each hop's span is the child of the
//! span whose context the message carried (start → dispatch → worker → reply → apply). The
//! engine and the four services run in this process (on SQLite and on the real PostgreSQL, over
//! the in-process transport and over the real RabbitMQ), with an in-memory span exporter behind
//! the same tracing-opentelemetry layer the CLI installs.

mod support;

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

use opentelemetry::trace::{SpanId, TraceId, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use sagaflow_engine::trace;
use support::{Setup, System, wait_all_final};
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;

const LIMIT: Duration = Duration::from_secs(90);
const CALLER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";
/// A caller's `tracestate`: each of the saga's spans carries it on.
const CALLER_STATE: &str = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7";

/// The `tracestate` a span's context carries.
fn state_of(span: &SpanData) -> String {
    span.span_context.trace_state().header()
}

/// The exporter every test of this binary shares (a global subscriber, since the engine's
/// tasks run on the runtime's threads); each test looks at its own sagas' spans.
fn exporter() -> &'static InMemorySpanExporter {
    static EXPORTER: OnceLock<InMemorySpanExporter> = OnceLock::new();
    EXPORTER.get_or_init(|| {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let layer = tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("sagaflow-test"))
            .with_filter(
                tracing_subscriber::filter::Targets::new()
                    .with_target(trace::TARGET, tracing::Level::INFO),
            );
        tracing::subscriber::set_global_default(tracing_subscriber::registry().with(layer))
            .expect("one global subscriber");
        trace::set_enabled(true);
        // Kept for the process's life: dropping the provider would stop the exporting.
        std::mem::forget(provider);
        exporter
    })
}

fn attr(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.as_str().into_owned())
}

/// The finished spans of one saga, by name.
fn spans_of(saga_id: &str) -> HashMap<String, Vec<SpanData>> {
    let mut by_name: HashMap<String, Vec<SpanData>> = HashMap::new();
    for s in exporter().get_finished_spans().expect("spans") {
        if attr(&s, "saga_id").as_deref() == Some(saga_id) {
            by_name.entry(s.name.to_string()).or_default().push(s);
        }
    }
    by_name
}

/// The span of `name` for one hop (step, op, attempt).
fn hop<'a>(spans: &'a [SpanData], of: &SpanData) -> &'a SpanData {
    let same = |s: &&SpanData| {
        ["step", "op", "attempt"]
            .iter()
            .all(|k| attr(s, k) == attr(of, k))
    };
    let found: Vec<&SpanData> = spans.iter().filter(same).collect();
    assert_eq!(found.len(), 1, "one span per hop for {:?}", of.attributes);
    found[0]
}

/// The chain of one saga's spans: each dispatch span the child of the start span, each worker
/// span the child of its command's dispatch span (a parent that came over the transport),
/// each reply span the child of its worker span, each apply span the child of its reply span
/// (again over the transport).
fn assert_chain(spans: &HashMap<String, Vec<SpanData>>, start: &SpanData) {
    for worker in &spans["worker"] {
        let dispatch = hop(&spans["dispatch"], worker);
        assert_eq!(dispatch.parent_span_id, start.span_context.span_id());
        assert_eq!(
            worker.parent_span_id,
            dispatch.span_context.span_id(),
            "the worker's span is the child of the engine's dispatch span of its command"
        );
        assert!(
            worker.parent_span_is_remote,
            "its parent came over the transport"
        );
    }
    for reply in &spans["reply"] {
        let worker = hop(&spans["worker"], reply);
        assert_eq!(reply.parent_span_id, worker.span_context.span_id());
    }
    for apply in &spans["apply"] {
        let reply = hop(&spans["reply"], apply);
        assert_eq!(
            apply.parent_span_id,
            reply.span_context.span_id(),
            "the apply span is the child of the worker's reply span"
        );
        assert!(
            apply.parent_span_is_remote,
            "its parent came over the transport"
        );
    }
}

on_both_backends!(
    a_saga_is_one_trace_across_the_transport,
    |url: String| async move {
        exporter();
        let sys = System::start(&url, Setup::default()).await;
        let orders = sys.orders("traced", 2).await;
        let caller = format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01");
        let traced = sys
            .engine
            .start_traced(&sys.order, orders[0].clone(), None, Some(&caller))
            .await
            .expect("start")
            .id;
        // A malformed caller context is ignored: the saga runs, in a trace of its own.
        let untraced = sys
            .engine
            .start_traced(&sys.order, orders[1].clone(), None, Some("00-nonsense-01"))
            .await
            .expect("start")
            .id;
        wait_all_final(&sys.store, LIMIT).await;
        let state = {
            use sagaflow_engine::store::SagaTable as _;
            let mut tx = sys.store.begin().await.expect("begin");
            let rows = tx
                .load_sagas(std::slice::from_ref(&traced))
                .await
                .expect("load");
            tx.rollback().await.expect("rollback");
            rows.into_iter().next().expect("the saga").state
        };
        assert_eq!(sys.engine.store().outbox_stats().await.unwrap().pending, 0);
        sys.stop().await;

        let key = orders[0]["order_id"].as_str().expect("order id").to_owned();
        let spans = spans_of(&traced);
        let [start] = &spans["start"][..] else {
            panic!("one start span: {:?}", spans.get("start"))
        };
        let caller_trace = TraceId::from_hex(CALLER_TRACE).unwrap();
        assert_eq!(start.span_context.trace_id(), caller_trace);
        assert_eq!(start.parent_span_id, SpanId::from_hex(CALLER_SPAN).unwrap());
        assert_eq!(
            state
                .trace
                .as_deref()
                .and_then(trace::parse)
                .map(|c| c.span_id()),
            Some(start.span_context.span_id()),
            "the saga keeps its start span's context"
        );
        // Five forward operations, each dispatched, run, answered and applied.
        for name in ["dispatch", "worker", "reply", "apply"] {
            assert_eq!(spans.get(name).map_or(0, Vec::len), 5, "{name} spans");
        }
        for s in spans.values().flatten() {
            assert_eq!(
                s.span_context.trace_id(),
                caller_trace,
                "{} is in the saga's trace",
                s.name
            );
            assert_eq!(
                attr(s, "key").as_deref(),
                Some(key.as_str()),
                "{} carries the key",
                s.name
            );
            if s.name != "start" {
                assert!(
                    attr(s, "step").is_some() && attr(s, "attempt").is_some(),
                    "{}",
                    s.name
                );
            }
        }
        assert_chain(&spans, start);
        for worker in &spans["worker"] {
            assert!(attr(worker, "service").is_some());
        }

        let other = spans_of(&untraced);
        let [start] = &other["start"][..] else {
            panic!("one start span")
        };
        assert_ne!(start.span_context.trace_id(), caller_trace);
        assert_eq!(start.parent_span_id, SpanId::INVALID, "a new root");
        assert_eq!(other.get("worker").map_or(0, Vec::len), 5);
    }
);

#[test]
fn messages_without_or_with_a_bad_traceparent_are_accepted() {
    let old = r#"{"saga_id":"s","saga":"order-paid","key":"o-1","step":0,"step_id":"pay",
        "service":"payment","op":"action","operation":"charge","forward":"charge","attempt":1,
        "params":{}}"#;
    let cmd: sagaflow_engine::wire::CommandMsg = serde_json::from_str(old).expect("old command");
    assert_eq!(cmd.traceparent, None);
    let bad = old.replacen('{', r#"{"traceparent":"zz-not-a-context","#, 1);
    let cmd: sagaflow_engine::wire::CommandMsg = serde_json::from_str(&bad).expect("bad context");
    assert!(trace::parse(cmd.traceparent.as_deref().unwrap()).is_none());
    // The span of such a command is a root (or its contextual parent's child), never an error.
    let span = tracing::info_span!("x");
    trace::set_parent(&span, cmd.traceparent.as_deref(), cmd.tracestate.as_deref());
    let reply = r#"{"saga_id":"s","step":0,"op":"action","attempt":1,"outcome":{"outcome":"ok","output":null}}"#;
    let reply: sagaflow_engine::wire::ReplyMsg = serde_json::from_str(reply).expect("old reply");
    assert_eq!(reply.traceparent, None);
    // A command's context comes first in its JSON, where the transport looks for it.
    let mut cmd = cmd;
    cmd.traceparent = Some(format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01"));
    let payload = serde_json::to_vec(&cmd).unwrap();
    assert_eq!(trace::traceparent_in(&payload), cmd.traceparent.as_deref());
}

/// `POST /sagas` with a W3C `traceparent` header: the saga's `start` span is the child of the
/// caller's span, in the caller's trace (the HTTP API reads the header; a start without one is
/// a root).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_sagas_joins_the_trace_of_its_traceparent_header() {
    exporter();
    let db = support::fresh_db(support::Backend::Sqlite, "traces_http")
        .await
        .expect("sqlite");
    let sys = System::start(&db.url, Setup::default()).await;
    let orders = sys.orders("traced-http", 2).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("address"));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(sagaflow_engine::http::serve(
        sys.engine.clone(),
        listener,
        stopped,
    ));
    const HTTP_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
    const HTTP_SPAN: &str = "b7ad6b7169203331";
    let post = |input: serde_json::Value, traceparent: Option<String>| {
        let url = format!("{base}/sagas");
        tokio::task::spawn_blocking(move || {
            let mut request = ureq::post(&url);
            if let Some(tp) = traceparent {
                // Two tracestate headers are one list (W3C): the saga carries both.
                request = request
                    .header("traceparent", tp)
                    .header("tracestate", "congo=t61rcWkgMzE")
                    .header("tracestate", "rojo=00f067aa0ba902b7");
            }
            let mut answer = request
                .send_json(serde_json::json!({"saga": "order-paid", "input": input}))
                .expect("POST /sagas");
            let body: serde_json::Value = answer.body_mut().read_json().expect("json");
            body["id"].as_str().expect("id").to_owned()
        })
    };
    let traced = post(
        orders[0].clone(),
        Some(format!("00-{HTTP_TRACE}-{HTTP_SPAN}-01")),
    )
    .await
    .expect("join");
    let plain = post(orders[1].clone(), None).await.expect("join");
    wait_all_final(&sys.store, LIMIT).await;
    let _ = stop.send(true);
    let _ = server.await;
    sys.stop().await;

    let spans = spans_of(&traced);
    let [start] = &spans["start"][..] else {
        panic!("one start span: {:?}", spans.get("start"))
    };
    let http_trace = TraceId::from_hex(HTTP_TRACE).unwrap();
    assert_eq!(start.span_context.trace_id(), http_trace);
    assert_eq!(start.parent_span_id, SpanId::from_hex(HTTP_SPAN).unwrap());
    assert!(
        spans["worker"]
            .iter()
            .all(|w| w.span_context.trace_id() == http_trace),
        "the workers' spans are in the caller's trace"
    );
    assert!(
        spans
            .values()
            .flatten()
            .all(|s| state_of(s) == CALLER_STATE),
        "every span carries the caller's tracestate"
    );
    let other = spans_of(&plain);
    let [start] = &other["start"][..] else {
        panic!("one start span")
    };
    assert_ne!(start.span_context.trace_id(), http_trace);
    assert_eq!(state_of(start), "");
    assert_eq!(start.parent_span_id, SpanId::INVALID, "a new root");
}

/// The same parent/child chain over the real RabbitMQ and PostgreSQL: the engine and the four
/// services (in this process, so that their spans reach the test's exporter, but each side on a
/// broker connection of its own, as separate processes would be) on a queue prefix and a
/// database of the test's own. One saga's spans are one trace, from its start to the apply of
/// its last reply; every worker span's parent is the engine's dispatch span of its command
/// (whose context came in the AMQP message), every apply span's the worker's reply span.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_is_one_trace_over_rabbitmq() {
    use sagaflow_engine::machine::SagaStatus;
    use sagaflow_engine::store::{SagaQueries as _, Store};
    use sagaflow_engine::transport::Transport;
    use sagaflow_engine::transport::amqp::{AmqpConfig, AmqpTransport};
    use sagaflow_workers::services;
    use support::deploy::{Deployment, amqp_url};

    exporter();
    let Some(d) = Deployment::new("traces_amqp", 2).await else {
        return;
    };
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let engine = tokio::spawn(d.engine.clone().run(stopped.clone()));
    let mut config = AmqpConfig::new(&amqp_url());
    config.prefix = d.prefix.clone();
    config.partitions = d.partitions;
    config.connection_name = "test traces workers".into();
    let worker_transport = AmqpTransport::connect(config).await.expect("RabbitMQ");
    let worker_store = Store::connect(&d.db.url, 3).await.expect("connect");
    let mut workers = Vec::new();
    for service in services::SERVICES {
        let pool = worker_store.pool().clone();
        let transport = worker_transport.clone() as std::sync::Arc<dyn Transport>;
        let w = services::worker(service, pool, transport).expect("known service");
        workers.push(tokio::spawn(w.run(stopped.clone())));
    }
    for _ in 0..2_000 {
        if d.engine.relay_running() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let orders = d.orders("traced-amqp", 1).await;
    let caller = format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01");
    let trace = trace::Carried {
        traceparent: Some(caller),
        tracestate: Some(CALLER_STATE.to_owned()),
    };
    let id = d
        .engine
        .start_with_trace(&d.order, orders[0].clone(), None, &trace)
        .await
        .expect("start")
        .id;
    d.wait_all_final(LIMIT).await;
    let state = d.store.saga_state(&id).await.expect("read").expect("saga");
    assert_eq!(state.status, SagaStatus::Completed, "{:?}", state.status);
    let _ = stop.send(true);
    let _ = engine.await;
    for w in workers {
        let _ = w.await;
    }
    worker_transport.close().await;
    worker_store.pool().close().await;
    d.finish().await;

    let spans = spans_of(&id);
    let [start] = &spans["start"][..] else {
        panic!("one start span: {:?}", spans.get("start"))
    };
    let caller_trace = TraceId::from_hex(CALLER_TRACE).unwrap();
    assert_eq!(start.parent_span_id, SpanId::from_hex(CALLER_SPAN).unwrap());
    // Every span, from the start to the apply that made the saga Completed, is in one trace,
    // and carries the caller's tracestate on (it crossed RabbitMQ beside the context).
    for s in spans.values().flatten() {
        assert_eq!(
            s.span_context.trace_id(),
            caller_trace,
            "{} is in the saga's trace",
            s.name
        );
        assert_eq!(
            state_of(s),
            CALLER_STATE,
            "{} carries the tracestate",
            s.name
        );
    }
    assert_eq!(state.tracestate.as_deref(), Some(CALLER_STATE));
    // Five forward operations, each dispatched, run, answered and applied (a step the engine
    // timed out and sent again, on a loaded machine, adds a hop with its own attempt).
    for name in ["dispatch", "worker", "reply", "apply"] {
        assert!(spans.get(name).map_or(0, Vec::len) >= 5, "{name} spans");
    }
    assert_chain(&spans, start);
}

/// A saga started from the application's transaction through the client library, with the
/// caller's `traceparent`: the outbox row and the start message carry it, and the saga's
/// `start` span is the caller's span's child, its workers' spans in the caller's trace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_started_through_the_client_joins_the_callers_trace() {
    use sagaflow_engine::transport::Transport;

    exporter();
    let Some(app) = support::fresh_db(support::Backend::Postgres, "traces_client_app").await else {
        return;
    };
    let db = support::fresh_db(support::Backend::Sqlite, "traces_client")
        .await
        .expect("sqlite");
    let sys = System::start(&db.url, Setup::default()).await;
    let orders = sys.orders("traced-client", 2).await;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&app.url)
        .await
        .expect("the application's database");
    sagaflow_client::install(&mut pool.acquire().await.expect("conn"))
        .await
        .expect("install");
    const APP_TRACE: &str = "5c2e1a9d3b7f4e60a1b2c3d4e5f60718";
    const APP_SPAN: &str = "a1b2c3d4e5f60718";
    let caller = format!("00-{APP_TRACE}-{APP_SPAN}-01");
    let keys = ["client-traced", "client-plain"];
    let mut tx = pool.begin().await.expect("begin");
    sagaflow_client::Start::new("order-paid", &orders[0], keys[0])
        .traceparent(&caller)
        .tracestate(CALLER_STATE)
        .write(&mut tx)
        .await
        .expect("start");
    sagaflow_client::start_saga(&mut tx, "order-paid", &orders[1], keys[1])
        .await
        .expect("start");
    tx.commit().await.expect("commit");
    let relay = sagaflow_client::Relay::new(
        pool.clone(),
        sys.transport.clone() as std::sync::Arc<dyn Transport>,
    );
    while relay.relay_once().await.expect("relay") > 0 {}
    let start = std::time::Instant::now();
    while support::counts(&sys.store).await.values().sum::<i64>() < 2 {
        assert!(start.elapsed() < LIMIT, "the started sagas do not exist");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    wait_all_final(&sys.store, LIMIT).await;
    let mut ids = Vec::new();
    for key in keys {
        let id: String = sqlx::query_scalar("SELECT id FROM sagas WHERE idempotency_key = $1")
            .bind(key)
            .fetch_one(sys.store.pool())
            .await
            .expect("the saga");
        ids.push(id);
    }
    sys.stop().await;
    pool.close().await;

    let spans = spans_of(&ids[0]);
    let [start] = &spans["start"][..] else {
        panic!("one start span: {:?}", spans.get("start"))
    };
    let app_trace = TraceId::from_hex(APP_TRACE).unwrap();
    assert_eq!(start.span_context.trace_id(), app_trace);
    assert_eq!(start.parent_span_id, SpanId::from_hex(APP_SPAN).unwrap());
    assert_eq!(spans.get("worker").map_or(0, Vec::len), 5);
    assert!(
        spans
            .values()
            .flatten()
            .all(|s| s.span_context.trace_id() == app_trace),
        "every span of the saga is in the caller's trace"
    );
    assert!(
        spans
            .values()
            .flatten()
            .all(|s| state_of(s) == CALLER_STATE),
        "every span of the saga carries the caller's tracestate"
    );
    let other = spans_of(&ids[1]);
    let [start] = &other["start"][..] else {
        panic!("one start span")
    };
    assert_ne!(start.span_context.trace_id(), app_trace);
    assert_eq!(start.parent_span_id, SpanId::INVALID, "a new root");
}

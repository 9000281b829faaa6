//! The web console in a real headless Chromium (Debian's `chromium`, driven through its
//! `chromedriver`): an engine with the four services on the real PostgreSQL, sagas that
//! complete, compensate and fail; the test opens every page, checks what each shows, clicks
//! Retry on the failed saga, confirms, and sees it complete — in the page and in the database.
//!
//! Without Chromium the test says so and passes, except under `CI=true`, where it fails (`.ci/run`
//! installs Debian's `chromium` and `chromium-driver` first). `SAGAFLOW_SCREENSHOTS=DIR` saves a
//! picture of each page there (how the README's were made).

mod support;

#[path = "console/webdriver.rs"]
mod webdriver;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sagaflow_engine::machine::{Op, Outcome};
use sagaflow_engine::store::SagaQueries;
use sagaflow_engine::transport::{Message, REPLY_QUEUE, Transport};
use sagaflow_engine::{Engine, http};
use sagaflow_workers::runtime::Faults;
use serde_json::{Value, json};
use support::{Backend, Setup, System, fresh_db, wait_all_final};
use tokio::net::TcpListener;
use tokio::sync::watch;
use webdriver::Browser;

const LIMIT: Duration = Duration::from_secs(90);
const PAGE: Duration = Duration::from_secs(30);

/// One step that an operator must see through: a refusal makes the saga Failed, not
/// compensated (`on_failure: retry`).
const HOLD: &str = r#"
name: console-hold
version: 1
sequence_key: ${input.order_id}
input:
  order_id: { type: string }
  user_id: { type: string }
  points: { type: integer }
steps:
  - id: grant
    service: points
    action: grant
    compensation: revoke
    on_failure: retry
    params:
      user_id: ${input.user_id}
      points: ${input.points}
      reason: console ${input.order_id}
"#;

async fn serve(engine: Arc<Engine>) -> (String, watch::Sender<bool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("address"));
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(http::serve(engine, listener, stopped));
    (base, stop)
}

/// Starts sagas through the API (as a user would).
async fn start(base: &str, saga: &str, input: &Value) -> String {
    let url = format!("{base}/sagas");
    let body = json!({"saga": saga, "input": input});
    let v: Value = tokio::task::spawn_blocking(move || {
        ureq::post(&url)
            .send_json(&body)
            .expect("start")
            .body_mut()
            .read_json()
            .expect("json")
    })
    .await
    .expect("join");
    v["id"].as_str().expect("id").to_owned()
}

async fn state_of(engine: &Engine, id: &str) -> String {
    engine
        .store()
        .saga_header(id)
        .await
        .expect("read")
        .expect("saga")
        .status
}

async fn wait_state(engine: &Engine, id: &str, want: &str) {
    let t = Instant::now();
    loop {
        let got = state_of(engine, id).await;
        if got == want {
            return;
        }
        assert!(t.elapsed() < LIMIT, "saga {id} is {got}, not {want}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_pages_and_a_retry_from_the_browser() {
    if !webdriver::available() {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "the console test needs Debian's chromium and chromium-driver ({} and {})",
            webdriver::CHROMIUM,
            webdriver::CHROMEDRIVER
        );
        eprintln!("skipping the console test: no {}", webdriver::CHROMIUM);
        return;
    }
    let Some(db) = fresh_db(Backend::Postgres, "console").await else {
        return;
    };

    // Phase 1: the points service refuses every grant. The order sagas compensate; the hold
    // saga fails and waits for an operator.
    let refusing = Setup {
        points: Faults {
            business: 1.0,
            ..Faults::default()
        },
        ..Setup::default()
    };
    let sys = System::start(&db.url, refusing).await;
    sys.engine.register(HOLD).await.expect("hold saga");
    let (base, stop_http) = serve(sys.engine.clone()).await;
    let orders = sys.orders("console", 6).await;
    let mut compensated = Vec::new();
    for o in &orders[..2] {
        compensated.push(start(&base, "order-paid", o).await);
    }
    let hold_input = json!({
        "order_id": "console-hold-1",
        "user_id": orders[5]["user_id"],
        "points": 7,
    });
    let failed = start(&base, "console-hold", &hold_input).await;
    wait_state(&sys.engine, &failed, "failed").await;
    wait_all_final(&sys.store, LIMIT).await;
    let _ = stop_http.send(true);
    sys.stop().await;

    // Phase 2: the services answer again; more orders complete; a stray reply is
    // dead-lettered.
    let sys = System::start(&db.url, Setup::default()).await;
    sys.engine.register(HOLD).await.expect("hold saga");
    let (base, stop_http) = serve(sys.engine.clone()).await;
    let mut completed = Vec::new();
    for o in &orders[2..5] {
        completed.push(start(&base, "order-paid", o).await);
    }
    wait_all_final(&sys.store, LIMIT).await;
    for id in &completed {
        assert_eq!(state_of(&sys.engine, id).await, "completed");
    }
    for id in &compensated {
        assert_eq!(state_of(&sys.engine, id).await, "compensated");
    }
    assert_eq!(state_of(&sys.engine, &failed).await, "failed");
    let stray = Message {
        id: "console-stray".into(),
        key: "k-stray".into(),
        payload: serde_json::to_vec(&sagaflow_engine::wire::ReplyMsg {
            traceparent: None,
            tracestate: None,
            saga_id: "no-such-saga".into(),
            step: 0,
            op: Op::Action,
            attempt: 1,
            outcome: Outcome::Ok { output: json!({}) },
        })
        .expect("json"),
    };
    sys.transport
        .publish(REPLY_QUEUE, stray)
        .await
        .expect("publish");
    let t = Instant::now();
    while sys.store.dead_letter_count().await.expect("count") < 1 {
        assert!(t.elapsed() < LIMIT, "the stray reply was not kept");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The browser, off the async runtime (WebDriver calls block).
    let shots = std::env::var_os("SAGAFLOW_SCREENSHOTS").map(PathBuf::from);
    let browsed = {
        let base = base.clone();
        let failed = failed.clone();
        let completed = completed.clone();
        tokio::task::spawn_blocking(move || browse(&base, &failed, &completed, shots))
    };
    let result = browsed.await.expect("browser thread");
    if let Err(why) = result {
        panic!("console: {why}");
    }

    // What the click did, read from the database: the retried grant succeeded, and the
    // history says who retried it.
    wait_state(&sys.engine, &failed, "completed").await;
    let detail = sagaflow_engine::status::saga(&sys.store, &failed)
        .await
        .expect("read")
        .expect("saga");
    assert!(
        detail
            .timeline
            .iter()
            .any(|t| t.detail.contains("console") && t.kind.contains("retry")),
        "no retry by the console in {:?}",
        detail.timeline
    );
    let _ = stop_http.send(true);
    sys.stop().await;
}

/// Every page, then the retry. Errors say what the page showed instead.
fn browse(
    base: &str,
    failed: &str,
    completed: &[String],
    shots: Option<PathBuf>,
) -> Result<(), String> {
    let b = Browser::start()?;
    let shot = |name: &str| -> Result<(), String> {
        match &shots {
            Some(dir) => {
                std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
                b.screenshot(&dir.join(format!("{name}.png")))
            }
            None => Ok(()),
        }
    };

    // The list: every saga, live counts by state.
    b.goto(&format!("{base}/"))?;
    b.wait_for("#saga-rows tr[data-id]", PAGE)?;
    let count = |state: &str| -> Result<String, String> {
        b.text_of(&format!("#counts [data-count={state}] b"))
    };
    wait_until(
        PAGE,
        || Ok(b.find_all("#saga-rows tr[data-id]")?.len() == 6),
    )
    .map_err(|e| format!("the list does not show 6 sagas: {e}"))?;
    if count("completed")? != "3" || count("compensated")? != "2" || count("failed")? != "1" {
        return Err(format!(
            "counts: completed {}, compensated {}, failed {}",
            count("completed")?,
            count("compensated")?,
            count("failed")?
        ));
    }
    shot("console-sagas")?;

    // Filtered by state: only the failed saga.
    b.goto(&format!("{base}/#/sagas?state=failed"))?;
    wait_until(PAGE, || {
        let rows = b.find_all("#saga-rows tr[data-id]")?;
        Ok(rows.len() == 1 && b.text_of("#saga-rows tr[data-id] td")? == failed)
    })
    .map_err(|e| format!("the failed filter: {e}"))?;

    // By definition, through the form's select: the hold saga is the only console-hold.
    b.goto(&format!("{base}/#/sagas?saga=console-hold"))?;
    wait_until(
        PAGE,
        || Ok(b.find_all("#saga-rows tr[data-id]")?.len() == 1),
    )
    .map_err(|e| format!("the definition filter: {e}"))?;

    // Search by id opens the saga page.
    b.goto(&format!("{base}/#/sagas"))?;
    let search = b.wait_for("#filters input[name=q]", PAGE)?;
    b.type_into(&search, &completed[0])?;
    let apply = b.wait_for("#filters button[type=submit]", PAGE)?;
    b.click(&apply)?;
    b.wait_for("#saga-graph svg g.step[data-step=payment]", PAGE)?;
    let head = b.text_of("#saga-head")?;
    if !head.contains("completed") {
        return Err(format!("the completed saga's page says: {head}"));
    }
    let steps = b.find_all("#step-rows tr[data-step]")?.len();
    if steps != 4 {
        return Err(format!("{steps} step rows on an order saga's page"));
    }
    if b.find_all("#timeline-rows tr")?.is_empty() {
        return Err("no timeline on the completed saga's page".into());
    }
    if !b.text_of("#saga-outputs")?.contains("txn_id") {
        return Err("the payment step's output is not shown".into());
    }
    shot("console-saga")?;

    // The failed saga: its graph shows the refusal; Retry, confirm; the page follows it live
    // to completed.
    b.goto(&format!("{base}/#/saga/{failed}"))?;
    b.wait_for("#saga-graph svg g.step[data-step=grant]", PAGE)?;
    let graph = b.text_of("#saga-graph")?;
    if !graph.contains("stuck") {
        return Err(format!("the failed step's graph says: {graph}"));
    }
    let retry = b.wait_for("#action-retry", PAGE)?;
    b.click(&retry)?;
    let title = b.text_of("#confirm-title")?;
    if !title.contains("Retry") {
        return Err(format!("the confirmation says: {title}"));
    }
    let ok = b.wait_for("#confirm-ok", PAGE)?;
    b.click(&ok)?;
    b.wait_for("#saga-head [data-state=completed]", PAGE)
        .map_err(|e| format!("the retried saga did not complete on its page: {e}"))?;
    let step = b.text_of("#step-rows tr[data-step=grant]")?;
    if !step.contains("succeeded") {
        return Err(format!("the retried step says: {step}"));
    }

    // Dead letters: the stray reply, with its reason; its message on a click.
    b.goto(&format!("{base}/#/dead-letters"))?;
    b.wait_for("#dead-rows tr[data-id]", PAGE)?;
    let row = b.text_of("#dead-rows tr[data-id]")?;
    if !row.contains("reply") {
        return Err(format!("the dead letter row says: {row}"));
    }
    let link = b.wait_for("#dead-rows tr[data-id] a", PAGE)?;
    b.click(&link)?;
    let detail = b.wait_for("#dead-detail pre", PAGE)?;
    if !b.text(&detail)?.contains("no-such-saga") {
        return Err("the dead letter's message is not shown".into());
    }

    // The dashboard: what started in the last hour, latencies, outbox, dead letters.
    b.goto(&format!("{base}/#/dashboard"))?;
    b.wait_for("#fig-started", PAGE)?;
    let started = b.text_of("#fig-started .value")?;
    if started != "6" {
        return Err(format!("the dashboard says {started} started"));
    }
    if b.text_of("#fig-dead .value")? != "1" {
        return Err("the dashboard does not count the dead letter".into());
    }
    if b.find_all("#chart svg rect")?.is_empty() {
        return Err("the dashboard's chart has no bars".into());
    }
    if b.text_of("#fig-p50 .value")? == "–" {
        return Err("no latency on the dashboard".into());
    }
    shot("console-dashboard")?;

    // No script error on the way.
    let errors = b.script("return window.__errors || []")?;
    if errors.as_array().is_some_and(|e| !e.is_empty()) {
        return Err(format!("script errors: {errors}"));
    }
    Ok(())
}

fn wait_until(
    limit: Duration,
    mut check: impl FnMut() -> Result<bool, String>,
) -> Result<(), String> {
    let start = Instant::now();
    loop {
        if check()? {
            return Ok(());
        }
        if start.elapsed() > limit {
            return Err(format!("not so within {limit:?}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

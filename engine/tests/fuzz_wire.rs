//! Fuzzing the wire decoders (issue 9, item 10): the bounded run that `cargo test` does; the
//! longer, coverage-guided run is `fuzz/` (cargo-fuzz), see the README.
//!
//! Every byte string a queue can hand the engine or a worker goes through one of these: the
//! bundle decoder (`transport::bundle::decode`, an AMQP message holding several), then
//! `serde_json::from_slice` into a [`CommandMsg`] (workers), a [`ReplyMsg`] or a [`StartMsg`]
//! (the engine's inbound loop), then for a start the input check (`input::sequence_key`).
//! Properties, on arbitrary bytes and on valid messages mutated field by field and byte by byte:
//! no panic; an error always says something; what decodes re-encodes to itself (a bundle to the
//! very same bytes); a message missing a field, or cut short, never decodes. Last, the real
//! inbound loop is fed a few hundred such payloads and must dead-letter or apply each one and
//! keep running. `PROPTEST_CASES=100000` runs longer.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use sagaflow_engine::machine::{Op, Outcome};
use sagaflow_engine::store::{ENGINE_MIGRATIONS, Store};
use sagaflow_engine::transport::memory::MemoryTransport;
use sagaflow_engine::transport::{Message, REPLY_QUEUE, START_QUEUE, Transport, bundle};
use sagaflow_engine::wire::{CommandMsg, ReplyMsg, StartMsg};
use sagaflow_engine::{Engine, EngineError, input, trace};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

/// Cases per property unless `PROPTEST_CASES` says otherwise.
const CASES: u32 = 512;

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(CASES);
    ProptestConfig {
        cases,
        max_shrink_iters: 2_000,
        ..ProptestConfig::default()
    }
}

const ORDER: &str = include_str!("../../sagas/order.yaml");

fn order_graph() -> &'static sagaflow_dsl::SagaGraph {
    static GRAPH: std::sync::OnceLock<sagaflow_dsl::SagaGraph> = std::sync::OnceLock::new();
    GRAPH.get_or_init(|| {
        sagaflow_dsl::compile(ORDER)
            .graph
            .expect("order.yaml compiles")
    })
}

// --- strategies -------------------------------------------------------------------------------

/// Strings that matter to decoders: empty, escapes, non-ASCII, lone-surrogate escapes, huge.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => ".{0,16}",
        1 => Just(String::new()),
        1 => Just("order-1/0/action/1".to_owned()),
        1 => Just("ünï\u{0}\u{feff}名".to_owned()),
        1 => (1usize..3000).prop_map(|n| "x".repeat(n)),
    ]
}

/// Any JSON value, a few levels deep. Floats are a fixed few that print and parse back exactly.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        prop_oneof![Just(0.5), Just(-1.25), Just(1e300), Just(-0.0)].prop_map(|f: f64| json!(f)),
        text().prop_map(Value::from),
        Just(json!("action")),
        Just(json!("ok")),
        Just(json!("business")),
    ];
    leaf.prop_recursive(3, 32, 5, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            proptest::collection::btree_map("[a-z_]{0,10}", inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        Just(Op::Action),
        Just(Op::Compensate),
        Just(Op::Try),
        Just(Op::Confirm),
        Just(Op::Cancel),
    ]
}

fn outcome() -> impl Strategy<Value = Outcome> {
    prop_oneof![
        json_value().prop_map(|output| Outcome::Ok { output }),
        text().prop_map(|message| Outcome::Retryable { message }),
        (text(), text()).prop_map(|(code, message)| Outcome::Business { code, message }),
    ]
}

/// A trace context as messages carry it: none, a valid one, one of the right shape, or any
/// text; its `tracestate` none, a valid list, or any text.
fn trace_context() -> impl Strategy<Value = (Option<String>, Option<String>)> {
    let traceparent = prop_oneof![
        Just(None),
        Just(Some(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned()
        )),
        "00-[0-9a-f]{32}-[0-9a-f]{16}-0[01]".prop_map(Some),
        text().prop_map(Some),
    ];
    let tracestate = prop_oneof![
        Just(None),
        "[a-z]{1,8}=[a-z0-9]{1,8}(,[a-z]{1,8}=[a-z0-9]{1,8}){0,3}".prop_map(Some),
        text().prop_map(Some),
    ];
    (traceparent, tracestate)
}

fn command() -> impl Strategy<Value = CommandMsg> {
    (
        (text(), text(), text(), any::<usize>(), text(), text()),
        (op(), text(), text(), any::<u32>(), json_value()),
        trace_context(),
    )
        .prop_map(
            |(
                (saga_id, saga, key, step, step_id, service),
                (op, operation, forward, attempt, params),
                (traceparent, tracestate),
            )| {
                CommandMsg {
                    traceparent,
                    tracestate,
                    saga_id,
                    saga,
                    key,
                    step,
                    step_id,
                    service,
                    op,
                    operation,
                    forward,
                    attempt,
                    params,
                }
            },
        )
}

fn reply() -> impl Strategy<Value = ReplyMsg> {
    (
        text(),
        any::<usize>(),
        op(),
        any::<u32>(),
        outcome(),
        trace_context(),
    )
        .prop_map(
            |(saga_id, step, op, attempt, outcome, (traceparent, tracestate))| ReplyMsg {
                traceparent,
                tracestate,
                saga_id,
                step,
                op,
                attempt,
                outcome,
            },
        )
}

/// A valid input of the order saga, as the shop sends it.
fn order_input() -> impl Strategy<Value = Value> {
    (
        "[a-z0-9-]{1,12}",
        "[a-z0-9]{1,8}",
        0u32..100_000,
        0i64..10_000,
    )
        .prop_map(|(order, user, cents, points)| {
            json!({
                "order_id": order,
                "user_id": user,
                "amount": format!("{}.{:02}", cents / 100, cents % 100),
                "coupon_id": "c-1",
                "points": points,
                "campaign_id": "spring",
            })
        })
}

/// Edits of a JSON object's top-level fields.
#[derive(Debug, Clone)]
enum FieldEdit {
    Remove(Index),
    Replace(Index, Value),
    Add(String, Value),
    Rename(Index, String),
}

fn field_edit() -> impl Strategy<Value = FieldEdit> {
    prop_oneof![
        any::<Index>().prop_map(FieldEdit::Remove),
        (any::<Index>(), json_value()).prop_map(|(i, v)| FieldEdit::Replace(i, v)),
        ("[a-z_]{0,10}", json_value()).prop_map(|(k, v)| FieldEdit::Add(k, v)),
        (any::<Index>(), "[a-z_]{0,10}").prop_map(|(i, k)| FieldEdit::Rename(i, k)),
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

/// Edits of the encoded bytes.
#[derive(Debug, Clone)]
enum ByteEdit {
    Flip(Index, u8),
    Insert(Index, u8),
    Delete(Index, Index),
    Truncate(Index),
}

fn byte_edit() -> impl Strategy<Value = ByteEdit> {
    prop_oneof![
        (any::<Index>(), any::<u8>()).prop_map(|(i, b)| ByteEdit::Flip(i, b)),
        (any::<Index>(), any::<u8>()).prop_map(|(i, b)| ByteEdit::Insert(i, b)),
        (any::<Index>(), any::<Index>()).prop_map(|(i, j)| ByteEdit::Delete(i, j)),
        any::<Index>().prop_map(ByteEdit::Truncate),
    ]
}

fn edit_bytes(bytes: &mut Vec<u8>, edits: &[ByteEdit]) {
    for e in edits {
        let n = bytes.len();
        match e {
            ByteEdit::Flip(i, b) if n > 0 => bytes[i.index(n)] = *b,
            ByteEdit::Insert(i, b) => bytes.insert(i.index(n + 1), *b),
            ByteEdit::Delete(i, j) if n > 0 => {
                let a = i.index(n);
                let b = (a + 1 + j.index(8)).min(n);
                bytes.drain(a..b);
            }
            ByteEdit::Truncate(i) => bytes.truncate(i.index(n + 1)),
            _ => {}
        }
    }
}

// --- the checks -------------------------------------------------------------------------------

/// Decodes `bytes` as `T`: an error has a message; a message re-encodes to itself.
fn decode<T>(bytes: &[u8]) -> Result<Option<T>, TestCaseError>
where
    T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug,
{
    match serde_json::from_slice::<T>(bytes) {
        Ok(m) => {
            let again = serde_json::to_vec(&m).expect("a decoded message encodes");
            let back: T = serde_json::from_slice(&again).map_err(|e| {
                TestCaseError::fail(format!("{m:?} re-encoded does not decode: {e}"))
            })?;
            prop_assert_eq!(&back, &m);
            Ok(Some(m))
        }
        Err(e) => {
            prop_assert!(
                !e.to_string().trim().is_empty(),
                "an error without a message"
            );
            Ok(None)
        }
    }
}

/// The structure-aware check for one message type: encode `original`, edit its fields and
/// bytes, decode. Unedited, it decodes to itself; with a field gone or cut short, it never
/// decodes; decoded, every field it kept is what the edited document held.
fn mutated<T>(
    original: &T,
    required: &[&str],
    fields: &[FieldEdit],
    bytes: &[ByteEdit],
) -> Result<(), TestCaseError>
where
    T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug,
{
    let mut doc = serde_json::to_value(original).expect("encode");
    edit_fields(&mut doc, fields);
    let clean = serde_json::to_vec(&doc).expect("encode");
    let decoded = decode::<T>(&clean)?;
    let obj = doc.as_object().expect("still an object");
    if fields.is_empty() {
        prop_assert_eq!(
            decoded.as_ref(),
            Some(original),
            "an untouched message decodes"
        );
    }
    if required.iter().any(|k| !obj.contains_key(*k)) {
        prop_assert!(
            decoded.is_none(),
            "decoded without a required field: {}",
            doc
        );
    }
    if let Some(m) = &decoded {
        let re = serde_json::to_value(m).expect("encode");
        for k in required {
            // `outcome` is a tagged enum: it may drop unknown keys of its own.
            if *k != "outcome" {
                prop_assert_eq!(&re[*k], &obj[*k], "field `{}` of {}", k, doc);
            }
        }
    }
    // A strict prefix of a JSON object never decodes.
    for cut in [0, clean.len() / 2, clean.len().saturating_sub(1)] {
        if cut < clean.len() {
            prop_assert!(
                serde_json::from_slice::<T>(&clean[..cut]).is_err(),
                "cut at {cut}"
            );
        }
    }
    let mut edited = clean;
    edit_bytes(&mut edited, bytes);
    decode::<T>(&edited)?;
    Ok(())
}

const COMMAND_FIELDS: &[&str] = &[
    "saga_id",
    "saga",
    "key",
    "step",
    "step_id",
    "service",
    "op",
    "operation",
    "forward",
    "attempt",
    "params",
];
const REPLY_FIELDS: &[&str] = &["saga_id", "step", "op", "attempt", "outcome"];
const START_FIELDS: &[&str] = &["saga", "input", "idempotency_key"];

/// The start path after decoding: the order saga's input check never panics; it accepts an
/// input only with a string `order_id`, which is the key.
fn check_start_input(start: &Value) -> Result<(), TestCaseError> {
    match input::sequence_key(order_graph(), start) {
        Ok(key) => prop_assert_eq!(Some(key.as_str()), start["order_id"].as_str()),
        Err(EngineError::InvalidInput { detail, .. }) => {
            prop_assert!(!detail.trim().is_empty())
        }
        Err(other) => prop_assert!(false, "not an input error: {other}"),
    }
    Ok(())
}

fn check_bundle(body: &[u8]) -> Result<Option<Vec<Message>>, TestCaseError> {
    match bundle::decode(body) {
        Ok(parts) => {
            prop_assert!(!parts.is_empty(), "a bundle has parts");
            prop_assert!(parts.iter().all(bundle::fits));
            // The encoding is canonical: what decodes is exactly what encode writes.
            prop_assert_eq!(bundle::encode(&parts), body.to_vec());
            Ok(Some(parts))
        }
        Err(e) => {
            prop_assert!(!e.trim().is_empty());
            Ok(None)
        }
    }
}

fn part() -> impl Strategy<Value = Message> {
    let payload = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..64),
        reply().prop_map(|r| serde_json::to_vec(&r).expect("encode")),
    ];
    (".{0,24}", ".{0,12}", payload).prop_map(|(id, key, payload)| Message { id, key, payload })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_bytes_never_panic_a_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..1024)) {
        decode::<CommandMsg>(&bytes)?;
        decode::<ReplyMsg>(&bytes)?;
        if let Some(start) = decode::<StartMsg>(&bytes)? {
            check_start_input(&start.input)?;
        }
        check_bundle(&bytes)?;
        let mut magic = b"SFB1".to_vec();
        magic.extend_from_slice(&bytes);
        check_bundle(&magic)?;
    }

    /// Any JSON document (rather than any bytes) gets past the syntax and into the shapes.
    #[test]
    fn arbitrary_json_never_panics_a_decoder(doc in json_value()) {
        let bytes = serde_json::to_vec(&doc).expect("encode");
        decode::<CommandMsg>(&bytes)?;
        decode::<ReplyMsg>(&bytes)?;
        decode::<StartMsg>(&bytes)?;
        decode::<Outcome>(&bytes)?;
        check_start_input(&doc)?;
    }

    /// The transport's prefix scanners (the AMQP headers are read with them, not with a
    /// decoder) find exactly a valid `traceparent`, and a `tracestate` only beside it and as
    /// it was sent; a valid list is always found. Any bytes after the prefix never panic them.
    #[test]
    fn trace_context_scanners_agree_with_the_message(
        m in command(),
        r in reply(),
        tail in proptest::collection::vec(any::<u8>(), 0..600),
    ) {
        for (bytes, tp, ts) in [
            (serde_json::to_vec(&m).expect("encode"), &m.traceparent, &m.tracestate),
            (serde_json::to_vec(&r).expect("encode"), &r.traceparent, &r.tracestate),
        ] {
            let valid = tp.as_deref().filter(|t| trace::parse(t).is_some());
            prop_assert_eq!(trace::traceparent_in(&bytes), valid);
            let found = trace::tracestate_in(&bytes);
            if valid.is_none() {
                prop_assert!(found.is_none());
            }
            if let Some(found) = &found {
                prop_assert_eq!(Some(found.as_ref()), ts.as_deref());
            }
            let simple = ts.as_deref().is_some_and(|s| {
                !s.is_empty() && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'=' || b == b',')
                    && trace::parse_state(s).is_some()
            });
            if valid.is_some() && simple {
                prop_assert!(found.is_some(), "a valid tracestate is found: {:?}", ts);
            }
            if let Some(valid) = valid {
                let mut cut = format!(r#"{{"traceparent":"{valid}","tracestate":""#).into_bytes();
                cut.extend_from_slice(&tail);
                let _ = trace::tracestate_in(&cut);
            }
        }
    }

    #[test]
    fn mutated_commands(
        m in command(),
        fields in proptest::collection::vec(field_edit(), 0..4),
        bytes in proptest::collection::vec(byte_edit(), 0..4),
    ) {
        prop_assert!(m.message_id().starts_with(&m.saga_id));
        mutated(&m, COMMAND_FIELDS, &fields, &bytes)?;
    }

    #[test]
    fn mutated_replies(
        m in reply(),
        fields in proptest::collection::vec(field_edit(), 0..4),
        bytes in proptest::collection::vec(byte_edit(), 0..4),
    ) {
        prop_assert!(m.message_id().ends_with("/reply"));
        mutated(&m, REPLY_FIELDS, &fields, &bytes)?;
        // The outcome alone: its tag and fields edited.
        let mut doc = serde_json::to_value(&m.outcome).expect("encode");
        edit_fields(&mut doc, &fields);
        decode::<Outcome>(&serde_json::to_vec(&doc).expect("encode"))?;
    }

    #[test]
    fn mutated_starts(
        saga in prop_oneof![Just("order-paid".to_owned()), text()],
        input in prop_oneof![order_input(), json_value()],
        input_edits in proptest::collection::vec(field_edit(), 0..3),
        key in text(),
        fields in proptest::collection::vec(field_edit(), 0..3),
        bytes in proptest::collection::vec(byte_edit(), 0..3),
    ) {
        let mut input = input;
        edit_fields(&mut input, &input_edits);
        check_start_input(&input)?;
        let m = StartMsg {traceparent: None, tracestate: None,  saga, input, idempotency_key: key };
        mutated(&m, START_FIELDS, &fields, &bytes)?;
    }

    #[test]
    fn valid_order_inputs_give_their_order_id_as_key(input in order_input()) {
        let key = input::sequence_key(order_graph(), &input).ok();
        prop_assert_eq!(key.as_deref(), input["order_id"].as_str());
    }

    #[test]
    fn mutated_bundles(
        parts in proptest::collection::vec(part(), 1..8),
        edits in proptest::collection::vec(byte_edit(), 0..4),
        count in proptest::option::of(any::<u32>()),
    ) {
        let body = bundle::encode(&parts);
        let decoded = check_bundle(&body)?;
        prop_assert_eq!(decoded.as_ref(), Some(&parts));
        // Every part of a bundle of replies is a reply again.
        for p in &parts {
            if let Ok(r) = serde_json::from_slice::<ReplyMsg>(&p.payload) {
                prop_assert_eq!(serde_json::to_vec(&r).expect("encode"), p.payload.clone());
            }
        }
        // Cut short or with bytes after it, a bundle never decodes.
        for cut in [0, 4, 8, body.len() / 2, body.len() - 1] {
            prop_assert!(bundle::decode(&body[..cut.min(body.len() - 1)]).is_err());
        }
        let mut longer = body.clone();
        longer.push(0);
        prop_assert!(bundle::decode(&longer).is_err());
        let mut edited = body;
        if let Some(n) = count {
            edited[4..8].copy_from_slice(&n.to_be_bytes());
        }
        edit_bytes(&mut edited, &edits);
        if let Some(parts) = check_bundle(&edited)? {
            for p in &parts {
                decode::<ReplyMsg>(&p.payload)?;
            }
        }
    }
}

// --- the real inbound loop ----------------------------------------------------------------------

/// Payloads for the reply and start queues: garbage, JSON, and mutated real messages (replies
/// for sagas that exist, with any step, op, attempt and outcome; starts of the order saga with
/// edited inputs and keys).
fn inbound_payloads(saga_ids: &[String], n: usize) -> Vec<(&'static str, Vec<u8>)> {
    let ids = saga_ids.to_vec();
    let reply_for_real = (any::<Index>(), 0usize..8, op(), 0u32..4, outcome()).prop_map(
        move |(i, step, op, attempt, outcome)| ReplyMsg {
            traceparent: None,
            tracestate: None,
            saga_id: ids[i.index(ids.len())].clone(),
            step,
            op,
            attempt,
            outcome,
        },
    );
    let payload = prop_oneof![
        1 => proptest::collection::vec(any::<u8>(), 0..200).prop_map(|b| (REPLY_QUEUE, b)),
        1 => proptest::collection::vec(any::<u8>(), 0..200).prop_map(|b| (START_QUEUE, b)),
        1 => json_value().prop_map(|v| (REPLY_QUEUE, serde_json::to_vec(&v).expect("encode"))),
        1 => json_value().prop_map(|v| (START_QUEUE, serde_json::to_vec(&v).expect("encode"))),
        3 => (reply_for_real, proptest::collection::vec(field_edit(), 0..2)).prop_map(|(r, e)| {
            let mut doc = serde_json::to_value(&r).expect("encode");
            edit_fields(&mut doc, &e);
            (REPLY_QUEUE, serde_json::to_vec(&doc).expect("encode"))
        }),
        3 => (
            order_input(),
            proptest::collection::vec(field_edit(), 0..2),
            prop_oneof![Just(String::new()), "[a-z0-9]{1,8}"],
            proptest::collection::vec(field_edit(), 0..2),
        )
            .prop_map(|(mut input, ie, key, e)| {
                edit_fields(&mut input, &ie);
                let start = StartMsg {traceparent: None, tracestate: None,  saga: "order-paid".into(), input, idempotency_key: key };
                let mut doc = serde_json::to_value(&start).expect("encode");
                edit_fields(&mut doc, &e);
                (START_QUEUE, serde_json::to_vec(&doc).expect("encode"))
            }),
    ];
    let mut runner = TestRunner::deterministic();
    (0..n)
        .map(|_| payload.new_tree(&mut runner).expect("generate").current())
        .collect()
}

/// The engine's inbound loop on a few hundred hostile payloads: each one is applied or
/// dead-lettered with a reason, the queues drain, and the engine keeps running and serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inbound_loop_survives_hostile_payloads() {
    let dir = std::env::temp_dir().join(format!(
        "sagaflow-fuzz-inbound-{}-{:08x}",
        std::process::id(),
        fastrand::u32(..)
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let url = format!("sqlite://{}?mode=rwc", dir.join("test.db").display());
    let store = Store::connect(&url, 1).await.expect("connect");
    store.migrate(&[ENGINE_MIGRATIONS]).await.expect("migrate");
    let transport = Arc::new(MemoryTransport::default());
    let engine = Engine::new(store.clone(), transport.clone());
    let graph = engine.register(ORDER).await.expect("order saga");
    let mut ids = Vec::new();
    for i in 0..4 {
        let input = json!({
            "order_id": format!("o-{i}"), "user_id": "u", "amount": "1.00",
            "coupon_id": "c", "points": 1, "campaign_id": "k",
        });
        ids.push(engine.start(&graph, input, None).await.expect("start").id);
    }
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let run = tokio::spawn(engine.clone().run(stopped));

    let n: usize = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(300);
    let payloads = inbound_payloads(&ids, n);
    for (i, (queue, payload)) in payloads.iter().enumerate() {
        let message = Message {
            id: format!("fuzz-{i}"),
            key: format!("k-{}", i % 7),
            payload: payload.clone(),
        };
        transport.publish(queue, message).await.expect("publish");
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while transport.depth(REPLY_QUEUE) + transport.depth(START_QUEUE) > 0 {
        assert!(!run.is_finished(), "the engine stopped: {:?}", run.await);
        assert!(
            Instant::now() < deadline,
            "not drained: {} replies, {} starts left",
            transport.depth(REPLY_QUEUE),
            transport.depth(START_QUEUE)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!run.is_finished(), "the engine is still running");
    let letters = transport.dead_letters();
    let mut by_queue: BTreeMap<&str, usize> = BTreeMap::new();
    for l in &letters {
        assert!(
            !l.reason.trim().is_empty(),
            "a dead letter without a reason: {l:?}"
        );
        *by_queue.entry(l.queue.as_str()).or_default() += 1;
    }
    eprintln!(
        "{} payloads: {} dead letters by queue {by_queue:?}",
        payloads.len(),
        letters.len()
    );
    let published = |q: &str| payloads.iter().filter(|(queue, _)| *queue == q).count();
    assert!(by_queue.get(REPLY_QUEUE).copied().unwrap_or(0) <= published(REPLY_QUEUE));
    assert!(by_queue.get(START_QUEUE).copied().unwrap_or(0) <= published(START_QUEUE));
    assert!(
        by_queue.get(REPLY_QUEUE).copied().unwrap_or(0) > 0,
        "garbage replies are dead-lettered: {by_queue:?}"
    );
    // Still serving: the store answers and the sagas read back.
    store.ping().await.expect("the store answers");
    for id in &ids {
        let detail = sagaflow_engine::status::saga(&store, id)
            .await
            .expect("read");
        assert!(detail.is_some(), "saga {id} reads back");
    }
    stop.send(true).expect("engine listening");
    let stopped = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("the engine stops")
        .expect("no panic in the engine");
    assert!(stopped.is_ok(), "{stopped:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

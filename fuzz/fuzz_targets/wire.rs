//! The wire decoders on arbitrary bytes: a command (workers), a reply and a start (the engine's
//! inbound loop), then a start's input checked against the order saga. Never a panic; what
//! decodes re-encodes to itself; an error has a message.
//! Seeds: `cargo +nightly fuzz run wire corpus/wire seeds/wire`.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use sagaflow_engine::input;
use sagaflow_engine::wire::{CommandMsg, ReplyMsg, StartMsg};
use serde::Serialize;
use serde::de::DeserializeOwned;

fn order() -> &'static sagaflow_dsl::SagaGraph {
    static GRAPH: OnceLock<sagaflow_dsl::SagaGraph> = OnceLock::new();
    GRAPH.get_or_init(|| {
        sagaflow_dsl::compile(include_str!("../../sagas/order.yaml"))
            .graph
            .expect("order.yaml compiles")
    })
}

fn round_trip<T>(data: &[u8]) -> Option<T>
where
    T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug,
{
    match serde_json::from_slice::<T>(data) {
        Ok(m) => {
            let again = serde_json::to_vec(&m).expect("encodes");
            let back: T = serde_json::from_slice(&again).expect("re-encoded decodes");
            assert_eq!(back, m);
            Some(m)
        }
        Err(e) => {
            assert!(!e.to_string().is_empty());
            None
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if let Some(c) = round_trip::<CommandMsg>(data) {
        assert!(c.message_id().starts_with(&c.saga_id));
    }
    if let Some(r) = round_trip::<ReplyMsg>(data) {
        assert!(r.message_id().ends_with("/reply"));
    }
    if let Some(s) = round_trip::<StartMsg>(data) {
        match input::sequence_key(order(), &s.input) {
            Ok(key) => assert_eq!(Some(key.as_str()), s.input["order_id"].as_str()),
            Err(e) => assert!(!e.to_string().is_empty()),
        }
    }
});

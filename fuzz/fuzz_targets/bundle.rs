//! The bundle decoder (several messages in one AMQP message) on arbitrary bytes: never a
//! panic; what decodes re-encodes to the very same bytes; each part's payload goes on to the
//! reply decoder, as the engine's inbound loop would.
//! Seeds: `cargo +nightly fuzz run bundle corpus/bundle seeds/bundle`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sagaflow_engine::transport::bundle;
use sagaflow_engine::wire::ReplyMsg;

fuzz_target!(|data: &[u8]| {
    match bundle::decode(data) {
        Ok(parts) => {
            assert!(!parts.is_empty());
            assert_eq!(bundle::encode(&parts), data);
            for p in &parts {
                let _ = serde_json::from_slice::<ReplyMsg>(&p.payload);
            }
        }
        Err(e) => assert!(!e.is_empty()),
    }
});

//! sagaflow's engine: runs compiled sagas to a final state.
//!
//! | module | what lives there |
//! |---|---|
//! | [`machine`] | the pure saga state machine: `decide(graph, state, event, ctx) -> Decision` |
//! | [`engine`] | the driver: start sagas, apply events in transactions, the reply/relay/timer loops |
//! | [`store`] | persistence on sqlx (SQLite and PostgreSQL through one `Any` implementation), migrations |
//! | [`transport`] | the `Transport` trait and the in-process implementation (with fault injection) |
//! | [`wire`] | the command and reply messages |
//! | [`starts`] | the start queue's consumer: saga starts relayed from applications' own transactions (`sagaflow-client`) |
//! | [`status`] | read side: saga details, lists, timelines |
//! | [`retention`] | purging the history, inbox, outbox and timer rows of sagas finished long ago, in small batches |
//! | [`http`] | the HTTP API (axum): start, read, retry and abort sagas; `/healthz`, `/metrics` |
//! | [`metrics`] | Prometheus metrics: counters from the engine's decisions, outbox gauges at scrape time |

pub mod engine;
pub mod http;
pub mod machine;
pub mod metrics;
pub mod retention;
pub mod starts;
pub mod status;
pub mod store;
pub mod transport;
pub mod wire;

pub use engine::{Applied, Engine, EngineError, Incoming, Started};
pub use store::{Store, StoreError};

//! sagaflow's engine: runs compiled sagas to a final state.
//!
//! | module | what lives there |
//! |---|---|
//! | [`machine`] | the pure saga state machine: `decide(graph, state, event, ctx) -> Decision` |
//! | [`engine`] | the driver: start sagas, apply events in transactions, the reply/relay/timer loops |
//! | [`store`] | persistence on sqlx (SQLite and PostgreSQL through one `Any` implementation), migrations |
//! | [`transport`] | the `Transport` trait and the in-process implementation (with fault injection) |
//! | [`wire`] | the command and reply messages |
//! | [`status`] | read side: saga details, lists, timelines |

pub mod engine;
pub mod machine;
pub mod status;
pub mod store;
pub mod transport;
pub mod wire;

pub use engine::{Applied, Engine, EngineError, Incoming, Started};
pub use store::{Store, StoreError};

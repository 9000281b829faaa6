//! sagaflow's engine: runs compiled sagas to a final state.
//!
//! | module | what lives there |
//! |---|---|
//! | [`machine`] | the pure saga state machine: `decide(graph, state, event, ctx) -> Decision` |
//! | [`engine`] | the `Engine`: what it holds, starting sagas, and the loops it runs |
//! | [`definitions`] | the definitions registry: compiled graphs by content hash, latest by name |
//! | [`input`] | input checks: a start's input against its definition, and its sequence key |
//! | [`apply`] | the apply path: a batch of replies, timers, operator events and starts in one set-based transaction |
//! | [`group`] | group commit: every batch to apply (replies, starts, due timers) queued, and what waits together applied in one transaction |
//! | [`inbound`] | the one inbound loop, for the reply queue and the start queue: batch, apply, then ack or dead-letter |
//! | [`relay`] | the outbox relay: claim with a lease, publish pipelined with confirms, the sent rows deleted by the next apply |
//! | [`timers`] | the timer loop: fire due retry and timeout timers |
//! | [`operator`] | operator actions: abort, retry |
//! | [`store`] | every SQL statement: the table traits, their PostgreSQL and SQLite statements, migrations, the read side |
//! | [`transport`] | the `Transport` trait, RabbitMQ (lapin) and in-process implementations |
//! | [`wire`] | the command, reply and start messages |
//! | [`status`] | read side: saga details, lists, timelines |
//! | [`retention`] | purging the history, inbox, outbox and timer rows of sagas finished long ago, in small batches |
//! | `http` | the HTTP API (axum), the web console and `/openapi.json`; behind the `http` feature (on by default; workers and the client library go without) |
//! | [`metrics`] | Prometheus metrics: counters from the engine's decisions, outbox gauges at scrape time |

pub mod apply;
pub mod dead_letters;
pub mod definitions;
pub mod engine;
pub mod group;
pub mod handoff;
#[cfg(feature = "http")]
pub mod http;
pub mod inbound;
pub mod input;
pub mod machine;
pub mod metrics;
pub mod operator;
pub mod redact;
pub mod relay;
pub mod retention;
pub mod run;
pub mod startup;
pub mod status;
pub mod store;
pub mod time;
pub mod timers;
pub mod trace;
pub mod transport;
pub mod wire;

pub use apply::{Done, Inbound, StartRequest};
pub use engine::{Applied, Engine, EngineError, Incoming, Started};
pub use store::{Store, StoreError};

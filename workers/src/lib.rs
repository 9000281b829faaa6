//! sagaflow's worker side: the SDK and the four order services.
//!
//! | module | what lives there |
//! |---|---|
//! | [`sdk`] | the handler traits (`SagaStep`, `TccStep`), `StepError`, `StepContext`, parameter helpers |
//! | [`barrier`] | strong idempotency: one row per (saga, step, operation), in the effect's transaction, set-based per batch with a savepoint per handler; retention by age; its migrations ([`BARRIER_MIGRATIONS`]) |
//! | [`weak`] | weak idempotency: a Redis key per (saga, step, operation) holding the reply, for cheap effects |
//! | [`runtime`] | the worker: handlers registered with their `Idempotency` (barrier or weak), consume commands, per-key lanes, batches (one transaction each), barrier or weak mode, pipelined replies, ack; poison commands dead-lettered; fault injection |
//! | [`service`] | a service of your own as a process (`service::main`): the environment, embedded with the engine or the worker alone over RabbitMQ, migrations, retention, signals |
//! | [`services`] | the demo order services: payment, coupon, points, gmv — each with its own tables |
//!
//! A service of your own needs only the SDK: its handlers, and a [`service::Service`] naming
//! them, its sagas and its tables' migrations (applied after [`BARRIER_MIGRATIONS`]), which
//! [`service::main`] runs as a process. `examples/shipping/` in the repository is one, start to
//! end (the README's "Your own service").

pub mod barrier;
pub mod metrics;
pub mod runtime;
pub mod sdk;
pub mod service;
pub mod services;
pub mod weak;

/// The SDK's tables in a worker's database, without the demo services': the barrier
/// (`0100_barrier`), its retention index (`0105_barrier_retention`), the deployment binding
/// (`0106_deployment`) and, on SQLite, the barrier rebuilt with its CHECK spelled without an
/// `IN` list (`0107_barrier_check_without_list`; an index or trigger of your own on `barrier`
/// must be made again after it, and a view of your own over it dropped before it, or the
/// migration fails naming it). Apply it before your own tables:
/// `store.migrate(&[sagaflow_workers::BARRIER_MIGRATIONS, MY_MIGRATIONS])`. The SQL is also in
/// `migrations/{postgres,sqlite}/` under those names, for a migration tool of your own.
pub use barrier::MIGRATIONS as BARRIER_MIGRATIONS;

//! sagaflow's worker side: the SDK and the four order services.
//!
//! | module | what lives there |
//! |---|---|
//! | [`sdk`] | the handler traits (`SagaStep`, `TccStep`), `StepError`, `StepContext`, parameter helpers |
//! | [`barrier`] | strong idempotency: one row per (saga, step, operation), in the effect's transaction, set-based per batch with a savepoint per handler; retention by age |
//! | [`weak`] | weak idempotency: a Redis key per (saga, step, operation) holding the reply, for cheap effects |
//! | [`runtime`] | the worker: handlers registered with their `Idempotency` (barrier or weak), consume commands, per-key lanes, batches (one transaction each), barrier or weak mode, pipelined replies, ack; poison commands dead-lettered; fault injection |
//! | [`services`] | the order services: payment, coupon, points, gmv — each with its own tables |

pub mod barrier;
pub mod metrics;
pub mod runtime;
pub mod sdk;
pub mod services;
pub mod weak;

//! sagaflow's worker side: the SDK and the four order services.
//!
//! | module | what lives there |
//! |---|---|
//! | [`sdk`] | the handler traits (`SagaStep`, `TccStep`), `StepError`, `StepContext`, parameter helpers |
//! | [`barrier`] | strong idempotency: one row per (saga, step, operation), in the effect's transaction |
//! | [`runtime`] | the worker: consume commands, per-key lanes, barrier, reply, ack; fault injection |
//! | [`services`] | the order services: payment, coupon, points, gmv — each with its own tables |

pub mod barrier;
pub mod runtime;
pub mod sdk;
pub mod services;

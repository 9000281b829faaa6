//! sagaflow's worker side: the SDK and the four order services.
//!
//! | module | what lives there |
//! |---|---|
//! | [`sdk`] | the handler traits (`SagaStep`, `TccStep`), `StepError`, `StepContext`, parameter helpers |
//! | [`services`] | the order services: payment, coupon, points, gmv — each with its own tables |

pub mod sdk;
pub mod services;

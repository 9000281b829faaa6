//! sagaflow's engine: runs compiled sagas to a final state.
//!
//! | module | what lives there |
//! |---|---|
//! | [`machine`] | the pure saga state machine: `decide(graph, state, event, ctx) -> Decision` |

pub mod machine;

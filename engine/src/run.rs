//! The engine's loops, started together: the relay, the timers, one inbound loop each for the
//! reply and the start queue, and the dead-letter keeper. Each loop lives with its concept
//! ([`crate::relay`], [`crate::timers`], [`crate::inbound`], [`crate::dead_letters`]); this file
//! only starts them and waits for them.

use std::sync::Arc;

use tokio::sync::watch;

use crate::engine::{Engine, EngineError};
use crate::inbound::Queue;

impl Engine {
    /// Runs the loops until `shutdown` turns true.
    pub async fn run(self: Arc<Self>, shutdown: watch::Receiver<bool>) -> Result<(), EngineError> {
        let active = crate::handoff::Active::new(self.handoff_shared());
        let relay = tokio::spawn(self.clone().relay_loop(shutdown.clone(), active));
        let timers = tokio::spawn(self.clone().timer_loop(shutdown.clone()));
        let replies = tokio::spawn(self.clone().inbound_loop(Queue::Replies, shutdown.clone()));
        let starts = tokio::spawn(self.clone().inbound_loop(Queue::Starts, shutdown.clone()));
        let dead = tokio::spawn(self.clone().dead_letter_loop(shutdown.clone()));
        let (a, b, c, d, e) = tokio::join!(relay, timers, replies, starts, dead);
        for r in [a, b, c, d, e] {
            match r {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(join) => return Err(EngineError::Refused(format!("engine task died: {join}"))),
            }
        }
        Ok(())
    }
}

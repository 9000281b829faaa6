//! Operator actions on one saga: abort (compensate), retry (resume a Failed saga), skip (resolve
//! a stuck step by hand), pause and resume, and release its sequence key (a Failed saga resolved
//! outside the engine). They are events like any other and go through the same apply path; each
//! is recorded in the saga's history with its actor.

use crate::engine::{Applied, Engine, EngineError, Incoming};
use crate::machine::{Event, Resolution};

impl Engine {
    /// Operator `actor`: compensate a running saga; actor and reason go into its history.
    pub async fn abort(
        &self,
        saga_id: &str,
        actor: &str,
        reason: &str,
    ) -> Result<Applied, EngineError> {
        self.operator(
            saga_id,
            Event::Abort {
                actor: actor.to_owned(),
                reason: reason.to_owned(),
            },
        )
        .await
    }

    /// Operator `actor`: resume a failed saga (recorded in its history).
    pub async fn retry(&self, saga_id: &str, actor: &str) -> Result<Applied, EngineError> {
        self.operator(
            saga_id,
            Event::Retry {
                actor: actor.to_owned(),
            },
        )
        .await
    }

    /// Operator: a Failed saga hands its sequence key to the next saga of its order; `actor`
    /// and `reason` go into its history. It stays Failed and can no longer be retried.
    pub async fn release_key(
        &self,
        saga_id: &str,
        actor: &str,
        reason: &str,
    ) -> Result<Applied, EngineError> {
        self.operator(
            saga_id,
            Event::ReleaseKey {
                actor: actor.to_owned(),
                reason: reason.to_owned(),
            },
        )
        .await
    }

    /// Operator `actor`: resolve a Failed saga's stuck step `step` (its id) by hand, then go
    /// on with the saga; `reason` goes into its history.
    pub async fn skip(
        &self,
        saga_id: &str,
        step: &str,
        resolution: Resolution,
        actor: &str,
        reason: &str,
    ) -> Result<Applied, EngineError> {
        self.operator(
            saga_id,
            Event::Skip {
                step: step.to_owned(),
                resolution,
                actor: actor.to_owned(),
                reason: reason.to_owned(),
            },
        )
        .await
    }

    /// Operator `actor`: dispatch nothing for this saga until [`Engine::resume`].
    pub async fn pause(
        &self,
        saga_id: &str,
        actor: &str,
        reason: &str,
    ) -> Result<Applied, EngineError> {
        self.operator(
            saga_id,
            Event::Pause {
                actor: actor.to_owned(),
                reason: reason.to_owned(),
            },
        )
        .await
    }

    /// Operator `actor`: end a pause; what it held back is dispatched.
    pub async fn resume(&self, saga_id: &str, actor: &str) -> Result<Applied, EngineError> {
        self.operator(
            saga_id,
            Event::Resume {
                actor: actor.to_owned(),
            },
        )
        .await
    }

    async fn operator(&self, saga_id: &str, event: Event) -> Result<Applied, EngineError> {
        let r = self
            .apply(&[Incoming {
                saga_id: saga_id.to_owned(),
                event,
                timer_id: None,
            }])
            .await?;
        match r.first() {
            Some(Applied::UnknownSaga) | None => Err(EngineError::UnknownSaga(saga_id.to_owned())),
            Some(other) => Ok(other.clone()),
        }
    }
}

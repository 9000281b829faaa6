//! The definitions registry: compiled saga graphs by content hash, and the latest hash by name.
//!
//! A definition is stored (by content hash) the first time it is registered, and a running saga
//! stays pinned to the hash it started with; each engine caches the compiled graphs it has
//! seen, and compiles a stored source again on a cache miss.

use std::sync::Arc;

use sagaflow_dsl::{SagaGraph, compile};

use crate::engine::{Engine, EngineError, read, write};
use crate::store::{DefinitionTable, StoreTx, now_ms};

impl Engine {
    /// Compiles and stores a definition; returns its graph. Running sagas of older versions
    /// keep the definition (content hash) they started with.
    pub async fn register(&self, source: &str) -> Result<Arc<SagaGraph>, EngineError> {
        let compiled = compile(source);
        let Some(graph) = compiled.graph else {
            let detail = compiled
                .errors()
                .map(|d| format!("line {}: {}", d.span.line, d.message))
                .collect::<Vec<_>>()
                .join("; ");
            return Err(EngineError::Refused(format!(
                "invalid saga definition: {detail}"
            )));
        };
        let graph = Arc::new(graph);
        let mut tx = self.store().begin().await?;
        tx.put_definition(
            graph.content_hash(),
            graph.name(),
            graph.def().version,
            source,
            now_ms(),
        )
        .await?;
        tx.commit().await?;
        let hash = graph.content_hash().to_owned();
        write(&self.graphs).insert(hash.clone(), graph.clone());
        write(&self.names).insert(graph.name().to_owned(), hash);
        Ok(graph)
    }

    pub(crate) fn cached_graph(&self, hash: &str) -> Option<Arc<SagaGraph>> {
        read(&self.graphs).get(hash).cloned()
    }

    /// Compiles a stored definition (a cache miss) and caches it.
    pub(crate) async fn load_graph(
        &self,
        tx: &mut impl StoreTx,
        hash: &str,
    ) -> Result<Arc<SagaGraph>, EngineError> {
        let Some(source) = tx.definition_source(hash).await? else {
            return Err(EngineError::UnknownDefinition(hash.to_owned()));
        };
        let graph = compile(&source)
            .graph
            .ok_or_else(|| EngineError::BrokenDefinition {
                hash: hash.to_owned(),
                detail: "it no longer validates with this version of sagaflow".into(),
            })?;
        if graph.content_hash() != hash {
            return Err(EngineError::BrokenDefinition {
                hash: hash.to_owned(),
                detail: format!("it now hashes to {}", graph.content_hash()),
            });
        }
        let graph = Arc::new(graph);
        write(&self.graphs).insert(hash.to_owned(), graph.clone());
        Ok(graph)
    }

    /// The latest registered definition with this name (this process, else the database).
    pub async fn definition_by_name(&self, name: &str) -> Result<Arc<SagaGraph>, EngineError> {
        let cached = read(&self.names).get(name).cloned();
        if let Some(hash) = &cached
            && let Some(graph) = self.cached_graph(hash)
        {
            return Ok(graph);
        }
        let mut tx = self.store().begin().await?;
        let hash = match cached {
            Some(h) => h,
            None => match tx.latest_definition(name).await? {
                Some(h) => h,
                None => return Err(EngineError::UnknownDefinition(name.to_owned())),
            },
        };
        let graph = self.load_graph(&mut tx, &hash).await;
        tx.rollback().await?;
        graph
    }
}

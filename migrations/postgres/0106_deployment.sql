-- One database, one deployment (engine/src/store/deployment.rs), for a workers' database: the
-- same table as the engine's migration 0006 (the two may be one database).
CREATE TABLE IF NOT EXISTS sagaflow_deployment (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

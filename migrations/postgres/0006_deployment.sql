-- One database, one deployment (engine/src/store/deployment.rs): the queue prefix of the first
-- engine or worker that started on this database. The workers' migrations create the same
-- table (0106), since a workers' database may be a database of its own.
CREATE TABLE IF NOT EXISTS sagaflow_deployment (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- The timeline is written one row per saga per batch (see the PostgreSQL migration of the
-- same name); `saga_history` stays readable as it was, as a view over the batches.
CREATE TABLE IF NOT EXISTS saga_timeline (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    saga_id TEXT NOT NULL,
    at      BIGINT NOT NULL,
    entries TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS saga_timeline_by_saga ON saga_timeline (saga_id, id);
INSERT INTO saga_timeline (saga_id, at, entries)
    SELECT saga_id, at, json_array(json_patch(json_object('kind', kind, 'detail', detail),
        CASE WHEN step IS NULL THEN '{}' ELSE json_object('step', step) END))
    FROM saga_history ORDER BY id;
DROP TABLE saga_history;
CREATE VIEW saga_history AS
    SELECT t.saga_id AS saga_id, t.id * 65536 + e.key AS id, t.at AS at,
           json_extract(e.value, '$.kind') AS kind, json_extract(e.value, '$.step') AS step,
           json_extract(e.value, '$.detail') AS detail
    FROM saga_timeline t, json_each(t.entries) e;

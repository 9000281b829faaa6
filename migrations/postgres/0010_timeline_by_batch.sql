-- The timeline is written one row per saga per batch (`saga_timeline`, its lines as a JSON
-- array, oldest first) instead of one row per line: an order saga's 13 lines cost about 5 rows
-- and 5 index entries instead of 13 of each (docs/architecture.md, "Measured choices").
-- `saga_history` stays readable as it was, one row per line, as a view over the batches: `id`
-- orders the lines (the batch row's id, then the line's place in it).
CREATE TABLE IF NOT EXISTS saga_timeline (
    saga_id TEXT NOT NULL,
    id      BIGINT GENERATED ALWAYS AS IDENTITY,
    at      BIGINT NOT NULL,
    entries TEXT NOT NULL,
    PRIMARY KEY (saga_id, id)
);
INSERT INTO saga_timeline (saga_id, at, entries)
    SELECT saga_id, at, json_build_array(json_strip_nulls(json_build_object(
        'kind', kind, 'step', step, 'detail', detail)))::text
    FROM saga_history ORDER BY id;
DROP TABLE saga_history;
CREATE VIEW saga_history AS
    SELECT t.saga_id, t.id * 65536 + e.n AS id, t.at,
           e.line ->> 'kind' AS kind, e.line ->> 'step' AS step, e.line ->> 'detail' AS detail
    FROM saga_timeline t
    CROSS JOIN LATERAL json_array_elements(t.entries::json) WITH ORDINALITY AS e (line, n);

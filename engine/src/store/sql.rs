//! The set-based statements, one text per dialect.
//!
//! Every batch statement takes its rows as **one JSON parameter** (`$1`) and expands it in SQL
//! (`json_to_recordset` / `json_array_elements` on PostgreSQL, `json_each` on SQLite). So a
//! statement's text is the same whatever the batch size: each connection prepares it once, and
//! a batch of 200 events costs the same number of round trips as a batch of one. Rows whose
//! order matters (history, outbox) are inserted in array order.
//!
//! On PostgreSQL, id lists are matched with `= ANY(ARRAY(SELECT json_array_elements_text(..)))`
//! rather than `IN (SELECT ..)`: the planner guesses 100 rows for a set-returning function and
//! then prefers a hash join over a sequential scan of a churning table (timers, measured at 2 ms
//! a statement mid-run); an array makes it an index scan.

/// The statements of one dialect.
#[derive(Debug)]
pub struct Sql {
    /// PostgreSQL (true) or SQLite.
    pub postgres: bool,
    pub load_sagas: &'static str,
    pub insert_sagas: &'static str,
    pub update_sagas: &'static str,
    pub sagas_by_idempotency_key: &'static str,
    pub append_history: &'static str,
    pub enqueue_outbox: &'static str,
    pub claim_timers: &'static str,
    pub set_timers: &'static str,
    pub cancel_timers: &'static str,
    pub acquire_keys: &'static str,
    pub lock_keys: &'static str,
    pub queue_heads: &'static str,
    pub delete_keys: &'static str,
    pub leave_queue: &'static str,
    /// One key's holder, locked (the rare per-key paths).
    pub lock_key: &'static str,
    pub claim_outbox: &'static str,
    /// Confirmed rows leave the queue.
    pub delete_sent: &'static str,
    pub release_lease: &'static str,
    pub next_timers: &'static str,
    /// Retention ([`super::retention`]): the oldest sagas to purge (`$1` cutoff, `$2` limit).
    pub purge_candidates: &'static str,
    /// A batch of a saga set's rows (`$1` row limit, `$2` saga ids).
    pub purge_history: &'static str,
    pub purge_timers: &'static str,
    /// `$1` now, `$2` cutoff, `$3` saga ids: checked again, so a saga that moved is left.
    pub mark_purged: &'static str,
}

pub const POSTGRES: Sql = Sql {
    postgres: true,
    load_sagas: "SELECT id, name, definition_hash, sequence_key, state, version, created_at, finished_at FROM sagas \
        WHERE id = ANY(ARRAY(SELECT json_array_elements_text($1::json)))",
    insert_sagas: "INSERT INTO sagas (id, name, definition_hash, sequence_key, status, state, version, idempotency_key, created_at, updated_at, finished_at) \
        SELECT x.id, x.name, x.hash, x.k, x.status, x.state, x.version, x.idem, $2, $2, x.finished \
        FROM json_to_recordset($1::json) AS x(id text, name text, hash text, k text, status text, state text, idem text, version bigint, finished bigint)",
    update_sagas: "UPDATE sagas SET status = x.status, state = x.state, version = x.version + x.n, updated_at = $2, \
        finished_at = CASE WHEN x.finished IS NULL THEN NULL ELSE COALESCE(sagas.finished_at, x.finished) END \
        FROM json_to_recordset($1::json) AS x(id text, status text, state text, version bigint, n bigint, finished bigint) \
        WHERE sagas.id = x.id AND sagas.version = x.version \
        AND sagas.id = ANY(ARRAY(SELECT e->>'id' FROM json_array_elements($1::json) AS e))",
    sagas_by_idempotency_key: "SELECT idempotency_key, id, name, state FROM sagas \
        WHERE idempotency_key = ANY(ARRAY(SELECT json_array_elements_text($1::json)))",
    append_history: "INSERT INTO saga_history (saga_id, at, kind, step, detail) \
        SELECT e.j->>'saga', $2, e.j->>'kind', e.j->>'step', e.j->>'detail' \
        FROM json_array_elements($1::json) WITH ORDINALITY AS e(j, o) ORDER BY e.o",
    enqueue_outbox: "INSERT INTO outbox (message_id, destination, routing_key, payload, created_at, lease_until) \
        SELECT e.j->>'id', e.j->>'dest', e.j->>'key', e.j->>'payload', $2, (e.j->>'lease')::bigint \
        FROM json_array_elements($1::json) WITH ORDINALITY AS e(j, o) ORDER BY e.o \
        ON CONFLICT (message_id) DO NOTHING",
    claim_timers: "DELETE FROM timers WHERE id = ANY(ARRAY(SELECT json_array_elements_text($1::json))) RETURNING id",
    set_timers: "INSERT INTO timers (id, saga_id, due_at, event) \
        SELECT x.id, x.saga, x.due, x.event FROM json_to_recordset($1::json) AS x(id text, saga text, due bigint, event text) \
        ON CONFLICT (id) DO UPDATE SET due_at = excluded.due_at, event = excluded.event",
    cancel_timers: "DELETE FROM timers WHERE id = ANY(ARRAY(SELECT json_array_elements_text($1::json)))",
    acquire_keys: "INSERT INTO sequence_keys (seq_key, holder) \
        SELECT x.k, x.s FROM json_to_recordset($1::json) AS x(k text, s text) \
        ON CONFLICT (seq_key) DO NOTHING RETURNING seq_key, holder",
    // In key order, so two engines releasing overlapping keys cannot deadlock.
    lock_keys: "SELECT seq_key, holder FROM sequence_keys \
        WHERE seq_key = ANY(ARRAY(SELECT json_array_elements_text($1::json))) ORDER BY seq_key FOR UPDATE",
    queue_heads: "SELECT DISTINCT ON (seq_key) seq_key, saga_id FROM sequence_queue \
        WHERE seq_key = ANY(ARRAY(SELECT json_array_elements_text($1::json))) ORDER BY seq_key, position",
    delete_keys: "DELETE FROM sequence_keys WHERE seq_key = ANY(ARRAY(SELECT json_array_elements_text($1::json)))",
    leave_queue: "DELETE FROM sequence_queue WHERE saga_id = ANY(ARRAY(SELECT json_array_elements_text($1::json)))",
    lock_key: "SELECT holder FROM sequence_keys WHERE seq_key = $1 FOR UPDATE",
    claim_outbox: "UPDATE outbox SET lease_until = $1 WHERE id IN (\
        SELECT id FROM outbox WHERE lease_until < $2 OR (lease_until IS NULL AND created_at < $4) \
        ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED) \
        RETURNING id, message_id, destination, routing_key, payload",
    delete_sent: "DELETE FROM outbox WHERE message_id = ANY(ARRAY(SELECT json_array_elements_text($1::json)))",
    release_lease: "UPDATE outbox SET lease_until = 0 \
        WHERE message_id = ANY(ARRAY(SELECT json_array_elements_text($1::json)))",
    next_timers: "SELECT id, saga_id, due_at, event FROM timers ORDER BY due_at LIMIT $1",
    purge_candidates: "SELECT id FROM sagas WHERE purged_at IS NULL \
        AND status IN ('completed', 'compensated') AND finished_at < $1 \
        ORDER BY finished_at, id LIMIT $2",
    purge_history: "DELETE FROM saga_history WHERE id IN (SELECT id FROM saga_history \
        WHERE saga_id = ANY(ARRAY(SELECT json_array_elements_text($2::json))) LIMIT $1)",
    purge_timers: "DELETE FROM timers WHERE id IN (SELECT id FROM timers \
        WHERE saga_id = ANY(ARRAY(SELECT json_array_elements_text($2::json))) LIMIT $1)",
    mark_purged: "UPDATE sagas SET purged_at = $1 \
        WHERE id = ANY(ARRAY(SELECT json_array_elements_text($3::json))) AND purged_at IS NULL \
        AND status IN ('completed', 'compensated') AND finished_at < $2",
};

pub const SQLITE: Sql = Sql {
    postgres: false,
    load_sagas: "SELECT id, name, definition_hash, sequence_key, state, version, created_at, finished_at FROM sagas \
        WHERE id IN (SELECT value FROM json_each($1))",
    insert_sagas: "INSERT INTO sagas (id, name, definition_hash, sequence_key, status, state, version, idempotency_key, created_at, updated_at, finished_at) \
        SELECT json_extract(value, '$.id'), json_extract(value, '$.name'), json_extract(value, '$.hash'), \
        json_extract(value, '$.k'), json_extract(value, '$.status'), json_extract(value, '$.state'), \
        json_extract(value, '$.version'), json_extract(value, '$.idem'), $2, $2, json_extract(value, '$.finished') \
        FROM json_each($1)",
    update_sagas: "UPDATE sagas SET status = x.status, state = x.state, version = x.version + x.n, updated_at = $2, \
        finished_at = CASE WHEN x.finished IS NULL THEN NULL ELSE COALESCE(sagas.finished_at, x.finished) END \
        FROM (SELECT json_extract(value, '$.id') AS id, json_extract(value, '$.status') AS status, \
        json_extract(value, '$.state') AS state, json_extract(value, '$.version') AS version, \
        json_extract(value, '$.n') AS n, json_extract(value, '$.finished') AS finished FROM json_each($1)) AS x \
        WHERE sagas.id = x.id AND sagas.version = x.version",
    sagas_by_idempotency_key: "SELECT idempotency_key, id, name, state FROM sagas \
        WHERE idempotency_key IN (SELECT value FROM json_each($1))",
    append_history: "INSERT INTO saga_history (saga_id, at, kind, step, detail) \
        SELECT json_extract(value, '$.saga'), $2, json_extract(value, '$.kind'), json_extract(value, '$.step'), \
        json_extract(value, '$.detail') FROM json_each($1) ORDER BY key",
    enqueue_outbox: "INSERT INTO outbox (message_id, destination, routing_key, payload, created_at, lease_until) \
        SELECT json_extract(value, '$.id'), json_extract(value, '$.dest'), json_extract(value, '$.key'), \
        json_extract(value, '$.payload'), $2, json_extract(value, '$.lease') FROM json_each($1) WHERE true ORDER BY key \
        ON CONFLICT (message_id) DO NOTHING",
    claim_timers: "DELETE FROM timers WHERE id IN (SELECT value FROM json_each($1)) RETURNING id",
    set_timers: "INSERT INTO timers (id, saga_id, due_at, event) \
        SELECT json_extract(value, '$.id'), json_extract(value, '$.saga'), json_extract(value, '$.due'), \
        json_extract(value, '$.event') FROM json_each($1) WHERE true \
        ON CONFLICT (id) DO UPDATE SET due_at = excluded.due_at, event = excluded.event",
    cancel_timers: "DELETE FROM timers WHERE id IN (SELECT value FROM json_each($1))",
    acquire_keys: "INSERT INTO sequence_keys (seq_key, holder) \
        SELECT json_extract(value, '$.k'), json_extract(value, '$.s') FROM json_each($1) WHERE true \
        ON CONFLICT (seq_key) DO NOTHING RETURNING seq_key, holder",
    // SQLite has one writer: the write transaction is the lock.
    lock_keys: "SELECT seq_key, holder FROM sequence_keys WHERE seq_key IN (SELECT value FROM json_each($1))",
    // SQLite returns the bare columns of the row that holds the MIN().
    queue_heads: "SELECT seq_key, saga_id, MIN(position) AS position FROM sequence_queue \
        WHERE seq_key IN (SELECT value FROM json_each($1)) GROUP BY seq_key",
    delete_keys: "DELETE FROM sequence_keys WHERE seq_key IN (SELECT value FROM json_each($1))",
    leave_queue: "DELETE FROM sequence_queue WHERE saga_id IN (SELECT value FROM json_each($1))",
    lock_key: "SELECT holder FROM sequence_keys WHERE seq_key = $1",
    claim_outbox: "UPDATE outbox SET lease_until = $1 WHERE id IN (\
        SELECT id FROM outbox WHERE lease_until < $2 OR (lease_until IS NULL AND created_at < $4) \
        ORDER BY id LIMIT $3) \
        RETURNING id, message_id, destination, routing_key, payload",
    delete_sent: "DELETE FROM outbox WHERE message_id IN (SELECT value FROM json_each($1))",
    release_lease: "UPDATE outbox SET lease_until = 0 WHERE message_id IN (SELECT value FROM json_each($1))",
    next_timers: "SELECT id, saga_id, due_at, event FROM timers ORDER BY due_at LIMIT $1",
    // Without statistics SQLite would rather walk `sagas_by_status` (every completed saga ever,
    // purged ones included) and sort: the partial index is named (an error if it no longer fits
    // the query, rather than a slow purge).
    purge_candidates: "SELECT id FROM sagas INDEXED BY sagas_to_purge WHERE purged_at IS NULL \
        AND status IN ('completed', 'compensated') AND finished_at < $1 \
        ORDER BY finished_at, id LIMIT $2",
    purge_history: "DELETE FROM saga_history WHERE id IN (SELECT id FROM saga_history \
        WHERE saga_id IN (SELECT value FROM json_each($2)) LIMIT $1)",
    purge_timers: "DELETE FROM timers WHERE id IN (SELECT id FROM timers \
        WHERE saga_id IN (SELECT value FROM json_each($2)) LIMIT $1)",
    // `+status`: SQLite would otherwise walk `sagas_by_status` (every completed saga) rather
    // than look the ids up by primary key.
    mark_purged: "UPDATE sagas SET purged_at = $1 \
        WHERE id IN (SELECT value FROM json_each($3)) AND purged_at IS NULL \
        AND +status IN ('completed', 'compensated') AND finished_at < $2",
};

/// PostgreSQL: `insert_sagas`, `update_sagas`, `append_history` and `enqueue_outbox` as ONE
/// statement (data-modifying CTEs; every part runs in one snapshot, the two on `sagas` on
/// different rows), so a batch's writes cost one round trip instead of four. `$1`..`$4` are
/// the four row sets, `$5` is now; the statement returns how many sagas the version-checked
/// update wrote.
pub fn postgres_write_changes() -> &'static str {
    static TEXT: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        // Each part takes its rows as $1 and now as $2: renumber them.
        let part = |sql: &str, rows: u8| sql.replace("$2", "$5").replace("$1", &format!("${rows}"));
        format!(
            "WITH i AS ({}), u AS ({} RETURNING 1), h AS ({}), o AS ({}) \
             SELECT (SELECT COUNT(*) FROM u) AS updated",
            part(POSTGRES.insert_sagas, 1),
            part(POSTGRES.update_sagas, 2),
            part(POSTGRES.append_history, 3),
            part(POSTGRES.enqueue_outbox, 4),
        )
    });
    &TEXT
}

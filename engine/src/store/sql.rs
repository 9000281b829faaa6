//! The statements, one set per dialect.
//!
//! A **batch statement** takes its rows as plain placeholders, one per value: a multi-row
//! `VALUES (…), (…)` to insert or to join against (`UPDATE … FROM (VALUES …)`), an `IN (…)`
//! list to look up or delete. Its text is built for the batch's size ([`Text`]), so a batch of
//! 200 events costs the same number of statements as a batch of one, and every value reaches
//! the database as it is — no JSON to build here and to parse (and re-parse per field) there,
//! which was a third of the engine database's time on the write statement (measured: the same
//! batch of 130 saga updates and 390 history rows took 3.5 ms as one JSON parameter, 2.3 ms as
//! placeholders). A statement has at most [`MAX_PARAMS`] placeholders; a larger batch is sent
//! as a few statements of that size.
//!
//! Statements are not kept prepared (see [`super::tx::Tx`]): PostgreSQL plans each with the
//! tables' current sizes, and an `IN` list of constants on a unique column is an index
//! lookup (on a column that is not unique on its own, see [`Text::any_of`]). Two exceptions,
//! both on an engine's connections, which plan every run afresh (`force_custom_plan`): the
//! look-ups, padded to a few sizes ([`padded`]), and PostgreSQL's one write statement
//! ([`Sql::write_changes`]), whose columns travel as arrays so that its text does not depend
//! on the batch's size.

use std::fmt::Write as _;

/// Placeholders in one statement at most (SQLite allows 32,766, PostgreSQL 65,535).
pub const MAX_PARAMS: usize = 30_000;

/// The text of a statement being built, and how many placeholders it has so far.
///
/// Placeholders are numbered in text order and each is used once, so values are bound in the
/// order the text names them: `$1, $2, …` on PostgreSQL, plain `?` on SQLite. (sqlx binds a
/// SQLite statement's named placeholders by looking each name up, which walks the statement's
/// list of names: quadratic in the placeholders, a quarter of the embedded mode's database
/// thread on a batch of a few thousand values.)
#[derive(Debug, Default)]
pub struct Text {
    pub sql: String,
    params: usize,
    postgres: bool,
}

impl Text {
    pub fn new(postgres: bool, head: &str) -> Text {
        let mut sql = String::with_capacity(head.len() + 512);
        sql.push_str(head);
        Text {
            sql,
            params: 0,
            postgres,
        }
    }

    pub fn push(&mut self, s: &str) -> &mut Text {
        self.sql.push_str(s);
        self
    }

    /// One fresh placeholder, written here.
    pub fn param(&mut self) -> &mut Text {
        self.params += 1;
        if self.postgres {
            let _ = write!(self.sql, "${}", self.params);
        } else {
            self.sql.push('?');
        }
        self
    }

    /// `rows` copies of `group`, comma-separated, each `?` in it a fresh placeholder.
    pub fn rows(&mut self, rows: usize, group: &str) -> &mut Text {
        for r in 0..rows {
            if r > 0 {
                self.sql.push(',');
            }
            for c in group.chars() {
                if c == '?' {
                    self.param();
                } else {
                    self.sql.push(c);
                }
            }
        }
        self
    }

    /// `n` fresh placeholders, comma-separated (an `IN` list).
    pub fn list(&mut self, n: usize) -> &mut Text {
        self.rows(n, "?")
    }

    /// `column` is one of `n` values, for a column that is not unique on its own. An `IN`
    /// list of constants is estimated element by element, and on a table without statistics
    /// (a fresh deployment, a server without autovacuum) PostgreSQL takes each element to
    /// match 0.5 % of the rows: a batch's list then looks unselective enough for a
    /// sequential scan (measured: 2.6 ms a barrier lookup at 100,000 rows). An array built
    /// by a subquery has a length the planner does not see, so it stays an index scan.
    /// SQLite always uses the index for `IN`.
    pub fn any_of(&mut self, column: &str, n: usize) -> &mut Text {
        self.push(column);
        if self.postgres {
            self.push(" = ANY(ARRAY(SELECT v FROM (VALUES ")
                .rows(n, "(?)")
                .push(") AS l(v)))")
        } else {
            self.push(" IN (").list(n).push(")")
        }
    }

    pub fn params(&self) -> usize {
        self.params
    }
}

/// `IN` lists up to this long are padded (see [`padded`]) and their statements kept prepared.
pub const PADDED_MAX: usize = 1024;

/// The length an `IN` list of `n` values is written with: the next power of two (the last
/// value repeated, which changes no result), up to [`PADDED_MAX`]. So a look-up has one text per
/// power of two, few enough to keep prepared: one round trip a run instead of two (sqlx
/// describes an unprepared statement first). PostgreSQL may then run a look-up with the
/// generic plan it made on the first runs, and for these shapes (an `IN` list on a unique
/// column, the queue heads' array) that plan is an index scan even when the table was empty
/// (`tests/plans.rs` fills the tables after the first runs and counts sequential scans); the
/// batch writes, whose text varies with every part's size, stay unprepared and planned at each
/// run, but for PostgreSQL's one write statement, whose text does not ([`Sql::write_changes`]).
pub fn padded(n: usize) -> usize {
    if n <= PADDED_MAX {
        n.next_power_of_two()
    } else {
        n
    }
}

/// How many rows of `cols` values fit in one statement.
pub fn rows_per_statement(cols: usize) -> usize {
    (MAX_PARAMS / cols.max(1)).max(1)
}

/// The statements of one dialect.
#[derive(Debug)]
pub struct Sql {
    /// PostgreSQL (true) or SQLite.
    pub postgres: bool,
    /// One key's holder, locked (the rare per-key paths).
    pub lock_key: &'static str,
    pub claim_outbox: &'static str,
    pub next_timers: &'static str,
    /// The due timers (`due_at <= $1`, at most `$2`, earliest first), then the earliest timer
    /// that is not due yet, if any: the timer loop's one look (it fires the first and sleeps
    /// until the second).
    pub due_timers: &'static str,
    /// Retention ([`super::retention`]): the oldest sagas to purge (`$1` cutoff, `$2` limit).
    pub purge_candidates: &'static str,
    /// A batch of a saga set's rows (`$1` row limit, `$2` saga ids as a JSON array); the
    /// timeline's returns each deleted row's number of lines (`n`).
    pub purge_history: &'static str,
    pub purge_timers: &'static str,
    /// `$1` now, `$2` cutoff, `$3` saga ids: checked again, so a saga that moved is left.
    pub mark_purged: &'static str,
}

/// The saga columns `load_sagas` reads.
const SAGA_COLUMNS: &str =
    "id, name, definition_hash, sequence_key, state, version, created_at, finished_at";

/// How many rows each part of [`Sql::write_changes`] has.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counts {
    pub cancelled: usize,
    pub new_sagas: usize,
    pub sagas: usize,
    pub history: usize,
    pub outbox: usize,
    pub timers: usize,
    pub freed_keys: usize,
    pub sent: usize,
}

impl Counts {
    /// The values the statement binds.
    pub fn params(&self) -> usize {
        self.cancelled
            + self.new_sagas * NEW_SAGA_COLS
            + usize::from(self.sagas > 0)
            + self.sagas * SAGA_WRITE_COLS
            + self.history * HISTORY_COLS
            + self.outbox * OUTBOX_COLS
            + self.timers * TIMER_COLS
            + self.freed_keys
            + self.sent
    }

    pub fn is_empty(&self) -> bool {
        self.params() == 0
    }
}

/// The parts of [`Sql::write_changes`], in the order they are written and bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WritePart {
    Cancelled,
    NewSagas,
    Sagas,
    History,
    Outbox,
    Timers,
    FreedKeys,
    Sent,
}

const WRITE_PARTS: [WritePart; 8] = [
    WritePart::Cancelled,
    WritePart::NewSagas,
    WritePart::Sagas,
    WritePart::History,
    WritePart::Outbox,
    WritePart::Timers,
    WritePart::FreedKeys,
    WritePart::Sent,
];

impl WritePart {
    fn rows(self, n: &Counts) -> usize {
        match self {
            WritePart::Cancelled => n.cancelled,
            WritePart::NewSagas => n.new_sagas,
            WritePart::Sagas => n.sagas,
            WritePart::History => n.history,
            WritePart::Outbox => n.outbox,
            WritePart::Timers => n.timers,
            WritePart::FreedKeys => n.freed_keys,
            WritePart::Sent => n.sent,
        }
    }

    /// Its name as a PostgreSQL CTE.
    fn name(self) -> &'static str {
        match self {
            WritePart::Cancelled => "c",
            WritePart::NewSagas => "i",
            WritePart::Sagas => "u",
            WritePart::History => "h",
            WritePart::Outbox => "o",
            WritePart::Timers => "t",
            WritePart::FreedKeys => "k",
            WritePart::Sent => "s",
        }
    }
}

/// Values per row [`Sql::insert_sagas`] takes.
pub const NEW_SAGA_COLS: usize = 11;
/// Values per row [`Sql::update_sagas`] takes (after the one they share).
pub const SAGA_WRITE_COLS: usize = 6;
/// Values per row [`Sql::append_history`] takes (a row: one saga's lines of a batch).
pub const HISTORY_COLS: usize = 3;
/// Values per row [`Sql::enqueue_outbox`] takes.
pub const OUTBOX_COLS: usize = 6;
/// Columns of the rows [`Sql::set_timers`] takes, in bind order.
pub const TIMER_COLS: usize = 4;

impl Sql {
    /// `(VALUES groups) AS x(cols)`: rows to join against, their columns named. SQLite cannot
    /// name a VALUES list's columns, so there it is wrapped in a SELECT that does.
    fn values_as(&self, t: &mut Text, rows: usize, group: &str, cols: &[&str]) {
        if self.postgres {
            t.push("(VALUES ").rows(rows, group).push(") AS x(");
            t.push(&cols.join(", ")).push(")");
        } else {
            t.push("(SELECT ");
            for (i, c) in cols.iter().enumerate() {
                if i > 0 {
                    t.push(", ");
                }
                t.push(&format!("column{} AS {c}", i + 1));
            }
            t.push(" FROM (VALUES ").rows(rows, group).push(")) AS x");
        }
    }

    /// The sagas of `n` ids (binds: the ids).
    pub fn load_sagas(&self, n: usize) -> Text {
        let mut t = Text::new(
            self.postgres,
            &format!("SELECT {SAGA_COLUMNS} FROM sagas WHERE id IN ("),
        );
        t.list(n).push(")");
        t
    }

    /// Binds per saga: id, name, definition hash, sequence key, status, state, version,
    /// idempotency key, created at, updated at (now, twice), finished (now or NULL).
    pub fn insert_sagas(&self, rows: usize) -> Text {
        let mut t = Text::new(self.postgres, "");
        self.insert_sagas_into(&mut t, rows);
        t
    }

    fn insert_sagas_into(&self, t: &mut Text, rows: usize) {
        t.push(
            "INSERT INTO sagas (id, name, definition_hash, sequence_key, status, state, version, \
             idempotency_key, created_at, updated_at, finished_at) VALUES ",
        );
        t.rows(rows, "(?,?,?,?,?,?,?,?,?,?,?)");
    }

    /// The version-checked update. Binds: now, then per saga id, status, state, expected
    /// version, changes, finished (now or NULL). A state that is no longer final clears
    /// `finished_at`; one that is final keeps the first time it became so.
    pub fn update_sagas(&self, rows: usize) -> Text {
        let mut t = Text::new(self.postgres, "");
        self.update_sagas_into(&mut t, rows);
        t
    }

    fn update_sagas_into(&self, t: &mut Text, rows: usize) {
        t.push(
            "UPDATE sagas SET status = x.status, state = x.state, version = x.version + x.n, \
             updated_at = ",
        );
        t.param();
        t.push(
            ", finished_at = CASE WHEN x.finished IS NULL THEN NULL \
             ELSE COALESCE(sagas.finished_at, x.finished) END FROM ",
        );
        self.values_as(
            t,
            rows,
            "(?,?,?,?,?,?)",
            &["id", "status", "state", "version", "n", "finished"],
        );
        t.push(" WHERE sagas.id = x.id AND sagas.version = x.version");
    }

    /// Binds: the idempotency keys.
    pub fn sagas_by_idempotency_key(&self, n: usize) -> Text {
        let mut t = Text::new(
            self.postgres,
            "SELECT idempotency_key, id, name, state FROM sagas WHERE idempotency_key IN (",
        );
        t.list(n).push(")");
        t
    }

    /// One row per saga: its lines of this batch, as a JSON array, oldest first (read one
    /// line a row through the `saga_history` view). Binds per row: saga id, now, lines.
    pub fn append_history(&self, rows: usize) -> Text {
        let mut t = Text::new(self.postgres, "");
        self.append_history_into(&mut t, rows);
        t
    }

    fn append_history_into(&self, t: &mut Text, rows: usize) {
        t.push("INSERT INTO saga_timeline (saga_id, at, entries) VALUES ");
        t.rows(rows, "(?,?,?)");
    }

    /// Queued in row order; a message id already queued keeps its first row. Binds per row:
    /// message id, destination, routing key, payload, now, lease (NULL: handed off).
    pub fn enqueue_outbox(&self, rows: usize) -> Text {
        let mut t = Text::new(self.postgres, "");
        self.enqueue_outbox_into(&mut t, rows);
        t
    }

    fn enqueue_outbox_into(&self, t: &mut Text, rows: usize) {
        t.push(
            "INSERT INTO outbox (message_id, destination, routing_key, payload, created_at, \
             lease_until) VALUES ",
        );
        t.rows(rows, "(?,?,?,?,?,?)");
        t.push(" ON CONFLICT (message_id) DO NOTHING");
    }

    /// Every write of a batch in one go. A part without rows is left out. Binds: each part's,
    /// in the order of [`Counts`]' fields ([`WRITE_PARTS`]).
    ///
    /// **PostgreSQL: ONE statement** ([`Sql::write_changes_in_arrays`]: data-modifying CTEs,
    /// each part's rows as arrays; every part runs in one snapshot, the
    /// two on `sagas` on different rows, the two on `timers` on different ids), so they cost
    /// one round trip instead of seven. It returns how many timers it cancelled (`cancelled`)
    /// and how many sagas the version-checked update wrote (`updated`), asked for in that
    /// order: PostgreSQL runs a data-modifying CTE when the query first reads it (the others
    /// after the query, in the order they are written), so the timers are locked before the
    /// sagas, as every batch takes them (see `apply.rs`): a timer batch holds a claimed timer
    /// and then writes its saga, and a reply batch that cancelled that timer after writing the
    /// saga would deadlock with it.
    ///
    /// **SQLite: one call of several statements**, the parts in the same order (sqlx runs the
    /// statements of one text in one command on its connection thread, plain `?` placeholders
    /// numbered on across them), so they cost one hand-off to that thread instead of up to
    /// seven. SQLite has one writer, so no lock order matters. The version-checked update is
    /// followed at once by `SELECT changes() AS updated` (`SELECT 0 AS updated` in its place
    /// without one): the call's one row. Read it with `fetch_all`, which runs every statement;
    /// a `fetch_one` may stop at the first row.
    pub fn write_changes(&self, n: &Counts) -> Text {
        if self.postgres {
            return self.write_changes_in_arrays(n);
        }
        let mut t = Text::new(false, "");
        let mut first = true;
        for part in WRITE_PARTS {
            let rows = part.rows(n);
            if part == WritePart::Sagas && rows == 0 {
                if !first {
                    t.push("; ");
                }
                first = false;
                t.push("SELECT 0 AS updated");
            }
            if rows == 0 {
                continue;
            }
            if !first {
                t.push("; ");
            }
            first = false;
            self.write_part_into(&mut t, part, rows);
            if part == WritePart::Sagas {
                t.push("; SELECT changes() AS updated");
            }
        }
        t
    }

    /// [`Sql::write_changes`] on PostgreSQL: the same parts, in the same order and read in the
    /// same order, but each column's values travel as one array parameter, written as an array
    /// literal (`{"a","b"}`, see [`text_array`]; the `Any` driver binds no arrays) and unnested
    /// in the statement. So the text depends only on which parts the batch has, not on how many
    /// rows each has: it is kept prepared (one round trip instead of two, no parse at each run:
    /// sqlx parses and describes an unprepared statement first), and the engine's connections
    /// plan it for each run's values (`plan_cache_mode = force_custom_plan`). Rows that get ids
    /// in insertion order (the timeline, the outbox) are inserted in array order. Binds, per part
    /// present: cancelled — ids; new sagas — now, then id, name, definition hash, sequence key,
    /// status, state, version, idempotency key, finished; sagas — now, then id, status, state,
    /// expected version, changes, finished; history — now, then saga id, lines; outbox — now,
    /// then message id, destination, routing key, payload, lease; timers — id, saga id, due at,
    /// event; freed keys — keys; sent — message ids.
    fn write_changes_in_arrays(&self, n: &Counts) -> Text {
        let mut t = Text::new(true, "WITH ");
        let arrays = |t: &mut Text, types: &[&str]| {
            for (i, ty) in types.iter().enumerate() {
                if i > 0 {
                    t.push(", ");
                }
                t.param().push("::").push(ty).push("[]");
            }
        };
        let mut first = true;
        for part in WRITE_PARTS {
            if part.rows(n) == 0 {
                continue;
            }
            if !first {
                t.push(", ");
            }
            first = false;
            t.push(part.name()).push(" AS (");
            match part {
                WritePart::Cancelled => {
                    t.push("DELETE FROM timers WHERE id = ANY(");
                    arrays(&mut t, &["text"]);
                    t.push(") RETURNING 1");
                }
                WritePart::NewSagas => {
                    t.push(
                        "INSERT INTO sagas (id, name, definition_hash, sequence_key, status, \
                         state, version, idempotency_key, created_at, updated_at, finished_at) \
                         SELECT x.id, x.name, x.definition_hash, x.sequence_key, x.status, \
                         x.state, x.version, x.idempotency_key, n.now, n.now, x.finished FROM (SELECT ",
                    );
                    t.param().push("::bigint AS now) AS n, unnest(");
                    arrays(
                        &mut t,
                        &[
                            "text", "text", "text", "text", "text", "text", "bigint", "text",
                            "bigint",
                        ],
                    );
                    t.push(
                        ") AS x(id, name, definition_hash, sequence_key, status, state, version, \
                         idempotency_key, finished)",
                    );
                }
                WritePart::Sagas => {
                    t.push(
                        "UPDATE sagas SET status = x.status, state = x.state, \
                         version = x.version + x.n, updated_at = ",
                    );
                    t.param().push("::bigint");
                    t.push(
                        ", finished_at = CASE WHEN x.finished IS NULL THEN NULL \
                         ELSE COALESCE(sagas.finished_at, x.finished) END FROM unnest(",
                    );
                    arrays(
                        &mut t,
                        &["text", "text", "text", "bigint", "bigint", "bigint"],
                    );
                    t.push(
                        ") AS x(id, status, state, version, n, finished) \
                         WHERE sagas.id = x.id AND sagas.version = x.version RETURNING 1",
                    );
                }
                WritePart::History => {
                    t.push("INSERT INTO saga_timeline (saga_id, at, entries) SELECT x.saga_id, ");
                    t.param().push("::bigint, x.entries FROM unnest(");
                    arrays(&mut t, &["text", "text"]);
                    t.push(") WITH ORDINALITY AS x(saga_id, entries, i) ORDER BY x.i");
                }
                WritePart::Outbox => {
                    t.push(
                        "INSERT INTO outbox (message_id, destination, routing_key, payload, \
                         created_at, lease_until) SELECT x.message_id, x.destination, \
                         x.routing_key, x.payload, ",
                    );
                    t.param().push("::bigint, x.lease FROM unnest(");
                    arrays(&mut t, &["text", "text", "text", "text", "bigint"]);
                    t.push(
                        ") WITH ORDINALITY AS x(message_id, destination, routing_key, payload, \
                         lease, i) ORDER BY x.i ON CONFLICT (message_id) DO NOTHING",
                    );
                }
                WritePart::Timers => {
                    t.push(
                        "INSERT INTO timers (id, saga_id, due_at, event) \
                         SELECT x.id, x.saga_id, x.due_at, x.event FROM unnest(",
                    );
                    arrays(&mut t, &["text", "text", "bigint", "text"]);
                    t.push(
                        ") AS x(id, saga_id, due_at, event) ON CONFLICT (id) DO UPDATE \
                         SET due_at = excluded.due_at, event = excluded.event",
                    );
                }
                WritePart::FreedKeys => {
                    t.push("DELETE FROM sequence_keys WHERE seq_key = ANY(");
                    arrays(&mut t, &["text"]);
                    t.push(")");
                }
                WritePart::Sent => {
                    t.push("DELETE FROM outbox WHERE message_id = ANY(");
                    arrays(&mut t, &["text"]);
                    t.push(")");
                }
            }
            t.push(")");
        }
        t.push(if n.cancelled > 0 {
            " SELECT (SELECT COUNT(*) FROM c) AS cancelled"
        } else {
            " SELECT 0 AS cancelled"
        });
        t.push(if n.sagas > 0 {
            ", (SELECT COUNT(*) FROM u) AS updated"
        } else {
            ", 0 AS updated"
        });
        t
    }

    /// One part of [`Sql::write_changes`], as a plain statement.
    fn write_part_into(&self, t: &mut Text, part: WritePart, rows: usize) {
        match part {
            WritePart::Cancelled => {
                t.push("DELETE FROM timers WHERE id IN (")
                    .list(rows)
                    .push(")");
            }
            WritePart::NewSagas => self.insert_sagas_into(t, rows),
            WritePart::Sagas => self.update_sagas_into(t, rows),
            WritePart::History => self.append_history_into(t, rows),
            WritePart::Outbox => self.enqueue_outbox_into(t, rows),
            WritePart::Timers => self.set_timers_into(t, rows),
            WritePart::FreedKeys => {
                t.push("DELETE FROM sequence_keys WHERE seq_key IN (")
                    .list(rows)
                    .push(")");
            }
            WritePart::Sent => self.delete_sent_into(t, rows),
        }
    }

    /// Claims timers by deleting them. Binds: the ids.
    pub fn claim_timers(&self, n: usize) -> Text {
        let mut t = Text::new(self.postgres, "DELETE FROM timers WHERE id IN (");
        t.list(n).push(") RETURNING id");
        t
    }

    /// Binds per row: id, saga id, due at, event.
    pub fn set_timers(&self, rows: usize) -> Text {
        let mut t = Text::new(self.postgres, "");
        self.set_timers_into(&mut t, rows);
        t
    }

    fn set_timers_into(&self, t: &mut Text, rows: usize) {
        t.push("INSERT INTO timers (id, saga_id, due_at, event) VALUES ");
        t.rows(rows, "(?,?,?,?)");
        t.push(" ON CONFLICT (id) DO UPDATE SET due_at = excluded.due_at, event = excluded.event");
    }

    /// Binds: the ids.
    pub fn cancel_timers(&self, n: usize) -> Text {
        let mut t = Text::new(self.postgres, "");
        self.write_part_into(&mut t, WritePart::Cancelled, n);
        t
    }

    /// Takes the free keys. Binds per row: key, saga.
    pub fn acquire_keys(&self, rows: usize) -> Text {
        let mut t = Text::new(
            self.postgres,
            "INSERT INTO sequence_keys (seq_key, holder) VALUES ",
        );
        t.rows(rows, "(?,?)");
        t.push(" ON CONFLICT (seq_key) DO NOTHING RETURNING seq_key, holder");
        t
    }

    /// The keys' holders, locked, in key order (so two engines releasing overlapping keys
    /// cannot deadlock; SQLite has one writer: the write transaction is the lock). Binds: keys.
    pub fn lock_keys(&self, n: usize) -> Text {
        let mut t = Text::new(
            self.postgres,
            "SELECT seq_key, holder FROM sequence_keys WHERE seq_key IN (",
        );
        t.list(n);
        t.push(if self.postgres {
            ") ORDER BY seq_key FOR UPDATE"
        } else {
            ")"
        });
        t
    }

    /// The first waiter of each key. Binds: the keys.
    pub fn queue_heads(&self, n: usize) -> Text {
        let mut t = Text::new(
            self.postgres,
            if self.postgres {
                "SELECT DISTINCT ON (seq_key) seq_key, saga_id FROM sequence_queue WHERE "
            } else {
                // SQLite returns the bare columns of the row that holds the MIN().
                "SELECT seq_key, saga_id, MIN(position) AS position FROM sequence_queue WHERE "
            },
        );
        t.any_of("seq_key", n);
        t.push(if self.postgres {
            " ORDER BY seq_key, position"
        } else {
            " GROUP BY seq_key"
        });
        t
    }

    /// Binds: the keys.
    pub fn delete_keys(&self, n: usize) -> Text {
        let mut t = Text::new(self.postgres, "");
        self.write_part_into(&mut t, WritePart::FreedKeys, n);
        t
    }

    /// Binds: the sagas.
    pub fn leave_queue(&self, n: usize) -> Text {
        let mut t = Text::new(
            self.postgres,
            "DELETE FROM sequence_queue WHERE saga_id IN (",
        );
        t.list(n).push(")");
        t
    }

    /// Confirmed rows leave the queue. Binds: message ids.
    pub fn delete_sent(&self, n: usize) -> Text {
        let mut t = Text::new(self.postgres, "");
        self.delete_sent_into(&mut t, n);
        t
    }

    fn delete_sent_into(&self, t: &mut Text, n: usize) {
        t.push("DELETE FROM outbox WHERE message_id IN (")
            .list(n)
            .push(")");
    }

    /// Rows given back, claimable at once. Binds: message ids.
    pub fn release_lease(&self, n: usize) -> Text {
        let mut t = Text::new(
            self.postgres,
            "UPDATE outbox SET lease_until = 0 WHERE message_id IN (",
        );
        t.list(n).push(")");
        t
    }
}

/// A PostgreSQL array literal of text values (`{"a",NULL,"b \"c\""}`: `a`, NULL, `b "c"`): every element quoted,
/// `"` and `\` escaped with a backslash, `None` as an unquoted NULL. Cast in the statement
/// (`$1::text[]`), so PostgreSQL reads it with the array type's own input, whatever the text
/// holds (commas, braces, quotes, spaces, the word NULL).
pub fn text_array<'a>(values: impl IntoIterator<Item = Option<&'a str>>) -> String {
    array_literal(values, |out, v| {
        out.reserve(v.len() + 2);
        out.push('"');
        for c in v.chars() {
            if c == '"' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
    })
}

/// A PostgreSQL array literal of integers (`{1,NULL,3}`), cast in the statement (`::bigint[]`).
pub fn int_array(values: impl IntoIterator<Item = Option<i64>>) -> String {
    array_literal(values, |out, v| {
        let _ = write!(out, "{v}");
    })
}

/// `{…}` of `values`, comma-separated, each written by `element`, `None` as an unquoted NULL.
fn array_literal<T>(
    values: impl IntoIterator<Item = Option<T>>,
    mut element: impl FnMut(&mut String, T),
) -> String {
    let mut out = String::from("{");
    for (i, v) in values.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        match v {
            None => out.push_str("NULL"),
            Some(v) => element(&mut out, v),
        }
    }
    out.push('}');
    out
}

/// [`Sql::due_timers`], one text for both dialects (a subquery each side of the `UNION ALL`:
/// SQLite takes no `ORDER BY … LIMIT` on a compound's member itself).
const DUE_TIMERS: &str = "SELECT id, saga_id, due_at, event FROM (SELECT id, saga_id, due_at, \
    event FROM timers WHERE due_at <= $1 ORDER BY due_at LIMIT $2) AS due UNION ALL \
    SELECT id, saga_id, due_at, event FROM (SELECT id, saga_id, due_at, event FROM timers \
    WHERE due_at > $1 ORDER BY due_at LIMIT 1) AS later";

pub const POSTGRES: Sql = Sql {
    postgres: true,
    lock_key: "SELECT holder FROM sequence_keys WHERE seq_key = $1 FOR UPDATE",
    claim_outbox: "UPDATE outbox SET lease_until = $1 WHERE id IN (\
        SELECT id FROM outbox WHERE lease_until < $2 OR (lease_until IS NULL AND created_at < $4) \
        ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED) \
        RETURNING id, message_id, destination, routing_key, payload",
    next_timers: "SELECT id, saga_id, due_at, event FROM timers ORDER BY due_at LIMIT $1",
    due_timers: DUE_TIMERS,
    purge_candidates: "SELECT id FROM sagas WHERE purged_at IS NULL \
        AND status IN ('completed', 'compensated') AND finished_at < $1 \
        ORDER BY finished_at, id LIMIT $2",
    // By the primary key (saga_id, id): there is no index on id alone.
    purge_history: "DELETE FROM saga_timeline WHERE (saga_id, id) IN (SELECT saga_id, id \
        FROM saga_timeline WHERE saga_id = ANY(ARRAY(SELECT json_array_elements_text($2::json))) \
        LIMIT $1) RETURNING json_array_length(entries::json) AS n",
    purge_timers: "DELETE FROM timers WHERE id IN (SELECT id FROM timers \
        WHERE saga_id = ANY(ARRAY(SELECT json_array_elements_text($2::json))) LIMIT $1)",
    mark_purged: "UPDATE sagas SET purged_at = $1 \
        WHERE id = ANY(ARRAY(SELECT json_array_elements_text($3::json))) AND purged_at IS NULL \
        AND status IN ('completed', 'compensated') AND finished_at < $2",
};

pub const SQLITE: Sql = Sql {
    postgres: false,
    lock_key: "SELECT holder FROM sequence_keys WHERE seq_key = $1",
    claim_outbox: "UPDATE outbox SET lease_until = $1 WHERE id IN (\
        SELECT id FROM outbox WHERE lease_until < $2 OR (lease_until IS NULL AND created_at < $4) \
        ORDER BY id LIMIT $3) \
        RETURNING id, message_id, destination, routing_key, payload",
    next_timers: "SELECT id, saga_id, due_at, event FROM timers ORDER BY due_at LIMIT $1",
    due_timers: DUE_TIMERS,
    // Without statistics SQLite would rather walk `sagas_by_status` (every completed saga ever,
    // purged ones included) and sort: the partial index is named (an error if it no longer fits
    // the query, rather than a slow purge).
    purge_candidates: "SELECT id FROM sagas INDEXED BY sagas_to_purge WHERE purged_at IS NULL \
        AND status IN ('completed', 'compensated') AND finished_at < $1 \
        ORDER BY finished_at, id LIMIT $2",
    purge_history: "DELETE FROM saga_timeline WHERE id IN (SELECT id FROM saga_timeline \
        WHERE saga_id IN (SELECT value FROM json_each($2)) LIMIT $1) \
        RETURNING json_array_length(entries) AS n",
    purge_timers: "DELETE FROM timers WHERE id IN (SELECT id FROM timers \
        WHERE saga_id IN (SELECT value FROM json_each($2)) LIMIT $1)",
    // `+status`: SQLite would otherwise walk `sagas_by_status` (every completed saga) rather
    // than look the ids up by primary key.
    mark_purged: "UPDATE sagas SET purged_at = $1 \
        WHERE id IN (SELECT value FROM json_each($3)) AND purged_at IS NULL \
        AND +status IN ('completed', 'compensated') AND finished_at < $2",
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_number_in_text_order_each_used_once() {
        let t = POSTGRES.append_history(2);
        assert_eq!(
            t.sql,
            "INSERT INTO saga_timeline (saga_id, at, entries) VALUES ($1,$2,$3),($4,$5,$6)"
        );
        assert_eq!(t.params(), 2 * HISTORY_COLS);
        assert_eq!(
            SQLITE.append_history(2).sql,
            "INSERT INTO saga_timeline (saga_id, at, entries) VALUES (?,?,?),(?,?,?)"
        );
        assert_eq!(POSTGRES.load_sagas(3).params(), 3);
    }

    #[test]
    fn sqlite_names_a_values_lists_columns_through_a_select() {
        let pg = POSTGRES.update_sagas(1).sql;
        let lite = SQLITE.update_sagas(1).sql;
        assert!(
            pg.contains(
                "(VALUES ($2,$3,$4,$5,$6,$7)) AS x(id, status, state, version, n, finished)"
            ),
            "{pg}"
        );
        assert!(
            lite.contains("(SELECT column1 AS id, column2 AS status, column3 AS state, column4 AS version, column5 AS n, column6 AS finished FROM (VALUES (?,?,?,?,?,?))) AS x"),
            "{lite}"
        );
    }

    #[test]
    fn write_changes_leaves_out_empty_parts_and_counts_params_across_them() {
        let n = Counts {
            sagas: 1,
            history: 2,
            ..Counts::default()
        };
        let t = POSTGRES.write_changes(&n);
        assert!(t.sql.starts_with("WITH u AS (UPDATE sagas"), "{}", t.sql);
        assert!(
            t.sql.contains("), h AS (INSERT INTO saga_timeline"),
            "{}",
            t.sql
        );
        assert!(!t.sql.contains("o AS"), "{}", t.sql);
        assert!(
            t.sql
                .ends_with("SELECT 0 AS cancelled, (SELECT COUNT(*) FROM u) AS updated")
        );
        // One array per column (and the batch's time once per part that takes it), whatever
        // the rows: the same text for any number of them, so it is kept prepared.
        assert_eq!(t.params(), (1 + SAGA_WRITE_COLS) + (1 + HISTORY_COLS - 1));
        let more = Counts {
            sagas: 40,
            history: 7,
            ..Counts::default()
        };
        assert_eq!(POSTGRES.write_changes(&more).sql, t.sql);
        assert!(
            t.sql.contains("FROM unnest($2::text[], $3::text[]"),
            "{}",
            t.sql
        );
        let n = Counts {
            cancelled: 2,
            new_sagas: 1,
            timers: 3,
            ..Counts::default()
        };
        let t = POSTGRES.write_changes(&n);
        // The timers' deletes first, and read first, so they are locked before any saga.
        assert!(
            t.sql.starts_with("WITH c AS (DELETE FROM timers"),
            "{}",
            t.sql
        );
        assert!(
            t.sql
                .ends_with("SELECT (SELECT COUNT(*) FROM c) AS cancelled, 0 AS updated")
        );
        // ids; now and nine columns; four columns.
        assert_eq!(t.params(), 1 + (1 + NEW_SAGA_COLS - 2) + TIMER_COLS);
        assert!(Counts::default().is_empty());
    }

    #[test]
    fn array_literals_quote_every_text_and_leave_null_bare() {
        assert_eq!(text_array([]), "{}");
        assert_eq!(
            text_array([
                Some("a"),
                None,
                Some("b \"c\""),
                Some("x\\y"),
                Some("NULL"),
                Some("")
            ]),
            r#"{"a",NULL,"b \"c\"","x\\y","NULL",""}"#
        );
        assert_eq!(text_array([Some("{,}")]), r#"{"{,}"}"#);
        assert_eq!(int_array([Some(1), None, Some(-3)]), "{1,NULL,-3}");
    }

    #[test]
    fn write_changes_on_sqlite_is_one_text_of_statements_in_the_parts_order() {
        let n = Counts {
            cancelled: 1,
            sagas: 1,
            history: 2,
            timers: 1,
            sent: 2,
            ..Counts::default()
        };
        let t = SQLITE.write_changes(&n);
        let heads: Vec<String> = t
            .sql
            .split("; ")
            .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .collect();
        assert_eq!(
            heads,
            [
                "DELETE FROM timers",
                "UPDATE sagas SET",
                "SELECT changes() AS",
                "INSERT INTO saga_timeline",
                "INSERT INTO timers",
                "DELETE FROM outbox",
            ],
            "{}",
            t.sql
        );
        assert!(!t.sql.contains('$'), "plain placeholders: {}", t.sql);
        assert_eq!(t.params(), n.params());
        // Without saga updates, the row the call answers says none were written.
        let n = Counts {
            outbox: 1,
            ..Counts::default()
        };
        let t = SQLITE.write_changes(&n);
        assert!(
            t.sql.starts_with("SELECT 0 AS updated; INSERT INTO outbox"),
            "{}",
            t.sql
        );
        assert_eq!(t.params(), n.params());
    }

    #[test]
    fn look_ups_are_padded_to_powers_of_two() {
        assert_eq!(
            [1, 2, 3, 5, 64, 65, 1024, 1025].map(padded),
            [1, 2, 4, 8, 64, 128, 1024, 1025]
        );
    }

    #[test]
    fn batches_split_to_stay_under_the_placeholder_limit() {
        assert_eq!(rows_per_statement(HISTORY_COLS), MAX_PARAMS / HISTORY_COLS);
        assert_eq!(rows_per_statement(0), MAX_PARAMS);
    }
}

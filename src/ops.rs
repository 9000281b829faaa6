//! `sagaflow start`, `status`, `list`, `retry` and `abort`: sagas in a database, for operators.
//!
//! These commands only read and write the database (state, history, outbox) in the engine's own
//! transactions; they deliver nothing. Commands they produce wait in the outbox until an engine
//! running on the same database (`sagaflow dev`, or a deployed engine) relays them — the output
//! says so, so that nobody waits for a compensation no process is delivering.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::ValueEnum;
use sagaflow_dsl::render;
use sagaflow_engine::machine::{SagaStatus, StepStatus};
use sagaflow_engine::status::{self, ListQuery, SagaDetail, StepDetail};
use sagaflow_engine::store::{ENGINE_MIGRATIONS, Store};
use sagaflow_engine::transport::memory::MemoryTransport;
use sagaflow_engine::{Applied, Engine, EngineError};
use sagaflow_workers::services;
use serde_json::Value;

use crate::DbArgs;

/// How a command prints what it found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// For people.
    Human,
    /// For tools: one JSON document on stdout.
    Json,
}

/// Where the commands this process writes get delivered: said after every write.
const DELIVERY: &str = "an engine running on this database delivers them (`sagaflow dev --orders 0`, or a deployed engine)";

#[derive(Debug, clap::Args)]
pub struct StartArgs {
    /// A saga YAML file (registered on the way), or the name of a definition already in the
    /// database (its latest version).
    #[arg(value_name = "SAGA")]
    saga: String,
    /// The saga's input as JSON, or `@FILE` to read it from a file.
    #[arg(long, default_value = "{}", value_name = "JSON")]
    input: String,
    /// Start at most one saga per key: starting again with the same key returns the first id.
    #[arg(long, value_name = "KEY")]
    idempotency_key: Option<String>,
    /// `human` prints the id; `json` prints `{"id": …, "existing": …}`.
    #[arg(long, value_enum, default_value_t = Format::Human)]
    format: Format,
    #[command(flatten)]
    db: DbArgs,
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The saga's id.
    #[arg(value_name = "ID")]
    id: String,
    #[arg(long, value_enum, default_value_t = Format::Human)]
    format: Format,
    #[command(flatten)]
    db: DbArgs,
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// Only sagas in this state: queued, running, compensating, completed, compensated, failed.
    #[arg(long, value_name = "STATE")]
    state: Option<String>,
    /// Only sagas with this sequence key (e.g. an order id).
    #[arg(long, value_name = "KEY")]
    key: Option<String>,
    /// At most this many sagas.
    #[arg(long, default_value_t = 50, value_name = "N")]
    limit: u32,
    /// Continue after a previous page (the cursor it printed).
    #[arg(long, value_name = "CURSOR")]
    after: Option<String>,
    #[arg(long, value_enum, default_value_t = Format::Human)]
    format: Format,
    #[command(flatten)]
    db: DbArgs,
}

#[derive(Debug, clap::Args)]
pub struct RetryArgs {
    /// The id of a Failed saga.
    #[arg(value_name = "ID")]
    id: String,
    #[command(flatten)]
    db: DbArgs,
}

#[derive(Debug, clap::Args)]
pub struct AbortArgs {
    /// The id of a Running or Queued saga.
    #[arg(value_name = "ID")]
    id: String,
    /// Why: recorded in the saga's state and timeline.
    #[arg(long, default_value = "no reason given", value_name = "TEXT")]
    reason: String,
    #[command(flatten)]
    db: DbArgs,
}

#[derive(Debug, clap::Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    db: DbArgs,
}

pub async fn migrate(args: MigrateArgs) -> anyhow::Result<ExitCode> {
    let url = args.db.url();
    let store = Store::connect(&url, 2).await?;
    let before = applied(&store).await;
    store
        .migrate(&[ENGINE_MIGRATIONS, services::MIGRATIONS])
        .await?;
    let after = applied(&store).await;
    let new: Vec<&String> = after.iter().filter(|m| !before.contains(m)).collect();
    if new.is_empty() {
        println!("{url}: schema up to date ({} migrations)", after.len());
    } else {
        let names: Vec<&str> = new.iter().map(|s| s.as_str()).collect();
        println!("{url}: applied {}", names.join(", "));
    }
    Ok(ExitCode::SUCCESS)
}

/// The migrations recorded as applied (none on a fresh database).
async fn applied(store: &Store) -> Vec<String> {
    let Ok(mut conn) = store.pool().acquire().await else {
        return Vec::new();
    };
    sqlx::query("SELECT name FROM schema_migrations ORDER BY name")
        .fetch_all(&mut *conn)
        .await
        .map(|rows| {
            rows.iter()
                .filter_map(|r| sqlx::Row::try_get::<String, _>(r, "name").ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Opens (and if needed creates) the database, with an engine whose transport goes nowhere:
/// what these commands write is delivered by whichever engine runs on the database.
async fn open(db: &DbArgs) -> anyhow::Result<Arc<Engine>> {
    let store = Store::connect(&db.url(), 4).await?;
    store
        .migrate(&[ENGINE_MIGRATIONS, services::MIGRATIONS])
        .await?;
    Ok(Engine::new(store, Arc::new(MemoryTransport::default())))
}

pub async fn start(args: StartArgs) -> anyhow::Result<ExitCode> {
    // Check what the user typed before touching the database.
    let input = parse_input(&args.input)?;
    let engine = open(&args.db).await?;
    let path = Path::new(&args.saga);
    let graph = if path.is_file() {
        let source = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        engine.register(&source).await.map_err(|e| {
            anyhow::anyhow!(
                "{}: {e} (`sagaflow validate {}` explains)",
                path.display(),
                path.display()
            )
        })?
    } else if looks_like_path(&args.saga) {
        bail!("cannot read {}: no such file", path.display());
    } else {
        engine.definition_by_name(&args.saga).await?
    };
    let started = engine
        .start(&graph, input, args.idempotency_key.as_deref())
        .await?;
    if args.format == Format::Json {
        let doc = serde_json::json!({"id": started.id, "existing": started.existing});
        writeln!(std::io::stdout().lock(), "{doc}")?;
        return Ok(ExitCode::SUCCESS);
    }
    // The id alone on stdout, so that `id=$(sagaflow start …)` works; the story on stderr.
    writeln!(std::io::stdout().lock(), "{}", started.id)?;
    if started.existing {
        eprintln!(
            "idempotency key `{}` already started saga {}; nothing new was started",
            args.idempotency_key.unwrap_or_default(),
            started.id
        );
    } else {
        let state = match status::saga(engine.store(), &started.id).await? {
            Some(d) => d.status.name(),
            None => "started",
        };
        eprintln!(
            "saga {} ({} v{}) is {state}; its commands wait in the outbox, {DELIVERY}",
            started.id,
            graph.name(),
            graph.def().version
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `{"order_id": …}` or `@input.json`.
fn parse_input(arg: &str) -> anyhow::Result<Value> {
    match arg.strip_prefix('@') {
        Some(file) => {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("cannot read the input file {file}"))?;
            serde_json::from_str(&text).with_context(|| format!("{file} is not valid JSON"))
        }
        None => serde_json::from_str(arg).context("--input is not valid JSON"),
    }
}

/// A SAGA argument meant as a file (that does not exist) rather than a definition's name.
fn looks_like_path(s: &str) -> bool {
    s.contains('/') || s.contains('\\') || s.ends_with(".yaml") || s.ends_with(".yml")
}

pub async fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let engine = open(&args.db).await?;
    let Some(detail) = status::saga(engine.store(), &args.id).await? else {
        bail!("no saga with id {}", args.id);
    };
    let text = match args.format {
        Format::Json => serde_json::to_string_pretty(&detail)? + "\n",
        Format::Human => human_status(&detail),
    };
    write!(std::io::stdout().lock(), "{text}")?;
    Ok(ExitCode::SUCCESS)
}

fn human_status(d: &SagaDetail) -> String {
    let mut out = String::new();
    let short_hash = d
        .definition_hash
        .trim_start_matches("sha256:")
        .get(..12)
        .unwrap_or(&d.definition_hash);
    let _ = writeln!(out, "id        {}", d.id);
    let _ = writeln!(out, "saga      {} v{} ({short_hash})", d.name, d.version);
    let _ = writeln!(out, "state     {}", state_line(&d.status));
    let _ = writeln!(out, "key       {}", d.sequence_key);
    if let Some(k) = &d.idempotency_key {
        let _ = writeln!(out, "idem key  {k}");
    }
    let _ = writeln!(out, "input     {}", d.input);
    let _ = writeln!(out, "created   {}", time(d.created_at));
    let _ = writeln!(out, "updated   {}", time(d.updated_at));
    if let Some(f) = d.finished_at {
        let _ = writeln!(
            out,
            "finished  {}  (after {})",
            time(f),
            elapsed(f - d.created_at)
        );
    }
    out.push('\n');
    match (&d.graph, &d.definition_problem) {
        (Some(graph), _) => {
            out += &render::text(graph, &|i| d.steps.get(i).map(annotation));
        }
        (None, problem) => {
            let _ = writeln!(
                out,
                "steps (not drawn: {})",
                problem.as_deref().unwrap_or("no definition")
            );
            let width = d.steps.iter().map(|s| s.id.len()).max().unwrap_or(0);
            for s in &d.steps {
                let _ = writeln!(out, "  {:<width$}  {}", s.id, annotation(s));
            }
        }
    }

    out += "\ntimeline";
    if d.timeline_omitted > 0 {
        let _ = write!(out, " (the {} oldest rows not shown)", d.timeline_omitted);
    }
    out.push('\n');
    let kind_w = d.timeline.iter().map(|r| r.kind.len()).max().unwrap_or(0);
    let step_w = d
        .timeline
        .iter()
        .map(|r| r.step.as_deref().map_or(1, str::len))
        .max()
        .unwrap_or(0);
    for r in &d.timeline {
        let offset = format!("+{}", elapsed(r.at - d.created_at));
        let line = format!(
            "  {}  {offset:>8}  {:<kind_w$}  {:<step_w$}  {}",
            time(r.at),
            r.kind,
            r.step.as_deref().unwrap_or("-"),
            one_line(&r.detail)
        );
        let _ = writeln!(out, "{}", line.trim_end());
    }
    out
}

/// `completed`, `compensated — step `coupon` failed: …`, `failed — …; resumes compensating`.
fn state_line(s: &SagaStatus) -> String {
    match s {
        SagaStatus::Compensating { reason } | SagaStatus::Compensated { reason } => {
            format!("{} — {}", s.name(), one_line(reason))
        }
        SagaStatus::Failed {
            reason,
            compensating,
        } => {
            let phase = match compensating {
                Some(why) => format!(
                    " (while compensating: {}; `sagaflow retry` resumes the compensation)",
                    one_line(why)
                ),
                None => " (`sagaflow retry` resumes it)".to_owned(),
            };
            format!("failed — {}{phase}", one_line(reason))
        }
        _ => s.name().to_owned(),
    }
}

/// What `render::text` prints next to a step: `● succeeded (1 attempt)`,
/// `✗ failed: [injected] … (3 attempts)`, `… try running (attempt 2)`.
fn annotation(step: &StepDetail) -> String {
    let attempts = match step.attempts {
        1 => "1 attempt".to_owned(),
        n => format!("{n} attempts"),
    };
    let mut notes: Vec<String> = Vec::new();
    let head = match &step.state {
        StepStatus::Pending => "· pending".to_owned(),
        StepStatus::Active {
            op,
            attempt,
            waiting,
        } => {
            notes.push(format!("attempt {attempt}"));
            if *waiting {
                format!("… {op} waiting to retry")
            } else {
                format!("… {op} running")
            }
        }
        StepStatus::Succeeded => "● succeeded".to_owned(),
        StepStatus::Confirmed => "● confirmed".to_owned(),
        StepStatus::Failed { error, business } => {
            let effect = if *business {
                ""
            } else {
                " (may have taken effect)"
            };
            format!("✗ failed{effect}: {}", one_line(error))
        }
        StepStatus::Skipped => "○ skipped".to_owned(),
        StepStatus::Compensated => "↺ compensated".to_owned(),
        StepStatus::Stuck { op, error, .. } => format!("✗ {op} stuck: {}", one_line(error)),
    };
    if step.attempts > 0 && !matches!(step.state, StepStatus::Active { .. }) {
        notes.push(attempts);
    }
    // The last error, unless the state already says it.
    if let Some(e) = &step.last_error
        && !matches!(
            step.state,
            StepStatus::Failed { .. } | StepStatus::Stuck { .. }
        )
    {
        notes.push(format!("last error: {}", one_line(e)));
    }
    if notes.is_empty() {
        head
    } else {
        format!("{head} ({})", notes.join("; "))
    }
}

pub async fn list(args: ListArgs) -> anyhow::Result<ExitCode> {
    if let Some(s) = &args.state
        && !SagaStatus::NAMES.contains(&s.as_str())
    {
        bail!(
            "unknown state `{s}`; the states are {}",
            SagaStatus::NAMES.join(", ")
        );
    }
    if args.limit == 0 {
        bail!("--limit must be at least 1");
    }
    let engine = open(&args.db).await?;
    let page = status::list(
        engine.store(),
        &ListQuery {
            state: args.state.clone(),
            sequence_key: args.key.clone(),
            limit: args.limit,
            after: args.after.clone(),
        },
    )
    .await?;
    let mut stdout = std::io::stdout().lock();
    if args.format == Format::Json {
        writeln!(stdout, "{}", serde_json::to_string_pretty(&page)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    if page.sagas.is_empty() {
        writeln!(stdout, "no sagas")?;
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<[String; 6]> = page
        .sagas
        .iter()
        .map(|s| {
            [
                s.id.clone(),
                s.name.clone(),
                s.state.clone(),
                s.sequence_key.clone(),
                time(s.created_at),
                s.finished_at.map_or_else(|| "-".to_owned(), time),
            ]
        })
        .collect();
    let header = ["ID", "SAGA", "STATE", "KEY", "CREATED", "FINISHED"].map(str::to_owned);
    let mut widths = [0usize; 6];
    for row in std::iter::once(&header).chain(&rows) {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in std::iter::once(&header).chain(&rows) {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        writeln!(stdout, "{}", line.join("  ").trim_end())?;
    }
    if let Some(next) = &page.next {
        writeln!(
            stdout,
            "… more sagas: add `--after {next}` for the next page"
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn retry(args: RetryArgs) -> anyhow::Result<ExitCode> {
    let engine = open(&args.db).await?;
    let applied = engine.retry(&args.id).await?;
    report(&engine, &args.id, applied, "the retried commands").await
}

pub async fn abort(args: AbortArgs) -> anyhow::Result<ExitCode> {
    let engine = open(&args.db).await?;
    let applied = engine.abort(&args.id, &args.reason).await?;
    report(&engine, &args.id, applied, "the compensations").await
}

/// What an operator action did: the saga's new state, or why the machine refused it (exit 1).
async fn report(
    engine: &Engine,
    id: &str,
    applied: Applied,
    commands: &str,
) -> anyhow::Result<ExitCode> {
    let store = engine.store();
    match applied {
        Applied::Changed => {
            let detail = status::saga(store, id)
                .await?
                .ok_or_else(|| EngineError::UnknownSaga(id.to_owned()))?;
            let state = state_line(&detail.status);
            let mut stdout = std::io::stdout().lock();
            if detail.status.is_final() {
                writeln!(stdout, "saga {id} is {state}")?;
            } else {
                writeln!(
                    stdout,
                    "saga {id} is {state}\n{commands} wait in the outbox; {DELIVERY}"
                )?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Applied::Ignored => {
            let why = status::last_history(store, id, "ignored")
                .await?
                .map_or_else(|| "the saga refused it".to_owned(), |r| r.detail);
            bail!("saga {id}: {why}")
        }
        Applied::Duplicate | Applied::UnknownSaga => {
            bail!("saga {id}: the engine did not apply the request ({applied:?})")
        }
    }
}

/// Epoch milliseconds as RFC 3339 UTC, e.g. `2025-06-01T12:00:00.123Z`.
fn time(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_millis(t).to_string()
}

/// `850ms`, `3.2s`, `4m05s`.
fn elapsed(ms: i64) -> String {
    let ms = ms.max(0);
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else {
        format!("{}m{:02}s", ms / 60_000, (ms % 60_000) / 1000)
    }
}

/// Errors from services may span lines; a table row may not.
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

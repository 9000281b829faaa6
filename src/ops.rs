//! `sagaflow start`, `status`, `list`, `retry` and `abort`: sagas in a database, for operators.
//!
//! These commands only read and write the database (state, history, outbox) in the engine's own
//! transactions; they deliver nothing. Commands they produce wait in the outbox until an engine
//! running on the same database (`sagaflow dev`, or a deployed engine) relays them — the output
//! says so, so that nobody waits for a compensation no process is delivering.
//!
//! With `--server URL` (or `SAGAFLOW_SERVER`) they talk to a running engine's HTTP API instead
//! (see [`remote`]): same arguments, same output where it makes sense, and that engine delivers.

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

/// Where a running engine's HTTP API is: with it, a command uses the API instead of a database.
#[derive(Debug, Clone, clap::Args)]
pub struct ServerArgs {
    /// Talk to a running engine's HTTP API (e.g. http://127.0.0.1:8080) instead of opening a
    /// database; --db and --database-url are then not used.
    #[arg(
        long,
        env = "SAGAFLOW_SERVER",
        hide_env_values = true,
        value_name = "URL"
    )]
    server: Option<String>,
}

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
    #[command(flatten)]
    server: ServerArgs,
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
    #[command(flatten)]
    server: ServerArgs,
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
    #[command(flatten)]
    server: ServerArgs,
}

/// Every saga matching a filter, instead of one ID (`sagaflow retry --state failed --saga
/// order-paid`), with a dry run that lists what would be touched.
#[derive(Debug, Clone, clap::Args)]
pub struct Bulk {
    /// Every saga in this state (narrowed by --saga and --key), instead of one ID.
    #[arg(long, value_name = "STATE")]
    state: Option<String>,
    /// With --state: only sagas of this definition.
    #[arg(long = "saga", value_name = "NAME", requires = "state")]
    saga_name: Option<String>,
    /// With --state: only sagas with this sequence key.
    #[arg(long, value_name = "KEY", requires = "state")]
    key: Option<String>,
    /// With --state: list the sagas the action would touch, and change nothing.
    #[arg(long, requires = "state")]
    dry_run: bool,
}

#[derive(Debug, clap::Args)]
pub struct RetryArgs {
    /// The id of a Failed saga (or --state and its filters, for every matching saga).
    #[arg(
        value_name = "ID",
        required_unless_present = "state",
        conflicts_with = "state"
    )]
    id: Option<String>,
    #[command(flatten)]
    bulk: Bulk,
    /// Who retries it, for the saga's history (default: user@host).
    #[arg(long, value_name = "NAME")]
    actor: Option<String>,
    #[command(flatten)]
    db: DbArgs,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(Debug, clap::Args)]
pub struct AbortArgs {
    /// The id of a Running or Queued saga (or --state and its filters, for every matching saga).
    #[arg(
        value_name = "ID",
        required_unless_present = "state",
        conflicts_with = "state"
    )]
    id: Option<String>,
    #[command(flatten)]
    bulk: Bulk,
    /// Why: recorded in the saga's state and timeline.
    #[arg(long, default_value = "no reason given", value_name = "TEXT")]
    reason: String,
    /// Who aborts it, for the saga's history (default: user@host).
    #[arg(long, value_name = "NAME")]
    actor: Option<String>,
    #[command(flatten)]
    db: DbArgs,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(Debug, clap::Args)]
pub struct ReleaseKeyArgs {
    /// The id of a Failed saga that was resolved outside the engine.
    #[arg(value_name = "ID")]
    id: String,
    /// How it was resolved: recorded in its timeline.
    #[arg(long, value_name = "TEXT")]
    reason: String,
    /// Who releases it, for the timeline (default: user@host).
    #[arg(long, value_name = "NAME")]
    actor: Option<String>,
    #[command(flatten)]
    db: DbArgs,
    #[command(flatten)]
    server: ServerArgs,
}

/// `user@host` of whoever runs this command: the default `--actor` of an operator action.
pub(crate) fn default_actor() -> String {
    let user = whoami::username().unwrap_or_else(|_| "unknown".to_owned());
    let host = whoami::hostname().unwrap_or_else(|_| "localhost".to_owned());
    format!("{user}@{host}")
}

#[derive(Debug, clap::Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    db: DbArgs,
}

pub async fn migrate(args: MigrateArgs) -> anyhow::Result<ExitCode> {
    let url = args.db.url();
    let shown = sagaflow_engine::redact::redact_url(&url);
    let store = Store::connect(&url, 2).await?;
    let before = applied(&store).await;
    store
        .migrate(&[ENGINE_MIGRATIONS, services::MIGRATIONS])
        .await?;
    let after = applied(&store).await;
    let new: Vec<&String> = after.iter().filter(|m| !before.contains(m)).collect();
    if new.is_empty() {
        println!("{shown}: schema up to date ({} migrations)", after.len());
    } else {
        let names: Vec<&str> = new.iter().map(|s| s.as_str()).collect();
        println!("{shown}: applied {}", names.join(", "));
    }
    Ok(ExitCode::SUCCESS)
}

/// The migrations recorded as applied (none on a fresh database).
async fn applied(store: &Store) -> Vec<String> {
    store.applied_migrations().await.unwrap_or_default()
}

/// Opens (and if needed creates) the database, with an engine whose transport goes nowhere:
/// what these commands write is delivered by whichever engine runs on the database.
async fn open(db: &DbArgs) -> anyhow::Result<Arc<Engine>> {
    engine_on(Store::connect(&db.url(), 4).await?).await
}

/// For the commands that read or act on sagas already there: a SQLite path that names no file
/// is an error, not a new empty database.
async fn open_existing(db: &DbArgs) -> anyhow::Result<Arc<Engine>> {
    engine_on(Store::connect_existing(&db.url(), 4).await?).await
}

async fn engine_on(store: Store) -> anyhow::Result<Arc<Engine>> {
    store
        .migrate(&[ENGINE_MIGRATIONS, services::MIGRATIONS])
        .await?;
    Ok(Engine::new(store, Arc::new(MemoryTransport::default())))
}

pub async fn start(args: StartArgs) -> anyhow::Result<ExitCode> {
    // Check what the user typed before touching the database.
    let input = parse_input(&args.input)?;
    if let Some(url) = &args.server.server {
        return remote::start(url, &args, input);
    }
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
    let detail = match &args.server.server {
        Some(url) => remote::Client::new(url)?.saga(&args.id)?,
        None => {
            let engine = open_existing(&args.db).await?;
            let Some(detail) = status::saga(engine.store(), &args.id).await? else {
                bail!("no saga with id {}", args.id);
            };
            detail
        }
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
    if let Some(next) = d.waiting.first() {
        let more = match d.waiting.len() {
            1 => String::new(),
            n => format!(" and {} more", n - 1),
        };
        let _ = writeln!(out, "waiting   {next}{more} (for this saga's key)");
    }
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
            // A broken stored definition, or a saga read through the HTTP API (which sends the
            // steps, not the definition to draw them with).
            match problem {
                Some(problem) => {
                    let _ = writeln!(out, "steps (not drawn: {problem})");
                }
                None => out += "steps\n",
            }
            let width = d.steps.iter().map(|s| s.id.len()).max().unwrap_or(0);
            let service_w = d
                .steps
                .iter()
                .filter_map(|s| s.service.as_deref())
                .map(str::len)
                .max();
            for s in &d.steps {
                let line = match service_w {
                    Some(w) => format!(
                        "  {:<width$}  {:<w$}  {}",
                        s.id,
                        s.service.as_deref().unwrap_or("-"),
                        annotation(s)
                    ),
                    None => format!("  {:<width$}  {}", s.id, annotation(s)),
                };
                let _ = writeln!(out, "{line}");
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
    let query = ListQuery {
        state: args.state.clone(),
        sequence_key: args.key.clone(),
        limit: args.limit,
        after: args.after.clone(),
    };
    let page = match &args.server.server {
        Some(url) => remote::Client::new(url)?.list(&query)?,
        None => {
            let engine = open_existing(&args.db).await?;
            status::list(engine.store(), &query).await?
        }
    };
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
    let actor = args.actor.clone().unwrap_or_else(default_actor);
    let Some(id) = &args.id else {
        let action = Action::Retry { actor };
        return bulk(&args.bulk, &args.db, &args.server, &action).await;
    };
    if let Some(url) = &args.server.server {
        let done = remote::Client::new(url)?.retry(id, &actor)?;
        return remote::report(&done);
    }
    let engine = open_existing(&args.db).await?;
    let applied = engine.retry(id, &actor).await?;
    report(&engine, id, applied, "the retried commands").await
}

pub async fn abort(args: AbortArgs) -> anyhow::Result<ExitCode> {
    let actor = args.actor.clone().unwrap_or_else(default_actor);
    let Some(id) = &args.id else {
        let action = Action::Abort {
            actor,
            reason: args.reason.clone(),
        };
        return bulk(&args.bulk, &args.db, &args.server, &action).await;
    };
    if let Some(url) = &args.server.server {
        let done = remote::Client::new(url)?.abort(id, &actor, &args.reason)?;
        return remote::report(&done);
    }
    let engine = open_existing(&args.db).await?;
    let applied = engine.abort(id, &actor, &args.reason).await?;
    report(&engine, id, applied, "the compensations").await
}

/// What a bulk action does to each saga.
enum Action {
    Retry { actor: String },
    Abort { actor: String, reason: String },
}

impl Action {
    fn name(&self) -> &'static str {
        match self {
            Action::Retry { .. } => "retry",
            Action::Abort { .. } => "abort",
        }
    }
}

/// Where a bulk action goes: the database, or a server's API.
enum Target {
    Local(Arc<Engine>),
    Remote(remote::Client),
}

impl Target {
    async fn page(&self, q: &ListQuery) -> anyhow::Result<status::Page> {
        Ok(match self {
            Target::Local(e) => status::list(e.store(), q).await?,
            Target::Remote(c) => c.list(q)?,
        })
    }

    /// The saga's new state, or why it was refused.
    async fn act(&self, id: &str, action: &Action) -> anyhow::Result<String> {
        match (self, action) {
            (Target::Local(e), Action::Retry { actor }) => {
                outcome_of(e, id, e.retry(id, actor).await?).await
            }
            (Target::Local(e), Action::Abort { actor, reason }) => {
                outcome_of(e, id, e.abort(id, actor, reason).await?).await
            }
            (Target::Remote(c), Action::Retry { actor }) => {
                Ok(state_line(&c.retry(id, actor)?.status))
            }
            (Target::Remote(c), Action::Abort { actor, reason }) => {
                Ok(state_line(&c.abort(id, actor, reason)?.status))
            }
        }
    }
}

/// A local action's result as one line: the new state, or an error with the machine's reason.
async fn outcome_of(engine: &Engine, id: &str, applied: Applied) -> anyhow::Result<String> {
    match applied {
        Applied::Changed => {
            let detail = status::saga(engine.store(), id)
                .await?
                .ok_or_else(|| EngineError::UnknownSaga(id.to_owned()))?;
            Ok(state_line(&detail.status))
        }
        Applied::Ignored => {
            let why = status::last_history(engine.store(), id, "ignored")
                .await?
                .map_or_else(|| "the saga refused it".to_owned(), |r| r.detail);
            bail!("{why}")
        }
        other => bail!("the engine did not apply the request ({other:?})"),
    }
}

/// Every saga matching `filter` (all pages), then `action` on each, one line per saga; exit 1
/// if any was refused. A dry run only lists them.
async fn bulk(
    filter: &Bulk,
    db: &DbArgs,
    server: &ServerArgs,
    action: &Action,
) -> anyhow::Result<ExitCode> {
    let what = action.name();
    let target = match &server.server {
        Some(url) => Target::Remote(remote::Client::new(url)?),
        None => Target::Local(open_existing(db).await?),
    };
    let mut query = ListQuery {
        state: filter.state.clone(),
        sequence_key: filter.key.clone(),
        limit: 1000,
        after: None,
    };
    let mut matching = Vec::new();
    loop {
        let page = target.page(&query).await?;
        matching.extend(
            page.sagas
                .into_iter()
                .filter(|s| filter.saga_name.as_ref().is_none_or(|n| &s.name == n)),
        );
        match page.next {
            Some(next) => query.after = Some(next),
            None => break,
        }
    }
    let mut out = std::io::stdout().lock();
    if filter.dry_run {
        writeln!(
            out,
            "{what} would touch {} sagas (dry run: nothing changed)",
            matching.len()
        )?;
        for s in &matching {
            writeln!(
                out,
                "  {}  {}  {}  {}",
                s.id, s.name, s.state, s.sequence_key
            )?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let mut refused = 0usize;
    for s in &matching {
        match target.act(&s.id, action).await {
            Ok(state) => writeln!(out, "saga {} is {state}", s.id)?,
            Err(e) => {
                refused += 1;
                writeln!(out, "saga {}: {e}", s.id)?;
            }
        }
    }
    writeln!(
        out,
        "{what}: {} of {} sagas done, {refused} refused",
        matching.len() - refused,
        matching.len()
    )?;
    Ok(if refused == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

pub async fn release_key(args: ReleaseKeyArgs) -> anyhow::Result<ExitCode> {
    if args.reason.trim().is_empty() {
        bail!("--reason must say how the saga was resolved; it goes into the saga's timeline");
    }
    let actor = args.actor.clone().unwrap_or_else(default_actor);
    if let Some(url) = &args.server.server {
        let done = remote::Client::new(url)?.release_key(&args.id, &actor, &args.reason)?;
        return remote::report(&done);
    }
    let engine = open_existing(&args.db).await?;
    let applied = engine.release_key(&args.id, &actor, &args.reason).await?;
    report(&engine, &args.id, applied, "the next saga's commands").await
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
        Applied::Duplicate | Applied::UnknownSaga | Applied::UnknownStep(_) => {
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

/// `--server URL`: the same commands through a running engine's HTTP API
/// (`sagaflow_engine::http`), with a blocking HTTP client (no TLS: `http://` only).
pub mod remote {
    use std::fmt::Write as _;
    use std::io::Write as _;
    use std::path::Path;
    use std::process::ExitCode;
    use std::time::Duration;

    use anyhow::{Context, anyhow, bail};
    use sagaflow_engine::http::{ActionResponse, StartResponse};
    use sagaflow_engine::status::{ListQuery, Page, SagaDetail};
    use serde::de::DeserializeOwned;
    use serde_json::{Value, json};

    use super::{Format, StartArgs, looks_like_path, state_line};

    /// A client of one server.
    #[derive(Debug)]
    pub struct Client {
        /// `http://host:port` (and a path prefix, if the URL had one), without a trailing `/`.
        base: String,
        /// `base` with any password replaced, for messages.
        shown: String,
        agent: ureq::Agent,
    }

    impl Client {
        /// `http://host:port`, or `host:port` (http is assumed).
        pub fn new(url: &str) -> anyhow::Result<Client> {
            let trimmed = url.trim();
            let url = sagaflow_engine::redact::redact_url(trimmed);
            let rest = if let Some(rest) = trimmed.strip_prefix("http://") {
                rest
            } else if trimmed.starts_with("https://") {
                bail!("--server {url}: https is not supported (this build has no TLS); use http://")
            } else if trimmed.contains("://") {
                bail!("--server {url}: not an http:// URL")
            } else {
                trimmed
            };
            let rest = rest.trim_end_matches('/');
            if rest.is_empty() || rest.starts_with('/') {
                bail!("--server {url}: the URL names no host");
            }
            let base = format!("http://{rest}");
            let shown = sagaflow_engine::redact::redact_url(&base);
            let agent = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_connect(Some(Duration::from_secs(10)))
                .timeout_global(Some(Duration::from_secs(60)))
                .build()
                .new_agent();
            Ok(Client { base, shown, agent })
        }

        /// The server's address as messages show it (no password).
        pub fn shown(&self) -> &str {
            &self.shown
        }

        fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
            let answer = self.agent.get(format!("{}{path}", self.base)).call();
            self.answer(&format!("{}{path}", self.shown), answer)
        }

        fn post<T: DeserializeOwned>(&self, path: &str, body: Option<&Value>) -> anyhow::Result<T> {
            let request = self.agent.post(format!("{}{path}", self.base));
            let answer = match body {
                Some(b) => request.send_json(b),
                None => request.send_empty(),
            };
            self.answer(&format!("{}{path}", self.shown), answer)
        }

        /// The answer's JSON as `T`; an error answer becomes the server's own message.
        fn answer<T: DeserializeOwned>(
            &self,
            url: &str,
            answer: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
        ) -> anyhow::Result<T> {
            let mut response = answer.map_err(|e| {
                let why = sagaflow_engine::redact::redact_in(&e.to_string(), &self.base);
                anyhow!("cannot reach the sagaflow server at {}: {why}", self.shown)
            })?;
            let status = response.status();
            let text = response
                .body_mut()
                .read_to_string()
                .map_err(|e| anyhow!("cannot read the answer of {url}: {e}"))?;
            let doc: Option<Value> = serde_json::from_str(&text).ok();
            if !status.is_success() {
                match doc
                    .as_ref()
                    .and_then(|d| d.get("error"))
                    .and_then(Value::as_str)
                {
                    Some(message) => {
                        bail!("{message} (HTTP {} from {})", status.as_u16(), self.shown)
                    }
                    None => bail!(
                        "{url} answered HTTP {} without a sagaflow error (is {} a sagaflow server?): {}",
                        status.as_u16(),
                        self.shown,
                        excerpt(&text)
                    ),
                }
            }
            let doc = doc.ok_or_else(|| {
                anyhow!(
                    "{url} answered with something that is not JSON (is {} a sagaflow server?): {}",
                    self.shown,
                    excerpt(&text)
                )
            })?;
            serde_json::from_value(doc)
                .with_context(|| format!("{url} answered JSON this sagaflow does not understand"))
        }

        /// `GET /sagas/{id}`.
        pub fn saga(&self, id: &str) -> anyhow::Result<SagaDetail> {
            self.get(&format!("/sagas/{}", encode(id)))
        }

        /// `GET /sagas?…`.
        pub fn list(&self, q: &ListQuery) -> anyhow::Result<Page> {
            let mut path = format!("/sagas?limit={}", q.limit);
            for (name, value) in [
                ("state", &q.state),
                ("key", &q.sequence_key),
                ("after", &q.after),
            ] {
                if let Some(v) = value {
                    let _ = write!(path, "&{name}={}", encode(v));
                }
            }
            self.get(&path)
        }

        /// `POST /sagas/{id}/retry`.
        pub fn retry(&self, id: &str, actor: &str) -> anyhow::Result<ActionResponse> {
            let body = json!({ "actor": actor });
            self.post(&format!("/sagas/{}/retry", encode(id)), Some(&body))
        }

        /// `POST /sagas/{id}/abort`.
        pub fn abort(&self, id: &str, actor: &str, reason: &str) -> anyhow::Result<ActionResponse> {
            let body = json!({ "reason": reason, "actor": actor });
            self.post(&format!("/sagas/{}/abort", encode(id)), Some(&body))
        }

        /// `POST /sagas/{id}/release-key`.
        pub fn release_key(
            &self,
            id: &str,
            actor: &str,
            reason: &str,
        ) -> anyhow::Result<ActionResponse> {
            let body = json!({ "actor": actor, "reason": reason });
            self.post(&format!("/sagas/{}/release-key", encode(id)), Some(&body))
        }

        /// `POST /sagas`.
        pub fn start(&self, body: &Value) -> anyhow::Result<StartResponse> {
            self.post("/sagas", Some(body))
        }
    }

    /// `sagaflow start --server URL`: a file is compiled here for its name and content hash,
    /// and the server starts its definition of that name only if it is the same one.
    pub fn start(url: &str, args: &StartArgs, input: Value) -> anyhow::Result<ExitCode> {
        let client = Client::new(url)?;
        let path = Path::new(&args.saga);
        let (name, hash) = if path.is_file() {
            let source = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let compiled = sagaflow_dsl::compile(&source);
            let Some(graph) = compiled.graph else {
                let detail = compiled
                    .errors()
                    .map(|d| format!("line {}: {}", d.span.line, d.message))
                    .collect::<Vec<_>>()
                    .join("; ");
                bail!(
                    "{}: invalid saga definition: {detail} (`sagaflow validate {}` explains)",
                    path.display(),
                    path.display()
                );
            };
            (
                graph.name().to_owned(),
                Some(graph.content_hash().to_owned()),
            )
        } else if looks_like_path(&args.saga) {
            bail!("cannot read {}: no such file", path.display());
        } else {
            (args.saga.clone(), None)
        };
        let mut body = json!({ "saga": name, "input": input });
        if let Some(k) = &args.idempotency_key {
            body["idempotency_key"] = json!(k);
        }
        if let Some(h) = hash {
            body["definition_hash"] = json!(h);
        }
        let started = client.start(&body)?;
        if args.format == Format::Json {
            let doc = json!({"id": started.id, "existing": started.existing});
            writeln!(std::io::stdout().lock(), "{doc}")?;
            return Ok(ExitCode::SUCCESS);
        }
        writeln!(std::io::stdout().lock(), "{}", started.id)?;
        if started.existing {
            eprintln!(
                "idempotency key `{}` already started saga {}; nothing new was started",
                args.idempotency_key.as_deref().unwrap_or_default(),
                started.id
            );
        } else {
            eprintln!(
                "saga {} ({} v{}) is {}; the engine at {} delivers its commands",
                started.id,
                started.saga,
                started.version,
                started.state,
                client.shown()
            );
        }
        Ok(ExitCode::SUCCESS)
    }

    /// What `retry` and `abort` print: the saga's state after the action.
    pub fn report(done: &ActionResponse) -> anyhow::Result<ExitCode> {
        writeln!(
            std::io::stdout().lock(),
            "saga {} is {}",
            done.id,
            state_line(&done.status)
        )?;
        Ok(ExitCode::SUCCESS)
    }

    /// Percent-encodes a path segment or query value (everything but RFC 3986's unreserved).
    fn encode(s: &str) -> String {
        let mut out = String::with_capacity(s.len());
        for b in s.bytes() {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                out.push(char::from(b));
            } else {
                let _ = write!(out, "%{b:02X}");
            }
        }
        out
    }

    /// The start of an unexpected answer, on one line.
    fn excerpt(text: &str) -> String {
        let line = super::one_line(text);
        match line.char_indices().nth(200) {
            Some((i, _)) => format!("{}…", &line[..i]),
            None if line.is_empty() => "(empty body)".to_owned(),
            None => line,
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn urls_and_encoding() {
            assert_eq!(encode("a b/c?d&é"), "a%20b%2Fc%3Fd%26%C3%A9");
            assert_eq!(
                Client::new("127.0.0.1:8080/")
                    .map(|c| c.base)
                    .ok()
                    .as_deref(),
                Some("http://127.0.0.1:8080")
            );
            assert!(Client::new("https://x").is_err());
            assert!(Client::new("ftp://x").is_err());
            assert!(Client::new("http://").is_err());
        }
    }
}

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
use std::time::Duration;

use anyhow::{Context, bail};
use clap::ValueEnum;
use sagaflow_engine::http::ActionResponse;
use sagaflow_engine::machine::{Paused, Resolution, SagaStatus};
use sagaflow_engine::status::{self, ListQuery, SagaDetail, StepDetail};
use sagaflow_engine::store::SagaQueries as _;
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
    pub(crate) server: Option<String>,
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
    /// `human`: state, the step graph with each step's state, the timeline; `json`: the same
    /// as one JSON document (what `GET /sagas/{id}` answers).
    #[arg(long, value_enum, default_value_t = Format::Human)]
    format: Format,
    /// Redraw whenever the saga changes, until it is final.
    #[arg(long)]
    watch: bool,
    /// With --watch: how often to look.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration, requires = "watch")]
    interval: Duration,
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

impl Bulk {
    /// No filter: for the actions that take one saga only.
    fn none() -> Bulk {
        Bulk {
            state: None,
            saga_name: None,
            key: None,
            dry_run: false,
        }
    }
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
pub struct PauseArgs {
    /// The id of a saga that has not finished (or --state and its filters, for every matching
    /// saga).
    #[arg(
        value_name = "ID",
        required_unless_present = "state",
        conflicts_with = "state"
    )]
    id: Option<String>,
    #[command(flatten)]
    bulk: Bulk,
    /// Why: recorded in the saga's timeline.
    #[arg(long, default_value = "no reason given", value_name = "TEXT")]
    reason: String,
    /// Who pauses it, for the saga's history (default: user@host).
    #[arg(long, value_name = "NAME")]
    actor: Option<String>,
    #[command(flatten)]
    db: DbArgs,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(Debug, clap::Args)]
pub struct ResumeArgs {
    /// The id of a paused saga (or --state and its filters, for every matching saga).
    #[arg(
        value_name = "ID",
        required_unless_present = "state",
        conflicts_with = "state"
    )]
    id: Option<String>,
    #[command(flatten)]
    bulk: Bulk,
    /// Who resumes it, for the saga's history (default: user@host).
    #[arg(long, value_name = "NAME")]
    actor: Option<String>,
    #[command(flatten)]
    db: DbArgs,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(Debug, clap::Args)]
pub struct SkipArgs {
    /// The id of a Failed saga.
    #[arg(value_name = "ID")]
    id: String,
    /// The id of its stuck step (as the definition names it, e.g. `coupon`).
    #[arg(value_name = "STEP")]
    step: String,
    /// Mark the step's operation done, with this output (JSON, or `@FILE`) as a forward
    /// step's output for the steps after it (default `{}`).
    #[arg(long, value_name = "JSON", conflicts_with = "compensated")]
    output: Option<String>,
    /// Mark the step as without effect (it never took one, or it was undone by hand) instead
    /// of done.
    #[arg(long)]
    compensated: bool,
    /// How it was resolved: recorded in the saga's timeline.
    #[arg(long, value_name = "TEXT")]
    reason: String,
    /// Who resolves it, for the saga's history (default: user@host).
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
pub(crate) async fn open_existing(db: &DbArgs) -> anyhow::Result<Arc<Engine>> {
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
    parse_json(arg, "--input", "input")
}

/// JSON given on the command line as `flag` (the `what`), or `@FILE` to read it from a file.
fn parse_json(arg: &str, flag: &str, what: &str) -> anyhow::Result<Value> {
    match arg.strip_prefix('@') {
        Some(file) => {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("cannot read the {what} file {file}"))?;
            serde_json::from_str(&text).with_context(|| format!("{file} is not valid JSON"))
        }
        None => serde_json::from_str(arg).with_context(|| format!("{flag} is not valid JSON")),
    }
}

/// A SAGA argument meant as a file (that does not exist) rather than a definition's name.
fn looks_like_path(s: &str) -> bool {
    s.contains('/') || s.contains('\\') || s.ends_with(".yaml") || s.ends_with(".yml")
}

pub async fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let source = match &args.server.server {
        Some(url) => Detail::Remote(remote::Client::new(url)?),
        None => Detail::Local(open_existing(&args.db).await?),
    };
    let mut shown: Option<(i64, usize)> = None;
    loop {
        let (detail, drawing) = source.get(&args.id).await?;
        let text = match args.format {
            Format::Json => serde_json::to_string_pretty(&detail)? + "\n",
            Format::Human => human_status(&detail, drawing.as_deref()),
        };
        let version = (detail.updated_at, detail.timeline.len());
        if shown != Some(version) {
            let mut stdout = std::io::stdout().lock();
            if args.watch && shown.is_some() && std::io::IsTerminal::is_terminal(&stdout) {
                // Clear the screen and redraw in place.
                write!(stdout, "\x1b[2J\x1b[H")?;
            } else if shown.is_some() {
                writeln!(stdout)?;
            }
            write!(stdout, "{text}")?;
            stdout.flush()?;
            shown = Some(version);
        }
        if !args.watch || detail.status.is_final() {
            return Ok(ExitCode::SUCCESS);
        }
        tokio::time::sleep(args.interval).await;
    }
}

/// Where `status` reads a saga: the database (drawn here) or a server (drawn there).
enum Detail {
    Local(Arc<Engine>),
    Remote(remote::Client),
}

impl Detail {
    async fn get(&self, id: &str) -> anyhow::Result<(SagaDetail, Option<String>)> {
        match self {
            Detail::Local(engine) => {
                let Some(detail) = status::saga(engine.store(), id).await? else {
                    bail!("no saga with id {id}");
                };
                let drawing = status::draw(&detail, status::DrawFormat::Text).ok();
                Ok((detail, drawing))
            }
            Detail::Remote(client) => {
                let detail = client.saga(id)?;
                // An older server has no drawing route: the steps are listed instead.
                let drawing = client.graph(id, "text").ok();
                Ok((detail, drawing))
            }
        }
    }
}

/// `sagaflow graph --saga ID`: the saga's definition with its states drawn on it.
pub async fn graph_of_saga(
    id: &str,
    format: &str,
    db: &DbArgs,
    server: &ServerArgs,
) -> anyhow::Result<ExitCode> {
    let text = match &server.server {
        Some(url) => remote::Client::new(url)?.graph(id, format)?,
        None => {
            let engine = open_existing(db).await?;
            let Some(detail) = status::saga(engine.store(), id).await? else {
                bail!("no saga with id {id}");
            };
            let f = status::DrawFormat::parse(format)
                .ok_or_else(|| anyhow::anyhow!("unknown format `{format}`"))?;
            status::draw(&detail, f)
                .map_err(|why| anyhow::anyhow!("cannot draw saga {id}: {why}"))?
        }
    };
    write!(std::io::stdout().lock(), "{text}")?;
    Ok(ExitCode::SUCCESS)
}

/// `status` for people; `drawing` is the step graph with the saga's states (the server's,
/// through `--server`), or None to list the steps.
fn human_status(d: &SagaDetail, drawing: Option<&str>) -> String {
    let mut out = String::new();
    let short_hash = d
        .definition_hash
        .trim_start_matches("sha256:")
        .get(..12)
        .unwrap_or(&d.definition_hash);
    let _ = writeln!(out, "id        {}", d.id);
    let _ = writeln!(out, "saga      {} v{} ({short_hash})", d.name, d.version);
    let _ = writeln!(
        out,
        "state     {}",
        state_line(&d.status, d.paused.as_ref())
    );
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
    let held: &[usize] = d.paused.as_ref().map_or(&[], |p| &p.held);
    let annotation = |s: &StepDetail| status::step_note(s, held.contains(&s.index));
    match (drawing, &d.definition_problem) {
        (Some(drawing), _) => out += drawing,
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

/// `completed`, `compensated — step `coupon` failed: …`, `failed — …; resumes compensating`,
/// `running, paused by ops@desk: …`.
pub(crate) fn state_line(s: &SagaStatus, paused: Option<&Paused>) -> String {
    let line = status_words(s);
    match paused {
        Some(p) => {
            let held = match p.held.len() {
                0 => String::new(),
                n => format!("; {n} step(s) held back"),
            };
            format!(
                "{line}, paused by {} since {}: {}{held} (`sagaflow resume` ends it)",
                p.actor,
                time(p.since),
                one_line(&p.reason)
            )
        }
        None => line,
    }
}

fn status_words(s: &SagaStatus) -> String {
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
        ..ListQuery::default()
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
    let action = Action::Retry {
        actor: actor(args.actor),
    };
    act(
        args.id.as_deref(),
        &args.bulk,
        &args.db,
        &args.server,
        &action,
    )
    .await
}

pub async fn abort(args: AbortArgs) -> anyhow::Result<ExitCode> {
    let action = Action::Abort {
        actor: actor(args.actor),
        reason: args.reason,
    };
    act(
        args.id.as_deref(),
        &args.bulk,
        &args.db,
        &args.server,
        &action,
    )
    .await
}

pub async fn pause(args: PauseArgs) -> anyhow::Result<ExitCode> {
    let action = Action::Pause {
        actor: actor(args.actor),
        reason: args.reason,
    };
    act(
        args.id.as_deref(),
        &args.bulk,
        &args.db,
        &args.server,
        &action,
    )
    .await
}

pub async fn resume(args: ResumeArgs) -> anyhow::Result<ExitCode> {
    let action = Action::Resume {
        actor: actor(args.actor),
    };
    act(
        args.id.as_deref(),
        &args.bulk,
        &args.db,
        &args.server,
        &action,
    )
    .await
}

pub async fn release_key(args: ReleaseKeyArgs) -> anyhow::Result<ExitCode> {
    if args.reason.trim().is_empty() {
        bail!("--reason must say how the saga was resolved; it goes into the saga's timeline");
    }
    let action = Action::ReleaseKey {
        actor: actor(args.actor),
        reason: args.reason,
    };
    act(
        Some(&args.id),
        &Bulk::none(),
        &args.db,
        &args.server,
        &action,
    )
    .await
}

pub async fn skip(args: SkipArgs) -> anyhow::Result<ExitCode> {
    if args.reason.trim().is_empty() {
        bail!("--reason must say how the step was resolved; it goes into the saga's timeline");
    }
    let resolution = match (&args.output, args.compensated) {
        (_, true) => Resolution::Compensated,
        (Some(text), false) => Resolution::Done {
            output: parse_json(text, "--output", "output")?,
        },
        (None, false) => Resolution::Done {
            output: Value::Object(serde_json::Map::new()),
        },
    };
    let action = Action::Skip {
        actor: actor(args.actor),
        step: args.step,
        resolution,
        reason: args.reason,
    };
    act(
        Some(&args.id),
        &Bulk::none(),
        &args.db,
        &args.server,
        &action,
    )
    .await
}

/// `--actor`, or `user@host`.
fn actor(given: Option<String>) -> String {
    given
        .filter(|a| !a.trim().is_empty())
        .unwrap_or_else(default_actor)
}

/// An operator action on one saga, as the CLI asks for it.
pub(crate) enum Action {
    Retry {
        actor: String,
    },
    Abort {
        actor: String,
        reason: String,
    },
    Pause {
        actor: String,
        reason: String,
    },
    Resume {
        actor: String,
    },
    ReleaseKey {
        actor: String,
        reason: String,
    },
    Skip {
        actor: String,
        step: String,
        resolution: Resolution,
        reason: String,
    },
}

impl Action {
    fn name(&self) -> &'static str {
        match self {
            Action::Retry { .. } => "retry",
            Action::Abort { .. } => "abort",
            Action::Pause { .. } => "pause",
            Action::Resume { .. } => "resume",
            Action::ReleaseKey { .. } => "release-key",
            Action::Skip { .. } => "skip",
        }
    }

    /// What the commands it writes are, for the line saying who delivers them.
    fn writes(&self) -> &'static str {
        match self {
            Action::Retry { .. } => "the retried commands",
            Action::Abort { .. } => "the compensations",
            Action::ReleaseKey { .. } => "the next saga's commands",
            Action::Pause { .. } | Action::Resume { .. } | Action::Skip { .. } => {
                "its next commands"
            }
        }
    }

    /// The HTTP API's path (after `/sagas/{id}/`) and body for it.
    pub(crate) fn http(&self) -> (&'static str, Value) {
        match self {
            Action::Retry { actor } | Action::Resume { actor } => {
                (self.name(), serde_json::json!({ "actor": actor }))
            }
            Action::Abort { actor, reason }
            | Action::Pause { actor, reason }
            | Action::ReleaseKey { actor, reason } => (
                self.name(),
                serde_json::json!({ "actor": actor, "reason": reason }),
            ),
            Action::Skip {
                actor,
                step,
                resolution,
                reason,
            } => {
                let mut body =
                    serde_json::json!({ "step": step, "actor": actor, "reason": reason });
                match resolution {
                    Resolution::Done { output } => {
                        body["as"] = "done".into();
                        body["output"] = output.clone();
                    }
                    Resolution::Compensated => body["as"] = "compensated".into(),
                }
                (self.name(), body)
            }
        }
    }

    async fn on(&self, engine: &Engine, id: &str) -> Result<Applied, EngineError> {
        match self {
            Action::Retry { actor } => engine.retry(id, actor).await,
            Action::Abort { actor, reason } => engine.abort(id, actor, reason).await,
            Action::Pause { actor, reason } => engine.pause(id, actor, reason).await,
            Action::Resume { actor } => engine.resume(id, actor).await,
            Action::ReleaseKey { actor, reason } => engine.release_key(id, actor, reason).await,
            Action::Skip {
                actor,
                step,
                resolution,
                reason,
            } => {
                engine
                    .skip(id, step, resolution.clone(), actor, reason)
                    .await
            }
        }
    }
}

/// Where a command goes: the database, or a server's API.
pub(crate) enum Target {
    Local(Arc<Engine>),
    Remote(remote::Client),
}

impl Target {
    pub(crate) async fn open(db: &DbArgs, server: &ServerArgs) -> anyhow::Result<Target> {
        Ok(match &server.server {
            Some(url) => Target::Remote(remote::Client::new(url)?),
            None => Target::Local(open_existing(db).await?),
        })
    }

    async fn page(&self, q: &ListQuery) -> anyhow::Result<status::Page> {
        Ok(match self {
            Target::Local(e) => status::list(e.store(), q).await?,
            Target::Remote(c) => c.list(q)?,
        })
    }

    /// The saga's state after the action, or why it was refused (the machine's reason).
    async fn act(&self, id: &str, action: &Action) -> anyhow::Result<ActionResponse> {
        let engine = match self {
            Target::Remote(c) => return c.act(id, action),
            Target::Local(e) => e,
        };
        match action.on(engine, id).await? {
            Applied::Changed => {
                let state = engine
                    .store()
                    .saga_state(id)
                    .await?
                    .ok_or_else(|| EngineError::UnknownSaga(id.to_owned()))?;
                Ok(ActionResponse {
                    id: id.to_owned(),
                    status: state.status,
                    paused: state.paused,
                })
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
}

/// `action` on saga `id`, or on every saga the bulk filter matches.
async fn act(
    id: Option<&str>,
    filter: &Bulk,
    db: &DbArgs,
    server: &ServerArgs,
    action: &Action,
) -> anyhow::Result<ExitCode> {
    let target = Target::open(db, server).await?;
    let Some(id) = id else {
        return bulk(filter, &target, action).await;
    };
    let done = target
        .act(id, action)
        .await
        .map_err(|e| anyhow::anyhow!("saga {id}: {e}"))?;
    let mut stdout = std::io::stdout().lock();
    let state = state_line(&done.status, done.paused.as_ref());
    writeln!(stdout, "saga {id} is {state}")?;
    if matches!(target, Target::Local(_)) && !done.status.is_final() && done.paused.is_none() {
        writeln!(stdout, "{} wait in the outbox; {DELIVERY}", action.writes())?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Every saga matching `filter` (all pages), then `action` on each, one line per saga; exit 1
/// if any was refused. A dry run only lists them.
async fn bulk(filter: &Bulk, target: &Target, action: &Action) -> anyhow::Result<ExitCode> {
    let what = action.name();
    let mut query = ListQuery {
        state: filter.state.clone(),
        sequence_key: filter.key.clone(),
        saga: filter.saga_name.clone(),
        limit: 1000,
        ..ListQuery::default()
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
            Ok(done) => writeln!(
                out,
                "saga {} is {}",
                s.id,
                state_line(&done.status, done.paused.as_ref())
            )?,
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

/// Epoch milliseconds as RFC 3339 UTC, e.g. `2025-06-01T12:00:00.123Z`.
pub(crate) fn time(ms: i64) -> String {
    sagaflow_engine::time::format(ms)
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
pub(crate) fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

pub mod remote;

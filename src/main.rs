//! The `sagaflow` command line. Thin: argument parsing here, work in the library crates.
//!
//! | module | commands |
//! |---|---|
//! | [`definitions`] | `validate`, `graph`: read saga definitions |
//! | [`dev`] | `dev`: engine + services in one process on SQLite, sample orders, invariant check |
//! | [`serve`] | `engine`, `worker`: the production processes over RabbitMQ and PostgreSQL |
//! | [`bench`] | `bench`: N orders through engine and worker processes, figures and invariants |
//! | [`ops`] | `start`, `status`, `list`, `retry`, `abort`: sagas in a database, for operators |

mod bench;
mod dead_letters;
mod definitions;
mod dev;
mod ops;
mod serve;
mod telemetry;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// mimalloc rather than glibc's malloc: the engine and workers allocate and free many small,
/// short-lived buffers per batch from several threads, and glibc's allocator was a fifth of the
/// engine's CPU on `sagaflow bench` (perf; docs/architecture.md "Measured choices").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "sagaflow",
    version,
    about = "Saga/TCC orchestration for order flows: idempotent steps, per-order sequencing, compensation until a final state"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the engine and the four order services in one process on an embedded SQLite file:
    /// finish what an earlier run left, run sample orders, check the invariants.
    Dev(dev::DevArgs),
    /// Production: run an engine (replies, timers, outbox relay, saga starts, HTTP API) over
    /// RabbitMQ and PostgreSQL. Run as many as you like.
    Engine(serve::EngineArgs),
    /// Production: run one of the four demo order services (payment, coupon, points or gmv)
    /// over RabbitMQ and PostgreSQL. Run as many of each as you like.
    ///
    /// A service of your own is not run by this command but by a program of its own on the
    /// worker SDK (the sagaflow-workers crate): examples/shipping/ is one to copy (README, "Your
    /// own service").
    Worker(serve::WorkerArgs),
    /// Drive N orders through engine and worker processes over RabbitMQ and PostgreSQL; print
    /// sagas/s, latency and the invariant check.
    Bench(bench::BenchArgs),
    /// Check saga definitions; exit 0 when every file is valid, 1 otherwise.
    Validate {
        /// Saga YAML files.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
        /// `human` for people, `json` for tools and editors.
        #[arg(long, value_enum, default_value_t = ValidateFormat::Human)]
        format: ValidateFormat,
    },
    /// Draw a saga's step graph: layers, parallel branches, compensation order — of a YAML
    /// file, or of a running saga (`--saga ID`) with each step's state drawn on it.
    Graph {
        /// A saga YAML file.
        #[arg(
            value_name = "FILE",
            required_unless_present = "saga",
            conflicts_with = "saga"
        )]
        file: Option<PathBuf>,
        /// Draw this saga's definition with the saga's states (from the database, or through
        /// --server).
        #[arg(long, value_name = "ID")]
        saga: Option<String>,
        /// How to draw it.
        #[arg(long, value_enum, default_value_t = GraphFormat::Text)]
        format: GraphFormat,
        #[command(flatten)]
        db: DbArgs,
        #[command(flatten)]
        server: ops::ServerArgs,
    },
    /// Start a saga from a YAML file or a registered definition's name; prints its id.
    Start(ops::StartArgs),
    /// Show a saga: its state, its step graph with each step's state, and its timeline.
    Status(ops::StatusArgs),
    /// List sagas, newest first.
    List(ops::ListArgs),
    /// Operator: resume a Failed saga where it stopped.
    Retry(ops::RetryArgs),
    /// Operator: compensate a Running (or Queued) saga.
    Abort(ops::AbortArgs),
    /// Operator: resolve a Failed saga's stuck step by hand (done, with an output, or without
    /// effect), then go on with the saga.
    Skip(ops::SkipArgs),
    /// Operator: dispatch nothing for a saga until it resumes (replies are still recorded).
    Pause(ops::PauseArgs),
    /// Operator: end a pause; what it held back is dispatched.
    Resume(ops::ResumeArgs),
    /// Operator: a Failed saga resolved by hand gives its order's sequence key to the next saga
    /// of that order (a Failed saga keeps it until then). It stays Failed, never to be retried.
    ReleaseKey(ops::ReleaseKeyArgs),
    /// Operator: the deployment's dead letters (messages that could never be handled): list,
    /// show, replay to their queue, purge.
    DeadLetters(dead_letters::DeadLettersArgs),
    /// Print a shell completion script: `sagaflow completions bash > /etc/bash_completion.d/sagaflow`,
    /// `sagaflow completions zsh > "${fpath[1]}/_sagaflow"`, `sagaflow completions fish >
    /// ~/.config/fish/completions/sagaflow.fish`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        #[arg(value_name = "SHELL")]
        shell: clap_complete::Shell,
    },
    /// Create or upgrade the database schema (engine, barrier and service tables); every other
    /// command also does this at start.
    Migrate(ops::MigrateArgs),
}

/// `--database-url`: an address with a scheme sagaflow supports (a plain SQLite file goes to
/// `--db FILE`), checked before anything is opened. A parser of its own rather than a function:
/// clap repeats a refused value in its message, and this one may hold a password.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DatabaseUrl;

/// The parser for every `--database-url`.
pub(crate) fn database_url() -> DatabaseUrl {
    DatabaseUrl
}

impl clap::builder::TypedValueParser for DatabaseUrl {
    type Value = String;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<String, clap::Error> {
        let s = value.to_string_lossy();
        let s = s.trim();
        if s.starts_with("postgres://")
            || s.starts_with("postgresql://")
            || s.starts_with("sqlite:")
        {
            return Ok(s.to_owned());
        }
        let flag = match arg {
            Some(a) => {
                let long = a.get_long().unwrap_or("database-url");
                match a.get_env() {
                    Some(env) => format!("--{long} (or {})", env.to_string_lossy()),
                    None => format!("--{long}"),
                }
            }
            None => "--database-url".to_owned(),
        };
        let message = format!(
            "{flag}: `{}` is not a database URL sagaflow can use: write postgres://USER@HOST:PORT/DATABASE (or postgresql://…) or sqlite://FILE; a plain SQLite file is `--db FILE`\n",
            sagaflow_engine::redact::redact_url(s)
        );
        Err(clap::Error::raw(clap::error::ErrorKind::ValueValidation, message).with_cmd(cmd))
    }
}

/// Where the sagas are: shared by every command that reads or writes them.
#[derive(Debug, Clone, clap::Args)]
struct DbArgs {
    /// The SQLite file (created if missing by the commands that write; `status`, `list` and the
    /// operator commands need an existing one).
    #[arg(long, default_value = "sagaflow.db", value_name = "FILE")]
    db: PathBuf,
    /// Use this database instead of the SQLite file (e.g. postgres://…).
    #[arg(
        long,
        env = "SAGAFLOW_DATABASE_URL",
        hide_env_values = true,
        value_name = "URL",
        value_parser = database_url()
    )]
    database_url: Option<String>,
}

impl DbArgs {
    /// The URL `--database-url` names, else the SQLite file.
    fn url(&self) -> String {
        match &self.database_url {
            Some(u) => u.clone(),
            None => self.db.display().to_string(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ValidateFormat {
    /// Diagnostics for people, with the source lines they point at.
    Human,
    /// One JSON document on stdout: per file, valid or not and each diagnostic.
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum GraphFormat {
    /// For the terminal: layers, operations, dependencies, compensation order.
    Text,
    /// Graphviz (`| dot -Tsvg > saga.svg`).
    Dot,
    /// A Mermaid flowchart, for Markdown.
    Mermaid,
    /// SVG, laid out by layer (what the web console draws).
    Svg,
}

impl GraphFormat {
    fn as_str(self) -> &'static str {
        match self {
            GraphFormat::Text => "text",
            GraphFormat::Dot => "dot",
            GraphFormat::Mermaid => "mermaid",
            GraphFormat::Svg => "svg",
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The long-running processes export traces when an OTLP endpoint is set; every command
    // logs as SAGAFLOW_LOG says. Dropping the guard flushes the last spans.
    let service = match &cli.command {
        Command::Dev(_) => Some("sagaflow-dev"),
        Command::Engine(_) => Some("sagaflow-engine"),
        Command::Worker(_) => Some("sagaflow-worker"),
        _ => None,
    };
    let mut telemetry = telemetry::init(service);
    let result = match cli.command {
        Command::Dev(args) => runtime().and_then(|rt| rt.block_on(dev::run(args))),
        Command::Engine(args) => runtime().and_then(|rt| rt.block_on(serve::engine(args))),
        Command::Worker(args) => runtime().and_then(|rt| rt.block_on(serve::worker(args))),
        Command::Bench(args) => runtime().and_then(|rt| rt.block_on(bench::run(args))),
        Command::Validate { files, format } => {
            definitions::validate(&files, format == ValidateFormat::Json)
        }
        Command::Graph {
            file,
            saga,
            format,
            db,
            server,
        } => match (file, saga) {
            (_, Some(id)) => runtime()
                .and_then(|rt| rt.block_on(ops::graph_of_saga(&id, format.as_str(), &db, &server))),
            (Some(file), None) => definitions::graph(&file, format),
            (None, None) => Err(anyhow::anyhow!("name a saga file or --saga ID")),
        },
        Command::Start(args) => runtime().and_then(|rt| rt.block_on(ops::start(args))),
        Command::Status(args) => runtime().and_then(|rt| rt.block_on(ops::status(args))),
        Command::List(args) => runtime().and_then(|rt| rt.block_on(ops::list(args))),
        Command::Retry(args) => runtime().and_then(|rt| rt.block_on(ops::retry(args))),
        Command::Abort(args) => runtime().and_then(|rt| rt.block_on(ops::abort(args))),
        Command::ReleaseKey(args) => runtime().and_then(|rt| rt.block_on(ops::release_key(args))),
        Command::DeadLetters(args) => runtime().and_then(|rt| rt.block_on(dead_letters::run(args))),
        Command::Skip(args) => runtime().and_then(|rt| rt.block_on(ops::skip(args))),
        Command::Pause(args) => runtime().and_then(|rt| rt.block_on(ops::pause(args))),
        Command::Resume(args) => runtime().and_then(|rt| rt.block_on(ops::resume(args))),
        Command::Completions { shell } => {
            use clap::CommandFactory as _;
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "sagaflow",
                &mut std::io::stdout(),
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate(args) => runtime().and_then(|rt| rt.block_on(ops::migrate(args))),
    };
    telemetry.shutdown();
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

//! The `sagaflow` command line. Thin: argument parsing here, work in the library crates.
//!
//! | module | commands |
//! |---|---|
//! | [`definitions`] | `validate`, `graph`: read saga definitions |
//! | [`dev`] | `dev`: engine + services in one process on SQLite, sample orders, invariant check |

mod definitions;
mod dev;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

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
    /// Check saga definitions; exit 0 when every file is valid, 1 otherwise.
    Validate {
        /// Saga YAML files.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
        /// `human` for people, `json` for tools and editors.
        #[arg(long, value_enum, default_value_t = ValidateFormat::Human)]
        format: ValidateFormat,
    },
    /// Draw a saga's step graph: layers, parallel branches, compensation order.
    Graph {
        /// A saga YAML file.
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// `text` for the terminal, `dot` for Graphviz, `mermaid` for Markdown.
        #[arg(long, value_enum, default_value_t = GraphFormat::Text)]
        format: GraphFormat,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ValidateFormat {
    Human,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum GraphFormat {
    Text,
    Dot,
    Mermaid,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SAGAFLOW_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Dev(args) => runtime().and_then(|rt| rt.block_on(dev::run(args))),
        Command::Validate { files, format } => {
            definitions::validate(&files, format == ValidateFormat::Json)
        }
        Command::Graph { file, format } => definitions::graph(&file, format),
    };
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

//! `sagaflow dead-letters list | show ID | replay ID… | purge ID…`: the deployment's dead
//! letters, kept in the engine's database by the running engines (see
//! `sagaflow_engine::store::dead_letters`), through the database or a server's HTTP API.

use std::io::Write as _;
use std::process::ExitCode;

use anyhow::bail;
use sagaflow_engine::http::dead_letters::{self, DeadLetterPage, Selection};
use sagaflow_engine::store::dead_letters::{DeadLetterQuery, DeadLetterRow, Replayed};
use sagaflow_engine::store::now_ms;
use serde::Deserialize;

use crate::DbArgs;
use crate::ops::{Format, ServerArgs, Target, one_line, time};

#[derive(Debug, clap::Args)]
pub struct DeadLettersArgs {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// The kept dead letters, oldest first: id, source queue, time, reason.
    List {
        /// Only those that came from this queue (`reply`, `start`, `cmd.payment`, …).
        #[arg(long, value_name = "QUEUE")]
        queue: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 50, value_name = "N")]
        limit: usize,
        /// Continue after a previous page (the id it printed last).
        #[arg(long, value_name = "ID")]
        after: Option<String>,
        #[arg(long, value_enum, default_value_t = Format::Human)]
        format: Format,
        #[command(flatten)]
        db: DbArgs,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// One dead letter: its reason, source queue, time and the message itself.
    Show {
        #[arg(value_name = "ID")]
        id: String,
        #[arg(long, value_enum, default_value_t = Format::Human)]
        format: Format,
        #[command(flatten)]
        db: DbArgs,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Put dead letters back on the queue they came from (once whatever refused them is
    /// fixed): through the outbox, which an engine on this database delivers.
    Replay {
        #[command(flatten)]
        which: Which,
        #[command(flatten)]
        db: DbArgs,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Delete dead letters for good.
    Purge {
        #[command(flatten)]
        which: Which,
        #[command(flatten)]
        db: DbArgs,
        #[command(flatten)]
        server: ServerArgs,
    },
}

/// Listed ids, or `--all` (narrowed by `--queue`).
#[derive(Debug, clap::Args)]
struct Which {
    /// The letters' ids.
    #[arg(
        value_name = "ID",
        required_unless_present = "all",
        conflicts_with = "all"
    )]
    ids: Vec<String>,
    /// Every kept letter (of --queue, if given).
    #[arg(long)]
    all: bool,
    /// With --all: only those that came from this queue.
    #[arg(long, value_name = "QUEUE", requires = "all")]
    queue: Option<String>,
}

impl Which {
    fn selection(&self) -> Selection {
        Selection {
            ids: (!self.all).then(|| self.ids.clone()),
            all: self.all,
            queue: self.queue.clone(),
        }
    }
}

/// The dead-letter side of the operator commands' target (the database, or a server's API).
impl Target {
    async fn dead_letter_page(&self, q: &DeadLetterQuery) -> anyhow::Result<DeadLetterPage> {
        Ok(match self {
            Target::Local(e) => dead_letters::page(e, q).await?,
            Target::Remote(c) => c.dead_letters(q)?,
        })
    }

    async fn show(&self, id: &str) -> anyhow::Result<DeadLetterRow> {
        match self {
            Target::Local(e) => match e.store().dead_letter(id).await? {
                Some(row) => Ok(row),
                None => bail!("no dead letter with id {id}"),
            },
            Target::Remote(c) => c.dead_letter(id),
        }
    }

    async fn replay(&self, s: &Selection) -> anyhow::Result<Vec<Replayed>> {
        match self {
            Target::Local(e) => {
                let ids = dead_letters::selected(e, s).await?;
                let mut out = Vec::with_capacity(ids.len());
                for chunk in ids.chunks(500) {
                    out.extend(e.store().replay_dead_letters(chunk, now_ms()).await?);
                }
                Ok(out)
            }
            Target::Remote(c) => {
                #[derive(Deserialize)]
                struct Answer {
                    replayed: Vec<Replayed>,
                }
                let a: Answer = c.post_json("/dead-letters/replay", &serde_json::to_value(s)?)?;
                Ok(a.replayed)
            }
        }
    }

    async fn purge(&self, s: &Selection) -> anyhow::Result<u64> {
        match self {
            Target::Local(e) => Ok(e
                .store()
                .purge_dead_letters(s.ids.as_deref(), s.queue.as_deref())
                .await?),
            Target::Remote(c) => {
                #[derive(Deserialize)]
                struct Answer {
                    purged: u64,
                }
                let a: Answer = c.post_json("/dead-letters/purge", &serde_json::to_value(s)?)?;
                Ok(a.purged)
            }
        }
    }
}

pub async fn run(args: DeadLettersArgs) -> anyhow::Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    match args.command {
        Command::List {
            queue,
            limit,
            after,
            format,
            db,
            server,
        } => {
            if limit == 0 {
                bail!("--limit must be at least 1");
            }
            let target = Target::open(&db, &server).await?;
            let page = target
                .dead_letter_page(&DeadLetterQuery {
                    queue,
                    limit,
                    after,
                })
                .await?;
            if format == Format::Json {
                writeln!(out, "{}", serde_json::to_string_pretty(&page)?)?;
                return Ok(ExitCode::SUCCESS);
            }
            if page.dead_letters.is_empty() {
                writeln!(out, "no dead letters")?;
                return Ok(ExitCode::SUCCESS);
            }
            let id_w = page
                .dead_letters
                .iter()
                .map(|r| r.id.len())
                .max()
                .unwrap_or(2);
            let q_w = page
                .dead_letters
                .iter()
                .map(|r| r.queue.len())
                .max()
                .unwrap_or(5)
                .max(5);
            writeln!(
                out,
                "{:<id_w$}  {:<q_w$}  {:<24}  REASON",
                "ID", "QUEUE", "DEAD AT"
            )?;
            for r in &page.dead_letters {
                writeln!(
                    out,
                    "{:<id_w$}  {:<q_w$}  {:<24}  {}",
                    r.id,
                    r.queue,
                    time(r.dead_at),
                    one_line(&r.reason)
                )?;
            }
            if let Some(next) = page.next {
                writeln!(out, "… more: add `--after {next}` for the next page")?;
            }
        }
        Command::Show {
            id,
            format,
            db,
            server,
        } => {
            let row = Target::open(&db, &server).await?.show(&id).await?;
            if format == Format::Json {
                writeln!(out, "{}", serde_json::to_string_pretty(&row)?)?;
                return Ok(ExitCode::SUCCESS);
            }
            writeln!(out, "id        {}", row.id)?;
            writeln!(out, "queue     {}", row.queue)?;
            writeln!(out, "dead at   {}", time(row.dead_at))?;
            writeln!(out, "reason    {}", one_line(&row.reason))?;
            writeln!(out, "message   {}", row.message_id)?;
            writeln!(out, "key       {}", row.message_key)?;
            let body = match std::str::from_utf8(&row.payload) {
                Ok(text) => match serde_json::from_str::<serde_json::Value>(text) {
                    Ok(v) => serde_json::to_string_pretty(&v)?,
                    Err(_) => text.to_owned(),
                },
                Err(_) => format!(
                    "(not text, {} bytes) {}",
                    row.payload.len(),
                    String::from_utf8_lossy(&row.payload)
                ),
            };
            writeln!(out, "payload\n{body}")?;
        }
        Command::Replay { which, db, server } => {
            let target = Target::open(&db, &server).await?;
            let done = target.replay(&which.selection()).await?;
            let mut failed = 0;
            for r in &done {
                match (&r.queue, &r.error) {
                    (Some(q), _) => writeln!(out, "{}  back on {q}", r.id)?,
                    (None, e) => {
                        failed += 1;
                        writeln!(
                            out,
                            "{}  not replayed: {}",
                            r.id,
                            e.as_deref().unwrap_or("?")
                        )?;
                    }
                }
            }
            let delivery = match target {
                Target::Local(_) => {
                    "; they wait in the outbox until an engine on this database sends them"
                }
                Target::Remote(_) => "",
            };
            writeln!(
                out,
                "replayed {} of {} dead letters{delivery}",
                done.len() - failed,
                done.len()
            )?;
            if failed > 0 {
                return Ok(ExitCode::from(1));
            }
        }
        Command::Purge { which, db, server } => {
            let target = Target::open(&db, &server).await?;
            let n = target.purge(&which.selection()).await?;
            writeln!(out, "purged {n} dead letters")?;
            if !which.all && n < which.ids.len() as u64 {
                writeln!(
                    out,
                    "({} of the ids given name no kept dead letter)",
                    which.ids.len() as u64 - n
                )?;
                return Ok(ExitCode::from(1));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

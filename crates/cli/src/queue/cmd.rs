//! queue cmd: the `mortal queue` command line and its dispatch.
//!
//! Reading commands (`list`, `show`, `stats`) work on a copy of what the
//! directories hold at that moment; changing commands (`delete`, `hold`,
//! `release`, `requeue`, `flush`) follow the operator lock protocol of
//! `relocate`. Exit statuses are the BSD sysexits a script can act on.

use super::list::{self, Style};
use super::perm::Denied;
use super::relocate::{self, Action};
use super::show::{self, Part};
use super::spool::{self, Filter, QueueDir};
use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{ArgGroup, Args, Subcommand};
use mortal_proto::config::Config;
use mortal_proto::queue_id::{BadQueueId, QueueId};
use std::io::{self, IsTerminal, Write};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

/// Some message named was not in the queue (or not in a queue the command
/// acts on). sysexits EX_NOINPUT.
pub const EXIT_NOT_FOUND: u8 = 66;
/// Some message was being delivered and was left alone: try again.
/// sysexits EX_TEMPFAIL.
pub const EXIT_BUSY: u8 = 75;
/// The operator may not read (or change) the queue. sysexits EX_NOPERM.
pub const EXIT_DENIED: u8 = 77;
/// Any other failure (bad configuration, I/O error).
const EXIT_FAILURE: u8 = 1;

pub const AFTER_HELP: &str = "\
Examples:
  mortal queue list                              what mailq shows: id, size, arrival, sender, recipients
  mortal queue list --json | jq -r .queue_id     JSON Lines with postqueue -j's fields
  mortal queue list --sender @spam.example --older-than 2h
  mortal queue show 0692F1A2B000ABC01234 --header-only
  mortal queue hold --recipient user@example.org
  mortal queue release --all
  mortal queue flush                             retry all deferred mail now
  mortal queue delete --queue deferred --older-than 3d
  mortal queue stats

Markers after a queue id: * being delivered (active/), ! on hold, # corrupt.
Changing commands never touch a message being delivered: they report it
(\"being delivered, try again\") and exit 75. Reading needs read access to
the spool (root, the spool owner, or the group the queue directories are
shared with); changing needs root or the spool owner.

Exit status:
  0   success
  1   failure: invalid configuration, I/O error
  2   bad command line (including a malformed queue id)
  66  a message named was not in the queue, or not in a queue the command acts on
  75  a message was being delivered and was left alone: try again
  77  permission denied: the message says what is needed";

/// `mortal queue ...`.
#[derive(Debug, Subcommand)]
pub enum QueueCommand {
    /// List queued mail, like mailq (postqueue -p; -j with --json).
    List {
        /// One JSON object a line: queue_name, queue_id, arrival_time, message_size, sender, recipients.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        filter: FilterArgs,
    },
    /// Show one message: envelope, header section and body (postcat -q).
    Show {
        #[arg(value_name = "ID", value_parser = parse_id)]
        id: QueueId,
        /// Only the header section, as stored (LF line ends).
        #[arg(long, conflicts_with = "body_only")]
        header_only: bool,
        /// Only the body.
        #[arg(long)]
        body_only: bool,
        /// One JSON object with the envelope, header and body.
        #[arg(long)]
        json: bool,
    },
    /// Delete messages from incoming/, deferred/, hold/ or corrupt/ (postsuper -d).
    Delete(Selection),
    /// Put messages on hold: they stay queued but are not delivered (postsuper -h).
    Hold(Selection),
    /// Release held messages for delivery now (postsuper -H).
    Release(Selection),
    /// Retry deferred messages now (postsuper -r).
    Requeue(Selection),
    /// Make deferred mail (all, or the ids given) due now and wake the queue manager (postqueue -f, -i).
    Flush {
        #[arg(value_name = "ID", value_parser = parse_id)]
        ids: Vec<QueueId>,
    },
    /// Messages, bytes and the oldest arrival per queue directory.
    Stats {
        /// One JSON object.
        #[arg(long)]
        json: bool,
    },
}

/// Which messages to list or act on.
#[derive(Debug, Clone, Args)]
pub struct FilterArgs {
    /// Sender: an address, @domain, or <> for bounces (case-insensitive).
    #[arg(long, value_name = "ADDRESS")]
    sender: Option<String>,
    /// A pending recipient: an address or @domain (case-insensitive).
    #[arg(long, value_name = "ADDRESS")]
    recipient: Option<String>,
    /// Only these queues (repeatable).
    #[arg(long, value_name = "QUEUE", value_parser = queue_parser())]
    queue: Vec<QueueDir>,
    /// Only messages that arrived at least this long ago: 90s, 2h, 3d.
    #[arg(long, value_name = "AGE", value_parser = humantime::parse_duration)]
    older_than: Option<Duration>,
}

impl FilterArgs {
    fn filter(&self) -> Filter {
        Filter {
            sender: self.sender.clone(),
            recipient: self.recipient.clone(),
            queues: self.queue.clone(),
            older_than: self.older_than,
        }
    }
}

/// Ids, `--all`, or filters: exactly one way of choosing.
#[derive(Debug, Clone, Args)]
#[command(group(
    ArgGroup::new("which").required(true).multiple(true)
        .args(["ids", "all", "sender", "recipient", "queue", "older_than"])
))]
pub struct Selection {
    /// Queue ids (20 hex digits).
    #[arg(value_name = "ID", value_parser = parse_id, conflicts_with_all = ["all", "sender", "recipient", "queue", "older_than"])]
    ids: Vec<QueueId>,
    /// Every message the command acts on.
    #[arg(long, conflicts_with_all = ["sender", "recipient", "queue", "older_than"])]
    all: bool,
    #[command(flatten)]
    filter: FilterArgs,
}

/// A queue id as typed: case does not matter, shape does.
fn parse_id(s: &str) -> Result<QueueId, BadQueueId> {
    QueueId::parse(&s.trim().to_ascii_uppercase()).map_err(|_| BadQueueId(s.to_owned()))
}

/// A queue directory by its name; `--help` lists the names.
fn queue_parser() -> impl TypedValueParser<Value = QueueDir> {
    PossibleValuesParser::new(QueueDir::ALL.map(QueueDir::name)).try_map(|name| name.parse::<QueueDir>())
}

/// Runs a queue command; its errors are reported here, with their status.
pub fn run(config: &Config, command: QueueCommand) -> ExitCode {
    match dispatch(config, command) {
        Ok(code) => code,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mortal: {e:#}");
            ExitCode::from(if e.is::<Denied>() { EXIT_DENIED } else { EXIT_FAILURE })
        }
    }
}

/// `mortal queue list | head` closing the pipe early is not a failure.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.downcast_ref::<io::Error>().is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
}

fn dispatch(config: &Config, command: QueueCommand) -> anyhow::Result<ExitCode> {
    let stdout = io::stdout();
    let style = Style { human: stdout.is_terminal(), now: SystemTime::now() };
    let mut out = io::BufWriter::new(stdout.lock());
    let code = match command {
        QueueCommand::List { json, filter } => {
            let messages = list::collect(config, &filter.filter(), &spool::LISTED)?;
            list::write_list(&mut out, &messages, style, json)?;
            ExitCode::SUCCESS
        }
        QueueCommand::Show { id, header_only, body_only, json } => {
            let part = if header_only {
                Part::Header
            } else if body_only {
                Part::Body
            } else {
                Part::All
            };
            show(config, &id, part, json, &mut out)?
        }
        QueueCommand::Stats { json } => {
            let stats = list::stats(config)?;
            list::write_stats(&mut out, &stats, style, json)?;
            ExitCode::SUCCESS
        }
        QueueCommand::Delete(sel) => change(config, Action::Delete, &sel, &mut out)?,
        QueueCommand::Hold(sel) => change(config, Action::Hold, &sel, &mut out)?,
        QueueCommand::Release(sel) => change(config, Action::Release, &sel, &mut out)?,
        QueueCommand::Requeue(sel) => change(config, Action::Requeue, &sel, &mut out)?,
        QueueCommand::Flush { ids } => {
            let ids = if ids.is_empty() { relocate::select(config, Action::Flush, &Filter::default())? } else { ids };
            let tally = relocate::run(config, Action::Flush, &ids, &mut out)?;
            exit_for(tally)
        }
    };
    out.flush()?;
    Ok(code)
}

fn show(config: &Config, id: &QueueId, part: Part, json: bool, out: &mut impl Write) -> anyhow::Result<ExitCode> {
    super::perm::may_read(config, &QueueDir::ALL)?;
    let Some((queue, qf)) = show::find(config, id)? else {
        eprintln!("mortal: {id}: not in the queue (delivered, deleted, or never queued)");
        return Ok(ExitCode::from(EXIT_NOT_FOUND));
    };
    if json {
        writeln!(out, "{}", show::json(queue, &qf, part))?;
    } else {
        show::write_text(out, queue, &qf, part)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn change(config: &Config, action: Action, sel: &Selection, out: &mut impl Write) -> anyhow::Result<ExitCode> {
    let ids =
        if sel.ids.is_empty() { relocate::select(config, action, &sel.filter.filter())? } else { sel.ids.clone() };
    let tally = relocate::run(config, action, &ids, out)?;
    Ok(exit_for(tally))
}

/// Busy outranks not-found: a retry may finish the job.
fn exit_for(tally: relocate::Tally) -> ExitCode {
    if tally.busy > 0 {
        ExitCode::from(EXIT_BUSY)
    } else if tally.missing > 0 {
        ExitCode::from(EXIT_NOT_FOUND)
    } else {
        ExitCode::SUCCESS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked_and_normalised() {
        assert_eq!(parse_id("0000000010000100000a").map(|id| id.to_string()), Ok("0000000010000100000A".to_owned()));
        assert!(parse_id("../../etc/passwd").is_err());
        assert!(parse_id("0000000010000100000").is_err());
    }

    #[test]
    fn exit_statuses() {
        use relocate::Tally;
        let t = |done, busy, missing| exit_for(Tally { done, busy, missing });
        assert_eq!(t(3, 0, 0), ExitCode::SUCCESS);
        assert_eq!(t(0, 0, 1), ExitCode::from(EXIT_NOT_FOUND));
        assert_eq!(t(1, 1, 1), ExitCode::from(EXIT_BUSY));
    }
}

//! mortal: operator commands for the mortal mail system.
//!
//! # Summary
//! `mortal start` validates the configuration and starts `mortal-master`
//! (detached, logging to `<spool_dir>/log/mortal.log`, or in the
//! foreground); `mortal stop` drains and stops it; `mortal reload` makes it
//! re-read the configuration; `mortal status [--json]` shows its
//! scoreboard (`status`; these three talk to the master's control socket,
//! falling back to signals for stop and reload); `mortal check` validates the configuration
//! with line-precise errors, and warns about risky settings
//! (`check`). Like `postfix start|stop|reload|check`. `mortal queue
//! list|show|stats|hold|release|requeue|flush|delete` inspect and change
//! the queue while it runs, by the operator lock protocol of
//! docs/queue-format.md (`queue::cmd` and the `queue_*` modules; Postfix's
//! mailq, postqueue, postcat and postsuper). `mortal version` and
//! `mortal completions bash|zsh|fish`.
//!
//! # Security
//! Runs with the operator's privileges and trusts the operator. It signals
//! only the process named by the pid file, and only after checking that
//! the process is a live `mortal-master`, so a stale pid file whose pid was
//! recycled never gets an unrelated process killed. No unsafe code.
//!
//! # Standards
//! None.
//!
//! # Configuration
//! `--config PATH`, default `./etc/mortal.toml` when it exists (a run from
//! the checkout), else `/etc/mortal/mortal.toml`. The pid file and log
//! locations come from `[server]` in that file.
//!
//! # Diagnostics
//! Errors go to stderr, prefixed `mortal:`; configuration errors read
//! `file:line: key: message`. Exit status: 0 success; 1 failure (invalid
//! configuration, not running, already running, the master failed to
//! start); 2 bad command line; 3 `stop` timed out with the master still
//! running. `mortal queue` adds 66 (no such message), 75 (being
//! delivered, try again) and 77 (permission denied), as in its `--help`.
#![forbid(unsafe_code)]

mod check;
mod ctl;
mod info;
mod queue;
mod status;

use clap::{Parser, Subcommand};
use mortal_proto::config::Config;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// The configuration of a run from the checkout, used when it exists.
const CHECKOUT_CONFIG: &str = "etc/mortal.toml";
/// The configuration of an installed system.
const SYSTEM_CONFIG: &str = "/etc/mortal/mortal.toml";
/// Exit status for a failure (see the crate header).
const EXIT_FAILURE: u8 = 1;
/// Exit status when `stop` gave up waiting.
const EXIT_TIMEOUT: u8 = 3;

const AFTER_HELP: &str = "\
Examples:
  mortal check                          validate ./etc/mortal.toml (or /etc/mortal/mortal.toml)
  mortal start                          start in the background, log to <spool_dir>/log/mortal.log
  mortal start --foreground             run the master in this terminal; Ctrl-C stops it
  mortal reload                         re-read the configuration without dropping sessions
  mortal status --json                  every child: pid, service, generation, state, sessions, age
  mortal stop --timeout 60              drain: busy sessions finish, then the master exits
  mortal queue list                     what mailq shows; `mortal queue --help` for the queue commands

Exit status:
  0  success
  1  failure: invalid configuration, not running, already running, or the master failed to start
  2  bad command line
  3  stop timed out: the master is still running
  66, 75, 77  queue commands: no such message, being delivered (try again), permission denied";

/// Operator commands for the mortal mail system.
#[derive(Debug, Parser)]
#[command(name = "mortal", version, after_help = AFTER_HELP)]
struct Cli {
    /// The configuration file [default: ./etc/mortal.toml if it exists, else /etc/mortal/mortal.toml]
    #[arg(long, value_name = "PATH", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate the configuration, then start the mail system.
    Start {
        /// Run the master in this process (exec), logging to stderr, instead of detaching it.
        #[arg(long)]
        foreground: bool,
    },
    /// Stop the mail system: idle processes exit at once, busy ones after their session.
    Stop {
        /// Seconds to wait for the master to exit.
        #[arg(long, value_name = "SECS", default_value_t = ctl::DEFAULT_STOP_TIMEOUT_SECS)]
        timeout: u64,
    },
    /// Make the running master re-read its configuration (after checking it).
    Reload,
    /// Validate the configuration and print every problem found.
    Check,
    /// Show the master's scoreboard: each child's pid, service, generation, state, sessions, age.
    Status {
        /// Print the master's JSON document instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Inspect and control the mail queue: list, show, delete, hold, release, requeue, flush, stats.
    #[command(after_help = queue::cmd::AFTER_HELP)]
    Queue {
        #[command(subcommand)]
        command: queue::cmd::QueueCommand,
    },
    /// Print the version of mortal and of its queue file format.
    Version,
    /// Print a shell completion script: mortal completions bash > /etc/bash_completion.d/mortal
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let path = match config_path(cli.config.as_deref()) {
        Ok(path) => path,
        Err(e) => return fail(&e),
    };
    let result = match cli.command {
        Command::Check => check(&path),
        Command::Start { foreground } => load(&path).and_then(|c| ctl::start(&c, &path, foreground)),
        Command::Stop { timeout } => load_for_control(&path).and_then(|c| ctl::stop(&c, timeout)),
        Command::Reload => load(&path).and_then(|c| ctl::reload(&c)),
        Command::Status { json } => load_for_control(&path).and_then(|c| status::status(&c, json)),
        Command::Queue { command } => load(&path).map(|c| queue::cmd::run(&c, command)),
        Command::Version => info::version(&mut std::io::stdout()),
        Command::Completions { shell } => info::completions::<Cli>(shell, &mut std::io::stdout()),
    };
    match result {
        Ok(code) => code,
        Err(e) => fail(&e),
    }
}

fn fail(e: &anyhow::Error) -> ExitCode {
    if !e.is::<ConfigInvalid>() {
        eprintln!("mortal: {e:#}");
    }
    ExitCode::from(EXIT_FAILURE)
}

/// The configuration's errors were already printed, one per line.
#[derive(Debug)]
struct ConfigInvalid;

impl std::fmt::Display for ConfigInvalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("invalid configuration")
    }
}

impl std::error::Error for ConfigInvalid {}

/// `--config`, or the default, made absolute: the master and its children
/// may run in another directory.
fn config_path(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    let path = match given {
        Some(path) => path.to_owned(),
        None if Path::new(CHECKOUT_CONFIG).is_file() => PathBuf::from(CHECKOUT_CONFIG),
        None => PathBuf::from(SYSTEM_CONFIG),
    };
    Ok(std::path::absolute(&path)?)
}

/// Loads the configuration, printing every error.
fn load(path: &Path) -> anyhow::Result<Config> {
    Config::load(path).map_err(|errors| {
        for e in errors {
            eprintln!("{e}");
        }
        anyhow::Error::new(ConfigInvalid)
    })
}

/// For `status` and `stop`, which need nothing but the run dir: a running
/// master must stay reachable while its file is being edited. The file's
/// errors are printed, and the master is found through the run dir alone
/// (`Config::locate_run_dir`).
fn load_for_control(path: &Path) -> anyhow::Result<Config> {
    let errors = match Config::load(path) {
        Ok(config) => return Ok(config),
        Err(errors) => errors,
    };
    for e in &errors {
        eprintln!("{e}");
    }
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let Some(run_dir) = Config::locate_run_dir(&text, path) else {
        return Err(anyhow::Error::new(ConfigInvalid));
    };
    eprintln!(
        "mortal: warning: {} has errors (above); reaching the running master through {}",
        path.display(),
        run_dir.display()
    );
    let minimal = format!("[server]\nrun_dir = {}\n", toml::Value::String(run_dir.display().to_string()));
    Config::parse(&minimal, path).map_err(|_| anyhow::Error::new(ConfigInvalid))
}

fn check(path: &Path) -> anyhow::Result<ExitCode> {
    let config = load(path)?;
    // The tables the daemons will load at start: a line they would refuse
    // is an error now, with its file and line, not a daemon that cannot
    // start later.
    let mut tables_ok = true;
    let server = &config.server;
    let tables = server.recipient_maps.iter().map(|s| ("server.recipient_maps", s));
    let aliases = server.virtual_alias_maps.iter().map(|s| ("server.virtual_alias_maps", s));
    let access = config.smtpd.restrictions.all().filter_map(|r| r.table().map(|t| ("smtpd.restrictions", t)));
    let cleanup = &config.cleanup;
    let checks = cleanup.header_checks.iter().map(|s| ("cleanup.header_checks", s));
    let checks = checks.chain(cleanup.body_checks.iter().map(|s| ("cleanup.body_checks", s)));
    for (key, spec) in tables.chain(aliases).chain(access).chain(checks) {
        if let Err(e) = mortal_proto::table::Table::load(spec) {
            eprintln!("{}: {key}: {e}", path.display());
            tables_ok = false;
        }
    }
    if !tables_ok {
        return Err(anyhow::Error::new(ConfigInvalid));
    }
    // Risky but valid settings: reported, not fatal.
    for warning in check::warnings(&config) {
        eprintln!("{}", check::Located(path, &warning));
    }
    println!("{}: ok", path.display());
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn config_is_accepted_before_or_after_the_command() {
        for args in [["mortal", "--config", "x.toml", "check"], ["mortal", "check", "--config", "x.toml"]] {
            let cli = Cli::try_parse_from(args).unwrap();
            assert_eq!(cli.config.as_deref(), Some(Path::new("x.toml")));
        }
        let cli = Cli::try_parse_from(["mortal", "stop"]).unwrap();
        assert!(matches!(cli.command, Command::Stop { timeout } if timeout == ctl::DEFAULT_STOP_TIMEOUT_SECS));
    }

    #[test]
    fn given_config_path_is_made_absolute() {
        let path = config_path(Some(Path::new("some/mortal.toml"))).unwrap();
        assert!(path.is_absolute() && path.ends_with("some/mortal.toml"));
    }
}

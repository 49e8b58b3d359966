//! ctl: start, stop and reload the master.
//!
//! `stop` and `reload` ask the master on its control socket
//! (`<run_dir>/master.sock`, see `status`), which answers whether it did
//! (a reload refused for an invalid configuration says why). Without the
//! socket (an older master, or a removed file) they fall back to signals
//! through the pid file (`<run_dir>/master.pid`), written by the master
//! once its sockets are bound and `flock`ed by it for its whole life.
//! Before signalling the pid it names, these commands check that the
//! process is alive and is a `mortal-master` (`/proc/<pid>/comm`), so a
//! stale file whose pid the kernel gave to another program is never acted
//! on.

use crate::status::{no_master, request};
use crate::{EXIT_FAILURE, EXIT_TIMEOUT};
use anyhow::{Context, bail};
use mortal_proto::config::Config;
use mortal_proto::status::{CONTROL_OK, ControlRequest};
use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// The master's program name, also its `/proc/<pid>/comm`.
const MASTER_PROGRAM: &str = "mortal-master";
/// Longest wait for a detached master to write its pid file.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Default wait for a stopping master: its own stop deadline (30 s for busy
/// sessions) plus its SIGKILL reaping deadline (5 s), plus a margin.
pub const DEFAULT_STOP_TIMEOUT_SECS: u64 = 40;
/// How often the pid file or the master's process is looked at.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Lines of the log shown when the master fails to start.
const TAIL_LINES: usize = 20;
/// Most of the log read for that tail.
const TAIL_BYTES: u64 = 16 * 1024;

/// `mortal start`.
pub fn start(config: &Config, config_path: &Path, foreground: bool) -> anyhow::Result<ExitCode> {
    if let Some(pid) = running_master(&config.pid_file()) {
        bail!("the mail system is already running (master pid {pid})");
    }
    let master = sibling(MASTER_PROGRAM)?;
    if foreground {
        // Replaces this process, so the terminal's signals go to the master.
        let err = Command::new(&master).arg("--config").arg(config_path).exec();
        bail!("exec {}: {err}", master.display());
    }
    let log_dir = config.server.spool_dir.join("log");
    fs::create_dir_all(&log_dir).with_context(|| format!("mkdir {}", log_dir.display()))?;
    // The path as the operator should read it, without `etc/../`.
    let log_dir = fs::canonicalize(&log_dir).unwrap_or(log_dir);
    let log_path = log_dir.join("mortal.log");
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("open {}", log_path.display()))?;
    // Where this run's lines begin, for the tail shown on failure.
    let run_start = log.metadata()?.len();
    let mut child = Command::new(&master)
        .arg("--config")
        .arg(config_path)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Its own process group: the operator's terminal and shell job
        // control no longer reach it.
        .process_group(0)
        .spawn()
        .with_context(|| format!("spawn {}", master.display()))?;
    let pid = child.id();
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait()? {
            eprintln!("mortal: the master exited during startup ({status}); from {}:", log_path.display());
            eprint!("{}", tail(&log_path, run_start));
            return Ok(ExitCode::from(EXIT_FAILURE));
        }
        // Our child's pid, not just any live one: a stale file must not
        // count as success.
        if read_pid(&config.pid_file()) == Some(pid as i32) {
            println!("mortal started, pid {pid}, log: {}", log_path.display());
            return Ok(ExitCode::SUCCESS);
        }
        if Instant::now() >= deadline {
            bail!(
                "master pid {pid} has not finished starting after {}s; see {}",
                START_TIMEOUT.as_secs(),
                log_path.display()
            );
        }
        sleep(POLL_INTERVAL);
    }
}

/// `mortal stop`.
pub fn stop(config: &Config, timeout_secs: u64) -> anyhow::Result<ExitCode> {
    let Some(pid) = running_master(&config.pid_file()) else {
        bail!("the mail system is not running");
    };
    match request(config, ControlRequest::Stop) {
        Ok(reply) if reply.trim_end() == CONTROL_OK => {}
        Ok(reply) => bail!("the master refused to stop: {}", reply.trim_end()),
        Err(e) if no_master(&e) => kill(pid, Signal::SIGTERM).with_context(|| format!("kill -TERM {pid}"))?,
        Err(e) => return Err(e).context("control socket"),
    }
    let deadline = Instant::now() + Duration::from_secs(timeout_secs);
    while !gone(pid) {
        if Instant::now() >= deadline {
            eprintln!("mortal: master pid {pid} is still running after {timeout_secs}s");
            return Ok(ExitCode::from(EXIT_TIMEOUT));
        }
        sleep(POLL_INTERVAL);
    }
    println!("mortal stopped");
    Ok(ExitCode::SUCCESS)
}

/// `mortal reload`: the configuration was validated by the caller, so the
/// master will not refuse it for a reason the operator has not seen.
pub fn reload(config: &Config) -> anyhow::Result<ExitCode> {
    let Some(pid) = running_master(&config.pid_file()) else {
        bail!("the mail system is not running");
    };
    match request(config, ControlRequest::Reload) {
        Ok(reply) if reply.trim_end() == CONTROL_OK => {}
        // The master read a different file than we checked, or it changed
        // in between: its reasons, one per line.
        Ok(reply) => {
            eprint!("{reply}");
            eprintln!("mortal: reload refused: the master keeps its current configuration");
            return Ok(ExitCode::from(EXIT_FAILURE));
        }
        Err(e) if no_master(&e) => kill(pid, Signal::SIGHUP).with_context(|| format!("kill -HUP {pid}"))?,
        Err(e) => return Err(e).context("control socket"),
    }
    println!("mortal reloaded, pid {pid}");
    Ok(ExitCode::SUCCESS)
}

/// A program installed next to this one.
fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating mortal's own executable")?;
    let path = exe.parent().context("mortal's executable has no directory")?.join(name);
    if !path.is_file() {
        bail!("{}: no such program (it is installed next to mortal)", path.display());
    }
    Ok(path)
}

fn read_pid(pid_file: &Path) -> Option<i32> {
    fs::read_to_string(pid_file).ok()?.trim().parse().ok().filter(|&pid| pid > 0)
}

/// The pid of the running master, if the pid file names one.
fn running_master(pid_file: &Path) -> Option<Pid> {
    let pid = Pid::from_raw(read_pid(pid_file)?);
    if gone(pid) {
        return None;
    }
    // Without /proc (not Linux, or hidden) the liveness check must do.
    match fs::read_to_string(format!("/proc/{pid}/comm")) {
        Ok(comm) if comm.trim_end() != MASTER_PROGRAM => None,
        _ => Some(pid),
    }
}

/// Whether `pid` no longer runs: no such process, or a zombie waiting for
/// its parent to reap it.
fn gone(pid: Pid) -> bool {
    match kill(pid, None) {
        Ok(()) | Err(Errno::EPERM) => {}
        Err(_) => return true,
    }
    // `/proc/<pid>/stat` is `pid (comm) S ...`; comm may hold spaces and
    // parentheses, so the state is the field after the last ')'.
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next().map(str::to_owned)))
        .is_some_and(|state| state == "Z" || state == "X")
}

/// The last lines the master wrote to the log since `from`.
fn tail(log: &Path, from: u64) -> String {
    let read = || -> std::io::Result<String> {
        let mut file = fs::File::open(log)?;
        let end = file.metadata()?.len();
        let start = from.max(end.saturating_sub(TAIL_BYTES));
        file.seek(SeekFrom::Start(start))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    match read() {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            let mut out = lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n");
            out.push('\n');
            out
        }
        Err(e) => format!("(cannot read the log: {e})\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_own_process_is_alive_and_not_a_master() {
        let me = Pid::this();
        assert!(!gone(me));
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path();
        let pid_file = dir.join("master.pid");
        fs::write(&pid_file, format!("{me}\n")).unwrap();
        // Live, but its comm is the test binary's: a recycled pid.
        assert_eq!(running_master(&pid_file), None);
        fs::write(&pid_file, "garbage").unwrap();
        assert_eq!(running_master(&pid_file), None);
    }

    #[test]
    fn tail_shows_only_this_runs_last_lines() {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path();
        let log = dir.join("mortal.log");
        let old = "old run\n";
        let new: String = (1..=30).map(|i| format!("line {i}\n")).collect();
        fs::write(&log, format!("{old}{new}")).unwrap();
        let shown = tail(&log, old.len() as u64);
        assert!(shown.starts_with("line 11\n") && shown.ends_with("line 30\n"), "{shown}");
    }
}

//! mortal-master: the supervisor of the mortal mail system.
//!
//! # Summary
//! `mortal-master [--config PATH]` creates the spool and run directories,
//! takes the pid file, binds every listening socket (the `[smtpd] listen`
//! and `proxy_listen` addresses, and the private Unix sockets of cleanup,
//! queue, anvil and, when a route uses them, the pipe service and the lmtp
//! and smtp delivery agents) and then runs the services on them: pools of
//! `mortal-smtpd`, `mortal-cleanup`, `mortal-pipe`, `mortal-lmtp` and
//! `mortal-smtp` children sized by the Apache-prefork-style lifetime
//! policy of `[process.<service>]`, and exactly one `mortal-queue` and one
//! `mortal-anvil`, each with its own lifetime (`[process.queue]`,
//! `[process.anvil]`) and replaced only once gone. It keeps a scoreboard of every child (pid, service, state, sessions served, spawn
//! time, last state change) from the fixed-size status records each child
//! sends on its own socket, replaces children before they retire, retires
//! idle extras, throttles services whose children die at start, and logs
//! abnormal exits. It enforces the lifetime policy (`life`): each
//! child's own jittered lifetime, `max_idle`, the session deadline and the
//! overdue grace, after which a child is terminated whatever its load.
//! When every smtpd is busy at `process_limit`, clients that waited
//! `overload_wait` in the backlog get `421 4.3.2 ... Service busy` from the
//! master, which writes that line and closes without reading. It serves
//! the operator's control socket `<run_dir>/master.sock` (`mortal status`,
//! `reload`, `stop`) and, if configured, rewrites a Prometheus text file.
//! Children find their binaries next to this one's.
//!
//! # Security
//! The master never parses mail or client bytes: it binds sockets, forks and
//! execs, and reads eight-octet status records, each from the one child at
//! the other end of that socket, so a child can only speak for itself, and
//! a child that breaks the status protocol is killed. Each child is a fresh
//! fork+exec (new address-space layout), never a fork of the master. A
//! child's only descriptors are its listener, its status socket and the
//! log; every other descriptor is close-on-exec. When the master dies, for
//! whatever reason, every status socket closes and the children exit: none
//! is left serving mail unsupervised. No unsafe code (`forbid`).
//!
//! Started as root, the master checks that `[server] user` exists before
//! anything else (and refuses to start if not), then gives that user the
//! queue directories (0700), the Maildir root under the spool and the
//! private sockets (0600), while the spool root, the run directory, the
//! pid file and the control socket stay root's, and the private directory
//! is root's with mode 0710 and the mail user's group: a daemon can reach
//! the sockets whose names it knows but cannot replace one. Each child
//! then drops to that user itself, after exec (`mortal_libmaster::sandbox`);
//! the pipe service drops to `[delivery.pipe] user` instead, which must
//! exist too, so no pipe command ever runs as root or as the mail user.
//!
//! # Standards
//! None on the wire. Log lines follow Postfix's master (`daemon started --
//! version ...`, `warning: process ... pid ... exit status ...`, `has
//! reached its process limit`, `bad command startup -- throttling`), plus
//! `warning: process ... pid N: session deadline exceeded, killing` and
//! `... still running Ns after its lifetime, killing`.
//!
//! # Configuration
//! `mortal.toml`: `[server]` (spool_dir, run_dir, user), `[smtpd] listen`,
//! `[server] metrics_file`, `[process.smtpd]`, `[process.cleanup]`, `[process.pipe]`,
//! `[process.lmtp]`, `[process.smtp]`, `[process.queue]` and `[process.anvil]`
//! (process_limit, prefork, min_spare, max_spare, max_idle, max_lifetime,
//! lifetime_jitter, session_deadline, overdue_grace, and for smtpd
//! overload_wait; max_use is the children's own business), `[log]`.
//! SIGHUP or `reload` on the control socket re-reads it: a new generation
//! of children reads the new file, while busy children of the old one
//! finish their session first; an invalid file is refused, with its
//! errors, and the old configuration stays. Listen addresses and
//! directories change only on restart.
//!
//! # Diagnostics
//! Everything goes to stderr in the `[log]` format, shared with the
//! children. Exit status 0 after a stop on SIGTERM or SIGINT (`terminating
//! on signal 15`); 1 when the configuration is invalid, another master is
//! running, or a socket cannot be bound (`fatal: ...`); 2 for bad
//! arguments.
#![forbid(unsafe_code)]

mod board;
mod ctl;
mod event_loop;
mod life;
mod listen;
mod overload;
mod pid;
mod pool;
mod sig;
mod spawn;
mod stat;

use anyhow::{Context, bail};
use clap::Parser;
use event_loop::{Master, Service, ServiceKind};
use mortal_libmaster::{log, sandbox};
use mortal_proto::config::Config;
use mortal_proto::service::Process;
use mortal_proto::status::CONTROL_SOCKET;
use pid::PidFile;
use std::fs::{self, DirBuilder};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Logged at start and reload.
pub(crate) const VERSION: &str = env!("CARGO_PKG_VERSION");
/// Highest descriptor number closed at start when `/proc` is unavailable.
const FALLBACK_FD_LIMIT: i32 = 1024;
/// Descriptors 0 to 2 are kept: stdin, stdout, and stderr (the log).
const STDERR_FD: i32 = 2;
/// Where an installed system keeps its configuration.
const DEFAULT_CONFIG: &str = "/etc/mortal/mortal.toml";
/// Delivered mail in the default Maildir root: owner only.
const MAILDIR_ROOT_MODE: u32 = mortal_libmaster::sandbox::MAIL_USER_MODE;
/// The run directory holds the pid file, which operators' tools read.
const RUN_DIR_MODE: u32 = 0o755;
/// The private directory holds the daemons' sockets: owner only, enforced
/// even when it already exists.
const PRIVATE_DIR_MODE: u32 = 0o700;
/// The postscreen cache directory: the mail user's alone (chowned when the
/// master runs as root).
const POSTSCREEN_CACHE_DIR_MODE: u32 = 0o700;

/// The supervisor of the mortal mail system: binds the sockets and keeps
/// the smtpd, cleanup and queue processes running. Normally started by
/// `mortal start`.
#[derive(Debug, Parser)]
#[command(name = "mortal-master", version)]
struct Args {
    /// The configuration file.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_CONFIG)]
    config: PathBuf,
}

fn main() -> ExitCode {
    close_inherited_descriptors();
    let args = Args::parse();
    let path = match std::path::absolute(&args.config) {
        Ok(path) => path,
        Err(e) => {
            log::init_early(Process::Master);
            tracing::error!("fatal: {}: {e}", args.config.display());
            return ExitCode::FAILURE;
        }
    };
    let config = match Config::load(&path) {
        Ok(config) => config,
        Err(errors) => {
            // The configured format is unknown; log the reasons plainly.
            log::init_early(Process::Master);
            for e in errors {
                tracing::error!("fatal: {e}");
            }
            return ExitCode::FAILURE;
        }
    };
    log::init(Process::Master, &config.log, &config.server.hostname);
    match master_main(config, path) {
        Ok(signal) => {
            tracing::info!("terminating on signal {signal}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!("fatal: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Closes every descriptor above stderr that the master's launcher left
/// open (a shell's pipes, a terminal's extra descriptors): nothing in the
/// master needs them, and each would otherwise reach every child, which
/// must hold nothing but its listener, status socket and log. Called first
/// in `main`, before anything in this process owns a descriptor, so no
/// owner is left holding a closed number.
fn close_inherited_descriptors() {
    let open: Vec<i32> = match fs::read_dir("/proc/self/fd") {
        Ok(dir) => dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect(),
        // Without /proc, try the usual range.
        Err(_) => (0..FALLBACK_FD_LIMIT).collect(),
    };
    for fd in open.into_iter().filter(|&fd| fd > STDERR_FD) {
        // EBADF for the directory's own descriptor (already closed) and
        // for unused numbers in the fallback range: both harmless.
        let _ = nix::unistd::close(fd);
    }
}

/// Starts the mail system and runs it until a stop signal, which it
/// returns.
fn master_main(config: Config, config_path: PathBuf) -> anyhow::Result<i32> {
    // Started as root: the children drop to this user, which must exist,
    // and so must the pipe service's.
    let mail_user = sandbox::mail_user(&config)?;
    if config.routes_to(ServiceKind::Pipe) {
        sandbox::pipe_user(&config)?;
        warn_about_pipe(&config, mail_user.is_some());
    }
    make_dirs(&config)?;
    if let Some(user) = &mail_user {
        sandbox::own_dirs(&config, user)?;
    }
    let pid_path = config.pid_file();
    let mut pid_file = PidFile::lock(&pid_path).map_err(|e| anyhow::anyhow!("{}: {e}", pid_path.display()))?;
    let services = match bind_services(&config) {
        Ok(services) => services,
        Err(e) => {
            let _ = pid_file.remove();
            return Err(e);
        }
    };
    if let Some(user) = &mail_user
        && let Err(e) = sandbox::own_sockets(&config, user)
    {
        for file in services.iter().filter_map(|s| s.socket_file.as_ref()) {
            let _ = fs::remove_file(file);
        }
        let _ = pid_file.remove();
        return Err(e.into());
    }
    let mut socket_files: Vec<PathBuf> = services.iter().filter_map(|s| s.socket_file.clone()).collect();
    let control_path = config.run_dir().join(CONTROL_SOCKET);
    let control = match ctl::bind(&control_path) {
        Ok(control) => control,
        Err(e) => {
            for file in &socket_files {
                let _ = fs::remove_file(file);
            }
            let _ = pid_file.remove();
            return Err(anyhow::anyhow!("bind {}: {e}", control_path.display()));
        }
    };
    socket_files.push(control_path);
    let result = run(config, config_path, services, control, &mut pid_file);
    // The children are gone (or were killed); what is left is ours.
    for file in socket_files {
        if let Err(e) = fs::remove_file(&file) {
            tracing::warn!("warning: remove {}: {e}", file.display());
        }
    }
    if let Err(e) = pid_file.remove() {
        tracing::warn!("warning: remove {}: {e}", pid_path.display());
    }
    result
}

/// The event loop, on a current-thread runtime: the master's work is
/// bookkeeping, so one thread is plenty and keeps it simple.
fn run(
    config: Config,
    config_path: PathBuf,
    services: Vec<Service>,
    control: std::os::unix::net::UnixListener,
    pid_file: &mut PidFile,
) -> anyhow::Result<i32> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("tokio runtime")?;
    runtime.block_on(async {
        // Before the pid file says we are up: a `mortal stop` that follows
        // at once must find the handler in place.
        let mut signals = sig::Signals::install().context("signal handlers")?;
        pid_file.write_pid().context("write pid file")?;
        tracing::info!("daemon started -- version {VERSION}, configuration {}", config_path.display());
        let mut master = Master::new(config, config_path, services);
        master.serve_control(ctl::Control::new(control).context("control socket")?);
        master.prefork();
        Ok(master.run(&mut signals).await)
    })
}

/// Creates the spool, queue, run and private directories.
fn make_dirs(config: &Config) -> anyhow::Result<()> {
    // The spool root and queue directories, with the spool's modes.
    config.spool().create_dirs()?;
    make_dir(config.run_dir(), RUN_DIR_MODE)?;
    let private = config.private_dir();
    make_dir(&private, PRIVATE_DIR_MODE)?;
    fs::set_permissions(&private, fs::Permissions::from_mode(PRIVATE_DIR_MODE))
        .with_context(|| format!("chmod {}", private.display()))?;
    // Each postscreen writes its cache there for its successor.
    if config.postscreen.enabled {
        make_dir(&config.postscreen_cache_dir(), POSTSCREEN_CACHE_DIR_MODE)?;
    }
    // The queue delivers into it from inside its sandbox, which cannot
    // create it.
    make_dir(config.maildir_root(), MAILDIR_ROOT_MODE)
}

fn make_dir(path: &Path, mode: u32) -> anyhow::Result<()> {
    DirBuilder::new().recursive(true).mode(mode).create(path).with_context(|| format!("mkdir {}", path.display()))
}

/// Says once at start what the pipe service's sandbox cannot hold, and,
/// unprivileged, that `[delivery.pipe] user` has no effect.
fn warn_about_pipe(config: &Config, as_root: bool) {
    tracing::warn!("{}", sandbox::PIPE_LANDLOCK_WARNING);
    let Some(wanted) = config.delivery.pipe.user.as_deref() else { return };
    if as_root {
        return;
    }
    let uid = nix::unistd::geteuid();
    let me = nix::unistd::User::from_uid(uid).ok().flatten().map_or_else(|| uid.to_string(), |u| u.name);
    if me != wanted {
        tracing::warn!(
            "warning: [delivery.pipe] user \"{wanted}\" does not take effect: mortal was not started as root, so every process, the pipe command included, runs as \"{me}\""
        );
    }
}

/// Binds every listener, TCP first: binding a port another master holds
/// fails before any socket file is touched.
fn bind_services(config: &Config) -> anyhow::Result<Vec<Service>> {
    let exe = std::env::current_exe().context("locating the master's own executable")?;
    let bin_dir = exe.parent().context("the master's executable has no directory")?;
    let program = |kind: ServiceKind| -> anyhow::Result<PathBuf> {
        let path = bin_dir.join(kind.program());
        if !path.is_file() {
            bail!("{}: no such program (daemons are installed next to mortal-master)", path.display());
        }
        Ok(path)
    };
    let mut services = Vec::new();
    // One pool per listen address: a child waits on one inherited listener
    // (a proxy_listen child tells from its listener's address that each
    // connection opens with a PROXY header).
    let plain = config.smtpd.listen.iter().map(|addr| (addr, "smtpd"));
    let proxied = config.smtpd.proxy_listen.iter().map(|addr| (addr, "smtpd, proxy_listen"));
    // The submission listeners' children are smtpd too, told their role
    // by their listener's address (`Smtpd::role_of`).
    let submission = config.smtpd.submission_listen.iter().map(|addr| (addr, "smtpd, submission"));
    let submissions = config.smtpd.submissions_listen.iter().map(|addr| (addr, "smtpd, submissions"));
    // With postscreen, each `listen` address is postscreen's, and the
    // smtpd children behind it wait on the hand-off socket instead.
    let screened = config.postscreen.enabled;
    let plain = plain.map(|(addr, what)| if screened { (addr, "postscreen") } else { (addr, what) });
    for (addr, what) in plain.chain(proxied).chain(submission).chain(submissions) {
        let socket = listen::master_listen_tcp(*addr).with_context(|| format!("bind {addr}"))?;
        // A port of 0 lets the kernel choose one; the address actually bound
        // is what `mortal status` shows and what this line tells whoever
        // started us (the tests read the port from it).
        let bound = socket.local_addr()?.as_socket().with_context(|| format!("{addr}: bound to no IP address"))?;
        tracing::info!("listening on {bound} ({what})");
        let kind = if what == "postscreen" { ServiceKind::Postscreen } else { ServiceKind::Smtpd };
        services.push(Service::new(kind, bound.to_string(), program(kind)?, socket, None));
    }
    let mut unix = Vec::new();
    if screened && !config.smtpd.listen.is_empty() {
        unix.push((ServiceKind::Smtpd, config.smtpd_handoff_socket()));
    }
    unix.extend([
        (ServiceKind::Cleanup, config.cleanup_socket()),
        (ServiceKind::Queue, config.queue_socket()),
        (ServiceKind::Anvil, config.anvil_socket()),
    ]);
    // A delivery agent exists only for mail routed to it: without a pipe
    // route no process can run the command at all, without an LMTP or SMTP
    // route no process may connect anywhere.
    unix.extend(config.agents().into_iter().map(|agent| (agent, config.agent_socket(agent))));
    for (kind, path) in unix {
        let bound = program(kind).and_then(|program| {
            let socket = listen::master_listen_unix(&path).with_context(|| format!("bind {}", path.display()))?;
            // Shown by `mortal status` and in log lines: `/srv/mail/spool/run/...`
            // rather than the configured `/srv/mail/etc/../spool/run/...`.
            let shown = fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
            Ok(Service::new(kind, shown.display().to_string(), program, socket, Some(path.clone())))
        });
        match bound {
            Ok(service) => services.push(service),
            Err(e) => {
                for file in services.iter().filter_map(|s| s.socket_file.as_ref()) {
                    let _ = fs::remove_file(file);
                }
                return Err(e);
            }
        }
    }
    Ok(services)
}

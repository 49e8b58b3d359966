//! The sandbox self-test: each restriction proved from inside a real
//! sandboxed process.
//!
//! `mortal-<service> --sandbox-selftest --config PATH` (the orchestrator)
//! runs one fresh process per attempt, `mortal-<service> --sandbox-probe
//! <attempt> <port> --config PATH`, which loads the configuration, enters
//! exactly the production sandbox (the needs the daemon states, applied by
//! [`super::enter`]'s own code) and then makes one
//! forbidden (or, as a control, one permitted) attempt, printing its
//! verdict. One process per attempt because a seccomp violation kills the
//! process: death by `SIGSYS` is a verdict too. The orchestrator prints a
//! table of attempt, expected and actual result, and exits 1 if anything
//! forbidden succeeded, anything permitted failed, or a probe could not
//! run. A second table makes every attempt again from a forked child as
//! `spawn = "fork"` makes them: the probe enters the sandbox as a zygote
//! does, forks the way a zygote does, and the child seals its sandbox and
//! makes the attempt, which must go exactly as in an exec'd child. Both modes are reached only through these command-line flags,
//! which the master never passes: nothing a client sends can start them.

use super::{Needs, Plan, Service, enter_layers, mail_user, own_dirs, seal_fork, visible_path};
use mortal_proto::config::{Config, NextHop, Route};
use mortal_proto::spool::QueueDir;
use nix::sys::resource::{Resource, setrlimit};
use nix::sys::signal::Signal;
use nix::unistd::Uid;
use std::ffi::{CString, OsString};
use std::fs::{self, DirBuilder};
use std::io::{BufRead, Read};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Runs the self-test table.
pub const SELFTEST_FLAG: &str = "--sandbox-selftest";
/// Runs one attempt; used by the self-test only.
const PROBE_FLAG: &str = "--sandbox-probe";
/// A probe with the whole production sandbox.
const ALL_LAYERS: &str = "all";
/// A probe without seccomp, to show what smtpd's other layers (user,
/// chroot, Landlock) hold by themselves; information only.
const NO_SECCOMP: &str = "no-seccomp";
/// A probe made by a forked child of a zygote's sandbox.
const FORKED: &str = "forked";
/// What a forked probe's zygote prints first: the child's pid (the
/// child is the orchestrator's, as a zygote's children are the master's).
const FORKED_LINE: &str = "forked";
/// The heading of the forked table.
pub const FORKED_TABLE: &str = "forked by a zygote (spawn = \"fork\"):";
/// Longest one probe may take; each is a handful of system calls.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the orchestrator looks whether a probe has finished.
const PROBE_POLL: Duration = Duration::from_millis(5);
/// Exit status of the self-test when an attempt went the wrong way.
const FAILED: u8 = 1;
/// Exit status for bad arguments.
const USAGE: u8 = 2;
/// Mode of directories the self-test creates, as the master does.
const DIR_MODE: u32 = 0o700;
/// Mode of the spool root and the run directory, as the master's.
const OPEN_DIR_MODE: u32 = 0o755;
/// Mode of the stand-in sockets, as the master's.
const SOCKET_MODE: u32 = 0o600;
/// Name of the file the write attempts create (and remove at once).
const PROBE_FILE: &str = ".sandbox-probe";

/// The attempts, each made in its own sandboxed process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attempt {
    Applied,
    ReadPasswd,
    ListRoot,
    WriteIncoming,
    WriteDeferred,
    MoveToHold,
    WriteTmp,
    ConnectCleanup,
    ConnectQueue,
    ConnectPipe,
    TcpConnect,
    ConnectNextHop,
    ConnectFilter,
    ConnectAuth,
    SignalParent,
    PtraceParent,
    ForkLikeZygote,
    Exec,
    Spawn,
    NewPrivs,
    CoreDump,
    Setuid0,
    Chroot,
    Unshare,
}

const ATTEMPTS: [Attempt; 24] = [
    Attempt::Applied,
    Attempt::ReadPasswd,
    Attempt::ListRoot,
    Attempt::WriteIncoming,
    Attempt::WriteDeferred,
    Attempt::MoveToHold,
    Attempt::WriteTmp,
    Attempt::ConnectCleanup,
    Attempt::ConnectQueue,
    Attempt::ConnectPipe,
    Attempt::TcpConnect,
    Attempt::ConnectNextHop,
    Attempt::ConnectFilter,
    Attempt::ConnectAuth,
    Attempt::SignalParent,
    Attempt::PtraceParent,
    Attempt::ForkLikeZygote,
    Attempt::Exec,
    Attempt::Spawn,
    Attempt::NewPrivs,
    Attempt::CoreDump,
    Attempt::Setuid0,
    Attempt::Chroot,
    Attempt::Unshare,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Allowed,
    Denied,
}

impl Attempt {
    fn name(self) -> &'static str {
        match self {
            Attempt::Applied => "applied",
            Attempt::ReadPasswd => "read-passwd",
            Attempt::ListRoot => "list-root",
            Attempt::WriteIncoming => "write-incoming",
            Attempt::WriteDeferred => "write-deferred",
            Attempt::MoveToHold => "move-to-hold",
            Attempt::WriteTmp => "write-tmp",
            Attempt::ConnectCleanup => "connect-cleanup",
            Attempt::ConnectQueue => "connect-queue",
            Attempt::ConnectPipe => "connect-pipe",
            Attempt::TcpConnect => "tcp-connect",
            Attempt::ConnectNextHop => "connect-next-hop",
            Attempt::ConnectFilter => "connect-filter",
            Attempt::ConnectAuth => "connect-auth",
            Attempt::SignalParent => "signal-parent",
            Attempt::PtraceParent => "ptrace-parent",
            Attempt::ForkLikeZygote => "zygote-fork",
            Attempt::Exec => "exec",
            Attempt::Spawn => "spawn",
            Attempt::NewPrivs => "new-privs",
            Attempt::CoreDump => "core-dump",
            Attempt::Setuid0 => "setuid-0",
            Attempt::Chroot => "chroot",
            Attempt::Unshare => "unshare",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Attempt::Applied => "enter the sandbox",
            Attempt::ReadPasswd => "open /etc/passwd for reading",
            Attempt::ListRoot => "list the root directory",
            Attempt::WriteIncoming => "create a file in spool/incoming",
            Attempt::WriteDeferred => "create a file in spool/deferred",
            Attempt::MoveToHold => "move a file from incoming/ into hold/",
            Attempt::WriteTmp => "create a file in /tmp",
            Attempt::ConnectCleanup => "connect to the cleanup socket",
            Attempt::ConnectQueue => "connect to the queue socket",
            Attempt::ConnectPipe => "connect to the pipe socket",
            Attempt::TcpConnect => "TCP connect to 127.0.0.1",
            Attempt::ConnectNextHop => "TCP connect to a configured next hop",
            Attempt::ConnectFilter => "TCP connect to a milter or policy server",
            Attempt::ConnectAuth => "TCP connect to the AUTH server (Dovecot)",
            Attempt::SignalParent => "signal another process (the parent)",
            Attempt::PtraceParent => "ptrace another process (the parent)",
            Attempt::ForkLikeZygote => "fork as a zygote does (clone, CLONE_PARENT)",
            Attempt::Exec => "execve /bin/true",
            Attempt::Spawn => "start a process (fork and exec /bin/true)",
            Attempt::NewPrivs => "gain privileges on exec (no_new_privs)",
            Attempt::CoreDump => "raise the core-dump size limit",
            Attempt::Setuid0 => "regain root (setuid 0)",
            Attempt::Chroot => "chroot (escape attempt)",
            Attempt::Unshare => "forbidden syscall: unshare(CLONE_NEWUSER)",
        }
    }

    fn from_name(name: &str) -> Option<Attempt> {
        ATTEMPTS.into_iter().find(|a| a.name() == name)
    }

    /// What `service`'s sandbox must answer, for a self-test started as
    /// root (`root`) or not; `None`: not meaningful there.
    fn expect(self, service: Service, root: bool) -> Option<Expect> {
        use Expect::*;
        match (self, service) {
            (Attempt::Applied, _) => Some(Allowed),
            // The network belongs to the delivery agents: each reaches its
            // own next hops, and the queue manager none at all.
            (Attempt::ConnectNextHop, Service::Lmtp | Service::Smtp) => Some(Allowed),
            (Attempt::ConnectNextHop, Service::Queue) => Some(Denied),
            (Attempt::ConnectNextHop, _) => None,
            // The milters and policy servers are smtpd's: it reaches their
            // ports (and, by TcpConnect, no other).
            (Attempt::ConnectFilter, Service::Smtpd) => Some(Allowed),
            (Attempt::ConnectFilter, Service::Lmtp | Service::Smtp | Service::Pipe) => None,
            // So is Dovecot's auth service: smtpd alone asks it.
            (Attempt::ConnectAuth, Service::Smtpd) => Some(Allowed),
            (Attempt::ConnectAuth, Service::Lmtp | Service::Smtp | Service::Pipe) => None,
            // Unix sockets are reached by connect, which Landlock does not
            // govern; the agents have no business there but prove nothing.
            (
                Attempt::ConnectCleanup | Attempt::ConnectQueue | Attempt::ConnectPipe | Attempt::Chroot,
                Service::Lmtp | Service::Smtp,
            ) => None,
            // The pipe service runs the operator's command: running
            // programs is its job, and the files and ports it may use are
            // the operator's (no Landlock rules). As root it is another
            // user than the mail user, so the spool is closed to it.
            (Attempt::Exec | Attempt::Spawn, Service::Pipe) => Some(Allowed),
            (Attempt::WriteIncoming | Attempt::WriteDeferred | Attempt::MoveToHold, Service::Pipe) => {
                root.then_some(Denied)
            }
            (
                Attempt::ReadPasswd
                | Attempt::ListRoot
                | Attempt::WriteTmp
                | Attempt::TcpConnect
                | Attempt::ConnectCleanup
                | Attempt::ConnectQueue
                | Attempt::ConnectPipe
                | Attempt::Chroot,
                Service::Pipe,
            ) => None,
            (Attempt::ConnectPipe, Service::Queue) => Some(Allowed),
            (Attempt::ConnectPipe, _) => None,
            // cleanup and anvil may not exec (a forked child of theirs
            // would die at once); whether they can fork proves nothing.
            (Attempt::Spawn, Service::Cleanup | Service::Anvil) => None,
            // A zygote's own fork, which its filters allow and its
            // children's seal takes back: denied to every service that may
            // not create a process (the others' fork proves nothing, and
            // would leave this process a child to reap).
            (Attempt::ForkLikeZygote, Service::Cleanup | Service::Anvil | Service::Pipe) => None,
            (Attempt::WriteIncoming, Service::Cleanup | Service::Queue) => Some(Allowed),
            (Attempt::WriteDeferred, Service::Queue) => Some(Allowed),
            // cleanup commits a message a filter holds by renaming it from
            // incoming/ into hold/: that, and incoming/, is all it may
            // write.
            (Attempt::MoveToHold, Service::Cleanup | Service::Queue) => Some(Allowed),
            (Attempt::ConnectCleanup, Service::Smtpd) => Some(Allowed),
            (Attempt::ConnectQueue, Service::Cleanup) => Some(Allowed),
            (Attempt::ConnectCleanup | Attempt::ConnectQueue, _) => None,
            (Attempt::Chroot, Service::Smtpd | Service::Anvil | Service::Postscreen) => Some(Denied),
            (Attempt::Chroot, _) => None,
            _ => Some(Denied),
        }
    }
}

/// Runs the self-test or one probe when the command line asks for it,
/// and returns the exit status; `None` otherwise. `needs` is what the
/// daemon states for its production sandbox ([`crate::daemon::run`] calls
/// this first, with the daemon's own), so the probes enter exactly that.
pub(crate) fn run_if_asked(service: Service, needs: &dyn Fn(&Config) -> Needs) -> Option<ExitCode> {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let first = args.first()?;
    if first == SELFTEST_FLAG {
        crate::log::init_early(service);
        Some(match &args[1..] {
            [flag, path] if flag == "--config" => ExitCode::from(orchestrate(service, Path::new(path))),
            _ => usage(service),
        })
    } else if first == PROBE_FLAG {
        crate::log::init_early(service);
        Some(match &args[1..] {
            [attempt, port, layers, flag, path] if flag == "--config" => {
                let attempt = attempt.to_str().and_then(Attempt::from_name);
                let port = port.to_str().and_then(|p| p.parse().ok());
                let layers = match layers.to_str() {
                    Some(ALL_LAYERS) => Some(Layers::All),
                    Some(NO_SECCOMP) => Some(Layers::NoSeccomp),
                    Some(FORKED) => Some(Layers::Forked),
                    _ => None,
                };
                match (attempt, port, layers) {
                    (Some(attempt), Some(port), Some(layers)) => {
                        probe(service, needs, attempt, port, layers, Path::new(path))
                    }
                    _ => usage(service),
                }
            }
            _ => usage(service),
        })
    } else {
        None
    }
}

fn usage(service: Service) -> ExitCode {
    eprintln!("usage: mortal-{} {SELFTEST_FLAG} --config PATH", service.name());
    ExitCode::from(USAGE)
}

fn load(path: &Path) -> Result<Config, u8> {
    Config::load(path).map_err(|errors| {
        for e in errors {
            eprintln!("fatal: {e}");
        }
        USAGE
    })
}

/// Which sandbox a probe enters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layers {
    /// The production sandbox of an exec'd child.
    All,
    /// Without seccomp (information only).
    NoSeccomp,
    /// A zygote's sandbox, then a fork and the child's seal
    /// (`spawn = "fork"`).
    Forked,
}

/// The sandbox of a forked child, entered as a zygote and its child enter
/// it: `None` in the zygote, which has printed the child's pid.
fn enter_forked(service: Service, config: &Config, needs: &Needs) -> Result<Option<super::Applied>, String> {
    if super::thread_count() != Some(1) {
        return Err("not one thread".into());
    }
    let applied =
        Plan::for_zygote(config, needs).and_then(|plan| plan.apply(service, config)).map_err(|e| e.to_string())?;
    match crate::sys::fork_sibling().map_err(|e| format!("fork: {e}"))? {
        crate::sys::Forked::Parent(pid) => {
            println!("{FORKED_LINE} {pid}");
            Ok(None)
        }
        crate::sys::Forked::Child => seal_fork(needs, &applied).map(|()| Some(applied)).map_err(|e| e.to_string()),
    }
}

/// One attempt, inside the sandbox: prints `allowed`, `denied <errno>` or
/// `error <text>` and returns success (unless the kernel kills it first).
fn probe(
    service: Service,
    needs: &dyn Fn(&Config) -> Needs,
    attempt: Attempt,
    port: u16,
    layers: Layers,
    config_path: &Path,
) -> ExitCode {
    let config = match load(config_path) {
        Ok(config) => config,
        Err(code) => return ExitCode::from(code),
    };
    let entered = match layers {
        Layers::All => enter_layers(service, &config, &needs(&config), true).map(Some).map_err(|e| e.to_string()),
        Layers::NoSeccomp => {
            enter_layers(service, &config, &needs(&config), false).map(Some).map_err(|e| e.to_string())
        }
        Layers::Forked => enter_forked(service, &config, &needs(&config)),
    };
    let applied = match entered {
        Ok(Some(applied)) => applied,
        // The zygote: its child makes the attempt.
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            println!("error sandbox: {e}");
            return ExitCode::SUCCESS;
        }
    };
    let verdict = match attempt {
        Attempt::Applied => {
            println!(
                "allowed user={} chroot={} landlock={:?} seccomp={}",
                applied.user.as_deref().unwrap_or("-"),
                applied.chroot.as_deref().map_or_else(|| "-".into(), |p| p.display().to_string()),
                applied.landlock,
                applied.seccomp_rules
            );
            return ExitCode::SUCCESS;
        }
        Attempt::ReadPasswd => io(fs::File::open("/etc/passwd").map(drop)),
        Attempt::ListRoot => io(fs::read_dir("/").map(drop)),
        Attempt::WriteIncoming => write_in(&config.spool().dir(QueueDir::Incoming)),
        Attempt::WriteDeferred => write_in(&config.spool().dir(QueueDir::Deferred)),
        Attempt::MoveToHold => move_into(&config.spool().dir(QueueDir::Incoming), &config.spool().dir(QueueDir::Hold)),
        Attempt::WriteTmp => write_in(Path::new("/tmp")),
        Attempt::ConnectCleanup => io(UnixStream::connect(visible_path(&config.cleanup_socket())).map(drop)),
        Attempt::ConnectQueue => io(UnixStream::connect(visible_path(&config.queue_socket())).map(drop)),
        Attempt::ConnectPipe => io(UnixStream::connect(visible_path(&config.agent_socket(Service::Pipe))).map(drop)),
        Attempt::TcpConnect => io(TcpStream::connect(("127.0.0.1", port)).map(drop)),
        Attempt::ConnectNextHop => match next_hop(service, &config) {
            Some(addr) => io(TcpStream::connect(addr).map(drop)),
            None => "error no TCP next hop in the configuration's routes".into(),
        },
        Attempt::ConnectFilter => match filter_hops(&config).next() {
            Some(addr) => io(TcpStream::connect(addr).map(drop)),
            None => "error no inet: milter or policy server in the configuration".into(),
        },
        Attempt::ConnectAuth => match auth_hop(&config) {
            Some(addr) => io(TcpStream::connect(addr).map(drop)),
            None => "error no inet: [smtpd.auth] server in the configuration".into(),
        },
        Attempt::SignalParent => nix(nix::sys::signal::kill(nix::unistd::getppid(), None::<Signal>)),
        Attempt::PtraceParent => {
            let parent = nix::unistd::getppid();
            let result = nix::sys::ptrace::seize(parent, nix::sys::ptrace::Options::empty());
            if result.is_ok() {
                let _ = nix::sys::ptrace::detach(parent, None);
            }
            nix(result)
        }
        Attempt::ForkLikeZygote => match crate::sys::fork_sibling() {
            Ok(crate::sys::Forked::Child) => crate::sys::exit_now(0),
            Ok(crate::sys::Forked::Parent(_)) => "allowed".into(),
            Err(e) => io(Err(e)),
        },
        Attempt::Exec => {
            let program = CString::from(c"/bin/true");
            nix(nix::unistd::execv(&program, std::slice::from_ref(&program)).map(drop))
        }
        Attempt::Spawn => {
            // Inherited stdio: opening /dev/null could itself be refused
            // (Landlock), which would prove nothing about process creation.
            let status = Command::new("/bin/true").status();
            match status {
                Ok(s) if s.success() => "allowed".into(),
                Ok(s) => format!("error /bin/true: {s}"),
                Err(e) => io(Err(e)),
            }
        }
        // A set-user-id program must not raise the privileges of anything
        // this process (or a command it runs) executes.
        Attempt::NewPrivs => match nix::sys::prctl::get_no_new_privs() {
            Ok(true) => "denied EPERM: no_new_privs is set".into(),
            Ok(false) => "allowed".into(),
            Err(e) => format!("error PR_GET_NO_NEW_PRIVS: {e}"),
        },
        Attempt::CoreDump => nix(setrlimit(Resource::RLIMIT_CORE, 1 << 20, 1 << 20)),
        Attempt::Setuid0 => nix(nix::unistd::setuid(Uid::from_raw(0))),
        Attempt::Chroot => nix(nix::unistd::chroot(".")),
        Attempt::Unshare => nix(nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWUSER)),
    };
    println!("{verdict}");
    ExitCode::SUCCESS
}

/// The first TCP next hop `service` would reach: its own routes' for a
/// delivery agent, any route's for the others.
fn next_hop(service: Service, config: &Config) -> Option<std::net::SocketAddr> {
    config
        .routes()
        .filter(|r| !matches!(service, Service::Lmtp | Service::Smtp) || service.carries(r))
        .find_map(tcp_hop)
}

/// The `inet:` addresses of the configured milters and policy servers.
fn filter_hops(config: &Config) -> impl Iterator<Item = std::net::SocketAddr> + '_ {
    let smtpd = &config.smtpd;
    smtpd.milters.iter().map(|m| &m.endpoint).chain(smtpd.policy.iter().map(|p| &p.endpoint)).filter_map(|e| match e {
        NextHop::Inet(addr) => Some(*addr),
        NextHop::Unix(_) => None,
    })
}

/// `[smtpd.auth] server`, when it is on TCP.
fn auth_hop(config: &Config) -> Option<std::net::SocketAddr> {
    match &config.smtpd.auth.server {
        Some(NextHop::Inet(addr)) => Some(*addr),
        _ => None,
    }
}

fn tcp_hop(route: &Route) -> Option<std::net::SocketAddr> {
    match route {
        Route::Lmtp(NextHop::Inet(addr)) | Route::Smtp(addr) => Some(*addr),
        _ => None,
    }
}

fn io(result: std::io::Result<()>) -> String {
    match result {
        Ok(()) => "allowed".into(),
        Err(e) => match e.raw_os_error() {
            Some(n) => format!("denied {}", nix::errno::Errno::from_raw(n)),
            None => format!("error {e}"),
        },
    }
}

fn nix(result: nix::Result<()>) -> String {
    match result {
        Ok(()) => "allowed".into(),
        Err(e) => format!("denied {e}"),
    }
}

/// Creates and removes a file in `dir`.
fn write_in(dir: &Path) -> String {
    let path = dir.join(format!("{PROBE_FILE}.{}", std::process::id()));
    let result = fs::OpenOptions::new().write(true).create_new(true).open(&path);
    let verdict = io(result.map(drop));
    if verdict == "allowed" {
        let _ = fs::remove_file(&path);
    }
    verdict
}

/// Creates a file in `from` and renames it into `to` (Landlock's refer
/// right, on top of write access to both).
fn move_into(from: &Path, to: &Path) -> String {
    let name = format!("{PROBE_FILE}.{}", std::process::id());
    let (source, target) = (from.join(&name), to.join(&name));
    let created = fs::OpenOptions::new().write(true).create_new(true).open(&source).map(drop);
    let verdict = io(created.and_then(|()| fs::rename(&source, &target)));
    let _ = fs::remove_file(&source);
    let _ = fs::remove_file(&target);
    verdict
}

/// One row of the table.
#[derive(Debug, Clone)]
struct Row {
    attempt: Attempt,
    expect: Expect,
    result: String,
    ok: bool,
}

/// The errors that mean "refused by a restriction"; anything else is a
/// malfunction of the probe, not a proof.
const DENIALS: [&str; 4] = ["EACCES", "EPERM", "ENOENT", "EAFNOSUPPORT"];

fn judge(expect: Expect, status: ExitStatus, stdout: &str) -> (String, bool) {
    if status.signal() == Some(Signal::SIGSYS as i32) {
        return ("denied: killed by seccomp (SIGSYS)".into(), expect == Expect::Denied);
    }
    let line = stdout.lines().next().unwrap_or_default().trim();
    if let Some(errno) = line.strip_prefix("denied ") {
        let name = errno.split(':').next().unwrap_or(errno);
        let refused = DENIALS.contains(&name);
        let text = if refused { format!("denied: {errno}") } else { format!("error: {errno}") };
        return (text, refused && expect == Expect::Denied);
    }
    if line.starts_with("allowed") {
        let detail = line.strip_prefix("allowed").unwrap_or_default().trim();
        let text = if detail.is_empty() { "allowed".into() } else { format!("allowed: {detail}") };
        return (text, expect == Expect::Allowed);
    }
    if line.is_empty() && status.success() {
        // The probe was replaced by the program it tried to run.
        return ("allowed: the probe was replaced (exec succeeded)".into(), expect == Expect::Allowed);
    }
    (format!("error: {line} ({status})"), false)
}

/// Runs every attempt meaningful for `service`; returns the exit status.
fn orchestrate(service: Service, config_path: &Path) -> u8 {
    let config_path = match std::path::absolute(config_path) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("fatal: {}: {e}", config_path.display());
            return USAGE;
        }
    };
    let config = match load(&config_path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let fixtures = match Fixtures::set_up(&config) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("fatal: sandbox self-test set-up: {e}");
            return FAILED;
        }
    };
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            eprintln!("fatal: own executable: {e}");
            return FAILED;
        }
    };
    let root = Uid::effective().is_root();
    println!("mortal-{} sandbox self-test ({})", service.name(), if root { "as root" } else { "not root" });
    if !root {
        println!("note: not started as root: the privilege drop and smtpd's chroot need root and are not exercised");
    }
    // smtpd's seccomp allow-list stops nearly every attempt first; a
    // second run without it shows that the chroot, the user and Landlock
    // would stop them too. Information only: seccomp is part of smtpd's
    // sandbox, and the verdict is the first column's.
    let layered = service == Service::Smtpd;
    if layered {
        println!("{:<44} {:<9} {:<40} without seccomp (other layers alone)", "attempt", "expected", "result");
    } else {
        println!("{:<44} {:<9} result", "attempt", "expected");
    }
    let mut rows = Vec::new();
    for attempt in ATTEMPTS {
        let Some(expect) = attempt.expect(service, root) else { continue };
        // Without a TCP next hop in the routes there is nothing to reach.
        if attempt == Attempt::ConnectNextHop && next_hop(service, &config).is_none() {
            continue;
        }
        // Nor without an inet: milter or policy server.
        if attempt == Attempt::ConnectFilter && filter_hops(&config).next().is_none() {
            continue;
        }
        // Nor without an inet: AUTH server.
        if attempt == Attempt::ConnectAuth && auth_hop(&config).is_none() {
            continue;
        }
        let outcome = |layers| match run_probe(&exe, attempt, fixtures.port, layers, &config_path) {
            Ok((status, stdout, stderr)) => {
                let (result, ok) = judge(expect, status, &stdout);
                (result, ok, stderr)
            }
            Err(e) => (format!("error: {e}"), false, String::new()),
        };
        let (result, ok, stderr) = outcome(ALL_LAYERS);
        let expected = if expect == Expect::Allowed { "allowed" } else { "denied" };
        let mark = if ok { "" } else { "   <-- WRONG" };
        if layered && attempt != Attempt::Applied {
            let (alone, _, _) = outcome(NO_SECCOMP);
            println!("{:<44} {:<9} {result:<40} {alone}{mark}", attempt.describe(), expected);
        } else {
            println!("{:<44} {:<9} {result}{mark}", attempt.describe(), expected);
        }
        if !ok && !stderr.trim().is_empty() {
            for line in stderr.lines() {
                println!("    | {line}");
            }
        }
        rows.push(Row { attempt, expect, result, ok });
    }
    // The same attempts from a zygote's child: what `spawn = "fork"` runs.
    println!("{FORKED_TABLE}");
    for row in rows.clone() {
        let (result, ok, stderr) = match run_probe(&exe, row.attempt, fixtures.port, FORKED, &config_path) {
            Ok((status, stdout, stderr)) => {
                let (result, ok) = judge(row.expect, status, &stdout);
                (result, ok, stderr)
            }
            Err(e) => (format!("error: {e}"), false, String::new()),
        };
        let expected = if row.expect == Expect::Allowed { "allowed" } else { "denied" };
        let mark = if ok { "" } else { "   <-- WRONG" };
        println!("{:<44} {:<9} {result}{mark}", row.attempt.describe(), expected);
        if !ok && !stderr.trim().is_empty() {
            for line in stderr.lines() {
                println!("    | {line}");
            }
        }
        rows.push(Row { result, ok, ..row });
    }
    drop(fixtures);
    let wrong: Vec<&Row> = rows.iter().filter(|r| !r.ok).collect();
    println!(
        "{}: {} attempts, {} as expected, {} wrong",
        service.name(),
        rows.len(),
        rows.len() - wrong.len(),
        wrong.len()
    );
    for row in &wrong {
        tracing::debug!("{:?} expected {:?}, got {}", row.attempt, row.expect, row.result);
    }
    if wrong.is_empty() { 0 } else { FAILED }
}

fn run_probe(
    exe: &Path,
    attempt: Attempt,
    port: u16,
    layers: &str,
    config: &Path,
) -> std::io::Result<(ExitStatus, String, String)> {
    let mut child = Command::new(exe)
        .arg(PROBE_FLAG)
        .arg(attempt.name())
        .arg(port.to_string())
        .arg(layers)
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let deadline = Instant::now() + PROBE_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "probe timed out and was killed"));
        }
        std::thread::sleep(PROBE_POLL);
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    let mut status = status;
    if let Some(out) = child.stdout.take() {
        let mut out = std::io::BufReader::new(out);
        if layers == FORKED {
            // The zygote printed its child's pid, which is ours to reap. A
            // zygote that did not get there proves nothing of the child
            // (its death by SIGSYS is not a denied attempt).
            // The child may have printed before it: the zygote's line is
            // in the pipe already (the zygote has exited), after whatever
            // came first.
            let mut forked = None;
            let mut line = String::new();
            while forked.is_none() && out.read_line(&mut line)? > 0 {
                match line.strip_prefix(FORKED_LINE).and_then(|pid| pid.trim().parse::<i32>().ok()) {
                    Some(pid) => forked = Some(pid),
                    None => stdout.push_str(&line),
                }
                line.clear();
            }
            match forked {
                Some(pid) if status.success() => status = wait_forked(nix::unistd::Pid::from_raw(pid), deadline)?,
                _ => {
                    return Err(std::io::Error::other(format!(
                        "the zygote did not fork ({status}): {}",
                        stdout.trim()
                    )));
                }
            }
        }
        out.read_to_string(&mut stdout)?;
    }
    if let Some(mut err) = child.stderr.take() {
        err.read_to_string(&mut stderr)?;
    }
    Ok((status, stdout, stderr))
}

/// Waits for a forked probe, the zygote's child and this process's own
/// (`CLONE_PARENT`), until `deadline`; kills it past that.
fn wait_forked(pid: nix::unistd::Pid, deadline: Instant) -> std::io::Result<ExitStatus> {
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    loop {
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)).map_err(std::io::Error::from)? {
            WaitStatus::Exited(_, code) => return Ok(ExitStatus::from_raw((code & 0xff) << 8)),
            WaitStatus::Signaled(_, signal, _) => return Ok(ExitStatus::from_raw(signal as i32)),
            _ => {}
        }
        if Instant::now() >= deadline {
            let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
            let _ = waitpid(pid, None);
            return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "forked probe timed out and was killed"));
        }
        std::thread::sleep(PROBE_POLL);
    }
}

/// What the probes need around them: the directories the master would
/// create, listeners at the private sockets (unless a running master has
/// them), and a TCP listener for the connect attempt. Removed on drop.
struct Fixtures {
    port: u16,
    _tcp: TcpListener,
    /// Listeners on the configured TCP next hops, milters and policy
    /// servers that were free.
    _hops: Vec<TcpListener>,
    sockets: Vec<(PathBuf, UnixListener)>,
}

impl Fixtures {
    fn set_up(config: &Config) -> Result<Self, String> {
        // The spool root and the run directory are open to search, as the
        // master makes them; what is below them is not.
        let mut dirs: Vec<(PathBuf, u32)> =
            vec![(config.server.spool_dir.clone(), OPEN_DIR_MODE), (config.run_dir().to_owned(), OPEN_DIR_MODE)];
        dirs.extend(QueueDir::ALL.map(|q| (config.spool().dir(q), DIR_MODE)));
        dirs.push((config.private_dir(), DIR_MODE));
        if config.postscreen.enabled {
            dirs.push((config.postscreen_cache_dir(), DIR_MODE));
        }
        if config.maildir_root().starts_with(&config.server.spool_dir) {
            dirs.push((config.maildir_root().to_owned(), DIR_MODE));
        }
        for (dir, mode) in &dirs {
            DirBuilder::new()
                .recursive(true)
                .mode(*mode)
                .create(dir)
                .map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
        }
        let user = mail_user(config).map_err(|e| e.to_string())?;
        if let Some(user) = &user {
            own_dirs(config, user).map_err(|e| e.to_string())?;
        }
        let mut sockets = Vec::new();
        for path in [config.cleanup_socket(), config.queue_socket(), config.agent_socket(Service::Pipe)] {
            if fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_socket())
                && UnixStream::connect(&path).is_ok()
            {
                continue;
            }
            let _ = fs::remove_file(&path);
            let listener = UnixListener::bind(&path).map_err(|e| format!("bind {}: {e}", path.display()))?;
            fs::set_permissions(&path, fs::Permissions::from_mode(SOCKET_MODE)).map_err(|e| e.to_string())?;
            if let Some(user) = &user {
                nix::unistd::chown(&path, Some(user.uid), Some(user.gid)).map_err(|e| e.to_string())?;
            }
            sockets.push((path, listener));
        }
        let tcp = TcpListener::bind(("127.0.0.1", 0)).map_err(|e| format!("bind 127.0.0.1:0: {e}"))?;
        let port = tcp.local_addr().map_err(|e| e.to_string())?.port();
        // A next hop that is already taken has a listener: the real one.
        let hops = config
            .routes()
            .filter_map(tcp_hop)
            .chain(filter_hops(config))
            .chain(auth_hop(config))
            .filter_map(|addr| TcpListener::bind(addr).ok())
            .collect();
        Ok(Fixtures { port, _tcp: tcp, _hops: hops, sockets })
    }
}

impl Drop for Fixtures {
    fn drop(&mut self) {
        for (path, _) in &self.sockets {
            let _ = fs::remove_file(path);
        }
    }
}

//! sandbox: privilege separation and a kernel sandbox for each daemon.
//!
//! # Summary
//! Each daemon states what it may do as a [`Needs`] value (a `needs`
//! function in its own crate: `mortal_smtpd`'s `main`, `mortal_cleanup`'s,
//! ..., `mortal_smtp::needs`); this module knows no daemon's rules and
//! only applies them. [`crate::daemon::run`] enters the sandbox once per
//! child, after exec and after loading what it needs (configuration, TLS
//! key, recipient map) and before it touches any input. In this order it:
//!
//! 1. when started as root: looks up the user of [`Needs::run_as`]
//!    (`[server] user`, default [`DEFAULT_USER`]; or `[delivery.pipe]
//!    user`, which must be neither root nor the mail user), chroots into
//!    the private socket directory when [`Needs::chroot_private`], then
//!    `setgroups([gid])`, `setgid`, `setuid`, and checks that the drop
//!    cannot be undone (`setuid(0)` must fail); as any other user
//!    (development mode) the identity stays, and says so once at debug;
//! 2. sets `PR_SET_NO_NEW_PRIVS`, turns core dumps off (`RLIMIT_CORE` 0,
//!    and `PR_SET_DUMPABLE` 0 after a drop from root) and bounds
//!    `RLIMIT_NOFILE` to [`Needs::nofile`];
//! 3. restricts itself with Landlock ([`Landlock`]): either every file
//!    system and TCP access is handled and only the stated directories
//!    and TCP connect ports are allowed, or (pipe, whose command's needs
//!    are the operator's) only the signal and abstract-socket scopes apply;
//! 4. installs a seccomp filter ([`Seccomp`]): the allow-list written for
//!    smtpd, whose every other system call kills the process, or the
//!    deny-list of the system calls no mail daemon needs (ptrace, mount,
//!    namespaces, module and key management...), optionally also denying
//!    running a program and creating a process.
//!
//! What the daemons state today:
//!
//! | service | identity (root start) | file system | network | seccomp |
//! |---|---|---|---|---|
//! | smtpd | mail user, chroot `<run_dir>/private` | nothing | no TCP bind/connect (with `inet:` milters or policy servers: connect to their ports only); `socket()` only `AF_UNIX` (and then `AF_INET`/`AF_INET6` stream) | allow-list, kill |
//! | cleanup | mail user | `spool/incoming`, `spool/hold` | no TCP | deny-list, kill |
//! | queue | mail user | spool, maildir root | no TCP | deny-list (also execve, fork), kill |
//! | lmtp, smtp | mail user | nothing (a Unix-socket LMTP hop is reached by connect, which needs no file right) | TCP connect to the ports of its own routes' next hops | deny-list (also execve, fork), kill |
//! | anvil | mail user, chroot `<run_dir>/private` | nothing | no TCP | deny-list (also execve), kill |
//! | pipe | `[delivery.pipe] user` | not restricted (the command's) | not restricted | deny-list, kill |
//!
//! # Security
//! The layers are independent: a kernel without Landlock still has the
//! chroot, the uid and seccomp; one without seccomp still has the others.
//! What the kernel lacks is logged as a `warning:` at every child start,
//! never skipped silently. A violation of smtpd's allow-list kills the
//! whole process (`SECCOMP_RET_KILL_PROCESS`) rather than returning an
//! error: smtpd is the process that faces hostile input, an unexpected
//! system call there is an exploit in progress or a bug that must be
//! seen, and death is cheap under the Mortal Daemon pattern (the master
//! logs the signal and spawns a fresh child). The one exception is
//! `clone3` in cleanup and queue, which answers `ENOSYS` so the C library
//! falls back to `clone`, whose flags seccomp can inspect (no new
//! namespaces).
//!
//! A daemon binary started as `mortal-<service> --sandbox-selftest
//! --config PATH` proves each restriction from inside a real sandboxed
//! process ([`selftest`]); the master never passes those arguments, so
//! the self-test cannot be reached from the network.
//!
//! # Configuration
//! `[server] user` (the unprivileged user when the master starts as
//! root), `run_dir`, `spool_dir`; `[delivery]` `maildir_root` shapes the
//! queue's rules and the routes the lmtp and smtp agents'; `[delivery.pipe]
//! user` is who the pipe service runs as.
//!
//! # Diagnostics
//! `fatal: sandbox: ...` and exit status 1 when a step fails (the master
//! counts that as a bad start); `warning: sandbox: ...` when the kernel
//! lacks a layer; one debug line with what was applied.

pub mod seccomp;
pub mod selftest;

use landlock::{
    ABI, Access, AccessFs, AccessNet, CompatLevel, Compatible, NetPort, PathBeneath, PathFd, Ruleset, RulesetAttr,
    RulesetCreatedAttr, RulesetStatus, Scope,
};
use mortal_proto::config::{Config, DEFAULT_SERVER_USER};
use mortal_proto::spool::QueueDir;
use nix::sys::resource::{Resource, getrlimit, setrlimit};
use nix::unistd::{Gid, Uid, User};
use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use thiserror::Error;

/// The unprivileged user the daemons run as when `[server] user` is unset
/// and the master starts as root.
pub const DEFAULT_USER: &str = DEFAULT_SERVER_USER;
/// The Landlock ABI whose rights mortal asks for: the newest one it was
/// tested on (Linux 6.15). Newer kernels enforce exactly these rights;
/// older ones enforce what they know, and a warning says what is missing.
pub const LANDLOCK_ABI: ABI = ABI::V7;
/// Mode of the private socket directory when the master runs as root:
/// root may change it, the mail group may only pass through it to the
/// sockets it knows the names of.
pub const PRIVATE_DIR_ROOT_MODE: u32 = 0o710;
/// Queue directories, the Maildir root and the private sockets belong to
/// the mail user, owner only.
pub const MAIL_USER_MODE: u32 = 0o700;
/// Queue directories: the mail user writes; its group (the operators who
/// may read the queue with `mortal queue list/show`) reads.
pub const QUEUE_DIR_MODE: u32 = mortal_proto::spool::QUEUE_DIR_MODE;

/// The daemons that sandbox themselves: every service the master runs
/// (re-exported for the daemons' start-up code).
pub use mortal_proto::service::Service;

/// What one daemon may do inside its sandbox: stated by the daemon itself
/// (each daemon crate's `needs`), applied by [`enter`]. The layers are the
/// module documentation's; this value is only the daemon-specific part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Needs {
    /// Who the daemon runs as when the master starts as root.
    pub run_as: RunAs,
    /// Whether it is chrooted into the private socket directory (root
    /// start only): for daemons that need nothing but sockets there.
    pub chroot_private: bool,
    /// Its descriptor limit (`RLIMIT_NOFILE`, soft and hard).
    pub nofile: u64,
    /// What Landlock lets it reach.
    pub landlock: Landlock,
    /// Which seccomp filter it runs under.
    pub seccomp: Seccomp,
}

/// The identity a daemon drops to under a root master.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunAs {
    /// `[server] user` ([`mail_user`]).
    MailUser,
    /// `[delivery.pipe] user` ([`pipe_user`]): neither root nor the mail user.
    PipeUser,
}

/// The daemon's Landlock ruleset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Landlock {
    /// Every file-system and TCP access Landlock knows is handled: the
    /// daemon may use the directories in `read_write` (everything but
    /// running a program there) and connect to the TCP ports in
    /// `tcp_connect`, and nothing else; the signal and abstract-socket
    /// scopes apply too. Both empty: no file, no directory, no TCP port.
    Rules { read_write: Vec<PathBuf>, tcp_connect: Vec<u16> },
    /// Only the scopes (no signal to, no abstract socket of, a process
    /// outside this one's domain): for a daemon whose files and ports are
    /// the operator's, which mortal cannot know.
    ScopesOnly,
}

/// The daemon's seccomp filter ([`seccomp`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seccomp {
    /// The allow-list written for smtpd's sessions: every other system
    /// call kills the process. `dns` adds what reverse lookups need;
    /// `tcp_client` adds TCP sockets (`AF_INET`/`AF_INET6`, stream only)
    /// for the milters and policy servers on `inet:` endpoints, whose
    /// ports Landlock then allows and no other; `receive_sockets` adds
    /// `recvmsg`, for the children that take clients postscreen passes on
    /// (`SCM_RIGHTS`; never `sendmsg`).
    AllowList { dns: bool, tcp_client: bool, receive_sockets: bool },
    /// The deny-list of system calls no mail daemon makes, which kill the
    /// process; `may_exec: false` also denies running a program,
    /// `may_fork: false` creating a process (threads stay allowed).
    DenyList { may_exec: bool, may_fork: bool },
}

/// Why a sandbox could not be entered; every variant ends the process.
#[derive(Debug, Error)]
pub enum SandboxError {
    #[error(
        "user {0:?} does not exist: started as root, the daemons drop to [server] user (default \"mortal\"): create it (useradd --system {0}) or set [server] user"
    )]
    NoSuchUser(String),
    #[error("user {0:?} (server.user) is root: the daemons must run unprivileged")]
    RootUser(String),
    #[error(
        "[delivery.pipe] user is not set: started as root with a pipe route, the pipe service needs the unprivileged user the command runs as"
    )]
    NoPipeUser,
    #[error("user {0:?} ([delivery.pipe] user) does not exist: create it or name an existing unprivileged user")]
    NoSuchPipeUser(String),
    #[error(
        "user {0:?} ([delivery.pipe] user) is root or the mail user: the pipe command must run with neither's rights"
    )]
    PipeUserPrivileged(String),
    #[error("look up user {0:?}: {1}")]
    Lookup(String, nix::Error),
    #[error("{step}: {source}")]
    Step { step: &'static str, source: nix::Error },
    #[error("privilege drop is reversible: {0} succeeded after the drop")]
    Reversible(&'static str),
    #[error("sandbox entered with {0} threads: it must be entered while the process is single-threaded")]
    Threads(usize),
    #[error("landlock: {0}")]
    Landlock(#[from] landlock::RulesetError),
    #[error("landlock rule for {path}: {source}")]
    LandlockPath { path: PathBuf, source: landlock::PathFdError },
    #[error("seccomp: {0}")]
    Seccomp(#[from] seccompiler::Error),
    #[error("seccomp filter: {0}")]
    SeccompBackend(#[from] seccompiler::BackendError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

fn step(step: &'static str) -> impl FnOnce(nix::Error) -> SandboxError {
    move |source| SandboxError::Step { step, source }
}

/// The user the daemons run as, resolved.
#[derive(Debug, Clone)]
pub struct MailUser {
    pub name: String,
    pub uid: Uid,
    pub gid: Gid,
}

/// The configured mail user when this process runs as root (the only case
/// where identities change); `None` in development mode. Fails when the
/// user does not exist or is root, so the master refuses to start.
pub fn mail_user(config: &Config) -> Result<Option<MailUser>, SandboxError> {
    if !Uid::effective().is_root() {
        return Ok(None);
    }
    let name = config.server.user.as_str();
    let user = User::from_name(name)
        .map_err(|e| SandboxError::Lookup(name.into(), e))?
        .ok_or_else(|| SandboxError::NoSuchUser(name.into()))?;
    if user.uid.is_root() {
        return Err(SandboxError::RootUser(name.into()));
    }
    Ok(Some(MailUser { name: name.into(), uid: user.uid, gid: user.gid }))
}

/// The user the pipe service runs as when this process runs as root:
/// `[delivery.pipe] user`, which must exist and be neither root nor the
/// mail user (whose rights over the spool the operator's command must not
/// get, as Postfix's pipe(8) refuses both). `None` in development mode.
pub fn pipe_user(config: &Config) -> Result<Option<MailUser>, SandboxError> {
    let Some(mail) = mail_user(config)? else { return Ok(None) };
    let name = config.delivery.pipe.user.as_deref().ok_or(SandboxError::NoPipeUser)?;
    let user = User::from_name(name)
        .map_err(|e| SandboxError::Lookup(name.into(), e))?
        .ok_or_else(|| SandboxError::NoSuchPipeUser(name.into()))?;
    if user.uid.is_root() || user.uid == mail.uid {
        return Err(SandboxError::PipeUserPrivileged(name.into()));
    }
    Ok(Some(MailUser { name: name.into(), uid: user.uid, gid: user.gid }))
}

/// The root smtpd chrooted to, once it has.
static CHROOT: OnceLock<PathBuf> = OnceLock::new();

/// How `path` is reached from inside this process's sandbox: below the
/// chroot directory it loses that prefix (`<run_dir>/private/cleanup`
/// becomes `/cleanup` in smtpd); anything else is unchanged. Every path a
/// daemon uses after [`enter`] goes through here.
pub fn visible_path(path: &Path) -> PathBuf {
    match CHROOT.get().and_then(|root| path.strip_prefix(root).ok()) {
        Some(rest) => Path::new("/").join(rest),
        None => path.to_owned(),
    }
}

/// What [`enter`] applied, for the log and the self-test. Only [`enter`]
/// makes one, so a value of it proves the sandbox is in place
/// ([`crate::daemon::Started`] carries it to the daemon's serve step).
#[derive(Debug)]
#[non_exhaustive]
pub struct Applied {
    pub user: Option<String>,
    pub chroot: Option<PathBuf>,
    pub landlock: RulesetStatus,
    /// System calls in the allow-list (smtpd) or deny-list (others).
    pub seccomp_rules: usize,
}

/// Drops privileges and applies `needs`, what `service` stated, to this
/// process, as described in the module documentation. Called once,
/// single-threaded, after loading every file the service needs and before
/// any input: [`crate::daemon::run`] keeps that order.
pub(crate) fn enter(service: Service, config: &Config, needs: &Needs) -> Result<Applied, SandboxError> {
    enter_layers(service, config, needs, true)
}

/// [`enter`], optionally without the seccomp filter: only the self-test
/// leaves it out, to show what the other layers hold on their own.
pub(crate) fn enter_layers(
    service: Service,
    config: &Config,
    needs: &Needs,
    with_seccomp: bool,
) -> Result<Applied, SandboxError> {
    Plan::new(config, needs, with_seccomp)?.apply(service, config)
}

/// What [`enter`] works out before it changes anything: the user looked
/// up, the Landlock ruleset created (its rule descriptors open) and the
/// seccomp filters compiled.
#[derive(Debug)]
pub(crate) struct Plan {
    user: Option<MailUser>,
    chroot_private: bool,
    nofile: u64,
    ruleset: landlock::RulesetCreated,
    filters: Filters,
}

/// Where a [`Plan`]'s seccomp filters stand.
#[derive(Debug)]
enum Filters {
    /// None: the self-test's run of the other layers alone.
    Off,
    /// Compiled; [`Plan::apply`] installs them.
    Pending(seccomp::Compiled),
}

impl Plan {
    pub(crate) fn new(config: &Config, needs: &Needs, with_seccomp: bool) -> Result<Plan, SandboxError> {
        let filters =
            if with_seccomp { Filters::Pending(seccomp::compile_profile(needs.seccomp)?) } else { Filters::Off };
        Self::with_filters(config, needs, filters)
    }

    /// The plan a zygote applies to itself before its first fork: every
    /// layer its children will hold, with the seccomp filters loosened
    /// by what the zygote and a child's first steps still need
    /// ([`seccomp::compile_zygote`]); each child takes that back with
    /// [`seal_fork`].
    pub(crate) fn for_zygote(config: &Config, needs: &Needs) -> Result<Plan, SandboxError> {
        Self::with_filters(config, needs, Filters::Pending(seccomp::compile_zygote(needs.seccomp)?))
    }

    fn with_filters(config: &Config, needs: &Needs, filters: Filters) -> Result<Plan, SandboxError> {
        // Landlock rules hold descriptors opened now, before a chroot could
        // hide their paths.
        let ruleset = landlock_rules(&needs.landlock)?;
        let user = match needs.run_as {
            RunAs::MailUser => mail_user(config)?,
            RunAs::PipeUser => pipe_user(config)?,
        };
        Ok(Plan { user, chroot_private: needs.chroot_private, nofile: needs.nofile, ruleset, filters })
    }

    /// Applies the plan to this process, as [`enter`] says.
    pub(crate) fn apply(self, service: Service, config: &Config) -> Result<Applied, SandboxError> {
        // Without /proc we cannot tell; the daemons apply the plan before
        // they start any thread, and this check only guards that order.
        let threads = thread_count().unwrap_or(1);
        if threads > 1 {
            return Err(SandboxError::Threads(threads));
        }
        let Plan { user, chroot_private, nofile, ruleset, filters } = self;
        let mut chroot = None;
        match &user {
            Some(user) => {
                if chroot_private {
                    let root = config.private_dir();
                    nix::unistd::chroot(&root).map_err(step("chroot"))?;
                    nix::unistd::chdir("/").map_err(step("chdir /"))?;
                    let _ = CHROOT.set(root.clone());
                    // socketmap tables reach their unix sockets the same way.
                    mortal_proto::socketmap::set_reach(visible_path);
                    chroot = Some(root);
                }
                drop_privileges(user)?;
            }
            None => {
                tracing::debug!("sandbox: running as uid {} (not root): no user change, no chroot", Uid::effective())
            }
        }
        limit_process(nofile)?;
        let landlock = restrict(ruleset)?;
        let seccomp_rules = match filters {
            Filters::Off => 0,
            Filters::Pending(compiled) => seccomp::install(compiled)?,
        };
        let applied = Applied { user: user.map(|u| u.name), chroot, landlock, seccomp_rules };
        tracing::debug!(
            "sandbox: {}: user={} chroot={} landlock={:?} seccomp={} rules",
            service.name(),
            applied.user.as_deref().unwrap_or("(unchanged)"),
            applied.chroot.as_deref().map_or_else(|| "(none)".into(), |p| p.display().to_string()),
            applied.landlock,
            applied.seccomp_rules
        );
        Ok(applied)
    }
}

/// The last step of a forked child's sandbox: its zygote entered every
/// layer before the fork ([`Plan::for_zygote`]); the child denies itself
/// what the zygote's filters allowed beyond `needs` (its fork, its
/// requests, the child's own start), so it holds what an exec'd child of
/// the same service holds.
pub(crate) fn seal_fork(needs: &Needs, zygote: &Applied) -> Result<(), SandboxError> {
    // A kernel without seccomp filters: the zygote installed none (and
    // said so), there is nothing to take back.
    if zygote.seccomp_rules == 0 {
        return Ok(());
    }
    seccomp::install_tail(needs.seccomp)
}

/// Threads of this process, from `/proc/self/status`; `None` when that
/// cannot be read.
pub(crate) fn thread_count() -> Option<usize> {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Threads:")?.trim().parse().ok()))
}

fn drop_privileges(user: &MailUser) -> Result<(), SandboxError> {
    nix::unistd::setgroups(&[user.gid]).map_err(step("setgroups"))?;
    nix::unistd::setgid(user.gid).map_err(step("setgid"))?;
    nix::unistd::setuid(user.uid).map_err(step("setuid"))?;
    // setuid as root sets all three uids; prove it, as Postfix does.
    if nix::unistd::setuid(Uid::from_raw(0)).is_ok() {
        return Err(SandboxError::Reversible("setuid(0)"));
    }
    if nix::unistd::setgid(Gid::from_raw(0)).is_ok() {
        return Err(SandboxError::Reversible("setgid(0)"));
    }
    if Uid::current() != user.uid || Uid::effective() != user.uid {
        return Err(SandboxError::Reversible("a uid other than the mail user's"));
    }
    // The kernel already clears it on a credential change; say it anyway,
    // so nothing of this process (memory, descriptors) is open to another
    // process of the mail user.
    nix::sys::prctl::set_dumpable(false).map_err(step("PR_SET_DUMPABLE"))
}

fn limit_process(nofile: u64) -> Result<(), SandboxError> {
    nix::sys::prctl::set_no_new_privs().map_err(step("PR_SET_NO_NEW_PRIVS"))?;
    // A core file would hold mail and TLS keys.
    setrlimit(Resource::RLIMIT_CORE, 0, 0).map_err(step("RLIMIT_CORE"))?;
    // Both limits: the hard one so a compromised daemon cannot raise its
    // soft limit back.
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(step("getrlimit RLIMIT_NOFILE"))?;
    let limit = nofile.min(hard);
    setrlimit(Resource::RLIMIT_NOFILE, limit, limit).map_err(step("RLIMIT_NOFILE"))
}

/// The Landlock ruleset `landlock` describes, with its rule descriptors
/// open.
fn landlock_rules(landlock: &Landlock) -> Result<landlock::RulesetCreated, SandboxError> {
    let (read_write, tcp_connect) = match landlock {
        Landlock::ScopesOnly => {
            return Ok(Ruleset::default()
                .set_compatibility(CompatLevel::BestEffort)
                .scope(Scope::from_all(LANDLOCK_ABI))?
                .create()?);
        }
        Landlock::Rules { read_write, tcp_connect } => (read_write, tcp_connect),
    };
    let fs_all = AccessFs::from_all(LANDLOCK_ABI);
    // Everything but running programs: what a daemon needs in the
    // directories it owns.
    let fs_rw = fs_all & !AccessFs::Execute;
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(fs_all)?
        .handle_access(AccessNet::from_all(LANDLOCK_ABI))?
        .scope(Scope::from_all(LANDLOCK_ABI))?
        .create()?;
    for path in read_write {
        let fd = PathFd::new(path).map_err(|source| SandboxError::LandlockPath { path: path.to_owned(), source })?;
        ruleset = ruleset.add_rule(PathBeneath::new(fd, fs_rw))?;
    }
    let mut ports = tcp_connect.clone();
    ports.sort_unstable();
    ports.dedup();
    for port in ports {
        ruleset = ruleset.add_rule(NetPort::new(port, AccessNet::ConnectTcp))?;
    }
    Ok(ruleset)
}

/// What the master logs once at start when the pipe service exists.
pub const PIPE_LANDLOCK_WARNING: &str = "warning: sandbox: pipe: the [delivery.pipe] command needs files and ports mortal cannot know, so the pipe service runs without Landlock file and network rules (its own user, signal scope, no_new_privs and seccomp still apply)";

fn restrict(ruleset: landlock::RulesetCreated) -> Result<RulesetStatus, SandboxError> {
    let status = ruleset.restrict_self()?;
    match status.ruleset {
        RulesetStatus::FullyEnforced => {}
        RulesetStatus::PartiallyEnforced => tracing::warn!(
            "warning: sandbox: this kernel enforces Landlock only in part (ABI {:?} wanted): some file, network or signal restrictions are missing",
            LANDLOCK_ABI
        ),
        RulesetStatus::NotEnforced => tracing::warn!(
            "warning: sandbox: this kernel does not enforce Landlock ({:?}): no file system, network or signal restriction beyond uid, chroot and seccomp",
            status.landlock
        ),
    }
    Ok(status.ruleset)
}

/// Gives the mail user the directories the daemons write and the private
/// sockets they connect to; keeps the spool root, the run directory and
/// the private directory root's (the private directory is `0710` with the
/// mail user's group, so no daemon can replace a socket in it), and hands
/// over the queue files a root-run or older install left behind.
pub fn own_dirs(config: &Config, user: &MailUser) -> Result<(), SandboxError> {
    let chown = |path: &Path, uid: Uid, gid: Gid, mode: u32| -> Result<(), SandboxError> {
        let io = |source| SandboxError::Io { path: path.to_owned(), source };
        nix::unistd::chown(path, Some(uid), Some(gid)).map_err(|e| io(e.into()))?;
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io)
    };
    let root = (Uid::from_raw(0), Gid::from_raw(0));
    for queue in QueueDir::ALL {
        let dir = config.spool().dir(queue);
        chown(&dir, user.uid, user.gid, QUEUE_DIR_MODE)?;
        let entries = fs::read_dir(&dir).map_err(|source| SandboxError::Io { path: dir.clone(), source })?;
        for entry in entries.flatten() {
            let owned = entry.metadata().is_ok_and(|m| m.uid() == user.uid.as_raw());
            if !owned && entry.file_type().is_ok_and(|t| t.is_file()) {
                nix::unistd::chown(&entry.path(), Some(user.uid), Some(user.gid))
                    .map_err(|e| SandboxError::Io { path: entry.path(), source: e.into() })?;
            }
        }
    }
    // The Maildir root is ours under the spool, or when the master just
    // made it (empty and root's); an operator's existing one elsewhere is
    // left as it is, with a warning if the queue cannot write it.
    let maildir = config.maildir_root();
    let meta = fs::metadata(maildir).map_err(|source| SandboxError::Io { path: maildir.to_owned(), source })?;
    let fresh = meta.uid() == 0 && fs::read_dir(maildir).is_ok_and(|mut d| d.next().is_none());
    if maildir.starts_with(&config.server.spool_dir) || fresh {
        chown(maildir, user.uid, user.gid, MAIL_USER_MODE)?;
    } else if meta.uid() != user.uid.as_raw() {
        tracing::warn!(
            "warning: {}: delivery.maildir_root belongs to uid {}, not to {}: Maildir delivery may fail",
            maildir.display(),
            meta.uid(),
            user.name
        );
    }
    // postscreen writes its cache for its successor there.
    let cache = config.postscreen_cache_dir();
    if cache.is_dir() {
        chown(&cache, user.uid, user.gid, MAIL_USER_MODE)?;
    }
    chown(&config.private_dir(), root.0, user.gid, PRIVATE_DIR_ROOT_MODE)
}

/// Hands every socket in the private directory to the mail user (mode
/// `0600`): the master binds them as root, the daemons connect as the
/// mail user. Call after binding, before spawning.
pub fn own_sockets(config: &Config, user: &MailUser) -> Result<(), SandboxError> {
    let dir = config.private_dir();
    let entries = fs::read_dir(&dir).map_err(|source| SandboxError::Io { path: dir.clone(), source })?;
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_socket()) {
            nix::unistd::chown(&entry.path(), Some(user.uid), Some(user.gid))
                .map_err(|e| SandboxError::Io { path: entry.path(), source: e.into() })?;
        }
    }
    Ok(())
}

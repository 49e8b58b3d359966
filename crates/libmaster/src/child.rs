//! The child side of the master protocol: the single-server loop.
//!
//! Descriptors a child inherits (set up by the master's spawner):
//!
//! | fd | what |
//! |----|------|
//! | 0  | the service's listening socket (TCP or Unix), shared by all its children |
//! | 1  | this child's own Unix stream socket to the master |
//! | 2  | the log (the master's stderr) |
//!
//! Idle children wait in `epoll` with `EPOLLEXCLUSIVE` on the shared
//! listener, so a new connection wakes one child, not the whole pool; the
//! accept itself is non-blocking, and a child that loses the race simply
//! waits again. The same epoll set watches the master socket: end of stream
//! means the master is gone, and an idle child then exits at once, so
//! `kill -9` of the master leaves nobody serving mail. A busy child notices
//! after its session.

use mortal_proto::service::Service;
use mortal_proto::status::{ChildState, MasterCommand, STATUS_LEN, StatusRecord};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::ExitCode;
use std::time::Duration;

/// A listening socket a child can take connections from.
pub trait Listener: AsFd {
    type Stream;
    fn accept_one(&self) -> io::Result<Self::Stream>;
    /// The listener a child inherited as its stdin.
    fn inherited() -> io::Result<Self>
    where
        Self: Sized;
}

impl Listener for TcpListener {
    type Stream = TcpStream;
    fn accept_one(&self) -> io::Result<TcpStream> {
        self.accept().map(|(s, _)| s)
    }
    fn inherited() -> io::Result<Self> {
        Ok(TcpListener::from(io::stdin().as_fd().try_clone_to_owned()?))
    }
}

impl Listener for UnixListener {
    type Stream = UnixStream;
    fn accept_one(&self) -> io::Result<UnixStream> {
        self.accept().map(|(s, _)| s)
    }
    fn inherited() -> io::Result<Self> {
        Ok(UnixListener::from(io::stdin().as_fd().try_clone_to_owned()?))
    }
}

/// This child's socket to the master.
#[derive(Debug)]
pub struct MasterLink {
    sock: UnixStream,
    sessions: u32,
    /// Wake-ups for the listener that found no connection to accept (the
    /// thundering-herd measure: with `EPOLLEXCLUSIVE` it stays near zero).
    spurious_wakeups: u64,
}

impl MasterLink {
    /// Adopts the master socket inherited as stdout; only the start-up
    /// sequence ([`crate::daemon::run`]) does, after the sandbox.
    pub(crate) fn inherited() -> io::Result<Self> {
        let fd: OwnedFd = io::stdout().as_fd().try_clone_to_owned()?;
        Ok(Self { sock: UnixStream::from(fd), sessions: 0, spurious_wakeups: 0 })
    }

    pub fn report(&mut self, state: ChildState) -> io::Result<()> {
        self.sock.write_all(&StatusRecord { state, sessions: self.sessions }.encode())
    }

    pub fn sessions(&self) -> u32 {
        self.sessions
    }

    /// Listener wake-ups that found nothing to accept.
    pub fn spurious_wakeups(&self) -> u64 {
        self.spurious_wakeups
    }

    /// Counts another use inside the current session: a delivery agent's
    /// next request on a connection the queue kept open. Reports BUSY, or
    /// RETIRING when it is the last of `max_use` (0: unlimited); returns
    /// whether it is the last. [`serve`] ends after a session in which
    /// the last use was counted, as after its own.
    pub fn another_use(&mut self, max_use: u32) -> io::Result<bool> {
        self.sessions += 1;
        let last = max_use != 0 && self.sessions >= max_use;
        self.report(if last { ChildState::Retiring } else { ChildState::Busy })?;
        Ok(last)
    }

    /// Whether the master has said something not yet read (an order to
    /// retire) or gone away, without consuming it: a session that could
    /// go on (a kept connection) ends instead, and [`serve`] then reads
    /// the order.
    pub fn has_order(&self) -> bool {
        let mut b = [0u8; 1];
        let flags = nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT;
        match nix::sys::socket::recv(self.sock.as_fd().as_raw_fd(), &mut b, flags) {
            Ok(_) => true,
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => false,
            Err(_) => true,
        }
    }

    /// Reads what the master sent: `Err(())` when the master is gone,
    /// `Ok(None)` for a spurious wake-up.
    fn read_command(&mut self) -> Result<Option<MasterCommand>, ()> {
        let mut b = [0u8; 1];
        match self.sock.read(&mut b) {
            Ok(1) => Ok(MasterCommand::decode(b[0])),
            Err(e) if e.kind() == io::ErrorKind::Interrupted || e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Ok(_) | Err(_) => Err(()),
        }
    }
}

/// The socket to the master, for a session that waits on it alongside its
/// own descriptors (a kept connection waits for the next request or an
/// order, whichever comes first).
impl AsFd for MasterLink {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

impl MasterLink {
    /// Blocks until the master retires this process or goes away; for
    /// daemons with their own event loop (the queue manager), run on a
    /// thread of its own after reporting [`ChildState::Ready`].
    pub fn wait_for_exit(mut self) -> ExitReason {
        loop {
            match self.read_command() {
                Err(()) => return ExitReason::MasterGone,
                Ok(Some(MasterCommand::Retire)) => return ExitReason::Retired,
                Ok(None) => {}
            }
        }
    }
}

/// Why [`serve`] returned: the child should exit after logging it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitReason {
    /// Served `max_use` sessions.
    MaxUse,
    /// The master asked this child to retire.
    Retired,
    /// The master socket closed: the master died or is shutting down.
    MasterGone,
}

impl ExitReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ExitReason::MaxUse => "max_use reached",
            ExitReason::Retired => "retired by master",
            ExitReason::MasterGone => "master gone",
        }
    }
}

const LISTENER: u64 = 1;
const MASTER: u64 = 2;
/// Pause after an accept error other than "someone else took it", so a
/// persistent error (EMFILE) cannot spin a core.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);
/// A status-record size check kept next to the loop that relies on it.
const _: () = assert!(STATUS_LEN == 8);

/// Runs the single-server loop: one connection at a time, `max_use`
/// sessions at most (0: unlimited), each handed to `handle`. Logs, at
/// debug level, `exit: <reason>; sessions=N spurious_wakeups=W` when it
/// returns a reason.
pub fn serve<L: Listener>(
    listener: &L,
    link: &mut MasterLink,
    max_use: u32,
    handle: impl FnMut(L::Stream, &mut MasterLink),
) -> io::Result<ExitReason> {
    let reason = serve_loop(listener, link, max_use, handle)?;
    tracing::debug!("exit: {}; sessions={} spurious_wakeups={}", reason.as_str(), link.sessions, link.spurious_wakeups);
    Ok(reason)
}

fn serve_loop<L: Listener>(
    listener: &L,
    link: &mut MasterLink,
    max_use: u32,
    mut handle: impl FnMut(L::Stream, &mut MasterLink),
) -> io::Result<ExitReason> {
    // Non-blocking accept: EPOLLEXCLUSIVE may still wake more than one
    // waiter, and the losers must go back to waiting, not block in accept.
    // The flag is on the shared open file description, which every child
    // sets identically.
    nix::fcntl::fcntl(listener.as_fd(), nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK))
        .map_err(io::Error::from)?;
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(io::Error::from)?;
    // The listener is in the set only while this child is idle: a busy
    // child's entry would still take its share of EPOLLEXCLUSIVE wake-ups
    // (the kernel queues the event on it and wakes another child too), and
    // find nothing to accept when its session is over.
    let listen = |epoll: &Epoll| {
        epoll
            .add(listener.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN | EpollFlags::EPOLLEXCLUSIVE, LISTENER))
            .map_err(io::Error::from)
    };
    listen(&epoll)?;
    epoll.add(link.sock.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, MASTER)).map_err(io::Error::from)?;
    link.report(ChildState::Ready)?;
    let mut events = [EpollEvent::empty(); 2];
    loop {
        let n = match epoll.wait(&mut events, EpollTimeout::NONE) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        };
        // The master socket first: a retire order beats a new connection.
        if events[..n].iter().any(|e| e.data() == MASTER) {
            match link.read_command() {
                Err(()) => return Ok(ExitReason::MasterGone),
                Ok(Some(MasterCommand::Retire)) => return Ok(ExitReason::Retired),
                Ok(None) => {}
            }
        }
        if !events[..n].iter().any(|e| e.data() == LISTENER) {
            continue;
        }
        let stream = match listener.accept_one() {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // Another child took it: the wake-up was for nothing.
                link.spurious_wakeups += 1;
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!("warning: accept: {e}");
                std::thread::sleep(ACCEPT_ERROR_BACKOFF);
                continue;
            }
        };
        link.sessions += 1;
        epoll.delete(listener.as_fd()).map_err(io::Error::from)?;
        let last = max_use != 0 && link.sessions >= max_use;
        // Replace before retire: the master spawns our successor while we
        // serve the last session, so capacity does not dip.
        link.report(if last { ChildState::Retiring } else { ChildState::Busy })?;
        handle(stream, link);
        // The session may have counted further uses (`another_use`).
        if last || (max_use != 0 && link.sessions >= max_use) {
            return Ok(ExitReason::MaxUse);
        }
        listen(&epoll)?;
        link.report(ChildState::Idle)?;
    }
}

/// The start of every daemon ([`crate::daemon::run`]): reads `--config
/// PATH` from the command line (the only argument the master passes),
/// loads and validates the configuration, and installs the log. Returns
/// exit status 1, with a logged reason, when that fails: the master counts
/// such an exit as a bad start and throttles the service instead of
/// respawning it in a loop.
/// With `--zygote` after the path (a pool with `spawn = "fork"`), the
/// second value is true: the process is its pool's template
/// ([`crate::zygote`]).
pub(crate) fn startup(service: Service) -> Result<(mortal_proto::config::Config, bool), ExitCode> {
    let mut args = std::env::args_os().skip(1);
    let (path, zygote) = match (args.next(), args.next(), args.next(), args.next()) {
        (Some(flag), Some(path), None, None) if flag == "--config" => (std::path::PathBuf::from(path), false),
        (Some(flag), Some(path), Some(z), None) if flag == "--config" && z == crate::zygote::FLAG => {
            (std::path::PathBuf::from(path), true)
        }
        _ => {
            crate::log::init_early(service);
            tracing::error!("fatal: usage: {} --config PATH (started by mortal-master)", service.program());
            return Err(ExitCode::FAILURE);
        }
    };
    match mortal_proto::config::Config::load(&path) {
        Ok(config) => {
            crate::log::init(service, &config.log, &config.server.hostname);
            Ok((config, zygote))
        }
        Err(errors) => {
            crate::log::init_early(service);
            for e in errors {
                tracing::error!("fatal: {e}");
            }
            Err(ExitCode::FAILURE)
        }
    }
}

/// Adopts the listener (stdin) and the master socket (stdout) a daemon
/// inherits, or logs why not and returns exit status 1: started by hand
/// instead of by the master, a daemon has nothing to serve.
pub(crate) fn adopt<L: Listener>(service: Service) -> Result<(L, MasterLink), ExitCode> {
    match (L::inherited(), MasterLink::inherited()) {
        (Ok(listener), Ok(link)) => Ok((listener, link)),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!("fatal: inherited descriptors: {e} ({} runs under mortal-master)", service.program());
            Err(ExitCode::FAILURE)
        }
    }
}

//! spawn: start one child, and the task that watches it.
//!
//! By default (`spawn = "exec"`) a child is a fresh `fork`+`exec` of its
//! daemon's own binary, never a bare fork of the master: it gets a new
//! address-space layout, so what an attacker learns from one child is
//! useless against the next, and it carries none of the master's memory.
//! A pool with `spawn = "fork"` has a [`Zygote`] instead: its binary
//! exec'd once, which forks each child on request as the master's own
//! child (`CLONE_PARENT`); the child then prepares, enters its sandbox and
//! serves exactly as an exec'd one, and is watched the same way (reaped
//! through a pidfd instead of tokio's handle). Its descriptors:
//!
//! | fd | what |
//! |----|------|
//! | 0  | a duplicate of the service's listening socket |
//! | 1  | the child's end of a fresh Unix stream socket pair: its status channel |
//! | 2  | the master's stderr: the log |
//!
//! Everything else the master holds is close-on-exec (std, tokio and
//! socket2 create every descriptor that way), so a child never holds
//! another child's status socket and end of stream on it means exactly
//! "that child is gone". A zygote holds no status socket but the one in
//! flight: it closes each as soon as the child has it.
//!
//! Each child gets one [`watch`] task. It owns the process handle and the
//! master's end of the status socket, reads the fixed eight-octet records,
//! checks them ([`check_record`]), forwards the valid ones to the event loop
//! and carries out the loop's orders (retire, kill). It reaps the child and
//! reports the exit last, so the event loop never sees a record after the
//! exit, and a pid is never signalled after it was reaped.

use crate::board::{ChildId, Order, check_record};
use mortal_proto::status::{MasterCommand, STATUS_LEN, StatusRecord};
use socket2::Socket;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::process::{Child, Command};
use tokio::sync::mpsc::{self, UnboundedReceiver, UnboundedSender};
use tokio::time::Instant;

/// How long a child that closed its status socket may take to exit before
/// it is deemed broken and killed. A child's socket normally closes only as
/// the process exits, so this is generous.
pub const EOF_EXIT_GRACE: Duration = Duration::from_secs(5);
/// Longest wait to hand a one-octet order to a child. The socket buffer
/// holds far more than the master ever sends, so this only bounds a
/// pathological case; a child that cannot take an order is killed.
const ORDER_WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest wait, after a child was reaped, for the rest of what it wrote
/// to its status socket (normally there at once, with the end of stream).
const EXIT_DRAIN_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest wait for a zygote's answer to a fork request (the first one
/// also waits for the zygote to load its configuration). The master's
/// loop waits that long at most; a zygote that takes longer is replaced,
/// and the child is exec'd instead.
pub const ZYGOTE_REPLY_TIMEOUT: Duration = Duration::from_secs(2);

/// What a watcher tells the event loop.
#[derive(Debug)]
pub enum Event {
    /// A valid status record.
    Status(ChildId, StatusRecord),
    /// The child broke the protocol and has been sent SIGKILL.
    Broken(ChildId),
    /// The child was reaped; the watcher has ended.
    Exited(ChildId, io::Result<ExitStatus>),
}

/// A running child, as the event loop sees it.
#[derive(Debug)]
pub struct Spawned {
    pub pid: u32,
    pub orders: UnboundedSender<Order>,
}

/// `program --config <config>` with `listener` as its stdin and
/// `stdout` as its stdout, in a process group of its own.
fn command(program: &Path, config: &Path, listener: &Socket, stdout: OwnedFd) -> io::Result<Command> {
    let listener: OwnedFd = listener.try_clone()?.into();
    let mut cmd = Command::new(program);
    cmd.arg("--config")
        .arg(config)
        .stdin(Stdio::from(listener))
        .stdout(Stdio::from(stdout))
        .stderr(Stdio::inherit())
        // Own process group: a Ctrl-C on the master's terminal reaches
        // the master only, which then retires its children gracefully.
        .process_group(0)
        .kill_on_drop(false);
    Ok(cmd)
}

/// Spawns `program --config <config>` with `listener` as its stdin and a
/// new status socket as its stdout (forked by `zygote` when given, else
/// exec'd), and starts its watcher.
pub fn spawn(
    id: ChildId,
    program: &Path,
    config: &Path,
    listener: &Socket,
    zygote: Option<&mut Zygote>,
    events: mpsc::Sender<Event>,
) -> io::Result<Spawned> {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
    ours.set_nonblocking(true)?;
    // Registered before the spawn, so that no failure can leave a child
    // running without a watcher.
    let ours = UnixStream::from_std(ours)?;
    let (pid, child) = match zygote {
        Some(zygote) => {
            let pid = zygote.fork(theirs.as_fd())?;
            // The master's copy of the child's status socket goes now,
            // so end of stream on `ours` means the child is gone.
            drop(theirs);
            // The child is the master's until reaped, so its pid cannot
            // be reused before this pidfd refers to it.
            let pidfd = rustix::process::pidfd_open(
                rustix::process::Pid::from_raw(pid as i32).ok_or_else(|| io::Error::other("pid 0"))?,
                rustix::process::PidfdFlags::empty(),
            )?;
            // Deprecated because a `T: AsRawFd` need not own its
            // descriptor; an `OwnedFd` does, which makes this sound.
            #[allow(deprecated)]
            let pidfd = AsyncFd::new(pidfd)?;
            (pid, Proc::Forked(pidfd))
        }
        None => {
            // `cmd` is dropped at the end of this block, closing the
            // master's copies of the child's fd 0 and fd 1.
            let child = command(program, config, listener, OwnedFd::from(theirs))?.spawn()?;
            let pid = child.id().ok_or_else(|| io::Error::other("child exited before its pid was read"))?;
            (pid, Proc::Exec(child))
        }
    };
    let (orders, order_rx) = mpsc::unbounded_channel();
    let watcher = Watch {
        id,
        pid,
        program: program.to_owned(),
        child,
        sock: ours,
        orders: order_rx,
        events,
        buf: [0; STATUS_LEN],
        filled: 0,
        prev: None,
        reading: true,
    };
    tokio::spawn(watcher.run());
    Ok(Spawned { pid, orders })
}

/// A pool's template process (`spawn = "fork"`,
/// [`mortal_libmaster::zygote`]): exec'd once with the configuration of
/// `generation`, it forks each child on request.
#[derive(Debug)]
pub struct Zygote {
    pid: u32,
    process: Child,
    /// Blocking, with [`ZYGOTE_REPLY_TIMEOUT`] both ways.
    requests: std::os::unix::net::UnixStream,
    pub started: Instant,
    pub generation: u64,
}

impl Zygote {
    /// Execs `program --config <config> --zygote` with `listener` as its
    /// stdin and the request socket as its stdout. It loads its
    /// configuration while the first request waits in the socket.
    pub fn start(program: &Path, config: &Path, listener: &Socket, generation: u64) -> io::Result<Zygote> {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
        ours.set_read_timeout(Some(ZYGOTE_REPLY_TIMEOUT))?;
        ours.set_write_timeout(Some(ZYGOTE_REPLY_TIMEOUT))?;
        let mut cmd = command(program, config, listener, OwnedFd::from(theirs))?;
        cmd.arg(mortal_libmaster::zygote::FLAG).kill_on_drop(true);
        let process = cmd.spawn()?;
        let pid = process.id().ok_or_else(|| io::Error::other("zygote exited before its pid was read"))?;
        Ok(Zygote { pid, process, requests: ours, started: Instant::now(), generation })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// A new child with `status` as its status socket; its pid. When the
    /// answer does not come (the zygote died or hung after forking), a
    /// child may exist that the master does not know: its status socket
    /// closes with the failed spawn, so it exits at once, and stays a
    /// zombie of the master (tokio reaps only the pids it spawned, and a
    /// `waitpid(-1)` here would take theirs): one process-table slot per
    /// such failure, which also replaces the zygote.
    fn fork(&mut self, status: std::os::fd::BorrowedFd<'_>) -> io::Result<u32> {
        mortal_libmaster::zygote::request_fork(&mut self.requests, status)
    }

    /// Ends the zygote: closing the request socket is its order to exit;
    /// a task reaps it (SIGKILL if the runtime ends first).
    pub fn retire(self) {
        let Zygote { mut process, requests, .. } = self;
        drop(requests);
        tokio::spawn(async move {
            let _ = process.wait().await;
        });
    }

    /// Ends a zygote that failed (it may be stuck and never read the end
    /// of its request socket): SIGKILL, and a task reaps it.
    pub fn kill(mut self) {
        if let Err(e) = self.process.start_kill() {
            tracing::debug!("zygote pid {}: kill: {e}", self.pid);
        }
        self.retire();
    }
}

/// The process a watcher owns: an exec'd child (tokio's handle), or one a
/// zygote forked, which is the master's child all the same and is reaped
/// through its pidfd (tokio reaps only the children it spawned).
enum Proc {
    Exec(Child),
    Forked(AsyncFd<OwnedFd>),
}

impl Proc {
    /// Waits for the exit and reaps. Cancel safe.
    async fn wait(&mut self) -> io::Result<ExitStatus> {
        match self {
            Proc::Exec(child) => child.wait().await,
            Proc::Forked(pidfd) => loop {
                let mut ready = pidfd.readable().await?;
                let options = rustix::process::WaitIdOptions::EXITED | rustix::process::WaitIdOptions::NOHANG;
                match rustix::process::waitid(rustix::process::WaitId::PidFd(pidfd.get_ref().as_fd()), options)? {
                    Some(status) => return Ok(wait_status(&status)),
                    None => ready.clear_ready(),
                }
            },
        }
    }

    /// Sends `signal`; never to a reaped process (tokio's handle has no
    /// pid once it reaped; a pidfd outlives its pid's reuse).
    fn signal(&mut self, signal: rustix::process::Signal) -> io::Result<()> {
        match self {
            Proc::Exec(child) => match child.id().and_then(|pid| rustix::process::Pid::from_raw(pid as i32)) {
                Some(pid) => Ok(rustix::process::kill_process(pid, signal)?),
                None => Ok(()),
            },
            Proc::Forked(pidfd) => Ok(rustix::process::pidfd_send_signal(pidfd.get_ref(), signal)?),
        }
    }
}

/// A `waitid` result as the wait status std reads.
fn wait_status(status: &rustix::process::WaitIdStatus) -> ExitStatus {
    let raw = match (status.exit_status(), status.terminating_signal()) {
        (Some(code), _) => (code & 0xff) << 8,
        (None, Some(signal)) => signal | if status.dumped() { 0x80 } else { 0 },
        (None, None) => 0,
    };
    ExitStatus::from_raw(raw)
}

/// The per-child task.
struct Watch {
    id: ChildId,
    pid: u32,
    program: PathBuf,
    child: Proc,
    sock: UnixStream,
    orders: UnboundedReceiver<Order>,
    events: mpsc::Sender<Event>,
    /// A record being assembled: `read` may return part of one.
    buf: [u8; STATUS_LEN],
    filled: usize,
    /// The last valid record, for [`check_record`].
    prev: Option<StatusRecord>,
    /// Still reading records: false after end of stream or a violation.
    reading: bool,
}

/// What one read from the status socket amounted to.
enum Read {
    More,
    /// End of stream, or a reset (the child exited with an order unread).
    Closed,
    Broken(&'static str),
}

impl Watch {
    async fn run(mut self) {
        let mut orders_open = true;
        let mut eof_deadline: Option<Instant> = None;
        loop {
            // Biased: orders first, so a child flooding its socket cannot
            // delay its own kill; records before the exit, so every record
            // a child sent is seen before its exit is. `read` and `recv`
            // are cancel safe: a partial record stays in `buf`.
            tokio::select! {
                biased;
                order = self.orders.recv(), if orders_open => match order {
                    Some(Order::Retire) => self.send_retire().await,
                    Some(Order::Terminate) => self.terminate(),
                    Some(Order::Kill) => self.kill(),
                    // The event loop forgot this child: never leave it
                    // running unsupervised.
                    None => {
                        orders_open = false;
                        self.kill();
                    }
                },
                read = self.sock.read(&mut self.buf[self.filled..]), if self.reading => {
                    match self.on_read(read).await {
                        Read::More => {}
                        // Normally the child is exiting; it is broken only
                        // if it does not.
                        Read::Closed => eof_deadline = Some(Instant::now() + EOF_EXIT_GRACE),
                        Read::Broken(why) => self.broken(why).await,
                    }
                }
                status = self.child.wait() => {
                    self.drain().await;
                    let _ = self.events.send(Event::Exited(self.id, status)).await;
                    return;
                }
                _ = tokio::time::sleep_until(eof_deadline.unwrap_or_else(Instant::now)), if eof_deadline.is_some() => {
                    eof_deadline = None;
                    self.broken("closed its status channel but did not exit").await;
                }
            }
        }
    }

    /// Takes the result of one read: forwards a completed, valid record.
    async fn on_read(&mut self, read: io::Result<usize>) -> Read {
        let n = match read {
            Ok(0) | Err(_) if self.filled > 0 => {
                self.reading = false;
                return Read::Broken("truncated status record");
            }
            Ok(0) | Err(_) => {
                self.reading = false;
                return Read::Closed;
            }
            Ok(n) => n,
        };
        self.filled += n;
        if self.filled < STATUS_LEN {
            return Read::More;
        }
        self.filled = 0;
        let record = match StatusRecord::decode(&self.buf) {
            Some(record) => record,
            None => {
                self.reading = false;
                return Read::Broken("malformed status record");
            }
        };
        if let Err(why) = check_record(self.prev, record) {
            self.reading = false;
            return Read::Broken(why);
        }
        self.prev = Some(record);
        let _ = self.events.send(Event::Status(self.id, record)).await;
        Read::More
    }

    /// After the reap: the records the child wrote before it exited are
    /// still in the socket; read them up to the end of stream. Bounded,
    /// because a descendant of the child could hold its end open.
    async fn drain(&mut self) {
        let drained = tokio::time::timeout(EXIT_DRAIN_TIMEOUT, async {
            while self.reading {
                let read = self.sock.read(&mut self.buf[self.filled..]).await;
                if let Read::Broken(why) = self.on_read(read).await {
                    tracing::warn!("warning: process {} pid {}: {why}", self.program.display(), self.pid);
                }
            }
        });
        if drained.await.is_err() {
            tracing::debug!("pid {}: status socket still open after exit", self.pid);
        }
    }

    async fn send_retire(&mut self) {
        let order = [MasterCommand::Retire.encode()];
        match tokio::time::timeout(ORDER_WRITE_TIMEOUT, self.sock.write_all(&order)).await {
            Ok(Ok(())) => {}
            // The child is already exiting: its exit will be reported.
            Ok(Err(e)) => tracing::debug!("pid {}: retire order not delivered: {e}", self.pid),
            Err(_) => self.broken("does not take orders").await,
        }
    }

    fn kill(&mut self) {
        // Never a recycled pid: see `Proc::signal`.
        if let Err(e) = self.child.signal(rustix::process::Signal::KILL) {
            tracing::debug!("pid {}: kill: {e}", self.pid);
        }
    }

    fn terminate(&mut self) {
        // Not reaped yet (this task reaps, and ends right after), so the
        // pid is still this child's, at worst a zombie.
        if let Err(e) = self.child.signal(rustix::process::Signal::TERM) {
            tracing::debug!("pid {}: kill -TERM: {e}", self.pid);
        }
    }

    async fn broken(&mut self, why: &str) {
        tracing::warn!("warning: process {} pid {}: {why} -- killed", self.program.display(), self.pid);
        self.kill();
        let _ = self.events.send(Event::Broken(self.id)).await;
    }
}

//! spawn: fork+exec one child, and the task that watches it.
//!
//! A child is always a fresh `fork`+`exec` of its daemon's own binary,
//! never a bare fork of the master: it gets a new address-space layout, so
//! what an attacker learns from one child is useless against the next, and
//! it carries none of the master's memory. Its descriptors:
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
//! "that child is gone".
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
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;
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

/// Spawns `program --config <config>` with `listener` as its stdin and a
/// new status socket as its stdout, and starts its watcher.
pub fn spawn(
    id: ChildId,
    program: &Path,
    config: &Path,
    listener: &Socket,
    events: mpsc::Sender<Event>,
) -> io::Result<Spawned> {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
    ours.set_nonblocking(true)?;
    // Registered before the spawn, so that no failure can leave a child
    // running without a watcher.
    let ours = UnixStream::from_std(ours)?;
    let listener: OwnedFd = listener.try_clone()?.into();
    let child = {
        let mut cmd = Command::new(program);
        cmd.arg("--config")
            .arg(config)
            .stdin(Stdio::from(listener))
            .stdout(Stdio::from(OwnedFd::from(theirs)))
            .stderr(Stdio::inherit())
            // Own process group: a Ctrl-C on the master's terminal reaches
            // the master only, which then retires its children gracefully.
            .process_group(0)
            .kill_on_drop(false);
        cmd.spawn()?
        // `cmd` is dropped here, closing the master's copies of the
        // child's fd 0 and fd 1.
    };
    let pid = child.id().ok_or_else(|| io::Error::other("child exited before its pid was read"))?;
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

/// The per-child task.
struct Watch {
    id: ChildId,
    pid: u32,
    program: PathBuf,
    child: Child,
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
        // tokio never signals a child it has already reaped, so this cannot
        // hit a recycled pid.
        if let Err(e) = self.child.start_kill() {
            tracing::debug!("pid {}: kill: {e}", self.pid);
        }
    }

    fn terminate(&mut self) {
        // Not reaped yet (this task reaps, and ends right after), so the
        // pid is still this child's, at worst a zombie.
        if let Some(pid) = self.child.id() {
            let pid = nix::unistd::Pid::from_raw(pid as i32);
            if let Err(e) = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM) {
                tracing::debug!("pid {pid}: kill -TERM: {e}");
            }
        }
    }

    async fn broken(&mut self, why: &str) {
        tracing::warn!("warning: process {} pid {}: {why} -- killed", self.program.display(), self.pid);
        self.kill();
        let _ = self.events.send(Event::Broken(self.id)).await;
    }
}

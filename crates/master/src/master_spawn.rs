//! master_spawn: fork+exec one child, and the task that watches it.
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

use crate::master_board::{ChildId, Order, check_record};
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
pub fn master_spawn(
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
    let watcher = Watch { id, pid, program: program.to_owned(), child, sock: ours, orders: order_rx, events };
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
}

impl Watch {
    async fn run(mut self) {
        let mut buf = [0u8; STATUS_LEN];
        let mut filled = 0;
        let mut prev: Option<StatusRecord> = None;
        let mut reading = true;
        let mut orders_open = true;
        let mut eof_deadline: Option<Instant> = None;
        loop {
            // `read` and `recv` are cancel safe: a record half read when
            // another branch wins stays in `buf`, an order stays queued.
            tokio::select! {
                status = self.child.wait() => {
                    let _ = self.events.send(Event::Exited(self.id, status)).await;
                    return;
                }
                order = self.orders.recv(), if orders_open => match order {
                    Some(Order::Retire) => self.send_retire().await,
                    Some(Order::Kill) => self.kill(),
                    // The event loop forgot this child: never leave it
                    // running unsupervised.
                    None => {
                        orders_open = false;
                        self.kill();
                    }
                },
                read = self.sock.read(&mut buf[filled..]), if reading => match read {
                    Ok(0) | Err(_) if filled > 0 => {
                        reading = false;
                        self.broken("truncated status record").await;
                    }
                    // End of stream (or a reset, when the child exited with
                    // an order unread): the child is normally exiting; it is
                    // broken only if it does not.
                    Ok(0) | Err(_) => {
                        reading = false;
                        eof_deadline = Some(Instant::now() + EOF_EXIT_GRACE);
                    }
                    Ok(n) => {
                        filled += n;
                        if filled == STATUS_LEN {
                            filled = 0;
                            match self.accept(prev, &buf) {
                                Ok(record) => {
                                    prev = Some(record);
                                    let _ = self.events.send(Event::Status(self.id, record)).await;
                                }
                                Err(why) => {
                                    reading = false;
                                    self.broken(why).await;
                                }
                            }
                        }
                    }
                },
                _ = tokio::time::sleep_until(eof_deadline.unwrap_or_else(Instant::now)), if eof_deadline.is_some() => {
                    eof_deadline = None;
                    self.broken("closed its status channel but did not exit").await;
                }
            }
        }
    }

    /// Decodes and checks one record against the previous one.
    fn accept(&self, prev: Option<StatusRecord>, buf: &[u8; STATUS_LEN]) -> Result<StatusRecord, &'static str> {
        let record = StatusRecord::decode(buf).ok_or("malformed status record")?;
        check_record(prev, record)?;
        Ok(record)
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

    async fn broken(&mut self, why: &str) {
        tracing::warn!("warning: process {} pid {}: {why} -- killed", self.program.display(), self.pid);
        self.kill();
        let _ = self.events.send(Event::Broken(self.id)).await;
    }
}

//! overload: what clients hear when every smtpd is busy.
//!
//! When a service is at `process_limit` and no child is idle or starting,
//! new connections wait in the listen backlog. That is right for a
//! moment (a child frees up within a session's time), wrong for long: a
//! client left waiting times out instead of retrying elsewhere. So while
//! the pool is saturated the master looks at the listener every
//! [`POLL`]; once clients have been waiting for `overload_wait`, it
//! accepts every waiting connection itself, writes the fixed line
//! `421 4.3.2 <hostname> Service busy, try again later` and closes. It
//! never reads a byte from those clients: the connection is accepted,
//! written to once and closed.
//!
//! A client's wait is measured from when the master first saw the backlog
//! non-empty during the saturation, so no client waits much longer than
//! `overload_wait` (plus [`POLL`]) for either a child or a 421.

use socket2::Socket;
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

/// How often a saturated pool's listener is checked for waiting clients.
pub const POLL: Duration = Duration::from_millis(100);
/// Most clients answered per check, so a flood cannot hold the event loop.
pub const MAX_REJECTS_PER_POLL: usize = 256;

/// The reply, without the host name.
pub fn busy_reply(hostname: &str) -> String {
    format!("421 4.3.2 {hostname} Service busy, try again later\r\n")
}

/// Overload state of one TCP service.
#[derive(Debug, Default)]
pub struct Overload {
    /// When the master first saw clients waiting in this saturation.
    waiting_since: Option<Instant>,
    /// The episode was logged (once per saturation).
    logged: bool,
    /// Clients answered 421 since the master started.
    pub rejected: u64,
}

/// What a check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Not saturated, or no client waiting.
    Calm,
    /// Clients are waiting, not yet for `overload_wait`.
    Waiting,
    /// Clients waited `overload_wait`: answer them now.
    Reject,
}

impl Overload {
    /// The decision, given whether the pool is saturated and whether the
    /// backlog holds a client. Pure, for the tests.
    pub fn check(&mut self, saturated: bool, waiting: bool, wait: Duration, now: Instant) -> Check {
        if !saturated {
            self.waiting_since = None;
            self.logged = false;
            return Check::Calm;
        }
        if !waiting {
            self.waiting_since = None;
            return Check::Calm;
        }
        let since = *self.waiting_since.get_or_insert(now);
        if now.saturating_duration_since(since) >= wait { Check::Reject } else { Check::Waiting }
    }

    /// Whether to log this rejection (the first of a saturation episode).
    pub fn first_of_episode(&mut self) -> bool {
        !std::mem::replace(&mut self.logged, true)
    }

    /// After the backlog was emptied, the next waiting client starts a new
    /// wait.
    pub fn rejected(&mut self, n: usize) {
        self.waiting_since = None;
        self.rejected += n as u64;
    }
}

/// Whether a client waits in `listener`'s backlog (zero-timeout poll).
pub fn has_waiting(listener: &Socket) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
}

/// Accepts up to [`MAX_REJECTS_PER_POLL`] waiting clients, writes `reply`
/// to each and closes it, without reading. Returns how many.
pub fn reject_waiting(listener: &Socket, reply: &str) -> usize {
    let mut n = 0;
    while n < MAX_REJECTS_PER_POLL {
        // The listener is non-blocking (the children set that on the shared
        // file description, and the master too): an empty backlog, or a
        // child taking the last client first, ends the loop.
        let (conn, _) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        n += 1;
        // A fresh socket's send buffer takes one line; never wait on a
        // client that is gone.
        let _ = conn.set_nonblocking(true);
        let _ = (&conn).write(reply.as_bytes());
        let _ = conn.shutdown(std::net::Shutdown::Write);
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn clients_wait_overload_wait_then_are_rejected() {
        let t0 = Instant::now();
        let wait = Duration::from_secs(10);
        let mut o = Overload::default();
        assert_eq!(o.check(false, true, wait, t0), Check::Calm, "a child is free: clients are served");
        assert_eq!(o.check(true, false, wait, t0), Check::Calm, "saturated, nobody waiting");
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(o.check(true, true, wait, t1), Check::Waiting);
        assert_eq!(o.check(true, true, wait, t1 + Duration::from_secs(9)), Check::Waiting);
        assert_eq!(o.check(true, true, wait, t1 + wait), Check::Reject);
        assert!(o.first_of_episode());
        o.rejected(3);
        assert!(!o.first_of_episode(), "logged once per episode");
        // A client arriving later waits its own overload_wait.
        let t2 = t1 + wait + Duration::from_secs(1);
        assert_eq!(o.check(true, true, wait, t2), Check::Waiting);
        // A child frees up: the episode ends, the next one is logged again.
        assert_eq!(o.check(false, true, wait, t2), Check::Calm);
        assert!(o.first_of_episode());
        assert_eq!(o.rejected, 3);
    }

    #[test]
    fn waiting_clients_get_421_and_nothing_is_read() {
        let listener = crate::listen::master_listen_tcp("127.0.0.1:0".parse().unwrap()).unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap().as_socket().unwrap();
        assert!(!has_waiting(&listener));
        let mut clients: Vec<std::net::TcpStream> =
            (0..3).map(|_| std::net::TcpStream::connect(addr).unwrap()).collect();
        clients[0].write_all(b"EHLO never-read\r\n").unwrap();
        // The handshake completes in the kernel; the backlog is readable.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !has_waiting(&listener) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let reply = busy_reply("mx.test");
        assert_eq!(reject_waiting(&listener, &reply), 3);
        assert!(!has_waiting(&listener));
        for c in &mut clients[1..] {
            let mut got = String::new();
            c.read_to_string(&mut got).unwrap();
            assert_eq!(got, "421 4.3.2 mx.test Service busy, try again later\r\n");
        }
    }
}

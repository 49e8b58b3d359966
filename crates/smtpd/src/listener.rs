//! Where an smtpd child takes its clients from: a TCP listener of its
//! own (the default, and every submission, PROXY and unscreened
//! listener), or, behind postscreen, the hand-off socket where postscreen
//! passes each client that showed it speaks SMTP
//! ([`mortal_proto::handoff`]). The child tells which from its inherited
//! listener.

use mortal_libmaster::child::Listener;
use mortal_proto::config::{Config, ListenerRole};
use mortal_proto::handoff::Handoff;
use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

/// Longest wait for postscreen's hand-off once its connection is
/// accepted: it is written in one piece before the connection is made.
pub const HANDOFF_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub enum SmtpdListener {
    Tcp(TcpListener),
    /// postscreen's hand-off socket.
    Handoff(UnixListener),
}

/// A connection taken from the listener.
#[derive(Debug)]
pub enum Incoming {
    Client(TcpStream),
    /// postscreen, about to pass a client.
    Postscreen(UnixStream),
}

impl AsFd for SmtpdListener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            SmtpdListener::Tcp(l) => l.as_fd(),
            SmtpdListener::Handoff(l) => l.as_fd(),
        }
    }
}

impl Listener for SmtpdListener {
    type Stream = Incoming;

    fn accept_one(&self) -> io::Result<Incoming> {
        match self {
            SmtpdListener::Tcp(l) => l.accept().map(|(s, _)| Incoming::Client(s)),
            SmtpdListener::Handoff(l) => l.accept().map(|(s, _)| Incoming::Postscreen(s)),
        }
    }

    /// A listening Unix socket is the hand-off socket; anything else is
    /// taken as the TCP listener (the master binds nothing else for smtpd).
    fn inherited() -> io::Result<Self> {
        if inherited_is_handoff() {
            return UnixListener::inherited().map(SmtpdListener::Handoff);
        }
        TcpListener::inherited().map(SmtpdListener::Tcp)
    }
}

/// Whether this process's inherited listener (stdin) is postscreen's
/// hand-off socket, a Unix socket: the one case where smtpd receives
/// sockets. Decided from the descriptor, not the configuration, which a
/// reload may change under a running pool.
pub fn inherited_is_handoff() -> bool {
    mortal_libmaster::handoff::is_unix_listener(std::io::stdin().as_fd())
}

impl SmtpdListener {
    /// What this child's clients came for: the TCP listener's address
    /// says (`Smtpd::role_of`); postscreen screens only `listen`, the MX.
    pub fn role(&self, config: &Config) -> ListenerRole {
        match self {
            SmtpdListener::Tcp(l) => l.local_addr().map_or(ListenerRole::Mx, |local| config.smtpd.role_of(local)),
            SmtpdListener::Handoff(_) => ListenerRole::Mx,
        }
    }
}

impl Incoming {
    /// The client's socket, and what postscreen passed with it.
    pub fn client(self) -> io::Result<(TcpStream, Option<Handoff>)> {
        match self {
            Incoming::Client(s) => Ok((s, None)),
            Incoming::Postscreen(mut link) => {
                let (fd, handoff) = mortal_libmaster::handoff::receive(&mut link, HANDOFF_TIMEOUT)?;
                Ok((TcpStream::from(fd), Some(handoff)))
            }
        }
    }
}

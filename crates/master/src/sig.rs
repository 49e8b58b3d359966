//! sig: the signals the master obeys.
//!
//! | signal | meaning |
//! |--------|---------|
//! | SIGTERM, SIGINT | graceful stop: retire every child, then exit |
//! | SIGHUP | re-read the configuration; the next generation of children uses it |
//!
//! The handlers only set flags that tokio turns into stream items; all the
//! work happens in the event loop, outside signal context.

use std::io;
use tokio::signal::unix::{Signal, SignalKind, signal};

/// What a signal asks the master to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Stop gracefully; the number is logged (`terminating on signal 15`).
    Stop(i32),
    Reload,
}

/// The master's signal streams, registered before the first child exists.
#[derive(Debug)]
pub struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

impl Signals {
    pub fn install() -> io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// The next request. Cancel safe: a signal that arrives while another
    /// branch of the event loop wins stays pending.
    pub async fn next(&mut self) -> Request {
        tokio::select! {
            _ = self.term.recv() => Request::Stop(nix::sys::signal::Signal::SIGTERM as i32),
            _ = self.int.recv() => Request::Stop(nix::sys::signal::Signal::SIGINT as i32),
            _ = self.hup.recv() => Request::Reload,
        }
    }
}

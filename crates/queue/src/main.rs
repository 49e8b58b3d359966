//! mortal-queue: the queue manager and its delivery agents.
//!
//! # Summary
//! One process per host, started and restarted by the master. It owns the
//! spool: it moves each new message from `incoming/` to `active/`, hands it
//! to the delivery agent (Maildir), removes it once every recipient is
//! done, and otherwise keeps it in `deferred/` with back-off. It is woken
//! through its private socket by cleanup whenever a message is spooled, and
//! scans the queue every `scan_interval` as a backstop. On start it
//! recovers: whatever a crash left in `active/` is delivered again.
//!
//! # Security
//! The queue manager trusts no queue file: each is decoded strictly and
//! checksum-verified, and one that fails is moved to `corrupt/` and never
//! delivered in part. Queue ids are validated before any path is built from
//! them. It never talks to the network and never reads smtpd's bytes.
//!
//! # Standards
//! Maildir (the de-facto `tmp`/`new`/`cur` protocol); RFC 3463 codes in
//! the delivery log.
//!
//! # Configuration
//! `[queue]` `scan_interval`, `minimal_backoff`, `maximal_backoff`,
//! `delivery_concurrency`, `active_limit`; `[delivery]` `transport`,
//! `maildir_root`; `[server]` `spool_dir`, `hostname`.
//!
//! # Diagnostics
//! Postfix-shaped lines per message: `<id>: from=<...>, size=..., nrcpt=...
//! (queue active)`, `<id>: to=<...>, relay=local, delay=..., dsn=...,
//! status=sent|deferred (...)`, `<id>: removed`; `warning:` lines for
//! corrupt files and spool errors.
#![forbid(unsafe_code)]

mod queue_bounce;
mod queue_client;
mod queue_deliver;
mod queue_discard;
mod queue_lmtp;
mod queue_maildir;
mod queue_pipe;
mod queue_route;
mod queue_scan;
mod queue_smtp;
mod queue_spool;

use mortal_master::child::{self, Listener, MasterLink};
use mortal_master::sandbox::{self, Service};
use mortal_proto::status::ChildState;
use std::io::Read;
use std::os::unix::net::UnixListener;
use std::sync::mpsc;

/// What the scheduler reacts to.
#[derive(Debug)]
pub enum Event {
    /// cleanup (or an operator) says new mail is waiting.
    Wake,
    /// A delivery finished.
    Done(String, queue_deliver::Outcome),
    /// The master retired us or went away: finish what runs, then exit.
    Stop(child::ExitReason),
}

fn main() {
    sandbox::selftest::run_if_asked(Service::Queue);
    let config = child::startup("queue");
    let (listener, mut link) = match (UnixListener::inherited(), MasterLink::inherited()) {
        (Ok(l), Ok(m)) => (l, m),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!("fatal: inherited descriptors: {e} (mortal-queue runs under mortal-master)");
            std::process::exit(1);
        }
    };
    // Before the first queue file is read and before any thread starts.
    sandbox::enter_or_exit(Service::Queue, &config);
    let mut scheduler = match queue_scan::Scheduler::start(&config) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("fatal: open spool {}: {e}", config.server.spool_dir.display());
            std::process::exit(1);
        }
    };
    let (events, inbox) = mpsc::channel();
    spawn_wake_listener(listener, events.clone());
    if let Err(e) = link.report(ChildState::Ready) {
        tracing::error!("fatal: master link: {e}");
        std::process::exit(1);
    }
    let stop = events.clone();
    std::thread::spawn(move || {
        let _ = stop.send(Event::Stop(link.wait_for_exit()));
    });
    scheduler.run(&config, &inbox, &events);
}

/// Accepts wake-up connections; each one, whatever it carries, is a wake-up.
fn spawn_wake_listener(listener: UnixListener, events: mpsc::Sender<Event>) {
    // This thread has nothing else to do: block in accept.
    if let Err(e) = listener.set_nonblocking(false) {
        tracing::warn!("warning: queue socket: {e}");
    }
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            match conn {
                Ok(mut s) => {
                    // One byte is all a waker sends; don't wait for more.
                    let _ = s.set_read_timeout(Some(std::time::Duration::from_millis(100)));
                    let _ = s.read(&mut [0u8; 1]);
                    if events.send(Event::Wake).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!("warning: accept on queue socket: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
            }
        }
    });
}

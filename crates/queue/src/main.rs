//! mortal-queue: the queue manager.
//!
//! # Summary
//! One process per host, started and restarted by the master. It owns the
//! spool: it moves each new message from `incoming/` to `active/`, routes
//! each recipient (`[delivery] transport` and `[delivery.routes]`) to an
//! agent — `maildir` and `discard` here, `lmtp`, `smtp` relay and `pipe`
//! in their own services under the master — removes
//! the file once every recipient is done, and otherwise keeps it in
//! `deferred/` with back-off until `queue_lifetime`, when the rest is
//! returned to the sender. Permanent failures, expiry, and optionally
//! delays and successes produce RFC 3464 DSNs, queued as new mail. It is
//! woken through its private socket by cleanup whenever a message is
//! spooled, and scans the queue every `scan_interval` as a backstop. On
//! start it recovers: whatever a crash left in `active/` is delivered
//! again. The configuration (routes included) is read once at start; the
//! master replaces the process on `mortal reload`.
//!
//! # Security
//! The queue manager trusts no queue file: each is decoded strictly and
//! checksum-verified, and one that fails is moved to `corrupt/` and never
//! delivered in part. Queue ids are validated before any path is built from
//! them. It never reads smtpd's bytes, and never a byte from the network:
//! LMTP and SMTP next hops are the `lmtp` and `smtp` delivery agents'
//! (`mortal-lmtp`, `mortal-smtp`, over `<run_dir>/private/lmtp` and
//! `private/smtp`), and it never runs a program: mail routed to `pipe`
//! goes to the `pipe` delivery agent (`mortal-pipe`, over
//! `<run_dir>/private/pipe`), which runs the command as `[delivery.pipe]
//! user`. All three speak `mortal_proto::delivery`, and their reports are
//! checked strictly. The agents never write the spool: every recipient
//! state and DSN is written here.
//!
//! Before reading the first queue file it enters its sandbox (its `needs`
//! below, applied by `mortal_libmaster::daemon::run`): as root it drops to
//! `[server] user`; always no_new_privs, no core dumps, bounded descriptors, Landlock access to the
//! spool and the Maildir root only and no TCP at all, no signals or traces beyond
//! its own process, and a seccomp deny-list (ptrace, mount, namespaces,
//! modules, keys..., and execve and process creation: threads only).
//!
//! # Standards
//! Maildir (the de-facto `tmp`/`new`/`cur` protocol); RFC 3461/3464
//! (DSN), RFC 3463 codes; `mortal_proto::delivery` towards the lmtp,
//! smtp and pipe agents.
//!
//! # Configuration
//! `[queue]` `scan_interval`, `minimal_backoff`, `maximal_backoff`,
//! `delivery_concurrency`, `active_limit`, `destination_concurrency_limit`,
//! `queue_lifetime`, `bounce_queue_lifetime`, `delay_warning_time`;
//! `[delivery]` `transport`, `routes`, `maildir_root`, `pipe`,
//! `connect_timeout`, `command_timeout`, `pipe.timeout` (they bound the
//! wait for an agent's report), `connection_reuse_time` (how long a connection to an
//! agent is kept for the next delivery to the same next hop); `[server]`
//! `spool_dir`, `hostname`; `[process.queue]` (its lifetime). See
//! `docs/delivery.md`.
//!
//! # Diagnostics
//! Postfix-shaped lines per message: `<id>: from=<...>, size=..., nrcpt=...
//! (queue active)`, `<id>: to=<...>, relay=..., delay=..., delays=...,
//! dsn=..., status=sent|deferred|bounced (...)`, `status=expired, returned
//! to sender`, `<id>: sender non-delivery notification: <newid>`,
//! `<id>: removed`; `warning:` lines for corrupt files and spool errors.
#![forbid(unsafe_code)]

mod agent;
mod bounce;
mod deliver;
mod route;
mod scan;
mod spool;

use mortal_libmaster::child;
use mortal_libmaster::daemon::{self, Started};
use mortal_libmaster::sandbox::{Landlock, Needs, RunAs, Seccomp, Service};
use mortal_proto::config::Config;
use mortal_proto::queue_id::QueueId;
use mortal_proto::status::ChildState;
use std::io::Read;
use std::os::unix::net::UnixListener;
use std::process::ExitCode;
use std::sync::mpsc;

/// Descriptors the queue manager holds besides its deliveries.
const QUEUE_NOFILE_BASE: u64 = 256;
/// Descriptors one concurrent delivery may hold (queue file, Maildir file,
/// delivery agent socket, its cached connection).
const QUEUE_NOFILE_PER_DELIVERY: u64 = 8;

/// What the scheduler reacts to.
#[derive(Debug)]
pub enum Event {
    /// cleanup (or an operator) says new mail is waiting.
    Wake,
    /// A delivery finished.
    Done(QueueId, deliver::Outcome),
    /// The master retired us or went away: finish what runs, then exit.
    Stop(child::ExitReason),
}

/// The queue manager's sandbox: the mail user, read and write access to
/// the spool and the Maildir root (its delivery target) and nothing else,
/// no TCP port at all (it never talks to the network: the delivery agents
/// do), and the deny-list without running a program or creating a process
/// (the pipe command runs in the pipe service).
fn needs(config: &Config) -> Needs {
    let mut read_write = vec![config.server.spool_dir.clone()];
    if !config.maildir_root().starts_with(&config.server.spool_dir) {
        read_write.push(config.maildir_root().to_owned());
    }
    Needs {
        run_as: RunAs::MailUser,
        chroot_private: false,
        nofile: QUEUE_NOFILE_BASE + u64::from(config.queue.delivery_concurrency) * QUEUE_NOFILE_PER_DELIVERY,
        landlock: Landlock::Rules { read_write, tcp_connect: Vec::new() },
        seccomp: Seccomp::DenyList { may_exec: false, may_fork: false },
    }
}

fn main() -> ExitCode {
    // Nothing to read before the sandbox: the first queue file is read
    // inside it, and no thread starts before it.
    daemon::run(Service::Queue, needs, |_| Ok(()), daemon::keep, serve)
}

fn serve(started: Started<UnixListener, ()>) -> ExitCode {
    let Started { config, listener, mut link, .. } = started;
    let mut scheduler = match scan::Scheduler::start(&config) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("fatal: open spool {}: {e}", config.server.spool_dir.display());
            return ExitCode::FAILURE;
        }
    };
    let (events, inbox) = mpsc::channel();
    spawn_wake_listener(listener, events.clone());
    if let Err(e) = link.report(ChildState::Ready) {
        tracing::error!("fatal: master link: {e}");
        return ExitCode::FAILURE;
    }
    let stop = events.clone();
    std::thread::spawn(move || {
        let _ = stop.send(Event::Stop(link.wait_for_exit()));
    });
    scheduler.run(&config, &inbox, &events);
    ExitCode::SUCCESS
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// The spool, and the Maildir root only where it lies outside it; no
    /// TCP port; neither a program nor a process.
    #[test]
    fn queue_needs_the_spool_and_the_maildir_root_and_no_network() {
        let config = |text: &str| Config::parse_for(text, Path::new("/etc/m.toml"), false).unwrap();
        let inside = needs(&config("[server]\nspool_dir = \"/s\"\n"));
        assert_eq!(inside.landlock, Landlock::Rules { read_write: vec!["/s".into()], tcp_connect: Vec::new() });
        let outside = needs(&config("[server]\nspool_dir = \"/s\"\n[delivery]\nmaildir_root = \"/home/mail\"\n"));
        assert_eq!(
            outside.landlock,
            Landlock::Rules { read_write: vec!["/s".into(), "/home/mail".into()], tcp_connect: Vec::new() }
        );
        assert_eq!(outside.seccomp, Seccomp::DenyList { may_exec: false, may_fork: false });
        assert_eq!((outside.run_as, outside.chroot_private), (RunAs::MailUser, false));
    }
}

//! mortal-pipe: the `pipe` delivery agent, Postfix's pipe(8) in shape.
//!
//! # Summary
//! A pool of processes, started, replaced and retired by `mortal-master`
//! under `[process.pipe]` like smtpd and cleanup, and present only when a
//! route (`[delivery] transport` or a `[delivery.routes]` entry) uses
//! `pipe`. Each child waits on `<run_dir>/private/pipe` (inherited as
//! stdin) and serves one delivery request per connection from the queue
//! manager, in the protocol of the other delivery agents
//! (`mortal_proto::delivery`, route `pipe`): it reads the whole request,
//! sends the report's header (relay `pipe`, no further request on this
//! connection), runs the `[delivery.pipe] command` once per recipient, and
//! sends each recipient's result as its command ends. The queue logs the
//! delivery lines (`relay=pipe`) and writes the DSNs; this agent only runs
//! commands.
//!
//! # Security
//! This is the one mortal process that runs a program, and it is the
//! operator's: so it runs as neither root nor the mail user. Started by a
//! root master, each child drops to `[delivery.pipe] user` before its
//! first request (its `needs`, applied by `mortal_libmaster::daemon::run`),
//! which the configuration check requires then and which must differ from `[server] user`: the command
//! never runs as root, and never with the mail user's rights over the
//! spool. Unprivileged, every process runs as the invoking user and the
//! master says at start that the key has no effect. The sandbox also sets
//! no_new_privs (a set-user-id program gains nothing), turns core dumps
//! off, bounds descriptors, keeps Landlock's signal and abstract-socket
//! scopes, and installs the seccomp deny-list the other daemons have
//! (ptrace, mount, namespaces, modules, keys...); all of it is inherited by
//! the command. There are no Landlock file or network rules: which files
//! and ports a command needs is the operator's business, which mortal
//! cannot know; the master says so in a warning at start.
//!
//! The request chooses nothing but values: the argv template is this
//! service's own configuration, never given to a shell, and the expanded
//! addresses stay inside single arguments. The peer is not trusted: the
//! decoder insists on the record order, a protocol version, a queue id of
//! the right shape, RFC 5321 mailboxes, at most
//! `mortal_proto::delivery::MAX_RECIPIENTS` recipients and content no larger
//! than `message_size_limit` plus headers and margin; a request that
//! breaks a rule, or does not arrive whole within [`REQUEST_TIMEOUT`],
//! runs nothing. A recipient whose domain does not route to pipe under
//! this agent's configuration (or a request for another route) is
//! deferred with `4.3.5`, not run.
//!
//! # Standards
//! sysexits(3) exit statuses; RFC 3463 enhanced status codes; RFC 3464
//! `x-unix` diagnostics.
//!
//! # Configuration
//! `[delivery.pipe]` `command`, `user`, `timeout`; `[delivery]`
//! `transport` and `routes`; `[process.pipe]` (the lifetime policy:
//! process_limit, prefork, min/max_spare, max_use, max_idle,
//! max_lifetime, session_deadline, overdue_grace); `[smtpd]
//! message_size_limit` and `[cleanup] header_size_limit` bound a request.
//! See `docs/delivery.md`.
//!
//! # Diagnostics
//! `warning:` lines (tag `postfix/mortal/pipe`) for a request that breaks
//! the protocol, a recipient not routed to pipe, a queue that went away
//! before its results, and a SIGTERM that killed a running command; `fatal:` for a failed start (sandbox, master
//! link), after which the master throttles the service.
#![forbid(unsafe_code)]

mod command;

use mortal_libmaster::child;
use mortal_libmaster::daemon::{self, Started};
use mortal_libmaster::sandbox::{Landlock, Needs, RunAs, Seccomp, Service};
use mortal_proto::config::Config;
use mortal_proto::delivery::{RcptResult, Recipient, Report, Request, RequestDecoder, Status, max_content};
use mortal_proto::smtp_status::{EnhancedStatus, StatusClass};
use nix::sys::signal::{self, SigSet, Signal};
use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Longest wait for a whole request once the connection is accepted. The
/// queue writes it at once; only a stuck or hostile peer takes longer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Octets read from the queue at a time.
const READ_CHUNK: usize = 64 * 1024;

/// Descriptors of a pipe service process. It holds a dozen (stdio, its
/// listener and master link, the queue's connection, the command's pipes);
/// the limit is inherited by the operator's command, which gets what a
/// login session commonly gets (Linux's default soft limit).
const PIPE_NOFILE: u64 = 1024;

/// The pipe service's sandbox: `[delivery.pipe] user`, and the deny-list
/// with running a program and creating a process allowed (that is its
/// job). The command's files and ports are the operator's business, which
/// mortal cannot know: only Landlock's scopes (no signal to, no abstract
/// socket of, a process outside this one's domain) are kept. The master
/// warns about it once at start
/// (`mortal_libmaster::sandbox::PIPE_LANDLOCK_WARNING`).
fn needs(_: &Config) -> Needs {
    Needs {
        run_as: RunAs::PipeUser,
        chroot_private: false,
        nofile: PIPE_NOFILE,
        landlock: Landlock::ScopesOnly,
        seccomp: Seccomp::DenyList { may_exec: true, may_fork: true },
    }
}

fn main() -> ExitCode {
    daemon::run(Service::Pipe, needs, |_| Ok(()), daemon::keep, run)
}

/// From here on: the pipe user, no_new_privs, seccomp.
fn run(started: Started<UnixListener, ()>) -> ExitCode {
    let Started { config, listener, mut link, .. } = started;
    take_sigterm();
    daemon::exit_status(child::serve(&listener, &mut link, config.process.pipe.max_use, |stream, _| {
        serve(&config, stream)
    }))
}

/// SIGTERM (the master's session deadline or overdue grace) ends this
/// process as before, but first kills the running command's process
/// group, so no command outlives the pipe process that ran it. SIGTERM is
/// blocked in every thread (threads and the commands' fork inherit the
/// mask; std's `Command` clears it in the command) and taken by one thread.
fn take_sigterm() {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    if let Err(e) = set.thread_block() {
        tracing::warn!("warning: block SIGTERM: {e}: a command may outlive this process");
        return;
    }
    std::thread::spawn(move || {
        if set.wait().is_err() {
            return;
        }
        if let Some(group) = command::kill_running() {
            tracing::warn!("warning: terminated while a command ran: killed its process group {group}");
        }
        // Die of the signal, as a process without this thread would.
        let _ = set.thread_unblock();
        let _ = signal::raise(Signal::SIGTERM);
        std::process::exit(1);
    });
}

/// One connection: one request, its report's header, then one result per
/// recipient as each command ends.
fn serve(config: &Config, mut stream: UnixStream) {
    let request = match read_request(config, &mut stream) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!("warning: delivery request from the queue refused: {e}");
            return;
        }
    };
    let queue_id = request.envelope.queue_id;
    // One request per connection: the header says so before any command
    // runs, and results that reach the queue count even if this process
    // dies before the last one.
    let mut out = Vec::new();
    Report::encode_header(Service::Pipe.name(), false, &mut out);
    let input = command::stdin_of(&request);
    for rcpt in &request.recipients {
        let result = match misrouted(config, &request, rcpt) {
            None => command::run(config, &request, rcpt, &input),
            Some(result) => result,
        };
        tracing::debug!("{queue_id}: to=<{}>: {:?} {} {}", rcpt.address, result.status, result.dsn, result.text);
        result.encode(&mut out);
        // The queue gave up waiting (or died): it defers what it has no
        // result for, so running the next command would only duplicate.
        if let Err(e) = stream.write_all(&out) {
            tracing::warn!("warning: {queue_id}: send result to the queue: {e}: remaining recipients not run");
            return;
        }
        out.clear();
    }
}

/// The deferral for a recipient this configuration does not route to
/// pipe, or of a request for another route; `None` when the command may
/// run for it. A peer cannot make the command run for mail routed
/// elsewhere.
fn misrouted(config: &Config, request: &Request, rcpt: &Recipient) -> Option<RcptResult> {
    let route = &request.envelope.route;
    let domain = rcpt.address.rsplit_once('@').map_or("", |(_, d)| d);
    if Service::Pipe.carries(route) && config.route_for(domain) == route {
        return None;
    }
    tracing::warn!(
        "warning: {}: to=<{}>: not routed to {route} in this configuration: not run",
        request.envelope.queue_id,
        rcpt.address
    );
    Some(RcptResult::new(
        Status::Deferred,
        const { EnhancedStatus::new(StatusClass::Persistent, 3, 5) },
        format!("pipe: recipient domain is not routed to {route}"),
    ))
}

/// Reads one complete request, strictly and within [`REQUEST_TIMEOUT`].
fn read_request(config: &Config, stream: &mut UnixStream) -> io::Result<Request> {
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    let mut decoder = RequestDecoder::new(max_content(config));
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "request incomplete after the time limit"));
        }
        stream.set_read_timeout(Some(left))?;
        let n = match stream.read(&mut buf) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed inside the request")),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        match decoder.feed(&buf[..n]) {
            Ok(Some(request)) => return Ok(request),
            Ok(None) => {}
            Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mortal_proto::envelope::Notify;
    use std::path::Path;

    fn config() -> Config {
        let text = "[delivery]\ntransport = \"maildir\"\n[delivery.routes]\n\"p.test\" = \"pipe\"\n\"l.test\" = \"lmtp:inet:127.0.0.1:9\"\n[delivery.pipe]\ncommand = [\"/bin/true\"]\nuser = \"pipeuser\"\n";
        Config::parse_for(text, Path::new("/m.toml"), false).unwrap()
    }

    fn request(route: &str) -> Request {
        let mut request = command::tests::request("a@x.test");
        request.envelope.route = route.parse().unwrap();
        request
    }

    fn rcpt(address: &str) -> Recipient {
        Recipient { address: address.into(), notify: Notify::default(), orcpt: String::new() }
    }

    /// Issue 11: a request chooses values, never where mail goes. Only a
    /// `pipe` request for a domain this configuration routes to pipe runs
    /// the command; the rest are deferred with 4.3.5.
    #[test]
    fn only_recipients_routed_to_pipe_run() {
        let config = config();
        assert_eq!(misrouted(&config, &request("pipe"), &rcpt("a@P.test")), None);
        for (route, address) in [("pipe", "a@l.test"), ("pipe", "a@other.test"), ("lmtp:inet:127.0.0.1:9", "a@l.test")]
        {
            let r = misrouted(&config, &request(route), &rcpt(address)).expect(address);
            assert_eq!((r.status, r.dsn.to_string().as_str()), (Status::Deferred, "4.3.5"), "{route} {address}");
            assert_eq!(r.text, format!("pipe: recipient domain is not routed to {route}"));
        }
    }
}

//! mortal-lmtp and mortal-smtp: the delivery agents that talk to the
//! network, Postfix's lmtp(8) and smtp(8) in shape.
//!
//! # Summary
//! Two pools of processes from one program, started, replaced and retired
//! by `mortal-master` under `[process.lmtp]` and `[process.smtp]` like the
//! other pools, each present only when a route (`[delivery] transport` or
//! a `[delivery.routes]` entry) uses LMTP, or relays by SMTP. Each child
//! waits on `<run_dir>/private/lmtp` or `private/smtp` (inherited as
//! stdin) for the queue manager, which hands it one delivery at a time
//! (`mortal_proto::delivery`: envelope, recipients, content, the route of
//! the next hop). The agent runs the LMTP or SMTP transaction ([`client`],
//! [`lmtp`], [`smtp`]) and answers one result per recipient; the queue
//! logs the delivery lines, updates the queue file and writes the DSNs.
//! The queue keeps the connection open for its next delivery to the same
//! next hop for up to `[delivery] connection_reuse_time`, and the agent
//! keeps its session to the next hop (probed with RSET before reuse) for
//! as long, so consecutive messages share one LMTP or SMTP session. Each
//! delivery is one use (`max_use`): the master counts it, and the agent
//! ends a kept connection after its last use or when the master asks it to
//! retire.
//!
//! # Security
//! This is where bytes from the network are parsed, so it holds nothing
//! worth stealing and can write nothing that matters: it never sees the
//! spool (Landlock grants no file at all; the CA file of `encrypt` is read
//! before the sandbox), connects over TCP only to the ports of its own
//! routes' next hops, may not run a program or create a process, and
//! drops to `[server] user` under a root master, like the other daemons
//! ([`needs`], applied by `mortal_libmaster::daemon::run`). Replies are
//! read with bounded lines, line counts and timeouts, and their text reaches the queue stripped of
//! control characters and cut to the protocol's limits. The queue is not
//! trusted either: the decoder insists on the record order, a protocol
//! version, a queue id of the right shape, RFC 5321 mailboxes, at most
//! `mortal_proto::delivery::MAX_RECIPIENTS` recipients and content no
//! larger than `message_size_limit` plus headers and margin; and a request
//! whose route is not the one this configuration gives every recipient's
//! domain is deferred, not sent, so a peer can choose nothing but values.
//!
//! # Standards
//! RFC 5321 (SMTP), RFC 2033 (LMTP), RFC 2920 (PIPELINING), RFC 3207
//! (STARTTLS), RFC 1870 (SIZE), RFC 6152 (8BITMIME), RFC 3030
//! (BINARYMIME), RFC 6531 (SMTPUTF8), RFC 3461 (DSN), RFC 3463 codes.
//!
//! # Configuration
//! `[delivery]` `transport`, `routes`, `smtp_tls_security`,
//! `smtp_tls_ca_file`, `connect_timeout`, `command_timeout`,
//! `connection_reuse_time`; `[server] hostname` (EHLO/LHLO);
//! `[process.lmtp]` and `[process.smtp]` (the lifetime policy); `[smtpd]
//! message_size_limit` and `[cleanup] header_size_limit` bound a request.
//! See `docs/delivery.md`.
//!
//! # Diagnostics
//! `Verified|Untrusted TLS connection established to ...` (tag
//! `postfix/mortal/smtp`); `warning:` lines for a request that breaks the
//! protocol, a recipient not routed to the requested next hop, and a queue
//! that went away before its report; `fatal:` for a failed start (sandbox,
//! master link), after which the master throttles the service.
#![forbid(unsafe_code)]

pub mod client;
pub mod lmtp;
pub mod smtp;

use client::Cache;
use mortal_libmaster::child::{self, MasterLink};
use mortal_libmaster::daemon::{self, Started};
use mortal_libmaster::sandbox::{Landlock, Needs, RunAs, Seccomp, Service};
use mortal_proto::config::{Config, NextHop, Route};
use mortal_proto::delivery::{RcptResult, Report, Request, RequestDecoder, Status, max_content};
use mortal_proto::smtp_status::{EnhancedStatus, StatusClass};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Longest wait for the rest of a request once its first byte (or the
/// connection) arrived. The queue writes a request at once; only a stuck
/// or hostile peer takes longer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// How much longer than `[delivery] connection_reuse_time` a kept
/// connection waits for the queue's next request: the queue reuses a
/// connection only within that time, so the agent never closes one the
/// queue is about to use.
pub const KEPT_CONNECTION_MARGIN: Duration = Duration::from_secs(5);
/// Octets read from the queue at a time.
const READ_CHUNK: usize = 64 * 1024;
/// Descriptors of an lmtp or smtp agent besides one cached session per
/// next hop: stdio, listener, master link, the queue's connection.
pub const AGENT_NOFILE_BASE: u64 = 32;

/// The sandbox of the `service` agent (lmtp or smtp): the mail user, no
/// file at all (the CA file is read before the sandbox; a Unix-socket LMTP
/// hop is reached by connect, which needs no file right), TCP connect to
/// the ports of its own routes' next hops only, and the deny-list without
/// running a program or creating a process. One descriptor per next hop
/// it may keep a session to.
pub fn needs(service: Service, config: &Config) -> Needs {
    let routes = || config.routes().filter(|r| service.carries(r));
    let tcp_connect = routes()
        .filter_map(|r| match r {
            Route::Lmtp(NextHop::Inet(addr)) | Route::Smtp(addr) => Some(addr.port()),
            _ => None,
        })
        .collect();
    Needs {
        run_as: RunAs::MailUser,
        chroot_private: false,
        nofile: AGENT_NOFILE_BASE + routes().count() as u64,
        landlock: Landlock::Rules { read_write: Vec::new(), tcp_connect },
        seccomp: Seccomp::DenyList { may_exec: false, may_fork: false },
    }
}

/// What one agent process keeps between deliveries.
#[derive(Debug)]
pub struct Agent {
    pub service: Service,
    pub config: Config,
    /// Idle sessions to next hops, kept across deliveries and connections.
    pub cache: Cache,
    pub tls: smtp::TlsClients,
}

impl Agent {
    pub fn new(service: Service, config: Config) -> Self {
        Self {
            service,
            cache: Cache::new(config.delivery.connection_reuse_time),
            tls: smtp::TlsClients::default(),
            config,
        }
    }

    pub fn timeouts(&self) -> client::Timeouts {
        client::Timeouts {
            connect: self.config.delivery.connect_timeout,
            command: self.config.delivery.command_timeout,
        }
    }

    /// Delivers one request over its route, if this configuration routes
    /// every recipient there; defers it otherwise.
    pub fn deliver(&self, request: &Request) -> Report {
        let route = &request.envelope.route;
        let misrouted = request.recipients.iter().find(|r| {
            let domain = r.address.rsplit_once('@').map_or("", |(_, d)| d);
            !self.service.carries(route) || self.config.route_for(domain) != route
        });
        if let Some(r) = misrouted {
            tracing::warn!(
                "warning: {}: to=<{}>: not routed to {route} in this configuration: not sent",
                request.envelope.queue_id,
                r.address
            );
            let result = RcptResult::new(
                Status::Deferred,
                const { EnhancedStatus::new(StatusClass::Persistent, 3, 5) },
                format!("{}: recipient domain is not routed to {route}", self.service.name()),
            );
            return Report { relay: "none".into(), results: vec![result; request.recipients.len()] };
        }
        match route {
            Route::Lmtp(hop) => lmtp::deliver(self, hop, route, request),
            Route::Smtp(addr) => smtp::deliver(self, *addr, route, request),
            Route::Maildir | Route::Discard | Route::Pipe => unreachable!("checked by carries()"),
        }
    }
}

/// The agent's `main`: start-up, sandbox, then the single-server loop
/// ([`daemon::run`]); returns the process's exit status.
pub fn run(service: Service) -> ExitCode {
    let prepare = |config: &Config| {
        let tls = smtp::TlsClients::default();
        // The CA file is read now: inside the sandbox no file can be opened.
        if service == Service::Smtp {
            tls.preload(config.delivery.smtp_tls_security, config.delivery.smtp_tls_ca_file.as_deref());
        }
        Ok(tls)
    };
    daemon::run(
        service,
        |config: &Config| needs(service, config),
        prepare,
        daemon::keep,
        |started| serve_agent(service, started),
    )
}

fn serve_agent(service: Service, started: Started<UnixListener, smtp::TlsClients>) -> ExitCode {
    let Started { config, listener, mut link, prepared: tls, .. } = started;
    let agent = Agent { tls, ..Agent::new(service, config) };
    let max_use = agent.config.process.policy(service).max_use;
    let served = child::serve(&listener, &mut link, max_use, |stream, link| serve(&agent, stream, link, max_use));
    agent.cache.expire_all();
    daemon::exit_status(served)
}

/// One connection from the queue: requests, one at a time, each answered
/// with its report, until the queue closes it, it has been idle for
/// longer than the queue would reuse it, this process has served its last
/// use, or the master wants this process back.
fn serve(agent: &Agent, mut stream: UnixStream, link: &mut MasterLink, max_use: u32) {
    let reuse = agent.config.delivery.connection_reuse_time;
    let mut decoder = RequestDecoder::new(max_content(&agent.config));
    let mut buf = vec![0u8; READ_CHUNK];
    // The accept counted the first use.
    let mut last = max_use != 0 && link.sessions() >= max_use;
    let mut uses = 0u32;
    loop {
        if uses > 0 && !wait_for_request(&stream, link, reuse + KEPT_CONNECTION_MARGIN) {
            break;
        }
        let request = match read_request(&mut stream, &mut decoder, &mut buf) {
            Ok(Some(r)) => r,
            Ok(None) => break,
            Err(e) => {
                tracing::warn!("warning: delivery request from the queue refused: {e}");
                break;
            }
        };
        if uses > 0 {
            match link.another_use(max_use) {
                Ok(l) => last = l,
                Err(e) => {
                    tracing::warn!("warning: master link: {e}");
                    last = true;
                }
            }
        }
        uses += 1;
        let report = agent.deliver(&request);
        // Another request only while this process has uses left, the
        // master wants it, and the queue may reuse connections at all.
        let keep = !last && !reuse.is_zero() && !link.has_order();
        let mut out = Vec::new();
        report.encode(keep, &mut out);
        if let Err(e) = stream.write_all(&out) {
            tracing::warn!("warning: {}: send report to the queue: {e}", request.envelope.queue_id);
            break;
        }
        decoder.answered();
        if !keep {
            break;
        }
    }
    agent.cache.expire();
}

/// Waits on a kept connection for the queue's next request: true when
/// bytes (or the end of the connection) arrived, false when it stayed idle
/// for `idle` or the master sent an order first (to retire: it is read
/// when the connection is given up).
fn wait_for_request(stream: &UnixStream, link: &MasterLink, idle: Duration) -> bool {
    let deadline = Instant::now() + idle;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        // poll takes at most u16::MAX ms: a longer wait goes in pieces.
        let ms = u16::try_from(left.as_millis().max(1)).unwrap_or(u16::MAX);
        if let Some(ready) = poll_ready(stream, link, PollTimeout::from(ms)) {
            return ready;
        }
    }
}

/// One `poll`: `Some(true)` when the queue's connection is readable (a
/// request that arrived is served, order or not), `Some(false)` on an
/// order from the master (or its socket closing), `None` on a timeout or
/// an interruption.
fn poll_ready(stream: &UnixStream, link: &MasterLink, timeout: PollTimeout) -> Option<bool> {
    let mut fds = [PollFd::new(stream.as_fd(), PollFlags::POLLIN), PollFd::new(link.as_fd(), PollFlags::POLLIN)];
    match poll(&mut fds, timeout) {
        Ok(0) | Err(nix::errno::Errno::EINTR) => None,
        Ok(_) if fds[0].any().unwrap_or(true) => Some(true),
        Ok(_) => Some(false),
        // A poll that cannot run: give the connection up.
        Err(_) => Some(false),
    }
}

/// Reads one complete request, within [`REQUEST_TIMEOUT`] from its start.
/// `Ok(None)`: the queue closed the connection between requests.
fn read_request(stream: &mut UnixStream, decoder: &mut RequestDecoder, buf: &mut [u8]) -> io::Result<Option<Request>> {
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "request incomplete after the time limit"));
        }
        stream.set_read_timeout(Some(left))?;
        let n = match stream.read(buf) {
            Ok(0) if decoder.is_between_requests() => return Ok(None),
            Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed inside a request")),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => continue,
            Err(e) => return Err(e),
        };
        match decoder.feed(&buf[..n]) {
            Ok(Some(request)) => return Ok(Some(request)),
            Ok(None) => {}
            Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mortal_proto::delivery::{Envelope, Recipient};
    use mortal_proto::envelope::{BodyType, Notify};
    use std::path::Path;

    fn agent(service: Service) -> Agent {
        let text = "[delivery]\ntransport = \"maildir\"\n[delivery.routes]\n\"l.test\" = \"lmtp:inet:127.0.0.1:9\"\n\"s.test\" = \"smtp:inet:127.0.0.1:9\"\n";
        Agent::new(service, Config::parse_for(text, Path::new("/m.toml"), false).unwrap())
    }

    /// Each agent may reach its own routes' TCP next hops and no other
    /// port, and holds a descriptor per route it carries.
    #[test]
    fn each_agent_needs_only_its_own_next_hops() {
        let text = "[delivery]\ntransport = \"lmtp:inet:127.0.0.1:24\"\n[delivery.routes]\n\"r.test\" = \"smtp:inet:127.0.0.1:2525\"\n\"u.test\" = \"lmtp:unix:/l\"\n\"v.test\" = \"lmtp:inet:[::1]:24\"\n";
        let config = Config::parse_for(text, Path::new("/m.toml"), false).unwrap();
        let lmtp = needs(Service::Lmtp, &config);
        assert_eq!(lmtp.landlock, Landlock::Rules { read_write: Vec::new(), tcp_connect: vec![24, 24] });
        assert_eq!(lmtp.nofile, AGENT_NOFILE_BASE + 3);
        let smtp = needs(Service::Smtp, &config);
        assert_eq!(smtp.landlock, Landlock::Rules { read_write: Vec::new(), tcp_connect: vec![2525] });
        assert_eq!(smtp.nofile, AGENT_NOFILE_BASE + 1);
        for n in [lmtp, smtp] {
            assert_eq!(n.seccomp, Seccomp::DenyList { may_exec: false, may_fork: false });
            assert_eq!((n.run_as, n.chroot_private), (RunAs::MailUser, false));
        }
    }

    fn request(route: &str, rcpts: &[&str]) -> Request {
        Request {
            envelope: Envelope {
                queue_id: "0000000010000100000A".parse().unwrap(),
                route: route.parse().unwrap(),
                sender: "a@x.test".into(),
                body: BodyType::SevenBit,
                smtputf8: false,
                ret: None,
                envid: String::new(),
            },
            recipients: rcpts
                .iter()
                .map(|a| Recipient { address: (*a).into(), notify: Notify::default(), orcpt: String::new() })
                .collect(),
            content: b"Subject: t\r\n\r\nx\r\n".to_vec(),
        }
    }

    /// Issue 11: a request chooses values, never a destination. A route
    /// this configuration does not give every recipient's domain, or one
    /// of the other agent's kind, is deferred without a connection (port 9
    /// would refuse it: the result would say so).
    #[test]
    fn requests_for_unconfigured_next_hops_are_deferred_unsent() {
        let cases = [
            (Service::Lmtp, "lmtp:inet:192.0.2.1:24", vec!["a@l.test"]),
            (Service::Lmtp, "lmtp:inet:127.0.0.1:9", vec!["a@l.test", "b@other.test"]),
            (Service::Lmtp, "lmtp:unix:/run/other", vec!["a@l.test"]),
            (Service::Smtp, "lmtp:inet:127.0.0.1:9", vec!["a@l.test"]),
            (Service::Lmtp, "smtp:inet:127.0.0.1:9", vec!["a@s.test"]),
        ];
        for (service, route, rcpts) in cases {
            let report = agent(service).deliver(&request(route, &rcpts));
            assert_eq!(report.relay, "none", "{route}");
            assert_eq!(report.results.len(), rcpts.len());
            for r in &report.results {
                assert_eq!((r.status, r.dsn.to_string().as_str()), (Status::Deferred, "4.3.5"), "{route}: {r:?}");
                assert!(r.text.ends_with(&format!("recipient domain is not routed to {route}")), "{}", r.text);
            }
        }
        // A configured one is tried (and refused by the closed port).
        let report = agent(Service::Lmtp).deliver(&request("lmtp:inet:127.0.0.1:9", &["a@L.TEST"]));
        assert_eq!(report.results[0].dsn.to_string(), "4.4.1", "{report:?}");
        assert!(report.results[0].text.starts_with("connect to 127.0.0.1[127.0.0.1]:9: "), "{report:?}");
    }
}

//! The `lmtp`, `smtp` and `pipe` routes: the queue manager hands the batch
//! to the delivery agent of that route (`mortal-lmtp`, `mortal-smtp`,
//! `mortal-pipe`), like Postfix's qmgr hands it to lmtp(8), smtp(8) and
//! pipe(8), and never talks to the network or runs a program itself (its
//! seccomp filter forbids execve and fork).
//!
//! This side connects to `<run_dir>/private/lmtp`, `private/smtp` or
//! `private/pipe`, waiting at most `[delivery] connect_timeout` while
//! every agent is busy, sends one request (`mortal_proto::delivery`: queue
//! id, route, envelope with its DSN parameters, recipients, content) and
//! reads the report: the relay for the log line and one result per
//! recipient. The connection is kept for the next batch to the same
//! destination for `[delivery] connection_reuse_time` when the agent says
//! it takes another ([`Conns`]), and the agent keeps its session to the
//! next hop as long: that is how consecutive messages share one LMTP or
//! SMTP session (the pipe agent takes one request per connection). An
//! agent that cannot be reached, does not answer in time, dies or breaks
//! the protocol defers every recipient it has not answered for (`4.3.0
//! lmtp delivery agent unavailable: ...`, `4.3.0 pipe service
//! unavailable: ...`); results it did send count. A kept connection that
//! ends before any answer is tried once more on a new connection. The wait
//! is bounded by the agent's own timeouts: for LMTP and SMTP a connect,
//! one command per recipient and [`SESSION_COMMANDS`] more; for pipe the
//! command `timeout` per recipient; and [`REPLY_MARGIN`].

use crate::route::{Agents, Batch, Destination, RcptResult, Report, Status};
use mortal_proto::config::Config;
use mortal_proto::delivery::{self, Envelope, Recipient, ReportDecoder};
use mortal_proto::queue_file::QueueFile;
use mortal_proto::service::Service;
use mortal_proto::smtp_status::{EnhancedStatus, StatusClass};
use std::collections::HashMap;
use std::io::{self, IoSlice, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Time allowed beyond the agent's own limits: waiting for a free agent
/// process and moving the message.
pub const REPLY_MARGIN: Duration = Duration::from_secs(30);
/// Replies an LMTP/SMTP transaction waits for besides one per recipient:
/// greeting, EHLO, STARTTLS and EHLO again, MAIL, DATA, end of data, and
/// the RSET that probes a reused session.
pub const SESSION_COMMANDS: u32 = 8;
/// Content records per gathered write: two slices each, well under the
/// kernel's IOV_MAX (1024).
const RECORDS_PER_WRITE: usize = 256;
/// Octets read from the agent at a time.
const READ_CHUNK: usize = 8192;

/// What a recipient the agent did not answer for gets: `4.3.0`, "other
/// or undefined mail system status" (RFC 3463), retried later.
const UNAVAILABLE: EnhancedStatus = EnhancedStatus::new(StatusClass::Persistent, 3, 0);

/// What a deferral says when `agent` gave no result: `lmtp delivery
/// agent unavailable`, `smtp delivery agent unavailable` (operators and
/// their log parsers know the pipe one, `pipe service unavailable`, from
/// before it was an agent).
fn unavailable(agent: Service) -> String {
    match agent {
        Service::Pipe => "pipe service unavailable".into(),
        _ => format!("{agent} delivery agent unavailable"),
    }
}

/// The relay logged when the agent named none: a network agent that
/// never answered reached no next hop; pipe is always its own relay.
fn silent_relay(agent: Service) -> &'static str {
    match agent {
        Service::Pipe => "pipe",
        _ => "none",
    }
}

/// The longest wait for the whole report on `recipients`: what the
/// agent's own limits allow it, and [`REPLY_MARGIN`].
fn report_wait(agent: Service, config: &Config, recipients: usize) -> Duration {
    let d = &config.delivery;
    let n = u32::try_from(recipients).unwrap_or(u32::MAX);
    let own = match agent {
        // The command's `timeout`, per recipient.
        Service::Pipe => d.connect_timeout.saturating_add(d.pipe.timeout.saturating_mul(n)),
        // A connect, and one command per recipient and the session's own.
        _ => d.connect_timeout.saturating_add(d.command_timeout.saturating_mul(SESSION_COMMANDS.saturating_add(n))),
    };
    own.saturating_add(REPLY_MARGIN)
}

/// A kept connection: idle since, to which agent.
#[derive(Debug)]
struct Idle {
    stream: UnixStream,
    since: Instant,
    agent: Service,
}

#[derive(Debug, Default)]
struct State {
    /// Per destination, most recently used last.
    idle: HashMap<Destination, Vec<Idle>>,
    /// Deliveries running, per agent.
    busy: HashMap<Service, u32>,
}

/// Connections to the delivery agents: the ones kept idle per destination
/// for `keep` after their last use (the agent waits a little longer), and
/// how many deliveries each agent service is running. An agent process
/// holding a kept connection serves no one else, so when every process a
/// service may have is running a delivery or holding an idle connection,
/// the oldest idle one is closed for the delivery that needs an agent.
#[derive(Debug)]
pub struct Conns {
    state: Mutex<State>,
    keep: Duration,
}

impl Conns {
    pub fn new(keep: Duration) -> Self {
        Self { state: Mutex::new(State::default()), keep }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a delivery to `destination` through `agent`: the most
    /// recently used live connection kept for it, or `None` for a new one,
    /// after making room for it among `limit` agent processes.
    fn begin(&self, agent: Service, destination: &Destination, limit: u32) -> Option<UnixStream> {
        let mut state = self.lock();
        *state.busy.entry(agent).or_default() += 1;
        if let Some(list) = state.idle.get_mut(destination) {
            let mut found = None;
            while let Some(conn) = list.pop() {
                if conn.since.elapsed() <= self.keep && is_open(&conn.stream) {
                    found = Some(conn.stream);
                    break;
                }
            }
            if list.is_empty() {
                state.idle.remove(destination);
            }
            if found.is_some() {
                return found;
            }
        }
        let held = state.idle.values().flatten().filter(|c| c.agent == agent).count() as u64;
        if u64::from(state.busy[&agent]) + held > u64::from(limit) {
            let oldest = state
                .idle
                .iter()
                .flat_map(|(d, l)| l.iter().enumerate().map(move |(i, c)| (c.since, d.clone(), i, c.agent)))
                .filter(|(.., a)| *a == agent)
                .min_by_key(|(since, ..)| *since);
            if let Some((_, dest, i, _)) = oldest {
                let list = state.idle.get_mut(&dest).expect("found above");
                drop(list.remove(i));
                if list.is_empty() {
                    state.idle.remove(&dest);
                }
            }
        }
        None
    }

    /// Ends a delivery; keeps `stream` for the next one to `destination`.
    fn end(&self, agent: Service, destination: &Destination, stream: Option<UnixStream>) {
        let mut state = self.lock();
        let busy = state.busy.entry(agent).or_default();
        *busy = busy.saturating_sub(1);
        if let Some(stream) = stream.filter(|_| !self.keep.is_zero()) {
            state.idle.entry(destination.clone()).or_default().push(Idle { stream, since: Instant::now(), agent });
        }
    }

    /// Closes connections idle for longer than `keep`.
    pub fn expire(&self) {
        let mut state = self.lock();
        for list in state.idle.values_mut() {
            list.retain(|c| c.since.elapsed() <= self.keep);
        }
        state.idle.retain(|_, l| !l.is_empty());
    }

    /// Closes every idle connection (at shutdown).
    pub fn expire_all(&self) {
        self.lock().idle.clear();
    }

    /// Idle connections kept (tests).
    #[cfg(test)]
    fn idle_count(&self) -> usize {
        self.lock().idle.values().map(Vec::len).sum()
    }
}

/// Whether a kept connection is still open and quiet: an agent that died
/// or closed it shows end of stream, and one that sent something unasked
/// is not to be trusted with the next request.
fn is_open(stream: &UnixStream) -> bool {
    let mut b = [0u8; 1];
    let flags = nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT;
    matches!(nix::sys::socket::recv(stream.as_raw_fd(), &mut b, flags), Err(nix::errno::Errno::EAGAIN))
}

/// Hands `batch` to its route's delivery agent.
pub fn deliver(agents: &Agents, batch: &Batch, qf: &QueueFile) -> Report {
    let config = &agents.config;
    let agent = batch.route.agent().expect("only agents' routes are sent here");
    let envelope = Envelope {
        queue_id: qf.id,
        route: batch.route.clone(),
        sender: qf.sender.address.clone(),
        body: qf.sender.body,
        smtputf8: qf.sender.smtputf8,
        ret: qf.sender.ret,
        envid: qf.sender.envid.clone(),
    };
    let recipients: Vec<Recipient> = batch
        .rcpts
        .iter()
        .map(|&i| {
            let r = &qf.recipients[i];
            Recipient { address: r.address.clone(), notify: r.notify, orcpt: r.orcpt.clone() }
        })
        .collect();
    let mut decoder = ReportDecoder::new(recipients.len());
    let kept = agents.conns.begin(agent, &batch.destination, config.process.policy(agent).process_limit);
    let reused = kept.is_some();
    let mut result = exchange(agents, agent, kept, &envelope, &recipients, &qf.content, &mut decoder);
    // A kept connection the agent gave up just as this request went out
    // (its idle time, an order to retire) ends before any answer: the
    // request was not taken, so it goes again on a new connection. An
    // agent that died inside the delivery looks the same; sending again
    // at once repeats a delivery no more than the retry after a deferral
    // would (at least once), and happens once only.
    if reused && result.is_err() && decoder.relay().is_none() {
        decoder = ReportDecoder::new(recipients.len());
        result = exchange(agents, agent, None, &envelope, &recipients, &qf.content, &mut decoder);
    }
    let relay = decoder.relay().unwrap_or(silent_relay(agent)).to_owned();
    let keep = decoder.keep();
    let mut results = decoder.into_results();
    let stream = match result {
        Ok(stream) => keep.then_some(stream),
        Err(e) => {
            let text = format!("{}: {e}", unavailable(agent));
            results.resize_with(recipients.len(), || RcptResult::new(Status::Deferred, UNAVAILABLE, text.clone()));
            None
        }
    };
    agents.conns.end(agent, &batch.destination, stream);
    Report { relay, results }
}

/// Sends the request over `kept` or a new connection and reads the report
/// into `decoder`; returns the connection once the report is whole.
fn exchange(
    agents: &Agents,
    agent: Service,
    kept: Option<UnixStream>,
    envelope: &Envelope,
    recipients: &[Recipient],
    content: &[u8],
    decoder: &mut ReportDecoder,
) -> io::Result<UnixStream> {
    let d = &agents.config.delivery;
    let wait = report_wait(agent, &agents.config, recipients.len());
    let socket = agents.config.agent_socket(agent);
    let deadline = Instant::now() + wait;
    let (stream, fresh) = match kept {
        Some(s) => (s, false),
        None => {
            let s = connect(&socket, d.connect_timeout)
                .map_err(|e| io::Error::new(e.kind(), format!("connect to {}: {e}", socket.display())))?;
            (s, true)
        }
    };
    stream.set_write_timeout(Some(wait))?;
    {
        // One gathered write per batch of records, the content straight
        // from the queue file's buffer: no copy, and no 64 KiB staging
        // buffer allocated (and given back to the system) per delivery.
        let mut head = if fresh { delivery::hello() } else { Vec::new() };
        head.extend_from_slice(&delivery::encode_head(envelope, recipients));
        let records: Vec<([u8; 5], &[u8])> = delivery::content_records(content).collect();
        let mut first = Some(head.as_slice());
        for group in records.chunks(RECORDS_PER_WRITE) {
            let mut slices: Vec<IoSlice<'_>> = first.take().map(IoSlice::new).into_iter().collect();
            for (header, chunk) in group {
                slices.push(IoSlice::new(header));
                slices.push(IoSlice::new(chunk));
            }
            write_all_vectored(&stream, &mut slices)?;
        }
    }
    let mut buf = [0u8; READ_CHUNK];
    let mut reader = &stream;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, format!("no report within {}s", wait.as_secs())));
        }
        stream.set_read_timeout(Some(left))?;
        let n = match reader.read(&mut buf) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed before every result")),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                return Err(io::Error::new(io::ErrorKind::TimedOut, format!("no report within {}s", wait.as_secs())));
            }
            Err(e) => return Err(e),
        };
        let whole = decoder
            .feed(&buf[..n])
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("protocol error: {e}")))?;
        if whole {
            return Ok(stream);
        }
    }
}

/// `write_all` for gathered writes (std's is unstable).
fn write_all_vectored(mut out: impl Write, mut slices: &mut [IoSlice<'_>]) -> io::Result<()> {
    IoSlice::advance_slices(&mut slices, 0);
    while !slices.is_empty() {
        match out.write_vectored(slices) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "agent connection took no more")),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Connects to an agent's socket, waiting at most `limit`: a Unix stream
/// connect blocks while the listener's backlog is full (every agent busy),
/// for as long as the socket's send timeout allows.
fn connect(path: &Path, limit: Duration) -> io::Result<UnixStream> {
    let socket = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)?;
    socket.set_write_timeout(Some(limit))?;
    socket.connect(&socket2::SockAddr::unix(path)?)?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mortal_proto::config::{Config, NextHop, Route};
    use mortal_proto::delivery::RequestDecoder;
    use mortal_proto::envelope::{BodyType, ClientInfo, SenderInfo};
    use mortal_proto::queue_file::{QueuedRecipient, RecipientState};
    use std::os::unix::net::UnixListener;

    fn queue_file() -> QueueFile {
        let rcpt = |a: &str| QueuedRecipient {
            address: a.into(),
            state: RecipientState::Pending,
            notify: Default::default(),
            orcpt: String::new(),
            status: None,
        };
        QueueFile {
            id: "0000000010000100000A".parse().unwrap(),
            arrival: std::time::UNIX_EPOCH,
            client: ClientInfo {
                addr: std::net::Ipv4Addr::LOCALHOST.into(),
                name: String::new(),
                helo: String::new(),
                protocol: String::new(),
                tls: String::new(),
                auth: None,
            },
            sender: SenderInfo {
                address: "a@example.test".into(),
                body: BodyType::SevenBit,
                smtputf8: false,
                ret: None,
                envid: String::new(),
            },
            recipients: vec![rcpt("x@lmtp.test"), rcpt("y@lmtp.test")],
            content: b"Subject: t\r\n\r\nbody\r\n".to_vec(),
        }
    }

    fn temp_dir(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("mortal-queue-transport-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("private")).unwrap();
        dir
    }

    fn agents(dir: &Path) -> Agents {
        let text = format!(
            "[server]\nrun_dir = {:?}\n[delivery]\ntransport = \"lmtp:inet:127.0.0.1:24\"\nconnection_reuse_time = \"10s\"\n",
            dir.display().to_string()
        );
        Agents::new(Config::parse_for(&text, &dir.join("m.toml"), false).unwrap())
    }

    fn batch() -> Batch {
        let route = Route::Lmtp(NextHop::Inet("127.0.0.1:24".parse().unwrap()));
        Batch { destination: Destination::NextHop(route.clone()), route, rcpts: vec![0, 1] }
    }

    /// Reads from a scripted agent's connection until a whole request
    /// arrived.
    fn next_request(s: &mut UnixStream, decoder: &mut RequestDecoder) -> delivery::Request {
        let mut buf = [0u8; 4096];
        loop {
            let n = s.read(&mut buf).unwrap();
            if let Some(r) = decoder.feed(&buf[..n]).unwrap() {
                return r;
            }
        }
    }

    fn pipe_agents(dir: &Path) -> Agents {
        let text = format!(
            "[server]\nrun_dir = {:?}\n[delivery]\ntransport = \"pipe\"\nconnection_reuse_time = \"10s\"\n[delivery.pipe]\ncommand = [\"/bin/true\"]\nuser = \"pipeuser\"\ntimeout = \"1s\"\n",
            dir.display().to_string()
        );
        Agents::new(Config::parse_for(&text, &dir.join("m.toml"), false).unwrap())
    }

    fn pipe_batch() -> Batch {
        Batch {
            route: Route::Pipe,
            destination: Destination::Domain(Route::Pipe, "pipe.test".into()),
            rcpts: vec![0, 1],
        }
    }

    /// No agent: every recipient is deferred with a clear reason (for
    /// pipe in the words operators know, and pipe is still the relay).
    #[test]
    fn unreachable_agent_defers_everyone() {
        let dir = temp_dir("none");
        let cases = [
            (agents(&dir), batch(), "none", "lmtp delivery agent"),
            (pipe_agents(&dir), pipe_batch(), "pipe", "pipe service"),
        ];
        for (agents, batch, relay, who) in cases {
            let report = deliver(&agents, &batch, &queue_file());
            assert_eq!(report.relay, relay);
            assert_eq!(report.results.len(), 2);
            for r in &report.results {
                assert_eq!((r.status, r.dsn), (Status::Deferred, UNAVAILABLE));
                assert!(r.text.starts_with(&format!("{who} unavailable: connect to ")), "{}", r.text);
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The pipe agent sends the header, then each result as its command
    /// ends; it dies after the first: that one counts, the other is
    /// deferred, and the connection (one request only) is not kept.
    #[test]
    fn pipe_results_sent_before_the_agent_died_count() {
        let dir = temp_dir("pipe-died");
        let agents = pipe_agents(&dir);
        let listener = UnixListener::bind(agents.config.agent_socket(Service::Pipe)).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let request = next_request(&mut s, &mut RequestDecoder::new(1 << 20));
            let mut out = Vec::new();
            delivery::Report::encode_header("pipe", false, &mut out);
            RcptResult::delivered("delivered via pipe service").encode(&mut out);
            s.write_all(&out).unwrap();
            request
        });
        let report = deliver(&agents, &pipe_batch(), &queue_file());
        let request = server.join().unwrap();
        assert_eq!(request.envelope.route, Route::Pipe);
        assert_eq!(request.recipients.len(), 2);
        assert_eq!(request.content, queue_file().content);
        assert_eq!(report.relay, "pipe");
        assert_eq!(report.results[0].status, Status::Sent);
        assert_eq!(report.results[0].success_action, Some(mortal_proto::smtp_status::DsnAction::Delivered));
        assert_eq!(report.results[1].status, Status::Deferred);
        assert_eq!(
            report.results[1].text, "pipe service unavailable: connection closed before every result",
            "{:?}",
            report.results[1]
        );
        assert_eq!(agents.conns.idle_count(), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Every agent process busy (the listener's backlog full): the connect
    /// gives up after its limit instead of blocking the delivery thread.
    #[test]
    fn connect_to_a_full_backlog_is_bounded() {
        let dir = temp_dir("full");
        let path = dir.join("private/full");
        let listener = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None).unwrap();
        listener.bind(&socket2::SockAddr::unix(&path).unwrap()).unwrap();
        // Backlog 0: one connection waits, the next finds the queue full.
        listener.listen(0).unwrap();
        let limit = Duration::from_millis(300);
        let mut queued = Vec::new();
        let started = Instant::now();
        let err = loop {
            match connect(&path, limit) {
                Ok(s) => queued.push(s),
                Err(e) => break e,
            }
            assert!(queued.len() < 8, "connections kept being accepted with a backlog of 0");
        };
        let waited = started.elapsed();
        assert!(matches!(err.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut), "{err:?}");
        assert!(waited >= limit && waited < limit * 10, "waited {waited:?} for a limit of {limit:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A scripted agent: answers the first request and keeps the
    /// connection, answers the second on the same connection and breaks
    /// the protocol after its first result. The second batch's first
    /// result counts, the other is deferred; a connection that broke is
    /// not kept.
    #[test]
    fn connection_is_reused_and_results_before_a_protocol_error_count() {
        let dir = temp_dir("reuse");
        let agents = agents(&dir);
        let listener = UnixListener::bind(agents.config.agent_socket(Service::Lmtp)).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut decoder = RequestDecoder::new(1 << 20);
            let mut got = Vec::new();
            for round in 0..2 {
                let request = next_request(&mut s, &mut decoder);
                let mut out = Vec::new();
                let ok = RcptResult::delivered("250 2.0.0 Ok");
                if round == 0 {
                    Report { relay: "127.0.0.1[127.0.0.1]:24".into(), results: vec![ok.clone(), ok] }
                        .encode(true, &mut out);
                } else {
                    Report { relay: "127.0.0.1[127.0.0.1]:24".into(), results: vec![ok] }.encode(true, &mut out);
                    out.extend_from_slice(b"garbage!");
                }
                s.write_all(&out).unwrap();
                decoder.answered();
                got.push(request);
            }
            got
        });
        let first = deliver(&agents, &batch(), &queue_file());
        assert!(first.results.iter().all(|r| r.status == Status::Sent), "{first:?}");
        let second = deliver(&agents, &batch(), &queue_file());
        let requests = server.join().unwrap();
        assert_eq!(requests.len(), 2, "both batches over one connection");
        assert_eq!(requests[0].envelope.queue_id, "0000000010000100000A");
        assert_eq!(requests[1].content, queue_file().content);
        assert_eq!(second.relay, "127.0.0.1[127.0.0.1]:24");
        assert_eq!(second.results[0].status, Status::Sent);
        assert_eq!(second.results[1].status, Status::Deferred);
        assert!(
            second.results[1].text.starts_with("lmtp delivery agent unavailable: protocol error"),
            "{:?}",
            second.results[1]
        );
        assert_eq!(agents.conns.idle_count(), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// With every agent process taken (limit 1) by an idle connection
    /// kept for one next hop, a delivery to another next hop closes that
    /// connection, so the agent holding it comes free, instead of waiting
    /// for its idle time to pass.
    #[test]
    fn an_idle_kept_connection_gives_way_when_every_agent_is_taken() {
        let dir = temp_dir("evict");
        let text = format!(
            "[server]\nrun_dir = {:?}\n[delivery]\nconnection_reuse_time = \"60s\"\n[delivery.routes]\n\"a.test\" = \"lmtp:inet:127.0.0.1:24\"\n\"b.test\" = \"lmtp:inet:127.0.0.2:24\"\n[process.lmtp]\nprocess_limit = 1\nprefork = 1\nmin_spare = 0\nmax_spare = 1\n",
            dir.display().to_string()
        );
        let agents = Agents::new(Config::parse_for(&text, &dir.join("m.toml"), false).unwrap());
        let listener = UnixListener::bind(agents.config.agent_socket(Service::Lmtp)).unwrap();
        // One agent process: one connection at a time.
        let server = std::thread::spawn(move || {
            let mut ends = Vec::new();
            for _ in 0..2 {
                let (mut s, _) = listener.accept().unwrap();
                let request = next_request(&mut s, &mut RequestDecoder::new(1 << 20));
                let mut out = Vec::new();
                let results = vec![RcptResult::delivered("250 2.0.0 Ok"); request.recipients.len()];
                Report { relay: request.envelope.route.to_string(), results }.encode(true, &mut out);
                s.write_all(&out).unwrap();
                // Kept: wait for the next request or the end.
                ends.push(s.read(&mut [0u8; 4096]).unwrap());
            }
            ends
        });
        let batch = |domain: &str, hop: &str| {
            let route = Route::Lmtp(NextHop::Inet(hop.parse().unwrap()));
            let mut qf = queue_file();
            qf.recipients.truncate(1);
            qf.recipients[0].address = format!("x@{domain}");
            (Batch { destination: Destination::NextHop(route.clone()), route, rcpts: vec![0] }, qf)
        };
        let (a, qa) = batch("a.test", "127.0.0.1:24");
        assert_eq!(deliver(&agents, &a, &qa).results[0].status, Status::Sent);
        assert_eq!(agents.conns.idle_count(), 1);
        let (b, qb) = batch("b.test", "127.0.0.2:24");
        assert_eq!(deliver(&agents, &b, &qb).results[0].status, Status::Sent);
        agents.conns.expire_all();
        assert_eq!(server.join().unwrap(), vec![0, 0], "both kept connections ended unused");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// An agent that gives up a kept connection just as the next request
    /// goes out (it read nothing, answered nothing): the request goes again
    /// on a new connection instead of being deferred.
    #[test]
    fn a_kept_connection_closed_unanswered_is_retried_once_on_a_new_one() {
        let dir = temp_dir("closed");
        let agents = agents(&dir);
        let listener = UnixListener::bind(agents.config.agent_socket(Service::Lmtp)).unwrap();
        let server = std::thread::spawn(move || {
            let answer = |s: &mut UnixStream, decoder: &mut RequestDecoder| {
                next_request(s, decoder);
                let ok = RcptResult::delivered("250 2.0.0 Ok");
                let mut out = Vec::new();
                Report { relay: "hop".into(), results: vec![ok.clone(), ok] }.encode(true, &mut out);
                s.write_all(&out).unwrap();
                decoder.answered();
            };
            let (mut first, _) = listener.accept().unwrap();
            answer(&mut first, &mut RequestDecoder::new(1 << 20));
            // The next request arrives; the connection closes unanswered.
            let mut byte = [0u8; 1];
            first.read_exact(&mut byte).unwrap();
            drop(first);
            let (mut second, _) = listener.accept().unwrap();
            answer(&mut second, &mut RequestDecoder::new(1 << 20));
        });
        assert!(deliver(&agents, &batch(), &queue_file()).results.iter().all(|r| r.status == Status::Sent));
        let again = deliver(&agents, &batch(), &queue_file());
        server.join().unwrap();
        assert!(again.results.iter().all(|r| r.status == Status::Sent), "{again:?}");
        assert_eq!(again.relay, "hop");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

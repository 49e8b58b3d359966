//! The I/O driver: runs one [`Session`] over a TCP connection, with the
//! timers, and carries out its cleanup conversation over the private
//! `cleanup` socket (`mortal_proto::ipc`).
//!
//! The driver decides nothing about SMTP. It writes what the engine
//! replies (batched: pending replies go out when the session wants more
//! input, which is what makes a pipelined group one write), reads with
//! `smtpd.timeout` per read, and turns each transaction step into IPC
//! records: `Hello`, `Client`, `Sender` and a wait for `QueueId` when MAIL
//! is accepted; one `Recipient` per accepted RCPT; `Data` records as
//! content arrives, written in batches of at most `CLEANUP_WRITE_BATCH`
//! octets (never the whole message in memory); `End` and a wait
//! for `Answer`. Whatever goes wrong with cleanup (unreachable, timeout,
//! garbage, hang-up) is reported to the session as a failure, which turns
//! into `451 4.3.0`: a client only ever hears 250 after cleanup said 250.
//! RSET, QUIT and lost clients simply drop the cleanup connection, and
//! cleanup discards the unfinished message.
//!
//! On [`Action::StartTls`] the driver writes the pending `220`, runs the
//! TLS handshake on the same socket (bounded by `tls_handshake_timeout`)
//! and from then on reads and writes through TLS. On [`Action::Sleep`] it
//! waits (the error tarpit). While the session reads message content it
//! also enforces `min_data_rate`: over each `data_rate_window` of time
//! spent waiting for the client, at least that many octets per second must
//! arrive, or the session ends with `421 4.4.2`; a slowloris can hold a
//! child no longer than one window.
//!
//! On a `submissions_listen` address the handshake comes first, before
//! the greeting (RFC 8314 implicit TLS). AUTH's exchanges go to the
//! process's authentication server ([`crate::sasl`]), one at a time; a
//! failure is counted by anvil, and a client past `[smtpd.auth]
//! failure_limit` is refused AUTH.

use crate::dns::ReverseResolver;
use crate::engine::AuthAnswer;
use crate::engine::{Action, Answer, Session};
use crate::filter::restrict::Restrictor;
use crate::filter::verdict::{CheckStage, RefusedBy, Verdict};
use crate::filter::{Endpoints, Filters, PolicyClients};
use crate::relay::RelayPolicy;
use crate::sasl::{SaslClientInfo, SaslError, SaslServer};
use crate::tls::TlsServer;
use mortal_proto::config::{Config, ListenerRole};
use mortal_proto::dovecot_auth::{MechanismName, SaslReply};
use mortal_proto::envelope::{ClientInfo, RecipientInfo, SenderInfo};
use mortal_proto::ipc::{self, Decoder, IpcError, PROTOCOL_VERSION, Reply, Request};
use mortal_proto::queue_id::QueueId;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::time::timeout;
use tokio_rustls::server::TlsStream;

/// Octets read from the client at a time. This also bounds what one read
/// adds to the session's buffer, since the session handles each read
/// before the next one.
pub const READ_BUFFER: usize = 16 * 1024;

/// Octets read from cleanup at a time; its replies are small records.
const CLEANUP_READ_BUFFER: usize = 1024;

/// Message content collected before it is written to cleanup. Content
/// arrives in pieces of one client read; writing each piece would cost a
/// system call and a wake-up of cleanup per piece. Records other than
/// content go out at once (after the content before them), and `End`
/// flushes the rest, so this bounds only the memory a session holds.
const CLEANUP_WRITE_BATCH: usize = 64 * 1024;

/// How long to wait for cleanup's parting answer after it hung up on us
/// mid-transaction. It has either written one already or never will.
const ANSWER_AFTER_HANGUP_WAIT: Duration = Duration::from_secs(1);

/// What every session of this process shares, set up once at process
/// start (before the sandbox) and handed to [`session`].
pub struct Server {
    pub config: Arc<Config>,
    /// The RCPT rule, with the recipient map loaded at start.
    pub relay: Arc<RelayPolicy>,
    /// What STARTTLS uses (the session offers it when `[smtpd]` says so).
    pub tls: Option<TlsServer>,
    /// Looks the client's name up (when `[smtpd] reverse_lookup` made one).
    pub resolver: Option<ReverseResolver>,
    /// Present once [`install_term_handler`] ran: only then does a session
    /// listen for SIGTERM.
    pub term: Option<TermHandler>,
    /// The policy servers' connections, kept from one session to the next.
    pub policy: PolicyClients,
    /// `[smtpd.restrictions]` and `[smtpd.dnsbl]`: tables and resolvers.
    pub restrictor: Arc<Restrictor>,
    /// What this process's listener is for.
    pub role: ListenerRole,
    /// Dovecot's authentication service, where this listener offers AUTH;
    /// the connection is kept from one session to the next.
    pub sasl: Option<Arc<tokio::sync::Mutex<SaslServer>>>,
}

impl Server {
    /// A server with `relay` and nothing else: no STARTTLS, no reverse
    /// lookups, no restriction tables or DNS checks, and SIGTERM left
    /// alone.
    pub fn new(config: Arc<Config>, relay: RelayPolicy) -> Server {
        let policy = crate::filter::policy_clients(&config);
        let restrictor = Arc::new(Restrictor::default());
        Server {
            config,
            relay: Arc::new(relay),
            tls: None,
            resolver: None,
            term: None,
            policy,
            restrictor,
            role: ListenerRole::Mx,
            sasl: None,
        }
    }
}

/// How a session ended, for the process to act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "after SessionEnd::Terminated the process must exit"]
pub enum SessionEnd {
    /// The session is over (QUIT, an error, a lost client); serve the next.
    Finished,
    /// SIGTERM arrived during the session (the master's session deadline or
    /// overdue grace), which ended it with 421: the process must exit now.
    Terminated,
}

/// Serves one SMTP session on `stream` and logs its end. The client's name
/// is looked up through `server.resolver`, if any, before the greeting,
/// bounded by `reverse_lookup_timeout`; clients refused at connect for
/// their limits cost no lookup and stay `unknown`. Never fails: every
/// problem ends up in the log and, where possible, in a reply.
///
/// A client postscreen passed on (`handoff`) has had the greeting: its
/// session starts with the input postscreen read, its first command.
pub async fn session(
    server: &Server,
    stream: std::net::TcpStream,
    handoff: Option<mortal_proto::handoff::Handoff>,
) -> SessionEnd {
    let config = &server.config;
    // The real client (behind a PROXY header) and its per-client limits.
    let Some(mut peer) = crate::peer::establish(config, &stream).await else { return SessionEnd::Finished };
    let name = match &server.resolver {
        Some(resolver) => resolver.client_name(peer.addr).await,
        None => crate::engine::UNKNOWN_NAME.to_owned(),
    };
    peer.limits.set_name(&name);
    mortal_libmaster::log::record_client(format_args!("{name}[{}]", peer.addr));
    let mut buf = vec![0; READ_BUFFER];
    if let Err(e) = stream.set_nonblocking(true) {
        tracing::warn!("warning: set non-blocking: {e}");
        return SessionEnd::Finished;
    }
    let mut filters = filters_for(server, &stream, &peer);
    if let (Some(filters), Some(score)) = (&mut filters, handoff.as_ref().and_then(|h| h.dnsbl_score)) {
        filters.screened_by_postscreen(score);
    }
    let local = stream.local_addr().unwrap_or_else(|_| std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
    let sasl_client = SaslClientInfo { remote: std::net::SocketAddr::new(peer.addr, peer.port), local, secured: false };
    let relay = Arc::clone(&server.relay);
    let implicit = server.role == ListenerRole::Submissions;
    // RFC 8314: on a submissions listener TLS comes from the first octet
    // and the greeting goes out inside it; elsewhere, whatever the client
    // said before the greeting is looked at now.
    let plain = (!implicit).then(|| match &handoff {
        Some(handoff) if handoff.greeted => {
            let mut session =
                Session::greeted_by_postscreen(Arc::clone(config), Arc::clone(&relay), peer.addr, &name, server.role);
            session.feed(&handoff.input);
            session
        }
        _ => {
            let mut session =
                Session::on_listener(Arc::clone(config), Arc::clone(&relay), peer.addr, &name, server.role, None);
            session.early_input(&peer.early);
            if let Some(handoff) = &handoff {
                session.feed(&handoff.input);
            } else {
                look_before_greeting(&stream, &mut session, &mut buf);
            }
            session
        }
    });
    let tcp = match TcpStream::from_std(stream) {
        Ok(tcp) => tcp,
        Err(e) => {
            tracing::warn!("warning: register connection: {e}");
            return SessionEnd::Finished;
        }
    };
    let (stream, mut session) = match plain {
        Some(session) => (Stream::Plain(tcp), session),
        None => match implicit_tls(server, tcp, &format!("{name}[{}]", peer.addr)).await {
            Some((tls, info)) => {
                let session =
                    Session::on_listener(Arc::clone(config), relay, peer.addr, &name, server.role, Some(info));
                (Stream::Tls(Box::new(tls)), session)
            }
            None => return SessionEnd::Finished,
        },
    };
    let mut conn = Connection {
        stream,
        sasl: server.sasl.clone(),
        sasl_client,
        tls: server.tls.clone(),
        start_tls: false,
        handshake_timeout: config.smtpd.tls_handshake_timeout,
        rate: None,
        min_data_rate: config.smtpd.min_data_rate,
        data_rate_window: config.smtpd.data_rate_window,
        out: Vec::new(),
        writable: true,
        timeout: config.smtpd.timeout,
        // Inside smtpd's chroot the socket has a shorter name.
        cleanup_socket: mortal_libmaster::sandbox::visible_path(&config.cleanup_socket()),
        cleanup: CleanupState::Idle,
        limits: peer.limits,
        filters,
    };
    // SIGTERM (the master's session deadline or overdue grace) ends the
    // session with a 421 where the client can still take one, and then
    // the process: see `install_term_handler`.
    let terminated = tokio::select! {
        () = conn.run(&mut session, &mut buf) => false,
        () = terminated(server.term.as_ref()) => true,
    };
    if terminated {
        conn.shutting_down(&config.server.hostname).await;
    }
    if let Some(filters) = &mut conn.filters {
        filters.quit().await;
    }
    conn.stream.shutdown().await;
    tracing::info!("{}", session.finish());
    if terminated { SessionEnd::Terminated } else { SessionEnd::Finished }
}

/// The session's filters, when any are configured.
fn filters_for(server: &Server, stream: &std::net::TcpStream, peer: &crate::peer::Peer) -> Option<Filters> {
    let smtpd = &server.config.smtpd;
    let restricted = smtpd.restrictions.all().next().is_some() || smtpd.dnsbl.enabled();
    if smtpd.milters.is_empty() && smtpd.policy.is_empty() && !restricted {
        return None;
    }
    let client = std::net::SocketAddr::new(peer.addr, peer.port);
    let server_addr = stream.local_addr().unwrap_or_else(|_| std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
    let endpoints = Endpoints { client, server: server_addr };
    Some(Filters::new(
        Arc::clone(&server.config),
        Arc::clone(&server.policy),
        Arc::clone(&server.restrictor),
        endpoints,
    ))
}

/// Longest wait to hand the client its `421` after SIGTERM: less than the
/// master's grace before SIGKILL.
const TERM_REPLY_TIMEOUT: Duration = Duration::from_secs(1);

/// Proof that [`install_term_handler`] ran. A session may subscribe to
/// SIGTERM only then, because installing the handler later is a system
/// call (`rt_sigaction`) that smtpd's seccomp filter kills the process for.
#[derive(Debug)]
pub struct TermHandler(());

/// Installs the SIGTERM handler that lets a session end with `421 4.3.2
/// <host> Service shutting down`. Call once, in `runtime`, before the
/// sandbox, and put the result in [`Server::term`]. From then on SIGTERM
/// never kills smtpd by itself: during a session it ends the session,
/// which returns [`SessionEnd::Terminated`] for the process to exit;
/// between sessions the master never sends it without SIGKILL following.
pub fn install_term_handler(runtime: &tokio::runtime::Runtime) -> io::Result<TermHandler> {
    let _in_runtime = runtime.enter();
    // The handler stays installed when this first listener is dropped.
    drop(tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?);
    Ok(TermHandler(()))
}

/// Completes when SIGTERM arrives during this session.
async fn terminated(handler: Option<&TermHandler>) {
    use tokio::signal::unix::{SignalKind, signal};
    if handler.is_some()
        && let Ok(mut term) = signal(SignalKind::terminate())
    {
        term.recv().await;
        return;
    }
    std::future::pending().await
}

/// Anything already readable before the greeting was sent was sent by a
/// client that did not wait for it. Checked once, without waiting, so an
/// honest client never pays for it and never trips it.
fn look_before_greeting(stream: &std::net::TcpStream, session: &mut Session, buf: &mut [u8]) {
    match (&*stream).read(buf) {
        Ok(0) => session.connection_lost(),
        Ok(n) => session.early_input(&buf[..n]),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => {}
        Err(_) => session.connection_lost(),
    }
}

/// The handshake of a `submissions_listen` connection, before the
/// greeting, bounded by `tls_handshake_timeout`. A failure is logged in
/// Postfix's words (there is no session yet to do it).
async fn implicit_tls(
    server: &Server,
    tcp: TcpStream,
    client: &str,
) -> Option<(TlsStream<TcpStream>, mortal_proto::tls::TlsSummary)> {
    let why = match &server.tls {
        None => "TLS is not available".to_owned(),
        Some(tls) => match timeout(server.config.smtpd.tls_handshake_timeout, tls.acceptor().accept(tcp)).await {
            Ok(Ok(stream)) => {
                let info = mortal_proto::tls::TlsSummary::of(stream.get_ref().1);
                return Some((stream, info));
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => "handshake timeout exceeded".to_owned(),
        },
    };
    tracing::info!("connect from {client}");
    tracing::info!("SSL_accept error from {client}: {why}");
    tracing::info!("lost connection after CONNECT from {client}");
    tracing::info!("disconnect from {client} commands=0");
    None
}

/// Where the current transaction's cleanup conversation stands.
enum CleanupState {
    /// No transaction.
    Idle,
    Open(Cleanup),
    /// The conversation failed and the session was told once. Actions the
    /// session queued before it heard are for that dead transaction and
    /// are dropped, so one failure is never reported twice.
    Broken,
}

/// The client connection, before and after STARTTLS.
enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    /// A handshake failed and took the socket with it.
    Gone,
}

impl Stream {
    async fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(tcp) => tcp.read(buf).await,
            Stream::Tls(tls) => tls.read(buf).await,
            Stream::Gone => Ok(0),
        }
    }

    async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Stream::Plain(tcp) => tcp.write_all(bytes).await,
            Stream::Tls(tls) => {
                tls.write_all(bytes).await?;
                tls.flush().await
            }
            Stream::Gone => Err(io::ErrorKind::NotConnected.into()),
        }
    }

    /// Ends the connection politely (TLS close_notify, then FIN). Bounded:
    /// a client that stops reading cannot hold the child here.
    async fn shutdown(&mut self) {
        let _ = match self {
            Stream::Plain(tcp) => timeout(SHUTDOWN_WAIT, tcp.shutdown()).await,
            Stream::Tls(tls) => timeout(SHUTDOWN_WAIT, tls.shutdown()).await,
            Stream::Gone => return,
        };
    }
}

/// Longest wait for the final close of a connection.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);

/// The client's content rate over the current window (`min_data_rate`).
/// Only time spent waiting for the client counts, not time spent waiting
/// for cleanup.
#[derive(Debug, Default)]
struct DataRate {
    waited: Duration,
    octets: u64,
}

impl DataRate {
    /// Adds one read; at the end of a window, returns the octets per second
    /// the client managed over it and starts the next window.
    fn record(&mut self, waited: Duration, octets: usize, window: Duration) -> Option<u64> {
        self.waited += waited;
        self.octets += octets as u64;
        if self.waited < window {
            return None;
        }
        let rate = u128::from(self.octets) * 1000 / self.waited.as_millis().max(1);
        *self = DataRate::default();
        Some(u64::try_from(rate).unwrap_or(u64::MAX))
    }
}

struct Connection {
    stream: Stream,
    /// The authentication server, where this listener offers AUTH.
    sasl: Option<Arc<tokio::sync::Mutex<SaslServer>>>,
    /// What the authentication server is told about the connection.
    sasl_client: SaslClientInfo,
    /// What STARTTLS uses; `None` refuses the handshake.
    tls: Option<TlsServer>,
    /// The session asked for TLS; the handshake runs after the 220 is out.
    start_tls: bool,
    handshake_timeout: Duration,
    /// Set while the session reads content and `min_data_rate` is on.
    rate: Option<DataRate>,
    min_data_rate: u64,
    data_rate_window: Duration,
    /// Replies not yet written.
    out: Vec<u8>,
    /// False once a write failed or timed out: later replies are dropped.
    writable: bool,
    timeout: Duration,
    cleanup_socket: PathBuf,
    cleanup: CleanupState,
    /// Per-client limits, and the anvil lease held for the session.
    limits: crate::peer::ClientLimits,
    /// The policy servers and milters, when configured.
    filters: Option<Filters>,
}

impl Connection {
    async fn run(&mut self, session: &mut Session, buf: &mut [u8]) {
        loop {
            self.perform(session).await;
            self.flush(session).await;
            if session.is_closed() {
                // A failed final write may have queued log lines.
                return self.perform(session).await;
            }
            if std::mem::take(&mut self.start_tls) {
                self.handshake(session).await;
                continue;
            }
            debug_assert!(session.wants_input(), "every cleanup step was answered");
            self.read(session, buf).await;
        }
    }

    /// One read from the client, bounded by `timeout` and, during content,
    /// by the end of the current data-rate window.
    async fn read(&mut self, session: &mut Session, buf: &mut [u8]) {
        let window = self.data_rate_window;
        if !session.in_content() || self.min_data_rate == 0 {
            self.rate = None;
        } else if self.rate.is_none() {
            self.rate = Some(DataRate::default());
        }
        let window_left = self.rate.as_ref().map(|r| window.saturating_sub(r.waited));
        let limit = window_left.map_or(self.timeout, |left| left.min(self.timeout));
        let started = Instant::now();
        let result = timeout(limit, self.stream.read(buf)).await;
        let octets = match &result {
            Ok(Ok(n)) => *n,
            _ => 0,
        };
        if let Some(rate) = self.rate.as_mut().and_then(|r| r.record(started.elapsed(), octets, window))
            && rate < self.min_data_rate
        {
            return session.too_slow(rate, self.min_data_rate);
        }
        match result {
            Err(_) if window_left.is_some_and(|left| left < self.timeout) => {}
            Err(_) => session.timed_out(),
            Ok(Ok(0) | Err(_)) => session.connection_lost(),
            Ok(Ok(n)) => session.feed(&buf[..n]),
        }
    }

    /// Runs the TLS handshake the session asked for and tells it how it went.
    async fn handshake(&mut self, session: &mut Session) {
        let (Some(tls), Stream::Plain(_)) = (&self.tls, &self.stream) else {
            return session.tls_failed("TLS is not available");
        };
        let acceptor = tls.acceptor().clone();
        let Stream::Plain(tcp) = std::mem::replace(&mut self.stream, Stream::Gone) else {
            unreachable!("matched Stream::Plain above")
        };
        match timeout(self.handshake_timeout, acceptor.accept(tcp)).await {
            Ok(Ok(stream)) => {
                let info = mortal_proto::tls::TlsSummary::of(stream.get_ref().1);
                self.stream = Stream::Tls(Box::new(stream));
                session.tls_established(info);
            }
            Ok(Err(e)) => session.tls_failed(&e.to_string()),
            Err(_) => session.tls_failed("handshake timeout exceeded"),
        }
    }

    /// Carries out every queued action, including the ones that the
    /// answers of cleanup steps queue in turn.
    async fn perform(&mut self, session: &mut Session) {
        while let Some(action) = session.next_action() {
            match action {
                Action::Reply(text) if self.writable => self.out.extend_from_slice(text.as_bytes()),
                Action::Reply(_) | Action::Close => {}
                Action::Log(line) => tracing::info!("{line}"),
                Action::StartTransaction { client, sender } => match self.check_message(&client).await {
                    Some(refusal) => session.cleanup_answer(refusal),
                    None => {
                        if let Some(filters) = &mut self.filters {
                            filters.transaction_started();
                        }
                        self.open(session, client, sender).await
                    }
                },
                Action::Recipient(address) => self.send(session, Step::Recipient(address)).await,
                Action::Data(chunk) => {
                    if let Some(filters) = &mut self.filters {
                        filters.content(&chunk);
                    }
                    self.send(session, Step::Data(chunk)).await
                }
                Action::EndOfData => self.end(session).await,
                Action::AbortTransaction => {
                    self.cleanup = CleanupState::Idle;
                    if let Some(filters) = &mut self.filters {
                        filters.transaction_aborted().await;
                    }
                }
                Action::Check(check) => {
                    // A login over its recipient rate is refused before
                    // any filter is asked.
                    let over = match (check.stage, session.login()) {
                        (CheckStage::Rcpt, Some(login)) => self.limits.check_user_recipient(login).await,
                        _ => None,
                    };
                    let verdict = match (over, &mut self.filters) {
                        (Some(reply), _) => Verdict::refused(reply, RefusedBy::Policy),
                        (None, Some(filters)) => filters.check(&check, &session.facts()).await,
                        (None, None) => Verdict::proceed(),
                    };
                    session.check_done(verdict);
                }
                Action::StartTls => self.start_tls = true,
                Action::AuthStart { mechanism, initial } => {
                    let answer = match self.limits.auth_blocked().await {
                        Some(failures) => AuthAnswer::Blocked(failures),
                        None => self.authenticate(&mechanism, initial.as_ref().map(|d| d.as_str())).await,
                    };
                    session.auth_answer(answer);
                }
                Action::AuthContinue(response) => {
                    let answer = self.auth_continue(response.as_str()).await;
                    session.auth_answer(answer);
                }
                Action::AuthCancel => {
                    if let Some(sasl) = &self.sasl {
                        sasl.lock().await.cancel();
                    }
                }
                Action::Sleep(pause) if self.writable => tokio::time::sleep(pause).await,
                Action::Sleep(_) => {}
            }
        }
    }

    /// At MAIL: the client's message rate, then its login's.
    async fn check_message(&mut self, client: &ClientInfo) -> Option<Answer> {
        if let Some(refusal) = self.limits.check_message().await {
            return Some(refusal);
        }
        match &client.auth {
            Some(login) => self.limits.check_user_message(login).await,
            None => None,
        }
    }

    /// The first round of an AUTH exchange.
    async fn authenticate(&mut self, mechanism: &str, initial: Option<&str>) -> AuthAnswer {
        let Some(sasl) = self.sasl.clone() else { return AuthAnswer::Unavailable };
        let Some(mechanism) = MechanismName::new(mechanism) else { return AuthAnswer::Unavailable };
        self.sasl_client.secured = matches!(self.stream, Stream::Tls(_));
        let mut server = sasl.lock().await;
        let reply = server.start(&mechanism, initial, &self.sasl_client).await.inspect_err(|e| trouble(&server, e));
        drop(server);
        self.auth_outcome(reply).await
    }

    /// A further round: the client's response to the last challenge.
    async fn auth_continue(&mut self, response: &str) -> AuthAnswer {
        let Some(sasl) = self.sasl.clone() else { return AuthAnswer::Unavailable };
        let mut server = sasl.lock().await;
        let reply = server.proceed(response).await.inspect_err(|e| trouble(&server, e));
        drop(server);
        self.auth_outcome(reply).await
    }

    /// The server's reply as the session's answer; a failure is counted.
    async fn auth_outcome(&mut self, reply: Result<SaslReply, SaslError>) -> AuthAnswer {
        match reply {
            Ok(SaslReply::Continue { challenge }) => AuthAnswer::Challenge(challenge),
            Ok(SaslReply::Success { user }) => match user {
                Some(username) => AuthAnswer::Success { username },
                None => {
                    tracing::warn!("warning: SASL authentication server named no user for a success");
                    AuthAnswer::Unavailable
                }
            },
            Ok(SaslReply::Failure { temporary: true, .. }) => AuthAnswer::Unavailable,
            Ok(SaslReply::Failure { reason, .. }) => {
                AuthAnswer::Failure { reason, over_limit: self.limits.auth_failed().await }
            }
            // Dovecot does not do that mechanism: no guess was made, so
            // nothing is counted (and fail2ban ignores this reason).
            Err(SaslError::NotOffered(_)) => {
                AuthAnswer::Failure { reason: Some("Invalid authentication mechanism".into()), over_limit: None }
            }
            Err(e) if e.is_client_error() => AuthAnswer::Failure { reason: None, over_limit: None },
            // Logged by `trouble`.
            Err(_) => AuthAnswer::Unavailable,
        }
    }

    async fn open(&mut self, session: &mut Session, client: ClientInfo, sender: SenderInfo) {
        match Cleanup::open(&self.cleanup_socket, client, sender, self.timeout).await {
            Ok((cleanup, queue_id)) => {
                self.cleanup = CleanupState::Open(cleanup);
                session.transaction_opened(queue_id);
            }
            Err(e) => {
                self.cleanup = CleanupState::Broken;
                self.report(session, e);
            }
        }
    }

    async fn send(&mut self, session: &mut Session, step: Step) {
        let CleanupState::Open(cleanup) = &mut self.cleanup else {
            return self.missing(session);
        };
        let result = match step {
            Step::Recipient(rcpt) => cleanup.send(&Request::Recipient(rcpt)).await,
            Step::Data(chunk) => cleanup.send_data(&chunk).await,
        };
        if let Err(e) = result {
            self.broke(session, e).await;
        }
    }

    async fn end(&mut self, session: &mut Session) {
        let edits = self.filters.as_mut().map(Filters::take_edits).unwrap_or_default();
        match std::mem::replace(&mut self.cleanup, CleanupState::Idle) {
            CleanupState::Open(cleanup) => match cleanup.finish(edits).await {
                Ok(answer) => session.cleanup_answer(answer),
                Err(e) => self.report(session, e),
            },
            CleanupState::Broken => {}
            CleanupState::Idle => self.missing(session),
        }
    }

    /// A write to cleanup failed: if cleanup hung up after saying why (a
    /// size or hop-count refusal), relay that; otherwise it is a failure.
    async fn broke(&mut self, session: &mut Session, e: CleanupError) {
        let parting = match (std::mem::replace(&mut self.cleanup, CleanupState::Broken), &e) {
            (CleanupState::Open(cleanup), CleanupError::Io(_)) => cleanup.parting_answer().await,
            _ => None,
        };
        match parting {
            Some(answer) => session.cleanup_answer(answer),
            None => self.report(session, e),
        }
    }

    fn report(&self, session: &mut Session, e: CleanupError) {
        match e {
            CleanupError::Refused(answer) => session.cleanup_answer(answer),
            e => {
                tracing::warn!("warning: {}: {e}", self.cleanup_socket.display());
                session.cleanup_failed();
            }
        }
    }

    /// A transaction step with no conversation and no failure reported:
    /// cannot happen with a correct engine, and must not end in a 250.
    fn missing(&mut self, session: &mut Session) {
        if matches!(self.cleanup, CleanupState::Idle) {
            tracing::warn!("warning: cleanup step outside a transaction");
            self.cleanup = CleanupState::Broken;
            session.cleanup_failed();
        }
    }

    /// SIGTERM mid-session: the one reply left, if the client can still
    /// take it. Whatever was queued before is dropped: it may be half
    /// written already.
    async fn shutting_down(&mut self, hostname: &str) {
        self.out.clear();
        if self.writable {
            let reply = format!("421 4.3.2 {hostname} Service shutting down\r\n");
            let _ = timeout(TERM_REPLY_TIMEOUT, self.stream.write_all(reply.as_bytes())).await;
        }
    }

    async fn flush(&mut self, session: &mut Session) {
        if self.out.is_empty() || !self.writable {
            return self.out.clear();
        }
        let result = timeout(self.timeout, self.stream.write_all(&self.out)).await;
        self.out.clear();
        match result {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                self.writable = false;
                session.connection_lost();
            }
            Err(_) => {
                self.writable = false;
                session.timed_out();
            }
        }
    }
}

/// The authentication server failed an exchange (not the client's doing):
/// the warning naming it, as configured.
fn trouble(server: &SaslServer, e: &SaslError) {
    if !e.is_client_error() {
        tracing::warn!("warning: SASL authentication server {}: {e}", server.endpoint());
    }
}

/// A transaction step that is only a write.
enum Step {
    Recipient(RecipientInfo),
    Data(Vec<u8>),
}

/// Why a cleanup conversation ended early.
#[derive(Debug, Error)]
enum CleanupError {
    #[error("connect: {0}")]
    Connect(io::Error),
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("timeout exceeded")]
    Timeout,
    #[error("premature end of input")]
    Eof,
    #[error(transparent)]
    Protocol(#[from] IpcError),
    #[error("unexpected {0} record")]
    Unexpected(&'static str),
    /// Not a fault: cleanup refused the transaction with this answer.
    #[error("refused with {}", .0.code)]
    Refused(Answer),
}

/// One open cleanup conversation.
struct Cleanup {
    sock: UnixStream,
    decoder: Decoder,
    /// Encoding buffer, reused for every record.
    out: Vec<u8>,
    timeout: Duration,
}

impl Cleanup {
    /// Connects and sends the envelope head; returns the queue id.
    async fn open(
        path: &Path,
        client: ClientInfo,
        sender: SenderInfo,
        limit: Duration,
    ) -> Result<(Cleanup, QueueId), CleanupError> {
        let sock = timeout(limit, UnixStream::connect(path)).await.map_err(|_| CleanupError::Timeout)?;
        let sock = sock.map_err(CleanupError::Connect)?;
        // Room for a batch and the read that overflows it (doubled by
        // `bare_newline = normalize` at worst), so content does not make
        // this buffer grow: one allocation per transaction.
        let out = Vec::with_capacity(CLEANUP_WRITE_BATCH + 2 * READ_BUFFER + 64);
        let mut cleanup = Cleanup { sock, decoder: Decoder::new(), out, timeout: limit };
        Request::Hello { version: PROTOCOL_VERSION }.encode(&mut cleanup.out);
        Request::Client(client).encode(&mut cleanup.out);
        Request::Sender(sender).encode(&mut cleanup.out);
        cleanup.write_out().await?;
        match cleanup.read_reply().await? {
            Reply::QueueId(id) => Ok((cleanup, id)),
            Reply::Answer { code, status, text } => Err(CleanupError::Refused(Answer { code, status, text })),
        }
    }

    async fn send(&mut self, request: &Request) -> Result<(), CleanupError> {
        request.encode(&mut self.out);
        self.write_out().await
    }

    async fn send_data(&mut self, chunk: &[u8]) -> Result<(), CleanupError> {
        ipc::encode_data(chunk, &mut self.out);
        if self.out.len() < CLEANUP_WRITE_BATCH {
            return Ok(());
        }
        self.write_out().await
    }

    /// Sends the filters' edits and `End`, and returns cleanup's answer.
    /// A write refused because cleanup hung up after saying why (a
    /// recipient it could not take, a size it would not) gives that answer.
    async fn finish(mut self, edits: Vec<ipc::Edit>) -> Result<Answer, CleanupError> {
        if let Err(e) = self.send_end(edits).await {
            return match e {
                CleanupError::Io(_) => self.parting_answer().await.ok_or(e),
                e => Err(e),
            };
        }
        match self.read_reply().await? {
            Reply::Answer { code, status, text } => Ok(Answer { code, status, text }),
            Reply::QueueId(_) => Err(CleanupError::Unexpected("QueueId")),
        }
    }

    async fn send_end(&mut self, edits: Vec<ipc::Edit>) -> Result<(), CleanupError> {
        for edit in edits {
            Request::Edit(edit).encode(&mut self.out);
            if self.out.len() >= CLEANUP_WRITE_BATCH {
                self.write_out().await?;
            }
        }
        self.send(&Request::End).await
    }

    /// The answer cleanup sent before hanging up, if it sent one.
    async fn parting_answer(mut self) -> Option<Answer> {
        self.timeout = ANSWER_AFTER_HANGUP_WAIT;
        match self.read_reply().await {
            Ok(Reply::Answer { code, status, text }) => Some(Answer { code, status, text }),
            _ => None,
        }
    }

    async fn write_out(&mut self) -> Result<(), CleanupError> {
        let result = timeout(self.timeout, self.sock.write_all(&self.out)).await;
        self.out.clear();
        result.map_err(|_| CleanupError::Timeout)?.map_err(CleanupError::Io)
    }

    async fn read_reply(&mut self) -> Result<Reply, CleanupError> {
        let mut buf = [0; CLEANUP_READ_BUFFER];
        loop {
            if let Some(reply) = self.decoder.next_reply()? {
                return Ok(reply);
            }
            let n = timeout(self.timeout, self.sock.read(&mut buf)).await.map_err(|_| CleanupError::Timeout)??;
            if n == 0 {
                return Err(CleanupError::Eof);
            }
            self.decoder.feed(&buf[..n]);
        }
    }
}

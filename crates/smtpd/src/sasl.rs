//! SMTP AUTH through Dovecot's authentication service, as Postfix's smtpd
//! does with `smtpd_sasl_type = dovecot`: smtpd relays the client's
//! base64 data to Dovecot's auth socket and Dovecot decides (codec in
//! `mortal_proto::dovecot_auth`).
//!
//! # Summary
//! [`SaslServer`] is the client of one auth socket (`unix:/path`, reached
//! inside smtpd's chroot, or `inet:IP:PORT`). It connects when first
//! needed, sends its handshake and reads Dovecot's (the mechanisms it
//! offers, [`SaslServer::mechanisms`]), and keeps the connection for the
//! process's later sessions: the caller keeps one per process. An
//! exchange is [`SaslServer::start`] (`AUTH`, with the client's initial
//! response if it gave one) and, while Dovecot sends challenges,
//! [`SaslServer::proceed`] (`CONT`) until it answers success or failure;
//! [`SaslServer::cancel`] forgets an exchange the client gave up (`*`).
//! One exchange at a time, each request answered before the next.
//!
//! # Security
//! Dovecot is trusted to decide and not to hang: every wait (connecting
//! with the handshake; one request and its reply) is bounded by the
//! configured timeout, and a server that is silent, closes, or says what
//! the protocol does not allow gives a [`SaslError`], never a hang or a
//! panic. The connection is dropped on any error, since its state is
//! unknown, and made again on the next call. The client's responses carry
//! passwords: they are checked to be base64 text, written and forgotten
//! (nothing here keeps or logs them), and no error holds them.
//!
//! # Standards
//! RFC 4954 (SMTP AUTH: an initial response, `=` for an empty one, `*` to
//! cancel); Dovecot's authentication protocol 1.2.
//!
//! # Configuration
//! `[smtpd.auth] server` (the socket) and `timeout` (each wait, 30 s by
//! default), read by the caller and passed to [`SaslServer::new`].
//!
//! # Diagnostics
//! Nothing is logged here: the caller logs the error with its session.
//! [`SaslError::is_client_error`] separates what the SMTP client did
//! wrong (data that is not base64, a mechanism not offered: a 5xx) from
//! trouble with Dovecot (a 4xx, `454 4.7.0 Temporary authentication
//! failure` in Postfix).

use crate::filter::{Endpoint, Stream};
use mortal_proto::config::NextHop;
use mortal_proto::dovecot_auth::{
    AuthId, AuthRequest, DecodeError, EncodeError, Handshake, HandshakeReader, HandshakeStep, LineReader, Mechanism,
    MechanismName, SaslReply, ServerReply, client_handshake, encode_continue,
};
use std::io;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::time::Duration;
use tokio::time::timeout;

/// Octets read from the auth server at a time.
const READ_CHUNK: usize = 4096;

/// The SMTP session an exchange is for, as Dovecot is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SaslClientInfo {
    /// The client's address and port (the PROXY header's, behind one).
    pub remote: SocketAddr,
    /// The address and port the client connected to.
    pub local: SocketAddr,
    /// The session is under TLS.
    pub secured: bool,
}

/// Why an exchange has no answer.
#[derive(Debug, thiserror::Error)]
pub enum SaslError {
    #[error("cannot connect: {0}")]
    Connect(io::Error),
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("timeout exceeded")]
    Timeout,
    #[error("connection closed by the auth server")]
    Closed,
    /// The server broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(#[from] DecodeError),
    /// The client's data cannot be relayed (not base64 text, too long).
    #[error("{0}")]
    Request(EncodeError),
    /// The client named a mechanism the server does not offer (Dovecot
    /// drops a connection that asks for one).
    #[error("mechanism {0} is not offered")]
    NotOffered(MechanismName),
    /// `proceed` without an exchange waiting for the client.
    #[error("no authentication exchange in progress")]
    NoExchange,
}

impl SaslError {
    /// Whether the SMTP client caused it, rather than the auth server.
    pub fn is_client_error(&self) -> bool {
        matches!(self, SaslError::Request(_) | SaslError::NotOffered(_))
    }

    /// Whether a kept connection turned out dead before it answered
    /// (Dovecot restarted since): worth one more try on a new one.
    fn is_lost_connection(&self) -> bool {
        matches!(self, SaslError::Io(_) | SaslError::Closed)
    }
}

/// The client of one Dovecot auth socket, with its kept connection.
#[derive(Debug)]
pub struct SaslServer {
    endpoint: Endpoint,
    timeout: Duration,
    conn: Option<Connection>,
    /// The id the next request gets: ids are never reused on a
    /// connection, so no late reply can be taken for a newer request's.
    next_id: AuthId,
}

/// A connection after its handshake.
#[derive(Debug)]
struct Connection {
    stream: Stream,
    lines: LineReader,
    handshake: Handshake,
    /// The request whose challenge the client is to answer next.
    waiting: Option<AuthId>,
}

impl SaslServer {
    /// A client of `endpoint` (a Unix path as configured: it is reached
    /// inside the chroot), each wait bounded by `timeout`. Connects on
    /// first use.
    pub fn new(endpoint: &NextHop, timeout: Duration) -> Self {
        Self { endpoint: Endpoint::new(endpoint), timeout, conn: None, next_id: AuthId::FIRST }
    }

    /// The server as configured, for logs.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Connects (lazily, and again after a failure) and returns the
    /// mechanisms Dovecot offers, in its order.
    pub async fn mechanisms(&mut self) -> Result<Vec<Mechanism>, SaslError> {
        Ok(self.connected().await?.handshake.mechanisms.clone())
    }

    /// Starts an exchange with `mechanism` (one [`Self::mechanisms`]
    /// offered; a client's spelling parses into one) and the client's
    /// initial response, base64 text (`=` or empty for an empty one), if
    /// it gave one. An exchange still open is
    /// abandoned first. A kept connection that turns out closed (Dovecot
    /// restarted) is replaced once, as Postfix does.
    pub async fn start(
        &mut self,
        mechanism: &MechanismName,
        initial: Option<&str>,
        client: &SaslClientInfo,
    ) -> Result<SaslReply, SaslError> {
        self.cancel();
        let kept = self.conn.is_some();
        match self.try_start(mechanism, initial, client).await {
            Err(e) if kept && e.is_lost_connection() => self.try_start(mechanism, initial, client).await,
            outcome => outcome,
        }
    }

    /// The client's answer (base64 text, empty for an empty one) to the
    /// last challenge. Answer text that is not base64 ends the exchange.
    pub async fn proceed(&mut self, response: &str) -> Result<SaslReply, SaslError> {
        let Some(id) = self.conn.as_mut().and_then(|c| c.waiting.take()) else {
            return Err(SaslError::NoExchange);
        };
        let request = match encode_continue(id, response) {
            Ok(request) => request,
            Err(e) => {
                // Dovecot still waits for this exchange: let the
                // connection, and so the exchange, go.
                self.conn = None;
                return Err(SaslError::Request(e));
            }
        };
        self.exchange(id, &request).await
    }

    /// The client cancelled with `*`: forget the exchange. Dovecot's
    /// protocol 1.2 has no verb for it (Postfix lets the request lapse
    /// until Dovecot's own timeout); dropping the connection makes
    /// Dovecot free the request at once, and no late answer to it can
    /// meet a later exchange. The next call connects again.
    pub fn cancel(&mut self) {
        if self.conn.as_ref().is_some_and(|c| c.waiting.is_some()) {
            self.conn = None;
        }
    }

    async fn try_start(
        &mut self,
        mechanism: &MechanismName,
        initial: Option<&str>,
        client: &SaslClientInfo,
    ) -> Result<SaslReply, SaslError> {
        let id = self.next_id;
        self.next_id = id.next();
        let conn = self.connected().await?;
        // The handshake of this connection decides: Dovecot may have been
        // reconfigured since the client was shown the list.
        if !conn.handshake.mechanisms.iter().any(|m| m.name == *mechanism) {
            return Err(SaslError::NotOffered(mechanism.clone()));
        }
        let request =
            AuthRequest { id, mechanism, local: client.local, remote: client.remote, secured: client.secured, initial }
                .encode()
                .map_err(SaslError::Request)?;
        self.exchange(id, &request).await
    }

    /// The kept connection, made (connect and handshake, within the
    /// timeout) if there is none.
    async fn connected(&mut self) -> Result<&mut Connection, SaslError> {
        if self.conn.is_none() {
            let conn =
                timeout(self.timeout, Connection::open(&self.endpoint)).await.unwrap_or(Err(SaslError::Timeout))?;
            self.conn = Some(conn);
        }
        Ok(self.conn.as_mut().expect("connected above"))
    }

    /// Sends `request` for `id` and reads its reply, within the timeout;
    /// on any failure the connection goes.
    async fn exchange(&mut self, id: AuthId, request: &[u8]) -> Result<SaslReply, SaslError> {
        let conn = self.conn.as_mut().expect("a request is sent on a connection");
        let outcome = timeout(self.timeout, conn.ask(id, request)).await.unwrap_or(Err(SaslError::Timeout));
        match outcome {
            Ok(reply) => {
                conn.waiting = matches!(reply, SaslReply::Continue { .. }).then_some(id);
                Ok(reply)
            }
            Err(e) => {
                self.conn = None;
                Err(e)
            }
        }
    }
}

impl Connection {
    /// Connects and exchanges handshakes. Anything after the server's
    /// `DONE` is out of turn.
    async fn open(endpoint: &Endpoint) -> Result<Connection, SaslError> {
        let mut stream = endpoint.connect().await.map_err(SaslError::Connect)?;
        // Dovecot refuses a pid of 0, which no process has.
        let pid = NonZeroU32::new(std::process::id()).unwrap_or(NonZeroU32::MIN);
        stream.write_all(&client_handshake(pid)).await?;
        let mut lines = LineReader::new();
        let mut reader = HandshakeReader::new();
        let mut buf = [0; READ_CHUNK];
        loop {
            while let Some(line) = lines.next_line()? {
                reader = match reader.line(&line)? {
                    HandshakeStep::More(reader) => reader,
                    HandshakeStep::Done(handshake) => {
                        if !lines.is_empty() {
                            return Err(DecodeError::Unsolicited.into());
                        }
                        return Ok(Connection { stream, lines, handshake, waiting: None });
                    }
                };
            }
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Err(SaslError::Closed);
            }
            lines.feed(&buf[..n]);
        }
    }

    /// Writes `request` and reads the one reply to `id`. A reply to
    /// another request, or more than one reply, means the connection is
    /// out of step.
    async fn ask(&mut self, id: AuthId, request: &[u8]) -> Result<SaslReply, SaslError> {
        self.stream.write_all(request).await?;
        let mut buf = [0; READ_CHUNK];
        loop {
            if let Some(line) = self.lines.next_line()? {
                let reply = ServerReply::parse(&line)?.answering(id)?;
                if !self.lines.is_empty() {
                    return Err(DecodeError::Unsolicited.into());
                }
                return Ok(reply);
            }
            let n = self.stream.read(&mut buf).await?;
            if n == 0 {
                return Err(SaslError::Closed);
            }
            self.lines.feed(&buf[..n]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mortal_proto::dovecot_auth::{MechanismFlags, SecurityFlag};
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Instant;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio::net::UnixListener;

    /// What Dovecot 2.3.19.1 sends on its auth-client socket with
    /// `auth_mechanisms = plain login` (recorded).
    const HANDSHAKE: &str = "VERSION\t1\t2\nMECH\tPLAIN\tplaintext\nMECH\tLOGIN\tplaintext\nSPID\t20123\nCUID\t1\nCOOKIE\tfc2a5c272549db3f6564695e25d50b54\nDONE\n";

    /// base64 of "\0alice\0secret", "alice", "secret".
    const PLAIN_ALICE: &str = "AGFsaWNlAHNlY3JldA==";
    const LOGIN_USER: &str = "YWxpY2U=";
    const LOGIN_PASSWORD: &str = "c2VjcmV0";

    /// What the fake server does with a line the client sent after the
    /// handshake.
    enum Answer {
        Send(String),
        /// Answers, then closes the connection.
        SendAndClose(String),
        Close,
        /// Reads on, never answers.
        Silent,
    }

    /// A scripted Dovecot auth server on a Unix socket: sends `handshake`
    /// on each connection, checks the client's, and answers each later
    /// line as `script` says. Records the client's lines.
    struct FakeDovecot {
        path: PathBuf,
        connections: Arc<AtomicUsize>,
        seen: Arc<Mutex<Vec<String>>>,
        _dir: tempfile::TempDir,
    }

    impl FakeDovecot {
        fn start(handshake: &'static str, script: fn(&str) -> Answer) -> Self {
            Self::serve(handshake, false, script)
        }

        /// Sends `handshake` and closes each connection.
        fn hanging_up(handshake: &'static str) -> Self {
            Self::serve(handshake, true, |_| Answer::Close)
        }

        fn serve(handshake: &'static str, hang_up: bool, script: fn(&str) -> Answer) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("auth");
            let listener = UnixListener::bind(&path).unwrap();
            let connections = Arc::new(AtomicUsize::new(0));
            let seen = Arc::new(Mutex::new(Vec::new()));
            let (count, log) = (Arc::clone(&connections), Arc::clone(&seen));
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    count.fetch_add(1, Ordering::SeqCst);
                    let log = Arc::clone(&log);
                    tokio::spawn(async move {
                        let (read, mut write) = stream.into_split();
                        let mut lines = BufReader::new(read).lines();
                        if write.write_all(handshake.as_bytes()).await.is_err() || hang_up {
                            return;
                        }
                        while let Ok(Some(line)) = lines.next_line().await {
                            log.lock().unwrap().push(line.clone());
                            if line.starts_with("VERSION\t") || line.starts_with("CPID\t") {
                                continue;
                            }
                            match script(&line) {
                                Answer::Send(text) => {
                                    let _ = write.write_all(text.as_bytes()).await;
                                }
                                Answer::SendAndClose(text) => {
                                    let _ = write.write_all(text.as_bytes()).await;
                                    return;
                                }
                                Answer::Close => return,
                                Answer::Silent => {}
                            }
                        }
                    });
                }
            });
            FakeDovecot { path, connections, seen, _dir: dir }
        }

        fn server(&self, timeout: Duration) -> SaslServer {
            SaslServer::new(&NextHop::Unix(self.path.clone()), timeout)
        }

        fn connections(&self) -> usize {
            self.connections.load(Ordering::SeqCst)
        }

        /// The client's lines once there are `n` (its handshake is read
        /// after the server sent its own).
        async fn seen(&self, n: usize) -> Vec<String> {
            let started = Instant::now();
            loop {
                let seen = self.seen.lock().unwrap().clone();
                if seen.len() >= n || started.elapsed() > WAIT {
                    return seen;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }

        /// The client's lines other than its handshake.
        fn requests(&self) -> Vec<String> {
            let seen = self.seen.lock().unwrap();
            seen.iter().filter(|l| !l.starts_with("VERSION\t") && !l.starts_with("CPID\t")).cloned().collect()
        }
    }

    /// The id field of a request line.
    fn id_of(line: &str) -> &str {
        line.split('\t').nth(1).unwrap()
    }

    /// Dovecot as configured with passwd-file users: alice/secret.
    fn dovecot(line: &str) -> Answer {
        let fields: Vec<&str> = line.split('\t').collect();
        let id = fields[1];
        Answer::Send(match fields.as_slice() {
            ["AUTH", _, "PLAIN", .., last] if *last == format!("resp={PLAIN_ALICE}") => {
                format!("OK\t{id}\tuser=alice\n")
            }
            ["AUTH", _, "PLAIN", .., last] if last.starts_with("resp=") => format!("FAIL\t{id}\tuser=alice\n"),
            ["AUTH", _, "PLAIN", ..] => format!("CONT\t{id}\t\n"),
            ["AUTH", _, "LOGIN", ..] => format!("CONT\t{id}\tVXNlcm5hbWU6\n"),
            ["CONT", _, LOGIN_USER] => format!("CONT\t{id}\tUGFzc3dvcmQ6\n"),
            ["CONT", _, LOGIN_PASSWORD] => format!("OK\t{id}\tuser=alice\n"),
            ["CONT", _, PLAIN_ALICE] => format!("OK\t{id}\tuser=alice\n"),
            _ => format!("FAIL\t{id}\n"),
        })
    }

    fn client(secured: bool) -> SaslClientInfo {
        SaslClientInfo {
            remote: "198.51.100.7:40000".parse().unwrap(),
            local: "192.0.2.25:587".parse().unwrap(),
            secured,
        }
    }

    fn plain() -> MechanismName {
        "PLAIN".parse().unwrap()
    }

    fn login() -> MechanismName {
        "login".parse().unwrap()
    }

    fn success() -> SaslReply {
        SaslReply::Success { user: Some("alice".into()) }
    }

    const WAIT: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn handshake_gives_the_mechanisms_once_per_connection() {
        let fake = FakeDovecot::start(HANDSHAKE, dovecot);
        let mut sasl = fake.server(WAIT);
        assert_eq!(fake.connections(), 0, "nothing happens before the first call");
        let plaintext = MechanismFlags::empty().with(SecurityFlag::Plaintext);
        let offered = [Mechanism { name: plain(), flags: plaintext }, Mechanism { name: login(), flags: plaintext }];
        assert_eq!(sasl.mechanisms().await.unwrap(), offered);
        assert_eq!(sasl.mechanisms().await.unwrap(), offered);
        assert_eq!(fake.connections(), 1, "the connection is kept");
        let seen = fake.seen(2).await;
        assert_eq!(seen, ["VERSION\t1\t2".to_owned(), format!("CPID\t{}", std::process::id())]);
        assert_eq!(sasl.endpoint().to_string(), format!("unix:{}", fake.path.display()));
    }

    #[tokio::test]
    async fn plain_with_an_initial_response_succeeds_and_the_connection_is_reused() {
        let fake = FakeDovecot::start(HANDSHAKE, dovecot);
        let mut sasl = fake.server(WAIT);
        assert_eq!(sasl.start(&plain(), Some(PLAIN_ALICE), &client(true)).await.unwrap(), success());
        assert_eq!(sasl.start(&plain(), Some(PLAIN_ALICE), &client(false)).await.unwrap(), success());
        assert_eq!(
            fake.requests(),
            [
                format!(
                    "AUTH\t1\tPLAIN\tservice=smtp\tnologin\tlip=192.0.2.25\trip=198.51.100.7\tlport=587\trport=40000\tsecured\tresp={PLAIN_ALICE}"
                ),
                format!(
                    "AUTH\t2\tPLAIN\tservice=smtp\tnologin\tlip=192.0.2.25\trip=198.51.100.7\tlport=587\trport=40000\tresp={PLAIN_ALICE}"
                ),
            ]
        );
        assert_eq!(fake.connections(), 1);
    }

    #[tokio::test]
    async fn an_empty_initial_response_is_an_empty_resp() {
        let fake = FakeDovecot::start(HANDSHAKE, dovecot);
        let mut sasl = fake.server(WAIT);
        for empty in ["=", ""] {
            let reply = sasl.start(&plain(), Some(empty), &client(true)).await.unwrap();
            assert!(matches!(reply, SaslReply::Failure { .. }), "{reply:?}");
        }
        let requests = fake.requests();
        assert!(requests.iter().all(|r| r.ends_with("\tsecured\tresp=")), "{requests:?}");
        // Without an initial response PLAIN asks with an empty challenge.
        let reply = sasl.start(&plain(), None, &client(true)).await.unwrap();
        assert_eq!(reply, SaslReply::Continue { challenge: String::new() });
        assert_eq!(sasl.proceed(PLAIN_ALICE).await.unwrap(), success());
    }

    #[tokio::test]
    async fn login_goes_through_two_challenges() {
        let fake = FakeDovecot::start(HANDSHAKE, dovecot);
        let mut sasl = fake.server(WAIT);
        let reply = sasl.start(&login(), None, &client(true)).await.unwrap();
        assert_eq!(reply, SaslReply::Continue { challenge: "VXNlcm5hbWU6".into() });
        let reply = sasl.proceed(LOGIN_USER).await.unwrap();
        assert_eq!(reply, SaslReply::Continue { challenge: "UGFzc3dvcmQ6".into() });
        assert_eq!(sasl.proceed(LOGIN_PASSWORD).await.unwrap(), success());
        assert!(matches!(sasl.proceed(LOGIN_PASSWORD).await, Err(SaslError::NoExchange)), "the exchange is over");
        let requests = fake.requests();
        assert_eq!(requests[1..], [format!("CONT\t1\t{LOGIN_USER}"), format!("CONT\t1\t{LOGIN_PASSWORD}")]);
        assert_eq!(fake.connections(), 1);
    }

    #[tokio::test]
    async fn failures_carry_reason_user_and_whether_to_try_later() {
        let fake = FakeDovecot::start(HANDSHAKE, |line| {
            let id = id_of(line);
            Answer::Send(match line.split('\t').nth(2) {
                Some("PLAIN") => format!("FAIL\t{id}\tuser=alice\treason=Password expired\tcode=pass_expired\n"),
                _ => format!("FAIL\t{id}\tuser=bob\tcode=temp_fail\treason=Internal error occurred\n"),
            })
        });
        let mut sasl = fake.server(WAIT);
        assert_eq!(
            sasl.start(&plain(), Some(PLAIN_ALICE), &client(true)).await.unwrap(),
            SaslReply::Failure {
                reason: Some("Password expired".into()),
                temporary: false,
                user: Some("alice".into())
            }
        );
        assert_eq!(
            sasl.start(&login(), Some(LOGIN_USER), &client(true)).await.unwrap(),
            SaslReply::Failure {
                reason: Some("Internal error occurred".into()),
                temporary: true,
                user: Some("bob".into())
            }
        );
        assert_eq!(fake.connections(), 1, "a failure is an answer, not trouble");
    }

    #[tokio::test]
    async fn a_server_that_closes_mid_exchange_is_an_error_and_the_next_call_reconnects() {
        let fake = FakeDovecot::start(HANDSHAKE, |line| match line.split('\t').next() {
            Some("CONT") => Answer::Close,
            _ => dovecot(line),
        });
        let mut sasl = fake.server(WAIT);
        assert!(matches!(sasl.start(&login(), None, &client(true)).await, Ok(SaslReply::Continue { .. })));
        assert!(matches!(sasl.proceed(LOGIN_USER).await, Err(SaslError::Closed)));
        assert!(matches!(sasl.proceed(LOGIN_USER).await, Err(SaslError::NoExchange)), "the exchange died with it");
        assert_eq!(sasl.start(&plain(), Some(PLAIN_ALICE), &client(true)).await.unwrap(), success());
        assert_eq!(fake.connections(), 2);
    }

    #[tokio::test]
    async fn a_kept_connection_found_closed_is_replaced_once() {
        // Dovecot restarted between two sessions: the first answer is its
        // last word on that connection.
        let fake = FakeDovecot::start(HANDSHAKE, |line| match dovecot(line) {
            Answer::Send(text) => Answer::SendAndClose(text),
            other => other,
        });
        let mut sasl = fake.server(WAIT);
        assert_eq!(sasl.start(&plain(), Some(PLAIN_ALICE), &client(true)).await.unwrap(), success());
        assert_eq!(sasl.start(&plain(), Some(PLAIN_ALICE), &client(true)).await.unwrap(), success());
        assert_eq!(fake.connections(), 2);
        // A server that closes every fresh connection unanswered is not
        // tried a third time.
        let fake = FakeDovecot::start(HANDSHAKE, |_| Answer::Close);
        let mut sasl = fake.server(WAIT);
        assert!(matches!(sasl.start(&plain(), Some(PLAIN_ALICE), &client(true)).await, Err(SaslError::Closed)));
        assert_eq!(fake.connections(), 1, "a fresh connection is not retried");
    }

    #[tokio::test]
    async fn garbage_is_a_protocol_error_and_costs_the_connection() {
        let fake = FakeDovecot::start(HANDSHAKE, |line| match line.split('\t').nth(2) {
            Some("PLAIN") => Answer::Send("HELLO\tworld\n".into()),
            _ => Answer::Send(format!("OK\t{}\tuser=alice\n", id_of(line).parse::<u32>().unwrap() + 1)),
        });
        let mut sasl = fake.server(WAIT);
        let e = sasl.start(&plain(), Some(PLAIN_ALICE), &client(true)).await.unwrap_err();
        assert!(matches!(e, SaslError::Protocol(DecodeError::UnknownReply(ref v)) if v == "HELLO"), "{e}");
        assert!(!e.is_client_error());
        let e = sasl.start(&login(), None, &client(true)).await.unwrap_err();
        assert!(matches!(e, SaslError::Protocol(DecodeError::IdMismatch { .. })), "{e}");
        assert_eq!(fake.connections(), 2, "each error dropped the connection");
        // Two replies to one request.
        let fake = FakeDovecot::start(HANDSHAKE, |line| {
            Answer::Send(format!("OK\t{0}\tuser=a\nOK\t{0}\tuser=b\n", id_of(line)))
        });
        let e = fake.server(WAIT).start(&plain(), Some(PLAIN_ALICE), &client(true)).await.unwrap_err();
        assert!(matches!(e, SaslError::Protocol(DecodeError::Unsolicited)), "{e}");
        // A reply line without end, beyond any bound.
        let fake = FakeDovecot::start(HANDSHAKE, |_| Answer::Send("x".repeat(40_000)));
        let e = fake.server(WAIT).start(&plain(), Some(PLAIN_ALICE), &client(true)).await.unwrap_err();
        assert!(matches!(e, SaslError::Protocol(DecodeError::LineTooLong)), "{e}");
    }

    #[tokio::test]
    async fn bad_handshakes_are_refused() {
        let cases = [
            ("VERSION\t2\t0\nMECH\tPLAIN\nDONE\n", DecodeError::Incompatible { major: 2, minor: 0 }),
            // auth-userdb's greeting: VERSION and SPID, then silence.
            ("VERSION\t1\t1\nSPID\t1234\n", DecodeError::WrongSocket),
            ("VERSION\t1\t2\nMECH\tPLAIN\nDONE\nOK\t1\tuser=early\n", DecodeError::Unsolicited),
        ];
        for (handshake, expected) in cases {
            let fake = FakeDovecot::start(handshake, dovecot);
            match fake.server(WAIT).mechanisms().await {
                Err(SaslError::Protocol(e)) if e == expected => {}
                other => panic!("{handshake:?}: {other:?}"),
            }
        }
        // The server hangs up before DONE, or stops talking.
        let fake = FakeDovecot::hanging_up("VERSION\t1\t2\nMECH\tPLAIN\n");
        // Closed, or reset when it went with our handshake unread.
        let outcome = fake.server(WAIT).mechanisms().await;
        assert!(matches!(outcome, Err(SaslError::Closed | SaslError::Io(_))), "{outcome:?}");
        let fake = FakeDovecot::start("VERSION\t1\t2\nMECH\tPLAIN\n", |_| Answer::Close);
        let started = Instant::now();
        let outcome = fake.server(Duration::from_millis(200)).mechanisms().await;
        assert!(matches!(outcome, Err(SaslError::Timeout)), "{outcome:?}");
        assert!(started.elapsed() < WAIT);
    }

    #[tokio::test]
    async fn a_silent_server_times_out() {
        let timeout = Duration::from_millis(200);
        // Silent from the start: no handshake.
        let fake = FakeDovecot::start("", |_| Answer::Silent);
        let mut sasl = fake.server(timeout);
        let started = Instant::now();
        assert!(matches!(sasl.mechanisms().await, Err(SaslError::Timeout)));
        assert!(started.elapsed() >= timeout && started.elapsed() < WAIT, "{:?}", started.elapsed());
        // Silent after the handshake: no answer to AUTH.
        let fake = FakeDovecot::start(HANDSHAKE, |_| Answer::Silent);
        let mut sasl = fake.server(timeout);
        let started = Instant::now();
        let outcome = sasl.start(&plain(), Some(PLAIN_ALICE), &client(true)).await;
        assert!(matches!(outcome, Err(SaslError::Timeout)), "{outcome:?}");
        assert!(started.elapsed() < WAIT);
        // The connection went with the timeout; the next call makes one.
        assert!(matches!(sasl.mechanisms().await, Ok(m) if m.len() == 2));
        assert_eq!(fake.connections(), 2);
    }

    #[tokio::test]
    async fn cancel_drops_the_exchange_with_its_connection() {
        let fake = FakeDovecot::start(HANDSHAKE, dovecot);
        let mut sasl = fake.server(WAIT);
        assert!(matches!(sasl.start(&login(), None, &client(true)).await, Ok(SaslReply::Continue { .. })));
        sasl.cancel();
        assert!(matches!(sasl.proceed(LOGIN_USER).await, Err(SaslError::NoExchange)));
        assert_eq!(sasl.start(&plain(), Some(PLAIN_ALICE), &client(true)).await.unwrap(), success());
        assert_eq!(fake.connections(), 2, "Dovecot forgot the cancelled request with the connection");
        // Without an exchange waiting, cancel keeps the connection.
        sasl.cancel();
        assert_eq!(sasl.start(&plain(), Some(PLAIN_ALICE), &client(true)).await.unwrap(), success());
        assert_eq!(fake.connections(), 2);
        // A new start abandons an open exchange the same way.
        assert!(matches!(sasl.start(&login(), None, &client(true)).await, Ok(SaslReply::Continue { .. })));
        assert_eq!(sasl.start(&plain(), Some(PLAIN_ALICE), &client(true)).await.unwrap(), success());
        assert_eq!(fake.connections(), 3);
    }

    #[tokio::test]
    async fn what_the_client_got_wrong_is_refused_before_dovecot_sees_it() {
        let fake = FakeDovecot::start(HANDSHAKE, dovecot);
        let mut sasl = fake.server(WAIT);
        let e = sasl.start(&plain(), Some("AGFsaWNl\tresp=x"), &client(true)).await.unwrap_err();
        assert!(matches!(e, SaslError::Request(EncodeError::NotBase64 { .. })) && e.is_client_error(), "{e}");
        let cram = "CRAM-MD5".parse().unwrap();
        let e = sasl.start(&cram, None, &client(true)).await.unwrap_err();
        assert!(matches!(e, SaslError::NotOffered(_)) && e.is_client_error(), "{e}");
        assert!(fake.requests().is_empty(), "nothing was sent: {:?}", fake.requests());
        assert_eq!(fake.connections(), 1, "and the connection stays");
        // Not base64 in a continuation ends the exchange Dovecot waits on.
        assert!(matches!(sasl.start(&login(), None, &client(true)).await, Ok(SaslReply::Continue { .. })));
        let e = sasl.proceed("not base64").await.unwrap_err();
        assert!(matches!(e, SaslError::Request(_)), "{e}");
        assert!(matches!(sasl.proceed(LOGIN_USER).await, Err(SaslError::NoExchange)));
        assert_eq!(fake.requests().len(), 1, "only the AUTH went out");
    }

    #[tokio::test]
    async fn an_absent_server_is_a_connect_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut sasl = SaslServer::new(&NextHop::Unix(dir.path().join("auth")), WAIT);
        assert!(matches!(sasl.mechanisms().await, Err(SaslError::Connect(_))));
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = closed.local_addr().unwrap();
        drop(closed);
        let mut sasl = SaslServer::new(&NextHop::Inet(addr), WAIT);
        assert!(matches!(sasl.start(&plain(), None, &client(true)).await, Err(SaslError::Connect(_))));
    }
}

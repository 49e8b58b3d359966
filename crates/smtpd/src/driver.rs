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
//! content arrives (never the whole message in memory); `End` and a wait
//! for `Answer`. Whatever goes wrong with cleanup (unreachable, timeout,
//! garbage, hang-up) is reported to the session as a failure, which turns
//! into `451 4.3.0`: a client only ever hears 250 after cleanup said 250.
//! RSET, QUIT and lost clients simply drop the cleanup connection, and
//! cleanup discards the unfinished message.

use crate::engine::{Action, Answer, Session};
use mortal_proto::config::Config;
use mortal_proto::ipc::{
    self, ClientInfo, Decoder, IpcError, PROTOCOL_VERSION, RecipientInfo, Reply, Request, SenderInfo,
};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::time::timeout;

/// Octets read from the client at a time. This also bounds what one read
/// adds to the session's buffer, since the session handles each read
/// before the next one.
pub const READ_BUFFER: usize = 16 * 1024;

/// Octets read from cleanup at a time; its replies are small records.
const CLEANUP_READ_BUFFER: usize = 1024;

/// How long to wait for cleanup's parting answer after it hung up on us
/// mid-transaction. It has either written one already or never will.
const ANSWER_AFTER_HANGUP_WAIT: Duration = Duration::from_secs(1);

/// Serves one SMTP session on `stream` and logs its end. Never fails:
/// every problem ends up in the log and, where possible, in a reply.
pub async fn session(config: &Arc<Config>, stream: std::net::TcpStream) {
    let addr = match stream.peer_addr() {
        Ok(addr) => addr.ip(),
        Err(e) => return tracing::warn!("warning: getpeername: {e}"),
    };
    let mut session = Session::new(Arc::clone(config), addr);
    let mut buf = vec![0; READ_BUFFER];
    if let Err(e) = stream.set_nonblocking(true) {
        return tracing::warn!("warning: set non-blocking: {e}");
    }
    look_before_greeting(&stream, &mut session, &mut buf);
    let tcp = match TcpStream::from_std(stream) {
        Ok(tcp) => tcp,
        Err(e) => return tracing::warn!("warning: register connection: {e}"),
    };
    let mut conn = Connection {
        tcp,
        out: Vec::new(),
        writable: true,
        timeout: config.smtpd.timeout,
        cleanup_socket: config.cleanup_socket(),
        cleanup: CleanupState::Idle,
    };
    conn.run(&mut session, &mut buf).await;
    let _ = conn.tcp.shutdown().await;
    tracing::info!("{}", session.finish());
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

struct Connection {
    tcp: TcpStream,
    /// Replies not yet written.
    out: Vec<u8>,
    /// False once a write failed or timed out: later replies are dropped.
    writable: bool,
    timeout: Duration,
    cleanup_socket: PathBuf,
    cleanup: CleanupState,
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
            debug_assert!(session.wants_input(), "every cleanup step was answered");
            match timeout(self.timeout, self.tcp.read(buf)).await {
                Err(_) => session.timed_out(),
                Ok(Ok(0) | Err(_)) => session.connection_lost(),
                Ok(Ok(n)) => session.feed(&buf[..n]),
            }
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
                Action::StartTransaction { client, sender } => self.open(session, client, sender).await,
                Action::Recipient(address) => self.send(session, Step::Recipient(address)).await,
                Action::Data(chunk) => self.send(session, Step::Data(chunk)).await,
                Action::EndOfData => self.end(session).await,
                Action::AbortTransaction => self.cleanup = CleanupState::Idle,
            }
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
        match std::mem::replace(&mut self.cleanup, CleanupState::Idle) {
            CleanupState::Open(cleanup) => match cleanup.finish().await {
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

    async fn flush(&mut self, session: &mut Session) {
        if self.out.is_empty() || !self.writable {
            return self.out.clear();
        }
        let result = timeout(self.timeout, self.tcp.write_all(&self.out)).await;
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
    ) -> Result<(Cleanup, String), CleanupError> {
        let sock = timeout(limit, UnixStream::connect(path)).await.map_err(|_| CleanupError::Timeout)?;
        let sock = sock.map_err(CleanupError::Connect)?;
        let mut cleanup = Cleanup { sock, decoder: Decoder::new(), out: Vec::new(), timeout: limit };
        Request::Hello { version: PROTOCOL_VERSION }.encode(&mut cleanup.out);
        Request::Client(client).encode(&mut cleanup.out);
        Request::Sender(sender).encode(&mut cleanup.out);
        cleanup.write_out().await?;
        match cleanup.read_reply().await? {
            Reply::QueueId(id) => Ok((cleanup, id)),
            Reply::Answer { code, enhanced, text } => Err(CleanupError::Refused(Answer { code, enhanced, text })),
        }
    }

    async fn send(&mut self, request: &Request) -> Result<(), CleanupError> {
        request.encode(&mut self.out);
        self.write_out().await
    }

    async fn send_data(&mut self, chunk: &[u8]) -> Result<(), CleanupError> {
        ipc::encode_data(chunk, &mut self.out);
        self.write_out().await
    }

    /// Sends `End` and returns cleanup's answer.
    async fn finish(mut self) -> Result<Answer, CleanupError> {
        self.send(&Request::End).await?;
        match self.read_reply().await? {
            Reply::Answer { code, enhanced, text } => Ok(Answer { code, enhanced, text }),
            Reply::QueueId(_) => Err(CleanupError::Unexpected("QueueId")),
        }
    }

    /// The answer cleanup sent before hanging up, if it sent one.
    async fn parting_answer(mut self) -> Option<Answer> {
        self.timeout = ANSWER_AFTER_HANGUP_WAIT;
        match self.read_reply().await {
            Ok(Reply::Answer { code, enhanced, text }) => Some(Answer { code, enhanced, text }),
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

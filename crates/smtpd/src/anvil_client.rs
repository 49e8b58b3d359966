//! smtpd's side of the anvil protocol (`mortal_proto::anvil`): one Unix
//! stream connection per limited session, held open for the whole session
//! because it is the lease anvil counts as an open connection.
//!
//! Every wait is bounded by [`ANVIL_TIMEOUT`]. The caller treats any error
//! as "anvil unavailable" and serves the client without limits (fail
//! open): a rate limiter must never become the reason mail stops.

use mortal_proto::anvil::{AnvilError, AnvilReply, AnvilRequest, LoginDigest, Op, REPLY_LEN, Subject};
use std::io;
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::time::timeout;

/// Longest wait for anvil: connecting, writing a request or reading its
/// reply. anvil answers from memory in microseconds, so this only matters
/// when anvil is stopped or hung; then every new session pays it once.
pub const ANVIL_TIMEOUT: Duration = Duration::from_millis(500);

/// Why anvil could not be asked.
#[derive(Debug, Error)]
pub enum AnvilClientError {
    #[error("connect: {0}")]
    Connect(io::Error),
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("timeout exceeded")]
    Timeout,
    #[error("connection closed")]
    Eof,
    #[error(transparent)]
    Protocol(#[from] AnvilError),
    #[error("reply to {got:?} for a {sent:?} request")]
    Mismatch { sent: Op, got: Op },
}

/// An open connection to anvil, counted there as one connection from
/// `addr` until it is dropped.
#[derive(Debug)]
pub struct AnvilLease {
    sock: UnixStream,
    addr: IpAddr,
}

impl AnvilLease {
    /// Connects to anvil at `path` and registers a connection from `addr`.
    pub async fn connect(path: &Path, addr: IpAddr) -> Result<(AnvilLease, AnvilReply), AnvilClientError> {
        let sock = timeout(ANVIL_TIMEOUT, UnixStream::connect(path))
            .await
            .map_err(|_| AnvilClientError::Timeout)?
            .map_err(AnvilClientError::Connect)?;
        let mut lease = AnvilLease { sock, addr };
        let reply = lease.ask(Op::Connect).await?;
        Ok((lease, reply))
    }

    /// Counts a message (MAIL) from this lease's client.
    pub async fn message(&mut self) -> Result<AnvilReply, AnvilClientError> {
        self.ask(Op::Message).await
    }

    /// Counts a failed AUTH from this lease's client.
    pub async fn auth_failure(&mut self) -> Result<AnvilReply, AnvilClientError> {
        self.ask(Op::AuthFailure).await
    }

    /// The AUTH failures of this lease's client in the current unit.
    pub async fn auth_failures(&mut self) -> Result<AnvilReply, AnvilClientError> {
        self.ask(Op::AuthFailures).await
    }

    /// Counts a message from `login`, wherever it connects from.
    pub async fn user_message(&mut self, login: LoginDigest) -> Result<AnvilReply, AnvilClientError> {
        self.ask_for(Op::UserMessage, Subject::Login(login)).await
    }

    /// Counts a recipient from `login`.
    pub async fn user_recipient(&mut self, login: LoginDigest) -> Result<AnvilReply, AnvilClientError> {
        self.ask_for(Op::UserRecipient, Subject::Login(login)).await
    }

    async fn ask(&mut self, op: Op) -> Result<AnvilReply, AnvilClientError> {
        self.ask_for(op, Subject::Client(self.addr)).await
    }

    async fn ask_for(&mut self, op: Op, subject: Subject) -> Result<AnvilReply, AnvilClientError> {
        let request = AnvilRequest { op, subject }.encode();
        timeout(ANVIL_TIMEOUT, self.sock.write_all(&request)).await.map_err(|_| AnvilClientError::Timeout)??;
        let mut buf = [0u8; REPLY_LEN];
        match timeout(ANVIL_TIMEOUT, self.sock.read_exact(&mut buf)).await {
            Err(_) => return Err(AnvilClientError::Timeout),
            Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(AnvilClientError::Eof),
            Ok(Err(e)) => return Err(e.into()),
            Ok(Ok(_)) => {}
        }
        let reply = AnvilReply::decode(&buf)?;
        if reply.op != op {
            return Err(AnvilClientError::Mismatch { sent: op, got: reply.op });
        }
        Ok(reply)
    }
}

//! The harness shared by the driver tests (`driver.rs`, `extensions.rs`):
//! a temporary run directory with a config, an SMTP client on a loopback
//! connection, and a fake cleanup speaking `mortal_proto::ipc` on the
//! private Unix socket.

// Each test target uses its own part of the harness.
#![allow(dead_code)]

use mortal_proto::config::Config;
use mortal_proto::ipc::{Decoder, Reply, Request};
use mortal_proto::smtp_status::ReplyCode;
use mortal_smtpd::driver::{self, Server, SessionEnd};
use mortal_smtpd::relay::RelayPolicy;
use mortal_smtpd::tls::TlsServer;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixListener, UnixStream};
use tokio::time::timeout;

/// Longest any single step of a test may take before it counts as hung.
pub const STEP: Duration = Duration::from_secs(5);
/// The queue id the fake cleanup hands out.
pub const QUEUE_ID: &str = "00000000A0000100000B";

/// A temporary directory with the run/private layout, removed on drop.
pub struct Dir(PathBuf);

impl Dir {
    pub fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("mortal-smtpd-test-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("run/private")).expect("create test dir");
        Dir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// A config accepting mail for `example.test`, with `smtpd` as the
    /// `[smtpd]` section's lines.
    pub fn config(&self, smtpd: &str) -> Arc<Config> {
        let text = format!(
            "[server]\nhostname = \"mortal.test\"\nspool_dir = \"{0}/spool\"\nrun_dir = \"{0}/run\"\n\
             accepted_domains = [\"example.test\"]\n\n[smtpd]\n{smtpd}\n",
            self.0.display()
        );
        Arc::new(Config::parse(&text, &self.0.join("mortal.toml")).expect("test config"))
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs one session the way smtpd's main does (without a recipient map or
/// reverse lookups), with `tls` for STARTTLS; the session must end on its
/// own, not by SIGTERM.
pub async fn serve(config: &Arc<Config>, tls: Option<&TlsServer>, stream: std::net::TcpStream) {
    let mut server = Server::new(Arc::clone(config), RelayPolicy::default());
    server.tls = tls.cloned();
    assert_eq!(driver::session(&server, stream, None).await, SessionEnd::Finished);
}

/// The SMTP client side, over TCP or TLS.
pub struct Client<S> {
    pub stream: S,
    pub buf: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    pub fn new(stream: S) -> Self {
        Client { stream, buf: Vec::new() }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("client write");
        self.stream.flush().await.expect("client flush");
    }

    /// One complete (possibly multi-line) reply.
    pub async fn reply(&mut self) -> String {
        timeout(STEP, self.read_reply()).await.expect("reply within STEP")
    }

    async fn read_reply(&mut self) -> String {
        loop {
            if let Some(end) = reply_end(&self.buf) {
                let reply: Vec<u8> = self.buf.drain(..end).collect();
                return String::from_utf8(reply).expect("ASCII reply");
            }
            let mut chunk = [0; 4096];
            let n = self.stream.read(&mut chunk).await.expect("client read");
            assert!(n > 0, "server closed while a reply was due; have {:?}", String::from_utf8_lossy(&self.buf));
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    pub async fn cmd(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes()).await;
        self.reply().await
    }

    /// The greeting, EHLO, `MAIL FROM:<alice@example.test>` and `RCPT
    /// TO:<bob@example.test>`, each answered as the test config and a
    /// cleanup that takes the transaction make certain.
    pub async fn begin_transaction(&mut self) {
        assert_eq!(self.reply().await, "220 mortal.test ESMTP mortal\r\n");
        let ehlo = self.cmd("EHLO client.test").await;
        assert!(ehlo.starts_with("250-mortal.test\r\n") && ehlo.ends_with("250 CHUNKING\r\n"), "{ehlo}");
        assert_eq!(self.cmd("MAIL FROM:<alice@example.test>").await, "250 2.1.0 Ok\r\n");
        assert_eq!(self.cmd("RCPT TO:<bob@example.test>").await, "250 2.1.5 Ok\r\n");
    }

    /// Whether the server stays silent for `wait`.
    pub async fn silent_for(&mut self, wait: Duration) -> bool {
        let mut chunk = [0; 64];
        self.buf.is_empty() && timeout(wait, self.stream.read(&mut chunk)).await.is_err()
    }

    /// Whether the server closed the connection (after any pending reply).
    pub async fn closed(&mut self) -> bool {
        let mut chunk = [0; 64];
        matches!(timeout(STEP, self.stream.read(&mut chunk)).await, Ok(Ok(0) | Err(_)))
    }
}

/// The length of the first complete reply in `buf`, if there is one.
fn reply_end(buf: &[u8]) -> Option<usize> {
    let mut start = 0;
    while let Some(lf) = buf[start..].iter().position(|&b| b == b'\n') {
        let line = &buf[start..start + lf + 1];
        start += lf + 1;
        if line.get(3) == Some(&b' ') {
            return Some(start);
        }
    }
    None
}

/// Connects a client to a fresh listener and hands back the server's end
/// too; the connection is complete before anyone accepts, so the blocking
/// std accept returns at once.
pub async fn connect() -> (Client<TcpStream>, std::net::TcpStream) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let stream = TcpStream::connect(listener.local_addr().expect("local addr")).await.expect("connect");
    let (server, _) = listener.accept().expect("accept");
    (Client::new(stream), server)
}

/// The fake cleanup's side of one conversation.
pub struct Conversation {
    sock: UnixStream,
    decoder: Decoder,
}

impl Conversation {
    pub async fn accept(listener: &UnixListener) -> Self {
        let (sock, _) = timeout(STEP, listener.accept()).await.expect("smtpd connects").expect("accept");
        Conversation { sock, decoder: Decoder::new() }
    }

    /// The next record; `None` when smtpd hung up (or stopped talking for
    /// longer than `wait`).
    pub async fn request_within(&mut self, wait: Duration) -> Option<Request> {
        loop {
            if let Some(r) = self.decoder.next_request().expect("smtpd sends valid records") {
                return Some(r);
            }
            let mut buf = [0; 4096];
            let n = match timeout(wait, self.sock.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => n,
                _ => return None,
            };
            self.decoder.feed(&buf[..n]);
        }
    }

    /// The next record; `None` when smtpd hung up. smtpd must say something
    /// within [`STEP`].
    pub async fn request(&mut self) -> Option<Request> {
        loop {
            if let Some(r) = self.decoder.next_request().expect("smtpd sends valid records") {
                return Some(r);
            }
            let mut buf = [0; 4096];
            let n = timeout(STEP, self.sock.read(&mut buf)).await.expect("smtpd talks").ok()?;
            if n == 0 {
                return None;
            }
            self.decoder.feed(&buf[..n]);
        }
    }

    pub async fn reply(&mut self, reply: Reply) {
        let mut out = Vec::new();
        reply.encode(&mut out);
        self.sock.write_all(&out).await.expect("write to smtpd");
    }

    /// Hello, Client and Sender, answered with the queue id.
    pub async fn open(&mut self) -> Vec<Request> {
        let mut got = Vec::new();
        for _ in 0..3 {
            got.push(self.request().await.expect("envelope head"));
        }
        self.reply(Reply::QueueId(QUEUE_ID.parse().unwrap())).await;
        got
    }

    /// Everything up to and including End (or up to the hang-up).
    pub async fn until_end(&mut self) -> Vec<Request> {
        let mut got = Vec::new();
        while let Some(r) = self.request().await {
            let end = r == Request::End;
            got.push(r);
            if end {
                break;
            }
        }
        got
    }
}

/// A fake cleanup that accepts `transactions` transactions in turn and
/// returns what it got in each.
pub async fn cleanup_accepting(listener: &UnixListener, transactions: usize) -> Vec<Vec<Request>> {
    let mut all = Vec::new();
    for _ in 0..transactions {
        let mut conv = Conversation::accept(listener).await;
        let mut got = conv.open().await;
        got.extend(conv.until_end().await);
        if got.last() == Some(&Request::End) {
            conv.reply(answer(250, "2.0.0", &format!("Ok: queued as {QUEUE_ID}"))).await;
        }
        all.push(got);
    }
    all
}

/// A fake cleanup that answers the envelope head and then only reads, for
/// tests where the session ends before the message does.
pub async fn cleanup_reading(listener: &UnixListener) {
    let mut conv = Conversation::accept(listener).await;
    conv.open().await;
    while conv.request_within(STEP).await.is_some() {}
}

pub fn answer(code: u16, status: &str, text: &str) -> Reply {
    Reply::Answer { code: ReplyCode::of(code), status: status.parse().expect("status"), text: text.into() }
}

/// The message content among `requests`.
pub fn content(requests: &[Request]) -> Vec<u8> {
    requests.iter().filter_map(|r| if let Request::Data(d) = r { Some(d.clone()) } else { None }).flatten().collect()
}

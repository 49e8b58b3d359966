//! The driver over a real loopback TCP connection, against a fake cleanup
//! that speaks `mortal_proto::ipc` on a Unix socket in a temporary
//! directory. These pin down the durability contract: the client hears
//! 250 only after cleanup's 250 Answer, and any trouble with cleanup is a
//! 451, never a 250.

use mortal_proto::config::Config;
use mortal_proto::envelope::{BodyType, ClientInfo, Notify, RecipientInfo, SenderInfo};
use mortal_proto::ipc::{Decoder, PROTOCOL_VERSION, Reply, Request};
use mortal_proto::smtp_status::ReplyCode;
use mortal_smtpd::driver;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixListener, UnixStream};
use tokio::sync::oneshot;
use tokio::time::timeout;

/// Longest any single step of a test may take before it counts as hung.
const STEP: Duration = Duration::from_secs(5);
const QUEUE_ID: &str = "00000000A0000100000B";

/// A temporary directory with the run/private layout, removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("mortal-smtpd-driver-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("run/private")).expect("create test dir");
        Dir(dir)
    }

    fn config(&self, timeout: &str) -> Arc<Config> {
        let text = format!(
            "[server]\nhostname = \"mortal.test\"\nspool_dir = \"{0}/spool\"\nrun_dir = \"{0}/run\"\n\
             accepted_domains = [\"example.test\"]\n\n[smtpd]\ntimeout = \"{timeout}\"\n",
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

/// The SMTP client side.
struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("client write");
    }

    /// One complete (possibly multi-line) reply.
    async fn reply(&mut self) -> String {
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

    async fn cmd(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes()).await;
        self.reply().await
    }

    /// Whether the server stays silent for `wait`.
    async fn silent_for(&mut self, wait: Duration) -> bool {
        let mut chunk = [0; 64];
        self.buf.is_empty() && timeout(wait, self.stream.read(&mut chunk)).await.is_err()
    }

    /// Whether the server closed the connection (after any pending reply).
    async fn closed(&mut self) -> bool {
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
async fn connect() -> (Client, std::net::TcpStream) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (server, _) = listener.accept().expect("accept");
    (Client { stream, buf: Vec::new() }, server)
}

/// The fake cleanup's side of one conversation.
struct Conversation {
    sock: UnixStream,
    decoder: Decoder,
}

impl Conversation {
    async fn accept(listener: &UnixListener) -> Self {
        let (sock, _) = timeout(STEP, listener.accept()).await.expect("smtpd connects").expect("accept");
        Conversation { sock, decoder: Decoder::new() }
    }

    async fn request(&mut self) -> Option<Request> {
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

    async fn reply(&mut self, reply: Reply) {
        let mut out = Vec::new();
        reply.encode(&mut out);
        self.sock.write_all(&out).await.expect("write to smtpd");
    }

    /// Hello, Client and Sender, answered with the queue id.
    async fn open(&mut self) -> Vec<Request> {
        let mut got = Vec::new();
        for _ in 0..3 {
            got.push(self.request().await.expect("envelope head"));
        }
        self.reply(Reply::QueueId(QUEUE_ID.into())).await;
        got
    }

    /// Everything up to and including End.
    async fn until_end(&mut self) -> Vec<Request> {
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

fn answer(code: u16, status: &str, text: &str) -> Reply {
    Reply::Answer { code: ReplyCode::of(code), status: status.parse().expect("status"), text: text.into() }
}

fn content(requests: &[Request]) -> Vec<u8> {
    requests.iter().filter_map(|r| if let Request::Data(d) = r { Some(d.clone()) } else { None }).flatten().collect()
}

#[tokio::test]
async fn two_fifty_comes_only_after_cleanups_answer() {
    let dir = Dir::new();
    let config = dir.config("5s");
    let listener = UnixListener::bind(config.cleanup_socket()).expect("bind fake cleanup");
    let (mut client, server) = connect().await;
    let (got_end, end_seen) = oneshot::channel();
    let (release, released) = oneshot::channel::<()>();

    let cleanup = async {
        let mut conv = Conversation::accept(&listener).await;
        let head = conv.open().await;
        let rest = conv.until_end().await;
        let _ = got_end.send(());
        released.await.expect("test releases the answer");
        conv.reply(answer(250, "2.0.0", &format!("Ok: queued as {QUEUE_ID}"))).await;
        (head, rest)
    };
    let smtp = async {
        assert_eq!(client.reply().await, "220 mortal.test ESMTP mortal\r\n");
        assert!(client.cmd("EHLO client.test").await.contains("250-PIPELINING\r\n"));
        // One pipelined group (RFC 2920): replies in order.
        client.send(b"MAIL FROM:<alice@example.test> BODY=8BITMIME\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n").await;
        assert_eq!(client.reply().await, "250 2.1.0 Ok\r\n");
        assert_eq!(client.reply().await, "250 2.1.5 Ok\r\n");
        assert_eq!(client.reply().await, "354 End data with <CR><LF>.<CR><LF>\r\n");
        client.send(b"Subject: t\r\n\r\n..dot\r\nbody\r\n.\r\n").await;
        end_seen.await.expect("cleanup saw End");
        assert!(client.silent_for(Duration::from_millis(300)).await, "no reply may come before cleanup answers");
        release.send(()).expect("cleanup waiting");
        assert_eq!(client.reply().await, format!("250 2.0.0 Ok: queued as {QUEUE_ID}\r\n"));
        assert_eq!(client.cmd("QUIT").await, "221 2.0.0 Bye\r\n");
        assert!(client.closed().await);
    };
    let ((head, rest), (), ()) = tokio::join!(cleanup, smtp, driver::session(&config, server));

    let client_info = ClientInfo {
        addr: std::net::Ipv4Addr::LOCALHOST.into(),
        name: "unknown".into(),
        helo: "client.test".into(),
        protocol: "ESMTP".into(),
        tls: String::new(),
    };
    let sender = SenderInfo {
        address: "alice@example.test".into(),
        body: BodyType::EightBitMime,
        smtputf8: false,
        ret: None,
        envid: String::new(),
    };
    assert_eq!(
        head,
        [Request::Hello { version: PROTOCOL_VERSION }, Request::Client(client_info), Request::Sender(sender)]
    );
    assert_eq!(rest.first(), Some(&Request::Recipient(bob())));
    assert_eq!(rest.last(), Some(&Request::End));
    assert_eq!(content(&rest), b"Subject: t\r\n\r\n.dot\r\nbody\r\n");
}

#[tokio::test]
async fn unreachable_cleanup_is_a_451_at_mail() {
    let dir = Dir::new();
    let config = dir.config("5s");
    let (mut client, server) = connect().await;
    let smtp = async {
        client.reply().await;
        client.cmd("EHLO client.test").await;
        assert_eq!(client.cmd("MAIL FROM:<alice@example.test>").await, "451 4.3.0 Error: queue file write error\r\n");
        assert_eq!(client.cmd("RCPT TO:<bob@example.test>").await, "503 5.5.1 Error: need MAIL command\r\n");
        assert_eq!(client.cmd("QUIT").await, "221 2.0.0 Bye\r\n");
    };
    tokio::join!(smtp, driver::session(&config, server));
}

#[tokio::test]
async fn cleanup_hanging_up_mid_message_is_a_451_after_the_terminator() {
    let dir = Dir::new();
    let config = dir.config("5s");
    let listener = UnixListener::bind(config.cleanup_socket()).expect("bind fake cleanup");
    let (mut client, server) = connect().await;
    let cleanup = async {
        let mut conv = Conversation::accept(&listener).await;
        conv.open().await;
        while !matches!(conv.request().await, Some(Request::Data(_)) | None) {}
        // Hang up without an answer.
    };
    let smtp = async {
        client.reply().await;
        client.cmd("EHLO client.test").await;
        client.cmd("MAIL FROM:<alice@example.test>").await;
        client.cmd("RCPT TO:<bob@example.test>").await;
        client.cmd("DATA").await;
        let line = format!("{}\r\n", "x".repeat(900));
        for _ in 0..200 {
            client.send(line.as_bytes()).await;
        }
        client.send(b".\r\n").await;
        assert_eq!(client.reply().await, "451 4.3.0 Error: queue file write error\r\n");
        assert_eq!(client.cmd("QUIT").await, "221 2.0.0 Bye\r\n");
    };
    tokio::join!(cleanup, smtp, driver::session(&config, server));
}

#[tokio::test]
async fn cleanups_refusal_is_relayed() {
    let dir = Dir::new();
    let config = dir.config("5s");
    let listener = UnixListener::bind(config.cleanup_socket()).expect("bind fake cleanup");
    let (mut client, server) = connect().await;
    let cleanup = async {
        let mut conv = Conversation::accept(&listener).await;
        conv.open().await;
        conv.until_end().await;
        conv.reply(answer(554, "5.4.6", "Error: too many hops")).await;
    };
    let smtp = async {
        client.reply().await;
        client.cmd("EHLO client.test").await;
        client.cmd("MAIL FROM:<alice@example.test>").await;
        client.cmd("RCPT TO:<bob@example.test>").await;
        client.cmd("DATA").await;
        assert_eq!(client.cmd("hi\r\n.").await, "554 5.4.6 Error: too many hops\r\n");
        assert_eq!(client.cmd("QUIT").await, "221 2.0.0 Bye\r\n");
    };
    tokio::join!(cleanup, smtp, driver::session(&config, server));
}

#[tokio::test]
async fn rset_drops_the_cleanup_connection() {
    let dir = Dir::new();
    let config = dir.config("5s");
    let listener = UnixListener::bind(config.cleanup_socket()).expect("bind fake cleanup");
    let (mut client, server) = connect().await;
    let cleanup = async {
        let mut conv = Conversation::accept(&listener).await;
        conv.open().await;
        // After the recipient, the next thing cleanup sees is end of input.
        assert_eq!(conv.request().await, Some(Request::Recipient(bob())));
        assert_eq!(conv.request().await, None, "RSET must drop the connection without End");
    };
    let smtp = async {
        client.reply().await;
        client.cmd("EHLO client.test").await;
        client.cmd("MAIL FROM:<alice@example.test>").await;
        client.cmd("RCPT TO:<bob@example.test>").await;
        assert_eq!(client.cmd("RSET").await, "250 2.0.0 Ok\r\n");
        assert_eq!(client.cmd("QUIT").await, "221 2.0.0 Bye\r\n");
    };
    tokio::join!(cleanup, smtp, driver::session(&config, server));
}

#[tokio::test]
async fn idle_client_gets_421_timeout() {
    let dir = Dir::new();
    let config = dir.config("200ms");
    let (mut client, server) = connect().await;
    let smtp = async {
        client.reply().await;
        assert_eq!(client.reply().await, "421 4.4.2 mortal.test Error: timeout exceeded\r\n");
        assert!(client.closed().await);
    };
    tokio::join!(smtp, driver::session(&config, server));
}

#[tokio::test]
async fn client_talking_before_the_greeting_is_refused() {
    let dir = Dir::new();
    let config = dir.config("5s");
    let (mut client, server) = connect().await;
    client.send(b"EHLO client.test\r\n").await;
    // Let the bytes reach the server's socket before the session looks.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let smtp = async {
        assert_eq!(client.reply().await, "220 mortal.test ESMTP mortal\r\n");
        assert_eq!(client.reply().await, "554 5.5.0 Error: SMTP protocol synchronization\r\n");
        assert!(client.closed().await);
    };
    tokio::join!(smtp, driver::session(&config, server));
}

/// The recipient the tests' clients give, as smtpd forwards it.
fn bob() -> RecipientInfo {
    RecipientInfo { address: "bob@example.test".into(), notify: Notify::default(), orcpt: String::new() }
}

//! The driver over a real loopback TCP connection, against a fake cleanup
//! that speaks `mortal_proto::ipc` on a Unix socket in a temporary
//! directory. These pin down the durability contract: the client hears
//! 250 only after cleanup's 250 Answer, and any trouble with cleanup is a
//! 451, never a 250.

mod support;

use mortal_proto::envelope::{BodyType, ClientInfo, Notify, RecipientInfo, SenderInfo};
use mortal_proto::ipc::{PROTOCOL_VERSION, Request};
use std::time::Duration;
use support::{Conversation, Dir, QUEUE_ID, answer, connect, content, serve};
use tokio::net::UnixListener;
use tokio::sync::oneshot;

#[tokio::test]
async fn two_fifty_comes_only_after_cleanups_answer() {
    let dir = Dir::new();
    let config = dir.config("timeout = \"5s\"");
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
    let ((head, rest), (), ()) = tokio::join!(cleanup, smtp, serve(&config, None, server));

    let client_info = ClientInfo {
        addr: std::net::Ipv4Addr::LOCALHOST.into(),
        name: "unknown".into(),
        helo: "client.test".into(),
        protocol: "ESMTP".into(),
        tls: String::new(),
        auth: None,
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
    let config = dir.config("timeout = \"5s\"");
    let (mut client, server) = connect().await;
    let smtp = async {
        client.reply().await;
        client.cmd("EHLO client.test").await;
        assert_eq!(client.cmd("MAIL FROM:<alice@example.test>").await, "451 4.3.0 Error: queue file write error\r\n");
        assert_eq!(client.cmd("RCPT TO:<bob@example.test>").await, "503 5.5.1 Error: need MAIL command\r\n");
        assert_eq!(client.cmd("QUIT").await, "221 2.0.0 Bye\r\n");
    };
    tokio::join!(smtp, serve(&config, None, server));
}

#[tokio::test]
async fn cleanup_hanging_up_mid_message_is_a_451_after_the_terminator() {
    let dir = Dir::new();
    let config = dir.config("timeout = \"5s\"");
    let listener = UnixListener::bind(config.cleanup_socket()).expect("bind fake cleanup");
    let (mut client, server) = connect().await;
    let cleanup = async {
        let mut conv = Conversation::accept(&listener).await;
        conv.open().await;
        while !matches!(conv.request().await, Some(Request::Data(_)) | None) {}
        // Hang up without an answer.
    };
    let smtp = async {
        client.begin_transaction().await;
        client.cmd("DATA").await;
        let line = format!("{}\r\n", "x".repeat(900));
        for _ in 0..200 {
            client.send(line.as_bytes()).await;
        }
        client.send(b".\r\n").await;
        assert_eq!(client.reply().await, "451 4.3.0 Error: queue file write error\r\n");
        assert_eq!(client.cmd("QUIT").await, "221 2.0.0 Bye\r\n");
    };
    tokio::join!(cleanup, smtp, serve(&config, None, server));
}

#[tokio::test]
async fn cleanups_refusal_is_relayed() {
    let dir = Dir::new();
    let config = dir.config("timeout = \"5s\"");
    let listener = UnixListener::bind(config.cleanup_socket()).expect("bind fake cleanup");
    let (mut client, server) = connect().await;
    let cleanup = async {
        let mut conv = Conversation::accept(&listener).await;
        conv.open().await;
        conv.until_end().await;
        conv.reply(answer(554, "5.4.6", "Error: too many hops")).await;
    };
    let smtp = async {
        client.begin_transaction().await;
        client.cmd("DATA").await;
        assert_eq!(client.cmd("hi\r\n.").await, "554 5.4.6 Error: too many hops\r\n");
        assert_eq!(client.cmd("QUIT").await, "221 2.0.0 Bye\r\n");
    };
    tokio::join!(cleanup, smtp, serve(&config, None, server));
}

#[tokio::test]
async fn rset_drops_the_cleanup_connection() {
    let dir = Dir::new();
    let config = dir.config("timeout = \"5s\"");
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
        client.begin_transaction().await;
        assert_eq!(client.cmd("RSET").await, "250 2.0.0 Ok\r\n");
        assert_eq!(client.cmd("QUIT").await, "221 2.0.0 Bye\r\n");
    };
    tokio::join!(cleanup, smtp, serve(&config, None, server));
}

#[tokio::test]
async fn idle_client_gets_421_timeout() {
    let dir = Dir::new();
    let config = dir.config("timeout = \"200ms\"");
    let (mut client, server) = connect().await;
    let smtp = async {
        client.reply().await;
        assert_eq!(client.reply().await, "421 4.4.2 mortal.test Error: timeout exceeded\r\n");
        assert!(client.closed().await);
    };
    tokio::join!(smtp, serve(&config, None, server));
}

#[tokio::test]
async fn client_talking_before_the_greeting_is_refused() {
    let dir = Dir::new();
    let config = dir.config("timeout = \"5s\"");
    let (mut client, server) = connect().await;
    client.send(b"EHLO client.test\r\n").await;
    // The bytes are in the server's socket before the session looks.
    let mut early = [0u8; 64];
    while server.peek(&mut early).expect("peek at the early bytes") < b"EHLO client.test\r\n".len() {}
    let smtp = async {
        assert_eq!(client.reply().await, "220 mortal.test ESMTP mortal\r\n");
        assert_eq!(client.reply().await, "554 5.5.0 Error: SMTP protocol synchronization\r\n");
        assert!(client.closed().await);
    };
    tokio::join!(smtp, serve(&config, None, server));
}

/// The recipient the tests' clients give, as smtpd forwards it.
fn bob() -> RecipientInfo {
    RecipientInfo { address: "bob@example.test".into(), notify: Notify::default(), orcpt: String::new() }
}

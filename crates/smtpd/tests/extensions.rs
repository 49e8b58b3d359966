//! The protocol extensions on a real loopback connection, driver included:
//! STARTTLS (RFC 3207) with a rustls client, BDAT (RFC 3030), the error
//! tarpit and the minimum data rate, against a fake cleanup speaking
//! `mortal_proto::ipc` on a Unix socket. Certificates are made with rcgen
//! for each test run.

mod support;

use mortal_proto::config::Config;
use mortal_proto::ipc::Request;
use mortal_smtpd::tls::TlsServer;
use rustls::pki_types::{CertificateDer, ServerName};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::{Client, Dir, QUEUE_ID, STEP, cleanup_accepting, cleanup_reading, connect, content, serve};
use tokio::io::AsyncReadExt;
use tokio::net::UnixListener;
use tokio::time::timeout;
use tokio_rustls::TlsConnector;

/// A test directory with a test CA and a server certificate for
/// `localhost` made with rcgen.
struct TlsDir {
    dir: Dir,
    ca: CertificateDer<'static>,
}

impl TlsDir {
    fn new() -> Self {
        let dir = Dir::new();
        let ca_key = rcgen::KeyPair::generate().expect("CA key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::new()).expect("CA params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(rcgen::DnType::CommonName, "mortal test CA");
        let ca = ca_params.self_signed(&ca_key).expect("CA certificate");
        let key = rcgen::KeyPair::generate().expect("server key");
        let params = rcgen::CertificateParams::new(vec!["localhost".into()]).expect("server params");
        let cert = params.signed_by(&key, &ca, &ca_key).expect("server certificate");
        std::fs::write(dir.path().join("cert.pem"), cert.pem() + &ca.pem()).expect("write cert");
        std::fs::write(dir.path().join("key.pem"), key.serialize_pem()).expect("write key");
        TlsDir { dir, ca: ca.der().clone() }
    }

    /// A config with `[smtpd]` `extra` lines; STARTTLS is offered with the
    /// test certificate.
    fn config(&self, extra: &str) -> Arc<Config> {
        let path = self.dir.path().display();
        self.dir.config(&format!(
            "timeout = \"5s\"\ntls_cert_file = \"{path}/cert.pem\"\ntls_key_file = \"{path}/key.pem\"\n{extra}"
        ))
    }

    fn connector(&self, versions: &[&'static rustls::SupportedProtocolVersion]) -> TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.clone()).expect("trust the test CA");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        TlsConnector::from(Arc::new(config))
    }
}

/// STARTTLS, then a message through TLS: EHLO again (without STARTTLS
/// offered), and cleanup gets ESMTPS with the negotiated TLS.
async fn message_over_tls(versions: &[&'static rustls::SupportedProtocolVersion]) -> Vec<Request> {
    let dir = TlsDir::new();
    let config = dir.config("");
    let tls = TlsServer::from_config(&config.smtpd).expect("load TLS").expect("TLS offered");
    let listener = UnixListener::bind(config.cleanup_socket()).expect("bind fake cleanup");
    let (mut client, server) = connect().await;
    let connector = dir.connector(versions);
    let smtp = async {
        assert_eq!(client.reply().await, "220 mortal.test ESMTP mortal\r\n");
        assert!(client.cmd("EHLO client.test").await.contains("250-STARTTLS\r\n"));
        assert_eq!(client.cmd("STARTTLS").await, "220 2.0.0 Ready to start TLS\r\n");
        let name = ServerName::try_from("localhost").expect("name");
        let stream = timeout(STEP, connector.connect(name, client.stream)).await.expect("handshake in time");
        let mut tls_client = Client::new(stream.expect("handshake"));
        let ehlo = tls_client.cmd("EHLO client.test").await;
        assert!(ehlo.ends_with("250 CHUNKING\r\n") && !ehlo.contains("STARTTLS"), "{ehlo}");
        assert_eq!(tls_client.cmd("MAIL FROM:<alice@example.test>").await, "250 2.1.0 Ok\r\n");
        assert_eq!(tls_client.cmd("RCPT TO:<bob@example.test>").await, "250 2.1.5 Ok\r\n");
        assert!(tls_client.cmd("DATA").await.starts_with("354 "));
        tls_client.send(b"Subject: tls\r\n\r\nsecret\r\n.\r\n").await;
        assert_eq!(tls_client.reply().await, format!("250 2.0.0 Ok: queued as {QUEUE_ID}\r\n"));
        assert_eq!(tls_client.cmd("QUIT").await, "221 2.0.0 Bye\r\n");
        assert!(tls_client.closed().await);
    };
    let (mut got, (), ()) = tokio::join!(cleanup_accepting(&listener, 1), smtp, serve(&config, Some(&tls), server));
    let got = got.remove(0);
    assert_eq!(content(&got), b"Subject: tls\r\n\r\nsecret\r\n");
    got
}

fn client_of(requests: &[Request]) -> mortal_proto::envelope::ClientInfo {
    match &requests[1] {
        Request::Client(c) => c.clone(),
        other => panic!("expected Client, got {other:?}"),
    }
}

#[tokio::test]
async fn starttls_tls13_message_is_esmtps() {
    let got = message_over_tls(&[&rustls::version::TLS13]).await;
    let client = client_of(&got);
    assert_eq!(client.protocol, "ESMTPS");
    assert!(client.tls.starts_with("TLSv1.3 with cipher TLS13_"), "{}", client.tls);
    assert!(client.tls.ends_with(" bits)"), "{}", client.tls);
}

#[tokio::test]
async fn starttls_tls12_is_accepted() {
    let got = message_over_tls(&[&rustls::version::TLS12]).await;
    let client = client_of(&got);
    assert_eq!(client.protocol, "ESMTPS");
    assert!(client.tls.starts_with("TLSv1.2 with cipher TLS_ECDHE_"), "{}", client.tls);
}

/// CVE-2011-0411 class: a command sent in the clear right behind STARTTLS
/// must never be executed, before or after the handshake.
#[tokio::test]
async fn plaintext_pipelined_after_starttls_is_refused() {
    let dir = TlsDir::new();
    let config = dir.config("");
    let tls = TlsServer::from_config(&config.smtpd).expect("load TLS");
    let (mut client, server) = connect().await;
    let smtp = async {
        client.reply().await;
        client.cmd("EHLO client.test").await;
        client.send(b"STARTTLS\r\nMAIL FROM:<injected@example.test>\r\n").await;
        assert_eq!(client.reply().await, "554 5.5.0 Error: SMTP protocol synchronization\r\n");
        assert!(client.closed().await);
    };
    tokio::join!(smtp, serve(&config, tls.as_ref(), server));
}

/// Plaintext arriving after the 220 (in its own packet) is fed to the TLS
/// handshake, which fails: it is never read as a command.
#[tokio::test]
async fn plaintext_instead_of_a_handshake_ends_the_session() {
    let dir = TlsDir::new();
    let config = dir.config("");
    let tls = TlsServer::from_config(&config.smtpd).expect("load TLS");
    let (mut client, server) = connect().await;
    let smtp = async {
        client.reply().await;
        client.cmd("EHLO client.test").await;
        assert_eq!(client.cmd("STARTTLS").await, "220 2.0.0 Ready to start TLS\r\n");
        client.send(b"MAIL FROM:<injected@example.test>\r\n").await;
        let mut rest = Vec::new();
        let _ = timeout(STEP, client.stream.read_to_end(&mut rest)).await.expect("server closes");
        assert!(!String::from_utf8_lossy(&rest).contains("250"), "{rest:?}");
    };
    tokio::join!(smtp, serve(&config, tls.as_ref(), server));
}

#[tokio::test]
async fn silent_handshake_times_out() {
    let dir = TlsDir::new();
    let config = dir.config("tls_handshake_timeout = \"500ms\"");
    let tls = TlsServer::from_config(&config.smtpd).expect("load TLS");
    let (mut client, server) = connect().await;
    let smtp = async {
        client.reply().await;
        client.cmd("EHLO client.test").await;
        assert_eq!(client.cmd("STARTTLS").await, "220 2.0.0 Ready to start TLS\r\n");
        let started = Instant::now();
        assert!(client.closed().await);
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(400) && waited < Duration::from_secs(3), "{waited:?}");
    };
    tokio::join!(smtp, serve(&config, tls.as_ref(), server));
}

/// BDAT on the wire: chunks pipelined with their commands arrive at
/// cleanup exactly, not unstuffed; LAST is answered with cleanup's 250.
#[tokio::test]
async fn bdat_chunks_reach_cleanup_exactly() {
    let dir = TlsDir::new();
    let config = dir.config("");
    let listener = UnixListener::bind(config.cleanup_socket()).expect("bind fake cleanup");
    let (mut client, server) = connect().await;
    let smtp = async {
        client.reply().await;
        client.cmd("EHLO client.test").await;
        client
            .send(
                b"MAIL FROM:<alice@example.test>\r\nRCPT TO:<bob@example.test>\r\nBDAT 18\r\nSubject: b\r\n\r\n..\r\n",
            )
            .await;
        client.send(b"BDAT 8 LAST\r\n.\r\nend\r\n").await;
        assert_eq!(client.reply().await, "250 2.1.0 Ok\r\n");
        assert_eq!(client.reply().await, "250 2.1.5 Ok\r\n");
        assert_eq!(client.reply().await, "250 2.0.0 Ok: 18 octets\r\n");
        assert_eq!(client.reply().await, format!("250 2.0.0 Ok: queued as {QUEUE_ID}\r\n"));
        assert_eq!(client.cmd("QUIT").await, "221 2.0.0 Bye\r\n");
    };
    let (got, (), ()) = tokio::join!(cleanup_accepting(&listener, 1), smtp, serve(&config, None, server));
    assert_eq!(content(&got[0]), b"Subject: b\r\n\r\n..\r\n.\r\nend\r\n");
}

/// Past soft_error_limit every reply waits error_sleep.
#[tokio::test]
async fn error_sleep_delays_replies_past_the_soft_limit() {
    let dir = TlsDir::new();
    let config = dir.config("soft_error_limit = 1\nerror_sleep = \"400ms\"");
    let (mut client, server) = connect().await;
    let smtp = async {
        client.reply().await;
        let started = Instant::now();
        assert!(client.cmd("BOGUS").await.starts_with("500 "));
        assert!(started.elapsed() < Duration::from_millis(300), "first error is not delayed");
        let started = Instant::now();
        assert_eq!(client.cmd("NOOP").await, "250 2.0.0 Ok\r\n");
        assert!(started.elapsed() >= Duration::from_millis(400), "delayed past the soft limit");
        client.cmd("QUIT").await;
    };
    tokio::join!(smtp, serve(&config, None, server));
}

/// A client trickling content slower than min_data_rate is cut off after
/// one window with 421, long before the ordinary timeout (5 s here).
#[tokio::test]
async fn slowloris_data_is_cut_off() {
    let dir = TlsDir::new();
    let config = dir.config("min_data_rate = 100\ndata_rate_window = \"1s\"");
    let listener = UnixListener::bind(config.cleanup_socket()).expect("bind fake cleanup");
    let (mut client, server) = connect().await;
    let smtp = async {
        client.begin_transaction().await;
        assert!(client.cmd("DATA").await.starts_with("354 "));
        let started = Instant::now();
        let mut reply = String::new();
        // 10 octets every 200 ms is 50 octets/s: half the minimum.
        for _ in 0..20 {
            client.send(b"xxxxxxxx\r\n").await;
            let mut chunk = [0; 256];
            if let Ok(Ok(n)) = timeout(Duration::from_millis(200), client.stream.read(&mut chunk)).await {
                reply = String::from_utf8_lossy(&chunk[..n]).into_owned();
                break;
            }
        }
        assert_eq!(reply, "421 4.4.2 mortal.test Error: timeout exceeded\r\n");
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(900) && waited < Duration::from_secs(3), "{waited:?}");
        assert!(client.closed().await);
    };
    let cleanup = cleanup_reading(&listener);
    tokio::join!(cleanup, smtp, serve(&config, None, server));
}

/// The same rate limit lets an honest client through.
#[tokio::test]
async fn steady_data_passes_the_rate_check() {
    let dir = TlsDir::new();
    let config = dir.config("min_data_rate = 100\ndata_rate_window = \"300ms\"");
    let listener = UnixListener::bind(config.cleanup_socket()).expect("bind fake cleanup");
    let (mut client, server) = connect().await;
    let smtp = async {
        client.begin_transaction().await;
        assert!(client.cmd("DATA").await.starts_with("354 "));
        // 100 octets every 100 ms: 1000 octets/s, for a second.
        for _ in 0..10 {
            client.send(&[b"x".repeat(98), b"\r\n".to_vec()].concat()).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        client.send(b".\r\n").await;
        assert_eq!(client.reply().await, format!("250 2.0.0 Ok: queued as {QUEUE_ID}\r\n"));
        client.cmd("QUIT").await;
    };
    let (got, (), ()) = tokio::join!(cleanup_accepting(&listener, 1), smtp, serve(&config, None, server));
    assert_eq!(content(&got[0]).len(), 1000);
}

/// Tiny BDAT chunks trickled between commands count against the rate
/// too: the whole BDAT transaction is content.
#[tokio::test]
async fn slowloris_bdat_chunks_are_cut_off() {
    let dir = TlsDir::new();
    let config = dir.config("min_data_rate = 100\ndata_rate_window = \"1s\"");
    let listener = UnixListener::bind(config.cleanup_socket()).expect("bind fake cleanup");
    let (mut client, server) = connect().await;
    let smtp = async {
        client.begin_transaction().await;
        let started = Instant::now();
        let mut last = String::new();
        // 9 octets every 250 ms: 36 octets/s.
        for _ in 0..20 {
            client.send(b"BDAT 1\r\nx").await;
            last = client.reply().await;
            if !last.starts_with("250 ") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        assert_eq!(last, "421 4.4.2 mortal.test Error: timeout exceeded\r\n");
        assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
        assert!(client.closed().await);
    };
    let cleanup = cleanup_reading(&listener);
    tokio::join!(cleanup, smtp, serve(&config, None, server));
}

/// DSN parameters and SMTPUTF8 travel to cleanup decoded, in the IPC
/// records that end up in the queue file.
#[tokio::test]
async fn dsn_and_smtputf8_reach_cleanup() {
    let dir = TlsDir::new();
    let config = dir.config("");
    let listener = UnixListener::bind(config.cleanup_socket()).expect("bind fake cleanup");
    let (mut client, server) = connect().await;
    let smtp = async {
        client.reply().await;
        client.cmd("EHLO client.test").await;
        let mail = "MAIL FROM:<jürgen@example.test> SMTPUTF8 RET=HDRS ENVID=id+2B1";
        assert_eq!(client.cmd(mail).await, "250 2.1.0 Ok\r\n");
        let rcpt = "RCPT TO:<bob@example.test> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;b+2Bob@example.test";
        assert_eq!(client.cmd(rcpt).await, "250 2.1.5 Ok\r\n");
        assert!(client.cmd("DATA").await.starts_with("354 "));
        client.send(b"Subject: dsn\r\n\r\n.\r\n").await;
        assert_eq!(client.reply().await, format!("250 2.0.0 Ok: queued as {QUEUE_ID}\r\n"));
        client.cmd("QUIT").await;
    };
    let (got, (), ()) = tokio::join!(cleanup_accepting(&listener, 1), smtp, serve(&config, None, server));
    let got = &got[0];
    assert_eq!(client_of(got).protocol, "UTF8SMTP");
    let Request::Sender(sender) = &got[2] else { panic!("expected Sender, got {:?}", got[2]) };
    assert_eq!(
        (sender.address.as_str(), sender.smtputf8, sender.ret, sender.envid.as_str()),
        ("jürgen@example.test", true, Some(mortal_proto::envelope::DsnRet::Headers), "id+1")
    );
    let Request::Recipient(rcpt) = &got[3] else { panic!("expected Recipient, got {:?}", got[3]) };
    let notify = mortal_proto::envelope::Notify { never: false, success: true, failure: false, delay: true };
    assert_eq!((rcpt.notify, rcpt.orcpt.as_str()), (notify, "rfc822;b+ob@example.test"));
}

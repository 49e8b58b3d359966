//! Interop: real third-party SMTP clients against a real running mortal
//! (master, smtpd, cleanup, queue) on a loopback port, with STARTTLS on a
//! certificate made by rcgen for the run. Clients: swaks (plain,
//! STARTTLS, pipelining), Python's smtplib (STARTTLS, and raw BDAT
//! commands since swaks has no CHUNKING), `openssl s_client -starttls
//! smtp`, curl's `smtp://` and msmtp. `cargo xtask ci` installs them
//! (`TEST_PACKAGES`). Each test checks the client's own verdict and that
//! the message was delivered with the right `Received:` protocol.

use mortal_tests::{Instance, Options, TempDir, WAIT, python};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;

/// A mortal instance offering STARTTLS with a fresh self-signed
/// certificate for `localhost`, written next to its config.
fn tls_instance() -> Instance {
    let dir = TempDir::new("interop-certs");
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
        .expect("params")
        .self_signed(&key)
        .expect("self-signed certificate");
    let (cert_file, key_file) = (dir.0.join("cert.pem"), dir.0.join("key.pem"));
    std::fs::write(&cert_file, cert.pem()).expect("write cert");
    std::fs::write(&key_file, key.serialize_pem()).expect("write key");
    let smtpd_extra = format!("tls_cert_file = {cert_file:?}\ntls_key_file = {key_file:?}\n");
    // Every child reads the files when it starts, the spares the master
    // adds during a test too: they live as long as the instance.
    let mut mortal = Instance::start_with(Options { smtpd_extra, ..Options::default() });
    mortal.keep(dir);
    mortal
}

/// Runs a client to completion (bounded by [`WAIT`]), panicking with its
/// output when it fails; returns stdout and stderr. The caller sets stdin.
fn run(cmd: &mut Command, what: &str) -> String {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{what} is required (cargo xtask ci installs it): {e}"));
    let mut guard = Reaper(Some(child));
    let out = guard.wait_output(what);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{what} failed ({}):\n{text}", out.status);
    text
}

/// Kills its child (by pid, through `Child`) if a test panics first.
struct Reaper(Option<Child>);

impl Reaper {
    fn wait_output(&mut self, what: &str) -> std::process::Output {
        let child = self.0.take().expect("child");
        let pid = child.id();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        match rx.recv_timeout(WAIT) {
            Ok(out) => out.expect("wait for client"),
            Err(_) => {
                let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
                panic!("{what} did not finish within {WAIT:?}");
            }
        }
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The one message delivered to `rcpt`, as text.
fn delivered(mortal: &Instance, rcpt: &str) -> String {
    let got = mortal.wait_for_delivery(rcpt, 1);
    assert_eq!(got.len(), 1, "exactly one message for {rcpt}");
    String::from_utf8_lossy(&got[0]).into_owned()
}

/// Asserts the `Received:` field names the protocol and, under TLS, what
/// was negotiated.
fn assert_received(message: &str, protocol: &str, tls: bool) {
    assert!(message.contains(&format!(" with {protocol} id ")), "expected {protocol}:\n{message}");
    assert_eq!(message.contains("(using TLSv1."), tls, "TLS facts in Received:\n{message}");
}

fn swaks(mortal: &Instance, rcpt: &str, extra: &[&str]) -> String {
    run(
        Command::new("swaks")
            .args(["--server", &format!("127.0.0.1:{}", mortal.port), "--helo", "swaks.test"])
            .args(["--from", "sender@example.test", "--to", rcpt])
            .args(["--header", "Subject: interop", "--body", "hello from swaks"])
            .args(extra)
            .stdin(Stdio::null()),
        "swaks",
    )
}

#[test]
fn swaks_plain() {
    let mortal = tls_instance();
    let out = swaks(&mortal, "plain@example.test", &[]);
    assert!(out.contains("<-  250 2.0.0 Ok: queued as "), "{out}");
    assert_received(&delivered(&mortal, "plain@example.test"), "ESMTP", false);
}

#[test]
fn swaks_starttls() {
    let mortal = tls_instance();
    let out = swaks(&mortal, "tls@example.test", &["--tls"]);
    assert!(out.contains("<-  220 2.0.0 Ready to start TLS"), "{out}");
    assert!(out.contains("=== TLS started with cipher TLSv1.3"), "{out}");
    // After the handshake swaks says EHLO again and STARTTLS is not offered.
    assert!(out.contains("<~  250 CHUNKING"), "{out}");
    assert!(!out.contains("<~  250-STARTTLS"), "{out}");
    assert!(out.contains("<~  250 2.0.0 Ok: queued as "), "{out}");
    assert_received(&delivered(&mortal, "tls@example.test"), "ESMTPS", true);
    mortal.wait_for_log("Anonymous TLS connection established from unknown[127.0.0.1]: TLSv1.3 with cipher TLS13_");
}

#[test]
fn swaks_pipelining() {
    let mortal = tls_instance();
    let out = swaks(&mortal, "pipe@example.test", &["--pipeline"]);
    // The whole envelope went out as one group, and was accepted as one.
    assert!(out.contains(" -> MAIL FROM:<sender@example.test>\n -> RCPT TO:<pipe@example.test>\n -> DATA"), "{out}");
    assert!(out.contains("<-  250 2.0.0 Ok: queued as "), "{out}");
    assert_received(&delivered(&mortal, "pipe@example.test"), "ESMTP", false);
}

/// swaks has no CHUNKING, so BDAT is driven through smtplib's raw
/// commands: a text body in two chunks, then a BINARYMIME body with NUL
/// octets and bare line endings that DATA could never carry.
#[test]
fn smtplib_bdat_and_binarymime() {
    let mortal = tls_instance();
    let out = python(&format!(
        r#"
import smtplib
s = smtplib.SMTP("127.0.0.1", {port}, timeout=20)
s.ehlo("bdat.test")
assert s.has_extn("chunking") and s.has_extn("binarymime"), s.esmtp_features
def chunk(data, last):
    s.send(b"BDAT %d%s\r\n" % (len(data), b" LAST" if last else b"") + data)
    return s.getreply()
assert s.mail("a@example.test")[0] == 250
assert s.rcpt("chunks@example.test")[0] == 250
assert chunk(b"Subject: bdat\r\n\r\nfirst line\r\n", False) == (250, b"2.0.0 Ok: 29 octets")
code, text = chunk(b".second line, a dot and no stuffing\r\n", True)
assert code == 250 and text.startswith(b"2.0.0 Ok: queued as "), (code, text)
assert s.mail("a@example.test", ["BODY=BINARYMIME"])[0] == 250
assert s.rcpt("binary@example.test")[0] == 250
code, text = chunk(b"Subject: binary\r\n\r\n\x00\x01\n\r.\r\n\xff", True)
assert code == 250, (code, text)
s.quit()
print("ok")
"#,
        port = mortal.port
    ));
    assert_eq!(out.trim(), "ok");
    let text = delivered(&mortal, "chunks@example.test");
    assert!(text.contains("first line\n.second line, a dot and no stuffing\n"), "{text}");
    let binary = mortal.wait_for_delivery("binary@example.test", 1).remove(0);
    // A BINARYMIME body is stored exactly as sent, line ends included.
    assert!(binary.starts_with(b"Return-Path: <a@example.test>\r\n"), "{binary:?}");
    assert!(binary.windows(17).any(|w| w == b"Subject: binary\r\n"), "{binary:?}");
    assert!(binary.ends_with(b"\r\n\r\n\x00\x01\n\r.\r\n\xff"), "{binary:?}");
}

#[test]
fn smtplib_starttls() {
    let mortal = tls_instance();
    let out = python(&format!(
        r#"
import smtplib, ssl
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
with smtplib.SMTP("127.0.0.1", {port}, timeout=20) as s:
    s.ehlo("smtplib.test")
    assert s.has_extn("starttls")
    code, _ = s.starttls(context=ctx)
    assert code == 220
    s.ehlo("smtplib.test")
    assert not s.has_extn("starttls"), s.esmtp_features
    print(s.sock.version(), s.sock.cipher()[0])
    s.sendmail("a@example.test", ["starttls@example.test"], b"Subject: smtplib tls\r\n\r\nover TLS\r\n")
"#,
        port = mortal.port
    ));
    assert!(out.starts_with("TLSv1.3 TLS_AES_"), "{out}");
    assert_received(&delivered(&mortal, "starttls@example.test"), "ESMTPS", true);
}

/// `openssl s_client -starttls smtp`: the negotiated version and cipher
/// as OpenSSL sees them, then a message sent through the TLS session.
#[test]
fn openssl_s_client_starttls() {
    let mortal = tls_instance();
    let mut child = Command::new("openssl")
        .args(["s_client", "-starttls", "smtp", "-connect", &format!("127.0.0.1:{}", mortal.port)])
        .args(["-brief", "-ign_eof", "-crlf", "-servername", "localhost"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl is required (cargo xtask ci installs it)");
    let mut stdin = child.stdin.take().expect("stdin");
    let stdout = child.stdout.take().expect("stdout");
    let stderr = child.stderr.take().expect("stderr");
    let mut reaper = Reaper(Some(child));
    let lines = line_channel(stdout);
    let info = line_channel(stderr);
    let mut info_text = String::new();
    while !info_text.contains("Ciphersuite:") {
        let line = info.recv_timeout(WAIT).unwrap_or_else(|_| panic!("no TLS summary from s_client: {info_text}"));
        info_text.push_str(&line);
    }
    assert!(info_text.contains("Protocol version: TLSv1.3"), "{info_text}");
    assert!(info_text.contains("Ciphersuite: TLS_AES_256_GCM_SHA384"), "{info_text}");
    // s_client consumed the greeting and its own EHLO; the session after
    // STARTTLS starts fresh.
    let mut say = |line: &str, expect: &str| {
        writeln!(stdin, "{line}").expect("write to s_client");
        let reply = read_reply(&lines);
        assert!(reply.starts_with(expect), "{line} -> {reply}");
    };
    say("EHLO openssl.test", "250-mortal.test");
    say("MAIL FROM:<a@example.test>", "250 ");
    say("RCPT TO:<openssl@example.test>", "250 ");
    say("DATA", "354 ");
    say("Subject: via openssl\n\nsent after STARTTLS\n.", "250 2.0.0 Ok: queued as ");
    say("QUIT", "221 ");
    drop(stdin);
    let out = reaper.wait_output("openssl s_client");
    assert!(out.status.success(), "s_client: {}", String::from_utf8_lossy(&out.stderr));
    let text = delivered(&mortal, "openssl@example.test");
    assert!(text.contains("sent after STARTTLS"), "{text}");
    assert_received(&text, "ESMTPS", true);
}

/// Lines of a child's output, read on a thread so reads can time out.
fn line_channel(out: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line + "\n").is_err() {
                break;
            }
        }
    });
    rx
}

/// One (possibly multi-line) SMTP reply from `lines`.
fn read_reply(lines: &mpsc::Receiver<String>) -> String {
    let mut reply = String::new();
    loop {
        let line = lines.recv_timeout(WAIT).unwrap_or_else(|_| panic!("no reply; have {reply:?}"));
        let last = line.as_bytes().get(3) == Some(&b' ');
        reply.push_str(&line);
        if last {
            return reply;
        }
    }
}

fn message_file(dir: &Path, subject: &str) -> PathBuf {
    let path = dir.join(format!("{subject}.eml"));
    let text = format!("From: a@example.test\r\nTo: b@example.test\r\nSubject: {subject}\r\n\r\nbody of {subject}\r\n");
    std::fs::write(&path, text).expect("write message file");
    path
}

#[test]
fn curl_plain_and_starttls() {
    let mortal = tls_instance();
    let scratch = TempDir::new("interop-curl");
    let dir = &scratch.0;
    let url = format!("smtp://127.0.0.1:{}/curl.test", mortal.port);
    for (rcpt, tls) in [("curl@example.test", false), ("curl-tls@example.test", true)] {
        let mut cmd = Command::new("curl");
        cmd.stdin(Stdio::null())
            .args(["--silent", "--show-error", "--max-time", "20", &url])
            .args(["--mail-from", "a@example.test", "--mail-rcpt", rcpt])
            .arg("--upload-file")
            .arg(message_file(dir, rcpt.split('@').next().expect("local part")));
        if tls {
            // The test certificate is self-signed.
            cmd.args(["--ssl-reqd", "--insecure"]);
        }
        run(&mut cmd, "curl");
        let text = delivered(&mortal, rcpt);
        assert_received(&text, if tls { "ESMTPS" } else { "ESMTP" }, tls);
    }
}

#[test]
fn msmtp_starttls() {
    let mortal = tls_instance();
    let scratch = TempDir::new("interop-msmtp");
    let dir = &scratch.0;
    let config = dir.join("msmtprc");
    std::fs::write(
        &config,
        format!(
            "defaults\nlogfile -\n\naccount test\nhost 127.0.0.1\nport {}\nfrom a@example.test\ndomain msmtp.test\n\
             auth off\ntls on\ntls_starttls on\ntls_certcheck off\ntimeout 20\n\naccount default : test\n",
            mortal.port
        ),
    )
    .expect("write msmtprc");
    // msmtp refuses a config file others can read.
    let private = <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o600);
    std::fs::set_permissions(&config, private).expect("chmod msmtprc");
    let message = message_file(dir, "msmtp");
    let out = run(
        Command::new("msmtp")
            .arg("-C")
            .arg(&config)
            .arg("msmtp@example.test")
            .stdin(std::fs::File::open(&message).expect("message")),
        "msmtp",
    );
    let text = delivered(&mortal, "msmtp@example.test");
    assert_received(&text, "ESMTPS", true);
    assert!(text.contains("body of msmtp"), "{text}\n{out}");
}

/// A client that cannot finish the handshake does not harm the pool: the
/// next client is served.
#[test]
fn failed_handshake_then_next_client_is_served() {
    let mortal = tls_instance();
    let mut s = mortal_tests::Smtp::connect(mortal.port).expect("connect");
    assert!(s.cmd("EHLO bad.test").expect("ehlo").contains("250-STARTTLS"));
    assert!(s.cmd("STARTTLS").expect("starttls").starts_with("220 2.0.0"));
    s.send_raw(b"this is not a TLS ClientHello\r\n").expect("send garbage");
    // rustls answers with an alert record, then hangs up.
    assert!((0..64).any(|_| s.closed()), "the server hangs up on a failed handshake");
    mortal.wait_for_log("SSL_accept error from unknown[127.0.0.1]: ");
    mortal.wait_for_log("lost connection after STARTTLS from unknown[127.0.0.1]");
    let out = swaks(&mortal, "after@example.test", &["--tls"]);
    assert!(out.contains("<~  250 2.0.0 Ok: queued as "), "{out}");
}

/// `bare_newline = normalize` on the wire: every smuggling variant stays
/// inside the message it was sent in (or gets that message refused), and
/// the recipient hidden behind a fake terminator never gets anything.
#[test]
fn normalize_mode_never_smuggles_a_second_message() {
    let smtpd_extra = "bare_newline = \"normalize\"\n".to_owned();
    let mortal = Instance::start_with(Options { smtpd_extra, ..Options::default() });
    let forged = "MAIL FROM:<admin@example.test>\r\nRCPT TO:<smuggled@example.test>\r\nDATA\r\nSubject: forged\r\n\r\n";
    let variants: [(&str, bool); 7] = [
        ("\n.\n", true),
        ("\n.\r\n", true),
        ("\r\n.\n", true),
        ("\r.\r", false),
        ("\r.\n", false),
        ("\r\n.\r\r\n", false),
        ("\n..\n", true),
    ];
    let mut s = mortal_tests::Smtp::connect(mortal.port).expect("connect");
    assert!(s.cmd("EHLO smuggler.test").expect("ehlo").starts_with("250"));
    for (i, (fake_end, accepted)) in variants.iter().enumerate() {
        assert!(s.cmd("MAIL FROM:<a@example.test>").expect("mail").starts_with("250"));
        assert!(s.cmd("RCPT TO:<target@example.test>").expect("rcpt").starts_with("250"));
        assert!(s.cmd("DATA").expect("data").starts_with("354"));
        s.send_raw(format!("Subject: variant {i}\r\n\r\nbody{fake_end}{forged}.\r\n").as_bytes()).expect("send");
        let reply = s.read_reply().expect("reply to the message");
        let want = if *accepted { "250 2.0.0 Ok: queued as " } else { "550 5.5.2 Error: bare <CR> received" };
        assert!(reply.starts_with(want), "variant {i} {fake_end:?}: {reply}");
    }
    assert!(s.cmd("QUIT").expect("quit").starts_with("221"));
    let accepted = variants.iter().filter(|(_, ok)| *ok).count();
    mortal.wait_for_delivery("target@example.test", accepted);
    mortal.wait_for_empty_queue();
    assert_eq!(mortal.delivered("target@example.test").len(), accepted, "one message per DATA, no more");
    assert!(mortal.delivered("smuggled@example.test").is_empty(), "a smuggled message was delivered");
    // The forged envelope was content, never a command.
    assert!(!mortal.log_text().contains("<admin@example.test>"), "{}", mortal.log_text());
}

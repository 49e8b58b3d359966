//! Submission (issue 15): mortal with its three listeners (25, a
//! submission port with STARTTLS, a submissions port with TLS from the
//! first octet) and SMTP AUTH through a real, private Dovecot
//! (`support/delivery.rs`: passwd-file users with `{PLAIN}` passwords).
//! Clients: a raw socket, Python's smtplib (STARTTLS, SMTP_SSL), swaks,
//! `openssl s_client` and msmtp; fail2ban's stock filter reads the log.
//!
//! Dovecot is reached on its auth socket when smtpd can (not chrooted,
//! unprivileged runs) and on its loopback port otherwise (as root, smtpd
//! is chrooted into mortal's private directory). Each test's clients use
//! their own loopback source address: Dovecot and anvil both count
//! failures per client address.

use mortal_tests::delivery::Dovecot;
use mortal_tests::netpeer::{connect_from, fail2ban_regex};
use mortal_tests::{ClosedPort, Instance, Options, Smtp, TempDir, python};
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

const ALICE: (&str, &str) = ("alice", "correct horse");
const BOB: (&str, &str) = ("bob", "s3cret");

/// A mail host: mortal on 25 (the harness's port), `submission` and
/// `submissions`, a certificate for `localhost`, and Dovecot.
struct Host {
    mortal: Instance,
    submission: u16,
    submissions: u16,
    _dovecot: Dovecot,
    _certs: TempDir,
}

/// Starts the host; `auth` adds keys to `[smtpd.auth]`, `extra` whole
/// tables.
fn host(auth: &str, extra: &str) -> Host {
    let dovecot = Dovecot::start_with_passwords(&[ALICE, BOB]);
    let certs = TempDir::new("submission-certs");
    let (cert_file, key_file) = certificate(&certs, "cert", "localhost");
    // A second certificate, served to clients that ask for its name (SNI).
    let (sni_cert, sni_key) = certificate(&certs, "mail", "mail.example.test");
    let logins = certs.0.join("sender_logins");
    std::fs::write(&logins, "alice@example.test alice\nshared@example.test alice, bob\n").expect("write logins");
    // The ports are chosen here and bound by the master: a port of 0
    // would not tell a child its listener's role.
    let (submission, submissions) = (ClosedPort::new().port, ClosedPort::new().port);
    let server = if nix::unistd::geteuid().is_root() {
        format!("inet:{}", dovecot.auth_inet.expect("auth port"))
    } else {
        format!("unix:{}", dovecot.auth_socket().display())
    };
    let smtpd_extra = format!(
        "tls_cert_file = {cert_file:?}\ntls_key_file = {key_file:?}\n\
         submission_listen = [\"127.0.0.1:{submission}\"]\nsubmissions_listen = [\"127.0.0.1:{submissions}\"]\n\
         client_limit_exceptions = []\n"
    );
    let extra = format!(
        "[smtpd.auth]\nserver = \"{server}\"\nsender_login_maps = [\"texthash:{}\"]\n{auth}\n\
         [[smtpd.tls_sni]]\nnames = [\"mail.example.test\"]\ncert_file = {sni_cert:?}\nkey_file = {sni_key:?}\n{extra}",
        logins.display()
    );
    let mortal = Instance::start_with(Options { smtpd_extra, extra, ..Options::default() });
    Host { mortal, submission, submissions, _dovecot: dovecot, _certs: certs }
}

/// A fresh self-signed certificate for `name` and its key, written as
/// `<stem>.pem` and `<stem>.key` (over any earlier ones).
fn certificate(dir: &TempDir, stem: &str, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec![name.to_owned()])
        .expect("params")
        .self_signed(&key)
        .expect("self-signed certificate");
    let (cert_file, key_file) = (dir.0.join(format!("{stem}.pem")), dir.0.join(format!("{stem}.key")));
    std::fs::write(&cert_file, cert.pem()).expect("write cert");
    std::fs::write(&key_file, key.serialize_pem()).expect("write key");
    (cert_file, key_file)
}

/// The one message delivered to `rcpt`, as text.
fn delivered(mortal: &Instance, rcpt: &str) -> String {
    let got = mortal.wait_for_delivery(rcpt, 1);
    assert_eq!(got.len(), 1, "exactly one message for {rcpt}");
    String::from_utf8_lossy(&got[0]).into_owned()
}

/// Runs a client to completion, panicking with its output when it fails.
fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what} is required (cargo xtask ci installs it): {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{what} failed ({}):\n{text}", out.status);
    text
}

/// Python's smtplib, from `source`, with a TLS context for the test's
/// self-signed certificate as `ctx`.
fn smtplib(source: &str, body: &str) -> String {
    python(&format!(
        r#"
import smtplib, ssl
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
source = ("{source}", 0)
{body}
"#
    ))
}

/// Port 587: before STARTTLS neither AUTH nor MAIL; after it AUTH PLAIN
/// and LOGIN; mail only once logged in, then to any domain, with the
/// login in the log, in `Received:` (configured here) and as ESMTPSA.
#[test]
fn submission_port_wants_starttls_then_auth() {
    let host = host("authenticated_header = true", "");
    let mortal = &host.mortal;
    let mut s = Smtp::over(connect_from(Ipv4Addr::new(127, 0, 0, 21), host.submission).expect("connect"));
    assert!(s.read_reply().expect("greeting").starts_with("220 mortal.test ESMTP"));
    let ehlo = s.cmd("EHLO raw.test").expect("ehlo");
    assert!(ehlo.contains("250-STARTTLS\r\n") && !ehlo.contains("AUTH"), "{ehlo}");
    assert_eq!(
        s.cmd("AUTH PLAIN AGFsaWNlAGNvcnJlY3QgaG9yc2U=").unwrap(),
        "530 5.7.0 Must issue a STARTTLS command first\r\n"
    );
    assert_eq!(s.cmd("MAIL FROM:<alice@example.test>").unwrap(), "530 5.7.0 Must issue a STARTTLS command first\r\n");
    assert!(s.cmd("QUIT").unwrap().starts_with("221"));

    let out = smtplib(
        "127.0.0.21",
        &format!(
            r#"
with smtplib.SMTP("127.0.0.1", {port}, timeout=20, source_address=source) as s:
    s.starttls(context=ctx)
    s.ehlo("smtplib.test")
    print("auth:", s.esmtp_features["auth"].strip())
    code, text = s.mail("alice@example.test")
    print("mail:", code, text.decode())
    s.rset()
    s.login("{user}", "{password}")
    s.sendmail("alice@example.test", ["bob@example.test", "carol@elsewhere.example"],
               b"Subject: plain\r\n\r\nsent with PLAIN\r\n")
with smtplib.SMTP("127.0.0.1", {port}, timeout=20, source_address=source) as s:
    s.starttls(context=ctx)
    s.ehlo("smtplib.test")
    s.user, s.password = "{user}", "{password}"
    code, text = s.auth("LOGIN", s.auth_login)
    print("login:", code, text.decode())
    s.sendmail("alice@example.test", ["dave@example.test"], b"Subject: login\r\n\r\nsent with LOGIN\r\n")
"#,
            port = host.submission,
            user = ALICE.0,
            password = ALICE.1
        ),
    );
    assert!(out.contains("auth: PLAIN LOGIN\n"), "{out}");
    assert!(out.contains("mail: 530 5.7.0 Authentication required\n"), "{out}");
    assert!(out.contains("login: 235 2.7.0 Authentication successful\n"), "{out}");
    for rcpt in ["bob@example.test", "carol@elsewhere.example"] {
        let text = delivered(mortal, rcpt);
        assert!(text.contains(" with ESMTPSA id "), "{text}");
        assert!(text.contains("\t(Authenticated sender: alice)\n"), "{text}");
        assert!(text.contains("sent with PLAIN"), "{text}");
    }
    assert!(delivered(mortal, "dave@example.test").contains("sent with LOGIN"));
    let log = mortal.wait_for_log("client=unknown[127.0.0.21], sasl_method=LOGIN, sasl_username=alice");
    assert!(log.contains("client=unknown[127.0.0.21], sasl_method=PLAIN, sasl_username=alice"), "{log}");
    // The password is nowhere in the log, in clear or in base64.
    assert!(!log.contains("correct horse") && !log.contains("AGFsaWNlAGNvcnJlY3QgaG9yc2U="), "{log}");
}

/// A wrong password: 535 with Postfix's warning, which fail2ban's stock
/// postfix filter (auth mode) bans on; past `failure_limit` the client
/// gets 421, and so does its next AUTH, without Dovecot being asked.
#[test]
fn wrong_passwords_are_refused_counted_and_limited() {
    let host = host("failure_limit = 2", "");
    let mortal = &host.mortal;
    let out = smtplib(
        "127.0.0.22",
        &format!(
            r#"
with smtplib.SMTP("127.0.0.1", {port}, timeout=30, source_address=source) as s:
    s.starttls(context=ctx)
    s.ehlo("guesser.test")
    # One mechanism a try: login() would go on to LOGIN after PLAIN.
    for password in ["wrong", "also wrong"]:
        s.user, s.password = "alice", password
        try:
            s.auth("PLAIN", s.auth_plain)
        except smtplib.SMTPAuthenticationError as e:
            print("refused:", e.smtp_code, e.smtp_error.decode())
        except smtplib.SMTPServerDisconnected:
            print("disconnected")
            break
with smtplib.SMTP("127.0.0.1", {port}, timeout=30, source_address=source) as s:
    s.starttls(context=ctx)
    s.ehlo("guesser.test")
    code, text = s.docmd("AUTH", "PLAIN AGFsaWNlAGNvcnJlY3QgaG9yc2U=")
    print("again:", code, text.decode())
"#,
            port = host.submission
        ),
    );
    assert!(out.contains("refused: 535 5.7.8 Error: authentication failed: "), "{out}");
    assert!(out.contains("refused: 421 4.7.0 mortal.test Error: too many failed AUTH attempts\n"), "{out}");
    // Even the right password: the client is past the limit.
    assert!(out.contains("again: 421 4.7.0 mortal.test Error: too many failed AUTH attempts\n"), "{out}");
    let log = mortal.wait_for_log_count(
        "warning: AUTH failure limit exceeded: 2 from unknown[127.0.0.22] for service submission",
        2,
    );
    assert_eq!(log.matches("warning: unknown[127.0.0.22]: SASL PLAIN authentication failed: ").count(), 2, "{log}");
    let (matched, report) = fail2ban_regex(&mortal.log, "postfix[mode=auth]");
    assert_eq!(matched.len(), 2, "{report}");
    assert!(matched.iter().all(|l| l.contains("SASL PLAIN authentication failed")), "{report}");
}

/// Port 465: TLS first (swaks, openssl s_client, smtplib's SMTP_SSL and
/// msmtp), AUTH offered at once, STARTTLS never.
#[test]
fn submissions_port_speaks_tls_first() {
    let host = host("", "");
    let mortal = &host.mortal;
    let server = format!("127.0.0.1:{}", host.submissions);
    run(
        Command::new("swaks")
            .args(["--server", &server, "--tls-on-connect", "--helo", "swaks.test"])
            .args(["--auth", "PLAIN", "--auth-user", ALICE.0, "--auth-password", ALICE.1])
            .args(["--from", "alice@example.test", "--to", "swaks@example.test", "--body", "via swaks"]),
        "swaks",
    );
    assert!(delivered(mortal, "swaks@example.test").contains(" with ESMTPSA id "));

    let (ehlo, tls) = openssl_ehlo(&server);
    assert!(ehlo.contains("250-AUTH PLAIN LOGIN\n"), "{ehlo}");
    assert!(!ehlo.contains("STARTTLS"), "{ehlo}");
    assert!(tls.contains("Protocol version: TLSv1.3"), "{tls}");

    let out = smtplib(
        "127.0.0.23",
        &format!(
            r#"
with smtplib.SMTP_SSL("127.0.0.1", {port}, timeout=20, context=ctx, source_address=source) as s:
    s.login("{user}", "{password}")
    s.sendmail("bob@example.test", ["ssl@example.test"], b"Subject: ssl\r\n\r\nvia SMTP_SSL\r\n")
    print(s.sock.version())
"#,
            port = host.submissions,
            user = BOB.0,
            password = BOB.1
        ),
    );
    assert!(out.starts_with("TLSv1.3"), "{out}");
    assert!(delivered(mortal, "ssl@example.test").contains("via SMTP_SSL"));

    let scratch = TempDir::new("submission-msmtp");
    let config = scratch.0.join("msmtprc");
    std::fs::write(
        &config,
        format!(
            "defaults\nlogfile -\n\naccount test\nhost 127.0.0.1\nport {}\nfrom alice@example.test\n\
             domain msmtp.test\nauth plain\nuser {}\npassword {}\ntls on\ntls_starttls off\ntls_certcheck off\n\
             timeout 20\n\naccount default : test\n",
            host.submissions, ALICE.0, ALICE.1
        ),
    )
    .expect("write msmtprc");
    let private = <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o600);
    std::fs::set_permissions(&config, private).expect("chmod msmtprc");
    let message = scratch.0.join("message");
    std::fs::write(&message, "Subject: msmtp\r\n\r\nvia msmtp\r\n").expect("write message");
    let out = Command::new("msmtp")
        .arg("-C")
        .arg(&config)
        .arg("msmtp@example.test")
        .stdin(std::fs::File::open(&message).expect("message"))
        .output()
        .expect("msmtp is required (cargo xtask ci installs it)");
    assert!(out.status.success(), "msmtp: {out:?}");
    assert!(delivered(mortal, "msmtp@example.test").contains("via msmtp"));
}

/// `openssl s_client` on a TLS-first port: the EHLO reply, once the
/// greeting came (pipelining without the extension ends the session), and
/// what s_client said about the handshake.
fn openssl_ehlo(server: &str) -> (String, String) {
    use std::io::{BufRead, Write};
    let mut guard = mortal_tests::delivery::Guard::spawn(
        "openssl s_client",
        Command::new("openssl")
            .args(["s_client", "-connect", server, "-brief", "-crlf", "-ign_eof", "-servername", "localhost"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    let mut stdin = guard.child().stdin.take().expect("stdin");
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = guard.child().stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let wait_for = |prefix: &str, what: &str| {
        let mut seen = String::new();
        loop {
            let line = rx.recv_timeout(mortal_tests::WAIT).unwrap_or_else(|_| panic!("no {what}: {seen}"));
            seen.push_str(&line);
            seen.push('\n');
            if line.starts_with(prefix) {
                return seen;
            }
        }
    };
    wait_for("220 ", "greeting");
    writeln!(stdin, "EHLO openssl.test").expect("write EHLO");
    let ehlo = wait_for("250 ", "EHLO reply");
    writeln!(stdin, "QUIT").expect("write QUIT");
    wait_for("221 ", "QUIT reply");
    drop(stdin);
    let exited = mortal_tests::wait_for("openssl s_client to exit", || guard.child().try_wait().ok().flatten());
    assert!(exited.is_some_and(|status| status.success()), "s_client: {exited:?}");
    let mut tls = String::new();
    std::io::Read::read_to_string(&mut guard.child().stderr.take().expect("stderr"), &mut tls).expect("stderr");
    (ehlo, tls)
}

/// `reject_sender_login_mismatch` in the submission lists: a login uses
/// only the senders `sender_login_maps` gives it (refused at RCPT, as
/// Postfix does under `smtpd_delay_reject`).
#[test]
fn a_login_may_use_only_its_own_senders() {
    let host = host("", "[smtpd.submission.restrictions]\nsender = [\"reject_sender_login_mismatch\"]\n");
    let out = smtplib(
        "127.0.0.24",
        &format!(
            r#"
with smtplib.SMTP_SSL("127.0.0.1", {port}, timeout=20, context=ctx, source_address=source) as s:
    s.login("{user}", "{password}")
    for sender in ["alice@example.test", "shared@example.test", "bob@example.test"]:
        s.mail(sender)
        code, text = s.rcpt("x@example.test")
        print(sender, code, text.decode())
        s.rset()
"#,
            port = host.submissions,
            user = ALICE.0,
            password = ALICE.1
        ),
    );
    assert!(out.contains("alice@example.test 250 2.1.5 Ok\n"), "{out}");
    assert!(out.contains("shared@example.test 250 2.1.5 Ok\n"), "{out}");
    assert!(
        out.contains(
            "bob@example.test 553 5.7.1 <bob@example.test>: Sender address rejected: not owned by user alice\n"
        ),
        "{out}"
    );
}

/// Port 25 offers no AUTH (`[smtpd.auth] mx` is off), even under TLS,
/// and relaying stays closed there.
#[test]
fn the_mx_port_offers_no_auth() {
    let host = host("", "");
    let out = smtplib(
        "127.0.0.25",
        &format!(
            r#"
with smtplib.SMTP("127.0.0.1", {port}, timeout=20, source_address=source) as s:
    s.starttls(context=ctx)
    s.ehlo("mx.test")
    print("auth offered:", s.has_extn("auth"))
    code, text = s.docmd("AUTH", "PLAIN AGFsaWNlAGNvcnJlY3QgaG9yc2U=")
    print("auth:", code, text.decode())
    s.mail("alice@example.test")
    code, text = s.rcpt("carol@elsewhere.example")
    print("relay:", code, text.decode())
"#,
            port = host.mortal.port
        ),
    );
    assert!(out.contains("auth offered: False\n"), "{out}");
    assert!(out.contains("auth: 502 5.5.1 Error: command not implemented\n"), "{out}");
    assert!(out.contains("relay: 554 5.7.1 <carol@elsewhere.example>: Relay access denied\n"), "{out}");
}

/// SNI: the certificate of `[[smtpd.tls_sni]]` for its name, the default
/// one for any other name or none (Python's ssl and `openssl s_client
/// -servername`); after the files are renewed and
/// `mortal reload` (SIGHUP), new connections get the new certificate
/// while a session opened before goes on.
#[test]
fn sni_picks_the_certificate_and_reload_renews_it() {
    let host = host("", "");
    let mortal = &host.mortal;
    let certs = &host._certs.0;
    // Which file's certificate a client asking for each name is served.
    let served = || {
        python(&format!(
            r#"
import socket, ssl
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
files = {{f: ssl.PEM_cert_to_DER_cert(open("{dir}/" + f).read()) for f in ["cert.pem", "mail.pem"]}}
for name in ["mail.example.test", "MAIL.example.test", "localhost", "other.example.test", None]:
    with socket.create_connection(("127.0.0.1", {port}), timeout=20) as raw:
        with ctx.wrap_socket(raw, server_hostname=name) as s:
            der = s.getpeercert(binary_form=True)
    print(name, [f for f, d in files.items() if d == der])
"#,
            dir = certs.display(),
            port = host.submissions
        ))
    };
    let expected = "mail.example.test ['mail.pem']\nMAIL.example.test ['mail.pem']\nlocalhost ['cert.pem']\n\
                    other.example.test ['cert.pem']\nNone ['cert.pem']\n";
    assert_eq!(served(), expected);
    // openssl s_client -servername, as an admin checks it by hand.
    let leaf = |name: &str| {
        let out = Command::new("openssl")
            .args(["s_client", "-connect", &format!("127.0.0.1:{}", host.submissions), "-servername", name])
            .stdin(Stdio::null())
            .output()
            .expect("openssl is required (cargo xtask ci installs it)");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let begin = text.find("-----BEGIN CERTIFICATE-----").unwrap_or_else(|| panic!("no certificate:\n{text}"));
        let end = text[begin..].find("-----END CERTIFICATE-----").expect("end of certificate") + begin;
        text[begin..end].split_whitespace().collect::<String>()
    };
    let file = |stem: &str| {
        let pem = std::fs::read_to_string(certs.join(format!("{stem}.pem"))).expect("read cert");
        let end = pem.find("-----END CERTIFICATE-----").expect("end of certificate");
        pem[..end].split_whitespace().collect::<String>()
    };
    assert_eq!(leaf("mail.example.test"), file("mail"));
    assert_eq!(leaf("localhost"), file("cert"));
    // A session in progress across the reload.
    let mut before = Smtp::connect(mortal.port).expect("connect");
    assert!(before.cmd("EHLO before.test").unwrap().starts_with("250"));
    let old_cert = std::fs::read(certs.join("mail.pem")).expect("read cert");
    certificate(&host._certs, "mail", "mail.example.test");
    assert_ne!(std::fs::read(certs.join("mail.pem")).expect("read cert"), old_cert, "a new certificate");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(mortal.master_pid() as i32), nix::sys::signal::Signal::SIGHUP)
        .expect("SIGHUP master");
    let renewed = mortal_tests::wait_for("the renewed certificate served", || (served() == expected).then_some(()));
    assert!(renewed.is_some(), "{}", mortal.log_text());
    assert_eq!(before.cmd("NOOP").unwrap(), "250 2.0.0 Ok\r\n");
    assert!(before.cmd("QUIT").unwrap().starts_with("221"));
}

/// Per-login rates (`[smtpd.auth] user_message_rate_limit`,
/// `user_recipient_rate_limit`): counted for the login wherever it
/// connects from, refused with 450 4.7.1 past the limit, and another
/// login from the same address is not affected.
#[test]
fn a_login_is_limited_in_messages_and_recipients() {
    let host = host("user_message_rate_limit = 2\nuser_recipient_rate_limit = 3", "");
    let out = smtplib(
        "127.0.0.26",
        &format!(
            r#"
def show(what, reply):
    print(what, reply[0], reply[1].decode())
with smtplib.SMTP_SSL("127.0.0.1", {port}, timeout=20, context=ctx, source_address=source) as s:
    s.login("{alice}", "{alice_password}")
    show("mail 1", s.mail("alice@example.test"))
    for rcpt in ["a@example.test", "b@example.test"]:
        show("rcpt " + rcpt, s.rcpt(rcpt))
    show("data 1", s.data(b"Subject: one\r\n\r\nfirst\r\n"))
    show("mail 2", s.mail("alice@example.test"))
    for rcpt in ["c@example.test", "d@example.test"]:
        show("rcpt " + rcpt, s.rcpt(rcpt))
    s.rset()
    show("mail 3", s.mail("alice@example.test"))
with smtplib.SMTP_SSL("127.0.0.1", {port}, timeout=20, context=ctx, source_address=source) as s:
    s.login("{bob}", "{bob_password}")
    show("bob mail", s.mail("bob@example.test"))
    show("bob rcpt", s.rcpt("e@example.test"))
"#,
            port = host.submissions,
            alice = ALICE.0,
            alice_password = ALICE.1,
            bob = BOB.0,
            bob_password = BOB.1
        ),
    );
    for line in [
        "mail 1 250 2.1.0 Ok",
        "rcpt a@example.test 250 2.1.5 Ok",
        "rcpt b@example.test 250 2.1.5 Ok",
        "mail 2 250 2.1.0 Ok",
        "rcpt c@example.test 250 2.1.5 Ok",
        "rcpt d@example.test 450 4.7.1 Error: too many recipients from user alice",
        "mail 3 450 4.7.1 Error: too much mail from user alice",
        "bob mail 250 2.1.0 Ok",
        "bob rcpt 250 2.1.5 Ok",
    ] {
        assert!(out.lines().any(|l| l == line), "{line:?} in\n{out}");
    }
    let log = host.mortal.wait_for_log(
        "warning: User message rate limit exceeded: 3 from unknown[127.0.0.26] sasl_username=alice for service submissions",
    );
    assert!(
        log.contains(
            "warning: User recipient rate limit exceeded: 4 from unknown[127.0.0.26] sasl_username=alice for service submissions"
        ),
        "{log}"
    );
}

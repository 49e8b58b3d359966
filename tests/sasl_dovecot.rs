//! SMTP AUTH's Dovecot client against the real thing: smtpd's
//! `mortal_smtpd::sasl::SaslServer` on the auth socket of a private
//! Dovecot (`support/delivery.rs`, passwd-file users with `{PLAIN}`
//! passwords), as Postfix's `smtpd_sasl_type = dovecot` talks to it. Each
//! test uses its own client address: Dovecot slows down an address
//! after a failure (its auth penalty).

use mortal_proto::config::NextHop;
use mortal_proto::dovecot_auth::{MechanismName, SaslReply, SecurityFlag};
use mortal_smtpd::sasl::{SaslClientInfo, SaslError, SaslServer};
use mortal_tests::delivery::Dovecot;
use std::time::Duration;

/// The default `[smtpd.auth] timeout`: Dovecot delays each failure by
/// `auth_failure_delay` (2 s).
const TIMEOUT: Duration = Duration::from_secs(30);

fn dovecot() -> Dovecot {
    Dovecot::start_with_passwords(&[("alice", "correct horse"), ("bob@example.test", "s3cret!")])
}

fn sasl(dovecot: &Dovecot) -> SaslServer {
    SaslServer::new(&NextHop::Unix(dovecot.auth_socket()), TIMEOUT)
}

/// A client under TLS (`secured`) at `remote`.
fn client(remote: &str) -> SaslClientInfo {
    SaslClientInfo { remote: remote.parse().unwrap(), local: "127.0.0.1:587".parse().unwrap(), secured: true }
}

fn mechanism(name: &str) -> MechanismName {
    name.parse().unwrap()
}

/// RFC 4648 base64, as an SMTP client encodes its responses.
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            out.push(if i <= chunk.len() { char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]) } else { '=' });
        }
    }
    out
}

/// PLAIN's initial response: no authorization identity, then the user
/// and the password (RFC 4616).
fn plain(user: &str, password: &str) -> String {
    base64(format!("\0{user}\0{password}").as_bytes())
}

fn success(user: &str) -> SaslReply {
    SaslReply::Success { user: Some(user.into()) }
}

#[test]
fn the_test_encoder_is_base64() {
    assert_eq!(base64(b""), "");
    assert_eq!(base64(b"f"), "Zg==");
    assert_eq!(base64(b"fo"), "Zm8=");
    assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    assert_eq!(plain("alice", "secret"), "AGFsaWNlAHNlY3JldA==");
}

#[tokio::test]
async fn dovecot_offers_plain_and_login_as_plaintext_mechanisms() {
    let dovecot = dovecot();
    let offered = sasl(&dovecot).mechanisms().await.unwrap_or_else(|e| panic!("{e}\n{}", dovecot.log_text()));
    let names: Vec<&str> = offered.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["PLAIN", "LOGIN"]);
    assert!(offered.iter().all(|m| m.flags.contains(SecurityFlag::Plaintext)));
}

#[tokio::test]
async fn plain_succeeds_with_the_right_password_and_fails_with_a_wrong_one() {
    let dovecot = dovecot();
    let mut sasl = sasl(&dovecot);
    let reply =
        sasl.start(&mechanism("PLAIN"), Some(&plain("alice", "correct horse")), &client("192.0.2.1:40000")).await;
    assert_eq!(reply.unwrap_or_else(|e| panic!("{e}\n{}", dovecot.log_text())), success("alice"));
    // The kept connection serves the next session.
    let bob = plain("bob@example.test", "s3cret!");
    let reply = sasl.start(&mechanism("plain"), Some(&bob), &client("192.0.2.1:40001")).await;
    assert_eq!(reply.unwrap(), success("bob@example.test"));
    // A wrong password, an unknown user: failures, not trouble.
    let reply = sasl.start(&mechanism("PLAIN"), Some(&plain("alice", "wrong")), &client("192.0.2.2:40000")).await;
    assert_eq!(reply.unwrap(), SaslReply::Failure { reason: None, temporary: false, user: Some("alice".into()) });
    let reply = sasl.start(&mechanism("PLAIN"), Some(&plain("mallory", "x")), &client("192.0.2.3:40000")).await;
    assert!(matches!(reply, Ok(SaslReply::Failure { temporary: false, .. })), "{reply:?}");
    // Dovecot judges what the base64 holds: here no PLAIN message (a
    // user and no password).
    let reply = sasl.start(&mechanism("PLAIN"), Some("AGFsaWNl"), &client("192.0.2.4:40000")).await;
    assert!(matches!(reply, Ok(SaslReply::Failure { .. })), "{reply:?}");
}

#[tokio::test]
async fn login_goes_through_two_challenges() {
    let dovecot = dovecot();
    let mut sasl = sasl(&dovecot);
    let remote = client("192.0.2.5:40000");
    let reply = sasl.start(&mechanism("LOGIN"), None, &remote).await.unwrap();
    assert_eq!(reply, SaslReply::Continue { challenge: base64(b"Username:") });
    let reply = sasl.proceed(&base64(b"alice")).await.unwrap();
    assert_eq!(reply, SaslReply::Continue { challenge: base64(b"Password:") });
    assert_eq!(sasl.proceed(&base64(b"correct horse")).await.unwrap(), success("alice"));
    // The user in the initial response, the password asked for once.
    let reply = sasl.start(&mechanism("LOGIN"), Some(&base64(b"alice")), &remote).await.unwrap();
    assert_eq!(reply, SaslReply::Continue { challenge: base64(b"Password:") });
    let reply = sasl.proceed(&base64(b"not it")).await.unwrap();
    assert!(matches!(reply, SaslReply::Failure { temporary: false, .. }), "{reply:?}");
}

#[tokio::test]
async fn an_exchange_the_client_cancels_leaves_the_client_usable() {
    let dovecot = dovecot();
    let mut sasl = sasl(&dovecot);
    let remote = client("192.0.2.6:40000");
    // PLAIN without an initial response: Dovecot asks with an empty challenge.
    let reply = sasl.start(&mechanism("PLAIN"), None, &remote).await.unwrap();
    assert_eq!(reply, SaslReply::Continue { challenge: String::new() });
    sasl.cancel();
    assert!(matches!(sasl.proceed(&plain("alice", "correct horse")).await, Err(SaslError::NoExchange)));
    let reply = sasl.start(&mechanism("PLAIN"), None, &remote).await.unwrap();
    assert_eq!(reply, SaslReply::Continue { challenge: String::new() });
    assert_eq!(sasl.proceed(&plain("alice", "correct horse")).await.unwrap(), success("alice"));
    // A mechanism this Dovecot does not offer is refused before it is
    // asked (Dovecot would drop the connection).
    let e = sasl.start(&mechanism("CRAM-MD5"), None, &remote).await.unwrap_err();
    assert!(matches!(e, SaslError::NotOffered(_)), "{e}");
    assert_eq!(
        sasl.start(&mechanism("PLAIN"), Some(&plain("alice", "correct horse")), &remote).await.unwrap(),
        success("alice")
    );
}

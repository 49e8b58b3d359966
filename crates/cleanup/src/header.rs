//! Header section: where it ends, what it lacks, what must go.
//!
//! The section is found line by line (RFC 5322 section 2.2: field lines and
//! their folded continuations, ended by an empty line). mail-parser then
//! identifies the fields; their byte ranges let us strip `Bcc:` without
//! re-encoding anything else, so every other byte reaches the mailbox as the
//! client sent it.

use mail_parser::{HeaderName, MessageParser};
use mortal_proto::date::{self, TimeZone};
use mortal_proto::envelope::{ClientInfo, RecipientInfo};
use mortal_proto::queue_id::QueueId;
use std::net::IpAddr;
use std::time::SystemTime;

pub use mortal_proto::header::{HeaderEnd, find_header_end};

/// What the fixed-up header needs to know about the message.
#[derive(Debug)]
pub struct Envelope<'a> {
    pub queue_id: QueueId,
    pub hostname: &'a str,
    pub client: &'a ClientInfo,
    pub recipients: &'a [RecipientInfo],
    pub arrival: SystemTime,
    /// The zone `Date:` and `Received:` times are written in: the host's,
    /// as Postfix does.
    pub zone: &'a TimeZone,
    /// Name the client's AUTH login in `Received:` (`[smtpd.auth]
    /// authenticated_header`).
    pub authenticated_header: bool,
}

/// Why the header section is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderReject {
    /// More `Received:` fields than `hopcount_limit`: a mail loop.
    TooManyHops(usize),
}

/// The header section to spool, and the message id for the log.
#[derive(Debug)]
pub struct FixedHeader {
    pub bytes: Vec<u8>,
    pub message_id: String,
}

/// Returns the header section to spool: our `Received:` first, the
/// client's fields minus `Bcc:`, then `Message-ID:` and `Date:` if absent.
pub fn fix_up(header: &[u8], env: &Envelope<'_>, hopcount_limit: usize) -> Result<FixedHeader, HeaderReject> {
    let parsed = MessageParser::new().parse_headers(header);
    let fields = parsed.as_ref().map(|m| m.headers()).unwrap_or_default();
    let hops = fields.iter().filter(|h| h.name == HeaderName::Received).count();
    if hops > hopcount_limit {
        return Err(HeaderReject::TooManyHops(hops));
    }
    let has = |name: HeaderName<'_>| fields.iter().any(|h| h.name == name);
    let has_date = has(HeaderName::Date);
    let existing_id = parsed.as_ref().and_then(|m| m.message_id()).map(str::to_owned);

    let mut out = Vec::with_capacity(header.len() + 512);
    out.extend_from_slice(received(env).as_bytes());
    let mut copied = 0;
    for bcc in fields.iter().filter(|h| h.name == HeaderName::Bcc) {
        let (start, end) = (bcc.offset_field as usize, field_end(header, bcc.offset_end as usize));
        if start >= copied && end <= header.len() {
            out.extend_from_slice(&header[copied..start]);
            copied = end;
        }
    }
    out.extend_from_slice(&header[copied..]);
    let message_id = match existing_id {
        Some(id) => id,
        None if has(HeaderName::MessageId) => String::from("(unparsable)"),
        None => {
            let id = format!("{}@{}", env.queue_id, env.hostname);
            out.extend_from_slice(format!("Message-ID: <{id}>\r\n").as_bytes());
            id
        }
    };
    if !has_date {
        out.extend_from_slice(format!("Date: {}\r\n", date::rfc5322(env.arrival, env.zone)).as_bytes());
    }
    Ok(FixedHeader { bytes: out, message_id })
}

/// mail-parser's field end may stop before the line ending; a stripped
/// field must take its CRLF with it.
fn field_end(header: &[u8], end: usize) -> usize {
    match header.get(end..) {
        Some([b'\r', b'\n', ..]) => end + 2,
        Some([b'\n', ..]) => end + 1,
        _ => end,
    }
}

/// The trace field (RFC 5321 4.4), in Postfix's layout.
fn received(env: &Envelope<'_>) -> String {
    let c = env.client;
    let helo = if c.helo.is_empty() { &c.name } else { &c.helo };
    let addr = match c.addr {
        IpAddr::V6(v6) => format!("IPv6:{v6}"),
        IpAddr::V4(v4) => v4.to_string(),
    };
    let mut field = format!("Received: from {helo} ({} [{addr}])\r\n", c.name);
    if !c.tls.is_empty() {
        field.push_str(&format!("\t(using {})\r\n", c.tls));
    }
    if let Some(login) = c.auth.as_ref().filter(|_| env.authenticated_header) {
        field.push_str(&format!("\t(Authenticated sender: {})\r\n", login.username));
    }
    field.push_str(&format!("\tby {} (mortal) with {} id {}", env.hostname, c.protocol, env.queue_id));
    // Like Postfix, name the recipient only when there is exactly one, so a
    // Bcc recipient is never disclosed to the others.
    if let [only] = env.recipients {
        field.push_str(&format!("\r\n\tfor <{}>", only.address));
    }
    field.push_str(&format!("; {}\r\n", date::rfc5322(env.arrival, env.zone)));
    field
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    static UTC: TimeZone = TimeZone::UTC;

    fn env<'a>(client: &'a ClientInfo, rcpts: &'a [RecipientInfo]) -> Envelope<'a> {
        Envelope {
            queue_id: QueueId::parse("0000000010000100000A").unwrap(),
            hostname: "mx.example.test",
            client,
            recipients: rcpts,
            arrival: UNIX_EPOCH + Duration::from_secs(1_795_843_807),
            zone: &UTC,
            authenticated_header: false,
        }
    }

    fn client(addr: &str) -> ClientInfo {
        ClientInfo {
            addr: addr.parse().unwrap(),
            name: "unknown".into(),
            helo: "c.test".into(),
            protocol: "ESMTP".into(),
            tls: String::new(),
            auth: None,
        }
    }

    fn rcpt(address: &str) -> RecipientInfo {
        RecipientInfo { address: address.into(), notify: Default::default(), orcpt: String::new() }
    }

    #[test]
    fn adds_missing_and_strips_bcc() {
        let c = client("192.0.2.1");
        let rcpts = vec![rcpt("b@example.test")];
        let header = b"From: a@example.test\r\nBcc: secret@example.test,\r\n other@example.test\r\nSubject: hi\r\n";
        let fixed = fix_up(header, &env(&c, &rcpts), 50).unwrap();
        assert_eq!(fixed.message_id, "0000000010000100000A@mx.example.test");
        let out = String::from_utf8(fixed.bytes).unwrap();
        assert_eq!(
            out,
            "Received: from c.test (unknown [192.0.2.1])\r\n\tby mx.example.test (mortal) with ESMTP id \
             0000000010000100000A\r\n\tfor <b@example.test>; Sat, 28 Nov 2026 05:30:07 +0000\r\n\
             From: a@example.test\r\nSubject: hi\r\n\
             Message-ID: <0000000010000100000A@mx.example.test>\r\nDate: Sat, 28 Nov 2026 05:30:07 +0000\r\n"
        );
    }

    /// The login shows only when configured (Postfix
    /// `smtpd_sasl_authenticated_header`), after the TLS line.
    #[test]
    fn authenticated_sender_only_when_asked() {
        let login = mortal_proto::envelope::SaslLogin { method: "PLAIN".into(), username: "alice".into() };
        let c = ClientInfo {
            protocol: "ESMTPSA".into(),
            tls: "TLSv1.3 with cipher TLS13_AES_256_GCM_SHA384 (256/256 bits)".into(),
            auth: Some(login),
            ..client("192.0.2.1")
        };
        let rcpts = vec![rcpt("b@example.test")];
        let quiet = String::from_utf8(fix_up(b"Subject: hi\r\n", &env(&c, &rcpts), 50).unwrap().bytes).unwrap();
        assert!(!quiet.contains("alice"), "{quiet}");
        let env = Envelope { authenticated_header: true, ..env(&c, &rcpts) };
        let out = String::from_utf8(fix_up(b"Subject: hi\r\n", &env, 50).unwrap().bytes).unwrap();
        assert!(
            out.starts_with(
                "Received: from c.test (unknown [192.0.2.1])\r\n\t(using TLSv1.3 with cipher \
                 TLS13_AES_256_GCM_SHA384 (256/256 bits))\r\n\t(Authenticated sender: alice)\r\n\tby \
                 mx.example.test (mortal) with ESMTPSA id 0000000010000100000A\r\n"
            ),
            "{out}"
        );
    }

    #[test]
    fn added_times_are_in_the_given_zone_with_its_offset() {
        let c = client("192.0.2.1");
        let rcpts = vec![rcpt("b@example.test")];
        let berlin = TimeZone::posix("CET-1CEST,M3.5.0,M10.5.0/3").unwrap();
        let env = Envelope { zone: &berlin, ..env(&c, &rcpts) };
        let out = String::from_utf8(fix_up(b"Subject: hi\r\n", &env, 50).unwrap().bytes).unwrap();
        assert!(out.contains("\tfor <b@example.test>; Sat, 28 Nov 2026 06:30:07 +0100\r\n"), "{out}");
        assert!(out.ends_with("\r\nDate: Sat, 28 Nov 2026 06:30:07 +0100\r\n"), "{out}");
    }

    #[test]
    fn keeps_present_fields_and_hides_recipients() {
        let c = client("::1");
        let rcpts = vec![rcpt("b@example.test"), rcpt("c@example.test")];
        let header = b"Message-ID: <x@y>\r\nDate: Thu, 1 Jan 1970 00:00:00 +0000\r\n";
        let fixed = fix_up(header, &env(&c, &rcpts), 50).unwrap();
        assert_eq!(fixed.message_id, "x@y");
        let out = String::from_utf8(fixed.bytes).unwrap();
        assert!(out.starts_with("Received: from c.test (unknown [IPv6:::1])\r\n"), "{out}");
        assert!(!out.contains("for <"), "{out}");
        assert!(out.ends_with("\r\nMessage-ID: <x@y>\r\nDate: Thu, 1 Jan 1970 00:00:00 +0000\r\n"), "{out}");
    }

    #[test]
    fn hop_limit() {
        let c = client("192.0.2.1");
        let header = "Received: from a by b; Thu, 1 Jan 1970 00:00:00 +0000\r\n".repeat(3);
        assert_eq!(fix_up(header.as_bytes(), &env(&c, &[]), 2).unwrap_err(), HeaderReject::TooManyHops(3));
        assert!(fix_up(header.as_bytes(), &env(&c, &[]), 3).is_ok());
    }
}

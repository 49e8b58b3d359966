//! Delivery status notifications (RFC 3464), queued like any message.
//!
//! Three kinds, each one message per original message and attempt:
//! non-delivery (recipients that failed permanently or expired), delay
//! (once, after `delay_warning_time`) and success (NOTIFY=SUCCESS
//! recipients that were delivered, or relayed to a server without DSN).
//! Each is a `multipart/report; report-type=delivery-status` with a human
//! part, a `message/delivery-status` part (Reporting-MTA, Original-
//! Envelope-Id, Arrival-Date; per recipient Final-Recipient,
//! Original-Recipient from ORCPT, Action, Status, Remote-MTA,
//! Diagnostic-Code) and the returned message: all of it for a failure
//! unless RET=HDRS (or it is over [`RETURN_SIZE_LIMIT`]), only the header
//! section for delays and successes (RFC 3461 4.3).
//!
//! Who gets one (RFC 3461 4.1): the envelope sender, never `<>`, and only
//! for recipients whose NOTIFY asks for that kind (no NOTIFY means
//! FAILURE,DELAY). A DSN's own sender is `<>`, so a DSN that cannot be
//! delivered is never answered by another: bounces of bounces never happen.
//!
//! The DSN goes into `incoming/` through [`crate::spool`] and is
//! routed like any mail to its recipient.

use crate::spool;
use mortal_proto::config::Config;
use mortal_proto::date;
use mortal_proto::envelope::{BodyType, ClientInfo, DsnRet, Notify, SenderInfo};
use mortal_proto::queue_file::{QueueFile, QueuedRecipient, RecipientState};
use mortal_proto::queue_id::QueueId;
use mortal_proto::smtp_status::{DsnAction, EnhancedStatus};
use std::io;
use std::net::Ipv4Addr;
use std::time::SystemTime;

/// Largest original message returned in full; bigger ones come back as
/// their header section only (Postfix bounce_size_limit).
pub const RETURN_SIZE_LIMIT: usize = 50_000;

/// Which notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Failure,
    Delay,
    Success,
}

impl Kind {
    /// Whether a recipient's NOTIFY asks for this kind.
    pub fn wanted(self, n: Notify) -> bool {
        !n.never
            && match self {
                Kind::Failure => n.wants_failure(),
                Kind::Delay => n.wants_delay(),
                Kind::Success => n.success,
            }
    }

    /// The `<id>: sender ... notification: <newid>` log word.
    pub fn log_name(self) -> &'static str {
        match self {
            Kind::Failure => "non-delivery",
            Kind::Delay => "delay",
            Kind::Success => "delivery status",
        }
    }

    fn subject(self) -> &'static str {
        match self {
            Kind::Failure => "Undelivered Mail Returned to Sender",
            Kind::Delay => "Delayed Mail (still being retried)",
            Kind::Success => "Successful Mail Delivery Report",
        }
    }
}

/// One recipient line of a report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Index into the original's recipients.
    pub rcpt: usize,
    pub action: DsnAction,
    /// RFC 3463 code.
    pub status: EnhancedStatus,
    /// Why, for the human part.
    pub text: String,
    pub diagnostic: Option<String>,
    pub remote_mta: Option<String>,
}

/// Queues a notification of `kind` about `entries` of `qf` to its sender.
/// Returns the new queue id, or `None` when nobody is to be told (sender
/// `<>`, or no entry whose NOTIFY asks for it).
pub fn send(config: &Config, qf: &QueueFile, kind: Kind, entries: &[Entry]) -> io::Result<Option<QueueId>> {
    let entries: Vec<&Entry> = entries.iter().filter(|e| kind.wanted(qf.recipients[e.rcpt].notify)).collect();
    if qf.sender.address.is_empty() || entries.is_empty() {
        return Ok(None);
    }
    let (id, now) = spool::new_id();
    let dsn = compose(config, qf, kind, &entries, id, now);
    spool::write_incoming(config, &dsn)?;
    tracing::info!("{}: sender {} notification: {id}", qf.id, kind.log_name());
    Ok(Some(id))
}

/// Builds the DSN queue file.
fn compose(config: &Config, qf: &QueueFile, kind: Kind, entries: &[&Entry], id: QueueId, now: SystemTime) -> QueueFile {
    let host = &config.server.hostname;
    // The host's zone, loaded at log start-up before the sandbox.
    let zone = mortal_libmaster::log::local_zone();
    let returned = returned_part(qf, kind);
    let eight_bit = !returned.iter().all(u8::is_ascii) || !qf.sender.address.is_ascii();
    let boundary = format!("{id}.{}/{host}", now.duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs());
    let mut m = String::new();
    let mut h = |line: String| {
        m.push_str(&line);
        m.push_str("\r\n");
    };
    h(format!("Date: {}", date::rfc5322(now, zone)));
    h(format!("From: MAILER-DAEMON@{host} (Mail Delivery System)"));
    h(format!("Subject: {}", kind.subject()));
    h(format!("To: {}", qf.sender.address));
    h(format!("Message-Id: <{id}@{host}>"));
    h("Auto-Submitted: auto-replied".into());
    h("MIME-Version: 1.0".into());
    h(format!("Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"{boundary}\""));
    h(format!("Content-Transfer-Encoding: {}", if eight_bit { "8bit" } else { "7bit" }));
    h(String::new());
    h("This is a MIME-encapsulated message.".into());
    h(String::new());
    h(format!("--{boundary}"));
    h("Content-Description: Notification".into());
    h(format!("Content-Type: text/plain; charset={}", if eight_bit { "utf-8" } else { "us-ascii" }));
    h(String::new());
    m.push_str(&human_part(host, qf, kind, entries));
    let mut h = |line: String| {
        m.push_str(&line);
        m.push_str("\r\n");
    };
    h(String::new());
    h(format!("--{boundary}"));
    h("Content-Description: Delivery report".into());
    h("Content-Type: message/delivery-status".into());
    h(String::new());
    h(format!("Reporting-MTA: dns; {host}"));
    h(format!("X-Mortal-Queue-ID: {}", qf.id));
    h(format!("X-Mortal-Sender: rfc822; {}", qf.sender.address));
    if !qf.sender.envid.is_empty() {
        h(format!("Original-Envelope-Id: {}", qf.sender.envid));
    }
    h(format!("Arrival-Date: {}", date::rfc5322(qf.arrival, zone)));
    for e in entries {
        let r = &qf.recipients[e.rcpt];
        h(String::new());
        h(format!("Final-Recipient: rfc822; {}", r.address));
        if let Some((kind, addr)) = r.orcpt.split_once(';') {
            h(format!("Original-Recipient: {kind};{addr}"));
        }
        h(format!("Action: {}", e.action));
        h(format!("Status: {}", e.status));
        if let Some(mta) = &e.remote_mta {
            h(format!("Remote-MTA: {mta}"));
        }
        if let Some(diag) = &e.diagnostic {
            h(format!("Diagnostic-Code: {diag}"));
        }
        if kind == Kind::Delay {
            let until = qf.arrival + config.queue.queue_lifetime;
            h(format!("Will-Retry-Until: {}", date::rfc5322(until, zone)));
        }
    }
    h(String::new());
    h(format!("--{boundary}"));
    let headers_only = returned.len() < qf.content.len();
    h(format!("Content-Description: Undelivered Message{}", if headers_only { " Headers" } else { "" }));
    h(format!("Content-Type: {}", if headers_only { "text/rfc822-headers" } else { "message/rfc822" }));
    if eight_bit {
        h("Content-Transfer-Encoding: 8bit".into());
    }
    h(String::new());
    let mut content = m.into_bytes();
    content.extend_from_slice(&returned);
    if !returned.ends_with(b"\r\n") {
        content.extend_from_slice(b"\r\n");
    }
    content.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    QueueFile {
        id,
        arrival: now,
        client: ClientInfo {
            addr: Ipv4Addr::LOCALHOST.into(),
            name: "localhost".into(),
            helo: host.clone(),
            protocol: "local".into(),
            tls: String::new(),
            auth: None,
        },
        sender: SenderInfo {
            address: String::new(),
            body: if eight_bit { BodyType::EightBitMime } else { BodyType::SevenBit },
            smtputf8: !qf.sender.address.is_ascii(),
            ret: None,
            envid: String::new(),
        },
        recipients: vec![QueuedRecipient {
            address: qf.sender.address.clone(),
            state: RecipientState::Pending,
            notify: Notify { never: true, ..Notify::default() },
            orcpt: String::new(),
            status: None,
        }],
        content,
    }
}

fn human_part(host: &str, qf: &QueueFile, kind: Kind, entries: &[&Entry]) -> String {
    let mut t = format!("This is the mail system at host {host}.\r\n\r\n");
    t.push_str(match kind {
        Kind::Failure => {
            "I'm sorry to have to inform you that your message could not\r\nbe delivered to one or more recipients. \
             It's attached below.\r\n"
        }
        Kind::Delay => {
            "####################################################################\r\n\
             # THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #\r\n\
             ####################################################################\r\n\r\n\
             Your message could not be delivered for some time.\r\nIt will be retried until it is too old.\r\n"
        }
        Kind::Success => {
            "Your message was successfully delivered to the destination(s)\r\nlisted below. If the message was \
             delivered to a mailbox you will\r\nreceive no further notifications.\r\n"
        }
    });
    t.push_str("\r\n");
    for e in entries {
        t.push_str(&format!("<{}>: {}\r\n", qf.recipients[e.rcpt].address, e.text));
    }
    t
}

/// The original as returned: all of it, or its header section.
fn returned_part(qf: &QueueFile, kind: Kind) -> Vec<u8> {
    let full = kind == Kind::Failure && qf.sender.ret != Some(DsnRet::Headers) && qf.content.len() <= RETURN_SIZE_LIMIT;
    if full {
        return qf.content.clone();
    }
    match qf.content.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(i) => qf.content[..i + 2].to_vec(),
        None => qf.content.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::time::{Duration, UNIX_EPOCH};

    fn original(ret: Option<DsnRet>) -> QueueFile {
        QueueFile {
            id: "0000000010000100000A".parse().unwrap(),
            arrival: UNIX_EPOCH + Duration::from_secs(1_800_000_000),
            client: ClientInfo {
                addr: Ipv4Addr::LOCALHOST.into(),
                name: "unknown".into(),
                helo: "c.test".into(),
                protocol: "ESMTP".into(),
                tls: String::new(),
                auth: None,
            },
            sender: SenderInfo {
                address: "a@x.test".into(),
                body: BodyType::SevenBit,
                smtputf8: false,
                ret,
                envid: "E1".into(),
            },
            recipients: vec![
                QueuedRecipient {
                    address: "b@y.test".into(),
                    state: RecipientState::Failed,
                    notify: Notify::default(),
                    orcpt: "rfc822;B@y.test".into(),
                    status: None,
                },
                QueuedRecipient {
                    address: "c@y.test".into(),
                    state: RecipientState::Failed,
                    notify: Notify { never: true, ..Notify::default() },
                    orcpt: String::new(),
                    status: None,
                },
            ],
            content: b"Subject: hi\r\n\r\nsecret body\r\n".to_vec(),
        }
    }

    fn entry(rcpt: usize) -> Entry {
        Entry {
            rcpt,
            action: DsnAction::Failed,
            status: "5.1.1".parse().unwrap(),
            text: "host h said: 550 5.1.1 no".into(),
            diagnostic: Some("smtp; 550 5.1.1 no".into()),
            remote_mta: Some("dns; h".into()),
        }
    }

    fn config() -> Config {
        Config::parse("[server]\nhostname = \"mx.test\"\n", Path::new("/m.toml")).unwrap()
    }

    #[test]
    fn failure_report_has_every_part() {
        let qf = original(None);
        let dsn = compose(
            &config(),
            &qf,
            Kind::Failure,
            &[&entry(0)],
            QueueId::parse("0000000020000100000B").unwrap(),
            UNIX_EPOCH,
        );
        let text = String::from_utf8(dsn.content.clone()).unwrap();
        for needle in [
            "Content-Type: multipart/report; report-type=delivery-status;",
            "Reporting-MTA: dns; mx.test",
            "Original-Envelope-Id: E1",
            "Final-Recipient: rfc822; b@y.test",
            "Original-Recipient: rfc822;B@y.test",
            "Action: failed",
            "Status: 5.1.1",
            "Diagnostic-Code: smtp; 550 5.1.1 no",
            "Content-Type: message/rfc822",
            "secret body",
        ] {
            assert!(text.contains(needle), "{needle} missing in\n{text}");
        }
        assert_eq!(dsn.sender.address, "", "a DSN is sent from <>");
        assert_eq!(dsn.recipients[0].address, "a@x.test");
        assert_eq!(QueueFile::decode(&dsn.encode()).unwrap(), dsn);
    }

    #[test]
    fn ret_hdrs_returns_headers_only() {
        let qf = original(Some(DsnRet::Headers));
        let dsn = compose(
            &config(),
            &qf,
            Kind::Failure,
            &[&entry(0)],
            QueueId::parse("0000000020000100000B").unwrap(),
            UNIX_EPOCH,
        );
        let text = String::from_utf8(dsn.content).unwrap();
        assert!(text.contains("text/rfc822-headers") && text.contains("Subject: hi"), "{text}");
        assert!(!text.contains("secret body"), "{text}");
    }

    #[test]
    fn notify_selects_recipients_and_kind() {
        assert!(Kind::Failure.wanted(Notify::default()) && Kind::Delay.wanted(Notify::default()));
        assert!(!Kind::Success.wanted(Notify::default()));
        assert!(!Kind::Failure.wanted(Notify { never: true, ..Notify::default() }));
        assert!(Kind::Success.wanted(Notify { success: true, ..Notify::default() }));
        assert!(!Kind::Failure.wanted(Notify { success: true, ..Notify::default() }));
    }
}

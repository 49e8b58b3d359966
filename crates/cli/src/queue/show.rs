//! queue show: `mortal queue show ID` (Postfix `postcat -q`): the
//! envelope, the header section and the body of one queued message.
//!
//! Content is stored with CRLF line ends (as it came over SMTP); it is
//! shown with LF, as `postcat` does. `--header-only` and `--body-only`
//! print just that part, without section markers, for piping into other
//! tools. Reading never changes the file, so a message may be shown from
//! any queue, `active/` included.

use super::fmt::{epoch_secs, rfc3339};
use super::spool::{self, Entry, QueueDir};
use mortal_proto::config::Config;
use mortal_proto::envelope::{BodyType, DsnRet, Notify};
use mortal_proto::queue_file::{QueueFile, QueuedRecipient, RecipientState};
use mortal_proto::queue_id::QueueId;
use std::io::{self, Write};
use std::time::Duration;

/// Attempts at finding a message that keeps moving between directories.
const FIND_ATTEMPTS: usize = 3;
/// Pause between those attempts.
const FIND_PAUSE: Duration = Duration::from_millis(10);

/// Which parts `show` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    All,
    Header,
    Body,
}

/// Finds and decodes `id`: `None` when no queue holds it.
pub fn find(config: &Config, id: &QueueId) -> anyhow::Result<Option<(QueueDir, QueueFile)>> {
    for _ in 0..FIND_ATTEMPTS {
        let Some(queue) = spool::locate(config, id)? else {
            std::thread::sleep(FIND_PAUSE);
            continue;
        };
        let entry = Entry { queue, id: *id, path: config.spool().path(queue, id), file_size: 0 };
        match spool::load(&entry)? {
            Some(Ok(qf)) => return Ok(Some((queue, qf))),
            Some(Err(e)) => anyhow::bail!("{}/{id}: unreadable queue file: {e}", queue.name()),
            // Moved between the look and the read: look again.
            None => continue,
        }
    }
    Ok(None)
}

/// The header section (through the empty line's first CRLF) and the body.
pub fn split(content: &[u8]) -> (&[u8], &[u8]) {
    if content.starts_with(b"\r\n") {
        return (&[], &content[2..]);
    }
    match content.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(i) => (&content[..i + 2], &content[i + 4..]),
        None => (content, &[]),
    }
}

/// CRLF line ends as LF.
pub fn unix_lines(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    mortal_proto::queue_file::crlf_to_lf(bytes, &mut out);
    out
}

pub fn write_text(out: &mut impl Write, queue: QueueDir, qf: &QueueFile, part: Part) -> io::Result<()> {
    let (header, body) = split(&qf.content);
    match part {
        Part::Header => return out.write_all(&unix_lines(header)),
        Part::Body => return out.write_all(&unix_lines(body)),
        Part::All => {}
    }
    let place = format!("{}/{}", queue.name(), qf.id);
    writeln!(out, "*** ENVELOPE {place} ***")?;
    for (key, value) in envelope_fields(queue, qf) {
        writeln!(out, "{key}: {value}")?;
    }
    for r in &qf.recipients {
        writeln!(out, "{}", recipient_text(r))?;
    }
    writeln!(out, "*** HEADER {place} ***")?;
    out.write_all(&unix_lines(header))?;
    writeln!(out, "*** BODY {place} ***")?;
    out.write_all(&unix_lines(body))?;
    if !body.is_empty() && !body.ends_with(b"\n") {
        writeln!(out)?;
    }
    writeln!(out, "*** END {place} ***")
}

fn envelope_fields(queue: QueueDir, qf: &QueueFile) -> Vec<(&'static str, String)> {
    let c = &qf.client;
    let s = &qf.sender;
    vec![
        ("queue_name", queue.name().to_owned()),
        ("queue_id", qf.id.to_string()),
        ("arrival_time", rfc3339(qf.arrival)),
        ("message_size", qf.content.len().to_string()),
        ("client", format!("{}[{}]", c.name, c.addr)),
        ("helo", c.helo.clone()),
        ("protocol", c.protocol.clone()),
        ("tls", if c.tls.is_empty() { "none".into() } else { c.tls.clone() }),
        ("sender", format!("<{}>", s.address)),
        ("body", body_name(s.body).into()),
        ("smtputf8", if s.smtputf8 { "yes" } else { "no" }.into()),
        ("ret", ret_name(s.ret).into()),
        ("envid", if s.envid.is_empty() { "none".into() } else { s.envid.clone() }),
    ]
}

fn recipient_text(r: &QueuedRecipient) -> String {
    let mut line = format!("recipient: <{}> {}", r.address, state_name(r.state));
    if !r.notify.is_default() {
        line.push_str(&format!(" notify={}", notify_text(r.notify)));
    }
    if !r.orcpt.is_empty() {
        line.push_str(&format!(" orcpt={}", r.orcpt));
    }
    if let Some(status) = &r.status {
        line.push_str(&format!(" ({status})"));
    }
    line
}

fn state_name(s: RecipientState) -> &'static str {
    match s {
        RecipientState::Pending => "pending",
        RecipientState::Delivered => "delivered",
        RecipientState::Failed => "failed",
    }
}

fn body_name(b: BodyType) -> &'static str {
    match b {
        BodyType::SevenBit => "7BIT",
        BodyType::EightBitMime => "8BITMIME",
        BodyType::BinaryMime => "BINARYMIME",
    }
}

fn ret_name(r: Option<DsnRet>) -> &'static str {
    match r {
        None => "none",
        Some(DsnRet::Full) => "FULL",
        Some(DsnRet::Headers) => "HDRS",
    }
}

/// RFC 3461's spelling: `SUCCESS,FAILURE`.
fn notify_text(n: Notify) -> String {
    let words = [(n.never, "NEVER"), (n.success, "SUCCESS"), (n.failure, "FAILURE"), (n.delay, "DELAY")];
    words.iter().filter(|(on, _)| *on).map(|(_, w)| *w).collect::<Vec<_>>().join(",")
}

/// One JSON object: the `list --json` fields, the whole envelope, and the
/// header and body as text (invalid UTF-8 replaced).
pub fn json(queue: QueueDir, qf: &QueueFile, part: Part) -> serde_json::Value {
    let (header, body) = split(&qf.content);
    let recipients: Vec<serde_json::Value> = qf
        .recipients
        .iter()
        .map(|r| {
            serde_json::json!({
                "address": r.address,
                "state": state_name(r.state),
                "notify": notify_text(r.notify),
                "orcpt": r.orcpt,
                "delay_reason": r.status.as_ref().map(ToString::to_string).unwrap_or_default(),
            })
        })
        .collect();
    let mut doc = serde_json::json!({
        "queue_name": queue.name(),
        "queue_id": qf.id,
        "arrival_time": epoch_secs(qf.arrival),
        "message_size": qf.content.len(),
        "client_address": qf.client.addr.to_string(),
        "client_name": qf.client.name,
        "helo": qf.client.helo,
        "protocol": qf.client.protocol,
        "tls": qf.client.tls,
        "sender": qf.sender.address,
        "body_type": body_name(qf.sender.body),
        "smtputf8": qf.sender.smtputf8,
        "ret": ret_name(qf.sender.ret),
        "envid": qf.sender.envid,
        "recipients": recipients,
    });
    if part != Part::Body {
        doc["header"] = String::from_utf8_lossy(&unix_lines(header)).into_owned().into();
    }
    if part != Part::Header {
        doc["body"] = String::from_utf8_lossy(&unix_lines(body)).into_owned().into();
    }
    doc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_body_split() {
        let table: &[(&[u8], &[u8], &[u8])] = &[
            (b"A: 1\r\nB: 2\r\n\r\nbody\r\n", b"A: 1\r\nB: 2\r\n", b"body\r\n"),
            (b"A: 1\r\n\r\n", b"A: 1\r\n", b""),
            (b"\r\nbody only\r\n", b"", b"body only\r\n"),
            (b"A: 1\r\n", b"A: 1\r\n", b""),
            (b"", b"", b""),
            (b"A: 1\r\n\r\n\r\nsecond\r\n", b"A: 1\r\n", b"\r\nsecond\r\n"),
        ];
        for &(content, header, body) in table {
            assert_eq!(split(content), (header, body), "{:?}", String::from_utf8_lossy(content));
        }
    }

    #[test]
    fn crlf_becomes_lf_and_lone_cr_stays() {
        assert_eq!(unix_lines(b"a\r\nb\rc\r\n\r\n"), b"a\nb\rc\n\n");
    }

    #[test]
    fn notify_spelling() {
        assert_eq!(notify_text(Notify { success: true, delay: true, ..Notify::default() }), "SUCCESS,DELAY");
        assert_eq!(notify_text(Notify::default()), "");
    }
}

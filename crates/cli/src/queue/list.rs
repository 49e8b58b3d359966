//! queue list: `mortal queue list` (Postfix `mailq`, `postqueue -p`, and
//! `postqueue -j` with `--json`) and `mortal queue stats`.
//!
//! The text listing has the shape of Postfix's: the queue id with `*` for a
//! message being delivered and `!` for one on hold, size, arrival, sender;
//! below it each pending recipient, after the reason it is still waiting
//! (`(4.4.1 connect to ...)`). On a terminal sizes and ages are human
//! (`1.2K`, `3h05m`); in a pipe they are exact (bytes, RFC 3339 UTC) so
//! scripts never see the shape change. `--json` writes one JSON object a
//! line with the field names of `postqueue -j`.

use super::fmt::{age_of, count, epoch_secs, human_age, human_size, rfc3339, sender_text};
use super::perm;
use super::spool::{self, Entry, Filter, QueueDir};
use mortal_proto::config::Config;
use mortal_proto::queue_file::{DeliveryStatus, RecipientState};
use mortal_proto::queue_id::QueueId;
use serde::Serialize;
use std::io::{self, Write};
use std::time::SystemTime;

/// One message as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub queue: QueueDir,
    pub id: QueueId,
    pub arrival: SystemTime,
    /// Content octets (what SIZE= and `message_size` mean), or the file size
    /// of a file that cannot be decoded.
    pub size: u64,
    pub sender: String,
    /// Pending recipients with their last delay reason (`None` before the
    /// first attempt).
    pub recipients: Vec<(String, Option<DeliveryStatus>)>,
    /// Why the file could not be decoded, for files the queue manager
    /// will move (or moved) to `corrupt/`.
    pub error: Option<String>,
}

/// How the text listing is drawn.
#[derive(Debug, Clone, Copy)]
pub struct Style {
    /// Human sizes and ages instead of bytes and timestamps.
    pub human: bool,
    pub now: SystemTime,
}

/// Width of a queue id and its marker.
const ID_COLUMN: usize = mortal_proto::queue_id::QUEUE_ID_LEN + 1;
/// Widths of the size and time columns, exact and human.
const SIZE_WIDTH: usize = 8;
const TIME_WIDTH: usize = 20;
const HUMAN_SIZE_WIDTH: usize = 6;
const HUMAN_AGE_WIDTH: usize = 6;
/// Space between columns.
const GAP: &str = "  ";

impl Style {
    fn widths(self) -> (usize, usize) {
        if self.human { (HUMAN_SIZE_WIDTH, HUMAN_AGE_WIDTH) } else { (SIZE_WIDTH, TIME_WIDTH) }
    }

    /// Column where senders and recipients start.
    fn address_column(self) -> usize {
        let (size, time) = self.widths();
        ID_COLUMN + GAP.len() + size + GAP.len() + time + GAP.len()
    }

    pub fn header(self) -> String {
        let (size, time) = self.widths();
        let (size_title, time_title) = if self.human { ("Size", "Age") } else { ("--Size--", "----Arrival Time----") };
        format!(
            "{:<ID_COLUMN$}{GAP}{size_title:>size$}{GAP}{time_title:>time$}{GAP}-Sender/Recipient-------",
            "-Queue ID-"
        )
    }

    pub fn message_line(self, m: &Listed) -> String {
        let (size_w, time_w) = self.widths();
        let (size, time) = if self.human {
            (human_size(m.size), human_age(age_of(m.arrival, self.now)))
        } else {
            (m.size.to_string(), rfc3339(m.arrival))
        };
        let id = format!("{}{}", m.id, spool::marker(m.queue));
        format!("{id:<ID_COLUMN$}{GAP}{size:>size_w$}{GAP}{time:>time_w$}{GAP}{}", sender_text(&m.sender))
    }

    pub fn recipient_line(self, address: &str) -> String {
        format!("{:width$}{address}", "", width = self.address_column())
    }

    /// The message's lines after its first: reasons in parentheses at the
    /// left margin, each followed by the recipients it applies to.
    pub fn detail_lines(self, m: &Listed) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(error) = &m.error {
            out.push(format!("(unreadable queue file: {error})"));
        }
        let mut last_reason: Option<&DeliveryStatus> = None;
        for (address, reason) in &m.recipients {
            if let Some(reason) = reason.as_ref().filter(|r| last_reason != Some(*r)) {
                out.push(format!("({reason})"));
            }
            last_reason = reason.as_ref();
            out.push(self.recipient_line(address));
        }
        out
    }

    /// The closing line, `postqueue -p`'s in a pipe.
    pub fn summary(self, messages: usize, bytes: u64) -> String {
        if self.human {
            format!("-- {} in {}.", human_size(bytes), count(messages, "message"))
        } else {
            format!("-- {} Kbytes in {}.", bytes.div_ceil(1024), count(messages, "Request"))
        }
    }
}

/// A `postqueue -j` line.
#[derive(Debug, Serialize)]
struct JsonMessage<'a> {
    queue_name: &'a str,
    queue_id: &'a QueueId,
    arrival_time: u64,
    message_size: u64,
    sender: &'a str,
    recipients: Vec<JsonRecipient<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
}

#[derive(Debug, Serialize)]
struct JsonRecipient<'a> {
    address: &'a str,
    /// `4.4.1 connect to ...`; absent before the first attempt, as in
    /// `postqueue -j`.
    #[serde(skip_serializing_if = "Option::is_none")]
    delay_reason: Option<String>,
}

pub fn json_line(m: &Listed) -> String {
    let record = JsonMessage {
        queue_name: m.queue.name(),
        queue_id: &m.id,
        arrival_time: epoch_secs(m.arrival),
        message_size: m.size,
        sender: &m.sender,
        recipients: m
            .recipients
            .iter()
            .map(|(a, r)| JsonRecipient { address: a, delay_reason: r.as_ref().map(DeliveryStatus::to_string) })
            .collect(),
        error: m.error.as_deref(),
    };
    serde_json::to_string(&record).expect("plain strings and numbers always serialize")
}

/// The messages `filter` selects, read now, oldest first.
pub fn collect(config: &Config, filter: &Filter, default_queues: &[QueueDir]) -> anyhow::Result<Vec<Listed>> {
    let queues = if filter.queues.is_empty() { default_queues.to_vec() } else { filter.queues.clone() };
    perm::may_read(config, &queues)?;
    let now = SystemTime::now();
    let mut out = Vec::new();
    for entry in spool::entries(config, &queues)? {
        if !filter.matches_entry(&entry, now) {
            continue;
        }
        if let Some(listed) = read_one(config, &entry, filter)? {
            out.push(listed);
        }
    }
    Ok(out)
}

fn read_one(config: &Config, entry: &Entry, filter: &Filter) -> anyhow::Result<Option<Listed>> {
    let Some((queue, decoded)) = spool::load_following(config, entry)? else {
        return Ok(None);
    };
    // A message that moved into a queue the filter excludes is not listed.
    if !filter.queues.is_empty() && !filter.queues.contains(&queue) {
        return Ok(None);
    }
    let listed = match decoded {
        Ok(qf) if filter.matches_envelope(&qf) => Listed {
            queue,
            id: entry.id,
            arrival: qf.arrival,
            size: qf.content.len() as u64,
            sender: qf.sender.address,
            recipients: qf
                .recipients
                .into_iter()
                .filter(|r| r.state == RecipientState::Pending)
                .map(|r| (r.address, r.status))
                .collect(),
            error: None,
        },
        Ok(_) => return Ok(None),
        // An envelope filter cannot match what cannot be decoded.
        Err(_) if filter.needs_envelope() => return Ok(None),
        Err(e) => Listed {
            queue,
            id: entry.id,
            arrival: entry.arrival(),
            size: entry.file_size,
            sender: String::new(),
            recipients: Vec::new(),
            error: Some(e.to_string()),
        },
    };
    Ok(Some(listed))
}

/// Writes the listing: text in `style`, or JSON Lines.
pub fn write_list(out: &mut impl Write, messages: &[Listed], style: Style, json: bool) -> io::Result<()> {
    if json {
        for m in messages {
            writeln!(out, "{}", json_line(m))?;
        }
        return Ok(());
    }
    if messages.is_empty() {
        // postqueue's words, which scripts test for.
        return writeln!(out, "Mail queue is empty");
    }
    writeln!(out, "{}", style.header())?;
    for m in messages {
        writeln!(out, "{}", style.message_line(m))?;
        for line in style.detail_lines(m) {
            writeln!(out, "{line}")?;
        }
        writeln!(out)?;
    }
    writeln!(out, "{}", style.summary(messages.len(), messages.iter().map(|m| m.size).sum()))
}

/// Counts, sizes and the oldest arrival of one queue.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct QueueStats {
    pub messages: usize,
    /// Bytes on disk.
    pub bytes: u64,
    /// Seconds since the epoch; `None` for an empty queue.
    pub oldest_arrival: Option<u64>,
}

impl QueueStats {
    fn add(&mut self, entry: &Entry) {
        self.messages += 1;
        self.bytes += entry.file_size;
        let arrival = epoch_secs(entry.arrival());
        self.oldest_arrival = Some(self.oldest_arrival.map_or(arrival, |o| o.min(arrival)));
    }

    fn merge(&mut self, other: &QueueStats) {
        self.messages += other.messages;
        self.bytes += other.bytes;
        self.oldest_arrival = match (self.oldest_arrival, other.oldest_arrival) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
}

/// Per-queue statistics from the directories alone (no file is read).
pub fn stats(config: &Config) -> anyhow::Result<Vec<(QueueDir, QueueStats)>> {
    perm::may_read(config, &QueueDir::ALL)?;
    let mut per_queue: Vec<(QueueDir, QueueStats)> =
        QueueDir::ALL.iter().map(|&q| (q, QueueStats::default())).collect();
    for entry in spool::entries(config, &QueueDir::ALL)? {
        if let Some((_, s)) = per_queue.iter_mut().find(|(q, _)| *q == entry.queue) {
            s.add(&entry);
        }
    }
    Ok(per_queue)
}

pub fn write_stats(out: &mut impl Write, stats: &[(QueueDir, QueueStats)], style: Style, json: bool) -> io::Result<()> {
    let mut total = QueueStats::default();
    for (_, s) in stats {
        total.merge(s);
    }
    if json {
        let queues: serde_json::Map<String, serde_json::Value> = stats
            .iter()
            .map(|(q, s)| (q.name().to_owned(), serde_json::to_value(s).expect("plain numbers serialize")))
            .collect();
        let doc = serde_json::json!({ "queues": queues, "total": total });
        return writeln!(out, "{doc}");
    }
    writeln!(out, "{:<10}{:>10}{:>12}  oldest", "queue", "messages", "size")?;
    for (name, s) in stats.iter().map(|(q, s)| (q.name(), s)).chain([("total", &total)]) {
        writeln!(out, "{}", stats_line(name, s, style))?;
    }
    Ok(())
}

fn stats_line(name: &str, s: &QueueStats, style: Style) -> String {
    let size = if style.human { human_size(s.bytes) } else { s.bytes.to_string() };
    let oldest = match s.oldest_arrival {
        None => "-".to_owned(),
        Some(secs) => {
            let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs);
            if style.human { format!("{} ago", human_age(age_of(t, style.now))) } else { rfc3339(t) }
        }
    };
    format!("{name:<10}{:>10}{size:>12}  {oldest}", s.messages)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn refused() -> DeliveryStatus {
        DeliveryStatus { code: "4.4.1".parse().unwrap(), text: "connect to 127.0.0.1:24: Connection refused".into() }
    }

    fn sample() -> Listed {
        Listed {
            queue: QueueDir::Deferred,
            id: "0000000010000100000A".parse().unwrap(),
            arrival: UNIX_EPOCH + Duration::from_secs(1_795_845_260),
            size: 2048,
            sender: "a@example.test".into(),
            recipients: vec![
                ("b@example.test".into(), Some(refused())),
                ("c@example.test".into(), Some(refused())),
                ("d@example.test".into(), None),
            ],
            error: None,
        }
    }

    fn render(messages: &[Listed], style: Style) -> String {
        let mut out = Vec::new();
        write_list(&mut out, messages, style, false).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn pipe_listing_is_exact_and_postfix_shaped() {
        let style = Style { human: false, now: UNIX_EPOCH + Duration::from_secs(1_795_849_000) };
        let mut held = sample();
        held.queue = QueueDir::Hold;
        held.id = "0000000010000200000B".parse().unwrap();
        held.sender = String::new();
        held.recipients.truncate(1);
        let want = "\
-Queue ID-             --Size--  ----Arrival Time----  -Sender/Recipient-------
0000000010000100000A       2048  2026-11-28T05:54:20Z  a@example.test
(4.4.1 connect to 127.0.0.1:24: Connection refused)
                                                       b@example.test
                                                       c@example.test
                                                       d@example.test

0000000010000200000B!      2048  2026-11-28T05:54:20Z  MAILER-DAEMON
(4.4.1 connect to 127.0.0.1:24: Connection refused)
                                                       b@example.test

-- 4 Kbytes in 2 Requests.
";
        assert_eq!(render(&[sample(), held], style), want);
    }

    #[test]
    fn terminal_listing_is_human() {
        let style = Style { human: true, now: UNIX_EPOCH + Duration::from_secs(1_795_845_260 + 3 * 3600 + 300) };
        let mut m = sample();
        m.queue = QueueDir::Active;
        m.size = 1_300_000;
        m.recipients = vec![("b@example.test".into(), None)];
        let want = "\
-Queue ID-               Size     Age  -Sender/Recipient-------
0000000010000100000A*    1.2M   3h05m  a@example.test
                                       b@example.test

-- 1.2M in 1 message.
";
        assert_eq!(render(&[m], style), want);
    }

    #[test]
    fn empty_queue_says_so_and_json_says_nothing() {
        let style = Style { human: false, now: UNIX_EPOCH };
        assert_eq!(render(&[], style), "Mail queue is empty\n");
        let mut out = Vec::new();
        write_list(&mut out, &[], style, true).unwrap();
        assert!(out.is_empty());
    }

    #[test]
    fn json_has_postqueue_fields() {
        let line = json_line(&sample());
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["queue_name"], "deferred");
        assert_eq!(v["queue_id"], "0000000010000100000A");
        assert_eq!(v["arrival_time"], 1_795_845_260u64);
        assert_eq!(v["message_size"], 2048);
        assert_eq!(v["sender"], "a@example.test");
        assert_eq!(v["recipients"][0]["address"], "b@example.test");
        assert_eq!(v["recipients"][0]["delay_reason"], "4.4.1 connect to 127.0.0.1:24: Connection refused");
        assert!(v["recipients"][2].get("delay_reason").is_none(), "no reason before the first attempt");
        assert!(v.get("error").is_none());
        assert!(!line.contains('\n'));
    }

    #[test]
    fn unreadable_file_is_listed_with_its_reason() {
        let mut m = sample();
        m.queue = QueueDir::Corrupt;
        m.recipients.clear();
        m.error = Some("checksum mismatch".into());
        let style = Style { human: false, now: UNIX_EPOCH };
        assert_eq!(style.detail_lines(&m), vec!["(unreadable queue file: checksum mismatch)".to_owned()]);
        assert!(style.message_line(&m).starts_with("0000000010000100000A#"));
    }

    #[test]
    fn stats_lines() {
        let s = QueueStats { messages: 3, bytes: 5000, oldest_arrival: Some(1_795_845_260) };
        let pipe = Style { human: false, now: UNIX_EPOCH + Duration::from_secs(1_795_845_260 + 90) };
        assert_eq!(stats_line("deferred", &s, pipe), "deferred           3        5000  2026-11-28T05:54:20Z");
        let human = Style { human: true, ..pipe };
        assert_eq!(stats_line("deferred", &s, human), "deferred           3        4.9K  1m ago");
        assert_eq!(stats_line("hold", &QueueStats::default(), pipe), "hold               0           0  -");
        let mut total = QueueStats::default();
        total.merge(&s);
        total.merge(&QueueStats::default());
        assert_eq!(total, s);
    }
}

//! The Maildir delivery agent: `<root>/<recipient>/{tmp,new,cur}`.
//!
//! Each copy is written to `tmp/` under a unique name, `fsync`ed, renamed
//! into `new/`, and `new/` is `fsync`ed: a mail reader never sees a partial
//! file, and a delivery reported as done survives a power cut. Line endings
//! become LF, as every Maildir reader expects, and `Return-Path:` and
//! `Delivered-To:` are prepended like Postfix's local(8) does. A
//! `BODY=BINARYMIME` message is the exception: its octets are not lines,
//! so a `<CR><LF>` in it may be data; it is stored exactly as received,
//! with the two prepended lines ending in `<CR><LF>` like the rest of its
//! header (Maildir readers such as Dovecot accept either line end).

use crate::route::{RcptResult, Report, Status};
use mortal_proto::config::Config;
use mortal_proto::envelope::BodyType;
use mortal_proto::queue_file::{QueueFile, crlf_to_lf};
use mortal_proto::smtp_status::{EnhancedStatus, StatusClass};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Makes Maildir file names unique within this process.
static DELIVERIES: AtomicU64 = AtomicU64::new(0);

/// The agent: one Maildir copy per recipient of the batch.
pub fn deliver_batch(config: &Config, qf: &QueueFile, rcpts: &[usize]) -> Report {
    let results = rcpts
        .iter()
        .map(|&i| {
            let rcpt = &qf.recipients[i].address;
            let copy = Copy {
                sender: &qf.sender.address,
                recipient: rcpt,
                content: &qf.content,
                binary: qf.sender.body == BodyType::BinaryMime,
            };
            match deliver(config.maildir_root(), &config.server.hostname, &copy) {
                Ok(_) => RcptResult::delivered("delivered to maildir"),
                Err(e) => RcptResult::new(
                    Status::Deferred,
                    const { EnhancedStatus::new(StatusClass::Persistent, 2, 0) },
                    format!("maildir delivery failed: {e}"),
                ),
            }
        })
        .collect();
    Report { relay: "local".into(), results }
}

/// One message for one recipient, as spooled (CRLF lines).
pub struct Copy<'a> {
    pub sender: &'a str,
    pub recipient: &'a str,
    pub content: &'a [u8],
    /// `BODY=BINARYMIME`: stored byte for byte.
    pub binary: bool,
}

/// Delivers one copy. Returns the path of the new file.
pub fn deliver(root: &Path, hostname: &str, copy: &Copy<'_>) -> io::Result<PathBuf> {
    let maildir = root.join(mailbox_dir_name(copy.recipient));
    for sub in ["tmp", "new", "cur"] {
        fs::DirBuilder::new().recursive(true).mode(0o700).create(maildir.join(sub))?;
    }
    let name = unique_name(hostname);
    let tmp = maildir.join("tmp").join(&name);
    let result = write_synced(&tmp, copy).and_then(|()| {
        let new = maildir.join("new").join(&name);
        fs::rename(&tmp, &new)?;
        File::open(maildir.join("new"))?.sync_all()?;
        Ok(new)
    });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn write_synced(path: &Path, copy: &Copy<'_>) -> io::Result<()> {
    let mut file = OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    let mut out = Vec::with_capacity(copy.content.len() + 128);
    let eol = if copy.binary { "\r\n" } else { "\n" };
    out.extend_from_slice(
        format!("Return-Path: <{}>{eol}Delivered-To: {}{eol}", copy.sender, copy.recipient).as_bytes(),
    );
    if copy.binary {
        out.extend_from_slice(copy.content);
    } else {
        crlf_to_lf(copy.content, &mut out);
    }
    file.write_all(&out)?;
    file.sync_data()
}

/// `time.MmicrosPpidQseq.host`, the de-facto Maildir unique name.
fn unique_name(hostname: &str) -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let seq = DELIVERIES.fetch_add(1, Ordering::Relaxed);
    let host = hostname.replace(['/', ':'], "_");
    format!("{}.M{}P{}Q{}.{}", now.as_secs(), now.subsec_micros(), std::process::id(), seq, host)
}

/// The directory name for a recipient: the address in lower case, with
/// `/` and `%` percent-encoded and a leading `.` encoded, so no address
/// can name a path outside its own directory.
pub fn mailbox_dir_name(recipient: &str) -> String {
    let mut out = String::with_capacity(recipient.len());
    for (i, c) in recipient.to_lowercase().chars().enumerate() {
        match c {
            '/' => out.push_str("%2F"),
            '%' => out.push_str("%25"),
            '.' if i == 0 => out.push_str("%2E"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dir_names_stay_inside() {
        assert_eq!(mailbox_dir_name("Bob@Example.TEST"), "bob@example.test");
        assert_eq!(mailbox_dir_name("a/b@x.test"), "a%2Fb@x.test");
        assert_eq!(mailbox_dir_name(".hidden@x.test"), "%2Ehidden@x.test");
        assert_eq!(mailbox_dir_name("100%@x.test"), "100%25@x.test");
    }

    #[test]
    fn delivers_into_new_with_lf() {
        let temp = tempfile::tempdir().unwrap();
        let root = temp.path();
        let content = b"Subject: t\r\n\r\nline\r\nbare\rcr\r\n";
        let copy = Copy { sender: "a@x.test", recipient: "b@x.test", content, binary: false };
        let path = deliver(root, "mx.test", &copy).unwrap();
        assert!(path.starts_with(root.join("b@x.test/new")));
        assert_eq!(
            fs::read(&path).unwrap(),
            b"Return-Path: <a@x.test>\nDelivered-To: b@x.test\nSubject: t\n\nline\nbare\rcr\n"
        );
        assert_eq!(fs::read_dir(root.join("b@x.test/tmp")).unwrap().count(), 0);
    }

    /// A BINARYMIME body is data: no octet of it changes.
    #[test]
    fn binary_body_is_stored_byte_for_byte() {
        let temp = tempfile::tempdir().unwrap();
        let root = temp.path();
        let content = b"Content-Type: application/octet-stream\r\n\r\n\x00\r\n\xff\r\r\n\n";
        let copy = Copy { sender: "a@x.test", recipient: "b@x.test", content, binary: true };
        let path = deliver(root, "mx.test", &copy).unwrap();
        let stored = fs::read(&path).unwrap();
        let head = b"Return-Path: <a@x.test>\r\nDelivered-To: b@x.test\r\n";
        assert_eq!(&stored[..head.len()], head);
        assert_eq!(&stored[head.len()..], content);
    }
}

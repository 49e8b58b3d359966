//! queue spool: what is in the queue directories, read without taking
//! anything from the queue manager.
//!
//! Only names that parse as a [`QueueId`] are queue files; `<id>.tmp`
//! files (a message still being written, or a state rewrite) and anything
//! else are ignored, so no path is ever built from a name we did not check.
//! A file may move or vanish between the directory read and the file read
//! (the queue manager is running): a vanished file is simply not listed.

use super::perm;
use mortal_proto::config::Config;
use mortal_proto::queue_file::{QueueFile, QueueFileError, RecipientState};
use mortal_proto::queue_id::QueueId;
pub use mortal_proto::spool::QueueDir;
use mortal_proto::spool::SpoolName;
use std::collections::HashSet;
use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

/// What `list` shows without `--queue`: mail that is still on its way
/// (corrupt files are listed only when asked for).
pub const LISTED: [QueueDir; 4] = [QueueDir::Incoming, QueueDir::Active, QueueDir::Deferred, QueueDir::Hold];

/// The mark after a queue id in listings, as in Postfix's mailq.
pub fn marker(queue: QueueDir) -> char {
    match queue {
        QueueDir::Active => '*',
        QueueDir::Hold => '!',
        QueueDir::Corrupt => '#',
        QueueDir::Incoming | QueueDir::Deferred => ' ',
    }
}

/// One queue file as the directory shows it.
#[derive(Debug, Clone)]
pub struct Entry {
    pub queue: QueueDir,
    pub id: QueueId,
    pub path: PathBuf,
    /// Size of the file on disk (envelope and content).
    pub file_size: u64,
}

impl Entry {
    /// Arrival as encoded in the id: known without reading the file.
    pub fn arrival(&self) -> SystemTime {
        self.id.arrival()
    }
}

/// The queue files in `queues`, oldest first.
///
/// Directories are read one after the other while messages move between
/// them, so `active/` (where every move starts or ends) is read both first
/// and last: a message that made one move during the scan is then seen
/// before or after it, never missed. An id seen twice is listed once, in
/// the queue it was seen in last.
pub fn entries(config: &Config, queues: &[QueueDir]) -> anyhow::Result<Vec<Entry>> {
    let mut order = queues.to_vec();
    if queues.contains(&QueueDir::Active) && queues.len() > 1 {
        order.retain(|&q| q != QueueDir::Active);
        order.insert(0, QueueDir::Active);
        order.push(QueueDir::Active);
    }
    let mut out = Vec::new();
    for queue in order {
        let dir = config.spool().dir(queue);
        let listing = match fs::read_dir(&dir) {
            Ok(listing) => listing,
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(e) => return Err(perm::io_error(&dir, e)),
        };
        for item in listing {
            let item = item.map_err(|e| perm::io_error(&dir, e))?;
            let SpoolName::Queued(id) = SpoolName::of(&item.file_name()) else { continue };
            let file_size = match item.metadata() {
                Ok(meta) => meta.size(),
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(perm::io_error(&item.path(), e)),
            };
            out.push(Entry { queue, id, path: item.path(), file_size });
        }
    }
    // Latest sighting first among equal ids (the sort is stable), then
    // keep the first of each id.
    out.reverse();
    out.sort_by_key(|e| e.id);
    let mut seen = HashSet::new();
    out.retain(|e| seen.insert(e.id));
    Ok(out)
}

/// Reads and decodes a queue file: `None` when it is gone (delivered,
/// deleted or moved since the directory was read).
pub fn load(entry: &Entry) -> anyhow::Result<Option<Result<QueueFile, QueueFileError>>> {
    match fs::read(&entry.path) {
        Ok(bytes) => Ok(Some(QueueFile::decode(&bytes).and_then(|qf| {
            // A file whose id record disagrees with its name is as bad as
            // a torn one: the queue manager quarantines it.
            if qf.id == entry.id { Ok(qf) } else { Err(QueueFileError::BadValue('I')) }
        }))),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(perm::io_error(&entry.path, e)),
    }
}

/// Like [`load`], but a message that moved since the directory was read is
/// followed once to where it is now. Returns the queue it was read from.
pub fn load_following(
    config: &Config,
    entry: &Entry,
) -> anyhow::Result<Option<(QueueDir, Result<QueueFile, QueueFileError>)>> {
    if let Some(decoded) = load(entry)? {
        return Ok(Some((entry.queue, decoded)));
    }
    let Some(queue) = locate(config, &entry.id)? else { return Ok(None) };
    let moved = Entry { queue, path: config.spool().path(queue, &entry.id), ..entry.clone() };
    Ok(load(&moved)?.map(|decoded| (queue, decoded)))
}

/// Where the message `id` is now, looking in every queue directory.
pub fn locate(config: &Config, id: &QueueId) -> anyhow::Result<Option<QueueDir>> {
    let spool = config.spool();
    for queue in QueueDir::ALL {
        let path = spool.path(queue, id);
        match fs::symlink_metadata(&path) {
            Ok(_) => return Ok(Some(queue)),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(perm::io_error(&path, e)),
        }
    }
    Ok(None)
}

/// Which messages a command is about.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// An address (case-insensitive), `@domain`, or `<>` / empty for the null sender.
    pub sender: Option<String>,
    /// Same forms; matches when any pending recipient matches.
    pub recipient: Option<String>,
    /// Empty means the command's default queues.
    pub queues: Vec<QueueDir>,
    /// Arrived at least this long ago.
    pub older_than: Option<Duration>,
}

impl Filter {
    /// Whether matching needs the file's envelope, not just its name.
    pub fn needs_envelope(&self) -> bool {
        self.sender.is_some() || self.recipient.is_some()
    }

    /// The test on what the directory shows: queue and age.
    pub fn matches_entry(&self, entry: &Entry, now: SystemTime) -> bool {
        let queue_ok = self.queues.is_empty() || self.queues.contains(&entry.queue);
        let age_ok = self.older_than.is_none_or(|min| now.duration_since(entry.arrival()).is_ok_and(|age| age >= min));
        queue_ok && age_ok
    }

    /// The test on the envelope: sender and pending recipients.
    pub fn matches_envelope(&self, qf: &QueueFile) -> bool {
        let sender_ok = self.sender.as_deref().is_none_or(|p| address_matches(p, &qf.sender.address));
        let recipient_ok = self.recipient.as_deref().is_none_or(|p| {
            qf.recipients.iter().any(|r| r.state == RecipientState::Pending && address_matches(p, &r.address))
        });
        sender_ok && recipient_ok
    }
}

/// `pattern` is a whole address, `@domain`, or `<>` (or empty) for the null
/// sender; comparison ignores case, as mail operators expect of domains
/// (and as nearly every site treats local parts).
pub fn address_matches(pattern: &str, address: &str) -> bool {
    let pattern = pattern.trim();
    if pattern.is_empty() || pattern == "<>" {
        return address.is_empty();
    }
    if let Some(domain) = pattern.strip_prefix('@') {
        return address.rsplit_once('@').is_some_and(|(_, d)| d.eq_ignore_ascii_case(domain));
    }
    pattern.trim_start_matches('<').trim_end_matches('>').to_lowercase() == address.to_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    #[test]
    fn address_patterns() {
        let table: &[(&str, &str, bool)] = &[
            ("a@example.test", "a@example.test", true),
            ("A@Example.TEST", "a@example.test", true),
            ("<a@example.test>", "a@example.test", true),
            ("a@example.test", "aa@example.test", false),
            ("@example.test", "b@EXAMPLE.test", true),
            ("@example.test", "b@sub.example.test", false),
            ("@example.test", "", false),
            ("<>", "", true),
            ("", "", true),
            ("<>", "a@example.test", false),
        ];
        for &(pattern, address, want) in table {
            assert_eq!(address_matches(pattern, address), want, "{pattern:?} vs {address:?}");
        }
    }

    #[test]
    fn entries_are_sorted_deduplicated_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config::parse("[server]\nspool_dir = \"spool\"\n", &dir.path().join("mortal.toml")).unwrap();
        for q in QueueDir::ALL {
            fs::create_dir_all(config.spool().dir(q)).unwrap();
        }
        let (old, new) = ("0000000010000100000A", "0000000020000100000A");
        let files = [
            (QueueDir::Deferred, new),
            (QueueDir::Hold, old),
            // Caught mid-move: in two directories at once.
            (QueueDir::Active, new),
            (QueueDir::Incoming, "0000000030000100000A.tmp"),
            (QueueDir::Incoming, "not-a-queue-id"),
        ];
        for (q, name) in files {
            fs::write(config.spool().dir(q).join(name), b"x").unwrap();
        }
        let got: Vec<(QueueDir, String)> =
            entries(&config, &QueueDir::ALL).unwrap().into_iter().map(|e| (e.queue, e.id.to_string())).collect();
        assert_eq!(got, [(QueueDir::Hold, old.to_owned()), (QueueDir::Active, new.to_owned())]);
        let only_deferred = entries(&config, &[QueueDir::Deferred]).unwrap();
        assert_eq!(only_deferred.len(), 1);
    }

    #[test]
    fn entry_filter_uses_queue_and_id_age() {
        let id = QueueId::new(UNIX_EPOCH + Duration::from_secs(1_000_000), 42);
        let entry = Entry { queue: QueueDir::Deferred, id, path: PathBuf::new(), file_size: 0 };
        let now = UNIX_EPOCH + Duration::from_secs(1_003_600);
        let f = |queues: Vec<QueueDir>, older: u64| Filter {
            queues,
            older_than: Some(Duration::from_secs(older)),
            ..Filter::default()
        };
        assert!(f(vec![], 3600).matches_entry(&entry, now));
        assert!(!f(vec![], 3601).matches_entry(&entry, now));
        assert!(f(vec![QueueDir::Deferred, QueueDir::Hold], 0).matches_entry(&entry, now));
        assert!(!f(vec![QueueDir::Hold], 0).matches_entry(&entry, now));
        assert!(!Filter::default().needs_envelope());
    }
}

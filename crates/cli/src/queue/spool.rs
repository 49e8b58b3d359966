//! queue spool: what is in the queue directories, read without taking
//! anything from the queue manager.
//!
//! Only names that pass `queue_id::is_valid` are queue files; `<id>.tmp`
//! files (a message still being written, or a state rewrite) and anything
//! else are ignored, so no path is ever built from a name we did not check.
//! A file may move or vanish between the directory read and the file read
//! (the queue manager is running): a vanished file is simply not listed.

use super::perm;
use clap::ValueEnum;
use mortal_proto::config::Config;
use mortal_proto::queue_file::{QueueFile, QueueFileError, RecipientState};
use mortal_proto::queue_id;
use std::collections::HashSet;
use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A queue directory (the names of `mortal_proto::config::QUEUE_DIRS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, ValueEnum)]
pub enum QueueName {
    Incoming,
    Active,
    Deferred,
    Hold,
    Corrupt,
}

impl QueueName {
    pub const ALL: [QueueName; 5] =
        [QueueName::Incoming, QueueName::Active, QueueName::Deferred, QueueName::Hold, QueueName::Corrupt];
    /// What `list` shows without `--queue`: mail that is still on its way
    /// (corrupt files are listed only when asked for).
    pub const LISTED: [QueueName; 4] = [QueueName::Incoming, QueueName::Active, QueueName::Deferred, QueueName::Hold];

    pub fn as_str(self) -> &'static str {
        match self {
            QueueName::Incoming => "incoming",
            QueueName::Active => "active",
            QueueName::Deferred => "deferred",
            QueueName::Hold => "hold",
            QueueName::Corrupt => "corrupt",
        }
    }

    /// The mark after a queue id in listings, as in Postfix's mailq.
    pub fn marker(self) -> char {
        match self {
            QueueName::Active => '*',
            QueueName::Hold => '!',
            QueueName::Corrupt => '#',
            QueueName::Incoming | QueueName::Deferred => ' ',
        }
    }

    pub fn dir(self, config: &Config) -> PathBuf {
        config.queue_dir(self.as_str())
    }
}

/// One queue file as the directory shows it.
#[derive(Debug, Clone)]
pub struct Entry {
    pub queue: QueueName,
    pub id: String,
    pub path: PathBuf,
    /// Size of the file on disk (envelope and content).
    pub file_size: u64,
}

impl Entry {
    /// Arrival as encoded in the id: known without reading the file.
    pub fn arrival(&self) -> SystemTime {
        queue_id::arrival(&self.id).unwrap_or(UNIX_EPOCH)
    }
}

/// The queue files in `queues`, oldest first.
///
/// Directories are read one after the other while messages move between
/// them, so `active/` (where every move starts or ends) is read both first
/// and last: a message that made one move during the scan is then seen
/// before or after it, never missed. An id seen twice is listed once, in
/// the queue it was seen in last.
pub fn entries(config: &Config, queues: &[QueueName]) -> anyhow::Result<Vec<Entry>> {
    let mut order = queues.to_vec();
    if queues.contains(&QueueName::Active) && queues.len() > 1 {
        order.retain(|&q| q != QueueName::Active);
        order.insert(0, QueueName::Active);
        order.push(QueueName::Active);
    }
    let mut out = Vec::new();
    for queue in order {
        let dir = queue.dir(config);
        let listing = match fs::read_dir(&dir) {
            Ok(listing) => listing,
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(e) => return Err(perm::io_error(&dir, e)),
        };
        for item in listing {
            let item = item.map_err(|e| perm::io_error(&dir, e))?;
            let Some(id) = item.file_name().to_str().filter(|n| queue_id::is_valid(n)).map(str::to_owned) else {
                continue;
            };
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
    out.sort_by(|a, b| a.id.cmp(&b.id));
    let mut seen = HashSet::new();
    out.retain(|e| seen.insert(e.id.clone()));
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
) -> anyhow::Result<Option<(QueueName, Result<QueueFile, QueueFileError>)>> {
    if let Some(decoded) = load(entry)? {
        return Ok(Some((entry.queue, decoded)));
    }
    let Some(queue) = locate(config, &entry.id)? else { return Ok(None) };
    let moved = Entry { queue, path: queue.dir(config).join(&entry.id), ..entry.clone() };
    Ok(load(&moved)?.map(|decoded| (queue, decoded)))
}

/// Where the message `id` is now, looking in every queue directory.
pub fn locate(config: &Config, id: &str) -> anyhow::Result<Option<QueueName>> {
    debug_assert!(queue_id::is_valid(id));
    for queue in QueueName::ALL {
        let path = queue.dir(config).join(id);
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
    pub queues: Vec<QueueName>,
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
        for q in QueueName::ALL {
            fs::create_dir_all(q.dir(&config)).unwrap();
        }
        let (old, new) = ("0000000010000100000A", "0000000020000100000A");
        let files = [
            (QueueName::Deferred, new),
            (QueueName::Hold, old),
            // Caught mid-move: in two directories at once.
            (QueueName::Active, new),
            (QueueName::Incoming, "0000000030000100000A.tmp"),
            (QueueName::Incoming, "not-a-queue-id"),
        ];
        for (q, name) in files {
            fs::write(q.dir(&config).join(name), b"x").unwrap();
        }
        let got: Vec<(QueueName, String)> =
            entries(&config, &QueueName::ALL).unwrap().into_iter().map(|e| (e.queue, e.id)).collect();
        assert_eq!(got, [(QueueName::Hold, old.to_owned()), (QueueName::Active, new.to_owned())]);
        let only_deferred = entries(&config, &[QueueName::Deferred]).unwrap();
        assert_eq!(only_deferred.len(), 1);
    }

    #[test]
    fn entry_filter_uses_queue_and_id_age() {
        let id = queue_id::make(UNIX_EPOCH + Duration::from_secs(1_000_000), 42);
        let entry = Entry { queue: QueueName::Deferred, id, path: PathBuf::new(), file_size: 0 };
        let now = UNIX_EPOCH + Duration::from_secs(1_003_600);
        let f = |queues: Vec<QueueName>, older: u64| Filter {
            queues,
            older_than: Some(Duration::from_secs(older)),
            ..Filter::default()
        };
        assert!(f(vec![], 3600).matches_entry(&entry, now));
        assert!(!f(vec![], 3601).matches_entry(&entry, now));
        assert!(f(vec![QueueName::Deferred, QueueName::Hold], 0).matches_entry(&entry, now));
        assert!(!f(vec![QueueName::Hold], 0).matches_entry(&entry, now));
        assert!(!Filter::default().needs_envelope());
    }
}

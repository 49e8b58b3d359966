//! The spool: its directories, the names in them, and the one durable
//! write every writer of the spool uses.
//!
//! The layout is described for operators in `docs/queue-format.md`:
//! `<spool_dir>/<queue>/<id>` for a queue file, `<id>.tmp` next to it while
//! it is written or rewritten. Every path is built here, from a
//! [`QueueDir`] and a [`QueueId`], so no path is ever built from a name
//! that was not parsed as a queue id.
//!
//! This is the module of this crate that performs I/O (file creation,
//! rename, `fsync`, directory creation): the write procedure is the
//! spool's contract between cleanup, the queue manager and the operator's
//! commands, and keeping it next to the layout keeps one definition of
//! both. [`TempFile`] offers the three commit orders its callers need, each
//! with the reason it exists.

use crate::queue_id::QueueId;
use std::ffi::OsStr;
use std::fmt;
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use thiserror::Error;

/// Suffix of a queue file being written (by cleanup, or by the queue
/// manager making a DSN) or rewritten (recipient states): not a queue id,
/// so never picked up as a message.
pub const TEMP_SUFFIX: &str = ".tmp";
/// The spool root: others may see that it exists, not what it holds.
pub const SPOOL_DIR_MODE: u32 = 0o755;
/// Queue directories: the mail user writes; its group (the operators who
/// may read the queue with `mortal queue list/show`) reads.
pub const QUEUE_DIR_MODE: u32 = 0o750;
/// Queue files: the mail user writes, its group (queue operators) reads.
pub const QUEUE_FILE_MODE: u32 = 0o640;
/// Write buffer of a [`TempFile`]: one syscall per this many bytes.
const WRITE_BUFFER: usize = 64 * 1024;

/// A queue directory, named as on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum QueueDir {
    /// New messages, and `<id>.tmp` while cleanup writes one.
    Incoming,
    /// Messages the queue manager is delivering.
    Active,
    /// Messages waiting for their next attempt (due at the file's mtime).
    Deferred,
    /// Messages an operator or a filter (through cleanup) put on hold.
    Hold,
    /// Files that failed to decode or verify.
    Corrupt,
}

impl QueueDir {
    /// Every queue directory, in the order mail moves through them.
    pub const ALL: [QueueDir; 5] =
        [QueueDir::Incoming, QueueDir::Active, QueueDir::Deferred, QueueDir::Hold, QueueDir::Corrupt];

    /// The directory's name under the spool root (also its name in
    /// listings and on the command line).
    pub fn name(self) -> &'static str {
        match self {
            QueueDir::Incoming => "incoming",
            QueueDir::Active => "active",
            QueueDir::Deferred => "deferred",
            QueueDir::Hold => "hold",
            QueueDir::Corrupt => "corrupt",
        }
    }
}

impl fmt::Display for QueueDir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A text that names no queue directory.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{0:?} is not a queue (incoming, active, deferred, hold, corrupt)")]
pub struct BadQueueDir(pub String);

impl FromStr for QueueDir {
    type Err = BadQueueDir;

    fn from_str(s: &str) -> Result<Self, BadQueueDir> {
        QueueDir::ALL.into_iter().find(|q| q.name() == s).ok_or_else(|| BadQueueDir(s.to_owned()))
    }
}

/// What a name found in a queue directory is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpoolName {
    /// A queue file.
    Queued(QueueId),
    /// A queue file being written or rewritten.
    Temp(QueueId),
    /// Anything else: never touched.
    Other,
}

impl SpoolName {
    pub fn of(name: &OsStr) -> Self {
        let Some(name) = name.to_str() else { return SpoolName::Other };
        if let Ok(id) = QueueId::parse(name) {
            SpoolName::Queued(id)
        } else if let Some(id) = name.strip_suffix(TEMP_SUFFIX).and_then(|n| QueueId::parse(n).ok()) {
            SpoolName::Temp(id)
        } else {
            SpoolName::Other
        }
    }
}

/// How an existing temporary file is treated when a new one is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Create {
    /// `O_EXCL`: a clash is an error, never a shared file (a new id).
    New,
    /// Truncate a left-over one (a rewrite: only this process rewrites
    /// the file it owns, so a left-over is from a failed earlier try).
    Replace,
}

/// The spool under `[server] spool_dir`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spool {
    root: PathBuf,
}

impl Spool {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory of `queue`.
    pub fn dir(&self, queue: QueueDir) -> PathBuf {
        self.root.join(queue.name())
    }

    /// The file of message `id` in `queue`.
    pub fn path(&self, queue: QueueDir, id: &QueueId) -> PathBuf {
        self.dir(queue).join(id.as_str())
    }

    /// The temporary file message `id` is written to in `queue` before it
    /// takes its name.
    pub fn temp_path(&self, queue: QueueDir, id: &QueueId) -> PathBuf {
        self.dir(queue).join(format!("{id}{TEMP_SUFFIX}"))
    }

    /// Creates the spool root ([`SPOOL_DIR_MODE`]) and every queue
    /// directory ([`QUEUE_DIR_MODE`]) that is missing; existing ones are
    /// left as they are (the master sets owners and modes when it runs as
    /// root).
    pub fn create_dirs(&self) -> io::Result<()> {
        create_dir(&self.root, SPOOL_DIR_MODE)?;
        for queue in QueueDir::ALL {
            create_dir(&self.dir(queue), QUEUE_DIR_MODE)?;
        }
        Ok(())
    }

    /// Opens `<id>.tmp` in `queue` for writing ([`QUEUE_FILE_MODE`]); its
    /// commit gives it the name `<id>`.
    pub fn create_temp(&self, queue: QueueDir, id: &QueueId, create: Create) -> io::Result<TempFile> {
        let mut options = OpenOptions::new();
        options.write(true).mode(QUEUE_FILE_MODE);
        match create {
            Create::New => options.create_new(true),
            Create::Replace => options.create(true).truncate(true),
        };
        TempFile::open(self.temp_path(queue, id), self.path(queue, id), &options)
    }

    /// Gives `file` (message `id`'s temporary file) the final name `<id>`
    /// in `queue` instead of the one it was created for: cleanup writes
    /// into `incoming/` and commits a held message straight into `hold/`.
    /// Both names are in this spool, so its commit's rename stays on one
    /// file system and stays atomic.
    pub fn redirect(&self, file: &mut TempFile, queue: QueueDir, id: &QueueId) {
        file.path = self.path(queue, id);
    }

    /// Writes a new message `id` into `queue` durably (see
    /// [`TempFile::commit_sync_then_rename`]). The id must be unused.
    pub fn write_new(&self, queue: QueueDir, id: &QueueId, bytes: &[u8]) -> io::Result<()> {
        if self.path(queue, id).exists() {
            return Err(io::ErrorKind::AlreadyExists.into());
        }
        let mut file = self.create_temp(queue, id, Create::New)?;
        file.write_all(bytes)?;
        file.commit_sync_then_rename()
    }

    /// Replaces message `id` in `queue` with `bytes` durably (see
    /// [`TempFile::commit_sync_then_rename`]).
    pub fn rewrite(&self, queue: QueueDir, id: &QueueId, bytes: &[u8]) -> io::Result<()> {
        let mut file = self.create_temp(queue, id, Create::Replace)?;
        file.write_all(bytes)?;
        file.commit_sync_then_rename()
    }
}

fn create_dir(path: &Path, mode: u32) -> io::Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
        .map_err(|e| io::Error::new(e.kind(), format!("mkdir {}: {e}", path.display())))
}

/// Replaces `path` with `bytes` atomically, without any `fsync`: a reader
/// sees the old file or the new one, never half of one, but a crash may
/// leave either (for files that are rewritten often and worth nothing
/// after a crash, like the metrics file). `temp` must be in the same
/// directory, so the rename stays on one file system.
/// Octets an unprivileged writer may still use on the file system of
/// `dir` (an open spool directory): what `queue_minfree` is compared
/// with before a new message is accepted.
pub fn free_space(dir: &File) -> io::Result<u64> {
    let st = nix::sys::statvfs::fstatvfs(dir).map_err(io::Error::from)?;
    Ok(st.blocks_available().saturating_mul(st.fragment_size()))
}

pub fn replace_atomically(path: &Path, temp: PathBuf, bytes: &[u8]) -> io::Result<()> {
    let mut options = OpenOptions::new();
    options.write(true).create(true).truncate(true);
    let mut file = TempFile::open(temp, path.to_owned(), &options)?;
    file.write_all(bytes)?;
    file.commit_rename()
}

/// A file written under a temporary name and given its final name by one
/// of the commits. Dropping it before the rename removes it.
#[derive(Debug)]
pub struct TempFile {
    temp: PathBuf,
    path: PathBuf,
    out: BufWriter<File>,
    renamed: bool,
}

/// Writes go through a buffer of 64 KiB; writes as large as that go
/// straight to the file.
impl Write for TempFile {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.out.write(bytes)
    }

    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

impl TempFile {
    fn open(temp: PathBuf, path: PathBuf, options: &OpenOptions) -> io::Result<Self> {
        let file = options.open(&temp)?;
        Ok(Self { temp, path, out: BufWriter::with_capacity(WRITE_BUFFER, file), renamed: false })
    }

    /// The name the file gets at its commit.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Cleanup's commit: rename, then `fsync` the file, then `fsync`
    /// `dir` (the open directory of the final name). Only after this
    /// returns `Ok` may anyone be told the message is queued.
    ///
    /// The complete file is renamed first and synced after: a full `fsync`
    /// of the file then commits the file system journal transaction that
    /// also holds the rename, so the directory `fsync` that follows finds
    /// nothing left to commit. One journal commit per message instead of
    /// two, with the same guarantee when this returns: data and name are
    /// both on stable storage. Before that, a crash can leave the name
    /// without the data only on a file system without ordered data; the
    /// checksum then sends the file to `corrupt/`, and nothing was
    /// acknowledged for it. This order fits only a file that replaces
    /// nothing (a new message); see [`Self::commit_sync_then_rename`].
    ///
    /// When a sync fails the file is removed again: the client will be told
    /// to retry, and the retry must not become a second copy.
    pub fn commit_rename_then_sync(mut self, dir: &File) -> io::Result<()> {
        self.out.flush()?;
        std::fs::rename(&self.temp, &self.path)?;
        self.renamed = true;
        if let Err(e) = self.out.get_ref().sync_all().and_then(|()| dir.sync_all()) {
            let _ = std::fs::remove_file(&self.path);
            return Err(e);
        }
        Ok(())
    }

    /// The queue manager's commit: `fsync` the data, rename, then `fsync`
    /// the directory. A crash at any point leaves either the old file or
    /// the new one, complete, under the name. The queue manager needs this
    /// order because it replaces files that hold state (a rewrite of the
    /// recipient states): renamed before its data is on disk, a torn new
    /// file could replace an intact old one, and the message would go to
    /// `corrupt/` instead of being delivered.
    pub fn commit_sync_then_rename(mut self) -> io::Result<()> {
        let result = self.out.flush().and_then(|()| self.out.get_ref().sync_data());
        result.and_then(|()| std::fs::rename(&self.temp, &self.path))?;
        self.renamed = true;
        File::open(self.path.parent().unwrap_or(Path::new(".")))?.sync_all()
    }

    /// Rename only, no `fsync`: atomic for readers, not durable (see
    /// [`replace_atomically`]).
    pub fn commit_rename(mut self) -> io::Result<()> {
        self.out.flush()?;
        std::fs::rename(&self.temp, &self.path)?;
        self.renamed = true;
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.renamed {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn id(n: u32) -> QueueId {
        QueueId::new(UNIX_EPOCH + Duration::from_secs(1_800_000_000), n)
    }

    /// A fresh directory for one test, removed when dropped.
    struct TestDir(PathBuf);

    impl TestDir {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("mortal-proto-spool-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            Self(dir)
        }
    }

    impl Drop for TestDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    }

    #[test]
    fn names_and_paths() {
        let names: Vec<&str> = QueueDir::ALL.iter().map(|q| q.name()).collect();
        assert_eq!(names, ["incoming", "active", "deferred", "hold", "corrupt"]);
        for q in QueueDir::ALL {
            assert_eq!(q.name().parse(), Ok(q));
            assert_eq!(q.to_string(), q.name());
        }
        assert_eq!("Incoming".parse::<QueueDir>(), Err(BadQueueDir("Incoming".into())));
        assert!("../incoming".parse::<QueueDir>().is_err());

        let spool = Spool::new("/var/spool/mortal");
        let id = QueueId::parse("0000000010000100000A").unwrap();
        assert_eq!(spool.dir(QueueDir::Hold), Path::new("/var/spool/mortal/hold"));
        assert_eq!(spool.path(QueueDir::Deferred, &id), Path::new("/var/spool/mortal/deferred/0000000010000100000A"));
        assert_eq!(
            spool.temp_path(QueueDir::Incoming, &id),
            Path::new("/var/spool/mortal/incoming/0000000010000100000A.tmp")
        );

        assert_eq!(SpoolName::of(OsStr::new("0000000010000100000A")), SpoolName::Queued(id));
        assert_eq!(SpoolName::of(OsStr::new("0000000010000100000A.tmp")), SpoolName::Temp(id));
        for other in ["0000000010000100000a", "x.tmp", ".tmp", "0000000010000100000A.tmp.tmp", "..", ".nfs0001"] {
            assert_eq!(SpoolName::of(OsStr::new(other)), SpoolName::Other, "{other:?}");
        }
    }

    #[test]
    fn create_dirs_with_their_modes() {
        use std::os::unix::fs::PermissionsExt;
        let dir = TestDir::new("dirs");
        let spool = Spool::new(dir.0.join("spool"));
        spool.create_dirs().unwrap();
        // Twice is fine: existing directories are left as they are.
        spool.create_dirs().unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        // The umask may take bits away, never add them.
        assert_eq!(mode(spool.root()) & !SPOOL_DIR_MODE, 0);
        assert_eq!(names(spool.root()), ["active", "corrupt", "deferred", "hold", "incoming"]);
        for q in QueueDir::ALL {
            assert_eq!(mode(&spool.dir(q)) & !QUEUE_DIR_MODE, 0, "{q}");
        }
    }

    #[test]
    fn durable_writes_leave_no_temp_file() {
        let dir = TestDir::new("write");
        let spool = Spool::new(&dir.0);
        spool.create_dirs().unwrap();
        let incoming = spool.dir(QueueDir::Incoming);

        spool.write_new(QueueDir::Incoming, &id(1), b"one").unwrap();
        assert_eq!(std::fs::read(spool.path(QueueDir::Incoming, &id(1))).unwrap(), b"one");
        let clash = spool.write_new(QueueDir::Incoming, &id(1), b"two").unwrap_err();
        assert_eq!(clash.kind(), io::ErrorKind::AlreadyExists);
        spool.rewrite(QueueDir::Incoming, &id(1), b"three").unwrap();
        assert_eq!(std::fs::read(spool.path(QueueDir::Incoming, &id(1))).unwrap(), b"three");

        // Cleanup's order, streamed in pieces larger than the buffer.
        let mut file = spool.create_temp(QueueDir::Incoming, &id(2), Create::New).unwrap();
        assert!(spool.temp_path(QueueDir::Incoming, &id(2)).exists(), "written under the temporary name");
        let big = vec![b'x'; WRITE_BUFFER * 2 + 1];
        file.write_all(&big).unwrap();
        file.write_all(b"end").unwrap();
        file.commit_rename_then_sync(&File::open(&incoming).unwrap()).unwrap();
        assert_eq!(std::fs::read(spool.path(QueueDir::Incoming, &id(2))).unwrap().len(), big.len() + 3);

        // Written in incoming/, committed into hold/ (cleanup's HOLD).
        let mut held = spool.create_temp(QueueDir::Incoming, &id(4), Create::New).unwrap();
        held.write_all(b"held").unwrap();
        spool.redirect(&mut held, QueueDir::Hold, &id(4));
        assert_eq!(held.path(), spool.path(QueueDir::Hold, &id(4)));
        held.commit_rename_then_sync(&File::open(spool.dir(QueueDir::Hold)).unwrap()).unwrap();
        assert_eq!(std::fs::read(spool.path(QueueDir::Hold, &id(4))).unwrap(), b"held");
        assert_eq!(names(&spool.dir(QueueDir::Hold)), [id(4).to_string()]);

        // A second writer of the same temporary name is refused.
        let first = spool.create_temp(QueueDir::Incoming, &id(3), Create::New).unwrap();
        let second = spool.create_temp(QueueDir::Incoming, &id(3), Create::New).unwrap_err();
        assert_eq!(second.kind(), io::ErrorKind::AlreadyExists);
        // Dropped before its commit: gone, and no final name either.
        drop(first);

        let metrics = dir.0.join("metrics.prom");
        replace_atomically(&metrics, dir.0.join(".metrics.prom.tmp"), b"a 1\n").unwrap();
        replace_atomically(&metrics, dir.0.join(".metrics.prom.tmp"), b"a 2\n").unwrap();
        assert_eq!(std::fs::read(&metrics).unwrap(), b"a 2\n");

        let expected = [id(1).to_string(), id(2).to_string()];
        assert_eq!(names(&incoming), expected);
        assert_eq!(names(&dir.0), ["active", "corrupt", "deferred", "hold", "incoming", "metrics.prom"]);
    }
}

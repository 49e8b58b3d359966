//! The durable write: temporary file, rename, file fsync, directory fsync.
//!
//! A message gets its final name in `incoming/` only once every byte is
//! written, and cleanup answers only after the file and the directory are
//! both synced (see [`SpoolFile::commit`] for why the rename comes first).
//! A crash while writing leaves at most a `<id>.tmp` file, which the queue
//! manager removes once the cleanup process that wrote it is gone; it is
//! never delivered.

use mortal_proto::config::Config;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

/// Suffix of files being written; not a queue id, so never picked up.
pub const TEMP_SUFFIX: &str = ".tmp";
/// Queue files: the mail user writes, its group (queue operators) reads.
pub const QUEUE_FILE_MODE: u32 = 0o640;
/// Write buffer for queue files: one syscall per this many bytes.
const WRITE_BUFFER: usize = 64 * 1024;

/// The `incoming/` directory, held open so syncing it costs no lookup.
#[derive(Debug)]
pub struct Spool {
    incoming: PathBuf,
    incoming_dir: File,
    queue_socket: PathBuf,
}

impl Spool {
    pub fn open(config: &Config) -> io::Result<Self> {
        let incoming = config.queue_dir("incoming");
        let incoming_dir = File::open(&incoming)?;
        Ok(Self { incoming, incoming_dir, queue_socket: config.queue_socket() })
    }

    /// Creates `incoming/<id>.tmp`; `O_EXCL` makes a clash an error rather
    /// than a shared file.
    pub fn create(&self, id: &str) -> io::Result<SpoolFile<'_>> {
        let temp = self.incoming.join(format!("{id}{TEMP_SUFFIX}"));
        let file = OpenOptions::new().write(true).create_new(true).mode(QUEUE_FILE_MODE).open(&temp)?;
        Ok(SpoolFile {
            spool: self,
            temp,
            final_path: self.incoming.join(id),
            out: BufWriter::with_capacity(WRITE_BUFFER, file),
            committed: false,
        })
    }

    /// Tells the queue manager new mail is waiting. Best effort: the
    /// queue's periodic scan picks the file up if this wake-up is lost.
    pub fn wake_queue(&self) {
        if let Err(e) = UnixStream::connect(&self.queue_socket).and_then(|mut s| s.write_all(b"W")) {
            tracing::debug!("queue wake-up via {}: {e}", self.queue_socket.display());
        }
    }
}

/// A queue file being written. Dropping it uncommitted removes it.
#[derive(Debug)]
pub struct SpoolFile<'a> {
    spool: &'a Spool,
    temp: PathBuf,
    final_path: PathBuf,
    out: BufWriter<File>,
    committed: bool,
}

/// Writes go through a buffer of [`WRITE_BUFFER`] octets; writes as large
/// as that go straight to the file.
impl Write for SpoolFile<'_> {
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

impl SpoolFile<'_> {
    /// Makes the file durable under its final name. Only after this returns
    /// `Ok` may anyone be told the message is queued.
    ///
    /// The complete file is renamed first and synced after: a full `fsync`
    /// of the file then commits the file system journal transaction that
    /// also holds the rename, so the directory `fsync` that follows finds
    /// nothing left to commit. One journal commit per message instead of
    /// two, with the same guarantee when this returns: data and name are
    /// both on stable storage. Before that, a crash can leave the name
    /// without the data only on a file system without ordered data; the
    /// checksum then sends the file to `corrupt/`, and nothing was
    /// acknowledged for it.
    pub fn commit(mut self) -> io::Result<()> {
        self.out.flush()?;
        std::fs::rename(&self.temp, &self.final_path)?;
        self.committed = true;
        if let Err(e) = self.out.get_ref().sync_all().and_then(|()| self.spool.incoming_dir.sync_all()) {
            // The client will be told to retry; take the file back so the
            // retry does not become a second copy.
            let _ = std::fs::remove_file(&self.final_path);
            return Err(e);
        }
        Ok(())
    }
}

impl Drop for SpoolFile<'_> {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

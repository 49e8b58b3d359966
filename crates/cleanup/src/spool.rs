//! cleanup's side of the durable write: `incoming/<id>.tmp`, written as
//! the message streams in, then renamed and synced (file and directory)
//! before the 250.
//!
//! The procedure itself is the spool's ([`mortal_proto::spool::TempFile`]);
//! cleanup uses its rename-then-sync commit
//! ([`TempFile::commit_rename_then_sync`], which says why that order).
//! A crash while writing leaves at most a `<id>.tmp` file, which the queue
//! manager removes once the cleanup process that wrote it is gone; it is
//! never delivered.

use mortal_proto::config::Config;
use mortal_proto::queue_id::QueueId;
use mortal_proto::spool::{Create, QueueDir, TempFile};
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

/// The `incoming/` directory, held open so syncing it costs no lookup.
#[derive(Debug)]
pub struct Spool {
    spool: mortal_proto::spool::Spool,
    incoming_dir: File,
    queue_socket: PathBuf,
}

impl Spool {
    pub fn open(config: &Config) -> io::Result<Self> {
        let spool = config.spool();
        let incoming_dir = File::open(spool.dir(QueueDir::Incoming))?;
        Ok(Self { spool, incoming_dir, queue_socket: config.queue_socket() })
    }

    /// Creates `incoming/<id>.tmp`; `O_EXCL` makes a clash an error rather
    /// than a shared file. Dropping the file uncommitted removes it.
    pub fn create(&self, id: &QueueId) -> io::Result<TempFile> {
        self.spool.create_temp(QueueDir::Incoming, id, Create::New)
    }

    /// Makes `file` durable under its final name. Only after this returns
    /// `Ok` may anyone be told the message is queued.
    pub fn commit(&self, file: TempFile) -> io::Result<()> {
        file.commit_rename_then_sync(&self.incoming_dir)
    }

    /// Tells the queue manager new mail is waiting. Best effort: the
    /// queue's periodic scan picks the file up if this wake-up is lost.
    pub fn wake_queue(&self) {
        if let Err(e) = UnixStream::connect(&self.queue_socket).and_then(|mut s| s.write_all(b"W")) {
            tracing::debug!("queue wake-up via {}: {e}", self.queue_socket.display());
        }
    }
}

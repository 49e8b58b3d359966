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
//!
//! A message the filters edited is written twice: the first file is
//! replaced by a second of the same temporary name
//! ([`Spool::restart`]), into which the edited envelope and header and
//! the body read back from the first ([`copy_content`]) are written; only
//! the second is committed, so a message is still synced once, and a crash
//! at any point leaves only a `<id>.tmp`. A held message is committed
//! into `hold/` instead of `incoming/`, by the same rename.

use mortal_proto::config::Config;
use mortal_proto::queue_file;
use mortal_proto::queue_id::QueueId;
use mortal_proto::spool::{Create, QueueDir, TempFile};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

/// Bytes read per call when a first file is read back.
const READ_BACK_CHUNK: usize = 128 * 1024;

/// Where a message is committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// `incoming/`, for the queue manager.
    Incoming,
    /// `hold/`, until an operator releases it (a filter's HOLD).
    Hold,
}

/// The `incoming/` and `hold/` directories, held open so syncing them
/// costs no lookup.
#[derive(Debug)]
pub struct Spool {
    spool: mortal_proto::spool::Spool,
    incoming_dir: File,
    hold_dir: File,
    queue_socket: PathBuf,
}

impl Spool {
    pub fn open(config: &Config) -> io::Result<Self> {
        let spool = config.spool();
        let incoming_dir = File::open(spool.dir(QueueDir::Incoming))?;
        let hold_dir = File::open(spool.dir(QueueDir::Hold))?;
        Ok(Self { spool, incoming_dir, hold_dir, queue_socket: config.queue_socket() })
    }

    /// Octets still free for the spool (`queue_minfree` is compared with it).
    pub fn free_space(&self) -> io::Result<u64> {
        mortal_proto::spool::free_space(&self.incoming_dir)
    }

    /// Creates `incoming/<id>.tmp`; `O_EXCL` makes a clash an error rather
    /// than a shared file. Dropping the file uncommitted removes it.
    pub fn create(&self, id: &QueueId) -> io::Result<TempFile> {
        self.spool.create_temp(QueueDir::Incoming, id, Create::New)
    }

    /// Makes `file` (message `id`'s) durable under its final name in
    /// `to`. Only after this returns `Ok` may anyone be told the message
    /// is queued.
    pub fn commit(&self, mut file: TempFile, id: &QueueId, to: Destination) -> io::Result<()> {
        let dir = match to {
            Destination::Incoming => &self.incoming_dir,
            Destination::Hold => {
                self.spool.redirect(&mut file, QueueDir::Hold, id);
                &self.hold_dir
            }
        };
        file.commit_rename_then_sync(dir)
    }

    /// Replaces message `id`'s unfinished temporary file `first` by a new,
    /// empty one of the same name, and returns the first one opened for
    /// reading at `content_at` (where its content records start). The first
    /// name is removed before the second file is created: the open reader
    /// keeps its bytes, and no moment has two files or a committed one.
    pub fn restart(&self, mut first: TempFile, id: &QueueId, content_at: u64) -> io::Result<(File, TempFile)> {
        first.flush()?;
        let mut reader = File::open(self.spool.temp_path(QueueDir::Incoming, id))?;
        reader.seek(SeekFrom::Start(content_at))?;
        drop(first);
        Ok((reader, self.create(id)?))
    }

    /// Tells the queue manager new mail is waiting. Best effort: the
    /// queue's periodic scan picks the file up if this wake-up is lost.
    pub fn wake_queue(&self) {
        if let Err(e) = UnixStream::connect(&self.queue_socket).and_then(|mut s| s.write_all(b"W")) {
            tracing::debug!("queue wake-up via {}: {e}", self.queue_socket.display());
        }
    }
}

/// Reads the content records from `reader` (as [`Spool::restart`] left it)
/// to its end, skips the first `skip` octets of content and passes the rest
/// to `each`, in pieces.
pub fn copy_content(
    reader: &mut File,
    mut skip: usize,
    mut each: impl FnMut(&[u8]) -> io::Result<()>,
) -> io::Result<()> {
    let mut buf: Vec<u8> = Vec::with_capacity(2 * READ_BACK_CHUNK);
    loop {
        let mut used = 0;
        while let Some((chunk, n)) = queue_file::take_content(&buf[used..]).map_err(io::Error::other)? {
            let dropped = skip.min(chunk.len());
            skip -= dropped;
            if dropped < chunk.len() {
                each(&chunk[dropped..])?;
            }
            used += n;
        }
        buf.drain(..used);
        let filled = buf.len();
        buf.resize(filled + READ_BACK_CHUNK, 0);
        let n = loop {
            match reader.read(&mut buf[filled..]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => break other?,
            }
        };
        buf.truncate(filled + n);
        if n == 0 {
            return if buf.is_empty() && skip == 0 {
                Ok(())
            } else {
                Err(io::Error::new(io::ErrorKind::UnexpectedEof, "queue file ends inside its content"))
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mortal_proto::envelope::{BodyType, ClientInfo, SenderInfo};
    use mortal_proto::queue_file::Encoder;
    use std::time::SystemTime;

    /// Content written in records of every size, read back from every
    /// offset: the skipped part may end inside a record.
    #[test]
    fn content_is_read_back_from_any_offset() {
        let dir = std::env::temp_dir().join(format!("mortal-cleanup-readback-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let content: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let client = ClientInfo {
            addr: "192.0.2.1".parse().unwrap(),
            name: "unknown".into(),
            helo: "c.test".into(),
            protocol: "ESMTP".into(),
            tls: String::new(),
            auth: None,
        };
        let sender = SenderInfo {
            address: String::new(),
            body: BodyType::SevenBit,
            smtputf8: false,
            ret: None,
            envid: String::new(),
        };
        let id = QueueId::new(SystemTime::now(), 1);
        // Only the content records matter here: a stand-in envelope.
        let (mut encoder, _) = Encoder::start(&id, SystemTime::now(), &client, &sender, &[]);
        let mut file_bytes = b"envelope".to_vec();
        for piece in [&content[..10], &content[10..70_000], &content[70_000..70_001], &content[70_001..]] {
            file_bytes.extend(encoder.content(piece));
        }
        let path = dir.join("file");
        std::fs::write(&path, &file_bytes).unwrap();
        for skip in [0, 9, 10, 11, 65_546, 70_000, 70_001, 299_999, 300_000] {
            let mut reader = File::open(&path).unwrap();
            reader.seek(SeekFrom::Start(8)).unwrap();
            let mut got = Vec::new();
            copy_content(&mut reader, skip, |chunk| {
                got.extend_from_slice(chunk);
                Ok(())
            })
            .unwrap();
            assert!(got == content[skip..], "skip {skip}");
        }
        // Cut inside a record: an error, never a short message.
        std::fs::write(&path, &file_bytes[..file_bytes.len() - 1]).unwrap();
        let mut reader = File::open(&path).unwrap();
        reader.seek(SeekFrom::Start(8)).unwrap();
        let cut = copy_content(&mut reader, 0, |_| Ok(())).unwrap_err();
        assert_eq!(cut.kind(), io::ErrorKind::UnexpectedEof);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

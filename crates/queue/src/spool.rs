//! Durable queue-file writes by the queue manager itself: new messages it
//! creates (DSNs) and recipient-state updates.
//!
//! The order is DESIGN.md's: write `<id>.tmp`, `fsync` it, rename it to
//! its final name, `fsync` the directory. (cleanup, which streams each
//! message and keeps its own copy in `crates/cleanup/src/spool.rs`,
//! renames the complete file first and syncs file and directory after;
//! ARCHITECTURE.md, "Differences from DESIGN.md", says why.) A crash at
//! any point leaves either the old state or the new one, never a half
//! file under a queue id; a left-over `incoming/<id>.tmp` is removed by the scan once its
//! writer (the pid in the id) is gone.

use mortal_proto::config::Config;
use mortal_proto::queue_file::QueueFile;
use mortal_proto::queue_id;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The last id made here, so two workers in the same microsecond still
/// get distinct, increasing ids.
static LAST_ID_MICROS: Mutex<u128> = Mutex::new(0);

/// A new queue id for a message created by this process.
pub fn new_id() -> (String, SystemTime) {
    let mut last = LAST_ID_MICROS.lock().unwrap_or_else(|p| p.into_inner());
    // Ids resolve microseconds: compare in those.
    let micros = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_micros().max(*last + 1);
    *last = micros;
    let now = UNIX_EPOCH + Duration::from_micros(u64::try_from(micros).unwrap_or(u64::MAX));
    (queue_id::make(now, std::process::id()), now)
}

/// Writes a new message into `incoming/` durably. The id must be unused
/// (`O_EXCL` on the temporary file makes a clash an error).
pub fn write_incoming(config: &Config, qf: &QueueFile) -> io::Result<()> {
    if !queue_id::is_valid(&qf.id) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "invalid queue id"));
    }
    let dir = config.queue_dir("incoming");
    let path = dir.join(&qf.id);
    if path.exists() {
        return Err(io::ErrorKind::AlreadyExists.into());
    }
    write_durably(&path, &qf.encode(), true)
}

/// Replaces `path` with `bytes` durably (temp file, fsync, rename,
/// directory fsync).
pub fn rewrite(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_durably(path, bytes, false)
}

fn write_durably(path: &Path, bytes: &[u8], exclusive: bool) -> io::Result<()> {
    let name = path.file_name().ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
    let temp = path.with_file_name(format!("{}.tmp", name.to_string_lossy()));
    let mut options = OpenOptions::new();
    // Like cleanup's: the mail group (queue operators) may read.
    options.write(true).mode(0o640);
    if exclusive {
        options.create_new(true);
    } else {
        options.create(true).truncate(true);
    }
    let result = options.open(&temp).and_then(|mut f| {
        f.write_all(bytes)?;
        f.sync_data()
    });
    if let Err(e) = result.and_then(|()| fs::rename(&temp, path)) {
        let _ = fs::remove_file(&temp);
        return Err(e);
    }
    File::open(path.parent().unwrap_or(Path::new(".")))?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_distinct_and_increasing() {
        let ids: Vec<String> = (0..1000).map(|_| new_id().0).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids must strictly increase");
        assert!(ids.iter().all(|id| queue_id::is_valid(id)));
    }
}

//! Queue files the queue manager writes itself: new messages it creates
//! (DSNs) and recipient-state updates.
//!
//! The write is the spool's ([`mortal_proto::spool`]) with its
//! sync-then-rename commit: write `<id>.tmp`, `fsync` it, rename it to its
//! final name, `fsync` the directory. A crash at any point leaves either
//! the old state or the new one, never a half file under a queue id (see
//! [`mortal_proto::spool::TempFile::commit_sync_then_rename`] for why the
//! queue manager, unlike cleanup, syncs before the rename); a left-over
//! `incoming/<id>.tmp` is removed by the scan once its writer (the pid in
//! the id) is gone.

use mortal_proto::config::Config;
use mortal_proto::queue_file::QueueFile;
use mortal_proto::queue_id::QueueId;
use mortal_proto::spool::QueueDir;
use std::io;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The last id made here, so two workers in the same microsecond still
/// get distinct, increasing ids.
static LAST_ID_MICROS: Mutex<u128> = Mutex::new(0);

/// A new queue id for a message created by this process.
pub fn new_id() -> (QueueId, SystemTime) {
    let mut last = LAST_ID_MICROS.lock().unwrap_or_else(|p| p.into_inner());
    // Ids resolve microseconds: compare in those.
    let micros = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_micros().max(*last + 1);
    *last = micros;
    let now = UNIX_EPOCH + Duration::from_micros(u64::try_from(micros).unwrap_or(u64::MAX));
    (QueueId::new(now, std::process::id()), now)
}

/// Writes a new message into `incoming/` durably. The id must be unused
/// (`O_EXCL` on the temporary file makes a clash an error).
pub fn write_incoming(config: &Config, qf: &QueueFile) -> io::Result<()> {
    config.spool().write_new(QueueDir::Incoming, &qf.id, &qf.encode())
}

/// Replaces `active/<id>` with `qf` durably.
pub fn rewrite_active(config: &Config, qf: &QueueFile) -> io::Result<()> {
    config.spool().rewrite(QueueDir::Active, &qf.id, &qf.encode())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_distinct_and_increasing() {
        let ids: Vec<QueueId> = (0..1000).map(|_| new_id().0).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids must strictly increase");
        assert!(ids.iter().all(|id| id.pid() == std::process::id() & 0xFF_FFFF));
    }
}

//! Delivery of one message from `active/`.
//!
//! The file is decoded strictly (a file that fails goes to `corrupt/`,
//! never half-delivered), each pending recipient is handed to the delivery
//! agent, and only when every recipient is done is the file removed. After
//! a partial delivery the new recipient states are written back durably
//! before the file moves to `deferred/`, so a retry never repeats a
//! recipient already delivered. The deferred file's modification time is
//! its next retry time, as in Postfix.

use crate::queue_maildir;
use mortal_proto::config::Config;
use mortal_proto::queue_file::{QueueFile, RecipientState};
use std::fs::{self, File, FileTimes, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

/// How a delivery attempt ended, for the scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every recipient done; the file is gone.
    Removed,
    /// Some recipients wait in `deferred/` for the next attempt.
    Deferred,
    /// The file could not be decoded and was moved to `corrupt/`.
    Corrupt,
    /// The file vanished or could not be moved; nothing more to do now.
    Skipped,
}

/// Delivers `active/<id>`.
pub fn deliver(config: &Config, id: &str) -> Outcome {
    let started = SystemTime::now();
    let active = config.queue_dir("active").join(id);
    let bytes = match fs::read(&active) {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!("warning: {id}: read queue file: {e}");
            return Outcome::Skipped;
        }
    };
    let mut qf = match QueueFile::decode(&bytes) {
        Ok(qf) if qf.id == id => qf,
        Ok(qf) => return quarantine(config, id, &format!("file names queue id {}", qf.id)),
        Err(e) => return quarantine(config, id, &e.to_string()),
    };
    tracing::info!(
        "{id}: from=<{}>, size={}, nrcpt={} (queue active)",
        qf.sender.address,
        qf.content.len(),
        qf.recipients.len()
    );
    for i in 0..qf.recipients.len() {
        if qf.recipients[i].state != RecipientState::Pending {
            continue;
        }
        let rcpt = qf.recipients[i].address.clone();
        let attempt = SystemTime::now();
        let result = queue_maildir::deliver(
            config.maildir_root(),
            &config.server.hostname,
            &qf.sender.address,
            &rcpt,
            &qf.content,
        );
        let (status, dsn, text) = match &result {
            Ok(_) => ("sent", "2.0.0", "delivered to maildir".to_string()),
            Err(e) => ("deferred", "4.2.0", format!("maildir delivery failed: {e}")),
        };
        tracing::info!(
            "{id}: to=<{rcpt}>, relay=local, delay={:.2}, delays={:.2}/0/0/{:.2}, dsn={dsn}, status={status} ({text})",
            secs_since(qf.arrival),
            started.duration_since(qf.arrival).unwrap_or_default().as_secs_f64(),
            secs_since(attempt),
        );
        match result {
            Ok(_) => qf.recipients[i].state = RecipientState::Delivered,
            Err(_) => qf.recipients[i].status = format!("{dsn} {text}"),
        }
    }
    if qf.recipients.iter().all(|r| r.state != RecipientState::Pending) {
        if let Err(e) = fs::remove_file(&active) {
            tracing::warn!("warning: {id}: remove queue file: {e}");
            return Outcome::Skipped;
        }
        tracing::info!("{id}: removed");
        return Outcome::Removed;
    }
    defer(config, &qf, &active)
}

/// Moves a file that failed to decode out of the delivery path.
fn quarantine(config: &Config, id: &str, why: &str) -> Outcome {
    let to = config.queue_dir("corrupt").join(id);
    match fs::rename(config.queue_dir("active").join(id), &to) {
        Ok(()) => tracing::warn!("warning: {id}: corrupt queue file ({why}); moved to corrupt/"),
        Err(e) => tracing::error!("error: {id}: corrupt queue file ({why}) and cannot move it: {e}"),
    }
    Outcome::Corrupt
}

/// Writes back recipient states and statuses, sets the retry time and
/// moves the file to `deferred/`.
fn defer(config: &Config, qf: &QueueFile, active: &Path) -> Outcome {
    let id = &qf.id;
    if let Err(e) = rewrite_durably(active, &qf.encode()) {
        // The old states stay on disk: delivered recipients may get a
        // second copy on retry (at-least-once), but none is lost.
        tracing::warn!("warning: {id}: update recipient states: {e}");
    }
    let delay = backoff(config, qf.arrival);
    let retry_at = SystemTime::now() + delay;
    let result = File::options()
        .write(true)
        .open(active)
        .and_then(|f| f.set_times(FileTimes::new().set_modified(retry_at)))
        .and_then(|()| fs::rename(active, config.queue_dir("deferred").join(id)));
    if let Err(e) = result {
        tracing::warn!("warning: {id}: move to deferred/: {e}");
        return Outcome::Skipped;
    }
    Outcome::Deferred
}

/// Postfix-style back-off: wait about as long as the message has already
/// waited, within `[minimal_backoff, maximal_backoff]`, so retries double.
pub fn backoff(config: &Config, arrival: SystemTime) -> Duration {
    let age = SystemTime::now().duration_since(arrival).unwrap_or_default();
    age.clamp(config.queue.minimal_backoff, config.queue.maximal_backoff)
}

fn rewrite_durably(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let temp = path.with_extension("tmp");
    let mut f = OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&temp)?;
    f.write_all(bytes)?;
    f.sync_data()?;
    fs::rename(&temp, path)?;
    File::open(path.parent().unwrap_or(Path::new(".")))?.sync_all()
}

fn secs_since(t: SystemTime) -> f64 {
    SystemTime::now().duration_since(t).unwrap_or_default().as_secs_f64()
}

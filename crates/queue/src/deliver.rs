//! Delivery of one message from `active/`.
//!
//! The file is decoded strictly (a file that fails goes to `corrupt/`,
//! never half-delivered); its pending recipients are grouped by route
//! ([`crate::route`]) and each batch goes to its agent. Then, in
//! this order: recipients past the queue lifetime are failed; the
//! notifications owed are queued durably ([`crate::bounce`]); and
//! only then is the file removed (every recipient done) or rewritten with
//! the new recipient states and parked in `deferred/`, its modification
//! time being the next retry time, as in Postfix. A crash between those
//! steps repeats a delivery or a notification, never loses one.

use crate::bounce::{self, Entry, Kind};
use crate::route::{self, Agents, RcptResult, Status};
use crate::spool;
use mortal_proto::config::Config;
use mortal_proto::envelope::Notify;
use mortal_proto::queue_file::{DeliveryStatus, QueueFile, QueuedRecipient, RecipientState};
use mortal_proto::queue_id::QueueId;
use mortal_proto::smtp_status::{DsnAction, EnhancedStatus, StatusClass};
use mortal_proto::spool::QueueDir;
use std::fs::{self, File, FileTimes};
use std::io;
use std::path::Path;
use std::time::{Duration, SystemTime};

/// Longest status text kept per recipient (the queue file's text fields
/// hold at most 1024 octets).
const MAX_STATUS: usize = 900;

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

/// What an attempt produced besides its outcome.
#[derive(Debug, Default)]
struct Notices {
    failed: Vec<Entry>,
    succeeded: Vec<Entry>,
}

/// Delivers `active/<id>`. Returns the outcome and whether new mail (a
/// DSN) was queued in `incoming/`.
pub fn deliver(agents: &Agents, id: &QueueId) -> (Outcome, bool) {
    // The JSON log's `queue_id` for every line of this attempt.
    let _message = mortal_libmaster::log::queued_message_span(id).entered();
    let config = &agents.config;
    let started = SystemTime::now();
    let active = config.spool().path(QueueDir::Active, id);
    let bytes = match fs::read(&active) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            tracing::debug!("{id}: queue file vanished before delivery");
            return (Outcome::Skipped, false);
        }
        Err(e) => {
            tracing::warn!("warning: {id}: read queue file: {e}");
            return (Outcome::Skipped, false);
        }
    };
    let mut qf = match QueueFile::decode(&bytes) {
        Ok(qf) if qf.id == *id => qf,
        Ok(qf) => return (quarantine(config, id, &format!("file names queue id {}", qf.id)), false),
        Err(e) => return (quarantine(config, id, &e.to_string()), false),
    };
    tracing::info!(
        "{id}: from=<{}>, size={}, nrcpt={} (queue active)",
        qf.sender.address,
        qf.content.len(),
        qf.recipients.len()
    );
    let mut notices = Notices::default();
    for batch in route::plan(config, &qf) {
        let attempt = SystemTime::now();
        let report = agents.deliver(&qf, &batch);
        for (&i, result) in batch.rcpts.iter().zip(&report.results) {
            let r = &qf.recipients[i];
            let word = match result.status {
                Status::Sent => "sent",
                Status::Deferred => "deferred",
                Status::Bounced => "bounced",
            };
            log_line(&qf, r, &report.relay, started, attempt, result.dsn, &format!("{word} ({})", result.text));
            apply(&mut qf.recipients[i], i, result, &mut notices);
        }
    }
    expire(config, &mut qf, started, &mut notices);
    let mut queued = notify(config, &mut qf, &notices);
    queued |= warn_delay(config, &mut qf, started);
    (finish(config, &qf, &active), queued)
}

/// Records one result in the recipient's persisted state.
fn apply(r: &mut QueuedRecipient, i: usize, result: &RcptResult, notices: &mut Notices) {
    r.status = Some(DeliveryStatus { code: result.dsn, text: bounded(&result.text) });
    let entry = |action| Entry {
        rcpt: i,
        action,
        status: result.dsn,
        text: result.text.clone(),
        diagnostic: result.diagnostic.clone(),
        remote_mta: result.remote_mta.clone(),
    };
    match result.status {
        Status::Sent => {
            r.state = RecipientState::Delivered;
            if let Some(action) = result.success_action {
                notices.succeeded.push(entry(action));
            }
        }
        Status::Deferred => {}
        Status::Bounced => {
            r.state = RecipientState::Failed;
            notices.failed.push(entry(DsnAction::Failed));
        }
    }
}

/// Fails every recipient still pending once the message is older than its
/// lifetime (`bounce_queue_lifetime` for mail from `<>`, which is dropped).
fn expire(config: &Config, qf: &mut QueueFile, started: SystemTime, notices: &mut Notices) {
    let bounce = qf.sender.address.is_empty();
    let lifetime = if bounce { config.queue.bounce_queue_lifetime } else { config.queue.queue_lifetime };
    if started.duration_since(qf.arrival).unwrap_or_default() < lifetime {
        return;
    }
    for i in 0..qf.recipients.len() {
        if qf.recipients[i].state != RecipientState::Pending {
            continue;
        }
        let (dsn, text) = last_status(&qf.recipients[i]);
        let what =
            if bounce { "expired, dropped (mail from <> is never returned)" } else { "expired, returned to sender" };
        log_line(qf, &qf.recipients[i], "none", started, started, dsn, &format!("{what} ({text})"));
        qf.recipients[i].state = RecipientState::Failed;
        let entry = Entry { rcpt: i, action: DsnAction::Failed, status: dsn, text, diagnostic: None, remote_mta: None };
        notices.failed.push(entry);
    }
}

/// Queues the failure and success notifications. A failure notice that
/// cannot be queued puts its recipients back to pending, so the next
/// attempt bounces them again: a failure is never silently lost.
fn notify(config: &Config, qf: &mut QueueFile, notices: &Notices) -> bool {
    let mut queued = false;
    if !notices.failed.is_empty() {
        match bounce::send(config, qf, Kind::Failure, &notices.failed) {
            Ok(id) => queued |= id.is_some(),
            Err(e) => {
                tracing::warn!("warning: {}: cannot queue non-delivery notification: {e}; will retry", qf.id);
                for e in &notices.failed {
                    qf.recipients[e.rcpt].state = RecipientState::Pending;
                }
            }
        }
    }
    if !notices.succeeded.is_empty() {
        match bounce::send(config, qf, Kind::Success, &notices.succeeded) {
            Ok(id) => queued |= id.is_some(),
            // The mail is delivered; a lost success report is the lesser harm
            // than delivering it again.
            Err(e) => tracing::warn!("warning: {}: cannot queue delivery status notification: {e}", qf.id),
        }
    }
    queued
}

/// Sends the one delay notice a message gets, once it has waited
/// `delay_warning_time`. The notified recipients' NOTIFY loses DELAY (kept
/// explicit for the rest), which is how the file remembers the notice.
fn warn_delay(config: &Config, qf: &mut QueueFile, started: SystemTime) -> bool {
    let after = config.queue.delay_warning_time;
    if after.is_zero() || started.duration_since(qf.arrival).unwrap_or_default() < after {
        return false;
    }
    let entries: Vec<Entry> = (0..qf.recipients.len())
        .filter(|&i| qf.recipients[i].state == RecipientState::Pending && Kind::Delay.wanted(qf.recipients[i].notify))
        .map(|i| {
            let (status, text) = last_status(&qf.recipients[i]);
            Entry { rcpt: i, action: DsnAction::Delayed, status, text, diagnostic: None, remote_mta: None }
        })
        .collect();
    if entries.is_empty() {
        return false;
    }
    match bounce::send(config, qf, Kind::Delay, &entries) {
        Ok(id) => {
            for e in &entries {
                qf.recipients[e.rcpt].notify = without_delay(qf.recipients[e.rcpt].notify);
            }
            id.is_some()
        }
        Err(e) => {
            tracing::warn!("warning: {}: cannot queue delay notification: {e}", qf.id);
            false
        }
    }
}

/// NOTIFY after the delay notice: the same wishes, without DELAY.
fn without_delay(n: Notify) -> Notify {
    let rest = Notify { never: false, success: n.success, failure: n.wants_failure(), delay: false };
    if rest.is_default() { Notify { never: true, ..Notify::default() } } else { rest }
}

/// Removes a finished file, or parks it in `deferred/`.
fn finish(config: &Config, qf: &QueueFile, active: &Path) -> Outcome {
    let id = &qf.id;
    if qf.recipients.iter().all(|r| r.state != RecipientState::Pending) {
        if let Err(e) = fs::remove_file(active) {
            tracing::warn!("warning: {id}: remove queue file: {e}");
            return Outcome::Skipped;
        }
        tracing::info!("{id}: removed");
        return Outcome::Removed;
    }
    if let Err(e) = spool::rewrite_active(config, qf) {
        // The old states stay on disk: delivered recipients may get a
        // second copy on retry (at-least-once), but none is lost.
        tracing::warn!("warning: {id}: update recipient states: {e}");
    }
    let retry_at = SystemTime::now() + backoff(config, qf.arrival);
    let result = File::options()
        .write(true)
        .open(active)
        .and_then(|f| f.set_times(FileTimes::new().set_modified(retry_at)))
        .and_then(|()| fs::rename(active, config.spool().path(QueueDir::Deferred, id)));
    if let Err(e) = result {
        tracing::warn!("warning: {id}: move to deferred/: {e}");
        return Outcome::Skipped;
    }
    Outcome::Deferred
}

/// Moves a file that failed to decode out of the delivery path.
fn quarantine(config: &Config, id: &QueueId, why: &str) -> Outcome {
    let spool = config.spool();
    let to = spool.path(QueueDir::Corrupt, id);
    match fs::rename(spool.path(QueueDir::Active, id), &to) {
        Ok(()) => tracing::warn!("warning: {id}: corrupt queue file ({why}); moved to corrupt/"),
        Err(e) => tracing::error!("error: {id}: corrupt queue file ({why}) and cannot move it: {e}"),
    }
    Outcome::Corrupt
}

/// Postfix-style back-off: wait about as long as the message has already
/// waited, within `[minimal_backoff, maximal_backoff]`, so retries double.
pub fn backoff(config: &Config, arrival: SystemTime) -> Duration {
    let age = SystemTime::now().duration_since(arrival).unwrap_or_default();
    age.clamp(config.queue.minimal_backoff, config.queue.maximal_backoff)
}

/// `<id>: to=<rcpt>, [orig_to=<...>, ]relay=..., delay=..., delays=..., dsn=..., status=...`
fn log_line(
    qf: &QueueFile,
    r: &QueuedRecipient,
    relay: &str,
    started: SystemTime,
    attempt: SystemTime,
    dsn: EnhancedStatus,
    status: &str,
) {
    let orig = match r.orcpt.split_once(';') {
        Some((_, o)) if !o.eq_ignore_ascii_case(&r.address) => format!(", orig_to=<{o}>"),
        _ => String::new(),
    };
    tracing::info!(
        "{}: to=<{}>{orig}, relay={relay}, delay={:.2}, delays={:.2}/0/0/{:.2}, dsn={dsn}, status={status}",
        qf.id,
        r.address,
        secs_since(qf.arrival),
        started.duration_since(qf.arrival).unwrap_or_default().as_secs_f64(),
        secs_since(attempt),
    );
}

/// `4.4.7`: delivery time expired (RFC 3463), for a recipient that never
/// got as far as an attempt.
const EXPIRED: EnhancedStatus = EnhancedStatus::new(StatusClass::Persistent, 4, 7);

/// The code and text of a recipient's last attempt, for expiry and delay
/// notices.
fn last_status(r: &QueuedRecipient) -> (EnhancedStatus, String) {
    match &r.status {
        Some(s) => (s.code, s.text.clone()),
        None => (EXPIRED, "delivery time expired".into()),
    }
}

fn bounded(text: &str) -> String {
    text[..text.floor_char_boundary(MAX_STATUS)].to_owned()
}

fn secs_since(t: SystemTime) -> f64 {
    SystemTime::now().duration_since(t).unwrap_or_default().as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_notice_is_remembered_in_notify() {
        let after = without_delay(Notify::default());
        assert!(after.failure && !after.delay && !Kind::Delay.wanted(after) && Kind::Failure.wanted(after));
        let only_delay = without_delay(Notify { delay: true, ..Notify::default() });
        assert!(only_delay.never && !Kind::Failure.wanted(only_delay));
        assert!(only_delay.is_valid() && after.is_valid());
    }

    #[test]
    fn result_is_stored_as_code_and_text() {
        let mut r = QueuedRecipient {
            address: "b@y.test".into(),
            state: RecipientState::Pending,
            notify: Notify::default(),
            orcpt: String::new(),
            status: None,
        };
        assert_eq!(last_status(&r), (EXPIRED, "delivery time expired".into()));
        let code = EnhancedStatus::new(StatusClass::Persistent, 4, 1);
        let result = RcptResult::new(Status::Deferred, code, format!("connect to x: {}", "é".repeat(600)));
        let mut notices = Notices::default();
        apply(&mut r, 0, &result, &mut notices);
        let stored = r.status.as_ref().unwrap();
        assert_eq!((stored.code, stored.text.len()), (code, 900));
        assert!(stored.text.starts_with("connect to x: é"));
        assert_eq!(last_status(&r).0.to_string(), "4.4.1");
        assert!(notices.failed.is_empty() && r.state == RecipientState::Pending);
    }
}

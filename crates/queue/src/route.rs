//! Routing: which agent gets each recipient, and how many deliveries one
//! destination may have at once.
//!
//! A recipient's route is its domain's `[delivery.routes]` entry or the
//! default `[delivery] transport`. Pending recipients are grouped into
//! batches, one per route and destination, at most
//! [`MAX_BATCH_RECIPIENTS`] each, so one LMTP or SMTP transaction carries
//! many recipients. A destination is the next hop for LMTP and SMTP, and
//! the route plus the recipient domain for local routes; `[queue]
//! destination_concurrency_limit` caps deliveries to each at once, across
//! all workers (Postfix's per-destination concurrency).
//!
//! Every agent answers per recipient with a [`RcptResult`]: sent,
//! deferred (4xx) or bounced (5xx).

use crate::agent::client::{self, Cache, Failure, RcptReply};
use crate::agent::{discard, lmtp, maildir, pipe, smtp};
use mortal_proto::config::{Config, Route};
use mortal_proto::queue_file::{QueueFile, RecipientState};
use mortal_proto::smtp_status::{DsnAction, EnhancedStatus, ReplyClass, StatusClass};
use std::collections::HashMap;
use std::sync::{Condvar, Mutex};

/// Recipients in one LMTP/SMTP transaction (Postfix's
/// `*_destination_recipient_limit` default).
pub const MAX_BATCH_RECIPIENTS: usize = 50;

/// How one recipient's delivery attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Sent,
    Deferred,
    Bounced,
}

/// One recipient's result, with what a log line and a DSN need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RcptResult {
    pub status: Status,
    /// RFC 3463 code.
    pub dsn: EnhancedStatus,
    /// Human text: `250 2.0.0 Ok`, `host X said: 550 ... (in reply to RCPT TO command)`.
    pub text: String,
    /// RFC 3464 Diagnostic-Code (`smtp; 550 5.1.1 ...`), when a peer answered.
    pub diagnostic: Option<String>,
    /// RFC 3464 Remote-MTA (`dns; 127.0.0.1`), for network agents.
    pub remote_mta: Option<String>,
    /// The DSN action a NOTIFY=SUCCESS recipient is owed: `delivered` by
    /// final delivery, `relayed` by a relay to a server without DSN, none
    /// when the next hop took over DSN duty (RFC 3461 5.2).
    pub success_action: Option<DsnAction>,
}

impl RcptResult {
    pub fn new(status: Status, dsn: EnhancedStatus, text: impl Into<String>) -> Self {
        Self { status, dsn, text: text.into(), diagnostic: None, remote_mta: None, success_action: None }
    }

    /// A delivery that ends here (Maildir, pipe, LMTP, discard).
    pub fn delivered(text: impl Into<String>) -> Self {
        Self {
            success_action: Some(DsnAction::Delivered),
            ..Self::new(Status::Sent, EnhancedStatus::undefined(StatusClass::Success), text)
        }
    }

    /// A session failure, as every recipient of the batch sees it.
    pub fn from_failure(f: &Failure) -> Self {
        Self {
            diagnostic: f.reply.as_ref().map(|r| format!("smtp; {}", r.text())),
            ..Self::new(Status::Deferred, f.dsn, &f.text)
        }
    }

    /// A server's answer for one recipient.
    pub fn from_reply(r: &RcptReply, peer: &str, remote_mta: &str, success_action: Option<DsnAction>) -> Self {
        let status = match r.reply.code.class() {
            ReplyClass::PositiveCompletion => Status::Sent,
            ReplyClass::TransientNegative => Status::Deferred,
            // A 3yz where a final answer was due is as good as a 5yz.
            ReplyClass::PositiveIntermediate | ReplyClass::PermanentNegative => Status::Bounced,
        };
        let text = if status == Status::Sent {
            r.reply.text()
        } else {
            format!("host {peer} said: {} (in reply to {} command)", r.reply.text(), r.stage)
        };
        Self {
            diagnostic: Some(format!("smtp; {}", r.reply.text())),
            remote_mta: Some(remote_mta.to_owned()),
            success_action: if status == Status::Sent { success_action } else { None },
            ..Self::new(status, r.reply.enhanced(), text)
        }
    }
}

/// An agent's answer for a batch: the relay it names in the log, and one
/// result per recipient, in batch order.
#[derive(Debug, Clone)]
pub struct Report {
    pub relay: String,
    pub results: Vec<RcptResult>,
}

/// Recipients of one message going to one route and destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub route: Route,
    pub destination: String,
    /// Indices into the queue file's recipients.
    pub rcpts: Vec<usize>,
}

/// Groups the pending recipients of `qf` into batches, in recipient order.
pub fn plan(config: &Config, qf: &QueueFile) -> Vec<Batch> {
    let mut batches: Vec<Batch> = Vec::new();
    for (i, r) in qf.recipients.iter().enumerate() {
        if r.state != RecipientState::Pending {
            continue;
        }
        let domain = r.address.rsplit_once('@').map(|(_, d)| d.to_lowercase()).unwrap_or_default();
        let route = config.route_for(&domain).clone();
        let destination = match route {
            Route::Lmtp(_) | Route::Smtp(_) => route.to_string(),
            Route::Maildir | Route::Discard | Route::Pipe => format!("{route}:{domain}"),
        };
        let limit = match route {
            Route::Lmtp(_) | Route::Smtp(_) => MAX_BATCH_RECIPIENTS,
            // Local agents deliver one recipient at a time anyway; one per
            // batch keeps each under the destination limit on its own.
            Route::Maildir | Route::Discard | Route::Pipe => 1,
        };
        match batches.iter_mut().find(|b| b.destination == destination && b.rcpts.len() < limit) {
            Some(b) => b.rcpts.push(i),
            None => batches.push(Batch { route, destination, rcpts: vec![i] }),
        }
    }
    batches
}

/// Per-destination delivery slots shared by all workers.
#[derive(Debug)]
pub struct Slots {
    busy: Mutex<HashMap<String, u32>>,
    freed: Condvar,
    limit: u32,
}

impl Slots {
    pub fn new(limit: u32) -> Self {
        Self { busy: Mutex::new(HashMap::new()), freed: Condvar::new(), limit: limit.max(1) }
    }

    /// Waits for a free slot for `destination`. A worker holds at most one
    /// slot at a time and every delivery is bounded by its timeouts, so
    /// the wait ends.
    pub fn acquire(&self, destination: &str) -> SlotGuard<'_> {
        let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        while busy.get(destination).copied().unwrap_or(0) >= self.limit {
            busy = self.freed.wait(busy).unwrap_or_else(|p| p.into_inner());
        }
        *busy.entry(destination.to_owned()).or_default() += 1;
        SlotGuard { slots: self, destination: destination.to_owned() }
    }
}

/// Releases its slot when dropped, also if the delivery panicked.
#[derive(Debug)]
pub struct SlotGuard<'a> {
    slots: &'a Slots,
    destination: String,
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        let mut busy = self.slots.busy.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = busy.get_mut(&self.destination) {
            *n -= 1;
            if *n == 0 {
                busy.remove(&self.destination);
            }
        }
        self.slots.freed.notify_all();
    }
}

/// Everything the workers share: the configuration, destination slots,
/// idle LMTP/SMTP sessions and the TLS client settings.
#[derive(Debug)]
pub struct Agents {
    pub config: Config,
    pub slots: Slots,
    pub cache: Cache,
    pub tls: smtp::TlsClients,
}

impl Agents {
    pub fn new(config: Config) -> Self {
        Self {
            slots: Slots::new(config.queue.destination_concurrency_limit),
            cache: Cache::new(config.delivery.connection_reuse_time),
            tls: smtp::TlsClients::default(),
            config,
        }
    }

    pub fn timeouts(&self) -> client::Timeouts {
        client::Timeouts {
            connect: self.config.delivery.connect_timeout,
            command: self.config.delivery.command_timeout,
        }
    }

    /// Delivers one batch, holding a slot of its destination meanwhile.
    pub fn deliver(&self, qf: &QueueFile, batch: &Batch) -> Report {
        let _slot = self.slots.acquire(&batch.destination);
        match &batch.route {
            Route::Maildir => maildir::deliver_batch(&self.config, qf, &batch.rcpts),
            Route::Discard => discard::deliver(&batch.rcpts),
            Route::Pipe => pipe::deliver(&self.config, qf, &batch.rcpts),
            Route::Lmtp(hop) => lmtp::deliver(self, hop, &batch.destination, qf, &batch.rcpts),
            Route::Smtp(addr) => smtp::deliver(self, *addr, &batch.destination, qf, &batch.rcpts),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mortal_proto::queue_file::QueuedRecipient;
    use std::path::Path;

    #[test]
    fn batches_by_route_and_destination() {
        let text = "[delivery]\ntransport = \"lmtp:inet:127.0.0.1:24\"\n[delivery.routes]\n\"a.test\" = \"maildir\"\n\"r.test\" = \"smtp:inet:127.0.0.1:25\"\n";
        let config = Config::parse(text, Path::new("/m.toml")).unwrap();
        let rcpt = |a: &str, state| QueuedRecipient {
            address: a.into(),
            state,
            notify: Default::default(),
            orcpt: String::new(),
            status: None,
        };
        let qf = QueueFile {
            id: "0000000010000100000A".parse().unwrap(),
            arrival: std::time::UNIX_EPOCH,
            client: mortal_proto::envelope::ClientInfo {
                addr: std::net::Ipv4Addr::LOCALHOST.into(),
                name: String::new(),
                helo: String::new(),
                protocol: String::new(),
                tls: String::new(),
            },
            sender: mortal_proto::envelope::SenderInfo {
                address: String::new(),
                body: mortal_proto::envelope::BodyType::SevenBit,
                smtputf8: false,
                ret: None,
                envid: String::new(),
            },
            recipients: vec![
                rcpt("x@b.test", RecipientState::Pending),
                rcpt("y@a.test", RecipientState::Pending),
                rcpt("z@c.test", RecipientState::Pending),
                rcpt("done@c.test", RecipientState::Delivered),
                rcpt("w@R.TEST", RecipientState::Pending),
                rcpt("v@a.test", RecipientState::Pending),
            ],
            content: Vec::new(),
        };
        let batches = plan(&config, &qf);
        let summary: Vec<(String, Vec<usize>)> =
            batches.iter().map(|b| (b.destination.clone(), b.rcpts.clone())).collect();
        assert_eq!(
            summary,
            vec![
                ("lmtp:inet:127.0.0.1:24".to_owned(), vec![0, 2]),
                ("maildir:a.test".to_owned(), vec![1]),
                ("smtp:inet:127.0.0.1:25".to_owned(), vec![4]),
                ("maildir:a.test".to_owned(), vec![5]),
            ]
        );
    }

    #[test]
    fn slots_cap_each_destination() {
        let slots = std::sync::Arc::new(Slots::new(2));
        let running = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let peak = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let threads: Vec<_> = (0..6)
            .map(|_| {
                let (slots, running, peak) = (slots.clone(), running.clone(), peak.clone());
                std::thread::spawn(move || {
                    let _g = slots.acquire("d");
                    let now = running.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                    peak.fetch_max(now, std::sync::atomic::Ordering::SeqCst);
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    running.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(peak.load(std::sync::atomic::Ordering::SeqCst), 2);
    }
}

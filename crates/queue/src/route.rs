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

use crate::agent::{discard, maildir, transport};
use mortal_proto::config::{Config, Route};
use mortal_proto::queue_file::{QueueFile, RecipientState};
use std::collections::HashMap;
use std::sync::{Condvar, Mutex};

pub use mortal_proto::delivery::{RcptResult, Report, Status};

/// Recipients in one LMTP/SMTP transaction (Postfix's
/// `*_destination_recipient_limit` default).
pub const MAX_BATCH_RECIPIENTS: usize = 50;

/// What `destination_concurrency_limit` counts deliveries against, and
/// what a kept agent connection is kept for: the next hop of a network
/// route (every domain routed there shares it), or the recipient domain
/// on a local route (Postfix's destination of the local transports).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Destination {
    NextHop(Route),
    /// The route and the recipient domain, in lower case.
    Domain(Route, String),
}

impl Destination {
    /// The destination of a recipient in `domain` (lower case) routed to
    /// `route`.
    pub fn of(route: &Route, domain: &str) -> Self {
        match route {
            Route::Lmtp(_) | Route::Smtp(_) => Destination::NextHop(route.clone()),
            Route::Maildir | Route::Discard | Route::Pipe => Destination::Domain(route.clone(), domain.to_owned()),
        }
    }
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Destination::NextHop(route) => write!(f, "{route}"),
            Destination::Domain(route, domain) => write!(f, "{route}:{domain}"),
        }
    }
}

/// Recipients of one message going to one route and destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub route: Route,
    pub destination: Destination,
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
        let destination = Destination::of(&route, &domain);
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
    busy: Mutex<HashMap<Destination, u32>>,
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
    pub fn acquire(&self, destination: &Destination) -> SlotGuard<'_> {
        let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        while busy.get(destination).copied().unwrap_or(0) >= self.limit {
            busy = self.freed.wait(busy).unwrap_or_else(|p| p.into_inner());
        }
        *busy.entry(destination.clone()).or_default() += 1;
        SlotGuard { slots: self, destination: destination.clone() }
    }
}

/// Releases its slot when dropped, also if the delivery panicked.
#[derive(Debug)]
pub struct SlotGuard<'a> {
    slots: &'a Slots,
    destination: Destination,
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
/// and the connections to the delivery agents kept for reuse.
#[derive(Debug)]
pub struct Agents {
    pub config: Config,
    pub slots: Slots,
    pub conns: transport::Conns,
}

impl Agents {
    pub fn new(config: Config) -> Self {
        Self {
            slots: Slots::new(config.queue.destination_concurrency_limit),
            conns: transport::Conns::new(config.delivery.connection_reuse_time),
            config,
        }
    }

    /// Delivers one batch, holding a slot of its destination meanwhile.
    /// Maildir and discard are local and run here; every route that needs
    /// a network connection or a program goes to its delivery agent.
    pub fn deliver(&self, qf: &QueueFile, batch: &Batch) -> Report {
        let _slot = self.slots.acquire(&batch.destination);
        match &batch.route {
            Route::Maildir => maildir::deliver_batch(&self.config, qf, &batch.rcpts),
            Route::Discard => discard::deliver(&batch.rcpts),
            Route::Lmtp(_) | Route::Smtp(_) | Route::Pipe => transport::deliver(self, batch, qf),
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
                auth: None,
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
            batches.iter().map(|b| (b.destination.to_string(), b.rcpts.clone())).collect();
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
                    let _g = slots.acquire(&Destination::Domain(Route::Discard, "d.test".into()));
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

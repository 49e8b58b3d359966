//! The anvil service's counting table, without I/O: per client address,
//! the connections open now and the connections and messages in the
//! current `rate_time_unit`, like Postfix's `anvil(8)`.
//!
//! Rates are counted in fixed windows: a client's window starts at its
//! first event and lasts one `rate_time_unit`; the first event after that
//! starts a new window at zero (Postfix's scheme: cheap, and a client can
//! at worst get twice the limit across a window edge).
//!
//! Memory is bounded: at most `capacity` clients ([`MAX_CLIENTS`] in the
//! daemon). An entry with no open connection is dropped once its window
//! has passed ([`AnvilTable::sweep`], run by the daemon every unit). When
//! the table is full all the same, idle entries are evicted oldest first,
//! [`EVICT_FRACTION`] of the capacity at a time so the cost is amortised;
//! an entry with an open connection is never evicted, so concurrency
//! counts stay exact. If even that finds no room (more clients connected
//! at once than the capacity), the new client is [`Status::Untracked`]:
//! smtpd then applies no limit to it rather than refuse mail.

use mortal_proto::anvil::{AnvilReply, LoginDigest, Op, Status, Subject};
use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Clients tracked at once by the daemon. An entry costs about 100 octets
/// with the hash table's overhead, so the table stays near 10 MiB.
pub const MAX_CLIENTS: usize = 100_000;
/// When the table is full of recent clients, this share of the capacity
/// (the least recently seen idle ones) is evicted at once.
pub const EVICT_FRACTION: usize = 10;

#[derive(Debug, Clone)]
struct Entry {
    /// Connections open now (leases held by smtpd sessions).
    open: u32,
    window_start: Instant,
    connections: u32,
    messages: u32,
    /// Failed AUTH commands in the window.
    auth_failures: u32,
    /// Recipients in the window (logins only).
    recipients: u32,
    last_seen: Instant,
}

/// The table.
#[derive(Debug)]
pub struct AnvilTable {
    /// Client addresses and, for the per-login limits, AUTH logins.
    clients: HashMap<Subject, Entry>,
    unit: Duration,
    capacity: usize,
}

impl AnvilTable {
    pub fn new(unit: Duration, capacity: usize) -> Self {
        Self { clients: HashMap::new(), unit, capacity: capacity.max(1) }
    }

    /// A connection from `addr` opened; it stays counted until
    /// [`AnvilTable::disconnect`], which the caller must call exactly once
    /// for each `connect` answered [`Status::Counted`].
    pub fn connect(&mut self, addr: IpAddr, now: Instant) -> AnvilReply {
        let Some(entry) = self.entry(Subject::Client(addr), now) else { return untracked(Op::Connect) };
        entry.open = entry.open.saturating_add(1);
        entry.connections = entry.connections.saturating_add(1);
        AnvilReply { op: Op::Connect, status: Status::Counted, count: entry.open, rate: entry.connections }
    }

    /// A message (MAIL) from `addr`.
    pub fn message(&mut self, addr: IpAddr, now: Instant) -> AnvilReply {
        let Some(entry) = self.entry(Subject::Client(addr), now) else { return untracked(Op::Message) };
        entry.messages = entry.messages.saturating_add(1);
        AnvilReply { op: Op::Message, status: Status::Counted, count: entry.open, rate: entry.messages }
    }

    /// A failed AUTH from `addr`.
    pub fn auth_failure(&mut self, addr: IpAddr, now: Instant) -> AnvilReply {
        let Some(entry) = self.entry(Subject::Client(addr), now) else { return untracked(Op::AuthFailure) };
        entry.auth_failures = entry.auth_failures.saturating_add(1);
        AnvilReply { op: Op::AuthFailure, status: Status::Counted, count: entry.open, rate: entry.auth_failures }
    }

    /// `addr`'s AUTH failures in its current window, counting nothing.
    pub fn auth_failures(&mut self, addr: IpAddr, now: Instant) -> AnvilReply {
        let Some(entry) = self.entry(Subject::Client(addr), now) else { return untracked(Op::AuthFailures) };
        AnvilReply { op: Op::AuthFailures, status: Status::Counted, count: entry.open, rate: entry.auth_failures }
    }

    /// A message (MAIL) from `login`, wherever it connected from.
    pub fn user_message(&mut self, login: LoginDigest, now: Instant) -> AnvilReply {
        let Some(entry) = self.entry(Subject::Login(login), now) else { return untracked(Op::UserMessage) };
        entry.messages = entry.messages.saturating_add(1);
        AnvilReply { op: Op::UserMessage, status: Status::Counted, count: 0, rate: entry.messages }
    }

    /// A recipient (RCPT) from `login`.
    pub fn user_recipient(&mut self, login: LoginDigest, now: Instant) -> AnvilReply {
        let Some(entry) = self.entry(Subject::Login(login), now) else { return untracked(Op::UserRecipient) };
        entry.recipients = entry.recipients.saturating_add(1);
        AnvilReply { op: Op::UserRecipient, status: Status::Counted, count: 0, rate: entry.recipients }
    }

    /// A counted connection from `addr` closed.
    pub fn disconnect(&mut self, addr: IpAddr, now: Instant) {
        if let Some(entry) = self.clients.get_mut(&Subject::Client(addr)) {
            entry.open = entry.open.saturating_sub(1);
            entry.last_seen = now;
        }
    }

    /// Drops every idle entry whose window has passed.
    pub fn sweep(&mut self, now: Instant) {
        let unit = self.unit;
        self.clients.retain(|_, e| e.open > 0 || now.saturating_duration_since(e.window_start) < unit);
    }

    pub fn len(&self) -> usize {
        self.clients.len()
    }

    /// The entry for `addr`, created if there is room, its window rolled
    /// over if it has passed.
    fn entry(&mut self, subject: Subject, now: Instant) -> Option<&mut Entry> {
        if !self.clients.contains_key(&subject) && self.clients.len() >= self.capacity {
            self.make_room(now);
            if self.clients.len() >= self.capacity {
                return None;
            }
        }
        let unit = self.unit;
        let entry = self.clients.entry(subject).or_insert(Entry {
            open: 0,
            window_start: now,
            connections: 0,
            messages: 0,
            auth_failures: 0,
            recipients: 0,
            last_seen: now,
        });
        if now.saturating_duration_since(entry.window_start) >= unit {
            entry.window_start = now;
            entry.connections = 0;
            entry.messages = 0;
            entry.auth_failures = 0;
            entry.recipients = 0;
        }
        entry.last_seen = now;
        Some(entry)
    }

    fn make_room(&mut self, now: Instant) {
        self.sweep(now);
        if self.clients.len() < self.capacity {
            return;
        }
        let mut idle: Vec<(Instant, Subject)> =
            self.clients.iter().filter(|(_, e)| e.open == 0).map(|(a, e)| (e.last_seen, *a)).collect();
        idle.sort_unstable_by_key(|(seen, _)| *seen);
        let batch = (self.capacity / EVICT_FRACTION).max(1);
        for (_, addr) in idle.into_iter().take(batch) {
            self.clients.remove(&addr);
        }
    }
}

fn untracked(op: Op) -> AnvilReply {
    AnvilReply { op, status: Status::Untracked, count: 0, rate: 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UNIT: Duration = Duration::from_secs(60);

    fn ip(n: u32) -> IpAddr {
        IpAddr::V4(n.into())
    }

    fn client(subject: &Subject) -> Option<IpAddr> {
        match subject {
            Subject::Client(addr) => Some(*addr),
            Subject::Login(_) => None,
        }
    }

    fn counts(r: AnvilReply) -> (Status, u32, u32) {
        (r.status, r.count, r.rate)
    }

    #[test]
    fn concurrency_follows_connects_and_disconnects() {
        let t0 = Instant::now();
        let mut t = AnvilTable::new(UNIT, 10);
        assert_eq!(counts(t.connect(ip(1), t0)), (Status::Counted, 1, 1));
        assert_eq!(counts(t.connect(ip(1), t0)), (Status::Counted, 2, 2));
        assert_eq!(counts(t.connect(ip(2), t0)), (Status::Counted, 1, 1));
        t.disconnect(ip(1), t0);
        assert_eq!(counts(t.connect(ip(1), t0)), (Status::Counted, 2, 3));
        // A disconnect for an unknown client changes nothing.
        t.disconnect(ip(9), t0);
        assert_eq!(t.len(), 2);
    }

    /// A login's messages and recipients count per window, apart from any
    /// client address's.
    #[test]
    fn logins_count_apart_from_clients() {
        let t0 = Instant::now();
        let mut t = AnvilTable::new(UNIT, 10);
        let alice = LoginDigest::of("alice");
        assert_eq!(counts(t.user_message(alice, t0)), (Status::Counted, 0, 1));
        assert_eq!(counts(t.user_message(alice, t0)), (Status::Counted, 0, 2));
        for n in 1..=3 {
            assert_eq!(counts(t.user_recipient(alice, t0)), (Status::Counted, 0, n));
        }
        assert_eq!(t.user_message(LoginDigest::of("bob"), t0).rate, 1);
        assert_eq!(t.message(ip(1), t0).rate, 1);
        assert_eq!(t.user_message(alice, t0 + UNIT).rate, 1);
        assert_eq!(t.user_recipient(alice, t0 + UNIT).rate, 1);
    }

    /// AUTH failures count per window; asking for them counts nothing.
    #[test]
    fn auth_failures_count_per_window() {
        let t0 = Instant::now();
        let mut t = AnvilTable::new(UNIT, 10);
        assert_eq!(counts(t.auth_failures(ip(1), t0)), (Status::Counted, 0, 0));
        for n in 1..=3 {
            assert_eq!(counts(t.auth_failure(ip(1), t0)), (Status::Counted, 0, n));
        }
        assert_eq!(counts(t.auth_failures(ip(1), t0)), (Status::Counted, 0, 3));
        assert_eq!(t.auth_failures(ip(2), t0).rate, 0);
        assert_eq!(counts(t.auth_failures(ip(1), t0 + UNIT)), (Status::Counted, 0, 0));
    }

    #[test]
    fn rates_count_per_window() {
        let t0 = Instant::now();
        let mut t = AnvilTable::new(UNIT, 10);
        for n in 0..3 {
            assert_eq!(counts(t.message(ip(1), t0 + Duration::from_secs(n))), (Status::Counted, 0, n as u32 + 1));
        }
        assert_eq!(t.connect(ip(1), t0 + Duration::from_secs(59)).rate, 1);
        // The window started at t0: at t0 + 60s a new one begins.
        assert_eq!(counts(t.message(ip(1), t0 + UNIT)), (Status::Counted, 1, 1));
        assert_eq!(t.connect(ip(1), t0 + UNIT).rate, 1);
    }

    #[test]
    fn sweep_keeps_open_and_recent_clients() {
        let t0 = Instant::now();
        let mut t = AnvilTable::new(UNIT, 10);
        t.connect(ip(1), t0);
        t.connect(ip(2), t0);
        t.disconnect(ip(2), t0);
        t.message(ip(3), t0 + Duration::from_secs(30));
        t.sweep(t0 + UNIT);
        let mut left: Vec<_> = t.clients.keys().filter_map(client).collect();
        left.sort();
        assert_eq!(left, vec![ip(1), ip(3)]);
        t.sweep(t0 + UNIT * 2);
        assert_eq!(t.clients.keys().filter_map(client).collect::<Vec<_>>(), vec![ip(1)]);
    }

    #[test]
    fn capacity_is_never_exceeded() {
        let t0 = Instant::now();
        let mut t = AnvilTable::new(UNIT, 20);
        // Twenty recent idle clients fill the table...
        for n in 0..20 {
            t.message(ip(n), t0 + Duration::from_millis(u64::from(n)));
        }
        // ...and a new one evicts the two least recently seen.
        assert_eq!(t.message(ip(100), t0 + Duration::from_secs(1)).status, Status::Counted);
        assert_eq!(t.len(), 19);
        assert!(!t.clients.contains_key(&Subject::Client(ip(0))) && !t.clients.contains_key(&Subject::Client(ip(1))));
        for n in 200..10_000 {
            t.message(ip(n), t0 + Duration::from_secs(2));
            assert!(t.len() <= 20);
        }
    }

    #[test]
    fn open_connections_are_never_evicted() {
        let t0 = Instant::now();
        let mut t = AnvilTable::new(UNIT, 3);
        for n in 0..3 {
            t.connect(ip(n), t0);
        }
        // Full of connected clients: a fourth is untracked, not counted.
        assert_eq!(counts(t.connect(ip(3), t0)), (Status::Untracked, 0, 0));
        assert_eq!(counts(t.message(ip(3), t0)), (Status::Untracked, 0, 0));
        assert_eq!(t.connect(ip(0), t0).count, 2);
        t.disconnect(ip(1), t0);
        assert_eq!(t.connect(ip(3), t0 + Duration::from_secs(1)).status, Status::Counted);
        assert!(!t.clients.contains_key(&Subject::Client(ip(1))));
    }
}

//! board: the scoreboard, one entry per child process.
//!
//! The master's whole knowledge of a child is this entry: which service it
//! belongs to, what it last said about itself (over its own status socket,
//! so it can only ever speak for itself), how many sessions it has served,
//! and when it was spawned and last changed state. Entries are keyed by an
//! internal [`ChildId`], never by pid, so a pid the kernel recycles between
//! a reap and its bookkeeping can never be confused with a new child.
//!
//! [`check_record`] is the strict reader of a child's conversation: the
//! first record must be READY, READY never repeats, the session count never
//! goes backwards or jumps, and nothing but RETIRING follows RETIRING. A
//! child that breaks a rule is killed, like a Postfix peer that sends an
//! unexpected attribute.

use crate::life::{Life, Reason};
use crate::pool::PoolView;
use mortal_proto::status::{BoardState, ChildState, StatusRecord};
use std::collections::BTreeMap;
use std::time::Instant;
use tokio::sync::mpsc::UnboundedSender;

/// Scoreboard key: unique for the master's lifetime, unlike a pid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChildId(pub u64);

/// How long a READY child must stay up, unbroken, to count as a good start
/// when it has not served a session yet.
pub const GOOD_START_PROOF: std::time::Duration = std::time::Duration::from_secs(1);

/// Index of a service in the master's service table.
pub type ServiceId = usize;

/// What the master believes a child is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Spawned, not yet READY.
    Starting,
    /// Waiting for a client.
    Idle,
    /// Serving a session.
    Busy,
    /// Serving its last session, or leaving for another reason.
    Retiring,
}

impl Phase {
    pub fn of(state: ChildState) -> Phase {
        match state {
            ChildState::Ready | ChildState::Idle => Phase::Idle,
            ChildState::Busy => Phase::Busy,
            ChildState::Retiring => Phase::Retiring,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Idle => "idle",
            Phase::Busy => "busy",
            Phase::Retiring => "retiring",
        }
    }
}

/// An order from the event loop to the task watching one child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// Send `MasterCommand::Retire`: finish the session (if any) and exit.
    Retire,
    /// SIGTERM, for a child past a deadline: smtpd then tells its client
    /// `421` and exits.
    Terminate,
    /// SIGKILL, for a child that broke the protocol or outstayed a deadline.
    Kill,
}

/// One child process.
#[derive(Debug)]
pub struct Entry {
    pub pid: u32,
    pub service: ServiceId,
    pub phase: Phase,
    /// Sessions served, as last reported.
    pub sessions: u32,
    pub spawned: Instant,
    /// Last change of `phase`.
    pub changed: Instant,
    /// Configuration generation it was spawned under (bumped by SIGHUP).
    pub generation: u64,
    /// When it reported READY.
    pub ready_at: Option<Instant>,
    /// Already counted as a good start.
    pub proven: bool,
    /// Killed for breaking the status protocol.
    pub broken: bool,
    /// The master told it to retire.
    pub retire_sent: bool,
    /// The master killed it (protocol violation, deadline).
    pub killed: bool,
    /// When its drawn lifetime ends (`None`: unlimited).
    pub life_end: Option<Instant>,
    /// When its current session began, by its own BUSY (or last-session
    /// RETIRING) record; `None` between sessions.
    pub session_since: Option<Instant>,
    /// SIGTERM sent by the lifetime policy at this instant.
    pub term_sent: Option<Instant>,
    /// Why the master made it leave, for the retirement counters.
    pub reason: Option<Reason>,
    orders: UnboundedSender<Order>,
}

impl Entry {
    pub fn new(pid: u32, service: ServiceId, generation: u64, now: Instant, orders: UnboundedSender<Order>) -> Self {
        Entry {
            pid,
            service,
            phase: Phase::Starting,
            sessions: 0,
            spawned: now,
            changed: now,
            generation,
            ready_at: None,
            proven: false,
            broken: false,
            retire_sent: false,
            killed: false,
            life_end: None,
            session_since: None,
            term_sent: None,
            reason: None,
            orders,
        }
    }

    /// Its clocks, for `life`.
    pub fn life(&self) -> Life {
        Life {
            life_end: self.life_end,
            session_since: self.session_since,
            leaving: self.leaving(),
            term_sent: self.term_sent,
            killed: self.killed,
        }
    }

    /// The state shown by `mortal status`: a busy child past its lifetime
    /// is `overdue`; any other child on its way out is `retiring`.
    pub fn state(&self, now: Instant) -> BoardState {
        let past_life = self.life_end.is_some_and(|end| now >= end);
        match self.phase {
            Phase::Starting if !self.leaving() => BoardState::Starting,
            _ if self.session_since.is_some() && past_life => BoardState::Overdue,
            _ if self.leaving() => BoardState::Retiring,
            Phase::Starting => BoardState::Starting,
            Phase::Idle => BoardState::Idle,
            Phase::Busy => BoardState::Busy,
            Phase::Retiring => BoardState::Retiring,
        }
    }

    /// Why it left, judged at its exit: the master's reason if it gave
    /// one, else `max_use` for a child that announced its last session and
    /// exited cleanly, else a crash.
    pub fn exit_reason(&self, clean: bool) -> Reason {
        match self.reason {
            Some(reason) => reason,
            None if clean && self.phase == Phase::Retiring && !self.broken => Reason::MaxUse,
            None => Reason::Crash,
        }
    }

    /// Sends `MasterCommand::Retire` once, recording why.
    pub fn retire_for(&mut self, reason: Reason) {
        if !self.leaving() {
            self.reason.get_or_insert(reason);
        }
        self.retire();
    }

    /// SIGTERM now, SIGKILL after the service's `term_grace`.
    pub fn terminate(&mut self, reason: Reason, now: Instant) {
        if self.term_sent.is_none() && !self.killed {
            self.reason = Some(reason);
            self.term_sent = Some(now);
            let _ = self.orders.send(Order::Terminate);
        }
    }

    /// Whether this child now proves its service healthy, for the crash
    /// throttle: it reported READY and then either a session (`session`)
    /// or stayed up, unbroken, for [`GOOD_START_PROOF`]. READY alone is not
    /// enough: a child that says READY and then breaks the protocol at once
    /// would otherwise reset the throttle every time and never be paused.
    pub fn proves_good_start(&self, now: Instant, session: bool) -> bool {
        let Some(ready_at) = self.ready_at else { return false };
        !self.proven && !self.broken && (session || now.saturating_duration_since(ready_at) >= GOOD_START_PROOF)
    }

    /// Whether its exit counts as a bad start: it never reported READY
    /// (crash, failed exec, killed at the start deadline), or it was
    /// killed for breaking the protocol.
    pub fn exit_is_bad_start(&self) -> bool {
        self.ready_at.is_none() || self.broken
    }

    /// Alive but no longer capacity: it will exit without taking more
    /// clients, so the pool policy must not count it as a spare.
    pub fn leaving(&self) -> bool {
        self.retire_sent || self.killed || self.term_sent.is_some() || self.phase == Phase::Retiring
    }

    /// Sends `MasterCommand::Retire` once.
    pub fn retire(&mut self) {
        if !self.retire_sent && !self.killed {
            self.retire_sent = true;
            // The watcher ends only after the child is reaped, and the entry
            // is removed then, so a send error means a child already gone.
            let _ = self.orders.send(Order::Retire);
        }
    }

    pub fn kill(&mut self) {
        if !self.killed {
            self.killed = true;
            let _ = self.orders.send(Order::Kill);
        }
    }
}

/// Every live child of the master.
#[derive(Debug, Default)]
pub struct Scoreboard {
    entries: BTreeMap<ChildId, Entry>,
}

impl Scoreboard {
    pub fn insert(&mut self, id: ChildId, entry: Entry) {
        self.entries.insert(id, entry);
    }

    pub fn remove(&mut self, id: ChildId) -> Option<Entry> {
        self.entries.remove(&id)
    }

    pub fn get_mut(&mut self, id: ChildId) -> Option<&mut Entry> {
        self.entries.get_mut(&id)
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&ChildId, &Entry)> {
        self.entries.iter()
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&ChildId, &mut Entry)> {
        self.entries.iter_mut()
    }

    /// Counts per state for one service: the input of the pool policy.
    pub fn view(&self, service: ServiceId) -> PoolView {
        let mut view = PoolView::default();
        for e in self.entries.values().filter(|e| e.service == service) {
            view.live += 1;
            match e.phase {
                _ if e.leaving() => view.leaving += 1,
                Phase::Starting => view.starting += 1,
                Phase::Idle => view.idle += 1,
                Phase::Busy => view.busy += 1,
                Phase::Retiring => view.leaving += 1,
            }
        }
        view
    }

    /// The idle children of `service` that should go first when the pool
    /// has too many: the oldest, since they have been exposed longest.
    pub fn oldest_idle(&self, service: ServiceId, n: usize) -> Vec<ChildId> {
        let mut idle: Vec<(Instant, ChildId)> = self
            .entries
            .iter()
            .filter(|(_, e)| e.service == service && e.phase == Phase::Idle && !e.leaving())
            .map(|(id, e)| (e.spawned, *id))
            .collect();
        idle.sort();
        idle.into_iter().take(n).map(|(_, id)| id).collect()
    }
}

/// Why a record ends the conversation with a child.
pub type Violation = &'static str;

/// Checks `next` against the previous record of the same child (`None`
/// before the first). The rules are those every child following
/// `mortal_libmaster::child` obeys; the state sequence after READY is left
/// open (BUSY, IDLE and RETIRING in any order) so that a daemon with its
/// own loop, like queue, can report what it does.
pub fn check_record(prev: Option<StatusRecord>, next: StatusRecord) -> Result<(), Violation> {
    let Some(prev) = prev else {
        return match (next.state, next.sessions) {
            (ChildState::Ready, 0) => Ok(()),
            (ChildState::Ready, _) => Err("READY with sessions already served"),
            _ => Err("first status record is not READY"),
        };
    };
    if next.state == ChildState::Ready {
        return Err("READY twice");
    }
    if prev.state == ChildState::Retiring && next.state != ChildState::Retiring {
        return Err("status change after RETIRING");
    }
    if next.sessions < prev.sessions {
        return Err("session count went backwards");
    }
    if next.sessions - prev.sessions > 1 {
        return Err("session count skipped");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc::unbounded_channel;

    fn rec(state: ChildState, sessions: u32) -> StatusRecord {
        StatusRecord { state, sessions }
    }

    #[test]
    fn the_child_skeleton_sequence_is_accepted() {
        use ChildState::*;
        let seq = [rec(Ready, 0), rec(Busy, 1), rec(Idle, 1), rec(Busy, 2), rec(Idle, 2), rec(Retiring, 3)];
        let mut prev = None;
        for r in seq {
            assert_eq!(check_record(prev, r), Ok(()), "{r:?} after {prev:?}");
            prev = Some(r);
        }
        // max_use 1: the first session is the last.
        assert_eq!(check_record(Some(rec(Ready, 0)), rec(Retiring, 1)), Ok(()));
    }

    #[test]
    fn protocol_violations_are_named() {
        use ChildState::*;
        assert_eq!(check_record(None, rec(Busy, 1)), Err("first status record is not READY"));
        assert_eq!(check_record(None, rec(Ready, 4)), Err("READY with sessions already served"));
        assert_eq!(check_record(Some(rec(Idle, 1)), rec(Ready, 1)), Err("READY twice"));
        assert_eq!(check_record(Some(rec(Retiring, 3)), rec(Busy, 3)), Err("status change after RETIRING"));
        assert_eq!(check_record(Some(rec(Idle, 5)), rec(Busy, 4)), Err("session count went backwards"));
        assert_eq!(check_record(Some(rec(Idle, 5)), rec(Busy, 7)), Err("session count skipped"));
    }

    #[test]
    fn view_counts_leaving_children_apart() {
        let (tx, _rx) = unbounded_channel();
        let now = Instant::now();
        let mut board = Scoreboard::default();
        let phases = [Phase::Starting, Phase::Idle, Phase::Idle, Phase::Busy, Phase::Retiring];
        for (i, phase) in phases.into_iter().enumerate() {
            let mut e = Entry::new(100 + i as u32, 0, 0, now, tx.clone());
            e.phase = phase;
            board.insert(ChildId(i as u64), e);
        }
        board.insert(ChildId(9), Entry::new(200, 1, 0, now, tx.clone()));
        assert_eq!(board.view(0), PoolView { live: 5, starting: 1, idle: 2, busy: 1, leaving: 1 });
        board.get_mut(ChildId(1)).map(Entry::retire);
        assert_eq!(board.view(0), PoolView { live: 5, starting: 1, idle: 1, busy: 1, leaving: 2 });
        assert_eq!(board.view(1).starting, 1);
    }

    #[test]
    fn a_good_start_needs_more_than_ready() {
        let (tx, _rx) = unbounded_channel();
        let t0 = Instant::now();
        let mut e = Entry::new(1, 0, 0, t0, tx);
        assert!(!e.proves_good_start(t0 + GOOD_START_PROOF, true), "not READY yet");
        assert!(e.exit_is_bad_start());
        e.ready_at = Some(t0);
        assert!(!e.exit_is_bad_start());
        assert!(!e.proves_good_start(t0, false), "READY alone");
        assert!(e.proves_good_start(t0, true), "READY, then a session");
        assert!(e.proves_good_start(t0 + GOOD_START_PROOF, false), "READY, then a second up");
        e.broken = true;
        assert!(!e.proves_good_start(t0 + GOOD_START_PROOF, true));
        assert!(e.exit_is_bad_start(), "READY, then garbage");
        e.broken = false;
        e.proven = true;
        assert!(!e.proves_good_start(t0 + GOOD_START_PROOF, true), "counted once");
    }

    #[test]
    fn oldest_idle_children_retire_first() {
        let (tx, _rx) = unbounded_channel();
        let t0 = Instant::now();
        let mut board = Scoreboard::default();
        for (i, age) in [3u64, 9, 1, 5].into_iter().enumerate() {
            // Spawned `age` seconds before t0 + 10 s.
            let mut e = Entry::new(i as u32, 0, 0, t0 + std::time::Duration::from_secs(10 - age), tx.clone());
            e.phase = Phase::Idle;
            board.insert(ChildId(i as u64), e);
        }
        assert_eq!(board.oldest_idle(0, 2), vec![ChildId(1), ChildId(3)]);
    }
}

//! master_loop: the event loop that carries out the lifetime policy.
//!
//! One task per child ([`crate::master_spawn`]) reads its status socket and
//! reaps it, forwarding [`Event`]s on one channel. This loop is the only
//! owner of the scoreboard and the service table; it wakes for
//!
//! - a child's event: update the scoreboard, then top the pool up at once
//!   (within this second's spawn allowance; a retiring child's replacement
//!   does not wait for it);
//! - the one-second tick: advance the spawn rate, retire idle children
//!   above `max_spare` (once a second, like Apache, so a burst that ends
//!   does not thrash), kill children that never became ready, count
//!   children that stayed up as good starts, end throttles;
//! - a signal: stop gracefully (SIGTERM, SIGINT) or reload (SIGHUP);
//! - while stopping, the stop deadline.
//!
//! Nothing a child does can make this loop fail: every error from a child
//! (a bad record, a crash, a refused order) ends in a log line and, at
//! worst, that child's SIGKILL.

use crate::master_board::{ChildId, Entry, Phase, Scoreboard, ServiceId};
use crate::master_pool::{self, Throttle};
use crate::master_sig::{Request, Signals};
use crate::master_spawn::{Event, master_spawn};
use mortal_proto::config::{Config, ProcessPolicy};
use mortal_proto::status::ChildState;
use socket2::Socket;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::time::MissedTickBehavior;

/// Period of the policy tick (Apache's one-second maintenance cycle).
pub const TICK: Duration = Duration::from_secs(1);
/// A child that has not reported READY this long after its spawn is stuck
/// (a hung initialisation): it is killed, and counts as a bad start.
pub const START_DEADLINE: Duration = Duration::from_secs(30);
/// How long a graceful stop waits for busy children to finish their
/// session before they are killed.
pub const STOP_DEADLINE: Duration = Duration::from_secs(30);
/// How long the master waits to reap children after SIGKILL before it
/// exits anyway (a process stuck in the kernel cannot be waited for).
pub const KILL_REAP_DEADLINE: Duration = Duration::from_secs(5);
/// Events queued from the watchers to this loop. A child flooding its
/// status socket fills this and then waits, instead of growing the
/// master's memory.
pub const EVENT_QUEUE: usize = 1024;

/// Which daemon a service runs, which decides its policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceKind {
    Smtpd,
    Cleanup,
    /// Exactly one process, restarted when it exits.
    Queue,
}

impl ServiceKind {
    pub fn name(self) -> &'static str {
        match self {
            ServiceKind::Smtpd => "smtpd",
            ServiceKind::Cleanup => "cleanup",
            ServiceKind::Queue => "queue",
        }
    }

    /// The binary, found next to the master's own.
    pub fn program(self) -> &'static str {
        match self {
            ServiceKind::Smtpd => "mortal-smtpd",
            ServiceKind::Cleanup => "mortal-cleanup",
            ServiceKind::Queue => "mortal-queue",
        }
    }

    /// The pool policy as enforced; `None` for the single-process queue.
    fn policy(self, config: &Config) -> Option<ProcessPolicy> {
        match self {
            ServiceKind::Smtpd => Some(master_pool::effective(&config.process.smtpd)),
            ServiceKind::Cleanup => Some(master_pool::effective(&config.process.cleanup)),
            ServiceKind::Queue => None,
        }
    }
}

/// One listening socket and the children that take connections from it.
#[derive(Debug)]
pub struct Service {
    pub kind: ServiceKind,
    /// What the service listens on, for log lines: `127.0.0.1:2525`, or a
    /// socket path.
    pub endpoint: String,
    pub program: PathBuf,
    /// `None` once a stop has begun: no child is spawned after that.
    pub listener: Option<Socket>,
    /// The socket file of a Unix listener, removed at exit.
    pub socket_file: Option<PathBuf>,
    rate: master_pool::SpawnRate,
    throttle: Throttle,
    /// The process-limit warning was logged in the current episode (it is
    /// logged once per episode).
    limit_warned: bool,
}

impl Service {
    pub fn new(
        kind: ServiceKind,
        endpoint: String,
        program: PathBuf,
        listener: Socket,
        socket_file: Option<PathBuf>,
    ) -> Service {
        Service {
            kind,
            endpoint,
            program,
            listener: Some(listener),
            socket_file,
            rate: Default::default(),
            throttle: Default::default(),
            limit_warned: false,
        }
    }
}

/// A graceful stop in progress.
#[derive(Debug)]
struct Stopping {
    signal: i32,
    deadline: tokio::time::Instant,
    /// SIGKILL already sent to every straggler.
    killed: bool,
    /// The kill deadline passed too: exit without the stragglers.
    gave_up: bool,
}

/// The supervisor's state.
#[derive(Debug)]
pub struct Master {
    config: Config,
    /// Absolute path of the configuration, passed to every child.
    config_path: PathBuf,
    services: Vec<Service>,
    board: Scoreboard,
    next_id: u64,
    /// Bumped by each successful reload; older children are retired as
    /// soon as they are idle.
    generation: u64,
    events_tx: mpsc::Sender<Event>,
    events_rx: mpsc::Receiver<Event>,
    stop: Option<Stopping>,
}

impl Master {
    pub fn new(config: Config, config_path: PathBuf, services: Vec<Service>) -> Master {
        let (events_tx, events_rx) = mpsc::channel(EVENT_QUEUE);
        Master {
            config,
            config_path,
            services,
            board: Scoreboard::default(),
            next_id: 0,
            generation: 0,
            events_tx,
            events_rx,
            stop: None,
        }
    }

    /// Spawns the `prefork` children of every pool (all at once, like
    /// Apache's StartServers) and the queue process.
    pub fn prefork(&mut self) {
        for svc in 0..self.services.len() {
            let count = self.services[svc].kind.policy(&self.config).map_or(1, |p| p.prefork);
            for _ in 0..count {
                if !self.spawn_one(svc) {
                    break;
                }
            }
            self.maintain(svc, false);
        }
    }

    /// Runs until a stop completes; returns the signal that caused it.
    pub async fn run(&mut self, signals: &mut Signals) -> i32 {
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + TICK, TICK);
        // After a stall (a suspended VM), one catch-up tick is enough.
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            if let Some(stop) = &self.stop
                && (self.board.is_empty() || stop.gave_up)
            {
                return stop.signal;
            }
            let deadline = self.stop.as_ref().map(|s| s.deadline);
            tokio::select! {
                // The loop keeps a sender, so the channel never closes.
                Some(event) = self.events_rx.recv() => self.on_event(event),
                _ = ticker.tick() => self.on_tick(),
                request = signals.next() => match request {
                    Request::Stop(signal) => self.begin_stop(signal),
                    Request::Reload => self.reload(),
                },
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)), if deadline.is_some() => {
                    self.stop_deadline_passed();
                }
            }
        }
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Status(id, record) => self.on_status(id, record.state, record.sessions),
            Event::Broken(id) => {
                if let Some(entry) = self.board.get_mut(id) {
                    // The watcher already sent SIGKILL; stop counting it as
                    // capacity, and count its exit as a bad start.
                    entry.killed = true;
                    entry.broken = true;
                    let svc = entry.service;
                    self.maintain(svc, false);
                }
            }
            Event::Exited(id, status) => self.on_exit(id, status),
        }
    }

    fn on_status(&mut self, id: ChildId, state: ChildState, sessions: u32) {
        let Some(entry) = self.board.get_mut(id) else { return };
        tracing::trace!("pid {}: {state:?} after {sessions} sessions", entry.pid);
        let now = Instant::now();
        let was_leaving = entry.leaving();
        let phase = Phase::of(state);
        if phase != entry.phase {
            entry.changed = now;
        }
        entry.phase = phase;
        entry.sessions = sessions;
        let svc = entry.service;
        let service = &mut self.services[svc];
        if entry.proves_good_start(now, state != ChildState::Ready) {
            entry.proven = true;
            service.throttle.good_start();
        }
        match state {
            ChildState::Ready => {
                entry.ready_at = Some(now);
                let elapsed = now.saturating_duration_since(entry.spawned);
                tracing::debug!(
                    "{}: pid {} ready {} us after spawn",
                    service.kind.name(),
                    entry.pid,
                    elapsed.as_micros()
                );
            }
            // Replace before retire: the successor starts while the last
            // session runs, outside the spawn rate.
            ChildState::Retiring if !was_leaving => service.rate.grant(1),
            _ => {}
        }
        self.maintain(svc, false);
    }

    fn on_exit(&mut self, id: ChildId, status: io::Result<ExitStatus>) {
        let Some(entry) = self.board.remove(id) else { return };
        let service = &mut self.services[entry.service];
        log_exit(&service.program, entry.pid, &status);
        tracing::debug!(
            "{}: pid {} gone after {} sessions, {}s alive, {} for {}s",
            service.kind.name(),
            entry.pid,
            entry.sessions,
            entry.spawned.elapsed().as_secs(),
            entry.phase.as_str(),
            entry.changed.elapsed().as_secs()
        );
        if entry.exit_is_bad_start() && self.stop.is_none() {
            bad_start(service, Instant::now());
        }
        self.maintain(entry.service, false);
    }

    fn on_tick(&mut self) {
        if self.stop.is_some() {
            return;
        }
        let now = Instant::now();
        for (_, entry) in self.board.iter_mut() {
            if entry.proves_good_start(now, false) {
                entry.proven = true;
                self.services[entry.service].throttle.good_start();
            }
            let stuck = entry.phase == Phase::Starting && now >= entry.spawned + START_DEADLINE;
            if stuck && !entry.killed {
                let program = &self.services[entry.service].program;
                tracing::warn!(
                    "warning: process {} pid {}: not ready after {}s -- killed",
                    program.display(),
                    entry.pid,
                    START_DEADLINE.as_secs()
                );
                entry.kill();
            }
        }
        for svc in 0..self.services.len() {
            let service = &self.services[svc];
            let short = match service.kind.policy(&self.config) {
                Some(policy) => master_pool::shortfall(&policy, &self.board.view(svc)) > 0,
                None => false,
            };
            let growing = short && !service.throttle.is_throttled(now);
            self.services[svc].rate.second_elapsed(growing);
            self.maintain(svc, true);
        }
    }

    /// Brings one service in line with its policy. `tick` also retires
    /// idle children above `max_spare`.
    fn maintain(&mut self, svc: ServiceId, tick: bool) {
        if self.stop.is_some() {
            return;
        }
        self.retire_old_generation(svc);
        let view = self.board.view(svc);
        let now = Instant::now();
        let throttled = self.services[svc].throttle.is_throttled(now);
        let Some(policy) = self.services[svc].kind.policy(&self.config) else {
            if master_pool::single_needs_spawn(&view) && !throttled {
                self.spawn_one(svc);
            }
            return;
        };
        let service = &mut self.services[svc];
        let plan = master_pool::plan(&policy, &view, service.rate.allowance());
        // A throttled service is short by choice, not by limit.
        let at_limit = plan.at_limit && !throttled;
        if at_limit && !service.limit_warned {
            tracing::warn!(
                "warning: service \"{}\" ({}) has reached its process limit \"{}\": new clients may experience noticeable delays",
                service.kind.name(),
                service.endpoint,
                policy.process_limit
            );
        }
        if at_limit {
            service.limit_warned = true;
        } else if tick {
            // An episode ends only when a whole tick finds the pool below
            // its limit: a child that goes idle and at once takes a queued
            // client does not end it.
            service.limit_warned = false;
        }
        if !throttled && plan.spawn > 0 {
            tracing::debug!(
                "{}: {view:?} short of spares: spawning {} (rate {}/s)",
                service.kind.name(),
                plan.spawn,
                service.rate.rate()
            );
            for _ in 0..plan.spawn {
                self.services[svc].rate.spend(1);
                if !self.spawn_one(svc) {
                    break;
                }
            }
        }
        if tick && plan.retire > 0 {
            for id in self.board.oldest_idle(svc, plan.retire as usize) {
                if let Some(entry) = self.board.get_mut(id) {
                    tracing::debug!(
                        "{}: retiring idle pid {}: above max_spare",
                        self.services[svc].kind.name(),
                        entry.pid
                    );
                    entry.retire();
                }
            }
        }
    }

    /// After a reload, idle children of an older generation are retired
    /// (busy ones when they next become idle), and their replacements,
    /// which read the new configuration, start at once.
    fn retire_old_generation(&mut self, svc: ServiceId) {
        let generation = self.generation;
        let mut retired = 0;
        for (_, entry) in self.board.iter_mut() {
            if entry.service == svc && entry.generation < generation && entry.phase == Phase::Idle && !entry.leaving() {
                entry.retire();
                retired += 1;
            }
        }
        self.services[svc].rate.grant(retired);
    }

    /// Spawns one child of `svc`; false when that failed (logged, and
    /// counted as a bad start) or the service no longer listens.
    fn spawn_one(&mut self, svc: ServiceId) -> bool {
        let service = &mut self.services[svc];
        let Some(listener) = &service.listener else { return false };
        let id = ChildId(self.next_id);
        self.next_id += 1;
        // Before the fork, so READY latency includes fork and exec.
        let started = Instant::now();
        match master_spawn(id, &service.program, &self.config_path, listener, self.events_tx.clone()) {
            Ok(spawned) => {
                let entry = Entry::new(spawned.pid, svc, self.generation, started, spawned.orders);
                self.board.insert(id, entry);
                true
            }
            Err(e) => {
                tracing::warn!("warning: spawn {}: {e}", service.program.display());
                bad_start(service, Instant::now());
                false
            }
        }
    }

    fn begin_stop(&mut self, signal: i32) {
        let now = tokio::time::Instant::now();
        if let Some(stop) = &mut self.stop {
            // A second request means "now": skip the rest of the grace.
            if !stop.killed {
                tracing::info!("signal {signal} during stop: killing {} remaining children", self.board.len());
                stop.deadline = now;
            }
            return;
        }
        tracing::info!(
            "stopping on signal {signal}: retiring {} children, deadline {}s",
            self.board.len(),
            STOP_DEADLINE.as_secs()
        );
        for service in &mut self.services {
            // Closing the master's copy; children still hold theirs until
            // they exit.
            service.listener = None;
        }
        for (_, entry) in self.board.iter_mut() {
            entry.retire();
        }
        self.stop = Some(Stopping { signal, deadline: now + STOP_DEADLINE, killed: false, gave_up: false });
    }

    fn stop_deadline_passed(&mut self) {
        let Some(stop) = &mut self.stop else { return };
        if stop.killed {
            tracing::warn!("warning: {} children did not exit after SIGKILL; exiting without them", self.board.len());
            stop.gave_up = true;
            return;
        }
        if !self.board.is_empty() {
            tracing::warn!("warning: {} children still running at the stop deadline -- killing", self.board.len());
        }
        for (_, entry) in self.board.iter_mut() {
            entry.kill();
        }
        stop.killed = true;
        stop.deadline = tokio::time::Instant::now() + KILL_REAP_DEADLINE;
    }

    fn reload(&mut self) {
        if self.stop.is_some() {
            return;
        }
        let new = match Config::load(&self.config_path) {
            Ok(new) => new,
            Err(errors) => {
                for e in errors {
                    tracing::warn!("warning: reload: {e}");
                }
                tracing::warn!("warning: reload failed: keeping the current configuration");
                return;
            }
        };
        let old = &self.config;
        if new.smtpd.listen != old.smtpd.listen
            || new.server.spool_dir != old.server.spool_dir
            || new.run_dir() != old.run_dir()
        {
            tracing::warn!(
                "warning: reload: smtpd.listen, server.spool_dir and server.run_dir take effect only on restart"
            );
        }
        if new.log.format != old.log.format || new.log.level != old.log.level {
            tracing::warn!("warning: reload: the master's own [log] settings take effect only on restart");
        }
        self.config = new;
        self.generation += 1;
        tracing::info!("reload -- version {}, configuration {}", crate::VERSION, self.config_path.display());
        for svc in 0..self.services.len() {
            self.maintain(svc, false);
        }
    }
}

/// Counts a bad start and logs the start of a throttle.
fn bad_start(service: &mut Service, now: Instant) {
    if let Some(pause) = service.throttle.bad_start(now) {
        tracing::warn!("warning: service \"{}\": bad command startup -- throttling", service.kind.name());
        tracing::debug!("{}: no spawn for {}s", service.kind.name(), pause.as_secs());
    }
}

/// Logs an abnormal exit the way Postfix's master does.
fn log_exit(program: &Path, pid: u32, status: &io::Result<ExitStatus>) {
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => match (s.signal(), s.code()) {
            (Some(signal), _) => {
                tracing::warn!("warning: process {} pid {pid} killed by signal {signal}", program.display())
            }
            (None, Some(code)) => tracing::warn!("warning: process {} pid {pid} exit status {code}", program.display()),
            (None, None) => tracing::warn!("warning: process {} pid {pid} ended: {s}", program.display()),
        },
        Err(e) => tracing::warn!("warning: process {} pid {pid}: wait: {e}", program.display()),
    }
}

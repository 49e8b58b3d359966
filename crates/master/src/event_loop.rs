//! event_loop: the event loop that carries out the lifetime policy.
//!
//! One task per child ([`crate::spawn`]) reads its status socket and
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
//! - a request from the control socket (`ctl`): status, reload,
//!   stop;
//! - the next policy deadline (`life`): a child's drawn lifetime,
//!   its session deadline, its overdue grace, the SIGKILL after a SIGTERM,
//!   an idle child's `max_idle`; a saturated pool's backlog check
//!   (`overload`); the metrics file;
//! - while stopping, the stop deadline.
//!
//! Nothing a child does can make this loop fail: every error from a child
//! (a bad record, a crash, a refused order) ends in a log line and, at
//! worst, that child's SIGKILL.

use crate::board::{ChildId, Entry, Phase, Scoreboard, ServiceId};
use crate::ctl;
use crate::life::{self, Jitter, Limits, Reason, Verdict};
use crate::overload::{self, Check, Overload};
use crate::pool::{self, Throttle};
use crate::sig::{Request, Signals};
use crate::spawn::{Event, Spawned, Zygote, spawn};
use crate::stat::{self, ChildStat, ServiceStat, Snapshot};
use mortal_proto::config::{Config, ProcessPolicy, SpawnMode};
use mortal_proto::status::{CONTROL_ERROR, CONTROL_OK, ChildState, ControlRequest};
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
/// Control requests queued to this loop (each from an operator's command).
pub const CONTROL_QUEUE: usize = 8;
/// How often `[server] metrics_file` is rewritten.
pub const METRICS_INTERVAL: Duration = Duration::from_secs(5);

/// Which daemon a service runs, which decides its policy: the one
/// service enum of proto, named `ServiceKind` here because [`Service`] is
/// the running service (its socket, its children, its counters).
pub use mortal_proto::service::Service as ServiceKind;

/// The pool policy of a kind of service as enforced.
trait PoolPolicy {
    /// `None` for a single-process service (the queue, anvil).
    fn policy(self, config: &Config) -> Option<ProcessPolicy>;
    /// The lifetime rules of every child, single processes included.
    fn life_policy(self, config: &Config) -> ProcessPolicy;
}

impl PoolPolicy for ServiceKind {
    fn policy(self, config: &Config) -> Option<ProcessPolicy> {
        config.process.pool(self).map(pool::effective)
    }

    /// The lifetime rules of every child: its pool's policy, or for the
    /// single-process queue and anvil their `[process.queue]` and
    /// `[process.anvil]` lives (no uses, no idle retirement, no session
    /// deadline).
    fn life_policy(self, config: &Config) -> ProcessPolicy {
        self.policy(config).unwrap_or_else(|| config.process.policy(self))
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
    rate: pool::SpawnRate,
    throttle: Throttle,
    /// The process-limit warning was logged in the current episode (it is
    /// logged once per episode).
    limit_warned: bool,
    /// Children spawned.
    spawns: u64,
    /// Children gone, per reason, in `Reason::ALL` order.
    retired: [u64; Reason::ALL.len()],
    overload: Overload,
    /// fork+exec-to-READY times of its children.
    ready: stat::ReadyLatency,
    /// The template its children are forked from (`spawn = "fork"`).
    zygote: Option<Zygote>,
    /// After a zygote failed: children are exec'd until then.
    zygote_retry: Option<Instant>,
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
            rate: pool::SpawnRate::for_service(kind),
            throttle: Default::default(),
            limit_warned: false,
            spawns: 0,
            retired: [0; Reason::ALL.len()],
            overload: Overload::default(),
            ready: Default::default(),
            zygote: None,
            zygote_retry: None,
        }
    }

    /// Starts child `id`: forked by the pool's zygote with `spawn =
    /// "fork"` (exec'd when it has none or it fails), else exec'd. The
    /// caller checked that the service still listens.
    fn start_child(
        &mut self,
        id: ChildId,
        config_path: &Path,
        generation: u64,
        policy: &ProcessPolicy,
        events: &mpsc::Sender<Event>,
    ) -> io::Result<Spawned> {
        if policy.spawn == SpawnMode::Fork && self.zygote_ready(config_path, generation, policy.max_lifetime) {
            let listener = self.listener.as_ref().expect("checked by the caller");
            match spawn(id, &self.program, config_path, listener, self.zygote.as_mut(), events.clone()) {
                Ok(child) => return Ok(child),
                Err(e) => self.zygote_failed(&e),
            }
        }
        let listener = self.listener.as_ref().expect("checked by the caller");
        spawn(id, &self.program, config_path, listener, None, events.clone())
    }

    /// Whether [`Service::zygote`] is there to fork the next child,
    /// started or replaced as needed: one exec'd with an older
    /// configuration (`generation`) or older than the pool's
    /// `max_lifetime` is retired first, so the layout its children share
    /// is renewed at least that often. False (exec the child) while a
    /// failed one waits out [`ZYGOTE_RETRY`].
    fn zygote_ready(&mut self, config_path: &Path, generation: u64, max_lifetime: Duration) -> bool {
        let now = Instant::now();
        if let Some(zygote) = &self.zygote
            && (zygote.generation != generation
                || (!max_lifetime.is_zero() && zygote.started.elapsed() >= max_lifetime))
        {
            self.retire_zygote();
        }
        if self.zygote.is_none() {
            if self.zygote_retry.is_some_and(|t| now < t) {
                return false;
            }
            let Some(listener) = self.listener.as_ref() else { return false };
            match Zygote::start(&self.program, config_path, listener, generation) {
                Ok(zygote) => {
                    tracing::debug!("{}: zygote pid {}", self.kind.name(), zygote.pid());
                    self.zygote = Some(zygote);
                }
                Err(e) => {
                    self.zygote_failed(&e);
                    return false;
                }
            }
        }
        true
    }

    /// A zygote that could not start or fork: children are exec'd for
    /// [`ZYGOTE_RETRY`], then a new one is tried.
    fn zygote_failed(&mut self, e: &io::Error) {
        let pid = self.zygote.as_ref().map_or(0, Zygote::pid);
        tracing::warn!(
            "warning: service \"{}\": zygote pid {pid}: {e}; starting children by exec for {}s",
            self.kind.name(),
            ZYGOTE_RETRY.as_secs()
        );
        if let Some(zygote) = self.zygote.take() {
            zygote.kill();
        }
        self.zygote_retry = Some(Instant::now() + ZYGOTE_RETRY);
    }

    fn retire_zygote(&mut self) {
        if let Some(zygote) = self.zygote.take() {
            zygote.retire();
        }
    }

    fn count_exit(&mut self, reason: Reason) {
        if let Some(i) = Reason::ALL.iter().position(|r| *r == reason) {
            self.retired[i] += 1;
        }
    }
}

/// How long a pool whose zygote failed execs its children before trying
/// a new zygote.
pub const ZYGOTE_RETRY: Duration = Duration::from_secs(60);

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
    /// Draws each child's lifetime.
    jitter: Jitter,
    started: Instant,
    control_tx: mpsc::Sender<ctl::Request>,
    control_rx: mpsc::Receiver<ctl::Request>,
    /// When the metrics file is next written (`None`: not configured).
    next_metrics: Option<Instant>,
    /// The last metrics write failed (logged once until one succeeds).
    metrics_failed: bool,
}

impl Master {
    pub fn new(config: Config, config_path: PathBuf, services: Vec<Service>) -> Master {
        let (events_tx, events_rx) = mpsc::channel(EVENT_QUEUE);
        let (control_tx, control_rx) = mpsc::channel(CONTROL_QUEUE);
        let now = Instant::now();
        let next_metrics = config.server.metrics_file.as_ref().map(|_| now);
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
            jitter: Jitter::from_entropy(),
            started: now,
            control_tx,
            control_rx,
            next_metrics,
            metrics_failed: false,
        }
    }

    /// Serves the control socket on a task of its own: it accepts, checks
    /// the peer, reads the request line, and hands the parsed request to
    /// this loop.
    pub fn serve_control(&self, control: ctl::Control) {
        let requests = self.control_tx.clone();
        tokio::spawn(async move {
            loop {
                match control.accept().await {
                    Ok(stream) => control.serve(stream, requests.clone()),
                    Err(e) => {
                        // EMFILE and friends: do not spin.
                        tracing::warn!("warning: control socket: accept: {e}");
                        tokio::time::sleep(ctl::ACCEPT_ERROR_BACKOFF).await;
                    }
                }
            }
        });
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
            let due = self.next_due(Instant::now()).map(tokio::time::Instant::from_std);
            tokio::select! {
                // The loop keeps a sender, so the channel never closes.
                Some(event) = self.events_rx.recv() => self.on_event(event),
                _ = ticker.tick() => self.on_tick(),
                request = signals.next() => match request {
                    Request::Stop(signal) => self.begin_stop(signal),
                    Request::Reload => {
                        let _ = self.reload();
                    }
                },
                Some(request) = self.control_rx.recv() => self.on_control(request),
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)), if deadline.is_some() => {
                    self.stop_deadline_passed();
                }
                _ = tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)), if due.is_some() => {
                    self.on_due(Instant::now());
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
        // A session starts with BUSY, or with RETIRING when it is the last
        // one (the count moves on); it ends with IDLE.
        match state {
            ChildState::Busy => entry.session_since = Some(now),
            ChildState::Retiring if sessions > entry.sessions => entry.session_since = Some(now),
            ChildState::Idle => entry.session_since = None,
            ChildState::Ready | ChildState::Retiring => {}
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
                service.ready.observe(elapsed);
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
        // A child the master terminated was expected to die of it.
        if entry.term_sent.is_none() && !entry.killed {
            log_exit(&service.program, entry.pid, &status);
        }
        let clean = status.as_ref().is_ok_and(ExitStatus::success);
        let reason = entry.exit_reason(clean);
        service.count_exit(reason);
        tracing::debug!(
            "{}: pid {} gone ({}) after {} sessions, {} ms alive, {} for {} ms",
            service.kind.name(),
            entry.pid,
            reason.as_str(),
            entry.sessions,
            entry.spawned.elapsed().as_millis(),
            entry.phase.as_str(),
            entry.changed.elapsed().as_millis()
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
                Some(policy) => pool::shortfall(&policy, &self.board.view(svc)) > 0,
                None => false,
            };
            let growing = short && !service.throttle.is_throttled(now);
            self.services[svc].rate.second_elapsed(growing);
            self.maintain(svc, true);
        }
        self.enforce(now);
    }

    /// A policy deadline (or the overload poll, or the metrics period) has
    /// come.
    fn on_due(&mut self, now: Instant) {
        self.enforce(now);
        self.check_overload(now);
        if self.next_metrics.is_some_and(|at| now >= at) {
            self.write_metrics();
            self.next_metrics = Some(now + METRICS_INTERVAL);
        }
    }

    /// The earliest instant after `now` at which something is due.
    fn next_due(&self, now: Instant) -> Option<Instant> {
        let mut due: Option<Instant> = self.next_metrics;
        let mut consider = |at: Option<Instant>| {
            if let Some(at) = at.filter(|at| *at > now) {
                due = Some(due.map_or(at, |d| d.min(at)));
            }
        };
        if self.stop.is_some() {
            return None;
        }
        for (_, entry) in self.board.iter() {
            let kind = self.services[entry.service].kind;
            consider(life::next_due(&Limits::of(&kind.life_policy(&self.config)), &entry.life()));
            let Some(policy) = kind.policy(&self.config) else { continue };
            if entry.phase == Phase::Idle && !entry.leaving() {
                consider(life::idle_due(&policy, entry.changed));
            }
        }
        if (0..self.services.len()).any(|svc| self.saturated(svc).is_some()) {
            consider(Some(now + overload::POLL));
        }
        due
    }

    /// Applies the lifetime policy (`life`) to every child of a
    /// pool: retires children at their lifetime and idle extras, sends
    /// SIGTERM past a session deadline or the overdue grace, and SIGKILL
    /// after it. The replacement of a busy child leaving for its lifetime
    /// is spawned now, before it goes.
    fn enforce(&mut self, now: Instant) {
        if self.stop.is_some() {
            return;
        }
        let mut touched = vec![false; self.services.len()];
        let mut replace = vec![0u32; self.services.len()];
        for (_, entry) in self.board.iter_mut() {
            let service = &self.services[entry.service];
            let limits = Limits::of(&service.kind.life_policy(&self.config));
            match life::verdict(&limits, &entry.life(), now) {
                Verdict::Keep => continue,
                Verdict::Retire(reason) => {
                    if entry.session_since.is_some() {
                        replace[entry.service] += 1;
                        tracing::debug!(
                            "{}: pid {} reached its lifetime in a session: overdue, replacing it",
                            service.kind.name(),
                            entry.pid
                        );
                    }
                    entry.retire_for(reason);
                }
                Verdict::Terminate(reason) => {
                    let why = match reason {
                        Reason::Deadline => "session deadline exceeded".to_owned(),
                        _ => format!("still running {}s after its lifetime", limits.overdue_grace.as_secs_f64()),
                    };
                    tracing::warn!("warning: process {} pid {}: {why}, killing", service.program.display(), entry.pid);
                    entry.terminate(reason, now);
                }
                Verdict::Kill => {
                    tracing::warn!(
                        "warning: process {} pid {}: still running {}s after SIGTERM -- killed",
                        service.program.display(),
                        entry.pid,
                        limits.term_grace.as_secs_f64()
                    );
                    entry.kill();
                }
            }
            touched[entry.service] = true;
        }
        for (svc, touched) in touched.iter_mut().enumerate() {
            *touched |= self.retire_idle(svc, now);
        }
        for svc in 0..self.services.len() {
            if replace[svc] > 0 {
                self.replace(svc, replace[svc]);
            }
            if touched[svc] {
                self.maintain(svc, false);
            }
        }
    }

    /// Retires children idle for `max_idle`, longest idle first, as long
    /// as the pool keeps `min_spare` idle children. Returns whether any was.
    fn retire_idle(&mut self, svc: ServiceId, now: Instant) -> bool {
        let Some(policy) = self.services[svc].kind.policy(&self.config) else { return false };
        let view = self.board.view(svc);
        let allowed = view.idle.saturating_sub(policy.min_spare) as usize;
        let mut expired: Vec<(Instant, ChildId)> = self
            .board
            .iter()
            .filter(|(_, e)| e.service == svc && e.phase == Phase::Idle && !e.leaving())
            .filter(|(_, e)| life::idle_expired(&policy, e.changed, now))
            .map(|(id, e)| (e.changed, *id))
            .collect();
        expired.sort();
        expired.truncate(allowed);
        for (_, id) in &expired {
            if let Some(entry) = self.board.get_mut(*id) {
                tracing::debug!("{}: retiring pid {}: idle for max_idle", self.services[svc].kind.name(), entry.pid);
                entry.retire_for(Reason::Idle);
            }
        }
        !expired.is_empty()
    }

    /// Spawns up to `n` successors for busy children that will leave after
    /// their session, within `process_limit`, and only while the pool is
    /// below `max_spare` (a spare that would be retired at once helps
    /// nobody). Outside the spawn rate: replacing is not growth.
    fn replace(&mut self, svc: ServiceId, n: u32) {
        let Some(policy) = self.services[svc].kind.policy(&self.config) else { return };
        for _ in 0..n {
            let view = self.board.view(svc);
            if pool::room(&policy, &view) == 0 || view.spare() >= policy.max_spare {
                return;
            }
            if !self.spawn_one(svc) {
                return;
            }
        }
    }

    /// For a TCP pool at `process_limit` with no idle or starting child:
    /// its `overload_wait`.
    fn saturated(&self, svc: ServiceId) -> Option<Duration> {
        let service = &self.services[svc];
        // The hand-off socket behind postscreen is not TCP: postscreen
        // answers its own clients when no smtpd takes them.
        if service.kind != ServiceKind::Smtpd
            || service.socket_file.is_some()
            || service.listener.is_none()
            || self.stop.is_some()
        {
            return None;
        }
        let policy = service.kind.policy(&self.config)?;
        let wait = policy.overload_wait;
        let view = self.board.view(svc);
        let full = view.spare() == 0 && pool::room(&policy, &view) == 0;
        (full && !wait.is_zero()).then_some(wait)
    }

    /// Answers clients that waited `overload_wait` in a saturated pool's
    /// backlog with `421 4.3.2 ... Service busy` (`overload`).
    fn check_overload(&mut self, now: Instant) {
        for svc in 0..self.services.len() {
            let wait = self.saturated(svc);
            let service = &mut self.services[svc];
            let Some(listener) = &service.listener else { continue };
            let waiting = wait.is_some() && overload::has_waiting(listener);
            if service.overload.check(wait.is_some(), waiting, wait.unwrap_or_default(), now) != Check::Reject {
                continue;
            }
            let reply = overload::busy_reply(&self.config.server.hostname);
            let n = overload::reject_waiting(listener, &reply);
            if service.overload.first_of_episode() {
                tracing::warn!(
                    "warning: service \"{}\" ({}): every process busy for {}s: answering waiting clients 421 4.3.2 Service busy",
                    service.kind.name(),
                    service.endpoint,
                    wait.unwrap_or_default().as_secs_f64()
                );
            }
            tracing::debug!("{}: {n} waiting clients answered 421", service.kind.name());
            service.overload.rejected(n);
        }
    }

    fn on_control(&mut self, request: ctl::Request) {
        let answer = match request.command {
            ControlRequest::Status => match serde_json::to_string(&self.snapshot().to_doc()) {
                Ok(doc) => format!("{doc}\n"),
                Err(e) => format!("{CONTROL_ERROR} status document: {e}\n"),
            },
            ControlRequest::Reload => {
                tracing::info!("reload requested on the control socket by uid {}", request.uid);
                match self.reload() {
                    Ok(()) => format!("{CONTROL_OK}\n"),
                    Err(errors) => errors.iter().map(|e| format!("{CONTROL_ERROR} {e}\n")).collect(),
                }
            }
            ControlRequest::Stop => {
                tracing::info!("stop requested on the control socket by uid {}", request.uid);
                self.begin_stop(nix::sys::signal::Signal::SIGTERM as i32);
                format!("{CONTROL_OK}\n")
            }
        };
        // The operator may have given up waiting: nothing to do then.
        let _ = request.reply.send(answer);
    }

    /// A copy of the scoreboard for `mortal status` and the metrics file.
    pub fn snapshot(&self) -> Snapshot {
        let now = Instant::now();
        let services = self
            .services
            .iter()
            .map(|s| ServiceStat {
                service: s.kind,
                endpoint: s.endpoint.clone(),
                process_limit: Some(s.kind.policy(&self.config).map_or(1, |p| p.process_limit)),
                throttled: s.throttle.is_throttled(now),
                at_limit: s.limit_warned,
                spawns: s.spawns,
                retired: s.retired,
                overload_rejects: s.overload.rejected,
                ready: s.ready.clone(),
            })
            .collect();
        let children = self
            .board
            .iter()
            .map(|(_, e)| ChildStat {
                pid: e.pid,
                service: e.service,
                generation: e.generation,
                state: e.state(now),
                sessions: e.sessions,
                age: now.saturating_duration_since(e.spawned),
                since: now.saturating_duration_since(e.changed),
                life: e.life_end.map(|end| end.saturating_duration_since(e.spawned)),
            })
            .collect();
        Snapshot {
            pid: std::process::id(),
            generation: self.generation,
            uptime: now.saturating_duration_since(self.started),
            stopping: self.stop.is_some(),
            services,
            children,
        }
    }

    fn write_metrics(&mut self) {
        let Some(path) = self.config.server.metrics_file.clone() else { return };
        match stat::write_atomically(&path, &self.snapshot().to_prometheus()) {
            Ok(()) => self.metrics_failed = false,
            Err(e) if !self.metrics_failed => {
                self.metrics_failed = true;
                tracing::warn!("warning: metrics_file {}: {e}", path.display());
            }
            Err(_) => {}
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
            if pool::single_needs_spawn(&view) && !throttled {
                self.spawn_one(svc);
            }
            return;
        };
        let service = &mut self.services[svc];
        let plan = pool::plan(&policy, &view, service.rate.allowance());
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
                    entry.retire_for(Reason::Idle);
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
                entry.retire_for(Reason::Reload);
                retired += 1;
            }
        }
        self.services[svc].rate.grant(retired);
    }

    /// Spawns one child of `svc`; false when that failed (logged, and
    /// counted as a bad start) or the service no longer listens.
    fn spawn_one(&mut self, svc: ServiceId) -> bool {
        let service = &mut self.services[svc];
        if service.listener.is_none() {
            return false;
        }
        let id = ChildId(self.next_id);
        self.next_id += 1;
        let policy = service.kind.life_policy(&self.config);
        // Before the fork, so READY latency includes fork and exec.
        let started = Instant::now();
        match service.start_child(id, &self.config_path, self.generation, &policy, &self.events_tx) {
            Ok(spawned) => {
                let mut entry = Entry::new(spawned.pid, svc, self.generation, started, spawned.orders);
                entry.life_end = life::draw_life(&policy, self.jitter.unit()).map(|life| started + life);
                service.spawns += 1;
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
            service.retire_zygote();
        }
        for (_, entry) in self.board.iter_mut() {
            entry.retire_for(Reason::Stop);
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

    /// Re-reads the configuration; on errors keeps the current one and
    /// returns them.
    fn reload(&mut self) -> Result<(), Vec<String>> {
        if self.stop.is_some() {
            return Err(vec!["the mail system is stopping".into()]);
        }
        let new = match Config::load(&self.config_path) {
            Ok(new) => new,
            Err(errors) => {
                for e in &errors {
                    tracing::warn!("warning: reload: {e}");
                }
                tracing::warn!("warning: reload failed: keeping the current configuration");
                return Err(errors.iter().map(ToString::to_string).collect());
            }
        };
        let old = &self.config;
        if new.smtpd.listen != old.smtpd.listen
            || new.smtpd.proxy_listen != old.smtpd.proxy_listen
            || new.smtpd.submission_listen != old.smtpd.submission_listen
            || new.smtpd.submissions_listen != old.smtpd.submissions_listen
            || new.server.spool_dir != old.server.spool_dir
            || new.run_dir() != old.run_dir()
            || new.postscreen.enabled != old.postscreen.enabled
        {
            tracing::warn!(
                "warning: reload: smtpd.listen, smtpd.proxy_listen, smtpd.submission_listen, smtpd.submissions_listen, server.spool_dir, server.run_dir and postscreen.enabled take effect only on restart"
            );
        }
        for agent in new.agents() {
            if self.services.iter().any(|s| s.kind == agent) {
                continue;
            }
            if agent == ServiceKind::Pipe {
                tracing::warn!(
                    "warning: reload: the pipe service starts only on restart: until then, mail routed to pipe is deferred"
                );
            } else {
                tracing::warn!(
                    "warning: reload: the {} delivery agent starts only on restart: until then, mail routed to it is deferred",
                    agent.name()
                );
            }
        }
        if new.log.format != old.log.format || new.log.level != old.log.level {
            tracing::warn!("warning: reload: the master's own [log] settings take effect only on restart");
        }
        let now = Instant::now();
        self.next_metrics = new.server.metrics_file.as_ref().map(|_| now);
        self.config = new;
        self.generation += 1;
        // Their children would read the old configuration.
        for service in &mut self.services {
            service.retire_zygote();
        }
        tracing::info!("reload -- version {}, configuration {}", crate::VERSION, self.config_path.display());
        for svc in 0..self.services.len() {
            self.maintain(svc, false);
        }
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use mortal_proto::service::Shape;

    #[test]
    fn a_pool_policy_exactly_for_pool_services() {
        let config = Config::parse("[server]\nhostname = \"mx.test\"\n", Path::new("/m.toml")).unwrap();
        for kind in ServiceKind::ALL {
            assert_eq!(kind.policy(&config).is_some(), kind.shape() == Shape::Pool, "{kind}");
        }
    }
}

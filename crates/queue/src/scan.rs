//! The scheduler: recovery, queue scans, and the pool of delivery workers.
//!
//! Only this thread moves files between queue directories (workers move
//! only the file they were handed, out of `active/`), so no two parties
//! ever race for one queue file. A message is in `active/` exactly while a
//! worker owns it or it waits in the job channel.

use crate::Event;
use crate::deliver;
use crate::route::Agents;
use mortal_libmaster::child::ExitReason;
use mortal_proto::config::Config;
use mortal_proto::queue_id::QueueId;
use mortal_proto::spool::{QueueDir, SpoolName};
use std::collections::HashSet;
use std::fs;
use std::io;
use std::path::Path;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

#[derive(Debug)]
pub struct Scheduler {
    in_flight: HashSet<QueueId>,
    jobs: Option<Sender<QueueId>>,
    workers: Vec<std::thread::JoinHandle<()>>,
    /// Routing, destination slots and idle sessions, shared with the workers.
    agents: Arc<Agents>,
    /// A scan found more work than `active_limit` allowed: scan again as
    /// soon as a slot frees up.
    backlog: bool,
}

impl Scheduler {
    /// Creates missing queue directories and recovers `active/`.
    pub fn start(config: &Config) -> io::Result<Self> {
        config.spool().create_dirs()?;
        fs::create_dir_all(config.maildir_root())?;
        recover(config)?;
        Ok(Self {
            in_flight: HashSet::new(),
            jobs: None,
            workers: Vec::new(),
            backlog: false,
            agents: Arc::new(Agents::new(config.clone())),
        })
    }

    /// Runs until the master stops us, then lets running deliveries finish.
    pub fn run(&mut self, config: &Config, inbox: &Receiver<Event>, events: &Sender<Event>) {
        self.spawn_workers(config, events);
        self.scan(config);
        let mut next_scan = SystemTime::now() + config.queue.scan_interval;
        loop {
            let wait = next_scan.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO);
            match inbox.recv_timeout(wait) {
                Ok(Event::Wake) => self.scan(config),
                Ok(Event::Done(id, outcome)) => {
                    tracing::debug!("{id}: attempt done: {outcome:?}");
                    self.in_flight.remove(&id);
                    if self.backlog {
                        self.scan(config);
                    }
                }
                Ok(Event::Stop(reason)) => return self.shut_down(reason),
                Err(RecvTimeoutError::Timeout) => {
                    self.agents.conns.expire();
                    self.scan(config);
                    next_scan = SystemTime::now() + config.queue.scan_interval;
                }
                Err(RecvTimeoutError::Disconnected) => return self.shut_down(ExitReason::MasterGone),
            }
        }
    }

    fn spawn_workers(&mut self, config: &Config, events: &Sender<Event>) {
        let (jobs, queue) = mpsc::channel::<QueueId>();
        let queue = Arc::new(Mutex::new(queue));
        for _ in 0..config.queue.delivery_concurrency {
            let (queue, events, agents) = (Arc::clone(&queue), events.clone(), Arc::clone(&self.agents));
            self.workers.push(std::thread::spawn(move || {
                loop {
                    let next = queue.lock().map(|q| q.recv());
                    let Ok(Ok(id)) = next else { return };
                    let (outcome, queued_mail) = deliver::deliver(&agents, &id);
                    // A DSN just written to incoming/ is scanned for at once.
                    if queued_mail && events.send(Event::Wake).is_err() {
                        return;
                    }
                    if events.send(Event::Done(id, outcome)).is_err() {
                        return;
                    }
                }
            }));
        }
        self.jobs = Some(jobs);
    }

    /// Moves due messages into `active/` and queues them for the workers,
    /// oldest first, up to `active_limit` at once.
    fn scan(&mut self, config: &Config) {
        let now = SystemTime::now();
        let spool = config.spool();
        let mut due: Vec<(QueueId, QueueDir)> = Vec::new();
        for (dir, only_due) in [(QueueDir::Incoming, false), (QueueDir::Deferred, true)] {
            let path = spool.dir(dir);
            let entries = match fs::read_dir(&path) {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!("warning: scan {}: {e}", path.display());
                    continue;
                }
            };
            for entry in entries.flatten() {
                match SpoolName::of(&entry.file_name()) {
                    SpoolName::Queued(id) => {
                        let ready = !only_due || entry.metadata().and_then(|m| m.modified()).is_ok_and(|t| t <= now);
                        if ready && !self.in_flight.contains(&id) {
                            due.push((id, dir));
                        }
                    }
                    SpoolName::Temp(id) if dir == QueueDir::Incoming => {
                        remove_if_orphaned(&entry.path(), &id, config);
                    }
                    SpoolName::Temp(_) | SpoolName::Other => {}
                }
            }
        }
        due.sort();
        let room = (config.queue.active_limit as usize).saturating_sub(self.in_flight.len());
        self.backlog = due.len() > room;
        for (id, dir) in due.into_iter().take(room) {
            match fs::rename(spool.path(dir, &id), spool.path(QueueDir::Active, &id)) {
                Ok(()) => {}
                // An operator command (hold, delete) renamed it first: the
                // file is theirs now, which is normal.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    tracing::debug!("{id}: gone from {dir}/ before the move to active/");
                    continue;
                }
                Err(e) => {
                    tracing::warn!("warning: {id}: move {dir}/ to active/: {e}");
                    continue;
                }
            }
            self.dispatch(id);
        }
    }

    fn dispatch(&mut self, id: QueueId) {
        self.in_flight.insert(id);
        if let Some(jobs) = &self.jobs
            && jobs.send(id).is_err()
        {
            tracing::error!("error: delivery workers are gone");
        }
    }

    fn shut_down(&mut self, reason: ExitReason) {
        tracing::debug!("exit: {}; waiting for {} deliveries", reason.as_str(), self.in_flight.len());
        // Closing the job channel ends each worker after its current job;
        // messages still waiting in the channel stay in active/ and are
        // recovered by the next queue manager.
        self.jobs = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        self.agents.conns.expire_all();
    }
}

/// After a crash, `active/` holds messages that were being delivered:
/// put them back in `incoming/` (a recipient delivered just before the
/// crash may get a second copy; none is lost). Half-rewritten state files
/// are dropped: the original next to them is intact.
fn recover(config: &Config) -> io::Result<()> {
    let spool = config.spool();
    let mut recovered = 0;
    for entry in fs::read_dir(spool.dir(QueueDir::Active))? {
        let entry = entry?;
        let name = entry.file_name();
        let result = match SpoolName::of(&name) {
            SpoolName::Queued(id) => {
                fs::rename(entry.path(), spool.path(QueueDir::Incoming, &id)).map(|()| recovered += 1)
            }
            SpoolName::Temp(_) => fs::remove_file(entry.path()),
            SpoolName::Other => Ok(()),
        };
        match result {
            // Renamed away by an operator command meanwhile: theirs now.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                tracing::debug!("{}: gone from active/ during recovery", name.to_string_lossy())
            }
            other => other?,
        }
    }
    if recovered > 0 {
        tracing::info!("recovered {recovered} message(s) from active/");
    }
    Ok(())
}

/// Removes `incoming/<id>.tmp` once the cleanup process that was writing
/// it is gone (its pid is in the id), or the file is older than any
/// transaction may last.
fn remove_if_orphaned(path: &Path, id: &QueueId, config: &Config) {
    let pid = id.pid();
    let writer_alive = pid != 0 && Path::new(&format!("/proc/{pid}")).exists();
    let age = fs::metadata(path).and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok()).unwrap_or_default();
    if (!writer_alive || age > config.cleanup.ipc_timeout * 2) && fs::remove_file(path).is_ok() {
        tracing::info!("{id}: removed unfinished queue file (writer gone)");
    }
}

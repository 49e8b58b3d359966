//! queue relocate: `delete`, `hold`, `release`, `requeue` and `flush` (Postfix
//! `postsuper -d/-h/-H/-r`, `postqueue -f/-i`), safe while the queue runs.
//!
//! The operator lock protocol (docs/queue-format.md): the queue manager
//! owns `active/` and is the only one to move files into it; the operator
//! touches files only outside `active/`, and only with single atomic system
//! calls (rename without replace, unlink, a timestamp update). Whoever's
//! call comes first wins the file; the other finds it gone (ENOENT) and
//! backs off. So a message being delivered is never held, deleted or moved
//! half-way: the command reports it as busy instead.
//!
//! After a lost race the message is looked for again and reported as it is
//! now (delivered, moved on, being delivered), never guessed.

use super::fmt::count;
use super::perm;
use super::spool::{self, Filter, QueueDir};
use mortal_proto::config::Config;
use mortal_proto::queue_id::QueueId;
use nix::errno::Errno;
use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{self, ErrorKind, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Tries at finding a message that moves between directories while we act
/// on it (each move is one rename, so a few tries always catch it still).
const LOCATE_ATTEMPTS: usize = 3;
/// Pause between those tries.
const LOCATE_PAUSE: Duration = Duration::from_millis(10);
/// Longest a wake-up of the queue manager may take.
const WAKE_TIMEOUT: Duration = Duration::from_secs(2);

/// A queue-changing command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Delete,
    Hold,
    Release,
    Requeue,
    Flush,
}

/// What happened to one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Done; the message was in this queue.
    Done(QueueDir),
    /// Nothing to do: it already is where the command would put it.
    Settled(QueueDir),
    /// It is in `active/`: being delivered. Nothing was done.
    Busy,
    /// It is in a queue this command does not act on. Nothing was done.
    Elsewhere(QueueDir),
    /// No queue holds it (delivered, deleted, or never there).
    Missing,
}

impl Action {
    /// Queues a message is taken from.
    pub fn sources(self) -> &'static [QueueDir] {
        use QueueDir::*;
        match self {
            Action::Delete => &[Incoming, Deferred, Hold, Corrupt],
            Action::Hold => &[Incoming, Deferred],
            Action::Release => &[Hold],
            Action::Requeue | Action::Flush => &[Deferred],
        }
    }

    /// Where a rename puts it; `None` for actions that do not rename.
    fn target(self) -> Option<QueueDir> {
        match self {
            Action::Hold => Some(QueueDir::Hold),
            Action::Release | Action::Requeue => Some(QueueDir::Incoming),
            Action::Delete | Action::Flush => None,
        }
    }

    /// Queues where the message already is in the state asked for.
    fn settled(self) -> &'static [QueueDir] {
        match self {
            Action::Hold => &[QueueDir::Hold],
            Action::Requeue | Action::Flush => &[QueueDir::Incoming],
            Action::Delete | Action::Release => &[],
        }
    }

    /// Queues whose directories this action changes (their owner or root
    /// may run it).
    pub fn changes(self) -> Vec<QueueDir> {
        let mut queues = self.sources().to_vec();
        queues.extend(self.target());
        queues
    }

    /// Queues searched for `--all` and filters: the sources, plus `active/`
    /// for the actions that stop a message, so what is being delivered is
    /// reported rather than silently skipped.
    pub fn scanned(self) -> Vec<QueueDir> {
        let mut queues = self.sources().to_vec();
        if matches!(self, Action::Delete | Action::Hold) {
            queues.push(QueueDir::Active);
        }
        queues
    }

    /// Whether the queue manager should look at the queue afterwards.
    fn wakes(self) -> bool {
        matches!(self, Action::Release | Action::Requeue | Action::Flush)
    }

    fn done_text(self) -> &'static str {
        match self {
            Action::Delete => "removed",
            Action::Hold => "placed on hold",
            Action::Release => "released from hold",
            Action::Requeue => "requeued",
            Action::Flush => "scheduled for delivery now",
        }
    }

    /// `postsuper`'s summary words.
    fn summary_text(self) -> &'static str {
        match self {
            Action::Delete => "Deleted",
            Action::Hold => "Placed on hold",
            Action::Release => "Released from hold",
            Action::Requeue => "Requeued",
            Action::Flush => "Scheduled",
        }
    }
}

/// The line reported for one message, and whether it is a problem (goes
/// to stderr and sets the exit status).
pub fn describe(action: Action, id: &QueueId, outcome: Outcome) -> (bool, String) {
    match outcome {
        Outcome::Done(_) => (false, format!("{id}: {}", action.done_text())),
        Outcome::Settled(QueueDir::Hold) => (false, format!("{id}: already on hold")),
        Outcome::Settled(q) => (false, format!("{id}: already waiting for delivery (in {}/)", q.name())),
        Outcome::Busy => (true, format!("{id}: being delivered, try again")),
        Outcome::Elsewhere(QueueDir::Hold) => {
            (true, format!("{id}: on hold: release it first (mortal queue release {id})"))
        }
        Outcome::Elsewhere(q) if action == Action::Release => (true, format!("{id}: not on hold (in {}/)", q.name())),
        Outcome::Elsewhere(q) => (true, format!("{id}: in {}/, which {} does not act on", q.name(), verb(action))),
        Outcome::Missing => (true, format!("{id}: not in the queue (delivered, deleted, or never queued)")),
    }
}

fn verb(action: Action) -> &'static str {
    match action {
        Action::Delete => "delete",
        Action::Hold => "hold",
        Action::Release => "release",
        Action::Requeue => "requeue",
        Action::Flush => "flush",
    }
}

/// Applies `action` to message `id` (a valid queue id) by the protocol.
pub fn apply(config: &Config, action: Action, id: &QueueId, synced: &mut BTreeSet<PathBuf>) -> anyhow::Result<Outcome> {
    for attempt in 0..LOCATE_ATTEMPTS {
        if attempt > 0 {
            std::thread::sleep(LOCATE_PAUSE);
        }
        for &from in action.sources() {
            match act(config, action, from, id) {
                Ok(()) => {
                    synced.insert(config.spool().dir(from));
                    synced.extend(action.target().map(|q| config.spool().dir(q)));
                    return Ok(Outcome::Done(from));
                }
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) if e.raw_os_error() == Some(Errno::EEXIST as i32) => {
                    let to = action.target().map_or("?", QueueDir::name);
                    anyhow::bail!("{id}: in both {}/ and {to}/: left alone, resolve by hand", from.name());
                }
                Err(e) => return Err(perm::io_error(&config.spool().path(from, id), e)),
            }
        }
        // Lost a race, or never there: where is it now?
        match spool::locate(config, id)? {
            Some(q) if action.settled().contains(&q) => return Ok(Outcome::Settled(q)),
            Some(QueueDir::Active) => return Ok(Outcome::Busy),
            // It moved back into a source (a delivery attempt ended): try again.
            Some(q) if action.sources().contains(&q) => {}
            Some(q) => return Ok(Outcome::Elsewhere(q)),
            None => {}
        }
    }
    Ok(Outcome::Missing)
}

/// One system call on `<from>/<id>`.
fn act(config: &Config, action: Action, from: QueueDir, id: &QueueId) -> io::Result<()> {
    let spool = config.spool();
    let path = spool.path(from, id);
    match action {
        Action::Delete => fs::remove_file(&path),
        Action::Flush => make_due_now(&path),
        Action::Hold | Action::Release | Action::Requeue => {
            let to = spool.path(action.target().expect("renaming actions have a target"), id);
            rename_no_replace(&path, &to)
        }
    }
}

/// A deferred file's mtime is its retry time: setting it to now makes the
/// next scan take it. Path-based, so a file the scheduler renamed away a
/// moment ago gives ENOENT instead of being touched in `active/`.
fn make_due_now(path: &Path) -> io::Result<()> {
    use nix::sys::stat::{UtimensatFlags, utimensat};
    use nix::sys::time::TimeSpec;
    utimensat(nix::fcntl::AT_FDCWD, path, &TimeSpec::UTIME_OMIT, &TimeSpec::UTIME_NOW, UtimensatFlags::NoFollowSymlink)
        .map_err(io::Error::from)
}

/// `rename` that fails with EEXIST instead of replacing: two copies of one
/// id must never silently become one.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn rename_no_replace(from: &Path, to: &Path) -> io::Result<()> {
    use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};
    renameat2(AT_FDCWD, from, AT_FDCWD, to, RenameFlags::RENAME_NOREPLACE).map_err(io::Error::from)
}

/// Without renameat2 the target is checked first; the queue manager never
/// creates files outside `active/`, `deferred/` and `corrupt/`, so only
/// another operator command could slip in between.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn rename_no_replace(from: &Path, to: &Path) -> io::Result<()> {
    if fs::symlink_metadata(to).is_ok() {
        return Err(io::Error::from_raw_os_error(Errno::EEXIST as i32));
    }
    fs::rename(from, to)
}

/// Makes the renames durable: a hold must survive a power cut.
pub fn sync_dirs(dirs: &BTreeSet<PathBuf>) -> anyhow::Result<()> {
    for dir in dirs {
        File::open(dir).and_then(|d| d.sync_all()).map_err(|e| perm::io_error(dir, e))?;
    }
    Ok(())
}

/// Tells the queue manager to scan now: one byte on its socket, as cleanup
/// does. Non-blocking: a full backlog means wake-ups are already pending.
pub fn wake(config: &Config) -> io::Result<()> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket};
    let path = config.queue_socket();
    let fd = socket(AddressFamily::Unix, SockType::Stream, SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK, None)?;
    match connect(fd.as_raw_fd(), &UnixAddr::new(&path)?) {
        Ok(()) | Err(Errno::EINPROGRESS) => {}
        Err(Errno::EAGAIN) => return Ok(()),
        Err(e) => return Err(e.into()),
    }
    let mut stream = std::os::unix::net::UnixStream::from(fd);
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(WAKE_TIMEOUT))?;
    stream.write_all(b"W")
}

/// The ids `filter` selects (all of `action`'s queues when `all`).
pub fn select(config: &Config, action: Action, filter: &Filter) -> anyhow::Result<Vec<QueueId>> {
    let queues = if filter.queues.is_empty() { action.scanned() } else { filter.queues.clone() };
    perm::may_read(config, &queues)?;
    let now = std::time::SystemTime::now();
    let mut ids = Vec::new();
    for entry in spool::entries(config, &queues)? {
        if !filter.matches_entry(&entry, now) {
            continue;
        }
        if filter.needs_envelope() {
            match spool::load(&entry)? {
                Some(Ok(qf)) if filter.matches_envelope(&qf) => {}
                _ => continue,
            }
        }
        ids.push(entry.id);
    }
    Ok(ids)
}

/// Tally of a command's outcomes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub done: usize,
    pub busy: usize,
    pub missing: usize,
}

/// Runs `action` on `ids`, reporting each; then syncs and wakes.
pub fn run(config: &Config, action: Action, ids: &[QueueId], out: &mut impl Write) -> anyhow::Result<Tally> {
    perm::may_change(config, &action.changes())?;
    let mut tally = Tally::default();
    let mut synced = BTreeSet::new();
    for id in ids {
        let outcome = apply(config, action, id, &mut synced)?;
        let (problem, line) = describe(action, id, outcome);
        match outcome {
            Outcome::Done(_) => tally.done += 1,
            Outcome::Busy => tally.busy += 1,
            Outcome::Elsewhere(_) | Outcome::Missing => tally.missing += 1,
            Outcome::Settled(_) => {}
        }
        if problem {
            eprintln!("mortal: {line}");
        } else {
            writeln!(out, "{line}")?;
        }
    }
    sync_dirs(&synced)?;
    // A flush wakes the queue even with nothing deferred: mail waiting in
    // incoming/ is what the operator wants moving.
    if action.wakes()
        && (tally.done > 0 || action == Action::Flush)
        && let Err(e) = wake(config)
    {
        eprintln!(
            "mortal: could not wake the queue manager ({}: {e}); it will notice within [queue] scan_interval ({})",
            config.queue_socket().display(),
            humantime::format_duration(config.queue.scan_interval),
        );
    }
    eprintln!("mortal: {}: {}", action.summary_text(), count(tally.done, "message"));
    Ok(tally)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports() {
        let id = &QueueId::parse("0000000010000100000A").unwrap();
        let table: &[(Action, Outcome, bool, &str)] = &[
            (Action::Delete, Outcome::Done(QueueDir::Deferred), false, "removed"),
            (Action::Hold, Outcome::Settled(QueueDir::Hold), false, "already on hold"),
            (
                Action::Requeue,
                Outcome::Settled(QueueDir::Incoming),
                false,
                "already waiting for delivery (in incoming/)",
            ),
            (Action::Delete, Outcome::Busy, true, "being delivered, try again"),
            (Action::Release, Outcome::Elsewhere(QueueDir::Deferred), true, "not on hold (in deferred/)"),
            (
                Action::Requeue,
                Outcome::Elsewhere(QueueDir::Hold),
                true,
                &format!("on hold: release it first (mortal queue release {id})"),
            ),
            (Action::Hold, Outcome::Elsewhere(QueueDir::Corrupt), true, "in corrupt/, which hold does not act on"),
            (Action::Hold, Outcome::Missing, true, "not in the queue (delivered, deleted, or never queued)"),
        ];
        for &(action, outcome, problem, text) in table {
            assert_eq!(describe(action, id, outcome), (problem, format!("{id}: {text}")), "{action:?} {outcome:?}");
        }
    }

    #[test]
    fn active_is_never_a_source_nor_a_target() {
        for action in [Action::Delete, Action::Hold, Action::Release, Action::Requeue, Action::Flush] {
            assert!(!action.sources().contains(&QueueDir::Active), "{action:?}");
            assert!(!action.changes().contains(&QueueDir::Active), "{action:?}");
            assert_ne!(action.target(), Some(QueueDir::Active), "{action:?}");
        }
    }

    /// A spool in a temp directory, removed when the directory drops.
    fn spool() -> (tempfile::TempDir, Config) {
        let dir = tempfile::tempdir().unwrap();
        let config = Config::parse("[server]\nspool_dir = \"spool\"\n", &dir.path().join("mortal.toml")).unwrap();
        for q in QueueDir::ALL {
            fs::create_dir_all(config.spool().dir(q)).unwrap();
        }
        (dir, config)
    }

    #[test]
    fn protocol_moves_and_reports_where_the_message_is() {
        let (_dir, config) = spool();
        let id = &QueueId::parse("0000000010000100000A").unwrap();
        let put = |q: QueueDir| fs::write(config.spool().path(q, id), b"x").unwrap();
        let mut synced = BTreeSet::new();
        put(QueueDir::Deferred);
        assert_eq!(apply(&config, Action::Hold, id, &mut synced).unwrap(), Outcome::Done(QueueDir::Deferred));
        assert!(config.spool().path(QueueDir::Hold, id).exists());
        assert_eq!(apply(&config, Action::Hold, id, &mut synced).unwrap(), Outcome::Settled(QueueDir::Hold));
        assert_eq!(apply(&config, Action::Requeue, id, &mut synced).unwrap(), Outcome::Elsewhere(QueueDir::Hold));
        assert_eq!(apply(&config, Action::Release, id, &mut synced).unwrap(), Outcome::Done(QueueDir::Hold));
        assert!(config.spool().path(QueueDir::Incoming, id).exists());
        assert_eq!(apply(&config, Action::Flush, id, &mut synced).unwrap(), Outcome::Settled(QueueDir::Incoming));
        // What the scheduler does next: the message is being delivered.
        fs::rename(config.spool().path(QueueDir::Incoming, id), config.spool().path(QueueDir::Active, id)).unwrap();
        for action in [Action::Delete, Action::Hold, Action::Requeue, Action::Flush] {
            assert_eq!(apply(&config, action, id, &mut synced).unwrap(), Outcome::Busy, "{action:?}");
        }
        assert!(config.spool().path(QueueDir::Active, id).exists(), "active/ is never touched");
        fs::remove_file(config.spool().path(QueueDir::Active, id)).unwrap();
        assert_eq!(apply(&config, Action::Delete, id, &mut synced).unwrap(), Outcome::Missing);
        sync_dirs(&synced).unwrap();
    }

    #[test]
    fn hold_never_replaces_a_file_of_the_same_id() {
        let (_dir, config) = spool();
        let id = &QueueId::parse("0000000010000100000A").unwrap();
        fs::write(config.spool().path(QueueDir::Deferred, id), b"deferred copy").unwrap();
        fs::write(config.spool().path(QueueDir::Hold, id), b"held copy").unwrap();
        let err = apply(&config, Action::Hold, id, &mut BTreeSet::new()).unwrap_err();
        assert!(err.to_string().contains("in both deferred/ and hold/"), "{err}");
        assert_eq!(fs::read(config.spool().path(QueueDir::Hold, id)).unwrap(), b"held copy");
        assert_eq!(fs::read(config.spool().path(QueueDir::Deferred, id)).unwrap(), b"deferred copy");
    }

    #[test]
    fn flush_makes_a_deferred_file_due() {
        let (_dir, config) = spool();
        let id = &QueueId::parse("0000000010000100000A").unwrap();
        let path = config.spool().path(QueueDir::Deferred, id);
        fs::write(&path, b"x").unwrap();
        let later = std::time::SystemTime::now() + Duration::from_secs(3600);
        File::options().write(true).open(&path).unwrap().set_modified(later).unwrap();
        assert_eq!(apply(&config, Action::Flush, id, &mut BTreeSet::new()).unwrap(), Outcome::Done(QueueDir::Deferred));
        let mtime = fs::metadata(&path).unwrap().modified().unwrap();
        assert!(mtime <= std::time::SystemTime::now(), "due now");
    }
}

//! pid: the pid file, which is also the "one master" lock.
//!
//! The file is opened and `flock`ed before the master touches any socket:
//! the lock is what keeps a second master from unlinking the first one's
//! Unix sockets. The kernel drops the lock when the master dies, however it
//! dies, so a stale file never blocks a restart. The pid is written only
//! once every socket is bound, which is what `mortal start` waits for.

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Mode of the pid file: readable by the operator's tools.
const PID_FILE_MODE: u32 = 0o644;
/// Name every running master has in `/proc/<pid>/comm`.
const MASTER_COMM: &str = "mortal-master";

/// A locked pid file, held for the master's lifetime.
#[derive(Debug)]
pub struct PidFile {
    path: PathBuf,
    file: Flock<File>,
}

/// Why the pid file could not be taken.
#[derive(Debug)]
pub enum PidError {
    /// Another master holds it (`pid` when the file names one).
    Running(Option<u32>),
    Io(io::Error),
}

impl std::fmt::Display for PidError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PidError::Running(Some(pid)) => write!(f, "the mail system is already running (master pid {pid})"),
            PidError::Running(None) => write!(f, "the mail system is already running (pid file is locked)"),
            PidError::Io(e) => write!(f, "{e}"),
        }
    }
}

impl From<io::Error> for PidError {
    fn from(e: io::Error) -> Self {
        PidError::Io(e)
    }
}

impl PidFile {
    /// Opens and locks `path`. Refuses when another master holds the lock,
    /// or when the file names a live process that is a mortal master (one
    /// whose pid file was deleted and replaced under it).
    pub fn lock(path: &Path) -> Result<PidFile, PidError> {
        let file =
            OpenOptions::new().read(true).write(true).create(true).truncate(false).mode(PID_FILE_MODE).open(path)?;
        let mut file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(locked) => locked,
            Err((mut file, Errno::EWOULDBLOCK)) => return Err(PidError::Running(read_pid(&mut file))),
            Err((_, e)) => return Err(PidError::Io(e.into())),
        };
        if let Some(pid) = read_pid(&mut file)
            && pid != std::process::id()
            && is_live_master(pid)
        {
            return Err(PidError::Running(Some(pid)));
        }
        Ok(PidFile { path: path.to_owned(), file })
    }

    /// Writes our pid: from now on `mortal start` reports success.
    pub fn write_pid(&mut self) -> io::Result<()> {
        self.file.set_len(0)?;
        self.file.rewind()?;
        self.file.write_all(format!("{}\n", std::process::id()).as_bytes())?;
        self.file.sync_data()
    }

    /// Removes the file, then releases the lock (by dropping it).
    pub fn remove(self) -> io::Result<()> {
        fs::remove_file(&self.path)
    }
}

fn read_pid(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.rewind().ok()?;
    file.read_to_string(&mut text).ok()?;
    text.trim().parse().ok().filter(|&pid| pid > 0)
}

/// Whether `pid` is a running mortal master (Linux `/proc`).
fn is_live_master(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|comm| comm.trim_end() == MASTER_COMM)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_is_refused_with_the_pid() {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path();
        let path = dir.join("master.pid");
        let mut first = PidFile::lock(&path).unwrap();
        first.write_pid().unwrap();
        match PidFile::lock(&path) {
            Err(PidError::Running(Some(pid))) => assert_eq!(pid, std::process::id()),
            other => panic!("expected Running, got {other:?}"),
        }
        first.remove().unwrap();
        assert!(!path.exists());
        // A stale file (no lock, no live master) is taken over.
        fs::write(&path, "999999999\n").unwrap();
        PidFile::lock(&path).unwrap().remove().unwrap();
    }
}

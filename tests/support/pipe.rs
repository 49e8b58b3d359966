//! Helpers for the pipe delivery service's tests: the user the command
//! runs as, and the service's processes.

use std::fs;

/// The user tests run pipe commands as when they run as root: an
/// unprivileged system user that every Debian system has (base-passwd),
/// other than `nobody`, which the tests' daemons run as
/// ([`crate::mail_user_line`]): the pipe user must differ from it.
pub const PIPE_USER: &str = "daemon";

/// [`PIPE_USER`]'s uid, looked up (never assumed).
pub fn pipe_uid() -> u32 {
    nix::unistd::User::from_name(PIPE_USER)
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("user {PIPE_USER:?} must exist for the pipe tests (getent passwd {PIPE_USER})"))
        .uid
        .as_raw()
}

/// Pids of the running pipe service processes.
pub fn pipe_pids(mortal: &crate::Instance) -> Vec<u32> {
    mortal.children_running("mortal-pipe")
}

/// A pipe command that may outlive its pipe service process (killed
/// under it): its process group is killed on drop if it still runs
/// `script`.
#[derive(Debug)]
pub struct Leftover {
    pub pid: u32,
    pub script: std::path::PathBuf,
}

impl Drop for Leftover {
    fn drop(&mut self) {
        // Only a process still running the test's script is ours: a pid
        // reused by something else is left alone.
        let cmdline = fs::read(format!("/proc/{}/cmdline", self.pid)).unwrap_or_default();
        let ours = String::from_utf8_lossy(&cmdline).contains(&*self.script.to_string_lossy());
        // The script leads its own process group (the pipe service starts
        // every command so): the group takes its children too.
        if ours && crate::process_exists(self.pid) {
            let group = nix::unistd::Pid::from_raw(self.pid as i32);
            let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// The parent of `pid`, from /proc.
pub fn parent_of(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')').next()?.split_whitespace().nth(1)?.parse().ok()
}

//! queue perm: who may read and who may change the queue, checked before
//! acting, so an operator learns what is missing instead of meeting a bare
//! `Permission denied` half-way through a command.
//!
//! Reading needs read and search access to the queue directories (root,
//! the spool owner, or the group the directories are shared with). Changing
//! needs root or the spool owner: only they can rename and unlink in
//! directories the queue manager owns without leaving files it cannot read.

use super::spool::QueueDir;
use mortal_proto::config::Config;
use nix::unistd::{AccessFlags, Gid, Group, Uid, User, access, geteuid};
use std::fmt;
use std::io::{self, ErrorKind};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Directory permission bits that let a group list and enter a directory.
const GROUP_READ_SEARCH: u32 = 0o050;

/// The operator lacks a right a queue command needs; the text says which.
#[derive(Debug)]
pub struct Denied(pub String);

impl fmt::Display for Denied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Denied {}

/// Fails with [`Denied`] unless every existing directory of `queues` can
/// be listed and entered by this process.
pub fn may_read(config: &Config, queues: &[QueueDir]) -> anyhow::Result<()> {
    spool_exists(config)?;
    for &queue in queues {
        let dir = config.spool().dir(queue);
        let Ok(meta) = std::fs::metadata(&dir) else { continue };
        if access(&dir, AccessFlags::R_OK | AccessFlags::X_OK).is_err() {
            let mut text = format!(
                "reading the queue needs read access to {} (owner {}, group {}, mode {:04o}); you are {}: run as {}",
                dir.display(),
                user_name(meta.uid()),
                group_name(meta.gid()),
                meta.mode() & 0o7777,
                me(),
                root_or(meta.uid()),
            );
            if meta.mode() & GROUP_READ_SEARCH == GROUP_READ_SEARCH {
                text.push_str(&format!(", or as a member of group {}", group_name(meta.gid())));
            }
            return Err(Denied(text).into());
        }
    }
    Ok(())
}

/// Fails with [`Denied`] unless this process is root or owns every existing
/// directory of `queues`.
pub fn may_change(config: &Config, queues: &[QueueDir]) -> anyhow::Result<()> {
    spool_exists(config)?;
    let euid = geteuid();
    if euid.is_root() {
        return Ok(());
    }
    for &queue in queues {
        let dir = config.spool().dir(queue);
        let Ok(meta) = std::fs::metadata(&dir) else { continue };
        if meta.uid() != euid.as_raw() {
            return Err(Denied(format!(
                "changing the queue needs root or the spool owner: {} belongs to {} (uid {}) and you are {}: run as {}",
                dir.display(),
                user_name(meta.uid()),
                meta.uid(),
                me(),
                root_or(meta.uid()),
            ))
            .into());
        }
    }
    Ok(())
}

/// An I/O error on `path`, turned into [`Denied`] when it is one.
pub fn io_error(path: &Path, e: io::Error) -> anyhow::Error {
    if e.kind() == ErrorKind::PermissionDenied {
        let owner = path.parent().and_then(|d| std::fs::metadata(d).ok()).map(|m| m.uid());
        let who = root_or(owner.unwrap_or(0));
        return Denied(format!("{}: permission denied; you are {}: run as {who}", path.display(), me())).into();
    }
    anyhow::Error::new(e).context(path.display().to_string())
}

fn spool_exists(config: &Config) -> anyhow::Result<()> {
    let spool = &config.server.spool_dir;
    match std::fs::metadata(spool) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => anyhow::bail!("{}: spool_dir is not a directory (see {})", spool.display(), config.source.display()),
        Err(e) if e.kind() == ErrorKind::NotFound => anyhow::bail!(
            "{}: no spool here: mortal has not run with {} (or [server] spool_dir is wrong)",
            spool.display(),
            config.source.display()
        ),
        Err(e) => Err(io_error(spool, e)),
    }
}

/// `name (uid N)` for this process.
fn me() -> String {
    let uid = geteuid();
    format!("{} (uid {uid})", user_name(uid.as_raw()))
}

/// Who may act on something `owner` owns: `root`, or `root or mortal`.
fn root_or(owner: u32) -> String {
    if owner == 0 { "root".to_owned() } else { format!("root or {}", user_name(owner)) }
}

fn user_name(uid: u32) -> String {
    match User::from_uid(Uid::from_raw(uid)) {
        Ok(Some(user)) => user.name,
        _ => format!("uid {uid}"),
    }
}

fn group_name(gid: u32) -> String {
    match Group::from_gid(Gid::from_raw(gid)) {
        Ok(Some(group)) => group.name,
        _ => format!("gid {gid}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permission_errors_become_denied_and_others_keep_their_path() {
        let e = io_error(Path::new("/nonexistent-dir/x"), io::Error::from(ErrorKind::PermissionDenied));
        let denied = e.downcast_ref::<Denied>().expect("a Denied");
        assert!(denied.0.starts_with("/nonexistent-dir/x: permission denied; you are "), "{denied}");
        let e = io_error(Path::new("/x/y"), io::Error::from(ErrorKind::InvalidData));
        assert!(e.downcast_ref::<Denied>().is_none());
        assert!(format!("{e:#}").starts_with("/x/y: "), "{e:#}");
    }
}

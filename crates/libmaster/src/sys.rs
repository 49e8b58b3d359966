//! sys: the one module of mortal with `unsafe` code.
//!
//! Only what no safe wrapper offers lives here: `clone(CLONE_PARENT)`, the
//! fork of a zygote ([`crate::zygote`]) whose child becomes its sibling,
//! a child of the master, and `_exit` for such a child. std, nix and
//! rustix cover everything else (descriptors, privileges, `exec`,
//! `pidfd`).
#![allow(unsafe_code)]

use std::io;

/// Which side of [`fork_sibling`] this is.
#[derive(Debug, PartialEq, Eq)]
pub enum Forked {
    /// The new process.
    Child,
    /// The calling process; the new one has this pid.
    Parent(u32),
}

/// Forks the calling process; the new process's parent is the caller's
/// parent (`CLONE_PARENT`), which also receives its exit signal
/// (`SIGCHLD`, the caller's own exit signal).
///
/// The caller must be single-threaded (the zygote checks before its first
/// fork): the raw `clone` runs none of the C library's fork handlers,
/// which only matter when another thread could hold a lock.
pub fn fork_sibling() -> io::Result<Forked> {
    let flags = (libc::CLONE_PARENT | libc::SIGCHLD) as libc::c_ulong;
    // SAFETY: a `clone` without CLONE_VM, with no new stack (0: the child
    // continues on a copy-on-write copy of this stack, as after fork) and
    // no tid or TLS pointers, is `fork` with another parent: the child has
    // its own copy of the whole address space, so no memory is shared and
    // nothing Rust owns is aliased. Both sides return from this function
    // normally. The single-thread precondition above is what makes the
    // skipped fork handlers irrelevant.
    let ret = unsafe { libc::syscall(libc::SYS_clone, flags, 0usize, 0usize, 0usize, 0usize) };
    match ret {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(Forked::Child),
        pid => Ok(Forked::Parent(u32::try_from(pid).map_err(|_| io::Error::other("clone returned a bad pid"))?)),
    }
}

/// Ends the process at once with `status`, without the C library's exit
/// handlers or the loader's destructors (`_exit`): for a forked child,
/// whose handlers would only copy pages it shares with its zygote.
pub fn exit_now(status: i32) -> ! {
    // SAFETY: `_exit` takes no pointers and never returns; it ends the
    // process, so no Rust value is observed afterwards. Skipping
    // destructors is the point and is sound (leaking is safe).
    unsafe { libc::_exit(status) }
}

//! zygote: the template process of a pool with `spawn = "fork"`.
//!
//! The master execs a daemon's binary once as `--config PATH --zygote`.
//! That process loads the configuration, installs the log, runs the
//! daemon's `prepare` (the files it reads: keys, tables) and enters the
//! sandbox its children hold ([`crate::daemon::run`]), and then only
//! forks: for each request it receives a child's status socket from the
//! master, clones itself with `CLONE_PARENT` (so the new process is the
//! *master's* child, supervised, signalled and reaped exactly like an
//! exec'd one) and answers the new pid. The new process puts the status
//! socket on fd 1, makes what each process makes for itself (the event
//! loop, a signal handler), seals its sandbox and serves. Nothing that a
//! session touches exists before the fork: no event loop, no client
//! data; siblings share the configuration, what `prepare` read, and the
//! log format.
//!
//! Descriptors of the zygote: fd 0 the service's listener (which every
//! child inherits as its own fd 0), fd 1 the request socket to the
//! master, fd 2 the log.
//!
//! The wire, on the request socket (a Unix stream pair): the master
//! sends one octet, [`FORK`], with the child's status socket attached
//! (`SCM_RIGHTS`); the zygote answers four octets, little-endian: the
//! new pid, or `0` when the fork failed (the errno is in its log line).
//! End of stream on the socket means the master replaced the zygote or
//! is gone: the zygote exits.
//!
//! # Security
//! What `fork` trades away is written in docs/tuning.md: every child of
//! one zygote has the same address-space layout and stack canary, so a
//! layout leaked by one child holds for its siblings until the zygote is
//! replaced (the master does at each `max_lifetime` of the pool and at
//! every reload). The zygote itself reads nothing but the master's
//! requests, and holds its children's sandbox (identity, chroot,
//! Landlock, seccomp) with only what its fork and a child's first steps
//! need added to the seccomp filter; a child takes that back before it
//! serves. It is single-threaded when it forks (checked before it enters
//! the sandbox), so no lock can be held by a thread that does not exist
//! in the child.

use crate::sys;
use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer, SendAncillaryMessage};
use std::io::{self, IoSlice, IoSliceMut, Read};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;

/// The command-line flag that makes a daemon a zygote.
pub const FLAG: &str = "--zygote";
/// The one request: fork a child with the attached status socket.
pub const FORK: u8 = b'F';
/// Octets of the answer: the new child's pid, little-endian; 0 for none.
pub const REPLY_LEN: usize = 4;

/// Runs the zygote loop on the request socket inherited as fd 1. Returns
/// `Ok(())` in each new child, with its status socket on fd 1 and nothing
/// of the request socket left; returns `Err(code)` in the zygote when it
/// is done (the master closed the socket: success) or cannot go on.
pub fn fork_on_request() -> Result<(), ExitCode> {
    let requests: OwnedFd = match io::stdout().as_fd().try_clone_to_owned() {
        Ok(fd) => fd,
        Err(e) => {
            tracing::error!("fatal: zygote: request socket: {e}");
            return Err(ExitCode::FAILURE);
        }
    };
    let mut requests = UnixStream::from(requests);
    // What every child would otherwise do for itself after the fork:
    // std's CPU feature detection (CPUID, a trap to the hypervisor in a VM,
    // a dozen times) fills a cache that the children then inherit. Asked
    // for a feature the target does not enable at compile time (as sse2
    // is): only such a question reaches the cache (memchr asks this one).
    #[cfg(target_arch = "x86_64")]
    let _ = std::arch::is_x86_feature_detected!("avx2");
    loop {
        let status = match receive(&requests) {
            Ok(Some(status)) => status,
            Ok(None) => return Err(ExitCode::SUCCESS),
            Err(e) => {
                tracing::error!("fatal: zygote: request: {e}");
                return Err(ExitCode::FAILURE);
            }
        };
        match sys::fork_sibling() {
            Ok(sys::Forked::Child) => {
                // fd 1 was the request socket; dup2 closes it here, so a
                // child never holds the zygote's line to the master.
                if let Err(e) = nix::unistd::dup2_stdout(&status) {
                    tracing::error!("fatal: zygote child: status socket: {e}");
                    return Err(ExitCode::FAILURE);
                }
                drop(status);
                drop(requests);
                crate::log::forked();
                return Ok(());
            }
            Ok(sys::Forked::Parent(pid)) => {
                drop(status);
                if let Err(e) = answer(&mut requests, pid) {
                    tracing::error!("fatal: zygote: answer: {e}");
                    return Err(ExitCode::FAILURE);
                }
            }
            Err(e) => {
                tracing::warn!("warning: zygote: fork: {e}");
                drop(status);
                if answer(&mut requests, 0).is_err() {
                    return Err(ExitCode::FAILURE);
                }
            }
        }
    }
}

/// Waits for the next request; `None` at end of stream.
fn receive(requests: &UnixStream) -> io::Result<Option<OwnedFd>> {
    loop {
        let mut octet = [0u8; 1];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let got = match rustix::net::recvmsg(
            requests,
            &mut [IoSliceMut::new(&mut octet)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        ) {
            Ok(got) => got.bytes,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        };
        let mut status = None;
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(fds) = message {
                for fd in fds {
                    status.get_or_insert(fd);
                }
            }
        }
        return match (got, octet[0], status) {
            (0, _, _) => Ok(None),
            (1, FORK, Some(status)) => Ok(Some(status)),
            _ => Err(io::Error::new(io::ErrorKind::InvalidData, "not a fork request")),
        };
    }
}

fn answer(requests: &mut UnixStream, pid: u32) -> io::Result<()> {
    use std::io::Write;
    requests.write_all(&pid.to_le_bytes())
}

/// The master's side: asks the zygote on `requests` (a blocking socket
/// with read and write timeouts set) for a child whose status socket is
/// `status`; returns its pid.
pub fn request_fork(requests: &mut UnixStream, status: BorrowedFd<'_>) -> io::Result<u32> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    let fds = [status];
    if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(io::Error::other("no room for the descriptor"));
    }
    let sent =
        rustix::net::sendmsg(&*requests, &[IoSlice::new(&[FORK])], &mut control, rustix::net::SendFlags::NOSIGNAL)?;
    if sent != 1 {
        return Err(io::Error::new(io::ErrorKind::WriteZero, "fork request not sent"));
    }
    let mut reply = [0u8; REPLY_LEN];
    requests.read_exact(&mut reply)?;
    match u32::from_le_bytes(reply) {
        0 => Err(io::Error::other("the zygote could not fork (see its log line)")),
        pid => Ok(pid),
    }
}

//! listen: the listening sockets the master binds and its children
//! inherit.
//!
//! The master binds every socket once, before any child exists, and never
//! accepts on them: each child gets a duplicate as its stdin and takes its
//! own connections, so the master never reads a byte a client or another
//! daemon sends.

use socket2::{Domain, SockAddr, Socket, Type};
use std::fs;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;

/// Listen backlog: connections the kernel queues while every child is
/// busy. Linux caps it at `net.core.somaxconn` (4096 by default).
pub const LISTEN_BACKLOG: i32 = 1024;
/// Mode of the private Unix sockets: only our own user may connect (one
/// user runs every process for now; the private directory is 0700 too).
pub const PRIVATE_SOCKET_MODE: u32 = 0o600;

/// Binds a TCP listener for smtpd.
pub fn master_listen_tcp(addr: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(socket2::Protocol::TCP))?;
    // A restart must not wait for the previous run's TIME_WAIT sockets.
    // (On Linux this does not let two listeners share a port.)
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        // `[::]:25` next to `0.0.0.0:25` must not collide over mapped
        // IPv4 addresses: each listen address means exactly itself.
        socket.set_only_v6(true)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    // The master itself accepts only to answer overload (`overload`)
    // and must never block in accept when a child took the client first.
    // (The flag is on the file description the children share; they set it
    // too.)
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// Binds a Unix listener at `path`, replacing a stale socket file left by
/// an earlier run. Anything at `path` that is not a socket is left alone
/// and reported: the master never deletes a file it did not make.
pub fn master_listen_unix(path: &Path) -> io::Result<Socket> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => fs::remove_file(path)?,
        Ok(_) => {
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, "exists and is not a socket"));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    socket.bind(&SockAddr::unix(path)?)?;
    // Between bind and chmod the socket has the umask's mode, but it sits
    // in the 0700 private directory, so nobody else can reach it anyway.
    fs::set_permissions(path, fs::Permissions::from_mode(PRIVATE_SOCKET_MODE))?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_listener_replaces_a_stale_socket_but_not_a_file() {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path();
        let path = dir.join("sock");
        let first = master_listen_unix(&path).unwrap();
        drop(first);
        let again = master_listen_unix(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, PRIVATE_SOCKET_MODE);
        drop(again);
        let file = dir.join("file");
        fs::write(&file, b"keep me").unwrap();
        assert!(master_listen_unix(&file).is_err());
        assert_eq!(fs::read(&file).unwrap(), b"keep me");
    }

    #[test]
    fn tcp_listener_binds_an_ephemeral_port() {
        let s = master_listen_tcp("127.0.0.1:0".parse().unwrap()).unwrap();
        assert!(s.local_addr().unwrap().as_socket().unwrap().port() != 0);
    }
}

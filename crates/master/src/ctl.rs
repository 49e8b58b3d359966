//! ctl: the operator's control socket, `<run_dir>/master.sock`.
//!
//! A tiny line protocol for the local operator (`mortal status`,
//! `mortal reload`, `mortal stop`): one request line (`status`, `reload`,
//! `stop`; see `mortal_proto::status::ControlRequest`), one reply, close.
//! `status` is answered with one JSON document; `reload` and `stop` with
//! `ok`, or `error:` lines saying why (a reload refused for an invalid
//! configuration names each file:line).
//!
//! Security: this is not a client-facing socket, and the master still
//! never parses client bytes. The socket file is created mode 0600 (under
//! a umask, so it is never reachable by others even for an instant), and
//! every connection's peer is checked with `SO_PEERCRED`: only root and
//! the master's own user are served; anyone else is logged and dropped
//! before a byte is read. A request is one bounded line read under a
//! timeout, connections are served by at most [`MAX_CONNECTIONS`] tasks,
//! and the event loop only ever sees the parsed request.

use mortal_proto::status::{CONTROL_ERROR, CONTROL_REQUEST_MAX, ControlRequest};
use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::timeout;

/// Mode of the control socket: the master's user only.
pub const CONTROL_SOCKET_MODE: u32 = 0o600;
/// Control connections served at once; more are closed at once.
pub const MAX_CONNECTIONS: usize = 8;
/// Longest wait for a request line, and for the reply to be written.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for the event loop to answer (it is never busy for long).
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed accept (out of descriptors, say), so the control
/// task cannot spin.
pub const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(500);

/// A request for the event loop, with where to send its reply.
#[derive(Debug)]
pub struct Request {
    pub command: ControlRequest,
    /// The operator's uid, for the log.
    pub uid: u32,
    pub reply: oneshot::Sender<String>,
}

/// Binds the control socket at `path` (replacing a stale socket file, never
/// anything else), mode [`CONTROL_SOCKET_MODE`]. Called while the master
/// holds the pid-file lock, so no other master owns the file.
pub fn bind(path: &Path) -> io::Result<std::os::unix::net::UnixListener> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => fs::remove_file(path)?,
        Ok(_) => return Err(io::Error::new(io::ErrorKind::AlreadyExists, "exists and is not a socket")),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    // The umask makes bind create the file 0600 already; the master is
    // single-threaded here, so nothing else creates a file meanwhile.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = std::os::unix::net::UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = bound?;
    fs::set_permissions(path, fs::Permissions::from_mode(CONTROL_SOCKET_MODE))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// The control socket, inside the master's runtime.
#[derive(Debug)]
pub struct Control {
    listener: UnixListener,
    permits: Arc<Semaphore>,
    /// The master's effective uid: its own user may control it.
    own_uid: u32,
}

impl Control {
    pub fn new(listener: std::os::unix::net::UnixListener) -> io::Result<Control> {
        Ok(Control {
            listener: UnixListener::from_std(listener)?,
            permits: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            own_uid: nix::unistd::geteuid().as_raw(),
        })
    }

    /// The next connection. Cancel safe.
    pub async fn accept(&self) -> io::Result<UnixStream> {
        self.listener.accept().await.map(|(stream, _)| stream)
    }

    /// Checks the peer and serves it on a task of its own.
    pub fn serve(&self, stream: UnixStream, requests: mpsc::Sender<Request>) {
        let uid = match stream.peer_cred() {
            Ok(cred) => cred.uid(),
            Err(e) => return tracing::warn!("warning: control socket: peer credentials: {e}"),
        };
        if uid != 0 && uid != self.own_uid {
            let pid = stream.peer_cred().ok().and_then(|c| c.pid()).unwrap_or(0);
            return tracing::warn!(
                "warning: control socket: refused uid {uid} (pid {pid}): not root or uid {}",
                self.own_uid
            );
        }
        let Ok(permit) = Arc::clone(&self.permits).try_acquire_owned() else {
            return tracing::warn!("warning: control socket: {MAX_CONNECTIONS} requests in progress, dropping one");
        };
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = converse(stream, uid, requests).await {
                tracing::debug!("control socket: {e}");
            }
        });
    }
}

async fn converse(mut stream: UnixStream, uid: u32, requests: mpsc::Sender<Request>) -> io::Result<()> {
    let answer = match timeout(IO_TIMEOUT, read_request(&mut stream)).await {
        Err(_) => format!("{CONTROL_ERROR} timeout reading the request\n"),
        Ok(Err(e)) => return Err(e),
        Ok(Ok(None)) => format!("{CONTROL_ERROR} unknown request (try status, reload or stop)\n"),
        Ok(Ok(Some(command))) => {
            let (reply, answer) = oneshot::channel();
            if requests.send(Request { command, uid, reply }).await.is_err() {
                return Ok(());
            }
            match timeout(ANSWER_TIMEOUT, answer).await {
                Ok(Ok(text)) => text,
                _ => format!("{CONTROL_ERROR} no answer from the master\n"),
            }
        }
    };
    timeout(IO_TIMEOUT, stream.write_all(answer.as_bytes()))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "writing the reply"))??;
    stream.shutdown().await
}

/// Reads one request line of at most `CONTROL_REQUEST_MAX` octets.
async fn read_request(stream: &mut UnixStream) -> io::Result<Option<ControlRequest>> {
    let mut buf = [0u8; CONTROL_REQUEST_MAX];
    let mut filled = 0;
    while filled < buf.len() {
        let n = stream.read(&mut buf[filled..]).await?;
        if n == 0 {
            break;
        }
        filled += n;
        if let Some(end) = buf[..filled].iter().position(|&b| b == b'\n') {
            return Ok(ControlRequest::parse(&buf[..end]));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_is_private_and_replaces_only_a_socket() {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path();
        let path = dir.join("master.sock");
        drop(bind(&path).unwrap());
        // A stale socket from an earlier run is replaced.
        drop(bind(&path).unwrap());
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, CONTROL_SOCKET_MODE);
        let file = dir.join("file");
        fs::write(&file, b"keep").unwrap();
        assert!(bind(&file).is_err());
        assert_eq!(fs::read(&file).unwrap(), b"keep");
    }

    #[test]
    fn requests_are_served_in_order_and_garbage_is_refused() {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path();
        let path = dir.join("master.sock");
        let std_listener = bind(&path).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let control = Control::new(std_listener).unwrap();
            let (tx, mut rx) = mpsc::channel(1);
            let client = |line: &'static [u8]| {
                let path = path.clone();
                async move {
                    let mut s = UnixStream::connect(&path).await.unwrap();
                    s.write_all(line).await.unwrap();
                    let mut out = String::new();
                    s.read_to_string(&mut out).await.unwrap();
                    out
                }
            };
            let loop_side = async {
                for _ in 0..2 {
                    let stream = control.accept().await.unwrap();
                    control.serve(stream, tx.clone());
                }
                let req = rx.recv().await.unwrap();
                assert_eq!(req.command, ControlRequest::Status);
                assert_eq!(req.uid, nix::unistd::geteuid().as_raw());
                req.reply.send("{}\n".into()).unwrap();
            };
            let (a, b, ()) = tokio::join!(client(b"status\n"), client(b"rm -rf /\n"), loop_side);
            assert_eq!(a, "{}\n");
            assert!(b.starts_with(CONTROL_ERROR), "{b}");
        });
    }
}

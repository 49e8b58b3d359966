//! The descriptor-passing half of [`mortal_proto::handoff`]: postscreen
//! sends a client's socket to an smtpd child with `SCM_RIGHTS`, and the
//! child receives it as an owned descriptor. Through rustix's safe
//! wrappers: the received descriptor is owned from the moment it exists,
//! so none can leak or be closed twice.

use mortal_proto::handoff::{ACK, HEADER_LEN, Handoff, Header, MAX_INPUT};
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer, SendAncillaryMessage, SendFlags,
    recvmsg, sendmsg,
};
use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// Whether `fd` is a listening Unix socket: what an smtpd behind
/// postscreen inherits (a TCP listener otherwise).
pub fn is_unix_listener(fd: BorrowedFd<'_>) -> bool {
    rustix::net::sockopt::socket_domain(fd).is_ok_and(|d| d == rustix::net::AddressFamily::UNIX)
        && rustix::net::sockopt::socket_acceptconn(fd).unwrap_or(false)
}

/// Sends `handoff` with `client` attached, in one `sendmsg` on `link`
/// (non-blocking or not: a fresh connection's buffer holds it whole).
pub fn send(link: impl AsFd, client: BorrowedFd<'_>, handoff: &Handoff) -> io::Result<()> {
    let wire = handoff.encode().map_err(io::Error::other)?;
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    let fds = [client];
    if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(io::Error::other("no room for the descriptor"));
    }
    let sent = sendmsg(link, &[IoSlice::new(&wire)], &mut control, SendFlags::NOSIGNAL)?;
    if sent != wire.len() {
        return Err(io::Error::new(io::ErrorKind::WriteZero, "hand-off cut short"));
    }
    Ok(())
}

/// Receives a hand-off on `link` (blocking, each read bounded by
/// `timeout`), answers [`ACK`], and returns the client's socket with what
/// came with it. A header without a descriptor, or a bad header, is an
/// error: the peer is not postscreen.
pub fn receive(link: &mut UnixStream, timeout: Duration) -> io::Result<(OwnedFd, Handoff)> {
    link.set_nonblocking(false)?;
    link.set_read_timeout(Some(timeout))?;
    link.set_write_timeout(Some(timeout))?;
    let mut first = [0u8; HEADER_LEN + MAX_INPUT];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = recvmsg(&*link, &mut [IoSliceMut::new(&mut first)], &mut control, RecvFlags::CMSG_CLOEXEC)?.bytes;
    let mut client = None;
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = message {
            for fd in fds {
                // A second descriptor is dropped (closed) here: one is sent.
                client.get_or_insert(fd);
            }
        }
    }
    let client = client.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "hand-off without a socket"))?;
    if got < HEADER_LEN {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "hand-off header cut short"));
    }
    let header = Header::decode(first[..HEADER_LEN].try_into().expect("HEADER_LEN octets"))
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let total = HEADER_LEN + header.input_len;
    if got > total {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "hand-off longer than its header says"));
    }
    // The rest of the input, if the stream split it.
    link.read_exact(&mut first[got..total])?;
    link.write_all(&[ACK])?;
    let input = first[HEADER_LEN..total].to_vec();
    Ok((client, Handoff { greeted: header.greeted, dnsbl_score: header.dnsbl_score, input }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    /// A TCP socket crosses a Unix socket pair with its input, and the
    /// receiver's copy is the same connection.
    #[test]
    fn a_socket_and_its_input_cross_and_are_acknowledged() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server_side, _) = listener.accept().unwrap();
        let (postscreen, mut smtpd) = UnixStream::pair().unwrap();
        let handoff = Handoff { greeted: true, dnsbl_score: Some(3), input: b"EHLO a\r\n".to_vec() };
        send(&postscreen, server_side.as_fd(), &handoff).unwrap();
        drop(server_side);
        let (fd, got) = receive(&mut smtpd, Duration::from_secs(5)).unwrap();
        assert_eq!(got, handoff);
        let mut ack = [0u8; 1];
        (&postscreen).read_exact(&mut ack).unwrap();
        assert_eq!(ack, [ACK]);
        let mut passed = TcpStream::from(fd);
        passed.write_all(b"250 ok\r\n").unwrap();
        let mut line = [0u8; 8];
        client.read_exact(&mut line).unwrap();
        assert_eq!(&line, b"250 ok\r\n");
    }

    #[test]
    fn only_a_listening_unix_socket_is_a_hand_off_listener() {
        let dir = std::env::temp_dir().join(format!("mortal-handoff-test-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let unix = std::os::unix::net::UnixListener::bind(&dir).unwrap();
        assert!(is_unix_listener(unix.as_fd()));
        std::fs::remove_file(&dir).unwrap();
        let (a, _b) = UnixStream::pair().unwrap();
        assert!(!is_unix_listener(a.as_fd()));
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(!is_unix_listener(tcp.as_fd()));
        assert!(!is_unix_listener(std::fs::File::open("/dev/null").unwrap().as_fd()));
    }

    /// Octets without a descriptor are refused: only postscreen sends here.
    #[test]
    fn a_hand_off_without_a_socket_is_refused() {
        let (mut postscreen, mut smtpd) = UnixStream::pair().unwrap();
        postscreen
            .write_all(&Handoff { greeted: true, dnsbl_score: None, input: Vec::new() }.encode().unwrap())
            .unwrap();
        let e = receive(&mut smtpd, Duration::from_secs(5)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }
}

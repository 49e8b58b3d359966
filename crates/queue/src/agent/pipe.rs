//! The `pipe` agent: hands the message to the pipe delivery service, like
//! Postfix's qmgr hands it to pipe(8).
//!
//! The queue manager never runs a program itself (its seccomp filter
//! forbids execve and fork): `mortal-pipe`, a pool the master runs as
//! `[delivery.pipe] user`, runs the command. This side connects to
//! `<run_dir>/private/pipe`, sends one request (`mortal_proto::pipe`:
//! queue id, sender, recipients, content) and reads one result per
//! recipient, waiting at most the command `timeout` per recipient plus
//! [`REPLY_MARGIN`]. A service that cannot be reached, does not answer in
//! time or breaks the protocol defers every recipient it has not answered
//! for (`4.3.0 pipe service unavailable: ...`); results it did send count.

use crate::route::{RcptResult, Report, Status};
use mortal_proto::config::Config;
use mortal_proto::envelope::BodyType;
use mortal_proto::pipe::{PipeRecipient, PipeResult, PipeStatus, ResultDecoder, encode_request};
use mortal_proto::queue_file::QueueFile;
use mortal_proto::smtp_status::{EnhancedStatus, StatusClass};
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// Time allowed beyond the commands' own limits: waiting for a free pipe
/// process and moving the message.
pub const REPLY_MARGIN: Duration = Duration::from_secs(30);
/// Octets read from the service at a time.
const READ_CHUNK: usize = 8192;
/// `4.3.0`: the pipe service could not be asked; a retry may reach it.
const SERVICE_UNAVAILABLE: EnhancedStatus = EnhancedStatus::new(StatusClass::Persistent, 3, 0);

pub fn deliver(config: &Config, qf: &QueueFile, rcpts: &[usize]) -> Report {
    let recipients: Vec<PipeRecipient> = rcpts
        .iter()
        .map(|&i| PipeRecipient { address: qf.recipients[i].address.clone(), orcpt: qf.recipients[i].orcpt.clone() })
        .collect();
    let mut results = Vec::with_capacity(rcpts.len());
    if let Err(e) = exchange(config, qf, &recipients, &mut results) {
        let text = format!("pipe service unavailable: {e}");
        results.resize_with(rcpts.len(), || RcptResult::new(Status::Deferred, SERVICE_UNAVAILABLE, text.clone()));
    }
    Report { relay: "pipe".into(), results }
}

/// Sends the request and collects results into `results` as they come;
/// an error leaves the ones received so far.
fn exchange(
    config: &Config,
    qf: &QueueFile,
    recipients: &[PipeRecipient],
    results: &mut Vec<RcptResult>,
) -> io::Result<()> {
    let rounds = u32::try_from(recipients.len()).unwrap_or(u32::MAX);
    let wait = config.delivery.pipe.timeout.saturating_mul(rounds).saturating_add(REPLY_MARGIN);
    let deadline = Instant::now() + wait;
    let socket = config.pipe_socket();
    let mut stream = connect(&socket, config.delivery.connect_timeout)
        .map_err(|e| io::Error::new(e.kind(), format!("connect to {}: {e}", socket.display())))?;
    stream.set_write_timeout(Some(wait))?;
    stream.write_all(&encode_request(
        &qf.id,
        &qf.sender.address,
        qf.sender.body == BodyType::BinaryMime,
        recipients,
        &qf.content,
    ))?;
    let mut decoder = ResultDecoder::new(recipients.len());
    let mut buf = [0u8; READ_CHUNK];
    while !decoder.is_complete() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, format!("no result within {}s", wait.as_secs())));
        }
        stream.set_read_timeout(Some(left))?;
        let n = match stream.read(&mut buf) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed before every result")),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                return Err(io::Error::new(io::ErrorKind::TimedOut, format!("no result within {}s", wait.as_secs())));
            }
            Err(e) => return Err(e),
        };
        decoder.feed(&buf[..n]);
        while let Some(r) = decoder
            .next_result()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("protocol error: {e}")))?
        {
            results.push(to_rcpt_result(r));
        }
    }
    Ok(())
}

/// Connects to the pipe service, waiting at most `limit`: a Unix stream
/// connect blocks while the listener's backlog is full (every pipe process
/// busy), for as long as the socket's send timeout allows.
fn connect(path: &Path, limit: Duration) -> io::Result<UnixStream> {
    let socket = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)?;
    socket.set_write_timeout(Some(limit))?;
    socket.connect(&socket2::SockAddr::unix(path)?)?;
    Ok(socket.into())
}

fn to_rcpt_result(r: PipeResult) -> RcptResult {
    let base = match r.status {
        PipeStatus::Delivered => RcptResult::delivered(r.text),
        PipeStatus::Deferred => RcptResult::new(Status::Deferred, r.dsn, r.text),
        PipeStatus::Bounced => RcptResult::new(Status::Bounced, r.dsn, r.text),
    };
    RcptResult { diagnostic: r.diagnostic, ..base }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mortal_proto::envelope::{ClientInfo, SenderInfo};
    use mortal_proto::queue_file::{QueuedRecipient, RecipientState};
    use std::os::unix::net::UnixListener;

    fn queue_file() -> QueueFile {
        let rcpt = |a: &str| QueuedRecipient {
            address: a.into(),
            state: RecipientState::Pending,
            notify: Default::default(),
            orcpt: String::new(),
            status: None,
        };
        QueueFile {
            id: "0000000010000100000A".parse().unwrap(),
            arrival: std::time::UNIX_EPOCH,
            client: ClientInfo {
                addr: std::net::Ipv4Addr::LOCALHOST.into(),
                name: String::new(),
                helo: String::new(),
                protocol: String::new(),
                tls: String::new(),
            },
            sender: SenderInfo {
                address: "a@example.test".into(),
                body: BodyType::SevenBit,
                smtputf8: false,
                ret: None,
                envid: String::new(),
            },
            recipients: vec![rcpt("x@pipe.test"), rcpt("y@pipe.test")],
            content: b"Subject: t\r\n\r\nbody\r\n".to_vec(),
        }
    }

    fn config(dir: &Path) -> Config {
        let text = format!(
            "[server]\nrun_dir = {:?}\n[delivery]\ntransport = \"pipe\"\n[delivery.pipe]\ncommand = [\"/bin/true\"]\nuser = \"pipeuser\"\ntimeout = \"1s\"\n",
            dir.display().to_string()
        );
        Config::parse_for(&text, &dir.join("m.toml"), false).unwrap()
    }

    fn temp_dir(tag: &str) -> tempfile::TempDir {
        let dir = tempfile::Builder::new().prefix(&format!("mortal-queue-pipe-{tag}-")).tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("private")).unwrap();
        dir
    }

    /// No service: every recipient is deferred with a clear reason.
    #[test]
    fn unreachable_service_defers_everyone() {
        let temp = temp_dir("none");
        let dir = temp.path();
        let report = deliver(&config(dir), &queue_file(), &[0, 1]);
        assert_eq!(report.relay, "pipe");
        assert_eq!(report.results.len(), 2);
        for r in &report.results {
            assert_eq!((r.status, r.dsn.to_string().as_str()), (Status::Deferred, "4.3.0"));
            assert!(r.text.starts_with("pipe service unavailable: connect to "), "{}", r.text);
        }
    }

    /// Every pipe process busy (the listener's backlog full): the connect
    /// gives up after its limit instead of blocking the delivery thread.
    #[test]
    fn connect_to_a_full_backlog_is_bounded() {
        let temp = temp_dir("full");
        let dir = temp.path();
        let path = dir.join("private/full");
        let listener = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None).unwrap();
        listener.bind(&socket2::SockAddr::unix(&path).unwrap()).unwrap();
        // Backlog 0: one connection waits, the next finds the queue full.
        listener.listen(0).unwrap();
        let limit = Duration::from_millis(300);
        let mut queued = Vec::new();
        let started = Instant::now();
        let err = loop {
            match connect(&path, limit) {
                Ok(s) => queued.push(s),
                Err(e) => break e,
            }
            assert!(queued.len() < 8, "connections kept being accepted with a backlog of 0");
        };
        let waited = started.elapsed();
        assert!(matches!(err.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut), "{err:?}");
        assert!(waited >= limit && waited < limit * 10, "waited {waited:?} for a limit of {limit:?}");
    }

    /// A service that answers for the first recipient and then breaks
    /// the protocol: the first result counts, the second is deferred.
    #[test]
    fn results_before_a_protocol_error_count() {
        let temp = temp_dir("broken");
        let dir = temp.path();
        let cfg = config(dir);
        let listener = UnixListener::bind(cfg.pipe_socket()).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut request = mortal_proto::pipe::RequestDecoder::new(1 << 20);
            let mut buf = [0u8; 4096];
            let got = loop {
                let n = s.read(&mut buf).unwrap();
                if let Some(r) = request.feed(&buf[..n]).unwrap() {
                    break r;
                }
            };
            let mut out = Vec::new();
            PipeResult::new(
                PipeStatus::Delivered,
                EnhancedStatus::undefined(StatusClass::Success),
                "delivered via pipe service",
            )
            .encode(&mut out);
            out.extend_from_slice(b"garbage!");
            s.write_all(&out).unwrap();
            got
        });
        let report = deliver(&cfg, &queue_file(), &[0, 1]);
        let request = server.join().unwrap();
        assert_eq!(request.queue_id, "0000000010000100000A");
        assert_eq!(request.recipients.len(), 2);
        assert_eq!(request.content, queue_file().content);
        assert_eq!(report.results[0].status, Status::Sent);
        assert_eq!(report.results[0].success_action, Some(mortal_proto::smtp_status::DsnAction::Delivered));
        assert_eq!(report.results[1].status, Status::Deferred);
        assert!(
            report.results[1].text.starts_with("pipe service unavailable: protocol error"),
            "{:?}",
            report.results[1]
        );
    }
}

//! mortal-anvil: per-client connection and message counts for the whole
//! smtpd pool, Postfix `anvil(8)` in shape.
//!
//! # Summary
//! One process, started and restarted by `mortal-master` like the queue
//! manager, listening on `<run_dir>/private/anvil` (inherited as stdin).
//! Each smtpd session that is subject to the per-client limits holds one
//! connection here for its whole life; that connection is counted as an
//! open connection from the client's address, and its requests count
//! connections and messages per `rate_time_unit`
//! (`mortal_proto::anvil` has the protocol, `mortal_smtpd::anvil` the
//! table). anvil only counts: smtpd compares with its limits and decides.
//!
//! # Security
//! Started as root, anvil chroots into the private directory and becomes
//! `[server] user` before its first request. It never sees a byte from an
//! SMTP client, only fixed 20-octet requests from smtpd processes on a
//! socket in the private directory; a record that breaks the protocol
//! ends that connection.
//! Memory is bounded: [`MAX_CONNECTIONS`] smtpd connections at once (more
//! are closed at once, and smtpd then serves without limits) and
//! `table::MAX_CLIENTS` client entries. If anvil dies, its
//! counts are lost and start again from zero in its successor; smtpd fails
//! open meanwhile, so losing anvil never stops mail.
//!
//! # Standards
//! None.
//!
//! # Configuration
//! `[anvil] rate_time_unit`; the limits themselves are smtpd's
//! (`[smtpd] client_connection_count_limit`,
//! `client_connection_rate_limit`, `client_message_rate_limit`).
//!
//! # Diagnostics
//! `warning:` lines for protocol violations and refused connections;
//! `statistics:` lines, as Postfix's anvil logs them, every
//! `rate_time_unit` in which something was counted.
#![forbid(unsafe_code)]

mod table;

use mortal_libmaster::child;
use mortal_libmaster::daemon::{self, Fatal, Started};
use mortal_libmaster::sandbox::{Landlock, Needs, RunAs, Seccomp, Service};
use mortal_proto::anvil::{AnvilRequest, Conversation, Op, REQUEST_LEN, Status, Subject};
use mortal_proto::config::Config;
use mortal_proto::status::ChildState;
use std::io;
use std::net::IpAddr;
use std::os::unix::net::UnixListener;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use table::{AnvilTable, MAX_CLIENTS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

/// smtpd connections served at once. Each smtpd process holds at most
/// one, so this is far above any sane sum of `process_limit`s; a
/// connection beyond it is closed, and its session goes unlimited.
pub const MAX_CONNECTIONS: usize = 8192;
/// Pause after an accept error other than a full table, so a persistent
/// error (EMFILE) cannot spin the process.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// Counters shared by the connection tasks.
#[derive(Debug)]
struct Shared {
    table: Mutex<AnvilTable>,
    connections: AtomicUsize,
    /// Highest (open connections, connection rate, message rate) seen
    /// since the last statistics line, each with its client.
    peaks: Mutex<Peaks>,
}

#[derive(Debug, Default)]
struct Peaks {
    count: Option<(u32, IpAddr)>,
    connection_rate: Option<(u32, IpAddr)>,
    message_rate: Option<(u32, IpAddr)>,
    clients: usize,
}

/// anvil's descriptors besides one per smtpd child it may serve.
const ANVIL_NOFILE_BASE: u64 = 64;

/// anvil's sandbox, the same kind as smtpd's: the mail user, chrooted into
/// the private socket directory, no file, no TCP, and the deny-list without
/// running a program. One descriptor per smtpd session, for every smtpd
/// pool.
fn needs(config: &Config) -> Needs {
    // Every smtpd pool may ask: one per listen address (behind postscreen
    // one for all of them, fewer), per proxy_listen and per submission
    // address.
    let smtpd = &config.smtpd;
    let pools = (smtpd.listen.len()
        + smtpd.proxy_listen.len()
        + smtpd.submission_listen.len()
        + smtpd.submissions_listen.len()) as u64;
    Needs {
        run_as: RunAs::MailUser,
        chroot_private: true,
        nofile: ANVIL_NOFILE_BASE + pools * u64::from(config.process.smtpd.process_limit),
        landlock: Landlock::Rules { read_write: Vec::new(), tcp_connect: Vec::new() },
        seccomp: Seccomp::DenyList { may_exec: false, may_fork: true },
    }
}

fn main() -> ExitCode {
    daemon::run(Service::Anvil, needs, |_| Ok(()), runtime, run)
}

/// The event loop, made by each process before the sandbox;
/// current-thread, so no thread exists when the sandbox is entered.
fn runtime(_: &Config, (): ()) -> Result<tokio::runtime::Runtime, Fatal> {
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(|e| Fatal::new(format_args!("create event loop: {e}")))
}

fn run(started: Started<UnixListener, tokio::runtime::Runtime>) -> ExitCode {
    let Started { config, listener, mut link, prepared: runtime, .. } = started;
    if let Err(e) = link.report(ChildState::Ready) {
        tracing::error!("fatal: master link: {e}");
        return ExitCode::FAILURE;
    }
    let (stop_tx, stop_rx) = oneshot::channel();
    std::thread::spawn(move || {
        let _ = stop_tx.send(link.wait_for_exit());
    });
    let unit = config.anvil.rate_time_unit;
    match runtime.block_on(serve(listener, unit, stop_rx)) {
        Ok(reason) => {
            tracing::info!("exit: {}", reason.as_str());
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!("fatal: anvil socket: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(
    listener: UnixListener,
    unit: Duration,
    mut stop: oneshot::Receiver<child::ExitReason>,
) -> io::Result<child::ExitReason> {
    listener.set_nonblocking(true)?;
    let listener = tokio::net::UnixListener::from_std(listener)?;
    let shared = Arc::new(Shared {
        table: Mutex::new(AnvilTable::new(unit, MAX_CLIENTS)),
        connections: AtomicUsize::new(0),
        peaks: Mutex::new(Peaks::default()),
    });
    let mut sweep = tokio::time::interval_at(tokio::time::Instant::now() + unit, unit);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            reason = &mut stop => return Ok(reason.unwrap_or(child::ExitReason::MasterGone)),
            _ = sweep.tick() => {
                let size = {
                    let mut table = lock(&shared.table);
                    let before = table.len();
                    table.sweep(Instant::now());
                    before
                };
                log_statistics(&shared, unit, size);
            }
            accepted = listener.accept() => match accepted {
                Ok((conn, _)) => {
                    if shared.connections.fetch_add(1, Ordering::Relaxed) >= MAX_CONNECTIONS {
                        shared.connections.fetch_sub(1, Ordering::Relaxed);
                        tracing::warn!("warning: {MAX_CONNECTIONS} smtpd connections open: refusing another");
                        drop(conn);
                        continue;
                    }
                    let shared = Arc::clone(&shared);
                    tokio::spawn(async move {
                        lease(conn, &shared).await;
                        shared.connections.fetch_sub(1, Ordering::Relaxed);
                    });
                }
                Err(e) => {
                    tracing::warn!("warning: accept: {e}");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                }
            },
        }
    }
}

/// One smtpd session's connection: counted as open from its `Connect`
/// until it closes, whatever the reason.
async fn lease(mut conn: tokio::net::UnixStream, shared: &Shared) {
    let mut conversation = Conversation::default();
    let mut counted = None;
    let mut buf = [0u8; REQUEST_LEN];
    loop {
        match conn.read_exact(&mut buf).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
            Err(e) => {
                tracing::warn!("warning: read from smtpd: {e}");
                break;
            }
        }
        let request = match AnvilRequest::decode(&buf).and_then(|r| conversation.advance(&r).map(|()| r)) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("warning: protocol violation from smtpd: {e}");
                break;
            }
        };
        let now = Instant::now();
        let reply = {
            let mut table = lock(&shared.table);
            // Conversation::advance let only these pairs through.
            match (request.op, request.subject) {
                (Op::Connect, Subject::Client(addr)) => table.connect(addr, now),
                (Op::Message, Subject::Client(addr)) => table.message(addr, now),
                (Op::AuthFailure, Subject::Client(addr)) => table.auth_failure(addr, now),
                (Op::AuthFailures, Subject::Client(addr)) => table.auth_failures(addr, now),
                (Op::UserMessage, Subject::Login(login)) => table.user_message(login, now),
                (Op::UserRecipient, Subject::Login(login)) => table.user_recipient(login, now),
                (op, _) => {
                    tracing::warn!("warning: protocol violation from smtpd: {op:?} for the wrong subject");
                    break;
                }
            }
        };
        if reply.status == Status::Counted
            && let Subject::Client(addr) = request.subject
        {
            if request.op == Op::Connect {
                counted = Some(addr);
            }
            note_peaks(shared, request.op, addr, reply);
        }
        if conn.write_all(&reply.encode()).await.is_err() {
            break;
        }
    }
    if let Some(addr) = counted {
        lock(&shared.table).disconnect(addr, Instant::now());
    }
}

fn note_peaks(shared: &Shared, op: Op, addr: IpAddr, reply: mortal_proto::anvil::AnvilReply) {
    let mut peaks = lock(&shared.peaks);
    let higher = |slot: &mut Option<(u32, IpAddr)>, value: u32| {
        if slot.is_none_or(|(v, _)| value > v) {
            *slot = Some((value, addr));
        }
    };
    match op {
        Op::Connect => {
            higher(&mut peaks.count, reply.count);
            higher(&mut peaks.connection_rate, reply.rate);
        }
        Op::Message => higher(&mut peaks.message_rate, reply.rate),
        Op::AuthFailure | Op::AuthFailures | Op::UserMessage | Op::UserRecipient => {}
    }
}

/// Postfix anvil's `statistics:` lines, for the unit that just ended.
fn log_statistics(shared: &Shared, unit: Duration, size: usize) {
    let mut peaks = lock(&shared.peaks);
    peaks.clients = peaks.clients.max(size);
    let secs = unit.as_secs().max(1);
    if let Some((rate, addr)) = peaks.connection_rate {
        tracing::info!("statistics: max connection rate {rate}/{secs}s for (smtp:{addr})");
    }
    if let Some((count, addr)) = peaks.count {
        tracing::info!("statistics: max connection count {count} for (smtp:{addr})");
    }
    if let Some((rate, addr)) = peaks.message_rate {
        tracing::info!("statistics: max message rate {rate}/{secs}s for (smtp:{addr})");
    }
    if peaks.count.is_some() || peaks.message_rate.is_some() {
        tracing::info!("statistics: max cache size {}", peaks.clients);
    }
    *peaks = Peaks { clients: size, ..Peaks::default() };
}

/// A panic in one task must not take every later request down with it:
/// the counts stay usable after a poisoned lock.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

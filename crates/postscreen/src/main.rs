//! mortal-postscreen: holds new SMTP connections cheaply and passes only
//! clients that speak SMTP to smtpd, Postfix `postscreen(8)` in shape.
//!
//! # Summary
//! With `[postscreen] enabled`, the master gives each `[smtpd] listen`
//! socket to a postscreen process (one per address) instead of an smtpd
//! pool, and the smtpd children of those addresses wait on the hand-off
//! socket `<run_dir>/private/smtpd` instead. postscreen holds every new
//! connection in one event loop, at the cost of a socket and a small
//! task:
//!
//! 1. It sends `220-<hostname> <banner>`, the first line of a two-line
//!    greeting, and waits `greet_wait`. A client that talks now did not
//!    wait for the greeting (the pregreet test): `greet_action = "drop"`
//!    answers `521 5.5.1 Protocol error` and closes. A client that waits
//!    passes, and skips this wait for `greet_ttl`. Meanwhile, with
//!    `[smtpd.dnsbl] action = "drop"`, it asks the DNS lists
//!    (`mortal_smtpd::dnsbl`), and refuses a client whose score reaches
//!    the threshold with `521 5.7.1 Service unavailable; client [ip]
//!    blocked using <site>`; the score travels on to smtpd.
//! 2. It sends `220 <hostname> <banner>`, the last line, and waits up to
//!    `command_time_limit` for the client's first command.
//! 3. It passes the socket and the octets read (`mortal_proto::handoff`,
//!    `SCM_RIGHTS`) to an idle smtpd child, which answers that command as
//!    if it had sent the greeting itself.
//!
//! So a client that connects and stays silent, or thousands of them,
//! costs one socket each here and never an smtpd process, and a real
//! client still finds idle smtpd children.
//!
//! # Security
//! postscreen reads client octets, so it is a mortal process: it lives
//! `[process.postscreen]`'s lifetime and is replaced (a retiring one tells
//! the clients it holds `421 4.3.2 Service shutting down`; they retry). It
//! never parses more than it reads once after the greeting, which it
//! passes on unread. Started as root it chroots into the private directory
//! (the hand-off socket is there) and becomes `[server] user`; it opens no
//! file but its own cache file, in the mail user's `postscreen` directory
//! there (read at start, written at exit), and connects nowhere but the
//! hand-off socket (Landlock: that directory only, no TCP port), and runs
//! under the deny-list without running a program or making a process.
//! Its memory is bounded by `connection_limit` connections of at most one
//! 4 KiB read each, and `cache_limit` remembered clients.
//!
//! # Standards
//! RFC 5321 (the multi-line greeting; a client must wait for the last
//! line before it talks).
//!
//! # Configuration
//! `[postscreen]`: `enabled`, `greet_wait`, `greet_action`, `greet_ttl`,
//! `cache_limit`, `command_time_limit`, `connection_limit`,
//! `client_connection_limit`; `[process.postscreen]` its lifetime; the
//! hand-off waits `[process.smtpd] overload_wait` for an idle smtpd.
//!
//! # Diagnostics
//! Postfix postscreen's log lines: `CONNECT from [ip]:port to [ip]:port`,
//! `PASS NEW`, `PASS OLD`, `PREGREET n after s from [ip]:port: text`,
//! `HANGUP after s from ...`, `COMMAND TIME LIMIT from ... after CONNECT`,
//! `DISCONNECT`, `NOQUEUE: reject: CONNECT from ...: too many connections`
//! or `all server ports busy`; `warning:` when no smtpd takes a client.
#![forbid(unsafe_code)]

mod cache;
mod screen;

use mortal_libmaster::daemon::{self, Fatal, Started};
use mortal_libmaster::sandbox::{Landlock, Needs, RunAs, Seccomp, Service, visible_path};
use mortal_proto::config::{Config, DnsblAction, HANDOFFS_IN_FLIGHT, POSTSCREEN_NOFILE_RESERVE};
use mortal_proto::status::ChildState;
use mortal_smtpd::dnsbl::Dnsbl;
use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Instant, SystemTime};
use tokio::sync::oneshot;

/// The nameserver port of /etc/resolv.conf entries, which the DNS list
/// lookups use when `[smtpd] resolvers` is empty.
const RESOLV_CONF_PORT: u16 = 53;

/// Whether postscreen asks the DNS lists itself: with `[smtpd.dnsbl]
/// action = "drop"`, the verdict that refuses a client before it may
/// talk. The other actions decide at RCPT, which is smtpd's.
fn screens_dnsbl(config: &Config) -> bool {
    config.smtpd.dnsbl.enabled() && config.smtpd.dnsbl.action == DnsblAction::Drop
}

/// postscreen's sandbox: the mail user in the private directory (the
/// hand-off socket), no file, the deny-list without running a program or
/// making a process; a descriptor for each held connection and one for
/// each hand-off. TCP connects only to the nameservers' ports when it
/// asks the DNS lists (the resolver's fallback for truncated answers),
/// else none.
fn needs(config: &Config) -> Needs {
    let mut tcp_connect: Vec<u16> = Vec::new();
    if screens_dnsbl(config) {
        tcp_connect.extend(config.smtpd.resolvers.iter().map(|r| r.port()));
        if tcp_connect.is_empty() {
            tcp_connect.push(RESOLV_CONF_PORT);
        }
        tcp_connect.dedup();
    }
    Needs {
        run_as: RunAs::MailUser,
        chroot_private: true,
        nofile: config.postscreen.nofile(),
        // Its cache file, for its successor.
        landlock: Landlock::Rules { read_write: vec![config.postscreen_cache_dir()], tcp_connect },
        seccomp: Seccomp::DenyList { may_exec: false, may_fork: false },
    }
}

/// What `prepare` makes before the sandbox: the event loop, and the DNS
/// list client (it reads /etc/resolv.conf when no `resolvers` are set).
struct Prepared {
    runtime: tokio::runtime::Runtime,
    dnsbl: Option<Dnsbl>,
}

fn main() -> ExitCode {
    daemon::run(Service::Postscreen, needs, nameservers, start, run)
}

/// The DNS lists' nameservers (from /etc/resolv.conf unless configured),
/// read before the sandbox.
fn nameservers(config: &Config) -> Result<Option<Vec<SocketAddr>>, Fatal> {
    if !screens_dnsbl(config) {
        return Ok(None);
    }
    mortal_smtpd::dns::nameservers(&config.smtpd).map(Some).map_err(|e| Fatal::new(format_args!("dnsbl: {e}")))
}

/// The event loop (current-thread, so no thread exists when the sandbox
/// is entered) and the DNS list client, built in it.
fn start(config: &Config, servers: Option<Vec<SocketAddr>>) -> Result<Prepared, Fatal> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(|e| Fatal::new(format_args!("create event loop: {e}")))?;
    let dnsbl = match servers {
        Some(servers) => {
            let _in_runtime = runtime.enter();
            let dns = |e: mortal_smtpd::dns::DnsError| Fatal::new(format_args!("dnsbl: {e}"));
            Some(Dnsbl::new(&servers, config.smtpd.dnsbl.timeout).map_err(dns)?)
        }
        None => None,
    };
    Ok(Prepared { runtime, dnsbl })
}

/// `connection_limit`, or fewer when the descriptor limit allows fewer
/// (an unprivileged start keeps the hard limit it inherited): past it,
/// clients hear 421 rather than the accept failing.
fn connection_limit(config: &Config) -> usize {
    let wanted = config.postscreen.connection_limit as usize;
    match nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE) {
        Ok((soft, _)) => {
            let possible = soft.saturating_sub(POSTSCREEN_NOFILE_RESERVE + u64::from(HANDOFFS_IN_FLIGHT)) as usize;
            if possible < wanted {
                tracing::warn!(
                    "warning: postscreen holds at most {possible} connections, not connection_limit = {wanted}: the descriptor limit is {soft}"
                );
            }
            wanted.min(possible.max(1))
        }
        Err(_) => wanted,
    }
}

fn run(started: Started<TcpListener, Prepared>) -> ExitCode {
    let Started { config, listener, mut link, prepared: Prepared { runtime, dnsbl }, .. } = started;
    let p = &config.postscreen;
    let settings = screen::Settings {
        hostname: config.server.hostname.clone(),
        banner: config.smtpd.banner.clone(),
        greet_wait: p.greet_wait,
        greet_action: p.greet_action,
        command_time_limit: p.command_time_limit,
        connection_limit: connection_limit(&config),
        client_connection_limit: p.client_connection_limit,
        handoff_socket: mortal_libmaster::sandbox::visible_path(&config.smtpd_handoff_socket()),
        handoff_wait: config.process.smtpd.overload_wait,
        handoffs: tokio::sync::Semaphore::new(HANDOFFS_IN_FLIGHT as usize),
        dnsbl: dnsbl.map(|client| screen::DnsLists {
            client,
            sites: config.smtpd.dnsbl.sites.clone(),
            threshold: config.smtpd.dnsbl.threshold,
        }),
    };
    let cache_file = listener.local_addr().ok().map(|addr| visible_path(&config.postscreen_cache_file(addr)));
    let mut passed = cache::PassCache::new(p.greet_ttl, p.cache_limit);
    if let Some(file) = cache_file.as_deref().filter(|_| passed.enabled()) {
        load_cache(&mut passed, file);
    }
    if let Err(e) = link.report(ChildState::Ready) {
        tracing::error!("fatal: master link: {e}");
        return ExitCode::FAILURE;
    }
    let (stop_tx, stop_rx) = oneshot::channel();
    std::thread::spawn(move || {
        let _ = stop_tx.send(link.wait_for_exit());
    });
    match runtime.block_on(screen::serve(listener, settings, passed, stop_rx)) {
        Ok((reason, passed)) => {
            if let Some(file) = cache_file.as_deref().filter(|_| passed.enabled()) {
                save_cache(&passed, file);
            }
            tracing::info!("exit: {}", reason.as_str());
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!("fatal: listener: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Reads the cache a predecessor left (none is fine: a first start),
/// at most [`cache::PassCache::max_file_len`] octets of it.
fn load_cache(passed: &mut cache::PassCache, file: &Path) {
    let mut raw = Vec::new();
    match std::fs::File::open(file).and_then(|f| f.take(passed.max_file_len()).read_to_end(&mut raw)) {
        Ok(_) => {
            let text = String::from_utf8_lossy(&raw);
            let (taken, bad) = passed.load(&text, Instant::now(), SystemTime::now());
            if bad > 0 {
                tracing::warn!("warning: {}: {bad} lines are not cache lines: skipped", file.display());
            }
            tracing::debug!("cache: {taken} clients from {}", file.display());
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!("warning: {}: {e}: starting with an empty cache", file.display()),
    }
}

/// Writes the cache for the successor: a new file renamed over the old,
/// so a reader never sees half of one.
fn save_cache(passed: &cache::PassCache, file: &Path) {
    let text = passed.save(Instant::now(), SystemTime::now());
    let temp = PathBuf::from(format!("{}.tmp", file.display()));
    if let Err(e) = std::fs::write(&temp, text).and_then(|()| std::fs::rename(&temp, file)) {
        tracing::warn!("warning: {}: {e}: the successor starts with an empty cache", file.display());
        let _ = std::fs::remove_file(&temp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config(text: &str) -> Config {
        Config::parse_for(text, Path::new("/m.toml"), false).unwrap()
    }

    /// No TCP port at all, unless postscreen asks the DNS lists (`drop`):
    /// then the nameservers' ports and no other.
    #[test]
    fn tcp_ports_only_for_the_dns_lists_it_asks() {
        let plain = needs(&config("[postscreen]\nenabled = true\n"));
        let cache = vec![PathBuf::from("/var/spool/mortal/run/private/postscreen")];
        assert_eq!(plain.landlock, Landlock::Rules { read_write: cache.clone(), tcp_connect: Vec::new() });
        assert_eq!(plain.seccomp, Seccomp::DenyList { may_exec: false, may_fork: false });
        assert_eq!(plain.nofile, 10_000 + u64::from(HANDOFFS_IN_FLIGHT) + POSTSCREEN_NOFILE_RESERVE);
        let enforce =
            needs(&config("[smtpd]\nresolvers = [\"127.0.0.1:5353\"]\n[smtpd.dnsbl]\nsites = [\"zen.example\"]\n"));
        assert_eq!(enforce.landlock, Landlock::Rules { read_write: cache.clone(), tcp_connect: Vec::new() });
        let drop = needs(&config(
            "[smtpd]\nresolvers = [\"127.0.0.1:5353\"]\n[smtpd.dnsbl]\nsites = [\"zen.example\"]\naction = \"drop\"\n",
        ));
        assert_eq!(drop.landlock, Landlock::Rules { read_write: cache.clone(), tcp_connect: vec![5353] });
        let resolv = needs(&config("[smtpd.dnsbl]\nsites = [\"zen.example\"]\naction = \"drop\"\n"));
        assert_eq!(resolv.landlock, Landlock::Rules { read_write: cache, tcp_connect: vec![RESOLV_CONF_PORT] });
    }
}

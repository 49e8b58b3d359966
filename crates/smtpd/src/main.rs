//! `mortal-smtpd --config PATH`: one pre-forked SMTP server process,
//! started by `mortal-master` with the listening socket as stdin and its
//! master socket as stdout. The manual is the library's crate
//! documentation (`mortal_smtpd`).
#![forbid(unsafe_code)]

use mortal_libmaster::child;
use mortal_libmaster::daemon::{self, Fatal, Started};
use mortal_libmaster::sandbox::{Landlock, Needs, RunAs, Seccomp, Service};
use mortal_proto::config::{Config, NextHop};
use mortal_smtpd::dns::ReverseResolver;
use mortal_smtpd::dnsbl::Dnsbl;
use mortal_smtpd::driver::{self, Server, SessionEnd};
use mortal_smtpd::filter::restrict::Restrictor;
use mortal_smtpd::listener::SmtpdListener;
use mortal_smtpd::mailhost::DomainResolver;
use mortal_smtpd::relay::RelayPolicy;
use mortal_smtpd::sasl::SaslServer;
use mortal_smtpd::tls::TlsServer;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use tracing::Instrument;

/// Descriptors an smtpd may hold: stdio, its listener and master link,
/// two epoll sets, the client, cleanup and anvil, with room to spare.
const SMTPD_NOFILE: u64 = 64;
/// The nameserver port of /etc/resolv.conf entries, which the reverse
/// lookups use when `[smtpd] resolvers` is empty.
const RESOLV_CONF_PORT: u16 = 53;

/// smtpd's sandbox: the mail user, chrooted into the private socket
/// directory (it needs nothing but the cleanup and anvil sockets there, and
/// the Unix sockets of milters and policy servers placed there), no file,
/// and the seccomp allow-list. With `reverse_lookup` (or a DNS-based
/// restriction, or DNSBL screening), TCP connects to the
/// nameservers' ports (the resolver's fallback for truncated answers; UDP
/// is not Landlock's to restrict): the configured `resolvers`, or
/// resolv.conf's 53. Milters and policy servers on `inet:` endpoints add
/// their ports, and TCP client sockets to the allow-list; so do the `inet`
/// routes' servers when `reject_unverified_recipient` probes them. Nothing
/// configured: no TCP port at all.
fn needs(config: &Config) -> Needs {
    let dns = config.smtpd.uses_dns();
    let mut tcp_connect = Vec::new();
    if dns {
        tcp_connect.extend(config.smtpd.resolvers.iter().map(|r| r.port()));
        if tcp_connect.is_empty() {
            tcp_connect.push(RESOLV_CONF_PORT);
        }
    }
    // Dovecot's auth service is asked from smtpd, like a filter.
    let filters =
        config.smtpd.milters.iter().map(|m| &m.endpoint).chain(config.smtpd.policy.iter().map(|p| &p.endpoint));
    let filters = filters.chain(config.smtpd.auth.server.iter());
    let filter_ports: Vec<u16> = filters
        .filter_map(|e| match e {
            NextHop::Inet(addr) => Some(addr.port()),
            NextHop::Unix(_) => None,
        })
        .collect();
    // reject_unverified_recipient probes the inet routes' servers.
    let probe_ports =
        if mortal_smtpd::verify::enabled(config) { mortal_smtpd::verify::probe_ports(config) } else { Vec::new() };
    // socketmap tables on inet: are asked from smtpd too.
    let table_ports = config.smtpd_table_ports();
    let tcp_client = !filter_ports.is_empty() || !probe_ports.is_empty() || !table_ports.is_empty();
    for port in filter_ports.into_iter().chain(probe_ports).chain(table_ports) {
        if !tcp_connect.contains(&port) {
            tcp_connect.push(port);
        }
    }
    Needs {
        run_as: RunAs::MailUser,
        chroot_private: true,
        nofile: SMTPD_NOFILE,
        landlock: Landlock::Rules { read_write: Vec::new(), tcp_connect },
        seccomp: Seccomp::AllowList {
            dns,
            tcp_client,
            receive_sockets: mortal_smtpd::listener::inherited_is_handoff(),
        },
    }
}

/// What smtpd reads before the sandbox (a zygote once for all its
/// children).
struct Loaded {
    tls: Option<TlsServer>,
    relay: RelayPolicy,
    restrictor: Restrictor,
    /// The nameservers of reverse lookups, when on.
    reverse_servers: Option<Vec<SocketAddr>>,
    /// The nameservers of the restrictions' DNS checks and the DNS lists,
    /// when any is configured.
    check_servers: Option<Vec<SocketAddr>>,
}

/// What each smtpd process makes for itself, on top of [`Loaded`].
struct Prepared {
    tls: Option<TlsServer>,
    relay: RelayPolicy,
    runtime: tokio::runtime::Runtime,
    term: driver::TermHandler,
    resolver: Option<ReverseResolver>,
    restrictor: Restrictor,
}

fn main() -> ExitCode {
    daemon::run(Service::Smtpd, needs, load, start, serve)
}

fn load(config: &Config) -> Result<Loaded, Fatal> {
    // Read the certificate and key now, before the first session and before
    // any privilege drop or sandbox takes the file system away. A child that
    // cannot is a bad start, which the master throttles.
    let tls = TlsServer::from_config(&config.smtpd).map_err(|e| Fatal::new(format_args!("STARTTLS: {e}")))?;
    // The recipient map and the virtual aliases too: read once per
    // process, so `mortal reload`, which replaces every process, reloads
    // them. Serving without them would accept mail for users who do not
    // exist (or refuse aliases that do).
    let relay = RelayPolicy::load(config).map_err(|e| match e {
        mortal_smtpd::relay::RecipientMapError::Table(e) => Fatal::new(format_args!("lookup table {e}")),
        e => {
            let path = config.server.recipient_map.as_deref().unwrap_or(std::path::Path::new(""));
            Fatal::new(format_args!("recipient_map {}: {e}", path.display()))
        }
    })?;
    // The restriction tables.
    let restrictor = Restrictor::load(config).map_err(|e| Fatal::new(format_args!("lookup table {e}")))?;
    // /etc/resolv.conf (when no `resolvers` are configured) is read now,
    // before the sandbox takes it away.
    let smtpd = &config.smtpd;
    let reverse_servers = if smtpd.reverse_lookup {
        Some(mortal_smtpd::dns::nameservers(smtpd).map_err(|e| Fatal::new(format_args!("reverse_lookup: {e}")))?)
    } else {
        None
    };
    let check_servers =
        if smtpd.restrictions.use_dns() || smtpd.submission.restrictions.use_dns() || smtpd.dnsbl.enabled() {
            Some(mortal_smtpd::dns::nameservers(smtpd).map_err(|e| Fatal::new(format_args!("restrictions: {e}")))?)
        } else {
            None
        };
    Ok(Loaded { tls, relay, restrictor, reverse_servers, check_servers })
}

fn start(config: &Config, loaded: Loaded) -> Result<Prepared, Fatal> {
    let Loaded { tls, relay, restrictor, reverse_servers, check_servers } = loaded;
    // One current-thread runtime for the life of the process, reused by
    // every session: a session is a single task, and an idle child should
    // cost as little memory as possible.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(|e| Fatal::new(format_args!("create event loop: {e}")))?;
    // SIGTERM in a session ends it with 421; the handler must be in place
    // before seccomp forbids installing it.
    let term = driver::install_term_handler(&runtime).map_err(|e| Fatal::new(format_args!("SIGTERM handler: {e}")))?;
    // The resolvers, built in the runtime whose tasks will carry their
    // queries.
    let _in_runtime = runtime.enter();
    let smtpd = &config.smtpd;
    let resolver = match reverse_servers {
        Some(servers) => Some(
            ReverseResolver::new(&servers, smtpd.reverse_lookup_timeout)
                .map_err(|e| Fatal::new(format_args!("reverse_lookup: {e}")))?,
        ),
        None => None,
    };
    let restrictor = match check_servers {
        Some(servers) => {
            let dns = |e: mortal_smtpd::dns::DnsError| Fatal::new(format_args!("restrictions: {e}"));
            let timeout = smtpd.restrictions.dns_timeout;
            let domains =
                DomainResolver::new(mortal_smtpd::dns::name_server_pool(&servers, timeout).map_err(dns)?, timeout);
            let dnsbl_timeout = if smtpd.dnsbl.enabled() { smtpd.dnsbl.timeout } else { timeout };
            let dnsbl = Dnsbl::new(&servers, dnsbl_timeout).map_err(dns)?;
            restrictor.with_dns(Some(domains), Some(Arc::new(dnsbl)))
        }
        None => restrictor,
    };
    drop(_in_runtime);
    Ok(Prepared { tls, relay, runtime, term, resolver, restrictor })
}

/// Everything smtpd reads from disk is loaded; from here on it has no file
/// system, no identity but the mail user's and few syscalls.
fn serve(started: Started<SmtpdListener, Prepared>) -> ExitCode {
    let Started { mut config, listener, mut link, prepared, .. } = started;
    let Prepared { tls, relay, runtime, term, resolver, restrictor } = prepared;
    let max_use = config.process.smtpd.max_use;
    // One listener per process: its address says what the process is
    // for, and the submission listeners' children use their own lists.
    let role = listener.role(&config);
    config.smtpd = config.smtpd.for_role(role);
    let sasl = match &config.smtpd.auth.server {
        Some(endpoint) if config.smtpd.auth.offered_on(role) => {
            Some(Arc::new(tokio::sync::Mutex::new(SaslServer::new(endpoint, config.smtpd.auth.timeout))))
        }
        _ => None,
    };
    let policy = mortal_smtpd::filter::policy_clients(&config);
    let server = Server {
        role,
        sasl,
        config: Arc::new(config),
        relay: Arc::new(relay),
        tls,
        resolver,
        term: Some(term),
        policy,
        restrictor: Arc::new(restrictor),
    };
    let served = child::serve(&listener, &mut link, max_use, |incoming, _link| {
        let (stream, handoff) = match incoming.client() {
            Ok(client) => client,
            Err(e) => {
                tracing::warn!("warning: hand-off from postscreen: {e}");
                return;
            }
        };
        // The JSON log's `client` for every line of the session.
        if runtime.block_on(driver::session(&server, stream, handoff).instrument(mortal_libmaster::log::session_span()))
            == SessionEnd::Terminated
        {
            // The session already told the client 421; the master wanted
            // this process gone, and it goes now, not after the next one.
            tracing::info!("exit: terminated by signal 15 during a session");
            std::process::exit(0);
        }
    });
    match served {
        Ok(reason) => {
            tracing::info!("exit: {}", reason.as_str());
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!("fatal: master link: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config(text: &str) -> Config {
        Config::parse_for(text, Path::new("/m.toml"), false).unwrap()
    }

    /// No TCP port and the plain allow-list without reverse lookups; with
    /// them, the configured nameservers' ports (or resolv.conf's 53) and
    /// the allow-list widened for DNS.
    #[test]
    fn tcp_ports_and_allow_list_follow_reverse_lookup() {
        let plain = needs(&config(""));
        assert_eq!(plain.landlock, Landlock::Rules { read_write: Vec::new(), tcp_connect: Vec::new() });
        assert_eq!(plain.seccomp, Seccomp::AllowList { dns: false, tcp_client: false, receive_sockets: false });
        assert_eq!((plain.run_as, plain.chroot_private, plain.nofile), (RunAs::MailUser, true, SMTPD_NOFILE));
        let resolv = needs(&config("[smtpd]\nreverse_lookup = true\n"));
        assert_eq!(resolv.landlock, Landlock::Rules { read_write: Vec::new(), tcp_connect: vec![RESOLV_CONF_PORT] });
        assert_eq!(resolv.seccomp, Seccomp::AllowList { dns: true, tcp_client: false, receive_sockets: false });
        let own = needs(&config("[smtpd]\nreverse_lookup = true\nresolvers = [\"127.0.0.1:5353\", \"[::1]:53\"]\n"));
        assert_eq!(own.landlock, Landlock::Rules { read_write: Vec::new(), tcp_connect: vec![5353, 53] });
    }

    /// Dovecot's auth service widens the sandbox by its port when on
    /// `inet:`, and by nothing on `unix:` (the socket is reached in the
    /// chroot, which Landlock does not govern).
    #[test]
    fn auth_server_widens_by_its_port_only() {
        let inet = needs(&config("[smtpd.auth]\nserver = \"inet:127.0.0.1:12345\"\n"));
        assert_eq!(inet.landlock, Landlock::Rules { read_write: Vec::new(), tcp_connect: vec![12345] });
        assert_eq!(inet.seccomp, Seccomp::AllowList { dns: false, tcp_client: true, receive_sockets: false });
        let unix = needs(&config("[smtpd.auth]\nserver = \"unix:/var/spool/mortal/run/private/auth\"\n"));
        assert_eq!(unix.landlock, Landlock::Rules { read_write: Vec::new(), tcp_connect: Vec::new() });
        assert_eq!(unix.seccomp, Seccomp::AllowList { dns: false, tcp_client: false, receive_sockets: false });
    }

    /// `inet:` milters and policy servers widen the sandbox by their ports
    /// and TCP client sockets; `unix:` ones by nothing.
    #[test]
    fn filters_widen_by_their_ports_only() {
        let both = needs(&config(
            "[[smtpd.milter]]\nendpoint = \"inet:127.0.0.1:11332\"\n[[smtpd.milter]]\nendpoint = \"unix:/run/x.sock\"\n\
             [[smtpd.policy]]\nendpoint = \"inet:[::1]:10023\"\n",
        ));
        assert_eq!(both.landlock, Landlock::Rules { read_write: Vec::new(), tcp_connect: vec![11332, 10023] });
        assert_eq!(both.seccomp, Seccomp::AllowList { dns: false, tcp_client: true, receive_sockets: false });
        let unix = needs(&config("[[smtpd.policy]]\nendpoint = \"unix:/run/policy.sock\"\n"));
        assert_eq!(unix.landlock, Landlock::Rules { read_write: Vec::new(), tcp_connect: Vec::new() });
        assert_eq!(unix.seccomp, Seccomp::AllowList { dns: false, tcp_client: false, receive_sockets: false });
    }
}

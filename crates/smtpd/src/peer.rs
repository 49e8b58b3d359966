//! Who the session is with: the PROXY header on proxy listeners, and the
//! per-client limits (anvil) at connect and at each MAIL.
//!
//! [`establish`] runs before the session starts. On a `proxy_listen`
//! listener it drops peers outside `proxy_trusted` unread, then reads the
//! PROXY header within `proxy_timeout` ([`crate::proxy`]) and takes the
//! client address from it; client bytes that came with the header are
//! handed on as early input (the client talked before the greeting). Then,
//! unless the client is in `trusted_networks` or `client_limit_exceptions`
//! (loopback by default) or every limit is 0, it
//! takes a lease from anvil and refuses the client, Postfix's way, when it
//! has too many connections open or opened too many in the current
//! `rate_time_unit`:
//!
//! ```text
//! connect from unknown[192.0.2.1]
//! warning: Connection concurrency limit exceeded: 51 from unknown[192.0.2.1] for service smtp
//! disconnect from unknown[192.0.2.1] commands=0
//! ```
//!
//! with `421 4.7.0 <hostname> Error: too many connections from 192.0.2.1`.
//! [`ClientLimits::check_message`] does the same for the message rate at
//! MAIL (`450 4.7.1 Error: too much mail from 192.0.2.1`). When anvil
//! cannot be asked, the session goes on without limits and a warning is
//! logged: a limiter must never be the reason mail stops.

use crate::anvil_client::{AnvilClientError, AnvilLease};
use crate::engine::{Answer, UNKNOWN_NAME};
use crate::filter::verdict::FilterReply;
use crate::proxy::{self, ProxyError, ProxyHeader};
use mortal_proto::anvil::{AnvilReply, LoginDigest, Status};
use mortal_proto::config::{Config, ListenerRole, covers, networks_contain};
use mortal_proto::envelope::SaslLogin;
use mortal_proto::smtp_status::{EnhancedStatus, ReplyCode, StatusClass};
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Instant;

/// Octets read at a time while waiting for the PROXY header. Reading
/// past the header is harmless: the rest is early client input.
const PROXY_READ_CHUNK: usize = 512;
/// The Postfix service name in the limit warnings.
const SERVICE: &str = "smtp";

/// The client of a session about to start.
#[derive(Debug)]
pub struct Peer {
    /// The client's address: the socket's peer, or the one a trusted
    /// balancer named in its PROXY header.
    pub addr: IpAddr,
    /// The client's port (the PROXY header's, behind a balancer); what
    /// policy servers and milters are told.
    pub port: u16,
    /// Client bytes that arrived together with the PROXY header.
    pub early: Vec<u8>,
    pub limits: ClientLimits,
}

/// Whether a connection accepted at `local` came through one of the
/// `[smtpd] proxy_listen` listeners, whose connections must start with a
/// PROXY header. A listener bound to a wildcard address (`0.0.0.0:2526`)
/// hands out connections at a concrete address with its port; the
/// kernel lets no other listener hold that address and port, so the
/// match is unambiguous. A listener configured with port 0 got a port
/// from the kernel that no entry names: a connection no entry claims by
/// its port came through a port-0 listener, told apart by the address
/// (the config refuses port-0 entries in both lists that could overlap).
pub fn is_proxied(config: &Config, local: SocketAddr) -> bool {
    let on = |list: &[SocketAddr], port: u16| list.iter().any(|p| p.port() == port && covers(*p, local));
    if on(&config.smtpd.proxy_listen, local.port()) {
        return true;
    }
    !on(&config.smtpd.listen, local.port()) && on(&config.smtpd.proxy_listen, 0)
}

/// Identifies the client and applies the connect-time limits; `None` when
/// the connection was dropped or refused (already logged and answered).
/// `stream` must still be in blocking mode.
pub async fn establish(config: &Config, stream: &TcpStream) -> Option<Peer> {
    let socket_peer = match stream.peer_addr() {
        Ok(addr) => SocketAddr::new(addr.ip().to_canonical(), addr.port()),
        Err(e) => {
            tracing::warn!("warning: getpeername: {e}");
            return None;
        }
    };
    let proxied = stream.local_addr().is_ok_and(|local| is_proxied(config, local));
    let (client, early, balancers_own) =
        if proxied { proxied_client(config, stream, socket_peer)? } else { (socket_peer, Vec::new(), false) };
    let addr = client.ip();
    mortal_libmaster::log::record_client(format_args!("{UNKNOWN_NAME}[{addr}]"));
    // A balancer's own connection (its health checks) is no client's: it
    // must never be refused for a client's limits and mark us down.
    let role = stream.local_addr().map_or(ListenerRole::Mx, |local| config.smtpd.role_of(local));
    let limits = if balancers_own { ClientLimits::none(addr) } else { ClientLimits::connect(config, addr, role).await };
    let refusal = limits.connect_refusal(config);
    if let Some(warning) = refusal {
        let client = format!("{UNKNOWN_NAME}[{addr}]");
        tracing::info!("connect from {client}");
        tracing::warn!("warning: {warning} from {client} for service {SERVICE}");
        let reply = format!("421 4.7.0 {} Error: too many connections from {addr}\r\n", config.server.hostname);
        let _ = stream.set_write_timeout(Some(config.smtpd.timeout));
        let _ = (&*stream).write_all(reply.as_bytes());
        tracing::info!("disconnect from {client} commands=0");
        return None;
    }
    Some(Peer { addr, port: client.port(), early, limits })
}

/// The PROXY step: the client named by a trusted balancer, whatever
/// followed the header, and whether the connection is the balancer's own
/// (a header without addresses: v1 `UNKNOWN`, v2 `LOCAL`).
fn proxied_client(config: &Config, stream: &TcpStream, socket_peer: SocketAddr) -> Option<(SocketAddr, Vec<u8>, bool)> {
    let balancer = format!("{UNKNOWN_NAME}[{}]", socket_peer.ip());
    if !networks_contain(&config.smtpd.proxy_trusted, socket_peer.ip()) {
        tracing::warn!("warning: haproxy: connection from {balancer} refused: not in smtpd.proxy_trusted");
        return None;
    }
    match read_proxy_header(stream, config.smtpd.proxy_timeout) {
        Ok((header, early)) => {
            let client = header
                .addresses
                .map_or(socket_peer, |a| SocketAddr::new(a.source.ip().to_canonical(), a.source.port()));
            tracing::debug!("haproxy: v{} header from {balancer}: client {}", header.version, client.ip());
            Some((client, early, header.addresses.is_none()))
        }
        Err(e) => {
            tracing::warn!("warning: haproxy read from {balancer}: {e}");
            None
        }
    }
}

/// Why no PROXY header could be read.
#[derive(Debug, thiserror::Error)]
pub enum HaproxyError {
    #[error("timeout error")]
    Timeout,
    #[error("lost connection")]
    Eof,
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error(transparent)]
    Header(#[from] ProxyError),
}

/// Reads until [`proxy::parse`] has a whole header, within `limit` in all.
fn read_proxy_header(stream: &TcpStream, limit: std::time::Duration) -> Result<(ProxyHeader, Vec<u8>), HaproxyError> {
    let deadline = Instant::now() + limit;
    let mut buf = Vec::new();
    let mut chunk = [0u8; PROXY_READ_CHUNK];
    // Every pass adds at least one octet, and parse refuses input longer
    // than any header, so the loop is bounded in size as well as time.
    loop {
        if let Some((header, used)) = proxy::parse(&buf)? {
            let _ = stream.set_read_timeout(None);
            return Ok((header, buf.split_off(used)));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(HaproxyError::Timeout);
        }
        stream.set_read_timeout(Some(left))?;
        match (&*stream).read(&mut chunk) {
            Ok(0) => return Err(HaproxyError::Eof),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                return Err(HaproxyError::Timeout);
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The per-client limits of one session, and its anvil lease.
#[derive(Debug)]
pub struct ClientLimits {
    /// Held for the whole session: anvil counts it as an open connection.
    lease: Option<AnvilLease>,
    /// anvil's answer to the connect.
    connected: Option<AnvilReply>,
    addr: IpAddr,
    /// The client's host name for the rate-limit warning (see
    /// [`ClientLimits::set_name`]).
    name: String,
    message_rate_limit: u32,
    /// `[smtpd.auth] failure_limit` where this listener offers AUTH, else 0.
    auth_failure_limit: u32,
    /// `[smtpd.auth] user_message_rate_limit` and
    /// `user_recipient_rate_limit` where this listener offers AUTH, else
    /// 0. They apply whatever the client's address: a login is limited
    /// for itself.
    user_message_rate_limit: u32,
    user_recipient_rate_limit: u32,
    /// The listener's role, named in the warnings.
    role: ListenerRole,
}

impl ClientLimits {
    /// No limits (trusted networks, tests of the engine).
    pub fn none(addr: IpAddr) -> Self {
        Self {
            lease: None,
            connected: None,
            addr,
            name: UNKNOWN_NAME.into(),
            message_rate_limit: 0,
            auth_failure_limit: 0,
            user_message_rate_limit: 0,
            user_recipient_rate_limit: 0,
            role: ListenerRole::Mx,
        }
    }

    async fn connect(config: &Config, addr: IpAddr, role: ListenerRole) -> Self {
        let s = &config.smtpd;
        let auth = s.auth.offered_on(role);
        // As Postfix exempts smtpd_client_event_limit_exceptions ($mynetworks)
        // from the per-client limits; the per-login ones hold everywhere.
        let exempt = networks_contain(&config.server.trusted_networks, addr)
            || networks_contain(&s.client_limit_exceptions, addr);
        let per_client = |limit: u32| if exempt { 0 } else { limit };
        let per_login = |limit: u32| if auth { limit } else { 0 };
        let auth_failure_limit = per_client(per_login(s.auth.failure_limit));
        let (user_messages, user_recipients) =
            (per_login(s.auth.user_message_rate_limit), per_login(s.auth.user_recipient_rate_limit));
        let client_limited = s.client_connection_count_limit > 0
            || s.client_connection_rate_limit > 0
            || s.client_message_rate_limit > 0
            || auth_failure_limit > 0;
        if (exempt || !client_limited) && user_messages == 0 && user_recipients == 0 {
            return Self::none(addr);
        }
        let socket = mortal_libmaster::sandbox::visible_path(&config.anvil_socket());
        match AnvilLease::connect(&socket, anvil_key(config, addr)).await {
            Ok((lease, reply)) => Self {
                lease: Some(lease),
                // An exempt client's connection counts nothing against it.
                connected: (!exempt).then_some(reply),
                addr,
                name: UNKNOWN_NAME.into(),
                message_rate_limit: per_client(s.client_message_rate_limit),
                auth_failure_limit,
                user_message_rate_limit: user_messages,
                user_recipient_rate_limit: user_recipients,
                role,
            },
            Err(e) => {
                tracing::warn!("warning: anvil {}: {e}: no client limits for {addr}", config.anvil_socket().display());
                Self::none(addr)
            }
        }
    }

    /// The client's host name, once the driver's reverse lookup (which
    /// runs only for clients not refused at connect) found one.
    pub fn set_name(&mut self, name: &str) {
        name.clone_into(&mut self.name);
    }

    /// The limit warning, when the client must be refused at connect.
    fn connect_refusal(&self, config: &Config) -> Option<String> {
        let reply = self.connected.filter(|r| r.status == Status::Counted)?;
        let (count_limit, rate_limit) =
            (config.smtpd.client_connection_count_limit, config.smtpd.client_connection_rate_limit);
        if count_limit > 0 && reply.count > count_limit {
            return Some(format!("Connection concurrency limit exceeded: {}", reply.count));
        }
        if rate_limit > 0 && reply.rate > rate_limit {
            return Some(format!("Connection rate limit exceeded: {}", reply.rate));
        }
        None
    }

    /// Before an AUTH: the client's failures when it already has
    /// `failure_limit` of them in the current unit (then AUTH is refused).
    pub async fn auth_blocked(&mut self) -> Option<u32> {
        if self.auth_failure_limit == 0 {
            return None;
        }
        let result = self.lease.as_mut()?.auth_failures().await;
        self.counted(result).filter(|failures| *failures >= self.auth_failure_limit)
    }

    /// After a failed AUTH: counts it, and returns the client's failures
    /// when this one reached `failure_limit`.
    pub async fn auth_failed(&mut self) -> Option<u32> {
        if self.auth_failure_limit == 0 {
            return None;
        }
        let result = self.lease.as_mut()?.auth_failure().await;
        self.counted(result).filter(|failures| *failures >= self.auth_failure_limit)
    }

    /// At MAIL from a logged-in client: counts the message for `login` and
    /// returns the refusal when it is over `user_message_rate_limit`.
    pub async fn check_user_message(&mut self, login: &SaslLogin) -> Option<Answer> {
        if self.user_message_rate_limit == 0 {
            return None;
        }
        let result = self.lease.as_mut()?.user_message(LoginDigest::of(&login.username)).await;
        let rate = self.counted(result).filter(|rate| *rate > self.user_message_rate_limit)?;
        tracing::warn!(
            "warning: User message rate limit exceeded: {rate} from {}[{}] sasl_username={} for service {}",
            self.name,
            self.addr,
            login.username,
            self.role.name()
        );
        Some(Answer {
            code: const { ReplyCode::of(450) },
            status: const { EnhancedStatus::new(StatusClass::Persistent, 7, 1) },
            text: format!("Error: too much mail from user {}", login.username),
        })
    }

    /// At RCPT from a logged-in client: counts the recipient for `login`
    /// and returns the refusal when it is over `user_recipient_rate_limit`.
    pub async fn check_user_recipient(&mut self, login: &SaslLogin) -> Option<FilterReply> {
        if self.user_recipient_rate_limit == 0 {
            return None;
        }
        let result = self.lease.as_mut()?.user_recipient(LoginDigest::of(&login.username)).await;
        let rate = self.counted(result).filter(|rate| *rate > self.user_recipient_rate_limit)?;
        tracing::warn!(
            "warning: User recipient rate limit exceeded: {rate} from {}[{}] sasl_username={} for service {}",
            self.name,
            self.addr,
            login.username,
            self.role.name()
        );
        Some(FilterReply::new(
            ReplyCode::of(450),
            EnhancedStatus::new(StatusClass::Persistent, 7, 1),
            format!("Error: too many recipients from user {}", login.username),
        ))
    }

    /// The rate anvil counted; `None` when it kept no count (its table is
    /// full) or could not be asked, and then the lease goes and no limit
    /// applies for the rest of the session (fail open).
    fn counted(&mut self, result: Result<AnvilReply, AnvilClientError>) -> Option<u32> {
        match result {
            Ok(r) => (r.status == Status::Counted).then_some(r.rate),
            Err(e) => {
                tracing::warn!("warning: anvil: {e}: no client limits for the rest of this session");
                self.lease = None;
                None
            }
        }
    }

    /// At MAIL: counts the message and returns the refusal when the client
    /// is over `client_message_rate_limit`.
    pub async fn check_message(&mut self) -> Option<Answer> {
        if self.message_rate_limit == 0 {
            return None;
        }
        let result = self.lease.as_mut()?.message().await;
        let rate = self.counted(result).filter(|rate| *rate > self.message_rate_limit)?;
        tracing::warn!(
            "warning: Message delivery request rate limit exceeded: {rate} from {}[{}] for service {SERVICE}",
            self.name,
            self.addr
        );
        Some(Answer {
            // 4.7.1: delivery not authorized (for now).
            code: const { ReplyCode::of(450) },
            status: const { EnhancedStatus::new(StatusClass::Persistent, 7, 1) },
            text: format!("Error: too much mail from {}", self.addr),
        })
    }
}

/// What anvil counts a client as: its network of
/// `client_ipv4_prefix_length` or `client_ipv6_prefix_length` bits.
pub fn anvil_key(config: &Config, addr: IpAddr) -> IpAddr {
    let addr = addr.to_canonical();
    let bits = match addr {
        IpAddr::V4(_) => config.smtpd.client_ipv4_prefix_length,
        IpAddr::V6(_) => config.smtpd.client_ipv6_prefix_length,
    };
    // A prefix longer than the family's (refused by Config::parse) is the
    // whole address.
    ipnet::IpNet::new(addr, bits).map_or(addr, |net| net.network())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_listeners_are_recognised_by_local_address() {
        let text = "[smtpd]\nlisten = [\"127.0.0.1:25\"]\nproxy_listen = [\"127.0.0.1:2526\", \"0.0.0.0:2600\", \"[::1]:2527\"]\n";
        let config = Config::parse(text, std::path::Path::new("mortal.toml")).expect("valid config");
        for (local, proxied) in [
            ("127.0.0.1:2526", true),
            ("127.0.0.1:25", false),
            ("127.0.0.2:2526", false),
            ("192.0.2.7:2600", true),
            ("[2001:db8::1]:2600", false),
            ("[::1]:2527", true),
            ("[::1]:2526", false),
        ] {
            assert_eq!(is_proxied(&config, local.parse().unwrap()), proxied, "{local}");
        }
    }

    #[test]
    fn port_zero_proxy_listeners_are_recognised_by_address() {
        let text = "[smtpd]\nlisten = [\"127.0.0.1:0\", \"0.0.0.0:25\"]\nproxy_listen = [\"127.0.0.2:0\", \"127.0.0.1:2526\"]\nproxy_trusted = [\"127.0.0.1\"]\n";
        let config = Config::parse(text, std::path::Path::new("mortal.toml")).expect("valid config");
        for (local, proxied) in [
            ("127.0.0.1:41234", false),
            ("127.0.0.1:2526", true),
            ("127.0.0.2:41235", true),
            ("127.0.0.2:25", false),
            ("192.0.2.7:41236", false),
        ] {
            assert_eq!(is_proxied(&config, local.parse().unwrap()), proxied, "{local}");
        }
    }

    #[test]
    fn clients_are_counted_per_network() {
        let config = Config::parse("", std::path::Path::new("mortal.toml")).expect("defaults");
        let key = |a: &str| anvil_key(&config, a.parse().unwrap()).to_string();
        assert_eq!(key("192.0.2.7"), "192.0.2.7");
        assert_eq!(key("::ffff:192.0.2.7"), "192.0.2.7");
        assert_eq!(key("2001:db8:1:2:3:4:5:6"), "2001:db8:1:2:3::");
        assert_eq!(key("2001:db8:1:2:3:fff:ffff:1"), "2001:db8:1:2:3::");
        assert_eq!(key("2001:db8:1:2:3:ffff::1"), "2001:db8:1:2:3:f000::");
        assert_ne!(key("2001:db8:1:2:4::1"), "2001:db8:1:2:3::");
    }
}

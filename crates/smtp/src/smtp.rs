//! The `smtp` agent: relay to a literal next hop (no MX lookups).
//!
//! EHLO (HELO for an old server), PIPELINING when offered, and STARTTLS by
//! `[delivery] smtp_tls_security`, as Postfix's smtp_tls_security_level:
//!
//! - `none`: plaintext always.
//! - `may`: STARTTLS when offered, any certificate accepted (opportunistic
//!   encryption defeats passive listeners; verifying would only push
//!   senders back to plaintext). A failed handshake defers the mail.
//! - `encrypt`: STARTTLS required and the certificate verified against
//!   `smtp_tls_ca_file` or the built-in Mozilla roots, for the next hop's
//!   IP address; otherwise the mail is deferred, never sent in clear.
//!
//! TLS is rustls with the ring provider. DSN parameters travel on when the
//! next hop offers DSN; otherwise NOTIFY=SUCCESS recipients get a
//! `relayed` DSN from us (RFC 3461 5.2.2).

use crate::Agent;
use crate::client::{self, Dialect, Failure, Hop, Session};
use mortal_proto::config::{NextHop, Route, SmtpTlsSecurity};
use mortal_proto::delivery::{Report, Request};
use mortal_proto::smtp_status::{EnhancedStatus, StatusClass};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, OnceLock};

pub fn deliver(agent: &Agent, addr: SocketAddr, key: &Route, request: &Request) -> Report {
    client::deliver(&agent.cache, key, request, Hop::Relay, || connect(agent, addr))
}

fn connect(agent: &Agent, addr: SocketAddr) -> Result<Session, Failure> {
    let d = &agent.config.delivery;
    let mut session =
        Session::connect(&NextHop::Inet(addr), Dialect::Smtp, &agent.config.server.hostname, agent.timeouts())?;
    let policy = d.smtp_tls_security;
    if policy == SmtpTlsSecurity::None {
        return Ok(session);
    }
    if !session.ext.starttls {
        if policy == SmtpTlsSecurity::Encrypt {
            let text = format!("TLS is required, but was not offered by host {}", session.peer);
            session.quit();
            // 4.7.4: security features not supported.
            let dsn = const { EnhancedStatus::new(StatusClass::Persistent, 7, 4) };
            return Err(Failure { dsn, text, reply: None });
        }
        return Ok(session);
    }
    let config = agent.tls.get(policy, d.smtp_tls_ca_file.as_deref()).map_err(|e| Failure {
        dsn: client::CRYPTO_FAILURE,
        text: format!("TLS client set-up: {e}"),
        reply: None,
    })?;
    session.starttls(config, ServerName::from(addr.ip()))?;
    let trust = if policy == SmtpTlsSecurity::Encrypt { "Verified" } else { "Untrusted" };
    tracing::info!(
        "{trust} TLS connection established to {}: {}",
        session.peer,
        session.tls.as_ref().map(ToString::to_string).unwrap_or_default()
    );
    Ok(session)
}

/// TLS client settings, built once per process (before the sandbox).
#[derive(Debug, Default)]
pub struct TlsClients {
    may: OnceLock<Result<Arc<ClientConfig>, String>>,
    encrypt: OnceLock<Result<Arc<ClientConfig>, String>>,
}

impl TlsClients {
    /// Builds the settings `policy` needs now, while files can still be
    /// read (before the sandbox); a failure is kept and reported by each
    /// delivery that needs TLS, as it would be on first use.
    pub fn preload(&self, policy: SmtpTlsSecurity, ca_file: Option<&Path>) {
        if policy != SmtpTlsSecurity::None {
            let _ = self.get(policy, ca_file);
        }
    }

    fn get(&self, policy: SmtpTlsSecurity, ca_file: Option<&Path>) -> Result<Arc<ClientConfig>, String> {
        let cell = if policy == SmtpTlsSecurity::Encrypt { &self.encrypt } else { &self.may };
        cell.get_or_init(|| build(policy, ca_file)).clone()
    }
}

fn build(policy: SmtpTlsSecurity, ca_file: Option<&Path>) -> Result<Arc<ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let config = if policy == SmtpTlsSecurity::Encrypt {
        let mut roots = RootCertStore::empty();
        match ca_file {
            Some(path) => {
                for cert in CertificateDer::pem_file_iter(path).map_err(|e| format!("{}: {e}", path.display()))? {
                    let cert = cert.map_err(|e| format!("{}: {e}", path.display()))?;
                    roots.add(cert).map_err(|e| format!("{}: {e}", path.display()))?;
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    } else {
        builder.dangerous().with_custom_certificate_verifier(Arc::new(AnyCertificate(provider))).with_no_client_auth()
    };
    Ok(Arc::new(config))
}

/// `may`: any certificate is accepted, but the handshake signatures are
/// still checked, so the session key is bound to the certificate shown.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

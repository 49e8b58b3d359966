//! STARTTLS for smtpd (RFC 3207): the server side of TLS, loaded once.
//!
//! The certificate and key are read when the process starts, before it
//! serves anyone (and before any privilege drop or sandbox would take the
//! file system away); a child that cannot load them exits at start, which
//! the master counts as a bad start and throttles. Only TLS 1.2 and 1.3
//! are offered, with rustls' `ring` provider and its default cipher suites
//! (all AEAD with forward secrecy). Clients are not asked for
//! certificates.
//!
//! The engine never sees TLS: the driver runs the handshake on
//! [`crate::engine::Action::StartTls`] and reports [`describe`]'s text,
//! which is what `Received:` and the log show.

use mortal_proto::config::Smtpd;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ProtocolVersion, ServerConfig, ServerConnection};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use thiserror::Error;
use tokio_rustls::TlsAcceptor;

/// Why TLS could not be set up.
#[derive(Debug, Error)]
pub enum TlsError {
    #[error("{}: cannot read certificates: {source}", path.display())]
    Certificates { path: PathBuf, source: rustls::pki_types::pem::Error },
    #[error("{}: no certificate found", .0.display())]
    NoCertificate(PathBuf),
    #[error("{}: cannot read private key: {source}", path.display())]
    Key { path: PathBuf, source: rustls::pki_types::pem::Error },
    #[error("certificate and key do not make a TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// The server's TLS configuration, shared by every session of a process.
#[derive(Clone)]
pub struct TlsServer {
    acceptor: TlsAcceptor,
}

impl std::fmt::Debug for TlsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsServer")
    }
}

impl TlsServer {
    /// The TLS configuration `[smtpd]` asks for, or `None` when STARTTLS is
    /// not offered.
    pub fn from_config(smtpd: &Smtpd) -> Result<Option<TlsServer>, TlsError> {
        match (&smtpd.tls_cert_file, &smtpd.tls_key_file) {
            (Some(cert), Some(key)) if smtpd.tls_offered() => TlsServer::load(cert, key).map(Some),
            _ => Ok(None),
        }
    }

    /// Reads a PEM certificate chain (leaf first) and its PEM private key.
    pub fn load(cert_file: &Path, key_file: &Path) -> Result<TlsServer, TlsError> {
        let certs = CertificateDer::pem_file_iter(cert_file)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|source| TlsError::Certificates { path: cert_file.to_owned(), source })?;
        if certs.is_empty() {
            return Err(TlsError::NoCertificate(cert_file.to_owned()));
        }
        let key = PrivateKeyDer::from_pem_file(key_file)
            .map_err(|source| TlsError::Key { path: key_file.to_owned(), source })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
        Ok(TlsServer { acceptor: TlsAcceptor::from(Arc::new(config)) })
    }

    pub fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }
}

/// What was negotiated, in the shape Postfix logs and puts in `Received:`:
/// `TLSv1.3 with cipher TLS13_AES_256_GCM_SHA384 (256/256 bits)`. Cipher
/// names are the IANA ones rustls uses.
pub fn describe(conn: &ServerConnection) -> String {
    let version = match conn.protocol_version() {
        Some(ProtocolVersion::TLSv1_3) => "TLSv1.3".to_owned(),
        Some(ProtocolVersion::TLSv1_2) => "TLSv1.2".to_owned(),
        Some(other) => format!("{other:?}"),
        None => "TLS".to_owned(),
    };
    let Some(suite) = conn.negotiated_cipher_suite() else { return version };
    let name = suite.suite().as_str().map_or_else(|| format!("{:?}", suite.suite()), str::to_owned);
    let bits = cipher_bits(&name);
    format!("{version} with cipher {name} ({bits}/{bits} bits)")
}

/// Symmetric key bits of a cipher suite, from its name.
fn cipher_bits(name: &str) -> u32 {
    if name.contains("AES_128") { 128 } else { 256 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_from_suite_names() {
        assert_eq!(cipher_bits("TLS13_AES_256_GCM_SHA384"), 256);
        assert_eq!(cipher_bits("TLS13_AES_128_GCM_SHA256"), 128);
        assert_eq!(cipher_bits("TLS13_CHACHA20_POLY1305_SHA256"), 256);
        assert_eq!(cipher_bits("TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"), 128);
    }

    #[test]
    fn missing_files_are_reported_with_their_path() {
        let err = TlsServer::load(Path::new("/nonexistent/cert.pem"), Path::new("/nonexistent/key.pem")).unwrap_err();
        assert!(err.to_string().starts_with("/nonexistent/cert.pem: "), "{err}");
    }
}

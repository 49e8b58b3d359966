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
//! [`crate::engine::Action::StartTls`] and reports what was negotiated
//! ([`mortal_proto::tls::TlsSummary`]), which is what `Received:` and the
//! log show.

use mortal_proto::config::Smtpd;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_files_are_reported_with_their_path() {
        let err = TlsServer::load(Path::new("/nonexistent/cert.pem"), Path::new("/nonexistent/key.pem")).unwrap_err();
        assert!(err.to_string().starts_with("/nonexistent/cert.pem: "), "{err}");
    }
}

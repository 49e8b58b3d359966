//! STARTTLS for smtpd (RFC 3207) and the TLS of the submissions port
//! (RFC 8314): the server side of TLS, loaded once.
//!
//! The certificates and keys are read when the process starts, before it
//! serves anyone (and before any privilege drop or sandbox would take the
//! file system away); a child that cannot load them exits at start, which
//! the master counts as a bad start and throttles. `mortal reload`
//! replaces every process, so renewed files are in use for every new
//! connection while sessions in progress finish on the old ones. Only TLS
//! 1.2 and 1.3 are offered, with rustls' `ring` provider and its default
//! cipher suites (all AEAD with forward secrecy). Clients are not asked
//! for certificates.
//!
//! `[[smtpd.tls_sni]]` adds certificates for the server names a client
//! may ask for in its hello (SNI, RFC 6066 3); every other name, and a
//! hello without one, gets `tls_cert_file`. Each name is checked against
//! its certificate at load, so a certificate that does not cover a name
//! it is configured for is a bad start, not a client's surprise.
//!
//! The engine never sees TLS: the driver runs the handshake on
//! [`crate::engine::Action::StartTls`] and reports what was negotiated
//! ([`mortal_proto::tls::TlsSummary`]), which is what `Received:` and the
//! log show.

use mortal_proto::config::{Smtpd, SniCertificate};
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, ResolvesServerCertUsingSni};
use rustls::sign::CertifiedKey;
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
    #[error("{}: the key does not go with the certificate: {source}", path.display())]
    Mismatch { path: PathBuf, source: rustls::Error },
    #[error("{}: not a certificate for {name}: {source}", path.display())]
    Name { path: PathBuf, name: String, source: rustls::Error },
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

/// Picks the certificate by the client's SNI name, the default otherwise.
#[derive(Debug)]
struct BySni {
    named: ResolvesServerCertUsingSni,
    default: Arc<CertifiedKey>,
}

impl ResolvesServerCert for BySni {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.named.resolve(hello).or_else(|| Some(Arc::clone(&self.default)))
    }
}

impl TlsServer {
    /// The TLS configuration `[smtpd]` asks for, or `None` when TLS is not
    /// offered.
    pub fn from_config(smtpd: &Smtpd) -> Result<Option<TlsServer>, TlsError> {
        match (&smtpd.tls_cert_file, &smtpd.tls_key_file) {
            (Some(cert), Some(key)) if smtpd.tls_offered() => TlsServer::load(cert, key, &smtpd.tls_sni).map(Some),
            _ => Ok(None),
        }
    }

    /// Reads a PEM certificate chain (leaf first) and its PEM private key,
    /// the default, and the certificates chosen by SNI name.
    pub fn load(cert_file: &Path, key_file: &Path, sni: &[SniCertificate]) -> Result<TlsServer, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let default = Arc::new(certified_key(cert_file, key_file, &provider)?);
        let mut named = ResolvesServerCertUsingSni::new();
        for entry in sni {
            let key = certified_key(&entry.cert_file, &entry.key_file, &provider)?;
            for name in &entry.names {
                named.add(name, key.clone()).map_err(|source| TlsError::Name {
                    path: entry.cert_file.clone(),
                    name: name.clone(),
                    source,
                })?;
            }
        }
        let config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(BySni { named, default }));
        Ok(TlsServer { acceptor: TlsAcceptor::from(Arc::new(config)) })
    }

    pub fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }
}

/// One chain and its key, checked to belong together.
fn certified_key(cert_file: &Path, key_file: &Path, provider: &CryptoProvider) -> Result<CertifiedKey, TlsError> {
    let certs = CertificateDer::pem_file_iter(cert_file)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::Certificates { path: cert_file.to_owned(), source })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(cert_file.to_owned()));
    }
    let key =
        PrivateKeyDer::from_pem_file(key_file).map_err(|source| TlsError::Key { path: key_file.to_owned(), source })?;
    CertifiedKey::from_der(certs, key, provider)
        .map_err(|source| TlsError::Mismatch { path: key_file.to_owned(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_files_are_reported_with_their_path() {
        let err =
            TlsServer::load(Path::new("/nonexistent/cert.pem"), Path::new("/nonexistent/key.pem"), &[]).unwrap_err();
        assert!(err.to_string().starts_with("/nonexistent/cert.pem: "), "{err}");
    }

    /// A name its certificate does not cover, and a key of another
    /// certificate, are refused at load.
    #[test]
    fn names_and_keys_must_fit_their_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let write = |stem: &str, names: &[&str]| {
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = rcgen::CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
                .unwrap()
                .self_signed(&key)
                .unwrap();
            let (c, k) = (dir.path().join(format!("{stem}.pem")), dir.path().join(format!("{stem}.key")));
            std::fs::write(&c, cert.pem()).unwrap();
            std::fs::write(&k, key.serialize_pem()).unwrap();
            (c, k)
        };
        let (default_cert, default_key) = write("default", &["localhost"]);
        let (mail_cert, mail_key) = write("mail", &["mail.example.test"]);
        let sni = |names: &[&str], key: &Path| {
            vec![SniCertificate {
                names: names.iter().map(|n| (*n).to_owned()).collect(),
                cert_file: mail_cert.clone(),
                key_file: key.to_owned(),
            }]
        };
        assert!(TlsServer::load(&default_cert, &default_key, &sni(&["mail.example.test"], &mail_key)).is_ok());
        let err = TlsServer::load(&default_cert, &default_key, &sni(&["other.example.test"], &mail_key)).unwrap_err();
        assert!(err.to_string().contains("not a certificate for other.example.test"), "{err}");
        let err = TlsServer::load(&default_cert, &default_key, &sni(&["mail.example.test"], &default_key)).unwrap_err();
        assert!(err.to_string().contains("the key does not go with the certificate"), "{err}");
    }
}

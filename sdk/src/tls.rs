//! Owns client-side TLS: a rustls client configuration that trusts a given CA
//! file (for the handler SDK, the load generator and tests), and loading PEM
//! certificates.

use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Why a TLS client configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsClientError {
    #[error("cannot read certificate file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} holds no PEM certificate")]
    NoCertificate(PathBuf),
    #[error("CA certificate in {path} is not usable: {source}")]
    BadCertificate {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Reads every PEM certificate in `path`.
pub fn load_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsClientError> {
    let bytes = std::fs::read(path).map_err(|source| TlsClientError::Read {
        path: path.to_owned(),
        source,
    })?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut bytes.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|source| TlsClientError::Read {
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsClientError::NoCertificate(path.to_owned()));
    }
    Ok(certs)
}

/// A client configuration trusting exactly the certificates in `ca_file`.
pub fn client_config_trusting(ca_file: &Path) -> Result<Arc<ClientConfig>, TlsClientError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certificates(ca_file)? {
        roots
            .add(cert)
            .map_err(|source| TlsClientError::BadCertificate {
                path: ca_file.to_owned(),
                source,
            })?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

//! Owns the server side of TLS: loading the certificate chain and key into a
//! rustls acceptor (TLS 1.2 and 1.3 only), and the handshake under a deadline.

use rustls::pki_types::PrivateKeyDer;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// Why the TLS listener cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} holds no PEM certificate: BROKER_TLS_CERT must be a PEM certificate chain")]
    NoCertificate(PathBuf),
    #[error(
        "{0} holds no PEM private key: BROKER_TLS_KEY must be a PKCS#8, PKCS#1 or SEC1 PEM key"
    )]
    NoKey(PathBuf),
    #[error("certificate and key do not form a usable TLS identity: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Why one client's handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("TLS handshake not finished within {0:?}")]
    Timeout(Duration),
    #[error("TLS handshake failed: {0}")]
    Io(#[from] std::io::Error),
}

fn read(path: &Path) -> Result<Vec<u8>, TlsSetupError> {
    std::fs::read(path).map_err(|source| TlsSetupError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Builds the acceptor from PEM files.
pub fn acceptor_from_files(cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsSetupError> {
    let chain = sdk::tls::load_certificates(cert).map_err(|e| match e {
        sdk::tls::TlsClientError::NoCertificate(p) => TlsSetupError::NoCertificate(p),
        sdk::tls::TlsClientError::Read { path, source } => TlsSetupError::Read { path, source },
        other => TlsSetupError::Read {
            path: cert.to_owned(),
            source: std::io::Error::other(other.to_string()),
        },
    })?;
    let key_pem = read(key)?;
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|source| TlsSetupError::Read {
            path: key.to_owned(),
            source,
        })?
        .ok_or_else(|| TlsSetupError::NoKey(key.to_owned()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Runs the server handshake, giving up after `deadline`.
pub async fn handshake<S>(
    acceptor: &TlsAcceptor,
    stream: S,
    deadline: Duration,
) -> Result<TlsStream<S>, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    tokio::time::timeout(deadline, acceptor.accept(stream))
        .await
        .map_err(|_| HandshakeError::Timeout(deadline))?
        .map_err(HandshakeError::Io)
}

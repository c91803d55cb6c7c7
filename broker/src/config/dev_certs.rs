//! Owns the development defaults of a loopback-only run: a private CA and a
//! `localhost`/`127.0.0.1` server certificate signed by it, and a persisted
//! HMAC secret and handler key, all under one directory (`certs/dev` by
//! default) so that printed tokens keep working across restarts.

use super::ConfigError;
use protocol::Secret;
use rand::RngCore;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use std::path::{Path, PathBuf};

/// Files of a development certificate.
#[derive(Debug, Clone)]
pub struct DevCertificate {
    /// The CA clients must trust (`mosquitto_sub --cafile`, `BROKER_CA`).
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// Development secrets persisted beside the certificate.
#[derive(Debug, Clone)]
pub struct DevSecrets {
    pub jwt_secret: Secret,
    pub handler_key: Secret,
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> ConfigError + '_ {
    move |source| ConfigError::DevFiles {
        path: path.to_owned(),
        source,
    }
}

fn write_private(path: &Path, contents: &str) -> Result<(), ConfigError> {
    std::fs::write(path, contents).map_err(io_error(path))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(io_error(path))?;
    }
    Ok(())
}

/// Writes a fresh CA and a server certificate for `localhost` and
/// `127.0.0.1` into `dir` (which is created).
pub fn make_certificate_files(dir: &Path) -> Result<DevCertificate, ConfigError> {
    std::fs::create_dir_all(dir).map_err(io_error(dir))?;
    let cert_err = |e: rcgen::Error| ConfigError::DevCert(e.to_string());

    let ca_key = KeyPair::generate().map_err(cert_err)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(cert_err)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "MQTT broker development CA");
    let ca_cert = ca_params.self_signed(&ca_key).map_err(cert_err)?;

    let server_key = KeyPair::generate().map_err(cert_err)?;
    let mut server_params = CertificateParams::new(vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ])
    .map_err(cert_err)?;
    server_params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    let server_cert = server_params
        .signed_by(&server_key, &ca_cert, &ca_key)
        .map_err(cert_err)?;

    let files = DevCertificate {
        ca_file: dir.join("ca.pem"),
        cert_file: dir.join("server.pem"),
        key_file: dir.join("server-key.pem"),
    };
    std::fs::write(&files.ca_file, ca_cert.pem()).map_err(io_error(&files.ca_file))?;
    std::fs::write(&files.cert_file, server_cert.pem()).map_err(io_error(&files.cert_file))?;
    write_private(&files.key_file, &server_key.serialize_pem())?;
    Ok(files)
}

/// Reuses the development certificate in `dir`, or makes one.
pub fn ensure_dev_certificate(dir: &Path) -> Result<DevCertificate, ConfigError> {
    let existing = DevCertificate {
        ca_file: dir.join("ca.pem"),
        cert_file: dir.join("server.pem"),
        key_file: dir.join("server-key.pem"),
    };
    if existing.ca_file.exists() && existing.cert_file.exists() && existing.key_file.exists() {
        return Ok(existing);
    }
    make_certificate_files(dir)
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::thread_rng().fill_bytes(&mut buf);
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reuses the development secrets in `dir/dev.env`, or makes them.
pub fn ensure_dev_secrets(dir: &Path) -> Result<DevSecrets, ConfigError> {
    let path = dir.join("dev.env");
    let mut jwt_secret = None;
    let mut handler_key = None;
    if let Ok(text) = std::fs::read_to_string(&path) {
        for line in text.lines() {
            match line.split_once('=') {
                // An older, shorter secret is replaced (start-up refuses it).
                Some(("JWT_SECRET", v)) if v.len() >= crate::auth::jwt::MIN_HMAC_SECRET_BYTES => {
                    jwt_secret = Some(v.to_owned())
                }
                Some(("HANDLER_KEY", v)) if v.len() >= 16 => handler_key = Some(v.to_owned()),
                _ => {}
            }
        }
    }
    let (jwt_secret, handler_key) = match (jwt_secret, handler_key) {
        (Some(s), Some(k)) => (s, k),
        _ => {
            std::fs::create_dir_all(dir).map_err(io_error(dir))?;
            let (s, k) = (random_hex(32), random_hex(32));
            write_private(
                &path,
                &format!("# development secrets, made by the broker's default run\nJWT_SECRET={s}\nHANDLER_KEY={k}\n"),
            )?;
            (s, k)
        }
    };
    Ok(DevSecrets {
        jwt_secret: Secret::new(jwt_secret),
        handler_key: Secret::new(handler_key),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_and_secrets_are_made_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let first = ensure_dev_certificate(dir.path()).unwrap();
        let ca = std::fs::read_to_string(&first.ca_file).unwrap();
        assert!(ca.contains("BEGIN CERTIFICATE"));
        let again = ensure_dev_certificate(dir.path()).unwrap();
        assert_eq!(std::fs::read_to_string(&again.ca_file).unwrap(), ca);

        let s1 = ensure_dev_secrets(dir.path()).unwrap();
        let s2 = ensure_dev_secrets(dir.path()).unwrap();
        assert_eq!(s1.jwt_secret.expose(), s2.jwt_secret.expose());
        assert_eq!(s1.handler_key.expose().len(), 64);
        assert!(s2.handler_key.matches(s1.handler_key.expose().as_bytes()));
    }
}

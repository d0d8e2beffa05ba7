//! Loading the server's X.509 certificate and key for STARTTLS.

use std::path::Path;
use std::sync::Arc;

use crate::ServerError;

/// Builds a rustls server configuration from PEM files: a certificate chain
/// (leaf first) and its private key (PKCS#8, PKCS#1 or SEC1).
pub fn load_tls_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, ServerError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| ServerError::TlsFile {
            path: path.display().to_string(),
            source,
        })
    };
    let cert_pem = read(cert)?;
    let certs = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| ServerError::TlsFile {
            path: cert.display().to_string(),
            source,
        })?;
    if certs.is_empty() {
        return Err(ServerError::TlsMissing {
            path: cert.display().to_string(),
            what: "certificate",
        });
    }
    let key_pem = read(key)?;
    let key_der = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|source| ServerError::TlsFile {
            path: key.display().to_string(),
            source,
        })?
        .ok_or_else(|| ServerError::TlsMissing {
            path: key.display().to_string(),
            what: "private key",
        })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)?;
    Ok(Arc::new(config))
}

//! Loading the server's X.509 certificate and key for STARTTLS.

use std::path::Path;
use std::sync::Arc;

use crate::ServerError;

/// Builds a rustls server configuration from PEM files: a certificate chain
/// (leaf first) and its private key (PKCS#8, PKCS#1 or SEC1).
pub fn load_tls_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, ServerError> {
    let certs = tlsfiles::certs(cert)?;
    let key_der = tlsfiles::private_key(key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)?;
    Ok(Arc::new(config))
}

//! TLS for the link (rustls, ring provider): the origin presents a
//! certificate; the edge verifies it against a CA and, for mutual
//! authentication, presents its own certificate (or proves a pre-shared key
//! in the link handshake instead).

use std::path::Path;
use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;

/// Errors loading TLS material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    Pem(#[from] tlsfiles::PemError),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client CA: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

use tlsfiles::{certs, private_key as key, roots};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The origin's side: its certificate chain and key, and, for mutual TLS,
/// the CA that edge certificates must chain to.
pub fn server_config(
    cert: &Path,
    key_path: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?;
    let builder = match client_ca {
        Some(ca) => builder.with_client_cert_verifier(
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider())
                .build()?,
        ),
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(
        builder.with_single_cert(certs(cert)?, key(key_path)?)?,
    ))
}

/// The edge's side: the CA the origin's certificate must chain to, and
/// optionally the edge's own certificate and key.
pub fn client_config(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(ca)?);
    let config = match identity {
        Some((cert, key_path)) => builder.with_client_auth_cert(certs(cert)?, key(key_path)?)?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

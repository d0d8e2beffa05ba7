//! Reading TLS material for rustls from PEM files, in one place: the NBD
//! server's STARTTLS and the edge-origin link both load certificates this
//! way, and both report a missing or unreadable file by its path.

use std::path::Path;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::RootCertStore;

/// A PEM file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PemError {
    #[error("{path}: {source}")]
    File {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: no {what} found")]
    Missing { path: String, what: &'static str },
    #[error("{path}: {source}")]
    Invalid {
        path: String,
        #[source]
        source: rustls::Error,
    },
}

fn read(path: &Path) -> Result<Vec<u8>, PemError> {
    std::fs::read(path).map_err(|source| PemError::File {
        path: path.display().to_string(),
        source,
    })
}

/// The certificate chain in `path` (leaf first); at least one.
pub fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let pem = read(path)?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| PemError::File {
            path: path.display().to_string(),
            source,
        })?;
    if certs.is_empty() {
        return Err(PemError::Missing {
            path: path.display().to_string(),
            what: "certificate",
        });
    }
    Ok(certs)
}

/// The private key in `path` (PKCS#8, PKCS#1 or SEC1).
pub fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, PemError> {
    let pem = read(path)?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|source| PemError::File {
            path: path.display().to_string(),
            source,
        })?
        .ok_or_else(|| PemError::Missing {
            path: path.display().to_string(),
            what: "private key",
        })
}

/// The CA certificates in `path`, as trust roots.
pub fn roots(path: &Path) -> Result<RootCertStore, PemError> {
    let mut roots = RootCertStore::empty();
    for c in certs(path)? {
        roots.add(c).map_err(|source| PemError::Invalid {
            path: path.display().to_string(),
            source,
        })?;
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_file() {
        let dir = std::env::temp_dir().join(format!("tlsfiles-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("none.pem");
        assert!(certs(&missing)
            .unwrap_err()
            .to_string()
            .contains("none.pem"));
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a pem\n").unwrap();
        let e = certs(&empty).unwrap_err();
        assert!(
            matches!(
                e,
                PemError::Missing {
                    what: "certificate",
                    ..
                }
            ),
            "{e}"
        );
        assert!(matches!(
            private_key(&empty).unwrap_err(),
            PemError::Missing {
                what: "private key",
                ..
            }
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

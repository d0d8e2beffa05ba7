//! NBD URIs (<https://github.com/NetworkBlockDevice/nbd/blob/master/doc/uri.md>),
//! the subset this client speaks: `nbd://HOST[:PORT]/EXPORT` and
//! `nbd+unix:///EXPORT?socket=PATH`. TLS schemes (`nbds`, `nbds+unix`) are
//! refused rather than silently downgraded.

use std::fmt;
use std::path::PathBuf;

/// The IANA-assigned NBD port.
pub const DEFAULT_PORT: u16 = 10809;

/// Where an NBD server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transport {
    Tcp { host: String, port: u16 },
    Unix(PathBuf),
}

/// A parsed NBD URI: transport and export name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdUri {
    pub transport: Transport,
    pub export: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UriError {
    #[error(
        "{0:?} is not an NBD URI (nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH)"
    )]
    Scheme(String),
    #[error("{0:?}: TLS NBD URIs are not supported")]
    Tls(String),
    #[error("{uri:?}: {why}")]
    Invalid { uri: String, why: &'static str },
}

impl NbdUri {
    /// Whether `s` looks like an NBD URI at all (as opposed to a path).
    pub fn is_nbd_uri(s: &str) -> bool {
        ["nbd://", "nbd+unix://", "nbds://", "nbds+unix://"]
            .iter()
            .any(|p| s.starts_with(p))
    }

    pub fn parse(uri: &str) -> Result<NbdUri, UriError> {
        let invalid = |why| UriError::Invalid {
            uri: uri.to_owned(),
            why,
        };
        let (scheme, rest) = uri
            .split_once("://")
            .ok_or_else(|| UriError::Scheme(uri.to_owned()))?;
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let export = percent_decode(path).ok_or_else(|| invalid("bad %-escape in the export"))?;
        let param = |name: &str| -> Option<Option<String>> {
            query?
                .split('&')
                .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
                .map(percent_decode)
        };
        let transport = match scheme {
            "nbd" => {
                if query.is_some_and(|q| !q.is_empty()) {
                    return Err(invalid("nbd:// takes no query parameters"));
                }
                let (host, port) = split_host_port(authority).ok_or_else(|| invalid("bad port"))?;
                if host.is_empty() {
                    return Err(invalid("no host"));
                }
                Transport::Tcp {
                    host: host.to_owned(),
                    port,
                }
            }
            "nbd+unix" => {
                if !authority.is_empty() {
                    return Err(invalid("nbd+unix:// takes no host"));
                }
                let socket = param("socket")
                    .ok_or_else(|| invalid("no socket=PATH parameter"))?
                    .ok_or_else(|| invalid("bad %-escape in the socket path"))?;
                if socket.is_empty() {
                    return Err(invalid("empty socket path"));
                }
                Transport::Unix(PathBuf::from(socket))
            }
            "nbds" | "nbds+unix" => return Err(UriError::Tls(uri.to_owned())),
            _ => return Err(UriError::Scheme(uri.to_owned())),
        };
        Ok(NbdUri { transport, export })
    }
}

impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.transport {
            Transport::Tcp { host, port } if host.contains(':') => {
                write!(f, "nbd://[{host}]:{port}/{}", self.export)
            }
            Transport::Tcp { host, port } => write!(f, "nbd://{host}:{port}/{}", self.export),
            Transport::Unix(p) => {
                write!(f, "nbd+unix:///{}?socket={}", self.export, p.display())
            }
        }
    }
}

/// `HOST`, `HOST:PORT`, `[V6]` or `[V6]:PORT`.
fn split_host_port(authority: &str) -> Option<(&str, u16)> {
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after {
            "" => DEFAULT_PORT,
            p => p.strip_prefix(':')?.parse().ok()?,
        };
        return Some((host, port));
    }
    match authority.rsplit_once(':') {
        Some((host, port)) => Some((host, port.parse().ok()?)),
        None => Some((authority, DEFAULT_PORT)),
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hex = [bytes.next()?, bytes.next()?];
            let hex = std::str::from_utf8(&hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
        } else {
            out.push(b);
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16, export: &str) -> NbdUri {
        NbdUri {
            transport: Transport::Tcp {
                host: host.into(),
                port,
            },
            export: export.into(),
        }
    }

    #[test]
    fn parses_tcp_uris() {
        assert_eq!(
            NbdUri::parse("nbd://example.com/vol").unwrap(),
            tcp("example.com", DEFAULT_PORT, "vol")
        );
        assert_eq!(
            NbdUri::parse("nbd://127.0.0.1:1234/a%20b").unwrap(),
            tcp("127.0.0.1", 1234, "a b")
        );
        assert_eq!(NbdUri::parse("nbd://[::1]:99").unwrap(), tcp("::1", 99, ""));
        assert_eq!(
            NbdUri::parse("nbd://h/").unwrap(),
            tcp("h", DEFAULT_PORT, "")
        );
        assert!(NbdUri::parse("nbd://h:x/e").is_err());
        assert!(NbdUri::parse("nbd:///e").is_err());
    }

    #[test]
    fn parses_unix_uris() {
        let u = NbdUri::parse("nbd+unix:///disk?socket=/run/q.sock").unwrap();
        assert_eq!(u.transport, Transport::Unix("/run/q.sock".into()));
        assert_eq!(u.export, "disk");
        let u = NbdUri::parse("nbd+unix:///?socket=%2Ftmp%2Fs").unwrap();
        assert_eq!(u.transport, Transport::Unix("/tmp/s".into()));
        assert_eq!(u.export, "");
        assert!(NbdUri::parse("nbd+unix:///disk").is_err());
        assert!(NbdUri::parse("nbd+unix://host/disk?socket=/s").is_err());
    }

    #[test]
    fn refuses_other_schemes() {
        assert!(matches!(NbdUri::parse("nbds://h/e"), Err(UriError::Tls(_))));
        assert!(matches!(
            NbdUri::parse("/srv/disk.img"),
            Err(UriError::Scheme(_))
        ));
        assert!(matches!(
            NbdUri::parse("http://h/e"),
            Err(UriError::Scheme(_))
        ));
        assert!(NbdUri::is_nbd_uri("nbd+unix:///x?socket=/s"));
        assert!(!NbdUri::is_nbd_uri("/srv/nbd://x"));
    }
}

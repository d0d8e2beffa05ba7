//! `ferry serve` configuration: command-line flags, or a TOML file that the
//! flags extend.
//!
//! ```toml
//! listen = ["127.0.0.1:10809", "unix:/run/ferry/nbd.sock"]
//!
//! [tls]
//! cert = "/etc/ferry/server-cert.pem"
//! key = "/etc/ferry/server-key.pem"
//! mode = "require"          # or "on": TLS offered, plaintext allowed
//!
//! [[export]]
//! name = "disk"
//! path = "/var/lib/ferry/disk.img"
//! description = "build VM root disk"
//! read_only = false
//! readahead = false
//! engine = "auto"           # "uring" or "portable"
//!
//! [cache]                   # optional: read every export through an
//! dir = "/var/cache/ferry"  # encrypted local cache
//! size = "8G"               # capacity; K, M, G, T suffixes (powers of 2)
//! key_file = "/etc/ferry/cache.key"   # 32 bytes, raw or as 64 hex digits
//! chunk_size = "64K"        # fixed when the cache is created
//! write_mode = "through"    # or "around"
//!
//! [iscsi]                   # optional: also serve every export over iSCSI,
//! listen = ["0.0.0.0:3260"] # as LUN 0 of target iqn.2026-11.dev.ferry:<name>
//! allowed_initiators = ["iqn.1993-08.org.debian:01:web1"]  # empty: everyone
//! chap_user = "web"          # one-way CHAP (the initiator proves itself)
//! chap_secret_file = "/etc/ferry/iscsi.secret"
//! mutual_user = "ferry"      # mutual CHAP (the target proves itself too)
//! mutual_secret_file = "/etc/ferry/iscsi-mutual.secret"
//! discovery_chap = true      # also ask discovery sessions for CHAP
//! ```

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Default NBD listen address (IANA port 10809).
pub const DEFAULT_NBD_ADDR: &str = "127.0.0.1:10809";

/// Default iSCSI portal (IANA port 3260).
pub const DEFAULT_ISCSI_ADDR: &str = "127.0.0.1:3260";

/// The prefix of every target name: `iqn.2026-11.dev.ferry:<export>`.
pub const IQN_PREFIX: &str = "iqn.2026-11.dev.ferry";

/// Where to listen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(String),
    Unix(PathBuf),
}

impl FromStr for ListenAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a socket path".into());
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        if s.starts_with('/') {
            return Ok(ListenAddr::Unix(PathBuf::from(s)));
        }
        if !s.contains(':') {
            return Err(format!("{s:?} is not HOST:PORT or unix:PATH"));
        }
        Ok(ListenAddr::Tcp(s.to_owned()))
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(a) => f.write_str(a),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl Serialize for ListenAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ListenAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Which file engine an export uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    #[default]
    Auto,
    Uring,
    Portable,
}

impl From<Engine> for blockcore::FileEngine {
    fn from(e: Engine) -> Self {
        match e {
            Engine::Auto => blockcore::FileEngine::Auto,
            Engine::Uring => blockcore::FileEngine::Uring,
            Engine::Portable => blockcore::FileEngine::Portable,
        }
    }
}

/// TLS policy when a certificate is configured.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TlsPolicy {
    /// Offer STARTTLS; plaintext clients are still served.
    On,
    /// Refuse every client that does not upgrade to TLS.
    #[default]
    Require,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    #[serde(default)]
    pub mode: TlsPolicy,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportConfig {
    pub name: String,
    pub path: PathBuf,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub read_only: bool,
    #[serde(default)]
    pub readahead: bool,
    #[serde(default)]
    pub engine: Engine,
}

/// A byte count written as a number or with a K/M/G/T suffix (powers of
/// two), as in `"64K"` or `"8G"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let (digits, shift) = match t.char_indices().last() {
            Some((i, c)) if c.is_ascii_alphabetic() => {
                let shift = match c.to_ascii_uppercase() {
                    'K' => 10,
                    'M' => 20,
                    'G' => 30,
                    'T' => 40,
                    _ => return Err(format!("{s:?}: unknown size suffix {c:?}")),
                };
                (&t[..i], shift)
            }
            _ => (t, 0),
        };
        let n: u64 = digits
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not a size (e.g. 4096, 64K, 8G)"))?;
        n.checked_mul(1u64 << shift)
            .map(ByteSize)
            .ok_or_else(|| format!("{s:?} is too large"))
    }
}

impl fmt::Display for ByteSize {
    /// The largest suffix that divides the count exactly (`64K`, `8G`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (shift, suffix) in [(40, 'T'), (30, 'G'), (20, 'M'), (10, 'K')] {
            if self.0 != 0 && self.0.trailing_zeros() >= shift {
                return write!(f, "{}{suffix}", self.0 >> shift);
            }
        }
        write!(f, "{}", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl schemars::JsonSchema for ByteSize {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "ByteSize".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "A byte count: a number, or a string with a K, M, G or T suffix (powers of two), e.g. \"64M\".",
            "oneOf": [
                { "type": "integer", "minimum": 0 },
                { "type": "string", "pattern": "^[0-9]+ *[KMGTkmgt]?$" }
            ]
        })
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(n) => Ok(ByteSize(n)),
            Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// What writes do to the cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CacheWriteMode {
    /// Whole chunks written are stored in the cache.
    #[default]
    Through,
    /// Writes only drop the chunks they touch.
    Around,
}

/// The local cache every export is read through.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheSettings {
    pub dir: PathBuf,
    pub size: ByteSize,
    pub key_file: PathBuf,
    #[serde(default = "default_chunk_size")]
    pub chunk_size: ByteSize,
    #[serde(default)]
    pub write_mode: CacheWriteMode,
}

fn default_chunk_size() -> ByteSize {
    ByteSize(64 * 1024)
}

/// Serving the exports over iSCSI.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IscsiSettings {
    /// Portals (`HOST:PORT`; the iSCSI port is 3260).
    #[serde(default)]
    pub listen: Vec<String>,
    /// Initiator names allowed to log in to the targets; empty allows all.
    #[serde(default)]
    pub allowed_initiators: Vec<String>,
    /// CHAP name the initiator must present, with `chap_secret_file`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chap_user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chap_secret_file: Option<PathBuf>,
    /// Mutual CHAP: the name and secret the target answers with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mutual_user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mutual_secret_file: Option<PathBuf>,
    /// Ask discovery sessions for CHAP too.
    #[serde(default)]
    pub discovery_chap: bool,
}

/// The whole `serve` configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeConfig {
    #[serde(default)]
    pub listen: Vec<ListenAddr>,
    pub tls: Option<TlsConfig>,
    pub cache: Option<CacheSettings>,
    pub iscsi: Option<IscsiSettings>,
    #[serde(default, rename = "export")]
    pub exports: Vec<ExportConfig>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: String,
        #[source]
        source: toml::de::Error,
    },
    #[error(
        "nothing to serve: give an IMAGE, --export NAME=PATH or a config file with [[export]]"
    )]
    NoExports,
    #[error("two exports are named {0:?}")]
    DuplicateExport(String),
    #[error("export names must be at most 4096 bytes: {0:?}")]
    NameTooLong(String),
    #[error("export names may not contain NUL: {0:?}")]
    NameWithNul(String),
    #[error("cache key file {path}: {why}")]
    CacheKey { path: String, why: String },
    #[error("iSCSI: {0}")]
    Iscsi(String),
}

/// Reads a 32-byte cache master key: 32 raw bytes, or 64 hex digits
/// (surrounding whitespace allowed).
pub fn read_key_file(path: &Path) -> Result<zeroize::Zeroizing<[u8; 32]>, ConfigError> {
    let err = |why: String| ConfigError::CacheKey {
        path: path.display().to_string(),
        why,
    };
    let raw = zeroize::Zeroizing::new(std::fs::read(path).map_err(|e| err(e.to_string()))?);
    let mut key = zeroize::Zeroizing::new([0u8; 32]);
    if raw.len() == 32 {
        key.copy_from_slice(&raw);
        return Ok(key);
    }
    let text = std::str::from_utf8(&raw)
        .map_err(|_| err("expected 32 raw bytes or 64 hex digits".into()))?
        .trim();
    if text.len() != 64 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(err(format!(
            "expected 32 raw bytes or 64 hex digits, found {} bytes",
            raw.len()
        )));
    }
    for (i, k) in key.iter_mut().enumerate() {
        *k = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).expect("checked hex");
    }
    Ok(key)
}

impl ServeConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.display().to_string(),
            source,
        })
    }

    /// Checks what the protocol and the server will insist on, so a bad
    /// configuration fails at start-up with a clear message.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.exports.is_empty() {
            return Err(ConfigError::NoExports);
        }
        for (i, e) in self.exports.iter().enumerate() {
            if e.name.len() > 4096 {
                return Err(ConfigError::NameTooLong(e.name.clone()));
            }
            if e.name.contains('\0') {
                return Err(ConfigError::NameWithNul(e.name.clone()));
            }
            if self.exports[..i].iter().any(|o| o.name == e.name) {
                return Err(ConfigError::DuplicateExport(e.name.clone()));
            }
        }
        if let Some(iscsi) = &self.iscsi {
            iscsi.validate(&self.exports)?;
        }
        Ok(())
    }
}

impl IscsiSettings {
    fn validate(&self, exports: &[ExportConfig]) -> Result<(), ConfigError> {
        self.validate_auth()?;
        for e in exports {
            check_iscsi_name(&e.name)?;
        }
        Ok(())
    }

    /// Checks the CHAP settings go together.
    pub fn validate_auth(&self) -> Result<(), ConfigError> {
        let err = |m: String| Err(ConfigError::Iscsi(m));
        if self.chap_user.is_some() != self.chap_secret_file.is_some() {
            return err("chap_user and chap_secret_file go together".into());
        }
        if self.mutual_user.is_some() != self.mutual_secret_file.is_some() {
            return err("mutual_user and mutual_secret_file go together".into());
        }
        if self.mutual_user.is_some() && self.chap_user.is_none() {
            return err("mutual CHAP needs one-way CHAP (chap_user) as well".into());
        }
        if self.discovery_chap && self.chap_user.is_none() {
            return err("discovery_chap needs chap_user".into());
        }
        Ok(())
    }

    /// Reads a CHAP secret: the file's bytes without a trailing newline.
    /// RFC 7143 §12.1.3 asks for at least 12 bytes (96 bits).
    pub fn read_secret(path: &Path) -> Result<Vec<u8>, ConfigError> {
        let mut raw = std::fs::read(path).map_err(|e| {
            ConfigError::Iscsi(format!("reading CHAP secret {}: {e}", path.display()))
        })?;
        while raw.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            raw.pop();
        }
        if raw.len() < 12 {
            return Err(ConfigError::Iscsi(format!(
                "CHAP secret {} is {} bytes: at least 12 are needed",
                path.display(),
                raw.len()
            )));
        }
        Ok(raw)
    }
}

/// Checks that an export or volume name can end an iSCSI target name.
/// RFC 7143 §4.2.7.2: iSCSI names are lower-case letters, digits, '-', '.'
/// and ':' (after stringprep, which we do not do).
pub fn check_iscsi_name(name: &str) -> Result<(), ConfigError> {
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.:".contains(&b))
    {
        return Err(ConfigError::Iscsi(format!(
            "{name:?} cannot be part of an iSCSI name: use lower-case letters, digits, '-', '.' and ':'"
        )));
    }
    Ok(())
}

/// Parses `NAME=PATH`.
pub fn parse_export_arg(s: &str) -> Result<(String, PathBuf), String> {
    match s.split_once('=') {
        Some((name, path)) if !path.is_empty() => Ok((name.to_owned(), PathBuf::from(path))),
        _ => Err(format!("{s:?} is not NAME=PATH")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_config_file() {
        let text = r#"
            listen = ["127.0.0.1:10809", "unix:/tmp/ferry.sock"]
            [tls]
            cert = "c.pem"
            key = "k.pem"
            mode = "on"
            [[export]]
            name = "disk"
            path = "/images/disk.img"
            description = "root disk"
            readahead = true
            engine = "portable"
            [[export]]
            name = "iso"
            path = "/images/debian.iso"
            read_only = true
        "#;
        let cfg: ServeConfig = toml::from_str(text).unwrap();
        assert_eq!(
            cfg.listen,
            vec![
                ListenAddr::Tcp("127.0.0.1:10809".into()),
                ListenAddr::Unix("/tmp/ferry.sock".into())
            ]
        );
        assert_eq!(cfg.tls.as_ref().unwrap().mode, TlsPolicy::On);
        assert_eq!(cfg.exports.len(), 2);
        assert!(cfg.exports[0].readahead);
        assert_eq!(cfg.exports[0].engine, Engine::Portable);
        assert!(cfg.exports[1].read_only);
        assert_eq!(cfg.exports[1].description, "");
        cfg.validate().unwrap();
    }

    #[test]
    fn rejects_unknown_keys_and_duplicates() {
        assert!(toml::from_str::<ServeConfig>("bogus = 1").is_err());
        let cfg: ServeConfig = toml::from_str(
            "[[export]]\nname = \"a\"\npath = \"x\"\n[[export]]\nname = \"a\"\npath = \"y\"\n",
        )
        .unwrap();
        assert!(matches!(
            cfg.validate(),
            Err(ConfigError::DuplicateExport(_))
        ));
        assert!(matches!(
            ServeConfig::default().validate(),
            Err(ConfigError::NoExports)
        ));
        let cfg: ServeConfig =
            toml::from_str("[[export]]\nname = \"a\\u0000b\"\npath = \"x\"\n").unwrap();
        assert!(matches!(cfg.validate(), Err(ConfigError::NameWithNul(_))));
    }

    #[test]
    fn parses_cache_settings_and_sizes() {
        let cfg: ServeConfig = toml::from_str(
            "[cache]\ndir = \"/c\"\nsize = \"8G\"\nkey_file = \"/k\"\n[[export]]\nname = \"a\"\npath = \"x\"\n",
        )
        .unwrap();
        let cache = cfg.cache.unwrap();
        assert_eq!(cache.size, ByteSize(8 << 30));
        assert_eq!(cache.chunk_size, ByteSize(64 << 10));
        assert_eq!(cache.write_mode, CacheWriteMode::Through);
        assert_eq!("4096".parse::<ByteSize>().unwrap(), ByteSize(4096));
        assert_eq!("64k".parse::<ByteSize>().unwrap(), ByteSize(65536));
        assert!("12Q".parse::<ByteSize>().is_err());
        assert!("99999999999T".parse::<ByteSize>().is_err());
    }

    #[test]
    fn reads_raw_and_hex_keys() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("raw");
        std::fs::write(&raw, [7u8; 32]).unwrap();
        assert_eq!(*read_key_file(&raw).unwrap(), [7u8; 32]);
        let hex = dir.path().join("hex");
        std::fs::write(&hex, format!("{}\n", "0a".repeat(32))).unwrap();
        assert_eq!(*read_key_file(&hex).unwrap(), [10u8; 32]);
        let bad = dir.path().join("bad");
        std::fs::write(&bad, "short").unwrap();
        assert!(read_key_file(&bad).is_err());
    }

    #[test]
    fn parses_listen_addresses_and_export_args() {
        assert_eq!(
            "unix:/run/x.sock".parse::<ListenAddr>().unwrap(),
            ListenAddr::Unix("/run/x.sock".into())
        );
        assert!("localhost".parse::<ListenAddr>().is_err());
        assert_eq!(
            parse_export_arg("a=/x=y").unwrap(),
            ("a".to_owned(), PathBuf::from("/x=y"))
        );
        assert!(parse_export_arg("novalue").is_err());
    }
}

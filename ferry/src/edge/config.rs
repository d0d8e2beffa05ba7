//! The edge daemon's configuration file: where the cache lives, what it
//! listens on, how it reaches origins, and the volumes it serves (the
//! desired state). `ferry edge --config FILE` loads it at start; the
//! management API rewrites it (atomically) whenever volumes are added,
//! changed or removed, so a restart finds the same volumes.
//!
//! ```toml
//! cache_dir = "/var/cache/ferry"
//! cache_size = "64G"
//! cache_memory = "1G"
//! api = "/run/ferry/edge.sock"        # default: <cache_dir>/api.sock
//! nbd = ["0.0.0.0:10809"]             # one listener; volumes are export names
//! metrics = "0.0.0.0:9150"            # optional: GET /metrics over plain TCP
//!
//! [api_tcp]                           # optional: the API over TCP with TLS
//! listen = "0.0.0.0:9443"             # and a bearer token
//! tls_cert = "/etc/ferry/api-cert.pem"
//! tls_key = "/etc/ferry/api-key.pem"
//! token_file = "/etc/ferry/api.token"
//!
//! [iscsi]                             # optional: one portal, a target per
//! listen = ["0.0.0.0:3260"]           # volume (iqn.2026-11.dev.ferry:<name>)
//! allowed_initiators = []             # CHAP settings as for `ferry serve`
//!
//! [link]                              # how every volume reaches its origin
//! tls_ca = "/etc/ferry/origin-ca.pem" # or no_tls = true on a trusted network
//! psk_file = "/etc/ferry/link.psk"
//! request_timeout_secs = 30
//!
//! [prefetch]                          # boot profiles and prefetch plans
//! budget = "256M"                     # plan bytes pushed at attach ("0": none)
//! profile_window_secs = 180           # record a boot for at most this (0: never)
//! profile_quiet_secs = 20             # ...or until no new chunk is read this long
//!
//! [[volume]]
//! name = "web1"
//! origin = "origin.example:7000"
//! journal_size = "1G"
//! rpo_secs = 30
//! local_only = ["1G:512M"]            # or isolated = true
//! ```

use std::path::{Path, PathBuf};

use anyhow::Context;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::config::{ByteSize, IscsiSettings, ListenAddr};

/// The whole file.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeFile {
    pub cache_dir: PathBuf,
    #[serde(default = "default_cache_size")]
    pub cache_size: ByteSize,
    #[serde(default = "default_cache_memory")]
    pub cache_memory: ByteSize,
    /// The management API's Unix socket (default `<cache_dir>/api.sock`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_tcp: Option<ApiTcp>,
    /// A plain-TCP listener serving only `GET /metrics`, for Prometheus.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<String>,
    /// NBD listeners (default 127.0.0.1:10809 unless iSCSI is configured).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nbd: Vec<ListenAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iscsi: Option<IscsiSettings>,
    #[serde(default)]
    pub link: LinkSettings,
    #[serde(default)]
    pub prefetch: PrefetchSettings,
    #[serde(default, rename = "volume")]
    pub volumes: Vec<VolumeSpec>,
}

/// The API over TCP: TLS and a bearer token are required there.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApiTcp {
    pub listen: String,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    /// The token clients send as `Authorization: Bearer TOKEN` (the file's
    /// first line).
    pub token_file: PathBuf,
}

/// How volumes reach their origins. One set for the whole edge: origins of
/// one deployment share their credentials.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LinkSettings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub psk_file: Option<PathBuf>,
    #[serde(default)]
    pub no_tls: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ca: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    /// The name the origins' certificates carry (default: each origin's
    /// host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_server_name: Option<String>,
    #[serde(default = "default_request_timeout")]
    pub request_timeout_secs: f64,
    /// This edge's id at the origins (default: kept in the cache directory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edge_id: Option<String>,
}

impl Default for LinkSettings {
    fn default() -> Self {
        LinkSettings {
            psk_file: None,
            no_tls: false,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            tls_server_name: None,
            request_timeout_secs: default_request_timeout(),
            edge_id: None,
        }
    }
}

/// Boot profiles and prefetch plans, for every volume of the edge.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PrefetchSettings {
    /// Bytes of the volume's prefetch plan the origin pushes at attach,
    /// at most (0: no plan).
    #[serde(default = "default_prefetch_budget")]
    pub budget: ByteSize,
    /// A volume's reads from its attach are recorded as its boot profile
    /// for at most this long (0: no recording).
    #[serde(default = "default_profile_window")]
    pub profile_window_secs: f64,
    /// ...or until no chunk not read before is read for this long.
    #[serde(default = "default_profile_quiet")]
    pub profile_quiet_secs: f64,
}

impl Default for PrefetchSettings {
    fn default() -> Self {
        PrefetchSettings {
            budget: default_prefetch_budget(),
            profile_window_secs: default_profile_window(),
            profile_quiet_secs: default_profile_quiet(),
        }
    }
}

impl PrefetchSettings {
    /// The recording window (`None`: recording is off).
    pub fn window(&self) -> Option<prefetch::RecordWindow> {
        (self.profile_window_secs > 0.0).then(|| prefetch::RecordWindow {
            max: std::time::Duration::from_secs_f64(self.profile_window_secs),
            quiet: std::time::Duration::from_secs_f64(self.profile_quiet_secs),
            ..prefetch::RecordWindow::default()
        })
    }
}

fn default_prefetch_budget() -> ByteSize {
    ByteSize(256 << 20)
}
fn default_profile_window() -> f64 {
    180.0
}
fn default_profile_quiet() -> f64 {
    20.0
}

/// One volume the edge serves: the same shape in the file and in the API.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VolumeSpec {
    /// The volume's name at its origin; also its NBD export name and the
    /// end of its iSCSI target name.
    pub name: String,
    /// The origin serving it, HOST:PORT.
    pub origin: String,
    /// The write journal's capacity; writes wait when it is full.
    #[serde(default = "default_journal_size")]
    pub journal_size: ByteSize,
    /// Recovery point objective: writes older than this are shipped even
    /// without a FLUSH.
    #[serde(default = "default_rpo")]
    pub rpo_secs: f64,
    /// Byte ranges whose writes stay on this edge, never shipped, as
    /// "START:LEN" with K/M/G suffixes (e.g. "1G:512M").
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub local_only: Vec<String>,
    /// The whole volume is local-only (isolation mode).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub isolated: bool,
}

/// What can change on a running volume without detaching it.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VolumeChange {
    /// A new recovery point objective, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpo_secs: Option<f64>,
}

fn default_cache_size() -> ByteSize {
    ByteSize(1 << 30)
}
fn default_cache_memory() -> ByteSize {
    ByteSize(256 << 20)
}
fn default_journal_size() -> ByteSize {
    ByteSize(1 << 30)
}
fn default_rpo() -> f64 {
    30.0
}
fn default_request_timeout() -> f64 {
    30.0
}

/// A volume spec that cannot be served, and why.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("volume name {0:?}: use 1-64 lower-case letters, digits, '-' and '.', starting with a letter or digit (it becomes an NBD export, an iSCSI target name and a directory)")]
    BadName(String),
    #[error("volume {name}: origin {origin:?} is not HOST:PORT")]
    BadOrigin { name: String, origin: String },
    #[error("volume {name}: rpo_secs must be a number of seconds between 0 and 86400, not {rpo}")]
    BadRpo { name: String, rpo: String },
    #[error("volume {name}: journal_size must be at least 64M (the journal holds the largest write, 32 MiB, with room to spare)")]
    SmallJournal { name: String },
    #[error("volume {name}: local_only {range:?}: {why}")]
    BadRange {
        name: String,
        range: String,
        why: String,
    },
    #[error("volume {0}: local_only and isolated exclude each other")]
    RangesAndIsolated(String),
    #[error("two volumes are named {0:?}")]
    Duplicate(String),
}

impl VolumeSpec {
    /// A spec with the defaults for everything but the name and origin.
    pub fn new(name: impl Into<String>, origin: impl Into<String>) -> Self {
        VolumeSpec {
            name: name.into(),
            origin: origin.into(),
            journal_size: default_journal_size(),
            rpo_secs: default_rpo(),
            local_only: Vec::new(),
            isolated: false,
        }
    }

    /// Checks everything that can be checked without the origin.
    pub fn validate(&self) -> Result<(), SpecError> {
        let n = &self.name;
        let name_ok = !n.is_empty()
            && n.len() <= 64
            && n.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
            && n.as_bytes()[0].is_ascii_alphanumeric();
        if !name_ok {
            return Err(SpecError::BadName(n.clone()));
        }
        let origin_ok = self
            .origin
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
        if !origin_ok {
            return Err(SpecError::BadOrigin {
                name: n.clone(),
                origin: self.origin.clone(),
            });
        }
        if !(0.0..=86_400.0).contains(&self.rpo_secs) {
            return Err(SpecError::BadRpo {
                name: n.clone(),
                rpo: self.rpo_secs.to_string(),
            });
        }
        if self.journal_size.0 < 64 << 20 {
            return Err(SpecError::SmallJournal { name: n.clone() });
        }
        if self.isolated && !self.local_only.is_empty() {
            return Err(SpecError::RangesAndIsolated(n.clone()));
        }
        self.local_ranges()?;
        Ok(())
    }

    /// The local-only ranges as the overlay takes them.
    pub fn local_ranges(&self) -> Result<Option<blockcore::LocalRanges>, SpecError> {
        if self.isolated {
            return Ok(Some(blockcore::LocalRanges::Everything));
        }
        if self.local_only.is_empty() {
            return Ok(None);
        }
        let ranges = self
            .local_only
            .iter()
            .map(|r| {
                parse_local_range(r).map_err(|why| SpecError::BadRange {
                    name: self.name.clone(),
                    range: r.clone(),
                    why,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some(blockcore::LocalRanges::Ranges(ranges)))
    }

    pub fn rpo(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.rpo_secs)
    }
}

/// Parses a local-only range, `START:LEN` with K/M/G/T suffixes.
pub fn parse_local_range(s: &str) -> Result<std::ops::Range<u64>, String> {
    let (start, len) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?} is not START:LEN (e.g. 1G:512M)"))?;
    let (start, len) = (start.parse::<ByteSize>()?.0, len.parse::<ByteSize>()?.0);
    if len == 0 {
        return Err(format!("{s:?}: the range is empty"));
    }
    let end = start
        .checked_add(len)
        .ok_or_else(|| format!("{s:?} is too large"))?;
    Ok(start..end)
}

impl EdgeFile {
    /// A file with no volumes and the defaults.
    pub fn new(cache_dir: PathBuf) -> Self {
        EdgeFile {
            cache_dir,
            cache_size: default_cache_size(),
            cache_memory: default_cache_memory(),
            api: None,
            api_tcp: None,
            metrics: None,
            nbd: Vec::new(),
            iscsi: None,
            link: LinkSettings::default(),
            prefetch: PrefetchSettings::default(),
            volumes: Vec::new(),
        }
    }

    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let file: EdgeFile =
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        file.validate()
            .with_context(|| format!("checking {}", path.display()))?;
        Ok(file)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        for (i, v) in self.volumes.iter().enumerate() {
            v.validate()?;
            if self.volumes[..i].iter().any(|o| o.name == v.name) {
                return Err(SpecError::Duplicate(v.name.clone()).into());
            }
        }
        if let Some(i) = &self.iscsi {
            i.validate_auth()?;
        }
        anyhow::ensure!(
            self.link.request_timeout_secs > 0.0 && self.link.request_timeout_secs <= 3600.0,
            "link.request_timeout_secs must be between 0 and 3600"
        );
        let p = &self.prefetch;
        for (name, v) in [
            ("prefetch.profile_window_secs", p.profile_window_secs),
            ("prefetch.profile_quiet_secs", p.profile_quiet_secs),
        ] {
            anyhow::ensure!(
                (0.0..=86400.0).contains(&v),
                "{name} must be between 0 and 86400"
            );
        }
        Ok(())
    }

    /// The API socket's path.
    pub fn api_path(&self) -> PathBuf {
        self.api
            .clone()
            .unwrap_or_else(|| self.cache_dir.join("api.sock"))
    }

    /// Writes the file back, atomically and durably (the desired state
    /// must survive a crash right after an API call returned).
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        use blockcore::storage::{replace_file, DiskStorage};
        let text = format!(
            "# Written by ferry's edge when the management API changed it;\n\
             # hand edits are kept, comments are not.\n{}",
            toml::to_string(self).context("encoding the edge configuration")?
        );
        replace_file(&DiskStorage, path, text.as_bytes())
            .with_context(|| format!("writing {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_round_trips_through_toml() {
        let text = r#"
            cache_dir = "/var/cache/ferry"
            cache_size = "64G"
            nbd = ["127.0.0.1:10809", "unix:/run/ferry/nbd.sock"]
            [link]
            no_tls = true
            [[volume]]
            name = "web1"
            origin = "10.0.0.5:7000"
            rpo_secs = 5
            local_only = ["1G:512M"]
            [[volume]]
            name = "db"
            origin = "10.0.0.5:7000"
            isolated = true
        "#;
        let f: EdgeFile = toml::from_str(text).unwrap();
        f.validate().unwrap();
        assert_eq!(f.cache_size, ByteSize(64 << 30));
        assert_eq!(f.volumes.len(), 2);
        assert_eq!(f.volumes[0].journal_size, ByteSize(1 << 30));
        let again: EdgeFile = toml::from_str(&toml::to_string(&f).unwrap()).unwrap();
        assert_eq!(again, f);
    }

    #[test]
    fn bad_specs_say_what_is_wrong() {
        let ok = VolumeSpec::new("web1", "h:1");
        ok.validate().unwrap();
        for (spec, needle) in [
            (VolumeSpec::new("Web", "h:1"), "lower-case"),
            (VolumeSpec::new("../x", "h:1"), "lower-case"),
            (VolumeSpec::new("w", "nohost"), "HOST:PORT"),
            (
                VolumeSpec {
                    journal_size: ByteSize(16 << 20),
                    ..ok.clone()
                },
                "64M",
            ),
            (
                VolumeSpec {
                    rpo_secs: -1.0,
                    ..ok.clone()
                },
                "rpo_secs",
            ),
            (
                VolumeSpec {
                    local_only: vec!["1G".into()],
                    ..ok.clone()
                },
                "START:LEN",
            ),
            (
                VolumeSpec {
                    local_only: vec!["0:1M".into()],
                    isolated: true,
                    ..ok.clone()
                },
                "exclude",
            ),
        ] {
            let e = spec.validate().unwrap_err().to_string();
            assert!(e.contains(needle), "{e:?} should mention {needle:?}");
        }
        let mut f = EdgeFile::new("/c".into());
        f.volumes = vec![ok.clone(), ok];
        assert!(f
            .validate()
            .unwrap_err()
            .to_string()
            .contains("two volumes"));
    }
}

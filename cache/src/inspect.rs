//! Offline inspection of a cache directory: size, occupancy, volumes, dedup
//! ratio, and checks of every stored chunk (`ferry cache inspect`).
//!
//! Without the key it checks structure: the index's invariants, and that
//! every resident chunk's record header is intact and names the slot,
//! generation and signature the index expects. With the key it also
//! authenticates and decrypts every chunk and recomputes its signature
//! ([`Cache::verify`]). It changes nothing, but it needs the cache to be
//! closed (RocksDB allows one process at a time).

use std::fmt;
use std::path::{Path, PathBuf};

use crate::index::{Index, IndexOptions, IndexStats};
use crate::seal::{peek_header, Signature, HEADER_LEN};
use crate::slots::{read_header, SlotFile};
use crate::store::{Cache, CacheConfig, CacheError, VerifyReport, DATA_FILE, INDEX_DIR};

/// One volume known to the cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeReport {
    pub name: String,
    pub id: u32,
    pub size: u64,
    /// Chunks of the volume with a mapping (resident or not).
    pub mapped_chunks: u64,
}

/// What [`inspect`] found.
#[derive(Clone, Debug)]
pub struct Inspection {
    pub dir: PathBuf,
    pub chunk_size: u32,
    pub cache_id: [u8; 16],
    /// Capacity in slots.
    pub slots: u64,
    pub data_file_bytes: u64,
    pub index_bytes: u64,
    pub index: IndexStats,
    pub volumes: Vec<VolumeReport>,
    /// Resident chunks whose record header is damaged or disagrees with the
    /// index, by slot.
    pub header_problems: Vec<(u64, String)>,
    /// The full verification, when a key was given.
    pub verify: Option<VerifyReport>,
}

impl Inspection {
    /// Bytes of volume data the mappings stand for.
    pub fn logical_bytes(&self) -> u64 {
        self.index.mappings * u64::from(self.chunk_size)
    }

    /// Mapped chunks per resident chunk (1.0: no sharing).
    #[allow(clippy::cast_precision_loss)]
    pub fn dedup_ratio(&self) -> f64 {
        if self.index.resident == 0 {
            1.0
        } else {
            self.index.mappings as f64 / self.index.resident as f64
        }
    }

    /// Whether every check passed.
    pub fn is_clean(&self) -> bool {
        self.header_problems.is_empty() && self.verify.as_ref().is_none_or(|v| v.damaged.is_empty())
    }
}

fn dir_size(path: &Path) -> u64 {
    std::fs::read_dir(path).map_or(0, |it| {
        it.filter_map(Result::ok)
            .filter_map(|e| e.metadata().ok())
            .filter(std::fs::Metadata::is_file)
            .map(|m| m.len())
            .sum()
    })
}

/// Inspects the cache in `dir`; with `master_key`, verifies every chunk.
pub fn inspect(dir: &Path, master_key: Option<&[u8; 32]>) -> Result<Inspection, CacheError> {
    let data_path = dir.join(DATA_FILE);
    let index_path = dir.join(INDEX_DIR);
    if !data_path.is_file() || !index_path.is_dir() {
        return Err(CacheError::Config(format!(
            "{} is not a ferry cache directory (no {DATA_FILE} file and {INDEX_DIR} directory)",
            dir.display()
        )));
    }
    let (chunk_size, cache_id, slots) = read_header(&data_path)?;
    let mut inspection = {
        let index = Index::open(
            &index_path,
            &IndexOptions {
                chunk_size,
                ..IndexOptions::default()
            },
        )?;
        let (data, _) = SlotFile::open(&data_path, chunk_size, cache_id)?;
        let stats = index.check()?;
        let counts = index.mapped_chunks()?;
        let volumes = index
            .volumes()?
            .into_iter()
            .map(|(name, m)| VolumeReport {
                name,
                id: m.id,
                size: m.size,
                mapped_chunks: counts.get(&m.id).copied().unwrap_or(0),
            })
            .collect();
        let mut header_problems = Vec::new();
        for (slot, sig) in index.used_slots()? {
            let sig = Signature::from_bytes(sig);
            let Some(loc) = index.lookup_signature(sig.as_bytes())? else {
                continue;
            };
            let problem = if slot >= slots {
                Some("slot past the end of the data file".to_owned())
            } else {
                match data.read(slot, HEADER_LEN).map(|h| peek_header(&h)) {
                    Err(e) => Some(format!("read: {e}")),
                    Ok(Err(e)) => Some(e.to_string()),
                    Ok(Ok(h)) if h.slot != slot => Some(format!("record names slot {}", h.slot)),
                    Ok(Ok(h)) if h.generation != loc.generation => Some(format!(
                        "record generation {}, index expects {}",
                        h.generation, loc.generation
                    )),
                    Ok(Ok(h)) if h.signature != sig => {
                        Some("record holds another signature than the index expects".to_owned())
                    }
                    Ok(Ok(_)) => None,
                }
            };
            if let Some(p) = problem {
                header_problems.push((slot, p));
            }
        }
        Inspection {
            dir: dir.to_path_buf(),
            chunk_size,
            cache_id,
            slots,
            data_file_bytes: std::fs::metadata(&data_path).map_or(0, |m| m.len()),
            index_bytes: dir_size(&index_path),
            index: stats,
            volumes,
            header_problems,
            verify: None,
        }
    };
    if let Some(key) = master_key {
        let cache = Cache::open(
            dir,
            key,
            &CacheConfig {
                chunk_size,
                capacity: slots * u64::from(chunk_size),
                ..CacheConfig::default()
            },
        )?;
        inspection.verify = Some(cache.verify()?);
    }
    Ok(inspection)
}

fn mib(bytes: u64) -> String {
    #[allow(clippy::cast_precision_loss)]
    let m = bytes as f64 / f64::from(1u32 << 20);
    format!("{m:.1} MiB")
}

impl fmt::Display for Inspection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let id = self.cache_id.iter().fold(String::new(), |mut s, b| {
            use fmt::Write as _;
            let _ = write!(s, "{b:02x}");
            s
        });
        writeln!(f, "cache       {} (id {id})", self.dir.display())?;
        writeln!(f, "chunk size  {} bytes", self.chunk_size)?;
        #[allow(clippy::cast_precision_loss)]
        let pct = if self.slots == 0 {
            0.0
        } else {
            100.0 * self.index.resident as f64 / self.slots as f64
        };
        writeln!(
            f,
            "capacity    {} slots ({}), {} used ({pct:.1}%)",
            self.slots,
            mib(self.slots * u64::from(self.chunk_size)),
            self.index.resident
        )?;
        writeln!(
            f,
            "on disk     data file {}, index {}",
            mib(self.data_file_bytes),
            mib(self.index_bytes)
        )?;
        writeln!(
            f,
            "dedup       {} mappings over {} resident chunks: ratio {:.2} ({} of volume data in {})",
            self.index.mappings,
            self.index.resident,
            self.dedup_ratio(),
            mib(self.logical_bytes()),
            mib(self.index.resident * u64::from(self.chunk_size)),
        )?;
        writeln!(f, "signatures  {} known", self.index.signatures)?;
        writeln!(f, "volumes     {}", self.volumes.len())?;
        for v in &self.volumes {
            writeln!(
                f,
                "  {:<24} id {:<5} size {:>12}  {} chunks mapped",
                v.name,
                v.id,
                mib(v.size),
                v.mapped_chunks
            )?;
        }
        if self.header_problems.is_empty() {
            writeln!(
                f,
                "headers     all {} resident records intact",
                self.index.resident
            )?;
        } else {
            writeln!(f, "headers     {} damaged:", self.header_problems.len())?;
            for (slot, p) in &self.header_problems {
                writeln!(f, "  slot {slot}: {p}")?;
            }
        }
        match &self.verify {
            None => writeln!(f, "verify      skipped (no key given)")?,
            Some(v) if v.damaged.is_empty() => writeln!(
                f,
                "verify      all {} chunks authenticated and match their signatures",
                v.verified
            )?,
            Some(v) => {
                writeln!(
                    f,
                    "verify      {} of {} chunks FAILED:",
                    v.damaged.len(),
                    v.resident
                )?;
                for (slot, e) in &v.damaged {
                    writeln!(f, "  slot {slot}: {e}")?;
                }
            }
        }
        Ok(())
    }
}

//! The cache's persistent index, kept in RocksDB.
//!
//! It answers three questions: which slot of the data file holds the chunk
//! with a given content signature ([`Index::lookup_signature`]), which
//! signature a volume's chunk has ([`Index::get_mapping`]), and which slots
//! are in use ([`Index::used_slots`], for recovery).
//!
//! # Crash safety
//!
//! The cache writes a chunk's slot, fsyncs the data file, and only then
//! commits the index batch that points at it. So every committed entry
//! points at durable data, and a slot that no committed entry names is free
//! (an orphan of a crash between the data write and the commit, reclaimed on
//! open). A batch is applied atomically (one RocksDB `WriteBatch`, across all
//! column families, recovered whole or not at all from the WAL); with
//! [`Durability::Sync`] the WAL is fsynced before `commit` returns.
//!
//! One rule keeps this true when slots are reused: a slot that the
//! *committed* index still assigns to a signature must not be overwritten.
//! [`IndexBatch::insert_chunk`] refuses such a slot ([`IndexError::SlotInUse`]),
//! so the cache has to commit the eviction ([`IndexBatch::remove_chunk`])
//! before it writes new data into the slot.
//!
//! # Reference counts and the writer lock
//!
//! Each signature entry counts the `(volume, chunk)` mappings that point at
//! it. Keeping that count exact is a read-modify-write (remapping a chunk
//! must find the old signature to decrement it), so a merge operator would
//! not remove the reads, and "refs reached 0" decisions need the current
//! value anyway. Instead, [`Index::batch`] hands out an [`IndexBatch`] that
//! holds the index's writer lock from creation to commit or drop: batches are
//! built and committed one at a time, and every read a batch makes (through
//! its own pending changes, then the committed state) stays valid until its
//! commit. Readers ([`Index::lookup_signature`] and friends) never take the
//! lock: they see the last committed state.
//!
//! # Eviction
//!
//! Evicting a chunk ([`IndexBatch::remove_chunk`]) does not touch the
//! mappings that point at its signature (finding them would need a reverse
//! index or a full scan). If the signature is still referenced, its entry
//! stays with only its reference count ("known but not resident"): then
//! [`Index::get_mapping`] still returns the signature, [`Index::lookup_signature`]
//! returns `None`, and the read is a miss that refetches the chunk, whose
//! [`IndexBatch::insert_chunk`] makes the entry resident again with its count
//! intact. An entry that is neither resident nor referenced is deleted.
//! Thus, at every commit: a signature's `refs` equals the number of mappings
//! to it, and a resident signature and its slot name each other
//! ([`Index::check`] verifies both).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor, DBCompressionType,
    DBRecoveryMode, DataBlockIndexType, IteratorMode, Options, WriteBatch, WriteOptions, DB,
};

#[cfg(test)]
mod tests;

/// A chunk's content signature (keyed BLAKE3). Opaque here; to be replaced by
/// `cache::seal::Signature`.
pub type Sig = [u8; 32];

/// Version of the on-disk key/value formats below. Bump on any change.
pub const FORMAT_VERSION: u32 = 1;

// Column family names.
const CF_META: &str = "meta";
const CF_SIG: &str = "sig";
const CF_MAP: &str = "map";
const CF_VOL: &str = "vol";
const CF_SLOT: &str = "slot";
const DATA_CFS: [&str; 4] = [CF_SIG, CF_MAP, CF_VOL, CF_SLOT];

// Format (`meta` CF): key "format_version" -> value u32 BE, FORMAT_VERSION.
const META_FORMAT_VERSION: &[u8] = b"format_version";
// Format (`meta` CF): key "chunk_size" -> value u32 BE, the cache's chunk size
// in bytes, fixed when the index is created.
const META_CHUNK_SIZE: &[u8] = b"chunk_size";
// Format (`meta` CF): key "cache_id" -> 16 bytes, the identity of the cache
// (data file and index) this index belongs to; set once by the store.
const META_CACHE_ID: &[u8] = b"cache_id";
// Format (`meta` CF): key "generation_reserved" -> value u64 BE. Every record
// generation ever handed out is below it (absent: 0), so generations above it
// were never used, even by a run that crashed.
const META_GENERATION_RESERVED: &[u8] = b"generation_reserved";

// Format (`vol` CF): the first key byte tells the key kind, so no volume name
// can collide with the counter.
//   key [0x00]             -> value u32 BE: the next volume id to hand out.
//   key [0x01] ++ name     -> value (16 bytes): id u32 BE | chunk_size u32 BE
//                             | size u64 BE (bytes). name is UTF-8.
const VOL_COUNTER_KEY: &[u8] = &[0x00];
const VOL_NAME_PREFIX: u8 = 0x01;
/// Volume ids start at 1; 0 is never handed out.
const FIRST_VOLUME_ID: u32 = 1;

/// Where a resident chunk lives, and how many mappings point at it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SlotRef {
    /// Slot number in the data file.
    pub slot: u64,
    /// Generation of the slot's record (changes each time the slot is
    /// rewritten, so a stale reference can be told from a current one).
    pub generation: u64,
    /// Length of the stored record in bytes.
    pub len: u32,
    /// Number of `(volume, chunk)` mappings pointing at this signature; 0
    /// means cached but unreferenced (e.g. fetched for a dedup lookup).
    pub refs: u32,
}

/// A volume's registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VolumeMeta {
    /// Index-wide id, the first part of the volume's `map` keys.
    pub id: u32,
    /// The volume's chunk size in bytes.
    pub chunk_size: u32,
    /// The volume's size in bytes.
    pub size: u64,
}

/// How hard [`IndexBatch::commit`] makes a batch durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// fsync the WAL before returning: the batch survives power loss.
    Sync,
    /// Write the WAL without fsync: survives a process crash, not power
    /// loss (the batch may be lost, never half-applied).
    Async,
}

/// Tunables for [`Index::open`].
#[derive(Debug, Clone)]
pub struct IndexOptions {
    /// The cache's chunk size in bytes; stored on creation and checked on
    /// every open ([`IndexError::ChunkSizeMismatch`]).
    pub chunk_size: u32,
    /// Shared LRU block cache for all column families (data, index and
    /// filter blocks). The hot set is 32-byte keys with small values, so
    /// 32 MiB holds the blocks of a few hundred thousand entries.
    pub block_cache_bytes: usize,
    /// Bound on open SST files (file descriptors); RocksDB's default is
    /// unlimited. Index blocks of closed files are re-read on demand.
    pub max_open_files: i32,
    /// Memtable size per column family. Smaller than RocksDB's 64 MiB
    /// default: five column families, mostly tiny, and a shorter WAL replay
    /// on open.
    pub write_buffer_bytes: usize,
}

impl Default for IndexOptions {
    fn default() -> Self {
        Self {
            chunk_size: 64 * 1024,
            block_cache_bytes: 32 << 20,
            max_open_files: 256,
            write_buffer_bytes: 16 << 20,
        }
    }
}

/// Errors of the index; each names the operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("opening the cache index at {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: rocksdb::Error,
    },
    #[error("reading the cache index ({op}): {source}")]
    Read {
        op: &'static str,
        #[source]
        source: rocksdb::Error,
    },
    #[error("writing the cache index ({op}): {source}")]
    Write {
        op: &'static str,
        #[source]
        source: rocksdb::Error,
    },
    #[error("cache index corrupt: column family {cf}, key {key}: {why}")]
    Corrupt {
        cf: &'static str,
        /// The key, hex-encoded.
        key: String,
        why: String,
    },
    #[error(
        "cache index format version {found} is not supported (this build reads version {expected})"
    )]
    VersionMismatch { found: u32, expected: u32 },
    #[error(
        "cache index was created with chunk size {stored}, but the cache is configured with {configured}"
    )]
    ChunkSizeMismatch { stored: u32, configured: u32 },
    #[error("volume {name:?} already exists")]
    VolumeExists { name: String },
    #[error("no volume ids left")]
    VolumeIdsExhausted,
    #[error(
        "slot {slot} is still assigned to another chunk; evict it and commit before reusing it"
    )]
    SlotInUse { slot: u64 },
}

/// Counts from [`Index::check`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IndexStats {
    /// Signature entries (resident or not).
    pub signatures: u64,
    /// Resident signatures (each owns one slot).
    pub resident: u64,
    /// `(volume, chunk)` mappings.
    pub mappings: u64,
}

/// The cache index. Reads are lock-free and see the last commit; writes go
/// through [`Index::batch`].
pub struct Index {
    db: DB,
    path: PathBuf,
    chunk_size: u32,
    /// Serialises batches (see the module docs); guards no data itself.
    writer: Mutex<()>,
}

impl fmt::Debug for Index {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Index")
            .field("path", &self.path)
            .field("chunk_size", &self.chunk_size)
            .finish_non_exhaustive()
    }
}

/// Options shared by every column family.
fn cf_options(opts: &IndexOptions, cache: &Cache, bloom: bool, point_lookups: bool) -> Options {
    let mut table = BlockBasedOptions::default();
    // One block cache for every CF, so the budget is global.
    table.set_block_cache(cache);
    // Index and filter blocks live in the block cache too, so memory stays
    // bounded by `block_cache_bytes` however large the index grows...
    table.set_cache_index_and_filter_blocks(true);
    // ...but L0's are pinned: they are hit by every lookup.
    table.set_pin_l0_filter_and_index_blocks_in_cache(true);
    if bloom {
        // Full (not block-based) bloom filter, 10 bits per key: ~1% false
        // positives, so a lookup of an absent key (a dedup miss, an unmapped
        // chunk) almost never reads a data block.
        table.set_bloom_filter(10.0, false);
        table.set_whole_key_filtering(true);
    }
    if point_lookups {
        // What `Options::optimize_for_point_lookup` does, minus its private
        // block cache (it would replace the shared one): a hash index inside
        // each data block finds a key without binary search.
        table.set_data_block_index_type(DataBlockIndexType::BinaryAndHash);
        table.set_data_block_hash_ratio(0.75);
    }

    let mut o = Options::default();
    o.set_block_based_table_factory(&table);
    // No compression anywhere: keys and values are hashes and small
    // integers, which do not compress; it would only cost CPU. (The build
    // has no codecs anyway.)
    o.set_compression_type(DBCompressionType::None);
    o.set_bottommost_compression_type(DBCompressionType::None);
    o.set_write_buffer_size(opts.write_buffer_bytes);
    if point_lookups {
        // Also from `optimize_for_point_lookup`: a bloom filter over whole
        // keys in the memtable, so a miss skips the memtable search.
        o.set_memtable_prefix_bloom_ratio(0.02);
        o.set_memtable_whole_key_filtering(true);
    }
    // Not `optimize_filters_for_hits`: misses are the common case for both
    // `sig` (new content) and `map` (never-read chunks), and that option
    // drops the last level's filters, where most keys live.
    o
}

fn db_options(opts: &IndexOptions) -> Options {
    let mut o = Options::default();
    o.create_if_missing(true);
    o.create_missing_column_families(true);
    // Bounded file descriptors (see IndexOptions::max_open_files).
    o.set_max_open_files(opts.max_open_files);
    // Flushes and compactions share two background threads: the machine
    // also runs the data path, and the index write rate is modest.
    o.set_max_background_jobs(2);
    // The WAL stays enabled (RocksDB's default): it is what makes a commit
    // durable and atomic across column families. Cap its total size so that
    // rarely written CFs (`vol`, `meta`) are flushed instead of pinning old
    // WAL files forever.
    o.set_max_total_wal_size(64 << 20);
    // After a crash, replay the WAL up to the last intact record and stop
    // there (RocksDB's default, stated because the crash-safety argument
    // rests on it): a crash loses at most a suffix of the batches (with
    // `Durability::Sync`, only those whose commit had not returned), never
    // half of a batch and never one in the middle.
    o.set_wal_recovery_mode(DBRecoveryMode::PointInTime);
    // RocksDB's own info log: keep a few small files, not an unbounded pile.
    o.set_keep_log_file_num(4);
    o.set_max_log_file_size(4 << 20);
    o
}

fn hex(bytes: &[u8]) -> String {
    use fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn corrupt(cf: &'static str, key: &[u8], why: impl Into<String>) -> IndexError {
    IndexError::Corrupt {
        cf,
        key: hex(key),
        why: why.into(),
    }
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b.try_into().expect("4 bytes"))
}

fn be_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b.try_into().expect("8 bytes"))
}

fn decode_u32(cf: &'static str, key: &[u8], v: &[u8]) -> Result<u32, IndexError> {
    if v.len() != 4 {
        return Err(corrupt(
            cf,
            key,
            format!("expected 4-byte u32, got {} bytes", v.len()),
        ));
    }
    Ok(be_u32(v))
}

fn decode_sig(cf: &'static str, key: &[u8], v: &[u8]) -> Result<Sig, IndexError> {
    v.try_into().map_err(|_| {
        corrupt(
            cf,
            key,
            format!("expected 32-byte signature, got {} bytes", v.len()),
        )
    })
}

/// A `sig` CF entry: the reference count, and the location if resident.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SigEntry {
    loc: Option<Loc>,
    refs: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Loc {
    slot: u64,
    generation: u64,
    len: u32,
}

impl SigEntry {
    fn slot_ref(self) -> Option<SlotRef> {
        self.loc.map(|l| SlotRef {
            slot: l.slot,
            generation: l.generation,
            len: l.len,
            refs: self.refs,
        })
    }
}

// Format (`sig` CF): key = signature (32 bytes). The value's length tells
// its kind:
//   24 bytes, resident:   slot u64 BE | generation u64 BE | len u32 BE
//                         | refs u32 BE
//    4 bytes, evicted but still referenced: refs u32 BE (> 0)
fn encode_sig_entry(e: SigEntry) -> Vec<u8> {
    let mut v = Vec::with_capacity(24);
    if let Some(l) = e.loc {
        v.extend_from_slice(&l.slot.to_be_bytes());
        v.extend_from_slice(&l.generation.to_be_bytes());
        v.extend_from_slice(&l.len.to_be_bytes());
    }
    v.extend_from_slice(&e.refs.to_be_bytes());
    v
}

fn decode_sig_entry(key: &[u8], v: &[u8]) -> Result<SigEntry, IndexError> {
    match v.len() {
        24 => Ok(SigEntry {
            loc: Some(Loc {
                slot: be_u64(&v[0..8]),
                generation: be_u64(&v[8..16]),
                len: be_u32(&v[16..20]),
            }),
            refs: be_u32(&v[20..24]),
        }),
        4 => {
            let refs = be_u32(v);
            if refs == 0 {
                return Err(corrupt(
                    CF_SIG,
                    key,
                    "entry neither resident nor referenced",
                ));
            }
            Ok(SigEntry { loc: None, refs })
        }
        n => Err(corrupt(
            CF_SIG,
            key,
            format!("value of {n} bytes, expected 24 or 4"),
        )),
    }
}

// Format (`map` CF): key (12 bytes) = volume_id u32 BE | chunk_index u64 BE,
// so a volume's chunks sort together and in order; value = signature (32
// bytes).
fn map_key(volume: u32, chunk: u64) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..4].copy_from_slice(&volume.to_be_bytes());
    k[4..].copy_from_slice(&chunk.to_be_bytes());
    k
}

// Format (`slot` CF): key = slot u64 BE (8 bytes); value = signature (32
// bytes) of the resident chunk in that slot.
fn slot_key(slot: u64) -> [u8; 8] {
    slot.to_be_bytes()
}

fn vol_key(name: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + name.len());
    k.push(VOL_NAME_PREFIX);
    k.extend_from_slice(name.as_bytes());
    k
}

fn encode_volume(m: VolumeMeta) -> [u8; 16] {
    let mut v = [0u8; 16];
    v[..4].copy_from_slice(&m.id.to_be_bytes());
    v[4..8].copy_from_slice(&m.chunk_size.to_be_bytes());
    v[8..].copy_from_slice(&m.size.to_be_bytes());
    v
}

fn decode_volume(key: &[u8], v: &[u8]) -> Result<VolumeMeta, IndexError> {
    if v.len() != 16 {
        return Err(corrupt(
            CF_VOL,
            key,
            format!("value of {} bytes, expected 16", v.len()),
        ));
    }
    Ok(VolumeMeta {
        id: be_u32(&v[..4]),
        chunk_size: be_u32(&v[4..8]),
        size: be_u64(&v[8..]),
    })
}

impl Index {
    /// Opens (creating if missing) the index in `dir`, checking its format
    /// version and chunk size.
    pub fn open(dir: impl AsRef<Path>, opts: &IndexOptions) -> Result<Index, IndexError> {
        let path = dir.as_ref().to_path_buf();
        let cache = Cache::new_lru_cache(opts.block_cache_bytes);
        let cfs = vec![
            ColumnFamilyDescriptor::new(CF_META, cf_options(opts, &cache, false, false)),
            // Point lookups by signature: the hot path of dedup and reads.
            ColumnFamilyDescriptor::new(CF_SIG, cf_options(opts, &cache, true, true)),
            // Point lookups by (volume, chunk); may be scanned per volume.
            ColumnFamilyDescriptor::new(CF_MAP, cf_options(opts, &cache, true, true)),
            // Few keys, read on volume open.
            ColumnFamilyDescriptor::new(CF_VOL, cf_options(opts, &cache, false, false)),
            // Scanned on open, point-read by `insert_chunk`'s reuse check
            // (usually a miss: the bloom filter answers it).
            ColumnFamilyDescriptor::new(CF_SLOT, cf_options(opts, &cache, true, false)),
        ];
        let db = DB::open_cf_descriptors(&db_options(opts), &path, cfs).map_err(|source| {
            IndexError::Open {
                path: path.clone(),
                source,
            }
        })?;
        let index = Index {
            db,
            path,
            chunk_size: opts.chunk_size,
            writer: Mutex::new(()),
        };
        index.check_meta(opts.chunk_size)?;
        Ok(index)
    }

    fn check_meta(&self, chunk_size: u32) -> Result<(), IndexError> {
        let meta = self.cf(CF_META);
        let read = |key: &[u8]| -> Result<Option<u32>, IndexError> {
            let v = self
                .db
                .get_pinned_cf(meta, key)
                .map_err(|source| IndexError::Read {
                    op: "open: meta",
                    source,
                })?;
            v.map(|v| decode_u32(CF_META, key, &v)).transpose()
        };
        match read(META_FORMAT_VERSION)? {
            Some(found) if found != FORMAT_VERSION => Err(IndexError::VersionMismatch {
                found,
                expected: FORMAT_VERSION,
            }),
            Some(_) => {
                let stored = read(META_CHUNK_SIZE)?.ok_or_else(|| {
                    corrupt(CF_META, META_CHUNK_SIZE, "missing (format version present)")
                })?;
                if stored != chunk_size {
                    return Err(IndexError::ChunkSizeMismatch {
                        stored,
                        configured: chunk_size,
                    });
                }
                Ok(())
            }
            None => {
                // A new index. Refuse to stamp one that already has data:
                // its format is unknown.
                for cf in DATA_CFS {
                    if let Some(first) =
                        self.db.iterator_cf(self.cf(cf), IteratorMode::Start).next()
                    {
                        let (k, _) = first.map_err(|source| IndexError::Read {
                            op: "open: meta",
                            source,
                        })?;
                        return Err(corrupt(cf, &k, "data present but no format version"));
                    }
                }
                let mut b = WriteBatch::default();
                b.put_cf(meta, META_FORMAT_VERSION, FORMAT_VERSION.to_be_bytes());
                b.put_cf(meta, META_CHUNK_SIZE, chunk_size.to_be_bytes());
                b.put_cf(
                    self.cf(CF_VOL),
                    VOL_COUNTER_KEY,
                    FIRST_VOLUME_ID.to_be_bytes(),
                );
                self.write(b, Durability::Sync, "open: initialise meta")
            }
        }
    }

    fn cf(&self, name: &str) -> &ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("every column family is opened by Index::open")
    }

    fn write(&self, batch: WriteBatch, d: Durability, op: &'static str) -> Result<(), IndexError> {
        let mut wo = WriteOptions::default();
        wo.set_sync(d == Durability::Sync);
        self.db
            .write_opt(batch, &wo)
            .map_err(|source| IndexError::Write { op, source })
    }

    fn get(
        &self,
        cf: &'static str,
        key: &[u8],
        op: &'static str,
    ) -> Result<Option<rocksdb::DBPinnableSlice<'_>>, IndexError> {
        self.db
            .get_pinned_cf(self.cf(cf), key)
            .map_err(|source| IndexError::Read { op, source })
    }

    /// The identity of the cache this index belongs to, if set.
    pub fn cache_id(&self) -> Result<Option<[u8; 16]>, IndexError> {
        self.get(CF_META, META_CACHE_ID, "get cache id")?
            .map(|v| {
                <[u8; 16]>::try_from(&v[..]).map_err(|_| {
                    corrupt(
                        CF_META,
                        META_CACHE_ID,
                        format!("expected 16 bytes, got {}", v.len()),
                    )
                })
            })
            .transpose()
    }

    /// Records the cache's identity, durably.
    pub fn set_cache_id(&self, id: [u8; 16]) -> Result<(), IndexError> {
        let mut b = WriteBatch::default();
        b.put_cf(self.cf(CF_META), META_CACHE_ID, id);
        self.write(b, Durability::Sync, "set cache id")
    }

    /// The bound below which every generation handed out so far lies.
    pub fn generation_reserved(&self) -> Result<u64, IndexError> {
        let Some(v) = self.get(CF_META, META_GENERATION_RESERVED, "get generations")? else {
            return Ok(0);
        };
        <[u8; 8]>::try_from(&v[..])
            .map(u64::from_be_bytes)
            .map_err(|_| {
                corrupt(
                    CF_META,
                    META_GENERATION_RESERVED,
                    format!("expected 8 bytes, got {}", v.len()),
                )
            })
    }

    /// Durably raises the reserved bound to `upto`: generations below it may
    /// be handed out from now on.
    pub fn reserve_generations(&self, upto: u64) -> Result<(), IndexError> {
        let mut b = WriteBatch::default();
        b.put_cf(
            self.cf(CF_META),
            META_GENERATION_RESERVED,
            upto.to_be_bytes(),
        );
        self.write(b, Durability::Sync, "reserve generations")
    }

    /// The directory the index lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The cache's chunk size, as stored in the index.
    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    fn sig_entry(&self, sig: &Sig) -> Result<Option<SigEntry>, IndexError> {
        self.get(CF_SIG, sig, "lookup signature")?
            .map(|v| decode_sig_entry(sig, &v))
            .transpose()
    }

    /// Where the chunk with this signature is cached; `None` if it is not
    /// resident (never cached, or evicted).
    pub fn lookup_signature(&self, sig: &Sig) -> Result<Option<SlotRef>, IndexError> {
        Ok(self.sig_entry(sig)?.and_then(SigEntry::slot_ref))
    }

    /// Number of mappings pointing at `sig`, resident or not (0 if unknown).
    pub fn signature_refs(&self, sig: &Sig) -> Result<u32, IndexError> {
        Ok(self.sig_entry(sig)?.map_or(0, |e| e.refs))
    }

    /// The signature a volume's chunk maps to. The chunk may still be a miss:
    /// see [`Index::lookup_signature`].
    pub fn get_mapping(&self, volume: u32, chunk: u64) -> Result<Option<Sig>, IndexError> {
        let k = map_key(volume, chunk);
        self.get(CF_MAP, &k, "get mapping")?
            .map(|v| decode_sig(CF_MAP, &k, &v))
            .transpose()
    }

    /// [`Index::get_mapping`] without blocking on I/O: answered from the
    /// memtables and the block cache only, `None` when that would need a
    /// read from disk (the caller then asks again off the async thread).
    pub fn get_mapping_cached(&self, volume: u32, chunk: u64) -> Option<Option<Sig>> {
        let k = map_key(volume, chunk);
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_read_tier(rocksdb::ReadTier::BlockCache);
        match self.db.get_pinned_cf_opt(self.cf(CF_MAP), k, &ro) {
            Ok(v) => v
                .map(|v| decode_sig(CF_MAP, &k, &v).ok())
                .map_or(Some(None), |s| s.map(Some)),
            Err(_) => None,
        }
    }

    /// A volume's registration, if any.
    pub fn volume(&self, name: &str) -> Result<Option<VolumeMeta>, IndexError> {
        let k = vol_key(name);
        self.get(CF_VOL, &k, "get volume")?
            .map(|v| decode_volume(&k, &v))
            .transpose()
    }

    /// Every registered volume, by name.
    pub fn volumes(&self) -> Result<Vec<(String, VolumeMeta)>, IndexError> {
        let mut out = Vec::new();
        let it = self.db.iterator_cf(
            self.cf(CF_VOL),
            IteratorMode::From(&[VOL_NAME_PREFIX], rocksdb::Direction::Forward),
        );
        for item in it {
            let (k, v) = item.map_err(|source| IndexError::Read {
                op: "list volumes",
                source,
            })?;
            let name = std::str::from_utf8(&k[1..])
                .map_err(|_| corrupt(CF_VOL, &k, "volume name is not UTF-8"))?;
            out.push((name.to_owned(), decode_volume(&k, &v)?));
        }
        Ok(out)
    }

    /// Registers a volume under a new id, durably.
    pub fn create_volume(
        &self,
        name: &str,
        chunk_size: u32,
        size: u64,
    ) -> Result<VolumeMeta, IndexError> {
        let _guard = self.lock();
        if self.volume(name)?.is_some() {
            return Err(IndexError::VolumeExists {
                name: name.to_owned(),
            });
        }
        let id = match self.get(CF_VOL, VOL_COUNTER_KEY, "create volume")? {
            Some(v) => decode_u32(CF_VOL, VOL_COUNTER_KEY, &v)?,
            None => {
                return Err(corrupt(
                    CF_VOL,
                    VOL_COUNTER_KEY,
                    "volume id counter missing",
                ))
            }
        };
        let next = id.checked_add(1).ok_or(IndexError::VolumeIdsExhausted)?;
        let meta = VolumeMeta {
            id,
            chunk_size,
            size,
        };
        let vol = self.cf(CF_VOL);
        let mut b = WriteBatch::default();
        b.put_cf(vol, VOL_COUNTER_KEY, next.to_be_bytes());
        b.put_cf(vol, vol_key(name), encode_volume(meta));
        self.write(b, Durability::Sync, "create volume")?;
        Ok(meta)
    }

    /// The number of mapped chunks of each volume id (one scan of the
    /// mappings; for inspection).
    pub fn mapped_chunks(&self) -> Result<HashMap<u32, u64>, IndexError> {
        let mut out = HashMap::new();
        for item in self.db.iterator_cf(self.cf(CF_MAP), IteratorMode::Start) {
            let (k, _) = item.map_err(|source| IndexError::Read {
                op: "count mappings",
                source,
            })?;
            if k.len() != 12 {
                return Err(corrupt(
                    CF_MAP,
                    &k,
                    format!("key of {} bytes, expected 12", k.len()),
                ));
            }
            *out.entry(be_u32(&k[..4])).or_default() += 1;
        }
        Ok(out)
    }

    /// Every used slot and the signature it holds, in slot order: the
    /// recovery scan. Slots not listed are free.
    pub fn used_slots(&self) -> Result<Vec<(u64, Sig)>, IndexError> {
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(CF_SLOT), IteratorMode::Start) {
            let (k, v) = item.map_err(|source| IndexError::Read {
                op: "list used slots",
                source,
            })?;
            if k.len() != 8 {
                return Err(corrupt(
                    CF_SLOT,
                    &k,
                    format!("key of {} bytes, expected 8", k.len()),
                ));
            }
            out.push((be_u64(&k), decode_sig(CF_SLOT, &k, &v)?));
        }
        Ok(out)
    }

    fn lock(&self) -> MutexGuard<'_, ()> {
        // The mutex guards no data, so a panic while it was held leaves
        // nothing inconsistent (an uncommitted batch is simply dropped).
        self.writer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts a batch of changes. The batch holds the writer lock until it is
    /// committed or dropped: build it promptly, and do not start a second
    /// batch on the same thread while one is alive (it would deadlock).
    pub fn batch(&self) -> IndexBatch<'_> {
        IndexBatch {
            _guard: self.lock(),
            index: self,
            sigs: BTreeMap::new(),
            maps: BTreeMap::new(),
            slots: BTreeMap::new(),
        }
    }

    /// Flushes memtables to SST files (shortens the WAL replay of the next
    /// open). Not needed for durability: committed batches are in the WAL.
    pub fn flush(&self) -> Result<(), IndexError> {
        for cf in DATA_CFS.into_iter().chain([CF_META]) {
            self.db
                .flush_cf(self.cf(cf))
                .map_err(|source| IndexError::Write {
                    op: "flush",
                    source,
                })?;
        }
        Ok(())
    }

    /// Scans the whole index and verifies its invariants: every mapping's
    /// signature has an entry whose `refs` equals the number of mappings to
    /// it, every entry is resident or referenced, and resident signatures and
    /// `slot` entries name each other one to one. Holds the writer lock and
    /// memory proportional to the number of signatures; meant for tests and
    /// offline checks.
    pub fn check(&self) -> Result<IndexStats, IndexError> {
        let _guard = self.lock();
        let read_err = |source| IndexError::Read {
            op: "check",
            source,
        };
        let mut stats = IndexStats::default();
        let mut counted: HashMap<Sig, u32> = HashMap::new();
        for item in self.db.iterator_cf(self.cf(CF_MAP), IteratorMode::Start) {
            let (k, v) = item.map_err(read_err)?;
            if k.len() != 12 {
                return Err(corrupt(
                    CF_MAP,
                    &k,
                    format!("key of {} bytes, expected 12", k.len()),
                ));
            }
            *counted.entry(decode_sig(CF_MAP, &k, &v)?).or_default() += 1;
            stats.mappings += 1;
        }
        let mut resident: HashMap<u64, Sig> = HashMap::new();
        for item in self.db.iterator_cf(self.cf(CF_SIG), IteratorMode::Start) {
            let (k, v) = item.map_err(read_err)?;
            let sig = decode_sig(CF_SIG, &k, &k)?;
            let e = decode_sig_entry(&k, &v)?;
            let n = counted.remove(&sig).unwrap_or(0);
            if n != e.refs {
                return Err(corrupt(
                    CF_SIG,
                    &k,
                    format!("refs {} but {n} mappings point at it", e.refs),
                ));
            }
            if let Some(l) = e.loc {
                if resident.insert(l.slot, sig).is_some() {
                    return Err(corrupt(CF_SIG, &k, format!("slot {} shared", l.slot)));
                }
                stats.resident += 1;
            }
            stats.signatures += 1;
        }
        if let Some((sig, n)) = counted.into_iter().next() {
            return Err(corrupt(
                CF_MAP,
                &[],
                format!("{n} mappings to signature {} which has no entry", hex(&sig)),
            ));
        }
        let mut slots = 0u64;
        for (slot, sig) in self.used_slots()? {
            if resident.get(&slot) != Some(&sig) {
                return Err(corrupt(
                    CF_SLOT,
                    &slot_key(slot),
                    format!("names signature {} which is not resident there", hex(&sig)),
                ));
            }
            slots += 1;
        }
        if slots != stats.resident {
            return Err(corrupt(
                CF_SLOT,
                &[],
                format!(
                    "{slots} slot entries for {} resident signatures",
                    stats.resident
                ),
            ));
        }
        Ok(stats)
    }
}

/// A set of index changes applied atomically by [`IndexBatch::commit`].
///
/// Holds the index's writer lock for its whole life, so the reads it makes
/// while being built (of its own pending changes first, then of the committed
/// index) cannot go stale before the commit. Dropping it discards the
/// changes.
pub struct IndexBatch<'a> {
    _guard: MutexGuard<'a, ()>,
    index: &'a Index,
    /// Pending `sig` entries: `None` deletes.
    sigs: BTreeMap<Sig, Option<SigEntry>>,
    /// Pending `map` entries: `None` deletes.
    maps: BTreeMap<(u32, u64), Option<Sig>>,
    /// Pending `slot` entries: `None` deletes.
    slots: BTreeMap<u64, Option<Sig>>,
}

impl fmt::Debug for IndexBatch<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IndexBatch")
            .field("sigs", &self.sigs.len())
            .field("maps", &self.maps.len())
            .field("slots", &self.slots.len())
            .finish_non_exhaustive()
    }
}

impl IndexBatch<'_> {
    fn sig_entry(&self, sig: &Sig) -> Result<Option<SigEntry>, IndexError> {
        match self.sigs.get(sig) {
            Some(e) => Ok(*e),
            None => self.index.sig_entry(sig),
        }
    }

    fn set_sig_entry(&mut self, sig: Sig, e: SigEntry) {
        // Neither resident nor referenced: nothing left to remember.
        let e = (e.loc.is_some() || e.refs > 0).then_some(e);
        self.sigs.insert(sig, e);
    }

    /// [`Index::lookup_signature`], including this batch's changes.
    pub fn lookup_signature(&self, sig: &Sig) -> Result<Option<SlotRef>, IndexError> {
        Ok(self.sig_entry(sig)?.and_then(SigEntry::slot_ref))
    }

    /// [`Index::get_mapping`], including this batch's changes.
    pub fn get_mapping(&self, volume: u32, chunk: u64) -> Result<Option<Sig>, IndexError> {
        match self.maps.get(&(volume, chunk)) {
            Some(s) => Ok(*s),
            None => self.index.get_mapping(volume, chunk),
        }
    }

    fn adjust_refs(&mut self, sig: Sig, up: bool) -> Result<(), IndexError> {
        let mut e = self
            .sig_entry(&sig)?
            .unwrap_or(SigEntry { loc: None, refs: 0 });
        e.refs = if up {
            e.refs
                .checked_add(1)
                .ok_or_else(|| corrupt(CF_SIG, &sig, "refs overflow"))?
        } else {
            e.refs
                .checked_sub(1)
                .ok_or_else(|| corrupt(CF_SIG, &sig, "refs underflow: mapped but counted 0"))?
        };
        self.set_sig_entry(sig, e);
        Ok(())
    }

    /// Maps a volume's chunk to `sig`: the new signature gains a reference
    /// and the old one (if any) loses one. Mapping the signature a chunk
    /// already has changes nothing. `sig` need not be resident: its entry is
    /// then "referenced, not resident" until [`IndexBatch::insert_chunk`].
    pub fn map(&mut self, volume: u32, chunk: u64, sig: Sig) -> Result<(), IndexError> {
        let old = self.get_mapping(volume, chunk)?;
        if old == Some(sig) {
            return Ok(());
        }
        if let Some(old) = old {
            self.adjust_refs(old, false)?;
        }
        self.adjust_refs(sig, true)?;
        self.maps.insert((volume, chunk), Some(sig));
        Ok(())
    }

    /// Removes a chunk's mapping (if any), dropping its signature's
    /// reference. Returns the signature it had.
    pub fn unmap(&mut self, volume: u32, chunk: u64) -> Result<Option<Sig>, IndexError> {
        let old = self.get_mapping(volume, chunk)?;
        if let Some(old) = old {
            self.adjust_refs(old, false)?;
            self.maps.insert((volume, chunk), None);
        }
        Ok(old)
    }

    /// Records that `sig`'s data is in `slot` (already written and fsynced).
    /// Keeps the signature's reference count. If `sig` was resident in
    /// another slot, that slot is released (moved). Fails with
    /// [`IndexError::SlotInUse`] if the slot holds another signature, in the
    /// committed index or in this batch: the data of a committed slot must
    /// not be overwritten before its eviction is committed.
    pub fn insert_chunk(
        &mut self,
        sig: Sig,
        slot: u64,
        generation: u64,
        len: u32,
    ) -> Result<(), IndexError> {
        let current = match self.slots.get(&slot) {
            Some(s) => *s,
            None => self.index.slot_owner(slot)?,
        };
        if current.is_some_and(|s| s != sig) {
            return Err(IndexError::SlotInUse { slot });
        }
        if let Some(committed) = self.index.slot_owner(slot)? {
            // Evicted from this slot in this batch, but the eviction is not
            // committed yet: still unsafe to overwrite.
            if committed != sig {
                return Err(IndexError::SlotInUse { slot });
            }
        }
        let mut e = self
            .sig_entry(&sig)?
            .unwrap_or(SigEntry { loc: None, refs: 0 });
        if let Some(old) = e.loc {
            if old.slot != slot {
                self.slots.insert(old.slot, None);
            }
        }
        e.loc = Some(Loc {
            slot,
            generation,
            len,
        });
        self.set_sig_entry(sig, e);
        self.slots.insert(slot, Some(sig));
        Ok(())
    }

    /// Evicts `sig`: frees its slot (returned, with the entry as it was).
    /// Mappings to it stay and become misses (see the module docs). No-op
    /// returning `None` if it was not resident.
    pub fn remove_chunk(&mut self, sig: &Sig) -> Result<Option<SlotRef>, IndexError> {
        let Some(mut e) = self.sig_entry(sig)? else {
            return Ok(None);
        };
        let was = e.slot_ref();
        if let Some(l) = e.loc.take() {
            self.slots.insert(l.slot, None);
            self.set_sig_entry(*sig, e);
        }
        Ok(was)
    }

    /// Whether the batch has no changes.
    pub fn is_empty(&self) -> bool {
        self.sigs.is_empty() && self.maps.is_empty() && self.slots.is_empty()
    }

    /// Applies every change atomically, then releases the writer lock.
    pub fn commit(self, durability: Durability) -> Result<(), IndexError> {
        if self.is_empty() {
            return Ok(());
        }
        let ix = self.index;
        let (sig_cf, map_cf, slot_cf) = (ix.cf(CF_SIG), ix.cf(CF_MAP), ix.cf(CF_SLOT));
        let mut b = WriteBatch::default();
        for (sig, e) in &self.sigs {
            match e {
                Some(e) => b.put_cf(sig_cf, sig, encode_sig_entry(*e)),
                None => b.delete_cf(sig_cf, sig),
            }
        }
        for (&(volume, chunk), sig) in &self.maps {
            let k = map_key(volume, chunk);
            match sig {
                Some(sig) => b.put_cf(map_cf, k, sig),
                None => b.delete_cf(map_cf, k),
            }
        }
        for (&slot, sig) in &self.slots {
            match sig {
                Some(sig) => b.put_cf(slot_cf, slot_key(slot), sig),
                None => b.delete_cf(slot_cf, slot_key(slot)),
            }
        }
        ix.write(b, durability, "commit batch")
    }
}

impl Index {
    fn slot_owner(&self, slot: u64) -> Result<Option<Sig>, IndexError> {
        let k = slot_key(slot);
        self.get(CF_SLOT, &k, "slot owner")?
            .map(|v| decode_sig(CF_SLOT, &k, &v))
            .transpose()
    }
}

//! The cache proper: the data file of sealed chunks ([`crate::slots`]), the
//! RocksDB index ([`crate::index`]), the eviction policy
//! ([`crate::policy`]) and the keys ([`crate::seal`]), behind one
//! synchronous, thread-safe API.
//!
//! ```text
//!   get(volume, chunk)                    put(volume, chunk, data)
//!        |                                     |  signature = keyed BLAKE3(data)
//!        v                                     v
//!   index: map (volume, chunk) -> signature    index: signature resident? --yes--> map only (dedup)
//!   index: sig  signature -> slot, generation       | no
//!        |                                     policy: make room (evict, commit)
//!        v                                     seal into a free slot, fdatasync
//!   data file: read slot, open (AEAD)          index: insert chunk + map, commit
//! ```
//!
//! # Ordering and crash safety
//!
//! A fill writes the sealed record into a slot that no committed index entry
//! names, `fdatasync`s the data file, and only then commits the index batch
//! that points at it. Evictions are committed (synchronously) before their
//! slots are handed out again. So a committed entry always names durable
//! data of exactly its signature and generation; a crash leaves at worst
//! orphaned slots (written, never committed), which are free on the next
//! open because free space is whatever the index does not name. Every read
//! still checks the record against the index's slot, generation and
//! signature under the AEAD: a lagging or damaged disk yields a miss plus an
//! integrity error, never wrong data.
//!
//! # Generations and nonces
//!
//! Each sealed record gets a generation from a cache-wide counter that never
//! repeats, even across crashes: the index durably reserves a range ahead of
//! use ([`GENERATION_RESERVE`]), and a restart continues above the reserved
//! bound. The AEAD nonce is derived from the generation, and the encryption
//! key from the master key and this cache's random id, so no (key, nonce)
//! pair is ever used twice.
//!
//! # Concurrency
//!
//! Reads take no lock beyond RocksDB's own and a `try_lock` to record the
//! hit in the policy (a contended hit is simply not counted for eviction).
//! Fills serialise only for slot allocation and the index commit; sealing
//! and writing run in parallel. A reader racing an eviction that reuses its
//! slot reads a record of another generation and reports a miss. Resizing
//! waits for fills in flight and blocks new ones while it runs.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock};

use bytes::{Bytes, BytesMut};

use crate::index::{Durability, Index, IndexError, IndexOptions, SlotRef};
use crate::policy::S3Fifo;
use crate::seal::{self, Expected, IntegrityError, Keys, Signature};
use crate::slots::{SlotFile, SlotFileError};

#[cfg(test)]
mod tests;

/// Generations reserved in the index at a time: one synchronous index write
/// per this many fills.
pub const GENERATION_RESERVE: u64 = 1 << 16;

/// The smallest chunk size the cache accepts.
pub const MIN_CHUNK_SIZE: u32 = 4096;
/// The largest chunk size the cache accepts.
pub const MAX_CHUNK_SIZE: u32 = 16 << 20;

/// File and directory names inside a cache directory.
pub(crate) const DATA_FILE: &str = "data";
pub(crate) const INDEX_DIR: &str = "index";

/// How to open a cache.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// Bytes of plaintext per chunk: a power of two, at least 4 KiB. Fixed
    /// when the cache is created.
    pub chunk_size: u32,
    /// Capacity in bytes of chunk data (rounded down to whole chunks). The
    /// data file is `capacity / chunk_size` slots of slightly more than a
    /// chunk each (record header, tag, page alignment).
    pub capacity: u64,
    /// RocksDB tuning (its `chunk_size` is overridden by this config's).
    pub index: IndexOptions,
    /// How fills commit their index entries. `Async` (the default) survives
    /// a process crash; a power loss may forget the last fills (they become
    /// misses), never point at wrong data. Evictions are always synchronous.
    pub fill_durability: Durability,
    /// Bytes of decrypted chunks kept in memory (0: none). A hit there
    /// costs a hash lookup instead of a pread and an AES-GCM open of the
    /// whole chunk, which matters most for small random reads.
    pub memory: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            chunk_size: 64 * 1024,
            capacity: 1 << 30,
            index: IndexOptions::default(),
            fill_durability: Durability::Async,
            memory: 64 << 20,
        }
    }
}

/// Errors of the cache; each names what failed.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("invalid cache configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error(transparent)]
    DataFile(#[from] SlotFileError),
    #[error("cache data file I/O ({op}): {source}")]
    Io {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cache id mismatch: the data file and the index belong to different caches")]
    IdMismatch,
    #[error("volume {name:?} is registered with size {registered}, not {requested}")]
    VolumeSize {
        name: String,
        registered: u64,
        requested: u64,
    },
    #[error("chunk {chunk} of volume {volume}: data of {len} bytes, expected {expected}")]
    ChunkLength {
        volume: u32,
        chunk: u64,
        len: usize,
        expected: usize,
    },
    #[error("chunk in slot {slot} failed its integrity check: {source}")]
    Integrity {
        slot: u64,
        #[source]
        source: IntegrityError,
    },
    #[error("cannot shrink to {slots} slots: {pinned} chunks are pinned")]
    Pinned { slots: u64, pinned: u64 },
}

fn io_err(op: &'static str) -> impl FnOnce(std::io::Error) -> CacheError {
    move |source| CacheError::Io { op, source }
}

/// A registered volume: the unit of `(volume, chunk index)` addressing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Volume {
    pub id: u32,
    pub size: u64,
}

/// What [`Cache::put`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PutOutcome {
    /// The content was new; it was stored in a slot.
    Stored,
    /// The content was already cached; the chunk now maps to it (no data
    /// written).
    Deduplicated,
    /// `still_valid` said no (the chunk changed underneath the fill): the
    /// chunk was unmapped instead.
    Invalidated,
    /// No room (every resident chunk is pinned, or the slots are all taken
    /// by fills in flight): nothing stored, and the chunk's old mapping, if
    /// any, dropped.
    Refused,
}

/// Counters since the cache was opened, and its current occupancy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Hits (counted in `hits` too) served from decrypted chunks in memory.
    pub memory_hits: u64,
    pub hits: u64,
    pub misses: u64,
    /// Bytes returned by hits.
    pub hit_bytes: u64,
    /// Chunks stored in a slot.
    pub stores: u64,
    /// Fills answered by content already cached.
    pub dedup_hits: u64,
    /// Bytes not written thanks to dedup.
    pub dedup_bytes: u64,
    pub evictions: u64,
    /// Chunk mappings dropped because their data changed.
    pub invalidations: u64,
    /// Records that failed authentication or did not match the index.
    pub integrity_errors: u64,
    /// Slots in the data file (the capacity).
    pub slots: u64,
    /// Slots holding a resident chunk.
    pub used_slots: u64,
    /// Resident chunks that are pinned.
    pub pinned: u64,
}

impl CacheStats {
    /// Fraction of the capacity in use.
    #[allow(clippy::cast_precision_loss)]
    pub fn fill_rate(&self) -> f64 {
        if self.slots == 0 {
            0.0
        } else {
            self.used_slots as f64 / self.slots as f64
        }
    }

    /// Fraction of lookups that hit.
    #[allow(clippy::cast_precision_loss)]
    pub fn hit_rate(&self) -> f64 {
        let n = self.hits + self.misses;
        if n == 0 {
            0.0
        } else {
            self.hits as f64 / n as f64
        }
    }
}

/// Decrypted chunks in memory, by signature, with their own S3-FIFO. A
/// signature always names the same bytes, so nothing here can go stale:
/// remapping, invalidating or evicting a chunk on disk never makes a memory
/// entry wrong, only possibly unused until it ages out.
struct HotTier {
    policy: S3Fifo<Signature>,
    data: std::collections::HashMap<Signature, Bytes>,
}

impl HotTier {
    fn get(&mut self, sig: &Signature) -> Option<Bytes> {
        let d = self.data.get(sig)?.clone();
        self.policy.access(*sig);
        Some(d)
    }

    fn insert(&mut self, sig: Signature, data: Bytes) {
        if self.data.contains_key(&sig) {
            return;
        }
        let evicted = self.policy.insert(sig);
        for e in evicted {
            self.data.remove(&e);
        }
        if self.policy.contains(&sig) {
            self.data.insert(sig, data);
        }
    }
}

#[derive(Debug, Default)]
struct Counters {
    memory_hits: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    hit_bytes: AtomicU64,
    stores: AtomicU64,
    dedup_hits: AtomicU64,
    dedup_bytes: AtomicU64,
    evictions: AtomicU64,
    invalidations: AtomicU64,
    integrity_errors: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// A slot and generation handed to one fill.
struct Reservation {
    slot: u64,
    generation: u64,
    /// Whether this fill entered the signature in the policy.
    entered: bool,
}

/// Slot allocation and eviction state.
struct State {
    policy: S3Fifo<Signature>,
    /// Slots neither resident nor reserved by a fill in flight; lowest
    /// first, so shrinking finds the tail empty more often.
    free: BTreeSet<u64>,
    slots: u64,
    next_generation: u64,
    /// Generations below this are reserved in the index.
    generation_limit: u64,
}

/// The edge cache. See the module docs.
pub struct Cache {
    dir: PathBuf,
    chunk_size: u32,
    keys: Keys,
    index: Index,
    data: SlotFile,
    state: Mutex<State>,
    /// Fills hold it shared from slot allocation to commit; resize holds it
    /// exclusively.
    resizing: RwLock<()>,
    counters: Counters,
    fill_durability: Durability,
    hot: Option<Mutex<HotTier>>,
}

impl fmt::Debug for Cache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cache")
            .field("dir", &self.dir)
            .field("chunk_size", &self.chunk_size)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves the state consistent before anything
    // that can panic, so a poisoned lock is still usable.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Cache {
    /// Opens (creating if needed) the cache in `dir` with the deployment's
    /// 32-byte master key, recovering from whatever a crash left.
    ///
    /// Recovery: slots the index does not name are free (orphans of a
    /// crash); index entries naming slots beyond the data file's end (a
    /// crash in the middle of a shrink) are evicted; the capacity is then
    /// set to `config.capacity`. Recency is not persisted: after a restart
    /// every resident chunk starts out equally cold.
    pub fn open(
        dir: impl AsRef<Path>,
        master_key: &[u8; 32],
        config: &CacheConfig,
    ) -> Result<Cache, CacheError> {
        Self::open_keyed(dir.as_ref(), config, |id| Keys::derive(master_key, id))
    }

    /// [`Cache::open`] with a cache master key and the deployment's dedup
    /// key given apart (see [`Keys::derive_with_dedup_key`]): how an edge
    /// opens its cache with what the origin hands it.
    pub fn open_with_dedup_key(
        dir: impl AsRef<Path>,
        cache_key: &[u8; 32],
        dedup_key: &[u8; 32],
        config: &CacheConfig,
    ) -> Result<Cache, CacheError> {
        Self::open_keyed(dir.as_ref(), config, |id| {
            Keys::derive_with_dedup_key(cache_key, dedup_key, id)
        })
    }

    fn open_keyed(
        dir: &Path,
        config: &CacheConfig,
        keys: impl FnOnce(&[u8; 16]) -> Keys,
    ) -> Result<Cache, CacheError> {
        let dir = dir.to_path_buf();
        let cs = config.chunk_size;
        if !cs.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&cs) {
            return Err(CacheError::Config(format!(
                "chunk size {cs} must be a power of two between {MIN_CHUNK_SIZE} and {MAX_CHUNK_SIZE}"
            )));
        }
        std::fs::create_dir_all(&dir).map_err(io_err("create cache directory"))?;
        let mut index_opts = config.index.clone();
        index_opts.chunk_size = cs;
        let index = Index::open(dir.join(INDEX_DIR), &index_opts)?;

        let index_id = index.cache_id()?;
        let new_id = match index_id {
            Some(id) => id,
            None => rand_id().map_err(io_err("random cache id"))?,
        };
        let (data, created) = SlotFile::open(&dir.join(DATA_FILE), cs, new_id)?;
        match index_id {
            Some(id) if id != data.cache_id() => return Err(CacheError::IdMismatch),
            Some(_) => {}
            // A new index (or one that lost its id): adopt the data file's.
            None => index.set_cache_id(data.cache_id())?,
        }
        let keys = keys(&data.cache_id());

        let slots = data.slot_count().map_err(io_err("size data file"))?;
        let used = index.used_slots()?;
        // Entries the data file cannot back: slots past its end, or every
        // slot if the file was just (re)created under an existing index.
        let lost: Vec<Signature> = used
            .iter()
            .filter(|(slot, _)| created || *slot >= slots)
            .map(|(_, sig)| Signature::from_bytes(*sig))
            .collect();
        if !lost.is_empty() {
            tracing::warn!(
                count = lost.len(),
                "cache: dropping index entries the data file does not hold"
            );
            let mut b = index.batch();
            for sig in &lost {
                b.remove_chunk(sig.as_bytes())?;
            }
            b.commit(Durability::Sync)?;
        }
        let resident: Vec<(u64, Signature)> = used
            .into_iter()
            .filter(|(slot, _)| !created && *slot < slots)
            .map(|(slot, sig)| (slot, Signature::from_bytes(sig)))
            .collect();

        let mut policy = S3Fifo::new(
            usize::try_from(slots)
                .unwrap_or(usize::MAX)
                .max(resident.len()),
        );
        let mut free: BTreeSet<u64> = (0..slots).collect();
        for (slot, sig) in &resident {
            free.remove(slot);
            let evicted = policy.insert(*sig);
            debug_assert!(evicted.is_empty());
        }
        let next_generation = index.generation_reserved()?;
        let cache = Cache {
            dir,
            chunk_size: cs,
            keys,
            index,
            data,
            state: Mutex::new(State {
                policy,
                free,
                slots,
                next_generation,
                generation_limit: next_generation,
            }),
            resizing: RwLock::new(()),
            counters: Counters::default(),
            fill_durability: config.fill_durability,
            hot: {
                let entries = usize::try_from(config.memory / u64::from(cs)).unwrap_or(usize::MAX);
                (entries > 0).then(|| {
                    Mutex::new(HotTier {
                        policy: S3Fifo::new(entries.min(crate::policy::MAX_CAPACITY)),
                        data: std::collections::HashMap::new(),
                    })
                })
            },
        };
        cache.resize(config.capacity)?;
        Ok(cache)
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bytes per chunk.
    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// The content signature of `data` under the deployment's dedup key.
    pub fn signature(&self, data: &[u8]) -> Signature {
        self.keys.signature(data)
    }

    /// The index (for inspection and tests).
    pub fn index(&self) -> &Index {
        &self.index
    }

    /// Registers a volume, or returns the existing registration.
    pub fn volume(&self, name: &str, size: u64) -> Result<Volume, CacheError> {
        let meta = match self.index.volume(name)? {
            Some(m) => m,
            None => match self.index.create_volume(name, self.chunk_size, size) {
                Ok(m) => m,
                // Registered concurrently: use that one.
                Err(IndexError::VolumeExists { .. }) => {
                    self.index.volume(name)?.expect("volume exists")
                }
                Err(e) => return Err(e.into()),
            },
        };
        if meta.size != size {
            return Err(CacheError::VolumeSize {
                name: name.to_owned(),
                registered: meta.size,
                requested: size,
            });
        }
        Ok(Volume {
            id: meta.id,
            size: meta.size,
        })
    }

    /// The plaintext length of chunk `chunk` of `volume` (the last chunk may
    /// be short).
    fn chunk_len(&self, volume: Volume, chunk: u64) -> usize {
        let cs = u64::from(self.chunk_size);
        let start = chunk.saturating_mul(cs);
        usize::try_from(volume.size.saturating_sub(start).min(cs)).expect("chunk fits usize")
    }

    /// Looks a chunk up: its plaintext on a hit, `None` on a miss.
    ///
    /// A record that fails its checks (tampered, torn, or written with
    /// other keys) is an [`CacheError::Integrity`] error for this chunk
    /// only; its entry is evicted, so the next fill repairs it.
    pub fn get(&self, volume: Volume, chunk: u64) -> Result<Option<Bytes>, CacheError> {
        let Some(sig) = self.index.get_mapping(volume.id, chunk)? else {
            bump(&self.counters.misses, 1);
            return Ok(None);
        };
        let sig = Signature::from_bytes(sig);
        let found = self.read_signature(&sig)?;
        match &found {
            Some(data) => {
                bump(&self.counters.hits, 1);
                bump(&self.counters.hit_bytes, data.len() as u64);
            }
            None => bump(&self.counters.misses, 1),
        }
        Ok(found)
    }

    /// A hit from the memory tier, found without blocking (no disk read of
    /// the index or the data file); `None` if that cannot be answered
    /// without I/O or is not in memory. Counts only hits: on `None` the
    /// caller goes on with [`Cache::get`].
    pub fn get_from_memory(&self, volume: Volume, chunk: u64) -> Option<Bytes> {
        let hot = self.hot.as_ref()?;
        let sig = Signature::from_bytes(self.index.get_mapping_cached(volume.id, chunk)??);
        let data = lock(hot).get(&sig)?;
        bump(&self.counters.memory_hits, 1);
        bump(&self.counters.hits, 1);
        bump(&self.counters.hit_bytes, data.len() as u64);
        if let Ok(mut st) = self.state.try_lock() {
            st.policy.access(sig);
        }
        Some(data)
    }

    /// Whether content with this signature is resident (the dedup question,
    /// e.g. when the origin answers a read with a signature).
    pub fn contains(&self, sig: &Signature) -> Result<bool, CacheError> {
        Ok(self.index.lookup_signature(sig.as_bytes())?.is_some())
    }

    /// The resident content with this signature, if any.
    pub fn get_by_signature(&self, sig: &Signature) -> Result<Option<Bytes>, CacheError> {
        self.read_signature(sig)
    }

    fn remember(&self, sig: &Signature, data: &Bytes) {
        if let Some(hot) = &self.hot {
            lock(hot).insert(*sig, data.clone());
        }
    }

    fn read_signature(&self, sig: &Signature) -> Result<Option<Bytes>, CacheError> {
        if let Some(hot) = &self.hot {
            if let Some(data) = lock(hot).get(sig) {
                bump(&self.counters.memory_hits, 1);
                if let Ok(mut st) = self.state.try_lock() {
                    st.policy.access(*sig);
                }
                return Ok(Some(data));
            }
        }
        let Some(loc) = self.index.lookup_signature(sig.as_bytes())? else {
            return Ok(None);
        };
        match self.read_record(sig, loc) {
            Ok(data) => {
                if let Ok(mut st) = self.state.try_lock() {
                    st.policy.access(*sig);
                }
                self.remember(sig, &data);
                Ok(Some(data))
            }
            Err(e) => {
                // An eviction or a move may have reused or dropped the slot
                // since the lookup: then this is just a miss.
                if self.index.lookup_signature(sig.as_bytes())? != Some(loc) {
                    return Ok(None);
                }
                match e {
                    CacheError::Integrity { slot, source } => {
                        bump(&self.counters.integrity_errors, 1);
                        tracing::warn!(slot, error = %source, "cache: chunk failed its integrity check; evicting it");
                        self.evict_damaged(sig, loc)?;
                        Err(CacheError::Integrity { slot, source })
                    }
                    other => Err(other),
                }
            }
        }
    }

    fn read_record(&self, sig: &Signature, loc: SlotRef) -> Result<Bytes, CacheError> {
        let rec = match self.data.read(loc.slot, loc.len as usize) {
            Ok(rec) => rec,
            // Past the end: the file was truncated (a shrink) after the
            // lookup; the caller re-checks the index.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(CacheError::Integrity {
                    slot: loc.slot,
                    source: IntegrityError::Truncated {
                        needed: loc.len as usize,
                        len: 0,
                    },
                })
            }
            Err(e) => return Err(io_err("read slot")(e)),
        };
        let expected = Expected::slot(loc.slot)
            .with_generation(loc.generation)
            .with_signature(*sig);
        seal::open_in_place(&self.keys, &expected, rec)
            .map(|o| o.plaintext)
            .map_err(|source| CacheError::Integrity {
                slot: loc.slot,
                source,
            })
    }

    fn evict_damaged(&self, sig: &Signature, loc: SlotRef) -> Result<(), CacheError> {
        let _fills = self.resizing.read().unwrap_or_else(PoisonError::into_inner);
        let mut b = self.index.batch();
        if b.lookup_signature(sig.as_bytes())? != Some(loc) {
            return Ok(());
        }
        b.remove_chunk(sig.as_bytes())?;
        b.commit(Durability::Sync)?;
        let mut st = lock(&self.state);
        st.policy.remove(sig);
        st.free.insert(loc.slot);
        Ok(())
    }

    /// Stores a chunk's data (the whole chunk: `chunk_size` bytes, or the
    /// volume's tail for its last chunk) and maps `(volume, chunk)` to it.
    ///
    /// `still_valid` is called under the index's writer lock right before the
    /// commit; if it returns false (the caller saw the chunk change since it
    /// read `data`), the chunk is unmapped instead, so a fill can never
    /// overwrite a newer write's invalidation.
    pub fn put(
        &self,
        volume: Volume,
        chunk: u64,
        data: &[u8],
        still_valid: &dyn Fn() -> bool,
    ) -> Result<PutOutcome, CacheError> {
        let expected = self.chunk_len(volume, chunk);
        if data.len() != expected || expected == 0 {
            return Err(CacheError::ChunkLength {
                volume: volume.id,
                chunk,
                len: data.len(),
                expected,
            });
        }
        let sig = self.keys.signature(data);
        self.put_with_signature(volume, chunk, &sig, data, still_valid)
    }

    /// [`Cache::put`] with the signature already computed (for example
    /// received from the origin). `sig` must be the data's signature: a
    /// wrong one makes later reads of it integrity errors.
    pub fn put_with_signature(
        &self,
        volume: Volume,
        chunk: u64,
        sig: &Signature,
        data: &[u8],
        still_valid: &dyn Fn() -> bool,
    ) -> Result<PutOutcome, CacheError> {
        let _fills = self.resizing.read().unwrap_or_else(PoisonError::into_inner);
        // Already resident: map only.
        if self.index.lookup_signature(sig.as_bytes())?.is_some() {
            if let Some(outcome) = self.map_resident(volume, chunk, sig, still_valid)? {
                if outcome == PutOutcome::Deduplicated {
                    bump(&self.counters.dedup_hits, 1);
                    bump(&self.counters.dedup_bytes, data.len() as u64);
                }
                return Ok(outcome);
            }
        }
        let Some(Reservation {
            slot,
            generation,
            entered,
        }) = self.allocate(sig)?
        else {
            // The chunk's old mapping must not outlive its new content.
            self.invalidate(volume, chunk..chunk + 1)?;
            return Ok(PutOutcome::Refused);
        };
        let result = self.store(volume, chunk, sig, data, slot, generation, still_valid);
        let mut st = lock(&self.state);
        match result {
            Ok(PutOutcome::Stored) => {
                bump(&self.counters.stores, 1);
                self.remember(sig, &Bytes::copy_from_slice(data));
                if !st.policy.contains(sig) {
                    // Chosen as a victim while its data was being written
                    // (the policy saw it, the index did not yet): enter it
                    // again so it stays accounted for.
                    let victims = st.policy.insert(*sig);
                    if !victims.is_empty() {
                        self.evict(&mut st, &victims)?;
                    }
                }
            }
            Ok(other) => {
                // Not stored after all: give the slot back.
                st.free.insert(slot);
                if other == PutOutcome::Deduplicated {
                    // Stored by a concurrent fill, which left the policy
                    // entry to this one.
                    bump(&self.counters.dedup_hits, 1);
                    bump(&self.counters.dedup_bytes, data.len() as u64);
                } else if entered && !self.contains(sig)? {
                    st.policy.remove(sig);
                }
            }
            Err(_) => {
                st.free.insert(slot);
                if entered && !self.contains(sig).unwrap_or(true) {
                    st.policy.remove(sig);
                }
            }
        }
        drop(st);
        result
    }

    /// Maps a chunk to a resident signature. `None` if it is not resident
    /// (any more).
    fn map_resident(
        &self,
        volume: Volume,
        chunk: u64,
        sig: &Signature,
        still_valid: &dyn Fn() -> bool,
    ) -> Result<Option<PutOutcome>, CacheError> {
        let mut b = self.index.batch();
        if !still_valid() {
            if b.unmap(volume.id, chunk)?.is_some() {
                bump(&self.counters.invalidations, 1);
            }
            b.commit(self.fill_durability)?;
            return Ok(Some(PutOutcome::Invalidated));
        }
        if b.lookup_signature(sig.as_bytes())?.is_none() {
            return Ok(None);
        }
        b.map(volume.id, chunk, *sig.as_bytes())?;
        b.commit(self.fill_durability)?;
        Ok(Some(PutOutcome::Deduplicated))
    }

    /// Maps `(volume, chunk)` to already-resident content with signature
    /// `sig` (the origin answered a read with a signature the cache holds).
    /// Returns false, changing nothing, if the content is not resident.
    pub fn map_existing(
        &self,
        volume: Volume,
        chunk: u64,
        sig: &Signature,
        still_valid: &dyn Fn() -> bool,
    ) -> Result<bool, CacheError> {
        let _fills = self.resizing.read().unwrap_or_else(PoisonError::into_inner);
        Ok(matches!(
            self.map_resident(volume, chunk, sig, still_valid)?,
            Some(PutOutcome::Deduplicated)
        ))
    }

    /// Reserves a free slot (evicting to make room) and a generation, and
    /// enters `sig` in the policy. `None` if every resident chunk is pinned.
    fn allocate(&self, sig: &Signature) -> Result<Option<Reservation>, CacheError> {
        let mut st = lock(&self.state);
        // Already in the policy: resident, or another fill of the same
        // content is in flight. Entering it twice would confuse the policy;
        // store anyway and let the commit notice the duplicate.
        let entered = !st.policy.contains(sig);
        if entered {
            let victims = st.policy.insert(*sig);
            if victims.contains(sig) {
                return Ok(None);
            }
            if !victims.is_empty() {
                self.evict(&mut st, &victims)?;
            }
        }
        let undo = |st: &mut State| {
            if entered {
                st.policy.remove(sig);
            }
        };
        let Some(slot) = st.free.pop_first() else {
            // Room in the policy but no free slot: the slots are held by
            // fills in flight. Give up this fill rather than wait.
            undo(&mut st);
            return Ok(None);
        };
        match self.next_generation(&mut st) {
            Ok(generation) => Ok(Some(Reservation {
                slot,
                generation,
                entered,
            })),
            Err(e) => {
                st.free.insert(slot);
                undo(&mut st);
                Err(e)
            }
        }
    }

    fn next_generation(&self, st: &mut State) -> Result<u64, CacheError> {
        if st.next_generation >= st.generation_limit {
            let limit = st.next_generation + GENERATION_RESERVE;
            self.index.reserve_generations(limit)?;
            st.generation_limit = limit;
        }
        let generation = st.next_generation;
        st.next_generation += 1;
        Ok(generation)
    }

    /// Commits the eviction of `victims` (synchronously, since their slots
    /// are about to be rewritten) and frees their slots.
    fn evict(&self, st: &mut State, victims: &[Signature]) -> Result<(), CacheError> {
        let mut b = self.index.batch();
        let mut freed = Vec::with_capacity(victims.len());
        for v in victims {
            if let Some(loc) = b.remove_chunk(v.as_bytes())? {
                freed.push(loc.slot);
            }
        }
        b.commit(Durability::Sync)?;
        bump(&self.counters.evictions, victims.len() as u64);
        st.free.extend(freed);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn store(
        &self,
        volume: Volume,
        chunk: u64,
        sig: &Signature,
        data: &[u8],
        slot: u64,
        generation: u64,
        still_valid: &dyn Fn() -> bool,
    ) -> Result<PutOutcome, CacheError> {
        let mut rec = BytesMut::with_capacity(seal::record_len(data.len()));
        seal::seal(&self.keys, slot, generation, sig, data, &mut rec);
        self.data.write(slot, &rec).map_err(io_err("write slot"))?;
        // Durable before the index may name it.
        self.data.sync().map_err(io_err("sync data file"))?;

        let mut b = self.index.batch();
        if !still_valid() {
            if b.unmap(volume.id, chunk)?.is_some() {
                bump(&self.counters.invalidations, 1);
            }
            b.commit(self.fill_durability)?;
            return Ok(PutOutcome::Invalidated);
        }
        if b.lookup_signature(sig.as_bytes())?.is_some() {
            // The same content was stored by a concurrent fill.
            b.map(volume.id, chunk, *sig.as_bytes())?;
            b.commit(self.fill_durability)?;
            return Ok(PutOutcome::Deduplicated);
        }
        let len = u32::try_from(rec.len()).expect("record fits u32");
        b.insert_chunk(*sig.as_bytes(), slot, generation, len)?;
        b.map(volume.id, chunk, *sig.as_bytes())?;
        b.commit(self.fill_durability)?;
        Ok(PutOutcome::Stored)
    }

    /// Drops the mappings of chunks `chunks` of `volume` (their data
    /// changed). The content stays resident while other chunks map to it or
    /// until evicted.
    pub fn invalidate(
        &self,
        volume: Volume,
        chunks: std::ops::Range<u64>,
    ) -> Result<u64, CacheError> {
        let mut b = self.index.batch();
        let mut n = 0;
        for chunk in chunks {
            if b.unmap(volume.id, chunk)?.is_some() {
                n += 1;
            }
        }
        b.commit(self.fill_durability)?;
        bump(&self.counters.invalidations, n);
        Ok(n)
    }

    /// Pins the content a chunk maps to (prefetched boot data), so it is
    /// not evicted until unpinned. Returns whether it was resident.
    pub fn pin(&self, volume: Volume, chunk: u64) -> Result<bool, CacheError> {
        let Some(sig) = self.index.get_mapping(volume.id, chunk)? else {
            return Ok(false);
        };
        Ok(lock(&self.state).policy.pin(&Signature::from_bytes(sig)))
    }

    /// Releases one pin of the content a chunk maps to.
    pub fn unpin(&self, volume: Volume, chunk: u64) -> Result<(), CacheError> {
        let Some(sig) = self.index.get_mapping(volume.id, chunk)? else {
            return Ok(());
        };
        let sig = Signature::from_bytes(sig);
        let mut st = lock(&self.state);
        if st.policy.unpin(&sig) == crate::policy::UnpinOutcome::Evicted {
            self.evict(&mut st, &[sig])?;
        }
        Ok(())
    }

    /// Changes the capacity while the cache is in use. Growing extends the
    /// data file; shrinking evicts (policy order) down to the new size,
    /// moves chunks out of the slots being cut off, and truncates the file.
    /// Fills wait while it runs; reads go on.
    pub fn resize(&self, capacity: u64) -> Result<(), CacheError> {
        let target = capacity / u64::from(self.chunk_size);
        let _exclusive = self
            .resizing
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let mut st = lock(&self.state);
        let current = st.slots;
        if target >= current {
            if target > current {
                self.data
                    .set_slot_count(target)
                    .map_err(io_err("grow data file"))?;
                st.free.extend(current..target);
                st.slots = target;
            }
            let evicted = st
                .policy
                .resize(usize::try_from(target).unwrap_or(usize::MAX));
            debug_assert!(evicted.is_empty());
            return Ok(());
        }
        let pinned = st.policy.pinned_len() as u64;
        if pinned > target {
            return Err(CacheError::Pinned {
                slots: target,
                pinned,
            });
        }
        let victims = st
            .policy
            .resize(usize::try_from(target).unwrap_or(usize::MAX));
        if !victims.is_empty() {
            self.evict(&mut st, &victims)?;
        }
        // Move the survivors out of the tail.
        let movers: Vec<(u64, Signature)> = self
            .index
            .used_slots()?
            .into_iter()
            .filter(|(slot, _)| *slot >= target)
            .map(|(slot, sig)| (slot, Signature::from_bytes(sig)))
            .collect();
        for (_, sig) in movers {
            self.relocate(&mut st, &sig, target)?;
        }
        self.data
            .set_slot_count(target)
            .map_err(io_err("shrink data file"))?;
        st.free.retain(|&s| s < target);
        st.slots = target;
        Ok(())
    }

    /// Moves a resident chunk into a free slot below `limit` (re-sealed for
    /// its new slot and a new generation). A chunk whose record fails its
    /// checks is evicted instead.
    fn relocate(&self, st: &mut State, sig: &Signature, limit: u64) -> Result<(), CacheError> {
        let Some(loc) = self.index.lookup_signature(sig.as_bytes())? else {
            return Ok(());
        };
        let data = match self.read_record(sig, loc) {
            Ok(data) => data,
            Err(CacheError::Integrity { slot, source }) => {
                bump(&self.counters.integrity_errors, 1);
                tracing::warn!(slot, error = %source, "cache: chunk failed its integrity check while moving; evicting it");
                st.policy.remove(sig);
                let mut b = self.index.batch();
                b.remove_chunk(sig.as_bytes())?;
                b.commit(Durability::Sync)?;
                st.free.insert(loc.slot);
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let slot = match st.free.first() {
            Some(&s) if s < limit => s,
            _ => {
                // No room below the limit (cannot happen when the policy
                // holds at most `limit` entries): drop the chunk.
                st.policy.remove(sig);
                let mut b = self.index.batch();
                b.remove_chunk(sig.as_bytes())?;
                b.commit(Durability::Sync)?;
                bump(&self.counters.evictions, 1);
                return Ok(());
            }
        };
        st.free.remove(&slot);
        let generation = self.next_generation(st)?;
        let mut rec = BytesMut::with_capacity(seal::record_len(data.len()));
        seal::seal(&self.keys, slot, generation, sig, &data, &mut rec);
        self.data.write(slot, &rec).map_err(io_err("write slot"))?;
        self.data.sync().map_err(io_err("sync data file"))?;
        let mut b = self.index.batch();
        // Moves the signature: the old slot's entry goes in the same batch.
        b.insert_chunk(
            *sig.as_bytes(),
            slot,
            generation,
            u32::try_from(rec.len()).expect("fits"),
        )?;
        b.commit(Durability::Sync)?;
        st.free.insert(loc.slot);
        Ok(())
    }

    /// Counters and occupancy.
    pub fn stats(&self) -> CacheStats {
        let c = &self.counters;
        let st = lock(&self.state);
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CacheStats {
            memory_hits: load(&c.memory_hits),
            hits: load(&c.hits),
            misses: load(&c.misses),
            hit_bytes: load(&c.hit_bytes),
            stores: load(&c.stores),
            dedup_hits: load(&c.dedup_hits),
            dedup_bytes: load(&c.dedup_bytes),
            evictions: load(&c.evictions),
            invalidations: load(&c.invalidations),
            integrity_errors: load(&c.integrity_errors),
            slots: st.slots,
            used_slots: st.slots - st.free.len() as u64,
            pinned: st.policy.pinned_len() as u64,
        }
    }

    /// Reads and fully verifies every resident chunk (authentication, slot,
    /// generation, and the plaintext's signature recomputed), and checks the
    /// index's own invariants. Returns the damaged chunks; does not change
    /// anything.
    pub fn verify(&self) -> Result<VerifyReport, CacheError> {
        let stats = self.index.check()?;
        let mut report = VerifyReport {
            resident: stats.resident,
            signatures: stats.signatures,
            mappings: stats.mappings,
            ..VerifyReport::default()
        };
        for (slot, sig) in self.index.used_slots()? {
            let sig = Signature::from_bytes(sig);
            let Some(loc) = self.index.lookup_signature(sig.as_bytes())? else {
                continue;
            };
            let result = self
                .data
                .read(loc.slot, loc.len as usize)
                .map_err(io_err("read slot"))
                .and_then(|rec| {
                    let expected = Expected::slot(loc.slot)
                        .with_generation(loc.generation)
                        .with_signature(sig)
                        .verify_content();
                    seal::open_in_place(&self.keys, &expected, rec)
                        .map_err(|source| CacheError::Integrity { slot, source })
                });
            match result {
                Ok(opened) => {
                    report.verified += 1;
                    report.stored_bytes += opened.plaintext.len() as u64;
                }
                Err(CacheError::Integrity { slot, source }) => report.damaged.push((slot, source)),
                Err(CacheError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::UnexpectedEof =>
                {
                    report.damaged.push((
                        slot,
                        IntegrityError::Truncated {
                            needed: loc.len as usize,
                            len: 0,
                        },
                    ));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(report)
    }
}

/// What [`Cache::verify`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Signatures known to the index (resident or only referenced).
    pub signatures: u64,
    /// Resident chunks.
    pub resident: u64,
    /// `(volume, chunk)` mappings.
    pub mappings: u64,
    /// Chunks that verified.
    pub verified: u64,
    /// Plaintext bytes of the verified chunks.
    pub stored_bytes: u64,
    /// Chunks that failed, by slot.
    pub damaged: Vec<(u64, IntegrityError)>,
}

/// A fresh random cache id. It must never repeat: the encryption key is
/// derived from it, and a new cache restarts its generations (the nonces).
fn rand_id() -> std::io::Result<[u8; 16]> {
    use ring::rand::{SecureRandom, SystemRandom};
    let mut id = [0u8; 16];
    SystemRandom::new()
        .fill(&mut id)
        .map_err(|_| std::io::Error::other("the system random number generator failed"))?;
    Ok(id)
}

//! The cache's eviction policy: S3-FIFO (Yang et al., "FIFO queues are all
//! you need for cache eviction", SOSP'23) over opaque keys, extended with
//! counted pins and online resize.
//!
//! The policy only decides *which* keys stay resident; it never sees chunk
//! data. Keys are whatever the cache uses to name a slot (a slot or signature
//! id), hence `K: Copy + Eq + Hash`.
//!
//! ```text
//!   miss, key not in ghost                      miss, key found in ghost
//!            |                                             |
//!            v          head ........ tail                 v          head ............ tail
//!     +---------------------------------+  freq >= 1  +------------------------------------+
//!     | small FIFO  (~10% of capacity)  |------------>| main FIFO  (~90% of capacity)      |
//!     +---------------------------------+  promotion  +------------------------------------+
//!            | tail, freq == 0                            ^                      | tail
//!            v                                            | freq > 0:            |
//!     +---------------------------------+                 | freq -= 1, reinsert  |
//!     | ghost FIFO: keys only, no data  |                 +----------------------+
//!     | (~main's capacity)              |                                        | freq == 0
//!     +---------------------------------+                                        v
//!            | oldest falls off                                               evicted
//!            v
//!         forgotten
//!
//!   pinned entries: taken out of small/main while pinned, still counted in len()
//! ```
//!
//! Why this shape:
//! - **Scan resistance.** New keys land in the small FIFO and most one-hit
//!   wonders (a VM's sequential scan of its disk) leave it again without ever
//!   touching main, so a scan of any length only churns the small queue. Keys
//!   hit while in small were worth keeping and are promoted lazily, at the
//!   time they reach small's tail, which costs nothing on the hit path.
//! - **Ghost.** A key that fell out of small unhit but comes back soon after
//!   was evicted too early (its reuse distance exceeds small's size); the ghost
//!   remembers recently evicted keys so such a key goes straight to main.
//! - **Main** is a FIFO with reinsertion (CLOCK): a hit only bumps a 2-bit
//!   counter (saturating at 3), and the eviction scan gives each hit a second
//!   chance by decrementing it and reinserting at the head. Hits never move
//!   entries, so the hit path is a hash lookup and a byte write.
//! - **Pins.** Pinned entries (prefetched boot data) are unlinked from their
//!   queue while pinned, so the eviction scan never walks past them (keeping
//!   every operation amortised O(1) however many are pinned). They still count
//!   towards [`S3Fifo::len`]; the small/main split is computed over the
//!   unpinned room. On the last unpin an entry rejoins the head of the queue it
//!   was in, keeping its frequency.
//! - **Capacity is a hard bound.** If an insert needs room and every resident
//!   entry is pinned, the new key is refused (reported as evicted) rather than
//!   exceeding the capacity or scanning forever. Only [`S3Fifo::resize`] can
//!   leave more resident entries than capacity, and only when the pinned ones
//!   alone do not fit ([`S3Fifo::over_capacity`]); at that point nothing
//!   unpinned is resident, and an entry unpinned in that state is evicted at
//!   once ([`UnpinOutcome::Evicted`]).
//!
//! Layout: one slab of nodes holds resident and ghost entries alike, threaded
//! onto intrusive doubly linked lists by `u32` index (removal from the middle
//! of a queue is O(1), no tombstones), and one hash map from key to node. A key
//! therefore has at most one node, so it cannot be both resident and a ghost.

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, Hash, RandomState};

/// The largest capacity the policy accepts: node indices are `u32`, and the
/// slab holds resident entries plus up to ~90% as many ghosts.
pub const MAX_CAPACITY: usize = (u32::MAX / 4) as usize;

/// "No node": end of a list, empty free list.
const NIL: u32 = u32::MAX;
/// The frequency counter is 2 bits wide, as in the paper: enough to tell
/// "hit once" from "hot", small enough that a once-hot entry ages out of main
/// after at most three passes without hits.
const MAX_FREQ: u8 = 3;
/// A key leaving small's tail moves to main if it was hit at least this many
/// times while in small.
const PROMOTE_FREQ: u8 = 1;
/// Small's share of the (unpinned) capacity, in percent.
const SMALL_PERCENT: usize = 10;

/// Counters of what the policy has done since it was created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyStats {
    /// [`S3Fifo::access`] calls that found the key resident.
    pub hits: u64,
    /// [`S3Fifo::access`] calls that did not.
    pub misses: u64,
    /// Inserts of a key found in the ghost (a miss that the policy recognised
    /// as a recent eviction); such keys go straight to main.
    pub ghost_hits: u64,
    /// Resident keys evicted (by inserts, shrinking resizes, or an unpin while
    /// over capacity). Refused inserts and [`S3Fifo::remove`] are not counted.
    pub evictions: u64,
    /// Keys moved from small to main because they were hit while in small.
    pub promotions: u64,
    /// Inserts refused because every resident entry was pinned.
    pub refused: u64,
}

/// What [`S3Fifo::unpin`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum UnpinOutcome {
    /// The key is not resident or was not pinned; nothing changed.
    NotPinned,
    /// One pin was released; others remain, so the key is still pinned.
    StillPinned,
    /// The last pin was released; the key is resident and evictable again.
    Released,
    /// The last pin was released while the cache was over capacity (see
    /// [`S3Fifo::over_capacity`]), so the key was evicted at once: the caller
    /// must drop its data as for any other eviction.
    Evicted,
}

impl UnpinOutcome {
    /// Whether a pin was released (anything but [`UnpinOutcome::NotPinned`]).
    pub fn was_pinned(self) -> bool {
        self != Self::NotPinned
    }
}

/// Which queue a node belongs to. A pinned node keeps `Small` or `Main` (the
/// queue it rejoins on unpin) but is not linked into it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Loc {
    Small,
    Main,
    Ghost,
    Free,
}

#[derive(Clone, Copy, Debug)]
struct Node<K> {
    key: K,
    /// Towards the head (newer); `NIL` at the head.
    prev: u32,
    /// Towards the tail (older); `NIL` at the tail. Free-list link when free.
    next: u32,
    freq: u8,
    loc: Loc,
    pins: u32,
}

/// An intrusive FIFO over slab indices: insert at the head, evict at the tail.
#[derive(Clone, Copy, Debug)]
struct List {
    head: u32,
    tail: u32,
    len: usize,
}

impl List {
    const EMPTY: Self = Self {
        head: NIL,
        tail: NIL,
        len: 0,
    };

    fn push_head<K>(&mut self, nodes: &mut [Node<K>], i: u32) {
        let old = self.head;
        let node = &mut nodes[i as usize];
        node.prev = NIL;
        node.next = old;
        if old == NIL {
            self.tail = i;
        } else {
            nodes[old as usize].prev = i;
        }
        self.head = i;
        self.len += 1;
    }

    fn unlink<K>(&mut self, nodes: &mut [Node<K>], i: u32) {
        let Node { prev, next, .. } = nodes[i as usize];
        if prev == NIL {
            self.head = next;
        } else {
            nodes[prev as usize].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            nodes[next as usize].prev = prev;
        }
        let node = &mut nodes[i as usize];
        node.prev = NIL;
        node.next = NIL;
        self.len -= 1;
    }
}

/// S3-FIFO eviction policy with counted pins and online resize; see the
/// module documentation for the rules.
///
/// Every operation is amortised O(1): an eviction scan only walks past entries
/// whose counters it decrements (each paid for by an earlier hit) or that it
/// promotes (each paid for by its insert).
pub struct S3Fifo<K, S = RandomState> {
    /// Resident and ghost keys to their node.
    map: HashMap<K, u32, S>,
    nodes: Vec<Node<K>>,
    /// Head of the free-node list, threaded through `Node::next`.
    free: u32,
    small: List,
    main: List,
    ghost: List,
    /// Resident entries that are pinned (and so on no list).
    pinned: usize,
    capacity: usize,
    ghost_capacity: usize,
    stats: PolicyStats,
}

impl<K: Copy + Eq + Hash> S3Fifo<K> {
    /// An empty policy holding at most `capacity` resident keys.
    ///
    /// # Panics
    /// If `capacity` exceeds [`MAX_CAPACITY`].
    pub fn new(capacity: usize) -> Self {
        Self::with_hasher(capacity, RandomState::new())
    }
}

impl<K: Copy + Eq + Hash, S: BuildHasher> S3Fifo<K, S> {
    /// Like [`S3Fifo::new`] with a chosen hasher (slot ids need no DoS-proof
    /// hashing).
    ///
    /// # Panics
    /// If `capacity` exceeds [`MAX_CAPACITY`].
    pub fn with_hasher(capacity: usize, hasher: S) -> Self {
        assert!(
            capacity <= MAX_CAPACITY,
            "S3Fifo capacity {capacity} too large"
        );
        Self {
            map: HashMap::with_hasher(hasher),
            nodes: Vec::new(),
            free: NIL,
            small: List::EMPTY,
            main: List::EMPTY,
            ghost: List::EMPTY,
            pinned: 0,
            capacity,
            ghost_capacity: ghost_capacity(capacity),
            stats: PolicyStats::default(),
        }
    }

    /// The maximum number of resident keys.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The number of resident keys, pinned ones included.
    pub fn len(&self) -> usize {
        self.small.len + self.main.len + self.pinned
    }

    /// Whether no key is resident.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The number of resident keys that are pinned.
    pub fn pinned_len(&self) -> usize {
        self.pinned
    }

    /// The number of evicted keys remembered in the ghost queue.
    pub fn ghost_len(&self) -> usize {
        self.ghost.len
    }

    /// Whether more keys are resident than [`S3Fifo::capacity`] allows. Only
    /// happens after [`S3Fifo::resize`] shrank below the number of pinned
    /// keys; while it lasts every resident key is pinned and inserts are
    /// refused.
    pub fn over_capacity(&self) -> bool {
        self.len() > self.capacity
    }

    /// Whether `key` is resident.
    pub fn contains(&self, key: &K) -> bool {
        self.resident(key).is_some()
    }

    /// Whether `key` is resident and pinned.
    pub fn is_pinned(&self, key: &K) -> bool {
        self.resident(key)
            .is_some_and(|i| self.nodes[i as usize].pins > 0)
    }

    /// Whether `key` is remembered as recently evicted (not resident).
    pub fn in_ghost(&self, key: &K) -> bool {
        self.map
            .get(key)
            .is_some_and(|&i| self.nodes[i as usize].loc == Loc::Ghost)
    }

    /// Counters since creation.
    pub fn stats(&self) -> PolicyStats {
        self.stats
    }

    /// Records a lookup of `key`: if resident, counts a hit and bumps its
    /// frequency (saturating at 3); returns whether it was resident. Never
    /// moves entries or evicts.
    pub fn access(&mut self, key: K) -> bool {
        if let Some(i) = self.resident(&key) {
            let node = &mut self.nodes[i as usize];
            node.freq = (node.freq + 1).min(MAX_FREQ);
            self.stats.hits += 1;
            true
        } else {
            self.stats.misses += 1;
            false
        }
    }

    /// Makes `key` resident and returns the keys evicted to make room, oldest
    /// decision first. Convenience for [`S3Fifo::insert_into`].
    pub fn insert(&mut self, key: K) -> Vec<K> {
        let mut evicted = Vec::new();
        self.insert_into(key, &mut evicted);
        evicted
    }

    /// Makes `key` resident, appending the keys evicted to make room to
    /// `evicted` (reuse one buffer to stay allocation-free).
    ///
    /// A key found in the ghost goes straight to main; any other goes to
    /// small. The caller should insert only non-resident keys; inserting a
    /// resident key is treated as [`S3Fifo::access`] and evicts nothing.
    ///
    /// If room is needed and every resident key is pinned (or the capacity is
    /// 0), nothing can be evicted: the insert is **refused**, `key` itself is
    /// appended to `evicted` and stays non-resident, so the capacity holds and
    /// the caller drops the data it was about to cache.
    pub fn insert_into(&mut self, key: K, evicted: &mut Vec<K>) {
        if self.contains(&key) {
            self.access(key);
            return;
        }
        while self.len() >= self.capacity {
            if let Some(victim) = self.evict_one() {
                evicted.push(victim);
            } else {
                self.stats.refused += 1;
                evicted.push(key);
                return;
            }
        }
        // Look the ghost up only now: making room can push the ghost's
        // oldest entries out, possibly this key's.
        if let Some(&i) = self.map.get(&key) {
            debug_assert_eq!(self.nodes[i as usize].loc, Loc::Ghost);
            self.ghost.unlink(&mut self.nodes, i);
            let node = &mut self.nodes[i as usize];
            node.loc = Loc::Main;
            node.freq = 0;
            self.main.push_head(&mut self.nodes, i);
            self.stats.ghost_hits += 1;
        } else {
            let i = self.alloc(key, Loc::Small);
            self.map.insert(key, i);
            self.small.push_head(&mut self.nodes, i);
        }
    }

    /// Invalidates `key` (its cached data was overwritten or trimmed): drops
    /// it whether or not it is pinned, and forgets it from the ghost too.
    /// Returns whether it was resident. Not counted as an eviction.
    pub fn remove(&mut self, key: &K) -> bool {
        let Some(i) = self.map.remove(key) else {
            return false;
        };
        let node = self.nodes[i as usize];
        let resident = match node.loc {
            Loc::Ghost => {
                self.ghost.unlink(&mut self.nodes, i);
                false
            }
            _ if node.pins > 0 => {
                self.pinned -= 1;
                true
            }
            Loc::Small => {
                self.small.unlink(&mut self.nodes, i);
                true
            }
            Loc::Main => {
                self.main.unlink(&mut self.nodes, i);
                true
            }
            Loc::Free => unreachable!("mapped node is free"),
        };
        self.release(i);
        resident
    }

    /// Pins a resident `key` so it is never evicted until unpinned as many
    /// times as it was pinned. Returns whether `key` is resident (and so now
    /// pinned); a non-resident key cannot be pinned.
    pub fn pin(&mut self, key: &K) -> bool {
        let Some(i) = self.resident(key) else {
            return false;
        };
        let pins = self.nodes[i as usize].pins;
        if pins == 0 {
            // Off the queue entirely: the eviction scan never sees it.
            match self.nodes[i as usize].loc {
                Loc::Small => self.small.unlink(&mut self.nodes, i),
                Loc::Main => self.main.unlink(&mut self.nodes, i),
                Loc::Ghost | Loc::Free => unreachable!("resident node not in small/main"),
            }
            self.pinned += 1;
        }
        self.nodes[i as usize].pins = pins.saturating_add(1);
        true
    }

    /// Releases one pin of `key`. When the last pin goes, the key rejoins the
    /// head of the queue it was in with its frequency intact, unless the cache
    /// is over capacity, in which case it is evicted at once (it is then the
    /// only evictable key).
    pub fn unpin(&mut self, key: &K) -> UnpinOutcome {
        let Some(i) = self.resident(key) else {
            return UnpinOutcome::NotPinned;
        };
        let node = &mut self.nodes[i as usize];
        match node.pins {
            0 => return UnpinOutcome::NotPinned,
            1 => {}
            _ => {
                node.pins -= 1;
                return UnpinOutcome::StillPinned;
            }
        }
        node.pins = 0;
        let home = node.loc;
        self.pinned -= 1;
        // `len()` no longer counts this key.
        if self.len() >= self.capacity {
            debug_assert!(self.small.len == 0 && self.main.len == 0);
            self.map.remove(key);
            self.release(i);
            self.stats.evictions += 1;
            return UnpinOutcome::Evicted;
        }
        match home {
            Loc::Small => self.small.push_head(&mut self.nodes, i),
            Loc::Main => self.main.push_head(&mut self.nodes, i),
            Loc::Ghost | Loc::Free => unreachable!("pinned node not from small/main"),
        }
        UnpinOutcome::Released
    }

    /// Changes the capacity while serving and returns the keys evicted.
    /// Growing keeps everything; shrinking evicts unpinned keys by the usual
    /// rules until the new capacity holds. Pinned keys are never evicted: if
    /// they alone exceed the new capacity they all stay, every unpinned key
    /// goes, and [`S3Fifo::over_capacity`] reports it. The small/main split
    /// and the ghost's size follow the new capacity.
    ///
    /// # Panics
    /// If `capacity` exceeds [`MAX_CAPACITY`].
    pub fn resize(&mut self, capacity: usize) -> Vec<K> {
        assert!(
            capacity <= MAX_CAPACITY,
            "S3Fifo capacity {capacity} too large"
        );
        self.capacity = capacity;
        self.ghost_capacity = ghost_capacity(capacity);
        let mut evicted = Vec::new();
        while self.len() > self.capacity {
            match self.evict_one() {
                Some(victim) => evicted.push(victim),
                None => break,
            }
        }
        self.trim_ghost();
        evicted
    }

    /// The node of `key` if it is resident.
    fn resident(&self, key: &K) -> Option<u32> {
        let &i = self.map.get(key)?;
        (self.nodes[i as usize].loc != Loc::Ghost).then_some(i)
    }

    /// Small's target size: its share of the room pinned entries leave.
    fn small_target(&self) -> usize {
        let room = self.capacity.saturating_sub(self.pinned);
        (room * SMALL_PERCENT / 100).max(1)
    }

    /// Evicts one unpinned resident key, or returns `None` if there is none.
    fn evict_one(&mut self) -> Option<K> {
        loop {
            // Evict from small while it holds at least its share (or main is
            // empty); otherwise from main. This is what lets main keep the
            // hot set through a scan: the scan only ever fills small.
            if self.small.len > 0 && (self.small.len >= self.small_target() || self.main.len == 0) {
                let i = self.small.tail;
                self.small.unlink(&mut self.nodes, i);
                let node = &mut self.nodes[i as usize];
                if node.freq >= PROMOTE_FREQ {
                    // Lazy promotion: hit while in small, worth keeping. The
                    // frequency carries over (as in the paper's reference
                    // implementation), buying a first second chance in main.
                    node.loc = Loc::Main;
                    self.main.push_head(&mut self.nodes, i);
                    self.stats.promotions += 1;
                    continue;
                }
                let key = node.key;
                if self.ghost_capacity == 0 {
                    self.map.remove(&key);
                    self.release(i);
                } else {
                    node.loc = Loc::Ghost;
                    self.ghost.push_head(&mut self.nodes, i);
                    self.trim_ghost();
                }
                self.stats.evictions += 1;
                return Some(key);
            }
            if self.main.len == 0 {
                return None;
            }
            let i = self.main.tail;
            let node = &mut self.nodes[i as usize];
            if node.freq > 0 {
                // Second chance: every reinsertion spends one earlier hit, so
                // this loop terminates within 3 passes over main.
                node.freq -= 1;
                self.main.unlink(&mut self.nodes, i);
                self.main.push_head(&mut self.nodes, i);
                continue;
            }
            let key = node.key;
            self.main.unlink(&mut self.nodes, i);
            self.map.remove(&key);
            self.release(i);
            self.stats.evictions += 1;
            return Some(key);
        }
    }

    /// Forgets the oldest ghosts beyond the ghost's capacity.
    fn trim_ghost(&mut self) {
        while self.ghost.len > self.ghost_capacity {
            let i = self.ghost.tail;
            self.ghost.unlink(&mut self.nodes, i);
            let key = self.nodes[i as usize].key;
            self.map.remove(&key);
            self.release(i);
        }
    }

    fn alloc(&mut self, key: K, loc: Loc) -> u32 {
        let node = Node {
            key,
            prev: NIL,
            next: NIL,
            freq: 0,
            loc,
            pins: 0,
        };
        if self.free == NIL {
            let i = u32::try_from(self.nodes.len()).expect("node index fits u32 (MAX_CAPACITY)");
            self.nodes.push(node);
            i
        } else {
            let i = self.free;
            self.free = self.nodes[i as usize].next;
            self.nodes[i as usize] = node;
            i
        }
    }

    /// Returns an unlinked node to the free list. (The slab never shrinks:
    /// after a large shrink its free nodes are reused by later inserts.)
    fn release(&mut self, i: u32) {
        let node = &mut self.nodes[i as usize];
        node.loc = Loc::Free;
        node.pins = 0;
        node.prev = NIL;
        node.next = self.free;
        self.free = i;
    }
}

/// The ghost remembers about as many keys as main holds, as in the paper.
fn ghost_capacity(capacity: usize) -> usize {
    capacity - capacity * SMALL_PERCENT / 100
}

impl<K, S> fmt::Debug for S3Fifo<K, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Fifo")
            .field("capacity", &self.capacity)
            .field("small", &self.small.len)
            .field("main", &self.main.len)
            .field("pinned", &self.pinned)
            .field("ghost", &self.ghost.len)
            .field("ghost_capacity", &self.ghost_capacity)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests;

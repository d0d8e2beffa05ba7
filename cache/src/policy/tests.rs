use std::collections::{HashMap, HashSet, VecDeque};

use proptest::prelude::*;

use super::{Loc, S3Fifo, UnpinOutcome, NIL};

/// Walks every list and the map and checks they agree with each other and
/// with the counters.
fn check<K: Copy + Eq + std::hash::Hash + std::fmt::Debug>(p: &S3Fifo<K>) {
    let mut linked = HashSet::new();
    for (list, loc) in [
        (&p.small, Loc::Small),
        (&p.main, Loc::Main),
        (&p.ghost, Loc::Ghost),
    ] {
        let mut n = 0;
        let mut prev = NIL;
        let mut i = list.head;
        while i != NIL {
            let node = &p.nodes[i as usize];
            assert_eq!(node.loc, loc);
            assert_eq!(node.prev, prev);
            assert_eq!(node.pins, 0, "pinned node on a list");
            assert!(node.freq <= 3);
            assert_eq!(p.map.get(&node.key), Some(&i));
            assert!(linked.insert(i), "node on two lists");
            prev = i;
            i = node.next;
            n += 1;
        }
        assert_eq!(list.tail, prev);
        assert_eq!(list.len, n);
    }
    let pinned = p
        .map
        .values()
        .filter(|&&i| p.nodes[i as usize].pins > 0)
        .count();
    assert_eq!(pinned, p.pinned);
    assert_eq!(p.map.len(), linked.len() + pinned);
    let mut free = 0;
    let mut i = p.free;
    while i != NIL {
        assert_eq!(p.nodes[i as usize].loc, Loc::Free);
        free += 1;
        i = p.nodes[i as usize].next;
    }
    assert_eq!(free + p.map.len(), p.nodes.len());
    assert!(p.ghost.len <= p.ghost_capacity);
    assert!(p.len() <= p.capacity() || p.small.len + p.main.len == 0);
    assert_eq!(p.over_capacity(), p.len() > p.capacity());
}

fn freq(p: &S3Fifo<u64>, key: u64) -> u8 {
    p.nodes[p.map[&key] as usize].freq
}

fn loc(p: &S3Fifo<u64>, key: u64) -> Loc {
    p.nodes[p.map[&key] as usize].loc
}

/// Fills a fresh policy with keys `0..n`, none accessed.
fn filled(capacity: usize, n: u64) -> S3Fifo<u64> {
    let mut p = S3Fifo::new(capacity);
    for k in 0..n {
        assert!(p.insert(k).is_empty());
    }
    p
}

#[test]
fn new_policy_is_empty_and_fills_without_evicting() {
    let mut p = S3Fifo::<u64>::new(10);
    assert_eq!((p.capacity(), p.len(), p.is_empty()), (10, 0, true));
    for k in 0..10 {
        assert!(p.insert(k).is_empty());
        assert!(p.contains(&k));
    }
    assert_eq!(p.len(), 10);
    assert!(!p.over_capacity());
    check(&p);
}

#[test]
fn access_counts_hits_and_misses_and_saturates_freq() {
    let mut p = filled(10, 1);
    assert!(!p.access(7));
    for _ in 0..10 {
        assert!(p.access(0));
    }
    assert_eq!(freq(&p, 0), 3);
    let s = p.stats();
    assert_eq!((s.hits, s.misses), (10, 1));
}

#[test]
fn unaccessed_keys_leave_small_in_fifo_order_into_ghost() {
    let mut p = filled(10, 10);
    assert_eq!(p.insert(10), vec![0]);
    assert_eq!(p.insert(11), vec![1]);
    assert!(p.in_ghost(&0) && p.in_ghost(&1));
    assert!(!p.contains(&0));
    assert_eq!(p.stats().evictions, 2);
    check(&p);
}

#[test]
fn key_hit_in_small_is_promoted_to_main_lazily() {
    let mut p = filled(10, 10);
    p.access(0);
    assert_eq!(loc(&p, 0), Loc::Small, "promotion happens at eviction time");
    // 0 is small's tail but was hit: it moves to main and 1 is evicted.
    assert_eq!(p.insert(10), vec![1]);
    assert_eq!(loc(&p, 0), Loc::Main);
    assert_eq!(p.stats().promotions, 1);
    check(&p);
}

#[test]
fn ghost_hit_inserts_straight_into_main() {
    let mut p = filled(10, 10);
    assert_eq!(p.insert(10), vec![0]);
    assert!(p.in_ghost(&0));
    let evicted = p.insert(0);
    assert_eq!(evicted, vec![1]);
    assert_eq!(loc(&p, 0), Loc::Main);
    assert!(!p.in_ghost(&0), "a key is never both resident and a ghost");
    assert_eq!(p.stats().ghost_hits, 1);
    check(&p);
}

#[test]
fn main_reinserts_keys_with_freq_and_decrements() {
    // Capacity 10: small target 1. Put 0 and 1 in main via the ghost.
    let mut p = filled(10, 10);
    p.insert(10); // evicts 0 -> ghost
    p.insert(11); // evicts 1 -> ghost
    p.insert(0); // ghost hit -> main, evicts 2
    p.insert(1); // ghost hit -> main, evicts 3
    assert_eq!((loc(&p, 0), loc(&p, 1)), (Loc::Main, Loc::Main));
    p.access(0);
    p.access(0);
    // Drain small down below its target so eviction turns to main.
    for k in 4..12 {
        assert!(p.remove(&k));
    }
    assert_eq!(p.small.len, 0);
    // Main tail is 0 (freq 2): reinserted with freq 1, then 1 (freq 0) goes.
    p.resize(1);
    assert!(p.contains(&0) && !p.contains(&1));
    assert_eq!(freq(&p, 0), 1);
    // Main evictions do not go to the ghost.
    assert!(!p.in_ghost(&1));
    check(&p);
}

#[test]
fn hot_key_in_main_survives_three_passes_then_ages_out() {
    let mut p = filled(10, 10);
    p.insert(10); // 0 -> ghost
    p.insert(11); // 1 -> ghost
    p.insert(0); // main
    p.insert(1); // main
    for _ in 0..5 {
        p.access(0);
    }
    for k in 4..12 {
        p.remove(&k);
    }
    // Main (tail first): 0 (freq 3), 1 (freq 0); small is empty.
    assert_eq!(p.evict_one(), Some(1));
    assert_eq!(freq(&p, 0), 2, "one pass spent one hit");
    // Alone in main, 0 is reinserted until its hits are spent, then goes.
    assert_eq!(p.evict_one(), Some(0));
    assert_eq!(p.evict_one(), None);
    assert!(p.is_empty());
    check(&p);
}

#[test]
fn remove_drops_resident_pinned_and_ghost_keys() {
    let mut p = filled(10, 10);
    p.insert(10); // 0 -> ghost
    assert!(p.pin(&5));
    assert!(p.remove(&5), "invalidation overrides pins");
    assert!(!p.contains(&5) && !p.is_pinned(&5));
    assert_eq!(p.pinned_len(), 0);
    assert!(!p.remove(&0), "ghost key was not resident");
    assert!(!p.in_ghost(&0));
    assert!(p.remove(&3));
    assert!(!p.remove(&3));
    assert!(!p.remove(&99));
    assert_eq!(p.len(), 8);
    // Removed keys come back as plain misses into small.
    p.insert(0);
    assert_eq!(loc(&p, 0), Loc::Small);
    assert_eq!(p.stats().ghost_hits, 0);
    check(&p);
}

#[test]
fn pins_are_counted_and_pinned_keys_never_evicted() {
    let mut p = filled(4, 4);
    assert!(!p.pin(&9), "non-resident keys cannot be pinned");
    assert!(p.pin(&0));
    assert!(p.pin(&0));
    assert!(p.is_pinned(&0));
    for k in 10..100 {
        let evicted = p.insert(k);
        assert!(!evicted.contains(&0));
        check(&p);
    }
    assert_eq!(p.unpin(&0), UnpinOutcome::StillPinned);
    assert!(p.is_pinned(&0));
    assert_eq!(p.unpin(&0), UnpinOutcome::Released);
    assert!(!p.is_pinned(&0) && p.contains(&0));
    assert_eq!(p.unpin(&0), UnpinOutcome::NotPinned);
    assert!(!p.unpin(&12345).was_pinned());
    // Unpinned, unhit: it rejoined small's head and ages out normally.
    let mut gone = false;
    for k in 100..110 {
        gone |= p.insert(k).contains(&0);
    }
    assert!(gone);
    check(&p);
}

#[test]
fn unpin_keeps_frequency_and_queue() {
    let mut p = filled(10, 10);
    p.insert(10); // 0 -> ghost
    p.insert(0); // main
    p.access(0);
    p.pin(&0);
    assert_eq!(p.unpin(&0), UnpinOutcome::Released);
    assert_eq!((loc(&p, 0), freq(&p, 0)), (Loc::Main, 1));
    check(&p);
}

#[test]
fn insert_is_refused_when_everything_is_pinned() {
    let mut p = filled(3, 3);
    for k in 0..3 {
        p.pin(&k);
    }
    assert_eq!(
        p.insert(7),
        vec![7],
        "refused: the new key is its own eviction"
    );
    assert!(!p.contains(&7));
    assert_eq!(p.len(), 3);
    assert_eq!(p.stats().refused, 1);
    assert_eq!(p.stats().evictions, 0);
    check(&p);
    // One unpin makes room again.
    assert_eq!(p.unpin(&1), UnpinOutcome::Released);
    assert_eq!(p.insert(7), vec![1]);
    assert!(p.contains(&7));
    check(&p);
}

#[test]
fn zero_capacity_refuses_everything() {
    let mut p = S3Fifo::<u64>::new(0);
    assert_eq!(p.insert(1), vec![1]);
    assert!(p.is_empty());
    assert_eq!(p.ghost_len(), 0);
    check(&p);
}

#[test]
fn inserting_a_resident_key_is_an_access() {
    let mut p = filled(2, 2);
    assert!(p.insert(0).is_empty());
    assert_eq!(p.len(), 2);
    assert_eq!(freq(&p, 0), 1);
    assert_eq!(p.stats().hits, 1);
}

#[test]
fn resize_grow_keeps_everything_and_shrink_evicts_unpinned() {
    let mut p = filled(10, 10);
    assert!(p.resize(20).is_empty());
    assert_eq!((p.capacity(), p.len()), (20, 10));
    for k in 10..20 {
        assert!(p.insert(k).is_empty());
    }
    p.pin(&3);
    p.access(4);
    let evicted = p.resize(5);
    assert_eq!(evicted.len(), 15);
    assert!(!evicted.contains(&3));
    assert!(p.contains(&3) && p.contains(&4), "pinned and hot keys stay");
    assert_eq!(p.len(), 5);
    assert!(!p.over_capacity());
    assert!(p.ghost_len() <= 5);
    check(&p);
}

#[test]
fn resize_adjusts_small_main_split_and_ghost() {
    let mut p = S3Fifo::<u64>::new(1000);
    assert_eq!((p.small_target(), p.ghost_capacity), (100, 900));
    let _ = p.resize(50);
    assert_eq!((p.small_target(), p.ghost_capacity), (5, 45));
    // The split is over the room pins leave.
    let mut p = filled(100, 50);
    for k in 0..50 {
        p.pin(&k);
    }
    assert_eq!(p.small_target(), 5);
}

#[test]
fn shrinking_below_the_pinned_set_reports_over_capacity() {
    let mut p = filled(10, 10);
    for k in 0..6 {
        p.pin(&k);
    }
    let evicted = p.resize(4);
    assert_eq!(evicted.len(), 4);
    assert!((0..6).all(|k| p.contains(&k)));
    assert_eq!((p.len(), p.capacity()), (6, 4));
    assert!(p.over_capacity());
    assert_eq!(p.insert(99), vec![99]);
    check(&p);
    // Unpinning while over capacity evicts at once.
    assert_eq!(p.unpin(&0), UnpinOutcome::Evicted);
    assert!(!p.contains(&0));
    assert_eq!(p.stats().evictions, 5);
    assert!(p.remove(&1));
    assert_eq!(p.len(), 4);
    assert!(!p.over_capacity());
    // Exactly full, all pinned: an unpin now keeps the key.
    assert_eq!(p.unpin(&2), UnpinOutcome::Released);
    assert!(p.contains(&2));
    check(&p);
}

#[test]
fn ghost_is_bounded() {
    let mut p = S3Fifo::<u64>::new(100);
    for k in 0..10_000 {
        p.insert(k);
    }
    assert_eq!(p.ghost_len(), 90);
    assert!(p.nodes.len() <= 100 + 90 + 1);
    check(&p);
}

/// The minimal cache interface the scan test drives.
trait Sim {
    fn access(&mut self, key: u64) -> bool;
    fn insert(&mut self, key: u64);
    fn contains(&self, key: u64) -> bool;
}

impl Sim for S3Fifo<u64> {
    fn access(&mut self, key: u64) -> bool {
        S3Fifo::access(self, key)
    }
    fn insert(&mut self, key: u64) {
        S3Fifo::insert(self, key);
    }
    fn contains(&self, key: u64) -> bool {
        S3Fifo::contains(self, &key)
    }
}

/// Plain FIFO baseline (LRU behaves the same here: no hot key is reused
/// within `capacity` inserts during the scan).
struct Fifo {
    capacity: usize,
    queue: VecDeque<u64>,
    set: HashSet<u64>,
}

impl Sim for Fifo {
    fn access(&mut self, key: u64) -> bool {
        self.set.contains(&key)
    }
    fn insert(&mut self, key: u64) {
        if self.queue.len() == self.capacity {
            let old = self.queue.pop_front().unwrap();
            self.set.remove(&old);
        }
        self.queue.push_back(key);
        self.set.insert(key);
    }
    fn contains(&self, key: u64) -> bool {
        self.set.contains(&key)
    }
}

/// Capacity 1000, hot set of 200 keys warmed up, then a one-pass scan of
/// 20 000 new keys with one hot access every 10 scan keys (so each hot key
/// comes back every ~2 200 inserts, more than the capacity). Returns how many
/// hot keys are resident at the end and the hot hit ratio during the scan.
fn run_scan(c: &mut impl Sim) -> (usize, f64) {
    const HOT: u64 = 200;
    fn get(c: &mut impl Sim, k: u64) -> bool {
        let hit = c.access(k);
        if !hit {
            c.insert(k);
        }
        hit
    }
    for _ in 0..3 {
        for k in 0..HOT {
            get(c, k);
        }
    }
    let (mut hot_hits, mut hot_gets) = (0u32, 0u32);
    for i in 0..20_000u64 {
        get(c, 1_000_000 + i);
        if i % 10 == 9 {
            hot_gets += 1;
            hot_hits += u32::from(get(c, (i / 10) % HOT));
        }
    }
    let resident = (0..HOT).filter(|&k| c.contains(k)).count();
    (resident, f64::from(hot_hits) / f64::from(hot_gets))
}

#[test]
fn scan_resistance_keeps_the_hot_set() {
    let mut p = S3Fifo::<u64>::new(1000);
    let (resident, hit_ratio) = run_scan(&mut p);
    assert!(resident >= 180, "S3-FIFO kept only {resident}/200 hot keys");
    assert!(hit_ratio >= 0.9, "S3-FIFO hot hit ratio {hit_ratio}");
    assert!(p.len() <= 1000);
    check(&p);

    let mut fifo = Fifo {
        capacity: 1000,
        queue: VecDeque::new(),
        set: HashSet::new(),
    };
    let (resident, hit_ratio) = run_scan(&mut fifo);
    assert!(
        resident < 180,
        "FIFO baseline kept {resident}/200: the test proves nothing"
    );
    assert!(hit_ratio < 0.1, "FIFO baseline hot hit ratio {hit_ratio}");
}

#[derive(Clone, Debug)]
enum Op {
    Insert(u8),
    Access(u8),
    Remove(u8),
    Pin(u8),
    Unpin(u8),
    Resize(u8),
}

const KEYS: u8 = 40;

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0..KEYS).prop_map(Op::Insert),
        6 => (0..KEYS).prop_map(Op::Access),
        2 => (0..KEYS).prop_map(Op::Remove),
        2 => (0..KEYS).prop_map(Op::Pin),
        2 => (0..KEYS).prop_map(Op::Unpin),
        1 => (0..24u8).prop_map(Op::Resize),
    ]
}

/// The model: which keys are resident and how often each is pinned.
#[derive(Default)]
struct Model {
    resident: HashSet<u8>,
    pins: HashMap<u8, u32>,
}

impl Model {
    fn pinned(&self) -> usize {
        self.pins.len()
    }

    /// Applies evictions reported by the policy after checking each was
    /// resident and unpinned.
    fn evict(&mut self, evicted: &[u8]) -> Result<(), TestCaseError> {
        for k in evicted {
            prop_assert!(self.resident.remove(k), "evicted {} was not resident", k);
            prop_assert!(!self.pins.contains_key(k), "evicted pinned {}", k);
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn policy_matches_model(capacity in 0..24usize, ops in prop::collection::vec(op(), 1..300)) {
        let mut p = S3Fifo::<u8>::new(capacity);
        let mut m = Model::default();
        let mut evictions = 0u64;
        for op in ops {
            match op {
                Op::Insert(k) => {
                    let was = m.resident.contains(&k);
                    let evicted = p.insert(k);
                    if was {
                        prop_assert!(evicted.is_empty());
                    } else if evicted == [k] && !p.contains(&k) {
                        // Refused: only when pinned keys fill the capacity.
                        prop_assert!(m.pinned() >= p.capacity());
                        prop_assert!(m.resident.len() == m.pinned());
                    } else {
                        m.evict(&evicted)?;
                        evictions += evicted.len() as u64;
                        m.resident.insert(k);
                    }
                }
                Op::Access(k) => {
                    prop_assert_eq!(p.access(k), m.resident.contains(&k));
                }
                Op::Remove(k) => {
                    prop_assert_eq!(p.remove(&k), m.resident.remove(&k));
                    m.pins.remove(&k);
                    prop_assert!(!p.in_ghost(&k));
                }
                Op::Pin(k) => {
                    prop_assert_eq!(p.pin(&k), m.resident.contains(&k));
                    if m.resident.contains(&k) {
                        *m.pins.entry(k).or_default() += 1;
                    }
                }
                Op::Unpin(k) => {
                    let over = m.resident.len() > p.capacity();
                    let out = p.unpin(&k);
                    match m.pins.get_mut(&k) {
                        None => prop_assert_eq!(out, UnpinOutcome::NotPinned),
                        Some(n) if *n > 1 => {
                            *n -= 1;
                            prop_assert_eq!(out, UnpinOutcome::StillPinned);
                        }
                        Some(_) => {
                            m.pins.remove(&k);
                            if over {
                                prop_assert_eq!(out, UnpinOutcome::Evicted);
                                m.evict(&[k])?;
                                evictions += 1;
                            } else {
                                prop_assert_eq!(out, UnpinOutcome::Released);
                            }
                        }
                    }
                }
                Op::Resize(c) => {
                    let evicted = p.resize(usize::from(c));
                    m.evict(&evicted)?;
                    evictions += evicted.len() as u64;
                }
            }
            // Capacity holds unless the pinned keys alone exceed it, and
            // then nothing unpinned is resident.
            prop_assert!(p.len() <= p.capacity() || p.len() == m.pinned());
            prop_assert_eq!(p.over_capacity(), p.len() > p.capacity());
            prop_assert_eq!(p.len(), m.resident.len());
            prop_assert_eq!(p.pinned_len(), m.pinned());
            for k in 0..KEYS {
                prop_assert_eq!(p.contains(&k), m.resident.contains(&k), "key {}", k);
                prop_assert_eq!(p.is_pinned(&k), m.pins.contains_key(&k));
                prop_assert!(!(p.contains(&k) && p.in_ghost(&k)));
            }
            prop_assert_eq!(p.stats().evictions, evictions);
            check(&p);
        }
    }
}

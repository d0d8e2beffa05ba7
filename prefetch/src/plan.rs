//! Many profiles into one order, and that order into pushes.
//!
//! The score, in full: a chunk is in the consensus when at least half of
//! the profiles touched it (a chunk one boot of five read was that boot's
//! accident, not the volume's habit); chunks are ordered by the median
//! of their first-touch times over the profiles that touched them, ties
//! broken by more profiles first, then by more reads, then by position.
//! The median, not the mean: one slow boot (a fsck, a timeout) moves a
//! chunk's mean but not its median.

use std::collections::HashMap;

use crate::profile::{chunk_count, Profile};

/// The merged order of a volume's profiles.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Consensus {
    /// Chunk indexes, first needed first.
    pub chunks: Vec<u64>,
    /// Profiles merged.
    pub used: usize,
    /// Profiles left out: recorded with another chunk size or volume size
    /// (the volume was resized, or the profile is another volume's).
    pub ignored: usize,
}

/// Merges the profiles of one volume of `chunk_size`-byte chunks and
/// `volume_size` bytes (see the module docs for the score).
pub fn consensus(chunk_size: u32, volume_size: u64, profiles: &[Profile]) -> Consensus {
    #[derive(Default)]
    struct Seen {
        times: Vec<u32>,
        reads: u64,
    }
    let fits = |p: &&Profile| p.chunk_size == chunk_size && p.volume_size == volume_size;
    let used: Vec<&Profile> = profiles.iter().filter(fits).collect();
    let mut seen: HashMap<u64, Seen> = HashMap::new();
    for p in &used {
        for t in &p.touches {
            let s = seen.entry(t.chunk).or_default();
            s.times.push(t.at_ms);
            s.reads += u64::from(t.count);
        }
    }
    let n = used.len();
    let chunks_in_volume = chunk_count(chunk_size, volume_size);
    let mut ranked: Vec<(u32, usize, u64, u64)> = seen
        .into_iter()
        .filter(|(c, s)| 2 * s.times.len() >= n && *c < chunks_in_volume)
        .map(|(c, mut s)| {
            s.times.sort_unstable();
            let median = s.times[(s.times.len() - 1) / 2];
            (median, s.times.len(), s.reads, c)
        })
        .collect();
    ranked.sort_unstable_by(|a, b| {
        a.0.cmp(&b.0)
            .then(b.1.cmp(&a.1))
            .then(b.2.cmp(&a.2))
            .then(a.3.cmp(&b.3))
    });
    Consensus {
        chunks: ranked.into_iter().map(|r| r.3).collect(),
        used: n,
        ignored: profiles.len() - n,
    }
}

/// Limits of a push plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlanConfig {
    /// Bytes planned, at most (the tail of the order is left to demand
    /// reads and group pushes).
    pub budget: u64,
    /// Bytes in one range, at most: runs of consecutive chunks are pushed
    /// as one range up to this.
    pub max_range: u32,
}

impl Default for PlanConfig {
    fn default() -> Self {
        PlanConfig {
            budget: 256 << 20,
            max_range: 1 << 20,
        }
    }
}

/// Byte ranges `(offset, len)` to push, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub ranges: Vec<(u64, u32)>,
    pub bytes: u64,
}

impl Plan {
    /// The consensus order as ranges within `cfg` (a chunk larger than
    /// `max_range` is one range of its own).
    pub fn new(chunk_size: u32, volume_size: u64, order: &[u64], cfg: PlanConfig) -> Plan {
        let mut plan = Plan::default();
        let chunk = u64::from(chunk_size);
        for &c in order {
            let Some(offset) = c.checked_mul(chunk).filter(|&o| o < volume_size) else {
                continue;
            };
            let len = chunk.min(volume_size - offset);
            if plan.bytes + len > cfg.budget {
                break;
            }
            plan.bytes += len;
            if let Some(last) = plan.ranges.last_mut() {
                let end = last.0 + u64::from(last.1);
                if end == offset && u64::from(last.1) + len <= u64::from(cfg.max_range) {
                    last.1 += u32::try_from(len).expect("a chunk fits u32");
                    continue;
                }
            }
            plan.ranges
                .push((offset, u32::try_from(len).expect("a chunk fits u32")));
        }
        plan
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::Touch;

    fn profile(touches: &[(u64, u32)]) -> Profile {
        Profile {
            chunk_size: 4096,
            volume_size: 100 * 4096,
            touches: touches
                .iter()
                .map(|&(chunk, at_ms)| Touch {
                    chunk,
                    at_ms,
                    count: 1,
                })
                .collect(),
        }
    }

    #[test]
    fn profiles_merge_by_median_time_and_majority() {
        let a = profile(&[(1, 0), (2, 10), (3, 20), (9, 30)]);
        let b = profile(&[(2, 0), (1, 5), (3, 900), (8, 901)]);
        let c = profile(&[(1, 0), (2, 8), (3, 25)]);
        let other_size = Profile {
            volume_size: 4096,
            ..profile(&[(0, 0)])
        };
        let got = consensus(4096, 100 * 4096, &[a, b, c, other_size]);
        // 1: times 0, 5, 0 -> median 0; 2: 10, 0, 8 -> 8; 3: 20, 900, 25
        // -> 25 (the slow boot does not move it); 8 and 9: one of three.
        assert_eq!(got.chunks, [1, 2, 3]);
        assert_eq!((got.used, got.ignored), (3, 1));
    }

    #[test]
    fn one_profile_is_its_own_order() {
        let a = profile(&[(5, 0), (4, 0), (6, 3)]);
        // Equal times: position decides.
        assert_eq!(consensus(4096, 100 * 4096, &[a]).chunks, [4, 5, 6]);
        assert_eq!(consensus(4096, 100 * 4096, &[]), Consensus::default());
    }

    #[test]
    fn a_plan_joins_runs_and_stops_at_its_budget() {
        let cfg = PlanConfig {
            budget: 5 * 4096 + 100,
            max_range: 3 * 4096,
        };
        // Chunk 9 of a 9.5-chunk volume is half a chunk.
        let size = 9 * 4096 + 2048;
        let plan = Plan::new(4096, size, &[1, 2, 3, 4, 9, 7, 50, 8], cfg);
        assert_eq!(
            plan.ranges,
            [(4096, 3 * 4096), (4 * 4096, 4096), (9 * 4096, 2048)]
        );
        assert_eq!(plan.bytes, 4 * 4096 + 2048);
    }
}

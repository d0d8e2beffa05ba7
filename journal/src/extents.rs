//! A map of non-overlapping byte ranges to values, where a newer range
//! replaces whatever it overlaps: the journal's read-your-writes map and the
//! batch coalescer are both one.

use std::collections::BTreeMap;

/// A value that can describe the tail of its range: for data, the same
/// record `by` bytes further in.
pub(crate) trait Shift: Clone {
    #[must_use]
    fn shifted(&self, by: u64) -> Self;
}

/// Ranges `start..end` mapped to values; ranges never overlap.
#[derive(Clone, Debug)]
pub(crate) struct ExtentMap<V> {
    /// start -> (end, value)
    map: BTreeMap<u64, (u64, V)>,
}

impl<V> Default for ExtentMap<V> {
    fn default() -> Self {
        Self {
            map: BTreeMap::new(),
        }
    }
}

impl<V: Shift> ExtentMap<V> {
    /// Maps `start..end` to `value`, trimming or splitting what it overlaps;
    /// `displaced(start, end, old)` is told each overlapped part.
    pub(crate) fn insert(
        &mut self,
        start: u64,
        end: u64,
        value: V,
        mut displaced: impl FnMut(u64, u64, &V),
    ) {
        debug_assert!(start < end);
        // An extent starting before `start` may reach into the new range.
        if let Some((&s, (e, v))) = self.map.range_mut(..start).next_back() {
            let e0 = *e;
            if e0 > start {
                let v = v.clone();
                *e = start;
                displaced(start, e0.min(end), &v);
                if e0 > end {
                    self.map.insert(end, (e0, v.shifted(end - s)));
                }
            }
        }
        // Extents starting inside the new range.
        while let Some((&s, _)) = self.map.range(start..end).next() {
            let (e, v) = self.map.remove(&s).expect("just found");
            displaced(s, e.min(end), &v);
            if e > end {
                self.map.insert(end, (e, v.shifted(end - s)));
            }
        }
        self.map.insert(start, (end, value));
    }

    /// The parts of extents inside `start..end`, in order, clipped to it
    /// (values shifted to match).
    pub(crate) fn overlapping(&self, start: u64, end: u64) -> Vec<(u64, u64, V)> {
        let mut out = Vec::new();
        if let Some((&s, (e, v))) = self.map.range(..start).next_back() {
            if *e > start {
                out.push((start, (*e).min(end), v.shifted(start - s)));
            }
        }
        for (&s, (e, v)) in self.map.range(start..end) {
            out.push((s, (*e).min(end), v.clone()));
        }
        out
    }

    /// Removes the whole extents that start inside `start..end` and satisfy
    /// `pred`, returning their ranges in order.
    pub(crate) fn remove_starting_in(
        &mut self,
        start: u64,
        end: u64,
        pred: impl Fn(&V) -> bool,
    ) -> Vec<(u64, u64)> {
        let doomed: Vec<(u64, u64)> = self
            .map
            .range(start..end)
            .filter(|(_, (_, v))| pred(v))
            .map(|(&s, (e, _))| (s, *e))
            .collect();
        for (s, _) in &doomed {
            self.map.remove(s);
        }
        doomed
    }

    /// Every extent in order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, u64, &V)> {
        self.map.iter().map(|(&s, (e, v))| (s, *e, v))
    }

    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }
}

/// Merges touching or overlapping ranges of a sorted list.
pub(crate) fn merge_ranges(mut ranges: Vec<(u64, u64)>) -> Vec<std::ops::Range<u64>> {
    ranges.sort_unstable();
    let mut out: Vec<std::ops::Range<u64>> = Vec::with_capacity(ranges.len());
    for (s, e) in ranges {
        match out.last_mut() {
            Some(last) if s <= last.end => last.end = last.end.max(e),
            _ => out.push(s..e),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Debug, PartialEq)]
    struct Src(u32, u64);

    impl Shift for Src {
        fn shifted(&self, by: u64) -> Self {
            Src(self.0, self.1 + by)
        }
    }

    #[test]
    fn insert_splits_and_trims() {
        let mut m = ExtentMap::default();
        let mut gone = Vec::new();
        m.insert(0, 100, Src(1, 0), |s, e, v| gone.push((s, e, v.0)));
        m.insert(10, 20, Src(2, 0), |s, e, v| gone.push((s, e, v.0)));
        m.insert(90, 120, Src(3, 0), |s, e, v| gone.push((s, e, v.0)));
        m.insert(15, 95, Src(4, 0), |s, e, v| gone.push((s, e, v.0)));
        assert_eq!(
            gone,
            vec![
                (10, 20, 1),
                (90, 100, 1),
                (15, 20, 2),
                (20, 90, 1),
                (90, 95, 3)
            ]
        );
        let all: Vec<_> = m.iter().map(|(s, e, v)| (s, e, v.clone())).collect();
        assert_eq!(
            all,
            vec![
                (0, 10, Src(1, 0)),
                (10, 15, Src(2, 0)),
                (15, 95, Src(4, 0)),
                (95, 120, Src(3, 5)),
            ]
        );
        assert_eq!(
            m.overlapping(5, 16),
            vec![(5, 10, Src(1, 5)), (10, 15, Src(2, 0)), (15, 16, Src(4, 0))]
        );
        assert_eq!(m.remove_starting_in(0, 100, |v| v.0 == 4), vec![(15, 95)]);
        assert_eq!(m.len(), 3);
    }

    #[test]
    fn merges_ranges() {
        assert_eq!(
            merge_ranges(vec![(5, 6), (0, 2), (2, 3), (7, 9), (8, 10)]),
            vec![0..3, 5..6, 7..10]
        );
    }
}

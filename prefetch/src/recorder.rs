//! Recording a profile while a volume boots.

use std::collections::HashMap;
use std::time::Duration;

use crate::profile::{chunk_count, Profile, Touch, MAX_TOUCHES};

/// When a recording ends: whichever comes first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordWindow {
    /// From the attach.
    pub max: Duration,
    /// No read of a chunk not seen before for this long (the boot is done
    /// and the guest is idle, or busy in what it already read).
    pub quiet: Duration,
    /// Distinct chunks, at most.
    pub max_touches: usize,
}

impl Default for RecordWindow {
    fn default() -> Self {
        RecordWindow {
            max: Duration::from_secs(180),
            quiet: Duration::from_secs(20),
            max_touches: 1 << 16,
        }
    }
}

/// Collects a [`Profile`] from the reads of one attach. Times are since
/// the attach, given by the caller.
#[derive(Debug)]
pub struct Recorder {
    chunk_size: u32,
    volume_size: u64,
    window: RecordWindow,
    touches: Vec<Touch>,
    index: HashMap<u64, usize>,
    last_new: Duration,
    full: bool,
}

impl Recorder {
    /// `chunk_size` must be a power of two of at least 512 (the edge
    /// cache's chunk, reported by the origin at attach).
    pub fn new(chunk_size: u32, volume_size: u64, window: RecordWindow) -> Recorder {
        Recorder {
            chunk_size,
            volume_size,
            window: RecordWindow {
                max_touches: window.max_touches.min(MAX_TOUCHES),
                ..window
            },
            touches: Vec::new(),
            index: HashMap::new(),
            last_new: Duration::ZERO,
            full: false,
        }
    }

    /// A guest read of `len` bytes at `offset`, `at` after the attach.
    /// Reads after the window closed, and out-of-range parts, are ignored.
    pub fn note_read(&mut self, offset: u64, len: u64, at: Duration) {
        if len == 0 || self.is_done(at) {
            return;
        }
        let chunk = u64::from(self.chunk_size);
        let chunks = chunk_count(self.chunk_size, self.volume_size);
        let first = offset / chunk;
        let last = (offset.saturating_add(len - 1) / chunk).min(chunks.saturating_sub(1));
        let at_ms = u32::try_from(at.as_millis()).unwrap_or(u32::MAX);
        for c in first..=last {
            if let Some(&i) = self.index.get(&c) {
                let t = &mut self.touches[i];
                t.count = t.count.saturating_add(1);
                continue;
            }
            if self.touches.len() >= self.window.max_touches {
                self.full = true;
                return;
            }
            self.index.insert(c, self.touches.len());
            self.touches.push(Touch {
                chunk: c,
                at_ms,
                count: 1,
            });
            self.last_new = at;
        }
    }

    /// Whether the window has closed at `at`.
    pub fn is_done(&self, at: Duration) -> bool {
        self.full
            || at >= self.window.max
            || (!self.touches.is_empty() && at.saturating_sub(self.last_new) >= self.window.quiet)
    }

    /// Chunks recorded so far.
    pub fn len(&self) -> usize {
        self.touches.len()
    }

    pub fn is_empty(&self) -> bool {
        self.touches.is_empty()
    }

    /// The profile, or `None` if nothing was read.
    pub fn finish(self) -> Option<Profile> {
        if self.touches.is_empty() {
            return None;
        }
        Some(Profile {
            chunk_size: self.chunk_size,
            volume_size: self.volume_size,
            touches: self.touches,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn reads_become_first_touches_until_the_reads_go_quiet() {
        let window = RecordWindow {
            max: Duration::from_secs(60),
            quiet: Duration::from_secs(5),
            max_touches: 100,
        };
        let mut r = Recorder::new(4096, 10 * 4096 + 1, window);
        r.note_read(4096 * 3 + 10, 4096, 2 * MS); // chunks 3 and 4
        r.note_read(4096 * 3, 1, 3 * MS); // 3 again
        r.note_read(4096 * 10, 100, 4 * MS); // the short last chunk, clipped
        r.note_read(0, 0, 5 * MS); // nothing
        assert!(!r.is_done(4 * MS + Duration::from_secs(4)));
        assert!(r.is_done(4 * MS + Duration::from_secs(5)));
        r.note_read(0, 4096, Duration::from_secs(10)); // after the window
        let p = r.finish().unwrap();
        p.validate().unwrap();
        let got: Vec<_> = p
            .touches
            .iter()
            .map(|t| (t.chunk, t.at_ms, t.count))
            .collect();
        assert_eq!(got, [(3, 2, 2), (4, 2, 1), (10, 4, 1)]);
    }

    #[test]
    fn a_full_recorder_stops_and_an_empty_one_has_no_profile() {
        let window = RecordWindow {
            max_touches: 2,
            ..RecordWindow::default()
        };
        let mut r = Recorder::new(512, 1 << 20, window);
        assert!(!r.is_done(Duration::from_secs(100)));
        r.note_read(0, 512 * 5, MS);
        assert!(r.is_done(MS));
        assert_eq!(r.len(), 2);
        assert!(Recorder::new(512, 1 << 20, window).finish().is_none());
        let mut beyond = Recorder::new(512, 1024, window);
        beyond.note_read(1 << 30, 512, MS);
        assert!(beyond.finish().is_none());
    }
}

//! What the guest may read: a history per block, and what the origin's
//! image must be.
//!
//! Every block the workload writes carries its write's id and the block's
//! number, followed by a pattern derived from both, so a read names the
//! write it returns (and a torn or misplaced block is caught). Zeroes (trim,
//! write-zeroes) read as all-zero blocks. The workload never has two
//! operations on one block in flight, so each block's history is a line.
//!
//! Per block the model keeps the newest *durable* write (completed with FUA,
//! or completed before a FLUSH that completed) and the writes issued after
//! it. Without a crash, a read must return the newest completed write.
//! After an edge crash it may return the durable one or any issued after it
//! (those may or may not have reached the journal's disk); the first read
//! after the crash settles which, and from then on that one only.

use std::collections::BTreeMap;

/// Bytes per block of the workload.
pub const BLOCK: usize = 4096;

/// Ids of zero writes have this bit set.
const ZERO_BIT: u64 = 1 << 63;

/// The content of `block` as write `id` leaves it (id 0: the base image).
pub fn block_content(id: u64, block: u64) -> Vec<u8> {
    if id & ZERO_BIT != 0 {
        return vec![0; BLOCK];
    }
    let mut out = Vec::with_capacity(BLOCK);
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(&block.to_le_bytes());
    let mut x = (id ^ block.rotate_left(32)).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    while out.len() < BLOCK {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(BLOCK);
    out
}

/// What a read of `block` returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    Write(u64),
    Zero,
}

/// Names the write a block's bytes come from, or says why they cannot.
pub fn decode(block: u64, bytes: &[u8]) -> Result<Seen, String> {
    if bytes.iter().all(|&b| b == 0) {
        return Ok(Seen::Zero);
    }
    let id = u64::from_le_bytes(bytes[..8].try_into().expect("a block"));
    if id & ZERO_BIT != 0 || block_content(id, block) != bytes {
        return Err(format!(
            "block {block} holds bytes no write produced (torn, misplaced or corrupt; header id {id:#x})"
        ));
    }
    Ok(Seen::Write(id))
}

pub fn zero_id(n: u64) -> u64 {
    n | ZERO_BIT
}

fn matches(id: u64, seen: Seen) -> bool {
    match seen {
        Seen::Zero => id & ZERO_BIT != 0,
        Seen::Write(w) => w == id,
    }
}

#[derive(Clone, Debug)]
struct BlockState {
    durable: u64,
    /// Writes issued after `durable`, oldest first.
    since: Vec<u64>,
    /// What a read may return now.
    current: Vec<u64>,
    busy: bool,
}

/// The guest's view. See the module docs.
#[derive(Debug)]
pub struct GuestModel {
    blocks: Vec<BlockState>,
    /// Flushes in flight: per block, the newest completed write when the
    /// flush was issued.
    flushes: BTreeMap<u64, Vec<Option<u64>>>,
    next_id: u64,
}

impl GuestModel {
    pub fn new(blocks: usize) -> Self {
        GuestModel {
            blocks: vec![
                BlockState {
                    durable: 0,
                    since: Vec::new(),
                    current: vec![0],
                    busy: false,
                };
                blocks
            ],
            flushes: BTreeMap::new(),
            next_id: 1,
        }
    }

    pub fn blocks(&self) -> usize {
        self.blocks.len()
    }

    pub fn busy(&self, block: usize) -> bool {
        self.blocks[block].busy
    }

    pub fn set_busy(&mut self, blocks: std::ops::Range<usize>, busy: bool) {
        for b in blocks {
            self.blocks[b].busy = busy;
        }
    }

    /// A new write id (or zero-write id).
    pub fn new_id(&mut self, zero: bool) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        if zero {
            zero_id(id)
        } else {
            id
        }
    }

    pub fn write_issued(&mut self, blocks: std::ops::Range<usize>, id: u64) {
        for b in blocks {
            self.blocks[b].since.push(id);
        }
    }

    pub fn write_done(&mut self, blocks: std::ops::Range<usize>, id: u64, ok: bool, fua: bool) {
        for b in blocks {
            let s = &mut self.blocks[b];
            if ok {
                s.current = vec![id];
                if fua {
                    Self::make_durable(s, id);
                }
            } else if !s.current.contains(&id) {
                // A failed write may still have reached the journal.
                s.current.push(id);
            }
        }
    }

    fn make_durable(s: &mut BlockState, id: u64) {
        if let Some(i) = s.since.iter().position(|&w| w == id) {
            s.durable = id;
            s.since.drain(..=i);
        }
    }

    pub fn flush_issued(&mut self, flush: u64) {
        let snap = self
            .blocks
            .iter()
            .map(|s| match s.current.as_slice() {
                [id] => Some(*id),
                _ => None,
            })
            .collect();
        self.flushes.insert(flush, snap);
    }

    pub fn flush_done(&mut self, flush: u64, ok: bool) {
        let Some(snap) = self.flushes.remove(&flush) else {
            return;
        };
        if !ok {
            return;
        }
        for (s, id) in self.blocks.iter_mut().zip(snap) {
            if let Some(id) = id {
                Self::make_durable(s, id);
            }
        }
    }

    /// Checks a completed read of `block`.
    pub fn read_done(&mut self, block: usize, seen: Seen) -> Result<(), String> {
        let s = &mut self.blocks[block];
        let Some(&id) = s.current.iter().find(|&&id| matches(id, seen)) else {
            return Err(format!(
                "block {block} read {seen:?}; it may only be one of {:?} (durable {}, issued since {:?})",
                s.current, s.durable, s.since
            ));
        };
        if s.current.len() > 1 {
            // Settled: the writes after the one seen are lost for good.
            s.current = vec![id];
            if id == s.durable {
                s.since.clear();
            } else if let Some(i) = s.since.iter().position(|&w| w == id) {
                s.since.truncate(i + 1);
            }
        }
        Ok(())
    }

    /// The edge crashed: what was not durable may or may not be there.
    pub fn crash(&mut self) {
        for s in &mut self.blocks {
            let mut c = vec![s.durable];
            c.extend(s.since.iter().copied());
            s.current = c;
            s.busy = false;
        }
        self.flushes.clear();
    }

    /// The one value each block must hold once everything settled, if the
    /// model knows it.
    pub fn settled(&self, block: usize) -> Option<u64> {
        match self.blocks[block].current.as_slice() {
            [id] => Some(*id),
            _ => None,
        }
    }

    pub fn matches(id: u64, seen: Seen) -> bool {
        matches(id, seen)
    }
}

//! Sender-side scheduling and flow control, sans-IO.
//!
//! The [`Scheduler`] holds encoded frames in three queues. The socket loop
//! asks it for the next frame whenever the socket can take one
//! ([`Scheduler::poll_transmit`]) and feeds it the peer's `Credit`
//! messages ([`Scheduler::on_credit`]):
//!
//! ```text
//!   queue(id, Demand, control msg) ─> [ control FIFO ]──────────┐ first
//!   queue(id, Demand, data msg)                                 │
//!     └─ split ≤ DEMAND_DATA_CUT ──> [ per-id FIFOs ]───────────┤ then, round-robin
//!   queue(id, Background, msg)                                  ├──> poll_transmit
//!     └─ split ≤ max_background_data ─> [ per-id FIFOs ]────────┘ round-robin by id,
//!                                              ^                  only while credit
//!   on_credit(bytes) ──────────────────── credit ┘                and budget cover it
//! ```
//!
//! Control messages (everything without bulk data: acks, credit,
//! heartbeats, requests, errors) never wait behind data. Demand data
//! (read replies) is cut at [`DEMAND_DATA_CUT`] and served round-robin by
//! request, so a small read's reply overtakes a large one's tail.
//!
//! Background data is cut into frames of at most `max_background_data`
//! bytes, so a demand frame queued behind a background one that is already
//! being written waits for at most that one frame (provided the socket loop
//! takes a frame only when the socket can accept one, rather than draining
//! the scheduler into a big write buffer). Background frames leave
//! only while the peer's credit covers their whole encoded size, so a
//! prefetch stream can never fill the socket buffers (or the peer's memory)
//! ahead of demand replies.
//!
//! On the receiving side, [`CreditGranter`] counts the background bytes
//! that arrive and are consumed, and says when to send `Credit`.
//!
//! Credit is counted in whole encoded frames (header included, compressed
//! size if compressed) on both sides: that is what occupies socket buffers,
//! both ends see the same number without decoding, and no frame is free.

use std::collections::{HashMap, VecDeque};

use bytes::{Bytes, BytesMut};

use super::frame::{Class, CompressOptions, Encoder, FrameHeader};
use super::message::{
    Kind, Message, WriteEntry, DATA_ENTRY_OVERHEAD, DATA_MESSAGE_OVERHEAD, WRITE_BATCH_OVERHEAD,
    ZERO_ENTRY_LEN,
};
use super::{ProtoError, HEADER_LEN, MAX_DATA_LEN, MAX_WRITE_ENTRIES};

/// The default cut of background data: 64 KiB per frame (5 ms at
/// 100 Mbit/s: what a demand frame may wait behind in ferry's queues).
pub const DEFAULT_BACKGROUND_DATA: usize = 64 << 10;

/// Bytes of a background message besides its data, at most (a `Push`'s
/// or a `WriteBatch`'s fields).
const FRAME_OVERHEAD: usize = if WRITE_BATCH_OVERHEAD > DATA_MESSAGE_OVERHEAD {
    WRITE_BATCH_OVERHEAD
} else {
    DATA_MESSAGE_OVERHEAD
};

/// The encoded entries of one write-batch part, at most: a protocol
/// constant (see [`split_batch`]).
pub const WRITE_PART_MAX: usize = 64 << 10;

/// Demand data (read replies) is cut at this size, so replies interleave.
pub const DEMAND_DATA_CUT: usize = 256 << 10;

/// The smallest background cut the scheduler accepts.
pub const MIN_BACKGROUND_DATA: usize = 4096;

/// The default credit window: 8 MiB in flight, enough for about 650 Mbit/s
/// of background data at 100 ms RTT.
pub const DEFAULT_WINDOW: u64 = 8 << 20;

/// Scheduler settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Background `Push`, `ReadData` and `WriteBatch` messages are cut into
    /// frames carrying at most this many data bytes (clamped to
    /// [`MIN_BACKGROUND_DATA`]..=[`MAX_DATA_LEN`]).
    pub max_background_data: usize,
    /// Compression for every frame queued.
    pub compress: CompressOptions,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            max_background_data: DEFAULT_BACKGROUND_DATA,
            compress: CompressOptions::default(),
        }
    }
}

/// One encoded frame for the socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    pub header: FrameHeader,
    /// The whole frame, header included.
    pub frame: Bytes,
}

/// The sender side of the link's scheduling: priorities, cutting and
/// credit. Frames are encoded (and compressed) when queued, so their cost
/// in credit is known exactly.
#[derive(Debug)]
pub struct Scheduler {
    encoder: Encoder,
    max_background_data: usize,
    out: BytesMut,
    control: VecDeque<Transmit>,
    /// Demand data frames per request id.
    demand: RoundRobin,
    /// Background frames per request id, each FIFO so a prefetch's
    /// `PrefetchDone` stays behind its `Push`es.
    background: RoundRobin,
    credit: u64,
    queued_bytes: [usize; 2],
}

/// FIFOs per request id, served in turn.
#[derive(Debug, Default)]
struct RoundRobin {
    fifos: HashMap<u64, VecDeque<Transmit>>,
    /// The order ids take turns in.
    rotation: VecDeque<u64>,
}

impl RoundRobin {
    fn push(&mut self, id: u64, frames: Vec<Transmit>) {
        let fifo = self.fifos.entry(id).or_default();
        if fifo.is_empty() {
            self.rotation.push_back(id);
        }
        fifo.extend(frames);
    }

    /// The next frame's length, if any.
    fn peek_len(&self) -> Option<usize> {
        let id = self.rotation.front()?;
        self.fifos.get(id)?.front().map(|t| t.frame.len())
    }

    fn pop(&mut self) -> Option<Transmit> {
        let id = self.rotation.pop_front()?;
        let fifo = self.fifos.get_mut(&id)?;
        let t = fifo.pop_front();
        if fifo.is_empty() {
            self.fifos.remove(&id);
        } else {
            self.rotation.push_back(id);
        }
        t
    }

    fn is_empty(&self) -> bool {
        self.rotation.is_empty()
    }
}

impl Scheduler {
    pub fn new(config: SchedulerConfig) -> Self {
        Scheduler {
            encoder: Encoder::new(config.compress),
            max_background_data: config
                .max_background_data
                .clamp(MIN_BACKGROUND_DATA, MAX_DATA_LEN),
            out: BytesMut::new(),
            control: VecDeque::new(),
            demand: RoundRobin::default(),
            background: RoundRobin::default(),
            credit: 0,
            queued_bytes: [0; 2],
        }
    }

    /// The largest background frame this scheduler produces. The peer's
    /// credit window must be at least twice this (see [`CreditGranter`]),
    /// or background traffic may stall for good.
    pub fn max_background_frame_len(&self) -> usize {
        HEADER_LEN + FRAME_OVERHEAD + self.max_background_data.max(WRITE_PART_MAX)
    }

    /// The cut of background data for `msg`: write-batch parts are cut by
    /// the edge at [`WRITE_PART_MAX`] whatever the scheduler's setting (a
    /// part number must mean the same bytes on every connection).
    fn background_limit(&self, msg: &Message) -> usize {
        if msg.kind() == Kind::WriteBatch {
            self.max_background_data.max(WRITE_PART_MAX)
        } else {
            self.max_background_data
        }
    }

    /// Encodes `msg` and queues it.
    ///
    /// Data messages are cut when they would not fit one frame: in the
    /// background class at `max_background_data`, in the demand class at
    /// [`MAX_DATA_LEN`]. `ReadData` and `Push` become several messages at
    /// consecutive offsets; a `WriteBatch` queued whole (part 0, last)
    /// becomes parts 0, 1, ... with `last` on the final one. `Credit` always
    /// goes out as demand: a grant waiting for credit would deadlock the
    /// link.
    ///
    /// Order is kept per id within a class (a prefetch's `PrefetchDone`
    /// follows its `Push`es), not across classes: a demand `Error` for a
    /// prefetch may overtake that prefetch's queued pushes.
    ///
    /// On error nothing was queued.
    pub fn queue(&mut self, id: u64, class: Class, msg: Message) -> Result<(), ProtoError> {
        let class = if msg.kind() == Kind::Credit {
            Class::Demand
        } else {
            class
        };
        let limit = match class {
            Class::Demand if msg.kind() == Kind::WriteBatch => MAX_DATA_LEN,
            Class::Demand => DEMAND_DATA_CUT,
            Class::Background => self.background_limit(&msg),
        };
        let data = is_data(&msg);
        let pieces = split(msg, limit)?;
        let mut frames = Vec::with_capacity(pieces.len());
        for piece in &pieces {
            let header = self.encoder.encode(id, class, piece, &mut self.out)?;
            let frame = self.out.split().freeze();
            if class == Class::Background
                && header.wire_len > HEADER_LEN + FRAME_OVERHEAD + self.background_limit(piece)
            {
                return Err(ProtoError::BackgroundFrameTooLarge {
                    kind: header.kind,
                    len: header.wire_len as u64,
                    max: (HEADER_LEN + FRAME_OVERHEAD + self.background_limit(piece)) as u64,
                });
            }
            frames.push(Transmit { header, frame });
        }
        let bytes: usize = frames.iter().map(|t| t.frame.len()).sum();
        self.queued_bytes[usize::from(class.code())] += bytes;
        match class {
            Class::Demand if !data => self.control.extend(frames),
            Class::Demand => self.demand.push(id, frames),
            Class::Background => self.background.push(id, frames),
        }
        Ok(())
    }

    /// The peer granted `bytes` more background credit.
    pub fn on_credit(&mut self, bytes: u64) {
        self.credit = self.credit.saturating_add(bytes);
    }

    /// The next frame to write, if any may go now: any demand frame first;
    /// otherwise the next background id's head frame, if the credit covers
    /// it. `None` with background frames still queued means waiting for
    /// credit ([`Scheduler::is_blocked_on_credit`]).
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.poll_transmit_within(u64::MAX)
    }

    /// Like [`Scheduler::poll_transmit`], with background frames also held
    /// to `budget` bytes (the sender's congestion window left).
    pub fn poll_transmit_within(&mut self, budget: u64) -> Option<Transmit> {
        if let Some(t) = self.control.pop_front().or_else(|| self.demand.pop()) {
            self.queued_bytes[0] -= t.frame.len();
            return Some(t);
        }
        let cost = self.background.peek_len()? as u64;
        // Head-of-line on purpose: skipping to a smaller frame of another id
        // could starve a large one forever.
        if cost > self.credit || cost > budget {
            return None;
        }
        self.credit -= cost;
        let t = self.background.pop()?;
        self.queued_bytes[1] -= t.frame.len();
        Some(t)
    }

    /// Whether [`Scheduler::poll_transmit_within`] with this budget would
    /// yield a frame now.
    pub fn ready_within(&self, budget: u64) -> bool {
        !self.control.is_empty()
            || !self.demand.is_empty()
            || self
                .background
                .peek_len()
                .is_some_and(|len| len as u64 <= self.credit.min(budget))
    }

    /// Background credit left.
    pub fn credit(&self) -> u64 {
        self.credit
    }

    /// Encoded bytes queued in `class`. A producer of background data (the
    /// origin reading a prefetch from disk) should pause while this is high:
    /// frames are encoded when queued, so the queue is memory.
    pub fn queued_bytes(&self, class: Class) -> usize {
        self.queued_bytes[usize::from(class.code())]
    }

    /// Nothing queued in either class.
    pub fn is_empty(&self) -> bool {
        self.control.is_empty() && self.demand.is_empty() && self.background.is_empty()
    }

    /// Background frames are queued, no demand frame is, and the next
    /// background frame needs more credit than is left.
    pub fn is_blocked_on_credit(&self) -> bool {
        self.control.is_empty()
            && self.demand.is_empty()
            && self
                .background
                .peek_len()
                .is_some_and(|len| len as u64 > self.credit)
    }
}

/// Whether a message carries bulk data (and so queues behind control).
fn is_data(msg: &Message) -> bool {
    matches!(
        msg.kind(),
        Kind::ReadData | Kind::ReadSignatures | Kind::ExtentMap | Kind::Push | Kind::WriteBatch
    )
}

/// A batch's entries cut into parts whose encoded entries take at most
/// `part_bytes` each (entries cut where they straddle a boundary), the same way
/// every time: what the edge ships as parts 0, 1, ...
pub fn split_batch(entries: Vec<WriteEntry>, part_bytes: usize) -> Vec<Vec<WriteEntry>> {
    let limit = part_bytes.max(MIN_BACKGROUND_DATA);
    if !needs_split(&entries, limit) {
        return vec![entries];
    }
    split_entries(entries, limit)
}

/// Cuts a data message so each piece carries at most `limit` data bytes;
/// other messages pass through whole.
fn split(msg: Message, limit: usize) -> Result<Vec<Message>, ProtoError> {
    match msg {
        Message::ReadData {
            offset,
            as_of,
            data,
        } if data.len() > limit => Ok(cut(offset, data, limit)
            .map(|(offset, data)| Message::ReadData {
                offset,
                as_of,
                data,
            })
            .collect()),
        Message::Push {
            offset,
            as_of,
            data,
        } if data.len() > limit => Ok(cut(offset, data, limit)
            .map(|(offset, data)| Message::Push {
                offset,
                as_of,
                data,
            })
            .collect()),
        Message::WriteBatch {
            seq,
            part,
            last,
            entries,
        } if needs_split(&entries, limit) => {
            if part != 0 || !last {
                return Err(ProtoError::UnsplittableBatch { seq, part });
            }
            let parts = split_entries(entries, limit);
            let count = parts.len();
            let mut out = Vec::with_capacity(count);
            for (i, entries) in parts.into_iter().enumerate() {
                out.push(Message::WriteBatch {
                    seq,
                    part: u32::try_from(i).map_err(|_| ProtoError::UnsplittableBatch {
                        seq,
                        part: u32::MAX,
                    })?,
                    last: i + 1 == count,
                    entries,
                });
            }
            Ok(out)
        }
        other => Ok(vec![other]),
    }
}

/// `(offset, data)` cut into pieces of at most `limit` bytes. Offsets that
/// would wrap are left for `validate` to refuse.
fn cut(offset: u64, data: Bytes, limit: usize) -> impl Iterator<Item = (u64, Bytes)> {
    (0..data.len()).step_by(limit).map(move |at| {
        let end = (at + limit).min(data.len());
        (offset.wrapping_add(at as u64), data.slice(at..end))
    })
}

fn needs_split(entries: &[WriteEntry], limit: usize) -> bool {
    entries.len() > MAX_WRITE_ENTRIES || entries_len(entries) > limit
}

fn entries_len(entries: &[WriteEntry]) -> usize {
    entries
        .iter()
        .map(|e| match e {
            WriteEntry::Data { data, .. } => DATA_ENTRY_OVERHEAD + data.len(),
            WriteEntry::Zero { .. } => ZERO_ENTRY_LEN,
        })
        .sum()
}

/// Packs entries into parts whose encoded entries take at most `limit`
/// bytes, cutting data entries that straddle a boundary. `limit` is at
/// least [`MIN_BACKGROUND_DATA`], so every part has room for one entry and
/// some data.
fn split_entries(entries: Vec<WriteEntry>, limit: usize) -> Vec<Vec<WriteEntry>> {
    let mut parts = Vec::new();
    let mut cur = Vec::new();
    let mut used = 0;
    let mut flush = |cur: &mut Vec<WriteEntry>, used: &mut usize| {
        parts.push(std::mem::take(cur));
        *used = 0;
    };
    for entry in entries {
        match entry {
            WriteEntry::Zero { .. } => {
                if !cur.is_empty()
                    && (cur.len() == MAX_WRITE_ENTRIES || used + ZERO_ENTRY_LEN > limit)
                {
                    flush(&mut cur, &mut used);
                }
                used += ZERO_ENTRY_LEN;
                cur.push(entry);
            }
            WriteEntry::Data {
                mut offset,
                mut data,
            } => loop {
                let want = DATA_ENTRY_OVERHEAD + data.len().min(1);
                if !cur.is_empty() && (cur.len() == MAX_WRITE_ENTRIES || used + want > limit) {
                    flush(&mut cur, &mut used);
                }
                let n = data.len().min(limit - used - DATA_ENTRY_OVERHEAD);
                let piece = data.split_to(n);
                used += DATA_ENTRY_OVERHEAD + n;
                cur.push(WriteEntry::Data {
                    offset,
                    data: piece,
                });
                offset = offset.wrapping_add(n as u64);
                if data.is_empty() {
                    break;
                }
            },
        }
    }
    if !cur.is_empty() || parts.is_empty() {
        parts.push(cur);
    }
    parts
}

/// The receiver side of background flow control.
///
/// The peer may have at most `window` background bytes outstanding: sent
/// but not yet consumed here. Call [`CreditGranter::on_received`] for every
/// background frame that arrives (its `wire_len`) and
/// [`CreditGranter::on_consumed`] once its data is dealt with (stored in
/// the cache, say); [`CreditGranter::poll_grant`] then says when to send a
/// `Credit` and for how much. The first poll grants the whole window.
///
/// Grants go out once a quarter of the window is free again, so the
/// sender's largest background frame must be at most three quarters of the
/// window or it could wait forever; a window of at least twice
/// [`Scheduler::max_background_frame_len`] keeps frames flowing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreditGranter {
    window: u64,
    threshold: u64,
    granted: u64,
    received: u64,
    consumed: u64,
}

impl CreditGranter {
    pub fn new(window: u64) -> Self {
        CreditGranter {
            window,
            threshold: (window / 4).max(1),
            granted: 0,
            received: 0,
            consumed: 0,
        }
    }

    pub fn window(&self) -> u64 {
        self.window
    }

    /// A background frame of `wire_len` bytes arrived. An error means the
    /// peer sent more than it was granted: a protocol violation.
    pub fn on_received(&mut self, wire_len: u64) -> Result<(), ProtoError> {
        let received = self.received.saturating_add(wire_len);
        if received > self.granted {
            return Err(ProtoError::CreditExceeded {
                granted: self.granted,
                received,
            });
        }
        self.received = received;
        Ok(())
    }

    /// `bytes` of received background frames were dealt with and their
    /// room may be granted again. Clamped to what was received.
    pub fn on_consumed(&mut self, bytes: u64) {
        self.consumed = self.consumed.saturating_add(bytes).min(self.received);
    }

    /// Whether [`CreditGranter::poll_grant`] would grant now.
    pub fn grant_due(&self) -> bool {
        let free = self.window.saturating_sub(self.granted - self.consumed);
        free != 0 && free >= self.threshold
    }

    /// The credit to send now, if enough room came free to be worth a
    /// `Credit` message.
    pub fn poll_grant(&mut self) -> Option<u64> {
        // Granted but not consumed: what the peer may still send plus what
        // sits here unconsumed. Never above the window.
        let held = self.granted - self.consumed;
        let free = self.window.saturating_sub(held);
        if free == 0 || free < self.threshold {
            return None;
        }
        self.granted += free;
        Some(free)
    }

    /// Bytes the peer may still send without a new grant.
    pub fn outstanding(&self) -> u64 {
        self.granted - self.received
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::frame::Decoder;

    fn sched(max_background_data: usize) -> Scheduler {
        Scheduler::new(SchedulerConfig {
            max_background_data,
            compress: CompressOptions::disabled(),
        })
    }

    fn decode(t: &Transmit) -> (FrameHeader, Message) {
        let mut buf = BytesMut::from(&t.frame[..]);
        let got = Decoder::new().decode(&mut buf).unwrap().unwrap();
        assert!(buf.is_empty());
        assert_eq!(got.0, t.header);
        got
    }

    fn push(offset: u64, len: usize) -> Message {
        Message::Push {
            as_of: 0,
            offset,
            data: Bytes::from(vec![0xa5; len]),
        }
    }

    fn drain(s: &mut Scheduler) -> Vec<Transmit> {
        std::iter::from_fn(|| s.poll_transmit()).collect()
    }

    #[test]
    fn demand_overtakes_queued_background() {
        let mut s = sched(64 << 10);
        s.on_credit(u64::MAX);
        s.queue(1, Class::Background, push(0, 1 << 20)).unwrap();
        let first = s.poll_transmit().unwrap();
        assert_eq!(first.header.class, Class::Background);
        // Demand queued behind 15 background frames goes next.
        s.queue(
            2,
            Class::Demand,
            Message::Read {
                offset: 0,
                len: 4096,
                want_signatures: false,
            },
        )
        .unwrap();
        s.queue(3, Class::Demand, Message::Heartbeat { nanos: 7 })
            .unwrap();
        let next: Vec<_> = (0..2).map(|_| s.poll_transmit().unwrap()).collect();
        assert_eq!(next[0].header.id, 2);
        assert_eq!(next[1].header.id, 3);
        assert!(next.iter().all(|t| t.header.class == Class::Demand));
        let rest = drain(&mut s);
        assert_eq!(rest.len(), 15);
        assert!(rest.iter().all(|t| t.header.class == Class::Background));
        assert!(s.is_empty());
    }

    #[test]
    fn background_stalls_without_credit_and_resumes() {
        let mut s = sched(64 << 10);
        s.queue(5, Class::Background, push(0, 3 * (64 << 10)))
            .unwrap();
        s.queue(5, Class::Background, Message::PrefetchDone)
            .unwrap();
        assert_eq!(s.poll_transmit(), None);
        assert!(s.is_blocked_on_credit());

        // Demand still flows at zero credit.
        s.queue(9, Class::Demand, Message::BatchAck { seq: 1 })
            .unwrap();
        assert!(!s.is_blocked_on_credit());
        assert_eq!(s.poll_transmit().unwrap().header.id, 9);
        assert_eq!(s.poll_transmit(), None);

        let frame_len = (HEADER_LEN + DATA_MESSAGE_OVERHEAD + (64 << 10)) as u64;
        // One byte short of a frame: still stalled.
        s.on_credit(frame_len - 1);
        assert_eq!(s.poll_transmit(), None);
        s.on_credit(1);
        let t = s.poll_transmit().unwrap();
        assert_eq!(t.frame.len() as u64, frame_len);
        assert_eq!(s.credit(), 0);
        assert_eq!(s.poll_transmit(), None);

        s.on_credit(2 * frame_len + HEADER_LEN as u64);
        let rest = drain(&mut s);
        assert_eq!(rest.len(), 3);
        assert_eq!(decode(&rest[2]).1, Message::PrefetchDone);
        assert_eq!(s.credit(), 0);
        assert!(s.is_empty() && !s.is_blocked_on_credit());
    }

    #[test]
    fn large_push_is_split_and_reassembles() {
        let data: Vec<u8> = (0..(1 << 20) + 123)
            .map(|i: u32| (i * 7 % 251) as u8)
            .collect();
        let mut s = Scheduler::new(SchedulerConfig::default());
        s.on_credit(u64::MAX);
        s.queue(
            0,
            Class::Background,
            Message::Push {
                as_of: 0,
                offset: 1 << 30,
                data: Bytes::from(data.clone()),
            },
        )
        .unwrap();
        let frames = drain(&mut s);
        assert_eq!(frames.len(), data.len().div_ceil(DEFAULT_BACKGROUND_DATA));
        let mut got = Vec::new();
        for t in &frames {
            assert!(t.frame.len() <= s.max_background_frame_len());
            let (h, m) = decode(t);
            assert_eq!((h.id, h.class), (0, Class::Background));
            let Message::Push { offset, data, .. } = m else {
                panic!("not a push: {m:?}");
            };
            assert!(data.len() <= DEFAULT_BACKGROUND_DATA);
            assert_eq!(offset, (1 << 30) + got.len() as u64);
            got.extend_from_slice(&data);
        }
        assert_eq!(got, data);
    }

    #[test]
    fn demand_read_data_is_cut_and_replies_take_turns() {
        let mut s = sched(DEFAULT_BACKGROUND_DATA);
        let big = Bytes::from(vec![1; 3 * DEMAND_DATA_CUT + 10]);
        s.queue(
            4,
            Class::Demand,
            Message::ReadData {
                offset: 0,
                as_of: 7,
                data: big.clone(),
            },
        )
        .unwrap();
        // A small reply queued after the big one goes out after its first
        // piece, not after all of it; a control frame goes first of all.
        s.queue(
            5,
            Class::Demand,
            Message::ReadData {
                offset: 1 << 30,
                as_of: 7,
                data: Bytes::from_static(b"small"),
            },
        )
        .unwrap();
        s.queue(0, Class::Demand, Message::BatchAck { seq: 3 })
            .unwrap();
        let frames = drain(&mut s);
        let ids: Vec<_> = frames.iter().map(|t| t.header.id).collect();
        assert_eq!(ids, [0, 4, 5, 4, 4, 4]);
        let mut got = Vec::new();
        for t in frames.iter().filter(|t| t.header.id == 4) {
            let Message::ReadData {
                offset,
                as_of,
                data,
            } = decode(t).1
            else {
                panic!("not read data");
            };
            assert_eq!((offset, as_of), (got.len() as u64, 7));
            assert!(data.len() <= DEMAND_DATA_CUT);
            got.extend_from_slice(&data);
        }
        assert_eq!(got, big);
    }

    #[test]
    fn background_progresses_when_demand_is_idle_and_ids_take_turns() {
        let mut s = sched(MIN_BACKGROUND_DATA);
        s.on_credit(u64::MAX);
        s.queue(1, Class::Background, push(0, 3 * MIN_BACKGROUND_DATA))
            .unwrap();
        s.queue(1, Class::Background, Message::PrefetchDone)
            .unwrap();
        s.queue(2, Class::Background, push(1 << 20, 2 * MIN_BACKGROUND_DATA))
            .unwrap();
        s.queue(0, Class::Background, push(1 << 21, 10)).unwrap();
        let order: Vec<_> = drain(&mut s)
            .iter()
            .map(|t| (t.header.id, t.header.kind))
            .collect();
        assert_eq!(
            order,
            [
                (1, Kind::Push),
                (2, Kind::Push),
                (0, Kind::Push),
                (1, Kind::Push),
                (2, Kind::Push),
                (1, Kind::Push),
                (1, Kind::PrefetchDone),
            ]
        );
    }

    #[test]
    fn demand_waits_behind_at_most_one_background_frame() {
        // Interleave: after every background frame written, a demand frame
        // arrives; it must be the very next frame out.
        let mut s = sched(MIN_BACKGROUND_DATA);
        s.on_credit(u64::MAX);
        s.queue(1, Class::Background, push(0, 64 * MIN_BACKGROUND_DATA))
            .unwrap();
        for i in 0..64 {
            let t = s.poll_transmit().unwrap();
            assert_eq!(t.header.class, Class::Background);
            assert!(t.frame.len() <= s.max_background_frame_len());
            s.queue(100 + i, Class::Demand, Message::Heartbeat { nanos: i })
                .unwrap();
            assert_eq!(s.poll_transmit().unwrap().header.id, 100 + i);
        }
        assert!(s.is_empty());
    }

    #[test]
    fn credit_is_always_demand() {
        let mut s = sched(DEFAULT_BACKGROUND_DATA);
        s.queue(0, Class::Background, Message::Credit { bytes: 1 })
            .unwrap();
        let t = s.poll_transmit().unwrap();
        assert_eq!(t.header.class, Class::Demand);
    }

    #[test]
    fn oversized_unsplittable_background_frame_is_refused() {
        let mut s = sched(MIN_BACKGROUND_DATA);
        let sigs = vec![[0; 32]; 1000];
        let msg = Message::ReadSignatures {
            offset: 0,
            chunk_size: 4096,
            sigs,
        };
        assert!(matches!(
            s.queue(1, Class::Background, msg.clone()),
            Err(ProtoError::BackgroundFrameTooLarge {
                kind: Kind::ReadSignatures,
                ..
            })
        ));
        assert!(s.is_empty());
        s.queue(1, Class::Demand, msg).unwrap();
    }

    #[test]
    fn write_batch_is_split_into_parts_and_reassembles() {
        let mut entries = Vec::new();
        for i in 0..40u64 {
            entries.push(WriteEntry::Data {
                offset: i << 20,
                data: Bytes::from(vec![
                    u8::try_from(i).unwrap();
                    3000 + 97 * usize::try_from(i).unwrap()
                ]),
            });
            entries.push(WriteEntry::Zero {
                offset: (i << 20) + 65536,
                len: 4096,
            });
        }
        let mut s = sched(MIN_BACKGROUND_DATA * 2);
        s.on_credit(u64::MAX);
        s.queue(
            3,
            Class::Background,
            Message::WriteBatch {
                seq: 42,
                part: 0,
                last: true,
                entries: entries.clone(),
            },
        )
        .unwrap();
        let frames = drain(&mut s);
        assert!(frames.len() >= 3);
        let mut merged: Vec<WriteEntry> = Vec::new();
        for (i, t) in frames.iter().enumerate() {
            assert!(t.frame.len() <= s.max_background_frame_len());
            let Message::WriteBatch {
                seq,
                part,
                last,
                entries,
            } = decode(t).1
            else {
                panic!("not a write batch");
            };
            assert_eq!((seq, part as usize, last), (42, i, i + 1 == frames.len()));
            for e in entries {
                // Glue cut data entries back together.
                if let (
                    Some(WriteEntry::Data {
                        offset: po,
                        data: pd,
                    }),
                    WriteEntry::Data { offset, data },
                ) = (merged.last_mut(), &e)
                {
                    if *po + pd.len() as u64 == *offset {
                        let mut v = pd.to_vec();
                        v.extend_from_slice(data);
                        *pd = Bytes::from(v);
                        continue;
                    }
                }
                merged.push(e);
            }
        }
        assert_eq!(merged, entries);

        // A part of a batch the caller already split cannot be re-split.
        let err = s.queue(
            3,
            Class::Background,
            Message::WriteBatch {
                seq: 43,
                part: 1,
                last: false,
                entries,
            },
        );
        assert_eq!(err, Err(ProtoError::UnsplittableBatch { seq: 43, part: 1 }));
    }

    #[test]
    fn empty_batch_is_one_part() {
        let mut s = sched(MIN_BACKGROUND_DATA);
        s.queue(
            1,
            Class::Demand,
            Message::WriteBatch {
                seq: 1,
                part: 0,
                last: true,
                entries: vec![],
            },
        )
        .unwrap();
        assert_eq!(drain(&mut s).len(), 1);
    }

    #[test]
    fn granter_grants_window_then_refills_by_quarters() {
        let mut g = CreditGranter::new(1000);
        assert_eq!(g.poll_grant(), Some(1000));
        assert_eq!(g.poll_grant(), None);
        g.on_received(600).unwrap();
        assert_eq!(g.outstanding(), 400);
        g.on_consumed(200);
        assert_eq!(g.poll_grant(), None);
        g.on_consumed(100);
        assert_eq!(g.poll_grant(), Some(300));
        assert_eq!(g.outstanding(), 700);
        // Consuming more than received is clamped.
        g.on_consumed(10_000);
        assert_eq!(g.poll_grant(), Some(300));
        g.on_received(1000).unwrap();
        assert_eq!(
            g.on_received(1),
            Err(ProtoError::CreditExceeded {
                granted: 1600,
                received: 1601
            })
        );
    }

    fn pattern(i: usize, id: u64) -> u8 {
        u8::try_from(i % 253).unwrap() ^ id.to_be_bytes()[7]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Sender scheduler and receiver granter over a simulated link that
        /// carries a few frames per tick, with a receiver consuming at its
        /// own pace. Background bytes in flight or unconsumed never exceed
        /// the window, demand always goes first, every id's frames arrive
        /// in order, and everything arrives.
        #[test]
        fn simulated_link(
            cut in MIN_BACKGROUND_DATA..64 << 10,
            window_frames in 2u64..8,
            sizes in proptest::collection::vec(0usize..300_000, 1..4),
            per_tick in 1usize..4,
            consume_every in 1u64..5,
            demand_every in 1u64..20,
            compress in proptest::bool::ANY,
        ) {
            let mut s = Scheduler::new(SchedulerConfig {
                max_background_data: cut,
                compress: if compress { CompressOptions::default() } else { CompressOptions::disabled() },
            });
            let window = window_frames * s.max_background_frame_len() as u64;
            let mut g = CreditGranter::new(window);
            let mut dec = Decoder::new();
            let mut unconsumed: VecDeque<u64> = VecDeque::new();
            let mut pushed = vec![Vec::new(); sizes.len() + 1];
            let mut done = vec![false; sizes.len() + 1];
            let (mut demand_queued, mut demand_seen) = (0, 0);
            for (i, &len) in sizes.iter().enumerate() {
                let id = i as u64 + 1;
                let data: Vec<u8> = (0..len).map(|i| pattern(i, id)).collect();
                s.queue(id, Class::Background, Message::Push { as_of: 0, offset: 0, data: Bytes::from(data) }).unwrap();
                s.queue(id, Class::Background, Message::PrefetchDone).unwrap();
            }
            let mut tick = 0u64;
            while !done.iter().skip(1).all(|d| *d) || !s.is_empty() {
                tick += 1;
                proptest::prop_assert!(tick < 100_000, "stalled: credit {}, granter {:?}", s.credit(), g);
                if tick.is_multiple_of(demand_every) && demand_queued < 200 {
                    s.queue(1000 + tick, Class::Demand, Message::Heartbeat { nanos: tick }).unwrap();
                    demand_queued += 1;
                }
                // Grants travel at once: they are demand frames the other way.
                if let Some(bytes) = g.poll_grant() {
                    s.on_credit(bytes);
                }
                for _ in 0..per_tick {
                    let had_demand = s.queued_bytes(Class::Demand) > 0;
                    let Some(t) = s.poll_transmit() else { break };
                    proptest::prop_assert!(!had_demand || t.header.class == Class::Demand);
                    let mut buf = BytesMut::from(&t.frame[..]);
                    let (h, m) = dec.decode(&mut buf).unwrap().unwrap();
                    match h.class {
                        Class::Demand => demand_seen += 1,
                        Class::Background => {
                            g.on_received(h.wire_len as u64).unwrap();
                            unconsumed.push_back(h.wire_len as u64);
                        }
                    }
                    let id = usize::try_from(h.id).unwrap();
                    match m {
                        Message::Push { offset, data, .. } => {
                            proptest::prop_assert!(!done[id]);
                            proptest::prop_assert_eq!(offset, pushed[id].len() as u64);
                            pushed[id].extend_from_slice(&data);
                        }
                        Message::PrefetchDone => done[id] = true,
                        _ => {}
                    }
                }
                proptest::prop_assert!(unconsumed.iter().sum::<u64>() <= window);
                if tick.is_multiple_of(consume_every) {
                    if let Some(n) = unconsumed.pop_front() {
                        g.on_consumed(n);
                    }
                }
            }
            proptest::prop_assert_eq!(demand_seen, demand_queued);
            for (i, &len) in sizes.iter().enumerate() {
                let got = &pushed[i + 1];
                proptest::prop_assert_eq!(got.len(), len);
                proptest::prop_assert!(got.iter().enumerate().all(|(j, b)| *b == pattern(j, i as u64 + 1)));
            }
        }
    }
}

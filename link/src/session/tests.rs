//! Both sessions driven against each other in virtual time over a model
//! path (delay, bandwidth, a bounded queue), with the origin's storage a
//! byte vector. The simulator (`sim/`) does this with the real journals,
//! faults and crashes; these tests pin down the sessions' own rules.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use blockcore::{Extent, ExtentKind};
use bytes::Bytes;

use super::*;
use crate::proto::{Disposition, ErrorCode, WriteEntry};

/// One direction of the path: a FIFO in front of a serializer of `rate`
/// bytes/s, then `delay`.
struct Pipe {
    rate: f64,
    delay: Duration,
    /// Bytes the sender may have queued before it stops writing (socket
    /// buffers and the path's queue).
    limit: usize,
    free_at: Instant,
    /// (delivery time, bytes)
    in_flight: VecDeque<(Instant, Bytes)>,
    queued: usize,
    stalled: bool,
}

impl Pipe {
    fn new(now: Instant, rate: f64, delay: Duration, limit: usize) -> Self {
        Pipe {
            rate,
            delay,
            limit,
            free_at: now,
            in_flight: VecDeque::new(),
            queued: 0,
            stalled: false,
        }
    }

    fn has_room(&self) -> bool {
        self.queued < self.limit
    }

    fn send(&mut self, now: Instant, frame: Bytes) {
        let start = self.free_at.max(now);
        #[allow(clippy::cast_precision_loss)]
        let ser = Duration::from_secs_f64(frame.len() as f64 / self.rate);
        self.free_at = start + ser;
        self.queued += frame.len();
        self.in_flight.push_back((self.free_at + self.delay, frame));
    }

    fn next_delivery(&self) -> Option<Instant> {
        if self.stalled {
            return None;
        }
        self.in_flight.front().map(|(t, _)| *t)
    }

    fn deliver(&mut self, now: Instant) -> Vec<Bytes> {
        let mut out = Vec::new();
        while let Some((t, _)) = self.in_flight.front() {
            if *t > now || self.stalled {
                break;
            }
            let (_, b) = self.in_flight.pop_front().expect("checked");
            self.queued -= b.len();
            out.push(b);
        }
        out
    }
}

struct World {
    now: Instant,
    edge: EdgeSession,
    origin: Option<OriginSession>,
    origin_cfg: OriginSessionConfig,
    up: Pipe,
    down: Pipe,
    connected: bool,
    volume: Vec<u8>,
    applied: u64,
    /// (seq, part) the origin holds from a connection that ended.
    partial: Option<PartialBatch>,
    events: Vec<(Instant, EdgeEvent)>,
    applies: Vec<u64>,
    /// Storage latency of the origin's reads and applies.
    storage_delay: Duration,
    pending_ops: VecDeque<(Instant, OriginOp)>,
    epoch: u64,
    /// The origin closed; the edge sees it once the last bytes arrived.
    closing: bool,
    /// How the origin answers attaches (`None`: granted).
    refuse: Option<Refusal>,
    /// Connections the edge asked for.
    connects: u32,
    /// The volume's allocation, as its device reports it (whole volume,
    /// contiguous), and how many extents one query returns at most.
    alloc: Vec<Extent>,
    alloc_max: usize,
    /// Releases the origin was asked for, with the newest batch applied
    /// when it was; and how it answers them (`None`: released).
    releases: Vec<(Disposition, u64)>,
    refuse_release: Option<Refusal>,
    /// Detaches the origin was asked for (plain `Detach`).
    detaches: u32,
    /// Profiles the origin was given, and the plan it answers `Plan` with.
    profiles: Vec<Bytes>,
    plan: Vec<(u64, u32)>,
}

impl World {
    fn new(rate: f64, one_way: Duration, limit: usize) -> Self {
        Self::with_edge(rate, one_way, limit, |_| {})
    }

    fn with_edge(
        rate: f64,
        one_way: Duration,
        limit: usize,
        f: impl FnOnce(&mut EdgeSessionConfig),
    ) -> Self {
        let now = Instant::now();
        let mut cfg = EdgeSessionConfig::new("vol", "edge-1");
        cfg.reconnect_min = Duration::from_millis(50);
        cfg.reconnect_max = Duration::from_millis(400);
        f(&mut cfg);
        let edge = EdgeSession::new(cfg, now);
        World {
            now,
            edge,
            origin: None,
            origin_cfg: OriginSessionConfig::default(),
            up: Pipe::new(now, rate, one_way, limit),
            down: Pipe::new(now, rate, one_way, limit),
            connected: false,
            volume: (0..8u32 << 20).map(|i| (i % 251) as u8).collect(),
            applied: 0,
            partial: None,
            events: Vec::new(),
            applies: Vec::new(),
            storage_delay: Duration::from_micros(200),
            pending_ops: VecDeque::new(),
            epoch: 77,
            closing: false,
            refuse: None,
            connects: 0,
            alloc: vec![Extent {
                offset: 0,
                len: 8 << 20,
                kind: ExtentKind::Data,
            }],
            alloc_max: usize::MAX,
            releases: Vec::new(),
            refuse_release: None,
            detaches: 0,
            profiles: Vec::new(),
            plan: Vec::new(),
        }
    }

    fn disconnect(&mut self) {
        self.connected = false;
        self.closing = false;
        self.up.in_flight.clear();
        self.down.in_flight.clear();
        self.up.queued = 0;
        self.down.queued = 0;
        if let Some(mut o) = self.origin.take() {
            self.partial = o.take_partial().or(self.partial.take());
        }
        self.pending_ops.clear();
        self.edge.disconnected(self.now);
    }

    /// Runs until `until` or until `done` says so.
    fn run(&mut self, until: Duration, mut done: impl FnMut(&World) -> bool) {
        let end = self.now + until;
        for _ in 0..5_000_000 {
            self.pump();
            if done(self) {
                return;
            }
            let mut next = end;
            for t in [
                self.edge.poll_timeout(),
                self.origin.as_ref().and_then(OriginSession::poll_timeout),
                self.up.next_delivery(),
                self.down.next_delivery(),
                self.pending_ops.front().map(|(t, _)| *t),
            ]
            .into_iter()
            .flatten()
            {
                next = next.min(t);
            }
            if next >= end {
                self.now = end;
                self.pump();
                return;
            }
            self.now = next.max(self.now);
            self.edge.handle_timeout(self.now);
            if let Some(o) = self.origin.as_mut() {
                o.handle_timeout(self.now);
            }
            for b in self.up.deliver(self.now) {
                if let Some(o) = self.origin.as_mut() {
                    o.handle_input(&b, self.now);
                }
            }
            for b in self.down.deliver(self.now) {
                self.edge.handle_input(&b, self.now);
            }
            if self.closing && self.down.in_flight.is_empty() {
                self.closing = false;
                self.connected = false;
                self.up.in_flight.clear();
                self.up.queued = 0;
                self.edge.disconnected(self.now);
            }
            while self
                .pending_ops
                .front()
                .is_some_and(|(t, _)| *t <= self.now)
            {
                let (_, op) = self.pending_ops.pop_front().expect("checked");
                self.complete(op);
            }
        }
        panic!("the world did not settle");
    }

    fn pump(&mut self) {
        for _ in 0..100 {
            let mut busy = false;
            while let Some(ev) = self.edge.poll_event() {
                busy = true;
                match ev {
                    EdgeEvent::Connect => {
                        // Connecting takes a round trip.
                        self.connects += 1;
                        self.connected = true;
                        let nonce = [5; 32];
                        assert!(self.edge.connected(self.now, nonce));
                        self.origin = Some(OriginSession::new(
                            self.origin_cfg.clone(),
                            self.now,
                            [6; 32],
                        ));
                    }
                    EdgeEvent::Close { .. } => {
                        self.connected = false;
                        self.closing = false;
                        if let Some(mut o) = self.origin.take() {
                            self.partial = o.take_partial().or(self.partial.take());
                        }
                        self.up.in_flight.clear();
                        self.down.in_flight.clear();
                        self.up.queued = 0;
                        self.down.queued = 0;
                        self.pending_ops.clear();
                    }
                    other => self.events.push((self.now, other)),
                }
            }
            if let Some(o) = self.origin.as_mut() {
                while let Some(op) = o.poll_op() {
                    busy = true;
                    if let OriginOp::Close { .. } = op {
                        // What it queued (an error saying why) still goes
                        // out; then the connection ends.
                        while let Some(f) = o.poll_transmit(self.now) {
                            self.down.send(self.now, f);
                        }
                        self.origin = None;
                        self.closing = true;
                        break;
                    }
                    self.pending_ops
                        .push_back((self.now + self.storage_delay, op));
                }
            }
            while self.up.has_room() {
                let Some(f) = self.edge.poll_transmit(self.now) else {
                    break;
                };
                busy = true;
                if self.connected {
                    self.up.send(self.now, f);
                }
            }
            if let Some(o) = self.origin.as_mut() {
                while self.down.has_room() {
                    let Some(f) = o.poll_transmit(self.now) else {
                        break;
                    };
                    busy = true;
                    self.down.send(self.now, f);
                }
            }
            if !busy {
                return;
            }
        }
    }

    fn complete(&mut self, op: OriginOp) {
        let Some(o) = self.origin.as_mut() else {
            return;
        };
        match op {
            OriginOp::Attach { .. } if self.refuse.is_some() => {
                o.attach_done(Err(self.refuse.clone().expect("checked")));
            }
            OriginOp::Attach { .. } => o.attach_done(Ok(AttachGrant {
                size: self.volume.len() as u64,
                cache_key: [1; 32],
                dedup_key: [2; 32],
                volume_epoch: self.epoch,
                next_seq: self.applied + 1,
                resume: self.partial.take(),
                local_writes: false,
            })),
            OriginOp::StoreProfile { tag, data } => {
                self.profiles.push(data);
                o.profile_done(tag, Ok(()));
            }
            OriginOp::Plan { tag, budget } => {
                assert!(budget > 0, "a plan with no budget");
                o.plan_done(tag, Ok(self.plan.clone()));
            }
            OriginOp::Read {
                tag, offset, len, ..
            } => {
                let o0 = usize::try_from(offset).unwrap();
                let data = Bytes::copy_from_slice(&self.volume[o0..o0 + len as usize]);
                o.read_done(
                    tag,
                    Ok(ReadAnswer::Data {
                        as_of: self.applied,
                        data,
                    }),
                );
            }
            OriginOp::Apply { seq, entries } => {
                if seq == self.applied + 1 {
                    for e in &entries {
                        let at = usize::try_from(e.offset()).unwrap();
                        match e {
                            WriteEntry::Data { data, .. } => {
                                self.volume[at..at + data.len()].copy_from_slice(data);
                            }
                            WriteEntry::Zero { len, .. } => {
                                self.volume[at..at + usize::try_from(*len).unwrap()].fill(0);
                            }
                        }
                    }
                    self.applied = seq;
                    self.applies.push(seq);
                }
                o.apply_done(seq, Ok(()));
            }
            OriginOp::Extents { tag, offset, len } => {
                // As a device does: the extents from `offset`, the first
                // one cut to start there, a prefix of the range.
                let end = offset + len;
                let extents = self
                    .alloc
                    .iter()
                    .filter(|e| e.offset + e.len > offset && e.offset < end)
                    .take(self.alloc_max)
                    .map(|e| {
                        let from = e.offset.max(offset);
                        Extent {
                            offset: from,
                            len: (e.offset + e.len).min(end) - from,
                            kind: e.kind,
                        }
                    })
                    .collect();
                o.extents_done(tag, Ok(extents));
            }
            OriginOp::Sign {
                tag,
                offset,
                len,
                block,
            } => {
                let o0 = usize::try_from(offset).unwrap();
                let sigs = self.volume[o0..o0 + len as usize]
                    .chunks(block as usize)
                    .map(toy_signature)
                    .collect();
                o.sign_done(tag, Ok(sigs));
            }
            OriginOp::Detach => {
                self.detaches += 1;
                o.detach_done();
            }
            OriginOp::Release { disposition } => {
                self.releases.push((disposition, self.applied));
                o.release_done(self.refuse_release.clone().map_or(Ok(()), Err));
            }
            OriginOp::Close { .. } => {}
        }
    }

    fn sign_done(&self, id: RequestId) -> Option<&Result<Vec<[u8; 32]>, crate::LinkError>> {
        self.events.iter().find_map(|(_, e)| match e {
            EdgeEvent::SignDone { id: i, result } if *i == id => Some(result),
            _ => None,
        })
    }

    fn extents_done(&self, id: RequestId) -> Option<&Result<Vec<Extent>, crate::LinkError>> {
        self.events.iter().find_map(|(_, e)| match e {
            EdgeEvent::ExtentsDone { id: i, result } if *i == id => Some(result),
            _ => None,
        })
    }

    fn has_event(&self, f: impl Fn(&EdgeEvent) -> bool) -> bool {
        self.events.iter().any(|(_, e)| f(e))
    }

    /// The group pushes (id 0) so far, sorted, adjacent pieces joined.
    fn group_push_runs(&self) -> Vec<(u64, u64)> {
        self.push_runs(0)
    }

    /// The pushes of request `id` so far, sorted, adjacent pieces joined
    /// (the scheduler cuts them in frames).
    fn push_runs(&self, id: u64) -> Vec<(u64, u64)> {
        let mut p: Vec<(u64, u64)> = self
            .events
            .iter()
            .filter_map(|(_, e)| match e {
                EdgeEvent::Push {
                    id: i,
                    offset,
                    data,
                    ..
                } if *i == id => Some((*offset, data.len() as u64)),
                _ => None,
            })
            .collect();
        p.sort_unstable();
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (offset, len) in p {
            match runs.last_mut() {
                Some(l) if l.0 + l.1 == offset => l.1 += len,
                _ => runs.push((offset, len)),
            }
        }
        runs
    }

    /// Gives the origin a file index: `/usr/bin/app` in `app`'s extents,
    /// loading `/usr/lib/libapp.so` in `lib`'s (its application group).
    fn map_app_and_library(&mut self, app: Vec<(u64, u64)>, lib: Vec<(u64, u64)>) {
        use prefetch::layout::{File, FileIndex, FileKind, VolumeLayout};
        let file = |path: &str, extents: Vec<(u64, u64)>| File {
            fs: 0,
            path: path.into(),
            kind: FileKind::Regular,
            size: extents.iter().map(|e| e.1).sum(),
            extents,
            offsets: vec![],
            meta: None,
            target: None,
        };
        let layout = VolumeLayout {
            files: vec![file("/usr/bin/app", app), file("/usr/lib/libapp.so", lib)],
            needs: [(0, vec![1])].into_iter().collect(),
            ..VolumeLayout::default()
        };
        let index = std::sync::Arc::new(FileIndex::new(&layout, 64 << 10));
        self.origin.as_mut().expect("attached").set_files(index);
    }

    fn read_done(&self, id: RequestId) -> Option<&Result<ReadReply, crate::LinkError>> {
        self.events.iter().find_map(|(_, e)| match e {
            EdgeEvent::ReadDone { id: i, result } if *i == id => Some(result),
            _ => None,
        })
    }

    fn applied_seq(&self) -> u64 {
        self.events
            .iter()
            .filter_map(|(_, e)| match e {
                EdgeEvent::BatchApplied { seq } => Some(*seq),
                _ => None,
            })
            .max()
            .unwrap_or(0)
    }
}

const MBIT100: f64 = 12_500_000.0;

/// Incompressible bytes (zstd would otherwise shrink the test's batches
/// to nothing).
fn noise(seed: u64, len: usize) -> Bytes {
    testkit::pattern(seed, len).into()
}

/// A batch of `bytes` in 64 KiB entries; the byte at `seq * 4096` of the
/// volume becomes `seq`'s mark.
fn batch(seq: u64, bytes: usize) -> Vec<WriteEntry> {
    (0..bytes / 65536)
        .map(|i| {
            let mut data = noise(seq * 1000 + i as u64, 65536).to_vec();
            data[0] = u8::try_from(seq % 250).unwrap() + 1;
            WriteEntry::Data {
                offset: (i as u64 * 65536 + seq * 4096) % (6 << 20),
                data: Bytes::from(data),
            }
        })
        .collect()
}

#[test]
fn attach_then_reads_and_a_batch() {
    let mut w = World::new(MBIT100, Duration::from_millis(25), 4 << 20);
    w.run(Duration::from_secs(2), |w| w.edge.is_up());
    assert!(w.edge.is_up());
    let a = w.edge.attachment().unwrap();
    assert_eq!((a.size, a.volume_epoch, a.next_seq), (8 << 20, 77, 1));
    let id = w.edge.read(1000, 5000, false, w.now);
    w.run(Duration::from_secs(2), |w| w.read_done(id).is_some());
    let Some(Ok(ReadReply::Data { data, as_of })) = w.read_done(id) else {
        panic!("no data: {:?}", w.read_done(id));
    };
    assert_eq!(*as_of, 0);
    assert_eq!(data[..], w.volume[1000..6000]);
    w.edge.ship(1, batch(1, 1 << 20), w.now);
    w.run(Duration::from_secs(5), |w| w.applied_seq() == 1);
    assert_eq!(w.applies, [1]);
    assert_eq!(w.volume[4096], 2);
}

#[test]
fn a_cold_read_overtakes_write_back_through_a_full_path() {
    // A path holding 4 MiB per direction, like the relay the issue
    // describes; the edge ships 32 MiB of batches.
    let mut w = World::new(MBIT100, Duration::from_millis(25), 4 << 20);
    w.run(Duration::from_secs(2), |w| w.edge.is_up());
    for seq in 1..=3 {
        w.edge.ship(seq, batch(seq, 12 << 20), w.now);
    }
    // Let the controller find its window.
    w.run(Duration::from_secs(3), |_| false);
    let mut worst = Duration::ZERO;
    for i in 0..20u64 {
        let start = w.now;
        let id = w.edge.read(7 << 20 | (i * 4096), 4096, false, w.now);
        w.run(Duration::from_secs(10), |w| w.read_done(id).is_some());
        assert!(matches!(w.read_done(id), Some(Ok(_))));
        worst = worst.max(w.now - start);
        w.run(Duration::from_millis(37), |_| false);
    }
    // RTT 50 ms; the target is RTT + about the controller's target + a
    // frame, well below the 6.5 s the first link took.
    eprintln!("worst cold 4 KiB read behind write-back: {worst:?} (RTT 50 ms)");
    assert!(
        worst < Duration::from_millis(90),
        "worst cold read {worst:?}"
    );
    w.run(Duration::from_secs(60), |w| w.applied_seq() == 3);
    assert_eq!(w.applied_seq(), 3);
    assert_eq!(w.edge.stats(w.now).deaths, 0);
}

#[test]
fn write_back_fills_the_link() {
    let mut w = World::new(MBIT100, Duration::from_millis(25), 4 << 20);
    w.run(Duration::from_secs(2), |w| w.edge.is_up());
    let mut seq = 0;
    let mut feed = |w: &mut World, secs: u64| {
        let end = w.now + Duration::from_secs(secs);
        while w.now < end {
            while w.edge.batch_room() > 0 {
                seq += 1;
                w.edge.ship(seq, batch(seq, 4 << 20), w.now);
            }
            w.run(Duration::from_millis(50), |_| false);
        }
    };
    // Warm up, then measure 30 s of batches applied.
    feed(&mut w, 5);
    let (t0, n0) = (w.now, w.applies.len());
    feed(&mut w, 30);
    for (t, e) in &w.events {
        assert!(!matches!(e, EdgeEvent::BatchFailed { .. }), "{t:?}: {e:?}");
    }
    let secs = (w.now - t0).as_secs_f64();
    #[allow(clippy::cast_precision_loss)]
    let rate = ((w.applies.len() - n0) as f64 * 4.0 * 1_048_576.0) / secs;
    eprintln!("write-back: {:.3} of the link", rate / MBIT100);
    assert!(
        rate >= 0.9 * MBIT100,
        "write-back {rate:.0} B/s of {MBIT100} B/s"
    );
    assert_eq!(w.edge.stats(w.now).deaths, 0);
}

#[test]
fn a_dropped_link_resumes_the_batch_where_it_stopped() {
    let mut w = World::new(MBIT100, Duration::from_millis(10), 1 << 20);
    w.run(Duration::from_secs(2), |w| w.edge.is_up());
    w.edge.ship(1, batch(1, 8 << 20), w.now);
    w.edge.ship(2, batch(2, 1 << 20), w.now);
    // Part way through batch 1.
    w.run(Duration::from_millis(300), |_| false);
    let sent_before = w.edge.stats(w.now).batch_bytes_sent;
    assert!(sent_before > 1 << 20 && sent_before < 8 << 20);
    w.disconnect();
    w.run(Duration::from_secs(10), |w| w.applied_seq() == 2);
    assert_eq!(w.applies, [1, 2]);
    // Resumed, not restarted: well under twice the batch crossed.
    let sent = w.edge.stats(w.now).batch_bytes_sent;
    assert!(sent < (9 << 20) + sent_before / 2, "sent {sent}");
    assert_eq!(w.edge.stats(w.now).connects, 2);
}

#[test]
fn acks_lost_in_a_drop_come_back_with_the_attach() {
    let mut w = World::new(MBIT100, Duration::from_millis(10), 1 << 20);
    w.run(Duration::from_secs(2), |w| w.edge.is_up());
    w.edge.ship(1, batch(1, 64 << 10), w.now);
    // Until applied at the origin, but before the ack reached the edge.
    w.run(Duration::from_secs(2), |w| w.applied == 1);
    w.disconnect();
    assert_eq!(w.applied_seq(), 0);
    w.run(Duration::from_secs(5), |w| w.applied_seq() == 1);
    assert_eq!(w.applies, [1], "applied once");
}

#[test]
fn a_read_waits_across_a_reconnection_and_times_out_without_one() {
    let mut w = World::new(MBIT100, Duration::from_millis(10), 1 << 20);
    w.run(Duration::from_secs(2), |w| w.edge.is_up());
    w.up.stalled = true;
    w.down.stalled = true;
    let id = w.edge.read(0, 4096, false, w.now);
    // Nothing arrives: declared dead after `dead_after`, reconnects.
    w.run(Duration::from_secs(8), |w| w.edge.stats(w.now).deaths > 0);
    assert_eq!(w.edge.stats(w.now).deaths, 1);
    w.up.stalled = false;
    w.down.stalled = false;
    w.run(Duration::from_secs(5), |w| w.read_done(id).is_some());
    assert!(matches!(w.read_done(id), Some(Ok(_))));

    // An origin that never comes back: the read fails at its deadline.
    w.origin_cfg.psk = Some([3; 32]);
    w.disconnect();
    let id = w.edge.read(0, 4096, false, w.now);
    w.run(Duration::from_secs(40), |w| w.read_done(id).is_some());
    assert!(matches!(
        w.read_done(id),
        Some(Err(crate::LinkError::Timeout(_)))
    ));
    assert!(w
        .events
        .iter()
        .any(|(_, e)| matches!(e, EdgeEvent::Refused(_))));
}

#[test]
fn pre_shared_keys_must_match() {
    let mut w = World::with_edge(MBIT100, Duration::from_millis(1), 1 << 20, |c| {
        c.psk = Some([9; 32]);
    });
    w.origin_cfg.psk = Some([9; 32]);
    w.run(Duration::from_secs(2), |w| w.edge.is_up());
    assert!(w.edge.is_up());

    let mut w = World::with_edge(MBIT100, Duration::from_millis(1), 1 << 20, |c| {
        c.psk = Some([8; 32]);
    });
    w.origin_cfg.psk = Some([9; 32]);
    w.run(Duration::from_secs(2), |_| false);
    assert!(!w.edge.is_up());
    assert!(w.events.iter().any(|(_, e)| matches!(
        e,
        EdgeEvent::Refused(
            crate::LinkError::Refused {
                code: ErrorCode::AuthFailed,
                ..
            } | crate::LinkError::Handshake(_)
        )
    )));
}

#[test]
fn prefetches_push_and_complete_and_reads_push_their_group() {
    let mut w = World::new(MBIT100, Duration::from_millis(5), 1 << 20);
    w.run(Duration::from_secs(2), |w| w.edge.is_up());
    let id = w.edge.prefetch(vec![(2 << 20, 3 << 20), (0, 0)]);
    w.run(Duration::from_secs(5), |w| {
        w.events
            .iter()
            .any(|(_, e)| matches!(e, EdgeEvent::PrefetchDone { id: i, .. } if *i == id))
    });
    let pushed: usize = w
        .events
        .iter()
        .filter_map(|(_, e)| match e {
            EdgeEvent::Push {
                id: i,
                offset,
                data,
                ..
            } if *i == id => {
                let o = usize::try_from(*offset).unwrap();
                assert_eq!(data[..], w.volume[o..o + data.len()]);
                Some(data.len())
            }
            _ => None,
        })
        .sum();
    assert_eq!(pushed, 3 << 20);
    // A 4 KiB read pushes the rest of its 1 MiB group.
    let r = w.edge.read(6 << 20, 4096, false, w.now);
    w.run(Duration::from_secs(2), |_| false);
    assert!(w.read_done(r).is_some());
    let group: usize = w
        .events
        .iter()
        .filter_map(|(_, e)| match e {
            EdgeEvent::Push { id: 0, data, .. } => Some(data.len()),
            _ => None,
        })
        .sum();
    assert_eq!(group, (1 << 20) - 4096);
}

#[test]
fn a_profile_is_stored_and_a_plan_streams_behind_demand_reads() {
    let mut w = World::new(MBIT100, Duration::from_millis(25), 1 << 20);
    w.plan = vec![(1 << 20, 1 << 20), (5 << 20, 512 << 10), (0, 64 << 10)];
    w.run(Duration::from_secs(2), |w| w.edge.is_up());
    let stored = w
        .edge
        .store_profile(Bytes::from_static(b"a profile"), w.now);
    let plan = w.edge.plan(1 << 20);
    // A demand read issued just after the plan still comes back in about
    // one round trip, not behind 1.5 MiB of pushes (120 ms at 100 Mbit/s).
    let start = w.now;
    let read = w.edge.read(7 << 20, 4096, false, w.now);
    w.run(Duration::from_secs(1), |w| w.read_done(read).is_some());
    let read_took = w.now - start;
    assert!(read_took < Duration::from_millis(80), "{read_took:?}");
    w.run(Duration::from_secs(5), |w| {
        w.has_event(|e| matches!(e, EdgeEvent::PrefetchDone { id, .. } if *id == plan))
    });
    assert!(w.has_event(
        |e| matches!(e, EdgeEvent::ProfileStored { id, result: Ok(()) } if *id == stored)
    ));
    assert_eq!(w.profiles, [Bytes::from_static(b"a profile")]);
    // Every planned range, whole, once (in frames the scheduler cut).
    assert_eq!(
        w.push_runs(plan),
        [(0, 64 << 10), (1 << 20, 1 << 20), (5 << 20, 512 << 10)]
    );
    // The read outside the plan pushed its group; one inside the plan
    // pushes none (the plan already said what of that group is read).
    let group_bytes = |w: &World, from: u64, to: u64| -> usize {
        w.events
            .iter()
            .filter_map(|(_, e)| match e {
                EdgeEvent::Push {
                    id: 0,
                    offset,
                    data,
                    ..
                } if (from..to).contains(offset) => Some(data.len()),
                _ => None,
            })
            .sum()
    };
    let inside = w.edge.read(5 << 20, 4096, false, w.now);
    w.run(Duration::from_secs(2), |_| false);
    assert!(w.read_done(inside).is_some());
    assert_eq!(group_bytes(&w, 7 << 20, 8 << 20), (1 << 20) - 4096);
    assert_eq!(group_bytes(&w, 5 << 20, 6 << 20), 0);
}

#[test]
fn a_read_inside_a_known_file_pushes_the_rest_of_that_file_and_what_it_loads_once() {
    let mut w = World::new(MBIT100, Duration::from_millis(5), 1 << 20);
    w.run(Duration::from_secs(2), |w| w.edge.is_up());
    // A 1.5 MiB file in two extents, the second before the first, and a
    // library it loads, pushed with it.
    w.map_app_and_library(
        vec![(4 << 20, 1 << 20), (1 << 20, 512 << 10)],
        vec![(7 << 20, 256 << 10)],
    );
    let r = w.edge.read(4 << 20, 32 << 10, false, w.now);
    w.run(Duration::from_secs(2), |_| false);
    assert!(matches!(w.read_done(r), Some(Ok(_))));
    // The rest of the file, not the rest of the 1 MiB group, and the
    // library.
    assert_eq!(
        w.group_push_runs(),
        [
            (1 << 20, 512 << 10),
            ((4 << 20) + (32 << 10), (1 << 20) - (32 << 10)),
            (7 << 20, 256 << 10)
        ]
    );
    let before = w.group_push_runs();
    let r = w.edge.read((4 << 20) + (512 << 10), 4096, false, w.now);
    w.run(Duration::from_secs(1), |_| false);
    assert!(w.read_done(r).is_some());
    assert_eq!(w.group_push_runs(), before, "the file was pushed once");
    // Outside every file: the fixed group, as before.
    let r = w.edge.read(6 << 20, 4096, false, w.now);
    w.run(Duration::from_secs(1), |_| false);
    assert!(w.read_done(r).is_some());
    // (Its run ends where the library's pushed earlier begins.)
    let group: u64 = w
        .group_push_runs()
        .iter()
        .map(|&(o, n)| (o + n).min(7 << 20).saturating_sub(o.max(6 << 20)))
        .sum();
    assert_eq!(group, (1 << 20) - 4096);
}

#[test]
fn a_file_longer_than_its_group_streams_ahead_of_its_reader() {
    let mut w = World::new(MBIT100, Duration::from_millis(5), 1 << 20);
    w.origin_cfg.file_group_max = 1 << 20;
    w.run(Duration::from_secs(2), |w| w.edge.is_up());
    // A 4 MiB file (a kernel's initramfs): its first read pushes the next
    // 1 MiB, and a read past that the 1 MiB after it.
    w.map_app_and_library(vec![(2 << 20, 4 << 20)], vec![(7 << 20, 256 << 10)]);
    let r = w.edge.read(2 << 20, 32 << 10, false, w.now);
    w.run(Duration::from_secs(2), |_| false);
    assert!(matches!(w.read_done(r), Some(Ok(_))));
    assert_eq!(
        w.group_push_runs(),
        [
            ((2 << 20) + (32 << 10), (1 << 20) - (32 << 10)),
            (7 << 20, 256 << 10)
        ]
    );
    let r = w.edge.read(3 << 20, 4096, false, w.now);
    w.run(Duration::from_secs(2), |_| false);
    assert!(matches!(w.read_done(r), Some(Ok(_))));
    assert_eq!(
        w.group_push_runs(),
        [
            ((2 << 20) + (32 << 10), (1 << 20) - (32 << 10)),
            ((3 << 20) + 4096, (1 << 20) - 4096),
            (7 << 20, 256 << 10)
        ]
    );
}

#[test]
fn a_group_push_leaves_out_what_the_plan_sent() {
    let mut w = World::new(MBIT100, Duration::from_millis(5), 1 << 20);
    // The plan holds the library, and 64 KiB of an unmapped region.
    w.plan = vec![(7 << 20, 256 << 10), (2 << 20, 64 << 10)];
    w.run(Duration::from_secs(2), |w| w.edge.is_up());
    w.map_app_and_library(vec![(4 << 20, 1 << 20)], vec![(7 << 20, 256 << 10)]);
    let plan = w.edge.plan(1 << 20);
    w.run(Duration::from_secs(5), |w| {
        w.has_event(|e| matches!(e, EdgeEvent::PrefetchDone { id, .. } if *id == plan))
    });
    // The program's rest goes; its library, which the plan sent, does not.
    let r = w.edge.read(4 << 20, 32 << 10, false, w.now);
    w.run(Duration::from_secs(2), |_| false);
    assert!(matches!(w.read_done(r), Some(Ok(_))));
    assert_eq!(
        w.group_push_runs(),
        [((4 << 20) + (32 << 10), (1 << 20) - (32 << 10))]
    );
    // A fixed group around a planned range pushes the rest around it.
    let r = w.edge.read((2 << 20) + (512 << 10), 4096, false, w.now);
    w.run(Duration::from_secs(2), |_| false);
    assert!(w.read_done(r).is_some());
    assert_eq!(
        w.group_push_runs(),
        [
            ((2 << 20) + (64 << 10), (448 << 10)),
            ((2 << 20) + (512 << 10) + 4096, (512 << 10) - 4096),
            ((4 << 20) + (32 << 10), (1 << 20) - (32 << 10)),
        ]
    );
    let stats = w.origin.as_ref().expect("attached").stats(w.now);
    assert_eq!(
        stats.group_bytes_skipped,
        (256 << 10) + (64 << 10) + 4096 + (32 << 10)
    );
    assert_eq!((stats.file_groups, stats.fixed_groups), (1, 1));
}

#[test]
fn a_changed_volume_stops_the_session() {
    let mut w = World::new(MBIT100, Duration::from_millis(1), 1 << 20);
    w.run(Duration::from_secs(2), |w| w.edge.is_up());
    w.epoch = 78;
    w.disconnect();
    w.run(Duration::from_secs(2), |_| false);
    assert!(w
        .events
        .iter()
        .any(|(_, e)| matches!(e, EdgeEvent::Failed(crate::LinkError::VolumeChanged { .. }))));
    assert!(!w.edge.is_up());
    assert_eq!(w.edge.poll_timeout(), None);
}

#[test]
fn the_first_links_mistake_livelocks_on_a_slow_buffered_path() {
    // 10 Mbit/s, 25 ms, 4 MiB of buffering: 16 MiB demand frames hold the
    // heartbeat replies back for longer than the liveness limit.
    let mut w = World::with_edge(1_250_000.0, Duration::from_millis(25), 4 << 20, |c| {
        c.mistakes.heartbeat_liveness = true;
    });
    w.run(Duration::from_secs(2), |w| w.edge.is_up());
    w.edge.ship(1, batch(1, 40 << 20), w.now);
    w.run(Duration::from_secs(120), |w| w.applied_seq() == 1);
    assert_eq!(w.applied_seq(), 0, "the mistake should have stalled");
    assert!(w.edge.stats(w.now).deaths >= 3);

    // The session as it is: the same path ships it without a death.
    let mut w = World::new(1_250_000.0, Duration::from_millis(25), 4 << 20);
    w.run(Duration::from_secs(2), |w| w.edge.is_up());
    w.edge.ship(1, batch(1, 40 << 20), w.now);
    w.run(Duration::from_secs(120), |w| w.applied_seq() == 1);
    assert_eq!(w.applied_seq(), 1);
    assert_eq!(w.edge.stats(w.now).deaths, 0);
}

fn fenced() -> Refusal {
    Refusal::new(
        ErrorCode::Fenced,
        "edge \"edge-1\" is fenced off volume \"vol\"",
    )
}

fn is_fenced(e: &crate::LinkError) -> bool {
    matches!(
        e,
        crate::LinkError::Refused {
            code: ErrorCode::Fenced,
            ..
        }
    )
}

#[test]
fn a_fenced_edge_stops_at_once_and_never_retries() {
    let mut w = World::new(MBIT100, Duration::from_millis(5), 1 << 20);
    w.run(Duration::from_secs(2), |w| w.edge.is_up());
    w.refuse = Some(fenced());
    w.disconnect();
    let read = w.edge.read(0, 4096, false, w.now);
    w.edge.ship(1, batch(1, 64 << 10), w.now);
    w.run(Duration::from_secs(2), |w| w.edge.finished().is_some());
    let connects = w.connects;
    assert!(matches!(w.read_done(read), Some(Err(e)) if is_fenced(e)));
    assert!(w
        .events
        .iter()
        .any(|(_, e)| matches!(e, EdgeEvent::Failed(e) if is_fenced(e))));
    assert!(!w
        .events
        .iter()
        .any(|(_, e)| matches!(e, EdgeEvent::Refused(_))));
    let st = w.edge.stats(w.now);
    assert!(st.fenced, "{st:?}");
    assert!(
        st.last_error.as_deref().unwrap_or("").contains("fenced"),
        "{st:?}"
    );
    assert!(st.stopped.is_some());
    // No reconnection, no timer: a fenced edge waits for nothing.
    assert_eq!(w.edge.poll_timeout(), None);
    w.run(Duration::from_secs(30), |_| false);
    assert_eq!(w.connects, connects);
    assert!(w.applies.is_empty());
    // Later requests fail at once.
    let again = w.edge.read(0, 4096, false, w.now);
    w.run(Duration::from_millis(1), |_| false);
    assert!(matches!(w.read_done(again), Some(Err(e)) if is_fenced(e)));
}

#[test]
fn a_revoked_connection_stops_the_edge() {
    let mut w = World::new(MBIT100, Duration::from_millis(5), 1 << 20);
    w.run(Duration::from_secs(2), |w| w.edge.is_up());
    let read = w.edge.read(0, 4096, false, w.now);
    w.origin.as_mut().expect("connected").revoke(fenced());
    w.run(Duration::from_secs(2), |w| w.edge.finished().is_some());
    assert!(w.edge.finished().is_some_and(is_fenced));
    assert!(w.edge.stats(w.now).fenced);
    // The read was answered before the revocation, or failed with it.
    assert!(matches!(w.read_done(read), Some(Ok(_) | Err(_))));
    let connects = w.connects;
    w.run(Duration::from_secs(10), |_| false);
    assert_eq!(w.connects, connects, "no reconnection after a fence");
}

#[test]
fn detach_waits_for_every_batch_then_ends_the_session() {
    let mut w = World::new(MBIT100, Duration::from_millis(10), 1 << 20);
    w.run(Duration::from_secs(2), |w| w.edge.is_up());
    w.edge.ship(1, batch(1, 2 << 20), w.now);
    w.edge.ship(2, batch(2, 1 << 20), w.now);
    w.edge.detach();
    w.run(Duration::from_secs(10), |w| {
        w.events
            .iter()
            .any(|(_, e)| matches!(e, EdgeEvent::Detached))
    });
    let detached_at = w
        .events
        .iter()
        .position(|(_, e)| matches!(e, EdgeEvent::Detached))
        .expect("detached");
    let applied_at = w
        .events
        .iter()
        .position(|(_, e)| matches!(e, EdgeEvent::BatchApplied { seq: 2 }))
        .expect("batch 2 applied");
    assert!(applied_at < detached_at, "{:?}", w.events);
    assert_eq!(w.applies, [1, 2]);
    assert!(w.edge.finished().is_some());
    assert!(!w.edge.is_up());
    assert_eq!(w.edge.poll_timeout(), None);
    let read = w.edge.read(0, 4096, false, w.now);
    w.run(Duration::from_millis(1), |_| false);
    assert!(matches!(
        w.read_done(read),
        Some(Err(crate::LinkError::Detached))
    ));
    assert!(!w.edge.stats(w.now).fenced);
}

fn ext(offset: u64, len: u64, kind: ExtentKind) -> Extent {
    Extent { offset, len, kind }
}

const MIB: u64 = 1 << 20;

/// Stands in for the keyed signature: the piece's length and a fold of
/// its bytes by position.
fn toy_signature(piece: &[u8]) -> [u8; 32] {
    let mut sig = [0u8; 32];
    sig[..8].copy_from_slice(&(piece.len() as u64).to_be_bytes());
    for (i, b) in piece.iter().enumerate() {
        sig[8 + i % 24] = sig[8 + i % 24].wrapping_mul(31).wrapping_add(*b);
    }
    sig
}

#[test]
fn signature_queries_sign_each_piece_and_a_short_last_one() {
    let mut w = World::new(MBIT100, Duration::from_millis(5), 1 << 20);
    for (i, b) in w.volume.iter_mut().enumerate() {
        *b = u8::try_from(i * 7 % 251).unwrap();
    }
    w.run(Duration::from_secs(2), |w| w.edge.is_up());
    // 40 KiB in 16 KiB pieces: two whole and a short one.
    let id = w.edge.sign(8192, 40 << 10, 16 << 10, w.now);
    w.run(Duration::from_secs(2), |w| w.sign_done(id).is_some());
    let got = w.sign_done(id).unwrap().as_ref().unwrap();
    let want: Vec<_> = w.volume[8192..8192 + (40 << 10)]
        .chunks(16 << 10)
        .map(toy_signature)
        .collect();
    assert_eq!(*got, want);
    assert_eq!(want.len(), 3);
    assert_eq!(w.origin.as_ref().unwrap().stats(w.now).sign_queries, 1);

    // Past the end: refused by the origin; a block too small: at once.
    let size = w.volume.len() as u64;
    let past = w.edge.sign(size - 4096, 8192, 4096, w.now);
    let tiny = w.edge.sign(0, 4096, 256, w.now);
    w.run(Duration::from_secs(2), |w| w.sign_done(past).is_some());
    assert!(
        matches!(
            w.sign_done(past),
            Some(Err(crate::LinkError::Refused {
                code: ErrorCode::OutOfRange,
                ..
            }))
        ),
        "{:?}",
        w.sign_done(past)
    );
    assert!(matches!(
        w.sign_done(tiny),
        Some(Err(crate::LinkError::Unexpected(_)))
    ));
    assert!(w.edge.is_up(), "a refused query does not end the link");
}

#[test]
fn allocation_queries_are_answered_within_their_range() {
    let mut w = World::new(MBIT100, Duration::from_millis(5), 1 << 20);
    // Data, a hole, zeroes, data again, and a hole to the end; the device
    // cuts its data extent in two, which the map merges.
    w.alloc = vec![
        ext(0, MIB / 2, ExtentKind::Data),
        ext(MIB / 2, MIB / 2, ExtentKind::Data),
        ext(MIB, 2 * MIB, ExtentKind::Hole),
        ext(3 * MIB, MIB, ExtentKind::Zero),
        ext(4 * MIB, MIB, ExtentKind::Data),
        ext(5 * MIB, 3 * MIB, ExtentKind::Hole),
    ];
    w.run(Duration::from_secs(2), |w| w.edge.is_up());

    // From inside the first extent to inside the fifth.
    let id = w.edge.extents(4096, 4 * MIB + 4096, w.now);
    w.run(Duration::from_secs(2), |w| w.extents_done(id).is_some());
    let got = w.extents_done(id).unwrap().as_ref().unwrap();
    assert_eq!(
        *got,
        [
            ext(4096, MIB - 4096, ExtentKind::Data),
            ext(MIB, 2 * MIB, ExtentKind::Hole),
            ext(3 * MIB, MIB, ExtentKind::Zero),
            ext(4 * MIB, 8192, ExtentKind::Data),
        ]
    );

    // A device that describes less than asked: the answer is the prefix,
    // and the edge asks again from where it ended.
    w.alloc_max = 2;
    let id = w.edge.extents(MIB, 7 * MIB, w.now);
    w.run(Duration::from_secs(2), |w| w.extents_done(id).is_some());
    let got = w.extents_done(id).unwrap().as_ref().unwrap().clone();
    assert_eq!(
        got,
        [
            ext(MIB, 2 * MIB, ExtentKind::Hole),
            ext(3 * MIB, MIB, ExtentKind::Zero),
        ]
    );
    let id = w.edge.extents(4 * MIB, 4 * MIB, w.now);
    w.run(Duration::from_secs(2), |w| w.extents_done(id).is_some());
    let got = w.extents_done(id).unwrap().as_ref().unwrap();
    assert_eq!(
        *got,
        [
            ext(4 * MIB, MIB, ExtentKind::Data),
            ext(5 * MIB, 3 * MIB, ExtentKind::Hole),
        ]
    );
    assert_eq!(w.origin.as_ref().unwrap().stats(w.now).extent_queries, 3);

    // Past the end: refused by the origin; empty: refused at once.
    let past = w.edge.extents(8 * MIB - 4096, 8192, w.now);
    let empty = w.edge.extents(0, 0, w.now);
    w.run(Duration::from_secs(2), |w| w.extents_done(past).is_some());
    assert!(
        matches!(
            w.extents_done(past),
            Some(Err(crate::LinkError::Refused {
                code: ErrorCode::OutOfRange,
                ..
            }))
        ),
        "{:?}",
        w.extents_done(past)
    );
    assert!(matches!(
        w.extents_done(empty),
        Some(Err(crate::LinkError::Unexpected(_)))
    ));
    assert!(w.edge.is_up(), "a refused query does not end the link");
}

#[test]
fn an_allocation_query_waits_across_a_reconnection() {
    let mut w = World::new(MBIT100, Duration::from_millis(10), 1 << 20);
    w.run(Duration::from_secs(2), |w| w.edge.is_up());
    w.up.stalled = true;
    w.down.stalled = true;
    let id = w.edge.extents(0, 8 * MIB, w.now);
    w.run(Duration::from_secs(8), |w| w.edge.stats(w.now).deaths > 0);
    assert!(w.extents_done(id).is_none());
    w.up.stalled = false;
    w.down.stalled = false;
    w.run(Duration::from_secs(5), |w| w.extents_done(id).is_some());
    let got = w.extents_done(id).unwrap().as_ref().unwrap();
    assert_eq!(*got, [ext(0, 8 * MIB, ExtentKind::Data)]);
    assert_eq!(w.edge.stats(w.now).connects, 2);
}

#[test]
fn a_cut_over_release_waits_for_every_batch_then_ends_the_session() {
    let mut w = World::new(MBIT100, Duration::from_millis(10), 1 << 20);
    w.run(Duration::from_secs(2), |w| w.edge.is_up());
    w.edge.ship(1, batch(1, 2 << 20), w.now);
    w.edge.ship(2, batch(2, 1 << 20), w.now);
    w.edge.release(Disposition::CutOver).unwrap();
    // The same release again is no conflict; another one is.
    w.edge.release(Disposition::CutOver).unwrap();
    assert!(w.edge.release(Disposition::Home).is_err());
    w.run(Duration::from_secs(10), |w| {
        w.has_event(|e| matches!(e, EdgeEvent::Detached))
    });
    // Asked for once, after both batches were applied, as a release.
    assert_eq!(w.releases, [(Disposition::CutOver, 2)]);
    assert_eq!(w.detaches, 0);
    let at = |f: &dyn Fn(&EdgeEvent) -> bool| w.events.iter().position(|(_, e)| f(e));
    let detached = at(&|e| matches!(e, EdgeEvent::Detached)).unwrap();
    let applied = at(&|e| matches!(e, EdgeEvent::BatchApplied { seq: 2 })).unwrap();
    assert!(applied < detached, "{:?}", w.events);
    assert!(matches!(
        w.edge.finished(),
        Some(crate::LinkError::Detached)
    ));
    assert_eq!(w.edge.poll_timeout(), None);
    assert!(matches!(
        w.edge.release(Disposition::Home),
        Err(crate::LinkError::Detached)
    ));
}

#[test]
fn a_refused_release_keeps_the_volume_attached() {
    let mut w = World::new(MBIT100, Duration::from_millis(5), 1 << 20);
    w.run(Duration::from_secs(2), |w| w.edge.is_up());
    w.refuse_release = Some(Refusal::new(
        ErrorCode::Io,
        "the record could not be written",
    ));
    w.edge.release(Disposition::Home).unwrap();
    w.run(Duration::from_secs(2), |w| {
        w.has_event(|e| matches!(e, EdgeEvent::DetachRefused(_)))
    });
    assert!(w.has_event(|e| matches!(
        e,
        EdgeEvent::DetachRefused(crate::LinkError::Refused {
            code: ErrorCode::Io,
            ..
        })
    )));
    assert_eq!(w.releases, [(Disposition::Home, 0)]);
    assert!(w.edge.is_up() && w.edge.finished().is_none());
    // The session goes on: batches ship, reads are answered, and the
    // release can be asked again (now granted).
    w.edge.ship(1, batch(1, 64 << 10), w.now);
    let read = w.edge.read(0, 4096, false, w.now);
    w.run(Duration::from_secs(2), |w| {
        w.applied_seq() == 1 && w.read_done(read).is_some()
    });
    assert!(matches!(w.read_done(read), Some(Ok(_))));
    w.refuse_release = None;
    w.edge.release(Disposition::CutOver).unwrap();
    w.run(Duration::from_secs(2), |w| w.edge.finished().is_some());
    assert_eq!(
        w.releases,
        [(Disposition::Home, 0), (Disposition::CutOver, 1)]
    );
    assert!(w.has_event(|e| matches!(e, EdgeEvent::Detached)));
}

fn is_migrated(e: &crate::LinkError) -> bool {
    matches!(
        e,
        crate::LinkError::Refused {
            code: ErrorCode::Migrated,
            ..
        }
    )
}

#[test]
fn an_attach_refused_as_migrated_stops_the_session() {
    let migrated = Refusal::new(
        ErrorCode::Migrated,
        "volume \"vol\" was migrated to edge \"edge-2\": move it back from that edge first",
    );
    // At the first attach.
    let mut w = World::new(MBIT100, Duration::from_millis(5), 1 << 20);
    w.refuse = Some(migrated.clone());
    w.run(Duration::from_secs(2), |w| w.edge.finished().is_some());
    assert!(w.edge.finished().is_some_and(is_migrated));
    assert!(w.has_event(|e| matches!(e, EdgeEvent::Failed(e) if is_migrated(e))));
    assert!(!w.has_event(|e| matches!(e, EdgeEvent::Refused(_))));
    w.run(Duration::from_secs(10), |_| false);
    assert_eq!(w.connects, 1, "not retried");
    assert!(w.edge.attachment().is_none());

    // At a reconnection: what waits fails with it, nothing is retried.
    let mut w = World::new(MBIT100, Duration::from_millis(5), 1 << 20);
    w.run(Duration::from_secs(2), |w| w.edge.is_up());
    w.refuse = Some(migrated);
    w.disconnect();
    let read = w.edge.read(0, 4096, false, w.now);
    let query = w.edge.extents(0, 4096, w.now);
    w.run(Duration::from_secs(2), |w| w.edge.finished().is_some());
    assert!(matches!(w.read_done(read), Some(Err(e)) if is_migrated(e)));
    assert!(matches!(w.extents_done(query), Some(Err(e)) if is_migrated(e)));
    let st = w.edge.stats(w.now);
    assert!(!st.fenced, "{st:?}");
    assert!(
        st.stopped.as_deref().unwrap_or("").contains("edge-2"),
        "{st:?}"
    );
    let connects = w.connects;
    w.run(Duration::from_secs(10), |_| false);
    assert_eq!(w.connects, connects);
    assert_eq!(w.edge.poll_timeout(), None);
}

//! One edge and one origin, their link and their disks, in virtual time.
//!
//! ```text
//!   workload (reads, writes, FUA, trims, flushes) ──> EdgeVolume (real)
//!      journal: journal::Journal (real, inline syncs) over MemStorage
//!      cache:   SimCache (the real fill rule) over RemoteQueue
//!   EdgeSession (real) <── Net: delay, rate, bounded queue, cuts, stalls,
//!                              one-way partitions ──> OriginSession (real)
//!   Origin (real: ownership, apply journal over MemStorage, reads) over SimDisk
//!   faults: crashes and restarts of either process, power loss (unsynced
//!   file bytes and unflushed disk sectors lost or torn), failed syncs,
//!   failed disk writes, a full journal disk
//! ```
//!
//! Besides the workload's reads, every attach of the edge asks the origin
//! for the allocation map of the volume from a point that moves with each
//! reconnection (as a migration's copy does), and checks the answer.
//!
//! One seeded RNG decides everything: the scenario (link shape, RPO, batch
//! size, fault rates), the workload, the fault times, the order in which
//! ready tasks run. The same seed replays the same run exactly.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use blockcore::{BlockDevice, Extent, ExtentKind, WriteEntry};
use bytes::Bytes;
use edge::EdgeVolume;
use journal::apply::Applied;
use journal::storage::mem::MemStorage;
use journal::{Batch, Clock as JournalClock, Due, Journal, JournalOptions, SyncMode};
use link::cc::CcConfig;
use link::session::{
    EdgeEvent, EdgeSession, EdgeSessionConfig, Mistakes, OriginOp, OriginSession,
    OriginSessionConfig, ReadAnswer, ReadReply, Refusal, RequestId,
};
use origin::{FileIo, Origin, OriginConfig, ReadSpec, Volume};

use crate::cache::{RemoteQueue, SimCache};
use crate::disk::SimDisk;
use crate::exec::{now_or_never, Clock, Executor, Owner};
use crate::model::{block_content, decode, GuestModel, Seen, BLOCK};

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What to run.
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub seed: u64,
    /// Virtual time of workload and faults, before the final drain.
    pub duration: Duration,
    /// Known mistakes to reintroduce (to show the simulator finds them).
    pub mistakes: Mistakes,
    /// Crashes, cuts and disk faults; off, only the workload runs.
    pub faults: bool,
    /// At every attach the edge asks for a window of the allocation map,
    /// as a migration's copy does. The extra replies change what crosses
    /// the link; off gives the traffic of the link before migrations.
    pub allocation_queries: bool,
}

impl SimConfig {
    pub fn new(seed: u64) -> Self {
        SimConfig {
            seed,
            duration: Duration::from_secs(120),
            mistakes: Mistakes::default(),
            faults: true,
            allocation_queries: true,
        }
    }

    /// The command that replays this run.
    pub fn replay_command(&self) -> String {
        let mut cmd = format!(
            "cargo run --release -p sim -- --seed {} --secs {}",
            self.seed,
            self.duration.as_secs()
        );
        let m = self.mistakes;
        for (on, name) in [
            (m.flush_before_sync, "flush-before-sync"),
            (m.ack_before_apply, "ack-before-apply"),
            (m.apply_twice, "apply-twice"),
            (m.heartbeat_liveness, "heartbeat-liveness"),
        ] {
            if on {
                cmd.push_str(" --mistake ");
                cmd.push_str(name);
            }
        }
        if !self.faults {
            cmd.push_str(" --no-faults");
        }
        if !self.allocation_queries {
            cmd.push_str(" --no-allocation-queries");
        }
        cmd
    }
}

/// The shape of one run, drawn from the seed.
#[derive(Clone, Debug)]
pub struct Scenario {
    pub rate: u64,
    pub one_way: Duration,
    pub queue: usize,
    pub rpo: Duration,
    pub batch_bytes: u64,
    pub journal_capacity: u64,
    /// Mean time between workload operations.
    pub op_every: Duration,
    pub max_outstanding: usize,
    /// Mean time between faults (when faults are on).
    pub fault_every: Duration,
    pub storage_latency: Duration,
    /// The mean time an origin disk flush takes (a busy disk: seconds).
    pub flush_latency: Duration,
}

/// What a clean run did.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub virtual_time: Duration,
    pub ops: u64,
    pub reads_checked: u64,
    pub writes: u64,
    pub flushes: u64,
    pub edge_crashes: u64,
    pub origin_crashes: u64,
    pub link_faults: u64,
    pub disk_faults: u64,
    pub batches_applied: u64,
    pub reconnects: u64,
    /// Allocation maps the edge received and checked.
    pub extent_maps_checked: u64,
    /// Digest of the run's events: equal for equal seeds.
    pub trace: u64,
}

/// An invariant broke.
#[derive(Clone, Debug)]
pub struct Failure {
    pub at: Duration,
    pub what: String,
    pub replay: String,
    pub scenario: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "at {:.3}s: {}\n  scenario: {}\n  replay:   {}",
            self.at.as_secs_f64(),
            self.what,
            self.scenario,
            self.replay
        )
    }
}

const VOLUME: usize = 4 << 20;
const BLOCKS: usize = VOLUME / BLOCK;
const CHUNK: u64 = 16 << 10;
const CACHE_CHUNKS: usize = 48;

/// A small deterministic RNG (wyrand, through `fastrand`).
struct Rng(fastrand::Rng);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.0.u64(..n)
        }
    }

    fn chance(&mut self, p: f64) -> bool {
        self.0.f64() < p
    }

    /// Exponentially distributed around `mean`.
    fn exp(&mut self, mean: Duration) -> Duration {
        let u = self.0.f64().max(1e-9);
        Duration::from_secs_f64((-u.ln() * mean.as_secs_f64()).min(mean.as_secs_f64() * 20.0))
    }

    fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        lo + Duration::from_secs_f64(self.0.f64() * hi.saturating_sub(lo).as_secs_f64())
    }
}

/// One direction of one connection.
#[derive(Debug)]
struct Pipe {
    queued: usize,
    free_at: Duration,
    in_flight: VecDeque<(Duration, Bytes)>,
}

impl Pipe {
    fn new() -> Self {
        Pipe {
            queued: 0,
            free_at: Duration::ZERO,
            in_flight: VecDeque::new(),
        }
    }
}

#[derive(Debug)]
struct NetConn {
    /// Edge to origin, origin to edge.
    up: Pipe,
    down: Pipe,
    /// The origin closed: the edge sees the end once `down` is empty.
    origin_closed: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    Workload,
    Fault,
    /// A supervisor restarts the edge (its journal's disk failed).
    EdgeCrash,
    EdgeRestart,
    OriginRestart,
    ConnectDone(u64),
    ConnectFailed(u64),
    Liveness,
    EndWorkload,
    /// Nothing to do but let time pass to here (a session or journal
    /// deadline the loop asked for).
    Wake,
}

/// Checks an allocation map the edge received for `[offset, offset +
/// len)`: contiguous extents from `offset`, none empty, at least one byte
/// and never past the range. The origin's disk reports no allocation (all
/// data), so the map must say just that: anything else came from nowhere.
fn check_extent_map(offset: u64, len: u64, extents: &[Extent]) -> Result<(), String> {
    let mut at = offset;
    for e in extents {
        if e.offset != at || e.len == 0 {
            return Err(format!(
                "allocation map for {len} bytes at {offset} is not contiguous from there: {extents:?}"
            ));
        }
        if e.kind != ExtentKind::Data {
            return Err(format!(
                "allocation map for {len} bytes at {offset} reports {:?} at {}, but the origin's disk reports all data",
                e.kind, e.offset
            ));
        }
        at += e.len;
    }
    if at == offset || at > offset + len {
        return Err(format!(
            "allocation map for {len} bytes at {offset} covers {} bytes: {extents:?}",
            at - offset
        ));
    }
    Ok(())
}

/// What a cut task hands back: a batch, nothing due, or why it failed.
type CutResult = Result<Option<Batch>, String>;

struct EdgeProc {
    gen: u64,
    session: EdgeSession,
    volume: Arc<EdgeVolume<SimCache>>,
    remote: Arc<RemoteQueue>,
    reads: BTreeMap<RequestId, u64>,
    /// Allocation queries waiting: (offset, len).
    extent_queries: BTreeMap<RequestId, (u64, u64)>,
    conn: Option<u64>,
    cutting: Arc<AtomicBool>,
    ship: Arc<Mutex<VecDeque<CutResult>>>,
    applied_target: u64,
    applying: Arc<AtomicBool>,
    started: Duration,
}

struct OriginConn {
    session: OriginSession,
    no: u64,
    volume: Option<Arc<Volume>>,
}

enum Done {
    Read(u64, Result<ReadAnswer, Refusal>),
    Apply(u64, Result<(), Refusal>),
    Extents(u64, Result<Vec<Extent>, Refusal>),
    Sign(u64, Result<Vec<[u8; 32]>, Refusal>),
    Profile(u64, Result<(), Refusal>),
    Plan(u64, Result<Vec<(u64, u32)>, Refusal>),
    Release(Result<(), Refusal>),
}

struct OriginProc {
    gen: u64,
    origin: Arc<Origin>,
    conns: BTreeMap<u64, OriginConn>,
    done: Arc<Mutex<VecDeque<(u64, Done)>>>,
}

/// What the origin's image must be: the base plus whole batches.
#[derive(Debug)]
struct OriginModel {
    image: Vec<u8>,
    applied: u64,
    /// Batch contents, by seq, as cut.
    batches: BTreeMap<u64, Vec<WriteEntry>>,
    /// Batches handed to the session at least once.
    shipped: BTreeSet<u64>,
    applied_now: BTreeMap<u64, u32>,
}

impl OriginModel {
    fn apply(&mut self, seq: u64) -> Result<(), String> {
        let entries = self
            .batches
            .get(&seq)
            .ok_or_else(|| format!("the origin applied batch {seq}, which the edge never cut"))?;
        for e in entries {
            let o = usize::try_from(e.offset()).expect("small");
            match e {
                WriteEntry::Data { data, .. } => {
                    self.image[o..o + data.len()].copy_from_slice(data);
                }
                WriteEntry::Zero { len, .. } => {
                    self.image[o..o + usize::try_from(*len).expect("small")].fill(0);
                }
            }
        }
        self.applied = seq;
        Ok(())
    }

    fn check_image(&self, disk: &[u8]) -> Result<(), String> {
        if disk == self.image.as_slice() {
            return Ok(());
        }
        let at = disk
            .iter()
            .zip(&self.image)
            .position(|(a, b)| a != b)
            .unwrap_or(0);
        Err(format!(
            "the origin's image is not the state after batch {} (first difference at byte {at}, block {})",
            self.applied,
            at / BLOCK
        ))
    }
}

/// The world. See the module docs.
#[allow(missing_debug_implementations)]
pub struct Sim {
    cfg: SimConfig,
    sc: Scenario,
    rng: Rng,
    clock: Clock,
    exec: Executor,
    events: BinaryHeap<Reverse<(Duration, u64, Ev)>>,
    event_seq: u64,
    net: BTreeMap<u64, NetConn>,
    next_conn: u64,
    /// No connection can be made or kept before this.
    cut_until: Duration,
    /// Nothing moves on the link before this.
    stall_until: Duration,
    /// One direction (true: edge to origin) delivers nothing before this.
    oneway: (bool, Duration),
    healthy_since: Duration,
    edge: Option<EdgeProc>,
    edge_gen: u64,
    edge_storage: MemStorage,
    edge_id: String,
    origin: Option<OriginProc>,
    origin_gen: u64,
    origin_storage: MemStorage,
    disk: Arc<SimDisk>,
    guest: Arc<Mutex<GuestModel>>,
    model: Arc<Mutex<OriginModel>>,
    failure: Arc<Mutex<Option<String>>>,
    outstanding: Arc<AtomicU64>,
    flush_no: u64,
    workload_on: bool,
    draining: bool,
    report: Report,
    ops: Arc<Mutex<Report>>,
    trace: u64,
    /// `SIM_TRACE=1`: print what happens to stderr.
    verbose: bool,
}

fn scenario(rng: &mut Rng) -> Scenario {
    // A third of the runs are the issue's case: a sustained writer faster
    // than a slow WAN, long RPOs and big batches; the rest spread wide.
    if rng.chance(0.33) {
        let mbit = [1u64, 2, 5, 10][usize::try_from(rng.below(4)).expect("small")];
        return Scenario {
            rate: mbit * 1_000_000 / 8,
            one_way: Duration::from_millis(10 + rng.below(50)),
            queue: (1 << 20) << rng.below(3),
            rpo: Duration::from_millis(1000 + rng.below(9000)),
            batch_bytes: (1 << 20) << rng.below(5),
            journal_capacity: 8 << 20,
            op_every: Duration::from_millis(1 + rng.below(5)),
            max_outstanding: 8 + usize::try_from(rng.below(9)).expect("small"),
            fault_every: Duration::from_millis(5000 + rng.below(30_000)),
            storage_latency: Duration::from_micros(50 + rng.below(1000)),
            flush_latency: Duration::from_micros(200 + rng.below(20_000)),
        };
    }
    let mbit = [1u64, 2, 5, 10, 20, 50, 100][usize::try_from(rng.below(7)).expect("small")];
    Scenario {
        rate: mbit * 1_000_000 / 8,
        one_way: Duration::from_millis(1 + rng.below(60)),
        queue: (256 << 10) << rng.below(6),
        rpo: Duration::from_millis(200 + rng.below(5000)),
        batch_bytes: (64 << 10) << rng.below(9),
        journal_capacity: (4 << 20) << rng.below(2),
        op_every: Duration::from_millis(2 + rng.below(30)),
        max_outstanding: 1 + usize::try_from(rng.below(16)).expect("small"),
        fault_every: Duration::from_millis(2000 + rng.below(20_000)),
        storage_latency: Duration::from_micros(50 + rng.below(3000)),
        flush_latency: if rng.chance(0.3) {
            Duration::from_millis(200 + rng.below(1500))
        } else {
            Duration::from_micros(200 + rng.below(20_000))
        },
    }
}

impl Sim {
    pub fn new(cfg: SimConfig) -> Self {
        let mut rng = Rng(fastrand::Rng::with_seed(cfg.seed));
        let sc = scenario(&mut rng);
        let base: Vec<u8> = (0..BLOCKS as u64)
            .flat_map(|b| block_content(0, b))
            .collect();
        let mut sim = Sim {
            sc,
            rng,
            clock: Clock::default(),
            exec: Executor::default(),
            events: BinaryHeap::new(),
            event_seq: 0,
            net: BTreeMap::new(),
            next_conn: 1,
            cut_until: Duration::ZERO,
            stall_until: Duration::ZERO,
            oneway: (false, Duration::ZERO),
            healthy_since: Duration::ZERO,
            edge: None,
            edge_gen: 0,
            edge_storage: MemStorage::default(),
            edge_id: format!("edge-{:x}", cfg.seed),
            origin: None,
            origin_gen: 0,
            origin_storage: MemStorage::default(),
            disk: Arc::new(SimDisk::new(base.clone())),
            guest: Arc::new(Mutex::new(GuestModel::new(BLOCKS))),
            model: Arc::new(Mutex::new(OriginModel {
                image: base,
                applied: 0,
                batches: BTreeMap::new(),
                shipped: BTreeSet::new(),
                applied_now: BTreeMap::new(),
            })),
            failure: Arc::default(),
            outstanding: Arc::default(),
            flush_no: 0,
            workload_on: true,
            draining: false,
            report: Report::default(),
            ops: Arc::default(),
            trace: 0xcbf2_9ce4_8422_2325,
            verbose: std::env::var_os("SIM_TRACE").is_some(),
            cfg,
        };
        sim.schedule(Duration::ZERO, Ev::OriginRestart);
        sim.schedule(Duration::from_millis(1), Ev::EdgeRestart);
        sim.schedule(Duration::from_millis(5), Ev::Workload);
        sim.schedule(Duration::from_secs(1), Ev::Liveness);
        if sim.cfg.faults {
            let d = sim.rng.exp(sim.sc.fault_every);
            sim.schedule(d, Ev::Fault);
        }
        sim.schedule(sim.cfg.duration, Ev::EndWorkload);
        sim
    }

    pub fn scenario(&self) -> &Scenario {
        &self.sc
    }

    fn schedule(&mut self, after: Duration, ev: Ev) {
        self.event_seq += 1;
        let at = self.clock.now() + after;
        self.events.push(Reverse((at, self.event_seq, ev)));
    }

    fn log(&self, what: impl FnOnce() -> String) {
        if self.verbose {
            eprintln!("{:>10.3} {}", self.clock.now().as_secs_f64(), what());
        }
    }

    fn note(&mut self, what: u64) {
        // FNV-1a over the run's events.
        for b in what.to_le_bytes() {
            self.trace ^= u64::from(b);
            self.trace = self.trace.wrapping_mul(0x100_0000_01b3);
        }
    }

    fn fail(&self, what: String) -> Failure {
        Failure {
            at: self.clock.now(),
            what,
            replay: self.cfg.replay_command(),
            scenario: format!("{:?}", self.sc),
        }
    }

    fn check_failure(&self) -> Result<(), Failure> {
        match lock(&self.failure).clone() {
            Some(what) => Err(self.fail(what)),
            None => Ok(()),
        }
    }

    /// Runs to the end: workload and faults for the configured time, then
    /// a drain, then the final comparison.
    pub fn run(mut self) -> Result<Report, Failure> {
        let deadline = self.cfg.duration + Duration::from_secs(1800);
        loop {
            self.step()?;
            if self.draining && self.drained() {
                break;
            }
            if self.clock.now() > deadline {
                return Err(self.fail(format!(
                    "did not drain within 30 minutes of virtual time after the workload stopped: {}",
                    self.edge_summary()
                )));
            }
        }
        self.final_check()?;
        let mut r = lock(&self.ops).clone();
        r.virtual_time = self.clock.now();
        r.edge_crashes = self.report.edge_crashes;
        r.origin_crashes = self.report.origin_crashes;
        r.link_faults = self.report.link_faults;
        r.disk_faults = self.report.disk_faults;
        r.reconnects = self.report.reconnects;
        r.extent_maps_checked = self.report.extent_maps_checked;
        r.batches_applied = lock(&self.model).applied;
        r.trace = self.trace;
        Ok(r)
    }

    fn edge_summary(&self) -> String {
        match &self.edge {
            None => "the edge is down".into(),
            Some(e) => {
                let j = e.volume.journal().stats();
                let l = e.session.stats(self.clock.instant());
                format!(
                    "link up {}, batches held {}, journal unshipped {} bytes in {} records, \
                     oldest {:?}, in flight {}, acked seq {}, last cut {}, deaths {}, connects {}",
                    l.connected,
                    l.batches_held,
                    j.unshipped_bytes,
                    j.unshipped_records,
                    j.oldest_unshipped_age,
                    j.batches_in_flight,
                    j.acked_seq,
                    j.last_cut_seq,
                    l.deaths,
                    l.connects
                )
            }
        }
    }

    /// One turn: run ready tasks, let both processes act, move time to the
    /// next thing that happens, deliver it, check.
    fn step(&mut self) -> Result<(), Failure> {
        let rng = &mut self.rng;
        let polls = self
            .exec
            .run_ready(|n| usize::try_from(rng.below(n as u64)).expect("small"));
        self.note(polls as u64);
        self.check_failure()?;
        self.pump_edge()?;
        self.pump_origin();
        if self.exec.has_ready() {
            return Ok(());
        }
        // Next time anything happens.
        let now = self.clock.now();
        let mut next = self.events.peek().map(|Reverse((t, _, _))| *t);
        let mut take = |t: Option<Duration>| {
            if let Some(t) = t {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        };
        take(self.clock.next_timer());
        if let Some(e) = &self.edge {
            take(e.session.poll_timeout().map(|t| self.clock.since_start(t)));
        }
        if let Some(o) = &self.origin {
            for c in o.conns.values() {
                take(c.session.poll_timeout().map(|t| self.clock.since_start(t)));
            }
        }
        for (up, c) in self
            .net
            .values()
            .flat_map(|c| [(true, &c.up), (false, &c.down)])
        {
            if let Some((t, _)) = c.in_flight.front() {
                take(Some((*t).max(self.paused_until(up))));
            }
        }
        let next = next.unwrap_or(now + Duration::from_millis(100)).max(now);
        self.clock.advance(next);
        self.note(u64::try_from(next.as_nanos()).unwrap_or(u64::MAX));
        self.deliver();
        while let Some(Reverse((t, _, ev))) = self.events.peek().copied() {
            if t > self.clock.now() {
                break;
            }
            self.events.pop();
            self.note(ev_code(ev));
            if !matches!(ev, Ev::Wake | Ev::Workload) {
                self.log(|| format!("event {ev:?}"));
            }
            self.event(ev)?;
        }
        let at = self.clock.instant();
        if let Some(e) = &mut self.edge {
            e.session.handle_timeout(at);
        }
        if let Some(o) = &mut self.origin {
            for c in o.conns.values_mut() {
                c.session.handle_timeout(at);
            }
        }
        Ok(())
    }

    fn paused_until(&self, up: bool) -> Duration {
        let mut t = self.stall_until;
        if self.oneway.0 == up {
            t = t.max(self.oneway.1);
        }
        t
    }

    fn deliver(&mut self) {
        let now = self.clock.now();
        let at = self.clock.instant();
        let (pause_up, pause_down) = (self.paused_until(true), self.paused_until(false));
        let ids: Vec<u64> = self.net.keys().copied().collect();
        for id in ids {
            let mut to_origin = Vec::new();
            let mut to_edge = Vec::new();
            let mut ended = false;
            {
                let c = self.net.get_mut(&id).expect("listed");
                if now >= pause_up {
                    while c.up.in_flight.front().is_some_and(|(t, _)| *t <= now) {
                        let (_, b) = c.up.in_flight.pop_front().expect("checked");
                        c.up.queued -= b.len();
                        to_origin.push(b);
                    }
                }
                if now >= pause_down {
                    while c.down.in_flight.front().is_some_and(|(t, _)| *t <= now) {
                        let (_, b) = c.down.in_flight.pop_front().expect("checked");
                        c.down.queued -= b.len();
                        to_edge.push(b);
                    }
                }
                if c.origin_closed && c.down.in_flight.is_empty() {
                    ended = true;
                }
            }
            if let Some(o) = &mut self.origin {
                if let Some(oc) = o.conns.get_mut(&id) {
                    for b in &to_origin {
                        oc.session.handle_input(b, at);
                    }
                }
            }
            if let Some(e) = &mut self.edge {
                if e.conn == Some(id) {
                    for b in &to_edge {
                        e.session.handle_input(b, at);
                    }
                    if ended {
                        e.conn = None;
                        e.session.disconnected(at);
                    }
                }
            }
            let n: usize = to_origin.iter().chain(&to_edge).map(Bytes::len).sum();
            self.note(n as u64);
            if ended {
                self.net.remove(&id);
            }
        }
    }

    fn send(&mut self, conn: u64, up: bool, frame: Bytes) {
        let now = self.clock.now();
        let (rate, delay) = (self.sc.rate, self.sc.one_way);
        let Some(c) = self.net.get_mut(&conn) else {
            return;
        };
        let p = if up { &mut c.up } else { &mut c.down };
        let start = p.free_at.max(now);
        #[allow(clippy::cast_precision_loss)]
        let ser = Duration::from_secs_f64(frame.len() as f64 / rate as f64);
        p.free_at = start + ser;
        p.queued += frame.len();
        p.in_flight.push_back((p.free_at + delay, frame));
    }

    fn has_room(&self, conn: u64, up: bool) -> bool {
        self.net.get(&conn).is_some_and(|c| {
            let p = if up { &c.up } else { &c.down };
            p.queued < self.sc.queue
        })
    }

    /// Resets connection `id` (both ends see it at once).
    fn reset(&mut self, id: u64) {
        self.net.remove(&id);
        let at = self.clock.instant();
        if let Some(e) = &mut self.edge {
            if e.conn == Some(id) {
                e.conn = None;
                e.session.disconnected(at);
            }
        }
        self.drop_origin_conn(id);
    }

    fn drop_origin_conn(&mut self, id: u64) {
        if let Some(o) = &mut self.origin {
            if let Some(mut c) = o.conns.remove(&id) {
                if let Some(v) = c.volume.take() {
                    o.origin.release(c.no, &v, c.session.take_partial());
                }
            }
        }
    }

    // --- the edge ------------------------------------------------------

    fn start_edge(&mut self) -> Result<(), Failure> {
        self.edge_gen += 1;
        let clock = self.clock.clone();
        let opts = JournalOptions {
            capacity: self.sc.journal_capacity,
            segment_size: 1 << 20,
            max_write: 256 << 10,
            memory_limit: 1 << 20,
            clock: JournalClock::from_fn(move || {
                u64::try_from(clock.now().as_nanos()).unwrap_or(u64::MAX)
            }),
            sync_mode: SyncMode::Inline,
            ..JournalOptions::default()
        };
        let journal = match Journal::open_with(
            Arc::new(self.edge_storage.clone()),
            &PathBuf::from("/edge/journal"),
            opts,
        ) {
            Ok(j) => j,
            // The disk failed an operation: a supervisor tries again.
            Err(journal::JournalError::Io { .. }) => {
                self.note(0x0e0d);
                self.schedule(Duration::from_secs(1), Ev::EdgeRestart);
                return Ok(());
            }
            Err(e) => return Err(self.fail(format!("the edge's journal does not reopen: {e}"))),
        };
        let remote = Arc::new(RemoteQueue::default());
        let cache = SimCache::new(CHUNK, VOLUME as u64, CACHE_CHUNKS, remote.clone());
        let volume = Arc::new(EdgeVolume::new(
            journal,
            cache,
            VOLUME as u64,
            self.cfg.mistakes,
        ));
        let mut cfg = EdgeSessionConfig::new("vol", self.edge_id.clone());
        cfg.request_timeout = Duration::from_secs(30);
        cfg.max_batches = 3;
        cfg.mistakes = self.cfg.mistakes;
        cfg.cc = CcConfig::default();
        let mut session = EdgeSession::new(cfg, self.clock.instant());
        let batches = volume
            .unshipped()
            .map_err(|e| self.fail(format!("unshipped batches unreadable after a restart: {e}")))?;
        for b in batches {
            self.record_batch(&b)?;
            session.ship(b.seq, b.entries, self.clock.instant());
        }
        self.edge = Some(EdgeProc {
            gen: self.edge_gen,
            session,
            volume,
            remote,
            reads: BTreeMap::new(),
            extent_queries: BTreeMap::new(),
            conn: None,
            cutting: Arc::default(),
            ship: Arc::default(),
            applied_target: 0,
            applying: Arc::default(),
            started: self.clock.now(),
        });
        Ok(())
    }

    fn crash_edge(&mut self) {
        let Some(e) = self.edge.take() else {
            return;
        };
        self.report.edge_crashes += 1;
        self.exec.kill(Owner::Edge(e.gen));
        if let Some(c) = e.conn {
            self.net.remove(&c);
            self.drop_origin_conn(c);
        }
        drop(e);
        let rng = &mut self.rng;
        self.edge_storage.power_loss(|extra| {
            let keep = usize::try_from(rng.below(extra as u64 + 1)).expect("small");
            (keep, rng.chance(0.2))
        });
        lock(&self.guest).crash();
        self.outstanding.store(0, Ordering::Relaxed);
        let d = self
            .rng
            .between(Duration::from_millis(200), Duration::from_secs(5));
        self.schedule(d, Ev::EdgeRestart);
    }

    /// Remembers a batch's content by seq; a batch shipped before must
    /// come back identical.
    fn record_batch(&mut self, b: &Batch) -> Result<(), Failure> {
        let mut m = lock(&self.model);
        if m.shipped.contains(&b.seq) {
            if m.batches.get(&b.seq) != Some(&b.entries) {
                drop(m);
                return Err(self.fail(format!(
                    "batch {} was shipped, and after a restart the journal gives it different content",
                    b.seq
                )));
            }
        } else {
            m.batches.insert(b.seq, b.entries.clone());
        }
        m.shipped.insert(b.seq);
        Ok(())
    }

    fn pump_edge(&mut self) -> Result<(), Failure> {
        let now = self.clock.instant();
        let Some(mut e) = self.edge.take() else {
            return Ok(());
        };
        let result = self.pump_edge_inner(&mut e, now);
        if self.edge.is_none() {
            self.edge = Some(e);
        }
        result
    }

    fn pump_edge_inner(
        &mut self,
        e: &mut EdgeProc,
        now: std::time::Instant,
    ) -> Result<(), Failure> {
        // Batches the cut task produced.
        let cut: Vec<_> = lock(&e.ship).drain(..).collect();
        for r in cut {
            match r {
                Ok(Some(b)) => {
                    self.record_batch(&b)?;
                    e.session.ship(b.seq, b.entries, now);
                }
                Ok(None) => {}
                Err(why) => {
                    // A failed journal: the edge process would stop; a
                    // supervisor restarts it.
                    self.note(0xdead);
                    let _ = why;
                }
            }
        }
        // Reads the cache asks of the origin.
        for (slot, offset, len) in e.remote.take_requests() {
            self.log(|| format!("edge: read {len} at {offset} (up {})", e.session.is_up()));
            let id = e.session.read(offset, len, false, now);
            e.reads.insert(id, slot);
        }
        while let Some(ev) = e.session.poll_event() {
            if !matches!(ev, EdgeEvent::ReadDone { .. } | EdgeEvent::Push { .. }) {
                self.log(|| format!("edge: {ev:?}"));
            }
            match ev {
                EdgeEvent::Connect => {
                    let rtt = self.sc.one_way * 2;
                    if self.clock.now() < self.cut_until {
                        self.schedule(rtt, Ev::ConnectFailed(e.gen));
                    } else {
                        self.schedule(rtt, Ev::ConnectDone(e.gen));
                    }
                }
                EdgeEvent::Close { .. } => {
                    if let Some(c) = e.conn.take() {
                        self.net.remove(&c);
                        self.drop_origin_conn(c);
                    }
                }
                EdgeEvent::Attached(_) => {
                    self.report.reconnects += 1;
                    if self.cfg.allocation_queries {
                        // A window of the allocation map, from a point that
                        // moves with each attach (no draw from the RNG).
                        let offset = (self.report.reconnects * 7 * 65536) % VOLUME as u64;
                        let len = (VOLUME as u64 - offset).min(1 << 20);
                        let id = e.session.extents(offset, len, now);
                        e.extent_queries.insert(id, (offset, len));
                    }
                }
                EdgeEvent::ExtentsDone { id, result } => {
                    if let (Some((offset, len)), Ok(extents)) =
                        (e.extent_queries.remove(&id), result)
                    {
                        check_extent_map(offset, len, &extents).map_err(|w| self.fail(w))?;
                        self.report.extent_maps_checked += 1;
                    }
                }
                EdgeEvent::Failed(err) => {
                    return Err(self.fail(format!("the edge's session failed for good: {err}")));
                }
                EdgeEvent::ReadDone { id, result } => {
                    if let Some(slot) = e.reads.remove(&id) {
                        let r = match result {
                            Ok(ReadReply::Data { data, .. }) => Ok(data),
                            Ok(ReadReply::Signatures { .. }) => Err("signatures".into()),
                            Err(err) => Err(err.to_string()),
                        };
                        e.remote.complete(slot, r);
                    }
                }
                EdgeEvent::Push {
                    offset,
                    as_of,
                    data,
                    ..
                } => {
                    let v = e.volume.clone();
                    self.exec.spawn(Owner::Edge(e.gen), async move {
                        v.offer_push(offset, as_of, data).await;
                    });
                }
                EdgeEvent::BatchApplied { seq } => e.applied_target = e.applied_target.max(seq),
                // The simulated edge asks for no signatures: a move back is
                // not part of its workload.
                EdgeEvent::Refused(_)
                | EdgeEvent::PrefetchDone { .. }
                | EdgeEvent::SignDone { .. }
                | EdgeEvent::ProfileStored { .. }
                | EdgeEvent::BatchFailed { .. }
                | EdgeEvent::Detached
                | EdgeEvent::DetachRefused(_) => {}
            }
        }
        // Settle applied batches, one call at a time.
        if e.applied_target > 0 && !e.applying.load(Ordering::Acquire) {
            let target = e.applied_target;
            e.applied_target = 0;
            e.applying.store(true, Ordering::Release);
            let (v, flag, failure) = (e.volume.clone(), e.applying.clone(), self.failure.clone());
            self.exec.spawn(Owner::Edge(e.gen), async move {
                if let Err(err) = v.applied(target).await {
                    if !matches!(
                        err,
                        journal::JournalError::Failed(_) | journal::JournalError::Io { .. }
                    ) {
                        *lock(&failure) = Some(format!("settling batch {target}: {err}"));
                    }
                }
                flag.store(false, Ordering::Release);
            });
        }
        // Cut a batch when one is due and the link takes it.
        if !e.cutting.load(Ordering::Acquire) && e.session.batch_room() > 0 {
            let age = if self.draining {
                Duration::ZERO
            } else {
                self.sc.rpo
            };
            match e.volume.journal().batch_due(self.sc.batch_bytes, age) {
                Ok(Due::Now) => {
                    e.cutting.store(true, Ordering::Release);
                    let (v, flag, out) = (e.volume.clone(), e.cutting.clone(), e.ship.clone());
                    let bytes = self.sc.batch_bytes;
                    self.exec.spawn(Owner::Edge(e.gen), async move {
                        let r = v.cut(bytes, age).await.map_err(|err| err.to_string());
                        lock(&out).push_back(r);
                        flag.store(false, Ordering::Release);
                    });
                }
                Ok(Due::After(d)) => self.schedule(d.max(Duration::from_millis(1)), Ev::Wake),
                Ok(Due::OnAppend) | Err(_) => {}
            }
        }
        // Frames out.
        if let Some(c) = e.conn {
            while self.has_room(c, true) && e.session.can_transmit(now) {
                let Some(f) = e.session.poll_transmit(now) else {
                    break;
                };
                self.send(c, true, f);
            }
        }
        Ok(())
    }

    fn connect_done(&mut self, gen: u64) {
        let Some(e) = &mut self.edge else {
            return;
        };
        if e.gen != gen {
            return;
        }
        let at = self.clock.instant();
        let mut nonce = [0u8; 32];
        self.rng.0.fill(&mut nonce);
        if !e.session.connected(at, nonce) {
            return;
        }
        let id = self.next_conn;
        self.next_conn += 1;
        self.net.insert(
            id,
            NetConn {
                up: Pipe::new(),
                down: Pipe::new(),
                origin_closed: false,
            },
        );
        e.conn = Some(id);
        match &mut self.origin {
            Some(o) => {
                let mut cfg = OriginSessionConfig {
                    group_size: 64 << 10,
                    chunk_size: u32::try_from(CHUNK).expect("small"),
                    ..OriginSessionConfig::default()
                };
                cfg.cc = CcConfig::default();
                let mut once = [0u8; 32];
                self.rng.0.fill(&mut once);
                o.conns.insert(
                    id,
                    OriginConn {
                        session: OriginSession::new(cfg, at, once),
                        no: o.origin.new_connection(),
                        volume: None,
                    },
                );
            }
            // Nobody listens: the connection is refused.
            None => self.reset(id),
        }
    }

    // --- the origin ----------------------------------------------------

    fn start_origin(&mut self) -> Result<(), Failure> {
        self.origin_gen += 1;
        let mut cfg = OriginConfig {
            file_io: FileIo::Inline,
            mistakes: self.cfg.mistakes,
            ..OriginConfig::default()
        };
        cfg.session.chunk_size = u32::try_from(CHUNK).expect("small");
        // Recovery must complete at once: no disk latency while opening.
        self.disk.set_flush_latency(None);
        let rng = &mut self.rng;
        let opened = now_or_never(Origin::open_with(
            Arc::new(self.origin_storage.clone()),
            &PathBuf::from("/origin"),
            vec![("vol".into(), self.disk.clone() as Arc<dyn BlockDevice>)],
            cfg,
            || {
                let mut b = [0u8; 32];
                rng.0.fill(&mut b);
                b
            },
        ));
        let origin = match opened {
            Ok(o) => Arc::new(o),
            // The disk failed an operation: a supervisor tries again.
            Err(
                e @ (origin::OriginError::State { .. }
                | origin::OriginError::Apply(
                    journal::apply::ApplyError::Io { .. }
                    | journal::apply::ApplyError::Device { .. },
                )),
            ) => {
                self.note(0x0e0e);
                let _ = e;
                self.schedule(Duration::from_secs(1), Ev::OriginRestart);
                return Ok(());
            }
            Err(e) => return Err(self.fail(format!("the origin does not reopen: {e}"))),
        };
        // Recovery may have finished the batch a crash interrupted.
        let applied = origin.volume("vol").expect("served").applied();
        {
            let mut m = lock(&self.model);
            if applied < m.applied {
                let was = m.applied;
                drop(m);
                return Err(self.fail(format!(
                    "the origin forgot batches: it had applied {was}, after a restart {applied}"
                )));
            }
            while m.applied < applied {
                let next = m.applied + 1;
                if let Err(e) = m.apply(next) {
                    drop(m);
                    return Err(self.fail(e));
                }
            }
            if let Err(e) = m.check_image(&self.disk.content()) {
                drop(m);
                return Err(self.fail(format!("after the origin's recovery: {e}")));
            }
        }
        let seed = self.rng.below(u64::MAX);
        self.disk
            .set_flush_latency(Some((self.clock.clone(), self.sc.flush_latency, seed)));
        self.origin = Some(OriginProc {
            gen: self.origin_gen,
            origin,
            conns: BTreeMap::new(),
            done: Arc::default(),
        });
        Ok(())
    }

    fn crash_origin(&mut self) {
        let Some(o) = self.origin.take() else {
            return;
        };
        self.report.origin_crashes += 1;
        self.exec.kill(Owner::Origin(o.gen));
        for id in o.conns.keys() {
            self.net.remove(id);
            if let Some(e) = &mut self.edge {
                if e.conn == Some(*id) {
                    e.conn = None;
                    e.session.disconnected(self.clock.instant());
                }
            }
        }
        drop(o);
        let rng = &mut self.rng;
        self.origin_storage.power_loss(|extra| {
            let keep = usize::try_from(rng.below(extra as u64 + 1)).expect("small");
            (keep, rng.chance(0.2))
        });
        let rng = &mut self.rng;
        self.disk.power_loss(|_| rng.chance(0.5));
        let d = self
            .rng
            .between(Duration::from_millis(200), Duration::from_secs(5));
        self.schedule(d, Ev::OriginRestart);
    }

    fn pump_origin(&mut self) {
        let Some(mut o) = self.origin.take() else {
            return;
        };
        let at = self.clock.instant();
        let done: Vec<_> = lock(&o.done).drain(..).collect();
        for (conn, d) in done {
            if let Some(c) = o.conns.get_mut(&conn) {
                match d {
                    Done::Read(tag, r) => c.session.read_done(tag, r),
                    Done::Apply(seq, r) => c.session.apply_done(seq, r),
                    Done::Extents(tag, r) => c.session.extents_done(tag, r),
                    Done::Sign(tag, r) => c.session.sign_done(tag, r),
                    Done::Profile(tag, r) => c.session.profile_done(tag, r),
                    Done::Plan(tag, r) => c.session.plan_done(tag, r),
                    Done::Release(r) => {
                        if r.is_ok() {
                            c.volume = None;
                        }
                        c.session.release_done(r);
                    }
                }
            }
        }
        let ids: Vec<u64> = o.conns.keys().copied().collect();
        let mut closed = Vec::new();
        for id in ids {
            let c = o.conns.get_mut(&id).expect("listed");
            while let Some(op) = c.session.poll_op() {
                match op {
                    OriginOp::Attach {
                        volume, edge_id, ..
                    } => match o.origin.attach(c.no, &volume, &edge_id) {
                        Ok((v, grant)) => {
                            c.volume = Some(v);
                            c.session.attach_done(Ok(grant));
                        }
                        Err(r) => c.session.attach_done(Err(r)),
                    },
                    OriginOp::Read {
                        tag,
                        offset,
                        len,
                        want_signatures,
                        push,
                    } => {
                        let Some(v) = c.volume.clone() else { continue };
                        let (origin, out, no) = (o.origin.clone(), o.done.clone(), c.no);
                        let sleep = self.clock.sleep(self.rng.exp(self.sc.storage_latency));
                        self.exec.spawn(Owner::Origin(o.gen), async move {
                            sleep.await;
                            let spec = ReadSpec {
                                offset,
                                len,
                                want_signatures,
                                push,
                            };
                            let r = origin.read(no, &v, spec, None).await;
                            lock(&out).push_back((id, Done::Read(tag, r)));
                        });
                    }
                    OriginOp::Apply { seq, entries } => {
                        let Some(v) = c.volume.clone() else { continue };
                        if self.verbose {
                            eprintln!(
                                "{:>10.3} origin conn {id}: apply {seq} ({} entries)",
                                self.clock.now().as_secs_f64(),
                                entries.len()
                            );
                        }
                        let (origin, out, no) = (o.origin.clone(), o.done.clone(), c.no);
                        let (model, disk, failure) =
                            (self.model.clone(), self.disk.clone(), self.failure.clone());
                        let sleep = self.clock.sleep(self.rng.exp(self.sc.storage_latency * 4));
                        self.exec.spawn(Owner::Origin(o.gen), async move {
                            sleep.await;
                            let r = origin.apply(no, &v, seq, entries).await;
                            // Checked in the same poll as the apply's
                            // commit: no other apply can have begun.
                            if let Ok(applied) = &r {
                                let mut m = lock(&model);
                                let problem = if *applied == Applied::Now {
                                    let n = m.applied_now.entry(seq).or_default();
                                    *n += 1;
                                    if *n > 1 {
                                        Some(format!("batch {seq} was applied twice"))
                                    } else if seq != m.applied + 1 {
                                        Some(format!(
                                            "batch {seq} applied after batch {}",
                                            m.applied
                                        ))
                                    } else {
                                        m.apply(seq).err()
                                    }
                                } else {
                                    None
                                };
                                let problem =
                                    problem.or_else(|| m.check_image(&disk.content()).err());
                                if let Some(p) = problem {
                                    lock(&failure).get_or_insert(p);
                                }
                            }
                            lock(&out).push_back((id, Done::Apply(seq, r.map(|_| ()))));
                        });
                    }
                    OriginOp::Extents { tag, offset, len } => {
                        let Some(v) = c.volume.clone() else { continue };
                        let (origin, out, no) = (o.origin.clone(), o.done.clone(), c.no);
                        // A fixed latency: no draw from the RNG.
                        let sleep = self.clock.sleep(self.sc.storage_latency);
                        self.exec.spawn(Owner::Origin(o.gen), async move {
                            sleep.await;
                            let r = origin.extents(no, &v, offset, len).await;
                            lock(&out).push_back((id, Done::Extents(tag, r)));
                        });
                    }
                    OriginOp::Sign {
                        tag,
                        offset,
                        len,
                        block,
                    } => {
                        let Some(v) = c.volume.clone() else { continue };
                        let (origin, out, no) = (o.origin.clone(), o.done.clone(), c.no);
                        let sleep = self.clock.sleep(self.sc.storage_latency);
                        self.exec.spawn(Owner::Origin(o.gen), async move {
                            sleep.await;
                            let r = origin.sign(no, &v, offset, len, block).await;
                            lock(&out).push_back((id, Done::Sign(tag, r)));
                        });
                    }
                    OriginOp::StoreProfile { tag, data } => {
                        let Some(v) = c.volume.clone() else { continue };
                        let (origin, out) = (o.origin.clone(), o.done.clone());
                        let sleep = self.clock.sleep(self.sc.storage_latency);
                        self.exec.spawn(Owner::Origin(o.gen), async move {
                            sleep.await;
                            let r = origin.store_profile(&v, data).await;
                            lock(&out).push_back((id, Done::Profile(tag, r)));
                        });
                    }
                    OriginOp::Plan { tag, budget } => {
                        let Some(v) = c.volume.clone() else { continue };
                        let (origin, out) = (o.origin.clone(), o.done.clone());
                        let sleep = self.clock.sleep(self.sc.storage_latency);
                        self.exec.spawn(Owner::Origin(o.gen), async move {
                            sleep.await;
                            let r = origin.plan(&v, budget).await;
                            lock(&out).push_back((id, Done::Plan(tag, r)));
                        });
                    }
                    OriginOp::Detach => {
                        if let Some(v) = c.volume.take() {
                            o.origin.release(c.no, &v, c.session.take_partial());
                        }
                        c.session.detach_done();
                    }
                    OriginOp::Release { disposition } => {
                        let Some(v) = c.volume.clone() else { continue };
                        let (origin, out, no) = (o.origin.clone(), o.done.clone(), c.no);
                        let partial = c.session.take_partial();
                        self.exec.spawn(Owner::Origin(o.gen), async move {
                            let r = origin.release_as(no, &v, disposition, partial).await;
                            lock(&out).push_back((id, Done::Release(r)));
                        });
                    }
                    OriginOp::Close { .. } => {
                        closed.push(id);
                        break;
                    }
                }
            }
        }
        // Frames out (a closing connection sends what it queued last).
        let ids: Vec<u64> = o.conns.keys().copied().collect();
        for id in ids {
            let c = o.conns.get_mut(&id).expect("listed");
            let closing = closed.contains(&id);
            while closing || (self.has_room(id, false) && c.session.can_transmit(at)) {
                let Some(f) = c.session.poll_transmit(at) else {
                    break;
                };
                self.send(id, false, f);
            }
        }
        for id in closed {
            if let Some(mut c) = o.conns.remove(&id) {
                if let Some(v) = c.volume.take() {
                    o.origin.release(c.no, &v, c.session.take_partial());
                }
            }
            if let Some(n) = self.net.get_mut(&id) {
                n.origin_closed = true;
            }
        }
        self.origin = Some(o);
    }

    // --- events ----------------------------------------------------------

    fn event(&mut self, ev: Ev) -> Result<(), Failure> {
        match ev {
            Ev::Wake => {}
            Ev::EdgeCrash => {
                // After the workload stopped, the restart already happened.
                if self.workload_on {
                    self.crash_edge();
                    self.edge_storage.clear_faults();
                }
            }
            Ev::EdgeRestart => {
                if self.edge.is_none() {
                    self.start_edge()?;
                }
            }
            Ev::OriginRestart => {
                if self.origin.is_none() {
                    self.start_origin()?;
                }
            }
            Ev::ConnectDone(gen) => self.connect_done(gen),
            Ev::ConnectFailed(gen) => {
                if let Some(e) = &mut self.edge {
                    if e.gen == gen {
                        e.session
                            .connect_failed(self.clock.instant(), &link::LinkError::Closed);
                    }
                }
            }
            Ev::Workload => {
                if self.workload_on {
                    self.workload();
                    let d = self.rng.exp(self.sc.op_every);
                    self.schedule(d, Ev::Workload);
                }
            }
            Ev::Fault => {
                if self.workload_on {
                    self.fault();
                    let d = self.rng.exp(self.sc.fault_every);
                    self.schedule(d, Ev::Fault);
                }
            }
            Ev::Liveness => {
                self.liveness()?;
                self.schedule(Duration::from_secs(1), Ev::Liveness);
            }
            Ev::EndWorkload => {
                self.workload_on = false;
                self.draining = true;
                self.cut_until = Duration::ZERO;
                self.stall_until = Duration::ZERO;
                self.oneway = (false, Duration::ZERO);
                // A supervisor restart still pending happens now, with the
                // journal's disk repaired.
                let pending = self
                    .events
                    .iter()
                    .any(|Reverse((_, _, ev))| *ev == Ev::EdgeCrash);
                if pending {
                    self.crash_edge();
                }
                self.edge_storage.clear_faults();
                if self.edge.is_none() {
                    self.start_edge()?;
                }
                if self.origin.is_none() {
                    self.start_origin()?;
                }
                // One last FLUSH, so everything written is due.
                self.spawn_flush();
            }
        }
        Ok(())
    }

    fn fault(&mut self) {
        let now = self.clock.now();
        let kind = self.rng.below(100);
        self.note(kind);
        match kind {
            0..=14 => self.crash_edge(),
            15..=27 => self.crash_origin(),
            28..=44 => {
                // A cut: every connection reset, none possible for a while.
                self.report.link_faults += 1;
                self.cut_until = now
                    + self
                        .rng
                        .between(Duration::from_millis(10), Duration::from_secs(8));
                let ids: Vec<u64> = self.net.keys().copied().collect();
                for id in ids {
                    self.reset(id);
                }
            }
            45..=59 => {
                self.report.link_faults += 1;
                self.stall_until = now
                    + self
                        .rng
                        .between(Duration::from_millis(10), Duration::from_secs(10));
            }
            60..=71 => {
                self.report.link_faults += 1;
                let up = self.rng.chance(0.5);
                self.oneway = (
                    up,
                    now + self
                        .rng
                        .between(Duration::from_millis(10), Duration::from_secs(10)),
                );
            }
            72..=79 => {
                self.report.disk_faults += 1;
                self.disk
                    .fail_writes(1 + u32::try_from(self.rng.below(3)).expect("small"));
            }
            80..=85 => {
                self.report.disk_faults += 1;
                self.disk.fail_flush();
            }
            86..=91 => {
                self.report.disk_faults += 1;
                self.origin_storage.fail_next_sync();
            }
            92..=96 => {
                // The edge's journal disk fails a sync: the journal refuses
                // work until the edge restarts, which a supervisor does.
                self.report.disk_faults += 1;
                self.edge_storage.fail_next_sync();
                let d = self
                    .rng
                    .between(Duration::from_millis(100), Duration::from_secs(3));
                self.schedule(d, Ev::EdgeCrash);
            }
            _ => {
                // The journal's disk is full until the restart.
                self.report.disk_faults += 1;
                self.edge_storage.set_no_space(true);
                let d = self
                    .rng
                    .between(Duration::from_millis(100), Duration::from_secs(3));
                self.schedule(d, Ev::EdgeCrash);
            }
        }
        // Shipping may lag behind any fault for a while.
        self.healthy_since = self.healthy_since.max(now);
    }

    fn link_healthy(&self) -> bool {
        let now = self.clock.now();
        now >= self.cut_until && now >= self.stall_until && now >= self.oneway.1
    }

    fn liveness(&mut self) -> Result<(), Failure> {
        let now = self.clock.now();
        if !self.link_healthy() || self.edge.is_none() || self.origin.is_none() {
            self.healthy_since = now;
            return Ok(());
        }
        let Some(e) = &self.edge else { return Ok(()) };
        let started = e.started.max(self.healthy_since);
        let j = e.volume.journal().stats();
        let Some(age) = j.oldest_unshipped_age else {
            return Ok(());
        };
        // The oldest write may have queued behind a full journal: what was
        // written before it is at most the journal's capacity (and one
        // batch being cut).
        // Shipping goes at the pace of the link or of the origin's disk,
        // which flushes once per batch, whichever is slower.
        #[allow(clippy::cast_precision_loss)]
        let pace = (self.sc.rate as f64)
            .min(self.sc.batch_bytes as f64 / (2.0 * self.sc.flush_latency.as_secs_f64()));
        #[allow(clippy::cast_precision_loss)]
        let ship_time =
            Duration::from_secs_f64(3.0 * (j.capacity + self.sc.batch_bytes) as f64 / pace);
        let bound = self.sc.rpo + ship_time + Duration::from_secs(30);
        let up_for = now.saturating_sub(started);
        if up_for > bound && age > bound {
            return Err(self.fail(format!(
                "liveness: with the link healthy for {:.1}s the oldest unshipped write is {:.1}s old \
                 (bound {:.1}s: the RPO, three times the time to ship a full journal at the link's or the disk's pace, 30 s): {}",
                up_for.as_secs_f64(),
                age.as_secs_f64(),
                bound.as_secs_f64(),
                self.edge_summary()
            )));
        }
        Ok(())
    }

    // --- the workload ------------------------------------------------------

    fn workload(&mut self) {
        let Some(e) = &self.edge else { return };
        if self.outstanding.load(Ordering::Relaxed) >= self.sc.max_outstanding as u64 {
            return;
        }
        let gen = e.gen;
        let v = e.volume.clone();
        let kind = self.rng.below(100);
        if kind < 8 {
            self.spawn_flush();
            return;
        }
        let most = if self.rng.chance(0.1) { 32 } else { 4 };
        let n = 1 + usize::try_from(self.rng.below(most)).expect("small");
        let first = usize::try_from(self.rng.below((BLOCKS - n) as u64)).expect("small");
        let blocks = first..first + n;
        let mut g = lock(&self.guest);
        if blocks.clone().any(|b| g.busy(b)) {
            return;
        }
        g.set_busy(blocks.clone(), true);
        let (guest, failure, outstanding, ops) = (
            self.guest.clone(),
            self.failure.clone(),
            self.outstanding.clone(),
            self.ops.clone(),
        );
        outstanding.fetch_add(1, Ordering::Relaxed);
        let offset = (first * BLOCK) as u64;
        if kind < 50 {
            drop(g);
            self.exec.spawn(Owner::Edge(gen), async move {
                let r = v.read(offset, n * BLOCK).await;
                let mut g = lock(&guest);
                g.set_busy(blocks.clone(), false);
                outstanding.fetch_sub(1, Ordering::Relaxed);
                let mut o = lock(&ops);
                o.ops += 1;
                if let Ok(data) = r {
                    for (i, b) in blocks.enumerate() {
                        let bytes = &data[i * BLOCK..(i + 1) * BLOCK];
                        let seen = decode(b as u64, bytes).and_then(|s| g.read_done(b, s));
                        if let Err(why) = seen {
                            lock(&failure).get_or_insert(why);
                            return;
                        }
                        o.reads_checked += 1;
                    }
                }
            });
            return;
        }
        let zero = kind >= 90;
        let fua = self.rng.chance(0.15);
        let id = g.new_id(zero);
        g.write_issued(blocks.clone(), id);
        drop(g);
        let data: Vec<u8> = blocks
            .clone()
            .flat_map(|b| block_content(id, b as u64))
            .collect();
        self.exec.spawn(Owner::Edge(gen), async move {
            let r = if zero {
                v.write_zeroes(offset, (n * BLOCK) as u64, fua).await
            } else {
                v.write(offset, Bytes::from(data), fua).await
            };
            let mut g = lock(&guest);
            g.write_done(blocks.clone(), id, r.is_ok(), fua);
            g.set_busy(blocks, false);
            outstanding.fetch_sub(1, Ordering::Relaxed);
            let mut o = lock(&ops);
            o.ops += 1;
            o.writes += 1;
        });
    }

    fn spawn_flush(&mut self) {
        let Some(e) = &self.edge else { return };
        self.flush_no += 1;
        let no = self.flush_no;
        lock(&self.guest).flush_issued(no);
        let (v, guest, ops) = (e.volume.clone(), self.guest.clone(), self.ops.clone());
        self.exec.spawn(Owner::Edge(e.gen), async move {
            let r = v.flush().await;
            lock(&guest).flush_done(no, r.is_ok());
            let mut o = lock(&ops);
            o.flushes += 1;
        });
    }

    // --- the end -----------------------------------------------------------

    fn drained(&self) -> bool {
        let Some(e) = &self.edge else { return false };
        if self.outstanding.load(Ordering::Relaxed) > 0 || self.exec.has_ready() {
            return false;
        }
        let j = e.volume.journal().stats();
        j.unshipped_records == 0
            && j.batches_in_flight == 0
            && e.session.stats(self.clock.instant()).batches_held == 0
            && !e.applying.load(Ordering::Acquire)
            && e.applied_target == 0
    }

    /// Everything settled: every block reads on the edge as the model says,
    /// and the origin's image holds the same.
    fn final_check(&mut self) -> Result<(), Failure> {
        let disk = self.disk.content();
        {
            let m = lock(&self.model);
            m.check_image(&disk)
                .map_err(|e| self.fail(format!("after the drain: {e}")))?;
        }
        let Some(e) = &self.edge else {
            return Err(self.fail("the edge is down at the end".into()));
        };
        self.log(|| format!("final check: {}", self.edge_summary()));
        let (v, gen) = (e.volume.clone(), e.gen);
        let result: Arc<Mutex<Option<blockcore::Result<Bytes>>>> = Arc::default();
        let out = result.clone();
        self.exec.spawn(Owner::Edge(gen), async move {
            // In pieces, each tried a few times: a slow link may time one
            // out, which is not what is checked here.
            let mut view = bytes::BytesMut::with_capacity(VOLUME);
            let piece = 64 << 10;
            for at in (0..VOLUME).step_by(piece) {
                let mut r = v.read(at as u64, piece).await;
                for _ in 0..3 {
                    if r.is_ok() {
                        break;
                    }
                    r = v.read(at as u64, piece).await;
                }
                match r {
                    Ok(d) => view.extend_from_slice(&d),
                    Err(e) => {
                        *lock(&out) = Some(Err(e));
                        return;
                    }
                }
            }
            *lock(&out) = Some(Ok(view.freeze()));
        });
        let deadline = self.clock.now() + Duration::from_secs(1800);
        while lock(&result).is_none() {
            self.step()?;
            if self.clock.now() > deadline {
                return Err(self.fail("the final read of the volume did not complete".into()));
            }
        }
        let view = match lock(&result).take().expect("checked") {
            Ok(v) => v,
            Err(e) => return Err(self.fail(format!("the final read of the volume failed: {e}"))),
        };
        let mut g = lock(&self.guest);
        for b in 0..BLOCKS {
            let r = b * BLOCK..(b + 1) * BLOCK;
            let seen = decode(b as u64, &view[r.clone()]).and_then(|s| g.read_done(b, s));
            if let Err(why) = seen {
                drop(g);
                return Err(self.fail(format!("after the drain: {why}")));
            }
            if view[r.clone()] != disk[r] {
                drop(g);
                return Err(self.fail(format!(
                    "after the drain the edge and the origin disagree on block {b}"
                )));
            }
            if let Some(id) = g.settled(b) {
                if !GuestModel::matches(
                    id,
                    decode(b as u64, &view[b * BLOCK..(b + 1) * BLOCK]).unwrap_or(Seen::Zero),
                ) {
                    drop(g);
                    return Err(self.fail(format!("after the drain block {b} is not write {id}")));
                }
            }
        }
        Ok(())
    }
}

fn ev_code(ev: Ev) -> u64 {
    match ev {
        Ev::Workload => 1,
        Ev::Fault => 2,
        Ev::EdgeRestart => 3,
        Ev::OriginRestart => 4,
        Ev::ConnectDone(g) => 5 + (g << 8),
        Ev::ConnectFailed(g) => 6 + (g << 8),
        Ev::Liveness => 7,
        Ev::EndWorkload => 8,
        Ev::Wake => 9,
        Ev::EdgeCrash => 10,
    }
}

//! The edge's end of the link, across connections: [`EdgeSession`].
//!
//! ```text
//!            ┌──────── Down { retry_at } <──────── connection lost, dead,
//!            │  timeout: Event::Connect             refused, timed out
//!            v                                               ^
//!       Connecting ── connected(nonce) ──> Hello sent ───────┤
//!                                          │ peer Hello (+ Auth both ways)
//!                                          v                 │
//!                                     Attach sent ───────────┤
//!                                          │ Attached        │
//!                                          v                 │
//!                                         Up ────────────────┘
//!   Up: requests (reads, prefetches) are sent; write batches stream in
//!   background frames; heartbeats go every `heartbeat`; bytes arriving
//!   is what keeps the link alive.
//!
//!   Gone, for good: Detached (after `detach` or `release`), Fenced (an
//!   operator force-released this edge at the origin), Migrated (the
//!   volume was cut over to another edge), or the volume changed. Every
//!   request still waiting fails, later ones fail at once, and no
//!   connection is opened again.
//! ```
//!
//! Requests and batches outlive connections: after a reconnection every
//! request still waiting is sent again (reads are idempotent) and every
//! batch not yet acknowledged is shipped again from the part the origin
//! says it holds (`Attached::resume_part`); a batch the origin had applied
//! shows up in `Attached::next_seq` and counts as acknowledged. The origin
//! applies each batch once (its apply journal), so resending is safe.
//!
//! Write batches are cut into parts of [`WRITE_PART_MAX`] bytes, always
//! the same way for the same batch (so a part number means the same bytes
//! on every connection), and go as background frames under the
//! congestion window: a demand read never waits behind more than about one
//! part in ferry's queues, and behind about the controller's target delay
//! in the path.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use blockcore::Extent;
use bytes::{Bytes, BytesMut};
use zeroize::Zeroizing;

use super::transport::{Transport, TransportStats};
use super::Mistakes;
use crate::cc::CcConfig;
use crate::error::LinkError;
use crate::proto::{
    auth_proof, extent_kind, split_batch, verify_auth_proof, Class, Disposition, ErrorCode,
    FrameHeader, Message, Role, SchedulerConfig, WriteEntry, DEFAULT_WINDOW, MAX_DATA_LEN,
    PROTOCOL_VERSION, WRITE_PART_MAX,
};

/// The request id of `Attach`, `Detach` and `Release`.
const ATTACH_ID: u64 = 1;
/// The id of every write-batch frame and of the origin's answers to them:
/// one id, so the scheduler keeps all parts of all batches in one FIFO and
/// the origin receives them in order. (Requests proper start above it.)
pub const BATCH_ID: u64 = 2;

/// A request's handle, for matching its completion.
pub type RequestId = u64;

/// How the edge reaches and uses its origin.
#[derive(Clone, Debug)]
pub struct EdgeSessionConfig {
    pub volume: String,
    /// Identifies this edge to the origin (the volume's exclusive holder).
    pub edge_id: String,
    pub psk: Option<[u8; 32]>,
    /// How long a read waits (across reconnections) before it fails.
    pub request_timeout: Duration,
    /// How often a heartbeat goes out while attached.
    pub heartbeat: Duration,
    /// The link is declared dead when no byte at all arrived for this long.
    pub dead_after: Duration,
    /// Connecting, the handshake and attach must finish within this.
    pub connect_timeout: Duration,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    pub scheduler: SchedulerConfig,
    /// Background credit granted to the origin (pushes in flight).
    pub window: u64,
    pub cc: CcConfig,
    /// Batches held at once (being shipped or awaiting acknowledgement).
    pub max_batches: usize,
    /// Known mistakes, reintroduced for the simulator's own tests.
    pub mistakes: Mistakes,
}

impl EdgeSessionConfig {
    pub fn new(volume: impl Into<String>, edge_id: impl Into<String>) -> Self {
        EdgeSessionConfig {
            volume: volume.into(),
            edge_id: edge_id.into(),
            psk: None,
            request_timeout: Duration::from_secs(30),
            heartbeat: Duration::from_secs(1),
            dead_after: Duration::from_secs(6),
            connect_timeout: Duration::from_secs(10),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            scheduler: SchedulerConfig::default(),
            window: DEFAULT_WINDOW,
            cc: CcConfig::default(),
            max_batches: 3,
            mistakes: Mistakes::default(),
        }
    }
}

/// What the origin said at attach.
#[derive(Clone)]
pub struct Attachment {
    pub size: u64,
    pub chunk_size: u32,
    pub group_size: u32,
    /// This edge's cache master key and the deployment's dedup key.
    pub cache_key: Zeroizing<[u8; 32]>,
    pub dedup_key: Zeroizing<[u8; 32]>,
    pub volume_epoch: u64,
    pub next_seq: u64,
    /// The origin keeps none of the volume's writes (a clone with cloud
    /// persistence): the edge must keep them and never ship any.
    pub local_writes: bool,
}

impl std::fmt::Debug for Attachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attachment")
            .field("size", &self.size)
            .field("chunk_size", &self.chunk_size)
            .field("group_size", &self.group_size)
            .field("volume_epoch", &self.volume_epoch)
            .field("next_seq", &self.next_seq)
            .field("local_writes", &self.local_writes)
            .finish_non_exhaustive()
    }
}

/// The answer to a read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReadReply {
    /// The bytes, as of the origin having applied batch `as_of`.
    Data { as_of: u64, data: Bytes },
    /// One signature per `chunk_size` bytes of the read, in order.
    Signatures {
        chunk_size: u32,
        sigs: Vec<[u8; 32]>,
    },
}

/// What the session asks of its shell, or reports.
#[derive(Debug)]
pub enum EdgeEvent {
    /// Open a connection to the origin, then call
    /// [`EdgeSession::connected`] or [`EdgeSession::connect_failed`].
    Connect,
    /// Close the current connection (the session has already let go of
    /// it).
    Close { reason: LinkError },
    /// Attached (again). The first attachment is also kept in
    /// [`EdgeSession::attachment`].
    Attached(Attachment),
    /// The origin refused this edge (auth, volume, version); the session
    /// retries with back-off.
    Refused(LinkError),
    /// The session is over (the volume's size or epoch changed, an
    /// operator fenced this edge off it, or it was migrated to another
    /// edge): every request failed with this error and nothing more is
    /// sent. Batches held are never applied.
    Failed(LinkError),
    ReadDone {
        id: RequestId,
        result: Result<ReadReply, LinkError>,
    },
    PrefetchDone {
        id: RequestId,
        result: Result<(), LinkError>,
    },
    /// The answer to [`EdgeSession::extents`]: contiguous extents from the
    /// asked offset, covering at least one byte of the range and never
    /// more than it (ask again from where they end for the rest).
    ExtentsDone {
        id: RequestId,
        result: Result<Vec<Extent>, LinkError>,
    },
    /// The answer to [`EdgeSession::sign`]: one signature per piece, in
    /// order.
    SignDone {
        id: RequestId,
        result: Result<Vec<[u8; 32]>, LinkError>,
    },
    /// The answer to [`EdgeSession::store_profile`].
    ProfileStored {
        id: RequestId,
        result: Result<(), LinkError>,
    },
    /// Data the edge did not ask for right now (a prefetch's, id = its
    /// request, or a group push, id 0), as of batch `as_of`.
    Push {
        id: RequestId,
        offset: u64,
        as_of: u64,
        data: Bytes,
    },
    /// Every batch up to `seq` is durably applied at the origin.
    BatchApplied { seq: u64 },
    /// The origin failed to apply batch `seq`; it is shipped again after a
    /// back-off.
    BatchFailed { seq: u64, error: LinkError },
    /// The origin confirmed a detach (or a release): every batch before
    /// it was applied, and a release's disposition is recorded. The
    /// session is over (later requests fail with [`LinkError::Detached`]).
    Detached,
    /// The origin refused a release (or a detach): the volume stays
    /// attached, the session goes on, and batches shipped meanwhile go
    /// out again.
    DetachRefused(LinkError),
}

/// Link state and counters, for status displays.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EdgeLinkStats {
    pub connected: bool,
    /// How many times the link was (re)established.
    pub connects: u64,
    /// Times it was declared dead for lack of progress.
    pub deaths: u64,
    pub bytes_read: u64,
    pub bytes_pushed: u64,
    pub pending_requests: usize,
    pub batches_held: usize,
    /// Data bytes of write batches sent (parts, resends included).
    pub batch_bytes_sent: u64,
    pub connect_failures: u64,
    /// Why the link last went down or failed to come up.
    pub last_error: Option<String>,
    /// An operator fenced this edge off the volume (see
    /// [`ErrorCode::Fenced`]): the session stopped.
    pub fenced: bool,
    /// Why the session stopped for good (detached, fenced, the volume
    /// changed), if it did.
    pub stopped: Option<String>,
    pub transport: TransportStats,
}

#[derive(Debug)]
enum Conn {
    Down {
        retry_at: Instant,
    },
    Connecting {
        since: Instant,
    },
    Hello {
        since: Instant,
        nonce: [u8; 32],
    },
    Auth {
        since: Instant,
    },
    Attaching {
        since: Instant,
    },
    Up,
    /// Detached, fenced, or the volume changed under us: nothing more to
    /// do.
    Gone,
}

#[derive(Debug)]
enum RequestKind {
    Read {
        offset: u64,
        len: u32,
        got: BytesMut,
        as_of: u64,
    },
    Prefetch,
    Extents {
        offset: u64,
        len: u64,
    },
    Sign {
        offset: u64,
        len: u32,
        block: u32,
    },
    Profile,
}

#[derive(Debug)]
struct Request {
    msg: Message,
    kind: RequestKind,
    deadline: Option<Instant>,
}

#[derive(Debug)]
struct OutBatch {
    seq: u64,
    parts: Vec<Vec<WriteEntry>>,
    /// The next part to queue on the current connection.
    next: usize,
    /// After a failed apply: not before this.
    retry_at: Option<Instant>,
}

/// The edge's session. See the module docs.
#[derive(Debug)]
pub struct EdgeSession {
    cfg: EdgeSessionConfig,
    conn: Conn,
    transport: Option<Transport>,
    attachment: Option<Attachment>,
    requests: BTreeMap<u64, Request>,
    batches: VecDeque<OutBatch>,
    /// The origin's next expected batch, per the latest attach or ack.
    next_seq: u64,
    next_id: u64,
    events: VecDeque<EdgeEvent>,
    backoff: Duration,
    batch_backoff: Duration,
    next_heartbeat: Option<Instant>,
    /// When the last complete `HeartbeatAck` arrived (the old liveness
    /// rule, kept only for [`Mistakes::heartbeat_liveness`]).
    last_heartbeat_ack: Instant,
    detaching: bool,
    /// With `detaching`: release the volume this way (`Release`, not
    /// `Detach`).
    disposition: Option<Disposition>,
    /// `Detach` (or `Release`) went out on this connection.
    detach_sent: bool,
    /// Why the session is over, once it is: what every request gets.
    finished: Option<LinkError>,
    /// Our nonce and the origin's, between `Hello` and `Auth`.
    pending_auth: Option<([u8; 32], [u8; 32])>,
    /// Zero of the clock heartbeats carry.
    epoch: Instant,
    stats: EdgeLinkStats,
}

impl EdgeSession {
    /// A session that connects at once (its first event is `Connect`).
    pub fn new(cfg: EdgeSessionConfig, now: Instant) -> Self {
        let backoff = cfg.reconnect_min;
        let mut s = EdgeSession {
            cfg,
            conn: Conn::Down { retry_at: now },
            transport: None,
            attachment: None,
            requests: BTreeMap::new(),
            batches: VecDeque::new(),
            next_seq: 0,
            next_id: BATCH_ID + 1,
            events: VecDeque::new(),
            backoff,
            batch_backoff: Duration::from_millis(100),
            next_heartbeat: None,
            last_heartbeat_ack: now,
            detaching: false,
            disposition: None,
            detach_sent: false,
            finished: None,
            pending_auth: None,
            epoch: now,
            stats: EdgeLinkStats::default(),
        };
        s.handle_timeout(now);
        s
    }

    pub fn config(&self) -> &EdgeSessionConfig {
        &self.cfg
    }

    /// The first attachment, once attached.
    pub fn attachment(&self) -> Option<&Attachment> {
        self.attachment.as_ref()
    }

    pub fn is_up(&self) -> bool {
        matches!(self.conn, Conn::Up)
    }

    /// The origin's next expected batch, as last heard.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    pub fn stats(&self, now: Instant) -> EdgeLinkStats {
        let mut s = self.stats.clone();
        s.connected = self.is_up();
        s.pending_requests = self.requests.len();
        s.batches_held = self.batches.len();
        s.transport = self
            .transport
            .as_ref()
            .map(|t| t.stats(now))
            .unwrap_or_default();
        s
    }

    // --- the shell's inputs -------------------------------------------

    /// The connection asked for by `Connect` is open; `nonce` is fresh
    /// randomness for the handshake. False: the session no longer wants it
    /// (it timed out meanwhile); close it.
    pub fn connected(&mut self, now: Instant, nonce: [u8; 32]) -> bool {
        if !matches!(self.conn, Conn::Connecting { .. }) {
            return false;
        }
        let mut t = Transport::new(
            now,
            self.cfg.scheduler,
            self.cfg.window,
            self.cfg.cc,
            self.cfg.mistakes.heartbeat_liveness,
        );
        let hello = Message::Hello {
            version: PROTOCOL_VERSION,
            role: Role::Edge,
            nonce,
        };
        if t.queue(0, Class::Demand, hello).is_err() {
            return false;
        }
        self.transport = Some(t);
        self.conn = Conn::Hello { since: now, nonce };
        true
    }

    /// Opening the connection failed.
    pub fn connect_failed(&mut self, now: Instant, error: &LinkError) {
        if matches!(self.conn, Conn::Connecting { .. }) {
            self.stats.connect_failures += 1;
            self.stats.last_error = Some(error.to_string());
            self.go_down(now);
        }
    }

    /// The connection closed or failed (EOF, reset, TLS error).
    pub fn disconnected(&mut self, now: Instant) {
        if self.transport.is_some() {
            self.stats.last_error = Some("the connection closed".into());
            self.go_down(now);
        }
    }

    /// Bytes arrived from the origin.
    pub fn handle_input(&mut self, data: &[u8], now: Instant) {
        let Some(t) = self.transport.as_mut() else {
            return;
        };
        match t.input(data, now) {
            Ok(frames) => {
                for (header, msg) in frames {
                    if let Err(e) = self.on_frame(header, msg, now) {
                        self.fail_link(now, e);
                        return;
                    }
                    if self.transport.is_none() {
                        return;
                    }
                }
            }
            Err(e) => self.fail_link(now, LinkError::Proto(e)),
        }
    }

    /// Time passed: deadlines, heartbeats, liveness, reconnection.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(t) = self.transport.as_mut() {
            t.handle_timeout(now);
        }
        // Requests past their deadline fail, connected or not.
        let expired: Vec<u64> = self
            .requests
            .iter()
            .filter(|(_, r)| r.deadline.is_some_and(|d| now >= d))
            .map(|(&id, _)| id)
            .collect();
        for id in expired {
            let r = self.requests.remove(&id).expect("listed above");
            let error = LinkError::Timeout(self.cfg.request_timeout);
            self.events.push_back(failed(id, &r.kind, error));
        }
        match self.conn {
            Conn::Down { retry_at } if now >= retry_at => {
                self.conn = Conn::Connecting { since: now };
                self.events.push_back(EdgeEvent::Connect);
            }
            Conn::Connecting { since }
            | Conn::Hello { since, .. }
            | Conn::Auth { since }
            | Conn::Attaching { since }
                if now.saturating_duration_since(since) >= self.cfg.connect_timeout =>
            {
                self.close(now, LinkError::Timeout(self.cfg.connect_timeout));
            }
            Conn::Up => {
                let silent = if self.cfg.mistakes.heartbeat_liveness {
                    now.saturating_duration_since(self.last_heartbeat_ack)
                } else {
                    self.transport
                        .as_ref()
                        .map_or(Duration::ZERO, |t| t.silent_for(now))
                };
                if silent >= self.cfg.dead_after {
                    self.stats.deaths += 1;
                    self.close(now, LinkError::Silent(silent));
                    return;
                }
                if self.next_heartbeat.is_some_and(|at| now >= at) {
                    let nanos = u64::try_from(now.saturating_duration_since(self.epoch).as_nanos())
                        .unwrap_or(u64::MAX);
                    self.send(0, Class::Demand, Message::Heartbeat { nanos });
                    self.next_heartbeat = Some(now + self.cfg.heartbeat);
                }
                self.fill_batches(now);
            }
            _ => {}
        }
    }

    /// The earliest time [`EdgeSession::handle_timeout`] has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut at = self.requests.values().filter_map(|r| r.deadline).min();
        let mut take = |t: Option<Instant>| {
            if let Some(t) = t {
                at = Some(at.map_or(t, |a| a.min(t)));
            }
        };
        match self.conn {
            Conn::Down { retry_at } => take(Some(retry_at)),
            Conn::Connecting { since }
            | Conn::Hello { since, .. }
            | Conn::Auth { since }
            | Conn::Attaching { since } => take(Some(since + self.cfg.connect_timeout)),
            Conn::Up => {
                take(self.next_heartbeat);
                let last = if self.cfg.mistakes.heartbeat_liveness {
                    Some(self.last_heartbeat_ack)
                } else {
                    self.transport.as_ref().map(|t| t.last_rx)
                };
                take(last.map(|l| l + self.cfg.dead_after));
                take(self.batches.iter().filter_map(|b| b.retry_at).min());
            }
            Conn::Gone => {}
        }
        take(self.transport.as_ref().and_then(Transport::poll_timeout));
        at
    }

    /// The next frame to write to the connection, if any may go now. Call
    /// it whenever the socket can take more.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Bytes> {
        if matches!(self.conn, Conn::Up) {
            self.fill_batches(now);
        }
        self.transport.as_mut()?.poll_transmit(now)
    }

    /// Whether [`EdgeSession::poll_transmit`] would yield a frame now: the
    /// shell waits for the socket only then (and otherwise for input or
    /// the next timeout, which is what changes the answer).
    pub fn can_transmit(&mut self, now: Instant) -> bool {
        if matches!(self.conn, Conn::Up) {
            self.fill_batches(now);
        }
        self.transport.as_ref().is_some_and(|t| t.can_transmit(now))
    }

    pub fn poll_event(&mut self) -> Option<EdgeEvent> {
        self.events.pop_front()
    }

    // --- the application's requests ----------------------------------

    /// Reads `len` bytes (at most [`MAX_DATA_LEN`]) at `offset`; with
    /// `want_signatures` the origin may answer with signatures of chunks it
    /// sent this edge before. Completes with `ReadDone`.
    pub fn read(
        &mut self,
        offset: u64,
        len: u32,
        want_signatures: bool,
        now: Instant,
    ) -> RequestId {
        let msg = Message::Read {
            offset,
            len,
            want_signatures,
        };
        let kind = RequestKind::Read {
            offset,
            len,
            got: BytesMut::new(),
            as_of: u64::MAX,
        };
        if len as usize > MAX_DATA_LEN {
            let id = self.take_id();
            self.events.push_back(EdgeEvent::ReadDone {
                id,
                result: Err(LinkError::Unexpected(format!(
                    "a read of {len} bytes is over the limit of {MAX_DATA_LEN}"
                ))),
            });
            return id;
        }
        self.request(msg, kind, Some(now + self.cfg.request_timeout))
    }

    /// Asks the origin to push `ranges` in the background; completes with
    /// `PrefetchDone` once it has sent them all.
    pub fn prefetch(&mut self, ranges: Vec<(u64, u32)>) -> RequestId {
        self.request(Message::Prefetch { ranges }, RequestKind::Prefetch, None)
    }

    /// Asks the origin how `[offset, offset + len)` is allocated; completes
    /// with `ExtentsDone`, whose extents may cover only a prefix of the
    /// range. Waits across reconnections like a read, up to the request
    /// timeout.
    pub fn extents(&mut self, offset: u64, len: u64, now: Instant) -> RequestId {
        let kind = RequestKind::Extents { offset, len };
        if len == 0 || offset.checked_add(len).is_none() {
            let id = self.take_id();
            self.events.push_back(failed(
                id,
                &kind,
                LinkError::Unexpected(format!(
                    "an allocation query of {len} bytes at {offset}: the range must be \
                     non-empty and end before 2^64"
                )),
            ));
            return id;
        }
        self.request(
            Message::Extents { offset, len },
            kind,
            Some(now + self.cfg.request_timeout),
        )
    }

    /// Asks the origin for the signature of every `block`-byte piece of
    /// `[offset, offset + len)` of its image (see [`Message::Sign`]);
    /// completes with `SignDone`. Waits across reconnections like a read,
    /// up to the request timeout.
    pub fn sign(&mut self, offset: u64, len: u32, block: u32, now: Instant) -> RequestId {
        let msg = Message::Sign { offset, len, block };
        let kind = RequestKind::Sign { offset, len, block };
        if let Err(e) = msg.validate() {
            let id = self.take_id();
            self.events
                .push_back(failed(id, &kind, LinkError::Unexpected(e.to_string())));
            return id;
        }
        self.request(msg, kind, Some(now + self.cfg.request_timeout))
    }

    /// Asks the origin to push the volume's prefetch plan (at most
    /// `budget` bytes) in the background; completes with `PrefetchDone`
    /// once it has sent it all (at once when there is none). Sent again
    /// after a reconnection until then.
    pub fn plan(&mut self, budget: u64) -> RequestId {
        self.request(Message::Plan { budget }, RequestKind::Prefetch, None)
    }

    /// Hands the origin a boot profile (encoded, at most [`MAX_DATA_LEN`]
    /// bytes) to keep with the volume; completes with `ProfileStored`.
    /// Waits across reconnections like a read, up to the request timeout.
    pub fn store_profile(&mut self, data: Bytes, now: Instant) -> RequestId {
        let msg = Message::Profile { data };
        if let Err(e) = msg.validate() {
            let id = self.take_id();
            self.events.push_back(failed(
                id,
                &RequestKind::Profile,
                LinkError::Unexpected(e.to_string()),
            ));
            return id;
        }
        self.request(
            msg,
            RequestKind::Profile,
            Some(now + self.cfg.request_timeout),
        )
    }

    /// Gives up waiting for a request (its completion never comes).
    pub fn cancel(&mut self, id: RequestId) {
        self.requests.remove(&id);
    }

    /// How many more batches [`EdgeSession::ship`] takes now.
    pub fn batch_room(&self) -> usize {
        self.cfg.max_batches.saturating_sub(self.batches.len())
    }

    /// Ships write batch `seq` (in sequence order, each once) until the
    /// origin acknowledges it: `BatchApplied`. A batch the origin already
    /// applied is acknowledged at once; once the session is over
    /// (`Failed`, `Detached`) a new one is dropped.
    pub fn ship(&mut self, seq: u64, entries: Vec<WriteEntry>, now: Instant) {
        if self.attachment.is_some() && seq < self.next_seq {
            self.events.push_back(EdgeEvent::BatchApplied { seq });
            return;
        }
        if self.finished.is_some() {
            return;
        }
        let part_data = if self.cfg.mistakes.heartbeat_liveness {
            MAX_DATA_LEN
        } else {
            WRITE_PART_MAX
        };
        self.batches.push_back(OutBatch {
            seq,
            parts: split_batch(entries, part_data),
            next: 0,
            retry_at: None,
        });
        if self.is_up() {
            self.fill_batches(now);
        }
    }

    /// Asks the origin to release the volume once every batch shipped is
    /// acknowledged (so no write is left behind for whoever attaches
    /// next); completes with `Detached`, which ends the session. Batches
    /// shipped after this wait for a later attach (they stay in the
    /// journal).
    pub fn detach(&mut self) {
        if self.finished.is_none() {
            self.detaching = true;
            self.pump_detach();
        }
    }

    /// [`EdgeSession::detach`], with the origin recording how the volume
    /// is left ([`Disposition`]): `Release` instead of `Detach`, answered
    /// the same way (`Detached`), or refused (`DetachRefused`, the volume
    /// still attached). Refused at once when the session is over, or when
    /// a detach or another release already went out on this connection.
    pub fn release(&mut self, disposition: Disposition) -> Result<(), LinkError> {
        if let Some(e) = &self.finished {
            return Err(e.clone());
        }
        let other = if self.detach_sent {
            self.disposition != Some(disposition)
        } else {
            self.disposition.is_some_and(|d| d != disposition)
        };
        if self.detaching && other {
            return Err(LinkError::Unexpected(format!(
                "a {} is already under way",
                match self.disposition {
                    Some(d) => format!("release ({d:?})"),
                    None => "detach".into(),
                }
            )));
        }
        self.detaching = true;
        self.disposition = Some(disposition);
        self.pump_detach();
        Ok(())
    }

    /// Whether the session is over (see [`EdgeEvent::Failed`],
    /// [`EdgeEvent::Detached`]), and why.
    pub fn finished(&self) -> Option<&LinkError> {
        self.finished.as_ref()
    }

    // --- internals --------------------------------------------------------

    fn take_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    fn request(&mut self, msg: Message, kind: RequestKind, deadline: Option<Instant>) -> u64 {
        let id = self.take_id();
        if let Some(e) = &self.finished {
            self.events.push_back(failed(id, &kind, e.clone()));
            return id;
        }
        if self.is_up() {
            self.send(id, Class::Demand, msg.clone());
        }
        self.requests.insert(
            id,
            Request {
                msg,
                kind,
                deadline,
            },
        );
        id
    }

    fn send(&mut self, id: u64, class: Class, msg: Message) {
        if let Some(t) = self.transport.as_mut() {
            // Every message here was validated by construction; a failure
            // is a bug worth a closed link, not a panic.
            if let Err(e) = t.queue(id, class, msg) {
                self.events.push_back(EdgeEvent::Close {
                    reason: LinkError::Proto(e),
                });
            }
        }
    }

    /// Queues batch parts while the scheduler holds little background
    /// data, so parts are encoded just in time and a batch never sits in
    /// memory twice.
    fn fill_batches(&mut self, now: Instant) {
        let Some(t) = self.transport.as_ref() else {
            return;
        };
        if self.detach_sent {
            // The origin is letting go of the volume.
            return;
        }
        let class = if self.cfg.mistakes.heartbeat_liveness {
            Class::Demand
        } else {
            Class::Background
        };
        let mut queued = t.queued(class);
        let limit = 2 * (WRITE_PART_MAX + 1024);
        for b in &mut self.batches {
            if b.retry_at.is_some_and(|at| now >= at) {
                b.retry_at = None;
            }
        }
        for i in 0..self.batches.len() {
            if self.batches[i].retry_at.is_some() {
                // Later batches wait too: the origin applies in order.
                return;
            }
            while queued < limit || self.cfg.mistakes.heartbeat_liveness {
                let b = &mut self.batches[i];
                if b.next >= b.parts.len() {
                    break;
                }
                let part = b.next;
                let entries = b.parts[part].clone();
                let last = part + 1 == b.parts.len();
                let seq = b.seq;
                b.next += 1;
                let bytes: usize = entries.iter().map(WriteEntry::data_len).sum();
                self.stats.batch_bytes_sent += bytes as u64;
                let msg = Message::WriteBatch {
                    seq,
                    part: u32::try_from(part).unwrap_or(u32::MAX),
                    last,
                    entries,
                };
                self.send(BATCH_ID, class, msg);
                queued = self.transport.as_ref().map_or(0, |t| t.queued(class));
                if last && self.cfg.mistakes.ack_before_apply {
                    // The mistake: treat a batch as applied once it is sent.
                    self.acknowledge(seq);
                    return;
                }
            }
            if self.batches[i].next < self.batches[i].parts.len() {
                return;
            }
        }
    }

    fn go_down(&mut self, now: Instant) {
        self.transport = None;
        self.next_heartbeat = None;
        self.detach_sent = false;
        if matches!(self.conn, Conn::Gone) {
            return;
        }
        self.conn = Conn::Down {
            retry_at: now + self.backoff,
        };
        self.backoff = (self.backoff * 2).min(self.cfg.reconnect_max);
    }

    /// Closes the connection from this side.
    fn close(&mut self, now: Instant, reason: LinkError) {
        self.stats.last_error = Some(reason.to_string());
        if self.transport.is_some() || !matches!(self.conn, Conn::Down { .. }) {
            self.events.push_back(EdgeEvent::Close { reason });
        }
        self.go_down(now);
    }

    /// The origin broke the protocol (or answered out of turn): tell it
    /// and close.
    fn fail_link(&mut self, now: Instant, e: LinkError) {
        if let Some(t) = self.transport.as_mut() {
            let _ = t.queue(
                0,
                Class::Demand,
                Message::Error {
                    code: ErrorCode::Protocol,
                    message: e.to_string(),
                },
            );
        }
        self.close(now, e);
    }

    fn on_frame(
        &mut self,
        header: FrameHeader,
        msg: Message,
        now: Instant,
    ) -> Result<(), LinkError> {
        match (&self.conn, msg) {
            (_, Message::Error { code, message }) if header.id == 0 => {
                let error = LinkError::Refused { code, message };
                if is_final(code) {
                    self.final_refusal(error);
                } else if matches!(self.conn, Conn::Up) {
                    self.close(now, error);
                } else {
                    self.refused(now, error);
                }
                Ok(())
            }
            (
                Conn::Hello { nonce, .. },
                Message::Hello {
                    version,
                    role,
                    nonce: peer_nonce,
                },
            ) => {
                if version != PROTOCOL_VERSION {
                    self.refused(
                        now,
                        LinkError::Handshake(format!(
                            "the origin speaks protocol version {version}, this edge {PROTOCOL_VERSION}"
                        )),
                    );
                    return Ok(());
                }
                if role != Role::Origin {
                    return Err(LinkError::Handshake(format!(
                        "the peer says it is {role:?}, not the origin"
                    )));
                }
                let nonce = *nonce;
                if let Some(psk) = self.cfg.psk {
                    let proof = auth_proof(&psk, Role::Edge, &nonce, &peer_nonce);
                    self.send(0, Class::Demand, Message::Auth { proof });
                    self.conn = Conn::Auth { since: now };
                    self.pending_auth = Some((nonce, peer_nonce));
                } else {
                    self.send_attach(now);
                }
                Ok(())
            }
            (Conn::Auth { .. }, Message::Auth { proof }) => {
                let (nonce, peer_nonce) = self.pending_auth.take().unwrap_or_default();
                let psk = self.cfg.psk.unwrap_or_default();
                if !verify_auth_proof(&psk, Role::Origin, &peer_nonce, &nonce, &proof) {
                    self.refused(
                        now,
                        LinkError::Handshake("the origin does not hold the pre-shared key".into()),
                    );
                    return Ok(());
                }
                self.send_attach(now);
                Ok(())
            }
            (
                Conn::Attaching { .. },
                Message::Attached {
                    size,
                    chunk_size,
                    group_size,
                    cache_key,
                    dedup_key,
                    volume_epoch,
                    next_seq,
                    resume_part,
                    local_writes,
                },
            ) if header.id == ATTACH_ID => {
                let a = Attachment {
                    size,
                    chunk_size,
                    group_size,
                    cache_key: Zeroizing::new(cache_key),
                    dedup_key: Zeroizing::new(dedup_key),
                    volume_epoch,
                    next_seq,
                    local_writes,
                };
                self.on_attached(a, resume_part, now);
                Ok(())
            }
            (Conn::Attaching { .. }, Message::Error { code, message })
                if header.id == ATTACH_ID =>
            {
                let error = LinkError::Refused { code, message };
                if is_final(code) {
                    self.final_refusal(error);
                } else {
                    self.refused(now, error);
                }
                Ok(())
            }
            (Conn::Attaching { .. }, Message::Auth { .. }) if self.cfg.psk.is_none() => {
                self.refused(
                    now,
                    LinkError::Handshake(
                        "the origin requires a pre-shared key and this edge has none \
                         (give both the same --psk-file)"
                            .into(),
                    ),
                );
                Ok(())
            }
            (Conn::Up, msg) => self.on_up_frame(header, msg, now),
            (_, msg) => Err(LinkError::Unexpected(format!(
                "{:?} during the handshake",
                msg.kind()
            ))),
        }
    }

    fn send_attach(&mut self, now: Instant) {
        self.send(
            ATTACH_ID,
            Class::Demand,
            Message::Attach {
                volume: self.cfg.volume.clone(),
                edge_id: self.cfg.edge_id.clone(),
                resume_seq: self.batches.front().map_or(self.next_seq, |b| b.seq),
            },
        );
        self.conn = Conn::Attaching { since: now };
    }

    /// The origin refused us: retry later (it may be a restart in
    /// progress, or an operator fixing a key).
    fn refused(&mut self, now: Instant, error: LinkError) {
        self.events.push_back(EdgeEvent::Refused(error.clone()));
        self.close(now, error);
    }

    /// An operator fenced this edge off the volume. Never retried: only a
    /// rebuilt edge (its journal emptied) may be let back in, and what
    /// this one still holds must not reach the volume.
    fn fenced(&mut self, error: LinkError) {
        self.stats.fenced = true;
        self.finish(error.clone(), EdgeEvent::Failed(error));
    }

    /// The session is over: fails every request with `error`, reports
    /// `event`, lets go of the connection and opens no other.
    fn finish(&mut self, error: LinkError, event: EdgeEvent) {
        for (id, r) in std::mem::take(&mut self.requests) {
            self.events.push_back(failed(id, &r.kind, error.clone()));
        }
        if matches!(event, EdgeEvent::Failed(_)) {
            self.stats.last_error = Some(error.to_string());
        }
        self.stats.stopped = Some(error.to_string());
        self.events.push_back(event);
        self.events.push_back(EdgeEvent::Close {
            reason: error.clone(),
        });
        self.transport = None;
        self.next_heartbeat = None;
        self.detaching = false;
        self.disposition = None;
        self.detach_sent = false;
        self.conn = Conn::Gone;
        self.finished = Some(error);
    }

    /// A refusal at attach that no retry can change: fenced off the
    /// volume, or the volume is another edge's now.
    fn final_refusal(&mut self, error: LinkError) {
        match &error {
            LinkError::Refused {
                code: ErrorCode::Fenced,
                ..
            } => self.fenced(error),
            _ => self.finish(error.clone(), EdgeEvent::Failed(error)),
        }
    }

    /// Sends `Detach` (or `Release`) once asked to and nothing shipped is
    /// unacknowledged.
    fn pump_detach(&mut self) {
        if self.detaching && !self.detach_sent && self.is_up() && self.batches.is_empty() {
            self.detach_sent = true;
            let msg = match self.disposition {
                None => Message::Detach,
                Some(disposition) => Message::Release { disposition },
            };
            self.send(ATTACH_ID, Class::Demand, msg);
        }
    }

    fn on_attached(&mut self, a: Attachment, resume_part: u32, now: Instant) {
        if let Some(first) = &self.attachment {
            if first.size != a.size
                || first.volume_epoch != a.volume_epoch
                || first.chunk_size != a.chunk_size
                || first.local_writes != a.local_writes
            {
                let e = LinkError::VolumeChanged {
                    was: format!("{} bytes, epoch {:016x}", first.size, first.volume_epoch),
                    now: format!("{} bytes, epoch {:016x}", a.size, a.volume_epoch),
                };
                self.finish(e.clone(), EdgeEvent::Failed(e));
                return;
            }
        } else {
            self.attachment = Some(a.clone());
        }
        self.stats.connects += 1;
        self.backoff = self.cfg.reconnect_min;
        self.conn = Conn::Up;
        self.last_heartbeat_ack = now;
        self.next_heartbeat = Some(now + self.cfg.heartbeat);
        self.acknowledge(a.next_seq.saturating_sub(1));
        self.next_seq = self.next_seq.max(a.next_seq);
        // Resend: requests in the order they were made, batches from the
        // part the origin already holds.
        let resend: Vec<(u64, Message)> = self
            .requests
            .iter_mut()
            .map(|(&id, r)| {
                if let RequestKind::Read { got, .. } = &mut r.kind {
                    got.clear();
                }
                (id, r.msg.clone())
            })
            .collect();
        for (id, msg) in resend {
            self.send(id, Class::Demand, msg);
        }
        for b in &mut self.batches {
            b.next = 0;
            b.retry_at = None;
        }
        if let Some(b) = self.batches.front_mut() {
            if b.seq == a.next_seq && (resume_part as usize) < b.parts.len() {
                b.next = resume_part as usize;
            }
        }
        self.events.push_back(EdgeEvent::Attached(a));
        self.fill_batches(now);
        self.pump_detach();
    }

    /// Batches up to `seq` are applied.
    fn acknowledge(&mut self, seq: u64) {
        let mut newest = None;
        while self.batches.front().is_some_and(|b| b.seq <= seq) {
            newest = self.batches.pop_front().map(|b| b.seq);
        }
        self.next_seq = self.next_seq.max(seq + 1);
        if let Some(seq) = newest {
            self.batch_backoff = Duration::from_millis(100);
            self.events.push_back(EdgeEvent::BatchApplied { seq });
        }
    }

    fn on_up_frame(
        &mut self,
        header: FrameHeader,
        msg: Message,
        now: Instant,
    ) -> Result<(), LinkError> {
        let id = header.id;
        match msg {
            Message::HeartbeatAck { .. } => {
                self.last_heartbeat_ack = now;
                Ok(())
            }
            Message::Heartbeat { nanos } => {
                self.send(0, Class::Demand, Message::HeartbeatAck { nanos });
                Ok(())
            }
            Message::Push {
                offset,
                as_of,
                data,
            } => {
                self.stats.bytes_pushed += data.len() as u64;
                self.events.push_back(EdgeEvent::Push {
                    id,
                    offset,
                    as_of,
                    data,
                });
                Ok(())
            }
            Message::BatchAck { seq } if id == BATCH_ID => {
                self.acknowledge(seq);
                self.pump_detach();
                Ok(())
            }
            Message::Detached if id == ATTACH_ID && self.detach_sent => {
                self.finish(LinkError::Detached, EdgeEvent::Detached);
                Ok(())
            }
            Message::Error { code, message } if id == ATTACH_ID && self.detach_sent => {
                // The origin keeps the volume attached to us: go on, and
                // ship what waited for the release.
                self.detaching = false;
                self.disposition = None;
                self.detach_sent = false;
                self.events
                    .push_back(EdgeEvent::DetachRefused(LinkError::Refused {
                        code,
                        message,
                    }));
                self.fill_batches(now);
                Ok(())
            }
            Message::Error { code, message } if id == BATCH_ID => {
                // The origin failed to apply the oldest batch it had not
                // acknowledged (acks before it came first), and dropped it
                // and everything after it: ship them all again, later.
                let error = LinkError::Refused { code, message };
                let seq = self.batches.front().map_or(self.next_seq, |b| b.seq);
                let retry = now + self.batch_backoff;
                self.batch_backoff = (self.batch_backoff * 2).min(Duration::from_secs(10));
                for b in &mut self.batches {
                    b.next = 0;
                    b.retry_at = Some(retry);
                }
                self.events.push_back(EdgeEvent::BatchFailed { seq, error });
                Ok(())
            }
            Message::Error { code, message } => {
                let Some(r) = self.requests.remove(&id) else {
                    return Ok(());
                };
                let error = LinkError::Refused { code, message };
                self.events.push_back(failed(id, &r.kind, error));
                Ok(())
            }
            Message::ReadData {
                offset,
                as_of,
                data,
            } => self.on_read_data(id, offset, as_of, &data),
            Message::ReadSignatures {
                offset,
                chunk_size,
                sigs,
            } => {
                if let Some(Request {
                    kind: RequestKind::Sign { .. },
                    ..
                }) = self.requests.get(&id)
                {
                    return self.on_signatures(id, offset, chunk_size, sigs);
                }
                let Some(Request {
                    kind:
                        RequestKind::Read {
                            offset: want, len, ..
                        },
                    ..
                }) = self.requests.get(&id)
                else {
                    return Ok(());
                };
                let covers = u64::from(chunk_size) * sigs.len() as u64 == u64::from(*len);
                if offset != *want || !covers {
                    return Err(LinkError::Unexpected(format!(
                        "signatures for {} chunks of {chunk_size} at {offset}, asked for {len} at {want}",
                        sigs.len()
                    )));
                }
                self.requests.remove(&id);
                self.events.push_back(EdgeEvent::ReadDone {
                    id,
                    result: Ok(ReadReply::Signatures { chunk_size, sigs }),
                });
                Ok(())
            }
            Message::ExtentMap { offset, extents } => self.on_extent_map(id, offset, &extents),
            Message::ProfileStored => {
                if let Some(Request {
                    kind: RequestKind::Profile,
                    ..
                }) = self.requests.get(&id)
                {
                    self.requests.remove(&id);
                    self.events
                        .push_back(EdgeEvent::ProfileStored { id, result: Ok(()) });
                }
                Ok(())
            }
            Message::PrefetchDone => {
                if let Some(Request {
                    kind: RequestKind::Prefetch,
                    ..
                }) = self.requests.get(&id)
                {
                    self.requests.remove(&id);
                    self.events
                        .push_back(EdgeEvent::PrefetchDone { id, result: Ok(()) });
                }
                Ok(())
            }
            other => Err(LinkError::Unexpected(format!(
                "{:?} from the origin",
                other.kind()
            ))),
        }
    }

    fn on_signatures(
        &mut self,
        id: u64,
        offset: u64,
        block: u32,
        sigs: Vec<[u8; 32]>,
    ) -> Result<(), LinkError> {
        let Some(Request {
            kind:
                RequestKind::Sign {
                    offset: want,
                    len,
                    block: asked,
                },
            ..
        }) = self.requests.get(&id)
        else {
            return Ok(());
        };
        let pieces = u64::from(*len).div_ceil(u64::from(*asked));
        if offset != *want || block != *asked || sigs.len() as u64 != pieces {
            return Err(LinkError::Unexpected(format!(
                "{} signatures of {block}-byte pieces at {offset}, asked for {pieces} of {asked} \
                 at {want}",
                sigs.len()
            )));
        }
        self.requests.remove(&id);
        self.events.push_back(EdgeEvent::SignDone {
            id,
            result: Ok(sigs),
        });
        Ok(())
    }

    fn on_extent_map(
        &mut self,
        id: u64,
        offset: u64,
        extents: &[(u64, u8)],
    ) -> Result<(), LinkError> {
        // A reply to a request given up on (timed out or cancelled).
        let Some(r) = self.requests.get(&id) else {
            return Ok(());
        };
        let RequestKind::Extents { offset: want, len } = r.kind else {
            return Err(LinkError::Unexpected(format!(
                "an allocation map in answer to {:?}",
                r.msg.kind()
            )));
        };
        // The decoder checked that the runs are non-empty and do not wrap.
        let covered: u64 = extents.iter().map(|&(l, _)| l).sum();
        if offset != want || covered > len {
            return Err(LinkError::Unexpected(format!(
                "an allocation map of {covered} bytes at {offset}, asked for {len} at {want}"
            )));
        }
        self.requests.remove(&id);
        let mut at = offset;
        let extents = extents
            .iter()
            .map(|&(len, flags)| {
                let e = Extent {
                    offset: at,
                    len,
                    kind: extent_kind(flags),
                };
                at += len;
                e
            })
            .collect();
        self.events.push_back(EdgeEvent::ExtentsDone {
            id,
            result: Ok(extents),
        });
        Ok(())
    }

    fn on_read_data(
        &mut self,
        id: u64,
        offset: u64,
        as_of: u64,
        data: &Bytes,
    ) -> Result<(), LinkError> {
        // A reply to a request given up on (timed out or cancelled).
        let Some(r) = self.requests.get_mut(&id) else {
            return Ok(());
        };
        let RequestKind::Read {
            offset: want,
            len,
            got,
            as_of: seen,
        } = &mut r.kind
        else {
            return Err(LinkError::Unexpected("read data for a prefetch".into()));
        };
        let expect = *want + got.len() as u64;
        if offset != expect || got.len() + data.len() > *len as usize {
            return Err(LinkError::Unexpected(format!(
                "read data at {offset}+{}, expected {expect} of a {len}-byte read at {want}",
                data.len()
            )));
        }
        got.extend_from_slice(data);
        *seen = (*seen).min(as_of);
        if got.len() < *len as usize {
            return Ok(());
        }
        let (data, as_of) = (std::mem::take(got).freeze(), *seen);
        self.requests.remove(&id);
        self.stats.bytes_read += data.len() as u64;
        self.events.push_back(EdgeEvent::ReadDone {
            id,
            result: Ok(ReadReply::Data { as_of, data }),
        });
        Ok(())
    }
}

/// The completion of a request that failed with `error`.
fn failed(id: RequestId, kind: &RequestKind, error: LinkError) -> EdgeEvent {
    match kind {
        RequestKind::Read { .. } => EdgeEvent::ReadDone {
            id,
            result: Err(error),
        },
        RequestKind::Prefetch => EdgeEvent::PrefetchDone {
            id,
            result: Err(error),
        },
        RequestKind::Extents { .. } => EdgeEvent::ExtentsDone {
            id,
            result: Err(error),
        },
        RequestKind::Sign { .. } => EdgeEvent::SignDone {
            id,
            result: Err(error),
        },
        RequestKind::Profile => EdgeEvent::ProfileStored {
            id,
            result: Err(error),
        },
    }
}

/// Refusals that end the session: no retry can change them.
fn is_final(code: ErrorCode) -> bool {
    matches!(code, ErrorCode::Fenced | ErrorCode::Migrated)
}

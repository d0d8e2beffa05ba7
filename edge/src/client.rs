//! The edge's tokio shell around [`EdgeSession`]: [`LinkClient`], and
//! [`RemoteDevice`], the origin's volume as a `blockcore` device.
//!
//! ```text
//!   RemoteDevice::read ─┐
//!   EdgeDevice shipper ─┼─ commands ──> driver task: EdgeSession
//!                       │                 ├─ Connect ─> connect task (TCP, TLS) ─> ConnIo
//!   pushes <────────────┼─ Push events    ├─ socket bytes <-> handle_input / poll_transmit
//!   applied (watch) <───┘  BatchApplied   └─ timers: poll_timeout / handle_timeout
//! ```
//!
//! The driver owns the session and does nothing the session did not ask
//! for: it opens connections, moves bytes, sleeps until the session's next
//! deadline, and hands completions to whoever waits for them. It stops
//! when the session is over (detached, fenced by an operator, the volume
//! changed) or the last [`LinkClient`] is dropped; every call after that
//! fails with the reason ([`LinkClient::finished`]).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use blockcore::{
    check_range, BlockDevice, BlockError, BlockSizes, Capabilities, DeviceInfo, Extent, ExtentKind,
    Op, WriteEntry, WriteFlags, ZeroFlags,
};
use bytes::{Bytes, BytesMut};
use link::io::{gather, now, random, sleep_until, ConnIo};
use link::proto::{Disposition, ErrorCode, MAX_DATA_LEN};
use link::session::{
    Attachment, EdgeEvent, EdgeLinkStats, EdgeSession, EdgeSessionConfig, ReadReply, RequestId,
};
use link::LinkError;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};

/// How the edge reaches and uses its origin.
#[derive(Clone, Debug)]
pub struct EdgeLinkConfig {
    /// The origin's address, `HOST:PORT`.
    pub origin: String,
    /// The session's settings (volume, edge id, key, timeouts, windows).
    pub session: EdgeSessionConfig,
    /// TLS to the origin: the client configuration and the name the
    /// origin's certificate must carry. `None`: plaintext.
    pub tls: Option<(
        Arc<rustls::ClientConfig>,
        rustls::pki_types::ServerName<'static>,
    )>,
}

impl EdgeLinkConfig {
    /// A configuration with a random edge id (give a stable one to take a
    /// volume back after a restart).
    pub fn new(origin: impl Into<String>, volume: impl Into<String>) -> Self {
        let edge_id = format!("edge-{:016x}", u64::from_be_bytes(random()));
        Self {
            origin: origin.into(),
            session: EdgeSessionConfig::new(volume, edge_id),
            tls: None,
        }
    }
}

/// `len` bytes at `offset` as the pieces of at most `MAX_DATA_LEN` one
/// link message carries.
pub fn pieces(offset: u64, len: u64) -> impl Iterator<Item = (u64, u32)> {
    (offset..offset + len).step_by(MAX_DATA_LEN).map(move |s| {
        let n = (offset + len - s).min(MAX_DATA_LEN as u64);
        (s, u32::try_from(n).expect("at most MAX_DATA_LEN"))
    })
}

/// Data the origin sent without being asked for it (group push, prefetch).
#[derive(Debug)]
pub struct Push {
    /// The request that caused it (a prefetch's id), or 0 for group pushes.
    pub id: u64,
    pub offset: u64,
    /// The newest batch applied at the origin when the data was read.
    pub as_of: u64,
    pub data: Bytes,
}

/// Receives [`Push`]es.
pub type PushReceiver = mpsc::Receiver<Push>;

/// Link state and counters, for status displays.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinkStatus {
    pub link: EdgeLinkStats,
    /// Chunks the origin named by signature that the cache held (served
    /// without crossing the link), and those it no longer held (fetched).
    pub signature_hits: u64,
    pub signature_misses: u64,
}

enum Cmd {
    Read {
        offset: u64,
        len: u32,
        want_signatures: bool,
        reply: oneshot::Sender<Result<ReadReply, LinkError>>,
    },
    Prefetch {
        ranges: Vec<(u64, u32)>,
        reply: oneshot::Sender<Result<(), LinkError>>,
    },
    Plan {
        budget: u64,
        reply: oneshot::Sender<Result<(), LinkError>>,
    },
    StoreProfile {
        data: Bytes,
        reply: oneshot::Sender<Result<(), LinkError>>,
    },
    Fetch {
        ranges: Vec<(u64, u32)>,
        reply: oneshot::Sender<Result<Vec<Push>, LinkError>>,
    },
    Ship {
        seq: u64,
        entries: Vec<WriteEntry>,
    },
    Extents {
        offset: u64,
        len: u64,
        reply: oneshot::Sender<Result<Vec<Extent>, LinkError>>,
    },
    Sign {
        offset: u64,
        len: u32,
        block: u32,
        reply: oneshot::Sender<Result<Vec<[u8; 32]>, LinkError>>,
    },
    /// A detach, or with a disposition a release.
    Detach {
        reply: oneshot::Sender<Result<(), LinkError>>,
        timeout: Duration,
        disposition: Option<Disposition>,
    },
}

/// Detach (and release) calls waiting for the origin's `Detached`.
struct Detaching {
    waiters: Vec<oneshot::Sender<Result<(), LinkError>>>,
    deadline: Instant,
    timeout: Duration,
}

/// What a detach call returns once the client stopped for `reason`.
fn detach_outcome(reason: LinkError) -> Result<(), LinkError> {
    match reason {
        LinkError::Detached => Ok(()),
        e => Err(e),
    }
}

enum Waiter {
    Read(oneshot::Sender<Result<ReadReply, LinkError>>),
    /// Done or not, nothing more: a prefetch, a plan, a stored profile.
    Prefetch(oneshot::Sender<Result<(), LinkError>>),
    Extents(oneshot::Sender<Result<Vec<Extent>, LinkError>>),
    Sign(oneshot::Sender<Result<Vec<[u8; 32]>, LinkError>>),
    /// A prefetch whose pushes go to its caller, not to the cache.
    Fetch {
        pushes: Vec<Push>,
        reply: oneshot::Sender<Result<Vec<Push>, LinkError>>,
    },
}

#[derive(Debug, Default)]
struct Shared {
    status: Mutex<LinkStatus>,
    /// Why the driver stopped for good, once it has.
    finished: Mutex<Option<LinkError>>,
    /// The origin's batch number of journal batch `s` is `s + seq_offset`
    /// ([`LinkClient::set_seq_offset`]); everything this client hands out
    /// (applied batches, `as_of`) is in the journal's numbering.
    seq_offset: std::sync::atomic::AtomicI64,
}

impl Shared {
    fn offset(&self) -> i64 {
        self.seq_offset.load(std::sync::atomic::Ordering::Acquire)
    }

    /// An origin batch number in the journal's numbering (0: none of the
    /// journal's batches).
    fn to_journal(&self, origin_seq: u64) -> u64 {
        if origin_seq == u64::MAX {
            return u64::MAX;
        }
        let j = i128::from(origin_seq) - i128::from(self.offset());
        u64::try_from(j.max(0)).unwrap_or(u64::MAX)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A client attached to one volume of an origin. Cheap to clone; the link
/// closes when the last clone is dropped.
#[derive(Clone)]
pub struct LinkClient {
    cmd: mpsc::UnboundedSender<Cmd>,
    attachment: Attachment,
    volume: String,
    shared: Arc<Shared>,
    applied: watch::Receiver<u64>,
    room: watch::Receiver<usize>,
}

impl fmt::Debug for LinkClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LinkClient")
            .field("volume", &self.volume)
            .finish_non_exhaustive()
    }
}

impl LinkClient {
    /// Connects and attaches; the first attach must succeed (a wrong
    /// address, key or volume is an error here, not a retry loop).
    /// Afterwards the session reconnects by itself whenever the link fails.
    pub async fn connect(cfg: EdgeLinkConfig) -> Result<(LinkClient, PushReceiver), LinkError> {
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (push_tx, push_rx) = mpsc::channel(256);
        let (first_tx, first_rx) = oneshot::channel();
        let (applied_tx, applied) = watch::channel(0);
        let (room_tx, room) = watch::channel(cfg.session.max_batches);
        let shared = Arc::new(Shared::default());
        let volume = cfg.session.volume.clone();
        let session = EdgeSession::new(cfg.session.clone(), now());
        let driver = Driver {
            session,
            origin: cfg.origin,
            tls: cfg.tls,
            cmd: cmd_rx,
            io: None,
            connecting: None,
            waiters: HashMap::new(),
            pushes: push_tx,
            applied: applied_tx,
            room: room_tx,
            shared: shared.clone(),
            first: Some(first_tx),
            detach: None,
        };
        tokio::spawn(driver.run());
        let attachment = first_rx.await.map_err(|_| LinkError::Closed)??;
        Ok((
            LinkClient {
                cmd: cmd_tx,
                attachment,
                volume,
                shared,
                applied,
                room,
            },
            push_rx,
        ))
    }

    /// What the origin said at the first attach.
    pub fn attachment(&self) -> &Attachment {
        &self.attachment
    }

    pub fn volume(&self) -> &str {
        &self.volume
    }

    /// Link state and counters.
    pub fn status(&self) -> LinkStatus {
        lock(&self.shared.status).clone()
    }

    /// Why the link stopped for good ([`LinkError::Detached`], a
    /// `Fenced` or `Migrated` refusal, [`LinkError::VolumeChanged`]), if
    /// it did: what every call fails with from then on.
    pub fn finished(&self) -> Option<LinkError> {
        lock(&self.shared.finished).clone()
    }

    /// The error for a call the driver can no longer take.
    fn gone(&self) -> LinkError {
        self.finished().unwrap_or(LinkError::Closed)
    }

    /// Detaches from the volume: once every batch shipped is applied, the
    /// origin releases the volume (another edge may then attach it) and
    /// this client stops: the connection closes, it is not reopened, and
    /// later calls fail with [`LinkError::Detached`]. Without the origin's
    /// confirmation within `timeout` it stops all the same and returns
    /// `Timeout` (the origin lets go when it sees the connection close;
    /// batches not applied stay in the journal for a later attach).
    /// Drain the journal first ([`crate::EdgeDevice::drain`]) so nothing
    /// is left behind.
    pub async fn detach(&self, timeout: Duration) -> Result<(), LinkError> {
        self.detach_as(None, timeout).await
    }

    /// Releases the volume as `disposition` says: as
    /// [`detach`](Self::detach) (once every batch shipped is applied, then
    /// this client stops; `Timeout` without the origin's confirmation),
    /// with the origin recording, durably, before it confirms, that the
    /// volume was migrated to this edge ([`Disposition::CutOver`]: every
    /// other edge is refused it from then on) or is home again
    /// ([`Disposition::Home`]). A refusal (`Migrated`: the volume is
    /// another edge's; `Io`: the record could not be written) leaves the
    /// volume attached and this client running, and fails every detach
    /// waiting with it. A timeout leaves it unknown whether the origin
    /// recorded it: releasing again (from a new client with the same
    /// edge id) settles it either way.
    pub async fn release(
        &self,
        disposition: Disposition,
        timeout: Duration,
    ) -> Result<(), LinkError> {
        self.detach_as(Some(disposition), timeout).await
    }

    async fn detach_as(
        &self,
        disposition: Option<Disposition>,
        timeout: Duration,
    ) -> Result<(), LinkError> {
        let (reply, rx) = oneshot::channel();
        let cmd = Cmd::Detach {
            reply,
            timeout,
            disposition,
        };
        if self.cmd.send(cmd).is_err() {
            return detach_outcome(self.gone());
        }
        match rx.await {
            Ok(r) => r,
            Err(_) => detach_outcome(self.gone()),
        }
    }

    /// How a prefix of `[offset, offset + len)` is allocated at the origin
    /// (its volume's `BlockDevice::extents`): contiguous extents from
    /// `offset`, at least one byte and at most the range; ask again from
    /// where they end for the rest, or use
    /// [`allocation`](Self::allocation). `len` must not be 0.
    pub async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>, LinkError> {
        let (reply, rx) = oneshot::channel();
        self.cmd
            .send(Cmd::Extents { offset, len, reply })
            .map_err(|_| self.gone())?;
        rx.await.map_err(|_| self.gone())?
    }

    /// The signature of every `block`-byte piece of `[offset, offset +
    /// len)` as the origin's image holds it now (the last piece may be
    /// short), keyed with the deployment's dedup key: what a move back
    /// compares its copy with.
    pub async fn signatures(
        &self,
        offset: u64,
        len: u32,
        block: u32,
    ) -> Result<Vec<[u8; 32]>, LinkError> {
        let (reply, rx) = oneshot::channel();
        self.cmd
            .send(Cmd::Sign {
                offset,
                len,
                block,
                reply,
            })
            .map_err(|_| self.gone())?;
        rx.await.map_err(|_| self.gone())?
    }

    /// The allocation of all of `[offset, offset + len)` at the origin,
    /// asking as often as it takes: contiguous extents covering exactly
    /// the range, neighbours of one kind merged (none for an empty range).
    pub async fn allocation(&self, offset: u64, len: u64) -> Result<Vec<Extent>, LinkError> {
        let end = offset.checked_add(len).ok_or_else(|| {
            LinkError::Unexpected(format!("an allocation query of {len} bytes at {offset}"))
        })?;
        let mut out: Vec<Extent> = Vec::new();
        let mut at = offset;
        while at < end {
            for e in self.extents(at, end - at).await? {
                at = e.offset + e.len;
                match out.last_mut() {
                    Some(last) if last.kind == e.kind => last.len += e.len,
                    _ => out.push(e),
                }
            }
        }
        Ok(out)
    }

    /// Reads `[offset, offset + len)` from the origin (`len` up to 16 MiB).
    pub async fn read(&self, offset: u64, len: u32) -> Result<Bytes, LinkError> {
        match self.read_as(offset, len, false).await? {
            ReadReply::Data { data, .. } => Ok(data),
            ReadReply::Signatures { .. } => Err(LinkError::Unexpected(
                "signatures in answer to a read that did not accept them".into(),
            )),
        }
    }

    /// Reads `[offset, offset + len)`, letting the origin answer with the
    /// signatures of chunks it already sent this edge.
    pub async fn read_signed(&self, offset: u64, len: u32) -> Result<ReadReply, LinkError> {
        self.read_as(offset, len, true).await
    }

    async fn read_as(
        &self,
        offset: u64,
        len: u32,
        want_signatures: bool,
    ) -> Result<ReadReply, LinkError> {
        let (reply, rx) = oneshot::channel();
        let asked = std::time::Instant::now();
        self.cmd
            .send(Cmd::Read {
                offset,
                len,
                want_signatures,
                reply,
            })
            .map_err(|_| self.gone())?;
        let r = rx.await.map_err(|_| self.gone())?;
        // Each read the guest waited a round trip for (RUST_LOG=edge=debug):
        // what a prefetch plan missed.
        tracing::debug!(
            offset,
            len,
            ms = asked.elapsed().as_secs_f64() * 1e3,
            "demand read"
        );
        r
    }

    /// Asks the origin to stream `ranges` as pushes; returns when it has
    /// sent them all (they may still be in the push channel).
    pub async fn prefetch(&self, ranges: Vec<(u64, u32)>) -> Result<(), LinkError> {
        let (reply, rx) = oneshot::channel();
        self.cmd
            .send(Cmd::Prefetch { ranges, reply })
            .map_err(|_| self.gone())?;
        rx.await.map_err(|_| self.gone())?
    }

    /// Asks the origin to push the volume's prefetch plan (at most
    /// `budget` bytes; its pushes carry the plan's request id to the push
    /// channel); returns when it has sent it all.
    pub async fn plan(&self, budget: u64) -> Result<(), LinkError> {
        let (reply, rx) = oneshot::channel();
        self.cmd
            .send(Cmd::Plan { budget, reply })
            .map_err(|_| self.gone())?;
        rx.await.map_err(|_| self.gone())?
    }

    /// Hands the origin a boot profile (the `prefetch` crate's encoding)
    /// to keep with the volume.
    pub async fn store_profile(&self, data: Bytes) -> Result<(), LinkError> {
        let (reply, rx) = oneshot::channel();
        self.cmd
            .send(Cmd::StoreProfile { data, reply })
            .map_err(|_| self.gone())?;
        rx.await.map_err(|_| self.gone())?
    }

    /// Reads `len` bytes at `offset` in the background class: the origin
    /// sends them as pushes, which never queue ahead of demand reads, and
    /// they come back here instead of going to the push channel. For bulk
    /// copies (a migration) that must not slow the guest down. The pieces
    /// may come in any order; each carries its `as_of`.
    pub async fn fetch_background(&self, offset: u64, len: u64) -> Result<Vec<Push>, LinkError> {
        let ranges = pieces(offset, len).collect();
        let (reply, rx) = oneshot::channel();
        self.cmd
            .send(Cmd::Fetch { ranges, reply })
            .map_err(|_| self.gone())?;
        rx.await.map_err(|_| self.gone())?
    }

    /// How many more batches the link takes now.
    pub fn batch_room(&self) -> usize {
        *self.room.borrow()
    }

    /// Waits until the link takes another batch.
    pub async fn wait_batch_room(&self) -> Result<(), LinkError> {
        let mut room = self.room.clone();
        room.wait_for(|r| *r > 0)
            .await
            .map(|_| ())
            .map_err(|_| self.gone())
    }

    /// Ships write batch `seq` (in order, once each; see
    /// [`EdgeSession::ship`]) until the origin has applied it: watch
    /// [`LinkClient::applied`].
    pub fn ship(&self, seq: u64, entries: Vec<WriteEntry>) -> Result<(), LinkError> {
        let wire = i128::from(seq) + i128::from(self.shared.offset());
        let seq = u64::try_from(wire).map_err(|_| LinkError::Closed)?;
        self.cmd
            .send(Cmd::Ship { seq, entries })
            .map_err(|_| self.gone())
    }

    /// Numbers the journal's batches for the origin: journal batch `s`
    /// ships as the origin's batch `s + offset`. An edge whose journal
    /// starts (or resumes) behind the volume's sequence (another edge
    /// wrote the volume since) would otherwise have its batches taken
    /// for ones the origin already applied. Set before the first
    /// [`LinkClient::ship`], from the journal's persisted offset.
    pub fn set_seq_offset(&self, offset: i64) {
        self.shared
            .seq_offset
            .store(offset, std::sync::atomic::Ordering::Release);
    }

    /// The newest batch the origin has applied (every one before it too).
    /// Closed once the client stopped ([`LinkClient::finished`]): a batch
    /// not applied by then never will be through this client.
    pub fn applied(&self) -> watch::Receiver<u64> {
        self.applied.clone()
    }

    /// The session's time base and counters, for tests.
    pub fn is_connected(&self) -> bool {
        self.status().link.connected
    }

    fn count_signatures(&self, hit: bool, n: u64) {
        let mut s = lock(&self.shared.status);
        if hit {
            s.signature_hits += n;
        } else {
            s.signature_misses += n;
        }
    }
}

/// A connection being opened.
type Connecting = tokio::task::JoinHandle<Result<ConnIo, LinkError>>;

struct Driver {
    session: EdgeSession,
    origin: String,
    tls: Option<(
        Arc<rustls::ClientConfig>,
        rustls::pki_types::ServerName<'static>,
    )>,
    cmd: mpsc::UnboundedReceiver<Cmd>,
    io: Option<ConnIo>,
    connecting: Option<Connecting>,
    waiters: HashMap<RequestId, Waiter>,
    pushes: mpsc::Sender<Push>,
    applied: watch::Sender<u64>,
    room: watch::Sender<usize>,
    shared: Arc<Shared>,
    /// Until the first attach: where its outcome goes.
    first: Option<oneshot::Sender<Result<Attachment, LinkError>>>,
    detach: Option<Detaching>,
}

/// How long opening a connection (TCP and TLS) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

async fn open(
    origin: String,
    tls: Option<(
        Arc<rustls::ClientConfig>,
        rustls::pki_types::ServerName<'static>,
    )>,
) -> Result<ConnIo, LinkError> {
    let connect = async {
        let stream = TcpStream::connect(&origin).await?;
        let _ = stream.set_nodelay(true);
        Ok::<_, LinkError>(match tls {
            Some((config, name)) => {
                let tls = tokio_rustls::TlsConnector::from(config)
                    .connect(name, stream)
                    .await
                    .map_err(|e| LinkError::Handshake(format!("TLS: {e}")))?;
                ConnIo::spawn(tls)
            }
            None => ConnIo::spawn(stream),
        })
    };
    tokio::time::timeout(CONNECT_TIMEOUT, connect)
        .await
        .map_err(|_| LinkError::Timeout(CONNECT_TIMEOUT))?
}

impl Driver {
    async fn run(mut self) {
        loop {
            if !self.handle_events() {
                break;
            }
            let sendable = self.io.is_some() && self.session.can_transmit(now());
            let output = self.io.as_ref().map(|io| io.output.clone());
            let detach_by = self.detach.as_ref().map(|d| d.deadline);
            tokio::select! {
                biased;
                cmd = self.cmd.recv() => match cmd {
                    Some(cmd) => self.command(cmd),
                    // Every LinkClient is gone.
                    None => break,
                },
                opened = async { self.connecting.as_mut().expect("guarded").await }, if self.connecting.is_some() => {
                    self.connecting = None;
                    match opened {
                        Ok(Ok(io)) => {
                            if self.session.connected(now(), random()) {
                                self.io = Some(io);
                            }
                        }
                        Ok(Err(e)) => {
                            if let Some(first) = self.first.take() {
                                let _ = first.send(Err(e));
                                break;
                            }
                            tracing::debug!(origin = %self.origin, error = %e, "connecting to the origin failed");
                            self.session.connect_failed(now(), &e);
                        }
                        Err(e) => self.session.connect_failed(now(), &LinkError::Io(Arc::new(std::io::Error::other(e)))),
                    }
                },
                input = async { self.io.as_mut().expect("guarded").input.recv().await }, if self.io.is_some() => match input {
                    Some(Ok(bytes)) => self.session.handle_input(&bytes, now()),
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "link to the origin closed");
                        self.io = None;
                        self.session.disconnected(now());
                    }
                    None => {
                        self.io = None;
                        self.session.disconnected(now());
                    }
                },
                permit = async { output.as_ref().expect("guarded").reserve().await }, if sendable => {
                    if let Ok(permit) = permit {
                        let frames = gather(|| self.session.poll_transmit(now()));
                        if !frames.is_empty() {
                            permit.send(frames);
                        }
                    } else {
                        // The writer stopped: the socket failed.
                        self.io = None;
                        self.session.disconnected(now());
                    }
                }
                () = sleep_until(detach_by), if detach_by.is_some() => {
                    let d = self.detach.take().expect("guarded");
                    tracing::warn!(origin = %self.origin, timeout = ?d.timeout, "the origin did not confirm the detach; closing the link");
                    for w in d.waiters {
                        let _ = w.send(Err(LinkError::Timeout(d.timeout)));
                    }
                    self.stop(&LinkError::Detached);
                    break;
                }
                () = sleep_until(self.session.poll_timeout()) => self.session.handle_timeout(now()),
            }
        }
        // Dropping the connection aborts its tasks.
        if let Some(c) = self.connecting.take() {
            c.abort();
        }
    }

    fn command(&mut self, cmd: Cmd) {
        let t = now();
        match cmd {
            Cmd::Read {
                offset,
                len,
                want_signatures,
                reply,
            } => {
                let id = self.session.read(offset, len, want_signatures, t);
                self.waiters.insert(id, Waiter::Read(reply));
            }
            Cmd::Prefetch { ranges, reply } => {
                let id = self.session.prefetch(ranges);
                self.waiters.insert(id, Waiter::Prefetch(reply));
            }
            Cmd::Plan { budget, reply } => {
                let id = self.session.plan(budget);
                self.waiters.insert(id, Waiter::Prefetch(reply));
            }
            Cmd::StoreProfile { data, reply } => {
                let id = self.session.store_profile(data, t);
                self.waiters.insert(id, Waiter::Prefetch(reply));
            }
            Cmd::Fetch { ranges, reply } => {
                let id = self.session.prefetch(ranges);
                self.waiters.insert(
                    id,
                    Waiter::Fetch {
                        pushes: Vec::new(),
                        reply,
                    },
                );
            }
            Cmd::Ship { seq, entries } => self.session.ship(seq, entries, t),
            Cmd::Extents { offset, len, reply } => {
                let id = self.session.extents(offset, len, t);
                self.waiters.insert(id, Waiter::Extents(reply));
            }
            Cmd::Sign {
                offset,
                len,
                block,
                reply,
            } => {
                let id = self.session.sign(offset, len, block, t);
                self.waiters.insert(id, Waiter::Sign(reply));
            }
            Cmd::Detach {
                reply,
                timeout,
                disposition,
            } => {
                if let Some(d) = disposition {
                    // Refused at once (another detach under way, or the
                    // session over): this caller only.
                    if let Err(e) = self.session.release(d) {
                        let _ = reply.send(Err(e));
                        return;
                    }
                }
                let deadline = t + timeout;
                match &mut self.detach {
                    Some(d) => {
                        d.waiters.push(reply);
                        if deadline < d.deadline {
                            (d.deadline, d.timeout) = (deadline, timeout);
                        }
                    }
                    None => {
                        self.detach = Some(Detaching {
                            waiters: vec![reply],
                            deadline,
                            timeout,
                        });
                    }
                }
                if disposition.is_none() {
                    self.session.detach();
                }
            }
        }
        // Reads given up on by their callers need no answer any more.
        if self.waiters.len() > 1024 {
            let gone: Vec<RequestId> = self
                .waiters
                .iter()
                .filter(|(_, w)| match w {
                    Waiter::Read(r) => r.is_closed(),
                    Waiter::Prefetch(r) => r.is_closed(),
                    Waiter::Extents(r) => r.is_closed(),
                    Waiter::Sign(r) => r.is_closed(),
                    Waiter::Fetch { reply, .. } => reply.is_closed(),
                })
                .map(|(id, _)| *id)
                .collect();
            for id in gone {
                self.waiters.remove(&id);
                self.session.cancel(id);
            }
        }
    }

    /// Handles the session's events; false when the driver must stop.
    fn handle_events(&mut self) -> bool {
        // Counters first: a caller woken by an event may read them at once.
        self.publish();
        while let Some(event) = self.session.poll_event() {
            match event {
                EdgeEvent::Connect => {
                    let (origin, tls) = (self.origin.clone(), self.tls.clone());
                    self.connecting = Some(tokio::spawn(open(origin, tls)));
                }
                EdgeEvent::Close { reason } => {
                    tracing::warn!(origin = %self.origin, error = %reason, "link to the origin lost; reconnecting");
                    self.io = None;
                    if let Some(c) = self.connecting.take() {
                        c.abort();
                    }
                    if let Some(first) = self.first.take() {
                        let _ = first.send(Err(reason));
                        return false;
                    }
                }
                EdgeEvent::Attached(a) => {
                    tracing::info!(origin = %self.origin, next_seq = a.next_seq, "attached to the origin");
                    if let Some(first) = self.first.take() {
                        let _ = first.send(Ok(a));
                    }
                }
                EdgeEvent::Refused(e) => {
                    if let Some(first) = self.first.take() {
                        let _ = first.send(Err(e));
                        return false;
                    }
                    tracing::error!(origin = %self.origin, error = %e, "the origin refuses this edge; retrying");
                }
                EdgeEvent::Failed(e) => {
                    tracing::error!(origin = %self.origin, error = %e, "the link to the origin is unusable; it stops");
                    if let Some(first) = self.first.take() {
                        let _ = first.send(Err(e));
                        return false;
                    }
                    self.stop(&e);
                    return false;
                }
                EdgeEvent::ReadDone { id, result } => {
                    if let Some(Waiter::Read(w)) = self.waiters.remove(&id) {
                        let result = result.map(|r| match r {
                            ReadReply::Data { as_of, data } => ReadReply::Data {
                                as_of: self.shared.to_journal(as_of),
                                data,
                            },
                            other @ ReadReply::Signatures { .. } => other,
                        });
                        let _ = w.send(result);
                    }
                }
                EdgeEvent::PrefetchDone { id, result } => match self.waiters.remove(&id) {
                    Some(Waiter::Prefetch(w)) => {
                        let _ = w.send(result);
                    }
                    Some(Waiter::Fetch { pushes, reply }) => {
                        let _ = reply.send(result.map(|()| pushes));
                    }
                    Some(w @ (Waiter::Read(_) | Waiter::Extents(_) | Waiter::Sign(_))) => {
                        self.waiters.insert(id, w);
                    }
                    None => {}
                },
                EdgeEvent::Push {
                    id,
                    offset,
                    as_of,
                    data,
                } if matches!(self.waiters.get(&id), Some(Waiter::Fetch { .. })) => {
                    let as_of = self.shared.to_journal(as_of);
                    if let Some(Waiter::Fetch { pushes, .. }) = self.waiters.get_mut(&id) {
                        pushes.push(Push {
                            id,
                            offset,
                            as_of,
                            data,
                        });
                    }
                }
                EdgeEvent::Push {
                    id,
                    offset,
                    as_of,
                    data,
                } => {
                    // Pushes are optional data: dropped when the consumer
                    // falls behind.
                    let _ = self.pushes.try_send(Push {
                        id,
                        offset,
                        as_of: self.shared.to_journal(as_of),
                        data,
                    });
                }
                EdgeEvent::BatchApplied { seq } => {
                    let seq = self.shared.to_journal(seq);
                    self.applied.send_if_modified(|a| {
                        let newer = seq > *a;
                        *a = (*a).max(seq);
                        newer
                    });
                }
                EdgeEvent::BatchFailed { seq, error } => {
                    tracing::error!(seq, error = %error, "the origin did not apply a batch; shipping it again");
                }
                EdgeEvent::Detached => {
                    tracing::info!(origin = %self.origin, volume = %self.session.config().volume, "detached from the origin");
                    self.stop(&LinkError::Detached);
                    return false;
                }
                EdgeEvent::ExtentsDone { id, result } => {
                    if let Some(Waiter::Extents(w)) = self.waiters.remove(&id) {
                        let _ = w.send(result);
                    }
                }
                EdgeEvent::SignDone { id, result } => {
                    if let Some(Waiter::Sign(w)) = self.waiters.remove(&id) {
                        let _ = w.send(result);
                    }
                }
                EdgeEvent::ProfileStored { id, result } => {
                    if let Some(Waiter::Prefetch(w)) = self.waiters.remove(&id) {
                        let _ = w.send(result);
                    }
                }
                EdgeEvent::DetachRefused(e) => {
                    tracing::error!(origin = %self.origin, volume = %self.session.config().volume, error = %e, "the origin refused to release the volume; it stays attached");
                    if let Some(d) = self.detach.take() {
                        for w in d.waiters {
                            let _ = w.send(Err(e.clone()));
                        }
                    }
                }
            }
        }
        true
    }

    /// The session is over: records why (every later call fails with it),
    /// answers whoever waits, and publishes the final counters. The
    /// caller then ends the driver, which closes the connection.
    fn stop(&mut self, reason: &LinkError) {
        *lock(&self.shared.finished) = Some(reason.clone());
        // Calls from now on fail at once, even before the driver is gone.
        self.cmd.close();
        for (_, w) in self.waiters.drain() {
            match w {
                Waiter::Read(w) => {
                    let _ = w.send(Err(reason.clone()));
                }
                Waiter::Prefetch(w) => {
                    let _ = w.send(Err(reason.clone()));
                }
                Waiter::Extents(w) => {
                    let _ = w.send(Err(reason.clone()));
                }
                Waiter::Sign(w) => {
                    let _ = w.send(Err(reason.clone()));
                }
                Waiter::Fetch { reply, .. } => {
                    let _ = reply.send(Err(reason.clone()));
                }
            }
        }
        if let Some(d) = self.detach.take() {
            for w in d.waiters {
                let _ = w.send(detach_outcome(reason.clone()));
            }
        }
        self.publish();
    }

    fn publish(&mut self) {
        let stats = self.session.stats(now());
        self.room.send_if_modified(|r| {
            let room = self.session.batch_room();
            std::mem::replace(r, room) != room
        });
        lock(&self.shared.status).link = stats;
    }
}

/// Where the edge looks up content by signature (its cache).
pub trait SignatureStore: Send + Sync {
    /// The plaintext stored under `sig`, if held and intact.
    fn get(&self, sig: &[u8; 32]) -> Option<Bytes>;
}

impl fmt::Debug for dyn SignatureStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SignatureStore")
    }
}

/// The origin's volume as a block device that only reads: every read goes
/// to the origin. It sits under the cache layer; writes reach the origin
/// through the journal and the shipper, never through here.
#[derive(Clone, Debug)]
pub struct RemoteDevice {
    client: LinkClient,
    size: u64,
    /// With a store, reads accept signature replies.
    signatures: Option<Arc<dyn SignatureStore>>,
}

impl RemoteDevice {
    pub fn new(client: LinkClient) -> Self {
        let size = client.attachment().size;
        Self {
            client,
            size,
            signatures: None,
        }
    }

    /// Reads accept signature replies, served from `store` when it holds
    /// the content (and fetched as data when it does not).
    #[must_use]
    pub fn with_signatures(mut self, store: Arc<dyn SignatureStore>) -> Self {
        self.signatures = Some(store);
        self
    }

    /// One read of at most `MAX_DATA_LEN`, through signatures when allowed.
    async fn read_one(&self, offset: u64, len: u32) -> Result<Bytes, LinkError> {
        let Some(store) = &self.signatures else {
            return self.client.read(offset, len).await;
        };
        let (chunk_size, sigs) = match self.client.read_signed(offset, len).await? {
            ReadReply::Data { data, .. } => return Ok(data),
            ReadReply::Signatures { chunk_size, sigs } => (chunk_size, sigs),
        };
        if u64::from(chunk_size) * sigs.len() as u64 != u64::from(len) {
            return Err(LinkError::Unexpected(format!(
                "{} signatures of {chunk_size} bytes in answer to a read of {len}",
                sigs.len()
            )));
        }
        let store = store.clone();
        let chunk = chunk_size as usize;
        // Cache lookups read and decrypt from disk: off the async threads.
        let mut held: Vec<Option<Bytes>> = tokio::task::spawn_blocking(move || {
            sigs.iter()
                .map(|sig| store.get(sig).filter(|d| d.len() == chunk))
                .collect()
        })
        .await
        .map_err(|e| LinkError::Unexpected(format!("signature lookup: {e}")))?;
        let missing = held.iter().filter(|d| d.is_none()).count() as u64;
        self.client
            .count_signatures(true, held.len() as u64 - missing);
        if missing == 0 {
            let mut out = BytesMut::with_capacity(chunk * held.len());
            held.iter().flatten().for_each(|d| out.extend_from_slice(d));
            return Ok(out.freeze());
        }
        // Evicted since the origin sent it, or still being stored (a fill
        // is written in the background): one more round trip, for only the
        // chunks not held.
        self.client.count_signatures(false, missing);
        let runs = missing_runs(&held);
        // Each run is inside this read, so its length fits a u32 as `len` does.
        let fetched = futures::future::try_join_all(runs.iter().map(|&(first, n)| {
            let at = offset + first as u64 * u64::from(chunk_size);
            self.client
                .read(at, u32::try_from(n * chunk).unwrap_or(len))
        }))
        .await?;
        for (&(first, n), data) in runs.iter().zip(fetched) {
            if data.len() != n * chunk {
                return Err(LinkError::Unexpected(format!(
                    "{} bytes in answer to a read of {}",
                    data.len(),
                    n * chunk
                )));
            }
            for k in 0..n {
                held[first + k] = Some(data.slice(k * chunk..(k + 1) * chunk));
            }
        }
        let mut out = BytesMut::with_capacity(chunk * held.len());
        held.iter().flatten().for_each(|d| out.extend_from_slice(d));
        Ok(out.freeze())
    }

    pub fn client(&self) -> &LinkClient {
        &self.client
    }
}

/// The runs of `None` in `held`, as (first index, length).
fn missing_runs(held: &[Option<Bytes>]) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, d) in held.iter().enumerate() {
        if d.is_some() {
            continue;
        }
        match runs.last_mut() {
            Some((first, n)) if *first + *n == i => *n += 1,
            _ => runs.push((i, 1)),
        }
    }
    runs
}

/// The one mapping of a link failure to a block error, as the NBD and
/// iSCSI front ends see it (EIO, or MEDIUM ERROR; never zeroes).
pub fn link_block_error(op: Op, offset: u64, e: LinkError) -> BlockError {
    let io = |e: LinkError| BlockError::Io {
        op,
        offset,
        source: std::io::Error::other(format!("origin: {e}")),
    };
    match e {
        LinkError::Refused {
            code: ErrorCode::OutOfRange,
            ..
        } => BlockError::OutOfRange {
            op,
            offset,
            len: 0,
            size: 0,
        },
        // A detached edge is going away: as a device, it is shutting down.
        LinkError::Refused {
            code: ErrorCode::ShuttingDown,
            ..
        }
        | LinkError::Detached => BlockError::ShuttingDown { op },
        e @ (LinkError::Refused { .. }
        | LinkError::Io(_)
        | LinkError::Proto(_)
        | LinkError::Closed
        | LinkError::Handshake(_)
        | LinkError::AuthFailed
        | LinkError::Unsupported(_)
        | LinkError::Unexpected(_)
        | LinkError::Timeout(_)
        | LinkError::Silent(_)
        | LinkError::VolumeChanged { .. }) => io(e),
    }
}

#[async_trait]
impl BlockDevice for RemoteDevice {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            size: self.size,
            block_sizes: BlockSizes::DEFAULT,
            caps: Capabilities {
                read_only: true,
                flush: false,
                fua: false,
                trim: false,
                write_zeroes: false,
                fast_zero: false,
                extents: true,
                prefetch: true,
                multi_conn: true,
            },
        }
    }

    async fn read(&self, offset: u64, len: usize) -> blockcore::Result<Bytes> {
        check_range(&self.info(), Op::Read, offset, len as u64)?;
        if len <= MAX_DATA_LEN {
            let n = u32::try_from(len).expect("at most 16 MiB");
            return self
                .read_one(offset, n)
                .await
                .map_err(|e| link_block_error(Op::Read, offset, e));
        }
        // Larger than one message: in pieces, all in flight at once.
        let pieces = (0..len).step_by(MAX_DATA_LEN).map(|s| {
            let n = u32::try_from((len - s).min(MAX_DATA_LEN)).expect("at most 16 MiB");
            let off = offset + s as u64;
            let client = self.client.clone();
            async move {
                client
                    .read(off, n)
                    .await
                    .map_err(|e| link_block_error(Op::Read, off, e))
            }
        });
        let parts = futures::future::try_join_all(pieces).await?;
        let mut out = BytesMut::with_capacity(len);
        for p in parts {
            out.extend_from_slice(&p);
        }
        Ok(out.freeze())
    }

    async fn write(&self, _offset: u64, _data: Bytes, _flags: WriteFlags) -> blockcore::Result<()> {
        Err(BlockError::ReadOnly { op: Op::Write })
    }

    async fn flush(&self) -> blockcore::Result<()> {
        Ok(())
    }

    async fn trim(&self, _offset: u64, _len: u64, _flags: WriteFlags) -> blockcore::Result<()> {
        Err(BlockError::ReadOnly { op: Op::Trim })
    }

    async fn write_zeroes(
        &self,
        _offset: u64,
        _len: u64,
        _flags: ZeroFlags,
    ) -> blockcore::Result<()> {
        Err(BlockError::ReadOnly {
            op: Op::WriteZeroes,
        })
    }

    /// The origin's allocation map (one query: a prefix of the range).
    async fn extents(&self, offset: u64, len: u64) -> blockcore::Result<Vec<Extent>> {
        check_range(&self.info(), Op::Extents, offset, len)?;
        if len == 0 {
            return Ok(vec![Extent {
                offset,
                len: 0,
                kind: ExtentKind::Data,
            }]);
        }
        self.client
            .extents(offset, len)
            .await
            .map_err(|e| link_block_error(Op::Extents, offset, e))
    }

    async fn prefetch(&self, offset: u64, len: u64) -> blockcore::Result<()> {
        check_range(&self.info(), Op::Prefetch, offset, len)?;
        let ranges = pieces(offset, len).collect();
        self.client
            .prefetch(ranges)
            .await
            .map_err(|e| link_block_error(Op::Prefetch, offset, e))
    }
}

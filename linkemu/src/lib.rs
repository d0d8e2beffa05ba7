//! A WAN link emulator: a TCP relay that makes a loopback connection behave
//! like a long-distance link, for tests, benchmarks and `ferry demo` (this
//! machine's kernel has no `netem`).
//!
//! [`LinkEmulator::start`] listens on one address and relays every accepted
//! connection to a target address. Each direction of each connection is
//! shaped independently:
//!
//! - **Delay**: every byte is delivered no earlier than the one-way delay
//!   after the relay read it, in order.
//! - **Bandwidth**: bytes leave through a virtual serializer running at the
//!   configured rate: a piece of `len` bytes read at `now` departs at
//!   `max(now, previous departure) + len / rate` and is delivered at its
//!   departure plus the delay. Reads are split into pieces of about 2 ms of
//!   serialization (4-64 KiB), so a burst is spread out in time rather than
//!   delivered in one lump.
//! - **Bounded queue**: at most [`LinkConfig::queue_limit`] bytes per
//!   direction wait in the relay (by default twice the bandwidth-delay
//!   product, at least 4 MiB); when it is full the relay stops reading the
//!   source socket, so the sender feels back-pressure the way TCP's window
//!   makes it feel a real link. With unlimited bandwidth the throughput of a
//!   connection is therefore limited to `queue_limit / one_way_delay`.
//! - **Stall** ([`LinkEmulator::stall`]): nothing is delivered and no new byte
//!   enters the link; connections stay open and data waits (in the relay and
//!   in the kernel's socket buffers). Resuming delivers everything: bytes
//!   that were already on the wire arrive at once, the rest at the
//!   configured rate.
//! - **Cut** ([`LinkEmulator::cut`]): every relayed connection is reset (both
//!   sides see `ECONNRESET`), and connections made until
//!   [`LinkEmulator::restore`] are accepted and reset at once.
//! - **Half-close** propagates: end-of-stream one way is delivered (after the
//!   data before it) as end-of-stream to the other side, and the other
//!   direction keeps flowing. An error on either socket resets both sides.
//!
//! What it does not emulate: loss, reordering, duplication or jitter (the
//! link is a perfect FIFO), the handshake's round trip (a connection to the
//! relay completes at once, and the relay connects to the target at once),
//! or a shared bottleneck (every connection has its own link; nothing is
//! shared between them). Underneath it is TCP on loopback, so the kernel's
//! socket buffers add queueing the relay does not account for, and timing is
//! only as exact as tokio's millisecond timer: delivery is never early, and
//! may be a little late on a loaded machine.
//!
//! Dropping the [`LinkEmulator`] closes the listener and every relayed
//! connection, and ends all of its tasks.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{sleep, sleep_until, Instant};
use tracing::{debug, warn};

#[cfg(test)]
mod tests;

/// The most the relay reads from a socket at once.
const READ_CHUNK: usize = 64 * 1024;
/// The smallest piece a read is split into for pacing.
const MIN_PIECE: usize = 4 * 1024;
/// Pieces are sized to about this much serialization time (1/500 s).
const PIECES_PER_SEC: u64 = 500;
/// The default queue limit is twice the bandwidth-delay product, within these
/// bounds (and the lower bound when the bandwidth is unlimited).
const MIN_DEFAULT_QUEUE: u64 = 4 << 20;
const MAX_DEFAULT_QUEUE: u64 = 256 << 20;
/// How long the accept loop backs off after an accept error (such as
/// `EMFILE`), so that it does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(20);

/// One direction of a relayed connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From the connecting client to the target (client writes).
    ToTarget,
    /// From the target back to the client (target writes).
    ToClient,
}

/// How one direction of the link is shaped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirectionConfig {
    /// The propagation delay added to every byte.
    pub one_way_delay: Duration,
    /// The serialization rate; `None` is unlimited. `Some(0)` is taken as 1.
    pub bandwidth_bytes_per_sec: Option<u64>,
}

/// The shape of the emulated link. The default is a transparent relay (no
/// delay, unlimited bandwidth).
///
/// ```
/// # use std::time::Duration;
/// # use replication::linkemu::LinkConfig;
/// // 20 ms each way (40 ms RTT), 100 Mbit/s.
/// let cfg = LinkConfig::new(Duration::from_millis(20)).with_bandwidth(100_000_000 / 8);
/// assert_eq!(cfg.bandwidth_bytes_per_sec, Some(12_500_000));
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkConfig {
    /// The propagation delay each way (half the added round-trip time).
    pub one_way_delay: Duration,
    /// The rate each way; `None` is unlimited.
    pub bandwidth_bytes_per_sec: Option<u64>,
    /// Replaces the two fields above for the client-to-target direction.
    pub to_target: Option<DirectionConfig>,
    /// Replaces the two fields above for the target-to-client direction
    /// (an asymmetric link: for ferry, the origin's replies to the edge).
    pub to_client: Option<DirectionConfig>,
    /// The most bytes waiting in the relay per direction of a connection;
    /// `None` picks [`LinkConfig::queue_limit`]'s default.
    pub max_queue_bytes: Option<usize>,
}

impl LinkConfig {
    /// A symmetric link with this one-way delay and unlimited bandwidth.
    pub fn new(one_way_delay: Duration) -> Self {
        Self {
            one_way_delay,
            ..Self::default()
        }
    }

    /// The same link limited to `bytes_per_sec` each way.
    #[must_use]
    pub fn with_bandwidth(mut self, bytes_per_sec: u64) -> Self {
        self.bandwidth_bytes_per_sec = Some(bytes_per_sec);
        self
    }

    /// The shape of one direction, overrides applied.
    pub fn direction(&self, dir: Direction) -> DirectionConfig {
        let over = match dir {
            Direction::ToTarget => self.to_target,
            Direction::ToClient => self.to_client,
        };
        over.unwrap_or(DirectionConfig {
            one_way_delay: self.one_way_delay,
            bandwidth_bytes_per_sec: self.bandwidth_bytes_per_sec,
        })
    }

    /// The most bytes that wait in the relay for one direction of one
    /// connection: `max_queue_bytes` if set (at least 1), else twice the
    /// direction's bandwidth-delay product, clamped to 4 MiB..=256 MiB (4 MiB
    /// when the bandwidth is unlimited).
    pub fn queue_limit(&self, dir: Direction) -> usize {
        if let Some(limit) = self.max_queue_bytes {
            return limit.max(1);
        }
        let shape = self.direction(dir);
        let bytes = shape
            .bandwidth_bytes_per_sec
            .map_or(MIN_DEFAULT_QUEUE, |rate| {
                let bdp = u128::from(rate) * shape.one_way_delay.as_nanos() / 1_000_000_000;
                u64::try_from(bdp.saturating_mul(2))
                    .unwrap_or(u64::MAX)
                    .clamp(MIN_DEFAULT_QUEUE, MAX_DEFAULT_QUEUE)
            });
        usize::try_from(bytes).unwrap_or(usize::MAX)
    }
}

/// A snapshot of the emulator's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Bytes delivered to the target, all connections.
    pub bytes_to_target: u64,
    /// Bytes delivered to clients, all connections.
    pub bytes_to_client: u64,
    /// Bytes read but not yet delivered, both directions, all connections.
    pub bytes_queued: u64,
    /// Connections accepted while the link was up (relayed, or reset if the
    /// target could not be reached).
    pub connections_accepted: u64,
    /// Connections accepted during a cut and reset at once.
    pub connections_refused: u64,
    /// Relayed connections not closed yet.
    pub connections_open: u64,
}

/// A running link emulator. Dropping it closes the listener and every
/// relayed connection and ends its tasks.
#[derive(Debug)]
pub struct LinkEmulator {
    local_addr: SocketAddr,
    control: watch::Sender<Control>,
    counters: Arc<Counters>,
    accept_task: JoinHandle<()>,
}

impl LinkEmulator {
    /// Listens on `listen` (port 0 picks a free one) and relays every
    /// connection to `target` through a link shaped by `config`. Must be
    /// called within a tokio runtime, which runs the relay.
    pub async fn start(
        listen: SocketAddr,
        target: SocketAddr,
        config: LinkConfig,
    ) -> io::Result<LinkEmulator> {
        let listener = TcpListener::bind(listen).await?;
        let local_addr = listener.local_addr()?;
        let (control, ctl) = watch::channel(Control {
            config,
            stalled: false,
            cut: false,
            epoch: 0,
        });
        let counters = Arc::new(Counters::default());
        let accept_task = tokio::spawn(accept_loop(listener, target, ctl, Arc::clone(&counters)));
        Ok(LinkEmulator {
            local_addr,
            control,
            counters,
            accept_task,
        })
    }

    /// The address the relay listens on: connect here to reach the target.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The current shape.
    pub fn config(&self) -> LinkConfig {
        self.control.borrow().config
    }

    /// Reshapes the link for data read from now on: bytes already read keep
    /// the timing they were given (and stay ahead of later bytes); a new
    /// queue limit applies from each direction's next read.
    pub fn set_config(&self, config: LinkConfig) {
        self.control.send_modify(|c| c.config = config);
    }

    /// Resets every relayed connection (both sides) and resets new ones as
    /// soon as they are accepted, until [`restore`](Self::restore).
    pub fn cut(&self) {
        self.control.send_modify(|c| {
            c.cut = true;
            c.epoch += 1;
        });
    }

    /// Ends a [`cut`](Self::cut): new connections are relayed again.
    pub fn restore(&self) {
        self.control
            .send_if_modified(|c| std::mem::replace(&mut c.cut, false));
    }

    /// Stops (`true`) or resumes (`false`) the flow of bytes in both
    /// directions of every connection; connections stay open.
    pub fn stall(&self, stalled: bool) {
        self.control
            .send_if_modified(|c| std::mem::replace(&mut c.stalled, stalled) != stalled);
    }

    /// The counters so far.
    pub fn stats(&self) -> LinkStats {
        let c = &self.counters;
        LinkStats {
            bytes_to_target: c.to_target.load(Ordering::Relaxed),
            bytes_to_client: c.to_client.load(Ordering::Relaxed),
            bytes_queued: c.queued.load(Ordering::Relaxed),
            connections_accepted: c.accepted.load(Ordering::Relaxed),
            connections_refused: c.refused.load(Ordering::Relaxed),
            connections_open: c.open.load(Ordering::Relaxed),
        }
    }
}

impl Drop for LinkEmulator {
    fn drop(&mut self) {
        // The accept task owns the listener and the connection tasks (in a
        // JoinSet, which aborts them when dropped); dropping the control
        // sender also tells every task to stop.
        self.accept_task.abort();
    }
}

/// What the handle tells the tasks.
#[derive(Clone, Copy, Debug)]
struct Control {
    config: LinkConfig,
    stalled: bool,
    cut: bool,
    /// Bumped by every cut: a connection accepted in an earlier epoch is cut.
    epoch: u64,
}

#[derive(Debug, Default)]
struct Counters {
    to_target: AtomicU64,
    to_client: AtomicU64,
    queued: AtomicU64,
    accepted: AtomicU64,
    refused: AtomicU64,
    open: AtomicU64,
}

fn count(counter: &AtomicU64, n: usize) {
    counter.fetch_add(u64::try_from(n).unwrap_or(u64::MAX), Ordering::Relaxed);
}

fn uncount(counter: &AtomicU64, n: usize) {
    counter.fetch_sub(u64::try_from(n).unwrap_or(u64::MAX), Ordering::Relaxed);
}

/// Counts a relayed connection as open for as long as it lives (its task
/// may be aborted, so this is a drop guard).
#[derive(Debug)]
struct OpenConnection(Arc<Counters>);

impl OpenConnection {
    fn new(counters: &Arc<Counters>) -> Self {
        counters.accepted.fetch_add(1, Ordering::Relaxed);
        counters.open.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(counters))
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

fn stopped() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, "link emulator stopped")
}

fn link_cut() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, "link cut")
}

/// Closes a socket with a reset rather than a FIN.
fn reset(stream: TcpStream) {
    // Best effort: if it fails, the socket still closes (gracefully).
    let _ = stream.set_zero_linger();
    drop(stream);
}

async fn accept_loop(
    listener: TcpListener,
    target: SocketAddr,
    mut ctl: watch::Receiver<Control>,
    counters: Arc<Counters>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((client, peer)) => {
                    let (cut, epoch) = {
                        let c = ctl.borrow();
                        (c.cut, c.epoch)
                    };
                    if cut {
                        debug!(%peer, "linkemu: link is cut, resetting a new connection");
                        counters.refused.fetch_add(1, Ordering::Relaxed);
                        reset(client);
                        continue;
                    }
                    let open = OpenConnection::new(&counters);
                    connections.spawn(serve(client, target, ctl.clone(), epoch, open));
                }
                Err(e) => {
                    warn!(error = %e, "linkemu: accept failed");
                    sleep(ACCEPT_BACKOFF).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            changed = ctl.changed() => {
                if changed.is_err() {
                    // The handle is gone.
                    return;
                }
            }
        }
    }
}

async fn serve(
    mut client: TcpStream,
    target: SocketAddr,
    ctl: watch::Receiver<Control>,
    epoch: u64,
    open: OpenConnection,
) {
    let counters = Arc::clone(&open.0);
    let mut cut_rx = ctl.clone();
    let cut = async move {
        // A closed channel (the handle dropped) ends the connection too.
        let _ = cut_rx.wait_for(|c| c.cut || c.epoch != epoch).await;
    };
    tokio::pin!(cut);

    let connected = tokio::select! {
        connected = TcpStream::connect(target) => connected,
        () = &mut cut => Err(link_cut()),
    };
    let mut server = match connected {
        Ok(server) => server,
        Err(e) => {
            debug!(%target, error = %e, "linkemu: cannot reach the target");
            reset(client);
            return;
        }
    };
    // The relay's own writes must not wait for Nagle: the pacing is ours.
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);

    let relayed = tokio::select! {
        relayed = relay(&mut client, &mut server, &ctl, &counters) => relayed,
        () = &mut cut => Err(link_cut()),
    };
    match relayed {
        // Both directions ended with end-of-stream, already passed on.
        Ok(()) => {}
        Err(e) => {
            debug!(%target, error = %e, "linkemu: connection reset");
            reset(client);
            reset(server);
        }
    }
    drop(open);
}

/// Relays both directions until both have ended; the first error ends both.
async fn relay(
    client: &mut TcpStream,
    server: &mut TcpStream,
    ctl: &watch::Receiver<Control>,
    counters: &Arc<Counters>,
) -> io::Result<()> {
    let (client_read, client_write) = client.split();
    let (server_read, server_write) = server.split();
    tokio::try_join!(
        relay_direction(
            client_read,
            server_write,
            Direction::ToTarget,
            ctl,
            counters
        ),
        relay_direction(
            server_read,
            client_write,
            Direction::ToClient,
            ctl,
            counters
        ),
    )?;
    Ok(())
}

async fn relay_direction<R, W>(
    src: R,
    dst: W,
    dir: Direction,
    ctl: &watch::Receiver<Control>,
    counters: &Arc<Counters>,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let pipe = Pipe::new(Arc::clone(counters));
    tokio::try_join!(
        pump_in(src, &pipe, dir, ctl.clone()),
        pump_out(dst, &pipe, dir, ctl.clone(), counters),
    )?;
    Ok(())
}

/// Reads the source, schedules each piece's delivery and queues it, as long
/// as the queue has room.
async fn pump_in<R: AsyncRead + Unpin>(
    mut src: R,
    pipe: &Pipe,
    dir: Direction,
    mut ctl: watch::Receiver<Control>,
) -> io::Result<()> {
    let mut pacer = Pacer::default();
    let mut buf = vec![0; READ_CHUNK];
    loop {
        let limit = ctl.borrow().config.queue_limit(dir);
        let room = pipe.room(limit).await.min(READ_CHUNK);
        let n = src.read(&mut buf[..room]).await?;
        if n == 0 {
            pipe.finish();
            return Ok(());
        }
        // Copied out at its size: a small read must not pin a whole chunk's
        // allocation while it waits (the limit counts bytes, not buffers).
        let mut data = Bytes::copy_from_slice(&buf[..n]);
        // A stalled link takes nothing new onto the wire: hold this chunk
        // (and so stop reading) until it resumes.
        ctl.wait_for(|c| !c.stalled).await.map_err(|_| stopped())?;
        let now = Instant::now();
        let shape = ctl.borrow().config.direction(dir);
        let piece = piece_len(shape.bandwidth_bytes_per_sec);
        let mut pieces = Vec::with_capacity(n.div_ceil(piece));
        while !data.is_empty() {
            let data = data.split_to(piece.min(data.len()));
            let deliver_at = pacer.schedule(now, data.len(), shape);
            pieces.push(Segment { deliver_at, data });
        }
        pipe.push(pieces, n);
    }
}

/// Writes each queued piece to the destination once it is due (and the link
/// is not stalled); passes end-of-stream on once the queue is drained.
async fn pump_out<W: AsyncWrite + Unpin>(
    mut dst: W,
    pipe: &Pipe,
    dir: Direction,
    mut ctl: watch::Receiver<Control>,
    counters: &Counters,
) -> io::Result<()> {
    let delivered = match dir {
        Direction::ToTarget => &counters.to_target,
        Direction::ToClient => &counters.to_client,
    };
    while let Some(segment) = pipe.next().await {
        wait_until_due(segment.deliver_at, &mut ctl).await?;
        dst.write_all(&segment.data).await?;
        count(delivered, segment.data.len());
        pipe.delivered(segment.data.len());
    }
    dst.shutdown().await
}

/// Waits until `at` with the link not stalled.
async fn wait_until_due(at: Instant, ctl: &mut watch::Receiver<Control>) -> io::Result<()> {
    loop {
        if ctl.borrow_and_update().stalled {
            ctl.changed().await.map_err(|_| stopped())?;
            continue;
        }
        if Instant::now() >= at {
            return Ok(());
        }
        tokio::select! {
            () = sleep_until(at) => {}
            changed = ctl.changed() => changed.map_err(|_| stopped())?,
        }
    }
}

/// The size pieces are cut to for pacing at `rate`: about 2 ms of
/// serialization, within 4-64 KiB; unlimited bandwidth needs no cutting.
fn piece_len(rate: Option<u64>) -> usize {
    rate.map_or(READ_CHUNK, |rate| {
        usize::try_from(rate / PIECES_PER_SEC)
            .unwrap_or(READ_CHUNK)
            .clamp(MIN_PIECE, READ_CHUNK)
    })
}

/// The virtual serializer of one direction.
#[derive(Debug, Default)]
struct Pacer {
    /// When the last scheduled byte finished departing.
    next_free: Option<Instant>,
}

impl Pacer {
    /// Schedules `len` bytes read at `now`: they depart after the bytes
    /// before them, taking `len / rate` to serialize, and are delivered
    /// `one_way_delay` later. Returns the delivery time.
    fn schedule(&mut self, now: Instant, len: usize, shape: DirectionConfig) -> Instant {
        let start = self.next_free.map_or(now, |free| free.max(now));
        let departed = later(
            start,
            serialization_time(len, shape.bandwidth_bytes_per_sec),
        );
        self.next_free = Some(departed);
        later(departed, shape.one_way_delay)
    }
}

/// How long `len` bytes take at `rate`, rounded up to the nanosecond so the
/// rate is never exceeded.
fn serialization_time(len: usize, rate: Option<u64>) -> Duration {
    let Some(rate) = rate else {
        return Duration::ZERO;
    };
    let rate = u128::from(rate.max(1));
    let len = u128::try_from(len).unwrap_or(u128::MAX);
    let nanos = (len * 1_000_000_000).div_ceil(rate);
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

/// `at + d`, saturating far in the future instead of panicking.
fn later(at: Instant, d: Duration) -> Instant {
    at.checked_add(d)
        .or_else(|| at.checked_add(Duration::from_secs(100 * 365 * 86_400)))
        .unwrap_or(at)
}

#[derive(Debug)]
struct Segment {
    deliver_at: Instant,
    data: Bytes,
}

/// The queue between a direction's reader and writer. Both run in the same
/// task; each waits on its own `Notify` (a stored permit covers a
/// notification that comes while it is not waiting).
#[derive(Debug)]
struct Pipe {
    state: Mutex<PipeState>,
    /// Signalled when a piece is queued or the source ended.
    data: Notify,
    /// Signalled when a piece was delivered.
    room: Notify,
    counters: Arc<Counters>,
}

#[derive(Debug, Default)]
struct PipeState {
    segments: VecDeque<Segment>,
    /// Bytes queued or being written.
    queued: usize,
    /// The source reached end-of-stream.
    finished: bool,
}

impl Pipe {
    fn new(counters: Arc<Counters>) -> Self {
        Self {
            state: Mutex::default(),
            data: Notify::new(),
            room: Notify::new(),
            counters,
        }
    }

    fn lock(&self) -> MutexGuard<'_, PipeState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until fewer than `limit` bytes are queued; returns the room.
    async fn room(&self, limit: usize) -> usize {
        loop {
            let queued = self.lock().queued;
            if queued < limit {
                return limit - queued;
            }
            self.room.notified().await;
        }
    }

    fn push(&self, segments: Vec<Segment>, len: usize) {
        {
            let mut state = self.lock();
            state.queued += len;
            state.segments.extend(segments);
        }
        count(&self.counters.queued, len);
        self.data.notify_one();
    }

    fn finish(&self) {
        self.lock().finished = true;
        self.data.notify_one();
    }

    /// The next piece to deliver, or `None` once the source has ended and
    /// everything before has been taken.
    async fn next(&self) -> Option<Segment> {
        loop {
            {
                let mut state = self.lock();
                if let Some(segment) = state.segments.pop_front() {
                    return Some(segment);
                }
                if state.finished {
                    return None;
                }
            }
            self.data.notified().await;
        }
    }

    fn delivered(&self, len: usize) {
        self.lock().queued -= len;
        uncount(&self.counters.queued, len);
        self.room.notify_one();
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        // Bytes still queued when a connection is reset are gone.
        let queued = self.lock().queued;
        uncount(&self.counters.queued, queued);
    }
}

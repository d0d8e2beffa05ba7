//! The edge's side of the link: a [`LinkClient`] that stays attached to one
//! volume across link failures, and [`RemoteDevice`], the volume as a
//! read-only `blockcore` device.
//!
//! ```text
//!   RemoteDevice::read ──> LinkClient::request ──> pending[id] ──> link
//!                                 │  waits up to request_timeout,
//!                                 │  across reconnections
//!   supervisor task: connect, handshake, Attach ─┐
//!     link down (EOF, error, heartbeats missed)  │ back-off 100 ms .. 5 s
//!     └──> reconnect, re-attach, resend pending ─┘
//!   Push frames ──> PushReceiver (optional data; dropped when full)
//! ```
//!
//! Requests are idempotent (reads) or carry a sequence number the origin
//! applies once (write batches), so resending everything pending after a
//! reconnection is safe; a batch the origin already applied is answered
//! from `Attached::next_seq` without resending.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use blockcore::{
    check_range, BlockDevice, BlockError, BlockSizes, Capabilities, DeviceInfo, Op, WriteFlags,
    ZeroFlags,
};
use bytes::{Bytes, BytesMut};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use zeroize::Zeroizing;

use crate::link::{self, LinkError, LinkSender};

#[cfg(feature = "edge")]
mod device;
use crate::proto::{Class, ErrorCode, Message, Role, SchedulerConfig, WriteEntry, MAX_DATA_LEN};
#[cfg(feature = "edge")]
pub use device::{cache_volume_name, EdgeConfig, EdgeDevice, EdgeStatus};

/// How the edge reaches and uses its origin.
#[derive(Clone, Debug)]
pub struct EdgeLinkConfig {
    /// The origin's address, `HOST:PORT`.
    pub origin: String,
    pub volume: String,
    /// Identifies this edge to the origin (the volume's exclusive holder).
    pub edge_id: String,
    pub psk: Option<[u8; 32]>,
    /// How long a read waits for the origin (across reconnections) before
    /// it fails with EIO.
    pub request_timeout: Duration,
    /// Heartbeat interval; the link is declared dead after three
    /// intervals without any frame from the origin.
    pub heartbeat: Duration,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    pub scheduler: SchedulerConfig,
    /// Background credit granted to the origin (pushes in flight).
    pub window: u64,
    /// TLS to the origin: the client configuration and the name the
    /// origin's certificate must carry. `None`: plaintext.
    pub tls: Option<(
        Arc<rustls::ClientConfig>,
        rustls::pki_types::ServerName<'static>,
    )>,
}

impl EdgeLinkConfig {
    pub fn new(origin: impl Into<String>, volume: impl Into<String>) -> Self {
        Self {
            origin: origin.into(),
            volume: volume.into(),
            edge_id: format!("edge-{:016x}", u64::from_be_bytes(link::random())),
            psk: None,
            request_timeout: Duration::from_secs(30),
            heartbeat: Duration::from_secs(2),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            scheduler: SchedulerConfig::default(),
            window: 8 << 20,
            tls: None,
        }
    }
}

/// What the origin said at attach.
#[derive(Clone)]
pub struct Attachment {
    pub size: u64,
    pub chunk_size: u32,
    pub group_size: u32,
    /// This edge's cache master key (the cache derives its encryption key
    /// from it) and the deployment's dedup key.
    pub cache_key: Zeroizing<[u8; 32]>,
    pub dedup_key: Zeroizing<[u8; 32]>,
    pub volume_epoch: u64,
    pub next_seq: u64,
}

impl fmt::Debug for Attachment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Attachment")
            .field("size", &self.size)
            .field("chunk_size", &self.chunk_size)
            .field("group_size", &self.group_size)
            .field("volume_epoch", &self.volume_epoch)
            .field("next_seq", &self.next_seq)
            .finish_non_exhaustive()
    }
}

/// Data the origin sent without being asked for it (group push, prefetch).
#[derive(Debug)]
pub struct Push {
    /// The request that caused it (a prefetch's id), or 0 for group pushes.
    pub id: u64,
    pub offset: u64,
    pub data: Bytes,
}

/// Link state and counters, for status displays.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkStatus {
    pub connected: bool,
    /// How many times the link was (re)established.
    pub connects: u64,
    pub bytes_read: u64,
    pub bytes_pushed: u64,
    pub pending: usize,
    /// Chunks the origin named by signature that the cache held (served
    /// without crossing the link), and those it no longer held (fetched).
    pub signature_hits: u64,
    pub signature_misses: u64,
}

struct Pending {
    msg: Message,
    class: Class,
    reply: oneshot::Sender<Message>,
}

struct Inner {
    cfg: EdgeLinkConfig,
    /// The current link, if connected.
    link: Mutex<Option<LinkSender>>,
    pending: Mutex<HashMap<u64, Pending>>,
    next_id: AtomicU64,
    connects: AtomicU64,
    bytes_read: AtomicU64,
    bytes_pushed: AtomicU64,
    signature_hits: AtomicU64,
    signature_misses: AtomicU64,
    /// The origin's next expected batch after the latest attach.
    next_seq: watch::Sender<u64>,
    /// For each group read recently: the newest batch queued before the
    /// oldest of those reads (see [`LinkClient::push_predates`]).
    groups: Mutex<GroupLog>,
    /// The newest batch queued on the link.
    queued_batch: AtomicU64,
}

/// Groups with demand reads in flight or recently sent, bounded.
#[derive(Default)]
struct GroupLog {
    map: HashMap<u64, u64>,
    order: std::collections::VecDeque<u64>,
}

impl GroupLog {
    const MAX: usize = 4096;

    fn record(&mut self, group: u64, batch: u64) {
        if let Some(b) = self.map.get_mut(&group) {
            *b = (*b).min(batch);
            return;
        }
        self.map.insert(group, batch);
        self.order.push_back(group);
        if self.order.len() > Self::MAX {
            if let Some(old) = self.order.pop_front() {
                self.map.remove(&old);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A client attached to one volume of an origin. Cheap to clone.
#[derive(Clone)]
pub struct LinkClient {
    inner: Arc<Inner>,
    attachment: Attachment,
}

impl fmt::Debug for LinkClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LinkClient")
            .field("origin", &self.inner.cfg.origin)
            .field("volume", &self.inner.cfg.volume)
            .finish_non_exhaustive()
    }
}

/// Receives [`Push`]es.
pub type PushReceiver = mpsc::Receiver<Push>;

async fn connect_once(
    cfg: &EdgeLinkConfig,
    resume_seq: u64,
) -> Result<(LinkSender, link::LinkReceiver, Attachment), LinkError> {
    let stream = tokio::time::timeout(link::HANDSHAKE_TIMEOUT, TcpStream::connect(&cfg.origin))
        .await
        .map_err(|_| LinkError::Timeout(link::HANDSHAKE_TIMEOUT))??;
    let _ = stream.set_nodelay(true);
    let (tx, mut rx) = match &cfg.tls {
        Some((config, name)) => {
            let connector = tokio_rustls::TlsConnector::from(config.clone());
            let tls = tokio::time::timeout(
                link::HANDSHAKE_TIMEOUT,
                connector.connect(name.clone(), stream),
            )
            .await
            .map_err(|_| LinkError::Timeout(link::HANDSHAKE_TIMEOUT))?
            .map_err(|e| LinkError::Handshake(format!("TLS: {e}")))?;
            link::spawn(tls, cfg.scheduler, cfg.window)
        }
        None => link::spawn(stream, cfg.scheduler, cfg.window),
    };
    let attach = async {
        link::handshake(&tx, &mut rx, Role::Edge, cfg.psk.as_ref()).await?;
        tx.send(
            1,
            Class::Demand,
            Message::Attach {
                volume: cfg.volume.clone(),
                edge_id: cfg.edge_id.clone(),
                resume_seq,
            },
        )?;
        match rx.recv().await.ok_or(LinkError::Closed)?.msg {
            Message::Attached {
                size,
                chunk_size,
                group_size,
                cache_key,
                dedup_key,
                volume_epoch,
                next_seq,
            } => Ok(Attachment {
                size,
                chunk_size,
                group_size,
                cache_key: Zeroizing::new(cache_key),
                dedup_key: Zeroizing::new(dedup_key),
                volume_epoch,
                next_seq,
            }),
            Message::Error { code, message } => Err(LinkError::Refused { code, message }),
            other => Err(LinkError::Handshake(format!(
                "expected Attached, got {:?}",
                other.kind()
            ))),
        }
    };
    match tokio::time::timeout(link::HANDSHAKE_TIMEOUT, attach).await {
        Ok(Ok(a)) => Ok((tx, rx, a)),
        Ok(Err(e)) => {
            tx.close();
            Err(e)
        }
        Err(_) => {
            tx.close();
            Err(LinkError::Timeout(link::HANDSHAKE_TIMEOUT))
        }
    }
}

impl LinkClient {
    /// Connects and attaches; the first attach must succeed. Afterwards the
    /// client reconnects by itself whenever the link fails.
    pub async fn connect(cfg: EdgeLinkConfig) -> Result<(LinkClient, PushReceiver), LinkError> {
        let (tx, rx, attachment) = connect_once(&cfg, 0).await?;
        let (push_tx, push_rx) = mpsc::channel(256);
        let (next_seq, _) = watch::channel(attachment.next_seq);
        let inner = Arc::new(Inner {
            cfg,
            link: Mutex::new(Some(tx.clone())),
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(2),
            connects: AtomicU64::new(1),
            bytes_read: AtomicU64::new(0),
            signature_hits: AtomicU64::new(0),
            signature_misses: AtomicU64::new(0),
            bytes_pushed: AtomicU64::new(0),
            next_seq,
            groups: Mutex::new(GroupLog::default()),
            queued_batch: AtomicU64::new(attachment.next_seq.saturating_sub(1)),
        });
        tokio::spawn(supervise(Arc::downgrade(&inner), tx, rx, push_tx));
        Ok((LinkClient { inner, attachment }, push_rx))
    }

    /// What the origin said at the first attach.
    pub fn attachment(&self) -> &Attachment {
        &self.attachment
    }

    /// Link state and counters.
    pub fn status(&self) -> LinkStatus {
        LinkStatus {
            connected: lock(&self.inner.link).is_some(),
            connects: self.inner.connects.load(Ordering::Relaxed),
            bytes_read: self.inner.bytes_read.load(Ordering::Relaxed),
            bytes_pushed: self.inner.bytes_pushed.load(Ordering::Relaxed),
            pending: lock(&self.inner.pending).len(),
            signature_hits: self.inner.signature_hits.load(Ordering::Relaxed),
            signature_misses: self.inner.signature_misses.load(Ordering::Relaxed),
        }
    }

    /// Sends `msg` and waits for the reply with its id, across
    /// reconnections, for at most `timeout` (`None`: forever).
    async fn request(
        &self,
        class: Class,
        msg: Message,
        timeout: Option<Duration>,
    ) -> Result<(u64, Message), LinkError> {
        let (reply_tx, reply_rx) = oneshot::channel();
        let id = {
            // Ids are taken under the pending lock, so sending in id order
            // (as reconnection does) is the order requests were made in,
            // and the batch/read bookkeeping below matches it.
            let mut pending = lock(&self.inner.pending);
            let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
            match &msg {
                Message::WriteBatch { seq, .. } => {
                    self.inner.queued_batch.fetch_max(*seq, Ordering::AcqRel);
                }
                Message::Read { offset, len, .. } => self.record_groups(&[(*offset, *len)]),
                Message::Prefetch { ranges } => self.record_groups(ranges),
                _ => {}
            }
            pending.insert(
                id,
                Pending {
                    msg: msg.clone(),
                    class,
                    reply: reply_tx,
                },
            );
            id
        };
        if let Some(tx) = lock(&self.inner.link).clone() {
            // If the link just died, the supervisor resends it.
            let _ = tx.send(id, class, msg);
        }
        let wait = async { reply_rx.await.map_err(|_| LinkError::Closed) };
        let result = match timeout {
            Some(t) => tokio::time::timeout(t, wait)
                .await
                .unwrap_or(Err(LinkError::Timeout(t))),
            None => wait.await,
        };
        if result.is_err() {
            lock(&self.inner.pending).remove(&id);
        }
        result.map(|m| (id, m))
    }

    /// Reads `[offset, offset + len)` from the origin (`len` up to 16 MiB).
    pub async fn read(&self, offset: u64, len: u32) -> Result<Bytes, LinkError> {
        match self.read_as(offset, len, false).await? {
            ReadReply::Data(data) => Ok(data),
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
        let (_, reply) = self
            .request(
                Class::Demand,
                Message::Read {
                    offset,
                    len,
                    want_signatures,
                },
                Some(self.inner.cfg.request_timeout),
            )
            .await?;
        match reply {
            Message::ReadData { data, .. } if data.len() == len as usize => {
                self.inner
                    .bytes_read
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                Ok(ReadReply::Data(data))
            }
            Message::ReadData { data, .. } => Err(LinkError::Unexpected(format!(
                "asked for {len} bytes at {offset}, the origin sent {}",
                data.len()
            ))),
            Message::ReadSignatures {
                offset: at,
                chunk_size,
                sigs,
            } if at == offset
                && chunk_size > 0
                && u64::from(chunk_size) * sigs.len() as u64 == u64::from(len) =>
            {
                Ok(ReadReply::Signatures { chunk_size, sigs })
            }
            Message::Error { code, message } => Err(LinkError::Refused { code, message }),
            other => Err(LinkError::Unexpected(format!(
                "unexpected reply {:?} to a read of {len} bytes at {offset}",
                other.kind()
            ))),
        }
    }

    fn record_groups(&self, ranges: &[(u64, u32)]) {
        let group = u64::from(self.attachment.group_size.max(1));
        let queued = self.inner.queued_batch.load(Ordering::Acquire);
        let mut log = lock(&self.inner.groups);
        for &(offset, len) in ranges {
            let last = (offset + u64::from(len)).saturating_sub(1);
            for g in offset / group..=last / group {
                log.record(g, queued);
            }
        }
    }

    /// Whether pushed data at `offset` may predate a batch the edge already
    /// treats as applied (`acked`, the newest acknowledged batch): the
    /// origin reads a group's data after the demand read that caused the
    /// push, and handles frames in order, so the data includes every batch
    /// queued before the oldest such read. If a newer batch was
    /// acknowledged, the data may be older than it: drop it. Unknown
    /// groups count as stale.
    pub fn push_predates(&self, offset: u64, acked: u64) -> bool {
        let group = u64::from(self.attachment.group_size.max(1));
        match lock(&self.inner.groups).map.get(&(offset / group)) {
            Some(&queued_before) => acked > queued_before,
            None => true,
        }
    }

    /// Asks the origin to stream `ranges` as pushes; returns when it has
    /// sent them all (they may still be in the push channel).
    pub async fn prefetch(&self, ranges: Vec<(u64, u32)>) -> Result<(), LinkError> {
        let (_, reply) = self
            .request(Class::Demand, Message::Prefetch { ranges }, None)
            .await?;
        match reply {
            Message::PrefetchDone => Ok(()),
            Message::Error { code, message } => Err(LinkError::Refused { code, message }),
            other => Err(LinkError::Unexpected(format!(
                "unexpected reply {:?} to a prefetch",
                other.kind()
            ))),
        }
    }

    /// Ships write batch `seq` and waits until the origin has durably
    /// applied it (or had applied it before), however many reconnections
    /// that takes.
    pub async fn ship_batch(&self, seq: u64, entries: Vec<WriteEntry>) -> Result<(), LinkError> {
        let mut applied = self.inner.next_seq.subscribe();
        if *applied.borrow() > seq {
            return Ok(());
        }
        let request = self.request(
            Class::Demand,
            Message::WriteBatch {
                seq,
                part: 0,
                last: true,
                entries,
            },
            None,
        );
        // A reconnection's Attached may report the batch applied before its
        // ack came back: that also settles it.
        let already = async {
            loop {
                if *applied.borrow_and_update() > seq {
                    return;
                }
                if applied.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::select! {
            reply = request => match reply?.1 {
                Message::BatchAck { seq: s } if s == seq => Ok(()),
                Message::Error { code, message } => Err(LinkError::Refused { code, message }),
                other => Err(LinkError::Unexpected(format!(
                    "unexpected reply {:?} to batch {seq}",
                    other.kind()
                ))),
            },
            () = already => Ok(()),
        }
    }
}

/// Owns the link: dispatches replies, sends heartbeats, reconnects. Ends
/// when every `LinkClient` is gone.
async fn supervise(
    inner: std::sync::Weak<Inner>,
    mut tx: LinkSender,
    mut rx: link::LinkReceiver,
    pushes: mpsc::Sender<Push>,
) {
    loop {
        let Some(this) = inner.upgrade() else {
            tx.close();
            return;
        };
        let heartbeat = this.cfg.heartbeat;
        drop(this);
        // Serve this link until it fails.
        let mut last_heard = Instant::now();
        let mut ticker = tokio::time::interval(heartbeat);
        loop {
            tokio::select! {
                inc = rx.recv() => {
                    let Some(inc) = inc else { break };
                    last_heard = Instant::now();
                    let Some(this) = inner.upgrade() else { tx.close(); return };
                    match inc.msg {
                        Message::Push { offset, data } => {
                            this.bytes_pushed.fetch_add(data.len() as u64, Ordering::Relaxed);
                            let _ = pushes.try_send(Push { id: inc.header.id, offset, data });
                        }
                        Message::HeartbeatAck { .. } => {}
                        msg => {
                            let waiter = lock(&this.pending).remove(&inc.header.id);
                            if let Some(p) = waiter {
                                let _ = p.reply.send(msg);
                            } else {
                                tracing::debug!(id = inc.header.id, kind = ?msg.kind(), "reply to no pending request");
                            }
                        }
                    }
                }
                _ = ticker.tick() => {
                    if last_heard.elapsed() > heartbeat * 3 {
                        tracing::warn!("origin silent for {:?}: reconnecting", last_heard.elapsed());
                        break;
                    }
                    let nanos = u64::try_from(last_heard.elapsed().as_nanos()).unwrap_or(u64::MAX);
                    let _ = tx.send(0, Class::Demand, Message::Heartbeat { nanos });
                }
            }
        }
        tx.close();
        {
            let Some(this) = inner.upgrade() else { return };
            *lock(&this.link) = None;
            tracing::warn!(origin = %this.cfg.origin, "link to the origin lost; reconnecting");
        }
        // Reconnect with back-off.
        let mut delay = None::<Duration>;
        loop {
            let Some(this) = inner.upgrade() else { return };
            let cfg = this.cfg.clone();
            let resume = *this.next_seq.borrow();
            drop(this);
            if let Some(d) = delay {
                tokio::time::sleep(d).await;
            }
            match connect_once(&cfg, resume).await {
                Ok((new_tx, new_rx, attachment)) => {
                    let Some(this) = inner.upgrade() else {
                        new_tx.close();
                        return;
                    };
                    this.connects.fetch_add(1, Ordering::Relaxed);
                    this.next_seq.send_replace(attachment.next_seq);
                    // Resend everything still waiting, in id order.
                    let mut ids: Vec<u64> = lock(&this.pending).keys().copied().collect();
                    ids.sort_unstable();
                    {
                        let pending = lock(&this.pending);
                        for id in ids {
                            if let Some(p) = pending.get(&id) {
                                let _ = new_tx.send(id, p.class, p.msg.clone());
                            }
                        }
                    }
                    *lock(&this.link) = Some(new_tx.clone());
                    tracing::info!(origin = %cfg.origin, next_seq = attachment.next_seq, "link to the origin re-established");
                    tx = new_tx;
                    rx = new_rx;
                    break;
                }
                Err(e) => {
                    let next = delay.map_or(cfg.reconnect_min, |d| (d * 2).min(cfg.reconnect_max));
                    tracing::debug!(error = %e, retry_in = ?next, "reconnect failed");
                    if matches!(
                        e,
                        LinkError::Refused {
                            code: ErrorCode::AuthFailed | ErrorCode::NoSuchVolume,
                            ..
                        }
                    ) {
                        tracing::error!(error = %e, "the origin refuses this edge");
                    }
                    delay = Some(next);
                }
            }
        }
    }
}

/// The answer to [`LinkClient::read_signed`].
#[derive(Debug)]
pub enum ReadReply {
    Data(Bytes),
    /// One signature per `chunk_size` bytes of the read, in order.
    Signatures {
        chunk_size: u32,
        sigs: Vec<[u8; 32]>,
    },
}

/// Where the edge looks up content by signature (its cache).
pub trait SignatureStore: Send + Sync {
    /// The plaintext stored under `sig`, if held and intact.
    fn get(&self, sig: &[u8; 32]) -> Option<Bytes>;
}

/// The remote volume as a read-only block device: every read goes to the
/// origin. Meant to sit under a [`cache::CachedDevice`]-style layer.
#[derive(Clone, Debug)]
pub struct RemoteDevice {
    client: LinkClient,
    size: u64,
    /// With a store, reads accept signature replies.
    signatures: Option<Arc<dyn SignatureStore>>,
}

impl fmt::Debug for dyn SignatureStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SignatureStore")
    }
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
            ReadReply::Data(data) => return Ok(data),
            ReadReply::Signatures { chunk_size, sigs } => (chunk_size, sigs),
        };
        let store = store.clone();
        let n = sigs.len() as u64;
        // Cache lookups read and decrypt from disk: off the async threads.
        let found = tokio::task::spawn_blocking(move || {
            let mut out = BytesMut::with_capacity(chunk_size as usize * sigs.len());
            for sig in &sigs {
                match store.get(sig) {
                    Some(d) if d.len() == chunk_size as usize => out.extend_from_slice(&d),
                    _ => return None,
                }
            }
            Some(out.freeze())
        })
        .await
        .unwrap_or(None);
        let inner = &self.client.inner;
        if let Some(data) = found {
            inner.signature_hits.fetch_add(n, Ordering::Relaxed);
            Ok(data)
        } else {
            // Evicted since the origin sent it: one more round trip.
            inner.signature_misses.fetch_add(n, Ordering::Relaxed);
            self.client.read(offset, len).await
        }
    }

    pub fn client(&self) -> &LinkClient {
        &self.client
    }
}

fn link_error(op: Op, offset: u64, e: LinkError) -> BlockError {
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
        other => BlockError::Io {
            op,
            offset,
            source: std::io::Error::other(format!("origin: {other}")),
        },
    }
}

#[async_trait]
impl BlockDevice for RemoteDevice {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            size: self.size,
            block_sizes: BlockSizes::DEFAULT,
            caps: Capabilities {
                read_only: false,
                flush: false,
                fua: false,
                trim: false,
                write_zeroes: false,
                fast_zero: false,
                extents: false,
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
                .map_err(|e| link_error(Op::Read, offset, e));
        }
        // Larger than one message: in pieces, concurrently.
        let pieces: Vec<_> = (0..len)
            .step_by(MAX_DATA_LEN)
            .map(|s| {
                let n = (len - s).min(MAX_DATA_LEN);
                let off = offset + s as u64;
                let client = self.client.clone();
                async move {
                    client
                        .read(off, u32::try_from(n).expect("at most 16 MiB"))
                        .await
                        .map_err(|e| link_error(Op::Read, off, e))
                }
            })
            .collect();
        let parts = futures_join(pieces).await?;
        let mut out = BytesMut::with_capacity(len);
        for p in parts {
            out.extend_from_slice(&p);
        }
        Ok(out.freeze())
    }

    async fn write(&self, offset: u64, _data: Bytes, _flags: WriteFlags) -> blockcore::Result<()> {
        let _ = offset;
        Err(BlockError::Unsupported { op: Op::Write })
    }

    async fn flush(&self) -> blockcore::Result<()> {
        Ok(())
    }

    async fn trim(&self, _offset: u64, _len: u64, _flags: WriteFlags) -> blockcore::Result<()> {
        Err(BlockError::Unsupported { op: Op::Trim })
    }

    async fn write_zeroes(
        &self,
        _offset: u64,
        _len: u64,
        _flags: ZeroFlags,
    ) -> blockcore::Result<()> {
        Err(BlockError::Unsupported {
            op: Op::WriteZeroes,
        })
    }

    async fn prefetch(&self, offset: u64, len: u64) -> blockcore::Result<()> {
        check_range(&self.info(), Op::Prefetch, offset, len)?;
        let ranges = (offset..offset + len)
            .step_by(MAX_DATA_LEN)
            .map(|s| {
                (
                    s,
                    u32::try_from((offset + len - s).min(MAX_DATA_LEN as u64)).expect("fits"),
                )
            })
            .collect();
        self.client
            .prefetch(ranges)
            .await
            .map_err(|e| link_error(Op::Prefetch, offset, e))
    }
}

/// Awaits every future, failing on the first error.
async fn futures_join<F, T>(futs: Vec<F>) -> blockcore::Result<Vec<T>>
where
    F: std::future::Future<Output = blockcore::Result<T>>,
{
    let mut out = Vec::with_capacity(futs.len());
    // Sequential is fine: each piece is already 16 MiB.
    for f in futs {
        out.push(f.await?);
    }
    Ok(out)
}

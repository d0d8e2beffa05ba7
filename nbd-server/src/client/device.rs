//! [`NbdDevice`]: a [`BlockDevice`] backed by a remote NBD export, the thin
//! tokio shell around [`ClientHandshake`] and [`ClientTransmission`].
//!
//! ```text
//!   callers ─request─> ClientTransmission.start ─> mpsc ─> writer task ─> socket
//!      ^ (oneshot per cookie)                                              │
//!      └──────────── reader task <─ ClientTransmission.decode <────────────┘
//! ```
//!
//! Many requests share one connection: callers register a waiter under the
//! request's cookie, a writer task sends headers and payloads, and a reader
//! task decodes replies (in whatever order the server sends them) and wakes
//! the matching waiter. Requests larger than the server's maximum block
//! size are split and sent concurrently.
//!
//! A broken connection fails every request in flight with an I/O error;
//! the next call dials again (and checks that the export is still the same
//! size). Every request is bounded by [`NbdConfig::request_timeout`], so a
//! server that stops answering produces an error, never a hang.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use blockcore::{
    check_range, BlockDevice, BlockError, BlockSizes, Capabilities, DeviceInfo, Extent, ExtentKind,
    Op, Result, WriteFlags, ZeroFlags,
};
use bytes::{Bytes, BytesMut};
use futures::future::try_join_all;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::handshake::{
    ClientHandshake, ClientHandshakeError, ClientNegotiated, ClientOptions, ClientStep,
};
use super::transmission::{ClientTransmission, Outcome, Progress, ReplyError, Request};
use super::uri::{NbdUri, Transport, UriError};
use crate::proto::consts::{
    CMD_FLAG_FAST_ZERO, CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, FLAG_CAN_MULTI_CONN, FLAG_HAS_FLAGS,
    FLAG_READ_ONLY, FLAG_SEND_CACHE, FLAG_SEND_FAST_ZERO, FLAG_SEND_FLUSH, FLAG_SEND_FUA,
    FLAG_SEND_TRIM, FLAG_SEND_WRITE_ZEROES, STATE_HOLE, STATE_ZERO,
};
use crate::proto::{Command, CommandFlags, Errno};

/// The conventional NBD payload limit, used when the server states none
/// and as a cap on what it states (larger requests gain nothing and cost
/// memory on both ends).
pub const DEFAULT_MAX_REQUEST: u32 = 32 * 1024 * 1024;

/// Requests without payload (trim, zero, cache, block status) are split at
/// this size: the length field is 32 bits, and some servers refuse lengths
/// near the limit.
const NO_PAYLOAD_CHUNK: u64 = 1 << 30;

/// Settings of an [`NbdDevice`].
#[derive(Clone, Debug)]
pub struct NbdConfig {
    /// Bound on connecting plus the handshake.
    pub connect_timeout: Duration,
    /// Bound on every call, including any reconnect it needs.
    pub request_timeout: Duration,
    /// Ask for structured replies (sparse reads, error messages).
    pub structured_replies: bool,
    /// Ask for `base:allocation` so `extents` reports real allocation.
    pub base_allocation: bool,
}

impl Default for NbdConfig {
    fn default() -> Self {
        NbdConfig {
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            structured_replies: true,
            base_allocation: true,
        }
    }
}

/// Why a connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum NbdConnectError {
    #[error(transparent)]
    Uri(#[from] UriError),
    #[error("connecting to {uri}: {source}")]
    Io {
        uri: String,
        #[source]
        source: io::Error,
    },
    #[error("handshake with {uri}: {source}")]
    Handshake {
        uri: String,
        #[source]
        source: ClientHandshakeError,
    },
    #[error("{uri}: the server closed the connection during the handshake")]
    Closed { uri: String },
    #[error("{uri}: no answer within {timeout:?}")]
    Timeout { uri: String, timeout: Duration },
    #[error("{uri}: the export changed on reconnect (size {old} -> {new})")]
    ExportChanged { uri: String, old: u64, new: u64 },
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<S: AsyncRead + AsyncWrite + Unpin + Send> Stream for S {}

/// Why a request failed, before it becomes a [`BlockError`].
#[derive(Debug)]
enum Failure {
    Reply(ReplyError),
    Lost(String),
}

type Waiter = oneshot::Sender<Result<Outcome, Failure>>;

struct Shared {
    proto: ClientTransmission,
    waiters: HashMap<u64, Waiter>,
    /// Set once the connection is unusable; new requests fail at once.
    broken: Option<String>,
}

impl Shared {
    fn fail_all(&mut self, why: &str) {
        if self.broken.is_none() {
            self.broken = Some(why.to_owned());
        }
        for (_, w) in self.waiters.drain() {
            let _ = w.send(Err(Failure::Lost(why.to_owned())));
        }
    }
}

enum Outgoing {
    Frame { header: BytesMut, payload: Bytes },
    Disc(BytesMut),
}

/// One live connection.
struct Conn {
    shared: Arc<Mutex<Shared>>,
    tx: mpsc::UnboundedSender<Outgoing>,
    stop: CancellationToken,
}

fn lock(shared: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    // Nothing panics while holding the lock; if something did, the state is
    // still consistent enough to fail requests with.
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Conn {
    fn is_broken(&self) -> bool {
        lock(&self.shared).broken.is_some()
    }

    /// Registers the request and queues it; the receiver yields its result.
    fn submit(
        &self,
        request: Request,
        payload: Bytes,
    ) -> std::result::Result<(u64, oneshot::Receiver<Result<Outcome, Failure>>), String> {
        let (tx, rx) = oneshot::channel();
        let mut shared = lock(&self.shared);
        if let Some(why) = &shared.broken {
            return Err(why.clone());
        }
        let mut header = BytesMut::with_capacity(28);
        let cookie = shared.proto.start(request, &mut header);
        shared.waiters.insert(cookie, tx);
        // Queued under the lock so a failing writer cannot miss it.
        if self.tx.send(Outgoing::Frame { header, payload }).is_err() {
            shared.fail_all("the connection's writer stopped");
            return Err("the connection's writer stopped".to_owned());
        }
        Ok((cookie, rx))
    }

    fn forget(&self, cookie: u64) {
        lock(&self.shared).waiters.remove(&cookie);
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        // Say goodbye (NBD_CMD_DISC) after everything queued, then stop
        // the reader; the writer ends after sending DISC.
        let mut header = BytesMut::with_capacity(28);
        lock(&self.shared).proto.start(disc(), &mut header);
        let _ = self.tx.send(Outgoing::Disc(header));
        self.stop.cancel();
    }
}

fn disc() -> Request {
    Request {
        command: Command::Disc,
        flags: CommandFlags::default(),
        offset: 0,
        length: 0,
    }
}

enum Dialer {
    Uri(NbdUri),
    /// A stream handed in by the caller: nothing to redial.
    None(String),
}

impl Dialer {
    fn name(&self) -> String {
        match self {
            Dialer::Uri(u) => u.to_string(),
            Dialer::None(n) => n.clone(),
        }
    }
}

/// A remote NBD export as a [`BlockDevice`].
pub struct NbdDevice {
    dialer: Dialer,
    config: NbdConfig,
    negotiated: ClientNegotiated,
    info: DeviceInfo,
    conn: Mutex<Arc<Conn>>,
    /// Set by [`NbdDevice::disconnect`]: no more requests, no redialling.
    closed: AtomicBool,
    /// Serialises reconnects so concurrent callers dial once.
    redial: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for NbdDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdDevice")
            .field("server", &self.dialer.name())
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl NbdDevice {
    /// Connects to `uri` (`nbd://HOST[:PORT]/EXPORT` or
    /// `nbd+unix:///EXPORT?socket=PATH`). Must run inside a tokio runtime,
    /// which then hosts the connection's tasks.
    pub async fn connect(uri: &str, config: NbdConfig) -> Result<Self, NbdConnectError> {
        let uri = NbdUri::parse(uri)?;
        let (conn, negotiated) = dial(&uri, &config).await?;
        Ok(Self::new(Dialer::Uri(uri), config, conn, negotiated))
    }

    /// Runs the handshake for `export` over an already-connected stream
    /// (any transport). Such a device cannot reconnect.
    pub async fn connect_stream<S>(
        stream: S,
        export: &str,
        config: NbdConfig,
    ) -> Result<Self, NbdConnectError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let name = format!("stream export {export:?}");
        let (conn, negotiated) = tokio::time::timeout(
            config.connect_timeout,
            start(Box::new(stream), export, &config, &name),
        )
        .await
        .map_err(|_| NbdConnectError::Timeout {
            uri: name.clone(),
            timeout: config.connect_timeout,
        })??;
        Ok(Self::new(Dialer::None(name), config, conn, negotiated))
    }

    fn new(dialer: Dialer, config: NbdConfig, conn: Conn, negotiated: ClientNegotiated) -> Self {
        let info = device_info(&negotiated);
        tracing::info!(server = %dialer.name(), size = info.size, caps = ?info.caps,
            block_sizes = ?info.block_sizes, "NBD export connected");
        NbdDevice {
            dialer,
            config,
            negotiated,
            info,
            conn: Mutex::new(Arc::new(conn)),
            closed: AtomicBool::new(false),
            redial: tokio::sync::Mutex::new(()),
        }
    }

    /// What the handshake settled on.
    pub fn negotiated(&self) -> &ClientNegotiated {
        &self.negotiated
    }

    fn current(&self) -> Arc<Conn> {
        self.conn
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The live connection, dialling again if the last one broke.
    async fn connection(&self, op: Op) -> Result<Arc<Conn>> {
        if self.closed.load(Ordering::Acquire) {
            return Err(BlockError::ShuttingDown { op });
        }
        let conn = self.current();
        if !conn.is_broken() {
            return Ok(conn);
        }
        let _guard = self.redial.lock().await;
        let conn = self.current();
        if !conn.is_broken() {
            return Ok(conn);
        }
        let Dialer::Uri(uri) = &self.dialer else {
            return Err(lost(op, 0, &self.dialer.name(), &broken_reason(&conn)));
        };
        tracing::info!(server = %uri, reason = %broken_reason(&conn), "reconnecting to the NBD server");
        let (new, negotiated) = dial(uri, &self.config)
            .await
            .map_err(|e| lost(op, 0, &uri.to_string(), &format!("reconnect failed: {e}")))?;
        // Same size and capabilities, or the device would change under its
        // users' feet.
        if device_info(&negotiated) != self.info {
            let e = NbdConnectError::ExportChanged {
                uri: uri.to_string(),
                old: self.info.size,
                new: negotiated.size,
            };
            return Err(lost(op, 0, &uri.to_string(), &e.to_string()));
        }
        let new = Arc::new(new);
        *self.conn.lock().unwrap_or_else(PoisonError::into_inner) = new.clone();
        Ok(new)
    }

    /// Sends one request and waits for its reply, within the timeout.
    async fn call(&self, op: Op, request: Request, payload: Bytes) -> Result<Outcome> {
        let work = async {
            let conn = self.connection(op).await?;
            let (cookie, rx) = conn
                .submit(request, payload)
                .map_err(|why| lost(op, request.offset, &self.dialer.name(), &why))?;
            // Dropped on completion, timeout or cancellation alike; a
            // completed request's waiter is already gone.
            let _forget = Forget {
                conn: &conn,
                cookie,
            };
            let result = rx.await;
            match result {
                Ok(Ok(outcome)) => Ok(outcome),
                Ok(Err(Failure::Reply(e))) => {
                    Err(reply_error(op, &request, self.max_request(), &e))
                }
                Ok(Err(Failure::Lost(why))) => {
                    Err(lost(op, request.offset, &self.dialer.name(), &why))
                }
                Err(_) => Err(lost(
                    op,
                    request.offset,
                    &self.dialer.name(),
                    "the connection closed",
                )),
            }
        };
        match tokio::time::timeout(self.config.request_timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(BlockError::Io {
                op,
                offset: request.offset,
                source: io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "NBD server {} did not answer within {:?}",
                        self.dialer.name(),
                        self.config.request_timeout
                    ),
                ),
            }),
        }
    }

    fn flag(&self, bit: u16) -> bool {
        effective_flags(&self.negotiated) & bit != 0
    }

    fn min(&self) -> u64 {
        u64::from(self.info.block_sizes.min)
    }

    fn max_request(&self) -> u64 {
        u64::from(self.info.block_sizes.max)
    }

    fn check(&self, op: Op, offset: u64, len: u64) -> Result<()> {
        check_range(&self.info, op, offset, len)?;
        let min = self.min();
        if !offset.is_multiple_of(min) || !len.is_multiple_of(min) {
            return Err(BlockError::Misaligned {
                op,
                offset,
                len,
                align: self.info.block_sizes.min,
            });
        }
        Ok(())
    }

    /// Splits `[offset, offset + len)` into pieces of at most `max` bytes
    /// (a multiple of the minimum block size).
    fn pieces(&self, offset: u64, len: u64, max: u64) -> Vec<(u64, u32)> {
        let min = self.min();
        let step = (max / min * min).max(min);
        let mut out = Vec::with_capacity(usize::try_from(len.div_ceil(step)).unwrap_or(1));
        let mut at = 0;
        while at < len {
            let n = step.min(len - at);
            // `step` is at most 1 GiB, so the piece fits the wire's u32.
            out.push((offset + at, u32::try_from(n).unwrap_or(u32::MAX)));
            at += n;
        }
        out
    }

    /// Sends a payload-free command over `[offset, offset + len)`, split.
    async fn ranged(
        &self,
        op: Op,
        command: Command,
        flags: u16,
        offset: u64,
        len: u64,
    ) -> Result<()> {
        let pieces = self.pieces(offset, len, NO_PAYLOAD_CHUNK);
        try_join_all(pieces.into_iter().map(|(offset, length)| {
            self.call(
                op,
                Request {
                    command,
                    flags: CommandFlags(flags),
                    offset,
                    length,
                },
                Bytes::new(),
            )
        }))
        .await?;
        Ok(())
    }

    /// Writes zeroes with plain writes, for servers without WRITE_ZEROES.
    async fn write_zero_buffers(&self, op: Op, offset: u64, len: u64, fua: bool) -> Result<()> {
        let pieces = self.pieces(offset, len, self.max_request());
        let biggest = pieces.iter().map(|p| p.1).max().unwrap_or(0);
        let zeroes = Bytes::from(vec![0u8; biggest as usize]);
        let flags = if fua && self.flag(FLAG_SEND_FUA) {
            CMD_FLAG_FUA
        } else {
            0
        };
        try_join_all(pieces.into_iter().map(|(offset, length)| {
            self.call(
                op,
                Request {
                    command: Command::Write,
                    flags: CommandFlags(flags),
                    offset,
                    length,
                },
                zeroes.slice(..length as usize),
            )
        }))
        .await?;
        self.fua_fallback(fua).await
    }

    /// FUA for servers that cannot do it per request: flush afterwards.
    async fn fua_fallback(&self, fua: bool) -> Result<()> {
        if fua && !self.flag(FLAG_SEND_FUA) {
            self.flush().await?;
        }
        Ok(())
    }

    /// Sends NBD_CMD_DISC and closes the connection; requests still in
    /// flight fail, later calls fail with [`BlockError::ShuttingDown`].
    /// Dropping the device does the same.
    pub fn disconnect(&self) {
        self.closed.store(true, Ordering::Release);
        let conn = self.current();
        let mut shared = lock(&conn.shared);
        shared.fail_all("the device was disconnected");
        let mut header = BytesMut::with_capacity(28);
        shared.proto.start(disc(), &mut header);
        let _ = conn.tx.send(Outgoing::Disc(header));
    }
}

/// Removes a waiter whose caller gave up (timeout or cancellation), so a
/// late reply is dropped instead of leaking.
struct Forget<'a> {
    conn: &'a Conn,
    cookie: u64,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.conn.forget(self.cookie);
    }
}

#[async_trait]
impl BlockDevice for NbdDevice {
    fn info(&self) -> DeviceInfo {
        self.info
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        self.check(Op::Read, offset, len as u64)?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        let pieces = self.pieces(offset, len as u64, self.max_request());
        let mut parts = try_join_all(pieces.into_iter().map(|(offset, length)| {
            self.call(
                Op::Read,
                Request {
                    command: Command::Read,
                    flags: CommandFlags::default(),
                    offset,
                    length,
                },
                Bytes::new(),
            )
        }))
        .await?;
        let data = if parts.len() == 1 {
            match parts.pop() {
                Some(Outcome::Data(d)) => d,
                _ => Bytes::new(),
            }
        } else {
            // Reads over the maximum request size are reassembled.
            let mut out = BytesMut::with_capacity(len);
            for p in parts {
                if let Outcome::Data(d) = p {
                    out.extend_from_slice(&d);
                }
            }
            out.freeze()
        };
        if data.len() != len {
            return Err(lost(
                Op::Read,
                offset,
                &self.dialer.name(),
                "the server returned the wrong amount of data",
            ));
        }
        Ok(data)
    }

    async fn write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> Result<()> {
        self.check(Op::Write, offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        let cmd_flags = if flags.fua && self.flag(FLAG_SEND_FUA) {
            CMD_FLAG_FUA
        } else {
            0
        };
        let pieces = self.pieces(offset, data.len() as u64, self.max_request());
        try_join_all(pieces.into_iter().map(|(at, length)| {
            // Lossless: `at - offset` is below `data.len()`.
            let start = usize::try_from(at - offset).unwrap_or(0);
            self.call(
                Op::Write,
                Request {
                    command: Command::Write,
                    flags: CommandFlags(cmd_flags),
                    offset: at,
                    length,
                },
                data.slice(start..start + length as usize),
            )
        }))
        .await?;
        self.fua_fallback(flags.fua).await
    }

    async fn flush(&self) -> Result<()> {
        if !self.flag(FLAG_SEND_FLUSH) {
            // The server offers no flush: every write is as durable as it
            // will ever be.
            return Ok(());
        }
        self.call(
            Op::Flush,
            Request {
                command: Command::Flush,
                flags: CommandFlags::default(),
                offset: 0,
                length: 0,
            },
            Bytes::new(),
        )
        .await?;
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u64, flags: WriteFlags) -> Result<()> {
        self.check(Op::Trim, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        // NBD_CMD_TRIM leaves the contents undefined, but a trimmed range
        // must read as zeroes here: a write-zeroes that may punch holes
        // deallocates just the same and guarantees the zeroes.
        if self.flag(FLAG_SEND_WRITE_ZEROES) {
            let fua = if flags.fua && self.flag(FLAG_SEND_FUA) {
                CMD_FLAG_FUA
            } else {
                0
            };
            self.ranged(Op::Trim, Command::WriteZeroes, fua, offset, len)
                .await?;
            return self.fua_fallback(flags.fua).await;
        }
        self.write_zero_buffers(Op::Trim, offset, len, flags.fua)
            .await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.check(Op::WriteZeroes, offset, len)?;
        let native = self.flag(FLAG_SEND_WRITE_ZEROES);
        if flags.fast_only && !(native && self.flag(FLAG_SEND_FAST_ZERO)) {
            return Err(BlockError::Unsupported {
                op: Op::WriteZeroes,
            });
        }
        if len == 0 {
            return Ok(());
        }
        if !native {
            return self
                .write_zero_buffers(Op::WriteZeroes, offset, len, flags.fua)
                .await;
        }
        let mut bits = 0;
        if !flags.may_trim {
            bits |= CMD_FLAG_NO_HOLE;
        }
        if flags.fast_only {
            bits |= CMD_FLAG_FAST_ZERO;
        }
        if flags.fua && self.flag(FLAG_SEND_FUA) {
            bits |= CMD_FLAG_FUA;
        }
        self.ranged(Op::WriteZeroes, Command::WriteZeroes, bits, offset, len)
            .await?;
        self.fua_fallback(flags.fua).await
    }

    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.check(Op::Extents, offset, len)?;
        let data = |len| {
            vec![Extent {
                offset,
                len,
                kind: ExtentKind::Data,
            }]
        };
        if len == 0 || self.negotiated.base_allocation.is_none() {
            return Ok(data(len));
        }
        // One request describes a prefix; the contract allows that.
        let Some(&(_, length)) = self.pieces(offset, len, NO_PAYLOAD_CHUNK).first() else {
            return Ok(data(len));
        };
        let outcome = self
            .call(
                Op::Extents,
                Request {
                    command: Command::BlockStatus,
                    flags: CommandFlags::default(),
                    offset,
                    length,
                },
                Bytes::new(),
            )
            .await?;
        let Outcome::Extents(descriptors) = outcome else {
            return Ok(data(u64::from(length)));
        };
        let extents = to_extents(offset, u64::from(length), &descriptors);
        Ok(if extents.is_empty() {
            data(u64::from(length))
        } else {
            extents
        })
    }

    async fn prefetch(&self, offset: u64, len: u64) -> Result<()> {
        self.check(Op::Prefetch, offset, len)?;
        if len == 0 || !self.flag(FLAG_SEND_CACHE) {
            return Ok(());
        }
        self.ranged(Op::Prefetch, Command::Cache, 0, offset, len)
            .await
    }
}

/// `base:allocation` descriptors as extents, clipped to `[offset, offset +
/// len)` (the spec lets the last descriptor run past the request).
fn to_extents(offset: u64, len: u64, descriptors: &[(u32, u32)]) -> Vec<Extent> {
    let end = offset + len;
    let mut at = offset;
    let mut out: Vec<Extent> = Vec::with_capacity(descriptors.len());
    for &(length, flags) in descriptors {
        if at >= end {
            break;
        }
        let n = u64::from(length).min(end - at);
        if n == 0 {
            continue;
        }
        // A hole that is not known to read as zeroes (a backing file shows
        // through) is data as far as readers are concerned.
        let kind = match (flags & STATE_HOLE != 0, flags & STATE_ZERO != 0) {
            (true, true) => ExtentKind::Hole,
            (false, true) => ExtentKind::Zero,
            (_, false) => ExtentKind::Data,
        };
        match out.last_mut() {
            Some(last) if last.kind == kind => last.len += n,
            _ => out.push(Extent {
                offset: at,
                len: n,
                kind,
            }),
        }
        at += n;
    }
    out
}

/// Transmission flags are meaningless unless `NBD_FLAG_HAS_FLAGS` is set.
fn effective_flags(n: &ClientNegotiated) -> u16 {
    if n.transmission_flags & FLAG_HAS_FLAGS != 0 {
        n.transmission_flags
    } else {
        0
    }
}

fn device_info(n: &ClientNegotiated) -> DeviceInfo {
    let flags = effective_flags(n);
    let has = |bit: u16| flags & bit != 0;
    let block_sizes = match n.block_sizes {
        Some(s) => {
            let max = s.max.min(DEFAULT_MAX_REQUEST);
            BlockSizes {
                min: s.min,
                preferred: s.preferred.max(s.min),
                // The handshake checked min is a power of two up to 64 KiB.
                max: (max / s.min * s.min).max(s.min),
            }
        }
        None => BlockSizes::DEFAULT,
    };
    DeviceInfo {
        size: n.size,
        block_sizes,
        caps: Capabilities {
            read_only: has(FLAG_READ_ONLY),
            flush: has(FLAG_SEND_FLUSH),
            fua: has(FLAG_SEND_FUA),
            trim: has(FLAG_SEND_TRIM),
            write_zeroes: has(FLAG_SEND_WRITE_ZEROES),
            fast_zero: has(FLAG_SEND_WRITE_ZEROES) && has(FLAG_SEND_FAST_ZERO),
            extents: n.base_allocation.is_some(),
            prefetch: has(FLAG_SEND_CACHE),
            multi_conn: has(FLAG_CAN_MULTI_CONN),
        },
    }
}

fn broken_reason(conn: &Conn) -> String {
    lock(&conn.shared)
        .broken
        .clone()
        .unwrap_or_else(|| "unknown".to_owned())
}

fn lost(op: Op, offset: u64, server: &str, why: &str) -> BlockError {
    BlockError::Io {
        op,
        offset,
        source: io::Error::new(
            io::ErrorKind::ConnectionAborted,
            format!("NBD server {server}: {why}"),
        ),
    }
}

/// The one place NBD error replies become [`BlockError`]s. Exhaustive over
/// the errno values the spec allows (no `_` arm); anything else is a
/// generic I/O error.
fn reply_error(op: Op, request: &Request, max: u64, e: &ReplyError) -> BlockError {
    let offset = e.offset.unwrap_or(request.offset);
    let io = |kind: io::ErrorKind, what: &str| {
        let mut text = format!("NBD server: {what} (errno {})", e.errno);
        if !e.message.is_empty() {
            text.push_str(": ");
            text.push_str(&e.message);
        }
        BlockError::Io {
            op,
            offset,
            source: io::Error::new(kind, text),
        }
    };
    let Some(errno) = Errno::from_code(e.errno) else {
        return io(io::ErrorKind::Other, "unknown error");
    };
    match errno {
        Errno::Perm => BlockError::ReadOnly { op },
        Errno::Io => io(io::ErrorKind::Other, "I/O error"),
        Errno::NoMem => io(io::ErrorKind::OutOfMemory, "out of memory"),
        // Range and alignment were checked before sending, so the server
        // disagrees with what it advertised: report it, with its reason.
        Errno::Inval => io(io::ErrorKind::InvalidInput, "invalid request"),
        Errno::NoSpc => BlockError::NoSpace { op, offset },
        Errno::Overflow => BlockError::TooLarge {
            op,
            len: u64::from(request.length),
            max,
        },
        Errno::NotSup => BlockError::Unsupported { op },
        Errno::Shutdown => BlockError::ShuttingDown { op },
    }
}

async fn dial(
    uri: &NbdUri,
    config: &NbdConfig,
) -> Result<(Conn, ClientNegotiated), NbdConnectError> {
    let name = uri.to_string();
    let work = async {
        let io_err = |source| NbdConnectError::Io {
            uri: name.clone(),
            source,
        };
        let stream: Box<dyn Stream> = match &uri.transport {
            Transport::Tcp { host, port } => {
                let s = tokio::net::TcpStream::connect((host.as_str(), *port))
                    .await
                    .map_err(io_err)?;
                // Small requests must not wait for Nagle.
                let _ = s.set_nodelay(true);
                Box::new(s)
            }
            Transport::Unix(path) => Box::new(
                tokio::net::UnixStream::connect(path)
                    .await
                    .map_err(io_err)?,
            ),
        };
        start(stream, &uri.export, config, &name).await
    };
    tokio::time::timeout(config.connect_timeout, work)
        .await
        .map_err(|_| NbdConnectError::Timeout {
            uri: name.clone(),
            timeout: config.connect_timeout,
        })?
}

/// Runs the handshake over `stream`, then starts the reader and writer.
async fn start(
    mut stream: Box<dyn Stream>,
    export: &str,
    config: &NbdConfig,
    name: &str,
) -> Result<(Conn, ClientNegotiated), NbdConnectError> {
    let hs_err = |source| NbdConnectError::Handshake {
        uri: name.to_owned(),
        source,
    };
    let io_err = |source| NbdConnectError::Io {
        uri: name.to_owned(),
        source,
    };
    let mut hs = ClientHandshake::new(ClientOptions {
        export: export.to_owned(),
        structured_replies: config.structured_replies,
        base_allocation: config.base_allocation && config.structured_replies,
    })
    .map_err(hs_err)?;
    let mut input = BytesMut::with_capacity(4096);
    let mut out = BytesMut::new();
    let negotiated = loop {
        let step = hs.advance(&mut input, &mut out).map_err(hs_err)?;
        if !out.is_empty() {
            stream.write_all(&out).await.map_err(io_err)?;
            stream.flush().await.map_err(io_err)?;
            out.clear();
        }
        match step {
            ClientStep::Done(n) => break n,
            ClientStep::NeedInput => {
                if stream.read_buf(&mut input).await.map_err(io_err)? == 0 {
                    return Err(NbdConnectError::Closed {
                        uri: name.to_owned(),
                    });
                }
            }
        }
    };
    let shared = Arc::new(Mutex::new(Shared {
        proto: ClientTransmission::new(negotiated.structured_replies, negotiated.base_allocation),
        waiters: HashMap::new(),
        broken: None,
    }));
    let (rd, wr) = tokio::io::split(stream);
    let (tx, rx) = mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    tokio::spawn(reader(rd, input, shared.clone(), stop.clone()));
    tokio::spawn(writer(wr, rx, shared.clone()));
    Ok((Conn { shared, tx, stop }, negotiated))
}

async fn reader(
    mut rd: tokio::io::ReadHalf<Box<dyn Stream>>,
    mut input: BytesMut,
    shared: Arc<Mutex<Shared>>,
    stop: CancellationToken,
) {
    let why = loop {
        // Decode everything buffered, waking waiters as replies complete.
        let need = {
            let mut s = lock(&shared);
            let result = loop {
                match s.proto.decode(&mut input) {
                    Ok(Progress::NeedInput(n)) => break Ok(n),
                    Ok(Progress::Chunk) => {}
                    Ok(Progress::Complete(c)) => {
                        if let Some(w) = s.waiters.remove(&c.cookie) {
                            let _ = w.send(c.result.map_err(Failure::Reply));
                        }
                    }
                    Err(e) => break Err(e),
                }
            };
            match result {
                Ok(n) => n,
                Err(e) => {
                    s.fail_all(&format!("protocol error: {e}"));
                    tracing::warn!(error = %e, "NBD server broke the protocol; connection dropped");
                    return;
                }
            }
        };
        input.reserve(need.saturating_sub(input.len()).max(64 * 1024));
        tokio::select! {
            () = stop.cancelled() => break "the device was closed".to_owned(),
            r = rd.read_buf(&mut input) => match r {
                Ok(0) => break "the server closed the connection".to_owned(),
                Ok(_) => {}
                Err(e) => break format!("reading from the server: {e}"),
            },
        }
    };
    lock(&shared).fail_all(&why);
}

async fn writer(
    wr: tokio::io::WriteHalf<Box<dyn Stream>>,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    shared: Arc<Mutex<Shared>>,
) {
    let mut wr = BufWriter::with_capacity(256 * 1024, wr);
    let result: io::Result<()> = async {
        while let Some(mut msg) = rx.recv().await {
            // Coalesce whatever is queued into one flush.
            loop {
                match msg {
                    Outgoing::Frame { header, payload } => {
                        wr.write_all(&header).await?;
                        if !payload.is_empty() {
                            wr.write_all(&payload).await?;
                        }
                    }
                    Outgoing::Disc(header) => {
                        wr.write_all(&header).await?;
                        wr.flush().await?;
                        return wr.shutdown().await;
                    }
                }
                match rx.try_recv() {
                    Ok(next) => msg = next,
                    Err(_) => break,
                }
            }
            wr.flush().await?;
        }
        Ok(())
    }
    .await;
    if let Err(e) = result {
        lock(&shared).fail_all(&format!("writing to the server: {e}"));
    }
}

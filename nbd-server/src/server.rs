//! The thin tokio shell around the sans-IO codec: accept, handshake
//! (optionally upgrading to TLS), then serve requests out of order.
//!
//! ```text
//!   socket ─read─> RequestDecoder ─> validate ─> request future ─> device
//!      ^                                  │ (error reply)      │
//!      │                                  v                    v
//!      └──── vectored write <──────── Outbox <──── replies as they complete
//! ```
//!
//! One task per connection owns the socket and every request in flight.
//! Requests run as futures polled by that task, out of order: a slow read
//! never holds up a fast one, and a device call that completes inline (a
//! page-cache hit) costs no thread hop. Replies go out as they complete,
//! coalesced into vectored writes. A per-connection byte budget bounds the
//! memory held by requests in flight and pauses reading when spent.
//! Every connection to an export shares one device, so a flush on any
//! connection covers writes completed on all of them (`CAN_MULTI_CONN`).
//!
//! Exports come and go at run time. Each carries a cancellation token (a
//! child of the server's) and a tracker of its connections, so removing
//! one stops and waits for exactly its own connections, the way shutdown
//! does for all of them.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use blockcore::{BlockDevice, BlockError, ExtentKind, WriteFlags, ZeroFlags};
use bytes::{Buf, Bytes, BytesMut};
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use futures::FutureExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;
use tokio_util::task::task_tracker::TaskTrackerToken;
use tokio_util::task::TaskTracker;

use crate::proto::{
    encode_block_status, encode_offset_data_header, encode_simple_reply, encode_structured_error,
    encode_structured_none, validate, Command, Decoded, Errno, ExportCatalog, ExportInfo,
    Handshake, Negotiated, RequestDecoder, RequestHeader, Step, TlsMode,
};

/// The largest payload of one request (NBD's conventional 32 MiB).
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;

/// One exported device.
#[derive(Clone, Debug)]
pub struct Export {
    pub name: String,
    pub description: String,
    pub device: Arc<dyn BlockDevice>,
}

/// Server-wide settings.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Whether TLS is optional or required when `tls` is set.
    pub tls_mode: TlsMode,
    /// Bytes of request payload and read data in flight per connection.
    pub in_flight_budget: usize,
    /// A client must finish the handshake within this time.
    pub handshake_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            tls: None,
            tls_mode: TlsMode::Off,
            in_flight_budget: 64 * 1024 * 1024,
            handshake_timeout: Duration::from_secs(30),
        }
    }
}

/// Errors of the server shell. Protocol violations by a client end that
/// client's connection only.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("two exports are named {0:?}")]
    DuplicateExport(String),
    #[error("no export is named {0:?}")]
    UnknownExport(String),
    #[error("flushing export {export:?}: {source}")]
    Flush {
        export: String,
        #[source]
        source: BlockError,
    },
    #[error("TLS mode {0:?} needs a certificate and key")]
    TlsWithoutCertificate(TlsMode),
    #[error("TLS material: {0}")]
    TlsFile(#[from] tlsfiles::PemError),
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("accepting connections: {0}")]
    Accept(#[source] io::Error),
}

/// Why one connection ended abnormally.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("handshake: {0}")]
    Handshake(#[from] crate::proto::HandshakeError),
    #[error("request stream: {0}")]
    Request(#[from] crate::proto::RequestError),
    #[error("handshake did not finish within {0:?}")]
    HandshakeTimeout(Duration),
    #[error("client sent data after STARTTLS before the TLS handshake")]
    TlsInjection,
    #[error("TLS requested but not configured")]
    TlsNotConfigured,
    #[error("socket: {0}")]
    Io(#[from] io::Error),
}

/// One export as the server holds it.
#[derive(Debug)]
struct ExportEntry {
    export: Export,
    /// Cancelled when the export is removed; a child of the server's
    /// shutdown token, so shutdown stops its connections too.
    stop: CancellationToken,
    /// The export's connections in the transmission phase, so removal can
    /// wait for exactly those.
    connections: TaskTracker,
}

/// The exports, changeable while the server runs. Insertion order is kept:
/// the empty name selects the first export still present.
#[derive(Debug, Default)]
struct Catalog {
    exports: RwLock<Vec<Arc<ExportEntry>>>,
}

impl Catalog {
    fn info(export: &Export) -> ExportInfo {
        ExportInfo {
            name: export.name.clone(),
            description: export.description.clone(),
            device: export.device.info(),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Arc<ExportEntry>>> {
        self.exports.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Vec<Arc<ExportEntry>>> {
        self.exports.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// The export named `name` with a hold on its connection tracker, taken
    /// under the same lock removal takes: either removal sees (and waits
    /// for) this connection, or the connection sees the export gone.
    fn enter(&self, name: &str) -> Option<(Arc<ExportEntry>, TaskTrackerToken)> {
        let exports = self.read();
        let entry = exports.iter().find(|e| e.export.name == name)?;
        Some((Arc::clone(entry), entry.connections.token()))
    }
}

impl ExportCatalog for Catalog {
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        let exports = self.read();
        // The empty name selects the default (first) export.
        let entry = if name.is_empty() {
            exports.first()
        } else {
            exports.iter().find(|e| e.export.name == name)
        };
        entry.map(|e| Self::info(&e.export))
    }

    fn list(&self) -> Vec<ExportInfo> {
        self.read().iter().map(|e| Self::info(&e.export)).collect()
    }
}

/// An NBD server: a set of exports served on any number of listeners.
/// Exports can be added and removed while it runs. Cheap to clone.
#[derive(Clone)]
pub struct Server {
    catalog: Arc<Catalog>,
    config: ServerConfig,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: CancellationToken,
    connections: TaskTracker,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("exports", &self.catalog.read().len())
            .field("tls_mode", &self.config.tls_mode)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// A server for `exports` (possibly none: exports can be added later
    /// with [`Server::add_export`]).
    pub fn new(exports: Vec<Export>, config: ServerConfig) -> Result<Self, ServerError> {
        if config.tls_mode != TlsMode::Off && config.tls.is_none() {
            return Err(ServerError::TlsWithoutCertificate(config.tls_mode));
        }
        let tls = config.tls.clone().map(tokio_rustls::TlsAcceptor::from);
        let server = Self {
            catalog: Arc::new(Catalog::default()),
            config,
            tls,
            shutdown: CancellationToken::new(),
            connections: TaskTracker::new(),
        };
        for export in exports {
            server.add_export(export)?;
        }
        Ok(server)
    }

    /// Adds an export; new handshakes can list and select it at once.
    pub fn add_export(&self, export: Export) -> Result<(), ServerError> {
        let mut exports = self.catalog.write();
        if exports.iter().any(|e| e.export.name == export.name) {
            return Err(ServerError::DuplicateExport(export.name));
        }
        exports.push(Arc::new(ExportEntry {
            export,
            stop: self.shutdown.child_token(),
            connections: TaskTracker::new(),
        }));
        Ok(())
    }

    /// Removes an export without disturbing the others: new handshakes no
    /// longer find it, and its connections stop reading requests, answer
    /// the ones already read and close, as at [`Server::shutdown`]. Waits up
    /// to `timeout` for them, then flushes the device (unless read-only) so
    /// every acknowledged write is durable, and hands the export back.
    pub async fn remove_export(
        &self,
        name: &str,
        timeout: Duration,
    ) -> Result<Export, ServerError> {
        let entry = {
            let mut exports = self.catalog.write();
            let at = exports
                .iter()
                .position(|e| e.export.name == name)
                .ok_or_else(|| ServerError::UnknownExport(name.to_owned()))?;
            exports.remove(at)
        };
        entry.stop.cancel();
        entry.connections.close();
        if tokio::time::timeout(timeout, entry.connections.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                export = %name,
                ?timeout,
                open = entry.connections.len(),
                "connections to a removed export still open after the timeout"
            );
        }
        let export = entry.export.clone();
        if !export.device.info().caps.read_only {
            export
                .device
                .flush()
                .await
                .map_err(|source| ServerError::Flush {
                    export: export.name.clone(),
                    source,
                })?;
        }
        Ok(export)
    }

    /// The exports' names, in the order they were added.
    pub fn export_names(&self) -> Vec<String> {
        self.catalog
            .read()
            .iter()
            .map(|e| e.export.name.clone())
            .collect()
    }

    /// Accepts TCP clients until [`Server::shutdown`].
    pub async fn serve_tcp(&self, listener: TcpListener) -> Result<(), ServerError> {
        loop {
            let (stream, peer) = tokio::select! {
                () = self.shutdown.cancelled() => return Ok(()),
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) if is_transient_accept_error(&e) => {
                        tracing::warn!(error = %e, "accept failed; retrying");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                    Err(e) => return Err(ServerError::Accept(e)),
                },
            };
            // Small requests and replies must not wait for Nagle.
            let _ = stream.set_nodelay(true);
            self.spawn_connection(stream, peer.to_string());
        }
    }

    /// Accepts Unix-socket clients until [`Server::shutdown`].
    pub async fn serve_unix(&self, listener: UnixListener) -> Result<(), ServerError> {
        loop {
            let stream = tokio::select! {
                () = self.shutdown.cancelled() => return Ok(()),
                accepted = listener.accept() => match accepted {
                    Ok((s, _)) => s,
                    Err(e) if is_transient_accept_error(&e) => {
                        tracing::warn!(error = %e, "accept failed; retrying");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                    Err(e) => return Err(ServerError::Accept(e)),
                },
            };
            self.spawn_connection(stream, "unix".to_owned());
        }
    }

    /// Serves one already-accepted stream (any transport).
    pub fn spawn_connection<S>(&self, stream: S, peer: String)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let this = self.clone();
        self.connections.spawn(async move {
            tracing::debug!(%peer, "connection opened");
            match this.serve_connection(Box::new(stream)).await {
                Ok(()) => tracing::debug!(%peer, "connection closed"),
                Err(e) => tracing::warn!(%peer, error = %e, "connection ended"),
            }
        });
    }

    /// Stops accepting and tells every connection to stop reading new
    /// requests; requests already read still complete.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Waits (up to `timeout`) for every connection to finish, then flushes
    /// every export so all acknowledged writes are durable.
    pub async fn drain(&self, timeout: Duration) -> Result<(), BlockError> {
        self.connections.close();
        if tokio::time::timeout(timeout, self.connections.wait())
            .await
            .is_err()
        {
            tracing::warn!(?timeout, "connections still open after the drain timeout");
        }
        // Exports added since construction included; the lock is not held
        // across the flushes.
        let devices: Vec<Arc<dyn BlockDevice>> = self
            .catalog
            .read()
            .iter()
            .map(|e| Arc::clone(&e.export.device))
            .collect();
        for device in devices {
            if !device.info().caps.read_only {
                device.flush().await?;
            }
        }
        Ok(())
    }

    async fn serve_connection(&self, stream: Box<dyn Stream>) -> Result<(), ConnError> {
        let limit = self.config.handshake_timeout;
        let handshake = tokio::time::timeout(limit, self.handshake(stream));
        let (stream, negotiated, leftover) = tokio::select! {
            () = self.shutdown.cancelled() => return Ok(()),
            r = handshake => match r {
                Err(_) => return Err(ConnError::HandshakeTimeout(limit)),
                Ok(r) => match r? {
                    Some(done) => done,
                    None => return Ok(()),
                },
            },
        };
        let Some((entry, _registered)) = self.catalog.enter(&negotiated.export.name) else {
            // Removed between the handshake's answer and here: the client
            // sees the connection close.
            return Ok(());
        };
        tracing::debug!(
            export = %negotiated.export.name,
            structured = negotiated.structured_replies,
            "transmission phase"
        );
        self.transmission(stream, negotiated, &entry, leftover)
            .await
    }

    /// Runs the option haggling; `None` when the client left or aborted.
    async fn handshake(
        &self,
        mut stream: Box<dyn Stream>,
    ) -> Result<Option<(Box<dyn Stream>, Negotiated, BytesMut)>, ConnError> {
        let mut input = BytesMut::with_capacity(4096);
        let mut out = BytesMut::with_capacity(4096);
        let mode = if self.tls.is_some() {
            self.config.tls_mode
        } else {
            TlsMode::Off
        };
        let mut hs = Handshake::new(mode, &mut out);
        loop {
            let step = hs.advance(&mut input, self.catalog.as_ref(), &mut out)?;
            if !out.is_empty() {
                stream.write_all(&out).await?;
                stream.flush().await?;
                out.clear();
            }
            match step {
                Step::NeedInput => {
                    if stream.read_buf(&mut input).await? == 0 {
                        return Ok(None);
                    }
                }
                Step::StartTls => {
                    if !input.is_empty() {
                        return Err(ConnError::TlsInjection);
                    }
                    let acceptor = self.tls.clone().ok_or(ConnError::TlsNotConfigured)?;
                    stream = Box::new(acceptor.accept(stream).await?);
                    hs.tls_started();
                }
                Step::Transmission(negotiated) => return Ok(Some((stream, negotiated, input))),
                Step::Closed => return Ok(None),
            }
        }
    }

    async fn transmission(
        &self,
        stream: Box<dyn Stream>,
        negotiated: Negotiated,
        entry: &ExportEntry,
        input: BytesMut,
    ) -> Result<(), ConnError> {
        let (reader, writer) = tokio::io::split(stream);
        let mut conn = Transmission {
            reader,
            writer,
            input,
            decoder: RequestDecoder::new(MAX_PAYLOAD),
            negotiated: Arc::new(negotiated),
            device: Arc::clone(&entry.export.device),
            running: FuturesUnordered::new(),
            outbox: Outbox::default(),
            in_flight_bytes: 0,
            budget: self.config.in_flight_budget,
            reading: true,
            broken: false,
        };
        // The export's token: a child of the server's, so both shutdown and
        // removal of this export stop the connection.
        conn.run(&entry.stop).await
    }
}

/// The per-connection state of the transmission phase.
///
/// One task owns the socket and every request in flight: requests run as
/// futures in `running` (polled by this task, so a request whose device
/// call completes inline costs no thread hop), and replies are written as
/// soon as they are ready, many per vectored write.
struct Transmission<R, W> {
    reader: R,
    writer: W,
    input: BytesMut,
    decoder: RequestDecoder,
    negotiated: Arc<Negotiated>,
    device: Arc<dyn BlockDevice>,
    running: FuturesUnordered<BoxFuture<'static, (Reply, usize)>>,
    outbox: Outbox,
    /// Payload and read bytes of requests running or replies not yet sent.
    in_flight_bytes: usize,
    budget: usize,
    /// False once the client disconnected, sent DISC, or shutdown (of the
    /// server or of the export) began.
    reading: bool,
    /// The socket failed: replies are dropped, running requests finish.
    broken: bool,
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Transmission<R, W> {
    async fn run(&mut self, shutdown: &CancellationToken) -> Result<(), ConnError> {
        let mut result = Ok(());
        loop {
            if self.reading {
                if let Err(e) = self.dispatch_buffered() {
                    // A framing error: finish what is running, then close.
                    result = Err(e);
                    self.reading = false;
                }
            }
            let replies_owed = !self.broken && self.outbox.wants_io();
            if !self.reading && self.running.is_empty() && !replies_owed {
                break;
            }
            let can_read = self.reading && self.in_flight_bytes < self.budget;
            tokio::select! {
                biased;
                Some((reply, cost)) = self.running.next(), if !self.running.is_empty() => {
                    if self.broken {
                        self.in_flight_bytes -= cost;
                    } else {
                        self.outbox.push(reply, cost);
                    }
                }
                io = self.outbox.drive(&mut self.writer), if replies_owed => {
                    if let Err(e) = io {
                        // The client cannot hear replies any more. Requests
                        // already running still finish (a write that reached
                        // the device must not be abandoned half-way), but
                        // nothing new starts.
                        self.broken = true;
                        self.reading = false;
                        self.in_flight_bytes -= self.outbox.discard();
                        result = Err(e.into());
                    }
                }
                n = self.reader.read_buf(&mut self.input), if can_read => match n {
                    // Client gone; a request cut short is never executed.
                    Ok(0) => self.reading = false,
                    Ok(_) => {}
                    Err(e) => {
                        result = Err(e.into());
                        self.reading = false;
                    }
                },
                () = shutdown.cancelled(), if self.reading => {
                    self.reading = false;
                    self.refuse_buffered(Errno::Shutdown);
                }
            }
            self.in_flight_bytes -= self.outbox.take_released();
        }
        if !self.broken {
            // Bounded: a client that stops reading must not pin the task.
            let _ = tokio::time::timeout(Duration::from_secs(5), self.writer.shutdown()).await;
        }
        result
    }

    /// Starts every complete request in the input buffer, while the
    /// in-flight budget allows.
    fn dispatch_buffered(&mut self) -> Result<(), ConnError> {
        while self.in_flight_bytes < self.budget {
            let Some(decoded) = self.decoder.decode(&mut self.input)? else {
                // Leave room for the next read without growing per byte.
                self.input.reserve(64 * 1024);
                return Ok(());
            };
            let (header, payload) = match decoded {
                Decoded::Request { header, payload } => (header, payload),
                Decoded::Oversized { header } => {
                    self.refuse(&header, Errno::Overflow);
                    continue;
                }
            };
            if header.command == Command::Disc {
                // Requests already read still complete and get replies.
                self.reading = false;
                return Ok(());
            }
            if let Err(errno) = validate(&header, &self.negotiated) {
                self.refuse(&header, errno);
                continue;
            }
            let cost = request_cost(&header);
            self.in_flight_bytes += cost;
            let (device, negotiated) = (Arc::clone(&self.device), Arc::clone(&self.negotiated));
            self.running.push(
                async move {
                    let reply = handle(device.as_ref(), &negotiated, header, payload).await;
                    (reply, cost)
                }
                .boxed(),
            );
        }
        Ok(())
    }

    /// Queues an error reply; it counts against the budget until sent, so a
    /// client that floods bad requests and never reads is paused too.
    fn refuse(&mut self, header: &RequestHeader, errno: Errno) {
        self.in_flight_bytes += REQUEST_OVERHEAD;
        self.outbox.push(
            error_reply(&self.negotiated, header, errno),
            REQUEST_OVERHEAD,
        );
    }

    /// Answers every complete request still in the input buffer with
    /// `errno` (at shutdown: they were read, so they get an answer).
    fn refuse_buffered(&mut self, errno: Errno) {
        while let Ok(Some(decoded)) = self.decoder.decode(&mut self.input) {
            let header = match decoded {
                Decoded::Request { header, .. } | Decoded::Oversized { header } => header,
            };
            if header.command == Command::Disc {
                return;
            }
            self.refuse(&header, errno);
        }
    }
}

/// Encoded replies waiting for the socket.
///
/// [`Outbox::drive`] does one socket operation per call (a vectored write,
/// or a flush once everything is written) and updates its state only after
/// that operation returns, so it can be dropped in a `select!` at any await
/// point without losing bytes or budget. TLS needs the separate flush: its
/// writes land in rustls' buffer and only a flush puts them on the socket.
#[derive(Debug, Default)]
struct Outbox {
    /// Byte runs in wire order: reply headers and read data.
    chunks: VecDeque<Bytes>,
    /// Budget cost released when the chunk at the same index is sent.
    costs: VecDeque<usize>,
    /// Budget released by chunks sent since the last `take_released`.
    released: usize,
    needs_flush: bool,
}

impl Outbox {
    fn wants_io(&self) -> bool {
        !self.chunks.is_empty() || self.needs_flush
    }

    fn push(&mut self, reply: Reply, cost: usize) {
        let has_data = reply.data.as_ref().is_some_and(|d| !d.is_empty());
        self.chunks.push_back(reply.header.freeze());
        self.costs.push_back(if has_data { 0 } else { cost });
        if let Some(data) = reply.data.filter(|d| !d.is_empty()) {
            self.chunks.push_back(data);
            self.costs.push_back(cost);
        }
    }

    fn take_released(&mut self) -> usize {
        std::mem::take(&mut self.released)
    }

    /// Drops everything unsent; returns the budget it held.
    fn discard(&mut self) -> usize {
        self.chunks.clear();
        self.needs_flush = false;
        self.costs.drain(..).sum::<usize>() + self.take_released()
    }

    async fn drive<W: AsyncWrite + Unpin>(&mut self, writer: &mut W) -> io::Result<()> {
        if self.chunks.is_empty() {
            writer.flush().await?;
            self.needs_flush = false;
            return Ok(());
        }
        let mut n = {
            let slices: Vec<IoSlice<'_>> = self
                .chunks
                .iter()
                .take(MAX_IOVECS)
                .map(|c| IoSlice::new(c))
                .collect();
            writer.write_vectored(&slices).await?
        };
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        self.needs_flush = true;
        while n > 0 {
            let Some(front) = self.chunks.front_mut() else {
                break;
            };
            if n < front.len() {
                front.advance(n);
                break;
            }
            n -= front.len();
            self.chunks.pop_front();
            self.released += self.costs.pop_front().unwrap_or(0);
        }
        Ok(())
    }
}

/// Slices per vectored write (Linux's IOV_MAX is 1024).
const MAX_IOVECS: usize = 64;

/// Any bidirectional byte stream: TCP, Unix, or TLS over either.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

fn is_transient_accept_error(e: &io::Error) -> bool {
    // Out of descriptors or a connection reset before accept: keep serving.
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    ) || matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    )
}

/// One encoded reply: the header bytes and, for reads, the data after it.
#[derive(Debug)]
struct Reply {
    header: BytesMut,
    data: Option<Bytes>,
}

/// Budget charged for any request or error reply besides its data: keeps
/// a flood of small requests from growing memory without bound.
const REQUEST_OVERHEAD: usize = 4096;

/// What a request may hold in memory while it runs and until its reply is
/// sent.
fn request_cost(header: &RequestHeader) -> usize {
    let length = header.length as usize;
    REQUEST_OVERHEAD
        + match header.command {
            Command::Read | Command::Write => length,
            // The read-ahead layer buffers what CACHE asks for.
            Command::Cache => length.min(MAX_PAYLOAD as usize),
            // A reply of up to 1024 extents (8 bytes each).
            Command::BlockStatus => 8 * 1024,
            _ => 0,
        }
}

fn error_reply(negotiated: &Negotiated, header: &RequestHeader, errno: Errno) -> Reply {
    error_reply_with(negotiated, header, errno, "")
}

fn error_reply_with(
    negotiated: &Negotiated,
    header: &RequestHeader,
    errno: Errno,
    message: &str,
) -> Reply {
    let mut out = BytesMut::with_capacity(64 + message.len());
    // Reads and block-status queries must answer in structured form once
    // structured replies are on; other commands use simple replies.
    if negotiated.structured_replies
        && matches!(header.command, Command::Read | Command::BlockStatus)
    {
        encode_structured_error(&mut out, header.cookie, errno, message, true);
    } else {
        encode_simple_reply(&mut out, header.cookie, Some(errno));
    }
    Reply {
        header: out,
        data: None,
    }
}

fn ok_reply(cookie: u64) -> Reply {
    let mut out = BytesMut::with_capacity(16);
    encode_simple_reply(&mut out, cookie, None);
    Reply {
        header: out,
        data: None,
    }
}

/// Executes one validated request and encodes its reply.
async fn handle(
    device: &dyn BlockDevice,
    negotiated: &Negotiated,
    header: RequestHeader,
    payload: Bytes,
) -> Reply {
    let (offset, length) = (header.offset, u64::from(header.length));
    let fua = header.flags.fua();
    let result = match header.command {
        Command::Read => {
            return match device.read(offset, header.length as usize).await {
                Ok(data) => read_reply(negotiated, &header, data),
                Err(e) => fail(negotiated, &header, &e),
            }
        }
        Command::BlockStatus => {
            return match device.extents(offset, length).await {
                Ok(extents) => block_status_reply(negotiated, &header, &extents),
                Err(e) => fail(negotiated, &header, &e),
            }
        }
        Command::Write => device.write(offset, payload, WriteFlags { fua }).await,
        Command::Flush => device.flush().await,
        Command::Trim => device.trim(offset, length, WriteFlags { fua }).await,
        Command::WriteZeroes => {
            let flags = ZeroFlags {
                fua,
                may_trim: !header.flags.no_hole(),
                fast_only: header.flags.fast_zero(),
            };
            device.write_zeroes(offset, length, flags).await
        }
        Command::Cache => device.prefetch(offset, length).await,
        // Rejected by `validate` before a handler is spawned.
        Command::Disc | Command::Unknown(_) => {
            return error_reply(negotiated, &header, Errno::Inval)
        }
    };
    match result {
        Ok(()) => ok_reply(header.cookie),
        Err(e) => fail(negotiated, &header, &e),
    }
}

fn fail(negotiated: &Negotiated, header: &RequestHeader, error: &BlockError) -> Reply {
    tracing::debug!(cookie = header.cookie, error = %error, "request failed");
    error_reply_with(negotiated, header, Errno::from(error), &error.to_string())
}

fn read_reply(negotiated: &Negotiated, header: &RequestHeader, data: Bytes) -> Reply {
    if data.len() != header.length as usize {
        // The reply header promises `length` bytes: a short buffer would
        // desynchronise the whole reply stream.
        tracing::error!(
            cookie = header.cookie,
            expected = header.length,
            got = data.len(),
            "device returned a short read"
        );
        return error_reply_with(negotiated, header, Errno::Io, "short read from the device");
    }
    let mut out = BytesMut::with_capacity(32);
    if negotiated.structured_replies {
        if data.is_empty() {
            encode_structured_none(&mut out, header.cookie);
            return Reply {
                header: out,
                data: None,
            };
        }
        encode_offset_data_header(&mut out, header.cookie, header.offset, header.length, true);
    } else {
        encode_simple_reply(&mut out, header.cookie, None);
    }
    Reply {
        header: out,
        data: Some(data),
    }
}

fn block_status_reply(
    negotiated: &Negotiated,
    header: &RequestHeader,
    extents: &[blockcore::Extent],
) -> Reply {
    let Some(context) = negotiated.base_allocation else {
        return error_reply(negotiated, header, Errno::Inval);
    };
    let mut descriptors: Vec<(u32, u32)> = Vec::with_capacity(extents.len());
    for e in extents {
        let flags = match e.kind {
            ExtentKind::Data => 0,
            ExtentKind::Zero => 2,
            ExtentKind::Hole => 1 | 2,
        };
        // Extents longer than a 32-bit length are split; each piece stays
        // a multiple of the minimum block size.
        let align = u64::from(negotiated.export.device.block_sizes.min.max(1));
        let max_piece = (u64::from(u32::MAX) / align) * align;
        let mut left = e.len;
        while left > 0 {
            let piece = left.min(max_piece);
            descriptors.push((u32::try_from(piece).unwrap_or(u32::MAX), flags));
            left -= piece;
        }
        if header.flags.req_one() && !descriptors.is_empty() {
            descriptors.truncate(1);
            break;
        }
    }
    if descriptors.is_empty() {
        return error_reply_with(negotiated, header, Errno::Inval, "empty block status");
    }
    let mut out = BytesMut::with_capacity(20 + 8 * descriptors.len());
    encode_block_status(&mut out, header.cookie, context, &descriptors, true);
    Reply {
        header: out,
        data: None,
    }
}

#[cfg(test)]
mod tests;

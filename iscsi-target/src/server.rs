//! The tokio shell: accepts connections, runs login, then pumps PDUs
//! between the socket and a [`session::Connection`], executing SCSI
//! commands concurrently on the targets' [`LunMap`]s.
//!
//! One task per connection reads and decodes PDUs, drives the state
//! machine and runs the commands as futures of its own (no task spawn or
//! wake-up per command: a read the page cache answers completes on the
//! spot); a writer task owns the socket's write half so a slow reader never
//! stalls command intake.
//!
//! Targets come and go at run time. A login works against a snapshot of
//! them taken at its first request and is admitted to its target only if
//! that very target is still there; each target's token (a child of the
//! portal's) and tracker let its removal end and wait for exactly its own
//! sessions.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::task_tracker::TaskTrackerToken;
use tokio_util::task::TaskTracker;

use crate::login::{
    Login, LoginConfig, LoginResponse, LoginStep, SessionKind, SessionParams, TargetConfig,
};
use crate::pdu::{self, Framing, InitiatorPdu, PduError, PduSink, SeqNums, TargetPdu};
use crate::scsi::{LunMap, Nexus, Outcome};
use crate::session::{Action, CloseReason, Connection, Limits, Planner, TextAnswer, QUEUE_DEPTH};

/// How often the connection loop looks at the clock (keepalive).
const TICK: Duration = Duration::from_secs(1);
/// How long a reinstated session's old connection gets to go away.
const REINSTATE_TIMEOUT: Duration = Duration::from_secs(10);

/// Login status codes the shell itself decides (RFC 7143 §11.13.5).
const STATUS_TOO_MANY_CONNECTIONS: (u8, u8) = (0x02, 0x06);
const STATUS_SESSION_DOES_NOT_EXIST: (u8, u8) = (0x02, 0x0a);
const STATUS_OUT_OF_RESOURCES: (u8, u8) = (0x03, 0x02);
/// What login answers for a target it does not know
/// ([`crate::login::status::TARGET_NOT_FOUND`]).
const STATUS_TARGET_NOT_FOUND: (u8, u8) = (0x02, 0x03);

/// Errors of the shell.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("malformed PDU: {0}")]
    Pdu(#[from] PduError),
    #[error("the initiator closed the connection")]
    Eof,
    #[error("login failed with status {class:#04x}/{detail:#04x}")]
    LoginFailed { class: u8, detail: u8 },
    #[error("a {0:#04x} PDU arrived during login")]
    NotLogin(u8),
}

/// Errors of adding and removing targets at run time.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("a target named {0:?} already exists")]
    DuplicateTarget(String),
    #[error("no target is named {0:?}")]
    UnknownTarget(String),
}

/// A session's identity: the I_T nexus plus the target (RFC 7143 §4.4.3:
/// sessions are identified by initiator name, ISID and target portal group).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct SessionKey {
    initiator: String,
    isid: [u8; 6],
    target: String,
}

#[derive(Debug)]
struct SessionEntry {
    tsih: u16,
    /// Cancelled to end the session (reinstatement, target removal,
    /// shutdown).
    stop: CancellationToken,
    /// Closed when the session's connection task has finished.
    gone: tokio::sync::watch::Receiver<bool>,
}

/// One target as the portal holds it.
#[derive(Debug)]
struct TargetEntry {
    /// Unique for the portal's lifetime: a login admits its session only
    /// to the very target it authenticated against, not to a same-named
    /// one added after a removal.
    id: u64,
    config: TargetConfig,
    luns: Arc<LunMap>,
    /// Cancelled when the target is removed; a child of the portal's
    /// shutdown token and the parent of each of its sessions' stop tokens.
    stop: CancellationToken,
    /// The target's sessions, so removal can wait for exactly those.
    sessions: TaskTracker,
}

/// The targets, changeable while the portal runs.
#[derive(Debug)]
struct Targets {
    /// Portal-wide login settings; its `targets` is left empty, `entries`
    /// holds them (in the order added, which SendTargets reports).
    base: LoginConfig,
    entries: Vec<TargetEntry>,
    next_id: u64,
}

impl Targets {
    fn push(&mut self, config: TargetConfig, luns: Arc<LunMap>, shutdown: &CancellationToken) {
        self.next_id += 1;
        self.entries.push(TargetEntry {
            id: self.next_id,
            config,
            luns,
            stop: shutdown.child_token(),
            sessions: TaskTracker::new(),
        });
    }

    fn find(&self, name: &str) -> Option<usize> {
        self.entries
            .iter()
            .position(|e| e.config.name.eq_ignore_ascii_case(name))
    }
}

/// The targets as one login sees them.
#[derive(Debug)]
struct Snapshot {
    config: Arc<LoginConfig>,
    /// `ids[i]` is the [`TargetEntry::id`] of `config.targets[i]`.
    ids: Vec<u64>,
}

/// What a normal session holds of its target while it runs.
#[derive(Debug)]
struct Admission {
    luns: Arc<LunMap>,
    /// The session's stop token: a child of the target's.
    stop: CancellationToken,
    /// Keeps the target's removal waiting until the session has ended.
    _hold: TaskTrackerToken,
}

#[derive(Debug)]
struct Inner {
    targets: RwLock<Targets>,
    sessions: Mutex<HashMap<SessionKey, SessionEntry>>,
    next_tsih: AtomicU16,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    /// Connections in full-feature phase of normal sessions, so a task
    /// management function in one can reach the commands of the others.
    peers: Mutex<HashMap<u64, Peer>>,
    next_peer: std::sync::atomic::AtomicU64,
}

/// A connection as other connections see it.
#[derive(Debug)]
struct Peer {
    target: String,
    nexus: Arc<Nexus>,
    control: mpsc::UnboundedSender<Control>,
}

/// What one connection asks of another.
#[derive(Debug)]
enum Control {
    /// Abort, unanswered, the commands on `lun` (all LUNs if `None`).
    Abort { lun: Option<u64> },
}

/// A registered peer; leaves the registry when dropped.
struct PeerGuard<'a> {
    inner: &'a Inner,
    id: u64,
}

impl Drop for PeerGuard<'_> {
    fn drop(&mut self) {
        self.inner
            .peers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.id);
    }
}

impl Inner {
    fn targets(&self) -> std::sync::RwLockReadGuard<'_, Targets> {
        self.targets.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// The login configuration as it stands now (`portals` left to the
    /// caller), with the targets' ids.
    fn login_config(&self) -> (LoginConfig, Vec<u64>) {
        let targets = self.targets();
        let config = LoginConfig {
            targets: targets.entries.iter().map(|t| t.config.clone()).collect(),
            ..targets.base.clone()
        };
        (config, targets.entries.iter().map(|t| t.id).collect())
    }

    /// Admits a session to the target a login chose from `snapshot`, if
    /// that target is still there. Taken under the lock removal takes, so
    /// either removal sees (and ends, and waits for) this session, or the
    /// login sees the target gone.
    fn admit(&self, snapshot: &Snapshot, target: &str) -> Option<Admission> {
        let at = snapshot
            .config
            .targets
            .iter()
            .position(|t| t.name == target)?;
        let id = *snapshot.ids.get(at)?;
        let targets = self.targets();
        let entry = targets.entries.iter().find(|t| t.id == id)?;
        Some(Admission {
            luns: Arc::clone(&entry.luns),
            stop: entry.stop.child_token(),
            _hold: entry.sessions.token(),
        })
    }

    /// Asks the other connections to `target` (those of initiator port
    /// `only`, if given) to abort their commands on `lun`.
    fn abort_elsewhere(&self, target: &str, from: u64, lun: Option<u64>, only: Option<&Nexus>) {
        let peers = self
            .peers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (id, p) in peers.iter() {
            if *id != from && p.target == target && only.is_none_or(|n| *n == *p.nexus) {
                let _ = p.control.send(Control::Abort { lun });
            }
        }
    }
}

/// An iSCSI portal serving a set of targets, which can be added and
/// removed while it runs. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Server {
    inner: Arc<Inner>,
}

/// The targets and their LUNs: the login configuration names each target,
/// `luns` maps each target name to its logical units.
#[derive(Debug)]
pub struct ServerConfig {
    pub login: LoginConfig,
    pub luns: HashMap<String, Arc<LunMap>>,
}

impl Server {
    /// A portal for `config`'s targets. A target without an entry in
    /// `config.luns` has no LUNs; a repeated target name is ignored (login
    /// would only ever find the first).
    pub fn new(config: ServerConfig) -> Server {
        let ServerConfig {
            login: base,
            mut luns,
        } = config;
        let shutdown = CancellationToken::new();
        let mut targets = Targets {
            entries: Vec::new(),
            next_id: 0,
            base: LoginConfig {
                targets: Vec::new(),
                ..base
            },
        };
        for target in base.targets {
            if targets.find(&target.name).is_some() {
                tracing::warn!(target = %target.name, "target configured twice; ignoring the repeat");
                continue;
            }
            let luns = luns
                .remove(&target.name)
                .unwrap_or_else(|| Arc::new(LunMap::new(Vec::new())));
            targets.push(target, luns, &shutdown);
        }
        Server {
            inner: Arc::new(Inner {
                targets: RwLock::new(targets),
                sessions: Mutex::new(HashMap::new()),
                next_tsih: AtomicU16::new(1),
                shutdown,
                tracker: TaskTracker::new(),
                peers: Mutex::new(HashMap::new()),
                next_peer: std::sync::atomic::AtomicU64::new(1),
            }),
        }
    }

    /// Accepts connections until [`Server::shutdown`].
    pub async fn serve(&self, listener: TcpListener) -> io::Result<()> {
        loop {
            let (stream, peer) = tokio::select! {
                () = self.inner.shutdown.cancelled() => return Ok(()),
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of descriptors and the like: keep serving.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let inner = Arc::clone(&self.inner);
            self.inner.tracker.spawn(async move {
                match handle(&inner, stream, peer).await {
                    Ok(()) | Err(ServerError::Eof) => {
                        tracing::debug!(%peer, "iSCSI connection closed");
                    }
                    Err(e) => tracing::info!(%peer, error = %e, "iSCSI connection ended"),
                }
            });
        }
    }

    /// Adds a target with its LUNs: discovery lists it and initiators can
    /// log in to it at once. Names compare without regard to ASCII case, as
    /// login compares them.
    pub fn add_target(&self, target: TargetConfig, luns: Arc<LunMap>) -> Result<(), TargetError> {
        let mut targets = self
            .inner
            .targets
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if targets.find(&target.name).is_some() {
            return Err(TargetError::DuplicateTarget(target.name));
        }
        targets.push(target, luns, &self.inner.shutdown);
        Ok(())
    }

    /// Removes a target without disturbing the others: discovery stops
    /// listing it, new logins to it fail with "target not found", and its
    /// sessions end as at [`Server::shutdown`] (commands already executing
    /// finish on the device first). Waits up to `timeout` for them to end.
    /// The LUNs' devices are not flushed: the caller owns them (an export
    /// may be served over NBD too), and SCSI initiators synchronize the
    /// cache themselves while WCE is set.
    pub async fn remove_target(&self, name: &str, timeout: Duration) -> Result<(), TargetError> {
        let entry = {
            let mut targets = self
                .inner
                .targets
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            let at = targets
                .find(name)
                .ok_or_else(|| TargetError::UnknownTarget(name.to_owned()))?;
            targets.entries.remove(at)
        };
        entry.stop.cancel();
        entry.sessions.close();
        if tokio::time::timeout(timeout, entry.sessions.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                target = %entry.config.name,
                ?timeout,
                open = entry.sessions.len(),
                "sessions to a removed target still open after the timeout"
            );
        }
        Ok(())
    }

    /// The targets' names, in the order they were added.
    pub fn target_names(&self) -> Vec<String> {
        self.inner
            .targets()
            .entries
            .iter()
            .map(|e| e.config.name.clone())
            .collect()
    }

    /// Stops accepting and ends every session.
    pub fn shutdown(&self) {
        self.inner.shutdown.cancel();
    }

    /// Waits up to `timeout` for connections to finish.
    pub async fn drain(&self, timeout: Duration) -> bool {
        self.inner.tracker.close();
        tokio::time::timeout(timeout, self.inner.tracker.wait())
            .await
            .is_ok()
    }
}

/// A SAM LUN field (8 bytes) to a LUN number (SAM-5 §4.7): peripheral
/// device addressing (bus 0) and flat addressing; anything else maps to a
/// LUN that never exists.
pub fn decode_lun(raw: u64) -> u64 {
    let b = raw.to_be_bytes();
    match b[0] >> 6 {
        0 if b[0].trailing_zeros() >= 6 => u64::from(b[1]),
        1 => u64::from(u16::from_be_bytes([b[0] & 0x3f, b[1]])),
        _ => u64::MAX,
    }
}

struct LunPlanner<'a>(&'a LunMap);

impl Planner for LunPlanner<'_> {
    fn shape(&self, lun: u64, cdb: &[u8]) -> Result<crate::scsi::CommandShape, crate::scsi::Sense> {
        self.0.shape(decode_lun(lun), cdb)
    }
}

/// Reads until one PDU is complete.
async fn read_pdu(
    rd: &mut tokio::net::tcp::OwnedReadHalf,
    buf: &mut BytesMut,
    framing: &Framing,
) -> Result<pdu::RawPdu, ServerError> {
    loop {
        if let Some(raw) = pdu::decode(buf, framing)? {
            return Ok(raw);
        }
        buf.reserve(64 * 1024);
        if rd.read_buf(buf).await? == 0 {
            return Err(ServerError::Eof);
        }
    }
}

/// What one connection has encoded and not yet handed to its writer:
/// headers and small segments copied together, large data segments kept
/// by reference (the read's own buffer goes to `writev`).
#[derive(Default)]
struct Outgoing {
    buf: BytesMut,
    chunks: Vec<Bytes>,
}

impl Outgoing {
    /// Below this a data segment is cheaper to copy than to queue.
    const COPY_BELOW: usize = 8192;

    fn take(&mut self) -> Vec<Bytes> {
        if !self.buf.is_empty() {
            self.chunks.push(self.buf.split().freeze());
        }
        std::mem::take(&mut self.chunks)
    }

    fn is_empty(&self) -> bool {
        self.buf.is_empty() && self.chunks.is_empty()
    }
}

impl PduSink for Outgoing {
    fn push_bytes(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    fn push_data(&mut self, data: &Bytes) {
        if data.len() < Self::COPY_BELOW {
            self.buf.extend_from_slice(data);
        } else {
            if !self.buf.is_empty() {
                self.chunks.push(self.buf.split().freeze());
            }
            self.chunks.push(data.clone());
        }
    }
}

/// Slices per `writev` (Linux's IOV_MAX is 1024).
const MAX_IOVECS: usize = 256;

/// Writes what the connection hands it: everything queued goes out in as
/// few `writev` calls as the socket takes.
async fn writer(
    mut wr: OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<Vec<Bytes>>,
) -> io::Result<()> {
    let mut queue: std::collections::VecDeque<Bytes> = std::collections::VecDeque::new();
    while let Some(first) = rx.recv().await {
        queue.extend(first);
        while !queue.is_empty() {
            while let Ok(more) = rx.try_recv() {
                queue.extend(more);
            }
            let slices: Vec<io::IoSlice<'_>> = queue
                .iter()
                .take(MAX_IOVECS)
                .map(|b| io::IoSlice::new(b))
                .collect();
            let mut written = wr.write_vectored(&slices).await?;
            drop(slices);
            if written == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            while written > 0 {
                let front = queue.front_mut().expect("written bytes were queued");
                if written >= front.len() {
                    written -= front.len();
                    queue.pop_front();
                } else {
                    front.advance(written);
                    written = 0;
                }
            }
        }
    }
    wr.shutdown().await
}

async fn handle(
    inner: &Arc<Inner>,
    stream: TcpStream,
    peer: SocketAddr,
) -> Result<(), ServerError> {
    stream.set_nodelay(true)?;
    let local = stream.local_addr()?;
    let (mut rd, wr) = stream.into_split();
    let (tx, rx) = mpsc::unbounded_channel::<Vec<Bytes>>();
    let writer = tokio::spawn(writer(wr, rx));
    let result = run(inner, &mut rd, &tx, local, peer).await;
    drop(tx);
    // Let queued responses (a login reject, a logout response) go out.
    let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
    result
}

fn login_response(r: &LoginResponse, seq: SeqNums) -> TargetPdu {
    TargetPdu::LoginResponse {
        transit: r.transit,
        cont: r.cont,
        csg: r.csg,
        nsg: r.nsg,
        version_max: r.version_max,
        version_active: r.version_active,
        isid: r.isid,
        tsih: r.tsih,
        itt: r.itt,
        status_class: r.status_class,
        status_detail: r.status_detail,
        seq,
        data: Bytes::copy_from_slice(&r.data),
    }
}

fn send(tx: &mpsc::UnboundedSender<Vec<Bytes>>, pdu: &TargetPdu, framing: Framing) {
    let mut out = Outgoing::default();
    pdu.encode_to(&framing, &mut out);
    let _ = tx.send(out.take());
}

/// A registered session: removes itself from the registry when dropped.
struct Registration<'a> {
    inner: &'a Inner,
    key: SessionKey,
    tsih: u16,
    _gone: tokio::sync::watch::Sender<bool>,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        let mut sessions = self
            .inner
            .sessions
            .lock()
            .expect("session registry poisoned");
        if sessions.get(&self.key).is_some_and(|e| e.tsih == self.tsih) {
            sessions.remove(&self.key);
        }
    }
}

/// Assigns a TSIH to a new session, reinstating (ending) an older session
/// of the same I_T nexus (§6.3.5). Returns the status to fail with, if any.
async fn register<'a>(
    inner: &'a Inner,
    key: SessionKey,
    requested_tsih: u16,
    stop: &CancellationToken,
) -> Result<Registration<'a>, (u8, u8)> {
    if requested_tsih != 0 {
        // Adding a connection to a live session: we negotiate
        // MaxConnections=1, so that session has its one connection.
        let sessions = inner.sessions.lock().expect("session registry poisoned");
        return Err(if sessions.values().any(|e| e.tsih == requested_tsih) {
            STATUS_TOO_MANY_CONNECTIONS
        } else {
            STATUS_SESSION_DOES_NOT_EXIST
        });
    }
    let old = inner
        .sessions
        .lock()
        .expect("session registry poisoned")
        .remove(&key);
    if let Some(old) = old {
        tracing::info!(initiator = %key.initiator, target = %key.target, tsih = old.tsih, "reinstating session");
        old.stop.cancel();
        let mut gone = old.gone;
        let _ = tokio::time::timeout(REINSTATE_TIMEOUT, gone.wait_for(|g| *g)).await;
    }
    let (gone_tx, gone_rx) = tokio::sync::watch::channel(false);
    let mut sessions = inner.sessions.lock().expect("session registry poisoned");
    let mut tsih = 0;
    for _ in 0..=u16::MAX {
        let t = inner.next_tsih.fetch_add(1, Ordering::Relaxed);
        if t != 0 && !sessions.values().any(|e| e.tsih == t) {
            tsih = t;
            break;
        }
    }
    if tsih == 0 {
        return Err(STATUS_OUT_OF_RESOURCES);
    }
    sessions.insert(
        key.clone(),
        SessionEntry {
            tsih,
            stop: stop.clone(),
            gone: gone_rx,
        },
    );
    Ok(Registration {
        inner,
        key,
        tsih,
        _gone: gone_tx,
    })
}

async fn run(
    inner: &Arc<Inner>,
    rd: &mut tokio::net::tcp::OwnedReadHalf,
    tx: &mpsc::UnboundedSender<Vec<Bytes>>,
    local: SocketAddr,
    peer: SocketAddr,
) -> Result<(), ServerError> {
    // Set up at the first Login Request, so the login sees the targets as
    // they are then rather than when the connection was accepted.
    let mut started: Option<(Snapshot, Login)> = None;
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let stop = inner.shutdown.child_token();
    let mut stat_sn: u32 = 1;

    // Login phase: plain framing, one response per request.
    let (config, session, admission, registration, exp_cmd_sn) = loop {
        let raw = tokio::select! {
            () = stop.cancelled() => return Ok(()),
            raw = read_pdu(rd, &mut buf, &Framing::LOGIN) => raw?,
        };
        let bhs = raw.bhs;
        let InitiatorPdu::Login(req) = InitiatorPdu::parse(raw)? else {
            return Err(ServerError::NotLogin(bhs[0] & 0x3f));
        };
        let (snapshot, login) = started.get_or_insert_with(|| {
            let (mut config, ids) = inner.login_config();
            // SendTargets answers with the address this initiator reached
            // us on.
            config.portals = vec![format!("{local},{}", config.portal_group_tag)];
            let config = Arc::new(config);
            let login = Login::new(Arc::clone(&config));
            (Snapshot { config, ids }, login)
        });
        let window = |cmdsn: u32| SeqNums {
            stat_sn,
            exp_cmd_sn: cmdsn,
            max_cmd_sn: cmdsn.wrapping_add(QUEUE_DEPTH - 1),
        };
        match login.step(&req) {
            LoginStep::Continue(r) => {
                send(tx, &login_response(&r, window(req.cmdsn)), Framing::LOGIN);
                stat_sn = stat_sn.wrapping_add(1);
            }
            LoginStep::Fail(r) => {
                send(tx, &login_response(&r, window(req.cmdsn)), Framing::LOGIN);
                tracing::info!(%peer, class = r.status_class, detail = r.status_detail, "login refused");
                return Err(ServerError::LoginFailed {
                    class: r.status_class,
                    detail: r.status_detail,
                });
            }
            LoginStep::Complete {
                mut response,
                session,
            } => {
                let refuse = |mut response: LoginResponse, (class, detail): (u8, u8)| {
                    response.transit = false;
                    response.status_class = class;
                    response.status_detail = detail;
                    response.data.clear();
                    send(
                        tx,
                        &login_response(&response, window(req.cmdsn)),
                        Framing::LOGIN,
                    );
                    ServerError::LoginFailed { class, detail }
                };
                // The login ran against a snapshot: the target may have been
                // removed since.
                let (target, admission) = match &session.kind {
                    SessionKind::Discovery => (String::new(), None),
                    SessionKind::Normal { target } => match inner.admit(snapshot, target) {
                        Some(admission) => (target.clone(), Some(admission)),
                        None => return Err(refuse(response, STATUS_TARGET_NOT_FOUND)),
                    },
                };
                let key = SessionKey {
                    initiator: session.initiator_name.clone(),
                    isid: session.isid,
                    target,
                };
                let session_stop = admission.as_ref().map_or(&stop, |a| &a.stop);
                match register(inner, key, session.requested_tsih, session_stop).await {
                    Ok(reg) => {
                        response.tsih = reg.tsih;
                        send(
                            tx,
                            &login_response(&response, window(req.cmdsn)),
                            Framing::LOGIN,
                        );
                        stat_sn = stat_sn.wrapping_add(1);
                        let config = Arc::clone(&snapshot.config);
                        break (config, session, admission, reg, req.cmdsn);
                    }
                    Err(status) => return Err(refuse(response, status)),
                }
            }
        }
    };
    let (luns, session_stop) = match &admission {
        Some(a) => (Arc::clone(&a.luns), a.stop.clone()),
        None => (Arc::new(LunMap::new(Vec::new())), stop.clone()),
    };
    full_feature(
        inner,
        rd,
        tx,
        buf,
        &config,
        session,
        luns,
        stat_sn,
        exp_cmd_sn,
        &session_stop,
    )
    .await?;
    drop(registration);
    // Only now may the target's removal finish waiting.
    drop(admission);
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn full_feature(
    inner: &Arc<Inner>,
    rd: &mut tokio::net::tcp::OwnedReadHalf,
    tx: &mpsc::UnboundedSender<Vec<Bytes>>,
    mut buf: BytesMut,
    config: &Arc<LoginConfig>,
    session: SessionParams,
    luns: Arc<LunMap>,
    stat_sn: u32,
    exp_cmd_sn: u32,
    stop: &CancellationToken,
) -> Result<(), ServerError> {
    let n = &session.negotiated;
    let framing = Framing {
        header_digest: n.header_digest,
        data_digest: n.data_digest,
        max_recv_data_segment: n.max_recv_data_segment,
    };
    let limits = Limits {
        max_send_data_segment: n.max_send_data_segment,
        max_recv_data_segment: n.max_recv_data_segment,
        first_burst_length: n.first_burst_length,
        max_burst_length: n.max_burst_length,
        immediate_data: n.immediate_data,
        initial_r2t: n.initial_r2t,
        max_outstanding_r2t: n.max_outstanding_r2t,
    };
    let (discovery, target) = match &session.kind {
        SessionKind::Discovery => (true, String::new()),
        SessionKind::Normal { target } => (false, target.clone()),
    };
    let nexus = Arc::new(Nexus {
        initiator_name: session.initiator_name.clone(),
        isid: session.isid,
        tpgt: config.portal_group_tag,
    });
    let (control_tx, mut control) = mpsc::unbounded_channel::<Control>();
    let peer_id = inner.next_peer.fetch_add(1, Ordering::Relaxed);
    let _peer = (!discovery).then(|| {
        inner
            .peers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(
                peer_id,
                Peer {
                    target: target.clone(),
                    nexus: Arc::clone(&nexus),
                    control: control_tx,
                },
            );
        PeerGuard { inner, id: peer_id }
    });
    // Each Text Request sees the targets as they are then: a discovery
    // session may outlive targets added or removed since its login.
    let text_inner = Arc::clone(inner);
    let portals = config.portals.clone();
    let mut text_session = session.clone();
    let responder = Box::new(move |req: &[u8]| {
        let before = text_session.negotiated.max_send_data_segment;
        let text_config = LoginConfig {
            portals: portals.clone(),
            ..text_inner.login_config().0
        };
        match crate::text::answer_text_update(&text_config, &mut text_session, req) {
            Ok(data) => {
                let after = text_session.negotiated.max_send_data_segment;
                TextAnswer::Reply {
                    data,
                    max_send_data_segment: (after != before).then_some(after),
                }
            }
            Err(_) => TextAnswer::Malformed,
        }
    });
    let mut conn = Connection::new(
        limits,
        discovery,
        stat_sn,
        exp_cmd_sn,
        responder,
        Instant::now(),
    );
    // Commands run as futures of this task, polled with the socket: a read
    // the page cache answers completes on the spot and its reply joins the
    // next write, with no task spawn or cross-thread wake-up per command
    // (slow I/O still overlaps: the file engine is asynchronous).
    let mut running: FuturesUnordered<BoxFuture<'static, (u32, Outcome)>> = FuturesUnordered::new();
    let mut tick = tokio::time::interval(TICK);
    let mut out = Outgoing::default();

    let outcome = 'session: loop {
        tokio::select! {
            () = stop.cancelled() => break 'session Ok(()),
            read = rd.read_buf(&mut buf) => {
                if read? == 0 {
                    break 'session Err(ServerError::Eof);
                }
                loop {
                    match pdu::decode(&mut buf, &framing) {
                        Ok(Some(raw)) => {
                            let bhs = raw.bhs;
                            tracing::trace!(
                                opcode = bhs[0] & 0x3f,
                                flags = bhs[1],
                                itt = u32::from_be_bytes([bhs[16], bhs[17], bhs[18], bhs[19]]),
                                data = raw.data.len(),
                                "PDU"
                            );
                            match InitiatorPdu::parse(raw) {
                                Ok(p) => conn.receive(p, &bhs, &LunPlanner(&luns), Instant::now()),
                                Err(e) => {
                                    conn.reject(pdu::reject_reason::PROTOCOL_ERROR, bhs);
                                    drain_sends(&mut conn, &mut out, framing);
                                    flush(tx, &mut out);
                                    break 'session Err(e.into());
                                }
                            }
                        }
                        Ok(None) => break,
                        Err(PduError::DataDigest { bhs, .. }) => {
                            // §7.8: reject it; at error recovery level 0
                            // the task cannot be recovered, so the
                            // connection ends.
                            conn.reject(pdu::reject_reason::DATA_DIGEST_ERROR, *bhs);
                            drain_sends(&mut conn, &mut out, framing);
                            flush(tx, &mut out);
                            break 'session Err(PduError::DataDigest { opcode: bhs[0] & 0x3f, bhs }.into());
                        }
                        Err(e) => break 'session Err(e.into()),
                    }
                }
            }
            Some((itt, outcome)) = running.next(), if !running.is_empty() => {
                conn.complete(itt, outcome);
                while let Some(Some((itt, outcome))) = running.next().now_or_never() {
                    conn.complete(itt, outcome);
                }
                // A PREEMPT AND ABORT among them aborts the preempted
                // initiators' commands, in whichever session they are.
                for (lun, preempted) in luns.take_preempted() {
                    inner.abort_elsewhere(&target, peer_id, Some(lun), Some(&preempted));
                }
            }
            Some(Control::Abort { lun }) = control.recv() => {
                conn.abort_tasks(|raw| lun.is_none_or(|l| decode_lun(raw) == l));
            }
            _ = tick.tick() => conn.tick(Instant::now()),
        }
        while let Some(action) = conn.poll_action() {
            match action {
                Action::Send(pdu) => pdu.encode_to(&framing, &mut out),
                Action::Execute {
                    itt,
                    lun,
                    cdb,
                    data_out,
                } => {
                    let luns = Arc::clone(&luns);
                    let nexus = Arc::clone(&nexus);
                    running.push(Box::pin(async move {
                        let outcome = luns.execute(&nexus, decode_lun(lun), &cdb, data_out).await;
                        (itt, outcome)
                    }));
                }
                Action::Reset { lun, kind } => {
                    let lun = lun.map(decode_lun);
                    luns.reset(lun, kind);
                    // The reset clears the task set of every initiator.
                    inner.abort_elsewhere(&target, peer_id, lun, None);
                }
                Action::Close(reason) => {
                    flush(tx, &mut out);
                    match reason {
                        CloseReason::Logout | CloseReason::ColdReset => break 'session Ok(()),
                        CloseReason::KeepaliveTimeout => {
                            tracing::info!(initiator = %nexus.initiator_name, "no answer to NOP-In: closing");
                            break 'session Ok(());
                        }
                        CloseReason::ProtocolError(why) => {
                            tracing::info!(initiator = %nexus.initiator_name, %why, "protocol error: closing");
                            break 'session Ok(());
                        }
                    }
                }
            }
        }
        flush(tx, &mut out);
    };
    // The nexus is gone: commands still executing finish (a write that
    // reached the device is not torn), their answers go nowhere.
    let _ = tokio::time::timeout(Duration::from_secs(30), async {
        while running.next().await.is_some() {}
    })
    .await;
    if !discovery {
        luns.nexus_lost(&nexus);
    }
    outcome
}

fn drain_sends(conn: &mut Connection, out: &mut Outgoing, framing: Framing) {
    while let Some(action) = conn.poll_action() {
        if let Action::Send(pdu) = action {
            pdu.encode_to(&framing, out);
        }
    }
}

fn flush(tx: &mpsc::UnboundedSender<Vec<Bytes>>, out: &mut Outgoing) {
    if !out.is_empty() {
        let _ = tx.send(out.take());
    }
}

#[cfg(test)]
mod tests {
    use super::decode_lun;

    #[test]
    fn lun_addressing_methods() {
        assert_eq!(decode_lun(0), 0);
        assert_eq!(decode_lun(1 << 48), 1);
        assert_eq!(decode_lun(0x4001_0000_0000_0000), 1);
        assert_eq!(decode_lun(0x4101_0000_0000_0000), 0x101);
        assert_eq!(decode_lun(0x0101_0000_0000_0000), u64::MAX);
        assert_eq!(decode_lun(0xc000_0000_0000_0000), u64::MAX);
    }
}

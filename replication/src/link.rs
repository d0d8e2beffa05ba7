//! The tokio shell around [`crate::proto`]: one connection's reader and
//! writer tasks, and the handshake both ends run.
//!
//! ```text
//!   LinkSender::send(id, class, msg) ──> writer task: Scheduler ──> socket
//!                                              ^ on_credit
//!   socket ──> reader task: Decoder ──> Credit? ─┘
//!                  │  background frames counted by the CreditGranter,
//!                  │  which grants more as the consumer takes them
//!                  v
//!             LinkReceiver::recv() -> Incoming
//! ```
//!
//! The writer asks the scheduler for frames only when it is about to write,
//! and writes at most [`WRITE_BATCH`] bytes at a time, so a demand frame
//! queued while a prefetch streams waits for at most one background frame.
//! Either task ending (socket error, EOF, protocol error, [`LinkSender::close`])
//! ends the other: the receiver then yields `None`.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, Notify};

use crate::proto::{
    self, auth_proof, verify_auth_proof, Class, CreditGranter, Decoder, ErrorCode, FrameHeader,
    Message, ProtoError, Role, Scheduler, SchedulerConfig,
};

/// Bytes the writer gathers into one socket write.
pub const WRITE_BATCH: usize = 256 << 10;
/// Frames waiting in the receiver's channel; the reader stops reading the
/// socket when it is full (back-pressure to the peer through TCP).
const INCOMING_DEPTH: usize = 256;
/// How long a handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of a link.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("link I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("link protocol: {0}")]
    Proto(#[from] ProtoError),
    #[error("the link is closed")]
    Closed,
    #[error("link handshake: {0}")]
    Handshake(String),
    #[error("the peer answered out of protocol: {0}")]
    Unexpected(String),
    #[error("the peer refused: {code:?}: {message}")]
    Refused { code: ErrorCode, message: String },
    #[error("timed out after {0:?}")]
    Timeout(Duration),
}

/// A decoded frame from the peer.
#[derive(Debug)]
pub struct Incoming {
    pub header: FrameHeader,
    pub msg: Message,
}

enum Command {
    Send(u64, Class, Message),
    Credit(u64),
}

/// Background bytes queued in the writer (including those sent but not
/// yet taken by it), for senders that must not run ahead of the link.
#[derive(Debug, Default)]
struct Backlog {
    bytes: std::sync::atomic::AtomicU64,
    drained: Notify,
}

/// The sending half of a link; cheap to clone.
#[derive(Clone, Debug)]
pub struct LinkSender {
    tx: mpsc::UnboundedSender<Command>,
    closed: Arc<Notify>,
    backlog: Arc<Backlog>,
}

impl LinkSender {
    /// Queues a message. Fails only once the link is closed.
    pub fn send(&self, id: u64, class: Class, msg: Message) -> Result<(), LinkError> {
        if class == Class::Background {
            self.backlog.bytes.fetch_add(
                msg.payload_len() as u64,
                std::sync::atomic::Ordering::AcqRel,
            );
        }
        self.tx
            .send(Command::Send(id, class, msg))
            .map_err(|_| LinkError::Closed)
    }

    /// Waits until fewer than `limit` background bytes are queued, so a
    /// long stream (a prefetch of a whole disk) holds at most about `limit`
    /// bytes in memory. Returns an error once the link is closed.
    pub async fn background_room(&self, limit: u64) -> Result<(), LinkError> {
        loop {
            let drained = self.backlog.drained.notified();
            if self.tx.is_closed() {
                return Err(LinkError::Closed);
            }
            if self
                .backlog
                .bytes
                .load(std::sync::atomic::Ordering::Acquire)
                < limit
            {
                return Ok(());
            }
            tokio::select! {
                () = drained => {}
                () = self.tx.closed() => return Err(LinkError::Closed),
            }
        }
    }

    /// Closes the link: both tasks stop, queued frames are dropped.
    pub fn close(&self) {
        self.closed.notify_waiters();
        self.closed.notify_one();
    }

    /// Whether the writer has stopped.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// The receiving half of a link.
#[derive(Debug)]
pub struct LinkReceiver {
    rx: mpsc::Receiver<Incoming>,
}

impl LinkReceiver {
    /// The next frame, or `None` once the link is closed.
    pub async fn recv(&mut self) -> Option<Incoming> {
        self.rx.recv().await
    }
}

/// Starts the reader and writer tasks of a connection. `window` is the
/// background credit this end grants the peer.
pub fn spawn<S>(stream: S, config: SchedulerConfig, window: u64) -> (LinkSender, LinkReceiver)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (read, write) = tokio::io::split(stream);
    let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
    let (in_tx, in_rx) = mpsc::channel(INCOMING_DEPTH);
    let closed = Arc::new(Notify::new());
    let backlog = Arc::new(Backlog::default());
    let sender = LinkSender {
        tx: cmd_tx.clone(),
        closed: closed.clone(),
        backlog: backlog.clone(),
    };
    let writer_closed = closed.clone();
    tokio::spawn(async move {
        tokio::select! {
            r = writer(write, cmd_rx, config, &backlog) => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "link writer stopped");
                }
            }
            () = writer_closed.notified() => {}
        }
        writer_closed.notify_waiters();
        writer_closed.notify_one();
    });
    tokio::spawn(async move {
        tokio::select! {
            r = reader(read, cmd_tx, in_tx, window) => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "link reader stopped");
                }
            }
            () = closed.notified() => {}
        }
        closed.notify_waiters();
        closed.notify_one();
    });
    (sender, LinkReceiver { rx: in_rx })
}

async fn writer<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: mpsc::UnboundedReceiver<Command>,
    config: SchedulerConfig,
    backlog: &Backlog,
) -> Result<(), LinkError> {
    let mut sched = Scheduler::new(config);
    let mut buf = BytesMut::with_capacity(WRITE_BATCH);
    loop {
        // Take everything queued so far, so priorities apply across it.
        loop {
            match rx.try_recv() {
                Ok(cmd) => apply(&mut sched, cmd, backlog)?,
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => return Ok(()),
            }
        }
        while buf.len() < WRITE_BATCH {
            match sched.poll_transmit() {
                Some(t) => {
                    if t.header.class == Class::Background {
                        sub(&backlog.bytes, t.frame.len() as u64);
                        backlog.drained.notify_waiters();
                    }
                    buf.extend_from_slice(&t.frame);
                }
                None => break,
            }
        }
        if buf.is_empty() {
            match rx.recv().await {
                Some(cmd) => apply(&mut sched, cmd, backlog)?,
                None => return Ok(()),
            }
            continue;
        }
        w.write_all(&buf).await?;
        buf.clear();
        if sched.is_empty() || sched.is_blocked_on_credit() {
            w.flush().await?;
        }
    }
}

fn sub(a: &std::sync::atomic::AtomicU64, n: u64) {
    let _ = a.fetch_update(
        std::sync::atomic::Ordering::AcqRel,
        std::sync::atomic::Ordering::Acquire,
        |v| Some(v.saturating_sub(n)),
    );
}

fn apply(sched: &mut Scheduler, cmd: Command, backlog: &Backlog) -> Result<(), LinkError> {
    match cmd {
        Command::Send(id, class, msg) => {
            // The backlog counted the payload; from here on it counts the
            // encoded frames the scheduler holds.
            let raw = msg.payload_len() as u64;
            let before = sched.queued_bytes(Class::Background) as u64;
            sched.queue(id, class, msg)?;
            if class == Class::Background {
                let added = sched.queued_bytes(Class::Background) as u64 - before;
                sub(&backlog.bytes, raw);
                backlog
                    .bytes
                    .fetch_add(added, std::sync::atomic::Ordering::AcqRel);
                backlog.drained.notify_waiters();
            }
        }
        Command::Credit(bytes) => sched.on_credit(bytes),
    }
    Ok(())
}

async fn reader<R: AsyncRead + Unpin>(
    mut r: R,
    cmd: mpsc::UnboundedSender<Command>,
    out: mpsc::Sender<Incoming>,
    window: u64,
) -> Result<(), LinkError> {
    let mut decoder = Decoder::new();
    let mut granter = CreditGranter::new(window);
    let mut buf = BytesMut::with_capacity(256 << 10);
    let grant = |granter: &mut CreditGranter| -> Result<(), LinkError> {
        if let Some(bytes) = granter.poll_grant() {
            cmd.send(Command::Send(0, Class::Demand, Message::Credit { bytes }))
                .map_err(|_| LinkError::Closed)?;
        }
        Ok(())
    };
    grant(&mut granter)?;
    loop {
        while let Some((header, msg)) = decoder.decode(&mut buf)? {
            if let Message::Credit { bytes } = msg {
                cmd.send(Command::Credit(bytes))
                    .map_err(|_| LinkError::Closed)?;
                continue;
            }
            let background = header.class == Class::Background;
            if background {
                granter.on_received(header.wire_len as u64)?;
            }
            let wire_len = header.wire_len as u64;
            out.send(Incoming { header, msg })
                .await
                .map_err(|_| LinkError::Closed)?;
            // Handed over: the bounded channel is the consumer's buffer.
            if background {
                granter.on_consumed(wire_len);
                grant(&mut granter)?;
            }
        }
        if buf.capacity() - buf.len() < 64 << 10 {
            buf.reserve(256 << 10);
        }
        if r.read_buf(&mut buf).await? == 0 {
            return if buf.is_empty() {
                Ok(())
            } else {
                Err(LinkError::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the peer closed inside a frame",
                )))
            };
        }
    }
}

/// Random bytes for nonces and keys.
pub fn random<const N: usize>() -> [u8; N] {
    use ring::rand::{SecureRandom, SystemRandom};
    let mut out = [0u8; N];
    SystemRandom::new()
        .fill(&mut out)
        .expect("the system random number generator failed");
    out
}

/// Runs the symmetric handshake: `Hello` both ways, then, with a
/// pre-shared key, `Auth` both ways (each side proves it holds the key,
/// bound to both nonces and its role). Returns the peer's role.
pub async fn handshake(
    tx: &LinkSender,
    rx: &mut LinkReceiver,
    role: Role,
    psk: Option<&[u8; 32]>,
) -> Result<(), LinkError> {
    let run = async {
        let nonce: [u8; 32] = random();
        tx.send(
            0,
            Class::Demand,
            Message::Hello {
                version: proto::PROTOCOL_VERSION,
                role,
                nonce,
            },
        )?;
        let peer_role = match role {
            Role::Edge => Role::Origin,
            Role::Origin => Role::Edge,
        };
        let peer_nonce = match rx.recv().await.ok_or(LinkError::Closed)?.msg {
            Message::Hello {
                version,
                role: r,
                nonce,
            } => {
                if version != proto::PROTOCOL_VERSION {
                    return Err(LinkError::Handshake(format!(
                        "peer speaks protocol version {version}, this build {}",
                        proto::PROTOCOL_VERSION
                    )));
                }
                if r != peer_role {
                    return Err(LinkError::Handshake(format!(
                        "peer says it is {r:?}, expected {peer_role:?}"
                    )));
                }
                nonce
            }
            Message::Error { code, message } => return Err(LinkError::Refused { code, message }),
            other => {
                return Err(LinkError::Handshake(format!(
                    "expected Hello, got {:?}",
                    other.kind()
                )))
            }
        };
        if let Some(psk) = psk {
            tx.send(
                0,
                Class::Demand,
                Message::Auth {
                    proof: auth_proof(psk, role, &nonce, &peer_nonce),
                },
            )?;
            match rx.recv().await.ok_or(LinkError::Closed)?.msg {
                Message::Auth { proof }
                    if verify_auth_proof(psk, peer_role, &peer_nonce, &nonce, &proof) => {}
                Message::Auth { .. } => {
                    let _ = tx.send(
                        0,
                        Class::Demand,
                        Message::Error {
                            code: ErrorCode::AuthFailed,
                            message: "wrong pre-shared key".into(),
                        },
                    );
                    return Err(LinkError::Handshake(
                        "the peer does not hold the pre-shared key".into(),
                    ));
                }
                Message::Error { code, message } => {
                    return Err(LinkError::Refused { code, message })
                }
                other => {
                    return Err(LinkError::Handshake(format!(
                        "expected Auth, got {:?}",
                        other.kind()
                    )))
                }
            }
        }
        Ok(())
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, run)
        .await
        .map_err(|_| LinkError::Timeout(HANDSHAKE_TIMEOUT))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn pair() -> ((LinkSender, LinkReceiver), (LinkSender, LinkReceiver)) {
        let (a, b) = tokio::io::duplex(64 << 10);
        let cfg = SchedulerConfig::default();
        (spawn(a, cfg, 8 << 20), spawn(b, cfg, 8 << 20))
    }

    #[tokio::test]
    async fn handshake_with_and_without_a_key() {
        let ((etx, mut erx), (otx, mut orx)) = pair();
        let key = [7u8; 32];
        let (e, o) = tokio::join!(
            handshake(&etx, &mut erx, Role::Edge, Some(&key)),
            handshake(&otx, &mut orx, Role::Origin, Some(&key)),
        );
        e.unwrap();
        o.unwrap();

        let ((etx, mut erx), (otx, mut orx)) = pair();
        let (e, o) = tokio::join!(
            handshake(&etx, &mut erx, Role::Edge, Some(&[1u8; 32])),
            handshake(&otx, &mut orx, Role::Origin, Some(&[2u8; 32])),
        );
        assert!(e.is_err() && o.is_err());

        let ((etx, mut erx), (otx, mut orx)) = pair();
        let (e, o) = tokio::join!(
            handshake(&etx, &mut erx, Role::Edge, None),
            handshake(&otx, &mut orx, Role::Edge, None),
        );
        assert!(e.is_err() && o.is_err(), "two edges must not pair");
    }

    #[tokio::test]
    async fn demand_overtakes_a_background_stream_and_credit_flows() {
        let ((etx, mut erx), (otx, _orx)) = pair();
        // 32 MiB of background pushes: four times the credit window, so it
        // only completes if the receiver's grants reach the sender.
        let data = Bytes::from(vec![0x5a; 32 << 20]);
        otx.send(9, Class::Background, Message::Push { offset: 0, data })
            .unwrap();
        otx.send(
            10,
            Class::Demand,
            Message::ReadData {
                offset: 1,
                data: Bytes::from_static(b"demand"),
            },
        )
        .unwrap();
        let mut pushed = 0;
        let mut demand_at = None;
        let mut frames = 0;
        while pushed < 32 << 20 {
            let f = erx.recv().await.unwrap();
            frames += 1;
            match f.msg {
                Message::Push { data, .. } => pushed += data.len(),
                Message::ReadData { .. } => demand_at = Some(frames),
                other => panic!("{other:?}"),
            }
        }
        let demand_at = demand_at.unwrap_or_else(|| {
            // Not yet seen: it must come next at the latest.
            frames + 1
        });
        assert!(demand_at <= 3, "demand frame arrived as frame {demand_at}");
        drop(etx);
    }
}

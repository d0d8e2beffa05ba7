//! The origin's tokio shell: accepts edges and drives one
//! [`OriginSession`] per connection. It only moves bytes, runs timers and
//! runs the session's operations as tasks whose completions it feeds back.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use link::io::{gather, now, random, sleep_until, ConnIo};
use link::proto::ErrorCode;
use link::session::{OriginOp, OriginSession, ReadAnswer, Refusal};
use link::LinkError;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::{Origin, ReadSpec, Volume};

pub use tokio_rustls::TlsAcceptor;

/// How long the TLS handshake may take.
const TLS_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a closing connection may take to send its last frames (an
/// error saying why).
const CLOSE_FLUSH: Duration = Duration::from_secs(1);

/// Accepts edges on `listener` until the task is dropped, each connection
/// in its own task (over TLS when `tls` is given).
pub async fn serve(
    origin: Arc<Origin>,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
) -> std::io::Result<()> {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off rather than spin.
                tracing::warn!(error = %e, "accepting an edge failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let origin = origin.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            tracing::info!(%peer, "edge connected");
            let result = match tls {
                Some(acceptor) => {
                    match tokio::time::timeout(TLS_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(s)) => serve_connection(&origin, s).await,
                        Ok(Err(e)) => {
                            tracing::warn!(%peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::warn!(%peer, "TLS handshake timed out");
                            return;
                        }
                    }
                }
                None => serve_connection(&origin, stream).await,
            };
            match result {
                Ok(()) => tracing::info!(%peer, "edge disconnected"),
                Err(e) => tracing::warn!(%peer, error = %e, "edge connection ended"),
            }
        });
    }
}

/// What a finished operation reports back to the connection's driver.
enum Done {
    Read(u64, Result<ReadAnswer, Refusal>),
    Apply(u64, Result<(), Refusal>),
    Extents(u64, Result<Vec<blockcore::Extent>, Refusal>),
    Profile(u64, Result<(), Refusal>),
    Plan(u64, Result<Vec<(u64, u32)>, Refusal>),
    Sign(u64, Result<Vec<[u8; 32]>, Refusal>),
    Release(Result<(), Refusal>),
    Files(Arc<prefetch::layout::FileIndex>),
}

/// Counts a connection as active while it lives.
struct Active<'a>(&'a Origin);

impl<'a> Active<'a> {
    fn new(origin: &'a Origin) -> Self {
        origin
            .stats
            .connections_active
            .fetch_add(1, Ordering::Relaxed);
        Active(origin)
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0
            .stats
            .connections_active
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves one edge connection until it closes.
pub async fn serve_connection<S>(origin: &Arc<Origin>, stream: S) -> Result<(), LinkError>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let conn = origin.new_connection();
    let _active = Active::new(origin);
    let mut fences = origin.fence_changes();
    let mut session = OriginSession::new(origin.config.session.clone(), now(), random());
    let mut io = ConnIo::spawn(stream);
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Done>();
    // The volume attached, its signer, and the edge's id.
    let mut volume: Option<(Arc<Volume>, crate::Signer, String)> = None;
    let result = loop {
        // Operations first: they may queue frames.
        let mut closed = None;
        while let Some(op) = session.poll_op() {
            match op {
                OriginOp::Attach {
                    volume: name,
                    edge_id,
                    ..
                } => match origin.attach(conn, &name, &edge_id) {
                    Ok((v, grant)) => {
                        let signer = origin.signer(&edge_id);
                        // Mapped beside the attach, not before it: until
                        // the map is there, reads push fixed groups.
                        let (o, vol, done) = (origin.clone(), v.clone(), done_tx.clone());
                        tokio::spawn(async move {
                            let files = o.files(&vol).await;
                            let _ = done.send(Done::Files(files.index.clone()));
                        });
                        volume = Some((v, signer, edge_id));
                        session.attach_done(Ok(grant));
                    }
                    Err(r) => session.attach_done(Err(r)),
                },
                OriginOp::Read {
                    tag,
                    offset,
                    len,
                    want_signatures,
                    push,
                } => {
                    let Some((v, signer, _)) = volume.clone() else {
                        continue;
                    };
                    let (origin, done) = (origin.clone(), done_tx.clone());
                    tokio::spawn(async move {
                        let spec = ReadSpec {
                            offset,
                            len,
                            want_signatures,
                            push,
                        };
                        let r = origin.read(conn, &v, spec, Some(&signer)).await;
                        let _ = done.send(Done::Read(tag, r));
                    });
                }
                OriginOp::Apply { seq, entries } => {
                    let Some((v, _, _)) = volume.clone() else {
                        continue;
                    };
                    let (origin, done) = (origin.clone(), done_tx.clone());
                    tokio::spawn(async move {
                        let r = origin.apply(conn, &v, seq, entries).await.map(|_| ());
                        let _ = done.send(Done::Apply(seq, r));
                    });
                }
                OriginOp::Extents { tag, offset, len } => {
                    let Some((v, _, _)) = volume.clone() else {
                        continue;
                    };
                    let (origin, done) = (origin.clone(), done_tx.clone());
                    tokio::spawn(async move {
                        let r = origin.extents(conn, &v, offset, len).await;
                        let _ = done.send(Done::Extents(tag, r));
                    });
                }
                OriginOp::Sign {
                    tag,
                    offset,
                    len,
                    block,
                } => {
                    let Some((v, _, _)) = volume.clone() else {
                        continue;
                    };
                    let (origin, done) = (origin.clone(), done_tx.clone());
                    tokio::spawn(async move {
                        let r = origin.sign(conn, &v, offset, len, block).await;
                        let _ = done.send(Done::Sign(tag, r));
                    });
                }
                OriginOp::StoreProfile { tag, data } => {
                    let Some((v, _, _)) = volume.clone() else {
                        continue;
                    };
                    let (origin, done) = (origin.clone(), done_tx.clone());
                    tokio::spawn(async move {
                        let r = origin.store_profile(&v, data).await;
                        let _ = done.send(Done::Profile(tag, r));
                    });
                }
                OriginOp::Plan { tag, budget } => {
                    let Some((v, _, _)) = volume.clone() else {
                        continue;
                    };
                    let (origin, done) = (origin.clone(), done_tx.clone());
                    tokio::spawn(async move {
                        let r = origin.plan(&v, budget).await;
                        let _ = done.send(Done::Plan(tag, r));
                    });
                }
                OriginOp::Detach => {
                    if let Some((v, _, _)) = volume.take() {
                        origin.release(conn, &v, session.take_partial());
                    }
                    session.detach_done();
                }
                OriginOp::Release { disposition } => {
                    let Some((v, _, _)) = volume.clone() else {
                        session.release_done(Err(Refusal::new(
                            ErrorCode::NotAttached,
                            "this connection holds no volume to release",
                        )));
                        continue;
                    };
                    let partial = session.take_partial();
                    let (origin, done) = (origin.clone(), done_tx.clone());
                    tokio::spawn(async move {
                        let r = origin.release_as(conn, &v, disposition, partial).await;
                        let _ = done.send(Done::Release(r));
                    });
                }
                OriginOp::Close { reason } => {
                    closed = Some(reason);
                    break;
                }
            }
        }
        if let Some(reason) = closed {
            // Best effort: what the session queued last says why.
            let frames = gather(|| session.poll_transmit(now()));
            if !frames.is_empty() {
                let _ = tokio::time::timeout(CLOSE_FLUSH, io.output.send(frames)).await;
            }
            break Err(reason);
        }
        let sendable = session.can_transmit(now());
        tokio::select! {
            biased;
            // An operator fenced an edge: if it was this one, it must not
            // go on (its reads and applies are refused already). First:
            // a busy connection must not starve it.
            Ok(()) = fences.changed() => {
                if let Some((v, _, edge)) = &volume {
                    if let Some(r) = v.revoked(conn, edge) {
                        tracing::warn!(volume = %v.name(), edge = %edge, "closing a fenced edge's connection");
                        session.revoke(r);
                    }
                }
            },
            Some(done) = done_rx.recv() => match done {
                Done::Read(tag, r) => session.read_done(tag, r),
                Done::Apply(seq, r) => session.apply_done(seq, r),
                Done::Extents(tag, r) => session.extents_done(tag, r),
                Done::Sign(tag, r) => session.sign_done(tag, r),
                Done::Profile(tag, r) => session.profile_done(tag, r),
                Done::Plan(tag, r) => session.plan_done(tag, r),
                Done::Files(files) => session.set_files(files),
                Done::Release(r) => {
                    if r.is_ok() {
                        // Released at the origin: nothing to let go of
                        // when the connection ends.
                        volume = None;
                    }
                    session.release_done(r);
                }
            },
            input = io.input.recv() => match input {
                Some(Ok(bytes)) => session.handle_input(&bytes, now()),
                Some(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => break Ok(()),
                Some(Err(e)) => break Err(e.into()),
                None => break Err(LinkError::Closed),
            },
            permit = io.output.reserve(), if sendable => match permit {
                Ok(permit) => {
                    let frames = gather(|| session.poll_transmit(now()));
                    if !frames.is_empty() {
                        permit.send(frames);
                    }
                }
                Err(_) => break Err(LinkError::Closed),
            },
            () = sleep_until(session.poll_timeout()) => session.handle_timeout(now()),
        }
    };
    if let Some((v, _, _)) = volume {
        // What the connection cost, for an operator tuning prefetch.
        let s = session.stats(now());
        tracing::info!(
            volume = v.name(),
            reads = s.reads,
            bytes_read = s.bytes_read,
            bytes_pushed = s.bytes_pushed,
            file_groups = s.file_groups,
            fixed_groups = s.fixed_groups,
            group_bytes_skipped = s.group_bytes_skipped,
            batches_applied = s.batches_applied,
            "connection stats"
        );
        origin.release(conn, &v, session.take_partial());
    }
    result
}

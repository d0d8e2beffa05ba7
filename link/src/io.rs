//! The thin tokio shell both ends use around a session: a connection's
//! reader and writer tasks, and the session's clock.
//!
//! ```text
//!   socket ──> reader task ──(Bytes, bounded)──> session driver
//!   session driver ──(one batch of frames at a time)──> writer task ──> socket
//! ```
//!
//! The writer's channel holds one batch: the driver asks the session for
//! frames only when the writer can take them, so frames wait in the
//! session's scheduler (where priorities apply) rather than in a buffer.

use std::io;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Bytes gathered into one write, at most (a larger frame goes alone).
pub const WRITE_BATCH: usize = 64 << 10;
/// Bytes read from the socket at once.
const READ_CHUNK: usize = 128 << 10;
/// Read chunks waiting for the driver; the reader stops reading the
/// socket when they are all full (back-pressure through TCP).
const READ_DEPTH: usize = 8;

/// The session clock: tokio's, so tests with paused time see it move.
pub fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// A tokio sleep until a session deadline.
pub async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
        None => std::future::pending().await,
    }
}

/// Random bytes for nonces, ids and keys.
pub fn random<const N: usize>() -> [u8; N] {
    use ring::rand::{SecureRandom, SystemRandom};
    let mut out = [0u8; N];
    SystemRandom::new()
        .fill(&mut out)
        .expect("the system random number generator failed");
    out
}

/// One connection's I/O tasks. Dropping it aborts both.
#[derive(Debug)]
pub struct ConnIo {
    /// What the socket delivered; an error or the end of the channel
    /// means the connection is gone.
    pub input: mpsc::Receiver<io::Result<Bytes>>,
    /// Frames to write; closed when the writer stopped.
    pub output: mpsc::Sender<Vec<Bytes>>,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
}

impl Drop for ConnIo {
    fn drop(&mut self) {
        self.reader.abort();
        self.writer.abort();
    }
}

impl ConnIo {
    /// Starts the reader and writer of `stream`.
    pub fn spawn<S>(stream: S) -> ConnIo
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (mut r, mut w) = tokio::io::split(stream);
        let (in_tx, input) = mpsc::channel(READ_DEPTH);
        let (output, mut out_rx) = mpsc::channel::<Vec<Bytes>>(1);
        let reader = tokio::spawn(async move {
            let mut buf = BytesMut::with_capacity(READ_CHUNK);
            loop {
                if buf.capacity() < READ_CHUNK / 2 {
                    buf.reserve(READ_CHUNK);
                }
                match r.read_buf(&mut buf).await {
                    Ok(0) => {
                        let _ = in_tx
                            .send(Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "the peer closed the connection",
                            )))
                            .await;
                        return;
                    }
                    Ok(_) => {
                        if in_tx.send(Ok(buf.split().freeze())).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = in_tx.send(Err(e)).await;
                        return;
                    }
                }
            }
        });
        let writer = tokio::spawn(async move {
            while let Some(frames) = out_rx.recv().await {
                for f in frames {
                    if w.write_all(&f).await.is_err() {
                        return;
                    }
                }
                if w.flush().await.is_err() {
                    return;
                }
            }
            let _ = w.shutdown().await;
        });
        ConnIo {
            input,
            output,
            reader,
            writer,
        }
    }
}

/// Gathers frames from `next` for one write: until it yields nothing or
/// [`WRITE_BATCH`] bytes are in.
pub fn gather(mut next: impl FnMut() -> Option<Bytes>) -> Vec<Bytes> {
    let mut frames = Vec::new();
    let mut len = 0;
    while len < WRITE_BATCH {
        let Some(f) = next() else { break };
        len += f.len();
        frames.push(f);
    }
    frames
}

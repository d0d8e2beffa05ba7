//! The io_uring engine.
//!
//! ```text
//!   async callers ──(Request + oneshot)──> std mpsc ──┐
//!        │                                          ring thread: push SQEs,
//!        └── write eventfd if the ring thread sleeps ─┘ submit_and_wait(1), reap CQEs
//! ```
//!
//! One dedicated thread per device owns the ring. It keeps a Read of an
//! eventfd armed in the ring (user_data [`WAKE`]), so `submit_and_wait(1)`
//! returns on a completion or on a new submission, without polling.
//! Submitters only write the eventfd when the ring thread has announced that
//! it is about to sleep (`Waker::sleeping`), which saves a syscall per
//! request under load.
//!
//! Buffers are owned by the in-flight table until their CQE arrives, whether
//! or not the caller still waits for the answer, so the kernel never writes
//! into freed memory. The thread exits once every handle is gone (the channel
//! is closed) and everything in flight, including the eventfd read, has
//! completed.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write as _};
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::mpsc::{self, TryRecvError};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use io_uring::{opcode, squeue, types, IoUring, Probe};
use tokio::sync::oneshot;

/// Submission queue size.
const ENTRIES: u32 = 256;
/// Requests in flight at once: one SQE slot stays for the eventfd read, and
/// the completion queue (twice the size) can never overflow.
const MAX_IN_FLIGHT: usize = ENTRIES as usize - 1;
/// user_data of the eventfd read.
const WAKE: u64 = u64::MAX;
/// Largest length of one read or write SQE.
const MAX_SQE_LEN: usize = 1 << 30;

/// What to do.
enum Kind {
    /// Reads into the spare capacity of `buf` at `offset + buf.len()` until
    /// it holds `total` bytes.
    Read {
        buf: BytesMut,
        total: usize,
    },
    Write {
        data: Bytes,
        done: usize,
        fua: bool,
    },
    Fdatasync,
    Fallocate {
        mode: i32,
        len: u64,
    },
}

/// What a finished request answers.
enum Done {
    Read(Bytes),
    Unit,
}

struct Request {
    kind: Kind,
    offset: u64,
    reply: oneshot::Sender<io::Result<Done>>,
}

/// Wakes the ring thread.
struct Waker {
    eventfd: File,
    /// Set by the ring thread just before it blocks; a submitter that finds
    /// it set clears it and writes the eventfd.
    sleeping: AtomicBool,
}

impl Waker {
    fn wake(&self) {
        // An eventfd write only fails if the counter would overflow, which
        // takes 2^64 - 2 wake-ups without a read.
        let _ = (&self.eventfd).write_all(&1u64.to_ne_bytes());
    }
}

/// Handle to a ring thread. Dropping it closes the channel and wakes the
/// thread, which finishes what is in flight and exits.
pub(super) struct Ring {
    tx: Option<mpsc::Sender<Request>>,
    waker: Arc<Waker>,
}

impl Drop for Ring {
    fn drop(&mut self) {
        drop(self.tx.take());
        self.waker.wake();
    }
}

fn stopped() -> io::Error {
    io::Error::other("the io_uring thread of this file device has stopped")
}

impl Ring {
    /// Sets up a ring for `file` and starts its thread. Fails if the kernel
    /// refuses io_uring or lacks an opcode the device needs.
    pub(super) fn start(file: Arc<File>) -> io::Result<Ring> {
        let ring: IoUring = IoUring::builder().build(ENTRIES)?;
        let mut probe = Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        for (code, name) in [
            (opcode::Read::CODE, "read"),
            (opcode::Write::CODE, "write"),
            (opcode::Fsync::CODE, "fsync"),
            (opcode::Fallocate::CODE, "fallocate"),
        ] {
            if !probe.is_supported(code) {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("io_uring lacks the {name} opcode"),
                ));
            }
        }

        // A blocking eventfd: io_uring polls it internally; with O_NONBLOCK
        // the armed read would complete at once with EAGAIN.
        // SAFETY: eventfd takes no pointers and returns a new descriptor or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by eventfd, is open and owned by
        // nothing else.
        let eventfd = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let waker = Arc::new(Waker {
            eventfd,
            sleeping: AtomicBool::new(false),
        });

        let (tx, rx) = mpsc::channel();
        let thread_waker = Arc::clone(&waker);
        std::thread::Builder::new()
            .name("ferry-uring".into())
            .spawn(move || RingThread::new(ring, file, rx, thread_waker).run())?;
        Ok(Ring {
            tx: Some(tx),
            waker,
        })
    }

    async fn call(&self, kind: Kind, offset: u64) -> io::Result<Done> {
        let (reply, answer) = oneshot::channel();
        let tx = self.tx.as_ref().ok_or_else(stopped)?;
        tx.send(Request {
            kind,
            offset,
            reply,
        })
        .map_err(|_| stopped())?;
        // Pairs with the fence in `RingThread::run`: either the ring thread
        // sees the request before it sleeps, or we see `sleeping` and wake it.
        fence(Ordering::SeqCst);
        if self.waker.sleeping.load(Ordering::SeqCst)
            && self.waker.sleeping.swap(false, Ordering::SeqCst)
        {
            self.waker.wake();
        }
        answer.await.map_err(|_| stopped())?
    }

    /// Reads `[offset + buf.len(), offset + total)` into the rest of `buf`,
    /// whose first `buf.len()` bytes are already read.
    pub(super) async fn read(&self, offset: u64, buf: BytesMut, total: usize) -> io::Result<Bytes> {
        if buf.len() >= total {
            return Ok(buf.freeze());
        }
        let mut buf = buf;
        buf.reserve(total - buf.len());
        let kind = Kind::Read { buf, total };
        match self.call(kind, offset).await? {
            Done::Read(bytes) => Ok(bytes),
            Done::Unit => unreachable!("a read answers with data"),
        }
    }

    pub(super) async fn write(&self, offset: u64, data: Bytes, fua: bool) -> io::Result<()> {
        let kind = Kind::Write { data, done: 0, fua };
        self.call(kind, offset).await.map(|_| ())
    }

    pub(super) async fn fdatasync(&self) -> io::Result<()> {
        self.call(Kind::Fdatasync, 0).await.map(|_| ())
    }

    pub(super) async fn fallocate(&self, mode: i32, offset: u64, len: u64) -> io::Result<()> {
        self.call(Kind::Fallocate { mode, len }, offset)
            .await
            .map(|_| ())
    }
}

/// Memory the kernel may write into while an operation is in flight. Kept in
/// `ManuallyDrop` so that, should the ring thread ever panic, unwinding leaks
/// it rather than freeing buffers the kernel still owns.
struct Owned {
    /// In-flight requests, indexed by user_data.
    slots: Vec<Option<Request>>,
    /// Target of the armed eventfd read.
    wake_buf: Box<[u8; 8]>,
}

struct RingThread {
    ring: IoUring,
    file: Arc<File>,
    rx: mpsc::Receiver<Request>,
    waker: Arc<Waker>,
    owned: ManuallyDrop<Owned>,
    free: Vec<usize>,
    /// Slots whose (next) SQE still has to be pushed.
    queued: VecDeque<usize>,
    in_flight: usize,
    wake_armed: bool,
    closed: bool,
}

impl RingThread {
    fn new(ring: IoUring, file: Arc<File>, rx: mpsc::Receiver<Request>, waker: Arc<Waker>) -> Self {
        RingThread {
            ring,
            file,
            rx,
            waker,
            owned: ManuallyDrop::new(Owned {
                slots: (0..MAX_IN_FLIGHT).map(|_| None).collect(),
                wake_buf: Box::new([0; 8]),
            }),
            free: (0..MAX_IN_FLIGHT).rev().collect(),
            queued: VecDeque::new(),
            in_flight: 0,
            wake_armed: false,
            closed: false,
        }
    }

    fn run(mut self) {
        loop {
            while !self.closed && self.in_flight < MAX_IN_FLIGHT {
                match self.rx.try_recv() {
                    Ok(req) => self.accept(req),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => self.closed = true,
                }
            }
            if !self.wake_armed && !self.closed {
                self.arm_wake();
            }
            self.push_queued();
            if self.closed && self.in_flight == 0 {
                break;
            }

            // About to block: announce it, then look at the channel once
            // more (see `Ring::call` for the other half).
            let may_accept = !self.closed && self.in_flight < MAX_IN_FLIGHT;
            if may_accept {
                self.waker.sleeping.store(true, Ordering::SeqCst);
                fence(Ordering::SeqCst);
                match self.rx.try_recv() {
                    Ok(req) => {
                        self.waker.sleeping.store(false, Ordering::SeqCst);
                        self.accept(req);
                        continue;
                    }
                    Err(TryRecvError::Empty) => {}
                    Err(TryRecvError::Disconnected) => {
                        self.closed = true;
                        continue;
                    }
                }
            }
            self.submit_and_wait();
            if may_accept {
                self.waker.sleeping.store(false, Ordering::SeqCst);
            }
            self.reap();
        }
        self.shutdown();
    }

    /// Retires the eventfd read, then frees what the kernel could touch.
    fn shutdown(mut self) {
        if self.wake_armed {
            self.waker.wake();
            while self.wake_armed {
                self.submit_and_wait();
                self.reap();
            }
        }
        // SAFETY: nothing is in flight any more (`in_flight == 0`, the
        // eventfd read has completed), so the kernel holds no pointer into
        // `owned`; it is dropped exactly once, here.
        unsafe { ManuallyDrop::drop(&mut self.owned) };
    }

    fn submit_and_wait(&mut self) {
        match self.ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                ) => {}
            Err(e) => {
                // Nothing sensible to do but retry: giving up would free
                // buffers the kernel may still own.
                tracing::error!(error = %e, "io_uring_enter failed; retrying");
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
    }

    fn accept(&mut self, req: Request) {
        let i = self.free.pop().expect("in-flight limit checked by caller");
        self.owned.slots[i] = Some(req);
        self.in_flight += 1;
        self.queued.push_back(i);
    }

    fn arm_wake(&mut self) {
        let entry = opcode::Read::new(
            types::Fd(self.waker.eventfd.as_raw_fd()),
            self.owned.wake_buf.as_mut_ptr(),
            8,
        )
        .build()
        .user_data(WAKE);
        // SAFETY: `wake_buf` is heap memory owned by `self.owned`, which is
        // freed only after this read's CQE has been reaped (see `shutdown`),
        // and the eventfd lives as long as `self.waker`.
        if unsafe { self.ring.submission().push(&entry) }.is_ok() {
            self.wake_armed = true;
        }
        // Else the SQ is full of real work: the next completion wakes us and
        // we arm again then.
    }

    fn push_queued(&mut self) {
        let fd = types::Fd(self.file.as_raw_fd());
        while let Some(&i) = self.queued.front() {
            let req = self.owned.slots[i]
                .as_mut()
                .expect("queued slots are occupied");
            let entry = build_sqe(fd, req).user_data(i as u64);
            // SAFETY: the entry points into the request's own buffer (the
            // spare capacity of a `BytesMut`, reserved up front, or a
            // `Bytes`; neither's heap memory moves or is touched meanwhile), which
            // stays in `self.owned.slots[i]` until the CQE for this user_data
            // is reaped; the file stays open through `self.file`.
            if unsafe { self.ring.submission().push(&entry) }.is_err() {
                // SQ full: submit_and_wait hands it to the kernel; the rest
                // goes in on the next round.
                break;
            }
            self.queued.pop_front();
        }
    }

    fn reap(&mut self) {
        let cqes: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (user_data, res) in cqes {
            if user_data == WAKE {
                // The value read does not matter: it only woke us.
                self.wake_armed = false;
                continue;
            }
            let Ok(i) = usize::try_from(user_data) else {
                continue;
            };
            let Some(req) = self.owned.slots.get_mut(i).and_then(Option::as_mut) else {
                tracing::error!(user_data, "completion for an empty io_uring slot");
                continue;
            };
            if let Some(result) = complete(req, res) {
                let req = self.owned.slots[i].take().expect("checked above");
                self.free.push(i);
                self.in_flight -= 1;
                // The caller may have gone away (its future was dropped).
                let _ = req.reply.send(result);
            } else {
                self.queued.push_back(i);
            }
        }
    }
}

fn build_sqe(fd: types::Fd, req: &mut Request) -> squeue::Entry {
    let offset = req.offset;
    match &mut req.kind {
        Kind::Read { buf, total } => {
            let done = buf.len();
            let len = (*total - done).min(MAX_SQE_LEN);
            // Capacity for `total` bytes was reserved in `Ring::read`.
            let rest = &mut buf.spare_capacity_mut()[..len];
            #[allow(clippy::cast_possible_truncation)] // len <= MAX_SQE_LEN
            opcode::Read::new(fd, rest.as_mut_ptr().cast(), len as u32)
                .offset(offset + done as u64)
                .build()
        }
        Kind::Write { data, done, fua } => {
            let rest = &data[*done..];
            let len = rest.len().min(MAX_SQE_LEN);
            #[allow(clippy::cast_possible_truncation)] // len <= MAX_SQE_LEN
            opcode::Write::new(fd, rest.as_ptr(), len as u32)
                .offset(offset + *done as u64)
                .rw_flags(if *fua { libc::RWF_DSYNC } else { 0 })
                .build()
        }
        Kind::Fdatasync => opcode::Fsync::new(fd)
            .flags(types::FsyncFlags::DATASYNC)
            .build(),
        Kind::Fallocate { mode, len } => opcode::Fallocate::new(fd, *len)
            .offset(offset)
            .mode(*mode)
            .build(),
    }
}

/// Applies a completion: `Some(result)` when the request is finished, `None`
/// when it must be resubmitted (retryable error, or a short transfer).
fn complete(req: &mut Request, res: i32) -> Option<io::Result<Done>> {
    if res < 0 {
        let errno = -res;
        if errno == libc::EINTR || errno == libc::EAGAIN {
            return None;
        }
        return Some(Err(io::Error::from_raw_os_error(errno)));
    }
    let n = res.unsigned_abs() as usize;
    match &mut req.kind {
        Kind::Read { buf, total } => {
            let done = buf.len();
            // The kernel never reports more than the SQE asked for.
            let n = n.min(*total - done);
            // SAFETY: the completed read initialised the first `n` bytes of
            // the spare capacity the SQE pointed at (see `build_sqe`), which
            // directly follow the `done` initialised bytes.
            unsafe { buf.set_len(done + n) };
            if n == 0 {
                // The end of the file: the rest reads as zeroes, as the
                // fixed device size promises.
                buf.resize(*total, 0);
            }
            if buf.len() >= *total {
                Some(Ok(Done::Read(std::mem::take(buf).freeze())))
            } else {
                None
            }
        }
        Kind::Write { data, done, .. } => {
            if n == 0 {
                return Some(Err(io::ErrorKind::WriteZero.into()));
            }
            *done += n;
            if *done >= data.len() {
                Some(Ok(Done::Unit))
            } else {
                None
            }
        }
        Kind::Fdatasync | Kind::Fallocate { .. } => Some(Ok(Done::Unit)),
    }
}

//! A deterministic single-threaded executor and a virtual clock.
//!
//! Tasks are polled in an order the simulation's seeded RNG chooses among
//! those that are ready, so one seed gives one interleaving, and another
//! seed another. Time moves only when the simulation says so: a [`Sleep`]
//! completes when the clock is advanced past it.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Who a task belongs to, so a crash drops exactly that process's tasks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Owner {
    /// The edge process of this generation (incarnation).
    Edge(u64),
    /// The origin process of this generation.
    Origin(u64),
}

type Task = Pin<Box<dyn Future<Output = ()>>>;

struct TaskWaker {
    id: u64,
    ready: Arc<Mutex<VecDeque<u64>>>,
}

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        lock(&self.ready).push_back(self.id);
    }

    fn wake_by_ref(self: &Arc<Self>) {
        lock(&self.ready).push_back(self.id);
    }
}

/// The executor. Futures need not be `Send`: everything runs on the
/// simulation's thread.
#[derive(Default)]
pub struct Executor {
    tasks: BTreeMap<u64, (Owner, Task)>,
    next: u64,
    ready: Arc<Mutex<VecDeque<u64>>>,
}

impl std::fmt::Debug for Executor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executor")
            .field("tasks", &self.tasks.len())
            .field("next", &self.next)
            .finish_non_exhaustive()
    }
}

impl Executor {
    pub fn spawn(&mut self, owner: Owner, fut: impl Future<Output = ()> + 'static) {
        let id = self.next;
        self.next += 1;
        self.tasks.insert(id, (owner, Box::pin(fut)));
        lock(&self.ready).push_back(id);
    }

    /// Drops every task of `owner` wherever it is (a crash).
    pub fn kill(&mut self, owner: Owner) {
        self.tasks.retain(|_, (o, _)| *o != owner);
    }

    pub fn has_ready(&self) -> bool {
        !lock(&self.ready).is_empty()
    }

    /// Polls the tasks that are ready, in an order `pick` chooses (it is
    /// given how many are ready and returns an index), until none is.
    /// Returns how many polls it made.
    pub fn run_ready(&mut self, mut pick: impl FnMut(usize) -> usize) -> usize {
        let mut polls = 0;
        loop {
            let mut batch: Vec<u64> = std::mem::take(&mut *lock(&self.ready)).into();
            batch.sort_unstable();
            batch.dedup();
            if batch.is_empty() {
                return polls;
            }
            while !batch.is_empty() {
                let id = batch.swap_remove(pick(batch.len()) % batch.len());
                let Some((_, task)) = self.tasks.get_mut(&id) else {
                    continue;
                };
                let waker = Waker::from(Arc::new(TaskWaker {
                    id,
                    ready: self.ready.clone(),
                }));
                polls += 1;
                if task
                    .as_mut()
                    .poll(&mut Context::from_waker(&waker))
                    .is_ready()
                {
                    self.tasks.remove(&id);
                }
            }
        }
    }
}

/// Polls a future that must complete at once (everything underneath it is
/// synchronous in the simulation: in-memory storage, the journal's inline
/// syncs).
pub fn now_or_never<T>(fut: impl Future<Output = T>) -> T {
    let mut fut = std::pin::pin!(fut);
    match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("a future the simulation expected to complete at once is pending"),
    }
}

#[derive(Default)]
struct ClockState {
    now: Duration,
    seq: u64,
    timers: BinaryHeap<Reverse<(Duration, u64)>>,
    wakers: BTreeMap<u64, Waker>,
}

/// The virtual clock. Clones share it.
#[derive(Clone)]
pub struct Clock {
    base: Instant,
    state: Arc<Mutex<ClockState>>,
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Clock({:?})", self.now())
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock {
            base: Instant::now(),
            state: Arc::default(),
        }
    }
}

impl Clock {
    /// Virtual time since the start.
    pub fn now(&self) -> Duration {
        lock(&self.state).now
    }

    /// The same instant for the sessions (which take `Instant`s).
    pub fn instant(&self) -> Instant {
        self.base + self.now()
    }

    /// `Instant` -> virtual time.
    pub fn since_start(&self, at: Instant) -> Duration {
        at.saturating_duration_since(self.base)
    }

    /// The earliest pending sleep.
    pub fn next_timer(&self) -> Option<Duration> {
        lock(&self.state).timers.peek().map(|Reverse((t, _))| *t)
    }

    /// Moves time to `to` and wakes every sleep due by then.
    pub fn advance(&self, to: Duration) {
        let mut wake = Vec::new();
        {
            let mut s = lock(&self.state);
            s.now = s.now.max(to);
            while let Some(Reverse((t, id))) = s.timers.peek().copied() {
                if t > s.now {
                    break;
                }
                s.timers.pop();
                if let Some(w) = s.wakers.remove(&id) {
                    wake.push(w);
                }
            }
        }
        for w in wake {
            w.wake();
        }
    }

    /// A future completing `d` from now (virtual time).
    pub fn sleep(&self, d: Duration) -> Sleep {
        Sleep {
            clock: self.clone(),
            at: self.now() + d,
            id: None,
        }
    }
}

/// See [`Clock::sleep`].
#[derive(Debug)]
pub struct Sleep {
    clock: Clock,
    at: Duration,
    id: Option<u64>,
}

impl Future for Sleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut s = lock(&self.clock.state);
        if s.now >= self.at {
            return Poll::Ready(());
        }
        let id = if let Some(id) = self.id {
            id
        } else {
            s.seq += 1;
            let id = s.seq;
            let at = self.at;
            s.timers.push(Reverse((at, id)));
            id
        };
        s.wakers.insert(id, cx.waker().clone());
        drop(s);
        self.id = Some(id);
        Poll::Pending
    }
}

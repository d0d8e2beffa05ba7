//! One connection's framing, scheduling and flow control, shared by both
//! ends' sessions.
//!
//! ```text
//!  input bytes ─> Decoder ─┬─ Credit      ─> Scheduler::on_credit
//!                          ├─ Delivered   ─> in-flight accounting ─> Controller
//!                          └─ the rest    ─> the session
//!                 background frames are counted: CreditGranter (memory) and
//!                 `bg_received`, reported back as Delivered (delay)
//!
//!  poll_transmit ─> Credit / Delivered owed? ─> Scheduler::poll_transmit(budget)
//!                   budget = cwnd − background bytes in flight
//! ```
//!
//! Background bytes "in flight" are those handed to the socket and not yet
//! reported delivered by the peer: they include the kernel's socket
//! buffers and any queue in the path, which is exactly the queue a demand
//! frame would wait behind.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::cc::{CcConfig, CcStats, Controller};
use crate::proto::{
    Class, CreditGranter, Decoder, FrameHeader, Message, ProtoError, Scheduler, SchedulerConfig,
};

/// Counters of one connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TransportStats {
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Background bytes sent and not yet reported delivered.
    pub background_in_flight: u64,
    pub cc: CcStats,
}

#[derive(Debug)]
pub(crate) struct Transport {
    decoder: Decoder,
    inbuf: BytesMut,
    sched: Scheduler,
    granter: CreditGranter,
    cc: Controller,
    /// Zero of the clock this end reports in `Delivered`.
    epoch: Instant,
    /// Background wire bytes received, in total; and whether the peer has
    /// not been told the latest count.
    bg_received: u64,
    feedback_owed: bool,
    /// Background wire bytes sent, and reported delivered, in total.
    bg_sent: u64,
    bg_delivered: u64,
    /// For each background frame in flight: the total sent once it was
    /// out, and when it went.
    sent_marks: VecDeque<(u64, Instant)>,
    /// When bytes last arrived: liveness is progress, not a particular
    /// frame that may sit behind others.
    pub(crate) last_rx: Instant,
    bytes_in: u64,
    bytes_out: u64,
    /// Without congestion control (a mistake the simulator must catch).
    uncontrolled: bool,
}

impl Transport {
    pub(crate) fn new(
        now: Instant,
        scheduler: SchedulerConfig,
        window: u64,
        cc: CcConfig,
        uncontrolled: bool,
    ) -> Self {
        let mut sched = Scheduler::new(scheduler);
        if uncontrolled {
            sched.on_credit(u64::MAX / 2);
        }
        Transport {
            decoder: Decoder::new(),
            inbuf: BytesMut::new(),
            sched,
            granter: CreditGranter::new(window),
            cc: Controller::new(cc),
            epoch: now,
            bg_received: 0,
            feedback_owed: false,
            bg_sent: 0,
            bg_delivered: 0,
            sent_marks: VecDeque::new(),
            last_rx: now,
            bytes_in: 0,
            bytes_out: 0,
            uncontrolled,
        }
    }

    /// Takes in bytes from the socket and returns the frames the session
    /// must handle (flow-control frames are handled here).
    pub(crate) fn input(
        &mut self,
        data: &[u8],
        now: Instant,
    ) -> Result<Vec<(FrameHeader, Message)>, ProtoError> {
        if !data.is_empty() {
            self.last_rx = now;
            self.bytes_in += data.len() as u64;
        }
        self.inbuf.extend_from_slice(data);
        let mut out = Vec::new();
        while let Some((header, msg)) = self.decoder.decode(&mut self.inbuf)? {
            match msg {
                Message::Credit { bytes } => self.sched.on_credit(bytes),
                Message::Delivered { bytes, nanos } => self.on_delivered(bytes, nanos, now)?,
                msg => {
                    if header.class == Class::Background {
                        let len = header.wire_len as u64;
                        if !self.uncontrolled {
                            self.granter.on_received(len)?;
                        }
                        // The session takes every frame into its own
                        // bounded state at once: consumed on arrival.
                        self.granter.on_consumed(len);
                        self.bg_received += len;
                        self.feedback_owed = true;
                    }
                    out.push((header, msg));
                }
            }
        }
        Ok(out)
    }

    fn on_delivered(&mut self, total: u64, nanos: u64, now: Instant) -> Result<(), ProtoError> {
        if total > self.bg_sent || total < self.bg_delivered {
            return Err(ProtoError::BadDelivered {
                reported: total,
                sent: self.bg_sent,
                delivered: self.bg_delivered,
            });
        }
        let acked = total - self.bg_delivered;
        self.bg_delivered = total;
        let mut newest = None;
        while let Some(&(end, at)) = self.sent_marks.front() {
            if end > total {
                break;
            }
            newest = Some(at);
            self.sent_marks.pop_front();
        }
        if let Some(sent_at) = newest {
            let rtt = now.saturating_duration_since(sent_at);
            let sent_ns = i64::try_from(sent_at.saturating_duration_since(self.epoch).as_nanos())
                .unwrap_or(i64::MAX);
            let one_way = i64::try_from(nanos).unwrap_or(i64::MAX) - sent_ns;
            let in_flight = self.bg_sent - self.bg_delivered;
            self.cc.on_delivered(now, acked, rtt, one_way, in_flight);
        }
        Ok(())
    }

    /// Queues a message; see [`Scheduler::queue`].
    pub(crate) fn queue(&mut self, id: u64, class: Class, msg: Message) -> Result<(), ProtoError> {
        self.sched.queue(id, class, msg)
    }

    /// Encoded bytes waiting in the scheduler in `class`.
    pub(crate) fn queued(&self, class: Class) -> usize {
        self.sched.queued_bytes(class)
    }

    /// The next frame to write, if one may go now.
    pub(crate) fn poll_transmit(&mut self, now: Instant) -> Option<Bytes> {
        if let Some(bytes) = self.granter.poll_grant() {
            // A grant cannot fail to encode.
            let _ = self
                .sched
                .queue(0, Class::Demand, Message::Credit { bytes });
        }
        if self.feedback_owed {
            self.feedback_owed = false;
            let nanos = u64::try_from(now.saturating_duration_since(self.epoch).as_nanos())
                .unwrap_or(u64::MAX);
            let _ = self.sched.queue(
                0,
                Class::Demand,
                Message::Delivered {
                    bytes: self.bg_received,
                    nanos,
                },
            );
        }
        let t = self.sched.poll_transmit_within(self.budget(now))?;
        self.bytes_out += t.frame.len() as u64;
        if t.header.class == Class::Background {
            self.bg_sent += t.frame.len() as u64;
            self.sent_marks.push_back((self.bg_sent, now));
        }
        Some(t.frame)
    }

    /// Whether [`Transport::poll_transmit`] would yield a frame now.
    pub(crate) fn can_transmit(&self, now: Instant) -> bool {
        self.feedback_owed || self.granter.grant_due() || self.sched.ready_within(self.budget(now))
    }

    fn budget(&self, now: Instant) -> u64 {
        if self.uncontrolled {
            u64::MAX
        } else {
            self.cc
                .cwnd(now)
                .saturating_sub(self.bg_sent - self.bg_delivered)
        }
    }

    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        self.cc.poll_timeout()
    }

    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        self.cc.handle_timeout(now);
    }

    /// Time since bytes last arrived.
    pub(crate) fn silent_for(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.last_rx)
    }

    pub(crate) fn stats(&self, now: Instant) -> TransportStats {
        TransportStats {
            bytes_in: self.bytes_in,
            bytes_out: self.bytes_out,
            background_in_flight: self.bg_sent - self.bg_delivered,
            cc: self.cc.stats(now),
        }
    }
}

//! How many background bytes may be in flight: a delay-based controller in
//! the spirit of LEDBAT (RFC 6817), so write-back and pushes fill the link
//! but yield as soon as they start to build a queue in the path.
//!
//! ```text
//!   sender                                   receiver
//!   background frame, sent at t_s ─────────> counts its bytes
//!        in_flight += len                     Delivered { bytes: total, nanos: t_r }
//!   <─────────────────────────────────────── (a control frame, never held back)
//!   one-way delay sample = t_r - t_s  (the two clocks' offset is constant)
//!   base delay  = the smallest sample of the last few minutes
//!   queue delay = the smallest of the last 4 samples - base delay
//!   cwnd grows while queue delay < target, shrinks when it is above
//! ```
//!
//! Why one-way delay and not RTT: the feedback travels back on the other
//! direction, which may be full of the peer's own background traffic (the
//! origin pushing while the edge ships write-back). The RTT would then
//! count the other direction's queue against this one.
//!
//! The rules:
//!
//! - **Start**: `cwnd` doubles per round trip (grows by every byte
//!   delivered) until the queue delay reaches half the target.
//! - **Steady**: LEDBAT's linear controller: per delivered byte, `cwnd +=
//!   gain × (target − queue)/target × bytes × frame / cwnd`, about one frame
//!   per round trip when the path is empty, and as much less when it fills.
//!   A queue far above the target (twice or more) cuts `cwnd` in proportion
//!   (`cwnd × target / queue`), at most once per round trip, because the
//!   linear rule alone would take many round trips to drain a deep queue.
//! - **Probe**: LEDBAT's weakness is a base delay that drifts up when the
//!   queue never empties (a sender that always keeps `target` queued never
//!   sees the true base again once the old minimum ages out). Every
//!   `probe_interval` of steady state, `cwnd` drops to its minimum for
//!   about one round trip so the path drains and a fresh base is measured
//!   (BBR's ProbeRTT), then doubles back to its old size with the
//!   deliveries (jumping back would put a whole window into the path at
//!   once, in front of the next demand reply); it costs 1-2% of the link.
//! - **Cap**: `cwnd` never exceeds 1.25 × the recent maximum delivery rate
//!   × (smallest round trip + target), plus two frames. The delay signal
//!   alone trusts the receiver's timestamps; a receiver that reports late
//!   (a busy machine) makes queueing look like base delay and lets the
//!   window, and the path's queue, grow. The cap bounds that queue from
//!   what was actually delivered, and still lets the rate grow by a
//!   quarter per round trip.
//! - `cwnd` only grows while the sender uses it (bytes in flight within a
//!   frame of `cwnd`): an idle or application-limited sender must not
//!   build up a window it has never tested.
//!
//! Pure: fed times and samples, no clock of its own.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Controller settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CcConfig {
    /// The queueing delay the controller aims for. Demand frames wait
    /// about this long behind background ones in the path.
    pub target: Duration,
    /// LEDBAT's gain (at most 1 per the RFC).
    pub gain: f64,
    /// The background frame size: the unit the window grows by.
    pub frame: u64,
    /// The smallest window, in frames (at least 2 keep a frame in flight
    /// while the next is sent).
    pub min_frames: u64,
    /// The window never grows past this many bytes.
    pub max_cwnd: u64,
    /// How long a base-delay minimum is remembered (in `BASE_BUCKETS`
    /// buckets).
    pub base_history: Duration,
    /// How often steady state drains the path to measure the base delay
    /// afresh; `None` never.
    pub probe_interval: Option<Duration>,
}

impl Default for CcConfig {
    fn default() -> Self {
        CcConfig {
            target: Duration::from_millis(10),
            gain: 1.0,
            frame: 64 << 10,
            min_frames: 2,
            max_cwnd: 256 << 20,
            base_history: Duration::from_secs(120),
            probe_interval: Some(Duration::from_secs(20)),
        }
    }
}

/// Buckets the base-delay history is kept in.
const BASE_BUCKETS: u32 = 10;
/// Samples the current delay is the minimum of (LEDBAT's filter).
const CURRENT_SAMPLES: usize = 4;

/// What the controller is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Doubling per round trip (up to the window before a probe, if one
    /// ended).
    Start,
    /// LEDBAT's linear control around the target.
    Steady,
    /// Holding the minimum window until `until`, to measure the base delay.
    Probe { until: Instant },
}

/// A snapshot for status displays.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CcStats {
    pub cwnd: u64,
    /// The smallest one-way delay seen (relative: includes the clocks'
    /// offset, so only differences mean anything) - not shown; the queue
    /// delay is what matters.
    pub queue_delay: Duration,
    /// The smoothed round-trip time of background frames (send to
    /// feedback), and the smallest seen.
    pub srtt: Duration,
    pub min_rtt: Duration,
    /// Bytes per second delivered, the largest of the recent samples.
    pub delivery_rate: u64,
}

/// The delay-based window controller. See the module docs.
#[derive(Debug)]
pub struct Controller {
    cfg: CcConfig,
    cwnd: u64,
    phase: Phase,
    /// Per bucket: (bucket start, smallest one-way delay in it), in ns.
    base: VecDeque<(Instant, i64)>,
    current: VecDeque<i64>,
    srtt: Option<Duration>,
    min_rtt: Option<Duration>,
    /// No decrease before this time (one cut per round trip).
    hold_cuts_until: Option<Instant>,
    /// After a probe: the window to grow back to (TCP's ssthresh). The
    /// window regrows with the deliveries instead of jumping back, which
    /// would put the whole window into the path at once: a burst that
    /// queues a full window's serialization (60 ms at 100 Mbit/s) in
    /// front of the next demand reply.
    regrow_to: Option<u64>,
    /// When steady state began, or the last probe ended.
    steady_since: Option<Instant>,
    /// Delivery-rate samples: (time, bytes delivered in total).
    rate_marks: VecDeque<(Instant, u64)>,
    delivered_total: u64,
    delivery_rate: u64,
    /// Recent delivery-rate samples, for their maximum (BBR's filter).
    rate_max: VecDeque<(Instant, u64)>,
}

/// The window never exceeds this many times what the path delivered
/// recently per (smallest round trip + target): room for the rate to grow
/// by a quarter per round trip, and a bound on the queue that holds even
/// when the delay signal is wrong (a receiver that reports late makes
/// every sample look like base delay).
const RATE_CAP_GAIN: f64 = 1.25;
/// How long a delivery-rate sample counts for the cap.
const RATE_MAX_WINDOW: Duration = Duration::from_secs(2);

impl Controller {
    pub fn new(cfg: CcConfig) -> Self {
        let cfg = CcConfig {
            frame: cfg.frame.max(1),
            min_frames: cfg.min_frames.max(1),
            gain: cfg.gain.clamp(0.01, 1.0),
            ..cfg
        };
        Controller {
            cwnd: Self::min_cwnd_of(&cfg) * 2,
            cfg,
            phase: Phase::Start,
            base: VecDeque::new(),
            current: VecDeque::new(),
            srtt: None,
            min_rtt: None,
            hold_cuts_until: None,
            regrow_to: None,
            steady_since: None,
            rate_marks: VecDeque::new(),
            delivered_total: 0,
            delivery_rate: 0,
            rate_max: VecDeque::new(),
        }
    }

    fn min_cwnd_of(cfg: &CcConfig) -> u64 {
        cfg.frame * cfg.min_frames
    }

    fn min_cwnd(&self) -> u64 {
        Self::min_cwnd_of(&self.cfg)
    }

    pub fn config(&self) -> &CcConfig {
        &self.cfg
    }

    /// The window: background bytes that may be in flight now.
    pub fn cwnd(&self, now: Instant) -> u64 {
        match self.phase {
            Phase::Probe { until } if now < until => self.min_cwnd(),
            _ => self.cwnd,
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The current estimate of the queue this direction's traffic built
    /// in the path.
    pub fn queue_delay(&self) -> Duration {
        let (Some(base), Some(current)) = (self.base_delay(), self.current.iter().min()) else {
            return Duration::ZERO;
        };
        Duration::from_nanos(u64::try_from(current.saturating_sub(base)).unwrap_or(0))
    }

    fn base_delay(&self) -> Option<i64> {
        self.base.iter().map(|&(_, d)| d).min()
    }

    pub fn stats(&self, now: Instant) -> CcStats {
        CcStats {
            cwnd: self.cwnd(now),
            queue_delay: self.queue_delay(),
            srtt: self.srtt.unwrap_or_default(),
            min_rtt: self.min_rtt.unwrap_or_default(),
            delivery_rate: self.delivery_rate,
        }
    }

    /// When the controller wants to be asked again (the end of a probe),
    /// if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.phase {
            Phase::Probe { until } => Some(until),
            _ => None,
        }
    }

    /// Ends a probe whose time is up: the window starts again from the
    /// minimum and doubles back to where it was.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Phase::Probe { until } = self.phase {
            if now >= until {
                self.regrow_to = Some(self.cwnd);
                self.cwnd = self.min_cwnd();
                self.phase = Phase::Start;
            }
        }
    }

    /// Feedback arrived: `acked` more bytes were delivered, the newest of
    /// them sent with `rtt` ago and seen by the receiver `one_way` after it
    /// was sent (receiver clock minus sender clock, so it carries their
    /// offset). `in_flight` is what remains unacknowledged after this.
    pub fn on_delivered(
        &mut self,
        now: Instant,
        acked: u64,
        rtt: Duration,
        one_way: i64,
        in_flight: u64,
    ) {
        self.note_rtt(rtt);
        self.note_delay(now, one_way);
        self.note_rate(now, acked);
        self.handle_timeout(now);
        if acked == 0 {
            return;
        }
        let queue = self.queue_delay();
        let target = self.cfg.target.max(Duration::from_micros(100));
        // Only a window in use may grow.
        let limited = in_flight + acked + self.cfg.frame >= self.cwnd;
        match self.phase {
            Phase::Start => {
                if limited {
                    self.cwnd = self.cwnd.saturating_add(acked);
                }
                let regrown = self.regrow_to.is_some_and(|w| self.cwnd >= w);
                if queue * 2 >= target || regrown {
                    if let Some(w) = self.regrow_to.take() {
                        self.cwnd = self.cwnd.min(w);
                    }
                    self.phase = Phase::Steady;
                    self.steady_since = Some(now);
                }
            }
            Phase::Steady => {
                if queue >= target * 2 {
                    if self.hold_cuts_until.is_none_or(|t| now >= t) {
                        let factor = target.as_secs_f64() / queue.as_secs_f64();
                        self.cwnd = scale(self.cwnd, factor);
                        self.hold_cuts_until = Some(now + self.srtt.unwrap_or(rtt));
                    }
                } else {
                    let off = (target.as_secs_f64() - queue.as_secs_f64()) / target.as_secs_f64();
                    if off < 0.0 || limited {
                        #[allow(clippy::cast_precision_loss)]
                        let delta = self.cfg.gain * off * acked as f64 * self.cfg.frame as f64
                            / self.cwnd.max(1) as f64;
                        self.cwnd = add_signed(self.cwnd, delta);
                    }
                }
                if let (Some(every), Some(since)) = (self.cfg.probe_interval, self.steady_since) {
                    if now.saturating_duration_since(since) >= every {
                        let hold = self.srtt.unwrap_or(rtt).max(Duration::from_millis(100));
                        self.phase = Phase::Probe { until: now + hold };
                    }
                }
            }
            Phase::Probe { .. } => {}
        }
        let cap = self.rate_cap().unwrap_or(self.cfg.max_cwnd);
        self.cwnd = self.cwnd.min(cap).clamp(self.min_cwnd(), self.cfg.max_cwnd);
    }

    fn note_rtt(&mut self, rtt: Duration) {
        self.min_rtt = Some(self.min_rtt.map_or(rtt, |m| m.min(rtt)));
        self.srtt = Some(match self.srtt {
            None => rtt,
            Some(s) => (s * 7 + rtt) / 8,
        });
    }

    fn note_delay(&mut self, now: Instant, one_way: i64) {
        self.current.push_back(one_way);
        if self.current.len() > CURRENT_SAMPLES {
            self.current.pop_front();
        }
        let bucket = self.cfg.base_history / BASE_BUCKETS;
        match self.base.back_mut() {
            Some((start, min)) if now.saturating_duration_since(*start) < bucket => {
                *min = (*min).min(one_way);
            }
            _ => {
                self.base.push_back((now, one_way));
                if self.base.len() > BASE_BUCKETS as usize {
                    self.base.pop_front();
                }
            }
        }
    }

    fn note_rate(&mut self, now: Instant, acked: u64) {
        self.delivered_total += acked;
        self.rate_marks.push_back((now, self.delivered_total));
        // Rate over the last ~quarter second (at least two marks).
        while self.rate_marks.len() > 2
            && now.saturating_duration_since(self.rate_marks[1].0) >= Duration::from_millis(250)
        {
            self.rate_marks.pop_front();
        }
        if let (Some(&(t0, b0)), Some(&(t1, b1))) =
            (self.rate_marks.front(), self.rate_marks.back())
        {
            let dt = t1.saturating_duration_since(t0);
            if dt >= Duration::from_millis(50) {
                #[allow(
                    clippy::cast_possible_truncation,
                    clippy::cast_sign_loss,
                    clippy::cast_precision_loss
                )]
                let rate = ((b1 - b0) as f64 / dt.as_secs_f64()) as u64;
                self.delivery_rate = rate;
                while self.rate_max.back().is_some_and(|&(_, r)| r <= rate) {
                    self.rate_max.pop_back();
                }
                self.rate_max.push_back((now, rate));
            }
        }
        while self
            .rate_max
            .front()
            .is_some_and(|&(t, _)| now.saturating_duration_since(t) > RATE_MAX_WINDOW)
        {
            self.rate_max.pop_front();
        }
    }

    /// The most the window may be, from the recent delivery rate and the
    /// smallest round trip; none until both are measured.
    fn rate_cap(&self) -> Option<u64> {
        let &(_, rate) = self.rate_max.front()?;
        let rtt = self.min_rtt? + self.cfg.target;
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        let bdp = (rate as f64 * rtt.as_secs_f64() * RATE_CAP_GAIN) as u64;
        Some(bdp.saturating_add(2 * self.cfg.frame))
    }

    /// The connection went quiet for long enough that the old window says
    /// nothing about the path: start again (as TCP does after idle).
    pub fn restart(&mut self) {
        self.cwnd = self.min_cwnd() * 2;
        self.phase = Phase::Start;
        self.regrow_to = None;
        self.rate_max.clear();
        self.current.clear();
    }
}

#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_precision_loss
)]
fn scale(v: u64, factor: f64) -> u64 {
    (v as f64 * factor.clamp(0.0, 1.0)) as u64
}

#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_precision_loss
)]
fn add_signed(v: u64, delta: f64) -> u64 {
    if delta >= 0.0 {
        v.saturating_add(delta as u64)
    } else {
        v.saturating_sub((-delta) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A single bottleneck in virtual time: `rate` bytes/s, `delay` each
    /// way, an unbounded FIFO queue in front of it, feedback returning
    /// without queueing. The sender keeps `cwnd` bytes in flight in frames.
    struct Path {
        rate: f64,
        delay: Duration,
        /// When the bottleneck is free again.
        free_at: Instant,
    }

    impl Path {
        /// The frame sent at `now` arrives at the receiver at the returned
        /// time.
        fn send(&mut self, now: Instant, len: u64) -> Instant {
            let start = self.free_at.max(now);
            #[allow(clippy::cast_precision_loss)]
            let ser = Duration::from_secs_f64(len as f64 / self.rate);
            self.free_at = start + ser;
            self.free_at + self.delay
        }
    }

    /// Runs a saturating sender for `secs`; returns (throughput bytes/s,
    /// mean queue delay seen by a probe frame over the last half).
    fn run(rate: f64, one_way_ms: u64, cfg: CcConfig, secs: u64) -> (f64, Duration, Controller) {
        let t0 = Instant::now();
        let mut cc = Controller::new(cfg);
        let mut path = Path {
            rate,
            delay: Duration::from_millis(one_way_ms),
            free_at: t0,
        };
        // (arrival at receiver, bytes, sent at)
        let mut in_flight: VecDeque<(Instant, u64, Instant)> = VecDeque::new();
        let mut inflight_bytes = 0u64;
        let mut now = t0;
        let end = t0 + Duration::from_secs(secs);
        let mut delivered_late = 0u64;
        let mut queue_sum = Duration::ZERO;
        let mut queue_n = 0u32;
        let half = t0 + Duration::from_secs(secs / 2);
        // The receiver's clock is offset: one-way samples carry it.
        let offset: i64 = 123_456_789;
        while now < end {
            // Send while the window allows.
            while inflight_bytes + cfg.frame <= cc.cwnd(now) {
                let at = path.send(now, cfg.frame);
                in_flight.push_back((at, cfg.frame, now));
                inflight_bytes += cfg.frame;
            }
            // Next event: a delivery (feedback comes back after `delay`).
            let next = in_flight.front().map(|&(at, _, _)| at + path.delay);
            let timeout = cc.poll_timeout();
            now = match (next, timeout) {
                (Some(a), Some(b)) => a.min(b),
                (Some(a), None) => a,
                (None, Some(b)) => b,
                (None, None) => break,
            };
            cc.handle_timeout(now);
            while let Some(&(at, len, sent)) = in_flight.front() {
                if at + path.delay > now {
                    break;
                }
                in_flight.pop_front();
                inflight_bytes -= len;
                let one_way = i64::try_from((at - sent).as_nanos()).unwrap() + offset;
                cc.on_delivered(now, len, now - sent, one_way, inflight_bytes);
                if now >= half {
                    delivered_late += len;
                    // What a demand frame sent now would wait in the queue.
                    queue_sum += path.free_at.saturating_duration_since(now);
                    queue_n += 1;
                }
            }
        }
        #[allow(clippy::cast_precision_loss)]
        let tput = delivered_late as f64 / (secs - secs / 2) as f64;
        (tput, queue_sum / queue_n.max(1), cc)
    }

    #[test]
    fn fills_a_100_mbit_link_with_a_short_queue() {
        let rate = 12_500_000.0;
        let (tput, queue, cc) = run(rate, 25, CcConfig::default(), 60);
        assert!(tput >= 0.9 * rate, "throughput {tput} of {rate}");
        assert!(
            queue <= Duration::from_millis(25),
            "demand would wait {queue:?} in the path"
        );
        assert_eq!(cc.phase(), Phase::Steady);
    }

    #[test]
    fn fills_fast_and_slow_links() {
        for (rate, delay) in [(1_250_000.0, 50), (125_000_000.0, 10), (12_500_000.0, 100)] {
            let (tput, queue, _) = run(rate, delay, CcConfig::default(), 60);
            assert!(tput >= 0.85 * rate, "{rate} B/s, {delay} ms: {tput}");
            assert!(
                queue <= Duration::from_millis(40),
                "{rate} B/s, {delay} ms: queue {queue:?}"
            );
        }
    }

    #[test]
    fn a_deep_queue_is_cut_back_to_the_target() {
        let t0 = Instant::now();
        let mut cc = Controller::new(CcConfig::default());
        // Learn a base of 25 ms, then see 300 ms of queue.
        cc.on_delivered(t0, 1 << 16, Duration::from_millis(50), 25_000_000, 0);
        cc.cwnd = 32 << 20;
        cc.phase = Phase::Steady;
        let mut now = t0;
        for _ in 0..8 {
            now += Duration::from_millis(60);
            cc.on_delivered(
                now,
                1 << 16,
                Duration::from_millis(350),
                325_000_000,
                1 << 20,
            );
        }
        assert!(cc.cwnd(now) < 4 << 20, "cwnd {}", cc.cwnd(now));
        assert!(cc.queue_delay() >= Duration::from_millis(290));
    }

    #[test]
    fn an_idle_sender_does_not_grow_its_window() {
        let t0 = Instant::now();
        let mut cc = Controller::new(CcConfig::default());
        let start = cc.cwnd(t0);
        for i in 0..100 {
            let now = t0 + Duration::from_millis(10 * i);
            // One small frame at a time, far below the window.
            cc.on_delivered(now, 4096, Duration::from_millis(50), 25_000_000, 0);
        }
        // It may shrink to what it used (the rate cap), never grow.
        assert!(cc.cwnd(t0 + Duration::from_secs(1)) <= start);
    }

    #[test]
    fn probes_drain_the_path_now_and_then() {
        let cfg = CcConfig {
            probe_interval: Some(Duration::from_secs(5)),
            ..CcConfig::default()
        };
        let t0 = Instant::now();
        let mut cc = Controller::new(cfg);
        cc.phase = Phase::Steady;
        cc.steady_since = Some(t0);
        cc.cwnd = 4 << 20;
        let later = t0 + Duration::from_secs(6);
        cc.on_delivered(later, 1 << 16, Duration::from_millis(50), 1, 4 << 20);
        assert!(matches!(cc.phase(), Phase::Probe { .. }));
        assert_eq!(cc.cwnd(later), cc.min_cwnd());
        let before_probe = cc.cwnd;
        let after = cc.poll_timeout().unwrap();
        cc.handle_timeout(after);
        // Back from the minimum, doubling with the deliveries (no burst of
        // a whole window into the path), to the window it had.
        assert_eq!(cc.phase(), Phase::Start);
        assert_eq!(cc.cwnd(after), cc.min_cwnd());
        let mut now = after;
        let mut round_trips = 0;
        while cc.phase() == Phase::Start {
            let w = cc.cwnd(now);
            now += Duration::from_millis(50);
            cc.on_delivered(now, w, Duration::from_millis(50), 1, 0);
            assert!(cc.cwnd(now) <= 2 * w, "grew faster than doubling");
            round_trips += 1;
            assert!(round_trips < 20, "never regrew");
        }
        // Back to the old window, or to what the deliveries it saw allow.
        assert_eq!(cc.phase(), Phase::Steady);
        assert!(cc.cwnd(now) <= before_probe);
        assert!(cc.cwnd(now) >= 8 * cc.min_cwnd(), "{}", cc.cwnd(now));
    }
}

//! Tests of the link emulator, on loopback with real time. Timing is only
//! ever asserted as a strict lower bound (the emulator never delivers early)
//! and a generous upper bound.

use std::net::SocketAddr;
use std::time::Duration;

use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{sleep, timeout, Instant};

use super::*;

/// Upper bound for anything that should happen "soon".
const SOON: Duration = Duration::from_secs(5);

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A server that echoes every connection and passes end-of-stream back.
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind(loopback()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                stream.set_nodelay(true).unwrap();
                let (mut r, mut w) = stream.split();
                if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                    let _ = w.shutdown().await;
                }
            });
        }
    });
    addr
}

/// A server that reads every connection to its end and reports how many
/// bytes it got and when the end came.
async fn sink_server() -> (SocketAddr, mpsc::UnboundedReceiver<(u64, Instant)>) {
    let listener = TcpListener::bind(loopback()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = vec![0; 64 * 1024];
                let mut total = 0;
                while let Ok(n @ 1..) = stream.read(&mut buf).await {
                    total += n as u64;
                }
                let _ = tx.send((total, Instant::now()));
            });
        }
    });
    (addr, rx)
}

async fn start(target: SocketAddr, cfg: LinkConfig) -> LinkEmulator {
    LinkEmulator::start(loopback(), target, cfg).await.unwrap()
}

async fn connect(link: &LinkEmulator) -> TcpStream {
    let stream = TcpStream::connect(link.local_addr()).await.unwrap();
    stream.set_nodelay(true).unwrap();
    stream
}

/// One small round trip through an echo server; returns how long it took.
async fn ping(stream: &mut TcpStream) -> Duration {
    let started = Instant::now();
    stream.write_all(b"ping").await.unwrap();
    let mut buf = [0; 4];
    timeout(SOON, stream.read_exact(&mut buf))
        .await
        .expect("no echo")
        .unwrap();
    assert_eq!(&buf, b"ping");
    started.elapsed()
}

/// Whether the peer closed or reset `stream` (rather than sending data or
/// staying silent) within `within`.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0; 1];
    matches!(
        timeout(within, stream.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

/// Polls `cond` until it holds or `SOON` passes.
async fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + SOON;
    while !cond() {
        if Instant::now() > deadline {
            return false;
        }
        sleep(ms(5)).await;
    }
    true
}

/// A deterministic byte stream (xorshift64*), for content and sizes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> usize {
        usize::try_from(self.next() % n).unwrap()
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next().to_le_bytes()[0]).collect()
    }
}

#[tokio::test]
async fn default_config_is_a_transparent_relay() {
    let echo = echo_server().await;
    let link = start(echo, LinkConfig::default()).await;
    let mut stream = connect(&link).await;
    for _ in 0..3 {
        assert!(ping(&mut stream).await < SOON);
    }
    let stats = link.stats();
    assert_eq!(stats.bytes_to_target, 12);
    assert_eq!(stats.bytes_to_client, 12);
    assert_eq!(stats.bytes_queued, 0);
    assert_eq!(stats.connections_accepted, 1);
    assert_eq!(stats.connections_open, 1);
    assert_eq!(stats.connections_refused, 0);
    drop(stream);
    assert!(eventually(|| link.stats().connections_open == 0).await);
}

#[tokio::test]
async fn round_trip_takes_twice_the_one_way_delay() {
    let echo = echo_server().await;
    let delay = ms(20);
    let link = start(echo, LinkConfig::new(delay)).await;
    let mut stream = connect(&link).await;
    for _ in 0..4 {
        let rtt = ping(&mut stream).await;
        assert!(rtt >= 2 * delay, "rtt {rtt:?}");
        assert!(rtt < 2 * delay + ms(1000), "rtt {rtt:?}");
    }
}

#[tokio::test]
async fn set_config_changes_the_delay_of_later_data() {
    let echo = echo_server().await;
    let link = start(echo, LinkConfig::new(ms(5))).await;
    let mut stream = connect(&link).await;
    assert!(ping(&mut stream).await >= ms(10));
    let slower = LinkConfig::new(ms(40));
    link.set_config(slower);
    assert_eq!(link.config(), slower);
    let rtt = ping(&mut stream).await;
    assert!(rtt >= ms(80), "rtt {rtt:?}");
    assert!(rtt < ms(80) + SOON, "rtt {rtt:?}");
}

#[tokio::test]
async fn bandwidth_paces_a_burst() {
    let (sink, mut done) = sink_server().await;
    let rate = 20 << 20; // 20 MiB/s
    let total = 2 << 20; // 2 MiB: 100 ms at that rate
    let link = start(sink, LinkConfig::new(ms(5)).with_bandwidth(rate)).await;
    let mut stream = connect(&link).await;
    let data = Rng(7).bytes(total);
    let started = Instant::now();
    stream.write_all(&data).await.unwrap();
    stream.shutdown().await.unwrap();
    let (received, ended) = timeout(SOON, done.recv()).await.unwrap().unwrap();
    assert_eq!(received, total as u64);
    let took = ended - started;
    assert!(took >= ms(100) + ms(5), "2 MiB at 20 MiB/s took {took:?}");
    assert_eq!(link.stats().bytes_to_target, total as u64);
}

#[tokio::test]
async fn each_direction_can_be_shaped_on_its_own() {
    let echo = echo_server().await;
    let cfg = LinkConfig {
        to_client: Some(DirectionConfig {
            one_way_delay: ms(5),
            bandwidth_bytes_per_sec: Some(10 << 20),
        }),
        ..LinkConfig::default()
    };
    assert_eq!(
        cfg.direction(Direction::ToTarget),
        DirectionConfig::default()
    );
    let link = start(echo, cfg).await;
    let mut stream = connect(&link).await;
    let data = Rng(3).bytes(1 << 20); // 100 ms back at 10 MiB/s
    let started = Instant::now();
    let (mut r, mut w) = stream.split();
    let write = async {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let mut echoed = Vec::new();
    let read = timeout(SOON, r.read_to_end(&mut echoed));
    let ((), read) = tokio::join!(write, read);
    read.unwrap().unwrap();
    let took = started.elapsed();
    assert!(echoed == data, "echo differs");
    assert!(
        took >= ms(100) + ms(5),
        "1 MiB back at 10 MiB/s took {took:?}"
    );
}

/// Random-sized writes in both directions at once keep their order and
/// content, through a small queue (so the relay applies back-pressure).
#[tokio::test]
async fn order_and_content_survive_random_writes() {
    let echo = echo_server().await;
    // (link, bytes each way): a tiny queue over a delay limits a connection
    // to queue/delay, so its transfer is kept small.
    let cases = [
        (LinkConfig::default(), 1 << 20),
        (
            LinkConfig {
                max_queue_bytes: Some(64 * 1024),
                ..LinkConfig::new(ms(5)).with_bandwidth(40 << 20)
            },
            1 << 20,
        ),
        (
            LinkConfig {
                max_queue_bytes: Some(1000),
                ..LinkConfig::default()
            },
            256 * 1024,
        ),
        (
            LinkConfig {
                max_queue_bytes: Some(1000),
                ..LinkConfig::new(ms(1)).with_bandwidth(100 << 20)
            },
            32 * 1024,
        ),
    ];
    for (seed, (cfg, size)) in (1..).zip(cases) {
        let link = start(echo, cfg).await;
        let mut rng = Rng(seed);
        let mut writes = Vec::new();
        let mut total = 0;
        while total < size {
            let len = 1 + rng.below(u64::try_from(size).unwrap() / 16);
            writes.push(rng.bytes(len));
            total += len;
        }
        let mut stream = connect(&link).await;
        let (mut r, mut w) = stream.split();
        let write = async {
            for chunk in &writes {
                w.write_all(chunk).await.unwrap();
            }
            w.shutdown().await.unwrap();
        };
        let mut echoed = Vec::new();
        let read = timeout(SOON, r.read_to_end(&mut echoed));
        let ((), read) = tokio::join!(write, read);
        read.unwrap().unwrap();
        assert!(echoed == writes.concat(), "seed {seed}: echo differs");
        let stats = link.stats();
        assert_eq!(stats.bytes_to_target, total as u64);
        assert_eq!(stats.bytes_to_client, total as u64);
    }
}

#[tokio::test]
async fn half_close_propagates_both_ways() {
    let echo = echo_server().await;
    let link = start(echo, LinkConfig::new(ms(10))).await;
    let mut stream = connect(&link).await;
    let data = Rng(11).bytes(10_000);
    let started = Instant::now();
    stream.write_all(&data).await.unwrap();
    // Our end-of-stream reaches the echo server, which then ends its side.
    stream.shutdown().await.unwrap();
    let mut echoed = Vec::new();
    timeout(SOON, stream.read_to_end(&mut echoed))
        .await
        .unwrap()
        .unwrap();
    assert!(started.elapsed() >= ms(20));
    assert!(echoed == data, "echo differs");
    assert!(eventually(|| link.stats().connections_open == 0).await);
}

#[tokio::test]
async fn an_unreachable_target_resets_the_client() {
    let target = TcpListener::bind(loopback()).await.unwrap();
    let addr = target.local_addr().unwrap();
    drop(target);
    let link = start(addr, LinkConfig::new(ms(5))).await;
    let mut stream = connect(&link).await;
    assert!(closed_within(&mut stream, SOON).await);
    assert!(eventually(|| link.stats().connections_open == 0).await);
    assert_eq!(link.stats().connections_accepted, 1);
}

#[tokio::test]
async fn cut_resets_connections_and_refuses_new_ones_until_restore() {
    let echo = echo_server().await;
    let link = start(echo, LinkConfig::new(ms(5))).await;
    let mut first = connect(&link).await;
    let mut second = connect(&link).await;
    ping(&mut first).await;
    ping(&mut second).await;
    assert_eq!(link.stats().connections_open, 2);

    link.cut();
    assert!(closed_within(&mut first, SOON).await);
    assert!(closed_within(&mut second, SOON).await);
    assert!(eventually(|| link.stats().connections_open == 0).await);

    // While cut, a new connection is accepted by the kernel but reset.
    let mut refused = connect(&link).await;
    let _ = refused.write_all(b"ping").await;
    assert!(closed_within(&mut refused, SOON).await);
    assert_eq!(link.stats().connections_refused, 1);
    assert_eq!(link.stats().connections_accepted, 2);

    link.restore();
    let mut again = connect(&link).await;
    assert!(ping(&mut again).await >= ms(10));
    let stats = link.stats();
    assert_eq!(stats.connections_accepted, 3);
    assert_eq!(stats.connections_open, 1);
}

#[tokio::test]
async fn stall_holds_data_and_resume_delivers_everything() {
    let echo = echo_server().await;
    let link = start(echo, LinkConfig::new(ms(5))).await;
    let mut stream = connect(&link).await;
    ping(&mut stream).await;

    link.stall(true);
    let data = Rng(5).bytes(100_000);
    stream.write_all(&data).await.unwrap();
    let mut buf = vec![0; data.len()];
    assert!(
        timeout(ms(150), stream.read(&mut buf)).await.is_err(),
        "bytes arrived over a stalled link"
    );
    assert_eq!(link.stats().bytes_to_client, 4);
    assert_eq!(link.stats().connections_open, 1);

    link.stall(false);
    timeout(SOON, stream.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(buf == data, "echo differs");
    assert!(ping(&mut stream).await >= ms(10));
}

#[tokio::test]
async fn the_queue_is_bounded() {
    let (sink, mut done) = sink_server().await;
    let limit = 128 * 1024;
    let slow = LinkConfig {
        max_queue_bytes: Some(limit),
        ..LinkConfig::default().with_bandwidth(2 << 20)
    };
    let link = start(sink, slow).await;
    let mut stream = connect(&link).await;
    let total = 8 << 20;
    let writer = tokio::spawn(async move {
        let chunk = vec![7; 64 * 1024];
        for _ in 0..total / chunk.len() {
            stream.write_all(&chunk).await.unwrap();
        }
        stream.shutdown().await.unwrap();
    });
    let mut peak = 0;
    for _ in 0..30 {
        sleep(ms(10)).await;
        peak = peak.max(link.stats().bytes_queued);
    }
    assert!(peak > 0);
    assert!(peak <= limit as u64, "{peak} bytes queued");
    // Now let it through.
    link.set_config(LinkConfig::default());
    timeout(SOON, writer).await.unwrap().unwrap();
    let (received, _) = timeout(SOON, done.recv()).await.unwrap().unwrap();
    assert_eq!(received, total as u64);
    assert!(eventually(|| link.stats().bytes_queued == 0).await);
}

#[tokio::test]
async fn dropping_the_handle_closes_everything() {
    let echo = echo_server().await;
    let tasks_before = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    let link = start(echo, LinkConfig::new(ms(5))).await;
    let addr = link.local_addr();
    let mut first = connect(&link).await;
    let mut second = connect(&link).await;
    ping(&mut first).await;
    ping(&mut second).await;
    link.stall(true);
    first.write_all(b"queued").await.unwrap();

    drop(link);
    assert!(closed_within(&mut first, SOON).await);
    assert!(closed_within(&mut second, SOON).await);
    // The listener is closed too (a connection racing its close may still
    // be accepted by the kernel, and is then reset).
    let deadline = Instant::now() + SOON;
    while TcpStream::connect(addr).await.is_ok() {
        assert!(Instant::now() < deadline, "still listening");
        sleep(ms(5)).await;
    }
    // Every task of the emulator has ended (and the echo server's
    // connection tasks, now that their connections are closed).
    assert!(
        eventually(|| tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
            == tasks_before)
        .await
    );
}

#[test]
fn default_queue_limit_is_twice_the_bandwidth_delay_product() {
    let unlimited = LinkConfig::new(ms(50));
    assert_eq!(unlimited.queue_limit(Direction::ToTarget), 4 << 20);
    let fast = LinkConfig::new(ms(100)).with_bandwidth(100 << 20);
    assert_eq!(fast.queue_limit(Direction::ToClient), 20 << 20);
    let slow = LinkConfig::new(ms(10)).with_bandwidth(1 << 20);
    assert_eq!(slow.queue_limit(Direction::ToClient), 4 << 20);
    let set = LinkConfig {
        max_queue_bytes: Some(0),
        ..fast
    };
    assert_eq!(set.queue_limit(Direction::ToTarget), 1);
}

#[test]
fn a_megabyte_at_100_mbit_takes_84_ms() {
    let shape = DirectionConfig {
        one_way_delay: Duration::ZERO,
        bandwidth_bytes_per_sec: Some(100_000_000 / 8),
    };
    let mut pacer = Pacer::default();
    let now = Instant::now();
    let piece = piece_len(shape.bandwidth_bytes_per_sec);
    let mut last = now;
    for _ in 0..(1 << 20) / piece {
        last = pacer.schedule(now, piece, shape);
    }
    let rest = (1 << 20) % piece;
    last = pacer.schedule(now, rest, shape).max(last);
    let took = last - now;
    assert!(took >= ms(83) && took <= ms(84), "{took:?}");
}

proptest! {
    /// The pacer's schedule is exactly the virtual serializer's: each piece
    /// departs after the previous one and after it was read, taking len/rate,
    /// and is delivered one delay later; so deliveries are in order, never
    /// early, and never faster than the rate.
    #[test]
    fn pacer_matches_a_virtual_serializer(
        rate in 1_000u64..1_000_000_000,
        delay_us in 0u64..100_000,
        reads in proptest::collection::vec((0u64..20_000, 1usize..100_000), 1..50),
    ) {
        let shape = DirectionConfig {
            one_way_delay: Duration::from_micros(delay_us),
            bandwidth_bytes_per_sec: Some(rate),
        };
        let base = Instant::now();
        let mut pacer = Pacer::default();
        let mut now = base;
        let mut departed = base;
        let mut previous = base;
        for (gap_us, len) in reads {
            now += Duration::from_micros(gap_us);
            let deliver = pacer.schedule(now, len, shape);
            departed = departed.max(now) + serialization_time(len, Some(rate));
            prop_assert_eq!(deliver, departed + shape.one_way_delay);
            prop_assert!(deliver >= previous);
            // Computed apart from the pacer, rounded down.
            let wire = Duration::from_nanos(u64::try_from(len).unwrap() * 1_000_000_000 / rate);
            prop_assert!(deliver >= now + wire + shape.one_way_delay);
            previous = deliver;
        }
    }
}

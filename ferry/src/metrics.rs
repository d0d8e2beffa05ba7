//! Prometheus metrics: the per-request layer [`Metered`] (counts and
//! latency histograms per volume, protocol and operation, recorded as
//! requests complete) and [`Scrape`], which turns state read at scrape
//! time (cache, journal, link, origin counters) into metric families.
//! Rendered in the Prometheus text format (0.0.4) that every scraper and
//! `promtool check metrics` read.
//!
//! Uses the `prometheus` crate: `prometheus-client` writes OpenMetrics
//! only, whose counter samples (`x_total` under `# TYPE x`) the Prometheus
//! text parsers and `promtool` reject.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use blockcore::{BlockDevice, DeviceInfo, Extent, Op, WriteFlags, ZeroFlags};
use bytes::Bytes;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry,
    TextEncoder,
};

const OPS: [Op; 7] = [
    Op::Read,
    Op::Write,
    Op::Flush,
    Op::Trim,
    Op::WriteZeroes,
    Op::Extents,
    Op::Prefetch,
];

fn op_name(op: Op) -> &'static str {
    match op {
        Op::Read => "read",
        Op::Write => "write",
        Op::Flush => "flush",
        Op::Trim => "trim",
        Op::WriteZeroes => "write_zeroes",
        Op::Extents => "extents",
        Op::Prefetch => "prefetch",
    }
}

fn slot(op: Op) -> usize {
    OPS.iter().position(|o| *o == op).unwrap_or(0)
}

/// Latency buckets, 50 µs to 10 s: cached reads sit at the bottom, WAN
/// round trips in the middle, a full journal at the top.
const LATENCY_BUCKETS: [f64; 17] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];

/// The request metrics of one daemon (the families; one series per volume,
/// protocol and operation).
#[derive(Clone)]
pub struct RequestMetrics {
    registry: Registry,
    requests: IntCounterVec,
    bytes: IntCounterVec,
    errors: IntCounterVec,
    latency: HistogramVec,
}

impl std::fmt::Debug for RequestMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestMetrics").finish_non_exhaustive()
    }
}

const LABELS: [&str; 3] = ["volume", "protocol", "op"];

impl RequestMetrics {
    /// `prefix`: `ferry_edge` or `ferry_serve`.
    pub fn new(prefix: &str) -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str| {
            let v = IntCounterVec::new(Opts::new(format!("{prefix}_{name}"), help), &LABELS)
                .expect("valid metric");
            registry
                .register(Box::new(v.clone()))
                .expect("registered once");
            v
        };
        let requests = counter(
            "requests_total",
            "Block requests completed, by volume, protocol (nbd, iscsi) and operation.",
        );
        let bytes = counter(
            "request_bytes_total",
            "Bytes read, written, trimmed, zeroed, described or prefetched by successful requests.",
        );
        let errors = counter(
            "request_errors_total",
            "Block requests that failed, by volume, protocol and operation.",
        );
        let latency = HistogramVec::new(
            HistogramOpts::new(
                format!("{prefix}_request_duration_seconds"),
                "Time from a request reaching the volume's device stack to its completion.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &LABELS,
        )
        .expect("valid metric");
        registry
            .register(Box::new(latency.clone()))
            .expect("registered once");
        RequestMetrics {
            registry,
            requests,
            bytes,
            errors,
            latency,
        }
    }

    /// `device` as served to `protocol`, with its requests measured.
    pub fn metered(
        &self,
        volume: &str,
        protocol: &'static str,
        device: Arc<dyn BlockDevice>,
    ) -> Arc<Metered> {
        let per_op = OPS.map(|op| {
            let l = [volume, protocol, op_name(op)];
            OpMetrics {
                requests: self.requests.with_label_values(&l),
                bytes: self.bytes.with_label_values(&l),
                errors: self.errors.with_label_values(&l),
                latency: self.latency.with_label_values(&l),
            }
        });
        Arc::new(Metered {
            inner: device,
            per_op,
        })
    }

    /// Drops a removed volume's series.
    pub fn forget(&self, volume: &str, protocols: &[&str]) {
        for p in protocols {
            for op in OPS {
                let l = [volume, *p, op_name(op)];
                let _ = self.requests.remove_label_values(&l);
                let _ = self.bytes.remove_label_values(&l);
                let _ = self.errors.remove_label_values(&l);
                let _ = self.latency.remove_label_values(&l);
            }
        }
    }

    fn gather(&self) -> Vec<prometheus::proto::MetricFamily> {
        self.registry.gather()
    }
}

struct OpMetrics {
    requests: IntCounter,
    bytes: IntCounter,
    errors: IntCounter,
    latency: Histogram,
}

/// A device whose requests are counted and timed (handles resolved once,
/// so the hot path is a few atomic adds).
pub struct Metered {
    inner: Arc<dyn BlockDevice>,
    per_op: [OpMetrics; 7],
}

impl std::fmt::Debug for Metered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metered").finish_non_exhaustive()
    }
}

impl Metered {
    fn record<T>(&self, op: Op, bytes: u64, started: Instant, r: &blockcore::Result<T>) {
        let m = &self.per_op[slot(op)];
        m.requests.inc();
        m.latency.observe(started.elapsed().as_secs_f64());
        if r.is_ok() {
            m.bytes.inc_by(bytes);
        } else {
            m.errors.inc();
        }
    }
}

#[async_trait]
impl BlockDevice for Metered {
    fn info(&self) -> DeviceInfo {
        self.inner.info()
    }

    async fn read(&self, offset: u64, len: usize) -> blockcore::Result<Bytes> {
        let t = Instant::now();
        let r = self.inner.read(offset, len).await;
        self.record(Op::Read, len as u64, t, &r);
        r
    }

    async fn write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> blockcore::Result<()> {
        let t = Instant::now();
        let len = data.len() as u64;
        let r = self.inner.write(offset, data, flags).await;
        self.record(Op::Write, len, t, &r);
        r
    }

    async fn flush(&self) -> blockcore::Result<()> {
        let t = Instant::now();
        let r = self.inner.flush().await;
        self.record(Op::Flush, 0, t, &r);
        r
    }

    async fn trim(&self, offset: u64, len: u64, flags: WriteFlags) -> blockcore::Result<()> {
        let t = Instant::now();
        let r = self.inner.trim(offset, len, flags).await;
        self.record(Op::Trim, len, t, &r);
        r
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> blockcore::Result<()> {
        let t = Instant::now();
        let r = self.inner.write_zeroes(offset, len, flags).await;
        self.record(Op::WriteZeroes, len, t, &r);
        r
    }

    async fn extents(&self, offset: u64, len: u64) -> blockcore::Result<Vec<Extent>> {
        let t = Instant::now();
        let r = self.inner.extents(offset, len).await;
        let described = r.as_ref().map_or(0, |e| e.iter().map(|e| e.len).sum());
        self.record(Op::Extents, described, t, &r);
        r
    }

    async fn prefetch(&self, offset: u64, len: u64) -> blockcore::Result<()> {
        let t = Instant::now();
        let r = self.inner.prefetch(offset, len).await;
        self.record(Op::Prefetch, len, t, &r);
        r
    }
}

/// Metric families built from state read at scrape time. Each name takes
/// one set of label names (the first use fixes them).
pub struct Scrape {
    registry: Registry,
    counters: BTreeMap<String, IntCounterVec>,
    gauges: BTreeMap<String, prometheus::GaugeVec>,
}

impl std::fmt::Debug for Scrape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scrape").finish_non_exhaustive()
    }
}

impl Default for Scrape {
    fn default() -> Self {
        Self::new()
    }
}

impl Scrape {
    pub fn new() -> Self {
        Scrape {
            registry: Registry::new(),
            counters: BTreeMap::new(),
            gauges: BTreeMap::new(),
        }
    }

    /// A counter's current value (it counts since the daemon started).
    pub fn counter(&mut self, name: &str, help: &str, labels: &[(&str, &str)], value: u64) {
        let names: Vec<&str> = labels.iter().map(|(k, _)| *k).collect();
        let values: Vec<&str> = labels.iter().map(|(_, v)| *v).collect();
        let vec = self.counters.entry(name.to_owned()).or_insert_with(|| {
            let v = IntCounterVec::new(Opts::new(name, help), &names).expect("valid metric");
            self.registry
                .register(Box::new(v.clone()))
                .expect("one registration per name");
            v
        });
        if let Ok(c) = vec.get_metric_with_label_values(&values) {
            c.inc_by(value);
        }
    }

    /// A gauge's current value.
    pub fn gauge(&mut self, name: &str, help: &str, labels: &[(&str, &str)], value: f64) {
        let names: Vec<&str> = labels.iter().map(|(k, _)| *k).collect();
        let values: Vec<&str> = labels.iter().map(|(_, v)| *v).collect();
        let vec = self.gauges.entry(name.to_owned()).or_insert_with(|| {
            let v = prometheus::GaugeVec::new(Opts::new(name, help), &names).expect("valid metric");
            self.registry
                .register(Box::new(v.clone()))
                .expect("one registration per name");
            v
        });
        if let Ok(g) = vec.get_metric_with_label_values(&values) {
            g.set(value);
        }
    }

    /// The text exposition of these families and `requests`' (if any).
    pub fn render(self, requests: Option<&RequestMetrics>) -> String {
        let mut families = self.registry.gather();
        if let Some(r) = requests {
            families.extend(r.gather());
        }
        families.sort_by(|a, b| a.name().cmp(b.name()));
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&families, &mut out) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// A u64 as a gauge value.
#[allow(clippy::cast_precision_loss)]
pub fn f(v: u64) -> f64 {
    v as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockcore::MemDevice;

    #[tokio::test]
    async fn requests_are_counted_per_volume_protocol_and_op() {
        let m = RequestMetrics::new("ferry_test");
        let dev = m.metered("v1", "nbd", Arc::new(MemDevice::new(1 << 20)));
        dev.write(0, Bytes::from_static(&[7; 4096]), WriteFlags::default())
            .await
            .unwrap();
        dev.read(0, 512).await.unwrap();
        dev.read(1 << 20, 512).await.unwrap_err();
        let mut s = Scrape::new();
        s.gauge("ferry_test_up", "Up.", &[], 1.0);
        let text = s.render(Some(&m));
        for line in [
            r#"ferry_test_requests_total{op="read",protocol="nbd",volume="v1"} 2"#,
            r#"ferry_test_request_errors_total{op="read",protocol="nbd",volume="v1"} 1"#,
            r#"ferry_test_request_bytes_total{op="write",protocol="nbd",volume="v1"} 4096"#,
            r#"ferry_test_request_duration_seconds_count{op="read",protocol="nbd",volume="v1"} 2"#,
            "ferry_test_up 1",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        m.forget("v1", &["nbd"]);
        let text = Scrape::new().render(Some(&m));
        assert!(!text.contains("volume=\"v1\""), "{text}");
    }
}

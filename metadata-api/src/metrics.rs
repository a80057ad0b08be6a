//! Prometheus metrics, registered once and rendered by `/metrics`.

use std::{sync::atomic::AtomicI64, time::Duration};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: &'static str,
    pub status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    pub op: &'static str,
    pub outcome: &'static str,
}

/// All metrics of the service.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    /// Log bytes accepted (decompressed) and stored.
    pub bytes_accepted: Counter,
    pub bytes_stored: Counter,
    /// Log bytes refused, by reason (throttled, too_large, conflict, ...).
    pub bytes_rejected: Family<ReasonLabels, Counter>,
    pub bytes_dropped: Counter,
    pub throttled: Family<ReasonLabels, Counter>,
    pub storage: Family<OpLabels, Histogram>,
    pub streams_open: Gauge<i64, AtomicI64>,
    pub followers: Gauge<i64, AtomicI64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("relay_metadata_api");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests by route and status",
            requests.clone(),
        );
        let bytes_accepted = Counter::default();
        registry.register(
            "log_bytes_accepted",
            "Log bytes accepted (after decompression)",
            bytes_accepted.clone(),
        );
        let bytes_stored = Counter::default();
        registry.register(
            "log_bytes_stored",
            "New log bytes written to storage",
            bytes_stored.clone(),
        );
        let bytes_rejected = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "log_bytes_rejected",
            "Log bytes refused, by reason",
            bytes_rejected.clone(),
        );
        let bytes_dropped = Counter::default();
        registry.register(
            "log_bytes_dropped",
            "Bytes writers reported as dropped",
            bytes_dropped.clone(),
        );
        let throttled = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "throttled_requests",
            "Requests answered 429, by exhausted budget",
            throttled.clone(),
        );
        let storage = Family::<OpLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ])
        });
        registry.register(
            "storage_seconds",
            "Object storage call latency",
            storage.clone(),
        );
        let streams_open = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "streams_open",
            "Streams held in memory",
            streams_open.clone(),
        );
        let followers = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "followers",
            "Readers following a stream now",
            followers.clone(),
        );
        Self {
            registry,
            requests,
            bytes_accepted,
            bytes_stored,
            bytes_rejected,
            bytes_dropped,
            throttled,
            storage,
            streams_open,
            followers,
        }
    }

    pub fn storage_latency(&self, op: &'static str, d: Duration, ok: bool) {
        self.storage
            .get_or_create(&OpLabels {
                op,
                outcome: if ok { "ok" } else { "error" },
            })
            .observe(d.as_secs_f64());
    }

    pub fn rejected(&self, reason: &'static str, bytes: u64) {
        self.bytes_rejected
            .get_or_create(&ReasonLabels { reason })
            .inc_by(bytes);
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

//! Prometheus metrics of the capture path, served with `/healthz` by `runtime::admin` (see
//! `main`).

use std::sync::{Mutex, PoisonError};

use aya::maps::{MapData, PerCpuArray};
use client::ShipReport;
use collector_common::counter;
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, gauge::Gauge},
    registry::Registry,
};

/// Every metric carries `path="ebpf"`, so dashboards can put it beside the entrypoint path.
pub struct Metrics {
    registry: Registry,
    kernel: Mutex<Option<PerCpuArray<MapData, u64>>>,
    captured_bytes: Counter,
    captured_chunks: Counter,
    kernel_lost_bytes: Counter,
    kernel_lost_chunks: Counter,
    untracked_writes: Counter,
    faulted_bytes: Counter,
    uncopied_bytes: Counter,
    /// Bytes handed to shippers.
    pub handed_bytes: Counter,
    /// Bytes acknowledged as stored / as dropped, per finished stream.
    pub shipped_bytes: Counter,
    pub dropped_bytes: Counter,
    /// Bytes lost without the API knowing (it could not be told before the deadline).
    pub unreported_bytes: Counter,
    /// Bytes of cgroups that could not be attributed to a container in time.
    pub attribution_miss_bytes: Counter,
    /// Bytes written to pipes of a container that are not its stdout or stderr.
    pub other_pipe_bytes: Counter,
    pub streams_open: Gauge,
    pub streams_finished: Counter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix_and_labels(
            "relay_collector",
            [("path".into(), "ebpf".into())].into_iter(),
        );
        let m = Self {
            registry: Registry::default(),
            kernel: Mutex::new(None),
            captured_bytes: Counter::default(),
            captured_chunks: Counter::default(),
            kernel_lost_bytes: Counter::default(),
            kernel_lost_chunks: Counter::default(),
            untracked_writes: Counter::default(),
            faulted_bytes: Counter::default(),
            uncopied_bytes: Counter::default(),
            handed_bytes: Counter::default(),
            shipped_bytes: Counter::default(),
            dropped_bytes: Counter::default(),
            unreported_bytes: Counter::default(),
            attribution_miss_bytes: Counter::default(),
            other_pipe_bytes: Counter::default(),
            streams_open: Gauge::default(),
            streams_finished: Counter::default(),
        };
        let r = &mut registry;
        r.register(
            "captured_bytes",
            "Bytes captured into the kernel ring buffer",
            m.captured_bytes.clone(),
        );
        r.register(
            "captured_chunks",
            "Chunks captured into the kernel ring buffer",
            m.captured_chunks.clone(),
        );
        r.register(
            "kernel_lost_bytes",
            "Bytes that did not fit into the kernel ring buffer",
            m.kernel_lost_bytes.clone(),
        );
        r.register(
            "kernel_lost_chunks",
            "Chunks that did not fit into the kernel ring buffer",
            m.kernel_lost_chunks.clone(),
        );
        r.register(
            "untracked_writes",
            "Writes of watched cgroups the kernel side could not track (maps full)",
            m.untracked_writes.clone(),
        );
        r.register(
            "faulted_bytes",
            "Bytes the kernel side could not read from the writer's memory",
            m.faulted_bytes.clone(),
        );
        r.register(
            "uncopied_bytes",
            "Bytes put into containers' output by sendfile, splice or tee, which the kernel side \
             cannot copy (reported as dropped)",
            m.uncopied_bytes.clone(),
        );
        r.register(
            "handed_bytes",
            "Bytes handed to the shippers",
            m.handed_bytes.clone(),
        );
        r.register(
            "shipped_bytes",
            "Bytes stored by the metadata API (finished streams)",
            m.shipped_bytes.clone(),
        );
        r.register(
            "dropped_bytes",
            "Bytes reported to the metadata API as dropped (finished streams)",
            m.dropped_bytes.clone(),
        );
        r.register(
            "unreported_bytes",
            "Bytes lost without the metadata API being told",
            m.unreported_bytes.clone(),
        );
        r.register(
            "attribution_miss_bytes",
            "Bytes of cgroups not attributed to a container in time",
            m.attribution_miss_bytes.clone(),
        );
        r.register(
            "other_pipe_bytes",
            "Bytes written to container pipes that are not its stdout or stderr",
            m.other_pipe_bytes.clone(),
        );
        r.register(
            "streams_open",
            "Streams being shipped",
            m.streams_open.clone(),
        );
        r.register(
            "streams_finished",
            "Streams finished",
            m.streams_finished.clone(),
        );
        Self { registry, ..m }
    }

    /// Reads the kernel-side counters from `map` at each scrape.
    pub fn attach_kernel(&self, map: PerCpuArray<MapData, u64>) {
        *self.kernel.lock().unwrap_or_else(PoisonError::into_inner) = Some(map);
    }

    /// The kernel-side counters summed over CPUs, by [`counter`] index.
    pub fn kernel_counters(&self) -> [u64; counter::COUNT as usize] {
        let mut out = [0; counter::COUNT as usize];
        let kernel = self.kernel.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(map) = kernel.as_ref() {
            for (i, slot) in out.iter_mut().enumerate() {
                if let Ok(values) = map.get(&(i as u32), 0) {
                    *slot = values.iter().sum();
                }
            }
        }
        out
    }

    /// Adds what a finished stream's shipper reports.
    pub fn finished(&self, report: &ShipReport) {
        // Bytes given up on that the API stored all the same count as shipped, not dropped.
        self.shipped_bytes
            .inc_by(report.stored + report.dropped_stored);
        self.dropped_bytes
            .inc_by(report.dropped - report.dropped_stored);
        self.unreported_bytes.inc_by(report.lost());
        self.streams_finished.inc();
        self.streams_open.dec();
    }

    pub fn render(&self) -> String {
        let k = self.kernel_counters();
        for (metric, index) in [
            (&self.captured_bytes, counter::CAPTURED_BYTES),
            (&self.captured_chunks, counter::CAPTURED_CHUNKS),
            (&self.kernel_lost_bytes, counter::LOST_BYTES),
            (&self.kernel_lost_chunks, counter::LOST_CHUNKS),
            (&self.untracked_writes, counter::UNTRACKED_WRITES),
            (&self.faulted_bytes, counter::FAULTED_BYTES),
            (&self.uncopied_bytes, counter::UNCOPIED_BYTES),
        ] {
            metric
                .inner()
                .store(k[index as usize], std::sync::atomic::Ordering::Relaxed);
        }
        let mut out = String::new();
        if let Err(e) = encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "Cannot encode metrics.");
        }
        out
    }
}

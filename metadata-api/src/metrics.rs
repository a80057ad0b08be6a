//! Prometheus metrics, registered once and rendered by `/metrics`.

use std::{
    collections::HashSet,
    sync::{Mutex, atomic::AtomicI64},
    time::Duration,
};

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

/// Labels of the per-tenant byte totals: the workflow (not run or step, to bound cardinality) and
/// the capture path.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkflowLabels {
    pub workflow: String,
    pub source: &'static str,
}

/// Which per-workflow total a write adds to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// New bytes stored.
    Stored,
    /// Bytes newly reported as dropped.
    Dropped,
}

/// Most distinct `workflow` label values; later workflows are counted under [`OTHER_WORKFLOW`].
pub const MAX_WORKFLOWS: usize = 1000;
/// The `workflow` label of workflows past [`MAX_WORKFLOWS`].
pub const OTHER_WORKFLOW: &str = "other";

/// All metrics of the service.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    /// Log bytes accepted (decompressed) and stored.
    pub bytes_accepted: Counter,
    pub bytes_stored: Counter,
    /// Segments stored by compaction, and the objects they made redundant and removed.
    pub segments_stored: Counter,
    pub objects_merged: Counter,
    /// Log bytes refused, by reason (throttled, too_large, conflict, ...).
    pub bytes_rejected: Family<ReasonLabels, Counter>,
    pub bytes_dropped: Counter,
    pub throttled: Family<ReasonLabels, Counter>,
    pub storage: Family<OpLabels, Histogram>,
    pub streams_open: Gauge<i64, AtomicI64>,
    pub followers: Gauge<i64, AtomicI64>,
    /// Open client connections, and connections refused over a limit by reason
    /// (`connections`, `connections_per_peer`).
    pub connections_open: Gauge<i64, AtomicI64>,
    pub connections_refused: Family<ReasonLabels, Counter>,
    /// Requests that ran out of time for their body.
    pub body_timeouts: Counter,
    /// New bytes stored per workflow and capture path.
    pub workflow_stored: Family<WorkflowLabels, Counter>,
    /// Bytes reported dropped per workflow and capture path.
    pub workflow_dropped: Family<WorkflowLabels, Counter>,
    /// Workflows with their own label value (at most [`MAX_WORKFLOWS`]).
    workflows: Mutex<HashSet<String>>,
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
        let segments_stored = Counter::default();
        registry.register(
            "segments_stored",
            "Segments stored by compaction",
            segments_stored.clone(),
        );
        let objects_merged = Counter::default();
        registry.register(
            "objects_merged",
            "Objects removed because a segment holds their bytes",
            objects_merged.clone(),
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
        let connections_open = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "connections_open",
            "Client connections open now",
            connections_open.clone(),
        );
        let connections_refused = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "connections_refused",
            "Connections refused over a limit, by reason",
            connections_refused.clone(),
        );
        let body_timeouts = Counter::default();
        registry.register(
            "body_timeouts",
            "Requests whose body did not arrive in time",
            body_timeouts.clone(),
        );
        let workflow_stored = Family::<WorkflowLabels, Counter>::default();
        registry.register(
            "stored_bytes",
            "New log bytes stored, by workflow and capture path",
            workflow_stored.clone(),
        );
        let workflow_dropped = Family::<WorkflowLabels, Counter>::default();
        registry.register(
            "dropped_bytes",
            "Log bytes writers reported as dropped, by workflow and capture path",
            workflow_dropped.clone(),
        );
        Self {
            registry,
            requests,
            bytes_accepted,
            bytes_stored,
            segments_stored,
            objects_merged,
            bytes_rejected,
            bytes_dropped,
            throttled,
            storage,
            streams_open,
            followers,
            connections_open,
            connections_refused,
            body_timeouts,
            workflow_stored,
            workflow_dropped,
            workflows: Mutex::default(),
        }
    }

    /// The `workflow` label for `workflow`: itself while fewer than [`MAX_WORKFLOWS`] have their
    /// own, [`OTHER_WORKFLOW`] afterwards.
    fn workflow_label(&self, workflow: &str) -> String {
        let mut seen = self.workflows.lock().unwrap_or_else(|p| p.into_inner());
        if seen.contains(workflow) {
            return workflow.to_owned();
        }
        if seen.len() < MAX_WORKFLOWS {
            seen.insert(workflow.to_owned());
            return workflow.to_owned();
        }
        OTHER_WORKFLOW.to_owned()
    }

    /// Adds `bytes` to the per-workflow total of `kind` for the stream `meta`.
    pub fn workflow_bytes(&self, meta: &crate::store::StreamMeta, kind: Kind, bytes: u64) {
        if bytes == 0 {
            return;
        }
        let workflow = meta.context.workflow();
        let labels = WorkflowLabels {
            workflow: self.workflow_label(workflow),
            source: meta.source.as_str(),
        };
        let family = match kind {
            Kind::Stored => &self.workflow_stored,
            Kind::Dropped => &self.workflow_dropped,
        };
        family.get_or_create(&labels).inc_by(bytes);
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

    /// Storage calls of kind `op` made so far, both outcomes (tests count requests with it).
    #[cfg(test)]
    pub(crate) fn storage_calls(&self, op: &str) -> u64 {
        let label = format!("op=\"{op}\"");
        self.render()
            .lines()
            .filter(|l| {
                l.starts_with("relay_metadata_api_storage_seconds_count") && l.contains(&label)
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workflow_labels_are_capped() {
        let m = Metrics::new();
        for i in 0..MAX_WORKFLOWS {
            assert_eq!(m.workflow_label(&format!("w{i}")), format!("w{i}"));
        }
        assert_eq!(m.workflow_label("late"), OTHER_WORKFLOW);
        assert_eq!(m.workflow_label("w7"), "w7");
    }
}

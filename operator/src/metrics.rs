//! Prometheus metrics of the controller and leader election, served at `/metrics` together with
//! the webhook's.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::{
    counter::Counter, family::Family, gauge::Gauge, histogram::Histogram,
};
use prometheus_client::registry::Registry;

/// Label of a reconcile's outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `ok` or `error`.
    pub result: &'static str,
}

/// Metrics of the tenant reconciler. Cloning shares them.
#[derive(Clone, Debug)]
pub struct ControllerMetrics {
    reconciles: Family<ResultLabels, Counter>,
    duration: Histogram,
    /// 1 while this replica holds the leader lease.
    pub leader: Gauge,
}

impl Default for ControllerMetrics {
    fn default() -> Self {
        Self {
            reconciles: Family::default(),
            duration: Histogram::new([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]),
            leader: Gauge::default(),
        }
    }
}

impl ControllerMetrics {
    /// Registers the metrics under `relay_operator_`.
    pub fn register(&self, registry: &mut Registry) {
        let sub = registry.sub_registry_with_prefix("relay_operator");
        sub.register(
            "reconciles",
            "Tenant reconciles by result",
            self.reconciles.clone(),
        );
        sub.register(
            "reconcile_duration_seconds",
            "Time a tenant reconcile took",
            self.duration.clone(),
        );
        sub.register(
            "leader",
            "1 while this replica holds the leader lease",
            self.leader.clone(),
        );
    }

    /// Records one reconcile.
    pub fn observe(&self, ok: bool, took: Duration) {
        let result = if ok { "ok" } else { "error" };
        self.reconciles
            .get_or_create(&ResultLabels { result })
            .inc();
        self.duration.observe(took.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconciles_are_counted_by_result() {
        let metrics = ControllerMetrics::default();
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        metrics.observe(true, Duration::from_millis(3));
        metrics.observe(true, Duration::from_millis(3));
        metrics.observe(false, Duration::from_millis(3));
        metrics.leader.set(1);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("relay_operator_reconciles_total{result=\"ok\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("relay_operator_reconciles_total{result=\"error\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("relay_operator_reconcile_duration_seconds_count 3"),
            "{text}"
        );
        assert!(text.contains("relay_operator_leader 1"), "{text}");
    }
}

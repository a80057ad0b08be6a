//! [`WebhookMetrics`]: reviews answered by outcome, containers left unwrapped by reason, and the
//! time to answer.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::Outcome;
use crate::mutate::SkipReason;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// The webhook's Prometheus metrics. Clones share the same series.
#[derive(Debug, Clone)]
pub struct WebhookMetrics {
    admissions: Family<OutcomeLabels, Counter>,
    skipped: Family<ReasonLabels, Counter>,
    latency: Histogram,
}

impl Default for WebhookMetrics {
    fn default() -> Self {
        Self {
            admissions: Family::default(),
            skipped: Family::default(),
            // 0.5 ms .. ~4 s
            latency: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
        }
    }
}

impl WebhookMetrics {
    /// Registers the metrics under the `relay_operator_webhook` prefix of `registry`:
    /// `relay_operator_webhook_admissions_total{outcome}`,
    /// `relay_operator_webhook_skipped_containers_total{reason}` and
    /// `relay_operator_webhook_admission_duration_seconds`.
    pub fn register(&self, registry: &mut Registry) {
        let sub = registry.sub_registry_with_prefix("relay_operator_webhook");
        sub.register(
            "admissions",
            "Admission reviews answered, by outcome",
            self.admissions.clone(),
        );
        sub.register(
            "skipped_containers",
            "Containers of mutated pods left unwrapped, by reason",
            self.skipped.clone(),
        );
        sub.register(
            "admission_duration_seconds",
            "Time to answer an admission review",
            self.latency.clone(),
        );
    }

    /// Reviews answered with `outcome` so far.
    pub fn admissions(&self, outcome: Outcome) -> u64 {
        self.admissions
            .get_or_create(&OutcomeLabels {
                outcome: outcome.as_str(),
            })
            .get()
    }

    /// Containers skipped for `reason` so far.
    pub fn skipped(&self, reason: SkipReason) -> u64 {
        self.skipped
            .get_or_create(&ReasonLabels {
                reason: reason.as_str(),
            })
            .get()
    }

    /// Counts a review answered with `outcome`, and the time it took.
    pub(super) fn record_admission(&self, outcome: Outcome, took: Duration) {
        self.admissions
            .get_or_create(&OutcomeLabels {
                outcome: outcome.as_str(),
            })
            .inc();
        self.latency.observe(took.as_secs_f64());
    }

    /// Counts a container of a mutated pod left unwrapped for `reason`.
    pub(super) fn record_skipped(&self, reason: SkipReason) {
        self.skipped
            .get_or_create(&ReasonLabels {
                reason: reason.as_str(),
            })
            .inc();
    }
}

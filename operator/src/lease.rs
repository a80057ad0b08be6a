//! Leader election on a `coordination.k8s.io/v1` Lease, so two operator replicas can run: both
//! serve the webhook, only the lease holder reconciles.
//!
//! This follows client-go's `leaderelection`: a candidate takes the lease when it is free, or when
//! its record (holder and renew time) has not changed for a whole lease duration *as observed by
//! the candidate's own clock*, so clock skew between replicas does not matter. Every write is a
//! `replace` carrying the `resourceVersion` that was read, so two candidates never both win: the
//! API server refuses the second write with 409. The holder renews every
//! [`LeaseConfig::renew_every`] and steps down when it has not renewed for
//! [`LeaseConfig::renew_deadline`] (shorter than the lease duration, so it stops acting before
//! anyone else may take over). Stepping down releases the lease so a successor need not wait.
//!
//! kube-rs has no leader election of its own; the crates that add one lag kube's releases, and the
//! protocol is short enough to keep here with its tests.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, PostParams};
use tracing::{debug, info, warn};

/// Timing and identity of a candidate.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// Unique per replica: the pod name.
    pub identity: String,
    /// How long a lease is valid after its last renewal.
    pub lease_duration: Duration,
    /// The holder steps down when it could not renew for this long.
    pub renew_deadline: Duration,
    /// How often the holder renews and a candidate retries.
    pub renew_every: Duration,
}

impl LeaseConfig {
    /// client-go's defaults: 15 s lease, 10 s renew deadline, 2 s retry period.
    pub fn new(
        namespace: impl Into<String>,
        name: impl Into<String>,
        identity: impl Into<String>,
    ) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            renew_every: Duration::from_secs(2),
        }
    }
}

/// A lease call that failed.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("Lease API call failed: {0}")]
    Kube(#[from] kube::Error),
}

/// What a candidate last saw of someone else's lease, and when (by its own clock).
#[derive(Debug, Clone, PartialEq)]
struct Observed {
    holder: Option<String>,
    renew_time: Option<MicroTime>,
    at: Instant,
}

/// A candidate for the lease.
#[derive(Debug)]
pub struct Elector {
    api: Api<Lease>,
    config: LeaseConfig,
    observed: Option<Observed>,
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(status) if status.is_conflict() || status.is_already_exists())
}

fn seconds(d: Duration) -> i32 {
    i32::try_from(d.as_secs().max(1)).unwrap_or(i32::MAX)
}

impl Elector {
    pub fn new(client: Client, config: LeaseConfig) -> Self {
        Self {
            api: Api::namespaced(client, &config.namespace),
            config,
            observed: None,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &LeaseConfig {
        &self.config
    }

    /// Takes or renews the lease. `Ok(true)` when this candidate holds it now.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool, LeaseError> {
        let now = MicroTime(Timestamp::now());
        let existing = match self.api.get_opt(&self.config.name).await? {
            Some(lease) => lease,
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.config.name.clone()),
                        namespace: Some(self.config.namespace.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(self.spec(now.clone(), now, 0)),
                };
                return match self.api.create(&PostParams::default(), &lease).await {
                    Ok(_) => Ok(true),
                    Err(e) if is_conflict(&e) => Ok(false),
                    Err(e) => Err(e.into()),
                };
            }
        };
        let spec = existing.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let ours = holder.as_deref() == Some(self.config.identity.as_str());
        if !ours && holder.is_some() && !self.expired(&spec) {
            return Ok(false);
        }
        let (acquired, transitions) = if ours {
            (
                spec.acquire_time.clone().unwrap_or_else(|| now.clone()),
                spec.lease_transitions.unwrap_or(0),
            )
        } else {
            (now.clone(), spec.lease_transitions.unwrap_or(0) + 1)
        };
        let mut lease = existing;
        lease.spec = Some(self.spec(acquired, now, transitions));
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => {
                if !ours {
                    info!(identity = %self.config.identity, previous = ?holder, "took the leader lease");
                }
                Ok(true)
            }
            Err(e) if is_conflict(&e) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    fn spec(&self, acquired: MicroTime, renewed: MicroTime, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.config.identity.clone()),
            lease_duration_seconds: Some(seconds(self.config.lease_duration)),
            acquire_time: Some(acquired),
            renew_time: Some(renewed),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    /// Whether someone else's lease has gone unrenewed for its duration, by our own clock.
    fn expired(&mut self, spec: &LeaseSpec) -> bool {
        let seen = Observed {
            holder: spec.holder_identity.clone(),
            renew_time: spec.renew_time.clone(),
            at: Instant::now(),
        };
        let duration = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map_or(self.config.lease_duration, Duration::from_secs);
        match &self.observed {
            Some(before)
                if before.holder == seen.holder && before.renew_time == seen.renew_time =>
            {
                before.at.elapsed() >= duration
            }
            _ => {
                self.observed = Some(seen);
                false
            }
        }
    }

    /// Waits until this candidate holds the lease.
    pub async fn acquire(&mut self) {
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => return,
                Ok(false) => {
                    debug!(identity = %self.config.identity, "lease held by another replica")
                }
                Err(e) => warn!(error = %e, "cannot read or take the leader lease"),
            }
            tokio::time::sleep(self.config.renew_every).await;
        }
    }

    /// Renews the lease until it is lost (taken by another, or not renewed within the renew
    /// deadline) and returns then. Call after [`Elector::acquire`].
    pub async fn hold(&mut self) {
        let mut renewed = Instant::now();
        loop {
            tokio::time::sleep(self.config.renew_every).await;
            match self.try_acquire_or_renew().await {
                Ok(true) => renewed = Instant::now(),
                Ok(false) => {
                    warn!(identity = %self.config.identity, "leader lease taken by another replica");
                    return;
                }
                Err(e) => warn!(error = %e, "cannot renew the leader lease"),
            }
            if renewed.elapsed() >= self.config.renew_deadline {
                warn!(identity = %self.config.identity, "leader lease not renewed within the deadline");
                return;
            }
        }
    }

    /// Gives the lease up if this candidate holds it, so a successor takes over at once.
    pub async fn release(&mut self) -> Result<(), LeaseError> {
        let Some(mut lease) = self.api.get_opt(&self.config.name).await? else {
            return Ok(());
        };
        let ours = lease
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.as_deref())
            == Some(self.config.identity.as_str());
        if !ours {
            return Ok(());
        }
        if let Some(spec) = lease.spec.as_mut() {
            spec.holder_identity = None;
            spec.lease_duration_seconds = Some(1);
            spec.renew_time = Some(MicroTime(Timestamp::now()));
        }
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_conflict(&e) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

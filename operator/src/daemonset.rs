//! The collector DaemonSet, owned by the operator.
//!
//! The DaemonSet is `deploy/base/collector/daemonset.yaml`, embedded here as [`TEMPLATE`]: one file
//! that reviewers read and that also works without the operator. The operator sets the image and
//! appends extra arguments from its flags, and applies it server-side in its own namespace. It
//! applies again when the DaemonSet is deleted or its generation moves past what the operator last
//! applied (someone else changed the spec), and every [`CollectorConfig::resync`] otherwise. An
//! apply that changes nothing does not bump the generation, so the collectors are not rolled.
//!
//! Which pods the collectors capture is not in the DaemonSet: they select namespaces labelled
//! `relay.sh/tenant=true`, which the tenant reconciler maintains (see [`crate::controller`]), so
//! tenants come and go without restarting a collector.

use std::future::Future;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::EnvVar;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, watcher};
use kube::{Client, ResourceExt};
use tracing::{info, warn};

use crate::controller::FIELD_MANAGER;

/// `deploy/base/collector/daemonset.yaml`.
pub const TEMPLATE: &str = include_str!("../../deploy/base/collector/daemonset.yaml");
/// The container in the template that runs the collector.
pub const CONTAINER: &str = "collector";

/// How the operator runs the collectors.
#[derive(Debug, Clone)]
pub struct CollectorConfig {
    /// Namespace of the DaemonSet (the operator's own).
    pub namespace: String,
    /// The collector image.
    pub image: String,
    /// Arguments appended to the template's.
    pub extra_args: Vec<String>,
    /// Environment variables (name, value) set on the collector container, replacing the
    /// template's of the same name.
    pub extra_env: Vec<(String, String)>,
    /// Run the collector pods in the node's network namespace (`hostNetwork: true`, with
    /// `dnsPolicy: ClusterFirstWithHostNet` so that Service names still resolve): for clusters
    /// where node agents reach the metadata API from the node, not from the pod network.
    pub host_network: bool,
    /// The DaemonSet template as YAML; [`TEMPLATE`] unless replaced.
    pub template: String,
    /// How often the DaemonSet is applied even when nothing was seen to change.
    pub resync: Duration,
}

impl CollectorConfig {
    /// The embedded template with `image`, in `namespace`.
    pub fn new(namespace: impl Into<String>, image: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            image: image.into(),
            extra_args: Vec::new(),
            extra_env: Vec::new(),
            host_network: false,
            template: TEMPLATE.to_owned(),
            resync: Duration::from_secs(300),
        }
    }
}

/// A DaemonSet template the operator cannot use.
#[derive(Debug, thiserror::Error)]
pub enum CollectorError {
    #[error("the collector DaemonSet template is not a DaemonSet: {0}")]
    Template(#[from] serde_norway::Error),
    #[error("the collector DaemonSet template has no container named {CONTAINER:?}")]
    NoContainer,
    #[error("applying the collector DaemonSet failed: {0}")]
    Kube(#[from] kube::Error),
}

/// The DaemonSet the operator applies.
pub fn desired(config: &CollectorConfig) -> Result<DaemonSet, CollectorError> {
    let mut daemonset: DaemonSet = serde_norway::from_str(&config.template)?;
    daemonset.metadata.namespace = Some(config.namespace.clone());
    daemonset.metadata.resource_version = None;
    daemonset.status = None;
    let pod = daemonset
        .spec
        .as_mut()
        .and_then(|s| s.template.spec.as_mut())
        .ok_or(CollectorError::NoContainer)?;
    if config.host_network {
        pod.host_network = Some(true);
        pod.dns_policy = Some("ClusterFirstWithHostNet".to_owned());
    }
    let container = pod
        .containers
        .iter_mut()
        .find(|c| c.name == CONTAINER)
        .ok_or(CollectorError::NoContainer)?;
    container.image = Some(config.image.clone());
    if !config.extra_args.is_empty() {
        container
            .args
            .get_or_insert_with(Vec::new)
            .extend(config.extra_args.iter().cloned());
    }
    if !config.extra_env.is_empty() {
        let env = container.env.get_or_insert_with(Vec::new);
        for (name, value) in &config.extra_env {
            // One entry per name: a second one would make the apply ambiguous (env is a list
            // merged by name) and the kubelet would take the last.
            env.retain(|e| &e.name != name);
            env.push(EnvVar {
                name: name.clone(),
                value: Some(value.clone()),
                value_from: None,
            });
        }
    }
    Ok(daemonset)
}

/// Applies the DaemonSet; returns the generation the API server gave it.
pub async fn apply(
    client: &Client,
    config: &CollectorConfig,
) -> Result<Option<i64>, CollectorError> {
    let daemonset = desired(config)?;
    let api = Api::<DaemonSet>::namespaced(client.clone(), &config.namespace);
    let applied = api
        .patch(
            &daemonset.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&daemonset),
        )
        .await?;
    Ok(applied.metadata.generation)
}

/// Keeps the DaemonSet applied until `shutdown` resolves. Fails only on a template that cannot
/// be used; API errors are logged and retried.
pub async fn run(
    client: Client,
    config: CollectorConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), CollectorError> {
    let name = desired(&config)?.name_any();
    let api = Api::<DaemonSet>::namespaced(client.clone(), &config.namespace);
    let watch = watcher(
        api,
        watcher::Config::default().fields(&format!("metadata.name={name}")),
    )
    .default_backoff();
    let mut watch = std::pin::pin!(watch);
    let mut shutdown = std::pin::pin!(shutdown);
    let mut applied: Option<i64> = None;
    let mut resync = tokio::time::interval(config.resync);
    loop {
        let reapply = tokio::select! {
            () = &mut shutdown => return Ok(()),
            _ = resync.tick() => true,
            event = watch.next() => match event {
                Some(Ok(watcher::Event::Delete(_))) => {
                    info!(daemonset = %name, "collector DaemonSet deleted; applying it again");
                    true
                }
                Some(Ok(watcher::Event::Apply(ds) | watcher::Event::InitApply(ds))) => {
                    ds.metadata.generation != applied
                }
                Some(Ok(watcher::Event::Init | watcher::Event::InitDone)) => false,
                Some(Err(e)) => {
                    warn!(error = %e, "watching the collector DaemonSet");
                    false
                }
                None => {
                    warn!("the collector DaemonSet watch ended");
                    return Ok(());
                }
            },
        };
        if reapply {
            match apply(&client, &config).await {
                Ok(generation) => {
                    if generation != applied {
                        info!(daemonset = %name, ?generation, image = %config.image, "applied the collector DaemonSet");
                    }
                    applied = generation;
                }
                Err(CollectorError::Kube(e)) => {
                    warn!(error = %e, "cannot apply the collector DaemonSet; retrying");
                }
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_gets_the_image_namespace_and_extra_args() {
        let mut config = CollectorConfig::new("ops", "registry.example/relay/collector@sha256:1");
        config.extra_args = vec!["--gzip-level".to_owned(), "1".to_owned()];
        let ds = desired(&config).unwrap();
        assert_eq!(ds.metadata.namespace.as_deref(), Some("ops"));
        assert_eq!(ds.metadata.name.as_deref(), Some("relay-collector"));
        let spec = ds.spec.unwrap().template.spec.unwrap();
        assert_eq!(spec.host_pid, Some(true));
        let c = spec
            .containers
            .iter()
            .find(|c| c.name == CONTAINER)
            .unwrap();
        assert_eq!(
            c.image.as_deref(),
            Some("registry.example/relay/collector@sha256:1")
        );
        let args = c.args.clone().unwrap();
        assert!(args.starts_with(&["--kubernetes".to_owned()]), "{args:?}");
        assert!(
            args.ends_with(&["--gzip-level".to_owned(), "1".to_owned()]),
            "{args:?}"
        );
    }

    #[test]
    fn host_network_and_env_are_set_on_request_only() {
        let plain = desired(&CollectorConfig::new("ops", "img")).unwrap();
        let spec = plain.spec.unwrap().template.spec.unwrap();
        assert_eq!(spec.host_network, None);
        assert_eq!(spec.dns_policy, None);

        let mut config = CollectorConfig::new("ops", "img");
        config.host_network = true;
        config.extra_env = vec![
            (
                contract::env::METADATA_API_URL.to_owned(),
                "http://127.0.0.1:1".to_owned(),
            ),
            ("KUBERNETES_SERVICE_HOST".to_owned(), "127.0.0.1".to_owned()),
        ];
        let spec = desired(&config)
            .unwrap()
            .spec
            .unwrap()
            .template
            .spec
            .unwrap();
        assert_eq!(spec.host_network, Some(true));
        assert_eq!(spec.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
        let env = spec.containers[0].env.clone().unwrap();
        let values = |name: &str| -> Vec<Option<String>> {
            env.iter()
                .filter(|e| e.name == name)
                .map(|e| e.value.clone())
                .collect()
        };
        // The template's URL is replaced, not doubled; its other variables stay.
        assert_eq!(
            values(contract::env::METADATA_API_URL),
            [Some("http://127.0.0.1:1".to_owned())]
        );
        assert_eq!(
            values("KUBERNETES_SERVICE_HOST"),
            [Some("127.0.0.1".to_owned())]
        );
        assert_eq!(values("NODE_NAME").len(), 1);
    }

    #[test]
    fn a_template_without_the_collector_container_is_refused() {
        let mut config = CollectorConfig::new("ops", "img");
        config.template = TEMPLATE.replace("- name: collector", "- name: other");
        assert!(matches!(desired(&config), Err(CollectorError::NoContainer)));
        config.template = "kind: [".to_owned();
        assert!(matches!(desired(&config), Err(CollectorError::Template(_))));
    }
}

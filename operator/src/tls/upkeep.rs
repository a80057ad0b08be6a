//! Upkeep of the webhook's TLS material in Kubernetes: the Secret holding the CA and serving
//! certificate ([`ensure_secret`]), the MutatingWebhookConfiguration's `caBundle`
//! ([`ensure_ca_bundle`]), and the loop that re-checks both and hands new material to
//! [`crate::webhook::serve`] ([`tls_upkeep`]).
//!
//! Every replica runs the upkeep. Two replicas making material at once is settled by the API
//! server: a create that finds the Secret existing, or a patch whose `resourceVersion` is stale,
//! gets 409, and the loser re-reads and uses the winner's material.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use serde_json::json;
use tokio::sync::watch;

use super::material::{SECRET_TYPE, secret_bytes, stored};
use super::serving::material_loads;
use crate::tls::{self, TlsError, WebhookTls};

/// How many times a contended Secret write is retried.
const ATTEMPTS: usize = 5;
/// Delay before a failed upkeep pass is tried again.
const RETRY_AFTER_ERROR: Duration = Duration::from_secs(10);

/// Where the material lives and what it must be valid for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsUpkeep {
    /// Namespace of the Secret and of the webhook's Service.
    pub namespace: String,
    /// Name of the Secret.
    pub secret_name: String,
    /// Name of the webhook's Service: the certificate carries its DNS names
    /// ([`tls::dns_names`]).
    pub service: String,
    /// IP addresses the certificate must also be valid for (a `url:` client config, tests).
    pub ip_addresses: Vec<IpAddr>,
    /// Name of the MutatingWebhookConfiguration whose `caBundle` is kept current.
    pub webhook_configuration: String,
    /// How often the Secret and the `caBundle` are checked besides on Secret changes.
    pub interval: Duration,
}

impl TlsUpkeep {
    /// Upkeep for `service` in `namespace` with the material in `secret_name`, re-checked every
    /// 10 minutes, no IP addresses.
    pub fn new(
        namespace: impl Into<String>,
        secret_name: impl Into<String>,
        service: impl Into<String>,
        webhook_configuration: impl Into<String>,
    ) -> Self {
        Self {
            namespace: namespace.into(),
            secret_name: secret_name.into(),
            service: service.into(),
            ip_addresses: Vec::new(),
            webhook_configuration: webhook_configuration.into(),
            interval: Duration::from_secs(600),
        }
    }
}

/// Why the upkeep failed.
#[derive(Debug, thiserror::Error)]
pub enum UpkeepError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("Secret {0} kept changing under us after {ATTEMPTS} attempts")]
    Contended(String),
    #[error("serializing a patch: {0}")]
    Json(#[from] serde_json::Error),
}

/// The material of `secret` if it is complete and good: parseable, not due for renewal, valid
/// for `service`'s names and `ips`.
fn usable(
    secret: &Secret,
    service: &str,
    namespace: &str,
    ips: &[IpAddr],
    now: SystemTime,
) -> Option<WebhookTls> {
    let material = stored(secret)?;
    let renew = tls::needs_renewal_with_ips(&material.cert_pem, service, namespace, ips, now);
    (!renew && material_loads(&material)).then_some(material)
}

/// The webhook's TLS material from the Secret `secret_name` in `namespace`, made (and stored)
/// when the Secret is missing, incomplete, unparseable, due for renewal or not valid for the
/// DNS names of `service` and for `ips`. When another replica writes the Secret first, its
/// material is used.
pub async fn ensure_secret(
    client: &Client,
    namespace: &str,
    secret_name: &str,
    service: &str,
    ips: &[IpAddr],
) -> Result<WebhookTls, UpkeepError> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    for _ in 0..ATTEMPTS {
        let now = SystemTime::now();
        let existing = secrets.get_opt(secret_name).await?;
        if let Some(material) = existing
            .as_ref()
            .and_then(|s| usable(s, service, namespace, ips, now))
        {
            return Ok(material);
        }
        // Renewal keeps the stored CA while it lasts, so the caBundle stays valid throughout.
        let old = existing.as_ref().and_then(stored);
        let fresh = tls::renew_with_ips(old.as_ref(), service, namespace, ips, now)?;
        let written = match existing {
            None => {
                let secret = Secret {
                    metadata: ObjectMeta {
                        name: Some(secret_name.to_owned()),
                        namespace: Some(namespace.to_owned()),
                        labels: Some(BTreeMap::from([(
                            "app.kubernetes.io/part-of".to_owned(),
                            "relay".to_owned(),
                        )])),
                        ..Default::default()
                    },
                    type_: Some(SECRET_TYPE.to_owned()),
                    data: Some(secret_bytes(&fresh)),
                    ..Default::default()
                };
                secrets
                    .create(&PostParams::default(), &secret)
                    .await
                    .map(drop)
            }
            Some(old) => {
                // The resourceVersion makes the patch conditional: 409 when someone else wrote.
                let patch = json!({
                    "metadata": { "resourceVersion": old.metadata.resource_version },
                    "data": serde_json::to_value(secret_bytes(&fresh))?,
                });
                secrets
                    .patch(secret_name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map(drop)
            }
        };
        match written {
            Ok(()) => {
                tracing::info!(%namespace, secret = %secret_name, "webhook TLS material made");
                return Ok(fresh);
            }
            Err(kube::Error::Api(status)) if status.is_conflict() || status.is_already_exists() => {
                tracing::info!(
                    %namespace, secret = %secret_name,
                    "webhook TLS Secret written concurrently; using the winner's"
                );
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(UpkeepError::Contended(format!("{namespace}/{secret_name}")))
}

/// Sets `clientConfig.caBundle` of every webhook of the MutatingWebhookConfiguration
/// `webhook_configuration` to `ca_pem` where it differs. True when something was patched.
pub async fn ensure_ca_bundle(
    client: &Client,
    webhook_configuration: &str,
    ca_pem: &str,
) -> Result<bool, UpkeepError> {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let config = api.get(webhook_configuration).await?;
    let bundle = ByteString(ca_pem.as_bytes().to_vec());
    let stale: Vec<serde_json::Value> = config
        .webhooks
        .iter()
        .flatten()
        .filter(|w| w.client_config.ca_bundle.as_ref() != Some(&bundle))
        .map(|w| {
            Ok(json!({
                "name": w.name,
                "clientConfig": { "caBundle": serde_json::to_value(&bundle)? },
            }))
        })
        .collect::<Result<_, serde_json::Error>>()?;
    if stale.is_empty() {
        return Ok(false);
    }
    // Webhooks merge by name (strategic merge), so a concurrent edit of the list is not lost.
    let patch = json!({ "webhooks": stale });
    api.patch(
        webhook_configuration,
        &PatchParams::default(),
        &Patch::Strategic(&patch),
    )
    .await?;
    tracing::info!(
        configuration = %webhook_configuration,
        webhooks = stale.len(),
        "webhook caBundle updated"
    );
    Ok(true)
}

/// One upkeep pass: the Secret, then the `caBundle` (so the API server trusts the CA before the
/// server presents a certificate it signed), then the material for the server.
async fn pass(
    client: &Client,
    upkeep: &TlsUpkeep,
    tx: &watch::Sender<WebhookTls>,
) -> Result<(), UpkeepError> {
    let material = ensure_secret(
        client,
        &upkeep.namespace,
        &upkeep.secret_name,
        &upkeep.service,
        &upkeep.ip_addresses,
    )
    .await?;
    ensure_ca_bundle(client, &upkeep.webhook_configuration, &material.ca_cert_pem).await?;
    tx.send_if_modified(|current| {
        let changed = *current != material;
        if changed {
            *current = material;
        }
        changed
    });
    Ok(())
}

/// Makes sure the material exists and returns a receiver of it for
/// [`crate::webhook::serve`], with the loop that keeps it current: it re-checks the Secret and
/// the `caBundle` on every change of the Secret and every [`TlsUpkeep::interval`] (10 s after a
/// failure), and sends material that changed. Run the loop on the runtime; it ends when every
/// receiver is dropped.
///
/// Fails only when the Secret cannot be read or written at start; a `caBundle` that cannot be
/// set yet (for example the configuration is not applied) is logged and retried by the loop.
pub async fn tls_upkeep(
    client: Client,
    upkeep: TlsUpkeep,
) -> Result<
    (
        watch::Receiver<WebhookTls>,
        impl Future<Output = ()> + Send + 'static,
    ),
    UpkeepError,
> {
    let material = ensure_secret(
        &client,
        &upkeep.namespace,
        &upkeep.secret_name,
        &upkeep.service,
        &upkeep.ip_addresses,
    )
    .await?;
    let first_bundle = ensure_ca_bundle(
        &client,
        &upkeep.webhook_configuration,
        &material.ca_cert_pem,
    )
    .await;
    if let Err(e) = &first_bundle {
        tracing::warn!(error = %e, "cannot set the webhook caBundle yet; retrying");
    }
    let (tx, rx) = watch::channel(material);
    let run = async move {
        let secrets: Api<Secret> = Api::namespaced(client.clone(), &upkeep.namespace);
        let config =
            watcher::Config::default().fields(&format!("metadata.name={}", upkeep.secret_name));
        let mut changes = std::pin::pin!(watcher(secrets, config).default_backoff());
        let mut next = tokio::time::Instant::now()
            + if first_bundle.is_ok() {
                upkeep.interval
            } else {
                RETRY_AFTER_ERROR
            };
        loop {
            tokio::select! {
                () = tx.closed() => return,
                () = tokio::time::sleep_until(next) => {}
                event = changes.next() => match event {
                    Some(Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)
                        | watcher::Event::InitDone)) => {}
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "webhook Secret watch failed; retrying");
                        continue;
                    }
                    None => return,
                },
            }
            next = match pass(&client, &upkeep, &tx).await {
                Ok(()) => tokio::time::Instant::now() + upkeep.interval,
                Err(e) => {
                    tracing::warn!(error = %e, "webhook TLS upkeep failed; retrying");
                    tokio::time::Instant::now() + RETRY_AFTER_ERROR.min(upkeep.interval)
                }
            };
        }
    };
    Ok((rx, run))
}

//! What a review looks up besides the pod: the tenants (a reflector cache), the `ENTRYPOINT` and
//! `CMD` of images ([`ImageLookup`]) and the key names of Secrets ([`SecretKeyLookup`]). The
//! image and Secret lookups run concurrently, each bounded by its deadline of
//! [`WebhookConfig`](super::WebhookConfig).

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::future::Future;
use std::sync::Arc;

use futures::StreamExt;
use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};

use super::Webhook;
use crate::crd::Tenant;
use crate::mutate::ImageCommand;

/// Looks up the `ENTRYPOINT` and `CMD` of images, for containers without `command`.
pub trait ImageLookup: Send + Sync + 'static {
    /// The command of each of `images` (distinct references, as written in `pod`'s containers),
    /// resolved concurrently, with `pod`'s pull secrets and ServiceAccount. An image missing from
    /// the map counts as failed. The webhook bounds the whole call by
    /// [`WebhookConfig::image_lookup_timeout`](super::WebhookConfig::image_lookup_timeout).
    fn lookup<'a>(
        &'a self,
        pod: &'a Pod,
        images: Vec<String>,
    ) -> BoxFuture<'a, HashMap<String, Result<ImageCommand, String>>>;
}

/// An [`ImageLookup`] for running without registry access: every lookup fails, so containers
/// without `command` stay unwrapped.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoImageLookup;

impl ImageLookup for NoImageLookup {
    fn lookup<'a>(
        &'a self,
        _pod: &'a Pod,
        images: Vec<String>,
    ) -> BoxFuture<'a, HashMap<String, Result<ImageCommand, String>>> {
        let failed = images
            .into_iter()
            .map(|image| (image, Err("image lookup disabled".to_owned())))
            .collect();
        Box::pin(futures::future::ready(failed))
    }
}

/// The key names of each looked-up Secret, or why they are unknown.
pub type SecretKeys = HashMap<String, Result<Vec<String>, String>>;

/// Reads the key names of Secrets, for the `RELAY_REDACT_ENV` list of containers that take all of
/// a Secret's keys through `envFrom` without a prefix
/// ([`mutate::secrets_to_read`](crate::mutate::secrets_to_read)).
pub trait SecretKeyLookup: Send + Sync + 'static {
    /// The key names of each of `names` (distinct Secrets in `namespace`), read concurrently. A
    /// Secret missing from the map counts as failed. The webhook bounds the whole call by
    /// [`WebhookConfig::secret_lookup_timeout`](super::WebhookConfig::secret_lookup_timeout).
    /// Only key names leave it, never values.
    fn keys<'a>(&'a self, namespace: &'a str, names: Vec<String>) -> BoxFuture<'a, SecretKeys>;
}

/// A [`SecretKeyLookup`] reading the Secrets from the API server (`get secrets` in the pods'
/// namespaces).
#[derive(Clone)]
pub struct ApiSecretKeys {
    pub client: Client,
}

impl fmt::Debug for ApiSecretKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiSecretKeys").finish_non_exhaustive()
    }
}

impl SecretKeyLookup for ApiSecretKeys {
    fn keys<'a>(&'a self, namespace: &'a str, names: Vec<String>) -> BoxFuture<'a, SecretKeys> {
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        Box::pin(async move {
            let reads = names.into_iter().map(|name| {
                let secrets = secrets.clone();
                async move {
                    let keys = match secrets.get_opt(&name).await {
                        // The values go out of scope here, unread.
                        Ok(Some(secret)) => Ok(secret
                            .data
                            .into_iter()
                            .flat_map(|d| d.into_keys())
                            .chain(secret.string_data.into_iter().flat_map(|d| d.into_keys()))
                            .collect()),
                        Ok(None) => Err("not found".to_owned()),
                        Err(e) => Err(e.to_string()),
                    };
                    (name, keys)
                }
            });
            futures::future::join_all(reads).await.into_iter().collect()
        })
    }
}

/// A [`SecretKeyLookup`] for running without reading Secrets: every lookup fails, so Secrets
/// taken whole through `envFrom` list no keys.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoSecretKeyLookup;

impl SecretKeyLookup for NoSecretKeyLookup {
    fn keys<'a>(&'a self, _namespace: &'a str, names: Vec<String>) -> BoxFuture<'a, SecretKeys> {
        let failed = names
            .into_iter()
            .map(|name| (name, Err("secret lookup disabled".to_owned())))
            .collect();
        Box::pin(futures::future::ready(failed))
    }
}

/// A reflector store of all tenants and the future that keeps it current (run it on the
/// runtime; it ends only when the process does).
pub fn tenant_reflector(client: Client) -> (Store<Tenant>, impl Future<Output = ()> + Send) {
    let (store, writer) = reflector::store();
    let stream = reflector::reflector(
        writer,
        watcher(Api::<Tenant>::all(client), watcher::Config::default()).default_backoff(),
    );
    let run = stream.for_each(|event| {
        if let Err(e) = event {
            tracing::warn!(error = %e, "tenant watch failed; retrying");
        }
        futures::future::ready(())
    });
    (store, run)
}

impl Webhook {
    /// The commands of `images`, bounded by
    /// [`WebhookConfig::image_lookup_timeout`](super::WebhookConfig::image_lookup_timeout).
    pub(super) async fn lookup_images(
        &self,
        pod: &Pod,
        namespace: &str,
        images: BTreeSet<String>,
    ) -> HashMap<String, Result<ImageCommand, String>> {
        if images.is_empty() {
            return HashMap::new();
        }
        let images: Vec<String> = images.into_iter().collect();
        let timeout = self.config.image_lookup_timeout;
        // The review's object often has no namespace; the lookup needs it for pull secrets.
        let mut placed = pod.clone();
        placed
            .metadata
            .namespace
            .get_or_insert_with(|| namespace.to_owned());
        match tokio::time::timeout(timeout, self.images.lookup(&placed, images.clone())).await {
            Ok(results) => results,
            Err(_) => images
                .into_iter()
                .map(|i| (i, Err(format!("lookup timed out after {timeout:?}"))))
                .collect(),
        }
    }

    /// The key names of `names` in `namespace`, bounded by
    /// [`WebhookConfig::secret_lookup_timeout`](super::WebhookConfig::secret_lookup_timeout).
    pub(super) async fn lookup_secret_keys(
        &self,
        namespace: &str,
        names: BTreeSet<String>,
    ) -> SecretKeys {
        if names.is_empty() {
            return HashMap::new();
        }
        let names: Vec<String> = names.into_iter().collect();
        let timeout = self.config.secret_lookup_timeout;
        match tokio::time::timeout(timeout, self.secrets.keys(namespace, names.clone())).await {
            Ok(keys) => keys,
            Err(_) => names
                .into_iter()
                .map(|n| (n, Err(format!("lookup timed out after {timeout:?}"))))
                .collect(),
        }
    }

    /// The tenant of `namespace`: the first by name when there are several.
    pub(super) fn tenant_of(&self, namespace: &str) -> Option<Arc<Tenant>> {
        self.tenants
            .state()
            .into_iter()
            .filter(|t| t.namespace().as_deref() == Some(namespace))
            .min_by(|a, b| a.name_any().cmp(&b.name_any()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn no_image_lookup_fails_every_image() {
        let pod = Pod::default();
        let got = NoImageLookup
            .lookup(&pod, vec!["a".to_owned(), "b".to_owned()])
            .await;
        assert_eq!(got.len(), 2);
        for image in ["a", "b"] {
            assert_eq!(
                got.get(image),
                Some(&Err("image lookup disabled".to_owned()))
            );
        }
    }

    #[tokio::test]
    async fn no_secret_key_lookup_fails_every_secret() {
        let got = NoSecretKeyLookup
            .keys("ns", vec!["a".to_owned(), "b".to_owned()])
            .await;
        assert_eq!(got.len(), 2);
        for name in ["a", "b"] {
            assert_eq!(
                got.get(name),
                Some(&Err("secret lookup disabled".to_owned()))
            );
        }
    }
}

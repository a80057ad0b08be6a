//! [`PodImageLookup`]: the webhook's image lookup, through a [`Registry`] with the pod's pull
//! secrets.

use std::{collections::HashMap, fmt};

use k8s_openapi::api::core::v1::Pod;

use super::{Registry, pull_auth_for_pod};
use crate::mutate::ImageCommand;

/// The webhook's image lookup: the pull secrets of the pod and of its ServiceAccount, then every
/// image concurrently through one [`Registry`].
#[derive(Clone)]
pub struct PodImageLookup {
    pub registry: Registry,
    pub client: kube::Client,
}

impl fmt::Debug for PodImageLookup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PodImageLookup")
            .field("registry", &self.registry)
            .finish_non_exhaustive()
    }
}

impl crate::webhook::ImageLookup for PodImageLookup {
    fn lookup<'a>(
        &'a self,
        pod: &'a Pod,
        images: Vec<String>,
    ) -> futures::future::BoxFuture<'a, HashMap<String, Result<ImageCommand, String>>> {
        Box::pin(async move {
            // Cached commands first: reading the pod's pull secrets costs two API calls, which
            // only a registry request needs.
            let mut found = HashMap::new();
            let mut missing = Vec::new();
            for image in images {
                match self.registry.cached_image_command(&image) {
                    Some(command) => {
                        found.insert(image, Ok(command));
                    }
                    None => missing.push(image),
                }
            }
            if missing.is_empty() {
                return found;
            }
            let auth = pull_auth_for_pod(&self.client, pod).await;
            let auth = &auth;
            let lookups = missing.into_iter().map(|image| async move {
                let result = self
                    .registry
                    .image_command(&image, auth)
                    .await
                    .map_err(|e| e.to_string());
                (image, result)
            });
            found.extend(futures::future::join_all(lookups).await);
            found
        })
    }
}

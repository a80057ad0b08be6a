//! The Kubernetes side: the kubeconfig (as kubectl finds it), pods, and the user's bearer token.

use std::path::PathBuf;

use http::header::AUTHORIZATION;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client, Config,
    client::ConfigExt,
    config::{KubeConfigOptions, Kubeconfig},
};
use tower::{Layer, ServiceExt, service_fn};

use crate::{
    error::{Error, chain},
    target::Context,
};

/// Where the kubeconfig comes from: `--kubeconfig`, else `KUBECONFIG` or `~/.kube/config`, else
/// the in-cluster configuration; `--context` picks a context.
#[derive(Debug, Clone, Default)]
pub struct KubeArgs {
    pub kubeconfig: Option<PathBuf>,
    pub context: Option<String>,
    pub namespace: Option<String>,
}

/// The loaded configuration, its client and the namespace commands work in.
#[derive(Clone)]
pub struct Kube {
    pub config: Config,
    pub client: Client,
    pub namespace: String,
}

impl std::fmt::Debug for Kube {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kube")
            .field("cluster_url", &self.config.cluster_url)
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

impl Kube {
    pub async fn load(args: &KubeArgs) -> Result<Self, Error> {
        let options = KubeConfigOptions {
            context: args.context.clone(),
            ..KubeConfigOptions::default()
        };
        let loaded = match (&args.kubeconfig, &args.context) {
            (Some(path), _) => match Kubeconfig::read_from(path) {
                Ok(file) => Config::from_custom_kubeconfig(file, &options)
                    .await
                    .map_err(|e| chain(&e)),
                Err(e) => Err(chain(&e)),
            },
            (None, Some(_)) => Config::from_kubeconfig(&options)
                .await
                .map_err(|e| chain(&e)),
            (None, None) => Config::infer().await.map_err(|e| chain(&e)),
        };
        let mut config =
            loaded.map_err(|e| Error::Usage(format!("cannot load the kubeconfig: {e}")))?;
        // A follower may see nothing for longer than kube's default read timeout (295 s).
        config.read_timeout = None;
        let client = Client::try_from(config.clone())
            .map_err(|e| Error::Usage(format!("cannot use the kubeconfig: {}", chain(&e))))?;
        let namespace = args
            .namespace
            .clone()
            .unwrap_or_else(|| config.default_namespace.clone());
        Ok(Self {
            config,
            client,
            namespace,
        })
    }

    /// The context of pod `name` in the namespace, from its labels.
    pub async fn pod_context(&self, name: &str) -> Result<Context, Error> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        let pod = pods
            .get_opt(name)
            .await
            .map_err(|e| kube_error(&e, "get pod"))?;
        let pod =
            pod.ok_or_else(|| Error::NotFound(format!("pod {}/{name} not found", self.namespace)))?;
        Context::of_pod(
            &self.namespace,
            name,
            &pod.metadata.labels.unwrap_or_default(),
        )
    }

    /// The bearer token the kubeconfig's user authenticates with, as kube-rs would send it:
    /// `token`, `tokenFile`, an `exec` credential plugin's `status.token` (or an auth provider's).
    pub async fn bearer_token(&self) -> Result<String, Error> {
        let no_token = |how: &str| {
            Error::Unauthorized(format!(
                "the relay API needs a bearer token, and the kubeconfig's user {how}: pass \
                 --token, set {}, or use a token from `kubectl create token`",
                contract::env::PLUGIN_TOKEN
            ))
        };
        let layer = self.config.auth_layer().map_err(|e| {
            Error::Unauthorized(format!(
                "cannot get the kubeconfig user's credentials: {}",
                chain(&e)
            ))
        })?;
        let Some(layer) = layer else {
            let info = &self.config.auth_info;
            let cert = info.client_certificate.is_some() || info.client_certificate_data.is_some();
            return Err(no_token(if cert {
                "has a client certificate only"
            } else {
                "has no token"
            }));
        };
        // The layer adds `Authorization` to a request, running an exec plugin if it must: give it
        // one and keep the header.
        let probe = layer.layer(service_fn(
            |req: http::Request<kube::client::Body>| async move {
                // A response, as the layer's `Either` side for static tokens requires one.
                Ok::<_, tower::BoxError>(http::Response::new(
                    req.headers().get(AUTHORIZATION).cloned(),
                ))
            },
        ));
        let header = probe
            .oneshot(http::Request::new(kube::client::Body::empty()))
            .await
            .map_err(|e| {
                Error::Unauthorized(format!(
                    "cannot get the kubeconfig user's token: {}",
                    chain(e.as_ref())
                ))
            })?;
        header
            .body()
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| no_token("has no bearer token (basic auth?)"))
    }
}

/// A kube API error as ours: the status decides the kind.
pub fn kube_error(e: &kube::Error, what: &str) -> Error {
    match e {
        kube::Error::Api(status) => {
            Error::from_status(status.code, format!("{what}: {}", status.message))
        }
        other => Error::Unavailable(format!(
            "cannot reach the Kubernetes API server ({what}): {}",
            chain(other)
        )),
    }
}

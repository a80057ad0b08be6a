//! The `--auth kubernetes` test bed: the testbed crate's real kube-apiserver, an admin client,
//! namespaces, ServiceAccounts and pods (nothing runs them: `spec.nodeName` is set by hand), bound
//! tokens from TokenRequest, and the real `metadata-api` binary pointed at it.

use std::sync::atomic::{AtomicI64, Ordering};

use k8s_openapi::api::{
    authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec},
    core::v1::{Namespace, Pod, ServiceAccount},
};
use kube::{
    Client,
    api::{Api as KubeResource, DeleteParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use serde_json::{Value, json};
use testbed::kube::KubeApi;

use super::Server;

/// The audience the API checks pod tokens for (its default `--token-audience`).
pub const AUDIENCE: &str = "relay-metadata-api";
/// The tenant namespace every bed has, with the ServiceAccount `runner`.
pub const TENANT: &str = "tenant";
/// The collector's namespace and ServiceAccount (the API's default `--collector-service-account`).
pub const COLLECTOR_NS: &str = "relay-system";
pub const COLLECTOR_SA: &str = "relay-collector";

/// The control plane, an admin client and the API under test (stopped before the control plane).
pub struct Bed {
    pub api: Server,
    pub client: Client,
    pub kube: KubeApi,
    _dir: tempfile::TempDir,
}

impl Bed {
    /// Starts the control plane (`None` when the test bed is not installed and not required) with
    /// the namespaces [`TENANT`] and [`COLLECTOR_NS`] and their ServiceAccounts, then the API with
    /// `--auth kubernetes` and `extra`.
    pub async fn start(extra: &[&str]) -> Option<Self> {
        // Its start uses a blocking HTTP client, which must not run on the runtime's thread.
        let kube = tokio::task::spawn_blocking(KubeApi::start_or_skip)
            .await
            .unwrap()?;
        let config = kube::Config::from_custom_kubeconfig(
            Kubeconfig::read_from(kube.kubeconfig_path()).unwrap(),
            &KubeConfigOptions::default(),
        )
        .await
        .unwrap();
        let client = Client::try_from(config).unwrap();
        for (ns, sa) in [(TENANT, "runner"), (COLLECTOR_NS, COLLECTOR_SA)] {
            namespace(&client, ns).await;
            service_account(&client, ns, sa).await;
        }
        let dir = tempfile::tempdir().unwrap();
        let storage = format!("file://{}", dir.path().join("streams").display());
        let mut args = vec!["--auth", "kubernetes"];
        args.extend_from_slice(extra);
        let api = Server::start_with_env(
            dir.path(),
            &storage,
            &args,
            &[(
                "KUBECONFIG".to_owned(),
                kube.kubeconfig_path().display().to_string(),
            )],
        );
        Some(Self {
            kube,
            client,
            api,
            _dir: dir,
        })
    }

    /// Creates namespace `ns` with the ServiceAccount `sa` (another tenant's, say).
    pub async fn tenant(&self, ns: &str, sa: &str) {
        namespace(&self.client, ns).await;
        service_account(&self.client, ns, sa).await;
    }

    /// Creates the ServiceAccount `sa` in the existing namespace `ns`.
    pub async fn account(&self, ns: &str, sa: &str) {
        service_account(&self.client, ns, sa).await;
    }

    /// Creates a pod of `sa` in `ns` on `node` with `labels`; returns its UID.
    pub async fn pod(&self, ns: &str, name: &str, sa: &str, node: &str, labels: Value) -> String {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": labels},
            "spec": {
                "serviceAccountName": sa,
                "nodeName": node,
                "containers": [{"name": "c", "image": "busybox"}],
            },
        }))
        .unwrap();
        let pod = KubeResource::<Pod>::namespaced(self.client.clone(), ns)
            .create(&PostParams::default(), &pod)
            .await
            .unwrap();
        pod.metadata.uid.unwrap()
    }

    pub async fn delete_pod(&self, ns: &str, name: &str) {
        KubeResource::<Pod>::namespaced(self.client.clone(), ns)
            .delete(name, &DeleteParams::default().grace_period(0))
            .await
            .unwrap();
    }

    /// A TokenRequest-minted token of `sa`, bound to the pod, for `audience`; never the same twice
    /// (each lives a second longer than the one before, so no two share their claims).
    pub async fn token(&self, ns: &str, sa: &str, pod: &str, uid: &str, audience: &str) -> String {
        static MINTED: AtomicI64 = AtomicI64::new(0);
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: vec![audience.to_owned()],
                expiration_seconds: Some(3600 + MINTED.fetch_add(1, Ordering::Relaxed)),
                bound_object_ref: Some(BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: Some(pod.into()),
                    uid: Some(uid.into()),
                }),
            },
            ..TokenRequest::default()
        };
        self.request_token(ns, sa, request).await
    }

    async fn request_token(&self, ns: &str, sa: &str, request: TokenRequest) -> String {
        KubeResource::<ServiceAccount>::namespaced(self.client.clone(), ns)
            .create_token_request(sa, &PostParams::default(), &request)
            .await
            .unwrap()
            .status
            .unwrap()
            .token
    }

    /// A token of `sa` for the API server itself (no audience asked, no object bound), as
    /// `kubectl create token` makes one.
    pub async fn account_token(&self, ns: &str, sa: &str) -> String {
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: Vec::new(),
                expiration_seconds: Some(3600),
                bound_object_ref: None,
            },
            ..TokenRequest::default()
        };
        self.request_token(ns, sa, request).await
    }

    pub fn http(&self, token: &str) -> super::Api {
        self.api.client(token)
    }
}

async fn namespace(client: &Client, ns: &str) {
    create(client, None, json!({"metadata": {"name": ns}}), |c, _| {
        KubeResource::<Namespace>::all(c)
    })
    .await;
}

async fn service_account(client: &Client, ns: &str, sa: &str) {
    create(
        client,
        Some(ns),
        json!({"metadata": {"name": sa}}),
        |c, ns| KubeResource::<ServiceAccount>::namespaced(c, ns.unwrap()),
    )
    .await;
}

async fn create<K, F>(client: &Client, ns: Option<&str>, body: Value, api: F)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
    F: Fn(Client, Option<&str>) -> KubeResource<K>,
{
    let obj: K = serde_json::from_value(body).unwrap();
    api(client.clone(), ns)
        .create(&PostParams::default(), &obj)
        .await
        .unwrap();
}

/// Labels of a Tekton step pod of workflow `w1`.
pub fn tekton_labels(run: &str, step: &str) -> Value {
    step_labels("w1", run, step)
}

/// Labels of a Tekton step pod: context `workflows/{workflow}/runs/{run}/steps/{step}`.
pub fn step_labels(workflow: &str, run: &str, step: &str) -> Value {
    json!({"tekton.dev/taskRun": "tr-1", "relay.sh/workflow": workflow, "relay.sh/run": run, "relay.sh/step": step})
}

/// Labels of a Knative trigger pod: context `workflows/{workflow}/triggers/{trigger}`.
pub fn trigger_labels(workflow: &str, trigger: &str) -> Value {
    json!({"serving.knative.dev/revision": "rev-1", "relay.sh/workflow": workflow, "relay.sh/trigger-sync-id": trigger})
}

/// Labels of a Knative trigger pod: context `workflows/w1/triggers/sync-1`.
pub fn knative_labels() -> Value {
    json!({"serving.knative.dev/revision": "rev-1", "relay.sh/workflow": "w1", "relay.sh/trigger-sync-id": "sync-1"})
}

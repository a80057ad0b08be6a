//! The admission webhook registered with a real kube-apiserver (1.20, the test bed's) over TLS:
//! pods created through the API server come back stored as the webhook mutated them. Also the
//! webhook spoken to directly over HTTPS (malformed reviews, latency) and the renewal of its
//! certificate through the Secret.
#![allow(clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Container, Namespace, Pod, Secret};
use k8s_openapi::api::events::v1::Event as K8sEvent;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::events::Recorder;
use kube::runtime::reflector::Store;
use kube::{Api, Client, CustomResourceExt, ResourceExt};
use operator::crd::{Tenant, TenantSpec};
use operator::mutate::{
    ENTRYPOINT_PATH, ENV_REDACT, INJECTED_ANNOTATION, TOKEN_VOLUME, TOOLS_MOUNT_PATH, TOOLS_VOLUME,
};
use operator::tls::{self, TlsUpkeep, WebhookTls, tls_upkeep};
use operator::webhook::{
    self, ApiSecretKeys, EVENT_REPORTER, MUTATE_PATH, NoImageLookup, Outcome,
    REASON_IMAGE_LOOKUP_FAILED, REASON_SECRET_KEYS_UNKNOWN, REASON_TOOLS_NOT_READY, Webhook,
    WebhookConfig, WebhookMetrics,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use testbed::kube::KubeApi;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsConnector;

const SYSTEM_NS: &str = "relay-system";
const SECRET: &str = "relay-webhook-tls";
const SERVICE: &str = "relay-operator";
const API_URL: &str = "http://metadata-api.relay-system.svc:8080";
const AUDIENCE: &str = "relay-metadata-api";
const CLAIM: &str = "relay-tools-v1";
const DEADLINE: Duration = Duration::from_secs(30);

/// The test bed's API server; its start blocks (and uses a blocking HTTP client).
async fn start_kube() -> Option<KubeApi> {
    tokio::task::spawn_blocking(KubeApi::start_or_skip)
        .await
        .expect("start the API server")
}

async fn client(kube: &KubeApi) -> Client {
    let kubeconfig = Kubeconfig::read_from(kube.kubeconfig_path()).expect("kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("config");
    Client::try_from(config).expect("client")
}

/// Polls `check` until it gives `Some`, or panics with `what` after [`DEADLINE`].
async fn wait_for<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let until = Instant::now() + DEADLINE;
    loop {
        if let Some(found) = check().await {
            return found;
        }
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn install_crd(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.create(&PostParams::default(), &Tenant::crd())
        .await
        .expect("create CRD");
    wait_for("the Tenant CRD to be established", || {
        let crds = crds.clone();
        async move {
            let crd = crds.get("tenants.relay.sh").await.ok()?;
            crd.status?
                .conditions?
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
                .then_some(())
        }
    })
    .await;
}

async fn namespace(client: &Client, name: &str, labels: &[(&str, &str)]) {
    let ns: Namespace = serde_json::from_value(json!({
        "metadata": {
            "name": name,
            "labels": labels.iter().map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
        }
    }))
    .expect("namespace");
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .expect("create namespace");
}

/// A tenant in `ns`; with `claim`, its status names a usable tools claim.
async fn tenant(client: &Client, ns: &str, claim: Option<&str>) {
    let tenants: Api<Tenant> = Api::namespaced(client.clone(), ns);
    tenants
        .create(
            &PostParams::default(),
            &Tenant::new("tenant", TenantSpec::default()),
        )
        .await
        .expect("create tenant");
    if let Some(claim) = claim {
        tenants
            .patch_status(
                "tenant",
                &PatchParams::default(),
                &Patch::Merge(json!({ "status": { "toolsVolumeClaim": claim } })),
            )
            .await
            .expect("patch tenant status");
    }
}

/// Waits until the webhook's cache holds the tenant of `ns` as it is stored.
async fn cached(store: &Store<Tenant>, ns: &str, claim: Option<&str>) {
    wait_for(&format!("the tenant of {ns} in the cache"), || async {
        store
            .state()
            .iter()
            .any(|t| t.namespace().as_deref() == Some(ns) && t.usable_tools_claim() == claim)
            .then_some(())
    })
    .await;
}

fn webhook_entry(name: &str, port: u16, selector: (&str, &str), policy: &str) -> Value {
    let mut entry = testbed::kube::pod_webhook(
        name,
        &format!("https://127.0.0.1:{port}{MUTATE_PATH}"),
        selector,
        policy,
    );
    entry["timeoutSeconds"] = json!(5);
    entry
}

async fn register(client: &Client, name: &str, webhooks: Vec<Value>) {
    let config: MutatingWebhookConfiguration = serde_json::from_value(json!({
        "metadata": { "name": name },
        "webhooks": webhooks,
    }))
    .expect("webhook configuration");
    Api::<MutatingWebhookConfiguration>::all(client.clone())
        .create(&PostParams::default(), &config)
        .await
        .expect("create webhook configuration");
}

/// A free loopback port nobody listens on.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    listener.local_addr().expect("addr").port()
}

/// Serves a webhook with `config` on `listener`.
fn start_webhook(
    client: &Client,
    store: &Store<Tenant>,
    tls: &watch::Receiver<WebhookTls>,
    config: WebhookConfig,
    listener: TcpListener,
) -> Arc<Webhook> {
    let webhook = Arc::new(Webhook::new(
        config,
        store.clone(),
        Arc::new(NoImageLookup),
        Arc::new(ApiSecretKeys {
            client: client.clone(),
        }),
        Recorder::new(client.clone(), EVENT_REPORTER.into()),
        WebhookMetrics::default(),
    ));
    let serving = Arc::clone(&webhook);
    let tls = tls.clone();
    tokio::spawn(async move {
        if let Err(e) = webhook::serve(listener, tls, serving, std::future::pending()).await {
            panic!("webhook server failed: {e}");
        }
    });
    webhook
}

async fn loopback_listener() -> TcpListener {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("bind")
}

fn upkeep(configuration: &str) -> TlsUpkeep {
    TlsUpkeep {
        ip_addresses: vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
        ..TlsUpkeep::new(SYSTEM_NS, SECRET, SERVICE, configuration)
    }
}

fn container(name: &str, image: &str, command: &[&str], args: &[&str]) -> Value {
    let mut c = json!({ "name": name, "image": image });
    if !command.is_empty() {
        c["command"] = json!(command);
    }
    if !args.is_empty() {
        c["args"] = json!(args);
    }
    c
}

fn pod(name: &str, labels: Value, containers: Vec<Value>, init: Vec<Value>) -> Pod {
    serde_json::from_value(json!({
        "metadata": { "name": name, "labels": labels },
        // Set by the ServiceAccount admission plugin in a real cluster (off in the test bed);
        // a projected token needs it.
        "spec": {
            "serviceAccountName": "default",
            "containers": containers,
            "initContainers": init,
        },
    }))
    .expect("pod")
}

async fn create(client: &Client, ns: &str, pod: &Pod) -> Result<Pod, kube::Error> {
    Api::<Pod>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), pod)
        .await
}

fn containers(pod: &Pod) -> &[Container] {
    &pod.spec.as_ref().expect("spec").containers
}

fn named<'a>(pod: &'a Pod, name: &str) -> &'a Container {
    containers(pod)
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn strings(s: &[&str]) -> Vec<String> {
    s.iter().map(|s| (*s).to_owned()).collect()
}

/// Asserts the volumes, mounts and environment of a wrapped container and its pod.
fn assert_injected(pod: &Pod, wrapped: &Container) {
    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    assert_eq!(
        annotations.get(INJECTED_ANNOTATION).map(String::as_str),
        Some("true")
    );
    let volumes = pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.clone())
        .unwrap_or_default();
    let tools = volumes
        .iter()
        .find(|v| v.name == TOOLS_VOLUME)
        .expect("tools volume");
    let claim = tools.persistent_volume_claim.as_ref().expect("PVC source");
    assert_eq!(claim.claim_name, CLAIM);
    assert_eq!(claim.read_only, Some(true));
    let token = volumes
        .iter()
        .find(|v| v.name == TOKEN_VOLUME)
        .and_then(|v| v.projected.as_ref())
        .and_then(|p| p.sources.as_ref())
        .and_then(|s| s.first())
        .and_then(|s| s.service_account_token.as_ref())
        .expect("projected token");
    assert_eq!(token.audience.as_deref(), Some(AUDIENCE));

    let mounts = wrapped.volume_mounts.clone().unwrap_or_default();
    let tools_mount = mounts
        .iter()
        .find(|m| m.name == TOOLS_VOLUME)
        .expect("tools mount");
    assert_eq!(tools_mount.mount_path, TOOLS_MOUNT_PATH);
    assert_eq!(tools_mount.read_only, Some(true));
    assert!(mounts.iter().any(|m| m.name == TOKEN_VOLUME));
    let env = wrapped.env.clone().unwrap_or_default();
    let api = env
        .iter()
        .find(|e| e.name == "RELAY_METADATA_API_URL")
        .expect("API URL env");
    assert_eq!(api.value.as_deref(), Some(API_URL));
}

fn assert_untouched(stored: &Container, original: &Container) {
    assert_eq!(stored.command, original.command, "{}", original.name);
    assert_eq!(stored.args, original.args, "{}", original.name);
    assert_eq!(
        stored.volume_mounts, original.volume_mounts,
        "{}",
        original.name
    );
    assert_eq!(stored.env, original.env, "{}", original.name);
}

/// Asserts the API server stored `original` as it came (apart from its defaults).
fn assert_unwrapped(stored: &Pod, original: &Pod) {
    assert!(!stored.annotations().contains_key(INJECTED_ANNOTATION));
    let spec = stored.spec.as_ref().expect("spec");
    let want = original.spec.as_ref().expect("spec");
    assert_eq!(spec.containers.len(), want.containers.len());
    for (got, want) in spec.containers.iter().zip(&want.containers) {
        assert_untouched(got, want);
    }
    let volumes = spec.volumes.clone().unwrap_or_default();
    assert!(
        !volumes
            .iter()
            .any(|v| v.name == TOOLS_VOLUME || v.name == TOKEN_VOLUME),
        "{volumes:?}"
    );
}

/// The `RELAY_REDACT_ENV` value of a container, if it has one.
fn redact_env(c: &Container) -> Option<String> {
    c.env
        .iter()
        .flatten()
        .find(|e| e.name == ENV_REDACT)
        .map(|e| e.value.clone().unwrap_or_default())
}

/// Waits for an Event with `reason` in `ns` whose note names `pod`; returns the note.
async fn event(client: &Client, ns: &str, reason: &str, pod: &str) -> String {
    let events: Api<K8sEvent> = Api::namespaced(client.clone(), ns);
    wait_for(&format!("a {reason} event about {pod} in {ns}"), || {
        let events = events.clone();
        async move {
            let list = events.list(&Default::default()).await.ok()?;
            list.items.into_iter().find_map(|e| {
                let note = e.note.clone().unwrap_or_default();
                let regarding = e.regarding.clone().unwrap_or_default();
                (e.reason.as_deref() == Some(reason)
                    && note.contains(pod)
                    && regarding.kind.as_deref() == Some("Tenant"))
                .then_some(note)
            })
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_created_through_the_api_server_are_stored_mutated() {
    let Some(kube) = start_kube().await else {
        return;
    };
    let client = client(&kube).await;
    install_crd(&client).await;
    namespace(&client, SYSTEM_NS, &[]).await;

    // Listeners first, so their ports go into the configuration the upkeep patches.
    let main_listener = loopback_listener().await;
    let deny_listener = loopback_listener().await;
    let port = |l: &TcpListener| l.local_addr().expect("addr").port();
    let down = closed_port();
    register(
        &client,
        "relay-test",
        vec![
            webhook_entry(
                "pods.relay.sh",
                port(&main_listener),
                ("relay.sh/tenant", "true"),
                // Fail, so a webhook that cannot be reached shows as an error, not as a pod
                // that merely was not mutated.
                "Fail",
            ),
            webhook_entry(
                "deny.relay.sh",
                port(&deny_listener),
                ("relay.test/deny", "true"),
                "Fail",
            ),
            webhook_entry(
                "down-fail.relay.sh",
                down,
                ("relay.test/down", "fail"),
                "Fail",
            ),
            webhook_entry(
                "down-ignore.relay.sh",
                down,
                ("relay.test/down", "ignore"),
                "Ignore",
            ),
        ],
    )
    .await;

    // The TLS upkeep makes the Secret and fills every caBundle.
    let (tls_rx, upkeep_loop) = tls_upkeep(client.clone(), upkeep("relay-test"))
        .await
        .expect("TLS upkeep");
    tokio::spawn(upkeep_loop);
    let material = tls_rx.borrow().clone();
    assert_eq!(secret_material(&client, SECRET).await, material);
    let configuration = Api::<MutatingWebhookConfiguration>::all(client.clone())
        .get("relay-test")
        .await
        .expect("configuration");
    for w in configuration.webhooks.iter().flatten() {
        assert_eq!(
            w.client_config.ca_bundle.as_ref().map(|b| b.0.as_slice()),
            Some(material.ca_cert_pem.as_bytes()),
            "caBundle of {}",
            w.name
        );
    }

    let (store, reflector) = webhook::tenant_reflector(client.clone());
    tokio::spawn(reflector);
    let main = start_webhook(
        &client,
        &store,
        &tls_rx,
        WebhookConfig::new(API_URL, AUDIENCE),
        main_listener,
    );
    let mut refusing = WebhookConfig::new(API_URL, AUDIENCE);
    refusing.deny_when_not_ready = true;
    let deny = start_webhook(&client, &store, &tls_rx, refusing, deny_listener);

    namespace(&client, "ready", &[("relay.sh/tenant", "true")]).await;
    namespace(&client, "not-ready", &[("relay.sh/tenant", "true")]).await;
    namespace(&client, "no-tenant", &[("relay.sh/tenant", "true")]).await;
    namespace(&client, "refusing", &[("relay.test/deny", "true")]).await;
    namespace(&client, "down-fail", &[("relay.test/down", "fail")]).await;
    namespace(&client, "down-ignore", &[("relay.test/down", "ignore")]).await;
    tenant(&client, "ready", Some(CLAIM)).await;
    tenant(&client, "not-ready", None).await;
    tenant(&client, "refusing", None).await;
    cached(&store, "ready", Some(CLAIM)).await;
    cached(&store, "not-ready", None).await;
    cached(&store, "refusing", None).await;

    // The API server picks the configuration up asynchronously: dry runs until it calls us.
    let plain = pod(
        "plain",
        json!({}),
        vec![container(
            "app",
            "busybox",
            &["/bin/sh", "-c"],
            &["echo hello"],
        )],
        vec![],
    );
    let pods: Api<Pod> = Api::namespaced(client.clone(), "ready");
    wait_for("the API server to call the webhook", || {
        let (pods, plain) = (pods.clone(), plain.clone());
        async move {
            let dry = PostParams {
                dry_run: true,
                ..Default::default()
            };
            let pod = match pods.create(&dry, &plain).await {
                Ok(pod) => pod,
                Err(e) => {
                    eprintln!("dry run: {e}");
                    return None;
                }
            };
            pod.annotations()
                .contains_key(INJECTED_ANNOTATION)
                .then_some(())
        }
    })
    .await;

    // A plain pod: command rewritten, tools volume, token and environment.
    let stored = create(&client, "ready", &plain)
        .await
        .expect("create plain");
    let app = named(&stored, "app");
    assert_eq!(app.command, Some(strings(&[ENTRYPOINT_PATH])));
    assert_eq!(
        app.args,
        Some(strings(&["--", "/bin/sh", "-c", "echo hello"]))
    );
    assert_injected(&stored, app);

    // The stored pod, created again as it is (annotated): nothing added twice.
    let mut again = stored.clone();
    again.metadata = kube::api::ObjectMeta {
        name: Some("plain-again".to_owned()),
        annotations: stored.metadata.annotations.clone(),
        ..Default::default()
    };
    let again = create(&client, "ready", &again)
        .await
        .expect("create again");
    assert_eq!(again.spec, stored.spec, "a second pass changes nothing");

    // Tekton: ours goes into Tekton's -entrypoint, the original command after `-- --` (Tekton
    // consumes the first); the init container is left alone.
    let init = container(
        "prepare",
        "gcr.io/tekton-releases/entrypoint",
        &[
            "/ko-app/entrypoint",
            "init",
            "/ko-app/entrypoint",
            "/tekton/bin/entrypoint",
        ],
        &[],
    );
    let tekton = pod(
        "tekton",
        json!({ "tekton.dev/taskRun": "build-1" }),
        vec![container(
            "step-build",
            "golang",
            &["/tekton/bin/entrypoint"],
            &[
                "-wait_file",
                "/tekton/downward/ready",
                "-post_file",
                "/tekton/run/0/out",
                "-entrypoint",
                "make",
                "--",
                "build",
                "all",
            ],
        )],
        vec![init],
    );
    let stored = create(&client, "ready", &tekton)
        .await
        .expect("create tekton");
    let step = named(&stored, "step-build");
    assert_eq!(step.command, Some(strings(&["/tekton/bin/entrypoint"])));
    assert_eq!(
        step.args,
        Some(strings(&[
            "-wait_file",
            "/tekton/downward/ready",
            "-post_file",
            "/tekton/run/0/out",
            "-entrypoint",
            ENTRYPOINT_PATH,
            "--",
            "--",
            "make",
            "build",
            "all",
        ]))
    );
    assert_injected(&stored, step);
    let init = |pod: &Pod| {
        let spec = pod.spec.as_ref().expect("spec");
        spec.init_containers.clone().unwrap_or_default()
    };
    assert_eq!(init(&stored).len(), 1);
    assert_untouched(&init(&stored)[0], &init(&tekton)[0]);

    // Knative: user-container only.
    let knative = pod(
        "knative",
        json!({ "serving.knative.dev/revision": "hello-00001" }),
        vec![
            container(
                "user-container",
                "hello",
                &["/app/server"],
                &["--port=8080"],
            ),
            container("queue-proxy", "queue", &["/ko-app/queue"], &[]),
        ],
        vec![],
    );
    let stored = create(&client, "ready", &knative)
        .await
        .expect("create knative");
    let user = named(&stored, "user-container");
    assert_eq!(
        user.args,
        Some(strings(&["--", "/app/server", "--port=8080"]))
    );
    assert_injected(&stored, user);
    assert_untouched(
        named(&stored, "queue-proxy"),
        named(&knative, "queue-proxy"),
    );

    // No command and the image cannot be looked up: that container stays as it was (and the
    // one with a command is wrapped), with an Event saying so.
    let mixed = pod(
        "mixed",
        json!({}),
        vec![
            container("app", "registry.test/app:1", &[], &["--verbose"]),
            container("sidecar", "busybox", &["sleep"], &["3600"]),
        ],
        vec![],
    );
    let stored = create(&client, "ready", &mixed)
        .await
        .expect("create mixed");
    assert_untouched(named(&stored, "app"), named(&mixed, "app"));
    assert_eq!(
        named(&stored, "sidecar").args,
        Some(strings(&["--", "sleep", "3600"]))
    );
    let note = event(&client, "ready", REASON_IMAGE_LOOKUP_FAILED, "mixed").await;
    assert!(
        note.contains("registry.test/app:1") && note.contains("image lookup disabled"),
        "{note}"
    );
    assert!(
        main.metrics()
            .skipped(operator::mutate::SkipReason::UnresolvedImage)
            >= 1
    );

    // A Secret taken whole through envFrom: the webhook reads its key names and lists them all in
    // RELAY_REDACT_ENV, since the kubelet sets each as a variable (IsEnvVarName accepts `-` and
    // `.`; `1st-key` only with relaxed validation, listed all the same).
    let secret: Secret = serde_json::from_value(json!({
        "metadata": { "name": "db-creds" },
        "stringData": {
            "DB_PASSWORD": "hunter2", "API_TOKEN": "t0ken", "not-valid.name": "dotted",
            "1st-key": "digit",
        },
    }))
    .expect("secret");
    Api::<Secret>::namespaced(client.clone(), "ready")
        .create(&PostParams::default(), &secret)
        .await
        .expect("create secret");
    let with_env_from = |name: &str, secret: &str| {
        let mut app = container("app", "busybox", &["sleep"], &["1"]);
        app["envFrom"] = json!([{ "secretRef": { "name": secret } }]);
        app["env"] = json!([{ "name": "SINGLE",
            "valueFrom": { "secretKeyRef": { "name": secret, "key": "API_TOKEN" } } }]);
        pod(name, json!({}), vec![app], vec![])
    };
    let stored = create(&client, "ready", &with_env_from("env-from", "db-creds"))
        .await
        .expect("create env-from");
    let app = named(&stored, "app");
    assert_injected(&stored, app);
    assert_eq!(
        redact_env(app).as_deref(),
        Some("SINGLE,1st-key,API_TOKEN,DB_PASSWORD,not-valid.name")
    );

    // A missing Secret: admitted and wrapped all the same, nothing listed for it, and an Event on
    // the tenant names the pod and the Secret.
    let missing = with_env_from("env-from-missing", "missing-creds");
    let stored = create(&client, "ready", &missing)
        .await
        .expect("a pod with a missing envFrom Secret is admitted");
    let app = named(&stored, "app");
    assert_eq!(app.command, Some(strings(&[ENTRYPOINT_PATH])));
    assert_injected(&stored, app);
    assert_eq!(redact_env(app).as_deref(), Some("SINGLE"));
    let note = event(
        &client,
        "ready",
        REASON_SECRET_KEYS_UNKNOWN,
        "env-from-missing",
    )
    .await;
    assert!(
        note.contains("missing-creds") && note.contains("not found"),
        "{note}"
    );

    // The cost of the lookup: the same review straight to the webhook, with and without a Secret
    // to read.
    let latency = |object: Value| {
        let body = review("uid-latency", "CREATE", pod_kind(), object, "ready");
        let main = Arc::clone(&main);
        async move {
            let mut took = Vec::new();
            for _ in 0..50 {
                let started = Instant::now();
                let _ = main.review(&body).await;
                took.push(started.elapsed());
            }
            took.sort();
            percentile(&took, 0.5)
        }
    };
    let without = latency(pod_object("plain")).await;
    let object = serde_json::to_value(with_env_from("env-from", "db-creds")).expect("JSON");
    let with = latency(object).await;
    eprintln!("review p50 without an envFrom Secret {without:?}, with one {with:?}");

    // Tools not ready: admitted unwrapped, and an Event on the tenant names the pod.
    let waiting = pod(
        "waiting",
        json!({}),
        vec![container("app", "busybox", &["sleep"], &["1"])],
        vec![],
    );
    let stored = create(&client, "not-ready", &waiting)
        .await
        .expect("create in not-ready");
    assert_unwrapped(&stored, &waiting);
    assert!(!stored.annotations().contains_key(INJECTED_ANNOTATION));
    event(&client, "not-ready", REASON_TOOLS_NOT_READY, "waiting").await;
    assert_eq!(main.metrics().admissions(Outcome::NotReady), 1);

    // No tenant in the namespace: unchanged.
    let stored = create(&client, "no-tenant", &waiting)
        .await
        .expect("create without tenant");
    assert_unwrapped(&stored, &waiting);

    // Tools not ready and set to refuse: refused, with the reason.
    match create(&client, "refusing", &waiting).await {
        Err(kube::Error::Api(status)) => {
            assert!(
                status
                    .message
                    .contains("tools of tenant tenant are not ready"),
                "{}",
                status.message
            );
        }
        other => panic!("pod admitted although refused: {other:?}"),
    }
    assert_eq!(deny.metrics().admissions(Outcome::Denied), 1);

    // The operator's own tools Job pods (labelled with their tenant's UID) are admitted
    // unchanged, also where not-ready pods are refused: they are what makes the tools ready.
    let mut installer = waiting.clone();
    installer.metadata.name = Some("installer".to_owned());
    installer
        .metadata
        .labels
        .get_or_insert_with(Default::default)
        .insert(
            operator::controller::TENANT_UID_LABEL.to_owned(),
            "uid".to_owned(),
        );
    let stored = create(&client, "refusing", &installer)
        .await
        .expect("the tools Job's pod is admitted");
    assert_unwrapped(&stored, &installer);
    assert_eq!(deny.metrics().admissions(Outcome::Denied), 1);

    // Webhook down: failurePolicy Fail refuses, Ignore admits unchanged.
    match create(&client, "down-fail", &waiting).await {
        Err(kube::Error::Api(status)) => {
            assert!(
                status.message.contains("failed calling webhook"),
                "{}",
                status.message
            );
        }
        other => panic!("pod admitted although the webhook is down: {other:?}"),
    }
    let stored = create(&client, "down-ignore", &waiting)
        .await
        .expect("admitted with failurePolicy Ignore");
    assert_unwrapped(&stored, &waiting);

    assert!(main.metrics().admissions(Outcome::Mutated) >= 5);
    assert_eq!(main.metrics().admissions(Outcome::Invalid), 0);
    assert_eq!(main.metrics().admissions(Outcome::Error), 0);
}

fn secret_bytes(material: &WebhookTls) -> BTreeMap<String, k8s_openapi::ByteString> {
    tls::secret_data(material)
        .into_iter()
        .map(|(k, v)| (k, k8s_openapi::ByteString(v.into_bytes())))
        .collect()
}

/// The material stored in the Secret `name` of [`SYSTEM_NS`].
async fn secret_material(client: &Client, name: &str) -> WebhookTls {
    let secret = Api::<Secret>::namespaced(client.clone(), SYSTEM_NS)
        .get(name)
        .await
        .expect("Secret");
    let data: BTreeMap<String, String> = secret
        .data
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, String::from_utf8(v.0).expect("utf-8")))
        .collect();
    tls::from_secret_data(&data).expect("complete material")
}

/// A TLS client that trusts only `ca_pem`, speaking HTTP/1.1.
fn connector(ca_pem: &str) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.expect("CA PEM")).expect("CA");
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    TlsConnector::from(Arc::new(config))
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// An HTTP/1.1 connection over TLS to the webhook at `addr`, verified as 127.0.0.1.
async fn connect(addr: SocketAddr, ca_pem: &str) -> std::io::Result<Sender> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::IpAddress(addr.ip().into());
    let tls = connector(ca_pem).connect(name, tcp).await?;
    let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(conn);
    Ok(sender)
}

async fn post(sender: &mut Sender, body: Vec<u8>) -> (u16, Vec<u8>) {
    let request = hyper::Request::post(MUTATE_PATH)
        .header("host", "127.0.0.1")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("request");
    sender.ready().await.expect("connection ready");
    let response = sender.send_request(request).await.expect("response");
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (status, body.to_vec())
}

fn review(uid: &str, operation: &str, kind: Value, object: Value, namespace: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": kind,
            "resource": { "group": "", "version": "v1", "resource": "pods" },
            "name": "",
            "namespace": namespace,
            "operation": operation,
            "userInfo": { "username": "test" },
            "object": object,
            "dryRun": false,
        }
    }))
    .expect("review")
}

fn pod_kind() -> Value {
    json!({ "group": "", "version": "v1", "kind": "Pod" })
}

fn pod_object(name: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        // As the API server sends it for a pod created without a namespace in its body.
        "metadata": { "name": name },
        "spec": { "containers": [
            { "name": "app", "image": "busybox", "command": ["sleep"], "args": ["1"] }
        ] },
    })
}

fn response(body: &[u8]) -> Value {
    let review: Value = serde_json::from_slice(body).expect("JSON review");
    assert_eq!(review["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(review["kind"], "AdmissionReview");
    review["response"].clone()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let at = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[at]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_reviews_and_certificate_renewal() {
    let Some(kube) = start_kube().await else {
        return;
    };
    let client = client(&kube).await;
    install_crd(&client).await;
    namespace(&client, SYSTEM_NS, &[]).await;
    namespace(&client, "ready", &[]).await;
    tenant(&client, "ready", Some(CLAIM)).await;
    // Registered only so the upkeep has a caBundle to keep; it selects no namespace here.
    register(
        &client,
        "relay-direct",
        vec![webhook_entry(
            "pods.relay.sh",
            closed_port(),
            ("relay.test/none", "true"),
            "Ignore",
        )],
    )
    .await;
    // Four replicas making the material at once: one wins, all use its material.
    let loopback = [IpAddr::V4(Ipv4Addr::LOCALHOST)];
    let racers =
        (0..4).map(|_| tls::ensure_secret(&client, SYSTEM_NS, "race-tls", SERVICE, &loopback));
    let results = futures::future::join_all(racers).await;
    let winner = results[0].as_ref().expect("ensure_secret").clone();
    for result in &results {
        assert_eq!(result.as_ref().expect("ensure_secret"), &winner);
    }
    assert_eq!(secret_material(&client, "race-tls").await, winner);
    // Material due for renewal is replaced.
    let old = tls::generate_with_ips(
        SERVICE,
        SYSTEM_NS,
        &loopback,
        SystemTime::now() - Duration::from_secs(364 * 86_400),
    )
    .expect("generate");
    Api::<Secret>::namespaced(client.clone(), SYSTEM_NS)
        .patch(
            "race-tls",
            &PatchParams::default(),
            &Patch::Merge(json!({ "data": secret_bytes(&old) })),
        )
        .await
        .expect("store old material");
    let renewed = tls::ensure_secret(&client, SYSTEM_NS, "race-tls", SERVICE, &loopback)
        .await
        .expect("ensure_secret");
    assert_ne!(renewed.cert_pem, old.cert_pem);
    // The CA has nine years left: kept, so the caBundle stays valid through the renewal.
    assert_eq!(renewed.ca_cert_pem, old.ca_cert_pem);
    assert!(!tls::needs_renewal_with_ips(
        &renewed.cert_pem,
        SERVICE,
        SYSTEM_NS,
        &loopback,
        SystemTime::now()
    ));
    assert_eq!(secret_material(&client, "race-tls").await, renewed);

    let (tls_rx, upkeep_loop) = tls_upkeep(client.clone(), upkeep("relay-direct"))
        .await
        .expect("TLS upkeep");
    tokio::spawn(upkeep_loop);
    let first = tls_rx.borrow().clone();

    let (store, reflector) = webhook::tenant_reflector(client.clone());
    tokio::spawn(reflector);
    cached(&store, "ready", Some(CLAIM)).await;
    let mut config = WebhookConfig::new(API_URL, AUDIENCE);
    config.max_body_bytes = 64 << 10;
    let listener = loopback_listener().await;
    let addr = listener.local_addr().expect("addr");
    let webhook = start_webhook(&client, &store, &tls_rx, config, listener);
    let mut sender = connect(addr, &first.ca_cert_pem).await.expect("connect");

    // Garbage: 400, and the server keeps answering.
    let (status, body) = post(&mut sender, b"{ not json".to_vec()).await;
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
    // No request: nothing to answer with a uid.
    let no_request = json!({ "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview" });
    let (status, _) = post(&mut sender, serde_json::to_vec(&no_request).expect("json")).await;
    assert_eq!(status, 400);
    // A review of a ConfigMap: invalid, answered with its uid.
    let config_map = review(
        "uid-cm",
        "CREATE",
        json!({ "group": "", "version": "v1", "kind": "ConfigMap" }),
        json!({ "apiVersion": "v1", "kind": "ConfigMap", "metadata": { "name": "c" } }),
        "ready",
    );
    let (status, body) = post(&mut sender, config_map).await;
    assert_eq!(status, 200);
    let answer = response(&body);
    assert_eq!(answer["uid"], "uid-cm");
    assert_eq!(answer["allowed"], false);
    assert!(
        answer["status"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("ConfigMap")),
        "{answer}"
    );
    // Claims to be a pod but is not one.
    let not_a_pod = review(
        "uid-bad",
        "CREATE",
        pod_kind(),
        json!({ "apiVersion": "v1", "kind": "Pod", "spec": { "containers": "nope" } }),
        "ready",
    );
    let (status, body) = post(&mut sender, not_a_pod).await;
    assert_eq!(status, 200);
    let answer = response(&body);
    assert_eq!(
        (answer["uid"].clone(), answer["allowed"].clone()),
        (json!("uid-bad"), json!(false))
    );
    // Too large: 413, on a connection of its own (the server closes a connection whose body it
    // did not read).
    let mut big = connect(addr, &first.ca_cert_pem).await.expect("connect");
    let (status, _) = post(&mut big, vec![b' '; 128 << 10]).await;
    assert_eq!(status, 413);
    // Not a CREATE: allowed unchanged.
    let update = review("uid-up", "UPDATE", pod_kind(), pod_object("p"), "ready");
    let (status, body) = post(&mut sender, update).await;
    assert_eq!(status, 200);
    let answer = response(&body);
    assert_eq!(answer["allowed"], true);
    assert!(answer.get("patch").is_none_or(Value::is_null), "{answer}");
    assert_eq!(webhook.metrics().admissions(Outcome::Invalid), 4);

    // Latency of pod CREATE reviews that mutate, over one connection.
    let mut latencies = Vec::new();
    for i in 0..200 {
        let uid = format!("uid-{i}");
        let body = review(
            &uid,
            "CREATE",
            pod_kind(),
            pod_object(&format!("p{i}")),
            "ready",
        );
        let started = Instant::now();
        let (status, body) = post(&mut sender, body).await;
        latencies.push(started.elapsed());
        assert_eq!(status, 200);
        let answer = response(&body);
        assert_eq!(answer["uid"], uid.as_str());
        assert_eq!(answer["allowed"], true);
        assert_eq!(answer["patchType"], "JSONPatch", "{answer}");
    }
    latencies.sort();
    eprintln!(
        "admission latency over 200 mutating reviews: p50 {:?}, p99 {:?}, max {:?}",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies[latencies.len() - 1]
    );
    assert_eq!(webhook.metrics().admissions(Outcome::Mutated), 200);
    let mut registry = prometheus_client::registry::Registry::default();
    webhook.metrics().register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
    assert!(
        text.contains(r#"relay_operator_webhook_admissions_total{outcome="mutated"} 200"#),
        "{text}"
    );
    assert!(
        text.contains("relay_operator_webhook_admission_duration_seconds_count 205"),
        "{text}"
    );

    // Renewal: someone replaces the Secret with new material (new CA). The upkeep sees it, puts
    // the new CA into the caBundle and the server presents the new certificate.
    let renewed = tls::generate_with_ips(
        SERVICE,
        SYSTEM_NS,
        &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
        SystemTime::now(),
    )
    .expect("generate");
    assert_ne!(renewed.ca_cert_pem, first.ca_cert_pem);
    let data = secret_bytes(&renewed);
    Api::<Secret>::namespaced(client.clone(), SYSTEM_NS)
        .patch(
            SECRET,
            &PatchParams::default(),
            &Patch::Merge(json!({ "data": data })),
        )
        .await
        .expect("replace Secret");
    wait_for("the server to present the renewed certificate", || async {
        connect(addr, &renewed.ca_cert_pem).await.ok()
    })
    .await;
    assert!(
        connect(addr, &first.ca_cert_pem).await.is_err(),
        "the old CA no longer verifies the served certificate"
    );
    let configuration = Api::<MutatingWebhookConfiguration>::all(client.clone())
        .get("relay-direct")
        .await
        .expect("configuration");
    let bundle = configuration.webhooks.unwrap_or_default()[0]
        .client_config
        .ca_bundle
        .clone()
        .expect("caBundle");
    assert_eq!(bundle.0, renewed.ca_cert_pem.as_bytes());
    // The connection opened before the renewal still works.
    let (status, _) = post(
        &mut sender,
        review(
            "uid-after",
            "CREATE",
            pod_kind(),
            pod_object("after"),
            "ready",
        ),
    )
    .await;
    assert_eq!(status, 200);
}

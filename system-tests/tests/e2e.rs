//! The whole system on real parts, shaped like a cluster node: kube-apiserver + etcd +
//! kube-controller-manager, the `operator` (controller and webhook), the metadata API in
//! `kubernetes` auth mode, the real kubelet and kube-scheduler running pods on containerd + runc
//! ([`testbed::node`]), the controller manager's Job and PersistentVolume controllers, and the
//! collector in Kubernetes mode, authenticated as a collector pod on the node would be (its
//! ServiceAccount's projected token). Tools volumes are PersistentVolumes made in advance, as
//! `deploy/overlays/kind/tools-storage.yaml` makes them for kind (that file, applied with its host
//! directories moved into a temporary one). One bed, in phases:
//!
//! 1. A Tekton-shaped TaskRun pod and a Knative-shaped trigger pod of tenant A are created through
//!    the API server, mutated by the webhook, scheduled and run by the kubelet; both capture paths store their
//!    output byte-exact, also for the step whose pod is deleted as soon as it exits, and the
//!    collector alone has the unwrapped `queue-proxy`. At the same time a pod of tenant B, whose
//!    tools never get ready, is admitted unwrapped: only the collector has it, and the consumer
//!    API serves it from there.
//! 2. The collector's token rotates (file replaced) and the old one stops being valid: what the
//!    collector ships from then on proves it reads the file again.
//! 3. A long-running step of tenant A on tools v1 is held at a gate while the tools change to v2:
//!    a new pod gets the v2 claim, the running one keeps v1 and its output is complete; the v1
//!    claim and Job are collected once it is gone. While it runs, tenants' tokens, a read token
//!    and a collector of another node are refused at the other tenant's (or node's) streams.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{SCRIPT, STEP_IMAGE, comparisons, expected, step_pod, trigger_pod, workload_images};
use metadata_api::auth::{Context, Keys, Scope};
use serde_json::{Value, json};
use testbed::api::{Api, api_bin, free_addr, operator_bin, wait_for};
use testbed::collector::{Collector, CollectorOptions, can_run, collector_bin, terminate};
use testbed::cri::BUSYBOX_IMAGE;
use testbed::images::{TOOLS_IMAGE_V2, tools_image_tagged};
use testbed::kube::{KubeApi, KubeOptions, Rest};
use testbed::node::{NODE_NAME, Node, NodeOptions};
use testbed::registry::Registry;

const WAIT: Duration = Duration::from_secs(90);
/// Tenant A: its tools Jobs run.
const TENANT_NS: &str = "tenant-a";
/// Tenant B: its tools never get ready. Its claim names a StorageClass no volume has, so the claim
/// stays unbound and the scheduler never places the tools Job's pod (a real cluster's way to
/// withhold the tools: as with a provisioner that cannot make the volume).
const TENANT_B_NS: &str = "tenant-b";
const NODE: &str = NODE_NAME;
/// The StorageClass of tenant B's tools claim, which no volume has.
const NO_VOLUMES_CLASS: &str = "relay-tools-unprovisioned";
/// A node no kubelet runs (unschedulable): the home of another node's collector pod.
const OTHER_NODE: &str = "e2e-other-node";
const SYSTEM_NS: &str = "relay-system";
const COLLECTOR_ACCOUNT: &str = "relay-collector";
/// The metadata API's (and the operator's) default token audience.
const AUDIENCE: &str = "relay-metadata-api";
/// The operator's `--superseded-claim-grace`: short, so a superseded claim is collectable soon.
const SUPERSEDED_GRACE: &str = "2s";
/// As [`SCRIPT`], stopping after [`GATE_LINE`] lines until `/gate/release` exists.
const GATED_SCRIPT: &str = "i=0; while [ $i -lt 3000 ]; do \
                            [ $i = 1500 ] && until [ -e /gate/release ]; do sleep 0.05; done; \
                            echo \"$0 line $i\"; i=$((i+1)); done; echo \"$0 done\" >&2";
const GATE_LINE: usize = 1500;

use testbed::ports::free_port;

/// The operator process, its log lines kept (and passed on to stderr); killed when dropped.
struct Operator {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    readyz: String,
}

impl Operator {
    fn start(
        kubeconfig: &str,
        tools: &str,
        webhook_port: u16,
        api_url: &str,
        registry: &str,
    ) -> Self {
        let listen = free_addr();
        let mut child = Command::new(operator_bin())
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info,operator::controller=debug")
            .env("NO_COLOR", "1")
            .args(["--tools-image", tools, "--namespace", SYSTEM_NS])
            .args(["--pod-name", "operator-0", "--webhook-ip", "127.0.0.1"])
            .args(["--webhook-listen", &format!("127.0.0.1:{webhook_port}")])
            .args(["--listen", &listen])
            .args([
                "--metadata-api-url",
                api_url,
                "--insecure-registry",
                registry,
            ])
            .args(["--superseded-claim-grace", SUPERSEDED_GRACE])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let keep = log.clone();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                eprintln!("{line}");
                keep.lock().unwrap().push(line);
            }
        });
        Self {
            child,
            log,
            readyz: format!("http://{listen}/readyz"),
        }
    }

    /// Waits until it serves the webhook with its tenant cache synced.
    fn wait_ready(&self) {
        wait_for(WAIT, "the operator's /readyz", || {
            reqwest::blocking::get(&self.readyz).is_ok_and(|r| r.status().is_success())
        });
    }

    /// Waits until a log line contains every one of `parts`.
    fn wait_for_log(&self, parts: &[&str]) {
        wait_for(
            WAIT,
            &format!("an operator log line with {parts:?}"),
            || {
                self.log
                    .lock()
                    .unwrap()
                    .iter()
                    .any(|line| parts.iter().all(|p| line.contains(p)))
            },
        );
    }

    /// Stops it as Kubernetes would (SIGTERM: it releases the leader lease).
    fn stop(mut self) {
        terminate(&mut self.child, Duration::from_secs(20));
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The collector in Kubernetes mode with `--token-file`; stopped (SIGTERM, SIGKILL after 30 s)
/// when dropped.
fn start_collector(kubeconfig: &str, api: &Api, token_file: &Path, node: &Node) -> Collector {
    // The kubelet's, under its own cgroup root. The 1.20 kubelet makes its QoS cgroups in
    // the v1 hierarchies only; runc makes the v2 directories of a pod when it starts its
    // first container, which may be after the collector starts to watch (as with any node
    // that had no pod yet). The node removes its cgroup root at teardown.
    let kubepods = node.cgroup_v2_root().unwrap().join("kubepods");
    std::fs::create_dir_all(&kubepods).unwrap();
    let mut cmd = Command::new(collector_bin());
    cmd.env("KUBECONFIG", kubeconfig)
        .args(["--kubernetes", "--node-name", NODE, "--kubepods-cgroup"])
        .arg(&kubepods)
        .args(["--namespace-selector", "relay.sh/tenant=true"]);
    Collector::spawn(
        cmd,
        api,
        &CollectorOptions {
            token_file: Some(token_file),
            stop_limit: Some(Duration::from_secs(30)),
            ..CollectorOptions::default()
        },
    )
}

fn get(rest: &Rest, path: &str) -> Option<Value> {
    rest.get(path).unwrap()
}

fn pod_path(namespace: &str, name: &str) -> String {
    format!("/api/v1/namespaces/{namespace}/pods/{name}")
}

/// The claim the tenant's new pods mount, once it has one.
fn tools_claim(rest: &Rest, namespace: &str, tenant: &str) -> Option<String> {
    get(
        rest,
        &format!("/apis/relay.sh/v1beta1/namespaces/{namespace}/tenants/{tenant}"),
    )?["status"]["toolsVolumeClaim"]
        .as_str()
        .map(str::to_owned)
}

/// The PersistentVolumeClaim a pod's spec mounts.
fn claim_of(pod: &Value) -> Option<&str> {
    pod["spec"]["volumes"]
        .as_array()?
        .iter()
        .find_map(|v| v["persistentVolumeClaim"]["claimName"].as_str())
}

/// A token of `account` bound to `pod`, for the metadata API, as a projected volume holds it.
fn pod_token(rest: &Rest, account: &str, pod: &Value) -> String {
    let namespace = pod["metadata"]["namespace"].as_str().unwrap();
    let answer = rest
        .post(
            &format!("/api/v1/namespaces/{namespace}/serviceaccounts/{account}/token"),
            &json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                "spec": {"audiences": [AUDIENCE], "expirationSeconds": 3600,
                    "boundObjectRef": {"apiVersion": "v1", "kind": "Pod",
                        "name": pod["metadata"]["name"], "uid": pod["metadata"]["uid"]}}}),
        )
        .unwrap();
    answer["status"]["token"].as_str().unwrap().to_owned()
}

/// A collector DaemonSet's pod record on `node` (the kubelet of `NODE` runs a placeholder for it;
/// it needs no network, so it gets the pod network's empty namespace).
fn collector_pod(rest: &Rest, name: &str, node: &str) -> Value {
    rest.post(
        &format!("/api/v1/namespaces/{SYSTEM_NS}/pods"),
        &json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": {"app": "relay-collector"}},
            "spec": {"nodeName": node, "serviceAccountName": COLLECTOR_ACCOUNT,
                "automountServiceAccountToken": false, "terminationGracePeriodSeconds": 0,
                "containers": [{"name": "collector", "image": BUSYBOX_IMAGE,
                    "imagePullPolicy": "Never", "command": ["sleep", "3600"]}]}}),
    )
    .unwrap()
}

/// Replaces `path` with `contents` in one step, as the kubelet swaps a projected volume's files.
fn replace_file(path: &Path, contents: &str) {
    let next = path.with_extension("next");
    std::fs::write(&next, contents).unwrap();
    std::fs::rename(&next, path).unwrap();
}

/// Waits until ServiceAccount `default` of `namespace` has its token Secret (pods that mount it
/// are refused before).
fn wait_default_account(rest: &Rest, namespace: &str) {
    wait_for(
        WAIT,
        &format!("the default ServiceAccount of {namespace}"),
        || {
            get(
                rest,
                &format!("/api/v1/namespaces/{namespace}/serviceaccounts/default"),
            )
            .is_some_and(|sa| sa["secrets"].as_array().is_some_and(|s| !s.is_empty()))
        },
    );
}

/// Waits until stream `name` of `source` in `context` is complete and returns its bytes.
fn complete_stream(api: &Api, context: &str, name: &str, source: &str) -> Vec<u8> {
    common::complete_stream(WAIT, context, name, source, || {
        api.read_in(context, name, source)
    })
}

/// Asserts both paths stored `name`'s output in `context` under `prefix`, byte-exact.
fn assert_both_paths(api: &Api, context: &str, prefix: &str, name: &str) {
    common::assert_both_paths(context, prefix, name, |stream, source| {
        complete_stream(api, context, stream, source)
    });
}

/// The consumer API and the capture report, with one token.
struct Consumer {
    http: reqwest::blocking::Client,
    url: String,
    token: String,
}

impl Consumer {
    fn report(&self, context: &str) -> Value {
        let response = self
            .http
            .get(format!("{}/api/{context}/logs/capture-report", self.url))
            .bearer_auth(&self.token)
            .send()
            .unwrap();
        assert!(response.status().is_success(), "{context}: {response:?}");
        response.json().unwrap()
    }

    fn logs(&self, context: &str, stream: &str) -> Vec<u8> {
        let path = format!("{context}/logs?stream={stream}");
        let response = self
            .http
            .get(format!("{}/api/{path}", self.url))
            .bearer_auth(&self.token)
            .send()
            .unwrap();
        assert!(
            response.status().is_success(),
            "{path}: {}",
            response.status()
        );
        response.bytes().unwrap().to_vec()
    }
}

/// A read token minted as operators mint them: `metadata-api token` with the API's key file.
fn cli_read_token(api: &Api, prefix: &str) -> String {
    let out = Command::new(api_bin())
        .arg("token")
        .arg("--key-file")
        .arg(api.key_file())
        .args(["--context", prefix, "--scope", "read", "--ttl", "10m"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// Another tenant's (or node's) context and streams, and what of them must never show in an answer.
struct Foreign {
    context: String,
    stream: String,
    ids: Vec<String>,
    secrets: Vec<String>,
}

impl Foreign {
    fn new(api: &Api, context: &str, streams: &[&str], secret: &str) -> Self {
        let keys = Keys::load_or_create(&api.key_file()).unwrap();
        let ctx = Context::stream(context).unwrap();
        let ids: Vec<String> = streams
            .iter()
            .flat_map(|name| {
                ["entrypoint", "ebpf"].map(|source| keys.stream_id(&ctx, name, source))
            })
            .collect();
        let mut secrets = ids.clone();
        secrets.push(context.to_owned());
        secrets.push(secret.to_owned());
        Self {
            context: context.to_owned(),
            stream: streams[0].to_owned(),
            ids,
            secrets,
        }
    }
}

/// Asserts that `who`'s `token` can neither read nor write anything of `foreign`: 404 where the
/// API hides whether something exists, 403 for creating streams there, and no answer shows any
/// of its names, ids or contents.
fn assert_refused(url: &str, who: &str, token: &str, foreign: &Foreign) {
    let http = reqwest::blocking::Client::new();
    let ctx = &foreign.context;
    let mut tries: Vec<(String, reqwest::blocking::RequestBuilder, u16)> = vec![
        (
            "consumer read".into(),
            http.get(format!("{url}/api/{ctx}/logs")),
            404,
        ),
        (
            "consumer read of a stream".into(),
            http.get(format!("{url}/api/{ctx}/logs?stream={}", foreign.stream)),
            404,
        ),
        (
            "capture report".into(),
            http.get(format!("{url}/api/{ctx}/logs/capture-report")),
            404,
        ),
    ];
    for source in [None, Some("entrypoint"), Some("ebpf")] {
        let mut spec = json!({"name": foreign.stream, "context": ctx});
        if let Some(source) = source {
            spec["source"] = json!(source);
        }
        tries.push((
            format!("create with {spec}"),
            http.post(format!("{url}/logs")).json(&spec),
            403,
        ));
    }
    for id in &foreign.ids {
        tries.push((
            format!("status of {id}"),
            http.get(format!("{url}/logs/{id}")),
            404,
        ));
        tries.push((
            format!("read of {id}"),
            http.get(format!("{url}/logs/{id}/data")),
            404,
        ));
        tries.push((
            format!("append to {id}"),
            http.post(format!("{url}/logs/{id}/data"))
                .header("Content-Type", "application/octet-stream")
                .body("forged\n"),
            404,
        ));
        tries.push((
            format!("marker on {id}"),
            http.post(format!("{url}/logs/{id}/markers"))
                .json(&json!({"range": "bytes 0-0/1", "markers": ["dropped"]})),
            404,
        ));
    }
    for (what, request, want) in tries {
        let response = request.bearer_auth(token).send().unwrap();
        let status = response.status().as_u16();
        let body = response.text().unwrap();
        assert_eq!(status, want, "{who}: {what} in {ctx}: {body}");
        for secret in &foreign.secrets {
            assert!(
                !body.contains(secret.as_str()),
                "{who}: {what}: the answer shows {secret:?}: {body}"
            );
        }
    }
}

#[test]
fn a_tenants_pods_are_captured_by_both_paths_through_tools_changes_and_isolated() {
    if !can_run() {
        return;
    }
    let started = Instant::now();
    // The tools volumes' host directories; dropped after the node, which mounts them.
    let tools_volumes = tempfile::tempdir().unwrap();
    // The controller manager: the Job controller runs the operator's tools Jobs, the
    // PersistentVolume controller binds their claims.
    let Some(kube) = KubeApi::start_or_skip_with(&KubeOptions::new().controller_manager(true))
    else {
        return;
    };
    let Some(node) = Node::start_or_skip(&kube, &NodeOptions::new()) else {
        return;
    };
    let cri = node.cri();
    let Some(tools) = tools_image_tagged(cri, &[TOOLS_IMAGE_V2]).unwrap() else {
        return;
    };
    // The Knative trigger's image is in a registry, and its pod has no command (as Knative
    // Services usually have): the webhook finds the image's ENTRYPOINT and CMD there. The
    // kubelet runs the same reference from containerd's store.
    let Some(registry) = Registry::start_or_skip(None) else {
        return;
    };
    let trigger_image = workload_images(&registry, cri);
    let rest = kube.rest().unwrap();
    let kubeconfig = kube.kubeconfig_path();
    let kubeconfig = kubeconfig.to_str().unwrap();

    // What deploy/ installs, with the webhook reached by URL (no Service network here).
    let crd =
        serde_json::to_value(<operator::crd::Tenant as kube::CustomResourceExt>::crd()).unwrap();
    let webhook_port = free_port();
    rest.install_relay(&crd, &[TENANT_NS, TENANT_B_NS], webhook_port)
        .unwrap();
    // The kind overlay's tools volumes, as they are, but for the host directories.
    let storage = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/overlays/kind/tools-storage.yaml"),
    )
    .unwrap()
    .replace(
        "/var/lib/relay-tools",
        tools_volumes.path().to_str().unwrap(),
    );
    let mut apply = kube
        .kubectl()
        .args(["apply", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut apply.stdin.take().unwrap(), storage.as_bytes()).unwrap();
    let applied = apply.wait_with_output().unwrap();
    assert!(applied.status.success(), "{applied:?}");

    let mut api = Api::start_with_env(&["--auth", "kubernetes"], &[("KUBECONFIG", kubeconfig)]);
    let operator = Operator::start(kubeconfig, tools, webhook_port, &api.url, &registry.host());

    // The collector authenticates as its DaemonSet pod on this node would: a token of
    // relay-system:relay-collector bound to that pod, for the metadata API's audience, in a file.
    rest.post(
        &format!("/api/v1/namespaces/{SYSTEM_NS}/serviceaccounts"),
        &json!({"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": COLLECTOR_ACCOUNT}}),
    )
    .unwrap();
    let first_collector_pod = collector_pod(&rest, "relay-collector-1", NODE);
    let token_dir = tempfile::tempdir().unwrap();
    let token_file = token_dir.path().join("token");
    let first_collector_token = pod_token(&rest, COLLECTOR_ACCOUNT, &first_collector_pod);
    replace_file(&token_file, &first_collector_token);
    let collector = start_collector(kubeconfig, &api, &token_file, &node);

    // Tenant A names the kind overlay's class (as deploy/overlays/kind/tenant.yaml does): its
    // tools Job runs and fills a volume made in advance. Tenant B names a class without volumes:
    // its claim stays unbound, so its tools Job's pod is never scheduled.
    for (namespace, name, class) in [
        (TENANT_NS, "a", "relay-tools"),
        (TENANT_B_NS, "b", NO_VOLUMES_CLASS),
    ] {
        rest.post(
            &format!("/apis/relay.sh/v1beta1/namespaces/{namespace}/tenants"),
            &json!({"apiVersion": "relay.sh/v1beta1", "kind": "Tenant", "metadata": {"name": name},
                "spec": {"entrypointInjection": {"volumeClaimTemplate": {
                    "storageClassName": class, "accessModes": ["ReadOnlyMany"],
                    "resources": {"requests": {"storage": "16Mi"}}}}}}),
        )
        .unwrap();
    }
    let deadline = Instant::now() + WAIT;
    let claim_v1 = loop {
        if let Some(claim) = tools_claim(&rest, TENANT_NS, "a") {
            break claim;
        }
        assert!(
            Instant::now() < deadline,
            "tenant a not ready:\n{}",
            node.log_tail("kubelet", 20)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let installed = node
        .claim_dir(TENANT_NS, &claim_v1)
        .unwrap()
        .unwrap()
        .join("lib/entrypoint");
    assert!(installed.exists(), "{} missing", installed.display());
    wait_for(WAIT, "the webhook's caBundle", || {
        get(&rest, "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/relay-pod-injection")
            .is_some_and(|c| c["webhooks"][0]["clientConfig"]["caBundle"].as_str().is_some_and(|b| !b.is_empty()))
    });
    wait_for(WAIT, "tenant b reconciled, not ready", || {
        let tenant = get(
            &rest,
            &format!("/apis/relay.sh/v1beta1/namespaces/{TENANT_B_NS}/tenants/b"),
        );
        let labelled = get(&rest, &format!("/api/v1/namespaces/{TENANT_B_NS}"))
            .is_some_and(|ns| ns["metadata"]["labels"]["relay.sh/tenant"] == "true");
        labelled
            && tenant.is_some_and(|t| {
                t["status"]["conditions"]
                    .as_array()
                    .is_some_and(|c| !c.is_empty())
                    && t["status"]["toolsVolumeClaim"].is_null()
            })
    });
    wait_default_account(&rest, TENANT_NS);
    wait_default_account(&rest, TENANT_B_NS);

    // A Tekton TaskRun step and a Knative trigger, through the API server and the webhook. Their
    // entrypoints ship to the metadata API on the host's loopback (no Service network here): host
    // network. Images are in containerd already (tags other than `latest`: IfNotPresent).
    let step = rest
        .post(&format!("/api/v1/namespaces/{TENANT_NS}/pods"), &step_pod())
        .unwrap();
    assert_eq!(
        step["metadata"]["annotations"]["relay.sh/injected"], "true",
        "{step}"
    );
    assert_eq!(claim_of(&step), Some(claim_v1.as_str()), "{step}");
    let trigger = rest
        .post(
            &format!("/api/v1/namespaces/{TENANT_NS}/pods"),
            &trigger_pod(&trigger_image),
        )
        .unwrap();
    assert_eq!(
        trigger["metadata"]["annotations"]["relay.sh/injected"], "true",
        "{trigger}"
    );
    // The image's ENTRYPOINT and CMD, from the registry, run under the entrypoint; `$` escaped
    // as `$$`, since the kubelet expands `$(VAR)` in a pod's command but not in an image's.
    let user = &trigger["spec"]["containers"][0];
    let run: Vec<&str> = [&user["command"], &user["args"]]
        .into_iter()
        .filter_map(Value::as_array)
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(
        run,
        [
            "/relay/lib/entrypoint",
            "--",
            "/bin/sh",
            "-c",
            &SCRIPT.replace('$', "$$"),
            "trigger"
        ],
        "{user}"
    );
    let trigger_uid = trigger["metadata"]["uid"].as_str().unwrap().to_owned();
    // Tenant B's tools are not ready: the webhook admits its pod as it is.
    let unready_command = json!(["/bin/sh", "-c", SCRIPT, "unready"]);
    let unready = rest
        .post(
            &format!("/api/v1/namespaces/{TENANT_B_NS}/pods"),
            &json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "unready-pod", "labels": {
                    "tekton.dev/taskRun": "unready-run", "relay.sh/workflow": "wf-b",
                    "relay.sh/run": "1", "relay.sh/step": "unready"}},
                "spec": {"restartPolicy": "Never", "containers": [{
                    "name": "step-unready", "image": BUSYBOX_IMAGE, "imagePullPolicy": "Never",
                    "command": unready_command}]}}),
        )
        .unwrap();
    assert!(
        unready["metadata"]["annotations"]["relay.sh/injected"].is_null(),
        "{unready}"
    );
    assert_eq!(
        unready["spec"]["containers"][0]["command"], unready_command,
        "{unready}"
    );
    assert_eq!(claim_of(&unready), None, "{unready}");

    for (namespace, pod) in [
        (TENANT_NS, "build-pod"),
        (TENANT_NS, "trigger-pod"),
        (TENANT_B_NS, "unready-pod"),
    ] {
        let done = node.wait_pod_ended(namespace, pod, WAIT).unwrap();
        assert_eq!(
            done["status"]["phase"],
            "Succeeded",
            "{pod}: {}\n{}",
            done["status"],
            node.log_tail("kubelet", 20)
        );
        // The step's pod vanishes right after it exits (Tekton's timeout/cancel case, where
        // logs used to be lost); its logs must still be complete below.
        if pod == "build-pod" {
            rest.delete(&pod_path(namespace, pod), 0).unwrap();
        }
    }
    // The entrypoint never tees: the containers' own stdout (the kubelet's CRI log) has nothing
    // of it.
    let cri_log = node
        .logs(TENANT_NS, "trigger-pod", "user-container")
        .unwrap();
    assert!(
        cri_log.stdout.is_empty(),
        "{:?}",
        String::from_utf8_lossy(&cri_log.stdout)
    );
    // The webhook said why it left tenant B's pod alone.
    wait_for(WAIT, "the ToolsNotReady event", || {
        rest.get(&format!("/api/v1/namespaces/{TENANT_B_NS}/events"))
            .unwrap()
            .and_then(|list| list["items"].as_array().cloned())
            .is_some_and(|events| {
                events.iter().any(|e| {
                    e["reason"] == "ToolsNotReady"
                        && e["message"]
                            .as_str()
                            .is_some_and(|m| m.contains("unready-pod"))
                })
            })
    });

    let step_ctx = "workflows/wf/runs/7/steps/build";
    let trigger_ctx = "workflows/wf/triggers/sync-1";
    let unready_ctx = "workflows/wf-b/runs/1/steps/unready";
    assert_both_paths(&api, step_ctx, "step-build", "build");
    assert_both_paths(
        &api,
        trigger_ctx,
        &format!("user-container.{trigger_uid}"),
        "trigger",
    );
    // The capture report: both paths agree on every wrapped container stream.
    let consumer = Consumer {
        http: reqwest::blocking::Client::new(),
        url: api.url.clone(),
        token: api.token("workflows/wf", Scope::Read),
    };
    let step_report = consumer.report(step_ctx);
    assert_eq!(step_report["agree"], true, "{step_report:#}");
    assert_eq!(
        comparisons(&step_report),
        [
            ("step-build.stderr".to_owned(), "agree".to_owned()),
            ("step-build.stdout".to_owned(), "agree".to_owned())
        ],
        "{step_report:#}"
    );
    let trigger_report = consumer.report(trigger_ctx);
    for (name, comparison) in comparisons(&trigger_report) {
        let want = if name.starts_with("queue-proxy.") {
            "ebpf_only"
        } else {
            "agree"
        };
        assert_eq!(comparison, want, "{name}: {trigger_report:#}");
    }
    // The consumer API serves each container's streams, from the entrypoint where it has them
    // and from the collector where only it does (queue-proxy).
    assert!(
        consumer.logs(step_ctx, "step-build.stdout") == expected("build").0,
        "step-build.stdout through the consumer API differs"
    );
    assert_eq!(
        consumer.logs(trigger_ctx, &format!("queue-proxy.{trigger_uid}.stdout")),
        b"proxy ready\n"
    );
    let proxy = complete_stream(
        &api,
        trigger_ctx,
        &format!("queue-proxy.{trigger_uid}.stdout"),
        "ebpf",
    );
    assert_eq!(proxy, b"proxy ready\n");

    // Tenant B's pod: only the collector has it, and the consumer API serves it from there.
    let (unready_out, unready_err) = expected("unready");
    assert!(
        complete_stream(&api, unready_ctx, "step-unready.stdout", "ebpf") == unready_out,
        "ebpf step-unready.stdout differs"
    );
    let b_consumer = Consumer {
        http: reqwest::blocking::Client::new(),
        url: api.url.clone(),
        token: cli_read_token(&api, "workflows/wf-b"),
    };
    let unready_report = b_consumer.report(unready_ctx);
    assert_eq!(
        comparisons(&unready_report),
        [
            ("step-unready.stderr".to_owned(), "ebpf_only".to_owned()),
            ("step-unready.stdout".to_owned(), "ebpf_only".to_owned())
        ],
        "{unready_report:#}"
    );
    assert!(
        b_consumer.logs(unready_ctx, "step-unready.stdout") == unready_out,
        "step-unready.stdout through the consumer API differs"
    );
    assert_eq!(
        b_consumer.logs(unready_ctx, "step-unready.stderr"),
        unready_err
    );
    eprintln!(
        "e2e: captures and the unready tenant done after {:?}",
        started.elapsed()
    );

    // The collector's token rotates, as the kubelet rotates a projected token: the file is
    // replaced by a token bound to the collector's next pod. The first pod goes, and the API
    // restarts so that no cached review lets the first token through: from here on only the new
    // token is valid, so everything the collector ships below proves it read the file again.
    let next_collector_pod = collector_pod(&rest, "relay-collector-2", NODE);
    replace_file(
        &token_file,
        &pod_token(&rest, COLLECTOR_ACCOUNT, &next_collector_pod),
    );
    rest.delete(&pod_path(SYSTEM_NS, "relay-collector-1"), 0)
        .unwrap();
    wait_for(WAIT, "the first collector pod gone", || {
        get(&rest, &pod_path(SYSTEM_NS, "relay-collector-1")).is_none()
    });
    api.kill();
    api.up();
    let refused = reqwest::blocking::Client::new()
        .post(format!("{}/logs", api.url))
        .bearer_auth(&first_collector_token)
        .json(&json!({"name": "x.stdout", "context": step_ctx}))
        .send()
        .unwrap()
        .status();
    assert_eq!(refused, 401, "the rotated-out token still works");

    // A long-running step on tools v1, held at a gate half-way.
    let gate = tempfile::tempdir().unwrap();
    let long = rest
        .post(
            &format!("/api/v1/namespaces/{TENANT_NS}/pods"),
            &json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "long-pod", "labels": {
                    "tekton.dev/taskRun": "long-run", "relay.sh/workflow": "wf",
                    "relay.sh/run": "8", "relay.sh/step": "long"}},
                "spec": {"restartPolicy": "Never", "hostNetwork": true,
                    "volumes": [{"name": "gate", "hostPath": {
                        "path": gate.path().to_str().unwrap(), "type": "Directory"}}],
                    "containers": [{
                        "name": "step-long", "image": STEP_IMAGE,
                        "command": ["/tekton-entrypoint"],
                        "args": ["-entrypoint", "/bin/sh", "--", "-c", GATED_SCRIPT, "long"],
                        "volumeMounts": [{"name": "gate", "mountPath": "/gate"}]}]}}),
        )
        .unwrap();
    assert_eq!(claim_of(&long), Some(claim_v1.as_str()), "{long}");
    let long_ctx = "workflows/wf/runs/8/steps/long";
    let half: usize = (0..GATE_LINE)
        .map(|i| format!("long line {i}\n").len())
        .sum();
    wait_for(WAIT, "the long step's first half shipped", || {
        let (status, _) = api.read_in(long_ctx, "step-long.stdout", "entrypoint");
        status["length"].as_u64() == Some(half as u64)
    });

    // The tools change to v2 (a new operator version with another tools image): v2's Job runs,
    // new pods get its claim, the running pod keeps v1's.
    operator.stop();
    let operator = Operator::start(
        kubeconfig,
        TOOLS_IMAGE_V2,
        webhook_port,
        &api.url,
        &registry.host(),
    );
    operator.wait_ready();
    let deadline = Instant::now() + WAIT;
    let claim_v2 = loop {
        if let Some(claim) = tools_claim(&rest, TENANT_NS, "a").filter(|c| *c != claim_v1) {
            break claim;
        }
        assert!(
            Instant::now() < deadline,
            "tools v2 not ready:\n{}",
            node.log_tail("kubelet", 20)
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let after = rest
        .post(
            &format!("/api/v1/namespaces/{TENANT_NS}/pods"),
            &json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "after-pod", "labels": {
                    "tekton.dev/taskRun": "after-run", "relay.sh/workflow": "wf",
                    "relay.sh/run": "8", "relay.sh/step": "after"}},
                "spec": {"restartPolicy": "Never", "hostNetwork": true, "containers": [{
                    "name": "step-after", "image": STEP_IMAGE,
                    "command": ["/tekton-entrypoint"],
                    "args": ["-entrypoint", "/bin/sh", "--", "-c", SCRIPT, "after"]}]}}),
        )
        .unwrap();
    assert_eq!(
        after["metadata"]["annotations"]["relay.sh/injected"], "true",
        "{after}"
    );
    assert_eq!(claim_of(&after), Some(claim_v2.as_str()), "{after}");
    let long_now = get(&rest, &pod_path(TENANT_NS, "long-pod")).unwrap();
    assert_eq!(claim_of(&long_now), Some(claim_v1.as_str()), "{long_now}");
    assert_eq!(
        long_now["status"]["phase"], "Running",
        "{}",
        long_now["status"]
    );
    // Past the grace period the operator finds v1 still mounted, and keeps it.
    operator.wait_for_log(&["superseded tools claim still mounted", &claim_v1]);
    let claims = format!("/api/v1/namespaces/{TENANT_NS}/persistentvolumeclaims");
    let jobs = format!("/apis/batch/v1/namespaces/{TENANT_NS}/jobs");
    let kept = get(&rest, &format!("{claims}/{claim_v1}")).unwrap();
    assert!(
        kept["metadata"]["deletionTimestamp"].is_null(),
        "a mounted claim is being deleted: {kept}"
    );
    assert!(get(&rest, &format!("{jobs}/{claim_v1}")).is_some());

    // Access, while tenant A's pod runs on this node: tenants' pod tokens, a read token for one
    // tenant's workflow, and a collector of another node are refused everything of the others.
    let a_token = pod_token(&rest, "default", &long_now);
    let b_token = pod_token(
        &rest,
        "default",
        &get(&rest, &pod_path(TENANT_B_NS, "unready-pod")).unwrap(),
    );
    let a_reader = api.token("workflows/wf", Scope::Read);
    let of_b = Foreign::new(
        &api,
        unready_ctx,
        &["step-unready.stdout", "step-unready.stderr"],
        "unready line",
    );
    let of_a = Foreign::new(
        &api,
        long_ctx,
        &["step-long.stdout", "step-long.stderr"],
        "long line",
    );
    // The tokens work where they should, so the refusals below are about whose streams they are.
    let own = Consumer {
        http: reqwest::blocking::Client::new(),
        url: api.url.clone(),
        token: a_token.clone(),
    };
    assert!(
        own.logs(long_ctx, "step-long.stdout")
            .starts_with(b"long line 0\n")
    );
    assert_refused(&api.url, "tenant A's pod token", &a_token, &of_b);
    assert_refused(&api.url, "tenant B's pod token", &b_token, &of_a);
    assert_refused(&api.url, "a read token for workflows/wf", &a_reader, &of_b);
    assert_refused(
        &api.url,
        "a read token for workflows/wf-b",
        &b_consumer.token,
        &of_a,
    );
    rest.post(
        "/api/v1/nodes",
        &json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": OTHER_NODE},
            "spec": {"unschedulable": true}}),
    )
    .unwrap();
    let other_collector = pod_token(
        &rest,
        COLLECTOR_ACCOUNT,
        &collector_pod(&rest, "relay-collector-other", OTHER_NODE),
    );
    assert_refused(
        &api.url,
        "another node's collector",
        &other_collector,
        &of_a,
    );
    // Nothing of the attempts was stored.
    assert_eq!(
        comparisons(&b_consumer.report(unready_ctx)),
        comparisons(&unready_report)
    );
    assert!(
        b_consumer.logs(unready_ctx, "step-unready.stdout") == unready_out,
        "step-unready.stdout changed"
    );

    // The long step goes on and ends; all its output is there, on both paths.
    std::fs::write(gate.path().join("release"), b"").unwrap();
    for pod in ["long-pod", "after-pod"] {
        let done = node.wait_pod_ended(TENANT_NS, pod, WAIT).unwrap();
        assert_eq!(
            done["status"]["phase"], "Succeeded",
            "{pod}: {}",
            done["status"]
        );
    }
    assert_both_paths(&api, long_ctx, "step-long", "long");
    assert_both_paths(
        &api,
        "workflows/wf/runs/8/steps/after",
        "step-after",
        "after",
    );
    assert_eq!(consumer.report(long_ctx)["agree"], true);

    // With its pod gone, v1's claim and Job are collected; v2's stay.
    wait_for(WAIT, "the v1 claim and Job collected", || {
        let claim = get(&rest, &format!("{claims}/{claim_v1}"));
        let job = get(&rest, &format!("{jobs}/{claim_v1}"));
        claim.is_none_or(|c| !c["metadata"]["deletionTimestamp"].is_null())
            && job.is_none_or(|j| !j["metadata"]["deletionTimestamp"].is_null())
    });
    let v2 = get(&rest, &format!("{claims}/{claim_v2}")).unwrap();
    assert!(v2["metadata"]["deletionTimestamp"].is_null(), "{v2}");
    assert!(get(&rest, &format!("{jobs}/{claim_v2}")).is_some());
    eprintln!("e2e: all phases done after {:?}", started.elapsed());
    drop(collector);
    drop(operator);
}

//! `kubectl relay` with the test bed's real kube-apiserver (skipped, saying why, when the test bed
//! is not installed; failing instead under `RELAY_REQUIRE_TESTBED=1`):
//! - `pod/NAME` targets: pods created by hand with Tekton and Knative labels, looked up with a
//!   kubeconfig whose user is a ServiceAccount token from TokenRequest; that same token, taken
//!   from the kubeconfig, reads the pod's logs from the metadata API in `--auth kubernetes` mode;
//! - the service proxy: the metadata API in a network namespace of the test's own (the API server
//!   refuses to proxy to loopback), behind a Service and Endpoints, found without `--url`;
//! - a client-certificate kubeconfig without `--token`: one line, exit 3.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use common::{plugin, run, tempdir, write_lines};
use metadata_api::auth::Scope;
use serde_json::{Value, json};
use testbed::{
    api::{Api, ApiOptions},
    kube::{KubeApi, Rest, SERVICE_ACCOUNT_ISSUER},
};

const LIMIT: Duration = Duration::from_secs(30);
const T0: u64 = 1_700_000_000_000;
/// The audience the metadata API checks tokens for (its default `--token-audience`).
const AUDIENCE: &str = "relay-metadata-api";

fn create(rest: &Rest, path: &str, body: Value) -> Value {
    rest.post(path, &body).unwrap()
}

fn namespace(rest: &Rest, ns: &str) {
    create(
        rest,
        "/api/v1/namespaces",
        json!({"metadata": {"name": ns}}),
    );
}

/// A pod nothing runs (its node is set by hand), with `labels`; returns its UID.
fn pod(rest: &Rest, ns: &str, name: &str, labels: Value) -> String {
    let pod = create(
        rest,
        &format!("/api/v1/namespaces/{ns}/pods"),
        json!({
            "metadata": {"name": name, "labels": labels},
            "spec": {"serviceAccountName": "runner", "nodeName": "node-1",
                     "containers": [{"name": "c", "image": "busybox"}]},
        }),
    );
    pod["metadata"]["uid"].as_str().unwrap().to_owned()
}

/// A kubeconfig for this API server with `user`.
fn kubeconfig(kube: &KubeApi, dir: &Path, name: &str, user: Value, ns: &str) -> PathBuf {
    use std::io::Write as _;
    let ca = kube.ca_pem().as_bytes();
    let mut b64 = Vec::new();
    // base64 through the standard tool keeps this test free of another dependency.
    let mut child = Command::new("base64")
        .arg("-w0")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(ca).unwrap();
    let out = child.wait_with_output().unwrap();
    b64.extend(out.stdout);
    let config = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "bed", "cluster": {"server": kube.url(),
                      "certificate-authority-data": String::from_utf8(b64).unwrap()}}],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "bed", "context": {"cluster": "bed", "user": "u", "namespace": ns}}],
        "current-context": "bed",
    });
    let path = dir.join(name);
    std::fs::write(&path, serde_json::to_vec(&config).unwrap()).unwrap();
    path
}

#[test]
fn pod_targets_resolve_to_their_context_with_a_service_account_kubeconfig() {
    let Some(kube) = KubeApi::start_or_skip() else {
        return;
    };
    let rest = kube.rest().unwrap();
    namespace(&rest, "tenant");
    create(
        &rest,
        "/api/v1/namespaces/tenant/serviceaccounts",
        json!({"metadata": {"name": "runner"}}),
    );
    // The ServiceAccount may read pods in its namespace, as `kubectl relay logs pod/NAME` needs.
    create(
        &rest,
        "/apis/rbac.authorization.k8s.io/v1/namespaces/tenant/roles",
        json!({"metadata": {"name": "pod-reader"},
               "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}]}),
    );
    create(
        &rest,
        "/apis/rbac.authorization.k8s.io/v1/namespaces/tenant/rolebindings",
        json!({"metadata": {"name": "runner-reads-pods"},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
               "subjects": [{"kind": "ServiceAccount", "name": "runner", "namespace": "tenant"}]}),
    );
    let uid = pod(
        &rest,
        "tenant",
        "build-pod",
        json!({"tekton.dev/taskRun": "tr-1", "relay.sh/workflow": "w1", "relay.sh/run": "7",
               "relay.sh/step": "build"}),
    );
    pod(&rest, "tenant", "plain-pod", json!({"app": "x"}));
    // The step pod's own token, for both the API server (its default audience) and the metadata
    // API, which maps it to the pod's context through a TokenReview.
    let token = create(
        &rest,
        "/api/v1/namespaces/tenant/serviceaccounts/runner/token",
        json!({"spec": {"audiences": [AUDIENCE, SERVICE_ACCOUNT_ISSUER], "expirationSeconds": 3600,
               "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": "build-pod", "uid": uid}}}),
    )["status"]["token"]
        .as_str()
        .unwrap()
        .to_owned();

    let api = Api::start_with_env(
        &["--auth", "kubernetes"],
        &[("KUBECONFIG", &kube.kubeconfig_path().display().to_string())],
    );
    // The pod's token writes its own context.
    write_lines(
        &api.url,
        &token,
        json!({"name": "stdout"}),
        &[(T0, "built\n"), (T0 + 1, "pushed\n")],
        true,
    );

    let (_dir, dir) = tempdir();
    let sa = kubeconfig(&kube, &dir, "sa", json!({"token": token}), "tenant");
    let logs = |target: &str, extra: &[&str]| {
        let mut c = plugin(&dir);
        c.args(["logs", target, "--url", &api.url])
            .arg("--kubeconfig")
            .arg(&sa)
            .args(extra);
        run(c, LIMIT)
    };
    // No --token: the kubeconfig's token looks the pod up and reads its logs.
    assert_eq!(logs("pod/build-pod", &[]).ok(), "built\npushed\n");
    assert_eq!(
        logs("pod/build-pod", &["-n", "tenant", "--tail", "1"]).ok(),
        "pushed\n"
    );
    // The same context named directly.
    assert_eq!(logs("step/w1/7/build", &[]).ok(), "built\npushed\n");
    logs("pod/gone", &[]).fails(2, "pod tenant/gone not found");
    logs("pod/plain-pod", &[]).fails(2, "no relay log context");
    // The ServiceAccount may not read pods elsewhere.
    logs("pod/build-pod", &["-n", "default"]).fails(3, "forbidden");
    let mut c = plugin(&dir);
    c.args(["streams", "pod/build-pod", "--url", &api.url])
        .arg("--kubeconfig")
        .arg(&sa);
    assert!(run(c, LIMIT).ok().contains("stdout  entrypoint  13"));

    // A trigger pod: its context is the trigger's, and only its replica is asked for (pod=).
    let admin = kube.kubeconfig_path();
    pod(
        &rest,
        "default",
        "trigger-pod-1",
        json!({"serving.knative.dev/revision": "rev-1", "relay.sh/workflow": "w1",
               "relay.sh/trigger-sync-id": "sync-1"}),
    );
    let read = api.token("workflows/w1", Scope::Read);
    // Two replicas, each stream naming its pod as the collector does; written now, since a
    // trigger's read covers the last hour unless told otherwise.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    for (uid, pod, line) in [
        ("uid-1", "trigger-pod-1", "hook\n"),
        ("uid-2", "trigger-pod-2", "the other replica\n"),
    ] {
        write_lines(
            &api.url,
            &api.token("workflows/w1/triggers/sync-1", Scope::Write),
            json!({"name": format!("user-container.{uid}.stdout"), "pod": pod}),
            &[(now, line)],
            true,
        );
    }
    let mut c = plugin(&dir);
    c.args([
        "logs",
        "pod/trigger-pod-1",
        "--url",
        &api.url,
        "--token",
        &read,
    ])
    .arg("--kubeconfig")
    .arg(&admin);
    assert_eq!(run(c, LIMIT).ok(), "hook\n");

    // The bed's admin authenticates with a client certificate: no bearer token for the API.
    let mut c = plugin(&dir);
    c.args(["logs", "step/w1/7/build", "--url", &api.url])
        .env("KUBECONFIG", &admin);
    run(c, LIMIT).fails(3, "client certificate");
}

/// A network namespace with a veth pair to the host, both ends with private addresses; removed
/// (with the pair) on drop.
struct Netns {
    name: String,
    host_ip: String,
    ns_ip: String,
}

impl Netns {
    fn create() -> Option<Self> {
        let id = std::process::id();
        let net = format!("10.{}.{}", 200 + (id >> 16) % 50, (id >> 8) % 256);
        let this = Self {
            name: format!("relay-kr-{id}"),
            host_ip: format!("{net}.1"),
            ns_ip: format!("{net}.2"),
        };
        let (host_if, ns_if) = (
            format!("rkr{}h", id % 100_000),
            format!("rkr{}n", id % 100_000),
        );
        let ip = |args: &[&str]| {
            Command::new("ip")
                .args(args)
                .status()
                .is_ok_and(|s| s.success())
        };
        if !ip(&["netns", "add", &this.name]) {
            testbed::skip_or_fail("cannot create a network namespace (root and iproute2 needed)");
            return None;
        }
        let n = &this.name;
        let ok = ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
        ]) && ip(&["link", "set", &ns_if, "netns", n])
            && ip(&[
                "addr",
                "add",
                &format!("{}/30", this.host_ip),
                "dev",
                &host_if,
            ])
            && ip(&["link", "set", &host_if, "up"])
            && ip(&[
                "-n",
                n,
                "addr",
                "add",
                &format!("{}/30", this.ns_ip),
                "dev",
                &ns_if,
            ])
            && ip(&["-n", n, "link", "set", &ns_if, "up"])
            && ip(&["-n", n, "link", "set", "lo", "up"]);
        assert!(ok, "cannot set up the veth pair of {n}");
        Some(this)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes its end of the pair, and with it the host's.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

#[test]
fn without_a_url_the_api_is_reached_through_the_service_proxy() {
    let Some(kube) = KubeApi::start_or_skip() else {
        return;
    };
    let Some(netns) = Netns::create() else {
        return;
    };
    let (_dir, dir) = tempdir();
    // `metadata-api serve` inside the namespace, on its private address.
    let wrapper = dir.join("metadata-api-in-netns");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec ip netns exec {} {} \"$@\"\n",
            netns.name,
            testbed::api::api_bin().display()
        ),
    )
    .unwrap();
    Command::new("chmod")
        .arg("+x")
        .arg(&wrapper)
        .status()
        .unwrap();
    let listen = format!("{}:7070", netns.ns_ip);
    let api = Api::start_with(&ApiOptions {
        bin: Some(&wrapper),
        listen: Some(&listen),
        ..ApiOptions::default()
    });
    let write = api.token("workflows/w1/runs/r1/steps/s1", Scope::Write);
    write_lines(
        &api.url,
        &write,
        json!({"name": "stdout"}),
        &[(T0, "through the proxy\n")],
        true,
    );
    let read = api.token("workflows/w1", Scope::Read);

    // The Service as deploy/ names it, its endpoint the API in the namespace.
    let rest = kube.rest().unwrap();
    namespace(&rest, "relay-system");
    create(
        &rest,
        "/api/v1/namespaces/relay-system/services",
        json!({"metadata": {"name": "metadata-api"},
               "spec": {"ports": [{"name": "http", "port": 7070, "targetPort": 7070}]}}),
    );
    // The API server proxies only to an endpoint whose target is a pod with that IP: the API's
    // pod, its status written by hand as a kubelet would.
    create(
        &rest,
        "/api/v1/namespaces/relay-system/pods",
        json!({"metadata": {"name": "metadata-api-0"},
               "spec": {"nodeName": "node-1", "containers": [{"name": "api", "image": "metadata-api"}]}}),
    );
    rest.merge_patch(
        "/api/v1/namespaces/relay-system/pods/metadata-api-0/status",
        &json!({"status": {"phase": "Running", "podIP": netns.ns_ip, "podIPs": [{"ip": netns.ns_ip}]}}),
    )
    .unwrap();
    create(
        &rest,
        "/api/v1/namespaces/relay-system/endpoints",
        json!({"metadata": {"name": "metadata-api"},
               "subsets": [{"addresses": [{"ip": netns.ns_ip, "targetRef": {"kind": "Pod",
                              "name": "metadata-api-0", "namespace": "relay-system"}}],
                            "ports": [{"name": "http", "port": 7070}]}]}),
    );

    let admin = kube.kubeconfig_path();
    let relay = |args: &[&str]| {
        let mut c = plugin(&dir);
        c.args(args).arg("--kubeconfig").arg(&admin);
        run(c, LIMIT)
    };
    // The admin's client certificate authenticates to the API server; the token travels in
    // x-relay-authorization (the API server removes Authorization). The API server sees the new
    // Endpoints through its informer: "no endpoints available" until then.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let first = loop {
        let ran = relay(&["logs", "step/w1/r1/s1", "--token", &read]);
        if !ran.stderr.contains("no endpoints available") || std::time::Instant::now() > deadline {
            break ran;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(first.ok(), "through the proxy\n");
    assert!(
        relay(&["report", "step/w1/r1/s1", "--token", &read])
            .ok()
            .starts_with("context workflows/w1/runs/r1/steps/s1\n")
    );
    // Explicitly named, by port number.
    assert_eq!(
        relay(&[
            "logs",
            "step/w1/r1/s1",
            "--token",
            &read,
            "--service",
            "relay-system/metadata-api:7070"
        ])
        .ok(),
        "through the proxy\n"
    );
    // The relay API's own answers come back through the proxy with their codes.
    relay(&["logs", "step/w1/r1/s1", "--token", "bad"]).fails(3, "401");
    relay(&["logs", "step/w2/r1/s1", "--token", &read]).fails(2, "404");
    // A Service that does not exist: the API cannot be reached.
    relay(&[
        "logs",
        "step/w1/r1/s1",
        "--token",
        &read,
        "--service",
        "relay-system/nope:http",
    ])
    .fails(4, "service relay-system/nope");
}

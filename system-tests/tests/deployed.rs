//! relay installed as a user installs it, on the test bed's real node: the four images of
//! `cargo xtask images --profile dev` imported into the node's containerd, `deploy/` applied
//! with kubectl through the API server (`deploy/overlays/testbed`, which lists every difference
//! from a real cluster), and the kubelet running the metadata API, the operator and the
//! operator's collector DaemonSet with the security contexts, volumes and mounts the manifests
//! give them. On that install a Tenant gets its tools, and a Tekton-shaped and a Knative-shaped
//! pod (the shapes of `e2e.rs`, which cites where they come from) are wrapped by the webhook, run,
//! and read back byte-exact from the deployed metadata API on both capture paths.
//!
//! It lives with `e2e.rs` (same crate, same shapes and test group): that test runs the same
//! components as host binaries, this one as the manifests deploy them, so the two differ only in
//! how relay is installed.
//!
//! Skips (fails under `RELAY_REQUIRE_TESTBED=1`) when the images are not built: `RELAY_IMAGES_DIR`,
//! or `$CARGO_TARGET_DIR/images` (`target/images`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Component, Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use common::{assert_both_paths, comparisons, step_pod, trigger_pod, workload_images};
use serde_json::{Value, json};
use testbed::api::{read_stream_at, wait_for};
use testbed::collector::can_run;
use testbed::kube::{KubeApi, KubeOptions, Rest};
use testbed::node::{Node, NodeOptions};
use testbed::oci_archive::{self, images_dir};
use testbed::registry::Registry;

/// Deployments Available, Jobs done, pods ended: the kubelet starts pods in about 2 s, but the
/// images are large and the machine is shared.
const WAIT: Duration = Duration::from_secs(180);
const SYSTEM_NS: &str = "relay-system";
/// deploy/examples/namespace.yaml and deploy/overlays/testbed/tenant.yaml.
const TENANT_NS: &str = "tenant-a";
const TENANT: &str = "tenant-a";
/// Where deploy/overlays/testbed has the metadata API listen.
const API_URL: &str = "http://127.0.0.1:17070";
const KEY_FILE: &str = "/var/lib/relay/key/metadata-api.key";
const IMAGES: [&str; 4] = ["metadata-api", "operator", "collector", "tools"];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `path` relative to `from` (both absolute): kubectl 1.20's kustomize refuses absolute bases.
fn relative(from: &Path, path: &Path) -> PathBuf {
    let (from, path) = (from.canonicalize().unwrap(), path.canonicalize().unwrap());
    let from: Vec<Component> = from.components().collect();
    let path: Vec<Component> = path.components().collect();
    let common = from.iter().zip(&path).take_while(|(a, b)| a == b).count();
    let mut out = PathBuf::new();
    for _ in common..from.len() {
        out.push("..");
    }
    for c in &path[common..] {
        out.push(c.as_os_str());
    }
    out
}

/// Runs kubectl with `args` (and `stdin`), returning its output whatever its exit status.
fn kubectl(kube: &KubeApi, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut cmd = kube.kubectl();
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    if stdin.is_some() {
        cmd.stdin(Stdio::piped());
    }
    let mut child = cmd.spawn().unwrap();
    if let Some(bytes) = stdin {
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), bytes).unwrap();
    }
    child.wait_with_output().unwrap()
}

/// kubectl with `args`, which must succeed; its stdout.
fn kubectl_ok(kube: &KubeApi, args: &[&str]) -> String {
    let out = kubectl(kube, args, None);
    assert!(
        out.status.success(),
        "kubectl {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// On a failing test: what kubectl says about every pod (status, events, logs), so the failure
/// says why. Dropped before the node, while the API server and the kubelet still answer.
struct Dump<'a>(&'a KubeApi);

impl Drop for Dump<'_> {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let kube = self.0;
        let text = |args: &[&str]| {
            let out = kubectl(kube, args, None);
            format!(
                "$ kubectl {}\n{}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        };
        eprintln!(
            "{}",
            text(&["get", "all,pvc,pv,tenants", "-A", "-o", "wide"])
        );
        for namespace in [SYSTEM_NS, TENANT_NS] {
            eprintln!("{}", text(&["describe", "pods", "-n", namespace]));
            let pods = kubectl(kube, &["get", "pods", "-n", namespace, "-o", "name"], None);
            for pod in String::from_utf8_lossy(&pods.stdout).lines() {
                eprintln!(
                    "{}",
                    text(&[
                        "logs",
                        "-n",
                        namespace,
                        pod,
                        "--all-containers",
                        "--tail",
                        "40"
                    ])
                );
            }
        }
    }
}

/// The site kustomization: `deploy/overlays/testbed` plus what only this run knows (the API
/// server's port, the node's kubepods cgroup, the tools volumes' host directories, the registry).
fn site_kustomization(dir: &Path, kube: &KubeApi, kubepods: &Path, tools: &Path, registry: &str) {
    let overlay = workspace().join("deploy/overlays/testbed");
    let port = kube.url().rsplit(':').next().unwrap().to_owned();
    let mut kustomization = format!(
        "bases:\n- {}\npatchesStrategicMerge:\n- port-metadata-api.yaml\n- port-relay-operator.yaml\n\
         patchesJson6902:\n\
         - target: {{group: apps, version: v1, kind: Deployment, name: relay-operator}}\n  \
         path: operator-site.yaml\n",
        relative(dir, &overlay).display()
    );
    for i in 0..3 {
        kustomization.push_str(&format!(
            "- target: {{version: v1, kind: PersistentVolume, name: relay-tools-{i}}}\n  \
             path: tools-{i}.yaml\n"
        ));
        std::fs::write(
            dir.join(format!("tools-{i}.yaml")),
            serde_json::to_string(&json!([{"op": "replace", "path": "/spec/hostPath/path",
                "value": tools.join(i.to_string())}]))
            .unwrap(),
        )
        .unwrap();
    }
    std::fs::write(dir.join("kustomization.yaml"), kustomization).unwrap();
    let env = json!([{"name": "KUBERNETES_SERVICE_PORT", "value": port}]);
    // One file per Deployment: kubectl 1.20 reads a patch file that starts with `{` as one JSON
    // document.
    for (name, container) in [
        ("metadata-api", "metadata-api"),
        ("relay-operator", "operator"),
    ] {
        let patch = json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "namespace": SYSTEM_NS},
            "spec": {"template": {"spec": {"containers": [
                {"name": container, "env": env}]}}}});
        std::fs::write(
            dir.join(format!("port-{name}.yaml")),
            serde_json::to_string(&patch).unwrap(),
        )
        .unwrap();
    }
    let add = |value: String| json!({"op": "add", "path": "/spec/template/spec/containers/0/args/-", "value": value});
    std::fs::write(
        dir.join("operator-site.yaml"),
        serde_json::to_string(&json!([
            add(format!("--collector-env=KUBERNETES_SERVICE_PORT={port}")),
            add(format!(
                "--collector-arg=--kubepods-cgroup={}",
                kubepods.display()
            )),
            // The Knative-shaped pod's image has no command: the webhook reads its ENTRYPOINT
            // from the test's registry (plain HTTP on loopback).
            add(format!("--insecure-registry={registry}")),
        ]))
        .unwrap(),
    )
    .unwrap();
}

/// Waits until the object at `path` exists and `ready` holds for it.
fn wait_status(rest: &Rest, path: &str, what: &str, ready: impl Fn(&Value) -> bool) {
    wait_for(WAIT, what, || {
        rest.get(path).unwrap().is_some_and(|o| ready(&o))
    });
}

/// A token minted as a cluster admin mints one: `metadata-api token` run in the metadata API's
/// pod, with its key file.
fn mint(kube: &KubeApi, pod: &str, context: &str, scope: &str) -> String {
    kubectl_ok(
        kube,
        &[
            "exec",
            "-n",
            SYSTEM_NS,
            pod,
            "--",
            "/usr/local/bin/metadata-api",
            "token",
            "--key-file",
            KEY_FILE,
            "--context",
            context,
            "--scope",
            scope,
            "--ttl",
            "10m",
        ],
    )
    .trim()
    .to_owned()
}

/// Status and bytes of stream `name` of `source` in `context`, through the deployed API.
fn read_stream(token: &str, context: &str, name: &str, source: &str) -> (Value, Vec<u8>) {
    let spec = if source == "ebpf" {
        json!({"name": name, "context": context, "source": "ebpf"})
    } else {
        json!({"name": name})
    };
    read_stream_at(API_URL, token, &spec)
}

/// Creates `pod` in the tenant's namespace once the webhook wraps it, and returns it as stored.
///
/// The webhook answers from its own watch of the Tenants, which may see the tools Ready a moment
/// after the test does (and admits unwrapped until then: `failurePolicy: Ignore`, tools not
/// ready). A server-side dry run goes through the webhook (it declares `sideEffects: None`)
/// without creating anything: wait until it comes back wrapped, then create.
fn create_wrapped(rest: &Rest, pod: &Value) -> Value {
    let path = format!("/api/v1/namespaces/{TENANT_NS}/pods");
    let name = pod["metadata"]["name"].as_str().unwrap();
    wait_for(WAIT, &format!("the webhook to wrap {name}"), || {
        rest.post(&format!("{path}?dryRun=All"), pod).unwrap()["metadata"]["annotations"]["relay.sh/injected"]
            == "true"
    });
    rest.post(&path, pod).unwrap()
}

/// Waits until the stream is complete, without drops, and returns its bytes.
fn complete_stream(token: &str, context: &str, name: &str, source: &str) -> Vec<u8> {
    common::complete_stream(WAIT, context, name, source, || {
        read_stream(token, context, name, source)
    })
}

fn report(token: &str, context: &str) -> Value {
    let response = reqwest::blocking::Client::new()
        .get(format!("{API_URL}/api/{context}/logs/capture-report"))
        .bearer_auth(token)
        .send()
        .unwrap();
    assert!(response.status().is_success(), "{context}: {response:?}");
    response.json().unwrap()
}

#[test]
fn deploy_overlay_installs_relay_on_a_real_node_and_captures_both_paths() {
    let archives: Vec<PathBuf> = IMAGES
        .iter()
        .map(|name| images_dir().join(format!("{name}.tar")))
        .collect();
    if let Some(missing) = archives.iter().find(|a| !a.exists()) {
        testbed::skip_or_fail(&format!(
            "{} is missing: run `cargo xtask images --profile dev`",
            missing.display()
        ));
        return;
    }
    if !can_run() {
        return;
    }
    let started = Instant::now();
    // The tools volumes' host directories; dropped after the node, which mounts them.
    let tools_volumes = tempfile::tempdir().unwrap();
    let site = tempfile::tempdir().unwrap();
    let Some(kube) = KubeApi::start_or_skip_with(&KubeOptions::new().controller_manager(true))
    else {
        return;
    };
    let Some(node) = Node::start_or_skip(&kube, &NodeOptions::new()) else {
        return;
    };
    let dump = Dump(&kube);
    let cri = node.cri();
    for archive in &archives {
        let name = oci_archive::import(cri, archive).unwrap();
        eprintln!("deployed: imported {name}");
    }
    let Some(registry) = Registry::start_or_skip(None) else {
        return;
    };
    let trigger_image = workload_images(&registry, cri);
    let rest = kube.rest().unwrap();

    // The kubelet makes its QoS cgroups in the v1 hierarchies only; runc makes the v2
    // directories with a pod's first container: the collector must find kubepods there before.
    let kubepods = node.cgroup_v2_root().unwrap().join("kubepods");
    std::fs::create_dir_all(&kubepods).unwrap();
    site_kustomization(
        site.path(),
        &kube,
        &kubepods,
        tools_volumes.path(),
        &registry.host(),
    );
    let site_dir = site.path().to_str().unwrap();
    kubectl_ok(&kube, &["apply", "-k", site_dir]);
    eprintln!("deployed: applied after {:?}", started.elapsed());

    for deployment in ["metadata-api", "relay-operator"] {
        wait_status(
            &rest,
            &format!("/apis/apps/v1/namespaces/{SYSTEM_NS}/deployments/{deployment}"),
            &format!("Deployment {deployment} available"),
            |d| d["status"]["availableReplicas"] == 1,
        );
    }
    // The operator applies the collector DaemonSet; its pod is Ready once the collector serves
    // /healthz, which it does after loading its programs.
    wait_status(
        &rest,
        &format!("/apis/apps/v1/namespaces/{SYSTEM_NS}/daemonsets/relay-collector"),
        "the collector DaemonSet's pod ready",
        |d| d["status"]["numberReady"] == 1,
    );
    eprintln!("deployed: relay running after {:?}", started.elapsed());
    let collector = rest
        .get(&format!(
            "/apis/apps/v1/namespaces/{SYSTEM_NS}/daemonsets/relay-collector"
        ))
        .unwrap()
        .unwrap();
    let spec = &collector["spec"]["template"]["spec"];
    // As deployed: the base's security context and mounts, no tracefs or debugfs anywhere.
    assert_eq!(spec["hostPID"], true, "{spec}");
    let security = &spec["containers"][0]["securityContext"];
    assert_eq!(security["privileged"], false, "{security}");
    assert_eq!(security["readOnlyRootFilesystem"], true, "{security}");
    assert_eq!(
        security["capabilities"]["add"],
        json!(["BPF", "PERFMON", "SYS_PTRACE", "SYS_ADMIN"]),
        "{security}"
    );
    assert!(
        !spec.to_string().contains("tracing") && !spec.to_string().contains("debugfs"),
        "{spec}"
    );

    // A tenant as deploy/examples has it, naming the overlay's tools class.
    kubectl_ok(
        &kube,
        &[
            "apply",
            "-f",
            workspace()
                .join("deploy/examples/namespace.yaml")
                .to_str()
                .unwrap(),
            "-f",
            workspace()
                .join("deploy/overlays/testbed/tenant.yaml")
                .to_str()
                .unwrap(),
        ],
    );
    let tenant_path = format!("/apis/relay.sh/v1beta1/namespaces/{TENANT_NS}/tenants/{TENANT}");
    wait_status(&rest, &tenant_path, "the tenant Ready", |t| {
        t["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    });
    let claim = rest.get(&tenant_path).unwrap().unwrap()["status"]["toolsVolumeClaim"]
        .as_str()
        .unwrap()
        .to_owned();
    let installed = node
        .claim_dir(TENANT_NS, &claim)
        .unwrap()
        .unwrap()
        .join("lib/entrypoint");
    assert!(installed.exists(), "{} missing", installed.display());
    wait_status(
        &rest,
        "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/relay-pod-injection",
        "the webhook's caBundle",
        |c| {
            c["webhooks"][0]["clientConfig"]["caBundle"]
                .as_str()
                .is_some_and(|b| !b.is_empty())
        },
    );
    wait_status(
        &rest,
        &format!("/api/v1/namespaces/{TENANT_NS}/serviceaccounts/default"),
        "the tenant's default ServiceAccount",
        |sa| sa["secrets"].as_array().is_some_and(|s| !s.is_empty()),
    );
    eprintln!("deployed: tenant ready after {:?}", started.elapsed());

    // The workloads of e2e.rs (tests/common), on the host network, reaching the metadata API on loopback.
    let step = create_wrapped(&rest, &step_pod());
    assert_eq!(
        step["metadata"]["annotations"]["relay.sh/injected"], "true",
        "{step}"
    );
    let trigger = create_wrapped(&rest, &trigger_pod(&trigger_image));
    assert_eq!(
        trigger["metadata"]["annotations"]["relay.sh/injected"], "true",
        "{trigger}"
    );
    assert_eq!(
        trigger["spec"]["containers"][0]["command"][0], "/relay/lib/entrypoint",
        "{trigger}"
    );
    let trigger_uid = trigger["metadata"]["uid"].as_str().unwrap().to_owned();
    for pod in ["build-pod", "trigger-pod"] {
        let done = node.wait_pod_ended(TENANT_NS, pod, WAIT).unwrap();
        assert_eq!(
            done["status"]["phase"], "Succeeded",
            "{pod}: {}",
            done["status"]
        );
    }

    // Read back through the deployed API with tokens minted in its pod.
    let api_pod = kubectl_ok(
        &kube,
        &[
            "get",
            "pods",
            "-n",
            SYSTEM_NS,
            "-l",
            "app.kubernetes.io/name=metadata-api",
            "-o",
            "jsonpath={.items[0].metadata.name}",
        ],
    );
    let collector_token = mint(&kube, &api_pod, "workflows", "collector");
    let step_ctx = "workflows/wf/runs/7/steps/build";
    let trigger_ctx = "workflows/wf/triggers/sync-1";
    for (context, prefix, name) in [
        (step_ctx, "step-build".to_owned(), "build"),
        (
            trigger_ctx,
            format!("user-container.{trigger_uid}"),
            "trigger",
        ),
    ] {
        let write_token = mint(&kube, &api_pod, context, "write");
        assert_both_paths(context, &prefix, name, |stream, source| {
            let token = if source == "ebpf" {
                &collector_token
            } else {
                &write_token
            };
            complete_stream(token, context, stream, source)
        });
    }
    let read_token = mint(&kube, &api_pod, "workflows/wf", "read");
    let step_report = report(&read_token, step_ctx);
    assert_eq!(step_report["agree"], true, "{step_report:#}");
    assert_eq!(
        comparisons(&step_report),
        [
            ("step-build.stderr".to_owned(), "agree".to_owned()),
            ("step-build.stdout".to_owned(), "agree".to_owned())
        ],
        "{step_report:#}"
    );
    // The collector finishes queue-proxy's stream when its container ends, which may be after
    // the user container's streams are complete: wait for it to be reported.
    let deadline = Instant::now() + Duration::from_secs(90);
    let trigger_report = loop {
        let r = report(&read_token, trigger_ctx);
        if comparisons(&r).len() >= 3 || Instant::now() >= deadline {
            break r;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    // queue-proxy runs unwrapped (the webhook wraps the user container) and writes to stdout
    // only: the collector alone has it.
    assert_eq!(
        comparisons(&trigger_report),
        [
            (
                format!("queue-proxy.{trigger_uid}.stdout"),
                "ebpf_only".to_owned()
            ),
            (
                format!("user-container.{trigger_uid}.stderr"),
                "agree".to_owned()
            ),
            (
                format!("user-container.{trigger_uid}.stdout"),
                "agree".to_owned()
            ),
        ],
        "{trigger_report:#}"
    );
    eprintln!(
        "deployed: both paths read back after {:?}",
        started.elapsed()
    );
    drop(dump);
}

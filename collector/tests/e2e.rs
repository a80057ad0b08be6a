//! The whole system on real parts, shaped like a cluster node: kube-apiserver + etcd +
//! kube-controller-manager, the `operator` (controller and webhook), the metadata API in
//! `kubernetes` auth mode, containerd + runc through CRI driven by the test bed's kubelet, and the
//! collector in Kubernetes mode. A Tekton-shaped TaskRun pod and a Knative-shaped trigger pod are
//! created through the API server, mutated by the webhook, run by the kubelet; both capture paths
//! store their output byte-exact, also for the step whose pod is deleted as soon as it exits, and
//! the collector alone has the unwrapped `queue-proxy`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Api, Collector, can_run, cgroup2_root, operator_bin, wait_for};
use serde_json::{Value, json};
use testbed::cri::{BUSYBOX_IMAGE, Cri};
use testbed::images::{ImageBuild, tools_image};
use testbed::kube::{KubeApi, KubeOptions, Rest};
use testbed::kubelet::{Kubelet, KubeletOptions};

const WAIT: Duration = Duration::from_secs(90);
const TENANT_NS: &str = "tenant-a";
const NODE: &str = "e2e-node";
/// A stand-in for Tekton's entrypoint: `-entrypoint X -- ARGS` runs `X ARGS`.
const TEKTON_ENTRYPOINT: &str = "#!/bin/sh\n\
[ \"$1\" = -entrypoint ] || { echo 'usage: -entrypoint X -- ARGS' >&2; exit 90; }\n\
ep=$2; shift 2\n\
[ \"$1\" = -- ] && shift\n\
exec \"$ep\" \"$@\"\n";
/// What the workloads print: enough lines to span several shipping batches, and stderr.
const SCRIPT: &str = "i=0; while [ $i -lt 3000 ]; do echo \"$0 line $i\"; i=$((i+1)); done; \
                      echo \"$0 done\" >&2";

fn expected(name: &str) -> (Vec<u8>, Vec<u8>) {
    let stdout: String = (0..3000).map(|i| format!("{name} line {i}\n")).collect();
    (stdout.into_bytes(), format!("{name} done\n").into_bytes())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The operator process; killed when dropped.
struct Operator(Child);

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn get(rest: &Rest, path: &str) -> Option<Value> {
    rest.get(path).unwrap()
}

fn kubepods() -> PathBuf {
    let kubepods = cgroup2_root().unwrap().join("kubepods");
    std::fs::create_dir_all(&kubepods).unwrap();
    kubepods
}

/// Waits until stream `name` of `source` in `context` is complete and returns its bytes.
fn complete_stream(api: &Api, context: &str, name: &str, source: &str) -> Vec<u8> {
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, data) = api.read_in(context, name, source);
        if status["complete"] == true {
            let dropped = status["dropped"].as_array().map_or(0, Vec::len);
            assert_eq!(dropped, 0, "{source} {context} {name}: {status}");
            return data;
        }
        assert!(
            Instant::now() < deadline,
            "{source} {context} {name} not complete: {status}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_tekton_step_and_a_knative_trigger_are_captured_by_both_paths() {
    if !can_run() {
        return;
    }
    let Some(kube) = KubeApi::start_or_skip_with(
        &KubeOptions::new()
            .controller_manager(true)
            .without_controllers(&["job"]),
    ) else {
        return;
    };
    let Some(cri) = Cri::start_or_skip() else {
        return;
    };
    let cri = Arc::new(cri);
    let Some(tools) = tools_image(&cri).unwrap() else {
        return;
    };
    ImageBuild::busybox("localhost/e2e/step:1")
        .file(
            "tekton-entrypoint",
            TEKTON_ENTRYPOINT.as_bytes().to_vec(),
            0o755,
        )
        .import(&cri)
        .unwrap();
    let rest = kube.rest().unwrap();
    let kubeconfig = kube.kubeconfig_path();
    let kubeconfig = kubeconfig.to_str().unwrap();

    // What deploy/ installs, with the webhook reached by URL (no Service network here).
    let crd =
        serde_json::to_value(<operator::crd::Tenant as kube::CustomResourceExt>::crd()).unwrap();
    let webhook_port = free_port();
    rest.install_relay(&crd, &[TENANT_NS], webhook_port)
        .unwrap();

    let api = Api::start_with_env(&["--auth", "kubernetes"], &[("KUBECONFIG", kubeconfig)]);
    let _operator = Operator(
        Command::new(operator_bin())
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info")
            .args(["--tools-image", tools, "--namespace", "relay-system"])
            .args(["--pod-name", "operator-0", "--webhook-ip", "127.0.0.1"])
            .args(["--webhook-listen", &format!("127.0.0.1:{webhook_port}")])
            .args(["--listen", &format!("127.0.0.1:{}", free_port())])
            .args(["--metadata-api-url", &api.url, "--no-image-lookup"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let kubelet = Kubelet::start(
        &kube,
        cri.clone(),
        NODE,
        KubeletOptions::new()
            .schedule_namespace(TENANT_NS)
            .run_jobs(true)
            .image("busybox", BUSYBOX_IMAGE),
    )
    .unwrap();
    let mut collector_cmd = Command::new(env!("CARGO_BIN_EXE_collector"));
    collector_cmd.env("KUBECONFIG", kubeconfig).args([
        "--kubernetes",
        "--node-name",
        NODE,
        "--kubepods-cgroup",
        kubepods().to_str().unwrap(),
        "--namespace-selector",
        "relay.sh/tenant=true",
    ]);
    let collector = Collector::start_with(collector_cmd, &api, &[], &[]);

    // The tenant: its tools Job runs on the kubelet and fills the tools volume.
    rest.post(
        &format!("/apis/relay.sh/v1beta1/namespaces/{TENANT_NS}/tenants"),
        &json!({"apiVersion": "relay.sh/v1beta1", "kind": "Tenant", "metadata": {"name": "a"}, "spec": {}}),
    )
    .unwrap();
    let claim = {
        let deadline = Instant::now() + WAIT;
        loop {
            let tenant = get(
                &rest,
                &format!("/apis/relay.sh/v1beta1/namespaces/{TENANT_NS}/tenants/a"),
            );
            if let Some(claim) = tenant
                .as_ref()
                .and_then(|t| t["status"]["toolsVolumeClaim"].as_str())
            {
                break claim.to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "tenant not ready: {tenant:?}; kubelet errors: {:?}",
                kubelet.errors()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let installed = kubelet.pvc_dir(TENANT_NS, &claim).join("lib/entrypoint");
    assert!(installed.exists(), "{} missing", installed.display());
    wait_for(WAIT, "the webhook's caBundle", || {
        get(&rest, "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/relay-pod-injection")
            .is_some_and(|c| c["webhooks"][0]["clientConfig"]["caBundle"].as_str().is_some_and(|b| !b.is_empty()))
    });
    wait_for(WAIT, "the default ServiceAccount", || {
        get(
            &rest,
            &format!("/api/v1/namespaces/{TENANT_NS}/serviceaccounts/default"),
        )
        .is_some()
    });

    // A Tekton TaskRun step and a Knative trigger, through the API server and the webhook.
    let step = rest
        .post(
            &format!("/api/v1/namespaces/{TENANT_NS}/pods"),
            &json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "build-pod", "labels": {
                    "tekton.dev/taskRun": "build-run", "relay.sh/workflow": "wf",
                    "relay.sh/run": "7", "relay.sh/step": "build"}},
                "spec": {"restartPolicy": "Never", "containers": [{
                    "name": "step-build", "image": "localhost/e2e/step:1",
                    "command": ["/tekton-entrypoint"],
                    "args": ["-entrypoint", "/bin/sh", "--", "-c", SCRIPT, "build"]}]}}),
        )
        .unwrap();
    assert_eq!(
        step["metadata"]["annotations"]["relay.sh/injected"], "true",
        "{step}"
    );
    let trigger = rest
        .post(
            &format!("/api/v1/namespaces/{TENANT_NS}/pods"),
            &json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "trigger-pod", "labels": {
                    "serving.knative.dev/revision": "hook-1", "relay.sh/workflow": "wf",
                    "relay.sh/trigger-sync-id": "sync-1"}},
                "spec": {"restartPolicy": "Never", "containers": [
                    {"name": "user-container", "image": "busybox",
                     "command": ["/bin/sh", "-c", SCRIPT, "trigger"]},
                    {"name": "queue-proxy", "image": "busybox",
                     "command": ["/bin/sh", "-c", "echo proxy ready"]}]}}),
        )
        .unwrap();
    assert_eq!(
        trigger["metadata"]["annotations"]["relay.sh/injected"], "true",
        "{trigger}"
    );
    let trigger_uid = trigger["metadata"]["uid"].as_str().unwrap().to_owned();

    for pod in ["build-pod", "trigger-pod"] {
        let done = kubelet
            .wait_pod(TENANT_NS, pod, WAIT, |p| {
                matches!(p["status"]["phase"].as_str(), Some("Succeeded" | "Failed"))
            })
            .unwrap();
        assert_eq!(
            done["status"]["phase"],
            "Succeeded",
            "{pod}: {}; kubelet errors {:?}",
            done["status"],
            kubelet.errors()
        );
        // The step's pod vanishes right after it exits (Tekton's timeout/cancel case, where
        // logs used to be lost); its logs must still be complete below.
        if pod == "build-pod" {
            rest.delete(&format!("/api/v1/namespaces/{TENANT_NS}/pods/{pod}"), 0)
                .unwrap();
        }
    }
    // The entrypoint never tees: the containers' own stdout (the CRI log) has nothing of it.
    let cri_log = kubelet
        .logs(TENANT_NS, "trigger-pod", "user-container")
        .unwrap();
    assert!(
        cri_log.stdout.is_empty(),
        "{:?}",
        String::from_utf8_lossy(&cri_log.stdout)
    );

    let step_ctx = "workflows/wf/runs/7/steps/build";
    let trigger_ctx = "workflows/wf/triggers/sync-1";
    let cases = [
        (step_ctx, "step-build".to_owned(), "build"),
        (
            trigger_ctx,
            format!("user-container.{trigger_uid}"),
            "trigger",
        ),
    ];
    for (context, prefix, name) in cases {
        let (stdout, stderr) = expected(name);
        for source in ["entrypoint", "ebpf"] {
            let out = complete_stream(&api, context, &format!("{prefix}.stdout"), source);
            assert!(
                out == stdout,
                "{source} {context} stdout differs ({} bytes, want {})",
                out.len(),
                stdout.len()
            );
            let err = complete_stream(&api, context, &format!("{prefix}.stderr"), source);
            assert_eq!(
                String::from_utf8_lossy(&err),
                String::from_utf8_lossy(&stderr),
                "{source} {context}"
            );
        }
    }
    // The capture report: both paths agree on every wrapped container stream.
    let http = reqwest::blocking::Client::new();
    let token = api.token("workflows/wf", metadata_api::auth::Scope::Read);
    let report = |path: &str| -> Value {
        http.get(format!("{}/api/{path}/logs/capture-report", api.url))
            .bearer_auth(&token)
            .send()
            .unwrap()
            .json()
            .unwrap()
    };
    let step_report = report("workflows/wf/runs/7/steps/build");
    assert_eq!(step_report["agree"], true, "{step_report:#}");
    let names: Vec<&str> = step_report["streams"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert_eq!(
        names,
        ["step-build.stderr", "step-build.stdout"],
        "{step_report:#}"
    );
    let trigger_report = report("workflows/wf/triggers/sync-1");
    for stream in trigger_report["streams"].as_array().unwrap() {
        let name = stream["name"].as_str().unwrap();
        let want = if name.starts_with("queue-proxy.") {
            "ebpf_only"
        } else {
            "agree"
        };
        assert_eq!(stream["comparison"], want, "{name}: {trigger_report:#}");
    }
    // The consumer API serves each container's streams, from the entrypoint where it has them
    // and from the collector where only it does (queue-proxy).
    let logs = |path: &str| -> Vec<u8> {
        let response = http
            .get(format!("{}/api/{path}", api.url))
            .bearer_auth(&token)
            .send()
            .unwrap();
        assert!(
            response.status().is_success(),
            "{path}: {}",
            response.status()
        );
        response.bytes().unwrap().to_vec()
    };
    assert!(
        logs(&format!("{step_ctx}/logs?stream=step-build.stdout")) == expected("build").0,
        "step-build.stdout through the consumer API differs"
    );
    assert_eq!(
        logs(&format!(
            "{trigger_ctx}/logs?stream=queue-proxy.{trigger_uid}.stdout"
        )),
        b"proxy ready\n"
    );
    // queue-proxy is not wrapped: only the collector has it.
    let proxy = complete_stream(
        &api,
        trigger_ctx,
        &format!("queue-proxy.{trigger_uid}.stdout"),
        "ebpf",
    );
    assert_eq!(proxy, b"proxy ready\n");
    drop(collector);
}

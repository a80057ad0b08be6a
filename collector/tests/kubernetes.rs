//! Kubernetes mode on real parts: a kube-apiserver (Debian's 1.20.2 build) holds the pod, a CRI
//! pod sandbox on containerd + runc runs it under `/kubepods/burstable/pod<uid>` as a kubelet
//! would, and the collector, watching the kubepods cgroup tree, attributes the container to the
//! pod through its reflector and ships its output to the pod's log context.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{process::Command, time::Duration};

use common::*;
use serde_json::{Value, json};
use testbed::{
    cri::{ContainerSpec, Cri, PodSpec},
    kube::KubeApi,
};

fn checked(response: reqwest::blocking::Response) -> Value {
    let status = response.status();
    let body: Value = response.json().unwrap();
    assert!(status.is_success(), "{status}: {body}");
    body
}

#[test]
fn a_cri_container_is_attributed_to_its_pod_and_shipped_to_the_pods_context() {
    if !can_run() {
        return;
    }
    let Some(kube) = KubeApi::start_or_skip() else {
        return;
    };
    let Some(cri) = Cri::start_or_skip() else {
        return;
    };
    let api = Api::start(&[]);
    let http = kube.client().unwrap();
    let node = format!("node-{}", std::process::id());
    let ns = "tenant-a";
    checked(
        http.post(format!("{}/api/v1/namespaces", kube.url()))
            .json(&json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}))
            .send()
            .unwrap(),
    );
    // A Tekton TaskRun step pod, bound to our node.
    let pod: Value = checked(
        http.post(format!("{}/api/v1/namespaces/{ns}/pods", kube.url()))
            .json(&json!({
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": "build-pod",
                    "labels": {
                        "tekton.dev/taskRun": "build-run",
                        "relay.sh/workflow": "wf",
                        "relay.sh/run": "7",
                        "relay.sh/step": "build",
                    },
                },
                "spec": {
                    "nodeName": node,
                    "containers": [{"name": "step-build", "image": "busybox"}],
                },
            }))
            .send()
            .unwrap(),
    );
    let uid = pod["metadata"]["uid"].as_str().unwrap().to_owned();

    // The kubepods tree must exist before the collector watches it.
    let kubepods = cgroup2_root().unwrap().join("kubepods");
    std::fs::create_dir_all(&kubepods).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_collector"));
    cmd.env("KUBECONFIG", kube.kubeconfig_path()).args([
        "--kubernetes",
        "--node-name",
        &node,
        "--kubepods-cgroup",
        kubepods.to_str().unwrap(),
        "--attribution-hold",
        "20s",
    ]);
    let _collector = Collector::start_with(cmd, &api, &[], &[]);

    // Run the pod as a kubelet would: sandbox under the pod's cgroup, container created, its id
    // reported in the pod's status, then started.
    let mut spec = PodSpec::new("build-pod");
    spec.namespace = ns.to_owned();
    spec.cgroup_parent = format!("/kubepods/burstable/pod{uid}");
    spec.uid = uid;
    let sandbox = cri.run_pod(&spec).unwrap();
    let script = "echo step output; echo step error >&2; seq 1 2000";
    let container = sandbox
        .create_container(&ContainerSpec::new("step-build", ["sh", "-c", script]))
        .unwrap();
    checked(
        http.patch(format!(
            "{}/api/v1/namespaces/{ns}/pods/build-pod/status",
            kube.url()
        ))
        .header("Content-Type", "application/merge-patch+json")
        .json(&json!({"status": {"containerStatuses": [{
            "name": "step-build",
            "containerID": format!("containerd://{}", container.id()),
            "image": "busybox",
            "imageID": "",
            "ready": false,
            "restartCount": 0,
            "state": {"running": {}},
        }]}}))
        .send()
        .unwrap(),
    );
    container.start().unwrap();
    assert_eq!(container.wait(Duration::from_secs(30)).unwrap(), 0);
    let logs = container.logs().unwrap();

    let ctx = "workflows/wf/runs/7/steps/build";
    let (_, stdout) = complete_ebpf(&api, ctx, "step-build.stdout");
    let (_, stderr) = complete_ebpf(&api, ctx, "step-build.stderr");
    assert!(
        stdout == logs.stdout,
        "ebpf stdout differs from the CRI log"
    );
    assert_eq!(stderr, logs.stderr);
    assert_eq!(stderr, b"step error\n");
}

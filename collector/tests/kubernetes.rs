//! Kubernetes mode on real parts: a kube-apiserver (Debian's 1.20.2 build) holds the pods, CRI pod
//! sandboxes on containerd + runc run them under `/kubepods/burstable/pod<uid>` as a kubelet
//! would, and the collector, watching the kubepods cgroup tree, attributes each container to its
//! pod through its reflectors and ships its output to the pod's log context.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    fs::{File, OpenOptions},
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use common::*;
use serde_json::{Value, json};
use testbed::{
    cri::{self, Container, ContainerSpec, Cri, PodSpec},
    kube::KubeApi,
};

/// How long the collector gets to notice a change in the API server or a cgroup.
const NOTICE: Duration = Duration::from_secs(30);

fn checked(response: reqwest::blocking::Response) -> Value {
    let status = response.status();
    let body: Value = response.json().unwrap();
    assert!(status.is_success(), "{status}: {body}");
    body
}

/// The API server, seen by a test that plays the kubelet of node `node`.
struct Cluster {
    kube: KubeApi,
    http: reqwest::blocking::Client,
    node: String,
}

impl Cluster {
    fn new(kube: KubeApi) -> Self {
        Self {
            http: kube.client().unwrap(),
            node: format!("node-{}", std::process::id()),
            kube,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.kube.url())
    }

    fn create_namespace(&self, name: &str) {
        checked(
            self.http
                .post(self.url("/api/v1/namespaces"))
                .json(&json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}))
                .send()
                .unwrap(),
        );
    }

    /// Merges `labels` into the namespace's (a `null` value removes a label).
    fn label_namespace(&self, name: &str, labels: Value) {
        checked(
            self.http
                .patch(self.url(&format!("/api/v1/namespaces/{name}")))
                .header("Content-Type", "application/merge-patch+json")
                .json(&json!({"metadata": {"labels": labels}}))
                .send()
                .unwrap(),
        );
    }

    /// Creates a Tekton TaskRun step pod of workflow `wf` bound to our node, with one container
    /// `step-{step}`; returns its uid.
    fn create_step_pod(&self, ns: &str, name: &str, run: &str, step: &str) -> String {
        let pod = checked(
            self.http
                .post(self.url(&format!("/api/v1/namespaces/{ns}/pods")))
                .json(&json!({
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {
                        "name": name,
                        "labels": {
                            "tekton.dev/taskRun": format!("{name}-run"),
                            "relay.sh/workflow": "wf",
                            "relay.sh/run": run,
                            "relay.sh/step": step,
                        },
                    },
                    "spec": {
                        "nodeName": self.node,
                        "containers": [{"name": format!("step-{step}"), "image": "busybox"}],
                    },
                }))
                .send()
                .unwrap(),
        );
        pod["metadata"]["uid"].as_str().unwrap().to_owned()
    }

    /// Runs the sandbox of pod `name` under its pod cgroup, as a kubelet would.
    fn sandbox<'c>(&self, cri: &'c Cri, ns: &str, name: &str, uid: &str) -> cri::Pod<'c> {
        let mut spec = PodSpec::new(name);
        spec.namespace = ns.to_owned();
        spec.cgroup_parent = format!("/kubepods/burstable/pod{uid}");
        spec.uid = uid.to_owned();
        cri.run_pod(&spec).unwrap()
    }

    /// Creates the container, reports its id in the pod's status and starts it, as a kubelet
    /// would.
    fn start<'p>(
        &self,
        ns: &str,
        sandbox: &'p cri::Pod<'_>,
        spec: &ContainerSpec,
    ) -> Container<'p> {
        let container = sandbox.create_container(spec).unwrap();
        let pod = &sandbox.spec().name;
        checked(
            self.http
                .patch(self.url(&format!("/api/v1/namespaces/{ns}/pods/{pod}/status")))
                .header("Content-Type", "application/merge-patch+json")
                .json(&json!({"status": {"containerStatuses": [{
                    "name": spec.name,
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
        container
    }
}

/// The kubepods cgroup tree the collector watches; it must exist before the collector starts.
fn kubepods() -> PathBuf {
    let kubepods = cgroup2_root().unwrap().join("kubepods");
    std::fs::create_dir_all(&kubepods).unwrap();
    kubepods
}

/// The collector in Kubernetes mode for `cluster`'s node, with `extra` flags.
fn collector_command(cluster: &Cluster, extra: &[&str]) -> Command {
    let kubepods = kubepods();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_collector"));
    cmd.env("KUBECONFIG", cluster.kube.kubeconfig_path())
        .args([
            "--kubernetes",
            "--node-name",
            &cluster.node,
            "--kubepods-cgroup",
            kubepods.to_str().unwrap(),
        ])
        .args(extra);
    cmd
}

/// A FIFO at `path`: a container blocks reading it until the test opens it with [`release`].
fn fifo(path: &Path) {
    rustix::fs::mknodat(
        rustix::fs::CWD,
        path,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o666),
        0,
    )
    .unwrap();
}

/// Lets the container blocked on the FIFO at `path` go on: writes a line once it reads.
fn release(path: &Path) {
    let mut writer: Option<File> = None;
    // Non-blocking: opening a FIFO for writing fails (ENXIO) until it has a reader.
    wait_for(NOTICE, "the container to open its FIFO", || {
        writer = OpenOptions::new()
            .write(true)
            .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
            .open(path)
            .ok();
        writer.is_some()
    });
    writer.unwrap().write_all(b"go\n").unwrap();
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
    let cluster = Cluster::new(kube);
    let ns = "tenant-a";
    cluster.create_namespace(ns);
    let uid = cluster.create_step_pod(ns, "build-pod", "7", "build");
    let cmd = collector_command(&cluster, &["--attribution-hold", "20s"]);
    let _collector = Collector::start_with(cmd, &api, &[], &[]);

    let sandbox = cluster.sandbox(&cri, ns, "build-pod", &uid);
    let script = "echo step output; echo step error >&2; seq 1 2000";
    let container = cluster.start(
        ns,
        &sandbox,
        &ContainerSpec::new("step-build", ["sh", "-c", script]),
    );
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

/// `--namespace-selector relay.sh/tenant=true`, the label the operator puts on tenant namespaces:
/// nothing of a pod in an unlabelled namespace is captured; once the namespace is labelled, a new
/// pod's output is, and so is the output a pod passed over so far writes from then on; once the
/// label is gone, a new pod's output is not captured again.
#[test]
fn pods_are_captured_while_their_namespace_is_labelled() {
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
    let cluster = Cluster::new(kube);
    let ns = "tenant-b";
    cluster.create_namespace(ns);
    let mut cmd = collector_command(&cluster, &["--namespace-selector", "relay.sh/tenant=true"]);
    // Passing over a container of an unselected namespace is logged at debug level.
    cmd.env("RUST_LOG", "info,collector::attribution::kubernetes=debug");
    let collector = Collector::start_logged(cmd, &api, &[]);
    let triggers = tempfile::tempdir().unwrap();
    let (early_trigger, late_trigger) =
        (triggers.path().join("early"), triggers.path().join("late"));
    fifo(&early_trigger);
    fifo(&late_trigger);

    // Before the label: the collector drops the pod's output and has the kernel pass the container
    // over.
    let uid = cluster.create_step_pod(ns, "early", "1", "wait");
    let early_sandbox = cluster.sandbox(&cri, ns, "early", &uid);
    let early = cluster.start(
        ns,
        &early_sandbox,
        &ContainerSpec::new(
            "step-wait",
            [
                "sh",
                "-c",
                "echo before; read x < /triggers/early; echo after",
            ],
        )
        .bind(triggers.path(), "/triggers", true),
    );
    let early_cgroup = early.cgroup_id().unwrap().to_string();
    collector.wait_for_log(NOTICE, &["Namespace not selected", &early_cgroup]);

    // The operator labels the namespace: a new pod's output is captured.
    cluster.label_namespace(ns, json!({"relay.sh/tenant": "true"}));
    collector.wait_for_log(NOTICE, &["Namespace selected", ns]);
    let uid = cluster.create_step_pod(ns, "new", "2", "build");
    let new_sandbox = cluster.sandbox(&cri, ns, "new", &uid);
    let new = cluster.start(
        ns,
        &new_sandbox,
        &ContainerSpec::new("step-build", ["sh", "-c", "echo new pod; echo oops >&2"]),
    );
    assert_eq!(new.wait(NOTICE).unwrap(), 0);
    let logs = new.logs().unwrap();
    let ctx = "workflows/wf/runs/2/steps/build";
    let (_, stdout) = complete_ebpf(&api, ctx, "step-build.stdout");
    let (_, stderr) = complete_ebpf(&api, ctx, "step-build.stderr");
    assert_eq!(
        (stdout.as_slice(), stderr.as_slice()),
        (&b"new pod\n"[..], &b"oops\n"[..])
    );
    assert_eq!((stdout, stderr), (logs.stdout, logs.stderr));

    // So is what the pod passed over writes from now on: a stream of its own from offset 0,
    // without what it wrote before the label.
    release(&early_trigger);
    assert_eq!(early.wait(NOTICE).unwrap(), 0);
    assert_eq!(early.logs().unwrap().stdout, b"before\nafter\n");
    let (status, stdout) =
        complete_ebpf(&api, "workflows/wf/runs/1/steps/wait", "step-wait.stdout");
    assert_eq!(stdout, b"after\n", "{status}");
    assert_eq!(spans(&status, "dropped"), [], "{status}");

    // The label removed: a new pod's output is not captured.
    cluster.label_namespace(ns, json!({"relay.sh/tenant": null}));
    collector.wait_for_log(NOTICE, &["Namespace no longer selected", ns]);
    let uid = cluster.create_step_pod(ns, "late", "3", "late");
    let late_sandbox = cluster.sandbox(&cri, ns, "late", &uid);
    let late = cluster.start(
        ns,
        &late_sandbox,
        &ContainerSpec::new(
            "step-late",
            ["sh", "-c", "echo unlabelled; read x < /triggers/late"],
        )
        .bind(triggers.path(), "/triggers", true),
    );
    let late_cgroup = late.cgroup_id().unwrap().to_string();
    collector.wait_for_log(NOTICE, &["Namespace not selected", &late_cgroup]);
    let (status, stdout) = api.read_ebpf("workflows/wf/runs/3/steps/late", "step-late.stdout");
    assert_eq!(
        (status["length"].as_u64(), stdout.len()),
        (Some(0), 0),
        "{status}"
    );
    release(&late_trigger);
    assert_eq!(late.wait(NOTICE).unwrap(), 0);
}

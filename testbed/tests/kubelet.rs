//! The real kubelet and scheduler 1.20.2 of [`testbed::node`] on a real API server and
//! controller manager, with a real containerd: a scheduled pod runs its init container and two
//! containers with volumes (a PersistentVolume bound by the controller manager, emptyDir,
//! projected token), downward-API environment and `$(VAR)`s, and ends `Succeeded` with containerd
//! ids and exit codes in its status and its logs served through the API server; the token passes
//! the API server's TokenReview bound to the pod; a pod no node fits stays unscheduled; the Job
//! controller's Jobs run to `Complete`/`Failed` (the tools Job installs the static entrypoint into
//! its claim); a deleted running pod's processes are stopped; the node's pod cgroups are where
//! the collector looks. A machine without the test bed skips these (fails them under
//! `RELAY_REQUIRE_TESTBED=1`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use testbed::{
    cri::{BUSYBOX_IMAGE, Cri},
    images::{ImageBuild, tools_image},
    kube::{KubeApi, KubeOptions, Rest},
    node::{NODE_NAME, Node, NodeOptions},
};

/// Deadline for a pod or Job to get where it should; generous: CI shares two CPUs, and the
/// kubelet removes a deleted pod's containers in its container GC, which runs once a minute.
const WAIT: Duration = Duration::from_secs(150);

/// The StorageClass of the volumes made in advance (no provisioner, as in
/// `deploy/overlays/kind/tools-storage.yaml`).
const CLASS: &str = "relay-test";

fn phase(pod: &Value) -> &str {
    pod["status"]["phase"].as_str().unwrap_or_default()
}

/// The ids of the containers containerd has in the CRI namespace.
fn containerd_containers(cri: &Cri) -> Vec<String> {
    let out = cri.ctr().args(["containers", "ls", "-q"]).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The ids of the containers whose task (process) runs.
fn running_tasks(cri: &Cri) -> Vec<String> {
    let out = cri.ctr().args(["tasks", "ls"]).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .skip(1)
        .filter(|line| line.split_whitespace().nth(2) == Some("RUNNING"))
        .filter_map(|line| line.split_whitespace().next().map(str::to_owned))
        .collect()
}

/// The container id (without `containerd://`) in a container status, checking its form.
fn container_id(status: &Value) -> String {
    let id = status["containerID"].as_str().unwrap_or_default();
    let id = id
        .strip_prefix("containerd://")
        .unwrap_or_else(|| panic!("no containerd id in {status}"));
    assert_eq!(id.len(), 64, "{id}");
    id.to_owned()
}

fn wait_until(what: &str, mut done: impl FnMut() -> Option<Value>) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(value) = done() {
            return value;
        }
        assert!(Instant::now() < deadline, "{what} not within {WAIT:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until ServiceAccount `account` of `namespace` has its token Secret: the ServiceAccount
/// admission plugin refuses pods that would mount it before.
fn wait_account_token(rest: &Rest, namespace: &str, account: &str) {
    wait_until(&format!("a token for {namespace}/{account}"), || {
        let sa = rest
            .get(&format!(
                "/api/v1/namespaces/{namespace}/serviceaccounts/{account}"
            ))
            .unwrap()?;
        sa["secrets"]
            .as_array()
            .is_some_and(|s| !s.is_empty())
            .then_some(sa)
    });
}

/// A claim of [`CLASS`] that binds the volume made for it.
fn claim(rest: &Rest, namespace: &str, name: &str, mode: &str) {
    rest.post(
        &format!("/api/v1/namespaces/{namespace}/persistentvolumeclaims"),
        &json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name},
            "spec": {"storageClassName": CLASS, "accessModes": [mode],
                "resources": {"requests": {"storage": "16Mi"}}}}),
    )
    .unwrap();
}

fn start() -> Option<(KubeApi, Node)> {
    // The controller manager: Jobs, PersistentVolume binding, ServiceAccount tokens.
    let kube = KubeApi::start_or_skip_with(&KubeOptions::new().controller_manager(true))?;
    let node = Node::start_or_skip(&kube, &NodeOptions::new())?;
    Some((kube, node))
}

#[test]
fn a_scheduled_pod_runs_init_then_containers_with_volumes_token_and_downward_env() {
    let started = Instant::now();
    let Some((kube, node)) = start() else {
        return;
    };
    let node_took = started.elapsed();
    let extra = "localhost/kubelet-test/extra:1";
    ImageBuild::busybox(extra)
        .file("/etc/greeting", b"hello from the image\n".to_vec(), 0o644)
        .import(node.cri())
        .unwrap();
    let ns = "kubelet-test";
    let rest = kube.rest().unwrap();
    let ready = rest
        .get(&format!("/api/v1/nodes/{NODE_NAME}"))
        .unwrap()
        .unwrap();
    let conditions = ready["status"]["conditions"].as_array().unwrap();
    assert!(
        conditions
            .iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True"),
        "{conditions:?}"
    );
    assert!(
        ready["status"]["addresses"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["type"] == "InternalIP" && a["address"] == NODE_NAME),
        "{}",
        ready["status"]
    );
    rest.post(
        "/api/v1/namespaces",
        &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
    )
    .unwrap();
    rest.post(
        &format!("/api/v1/namespaces/{ns}/serviceaccounts"),
        &json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "runner"}}),
    )
    .unwrap();
    wait_account_token(&rest, ns, "runner");
    let data = node
        .persistent_volume("kubelet-test-data", CLASS, &["ReadWriteOnce"])
        .unwrap();
    fs::write(data.join("before"), "prefilled\n").unwrap();
    claim(&rest, ns, "data", "ReadWriteOnce");

    let mount = |name: &str, path: &str| json!({"name": name, "mountPath": path});
    let pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "app", "namespace": ns},
        "spec": {
            "serviceAccountName": "runner",
            "restartPolicy": "Never",
            "volumes": [
                {"name": "data", "persistentVolumeClaim": {"claimName": "data"}},
                {"name": "scratch", "emptyDir": {}},
                {"name": "token", "projected": {"sources": [{"serviceAccountToken": {
                    "audience": "relay-test", "expirationSeconds": 600, "path": "token",
                }}]}},
            ],
            "initContainers": [{
                "name": "init", "image": BUSYBOX_IMAGE, "imagePullPolicy": "Never",
                "command": ["sh", "-c", "echo from-init > /scratch/hello; echo init ran"],
                "volumeMounts": [mount("scratch", "/scratch")],
            }],
            "containers": [
                {
                    "name": "main", "image": BUSYBOX_IMAGE, "imagePullPolicy": "Never",
                    "workingDir": "/data",
                    "command": ["sh", "-c"],
                    "args": ["cat /scratch/hello before; echo \"$(GREETING) $POD_NS $POD_UID $NODE\"; \
                              pwd; cp /var/run/relay/token token; echo '$$(POD_NAME) $(UNDEFINED)'"],
                    "env": [
                        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                        {"name": "POD_NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                        {"name": "POD_UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}},
                        {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                        {"name": "GREETING", "value": "hi $(POD_NAME)"},
                    ],
                    "volumeMounts": [
                        mount("data", "/data"), mount("scratch", "/scratch"),
                        mount("token", "/var/run/relay"),
                    ],
                },
                {
                    "name": "side", "image": extra, "imagePullPolicy": "Never",
                    "command": ["sh", "-c",
                        "cat /etc/greeting; touch /data/x 2>/dev/null && echo writable || echo read-only"],
                    "volumeMounts": [{"name": "data", "mountPath": "/data", "readOnly": true}],
                },
            ],
        },
    });
    let created = Instant::now();
    rest.post(&format!("/api/v1/namespaces/{ns}/pods"), &pod)
        .unwrap();
    let pod = node.wait_pod_ended(ns, "app", WAIT).unwrap();
    let ran = created.elapsed();
    assert_eq!(phase(&pod), "Succeeded", "{}", pod["status"]);
    assert_eq!(pod["spec"]["nodeName"], NODE_NAME, "bound by the scheduler");
    let uid = pod["metadata"]["uid"].as_str().unwrap();

    // The scheduler decides: a pod no node fits stays unscheduled, and says why.
    rest.post(
        "/api/v1/namespaces/default/pods",
        &json!({
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "nowhere"},
            "spec": {"restartPolicy": "Never", "nodeSelector": {"relay.test/no-such-node": "yes"},
                "containers": [{"name": "c", "image": BUSYBOX_IMAGE,
                    "imagePullPolicy": "Never", "command": ["true"]}]},
        }),
    )
    .unwrap();
    let nowhere = node
        .wait_pod("default", "nowhere", WAIT, |p| {
            p["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "PodScheduled" && c["reason"] == "Unschedulable")
        })
        .unwrap();
    assert!(nowhere["spec"]["nodeName"].is_null(), "{nowhere}");
    assert_eq!(phase(&nowhere), "Pending");

    let init = &pod["status"]["initContainerStatuses"][0];
    assert_eq!(init["name"], "init");
    assert_eq!(init["state"]["terminated"]["exitCode"], 0);
    let mut ids = vec![container_id(init)];
    let statuses = pod["status"]["containerStatuses"].as_array().unwrap();
    assert_eq!(statuses.len(), 2);
    for status in statuses {
        assert_eq!(status["state"]["terminated"]["exitCode"], 0, "{status}");
        ids.push(container_id(status));
    }
    let known = containerd_containers(node.cri());
    for id in &ids {
        assert!(known.contains(id), "{id} not in containerd: {known:?}");
    }

    // The kubelet's CRI log files, stdout and stderr apart ...
    assert_eq!(
        node.logs(ns, "app", "init").unwrap().stdout_text(),
        "init ran\n"
    );
    let main_out = format!(
        "from-init\nprefilled\nhi app {ns} {uid} {NODE_NAME}\n/data\n$(POD_NAME) $(UNDEFINED)\n"
    );
    assert_eq!(
        node.logs(ns, "app", "main").unwrap().stdout_text(),
        main_out
    );
    assert_eq!(
        node.logs(ns, "app", "side").unwrap().stdout_text(),
        "hello from the image\nread-only\n"
    );
    // ... and the same through the API server, which asks the kubelet (`kubectl logs`).
    assert_eq!(node.api_logs(ns, "app", "main").unwrap(), main_out);
    assert!(!data.join("x").exists());

    // The token the main container copied into the claim: the API server's TokenReview accepts
    // it for the audience, as the service account, bound to this pod.
    let token = fs::read_to_string(data.join("token")).unwrap();
    let review = rest
        .post(
            "/apis/authentication.k8s.io/v1/tokenreviews",
            &json!({
                "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                "spec": {"token": token, "audiences": ["relay-test"]},
            }),
        )
        .unwrap();
    let status = &review["status"];
    assert_eq!(status["authenticated"], true, "{review}");
    assert_eq!(
        status["user"]["username"],
        format!("system:serviceaccount:{ns}:runner")
    );
    assert_eq!(
        status["user"]["extra"]["authentication.kubernetes.io/pod-name"],
        json!(["app"])
    );
    assert_eq!(
        status["user"]["extra"]["authentication.kubernetes.io/pod-uid"],
        json!([uid])
    );
    let other_audience = rest
        .post(
            "/apis/authentication.k8s.io/v1/tokenreviews",
            &json!({
                "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                "spec": {"token": token, "audiences": ["someone-else"]},
            }),
        )
        .unwrap();
    assert_ne!(other_audience["status"]["authenticated"], true);

    // A Job (the controller manager's Job controller makes its pod) writes into the claim.
    rest.post(
        &format!("/apis/batch/v1/namespaces/{ns}/jobs"),
        &json!({
            "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "fill"},
            "spec": {"template": {"spec": {
                "restartPolicy": "Never",
                "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}],
                "containers": [{"name": "fill", "image": BUSYBOX_IMAGE, "imagePullPolicy": "Never",
                    "command": ["sh", "-c", "echo filled > /data/by-job"],
                    "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
            }}},
        }),
    )
    .unwrap();
    let job = node.wait_job(ns, "fill", WAIT).unwrap();
    assert_eq!(job["status"]["conditions"][0]["type"], "Complete", "{job}");
    assert_eq!(job["status"]["succeeded"], 1);
    assert_eq!(fs::read_to_string(data.join("by-job")).unwrap(), "filled\n");

    // Deleting the finished pod: the object goes, then the kubelet removes its containers (its
    // container GC, within a minute).
    let client = kube.client().unwrap();
    let response = client
        .delete(format!("{}/api/v1/namespaces/{ns}/pods/app", kube.url()))
        .send()
        .unwrap();
    assert!(response.status().is_success(), "{response:?}");
    let deleted = Instant::now();
    wait_until("pod app gone", || {
        rest.get(&format!("/api/v1/namespaces/{ns}/pods/app"))
            .unwrap()
            .is_none()
            .then_some(Value::Null)
    });
    let gone_took = deleted.elapsed();
    wait_until("the pod's containers removed", || {
        let known = containerd_containers(node.cri());
        (!ids.iter().any(|id| known.contains(id))).then_some(Value::Null)
    });
    eprintln!(
        "node Ready {node_took:?} after start; pod created to Succeeded {ran:?}; deleted pod \
         gone {gone_took:?}, its containers removed {:?}",
        deleted.elapsed()
    );
}

#[test]
fn jobs_complete_or_fail_and_a_deleted_running_pod_is_stopped() {
    let Some((kube, node)) = start() else {
        return;
    };
    let Some(tools) = tools_image(node.cri()).unwrap() else {
        return;
    };
    let rest = kube.rest().unwrap();
    let ns = "default";
    let tools_dir = node
        .persistent_volume("kubelet-test-tools", CLASS, &["ReadOnlyMany"])
        .unwrap();
    claim(&rest, ns, "tools", "ReadOnlyMany");
    let job = |name: &str, image: &str, command: &[&str]| {
        json!({
            "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
            "spec": {"backoffLimit": 0, "template": {"spec": {
                "restartPolicy": "Never",
                "volumes": [{"name": "tools", "persistentVolumeClaim": {"claimName": "tools"}}],
                "containers": [{"name": "job", "image": image, "imagePullPolicy": "Never",
                    "command": command,
                    "volumeMounts": [{"name": "tools", "mountPath": "/relay/lib"}]}],
            }}},
        })
    };
    let job_pod = |name: &str| -> Value {
        let pods = rest
            .get(&format!(
                "/api/v1/namespaces/{ns}/pods?labelSelector=job-name%3D{name}"
            ))
            .unwrap()
            .unwrap();
        let items = pods["items"].as_array().unwrap();
        assert_eq!(items.len(), 1, "{pods}");
        items[0].clone()
    };

    // The operator's tools Job: the static entrypoint installs itself into the tools claim.
    rest.post(
        &format!("/apis/batch/v1/namespaces/{ns}/jobs"),
        &job("tools", tools, &["/entrypoint", "install", "/relay/lib"]),
    )
    .unwrap();
    let started = Instant::now();
    let done = node.wait_job(ns, "tools", WAIT).unwrap();
    let tools_took = started.elapsed();
    let pod = job_pod("tools");
    let pod_name = pod["metadata"]["name"].as_str().unwrap();
    let status = done["status"].clone();
    assert_eq!(
        status["conditions"][0]["type"],
        "Complete",
        "{status}: {:?}",
        node.logs(ns, pod_name, "job")
    );
    assert_eq!(status["succeeded"], 1, "{status}");
    assert_eq!(status["conditions"][0]["status"], "True");
    assert!(status["completionTime"].is_string());
    assert!(status["active"].is_null());
    let installed = tools_dir.join("entrypoint");
    let expected = fs::read(testbed::api::static_entrypoint().unwrap()).unwrap();
    assert!(
        fs::read(&installed).unwrap() == expected,
        "installed bytes differ"
    );
    assert_eq!(
        fs::metadata(&installed).unwrap().permissions().mode() & 0o7777,
        0o555
    );
    assert_eq!(phase(&pod), "Succeeded");
    assert_eq!(pod["metadata"]["ownerReferences"][0]["kind"], "Job");
    assert_eq!(pod["metadata"]["labels"]["job-name"], "tools");

    // A failing Job: the exit code is in the pod's status, the Job is Failed.
    rest.post(
        &format!("/apis/batch/v1/namespaces/{ns}/jobs"),
        &job(
            "broken",
            BUSYBOX_IMAGE,
            &["sh", "-c", "echo failing >&2; exit 7"],
        ),
    )
    .unwrap();
    let done = node.wait_job(ns, "broken", WAIT).unwrap();
    let pod = job_pod("broken");
    let pod_name = pod["metadata"]["name"].as_str().unwrap();
    assert_eq!(phase(&pod), "Failed");
    assert_eq!(
        pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"],
        7
    );
    assert_eq!(
        node.logs(ns, pod_name, "job").unwrap().stderr_text(),
        "failing\n"
    );
    let status = &done["status"];
    assert_eq!(status["failed"], 1, "{status}");
    assert_eq!(status["conditions"][0]["type"], "Failed");

    // A running pod, deleted: its processes stop, then the pod object goes.
    rest.post(
        &format!("/api/v1/namespaces/{ns}/pods"),
        &json!({
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "sleeper"},
            "spec": {"containers": [
                {"name": "sleep", "image": BUSYBOX_IMAGE, "imagePullPolicy": "Never",
                 "command": ["sleep", "3600"]},
            ]},
        }),
    )
    .unwrap();
    let started = Instant::now();
    let pod = node
        .wait_pod(ns, "sleeper", WAIT, |p| {
            p["status"]["containerStatuses"][0]["state"]["running"].is_object()
        })
        .unwrap();
    let id_took = started.elapsed();
    assert_eq!(phase(&pod), "Running");
    assert_eq!(pod["status"]["qosClass"], "BestEffort");
    let id = container_id(&pod["status"]["containerStatuses"][0]);
    assert!(running_tasks(node.cri()).contains(&id));
    // Where the collector looks: the container's cgroup v2 directory under the pod's, in the
    // node's cgroup root, by QoS class (collector/src/attribution/kubernetes/cgroup_path.rs maps this shape).
    let uid = pod["metadata"]["uid"].as_str().unwrap();
    let cgroup = node
        .cgroup_v2_root()
        .unwrap()
        .join(format!("kubepods/besteffort/pod{uid}/{id}"));
    let procs = fs::read_to_string(cgroup.join("cgroup.procs"))
        .unwrap_or_else(|e| panic!("{}: {e}", cgroup.display()));
    assert!(!procs.trim().is_empty(), "{}", cgroup.display());
    let client = kube.client().unwrap();
    let response = client
        .delete(format!(
            "{}/api/v1/namespaces/{ns}/pods/sleeper",
            kube.url()
        ))
        .json(&json!({"gracePeriodSeconds": 1}))
        .send()
        .unwrap();
    assert!(response.status().is_success(), "{response:?}");
    let started = Instant::now();
    wait_until("pod sleeper gone", || {
        rest.get(&format!("/api/v1/namespaces/{ns}/pods/sleeper"))
            .unwrap()
            .is_none()
            .then_some(Value::Null)
    });
    let delete_took = started.elapsed();
    // The kubelet confirms the deletion only once the containers stopped.
    assert!(!running_tasks(node.cri()).contains(&id));
    let procs = fs::read_to_string(cgroup.join("cgroup.procs")).unwrap_or_default();
    assert!(procs.trim().is_empty(), "{procs}");
    eprintln!(
        "tools Job {tools_took:?}; container running {id_took:?} after create; \
         deleted pod gone {delete_took:?}"
    );
}

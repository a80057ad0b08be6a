//! The test bed's kubelet on a real API server 1.20.2 and a real containerd through CRI: a pod
//! bound by it runs its init container and two containers with volumes (claim, emptyDir,
//! projected token), downward-API environment and `$(VAR)`s, and ends `Succeeded` with
//! containerd ids and exit codes in its status; the token passes the API server's TokenReview
//! bound to the pod; Jobs run to `Complete`/`Failed` (the tools Job installs the static
//! entrypoint into its claim); a deleted running pod's containers are gone. A machine without the
//! test bed skips these (fails them under `RELAY_REQUIRE_TESTBED=1`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use testbed::{
    cri::{BUSYBOX_IMAGE, Cri},
    images::{ImageBuild, tools_image},
    kube::{KubeApi, KubeOptions},
    kubelet::{Kubelet, KubeletOptions},
};

/// Deadline for a pod or Job to get where it should; generous: CI shares two CPUs.
const WAIT: Duration = Duration::from_secs(120);

const NODE: &str = "node-1";

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

#[test]
fn a_bound_pod_runs_init_then_containers_with_volumes_token_and_downward_env() {
    let Some(kube) = KubeApi::start_or_skip() else {
        return;
    };
    let Some(cri) = Cri::start_or_skip() else {
        return;
    };
    let cri = Arc::new(cri);
    let extra = "localhost/kubelet-test/extra:1";
    ImageBuild::busybox(extra)
        .file("/etc/greeting", b"hello from the image\n".to_vec(), 0o644)
        .import(&cri)
        .unwrap();
    let ns = "kubelet-test";
    let rest = kube.rest().unwrap();
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
    let started = Instant::now();
    let kubelet = Kubelet::start(
        &kube,
        Arc::clone(&cri),
        NODE,
        KubeletOptions::new()
            .schedule_namespace(ns)
            .schedule_label("relay.test/kubelet", "yes")
            .run_jobs(true)
            .image("busybox", BUSYBOX_IMAGE)
            .image("example.org/extra:1", extra),
    )
    .unwrap();
    let node = rest.get(&format!("/api/v1/nodes/{NODE}")).unwrap().unwrap();
    assert_eq!(node["status"]["conditions"][0]["type"], "Ready");
    assert_eq!(node["status"]["conditions"][0]["status"], "True");
    fs::create_dir_all(kubelet.pvc_dir(ns, "data")).unwrap();
    fs::write(kubelet.pvc_dir(ns, "data").join("before"), "prefilled\n").unwrap();

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
                "name": "init", "image": "busybox",
                "command": ["sh", "-c", "echo from-init > /scratch/hello; echo init ran"],
                "volumeMounts": [mount("scratch", "/scratch")],
            }],
            "containers": [
                {
                    "name": "main", "image": "busybox", "workingDir": "/data",
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
                    "name": "side", "image": "example.org/extra:1",
                    "command": ["sh", "-c",
                        "cat /etc/greeting; touch /data/x 2>/dev/null && echo writable || echo read-only"],
                    "volumeMounts": [{"name": "data", "mountPath": "/data", "readOnly": true}],
                },
            ],
        },
    });
    rest.post(&format!("/api/v1/namespaces/{ns}/pods"), &pod)
        .unwrap();
    let pod = kubelet
        .wait_pod(ns, "app", WAIT, |p| {
            matches!(phase(p), "Succeeded" | "Failed")
        })
        .unwrap();
    let ran = started.elapsed();
    assert_eq!(phase(&pod), "Succeeded", "{}", pod["status"]);

    // Elsewhere, only pods with the label are bound: one created before a labelled one is
    // still unbound when the labelled one has run.
    let plain = |name: &str, labels: Value| {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": labels},
            "spec": {"restartPolicy": "Never", "containers": [
                {"name": "c", "image": "busybox", "command": ["true"]},
            ]},
        })
    };
    rest.post(
        "/api/v1/namespaces/default/pods",
        &plain("unlabelled", json!({})),
    )
    .unwrap();
    rest.post(
        "/api/v1/namespaces/default/pods",
        &plain("labelled", json!({"relay.test/kubelet": "yes"})),
    )
    .unwrap();
    kubelet
        .wait_pod("default", "labelled", WAIT, |p| phase(p) == "Succeeded")
        .unwrap();
    let unlabelled = rest
        .get("/api/v1/namespaces/default/pods/unlabelled")
        .unwrap()
        .unwrap();
    assert!(unlabelled["spec"]["nodeName"].is_null(), "{unlabelled}");
    assert_eq!(phase(&unlabelled), "Pending");
    assert_eq!(pod["spec"]["nodeName"], NODE, "bound by the kubelet");
    let uid = pod["metadata"]["uid"].as_str().unwrap();

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
    let known = containerd_containers(&cri);
    for id in &ids {
        assert!(known.contains(id), "{id} not in containerd: {known:?}");
    }

    assert_eq!(
        kubelet.logs(ns, "app", "init").unwrap().stdout_text(),
        "init ran\n"
    );
    assert_eq!(
        kubelet.logs(ns, "app", "main").unwrap().stdout_text(),
        format!(
            "from-init\nprefilled\nhi app {ns} {uid} {NODE}\n/data\n$(POD_NAME) $(UNDEFINED)\n"
        )
    );
    assert_eq!(
        kubelet.logs(ns, "app", "side").unwrap().stdout_text(),
        "hello from the image\nread-only\n"
    );
    assert!(!kubelet.pvc_dir(ns, "data").join("x").exists());

    // The token the main container copied into the claim: the API server's TokenReview accepts
    // it for the audience, as the service account, bound to this pod.
    let token = fs::read_to_string(kubelet.pvc_dir(ns, "data").join("token")).unwrap();
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

    // A Job in the scheduled namespace runs by itself (`run_jobs`) and writes into the claim.
    rest.post(
        &format!("/apis/batch/v1/namespaces/{ns}/jobs"),
        &json!({
            "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "fill"},
            "spec": {"template": {"spec": {
                "restartPolicy": "Never",
                "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}],
                "containers": [{"name": "fill", "image": "busybox",
                    "command": ["sh", "-c", "echo filled > /data/by-job"],
                    "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
            }}},
        }),
    )
    .unwrap();
    let job = wait_until("Job fill complete", || {
        let job = rest
            .get(&format!("/apis/batch/v1/namespaces/{ns}/jobs/fill"))
            .unwrap()?;
        (job["status"]["conditions"][0]["type"] == "Complete").then_some(job)
    });
    assert_eq!(job["status"]["succeeded"], 1);
    assert_eq!(
        fs::read_to_string(kubelet.pvc_dir(ns, "data").join("by-job")).unwrap(),
        "filled\n"
    );

    // Deleting the finished pod removes its containers.
    let client = kube.client().unwrap();
    let response = client
        .delete(format!("{}/api/v1/namespaces/{ns}/pods/app", kube.url()))
        .send()
        .unwrap();
    assert!(response.status().is_success(), "{response:?}");
    wait_until("pod app gone", || {
        rest.get(&format!("/api/v1/namespaces/{ns}/pods/app"))
            .unwrap()
            .is_none()
            .then_some(Value::Null)
    });
    // A finished pod is deleted at once (no grace), so the kubelet cleans up after the object
    // is gone, as a real one does.
    wait_until("the pod's containers removed", || {
        let known = containerd_containers(&cri);
        (!ids.iter().any(|id| known.contains(id))).then_some(Value::Null)
    });
    assert!(kubelet.errors().is_empty(), "{:?}", kubelet.errors());
    eprintln!("kubelet up to pod Succeeded: {ran:?}");
}

#[test]
fn jobs_complete_or_fail_and_a_deleted_running_pod_is_stopped() {
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
    let kubelet = Kubelet::start(
        &kube,
        Arc::clone(&cri),
        NODE,
        KubeletOptions::new().image("busybox", BUSYBOX_IMAGE),
    )
    .unwrap();
    let rest = kube.rest().unwrap();
    let ns = "default";
    let job = |name: &str, image: &str, command: &[&str]| {
        json!({
            "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
            "spec": {"backoffLimit": 0, "template": {"spec": {
                "restartPolicy": "Never",
                "volumes": [{"name": "tools", "persistentVolumeClaim": {"claimName": "tools"}}],
                "containers": [{"name": "job", "image": image, "command": command,
                    "volumeMounts": [{"name": "tools", "mountPath": "/relay/lib"}]}],
            }}},
        })
    };

    // The operator's tools Job: the static entrypoint installs itself into the tools claim.
    rest.post(
        &format!("/apis/batch/v1/namespaces/{ns}/jobs"),
        &job("tools", tools, &["/entrypoint", "install", "/relay/lib"]),
    )
    .unwrap();
    let started = Instant::now();
    let outcome = kubelet.run_job(ns, "tools", WAIT).unwrap();
    let tools_took = started.elapsed();
    assert!(
        outcome.succeeded,
        "{:?}",
        kubelet.logs(ns, &outcome.pod, "job")
    );
    let status = rest
        .get(&format!("/apis/batch/v1/namespaces/{ns}/jobs/tools"))
        .unwrap()
        .unwrap()["status"]
        .clone();
    assert_eq!(status["succeeded"], 1, "{status}");
    assert_eq!(status["conditions"][0]["type"], "Complete");
    assert_eq!(status["conditions"][0]["status"], "True");
    assert!(status["completionTime"].is_string());
    assert!(status["active"].is_null());
    let installed = kubelet.pvc_dir(ns, "tools").join("entrypoint");
    let expected = fs::read(testbed::api::static_entrypoint().unwrap()).unwrap();
    assert!(
        fs::read(&installed).unwrap() == expected,
        "installed bytes differ"
    );
    assert_eq!(
        fs::metadata(&installed).unwrap().permissions().mode() & 0o7777,
        0o555
    );
    let pod = rest
        .get(&format!("/api/v1/namespaces/{ns}/pods/{}", outcome.pod))
        .unwrap()
        .unwrap();
    assert_eq!(pod["metadata"]["ownerReferences"][0]["kind"], "Job");
    assert_eq!(pod["metadata"]["labels"]["job-name"], "tools");

    // A failing Job: the exit code is in the pod's status, the Job is Failed.
    rest.post(
        &format!("/apis/batch/v1/namespaces/{ns}/jobs"),
        &job(
            "broken",
            "busybox",
            &["sh", "-c", "echo failing >&2; exit 7"],
        ),
    )
    .unwrap();
    let outcome = kubelet.run_job(ns, "broken", WAIT).unwrap();
    assert!(!outcome.succeeded);
    let pod = rest
        .get(&format!("/api/v1/namespaces/{ns}/pods/{}", outcome.pod))
        .unwrap()
        .unwrap();
    assert_eq!(phase(&pod), "Failed");
    assert_eq!(
        pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"],
        7
    );
    assert_eq!(
        kubelet.logs(ns, &outcome.pod, "job").unwrap().stderr_text(),
        "failing\n"
    );
    let status = rest
        .get(&format!("/apis/batch/v1/namespaces/{ns}/jobs/broken"))
        .unwrap()
        .unwrap()["status"]
        .clone();
    assert_eq!(status["failed"], 1, "{status}");
    assert_eq!(status["conditions"][0]["type"], "Failed");

    // A running pod, deleted: its containers and sandbox go, then the pod object.
    let sandboxes_before = cri.pod_ids().unwrap().len();
    rest.post(
        &format!("/api/v1/namespaces/{ns}/pods"),
        &json!({
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "sleeper"},
            "spec": {"nodeName": NODE, "containers": [
                {"name": "sleep", "image": "busybox", "command": ["sleep", "3600"]},
            ]},
        }),
    )
    .unwrap();
    let started = Instant::now();
    let pod = kubelet
        .wait_pod(ns, "sleeper", WAIT, |p| {
            p["status"]["containerStatuses"][0]["state"]["running"].is_object()
        })
        .unwrap();
    let id_took = started.elapsed();
    assert_eq!(phase(&pod), "Running");
    let id = container_id(&pod["status"]["containerStatuses"][0]);
    assert!(containerd_containers(&cri).contains(&id));
    assert_eq!(cri.pod_ids().unwrap().len(), sandboxes_before + 1);
    // Where the collector looks: the container's cgroup under the pod's, as with a kubelet.
    let uid = pod["metadata"]["uid"].as_str().unwrap();
    let cgroup = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .iter()
        .map(|root| Path::new(root).join(format!("kubepods/burstable/pod{uid}/{id}")))
        .find(|path| path.join("cgroup.procs").exists())
        .unwrap_or_else(|| panic!("no cgroup kubepods/burstable/pod{uid}/{id}"));
    assert!(
        !fs::read_to_string(cgroup.join("cgroup.procs"))
            .unwrap()
            .trim()
            .is_empty()
    );
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
    assert!(!containerd_containers(&cri).contains(&id));
    assert_eq!(cri.pod_ids().unwrap().len(), sandboxes_before);
    assert!(kubelet.errors().is_empty(), "{:?}", kubelet.errors());
    eprintln!(
        "tools Job {tools_took:?}; container id in status {id_took:?} after create; \
         deleted pod gone {delete_took:?}"
    );
}

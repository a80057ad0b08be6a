//! A real Kubernetes API server 1.20.2 (etcd, kube-apiserver, optionally kube-controller-manager)
//! spoken to over plain HTTPS with the admin client certificate: version, kubeconfig, pods and
//! their status, watches by node, the controllers, and clean-up. Each test starts its own control
//! plane; a machine without `cargo xtask testbed install` skips them (fails them under
//! `RELAY_REQUIRE_TESTBED=1`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::{BufRead, BufReader},
    net::TcpStream,
    panic,
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use reqwest::{
    StatusCode,
    blocking::{Client, Response},
};
use serde_json::{Value, json};
use testbed::kube::{KubeApi, KubeOptions};

/// How long the controllers may take to act.
const CONTROLLER_DEADLINE: Duration = Duration::from_secs(60);

fn checked(response: Response) -> Value {
    let status = response.status();
    let body = response.text().unwrap();
    assert!(status.is_success(), "{status}: {body}");
    serde_json::from_str(&body).unwrap()
}

fn get(client: &Client, url: &str) -> Value {
    checked(client.get(url).send().unwrap())
}

fn post(client: &Client, url: &str, body: &Value) -> Value {
    checked(client.post(url).json(body).send().unwrap())
}

fn create_namespace(kube: &KubeApi, client: &Client, name: &str) {
    post(
        client,
        &format!("{}/api/v1/namespaces", kube.url()),
        &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}),
    );
}

fn pod(name: &str, node: Option<&str>) -> Value {
    let mut pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "logs"}},
        "spec": {
            "containers": [{"name": "app", "image": "busybox", "command": ["sh", "-c", "echo hi"]}],
            "restartPolicy": "Never",
        },
    });
    if let Some(node) = node {
        pod["spec"]["nodeName"] = json!(node);
    }
    pod
}

/// Polls `check` until it returns `Some`, failing after `deadline`.
fn eventually<T>(what: &str, deadline: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + deadline;
    loop {
        if let Some(found) = check() {
            return found;
        }
        assert!(Instant::now() < end, "{what}: not within {deadline:?}");
        thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn answers_version_and_readyz_and_kubectl_works_with_the_kubeconfig() {
    let Some(kube) = KubeApi::start_or_skip() else {
        return;
    };
    let client = kube.client().unwrap();
    let version = get(&client, &format!("{}/version", kube.url()));
    assert_eq!(version["gitVersion"], "v1.20.2", "{version}");
    assert_eq!(
        (&version["major"], &version["minor"]),
        (&json!("1"), &json!("20"))
    );
    let readyz = client.get(format!("{}/readyz", kube.url())).send().unwrap();
    assert_eq!(readyz.status(), StatusCode::OK);

    // Without a client certificate the request is anonymous, which RBAC refuses outside of the
    // discovery and health endpoints.
    let anonymous = Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(kube.ca_pem().as_bytes()).unwrap()])
        .build()
        .unwrap();
    let refused = anonymous
        .get(format!("{}/api/v1/namespaces", kube.url()))
        .send()
        .unwrap();
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);

    for path in [
        kube.ca_path(),
        kube.admin_cert_path(),
        kube.admin_key_path(),
        kube.service_account_signing_key_path(),
        kube.service_account_public_key_path(),
    ] {
        assert!(path.exists(), "{}", path.display());
    }

    // A real client reads the kubeconfig.
    let out = kube
        .kubectl()
        .args(["get", "namespaces", "-o", "name"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.lines().any(|l| l == "namespace/default"), "{stdout}");
    let out = kube
        .kubectl()
        .args(["auth", "can-i", "*", "*"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "yes");
}

#[test]
fn pods_are_created_read_and_get_their_status_patched() {
    let Some(kube) = KubeApi::start_or_skip() else {
        return;
    };
    let client = kube.client().unwrap();
    create_namespace(&kube, &client, "tenant-a");
    let pods = format!("{}/api/v1/namespaces/tenant-a/pods", kube.url());
    let created = post(&client, &pods, &pod("web", Some("node-1")));
    assert_eq!(created["spec"]["nodeName"], "node-1");
    let uid = created["metadata"]["uid"].as_str().unwrap().to_owned();

    let read = get(&client, &format!("{pods}/web"));
    assert_eq!(read["metadata"]["uid"], uid.as_str());
    assert_eq!(read["spec"]["containers"][0]["name"], "app");
    // No kubelet: nothing ever reports on the pod but us.
    assert_eq!(read["status"]["phase"], "Pending");

    let container_id =
        "containerd://0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    let patch = json!({"status": {
        "phase": "Running",
        "podIP": "10.244.0.7",
        "containerStatuses": [{
            "name": "app",
            "image": "docker.io/library/busybox:latest",
            "imageID": "docker.io/library/busybox@sha256:0000000000000000000000000000000000000000000000000000000000000000",
            "containerID": container_id,
            "ready": true,
            "started": true,
            "restartCount": 0,
            "state": {"running": {"startedAt": "2024-01-01T00:00:00Z"}},
        }],
    }});
    let patched = checked(
        client
            .patch(format!("{pods}/web/status"))
            .header("Content-Type", "application/merge-patch+json")
            .body(patch.to_string())
            .send()
            .unwrap(),
    );
    assert_eq!(
        patched["status"]["containerStatuses"][0]["containerID"],
        container_id
    );

    let read = get(&client, &format!("{pods}/web"));
    assert_eq!(read["status"]["phase"], "Running");
    assert_eq!(read["status"]["podIP"], "10.244.0.7");
    let status = &read["status"]["containerStatuses"][0];
    assert_eq!(status["containerID"], container_id);
    assert_eq!(
        status["state"]["running"]["startedAt"],
        "2024-01-01T00:00:00Z"
    );
    // The status subresource leaves the spec alone, and the main resource the status.
    assert_eq!(read["spec"]["nodeName"], "node-1");
    let relabeled = checked(
        client
            .patch(format!("{pods}/web"))
            .header("Content-Type", "application/merge-patch+json")
            .body(
                json!({"metadata": {"labels": {"seen": "yes"}}, "status": {"phase": "Failed"}})
                    .to_string(),
            )
            .send()
            .unwrap(),
    );
    assert_eq!(relabeled["metadata"]["labels"]["seen"], "yes");
    assert_eq!(relabeled["status"]["phase"], "Running");
}

#[test]
fn a_watch_by_node_sees_that_nodes_pods_only() {
    let Some(kube) = KubeApi::start_or_skip() else {
        return;
    };
    let client = kube.client().unwrap();
    create_namespace(&kube, &client, "tenant-b");
    let pods = format!("{}/api/v1/namespaces/tenant-b/pods", kube.url());
    post(&client, &pods, &pod("before", Some("node-a")));
    post(&client, &pods, &pod("elsewhere", Some("node-b")));
    post(&client, &pods, &pod("unscheduled", None));

    // Across namespaces, as a kubelet watches; the server ends the watch after 20 s at the latest.
    let watch = client
        .get(format!(
            "{}/api/v1/pods?watch=true&fieldSelector=spec.nodeName%3Dnode-a&timeoutSeconds=20",
            kube.url()
        ))
        .send()
        .unwrap();
    assert_eq!(watch.status(), StatusCode::OK);
    post(&client, &pods, &pod("after-elsewhere", Some("node-b")));
    post(&client, &pods, &pod("after", Some("node-a")));

    let mut seen = Vec::new();
    for line in BufReader::new(watch).lines() {
        let event: Value = serde_json::from_str(&line.unwrap()).unwrap();
        let name = event["object"]["metadata"]["name"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_eq!(event["object"]["spec"]["nodeName"], "node-a", "{event}");
        seen.push((event["type"].as_str().unwrap().to_owned(), name));
        if seen.iter().any(|(_, n)| n == "after") {
            break;
        }
    }
    assert_eq!(
        seen,
        [
            ("ADDED".to_owned(), "before".to_owned()),
            ("ADDED".to_owned(), "after".to_owned()),
        ]
    );
}

#[test]
fn the_controller_manager_makes_service_accounts_runs_jobs_collects_garbage_and_deletes_namespaces()
{
    let Some(kube) = KubeApi::start_or_skip_with(&KubeOptions::new().controller_manager(true))
    else {
        return;
    };
    let client = kube.client().unwrap();
    let url = kube.url();
    create_namespace(&kube, &client, "jobs");

    // The service account controller gives each new namespace its `default` account.
    eventually("the default service account", CONTROLLER_DEADLINE, || {
        let r = client
            .get(format!(
                "{url}/api/v1/namespaces/jobs/serviceaccounts/default"
            ))
            .send()
            .unwrap();
        r.status().is_success().then_some(())
    });

    // The Job controller makes the Job's pod (which stays Pending: no scheduler, no kubelet);
    // the ServiceAccount admission plugin mounts the account's token into it.
    post(
        &client,
        &format!("{url}/apis/batch/v1/namespaces/jobs/jobs"),
        &json!({
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": "once"},
            "spec": {"template": {"spec": pod("unused", None)["spec"]}},
        }),
    );
    let job_pod = eventually("the Job's pod", CONTROLLER_DEADLINE, || {
        let list = get(
            &client,
            &format!("{url}/api/v1/namespaces/jobs/pods?labelSelector=job-name%3Donce"),
        );
        list["items"].as_array().unwrap().first().cloned()
    });
    assert_eq!(job_pod["spec"]["serviceAccountName"], "default");
    let mounts = job_pod["spec"]["containers"][0]["volumeMounts"].to_string();
    assert!(
        mounts.contains("/var/run/secrets/kubernetes.io/serviceaccount"),
        "{mounts}"
    );

    // The garbage collector deletes what its owner no longer holds.
    let configmaps = format!("{url}/api/v1/namespaces/jobs/configmaps");
    let owner = post(
        &client,
        &configmaps,
        &json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "owner"}}),
    );
    post(
        &client,
        &configmaps,
        &json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "owned", "ownerReferences": [{
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "name": "owner",
                "uid": owner["metadata"]["uid"],
            }]},
        }),
    );
    checked(client.delete(format!("{configmaps}/owner")).send().unwrap());
    eventually(
        "the owned ConfigMap's deletion",
        CONTROLLER_DEADLINE,
        || {
            let r = client.get(format!("{configmaps}/owned")).send().unwrap();
            (r.status() == StatusCode::NOT_FOUND).then_some(())
        },
    );

    // The namespace controller empties a deleted namespace (the Job's pod was never scheduled,
    // so it goes without a kubelet's confirmation) and then removes it.
    checked(
        client
            .delete(format!("{url}/api/v1/namespaces/jobs"))
            .send()
            .unwrap(),
    );
    eventually("the namespace's deletion", CONTROLLER_DEADLINE, || {
        let r = client
            .get(format!("{url}/api/v1/namespaces/jobs"))
            .send()
            .unwrap();
        (r.status() == StatusCode::NOT_FOUND).then_some(())
    });
}

#[test]
fn dropping_stops_the_processes_and_removes_the_directory_even_after_a_panic() {
    if let Some(reason) = testbed::kube::unavailable(&KubeOptions::new()) {
        testbed::skip_or_fail(&reason);
        return;
    }
    let mut left: Option<(String, String, PathBuf)> = None;
    let panicked = panic::catch_unwind(panic::AssertUnwindSafe(|| {
        let kube = KubeApi::start().unwrap();
        left = Some((
            kube.url().to_owned(),
            kube.etcd_url().to_owned(),
            kube.dir().to_owned(),
        ));
        panic!("deliberate panic: the control plane must still be cleaned up");
    }));
    assert!(panicked.is_err());
    let (url, etcd_url, dir) = left.unwrap();
    assert!(!dir.exists(), "{} is left", dir.display());
    for url in [url, etcd_url] {
        let addr = url.rsplit('/').next().unwrap();
        assert!(
            TcpStream::connect(addr).is_err(),
            "something still listens on {addr}"
        );
    }
}

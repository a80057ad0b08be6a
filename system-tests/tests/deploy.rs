//! The manifests in `deploy/base/` and the overlays in `deploy/overlays/` apply to a real 1.20 API
//! server (the test bed's), with kubectl 1.20 and its built-in kustomize (v2.0.3).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use operator::crd::Tenant;
use testbed::kube::{KubeApi, KubeOptions};

/// The files of `deploy/base/` in the order they apply (the namespace and the CRD first).
const MANIFESTS: &[&str] = &[
    "namespace.yaml",
    "crd/tenant.yaml",
    "metadata-api.yaml",
    "collector.yaml",
    // Not in the kustomization: the operator applies it (operator::daemonset).
    "collector/daemonset.yaml",
    "operator.yaml",
    "webhook.yaml",
];

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn base_dir() -> PathBuf {
    deploy_dir().join("base")
}

/// Runs `kubectl ARGS`, panics with its output when it fails, returns its stdout.
fn kubectl<S: AsRef<OsStr>>(kube: &KubeApi, args: &[S]) -> String {
    let mut cmd: Command = kube.kubectl();
    let output = match cmd.args(args).output() {
        Ok(output) => output,
        Err(e) => panic!("cannot run kubectl: {e}"),
    };
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let shown: Vec<_> = args.iter().map(|a| a.as_ref().to_string_lossy()).collect();
    assert!(
        output.status.success(),
        "kubectl {} failed ({}):\n{stdout}\n{}",
        shown.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// Runs `kubectl apply -f -` with `yaml` on stdin, panics when it fails.
fn apply_stdin(kube: &KubeApi, yaml: &str) {
    use std::io::Write;
    let mut child = kube
        .kubectl()
        .args(["apply", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(yaml.as_bytes())
        .expect("kubectl reads stdin");
    let output = child.wait_with_output().expect("kubectl runs");
    assert!(
        output.status.success(),
        "kubectl apply -f - failed:\n{yaml}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn apply(kube: &KubeApi, file: &Path) {
    let out = kubectl(
        kube,
        &[OsStr::new("apply"), OsStr::new("-f"), file.as_os_str()],
    );
    eprintln!("{out}");
}

#[test]
fn deploy_manifests_apply_to_a_real_api_server() {
    let Some(kube) = KubeApi::start_or_skip() else {
        return;
    };
    let deploy = deploy_dir();
    let base = base_dir();

    // The CRD first, established before a Tenant can be created.
    apply(&kube, &base.join("crd/tenant.yaml"));
    kubectl(
        &kube,
        &[
            "wait",
            "--for",
            "condition=established",
            "crd/tenants.relay.sh",
            "--timeout=60s",
        ],
    );

    for manifest in MANIFESTS {
        apply(&kube, &base.join(manifest));
    }
    apply(&kube, &deploy.join("examples/namespace.yaml"));
    apply(&kube, &deploy.join("examples/tenant.yaml"));

    let ns = ["-n", "relay-system"];
    let get = |args: &[&str]| kubectl(&kube, &[&["get"], args, &["-o", "name"]].concat());
    let exists = |args: &[&str], expected: &str| {
        let names = get(args);
        assert!(
            names.lines().any(|line| line == expected),
            "{expected} not found in `kubectl get {}`:\n{names}",
            args.join(" ")
        );
    };
    exists(&["namespace", "relay-system"], "namespace/relay-system");
    exists(
        &[&ns[..], &["daemonset", "relay-collector"]].concat(),
        "daemonset.apps/relay-collector",
    );
    exists(
        &[&ns[..], &["deployment", "metadata-api"]].concat(),
        "deployment.apps/metadata-api",
    );
    exists(
        &[&ns[..], &["deployment", "relay-operator"]].concat(),
        "deployment.apps/relay-operator",
    );
    exists(
        &[&ns[..], &["service", "metadata-api"]].concat(),
        "service/metadata-api",
    );
    exists(
        &[&ns[..], &["service", "relay-operator"]].concat(),
        "service/relay-operator",
    );
    // The metrics port is kept from tenants.
    exists(
        &[&ns[..], &["networkpolicy", "metadata-api"]].concat(),
        "networkpolicy.networking.k8s.io/metadata-api",
    );
    for account in ["metadata-api", "relay-collector", "relay-operator"] {
        exists(
            &[&ns[..], &["serviceaccount", account]].concat(),
            &format!("serviceaccount/{account}"),
        );
    }
    exists(
        &["mutatingwebhookconfiguration", "relay-pod-injection"],
        "mutatingwebhookconfiguration.admissionregistration.k8s.io/relay-pod-injection",
    );
    for name in ["metadata-api", "relay-collector", "relay-operator"] {
        exists(
            &["clusterrole", name],
            &format!("clusterrole.rbac.authorization.k8s.io/{name}"),
        );
        exists(
            &["clusterrolebinding", name],
            &format!("clusterrolebinding.rbac.authorization.k8s.io/{name}"),
        );
    }
    exists(
        &["clusterrolebinding", "metadata-api:auth-delegator"],
        "clusterrolebinding.rbac.authorization.k8s.io/metadata-api:auth-delegator",
    );
    exists(
        &[&ns[..], &["role", "relay-operator"]].concat(),
        "role.rbac.authorization.k8s.io/relay-operator",
    );
    exists(
        &[&ns[..], &["rolebinding", "relay-operator"]].concat(),
        "rolebinding.rbac.authorization.k8s.io/relay-operator",
    );
    exists(
        &["-n", "tenant-a", "tenant", "tenant-a"],
        "tenant.relay.sh/tenant-a",
    );

    // What the API server stored is what the manifests say where it matters.
    let webhook = kubectl(
        &kube,
        &[
            "get",
            "mutatingwebhookconfiguration",
            "relay-pod-injection",
            "-o",
            "jsonpath={.webhooks[0].failurePolicy} {.webhooks[0].sideEffects} \
             {.webhooks[0].clientConfig.service.path} {.webhooks[0].clientConfig.service.port}",
        ],
    );
    assert_eq!(webhook, "Ignore None /mutate-pods 443");
    let modes = kubectl(
        &kube,
        &[
            "get",
            "-n",
            "tenant-a",
            "tenant",
            "tenant-a",
            "-o",
            "jsonpath={.spec.entrypointInjection.volumeClaimTemplate.accessModes}",
        ],
    );
    assert!(modes.contains("ReadOnlyMany"), "accessModes: {modes}");

    // Each ServiceAccount may do what its component does (`kubectl auth can-i` fails on "no"),
    // and not more where it matters.
    let can = |account: &str, verb: &str, resource: &str, namespace: Option<&str>| -> bool {
        let mut cmd = kube.kubectl();
        cmd.args(["auth", "can-i", verb, resource, "--as"])
            .arg(format!("system:serviceaccount:relay-system:{account}"));
        match namespace {
            Some(ns) => cmd.args(["-n", ns]),
            None => cmd.arg("--all-namespaces"),
        };
        let output = cmd.output().expect("kubectl runs");
        String::from_utf8_lossy(&output.stdout).trim() == "yes"
    };
    let cluster = None;
    let system = Some("relay-system");
    let allowed = [
        (
            "metadata-api",
            "create",
            "tokenreviews.authentication.k8s.io",
            cluster,
        ),
        // Whether a person may read a stream: may they get pods/log in its namespace?
        (
            "metadata-api",
            "create",
            "subjectaccessreviews.authorization.k8s.io",
            cluster,
        ),
        ("metadata-api", "get", "pods", cluster),
        ("metadata-api", "watch", "pods", cluster),
        ("relay-collector", "watch", "pods", cluster),
        ("relay-collector", "watch", "namespaces", cluster),
        ("relay-operator", "watch", "tenants.relay.sh", cluster),
        (
            "relay-operator",
            "patch",
            "tenants.relay.sh/status",
            cluster,
        ),
        ("relay-operator", "patch", "persistentvolumeclaims", cluster),
        (
            "relay-operator",
            "delete",
            "persistentvolumeclaims",
            cluster,
        ),
        ("relay-operator", "patch", "jobs.batch", cluster),
        ("relay-operator", "delete", "jobs.batch", cluster),
        ("relay-operator", "list", "pods", cluster),
        ("relay-operator", "patch", "namespaces", cluster),
        ("relay-operator", "create", "events.events.k8s.io", cluster),
        ("relay-operator", "watch", "secrets", system),
        ("relay-operator", "create", "secrets", system),
        ("relay-operator", "get", "secrets", Some("tenant-a")),
        ("relay-operator", "get", "serviceaccounts", Some("tenant-a")),
        ("relay-operator", "patch", "daemonsets.apps", system),
        ("relay-operator", "watch", "daemonsets.apps", system),
        (
            "relay-operator",
            "update",
            "leases.coordination.k8s.io",
            system,
        ),
    ];
    for (account, verb, resource, namespace) in allowed {
        assert!(
            can(account, verb, resource, namespace),
            "{account} may not {verb} {resource} in {namespace:?}"
        );
    }
    let denied = [
        ("relay-operator", "list", "secrets", Some("tenant-a")),
        ("relay-operator", "watch", "secrets", Some("tenant-a")),
        ("relay-operator", "patch", "secrets", Some("tenant-a")),
        (
            "relay-operator",
            "patch",
            "daemonsets.apps",
            Some("kube-system"),
        ),
        ("relay-operator", "delete", "namespaces", cluster),
        ("relay-operator", "create", "pods", cluster),
        ("relay-collector", "get", "secrets", cluster),
        ("metadata-api", "get", "secrets", cluster),
    ];
    for (account, verb, resource, namespace) in denied {
        assert!(
            !can(account, verb, resource, namespace),
            "{account} may {verb} {resource} in {namespace:?}"
        );
    }

    // The kustomization lists every file but the DaemonSet and builds with kubectl 1.20's
    // built-in kustomize; the server accepts the result (everything exists by now: unchanged or
    // configured).
    let dir = base.to_str().expect("UTF-8 path");
    let built = kubectl(&kube, &["kustomize", dir]);
    assert!(
        !built.contains("kind: DaemonSet"),
        "the collector DaemonSet belongs to the operator, not the kustomization"
    );
    for kind in [
        "kind: Namespace",
        "kind: CustomResourceDefinition",
        "kind: MutatingWebhookConfiguration",
    ] {
        assert!(
            built.contains(kind),
            "{kind} missing from `kubectl kustomize`"
        );
    }
    kubectl(&kube, &["apply", "--dry-run=server", "-k", dir]);
}

/// The tenant of `file` as the operator reads it, after checking that the operator accepts its
/// volume claim template.
fn tenant(file: &Path) -> Tenant {
    let text = std::fs::read_to_string(file).expect("tenant file readable");
    let tenant: Tenant = serde_norway::from_str(&text).expect("a Tenant");
    if let Err(e) = tenant.spec.validate() {
        panic!("the operator refuses {}: {e}", file.display());
    }
    tenant
}

/// Waits until `kubectl get ARGS -o jsonpath=PATH` prints `want`, panics after `timeout`.
fn wait_for(kube: &KubeApi, args: &[&str], path: &str, want: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let jsonpath = format!("jsonpath={path}");
    loop {
        let got = kubectl(kube, &[&["get"], args, &["-o", &jsonpath]].concat());
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "`kubectl get {}` {path} is {got:?}, not {want:?}, after {timeout:?}",
            args.join(" ")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn overlays_render_and_apply_to_a_real_api_server() {
    // The controller manager binds claims to volumes (the kind overlay's tools volumes).
    let Some(kube) = KubeApi::start_or_skip_with(&KubeOptions::new().controller_manager(true))
    else {
        return;
    };
    let deploy = deploy_dir();
    let kind = deploy.join("overlays/kind");
    let gke = deploy.join("overlays/gke");
    let path = |dir: &Path| dir.to_str().expect("UTF-8 path").to_owned();

    // kind: the images of `cargo xtask images` (also those the operator hands out), pulled only
    // when missing, the API's storage on claims, the tools volumes' class.
    let built = kubectl(&kube, &["kustomize", &path(&kind)]);
    for expected in [
        "image: localhost/relay/metadata-api:dev",
        "image: localhost/relay/operator:dev",
        "- localhost/relay/tools:dev",
        "- localhost/relay/collector:dev",
        "imagePullPolicy: IfNotPresent",
        "claimName: metadata-api-streams",
        "claimName: metadata-api-key",
        "name: relay-tools-0",
    ] {
        assert!(
            built.contains(expected),
            "{expected:?} missing from the kind overlay:\n{built}"
        );
    }
    for base_only in [
        "relay/metadata-api:dev",
        "relay/operator:dev",
        "relay/tools:dev",
    ] {
        assert!(
            !built.contains(&format!(" {base_only}")),
            "the kind overlay still names the base's {base_only}"
        );
    }
    assert!(
        !built.contains("emptyDir"),
        "the API's storage is still an emptyDir"
    );
    assert!(
        !built.contains("kind: DaemonSet"),
        "the collector DaemonSet belongs to the operator"
    );

    // Applied for real, then the example tenant with kind's template.
    kubectl(&kube, &["apply", "-k", &path(&kind)]);
    kubectl(
        &kube,
        &[
            "wait",
            "--for",
            "condition=established",
            "crd/tenants.relay.sh",
            "--timeout=60s",
        ],
    );
    apply(&kube, &deploy.join("examples/namespace.yaml"));
    let kind_tenant = kind.join("tenant.yaml");
    apply(&kube, &kind_tenant);
    let class = kubectl(
        &kube,
        &[
            "get",
            "-n",
            "tenant-a",
            "tenant",
            "tenant-a",
            "-o",
            "jsonpath={.spec.entrypointInjection.volumeClaimTemplate.storageClassName}",
        ],
    );
    assert_eq!(class, "relay-tools");
    for (resource, name) in [
        ("storageclass", "relay-tools"),
        ("pv", "relay-tools-0"),
        ("-n relay-system pvc", "metadata-api-streams"),
        ("-n relay-system pvc", "metadata-api-key"),
    ] {
        let args: Vec<&str> = resource.split(' ').chain([name]).collect();
        kubectl(&kube, &[&["get"], &args[..], &["-o", "name"]].concat());
    }

    // A claim as the operator makes it from that template binds to one of the overlay's
    // ReadOnlyMany volumes.
    let template = tenant(&kind_tenant).spec.volume_claim_template();
    let claim = serde_json::json!({
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "tenant-a-tools-test", "namespace": "tenant-a"},
        "spec": template,
    });
    apply_stdin(&kube, &claim.to_string());
    wait_for(
        &kube,
        &["-n", "tenant-a", "pvc", "tenant-a-tools-test"],
        "{.status.phase}",
        "Bound",
        Duration::from_secs(60),
    );
    let volume = kubectl(
        &kube,
        &[
            "get",
            "-n",
            "tenant-a",
            "pvc",
            "tenant-a-tools-test",
            "-o",
            "jsonpath={.spec.volumeName} {.status.accessModes}",
        ],
    );
    assert!(
        volume.starts_with("relay-tools-") && volume.contains("ReadOnlyMany"),
        "tools claim bound to {volume}"
    );

    // GKE: rendered with its placeholders, accepted by the server (not applied: its images and
    // bucket are examples), and its tenant template accepted by the operator.
    let built = kubectl(&kube, &["kustomize", &path(&gke)]);
    for expected in [
        "- gs://my-relay-bucket/streams",
        "secretName: metadata-api-key",
        "iam.gke.io/gcp-service-account:",
        "image: europe-west1-docker.pkg.dev/my-project/relay/metadata-api:dev",
        "- europe-west1-docker.pkg.dev/my-project/relay/tools:dev",
        "- europe-west1-docker.pkg.dev/my-project/relay/collector:dev",
    ] {
        assert!(
            built.contains(expected),
            "{expected:?} missing from the GKE overlay:\n{built}"
        );
    }
    assert!(!built.contains("file:///"), "GKE streams still on a file");
    kubectl(&kube, &["apply", "--dry-run=server", "-k", &path(&gke)]);
    let gke_tenant = gke.join("tenant.yaml");
    tenant(&gke_tenant);
    kubectl(
        &kube,
        &[
            OsStr::new("apply"),
            OsStr::new("--dry-run=server"),
            OsStr::new("-f"),
            gke_tenant.as_os_str(),
        ],
    );
}

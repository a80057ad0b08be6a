//! The manifests in `deploy/base/` apply to a real 1.20 API server (the test bed's), with kubectl 1.20.

use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    process::Command,
};

use testbed::kube::KubeApi;

/// The files of `deploy/base/` in the order they apply (the namespace and the CRD first).
const MANIFESTS: &[&str] = &[
    "namespace.yaml",
    "crd/tenant.yaml",
    "metadata-api.yaml",
    "collector.yaml",
    // Not in the kustomization: the operator applies it (operator::collector).
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
        ("relay-operator", "get", "secrets", Some("tenant-a")),
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

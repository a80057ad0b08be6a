//! Two replicas of the real `operator` binary against a real API server and a real registry:
//! one leads (reconciles tenants, owns the collector DaemonSet), both serve the webhook; pods
//! without a command get their image's entrypoint from the registry; the other replica takes
//! over when the leader stops.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use operator::controller::tools_for;
use operator::crd::default_volume_claim_template;
use serde_json::{Value, json};
use testbed::kube::{KubeApi, KubeOptions, Rest};
use testbed::registry::{Format, Image, Registry};

const WAIT: Duration = Duration::from_secs(60);

use testbed::ports::free_port;

fn wait_for<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One operator process; killed when dropped.
struct Replica {
    name: &'static str,
    child: Child,
    metrics: String,
}

impl Replica {
    fn start(kube: &KubeApi, name: &'static str, webhook_port: u16, registry: &str) -> Self {
        let listen = format!("127.0.0.1:{}", free_port());
        let child = Command::new(env!("CARGO_BIN_EXE_operator"))
            .env("KUBECONFIG", kube.kubeconfig_path())
            .env("RUST_LOG", "info,operator=debug")
            .args(["--tools-image", "relay/tools:1"])
            .args(["--namespace", "relay-system", "--pod-name", name])
            .args(["--webhook-listen", &format!("127.0.0.1:{webhook_port}")])
            .args(["--webhook-ip", "127.0.0.1", "--listen", &listen])
            .args(["--collector-image", "relay/collector:1"])
            .args(["--collector-arg", "--gzip-level", "--collector-arg", "1"])
            .args(["--insecure-registry", registry])
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        Self {
            name,
            child,
            metrics: format!("http://{listen}"),
        }
    }

    fn get(&self, path: &str) -> Option<(u16, String)> {
        let response = reqwest::blocking::get(format!("{}{path}", self.metrics)).ok()?;
        let status = response.status().as_u16();
        Some((status, response.text().ok()?))
    }

    fn leads(&self) -> bool {
        self.get("/metrics")
            .is_some_and(|(_, text)| text.lines().any(|l| l == "relay_operator_leader 1"))
    }

    fn terminate(&mut self) -> i32 {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            assert!(Instant::now() < deadline, "{} did not stop", self.name);
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn get(rest: &Rest, path: &str) -> Option<Value> {
    rest.get(path).unwrap()
}

#[test]
fn two_replicas_lead_in_turn_serve_the_webhook_and_resolve_image_entrypoints() {
    let Some(kube) = KubeApi::start_or_skip_with(
        &KubeOptions::new()
            .controller_manager(true)
            .without_controllers(&["job"]),
    ) else {
        return;
    };
    let Some(registry) = Registry::start_or_skip(None) else {
        return;
    };
    let digest = registry
        .push(
            "app:1",
            &Image::new("linux", "amd64")
                .entrypoint(["/bin/app"])
                .cmd(["--serve"]),
            Format::Oci,
        )
        .unwrap();
    assert!(digest.starts_with("sha256:"), "{digest}");
    let rest = kube.rest().unwrap();

    // What deploy/ would install, with the webhook reached by URL (no Service network here).
    let crd =
        serde_json::to_value(<operator::crd::Tenant as kube::CustomResourceExt>::crd()).unwrap();
    let webhook_port = free_port();
    rest.install_relay(&crd, &["tenant-x"], webhook_port)
        .unwrap();

    // Two replicas; the webhook configuration points at a's port, b serves its own.
    let mut a = Replica::start(&kube, "a", webhook_port, &registry.host());
    let mut b = Replica::start(&kube, "b", free_port(), &registry.host());
    let replicas = [&a, &b];
    let leader = wait_for("a leader", || replicas.iter().position(|r| r.leads()));
    for r in replicas {
        assert_eq!(r.get("/healthz").map(|(s, _)| s), Some(200), "{}", r.name);
        wait_for("readiness", || (r.get("/readyz")?.0 == 200).then_some(()));
    }
    assert!(
        !replicas[1 - leader].leads(),
        "both replicas lead at the same time"
    );

    // The leader applies the collector DaemonSet with the configured image and arguments.
    let ds = wait_for("the collector DaemonSet", || {
        get(
            &rest,
            "/apis/apps/v1/namespaces/relay-system/daemonsets/relay-collector",
        )
    });
    let container = &ds["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["image"], "relay/collector:1");
    let args: Vec<&str> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(args.ends_with(&["--gzip-level", "1"]), "{args:?}");

    // A tenant: tools claim and Job; the Job "succeeds" as the Job controller would report it.
    rest.post(
        "/apis/relay.sh/v1beta1/namespaces/tenant-x/tenants",
        &json!({"apiVersion": "relay.sh/v1beta1", "kind": "Tenant", "metadata": {"name": "x"}, "spec": {}}),
    )
    .unwrap();
    let tools = tools_for("x", "relay/tools:1", &default_volume_claim_template()).unwrap();
    wait_for("the tools Job", || {
        get(
            &rest,
            &format!("/apis/batch/v1/namespaces/tenant-x/jobs/{}", tools.name),
        )
    });
    rest.complete_job("tenant-x", &tools.name).unwrap();
    wait_for("the tenant's tools claim", || {
        let tenant = get(
            &rest,
            "/apis/relay.sh/v1beta1/namespaces/tenant-x/tenants/x",
        )?;
        (tenant["status"]["toolsVolumeClaim"] == tools.name.as_str()).then_some(())
    });
    let namespace = get(&rest, "/api/v1/namespaces/tenant-x").unwrap();
    assert_eq!(namespace["metadata"]["labels"]["relay.sh/tenant"], "true");
    wait_for("the webhook's caBundle", || {
        let config = get(
            &rest,
            "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/relay-pod-injection",
        )?;
        config["webhooks"][0]["clientConfig"]["caBundle"]
            .as_str()
            .filter(|b| !b.is_empty())
            .map(|_| ())
    });
    // The controller-manager creates the namespace's default ServiceAccount, which pods need.
    wait_for("the default ServiceAccount", || {
        get(&rest, "/api/v1/namespaces/tenant-x/serviceaccounts/default")
    });

    // A pod without command: its entrypoint comes from the image config in the registry.
    let image = format!("{}/app:1", registry.host());
    let pod = rest
        .post(
            "/api/v1/namespaces/tenant-x/pods",
            &json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "app"},
                   "spec": {"containers": [
                       {"name": "app", "image": image},
                       {"name": "args", "image": image, "args": ["--once"]}]}}),
        )
        .unwrap();
    let argv = |c: &Value| -> Vec<String> {
        ["command", "args"]
            .iter()
            .filter_map(|k| c[*k].as_array())
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect()
    };
    let containers = &pod["spec"]["containers"];
    assert_eq!(
        argv(&containers[0]),
        ["/relay/lib/entrypoint", "--", "/bin/app", "--serve"]
    );
    assert_eq!(
        argv(&containers[1]),
        ["/relay/lib/entrypoint", "--", "/bin/app", "--once"]
    );
    let volumes = pod["spec"]["volumes"].as_array().unwrap();
    assert!(
        volumes
            .iter()
            .any(|v| v["persistentVolumeClaim"]["claimName"] == tools.name.as_str()),
        "{volumes:?}"
    );
    assert_eq!(pod["metadata"]["annotations"]["relay.sh/injected"], "true");

    // The leader stops: it releases the lease and the other replica takes over.
    let (leading, other) = if leader == 0 {
        (&mut a, &b)
    } else {
        (&mut b, &a)
    };
    let stopped = Instant::now();
    assert_eq!(leading.terminate(), 0, "a stopped leader exits 0");
    wait_for("the other replica to lead", || other.leads().then_some(()));
    let took = stopped.elapsed();
    assert!(took < Duration::from_secs(10), "hand-over took {took:?}");
    eprintln!("leader hand-over took {took:?}");
    drop(a);
    drop(b);
}

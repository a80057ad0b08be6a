//! `cargo bench -p bench --bench operator`: what the pod injection webhook adds to creating a pod,
//! and how fast the operator reconciles tenants.
//!
//! On the test bed's API server (1.20, with kube-controller-manager) and a local registry, the
//! release `operator` runs with its webhook registered by URL. Pods are created one after the
//! other through the API server (as the admin, over HTTPS, one kept-alive connection):
//!
//! 1. baseline: in a namespace without a tenant (the webhook is not called);
//! 2. injected: in a tenant's namespace, containers with `command` (no image lookup);
//! 3. injected + lookup: containers without `command` (entrypoint from the registry, cached by
//!    digest after the first pod).
//!
//! Printed: p50, p99 and mean latency of each, the overhead against the baseline (ms and
//! ratio), the webhook's own time per review (its histogram), and the operator's CPU per
//! admission. Then `--tenants` tenants are created at once: the time until every tools Job
//! exists, and, once the Jobs are marked complete, until every tenant names its tools claim.
//! Everything is printed, nothing asserted.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};
use testbed::kube::{KubeApi, KubeOptions, Rest};
use testbed::registry::{Format, Image, Registry};

use crate::cpu::{clock_ticks, server_cpu};
use crate::process;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Pods created per case.
    #[arg(long, default_value_t = 200)]
    pods: usize,
    /// Tenants created at once for the reconcile measurement.
    #[arg(long, default_value_t = 50)]
    tenants: usize,
}

const WAIT: Duration = Duration::from_secs(120);
const TENANT_NS: &str = "bench-tenant";
const PLAIN_NS: &str = "bench-plain";

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn wait_for<T>(
    what: &str,
    mut check: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(value) = check()? {
            return Ok(value);
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

struct Operator {
    child: Child,
    metrics: String,
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Operator {
    fn metrics(&self) -> anyhow::Result<String> {
        Ok(reqwest::blocking::get(format!("{}/metrics", self.metrics))?.text()?)
    }

    /// Sum and count of the webhook's admission histogram.
    fn admission_time(&self) -> anyhow::Result<(f64, f64)> {
        let text = self.metrics()?;
        let value = |name: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
                .unwrap_or(0.0)
        };
        Ok((
            value("relay_operator_webhook_admission_duration_seconds_sum"),
            value("relay_operator_webhook_admission_duration_seconds_count"),
        ))
    }
}

fn build_operator() -> anyhow::Result<std::path::PathBuf> {
    process::run(Command::new("cargo").current_dir(process::root()).args([
        "build",
        "--release",
        "--quiet",
        "-p",
        "operator",
        "--bin",
        "operator",
    ]))?;
    Ok(process::root().join("target/release/operator"))
}

#[derive(Debug, Clone, Copy)]
struct Stats {
    p50: f64,
    p99: f64,
    mean: f64,
}

fn stats(mut ms: Vec<f64>) -> Stats {
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| ms[((ms.len() as f64 - 1.0) * q).round() as usize];
    Stats {
        p50: at(0.5),
        p99: at(0.99),
        mean: ms.iter().sum::<f64>() / ms.len() as f64,
    }
}

fn create_pods(
    rest: &Rest,
    ns: &str,
    case: &str,
    n: usize,
    image: &str,
    command: bool,
) -> anyhow::Result<Vec<f64>> {
    let mut ms = Vec::with_capacity(n);
    for i in 0..n {
        let mut container = json!({"name": "app", "image": image});
        if command {
            container["command"] = json!(["/bin/app", "--serve"]);
        }
        let pod = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("{case}-{i}")},
            "spec": {"containers": [container]}});
        let started = Instant::now();
        let created = rest.post(&format!("/api/v1/namespaces/{ns}/pods"), &pod)?;
        ms.push(started.elapsed().as_secs_f64() * 1e3);
        let injected = created["metadata"]["annotations"]["relay.sh/injected"] == "true";
        if injected != (ns == TENANT_NS) {
            bail!("pod {case}-{i} in {ns}: injected={injected}: {created}");
        }
    }
    Ok(ms)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let bin = build_operator()?;
    let kube = KubeApi::start_with(
        &KubeOptions::new()
            .controller_manager(true)
            .without_controllers(&["job"]),
    )?;
    let registry = Registry::start(None)?;
    registry.push(
        "app:1",
        &Image::new("linux", "amd64")
            .entrypoint(["/bin/app"])
            .cmd(["--serve"]),
        Format::Oci,
    )?;
    let image = format!("{}/app:1", registry.host());
    let rest = kube.rest()?;

    let crd = serde_json::to_value(<::operator::crd::Tenant as kube::CustomResourceExt>::crd())?;
    let webhook_port = free_port()?;
    rest.install_relay(&crd, &[TENANT_NS, PLAIN_NS], webhook_port)?;
    let listen = format!("127.0.0.1:{}", free_port()?);
    let operator = Operator {
        child: Command::new(&bin)
            .env("KUBECONFIG", kube.kubeconfig_path())
            .env("RUST_LOG", "warn")
            .args([
                "--tools-image",
                "relay/tools:1",
                "--namespace",
                "relay-system",
            ])
            .args([
                "--pod-name",
                "bench",
                "--webhook-ip",
                "127.0.0.1",
                "--listen",
                &listen,
            ])
            .args(["--webhook-listen", &format!("127.0.0.1:{webhook_port}")])
            .args(["--insecure-registry", &registry.host()])
            .stdout(Stdio::null())
            .spawn()
            .context("cannot start the operator")?,
        metrics: format!("http://{listen}"),
    };

    // One tenant whose tools are ready.
    let tools = ::operator::controller::tools_for(
        "bench",
        "relay/tools:1",
        &::operator::crd::default_volume_claim_template(),
    )?;
    rest.post(
        &format!("/apis/relay.sh/v1beta1/namespaces/{TENANT_NS}/tenants"),
        &json!({"apiVersion": "relay.sh/v1beta1", "kind": "Tenant", "metadata": {"name": "bench"}, "spec": {}}),
    )?;
    wait_for("the tools Job", || {
        rest.get(&format!(
            "/apis/batch/v1/namespaces/{TENANT_NS}/jobs/{}",
            tools.name
        ))
    })?;
    rest.complete_job(TENANT_NS, &tools.name)?;
    wait_for("the tenant to be ready", || {
        let tenant = rest.get(&format!(
            "/apis/relay.sh/v1beta1/namespaces/{TENANT_NS}/tenants/bench"
        ))?;
        Ok(tenant.filter(|t| t["status"]["toolsVolumeClaim"] == tools.name.as_str()))
    })?;
    wait_for("the caBundle", || {
        let config = rest.get("/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/relay-pod-injection")?;
        Ok(config.filter(|c| {
            c["webhooks"][0]["clientConfig"]["caBundle"]
                .as_str()
                .is_some_and(|b| !b.is_empty())
        }))
    })?;
    for ns in [TENANT_NS, PLAIN_NS] {
        wait_for("the default ServiceAccount", || {
            rest.get(&format!("/api/v1/namespaces/{ns}/serviceaccounts/default"))
        })?;
    }
    // Warm up connections and caches on both paths.
    create_pods(&rest, PLAIN_NS, "warm", 5, &image, true)?;
    create_pods(&rest, TENANT_NS, "warm", 5, &image, true)?;

    let tck = clock_ticks();
    let pid = operator.child.id();
    println!(
        "bench-operator: {} pods per case, created one at a time through kube-apiserver 1.20 (loopback, HTTPS)",
        args.pods
    );
    println!(
        "| case | p50 ms | p99 ms | mean ms | p50 overhead ms | p50 ratio | webhook ms/review | operator CPU ms/admission |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let mut baseline = None;
    let cases = [
        (
            "baseline (no tenant, no webhook call)",
            PLAIN_NS,
            "plain",
            true,
        ),
        ("injected (command set)", TENANT_NS, "cmd", true),
        (
            "injected + image lookup (cached after the first)",
            TENANT_NS,
            "lookup",
            false,
        ),
    ];
    for (label, ns, case, command) in cases {
        let (sum0, count0) = operator.admission_time()?;
        let cpu0 = server_cpu(pid, tck)?;
        let ms = create_pods(&rest, ns, case, args.pods, &image, command)?;
        let cpu = server_cpu(pid, tck)? - cpu0;
        let (sum1, count1) = operator.admission_time()?;
        let s = stats(ms);
        let base = *baseline.get_or_insert(s);
        let reviews = count1 - count0;
        let per_review = |v: f64| {
            if reviews > 0.0 {
                format!("{:.2}", v / reviews * 1e3)
            } else {
                "-".to_owned()
            }
        };
        println!(
            "| {label} | {:.2} | {:.2} | {:.2} | {:+.2} | {:.2} | {} | {} |",
            s.p50,
            s.p99,
            s.mean,
            s.p50 - base.p50,
            s.p50 / base.p50,
            per_review(sum1 - sum0),
            per_review(cpu),
        );
    }

    // Reconcile rate: many tenants at once.
    let started = Instant::now();
    let names: Vec<String> = (0..args.tenants).map(|i| format!("t{i}")).collect();
    for name in &names {
        rest.post(
            &format!("/apis/relay.sh/v1beta1/namespaces/{TENANT_NS}/tenants"),
            &json!({"apiVersion": "relay.sh/v1beta1", "kind": "Tenant", "metadata": {"name": name}, "spec": {}}),
        )?;
    }
    let jobs: Vec<String> = names
        .iter()
        .map(|n| {
            ::operator::controller::tools_for(
                n,
                "relay/tools:1",
                &::operator::crd::default_volume_claim_template(),
            )
            .map(|t| t.name)
        })
        .collect::<Result<_, _>>()?;
    wait_for("every tools Job", || {
        for job in &jobs {
            if rest
                .get(&format!("/apis/batch/v1/namespaces/{TENANT_NS}/jobs/{job}"))?
                .is_none()
            {
                return Ok(None);
            }
        }
        Ok(Some(()))
    })?;
    let created = started.elapsed();
    let completing = Instant::now();
    for job in &jobs {
        rest.complete_job(TENANT_NS, job)?;
    }
    wait_for("every tenant to name its claim", || {
        for (name, job) in names.iter().zip(&jobs) {
            let tenant = rest.get(&format!(
                "/apis/relay.sh/v1beta1/namespaces/{TENANT_NS}/tenants/{name}"
            ))?;
            if !tenant.is_some_and(|t: Value| t["status"]["toolsVolumeClaim"] == job.as_str()) {
                return Ok(None);
            }
        }
        Ok(Some(()))
    })?;
    let ready = completing.elapsed();
    println!(
        "reconcile: {} tenants created at once -> every tools PVC+Job in {:.2} s ({:.1} tenants/s); \
         Jobs complete -> every tenant switched in {:.2} s",
        args.tenants,
        created.as_secs_f64(),
        args.tenants as f64 / created.as_secs_f64(),
        ready.as_secs_f64()
    );
    Ok(())
}

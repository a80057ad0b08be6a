//! The tenant reconciler against a real kube-apiserver and kube-controller-manager (1.20).
//!
//! There is no kubelet: the tools Jobs' pods never run, so the tests patch a Job's status as the
//! Job controller would once its pod finished (the Job controller itself is off, see
//! `KubeOptions::without_controllers`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{client, wait_for};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Namespace, PersistentVolumeClaim, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, CustomResourceExt, ResourceExt};
use operator::conditions::{self, reasons, types};
use operator::controller::{self, Config, Context, TENANT_NAMESPACE_LABEL, TENANT_UID_LABEL};
use operator::crd::{Tenant, TenantSpec};
use operator::metrics::ControllerMetrics;
use serde_json::json;
use testbed::kube::{KubeApi, KubeOptions};
use tokio::sync::oneshot;

const WAIT: Duration = Duration::from_secs(30);

/// Starts the control plane off the async runtime (the test bed waits with a blocking client).
async fn start_kube() -> Option<KubeApi> {
    tokio::task::spawn_blocking(|| {
        KubeApi::start_or_skip_with(
            &KubeOptions::new()
                .controller_manager(true)
                .without_controllers(&["job"]),
        )
    })
    .await
    .unwrap()
}

async fn install_crd(client: &Client) {
    let crds = Api::<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>::all(client.clone());
    crds.patch(
        "tenants.relay.sh",
        &PatchParams::apply("test").force(),
        &Patch::Apply(Tenant::crd()),
    )
    .await
    .unwrap();
    let tenants = Api::<Tenant>::all(client.clone());
    wait_for("the Tenant CRD to be served", WAIT, || async {
        tenants.list(&ListParams::default()).await.ok()
    })
    .await;
}

async fn create_namespace(client: &Client, name: &str) {
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": name}})).unwrap(),
        )
        .await
        .unwrap();
}

/// A running controller; dropping it stops it.
struct Running {
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    metrics: ControllerMetrics,
}

impl Running {
    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(WAIT, &mut self.task)
            .await
            .expect("controller stops")
            .unwrap();
    }

    fn reconciles(&self) -> String {
        let mut registry = prometheus_client::registry::Registry::default();
        self.metrics.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        text
    }

    /// Total reconciles so far.
    fn reconcile_count(&self) -> u64 {
        self.reconciles()
            .lines()
            .filter(|l| l.starts_with("relay_operator_reconciles_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }
}

fn start_controller(client: &Client, image: &str) -> Running {
    let mut config = Config::new(image);
    config.collect_grace = Duration::from_secs(1);
    config.resync = Duration::from_secs(2);
    let metrics = ControllerMetrics::default();
    let ctx = Arc::new(Context::new(
        client.clone(),
        config,
        Some("test".to_owned()),
        metrics.clone(),
    ));
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(controller::run(ctx, async move {
        let _ = stopped.await;
    }));
    Running {
        stop: Some(stop),
        task,
        metrics,
    }
}

async fn tenant_status(api: &Api<Tenant>, name: &str) -> Option<Tenant> {
    api.get_opt(name).await.unwrap()
}

fn condition(tenant: &Tenant, type_: &str) -> Option<(String, String, String)> {
    let status = tenant.status.as_ref()?;
    let c = conditions::find(&status.conditions, type_)?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// Marks a Job finished as the Job controller would.
async fn finish_job(client: &Client, ns: &str, name: &str, ok: bool) {
    let jobs = Api::<Job>::namespaced(client.clone(), ns);
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let status = if ok {
        json!({"status": {"succeeded": 1, "completionTime": now, "conditions": [
            {"type": "Complete", "status": "True", "lastProbeTime": now, "lastTransitionTime": now}]}})
    } else {
        json!({"status": {"failed": 4, "conditions": [
            {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
             "message": "Job has reached the specified backoff limit",
             "lastProbeTime": now, "lastTransitionTime": now}]}})
    };
    jobs.patch_status(name, &PatchParams::default(), &Patch::Merge(status))
        .await
        .unwrap();
}

async fn owned_claims(client: &Client, ns: &str, tenant: &Tenant) -> Vec<PersistentVolumeClaim> {
    let uid = tenant.uid().unwrap();
    Api::<PersistentVolumeClaim>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(&format!("{TENANT_UID_LABEL}={uid}")))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|c| c.metadata.deletion_timestamp.is_none())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_volume_lifecycle_version_switch_and_cleanup() {
    let Some(kube) = start_kube().await else {
        return;
    };
    let client = client(&kube).await;
    install_crd(&client).await;
    let ns = "acme";
    create_namespace(&client, ns).await;
    let tenants = Api::<Tenant>::namespaced(client.clone(), ns);
    let claims = Api::<PersistentVolumeClaim>::namespaced(client.clone(), ns);
    let jobs = Api::<Job>::namespaced(client.clone(), ns);

    let running = start_controller(&client, "relay/tools:1");
    tenants
        .create(
            &PostParams::default(),
            &Tenant::new("acme", TenantSpec::default()),
        )
        .await
        .unwrap();
    let tenant = tenants.get("acme").await.unwrap();
    let v1 = controller::tools_for(
        "acme",
        "relay/tools:1",
        &tenant.spec.volume_claim_template(),
    )
    .unwrap();

    // A claim and a Job for version 1; the tenant waits for the Job.
    let claim = wait_for("the v1 tools claim", WAIT, || async {
        claims.get_opt(&v1.name).await.unwrap()
    })
    .await;
    let spec = claim.spec.clone().unwrap();
    assert_eq!(
        spec.access_modes.as_deref(),
        Some(&["ReadOnlyMany".to_owned()][..])
    );
    assert_eq!(claim.owner_references()[0].uid, tenant.uid().unwrap());
    let job = wait_for("the v1 tools Job", WAIT, || async {
        jobs.get_opt(&v1.name).await.unwrap()
    })
    .await;
    let container = &job.spec.unwrap().template.spec.unwrap().containers[0];
    assert_eq!(container.image.as_deref(), Some("relay/tools:1"));
    assert_eq!(
        container.command.as_deref().unwrap(),
        ["/entrypoint", "install", "/relay/lib"]
    );
    let waiting = wait_for("ToolsJobRunning", WAIT, || async {
        let t = tenant_status(&tenants, "acme").await?;
        let ready = condition(&t, types::READY)?;
        (ready.1 == reasons::TOOLS_JOB_RUNNING).then_some(t)
    })
    .await;
    assert_eq!(condition(&waiting, types::READY).unwrap().0, "False");
    assert_eq!(waiting.usable_tools_claim(), None);
    assert!(
        waiting
            .finalizers()
            .contains(&controller::FINALIZER.to_owned())
    );
    let namespace = Api::<Namespace>::all(client.clone()).get(ns).await.unwrap();
    assert_eq!(
        namespace
            .labels()
            .get(TENANT_NAMESPACE_LABEL)
            .map(String::as_str),
        Some("true")
    );

    // The Job succeeds: the claim becomes usable.
    finish_job(&client, ns, &v1.name, true).await;
    let ready = wait_for("Ready with the v1 claim", WAIT, || async {
        let t = tenant_status(&tenants, "acme").await?;
        (t.usable_tools_claim() == Some(v1.name.as_str())).then_some(t)
    })
    .await;
    let status = ready.status.clone().unwrap();
    assert_eq!(status.tools_version.as_deref(), Some("relay/tools:1"));
    assert_eq!(status.observed_generation, ready.metadata.generation);
    assert_eq!(condition(&ready, types::TOOLS_READY).unwrap().0, "True");
    assert_eq!(condition(&ready, types::READY).unwrap().0, "True");

    // Restarting the operator changes nothing: server-side apply of the same objects is a no-op
    // (same generation and spec; the tenant's status, transition times included, stays).
    let claim_before = claims.get(&v1.name).await.unwrap();
    let job_before = jobs.get(&v1.name).await.unwrap();
    let tenant_before = tenants.get("acme").await.unwrap();
    running.stop().await;
    let running = start_controller(&client, "relay/tools:1");
    wait_for("reconciles after the restart", WAIT, || async {
        (running.reconcile_count() >= 2).then_some(())
    })
    .await;
    let claim_after = claims.get(&v1.name).await.unwrap();
    assert_eq!(claim_after.spec, claim_before.spec);
    assert_eq!(claim_after.metadata.uid, claim_before.metadata.uid);
    let job_after = jobs.get(&v1.name).await.unwrap();
    assert_eq!(
        job_after.metadata.generation,
        job_before.metadata.generation
    );
    assert_eq!(job_after.spec, job_before.spec);
    assert_eq!(job_after.metadata.uid, job_before.metadata.uid);
    let tenant_after = tenants.get("acme").await.unwrap();
    assert_eq!(tenant_after.status, tenant_before.status);
    assert_eq!(
        tenant_after.metadata.generation,
        tenant_before.metadata.generation
    );

    // A pod mounts the v1 claim (it stays Pending: no kubelet).
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "user"},
        "spec": {
            "containers": [{"name": "c", "image": "busybox", "volumeMounts": [{"name": "t", "mountPath": "/relay"}]}],
            "volumes": [{"name": "t", "persistentVolumeClaim": {"claimName": v1.name, "readOnly": true}}],
        },
    }))
    .unwrap();
    let pods = Api::<Pod>::namespaced(client.clone(), ns);
    pods.create(&PostParams::default(), &pod).await.unwrap();

    // Version 2: a new claim and Job; pods keep the v1 claim until the Job succeeds.
    running.stop().await;
    let running = start_controller(&client, "relay/tools:2");
    let v2 = controller::tools_for(
        "acme",
        "relay/tools:2",
        &tenant.spec.volume_claim_template(),
    )
    .unwrap();
    assert_ne!(v1.name, v2.name);
    wait_for("the v2 tools Job", WAIT, || async {
        jobs.get_opt(&v2.name).await.unwrap()
    })
    .await;
    let upgrading = wait_for("ToolsJobRunning for v2", WAIT, || async {
        let t = tenant_status(&tenants, "acme").await?;
        let tools = condition(&t, types::TOOLS_READY)?;
        (tools.1 == reasons::TOOLS_JOB_RUNNING).then_some(t)
    })
    .await;
    assert_eq!(upgrading.usable_tools_claim(), Some(v1.name.as_str()));
    assert_eq!(condition(&upgrading, types::READY).unwrap().0, "True");
    assert!(claims.get_opt(&v1.name).await.unwrap().is_some());

    finish_job(&client, ns, &v2.name, true).await;
    wait_for("the switch to the v2 claim", WAIT, || async {
        let t = tenant_status(&tenants, "acme").await?;
        (t.usable_tools_claim() == Some(v2.name.as_str())).then_some(())
    })
    .await;
    // The v1 claim is superseded but mounted: it must survive reconciles past the grace period.
    wait_for("v1 marked superseded", WAIT, || async {
        let c = claims.get(&v1.name).await.ok()?;
        c.annotations()
            .contains_key(controller::SUPERSEDED_ANNOTATION)
            .then_some(())
    })
    .await;
    let seen = running.reconcile_count();
    wait_for("reconciles past the grace period", WAIT, || async {
        (running.reconcile_count() >= seen + 3).then_some(())
    })
    .await;
    let kept = claims.get(&v1.name).await.unwrap();
    assert!(
        kept.metadata.deletion_timestamp.is_none(),
        "a mounted claim was deleted"
    );
    assert!(jobs.get_opt(&v1.name).await.unwrap().is_some());

    // Once the pod is gone, the v1 claim and Job are collected; v2 stays.
    pods.delete("user", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    wait_for("v1 claim collected", WAIT, || async {
        let c = claims.get_opt(&v1.name).await.unwrap();
        c.is_none_or(|c| c.metadata.deletion_timestamp.is_some())
            .then_some(())
    })
    .await;
    wait_for("v1 Job collected", WAIT, || async {
        let j = jobs.get_opt(&v1.name).await.unwrap();
        j.is_none_or(|j| j.metadata.deletion_timestamp.is_some())
            .then_some(())
    })
    .await;
    let remaining: Vec<String> = owned_claims(&client, ns, &tenant)
        .await
        .iter()
        .map(|c| c.name_any())
        .collect();
    assert_eq!(remaining, std::slice::from_ref(&v2.name));

    // Deleting the tenant removes its claims and Jobs, then the tenant and the namespace label.
    tenants
        .delete("acme", &DeleteParams::default())
        .await
        .unwrap();
    wait_for("the tenant to be gone", WAIT, || async {
        tenants
            .get_opt("acme")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    assert!(owned_claims(&client, ns, &tenant).await.is_empty());
    let namespace = Api::<Namespace>::all(client.clone()).get(ns).await.unwrap();
    assert_eq!(namespace.labels().get(TENANT_NAMESPACE_LABEL), None);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_templates_and_failed_jobs_are_reported() {
    let Some(kube) = start_kube().await else {
        return;
    };
    let client = client(&kube).await;
    install_crd(&client).await;
    let ns = "bad";
    create_namespace(&client, ns).await;
    let tenants = Api::<Tenant>::namespaced(client.clone(), ns);
    let running = start_controller(&client, "relay/tools:1");

    // ReadWriteOnce: refused with a condition, nothing created.
    let rwo: Tenant = serde_json::from_value(json!({
        "apiVersion": "relay.sh/v1beta1", "kind": "Tenant",
        "metadata": {"name": "rwo"},
        "spec": {"entrypointInjection": {"volumeClaimTemplate": {
            "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "16Mi"}}}}},
    }))
    .unwrap();
    tenants.create(&PostParams::default(), &rwo).await.unwrap();
    let refused = wait_for("InvalidVolumeClaimTemplate", WAIT, || async {
        let t = tenant_status(&tenants, "rwo").await?;
        let tools = condition(&t, types::TOOLS_READY)?;
        (tools.1 == reasons::INVALID_VOLUME_CLAIM_TEMPLATE).then_some((t, tools.2))
    })
    .await;
    assert!(
        refused.1.contains("ReadOnlyMany") && refused.1.contains("ReadWriteOnce"),
        "{}",
        refused.1
    );
    assert_eq!(condition(&refused.0, types::READY).unwrap().0, "False");
    assert_eq!(
        refused.0.status.as_ref().unwrap().observed_generation,
        refused.0.metadata.generation
    );
    assert!(owned_claims(&client, ns, &refused.0).await.is_empty());
    let jobs = Api::<Job>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .unwrap();
    assert!(
        jobs.items.is_empty(),
        "a Job was created for an invalid tenant"
    );

    // Fixing the template (a new generation) lets it proceed.
    tenants
        .patch(
            "rwo",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"entrypointInjection": {"volumeClaimTemplate": {"accessModes": ["ReadOnlyMany"]}}}})),
        )
        .await
        .unwrap();
    let fixed = wait_for("the fixed tenant's Job", WAIT, || async {
        let t = tenant_status(&tenants, "rwo").await?;
        let tools = condition(&t, types::TOOLS_READY)?;
        (tools.1 == reasons::TOOLS_JOB_RUNNING).then_some(t)
    })
    .await;
    assert_eq!(fixed.status.as_ref().unwrap().observed_generation, Some(2));
    let tools =
        controller::tools_for("rwo", "relay/tools:1", &fixed.spec.volume_claim_template()).unwrap();

    // The Job fails: the condition carries the Job's reason.
    finish_job(&client, ns, &tools.name, false).await;
    let failed = wait_for("ToolsJobFailed", WAIT, || async {
        let t = tenant_status(&tenants, "rwo").await?;
        let tools = condition(&t, types::TOOLS_READY)?;
        (tools.1 == reasons::TOOLS_JOB_FAILED).then_some(tools.2)
    })
    .await;
    assert!(failed.contains("BackoffLimitExceeded"), "{failed}");
    running.stop().await;
}

//! The `Tenant` reconciler: one tools volume per tenant and tools version, filled by a Job.
//!
//! For each tenant the operator derives a *tools key* from the tools image reference and the
//! tenant's volume claim template. The key names a PersistentVolumeClaim and a Job in the tenant's
//! namespace (`<tenant>-tools-<key>`); the Job mounts the claim and runs `entrypoint install` from
//! the tools image. Both are created by server-side apply with an owner reference to the tenant, so
//! reconciling again, or after a restart, changes nothing.
//!
//! `status.toolsVolumeClaim` names the claim new pods mount. It moves to a new claim only once that
//! claim's Job has succeeded; until then pods keep getting the previous one. A claim that is no
//! longer current is marked superseded (annotation [`SUPERSEDED_ANNOTATION`]) and collected once
//! [`Config::collect_grace`] has passed and no pod that has not finished mounts it: a pod admitted
//! just before the switch may not be stored yet when the operator lists pods, and the grace covers
//! the webhook's timeout. Claims are never replaced in place: a PVC's spec is immutable, and a pod
//! may still be reading it.
//!
//! A finalizer deletes the tenant's Jobs and unused claims when the tenant is deleted; while a pod
//! still mounts one of its claims the tenant stays until that pod finishes. The namespace of every
//! tenant carries the label [`TENANT_NAMESPACE_LABEL`]`=true`, which is how the webhook's namespace
//! selector and the collector's `--namespace-selector` find tenant namespaces; it is removed with
//! the namespace's last tenant.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Container, Namespace, PersistentVolumeClaim, PersistentVolumeClaimSpec,
    PersistentVolumeClaimVolumeSource, Pod, PodSpec, PodTemplateSpec, SecurityContext, Volume,
    VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{self, finalizer};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use sha2::{Digest, Sha256};
use tracing::{debug, info, warn};

use crate::conditions;
use crate::crd::{Tenant, TenantStatus};
use crate::metrics::ControllerMetrics;
use crate::mutate::TOOLS_VOLUME;

/// Field manager of everything the operator applies.
pub const FIELD_MANAGER: &str = "relay-operator";
/// Finalizer that lets the operator clean up a deleted tenant's Jobs and claims.
pub const FINALIZER: &str = "relay.sh/tools-cleanup";
/// On tools claims and Jobs: the UID of the tenant they belong to (a UID always fits a label
/// value; a tenant name may not).
pub const TENANT_UID_LABEL: &str = "relay.sh/tenant-uid";
/// On tools claims and Jobs: the tools key.
pub const TOOLS_KEY_LABEL: &str = "relay.sh/tools-key";
/// On tools claims and Jobs: the tools image reference, in full.
pub const TOOLS_IMAGE_ANNOTATION: &str = "relay.sh/tools-image";
/// On a tools claim no longer current: when the operator first saw it superseded (RFC 3339).
pub const SUPERSEDED_ANNOTATION: &str = "relay.sh/superseded-at";
/// On namespaces holding a tenant, value `true`.
pub const TENANT_NAMESPACE_LABEL: &str = "relay.sh/tenant";
/// Where the tools Job mounts the claim; the same path pods see it at.
pub const JOB_MOUNT_PATH: &str = crate::mutate::TOOLS_MOUNT_PATH;

/// Longest Job name: Kubernetes copies it into the `job-name` label of the Job's pods.
const MAX_JOB_NAME: usize = 63;
/// Hex digits of the tools key.
const KEY_LEN: usize = 10;

/// What the reconciler needs to know besides the tenants.
#[derive(Debug, Clone)]
pub struct Config {
    /// The tools image reference (tag or digest); it holds the static entrypoint.
    pub tools_image: String,
    /// The command the tools Job runs in the tools image, e.g.
    /// `["/entrypoint", "install", "/relay/lib"]`.
    pub tools_command: Vec<String>,
    /// How long a superseded claim is kept at least, even when no pod mounts it.
    pub collect_grace: Duration,
    /// How often a tenant is reconciled without any change (drift, claims waiting to be
    /// collected).
    pub resync: Duration,
    /// Retries of the tools Job's pod before the Job fails.
    pub job_backoff_limit: i32,
    /// Deadline of the tools Job.
    pub job_deadline: Duration,
}

impl Config {
    /// Defaults for everything but the image.
    pub fn new(tools_image: impl Into<String>) -> Self {
        Self {
            tools_image: tools_image.into(),
            tools_command: ["/entrypoint", "install", "/relay/lib"]
                .map(str::to_owned)
                .to_vec(),
            collect_grace: Duration::from_secs(60),
            resync: Duration::from_secs(300),
            job_backoff_limit: 3,
            job_deadline: Duration::from_secs(600),
        }
    }
}

/// A reconcile that failed; the controller retries it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API call failed: {0}")]
    Kube(#[from] kube::Error),
    #[error("tenant has no namespace")]
    MissingNamespace,
    #[error("tenant has no UID yet")]
    MissingUid,
    #[error("tools claims still mounted by pods: {}", .0.join(", "))]
    ClaimsInUse(Vec<String>),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<finalizer::Error<Error>>),
    #[error("cannot represent an object: {0}")]
    Json(#[from] serde_json::Error),
}

/// Shared state of the reconciler.
#[derive(Clone)]
pub struct Context {
    pub client: Client,
    pub config: Config,
    pub recorder: Recorder,
    pub metrics: ControllerMetrics,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Context {
    /// A context whose events are reported as `relay-operator` by `instance` (the pod name).
    pub fn new(
        client: Client,
        config: Config,
        instance: Option<String>,
        metrics: ControllerMetrics,
    ) -> Self {
        let reporter = Reporter {
            controller: FIELD_MANAGER.to_owned(),
            instance,
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            config,
            metrics,
        }
    }
}

/// The tools claim and Job a tenant should have for the configured tools image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tools {
    /// Name of both the claim and the Job.
    pub name: String,
    /// Hash of the tools image and the claim template.
    pub key: String,
}

/// The tools key and object names for `tenant_name`, the image and the claim template.
///
/// A new image or a new template gives a new key, hence a new claim: a PVC's spec cannot change.
pub fn tools_for(
    tenant_name: &str,
    tools_image: &str,
    template: &PersistentVolumeClaimSpec,
) -> Result<Tools, serde_json::Error> {
    let mut hasher = Sha256::new();
    hasher.update(tools_image.as_bytes());
    hasher.update([0]);
    hasher.update(serde_json::to_vec(template)?);
    let digest = hasher.finalize();
    let key: String = digest
        .iter()
        .flat_map(|b| [b >> 4, b & 0xf])
        .take(KEY_LEN)
        .map(|n| char::from_digit(u32::from(n), 16).unwrap_or('0'))
        .collect();
    let suffix = format!("-tools-{key}");
    let room = MAX_JOB_NAME - suffix.len();
    // A tenant name is a DNS subdomain: cutting it may leave a trailing `-` or `.`, which a DNS
    // label may not end with.
    let prefix = tenant_name[..tenant_name.len().min(room)].trim_end_matches(['-', '.']);
    Ok(Tools {
        name: format!("{prefix}{suffix}"),
        key,
    })
}

/// Where a tools Job stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobState {
    Running,
    Succeeded,
    /// The Job's `Failed` condition: reason and message.
    Failed(String),
}

/// Reads a Job's state from its conditions and counters, as the Job controller reports it.
pub fn job_state(job: &Job) -> JobState {
    let status = job.status.as_ref();
    let conditions = status.and_then(|s| s.conditions.as_deref()).unwrap_or(&[]);
    let holds = |type_: &str| {
        conditions
            .iter()
            .find(|c| c.type_ == type_ && c.status == conditions::status::TRUE)
    };
    if holds("Complete").is_some() || status.and_then(|s| s.succeeded).unwrap_or(0) > 0 {
        return JobState::Succeeded;
    }
    if let Some(failed) = holds("Failed") {
        let reason = failed.reason.as_deref().unwrap_or("Failed");
        let message = failed.message.as_deref().unwrap_or("");
        return JobState::Failed(if message.is_empty() {
            reason.to_owned()
        } else {
            format!("{reason}: {message}")
        });
    }
    JobState::Running
}

fn owner_reference(tenant: &Tenant) -> Option<OwnerReference> {
    let mut owner = tenant.controller_owner_ref(&())?;
    owner.block_owner_deletion = Some(true);
    Some(owner)
}

fn child_meta(tenant: &Tenant, tools: &Tools, image: &str) -> Result<ObjectMeta, Error> {
    let uid = tenant.uid().ok_or(Error::MissingUid)?;
    Ok(ObjectMeta {
        name: Some(tools.name.clone()),
        namespace: tenant.namespace(),
        labels: Some(BTreeMap::from([
            (TENANT_UID_LABEL.to_owned(), uid),
            (TOOLS_KEY_LABEL.to_owned(), tools.key.clone()),
            (
                "app.kubernetes.io/managed-by".to_owned(),
                FIELD_MANAGER.to_owned(),
            ),
        ])),
        annotations: Some(BTreeMap::from([(
            TOOLS_IMAGE_ANNOTATION.to_owned(),
            image.to_owned(),
        )])),
        owner_references: owner_reference(tenant).map(|o| vec![o]),
        ..ObjectMeta::default()
    })
}

/// The tools claim: the tenant's template under the tools name.
pub fn tools_claim(
    tenant: &Tenant,
    tools: &Tools,
    config: &Config,
) -> Result<PersistentVolumeClaim, Error> {
    Ok(PersistentVolumeClaim {
        metadata: child_meta(tenant, tools, &config.tools_image)?,
        spec: Some(tenant.spec.volume_claim_template()),
        status: None,
    })
}

/// The Job that installs the entrypoint into the tools claim.
pub fn tools_job(tenant: &Tenant, tools: &Tools, config: &Config) -> Result<Job, Error> {
    let metadata = child_meta(tenant, tools, &config.tools_image)?;
    let container = Container {
        name: "install".to_owned(),
        image: Some(config.tools_image.clone()),
        command: Some(config.tools_command.clone()),
        volume_mounts: Some(vec![VolumeMount {
            name: TOOLS_VOLUME.to_owned(),
            mount_path: JOB_MOUNT_PATH.to_owned(),
            ..VolumeMount::default()
        }]),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(k8s_openapi::api::core::v1::Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                add: None,
            }),
            ..SecurityContext::default()
        }),
        ..Container::default()
    };
    let pod_labels = metadata.labels.clone();
    Ok(Job {
        metadata,
        spec: Some(JobSpec {
            backoff_limit: Some(config.job_backoff_limit),
            active_deadline_seconds: Some(
                i64::try_from(config.job_deadline.as_secs()).unwrap_or(i64::MAX),
            ),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: pod_labels,
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    restart_policy: Some("Never".to_owned()),
                    automount_service_account_token: Some(false),
                    enable_service_links: Some(false),
                    containers: vec![container],
                    volumes: Some(vec![Volume {
                        name: TOOLS_VOLUME.to_owned(),
                        persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                            claim_name: tools.name.clone(),
                            read_only: Some(false),
                        }),
                        ..Volume::default()
                    }]),
                    ..PodSpec::default()
                }),
            },
            ..JobSpec::default()
        }),
        status: None,
    })
}

/// The status a tenant should have, given its current status and where the tools Job stands.
/// `job` is `None` when the spec is invalid (`invalid` says why).
pub fn next_status(
    tenant: &Tenant,
    tools: Option<(&Tools, JobState)>,
    invalid: Option<String>,
    image: &str,
    now: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time,
) -> TenantStatus {
    let generation = tenant.metadata.generation;
    let mut status = tenant.status.clone().unwrap_or_default();
    let tools_condition = match (invalid, tools) {
        (Some(message), _) => {
            conditions::invalid_volume_claim_template(generation, message, now.clone())
        }
        (None, Some((tools, JobState::Succeeded))) => {
            status.tools_volume_claim = Some(tools.name.clone());
            status.tools_version = Some(image.to_owned());
            conditions::tools_ready(generation, &tools.name, image, now.clone())
        }
        (None, Some((tools, JobState::Running))) => {
            conditions::tools_job_running(generation, &tools.name, image, now.clone())
        }
        (None, Some((tools, JobState::Failed(why)))) => conditions::tools_job_failed(
            generation,
            format!("Job {} installing tools {image} failed: {why}", tools.name),
            now.clone(),
        ),
        (None, None) => conditions::tools_job_running(generation, "", image, now.clone()),
    };
    // Pods are injected as long as some claim is usable, even while a newer version installs or
    // after it failed: `Ready` says whether pods created now get the entrypoint.
    let ready = if let Some(claim) = &status.tools_volume_claim {
        conditions::ready(generation, claim, now)
    } else {
        conditions::not_ready(generation, &tools_condition, now)
    };
    let merged = conditions::set_condition(status.conditions, tools_condition);
    status.conditions = conditions::set_condition(merged, ready);
    status.observed_generation = generation;
    status
}

/// Whether a pod that has not finished mounts `claim`. The tools Jobs' own pods don't count: they
/// go with their Job, which is deleted with the claim.
fn mounts(pod: &Pod, claim: &str) -> bool {
    if pod.labels().contains_key(TENANT_UID_LABEL) {
        return false;
    }
    let finished = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|phase| phase == "Succeeded" || phase == "Failed");
    !finished
        && pod
            .spec
            .as_ref()
            .and_then(|s| s.volumes.as_ref())
            .is_some_and(|volumes| {
                volumes.iter().any(|v| {
                    v.persistent_volume_claim
                        .as_ref()
                        .is_some_and(|c| c.claim_name == claim)
                })
            })
}

fn tenant_selector(tenant: &Tenant) -> Result<ListParams, Error> {
    let uid = tenant.uid().ok_or(Error::MissingUid)?;
    Ok(ListParams::default().labels(&format!("{TENANT_UID_LABEL}={uid}")))
}

/// Runs the controller until `shutdown` resolves.
pub async fn run(ctx: Arc<Context>, shutdown: impl Future<Output = ()> + Send + Sync + 'static) {
    let client = ctx.client.clone();
    let tenants = Api::<Tenant>::all(client.clone());
    let claims = Api::<PersistentVolumeClaim>::all(client.clone());
    let jobs = Api::<Job>::all(client);
    let managed = watcher::Config::default().labels(TENANT_UID_LABEL);
    Controller::new(tenants, watcher::Config::default())
        .owns(claims, managed.clone())
        .owns(jobs, managed)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((object, _)) => debug!(tenant = %object.name, "reconciled"),
                Err(e) => debug!(error = %e, "reconcile failed"),
            }
        })
        .await;
}

async fn reconcile(tenant: Arc<Tenant>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let namespace = tenant.namespace().ok_or(Error::MissingNamespace)?;
    let api = Api::<Tenant>::namespaced(ctx.client.clone(), &namespace);
    let result = finalizer(&api, FINALIZER, tenant, |event| async {
        match event {
            finalizer::Event::Apply(tenant) => apply(&tenant, &ctx).await,
            finalizer::Event::Cleanup(tenant) => cleanup(&tenant, &ctx).await,
        }
    })
    .await
    .map_err(|e| match e {
        finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => e,
        other => Error::Finalizer(Box::new(other)),
    });
    ctx.metrics.observe(result.is_ok(), started.elapsed());
    result
}

fn error_policy(tenant: Arc<Tenant>, error: &Error, _ctx: Arc<Context>) -> Action {
    match error {
        Error::ClaimsInUse(claims) => {
            info!(tenant = %tenant.name_any(), ?claims, "deleted tenant waits for pods to release its tools claims");
            Action::requeue(Duration::from_secs(15))
        }
        _ => {
            warn!(tenant = %tenant.name_any(), error = %error, "reconcile failed; retrying");
            Action::requeue(Duration::from_secs(10))
        }
    }
}

async fn apply(tenant: &Tenant, ctx: &Context) -> Result<Action, Error> {
    let namespace = tenant.namespace().ok_or(Error::MissingNamespace)?;
    let client = &ctx.client;
    let config = &ctx.config;
    let params = PatchParams::apply(FIELD_MANAGER).force();
    label_namespace(client, &namespace, true).await?;

    let template = tenant.spec.volume_claim_template();
    let (tools_state, invalid, keep) = match tenant.spec.validate() {
        Err(invalid) => (None, Some(invalid.to_string()), Vec::new()),
        Ok(()) => {
            let tools = tools_for(&tenant.name_any(), &config.tools_image, &template)?;
            let claims = Api::<PersistentVolumeClaim>::namespaced(client.clone(), &namespace);
            let jobs = Api::<Job>::namespaced(client.clone(), &namespace);
            claims
                .patch(
                    &tools.name,
                    &params,
                    &Patch::Apply(tools_claim(tenant, &tools, config)?),
                )
                .await?;
            let job = jobs
                .patch(
                    &tools.name,
                    &params,
                    &Patch::Apply(tools_job(tenant, &tools, config)?),
                )
                .await?;
            let state = job_state(&job);
            let keep = vec![tools.name.clone()];
            (Some((tools, state)), None, keep)
        }
    };

    let status = next_status(
        tenant,
        tools_state.as_ref().map(|(t, s)| (t, s.clone())),
        invalid.clone(),
        &config.tools_image,
        conditions::now(),
    );
    if tenant.status.as_ref() != Some(&status) {
        publish_transitions(tenant, &status, ctx).await;
        let api = Api::<Tenant>::namespaced(client.clone(), &namespace);
        api.patch_status(
            &tenant.name_any(),
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": status })),
        )
        .await?;
    }

    let mut keep = keep;
    keep.extend(status.tools_volume_claim.clone());
    let pending = collect(tenant, &keep, ctx).await?;
    Ok(match (&tools_state, pending) {
        (Some((_, JobState::Running)), _) | (_, true) => {
            Action::requeue(config.collect_grace.min(Duration::from_secs(30)))
        }
        _ => Action::requeue(config.resync),
    })
}

/// Events for condition changes a tenant's owner cares about.
async fn publish_transitions(tenant: &Tenant, next: &TenantStatus, ctx: &Context) {
    let before = tenant.status.clone().unwrap_or_default();
    let tools_before = conditions::find(&before.conditions, conditions::types::TOOLS_READY);
    let Some(tools_now) = conditions::find(&next.conditions, conditions::types::TOOLS_READY) else {
        return;
    };
    if tools_before.is_some_and(|c| c.reason == tools_now.reason && c.message == tools_now.message)
    {
        return;
    }
    let type_ = if tools_now.status == conditions::status::TRUE
        || tools_now.reason == conditions::reasons::TOOLS_JOB_RUNNING
    {
        EventType::Normal
    } else {
        EventType::Warning
    };
    publish(
        ctx,
        tenant,
        type_,
        &tools_now.reason,
        tools_now.message.clone(),
        "Reconcile",
    )
    .await;
}

/// Publishes an Event about `tenant`; failing to is logged, never fatal.
pub async fn publish(
    ctx: &Context,
    tenant: &Tenant,
    type_: EventType,
    reason: &str,
    note: String,
    action: &str,
) {
    let event = Event {
        type_,
        reason: reason.to_owned(),
        note: Some(note),
        action: action.to_owned(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &tenant.object_ref(&())).await {
        warn!(tenant = %tenant.name_any(), error = %e, "cannot publish event");
    }
}

/// Collects the tenant's tools claims other than `keep`. Returns whether some remain (superseded
/// too recently, or mounted).
async fn collect(tenant: &Tenant, keep: &[String], ctx: &Context) -> Result<bool, Error> {
    let namespace = tenant.namespace().ok_or(Error::MissingNamespace)?;
    let claims = Api::<PersistentVolumeClaim>::namespaced(ctx.client.clone(), &namespace);
    let owned = claims.list(&tenant_selector(tenant)?).await?;
    let old: Vec<PersistentVolumeClaim> = owned
        .into_iter()
        .filter(|c| !keep.contains(&c.name_any()) && c.metadata.deletion_timestamp.is_none())
        .collect();
    if old.is_empty() {
        return Ok(false);
    }
    let now = Timestamp::now();
    let grace = k8s_openapi::jiff::SignedDuration::try_from(ctx.config.collect_grace)
        .unwrap_or(k8s_openapi::jiff::SignedDuration::MAX);
    let mut pending = false;
    let mut pods: Option<Vec<Pod>> = None;
    for claim in old {
        let name = claim.name_any();
        let superseded = claim
            .annotations()
            .get(SUPERSEDED_ANNOTATION)
            .and_then(|t| t.parse::<Timestamp>().ok());
        let Some(superseded) = superseded else {
            claims
                .patch(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {"annotations": {SUPERSEDED_ANNOTATION: now.to_string()}}})),
                )
                .await?;
            pending = true;
            continue;
        };
        if now.duration_since(superseded) < grace {
            pending = true;
            continue;
        }
        if pods.is_none() {
            let api = Api::<Pod>::namespaced(ctx.client.clone(), &namespace);
            pods = Some(api.list(&ListParams::default()).await?.items);
        }
        if pods.iter().flatten().any(|pod| mounts(pod, &name)) {
            debug!(claim = %name, "superseded tools claim still mounted");
            pending = true;
            continue;
        }
        delete_tools(ctx, &namespace, &name).await?;
        info!(tenant = %tenant.name_any(), claim = %name, "collected superseded tools claim");
        publish(
            ctx,
            tenant,
            EventType::Normal,
            "ToolsVolumeCollected",
            format!("deleted superseded tools PersistentVolumeClaim {name} and its Job"),
            "Collect",
        )
        .await;
    }
    Ok(pending)
}

/// Deletes a tools Job (with its pods) and claim; either being gone already is fine.
async fn delete_tools(ctx: &Context, namespace: &str, name: &str) -> Result<(), Error> {
    let jobs = Api::<Job>::namespaced(ctx.client.clone(), namespace);
    let claims = Api::<PersistentVolumeClaim>::namespaced(ctx.client.clone(), namespace);
    let background = DeleteParams::background();
    ignore_not_found(jobs.delete(name, &background).await.map(|_| ()))?;
    ignore_not_found(claims.delete(name, &background).await.map(|_| ()))?;
    Ok(())
}

fn ignore_not_found(result: Result<(), kube::Error>) -> Result<(), kube::Error> {
    match result {
        Err(kube::Error::Api(status)) if status.is_not_found() => Ok(()),
        other => other,
    }
}

async fn cleanup(tenant: &Tenant, ctx: &Context) -> Result<Action, Error> {
    let namespace = tenant.namespace().ok_or(Error::MissingNamespace)?;
    let claims = Api::<PersistentVolumeClaim>::namespaced(ctx.client.clone(), &namespace);
    let owned = claims.list(&tenant_selector(tenant)?).await?;
    let pods = Api::<Pod>::namespaced(ctx.client.clone(), &namespace)
        .list(&ListParams::default())
        .await?
        .items;
    let mut in_use = Vec::new();
    for claim in owned {
        let name = claim.name_any();
        if pods.iter().any(|pod| mounts(pod, &name)) {
            in_use.push(name);
        } else {
            delete_tools(ctx, &namespace, &name).await?;
        }
    }
    if !in_use.is_empty() {
        return Err(Error::ClaimsInUse(in_use));
    }
    let tenants = Api::<Tenant>::namespaced(ctx.client.clone(), &namespace)
        .list(&ListParams::default())
        .await?;
    let others = tenants
        .iter()
        .any(|t| t.uid() != tenant.uid() && t.metadata.deletion_timestamp.is_none());
    if !others {
        label_namespace(&ctx.client, &namespace, false).await?;
    }
    info!(tenant = %tenant.name_any(), namespace, "cleaned up deleted tenant");
    Ok(Action::await_change())
}

/// Sets (`on`) or releases the namespace's tenant label through the operator's own field
/// manager, so labels set by others are left alone.
async fn label_namespace(client: &Client, namespace: &str, on: bool) -> Result<(), Error> {
    let api = Api::<Namespace>::all(client.clone());
    let labels = if on {
        json!({ TENANT_NAMESPACE_LABEL: "true" })
    } else {
        json!({})
    };
    let patch = json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": { "name": namespace, "labels": labels },
    });
    api.patch(
        namespace,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(patch),
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{EntrypointInjection, TenantSpec, default_volume_claim_template};
    use k8s_openapi::api::batch::v1::{JobCondition, JobStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn tenant(name: &str) -> Tenant {
        let mut t = Tenant::new(name, TenantSpec::default());
        t.metadata.namespace = Some("ns".to_owned());
        t.metadata.uid = Some("0b7a3c1e-0000-4000-8000-000000000001".to_owned());
        t.metadata.generation = Some(3);
        t
    }

    fn at(s: i64) -> Time {
        Time(Timestamp::from_second(s).unwrap())
    }

    #[test]
    fn tools_key_changes_with_image_and_template_only() {
        let template = default_volume_claim_template();
        let a = tools_for("acme", "relay/tools:1", &template).unwrap();
        assert_eq!(a, tools_for("acme", "relay/tools:1", &template).unwrap());
        assert_eq!(a.key.len(), KEY_LEN);
        assert!(a.name.starts_with("acme-tools-"));
        let b = tools_for("acme", "relay/tools:2", &template).unwrap();
        assert_ne!(a.key, b.key);
        let other_class = PersistentVolumeClaimSpec {
            storage_class_name: Some("nfs".to_owned()),
            ..template.clone()
        };
        assert_ne!(
            a.key,
            tools_for("acme", "relay/tools:1", &other_class)
                .unwrap()
                .key
        );
        assert_eq!(
            a.key,
            tools_for("other", "relay/tools:1", &template).unwrap().key
        );
    }

    #[test]
    fn long_tenant_names_give_valid_job_names() {
        let template = default_volume_claim_template();
        for name in [
            "a".repeat(253),
            format!("{}-{}", "b".repeat(45), "c".repeat(20)),
            "x.y".repeat(30),
        ] {
            let tools = tools_for(&name, "img", &template).unwrap();
            assert!(tools.name.len() <= MAX_JOB_NAME, "{}", tools.name);
            let first = tools.name.split("-tools-").next().unwrap();
            assert!(
                !first.ends_with('-') && !first.ends_with('.'),
                "{}",
                tools.name
            );
            assert!(tools.name.ends_with(&tools.key));
        }
    }

    fn job(conditions: Vec<(&str, &str, &str)>, succeeded: Option<i32>) -> Job {
        Job {
            status: Some(JobStatus {
                succeeded,
                conditions: Some(
                    conditions
                        .into_iter()
                        .map(|(t, s, r)| JobCondition {
                            type_: t.to_owned(),
                            status: s.to_owned(),
                            reason: Some(r.to_owned()),
                            message: Some("Job has reached the specified backoff limit".to_owned()),
                            ..JobCondition::default()
                        })
                        .collect(),
                ),
                ..JobStatus::default()
            }),
            ..Job::default()
        }
    }

    #[test]
    fn job_states() {
        assert_eq!(job_state(&Job::default()), JobState::Running);
        assert_eq!(job_state(&job(vec![], None)), JobState::Running);
        assert_eq!(
            job_state(&job(vec![("Complete", "True", "")], Some(1))),
            JobState::Succeeded
        );
        assert_eq!(job_state(&job(vec![], Some(1))), JobState::Succeeded);
        assert_eq!(
            job_state(&job(vec![("Failed", "True", "BackoffLimitExceeded")], None)),
            JobState::Failed(
                "BackoffLimitExceeded: Job has reached the specified backoff limit".to_owned()
            )
        );
        assert_eq!(
            job_state(&job(vec![("Failed", "False", "x")], None)),
            JobState::Running
        );
    }

    #[test]
    fn status_switches_claim_only_when_the_job_succeeded() {
        let template = default_volume_claim_template();
        let old = tools_for("acme", "tools:1", &template).unwrap();
        let new = tools_for("acme", "tools:2", &template).unwrap();
        let mut t = tenant("acme");

        let first = next_status(&t, Some((&old, JobState::Running)), None, "tools:1", at(1));
        assert_eq!(first.tools_volume_claim, None);
        let ready = conditions::find(&first.conditions, conditions::types::READY).unwrap();
        assert_eq!(ready.status, "False");
        assert_eq!(ready.reason, conditions::reasons::TOOLS_JOB_RUNNING);
        assert_eq!(first.observed_generation, Some(3));

        t.status = Some(first);
        let done = next_status(
            &t,
            Some((&old, JobState::Succeeded)),
            None,
            "tools:1",
            at(2),
        );
        assert_eq!(done.tools_volume_claim.as_deref(), Some(old.name.as_str()));
        assert_eq!(done.tools_version.as_deref(), Some("tools:1"));
        let ready = conditions::find(&done.conditions, conditions::types::READY).unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.last_transition_time.clone()),
            ("True", at(2))
        );

        t.status = Some(done);
        for state in [
            JobState::Running,
            JobState::Failed("BackoffLimitExceeded".to_owned()),
        ] {
            let upgrading = next_status(&t, Some((&new, state.clone())), None, "tools:2", at(3));
            assert_eq!(
                upgrading.tools_volume_claim.as_deref(),
                Some(old.name.as_str()),
                "{state:?}"
            );
            assert_eq!(upgrading.tools_version.as_deref(), Some("tools:1"));
            let tools =
                conditions::find(&upgrading.conditions, conditions::types::TOOLS_READY).unwrap();
            assert_eq!(tools.status, "False");
            let ready = conditions::find(&upgrading.conditions, conditions::types::READY).unwrap();
            assert_eq!(
                (ready.status.as_str(), ready.last_transition_time.clone()),
                ("True", at(2))
            );
        }
    }

    #[test]
    fn invalid_template_sets_the_condition_and_keeps_the_claim() {
        let mut t = tenant("acme");
        t.spec = TenantSpec {
            entrypoint_injection: Some(EntrypointInjection {
                volume_claim_template: Some(PersistentVolumeClaimSpec {
                    access_modes: Some(vec!["ReadWriteOnce".to_owned()]),
                    ..default_volume_claim_template()
                }),
            }),
        };
        let message = t.spec.validate().unwrap_err().to_string();
        let status = next_status(&t, None, Some(message.clone()), "tools:1", at(1));
        let tools = conditions::find(&status.conditions, conditions::types::TOOLS_READY).unwrap();
        assert_eq!(
            tools.reason,
            conditions::reasons::INVALID_VOLUME_CLAIM_TEMPLATE
        );
        assert_eq!(tools.message, message);
        assert!(message.contains("ReadWriteOnce"), "{message}");
        let ready = conditions::find(&status.conditions, conditions::types::READY).unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", tools.reason.as_str())
        );
        assert_eq!(status.tools_volume_claim, None);
    }

    #[test]
    fn finished_pods_do_not_hold_claims() {
        let pod = |phase: Option<&str>, claim: &str| -> Pod {
            serde_json::from_value(json!({
                "metadata": {"name": "p"},
                "spec": {"containers": [{"name": "c"}], "volumes": [{"name": "v", "persistentVolumeClaim": {"claimName": claim}}]},
                "status": phase.map(|p| json!({"phase": p})).unwrap_or(json!({})),
            }))
            .unwrap()
        };
        assert!(mounts(&pod(None, "a"), "a"));
        assert!(mounts(&pod(Some("Running"), "a"), "a"));
        assert!(mounts(&pod(Some("Pending"), "a"), "a"));
        assert!(!mounts(&pod(Some("Succeeded"), "a"), "a"));
        assert!(!mounts(&pod(Some("Failed"), "a"), "a"));
        assert!(!mounts(&pod(None, "b"), "a"));
        let mut installer = pod(Some("Running"), "a");
        installer
            .labels_mut()
            .insert(TENANT_UID_LABEL.to_owned(), "u".to_owned());
        assert!(!mounts(&installer, "a"));
    }

    #[test]
    fn job_mounts_the_claim_and_runs_install() {
        let t = tenant("acme");
        let config = Config::new("relay/tools@sha256:abc");
        let tools =
            tools_for("acme", &config.tools_image, &t.spec.volume_claim_template()).unwrap();
        let job = tools_job(&t, &tools, &config).unwrap();
        let spec = job.spec.unwrap().template.spec.unwrap();
        let c = &spec.containers[0];
        assert_eq!(c.image.as_deref(), Some("relay/tools@sha256:abc"));
        assert_eq!(
            c.command.as_ref().unwrap(),
            &["/entrypoint", "install", "/relay/lib"]
        );
        assert_eq!(c.volume_mounts.as_ref().unwrap()[0].mount_path, "/relay");
        let claim = spec.volumes.unwrap()[0]
            .persistent_volume_claim
            .clone()
            .unwrap();
        assert_eq!(claim.claim_name, tools.name);
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
        let owner = &job.metadata.owner_references.unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.controller),
            ("Tenant", Some(true))
        );
        assert_eq!(
            job.metadata
                .labels
                .unwrap()
                .get(TENANT_UID_LABEL)
                .map(String::as_str),
            t.metadata.uid.as_deref()
        );
    }
}

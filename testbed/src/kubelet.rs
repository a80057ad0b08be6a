//! One node's kubelet (and, where asked, its scheduler and Job controller) for end-to-end tests:
//! pods of the [`KubeApi`] bound to the node run on the [`Cri`]'s containerd as a kubelet would
//! run them, and their status goes back to the API server.
//!
//! [`Kubelet::start`] registers a Ready Node and starts a thread that polls the node's pods. Each
//! pod gets a thread of its own that:
//! - makes its volumes as host directories under the kubelet's root: `emptyDir` (per pod),
//!   `persistentVolumeClaim` (per claim, shared by every pod of the claim and kept while the
//!   kubelet lives: [`Kubelet::pvc_dir`]), `hostPath`, `configMap`, `secret`, `downwardAPI` and
//!   `projected` ones (a `serviceAccountToken` source holds a token from the TokenRequest API,
//!   bound to the pod);
//! - runs a sandbox under the cgroup parent `/kubepods/burstable/pod<uid>` (host network: there is
//!   no CNI), then the init containers one after the other, each to completion, then the
//!   containers, with command, args, environment (`$(VAR)` references, `envFrom`, `fieldRef`,
//!   config map and secret keys), working directory, user and volume mounts as stored in the pod;
//! - writes the pod's status after each step (phase, `containerID: containerd://<id>`, running and
//!   terminated states with exit codes), so a container's id is in the status right after it
//!   starts;
//! - when the pod is deleted, stops and removes its containers and sandbox and finalizes the
//!   deletion (grace 0).
//!
//! Not like a kubelet: containers never restart (whatever the restart policy, the pod ends
//! `Succeeded` when all containers exit 0, else `Failed`); no probes, resources, image pulls
//! (image names map to images imported into containerd, see [`KubeletOptions::image`] and
//! [`crate::images`]), Services' environment variables, token refresh or pod networking
//! (`podIP` is the node's 127.0.0.1).
//!
//! Scheduling is opt-in ([`KubeletOptions::schedule_namespace`],
//! [`KubeletOptions::schedule_label`]): only matching pods without a node are bound to this node.
//! With the Job controller off, [`Kubelet::run_job`] plays it for one Job, and
//! [`KubeletOptions::run_jobs`] for every Job in the scheduled namespaces.
//!
//! ```no_run
//! use std::{sync::Arc, time::Duration};
//! use testbed::{cri::{BUSYBOX_IMAGE, Cri}, kube::KubeApi, kubelet::{Kubelet, KubeletOptions}};
//!
//! let Some(kube) = KubeApi::start_or_skip() else { return };
//! let Some(cri) = Cri::start_or_skip() else { return };
//! let options = KubeletOptions::new()
//!     .schedule_namespace("default")
//!     .image("busybox", BUSYBOX_IMAGE);
//! let kubelet = Kubelet::start(&kube, Arc::new(cri), "node-1", options).unwrap();
//! // ... create pod `web` in `default` through the API server, then:
//! let pod = kubelet
//!     .wait_pod("default", "web", Duration::from_secs(60), |p| p["status"]["phase"] == "Succeeded")
//!     .unwrap();
//! let logs = kubelet.logs("default", "web", "app").unwrap();
//! ```

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fs,
    path::{Component, Path, PathBuf},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, bail, ensure};
use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
use serde_json::{Value, json};
use tempfile::TempDir;

use crate::{
    cri::{Container, ContainerSpec, ContainerState, Cri, Logs, Pod, PodSpec},
    kube::KubeApi,
};

/// How often the node's pods are listed by default.
const POLL: Duration = Duration::from_millis(200);

/// How often a pod's containers are looked at while they run.
const CONTAINER_POLL: Duration = Duration::from_millis(50);

/// How often the Node's Ready condition is renewed (the node lifecycle controller's grace period
/// is 40 s).
const HEARTBEAT: Duration = Duration::from_secs(10);

/// How long an exited container's log may take to be closed.
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

/// The longest a deleted pod's containers get to stop after SIGTERM.
const MAX_GRACE: Duration = Duration::from_secs(5);

/// The address the node and its (host-network) pods have.
const NODE_IP: &str = "127.0.0.1";

/// What a [`Kubelet`] does besides running its node's pods.
#[derive(Debug, Clone, Default)]
pub struct KubeletOptions {
    schedule_namespaces: Vec<String>,
    schedule_labels: Vec<(String, String)>,
    images: HashMap<String, String>,
    run_jobs: bool,
    poll: Option<Duration>,
}

impl KubeletOptions {
    /// Binds no pod (only pods with `spec.nodeName` set to the node run), runs no Job by itself,
    /// passes image names through unchanged, polls every 200 ms.
    pub fn new() -> Self {
        Self::default()
    }

    /// Also binds pods without a node in namespace `namespace` to this node, as the scheduler would.
    #[must_use]
    pub fn schedule_namespace(mut self, namespace: impl Into<String>) -> Self {
        self.schedule_namespaces.push(namespace.into());
        self
    }

    /// Also binds pods without a node labelled `key=value` (any namespace) to this node.
    #[must_use]
    pub fn schedule_label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.schedule_labels.push((key.into(), value.into()));
        self
    }

    /// Runs containers whose pod names image `name` with the imported image `local` instead.
    #[must_use]
    pub fn image(mut self, name: impl Into<String>, local: impl Into<String>) -> Self {
        self.images.insert(name.into(), local.into());
        self
    }

    /// Runs every Job that appears in the [scheduled namespaces](Self::schedule_namespace) as
    /// [`Kubelet::run_job`] does (start the API server without the Job controller).
    #[must_use]
    pub fn run_jobs(mut self, on: bool) -> Self {
        self.run_jobs = on;
        self
    }

    /// Lists the node's pods every `interval`.
    #[must_use]
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll = Some(interval);
        self
    }
}

/// How a Job run by [`Kubelet::run_job`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobOutcome {
    /// The pod that ran the Job's template.
    pub pod: String,
    /// Whether the pod succeeded (the Job is then `Complete`, else `Failed`).
    pub succeeded: bool,
}

/// A running node: its Node object, the thread that runs its pods, its volumes' directories.
/// Dropping it stops the thread and removes the pods' containers and sandboxes (the pod objects
/// stay) and the directories.
#[derive(Debug)]
pub struct Kubelet {
    ctx: Arc<Ctx>,
    thread: Option<JoinHandle<()>>,
}

/// What the threads share.
#[derive(Debug)]
struct Ctx {
    api: Api,
    cri: Arc<Cri>,
    node: String,
    options: KubeletOptions,
    root: TempDir,
    stop: AtomicBool,
    /// `(namespace, pod, container)` → CRI log file.
    logs: Mutex<HashMap<(String, String, String), PathBuf>>,
    /// What went wrong in the pods' threads, for tests to show.
    errors: Mutex<Vec<String>>,
}

impl Kubelet {
    /// Registers Node `node` (Ready, address 127.0.0.1) unless it exists, and starts running the
    /// pods bound to it on `cri`.
    ///
    /// Fails when the Node cannot be registered or the kubelet's directory cannot be made.
    pub fn start(
        kube: &KubeApi,
        cri: Arc<Cri>,
        node: &str,
        options: KubeletOptions,
    ) -> anyhow::Result<Self> {
        let api = Api {
            base: kube.url().to_owned(),
            http: kube.client()?,
        };
        let root = tempfile::Builder::new()
            .prefix("relay-kubelet-")
            .tempdir()
            .context("cannot create the kubelet's directory")?;
        let ctx = Arc::new(Ctx {
            api,
            cri,
            node: node.to_owned(),
            options,
            root,
            stop: AtomicBool::new(false),
            logs: Mutex::new(HashMap::new()),
            errors: Mutex::new(Vec::new()),
        });
        ctx.register_node()?;
        let thread = {
            let ctx = Arc::clone(&ctx);
            thread::Builder::new()
                .name(format!("kubelet-{node}"))
                .spawn(move || ctx.main_loop())
                .context("cannot start the kubelet thread")?
        };
        Ok(Self {
            ctx,
            thread: Some(thread),
        })
    }

    /// The node's name.
    pub fn node_name(&self) -> &str {
        &self.ctx.node
    }

    /// The kubelet's directory: `pvc/<namespace>/<claim>` and `pods/<uid>/volumes/<volume>`.
    pub fn root(&self) -> &Path {
        self.ctx.root.path()
    }

    /// The host directory of PersistentVolumeClaim `claim` in `namespace` (made when a pod first
    /// mounts it; tests may fill it before).
    pub fn pvc_dir(&self, namespace: &str, claim: &str) -> PathBuf {
        self.ctx.pvc_dir(namespace, claim)
    }

    /// What container `container` of pod `pod` in `namespace` has logged so far (its CRI log,
    /// which stays after the pod is removed).
    ///
    /// Fails when the container was never created here or its log cannot be read.
    pub fn logs(&self, namespace: &str, pod: &str, container: &str) -> anyhow::Result<Logs> {
        let key = (namespace.to_owned(), pod.to_owned(), container.to_owned());
        let path = lock(&self.ctx.logs)
            .get(&key)
            .cloned()
            .with_context(|| format!("no container {container} in pod {namespace}/{pod}"))?;
        let bytes = fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        crate::cri::parse_log(&bytes).with_context(|| format!("in {}", path.display()))
    }

    /// What went wrong so far in running pods (a pod that could not run is also `Failed` with the
    /// message in its status).
    pub fn errors(&self) -> Vec<String> {
        lock(&self.ctx.errors).clone()
    }

    /// Waits until pod `name` in `namespace` exists and `done` holds for it, and returns it.
    ///
    /// Fails after `timeout`, with the pod as last seen.
    pub fn wait_pod(
        &self,
        namespace: &str,
        name: &str,
        timeout: Duration,
        mut done: impl FnMut(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let path = format!("/api/v1/namespaces/{namespace}/pods/{name}");
        let deadline = Instant::now() + timeout;
        loop {
            let pod = self.ctx.api.get(&path)?;
            if let Some(pod) = &pod
                && done(pod)
            {
                return Ok(pod.clone());
            }
            ensure!(
                Instant::now() < deadline,
                "pod {namespace}/{name} not as expected after {timeout:?}: {}; kubelet errors: {:?}",
                pod.map_or_else(|| "missing".to_owned(), |p| p["status"].to_string()),
                self.errors()
            );
            thread::sleep(CONTAINER_POLL);
        }
    }

    /// Plays the Job controller for Job `name` in `namespace`: creates a pod from its template on
    /// this node (named `<job>-<suffix>`, owned by the Job), waits until it ends, and patches the
    /// Job's status as the controller would (`active`, then `succeeded` or `failed`, with the
    /// `Complete` or `Failed` condition). Start the API server without the Job controller.
    ///
    /// Fails when the Job does not exist, the pod cannot be created, it does not end within
    /// `timeout`, or the status cannot be written.
    pub fn run_job(
        &self,
        namespace: &str,
        name: &str,
        timeout: Duration,
    ) -> anyhow::Result<JobOutcome> {
        self.ctx.run_job(namespace, name, timeout)
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.ctx.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("the kubelet thread panicked");
        }
    }
}

/// A pod's thread and how to tell it the pod is deleted.
#[derive(Debug)]
struct Worker {
    thread: JoinHandle<()>,
    deletion: Arc<Deletion>,
}

/// Whether a pod is deleted, and with which grace period.
#[derive(Debug)]
struct Deletion {
    deleted: AtomicBool,
    /// The pod's `deletionGracePeriodSeconds`, [`u64::MAX`] while unknown.
    grace_seconds: AtomicU64,
}

impl Deletion {
    fn mark(&self, grace_seconds: Option<u64>) {
        if let Some(seconds) = grace_seconds {
            self.grace_seconds.store(seconds, Ordering::SeqCst);
        }
        self.deleted.store(true, Ordering::SeqCst);
    }
}

impl Ctx {
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn pvc_dir(&self, namespace: &str, claim: &str) -> PathBuf {
        self.root.path().join("pvc").join(namespace).join(claim)
    }

    fn error(&self, what: String) {
        tracing::warn!("kubelet: {what}");
        lock(&self.errors).push(what);
    }

    fn register_node(&self) -> anyhow::Result<()> {
        let path = format!("/api/v1/nodes/{}", self.node);
        if self.api.get(&path)?.is_none() {
            let node = json!({
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": self.node,
                    "labels": {
                        "kubernetes.io/hostname": self.node,
                        "kubernetes.io/os": "linux",
                    },
                },
            });
            self.api.post("/api/v1/nodes", &node)?;
        }
        self.heartbeat()
    }

    /// Writes the Node's status: Ready now.
    fn heartbeat(&self) -> anyhow::Result<()> {
        let now = now();
        let resources = json!({"cpu": "2", "memory": "8Gi", "pods": "110"});
        self.api.merge_patch(
            &format!("/api/v1/nodes/{}/status", self.node),
            &json!({"status": {
                "conditions": [{
                    "type": "Ready", "status": "True", "reason": "KubeletReady",
                    "message": "testbed kubelet", "lastHeartbeatTime": now,
                    "lastTransitionTime": now,
                }],
                "addresses": [
                    {"type": "InternalIP", "address": NODE_IP},
                    {"type": "Hostname", "address": self.node},
                ],
                "capacity": resources,
                "allocatable": resources,
            }}),
        )?;
        Ok(())
    }

    fn main_loop(self: &Arc<Self>) {
        let poll = self.options.poll.unwrap_or(POLL);
        let mut workers: HashMap<String, Worker> = HashMap::new();
        let mut jobs = HashSet::new();
        let mut job_threads = Vec::new();
        let mut last_heartbeat = Instant::now();
        while !self.stopping() {
            if last_heartbeat.elapsed() >= HEARTBEAT {
                if let Err(e) = self.heartbeat() {
                    tracing::warn!("kubelet: node heartbeat: {e:#}");
                }
                last_heartbeat = Instant::now();
            }
            if let Err(e) = self.schedule() {
                tracing::warn!("kubelet: scheduling: {e:#}");
            }
            if self.options.run_jobs
                && let Err(e) = self.start_jobs(&mut jobs, &mut job_threads)
            {
                tracing::warn!("kubelet: jobs: {e:#}");
            }
            if let Err(e) = self.sync_pods(&mut workers) {
                tracing::warn!("kubelet: listing pods: {e:#}");
            }
            thread::sleep(poll);
        }
        let threads = workers.into_values().map(|w| w.thread);
        for thread in threads.chain(job_threads) {
            if thread.join().is_err() {
                tracing::error!("kubelet: a pod or Job thread panicked");
            }
        }
    }

    /// Binds the pods without a node that the options select to this node.
    fn schedule(&self) -> anyhow::Result<()> {
        let options = &self.options;
        if options.schedule_namespaces.is_empty() && options.schedule_labels.is_empty() {
            return Ok(());
        }
        let pods = self
            .api
            .list("/api/v1/pods?fieldSelector=spec.nodeName%3D")?;
        for pod in pods {
            let meta = &pod["metadata"];
            let namespace = str_of(&meta["namespace"]);
            let selected = options.schedule_namespaces.iter().any(|n| n == namespace)
                || options
                    .schedule_labels
                    .iter()
                    .any(|(k, v)| meta["labels"][k].as_str() == Some(v));
            if !selected || !meta["deletionTimestamp"].is_null() {
                continue;
            }
            let name = str_of(&meta["name"]);
            let binding = json!({
                "apiVersion": "v1",
                "kind": "Binding",
                "metadata": {"name": name, "namespace": namespace},
                "target": {"apiVersion": "v1", "kind": "Node", "name": self.node},
            });
            match self.api.post(
                &format!("/api/v1/namespaces/{namespace}/pods/{name}/binding"),
                &binding,
            ) {
                Ok(_) => tracing::info!("kubelet: bound {namespace}/{name} to {}", self.node),
                Err(e) => tracing::warn!("kubelet: binding {namespace}/{name}: {e:#}"),
            }
        }
        Ok(())
    }

    /// Starts a thread running each Job of the scheduled namespaces not seen before and not
    /// finished.
    fn start_jobs(
        self: &Arc<Self>,
        seen: &mut HashSet<String>,
        threads: &mut Vec<JoinHandle<()>>,
    ) -> anyhow::Result<()> {
        for namespace in &self.options.schedule_namespaces {
            for job in self
                .api
                .list(&format!("/apis/batch/v1/namespaces/{namespace}/jobs"))?
            {
                let uid = str_of(&job["metadata"]["uid"]).to_owned();
                let finished = job["status"]["conditions"].as_array().is_some_and(|c| {
                    c.iter()
                        .any(|c| matches!(c["type"].as_str(), Some("Complete" | "Failed")))
                });
                if finished || !seen.insert(uid) {
                    continue;
                }
                let name = str_of(&job["metadata"]["name"]).to_owned();
                let namespace = namespace.clone();
                let ctx = Arc::clone(self);
                let thread =
                    thread::Builder::new()
                        .name(format!("job-{name}"))
                        .spawn(move || {
                            // As long as the kubelet lives: the pod ends when it is deleted anyway.
                            if let Err(e) = ctx.run_job(&namespace, &name, Duration::MAX)
                                && !ctx.stopping()
                            {
                                ctx.error(format!("job {namespace}/{name}: {e:#}"));
                            }
                        })?;
                threads.push(thread);
            }
        }
        Ok(())
    }

    /// Starts a thread for each new pod of the node; tells the threads of deleted pods.
    fn sync_pods(self: &Arc<Self>, workers: &mut HashMap<String, Worker>) -> anyhow::Result<()> {
        let pods = self.api.list(&format!(
            "/api/v1/pods?fieldSelector=spec.nodeName%3D{}",
            self.node
        ))?;
        let mut present = HashSet::new();
        for pod in pods {
            let meta = &pod["metadata"];
            let uid = str_of(&meta["uid"]).to_owned();
            let deleting = !meta["deletionTimestamp"].is_null();
            present.insert(uid.clone());
            if let Some(worker) = workers.get(&uid) {
                if deleting {
                    worker
                        .deletion
                        .mark(meta["deletionGracePeriodSeconds"].as_u64());
                }
                continue;
            }
            let (namespace, name) = (str_of(&meta["namespace"]), str_of(&meta["name"]));
            if deleting {
                // Never ran here: nothing to stop.
                if let Err(e) = self.api.finalize(namespace, name, &uid) {
                    tracing::warn!("kubelet: deleting {namespace}/{name}: {e:#}");
                }
                continue;
            }
            if matches!(
                pod["status"]["phase"].as_str(),
                Some("Succeeded" | "Failed")
            ) {
                continue;
            }
            let deletion = Arc::new(Deletion {
                deleted: AtomicBool::new(false),
                grace_seconds: AtomicU64::new(u64::MAX),
            });
            let ctx = Arc::clone(self);
            let flag = Arc::clone(&deletion);
            let thread = thread::Builder::new()
                .name(format!("pod-{name}"))
                .spawn(move || ctx.pod_worker(&pod, &flag))?;
            workers.insert(uid, Worker { thread, deletion });
        }
        // Pods gone without us (deleted with grace 0): stop them too; forget finished threads.
        workers.retain(|uid, worker| {
            if present.contains(uid) {
                return true;
            }
            worker.deletion.mark(Some(0));
            !worker.thread.is_finished()
        });
        Ok(())
    }

    /// Runs one pod until it is deleted (or the kubelet stops).
    fn pod_worker(&self, pod: &Value, deletion: &Deletion) {
        let deleted = &deletion.deleted;
        let meta = &pod["metadata"];
        let (namespace, name, uid) = (
            str_of(&meta["namespace"]),
            str_of(&meta["name"]),
            str_of(&meta["uid"]),
        );
        let cri = Arc::clone(&self.cri);
        let mut run = PodRun {
            ctx: self,
            pod,
            deleted,
            status: PodStatus::new(pod),
            sandbox: None,
            containers: Vec::new(),
        };
        if let Err(e) = run.run(&cri)
            && !run.cancelled()
        {
            self.error(format!("pod {namespace}/{name}: {e:#}"));
            run.status.phase = "Failed".to_owned();
            run.status.message = Some(format!("{e:#}"));
            run.write_status();
        }
        while !run.cancelled() {
            thread::sleep(CONTAINER_POLL);
        }
        let grace = Some(deletion.grace_seconds.load(Ordering::SeqCst))
            .filter(|&s| s != u64::MAX)
            .or_else(|| pod["spec"]["terminationGracePeriodSeconds"].as_u64())
            .map_or(MAX_GRACE, |s| Duration::from_secs(s).min(MAX_GRACE));
        let PodRun {
            sandbox,
            containers,
            ..
        } = run;
        for (container, _) in containers {
            if container.state().ok() == Some(ContainerState::Running)
                && let Err(e) = container.stop(grace)
            {
                tracing::warn!("kubelet: {e:#}");
            }
            if let Err(e) = container.remove() {
                tracing::warn!("kubelet: {e:#}");
            }
        }
        if let Some(sandbox) = sandbox
            && let Err(e) = sandbox.stop_and_remove()
        {
            self.error(format!("pod {namespace}/{name}: {e:#}"));
        }
        let pod_dir = self.root.path().join("pods").join(uid);
        if let Err(e) = fs::remove_dir_all(&pod_dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!("kubelet: cannot remove {}: {e}", pod_dir.display());
        }
        if deleted.load(Ordering::SeqCst)
            && let Err(e) = self.api.finalize(namespace, name, uid)
        {
            tracing::warn!("kubelet: deleting {namespace}/{name}: {e:#}");
        }
    }

    fn run_job(
        &self,
        namespace: &str,
        name: &str,
        timeout: Duration,
    ) -> anyhow::Result<JobOutcome> {
        let job_path = format!("/apis/batch/v1/namespaces/{namespace}/jobs/{name}");
        let job = self
            .api
            .get(&job_path)?
            .with_context(|| format!("no Job {namespace}/{name}"))?;
        let template = &job["spec"]["template"];
        let suffix: String = crate::cri::new_uid()
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .take(5)
            .collect();
        let pod_name = format!("{name}-{suffix}");
        let mut spec = template["spec"].clone();
        spec["nodeName"] = json!(self.node);
        let pod = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": pod_name,
                "namespace": namespace,
                "labels": template["metadata"]["labels"],
                "annotations": template["metadata"]["annotations"],
                "ownerReferences": [{
                    "apiVersion": "batch/v1", "kind": "Job", "name": name,
                    "uid": job["metadata"]["uid"], "controller": true, "blockOwnerDeletion": true,
                }],
            },
            "spec": spec,
        });
        self.api.merge_patch(
            &format!("{job_path}/status"),
            &json!({"status": {"startTime": now(), "active": 1}}),
        )?;
        self.api
            .post(&format!("/api/v1/namespaces/{namespace}/pods"), &pod)?;
        let pod_path = format!("/api/v1/namespaces/{namespace}/pods/{pod_name}");
        let deadline = Instant::now().checked_add(timeout);
        let succeeded = loop {
            let pod = self
                .api
                .get(&pod_path)?
                .with_context(|| format!("Job {name}'s pod {pod_name} is gone"))?;
            match pod["status"]["phase"].as_str() {
                Some("Succeeded") => break true,
                Some("Failed") => break false,
                _ => {}
            }
            ensure!(
                deadline.is_none_or(|d| Instant::now() < d) && !self.stopping(),
                "Job {namespace}/{name}: pod {pod_name} still {} after {timeout:?}",
                pod["status"]["phase"]
            );
            thread::sleep(CONTAINER_POLL);
        };
        let now = now();
        let (count, condition) = if succeeded {
            (
                "succeeded",
                json!({"type": "Complete", "status": "True",
                "lastProbeTime": now, "lastTransitionTime": now}),
            )
        } else {
            (
                "failed",
                json!({"type": "Failed", "status": "True",
                "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit",
                "lastProbeTime": now, "lastTransitionTime": now}),
            )
        };
        let mut status = json!({"active": null, count: 1, "conditions": [condition]});
        if succeeded {
            status["completionTime"] = json!(now);
        }
        self.api
            .merge_patch(&format!("{job_path}/status"), &json!({ "status": status }))?;
        tracing::info!("kubelet: Job {namespace}/{name} ran as {pod_name}: {count}");
        Ok(JobOutcome {
            pod: pod_name,
            succeeded,
        })
    }
}

/// The status the kubelet writes for a pod.
#[derive(Debug)]
struct PodStatus {
    phase: String,
    start_time: String,
    message: Option<String>,
    init: Vec<Value>,
    containers: Vec<Value>,
}

impl PodStatus {
    fn new(pod: &Value) -> Self {
        let waiting = |key: &str| -> Vec<Value> {
            containers_of(pod, key)
                .iter()
                .map(|c| {
                    container_status(c, None, json!({"waiting": {"reason": "PodInitializing"}}))
                })
                .collect()
        };
        Self {
            phase: "Pending".to_owned(),
            start_time: now(),
            message: None,
            init: waiting("initContainers"),
            containers: waiting("containers"),
        }
    }

    fn json(&self) -> Value {
        let initialized = self
            .init
            .iter()
            .all(|s| !s["state"]["terminated"].is_null());
        let ready = self.phase == "Running" && self.containers.iter().all(|s| s["ready"] == true);
        let now = now();
        let condition = |kind: &str, on: bool| {
            json!({"type": kind, "status": if on { "True" } else { "False" },
                "lastProbeTime": null, "lastTransitionTime": now})
        };
        let mut status = json!({
            "phase": self.phase,
            "hostIP": NODE_IP,
            "podIP": NODE_IP,
            "podIPs": [{"ip": NODE_IP}],
            "startTime": self.start_time,
            "conditions": [
                condition("PodScheduled", true),
                condition("Initialized", initialized),
                condition("ContainersReady", ready),
                condition("Ready", ready),
            ],
            "initContainerStatuses": self.init,
            "containerStatuses": self.containers,
        });
        if let Some(message) = &self.message {
            status["message"] = json!(message);
        }
        status
    }
}

/// A container's status: `state` with the container id (when there is one).
fn container_status(container: &Value, id: Option<&str>, state: Value) -> Value {
    let mut status = json!({
        "name": container["name"],
        "image": container["image"],
        "imageID": "",
        "ready": !state["running"].is_null(),
        "restartCount": 0,
        "started": !state["running"].is_null(),
        "state": state,
    });
    if let Some(id) = id {
        status["containerID"] = json!(format!("containerd://{id}"));
    }
    status
}

/// One pod being run.
struct PodRun<'c> {
    ctx: &'c Ctx,
    pod: &'c Value,
    deleted: &'c AtomicBool,
    status: PodStatus,
    sandbox: Option<Pod<'c>>,
    /// Created containers with their index in the status (init containers: `(false, i)`).
    containers: Vec<(Container<'c>, (bool, usize))>,
}

impl<'c> PodRun<'c> {
    fn cancelled(&self) -> bool {
        self.deleted.load(Ordering::SeqCst) || self.ctx.stopping()
    }

    fn namespace(&self) -> &'c str {
        str_of(&self.pod["metadata"]["namespace"])
    }

    fn name(&self) -> &'c str {
        str_of(&self.pod["metadata"]["name"])
    }

    fn write_status(&self) {
        let path = format!(
            "/api/v1/namespaces/{}/pods/{}/status",
            self.namespace(),
            self.name()
        );
        if let Err(e) = self
            .ctx
            .api
            .merge_patch(&path, &json!({"status": self.status.json()}))
        {
            tracing::warn!("kubelet: {e:#}");
        }
    }

    fn status_mut(&mut self, (init, index): (bool, usize)) -> Option<&mut Value> {
        if init {
            self.status.init.get_mut(index)
        } else {
            self.status.containers.get_mut(index)
        }
    }

    fn run(&mut self, cri: &'c Cri) -> anyhow::Result<()> {
        let meta = &self.pod["metadata"];
        let uid = str_of(&meta["uid"]);
        let volumes = self.volumes()?;
        let sandbox = cri.run_pod(&PodSpec {
            name: self.name().to_owned(),
            namespace: self.namespace().to_owned(),
            uid: uid.to_owned(),
            cgroup_parent: format!("/kubepods/burstable/pod{uid}"),
            host_network: true,
        })?;
        self.sandbox = Some(sandbox);
        self.write_status();
        for (index, container) in containers_of(self.pod, "initContainers").iter().enumerate() {
            let spec = self.container_spec(container, &volumes)?;
            let started = self.start(spec, container, (true, index))?;
            let code = self.wait_exit(started)?;
            if code != 0 {
                self.status.phase = "Failed".to_owned();
                self.write_status();
                return Ok(());
            }
        }
        let mut running = Vec::new();
        for (index, container) in containers_of(self.pod, "containers").iter().enumerate() {
            let spec = self.container_spec(container, &volumes)?;
            running.push(self.start(spec, container, (false, index))?);
            self.status.phase = "Running".to_owned();
            self.write_status();
        }
        let mut codes = Vec::new();
        while !running.is_empty() {
            ensure!(!self.cancelled(), "deleted while running");
            let mut still = Vec::new();
            for at in running {
                if self.containers[at].0.state()? == ContainerState::Exited {
                    codes.push(self.exited(at)?);
                    self.write_status();
                } else {
                    still.push(at);
                }
            }
            running = still;
            thread::sleep(CONTAINER_POLL);
        }
        self.status.phase = if codes.iter().all(|&c| c == 0) {
            "Succeeded"
        } else {
            "Failed"
        }
        .to_owned();
        self.write_status();
        Ok(())
    }

    /// Creates and starts a container and writes that it runs; returns its place in
    /// `self.containers`.
    fn start(
        &mut self,
        spec: ContainerSpec,
        container: &Value,
        slot: (bool, usize),
    ) -> anyhow::Result<usize> {
        let created = self
            .sandbox
            .as_ref()
            .context("no pod sandbox")?
            .create_container(&spec)?;
        lock(&self.ctx.logs).insert(
            (
                self.namespace().to_owned(),
                self.name().to_owned(),
                spec.name.clone(),
            ),
            created.log_path().to_owned(),
        );
        created.start()?;
        let status = container_status(
            container,
            Some(created.id()),
            json!({"running": {"startedAt": now()}}),
        );
        if let Some(s) = self.status_mut(slot) {
            *s = status;
        }
        self.containers.push((created, slot));
        if slot.0 {
            self.write_status();
        }
        Ok(self.containers.len() - 1)
    }

    /// Waits until container `at` exits (or the pod is deleted).
    fn wait_exit(&mut self, at: usize) -> anyhow::Result<i32> {
        loop {
            ensure!(!self.cancelled(), "deleted while running");
            if self.containers[at].0.state()? == ContainerState::Exited {
                let code = self.exited(at)?;
                self.write_status();
                return Ok(code);
            }
            thread::sleep(CONTAINER_POLL);
        }
    }

    /// Records that container `at` has exited; returns its exit code.
    fn exited(&mut self, at: usize) -> anyhow::Result<i32> {
        let (container, slot) = &self.containers[at];
        let (id, slot) = (container.id().to_owned(), *slot);
        let code = container.wait(EXIT_TIMEOUT)?;
        if let Some(status) = self.status_mut(slot) {
            let started = status["state"]["running"]["startedAt"].clone();
            status["state"] = json!({"terminated": {
                "exitCode": code,
                "reason": if code == 0 { "Completed" } else { "Error" },
                "startedAt": started,
                "finishedAt": now(),
                "containerID": format!("containerd://{id}"),
            }});
            status["ready"] = json!(false);
            status["started"] = json!(false);
        }
        Ok(code)
    }

    /// Makes the pod's volumes; returns each volume's host path and whether it is read-only by
    /// nature.
    fn volumes(&self) -> anyhow::Result<HashMap<String, (PathBuf, bool)>> {
        let uid = str_of(&self.pod["metadata"]["uid"]);
        let pod_dir = self.ctx.root.path().join("pods").join(uid).join("volumes");
        let mut volumes = HashMap::new();
        for volume in self.pod["spec"]["volumes"].as_array().into_iter().flatten() {
            let name = str_of(&volume["name"]);
            let dir = pod_dir.join(name);
            let (path, read_only) = if let Some(claim) = volume["persistentVolumeClaim"].as_object()
            {
                let claim_name = claim
                    .get("claimName")
                    .and_then(Value::as_str)
                    .with_context(|| format!("volume {name}: no claimName"))?;
                ensure!(
                    plain_name(claim_name),
                    "volume {name}: invalid claim {claim_name:?}"
                );
                let dir = self.ctx.pvc_dir(self.namespace(), claim_name);
                create_dir(&dir)?;
                let read_only = claim.get("readOnly").and_then(Value::as_bool) == Some(true);
                (dir, read_only)
            } else if volume["emptyDir"].is_object() {
                create_dir(&dir)?;
                (dir, false)
            } else if let Some(path) = volume["hostPath"]["path"].as_str() {
                let path = PathBuf::from(path);
                if matches!(
                    volume["hostPath"]["type"].as_str(),
                    Some("DirectoryOrCreate")
                ) {
                    create_dir(&path)?;
                }
                (path, false)
            } else {
                let files = self.volume_files(name, volume)?;
                create_dir(&dir)?;
                for (relative, (bytes, mode)) in files {
                    ensure!(
                        plain_relative(&relative),
                        "volume {name}: invalid path {relative:?}"
                    );
                    let path = dir.join(&relative);
                    if let Some(parent) = path.parent() {
                        create_dir(parent)?;
                    }
                    fs::write(&path, bytes)
                        .with_context(|| format!("cannot write {}", path.display()))?;
                    set_mode(&path, mode)?;
                }
                (dir, true)
            };
            volumes.insert(name.to_owned(), (path, read_only));
        }
        Ok(volumes)
    }

    /// The files of a configMap, secret, downwardAPI or projected volume: path → (bytes, mode).
    fn volume_files(
        &self,
        name: &str,
        volume: &Value,
    ) -> anyhow::Result<BTreeMap<String, (Vec<u8>, u32)>> {
        let mut files = BTreeMap::new();
        let sources: Vec<(&str, &Value, &Value)> =
            if let Some(projected) = volume["projected"].as_object() {
                let mode = projected.get("defaultMode").unwrap_or(&Value::Null);
                projected
                    .get("sources")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(|s| {
                        let (kind, source) = s.as_object()?.iter().next()?;
                        Some((kind.as_str(), source, mode))
                    })
                    .collect()
            } else {
                let Some((kind, source)) = ["configMap", "secret", "downwardAPI"]
                    .into_iter()
                    .find_map(|k| volume.get(k).map(|s| (k, s)))
                else {
                    bail!(
                        "volume {name}: unsupported source {}",
                        volume.as_object().map_or(String::new(), |o| o
                            .keys()
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(","))
                    );
                };
                vec![(kind, source, &source["defaultMode"])]
            };
        let namespace = self.namespace();
        for (kind, source, default_mode) in sources {
            let mode = default_mode.as_u64().map_or(0o644, mode_of);
            match kind {
                "serviceAccountToken" => {
                    let token = self.token(source)?;
                    let path = source["path"].as_str().unwrap_or("token");
                    files.insert(path.to_owned(), (token.into_bytes(), mode));
                }
                "configMap" | "secret" => {
                    let object_name = source["name"]
                        .as_str()
                        .or_else(|| source["secretName"].as_str())
                        .unwrap_or_default();
                    let data = self.data_of(kind, object_name)?;
                    let Some(data) = data else {
                        ensure!(
                            source["optional"] == true,
                            "volume {name}: no {kind} {namespace}/{object_name}"
                        );
                        continue;
                    };
                    match source["items"].as_array() {
                        Some(items) => {
                            for item in items {
                                let key = str_of(&item["key"]);
                                let bytes = data
                                    .get(key)
                                    .with_context(|| format!("volume {name}: no key {key}"))?;
                                let mode = item["mode"].as_u64().map_or(mode, mode_of);
                                files.insert(
                                    str_of(&item["path"]).to_owned(),
                                    (bytes.clone(), mode),
                                );
                            }
                        }
                        None => {
                            for (key, bytes) in data {
                                files.insert(key, (bytes, mode));
                            }
                        }
                    }
                }
                "downwardAPI" => {
                    for item in source["items"].as_array().into_iter().flatten() {
                        let value = field(self.pod, str_of(&item["fieldRef"]["fieldPath"]))?;
                        files.insert(str_of(&item["path"]).to_owned(), (value.into_bytes(), mode));
                    }
                }
                other => bail!("volume {name}: unsupported projected source {other}"),
            }
        }
        Ok(files)
    }

    /// A service account token from the TokenRequest API for a `serviceAccountToken` source,
    /// bound to the pod.
    fn token(&self, source: &Value) -> anyhow::Result<String> {
        let spec = &self.pod["spec"];
        let account = spec["serviceAccountName"].as_str().unwrap_or("default");
        let mut request = json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "expirationSeconds": source["expirationSeconds"].as_u64().unwrap_or(3600),
                "boundObjectRef": {
                    "apiVersion": "v1", "kind": "Pod",
                    "name": self.name(), "uid": self.pod["metadata"]["uid"],
                },
            },
        });
        if let Some(audience) = source["audience"].as_str().filter(|a| !a.is_empty()) {
            request["spec"]["audiences"] = json!([audience]);
        }
        let answer = self.ctx.api.post(
            &format!(
                "/api/v1/namespaces/{}/serviceaccounts/{account}/token",
                self.namespace()
            ),
            &request,
        )?;
        answer["status"]["token"]
            .as_str()
            .map(str::to_owned)
            .context("TokenRequest answered without a token")
    }

    /// The data of ConfigMap or Secret `name` (decoded), or `None` when it does not exist.
    fn data_of(&self, kind: &str, name: &str) -> anyhow::Result<Option<BTreeMap<String, Vec<u8>>>> {
        let resource = if kind == "secret" {
            "secrets"
        } else {
            "configmaps"
        };
        let Some(object) = self.ctx.api.get(&format!(
            "/api/v1/namespaces/{}/{resource}/{name}",
            self.namespace()
        ))?
        else {
            return Ok(None);
        };
        let mut data = BTreeMap::new();
        for (key, value) in object["data"].as_object().into_iter().flatten() {
            let text = value.as_str().unwrap_or_default();
            let bytes = if kind == "secret" {
                BASE64
                    .decode(text)
                    .with_context(|| format!("secret {name}: key {key} is not base64"))?
            } else {
                text.as_bytes().to_vec()
            };
            data.insert(key.clone(), bytes);
        }
        for (key, value) in object["binaryData"].as_object().into_iter().flatten() {
            data.insert(
                key.clone(),
                BASE64.decode(value.as_str().unwrap_or_default())?,
            );
        }
        Ok(Some(data))
    }

    /// What CRI gets for `container`: image, command and args with `$(VAR)`s expanded,
    /// environment, working directory, user, mounts.
    fn container_spec(
        &self,
        container: &Value,
        volumes: &HashMap<String, (PathBuf, bool)>,
    ) -> anyhow::Result<ContainerSpec> {
        let name = str_of(&container["name"]);
        let env = self.environment(container)?;
        let vars: HashMap<&str, &str> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let strings = |key: &str| -> Vec<String> {
            container[key]
                .as_array()
                .into_iter()
                .flatten()
                .map(|s| expand(str_of(s), &vars))
                .collect()
        };
        let image = str_of(&container["image"]);
        let image = self
            .ctx
            .options
            .images
            .get(image)
            .map_or(image, String::as_str);
        let command = strings("command");
        let mut spec = ContainerSpec::new(name, command.clone()).image(image);
        spec.command = command;
        spec = spec.args(strings("args"));
        for (key, value) in &env {
            spec = spec.env(key, value);
        }
        if let Some(dir) = container["workingDir"].as_str().filter(|d| !d.is_empty()) {
            spec = spec.working_dir(dir);
        }
        let security = |key: &str| {
            container["securityContext"][key]
                .as_u64()
                .or_else(|| self.pod["spec"]["securityContext"][key].as_u64())
                .and_then(|v| u32::try_from(v).ok())
        };
        if let Some(uid) = security("runAsUser") {
            spec = spec.user(uid, security("runAsGroup").unwrap_or(0));
        }
        if container["securityContext"]["readOnlyRootFilesystem"] == true {
            spec = spec.read_only_rootfs();
        }
        for mount in container["volumeMounts"].as_array().into_iter().flatten() {
            let volume = str_of(&mount["name"]);
            let (host, always_read_only) = volumes
                .get(volume)
                .with_context(|| format!("container {name}: no volume {volume}"))?;
            let mut host = host.clone();
            if let Some(sub) = mount["subPath"].as_str().filter(|s| !s.is_empty()) {
                ensure!(
                    plain_relative(sub),
                    "container {name}: invalid subPath {sub:?}"
                );
                host = host.join(sub);
                if !host.exists() {
                    create_dir(&host)?;
                }
            }
            let read_only = *always_read_only || mount["readOnly"] == true;
            spec = spec.bind(host, str_of(&mount["mountPath"]), read_only);
        }
        Ok(spec)
    }

    /// The container's environment as a kubelet makes it: `envFrom`, then `env` in order, each
    /// value with `$(VAR)` references to earlier variables expanded.
    fn environment(&self, container: &Value) -> anyhow::Result<Vec<(String, String)>> {
        let mut env: Vec<(String, String)> = Vec::new();
        let set = |env: &mut Vec<(String, String)>, key: String, value: String| {
            env.retain(|(k, _)| *k != key);
            env.push((key, value));
        };
        for from in container["envFrom"].as_array().into_iter().flatten() {
            let prefix = from["prefix"].as_str().unwrap_or_default();
            for (kind, reference) in [("configMap", "configMapRef"), ("secret", "secretRef")] {
                let Some(source) = from.get(reference) else {
                    continue;
                };
                let object = str_of(&source["name"]);
                match self.data_of(kind, object)? {
                    Some(data) => {
                        for (key, bytes) in data {
                            let value = String::from_utf8_lossy(&bytes).into_owned();
                            set(&mut env, format!("{prefix}{key}"), value);
                        }
                    }
                    None => ensure!(source["optional"] == true, "no {kind} {object}"),
                }
            }
        }
        for var in container["env"].as_array().into_iter().flatten() {
            let key = str_of(&var["name"]).to_owned();
            let from = &var["valueFrom"];
            let value = if let Some(path) = from["fieldRef"]["fieldPath"].as_str() {
                field(self.pod, path)?
            } else if let Some(kind) = ["configMapKeyRef", "secretKeyRef"]
                .into_iter()
                .find(|k| from.get(k).is_some())
            {
                let source = &from[kind];
                let object = str_of(&source["name"]);
                let wanted = str_of(&source["key"]);
                let data = self.data_of(
                    if kind == "secretKeyRef" {
                        "secret"
                    } else {
                        "configMap"
                    },
                    object,
                )?;
                match data.and_then(|d| d.get(wanted).cloned()) {
                    Some(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
                    None if source["optional"] == true => continue,
                    None => bail!("{kind}: no key {wanted} in {object}"),
                }
            } else {
                let vars: HashMap<&str, &str> =
                    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                expand(var["value"].as_str().unwrap_or_default(), &vars)
            };
            set(&mut env, key, value);
        }
        Ok(env)
    }
}

/// A downward-API field of `pod`: `metadata.name`, `metadata.namespace`, `metadata.uid`,
/// `metadata.labels['k']`, `metadata.annotations['k']`, `spec.nodeName`,
/// `spec.serviceAccountName`, `status.hostIP`, `status.podIP`.
fn field(pod: &Value, path: &str) -> anyhow::Result<String> {
    let meta = &pod["metadata"];
    let value = match path {
        "metadata.name" | "metadata.namespace" | "metadata.uid" => &meta[&path[9..]],
        "spec.nodeName" | "spec.serviceAccountName" => &pod["spec"][&path[5..]],
        "status.hostIP" | "status.podIP" => return Ok(NODE_IP.to_owned()),
        _ => {
            let keyed = ["labels", "annotations"].into_iter().find_map(|map| {
                let key = path
                    .strip_prefix(&format!("metadata.{map}['"))?
                    .strip_suffix("']")?;
                Some(&meta[map][key])
            });
            keyed.with_context(|| format!("unsupported fieldPath {path}"))?
        }
    };
    Ok(value.as_str().unwrap_or_default().to_owned())
}

/// Expands `$(VAR)` with `vars` as Kubernetes does: `$$` is a `$`, and a reference to an
/// unknown variable stays as it is.
fn expand(input: &str, vars: &HashMap<&str, &str>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(reference) = after.strip_prefix('(')
            && let Some(end) = reference.find(')')
        {
            let name = &reference[..end];
            match vars.get(name) {
                Some(value) => out.push_str(value),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = &reference[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// The pod's `spec.<key>` containers.
fn containers_of<'p>(pod: &'p Value, key: &str) -> &'p [Value] {
    pod["spec"][key].as_array().map_or(&[], Vec::as_slice)
}

fn str_of(value: &Value) -> &str {
    value.as_str().unwrap_or_default()
}

fn plain_relative(path: &str) -> bool {
    !path.is_empty()
        && Path::new(path)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
}

fn plain_name(name: &str) -> bool {
    plain_relative(name) && !name.contains('/')
}

fn create_dir(path: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(path).with_context(|| format!("cannot create {}", path.display()))
}

/// A file mode from JSON, or 0644 when it is out of range.
fn mode_of(mode: u64) -> u32 {
    u32::try_from(mode).unwrap_or(0o644)
}

fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set the mode of {}", path.display()))
}

/// Now as the API server writes times (RFC 3339, seconds).
fn now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// JSON requests to the API server as its admin.
#[derive(Debug)]
struct Api {
    base: String,
    http: reqwest::blocking::Client,
}

impl Api {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Fails with the API server's answer unless the request succeeded.
    fn answer(what: &str, response: reqwest::blocking::Response) -> anyhow::Result<Value> {
        let status = response.status();
        let text = response.text()?;
        ensure!(status.is_success(), "{what}: {status}: {text}");
        Ok(serde_json::from_str(&text)?)
    }

    /// The object, or `None` when it does not exist.
    fn get(&self, path: &str) -> anyhow::Result<Option<Value>> {
        let response = self.http.get(self.url(path)).send()?;
        if response.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        Self::answer(&format!("GET {path}"), response).map(Some)
    }

    /// The items of a list.
    fn list(&self, path: &str) -> anyhow::Result<Vec<Value>> {
        let response = self.http.get(self.url(path)).send()?;
        let mut list = Self::answer(&format!("GET {path}"), response)?;
        match list["items"].take() {
            Value::Array(items) => Ok(items),
            Value::Null => Ok(Vec::new()),
            other => bail!("GET {path}: items is {other}"),
        }
    }

    fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        let response = self.http.post(self.url(path)).json(body).send()?;
        Self::answer(&format!("POST {path}"), response)
    }

    fn merge_patch(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        let response = self
            .http
            .patch(self.url(path))
            .header("Content-Type", "application/merge-patch+json")
            .body(body.to_string())
            .send()?;
        Self::answer(&format!("PATCH {path}"), response)
    }

    /// Deletes pod `name` (if it is still the one with `uid`) at once, as a kubelet finalizes a
    /// graceful deletion; a pod already gone is fine.
    fn finalize(&self, namespace: &str, name: &str, uid: &str) -> anyhow::Result<()> {
        let path = format!("/api/v1/namespaces/{namespace}/pods/{name}");
        let response = self
            .http
            .delete(self.url(&path))
            .json(&json!({"gracePeriodSeconds": 0, "preconditions": {"uid": uid}}))
            .send()?;
        if matches!(
            response.status(),
            reqwest::StatusCode::NOT_FOUND | reqwest::StatusCode::CONFLICT
        ) {
            return Ok(());
        }
        Self::answer(&format!("DELETE {path}"), response).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_like_kubernetes() {
        let vars = HashMap::from([("A", "1"), ("B", "x y")]);
        assert_eq!(expand("$(A)-$(B)", &vars), "1-x y");
        assert_eq!(expand("$$(A) $(C) $ $(", &vars), "$(A) $(C) $ $(");
        assert_eq!(expand("a$$b$(A)", &vars), "a$b1");
    }

    #[test]
    fn downward_fields() {
        let pod = json!({
            "metadata": {"name": "p", "namespace": "n", "uid": "u",
                "labels": {"app": "x"}, "annotations": {"a/b": "c"}},
            "spec": {"nodeName": "node1"},
        });
        assert_eq!(field(&pod, "metadata.name").unwrap(), "p");
        assert_eq!(field(&pod, "metadata.namespace").unwrap(), "n");
        assert_eq!(field(&pod, "metadata.uid").unwrap(), "u");
        assert_eq!(field(&pod, "spec.nodeName").unwrap(), "node1");
        assert_eq!(field(&pod, "metadata.labels['app']").unwrap(), "x");
        assert_eq!(field(&pod, "metadata.annotations['a/b']").unwrap(), "c");
        assert!(field(&pod, "status.phase").is_err());
    }
}

//! One real Kubernetes node for tests: the kubelet and kube-scheduler 1.20.2 (built by
//! `cargo xtask testbed install`) on a [`KubeApi`], running pods on a containerd of its own
//! through CRI, so pods go the whole way a cluster takes them: scheduled, admitted, their volumes
//! (emptyDir, hostPath, PersistentVolumes, projected ServiceAccount tokens, ...) and environment
//! made by the kubelet, run, their status, logs (`pods/log`) and deletion handled by it. Run the
//! API server with the controller manager ([`crate::kube::KubeOptions::controller_manager`]) for
//! Jobs, PersistentVolume binding and ServiceAccount tokens.
//!
//! The node is named [`NODE_NAME`] (`127.0.0.1`: a hostname override that parses as an address
//! becomes the node's InternalIP, so the API server reaches the kubelet on loopback; the kubelet
//! refuses `--node-ip=127.0.0.1`). Pods with `hostNetwork: true` share the host's network (and
//! reach servers on its loopback); other pods get a network namespace of their own where they
//! reach nothing (see [`crate::cri`]'s pod network). Images are not pulled: import them into
//! [`Node::cri`] ([`crate::images`]) and give pods `imagePullPolicy: Never` (or `IfNotPresent`
//! with a tag other than `latest`).
//!
//! Everything the kubelet does to the machine is undone on drop, also when a test panics: its
//! processes and containers stop, its mounts under its root directory go (deepest first), its
//! cgroup root (`/<name>` in every hierarchy, one per instance so that no kubelet removes
//! another's pod cgroups) is removed, the sysctls it sets (`vm.overcommit_memory`,
//! `kernel.panic`, `kernel.panic_on_oops`) get their old values back, and its pods' entries in
//! `/var/log/pods` and `/var/log/containers` and `/var/lib/kubelet/device-plugins` (when it made
//! it) are removed: the 1.20 kubelet writes those whatever its root directory. Nodes in one
//! process start one at a time (they share these host paths and sysctls); nextest runs the tests
//! that start one alone (test group `real-kubelet` in `.config/nextest.toml`).
//!
//! ```no_run
//! use std::time::Duration;
//! use testbed::{kube::{KubeApi, KubeOptions}, node::{Node, NodeOptions}};
//!
//! let Some(kube) = KubeApi::start_or_skip_with(&KubeOptions::new().controller_manager(true))
//! else { return };
//! let Some(node) = Node::start_or_skip(&kube, &NodeOptions::new()) else { return };
//! // ... create pod `web` in `default` through the API server, then:
//! let pod = node
//!     .wait_pod("default", "web", Duration::from_secs(60), |p| p["status"]["phase"] == "Succeeded")
//!     .unwrap();
//! let logs = node.api_logs("default", "web", "app").unwrap();
//! ```

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Mutex, MutexGuard, PoisonError},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
use serde_json::{Value, json};
use tempfile::TempDir;

use crate::{
    cri::{self, Cri, Logs},
    kube::{KubeApi, Usage},
    layout,
};

/// The node's name, and its address.
pub const NODE_NAME: &str = "127.0.0.1";

/// The sysctls the kubelet sets at start (its `setupKernelTunables`), restored on drop.
const SYSCTLS: [&str; 3] = [
    "/proc/sys/vm/overcommit_memory",
    "/proc/sys/kernel/panic",
    "/proc/sys/kernel/panic_on_oops",
];

/// Where the 1.20 kubelet writes whatever its root directory: pod log directories
/// (`<namespace>_<pod>_<uid>`), links to container logs, and the device plugin socket.
const POD_LOGS: &str = "/var/log/pods";
const CONTAINER_LOGS: &str = "/var/log/containers";
const DEVICE_PLUGINS: &str = "/var/lib/kubelet/device-plugins";
const KUBELET_VAR: &str = "/var/lib/kubelet";
/// Where containerd 1.6 mounts the pods' network namespaces (and removes them with the pods).
const NETNS: &str = "/run/netns";

/// The host directories the kubelet and containerd make, removed on drop when they were not there
/// before (and, but for [`DEVICE_PLUGINS`], are empty then), last first.
const HOST_DIRS: [&str; 5] = [KUBELET_VAR, DEVICE_PLUGINS, POD_LOGS, CONTAINER_LOGS, NETNS];

/// How often start-up and pod conditions are checked again.
const POLL: Duration = Duration::from_millis(100);

/// How long teardown waits for the processes in the node's cgroups to be gone.
const CGROUP_TIMEOUT: Duration = Duration::from_secs(10);

/// One node at a time per process: the host paths and sysctls above are shared.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Why a [`Node`] cannot run here, or `None` when it can: besides containerd and runc (see
/// [`crate::unavailable`]), the kubelet, the scheduler and the CNI plugins must be in the cache.
pub fn unavailable() -> Option<String> {
    if let Some(reason) = crate::unavailable() {
        return Some(reason);
    }
    [
        layout::kubelet(),
        layout::kube_scheduler(),
        layout::cni_bin_dir().join("loopback"),
    ]
    .iter()
    .find(|path| !path.exists())
    .map(|path| {
        format!(
            "{} is missing: run `cargo xtask testbed install`",
            path.display()
        )
    })
}

/// How to start a [`Node`].
#[derive(Debug, Clone)]
pub struct NodeOptions {
    start_timeout: Duration,
}

impl Default for NodeOptions {
    fn default() -> Self {
        Self {
            start_timeout: Duration::from_secs(90),
        }
    }
}

impl NodeOptions {
    /// The defaults: a 90 s start timeout (the node is usually Ready in about 10 s).
    pub fn new() -> Self {
        Self::default()
    }

    /// How long the start may take until the Node is Ready.
    #[must_use]
    pub fn start_timeout(mut self, timeout: Duration) -> Self {
        self.start_timeout = timeout;
        self
    }
}

/// A child process with its log file.
#[derive(Debug)]
struct Process {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

/// A running node (kubelet, scheduler, containerd). Dropping it stops them and undoes what the
/// kubelet did to the machine (see the module documentation).
#[derive(Debug)]
pub struct Node {
    /// kubelet, then kube-scheduler; stopped before containerd.
    processes: Vec<Process>,
    /// `None` once dropped, which must happen after the kubelet stopped.
    cri: Option<Cri>,
    dir: TempDir,
    /// The cgroup root's name, `relay-node-...` (the kubelet's `cgroupRoot` is `/<name>`).
    cgroup_root: String,
    /// Each sysctl of [`SYSCTLS`] with its value before the start.
    sysctls: Vec<(&'static str, String)>,
    /// Host directories that did not exist before the kubelet, removed on drop.
    made: Vec<PathBuf>,
    url: String,
    http: reqwest::blocking::Client,
    _one_at_a_time: MutexGuard<'static, ()>,
}

impl Node {
    /// Starts containerd (with the pod network), the kubelet and the scheduler for `kube`, and
    /// waits until the Node reports Ready.
    ///
    /// Fails when the node is [`unavailable`], when a process exits, or when the Node is not
    /// Ready within [`NodeOptions::start_timeout`]; the error carries the end of the logs.
    pub fn start(kube: &KubeApi, options: &NodeOptions) -> anyhow::Result<Self> {
        if let Some(reason) = unavailable() {
            bail!("{reason}");
        }
        let one_at_a_time = ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner);
        let started = Instant::now();
        let deadline = started + options.start_timeout;
        let dir = tempfile::Builder::new()
            .prefix("relay-node-")
            .tempdir()
            .context("cannot create a directory for the node")?;
        let cgroup_root = dir
            .path()
            .file_name()
            .and_then(|n| n.to_str())
            .context("the node's directory has no UTF-8 name")?
            .to_owned();
        let mut sysctls = Vec::new();
        for path in SYSCTLS {
            let value = fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?;
            sysctls.push((path, value.trim().to_owned()));
        }
        let made = HOST_DIRS
            .into_iter()
            .map(PathBuf::from)
            .filter(|p| !p.exists())
            .collect();
        // From here on, dropping `node` undoes what was done so far.
        let mut node = Self {
            processes: Vec::new(),
            cri: None,
            dir,
            cgroup_root,
            sysctls,
            made,
            url: kube.url().to_owned(),
            http: kube.client()?,
            _one_at_a_time: one_at_a_time,
        };
        for hierarchy in cri::cgroup_hierarchies() {
            let root = hierarchy.join(&node.cgroup_root);
            fs::create_dir_all(&root)
                .with_context(|| format!("cannot create cgroup {}", root.display()))?;
        }
        node.cri = Some(Cri::start_with(true).context("containerd did not start")?);
        node.write_config(kube)?;
        node.start_kubelet()?;
        node.start_scheduler(kube)?;
        node.wait_ready(deadline)?;
        eprintln!(
            "testbed: node {NODE_NAME} Ready in {:.1?}",
            started.elapsed()
        );
        Ok(node)
    }

    /// For tests: [`start`](Self::start) when the node can run here, otherwise `None` after
    /// [`skip_or_fail`](crate::skip_or_fail) has said why.
    ///
    /// # Panics
    ///
    /// When the node is unavailable and `RELAY_REQUIRE_TESTBED=1`, or when it does not start
    /// although it is installed.
    pub fn start_or_skip(kube: &KubeApi, options: &NodeOptions) -> Option<Self> {
        if let Some(reason) = unavailable() {
            crate::skip_or_fail(&reason);
            return None;
        }
        match Self::start(kube, options) {
            Ok(node) => Some(node),
            Err(e) => panic!("the node did not start: {e:#}"),
        }
    }

    /// The node's name ([`NODE_NAME`]).
    pub fn name(&self) -> &str {
        NODE_NAME
    }

    /// The node's containerd: import images with [`crate::images`], look at its containers.
    pub fn cri(&self) -> &Cri {
        match &self.cri {
            Some(cri) => cri,
            // Only `drop` takes it.
            None => unreachable!("the node's containerd is gone"),
        }
    }

    /// The node's directory: the kubelet's root (`kubelet/`), configuration, PKI and the logs
    /// (`kubelet.log`, `kube-scheduler.log`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The cgroup v2 directory the kubelet's `kubepods` cgroup is in:
    /// `/sys/fs/cgroup/unified/<root>` on this hybrid host. Pods are in
    /// `<this>/kubepods/{besteffort/,burstable/,}pod<uid>/<container id>`.
    ///
    /// Fails when there is no cgroup v2 tree.
    pub fn cgroup_v2_root(&self) -> anyhow::Result<PathBuf> {
        Ok(cri::cgroup_v2_root()?.join(&self.cgroup_root))
    }

    /// The end of a process's log (`kubelet`, `kube-scheduler`).
    pub fn log_tail(&self, name: &str, lines: usize) -> String {
        log_tail(&self.dir.path().join(format!("{name}.log")), lines)
    }

    /// `GET path` on the API server as its admin: the object, or `None` when it does not exist.
    fn get(&self, path: &str) -> anyhow::Result<Option<Value>> {
        let response = self.http.get(format!("{}{path}", self.url)).send()?;
        if response.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let status = response.status();
        let text = response.text()?;
        ensure!(status.is_success(), "GET {path}: {status}: {text}");
        Ok(Some(serde_json::from_str(&text)?))
    }

    /// Waits until pod `name` in `namespace` exists and `done` holds for it, and returns it.
    ///
    /// Fails after `timeout`, with the pod as last seen and the end of the kubelet's log.
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
            let pod = self.get(&path)?;
            if let Some(pod) = &pod
                && done(pod)
            {
                return Ok(pod.clone());
            }
            ensure!(
                Instant::now() < deadline,
                "pod {namespace}/{name} not as expected after {timeout:?}: {}\n--- kubelet:\n{}",
                pod.map_or_else(|| "missing".to_owned(), |p| p["status"].to_string()),
                self.log_tail("kubelet", 20)
            );
            thread::sleep(POLL);
        }
    }

    /// Waits until pod `name` in `namespace` ended (`Succeeded` or `Failed`) and returns it.
    ///
    /// Fails after `timeout`.
    pub fn wait_pod_ended(
        &self,
        namespace: &str,
        name: &str,
        timeout: Duration,
    ) -> anyhow::Result<Value> {
        self.wait_pod(namespace, name, timeout, |p| {
            matches!(p["status"]["phase"].as_str(), Some("Succeeded" | "Failed"))
        })
    }

    /// Waits until Job `name` in `namespace` is `Complete` or `Failed` (the Job controller's
    /// condition) and returns it.
    ///
    /// Fails after `timeout`, with the Job and its pods as last seen.
    pub fn wait_job(
        &self,
        namespace: &str,
        name: &str,
        timeout: Duration,
    ) -> anyhow::Result<Value> {
        let path = format!("/apis/batch/v1/namespaces/{namespace}/jobs/{name}");
        let deadline = Instant::now() + timeout;
        loop {
            let job = self.get(&path)?;
            let ended = job.as_ref().is_some_and(|job| {
                job["status"]["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| {
                        matches!(c["type"].as_str(), Some("Complete" | "Failed"))
                            && c["status"] == "True"
                    })
            });
            if let (true, Some(job)) = (ended, job.clone()) {
                return Ok(job);
            }
            if Instant::now() >= deadline {
                let pods = self.get(&format!(
                    "/api/v1/namespaces/{namespace}/pods?labelSelector=job-name%3D{name}"
                ))?;
                bail!(
                    "Job {namespace}/{name} did not end within {timeout:?}: {}\npods: {}\n--- kubelet:\n{}",
                    job.map_or_else(|| "missing".to_owned(), |j| j["status"].to_string()),
                    pods.map_or_else(String::new, |p| p["items"].to_string()),
                    self.log_tail("kubelet", 20)
                );
            }
            thread::sleep(POLL);
        }
    }

    /// What container `container` of pod `pod` in `namespace` logged, through the API server's
    /// `pods/log` (the API server asks the kubelet, as `kubectl logs` does): stdout and stderr
    /// interleaved.
    ///
    /// Fails when the API server does not answer with the log.
    pub fn api_logs(&self, namespace: &str, pod: &str, container: &str) -> anyhow::Result<String> {
        let path = format!("/api/v1/namespaces/{namespace}/pods/{pod}/log?container={container}");
        let response = self.http.get(format!("{}{path}", self.url)).send()?;
        let status = response.status();
        let text = response.text()?;
        ensure!(status.is_success(), "GET {path}: {status}: {text}");
        Ok(text)
    }

    /// Container `container`'s log file as the kubelet keeps it
    /// (`/var/log/pods/<namespace>_<pod>_<uid>/<container>/<restart>.log`, CRI format), with
    /// stdout and stderr apart; the pod must still exist.
    ///
    /// Fails when the pod or the file is not there.
    pub fn logs(&self, namespace: &str, pod: &str, container: &str) -> anyhow::Result<Logs> {
        let object = self
            .get(&format!("/api/v1/namespaces/{namespace}/pods/{pod}"))?
            .with_context(|| format!("no pod {namespace}/{pod}"))?;
        let uid = object["metadata"]["uid"].as_str().unwrap_or_default();
        let restarts = ["initContainerStatuses", "containerStatuses"]
            .iter()
            .flat_map(|key| object["status"][key].as_array().into_iter().flatten())
            .find(|s| s["name"] == container)
            .and_then(|s| s["restartCount"].as_u64())
            .unwrap_or(0);
        let path = Path::new(POD_LOGS)
            .join(format!("{namespace}_{pod}_{uid}"))
            .join(container)
            .join(format!("{restarts}.log"));
        let bytes = fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        cri::parse_log(&bytes).with_context(|| format!("in {}", path.display()))
    }

    /// The host directory behind PersistentVolumeClaim `claim` in `namespace`: the `hostPath`
    /// (or `local`) path of the PersistentVolume it is bound to, or `None` while it is unbound.
    ///
    /// Fails when the claim or its volume cannot be read.
    pub fn claim_dir(&self, namespace: &str, claim: &str) -> anyhow::Result<Option<PathBuf>> {
        let Some(pvc) = self.get(&format!(
            "/api/v1/namespaces/{namespace}/persistentvolumeclaims/{claim}"
        ))?
        else {
            return Ok(None);
        };
        let Some(volume) = pvc["spec"]["volumeName"].as_str().filter(|v| !v.is_empty()) else {
            return Ok(None);
        };
        let pv = self
            .get(&format!("/api/v1/persistentvolumes/{volume}"))?
            .with_context(|| format!("no PersistentVolume {volume}"))?;
        let path = pv["spec"]["hostPath"]["path"]
            .as_str()
            .or_else(|| pv["spec"]["local"]["path"].as_str())
            .with_context(|| format!("PersistentVolume {volume} is neither hostPath nor local"))?;
        Ok(Some(PathBuf::from(path)))
    }

    /// Makes a PersistentVolume `name` of StorageClass `class` for a claim to bind, as a cluster
    /// without a provisioner has them made in advance: a `hostPath` directory (made here, under
    /// the node's directory, and returned) of 64Mi with `access_modes`, reclaim policy Retain.
    ///
    /// Fails when the directory cannot be made or the API server refuses the volume.
    pub fn persistent_volume(
        &self,
        name: &str,
        class: &str,
        access_modes: &[&str],
    ) -> anyhow::Result<PathBuf> {
        let dir = self.dir.path().join("volumes").join(name);
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let volume = json!({
            "apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": name},
            "spec": {
                "storageClassName": class,
                "accessModes": access_modes,
                "capacity": {"storage": "64Mi"},
                "persistentVolumeReclaimPolicy": "Retain",
                "hostPath": {"path": dir, "type": "Directory"},
            },
        });
        let response = self
            .http
            .post(format!("{}/api/v1/persistentvolumes", self.url))
            .json(&volume)
            .send()?;
        let status = response.status();
        ensure!(
            status.is_success(),
            "POST PersistentVolume {name}: {status}: {}",
            response.text()?
        );
        Ok(dir)
    }

    /// Writes the node's PKI, the kubelet's kubeconfig and KubeletConfiguration.
    fn write_config(&self, kube: &KubeApi) -> anyhow::Result<()> {
        let dir = self.dir.path();
        fs::create_dir_all(dir.join("pki"))?;
        fs::create_dir_all(dir.join("kubelet"))?;
        fs::create_dir_all(dir.join("volume-plugins"))?;
        let pki = |name: &str| dir.join("pki").join(name);
        // The node's identity: the Node authorizer and NodeRestriction know it by this name.
        kube.issue_certificate(
            &format!("system:node:{NODE_NAME}"),
            Some("system:nodes"),
            &[],
            Usage::Client,
            &pki("node.crt"),
            &pki("node.key"),
        )?;
        // The kubelet's serving certificate, which the API server checks against its CA.
        kube.issue_certificate(
            NODE_NAME,
            None,
            &[NODE_NAME, "localhost"],
            Usage::Server,
            &pki("kubelet.crt"),
            &pki("kubelet.key"),
        )?;
        let path_string = |p: PathBuf| -> anyhow::Result<String> {
            p.to_str()
                .map(str::to_owned)
                .with_context(|| format!("{} is not UTF-8", p.display()))
        };
        let kubeconfig = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "testbed", "cluster": {
                "server": kube.url(),
                "certificate-authority-data": BASE64.encode(kube.ca_pem()),
            }}],
            "users": [{"name": "node", "user": {
                "client-certificate": path_string(pki("node.crt"))?,
                "client-key": path_string(pki("node.key"))?,
            }}],
            "contexts": [{"name": "node", "context": {"cluster": "testbed", "user": "node"}}],
            "current-context": "node",
        });
        fs::write(
            dir.join("kubelet.kubeconfig"),
            serde_json::to_vec_pretty(&kubeconfig)?,
        )?;
        let (port, healthz) = (
            crate::ports::try_free_port()?,
            crate::ports::try_free_port()?,
        );
        let config = json!({
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            // Loopback only, and no unauthenticated read-only port.
            "address": NODE_NAME,
            "port": port,
            "readOnlyPort": 0,
            "healthzBindAddress": NODE_NAME,
            "healthzPort": healthz,
            "tlsCertFile": path_string(pki("kubelet.crt"))?,
            "tlsPrivateKeyFile": path_string(pki("kubelet.key"))?,
            "authentication": {
                "anonymous": {"enabled": false},
                "webhook": {"enabled": true},
                "x509": {"clientCAFile": path_string(kube.ca_path())?},
            },
            "authorization": {"mode": "Webhook"},
            "cgroupDriver": "cgroupfs",
            "cgroupsPerQOS": true,
            // Our own root: a kubelet removes the pod cgroups under its root it does not know.
            "cgroupRoot": format!("/{}", self.cgroup_root),
            "failSwapOn": false,
            // No iptables on this machine.
            "makeIPTablesUtilChains": false,
            // With true, 1.20 exits because the host's values differ from what it wants.
            "protectKernelDefaults": false,
            // Tests must not be evicted by a full disk of the developer's machine...
            "evictionHard": {
                "memory.available": "1Mi",
                "nodefs.available": "1%",
                "nodefs.inodesFree": "1%",
                "imagefs.available": "1%",
            },
            // ... nor lose their imported images (they cannot be pulled again): no image GC.
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "kubeAPIQPS": 50,
            "kubeAPIBurst": 100,
            "serializeImagePulls": false,
            "clusterDomain": "cluster.local",
            "resolvConf": "/etc/resolv.conf",
        });
        fs::write(
            dir.join("kubelet-config.json"),
            serde_json::to_vec_pretty(&config)?,
        )?;
        Ok(())
    }

    fn start_kubelet(&mut self) -> anyhow::Result<()> {
        let dir = self.dir.path().to_path_buf();
        let endpoint = format!("unix://{}", self.cri().address().display());
        let mut kubelet = Command::new(layout::kubelet());
        kubelet
            // The in-tree ECR credential provider would ask the EC2 metadata service
            // (169.254.169.254) once at start: nothing but loopback may be contacted.
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .arg("--container-runtime=remote")
            .arg(format!("--container-runtime-endpoint={endpoint}"))
            .arg(format!("--root-dir={}", dir.join("kubelet").display()))
            .arg(format!("--cert-dir={}", dir.join("pki").display()))
            // Else the FlexVolume prober creates /usr/libexec/kubernetes/....
            .arg(format!(
                "--volume-plugin-dir={}",
                dir.join("volume-plugins").display()
            ))
            .arg(format!("--hostname-override={NODE_NAME}"))
            .arg(format!(
                "--kubeconfig={}",
                dir.join("kubelet.kubeconfig").display()
            ))
            .arg(format!(
                "--config={}",
                dir.join("kubelet-config.json").display()
            ))
            // Pod UIDs in the log tell teardown which /var/log/pods entries are this node's.
            .arg("--v=2");
        self.spawn("kubelet", kubelet)
    }

    fn start_scheduler(&mut self, kube: &KubeApi) -> anyhow::Result<()> {
        let mut scheduler = Command::new(layout::kube_scheduler());
        scheduler
            .arg(format!("--kubeconfig={}", kube.kubeconfig_path().display()))
            .arg("--leader-elect=false")
            // No serving at all (the defaults, 10251 and 10259, would clash between instances).
            .arg("--port=0")
            .arg("--secure-port=0");
        self.spawn("kube-scheduler", scheduler)
    }

    /// Starts `cmd` with its output going to `<name>.log`; from then on, dropping `self` stops it.
    fn spawn(&mut self, name: &'static str, mut cmd: Command) -> anyhow::Result<()> {
        let log = self.dir.path().join(format!("{name}.log"));
        let file =
            fs::File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let child = cmd
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        self.processes.push(Process { name, child, log });
        Ok(())
    }

    /// Waits until the Node's Ready condition is True, failing when a process exits or at
    /// `deadline`.
    fn wait_ready(&mut self, deadline: Instant) -> anyhow::Result<()> {
        let path = format!("/api/v1/nodes/{NODE_NAME}");
        loop {
            for p in &mut self.processes {
                if let Some(status) = p.child.try_wait()? {
                    bail!("{} exited with {status}:\n{}", p.name, log_tail(&p.log, 30));
                }
            }
            let ready = self.get(&path).ok().flatten().is_some_and(|node| {
                node["status"]["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            });
            if ready {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let logs: Vec<String> = self
                    .processes
                    .iter()
                    .map(|p| format!("--- {}:\n{}", p.name, log_tail(&p.log, 20)))
                    .collect();
                bail!("node {NODE_NAME} not Ready in time:\n{}", logs.join("\n"));
            }
            thread::sleep(POLL);
        }
    }

    /// The UIDs of the pods this node ran: those in the kubelet's log (it names every pod it is
    /// given, at `--v=2`) and those the API server still has on the node.
    fn pod_uids(&self) -> BTreeSet<String> {
        let mut uids = BTreeSet::new();
        if let Ok(Some(pods)) = self.get(&format!(
            "/api/v1/pods?fieldSelector=spec.nodeName%3D{NODE_NAME}"
        )) {
            for pod in pods["items"].as_array().into_iter().flatten() {
                if let Some(uid) = pod["metadata"]["uid"].as_str() {
                    uids.insert(uid.to_owned());
                }
            }
        }
        let log = fs::read_to_string(self.dir.path().join("kubelet.log")).unwrap_or_default();
        // Only entries that exist matter: check those against the log.
        for entry in fs::read_dir(POD_LOGS).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some((_, uid)) = name.rsplit_once('_')
                && uid.len() == 36
                && log.contains(uid)
            {
                uids.insert(uid.to_owned());
            }
        }
        uids
    }

    /// Removes this node's pods' entries from [`POD_LOGS`] and [`CONTAINER_LOGS`].
    fn remove_pod_logs(&self, uids: &BTreeSet<String>) {
        let mut removed = Vec::new();
        for entry in fs::read_dir(POD_LOGS).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name
                .rsplit_once('_')
                .is_some_and(|(_, uid)| uids.contains(uid))
            {
                if let Err(e) = fs::remove_dir_all(entry.path()) {
                    eprintln!("testbed: cannot remove {}: {e}", entry.path().display());
                }
                removed.push(entry.path());
            }
        }
        for entry in fs::read_dir(CONTAINER_LOGS).into_iter().flatten().flatten() {
            let ours = fs::read_link(entry.path())
                .is_ok_and(|target| removed.iter().any(|dir| target.starts_with(dir)));
            if ours && let Err(e) = fs::remove_file(entry.path()) {
                eprintln!("testbed: cannot remove {}: {e}", entry.path().display());
            }
        }
    }

    /// Removes the node's cgroup root from every hierarchy, deepest directories first, waiting
    /// (up to [`CGROUP_TIMEOUT`]) while processes are still leaving them.
    fn remove_cgroups(&self) {
        let deadline = Instant::now() + CGROUP_TIMEOUT;
        for hierarchy in cri::cgroup_hierarchies() {
            let root = hierarchy.join(&self.cgroup_root);
            let mut dirs = Vec::new();
            collect_dirs(&root, &mut dirs);
            dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
            for dir in dirs {
                loop {
                    match fs::remove_dir(&dir) {
                        Ok(()) => break,
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                        Err(e) if Instant::now() >= deadline => {
                            eprintln!("testbed: cannot remove cgroup {}: {e}", dir.display());
                            break;
                        }
                        Err(_) => thread::sleep(Duration::from_millis(20)),
                    }
                }
            }
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let panicking = thread::panicking();
        // Asked while the API server still answers (it is dropped after the node).
        let uids = self.pod_uids();
        while let Some(mut p) = self.processes.pop() {
            if panicking {
                eprintln!(
                    "testbed: end of the {} log:\n{}",
                    p.name,
                    log_tail(&p.log, 25)
                );
            }
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
        // Stops the pods' containers and containerd, and unmounts what containerd mounted.
        drop(self.cri.take());
        // The kubelet's own: its root directory bind-mounted onto itself, and the tmpfs of
        // secret, projected and downward-API volumes below it.
        for mount in cri::mounts_under(self.dir.path()) {
            if let Err(e) = rustix::mount::unmount(&mount, rustix::mount::UnmountFlags::DETACH) {
                eprintln!("testbed: cannot unmount {}: {e}", mount.display());
            }
        }
        self.remove_cgroups();
        for (path, value) in &self.sysctls {
            if let Err(e) = fs::write(path, value) {
                eprintln!("testbed: cannot restore {path} to {value}: {e}");
            }
        }
        self.remove_pod_logs(&uids);
        // Deepest first: device-plugins, then /var/lib/kubelet when it is empty.
        for dir in self.made.iter().rev() {
            // The pods' entries are gone, and containerd removed their network namespaces.
            let removed = if dir.as_path() == Path::new(DEVICE_PLUGINS) {
                fs::remove_dir_all(dir)
            } else {
                fs::remove_dir(dir)
            };
            if let Err(e) = removed
                && e.kind() != std::io::ErrorKind::NotFound
            {
                eprintln!("testbed: cannot remove {}: {e}", dir.display());
            }
        }
        // The TempDir removes the node's directory next.
    }
}

/// `dir` and every directory below it (not following links).
fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    out.push(dir.to_path_buf());
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            collect_dirs(&entry.path(), out);
        }
    }
}

/// The last `lines` lines of a log file.
fn log_tail(path: &Path, lines: usize) -> String {
    let log = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = log.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

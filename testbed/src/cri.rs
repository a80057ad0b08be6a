//! Kubernetes-shaped pods on a private containerd, driven through CRI as a kubelet would.
//!
//! [`Cri::start`] starts containerd with its CRI plugin (configuration, root, state and socket in
//! a fresh temporary directory; runc as the runtime; `restrict_oom_score_adj`, as this machine
//! cannot lower a process's OOM score) and imports two images built from the busybox root
//! filesystem into its `k8s.io` namespace, so no registry is needed: [`PAUSE_IMAGE`] (`sleep
//! infinity`, the pod sandbox) and [`BUSYBOX_IMAGE`] (`sh`). Pods share the host's network (there
//! is no CNI). Containers log in CRI format to `<pod log directory>/<log path>`, by default
//! `<container name>/0.log` as with a kubelet, which [`Container::logs`] reads back into the bytes
//! written.
//!
//! Everything is removed on drop, also when a test panics: a [`Pod`] stops and removes its
//! sandbox and containers and its pod cgroup; the [`Cri`] removes the pods left, stops containerd
//! and its shims, deletes what runc still runs, unmounts and deletes its directory.
//!
//! ```no_run
//! use std::time::Duration;
//! use testbed::cri::{ContainerSpec, Cri, PodSpec};
//!
//! let Some(cri) = Cri::start_or_skip() else { return };
//! let pod = cri.run_pod(&PodSpec::new("web")).unwrap();
//! let c = pod
//!     .create_container(&ContainerSpec::new("app", ["sh", "-c", "echo hi; echo oops >&2"]))
//!     .unwrap();
//! c.start().unwrap();
//! assert_eq!(c.wait(Duration::from_secs(10)).unwrap(), 0);
//! let logs = c.logs().unwrap();
//! assert_eq!((logs.stdout_text(), logs.stderr_text()), ("hi\n".into(), "oops\n".into()));
//! pod.stop_and_remove().unwrap();
//! ```
//!
//! The API is blocking, like the rest of the test bed. Calls run on a small runtime of the
//! [`Cri`]'s own, so they may also be made from async tests (they block the calling thread).

mod api;
mod log;

use std::{
    fs,
    path::{Component, Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, anyhow, bail, ensure};
use hyper_util::rt::TokioIo;
use rustix::mount::{UnmountFlags, unmount};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tempfile::TempDir;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};

pub use api::ContainerState;
pub use log::{Logs, parse as parse_log};

use crate::{
    Output,
    containerd::{kill_shims, remove_with_runc, search_path, toml_string},
    layout, oci,
};

/// The containerd namespace the CRI plugin works in.
pub const NAMESPACE: &str = "k8s.io";

/// The image of the pod sandboxes: the busybox root filesystem running `sleep infinity`.
pub const PAUSE_IMAGE: &str = "localhost/relay-testbed/pause:latest";

/// The busybox root filesystem as an image with no entrypoint and `sh` as its command (like
/// Docker's busybox): the default image of a [`ContainerSpec`].
pub const BUSYBOX_IMAGE: &str = "localhost/relay-testbed/busybox:latest";

/// How long containerd may take to answer CRI calls after it starts (~0.1-0.5 s here), and to
/// import the images and see them through CRI.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How long one CRI call may take (RunPodSandbox takes 0.1-0.5 s here).
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// How long cleaning up may wait for a pod cgroup to empty.
const CGROUP_TIMEOUT: Duration = Duration::from_secs(5);

/// How often conditions with a deadline are checked.
const POLL: Duration = Duration::from_millis(5);

/// A containerd of our own serving CRI, and a client for it. Dropping it removes every pod left,
/// stops containerd and deletes its directory.
#[derive(Debug)]
pub struct Cri {
    /// Runs the gRPC calls; `None` once shut down in [`Drop`].
    runtime: Option<tokio::runtime::Runtime>,
    channel: Channel,
    child: Child,
    dir: TempDir,
    address: PathBuf,
    /// The cgroup parents of the pods run so far, removed again with their pod (and here at the
    /// latest).
    cgroups: Mutex<Vec<String>>,
}

impl Cri {
    /// Starts containerd with the CRI plugin and a configuration of its own, waits until CRI
    /// answers, and imports [`PAUSE_IMAGE`] and [`BUSYBOX_IMAGE`].
    ///
    /// Fails when the test bed is [unavailable](crate::unavailable) or containerd does not come up.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(false)
    }

    /// As [`start`](Self::start), with a pod network for a real kubelet when `pod_network`: the
    /// CNI configuration and plugins of [`write_pod_network`] are in place before containerd
    /// starts (its 1.6 CNI watcher ignores files created later), so pods without host network
    /// get a network namespace of their own with an address, and nothing outside it.
    pub(crate) fn start_with(pod_network: bool) -> anyhow::Result<Self> {
        if let Some(reason) = crate::unavailable() {
            bail!("{reason}");
        }
        let dir = tempfile::Builder::new()
            .prefix("relay-cri-")
            .tempdir()
            .context("cannot create a directory for containerd")?;
        if pod_network {
            write_pod_network(dir.path())?;
        }
        let address = dir.path().join("containerd.sock");
        let config = dir.path().join("config.toml");
        fs::write(&config, config_toml(dir.path(), &address)?)
            .with_context(|| format!("cannot write {}", config.display()))?;
        let log_path = dir.path().join("containerd.log");
        let log = fs::File::create(&log_path)
            .with_context(|| format!("cannot create {}", log_path.display()))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("testbed-cri")
            .enable_all()
            .build()
            .context("cannot start a runtime for the CRI client")?;
        let channel = {
            let _entered = runtime.enter();
            let socket = address.clone();
            Endpoint::from_static("http://containerd")
                .connect_timeout(CALL_TIMEOUT)
                .timeout(CALL_TIMEOUT)
                .connect_with_connector_lazy(tower::service_fn(move |_| {
                    let socket = socket.clone();
                    async move { UnixStream::connect(socket).await.map(TokioIo::new) }
                }))
        };
        let bin = layout::containerd_bin_dir().join("containerd");
        let child = Command::new(&bin)
            .arg("--config")
            .arg(&config)
            .env("PATH", search_path()?)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        // From here on, dropping `cri` stops the child again.
        let mut cri = Self {
            runtime: Some(runtime),
            channel,
            child,
            dir,
            address,
            cgroups: Mutex::new(Vec::new()),
        };
        let deadline = Instant::now() + START_TIMEOUT;
        cri.wait_ready(deadline)?;
        cri.import_images(deadline)?;
        Ok(cri)
    }

    /// For tests: [`start`](Self::start) when the test bed is available here, otherwise `None`
    /// after [`skip_or_fail`](crate::skip_or_fail) has said why.
    ///
    /// # Panics
    ///
    /// When the test bed is unavailable and `RELAY_REQUIRE_TESTBED=1`, or when containerd does
    /// not start although it is installed.
    pub fn start_or_skip() -> Option<Self> {
        crate::start_or_skip("containerd with CRI", Self::start)
    }

    /// containerd's gRPC socket, which also serves CRI.
    pub fn address(&self) -> &Path {
        &self.address
    }

    /// This instance's directory: containerd's configuration, log, root and state, and the pods'
    /// log directories (`pods/<namespace>_<name>_<uid>`). Deleted on drop.
    pub fn directory(&self) -> &Path {
        self.dir.path()
    }

    /// `ctr` talking to this containerd in the CRI's namespace ([`NAMESPACE`]).
    pub fn ctr(&self) -> Command {
        let mut ctr = Command::new(layout::containerd_bin_dir().join("ctr"));
        ctr.arg("--address")
            .arg(&self.address)
            .args(["--namespace", NAMESPACE, "--connect-timeout", "5s"])
            .stdin(Stdio::null());
        ctr
    }

    /// The ids of the pod sandboxes containerd knows, ready or not.
    pub fn pod_ids(&self) -> anyhow::Result<Vec<String>> {
        let pods = self.call(api::ListPodSandboxRequest {})?;
        Ok(pods.items.into_iter().map(|p| p.id).collect())
    }

    /// Runs a pod sandbox (RunPodSandbox), with its log directory under this instance's directory.
    ///
    /// Fails for a pod without host network (there is no CNI here) and for an invalid cgroup
    /// parent; otherwise with containerd's error.
    pub fn run_pod(&self, spec: &PodSpec) -> anyhow::Result<Pod<'_>> {
        ensure!(
            spec.host_network,
            "pod {}: only host-network pods can run here (no CNI plugins are installed)",
            spec.name
        );
        ensure!(
            spec.cgroup_parent.starts_with('/') && is_plain_relative(&spec.cgroup_parent[1..]),
            "pod {}: cgroup parent {:?} is not an absolute path without `..`",
            spec.name,
            spec.cgroup_parent
        );
        for (what, value) in [
            ("name", &spec.name),
            ("namespace", &spec.namespace),
            ("uid", &spec.uid),
        ] {
            ensure!(
                !value.is_empty() && !value.contains(['/', '_']) && value != "..",
                "pod {}: invalid {what} {value:?}",
                spec.name
            );
        }
        // As a kubelet does: /var/log/pods/<namespace>_<name>_<uid>, made before the sandbox.
        let log_directory = self
            .dir
            .path()
            .join("pods")
            .join(format!("{}_{}_{}", spec.namespace, spec.name, spec.uid));
        fs::create_dir_all(&log_directory)
            .with_context(|| format!("cannot create {}", log_directory.display()))?;
        let log_directory = fs::canonicalize(&log_directory)?;
        let host = api::NamespaceOption {
            network: api::NamespaceMode::Node.into(),
            pid: api::NamespaceMode::Container.into(),
            ipc: api::NamespaceMode::Pod.into(),
        };
        let config = api::PodSandboxConfig {
            metadata: Some(api::PodSandboxMetadata {
                name: spec.name.clone(),
                uid: spec.uid.clone(),
                namespace: spec.namespace.clone(),
                attempt: 0,
            }),
            // Must be empty with the host's network namespace.
            hostname: String::new(),
            log_directory: path_string(&log_directory)?,
            labels: [
                ("io.kubernetes.pod.name", &spec.name),
                ("io.kubernetes.pod.namespace", &spec.namespace),
                ("io.kubernetes.pod.uid", &spec.uid),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.clone()))
            .collect(),
            annotations: Default::default(),
            linux: Some(api::LinuxPodSandboxConfig {
                cgroup_parent: spec.cgroup_parent.clone(),
                security_context: Some(api::LinuxSandboxSecurityContext {
                    namespace_options: Some(host),
                }),
            }),
        };
        self.lock_cgroups().push(spec.cgroup_parent.clone());
        let id = self
            .call(api::RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: String::new(),
            })
            .with_context(|| format!("cannot run pod {}", spec.name))?
            .pod_sandbox_id;
        Ok(Pod {
            cri: self,
            id,
            spec: spec.clone(),
            config,
            log_directory,
            removed: false,
        })
    }

    /// Makes a CRI call on the runtime and waits for its answer. A failed call's error carries
    /// the [`tonic::Status`], for callers that look at its code.
    fn call<R: api::Rpc>(&self, request: R) -> anyhow::Result<R::Response> {
        let method = R::PATH.rsplit('/').next().unwrap_or(R::PATH);
        let runtime = self
            .runtime
            .as_ref()
            .context("the CRI client is shut down")?;
        let (tx, rx) = mpsc::sync_channel(1);
        let channel = self.channel.clone();
        runtime.spawn(async move {
            let _ = tx.send(api::call(channel, request).await);
        });
        match rx.recv() {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(status)) => Err(anyhow::Error::new(status).context(format!("CRI {method}"))),
            Err(_) => bail!("CRI {method}: the call was dropped"),
        }
    }

    /// Waits until CRI answers (the plugin refuses calls until it is initialized).
    fn wait_ready(&mut self, deadline: Instant) -> anyhow::Result<()> {
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("containerd exited with {status}:\n{}", self.log_tail());
            }
            let answer = if self.address.exists() {
                self.call(api::VersionRequest {
                    version: "v1".to_owned(),
                })
            } else {
                Err(anyhow!("no socket yet"))
            };
            match answer {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() >= deadline => bail!(
                    "CRI did not answer within {START_TIMEOUT:?} ({e:#}):\n{}",
                    self.log_tail()
                ),
                Err(_) => thread::sleep(POLL),
            }
        }
    }

    /// Imports the busybox images with `ctr` and waits until CRI sees them.
    fn import_images(&self, deadline: Instant) -> anyhow::Result<()> {
        let archive = self.dir.path().join("images.tar");
        oci::write_archive(
            &layout::busybox_rootfs(),
            &[],
            &[
                oci::Image {
                    name: PAUSE_IMAGE,
                    entrypoint: &["sleep"],
                    cmd: &["infinity"],
                },
                oci::Image {
                    name: BUSYBOX_IMAGE,
                    entrypoint: &[],
                    cmd: &["sh"],
                },
            ],
            &archive,
        )
        .context("cannot build the busybox images")?;
        self.import_archive(&archive, &[PAUSE_IMAGE, BUSYBOX_IMAGE], deadline)
    }

    /// Imports the OCI archive at `archive` with `ctr` and waits (until `deadline`) until CRI
    /// sees each of `names` (it learns of them from containerd's events).
    pub(crate) fn import_archive(
        &self,
        archive: &Path,
        names: &[&str],
        deadline: Instant,
    ) -> anyhow::Result<()> {
        let out = self
            .ctr()
            .args(["images", "import", "--snapshotter", "overlayfs"])
            .arg(archive)
            .output()
            .context("cannot run ctr images import")?;
        ensure!(
            out.status.success(),
            "ctr images import failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        for &image in names {
            loop {
                let status = self.call(api::ImageStatusRequest {
                    image: Some(api::ImageSpec {
                        image: image.to_owned(),
                    }),
                })?;
                if status.image.is_some() {
                    break;
                }
                ensure!(
                    Instant::now() < deadline,
                    "CRI does not see the imported image {image}:\n{}",
                    self.log_tail()
                );
                thread::sleep(POLL);
            }
        }
        Ok(())
    }

    /// Stops and removes pod sandbox `id` with its containers, then its cgroup `cgroup_parent`.
    fn remove_pod(&self, id: &str, cgroup_parent: &str) -> anyhow::Result<()> {
        // Kills the containers (no grace period) and the sandbox.
        self.call(api::StopPodSandboxRequest {
            pod_sandbox_id: id.to_owned(),
        })?;
        self.call(api::RemovePodSandboxRequest {
            pod_sandbox_id: id.to_owned(),
        })?;
        // The runtime removes the cgroups of the containers and the sandbox; the pod's own, which
        // a kubelet would have made, is left to us.
        remove_cgroup(cgroup_parent)?;
        self.lock_cgroups().retain(|c| c != cgroup_parent);
        Ok(())
    }

    fn lock_cgroups(&self) -> std::sync::MutexGuard<'_, Vec<String>> {
        self.cgroups.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// containerd's pid, whose open files tell when a log file is complete.
    fn containerd_pid(&self) -> u32 {
        self.child.id()
    }

    /// Removes the pods containerd still has, while it answers; tries them all, and reports the
    /// first failure.
    fn remove_all(&mut self) -> anyhow::Result<()> {
        if self.child.try_wait()?.is_some() {
            return Ok(());
        }
        let mut first_error = None;
        for id in self.pod_ids()? {
            let removed = self
                .call(api::StopPodSandboxRequest {
                    pod_sandbox_id: id.clone(),
                })
                .and_then(|_| {
                    self.call(api::RemovePodSandboxRequest {
                        pod_sandbox_id: id.clone(),
                    })
                })
                .with_context(|| format!("pod sandbox {id}"));
            if let Err(e) = removed {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// The end of containerd's log, for error messages.
    fn log_tail(&self) -> String {
        let log = fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Cri {
    fn drop(&mut self) {
        if let Err(e) = self.remove_all() {
            eprintln!("testbed: removing pods through CRI: {e:#}");
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let runc_root = self.dir.path().join("runc").join(NAMESPACE);
        if let Err(e) = remove_with_runc(&runc_root) {
            eprintln!("testbed: removing containers through runc: {e:#}");
        }
        kill_shims(&self.address);
        // Left mounted when containerd or a shim died first: sandbox /dev/shm, container roots.
        for mount in mounts_under(self.dir.path()) {
            if let Err(e) = unmount(&mount, UnmountFlags::DETACH) {
                eprintln!("testbed: cannot unmount {}: {e}", mount.display());
            }
        }
        for cgroup in std::mem::take(&mut *self.lock_cgroups()) {
            if let Err(e) = remove_cgroup(&cgroup) {
                eprintln!("testbed: {e:#}");
            }
        }
        if let Some(runtime) = self.runtime.take() {
            // Never blocks, so dropping a `Cri` inside an async test is fine too.
            runtime.shutdown_background();
        }
    }
}

/// A pod to run: its Kubernetes identity and cgroup parent. Only host-network pods can run here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSpec {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    /// The cgroup path (in every hierarchy) under which the sandbox and each container get a
    /// cgroup named by their id, as a kubelet with the cgroupfs driver sets it:
    /// `/kubepods/burstable/pod<uid>`.
    pub cgroup_parent: String,
    /// Share the host's network namespace (`hostNetwork: true`); must be `true` here.
    pub host_network: bool,
}

impl PodSpec {
    /// Pod `name` in namespace `default` with a fresh uid, a burstable pod's cgroup parent and
    /// host network.
    pub fn new(name: impl Into<String>) -> Self {
        let uid = new_uid();
        Self {
            name: name.into(),
            namespace: "default".to_owned(),
            cgroup_parent: format!("/kubepods/burstable/pod{uid}"),
            uid,
            host_network: true,
        }
    }
}

/// A bind mount of a host file or directory into a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub host: PathBuf,
    pub container: PathBuf,
    pub read_only: bool,
}

/// A container to create in a pod.
///
/// [`ContainerSpec::new`] gives [`BUSYBOX_IMAGE`], no arguments or environment beyond the
/// image's (`PATH`), the image's user (root), a writable root, no mounts and the log at
/// `<name>/0.log`; the other methods change one thing each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerSpec {
    /// Unique in the pod.
    pub name: String,
    pub image: String,
    /// Replaces the image's entrypoint (Kubernetes' `command`) unless empty.
    pub command: Vec<String>,
    /// Replaces the image's command (Kubernetes' `args`).
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub mounts: Vec<Mount>,
    /// The log file, relative to the pod's log directory.
    pub log_path: PathBuf,
    /// `(uid, gid)` to run as instead of the image's user.
    pub user: Option<(u32, u32)>,
    pub read_only_rootfs: bool,
    /// The working directory, instead of the image's.
    pub working_dir: Option<PathBuf>,
}

impl ContainerSpec {
    /// Container `name` running `command` in [`BUSYBOX_IMAGE`].
    pub fn new(
        name: impl Into<String>,
        command: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        let name = name.into();
        Self {
            log_path: Path::new(&name).join("0.log"),
            name,
            image: BUSYBOX_IMAGE.to_owned(),
            command: command.into_iter().map(Into::into).collect(),
            args: Vec::new(),
            env: Vec::new(),
            mounts: Vec::new(),
            user: None,
            read_only_rootfs: false,
            working_dir: None,
        }
    }

    /// Sets the arguments (Kubernetes' `args`).
    #[must_use]
    pub fn args(mut self, args: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.args = args.into_iter().map(Into::into).collect();
        self
    }

    /// Adds `key=value` to the environment.
    #[must_use]
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Bind-mounts the host's `host` at `container`.
    #[must_use]
    pub fn bind(
        mut self,
        host: impl Into<PathBuf>,
        container: impl Into<PathBuf>,
        read_only: bool,
    ) -> Self {
        self.mounts.push(Mount {
            host: host.into(),
            container: container.into(),
            read_only,
        });
        self
    }

    /// Runs `image` instead of busybox.
    #[must_use]
    pub fn image(mut self, image: impl Into<String>) -> Self {
        self.image = image.into();
        self
    }

    /// Logs to `path`, relative to the pod's log directory.
    #[must_use]
    pub fn log_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.log_path = path.into();
        self
    }

    /// Runs the process as `uid:gid`.
    #[must_use]
    pub fn user(mut self, uid: u32, gid: u32) -> Self {
        self.user = Some((uid, gid));
        self
    }

    /// Mounts the root filesystem read-only.
    #[must_use]
    pub fn read_only_rootfs(mut self) -> Self {
        self.read_only_rootfs = true;
        self
    }

    /// Starts the process in `dir` (Kubernetes' `workingDir`) instead of the image's.
    #[must_use]
    pub fn working_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.working_dir = Some(dir.into());
        self
    }
}

/// A running pod sandbox. Dropping it stops and removes it as
/// [`stop_and_remove`](Self::stop_and_remove) does; its log directory stays until the [`Cri`]
/// goes.
#[derive(Debug)]
pub struct Pod<'c> {
    cri: &'c Cri,
    id: String,
    spec: PodSpec,
    config: api::PodSandboxConfig,
    log_directory: PathBuf,
    removed: bool,
}

impl<'c> Pod<'c> {
    /// The sandbox id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// What the pod was run with.
    pub fn spec(&self) -> &PodSpec {
        &self.spec
    }

    /// Where the pod's containers log (`<namespace>_<name>_<uid>` under the instance's directory).
    pub fn log_directory(&self) -> &Path {
        &self.log_directory
    }

    /// Creates a container in the pod (CreateContainer); [`Container::start`] starts it.
    pub fn create_container(&self, spec: &ContainerSpec) -> anyhow::Result<Container<'c>> {
        let name = &spec.name;
        ensure!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-')),
            "invalid container name {name:?}: use ASCII letters, digits, '.' and '-'"
        );
        ensure!(
            is_plain_relative(&path_string(&spec.log_path)?),
            "container {name}: log path {} is not relative or has `..`",
            spec.log_path.display()
        );
        for mount in &spec.mounts {
            ensure!(
                mount.host.is_absolute() && mount.container.is_absolute(),
                "container {name}: mount {} -> {} is not between absolute paths",
                mount.host.display(),
                mount.container.display()
            );
        }
        let log_path = self.log_directory.join(&spec.log_path);
        if let Some(parent) = log_path.parent() {
            fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        let namespaces = self
            .config
            .linux
            .as_ref()
            .and_then(|l| l.security_context.as_ref())
            .and_then(|s| s.namespace_options.clone());
        let config = api::ContainerConfig {
            metadata: Some(api::ContainerMetadata {
                name: name.clone(),
                attempt: 0,
            }),
            image: Some(api::ImageSpec {
                image: spec.image.clone(),
            }),
            command: spec.command.clone(),
            args: spec.args.clone(),
            working_dir: spec
                .working_dir
                .as_deref()
                .map(path_string)
                .transpose()?
                .unwrap_or_default(),
            envs: spec
                .env
                .iter()
                .map(|(key, value)| api::KeyValue {
                    key: key.clone(),
                    value: value.clone(),
                })
                .collect(),
            mounts: spec
                .mounts
                .iter()
                .map(|m| {
                    Ok(api::Mount {
                        container_path: path_string(&m.container)?,
                        host_path: path_string(&m.host)?,
                        readonly: m.read_only,
                    })
                })
                .collect::<anyhow::Result<_>>()?,
            labels: [("io.kubernetes.container.name", name)]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.clone()))
                .collect(),
            annotations: Default::default(),
            log_path: path_string(&spec.log_path)?,
            linux: Some(api::LinuxContainerConfig {
                security_context: Some(api::LinuxContainerSecurityContext {
                    namespace_options: namespaces,
                    run_as_user: spec
                        .user
                        .map(|(uid, _)| api::Int64Value { value: uid.into() }),
                    run_as_group: spec
                        .user
                        .map(|(_, gid)| api::Int64Value { value: gid.into() }),
                    readonly_rootfs: spec.read_only_rootfs,
                }),
            }),
        };
        let id = self
            .cri
            .call(api::CreateContainerRequest {
                pod_sandbox_id: self.id.clone(),
                config: Some(config),
                sandbox_config: Some(self.config.clone()),
            })
            .with_context(|| format!("cannot create container {name} in pod {}", self.spec.name))?
            .container_id;
        Ok(Container {
            cri: self.cri,
            id,
            name: name.clone(),
            log_path,
        })
    }

    /// Stops the pod (its containers are killed at once) and removes it with its containers and
    /// its pod cgroup (in every hierarchy).
    pub fn stop_and_remove(mut self) -> anyhow::Result<()> {
        self.removed = true;
        self.cri
            .remove_pod(&self.id, &self.spec.cgroup_parent)
            .with_context(|| format!("cannot remove pod {}", self.spec.name))
    }
}

impl Drop for Pod<'_> {
    fn drop(&mut self) {
        if !self.removed
            && let Err(e) = self.cri.remove_pod(&self.id, &self.spec.cgroup_parent)
        {
            eprintln!("testbed: removing pod {}: {e:#}", self.spec.name);
        }
    }
}

/// A container in a pod. It goes with its pod; [`remove`](Self::remove) removes it earlier.
#[derive(Debug)]
pub struct Container<'p> {
    cri: &'p Cri,
    id: String,
    name: String,
    log_path: PathBuf,
}

impl Container<'_> {
    /// The container id (also the name of its cgroup).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The container's name in its pod.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The container's CRI log file.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Starts the container (StartContainer).
    pub fn start(&self) -> anyhow::Result<()> {
        self.cri
            .call(api::StartContainerRequest {
                container_id: self.id.clone(),
            })
            .with_context(|| format!("cannot start container {}", self.name))?;
        Ok(())
    }

    /// The container's state now.
    pub fn state(&self) -> anyhow::Result<ContainerState> {
        let status = self.status()?;
        Ok(ContainerState::try_from(status.state).unwrap_or(ContainerState::Unknown))
    }

    /// Waits until the container has exited and its log is complete (containerd has closed the
    /// log file), and returns its exit code; fails when that takes longer than `timeout`.
    pub fn wait(&self, timeout: Duration) -> anyhow::Result<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.status()?;
            let state = ContainerState::try_from(status.state).unwrap_or(ContainerState::Unknown);
            if state == ContainerState::Exited
                && !holds_open(self.cri.containerd_pid(), &self.log_path)
            {
                return Ok(status.exit_code);
            }
            ensure!(
                Instant::now() < deadline,
                "container {} is still {state:?} after {timeout:?}",
                self.name
            );
            thread::sleep(POLL);
        }
    }

    /// What the container wrote so far, read back from its log (a line still being written is
    /// left out).
    pub fn logs(&self) -> anyhow::Result<Logs> {
        let log = fs::read(&self.log_path)
            .with_context(|| format!("cannot read {}", self.log_path.display()))?;
        parse_log(&log).with_context(|| format!("in {}", self.log_path.display()))
    }

    /// [`wait`](Self::wait)s, then returns the exit code with the [`logs`](Self::logs).
    pub fn output(&self, timeout: Duration) -> anyhow::Result<Output> {
        let code = self.wait(timeout)?;
        let Logs { stdout, stderr } = self.logs()?;
        Ok(Output {
            code,
            stdout,
            stderr,
        })
    }

    /// The host pid of the container's process, while it runs.
    pub fn pid(&self) -> anyhow::Result<u32> {
        let info = self.info()?;
        info["pid"]
            .as_u64()
            .filter(|&pid| pid != 0)
            .and_then(|pid| u32::try_from(pid).ok())
            .with_context(|| format!("container {} has no process", self.name))
    }

    /// The container's cgroup in the cgroup v2 tree (`/sys/fs/cgroup/unified` on a hybrid host):
    /// `<root>/<pod cgroup parent>/<container id>`, from the cgroup path containerd gave runc.
    /// It exists while the container runs.
    pub fn cgroup_v2_path(&self) -> anyhow::Result<PathBuf> {
        let info = self.info()?;
        let cgroup = info["runtimeSpec"]["linux"]["cgroupsPath"]
            .as_str()
            .with_context(|| format!("container {} has no cgroup path", self.name))?;
        ensure!(
            cgroup.starts_with('/') && is_plain_relative(&cgroup[1..]),
            "unexpected cgroup path {cgroup:?}"
        );
        Ok(cgroup_v2_root()?.join(&cgroup[1..]))
    }

    /// The container's cgroup v2 id (the inode of its [cgroup directory](Self::cgroup_v2_path)),
    /// which `bpf_get_current_cgroup_id()` returns for its processes; while it runs.
    pub fn cgroup_id(&self) -> anyhow::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        let path = self.cgroup_v2_path()?;
        Ok(fs::metadata(&path)
            .with_context(|| format!("cannot stat {}", path.display()))?
            .ino())
    }

    /// Stops the container (StopContainer): its stop signal (SIGTERM), then SIGKILL after `grace`
    /// (whole seconds; zero kills at once).
    pub fn stop(&self, grace: Duration) -> anyhow::Result<()> {
        self.cri
            .call(api::StopContainerRequest {
                container_id: self.id.clone(),
                timeout: i64::try_from(grace.as_secs())?,
            })
            .with_context(|| format!("cannot stop container {}", self.name))?;
        Ok(())
    }

    /// Removes the container (RemoveContainer), killing it first when it runs.
    pub fn remove(self) -> anyhow::Result<()> {
        self.cri
            .call(api::RemoveContainerRequest {
                container_id: self.id.clone(),
            })
            .with_context(|| format!("cannot remove container {}", self.name))?;
        Ok(())
    }

    fn status(&self) -> anyhow::Result<api::ContainerStatus> {
        self.status_response(false)?
            .status
            .with_context(|| format!("no status for container {}", self.name))
    }

    /// containerd's verbose information: pid, runtime spec, snapshot, ...
    fn info(&self) -> anyhow::Result<Value> {
        let info = self.status_response(true)?.info;
        let json = info
            .get("info")
            .with_context(|| format!("no verbose status for container {}", self.name))?;
        Ok(serde_json::from_str(json)?)
    }

    fn status_response(&self, verbose: bool) -> anyhow::Result<api::ContainerStatusResponse> {
        self.cri
            .call(api::ContainerStatusRequest {
                container_id: self.id.clone(),
                verbose,
            })
            .with_context(|| format!("no status for container {}", self.name))
    }
}

/// containerd's configuration: everything under `dir`; CRI with runc (state under `dir` too), the
/// cgroupfs driver, overlayfs, the busybox sandbox image, and no OOM score below containerd's own.
fn config_toml(dir: &Path, address: &Path) -> anyhow::Result<String> {
    let root = toml_string(&dir.join("root"))?;
    let state = toml_string(&dir.join("state"))?;
    let grpc = toml_string(address)?;
    let ttrpc = toml_string(&dir.join("containerd.sock.ttrpc"))?;
    let runc = toml_string(&layout::runc())?;
    let runc_root = toml_string(&dir.join("runc"))?;
    let cni_bin = toml_string(&dir.join("cni/bin"))?;
    let cni_conf = toml_string(&dir.join("cni/net.d"))?;
    Ok(format!(
        r#"version = 2
root = {root}
state = {state}
disabled_plugins = [
  "io.containerd.internal.v1.opt",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
]

[grpc]
address = {grpc}

[ttrpc]
address = {ttrpc}

[plugins."io.containerd.grpc.v1.cri"]
sandbox_image = "{PAUSE_IMAGE}"
restrict_oom_score_adj = true
stream_server_address = "127.0.0.1"
stream_server_port = "0"

[plugins."io.containerd.grpc.v1.cri".containerd]
snapshotter = "overlayfs"
default_runtime_name = "runc"

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
runtime_type = "io.containerd.runc.v2"

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
BinaryName = {runc}
Root = {runc_root}
SystemdCgroup = false

[plugins."io.containerd.grpc.v1.cri".cni]
bin_dir = {cni_bin}
conf_dir = {cni_conf}
"#
    ))
}

/// The CNI plugin behind the kubelet's pods that have no host network: it gives the pod's network
/// namespace an `eth0` with an address (containerd 1.6 refuses a sandbox whose network has none,
/// so `loopback` alone runs host-network pods only) and nothing else. `eth0` is one end of a veth
/// pair whose other end stays in the same namespace: unlike `ptp` or `bridge`, nothing is made in
/// the host's network namespace (no interface, route or iptables rule to undo) and the pod can
/// reach nothing but itself. Debian's plugins 1.1 have no `dummy` plugin, and this kernel has no
/// dummy interfaces. The address comes from the sandbox id; pods never talk to each other here.
const POD_NETWORK_PLUGIN: &str = r#"#!/bin/sh
# CNI plugin of the relay test bed: see testbed/src/cri.rs (POD_NETWORK_PLUGIN).
set -e
PATH=/usr/sbin:/usr/bin:/sbin:/bin:$PATH
cat >/dev/null
case "$CNI_COMMAND" in
ADD)
    a=$(printf '%d' "0x$(echo "$CNI_CONTAINERID" | cut -c1-2)")
    b=$(printf '%d' "0x$(echo "$CNI_CONTAINERID" | cut -c3-4)")
    ip="10.88.$a.$b"
    nsenter --net="$CNI_NETNS" ip link add "$CNI_IFNAME" type veth peer name relay-peer0 >&2
    nsenter --net="$CNI_NETNS" ip addr add "$ip/32" dev "$CNI_IFNAME" >&2
    nsenter --net="$CNI_NETNS" ip link set "$CNI_IFNAME" up >&2
    printf '{"cniVersion":"0.4.0","interfaces":[{"name":"%s","sandbox":"%s"}],"ips":[{"version":"4","address":"%s/32","interface":0}]}\n' \
        "$CNI_IFNAME" "$CNI_NETNS" "$ip"
    ;;
DEL | CHECK) ;;
VERSION) echo '{"cniVersion":"0.4.0","supportedVersions":["0.3.0","0.3.1","0.4.0"]}' ;;
*) echo "{\"code\":4,\"msg\":\"unknown CNI_COMMAND $CNI_COMMAND\"}"; exit 1 ;;
esac
"#;

/// Puts the pod network in place under `dir` (`cni/net.d`, `cni/bin`): one conflist naming
/// [`POD_NETWORK_PLUGIN`], that plugin, and Debian's `loopback`, which containerd runs in every
/// pod's namespace itself.
fn write_pod_network(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let bin = dir.join("cni/bin");
    let conf = dir.join("cni/net.d");
    for d in [&bin, &conf] {
        fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    let loopback = layout::cni_bin_dir().join("loopback");
    ensure!(
        loopback.exists(),
        "{} is missing: run `cargo xtask testbed install`",
        loopback.display()
    );
    std::os::unix::fs::symlink(&loopback, bin.join("loopback"))
        .context("cannot link the loopback CNI plugin")?;
    let plugin = bin.join("relay-veth");
    fs::write(&plugin, POD_NETWORK_PLUGIN)
        .with_context(|| format!("cannot write {}", plugin.display()))?;
    fs::set_permissions(&plugin, fs::Permissions::from_mode(0o755))?;
    let conflist = serde_json::json!({
        "cniVersion": "0.4.0",
        "name": "relay-testbed",
        "plugins": [{"type": "relay-veth"}],
    });
    let path = conf.join("10-relay-testbed.conflist");
    fs::write(&path, serde_json::to_vec_pretty(&conflist)?)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Whether `path` is a non-empty relative path of plain components (no `..`, no `.`).
fn is_plain_relative(path: &str) -> bool {
    !path.is_empty()
        && Path::new(path)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
}

fn path_string(path: &Path) -> anyhow::Result<String> {
    path.to_str()
        .map(str::to_owned)
        .with_context(|| format!("{} is not UTF-8", path.display()))
}

/// A random-looking version 4 UUID, unique in this process and very likely across processes.
pub(crate) fn new_uid() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let seed = format!(
        "{nanos} {} {}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let hex = format!("{:x}", Sha256::digest(seed));
    format!(
        "{}-{}-4{}-8{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[13..16],
        &hex[17..20],
        &hex[20..32]
    )
}

/// The root of the cgroup v2 tree: `/sys/fs/cgroup/unified` on a hybrid host, `/sys/fs/cgroup`
/// on a pure v2 host.
pub(crate) fn cgroup_v2_root() -> anyhow::Result<PathBuf> {
    for root in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"] {
        if Path::new(root).join("cgroup.controllers").exists() {
            return Ok(PathBuf::from(root));
        }
    }
    bail!("no cgroup v2 tree under /sys/fs/cgroup")
}

/// Removes cgroup `path` (`/a/b`) from every hierarchy, waiting (up to [`CGROUP_TIMEOUT`]) while
/// a process is still leaving it.
fn remove_cgroup(path: &str) -> anyhow::Result<()> {
    let relative = path.trim_start_matches('/');
    ensure!(is_plain_relative(relative), "invalid cgroup path {path:?}");
    let deadline = Instant::now() + CGROUP_TIMEOUT;
    for hierarchy in cgroup_hierarchies() {
        let dir = hierarchy.join(relative);
        loop {
            match fs::remove_dir(&dir) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e) if Instant::now() >= deadline => {
                    return Err(e)
                        .with_context(|| format!("cannot remove cgroup {}", dir.display()));
                }
                Err(_) => thread::sleep(POLL),
            }
        }
    }
    Ok(())
}

/// The mount points of every cgroup hierarchy (v1 and v2).
pub(crate) fn cgroup_hierarchies() -> Vec<PathBuf> {
    mountinfo()
        .into_iter()
        .filter(|(_, fstype)| fstype == "cgroup" || fstype == "cgroup2")
        .map(|(point, _)| point)
        .collect()
}

/// Mount points at or below `dir`, deepest first.
pub(crate) fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let mut mounts: Vec<PathBuf> = mountinfo()
        .into_iter()
        .map(|(point, _)| point)
        .filter(|point| point.starts_with(dir))
        .collect();
    mounts.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    mounts.dedup();
    mounts
}

/// `(mount point, file system type)` of every mount in our mount namespace.
fn mountinfo() -> Vec<(PathBuf, String)> {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    info.lines()
        .filter_map(|line| {
            let (mount, fs) = line.split_once(" - ")?;
            let point = mount.split(' ').nth(4)?;
            let fstype = fs.split(' ').next()?;
            Some((PathBuf::from(unescape(point)), fstype.to_owned()))
        })
        .collect()
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|b| (b'0'..=b'7').contains(b)));
        if let Some(digits) = octal {
            out.push(
                digits
                    .iter()
                    .fold(0u8, |n, d| n.wrapping_mul(8).wrapping_add(d - b'0')),
            );
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether process `pid` has `path` open.
fn holds_open(pid: u32, path: &Path) -> bool {
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.filter_map(Result::ok)
        .any(|fd| fs::read_link(fd.path()).is_ok_and(|target| target == path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uids_look_like_kubernetes_uids() {
        let (a, b) = (new_uid(), new_uid());
        assert_ne!(a, b);
        let parts: Vec<&str> = a.split('-').collect();
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12]
        );
        assert!(a.chars().all(|c| c == '-' || c.is_ascii_hexdigit()));
        let spec = PodSpec::new("p");
        assert_eq!(
            spec.cgroup_parent,
            format!("/kubepods/burstable/pod{}", spec.uid)
        );
    }

    #[test]
    fn plain_relative_paths() {
        assert!(is_plain_relative("a/0.log"));
        for bad in ["", "/a", "../a", "a/../b", "./a"] {
            assert!(!is_plain_relative(bad), "{bad}");
        }
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape(r"/tmp/a\040b\134c"), r"/tmp/a b\c");
        assert_eq!(unescape(r"/x\04"), r"/x\04");
    }

    #[test]
    fn config_names_our_runc_and_sandbox_image() {
        let toml = config_toml(Path::new("/d"), Path::new("/d/s.sock")).unwrap();
        assert!(toml.contains(&format!("sandbox_image = \"{PAUSE_IMAGE}\"")));
        assert!(toml.contains("restrict_oom_score_adj = true"));
        assert!(toml.contains("Root = \"/d/runc\""));
    }
}

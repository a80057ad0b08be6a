//! What a container run is made of, and the OCI runtime spec it becomes.

use std::{
    fmt,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, ensure};
use serde_json::{Value, json};

use crate::layout;

/// The `PATH` every container starts with, as containerd sets it.
const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// containerd's default capability set (what `ctr run` and the CRI plugin give a container).
const CAPABILITIES: [&str; 14] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// A container to run to completion: a command in a root filesystem, as a user, with mounts.
///
/// [`Run::new`] gives the busybox root filesystem, root (0:0), a writable root, `PATH` only, no
/// extra mounts, a cgroup of its own and a 60 s deadline; the other methods change one thing each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    /// Container id: ASCII letters, digits, `.`, `_` and `-`; unique in its containerd.
    pub id: String,
    /// The root filesystem directory. Each run gets a copy (runc creates mount points in it, and
    /// a writable container could change it), so the directory itself is never modified.
    pub rootfs: PathBuf,
    /// The process: program and arguments. The program is looked up in `PATH`.
    pub args: Vec<String>,
    /// `KEY=value` entries; `PATH` is set by default.
    pub env: Vec<String>,
    /// User id of the process.
    pub uid: u32,
    /// Group id of the process.
    pub gid: u32,
    /// Mount the root filesystem read-only.
    pub read_only: bool,
    /// Mounts on top of the defaults (`/proc`, `/dev`, `/sys`, `/run`, ...), in order.
    pub mounts: Vec<Mount>,
    /// The cgroup path (`/a/b`, relative to each hierarchy's root); by default a path of its own
    /// under `/relay-testbed`.
    pub cgroup: Option<String>,
    /// How long the container may run before it is killed and the run fails.
    pub timeout: Duration,
    /// Share the host's network namespace (as a pod with `hostNetwork`), so the container reaches
    /// servers on the host's loopback.
    pub host_network: bool,
    /// Share the host's pid namespace (see [`Run::host_pid`]).
    pub host_pid: bool,
}

/// A mount added to a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mount {
    /// A host file or directory bind-mounted at `container`.
    Bind {
        host: PathBuf,
        container: PathBuf,
        read_only: bool,
    },
    /// An empty tmpfs (mode 1777) at `container`.
    Tmpfs { container: PathBuf },
}

/// How a container ended: its exit code (128 + signal number when a signal killed it) and
/// everything it wrote to stdout and stderr.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Output {
    /// stdout as text (invalid UTF-8 replaced).
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// stderr as text (invalid UTF-8 replaced).
    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

impl fmt::Display for Output {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "exit code {}, stdout {:?}, stderr {:?}",
            self.code,
            self.stdout_text(),
            self.stderr_text()
        )
    }
}

impl Run {
    /// `args` as root in the busybox root filesystem, container id `id`.
    pub fn new(id: impl Into<String>, args: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self {
            id: id.into(),
            rootfs: layout::busybox_rootfs(),
            args: args.into_iter().map(Into::into).collect(),
            env: vec![DEFAULT_PATH.to_owned()],
            uid: 0,
            gid: 0,
            read_only: false,
            mounts: Vec::new(),
            cgroup: None,
            timeout: Duration::from_secs(60),
            host_network: false,
            host_pid: false,
        }
    }

    /// Sets `key=value` in the environment (replacing an earlier value).
    #[must_use]
    pub fn env(mut self, key: &str, value: &str) -> Self {
        let prefix = format!("{key}=");
        self.env.retain(|e| !e.starts_with(&prefix));
        self.env.push(format!("{key}={value}"));
        self
    }

    /// Runs the process as `uid:gid`.
    #[must_use]
    pub fn user(mut self, uid: u32, gid: u32) -> Self {
        self.uid = uid;
        self.gid = gid;
        self
    }

    /// Mounts the root filesystem read-only.
    #[must_use]
    pub fn read_only(mut self) -> Self {
        self.read_only = true;
        self
    }

    /// Bind-mounts the host's `host` (file or directory) at `container`.
    #[must_use]
    pub fn bind(
        mut self,
        host: impl Into<PathBuf>,
        container: impl Into<PathBuf>,
        read_only: bool,
    ) -> Self {
        self.mounts.push(Mount::Bind {
            host: host.into(),
            container: container.into(),
            read_only,
        });
        self
    }

    /// Mounts an empty tmpfs at `container` (say `/tmp` under a read-only root).
    #[must_use]
    pub fn tmpfs(mut self, container: impl Into<PathBuf>) -> Self {
        self.mounts.push(Mount::Tmpfs {
            container: container.into(),
        });
        self
    }

    /// Puts the container in cgroup `path` (`/a/b`) in every hierarchy.
    #[must_use]
    pub fn cgroup(mut self, path: impl Into<String>) -> Self {
        self.cgroup = Some(path.into());
        self
    }

    /// Runs in the host's pid namespace: the command is not its namespace's pid 1, as in a pod
    /// with `shareProcessNamespace` (where the pause container is).
    #[must_use]
    pub fn host_pid(mut self) -> Self {
        self.host_pid = true;
        self
    }

    /// Runs in the host's network namespace.
    #[must_use]
    pub fn host_network(mut self) -> Self {
        self.host_network = true;
        self
    }

    /// Uses `dir` as the root filesystem instead of busybox.
    #[must_use]
    pub fn rootfs(mut self, dir: impl Into<PathBuf>) -> Self {
        self.rootfs = dir.into();
        self
    }

    /// Kills the container and fails the run after `timeout`.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Checks what containerd or runc would refuse with a less clear message, and what would
    /// escape the run's directory.
    pub(crate) fn validate(&self) -> anyhow::Result<()> {
        let id = &self.id;
        ensure!(
            !id.is_empty()
                && id.len() <= 76
                && id.starts_with(|c: char| c.is_ascii_alphanumeric())
                && id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')),
            "invalid container id {id:?}: use up to 76 ASCII letters, digits, '.', '_' and '-'"
        );
        ensure!(!self.args.is_empty(), "container {id}: no command to run");
        ensure!(
            self.rootfs.is_absolute() && self.rootfs.is_dir(),
            "container {id}: root filesystem {} is not an absolute path to a directory",
            self.rootfs.display()
        );
        for mount in &self.mounts {
            let (Mount::Bind { container, .. } | Mount::Tmpfs { container }) = mount;
            ensure!(
                container.is_absolute(),
                "container {id}: mount point {} is not absolute",
                container.display()
            );
            if let Mount::Bind { host, .. } = mount
                && !host.is_absolute()
            {
                bail!(
                    "container {id}: bind source {} is not absolute",
                    host.display()
                );
            }
        }
        Ok(())
    }

    /// The OCI runtime spec (`config.json`) of this run, with its root filesystem at `rootfs` and
    /// its cgroup at `cgroup`. Close to what `ctr run` generates, except that a non-root process
    /// starts without effective capabilities (as with Docker).
    pub(crate) fn spec(&self, rootfs: &Path, cgroup: &str) -> Value {
        let caps = CAPABILITIES.to_vec();
        let granted = if self.uid == 0 {
            caps.clone()
        } else {
            Vec::new()
        };
        let mut mounts = vec![
            json!({"destination": "/proc", "type": "proc", "source": "proc",
                   "options": ["nosuid", "noexec", "nodev"]}),
            json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
                   "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
            json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts",
                   "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]}),
            json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
                   "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
            json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
                   "options": ["nosuid", "noexec", "nodev"]}),
            json!({"destination": "/sys", "type": "sysfs", "source": "sysfs",
                   "options": ["nosuid", "noexec", "nodev", "ro"]}),
            json!({"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
                   "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}),
            json!({"destination": "/run", "type": "tmpfs", "source": "tmpfs",
                   "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        ];
        for mount in &self.mounts {
            mounts.push(match mount {
                Mount::Bind {
                    host,
                    container,
                    read_only,
                } => json!({
                    "destination": container, "type": "bind", "source": host,
                    "options": ["rbind", if *read_only { "ro" } else { "rw" }],
                }),
                Mount::Tmpfs { container } => json!({
                    "destination": container, "type": "tmpfs", "source": "tmpfs",
                    "options": ["nosuid", "nodev", "mode=1777"],
                }),
            });
        }
        let mut namespaces = vec![
            json!({"type": "ipc"}),
            json!({"type": "uts"}),
            json!({"type": "mount"}),
        ];
        if !self.host_network {
            namespaces.push(json!({"type": "network"}));
        }
        if !self.host_pid {
            namespaces.push(json!({"type": "pid"}));
        }
        json!({
            "ociVersion": "1.0.2",
            "process": {
                "terminal": false,
                "user": {"uid": self.uid, "gid": self.gid},
                "args": self.args,
                "env": self.env,
                "cwd": "/",
                "capabilities": {
                    "bounding": caps,
                    "effective": granted,
                    "permitted": granted,
                },
                "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
                "noNewPrivileges": true,
            },
            "root": {"path": rootfs, "readonly": self.read_only},
            "hostname": self.id,
            "mounts": mounts,
            "linux": {
                "cgroupsPath": cgroup,
                "resources": {"devices": [{"allow": false, "access": "rwm"}]},
                "namespaces": namespaces,
                "maskedPaths": [
                    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys",
                    "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
                    "/proc/sched_debug", "/sys/firmware", "/proc/scsi",
                ],
                "readonlyPaths": [
                    "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger",
                ],
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_carries_the_run() {
        let run = Run::new("t1", ["sh", "-c", "true"])
            .env("A", "1")
            .env("A", "2")
            .user(65534, 65534)
            .read_only()
            .bind("/host/bin", "/relay/lib/bin", true)
            .tmpfs("/tmp");
        run.validate().unwrap();
        let spec = run.spec(Path::new("/r"), "/g/t1");
        assert_eq!(spec["process"]["args"], json!(["sh", "-c", "true"]));
        assert_eq!(spec["process"]["env"], json!([DEFAULT_PATH, "A=2"]));
        assert_eq!(spec["process"]["user"], json!({"uid": 65534, "gid": 65534}));
        assert_eq!(spec["process"]["capabilities"]["effective"], json!([]));
        assert_eq!(spec["root"], json!({"path": "/r", "readonly": true}));
        assert_eq!(spec["linux"]["cgroupsPath"], "/g/t1");
        let mounts = spec["mounts"].as_array().unwrap();
        assert_eq!(
            mounts[mounts.len() - 2],
            json!({"destination": "/relay/lib/bin", "type": "bind", "source": "/host/bin",
                   "options": ["rbind", "ro"]})
        );
        assert_eq!(mounts[mounts.len() - 1]["type"], "tmpfs");
    }

    #[test]
    fn invalid_runs_are_refused() {
        let ok = Run::new("ok", ["true"]).rootfs("/");
        ok.validate().unwrap();
        for bad in [
            Run {
                id: "a/b".into(),
                ..ok.clone()
            },
            Run {
                id: "../x".into(),
                ..ok.clone()
            },
            Run {
                id: String::new(),
                ..ok.clone()
            },
            Run {
                args: Vec::new(),
                ..ok.clone()
            },
            ok.clone().rootfs("relative"),
            ok.clone().bind("/a", "relative", true),
            ok.clone().bind("relative", "/a", true),
            ok.clone().tmpfs("tmp"),
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}

//! A private containerd: its own configuration, state and socket under a fresh temporary
//! directory, started as a child process and torn down (containers included) on drop.

use std::{
    fs,
    io::Read,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use rustix::{
    event::{PollFd, PollFlags, Timespec, poll},
    io::Errno,
    process::{Pid, PidfdFlags, Signal, pidfd_open, pidfd_send_signal},
};
use tempfile::TempDir;

use crate::{Output, Run, layout};

/// The containerd namespace every container of the test bed lives in.
pub const NAMESPACE: &str = "testbed";

/// How long containerd may take to answer after it starts (it usually takes ~0.1 s).
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// How long `ctr` may wait for containerd's socket in the commands it runs for us.
const CONNECT_TIMEOUT: &str = "5s";

/// A containerd of our own, with runc as its runtime. Dropping it removes every container left
/// behind, stops containerd and deletes its directory.
#[derive(Debug)]
pub struct Containerd {
    child: Child,
    dir: TempDir,
    address: PathBuf,
    /// This instance's name (its directory's), which keeps its default cgroups apart from those
    /// of other instances running at the same time.
    instance: String,
}

impl Containerd {
    /// Starts containerd with a configuration of its own (root, state and sockets in a fresh
    /// temporary directory, no CRI plugin) and waits until `ctr version` gets an answer.
    ///
    /// Fails when the test bed is [unavailable](crate::unavailable) or containerd does not come up.
    pub fn start() -> anyhow::Result<Self> {
        if let Some(reason) = crate::unavailable() {
            bail!("{reason}");
        }
        let dir = tempfile::Builder::new()
            .prefix("relay-testbed-")
            .tempdir()
            .context("cannot create a directory for containerd")?;
        let instance = dir
            .path()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .context("temporary directory without a name")?;
        let address = dir.path().join("containerd.sock");
        let config = dir.path().join("config.toml");
        fs::write(&config, config_toml(dir.path(), &address)?)
            .with_context(|| format!("cannot write {}", config.display()))?;
        let log_path = dir.path().join("containerd.log");
        let log = fs::File::create(&log_path)
            .with_context(|| format!("cannot create {}", log_path.display()))?;
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
        // From here on, dropping `containerd` stops the child again.
        let mut containerd = Self {
            child,
            dir,
            address,
            instance,
        };
        containerd.wait_ready()?;
        Ok(containerd)
    }

    /// For tests: [`start`](Self::start) when the test bed is available here, otherwise `None`
    /// after [`skip_or_fail`](crate::skip_or_fail) has said why.
    ///
    /// # Panics
    ///
    /// When the test bed is unavailable and `RELAY_REQUIRE_TESTBED=1`, or when containerd does
    /// not start although it is installed.
    pub fn start_or_skip() -> Option<Self> {
        crate::start_or_skip("containerd", Self::start)
    }

    /// containerd's gRPC socket.
    pub fn address(&self) -> &Path {
        &self.address
    }

    /// `ctr` talking to this containerd in [`NAMESPACE`], for anything [`run`](Self::run) does
    /// not cover.
    pub fn ctr(&self) -> Command {
        let mut ctr = Command::new(layout::containerd_bin_dir().join("ctr"));
        ctr.arg("--address")
            .arg(&self.address)
            .args([
                "--namespace",
                NAMESPACE,
                "--connect-timeout",
                CONNECT_TIMEOUT,
            ])
            .stdin(Stdio::null());
        ctr
    }

    /// Runs a container to completion (`ctr run --rm`) and returns its exit code and output.
    ///
    /// The container gets a copy of `run.rootfs`. stdout and stderr are read as they come, so a
    /// chatty container never blocks. Past `run.timeout` the container is killed and removed,
    /// and the run fails; so does it when containerd or runc cannot start the container.
    pub fn run(&self, run: &Run) -> anyhow::Result<Output> {
        run.validate()?;
        let id = &run.id;
        let runs = self.dir.path().join("runs");
        fs::create_dir_all(&runs)?;
        let run_dir = runs.join(id);
        match fs::create_dir(&run_dir) {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                bail!("container {id} is already running")
            }
            created => created.with_context(|| format!("cannot create {}", run_dir.display()))?,
        }
        let rootfs = run_dir.join("rootfs");
        copy_tree(&run.rootfs, &rootfs).with_context(|| {
            format!(
                "cannot copy the root filesystem {} for container {id}",
                run.rootfs.display()
            )
        })?;
        let cgroup = run
            .cgroup
            .clone()
            .unwrap_or_else(|| format!("/relay-testbed/{}-{id}", self.instance));
        let spec_path = run_dir.join("config.json");
        fs::write(
            &spec_path,
            serde_json::to_vec_pretty(&run.spec(&rootfs, &cgroup))?,
        )
        .with_context(|| format!("cannot write {}", spec_path.display()))?;
        let output = self.run_ctr(run, &spec_path);
        let removed = fs::remove_dir_all(&run_dir)
            .with_context(|| format!("cannot remove {}", run_dir.display()));
        let output = output?;
        removed?;
        Ok(output)
    }

    fn run_ctr(&self, run: &Run, spec: &Path) -> anyhow::Result<Output> {
        let id = &run.id;
        let mut child = self
            .ctr()
            // Flags before positionals: ctr stops parsing flags at the first positional.
            .args(["run", "--rm", "--config"])
            .arg(spec)
            .arg("--runc-binary")
            .arg(layout::runc())
            // runc's state would otherwise go to /run/containerd/runc/<namespace>, shared with
            // every other containerd on the machine.
            .arg("--runc-root")
            .arg(self.dir.path().join("runc"))
            .arg("--fifo-dir")
            .arg(self.dir.path().join("fifo"))
            .arg(id)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot start ctr run")?;
        // ctr copies the container's stdout and stderr to its own; read both as they come.
        let stdout = reader(child.stdout.take().context("ctr without stdout")?);
        let stderr = reader(child.stderr.take().context("ctr without stderr")?);
        let status = match wait_deadline(&mut child, Instant::now() + run.timeout) {
            Ok(Some(status)) => status,
            waited => {
                let _ = child.kill();
                let _ = child.wait();
                let removed = self.remove(id);
                let (stdout, stderr) = (join(stdout)?, join(stderr)?);
                let partial = Output {
                    code: -1,
                    stdout,
                    stderr,
                };
                removed?;
                waited?;
                bail!(
                    "container {id} did not exit within {:?} and was killed; so far: {partial}",
                    run.timeout
                );
            }
        };
        let output = Output {
            code: status.code().unwrap_or(-1),
            stdout: join(stdout)?,
            stderr: join(stderr)?,
        };
        // ctr exits with the container's exit code, or with 1 after a last line `ctr: <error>`
        // when it could not run the container at all.
        let stderr = output.stderr_text();
        let last = stderr.lines().last().unwrap_or_default();
        if status.code() == Some(1) && last.starts_with("ctr: ") {
            bail!("cannot run container {id}: {last}; {output}");
        }
        ensure!(status.code().is_some(), "ctr run {id} ended with {status}");
        Ok(output)
    }

    /// Kills and deletes container `id` and its task.
    fn remove(&self, id: &str) -> anyhow::Result<()> {
        // Fails when there is no task any more, which is fine: the container delete says more.
        let _ = self.ctr().args(["tasks", "delete", "--force", id]).output();
        let out = self
            .ctr()
            .args(["containers", "delete", id])
            .output()
            .context("cannot run ctr containers delete")?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.success() || stderr.contains("not found"),
            "cannot delete container {id}: {}",
            stderr.trim()
        );
        Ok(())
    }

    /// Removes every container through containerd, when it still answers.
    fn remove_all(&mut self) -> anyhow::Result<()> {
        if self.child.try_wait()?.is_some() {
            return Ok(());
        }
        let out = self
            .ctr()
            .args(["containers", "list", "--quiet"])
            .output()
            .context("cannot run ctr containers list")?;
        ensure!(
            out.status.success(),
            "cannot list containers: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            self.remove(id)?;
        }
        Ok(())
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("containerd exited with {status}:\n{}", self.log_tail());
            }
            // Until the socket exists, ctr would only wait out its connect timeout.
            if self.address.exists() {
                let answered = self
                    .ctr()
                    .arg("version")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .context("cannot run ctr")?;
                if answered.success() {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "containerd did not answer within {START_TIMEOUT:?}:\n{}",
                    self.log_tail()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// The end of containerd's log, for error messages.
    fn log_tail(&self) -> String {
        let log = fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Err(e) = self.remove_all() {
            eprintln!("testbed: removing containers through containerd: {e:#}");
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Err(e) = remove_with_runc(&self.dir.path().join("runc").join(NAMESPACE)) {
            eprintln!("testbed: removing containers through runc: {e:#}");
        }
        kill_shims(&self.address);
    }
}

/// Deletes, through runc itself, any container left in runc's state directory `root` (when
/// containerd died before deleting them).
pub(crate) fn remove_with_runc(root: &Path) -> anyhow::Result<()> {
    if !root.exists() {
        return Ok(());
    }
    let runc = || {
        let mut c = Command::new(layout::runc());
        c.arg("--root").arg(root).stdin(Stdio::null());
        c
    };
    let out = runc()
        .args(["list", "--quiet"])
        .output()
        .context("cannot run runc list")?;
    for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
        let out = runc().args(["delete", "--force", id]).output()?;
        ensure!(
            out.status.success(),
            "runc delete {id}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Kills the shims serving the containerd at `address`. Shims outlive containerd by design; once
/// it is gone and its containers are deleted, they have nothing left to serve.
pub(crate) fn kill_shims(address: &Path) {
    for pid in shims(address) {
        if let Ok(fd) = pidfd_open(pid, PidfdFlags::empty()) {
            let _ = pidfd_send_signal(fd, Signal::KILL);
        }
    }
}

/// containerd's configuration: everything under `dir`, no CRI plugin (`ctr` does not need it) and
/// no plugin that writes outside `dir` (`opt` would fill /opt/containerd).
fn config_toml(dir: &Path, address: &Path) -> anyhow::Result<String> {
    let root = toml_string(&dir.join("root"))?;
    let state = toml_string(&dir.join("state"))?;
    let grpc = toml_string(address)?;
    let ttrpc = toml_string(&dir.join("containerd.sock.ttrpc"))?;
    Ok(format!(
        r#"version = 2
root = {root}
state = {state}
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
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
"#
    ))
}

/// A path as a TOML basic string.
pub(crate) fn toml_string(path: &Path) -> anyhow::Result<String> {
    let s = path
        .to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))?;
    ensure!(
        !s.contains(['"', '\\']) && !s.contains(char::is_control),
        "unexpected characters in {s:?}"
    );
    Ok(format!("\"{s}\""))
}

/// `PATH` for containerd: the extracted containerd (for its shims) and runc first.
pub(crate) fn search_path() -> anyhow::Result<std::ffi::OsString> {
    let runc = layout::runc();
    let ours = [
        layout::containerd_bin_dir(),
        runc.parent().map(Path::to_path_buf).unwrap_or_default(),
    ];
    let inherited = std::env::var_os("PATH").unwrap_or_default();
    Ok(std::env::join_paths(
        ours.into_iter().chain(std::env::split_paths(&inherited)),
    )?)
}

/// Waits for `child` to exit until `deadline`; `None` when it is still running then.
fn wait_deadline(child: &mut Child, deadline: Instant) -> anyhow::Result<Option<ExitStatus>> {
    // A pidfd becomes readable when the process exits: no polling of the process table.
    let pidfd = pidfd_open(Pid::from_child(child), PidfdFlags::empty())
        .context("cannot open a pidfd for ctr")?;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        let timeout = Timespec::try_from(left)?;
        match poll(&mut [PollFd::new(&pidfd, PollFlags::IN)], Some(&timeout)) {
            Ok(_) | Err(Errno::INTR) => {}
            Err(e) => return Err(e).context("cannot wait for ctr"),
        }
    }
}

/// Reads `from` to its end on a thread of its own.
fn reader(mut from: impl Read + Send + 'static) -> thread::JoinHandle<std::io::Result<Vec<u8>>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        from.read_to_end(&mut buf).map(|_| buf)
    })
}

fn join(reader: thread::JoinHandle<std::io::Result<Vec<u8>>>) -> anyhow::Result<Vec<u8>> {
    match reader.join() {
        Ok(read) => Ok(read.context("cannot read the output of ctr")?),
        Err(_) => bail!("the thread reading ctr's output panicked"),
    }
}

/// Copies a directory tree: directories, regular files (with their permissions) and symlinks.
fn copy_tree(from: &Path, to: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(to).with_context(|| format!("cannot create {}", to.display()))?;
    fs::set_permissions(to, fs::metadata(from)?.permissions())?;
    for entry in fs::read_dir(from).with_context(|| format!("cannot list {}", from.display()))? {
        let entry = entry?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        let kind = entry.file_type()?;
        if kind.is_dir() {
            copy_tree(&src, &dst)?;
        } else if kind.is_symlink() {
            symlink(fs::read_link(&src)?, &dst)
                .with_context(|| format!("cannot create {}", dst.display()))?;
        } else if kind.is_file() {
            fs::copy(&src, &dst).with_context(|| format!("cannot copy {}", src.display()))?;
        } else {
            bail!(
                "{} is neither a file, a directory nor a symlink",
                src.display()
            );
        }
    }
    Ok(())
}

/// The shims serving the containerd at `address` (from their command lines).
fn shims(address: &Path) -> Vec<Pid> {
    let Ok(procs) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let address = address.as_os_str().as_encoded_bytes();
    procs
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let pid = entry.file_name().to_str()?.parse::<i32>().ok()?;
            let cmdline = fs::read(entry.path().join("cmdline")).ok()?;
            let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
            let serves_us = args
                .windows(2)
                .any(|w| w[0] == b"-address" && w[1] == address);
            let is_shim = args
                .first()
                .is_some_and(|a| a.ends_with(b"containerd-shim-runc-v2"));
            if serves_us && is_shim {
                Pid::from_raw(pid)
            } else {
                None
            }
        })
        .collect()
}

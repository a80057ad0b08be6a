//! The processes benchmarks (and `cargo xtask demo` and the fault scenarios of `system-tests`) run: the workspace root,
//! commands, release builds, the metadata-api and collector processes, cgroups, scratch
//! directories.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, bail};

/// The workspace root (this crate lives one level below it).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// `~/.cache/relay`, where slow downloads and builds are kept between runs.
pub fn cache_dir() -> PathBuf {
    testbed::layout::cache_dir()
}

/// Runs a command to completion, failing on a non-zero exit.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("+ {cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Builds the release metadata-api binary and returns its path.
pub fn build_metadata_api() -> anyhow::Result<PathBuf> {
    build_release("metadata-api")
}

/// A running `metadata-api serve`, killed on drop.
#[derive(Debug)]
pub struct Server {
    pub child: Child,
    pub url: String,
}

impl Server {
    /// Starts `bin serve` with `args` and waits for its "listening on" line.
    pub fn start(bin: &Path, args: &[&str]) -> anyhow::Result<Self> {
        let mut cmd = Command::new(bin);
        cmd.arg("serve").args(args);
        Self::spawn(cmd)
    }

    /// Starts `cmd` (a `serve` command line, possibly behind a wrapper such as `nice`).
    pub fn spawn(mut cmd: Command) -> anyhow::Result<Self> {
        let bin = format!("{:?}", cmd.get_program());
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot start {bin}"))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let url = line
            .trim()
            .strip_prefix("metadata-api listening on ")
            .with_context(|| format!("unexpected first line {line:?}"))?
            .to_owned();
        Ok(Self { child, url })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A metadata API (`bin`) on file storage in `dir`, with its rate limits out of the way
/// (benchmarks measure the writers, not the limiter), and a token for `context` with `scope`,
/// also written to `dir/token`. `niced` runs it at nice 10, as if on another node.
pub fn bench_api(
    bin: &Path,
    dir: &Path,
    niced: bool,
    context: &str,
    scope: &str,
) -> anyhow::Result<(Server, String, PathBuf)> {
    let key = dir.join("key");
    let storage = format!("file://{}", dir.join("streams").display());
    let mut cmd = if niced {
        let mut c = Command::new("nice");
        c.args(["-n", "10"]).arg(bin);
        c
    } else {
        Command::new(bin)
    };
    cmd.arg("serve").args([
        "--listen",
        "127.0.0.1:0",
        "--storage",
        &storage,
        "--key-file",
        &key.display().to_string(),
        "--stream-rate",
        "100G",
        "--global-rate",
        "100G",
    ]);
    let server = Server::spawn(cmd)?;
    let token = token(bin, &key, context, scope)?;
    let token_file = dir.join("token");
    std::fs::write(&token_file, &token)?;
    Ok((server, token, token_file))
}

/// Mints a token (valid 2 hours) with the binary's `token` subcommand.
pub fn token(bin: &Path, key_file: &Path, context: &str, scope: &str) -> anyhow::Result<String> {
    token_for(bin, key_file, context, scope, "2h")
}

/// Mints a token valid for `ttl` (`30m`, `24h`, ...) with the binary's `token` subcommand.
pub fn token_for(
    bin: &Path,
    key_file: &Path,
    context: &str,
    scope: &str,
    ttl: &str,
) -> anyhow::Result<String> {
    let out = Command::new(bin)
        .args(["token", "--key-file"])
        .arg(key_file)
        .args(["--context", context, "--scope", scope, "--ttl", ttl])
        .output()?;
    if !out.status.success() {
        bail!("token failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}

/// Where cargo puts its output: `CARGO_TARGET_DIR`, else `target` in the workspace.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from)
}

/// The binary named by the environment variable `env` (how `cargo xtask test` hands the binaries
/// it built to the tests), else the one `build` makes.
pub fn bin_from_env(
    env: &str,
    build: impl FnOnce() -> anyhow::Result<PathBuf>,
) -> anyhow::Result<PathBuf> {
    match std::env::var_os(env) {
        Some(path) => Ok(PathBuf::from(path)),
        None => build(),
    }
}

/// Builds the release binary of workspace package `package` (named as the package) and returns
/// its path.
pub fn build_release(package: &str) -> anyhow::Result<PathBuf> {
    run(Command::new("cargo").current_dir(root()).args([
        "build",
        "--release",
        "--quiet",
        "-p",
        package,
    ]))?;
    Ok(target_dir().join("release").join(package))
}

/// Builds the release collector with its eBPF object: bpf-linker from the cache first on `PATH`
/// and `AYA_BUILD_SKIP` unset, so `collector/build.rs` builds the kernel side with the toolchain of
/// `cargo xtask ebpf-toolchain`. Returns the binary's path.
pub fn build_collector() -> anyhow::Result<PathBuf> {
    let linker = cache_dir().join("bpf-linker/bin");
    let path = std::env::var_os("PATH").unwrap_or_default();
    let path = std::env::join_paths(std::iter::once(linker).chain(std::env::split_paths(&path)))?;
    run(Command::new("cargo")
        .current_dir(root())
        .env("PATH", path)
        .env_remove("AYA_BUILD_SKIP")
        .args(["build", "--release", "--quiet", "-p", "collector"]))?;
    Ok(target_dir().join("release/collector"))
}

/// Where `cargo xtask build-entrypoint` puts the static entrypoint.
pub fn static_entrypoint() -> PathBuf {
    target_dir().join("x86_64-unknown-linux-musl/dist/entrypoint")
}

/// Builds the static entrypoint tenant containers run (musl, profile `dist`) and returns its path.
/// Through `cargo xtask build-entrypoint`: xtask knows the musl target and C compiler it needs.
pub fn build_entrypoint() -> anyhow::Result<PathBuf> {
    run(Command::new("cargo")
        .current_dir(root())
        .args(["xtask", "build-entrypoint"])
        // It prints the path and size, which the benchmarks' reports do not show.
        .stdout(Stdio::null()))?;
    Ok(static_entrypoint())
}

/// Whether this process runs as root (effective uid 0).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            == Some("0")
    })
}

/// Where the cgroup v2 hierarchy is mounted (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on a
/// hybrid host), if it is.
pub fn cgroup2_root() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.get(2) == Some(&"cgroup2"))
        .and_then(|f| f.get(1).map(PathBuf::from))
}

/// A cgroup v2 directory made for a task; removed on drop, with any process left in it killed.
#[derive(Debug)]
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    pub fn create(path: PathBuf) -> anyhow::Result<Self> {
        std::fs::create_dir(&path)
            .with_context(|| format!("cannot create cgroup {}", path.display()))?;
        Ok(Self { path })
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        remove_cgroup(&self.path);
    }
}

/// Removes a cgroup and those below it, killing processes left in them. Best effort, within 2 s
/// per directory (killed processes leave a cgroup asynchronously).
pub fn remove_cgroup(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup(&entry.path());
            }
        }
    }
    let _ = std::fs::write(dir.join("cgroup.kill"), "1");
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) if Instant::now() > deadline => {
                eprintln!("could not remove cgroup {}: {e}", dir.display());
                return;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// A running `collector` in local mode; stopped on drop (SIGTERM, so it ships what is left within
/// its grace period, then SIGKILL after 15 s).
#[derive(Debug)]
pub struct Collector {
    child: Child,
    /// `http://ADDR/metrics`, from its ready line.
    pub metrics_url: String,
}

impl Collector {
    /// Starts `bin` shipping to `url` with the token in `token_file`, watching each `(dir,
    /// context)` of `cgroups`, with `extra` flags; its stderr goes to `log`. Waits up to
    /// `ready_within` for its ready line; fails with the end of its log when it exits first (it
    /// exits 69 when this machine cannot load its eBPF programs).
    pub fn start(
        bin: &Path,
        url: &str,
        token_file: &Path,
        cgroups: &[(&Path, &str)],
        extra: &[&str],
        log: &Path,
        ready_within: Duration,
    ) -> anyhow::Result<Self> {
        let log_file = std::fs::File::create(log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let mut cmd = Command::new(bin);
        cmd.args(["--url", url, "--listen", "127.0.0.1:0"])
            .arg("--token-file")
            .arg(token_file)
            .args(extra)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file);
        for (dir, context) in cgroups {
            cmd.arg("--cgroup")
                .arg(format!("{}={context}", dir.display()));
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let stdout = child.stdout.take().context("no collector stdout")?;
        // From here on, drop stops the process.
        let mut this = Self {
            child,
            metrics_url: String::new(),
        };
        // The first line says it is attached; the rest of stdout is drained, never left to fill.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut out = BufReader::new(stdout);
            let mut line = String::new();
            let _ = tx.send(out.read_line(&mut line).map(|_| line));
            let _ = std::io::copy(&mut out, &mut std::io::sink());
        });
        let line = match rx.recv_timeout(ready_within) {
            Ok(Ok(line)) => line,
            Ok(Err(e)) => bail!("reading the collector's stdout: {e}"),
            Err(_) => bail!(
                "the collector did not get ready in {} s",
                ready_within.as_secs()
            ),
        };
        let Some(url) = line.trim().strip_prefix("collector ready; metrics on ") else {
            let log = std::fs::read_to_string(log).unwrap_or_default();
            let last = log.lines().rev().find(|l| !l.trim().is_empty());
            bail!(
                "{}",
                last.unwrap_or("the collector exited without a word")
                    .trim_start_matches("collector: ")
            );
        };
        this.metrics_url = url.to_owned();
        Ok(this)
    }

    /// The collector's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if matches!(self.child.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A directory under the system temp dir, removed with everything in it on drop.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn create() -> anyhow::Result<Self> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let path =
            std::env::temp_dir().join(format!("relay-bench-{}-{nanos:x}", std::process::id()));
        std::fs::create_dir_all(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        Ok(Self(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

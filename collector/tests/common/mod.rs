//! Test helpers: the real collector binary watching a real cgroup v2 directory, shipping to the
//! real metadata-api binary on a real socket.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::{BufRead, BufReader, Read},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use serde_json::Value;
pub use testbed::api::*;

/// Where cgroup v2 is mounted on this (hybrid) host, or on a pure v2 host.
pub fn cgroup2_root() -> Option<PathBuf> {
    ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.join("cgroup.procs").exists() && p.join("cgroup.subtree_control").exists())
}

/// Why the collector cannot run here, if it cannot.
pub fn unavailable() -> Option<String> {
    if !rustix::process::geteuid().is_root() {
        return Some("the collector needs root (CAP_BPF, CAP_PERFMON)".to_owned());
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Some("the kernel has no BTF".to_owned());
    }
    if cgroup2_root().is_none() {
        return Some("no cgroup v2 hierarchy".to_owned());
    }
    None
}

/// Returns false (after printing why, or failing under `RELAY_REQUIRE_TESTBED=1`) when the
/// collector cannot run here.
pub fn can_run() -> bool {
    match unavailable() {
        Some(why) => {
            testbed::skip_or_fail(&why);
            false
        }
        None => true,
    }
}

/// A fresh cgroup v2 directory, removed on drop (after killing what is left in it).
#[derive(Debug)]
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    pub fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path = cgroup2_root()
            .unwrap()
            .join(format!("relay-test-{}-{tag}-{n}", std::process::id()));
        std::fs::create_dir(&path).unwrap();
        Self { path }
    }

    /// A child cgroup (not removed separately: drop removes children first).
    pub fn child(&self, name: &str) -> PathBuf {
        let p = self.path.join(name);
        std::fs::create_dir(&p).unwrap();
        p
    }

    /// `sh -c` that moves itself into `dir` and then runs `script` (arguments after it are `$0`,
    /// `$1`, ...).
    pub fn sh(dir: &Path, script: &str) -> Command {
        let mut c = Command::new("sh");
        c.arg("-c").arg(format!(
            "echo $$ > {}/cgroup.procs && {script}",
            dir.display()
        ));
        c
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        remove_tree(&self.path);
    }
}

fn remove_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&e.path());
            }
        }
    }
    let _ = std::fs::write(dir.join("cgroup.kill"), "1");
    for _ in 0..200 {
        if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A `collector` process, stopped (SIGTERM) on drop.
#[derive(Debug)]
pub struct Collector {
    pub child: Option<Child>,
    pub metrics: String,
    /// Its log lines so far, when started with [`Collector::start_logged`].
    log: Option<Arc<Mutex<Vec<String>>>>,
}

impl Collector {
    /// Starts the collector watching `cgroups` (`(dir, context)`) for `api`, with `extra` flags.
    pub fn start(api: &Api, cgroups: &[(&Path, &str)], extra: &[&str]) -> Self {
        Self::start_with(
            Command::new(env!("CARGO_BIN_EXE_collector")),
            api,
            cgroups,
            extra,
        )
    }

    /// As [`Collector::start`], through `cmd` (the collector binary, or a wrapper running it).
    pub fn start_with(cmd: Command, api: &Api, cgroups: &[(&Path, &str)], extra: &[&str]) -> Self {
        Self::spawn(cmd, api, cgroups, extra, false)
    }

    /// As [`Collector::start_with`], keeping its log lines (still passed on to stderr) for
    /// [`Collector::wait_for_log`].
    pub fn start_logged(cmd: Command, api: &Api, extra: &[&str]) -> Self {
        Self::spawn(cmd, api, &[], extra, true)
    }

    fn spawn(
        mut cmd: Command,
        api: &Api,
        cgroups: &[(&Path, &str)],
        extra: &[&str],
        logged: bool,
    ) -> Self {
        let listen = free_addr();
        // A filter `cmd` sets wins over the test's own.
        if !cmd.get_envs().any(|(key, _)| key == "RUST_LOG") {
            cmd.env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            );
        }
        cmd.args(["--url", &api.url, "--listen", &listen])
            .arg("--token-file")
            .arg(api.collector_token_file())
            .args(extra)
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(if logged {
                Stdio::piped()
            } else {
                Stdio::inherit()
            });
        for (dir, ctx) in cgroups {
            cmd.arg("--cgroup").arg(format!("{}={ctx}", dir.display()));
        }
        let mut child = cmd.spawn().unwrap();
        let log = child.stderr.take().map(|stderr| {
            let lines = Arc::new(Mutex::new(Vec::new()));
            let keep = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { return };
                    eprintln!("{line}");
                    keep.lock().unwrap().push(line);
                }
            });
            lines
        });
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(
            line.starts_with("collector ready"),
            "collector did not start: {line:?}"
        );
        Self {
            child: Some(child),
            metrics: format!("http://{listen}/metrics"),
            log,
        }
    }

    /// Waits until a log line contains every one of `parts`, failing after `limit`.
    pub fn wait_for_log(&self, limit: Duration, parts: &[&str]) {
        let log = self.log.as_ref().expect("started with start_logged");
        wait_for(
            limit,
            &format!("a collector log line with {parts:?}"),
            || {
                log.lock()
                    .unwrap()
                    .iter()
                    .any(|line| parts.iter().all(|p| line.contains(p)))
            },
        );
    }

    /// A counter or gauge from `/metrics` (without the `relay_collector_` prefix).
    pub fn metric(&self, name: &str) -> u64 {
        let text = reqwest::blocking::get(&self.metrics)
            .unwrap()
            .text()
            .unwrap();
        let prefix = format!("relay_collector_{name}");
        text.lines()
            .filter(|l| l.starts_with(&prefix) && !l.starts_with('#'))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .next()
            .unwrap_or_else(|| panic!("no metric {name} in\n{text}"))
    }

    /// Stops with SIGTERM and returns the exit status code.
    pub fn stop(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        child.wait().ok()?.code()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Reads a pipe to its end on a thread.
pub fn slurp(mut r: impl Read + Send + 'static) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut v = Vec::new();
        r.read_to_end(&mut v).unwrap();
        v
    })
}

/// Runs `cmd` with stdout and stderr piped, returning both in full.
pub fn run_piped(mut cmd: Command) -> (i32, Vec<u8>, Vec<u8>) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = slurp(child.stdout.take().unwrap());
    let err = slurp(child.stderr.take().unwrap());
    let code = child.wait().unwrap().code().unwrap_or(-1);
    (code, out.join().unwrap(), err.join().unwrap())
}

/// Waits until the `ebpf` stream `name` in `context` is complete, and returns it.
pub fn complete_ebpf(api: &Api, context: &str, name: &str) -> (Value, Vec<u8>) {
    let mut last = None;
    wait_for(
        Duration::from_secs(30),
        &format!("ebpf stream {name} to complete"),
        || {
            let (status, data) = api.read_ebpf(context, name);
            let done = status["complete"] == true;
            last = Some((status, data));
            done
        },
    );
    last.unwrap()
}

/// Random bytes.
pub fn random(n: usize) -> Vec<u8> {
    use rand::RngCore;
    let mut v = vec![0; n];
    rand::rng().fill_bytes(&mut v);
    v
}

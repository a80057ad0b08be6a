//! The real `collector` process for tests, shipping to an [`Api`], stopped (SIGTERM) on drop.
//! Test-only code: it panics on failure.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::missing_panics_doc)]

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use crate::api::{Api, free_addr, wait_for, workspace_bin};
use crate::cgroup::cgroup2_root;

/// The `collector` binary: `RELAY_COLLECTOR_BIN` (set by `cargo xtask test`), or a debug build of
/// it, built once here when missing. For tests outside the collector's crate, which have no
/// `CARGO_BIN_EXE_collector`.
pub fn collector_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| workspace_bin("collector", "collector", "RELAY_COLLECTOR_BIN"))
}

/// Why the collector cannot run here, if it cannot: it needs root (CAP_BPF, CAP_PERFMON), the
/// kernel's BTF and a cgroup v2 hierarchy.
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
            crate::skip_or_fail(&why);
            false
        }
        None => true,
    }
}

/// How to start a [`Collector`] besides its command and API; every field has a default.
#[derive(Debug, Default, Clone, Copy)]
pub struct CollectorOptions<'a> {
    /// Cgroups to watch, `(dir, context)`, each passed as `--cgroup dir=context`.
    pub cgroups: &'a [(&'a Path, &'a str)],
    /// Flags after the fixture's own.
    pub extra: &'a [&'a str],
    /// Keep its log lines (still passed on to stderr) for [`Collector::wait_for_log`].
    pub logged: bool,
    /// The `--token-file`; default the API's [`Api::collector_token_file`].
    pub token_file: Option<&'a Path>,
    /// On stop, how long to wait after SIGTERM before SIGKILL; default: wait for it to exit.
    pub stop_limit: Option<Duration>,
}

/// A `collector` process, stopped (SIGTERM) on drop.
#[derive(Debug)]
pub struct Collector {
    pub child: Option<Child>,
    pub metrics: String,
    /// Its log lines so far, when started with `logged`.
    log: Option<Arc<Mutex<Vec<String>>>>,
    stop_limit: Option<Duration>,
}

impl Collector {
    /// Starts `cmd` (the collector binary, or a wrapper running it) watching `cgroups`
    /// (`(dir, context)`) for `api`, with `extra` flags.
    pub fn start_with(cmd: Command, api: &Api, cgroups: &[(&Path, &str)], extra: &[&str]) -> Self {
        Self::spawn(
            cmd,
            api,
            &CollectorOptions {
                cgroups,
                extra,
                ..CollectorOptions::default()
            },
        )
    }

    /// As [`Collector::start_with`] with no cgroups, keeping its log lines (still passed on to
    /// stderr) for [`Collector::wait_for_log`].
    pub fn start_logged(cmd: Command, api: &Api, extra: &[&str]) -> Self {
        Self::spawn(
            cmd,
            api,
            &CollectorOptions {
                extra,
                logged: true,
                ..CollectorOptions::default()
            },
        )
    }

    /// Starts `cmd` for `api` as `options` say, and waits until it prints `collector ready`.
    pub fn spawn(mut cmd: Command, api: &Api, options: &CollectorOptions<'_>) -> Self {
        let listen = free_addr();
        // A filter `cmd` sets wins over the test's own.
        if !cmd.get_envs().any(|(key, _)| key == "RUST_LOG") {
            cmd.env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            );
        }
        let token_file = options
            .token_file
            .map_or_else(|| api.collector_token_file(), Path::to_owned);
        cmd.args(["--url", &api.url, "--listen", &listen])
            .arg("--token-file")
            .arg(token_file)
            .args(options.extra)
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(if options.logged {
                Stdio::piped()
            } else {
                Stdio::inherit()
            });
        for (dir, ctx) in options.cgroups {
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
            stop_limit: options.stop_limit,
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

    /// Stops with SIGTERM and returns the exit status code (`None` when killed after the
    /// `stop_limit`).
    pub fn stop(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        match self.stop_limit {
            None => {
                let _ = Command::new("kill")
                    .args(["-TERM", &child.id().to_string()])
                    .status();
                child.wait().ok()?.code()
            }
            Some(limit) => terminate(&mut child, limit)?.code(),
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Sends SIGTERM to `child` and waits for it to exit (SIGKILL after `limit`); its exit status
/// when it exited by itself.
pub fn terminate(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

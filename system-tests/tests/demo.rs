#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `cargo xtask demo` end to end, in a temporary data directory: the workload's output read back
//! through the consumer API; as root (with BTF and cgroup v2) on both capture paths with the
//! capture report agreeing, otherwise on the entrypoint path only; the same lines through the
//! `kubectl relay` plugin; the cgroup, the collector and
//! the metadata API gone afterwards; and the demo itself (builds not counted) done in seconds.
//!
//! `cargo xtask test` passes the binaries it built (`RELAY_METADATA_API_BIN`,
//! `RELAY_ENTRYPOINT_STATIC`, `RELAY_COLLECTOR_BIN`, `RELAY_KUBECTL_RELAY_BIN`) and itself
//! (`RELAY_XTASK_BIN`); without them
//! the test builds xtask and the demo builds the rest first.

use std::{
    io::Read,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

/// For the demo's builds, when the binaries are not passed in; the demo alone takes seconds.
const DEADLINE: Duration = Duration::from_secs(30 * 60);

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let path = std::env::temp_dir().join(format!("relay-demo-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        == Some("0")
}

use testbed::cgroup::cgroup2_mount as cgroup2_root;

/// The xtask binary: `RELAY_XTASK_BIN`, or a debug build of it (this crate cannot name another
/// package's binary with `CARGO_BIN_EXE_`).
fn xtask_bin() -> PathBuf {
    testbed::api::workspace_bin("xtask", "xtask", "RELAY_XTASK_BIN")
}

/// Pids of processes whose command line mentions `dir` (the demo's collector and metadata API
/// name files in it).
fn processes_using(dir: &Path) -> Vec<String> {
    let needle = dir.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter_map(|e| {
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            cmdline.contains(&needle).then_some(cmdline)
        })
        .collect()
}

/// Runs `xtask demo --dir DIR`; returns its pid, exit success, stdout and stderr.
fn run_demo(dir: &Path) -> (u32, bool, String, String) {
    let mut child = Command::new(xtask_bin())
        .arg("demo")
        .arg("--dir")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            r.read_to_string(&mut s).unwrap();
            s
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > DEADLINE {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!(
                "the demo did not finish in {} s:\n{}\n{}",
                DEADLINE.as_secs(),
                out.join().unwrap(),
                err.join().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (
        pid,
        status.success(),
        out.join().unwrap(),
        err.join().unwrap(),
    )
}

#[test]
fn the_demo_reads_the_workload_back_from_every_path_that_ran_and_cleans_up() {
    let dir = TempDir::new();
    let (pid, ok, out, err) = run_demo(&dir.0);
    println!("{out}");
    eprintln!("{err}");
    assert!(ok, "the demo failed");

    // The workload's output through the consumer API, both streams.
    for line in [
        "   stdout | line 1 to stdout",
        "   stdout | line 6 to stdout",
        "   stderr | line 3: a warning to stderr",
        "   stderr | line 6: a warning to stderr",
        "   stdout | this line travelled gzip-compressed and arrived first",
    ] {
        assert!(out.contains(line), "no {line:?} in the output");
    }
    let collector =
        is_root() && cgroup2_root().is_some() && Path::new("/sys/kernel/btf/vmlinux").exists();
    if collector {
        if let Some(line) = out.lines().find(|l| l.contains("toolchain")) {
            testbed::skip_or_fail(&format!("the demo ran without the collector: {line}"));
            return;
        }
        assert!(
            out.contains("3. collector (eBPF) watching cgroup"),
            "the collector did not run"
        );
        assert!(out.contains("complete on the entrypoint and ebpf paths"));
        assert!(out.contains("the collector's copies (&source=ebpf) are byte-identical"));
        for stream in ["stdout", "stderr"] {
            for source in ["entrypoint", "ebpf"] {
                let row = out
                    .lines()
                    .find(|l| {
                        let f: Vec<&str> = l.split_whitespace().collect();
                        f.first() == Some(&stream) && f.get(1) == Some(&source)
                    })
                    .unwrap_or_else(|| panic!("no report row for {stream} {source}"));
                assert!(row.ends_with("agree"), "report row {row:?}");
            }
        }
        assert!(out.contains("   capture paths agree"));
    } else {
        assert!(out.contains("showing the entrypoint path only"));
        assert!(out.contains("(entrypoint_only, as expected: the collector did not run)"));
    }

    // Cleaned up: no cgroup, no collector or metadata API left running.
    if let Some(root) = cgroup2_root() {
        let cgroup = root.join(format!("relay-demo-{pid}"));
        assert!(!cgroup.exists(), "{} left behind", cgroup.display());
    }
    let left = processes_using(&dir.0);
    assert!(left.is_empty(), "left running: {left:?}");

    // Where the data is, how to follow it, and how long it took without builds.
    assert!(dir.0.join("streams").is_dir());
    assert!(out.contains(&format!("The data is in {}", dir.0.display())));
    assert!(out.contains("curl -sN -H 'Authorization: Bearer ey"));

    // The step's logs through the kubectl plugin, run once, and the command to follow them.
    assert!(
        out.contains(
            "8. the step's logs through the kubectl plugin (kubectl relay logs step/demo/"
        )
    );
    for line in [
        "   [hello/stdout] line 1 to stdout",
        "   [hello/stdout] line 6 to stdout",
        "   [hello/stderr] line 3: a warning to stderr",
        "   [hello/stderr] line 6: a warning to stderr",
    ] {
        assert!(
            out.contains(line),
            "no {line:?} from kubectl relay in the output"
        );
    }
    let follow = out
        .lines()
        .find(|l| l.trim_start().starts_with("kubectl relay logs step/demo/"))
        .expect("no kubectl relay command to follow the step");
    assert!(
        follow.contains("/hello -f --url http://127.0.0.1:7070 --token ey"),
        "{follow}"
    );
    let secs: f64 = out
        .split("Ran in ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|s| s.parse().ok())
        .expect("no run time in the output");
    assert!(secs < 60.0, "the demo took {secs} s without builds");
}

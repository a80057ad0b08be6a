#![allow(clippy::unwrap_used, clippy::expect_used)]
//! A short `cargo xtask faults --scenario kill-api`: the metadata API killed -9 and restarted
//! while writers on both capture paths write, then every byte accounted for (stored or covered by
//! a dropped marker, none duplicated). Root with cgroup v2 and BTF only (the collector path).
//!
//! `cargo xtask test` passes the binaries it built (`RELAY_METADATA_API_BIN`,
//! `RELAY_ENTRYPOINT_STATIC`, `RELAY_COLLECTOR_BIN`); without them the task builds them first.

use std::{
    io::Read,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

/// For the builds, when the binaries are not passed in; the run itself takes about 20 s.
const DEADLINE: Duration = Duration::from_secs(30 * 60);

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        == Some("0")
}

fn has_cgroup2() -> bool {
    std::fs::read_to_string("/proc/mounts")
        .unwrap()
        .lines()
        .any(|l| l.split_whitespace().nth(2) == Some("cgroup2"))
}

#[test]
fn kill_api_loses_and_duplicates_nothing() {
    if !(is_root() && has_cgroup2() && Path::new("/sys/kernel/btf/vmlinux").exists()) {
        testbed::skip_or_fail("the fault scenarios need root, cgroup v2 and BTF");
        return;
    }
    let mut child = Command::new(testbed::api::workspace_bin(
        "xtask",
        "xtask",
        "RELAY_XTASK_BIN",
    ))
    .args(["faults", "--scenario", "kill-api", "--seconds", "12"])
    .args(["--writers", "4", "--rate-mb", "4", "--no-baseline"])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
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
            panic!("xtask faults did not finish in {} s", DEADLINE.as_secs());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    println!("{out}");
    eprintln!("{err}");
    let line = |prefix: &str| {
        out.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} row"))
            .split_whitespace()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    // scenario, produced, stored, dropped, unaccounted, duplicated, wall ratio, verdict
    let row = line("kill-api ");
    assert_eq!(row[1], "48.0", "4 writers x 1 MB/s x 12 s produced");
    assert_eq!((row[4].as_str(), row[5].as_str()), ("0", "0"), "{row:?}");
    assert_eq!(row[7], "ok", "{row:?}");
    assert_eq!(line("  entrypoint")[1], "24.0");
    assert_eq!(line("  ebpf")[1], "24.0");
    assert!(out.contains("API killed -9 and restarted 2 times"), "{out}");
    assert!(status.success(), "xtask faults failed: {status}");
}

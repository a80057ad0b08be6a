//! Test helpers: the real collector binary watching a real cgroup v2 directory, shipping to the
//! real metadata-api binary on a real socket.
#![allow(dead_code, unused_imports, clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::Read,
    path::Path,
    process::{Command, Stdio},
    thread::JoinHandle,
    time::Duration,
};

use serde_json::Value;
pub use testbed::{
    api::*,
    cgroup::{Cgroup, cgroup2_root},
    collector::{Collector, CollectorOptions, terminate},
};

/// This crate's collector binary, for [`Collector::start_with`].
pub fn collector_cmd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_collector"))
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

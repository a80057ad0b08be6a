//! Test helpers: the real collector binary watching a real cgroup v2 directory, shipping to the
//! real metadata-api binary on a real socket.
#![allow(dead_code, unused_imports, clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::Read,
    process::{Command, Stdio},
    thread::JoinHandle,
    time::Duration,
};

use serde_json::Value;
pub use testbed::{
    api::*,
    cgroup::{Cgroup, cgroup2_root},
    collector::{Collector, CollectorOptions, can_run, terminate, unavailable},
};

/// This crate's collector binary, for [`Collector::start_with`].
pub fn collector_cmd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_collector"))
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

//! A wrapped container killed whole (`cgroup.kill`, as an OOM kill, an eviction or a step
//! timeout ends it) while its entrypoint still holds megabytes it has not shipped: the
//! entrypoint's stream is left with a pending range and no end. The collector saw every byte;
//! once the container is gone, the entrypoint's stream settles, the merged step log is what the
//! workload wrote, and a step follower returns.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    io::Read,
    time::{Duration, Instant},
};

use common::*;
use metadata_api::auth::Scope;

/// Bytes the workload writes: two full 4 MiB batches go out, the rest waits for a third.
const TOTAL: usize = 10 << 20;
const BATCH: &str = "4M";

#[test]
fn a_killed_wrapped_container_settles_and_its_step_log_is_whole() {
    if !can_run() {
        return;
    }
    let api = Api::start(&[]);
    let cg = Cgroup::new("killed");
    let collector = Collector::start(
        &api,
        &[(&cg.path, CTX)],
        &["--buffer-limit", "64M", "--ring-bytes", "64M"],
    );
    let entrypoint = std::env::var_os("RELAY_ENTRYPOINT_STATIC").map_or_else(
        || workspace_bin("entrypoint", "entrypoint", "RELAY_ENTRYPOINT_BIN"),
        std::path::PathBuf::from,
    );
    let files = tempfile::tempdir().unwrap();
    let data = random(TOTAL);
    let input = files.path().join("input");
    std::fs::write(&input, &data).unwrap();
    let written = files.path().join("written");
    // The workload writes it all with write(2), says so, and waits to be killed.
    let script = format!(
        "import os, time\ndata = open('{}', 'rb').read()\nview = memoryview(data)\n\
         while view: view = view[os.write(1, view):]\nopen('{}', 'w').close()\ntime.sleep(600)\n",
        input.display(),
        written.display()
    );
    let mut cmd = Cgroup::sh(&cg.path, r#"exec "$0" -- python3 -c "$1""#);
    cmd.arg(&entrypoint)
        .arg(script)
        .env("RELAY_METADATA_API_URL", &api.url)
        .env("RELAY_METADATA_API_TOKEN_FILE", api.token_file())
        .env("RELAY_BATCH_BYTES", BATCH)
        .env("RELAY_BATCH_INTERVAL", "1h")
        .env("RELAY_BUFFER_LIMIT", "64M")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();

    // A reader follows the step from the start.
    let follower = {
        let url = format!("{}/api/{CTX}/logs?follow=true", api.url);
        let token = api.token("workflows/w1", Scope::Read);
        std::thread::spawn(move || {
            let mut resp = reqwest::blocking::Client::builder()
                .timeout(None)
                .build()
                .unwrap()
                .get(url)
                .bearer_auth(token)
                .send()
                .unwrap();
            let mut got = Vec::new();
            resp.read_to_end(&mut got).unwrap();
            (got, Instant::now())
        })
    };

    wait_for(Duration::from_secs(60), "the workload to write", || {
        written.exists()
    });
    // The entrypoint shipped its full batches; the collector saw everything.
    wait_for(
        Duration::from_secs(30),
        "both paths to get what they can",
        || {
            let (ep, _) = api.read("stdout");
            let (eb, _) = api.read_ebpf(CTX, "stdout");
            ep["length"] == 8u64 << 20 && eb["length"] == TOTAL as u64
        },
    );
    std::fs::write(cg.path.join("cgroup.kill"), "1").unwrap();
    let killed = Instant::now();
    let status = child.wait().unwrap();
    assert!(!status.success(), "the container was killed: {status:?}");

    let (got, returned) = follower.join().unwrap();
    let settle = returned - killed;
    println!("the step follower returned {settle:?} after the kill");
    assert!(
        settle < Duration::from_secs(15),
        "the follower took {settle:?}"
    );
    assert_eq!(got.len(), TOTAL, "the follower's step log has every byte");
    assert!(
        got == data,
        "the follower's step log is what the workload wrote"
    );

    // The entrypoint's stream settles: its pending range dropped, its end declared.
    let mut ep = serde_json::Value::Null;
    wait_for(
        Duration::from_secs(15),
        "the entrypoint stream to settle",
        || {
            ep = api.read("stdout").0;
            ep["complete"] == true
        },
    );
    println!(
        "the entrypoint stream settled {:?} after the kill",
        killed.elapsed()
    );
    assert_eq!(ep["final_length"], TOTAL as u64, "{ep}");
    assert_eq!(ep["writer_died_at"], 8u64 << 20, "{ep}");
    assert_eq!(spans(&ep, "dropped"), vec![(8 << 20, TOTAL as u64)], "{ep}");
    let (eb, ebpf) = complete_ebpf(&api, CTX, "stdout");
    assert_eq!(spans(&eb, "dropped"), vec![], "{eb}");
    assert!(
        ebpf == data,
        "the collector's stream is what the workload wrote"
    );
    assert_eq!(collector.metric("kernel_lost_bytes_total"), 0);
}

//! A wrapped container whose entrypoint dies while it still holds megabytes it has not shipped:
//! killed whole (`cgroup.kill`, as an OOM kill or an eviction ends it), or killed alone by
//! Tekton's entrypoint at a step's timeout, before the container ends. The entrypoint's stream is
//! left with a pending range and no end. The collector saw every byte; once the container is
//! gone, the entrypoint's stream settles, the merged step log is what the workload wrote, and a
//! step follower returns.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    io::Read,
    process::Command,
    time::{Duration, Instant},
};

use common::*;
use metadata_api::auth::Scope;

/// Bytes the workload writes: two full 4 MiB batches go out, the rest waits for a third.
const TOTAL: usize = 10 << 20;
const BATCH: &str = "4M";

/// What Tekton's entrypoint does for a step with a `timeout` (tektoncd/pipeline at c54cbbb14d18,
/// `cmd/entrypoint/runner.go`): it starts the step's command, ours, with `exec.CommandContext`
/// in a process group of its own, and at the deadline Go kills that process alone (SIGKILL to its
/// pid, not the group); then it reports the timeout and exits, which ends the container: its pid
/// namespace goes, and every process left in it. Here the deadline is a file the test creates,
/// so it comes when the test has seen what it needs to, not after a guessed time. Run as a file
/// named `entrypoint` (as Tekton's `/tekton/bin/entrypoint` is), through its shebang, as the
/// container's pid 1.
const TEKTON_TIMEOUT: &str = r#"
import os, subprocess, sys, time
child = subprocess.Popen(sys.argv[1:], process_group=0)
while child.poll() is None and not os.path.exists(os.environ["DEADLINE"]):
    time.sleep(0.01)
if child.poll() is None:
    child.kill()
    child.wait()
    open(os.environ["REPORT"], "w").write(str(child.returncode))
    sys.stderr.write("step timed out\n")
    sys.exit(1)
sys.exit(child.returncode)
"#;

/// How the entrypoint dies.
#[derive(Clone, Copy)]
enum Death {
    /// The container's cgroup killed whole.
    ContainerKilled,
    /// Tekton's entrypoint kills ours at the step's timeout, then the container ends.
    TektonTimeout,
}

#[test]
fn a_killed_wrapped_container_settles_and_its_step_log_is_whole() {
    entrypoint_dies(Death::ContainerKilled);
}

#[test]
fn a_tekton_step_timeout_leaves_a_whole_step_log_and_settled_streams() {
    entrypoint_dies(Death::TektonTimeout);
}

fn entrypoint_dies(death: Death) {
    if !can_run() {
        return;
    }
    let api = Api::start(&[]);
    let cg = Cgroup::new(match death {
        Death::ContainerKilled => "killed",
        Death::TektonTimeout => "timeout",
    });
    let collector = Collector::start_with(
        collector_cmd(),
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
    let deadline = files.path().join("deadline");
    let report = files.path().join("report");
    let mut cmd = match death {
        Death::ContainerKilled => Cgroup::sh(&cg.path, r#"exec "$0" -- python3 -c "$1""#),
        Death::TektonTimeout => {
            let tekton = files.path().join("entrypoint");
            let python = Command::new("python3")
                .args(["-c", "import sys; print(sys.executable)"])
                .output()
                .unwrap();
            let python = String::from_utf8(python.stdout).unwrap();
            std::fs::write(&tekton, format!("#!{}\n{TEKTON_TIMEOUT}", python.trim())).unwrap();
            std::fs::set_permissions(&tekton, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                .unwrap();
            let mut cmd = Cgroup::sh(
                &cg.path,
                r#"exec unshare --pid --fork "$TEKTON" "$0" -- python3 -c "$1""#,
            );
            cmd.env("TEKTON", &tekton)
                .env("DEADLINE", &deadline)
                .env("REPORT", &report);
            cmd
        }
    };
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
    let killed = Instant::now();
    match death {
        Death::ContainerKilled => std::fs::write(cg.path.join("cgroup.kill"), "1").unwrap(),
        Death::TektonTimeout => std::fs::write(&deadline, "").unwrap(),
    }
    let status = child.wait().unwrap();
    assert!(!status.success(), "the container was killed: {status:?}");
    if let Death::TektonTimeout = death {
        // Tekton's entrypoint saw ours die of its SIGKILL, and failed the step.
        assert_eq!(std::fs::read_to_string(&report).unwrap(), "-9");
        assert_eq!(status.code(), Some(1), "{status:?}");
    }

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

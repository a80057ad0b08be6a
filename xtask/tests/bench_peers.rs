#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `cargo xtask bench-peers --quick`: every path (containerd's CRI log tailed by syslog-ng, the
//! entrypoint, the collector) gets the workload's bytes into the metadata API, and the summary
//! table is printed. Numbers are not asserted. Needs root and the test bed (containerd); skipped
//! otherwise unless `RELAY_REQUIRE_TESTBED=1`. The first run fetches syslog-ng from Debian's
//! archive. About 40 s once built (`cargo xtask test` passes the binaries in
//! `RELAY_METADATA_API_BIN`, `RELAY_COLLECTOR_BIN` and `RELAY_ENTRYPOINT_STATIC`).

use std::process::Command;

#[test]
fn every_path_stores_the_workloads_bytes() {
    if let Some(reason) = testbed::unavailable() {
        testbed::skip_or_fail(&reason);
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["bench-peers", "--quick"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    assert!(out.status.success(), "bench-peers failed");
    for path in ["conventional", "entrypoint", "collector"] {
        let arrived = stderr.lines().any(|l| {
            l.contains(&format!(": {path}: wrote "))
                && l.split(", received ")
                    .nth(1)
                    .and_then(|r| r.split(' ').next())
                    .and_then(|n| n.parse::<u64>().ok())
                    .is_some_and(|n| n > 0)
        });
        assert!(arrived, "no bytes arrived on the {path} path");
    }
    assert!(stdout.contains("## Against the conventional path"));
}

#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The peer benchmark's `--quick` run (`cargo bench -p bench --bench peers -- --quick`): every
//! path (containerd's CRI log tailed by syslog-ng, the entrypoint, the collector) gets the
//! workload's bytes into the metadata API, and the summary table is printed. Numbers are not
//! asserted. Needs root and the test bed (containerd); skipped otherwise unless
//! `RELAY_REQUIRE_TESTBED=1`. The first run fetches syslog-ng from Debian's archive. About 40 s
//! once built (`cargo xtask test` passes the binaries in `RELAY_METADATA_API_BIN`,
//! `RELAY_COLLECTOR_BIN` and `RELAY_ENTRYPOINT_STATIC`).

use std::path::Path;

use clap::Parser as _;

/// The benchmark's flags as the command line would give them.
#[derive(Debug, clap::Parser)]
struct Flags {
    #[command(flatten)]
    args: bench::peers::Args,
}

#[test]
fn every_path_stores_the_workloads_bytes() {
    if let Some(reason) = testbed::unavailable() {
        testbed::skip_or_fail(&reason);
        return;
    }
    let args = Flags::parse_from(["peers", "--quick"]).args;
    let outcome = bench::peers::run(args, Path::new(env!("CARGO_BIN_EXE_workload")))
        .expect("the peer benchmark failed");
    for path in ["conventional", "entrypoint", "collector"] {
        let arrived = outcome
            .received
            .iter()
            .any(|&(p, bytes)| p == path && bytes > 0);
        assert!(arrived, "no bytes arrived on the {path} path");
    }
    assert!(outcome.report.contains("## Against the conventional path"));
}

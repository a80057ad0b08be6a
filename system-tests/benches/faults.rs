//! The fault scenarios for people: each against a baseline run without faults, the table printed
//! after each (`cargo bench -p system-tests --bench faults -- [FLAGS]`, root). Exits non-zero
//! when any byte is unaccounted or duplicated. `tests/faults.rs` runs a short `kill-api` and
//! asserts on its outcome.

use std::path::PathBuf;

use system_tests::faults::{Bins, Options, Scenario, run_all};

#[derive(Debug, clap::Args)]
struct Args {
    /// Scenarios to run, comma-separated; all of them (in the order kill-api, throttle-storm,
    /// collector-restart, storage-down, network-cut, collector-kill) when not given.
    #[arg(long, value_enum, value_delimiter = ',')]
    scenario: Vec<Scenario>,
    /// How long the writers write [default: 120 for kill-api, 300 for throttle-storm, 30 for
    /// collector-restart and collector-kill, 60 for storage-down and network-cut].
    #[arg(long)]
    seconds: Option<u64>,
    /// Writers: the even ones under the entrypoint, the odd ones in the collector's cgroup.
    #[arg(long, default_value_t = 10)]
    writers: u32,
    /// Total pace of all writers, MB/s.
    #[arg(long, default_value_t = 20)]
    rate_mb: u64,
    /// Compare wall times with the writers' pace instead of a run without faults first.
    #[arg(long)]
    no_baseline: bool,
    /// Use the release binaries in target/release as they are (do not run cargo build).
    #[arg(long)]
    no_build: bool,
    /// Keep each run's storage (under target/faults) instead of removing it.
    #[arg(long)]
    keep: bool,
}

fn main() -> anyhow::Result<()> {
    let args: Args = bench::args(
        "faults",
        "Scripted fault scenarios (root): produced, stored, dropped and lost bytes per scenario.",
    );
    let bins = Bins::release(
        args.no_build,
        PathBuf::from(env!("CARGO_BIN_EXE_fault-writer")),
    )?;
    let scenarios = if args.scenario.is_empty() {
        Scenario::ALL.to_vec()
    } else {
        args.scenario
    };
    run_all(
        &bins,
        &Options {
            writers: args.writers,
            rate_mb: args.rate_mb,
            keep: args.keep,
        },
        &scenarios,
        args.seconds,
        args.no_baseline,
    )
}

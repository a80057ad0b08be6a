#![allow(clippy::unwrap_used, clippy::expect_used)]
//! A short `kill-api` scenario: the metadata API killed -9 and restarted while writers on both
//! capture paths write, then every byte accounted for (stored or covered by a dropped marker,
//! none duplicated). Root with cgroup v2 and BTF only (the collector path).
//!
//! `cargo xtask test` passes the binaries it built (`RELAY_METADATA_API_BIN`,
//! `RELAY_ENTRYPOINT_STATIC`, `RELAY_COLLECTOR_BIN`); without them the test builds debug ones
//! first. The run itself takes about 20 s; the engine waits on the streams with deadlines.

use std::path::PathBuf;

use system_tests::faults::{Bins, Options, Scenario, print_table, run_scenario};
use testbed::api::{api_bin, workspace_bin};
use testbed::collector::{collector_bin, unavailable};

#[test]
fn kill_api_loses_and_duplicates_nothing() {
    if let Some(why) = unavailable() {
        testbed::skip_or_fail(&format!(
            "the fault scenarios need root, cgroup v2 and BTF: {why}"
        ));
        return;
    }
    let bins = Bins {
        api: api_bin().to_owned(),
        entrypoint: workspace_bin("entrypoint", "entrypoint", "RELAY_ENTRYPOINT_STATIC"),
        collector: collector_bin().to_owned(),
        writer: PathBuf::from(env!("CARGO_BIN_EXE_fault-writer")),
    };
    // 4 writers at 1 MB/s each for 12 s.
    let options = Options {
        writers: 4,
        rate_mb: 4,
        keep: false,
    };
    let outcome = run_scenario(&bins, &options, Some(Scenario::KillApi), false, 12).unwrap();
    // Compared with the writers' pace, as without a baseline.
    let ratio = outcome.wall / 12.0;
    let table = [(outcome, Some(ratio))];
    print_table(&table, options.rate_mb, options.writers);
    let outcome = &table[0].0;
    let total = outcome.total();
    assert_eq!(
        total.produced, 48_000_000,
        "4 writers x 1 MB/s x 12 s produced"
    );
    assert_eq!(
        (total.unaccounted, total.duplicated + total.phantom_dropped),
        (0, 0),
        "{outcome:#?}"
    );
    assert_eq!(outcome.entrypoint.produced, 24_000_000, "{outcome:#?}");
    assert_eq!(outcome.ebpf.produced, 24_000_000, "{outcome:#?}");
    assert!(
        outcome
            .notes
            .iter()
            .any(|n| n.contains("API killed -9 and restarted 2 times")),
        "{outcome:#?}"
    );
    assert!(outcome.clean(), "{outcome:#?}");
}

//! `cargo bench -p bench --bench entrypoint -- [--quick] [--total-mb N]`: see
//! `bench::entrypoint`.

use std::path::Path;

fn main() -> anyhow::Result<()> {
    bench::entrypoint::run(
        bench::args(
            "entrypoint",
            "What the entrypoint costs a command that logs, against a pipe into `cat`.",
        ),
        Path::new(env!("CARGO_BIN_EXE_workload")),
    )
}

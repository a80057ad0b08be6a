//! `cargo bench -p bench --bench redact -- [--quick] [--total-mb N]`: see `bench::redact`.

use std::path::Path;

fn main() -> anyhow::Result<()> {
    bench::redact::run(
        bench::args(
            "redact",
            "What secret redaction costs per GB: the redactor alone, and the entrypoint with 0, 10 \
             and 100 values to redact.",
        ),
        Path::new(env!("CARGO_BIN_EXE_workload")),
    )
}

//! `cargo bench -p bench --bench collector -- [--quick] ...` (root): see `bench::collector`.

use std::path::Path;

fn main() -> anyhow::Result<()> {
    bench::collector::run(
        bench::args(
            "collector",
            "What the eBPF collector costs a writing process, and its capture and shipping rates.",
        ),
        Path::new(env!("CARGO_BIN_EXE_workload")),
    )
}

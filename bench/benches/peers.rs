//! `cargo bench -p bench --bench peers -- [--quick] ...` (root): see `bench::peers`.

use std::path::Path;

fn main() -> anyhow::Result<()> {
    bench::peers::run(
        bench::args(
            "peers",
            "Our entrypoint and collector paths against containerd's CRI log tailed by syslog-ng \
             (root): CPU per GB, max lossless throughput, latency, loss under log rotation.",
        ),
        Path::new(env!("CARGO_BIN_EXE_workload")),
    )?;
    Ok(())
}

//! `cargo bench -p bench --bench kubectl_relay -- [--quick] [--total-mb N] [--runs N]`: see
//! `bench::kubectl_relay`.

use std::path::Path;

fn main() -> anyhow::Result<()> {
    bench::kubectl_relay::run(
        bench::args(
            "kubectl_relay",
            "What `kubectl relay logs` costs reading a whole step, against a plain GET of the read \
             route.",
        ),
        Path::new(env!("CARGO_BIN_EXE_workload")),
    )
}

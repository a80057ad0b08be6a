//! `cargo bench -p bench --bench metadata_api -- [--quick] [--total-mb N] [--part 64K]...
//! [--conns N]...`: see `bench::metadata_api`.

fn main() -> anyhow::Result<()> {
    bench::metadata_api::run(bench::args(
        "metadata_api",
        "Ingest throughput of the metadata API against a plain file write.",
    ))
}

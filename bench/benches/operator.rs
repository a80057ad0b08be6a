//! `cargo bench -p bench --bench operator -- [--pods N] [--tenants N]`: see `bench::operator`.

fn main() -> anyhow::Result<()> {
    bench::operator::run(bench::args(
        "operator",
        "What the pod injection webhook adds to pod creation, and the operator's reconcile rate.",
    ))
}

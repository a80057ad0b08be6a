//! `cargo xtask <task>`: development tasks for the workspace. The benchmarks are the `bench`
//! crate's (`cargo bench -p bench --bench NAME`).

mod demo;
mod dist;
mod ebpf;
mod fuzz;
mod images;
mod test;
mod testbed;
mod util;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// The product on this machine: metadata API on local storage, a workload under the
    /// entrypoint in a cgroup the collector watches (root), logs read back, the capture report.
    Demo(demo::Args),
    /// Install what the tests need (storage emulators, containerd), check formatting and lints, run all tests.
    Test(test::Args),
    /// The cluster-shaped end-to-end test alone: API server, operator, metadata API, test bed
    /// kubelet on containerd, collector (root).
    E2e,
    /// Run the cargo-fuzz targets (briefly by default).
    Fuzz(fuzz::Args),
    /// Container images (metadata-api, operator, collector, tools) as OCI archives under
    /// target/images, for `kind load image-archive`; `--push` copies them to a registry.
    Images(images::Args),
    /// Build the static (musl) entrypoint binary that tenant containers run.
    BuildEntrypoint(dist::Args),
    /// Container test bed: `install` unpacks containerd, runc and busybox into ~/.cache/relay.
    Testbed(testbed::Args),
    /// Installs the eBPF toolchain the collector's build needs (pinned nightly, bpf-linker).
    EbpfToolchain,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Demo(a) => demo::run(a),
        Task::Test(a) => test::run(a),
        Task::E2e => test::e2e(),
        Task::Fuzz(a) => fuzz::run(a),
        Task::Images(a) => images::run_task(a),
        Task::BuildEntrypoint(a) => dist::run_task(a),
        Task::Testbed(a) => testbed::run(a),
        Task::EbpfToolchain => {
            let bin = ebpf::install()?;
            println!("bpf-linker ready in {}", bin.display());
            Ok(())
        }
    }
}

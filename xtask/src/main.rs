//! `cargo xtask <task>`: development tasks for the workspace.

mod bench;
mod bench_collector;
mod bench_entrypoint;
mod bench_operator;
mod bench_peers;
mod bench_redact;
mod demo;
mod dist;
mod ebpf;
mod faults;
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
    /// Ingest throughput benchmark of the metadata API against a plain file write.
    Bench(bench::Args),
    /// Run the cargo-fuzz targets (briefly by default).
    Fuzz(fuzz::Args),
    /// Scripted fault scenarios (root): produced, stored, dropped and lost bytes per scenario.
    Faults(faults::Args),
    /// A fault scenario's writer: paced, deterministic lines on stdout.
    #[command(hide = true)]
    FaultWriter(faults::WriterArgs),
    /// Container images (metadata-api, operator, collector, tools) as OCI archives under
    /// target/images, for `kind load image-archive`; `--push` copies them to a registry.
    Images(images::Args),
    /// Build the static (musl) entrypoint binary that tenant containers run.
    BuildEntrypoint(dist::Args),
    /// What the entrypoint costs a command that logs, against a pipe into `cat`.
    BenchEntrypoint(bench_entrypoint::Args),
    /// The entrypoint benchmark's child: writes log lines in fixed-size writes.
    #[command(hide = true)]
    GenOutput(bench_entrypoint::GenArgs),
    /// What secret redaction costs per GB: the redactor alone, and the entrypoint with 0, 10 and
    /// 100 values to redact.
    BenchRedact(bench_redact::Args),
    /// What the eBPF collector costs a writing process, and its capture and shipping rates.
    BenchCollector(bench_collector::Args),
    /// The collector benchmark's writer: fixed-size write(2) calls on stdout.
    #[command(hide = true)]
    WriteLoop(bench_collector::WriteLoopArgs),
    /// What the pod injection webhook adds to pod creation, and the operator's reconcile rate.
    BenchOperator(bench_operator::Args),
    /// Our entrypoint and collector paths against containerd's CRI log tailed by syslog-ng
    /// (root): CPU per GB, max lossless throughput, latency, loss under log rotation.
    BenchPeers(bench_peers::Args),
    /// The peer benchmark's workload: timestamped lines on stdout, one write each.
    #[command(hide = true)]
    PeerWriter(bench_peers::WriterArgs),
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
        Task::Bench(a) => bench::run(a),
        Task::Fuzz(a) => fuzz::run(a),
        Task::Faults(a) => faults::run(a),
        Task::FaultWriter(a) => faults::writer(a),
        Task::Images(a) => images::run_task(a),
        Task::BuildEntrypoint(a) => dist::run_task(a),
        Task::BenchEntrypoint(a) => bench_entrypoint::run(a),
        Task::GenOutput(a) => bench_entrypoint::gen_output(a),
        Task::BenchRedact(a) => bench_redact::run(a),
        Task::BenchCollector(a) => bench_collector::run(a),
        Task::WriteLoop(a) => bench_collector::write_loop(a),
        Task::BenchOperator(a) => bench_operator::run(a),
        Task::BenchPeers(a) => bench_peers::run(a),
        Task::PeerWriter(a) => bench_peers::writer(a),
        Task::Testbed(a) => testbed::run(a),
        Task::EbpfToolchain => {
            let bin = ebpf::install()?;
            println!("bpf-linker ready in {}", bin.display());
            Ok(())
        }
    }
}

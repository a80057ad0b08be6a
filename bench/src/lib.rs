//! Benchmarks of the product's parts: what the metadata API, the entrypoint, redaction, the
//! collector and the operator cost, and how our capture paths compare with the conventional one.
//!
//! Each benchmark is a `harness = false` bench target (`cargo bench -p bench --bench NAME --
//! FLAGS`) whose `main` parses its flags and calls `run` of its module here, where the unit tests
//! and the peer benchmark's test can reach it. The `workload` binary is the process they measure.
//! Timings are printed, never asserted.

pub mod collector;
pub mod cpu;
pub mod entrypoint;
pub mod kubectl_relay;
pub mod lines;
pub mod metadata_api;
pub mod operator;
pub mod peers;
pub mod process;
pub mod redact;
pub mod text;

/// A benchmark's flags (`A`, its module's `Args`) from the command line, which also holds the
/// `--bench` that `cargo bench` passes to every bench target.
pub fn args<A: clap::Args + clap::FromArgMatches>(name: &'static str, about: &'static str) -> A {
    let command = clap::Command::new(name).about(about).arg(
        clap::Arg::new("bench")
            .long("bench")
            .hide(true)
            .action(clap::ArgAction::SetTrue),
    );
    A::from_arg_matches(&A::augment_args(command).get_matches()).unwrap_or_else(|e| e.exit())
}

//! `cargo bench -p bench --bench redact`: what secret redaction costs per GB.
//!
//! First the redactor alone (`cargo bench -p redact --bench throughput`, release): log text in
//! 64 KiB reads and 100-byte chunks with 0, 10 and 100 values. Then the static entrypoint
//! shipping to a local release metadata-api (as in the entrypoint benchmark) told to redact 0, 10
//! and 100 values: paced at 50 MB/s, where every byte is stored, for the CPU per GB; and as fast as
//! possible, for the rate the child can write at. Timings are printed, never asserted.

use std::{path::Path, process::Command};

use anyhow::Context;

use crate::{
    entrypoint::{Env, Workload, wrapped},
    process::{self, TempDir},
};

const MIB: u64 = 1 << 20;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// MiB per entrypoint run [default: 512, or 128 with --quick].
    #[arg(long)]
    pub total_mb: Option<u64>,
    /// Smoke test: less text everywhere.
    #[arg(long)]
    pub quick: bool,
}

/// Runs the benchmark with `workload` (the `workload` binary) as the entrypoint's child.
pub fn run(args: Args, workload: &Path) -> anyhow::Result<()> {
    let Args { total_mb, quick } = args;
    let bytes = total_mb.unwrap_or(if quick { 128 } else { 512 }) * MIB;
    process::run(
        Command::new("cargo")
            .current_dir(process::root())
            .env("REDACT_BENCH_MB", if quick { "64" } else { "512" })
            .args(["bench", "--quiet", "-p", "redact", "--bench", "throughput"]),
    )
    .context("the redactor benchmark")?;

    let env = Env::build(workload)?;
    let dir = TempDir::create()?;
    let mut rows = Vec::new();
    for (name, rate_mb) in [
        ("64 KiB writes at 50 MB/s", 50),
        ("64 KiB writes, unpaced", 0),
    ] {
        for secrets in [0, 10, 100] {
            let w = Workload {
                name,
                write_size: 64 << 10,
                rate_mb,
                compression: "gzip",
                secrets,
            };
            eprintln!("bench: {name}, {secrets} values, through the entrypoint");
            rows.push((name, secrets, wrapped(&env, bytes, &w, &dir.0)?));
        }
    }
    let gb = bytes as f64 / 1e9;
    println!();
    println!(
        "entrypoint: {} MiB per run, gzip level 1; entrypoint CPU = reader CPU without the API's",
        bytes / MIB
    );
    println!();
    println!(
        "| workload | values | child wall s | child MB/s | entrypoint CPU s/GB | vs 0 values | API CPU s/GB | stored | dropped |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut base = None;
    for (name, secrets, m) in &rows {
        let ours = (m.reader_cpu - m.api_cpu) / gb;
        if *secrets == 0 {
            base = Some(ours);
        }
        let ratio = base.map_or(String::from("-"), |b| format!("x{:.2}", ours / b));
        println!(
            "| {name} | {secrets} | {:.2} | {:.0} | {ours:.2} | {ratio} | {:.2} | {:.1}% | {:.1}% |",
            m.child_wall,
            bytes as f64 / 1e6 / m.child_wall,
            m.api_cpu / gb,
            m.stored as f64 * 100.0 / bytes as f64,
            m.dropped as f64 * 100.0 / bytes as f64,
        );
    }
    Ok(())
}

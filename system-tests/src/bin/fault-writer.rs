//! One writer of a fault scenario (`system_tests::faults`): paced, deterministic lines on stdout.

use std::path::PathBuf;

use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "fault-writer")]
struct Args {
    /// Tag in every line (3 characters).
    #[arg(long)]
    tag: String,
    /// Bytes to write.
    #[arg(long)]
    bytes: u64,
    /// Pace, bytes per second.
    #[arg(long)]
    rate: u64,
    /// cgroup v2 directory to move into before writing.
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// File that receives "BYTES WALL_SECONDS LONGEST_WRITE_SECONDS".
    #[arg(long)]
    report: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let Args {
        tag,
        bytes,
        rate,
        cgroup,
        report,
    } = Args::parse();
    system_tests::faults::writer(&tag, bytes, rate, cgroup.as_deref(), &report)
}

//! Log text for benchmarks: realistic lines, the same on every run.

use std::io::Write as _;

use rand::{Rng, SeedableRng, rngs::StdRng};

/// Words log messages are made of.
const WORDS: &[&str] = &[
    "request",
    "handled",
    "connection",
    "opened",
    "closed",
    "retrying",
    "upstream",
    "timeout",
    "cache",
    "miss",
    "hit",
    "user",
    "session",
    "token",
    "refreshed",
    "job",
    "queued",
    "started",
    "finished",
    "failed",
    "worker",
    "shard",
    "rebalanced",
    "lease",
    "acquired",
    "released",
    "flush",
    "compaction",
    "segment",
    "checkpoint",
    "written",
    "snapshot",
    "replica",
    "leader",
    "elected",
    "heartbeat",
    "missed",
    "config",
    "reloaded",
    "watch",
    "event",
    "dropped",
    "backpressure",
    "buffer",
    "full",
    "download",
    "upload",
    "artifact",
    "step",
    "container",
    "pulled",
    "image",
    "layer",
    "exit",
    "code",
    "signal",
    "received",
    "graceful",
    "shutdown",
    "healthy",
    "unhealthy",
    "probe",
    "latency",
    "p99",
];
/// Components that log.
const COMPONENTS: &[&str] = &[
    "api",
    "scheduler",
    "runner",
    "storage",
    "auth",
    "cache",
    "gateway",
    "indexer",
    "uploader",
    "watcher",
    "builder",
    "db",
];
/// Keys of `key=value` fields.
const KEYS: &[&str] = &[
    "status",
    "duration_ms",
    "bytes",
    "attempt",
    "shard",
    "user_id",
    "retries",
    "queue_len",
];

/// Generates `total` bytes of log lines (timestamp, level, component, words, fields) from a
/// fixed seed: the same data on every run.
pub fn generate(total: usize) -> anyhow::Result<Vec<u8>> {
    let mut rng = StdRng::seed_from_u64(0x10c5_bec4);
    let pick = |rng: &mut StdRng, list: &[&'static str]| list[rng.random_range(0..list.len())];
    let mut out = Vec::with_capacity(total + 512);
    let mut ms: u64 = 8 * 3_600_000;
    while out.len() < total {
        ms += rng.random_range(0..40);
        let (h, m, s, milli) = (
            ms / 3_600_000 % 24,
            ms / 60_000 % 60,
            ms / 1000 % 60,
            ms % 1000,
        );
        let level = match rng.random_range(0..100) {
            0..70 => "INFO",
            70..85 => "DEBUG",
            85..95 => "WARN",
            _ => "ERROR",
        };
        let component = pick(&mut rng, COMPONENTS);
        write!(
            out,
            "2025-06-01T{h:02}:{m:02}:{s:02}.{milli:03}Z {level:<5} [{component}] "
        )?;
        for i in 0..rng.random_range(6..16) {
            let sep = if i == 0 { "" } else { " " };
            write!(out, "{sep}{}", pick(&mut rng, WORDS))?;
        }
        for _ in 0..rng.random_range(1..5) {
            let key = pick(&mut rng, KEYS);
            write!(out, " {key}={}", rng.random_range(0..1000))?;
        }
        if rng.random_bool(0.25) {
            write!(out, " trace_id={:016x}", rng.random::<u64>())?;
        }
        out.push(b'\n');
    }
    out.truncate(total);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    #[test]
    fn generated_data_is_log_lines_of_the_asked_size() {
        let data = generate(MIB).unwrap();
        assert_eq!(data.len(), MIB);
        assert_eq!(
            data,
            generate(MIB).unwrap(),
            "the seed makes it reproducible"
        );
        let lines: Vec<&[u8]> = data.split(|&b| b == b'\n').collect();
        // The last line is cut at the size limit.
        let whole = &lines[..lines.len() - 1];
        let mean = whole.iter().map(|l| l.len() + 1).sum::<usize>() / whole.len();
        assert!((100..=200).contains(&mean), "mean line length {mean}");
        assert!(whole.iter().all(|l| l.starts_with(b"2025-06-01T")));
    }
}

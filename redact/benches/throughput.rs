//! Redactor throughput: log text fed in 64 KiB reads (the entrypoint's pipe reads) and in
//! 100-byte chunks (the collector's small writes), with 0, 10 and 100 secret values, one value
//! occurring every 64 lines when there are any. CPU time is this thread's (`/proc/thread-self`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{hint::black_box, sync::Arc, time::Instant};

use rand::{Rng, SeedableRng, rngs::StdRng};
use redact::{Redactor, Secrets};

const WORDS: &[&str] = &[
    "request",
    "served",
    "user",
    "session",
    "cache",
    "miss",
    "hit",
    "retry",
    "upstream",
    "timeout",
    "connection",
    "closed",
    "opened",
    "token",
    "refreshed",
    "job",
    "started",
    "finished",
    "queue",
    "depth",
    "worker",
    "ready",
    "error",
    "payload",
    "accepted",
];

/// This thread's CPU seconds (user + system).
fn thread_cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split(' ').collect();
    // Fields 14 and 15 (utime, stime) are the 12th and 13th after the comm.
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    ticks / 100.0
}

fn token(rng: &mut StdRng) -> String {
    let len = rng.random_range(20..41);
    (0..len)
        .map(|_| {
            char::from(
                b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                    [rng.random_range(0..62)],
            )
        })
        .collect()
}

fn text(rng: &mut StdRng, bytes: usize, values: &[String]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes + 512);
    let mut line = 0u64;
    while out.len() < bytes {
        line += 1;
        out.extend_from_slice(
            format!(
                "2025-06-01T08:00:{:02}.{:03}Z INFO ",
                line % 60,
                line % 1000
            )
            .as_bytes(),
        );
        for _ in 0..rng.random_range(6..16) {
            out.extend_from_slice(WORDS[rng.random_range(0..WORDS.len())].as_bytes());
            out.push(b' ');
        }
        if !values.is_empty() && line.is_multiple_of(64) {
            out.extend_from_slice(b"auth=");
            out.extend_from_slice(values[rng.random_range(0..values.len())].as_bytes());
        }
        out.extend_from_slice(format!(" id={}\n", rng.random_range(0..100_000)).as_bytes());
    }
    out.truncate(bytes);
    out
}

fn main() {
    let total: usize = std::env::var("REDACT_BENCH_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512)
        << 20;
    let mut rng = StdRng::seed_from_u64(1);
    println!("redactor alone: {} MiB of log text per case", total >> 20);
    println!();
    println!("| values | chunk | GB/s | core-s/GB | output/input |");
    println!("|---:|---:|---:|---:|---:|");
    for n in [0usize, 10, 100] {
        let values: Vec<String> = (0..n).map(|_| token(&mut rng)).collect();
        let secrets = Arc::new(Secrets::new(&values).unwrap());
        let input = text(&mut rng, total, &values);
        for chunk in [64usize << 10, 100] {
            let mut r = Redactor::new(secrets.clone());
            let mut out = 0usize;
            let mut sink = |b: &[u8]| out += black_box(b).len();
            let (cpu0, t0) = (thread_cpu(), Instant::now());
            for (i, c) in input.chunks(chunk).enumerate() {
                r.feed(c, &mut sink);
                if i % 64 == 63 {
                    r.flush_idle(&mut sink);
                }
            }
            r.finish(&mut sink);
            let (cpu, wall) = (thread_cpu() - cpu0, t0.elapsed().as_secs_f64());
            let gb = input.len() as f64 / 1e9;
            println!(
                "| {n} | {} | {:.2} | {:.3} | {:.4} |",
                if chunk == 100 {
                    "100 B".to_owned()
                } else {
                    format!("{} KiB", chunk >> 10)
                },
                gb / wall,
                cpu / gb,
                out as f64 / input.len() as f64
            );
        }
    }
}

//! `cargo bench -p metadata-api --bench compression -- [--batch SIZE] [LABEL=FILE]...`: what each
//! append coding costs on log text, to choose the writers' default.
//!
//! Each corpus is cut into batches as the shipper cuts a stream (1 MiB unless `--batch` says),
//! and each batch is compressed with the function the shipper calls (`client::compress_into`,
//! reusing one output buffer as its pool does), then decoded as the server decodes it (gzip
//! members or zstd frames, zstd's window held to 8 MiB, into a buffer sized to the batch).
//! Reported per corpus: ratio (input / output), compression and decompression CPU in core-seconds
//! per GB of log text (10^9 bytes), each also against gzip level 1, the entrypoint's default.
//! Each pass repeats until it has used a second of CPU; one thread, so core-seconds are the
//! thread's own CPU time (`/proc/thread-self/schedstat`).
//!
//! Corpora: generated build-log lines (always), and files given as `LABEL=FILE` (files with the
//! same label are one corpus, batched file by file so no batch spans two files). Timings are
//! printed, never asserted; under `cargo test` (no `--bench` argument) this does nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::Read,
    time::{Duration, Instant},
};

use client::compress_into;
use contract::{coding::Coding, size::parse_size};
use rand::{Rng, SeedableRng, rngs::StdRng};

/// The codings compared; the first is the baseline every ratio is taken against.
const CODECS: [(Coding, u32); 4] = [
    (Coding::Gzip, 1),
    (Coding::Gzip, 6),
    (Coding::Zstd, 1),
    (Coding::Zstd, 3),
];
/// Least CPU time one measurement runs for.
const MIN_CPU: Duration = Duration::from_secs(1);
/// Bytes of generated build log.
const GENERATED: usize = 64 << 20;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|a| a == "--bench") {
        println!("compression: run with `cargo bench -p metadata-api --bench compression`");
        return;
    }
    let mut batch = 1usize << 20;
    let mut corpora: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
    let mut it = args.iter().filter(|a| *a != "--bench");
    while let Some(a) = it.next() {
        if a == "--batch" {
            let v = it.next().expect("--batch SIZE");
            batch = usize::try_from(parse_size(v).expect("a size like 64K or 1M")).unwrap();
        } else if let Some((label, path)) = a.split_once('=') {
            let text = std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"));
            corpora.entry(label.to_owned()).or_default().push(text);
        } else {
            panic!("unexpected argument {a:?} (want --batch SIZE or LABEL=FILE)");
        }
    }
    let given = !corpora.is_empty();
    corpora.insert("generated build log".to_owned(), vec![build_log(GENERATED)]);
    println!(
        "## Append codings on log text: {} KiB batches, one thread, core-seconds per GB (10^9 bytes) of text\n",
        batch >> 10
    );
    // Per coding, over the corpora given on the command line: bytes in, bytes out, CPU.
    let mut all = [Total::default(); CODECS.len()];
    for (label, files) in &corpora {
        let batches: Vec<&[u8]> = files.iter().flat_map(|f| f.chunks(batch)).collect();
        let total: usize = batches.iter().map(|b| b.len()).sum();
        println!(
            "### {label}: {:.1} MB in {} file(s), {} batches\n",
            total as f64 / 1e6,
            files.len(),
            batches.len()
        );
        let rows: Vec<Row> = CODECS
            .iter()
            .map(|&(coding, level)| measure(coding, level, &batches, batch))
            .collect();
        table(&rows);
        if label != "generated build log" {
            for (t, r) in all.iter_mut().zip(&rows) {
                let gb = total as f64 / 1e9;
                t.gb += gb;
                t.wire_gb += gb / r.ratio;
                t.compress += r.compress * gb;
                t.decompress += r.decompress * gb;
            }
        }
    }
    if given {
        println!("### all the given files together (weighted by size)\n");
        let rows: Vec<Row> = all
            .iter()
            .map(|t| Row {
                ratio: t.gb / t.wire_gb,
                compress: t.compress / t.gb,
                decompress: t.decompress / t.gb,
            })
            .collect();
        table(&rows);
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Total {
    gb: f64,
    wire_gb: f64,
    /// Core-seconds.
    compress: f64,
    decompress: f64,
}

/// One row per entry of [`CODECS`], each also against the first (gzip 1).
fn table(rows: &[Row]) {
    println!(
        "| coding | ratio | compress s/GB | decompress s/GB | ratio vs gzip 1 | compress vs gzip 1 | decompress vs gzip 1 |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let b = rows[0];
    for ((coding, level), row) in CODECS.iter().zip(rows) {
        println!(
            "| {coding} {level} | {:.2} | {:.2} | {:.2} | {:.2}x | {:.2}x | {:.2}x |",
            row.ratio,
            row.compress,
            row.decompress,
            row.ratio / b.ratio,
            row.compress / b.compress,
            row.decompress / b.decompress,
        );
    }
    println!();
}

#[derive(Debug, Clone, Copy)]
struct Row {
    ratio: f64,
    /// Core-seconds per GB of input.
    compress: f64,
    decompress: f64,
}

fn measure(coding: Coding, level: u32, batches: &[&[u8]], batch: usize) -> Row {
    let total: usize = batches.iter().map(|b| b.len()).sum();
    let packed: Vec<Vec<u8>> = batches
        .iter()
        .map(|b| compress_into(coding, b, level, Vec::new()).unwrap())
        .collect();
    let wire: usize = packed.iter().map(Vec::len).sum();
    let mut out = Vec::with_capacity(batch);
    let compress = per_gb(total, || {
        for b in batches {
            out = compress_into(coding, b, level, std::mem::take(&mut out)).unwrap();
            std::hint::black_box(&out);
        }
    });
    let mut dec = Vec::with_capacity(batch);
    let decompress = per_gb(total, || {
        for (p, raw) in packed.iter().zip(batches) {
            dec.clear();
            decode(coding, p, &mut dec);
            assert_eq!(dec.len(), raw.len());
        }
    });
    Row {
        ratio: total as f64 / wire as f64,
        compress,
        decompress,
    }
}

/// As the server decodes (`decode_body` in `src/routes/decode.rs`, minus its size accounting).
fn decode(coding: Coding, body: &[u8], out: &mut Vec<u8>) {
    match coding {
        Coding::Gzip => {
            flate2::read::MultiGzDecoder::new(body)
                .read_to_end(out)
                .unwrap();
        }
        Coding::Zstd => {
            let mut d = zstd::stream::read::Decoder::with_buffer(body).unwrap();
            d.window_log_max(23).unwrap();
            d.read_to_end(out).unwrap();
        }
        Coding::Identity => out.extend_from_slice(body),
    }
}

/// Runs `pass` until it used [`MIN_CPU`] and returns the CPU per GB of `bytes` per pass.
fn per_gb(bytes: usize, mut pass: impl FnMut()) -> f64 {
    pass(); // warm-up: buffers and tables allocated, caches filled
    let (start, mut passes) = (cpu(), 0u32);
    loop {
        pass();
        passes += 1;
        let used = cpu() - start;
        if used >= MIN_CPU {
            return used.as_secs_f64() / f64::from(passes) / (bytes as f64 / 1e9);
        }
    }
}

/// This thread's CPU time: the first field of `/proc/thread-self/schedstat` (ns on a CPU);
/// wall time where the kernel has no schedstat (the benchmark is one busy thread).
fn cpu() -> Duration {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .map_or_else(
            || {
                static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
                START.get_or_init(Instant::now).elapsed()
            },
            Duration::from_nanos,
        )
}

/// Build-log lines as CI prints them: a timestamp, then compiler invocations with long repeated
/// paths and flags, warnings pointing into sources, test results; fixed seed, same text each run.
fn build_log(total: usize) -> Vec<u8> {
    const CRATES: &[&str] = &[
        "tokio",
        "serde",
        "hyper",
        "axum",
        "tracing",
        "bytes",
        "futures",
        "rand",
        "regex",
        "syn",
        "quote",
        "clap",
        "flate2",
        "zstd",
        "object_store",
        "kube",
        "prost",
        "tonic",
    ];
    const FILES: &[&str] = &[
        "src/lib.rs",
        "src/main.rs",
        "src/runtime/scheduler/mod.rs",
        "src/io/driver.rs",
        "src/de/value.rs",
        "src/client/conn.rs",
        "src/routing/route.rs",
        "build.rs",
    ];
    const WARNINGS: &[&str] = &[
        "unused variable: `ctx`",
        "this function has too many arguments (8/7)",
        "field `inner` is never read",
        "unused import: `std::sync::Arc`",
    ];
    let mut rng = StdRng::seed_from_u64(0x0b01_d106);
    let mut out = String::with_capacity(total + 1024);
    let mut ms: u64 = 0;
    while out.len() < total {
        ms += rng.random_range(0..250);
        let ts = format!(
            "2025-06-01T10:{:02}:{:02}.{:03}Z",
            ms / 60_000 % 60,
            ms / 1000 % 60,
            ms % 1000
        );
        let krate = CRATES[rng.random_range(0..CRATES.len())];
        let file = FILES[rng.random_range(0..FILES.len())];
        let version = format!(
            "{}.{}.{}",
            rng.random_range(0..2),
            rng.random_range(0..40),
            rng.random_range(0..20)
        );
        let hash: u64 = rng.random();
        let _ = match rng.random_range(0..100) {
            0..40 => writeln!(
                out,
                "{ts}    Compiling {krate} v{version} (/home/runner/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/{krate}-{version})"
            ),
            40..65 => writeln!(
                out,
                "{ts}      Running `/home/runner/.rustup/toolchains/1.95.0-x86_64-unknown-linux-gnu/bin/rustc --crate-name {krate} --edition=2021 /home/runner/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/{krate}-{version}/{file} --error-format=json --crate-type lib -C opt-level=3 -C embed-bitcode=no -C metadata={hash:016x} --out-dir /home/runner/work/relay/target/release/deps -L dependency=/home/runner/work/relay/target/release/deps --cap-lints allow`"
            ),
            65..80 => writeln!(
                out,
                "{ts} warning: {}\n{ts}   --> /home/runner/work/relay/{krate}/{file}:{}:{}\n{ts}    |",
                WARNINGS[rng.random_range(0..WARNINGS.len())],
                rng.random_range(1..2000),
                rng.random_range(1..80)
            ),
            80..95 => writeln!(
                out,
                "{ts}         PASS [{:>7.3}s] {krate}::{} tests::case_{}",
                rng.random_range(0.0..12.0),
                file.trim_end_matches(".rs").replace('/', "::"),
                rng.random_range(0..500)
            ),
            _ => writeln!(
                out,
                "{ts} cc -O2 -fPIC -m64 -I/home/runner/work/relay/target/release/build/{krate}-sys-{hash:016x}/out/include -c /home/runner/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/{krate}-sys-{version}/vendor/lib/{}.c -o /home/runner/work/relay/target/release/build/{krate}-sys-{hash:016x}/out/{}.o",
                rng.random_range(0..300),
                rng.random_range(0..300)
            ),
        };
    }
    out.truncate(total);
    out.into_bytes()
}

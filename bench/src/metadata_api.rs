//! `cargo bench -p bench --bench metadata_api`: ingest throughput of the metadata API against a
//! plain file write.
//!
//! Realistic log lines are generated once, in memory. For every cell of the matrix (connections x
//! part size x encoding) a fresh `metadata-api serve` on a fresh local directory receives the data:
//! each connection is a thread with its own HTTP client (one keep-alive TCP connection), its own
//! token and stream, sending its share in sequential PATCHes and then the final length. Gzip and
//! zstd parts are compressed before the clock starts: the client's compression is not the server's
//! cost.
//!
//! Reported per cell: wall-clock throughput, the server's CPU time (user + system, from
//! `/proc/<pid>/stat`) per GiB, throughput per server core, and how that compares with `cat`
//! copying the same bytes into a file. Timings are printed, never asserted.

use std::{
    fmt::Write as _,
    io::Write as _,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, anyhow, bail, ensure};
use reqwest::blocking::Client;

use crate::{
    cpu::{clock_ticks, server_cpu},
    process::{self, Server, TempDir},
    text::generate,
};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// MiB of log data sent in each cell [default: 256, or 32 with --quick].
    #[arg(long)]
    pub total_mb: Option<usize>,
    /// Smoke test: 32 MiB by default, and only the cells with 1 MiB parts (unless `--part` says).
    #[arg(long)]
    pub quick: bool,
    /// Only cells with these part sizes (`64K`, `1M`; repeatable) [default: 64K and 1M].
    #[arg(long = "part", value_parser = parse_part)]
    pub parts: Vec<usize>,
    /// Only cells with these connection counts (repeatable) [default: 1 and 8].
    #[arg(long = "conns", value_parser = clap::value_parser!(u16).range(1..=64))]
    pub conns: Vec<u16>,
}

const MIB: usize = 1 << 20;
/// The connection counts of the matrix; each connection writes its own step's stream.
const CONNS: [usize; 2] = [1, 8];
/// The part sizes of the matrix.
const PARTS: [usize; 2] = [64 << 10, MIB];
/// How long one request may take before the bench gives up.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);
/// Limits generous enough that no budget throttles the bench.
const SERVE_LIMITS: [&str; 12] = [
    "--stream-rate",
    "100G",
    "--global-rate",
    "100G",
    "--stream-inflight",
    "10G",
    "--global-inflight",
    "10G",
    "--max-body",
    "64M",
    "--max-decoded",
    "256M",
];

/// `64K`, `1M` or a plain byte count.
fn parse_part(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let (digits, shift) = if let Some(d) = t.strip_suffix(['K', 'k']) {
        (d, 10)
    } else if let Some(d) = t.strip_suffix(['M', 'm']) {
        (d, 20)
    } else {
        (t, 0)
    };
    digits
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("{s:?} is not a part size like 64K or 1M"))
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let Args {
        total_mb,
        quick,
        parts,
        conns,
    } = args;
    let total_mb = total_mb.unwrap_or(if quick { 32 } else { 256 });
    ensure!(total_mb > 0, "--total-mb must be positive");
    let total = total_mb
        .checked_mul(MIB)
        .context("--total-mb is too large")?;

    let parts = match (parts.is_empty(), quick) {
        (false, _) => parts,
        (true, true) => vec![MIB],
        (true, false) => PARTS.to_vec(),
    };
    let conns: Vec<usize> = if conns.is_empty() {
        CONNS.to_vec()
    } else {
        conns.into_iter().map(usize::from).collect()
    };

    let bin = process::build_metadata_api()?;
    let dir = TempDir::create()?;
    let key_file = dir.0.join("bench.key");
    let max_conns = conns.iter().copied().max().unwrap_or(1);
    let tokens = (1..=max_conns)
        .map(|i| {
            let context = format!("workflows/bench/runs/1/steps/s{i}");
            process::token(&bin, &key_file, &context, "write")
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let tck = clock_ticks();

    eprintln!("bench: generating {total_mb} MiB of log lines");
    let data = generate(total)?;
    let cat = cat_baseline(&dir.0, &data)?;

    let cells: Vec<Cell> = conns
        .iter()
        .flat_map(|&conns| parts.iter().map(move |&part| (conns, part)))
        .flat_map(|(conns, part)| {
            [Encoding::Plain, Encoding::Gzip, Encoding::Zstd].map(|encoding| Cell {
                conns,
                part,
                encoding,
            })
        })
        .collect();
    let mut rows = Vec::with_capacity(cells.len());
    for (i, cell) in cells.iter().enumerate() {
        eprintln!("bench: cell {}/{}: {cell}", i + 1, cells.len());
        let storage = dir.0.join(format!("cell-{i}"));
        let env = CellEnv {
            bin: &bin,
            key_file: &key_file,
            storage: &storage,
            tokens: &tokens,
            tck,
        };
        let measured = bench_cell(&env, cell, &data);
        // Each cell holds a full copy of the data on disk: free it before the next one.
        let removed = std::fs::remove_dir_all(&storage)
            .with_context(|| format!("cannot remove {}", storage.display()));
        rows.push(measured.with_context(|| format!("cell {cell}"))?);
        removed?;
    }

    print_report(total, cat, &cells, &rows);
    Ok(())
}

/// Whether parts travel as they are, gzip-compressed (level 6) or zstd-compressed (level 1, one
/// frame with its size and a checksum, as the shipping client sends them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Plain,
    Gzip,
    Zstd,
}

impl Encoding {
    fn as_str(self) -> &'static str {
        match self {
            Self::Plain => "plain",
            Self::Gzip => "gzip",
            Self::Zstd => "zstd",
        }
    }
}

/// One cell of the matrix.
#[derive(Debug, Clone, Copy)]
struct Cell {
    conns: usize,
    part: usize,
    encoding: Encoding,
}

impl std::fmt::Display for Cell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Self {
            conns,
            part,
            encoding,
        } = self;
        let encoding = encoding.as_str();
        write!(f, "{conns} conns, {} parts, {encoding}", size(*part))
    }
}

/// What a cell measured.
#[derive(Debug, Clone, Copy)]
struct Measured {
    /// From the first PATCH to the last answer.
    wall: Duration,
    /// Server CPU seconds (user + system) over the same interval.
    cpu: f64,
    /// Bytes on the wire (request bodies), to show the gzip ratio.
    wire: usize,
}

/// What every cell shares.
#[derive(Debug)]
struct CellEnv<'a> {
    bin: &'a Path,
    key_file: &'a Path,
    storage: &'a Path,
    /// One write token per connection, each for its own step context.
    tokens: &'a [String],
    /// Clock ticks per second, the unit of `/proc/<pid>/stat` times.
    tck: f64,
}

/// A stream one connection writes, with the client that holds its connection.
#[derive(Debug)]
struct Upload {
    client: Client,
    token: String,
    id: String,
    /// Uncompressed bytes this connection sends.
    len: usize,
}

/// One prepared PATCH.
#[derive(Debug)]
struct Part {
    /// The `Content-Range` value.
    range: String,
    body: Vec<u8>,
}

/// Runs one cell on a fresh server and storage directory.
fn bench_cell(env: &CellEnv<'_>, cell: &Cell, data: &[u8]) -> anyhow::Result<Measured> {
    let Cell {
        conns,
        part,
        encoding,
    } = *cell;
    ensure!(
        conns <= env.tokens.len(),
        "{conns} connections but only {} tokens",
        env.tokens.len()
    );
    std::fs::create_dir_all(env.storage)
        .with_context(|| format!("cannot create {}", env.storage.display()))?;
    let storage = format!("file://{}", env.storage.display());
    let key_file = env.key_file.to_string_lossy();
    let mut serve_args = vec!["--listen", "127.0.0.1:0", "--storage", &storage];
    serve_args.extend(["--key-file", &key_file]);
    serve_args.extend(SERVE_LIMITS);
    let server = Server::start(env.bin, &serve_args)?;
    let url = server.url.as_str();
    let pid = server.child.id();

    // Everything but the PATCHes happens before the clock starts: clients and their connections
    // (the create request opens them), streams, and gzip compression.
    let mut uploads = Vec::with_capacity(conns);
    let mut plans = Vec::with_capacity(conns);
    for (share, token) in shares(data, conns).into_iter().zip(env.tokens) {
        uploads.push(create(url, token, share.len())?);
        plans.push(prepare(share, part, encoding)?);
    }
    let wire = plans.iter().flatten().map(|p| p.body.len()).sum();

    let cpu_before = server_cpu(pid, env.tck)?;
    let start = Instant::now();
    std::thread::scope(|s| {
        let threads: Vec<_> = uploads
            .iter()
            .zip(plans)
            .map(|(upload, parts)| s.spawn(move || send(url, upload, parts, encoding)))
            .collect();
        threads
            .into_iter()
            .try_for_each(|t| t.join().map_err(|_| anyhow!("an upload thread panicked"))?)
    })?;
    let wall = start.elapsed();
    let cpu = server_cpu(pid, env.tck)? - cpu_before;

    for upload in &uploads {
        verify(url, upload)?;
    }
    drop(server);
    Ok(Measured { wall, cpu, wire })
}

/// Splits `data` into `n` contiguous shares, the last one taking the remainder.
fn shares(data: &[u8], n: usize) -> Vec<&[u8]> {
    let each = data.len() / n.max(1);
    (0..n)
        .map(|i| {
            let end = if i + 1 == n {
                data.len()
            } else {
                (i + 1) * each
            };
            &data[i * each..end]
        })
        .collect()
}

/// Opens a client (one keep-alive connection) and creates the `stdout` stream of `token`'s step.
fn create(url: &str, token: &str, len: usize) -> anyhow::Result<Upload> {
    let client = Client::builder().timeout(REQUEST_TIMEOUT).build()?;
    let resp = client
        .post(format!("{url}/logs"))
        .bearer_auth(token)
        .json(&serde_json::json!({"name": "stdout"}))
        .send()
        .context("POST /logs")?;
    let status = resp.status();
    if !status.is_success() {
        bail!("POST /logs answered {status}: {}", resp.text()?);
    }
    let created: serde_json::Value = resp.json().context("POST /logs answer")?;
    let id = created["id"]
        .as_str()
        .context("POST /logs answer has no id")?
        .to_owned();
    ensure!(
        created["length"].as_u64() == Some(0),
        "stream {id} is not new: {created}"
    );
    Ok(Upload {
        client,
        token: token.to_owned(),
        id,
        len,
    })
}

/// Cuts a share into parts of `part` bytes, compressing them when the encoding asks for it (on
/// every core: it happens before the clock starts, but should not keep the benchmark waiting).
fn prepare(share: &[u8], part: usize, encoding: Encoding) -> anyhow::Result<Vec<Part>> {
    let chunks: Vec<(usize, &[u8])> = share
        .chunks(part)
        .enumerate()
        .map(|(i, chunk)| (i * part, chunk))
        .collect();
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per_worker = chunks.len().div_ceil(workers).max(1);
    std::thread::scope(|s| {
        let groups: Vec<_> = chunks
            .chunks(per_worker)
            .map(|group| {
                s.spawn(move || {
                    group
                        .iter()
                        .map(|&(offset, chunk)| encode(offset, chunk, encoding))
                        .collect::<anyhow::Result<Vec<_>>>()
                })
            })
            .collect();
        let mut out = Vec::with_capacity(chunks.len());
        for g in groups {
            out.extend(
                g.join()
                    .map_err(|_| anyhow!("a compression thread panicked"))??,
            );
        }
        Ok(out)
    })
}

/// The PATCH for `chunk`, the bytes at `offset` of the stream.
fn encode(offset: usize, chunk: &[u8], encoding: Encoding) -> anyhow::Result<Part> {
    let range = format!("bytes {offset}-{}/*", offset + chunk.len() - 1);
    let body = match encoding {
        Encoding::Plain => chunk.to_vec(),
        Encoding::Gzip => {
            let mut gz = flate2::write::GzEncoder::new(
                Vec::with_capacity(chunk.len() / 4),
                flate2::Compression::default(),
            );
            gz.write_all(chunk)?;
            gz.finish()?
        }
        Encoding::Zstd => {
            let mut zc = zstd::bulk::Compressor::new(1)?;
            zc.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true))?;
            zc.compress(chunk)?
        }
    };
    Ok(Part { range, body })
}

/// Sends the parts in order on the upload's connection, then declares the final length.
fn send(url: &str, upload: &Upload, parts: Vec<Part>, encoding: Encoding) -> anyhow::Result<()> {
    let data_url = format!("{url}/logs/{}/data", upload.id);
    let patch = |range: &str, body: Vec<u8>, encoding: Encoding| -> anyhow::Result<()> {
        let mut req = upload
            .client
            .patch(&data_url)
            .bearer_auth(&upload.token)
            .header("content-type", "application/octet-stream")
            .header("content-range", range)
            .body(body);
        if encoding != Encoding::Plain {
            req = req.header("content-encoding", encoding.as_str());
        }
        let resp = req.send().with_context(|| format!("PATCH {range}"))?;
        let status = resp.status();
        // Reading the answer to its end keeps the connection reusable.
        let text = resp.text()?;
        ensure!(
            status.as_u16() == 202,
            "PATCH {range} answered {status}: {text}"
        );
        Ok(())
    };
    for Part { range, body } in parts {
        patch(&range, body, encoding)?;
    }
    patch(
        &format!("bytes */{}", upload.len),
        Vec::new(),
        Encoding::Plain,
    )
}

/// Checks that the service stored every byte sent, and the stream is complete.
fn verify(url: &str, upload: &Upload) -> anyhow::Result<()> {
    let resp = upload
        .client
        .get(format!("{url}/logs/{}", upload.id))
        .bearer_auth(&upload.token)
        .send()
        .context("GET stream status")?;
    let status = resp.status();
    if !status.is_success() {
        bail!(
            "GET /logs/{} answered {status}: {}",
            upload.id,
            resp.text()?
        );
    }
    let st: serde_json::Value = resp.json()?;
    let length = st["length"].as_u64();
    ensure!(
        length == Some(upload.len as u64) && st["complete"].as_bool() == Some(true),
        "stream {} holds {length:?} bytes (complete: {}), {} were sent",
        upload.id,
        st["complete"],
        upload.len
    );
    Ok(())
}

/// MiB/s of `cat SRC > DST` for the data, best of five (the source is in the page cache).
fn cat_baseline(dir: &Path, data: &[u8]) -> anyhow::Result<f64> {
    let src = dir.join("cat-src.log");
    let dst = dir.join("cat-dst.log");
    std::fs::write(&src, data).with_context(|| format!("cannot write {}", src.display()))?;
    let mut best = Duration::MAX;
    for _ in 0..5 {
        let _ = std::fs::remove_file(&dst);
        let start = Instant::now();
        // Paths go in as positional parameters: no quoting to get wrong.
        let status = Command::new("sh")
            .args(["-c", r#"cat "$0" > "$1""#])
            .arg(&src)
            .arg(&dst)
            .status()
            .context("cannot run sh")?;
        let took = start.elapsed();
        ensure!(status.success(), "cat failed: {status}");
        best = best.min(took);
    }
    let copied = std::fs::metadata(&dst)?.len();
    ensure!(
        copied == data.len() as u64,
        "cat copied {copied} bytes of {}",
        data.len()
    );
    std::fs::remove_file(&src)?;
    std::fs::remove_file(&dst)?;
    Ok(mib(data.len()) / best.as_secs_f64())
}

/// Prints the markdown table, the baseline and what the columns mean.
fn print_report(total: usize, cat: f64, cells: &[Cell], rows: &[Measured]) {
    println!(
        "| conns | part | encoding | MiB/s | server CPU s/GiB | MiB/s per server core | x cat |"
    );
    println!(
        "|------:|-----:|:---------|------:|-----------------:|----------------------:|------:|"
    );
    let mut ratios = String::new();
    for (cell, m) in cells.iter().zip(rows) {
        let Cell {
            conns,
            part,
            encoding,
        } = *cell;
        let rate = mib(total) / m.wall.as_secs_f64();
        let cpu_per_gib = m.cpu / (mib(total) / 1024.0);
        let per_core = if m.cpu > 0.0 {
            mib(total) / m.cpu
        } else {
            f64::INFINITY
        };
        if encoding != Encoding::Plain {
            let ratio = total as f64 / m.wire.max(1) as f64;
            let enc = encoding.as_str();
            let _ = write!(ratios, " {enc} {conns}x{}: {ratio:.1}x;", size(part));
        }
        let enc = encoding.as_str();
        println!(
            "| {conns} | {} | {enc} | {rate:.1} | {cpu_per_gib:.2} | {per_core:.1} | {:.1} |",
            size(part),
            cat / per_core
        );
    }
    println!();
    println!(
        "Baseline: `cat src > dst` of the same {:.0} MiB (page cache, best of 5): {cat:.1} MiB/s.",
        mib(total)
    );
    println!(
        "x cat = cat MiB/s / service MiB/s per server core: how many times more CPU time per byte \
         the service spends than cat takes wall time per byte."
    );
    if !ratios.is_empty() {
        println!(
            "ratio on the wire (conns x part: uncompressed / body bytes):{}",
            ratios.trim_end_matches(';')
        );
    }
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / MIB as f64
}

/// `64 KiB`, `1 MiB`.
fn size(bytes: usize) -> String {
    if bytes >= MIB && bytes.is_multiple_of(MIB) {
        format!("{} MiB", bytes / MIB)
    } else {
        format!("{} KiB", bytes >> 10)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_cover_the_share_with_inclusive_ranges() {
        let share = generate(5000).unwrap();
        let parts = prepare(&share, 1024, Encoding::Gzip).unwrap();
        let ranges: Vec<&str> = parts.iter().map(|p| p.range.as_str()).collect();
        assert_eq!(ranges[0], "bytes 0-1023/*");
        assert_eq!(ranges[4], "bytes 4096-4999/*");
        assert_eq!(ranges.len(), 5);
        let mut decoded = Vec::new();
        for p in &parts {
            std::io::Read::read_to_end(
                &mut flate2::read::GzDecoder::new(p.body.as_slice()),
                &mut decoded,
            )
            .unwrap();
        }
        assert_eq!(decoded, share);
    }

    #[test]
    fn part_sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_part("64K"), Ok(64 << 10));
        assert_eq!(parse_part("1M"), Ok(MIB));
        assert_eq!(parse_part("4096"), Ok(4096));
        assert!(parse_part("0").is_err());
        assert!(parse_part("1G").is_err());
    }

    #[test]
    fn shares_cover_the_data_in_order() {
        let data: Vec<u8> = (0..=255).collect();
        for n in [1, 3, 8] {
            assert_eq!(shares(&data, n).concat(), data);
            assert_eq!(shares(&data, n).len(), n);
        }
    }
}

//! `cargo bench -p bench --bench kubectl_relay`: what `kubectl relay logs` costs reading a whole
//! step, against a plain HTTP GET of the same read route.
//!
//! A release `metadata-api` on file storage in a temp directory (local mode, key-file tokens, on
//! loopback) holds one finished step, `workflows/bench/runs/1/steps/s1`: [`generate`]'s log lines
//! cut at line ends into 1 MiB parts (the entrypoint's default batch), three of every four into
//! `stdout` and the fourth into `stderr`, each part stamped 10 ms after the one before, so the read
//! merges the two streams part by part.
//!
//! Each read is checked once with its output counted (the whole step, or 100 lines for `--tail`),
//! then timed `--runs` times (median):
//! - baseline A: an in-process reqwest GET of `/api/workflows/bench/runs/1/steps/s1/logs`
//!   (`Accept: text/plain`, as the plugin asks), the body streamed into a sink;
//! - baseline B: `curl -o /dev/null` of the same URL, when curl is installed;
//! - the built plugin, `kubectl-relay logs step/bench/1/s1 --url URL --token TOKEN`, stdout on
//!   `/dev/null`, with no flags, `--prefix`, `-c s1` (the client-side container filter; every
//!   line of the step is `s1`'s, so it keeps them all), `-o json` and `--tail 100`.
//!
//! Processes run under `workload rusage`, whose only child they are: wall time, user + system CPU
//! and peak RSS come from its getrusage(RUSAGE_CHILDREN). The API's CPU over each read comes
//! from `/proc/<pid>/stat`. Rates are bytes of the API's answer (what the reader received) per
//! second, in MB (10^6). Timings are printed, never asserted.

use std::{
    io::Read as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, bail, ensure};
use reqwest::blocking::Client;

use crate::{
    cpu::{clock_ticks, load_average, self_cpu, server_cpu},
    process::{self, TempDir},
    text::generate,
};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// MiB of log text in the step, stdout and stderr together [default: 256, or 32 with
    /// --quick].
    #[arg(long)]
    pub total_mb: Option<usize>,
    /// Timed runs of each read (the median is reported) [default: 5, or 3 with --quick].
    #[arg(long)]
    pub runs: Option<usize>,
    /// Smoke test: 32 MiB and 3 runs.
    #[arg(long)]
    pub quick: bool,
}

const MIB: usize = 1 << 20;
const GIB: f64 = (1u64 << 30) as f64;
/// Bytes per PATCH: the entrypoint's default `--batch-bytes`.
const PART: usize = MIB;
const WORKFLOW: &str = "bench";
const RUN: &str = "1";
const STEP: &str = "s1";
/// The lines `--tail` asks for.
const TAIL: usize = 100;
/// How long one request or one read may take before the bench gives up.
const LIMIT: Duration = Duration::from_secs(600);

/// A way of reading the step.
#[derive(Debug, Clone, Copy)]
enum Reader {
    /// Baseline A: reqwest in this process.
    Reqwest,
    /// Baseline B: curl.
    Curl,
    /// The plugin with these flags after `logs step/W/R/S`.
    Plugin(&'static [&'static str]),
}

/// The plugin's reads.
const PLUGIN_READS: [&[&str]; 5] = [
    &[],
    &["--prefix"],
    &["-c", STEP],
    &["-o", "json"],
    &["--tail", "100"],
];

impl Reader {
    fn label(self) -> String {
        match self {
            Self::Reqwest => "A: reqwest GET (in process)".to_owned(),
            Self::Curl => "B: curl -o /dev/null".to_owned(),
            Self::Plugin([]) => "kubectl relay logs".to_owned(),
            Self::Plugin(flags) => format!("kubectl relay logs {}", flags.join(" ")),
        }
    }

    /// The read route's query and Accept header the plugin sends for these flags (the plain
    /// GET for the baselines).
    fn request(self) -> (&'static str, &'static str) {
        match self {
            Self::Plugin(["--prefix"] | ["-c", _]) => ("?prefix=true", "text/plain"),
            Self::Plugin(["-o", "json"]) => ("", "application/x-ndjson"),
            Self::Plugin(["--tail", _]) => ("?tail=100", "text/plain"),
            _ => ("", "text/plain"),
        }
    }
}

/// One timed read.
#[derive(Debug, Clone, Copy)]
struct Sample {
    wall: f64,
    /// The reader's CPU seconds (user + system).
    cpu: f64,
    /// The API's CPU seconds over the same read.
    api_cpu: f64,
    /// The reader's peak RSS in KiB (`None` for the in-process baseline).
    rss_kib: Option<u64>,
}

/// A reader's medians.
#[derive(Debug)]
struct Row {
    label: String,
    /// Bytes of the API's answer.
    received: u64,
    /// Bytes the reader printed, from the checked run.
    printed: Option<u64>,
    wall: f64,
    cpu: f64,
    api_cpu: f64,
    rss_kib: Option<u64>,
}

/// What every read needs.
#[derive(Debug)]
struct Env<'a> {
    plugin: &'a Path,
    workload: &'a Path,
    /// A HOME without a kubeconfig, for the plugin.
    home: PathBuf,
    dir: &'a Path,
    url: String,
    token: String,
    api_pid: u32,
    tck: f64,
}

pub fn run(args: Args, workload: &Path) -> anyhow::Result<()> {
    let Args {
        total_mb,
        runs,
        quick,
    } = args;
    let total_mb = total_mb.unwrap_or(if quick { 32 } else { 256 });
    let runs = runs.unwrap_or(if quick { 3 } else { 5 });
    ensure!(total_mb > 0, "--total-mb must be positive");
    ensure!(runs > 0, "--runs must be positive");
    let total = total_mb
        .checked_mul(MIB)
        .context("--total-mb is too large")?;

    let api_bin = process::build_metadata_api()?;
    let plugin = process::build_release("kubectl-relay")?;
    let dir = TempDir::create()?;
    let context = format!("workflows/{WORKFLOW}/runs/{RUN}/steps/{STEP}");
    let (server, write, _) = process::bench_api(&api_bin, &dir.0, false, &context, "write")?;
    let read = process::token(
        &api_bin,
        &dir.0.join("key"),
        &format!("workflows/{WORKFLOW}"),
        "read",
    )?;

    eprintln!("bench: generating {total_mb} MiB of log lines");
    let mut data = generate(total)?;
    // Whole lines only: the step ends as a finished step's output does, with a newline.
    let whole = data
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |nl| nl + 1);
    data.truncate(whole);
    let total = data.len();
    eprintln!("bench: writing step {context}");
    let written = write_step(&server.url, &write, &data)?;

    let home = dir.0.join("home");
    std::fs::create_dir_all(&home)?;
    let env = Env {
        plugin: &plugin,
        workload,
        home,
        dir: &dir.0,
        url: server.url.clone(),
        token: read,
        api_pid: server.child.id(),
        tck: clock_ticks(),
    };

    let mut readers = vec![Reader::Reqwest];
    if curl_available() {
        readers.push(Reader::Curl);
    } else {
        eprintln!("bench: no curl on PATH: baseline B skipped");
    }
    readers.extend(PLUGIN_READS.map(Reader::Plugin));

    let load_before = load_average();
    let mut rows = Vec::with_capacity(readers.len());
    for reader in readers {
        eprintln!("bench: {}", reader.label());
        rows.push(
            measure(&env, reader, runs, total)
                .with_context(|| format!("reading with {}", reader.label()))?,
        );
    }
    let load_after = load_average();
    drop(server);

    print_report(&Report {
        total,
        written,
        runs,
        api_bin: &api_bin,
        plugin: &plugin,
        rows: &rows,
        load: (&load_before, &load_after),
    });
    Ok(())
}

/// How many parts each stream got.
#[derive(Debug, Clone, Copy)]
struct Written {
    stdout: (usize, u64),
    stderr: (usize, u64),
}

/// Writes `data` into the step's `stdout` and `stderr` in parts of about [`PART`] bytes cut at
/// line ends (every fourth part to stderr), each stamped 10 ms after the one before, and
/// finishes both streams.
fn write_step(url: &str, token: &str, data: &[u8]) -> anyhow::Result<Written> {
    let client = Client::builder().timeout(LIMIT).build()?;
    let create = |name: &str| -> anyhow::Result<String> {
        let resp = client
            .post(format!("{url}/logs"))
            .bearer_auth(token)
            .json(&serde_json::json!({ "name": name }))
            .send()
            .context("POST /logs")?;
        let status = resp.status();
        ensure!(status.is_success(), "POST /logs answered {status}");
        let created: serde_json::Value = resp.json()?;
        ensure!(
            created["length"].as_u64() == Some(0),
            "stream {name} is not new: {created}"
        );
        Ok(created["id"]
            .as_str()
            .context("POST /logs answer has no id")?
            .to_owned())
    };
    let ids = [create("stdout")?, create("stderr")?];
    let mut ends = [0u64; 2];
    let mut parts = [0usize; 2];
    // Ten minutes ago: in the past, as a finished step's writes are.
    let t0 = SystemTime::now()
        .duration_since(UNIX_EPOCH)?
        .as_millis()
        .saturating_sub(600_000);
    let patch = |id: &str, range: String, written: Option<u128>, body: Vec<u8>| {
        let mut req = client
            .patch(format!("{url}/logs/{id}/data"))
            .bearer_auth(token)
            .header("content-type", "application/octet-stream")
            .header("content-range", &range)
            .body(body);
        if let Some(ms) = written {
            req = req.header(contract::headers::WRITTEN, ms.to_string());
        }
        let resp = req.send().with_context(|| format!("PATCH {range}"))?;
        let status = resp.status();
        let text = resp.text()?;
        ensure!(
            status.as_u16() == 202,
            "PATCH {range} answered {status}: {text}"
        );
        anyhow::Ok(())
    };
    let mut rest = data;
    let mut i = 0u128;
    while !rest.is_empty() {
        let cut = if rest.len() <= PART {
            rest.len()
        } else {
            rest[..PART]
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(PART, |nl| nl + 1)
        };
        let (part, tail) = rest.split_at(cut);
        rest = tail;
        let s = usize::from(i % 4 == 3);
        let at = ends[s];
        let range = format!("bytes {at}-{}/*", at + part.len() as u64 - 1);
        patch(&ids[s], range, Some(t0 + i * 10), part.to_vec())?;
        ends[s] += part.len() as u64;
        parts[s] += 1;
        i += 1;
    }
    for (id, end) in ids.iter().zip(ends) {
        patch(id, format!("bytes */{end}"), None, Vec::new())?;
    }
    Ok(Written {
        stdout: (parts[0], ends[0]),
        stderr: (parts[1], ends[1]),
    })
}

fn curl_available() -> bool {
    Command::new("curl")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Checks the reader once (its output counted), then times it `runs` times.
fn measure(env: &Env<'_>, reader: Reader, runs: usize, total: usize) -> anyhow::Result<Row> {
    let (query, accept) = reader.request();
    let url = format!(
        "{}/api/workflows/{WORKFLOW}/runs/{RUN}/steps/{STEP}/logs{query}",
        env.url
    );
    // What the API sends for this read: the reader's input.
    let (received, _) = get(&url, &env.token, accept)?;
    let printed = match reader {
        Reader::Reqwest => None,
        _ => {
            let out = env.dir.join("out");
            let sample = spawn(env, reader, &url, Some(&out))?;
            ensure!(sample.is_some(), "no sample");
            let printed = std::fs::metadata(&out)?.len();
            check_output(reader, &out, total)?;
            std::fs::remove_file(&out)?;
            Some(printed)
        }
    };
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        let sample = match reader {
            Reader::Reqwest => {
                let cpu_before = self_cpu()?;
                let api_before = server_cpu(env.api_pid, env.tck)?;
                let (n, wall) = get(&url, &env.token, accept)?;
                ensure!(n == received, "read {n} bytes, then {received}");
                Sample {
                    wall,
                    cpu: self_cpu()? - cpu_before,
                    api_cpu: server_cpu(env.api_pid, env.tck)? - api_before,
                    rss_kib: None,
                }
            }
            _ => spawn(env, reader, &url, None)?.context("no sample")?,
        };
        samples.push(sample);
    }
    Ok(Row {
        label: reader.label(),
        received,
        printed,
        wall: median(samples.iter().map(|s| s.wall)),
        cpu: median(samples.iter().map(|s| s.cpu)),
        api_cpu: median(samples.iter().map(|s| s.api_cpu)),
        rss_kib: samples
            .iter()
            .filter_map(|s| s.rss_kib)
            .max()
            .filter(|_| samples.iter().all(|s| s.rss_kib.is_some())),
    })
}

/// Reads `url` to its end in this process: the body's length and the seconds it took.
fn get(url: &str, token: &str, accept: &str) -> anyhow::Result<(u64, f64)> {
    let client = Client::builder().timeout(LIMIT).build()?;
    let start = Instant::now();
    let mut resp = client
        .get(url)
        .bearer_auth(token)
        .header("accept", accept)
        .send()
        .with_context(|| format!("GET {url}"))?;
    let status = resp.status();
    ensure!(status.is_success(), "GET {url} answered {status}");
    let mut buf = vec![0u8; 256 << 10];
    let mut n = 0u64;
    loop {
        match resp.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => n += k as u64,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("reading the body"),
        }
    }
    Ok((n, start.elapsed().as_secs_f64()))
}

/// Runs the reader's process under `workload rusage`, its stdout into `out` (or `/dev/null`).
/// `None` for the in-process reader.
fn spawn(
    env: &Env<'_>,
    reader: Reader,
    url: &str,
    out: Option<&Path>,
) -> anyhow::Result<Option<Sample>> {
    let report = env.dir.join("rusage");
    let _ = std::fs::remove_file(&report);
    let mut cmd = Command::new(env.workload);
    cmd.arg("rusage").arg("--report").arg(&report).args([
        "--timeout-secs",
        &LIMIT.as_secs().to_string(),
        "--",
    ]);
    match reader {
        Reader::Reqwest => return Ok(None),
        Reader::Curl => {
            let (_, accept) = reader.request();
            cmd.args(["curl", "-sS", "--fail", "--no-buffer", "-o", "-", "-H"])
                .arg(format!("authorization: Bearer {}", env.token))
                .args(["-H", &format!("accept: {accept}"), url]);
        }
        Reader::Plugin(flags) => {
            cmd.arg(env.plugin)
                .args(["logs", &format!("step/{WORKFLOW}/{RUN}/{STEP}")])
                .args(flags)
                .args(["--url", &env.url, "--token", &env.token]);
        }
    }
    // The plugin's environment holds nothing of this machine's: no kubeconfig, no RELAY_*.
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", &env.home)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit());
    let sink = match out {
        Some(path) => std::fs::File::create(path)?,
        None => std::fs::OpenOptions::new().write(true).open("/dev/null")?,
    };
    cmd.stdout(sink);
    let api_before = server_cpu(env.api_pid, env.tck)?;
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    let api_cpu = server_cpu(env.api_pid, env.tck)? - api_before;
    ensure!(status.success(), "{cmd:?} failed: {status}");
    let text = std::fs::read_to_string(&report)
        .with_context(|| format!("cannot read {}", report.display()))?;
    let f: Vec<&str> = text.split_whitespace().collect();
    ensure!(f.len() == 5, "unexpected rusage report {text:?}");
    let num = |i: usize| -> anyhow::Result<f64> {
        f[i].parse::<f64>()
            .with_context(|| format!("bad field {i} in {text:?}"))
    };
    let code = num(4)?;
    if code != 0.0 {
        bail!("{} exited with {code}", reader.label());
    }
    Ok(Some(Sample {
        wall: num(0)?,
        cpu: num(1)? + num(2)?,
        api_cpu,
        rss_kib: Some(num(3)? as u64),
    }))
}

/// What the checked run printed is the step: every byte (more with a prefix or NDJSON), or the
/// last lines for `--tail`.
fn check_output(reader: Reader, out: &Path, total: usize) -> anyhow::Result<()> {
    let printed = std::fs::metadata(out)?.len();
    match reader {
        Reader::Plugin(["--tail", _]) => {
            let text = std::fs::read(out)?;
            let lines = text.iter().filter(|&&b| b == b'\n').count();
            ensure!(lines == TAIL, "--tail printed {lines} lines");
        }
        Reader::Plugin([] | ["-c", _]) | Reader::Curl => ensure!(
            printed == total as u64,
            "printed {printed} bytes of a {total}-byte step"
        ),
        _ => ensure!(
            printed > total as u64,
            "printed {printed} bytes, less than the {total}-byte step"
        ),
    }
    Ok(())
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

#[derive(Debug)]
struct Report<'a> {
    total: usize,
    written: Written,
    runs: usize,
    api_bin: &'a Path,
    plugin: &'a Path,
    rows: &'a [Row],
    load: (&'a str, &'a str),
}

fn print_report(r: &Report<'_>) {
    let Written { stdout, stderr } = r.written;
    let base = r.rows.first().map_or(0.0, |a| a.received as f64 / a.wall);
    println!(
        "| reader | received MB | printed MB | wall s | MB/s | x A | reader CPU s | CPU s/GiB | API CPU s | max RSS MiB |"
    );
    println!(
        "|:-------|------------:|-----------:|-------:|-----:|----:|-------------:|----------:|----------:|------------:|"
    );
    for row in r.rows {
        let gib = row.received as f64 / GIB;
        let rate = row.received as f64 / row.wall;
        let printed = row
            .printed
            .map_or_else(|| "-".to_owned(), |p| format!("{:.1}", p as f64 / 1e6));
        let rss = row
            .rss_kib
            .map_or_else(|| "-".to_owned(), |k| format!("{:.1}", k as f64 / 1024.0));
        // A read of a few lines (--tail) is its wall time, not a rate.
        let (rate, ratio, per_gib) = if row.received >= MIB as u64 {
            (
                format!("{:.1}", rate / 1e6),
                format!("{:.2}", rate / base),
                format!("{:.2}", row.cpu / gib),
            )
        } else {
            ("-".to_owned(), "-".to_owned(), "-".to_owned())
        };
        println!(
            "| {} | {:.2} | {printed} | {:.3} | {rate} | {ratio} | {:.3} | {per_gib} | {:.3} | {rss} |",
            row.label,
            row.received as f64 / 1e6,
            row.wall,
            row.cpu,
            row.api_cpu,
        );
    }
    println!();
    println!(
        "Step: {:.0} MiB of log lines: stdout {} parts, {} bytes; stderr {} parts, {} bytes \
         (parts of ~1 MiB cut at line ends, 10 ms apart); {} timed runs per reader, medians.",
        r.total as f64 / MIB as f64,
        stdout.0,
        stdout.1,
        stderr.0,
        stderr.1,
        r.runs
    );
    println!(
        "Build: metadata-api {} and kubectl-relay {} (release profile, `cargo build --release`); \
         this harness: {} (`cargo bench`, profile bench = release).",
        r.api_bin.display(),
        r.plugin.display(),
        if cfg!(debug_assertions) {
            "debug assertions on"
        } else {
            "optimised"
        }
    );
    println!(
        "Machine: {} CPUs; load average {} before, {} after.",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        r.load.0,
        r.load.1
    );
    println!(
        "received = bytes of the API's answer to the reader's request (prefixed text for --prefix \
         and -c, NDJSON for -o json); MB/s = received / wall; x A = MB/s / baseline A's; CPU s/GiB \
         = the reader's user + system seconds per GiB received (A: this whole process); API CPU s = \
         the metadata API's over the read; max RSS from getrusage of the reader's process (largest \
         of the runs)."
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugin_reads_ask_what_the_plugin_asks() {
        assert_eq!(Reader::Plugin(&[]).request(), ("", "text/plain"));
        assert_eq!(
            Reader::Plugin(&["-c", STEP]).request(),
            ("?prefix=true", "text/plain")
        );
        assert_eq!(
            Reader::Plugin(&["-o", "json"]).request(),
            ("", "application/x-ndjson")
        );
        assert_eq!(
            Reader::Plugin(&["--tail", "100"]).request(),
            ("?tail=100", "text/plain")
        );
    }

    #[test]
    fn the_median_is_the_middle_value() {
        assert_eq!(median([3.0, 1.0, 2.0].into_iter()), 2.0);
        assert_eq!(median([4.0, 1.0, 2.0, 3.0].into_iter()), 2.5);
    }
}

//! `cargo bench -p bench --bench entrypoint`: what the entrypoint costs a command, against a plain
//! pipe.
//!
//! A generator child (`workload gen-output`) writes log lines to stdout in fixed-size writes and
//! reports its own wall and CPU time. It runs two ways: piped into `cat > /dev/null` (the
//! baseline: what any pipe reader costs), and under the static entrypoint shipping to a local
//! release metadata-api (gzip level 1, the entrypoint's default, unless the workload says zstd or
//! none). Reported: the child's wall time and its overhead, the CPU of the reader side (cat, or
//! entrypoint + API) per GB, the wrapper's peak RSS, and how many bytes were stored or dropped.
//! The startup cost is `entrypoint -- true` against `true`. Timings are printed, never asserted.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};

use crate::{
    cpu::{children_cpu, clock_ticks, server_cpu},
    process::{self, Server, TempDir},
};

const MIB: u64 = 1 << 20;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// MiB each workload writes [default: 1024, or 128 with --quick].
    #[arg(long)]
    pub total_mb: Option<u64>,
    /// Smoke test: 128 MiB per workload and fewer startup runs.
    #[arg(long)]
    pub quick: bool,
}

pub(crate) struct Workload {
    pub name: &'static str,
    pub write_size: usize,
    /// Writing pace in MB/s; 0 writes as fast as possible.
    pub rate_mb: u64,
    /// The entrypoint's `--compression` (`none`: uncompressed), at level 1.
    pub compression: &'static str,
    /// Secret values the entrypoint is told to redact (`RELAY_REDACT_ENV`); they do not occur
    /// in the text, so this is the cost of looking for them.
    pub secrets: usize,
}

/// As fast as possible (what the child pays; the wrapper drops what it cannot ship), then paced
/// at a rate a log pipeline should carry without loss (what shipping costs per GB).
const WORKLOADS: [Workload; 7] = [
    Workload {
        name: "64 KiB writes",
        write_size: 64 << 10,
        rate_mb: 0,
        compression: "gzip",
        secrets: 0,
    },
    Workload {
        name: "100-byte writes",
        write_size: 100,
        rate_mb: 0,
        compression: "gzip",
        secrets: 0,
    },
    Workload {
        name: "64 KiB writes at 50 MB/s",
        write_size: 64 << 10,
        rate_mb: 50,
        compression: "gzip",
        secrets: 0,
    },
    Workload {
        name: "100-byte writes at 50 MB/s",
        write_size: 100,
        rate_mb: 50,
        compression: "gzip",
        secrets: 0,
    },
    Workload {
        name: "64 KiB writes at 50 MB/s, zstd",
        write_size: 64 << 10,
        rate_mb: 50,
        compression: "zstd",
        secrets: 0,
    },
    Workload {
        name: "100-byte writes at 50 MB/s, zstd",
        write_size: 100,
        rate_mb: 50,
        compression: "zstd",
        secrets: 0,
    },
    Workload {
        name: "100-byte writes at 50 MB/s, gzip off",
        write_size: 100,
        rate_mb: 50,
        compression: "none",
        secrets: 0,
    },
];

#[derive(Debug, Default)]
pub(crate) struct Measured {
    pub child_wall: f64,
    pub reader_cpu: f64,
    /// Of `reader_cpu`, the metadata API's share.
    pub api_cpu: f64,
    pub rss_mib: Option<f64>,
    pub stored: u64,
    pub dropped: u64,
}

/// The generator's own report.
fn read_report(path: &Path) -> anyhow::Result<(f64, f64)> {
    let s = std::fs::read_to_string(path)?;
    let mut it = s.split_whitespace().map(str::parse::<f64>);
    match (it.next(), it.next()) {
        (Some(Ok(w)), Some(Ok(c))) => Ok((w, c)),
        _ => bail!("bad generator report {s:?}"),
    }
}

fn gen_command(workload: &Path, bytes: u64, w: &Workload, report: &Path) -> Vec<String> {
    vec![
        workload.display().to_string(),
        "gen-output".into(),
        "--bytes".into(),
        bytes.to_string(),
        "--write-size".into(),
        w.write_size.to_string(),
        "--report".into(),
        report.display().to_string(),
        "--rate-mb".into(),
        w.rate_mb.to_string(),
    ]
}

fn baseline(workload: &Path, bytes: u64, w: &Workload, dir: &Path) -> anyhow::Result<Measured> {
    let report = dir.join("gen-report");
    let cpu0 = children_cpu()?;
    let mut cmd = Command::new("sh");
    cmd.args(["-c", r#""$@" | cat > /dev/null"#, "sh"])
        .args(gen_command(workload, bytes, w, &report));
    process::run(&mut cmd)?;
    let all = children_cpu()? - cpu0;
    let (wall, gen_cpu) = read_report(&report)?;
    Ok(Measured {
        child_wall: wall,
        reader_cpu: all - gen_cpu,
        api_cpu: 0.0,
        rss_mib: None,
        stored: bytes,
        dropped: 0,
    })
}

/// Peak RSS of `pid` (VmHWM), sampled until `done`.
fn watch_rss(pid: u32, done: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let peak = AtomicU64::new(0);
        while !done.load(Ordering::Relaxed) {
            if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status"))
                && let Some(kb) = s
                    .lines()
                    .find_map(|l| l.strip_prefix("VmHWM:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            {
                peak.fetch_max(kb, Ordering::Relaxed);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        peak.load(Ordering::Relaxed)
    })
}

/// Stored and dropped bytes of a stream, from its status.
fn stream_totals(url: &str, token: &str, name: &str) -> anyhow::Result<(u64, u64)> {
    let http = reqwest::blocking::Client::new();
    let created: serde_json::Value = http
        .post(format!("{url}/logs"))
        .bearer_auth(token)
        .json(&serde_json::json!({ "name": name }))
        .send()?
        .error_for_status()?
        .json()?;
    let id = created["id"].as_str().context("no id")?;
    let st: serde_json::Value = http
        .get(format!("{url}/logs/{id}"))
        .bearer_auth(token)
        .send()?
        .error_for_status()?
        .json()?;
    let sum = |key: &str| -> u64 {
        st[key].as_array().map_or(0, |a| {
            a.iter()
                .map(|s| s["end"].as_u64().unwrap_or(0) - s["start"].as_u64().unwrap_or(0))
                .sum()
        })
    };
    Ok((sum("stored"), sum("dropped")))
}

pub(crate) struct Env {
    /// The `workload` binary, whose `gen-output` is the child.
    pub workload: PathBuf,
    pub entrypoint: PathBuf,
    pub api: PathBuf,
    pub tck: f64,
}

impl Env {
    /// The static entrypoint and the release metadata-api, built; `workload` as the child.
    pub fn build(workload: &Path) -> anyhow::Result<Self> {
        Ok(Self {
            workload: workload.to_owned(),
            entrypoint: process::build_entrypoint()?,
            api: process::build_metadata_api()?,
            tck: clock_ticks(),
        })
    }
}

fn start_api(env: &Env, dir: &Path) -> anyhow::Result<(Server, PathBuf)> {
    // Niced: in a cluster the API runs on other nodes; here it should not take the child's CPU.
    let (server, _, token_file) = process::bench_api(
        &env.api,
        dir,
        true,
        "workflows/bench/runs/1/steps/s",
        "write",
    )?;
    Ok((server, token_file))
}

pub(crate) fn wrapped(env: &Env, bytes: u64, w: &Workload, dir: &Path) -> anyhow::Result<Measured> {
    let run_dir = dir.join(format!(
        "run-{}-{}-{}-{}",
        w.write_size, w.rate_mb, w.compression, w.secrets
    ));
    std::fs::create_dir_all(&run_dir)?;
    let (server, token_file) = start_api(env, &run_dir)?;
    let report = run_dir.join("gen-report");
    let api_cpu0 = server_cpu(server.child.id(), env.tck)?;
    let cpu0 = children_cpu()?;
    let mut cmd = Command::new(&env.entrypoint);
    if w.secrets > 0 {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(w.secrets as u64);
        const ALNUM: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
        cmd.env("RELAY_REDACT_ENV", "BENCH_SECRET_*");
        for i in 0..w.secrets {
            let value: String = (0..rng.random_range(20..41))
                .map(|_| char::from(ALNUM[rng.random_range(0..ALNUM.len())]))
                .collect();
            cmd.env(format!("BENCH_SECRET_{i}"), value);
        }
    }
    let mut child = cmd
        .env("RELAY_COMPRESSION", w.compression)
        .env("RELAY_COMPRESSION_LEVEL", "1")
        .env("RELAY_METADATA_API_URL", &server.url)
        .env("RELAY_METADATA_API_TOKEN_FILE", &token_file)
        .arg("--")
        .args(gen_command(&env.workload, bytes, w, &report))
        .stderr(Stdio::inherit())
        .spawn()?;
    let done = Arc::new(AtomicBool::new(false));
    let rss = watch_rss(child.id(), done.clone());
    let status = child.wait()?;
    done.store(true, Ordering::Relaxed);
    ensure!(status.success(), "entrypoint run failed: {status}");
    let all = children_cpu()? - cpu0;
    let api_cpu = server_cpu(server.child.id(), env.tck)? - api_cpu0;
    let (wall, gen_cpu) = read_report(&report)?;
    let token = std::fs::read_to_string(&token_file)?;
    let (stored, dropped) = stream_totals(&server.url, &token, "stdout")?;
    let peak_kb = rss.join().unwrap_or(0);
    Ok(Measured {
        child_wall: wall,
        reader_cpu: all - gen_cpu + api_cpu,
        api_cpu,
        rss_mib: Some(peak_kb as f64 / 1024.0),
        stored,
        dropped,
    })
}

/// Mean wall time of `cmd` over `n` runs.
fn mean_wall(n: u32, mut cmd: impl FnMut() -> Command) -> anyhow::Result<Duration> {
    let start = Instant::now();
    for _ in 0..n {
        let st = cmd().stdout(Stdio::null()).status()?;
        ensure!(st.success(), "startup run failed: {st}");
    }
    Ok(start.elapsed() / n)
}

/// Runs the benchmark with `workload` (the `workload` binary) as the child.
pub fn run(args: Args, workload: &Path) -> anyhow::Result<()> {
    let Args { total_mb, quick } = args;
    let bytes = total_mb.unwrap_or(if quick { 128 } else { 1024 }) * MIB;
    ensure!(bytes > 0, "--total-mb must be positive");
    let env = Env::build(workload)?;
    let dir = TempDir::create()?;
    let mut rows = Vec::new();
    for w in &WORKLOADS {
        // Paced runs take bytes / rate: cap them at 512 MiB.
        let bytes = if w.rate_mb > 0 {
            bytes.min(512 * MIB)
        } else {
            bytes
        };
        eprintln!("bench: {} to cat", w.name);
        let base = baseline(&env.workload, bytes, w, &dir.0)?;
        eprintln!("bench: {} through the entrypoint", w.name);
        let ours = wrapped(&env, bytes, w, &dir.0)?;
        rows.push((w, bytes, base, ours));
    }
    let runs = if quick { 50 } else { 300 };
    let plain = mean_wall(runs, || Command::new("true"))?;
    let startup_dir = dir.0.join("startup");
    std::fs::create_dir_all(&startup_dir)?;
    let (server, token_file) = start_api(&env, &startup_dir)?;
    let mut run_no = 0;
    let ours = mean_wall(runs, || {
        // Fresh stream names, as a new container has (a finished stream would make the next run
        // look for a new generation).
        run_no += 1;
        let mut c = Command::new(&env.entrypoint);
        c.env("RELAY_STDOUT_STREAM", format!("stdout-{run_no}"))
            .env("RELAY_STDERR_STREAM", format!("stderr-{run_no}"))
            .env("RELAY_METADATA_API_URL", &server.url)
            .env("RELAY_METADATA_API_TOKEN_FILE", &token_file)
            .args(["--", "true"]);
        c
    })?;
    drop(server);

    let size = std::fs::metadata(&env.entrypoint)?.len();
    println!();
    println!(
        "entrypoint: {} MiB per workload (512 MiB when paced), static binary {:.2} MiB, gzip level 1 unless said (zstd also level 1)",
        bytes / MIB,
        size as f64 / MIB as f64
    );
    println!();
    println!(
        "| workload | reader | child wall s | child overhead | reader CPU s/GB | of which API | CPU s per GB stored | peak RSS MiB | stored | dropped |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (w, bytes, base, ours) in &rows {
        let gb = *bytes as f64 / 1e9;
        println!(
            "| {} | cat > /dev/null | {:.2} | - | {:.2} | - | {:.2} | - | 100% | 0 |",
            w.name,
            base.child_wall,
            base.reader_cpu / gb,
            base.reader_cpu / gb
        );
        let overhead = (ours.child_wall / base.child_wall - 1.0) * 100.0;
        println!(
            "| {} | entrypoint + metadata-api | {:.2} | {overhead:+.1}% | {:.2} | {:.2} | {:.2} | {:.1} | {:.1}% | {:.1}% |",
            w.name,
            ours.child_wall,
            ours.reader_cpu / gb,
            ours.api_cpu / gb,
            ours.reader_cpu / (ours.stored.max(1) as f64 / 1e9),
            ours.rss_mib.unwrap_or(0.0),
            ours.stored as f64 * 100.0 / *bytes as f64,
            ours.dropped as f64 * 100.0 / *bytes as f64,
        );
    }
    println!();
    println!(
        "startup: `true` {:.2} ms, `entrypoint -- true` {:.2} ms (+{:.2} ms; both streams created and finished over HTTP), mean of {runs}",
        plain.as_secs_f64() * 1e3,
        ours.as_secs_f64() * 1e3,
        (ours.as_secs_f64() - plain.as_secs_f64()) * 1e3
    );
    println!(
        "reader CPU: cat's, or the entrypoint's plus the metadata API's, per GB the child wrote."
    );
    Ok(())
}

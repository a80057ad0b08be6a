//! `cargo bench -p bench --bench collector`: what the eBPF collector costs the processes it
//! watches, and how fast it captures and ships their output.
//!
//! A writer child (`workload write-loop`) calls write(2) on its stdout, a pipe drained by a reader
//! thread of this process, and reports the wall and CPU time of its write loop. It runs in a
//! cgroup v2 directory this task creates under the host's cgroup2 mount:
//!
//! 1. Cost per write (64-byte writes): (a) no collector running, (b) collector running, writer in
//!    a cgroup it does not watch, (c) writer in a watched cgroup. Rounds of a, b, c (the collector
//!    started after a and stopped after c) pair the runs; the medians are reported.
//! 2. Throughput (64 KiB and 1 MiB writes) in the watched cgroup: bytes captured into the ring
//!    against bytes the kernel lost (the collector's `/metrics`), the capture rate over the
//!    writer's time, and the time until the collector has finished the stream in the metadata
//!    API (`relay_collector_streams_finished_total`; the stream status then gives the stored and
//!    dropped bytes). A run that lost anything is repeated paced at each `--rate-mb` in turn
//!    until one is lossless.
//! 3. Collector CPU (`/proc/PID/stat`) per GB stored, over each throughput run.
//!
//! Everything is printed, nothing asserted. Needs root (cgroups, eBPF); the temp dir, cgroups and
//! processes are removed or stopped on the way out, on error too.

use std::{
    io::{BufRead as _, BufReader, Read as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, anyhow, bail, ensure};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::{
    cpu::{clock_ticks, load_average, server_cpu},
    process::{self, Server, TempDir},
};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GB: f64 = 1e9;
/// Bytes per write of the per-write cost runs.
const SMALL_WRITE: u64 = 64;
/// Write sizes of the throughput runs.
const LARGE_WRITES: [u64; 2] = [64 * KIB, MIB];
/// The log context of the watched cgroup (a step's stream context).
const CONTEXT: &str = "workflows/bench-collector/runs/1/steps/bench";
/// Targets printed beside the results.
const TARGET_CAPTURED_US: f64 = 0.6;
const TARGET_UNWATCHED_US: f64 = 0.25;
const TARGET_CAPTURE_GBS: f64 = 1.0;
const TARGET_E2E_MBS: f64 = 300.0;
const TARGET_CPU_PER_GB: f64 = 3.0;
/// Longest a paced throughput run writes for.
const PACED_SECONDS: u64 = 8;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// 64-byte writes per cost run [default: 1000000, or 200000 with --quick].
    #[arg(long)]
    pub writes: Option<u64>,
    /// Rounds of the cost runs; medians are reported [default: 3, or 1 with --quick].
    #[arg(long)]
    pub rounds: Option<u32>,
    /// MiB per throughput run [default: 1024, or 256 with --quick].
    #[arg(long)]
    pub total_mb: Option<u64>,
    /// Paces (MB/s) to retry a throughput run at, in order, while runs lose bytes (a paced run
    /// writes at most 8 seconds' worth).
    #[arg(long = "rate-mb", default_values_t = [1000, 300, 100])]
    pub rate_mb: Vec<u64>,
    /// The collector's kernel ring buffer size.
    #[arg(long, default_value = "16M")]
    pub ring_bytes: String,
    /// Use the release binaries in target/release as they are (do not run cargo build).
    #[arg(long)]
    pub no_build: bool,
    /// Measure this collector binary instead of the workspace's (say, an earlier build kept
    /// aside, to compare before and after a change on the same machine).
    #[arg(long)]
    pub collector: Option<PathBuf>,
    /// Smoke test: fewer writes, one round, 256 MiB per throughput run.
    #[arg(long)]
    pub quick: bool,
}

/// Seconds since the UNIX epoch, as the writer reports when it started.
pub fn unix_secs(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The binaries, the scratch directory and the HTTP client the runs share.
struct Env {
    /// The `workload` binary, whose `write-loop` is the writer.
    workload: PathBuf,
    collector: PathBuf,
    api: PathBuf,
    tck: f64,
    dir: PathBuf,
    ring_bytes: String,
    http: reqwest::blocking::Client,
}

/// Runs the benchmark with `workload` (the `workload` binary) as the writer.
pub fn run(args: Args, workload: &Path) -> anyhow::Result<()> {
    let Args {
        writes,
        rounds,
        total_mb,
        rate_mb,
        ring_bytes,
        no_build,
        collector: collector_override,
        quick,
    } = args;
    let writes = writes.unwrap_or(if quick { 200_000 } else { 1_000_000 });
    let rounds = rounds.unwrap_or(if quick { 1 } else { 3 });
    let total = total_mb.unwrap_or(if quick { 256 } else { 1024 }) * MIB;
    ensure!(writes > 0, "--writes must be positive");
    ensure!(rounds > 0, "--rounds must be positive");
    ensure!(total >= MIB, "--total-mb must be at least 1");
    ensure!(rate_mb.iter().all(|&r| r > 0), "--rate-mb must be positive");
    let release = process::target_dir().join("release");
    let (collector, api) = match (no_build, collector_override) {
        (true, over) => (
            over.unwrap_or_else(|| release.join("collector")),
            release.join("metadata-api"),
        ),
        (false, Some(over)) => (over, process::build_metadata_api()?),
        (false, None) => (process::build_collector()?, process::build_metadata_api()?),
    };
    println!("bench: collector {}", collector.display());
    let root = process::cgroup2_root()
        .context("no cgroup2 file system is mounted (the collector needs cgroup v2)")?;
    let tmp = TempDir::create()?;
    let env = Env {
        workload: workload.to_owned(),
        collector,
        api,
        tck: clock_ticks(),
        dir: tmp.0.clone(),
        ring_bytes,
        http: reqwest::blocking::Client::new(),
    };
    let cgroups = Cgroups::create(&root)?;
    let api = Api::start(&env)?;
    let mut notes = vec![format!("load average at start: {}", load_average())];
    let others = other_collectors();
    if !others.is_empty() {
        notes.push(format!(
            "other collector processes were running (pids {others:?}): their eBPF programs run on every write, the baseline (a) included"
        ));
    }

    // 1. Cost per write, and the pipe alone with large writes (no collector running).
    let mut cost = Vec::new();
    let mut pipe_alone = Vec::new();
    for round in 0..rounds {
        eprintln!(
            "bench: round {}/{rounds}: {writes} x 64-byte writes",
            round + 1
        );
        let small = Load::unpaced(writes, SMALL_WRITE);
        let a = run_writer(&env, &small, &cgroups.unwatched)?;
        if round == 0 {
            for size in LARGE_WRITES {
                let load = Load::unpaced(total / size, size);
                let w = run_writer(&env, &load, &cgroups.unwatched)?;
                pipe_alone.push(load.bytes() as f64 / GB / w.wall);
            }
        }
        let collector = Collector::start(&env, &cgroups.watched, &api)?;
        let b0 = collector.metrics(&env)?;
        let b = run_writer(&env, &small, &cgroups.unwatched)?;
        let b1 = collector.metrics(&env)?;
        let dir = cgroups.add_watched(&format!("cost{round}"))?;
        let c = run_writer(&env, &small, &dir)?;
        // Let the collector ship and finish the stream, so it is idle for the next round.
        let finished = collector.wait_finished(&env, &b1, Duration::from_secs(60))?;
        let c1 = collector.metrics(&env)?;
        drop(collector);
        cost.push(CostRound {
            a,
            b,
            c,
            unwatched_captured: b1.captured - b0.captured,
            captured: c1.captured - b1.captured,
            lost: c1.lost - b1.lost,
            finished: finished.is_some(),
        });
    }

    // 2 and 3. Throughput, end to end, collector CPU.
    let collector = Collector::start(&env, &cgroups.watched, &api)?;
    let mut flows = Vec::new();
    for (size, alone) in LARGE_WRITES.into_iter().zip(&pipe_alone) {
        for (n, rate) in std::iter::once(0)
            .chain(rate_mb.iter().copied())
            .enumerate()
        {
            let bytes = if rate > 0 {
                total.min(rate * 1_000_000 * PACED_SECONDS)
            } else {
                total
            };
            let load = Load {
                count: (bytes / size).max(1),
                size,
                rate_mb: rate,
            };
            eprintln!(
                "bench: {} MiB in {} writes{}",
                load.bytes() / MIB,
                size_label(size),
                pace_label(rate)
            );
            let name = format!("flow{}k-{n}", size / KIB);
            let flow = throughput(&env, &cgroups, &api, &collector, &load, &name)?;
            let lossless = flow.lossless();
            flows.push((flow, *alone));
            if lossless {
                break;
            }
        }
    }
    drop(collector);
    drop(api);
    drop(cgroups);
    notes.push(format!("load average at end: {}", load_average()));

    print_report(writes, total, &cost, &flows);
    println!();
    for note in notes {
        println!("- {note}");
    }
    Ok(())
}

/// Pids of processes named `collector` (not ours: none of ours runs yet when this is called).
fn other_collectors() -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "collector")
        })
        .collect()
}

/// The benchmark's cgroup v2 directories: `relay-bench-collector-PID/{watched,other/w}` under the
/// mount. Removed on drop, with any process left in them killed.
struct Cgroups {
    base: PathBuf,
    /// The directory the collector watches; each watched run gets a new directory below it, so
    /// each ships as its own stream (`NAME.stdout`).
    watched: PathBuf,
    /// At the same depth as the watched runs' directories, outside the watched tree.
    unwatched: PathBuf,
}

impl Cgroups {
    fn create(root: &Path) -> anyhow::Result<Self> {
        let base = root.join(format!("relay-bench-collector-{}", std::process::id()));
        std::fs::create_dir(&base)
            .with_context(|| format!("cannot create cgroup {} (root needed)", base.display()))?;
        // From here on, drop removes what was made.
        let this = Self {
            watched: base.join("watched"),
            unwatched: base.join("other/w"),
            base,
        };
        for dir in [&this.watched, &this.base.join("other"), &this.unwatched] {
            std::fs::create_dir(dir)
                .with_context(|| format!("cannot create cgroup {}", dir.display()))?;
        }
        Ok(this)
    }

    /// A new cgroup below the watched one.
    fn add_watched(&self, name: &str) -> anyhow::Result<PathBuf> {
        let dir = self.watched.join(name);
        std::fs::create_dir(&dir)
            .with_context(|| format!("cannot create cgroup {}", dir.display()))?;
        Ok(dir)
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        process::remove_cgroup(&self.base);
    }
}

/// A metadata API on local storage, and a collector token for it.
struct Api {
    server: Server,
    token: String,
    token_file: PathBuf,
}

impl Api {
    fn start(env: &Env) -> anyhow::Result<Self> {
        let (server, token, token_file) =
            process::bench_api(&env.api, &env.dir, false, "workflows", "collector")?;
        Ok(Self {
            server,
            token,
            token_file,
        })
    }

    fn cpu(&self, env: &Env) -> anyhow::Result<f64> {
        server_cpu(self.server.child.id(), env.tck)
    }

    /// Stored and dropped bytes of the ebpf stream `name`, and whether it is complete.
    fn stream(&self, env: &Env, name: &str) -> anyhow::Result<StreamTotals> {
        let url = &self.server.url;
        let created: serde_json::Value = env
            .http
            .post(format!("{url}/logs"))
            .bearer_auth(&self.token)
            .json(&serde_json::json!({ "name": name, "context": CONTEXT, "source": "ebpf" }))
            .send()?
            .error_for_status()?
            .json()?;
        let id = created["id"]
            .as_str()
            .with_context(|| format!("no id in {created}"))?;
        let st: serde_json::Value = env
            .http
            .get(format!("{url}/logs/{id}"))
            .bearer_auth(&self.token)
            .send()?
            .error_for_status()?
            .json()?;
        let sum = |key: &str| -> u64 {
            st[key].as_array().map_or(0, |spans| {
                spans
                    .iter()
                    .map(|s| {
                        let end = s["end"].as_u64().unwrap_or(0);
                        end.saturating_sub(s["start"].as_u64().unwrap_or(0))
                    })
                    .sum()
            })
        };
        Ok(StreamTotals {
            stored: sum("stored"),
            dropped: sum("dropped"),
            complete: st["complete"].as_bool().unwrap_or(false),
        })
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct StreamTotals {
    stored: u64,
    dropped: u64,
    complete: bool,
}

/// A running collector watching one cgroup; stopped (SIGTERM, then SIGKILL) on drop.
struct Collector {
    child: Child,
    metrics_url: String,
}

/// The collector counters the benchmark reads.
#[derive(Debug, Clone, Copy, Default)]
struct Counters {
    captured: u64,
    lost: u64,
    shipped: u64,
    finished: u64,
}

impl Collector {
    fn start(env: &Env, watched: &Path, api: &Api) -> anyhow::Result<Self> {
        let log_path = env.dir.join("collector.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let mut child = Command::new(&env.collector)
            .arg("--url")
            .arg(&api.server.url)
            .arg("--token-file")
            .arg(&api.token_file)
            .arg("--cgroup")
            .arg(format!("{}={CONTEXT}", watched.display()))
            .args(["--listen", "127.0.0.1:0", "--ring-bytes", &env.ring_bytes])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", env.collector.display()))?;
        let stdout = child.stdout.take().context("no collector stdout")?;
        // From here on, drop stops the process.
        let mut this = Self {
            child,
            metrics_url: String::new(),
        };
        // The first line says it is attached; the rest of stdout is drained, never left to fill.
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut out = BufReader::new(stdout);
            let mut line = String::new();
            let _ = tx.send(out.read_line(&mut line).map(|_| line));
            let _ = std::io::copy(&mut out, &mut std::io::sink());
        });
        let line = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(Ok(line)) => line,
            Ok(Err(e)) => bail!("reading the collector's stdout: {e}"),
            Err(_) => bail!("the collector did not get ready in 60 s"),
        };
        let Some(url) = line
            .trim()
            .strip_prefix("collector ready; metrics on ")
            .map(str::to_owned)
        else {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "the collector did not start (first line {line:?}); its log:\n{}",
                tail.join("\n")
            );
        };
        this.metrics_url = url;
        Ok(this)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn cpu(&self, env: &Env) -> anyhow::Result<f64> {
        server_cpu(self.pid(), env.tck)
    }

    fn metrics(&self, env: &Env) -> anyhow::Result<Counters> {
        let text = env
            .http
            .get(&self.metrics_url)
            .send()?
            .error_for_status()?
            .text()?;
        let get = |name: &str| -> anyhow::Result<u64> {
            let full = format!("relay_collector_{name}_total");
            text.lines()
                .filter(|l| !l.starts_with('#'))
                .filter_map(|l| l.split_once(' '))
                .find(|(key, _)| key.split('{').next() == Some(full.as_str()))
                .with_context(|| format!("no {full} in the collector's metrics"))?
                .1
                .trim()
                .parse::<f64>()
                .map(|v| v as u64)
                .with_context(|| format!("bad value of {full}"))
        };
        Ok(Counters {
            captured: get("captured_bytes")?,
            lost: get("kernel_lost_bytes")?,
            shipped: get("shipped_bytes")?,
            finished: get("streams_finished")?,
        })
    }

    /// Waits until a stream finished after `before` was read; `None` on timeout.
    fn wait_finished(
        &self,
        env: &Env,
        before: &Counters,
        timeout: Duration,
    ) -> anyhow::Result<Option<SystemTime>> {
        let start = Instant::now();
        loop {
            if self.metrics(env)?.finished > before.finished {
                return Ok(Some(SystemTime::now()));
            }
            if start.elapsed() > timeout {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            // It ships what is left within its grace period (10 s).
            for _ in 0..300 {
                if matches!(self.child.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a writer run writes.
#[derive(Debug, Clone, Copy)]
struct Load {
    count: u64,
    size: u64,
    rate_mb: u64,
}

impl Load {
    fn unpaced(count: u64, size: u64) -> Self {
        Self {
            count,
            size,
            rate_mb: 0,
        }
    }

    fn bytes(&self) -> u64 {
        self.count * self.size
    }
}

/// The writer's report of its write loop.
#[derive(Debug, Clone, Copy)]
struct Written {
    wall: f64,
    cpu: f64,
    /// When the loop started (UNIX seconds).
    started: f64,
}

impl Written {
    fn wall_ns(&self, load: &Load) -> f64 {
        self.wall * 1e9 / load.count as f64
    }

    fn cpu_ns(&self, load: &Load) -> f64 {
        self.cpu * 1e9 / load.count as f64
    }
}

/// Runs `workload write-loop` in `cgroup` with its stdout drained by a thread of this process, and
/// checks every byte came through.
fn run_writer(env: &Env, load: &Load, cgroup: &Path) -> anyhow::Result<Written> {
    let report = env.dir.join("write-report");
    let _ = std::fs::remove_file(&report);
    let mut child = Command::new(&env.workload)
        .arg("write-loop")
        .args(["--count", &load.count.to_string()])
        .args(["--size", &load.size.to_string()])
        .args(["--rate-mb", &load.rate_mb.to_string()])
        .arg("--cgroup")
        .arg(cgroup)
        .arg("--report")
        .arg(&report)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("cannot start the writer")?;
    let mut out = child.stdout.take().context("no writer stdout")?;
    let reader = std::thread::spawn(move || -> std::io::Result<u64> {
        let mut buf = vec![0u8; 256 << 10];
        let mut total = 0u64;
        loop {
            match out.read(&mut buf) {
                Ok(0) => return Ok(total),
                Ok(n) => total += n as u64,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    });
    let status = child.wait()?;
    let read = reader
        .join()
        .map_err(|_| anyhow!("the pipe reader panicked"))??;
    ensure!(status.success(), "the writer failed: {status}");
    ensure!(
        read == load.bytes(),
        "the reader got {read} bytes of {}",
        load.bytes()
    );
    let text = std::fs::read_to_string(&report)
        .with_context(|| format!("no writer report at {}", report.display()))?;
    let v: Vec<f64> = text
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(|| format!("bad writer report {text:?}"))?;
    match v[..] {
        [wall, cpu, started] => Ok(Written { wall, cpu, started }),
        _ => bail!("bad writer report {text:?}"),
    }
}

/// One round of the cost runs.
#[derive(Debug)]
struct CostRound {
    a: Written,
    b: Written,
    c: Written,
    /// Captured while the writer was unwatched (should be 0).
    unwatched_captured: u64,
    captured: u64,
    lost: u64,
    finished: bool,
}

/// One throughput run in the watched cgroup.
#[derive(Debug)]
struct Flow {
    load: Load,
    writer: Written,
    captured: u64,
    lost: u64,
    shipped: u64,
    stream: StreamTotals,
    /// Writer's loop start to the collector reporting the stream finished; `None` on timeout.
    end_to_end: Option<f64>,
    collector_cpu: f64,
    api_cpu: f64,
}

impl Flow {
    fn lossless(&self) -> bool {
        self.lost == 0
            && self.captured == self.load.bytes()
            && self.stream.complete
            && self.stream.dropped == 0
            && self.stream.stored == self.load.bytes()
    }

    /// GB/s captured into the ring over the writer's loop time.
    fn capture_gbs(&self) -> f64 {
        self.captured as f64 / GB / self.writer.wall
    }

    /// MB/s stored, from the writer's first write to the stream finished in the API (of a
    /// lossless run: the end-to-end rate).
    fn stored_mbs(&self) -> Option<f64> {
        self.end_to_end.map(|t| self.stream.stored as f64 / 1e6 / t)
    }

    /// Collector core-seconds per GB stored.
    fn cpu_per_gb(&self) -> Option<f64> {
        (self.shipped > 0).then(|| self.collector_cpu / (self.shipped as f64 / GB))
    }
}

fn throughput(
    env: &Env,
    cgroups: &Cgroups,
    api: &Api,
    collector: &Collector,
    load: &Load,
    name: &str,
) -> anyhow::Result<Flow> {
    let dir = cgroups.add_watched(name)?;
    let before = collector.metrics(env)?;
    let cpu0 = collector.cpu(env)?;
    let api_cpu0 = api.cpu(env)?;
    let writer = run_writer(env, load, &dir)?;
    // Generous: 30 s plus 20 MB/s.
    let timeout = Duration::from_secs(30 + load.bytes() / 20_000_000);
    let finished = collector.wait_finished(env, &before, timeout)?;
    let end_to_end = finished.map(|at| unix_secs(at) - writer.started);
    let collector_cpu = collector.cpu(env)? - cpu0;
    let api_cpu = api.cpu(env)? - api_cpu0;
    let after = collector.metrics(env)?;
    let stream = api.stream(env, &format!("{name}.stdout"))?;
    Ok(Flow {
        load: *load,
        writer,
        captured: after.captured - before.captured,
        lost: after.lost - before.lost,
        shipped: after.shipped - before.shipped,
        stream,
        end_to_end,
        collector_cpu,
        api_cpu,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn size_label(size: u64) -> String {
    if size >= MIB {
        format!("{} MiB", size / MIB)
    } else if size >= KIB {
        format!("{} KiB", size / KIB)
    } else {
        format!("{size}-byte")
    }
}

fn pace_label(rate_mb: u64) -> String {
    if rate_mb == 0 {
        String::new()
    } else {
        format!(" at {rate_mb} MB/s")
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok { "yes" } else { "NO" }
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

fn print_report(writes: u64, total: u64, cost: &[CostRound], flows: &[(Flow, f64)]) {
    let small = Load::unpaced(writes, SMALL_WRITE);
    let med = |f: &dyn Fn(&CostRound) -> f64| median(cost.iter().map(f).collect());
    let wall = |w: &Written| w.wall_ns(&small);
    let cpu = |w: &Written| w.cpu_ns(&small);
    // Paired per round, then the median: the rounds share the machine's noise.
    let added_b_cpu = med(&|r| cpu(&r.b) - cpu(&r.a)) / 1e3;
    let added_c_cpu = med(&|r| cpu(&r.c) - cpu(&r.a)) / 1e3;
    let added_b_wall = med(&|r| wall(&r.b) - wall(&r.a)) / 1e3;
    let added_c_wall = med(&|r| wall(&r.c) - wall(&r.a)) / 1e3;

    println!();
    println!(
        "## Cost per write: {writes} x 64-byte writes into a pipe, median of {} round(s)",
        cost.len()
    );
    println!();
    println!("| writer | wall ns/write | CPU ns/write | added wall us | added CPU us | target |");
    println!("|---|---:|---:|---:|---:|---|");
    println!(
        "| (a) no collector | {:.0} | {:.0} | - | - | - |",
        med(&|r| wall(&r.a)),
        med(&|r| cpu(&r.a))
    );
    println!(
        "| (b) collector running, writer not watched | {:.0} | {:.0} | {added_b_wall:+.3} | {added_b_cpu:+.3} | <= {TARGET_UNWATCHED_US} us |",
        med(&|r| wall(&r.b)),
        med(&|r| cpu(&r.b))
    );
    println!(
        "| (c) writer in the watched cgroup | {:.0} | {:.0} | {added_c_wall:+.3} | {added_c_cpu:+.3} | <= {TARGET_CAPTURED_US} us |",
        med(&|r| wall(&r.c)),
        med(&|r| cpu(&r.c))
    );
    for (i, r) in cost.iter().enumerate() {
        println!(
            "\nround {}: a {:.0}/{:.0}, b {:.0}/{:.0}, c {:.0}/{:.0} ns wall/CPU; (c) captured {:.1} MB, kernel lost {:.1} MB{}{}",
            i + 1,
            wall(&r.a),
            cpu(&r.a),
            wall(&r.b),
            cpu(&r.b),
            wall(&r.c),
            cpu(&r.c),
            mb(r.captured),
            mb(r.lost),
            if r.finished {
                ""
            } else {
                "; stream not finished in 60 s"
            },
            if r.unwatched_captured > 0 {
                format!(
                    "; (b) captured {} bytes of an unwatched writer!",
                    r.unwatched_captured
                )
            } else {
                String::new()
            }
        );
    }

    println!();
    println!(
        "## Throughput: {} MiB per run ({PACED_SECONDS} s' worth at most when paced) in the watched cgroup, collector shipping to a local metadata-api (its defaults: gzip off)",
        total / MIB
    );
    println!();
    println!(
        "| writes | pace | written MB | pipe alone GB/s | writer GB/s | captured MB | kernel lost MB | capture GB/s | stored MB | dropped MB | complete | first write to finished s | stored MB/s | collector core-s/GB stored | API core-s/GB stored |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|");
    for (f, alone_gbs) in flows {
        let bytes = f.load.bytes() as f64;
        let stored_gb = f.stream.stored as f64 / GB;
        println!(
            "| {} | {} | {:.1} | {:.2} | {:.2} | {:.1} | {:.1} | {:.2} | {:.1} | {:.1} | {} | {} | {} | {} | {} |",
            size_label(f.load.size),
            if f.load.rate_mb == 0 {
                "none".to_owned()
            } else {
                format!("{} MB/s", f.load.rate_mb)
            },
            mb(f.load.bytes()),
            alone_gbs,
            bytes / GB / f.writer.wall,
            mb(f.captured),
            mb(f.lost),
            f.capture_gbs(),
            mb(f.stream.stored),
            mb(f.stream.dropped),
            if f.stream.complete { "yes" } else { "no" },
            f.end_to_end
                .map_or_else(|| "timeout".to_owned(), |t| format!("{t:.2}")),
            f.stored_mbs()
                .map_or_else(|| "-".to_owned(), |r| format!("{r:.0}")),
            f.cpu_per_gb()
                .map_or_else(|| "-".to_owned(), |c| format!("{c:.2}")),
            if stored_gb > 0.0 {
                format!("{:.2}", f.api_cpu / stored_gb)
            } else {
                "-".to_owned()
            },
        );
    }

    // The best lossless figures: capture needs only the ring to have kept up; end to end needs
    // every byte stored and the stream complete.
    let best_capture = flows
        .iter()
        .map(|(f, _)| f)
        .filter(|f| f.lost == 0 && f.captured == f.load.bytes())
        .max_by(|x, y| x.capture_gbs().total_cmp(&y.capture_gbs()));
    let best_e2e = flows
        .iter()
        .map(|(f, _)| f)
        .filter(|f| f.lossless())
        .filter_map(|f| f.stored_mbs().map(|r| (f, r)))
        .max_by(|x, y| x.1.total_cmp(&y.1));
    let best_stored = flows
        .iter()
        .map(|(f, _)| f)
        .filter_map(|f| f.stored_mbs().map(|r| (f, r)))
        .max_by(|x, y| x.1.total_cmp(&y.1));
    // CPU per GB of lossless runs; runs that dropped bytes spent CPU on bytes not stored.
    let any_lossless = flows.iter().any(|(f, _)| f.lossless());
    let worst_cpu = flows
        .iter()
        .map(|(f, _)| f)
        .filter(|f| f.lossless() || !any_lossless)
        .filter_map(|f| f.cpu_per_gb().map(|c| (f, c)))
        .max_by(|x, y| x.1.total_cmp(&y.1));
    let which = |f: &Flow| {
        format!(
            "{} writes{}",
            size_label(f.load.size),
            pace_label(f.load.rate_mb)
        )
    };

    println!();
    println!("## Results against targets");
    println!();
    println!("| measure | result | target | met |");
    println!("|---|---|---|---|");
    println!(
        "| added CPU per write, watched (c-a) | {added_c_cpu:+.3} us (wall {added_c_wall:+.3} us) | <= {TARGET_CAPTURED_US} us | {} |",
        verdict(added_c_cpu <= TARGET_CAPTURED_US)
    );
    println!(
        "| added CPU per write, unwatched (b-a) | {added_b_cpu:+.3} us (wall {added_b_wall:+.3} us) | <= {TARGET_UNWATCHED_US} us | {} |",
        verdict(added_b_cpu <= TARGET_UNWATCHED_US)
    );
    match best_capture {
        Some(f) => println!(
            "| lossless capture rate | {:.2} GB/s ({}) | >= {TARGET_CAPTURE_GBS} GB/s | {} |",
            f.capture_gbs(),
            which(f),
            verdict(f.capture_gbs() >= TARGET_CAPTURE_GBS)
        ),
        None => println!(
            "| lossless capture rate | no run was lossless | >= {TARGET_CAPTURE_GBS} GB/s | NO |"
        ),
    }
    match best_e2e {
        Some((f, r)) => println!(
            "| end to end into the API, lossless | {r:.0} MB/s ({}) | >= {TARGET_E2E_MBS} MB/s | {} |",
            which(f),
            verdict(r >= TARGET_E2E_MBS)
        ),
        None => println!(
            "| end to end into the API, lossless | no run was lossless; best stored rate {} | >= {TARGET_E2E_MBS} MB/s | NO |",
            best_stored.map_or_else(
                || "-".to_owned(),
                |(f, r)| format!("{r:.0} MB/s ({}, with drops)", which(f))
            )
        ),
    }
    match worst_cpu {
        Some((f, c)) => println!(
            "| collector CPU per GB stored (worst {} run) | {c:.2} core-s ({}) | <= {TARGET_CPU_PER_GB} core-s | {} |",
            if any_lossless { "lossless" } else { "lossy" },
            which(f),
            verdict(c <= TARGET_CPU_PER_GB)
        ),
        None => println!(
            "| collector CPU per GB stored | nothing stored | <= {TARGET_CPU_PER_GB} core-s | NO |"
        ),
    }
    println!();
    println!(
        "CPU per write: the writer's own user+system time in its loop (the eBPF programs run in it); wall includes waits on the pipe and preemption. \
         Capture rate: bytes captured over the writer's loop time (bounded by the pipe alone). Stored MB/s: bytes stored over the time from the writer's \
         first write until the collector reports the stream finished (it notices the cgroup empty within ~200 ms, then declares the final length); \
         of a lossless run, the end-to-end rate."
    );
}

//! `cargo bench -p bench --bench peers`: our two capture paths against the conventional one, on
//! the same workload (root).
//!
//! The workload (`workload peer-writer`) writes 512-byte lines to its stdout, one write(2) each,
//! paced (10 MB/s) or as fast as it can. Every line carries its sequence number and the time it
//! was written (`SEQ UNIX_NS filler...`), the filler being a function of the sequence number, so
//! a reader can check every stored line and tell how late it arrived. It always runs as a CRI
//! container on a private containerd (the test bed's, driven through CRI as a kubelet would), in
//! the same busybox image, with the host's loader and libraries bind-mounted for the writer:
//!
//! - **conventional**: containerd writes the container's output to its CRI log file, and
//!   syslog-ng (Debian's, unpacked into `~/.cache/relay/debs/syslog-ng`) tails it with a `file()`
//!   source, strips the CRI prefix (`csv-parser`) and POSTs batches to the metadata API's append
//!   route (`http()` destination, one worker so the order holds, flow control so nothing is dropped
//!   inside syslog-ng);
//! - **entrypoint**: the container runs `entrypoint -- writer` (the static binary, defaults);
//! - **collector**: the collector watches the pod's cgroup and ships the container's stdout.
//!
//! Measured per run: the shipping side's CPU (conventional: syslog-ng, plus the containerd shim's
//! and containerd's CPU beyond a run whose output goes to /dev/null inside the container;
//! entrypoint: the pod cgroup's CPU less the writer's own; collector: the collector's CPU plus the
//! system time the writer spends beyond the conventional run's writer, i.e. the eBPF programs), the
//! metadata API's CPU, and what a follower of the stream (`GET /logs/{id}/data?follow=true`)
//! received: every line checked (missing, out of order, corrupt), arrival minus write time per line.
//!
//! Steps: (1) each path at 10 MB/s for `--total-mb`: CPU per GB, loss, latency p50/p99; (2) the
//! most each path carries: as fast as possible, then paced lower while a run loses bytes; (3)
//! loss under kubelet-style rotation (the CRI log renamed at 10 MiB, five files kept, containerd
//! told through CRI `ReopenContainerLog` to reopen it), at 10 MB/s and as fast as possible: the
//! conventional path and the collector on the same container, the entrypoint on one of its own
//! whose log is rotated the same way.

use std::{
    fmt::Write as _,
    io::Read as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail, ensure};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use reqwest::blocking::Client;
use serde_json::{Value, json};
use testbed::cri::{Container, ContainerSpec, Cri, Pod, PodSpec};

use crate::{
    cpu::{clock_ticks, load_average, server_cpu},
    lines::{HEADER, filler, filler_source, parse_digits, unix_ns},
    process::{self, Collector, Server, TempDir},
};

const MB: f64 = 1e6;
const GB: f64 = 1e9;
const MIB: u64 = 1 << 20;
/// Paces to retry a lossy as-fast-as-possible run at, MB/s, in order.
const RETRY_PACES: [u64; 4] = [200, 100, 50, 20];
/// A paced retry writes at most this many seconds' worth.
const RETRY_SECONDS: u64 = 8;
/// No new byte on an unfinished stream for this long after the writer exited: the rest is lost.
const STALL: Duration = Duration::from_secs(15);
/// Contexts of the three paths' streams.
const WORKFLOW: &str = "workflows/bench-peers";
const COLLECTOR_CONTEXT: &str = "workflows/bench-peers/runs/1/steps/collector";
/// Fluent Bit's and Vector's published figures, for the report.
const FLUENT_BIT_CPU_PER_GB: f64 = 12.0;
const VECTOR_CPU_PER_GB: f64 = 36.0;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// MB the paced runs write [default: 300, or 40 with --quick].
    #[arg(long)]
    pub total_mb: Option<u64>,
    /// Pace of the paced runs, MB/s.
    #[arg(long, default_value_t = 10)]
    pub rate_mb: u64,
    /// MB the as-fast-as-possible runs write [default: 300, or 40 with --quick].
    #[arg(long)]
    pub max_mb: Option<u64>,
    /// MB the rotation runs write at the pace [default: --total-mb].
    #[arg(long)]
    pub rotate_total_mb: Option<u64>,
    /// Bytes per line (one write each).
    #[arg(long, default_value_t = 512)]
    pub line_bytes: usize,
    /// Rotate the CRI log past this many MiB (kubelet's containerLogMaxSize).
    #[arg(long, default_value_t = 10)]
    pub rotate_mib: u64,
    /// Log files kept, the current one included (kubelet's containerLogMaxFiles).
    #[arg(long, default_value_t = 5)]
    pub rotate_files: u32,
    /// How often the log's size is checked, ms (kubelet: every 10 s).
    #[arg(long, default_value_t = 100)]
    pub rotate_check_ms: u64,
    /// Use the built binaries as they are (target/release, the static entrypoint). Without it,
    /// `RELAY_METADATA_API_BIN`, `RELAY_COLLECTOR_BIN` and `RELAY_ENTRYPOINT_STATIC` name them
    /// when set (as `cargo xtask test` does), else they are built.
    #[arg(long)]
    pub no_build: bool,
    /// Smoke run: 40 MB per run.
    #[arg(long)]
    pub quick: bool,
}

/// The writer's report of its run.
#[derive(Debug, Clone, Copy, Default)]
struct Written {
    bytes: u64,
    lines: u64,
    wall: f64,
    user: f64,
    sys: f64,
    start_ns: u64,
}

impl Written {
    fn read(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("no writer report at {}", path.display()))?;
        let f: Vec<&str> = text.split_whitespace().collect();
        let bad = || anyhow!("bad writer report {text:?}");
        let [bytes, lines, wall, user, sys, start] = f[..] else {
            return Err(bad());
        };
        Ok(Self {
            bytes: bytes.parse().map_err(|_| bad())?,
            lines: lines.parse().map_err(|_| bad())?,
            wall: wall.parse().map_err(|_| bad())?,
            user: user.parse().map_err(|_| bad())?,
            sys: sys.parse().map_err(|_| bad())?,
            start_ns: start.parse().map_err(|_| bad())?,
        })
    }

    fn cpu(&self) -> f64 {
        self.user + self.sys
    }
}

/// Checks the lines a follower receives against what the writer wrote.
#[derive(Debug, Default)]
struct LineCheck {
    line_bytes: usize,
    source: Vec<u8>,
    carry: Vec<u8>,
    next_seq: u64,
    valid: u64,
    missing: u64,
    out_of_order: u64,
    corrupt: u64,
    /// Arrival minus write time of every valid line, ns.
    latencies: Vec<u64>,
}

impl LineCheck {
    fn new(line_bytes: usize, source: Vec<u8>) -> Self {
        Self {
            line_bytes,
            source,
            ..Self::default()
        }
    }

    fn feed(&mut self, mut data: &[u8], now_ns: u64) {
        while let Some(end) = data.iter().position(|&b| b == b'\n') {
            if self.carry.is_empty() {
                self.line(&data[..=end], now_ns);
            } else {
                let mut line = std::mem::take(&mut self.carry);
                line.extend_from_slice(&data[..=end]);
                self.line(&line, now_ns);
            }
            data = &data[end + 1..];
        }
        self.carry.extend_from_slice(data);
    }

    fn line(&mut self, line: &[u8], now_ns: u64) {
        let n = self.line_bytes;
        let parsed = (line.len() == n && line[10] == b' ' && line[30] == b' ')
            .then(|| Some((parse_digits(&line[..10])?, parse_digits(&line[11..30])?)))
            .flatten()
            .filter(|&(seq, _)| line[HEADER..n - 1] == *filler(&self.source, seq, n - 1 - HEADER));
        let Some((seq, written_ns)) = parsed else {
            self.corrupt += 1;
            return;
        };
        if seq < self.next_seq {
            self.out_of_order += 1;
            return;
        }
        self.missing += seq - self.next_seq;
        self.next_seq = seq + 1;
        self.valid += 1;
        self.latencies.push(now_ns.saturating_sub(written_ns));
    }
}

/// What a follower of one stream saw.
#[derive(Debug, Default)]
struct Followed {
    received: u64,
    check: LineCheck,
    /// When the last byte arrived (UNIX ns).
    last_ns: u64,
    /// The stream ended (complete), rather than the follower giving up.
    ended: bool,
    error: Option<String>,
}

/// A thread following a stream, with its progress readable while it runs.
struct Follower {
    received: Arc<AtomicU64>,
    done: Arc<AtomicBool>,
    handle: JoinHandle<Followed>,
}

impl Follower {
    fn start(
        http: &Client,
        url: &str,
        token: &str,
        id: &str,
        line_bytes: usize,
        source: Vec<u8>,
    ) -> Self {
        let received = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicBool::new(false));
        let (r, d) = (received.clone(), done.clone());
        let request = http
            .get(format!("{url}/logs/{id}/data?follow=true"))
            .bearer_auth(token);
        let handle = std::thread::spawn(move || {
            let mut f = Followed {
                check: LineCheck::new(line_bytes, source),
                ..Followed::default()
            };
            let result = (|| -> anyhow::Result<()> {
                let mut resp = request.send()?.error_for_status()?;
                let mut buf = vec![0u8; 256 << 10];
                loop {
                    let n = match resp.read(&mut buf) {
                        Ok(0) => return Ok(()),
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(e.into()),
                    };
                    let now = unix_ns();
                    f.check.feed(&buf[..n], now);
                    f.received += n as u64;
                    f.last_ns = now;
                    r.fetch_add(n as u64, Ordering::Relaxed);
                }
            })();
            match result {
                Ok(()) => f.ended = true,
                Err(e) => f.error = Some(format!("{e:#}")),
            }
            d.store(true, Ordering::Relaxed);
            f
        });
        Self {
            received,
            done,
            handle,
        }
    }
}

/// The collector's stream name for a container cgroup right below the watched pod cgroup: the
/// cgroup's name and `.stdout`, cut at the front to leave the longest name (64) room for a
/// generation suffix (`stderr.999`), as the collector's local mode names it.
fn collector_stream(container_id: &str) -> String {
    let keep = 64 - "stderr.999".len() - 1;
    let id = &container_id[container_id.len().saturating_sub(keep)..];
    format!("{id}.stdout")
}

/// Which of our shipping paths a run's container uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wrap {
    /// Output to /dev/null inside the container: the runtime's baseline.
    Plain,
    /// Output to the container's stdout: the CRI log (and the collector, when it watches).
    Stdout,
    /// `entrypoint -- writer`.
    Entrypoint,
}

/// One run: what the container does, who ships it, the pace.
#[derive(Debug, Clone, Copy)]
struct RunSpec {
    wrap: Wrap,
    syslog_ng: bool,
    collector: bool,
    rotate: bool,
    bytes: u64,
    rate_mb: u64,
}

/// What one shipping path of a run delivered.
#[derive(Debug)]
struct Delivered {
    followed: Followed,
    /// Stored and dropped (marked) bytes in the API's status.
    stored: u64,
    dropped: u64,
}

impl Delivered {
    fn lost(&self, w: &Written) -> u64 {
        w.bytes
            .saturating_sub(self.followed.check.valid * w.bytes.checked_div(w.lines).unwrap_or(0))
    }

    fn lossless(&self, w: &Written) -> bool {
        self.lost(w) == 0
            && self.followed.check.corrupt == 0
            && self.followed.check.out_of_order == 0
            && self.followed.ended
    }

    /// MB/s from the writer's first line to the last byte's arrival.
    fn e2e_mbs(&self, w: &Written) -> Option<f64> {
        let secs = self.followed.last_ns.checked_sub(w.start_ns)? as f64 / 1e9;
        (secs > 0.0).then(|| self.followed.received as f64 / MB / secs)
    }

    fn percentile_ms(&self, p: f64) -> Option<f64> {
        let mut l = self.followed.check.latencies.clone();
        if l.is_empty() {
            return None;
        }
        l.sort_unstable();
        let i = ((l.len() - 1) as f64 * p).round() as usize;
        Some(l[i] as f64 / 1e6)
    }
}

/// CPU seconds spent over a run's window.
#[derive(Debug, Clone, Copy, Default)]
struct Cpu {
    syslog_ng: f64,
    shim: f64,
    containerd: f64,
    api: f64,
    collector: f64,
    /// The pod cgroup's (writer, entrypoint, and whatever else runs in the pod).
    pod: f64,
}

#[derive(Debug)]
struct RunResult {
    spec: RunSpec,
    written: Written,
    cpu: Cpu,
    conventional: Option<Delivered>,
    entrypoint: Option<Delivered>,
    collector: Option<Delivered>,
    rotations: u64,
}

/// Everything the runs share.
struct Bench<'c> {
    cri: &'c Cri,
    http: Client,
    api: Server,
    api_key: PathBuf,
    api_bin: PathBuf,
    entrypoint: PathBuf,
    collector_bin: PathBuf,
    syslog_ng: SyslogNg,
    dir: PathBuf,
    out: PathBuf,
    host_lib: PathBuf,
    tck: f64,
    source: Vec<u8>,
    line_bytes: usize,
    rotation: Rotation,
    reopen: Reopen,
    runs: u32,
}

#[derive(Debug, Clone, Copy)]
struct Rotation {
    max_bytes: u64,
    files: u32,
    check: Duration,
}

/// A pod the runs put containers in, with its cgroup's CPU counter and, for the collector's
/// runs, a collector watching it.
struct BenchPod<'c> {
    pod: Pod<'c>,
    cgroup: PathBuf,
    collector: Option<(Collector, String)>,
}

impl<'c> Bench<'c> {
    fn pod(&self, name: &str, collector: bool) -> anyhow::Result<BenchPod<'c>> {
        let pod = self.cri.run_pod(&PodSpec::new(name))?;
        let root = process::cgroup2_root().context("no cgroup v2 mount")?;
        let cgroup = root.join(pod.spec().cgroup_parent.trim_start_matches('/'));
        ensure!(
            cgroup.join("cpu.stat").exists(),
            "no cgroup v2 directory {} for pod {name}",
            cgroup.display()
        );
        let collector = if collector {
            let token = process::token(&self.api_bin, &self.api_key, "workflows", "collector")?;
            let token_file = self.dir.join("collector-token");
            std::fs::write(&token_file, &token)?;
            let c = Collector::start(
                &self.collector_bin,
                &self.api.url,
                &token_file,
                &[(cgroup.as_path(), COLLECTOR_CONTEXT)],
                &[],
                &self.dir.join(format!("collector-{name}.log")),
                Duration::from_secs(60),
            )?;
            Some((c, token))
        } else {
            None
        };
        Ok(BenchPod {
            pod,
            cgroup,
            collector,
        })
    }

    fn writer_command(&self, bytes: u64, rate_mb: u64, report: &str) -> Vec<String> {
        [
            "/hostlib/ld-linux-x86-64.so.2",
            "--library-path",
            "/hostlib",
            "/bench/workload",
            "peer-writer",
        ]
        .into_iter()
        .map(str::to_owned)
        .chain([
            "--bytes".to_owned(),
            bytes.to_string(),
            "--line-bytes".to_owned(),
            self.line_bytes.to_string(),
            "--rate-mb".to_owned(),
            rate_mb.to_string(),
            "--report".to_owned(),
            format!("/bench/out/{report}"),
        ])
        .collect()
    }

    fn create_stream(&self, token: &str, body: &Value) -> anyhow::Result<String> {
        let created: Value = self
            .http
            .post(format!("{}/logs", self.api.url))
            .bearer_auth(token)
            .json(body)
            .send()?
            .error_for_status()?
            .json()?;
        Ok(created["id"]
            .as_str()
            .with_context(|| format!("no id in {created}"))?
            .to_owned())
    }

    fn status(&self, token: &str, id: &str) -> anyhow::Result<Value> {
        Ok(self
            .http
            .get(format!("{}/logs/{id}", self.api.url))
            .bearer_auth(token)
            .send()?
            .error_for_status()?
            .json()?)
    }

    /// Declares the stream's final length at what it holds, so its follower ends.
    fn finish_stream(&self, token: &str, id: &str) -> anyhow::Result<()> {
        let length = self.status(token, id)?["length"].as_u64().unwrap_or(0);
        self.http
            .patch(format!("{}/logs/{id}/data", self.api.url))
            .bearer_auth(token)
            .header("Content-Range", format!("bytes */{length}"))
            .send()?
            .error_for_status()?;
        Ok(())
    }

    fn run(&mut self, pod: &BenchPod<'c>, spec: RunSpec) -> anyhow::Result<RunResult> {
        self.runs += 1;
        let n = self.runs;
        let name = format!("w{n}");
        let report = format!("report-{n}");
        let mut command = self.writer_command(spec.bytes, spec.rate_mb, &report);
        let token_name = format!("token-{n}");
        let ep_context = format!("{WORKFLOW}/runs/{n}/steps/entrypoint");
        let ep_token = process::token(&self.api_bin, &self.api_key, &ep_context, "write")?;
        match spec.wrap {
            Wrap::Plain => {
                command = ["sh", "-c", "exec \"$@\" > /dev/null", "sh"]
                    .into_iter()
                    .map(str::to_owned)
                    .chain(command)
                    .collect();
            }
            Wrap::Stdout => {}
            Wrap::Entrypoint => {
                std::fs::write(self.out.join(&token_name), &ep_token)?;
                command = ["/bench/entrypoint", "--"]
                    .into_iter()
                    .map(str::to_owned)
                    .chain(command)
                    .collect();
            }
        }
        let container_spec = ContainerSpec::new(&name, command)
            .bind(&self.host_lib, "/hostlib", true)
            .bind(self.dir.join("workload"), "/bench/workload", true)
            .bind(&self.entrypoint, "/bench/entrypoint", true)
            .bind(&self.out, "/bench/out", false)
            .env("RELAY_METADATA_API_URL", &self.api.url)
            .env(
                "RELAY_METADATA_API_TOKEN_FILE",
                format!("/bench/out/{token_name}"),
            );
        let container = pod.pod.create_container(&container_spec)?;
        let log = container.log_path().to_owned();
        std::fs::write(&log, b"").with_context(|| format!("cannot create {}", log.display()))?;

        // The streams, created before anyone writes (creating is idempotent), and their followers.
        let conv_context = format!("{WORKFLOW}/runs/{n}/steps/conventional");
        let conv_token = process::token(&self.api_bin, &self.api_key, &conv_context, "write")?;
        let mut syslog = None;
        let mut conv = None;
        if spec.syslog_ng {
            let id = self.create_stream(&conv_token, &json!({ "name": "stdout" }))?;
            let f = self.follow(&conv_token, &id);
            syslog = Some(self.syslog_ng.start(
                &self.dir.join(format!("syslog-ng-{n}")),
                &log,
                &format!("{}/logs/{id}/data", self.api.url),
                &conv_token,
            )?);
            conv = Some((id, f));
        }
        let mut ep = None;
        if spec.wrap == Wrap::Entrypoint {
            let id = self.create_stream(&ep_token, &json!({ "name": "stdout" }))?;
            ep = Some((id.clone(), self.follow(&ep_token, &id)));
        }
        let mut col = None;
        let col_token = match (&pod.collector, spec.collector) {
            (Some((_, token)), true) => {
                let token = token.clone();
                let id = self.create_stream(
                    &token,
                    &json!({ "name": collector_stream(container.id()),
                             "context": COLLECTOR_CONTEXT, "source": "ebpf" }),
                )?;
                col = Some((id.clone(), self.follow(&token, &id)));
                Some(token)
            }
            (None, true) => bail!("a collector run in a pod without a collector"),
            _ => None,
        };

        let probe = Probe::find(self, pod, syslog.as_ref())?;
        let before = probe.read(self, pod)?;
        eprintln!(
            "bench-peers: run {n}: {:?}{}{}{}, {} MB{}",
            spec.wrap,
            if spec.syslog_ng { " + syslog-ng" } else { "" },
            if spec.collector { " + collector" } else { "" },
            if spec.rotate { ", log rotated" } else { "" },
            spec.bytes / 1_000_000,
            if spec.rate_mb > 0 {
                format!(" at {} MB/s", spec.rate_mb)
            } else {
                " as fast as possible".to_owned()
            }
        );
        container.start()?;
        let rotator = spec
            .rotate
            .then(|| self.rotate_while_running(&container, &log))
            .transpose()?;
        let timeout = Duration::from_secs(
            120 + spec.bytes / (spec.rate_mb.max(5) * 1_000_000) + spec.bytes / 10_000_000,
        );
        let waited = container.wait(timeout);
        let rotations = match rotator {
            Some((stop, handle)) => {
                stop.store(true, Ordering::Relaxed);
                handle
                    .join()
                    .map_err(|_| anyhow!("the rotation thread panicked"))??
            }
            None => 0,
        };
        let code = waited?;
        ensure!(code == 0, "run {n}: the container exited with {code}");
        let written = Written::read(&self.out.join(&report))?;

        // Until every stream has it all, or stalls.
        let mut pending: Vec<(&Follower, Option<(&str, &str)>)> = Vec::new();
        if let Some((id, f)) = &conv {
            pending.push((f, Some((conv_token.as_str(), id.as_str()))));
        }
        if let Some((_, f)) = &ep {
            pending.push((f, None));
        }
        if let Some((_, f)) = &col {
            pending.push((f, None));
        }
        let mut last = (
            pending
                .iter()
                .map(|p| p.0.received.load(Ordering::Relaxed))
                .sum::<u64>(),
            Instant::now(),
        );
        loop {
            let all = pending.iter().all(|(f, conventional)| {
                f.done.load(Ordering::Relaxed)
                    || (conventional.is_some()
                        && f.received.load(Ordering::Relaxed) >= written.bytes)
            });
            let now: u64 = pending
                .iter()
                .map(|p| p.0.received.load(Ordering::Relaxed))
                .sum();
            if now != last.0 {
                last = (now, Instant::now());
            }
            if all || last.1.elapsed() > STALL {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let after = probe.read(self, pod)?;
        drop(syslog);
        for (_, conventional) in &pending {
            if let Some((token, id)) = conventional {
                self.finish_stream(token, id)?;
            }
        }
        let deliver =
            |s: Option<(String, Follower)>, token: &str| -> anyhow::Result<Option<Delivered>> {
                let Some((id, f)) = s else { return Ok(None) };
                // The collector's and entrypoint's streams end on their own; past the stall the
                // follower is left to end with the API.
                let deadline = Instant::now() + STALL;
                while !f.done.load(Ordering::Relaxed) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
                let followed = if f.done.load(Ordering::Relaxed) {
                    f.handle
                        .join()
                        .map_err(|_| anyhow!("a follower panicked"))?
                } else {
                    Followed {
                        received: f.received.load(Ordering::Relaxed),
                        error: Some("the stream did not end".to_owned()),
                        ..Followed::default()
                    }
                };
                let st = self.status(token, &id)?;
                let sum = |key: &str| -> u64 {
                    st[key].as_array().map_or(0, |spans| {
                        spans
                            .iter()
                            .map(|s| {
                                s["end"]
                                    .as_u64()
                                    .unwrap_or(0)
                                    .saturating_sub(s["start"].as_u64().unwrap_or(0))
                            })
                            .sum()
                    })
                };
                Ok(Some(Delivered {
                    followed,
                    stored: sum("stored"),
                    dropped: sum("dropped"),
                }))
            };
        let conventional = deliver(conv, &conv_token)?;
        let entrypoint = deliver(ep, &ep_token)?;
        let collector = deliver(col, col_token.as_deref().unwrap_or(""))?;
        for (path, d) in [
            (Path3::Conventional, &conventional),
            (Path3::Entrypoint, &entrypoint),
            (Path3::Collector, &collector),
        ] {
            if let Some(d) = d {
                let path = path.short();
                eprintln!(
                    "bench-peers: run {n}: {path}: wrote {} B, received {} B, stored {} B, dropped {} B, lost {} B, {} corrupt and {} out-of-order lines, {}",
                    written.bytes,
                    d.followed.received,
                    d.stored,
                    d.dropped,
                    d.lost(&written),
                    d.followed.check.corrupt,
                    d.followed.check.out_of_order,
                    d.followed.error.as_deref().unwrap_or("stream ended"),
                );
            }
        }
        Ok(RunResult {
            spec,
            written,
            cpu: after.minus(&before),
            conventional,
            entrypoint,
            collector,
            rotations,
        })
    }

    fn follow(&self, token: &str, id: &str) -> Follower {
        Follower::start(
            &self.http,
            &self.api.url,
            token,
            id,
            self.line_bytes,
            self.source.clone(),
        )
    }

    /// Rotates `log` like the kubelet while `container` runs: past the size, `0.log.N` moves to
    /// `0.log.N+1` (the oldest beyond the kept files removed), `0.log` to `0.log.1`, and containerd
    /// reopens `0.log` (CRI ReopenContainerLog). Returns the stop flag and the thread, which
    /// answers the number of rotations.
    fn rotate_while_running(
        &self,
        container: &Container<'_>,
        log: &Path,
    ) -> anyhow::Result<(Arc<AtomicBool>, JoinHandle<anyhow::Result<u64>>)> {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let log = log.to_owned();
        let id = container.id().to_owned();
        let rotation = self.rotation;
        let reopen = self.reopen.clone();
        let handle = std::thread::spawn(move || -> anyhow::Result<u64> {
            let mut rotations = 0;
            let rotated = |i: u32| PathBuf::from(format!("{}.{i}", log.display()));
            while !s.load(Ordering::Relaxed) {
                let size = std::fs::metadata(&log).map_or(0, |m| m.len());
                if size >= rotation.max_bytes {
                    let oldest = rotated(rotation.files - 1);
                    if oldest.exists() {
                        std::fs::remove_file(&oldest)?;
                    }
                    for i in (1..rotation.files - 1).rev() {
                        if rotated(i).exists() {
                            std::fs::rename(rotated(i), rotated(i + 1))?;
                        }
                    }
                    std::fs::rename(&log, rotated(1))?;
                    if let Err(e) = reopen.call(&id) {
                        // The kubelet renames the file back when the runtime cannot reopen it;
                        // the container has exited in the meantime.
                        std::fs::rename(rotated(1), &log)?;
                        if s.load(Ordering::Relaxed) {
                            break;
                        }
                        return Err(e);
                    }
                    rotations += 1;
                }
                std::thread::sleep(rotation.check);
            }
            Ok(rotations)
        });
        Ok((stop, handle))
    }
}

/// The processes whose CPU a run reads.
struct Probe {
    syslog_ng: Option<u32>,
    shim: u32,
    containerd: u32,
    collector: Option<u32>,
}

impl Probe {
    fn find(
        bench: &Bench<'_>,
        pod: &BenchPod<'_>,
        syslog: Option<&SyslogNgProcess>,
    ) -> anyhow::Result<Self> {
        let address = bench.cri.address().display().to_string();
        let config = bench
            .cri
            .directory()
            .join("config.toml")
            .display()
            .to_string();
        let sandbox = pod.pod.id().to_owned();
        let shim = find_process(|cmd| {
            cmd.first().is_some_and(|c| c.contains("containerd-shim"))
                && cmd.iter().any(|a| a == &address)
                && cmd.iter().any(|a| a == &sandbox)
        })
        .context("no containerd shim for the pod")?;
        let containerd = find_process(|cmd| {
            cmd.first().is_some_and(|c| c.ends_with("/containerd"))
                && cmd.iter().any(|a| a == &config)
        })
        .context("no containerd process")?;
        Ok(Self {
            syslog_ng: syslog.map(|s| s.child.id()),
            shim,
            containerd,
            collector: pod.collector.as_ref().map(|(c, _)| c.pid()),
        })
    }

    fn read(&self, bench: &Bench<'_>, pod: &BenchPod<'_>) -> anyhow::Result<Cpu> {
        let tck = bench.tck;
        let opt = |pid: Option<u32>| pid.map_or(Ok(0.0), |p| server_cpu(p, tck));
        Ok(Cpu {
            syslog_ng: opt(self.syslog_ng)?,
            shim: server_cpu(self.shim, tck)?,
            containerd: server_cpu(self.containerd, tck)?,
            api: server_cpu(bench.api.child.id(), tck)?,
            collector: opt(self.collector)?,
            pod: cgroup_cpu(&pod.cgroup)?,
        })
    }
}

impl Cpu {
    fn minus(&self, o: &Self) -> Self {
        Self {
            syslog_ng: self.syslog_ng - o.syslog_ng,
            shim: self.shim - o.shim,
            containerd: self.containerd - o.containerd,
            api: self.api - o.api,
            collector: self.collector - o.collector,
            pod: self.pod - o.pod,
        }
    }
}

/// CPU seconds a cgroup v2 directory has used (`cpu.stat` `usage_usec`, descendants included).
fn cgroup_cpu(dir: &Path) -> anyhow::Result<f64> {
    let path = dir.join("cpu.stat");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let usec = text
        .lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .with_context(|| format!("no usage_usec in {}", path.display()))?;
    Ok(usec.trim().parse::<f64>()? / 1e6)
}

/// The first process whose command line satisfies `pred`.
fn find_process(pred: impl Fn(&[String]) -> bool) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid = e.file_name().to_str()?.parse::<u32>().ok()?;
        let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let cmd: Vec<String> = raw
            .split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        pred(&cmd).then_some(pid)
    })
}

/// CRI `ReopenContainerLog` on the test bed's containerd: the one call the kubelet makes for a
/// rotation, which the test bed's CRI client does not have.
#[derive(Clone)]
struct Reopen {
    runtime: Arc<tokio::runtime::Runtime>,
    channel: tonic::transport::Channel,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ReopenContainerLogRequest {
    #[prost(string, tag = "1")]
    container_id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ReopenContainerLogResponse {}

impl Reopen {
    fn new(socket: &Path) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let socket = socket.to_owned();
        let channel = {
            let _entered = runtime.enter();
            tonic::transport::Endpoint::from_static("http://containerd")
                .timeout(Duration::from_secs(10))
                .connect_with_connector_lazy(tower::service_fn(move |_| {
                    let socket = socket.clone();
                    async move {
                        tokio::net::UnixStream::connect(socket)
                            .await
                            .map(hyper_util::rt::TokioIo::new)
                    }
                }))
        };
        Ok(Self {
            runtime: Arc::new(runtime),
            channel,
        })
    }

    fn call(&self, container_id: &str) -> anyhow::Result<()> {
        let request = ReopenContainerLogRequest {
            container_id: container_id.to_owned(),
        };
        let channel = self.channel.clone();
        self.runtime.block_on(async move {
            let mut grpc = tonic::client::Grpc::new(channel);
            grpc.ready().await.context("CRI socket not ready")?;
            let codec = tonic_prost::ProstCodec::<
                ReopenContainerLogRequest,
                ReopenContainerLogResponse,
            >::default();
            grpc.unary(
                tonic::Request::new(request),
                http::uri::PathAndQuery::from_static(
                    "/runtime.v1.RuntimeService/ReopenContainerLog",
                ),
                codec,
            )
            .await
            .context("CRI ReopenContainerLog")?;
            Ok(())
        })
    }
}

/// syslog-ng from Debian's packages, unpacked into the cache.
struct SyslogNg {
    root: PathBuf,
    modules: PathBuf,
}

/// Debian packages syslog-ng's file source and HTTP destination come in.
const SYSLOG_NG_PACKAGES: [&str; 2] = ["syslog-ng-core", "syslog-ng-mod-http"];

impl SyslogNg {
    /// Fetches syslog-ng-core and syslog-ng-mod-http with the libraries this machine lacks
    /// (`apt-get install --download-only` into a directory of our own: apt picks what is
    /// missing, nothing is installed) and unpacks them into `~/.cache/relay/debs/syslog-ng`,
    /// unless that is done and the binary answers.
    fn install() -> anyhow::Result<Self> {
        let debs = process::cache_dir().join("debs");
        let root = debs.join("syslog-ng");
        let stamp = debs.join("syslog-ng.stamp");
        if stamp.exists()
            && let Ok(this) = Self::at(&root)
            && this
                .command()
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        {
            return Ok(this);
        }
        eprintln!(
            "bench-peers: fetching syslog-ng from Debian into {}",
            root.display()
        );
        let download = debs.join(".syslog-ng-download");
        if download.exists() {
            std::fs::remove_dir_all(&download)?;
        }
        std::fs::create_dir_all(download.join("partial"))?;
        let fetch = || {
            let mut c = Command::new("apt-get");
            c.args([
                "install",
                "--download-only",
                "-y",
                "-qq",
                "--no-install-recommends",
            ])
            .arg("-o")
            .arg(format!("Dir::Cache::archives={}", download.display()))
            .args(["-o", "APT::Sandbox::User=root"])
            .args(SYSLOG_NG_PACKAGES);
            c
        };
        if fetch().output().map_or(true, |o| !o.status.success()) {
            process::run(Command::new("apt-get").args(["update", "-qq"]))?;
            process::run(&mut fetch())?;
        }
        // Already installed here: apt downloads nothing; fetch the two packages themselves.
        let has = |name: &str| -> anyhow::Result<bool> {
            Ok(std::fs::read_dir(&download)?.flatten().any(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!("{name}_"))
            }))
        };
        if !has(SYSLOG_NG_PACKAGES[0])? {
            process::run(
                Command::new("apt-get")
                    .current_dir(&download)
                    .args(["download", "-qq", "-o", "APT::Sandbox::User=root"])
                    .args(SYSLOG_NG_PACKAGES),
            )?;
        }
        let staging = debs.join(".syslog-ng.tmp");
        if staging.exists() {
            std::fs::remove_dir_all(&staging)?;
        }
        std::fs::create_dir_all(&staging)?;
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&download)?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".deb") {
                process::run(
                    Command::new("dpkg-deb")
                        .arg("-x")
                        .arg(entry.path())
                        .arg(&staging),
                )?;
                names.push(name);
            }
        }
        if root.exists() {
            std::fs::remove_dir_all(&root)?;
        }
        std::fs::rename(&staging, &root)?;
        std::fs::remove_dir_all(&download)?;
        let this = Self::at(&root)?;
        let out = this.command().arg("--version").output()?;
        ensure!(
            out.status.success(),
            "the unpacked syslog-ng does not run: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        names.sort();
        std::fs::write(&stamp, names.join("\n"))?;
        Ok(this)
    }

    /// The unpacked tree at `root`, with its module directory (`usr/lib/syslog-ng/3.NN`).
    fn at(root: &Path) -> anyhow::Result<Self> {
        let lib = root.join("usr/lib/syslog-ng");
        let modules = std::fs::read_dir(&lib)
            .with_context(|| format!("cannot read {}", lib.display()))?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.join("libhttp.so").exists())
            .with_context(|| format!("no HTTP module under {}", lib.display()))?;
        Ok(Self {
            root: root.to_owned(),
            modules,
        })
    }

    fn command(&self) -> Command {
        let r = &self.root;
        let libs = [
            r.join("usr/lib/syslog-ng"),
            r.join("usr/lib/x86_64-linux-gnu"),
            r.join("lib/x86_64-linux-gnu"),
        ];
        let mut c = Command::new(r.join("usr/sbin/syslog-ng"));
        c.env(
            "LD_LIBRARY_PATH",
            std::env::join_paths(libs).unwrap_or_default(),
        );
        c
    }

    /// The configuration: tail `log` (CRI format), strip the CRI prefix, POST the text in
    /// batches to `url` (a stream's append route) with `token`.
    fn config(log: &Path, url: &str, token: &str) -> String {
        format!(
            r#"@version: 3.38
options {{ stats-freq(0); threaded(yes); log-fifo-size(20000); }};
source s_cri {{
  file("{log}" flags(no-parse) follow-freq(0.05) log-fetch-limit(1000) log-iw-size(10000)
       log-msg-size(65536));
}};
parser p_cri {{
  csv-parser(columns("CRI.TIME", "CRI.STREAM", "CRI.TAG", "CRI.MSG") delimiters(" ")
             dialect(escape-none) flags(greedy));
}};
destination d_api {{
  http(url("{url}") method("POST")
       headers("Authorization: Bearer {token}", "Content-Type: application/octet-stream")
       body("${{CRI.MSG}}$(if (\"${{CRI.TAG}}\" eq \"F\") \"\n\" \"\")") delimiter("")
       batch-lines(2000) batch-bytes(1048576) batch-timeout(100) workers(1));
}};
log {{ source(s_cri); parser(p_cri); destination(d_api); flags(flow-control); }};
"#,
            log = log.display()
        )
    }

    /// Starts syslog-ng on `log` and waits until it has the file open.
    fn start(
        &self,
        dir: &Path,
        log: &Path,
        url: &str,
        token: &str,
    ) -> anyhow::Result<SyslogNgProcess> {
        std::fs::create_dir_all(dir)?;
        let conf = dir.join("syslog-ng.conf");
        std::fs::write(&conf, Self::config(log, url, token))?;
        let stderr = std::fs::File::create(dir.join("syslog-ng.log"))?;
        let child = self
            .command()
            .args(["-F", "-e", "--no-caps"])
            .arg(format!("--module-path={}", self.modules.display()))
            .arg(format!("--cfgfile={}", conf.display()))
            .arg(format!("--persist-file={}", dir.join("persist").display()))
            .arg(format!("--pidfile={}", dir.join("pid").display()))
            .arg(format!("--control={}", dir.join("ctl").display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .context("cannot start syslog-ng")?;
        let mut p = SyslogNgProcess { child };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = p.child.try_wait()? {
                let log = std::fs::read_to_string(dir.join("syslog-ng.log")).unwrap_or_default();
                bail!("syslog-ng exited with {status}:\n{log}");
            }
            let open = std::fs::read_dir(format!("/proc/{}/fd", p.child.id()))
                .map(|fds| {
                    fds.flatten()
                        .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t == log))
                })
                .unwrap_or(false);
            if open {
                return Ok(p);
            }
            ensure!(
                Instant::now() < deadline,
                "syslog-ng did not open {} in 20 s",
                log.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// A running syslog-ng; stopped (SIGTERM, then SIGKILL after 10 s) on drop.
struct SyslogNgProcess {
    child: Child,
}

impl Drop for SyslogNgProcess {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if matches!(self.child.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The directory of the host's dynamic loader and C library, bind-mounted for the writer.
fn host_lib_dir() -> anyhow::Result<PathBuf> {
    let loader = std::fs::canonicalize("/lib64/ld-linux-x86-64.so.2")
        .context("no /lib64/ld-linux-x86-64.so.2")?;
    Ok(loader
        .parent()
        .context("loader without a directory")?
        .to_owned())
}

/// The most a path carried: the as-fast-as-possible run, then paced ones while runs lose bytes.
#[derive(Debug)]
struct MaxRuns {
    runs: Vec<RunResult>,
}

fn delivered_of(r: &RunResult, path: Path3) -> Option<&Delivered> {
    match path {
        Path3::Conventional => r.conventional.as_ref(),
        Path3::Entrypoint => r.entrypoint.as_ref(),
        Path3::Collector => r.collector.as_ref(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path3 {
    Conventional,
    Entrypoint,
    Collector,
}

impl Path3 {
    const ALL: [Self; 3] = [Self::Conventional, Self::Entrypoint, Self::Collector];

    /// The path's name in the runs' progress lines.
    fn short(self) -> &'static str {
        match self {
            Self::Conventional => "conventional",
            Self::Entrypoint => "entrypoint",
            Self::Collector => "collector",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Conventional => "conventional (containerd CRI log + syslog-ng)",
            Self::Entrypoint => "entrypoint",
            Self::Collector => "collector (eBPF)",
        }
    }
}

impl MaxRuns {
    fn best_lossless(&self, path: Path3) -> Option<(f64, &RunResult)> {
        self.runs
            .iter()
            .filter_map(|r| {
                let d = delivered_of(r, path)?;
                d.lossless(&r.written)
                    .then(|| Some((d.e2e_mbs(&r.written)?, r)))?
            })
            .max_by(|a, b| a.0.total_cmp(&b.0))
    }
}

/// What a run leaves for its caller besides the printed report: the report itself, and per path
/// (`conventional`, `entrypoint`, `collector`) the most bytes a follower received in one run.
#[derive(Debug)]
pub struct Outcome {
    pub report: String,
    pub received: Vec<(&'static str, u64)>,
}

/// Runs the benchmark with `workload` (the `workload` binary) as the containers' writer, prints
/// the report and returns it.
pub fn run(args: Args, workload: &Path) -> anyhow::Result<Outcome> {
    ensure!(
        process::is_root(),
        "bench-peers needs root (containerd, cgroups, eBPF)"
    );
    if let Some(reason) = testbed::unavailable() {
        bail!("{reason}");
    }
    let quick = args.quick;
    let total = args.total_mb.unwrap_or(if quick { 40 } else { 300 }) * 1_000_000;
    let max_total = args.max_mb.unwrap_or(if quick { 40 } else { 300 }) * 1_000_000;
    let rotate_total = args.rotate_total_mb.map_or(total, |m| m * 1_000_000);
    ensure!(args.rate_mb > 0, "--rate-mb must be positive");
    ensure!(args.rotate_files >= 2, "--rotate-files must be at least 2");
    let release = process::target_dir().join("release");
    let (api_bin, collector_bin, entrypoint) = if args.no_build {
        (
            release.join("metadata-api"),
            release.join("collector"),
            process::static_entrypoint(),
        )
    } else {
        (
            process::bin_from_env("RELAY_METADATA_API_BIN", process::build_metadata_api)?,
            process::bin_from_env("RELAY_COLLECTOR_BIN", process::build_collector)?,
            process::bin_from_env("RELAY_ENTRYPOINT_STATIC", process::build_entrypoint)?,
        )
    };
    let syslog_ng = SyslogNg::install()?;
    let tmp = TempDir::create()?;
    let dir = tmp.0.clone();
    let out = dir.join("out");
    std::fs::create_dir_all(&out)?;
    // The writer runs from a copy: a rebuild of the workload meanwhile does not change it.
    std::fs::copy(workload, dir.join("workload"))
        .with_context(|| format!("cannot copy {}", workload.display()))?;
    let (api, _, _) = process::bench_api(&api_bin, &dir, false, WORKFLOW, "read")?;
    let cri = Cri::start()?;
    let reopen = Reopen::new(cri.address())?;
    let mut bench = Bench {
        cri: &cri,
        http: Client::builder().timeout(None).build()?,
        api,
        api_key: dir.join("key"),
        api_bin,
        entrypoint,
        collector_bin,
        syslog_ng,
        dir: dir.clone(),
        out,
        host_lib: host_lib_dir()?,
        tck: clock_ticks(),
        source: filler_source()?,
        line_bytes: args.line_bytes,
        rotation: Rotation {
            max_bytes: args.rotate_mib * MIB,
            files: args.rotate_files,
            check: Duration::from_millis(args.rotate_check_ms),
        },
        reopen,
        runs: 0,
    };
    let load_start = load_average();
    let rate = args.rate_mb;
    let paced = |wrap, syslog_ng, collector, rotate, bytes| RunSpec {
        wrap,
        syslog_ng,
        collector,
        rotate,
        bytes,
        rate_mb: rate,
    };

    // Conventional path and the runtime's baseline: no collector on the machine yet.
    let pod_a = bench.pod("conventional", false)?;
    let plain = bench.run(&pod_a, paced(Wrap::Plain, false, false, false, total))?;
    let conv = bench.run(&pod_a, paced(Wrap::Stdout, true, false, false, total))?;
    let conv_max = max_runs(&mut bench, &pod_a, max_total, Path3::Conventional, |b| {
        RunSpec {
            wrap: Wrap::Stdout,
            syslog_ng: true,
            collector: false,
            rotate: false,
            bytes: b.0,
            rate_mb: b.1,
        }
    })?;
    drop(pod_a);

    let pod_b = bench.pod("entrypoint", false)?;
    let ep = bench.run(&pod_b, paced(Wrap::Entrypoint, false, false, false, total))?;
    let ep_max = max_runs(&mut bench, &pod_b, max_total, Path3::Entrypoint, |b| {
        RunSpec {
            wrap: Wrap::Entrypoint,
            syslog_ng: false,
            collector: false,
            rotate: false,
            bytes: b.0,
            rate_mb: b.1,
        }
    })?;
    let ep_rot = bench.run(
        &pod_b,
        paced(Wrap::Entrypoint, false, false, true, rotate_total),
    )?;
    let ep_rot_fast = bench.run(
        &pod_b,
        RunSpec {
            rate_mb: 0,
            bytes: max_total,
            ..paced(Wrap::Entrypoint, false, false, true, 0)
        },
    )?;
    drop(pod_b);

    let pod_c = bench.pod("collector", true)?;
    let col = bench.run(&pod_c, paced(Wrap::Stdout, false, true, false, total))?;
    let col_max = max_runs(&mut bench, &pod_c, max_total, Path3::Collector, |b| {
        RunSpec {
            wrap: Wrap::Stdout,
            syslog_ng: false,
            collector: true,
            rotate: false,
            bytes: b.0,
            rate_mb: b.1,
        }
    })?;
    let rot = bench.run(&pod_c, paced(Wrap::Stdout, true, true, true, rotate_total))?;
    let rot_fast = bench.run(
        &pod_c,
        RunSpec {
            rate_mb: 0,
            bytes: max_total,
            ..paced(Wrap::Stdout, true, true, true, 0)
        },
    )?;
    drop(pod_c);
    let load_end = load_average();

    let report = Report {
        rate,
        line_bytes: args.line_bytes,
        rotation: bench.rotation,
        plain,
        conv,
        ep,
        col,
        maxes: [conv_max, ep_max, col_max],
        rot,
        rot_fast,
        ep_rot,
        ep_rot_fast,
    };
    let text = report.render(&load_start, &load_end)?;
    print!("{text}");
    Ok(Outcome {
        received: Path3::ALL
            .map(|p| (p.short(), report.most_received(p)))
            .to_vec(),
        report: text,
    })
}

/// As fast as possible; while a run loses bytes, paced at each of [`RETRY_PACES`] in turn.
fn max_runs<'c>(
    bench: &mut Bench<'c>,
    pod: &BenchPod<'c>,
    bytes: u64,
    path: Path3,
    spec: impl Fn((u64, u64)) -> RunSpec,
) -> anyhow::Result<MaxRuns> {
    let mut runs = Vec::new();
    for rate in std::iter::once(0).chain(RETRY_PACES) {
        let b = if rate == 0 {
            bytes
        } else {
            bytes.min(rate * 1_000_000 * RETRY_SECONDS)
        };
        let r = bench.run(pod, spec((b, rate)))?;
        let lossless = delivered_of(&r, path).is_some_and(|d| d.lossless(&r.written));
        runs.push(r);
        if lossless {
            break;
        }
    }
    Ok(MaxRuns { runs })
}

struct Report {
    rate: u64,
    line_bytes: usize,
    rotation: Rotation,
    plain: RunResult,
    conv: RunResult,
    ep: RunResult,
    col: RunResult,
    maxes: [MaxRuns; 3],
    rot: RunResult,
    rot_fast: RunResult,
    ep_rot: RunResult,
    ep_rot_fast: RunResult,
}

/// The shipping side's CPU of a path in a run, with the parts it is made of.
struct Shipping {
    total: f64,
    parts: String,
}

impl Report {
    fn shipping(&self, path: Path3, r: &RunResult) -> Shipping {
        match path {
            Path3::Conventional => {
                let shim = r.cpu.shim - self.plain.cpu.shim;
                let containerd = r.cpu.containerd - self.plain.cpu.containerd;
                Shipping {
                    total: r.cpu.syslog_ng + shim + containerd,
                    parts: format!(
                        "syslog-ng {:.2} + shim {shim:.2} + containerd {containerd:.2} (beyond the /dev/null run: shim {:.2}, containerd {:.2})",
                        r.cpu.syslog_ng, self.plain.cpu.shim, self.plain.cpu.containerd
                    ),
                }
            }
            Path3::Entrypoint => {
                let ep = r.cpu.pod - r.written.cpu();
                Shipping {
                    total: ep,
                    parts: format!(
                        "pod cgroup {:.2} - writer {:.2}",
                        r.cpu.pod,
                        r.written.cpu()
                    ),
                }
            }
            Path3::Collector => {
                // The writer's system time in a conventional run at the same pace (no eBPF
                // programs on its writes).
                let base = std::iter::once(&self.conv)
                    .chain(&self.maxes[0].runs)
                    .find(|c| c.spec.rate_mb == r.spec.rate_mb)
                    .unwrap_or(&self.conv);
                let extra_sys = r.written.sys - base.written.sys;
                Shipping {
                    total: r.cpu.collector + extra_sys,
                    parts: format!(
                        "collector {:.2} + writer system time {:.2} - {:.2} (the conventional run's writer at the same pace)",
                        r.cpu.collector, r.written.sys, base.written.sys
                    ),
                }
            }
        }
    }

    fn paced(&self, path: Path3) -> &RunResult {
        match path {
            Path3::Conventional => &self.conv,
            Path3::Entrypoint => &self.ep,
            Path3::Collector => &self.col,
        }
    }

    /// Every run, in the order of the report's table.
    fn runs(&self) -> Vec<&RunResult> {
        let mut all: Vec<&RunResult> = vec![&self.plain, &self.conv, &self.ep, &self.col];
        for m in &self.maxes {
            all.extend(m.runs.iter());
        }
        all.extend([&self.ep_rot, &self.ep_rot_fast, &self.rot, &self.rot_fast]);
        all
    }

    /// The most bytes a follower of `path`'s stream received in one run.
    fn most_received(&self, path: Path3) -> u64 {
        self.runs()
            .into_iter()
            .filter_map(|r| delivered_of(r, path))
            .map(|d| d.followed.received)
            .max()
            .unwrap_or(0)
    }

    /// The report's tables and notes, as printed.
    fn render(&self, load_start: &str, load_end: &str) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        let gb = |r: &RunResult| r.written.bytes as f64 / GB;
        writeln!(out)?;
        writeln!(
            out,
            "## Runs ({}-byte lines, one write each; CPU in core-seconds over each run's window)",
            self.line_bytes
        )?;
        writeln!(out)?;
        writeln!(
            out,
            "| run | path | written MB | writer MB/s | received MB | lost MB | corrupt/out-of-order lines | API dropped MB | end-to-end MB/s | p50 ms | p99 ms | shipping core-s | API core-s | rotations |"
        )?;
        writeln!(
            out,
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        )?;
        for r in &self.runs() {
            let label = format!(
                "{}{}{}",
                if r.spec.rate_mb > 0 {
                    format!("{} MB/s", r.spec.rate_mb)
                } else {
                    "max".to_owned()
                },
                if r.spec.rotate { ", rotated" } else { "" },
                if r.spec.wrap == Wrap::Plain {
                    ", to /dev/null"
                } else {
                    ""
                }
            );
            let rows = Path3::ALL
                .into_iter()
                .filter_map(|p| delivered_of(r, p).map(|d| (p, d)));
            let mut any = false;
            for (p, d) in rows {
                any = true;
                let ship = self.shipping(p, r);
                writeln!(
                    out,
                    "| {label} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {}/{} | {:.1} | {} | {} | {} | {:.2} ({}) | {:.2} | {} |",
                    p.name(),
                    r.written.bytes as f64 / MB,
                    r.written.bytes as f64 / MB / r.written.wall,
                    d.followed.received as f64 / MB,
                    d.lost(&r.written) as f64 / MB,
                    d.followed.check.corrupt,
                    d.followed.check.out_of_order,
                    d.dropped as f64 / MB,
                    opt(d.e2e_mbs(&r.written), 1),
                    opt(d.percentile_ms(0.5), 0),
                    opt(d.percentile_ms(0.99), 0),
                    ship.total,
                    ship.parts,
                    r.cpu.api,
                    r.rotations,
                )?;
                if let Some(e) = &d.followed.error {
                    writeln!(out, "|  | follower: {e} | | | | | | | | | | | | |")?;
                }
            }
            if !any {
                writeln!(
                    out,
                    "| {label} | runtime baseline | {:.1} | {:.1} | - | - | - | - | - | - | - | shim {:.2}, containerd {:.2} | {:.2} | - |",
                    r.written.bytes as f64 / MB,
                    r.written.bytes as f64 / MB / r.written.wall,
                    r.cpu.shim,
                    r.cpu.containerd,
                    r.cpu.api
                )?;
            }
        }

        writeln!(out)?;
        writeln!(
            out,
            "## Against the conventional path ({} MB/s = paced runs; rotation: {} MiB x {} files, checked every {} ms)",
            self.rate,
            self.rotation.max_bytes / MIB,
            self.rotation.files,
            self.rotation.check.as_millis()
        )?;
        writeln!(out)?;
        writeln!(
            out,
            "| path | core-s/GB at {} MB/s | API core-s/GB | max lossless MB/s | p50 / p99 ms | lost under rotation at {} MB/s | lost under rotation, max pace | core-s/GB ratio | max MB/s ratio | p50 ratio |",
            self.rate, self.rate
        )?;
        writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")?;
        let base = self.summary(Path3::Conventional);
        for p in Path3::ALL {
            let s = self.summary(p);
            let r = self.paced(p);
            writeln!(
                out,
                "| {} | {:.2} | {:.2} | {} | {} / {} | {} | {} | {} | {} | {} |",
                p.name(),
                s.cpu_per_gb,
                r.cpu.api / gb(r),
                s.max.map_or_else(
                    || "none lossless".to_owned(),
                    |m| format!("{m:.1}{}", s.max_note)
                ),
                opt(s.p50, 0),
                opt(s.p99, 0),
                s.rot_loss,
                s.rot_fast_loss,
                ratio(s.cpu_per_gb, base.cpu_per_gb),
                match (s.max, base.max) {
                    (Some(a), Some(b)) => ratio(a, b),
                    _ => "-".to_owned(),
                },
                match (s.p50, base.p50) {
                    (Some(a), Some(b)) => ratio(a, b),
                    _ => "-".to_owned(),
                },
            )?;
        }
        let tailer = self.conv.cpu.syslog_ng / gb(&self.conv);
        writeln!(out)?;
        writeln!(
            out,
            "Of the conventional path's {:.2} core-s/GB, syslog-ng (the tailer and shipper alone) is {tailer:.2}: the rest is the runtime writing the CRI log, which in Kubernetes goes on for a container the collector captures (its stdout still goes to the shim), and stops for one the entrypoint wraps. Against syslog-ng alone: entrypoint {}, collector {}.",
            base.cpu_per_gb,
            ratio(self.summary(Path3::Entrypoint).cpu_per_gb, tailer),
            ratio(self.summary(Path3::Collector).cpu_per_gb, tailer),
        )?;
        writeln!(
            out,
            "Published, for reference: Fluent Bit ~{FLUENT_BIT_CPU_PER_GB} and Vector ~{VECTOR_CPU_PER_GB} core-s/GB at 10 MB/s; ~36-38 MB/s max single-pipeline throughput."
        )?;
        writeln!(
            out,
            "Shipping CPU: conventional = syslog-ng + the containerd shim's and containerd's CPU beyond a run writing to /dev/null in the container; entrypoint = the pod cgroup's CPU less the writer's own; collector = the collector's CPU + the writer's system time beyond the conventional run's writer. Ratios: path / conventional."
        )?;
        writeln!(
            out,
            "load average at start: {load_start}; at end: {load_end}"
        )?;
        Ok(out)
    }

    fn summary(&self, path: Path3) -> Summary {
        let r = self.paced(path);
        let d = delivered_of(r, path);
        let ship = self.shipping(path, r);
        let maxes = &self.maxes[match path {
            Path3::Conventional => 0,
            Path3::Entrypoint => 1,
            Path3::Collector => 2,
        }];
        let best = maxes.best_lossless(path);
        let max_note = best.map_or(String::new(), |(_, r)| {
            if r.spec.rate_mb > 0 {
                format!(" (paced at {} MB/s; unpaced lost bytes)", r.spec.rate_mb)
            } else {
                String::new()
            }
        });
        let (rot, rot_fast) = match path {
            Path3::Entrypoint => (&self.ep_rot, &self.ep_rot_fast),
            _ => (&self.rot, &self.rot_fast),
        };
        let loss = |r: &RunResult| {
            delivered_of(r, path).map_or_else(
                || "-".to_owned(),
                |d| {
                    let lost = d.lost(&r.written);
                    format!(
                        "{:.1} MB of {:.1} ({:.1}%, {} rotations)",
                        lost as f64 / MB,
                        r.written.bytes as f64 / MB,
                        lost as f64 * 100.0 / r.written.bytes.max(1) as f64,
                        r.rotations
                    )
                },
            )
        };
        Summary {
            cpu_per_gb: ship.total / (r.written.bytes as f64 / GB),
            max: best.map(|b| b.0),
            max_note,
            p50: d.and_then(|d| d.percentile_ms(0.5)),
            p99: d.and_then(|d| d.percentile_ms(0.99)),
            rot_loss: loss(rot),
            rot_fast_loss: loss(rot_fast),
        }
    }
}

struct Summary {
    cpu_per_gb: f64,
    max: Option<f64>,
    max_note: String,
    p50: Option<f64>,
    p99: Option<f64>,
    rot_loss: String,
    rot_fast_loss: String,
}

fn opt(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.decimals$}"))
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}x", a / b)
    } else {
        "-".to_owned()
    }
}

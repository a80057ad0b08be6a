//! Scripted fault scenarios against the real parts on this machine (root): the metadata API
//! binary over real sockets, writers wrapped by the real entrypoint and writers in a cgroup the
//! real collector watches, on the real kernel. [`run_scenario`] runs one and returns its
//! [`Outcome`], which `tests/faults.rs` asserts on; [`run_all`] runs several against baselines and
//! prints the table (`cargo bench -p system-tests --bench faults`).
//!
//! Half the writers (the even ones) run under the entrypoint, the other half as plain processes
//! in sub-cgroups of a cgroup the collector watches (each writer on one path). Each writes a
//! known number of bytes at a fixed pace, of deterministic content (64-byte lines carrying the
//! writer's tag and the line number), so every stored byte can be compared with what was written
//! at its offset. Afterwards, per stream: produced (the writer's own count), stored (bytes that
//! match), dropped (covered by `dropped` markers and not stored), unaccounted (neither: silent
//! loss), duplicated (stored bytes that differ from what was written there, or lie past the end
//! of what was written), and the writers' wall time against a run without faults.
//!
//! Scenarios: `kill-api` (kill -9, 1 s dead, restart on the same port and storage, every 4 s),
//! `throttle-storm` (tiny rate limits: sustained 429), `collector-restart` (SIGTERM and start
//! again), `collector-kill` (the same with SIGKILL), `storage-down` (the S3
//! emulator stopped with SIGSTOP for 30 s), `network-cut` (the API in a network namespace whose
//! veth goes down for 30 s). An outcome is [`Outcome::clean`] when no byte is unaccounted or
//! duplicated.

use std::{
    collections::HashMap,
    io::{BufReader, Read},
    net::{TcpListener, TcpStream},
    os::fd::AsFd,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, anyhow, bail, ensure};
use nix::{
    errno::Errno,
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use reqwest::blocking::Client;
use serde_json::{Value, json};

use bench::process::{self as util, Cgroup, Collector, Server};

/// A fault injected while the writers write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    KillApi,
    ThrottleStorm,
    CollectorRestart,
    StorageDown,
    NetworkCut,
    CollectorKill,
}

impl Scenario {
    /// Most valuable first.
    pub const ALL: [Self; 6] = [
        Self::KillApi,
        Self::ThrottleStorm,
        Self::CollectorRestart,
        Self::StorageDown,
        Self::NetworkCut,
        Self::CollectorKill,
    ];

    /// The name the table and `--scenario` use.
    pub fn name(self) -> &'static str {
        match self {
            Self::KillApi => "kill-api",
            Self::ThrottleStorm => "throttle-storm",
            Self::CollectorRestart => "collector-restart",
            Self::StorageDown => "storage-down",
            Self::NetworkCut => "network-cut",
            Self::CollectorKill => "collector-kill",
        }
    }

    /// How long the writers write unless told otherwise.
    pub fn default_seconds(self) -> u64 {
        match self {
            Self::KillApi => 120,
            Self::ThrottleStorm => 300,
            Self::CollectorRestart | Self::CollectorKill => 30,
            Self::StorageDown | Self::NetworkCut => 60,
        }
    }
}

/// The writers of a run and what is kept of it.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Writers: the even ones under the entrypoint, the odd ones in the collector's cgroup.
    pub writers: u32,
    /// Total pace of all writers, MB/s.
    pub rate_mb: u64,
    /// Keep each run's storage (under target/faults) instead of removing it.
    pub keep: bool,
}

/// Bytes per line of the writers' content.
const LINE: u64 = 64;
/// Letters the lines' filler is cut from, at an offset that changes with the line number.
const ALPHABET: &[u8; 68] = b"abcdefghijklmnopqrstuvwxyzabcdefghijklmnopqrstuvwxyzabcdefghijklmnop";
/// How long streams may take to complete after the writers exit.
const SETTLE: Duration = Duration::from_secs(120);
/// How long an outage lasts (storage-down, network-cut) when the run is long enough.
const OUTAGE: Duration = Duration::from_secs(30);
/// Between two kills in kill-api.
const KILL_EVERY: Duration = Duration::from_secs(4);
/// How long the API stays dead after each kill: connections are refused meanwhile.
const KILL_DOWN: Duration = Duration::from_secs(1);
const WORKFLOW: &str = "workflows/faults";

/// Line `n` of writer `tag`: "TAG 000000000000002a filler...\n", 64 bytes.
fn line(tag: &[u8; 3], n: u64) -> [u8; LINE as usize] {
    let mut l = [b' '; LINE as usize];
    l[..3].copy_from_slice(tag);
    for i in 0..16 {
        let nibble = ((n >> (60 - 4 * i)) & 0xf) as u8;
        l[4 + i] = if nibble < 10 {
            b'0' + nibble
        } else {
            b'a' + nibble - 10
        };
    }
    let from = (n % 26) as usize;
    l[21..63].copy_from_slice(&ALPHABET[from..from + 42]);
    l[63] = b'\n';
    l
}

/// Fills `buf` with what writer `tag` writes at `offset..offset + buf.len()`.
fn content(tag: &[u8; 3], offset: u64, buf: &mut [u8]) {
    let mut at = 0;
    let mut pos = offset;
    while at < buf.len() {
        let l = line(tag, pos / LINE);
        let col = (pos % LINE) as usize;
        let take = (l.len() - col).min(buf.len() - at);
        buf[at..at + take].copy_from_slice(&l[col..col + take]);
        at += take;
        pos += take as u64;
    }
}

fn tag_bytes(tag: &str) -> anyhow::Result<[u8; 3]> {
    tag.as_bytes()
        .try_into()
        .map_err(|_| anyhow!("a writer tag is 3 bytes, not {tag:?}"))
}

/// The writer (the `fault-writer` binary): `bytes` of [`content`] of writer `tag` on stdout at
/// `rate` bytes/s, in writes of 4 to 64 KiB, after moving into `cgroup` when given; then
/// "BYTES WALL_SECONDS LONGEST_WRITE_SECONDS" into `report`.
pub fn writer(
    tag: &str,
    bytes: u64,
    rate: u64,
    cgroup: Option<&Path>,
    report: &Path,
) -> anyhow::Result<()> {
    let tag = tag_bytes(tag)?;
    ensure!(rate > 0, "--rate must be positive");
    if let Some(dir) = cgroup {
        std::fs::write(
            dir.join("cgroup.procs"),
            format!("{}\n", std::process::id()),
        )
        .with_context(|| format!("cannot move into cgroup {}", dir.display()))?;
    }
    let stdout = std::io::stdout();
    let out = stdout.as_fd();
    let mut buf = vec![0u8; 64 << 10];
    let mut written = 0u64;
    let mut longest = Duration::ZERO;
    let start = Instant::now();
    while written < bytes {
        let due = ((start.elapsed().as_secs_f64() * rate as f64) as u64 + 4096).min(bytes);
        if due < written + 4096 && due < bytes {
            let wait = (written + 4096 - due) as f64 / rate as f64;
            std::thread::sleep(Duration::from_secs_f64(wait.max(0.001)));
            continue;
        }
        let n = (due - written).min(buf.len() as u64) as usize;
        content(&tag, written, &mut buf[..n]);
        let mut rest = &buf[..n];
        let t = Instant::now();
        while !rest.is_empty() {
            match nix::unistd::write(out, rest) {
                Ok(0) => bail!("stdout took no bytes"),
                Ok(k) => {
                    rest = &rest[k..];
                    written += k as u64;
                }
                Err(Errno::EINTR) => {}
                Err(e) => return Err(e).context("write to stdout"),
            }
        }
        longest = longest.max(t.elapsed());
    }
    let wall = start.elapsed().as_secs_f64();
    std::fs::write(
        report,
        format!("{written} {wall} {}\n", longest.as_secs_f64()),
    )
    .with_context(|| format!("cannot write {}", report.display()))?;
    Ok(())
}

/// The binaries a run uses.
#[derive(Debug, Clone)]
pub struct Bins {
    pub api: PathBuf,
    pub entrypoint: PathBuf,
    pub collector: PathBuf,
    /// The `fault-writer` binary of this crate.
    pub writer: PathBuf,
}

impl Bins {
    /// Release builds, made here unless `no_build` (then taken from target/release as they are);
    /// each one the environment names instead (`RELAY_METADATA_API_BIN`,
    /// `RELAY_ENTRYPOINT_STATIC`, `RELAY_COLLECTOR_BIN`) wins.
    pub fn release(no_build: bool, writer: PathBuf) -> anyhow::Result<Self> {
        let release = util::target_dir().join("release");
        let pick = |env: &str, name: &str, build: &dyn Fn() -> anyhow::Result<PathBuf>| {
            util::bin_from_env(env, || {
                if no_build {
                    Ok(release.join(name))
                } else {
                    build()
                }
            })
        };
        Ok(Self {
            api: pick("RELAY_METADATA_API_BIN", "metadata-api", &|| {
                util::build_metadata_api()
            })?,
            entrypoint: pick("RELAY_ENTRYPOINT_STATIC", "entrypoint", &|| {
                util::build_release("entrypoint")
            })?,
            collector: pick("RELAY_COLLECTOR_BIN", "collector", &util::build_collector)?,
            writer,
        })
    }
}

/// What one writer did.
#[derive(Debug, Clone)]
struct Written {
    tag: String,
    ebpf: bool,
    bytes: u64,
    wall: f64,
    longest_write: f64,
}

/// Accounting of one stream (or a sum of them), in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    /// What the writers wrote (their own count).
    pub produced: u64,
    /// Stored bytes that match what was written there.
    pub stored: u64,
    /// Covered by `dropped` markers and not stored.
    pub dropped: u64,
    /// Neither stored nor dropped: silent loss.
    pub unaccounted: u64,
    /// Stored bytes that differ from what was written there, or lie past its end.
    pub duplicated: u64,
    /// Dropped markers past what was produced (claimed losses of bytes never written).
    pub phantom_dropped: u64,
}

impl Tally {
    fn add(&mut self, o: &Self) {
        self.produced += o.produced;
        self.stored += o.stored;
        self.dropped += o.dropped;
        self.unaccounted += o.unaccounted;
        self.duplicated += o.duplicated;
        self.phantom_dropped += o.phantom_dropped;
    }

    /// Nothing unaccounted, duplicated or dropped past the end.
    pub fn clean(&self) -> bool {
        self.unaccounted == 0 && self.duplicated == 0 && self.phantom_dropped == 0
    }
}

/// A scenario's result.
#[derive(Debug)]
pub struct Outcome {
    /// The scenario's name, or the baseline's.
    pub name: String,
    /// The writers under the entrypoint, summed.
    pub entrypoint: Tally,
    /// The writers in the collector's cgroup, summed.
    pub ebpf: Tally,
    /// Slowest writer's wall time, seconds.
    pub wall: f64,
    /// Longest single write(2) of any writer, seconds.
    pub longest_write: f64,
    /// Entrypoints whose own count of dropped bytes differs from what their markers cover.
    pub mismatches: u32,
    /// What the fault did and what the accounting found, one line each.
    pub notes: Vec<String>,
}

impl Outcome {
    /// Both paths summed.
    pub fn total(&self) -> Tally {
        let mut t = self.entrypoint;
        t.add(&self.ebpf);
        t
    }

    /// Every byte stored or covered by a marker, none duplicated, and every entrypoint's own
    /// count of dropped bytes borne out by its markers.
    pub fn clean(&self) -> bool {
        self.total().clean() && self.mismatches == 0
    }
}

/// What the entrypoint's last words say it dropped of `TAG.stdout`: "(dropped, of)" from
/// "entrypoint: TAG.stdout: X of Y bytes dropped ...".
fn entrypoint_dropped(log: &str, tag: &str) -> Option<(u64, u64)> {
    let prefix = format!("entrypoint: {tag}.stdout: ");
    log.lines().find_map(|l| {
        let rest = l.strip_prefix(&prefix)?;
        let mut words = rest.split_whitespace();
        let dropped = words.next()?.parse().ok()?;
        let of = words.nth(1)?.parse().ok()?;
        (words.next() == Some("bytes") && words.next() == Some("dropped")).then_some((dropped, of))
    })
}

/// A free TCP port on loopback.
fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The metadata API of a run: restartable on the same address and storage.
struct Api {
    bin: PathBuf,
    /// Runs the API inside this network namespace.
    netns: Option<String>,
    addr: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    server: Option<Server>,
}

impl Api {
    fn command(&self) -> Command {
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&self.bin);
                c
            }
            None => Command::new(&self.bin),
        };
        cmd.arg("serve")
            .args(["--listen", &self.addr])
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        if std::env::var_os("RUST_LOG").is_none() {
            // Every refused request would be a line; errors still show.
            cmd.env("RUST_LOG", "error");
        }
        cmd
    }

    /// Starts it, retrying while its port is not free again yet.
    fn start(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match Server::spawn(self.command()) {
                Ok(s) => {
                    self.server = Some(s);
                    return Ok(());
                }
                Err(e) if Instant::now() > deadline => {
                    return Err(e).context("the metadata API did not start");
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// kill -9.
    fn kill9(&mut self) {
        if let Some(mut s) = self.server.take() {
            let _ = s.child.kill();
            let _ = s.child.wait();
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// The S3 emulator (moto) with a bucket; stopped with SIGSTOP to make storage fail.
struct Moto {
    child: Child,
    endpoint: String,
}

impl Moto {
    fn start(dir: &Path) -> anyhow::Result<Self> {
        let bin = util::cache_dir().join("venv/bin/moto_server");
        ensure!(
            bin.exists(),
            "{} is missing: `cargo xtask test` installs it",
            bin.display()
        );
        let port = free_port()?;
        let log = std::fs::File::create(dir.join("moto.log"))?;
        let child = Command::new(&bin)
            .args(["-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let this = Self {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            ensure!(Instant::now() < deadline, "moto did not start in 30 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        let r = Client::new()
            .put(format!("{}/relay-logs", this.endpoint))
            .send()?;
        ensure!(r.status().is_success(), "create bucket: {}", r.status());
        Ok(this)
    }

    fn signal(&self, sig: Signal) -> anyhow::Result<()> {
        kill(Pid::from_raw(i32::try_from(self.child.id())?), sig)?;
        Ok(())
    }

    fn env(&self) -> Vec<(String, String)> {
        testbed::emulators::moto_s3_env(&self.endpoint)
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.signal(Signal::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A network namespace joined to this one by a veth pair; removed on drop.
struct Netns {
    name: String,
    host_if: String,
    inner_if: String,
    inner_ip: String,
}

impl Netns {
    fn create() -> anyhow::Result<Self> {
        let id = std::process::id() % 10_000;
        let this = Self {
            name: format!("relay-faults-{id}"),
            host_if: format!("rfh{id}"),
            inner_if: format!("rfn{id}"),
            inner_ip: "10.213.77.2".to_owned(),
        };
        let ip = |args: &[&str]| util::run(Command::new("ip").args(args));
        ip(&["netns", "add", &this.name])?;
        ip(&[
            "link",
            "add",
            &this.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &this.inner_if,
        ])?;
        ip(&["link", "set", &this.inner_if, "netns", &this.name])?;
        ip(&["addr", "add", "10.213.77.1/30", "dev", &this.host_if])?;
        ip(&["link", "set", &this.host_if, "up"])?;
        this.exec(&["ip", "addr", "add", "10.213.77.2/30", "dev", &this.inner_if])?;
        this.exec(&["ip", "link", "set", &this.inner_if, "up"])?;
        this.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(this)
    }

    fn exec(&self, args: &[&str]) -> anyhow::Result<()> {
        util::run(
            Command::new("ip")
                .args(["netns", "exec", &self.name])
                .args(args),
        )
    }

    /// Takes the namespace's side of the link down (`up` false) or up: packets to the API go
    /// nowhere, connections hang rather than being refused.
    fn link(&self, up: bool) -> anyhow::Result<()> {
        self.exec(&[
            "ip",
            "link",
            "set",
            &self.inner_if,
            if up { "up" } else { "down" },
        ])
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A writer process and how its result is collected.
struct Running {
    tag: String,
    ebpf: bool,
    child: Child,
    report: PathBuf,
    /// Drains and counts the stdout of a plain (collector-path) writer.
    drain: Option<JoinHandle<std::io::Result<u64>>>,
}

/// Everything a scenario run sets up.
struct Run {
    api: Api,
    /// Field order: the collector stops before its cgroup is removed.
    collector: Option<Collector>,
    cgroup: Cgroup,
    collector_token: PathBuf,
    collector_log: PathBuf,
    write_token: PathBuf,
    ebpf_ctx: String,
    http: Client,
    /// The collector's pins (after it: unmounted once it stopped).
    pins: BpfFs,
    /// Last: removed after the processes using it are gone.
    scratch: Scratch,
}

/// A BPF filesystem of the run's own for the collector's pins (`--pin-dir`): each mount is a
/// separate instance, and unmounting it detaches the programs the collector left behind.
struct BpfFs {
    mount: PathBuf,
}

impl BpfFs {
    fn mount(at: PathBuf) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&at)?;
        util::run(Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&at))
            .context("mounting a BPF filesystem for the collector's pins")?;
        Ok(Self { mount: at })
    }

    fn pin_dir(&self) -> String {
        self.mount.join("relay-collector").display().to_string()
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mount).status();
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        self.collector = None;
        self.api.kill9();
    }
}

/// A run's directory, removed on drop unless kept (also when the run fails to start).
struct Scratch {
    dir: PathBuf,
    keep: bool,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// How a scenario's run is set up.
struct Setup {
    api_args: Vec<String>,
    env: Vec<(String, String)>,
    storage: Option<String>,
    netns: Option<String>,
    addr: Option<String>,
}

impl Run {
    fn start(bins: &Bins, keep: bool, label: &str, setup: Setup) -> anyhow::Result<Self> {
        let cgroot = util::cgroup2_root().context("no cgroup v2 hierarchy mounted")?;
        let n = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis();
        let dir = util::target_dir().join(format!("faults/{label}-{n}"));
        std::fs::create_dir_all(&dir)?;
        let scratch = Scratch {
            dir: dir.clone(),
            keep,
        };
        let key = dir.join("key");
        let storage = setup
            .storage
            .unwrap_or_else(|| format!("file://{}", dir.join("streams").display()));
        let addr = match setup.addr {
            Some(a) => a,
            None => format!("127.0.0.1:{}", free_port()?),
        };
        let mut args = vec![
            "--storage".to_owned(),
            storage,
            "--key-file".to_owned(),
            key.display().to_string(),
        ];
        args.extend(setup.api_args);
        let mut api = Api {
            bin: bins.api.clone(),
            netns: setup.netns,
            addr,
            args,
            env: setup.env,
            server: None,
        };
        api.start()?;
        let run_id = format!("{label}-{n}");
        let step = format!("{WORKFLOW}/runs/{run_id}/steps/entrypoint");
        let ebpf_ctx = format!("{WORKFLOW}/runs/{run_id}/steps/ebpf");
        let write_token = dir.join("write.token");
        std::fs::write(&write_token, util::token(&bins.api, &key, &step, "write")?)?;
        let collector_token = dir.join("collector.token");
        std::fs::write(
            &collector_token,
            util::token(&bins.api, &key, "workflows", "collector")?,
        )?;
        let cgroup = Cgroup::create(cgroot.join(format!("relay-faults-{}", std::process::id())))?;
        let pins = BpfFs::mount(dir.join("bpffs"))?;
        let mut this = Self {
            api,
            collector: None,
            cgroup,
            collector_token,
            collector_log: dir.join("collector.log"),
            write_token,
            ebpf_ctx,
            http: Client::builder().timeout(Duration::from_secs(60)).build()?,
            pins,
            scratch,
        };
        this.start_collector(&bins.collector, "collector.log")?;
        Ok(this)
    }

    fn start_collector(&mut self, bin: &Path, log: &str) -> anyhow::Result<()> {
        self.collector_log = self.scratch.dir.join(log);
        self.collector = Some(Collector::start(
            bin,
            &self.api.url(),
            &self.collector_token,
            &[(self.cgroup.path.as_path(), self.ebpf_ctx.as_str())],
            &["--pin-dir", &self.pins.pin_dir()],
            &self.collector_log,
            Duration::from_secs(60),
        )?);
        Ok(())
    }

    /// Starts writer `i` of `count`, writing `bytes` at `rate` bytes/s.
    fn spawn_writer(&self, bins: &Bins, i: u32, bytes: u64, rate: u64) -> anyhow::Result<Running> {
        let tag = format!("w{i:02}");
        let ebpf = i % 2 == 1;
        let report = self.scratch.dir.join(format!("{tag}.report"));
        let log = std::fs::File::create(self.scratch.dir.join(format!("{tag}.log")))?;
        let writer_args = [
            "--tag".to_owned(),
            tag.clone(),
            "--bytes".to_owned(),
            bytes.to_string(),
            "--rate".to_owned(),
            rate.to_string(),
            "--report".to_owned(),
            report.display().to_string(),
        ];
        if ebpf {
            let cg = self.cgroup.path.join(&tag);
            std::fs::create_dir_all(&cg)?;
            let mut child = Command::new(&bins.writer)
                .args(writer_args)
                .arg("--cgroup")
                .arg(&cg)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(log)
                .spawn()
                .context("cannot start a writer")?;
            let mut out = child.stdout.take().context("no writer stdout")?;
            let drain = std::thread::spawn(move || {
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
            Ok(Running {
                tag,
                ebpf,
                child,
                report,
                drain: Some(drain),
            })
        } else {
            let child = Command::new(&bins.entrypoint)
                .args(["--url", &self.api.url()])
                .arg("--token-file")
                .arg(&self.write_token)
                .args(["--stdout-stream", &format!("{tag}.stdout")])
                .args(["--stderr-stream", &format!("{tag}.stderr")])
                .arg("--")
                .arg(&bins.writer)
                .args(writer_args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .context("cannot start the entrypoint")?;
            Ok(Running {
                tag,
                ebpf,
                child,
                report,
                drain: None,
            })
        }
    }

    /// The id and token of a writer's stream, generation `generation` (`wNN.stdout`, then
    /// `wNN.stdout.1`, ...: what a restarted writer continues in once a stream is complete).
    fn stream_of(&self, w: &Written, generation: u32) -> anyhow::Result<(String, String)> {
        let mut name = format!("{}.stdout", w.tag);
        if generation > 0 {
            name = format!("{name}.{generation}");
        }
        let (token_file, body) = if w.ebpf {
            (
                &self.collector_token,
                json!({"name": name, "source": "ebpf", "context": self.ebpf_ctx}),
            )
        } else {
            (&self.write_token, json!({"name": name}))
        };
        let token = std::fs::read_to_string(token_file)?.trim().to_owned();
        let r = self
            .http
            .post(format!("{}/logs", self.api.url()))
            .bearer_auth(&token)
            .json(&body)
            .send()?;
        ensure!(r.status().is_success(), "create {name}: {}", r.status());
        let v: Value = r.json()?;
        let id = v["id"].as_str().context("no stream id")?.to_owned();
        Ok((id, token))
    }

    fn status(&self, id: &str, token: &str) -> anyhow::Result<Value> {
        let r = self
            .http
            .get(format!("{}/logs/{id}", self.api.url()))
            .bearer_auth(token)
            .send()?;
        ensure!(r.status().is_success(), "status of {id}: {}", r.status());
        Ok(r.json()?)
    }

    /// The running collector's pid: the process whose command line names this run's collector
    /// token file.
    fn collector_pid(&self) -> anyhow::Result<Pid> {
        let needle = self.collector_token.display().to_string();
        for entry in std::fs::read_dir("/proc")?.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains("--token-file") && cmdline.contains(&needle) {
                return Ok(Pid::from_raw(pid));
            }
        }
        bail!("no collector process found")
    }

    /// After an outage: how long until every writer's stream stores bytes written after it
    /// (offsets past where the writer was when the outage ended), waiting until `until` at most.
    fn recovery(
        &self,
        writers: u32,
        rate: u64,
        start: Instant,
        until: Instant,
    ) -> anyhow::Result<String> {
        let restored = Instant::now();
        let position = (restored - start).as_secs_f64() * rate as f64;
        // Requests may fail for a moment yet (a neighbour entry to re-resolve): such a stream
        // counts as behind and is asked again.
        let fresh = |i: u32| -> anyhow::Result<bool> {
            let w = Written {
                tag: format!("w{i:02}"),
                ebpf: i % 2 == 1,
                bytes: 0,
                wall: 0.0,
                longest_write: 0.0,
            };
            let (id, token) = self.stream_of(&w, 0)?;
            let st = self.status(&id, &token)?;
            let end = st["stored"]
                .as_array()
                .and_then(|a| a.last())
                .and_then(|s| s["end"].as_u64())
                .unwrap_or(0);
            Ok(end as f64 >= position)
        };
        let mut behind: Vec<u32> = (0..writers).collect();
        while Instant::now() < until {
            behind.retain(|&i| !fresh(i).unwrap_or(false));
            if behind.is_empty() {
                return Ok(format!(
                    "every stream stored fresh bytes again {:.1} s after",
                    restored.elapsed().as_secs_f64()
                ));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        Ok(format!(
            "{} of {writers} streams stored no fresh bytes in the {:.0} s left of the run",
            behind.len(),
            (until - restored).as_secs_f64()
        ))
    }

    /// Waits until every writer's stream is complete (or [`SETTLE`] passes), then accounts for
    /// each.
    fn account(&self, written: &[Written], notes: &mut Vec<String>) -> anyhow::Result<Vec<Tally>> {
        let ids = written
            .iter()
            .map(|w| self.stream_of(w, 0))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let deadline = Instant::now() + SETTLE;
        loop {
            let mut open = Vec::new();
            for (w, (id, token)) in written.iter().zip(&ids) {
                let st = self.status(id, token)?;
                if st["complete"] != true {
                    open.push(w.tag.clone());
                }
            }
            if open.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                notes.push(format!(
                    "streams not complete after {} s: {}",
                    SETTLE.as_secs(),
                    open.join(" ")
                ));
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        let mut tallies = Vec::new();
        for (w, (id, token)) in written.iter().zip(&ids) {
            let path = if w.ebpf { "ebpf" } else { "entrypoint" };
            let first = self.coverage(w, id, token, 0)?;
            let mut parts = vec![first];
            // Later generations, while bytes are missing: where each begins in the writer's
            // output is read from its first whole line.
            let mut generation = 1;
            while generation <= 5 && tally_of(w.bytes, &parts).unaccounted > 0 {
                let (id, token) = self.stream_of(w, generation)?;
                let st = self.status(&id, &token)?;
                if st["end"].as_u64().unwrap_or(0) == 0 {
                    break;
                }
                match self.shift_of(&id, &token, &st)? {
                    Some(shift) => {
                        notes.push(format!(
                            "{} ({path}): generation {generation} ({}.stdout.{generation}) \
                             begins at writer offset {shift}",
                            w.tag, w.tag
                        ));
                        parts.push(self.coverage(w, &id, &token, shift)?);
                    }
                    None => notes.push(format!(
                        "{} ({path}): generation {generation} has no recognisable line",
                        w.tag
                    )),
                }
                generation += 1;
            }
            let t = tally_of(w.bytes, &parts);
            if !t.clean() {
                let st = self.status(id, token)?;
                let gaps = complement(
                    &union(
                        parts
                            .iter()
                            .flat_map(|c| c.good.iter().chain(&c.dropped).copied())
                            .collect(),
                    ),
                    w.bytes,
                );
                let shown: Vec<String> = gaps
                    .iter()
                    .take(4)
                    .map(|(a, b)| format!("{a}..{b}"))
                    .collect();
                notes.push(format!(
                    "{} ({path}): produced {} stored {} dropped {} unaccounted {} (at {}{}) \
                     duplicated {} phantom dropped {}; {}.stdout length {} final {} dropped {} \
                     pending {}",
                    w.tag,
                    t.produced,
                    t.stored,
                    t.dropped,
                    t.unaccounted,
                    shown.join(" "),
                    if gaps.len() > 4 { " ..." } else { "" },
                    t.duplicated,
                    t.phantom_dropped,
                    w.tag,
                    st["length"],
                    st["final_length"],
                    st["dropped"],
                    st["pending"],
                ));
            }
            tallies.push(t);
        }
        Ok(tallies)
    }

    /// Where in its writer's output a later generation begins: from the line number of its
    /// first whole line. `None` when no line is recognisable.
    fn shift_of(&self, id: &str, token: &str, st: &Value) -> anyhow::Result<Option<u64>> {
        let Some(first) = st["stored"]
            .as_array()
            .and_then(|a| a.first())
            .and_then(|s| s["start"].as_u64())
        else {
            return Ok(None);
        };
        let r = self
            .http
            .get(format!("{}/logs/{id}/data", self.api.url()))
            .bearer_auth(token)
            .header("Range", format!("bytes={first}-{}", first + 2 * LINE - 1))
            .send()?;
        if !r.status().is_success() {
            return Ok(None);
        }
        let head = r.bytes()?;
        let Some(nl) = head.iter().position(|&b| b == b'\n') else {
            return Ok(None);
        };
        let at = nl + 1;
        let number = head
            .get(at + 4..at + 20)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u64::from_str_radix(h, 16).ok());
        Ok(number.and_then(|n| (n * LINE).checked_sub(first + at as u64)))
    }

    /// Compares a stream position by position with what its writer produced, the stream's
    /// offset 0 being the writer's offset `shift`.
    fn coverage(&self, w: &Written, id: &str, token: &str, shift: u64) -> anyhow::Result<Coverage> {
        let st = self.status(id, token)?;
        let spans = |key: &str| -> Vec<(u64, u64)> {
            st[key]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| Some((s["start"].as_u64()?, s["end"].as_u64()?)))
                        .collect()
                })
                .unwrap_or_default()
        };
        let mut stored = spans("stored");
        stored.sort_unstable();
        let length = st["length"].as_u64().unwrap_or(0);
        let p = w.bytes;
        let tag = tag_bytes(&w.tag)?;
        let mut c = Coverage::default();
        let r = self
            .http
            .get(format!("{}/logs/{id}/data", self.api.url()))
            .bearer_auth(token)
            .send()?;
        ensure!(r.status().is_success(), "data of {id}: {}", r.status());
        let mut body = BufReader::with_capacity(1 << 20, r);
        let mut got = vec![0u8; 1 << 20];
        let mut want = vec![0u8; 1 << 20];
        for &(a, b) in &stored {
            // A plain read stops at `length`: bytes stored past a pending gap are not read here
            // (and the gap itself is unaccounted).
            let readable_end = b.min(length);
            let mut pos = a;
            while pos < readable_end {
                let n = ((readable_end - pos) as usize).min(got.len());
                body.read_exact(&mut got[..n])
                    .with_context(|| format!("reading {} at {pos}", w.tag))?;
                let at = pos + shift;
                let in_range = (p.saturating_sub(at) as usize).min(n);
                content(&tag, at, &mut want[..in_range]);
                if got[..in_range] == want[..in_range] {
                    push_span(&mut c.good, at, at + in_range as u64);
                } else {
                    // Line by line (the writer's lines): bytes that only match by chance (the
                    // same letter at a shifted offset) do not count as stored.
                    let mut k = 0;
                    while k < in_range {
                        let line_end = ((at + k as u64) / LINE + 1) * LINE;
                        let next = ((line_end - at) as usize).min(in_range);
                        if got[k..next] == want[k..next] {
                            push_span(&mut c.good, at + k as u64, at + next as u64);
                        } else {
                            c.duplicated += (next - k) as u64;
                        }
                        k = next;
                    }
                }
                c.duplicated += (n - in_range) as u64;
                pos += n as u64;
            }
            // Stored but not readable in order: only those past what was produced count here.
            if b > readable_end {
                c.duplicated += (b + shift).max(p) - (readable_end + shift).max(p);
            }
        }
        for (a, b) in spans("dropped") {
            let (a, b) = (a + shift, b + shift);
            if a < p {
                c.dropped.push((a, b.min(p)));
            }
            c.phantom += b.saturating_sub(a.max(p));
        }
        if let Some(f) = st["final_length"].as_u64() {
            c.duplicated += (f + shift).saturating_sub(p);
        }
        Ok(c)
    }
}

/// What one stream (generation) of a writer covers, in the writer's offsets.
#[derive(Debug, Default)]
struct Coverage {
    /// Stored bytes that match what was written there (sorted, disjoint).
    good: Vec<(u64, u64)>,
    /// Dropped ranges below what was produced.
    dropped: Vec<(u64, u64)>,
    /// Stored bytes that differ from what was written, or lie past it.
    duplicated: u64,
    /// Dropped bytes past what was produced.
    phantom: u64,
}

/// A writer's accounting from the streams that carry its output.
fn tally_of(produced: u64, parts: &[Coverage]) -> Tally {
    let good = union(parts.iter().flat_map(|c| c.good.iter().copied()).collect());
    let covered = union(
        parts
            .iter()
            .flat_map(|c| c.good.iter().chain(&c.dropped).copied())
            .collect(),
    );
    let stored = measure(&good);
    let covered = measure(&covered);
    // Bytes stored twice (in two generations) count as duplicated.
    let stored_twice: u64 = parts
        .iter()
        .map(|c| measure(&c.good))
        .sum::<u64>()
        .saturating_sub(stored);
    Tally {
        produced,
        stored,
        dropped: covered - stored,
        unaccounted: produced.saturating_sub(covered),
        duplicated: parts.iter().map(|c| c.duplicated).sum::<u64>() + stored_twice,
        phantom_dropped: parts.iter().map(|c| c.phantom).sum(),
    }
}

/// Sorted, merged spans.
fn union(mut spans: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    spans.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (a, b) in spans {
        match out.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ if a < b => out.push((a, b)),
            _ => {}
        }
    }
    out
}

fn measure(spans: &[(u64, u64)]) -> u64 {
    spans.iter().map(|(a, b)| b - a).sum()
}

/// The parts of `0..end` that sorted, merged `spans` do not cover.
fn complement(spans: &[(u64, u64)], end: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut at = 0;
    for &(a, b) in spans {
        if a > at {
            out.push((at, a.min(end)));
        }
        at = at.max(b);
        if at >= end {
            break;
        }
    }
    if at < end {
        out.push((at, end));
    }
    out.retain(|(a, b)| a < b);
    out
}

/// Appends `a..b` to sorted, disjoint `spans`, merging with the last one when adjacent.
fn push_span(spans: &mut Vec<(u64, u64)>, a: u64, b: u64) {
    if a == b {
        return;
    }
    match spans.last_mut() {
        Some(last) if last.1 == a => last.1 = b,
        _ => spans.push((a, b)),
    }
}

/// Waits for every writer; returns what each wrote.
fn collect_writers(running: Vec<Running>, deadline: Instant) -> anyhow::Result<Vec<Written>> {
    let mut out = Vec::new();
    for mut r in running {
        let status = loop {
            if let Some(s) = r.child.try_wait()? {
                break s;
            }
            if Instant::now() > deadline {
                let _ = r.child.kill();
                bail!("writer {} did not finish in time", r.tag);
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let text = std::fs::read_to_string(&r.report)
            .with_context(|| format!("writer {} left no report ({status})", r.tag))?;
        let v: Vec<f64> = text
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()
            .with_context(|| format!("bad writer report {text:?}"))?;
        let [bytes, wall, longest] = v[..] else {
            bail!("bad writer report {text:?}");
        };
        let bytes = bytes as u64;
        if let Some(d) = r.drain.take() {
            let read = d.join().map_err(|_| anyhow!("a drain thread panicked"))??;
            ensure!(
                read == bytes,
                "writer {} wrote {bytes} bytes, its pipe carried {read}",
                r.tag
            );
        }
        if !status.success() {
            eprintln!("writer {} exited {status}", r.tag);
        }
        out.push(Written {
            tag: r.tag,
            ebpf: r.ebpf,
            bytes,
            wall,
            longest_write: longest,
        });
    }
    Ok(out)
}

/// What a scenario does to the system while the writers write, from `start` for `seconds`.
fn inject(
    scenario: Option<Scenario>,
    run: &mut Run,
    bins: &Bins,
    (moto, netns): (Option<&Moto>, Option<&Netns>),
    (start, seconds, writers, rate): (Instant, u64, u32, u64),
    notes: &mut Vec<String>,
) -> anyhow::Result<()> {
    let total = Duration::from_secs(seconds);
    let outage = OUTAGE.min(total / 2);
    // The outage sits in the middle of the run.
    let outage_at = (total - outage) / 2;
    let wait_until = |t: Duration| {
        if let Some(d) = (start + t).checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
    };
    match scenario {
        None | Some(Scenario::ThrottleStorm) => {}
        Some(Scenario::KillApi) => {
            // Kills until a few seconds before the end, so the writers' last bytes meet an API.
            let stop = total.saturating_sub(Duration::from_secs(5));
            let mut kills = 0;
            let mut down = Duration::ZERO;
            let mut at = Duration::from_secs(2);
            while at < stop {
                wait_until(at);
                let t = Instant::now();
                run.api.kill9();
                std::thread::sleep(KILL_DOWN);
                run.api.start()?;
                down += t.elapsed();
                kills += 1;
                at += KILL_EVERY;
            }
            notes.push(format!(
                "API killed -9 and restarted {kills} times, down {:.0} ms each on average",
                down.as_secs_f64() * 1000.0 / f64::from(kills.max(1))
            ));
        }
        Some(Scenario::CollectorRestart) => {
            wait_until(total / 2);
            let t = Instant::now();
            run.collector = None;
            let stopped = t.elapsed();
            run.start_collector(&bins.collector, "collector-2.log")?;
            notes.push(format!(
                "collector stopped (SIGTERM) in {:.1} s and ready again {:.1} s later",
                stopped.as_secs_f64(),
                (t.elapsed() - stopped).as_secs_f64()
            ));
        }
        Some(Scenario::CollectorKill) => {
            wait_until(total / 2);
            let t = Instant::now();
            let pid = run.collector_pid()?;
            kill(pid, Signal::SIGKILL)?;
            // Reaps it (it is our child).
            run.collector = None;
            run.start_collector(&bins.collector, "collector-2.log")?;
            notes.push(format!(
                "collector killed (SIGKILL) and ready again {:.1} s later",
                t.elapsed().as_secs_f64()
            ));
        }
        Some(Scenario::StorageDown) => {
            let moto = moto.context("storage-down without moto")?;
            wait_until(outage_at);
            moto.signal(Signal::SIGSTOP)?;
            wait_until(outage_at + outage);
            moto.signal(Signal::SIGCONT)?;
            let back = run.recovery(writers, rate, start, start + total)?;
            notes.push(format!(
                "S3 emulator stopped (SIGSTOP) from {} s to {} s; {back}",
                outage_at.as_secs(),
                (outage_at + outage).as_secs()
            ));
        }
        Some(Scenario::NetworkCut) => {
            let ns = netns.context("network-cut without a netns")?;
            wait_until(outage_at);
            ns.link(false)?;
            wait_until(outage_at + outage);
            ns.link(true)?;
            let back = run.recovery(writers, rate, start, start + total)?;
            notes.push(format!(
                "API's link down from {} s to {} s; {back}",
                outage_at.as_secs(),
                (outage_at + outage).as_secs()
            ));
        }
    }
    Ok(())
}

/// One run: a scenario (`None`: no fault) with `options.writers` writers at `options.rate_mb`
/// MB/s in total for `seconds`, on the S3 emulator when `s3` (else on file storage). Fails when
/// the run cannot be set up or measured; what the fault did to the bytes is in the outcome.
pub fn run_scenario(
    bins: &Bins,
    options: &Options,
    scenario: Option<Scenario>,
    s3: bool,
    seconds: u64,
) -> anyhow::Result<Outcome> {
    ensure!(
        util::is_root(),
        "the fault scenarios need root (cgroups, eBPF, netns)"
    );
    ensure!(
        options.writers >= 2,
        "at least 2 writers are needed (one per path)"
    );
    let label = match (scenario, s3) {
        (Some(s), _) => s.name(),
        (None, true) => "baseline (s3)",
        (None, false) => "baseline",
    };
    let moto = if s3 {
        let dir = util::target_dir().join("faults");
        std::fs::create_dir_all(&dir)?;
        Some(Moto::start(&dir)?)
    } else {
        None
    };
    let netns = match scenario {
        Some(Scenario::NetworkCut) => Some(Netns::create()?),
        _ => None,
    };
    let mut setup = Setup {
        api_args: Vec::new(),
        env: Vec::new(),
        storage: None,
        netns: None,
        addr: None,
    };
    if let Some(m) = &moto {
        setup.storage = Some("s3://relay-logs/faults".to_owned());
        setup.env = m.env();
    }
    if let Some(ns) = &netns {
        setup.netns = Some(ns.name.clone());
        setup.addr = Some(format!("{}:7070", ns.inner_ip));
    }
    if scenario == Some(Scenario::ThrottleStorm) {
        // A quarter of the writers' pace gets through: the rest is refused with 429.
        let per_stream =
            (options.rate_mb * 1_000_000 / 4 / u64::from(options.writers.max(1))).max(1);
        let global = (options.rate_mb * 1_000_000 / 4).max(1);
        setup.api_args = vec![
            "--stream-rate".to_owned(),
            per_stream.to_string(),
            "--global-rate".to_owned(),
            global.to_string(),
        ];
    }
    let mut run = Run::start(bins, options.keep, &label.replace(" (s3)", "-s3"), setup)?;
    let mut notes = Vec::new();
    let rate = (options.rate_mb * 1_000_000 / u64::from(options.writers.max(1))).max(1);
    let bytes = rate * seconds;
    eprintln!(
        "{label}: {} writers x {bytes} bytes at {rate} B/s for {seconds} s",
        options.writers
    );
    let start = Instant::now();
    let mut running = Vec::new();
    for i in 0..options.writers {
        running.push(run.spawn_writer(bins, i, bytes, rate)?);
    }
    inject(
        scenario,
        &mut run,
        bins,
        (moto.as_ref(), netns.as_ref()),
        (start, seconds, options.writers, rate),
        &mut notes,
    )?;
    let written = collect_writers(running, start + Duration::from_secs(seconds * 3 + 60))?;
    let tallies = run.account(&written, &mut notes)?;
    let log = std::fs::read_to_string(&run.collector_log).unwrap_or_default();
    for l in log
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .take(5)
    {
        notes.push(format!("collector: {}", l.trim()));
    }
    let mut mismatches = 0;
    let mut confirmed = 0;
    let mut overstated = 0;
    for (w, t) in written.iter().zip(&tallies) {
        let log = std::fs::read_to_string(run.scratch.dir.join(format!("{}.log", w.tag)))
            .unwrap_or_default();
        if w.ebpf {
            continue;
        }
        // The entrypoint's own count of what it dropped against what the markers cover where
        // nothing is stored. It may count more: a batch whose request it gave up on (and then
        // marked dropped) that the API stored all the same; the status shows such bytes as
        // stored, so they are not lost. Counting less, or another total, is a mismatch.
        let said = entrypoint_dropped(&log, &w.tag);
        let marked = t.dropped;
        match said {
            Some((d, of)) if of == t.produced && d == marked && d > 0 => {
                confirmed += 1;
                continue;
            }
            Some((d, of)) if of == t.produced && d > marked => {
                overstated += d - marked;
                continue;
            }
            None if marked == 0 => continue,
            _ => {}
        }
        mismatches += 1;
        notes.push(format!(
            "{}: the entrypoint says {said:?} (dropped, of) but its markers cover {marked} of {}",
            w.tag, t.produced
        ));
    }
    if confirmed > 0 {
        notes.push(format!(
            "the entrypoints' own counts of dropped bytes equal what their markers cover \
             ({confirmed} streams with drops)"
        ));
    }
    if overstated > 0 {
        notes.push(format!(
            "the entrypoints say they dropped {overstated} bytes more than were lost: batches \
             whose requests they gave up on and marked dropped, stored by the API all the same"
        ));
    }
    let mut entrypoint = Tally::default();
    let mut ebpf = Tally::default();
    for (w, t) in written.iter().zip(&tallies) {
        if w.ebpf {
            ebpf.add(t);
        } else {
            entrypoint.add(t);
        }
    }
    Ok(Outcome {
        name: label.to_owned(),
        entrypoint,
        ebpf,
        mismatches,
        wall: written.iter().map(|w| w.wall).fold(0.0, f64::max),
        longest_write: written.iter().map(|w| w.longest_write).fold(0.0, f64::max),
        notes,
    })
}

fn mb(b: u64) -> f64 {
    b as f64 / 1e6
}

fn header() {
    println!(
        "{:<18} {:>11} {:>9} {:>10} {:>14} {:>13} {:>10}  verdict",
        "scenario",
        "produced MB",
        "stored MB",
        "dropped MB",
        "unaccounted B",
        "duplicated B",
        "wall ratio"
    );
}

fn row(name: &str, t: &Tally, ratio: Option<f64>, verdict: &str) {
    println!(
        "{:<18} {:>11.1} {:>9.1} {:>10.1} {:>14} {:>13} {:>10}  {verdict}",
        name,
        mb(t.produced),
        mb(t.stored),
        mb(t.dropped),
        t.unaccounted,
        t.duplicated + t.phantom_dropped,
        ratio.map_or("-".to_owned(), |r| format!("{r:.3}")),
    );
}

/// Runs `scenarios` (each for `seconds`, else its default), each after a baseline without faults
/// of the same length and storage (unless `no_baseline`: then the writers' pace is the
/// reference), printing the table after each. Fails when bytes were lost without a marker or
/// duplicated in any run.
pub fn run_all(
    bins: &Bins,
    options: &Options,
    scenarios: &[Scenario],
    seconds: Option<u64>,
    no_baseline: bool,
) -> anyhow::Result<()> {
    let mut baselines: HashMap<(u64, bool), f64> = HashMap::new();
    let mut outcomes = Vec::new();
    let mut failed = false;
    for &s in scenarios {
        let seconds = seconds.unwrap_or_else(|| s.default_seconds());
        // storage-down runs on the S3 emulator: so does its baseline.
        let s3 = s == Scenario::StorageDown;
        let reference = if no_baseline {
            seconds as f64
        } else if let Some(w) = baselines.get(&(seconds, s3)) {
            *w
        } else {
            let b = run_scenario(bins, options, None, s3, seconds)?;
            let ok = b.clean();
            failed |= !ok;
            baselines.insert((seconds, s3), b.wall);
            let wall = b.wall;
            outcomes.push((b, None));
            wall
        };
        let o = run_scenario(bins, options, Some(s), s3, seconds)?;
        let ratio = o.wall / reference;
        failed |= !o.clean();
        outcomes.push((o, Some(ratio)));
        print_table(&outcomes, options.rate_mb, options.writers);
    }
    if failed {
        bail!("bytes were lost without a marker or duplicated");
    }
    Ok(())
}

/// Prints `outcomes` (each with its wall time against its reference, when there is one) as a
/// table, with their notes.
pub fn print_table(outcomes: &[(Outcome, Option<f64>)], rate_mb: u64, writers: u32) {
    println!();
    println!("{writers} writers at {rate_mb} MB/s in total (half entrypoint, half collector)");
    header();
    for (o, ratio) in outcomes {
        let t = o.total();
        let verdict = if !o.clean() {
            "FAIL"
        } else if ratio.is_some_and(|r| r > 1.1) {
            "ok (slow)"
        } else {
            "ok"
        };
        row(&o.name, &t, *ratio, verdict);
        for (path, t) in [("  entrypoint", &o.entrypoint), ("  ebpf", &o.ebpf)] {
            row(path, t, None, if t.clean() { "" } else { "FAIL" });
        }
        println!(
            "  slowest writer {:.2} s, longest write(2) {:.3} s",
            o.wall, o.longest_write
        );
        for n in &o.notes {
            println!("  {n}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_is_lines_numbered_by_offset() {
        let mut all = vec![0u8; 3 * LINE as usize];
        content(b"w07", 0, &mut all);
        assert_eq!(
            &all[..64],
            &b"w07 0000000000000000 abcdefghijklmnopqrstuvwxyzabcdefghijklmnop\n"[..]
        );
        assert_eq!(&all[64..85], b"w07 0000000000000001 ");
        // Any window equals the same bytes of the whole.
        let mut part = vec![0u8; 100];
        content(b"w07", 37, &mut part);
        assert_eq!(part, all[37..137]);
        let mut other = vec![0u8; 100];
        content(b"w08", 37, &mut other);
        assert_ne!(part, other);
    }

    #[test]
    fn tally_counts_gaps_drops_and_duplicates() {
        let a = Coverage {
            good: vec![(0, 100), (150, 200)],
            dropped: vec![(100, 120)],
            duplicated: 3,
            phantom: 0,
        };
        let t = tally_of(300, &[a]);
        assert_eq!(
            (t.stored, t.dropped, t.unaccounted, t.duplicated),
            (150, 20, 130, 3)
        );
        assert!(!t.clean());
        // A later generation covering the rest, overlapping 10 stored bytes.
        let b = Coverage {
            good: vec![(190, 300)],
            dropped: vec![(120, 150)],
            ..Coverage::default()
        };
        let a = Coverage {
            good: vec![(0, 100), (150, 200)],
            dropped: vec![(100, 120)],
            ..Coverage::default()
        };
        let t = tally_of(300, &[a, b]);
        assert_eq!(
            (t.stored, t.dropped, t.unaccounted, t.duplicated),
            (250, 50, 0, 10)
        );
        assert_eq!(
            complement(&[(0, 100), (150, 200)], 300),
            [(100, 150), (200, 300)]
        );
        assert_eq!(complement(&[(0, 300)], 300), []);
        // A marker over bytes that were stored all the same.
        let c = Coverage {
            good: vec![(0, 100)],
            dropped: vec![(50, 150)],
            ..Coverage::default()
        };
        let t = tally_of(150, &[c]);
        assert_eq!((t.stored, t.dropped, t.unaccounted), (100, 50, 0));
        assert!(t.clean());
    }

    #[test]
    fn reads_the_entrypoints_count_of_dropped_bytes() {
        let log = "entrypoint: w00.stdout: 456000739 of 600000000 bytes dropped (reported to the \
                   metadata API)\n";
        assert_eq!(
            entrypoint_dropped(log, "w00"),
            Some((456_000_739, 600_000_000))
        );
        assert_eq!(entrypoint_dropped(log, "w02"), None);
        assert_eq!(entrypoint_dropped("", "w00"), None);
    }
}

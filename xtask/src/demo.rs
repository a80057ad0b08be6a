//! `cargo xtask demo`: the product on this machine, no cluster. The metadata API on local file
//! storage; the write API by hand (two parts out of order, one gzip); a sample workload run under
//! the real entrypoint inside a cgroup the real collector watches (as root; otherwise the
//! entrypoint path only, and one line saying why); both paths' streams read back through the
//! consumer API; the capture report; the step's logs through `kubectl relay` (the kubectl plugin,
//! run once); where the data is and how to follow a stream with curl or the plugin.
//!
//! Fails (after printing everything) when a stream read back is not what the workload wrote, a
//! path does not complete in time, or the capture report disagrees while both paths ran.
//!
//! Binaries: `RELAY_METADATA_API_BIN`, `RELAY_ENTRYPOINT_STATIC`, `RELAY_COLLECTOR_BIN` and
//! `RELAY_KUBECTL_RELAY_BIN` when set (as `cargo xtask test` sets them for its tests), else
//! release builds.

use std::{
    io::Write,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use reqwest::blocking::Client;
use serde_json::Value;

use crate::util::{self, Cgroup, Collector, Server};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where the demo keeps its key and streams (relative to the workspace root).
    #[arg(long, default_value = "data/demo")]
    pub dir: String,
}

const WORKFLOW: &str = "workflows/demo";
/// The sample workload: numbered lines on stdout, every third also a line on stderr.
const WORKLOAD: &str = "for i in 1 2 3 4 5 6; do echo \"line $i to stdout\"; \
    if [ $((i % 3)) = 0 ]; then echo \"line $i: a warning to stderr\" >&2; fi; done";
/// How long the collector may take to attach, and the streams to complete.
const DEADLINE: Duration = Duration::from_secs(30);

/// What [`WORKLOAD`] writes to `stream`.
fn expected(stream: &str) -> String {
    (1..=6)
        .filter_map(|i| match stream {
            "stdout" => Some(format!("line {i} to stdout\n")),
            _ if i % 3 == 0 => Some(format!("line {i}: a warning to stderr\n")),
            _ => None,
        })
        .collect()
}

/// The collector's side of the demo: stopped first, then its cgroup removed (field order).
struct EbpfPath {
    collector: Collector,
    cgroup: Cgroup,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let dir = util::root().join(&args.dir);
    std::fs::create_dir_all(&dir)?;
    // Decided before building, so a machine that cannot run the collector does not build it.
    let no_collector = collector_unavailable();
    let api_bin = util::bin_from_env("RELAY_METADATA_API_BIN", util::build_metadata_api)?;
    let entrypoint = util::bin_from_env("RELAY_ENTRYPOINT_STATIC", || {
        util::build_release("entrypoint")
    })?;
    let plugin_bin = util::bin_from_env("RELAY_KUBECTL_RELAY_BIN", || {
        util::build_release("kubectl-relay")
    })?;
    // As root the demo installs the eBPF toolchain itself (once; cached): the first command a
    // new user runs shows both capture paths.
    let no_collector = no_collector.or_else(|| {
        if std::env::var_os("RELAY_COLLECTOR_BIN").is_some() {
            return None;
        }
        let why = util::ebpf_toolchain_missing()?;
        println!(
            "Installing the eBPF toolchain the collector is built with ({why}): the pinned \
             nightly with rust-src, LLVM 22 from Debian and bpf-linker built against it; about \
             5 minutes on 2 cores, once (cached under ~/.cache/relay/bpf-linker)."
        );
        let started = Instant::now();
        match crate::ebpf::install() {
            Ok(_) => {
                println!("eBPF toolchain installed in {:.0?}.", started.elapsed());
                None
            }
            Err(e) => Some(format!("the eBPF toolchain could not be installed: {e:#}")),
        }
    });
    let collector_bin = match no_collector {
        None => {
            if std::env::var_os("RELAY_COLLECTOR_BIN").is_none() {
                println!(
                    "Building the release collector and its eBPF object (the first time: several \
                     minutes)."
                );
            }
            Some(util::bin_from_env(
                "RELAY_COLLECTOR_BIN",
                util::build_collector,
            )?)
        }
        Some(_) => None,
    };
    let started = Instant::now();
    let mut problems = Vec::new();

    let key = dir.join("metadata-api.key");
    let storage = format!("file://{}", dir.join("streams").display());
    let mut serve = Command::new(&api_bin);
    serve
        .arg("serve")
        .args([
            "--listen",
            "127.0.0.1:0",
            "--storage",
            &storage,
            "--key-file",
        ])
        .arg(&key);
    if std::env::var_os("RUST_LOG").is_none() {
        // Its request log would drown the demo's output; warnings and errors still show.
        serve.env("RUST_LOG", "warn");
    }
    let server = Server::spawn(serve)?;
    let url = server.url.clone();
    // One read token for the demo's reads and the curl command printed at the end.
    let read = util::token_for(&api_bin, &key, WORKFLOW, "read", "24h")?;
    let http = Client::builder().timeout(Duration::from_secs(30)).build()?;
    let run = next_run(&dir, &http, &url, &read)?;
    let step = format!("{WORKFLOW}/runs/{run}/steps/hello");
    println!("Relay demo, run {run}");
    println!("1. metadata API on {url}, storage {storage}");

    write_by_hand(&http, &api_bin, &key, &url, &read, run)?;

    let ebpf = match (&collector_bin, no_collector) {
        (Some(bin), _) => start_collector(bin, &api_bin, &key, &dir, &url, &step),
        (None, why) => {
            let why = why.unwrap_or_else(|| "not built".to_owned());
            println!("3. collector not started: {why}; showing the entrypoint path only");
            None
        }
    };

    let token_file = dir.join("entrypoint.token");
    std::fs::write(&token_file, util::token(&api_bin, &key, &step, "write")?)?;
    let ran = Instant::now();
    let status = run_workload(
        &entrypoint,
        &url,
        &token_file,
        ebpf.as_ref().map(|e| e.cgroup.path.as_path()),
    )?;
    let exit = status
        .code()
        .map_or_else(|| status.to_string(), |c| format!("exit status {c}"));
    println!(
        "4. workload `sh -c '{WORKLOAD}'` run by {} {}: {exit} after {:.1} s; \
         its output went to the metadata API only",
        entrypoint.display(),
        if ebpf.is_some() {
            "in the watched cgroup"
        } else {
            "(no cgroup)"
        },
        ran.elapsed().as_secs_f64()
    );
    if !status.success() {
        problems.push(format!("the workload under the entrypoint exited {status}"));
    }

    let paths: &[&str] = if ebpf.is_some() {
        &["entrypoint", "ebpf"]
    } else {
        &["entrypoint"]
    };
    let waited = Instant::now();
    match wait_complete(&http, &url, &read, &step, paths) {
        Ok(()) => println!(
            "5. stdout and stderr complete on the {} path{} after {:.1} s",
            paths.join(" and "),
            if paths.len() > 1 { "s" } else { "" },
            waited.elapsed().as_secs_f64()
        ),
        Err(e) => {
            println!("5. {e:#}");
            problems.push(format!("{e:#}"));
        }
    }

    println!("6. read back through the consumer API (GET /api/{step}/logs?stream=NAME):");
    for stream in ["stdout", "stderr"] {
        let text = read_back(&http, &url, &read, &step, stream, None)?;
        for line in text.lines() {
            println!("   {stream} | {line}");
        }
        if text != expected(stream) {
            problems.push(format!("{stream} read back is not what the workload wrote"));
        }
    }
    if ebpf.is_some() {
        let mut same = true;
        for stream in ["stdout", "stderr"] {
            let text = read_back(&http, &url, &read, &step, stream, Some("ebpf"))?;
            if text != expected(stream) {
                same = false;
                problems.push(format!(
                    "{stream} of the ebpf path is not what the workload wrote: {text:?}"
                ));
            }
        }
        if same {
            println!(
                "   the collector's copies (&source=ebpf) are byte-identical to what the workload wrote"
            );
        }
    }

    let (report, agree) = capture_report(&api_bin, &url, &read, run)?;
    println!("7. capture report (metadata-api capture-report --step demo/{run}/hello):");
    for line in report.lines() {
        println!("   {line}");
    }
    match (agree, ebpf.is_some()) {
        (Some(true), true) => {}
        (Some(false), false) => {
            println!("   (entrypoint_only, as expected: the collector did not run)");
        }
        (Some(true), false) => {
            problems.push("the capture report agrees without a second path".to_owned());
        }
        (Some(false), true) => problems.push("the capture paths do not agree".to_owned()),
        (None, _) => problems.push("the capture report could not be fetched".to_owned()),
    }

    let plugin_args =
        |url: &str| format!("logs step/demo/{run}/hello --prefix --url {url} --token {read}");
    println!(
        "8. the step's logs through the kubectl plugin (kubectl relay {}):",
        plugin_args(&url).replace(&read, "$TOKEN")
    );
    match kubectl_relay(&plugin_bin, &plugin_args(&url)) {
        Ok(text) => {
            for line in text.lines() {
                println!("   {line}");
            }
            let missing: Vec<String> = ["stdout", "stderr"]
                .into_iter()
                .flat_map(|stream| {
                    expected(stream)
                        .lines()
                        .map(|l| format!("[hello/{stream}] {l}"))
                        .collect::<Vec<_>>()
                })
                .filter(|l| !text.lines().any(|t| t == l))
                .collect();
            if !missing.is_empty() {
                problems.push(format!("kubectl relay logs did not print {missing:?}"));
            }
        }
        Err(e) => {
            println!("   {e:#}");
            problems.push(format!("kubectl relay logs failed: {e:#}"));
        }
    }

    // Stop the collector (it ships what is left), remove its cgroup, stop the API.
    drop(ebpf);
    drop(server);
    println!(
        "\nRan in {:.1} s (builds not counted). The data is in {}: streams/ (the stored parts), \
         metadata-api.key (the signing key); each run of the demo is a new run number.",
        started.elapsed().as_secs_f64(),
        dir.display()
    );
    println!(
        "Follow the step's streams yourself (the token is a read token for {WORKFLOW}, valid 24 h):\n  \
         {} serve --listen 127.0.0.1:7070 --storage {storage} --key-file {} &\n  \
         curl -sN -H 'Authorization: Bearer {read}' 'http://127.0.0.1:7070/api/{step}/logs?follow=true'\n\
         or with the kubectl plugin (`cargo install --path kubectl-relay`, or {} on the PATH):\n  \
         kubectl relay logs step/demo/{run}/hello -f --url http://127.0.0.1:7070 --token {read}",
        api_bin.display(),
        key.display(),
        plugin_bin.display()
    );
    if !problems.is_empty() {
        bail!(
            "the demo did not go as it should:\n  {}",
            problems.join("\n  ")
        );
    }
    Ok(())
}

/// Why the collector cannot run on this machine, if it cannot.
fn collector_unavailable() -> Option<String> {
    if !util::is_root() {
        return Some(
            "not running as root (the collector loads eBPF programs and makes a cgroup)".to_owned(),
        );
    }
    if util::cgroup2_root().is_none() {
        return Some("no cgroup v2 hierarchy is mounted".to_owned());
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Some("the kernel has no BTF (/sys/kernel/btf/vmlinux)".to_owned());
    }
    None
}

/// The next run number (the last one is kept in `dir/last-run`) whose step has no stream yet, so
/// each demo run has its own streams, also in a directory an older demo wrote.
fn next_run(dir: &Path, http: &Client, url: &str, read: &str) -> anyhow::Result<u64> {
    let file = dir.join("last-run");
    let last = std::fs::read_to_string(&file)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0);
    for run in last + 1..last + 1000 {
        let report: Value = http
            .get(format!(
                "{url}/api/{WORKFLOW}/runs/{run}/steps/hello/logs/capture-report"
            ))
            .bearer_auth(read)
            .send()?
            .error_for_status()?
            .json()?;
        if report["streams"].as_array().is_none_or(Vec::is_empty) {
            std::fs::write(&file, format!("{run}\n"))?;
            return Ok(run);
        }
    }
    bail!("no free run number after {last} in {}", dir.display())
}

/// Step 2: a stream written through the write API by hand, two parts sent out of order (the
/// second gzip-compressed), as a writer with parts in flight would, and read back.
fn write_by_hand(
    http: &Client,
    api_bin: &Path,
    key: &Path,
    url: &str,
    read: &str,
    run: u64,
) -> anyhow::Result<()> {
    let context = format!("{WORKFLOW}/runs/{run}/steps/by-hand");
    let write = util::token(api_bin, key, &context, "write")?;
    let created: Value = http
        .post(format!("{url}/logs"))
        .bearer_auth(&write)
        .json(&serde_json::json!({"name": "stdout"}))
        .send()?
        .error_for_status()?
        .json()?;
    let id = created["id"].as_str().context("no id")?.to_owned();
    let first = "hello from the write API, sent second\n";
    let second = "this line travelled gzip-compressed and arrived first\n";
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(second.as_bytes())?;
    let patch = |offset: usize, body: Vec<u8>, len: usize, gzip: bool| -> anyhow::Result<()> {
        let mut req = http
            .patch(format!("{url}/logs/{id}/data"))
            .bearer_auth(&write)
            .header("content-type", "application/octet-stream")
            .header(
                "content-range",
                format!("bytes {offset}-{}/*", offset + len - 1),
            )
            .body(body);
        if gzip {
            req = req.header("content-encoding", "gzip");
        }
        let resp = req.send()?;
        if resp.status().as_u16() != 202 {
            bail!("PATCH answered {}: {}", resp.status(), resp.text()?);
        }
        Ok(())
    };
    patch(first.len(), gz.finish()?, second.len(), true)?;
    patch(0, first.as_bytes().to_vec(), first.len(), false)?;
    let text = read_back(http, url, read, &context, "stdout", None)?;
    println!(
        "2. write API by hand: stream stdout of {context}, two parts PATCHed out of order \
         (the second gzip), both 202; read back:"
    );
    for line in text.lines() {
        println!("   stdout | {line}");
    }
    if text != format!("{first}{second}") {
        bail!("the stream written by hand reads back as {text:?}");
    }
    Ok(())
}

/// Step 3: a cgroup and the collector watching it as `step`; `None` (after saying why) when the
/// collector does not start, e.g. when this kernel refuses its eBPF programs.
fn start_collector(
    bin: &Path,
    api_bin: &Path,
    key: &Path,
    dir: &Path,
    url: &str,
    step: &str,
) -> Option<EbpfPath> {
    let started = (|| -> anyhow::Result<EbpfPath> {
        let root = util::cgroup2_root().context("no cgroup v2 hierarchy is mounted")?;
        let cgroup = Cgroup::create(root.join(format!("relay-demo-{}", std::process::id())))?;
        let token_file = dir.join("collector.token");
        // The collector scope covers every context under the prefix.
        std::fs::write(
            &token_file,
            util::token(api_bin, key, WORKFLOW, "collector")?,
        )?;
        let collector = Collector::start(
            bin,
            url,
            &token_file,
            &[(&cgroup.path, step)],
            &[],
            &dir.join("collector.log"),
            DEADLINE,
        )?;
        Ok(EbpfPath { collector, cgroup })
    })();
    match started {
        Ok(ebpf) => {
            println!(
                "3. collector (eBPF) watching cgroup {} as {step}, metrics on {}",
                ebpf.cgroup.path.display(),
                ebpf.collector.metrics_url
            );
            Some(ebpf)
        }
        Err(e) => {
            println!(
                "3. collector did not start ({e:#}; log in {}); showing the entrypoint path only",
                dir.join("collector.log").display()
            );
            None
        }
    }
}

/// Step 4: [`WORKLOAD`] under the entrypoint, moved into `cgroup` first when there is one (the
/// shell writes its pid to `cgroup.procs`, then execs the entrypoint). Killed after
/// [`DEADLINE`].
fn run_workload(
    entrypoint: &Path,
    url: &str,
    token_file: &Path,
    cgroup: Option<&Path>,
) -> anyhow::Result<std::process::ExitStatus> {
    let mut cmd = match cgroup {
        Some(dir) => {
            let mut c = Command::new("sh");
            c.arg("-c")
                .arg(format!(
                    "echo $$ > '{}/cgroup.procs' && exec \"$0\" -- sh -c \"$1\"",
                    dir.display()
                ))
                .arg(entrypoint)
                .arg(WORKLOAD);
            c
        }
        None => {
            let mut c = Command::new(entrypoint);
            c.args(["--", "sh", "-c", WORKLOAD]);
            c
        }
    };
    let child = cmd
        .env("RELAY_METADATA_API_URL", url)
        .env("RELAY_METADATA_API_TOKEN_FILE", token_file)
        .stdin(Stdio::null())
        // The entrypoint never writes here: the workload's output goes to the API only.
        .stdout(Stdio::null())
        // Its own diagnostics, when something was dropped or lost.
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("cannot start {}", entrypoint.display()))?;
    wait_or_kill(child, DEADLINE)
}

fn wait_or_kill(mut child: Child, limit: Duration) -> anyhow::Result<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the workload did not finish in {} s", limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Step 5: waits until `stdout` and `stderr` of `step` are complete on every one of `paths`
/// (`entrypoint`, `ebpf`), as the capture report sees them.
fn wait_complete(
    http: &Client,
    url: &str,
    read: &str,
    step: &str,
    paths: &[&str],
) -> anyhow::Result<()> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let report: Value = http
            .get(format!("{url}/api/{step}/logs/capture-report"))
            .bearer_auth(read)
            .send()?
            .error_for_status()?
            .json()?;
        let complete = |stream: &str, path: &str| {
            report["streams"].as_array().is_some_and(|streams| {
                streams
                    .iter()
                    .any(|s| s["name"] == stream && s[path]["complete"] == true)
            })
        };
        let missing: Vec<String> = ["stdout", "stderr"]
            .iter()
            .flat_map(|stream| paths.iter().map(move |path| (*stream, *path)))
            .filter(|(stream, path)| !complete(stream, path))
            .map(|(stream, path)| format!("{stream} ({path})"))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "not complete after {} s: {}",
                DEADLINE.as_secs(),
                missing.join(", ")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One stream of `context` through the consumer API, from `source` or (`None`) the entrypoint
/// where it has the bytes, else the collector.
fn read_back(
    http: &Client,
    url: &str,
    read: &str,
    context: &str,
    stream: &str,
    source: Option<&str>,
) -> anyhow::Result<String> {
    let mut query = vec![("stream", stream)];
    if let Some(source) = source {
        query.push(("source", source));
    }
    Ok(http
        .get(format!("{url}/api/{context}/logs"))
        .query(&query)
        .bearer_auth(read)
        .send()?
        .error_for_status()?
        .text()?)
}

/// Step 7: `metadata-api capture-report` for the demo's step: its table and whether it says the
/// paths agree (`None` when it could not fetch the report).
fn capture_report(
    api_bin: &Path,
    url: &str,
    read: &str,
    run: u64,
) -> anyhow::Result<(String, Option<bool>)> {
    let out = Command::new(api_bin)
        .args(["capture-report", "--url", url, "--step"])
        .arg(format!("demo/{run}/hello"))
        .env("RELAY_METADATA_API_TOKEN", read)
        .output()
        .with_context(|| format!("cannot run {}", api_bin.display()))?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    let agree = match out.status.code() {
        Some(0) => Some(true),
        Some(1) => Some(false),
        _ => None,
    };
    Ok((text, agree))
}

/// Step 8: `kubectl-relay ARGS` (`ARGS` split on spaces), once, without following: its stdout,
/// or why it failed (its one-line error).
fn kubectl_relay(bin: &Path, args: &str) -> anyhow::Result<String> {
    let out = Command::new(bin)
        .args(args.split(' '))
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "{} exited {}: {}",
            bin.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

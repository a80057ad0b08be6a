//! `cargo xtask fuzz`: runs the cargo-fuzz targets of every fuzz crate (`metadata-api/fuzz`,
//! `operator/fuzz`) for a while each.
//!
//! cargo-fuzz needs a nightly toolchain (sanitizers, `-Z` flags); a pinned one is installed on
//! demand, as is cargo-fuzz itself. Each crate is built once, into a target directory under
//! `~/.cache/relay` so a fresh clone does not rebuild the operator's dependency tree with
//! sanitizers from scratch. Each target starts from its committed seeds (`fuzz/seeds/<target>`)
//! copied into a fresh, gitignored `fuzz/corpus/<target>`; crashes land in `fuzz/artifacts`.

use std::{
    fs,
    num::NonZeroUsize,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
    time::Instant,
};

use anyhow::{Context, bail};

use crate::util;

/// The nightly cargo-fuzz builds with (the workspace itself pins a stable toolchain): the eBPF
/// one (`ebpf-toolchain.txt`), so a machine that runs both installs one nightly.
const NIGHTLY: &str = crate::ebpf::TOOLCHAIN;

/// The crates whose `fuzz/` directory holds cargo-fuzz targets.
const FUZZED_CRATES: [&str; 2] = ["metadata-api", "operator"];

/// Longest one input may take before libFuzzer calls it a hang: every target parses inputs of
/// a few KiB, which takes milliseconds even instrumented.
const INPUT_TIMEOUT_SECS: u64 = 10;

/// Lines printed from a failed run's log: from the first error, and its end.
const EXCERPT_LINES: usize = 12;
/// Longest line printed from it (cargo-fuzz prints the failing input as one line of bytes).
const EXCERPT_WIDTH: usize = 300;

/// Variables the outer `cargo run` / rustup proxy set that would pin the child's toolchain and
/// defeat `cargo +nightly`.
const TOOLCHAIN_ENV: [&str; 5] = [
    "RUSTUP_TOOLCHAIN",
    "RUSTC",
    "RUSTDOC",
    "CARGO",
    "RUSTC_WRAPPER",
];

#[derive(Debug, clap::Args)]
pub struct Args {
    /// seconds per target (default 15)
    #[arg(long, default_value_t = 15)]
    pub seconds: u64,
    /// run only this target
    #[arg(long)]
    pub target: Option<String>,
}

/// A fuzz target and the crate it belongs to.
#[derive(Debug)]
struct Target {
    /// The crate directory (`cargo fuzz` runs there).
    crate_dir: PathBuf,
    name: String,
}

impl Target {
    fn fuzz_dir(&self) -> PathBuf {
        self.crate_dir.join("fuzz")
    }

    /// Where libFuzzer leaves crash inputs, and the run's log.
    fn artifacts(&self) -> PathBuf {
        self.fuzz_dir().join("artifacts").join(&self.name)
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let Args { seconds, target } = args;
    let mut targets = Vec::new();
    for krate in FUZZED_CRATES {
        let crate_dir = util::root().join(krate);
        for name in targets_in(&crate_dir.join("fuzz"))? {
            targets.push(Target {
                crate_dir: crate_dir.clone(),
                name,
            });
        }
    }
    if let Some(only) = &target {
        if !targets.iter().any(|t| &t.name == only) {
            let names: Vec<&str> = targets.iter().map(|t| t.name.as_str()).collect();
            bail!("no fuzz target {only:?}; targets: {}", names.join(", "));
        }
        targets.retain(|t| &t.name == only);
    }

    ensure_nightly()?;
    ensure_cargo_fuzz()?;
    let target_dir = util::cache_dir().join("fuzz-target");
    prune(&target_dir)?;
    let started = Instant::now();

    // Every crate first, all its targets at once (or the one asked for): a build uses all the
    // cores by itself.
    let mut crates: Vec<&Path> = targets.iter().map(|t| t.crate_dir.as_path()).collect();
    crates.dedup();
    for crate_dir in crates {
        let build_started = Instant::now();
        let mut build = fuzz(crate_dir, "build", &target_dir);
        if let Some(only) = &target {
            build.arg(only);
        }
        util::run(&mut build)
            .with_context(|| format!("building the fuzz targets of {}", crate_dir.display()))?;
        eprintln!(
            "fuzz targets of {}: built in {:.0?}",
            crate_dir.display(),
            build_started.elapsed()
        );
    }

    // Then one target per core at a time, each writing its libFuzzer output to its own log.
    let jobs = std::thread::available_parallelism()
        .map_or(1, NonZeroUsize::get)
        .min(targets.len());
    let next = AtomicUsize::new(0);
    let failed: Mutex<Vec<usize>> = Mutex::default();
    std::thread::scope(|scope| {
        for _ in 0..jobs {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(t) = targets.get(i) else { break };
                    match fuzz_one(t, seconds, &target_dir) {
                        Ok(summary) => eprintln!("fuzz target {}: ok ({summary})", t.name),
                        Err(e) => {
                            eprintln!("fuzz target {}: FAILED: {e:#}", t.name);
                            failed
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .push(i);
                        }
                    }
                }
            });
        }
    });
    eprintln!(
        "fuzzing: {} targets, {jobs} at a time, in {:.0?} with the builds",
        targets.len(),
        started.elapsed()
    );
    let mut failed = failed.into_inner().unwrap_or_else(PoisonError::into_inner);
    failed.sort_unstable();
    let failed: Vec<String> = failed
        .into_iter()
        .map(|i| {
            let t = &targets[i];
            format!(
                "{} (log and crash inputs in {})",
                t.name,
                t.artifacts().display()
            )
        })
        .collect();
    if !failed.is_empty() {
        bail!("fuzz targets failed: {}", failed.join(", "));
    }
    Ok(())
}

/// Fuzzes `t` for `seconds` from fresh seeds, its output in `fuzz/artifacts/<target>/fuzz.log`.
/// Returns a summary (time, executions); on failure, the log's end is printed.
fn fuzz_one(t: &Target, seconds: u64, target_dir: &Path) -> anyhow::Result<String> {
    let corpus = fresh_corpus(&t.fuzz_dir(), &t.name)?;
    let artifacts = t.artifacts();
    fs::create_dir_all(&artifacts)
        .with_context(|| format!("cannot create {}", artifacts.display()))?;
    let log_path = artifacts.join("fuzz.log");
    let log = fs::File::create(&log_path)
        .with_context(|| format!("cannot create {}", log_path.display()))?;
    let mut cmd = fuzz(&t.crate_dir, "run", target_dir);
    cmd.arg(&t.name)
        .arg(&corpus)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-timeout={INPUT_TIMEOUT_SECS}"))
        .arg("-print_final_stats=1")
        .stdout(log.try_clone()?)
        .stderr(log);
    let started = Instant::now();
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    let output = fs::read_to_string(&log_path).unwrap_or_default();
    if !status.success() {
        eprintln!(
            "--- {} (from {}) ---\n{}\n---",
            t.name,
            log_path.display(),
            failure_excerpt(&output)
        );
        bail!("{status}");
    }
    let runs = output
        .lines()
        .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
        .map_or("?", str::trim)
        .to_owned();
    Ok(format!("{:.0?}, {runs} runs", started.elapsed()))
}

/// What a failed run's log says: the lines from its first error (a panic, a sanitizer or
/// libFuzzer report) and its last lines (where the crash input is), shortened.
fn failure_excerpt(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    let tail = lines.len().saturating_sub(EXCERPT_LINES);
    let first_error = lines
        .iter()
        .position(|l| l.contains("panicked at") || l.contains("ERROR: "))
        .unwrap_or(tail);
    let mut shown: Vec<usize> = (first_error..lines.len().min(first_error + EXCERPT_LINES))
        .chain(tail..lines.len())
        .collect();
    shown.sort_unstable();
    shown.dedup();
    shown
        .into_iter()
        .map(|i| match lines[i].char_indices().nth(EXCERPT_WIDTH) {
            Some((cut, _)) => format!("{}...", &lines[i][..cut]),
            None => lines[i].to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `cargo +NIGHTLY fuzz SUBCOMMAND --target-dir DIR` in `crate_dir`.
fn fuzz(crate_dir: &Path, subcommand: &str, target_dir: &Path) -> Command {
    let mut cmd = cargo();
    cmd.current_dir(crate_dir)
        .arg(format!("+{NIGHTLY}"))
        .args(["fuzz", subcommand, "--target-dir"])
        .arg(target_dir)
        // The dependencies at opt-level 1 with line tables only (crash traces keep file and
        // line): on a cold cache metadata-api's targets built in 6 min 26 s instead of 7 min 32 s
        // here. The crates under test stay at the opt-level their fuzz Cargo.toml gives them.
        .env("CARGO_PROFILE_RELEASE_OPT_LEVEL", "1")
        .env("CARGO_PROFILE_RELEASE_DEBUG", "line-tables-only");
    cmd
}

/// Plain `cargo` (through the rustup proxy) without the outer cargo's toolchain pins.
fn cargo() -> Command {
    let mut cmd = Command::new("cargo");
    for var in TOOLCHAIN_ENV {
        cmd.env_remove(var);
    }
    cmd
}

/// Target names: `fuzz/fuzz_targets/*.rs`, sorted.
fn targets_in(fuzz_dir: &Path) -> anyhow::Result<Vec<String>> {
    let dir = fuzz_dir.join("fuzz_targets");
    let mut targets = Vec::new();
    for entry in fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "rs")
            && let Some(name) = path.file_stem().and_then(|s| s.to_str())
        {
            targets.push(name.to_owned());
        }
    }
    if targets.is_empty() {
        bail!("no fuzz targets in {}", dir.display());
    }
    targets.sort();
    Ok(targets)
}

fn ensure_nightly() -> anyhow::Result<()> {
    let out = Command::new("rustup")
        .args(["toolchain", "list"])
        .output()
        .context("cannot run rustup (is it installed?)")?;
    if !out.status.success() {
        bail!(
            "rustup toolchain list failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    if String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.starts_with(NIGHTLY))
    {
        return Ok(());
    }
    util::run(Command::new("rustup").args([
        "toolchain",
        "install",
        NIGHTLY,
        "--profile",
        "minimal",
    ]))
}

fn ensure_cargo_fuzz() -> anyhow::Result<()> {
    let installed = cargo()
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if installed {
        return Ok(());
    }
    util::run(
        cargo()
            .current_dir(util::root())
            .args(["install", "cargo-fuzz", "--locked"]),
    )
}

/// Empties `fuzz/corpus/<target>` and fills it with the target's seeds.
fn fresh_corpus(fuzz_dir: &Path, target: &str) -> anyhow::Result<PathBuf> {
    let corpus = fuzz_dir.join("corpus").join(target);
    if corpus.exists() {
        fs::remove_dir_all(&corpus)
            .with_context(|| format!("cannot remove {}", corpus.display()))?;
    }
    fs::create_dir_all(&corpus).with_context(|| format!("cannot create {}", corpus.display()))?;
    let seeds = fuzz_dir.join("seeds").join(target);
    if seeds.is_dir() {
        for entry in
            fs::read_dir(&seeds).with_context(|| format!("cannot list {}", seeds.display()))?
        {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                fs::copy(entry.path(), corpus.join(entry.file_name())).with_context(|| {
                    format!("cannot copy {} to the corpus", entry.path().display())
                })?;
            }
        }
    }
    Ok(corpus)
}

/// Cargo never collects old artifacts: each change of flags or dependencies leaves another copy of
/// every sanitized binary (150 MB each) in the shared cache, which reached 13 GB and filled CI's
/// disk. Past this size the cache starts over (one full build is about 3 GB).
const CACHE_LIMIT: u64 = 6 << 30;

fn prune(target_dir: &Path) -> anyhow::Result<()> {
    let size = dir_size(target_dir);
    if size > CACHE_LIMIT {
        eprintln!(
            "fuzz build cache {} holds {:.1} GB, over {:.0} GB: starting it over",
            target_dir.display(),
            size as f64 / f64::from(1u32 << 30),
            CACHE_LIMIT as f64 / f64::from(1u32 << 30)
        );
        fs::remove_dir_all(target_dir)
            .with_context(|| format!("removing {}", target_dir.display()))?;
    }
    Ok(())
}

/// Bytes of regular files under `dir` (0 when it does not exist); symlinks are not followed.
fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.file_type() {
            Ok(kind) if kind.is_dir() => dir_size(&entry.path()),
            Ok(kind) if kind.is_file() => entry.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_excerpt_shows_the_panic_and_the_end_shortened() {
        let mut log: Vec<String> = (0..100).map(|i| format!("#{i} NEW cov: {i}")).collect();
        log.push("thread '<unnamed>' panicked at src/lib.rs:1:1:".to_owned());
        log.push("the message".to_owned());
        log.extend((0..50).map(|i| format!("   {i}: frame")));
        log.push(format!("[{}]", "1, ".repeat(1000)));
        log.push("Reproduce with: cargo fuzz run t crash-1".to_owned());
        let excerpt = failure_excerpt(&log.join("\n"));
        let lines: Vec<&str> = excerpt.lines().collect();
        assert!(lines[0].contains("panicked at"), "{excerpt}");
        assert_eq!(lines[1], "the message");
        assert_eq!(
            lines.last(),
            Some(&"Reproduce with: cargo fuzz run t crash-1")
        );
        assert_eq!(lines.len(), 2 * EXCERPT_LINES);
        assert!(lines.iter().all(|l| l.len() <= EXCERPT_WIDTH + 3));
        // Without an error line: the end.
        assert_eq!(
            failure_excerpt("a\nb").lines().collect::<Vec<_>>(),
            ["a", "b"]
        );
    }
}

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
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, bail};

use crate::util;

/// The nightly cargo-fuzz builds with (the workspace itself pins a stable toolchain).
const NIGHTLY: &str = "nightly-2026-05-19";

/// The crates whose `fuzz/` directory holds cargo-fuzz targets.
const FUZZED_CRATES: [&str; 2] = ["metadata-api", "operator"];

/// Longest one input may take before libFuzzer calls it a hang: every target parses inputs of
/// a few KiB, which takes milliseconds even instrumented.
const INPUT_TIMEOUT_SECS: u64 = 10;

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

    let started = Instant::now();
    let mut failed = Vec::new();
    let mut built: Vec<&Path> = Vec::new();
    for t in &targets {
        if !built.contains(&t.crate_dir.as_path()) {
            // All of a crate's targets at once (or the one asked for), timed on its own.
            let build_started = Instant::now();
            let mut build = fuzz(&t.crate_dir, "build", &target_dir);
            if target.is_some() {
                build.arg(&t.name);
            }
            util::run(&mut build).with_context(|| {
                format!("building the fuzz targets of {}", t.crate_dir.display())
            })?;
            eprintln!(
                "fuzz targets of {}: built in {:.0?}",
                t.crate_dir.display(),
                build_started.elapsed()
            );
            built.push(&t.crate_dir);
        }
        let corpus = fresh_corpus(&t.fuzz_dir(), &t.name)?;
        let run_started = Instant::now();
        let result = util::run(
            fuzz(&t.crate_dir, "run", &target_dir)
                .arg(&t.name)
                .arg(&corpus)
                .arg("--")
                .arg(format!("-max_total_time={seconds}"))
                .arg(format!("-timeout={INPUT_TIMEOUT_SECS}"))
                .arg("-print_final_stats=1"),
        );
        match result {
            Ok(()) => eprintln!("fuzz target {}: ok ({:.0?})", t.name, run_started.elapsed()),
            Err(e) => {
                eprintln!("fuzz target {}: FAILED: {e:#}", t.name);
                failed.push(t);
            }
        }
    }
    eprintln!(
        "fuzzing: {} targets in {:.0?}",
        targets.len(),
        started.elapsed()
    );
    if !failed.is_empty() {
        let names: Vec<String> = failed
            .iter()
            .map(|t| {
                format!(
                    "{} (crash inputs in {})",
                    t.name,
                    t.fuzz_dir().join("artifacts").join(&t.name).display()
                )
            })
            .collect();
        bail!("fuzz targets failed: {}", names.join(", "));
    }
    Ok(())
}

/// `cargo +NIGHTLY fuzz SUBCOMMAND --target-dir DIR` in `crate_dir`.
fn fuzz(crate_dir: &Path, subcommand: &str, target_dir: &Path) -> Command {
    let mut cmd = cargo();
    cmd.current_dir(crate_dir)
        .arg(format!("+{NIGHTLY}"))
        .args(["fuzz", subcommand, "--target-dir"])
        .arg(target_dir);
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

//! `cargo xtask fuzz`: runs the cargo-fuzz targets in `metadata-api/fuzz` for a while each.
//!
//! cargo-fuzz needs a nightly toolchain (sanitizers, `-Z` flags); a pinned one is installed on
//! demand, as is cargo-fuzz itself. Each target starts from its committed seeds
//! (`fuzz/seeds/<target>`) copied into a fresh, gitignored `fuzz/corpus/<target>`.

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

pub fn run(args: Args) -> anyhow::Result<()> {
    let crate_dir = util::root().join("metadata-api");
    let fuzz_dir = crate_dir.join("fuzz");

    let mut targets = targets(&fuzz_dir)?;
    if let Some(only) = &args.target {
        if !targets.contains(only) {
            bail!("no fuzz target {only:?}; targets: {}", targets.join(", "));
        }
        targets = vec![only.clone()];
    }

    ensure_nightly()?;
    ensure_cargo_fuzz()?;

    let mut failed = Vec::new();
    for target in &targets {
        let corpus = fresh_corpus(&fuzz_dir, target)?;
        let started = Instant::now();
        let result = util::run(
            cargo()
                .current_dir(&crate_dir)
                .arg(format!("+{NIGHTLY}"))
                .args(["fuzz", "run", target])
                .arg(&corpus)
                .arg("--")
                .arg(format!("-max_total_time={}", args.seconds))
                .arg("-print_final_stats=1"),
        );
        match result {
            Ok(()) => eprintln!("fuzz target {target}: ok ({:.0?})", started.elapsed()),
            Err(e) => {
                eprintln!("fuzz target {target}: FAILED: {e:#}");
                failed.push(target.as_str());
            }
        }
    }
    if !failed.is_empty() {
        bail!(
            "fuzz targets failed: {} (crash inputs are in {})",
            failed.join(", "),
            fuzz_dir.join("artifacts").display()
        );
    }
    Ok(())
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
fn targets(fuzz_dir: &Path) -> anyhow::Result<Vec<String>> {
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

//! `cargo xtask build-entrypoint`: the static entrypoint binary that tenant containers run.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};

use crate::util::{root, run, target_dir};

/// The target of the static build: musl links everything in.
pub const MUSL: &str = "x86_64-unknown-linux-musl";

#[derive(Debug, clap::Args)]
pub struct Args {}

/// Adds the musl target to the pinned toolchain unless it is there.
fn ensure_target() -> anyhow::Result<()> {
    let out = Command::new("rustup")
        .current_dir(root())
        .args(["target", "list", "--installed"])
        .output()
        .context("cannot run rustup")?;
    if String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.trim() == MUSL)
    {
        return Ok(());
    }
    run(Command::new("rustup")
        .current_dir(root())
        .args(["target", "add", MUSL]))
}

/// Whether `path` is an ELF executable without an interpreter (statically linked).
pub fn is_static(path: &Path) -> anyhow::Result<bool> {
    let b = std::fs::read(path)?;
    if b.len() < 64 || &b[..4] != b"\x7fELF" || b[4] != 2 {
        bail!("{} is not a 64-bit ELF file", path.display());
    }
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(b[32..40].try_into()?) as usize;
    let (phentsize, phnum) = (u16_at(54), u16_at(56));
    const PT_INTERP: u32 = 3;
    for i in 0..phnum {
        let o = phoff + i * phentsize;
        let kind = u32::from_le_bytes(b.get(o..o + 4).context("truncated ELF")?.try_into()?);
        if kind == PT_INTERP {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Builds the static entrypoint (profile `dist`) and returns its path.
pub fn build_entrypoint() -> anyhow::Result<PathBuf> {
    ensure_target()?;
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root()).args([
        "build",
        "--quiet",
        "--profile",
        "dist",
        "--target",
        MUSL,
        "-p",
        "entrypoint",
    ]);
    // libzstd (C, for `--compression zstd`) is compiled for musl with musl's gcc wrapper, as the
    // images' binaries are: without it cc-rs would fall back to the host's gcc and glibc headers.
    if std::env::var_os("CC_x86_64_unknown_linux_musl").is_none() {
        cmd.env("CC_x86_64_unknown_linux_musl", crate::images::musl_gcc()?);
    }
    run(&mut cmd)?;
    // Where cargo put it: CARGO_TARGET_DIR when set (a worktree sharing a target directory).
    let bin = target_dir().join(MUSL).join("dist/entrypoint");
    if !is_static(&bin)? {
        bail!("{} is not statically linked", bin.display());
    }
    Ok(bin)
}

pub fn run_task(Args {}: Args) -> anyhow::Result<()> {
    let bin = build_entrypoint()?;
    let size = std::fs::metadata(&bin)?.len();
    println!(
        "{} (static, {:.2} MiB)",
        bin.display(),
        size as f64 / (1 << 20) as f64
    );
    Ok(())
}

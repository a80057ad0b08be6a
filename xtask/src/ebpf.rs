//! The eBPF toolchain: the pinned nightly with `rust-src`, and bpf-linker built against LLVM 22
//! (README.md, "Tests"). Installed idempotently; bpf-linker is cached under ~/.cache/relay.

use std::{path::PathBuf, process::Command};

use anyhow::Context;

use crate::util::{cache_dir, run as sh};

/// The nightly pinned in `ebpf-toolchain.txt` at the workspace root, which `collector/build.rs`
/// reads too, so the object is built with the toolchain installed here.
pub const TOOLCHAIN: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../ebpf-toolchain.txt"
))
.trim_ascii();
const BPF_LINKER_VERSION: &str = "0.13.0";
/// What building bpf-linker against Debian's LLVM 22 needs (bookworm-security).
const LLVM_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "zlib1g-dev",
    "libzstd-dev",
    "libxml2-dev",
    "libffi-dev",
    "libncurses-dev",
];

fn answers(cmd: &mut Command) -> bool {
    cmd.output().is_ok_and(|o| o.status.success())
}

/// Installs what building the collector's eBPF object needs and returns the directory holding
/// `bpf-linker`, to put on `PATH`. Also links it into `~/.cargo/bin` (when that has none), so a
/// plain `cargo build` finds it.
pub fn install() -> anyhow::Result<PathBuf> {
    let has_src = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", TOOLCHAIN])
        .output()
        .is_ok_and(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains("rust-src")
        });
    if !has_src {
        sh(Command::new("rustup").args([
            "toolchain",
            "install",
            TOOLCHAIN,
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))
        .context("installing the eBPF nightly")?;
    }
    let root = cache_dir().join("bpf-linker");
    let bin = root.join("bin");
    let linker = bin.join("bpf-linker");
    let version = Command::new(&linker).arg("--version").output();
    let current = version
        .as_ref()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION));
    if !current {
        let llvm = PathBuf::from("/usr/lib/llvm-22/bin/llvm-config");
        if !llvm.exists() {
            sh(Command::new("apt-get").arg("update").arg("-qq")).context("apt-get update")?;
            sh(Command::new("apt-get")
                .args(["install", "-y", "-qq", "--no-install-recommends"])
                .args(LLVM_PACKAGES)
                .env("DEBIAN_FRONTEND", "noninteractive"))
            .context("installing LLVM 22 for bpf-linker")?;
        }
        sh(Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
                "--no-default-features",
                "--features",
                "llvm-22,llvm-link-static",
                "--root",
            ])
            .arg(&root)
            .env("LLVM_PREFIX", "/usr/lib/llvm-22"))
        .context("building bpf-linker")?;
    }
    anyhow::ensure!(
        answers(Command::new(&linker).arg("--version")),
        "{} does not run",
        linker.display()
    );
    if let Some(home) = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
    {
        let link = home.join("bin").join("bpf-linker");
        if home.join("bin").is_dir() && !link.exists() {
            let _ = std::os::unix::fs::symlink(&linker, &link);
        }
    }
    Ok(bin)
}

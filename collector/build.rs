//! Builds the eBPF object (`collector-ebpf`) with the pinned nightly and bpf-linker, into
//! `OUT_DIR/collector`, where `src/ebpf.rs` embeds it. `AYA_BUILD_SKIP=1` skips it for host-only
//! checks: an object from an earlier build stays, or else an empty one is written, with which the
//! binary refuses to start.
//!
//! Cargo reruns this when `collector-ebpf` changes (aya-build watches its directory) and when
//! `collector-common` does (`collector-ebpf` is a build-dependency: see `Cargo.toml`), and when
//! the pinned nightly does.

use std::{env, fs, path::Path};

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

/// The pinned nightly, one line at the workspace root, which `cargo xtask ebpf-toolchain`
/// installs (`xtask/src/ebpf.rs`). Pinned because newer nightlies carry an LLVM that
/// bpf-linker 0.13 cannot read.
const TOOLCHAIN_FILE: &str = "ebpf-toolchain.txt";

fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let pin = metadata.workspace_root.join(TOOLCHAIN_FILE);
    println!("cargo:rerun-if-changed={pin}");
    let toolchain = fs::read_to_string(&pin).with_context(|| format!("reading {pin}"))?;
    let ebpf = metadata
        .packages
        .iter()
        .find(|p| p.name.as_str() == "collector-ebpf")
        .ok_or_else(|| anyhow!("collector-ebpf package not found"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("collector-ebpf manifest has no parent"))?;
    let out_dir = env::var_os("OUT_DIR").ok_or_else(|| anyhow!("OUT_DIR not set"))?;
    let objects: Vec<_> = ebpf
        .targets
        .iter()
        .filter(|t| t.is_bin())
        .map(|t| Path::new(&out_dir).join(t.name.as_str()))
        .collect();
    aya_build::build_ebpf(
        [Package {
            name: ebpf.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Package::default()
        }],
        Toolchain::Custom(toolchain.trim()),
    )?;
    // With AYA_BUILD_SKIP aya-build leaves OUT_DIR as it was; `src/ebpf.rs` cannot compile
    // without an object, and an empty one tells it there is none.
    for object in &objects {
        if !object.exists() {
            fs::write(object, []).with_context(|| format!("writing {}", object.display()))?;
        }
    }
    Ok(())
}

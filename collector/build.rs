//! Builds the eBPF object (`collector-ebpf`) with the pinned nightly and bpf-linker, into
//! `OUT_DIR/collector`, where `src/ebpf.rs` embeds it. `AYA_BUILD_SKIP=1` skips it for host-only
//! checks (the binary then refuses to start).

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

/// Kept in step with TESTBED.md: newer nightlies carry an LLVM that bpf-linker 0.13 cannot read.
const EBPF_TOOLCHAIN: &str = "nightly-2026-05-19";

fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .iter()
        .find(|p| p.name.as_str() == "collector-ebpf")
        .ok_or_else(|| anyhow!("collector-ebpf package not found"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("collector-ebpf manifest has no parent"))?;
    aya_build::build_ebpf(
        [Package {
            name: ebpf.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Package::default()
        }],
        Toolchain::Custom(EBPF_TOOLCHAIN),
    )
}

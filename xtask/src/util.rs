//! Helpers shared by tasks. Those that start the product's processes (the metadata API, the
//! collector, release builds, cgroups) are the benchmarks' too, and live in the bench crate.

use std::{path::Path, process::Command};

pub use bench::process::{
    Cgroup, Collector, Server, bin_from_env, build_collector, build_metadata_api, build_release,
    cache_dir, cgroup2_root, is_root, root, run, target_dir, token, token_for,
};

/// Why the collector's eBPF object cannot be built here (the pinned nightly with `rust-src`, or
/// bpf-linker, not installed), if it cannot. Checks only; `cargo xtask ebpf-toolchain` installs.
pub fn ebpf_toolchain_missing() -> Option<String> {
    let toolchain = crate::ebpf::TOOLCHAIN;
    let has_src = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", toolchain])
        .output()
        .is_ok_and(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains("rust-src")
        });
    if !has_src {
        return Some(format!("{toolchain} with rust-src is not installed"));
    }
    let cached = cache_dir().join("bpf-linker/bin/bpf-linker");
    let runs = |linker: &Path| {
        Command::new(linker)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !runs(&cached) && !runs(Path::new("bpf-linker")) {
        return Some("bpf-linker is not installed".to_owned());
    }
    None
}

//! Real container infrastructure for tests: a private containerd (with runc) per test, running
//! busybox containers to completion and handing back their exit code, stdout and stderr; or,
//! through [`cri`], running Kubernetes-shaped pods as a kubelet would. [`kube`] runs a real
//! Kubernetes API server (etcd, `kube-apiserver` and optionally `kube-controller-manager`) on
//! loopback. [`node`] runs a real node on it (the kubelet and kube-scheduler on a containerd of
//! its own), which schedules and runs its pods. [`registry`] runs a real OCI registry
//! (distribution 2.8) and pushes images built with umoci to it. [`images`] imports images into a
//! containerd without a registry, and [`oci_archive`] packs and imports archives of real images
//! (`cargo xtask images`).
//!
//! The binaries come from Debian packages that `cargo xtask testbed install` extracts into
//! `~/.cache/relay` (see [`layout`]); nothing is installed system-wide and no service is started.
//! Containerd and runc need root. A test that cannot run here calls [`skip_or_fail`], which skips
//! with a printed reason, unless `RELAY_REQUIRE_TESTBED=1` (as in CI) makes it fail instead:
//!
//! ```no_run
//! use testbed::{Containerd, Run};
//!
//! let Some(containerd) = Containerd::start_or_skip() else { return };
//! let out = containerd.run(&Run::new("hello", ["echo", "hello"])).unwrap();
//! assert_eq!((out.code, out.stdout.as_slice()), (0, &b"hello\n"[..]));
//! ```
#![forbid(unsafe_code)]

pub mod api;
pub mod cgroup;
pub mod collector;
mod containerd;
pub mod cri;
pub mod emulators;
pub mod images;
pub mod kube;
pub mod layout;
pub mod node;
mod oci;
pub mod oci_archive;
pub mod ports;
pub mod registry;
mod run;

pub use containerd::{Containerd, NAMESPACE};
pub use run::{Mount, Output, Run};

/// The environment variable that turns skips into failures: CI sets it to `1` so that missing
/// infrastructure cannot pass unnoticed.
pub const REQUIRE_ENV: &str = "RELAY_REQUIRE_TESTBED";

/// Why containers cannot run on this machine, or `None` when they can: we must be root, and the
/// binaries and the busybox root filesystem must be in the cache.
pub fn unavailable() -> Option<String> {
    if !rustix::process::geteuid().is_root() {
        return Some("containerd and runc need root".to_owned());
    }
    let needed = [
        layout::containerd_bin_dir().join("containerd"),
        layout::containerd_bin_dir().join("ctr"),
        layout::containerd_bin_dir().join("containerd-shim-runc-v2"),
        layout::runc(),
        layout::busybox_rootfs().join("bin/busybox"),
    ];
    needed.iter().find(|path| !path.exists()).map(|path| {
        format!(
            "{} is missing: run `cargo xtask testbed install`",
            path.display()
        )
    })
}

/// `start()` when containers can run here, otherwise `None` after [`skip_or_fail`] has said
/// why; panics when `what` does not start although it is installed.
fn start_or_skip<T>(what: &str, start: impl FnOnce() -> anyhow::Result<T>) -> Option<T> {
    if let Some(reason) = unavailable() {
        skip_or_fail(&reason);
        return None;
    }
    match start() {
        Ok(started) => Some(started),
        Err(e) => panic!("{what} did not start: {e:#}"),
    }
}

/// Whether [`REQUIRE_ENV`] asks for missing infrastructure to fail tests.
pub fn required() -> bool {
    std::env::var_os(REQUIRE_ENV).is_some_and(|v| !v.is_empty() && v != "0")
}

/// Reports that a test cannot run here: prints `SKIPPED: <reason>` and returns, so the test can
/// return too; panics instead when [`REQUIRE_ENV`] is set.
///
/// # Panics
///
/// When `RELAY_REQUIRE_TESTBED=1`.
pub fn skip_or_fail(reason: &str) {
    assert!(
        !required(),
        "{reason} (required because {REQUIRE_ENV} is set)"
    );
    eprintln!("SKIPPED: {reason}");
}

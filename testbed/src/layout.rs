//! Where `cargo xtask testbed install` puts things, and where the test bed finds them.
//!
//! Everything lives under `~/.cache/relay`: each Debian package extracted with `dpkg-deb -x` into
//! `debs/<package>` (next to a `debs/<package>.stamp` naming the `.deb` it came from), and a busybox
//! root filesystem in `rootfs/busybox` (stamp `rootfs/busybox.stamp`).

use std::path::PathBuf;

/// The packages the test bed extracts. containerd also needs libc6 and runc needs libseccomp2, both
/// of which every Debian system has (apt itself depends on them), so they are not extracted.
pub const PACKAGES: [&str; 3] = ["containerd", "runc", "busybox-static"];

/// `~/.cache/relay`, where slow downloads and builds are kept between runs.
pub fn cache_dir() -> PathBuf {
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
    home.join(".cache").join("relay")
}

/// The directory a package is extracted into.
pub fn package_dir(package: &str) -> PathBuf {
    cache_dir().join("debs").join(package)
}

/// The stamp file naming the `.deb` a package directory was extracted from.
pub fn package_stamp(package: &str) -> PathBuf {
    cache_dir().join("debs").join(format!("{package}.stamp"))
}

/// The directory holding `containerd`, `ctr` and `containerd-shim-runc-v2`.
pub fn containerd_bin_dir() -> PathBuf {
    package_dir("containerd").join("usr/bin")
}

/// The `runc` binary.
pub fn runc() -> PathBuf {
    package_dir("runc").join("usr/sbin/runc")
}

/// The static busybox binary (also handy as a static host program to bind-mount into containers).
pub fn busybox() -> PathBuf {
    package_dir("busybox-static").join("bin/busybox")
}

/// The busybox root filesystem: `/bin` with busybox and a symlink per applet, `/etc/passwd` and
/// `/etc/group` with root and nobody (65534), an empty `/tmp` (1777) and the usual mount points.
pub fn busybox_rootfs() -> PathBuf {
    cache_dir().join("rootfs").join("busybox")
}

/// The stamp file written once [`busybox_rootfs`] is complete.
pub fn busybox_rootfs_stamp() -> PathBuf {
    cache_dir().join("rootfs").join("busybox.stamp")
}

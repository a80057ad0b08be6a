//! Where `cargo xtask testbed install` puts things, and where the test bed finds them.
//!
//! Everything lives under `~/.cache/relay`: each Debian package extracted with `dpkg-deb -x` into
//! `debs/<package>` (next to a `debs/<package>.stamp` naming the `.deb` it came from), and a busybox
//! root filesystem in `rootfs/busybox` (stamp `rootfs/busybox.stamp`).
//!
//! The Kubernetes control plane lives under `kube/`: the Debian packages it needs (Go, etcd,
//! kubectl, ...) extracted together into `kube/root` (stamp `kube/root.stamp`), and
//! `kube-apiserver` and `kube-controller-manager`, built from Debian's `kubernetes` source package,
//! in `kube/bin`.
//!
//! The registry tools (distribution, umoci, skopeo, htpasswd and the libraries they lack) are
//! extracted together into `registry/root` (stamp `registry/root.stamp`).

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

/// The Kubernetes version the test bed builds and runs.
pub const KUBE_VERSION: &str = "v1.20.2";

/// The Debian packages behind the Kubernetes control plane, extracted together into [`kube_root`]:
/// Go 1.19 (compiler and standard library) and Debian's reflect2 and json-iterator (replacing the
/// vendored ones) for the build; rsync and its libraries for `make gen_openapi`; etcd; kubectl;
/// the CNI plugins, whose `loopback` is the real kubelet's whole pod network (hostNetwork pods).
pub const KUBE_PACKAGES: [&str; 10] = [
    "golang-1.19-go",
    "golang-1.19-src",
    "golang-github-modern-go-reflect2-dev",
    "golang-github-json-iterator-go-dev",
    "rsync",
    "libpopt0",
    "libxxhash0",
    "etcd-server",
    "kubernetes-client",
    "containernetworking-plugins",
];

/// `~/.cache/relay/kube`: everything behind the Kubernetes control plane.
pub fn kube_dir() -> PathBuf {
    cache_dir().join("kube")
}

/// The directory [`KUBE_PACKAGES`] are extracted into, together, so that links between packages
/// (Go's `src`) resolve.
pub fn kube_root() -> PathBuf {
    kube_dir().join("root")
}

/// The stamp naming the `.deb` files [`kube_root`] was extracted from, one per line.
pub fn kube_root_stamp() -> PathBuf {
    kube_dir().join("root.stamp")
}

/// The directory holding the binaries built from the `kubernetes` source package.
pub fn kube_bin_dir() -> PathBuf {
    kube_dir().join("bin")
}

/// The `kube-apiserver` binary.
pub fn kube_apiserver() -> PathBuf {
    kube_bin_dir().join("kube-apiserver")
}

/// The `kube-controller-manager` binary.
pub fn kube_controller_manager() -> PathBuf {
    kube_bin_dir().join("kube-controller-manager")
}

/// The `kubelet` binary.
pub fn kubelet() -> PathBuf {
    kube_bin_dir().join("kubelet")
}

/// The `kube-scheduler` binary.
pub fn kube_scheduler() -> PathBuf {
    kube_bin_dir().join("kube-scheduler")
}

/// The directory of the CNI plugins (`loopback`) the kubelet's containerd calls.
pub fn cni_bin_dir() -> PathBuf {
    kube_root().join("usr/lib/cni")
}

/// The `etcd` binary.
pub fn etcd() -> PathBuf {
    kube_root().join("usr/bin/etcd")
}

/// The `kubectl` binary (Debian's, also 1.20.2).
pub fn kubectl() -> PathBuf {
    kube_root().join("usr/bin/kubectl")
}

/// The Debian packages behind the real OCI registry of [`crate::registry`], extracted together
/// into [`registry_root`]: distribution 2.8 (`docker-registry`), `umoci` to build images, `skopeo`
/// to push them and `htpasswd` (apache2-utils) for bcrypt password files; plus the shared
/// libraries skopeo and htpasswd need that a minimal Debian lacks (found with `ldd`), used through
/// [`registry_library_path`].
pub const REGISTRY_PACKAGES: [&str; 10] = [
    "docker-registry",
    "umoci",
    "skopeo",
    "apache2-utils",
    "libgpgme11",
    "libassuan0",
    "libdevmapper1.02.1",
    "libapr1",
    "libaprutil1",
    "libexpat1",
];

/// `~/.cache/relay/registry`: everything behind the real OCI registry.
pub fn registry_dir() -> PathBuf {
    cache_dir().join("registry")
}

/// The directory [`REGISTRY_PACKAGES`] are extracted into, together.
pub fn registry_root() -> PathBuf {
    registry_dir().join("root")
}

/// The stamp naming the `.deb` files [`registry_root`] was extracted from, one per line.
pub fn registry_root_stamp() -> PathBuf {
    registry_dir().join("root.stamp")
}

/// The `LD_LIBRARY_PATH` under which the binaries of [`registry_root`] find the libraries
/// extracted with them.
pub fn registry_library_path() -> std::ffi::OsString {
    let root = registry_root();
    std::env::join_paths([
        root.join("usr/lib/x86_64-linux-gnu"),
        root.join("lib/x86_64-linux-gnu"),
        root.join("usr/lib/aarch64-linux-gnu"),
        root.join("lib/aarch64-linux-gnu"),
    ])
    .unwrap_or_default()
}

/// The `docker-registry` binary (distribution 2.8).
pub fn docker_registry() -> PathBuf {
    registry_root().join("usr/bin/docker-registry")
}

/// The `umoci` binary.
pub fn umoci() -> PathBuf {
    registry_root().join("usr/bin/umoci")
}

/// The `skopeo` binary (run it with [`registry_library_path`]).
pub fn skopeo() -> PathBuf {
    registry_root().join("usr/bin/skopeo")
}

/// The `htpasswd` binary (run it with [`registry_library_path`]).
pub fn htpasswd() -> PathBuf {
    registry_root().join("usr/bin/htpasswd")
}

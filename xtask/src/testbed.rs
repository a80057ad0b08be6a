//! `cargo xtask testbed install`: containerd, runc and a busybox root filesystem for the tests.
//!
//! The Debian packages are fetched with `apt-get download` and unpacked with `dpkg-deb -x` into
//! `~/.cache/relay/debs/<package>` rather than installed: no service starts, nothing lands in
//! `/usr`, and the tests run the binaries from the cache with their own configuration (see the
//! `testbed` crate, which also owns the layout). Work already done is skipped: a package is kept
//! when its stamp exists and its binary answers, the root filesystem when its stamp names the
//! busybox it was built from.
//!
//! The same set serves the CRI tests (`testbed::cri`): Debian's containerd has the CRI plugin
//! built in; the pod sandbox and container images are made from the busybox root filesystem by
//! the test bed itself and imported with `ctr`, so neither a registry nor `umoci` is needed; and
//! the CRI client is plain Rust (prost messages), so neither is `protoc`.
//!
//! It also installs a Kubernetes control plane (etcd, `kube-apiserver`, `kube-controller-manager`,
//! for `testbed::kube`); see [`kube`]. And a real OCI registry with the tools to build and push
//! images (for `testbed::registry`); see [`registry`].

use std::{
    fs,
    os::unix::fs::{PermissionsExt, symlink},
    path::Path,
    process::{Command, Output},
    time::Instant,
};

use anyhow::{Context, bail, ensure};
use testbed::layout;

mod kube;
mod registry;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, clap::Subcommand)]
enum Cmd {
    /// Download and unpack containerd (with its CRI plugin), runc and busybox-static into
    /// ~/.cache/relay (no services started), and build the busybox root filesystem; fetch etcd
    /// and build kube-apiserver and kube-controller-manager 1.20.2 from Debian's source package
    /// (4-10 minutes, once) into ~/.cache/relay/kube. Does nothing when already done.
    Install,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        Cmd::Install => install(),
    }
}

/// Applets the tests rely on; the root filesystem is refused without them. `sleep` is also the
/// CRI pod sandbox's process (`sleep infinity`).
const APPLETS: [&str; 7] = ["sh", "echo", "cat", "sleep", "id", "touch", "printf"];

/// Installs whatever of the test bed is missing.
pub fn install() -> anyhow::Result<()> {
    let started = Instant::now();
    let missing: Vec<&str> = layout::PACKAGES
        .into_iter()
        .filter(|package| !package_ready(package))
        .collect();
    if !missing.is_empty() {
        eprintln!("testbed: fetching {}", missing.join(", "));
        fetch(&missing)?;
    }
    let built = ensure_rootfs()?;
    if missing.is_empty() && !built {
        eprintln!("testbed: containerd, runc and the busybox rootfs are ready (cached)");
    } else {
        eprintln!(
            "testbed: installed in {:.1?} under {}",
            started.elapsed(),
            layout::cache_dir().display()
        );
    }
    registry::install().context("installing the OCI registry tools")?;
    kube::install().context("installing the Kubernetes control plane")
}

/// The command that proves a package's binaries work (and find their shared libraries).
fn check(package: &str) -> Vec<Command> {
    let cmd = |path: &Path, arg: &str| {
        let mut c = Command::new(path);
        c.arg(arg);
        c
    };
    let containerd = layout::containerd_bin_dir();
    match package {
        "containerd" => vec![
            cmd(&containerd.join("containerd"), "--version"),
            cmd(&containerd.join("ctr"), "--version"),
            // Go's flag package: one dash, and `-v` rather than `--version`.
            cmd(&containerd.join("containerd-shim-runc-v2"), "-v"),
        ],
        "runc" => vec![cmd(&layout::runc(), "--version")],
        // busybox has no --version; any applet answering will do.
        _ => vec![cmd(&layout::busybox(), "true")],
    }
}

fn answers(cmd: &mut Command) -> bool {
    cmd.output().is_ok_and(|o| o.status.success())
}

fn package_ready(package: &str) -> bool {
    layout::package_stamp(package).exists() && check(package).iter_mut().all(answers)
}

/// Downloads `packages` and unpacks each into its directory.
fn fetch(packages: &[&str]) -> anyhow::Result<()> {
    let debs = layout::cache_dir().join("debs");
    let download = debs.join(".download");
    if download.exists() {
        fs::remove_dir_all(&download)?;
    }
    fs::create_dir_all(&download)
        .with_context(|| format!("cannot create {}", download.display()))?;
    apt_download(&download, packages)?;
    for package in packages {
        let deb = find_deb(&download, package)?;
        let target = layout::package_dir(package);
        let staging = debs.join(format!(".{package}.tmp"));
        if staging.exists() {
            fs::remove_dir_all(&staging)?;
        }
        quiet(
            Command::new("dpkg-deb")
                .arg("-x")
                .arg(download.join(&deb))
                .arg(&staging),
        )?;
        if target.exists() {
            fs::remove_dir_all(&target)
                .with_context(|| format!("cannot remove {}", target.display()))?;
        }
        fs::rename(&staging, &target)
            .with_context(|| format!("cannot move {} into place", staging.display()))?;
        for mut cmd in check(package) {
            ensure!(
                answers(&mut cmd),
                "{cmd:?} does not answer after unpacking {deb}"
            );
        }
        fs::write(layout::package_stamp(package), &deb)?;
    }
    fs::remove_dir_all(&download)?;
    Ok(())
}

/// `apt-get download`, after `apt-get update` when the package lists are missing or stale.
fn apt_download(dir: &Path, packages: &[&str]) -> anyhow::Result<()> {
    let download = || {
        let mut c = Command::new("apt-get");
        c.current_dir(dir)
            // As root, apt fetches as the `_apt` user, which cannot write under /root.
            .args(["download", "-qq", "-o", "APT::Sandbox::User=root"])
            .args(packages);
        c
    };
    let out = download().output().context("cannot run apt-get download")?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lists_missing = [
        "Unable to locate package",
        "has no installation candidate",
        "Can't select candidate version",
        "404  Not Found",
        "Failed to fetch",
    ]
    .iter()
    .any(|m| stderr.contains(m));
    if !lists_missing {
        bail!("apt-get download failed: {}", stderr.trim());
    }
    eprintln!("testbed: package lists missing or stale, running apt-get update");
    quiet(Command::new("apt-get").args(["update", "-qq"]))?;
    quiet(&mut download())
}

/// The `.deb` of `package` among the downloaded files.
fn find_deb(dir: &Path, package: &str) -> anyhow::Result<String> {
    let prefix = format!("{package}_");
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name.starts_with(&prefix) && name.ends_with(".deb") {
            return Ok(name);
        }
    }
    bail!(
        "apt-get download left no {package}_*.deb in {}",
        dir.display()
    )
}

/// Removes `dir` if it exists and creates it empty.
fn fresh_dir(dir: &Path) -> anyhow::Result<()> {
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    }
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))
}

/// Extracts the `.deb` of each of `packages` (downloaded into `download`) together into `root`,
/// through a staging directory beside it (`.<name>.tmp`) that replaces `root` once complete, so
/// `root` is always the old tree or the whole new one. Returns the `.deb` file names, for a stamp.
fn extract_together(
    download: &Path,
    packages: &[&str],
    root: &Path,
) -> anyhow::Result<Vec<String>> {
    let name = root
        .file_name()
        .with_context(|| format!("{} has no file name", root.display()))?;
    let staging = root.with_file_name(format!(".{}.tmp", name.to_string_lossy()));
    fresh_dir(&staging)?;
    let mut debs = Vec::new();
    for package in packages {
        let deb = find_deb(download, package)?;
        quiet(
            Command::new("dpkg-deb")
                .arg("-x")
                .arg(download.join(&deb))
                .arg(&staging),
        )?;
        debs.push(deb);
    }
    if root.exists() {
        fs::remove_dir_all(root).with_context(|| format!("cannot remove {}", root.display()))?;
    }
    fs::rename(&staging, root)
        .with_context(|| format!("cannot move {} into place", staging.display()))?;
    Ok(debs)
}

/// Runs a command, showing its output only when it fails.
fn quiet(cmd: &mut Command) -> anyhow::Result<()> {
    let Output {
        status,
        stdout,
        stderr,
    } = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    ensure!(
        status.success(),
        "{cmd:?} failed ({status}):\n{}{}",
        String::from_utf8_lossy(&stdout),
        String::from_utf8_lossy(&stderr)
    );
    Ok(())
}

/// Builds the busybox root filesystem unless it is already built from the current busybox;
/// returns whether it built it.
fn ensure_rootfs() -> anyhow::Result<bool> {
    let rootfs = layout::busybox_rootfs();
    let stamp = layout::busybox_rootfs_stamp();
    let source = fs::read_to_string(layout::package_stamp("busybox-static"))
        .context("busybox-static is not unpacked")?;
    if fs::read_to_string(&stamp).ok() == Some(source.clone())
        && rootfs.join("bin/busybox").exists()
    {
        return Ok(false);
    }
    let parent = rootfs.parent().context("rootfs without a parent")?;
    let staging = parent.join(".busybox.tmp");
    if staging.exists() {
        fs::remove_dir_all(&staging)?;
    }
    build_rootfs(&staging)?;
    if rootfs.exists() {
        fs::remove_dir_all(&rootfs)?;
    }
    fs::rename(&staging, &rootfs)
        .with_context(|| format!("cannot move {} into place", staging.display()))?;
    fs::write(&stamp, source)?;
    Ok(true)
}

fn build_rootfs(dir: &Path) -> anyhow::Result<()> {
    // Mount points runc would otherwise create, and the directories a process expects.
    for (sub, mode) in [
        ("", 0o755),
        ("bin", 0o755),
        ("etc", 0o755),
        ("dev", 0o755),
        ("proc", 0o755),
        ("sys", 0o755),
        ("run", 0o755),
        ("root", 0o700),
        ("tmp", 0o1777),
    ] {
        let path = dir.join(sub);
        fs::create_dir_all(&path).with_context(|| format!("cannot create {}", path.display()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))?;
    }
    let busybox = dir.join("bin/busybox");
    fs::copy(layout::busybox(), &busybox).context("cannot copy busybox")?;
    fs::set_permissions(&busybox, fs::Permissions::from_mode(0o755))?;

    let list = Command::new(layout::busybox())
        .arg("--list")
        .output()
        .context("cannot run busybox --list")?;
    ensure!(list.status.success(), "busybox --list failed");
    let applets = String::from_utf8(list.stdout).context("busybox --list is not UTF-8")?;
    let applets: Vec<&str> = applets
        .lines()
        .filter(|a| !a.is_empty() && *a != "busybox" && !a.contains('/'))
        .collect();
    for wanted in APPLETS {
        ensure!(applets.contains(&wanted), "busybox has no {wanted} applet");
    }
    for applet in applets {
        symlink("busybox", dir.join("bin").join(applet))
            .with_context(|| format!("cannot link applet {applet}"))?;
    }

    fs::write(
        dir.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )?;
    fs::write(dir.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n")?;
    Ok(())
}

//! `cargo xtask images`: the container images of a cluster install, built without Docker.
//!
//! Every image is one layer on an empty base: a static (musl) binary, `/etc/passwd` and
//! `/etc/group` (root and `nonroot`, 65532), the build machine's CA bundle at
//! `/etc/ssl/certs/ca-certificates.crt` (object storage, registries and the Kubernetes API are
//! reached over TLS with rustls and the system's roots) and an empty `/tmp`. umoci assembles them
//! into an OCI layout; each image is then written as an `oci-archive` tarball
//! (`target/images/<name>.tar`, see [`testbed::oci_archive`]) that `kind load image-archive` and
//! `ctr images import` take as is, and, with `--push`, copied to a registry by skopeo. umoci and
//! skopeo are the test bed's (`cargo xtask testbed install`).
//!
//! | image          | binary                           | user  | why that user                     |
//! |----------------|----------------------------------|-------|-----------------------------------|
//! | `metadata-api` | `/usr/local/bin/metadata-api`    | 65532 | a server, nothing privileged      |
//! | `operator`     | `/usr/local/bin/operator`        | 65532 | a controller, nothing privileged  |
//! | `collector`    | `/usr/local/bin/collector`       | 0     | eBPF and other processes' `/proc` |
//! | `tools`        | `/entrypoint` (the `dist` build) | 0     | see below                         |
//!
//! The tools image runs as root because its only job, `/entrypoint install /relay/lib` in the
//! operator's tools Job, writes into a fresh volume whose root directory most provisioners make
//! owned by root (the Job sets no `fsGroup`); the Job drops every capability, so root there can
//! write what it owns and nothing else.
//!
//! C code in the dependencies (aws-lc-sys under rustls, object_store and kube) needs a C compiler
//! for musl: Debian's `musl-tools` (`musl-gcc`), installed with apt-get when missing, as cc-rs
//! looks for `x86_64-linux-musl-gcc` unless `CC_x86_64_unknown_linux_musl` names one.

use std::{
    ffi::OsString,
    fs,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, bail, ensure};
use testbed::layout;

use crate::{
    dist::{self, MUSL},
    util::{root, run},
};

/// Where the images get their CA certificates from (Debian's `ca-certificates`).
const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The unprivileged user of the server images, as in distroless' `nonroot`.
pub const NONROOT: u32 = 65532;

/// The `PATH` of every image.
const PATH: &str = "PATH=/usr/local/bin:/usr/bin:/bin";

/// The repository part of the images' names, before the image name: `localhost/relay/<name>`.
pub const LOCAL_PREFIX: &str = "localhost/relay";

/// The images this task knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Name {
    MetadataApi,
    Operator,
    Collector,
    Tools,
}

impl Name {
    const ALL: [Self; 4] = [
        Self::MetadataApi,
        Self::Operator,
        Self::Collector,
        Self::Tools,
    ];

    /// The image (and package) name.
    fn as_str(self) -> &'static str {
        match self {
            Self::MetadataApi => "metadata-api",
            Self::Operator => "operator",
            Self::Collector => "collector",
            Self::Tools => "tools",
        }
    }

    fn user(self) -> u32 {
        match self {
            Self::MetadataApi | Self::Operator => NONROOT,
            Self::Collector | Self::Tools => 0,
        }
    }

    /// Where the binary goes in the image (also the entrypoint).
    fn binary_path(self) -> String {
        match self {
            Self::Tools => "/entrypoint".to_owned(),
            other => format!("/usr/local/bin/{}", other.as_str()),
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The images' tag.
    #[arg(long, default_value = "dev")]
    pub tag: String,
    /// Cargo profile of the binaries (`release` or `dev`; dev builds lose their debug info in the
    /// image). The tools image always holds the `dist` entrypoint of `cargo xtask
    /// build-entrypoint`, as tenant containers run it.
    #[arg(long, default_value = "release")]
    pub profile: String,
    /// Build only this image (repeatable); all four by default.
    #[arg(long = "image", value_enum)]
    pub images: Vec<Name>,
    /// Also push each image to `<PREFIX>/<name>:<tag>` with skopeo, e.g.
    /// `europe-west1-docker.pkg.dev/my-project/relay` (credentials from skopeo's auth file,
    /// `REGISTRY_AUTH_FILE`).
    #[arg(long, value_name = "PREFIX")]
    pub push: Option<String>,
    /// Push over plain HTTP or without verifying the registry's certificate.
    #[arg(long, requires = "push")]
    pub insecure: bool,
    /// Directory for the archives (default `target/images`).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

impl Args {
    /// What `cargo xtask test` builds for system-tests/tests/images.rs and
    /// system-tests/tests/deployed.rs (which installs all four on the test bed's node): every image, dev profile, into
    /// `target/images`. The operator and collector dev musl builds add about 2.5 minutes to a cold
    /// build on an idle 2-vCPU machine; measured 11.5 minutes (695 s, after the metadata-api
    /// image) on one shared with two other builds (load 5 to 8).
    pub fn for_tests() -> Self {
        Self {
            tag: "dev".to_owned(),
            profile: "dev".to_owned(),
            images: Name::ALL.to_vec(),
            push: None,
            insecure: false,
            out: None,
        }
    }
}

/// A built image: which one, its full name and its archive.
#[derive(Debug, Clone)]
pub struct Built {
    pub image: Name,
    pub name: String,
    pub archive: PathBuf,
}

pub fn run_task(args: Args) -> anyhow::Result<()> {
    let start = Instant::now();
    let built = build(&args)?;
    for image in &built {
        let size = fs::metadata(&image.archive)?.len();
        println!(
            "{} -> {} ({:.1} MiB)",
            image.name,
            image.archive.display(),
            size as f64 / f64::from(1 << 20)
        );
    }
    if let Some(prefix) = &args.push {
        for image in &built {
            let target = format!(
                "{}/{}:{}",
                prefix.trim_end_matches('/'),
                image.image.as_str(),
                args.tag
            );
            push(&out_dir(&args), &image.archive, &target, args.insecure)?;
            println!("pushed {target}");
        }
    }
    println!("{} images in {:.0?}", built.len(), start.elapsed());
    Ok(())
}

fn selected(images: &[Name]) -> Vec<Name> {
    if images.is_empty() {
        Name::ALL.to_vec()
    } else {
        Name::ALL
            .into_iter()
            .filter(|n| images.contains(n))
            .collect()
    }
}

/// Builds the binaries and the images `args` asks for; returns them in [`Name::ALL`] order.
pub fn build(args: &Args) -> anyhow::Result<Vec<Built>> {
    let names = selected(&args.images);
    ensure!(
        !args.tag.is_empty()
            && args
                .tag
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')),
        "invalid tag {:?}",
        args.tag
    );
    if let Some(reason) = testbed::registry::unavailable() {
        bail!("umoci and skopeo are needed: {reason}");
    }
    let ca = fs::read(CA_BUNDLE).with_context(|| {
        format!("cannot read {CA_BUNDLE} for the images (Debian: apt-get install ca-certificates)")
    })?;
    let out = out_dir(args);
    fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;

    let mut binaries = Vec::new();
    for &name in &names {
        let binary = match name {
            Name::Tools => dist::build_entrypoint().context("building the static entrypoint")?,
            other => build_binary(other, &args.profile)?,
        };
        binaries.push(binary);
    }

    let work = fresh_dir(&out.join(".work"))?;
    let layout_dir = work.join("layout");
    let mut init = args_of(["init", "--layout"]);
    init.push(layout_dir.clone().into_os_string());
    umoci(&mut init)?;
    let mut built = Vec::new();
    for (&name, binary) in names.iter().zip(&binaries) {
        let full = format!("{LOCAL_PREFIX}/{}:{}", name.as_str(), args.tag);
        // umoci 0.4.7's `insert` writes layers without the tar end (GNU tar and containerd
        // stop with "unexpected EOF"); unpack and repack write whole ones.
        let image = format!("{}:{}", layout_dir.display(), name.as_str());
        let bundle = work.join(name.as_str());
        umoci(&mut args_of(["new", "--image", &image]))?;
        let rootless = if is_root()? { None } else { Some("--rootless") };
        let mut unpack = args_of(["unpack"]);
        unpack.extend(rootless.map(OsString::from));
        unpack.extend([
            "--image".into(),
            image.clone().into(),
            bundle.clone().into(),
        ]);
        umoci(&mut unpack)?;
        // The tools image's entrypoint is the dist build, stripped already.
        let strip_debug = args.profile == "dev" && name != Name::Tools;
        stage_rootfs(&bundle.join("rootfs"), name, binary, &ca, strip_debug)?;
        let mut repack = args_of(["repack"]);
        repack.extend(rootless.map(OsString::from));
        repack.extend(["--image".into(), image.clone().into()]);
        repack.push(
            format!(
                "--history.created_by=cargo xtask images ({})",
                name.as_str()
            )
            .into(),
        );
        repack.push(bundle.into_os_string());
        umoci(&mut repack)?;
        let user = name.user();
        let mut config = args_of([
            "config",
            "--image",
            &image,
            "--os",
            "linux",
            "--architecture",
            "amd64",
            "--author",
            "relay (cargo xtask images)",
            "--config.workingdir",
            "/",
            "--config.env",
            PATH,
        ]);
        config.push(format!("--config.user={user}:{user}").into());
        config.push(format!("--config.entrypoint={}", name.binary_path()).into());
        umoci(&mut config)?;
        let archive = out.join(format!("{}.tar", name.as_str()));
        testbed::oci_archive::pack(&layout_dir, name.as_str(), &full, &archive)
            .with_context(|| format!("cannot write {}", archive.display()))?;
        built.push(Built {
            image: name,
            name: full,
            archive,
        });
    }
    fs::remove_dir_all(&work).with_context(|| format!("cannot remove {}", work.display()))?;
    Ok(built)
}

/// Where the archives go: `--out`, or `target/images`.
pub fn out_dir(args: &Args) -> PathBuf {
    args.out
        .clone()
        .unwrap_or_else(|| target_dir().join("images"))
}

/// `dir`, emptied (a previous run may have left it behind).
fn fresh_dir(dir: &Path) -> anyhow::Result<PathBuf> {
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    }
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir.to_owned())
}

/// Whether this process runs as root: `/proc/self` belongs to the effective user.
fn is_root() -> anyhow::Result<bool> {
    Ok(fs::metadata("/proc/self")
        .context("cannot read /proc/self")?
        .uid()
        == 0)
}

/// `CARGO_TARGET_DIR`, or the workspace's `target`.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from)
}

/// Builds `name`'s binary for musl with `profile`; returns its path.
fn build_binary(name: Name, profile: &str) -> anyhow::Result<PathBuf> {
    let package = name.as_str();
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root())
        .args(["build", "--quiet", "--target", MUSL, "--profile", profile])
        .args(["-p", package, "--bin", package]);
    ensure_musl_target()?;
    if std::env::var_os("CC_x86_64_unknown_linux_musl").is_none() {
        cmd.env("CC_x86_64_unknown_linux_musl", musl_gcc()?);
    }
    if name == Name::Collector {
        // The collector embeds its eBPF object, which its build script builds unless skipped.
        let linker = crate::ebpf::install().context("installing the eBPF toolchain")?;
        let path = std::env::join_paths(std::iter::once(linker).chain(std::env::split_paths(
            &std::env::var_os("PATH").unwrap_or_default(),
        )))?;
        cmd.env("PATH", path).env_remove("AYA_BUILD_SKIP");
    }
    run(&mut cmd).with_context(|| format!("building {package} for {MUSL}"))?;
    let dir = match profile {
        "dev" | "test" => "debug",
        "release" | "bench" => "release",
        other => other,
    };
    let bin = target_dir().join(MUSL).join(dir).join(package);
    ensure!(
        dist::is_static(&bin)?,
        "{} is not statically linked",
        bin.display()
    );
    Ok(bin)
}

/// Adds the musl target to the pinned toolchain (a no-op when it is there).
fn ensure_musl_target() -> anyhow::Result<()> {
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

/// `musl-gcc`, installed from Debian's `musl-tools` when missing.
pub(crate) fn musl_gcc() -> anyhow::Result<&'static str> {
    let answers = || {
        Command::new("musl-gcc")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !answers() {
        run(Command::new("apt-get")
            .args([
                "install",
                "-y",
                "-qq",
                "--no-install-recommends",
                "musl-tools",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive"))
        .context("installing musl-tools (musl-gcc), which aws-lc-sys needs for musl")?;
        ensure!(
            answers(),
            "musl-gcc does not run after installing musl-tools"
        );
    }
    Ok("musl-gcc")
}

/// Writes the image's root filesystem into `rootfs`: the binary (without debug info when
/// `strip_debug`, as dev builds carry hundreds of MB of it), users, CA bundle, `/tmp`.
fn stage_rootfs(
    rootfs: &Path,
    name: Name,
    binary: &Path,
    ca: &[u8],
    strip_debug: bool,
) -> anyhow::Result<()> {
    let write = |path: &str, bytes: &[u8], mode: u32| -> anyhow::Result<()> {
        let path = rootfs.join(path.trim_start_matches('/'));
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::write(&path, bytes).with_context(|| format!("cannot write {}", path.display()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))?;
        Ok(())
    };
    fs::create_dir_all(rootfs)?;
    fs::set_permissions(rootfs, fs::Permissions::from_mode(0o755))?;
    write(
        "etc/passwd",
        format!(
            "root:x:0:0:root:/root:/sbin/nologin\n\
             nonroot:x:{NONROOT}:{NONROOT}:nonroot:/home/nonroot:/sbin/nologin\n"
        )
        .as_bytes(),
        0o644,
    )?;
    write(
        "etc/group",
        format!("root:x:0:\nnonroot:x:{NONROOT}:\n").as_bytes(),
        0o644,
    )?;
    write(CA_BUNDLE, ca, 0o644)?;
    let tmp = rootfs.join("tmp");
    fs::create_dir_all(&tmp)?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o1777))?;
    let target = rootfs.join(name.binary_path().trim_start_matches('/'));
    if let Some(parent) = target.parent() {
        fs::create_dir_all(parent)?;
    }
    if strip_debug {
        run(Command::new("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(&target)
            .arg(binary))
        .context("stripping debug info (binutils' strip)")?;
    } else {
        fs::copy(binary, &target)
            .with_context(|| format!("cannot copy {} into the image", binary.display()))?;
    }
    fs::set_permissions(&target, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

fn args_of<const N: usize>(args: [&str; N]) -> Vec<OsString> {
    args.into_iter().map(OsString::from).collect()
}

/// A command running one of the test bed's registry tools, with its libraries.
fn tool(path: PathBuf) -> Command {
    let mut cmd = Command::new(path);
    cmd.env("LD_LIBRARY_PATH", layout::registry_library_path());
    cmd
}

fn umoci(args: &mut Vec<OsString>) -> anyhow::Result<()> {
    run(tool(layout::umoci()).args(args.drain(..)))
}

/// Copies the archive to `docker://<target>` with skopeo.
fn push(out: &Path, archive: &Path, target: &str, insecure: bool) -> anyhow::Result<()> {
    let work = fresh_dir(&out.join(".push"))?;
    let policy = work.join("policy.json");
    fs::write(
        &policy,
        r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
    )?;
    let mut cmd = tool(layout::skopeo());
    cmd.env("TMPDIR", &work)
        .arg("--policy")
        .arg(&policy)
        .args(["copy", "--quiet"]);
    if insecure {
        cmd.arg("--dest-tls-verify=false");
    }
    cmd.arg(format!("oci-archive:{}", archive.display()))
        .arg(format!("docker://{target}"));
    run(&mut cmd).with_context(|| format!("pushing {target}"))?;
    fs::remove_dir_all(&work).with_context(|| format!("cannot remove {}", work.display()))
}

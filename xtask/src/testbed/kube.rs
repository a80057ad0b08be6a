//! `cargo xtask testbed install`, Kubernetes part: etcd, kubectl, and `kube-apiserver` and
//! `kube-controller-manager` 1.20.2 built offline from Debian's own `kubernetes` source package.
//!
//! Everything lives under `~/.cache/relay/kube` (see `testbed::layout`):
//!
//! - `apt/`: a private APT configuration (with `deb-src` lines) and its package lists, so the
//!   system's sources and lists stay untouched;
//! - `root/`: [`layout::KUBE_PACKAGES`] extracted together with `dpkg-deb -x` (Go 1.19, etcd,
//!   kubectl, rsync, Debian's reflect2 and json-iterator);
//! - `bin/`: the two binaries built from the source package, the only slow part (4-10 minutes
//!   on 2 cores). The source tree and Go's build cache are removed once they are built.
//!
//! Each part is skipped when it is already there: the binaries when they answer `--version` with
//! [`layout::KUBE_VERSION`] and were built with the current recipe (flags, replaced packages; see
//! `kube/bin/.recipe`), the packages when their stamp exists and etcd and kubectl answer.

use std::{
    ffi::OsString,
    fs::{self, File},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, bail, ensure};
use nix::fcntl::{Flock, FlockArg};
use testbed::layout;

use super::{fresh_dir, quiet};

/// The Debian release whose packages and sources are used: Go 1.19 and Kubernetes 1.20.2 are
/// bookworm's.
const SUITE: &str = "bookworm";

/// The Debian mirrors, overridable for machines that reach Debian through another one.
const MIRROR_ENV: &str = "RELAY_DEBIAN_MIRROR";
const SECURITY_MIRROR_ENV: &str = "RELAY_DEBIAN_SECURITY_MIRROR";
const MIRROR: &str = "http://deb.debian.org/debian";
const SECURITY_MIRROR: &str = "http://deb.debian.org/debian-security";

/// The commands built from the source package, next to each other in `kube/bin`, in one `go build`
/// so that the packages they share compile once.
const COMMANDS: [&str; 4] = [
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
];

/// Vendored packages replaced by Debian's: the vendored `github.com/modern-go/reflect2` 1.0.1
/// crashes with Go >= 1.18 on the first custom resource, and json-iterator must match it.
const VENDOR_REPLACEMENTS: [&str; 2] = [
    "github.com/modern-go/reflect2",
    "github.com/json-iterator/go",
];

/// Installs whatever of the Kubernetes control plane is missing.
pub fn install() -> anyhow::Result<()> {
    let started = Instant::now();
    let dir = layout::kube_dir();
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    // Two installs at once (say, two checkouts running their tests) would trip over each other's
    // staging directories.
    let lock = File::create(dir.join(".lock")).context("cannot create the install lock")?;
    let _lock = Flock::lock(lock, FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .context("cannot lock the Kubernetes cache")?;

    if root_ready() && binaries_ready() {
        eprintln!(
            "testbed: kube: etcd, kubectl, kube-apiserver and kube-controller-manager {} are ready (cached)",
            layout::KUBE_VERSION
        );
        return Ok(());
    }
    let apt = Apt::prepare()?;
    if !root_ready() {
        step("fetching and extracting the Debian packages", || {
            extract_root(&apt)
        })?;
    }
    if !binaries_ready() {
        build(&apt)?;
    }
    ensure!(
        root_ready(),
        "etcd or kubectl does not answer after the install"
    );
    ensure!(
        binaries_ready(),
        "the built binaries do not answer --version with {}",
        layout::KUBE_VERSION
    );
    eprintln!(
        "testbed: kube: installed in {:.1?} under {}",
        started.elapsed(),
        dir.display()
    );
    Ok(())
}

/// Runs one step of the install, saying what it does and how long it took.
fn step<T>(what: &str, f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    eprintln!("testbed: kube: {what} ...");
    let started = Instant::now();
    let out = f().with_context(|| format!("{what} failed"))?;
    eprintln!("testbed: kube: {what}: done in {:.1?}", started.elapsed());
    Ok(out)
}

/// Whether `cmd` runs successfully and prints `want` (on stdout or stderr).
fn answers(cmd: &mut Command, want: &str) -> bool {
    cmd.output().is_ok_and(|o| {
        o.status.success()
            && (String::from_utf8_lossy(&o.stdout).contains(want)
                || String::from_utf8_lossy(&o.stderr).contains(want))
    })
}

fn root_ready() -> bool {
    let stamp = fs::read_to_string(layout::kube_root_stamp()).unwrap_or_default();
    // A root extracted before a package joined the list is extracted again.
    layout::KUBE_PACKAGES
        .iter()
        .all(|p| stamp.lines().any(|l| l.starts_with(&format!("{p}_"))))
        && answers(
            Command::new(layout::etcd()).arg("--version"),
            "etcd Version",
        )
        && answers(
            Command::new(layout::kubectl()).args(["version", "--client"]),
            "Client Version",
        )
}

/// Whether the binaries were built the way [`build_recipe`] says and answer `--version`.
fn binaries_ready() -> bool {
    let version = format!("Kubernetes {}", layout::KUBE_VERSION);
    build_recipe().is_ok_and(|recipe| fs::read_to_string(build_stamp()).ok() == Some(recipe))
        && [
            layout::kube_apiserver(),
            layout::kube_controller_manager(),
            layout::kube_scheduler(),
            layout::kubelet(),
        ]
        .iter()
        .all(|bin| answers(Command::new(bin).arg("--version"), &version))
}

/// The stamp next to the binaries, holding the [`build_recipe`] they were built with.
fn build_stamp() -> PathBuf {
    layout::kube_bin_dir().join(".recipe")
}

/// What the binaries depend on besides the source package: changing the way they are built
/// changes this, and the next install builds them again.
fn build_recipe() -> anyhow::Result<String> {
    Ok(format!(
        "commands: {}\nvendor replaced: {}\nldflags: {}\n",
        COMMANDS.join(" "),
        VENDOR_REPLACEMENTS.join(" "),
        ldflags()?
    ))
}

/// The linker flags: stripped, with the version stamped in.
fn ldflags() -> anyhow::Result<String> {
    let version = layout::KUBE_VERSION;
    let minor = version
        .split('.')
        .nth(1)
        .context("KUBE_VERSION without a minor version")?;
    // Both copies, as hack/lib/version.sh does: with component-base's alone, `--version` says
    // v1.20.2 but `/version` still answers v0.0.0-master. gitCommit is already in the tarball
    // (`git archive` filled it in).
    let mut ldflags = String::from("-s -w");
    for package in ["client-go/pkg/version", "component-base/version"] {
        for (key, value) in [
            ("gitVersion", version),
            ("gitMajor", "1"),
            ("gitMinor", minor),
            ("gitTreeState", "clean"),
        ] {
            ldflags.push_str(&format!(
                " -X k8s.io/kubernetes/vendor/k8s.io/{package}.{key}={value}"
            ));
        }
    }
    Ok(ldflags)
}

/// A private APT: Debian's binary and source indexes in `kube/apt`, fetched on first use.
struct Apt {
    dir: PathBuf,
    config: PathBuf,
}

impl Apt {
    /// Writes the configuration and the sources list (the files are cheap; the lists are kept).
    fn prepare() -> anyhow::Result<Self> {
        let dir = layout::kube_dir().join("apt");
        for sub in [
            "lists/partial",
            "cache/archives/partial",
            "sources.list.d",
            "preferences.d",
        ] {
            fs::create_dir_all(dir.join(sub))?;
        }
        let env_or = |name: &str, default: &str| {
            std::env::var(name)
                .ok()
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| default.to_owned())
        };
        let (mirror, security) = (
            env_or(MIRROR_ENV, MIRROR),
            env_or(SECURITY_MIRROR_ENV, SECURITY_MIRROR),
        );
        let keyring = "/usr/share/keyrings/debian-archive-keyring.gpg";
        ensure!(
            Path::new(keyring).exists(),
            "{keyring} is missing (package debian-archive-keyring)"
        );
        let mut sources = String::new();
        for (uri, suite) in [
            (&mirror, SUITE.to_owned()),
            (&mirror, format!("{SUITE}-updates")),
            (&security, format!("{SUITE}-security")),
        ] {
            for kind in ["deb", "deb-src"] {
                sources.push_str(&format!(
                    "{kind} [signed-by={keyring}] {uri} {suite} main\n"
                ));
            }
        }
        fs::write(dir.join("sources.list"), sources)?;
        let path = |sub: &str| -> anyhow::Result<String> {
            let p = dir.join(sub);
            let s = p
                .to_str()
                .with_context(|| format!("{} is not UTF-8", p.display()))?;
            ensure!(!s.contains('"'), "unexpected quote in {s}");
            Ok(s.to_owned())
        };
        let config = dir.join("apt.conf");
        fs::write(
            &config,
            format!(
                "Dir::Etc::SourceList \"{}\";\n\
                 Dir::Etc::SourceParts \"{}\";\n\
                 Dir::Etc::Preferences \"{}\";\n\
                 Dir::Etc::PreferencesParts \"{}\";\n\
                 Dir::State::Lists \"{}\";\n\
                 Dir::Cache \"{}\";\n\
                 Acquire::Languages \"none\";\n\
                 APT::Get::Only-Source \"true\";\n\
                 // As root, apt fetches as the `_apt` user, which cannot write under /root.\n\
                 APT::Sandbox::User \"root\";\n",
                path("sources.list")?,
                path("sources.list.d")?,
                path("preferences")?,
                path("preferences.d")?,
                path("lists")?,
                path("cache")?,
            ),
        )?;
        Ok(Self { dir, config })
    }

    fn command(&self, cwd: &Path, args: &[&str]) -> Command {
        let mut c = Command::new("apt-get");
        c.current_dir(cwd)
            .env("APT_CONFIG", &self.config)
            .args(args);
        c
    }

    /// Whether `apt-get update` has fetched the lists (binary and source) at least once.
    fn has_lists(&self) -> bool {
        let Ok(entries) = fs::read_dir(self.dir.join("lists")) else {
            return false;
        };
        let names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.iter().any(|n| n.contains("_Packages"))
            && names.iter().any(|n| n.contains("_Sources"))
    }

    fn update(&self) -> anyhow::Result<()> {
        step("apt-get update (private lists with deb-src)", || {
            quiet(&mut self.command(&self.dir, &["update", "-qq"]))
        })
    }

    /// Runs `apt-get <args>` in `cwd`; when it fails because the lists are missing or stale,
    /// updates them and tries once more.
    fn fetch(&self, cwd: &Path, args: &[&str]) -> anyhow::Result<()> {
        if !self.has_lists() {
            self.update()?;
        }
        let out = self
            .command(cwd, args)
            .output()
            .context("cannot run apt-get")?;
        if out.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stale = [
            "Unable to locate",
            "has no installation candidate",
            "Can't select candidate version",
            "404  Not Found",
            "Failed to fetch",
            "Unable to find a source package",
        ]
        .iter()
        .any(|m| stderr.contains(m));
        if !stale {
            bail!("apt-get {} failed: {}", args.join(" "), stderr.trim());
        }
        eprintln!("testbed: kube: package lists stale, updating them");
        self.update()?;
        quiet(&mut self.command(cwd, args))
    }
}

/// Downloads [`layout::KUBE_PACKAGES`] and extracts them together into [`layout::kube_root`].
fn extract_root(apt: &Apt) -> anyhow::Result<()> {
    let kube = layout::kube_dir();
    let download = kube.join(".debs");
    fresh_dir(&download)?;
    let mut args = vec!["download", "-qq"];
    args.extend(layout::KUBE_PACKAGES);
    apt.fetch(&download, &args)?;
    let debs = super::extract_together(&download, &layout::KUBE_PACKAGES, &layout::kube_root())?;
    fs::write(layout::kube_root_stamp(), debs.join("\n") + "\n")?;
    fs::remove_dir_all(&download)?;
    Ok(())
}

/// Builds the binaries from the `kubernetes` source package into `kube/bin`.
fn build(apt: &Apt) -> anyhow::Result<()> {
    let build = layout::kube_dir().join("build");
    let gopath = build.join("gopath");
    let tree = gopath.join("src/k8s.io/kubernetes");
    let tree_stamp = build.join("tree.stamp");
    if !tree_stamp.exists() {
        let tarball = step("downloading the kubernetes source package", || {
            source_tarball(apt)
        })?;
        step("unpacking the source tree and replacing reflect2", || {
            fresh_dir(&build)?;
            unpack(&tarball, &tree)?;
            replace_vendored(&tree)
        })?;
        fs::write(&tree_stamp, "")?;
    }
    let env = BuildEnv::new(&build)?;
    step("make gen_openapi", || {
        crate::util::run(
            env.apply(Command::new("make").current_dir(&tree))
                .arg("gen_openapi"),
        )
    })?;
    let out = build.join("out");
    fresh_dir(&out)?;
    let ldflags = ldflags()?;
    let what = format!(
        "go build {} (4-10 minutes on 2 cores, silent)",
        COMMANDS.join(" ")
    );
    step(&what, || {
        let mut go = Command::new(env.go());
        go.current_dir(&tree)
            .args(["build", "-trimpath", "-ldflags", &ldflags, "-o"])
            .arg(format!("{}/", out.display()));
        for cmd in COMMANDS {
            go.arg(format!("./cmd/{cmd}"));
        }
        crate::util::run(env.apply(&mut go))
    })?;
    let bin = layout::kube_bin_dir();
    fs::create_dir_all(&bin)?;
    for cmd in COMMANDS {
        let staged = bin.join(format!(".{cmd}.tmp"));
        fs::copy(out.join(cmd), &staged).with_context(|| format!("cannot copy {cmd}"))?;
        fs::rename(&staged, bin.join(cmd))?;
    }
    fs::write(build_stamp(), build_recipe()?)?;
    ensure!(
        binaries_ready(),
        "the built binaries do not answer --version with {}",
        layout::KUBE_VERSION
    );
    // The tree (with generated code) and Go's cache take gigabytes; the binaries are all we keep.
    fs::remove_dir_all(&build).with_context(|| format!("cannot remove {}", build.display()))?;
    let _ = fs::remove_dir_all(layout::kube_dir().join("src"));
    Ok(())
}

/// Downloads the `kubernetes` source package (once) and returns its `.orig.tar.gz`.
fn source_tarball(apt: &Apt) -> anyhow::Result<PathBuf> {
    let src = layout::kube_dir().join("src");
    fs::create_dir_all(&src)?;
    if let Ok(tarball) = find_orig(&src) {
        return Ok(tarball);
    }
    apt.fetch(&src, &["source", "--download-only", "-qq", "kubernetes"])?;
    find_orig(&src)
}

fn find_orig(dir: &Path) -> anyhow::Result<PathBuf> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if name.starts_with("kubernetes_") && name.ends_with(".orig.tar.gz") {
            return Ok(path);
        }
    }
    bail!("no kubernetes_*.orig.tar.gz in {}", dir.display())
}

/// Unpacks the source tarball (one top-level directory) as `tree`.
fn unpack(tarball: &Path, tree: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(tree)?;
    quiet(
        Command::new("tar")
            .arg("-xzf")
            .arg(tarball)
            .arg("-C")
            .arg(tree)
            .arg("--strip-components=1"),
    )?;
    ensure!(
        tree.join("cmd/kube-apiserver").is_dir() && tree.join("vendor").is_dir(),
        "{} does not hold a kubernetes tree with vendor/",
        tarball.display()
    );
    Ok(())
}

/// Puts Debian's reflect2 and json-iterator in place of the vendored ones.
fn replace_vendored(tree: &Path) -> anyhow::Result<()> {
    let gocode = layout::kube_root().join("usr/share/gocode/src");
    for package in VENDOR_REPLACEMENTS {
        let (from, to) = (gocode.join(package), tree.join("vendor").join(package));
        ensure!(from.is_dir(), "{} is missing", from.display());
        fs::remove_dir_all(&to).with_context(|| format!("cannot remove {}", to.display()))?;
        quiet(Command::new("cp").arg("-rL").arg(&from).arg(&to))?;
    }
    Ok(())
}

/// The environment of the offline build: GOPATH mode, Go 1.19 and rsync from the extracted
/// packages, no network, no cgo.
struct BuildEnv {
    goroot: PathBuf,
    vars: Vec<(&'static str, OsString)>,
}

impl BuildEnv {
    fn new(build: &Path) -> anyhow::Result<Self> {
        let root = layout::kube_root();
        let goroot = root.join("usr/lib/go-1.19");
        // rsync finds its libraries (libpopt, libxxhash) in the extracted packages.
        let tools = build.join("tools");
        fs::create_dir_all(&tools)?;
        let rsync = tools.join("rsync");
        fs::write(
            &rsync,
            format!(
                "#!/bin/sh\nLD_LIBRARY_PATH='{}' exec '{}' \"$@\"\n",
                root.join("usr/lib/x86_64-linux-gnu").display(),
                root.join("usr/bin/rsync").display()
            ),
        )?;
        fs::set_permissions(&rsync, fs::Permissions::from_mode(0o755))?;
        let path = std::env::join_paths([goroot.join("bin"), tools].into_iter().chain(
            std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()),
        ))?;
        let vars = vec![
            ("PATH", path),
            ("GOROOT", goroot.clone().into_os_string()),
            ("GOPATH", build.join("gopath").into_os_string()),
            ("GOCACHE", build.join("gocache").into_os_string()),
            ("GO111MODULE", "off".into()),
            ("GOPROXY", "off".into()),
            ("GOFLAGS", "".into()),
            ("CGO_ENABLED", "0".into()),
        ];
        Ok(Self { goroot, vars })
    }

    fn go(&self) -> PathBuf {
        self.goroot.join("bin/go")
    }

    fn apply<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        cmd.envs(self.vars.iter().map(|(k, v)| (k, v)))
    }
}

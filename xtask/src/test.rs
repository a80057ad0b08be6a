//! `cargo xtask test`: everything CI runs, installing what the tests need first.

use std::{path::PathBuf, process::Command};

use anyhow::Context;

use crate::util::{self, cache_dir, run as sh};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Skip the short fuzzing run.
    #[arg(long)]
    pub no_fuzz: bool,
    /// Seconds per fuzz target.
    #[arg(long, default_value_t = 10)]
    pub fuzz_seconds: u64,
}

/// Python packages of the storage emulators, pinned so a cached venv is reused only when it matches.
const EMULATORS: &[&str] = &["moto[server]==5.2.5", "gcp-storage-emulator==2026.7.19"];

/// Creates (once) a venv under ~/.cache with the S3 and GCS emulators; returns its bin directory.
pub fn emulators() -> anyhow::Result<PathBuf> {
    let venv = cache_dir().join("venv");
    let bin = venv.join("bin");
    let stamp = venv.join("relay-packages.txt");
    let want = EMULATORS.join("\n");
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(want.as_str()) {
        return Ok(bin);
    }
    std::fs::create_dir_all(cache_dir())?;
    sh(Command::new("python3")
        .args(["-m", "venv", "--clear"])
        .arg(&venv))?;
    sh(Command::new(bin.join("pip"))
        .args(["install", "--quiet", "--disable-pip-version-check"])
        .args(EMULATORS))?;
    std::fs::write(&stamp, want)?;
    Ok(bin)
}

fn has(cmd: &str, arg: &str) -> bool {
    Command::new(cmd)
        .arg(arg)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// What the tests need, installed; returns the `PATH` that finds the emulators and bpf-linker.
fn prepare() -> anyhow::Result<std::ffi::OsString> {
    let venv_bin = emulators().context("installing the storage emulators")?;
    crate::testbed::install().context("installing the container test bed")?;
    let linker_bin = crate::ebpf::install().context("installing the eBPF toolchain")?;
    Ok(std::env::join_paths(
        [venv_bin, linker_bin]
            .into_iter()
            .chain(std::env::split_paths(
                &std::env::var_os("PATH").unwrap_or_default(),
            )),
    )?)
}

/// A shell script that unmounts tracefs, debugfs and the BPF filesystem wherever they are mounted
/// (in the private mount namespace it runs in), says so, and runs its arguments.
const BARE_KERNEL_FS: &str = r#"
for fs in tracefs debugfs bpf; do
  awk -v t="$fs" '$3 == t {print $2}' /proc/self/mounts | sort -r | while read -r m; do
    umount -l "$m" && echo "test namespace: unmounted $fs at $m"
  done
done
if awk '$3 == "tracefs" || $3 == "debugfs" || $3 == "bpf"' /proc/self/mounts | grep -q .; then
  echo "test namespace: tracefs, debugfs or bpffs is still mounted" >&2; exit 1
fi
echo "test namespace: no tracefs, debugfs or BPF filesystem mounted"
exec "$@"
"#;

/// Builds the metadata-api and collector binaries in the dev profile, the one the test binaries
/// are built in, and returns their paths. Release builds of both cost a cold CI run ten minutes of
/// its sixty (two more optimised copies of every dependency) for tests that measure no speed: the
/// benchmarks build their own release binaries.
fn dev_bins(path: &std::ffi::OsStr) -> anyhow::Result<(PathBuf, PathBuf)> {
    sh(Command::new("cargo")
        .current_dir(util::root())
        .env("PATH", path)
        // The collector's build script builds the kernel side with the cached bpf-linker.
        .env_remove("AYA_BUILD_SKIP")
        .args([
            "build",
            "--quiet",
            "-p",
            "metadata-api",
            "-p",
            "collector",
            "-p",
            "kubectl-relay",
            "--bins",
        ]))?;
    let debug = util::target_dir().join("debug");
    Ok((debug.join("metadata-api"), debug.join("collector")))
}

/// Runs nextest with `filter` arguments, the way CI does: the static entrypoint and the
/// metadata-api and collector binaries built first, and tests that need a test bed failing rather
/// than skipping. `env` passes further paths for the selected tests.
fn nextest(path: &std::ffi::OsStr, filter: &[&str], env: &[(&str, PathBuf)]) -> anyhow::Result<()> {
    if !has("cargo-nextest", "--version") {
        sh(Command::new("cargo").args(["install", "cargo-nextest", "--locked"]))?;
    }
    // The container tests run the static entrypoint, as tenant containers do.
    let entrypoint = crate::dist::build_entrypoint().context("building the static entrypoint")?;
    // Tests of other crates start these binaries: built here, not from inside a test.
    let (api, collector) = dev_bins(path).context("building metadata-api and the collector")?;
    // In a mount namespace of their own without tracefs, debugfs or a BPF filesystem, as on a
    // brand-new machine or inside the collector's DaemonSet container: whatever needs one must
    // set it up itself (the collector's restart tests mount their own BPF filesystems), and a
    // developer machine that mounted one by hand cannot hide a test that relies on it.
    sh(Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(BARE_KERNEL_FS)
        .arg("sh")
        .arg("cargo")
        .current_dir(util::root())
        .env("PATH", path)
        .args(["nextest", "run", "--no-fail-fast"])
        .args(filter)
        .env("RELAY_ENTRYPOINT_STATIC", &entrypoint)
        .env("RELAY_METADATA_API_BIN", &api)
        .env("RELAY_COLLECTOR_BIN", &collector)
        // And the demo's `kubectl relay` step, the debug build dev_bins made.
        .env(
            "RELAY_KUBECTL_RELAY_BIN",
            util::target_dir().join("debug/kubectl-relay"),
        )
        // The demo's test runs `xtask demo`: this binary.
        .env("RELAY_XTASK_BIN", std::env::current_exe()?)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("RELAY_REQUIRE_EMULATORS", "1")
        .env(testbed::REQUIRE_ENV, "1"))
}

/// `cargo xtask e2e`: the cluster-shaped end-to-end test alone (see `system-tests/tests/e2e.rs`).
pub fn e2e() -> anyhow::Result<()> {
    let path = prepare()?;
    nextest(
        &path,
        &["-p", "system-tests", "--test", "e2e", "--no-capture"],
        &[],
    )
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let Args {
        no_fuzz,
        fuzz_seconds,
    } = args;
    let root = util::root();
    let path = prepare()?;
    let cargo = || {
        let mut c = Command::new("cargo");
        c.current_dir(&root).env("PATH", &path);
        c
    };
    sh(cargo().args(["fmt", "--all", "--check"]))?;
    sh(cargo().args([
        "clippy",
        "--workspace",
        // The kernel side builds only for the BPF target, through collector/build.rs.
        "--exclude",
        "collector-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // Fuzz first, so the test runner's summary closes the output.
    if !no_fuzz {
        crate::fuzz::run(crate::fuzz::Args {
            seconds: fuzz_seconds,
            target: None,
        })?;
    }
    // The images system-tests/tests/images.rs runs on containerd and system-tests/tests/deployed.rs
    // installs on the test bed's node (all four, dev profile, musl).
    let images = crate::images::Args::for_tests();
    crate::images::build(&images).context("building the images")?;
    nextest(
        &path,
        &["--workspace", "--exclude", "collector-ebpf"],
        &[("RELAY_IMAGES_DIR", crate::images::out_dir(&images))],
    )
}

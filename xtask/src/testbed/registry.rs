//! `cargo xtask testbed install`, registry part: distribution 2.8 (`docker-registry`), `umoci`,
//! `skopeo` and `htpasswd` for `testbed::registry`, from Debian packages extracted together into
//! `~/.cache/relay/registry/root` (see `testbed::layout`).
//!
//! skopeo and htpasswd link libraries a minimal Debian does not have (gpgme, assuan,
//! device-mapper, apr, apr-util, expat); they are extracted along with the binaries and found
//! through `LD_LIBRARY_PATH`, so nothing is installed system-wide. The whole set is skipped when
//! its stamp exists and every binary answers.

use std::{fs, fs::File, process::Command, time::Instant};

use anyhow::{Context, ensure};
use nix::fcntl::{Flock, FlockArg};
use testbed::layout;

use super::{apt_download, extract_together, fresh_dir};

/// Installs the registry tools unless they are already there.
pub fn install() -> anyhow::Result<()> {
    let started = Instant::now();
    let dir = layout::registry_dir();
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let lock = File::create(dir.join(".lock")).context("cannot create the install lock")?;
    let _lock = Flock::lock(lock, FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .context("cannot lock the registry cache")?;
    if ready() {
        eprintln!(
            "testbed: registry: docker-registry, umoci, skopeo and htpasswd are ready (cached)"
        );
        return Ok(());
    }
    eprintln!(
        "testbed: registry: fetching {}",
        layout::REGISTRY_PACKAGES.join(", ")
    );
    let download = dir.join(".debs");
    fresh_dir(&download)?;
    apt_download(&download, &layout::REGISTRY_PACKAGES)?;
    let debs = extract_together(
        &download,
        &layout::REGISTRY_PACKAGES,
        &layout::registry_root(),
    )?;
    fs::remove_dir_all(&download)?;
    for mut cmd in checks() {
        let out = cmd
            .output()
            .with_context(|| format!("cannot run {cmd:?}"))?;
        ensure!(
            out.status.success(),
            "{cmd:?} does not answer after unpacking: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    fs::write(layout::registry_root_stamp(), debs.join("\n") + "\n")?;
    eprintln!(
        "testbed: registry: installed in {:.1?} under {}",
        started.elapsed(),
        dir.display()
    );
    Ok(())
}

/// The commands that prove each binary runs and finds its shared libraries.
fn checks() -> Vec<Command> {
    let cmd = |path: std::path::PathBuf, args: &[&str]| {
        let mut c = Command::new(path);
        c.args(args)
            .env("LD_LIBRARY_PATH", layout::registry_library_path());
        c
    };
    vec![
        cmd(layout::docker_registry(), &["--version"]),
        cmd(layout::umoci(), &["--version"]),
        cmd(layout::skopeo(), &["--version"]),
        // htpasswd has no --version; hashing a password proves bcrypt works.
        cmd(layout::htpasswd(), &["-Bbn", "user", "password"]),
    ]
}

fn ready() -> bool {
    layout::registry_root_stamp().exists()
        && checks()
            .iter_mut()
            .all(|c| c.output().is_ok_and(|o| o.status.success()))
}

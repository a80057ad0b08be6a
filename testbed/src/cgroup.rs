//! Fresh cgroup v2 directories for tests, removed (after killing what is left in them) on drop.
//! Test-only code: it panics on failure.
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

/// Where cgroup v2 is mounted on this (hybrid) host, or on a pure v2 host.
pub fn cgroup2_root() -> Option<PathBuf> {
    ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.join("cgroup.procs").exists() && p.join("cgroup.subtree_control").exists())
}

/// The mount point of the first `cgroup2` file system in `/proc/mounts`, whatever its path.
pub fn cgroup2_mount() -> Option<PathBuf> {
    std::fs::read_to_string("/proc/mounts")
        .unwrap()
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.get(2) == Some(&"cgroup2"))
        .map(|f| PathBuf::from(f[1]))
}

/// A fresh cgroup v2 directory, removed on drop (after killing what is left in it).
#[derive(Debug)]
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    pub fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path = cgroup2_root()
            .unwrap()
            .join(format!("relay-test-{}-{tag}-{n}", std::process::id()));
        std::fs::create_dir(&path).unwrap();
        Self { path }
    }

    /// A child cgroup (not removed separately: drop removes children first).
    pub fn child(&self, name: &str) -> PathBuf {
        let p = self.path.join(name);
        std::fs::create_dir(&p).unwrap();
        p
    }

    /// `sh -c` that moves itself into `dir` and then runs `script` (arguments after it are `$0`,
    /// `$1`, ...).
    pub fn sh(dir: &Path, script: &str) -> Command {
        let mut c = Command::new("sh");
        c.arg("-c").arg(format!(
            "echo $$ > {}/cgroup.procs && {script}",
            dir.display()
        ));
        c
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        remove_tree(&self.path);
    }
}

fn remove_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&e.path());
            }
        }
    }
    let _ = std::fs::write(dir.join("cgroup.kill"), "1");
    for _ in 0..200 {
        if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

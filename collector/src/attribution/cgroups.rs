//! cgroup v2 directories: ids, paths, liveness, and which pipe is a container's stdout.

use std::{
    collections::HashMap,
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

/// `statfs` magic of a cgroup v2 file system.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// Why a directory cannot be watched.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not on a cgroup v2 file system (the collector needs cgroup v2)")]
    NotV2 { path: String },
}

/// The id of the cgroup v2 directory `dir` (its inode number, which is what
/// `bpf_get_current_cgroup_id()` returns), after checking it is one.
pub fn cgroup_id(dir: &Path) -> Result<u64, CgroupError> {
    let io = |source| CgroupError::Io {
        path: dir.display().to_string(),
        source,
    };
    let fs = nix::sys::statfs::statfs(dir).map_err(|e| io(e.into()))?;
    #[allow(
        clippy::unnecessary_cast,
        reason = "the statfs type's width differs between targets"
    )]
    if fs.filesystem_type().0 as i64 != CGROUP2_SUPER_MAGIC {
        return Err(CgroupError::NotV2 {
            path: dir.display().to_string(),
        });
    }
    Ok(fs::metadata(dir).map_err(io)?.ino())
}

/// Where the cgroup v2 hierarchy is mounted (`/sys/fs/cgroup` on a pure v2 host,
/// `/sys/fs/cgroup/unified` on a hybrid one).
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
    mountinfo.lines().find_map(|line| {
        // ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER
        let (left, right) = line.split_once(" - ")?;
        if right.split(' ').next()? != "cgroup2" {
            return None;
        }
        Some(PathBuf::from(left.split(' ').nth(4)?))
    })
}

/// Whether any process is in the cgroup at `dir` or below it. A removed cgroup is not.
pub fn populated(dir: &Path) -> bool {
    fs::read_to_string(dir.join("cgroup.events"))
        .map(|events| events.lines().any(|l| l == "populated 1"))
        .unwrap_or(false)
}

/// A watched directory and the cgroups found under it, by id.
#[derive(Debug)]
pub struct Tree {
    pub root: PathBuf,
    paths: HashMap<u64, PathBuf>,
}

impl Tree {
    pub fn new(root: PathBuf) -> Self {
        Self {
            root,
            paths: HashMap::new(),
        }
    }

    /// The path of cgroup `id` under this root, rescanning the tree when it is not known yet
    /// (a cgroup created since the last scan).
    pub fn path(&mut self, id: u64) -> Option<&Path> {
        if !self.paths.contains_key(&id) {
            self.rescan();
        }
        self.paths.get(&id).map(PathBuf::as_path)
    }

    fn rescan(&mut self) {
        let mut stack = vec![self.root.clone()];
        while let Some(dir) = stack.pop() {
            let Ok(meta) = fs::metadata(&dir) else {
                continue;
            };
            self.paths.insert(meta.ino(), dir.clone());
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(entry.path());
                }
            }
        }
    }

    /// Forgets a cgroup that is gone.
    pub fn forget(&mut self, id: u64) {
        self.paths.remove(&id);
    }
}

/// What a captured file is to its container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Stdout,
    Stderr,
    /// Another pipe of the container (`a | b` inside it): not the container's output.
    Other,
}

impl Role {
    pub fn stream_name(self) -> &'static str {
        match self {
            Self::Stdout => "stdout",
            Self::Stderr => "stderr",
            Self::Other => "other",
        }
    }
}

/// The inodes of a container's stdout and stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stdio {
    pub stdout: u64,
    pub stderr: u64,
}

impl Stdio {
    /// The role of the file with inode `ino`. A terminal is both stdout and stderr: it is
    /// stdout, as Kubernetes reports it.
    pub fn role(&self, ino: u64) -> Role {
        if ino == self.stdout {
            Role::Stdout
        } else if ino == self.stderr {
            Role::Stderr
        } else {
            Role::Other
        }
    }
}

/// The stdio of the container in cgroup `dir`: fds 1 and 2 of its oldest process, passing over
/// our own entrypoint, which interposes pipes between the container's stdio and its command (the
/// command's pipes are then the ones that carry the container's output). `None` when no process
/// is left to look at.
pub fn container_stdio(dir: &Path) -> Option<Stdio> {
    let procs = fs::read_to_string(dir.join("cgroup.procs")).ok()?;
    let oldest = procs
        .lines()
        .filter_map(|l| l.trim().parse::<u32>().ok())
        .filter_map(|pid| {
            let (comm, start) = proc_stat(pid)?;
            (comm != "entrypoint").then_some((start, pid))
        })
        .min()?;
    let pid = oldest.1;
    let ino = |fd: u32| {
        fs::metadata(format!("/proc/{pid}/fd/{fd}"))
            .ok()
            .map(|m| m.ino())
    };
    Some(Stdio {
        stdout: ino(1)?,
        stderr: ino(2)?,
    })
}

/// The environment (`/proc/PID/environ`) of the oldest process in the cgroup at `dir`, our own
/// entrypoint included: the container's environment as the runtime gave it, which is where the
/// values of its secret variables are. `None` when no process is left, or its environment
/// cannot be read (the collector needs CAP_SYS_PTRACE for other users' processes).
pub fn container_environ(dir: &Path) -> Option<Vec<u8>> {
    let procs = fs::read_to_string(dir.join("cgroup.procs")).ok()?;
    let mut pids: Vec<(u64, u32)> = procs
        .lines()
        .filter_map(|l| l.trim().parse::<u32>().ok())
        .filter_map(|pid| Some((proc_stat(pid)?.1, pid)))
        .collect();
    pids.sort_unstable();
    pids.iter()
        .find_map(|(_, pid)| fs::read(format!("/proc/{pid}/environ")).ok())
}

/// `comm` and start time (in clock ticks since boot) of a process.
fn proc_stat(pid: u32) -> Option<(String, u64)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm is in parentheses and may itself contain ") ", so split at the last one.
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?.to_owned();
    // Fields after comm start at field 3 (state); starttime is field 22.
    let start = stat
        .get(close + 2..)?
        .split(' ')
        .nth(22 - 3)?
        .parse()
        .ok()?;
    Some((comm, start))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_own_stat_parses() {
        let (comm, start) = proc_stat(std::process::id()).unwrap();
        assert!(!comm.is_empty());
        assert!(start > 0);
    }

    #[test]
    fn roles_follow_the_inodes() {
        let s = Stdio {
            stdout: 7,
            stderr: 9,
        };
        assert_eq!(s.role(7), Role::Stdout);
        assert_eq!(s.role(9), Role::Stderr);
        assert_eq!(s.role(8), Role::Other);
        let tty = Stdio {
            stdout: 5,
            stderr: 5,
        };
        assert_eq!(tty.role(5), Role::Stdout);
    }

    #[test]
    fn the_cgroup2_mount_is_a_cgroup2() {
        let Some(mount) = cgroup2_mount() else {
            println!("SKIPPED: no cgroup v2 mount");
            return;
        };
        assert!(cgroup_id(&mount).is_ok(), "{}", mount.display());
    }

    #[test]
    fn a_plain_directory_is_not_a_cgroup() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            cgroup_id(dir.path()),
            Err(CgroupError::NotV2 { .. })
        ));
        assert!(!populated(dir.path()));
    }
}

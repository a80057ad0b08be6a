//! Local mode: cgroup v2 directories given on the command line, each with its log context.

use std::path::{Component, Path};

use super::cgroups::{self, CgroupError, Tree};
use crate::{
    args::CgroupArg,
    capture::{Attributed, Attributor, Target},
};

use contract::names::{MAX_STREAM_NAME as MAX_NAME, stream_name_byte};

/// Attributes the cgroups under the watched directories to their contexts. The directory itself
/// ships as `stdout`/`stderr`; a cgroup below it as `<relative path with dots>.stdout`.
#[derive(Debug)]
pub struct Local {
    roots: Vec<(Tree, String)>,
}

impl Local {
    /// Checks every directory is a cgroup v2 and returns the attributor and their cgroup ids.
    pub fn new(args: &[CgroupArg]) -> Result<(Self, Vec<u64>), CgroupError> {
        let mut roots = Vec::new();
        let mut ids = Vec::new();
        for a in args {
            ids.push(cgroups::cgroup_id(&a.dir)?);
            roots.push((Tree::new(a.dir.clone()), a.context.clone()));
        }
        Ok((Self { roots }, ids))
    }
}

impl Attributor for Local {
    fn attribute(&mut self, cgroup_id: u64) -> Attributed {
        for (tree, context) in &mut self.roots {
            let root = tree.root.clone();
            if let Some(dir) = tree.path(cgroup_id) {
                return Attributed::Target(Target {
                    context: context.clone(),
                    prefix: prefix(dir.strip_prefix(&root).unwrap_or(Path::new(""))),
                    dir: dir.to_path_buf(),
                    redact_env: String::new(),
                    entrypoint_absent: None,
                    pod: None,
                });
            }
        }
        Attributed::NotYet
    }

    fn forget(&mut self, cgroup_id: u64) {
        for (tree, _) in &mut self.roots {
            tree.forget(cgroup_id);
        }
    }
}

/// The stream name prefix of a cgroup at `rel` below its watched directory: its components
/// joined by dots, characters the API does not take replaced by `-`, and a final dot.
fn prefix(rel: &Path) -> String {
    let mut out = String::new();
    for c in rel.components() {
        if let Component::Normal(part) = c {
            for ch in part.to_string_lossy().chars() {
                let keep = u8::try_from(ch).is_ok_and(|b| b != b'.' && stream_name_byte(b));
                out.push(if keep { ch } else { '-' });
            }
            out.push('.');
        }
    }
    // Leave room for `stderr.NNN` (a generation suffix).
    let room = MAX_NAME - "stderr.999".len();
    if out.len() > room {
        let cut = out.len() - room;
        out = out.split_off(cut);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_valid_stream_name_parts() {
        assert_eq!(prefix(Path::new("")), "");
        assert_eq!(prefix(Path::new("job1")), "job1.");
        assert_eq!(prefix(Path::new("a/b c/d_e.f")), "a.b-c.d_e-f.");
        let long = "x".repeat(100);
        let p = prefix(Path::new(&long));
        assert!(p.len() + "stderr.999".len() <= MAX_NAME, "{p}");
        assert!(p.ends_with('.'));
    }
}

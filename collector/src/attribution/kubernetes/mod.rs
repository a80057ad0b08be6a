//! Kubernetes mode: the collector watches the node's `kubepods` cgroup tree and attributes each
//! container cgroup to its pod, through a node-scoped pod reflector.
//!
//! A lookup goes through the files of this module in turn: [`cgroup_path`] reads the pod UID and
//! the runtime's container id from the cgroup's path (no API needed); [`pod_index`] keeps the
//! node's pods (and the selected namespaces) and finds the pod with that UID; [`selection`] says
//! whether that pod is captured; [`pod`] says, from the `Pod` object alone, which container has
//! that id and what the pod's log context is. [`Kube`], here, puts them together for the capture
//! engine and names the streams.
//!
//! # Testing
//!
//! What decides an attribution is pure functions of a cgroup path, a `Pod`, a `Namespace` or a
//! watch event, with table tests in each file. The reflectors behind [`PodIndex`] need an API
//! server; they are not mocked but tested with the collector against the real kube-apiserver test
//! bed (`collector/tests/kubernetes.rs`).

mod cgroup_path;
mod pod;
mod pod_index;
mod selection;

use std::path::{Path, PathBuf};

use contract::names::MAX_STREAM_NAME as MAX_NAME;

use self::{cgroup_path::parse_container_cgroup, pod::Attribution, pod_index::Miss};
pub use self::{pod_index::PodIndex, selection::Selection};
use super::cgroups::Tree;
use crate::capture::{Attributed, Attributor, Target};

/// Attributes container cgroups under the kubepods root to pods on this node.
#[derive(Debug)]
pub struct Kube {
    tree: Tree,
    index: PodIndex,
    /// [`PodIndex::namespaces_added`] when last asked.
    namespaces_added: u64,
}

impl Kube {
    pub fn new(root: PathBuf, index: PodIndex) -> Self {
        Self {
            tree: Tree::new(root),
            namespaces_added: index.namespaces_added(),
            index,
        }
    }
}

/// The kubepods cgroup v2 directory of this node: `kubepods` (cgroupfs driver) or
/// `kubepods.slice` (systemd driver) under the cgroup v2 mount.
pub fn find_kubepods(cgroup2: &Path) -> Option<PathBuf> {
    ["kubepods", "kubepods.slice"]
        .iter()
        .map(|d| cgroup2.join(d))
        .find(|p| p.is_dir())
}

impl Attributor for Kube {
    fn attribute(&mut self, cgroup_id: u64) -> Attributed {
        let Some(path) = self.tree.path(cgroup_id) else {
            return Attributed::NotYet;
        };
        let Some(container) = path.to_str().and_then(parse_container_cgroup) else {
            // A pod or QoS cgroup itself: not a container's output.
            return Attributed::Never;
        };
        // Until the pod is listed and its status names the container, it is not known yet; a
        // pod that the pod selector leaves out (or in a system namespace) stays unknown and its
        // bytes are dropped when the hold ends. A known pod in a namespace that is not selected
        // is passed over at once: should the namespace be selected later, `reconsider` has the
        // kernel look at it again.
        match self.index.lookup(&container) {
            Ok(a) => Attributed::Target(Target {
                prefix: prefix(&a),
                pod: Some(a.pod.clone()),
                context: a.context,
                dir: path.to_path_buf(),
                redact_env: a.secret_env,
                entrypoint_absent: a.entrypoint_absent,
            }),
            Err(Miss::NotYet) => Attributed::NotYet,
            Err(Miss::NamespaceNotSelected) => {
                tracing::debug!(cgroup_id, pod_uid = %container.pod_uid, "Namespace not selected; passing over.");
                Attributed::Never
            }
            Err(Miss::NoContext) => {
                tracing::debug!(cgroup_id, pod_uid = %container.pod_uid, "Pod has no log context; passing over.");
                Attributed::Never
            }
        }
    }

    fn forget(&mut self, cgroup_id: u64) {
        self.tree.forget(cgroup_id);
    }

    /// A namespace that becomes selected makes its pods' containers attributable, also those
    /// passed over while it was not.
    fn reconsider(&mut self) -> bool {
        let added = self.index.namespaces_added();
        let changed = added != self.namespaces_added;
        self.namespaces_added = added;
        changed
    }
}

/// Stream names in Kubernetes mode: `<container>.stdout`. A trigger context is shared by every
/// replica of a Knative revision, so there the pod's UID keeps replicas apart:
/// `<container>.<pod uid>.stdout`, the name the operator gives the entrypoint through the downward
/// API. A restarted container continues as the next generation (`.1`, `.2`, ...) of the name.
fn prefix(a: &Attribution) -> String {
    let room = MAX_NAME - ".stderr.999".len();
    let mut p: String = a.container.chars().take(room).collect();
    if a.context.contains("/triggers/") {
        let uid = &a.pod_uid;
        let keep = room.saturating_sub(uid.len() + 1);
        p.truncate(keep);
        p.push('.');
        p.push_str(uid);
    }
    p.push('.');
    p
}

/// Pods and Namespaces the tests of this module's files build from JSON.
#[cfg(test)]
mod fixtures {
    use k8s_openapi::api::core::v1::{Namespace, Pod};
    use serde_json::{Value, json};

    /// A container id as containerd, CRI-O and docker make them.
    pub const CID: &str = "0765f197c9158576f202e50498b488cd0d2b022fb2462b0a629f214bb51cd57d";

    pub fn pod(value: Value) -> Pod {
        serde_json::from_value(value).expect("a Pod")
    }

    pub fn in_namespace(namespace: &str, labels: Value) -> Pod {
        pod(json!({"metadata": {"name": "p", "namespace": namespace, "labels": labels}}))
    }

    pub fn namespace(name: &str, labels: Value) -> Namespace {
        serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}}))
            .expect("a Namespace")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attribution(context: &str, container: &str) -> Attribution {
        Attribution {
            namespace: "tenant".into(),
            pod: "p".into(),
            pod_uid: "0a1b2c3d-4e5f-6789-abcd-ef0123456789".into(),
            container: container.into(),
            restart_count: 0,
            context: context.into(),
            secret_env: String::new(),
            entrypoint_absent: None,
        }
    }

    #[test]
    fn step_streams_are_named_by_container_and_trigger_streams_by_pod_too() {
        let step = attribution("workflows/w/runs/r/steps/s", "step-build");
        assert_eq!(prefix(&step), "step-build.");
        let trigger = attribution("workflows/w/triggers/t", "user-container");
        assert_eq!(
            prefix(&trigger),
            "user-container.0a1b2c3d-4e5f-6789-abcd-ef0123456789."
        );
        let long = attribution("workflows/w/triggers/t", &"c".repeat(63));
        let p = prefix(&long);
        assert!(p.len() + "stderr.999".len() <= MAX_NAME, "{p}");
        assert!(p.ends_with(".0a1b2c3d-4e5f-6789-abcd-ef0123456789."), "{p}");
    }
}

//! Attribution: whose output the bytes captured in a cgroup are. The capture engine
//! ([`crate::capture`]) asks an [`Attributor`](crate::capture::Attributor) once per new cgroup id
//! and gets a [`Target`](crate::capture::Target): the log context, the stream name prefix and the
//! cgroup directory, whose processes tell which pipes are the container's stdout and stderr.
//!
//! The module has two halves, split by where the answer comes from:
//! - The local half reads only this node: [`cgroups`] (cgroup v2 directories: ids, the cgroups
//!   below a watched root, liveness, a container's stdio and environment; both modes use it) and
//!   [`local`] (local mode, `--cgroup DIR=CONTEXT`: a cgroup's path below the directory names its
//!   streams).
//! - The Kubernetes half, [`kubernetes`], adds the API server: a kubepods cgroup's path names a
//!   pod UID and container id, and the node's pods (from a reflector) give the container's name,
//!   log context and secret variables.
//!
//! The Kubernetes half builds on the local one (a [`cgroups::Tree`] of the kubepods root); the
//! local half knows nothing of pods.

pub mod cgroups;
pub mod kubernetes;
pub mod local;

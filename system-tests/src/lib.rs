//! Tests that span components, in `tests/`: the cluster-shaped end-to-end test (`e2e`), relay
//! installed from `deploy/` on the test bed's node (`deployed`), the manifests applied to a real
//! API server (`deploy`), the images on containerd (`images`), and `cargo xtask demo` (`demo`).
//! Their fixtures are the `testbed` crate's.

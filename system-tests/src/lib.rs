//! Tests that span components, in `tests/`: the cluster-shaped end-to-end test (`e2e`), relay
//! installed from `deploy/` on the test bed's node (`deployed`), the manifests applied to a real
//! API server (`deploy`), the images on containerd (`images`), `cargo xtask demo` (`demo`), and
//! a fault scenario (`faults`). Their fixtures are the `testbed` crate's; the fault scenarios'
//! engine is [`faults`], with its writer as the `fault-writer` binary, and the full set of
//! scenarios, table and all, is the `faults` bench target.

pub mod faults;

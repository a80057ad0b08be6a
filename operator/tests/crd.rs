//! `deploy/base/crd/tenant.yaml` is what `crdgen` prints for the current Rust types.

use std::path::Path;

#[test]
fn deployed_crd_is_up_to_date() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/base/crd/tenant.yaml");
    let generated = operator::crd::crd_yaml().expect("CRD serializes");
    let deployed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        deployed == generated,
        "{} is stale or missing; regenerate it from the workspace root with\n\n    \
         cargo run -p operator --bin crdgen > deploy/base/crd/tenant.yaml\n",
        path.display()
    );
}

#[test]
fn deployed_crd_parses_as_a_crd() {
    let generated = operator::crd::crd_yaml().expect("CRD serializes");
    let crd: k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition =
        serde_norway::from_str(&generated).expect("valid CustomResourceDefinition");
    assert_eq!(crd.metadata.name.as_deref(), Some("tenants.relay.sh"));
}

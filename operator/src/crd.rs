//! The `Tenant` custom resource.
//!
//! The CRD YAML in `deploy/base/crd/tenant.yaml` is generated from these types by the `crdgen` binary;
//! `tests/crd.rs` fails when it is stale. The API servers we serve go back to 1.20, so the schema
//! uses nothing newer than apiextensions v1 of that release: no CEL rules (`x-kubernetes-validations`)
//! and no selectable fields. What the schema cannot express is checked by [`TenantSpec::validate`]
//! and reported as a condition.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{PersistentVolumeClaimSpec, VolumeResourceRequirements};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The only access mode a tools volume may have: many pods mount it, none may change it.
pub const READ_ONLY_MANY: &str = "ReadOnlyMany";

/// Storage requested by the default tools volume claim: the static entrypoint and its helpers.
pub const DEFAULT_TOOLS_STORAGE: &str = "16Mi";

/// Desired state of a tenant: how its workloads get their logs captured.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "relay.sh",
    version = "v1beta1",
    kind = "Tenant",
    namespaced,
    status = "TenantStatus",
    shortname = "tenant",
    derive = "PartialEq",
    doc = "A tenant whose workloads get their logs captured.",
    // Raw JSON rather than `printcolumn(name = .., type_ = ..)`: clippy's duplicated_attributes
    // flags the repeated `type_ = "string"` of the structured form.
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Tools","type":"string","jsonPath":".status.toolsVersion"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct TenantSpec {
    /// How the log-shipping entrypoint is injected into the tenant's pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint_injection: Option<EntrypointInjection>,
}

/// How the log-shipping entrypoint is injected into the tenant's pods.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EntrypointInjection {
    /// Template of the PersistentVolumeClaim that holds the tools mounted into every pod.
    /// `accessModes` must be exactly `[ReadOnlyMany]`. Defaults to `ReadOnlyMany`, 16Mi, the
    /// cluster's default storage class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_claim_template: Option<PersistentVolumeClaimSpec>,
}

/// Observed state of a tenant.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TenantStatus {
    /// `ToolsReady` and `Ready`, each with the generation it was computed for.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` the operator last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Name of the PersistentVolumeClaim new pods mount: the latest one whose install Job
    /// succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools_volume_claim: Option<String>,
    /// Version of the tools in that claim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools_version: Option<String>,
}

/// Why a `Tenant` spec is rejected. The message is written for the tenant's owner and ends up in
/// the `InvalidVolumeClaimTemplate` condition.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidSpec {
    /// The tools volume would be writable by tenant pods, or not mountable by many of them.
    #[error(
        "spec.entrypointInjection.volumeClaimTemplate.accessModes must be exactly [ReadOnlyMany], \
         got [{}]",
        .found.join(", ")
    )]
    AccessModes {
        /// The access modes in the template.
        found: Vec<String>,
    },
    /// Without a storage request the API server rejects the claim.
    #[error("spec.entrypointInjection.volumeClaimTemplate.resources.requests.storage is required")]
    MissingStorageRequest,
}

/// The claim template used when the tenant gives none: `[ReadOnlyMany]`, 16Mi, default storage
/// class.
pub fn default_volume_claim_template() -> PersistentVolumeClaimSpec {
    PersistentVolumeClaimSpec {
        access_modes: Some(vec![READ_ONLY_MANY.to_owned()]),
        resources: Some(VolumeResourceRequirements {
            requests: Some(BTreeMap::from([(
                "storage".to_owned(),
                Quantity(DEFAULT_TOOLS_STORAGE.to_owned()),
            )])),
            ..VolumeResourceRequirements::default()
        }),
        ..PersistentVolumeClaimSpec::default()
    }
}

impl TenantSpec {
    /// The tenant's volume claim template, or [`default_volume_claim_template`].
    pub fn volume_claim_template(&self) -> PersistentVolumeClaimSpec {
        self.entrypoint_injection
            .as_ref()
            .and_then(|injection| injection.volume_claim_template.clone())
            .unwrap_or_else(default_volume_claim_template)
    }

    /// Checks what the schema cannot: the claim template's access modes are exactly
    /// `[ReadOnlyMany]` and it requests storage.
    pub fn validate(&self) -> Result<(), InvalidSpec> {
        let template = self.volume_claim_template();
        let modes = template.access_modes.unwrap_or_default();
        if modes != [READ_ONLY_MANY] {
            return Err(InvalidSpec::AccessModes { found: modes });
        }
        let has_storage = template
            .resources
            .and_then(|r| r.requests)
            .is_some_and(|requests| requests.contains_key("storage"));
        if !has_storage {
            return Err(InvalidSpec::MissingStorageRequest);
        }
        Ok(())
    }
}

impl Tenant {
    /// The tools claim new pods mount: the last claim whose install Job succeeded. While a new tools
    /// version installs, this stays on the previous one; `None` until a first install succeeded.
    pub fn usable_tools_claim(&self) -> Option<&str> {
        self.status.as_ref()?.tools_volume_claim.as_deref()
    }
}

/// The `Tenant` CustomResourceDefinition as YAML, as `deploy/base/crd/tenant.yaml` holds it.
pub fn crd_yaml() -> Result<String, serde_norway::Error> {
    let yaml = serde_norway::to_string(&Tenant::crd())?;
    Ok(format!(
        "# Generated by `cargo run -p operator --bin crdgen > deploy/base/crd/tenant.yaml`; do not edit.\n{yaml}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn with_template(template: PersistentVolumeClaimSpec) -> TenantSpec {
        TenantSpec {
            entrypoint_injection: Some(EntrypointInjection {
                volume_claim_template: Some(template),
            }),
        }
    }

    fn with_modes(modes: &[&str]) -> TenantSpec {
        with_template(PersistentVolumeClaimSpec {
            access_modes: Some(modes.iter().map(|m| (*m).to_owned()).collect()),
            ..default_volume_claim_template()
        })
    }

    #[test]
    fn default_template_is_read_only_many_16mi_default_class() {
        for spec in [
            TenantSpec::default(),
            TenantSpec {
                entrypoint_injection: Some(EntrypointInjection::default()),
            },
        ] {
            let template = spec.volume_claim_template();
            assert_eq!(template.access_modes, Some(vec!["ReadOnlyMany".to_owned()]));
            let requests = template.resources.and_then(|r| r.requests);
            assert_eq!(
                requests.and_then(|r| r.get("storage").cloned()),
                Some(Quantity("16Mi".to_owned()))
            );
            assert_eq!(template.storage_class_name, None);
            assert_eq!(template.volume_mode, None);
            assert_eq!(spec.validate(), Ok(()));
        }
    }

    #[test]
    fn given_template_is_used() {
        let spec = with_template(PersistentVolumeClaimSpec {
            storage_class_name: Some("nfs".to_owned()),
            ..default_volume_claim_template()
        });
        assert_eq!(
            spec.volume_claim_template().storage_class_name.as_deref(),
            Some("nfs")
        );
        assert_eq!(spec.validate(), Ok(()));
    }

    #[test]
    fn validation_rejects_other_access_modes() {
        let cases: [(&[&str], &str); 4] = [
            (&["ReadWriteOnce"], "got [ReadWriteOnce]"),
            (
                &["ReadOnlyMany", "ReadWriteOnce"],
                "got [ReadOnlyMany, ReadWriteOnce]",
            ),
            (&["ReadWriteMany"], "got [ReadWriteMany]"),
            (&[], "got []"),
        ];
        for (modes, got) in cases {
            let err = with_modes(modes).validate().expect_err("rejected");
            assert_eq!(
                err,
                InvalidSpec::AccessModes {
                    found: modes.iter().map(|m| (*m).to_owned()).collect()
                }
            );
            assert_eq!(
                err.to_string(),
                format!(
                    "spec.entrypointInjection.volumeClaimTemplate.accessModes must be exactly \
                     [ReadOnlyMany], {got}"
                )
            );
        }
    }

    #[test]
    fn validation_rejects_a_template_without_access_modes_or_storage() {
        let no_modes = with_template(PersistentVolumeClaimSpec {
            access_modes: None,
            ..default_volume_claim_template()
        });
        assert_eq!(
            no_modes.validate(),
            Err(InvalidSpec::AccessModes { found: Vec::new() })
        );
        let no_storage = with_template(PersistentVolumeClaimSpec {
            resources: None,
            ..default_volume_claim_template()
        });
        assert_eq!(
            no_storage.validate(),
            Err(InvalidSpec::MissingStorageRequest)
        );
    }

    #[test]
    fn tenant_round_trips_from_yaml() {
        let tenant: Tenant = serde_norway::from_str(
            r#"
apiVersion: relay.sh/v1beta1
kind: Tenant
metadata: {name: acme, namespace: acme}
spec:
  entrypointInjection:
    volumeClaimTemplate:
      accessModes: [ReadOnlyMany]
      storageClassName: nfs
      volumeMode: Filesystem
      resources: {requests: {storage: 32Mi}}
status:
  observedGeneration: 3
  toolsVolumeClaim: tools-v1
  toolsVersion: v1
  conditions:
  - {type: Ready, status: "True", reason: Ready, message: "", lastTransitionTime: "2024-01-02T03:04:05Z", observedGeneration: 3}
"#,
        )
        .expect("valid Tenant");
        assert_eq!(tenant.spec.validate(), Ok(()));
        let template = tenant.spec.volume_claim_template();
        assert_eq!(template.storage_class_name.as_deref(), Some("nfs"));
        assert_eq!(template.volume_mode.as_deref(), Some("Filesystem"));
        let status = tenant.status.as_ref().expect("status");
        assert_eq!(status.observed_generation, Some(3));
        assert_eq!(status.tools_volume_claim.as_deref(), Some("tools-v1"));
        assert_eq!(status.conditions[0].type_, "Ready");
        let json = serde_json::to_value(&tenant).expect("serializes");
        let again: Tenant = serde_json::from_value(json).expect("round trips");
        assert_eq!(again, tenant);
    }

    fn version_json() -> Value {
        let crd = serde_json::to_value(Tenant::crd()).expect("CRD serializes");
        crd["spec"]["versions"][0].clone()
    }

    #[test]
    fn crd_names_and_version() {
        let crd = serde_json::to_value(Tenant::crd()).expect("CRD serializes");
        assert_eq!(crd["apiVersion"], "apiextensions.k8s.io/v1");
        assert_eq!(crd["metadata"]["name"], "tenants.relay.sh");
        assert_eq!(crd["spec"]["scope"], "Namespaced");
        assert_eq!(crd["spec"]["names"]["kind"], "Tenant");
        assert_eq!(crd["spec"]["names"]["shortNames"][0], "tenant");
        let version = version_json();
        assert_eq!(version["name"], "v1beta1");
        assert_eq!(version["served"], true);
        assert_eq!(version["storage"], true);
        assert!(version["subresources"]["status"].is_object());
        let columns: Vec<_> = version["additionalPrinterColumns"]
            .as_array()
            .expect("printer columns")
            .iter()
            .map(|c| c["name"].as_str().unwrap_or_default().to_owned())
            .collect();
        assert_eq!(columns, ["Ready", "Reason", "Tools", "Age"]);
    }

    #[test]
    fn crd_schema_contains_the_fields() {
        let schema = version_json()["schema"]["openAPIV3Schema"].clone();
        let template = &schema["properties"]["spec"]["properties"]["entrypointInjection"]["properties"]
            ["volumeClaimTemplate"];
        assert_eq!(template["type"], "object");
        for field in ["accessModes", "resources", "storageClassName", "volumeMode"] {
            assert!(
                template["properties"][field].is_object(),
                "volumeClaimTemplate.{field} missing from {template:#}"
            );
        }
        assert_eq!(
            template["properties"]["resources"]["properties"]["requests"]["additionalProperties"]["x-kubernetes-int-or-string"],
            true
        );
        let status = &schema["properties"]["status"]["properties"];
        for field in [
            "conditions",
            "observedGeneration",
            "toolsVolumeClaim",
            "toolsVersion",
        ] {
            assert!(status[field].is_object(), "status.{field} missing");
        }
        let conditions = &status["conditions"];
        assert_eq!(conditions["x-kubernetes-list-type"], "map");
        assert_eq!(conditions["x-kubernetes-list-map-keys"][0], "type");
        let condition = &conditions["items"]["properties"];
        for field in [
            "type",
            "status",
            "reason",
            "message",
            "lastTransitionTime",
            "observedGeneration",
        ] {
            assert!(condition[field].is_object(), "condition.{field} missing");
        }
    }

    #[test]
    fn crd_uses_nothing_a_1_20_api_server_rejects() {
        let yaml = crd_yaml().expect("CRD serializes");
        for newer in ["x-kubernetes-validations", "selectableFields"] {
            assert!(!yaml.contains(newer), "{newer} needs a newer API server");
        }
    }
}

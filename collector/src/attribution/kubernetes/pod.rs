//! What the `Pod` object alone says about a container of it: the pod's log context, and which
//! container (and which run of it) a runtime container id is, with its variables from Secrets and
//! whether it runs under an entrypoint. Pure functions, no API access: [`super::pod_index`] calls
//! them on the pods it keeps.
//!
//! # Pod labels
//!
//! A pod's log context comes from its labels alone, by the rules of
//! [`contract::pod_context`] (documented there, with the
//! [`labels`](contract::pod_context::labels)), which the metadata
//! API's `kubernetes` auth mode applies too, so a pod's own token and the collector agree on its
//! context.

use k8s_openapi::api::core::v1::{ContainerStatus, Pod};

/// The log context of a tenant pod, from its labels; `None` for any other pod.
/// The rules are [`contract::pod_context::context_for_labels`]'s.
pub fn context_for_pod(pod: &Pod) -> Option<String> {
    contract::pod_context::context_for_labels(pod.metadata.labels.as_ref()?)
}

/// Whose output a container's writes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attribution {
    pub namespace: String,
    pub pod: String,
    pub pod_uid: String,
    /// The container's name in the pod spec (regular, init or ephemeral).
    pub container: String,
    /// Which run of the container this is: the pod status's `restartCount` for it.
    pub restart_count: u32,
    /// The log context, from [`context_for_pod`].
    pub context: String,
    /// The container's variables from Secrets, from [`secret_env`].
    pub secret_env: String,
    /// Why the container has no entrypoint streams, from [`entrypoint_absent`].
    pub entrypoint_absent: Option<&'static str>,
}

/// Why container `name` of `pod` has no entrypoint streams, from the variables its spec gives it
/// (see [`crate::capture::entrypoint_absent`]); `None` when the spec does not name it.
pub fn entrypoint_absent(pod: &Pod, name: &str) -> Option<&'static str> {
    let spec = pod.spec.as_ref()?;
    let env = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .find(|c| c.name == name)
        .map(|c| &c.env)
        .or_else(|| {
            spec.ephemeral_containers
                .iter()
                .flatten()
                .find(|c| c.name == name)
                .map(|c| &c.env)
        })?;
    crate::capture::entrypoint_absent(env.iter().flatten().map(|e| {
        (
            e.name.as_bytes(),
            e.value.as_deref().unwrap_or_default().as_bytes(),
        )
    }))
}

/// The variables container `name` of `pod` gets from Secrets, as a `redact::EnvSelector` list:
/// an `env` entry with a `secretKeyRef` by name, an `envFrom` `secretRef` with a prefix as
/// `PREFIX*` (the operator's webhook gives wrapped containers the same list as
/// `RELAY_REDACT_ENV`; this covers the containers it does not wrap: init containers, sidecars,
/// pods it did not see). An `envFrom` `secretRef` without a prefix names keys only the Secret
/// knows, which the collector does not read.
pub fn secret_env(pod: &Pod, name: &str) -> String {
    use k8s_openapi::api::core::v1::{EnvFromSource, EnvVar};
    let Some(spec) = pod.spec.as_ref() else {
        return String::new();
    };
    let lists = |env: &Option<Vec<EnvVar>>, from: &Option<Vec<EnvFromSource>>| {
        let named = env
            .iter()
            .flatten()
            .filter(|e| {
                e.value_from
                    .as_ref()
                    .is_some_and(|v| v.secret_key_ref.is_some())
            })
            .map(|e| e.name.clone());
        let prefixed = from
            .iter()
            .flatten()
            .filter(|f| f.secret_ref.is_some())
            .filter_map(|f| f.prefix.as_deref().filter(|p| !p.is_empty()))
            .map(|p| format!("{p}*"));
        named.chain(prefixed).collect::<Vec<_>>().join(",")
    };
    let regular = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .find(|c| c.name == name)
        .map(|c| lists(&c.env, &c.env_from));
    regular
        .or_else(|| {
            spec.ephemeral_containers
                .iter()
                .flatten()
                .find(|c| c.name == name)
                .map(|c| lists(&c.env, &c.env_from))
        })
        .unwrap_or_default()
}

/// The attribution of the container with runtime id `container_id` (no `containerd://` scheme)
/// in `pod`, or `None` when the pod has no log context or no container status with that id.
///
/// The id is matched against each regular, init and ephemeral container's current `containerID`,
/// then its last terminated one (the run before a restart, `restartCount - 1`): a crash-looping
/// container's old cgroup can be looked up after the kubelet has reported the new run. A new
/// container's cgroup exists before the kubelet reports its id, so `None` can mean "not yet".
pub fn attribute(pod: &Pod, container_id: &str) -> Option<Attribution> {
    let context = context_for_pod(pod)?;
    let status = pod.status.as_ref()?;
    let statuses = [
        &status.container_statuses,
        &status.init_container_statuses,
        &status.ephemeral_container_statuses,
    ];
    let statuses = || statuses.into_iter().flatten().flatten();
    let restart_count = |s: &ContainerStatus| u32::try_from(s.restart_count).unwrap_or(0);
    let (found, restart_count) = statuses()
        .find(|s| runtime_id(s.container_id.as_deref()) == Some(container_id))
        .map(|s| (s, restart_count(s)))
        .or_else(|| {
            statuses()
                .find(|s| {
                    let last = s.last_state.as_ref().and_then(|l| l.terminated.as_ref());
                    runtime_id(last.and_then(|t| t.container_id.as_deref())) == Some(container_id)
                })
                .map(|s| (s, restart_count(s).saturating_sub(1)))
        })?;
    let meta = &pod.metadata;
    Some(Attribution {
        namespace: meta.namespace.clone()?,
        pod: meta.name.clone()?,
        pod_uid: meta.uid.clone()?,
        container: found.name.clone(),
        restart_count,
        context,
        secret_env: secret_env(pod, &found.name),
        entrypoint_absent: entrypoint_absent(pod, &found.name),
    })
}

/// The id in a status `containerID` (`containerd://<id>`, `cri-o://<id>`, `docker://<id>`).
fn runtime_id(container_id: Option<&str>) -> Option<&str> {
    container_id
        .and_then(|id| id.split_once("://"))
        .map(|(_, id)| id)
        .filter(|id| !id.is_empty())
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::attribution::kubernetes::fixtures::{CID, pod};

    fn labelled(labels: Value) -> Pod {
        pod(json!({
            "metadata": { "name": "p", "namespace": "tenant", "uid": "u", "labels": labels },
        }))
    }
    /// The rules themselves are tested in `contract::pod_context`.
    #[test]
    fn contexts_come_from_pod_labels() {
        let got = context_for_pod(&labelled(json!({
            "serving.knative.dev/revision": "r-1", "relay.sh/workflow": "w", "relay.sh/trigger-sync-id": "t1",
        })));
        assert_eq!(got.as_deref(), Some("workflows/w/triggers/t1"));
        assert_eq!(
            context_for_pod(&pod(json!({"metadata": {"name": "p"}}))),
            None
        );
    }

    fn step_pod(status: Value) -> Pod {
        pod(json!({
            "metadata": {
                "name": "build-pod", "namespace": "tenant", "uid": "2cde702b-a0cf-438d-a228-fb164e54434b",
                "labels": {"tekton.dev/taskRun": "tr", "relay.sh/workflow": "w", "relay.sh/run": "7", "relay.sh/step": "build"},
            },
            "status": status,
        }))
    }

    fn container(name: &str, id: Option<String>, restarts: i32) -> Value {
        json!({"name": name, "containerID": id, "restartCount": restarts, "image": "i", "imageID": "", "ready": true})
    }

    fn attributed(container: &str, restart_count: u32) -> Option<Attribution> {
        Some(Attribution {
            namespace: "tenant".into(),
            pod: "build-pod".into(),
            pod_uid: "2cde702b-a0cf-438d-a228-fb164e54434b".into(),
            container: container.into(),
            restart_count,
            context: "workflows/w/runs/7/steps/build".into(),
            secret_env: String::new(),
            entrypoint_absent: None,
        })
    }

    #[test]
    fn the_spec_tells_why_a_container_has_no_entrypoint_streams() {
        let p = pod(json!({
            "metadata": {"name": "p"},
            "spec": {
                "containers": [
                    {"name": "step-build", "env": [
                        {"name": "RELAY_METADATA_API_URL", "value": "http://relay"},
                    ]},
                    // tektoncd/pipeline pkg/pod/pod.go: every step of a hermetic TaskRun.
                    {"name": "step-offline", "env": [{"name": "TEKTON_HERMETIC", "value": "1"}]},
                    {"name": "sidecar-db"},
                ],
            },
        }));
        assert_eq!(entrypoint_absent(&p, "step-build"), None);
        assert!(entrypoint_absent(&p, "step-offline").is_some_and(|w| w.contains("hermetic")));
        assert!(
            entrypoint_absent(&p, "sidecar-db").is_some_and(|w| w.contains("does not run under"))
        );
        assert_eq!(entrypoint_absent(&p, "missing"), None);
    }

    #[test]
    fn secret_variables_come_from_the_container_spec() {
        let p = pod(json!({
            "metadata": {"name": "p"},
            "spec": {
                "containers": [{"name": "app", "env": [
                    {"name": "PLAIN", "value": "x"},
                    {"name": "PW", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
                ], "envFrom": [
                    {"secretRef": {"name": "a"}, "prefix": "A_"},
                    {"secretRef": {"name": "b"}},
                    {"configMapRef": {"name": "c"}, "prefix": "C_"},
                ]}],
                "initContainers": [{"name": "init", "env": [
                    {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "t"}}},
                ]}],
            },
        }));
        assert_eq!(secret_env(&p, "app"), "PW,A_*");
        assert_eq!(secret_env(&p, "init"), "TOKEN");
        assert_eq!(secret_env(&p, "missing"), "");
    }

    #[test]
    fn attribute_finds_any_kind_of_container() {
        let other = "f".repeat(64);
        let cases = [
            (
                json!({"containerStatuses": [container("a", Some(format!("containerd://{other}")), 0), container("step-build", Some(format!("containerd://{CID}")), 2)]}),
                attributed("step-build", 2),
            ),
            (
                json!({"containerStatuses": [container("step-build", Some(format!("cri-o://{CID}")), 0)]}),
                attributed("step-build", 0),
            ),
            (
                json!({"containerStatuses": [container("step-build", Some(format!("docker://{CID}")), 0)]}),
                attributed("step-build", 0),
            ),
            (
                json!({"initContainerStatuses": [container("prepare", Some(format!("containerd://{CID}")), 1)],
                       "containerStatuses": [container("step-build", Some(format!("containerd://{other}")), 0)]}),
                attributed("prepare", 1),
            ),
            (
                json!({"ephemeralContainerStatuses": [container("debugger", Some(format!("containerd://{CID}")), 0)]}),
                attributed("debugger", 0),
            ),
            // The run before a restart.
            (
                json!({"containerStatuses": [{
                    "name": "step-build", "containerID": format!("containerd://{other}"), "restartCount": 3,
                    "lastState": {"terminated": {"containerID": format!("containerd://{CID}"), "exitCode": 1}},
                    "image": "i", "imageID": "", "ready": false,
                }]}),
                attributed("step-build", 2),
            ),
            // Unknown, not yet reported, or not an id of this pod.
            (
                json!({"containerStatuses": [container("step-build", Some(format!("containerd://{other}")), 0)]}),
                None,
            ),
            (
                json!({"containerStatuses": [container("step-build", None, 0)]}),
                None,
            ),
            (
                json!({"containerStatuses": [container("step-build", Some(CID.to_owned()), 0)]}),
                None,
            ),
            (
                json!({"containerStatuses": [container("step-build", Some("containerd://".to_owned()), 0)]}),
                None,
            ),
            (json!({}), None),
        ];
        for (status, want) in cases {
            assert_eq!(attribute(&step_pod(status.clone()), CID), want, "{status}");
        }
        let no_status = pod(json!({"metadata": {"name": "build-pod", "namespace": "tenant"}}));
        assert_eq!(attribute(&no_status, CID), None);
        assert_eq!(
            attribute(
                &step_pod(
                    json!({"containerStatuses": [container("c", Some("containerd://".to_owned()), 0)]})
                ),
                ""
            ),
            None
        );
    }

    #[test]
    fn attribute_needs_a_context() {
        let mut p = step_pod(
            json!({"containerStatuses": [container("c", Some(format!("containerd://{CID}")), 0)]}),
        );
        assert!(attribute(&p, CID).is_some());
        p.metadata.labels = None;
        assert_eq!(attribute(&p, CID), None);
    }
}

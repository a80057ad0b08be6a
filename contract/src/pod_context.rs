//! The log context of a tenant pod, from its labels alone.
//!
//! The metadata API's `kubernetes` auth mode (a pod's own token) and the collector (the pod's
//! captured output) both read these labels, so they agree on a pod's context.
//!
//! | context                            | pod kind            | required labels |
//! |------------------------------------|---------------------|-----------------|
//! | `workflows/{w}/runs/{r}/steps/{s}` | Tekton TaskRun pod  | [`labels::TEKTON_TASK_RUN`] (any value), [`labels::WORKFLOW`] = w, [`labels::RUN`] = r, [`labels::STEP`] = s |
//! | `workflows/{w}/triggers/{t}`       | Knative Serving pod | [`labels::KNATIVE_REVISION`] (any value), [`labels::WORKFLOW`] = w, [`labels::TRIGGER_SYNC_ID`] = t |
//!
//! When `relay.sh/run` or `relay.sh/step` is absent, Tekton's own [`labels::TEKTON_PIPELINE_RUN`]
//! and [`labels::TEKTON_PIPELINE_TASK`] stand in for it (each on its own). A present but invalid
//! label does not fall back. Every value must be a context segment: 1-253 characters of
//! `[A-Za-z0-9._-]`, not `.` or `..`. A pod with both a TaskRun and a Knative revision label is
//! ambiguous and has no context.
//!
//! Always compiled, without any Kubernetes client dependency: callers pass the label map.

use std::collections::BTreeMap;

use crate::names::valid_context_segment;

/// The pod labels a log context is made of. See the module documentation.
pub mod labels {
    /// The workflow's name, on every tenant pod.
    pub const WORKFLOW: &str = "relay.sh/workflow";
    /// The workflow run of a step pod.
    pub const RUN: &str = "relay.sh/run";
    /// The step of a step pod.
    pub const STEP: &str = "relay.sh/step";
    /// The trigger of a webhook trigger pod.
    pub const TRIGGER_SYNC_ID: &str = "relay.sh/trigger-sync-id";
    /// Set by Tekton on every TaskRun pod: marks a step pod.
    pub const TEKTON_TASK_RUN: &str = "tekton.dev/taskRun";
    /// Set by Tekton on TaskRun pods of a PipelineRun: the run when [`RUN`] is absent.
    pub const TEKTON_PIPELINE_RUN: &str = "tekton.dev/pipelineRun";
    /// Set by Tekton on TaskRun pods of a PipelineRun: the step when [`STEP`] is absent.
    pub const TEKTON_PIPELINE_TASK: &str = "tekton.dev/pipelineTask";
    /// Set by Knative Serving on every revision pod: marks a trigger pod.
    pub const KNATIVE_REVISION: &str = "serving.knative.dev/revision";
}

/// The log context of a pod with these labels; `None` for any pod that is not a tenant pod.
/// The rules are in the module documentation.
pub fn context_for_labels(pod_labels: &BTreeMap<String, String>) -> Option<String> {
    let get = |key| pod_labels.get(key).map(String::as_str);
    fn segment(value: Option<&str>) -> Option<&str> {
        value.filter(|v| valid_context_segment(v))
    }
    let workflow = segment(get(labels::WORKFLOW))?;
    match (
        get(labels::TEKTON_TASK_RUN).is_some(),
        get(labels::KNATIVE_REVISION).is_some(),
    ) {
        (true, false) => {
            let run = segment(get(labels::RUN).or_else(|| get(labels::TEKTON_PIPELINE_RUN)))?;
            let step = segment(get(labels::STEP).or_else(|| get(labels::TEKTON_PIPELINE_TASK)))?;
            Some(format!("workflows/{workflow}/runs/{run}/steps/{step}"))
        }
        (false, true) => {
            let trigger = segment(get(labels::TRIGGER_SYNC_ID))?;
            Some(format!("workflows/{workflow}/triggers/{trigger}"))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn context(labels: &Value) -> Option<String> {
        let map: BTreeMap<String, String> =
            serde_json::from_value(labels.clone()).expect("a label map");
        context_for_labels(&map)
    }

    #[test]
    fn tekton_contexts() {
        let cases = [
            (
                json!({"tekton.dev/taskRun": "tr", "relay.sh/workflow": "w", "relay.sh/run": "7", "relay.sh/step": "build"}),
                Some("workflows/w/runs/7/steps/build"),
            ),
            // Tekton's own labels stand in, each on its own.
            (
                json!({"tekton.dev/taskRun": "tr", "relay.sh/workflow": "w", "tekton.dev/pipelineRun": "pr", "tekton.dev/pipelineTask": "pt"}),
                Some("workflows/w/runs/pr/steps/pt"),
            ),
            (
                json!({"tekton.dev/taskRun": "tr", "relay.sh/workflow": "w", "relay.sh/run": "7", "tekton.dev/pipelineRun": "pr", "tekton.dev/pipelineTask": "pt"}),
                Some("workflows/w/runs/7/steps/pt"),
            ),
            (
                json!({"tekton.dev/taskRun": "tr", "relay.sh/workflow": "w", "tekton.dev/pipelineRun": "pr", "relay.sh/step": "s", "tekton.dev/pipelineTask": "pt"}),
                Some("workflows/w/runs/pr/steps/s"),
            ),
            (
                json!({"tekton.dev/taskRun": "", "relay.sh/workflow": "W.x_y-Z", "relay.sh/run": "..a", "relay.sh/step": "."}),
                None,
            ),
            (
                json!({"tekton.dev/taskRun": "", "relay.sh/workflow": "W.x_y-Z", "relay.sh/run": "..a", "relay.sh/step": "s."}),
                Some("workflows/W.x_y-Z/runs/..a/steps/s."),
            ),
            // Missing pieces.
            (
                json!({"relay.sh/workflow": "w", "relay.sh/run": "7", "relay.sh/step": "build"}),
                None,
            ),
            (
                json!({"tekton.dev/taskRun": "tr", "relay.sh/run": "7", "relay.sh/step": "build"}),
                None,
            ),
            (
                json!({"tekton.dev/taskRun": "tr", "relay.sh/workflow": "w", "relay.sh/step": "build"}),
                None,
            ),
            (
                json!({"tekton.dev/taskRun": "tr", "relay.sh/workflow": "w", "relay.sh/run": "7"}),
                None,
            ),
            // An invalid relay label does not fall back to Tekton's.
            (
                json!({"tekton.dev/taskRun": "tr", "relay.sh/workflow": "w", "relay.sh/run": "", "tekton.dev/pipelineRun": "pr", "relay.sh/step": "s"}),
                None,
            ),
        ];
        for (labels, want) in cases {
            assert_eq!(context(&labels).as_deref(), want, "{labels}");
        }
    }

    #[test]
    fn knative_contexts() {
        let cases = [
            (
                json!({"serving.knative.dev/revision": "r-1", "relay.sh/workflow": "w", "relay.sh/trigger-sync-id": "t1"}),
                Some("workflows/w/triggers/t1"),
            ),
            (
                json!({"relay.sh/workflow": "w", "relay.sh/trigger-sync-id": "t1"}),
                None,
            ),
            (
                json!({"serving.knative.dev/revision": "r-1", "relay.sh/trigger-sync-id": "t1"}),
                None,
            ),
            (
                json!({"serving.knative.dev/revision": "r-1", "relay.sh/workflow": "w"}),
                None,
            ),
            // Tekton's run/step labels do not make a trigger a step.
            (
                json!({"serving.knative.dev/revision": "r-1", "relay.sh/workflow": "w", "relay.sh/run": "7", "relay.sh/step": "s"}),
                None,
            ),
            // Both kinds at once is ambiguous.
            (
                json!({"serving.knative.dev/revision": "r-1", "tekton.dev/taskRun": "tr", "relay.sh/workflow": "w", "relay.sh/trigger-sync-id": "t1", "relay.sh/run": "7", "relay.sh/step": "s"}),
                None,
            ),
            (json!({}), None),
        ];
        for (labels, want) in cases {
            assert_eq!(context(&labels).as_deref(), want, "{labels}");
        }
    }

    #[test]
    fn context_segments() {
        let long = "a".repeat(253);
        let too_long = "a".repeat(254);
        let cases = [
            ("w", true),
            ("a.b_c-D9", true),
            ("...", true),
            (long.as_str(), true),
            ("", false),
            (".", false),
            ("..", false),
            (too_long.as_str(), false),
            ("a/b", false),
            ("a b", false),
            ("a%2F", false),
            ("é", false),
        ];
        for (workflow, ok) in cases {
            let got = context(&json!({
                "serving.knative.dev/revision": "r", "relay.sh/workflow": workflow, "relay.sh/trigger-sync-id": "t",
            }));
            assert_eq!(got.is_some(), ok, "{workflow:?}");
            let got = context(&json!({
                "tekton.dev/taskRun": "tr", "relay.sh/workflow": "w", "relay.sh/run": "r", "relay.sh/step": workflow,
            }));
            assert_eq!(got.is_some(), ok, "{workflow:?}");
        }
    }
}

//! Pod labels, which tenants set, to log contexts: `pod_context::context_for_labels` (the
//! `kubernetes` auth mode and the collector both read it).
//!
//! Input: a JSON object of labels; anything else is read as `key=value` lines.
//!
//! Checked: a context it gives is a valid stream context (`Context::stream`), so a pod's token or
//! the collector can write in it, made of the labels' values; a step context for a Tekton pod, a
//! trigger context for a Knative pod, none when the pod is both or neither.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use metadata_api::{
    auth::Context,
    pod_context::{context_for_labels, labels},
};

fuzz_target!(|data: &[u8]| {
    let labels_of: BTreeMap<String, String> = match serde_json::from_slice(data) {
        Ok(map) => map,
        Err(_) => String::from_utf8_lossy(data)
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
    };
    let tekton = labels_of.contains_key(labels::TEKTON_TASK_RUN);
    let knative = labels_of.contains_key(labels::KNATIVE_REVISION);
    let Some(context) = context_for_labels(&labels_of) else {
        return;
    };
    assert!(
        tekton != knative,
        "{labels_of:?}: a context for a pod that is both or neither"
    );
    let parsed = Context::stream(&context)
        .unwrap_or_else(|e| panic!("{labels_of:?} gave {context:?}, not a stream context: {e}"));
    assert_eq!(
        parsed.is_trigger(),
        knative,
        "{labels_of:?} gave {context:?}"
    );
    let segs: Vec<&str> = context.split('/').collect();
    assert_eq!(
        Some(&segs[1].to_owned()),
        labels_of.get(labels::WORKFLOW),
        "{labels_of:?} gave {context:?}"
    );
    let values: Vec<&String> = labels_of.values().collect();
    for seg in segs.iter().skip(1).step_by(2) {
        assert!(
            values.iter().any(|v| v == seg),
            "{labels_of:?} gave {context:?}: {seg:?} is no label's value"
        );
    }
});

//! What both cluster tests (`e2e`, `deployed`) run in a tenant namespace, and what they must read
//! back: a Tekton TaskRun step and a Knative trigger, their images and their output.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use testbed::cri::{BUSYBOX_IMAGE, Cri};
use testbed::images::ImageBuild;
use testbed::registry::{Format, Image, Registry};

/// A stand-in for Tekton's entrypoint: `-entrypoint X -- ARGS` runs `X ARGS`.
pub const TEKTON_ENTRYPOINT: &str = "#!/bin/sh\n\
[ \"$1\" = -entrypoint ] || { echo 'usage: -entrypoint X -- ARGS' >&2; exit 90; }\n\
ep=$2; shift 2\n\
[ \"$1\" = -- ] && shift\n\
exec \"$ep\" \"$@\"\n";

/// What the workloads print: enough lines to span several shipping batches, and stderr.
pub const SCRIPT: &str = "i=0; while [ $i -lt 3000 ]; do echo \"$0 line $i\"; i=$((i+1)); done; \
                          echo \"$0 done\" >&2";

/// The step's image, with the Tekton entrypoint stand-in, in containerd's store.
pub const STEP_IMAGE: &str = "localhost/e2e/step:1";

/// What [`SCRIPT`] run as `name` writes: (stdout, stderr).
pub fn expected(name: &str) -> (Vec<u8>, Vec<u8>) {
    let stdout: String = (0..3000).map(|i| format!("{name} line {i}\n")).collect();
    (stdout.into_bytes(), format!("{name} done\n").into_bytes())
}

/// Waits until `read` (a stream's status and bytes) says the stream is complete, and returns its
/// bytes; fails when it has dropped ranges or is not complete within `limit`.
pub fn complete_stream(
    limit: Duration,
    context: &str,
    name: &str,
    source: &str,
    mut read: impl FnMut() -> (Value, Vec<u8>),
) -> Vec<u8> {
    let deadline = Instant::now() + limit;
    loop {
        let (status, data) = read();
        if status["complete"] == true {
            let dropped = status["dropped"].as_array().map_or(0, Vec::len);
            assert_eq!(dropped, 0, "{source} {context} {name}: {status}");
            return data;
        }
        assert!(
            Instant::now() < deadline,
            "{source} {context} {name} not complete: {status}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Asserts both capture paths stored what [`SCRIPT`] run as `name` writes, byte-exact, as
/// `{prefix}.stdout` and `{prefix}.stderr` of `context`; `complete(stream, source)` reads a stream
/// once it is complete.
pub fn assert_both_paths(
    context: &str,
    prefix: &str,
    name: &str,
    mut complete: impl FnMut(&str, &str) -> Vec<u8>,
) {
    let (stdout, stderr) = expected(name);
    for source in ["entrypoint", "ebpf"] {
        let out = complete(&format!("{prefix}.stdout"), source);
        assert!(
            out == stdout,
            "{source} {context} stdout differs ({} bytes, want {})",
            out.len(),
            stdout.len()
        );
        let err = complete(&format!("{prefix}.stderr"), source);
        assert_eq!(
            String::from_utf8_lossy(&err),
            String::from_utf8_lossy(&stderr),
            "{source} {context}"
        );
    }
}

/// Each stream's `comparison` in a capture report, by name.
pub fn comparisons(report: &Value) -> Vec<(String, String)> {
    report["streams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_owned(),
                s["comparison"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// The workloads' images; returns the trigger's reference. The Knative trigger's image is in
/// `registry` and its pod has no command (as Knative Services usually have), so the webhook reads
/// the image's ENTRYPOINT and CMD there; the kubelet runs the same reference from containerd's
/// store. The Tekton step's image ([`STEP_IMAGE`]) carries the Tekton entrypoint stand-in.
pub fn workload_images(registry: &Registry, cri: &Cri) -> String {
    let trigger_image = format!("{}/e2e/trigger:1", registry.host());
    registry
        .push(
            "e2e/trigger:1",
            &Image::new("linux", "amd64")
                .entrypoint(["/bin/sh", "-c", SCRIPT])
                .cmd(["trigger"]),
            Format::Oci,
        )
        .unwrap();
    ImageBuild::busybox(trigger_image.as_str())
        .import(cri)
        .unwrap();
    ImageBuild::busybox(STEP_IMAGE)
        .file(
            "tekton-entrypoint",
            TEKTON_ENTRYPOINT.as_bytes().to_vec(),
            0o755,
        )
        .import(cri)
        .unwrap();
    trigger_image
}

/// The Tekton step's pod (`build-pod`, run 7 of workflow `wf`), on the host network to reach the
/// metadata API on loopback (no Service network on the test bed).
pub fn step_pod() -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "build-pod", "labels": {
            "tekton.dev/taskRun": "build-run", "relay.sh/workflow": "wf",
            "relay.sh/run": "7", "relay.sh/step": "build"}},
        "spec": {"restartPolicy": "Never", "hostNetwork": true, "containers": [{
            "name": "step-build", "image": STEP_IMAGE,
            "command": ["/tekton-entrypoint"],
            "args": ["-entrypoint", "/bin/sh", "--", "-c", SCRIPT, "build"]}]}})
}

/// The Knative trigger's pod (`trigger-pod`, sync `sync-1` of workflow `wf`) running
/// `trigger_image` with no command, beside an unwrapped queue-proxy that writes to stdout only.
pub fn trigger_pod(trigger_image: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "trigger-pod", "labels": {
            "serving.knative.dev/revision": "hook-1", "relay.sh/workflow": "wf",
            "relay.sh/trigger-sync-id": "sync-1"}},
        "spec": {"restartPolicy": "Never", "hostNetwork": true, "containers": [
            {"name": "user-container", "image": trigger_image},
            {"name": "queue-proxy", "image": BUSYBOX_IMAGE, "imagePullPolicy": "Never",
             "command": ["/bin/sh", "-c", "echo proxy ready"]}]}})
}

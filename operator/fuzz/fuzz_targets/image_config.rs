//! Image configuration blobs, as a registry serves them, through
//! `registry::image_command_from_config`, and the command it gives through pod mutation.
//!
//! Checked, beyond not panicking:
//! - the command is the blob's `config.Entrypoint` and `config.Cmd` (read independently, with
//!   `serde_json::Value`), empty when absent or `null`;
//! - a container without `command` (with and without `args`) whose image has that configuration
//!   is wrapped so that, after the kubelet's `$(VAR)` expansion, our entrypoint runs exactly what
//!   the image would have run: image values are never expanded (`operator_fuzz::check_mutation`).
#![no_main]

use k8s_openapi::api::core::v1::{Container, Pod, PodSpec};
use libfuzzer_sys::fuzz_target;
use operator::{
    mutate::{self, ImageCommand, SkipReason},
    registry::image_command_from_config,
};
use serde_json::Value;

/// What a blob says, read without the operator's types: `None` when its `Entrypoint` or `Cmd` is
/// neither absent, `null` nor an array of strings.
fn reference(blob: &Value) -> Option<ImageCommand> {
    let field = |name: &str| -> Option<Vec<String>> {
        match blob.get("config").and_then(|c| c.get(name)) {
            None | Some(Value::Null) => Some(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|i| i.as_str().map(str::to_owned))
                .collect(),
            Some(_) => None,
        }
    };
    match blob.get("config") {
        None | Some(Value::Null | Value::Object(_)) => Some(ImageCommand {
            entrypoint: field("Entrypoint")?,
            cmd: field("Cmd")?,
        }),
        Some(_) => None,
    }
}

fn container(image: &str, args: Option<Vec<String>>) -> Container {
    Container {
        name: "app".to_owned(),
        image: Some(image.to_owned()),
        args,
        ..Container::default()
    }
}

fuzz_target!(|data: &[u8]| {
    let parsed = image_command_from_config(data);
    let Ok(command) = parsed else {
        return;
    };
    // The operator's reading and the independent one agree where both read the blob: serde's
    // derive also takes a JSON array for a struct and skips fields it ignores without checking
    // their strings (a lone surrogate escape), which `Value` refuses; it refuses duplicate keys,
    // which `Value` takes.
    if let Ok(blob @ Value::Object(_)) = serde_json::from_slice::<Value>(data) {
        assert_eq!(
            reference(&blob).as_ref(),
            Some(&command),
            "read differently"
        );
    }

    // The same command through mutation: the resolver answers `image` with it.
    let resolve = |c: &Container| (c.image.as_deref() == Some("image")).then(|| command.clone());
    for args in [None, Some(vec!["$(HOME)".to_owned(), "$$x".to_owned()])] {
        let pod = Pod {
            spec: Some(PodSpec {
                containers: vec![container("image", args.clone())],
                ..PodSpec::default()
            }),
            ..Pod::default()
        };
        let m = mutate::mutate(&pod, &operator_fuzz::injection(), &resolve, &|_| None)
            .expect("mutates");
        let runs_something =
            !command.entrypoint.is_empty() || args.is_some() || !command.cmd.is_empty();
        if !runs_something {
            assert_eq!(
                m.skipped.first().map(|s| s.reason),
                Some(SkipReason::EmptyCommand)
            );
            continue;
        }
        if command
            .entrypoint
            .first()
            .is_some_and(|e| e == mutate::ENTRYPOINT_PATH)
        {
            assert_eq!(
                m.skipped.first().map(|s| s.reason),
                Some(SkipReason::AlreadyWrapped)
            );
            continue;
        }
        // `check_mutation` resolves images by name: spell this one out in the name.
        let spelled = format!(
            "image#{}#{}",
            command.entrypoint.join(","),
            command.cmd.join(",")
        );
        let representable = command
            .entrypoint
            .iter()
            .chain(&command.cmd)
            .all(|s| !s.is_empty() && !s.contains(',') && !s.contains('#'));
        if representable {
            let pod = Pod {
                spec: Some(PodSpec {
                    containers: vec![container(&spelled, args)],
                    ..PodSpec::default()
                }),
                ..Pod::default()
            };
            let m = mutate::mutate(
                &pod,
                &operator_fuzz::injection(),
                &operator_fuzz::resolve,
                &|_| None,
            )
            .expect("mutates");
            operator_fuzz::check_mutation(&pod, &m);
        } else {
            // Still: the wrapped container runs `-- ENTRYPOINT CMD` unexpanded.
            let c = &m.pod.spec.as_ref().expect("spec").containers[0];
            let expanded: Vec<Vec<u8>> = c
                .args
                .iter()
                .flatten()
                .map(|a| operator_fuzz::expand(a.as_bytes()))
                .collect();
            let mut want: Vec<Vec<u8>> = vec![b"--".to_vec()];
            want.extend(command.entrypoint.iter().map(|s| s.as_bytes().to_vec()));
            match &args {
                None => want.extend(command.cmd.iter().map(|s| s.as_bytes().to_vec())),
                Some(a) => want.extend(a.iter().map(|s| operator_fuzz::expand(s.as_bytes()))),
            }
            assert_eq!(expanded, want, "the image's command changed on the way");
        }
    }
});

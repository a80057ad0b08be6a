//! Shared by the operator's fuzz targets: the image commands inputs can name, a model of what the
//! kubelet, Tekton's entrypoint and ours run for a container, and the checks every mutation must
//! pass.
//!
//! The models are written from the upstream sources, not from `operator::mutate`:
//! - `$(VAR)` expansion: `k8s.io/kubernetes/third_party/forked/golang/expansion/expand.go`;
//! - command resolution: the kubelet's `kuberuntime` (`command` replaces `ENTRYPOINT` and drops
//!   `CMD`, `args` replace `CMD`, empty counts as unset);
//! - Tekton's entrypoint: Go's `flag` package over `cmd/entrypoint/main.go`'s flags, then
//!   `Entrypointer.Go` runs the `-entrypoint` value followed by `flag.Args()`;
//! - ours: `entrypoint -- CMD ARGS` runs `CMD ARGS` (`entrypoint/src/main.rs`, `args.rs`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use k8s_openapi::api::core::v1::{Container, EnvVar, Pod, Volume, VolumeMount};
use operator::mutate::{
    self, ENTRYPOINT_PATH, ENV_API_URL, ENV_POD_UID, ENV_REDACT, ENV_STDERR_STREAM,
    ENV_STDOUT_STREAM, ENV_TOKEN_FILE, INJECTED_ANNOTATION, ImageCommand, Injection,
    KNATIVE_REVISION_LABEL, KNATIVE_USER_CONTAINER, Mutation, TEKTON_TASK_RUN_LABEL, TOKEN_VOLUME,
    TOOLS_MOUNT_PATH, TOOLS_VOLUME,
};

/// The namespace of the tenant whose tools are ready.
pub const NAMESPACE: &str = "tenant-a";
/// The namespace of a tenant whose tools are not ready yet.
pub const NOT_READY_NAMESPACE: &str = "tenant-b";
pub const CLAIM: &str = "relay-tools-v1";
pub const API_URL: &str = "http://metadata-api.relay-system.svc:8080";
pub const AUDIENCE: &str = "relay-metadata-api";

/// The injection the webhook under test makes (default token path).
pub fn injection() -> Injection {
    Injection::new(CLAIM, API_URL, AUDIENCE)
}

/// The `ENTRYPOINT` and `CMD` of the images inputs name: `name#ep1,ep2#cmd1,cmd2` spells them out
/// (an empty part is an empty list); a few repositories are well known by their last path
/// segment, whatever registry, tag or digest; anything else cannot be resolved.
pub fn image_command(image: &str) -> Option<ImageCommand> {
    let list = |s: &str| -> Vec<String> {
        if s.is_empty() {
            Vec::new()
        } else {
            s.split(',').map(str::to_owned).collect()
        }
    };
    if let Some((_, rest)) = image.split_once('#') {
        let (entrypoint, cmd) = rest.split_once('#').unwrap_or((rest, ""));
        return Some(ImageCommand {
            entrypoint: list(entrypoint),
            cmd: list(cmd),
        });
    }
    let repository = image.split('@').next().unwrap_or_default();
    let name = repository.rsplit('/').next().unwrap_or_default();
    let name = name.split(':').next().unwrap_or_default();
    let (entrypoint, cmd): (&[&str], &[&str]) = match name {
        "nginx" => (&["/docker-entrypoint.sh"], &["nginx", "-g", "daemon off;"]),
        "alpine" | "busybox" => (&[], &["/bin/sh"]),
        "golang" => (&[], &["bash"]),
        "webhook" => (&["/usr/local/bin/webhook"], &["--port", "8080"]),
        "dollar" => (&["/bin/echo"], &["$(HOME)", "$$", "$"]),
        "scratch" => (&[], &[]),
        _ => return None,
    };
    let strings = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect();
    Some(ImageCommand {
        entrypoint: strings(entrypoint),
        cmd: strings(cmd),
    })
}

/// The resolver `mutate` is given: the container's image through [`image_command`].
pub fn resolve(c: &Container) -> Option<ImageCommand> {
    image_command(c.image.as_deref()?)
}

/// Kubernetes' `$(VAR)` expansion of a command or argument, byte for byte as Go does it, with
/// every variable defined as `<VAR>` (the same mapping on both sides of a comparison).
pub fn expand(input: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(input.len());
    let mut checkpoint = 0;
    let mut cursor = 0;
    while cursor < input.len() {
        if input[cursor] == b'$' && cursor + 1 < input.len() {
            out.extend_from_slice(&input[checkpoint..cursor]);
            let rest = &input[cursor + 1..];
            let advance = match rest[0] {
                // `$$` is an escaped `$`.
                b'$' => {
                    out.push(b'$');
                    1
                }
                b'(' => match rest[1..].iter().position(|&b| b == b')') {
                    Some(j) => {
                        out.push(b'<');
                        out.extend_from_slice(&rest[1..1 + j]);
                        out.push(b'>');
                        j + 2
                    }
                    // An unclosed reference is copied as it is.
                    None => {
                        out.extend_from_slice(b"$(");
                        1
                    }
                },
                // Go's `string(input[0])`: the byte read as a code point, UTF-8 encoded.
                b => {
                    out.push(b'$');
                    let mut buf = [0; 4];
                    out.extend_from_slice(char::from(b).encode_utf8(&mut buf).as_bytes());
                    1
                }
            };
            cursor += advance;
            checkpoint = cursor + 1;
        }
        cursor += 1;
    }
    out.extend_from_slice(&input[checkpoint..]);
    out
}

fn expanded(v: &[String]) -> Vec<Vec<u8>> {
    v.iter().map(|s| expand(s.as_bytes())).collect()
}

fn raw(v: &[String]) -> Vec<Vec<u8>> {
    v.iter().map(|s| s.as_bytes().to_vec()).collect()
}

/// The argv the container runtime starts for `c`, as the kubelet computes it; `None` when the
/// image is needed and unknown, or nothing would run.
pub fn runs(c: &Container) -> Option<Vec<Vec<u8>>> {
    let command = c.command.as_deref().unwrap_or_default();
    let args = c.args.as_deref().unwrap_or_default();
    let argv = if command.is_empty() {
        let image = resolve(c)?;
        let tail = if args.is_empty() {
            raw(&image.cmd)
        } else {
            expanded(args)
        };
        [raw(&image.entrypoint), tail].concat()
    } else {
        [expanded(command), expanded(args)].concat()
    };
    (!argv.is_empty()).then_some(argv)
}

/// Flags of Tekton's entrypoint that take no value.
const TEKTON_BOOL_FLAGS: [&str; 7] = [
    "wait_file_content",
    "run_always",
    "discard_error",
    "breakpoint_on_failure",
    "debug_before_step",
    "keep_pod_on_cancel",
    "enable_spire",
];
/// Flags of Tekton's entrypoint that take a value, its credential helpers' among them.
const TEKTON_VALUE_FLAGS: [&str; 20] = [
    "entrypoint",
    "wait_file",
    "post_file",
    "termination_path",
    "results",
    "step_results",
    "timeout",
    "on_error",
    "stdout_path",
    "stderr_path",
    "step_metadata_dir",
    "step_metadata_dir_link",
    "result_from",
    "step_when_expressions",
    "spire_socket_path",
    "docker-config",
    "docker-cfg",
    "basic-docker",
    "basic-git",
    "ssh-git",
];

/// What Tekton's entrypoint runs given `args` (after `$(VAR)` expansion), when its flags name the
/// command: Go's `flag.Parse` over its flags, then the `-entrypoint` value followed by the
/// remaining arguments. `None` when Go would refuse the arguments (an unknown flag, a missing
/// value, a bad bool), or stops before an `-entrypoint` (at an argument that is not a flag: Tekton
/// never writes one there, `mutate` does not model it), or nothing runs.
pub fn tekton_runs(args: &[Vec<u8>]) -> Option<Vec<Vec<u8>>> {
    let (entrypoint, rest) = tekton_flags(args)?;
    let mut argv = vec![entrypoint.filter(|e| !e.is_empty())?];
    argv.extend(rest);
    Some(argv)
}

/// Go's `flag.Parse` over Tekton's flags: the `-entrypoint` value, if any, and the arguments
/// after the flags. `None` when Go would refuse the arguments, or stops before an argument that
/// is not a flag.
fn tekton_flags(args: &[Vec<u8>]) -> Option<(Option<Vec<u8>>, Vec<Vec<u8>>)> {
    let mut entrypoint: Option<Vec<u8>> = None;
    let mut i = 0;
    while let Some(arg) = args.get(i) {
        if arg.len() < 2 || arg[0] != b'-' {
            break;
        }
        let minuses = if arg[1] == b'-' {
            if arg.len() == 2 {
                // `--` ends the flags and is consumed.
                i += 1;
                break;
            }
            2
        } else {
            1
        };
        let spec = &arg[minuses..];
        if spec.is_empty() || spec[0] == b'-' || spec[0] == b'=' {
            return None;
        }
        let (name, value) = match spec.iter().position(|&b| b == b'=') {
            Some(eq) => (&spec[..eq], Some(&spec[eq + 1..])),
            None => (spec, None),
        };
        let name = std::str::from_utf8(name).ok()?;
        if TEKTON_BOOL_FLAGS.contains(&name) {
            if let Some(v) = value
                && !matches!(
                    v,
                    b"1" | b"t"
                        | b"T"
                        | b"true"
                        | b"TRUE"
                        | b"True"
                        | b"0"
                        | b"f"
                        | b"F"
                        | b"false"
                        | b"FALSE"
                        | b"False"
                )
            {
                return None;
            }
        } else if TEKTON_VALUE_FLAGS.contains(&name) {
            let value = match value {
                Some(v) => v.to_vec(),
                None => {
                    i += 1;
                    args.get(i)?.clone()
                }
            };
            if name == "entrypoint" {
                entrypoint = Some(value);
            }
        } else {
            return None;
        }
        i += 1;
    }
    Some((entrypoint, args[i..].to_vec()))
}

/// Tekton's variable of a step without `command`: the image's command per platform, which its
/// entrypoint runs (followed by the step's arguments) when no `-entrypoint` is given
/// (`cmd/entrypoint/main.go`, `pkg/pod/entrypoint_lookup.go`).
const TEKTON_PLATFORM_COMMANDS: &str = "TEKTON_PLATFORM_COMMANDS";

/// The platform commands of a container, as Tekton's entrypoint decodes them (JSON of platform
/// to command); `None` when absent or not that JSON.
fn platform_commands(c: &Container) -> Option<std::collections::BTreeMap<String, Vec<String>>> {
    let value = c
        .env
        .iter()
        .flatten()
        .find(|e| e.name == TEKTON_PLATFORM_COMMANDS)?
        .value
        .as_deref()?;
    serde_json::from_str(value).ok()
}

/// For a Tekton step without `-entrypoint`: what Tekton's entrypoint runs on each platform,
/// given the container's platform commands and its arguments.
fn tekton_platform_runs(c: &Container, args: &[Vec<u8>]) -> Option<Vec<(String, Vec<Vec<u8>>)>> {
    let (None, rest) = tekton_flags(args)? else {
        return None;
    };
    let commands = platform_commands(c)?;
    Some(
        commands
            .into_iter()
            .map(|(platform, cmd)| {
                let argv = cmd
                    .into_iter()
                    .map(String::into_bytes)
                    .chain(rest.iter().cloned())
                    .collect();
                (platform, argv)
            })
            .collect(),
    )
}

/// What our entrypoint runs when started as `argv` (program name first): `entrypoint -- CMD ARGS`
/// and `entrypoint CMD ARGS` run `CMD ARGS`, but `entrypoint install DIR` installs itself and a
/// leading `-x` is one of its own options. `None` for anything but our entrypoint running a
/// command.
pub fn relay_runs(argv: &[Vec<u8>]) -> Option<Vec<Vec<u8>>> {
    let [program, rest @ ..] = argv else {
        return None;
    };
    if program != ENTRYPOINT_PATH.as_bytes() {
        return None;
    }
    match rest {
        [sub, _dir] if sub == b"install" => None,
        [dashes, command @ ..] if dashes == b"--" => {
            (!command.is_empty()).then(|| command.to_vec())
        }
        [first, ..] if first.len() > 1 && first[0] == b'-' => None,
        [] => None,
        command => Some(command.to_vec()),
    }
}

fn has_label(pod: &Pod, label: &str) -> bool {
    pod.metadata
        .labels
        .as_ref()
        .is_some_and(|l| l.contains_key(label))
}

/// `a` and `b` name the same directory (trailing slashes aside), as the mount check does.
fn same_path(a: &str, b: &str) -> bool {
    a.trim_end_matches('/') == b.trim_end_matches('/')
}

/// Whether `name` is a valid environment variable name (`C_IDENTIFIER`-like, as Kubernetes
/// validates them after admission).
fn env_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_' || b == b'.' || b == b'-')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
}

/// A wrapped container's env: its own variables, minus ours, in order; then the redaction list
/// when it has secrets; then ours. The list, as the entrypoint reads it (after the kubelet's
/// `$(VAR)` expansion), names every variable the container gets from a Secret.
fn check_env(c0: &Container, c1: &Container, knative: bool) {
    let env = c1.env.as_deref().unwrap_or_default();
    let mut names = vec![ENV_API_URL, ENV_TOKEN_FILE];
    if knative {
        names.push(ENV_POD_UID);
    }
    names.extend([ENV_STDOUT_STREAM, ENV_STDERR_STREAM]);
    let all_ours = [
        ENV_API_URL,
        ENV_TOKEN_FILE,
        ENV_POD_UID,
        ENV_STDOUT_STREAM,
        ENV_STDERR_STREAM,
        ENV_REDACT,
    ];
    let kept: Vec<&EnvVar> = c0
        .env
        .iter()
        .flatten()
        .filter(|e| !all_ours.contains(&e.name.as_str()))
        .collect();
    let secret_vars: Vec<&str> = c0
        .env
        .iter()
        .flatten()
        .filter(|e| {
            e.value_from
                .as_ref()
                .is_some_and(|v| v.secret_key_ref.is_some())
        })
        .map(|e| e.name.as_str())
        .collect();
    let prefixes: Vec<String> = c0
        .env_from
        .iter()
        .flatten()
        .filter(|f| f.secret_ref.is_some())
        .filter_map(|f| f.prefix.as_deref().filter(|p| !p.is_empty()))
        .map(|p| format!("{p}*"))
        .collect();
    let redact = env.get(kept.len()).filter(|e| e.name == ENV_REDACT);
    let ours_at = kept.len() + usize::from(redact.is_some());
    // Tekton's platform commands are rewritten when the step is wrapped through them; what
    // they run is checked with the command.
    let comparable = |e: &EnvVar| {
        let mut e = e.clone();
        if e.name == TEKTON_PLATFORM_COMMANDS {
            e.value = None;
        }
        e
    };
    assert_eq!(
        env[..kept.len().min(env.len())]
            .iter()
            .map(comparable)
            .collect::<Vec<_>>(),
        kept.iter().map(|e| comparable(e)).collect::<Vec<_>>(),
        "container {}: its own env changed, or one of ours is there twice",
        c0.name
    );
    let tail: Vec<&str> = env
        .get(ours_at..)
        .unwrap_or_default()
        .iter()
        .map(|e| e.name.as_str())
        .collect();
    assert_eq!(
        tail, names,
        "container {}: env does not end with ours",
        c0.name
    );
    if secret_vars.is_empty() && prefixes.is_empty() {
        return;
    }
    let list = redact
        .and_then(|e| e.value.as_deref())
        .unwrap_or_else(|| panic!("container {}: secrets, but no {ENV_REDACT}", c0.name));
    let expanded = expand(list.as_bytes());
    let listed: Vec<&[u8]> = expanded.split(|&b| b == b',').collect();
    for name in secret_vars.iter().filter(|n| env_name(n)) {
        assert!(
            listed.contains(&name.as_bytes()),
            "container {}: secret variable {name:?} missing from {ENV_REDACT}={list:?}",
            c0.name
        );
    }
    for prefix in prefixes
        .iter()
        .filter(|p| env_name(p.trim_end_matches('*')))
    {
        assert!(
            listed.contains(&prefix.as_bytes()),
            "container {}: secret prefix {prefix:?} missing from {ENV_REDACT}={list:?}",
            c0.name
        );
    }
}

/// Checks `m`, the mutation of `before`:
/// - a container left out is unchanged, as is everything but containers, volumes and annotations;
/// - a wrapped container runs our entrypoint, which runs exactly what the container ran before
///   (after the kubelet's `$(VAR)` expansion, and Tekton's flags for Tekton pods);
/// - it mounts the tools and the token once each, read-only, and ends its env with ours, after
///   the list of its variables that hold secrets;
/// - the pod has the two volumes once each and the injected annotation;
/// - mutating the result again changes nothing, with or without the annotation.
pub fn check_mutation(before: &Pod, m: &Mutation) {
    let after = &m.pod;
    let tekton = has_label(before, TEKTON_TASK_RUN_LABEL);
    let knative = !tekton && has_label(before, KNATIVE_REVISION_LABEL);
    let (Some(spec_before), Some(spec_after)) = (&before.spec, &after.spec) else {
        panic!("a mutation without a spec");
    };
    assert_eq!(
        spec_before.containers.len(),
        spec_after.containers.len(),
        "containers added or removed"
    );
    if m.patch.0.is_empty() {
        assert_eq!(after, before, "an empty patch with a changed pod");
        let twice =
            mutate::mutate(after, &injection(), &resolve, &|_| None).expect("mutates again");
        assert_eq!(
            twice, *m,
            "an unchanged pod mutated differently the second time"
        );
        return;
    }

    // Everything but the containers, volumes and annotations is as it was.
    let rest = |p: &Pod| {
        let mut p = p.clone();
        if let Some(spec) = p.spec.as_mut() {
            spec.containers.clear();
            spec.volumes = None;
        }
        if let Some(a) = p.metadata.annotations.as_mut() {
            a.remove(INJECTED_ANNOTATION);
        }
        if p.metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.is_empty())
        {
            p.metadata.annotations = None;
        }
        p
    };
    assert_eq!(rest(after), rest(before), "more than containers changed");
    let not_ours = |v: &[Volume]| -> Vec<Volume> {
        v.iter()
            .filter(|v| v.name != TOOLS_VOLUME && v.name != TOKEN_VOLUME)
            .cloned()
            .collect()
    };
    assert_eq!(
        not_ours(spec_after.volumes.as_deref().unwrap_or_default()),
        not_ours(spec_before.volumes.as_deref().unwrap_or_default()),
        "the pod's own volumes changed"
    );
    let annotations = after.metadata.annotations.as_ref();
    assert_eq!(
        annotations.and_then(|a| a.get(INJECTED_ANNOTATION)),
        Some(&"true".to_owned()),
        "mutated but not annotated"
    );

    let token_dir = mutate::DEFAULT_TOKEN_PATH
        .rsplit_once('/')
        .map(|(dir, _)| dir)
        .unwrap();
    let mut wrapped = 0;
    for (c0, c1) in spec_before.containers.iter().zip(&spec_after.containers) {
        if c0 == c1 {
            continue;
        }
        wrapped += 1;
        assert_eq!(c0.name, c1.name, "a container renamed");
        assert!(
            !knative || c0.name == KNATIVE_USER_CONTAINER,
            "Knative container {} wrapped",
            c0.name
        );
        // Only command, args, mounts and env change.
        let mut same = c1.clone();
        same.command.clone_from(&c0.command);
        same.args.clone_from(&c0.args);
        same.volume_mounts.clone_from(&c0.volume_mounts);
        same.env.clone_from(&c0.env);
        assert_eq!(
            &same, c0,
            "container {} changed beyond its command",
            c0.name
        );

        if tekton {
            assert_eq!(c1.command, c0.command, "Tekton's own command replaced");
            let before_args = expanded(c0.args.as_deref().unwrap_or_default());
            let after_args = expanded(c1.args.as_deref().unwrap_or_default());
            if let Some(original) = tekton_runs(&before_args) {
                let started = tekton_runs(&after_args).unwrap_or_else(|| {
                    panic!("Tekton refuses the rewritten arguments {:?}", c1.args)
                });
                assert_eq!(
                    relay_runs(&started).as_ref(),
                    Some(&original),
                    "Tekton step {}: {:?} became {:?}",
                    c0.name,
                    c0.args,
                    c1.args
                );
            } else if let Some(originals) = tekton_platform_runs(c0, &before_args) {
                let started = tekton_platform_runs(c1, &after_args).unwrap_or_else(|| {
                    panic!("Tekton cannot run the rewritten step {}", c0.name)
                });
                assert_eq!(started.len(), originals.len(), "platforms of {}", c0.name);
                for ((p0, original), (p1, argv)) in originals.iter().zip(&started) {
                    assert_eq!(p0, p1, "platforms of {}", c0.name);
                    assert_eq!(
                        relay_runs(argv).as_ref(),
                        Some(original),
                        "Tekton step {} on {p0}: {original:?} became {argv:?}",
                        c0.name
                    );
                }
            }
        } else {
            let original = runs(c0).unwrap_or_else(|| {
                panic!("container {} wrapped though it runs nothing known", c0.name)
            });
            let started = runs(c1).expect("a wrapped container runs something");
            assert_eq!(
                relay_runs(&started).as_ref(),
                Some(&original),
                "container {}: {:?} {:?} became {:?} {:?}",
                c0.name,
                c0.command,
                c0.args,
                c1.command,
                c1.args
            );
        }

        let mounts = c1.volume_mounts.as_deref().unwrap_or_default();
        let other_mounts = |m: &[VolumeMount]| -> Vec<VolumeMount> {
            m.iter()
                .filter(|m| m.name != TOOLS_VOLUME && m.name != TOKEN_VOLUME)
                .cloned()
                .collect()
        };
        assert_eq!(
            other_mounts(mounts),
            other_mounts(c0.volume_mounts.as_deref().unwrap_or_default()),
            "container {}: its own mounts changed",
            c0.name
        );
        for (name, path) in [(TOOLS_VOLUME, TOOLS_MOUNT_PATH), (TOKEN_VOLUME, token_dir)] {
            let ours: Vec<_> = mounts.iter().filter(|m| m.name == name).collect();
            assert_eq!(
                ours.len(),
                1,
                "container {}: {name} mounted {} times",
                c0.name,
                ours.len()
            );
            assert_eq!(ours[0].mount_path, path);
            assert_eq!(ours[0].read_only, Some(true));
            assert!(
                !mounts
                    .iter()
                    .any(|m| m.name != name && same_path(&m.mount_path, path)),
                "container {}: another volume at {path}",
                c0.name
            );
        }
        check_env(c0, c1, knative);
    }
    assert!(wrapped > 0, "a patch without a wrapped container");
    assert_eq!(
        wrapped + m.skipped.len(),
        spec_after.containers.len(),
        "skipped {:?}",
        m.skipped
    );

    let volumes = spec_after.volumes.as_deref().unwrap_or_default();
    for name in [TOOLS_VOLUME, TOKEN_VOLUME] {
        assert_eq!(
            volumes.iter().filter(|v| v.name == name).count(),
            1,
            "volume {name} not there exactly once"
        );
    }
    let tools = volumes.iter().find(|v| v.name == TOOLS_VOLUME).unwrap();
    let claim = tools.persistent_volume_claim.as_ref().expect("tools PVC");
    assert_eq!(claim.claim_name, CLAIM);
    assert_eq!(claim.read_only, Some(true));

    // The API server's round trip: the patch applied to the submitted pod's JSON.
    let mut doc = serde_json::to_value(before).unwrap();
    json_patch::patch(&mut doc, &m.patch).expect("the patch applies to the pod it was made from");
    let patched: Pod = serde_json::from_value(doc).expect("the patched pod parses");
    assert_eq!(&patched, after, "the patch does not give the mutated pod");

    // Mutating it again changes nothing, also when the annotation was lost (a pod copied from an
    // injected one).
    let twice = mutate::mutate(after, &injection(), &resolve, &|_| None).expect("mutates again");
    assert!(
        twice.patch.0.is_empty(),
        "a second mutation patches {:?}",
        twice.patch
    );
    assert_eq!(&twice.pod, after);

    let mut copy = after.clone();
    if let Some(a) = copy.metadata.annotations.as_mut() {
        a.remove(INJECTED_ANNOTATION);
    }
    let copied =
        mutate::mutate(&copy, &injection(), &resolve, &|_| None).expect("mutates the copy");
    assert!(
        copied.patch.0.is_empty(),
        "a mutated pod without its annotation is patched again: {:?}",
        copied.patch
    );
}

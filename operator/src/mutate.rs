//! Pod mutation: wrapping containers with the injected entrypoint.
//!
//! [`mutate`] is pure: the webhook resolves image entrypoints from the registry, and the key
//! names of Secrets ([`secrets_to_read`]) from the API server, beforehand and hands them in
//! through `resolve` and `secret_keys`, so every rule here is covered by table tests.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;

use k8s_openapi::api::core::v1::{
    Container, EnvVar, EnvVarSource, ObjectFieldSelector, PersistentVolumeClaimVolumeSource, Pod,
    ProjectedVolumeSource, ServiceAccountTokenProjection, Volume, VolumeMount, VolumeProjection,
};

/// Marks a pod the webhook has already mutated; such a pod is returned unchanged.
pub const INJECTED_ANNOTATION: &str = "relay.sh/injected";
/// The tools PVC's volume name.
pub const TOOLS_VOLUME: &str = "relay-tools";
/// Where the tools volume is mounted in wrapped containers.
pub const TOOLS_MOUNT_PATH: &str = "/relay";
/// The entrypointer inside the tools volume.
pub const ENTRYPOINT_PATH: &str = "/relay/lib/entrypoint";
/// The projected ServiceAccount token's volume name.
pub const TOKEN_VOLUME: &str = "relay-token";
/// Default path of the projected token in wrapped containers.
pub const DEFAULT_TOKEN_PATH: &str = "/var/run/secrets/relay/token";
/// Lifetime the kubelet requests for the projected token; it rotates it well before expiry.
pub const TOKEN_EXPIRATION_SECONDS: i64 = 3600;
/// Label Tekton puts on TaskRun pods.
pub const TEKTON_TASK_RUN_LABEL: &str = contract::pod_context::labels::TEKTON_TASK_RUN;
/// Label Knative Serving puts on revision pods.
pub const KNATIVE_REVISION_LABEL: &str = contract::pod_context::labels::KNATIVE_REVISION;
/// The one container of a Knative pod that runs tenant code.
pub const KNATIVE_USER_CONTAINER: &str = "user-container";

// Environment the entrypointer reads, named in the contract both sides use.
pub use contract::env::{
    METADATA_API_TOKEN_FILE as ENV_TOKEN_FILE, METADATA_API_URL as ENV_API_URL,
    POD_UID as ENV_POD_UID, REDACT_ENV as ENV_REDACT, STDERR_STREAM as ENV_STDERR_STREAM,
    STDOUT_STREAM as ENV_STDOUT_STREAM,
};

/// What to inject, from the tenant's state and the operator's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Injection {
    /// The tenant's tools PVC (ReadOnlyMany) in the pod's namespace.
    pub claim_name: String,
    /// Metadata API base URL as the pod reaches it.
    pub api_url: String,
    /// Audience of the projected ServiceAccount token (the metadata API's).
    pub audience: String,
    /// Absolute path of the token file in wrapped containers; its directory is the mount.
    pub token_path: String,
}

impl Injection {
    /// An injection with the default token path.
    pub fn new(
        claim_name: impl Into<String>,
        api_url: impl Into<String>,
        audience: impl Into<String>,
    ) -> Self {
        Self {
            claim_name: claim_name.into(),
            api_url: api_url.into(),
            audience: audience.into(),
            token_path: DEFAULT_TOKEN_PATH.to_owned(),
        }
    }

    /// The token's mount directory and file name.
    fn token_location(&self) -> Result<(&str, &str), MutateError> {
        let invalid = |reason| MutateError::InvalidInjection {
            field: "token_path",
            reason,
        };
        let (dir, file) = self
            .token_path
            .rsplit_once('/')
            .ok_or(invalid("must be absolute"))?;
        if !self.token_path.starts_with('/') {
            return Err(invalid("must be absolute"));
        }
        if dir.is_empty() || file.is_empty() {
            return Err(invalid("must name a file below a directory other than /"));
        }
        if dir.split('/').any(|s| s == ".." || s == ".") || file == ".." || file == "." {
            return Err(invalid("must not contain . or .. segments"));
        }
        if under(dir, TOOLS_MOUNT_PATH) || under(TOOLS_MOUNT_PATH, dir) {
            return Err(invalid("must not overlap the tools mount"));
        }
        Ok((dir, file))
    }

    fn validate(&self) -> Result<(&str, &str), MutateError> {
        for (field, value) in [
            ("claim_name", &self.claim_name),
            ("api_url", &self.api_url),
            ("audience", &self.audience),
        ] {
            if value.is_empty() {
                return Err(MutateError::InvalidInjection {
                    field,
                    reason: "must not be empty",
                });
            }
        }
        self.token_location()
    }
}

/// An image's configured `ENTRYPOINT` and `CMD`, as the registry reports them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageCommand {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
}

/// The result of [`mutate`].
#[derive(Debug, Clone, PartialEq)]
pub struct Mutation {
    /// The pod as it should be created.
    pub pod: Pod,
    /// RFC 6902 patch from the given pod to [`Mutation::pod`]; empty when nothing changed.
    pub patch: json_patch::Patch,
    /// Regular containers left as they were, and why.
    pub skipped: Vec<Skipped>,
}

/// A regular container that was not wrapped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub container: String,
    pub reason: SkipReason,
}

/// Why a container was not wrapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SkipReason {
    /// No `command`, and the image's entrypoint could not be resolved.
    UnresolvedImage,
    /// No `command`, and the image has neither `ENTRYPOINT` nor `CMD`.
    EmptyCommand,
    /// The container already runs the entrypointer.
    AlreadyWrapped,
    /// A Knative container other than `user-container` (for example `queue-proxy`).
    NotUserContainer,
    /// A Tekton pod container whose arguments have no `-entrypoint` (for example a sidecar).
    NoTektonEntrypoint,
    /// Tekton arguments we cannot rewrite safely: `-entrypoint` without a value, given twice,
    /// or no `--` separator.
    MalformedTektonArgs,
    /// Another volume is already mounted where ours go.
    MountPathTaken,
    /// A Tekton step with `stdoutConfig`/`stderrConfig` (`-stdout_path`, `-stderr_path`): Tekton's
    /// entrypoint tees its child's output into those files, from which it reads step results;
    /// our entrypoint as its child writes nothing there. Left to the collector, which captures
    /// what Tekton tees to the container's output anyway.
    TektonOutputFile,
    /// A Tekton step in hermetic mode (`TEKTON_HERMETIC=1`): Tekton's entrypoint starts the step's
    /// command in a network namespace of its own without interfaces (tektoncd/pipeline
    /// `cmd/entrypoint/runner.go`, `dropNetworking`), where our entrypoint could not ship.
    /// Left to the collector, which says so in the capture report.
    TektonHermetic,
}

impl SkipReason {
    /// A stable name, for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UnresolvedImage => "unresolved_image",
            Self::EmptyCommand => "empty_command",
            Self::AlreadyWrapped => "already_wrapped",
            Self::NotUserContainer => "not_user_container",
            Self::NoTektonEntrypoint => "no_tekton_entrypoint",
            Self::MalformedTektonArgs => "malformed_tekton_args",
            Self::MountPathTaken => "mount_path_taken",
            Self::TektonOutputFile => "tekton_output_file",
            Self::TektonHermetic => "tekton_hermetic",
        }
    }
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a pod cannot be mutated at all.
#[derive(Debug, thiserror::Error)]
pub enum MutateError {
    #[error("pod has no spec")]
    MissingSpec,
    #[error("invalid injection: {field} {reason}")]
    InvalidInjection {
        field: &'static str,
        reason: &'static str,
    },
    #[error("failed to represent the pod as JSON")]
    Json(#[from] serde_json::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Workload {
    Plain,
    Tekton,
    Knative,
}

impl Workload {
    fn of(pod: &Pod) -> Self {
        let has = |label| {
            pod.metadata
                .labels
                .as_ref()
                .is_some_and(|l| l.contains_key(label))
        };
        if has(TEKTON_TASK_RUN_LABEL) {
            Self::Tekton
        } else if has(KNATIVE_REVISION_LABEL) {
            Self::Knative
        } else {
            Self::Plain
        }
    }
}

/// Wraps `pod`'s containers with the entrypointer.
///
/// Plain pods: every regular container. Tekton TaskRun pods: step containers, inside Tekton's
/// own `-entrypoint` argument. Knative pods: `user-container` only. Init containers are never
/// wrapped (the collector covers them). `resolve` gives the image's `ENTRYPOINT` and `CMD` and is
/// called only for containers without `command`. `secret_keys` gives the key names of a Secret in
/// the pod's namespace (`None` when they are unknown), for the `RELAY_REDACT_ENV` list of wrapped
/// containers with an `envFrom` `secretRef` without a prefix; see [`secrets_to_read`].
///
/// A pod already annotated [`INJECTED_ANNOTATION`], or one where no container could be wrapped,
/// comes back unchanged with an empty patch.
pub fn mutate(
    pod: &Pod,
    injection: &Injection,
    resolve: &dyn Fn(&Container) -> Option<ImageCommand>,
    secret_keys: &dyn Fn(&str) -> Option<Vec<String>>,
) -> Result<Mutation, MutateError> {
    let (token_dir, token_file) = injection.validate()?;
    let unchanged = |skipped| Mutation {
        pod: pod.clone(),
        patch: json_patch::Patch::default(),
        skipped,
    };
    let injected = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(INJECTED_ANNOTATION))
        .is_some_and(|v| v == "true");
    if injected {
        return Ok(unchanged(Vec::new()));
    }
    let workload = Workload::of(pod);
    let mut new = pod.clone();
    let spec = new.spec.as_mut().ok_or(MutateError::MissingSpec)?;

    let mut skipped = Vec::new();
    let mut wrapped = 0usize;
    for c in &mut spec.containers {
        match wrap(workload, c, resolve, secret_keys, injection, token_dir) {
            Ok(()) => wrapped += 1,
            Err(reason) => skipped.push(Skipped {
                container: c.name.clone(),
                reason,
            }),
        }
    }
    if wrapped == 0 {
        // The PVC and token would serve nobody, and a PVC that cannot bind would hold the pod.
        return Ok(unchanged(skipped));
    }

    let volumes = spec.volumes.get_or_insert_with(Vec::new);
    upsert(volumes, tools_volume(injection), |v| &v.name);
    upsert(volumes, token_volume(injection, token_file), |v| &v.name);
    new.metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(INJECTED_ANNOTATION.to_owned(), "true".to_owned());

    let patch = json_patch::diff(&serde_json::to_value(pod)?, &serde_json::to_value(&new)?);
    Ok(Mutation {
        pod: new,
        patch,
        skipped,
    })
}

/// Wraps one regular container, or says why not; on `Err` the container is untouched.
fn wrap(
    workload: Workload,
    c: &mut Container,
    resolve: &dyn Fn(&Container) -> Option<ImageCommand>,
    secret_keys: &dyn Fn(&str) -> Option<Vec<String>>,
    injection: &Injection,
    token_dir: &str,
) -> Result<(), SkipReason> {
    if workload == Workload::Knative && c.name != KNATIVE_USER_CONTAINER {
        return Err(SkipReason::NotUserContainer);
    }
    let taken = c.volume_mounts.iter().flatten().any(|m| {
        let ours = [(TOOLS_VOLUME, TOOLS_MOUNT_PATH), (TOKEN_VOLUME, token_dir)];
        ours.iter()
            .any(|(name, path)| m.name != *name && same_path(&m.mount_path, path))
    });
    if taken {
        return Err(SkipReason::MountPathTaken);
    }
    match workload {
        Workload::Tekton if env_value(c, TEKTON_HERMETIC) == Some("1") => {
            return Err(SkipReason::TektonHermetic);
        }
        Workload::Tekton => match tekton_args(c.args.as_deref().unwrap_or_default()) {
            Ok(args) => c.args = Some(args),
            // A step without `command`: Tekton resolved the image's entrypoint per platform.
            Err(SkipReason::NoTektonEntrypoint) if platform_commands(c).is_some() => {
                wrap_platform_commands(c)?;
            }
            Err(e) => return Err(e),
        },
        Workload::Plain | Workload::Knative => {
            let original = original_command(c, resolve)?;
            c.command = Some(vec![ENTRYPOINT_PATH.to_owned()]);
            c.args = Some(std::iter::once("--".to_owned()).chain(original).collect());
        }
    }

    let mounts = c.volume_mounts.get_or_insert_with(Vec::new);
    upsert(mounts, mount(TOOLS_VOLUME, TOOLS_MOUNT_PATH), |m| &m.name);
    upsert(mounts, mount(TOKEN_VOLUME, token_dir), |m| &m.name);

    let redact = redact_list(c, secret_keys);
    let env = c.env.get_or_insert_with(Vec::new);
    // Ours go last and in order: a `$(VAR)` reference sees only variables defined before it.
    let names = [
        ENV_API_URL,
        ENV_TOKEN_FILE,
        ENV_POD_UID,
        ENV_STDOUT_STREAM,
        ENV_STDERR_STREAM,
        ENV_REDACT,
    ];
    env.retain(|e| !names.contains(&e.name.as_str()));
    if !redact.is_empty() {
        env.push(value(ENV_REDACT, &escape(&redact)));
    }
    env.push(value(ENV_API_URL, &injection.api_url));
    env.push(value(ENV_TOKEN_FILE, &injection.token_path));
    // The collector names Knative streams per replica, since replicas of a revision share one
    // trigger context; the UID is not known at admission, so the kubelet fills it in.
    let prefix = if workload == Workload::Knative {
        env.push(EnvVar {
            name: ENV_POD_UID.to_owned(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    api_version: Some("v1".to_owned()),
                    field_path: "metadata.uid".to_owned(),
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
        format!("{}.$({ENV_POD_UID})", c.name)
    } else {
        c.name.clone()
    };
    env.push(value(ENV_STDOUT_STREAM, &format!("{prefix}.stdout")));
    env.push(value(ENV_STDERR_STREAM, &format!("{prefix}.stderr")));
    Ok(())
}

/// The Secrets whose key names [`mutate`] asks `secret_keys` for: those of `envFrom` `secretRef`s
/// without a prefix in the containers it may wrap (every regular container; a Knative pod's
/// `user-container`). Empty for a pod already injected.
pub fn secrets_to_read(pod: &Pod) -> BTreeSet<String> {
    let injected = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(INJECTED_ANNOTATION))
        .is_some_and(|v| v == "true");
    if injected {
        return BTreeSet::new();
    }
    let workload = Workload::of(pod);
    pod.spec
        .iter()
        .flat_map(|spec| &spec.containers)
        .filter(|c| workload != Workload::Knative || c.name == KNATIVE_USER_CONTAINER)
        .flat_map(unprefixed_secret_refs)
        .map(str::to_owned)
        .collect()
}

/// The names of the Secrets a container takes all keys of without a prefix (`envFrom`), in order,
/// repeats included.
pub fn unprefixed_secret_refs(c: &Container) -> impl Iterator<Item = &str> {
    c.env_from
        .iter()
        .flatten()
        .filter(|f| f.prefix.as_deref().is_none_or(str::is_empty))
        .filter_map(|f| f.secret_ref.as_ref())
        .map(|s| s.name.as_str())
        .filter(|name| !name.is_empty())
}

/// Whether the kubelet may set a Secret's `key` as a variable through `envFrom`, and the list can
/// carry it. The kubelet skips keys that are not variable names: those outside
/// `[-._a-zA-Z][-._a-zA-Z0-9]*`, or with the `RelaxedEnvironmentVariableValidation` feature gate
/// (Kubernetes 1.30 on) those with a character other than printable ASCII or with `=`. The looser
/// rule is used, since listing a
/// variable that is not set costs nothing while leaving out one that is set leaks its value. `,`,
/// spaces and a trailing `*` cannot be listed (separator, trimmed, and prefix pattern of
/// `redact::EnvSelector`); the API server refuses such keys in Secrets anyway
/// (`[-._a-zA-Z0-9]+`).
fn is_listable_env_name(key: &str) -> bool {
    !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'=' && b != b',')
        && !key.ends_with('*')
}

/// The `RELAY_REDACT_ENV` list of a container: the variables it gets from Secrets, so that the
/// entrypoint (and the collector, from the container's environment) redacts their values. An
/// `env` entry with a `secretKeyRef` is named; an `envFrom` `secretRef` with a prefix is
/// `PREFIX*`; one without a prefix lists the Secret's keys that the kubelet sets as variables, as
/// `secret_keys` gives them (the webhook reads them at admission). A Secret whose keys are unknown
/// (missing, not readable) lists nothing, and keys added to a Secret after admission are not
/// listed. A list the container sets itself (a literal value) is kept, in front of ours. Each
/// entry appears once.
fn redact_list(c: &Container, secret_keys: &dyn Fn(&str) -> Option<Vec<String>>) -> String {
    let env = c.env.iter().flatten();
    let own = env
        .clone()
        .find(|e| e.name == ENV_REDACT && e.value_from.is_none())
        .and_then(|e| e.value.clone())
        .filter(|v| !v.trim().is_empty());
    let named = env
        .filter(|e| {
            e.value_from
                .as_ref()
                .is_some_and(|v| v.secret_key_ref.is_some())
        })
        .map(|e| e.name.clone());
    let prefixed = c
        .env_from
        .iter()
        .flatten()
        .filter(|f| f.secret_ref.is_some())
        .filter_map(|f| f.prefix.as_deref().filter(|p| !p.is_empty()))
        .map(|p| format!("{p}*"));
    let mut resolved = Vec::new();
    let mut asked = HashSet::new();
    for name in unprefixed_secret_refs(c) {
        if asked.insert(name) {
            let mut keys = secret_keys(name).unwrap_or_default();
            keys.retain(|k| is_listable_env_name(k));
            keys.sort();
            resolved.extend(keys);
        }
    }
    let mut seen = HashSet::new();
    let list: Vec<String> = own
        .into_iter()
        .chain(named)
        .chain(prefixed)
        .chain(resolved)
        .filter(|entry| seen.insert(entry.clone()))
        .collect();
    list.join(",")
}

/// The command the container would run without us, following Kubernetes: `command` replaces the
/// image's `ENTRYPOINT` (and drops its `CMD`); `args` replace `CMD`. Empty counts as unset, as in
/// the container runtimes.
fn original_command(
    c: &Container,
    resolve: &dyn Fn(&Container) -> Option<ImageCommand>,
) -> Result<Vec<String>, SkipReason> {
    let args = c.args.as_deref().unwrap_or_default();
    match c.command.as_deref() {
        Some([first, ..]) if first == ENTRYPOINT_PATH => Err(SkipReason::AlreadyWrapped),
        Some(command @ [_, ..]) => Ok(command.iter().chain(args).cloned().collect()),
        _ => {
            let image = resolve(c).ok_or(SkipReason::UnresolvedImage)?;
            if image
                .entrypoint
                .first()
                .is_some_and(|e| e == ENTRYPOINT_PATH)
            {
                return Err(SkipReason::AlreadyWrapped);
            }
            // Image values were never subject to `$(VAR)` expansion; in `args` they would be.
            let mut original: Vec<String> = image.entrypoint.iter().map(|s| escape(s)).collect();
            if args.is_empty() {
                original.extend(image.cmd.iter().map(|s| escape(s)));
            } else {
                original.extend_from_slice(args);
            }
            if original.is_empty() {
                return Err(SkipReason::EmptyCommand);
            }
            Ok(original)
        }
    }
}

/// Flags of Tekton's entrypoint that take no value (`cmd/entrypoint/main.go` at 74dcbc45dc8c
/// and later releases).
const TEKTON_BOOL_FLAGS: [&str; 7] = [
    "wait_file_content",
    "breakpoint_on_failure",
    "enable_spire",
    "run_always",
    "discard_error",
    "debug_before_step",
    "keep_pod_on_cancel",
];

/// Flags of Tekton's entrypoint that take a value, its credential helpers' among them
/// (`pkg/credentials/gitcreds`, `pkg/credentials/dockercreds`).
const TEKTON_VALUE_FLAGS: [&str; 20] = [
    "entrypoint",
    "wait_file",
    "post_file",
    "termination_path",
    "results",
    "step_results",
    "timeout",
    "stdout_path",
    "stderr_path",
    "on_error",
    "step_metadata_dir",
    "step_metadata_dir_link",
    "spire_socket_path",
    "result_from",
    "step_when_expressions",
    "basic-git",
    "ssh-git",
    "basic-docker",
    "docker-config",
    "docker-cfg",
];

/// Rewrites Tekton's entrypoint arguments `... -entrypoint X ... -- ARGS` to
/// `... -entrypoint /relay/lib/entrypoint ... -- -- X ARGS`, so Tekton's entrypoint (which does the
/// step ordering) runs ours as `/relay/lib/entrypoint -- X ARGS`, which runs `X ARGS`. Without
/// our own `--`, a step command such as `install DIR` or `-x` would be read as our entrypoint's
/// subcommand or option.
///
/// Tekton's entrypoint splits its arguments at the first `--` (`cmd/entrypoint/args.go`
/// `extractArgs`) and parses the part before it with Go's flag package, which accepts `-f v`,
/// `-f=v`, `--f v` and `--f=v` and stops at the first argument that is not a flag; the rest goes
/// to its subcommands. Tekton's pod builder writes only flags there, so anything else (a
/// non-flag, a flag this table does not know, a missing value) is left alone rather than guessed
/// at: the collector still captures such a step.
fn tekton_args(args: &[String]) -> Result<Vec<String>, SkipReason> {
    let separator = args.iter().position(|a| a == "--");
    let flags = &args[..separator.unwrap_or(args.len())];
    // (index of the argument holding the value, the value, whether it is the `-f=v` form)
    let mut found: Option<(usize, &str, bool)> = None;
    let mut i = 0;
    while let Some(arg) = flags.get(i) {
        let spec = arg
            .strip_prefix("--")
            .or_else(|| arg.strip_prefix('-'))
            .filter(|s| !s.is_empty() && !s.starts_with(['-', '=']))
            .ok_or(SkipReason::MalformedTektonArgs)?;
        let (name, inline) = match spec.split_once('=') {
            Some((name, value)) => (name, Some(value)),
            None => (spec, None),
        };
        if name == "stdout_path" || name == "stderr_path" {
            return Err(SkipReason::TektonOutputFile);
        }
        if TEKTON_BOOL_FLAGS.contains(&name) {
            i += 1;
            continue;
        }
        if !TEKTON_VALUE_FLAGS.contains(&name) {
            return Err(SkipReason::MalformedTektonArgs);
        }
        let at = if inline.is_some() { i } else { i + 1 };
        let value = match inline {
            Some(v) => v,
            None => flags
                .get(at)
                .ok_or(SkipReason::MalformedTektonArgs)?
                .as_str(),
        };
        if name == "entrypoint" && found.replace((at, value, inline.is_some())).is_some() {
            return Err(SkipReason::MalformedTektonArgs);
        }
        i = at + 1;
    }
    let (at, command, inline) = found.ok_or(SkipReason::NoTektonEntrypoint)?;
    if command == ENTRYPOINT_PATH {
        return Err(SkipReason::AlreadyWrapped);
    }
    let separator = separator.ok_or(SkipReason::MalformedTektonArgs)?;
    if command.is_empty() {
        return Err(SkipReason::MalformedTektonArgs);
    }
    let mut out = args.to_vec();
    out.splice(
        separator + 1..separator + 1,
        ["--".to_owned(), command.to_owned()],
    );
    out[at] = if inline {
        let dashes = &args[at][..args[at].len() - command.len()];
        format!("{dashes}{ENTRYPOINT_PATH}")
    } else {
        ENTRYPOINT_PATH.to_owned()
    };
    Ok(out)
}

/// Tekton's variable holding, for a step without `command`, the image's entrypoint per platform
/// (JSON `{"linux/amd64": ["/ko-app/x"], ...}`): its entrypoint, given no `-entrypoint`, runs
/// the command for its own platform followed by the step's arguments (tektoncd/pipeline
/// `pkg/pod/entrypoint_lookup.go` `resolveEntrypoints` and `cmd/entrypoint/main.go`, at
/// 955fcc5d8ec1 and 74dcbc45dc8c).
const TEKTON_PLATFORM_COMMANDS: &str = "TEKTON_PLATFORM_COMMANDS";

/// Tekton's variable of a step in hermetic mode; the value `1` drops the command's network.
const TEKTON_HERMETIC: &str = "TEKTON_HERMETIC";

/// The literal value of the container's [`TEKTON_PLATFORM_COMMANDS`].
fn platform_commands(c: &Container) -> Option<&str> {
    env_value(c, TEKTON_PLATFORM_COMMANDS)
}

/// The literal value of the container's variable `name`.
fn env_value<'a>(c: &'a Container, name: &str) -> Option<&'a str> {
    c.env
        .as_deref()?
        .iter()
        .find(|e| e.name == name)?
        .value
        .as_deref()
}

/// Puts our entrypoint and its `--` in front of every platform's command in
/// [`TEKTON_PLATFORM_COMMANDS`], so Tekton's entrypoint runs `/relay/lib/entrypoint -- CMD ARGS`.
fn wrap_platform_commands(c: &mut Container) -> Result<(), SkipReason> {
    let value = platform_commands(c).ok_or(SkipReason::NoTektonEntrypoint)?;
    let commands: BTreeMap<String, Vec<String>> =
        serde_json::from_str(value).map_err(|_| SkipReason::MalformedTektonArgs)?;
    if commands.is_empty() || commands.values().any(Vec::is_empty) {
        return Err(SkipReason::MalformedTektonArgs);
    }
    if commands
        .values()
        .any(|cmd| cmd.first().is_some_and(|c| c == ENTRYPOINT_PATH))
    {
        return Err(SkipReason::AlreadyWrapped);
    }
    let wrapped: BTreeMap<String, Vec<String>> = commands
        .into_iter()
        .map(|(platform, cmd)| {
            let cmd = [ENTRYPOINT_PATH.to_owned(), "--".to_owned()]
                .into_iter()
                .chain(cmd)
                .collect();
            (platform, cmd)
        })
        .collect();
    let json = serde_json::to_string(&wrapped).map_err(|_| SkipReason::MalformedTektonArgs)?;
    for e in c.env.iter_mut().flatten() {
        if e.name == TEKTON_PLATFORM_COMMANDS {
            e.value = Some(json.clone());
        }
    }
    Ok(())
}

fn tools_volume(injection: &Injection) -> Volume {
    Volume {
        name: TOOLS_VOLUME.to_owned(),
        persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
            claim_name: injection.claim_name.clone(),
            read_only: Some(true),
        }),
        ..Default::default()
    }
}

fn token_volume(injection: &Injection, token_file: &str) -> Volume {
    Volume {
        name: TOKEN_VOLUME.to_owned(),
        projected: Some(ProjectedVolumeSource {
            sources: Some(vec![VolumeProjection {
                service_account_token: Some(ServiceAccountTokenProjection {
                    audience: Some(injection.audience.clone()),
                    expiration_seconds: Some(TOKEN_EXPIRATION_SECONDS),
                    path: token_file.to_owned(),
                }),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn mount(name: &str, path: &str) -> VolumeMount {
    VolumeMount {
        name: name.to_owned(),
        mount_path: path.to_owned(),
        read_only: Some(true),
        ..Default::default()
    }
}

fn value(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: Some(value.to_owned()),
        ..Default::default()
    }
}

/// Replaces the element with `item`'s name, or appends it.
fn upsert<T>(list: &mut Vec<T>, item: T, name: impl Fn(&T) -> &String) {
    match list.iter().position(|x| name(x) == name(&item)) {
        Some(i) => list[i] = item,
        None => list.push(item),
    }
}

/// Escapes `$` so Kubernetes' `$(VAR)` expansion leaves the string as it is.
fn escape(s: &str) -> String {
    s.replace('$', "$$")
}

fn same_path(a: &str, b: &str) -> bool {
    a.trim_end_matches('/') == b.trim_end_matches('/')
}

/// Whether `path` is `dir` or below it.
fn under(path: &str, dir: &str) -> bool {
    let dir = dir.trim_end_matches('/');
    path.strip_prefix(dir)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::api::core::v1::PodSpec;
    use serde_json::json;

    use super::*;

    fn strings(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| (*s).to_owned()).collect()
    }

    fn container(name: &str, image: &str, command: &[&str], args: &[&str]) -> Container {
        let opt = |s: &[&str]| (!s.is_empty()).then(|| strings(s));
        Container {
            name: name.to_owned(),
            image: Some(image.to_owned()),
            command: opt(command),
            args: opt(args),
            ..Default::default()
        }
    }

    fn pod(label: Option<&str>, containers: Vec<Container>, init: Vec<Container>) -> Pod {
        let mut p = Pod {
            spec: Some(PodSpec {
                containers,
                init_containers: (!init.is_empty()).then_some(init),
                ..Default::default()
            }),
            ..Default::default()
        };
        p.metadata.name = Some("p".to_owned());
        p.metadata.labels = label.map(|l| BTreeMap::from([(l.to_owned(), "x".to_owned())]));
        p
    }

    fn injection() -> Injection {
        Injection::new("tools-v1", "http://metadata-api.relay:7000", "metadata-api")
    }

    /// Images the registry knows: `ENTRYPOINT` + `CMD`.
    fn resolve(c: &Container) -> Option<ImageCommand> {
        let (entrypoint, cmd): (&[&str], &[&str]) = match c.image.as_deref()? {
            "nginx" => (&["/docker-entrypoint.sh"], &["nginx", "-g", "daemon off;"]),
            "alpine" => (&[], &["/bin/sh"]),
            "dollar" => (&["/bin/echo"], &["$(HOME)"]),
            "scratch" => (&[], &[]),
            KNATIVE_USER_IMAGE => (&["docker-entrypoint.sh"], &["node", "server.js"]),
            // ko builds Knative's images with the binary as ENTRYPOINT and no CMD.
            KNATIVE_QUEUE_IMAGE => (&["/ko-app/queue"], &[]),
            _ => return None,
        };
        Some(ImageCommand {
            entrypoint: strings(entrypoint),
            cmd: strings(cmd),
        })
    }

    fn no_secrets(_: &str) -> Option<Vec<String>> {
        None
    }

    fn run(p: &Pod) -> Mutation {
        mutate(p, &injection(), &resolve, &no_secrets).unwrap()
    }

    fn find<'a>(p: &'a Pod, name: &str) -> &'a Container {
        let spec = p.spec.as_ref().unwrap();
        spec.containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .find(|c| c.name == name)
            .unwrap()
    }

    fn wrapped(args: &[&str]) -> (Option<Vec<String>>, Option<Vec<String>>) {
        let mut a = vec!["--"];
        a.extend_from_slice(args);
        (Some(strings(&[ENTRYPOINT_PATH])), Some(strings(&a)))
    }

    const TEKTON_FLAGS: [&str; 4] = [
        "-wait_file",
        "/tekton/downward/ready",
        "-post_file",
        "/tekton/run/0/out",
    ];

    /// Tekton's flags on the first step of a TaskRun with credentials and a timeout, an
    /// `onError` and results (see the case that uses them).
    const FIRST_STEP_FLAGS: [&str; 19] = [
        "-wait_file",
        "/tekton/downward/ready",
        "-wait_file_content",
        "-post_file",
        "/tekton/run/0/out",
        "-termination_path",
        "/tekton/termination",
        "-step_metadata_dir",
        "/tekton/steps/step-sleep",
        "-step_metadata_dir_link",
        "/tekton/steps/0",
        "-docker-cfg=pipeline-dockercfg-5hww7",
        "-ssh-git=my-ssh=github.com",
        "-timeout",
        "1m0s",
        "-on_error",
        "continue",
        "-results",
        "digest,url",
    ];

    /// The user container's image of [`knative_revision_pod`], as Knative resolves tags to digests.
    const KNATIVE_USER_IMAGE: &str = "registry.example/relay/hook@sha256:5f0e2a9c7b3d4e1f8a6b2c9d0e7f1a3b4c5d6e7f8a9b0c1d2e3f4a5b6c7d8e9f";
    /// The `queue-sidecar-image` of Knative's `config-deployment`.
    const KNATIVE_QUEUE_IMAGE: &str = "gcr.io/knative-releases/knative.dev/serving/cmd/queue@sha256:0d1e2f3a4b5c6d7e8f9a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e";

    /// A revision pod as Knative Serving's revision reconciler builds it (knative/serving
    /// pkg/reconciler/revision/resources/deploy.go and queue.go (83bc270a5be2e5a4125302a064e0cded3e180598),
    /// labels from meta.go `makeLabels` and configuration/resources/revision.go, the default
    /// readiness probe from apis/serving/v1/revision_defaults.go `applyProbes`), with the stock
    /// config maps (no /var/log collection, dataplane trust disabled, no profiling) and the
    /// metadata the ReplicaSet controller gives its pods. The revision's template, as a trigger's
    /// Knative Service has it: an image and no `command` (Knative leaves it unset, so the image's
    /// ENTRYPOINT runs), two variables one of them from a Secret, an HTTP liveness probe, a
    /// hardened securityContext, and the labels naming the trigger.
    ///
    /// What Knative emits, not what the API server adds before webhooks run (defaults such as
    /// `imagePullPolicy`, `protocol` or probe timings, the ServiceAccount token volume); the pod
    /// has no `name` yet, only `generateName`.
    fn knative_revision_pod() -> serde_json::Value {
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "generateName": "hook-00001-deployment-7d9f8c6b5-",
                "namespace": "tenant-a",
                "labels": {
                    // The template's own (the trigger's), then Knative's, then the ReplicaSet's.
                    "relay.sh/workflow": "wf",
                    "relay.sh/trigger-sync-id": "sync-1",
                    "serving.knative.dev/configuration": "hook",
                    "serving.knative.dev/configurationGeneration": "1",
                    "serving.knative.dev/service": "hook",
                    "serving.knative.dev/revision": "hook-00001",
                    "serving.knative.dev/revisionUID": "6a1f0c3e-4b7d-4c2e-9a51-2f8d3b7e9c10",
                    "app": "hook-00001",
                    "pod-template-hash": "7d9f8c6b5",
                },
                "annotations": {
                    "serving.knative.dev/creator": "system:serviceaccount:relay-system:relay-operator",
                },
                "ownerReferences": [{
                    "apiVersion": "apps/v1",
                    "kind": "ReplicaSet",
                    "name": "hook-00001-deployment-7d9f8c6b5",
                    "uid": "0b8e4f2a-1c3d-4e5f-8a9b-7c6d5e4f3a2b",
                    "controller": true,
                    "blockOwnerDeletion": true,
                }],
            },
            "spec": {
                "containers": [
                    {
                        // makeServingContainer: the one port, renamed; PORT then K_* appended;
                        // the TCP readiness probe dropped (queue-proxy runs it); the liveness
                        // probe pointed at the user port with the K-Kubelet-Probe header;
                        // makeContainer: the preStop hook on queue-proxy's admin port.
                        "name": "user-container",
                        "image": KNATIVE_USER_IMAGE,
                        "ports": [{"name": "user-port", "containerPort": 8080}],
                        "env": [
                            {"name": "LOG_LEVEL", "value": "info"},
                            {"name": "WEBHOOK_SECRET", "valueFrom": {"secretKeyRef": {"name": "hook-secret", "key": "token"}}},
                            {"name": "PORT", "value": "8080"},
                            {"name": "K_REVISION", "value": "hook-00001"},
                            {"name": "K_CONFIGURATION", "value": "hook"},
                            {"name": "K_SERVICE", "value": "hook"},
                        ],
                        "resources": {},
                        "livenessProbe": {
                            "httpGet": {
                                "path": "/healthz",
                                "port": 8080,
                                "httpHeaders": [{"name": "K-Kubelet-Probe", "value": "queue"}],
                            },
                            "periodSeconds": 10,
                        },
                        "lifecycle": {"preStop": {"httpGet": {"path": "/wait-for-drain", "port": 8022}}},
                        "terminationMessagePolicy": "FallbackToLogsOnError",
                        "securityContext": {
                            "allowPrivilegeEscalation": false,
                            "capabilities": {"drop": ["ALL"]},
                            "readOnlyRootFilesystem": true,
                            "runAsNonRoot": true,
                        },
                    },
                    {
                        // makeQueueContainer: no command (the image's /ko-app/queue runs).
                        "name": "queue-proxy",
                        "image": KNATIVE_QUEUE_IMAGE,
                        "ports": [
                            {"name": "http-queueadm", "containerPort": 8022},
                            {"name": "http-autometric", "containerPort": 9090},
                            {"name": "http-usermetric", "containerPort": 9091},
                            {"name": "queue-port", "containerPort": 8012},
                            {"name": "https-port", "containerPort": 8112},
                        ],
                        "env": [
                            {"name": "SERVING_NAMESPACE", "value": "tenant-a"},
                            {"name": "SERVING_SERVICE", "value": "hook"},
                            {"name": "SERVING_CONFIGURATION", "value": "hook"},
                            {"name": "SERVING_REVISION", "value": "hook-00001"},
                            {"name": "QUEUE_SERVING_PORT", "value": "8012"},
                            {"name": "QUEUE_SERVING_TLS_PORT", "value": "8112"},
                            {"name": "CONTAINER_CONCURRENCY", "value": "0"},
                            {"name": "REVISION_TIMEOUT_SECONDS", "value": "300"},
                            {"name": "REVISION_RESPONSE_START_TIMEOUT_SECONDS", "value": "0"},
                            {"name": "REVISION_IDLE_TIMEOUT_SECONDS", "value": "0"},
                            {"name": "SERVING_POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                            {"name": "SERVING_POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                            {"name": "TRUST_CONFIG", "value": "disabled"},
                            {"name": "SERVING_LOGGING_CONFIG", "value": r#"{"level": "info", "development": false, "outputPaths": ["stdout"], "errorOutputPaths": ["stderr"], "encoding": "json", "encoderConfig": {"timeKey": "timestamp", "levelKey": "severity", "nameKey": "logger", "callerKey": "caller", "messageKey": "message", "stacktraceKey": "stacktrace", "timeEncoder": "iso8601"}}"#},
                            // Empty values are omitted, as Go's JSON of the container omits them.
                            {"name": "SERVING_LOGGING_LEVEL"},
                            {"name": "SERVING_REQUEST_LOG_TEMPLATE"},
                            {"name": "SERVING_ENABLE_REQUEST_LOG", "value": "false"},
                            {"name": "SERVING_REQUEST_METRICS_BACKEND", "value": "prometheus"},
                            {"name": "SERVING_REQUEST_METRICS_REPORTING_PERIOD_SECONDS", "value": "5"},
                            {"name": "TRACING_CONFIG_BACKEND", "value": "none"},
                            {"name": "TRACING_CONFIG_ZIPKIN_ENDPOINT"},
                            {"name": "TRACING_CONFIG_DEBUG", "value": "false"},
                            {"name": "TRACING_CONFIG_SAMPLE_RATE", "value": "0.1"},
                            {"name": "USER_PORT", "value": "8080"},
                            {"name": "SYSTEM_NAMESPACE", "value": "knative-serving"},
                            {"name": "METRICS_DOMAIN", "value": "knative.dev/internal/serving"},
                            {"name": "SERVING_READINESS_PROBE", "value": r#"{"tcpSocket":{"port":8080,"host":"127.0.0.1"},"successThreshold":1}"#},
                            {"name": "ENABLE_PROFILING", "value": "false"},
                            {"name": "SERVING_ENABLE_PROBE_REQUEST_LOG", "value": "false"},
                            {"name": "METRICS_COLLECTOR_ADDRESS"},
                            {"name": "HOST_IP", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "status.hostIP"}}},
                            {"name": "ENABLE_HTTP2_AUTO_DETECTION", "value": "false"},
                            {"name": "ROOT_CA"},
                        ],
                        "resources": {"requests": {"cpu": "25m"}},
                        "readinessProbe": {
                            "httpGet": {
                                "port": 8012,
                                "httpHeaders": [{"name": "K-Network-Probe", "value": "queue"}],
                            },
                            "successThreshold": 1,
                        },
                        "securityContext": {
                            "allowPrivilegeEscalation": false,
                            "capabilities": {"drop": ["ALL"]},
                            "readOnlyRootFilesystem": true,
                            "runAsNonRoot": true,
                        },
                    },
                ],
                // BuildPodSpec: the revision's timeout; config-defaults' enable-service-links.
                "enableServiceLinks": false,
                "terminationGracePeriodSeconds": 300,
            },
        })
    }

    /// The queue-proxy container of [`knative_revision_pod`].
    fn knative_queue_proxy() -> Container {
        serde_json::from_value(knative_revision_pod()["spec"]["containers"][1].clone()).unwrap()
    }

    #[test]
    fn commands_are_wrapped_following_kubernetes_rules() {
        struct Case {
            what: &'static str,
            label: Option<&'static str>,
            container: Container,
            want: Result<(Vec<&'static str>, Vec<&'static str>), SkipReason>,
        }
        let c = container;
        let tekton = |args: &[&str]| {
            let mut a = TEKTON_FLAGS.to_vec();
            a.extend_from_slice(args);
            c("step-build", "alpine", &["/tekton/bin/entrypoint"], &a)
        };
        let t = |args: &[&'static str]| {
            let mut a = TEKTON_FLAGS.to_vec();
            a.extend_from_slice(args);
            (vec!["/tekton/bin/entrypoint"], a)
        };
        let w = |args: &[&'static str]| {
            let mut a = vec!["--"];
            a.extend_from_slice(args);
            (vec![ENTRYPOINT_PATH], a)
        };
        let cases = [
            Case {
                what: "command and args",
                label: None,
                container: c("app", "nginx", &["/bin/sh", "-c"], &["echo hi"]),
                want: Ok(w(&["/bin/sh", "-c", "echo hi"])),
            },
            Case {
                what: "command only: the image CMD is dropped",
                label: None,
                container: c("app", "nginx", &["/bin/date"], &[]),
                want: Ok(w(&["/bin/date"])),
            },
            Case {
                what: "args only: image ENTRYPOINT, args replace CMD",
                label: None,
                container: c("app", "nginx", &[], &["nginx", "-T"]),
                want: Ok(w(&["/docker-entrypoint.sh", "nginx", "-T"])),
            },
            Case {
                what: "neither: ENTRYPOINT + CMD",
                label: None,
                container: c("app", "nginx", &[], &[]),
                want: Ok(w(&["/docker-entrypoint.sh", "nginx", "-g", "daemon off;"])),
            },
            Case {
                what: "CMD only",
                label: None,
                container: c("app", "alpine", &[], &[]),
                want: Ok(w(&["/bin/sh"])),
            },
            Case {
                what: "image values are escaped against $(VAR) expansion",
                label: None,
                container: c("app", "dollar", &[], &[]),
                want: Ok(w(&["/bin/echo", "$$(HOME)"])),
            },
            Case {
                what: "args stay subject to $(VAR) expansion",
                label: None,
                container: c("app", "dollar", &[], &["$(HOME)"]),
                want: Ok(w(&["/bin/echo", "$(HOME)"])),
            },
            Case {
                what: "unresolvable image",
                label: None,
                container: c("app", "private/unknown", &[], &["x"]),
                want: Err(SkipReason::UnresolvedImage),
            },
            Case {
                what: "image without ENTRYPOINT or CMD",
                label: None,
                container: c("app", "scratch", &[], &[]),
                want: Err(SkipReason::EmptyCommand),
            },
            Case {
                what: "already wrapped",
                label: None,
                container: c("app", "nginx", &[ENTRYPOINT_PATH], &["--", "x"]),
                want: Err(SkipReason::AlreadyWrapped),
            },
            Case {
                what: "Tekton -entrypoint X --",
                label: Some(TEKTON_TASK_RUN_LABEL),
                container: tekton(&["-entrypoint", "/bin/sh", "--", "-c", "echo hi"]),
                want: Ok(t(&[
                    "-entrypoint",
                    ENTRYPOINT_PATH,
                    "--",
                    "--",
                    "/bin/sh",
                    "-c",
                    "echo hi",
                ])),
            },
            Case {
                what: "Tekton -entrypoint=X",
                label: Some(TEKTON_TASK_RUN_LABEL),
                container: tekton(&["-entrypoint=/ko-app/x", "--", "a"]),
                want: Ok(t(&[
                    "-entrypoint=/relay/lib/entrypoint",
                    "--",
                    "--",
                    "/ko-app/x",
                    "a",
                ])),
            },
            Case {
                what: "Tekton --entrypoint X with no args after --",
                label: Some(TEKTON_TASK_RUN_LABEL),
                container: tekton(&["--entrypoint", "/bin/true", "--"]),
                want: Ok(t(&[
                    "--entrypoint",
                    ENTRYPOINT_PATH,
                    "--",
                    "--",
                    "/bin/true",
                ])),
            },
            Case {
                // Without our `--`, Tekton started `/relay/lib/entrypoint install DIR`: our
                // entrypoint's own install subcommand (the admission_review fuzz target's model
                // of Tekton and our entrypoint checks this for every Tekton step it wraps).
                what: "Tekton step whose command is `install DIR`",
                label: Some(TEKTON_TASK_RUN_LABEL),
                container: tekton(&["-entrypoint", "install", "--", "/workspace/bin"]),
                want: Ok(t(&[
                    "-entrypoint",
                    ENTRYPOINT_PATH,
                    "--",
                    "--",
                    "install",
                    "/workspace/bin",
                ])),
            },
            Case {
                what: "Tekton step whose command starts with a dash",
                label: Some(TEKTON_TASK_RUN_LABEL),
                container: tekton(&["-entrypoint=-x", "--", "y"]),
                want: Ok(t(&[
                    "-entrypoint=/relay/lib/entrypoint",
                    "--",
                    "--",
                    "-x",
                    "y",
                ])),
            },
            Case {
                what: "Tekton: -entrypoint after -- is an argument, not the flag",
                label: Some(TEKTON_TASK_RUN_LABEL),
                container: tekton(&["--", "-entrypoint", "x"]),
                want: Err(SkipReason::NoTektonEntrypoint),
            },
            Case {
                what: "Tekton sidecar without -entrypoint",
                label: Some(TEKTON_TASK_RUN_LABEL),
                container: c("sidecar-x", "nginx", &["/bin/sh"], &[]),
                want: Err(SkipReason::NoTektonEntrypoint),
            },
            Case {
                what: "Tekton -entrypoint without a value",
                label: Some(TEKTON_TASK_RUN_LABEL),
                container: tekton(&["-entrypoint"]),
                want: Err(SkipReason::MalformedTektonArgs),
            },
            Case {
                what: "Tekton -entrypoint directly before --",
                label: Some(TEKTON_TASK_RUN_LABEL),
                container: tekton(&["-entrypoint", "--", "x"]),
                want: Err(SkipReason::MalformedTektonArgs),
            },
            Case {
                // The first step of a TaskRun with credentials, as tektoncd/pipeline builds it
                // (pkg/pod/entrypoint.go `orderContainers` at 00f7cc6f2119, credential flags from
                // pkg/credentials/dockercreds and gitcreds).
                what: "Tekton first step with metadata link and credential flags",
                label: Some(TEKTON_TASK_RUN_LABEL),
                container: tekton(
                    &[
                        FIRST_STEP_FLAGS.as_slice(),
                        &["-entrypoint", "sleep", "--", "3600"],
                    ]
                    .concat(),
                ),
                want: Ok(t(&[
                    FIRST_STEP_FLAGS.as_slice(),
                    &["-entrypoint", ENTRYPOINT_PATH, "--", "--", "sleep", "3600"],
                ]
                .concat())),
            },
            Case {
                // Go's flag parsing stops at `x`: Tekton's entrypoint hands `x -entrypoint b` to
                // its subcommands and its `-entrypoint` is `a`, not `b`.
                what: "Tekton non-flag before --",
                label: Some(TEKTON_TASK_RUN_LABEL),
                container: tekton(&["-entrypoint", "a", "x", "-entrypoint", "b", "--"]),
                want: Err(SkipReason::MalformedTektonArgs),
            },
            Case {
                what: "Tekton value flag whose value looks like -entrypoint",
                label: Some(TEKTON_TASK_RUN_LABEL),
                container: tekton(&["-post_file", "-entrypoint", "/bin/sh", "--"]),
                want: Err(SkipReason::MalformedTektonArgs),
            },
            Case {
                what: "Tekton flag unknown to us",
                label: Some(TEKTON_TASK_RUN_LABEL),
                container: tekton(&["-new_flag", "v", "-entrypoint", "/bin/sh", "--"]),
                want: Err(SkipReason::MalformedTektonArgs),
            },
            Case {
                what: "Tekton bool flag before -entrypoint",
                label: Some(TEKTON_TASK_RUN_LABEL),
                container: tekton(&["-breakpoint_on_failure", "-entrypoint", "/bin/sh", "--"]),
                want: Ok(t(&[
                    "-breakpoint_on_failure",
                    "-entrypoint",
                    ENTRYPOINT_PATH,
                    "--",
                    "--",
                    "/bin/sh",
                ])),
            },
            Case {
                what: "Tekton -entrypoint given twice",
                label: Some(TEKTON_TASK_RUN_LABEL),
                container: tekton(&["-entrypoint", "a", "-entrypoint=b", "--"]),
                want: Err(SkipReason::MalformedTektonArgs),
            },
            Case {
                what: "Tekton without --",
                label: Some(TEKTON_TASK_RUN_LABEL),
                container: tekton(&["-entrypoint", "/bin/sh"]),
                want: Err(SkipReason::MalformedTektonArgs),
            },
            Case {
                what: "Tekton already wrapped",
                label: Some(TEKTON_TASK_RUN_LABEL),
                container: tekton(&["-entrypoint", ENTRYPOINT_PATH, "--", "/bin/sh"]),
                want: Err(SkipReason::AlreadyWrapped),
            },
            Case {
                // tektoncd/pipeline cmd/entrypoint/runner.go (c54cbbb14d18): with -stdout_path
                // the child's stdout goes to os.Stdout and the file, and results are read from it.
                what: "Tekton step with stdoutConfig",
                label: Some(TEKTON_TASK_RUN_LABEL),
                container: tekton(&[
                    "-stdout_path",
                    "/tekton/steps/step-build/out",
                    "-entrypoint",
                    "/bin/sh",
                    "--",
                    "-c",
                    "echo hi",
                ]),
                want: Err(SkipReason::TektonOutputFile),
            },
            Case {
                what: "Tekton step with stderrConfig, -f=v form",
                label: Some(TEKTON_TASK_RUN_LABEL),
                container: tekton(&["--stderr_path=/x/err", "-entrypoint", "/bin/true", "--"]),
                want: Err(SkipReason::TektonOutputFile),
            },
            Case {
                what: "Knative user-container",
                label: Some(KNATIVE_REVISION_LABEL),
                container: c("user-container", "nginx", &[], &[]),
                want: Ok(w(&["/docker-entrypoint.sh", "nginx", "-g", "daemon off;"])),
            },
            Case {
                what: "Knative queue-proxy",
                label: Some(KNATIVE_REVISION_LABEL),
                container: knative_queue_proxy(),
                want: Err(SkipReason::NotUserContainer),
            },
        ];
        for case in cases {
            let before = pod(case.label, vec![case.container.clone()], vec![]);
            let m = run(&before);
            let after = find(&m.pod, &case.container.name);
            match case.want {
                Ok((command, args)) => {
                    assert!(m.skipped.is_empty(), "{}: {:?}", case.what, m.skipped);
                    assert_eq!(after.command, Some(strings(&command)), "{}", case.what);
                    assert_eq!(after.args, Some(strings(&args)), "{}", case.what);
                }
                Err(reason) => {
                    let want = vec![Skipped {
                        container: case.container.name.clone(),
                        reason,
                    }];
                    assert_eq!(m.skipped, want, "{}", case.what);
                    assert_eq!(
                        m.pod, before,
                        "{}: a pod with nothing wrapped is unchanged",
                        case.what
                    );
                    assert!(m.patch.0.is_empty(), "{}", case.what);
                }
            }
        }
    }

    /// A step without `command` as Tekton's controller builds it: no `-entrypoint`, the image's
    /// entrypoint per platform in TEKTON_PLATFORM_COMMANDS (tektoncd/pipeline
    /// `pkg/pod/entrypoint_lookup.go` at 955fcc5d8ec1 appends it as JSON of platform to command;
    /// the value is one a real TaskRun pod carried for a cosign step).
    #[test]
    fn a_tekton_step_without_command_is_wrapped_through_its_platform_commands() {
        let mut step = container(
            "step-sign",
            "gcr.io/projectsigstore/cosign@sha256:0000",
            &["/tekton/bin/entrypoint"],
            &[TEKTON_FLAGS.as_slice(), &["--", "sign", "--key", "k"]].concat(),
        );
        let commands = r#"{"linux/amd64":["/ko-app/cosign"],"linux/arm64":["/ko-app/cosign"]}"#;
        step.env = Some(vec![value(TEKTON_PLATFORM_COMMANDS, commands)]);
        let before = pod(Some(TEKTON_TASK_RUN_LABEL), vec![step.clone()], vec![]);
        let m = run(&before);
        assert!(m.skipped.is_empty(), "{:?}", m.skipped);
        let after = find(&m.pod, "step-sign");
        // Tekton's own command and arguments are untouched...
        assert_eq!(after.command, step.command);
        assert_eq!(after.args, step.args);
        // ...and every platform's command now starts with ours and its `--`.
        let got: BTreeMap<String, Vec<String>> =
            serde_json::from_str(platform_commands(after).unwrap()).unwrap();
        let wrapped = strings(&[ENTRYPOINT_PATH, "--", "/ko-app/cosign"]);
        assert_eq!(
            got,
            BTreeMap::from([
                ("linux/amd64".to_owned(), wrapped.clone()),
                ("linux/arm64".to_owned(), wrapped),
            ])
        );
        // Mutating the result again wraps nothing twice.
        let mut again = m.pod.clone();
        again.metadata.annotations = None;
        let m2 = run(&again);
        assert_eq!(
            m2.skipped,
            vec![Skipped {
                container: "step-sign".to_owned(),
                reason: SkipReason::AlreadyWrapped,
            }]
        );
        // A sidecar of the same pod has neither, and is left to the collector.
        let sidecar = container("sidecar-proxy", "envoy", &["/usr/local/bin/envoy"], &[]);
        let m3 = run(&pod(Some(TEKTON_TASK_RUN_LABEL), vec![sidecar], vec![]));
        assert_eq!(m3.skipped[0].reason, SkipReason::NoTektonEntrypoint);
        // A value that is not the JSON Tekton writes is not guessed at.
        let mut broken = step;
        broken.env = Some(vec![value(TEKTON_PLATFORM_COMMANDS, "linux/amd64=/x")]);
        let m4 = run(&pod(Some(TEKTON_TASK_RUN_LABEL), vec![broken], vec![]));
        assert_eq!(m4.skipped[0].reason, SkipReason::MalformedTektonArgs);
    }

    #[test]
    fn tekton_hermetic_steps_are_left_to_the_collector() {
        // tektoncd/pipeline pkg/pod/pod.go sets TEKTON_HERMETIC=1 on every step of a TaskRun
        // in hermetic execution mode; its entrypoint then starts the command without a network.
        let mut step = container(
            "step-build",
            "golang",
            &["/tekton/bin/entrypoint"],
            &[
                TEKTON_FLAGS.as_slice(),
                &["-entrypoint", "go", "--", "build"],
            ]
            .concat(),
        );
        step.env = Some(vec![value("TEKTON_HERMETIC", "1")]);
        let m = run(&pod(
            Some(TEKTON_TASK_RUN_LABEL),
            vec![step.clone()],
            vec![],
        ));
        assert_eq!(m.skipped[0].reason, SkipReason::TektonHermetic);
        assert!(m.patch.0.is_empty(), "{:?}", m.patch);
        // Any other value keeps the network, and the step is wrapped.
        step.env = Some(vec![value("TEKTON_HERMETIC", "0")]);
        let m = run(&pod(Some(TEKTON_TASK_RUN_LABEL), vec![step], vec![]));
        assert!(m.skipped.is_empty(), "{:?}", m.skipped);
    }

    #[test]
    fn plain_pods_wrap_every_container_but_no_init_container() {
        let p = pod(
            None,
            vec![
                container("a", "nginx", &[], &[]),
                container("b", "alpine", &["/bin/true"], &[]),
            ],
            vec![container("init", "alpine", &["/bin/setup"], &[])],
        );
        let m = run(&p);
        assert!(m.skipped.is_empty());
        assert_eq!(find(&m.pod, "init"), find(&p, "init"));
        for name in ["a", "b"] {
            assert_eq!(
                find(&m.pod, name).command,
                Some(strings(&[ENTRYPOINT_PATH]))
            );
        }
    }

    #[test]
    fn tekton_init_containers_and_knative_queue_proxy_are_untouched() {
        let init = container(
            "prepare",
            "tekton/entrypoint",
            &["/ko-app/entrypoint", "init"],
            &[],
        );
        let mut args = TEKTON_FLAGS.to_vec();
        args.extend(["-entrypoint", "/bin/sh", "--", "-c", "make"]);
        let step = container("step-build", "alpine", &["/tekton/bin/entrypoint"], &args);
        let p = pod(Some(TEKTON_TASK_RUN_LABEL), vec![step], vec![init.clone()]);
        let m = run(&p);
        assert_eq!(find(&m.pod, "prepare"), &init);
        assert_eq!(
            find(&m.pod, "step-build").command,
            Some(strings(&["/tekton/bin/entrypoint"]))
        );

        let queue = knative_queue_proxy();
        let user = container("user-container", "nginx", &["/app"], &[]);
        let p = pod(
            Some(KNATIVE_REVISION_LABEL),
            vec![user, queue.clone()],
            vec![],
        );
        let m = run(&p);
        assert_eq!(find(&m.pod, "queue-proxy"), &queue);
        assert_eq!(
            m.skipped,
            vec![Skipped {
                container: "queue-proxy".to_owned(),
                reason: SkipReason::NotUserContainer
            }]
        );
        let user = find(&m.pod, "user-container");
        assert_eq!(
            (user.command.clone(), user.args.clone()),
            wrapped(&["/app"])
        );
    }

    /// The revision pod as Knative builds it: `user-container` runs the image's ENTRYPOINT and CMD
    /// under ours, and the rest of the pod, queue-proxy included, stays as Knative made it.
    #[test]
    fn a_knative_revision_pod_as_knative_builds_it() {
        let before = knative_revision_pod();
        let pod: Pod = serde_json::from_value(before.clone()).unwrap();
        // The fixture survives the typed round trip, so the comparisons below are byte for byte.
        assert_eq!(serde_json::to_value(&pod).unwrap(), before);

        let asked = std::cell::RefCell::new(Vec::new());
        let record = |c: &Container| {
            asked.borrow_mut().push(c.name.clone());
            resolve(c)
        };
        let m = mutate(&pod, &injection(), &record, &secret_keys).unwrap();
        // The image is looked up for user-container only (the webhook looks up exactly what
        // `mutate` asks for): queue-proxy has no `command` either, but is never wrapped.
        assert_eq!(*asked.borrow(), strings(&["user-container"]));
        assert_eq!(
            m.skipped,
            vec![Skipped {
                container: "queue-proxy".to_owned(),
                reason: SkipReason::NotUserContainer,
            }]
        );

        let user = find(&m.pod, "user-container");
        assert_eq!(
            (user.command.clone(), user.args.clone()),
            wrapped(&["docker-entrypoint.sh", "node", "server.js"])
        );
        assert_eq!(find(&m.pod, "queue-proxy"), &knative_queue_proxy());

        // Everything else as Knative made it: the whole pod is the original plus our additions.
        let mut want = before.clone();
        want["metadata"]["annotations"][INJECTED_ANNOTATION] = json!("true");
        want["spec"]["volumes"] = json!([
            {"name": "relay-tools", "persistentVolumeClaim": {"claimName": "tools-v1", "readOnly": true}},
            {"name": "relay-token", "projected": {"sources": [{"serviceAccountToken": {
                "audience": "metadata-api", "expirationSeconds": 3600, "path": "token"}}]}},
        ]);
        let c = &mut want["spec"]["containers"][0];
        c["command"] = json!([ENTRYPOINT_PATH]);
        c["args"] = json!(["--", "docker-entrypoint.sh", "node", "server.js"]);
        c["volumeMounts"] = json!([
            {"name": "relay-tools", "mountPath": "/relay", "readOnly": true},
            {"name": "relay-token", "mountPath": "/var/run/secrets/relay", "readOnly": true},
        ]);
        c["env"].as_array_mut().unwrap().extend([
            json!({"name": "RELAY_REDACT_ENV", "value": "WEBHOOK_SECRET"}),
            json!({"name": "RELAY_METADATA_API_URL", "value": "http://metadata-api.relay:7000"}),
            json!({"name": "RELAY_METADATA_API_TOKEN_FILE", "value": "/var/run/secrets/relay/token"}),
            json!({"name": "RELAY_POD_UID", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.uid"}}}),
            json!({"name": "RELAY_STDOUT_STREAM", "value": "user-container.$(RELAY_POD_UID).stdout"}),
            json!({"name": "RELAY_STDERR_STREAM", "value": "user-container.$(RELAY_POD_UID).stderr"}),
        ]);
        let got = serde_json::to_value(&m.pod).unwrap();
        assert_eq!(got, want);
        // Spelled out: the user container's ports, probes, lifecycle, securityContext (a read-only
        // root filesystem: ours are volume mounts) and Knative's variables, in their order.
        for field in [
            "ports",
            "livenessProbe",
            "lifecycle",
            "securityContext",
            "terminationMessagePolicy",
            "resources",
            "image",
        ] {
            let (was, is) = (
                &before["spec"]["containers"][0][field],
                &got["spec"]["containers"][0][field],
            );
            assert_eq!(is, was, "{field}");
        }
        assert_eq!(got["spec"]["containers"][0]["readinessProbe"], json!(null));
        let env = got["spec"]["containers"][0]["env"].as_array().unwrap();
        assert_eq!(
            env[..6],
            before["spec"]["containers"][0]["env"].as_array().unwrap()[..]
        );
        // The labels the product names the trigger's streams and context by are all there.
        assert_eq!(got["metadata"]["labels"], before["metadata"]["labels"]);
        for label in [
            KNATIVE_REVISION_LABEL,
            "relay.sh/workflow",
            "relay.sh/trigger-sync-id",
        ] {
            assert!(m.pod.metadata.labels.as_ref().unwrap().contains_key(label));
        }

        // The patch touches nothing of queue-proxy, and gives the mutated pod.
        let ops = serde_json::to_value(&m.patch).unwrap();
        for op in ops.as_array().unwrap() {
            let path = op["path"].as_str().unwrap();
            assert!(!path.starts_with("/spec/containers/1"), "{op}");
        }
        let mut doc = before;
        json_patch::patch(&mut doc, &m.patch).unwrap();
        assert_eq!(doc, got);
        // And a second admission (a retried request) changes nothing.
        let again = mutate(&m.pod, &injection(), &resolve, &secret_keys).unwrap();
        assert!(again.patch.0.is_empty());
    }

    #[test]
    fn volumes_mounts_env_and_annotation_are_added() {
        let m = run(&pod(
            None,
            vec![container("app", "x", &["/app"], &[])],
            vec![],
        ));
        let spec = serde_json::to_value(m.pod.spec.as_ref().unwrap()).unwrap();
        assert_eq!(
            spec["volumes"],
            json!([
                {"name": "relay-tools", "persistentVolumeClaim": {"claimName": "tools-v1", "readOnly": true}},
                {"name": "relay-token", "projected": {"sources": [{"serviceAccountToken": {
                    "audience": "metadata-api", "expirationSeconds": 3600, "path": "token"}}]}},
            ])
        );
        let c = &spec["containers"][0];
        assert_eq!(
            c["volumeMounts"],
            json!([
                {"name": "relay-tools", "mountPath": "/relay", "readOnly": true},
                {"name": "relay-token", "mountPath": "/var/run/secrets/relay", "readOnly": true},
            ])
        );
        assert_eq!(
            c["env"],
            json!([
                {"name": "RELAY_METADATA_API_URL", "value": "http://metadata-api.relay:7000"},
                {"name": "RELAY_METADATA_API_TOKEN_FILE", "value": "/var/run/secrets/relay/token"},
                {"name": "RELAY_STDOUT_STREAM", "value": "app.stdout"},
                {"name": "RELAY_STDERR_STREAM", "value": "app.stderr"},
            ])
        );
        let annotations = m.pod.metadata.annotations.unwrap();
        assert_eq!(annotations[INJECTED_ANNOTATION], "true");
    }

    #[test]
    fn knative_streams_carry_the_pod_uid_filled_in_by_the_kubelet() {
        let p = pod(
            Some(KNATIVE_REVISION_LABEL),
            vec![container("user-container", "x", &["/app"], &[])],
            vec![],
        );
        let m = run(&p);
        let env = serde_json::to_value(&find(&m.pod, "user-container").env).unwrap();
        assert_eq!(
            env[2],
            json!({"name": "RELAY_POD_UID", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.uid"}}})
        );
        assert_eq!(env[3]["value"], "user-container.$(RELAY_POD_UID).stdout");
        assert_eq!(env[4]["value"], "user-container.$(RELAY_POD_UID).stderr");
    }

    #[test]
    fn already_injected_pod_is_unchanged() {
        let once = run(&pod(
            None,
            vec![container("app", "x", &["/app"], &[])],
            vec![],
        ));
        let twice = run(&once.pod);
        assert_eq!(twice.pod, once.pod);
        assert!(twice.patch.0.is_empty());
        assert!(twice.skipped.is_empty());
    }

    #[test]
    fn volumes_mounts_and_env_are_not_duplicated() {
        // A pod copied from an injected one, without the annotation: ours are replaced in place.
        let once = run(&pod(
            None,
            vec![container("app", "x", &["/app"], &[])],
            vec![],
        ));
        let mut copy = once.pod.clone();
        copy.metadata.annotations = None;
        let c = &mut copy.spec.as_mut().unwrap().containers[0];
        (c.command, c.args) = (Some(strings(&["/app"])), None);
        c.env.as_mut().unwrap().insert(
            0,
            EnvVar {
                name: ENV_STDOUT_STREAM.to_owned(),
                value: Some("stale".to_owned()),
                ..Default::default()
            },
        );
        let again = run(&copy);
        assert_eq!(again.pod, once.pod);
    }

    #[test]
    fn a_foreign_volume_at_our_mount_path_skips_the_container() {
        let mut c = container("app", "x", &["/app"], &[]);
        c.volume_mounts = Some(vec![VolumeMount {
            name: "mine".to_owned(),
            mount_path: "/relay/".to_owned(),
            ..Default::default()
        }]);
        let m = run(&pod(None, vec![c], vec![]));
        assert_eq!(m.skipped[0].reason, SkipReason::MountPathTaken);
        assert!(m.patch.0.is_empty());
    }

    #[test]
    fn the_patch_applied_to_the_original_gives_the_mutated_pod() {
        let mut args = TEKTON_FLAGS.to_vec();
        args.extend(["-entrypoint=/bin/sh", "--", "-c", "make"]);
        let mut with_existing = container("app", "nginx", &[], &["-T"]);
        with_existing.env = Some(vec![EnvVar {
            name: "KEEP".to_owned(),
            value: Some("1".to_owned()),
            ..Default::default()
        }]);
        let mut annotated = pod(None, vec![with_existing.clone()], vec![]);
        annotated.metadata.annotations = Some(BTreeMap::from([("a/b".to_owned(), "c".to_owned())]));
        annotated.spec.as_mut().unwrap().volumes = Some(vec![Volume {
            name: "data".to_owned(),
            ..Default::default()
        }]);
        let pods = [
            pod(
                None,
                vec![with_existing, container("b", "alpine", &[], &[])],
                vec![],
            ),
            annotated,
            pod(
                Some(TEKTON_TASK_RUN_LABEL),
                vec![container("step-a", "x", &["/tekton/bin/entrypoint"], &args)],
                vec![container("prepare", "x", &["/init"], &[])],
            ),
            pod(
                Some(KNATIVE_REVISION_LABEL),
                vec![
                    container("user-container", "nginx", &[], &[]),
                    knative_queue_proxy(),
                ],
                vec![],
            ),
        ];
        for p in pods {
            let m = run(&p);
            assert!(!m.patch.0.is_empty());
            // The round trip the API server makes: JSON of the submitted pod, patched, decoded.
            let mut doc = serde_json::to_value(&p).unwrap();
            json_patch::patch(&mut doc, &m.patch).unwrap();
            let patched: Pod = serde_json::from_value(doc).unwrap();
            assert_eq!(patched, m.pod);
            // And the patch survives its own JSON form, as it travels in the AdmissionReview.
            let wire: json_patch::Patch =
                serde_json::from_str(&serde_json::to_string(&m.patch).unwrap()).unwrap();
            assert_eq!(wire, m.patch);
        }
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        let no_spec = Pod::default();
        assert!(matches!(
            mutate(&no_spec, &injection(), &resolve, &no_secrets),
            Err(MutateError::MissingSpec)
        ));
        let p = pod(None, vec![container("app", "x", &["/app"], &[])], vec![]);
        for (token_path, claim) in [
            ("token", "c"),
            ("/token", "c"),
            ("/var/run/", "c"),
            ("/var/../token", "c"),
            ("/relay/token", "c"),
            (DEFAULT_TOKEN_PATH, ""),
        ] {
            let i = Injection {
                token_path: token_path.to_owned(),
                claim_name: claim.to_owned(),
                ..injection()
            };
            let err = mutate(&p, &i, &resolve, &no_secrets).unwrap_err();
            assert!(
                matches!(err, MutateError::InvalidInjection { .. }),
                "{token_path}: {err}"
            );
        }
        let custom = Injection {
            token_path: "/etc/relay/t".to_owned(),
            ..injection()
        };
        let m = mutate(&p, &custom, &resolve, &no_secrets).unwrap();
        let c = find(&m.pod, "app");
        assert_eq!(
            c.volume_mounts.as_ref().unwrap()[1].mount_path,
            "/etc/relay"
        );
    }

    #[test]
    fn containers_are_told_which_variables_hold_secrets() {
        let mut c = container("app", "alpine", &["/app"], &[]);
        c.env = Some(
            serde_json::from_value(json!([
                {"name": "PLAIN", "value": "x"},
                {"name": "DB_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "db", "key": "pw"}}},
                {"name": "FROM_CM", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "k"}}},
                {"name": "A$B", "valueFrom": {"secretKeyRef": {"name": "db", "key": "x"}}},
            ]))
            .unwrap(),
        );
        c.env_from = Some(
            serde_json::from_value(json!([
                {"secretRef": {"name": "api"}, "prefix": "API_"},
                {"secretRef": {"name": "unprefixed"}},
                {"configMapRef": {"name": "cm"}, "prefix": "CM_"},
            ]))
            .unwrap(),
        );
        let plain = container("other", "alpine", &["/other"], &[]);
        let m = run(&pod(None, vec![c, plain], vec![]));
        let list = |m: &Mutation, name| {
            find(&m.pod, name)
                .env
                .iter()
                .flatten()
                .find(|e| e.name == ENV_REDACT)
                .map(|e| e.value.clone().unwrap())
        };
        assert_eq!(list(&m, "app").as_deref(), Some("DB_PASSWORD,A$$B,API_*"));
        assert_eq!(list(&m, "other"), None, "no secrets, no list");

        // A list of the container's own is kept in front of ours.
        let mut own = container("app", "alpine", &["/app"], &[]);
        own.env = Some(
            serde_json::from_value(json!([
                {"name": "RELAY_REDACT_ENV", "value": "MY_TOKEN"},
                {"name": "S", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
            ]))
            .unwrap(),
        );
        let m = run(&pod(None, vec![own], vec![]));
        assert_eq!(list(&m, "app").as_deref(), Some("MY_TOKEN,S"));
    }

    /// The `RELAY_REDACT_ENV` value of container `name`, if it has one.
    fn redact_env(m: &Mutation, name: &str) -> Option<String> {
        find(&m.pod, name)
            .env
            .iter()
            .flatten()
            .find(|e| e.name == ENV_REDACT)
            .map(|e| e.value.clone().unwrap())
    }

    /// Keys of the Secrets `db` and `shared`; others are unknown (missing or unreadable).
    fn secret_keys(name: &str) -> Option<Vec<String>> {
        let keys: &[&str] = match name {
            "db" => &[
                "DB_PASSWORD",
                "1st-key",
                "a=b",
                "a,b",
                "X*",
                "",
                "has space",
                "DB_USER",
            ],
            "shared" => &["API_TOKEN", "DB_PASSWORD", "not-valid.name"],
            _ => return None,
        };
        Some(strings(keys))
    }

    fn with_secrets(env: serde_json::Value, env_from: serde_json::Value) -> Container {
        let mut c = container("app", "alpine", &["/app"], &[]);
        c.env = Some(serde_json::from_value(env).unwrap());
        c.env_from = Some(serde_json::from_value(env_from).unwrap());
        c
    }

    #[test]
    fn unprefixed_env_from_secrets_list_their_keys() {
        let c = with_secrets(
            json!([
                {"name": "API_TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "t"}}},
            ]),
            json!([
                {"secretRef": {"name": "db"}},
                {"secretRef": {"name": "api"}, "prefix": "API_"},
                {"secretRef": {"name": "shared"}, "prefix": ""},
                {"secretRef": {"name": "db"}},
                {"configMapRef": {"name": "db"}},
            ]),
        );
        let p = pod(None, vec![c], vec![]);
        assert_eq!(
            secrets_to_read(&p),
            BTreeSet::from(["db".to_owned(), "shared".to_owned()])
        );
        let m = mutate(&p, &injection(), &resolve, &secret_keys).unwrap();
        // Named and prefixed entries first, then each Secret's keys sorted; a key the kubelet
        // would not set or the list cannot carry is left out, and every entry appears once.
        assert_eq!(
            redact_env(&m, "app").as_deref(),
            Some("API_TOKEN,API_*,1st-key,DB_PASSWORD,DB_USER,not-valid.name")
        );
    }

    #[test]
    fn secrets_with_unknown_keys_list_nothing() {
        let c = with_secrets(
            json!([
                {"name": "S", "valueFrom": {"secretKeyRef": {"name": "gone", "key": "k"}}},
            ]),
            json!([{"secretRef": {"name": "gone"}}, {"secretRef": {"name": "forbidden", "optional": true}}]),
        );
        let m = run(&pod(None, vec![c], vec![]));
        assert!(
            m.skipped.is_empty(),
            "an unknown Secret does not stop wrapping"
        );
        assert_eq!(
            find(&m.pod, "app").command,
            Some(strings(&[ENTRYPOINT_PATH]))
        );
        assert_eq!(redact_env(&m, "app").as_deref(), Some("S"));

        let only = with_secrets(json!([]), json!([{"secretRef": {"name": "gone"}}]));
        let m = run(&pod(None, vec![only], vec![]));
        assert_eq!(
            find(&m.pod, "app").command,
            Some(strings(&[ENTRYPOINT_PATH]))
        );
        assert_eq!(redact_env(&m, "app"), None, "nothing known, no list");
    }

    #[test]
    fn secret_keys_are_asked_only_for_containers_that_may_be_wrapped() {
        let from = |name: &str| {
            let mut c = container(name, "x", &["/app"], &[]);
            c.env_from = Some(
                serde_json::from_value(json!([{"secretRef": {"name": format!("{name}-s")}}]))
                    .unwrap(),
            );
            c
        };
        let mut plain = pod(None, vec![from("a"), from("b")], vec![from("init")]);
        assert_eq!(
            secrets_to_read(&plain),
            BTreeSet::from(["a-s".to_owned(), "b-s".to_owned()])
        );
        let knative = pod(
            Some(KNATIVE_REVISION_LABEL),
            vec![from("user-container"), from("queue-proxy")],
            vec![],
        );
        assert_eq!(
            secrets_to_read(&knative),
            BTreeSet::from(["user-container-s".to_owned()])
        );
        plain
            .metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert(INJECTED_ANNOTATION.to_owned(), "true".to_owned());
        assert!(secrets_to_read(&plain).is_empty());

        // mutate asks for exactly those (each container's Secrets once).
        let asked = std::cell::RefCell::new(Vec::new());
        let record = |name: &str| {
            asked.borrow_mut().push(name.to_owned());
            None
        };
        mutate(&knative, &injection(), &resolve, &record).unwrap();
        assert_eq!(*asked.borrow(), strings(&["user-container-s"]));
    }
}

//! The original `ENTRYPOINT` and `CMD` of a container image, read from its registry over the OCI
//! distribution API (with [`oci_client`]), for containers that set no `command`.
//!
//! [`Registry::image_command`] normalizes the reference the way Docker and the kubelet do
//! (`busybox` is `docker.io/library/busybox:latest`), fetches the manifest (OCI image manifest,
//! Docker v2 schema 2, or an OCI index / Docker manifest list, from which the entry for the
//! configured [`Platform`] is picked), then the image configuration blob (at most
//! [`RegistryConfig::max_config_size`] bytes, digest verified), and caches the result by digest.
//! Credentials come from the pod's pull secrets: [`PullAuth::from_secrets`] reads them as the
//! kubelet does, [`pull_auth_for_pod`] fetches the pod's and its ServiceAccount's.
//!
//! The lookup is async and bounded by [`RegistryConfig::timeout`], so the webhook can resolve
//! images before it calls the pure, synchronous [`crate::mutate::mutate`].
//!
//! Note on what `oci_client` handles itself: its manifest requests list the OCI and Docker media
//! types in `Accept` (distribution 2.8 answers 404 to an OCI manifest requested without them),
//! and a manifest without a `mediaType` field (as umoci writes them) is recognized by its shape.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    hash::Hash,
    net::IpAddr,
    num::NonZeroUsize,
    str::FromStr,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, PodSpec, Secret, ServiceAccount};
use kube::Api;
use lru::LruCache;
use oci_client::{
    Reference,
    client::{ClientConfig, ClientProtocol},
    errors::{OciDistributionError, OciErrorCode},
    manifest::{ImageIndexEntry, OciDescriptor, OciManifest},
    secrets::RegistryAuth,
};
use serde::Deserialize;
use tracing::{debug, warn};

use crate::mutate::ImageCommand;

/// The secret type holding a `~/.docker/config.json` (`.dockerconfigjson`, with `auths`).
pub const DOCKER_CONFIG_JSON_TYPE: &str = "kubernetes.io/dockerconfigjson";
/// The legacy secret type holding a `~/.dockercfg` (`.dockercfg`, without `auths`).
pub const DOCKER_CFG_TYPE: &str = "kubernetes.io/dockercfg";

/// Docker Hub's canonical name; `index.docker.io` and `registry-1.docker.io` are the same registry.
const DOCKER_HUB: &str = "docker.io";
const DOCKER_HUB_ALIASES: [&str; 3] = ["docker.io", "index.docker.io", "registry-1.docker.io"];

/// At most this many registry clients (each with its connection pool) are kept, whatever
/// [`RegistryConfig::cache_capacity`] says.
const MAX_CLIENTS: usize = 64;

/// An image platform: `os/architecture[/variant]`, as in an image index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    /// `linux`, `windows`, ... (Go's `GOOS`).
    pub os: String,
    /// `amd64`, `arm64`, `arm`, ... (Go's `GOARCH`).
    pub architecture: String,
    /// `v7` for 32-bit ARM, `v8` for arm64, ...; `None` for the architecture's default.
    pub variant: Option<String>,
}

impl Platform {
    /// `os/architecture[/variant]`.
    pub fn new(os: &str, architecture: &str, variant: Option<&str>) -> Self {
        Self {
            os: os.to_owned(),
            architecture: architecture.to_owned(),
            variant: variant.map(str::to_owned),
        }
    }

    /// The platform this process runs on, named the Go way (`x86_64` is `amd64`, `aarch64` is
    /// `arm64`): `linux/amd64` on a usual node.
    pub fn node() -> Self {
        let (architecture, variant) = match std::env::consts::ARCH {
            "x86_64" => ("amd64", None),
            "aarch64" => ("arm64", Some("v8")),
            "arm" => ("arm", Some("v7")),
            "x86" => ("386", None),
            "powerpc64" if cfg!(target_endian = "little") => ("ppc64le", None),
            "powerpc64" => ("ppc64", None),
            "loongarch64" => ("loong64", None),
            other => (other, None),
        };
        Self::new(std::env::consts::OS, architecture, variant)
    }

    /// Whether an index entry for `platform` can run here, and how well: `Some(0)` is an exact
    /// match, higher ranks are older variants this platform still runs (`arm/v6` on `arm/v7`).
    fn rank(&self, platform: &oci_client::manifest::Platform) -> Option<usize> {
        if !self.os.eq_ignore_ascii_case(&platform.os.to_string()) {
            return None;
        }
        let (arch, variant) = normalize_arch(&self.architecture, self.variant.as_deref());
        let (entry_arch, entry_variant) = normalize_arch(
            &platform.architecture.to_string(),
            platform.variant.as_deref(),
        );
        if arch != entry_arch {
            return None;
        }
        compatible_variants(&arch, &variant)
            .iter()
            .position(|v| *v == entry_variant)
    }
}

impl Default for Platform {
    /// [`Platform::node`].
    fn default() -> Self {
        Self::node()
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(variant) = &self.variant {
            write!(f, "/{variant}")?;
        }
        Ok(())
    }
}

/// A platform that does not parse as `os/architecture[/variant]`.
#[derive(Debug, thiserror::Error)]
#[error("invalid platform {0:?}: expected os/architecture[/variant], e.g. linux/arm64/v8")]
pub struct InvalidPlatform(String);

impl FromStr for Platform {
    type Err = InvalidPlatform;

    /// `linux/amd64`, `linux/arm64/v8`, `linux/arm/v7`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split('/').collect();
        match parts.as_slice() {
            [os, arch] if !os.is_empty() && !arch.is_empty() => Ok(Self::new(os, arch, None)),
            [os, arch, variant] if !os.is_empty() && !arch.is_empty() && !variant.is_empty() => {
                Ok(Self::new(os, arch, Some(variant)))
            }
            _ => Err(InvalidPlatform(s.to_owned())),
        }
    }
}

/// The architecture's canonical name and variant (`""` for the default), as containerd
/// normalizes them: `aarch64` is `arm64` and its `v8` is the default; `arm` defaults to `v7`;
/// `amd64`'s `v1` is the default.
fn normalize_arch(arch: &str, variant: Option<&str>) -> (String, String) {
    let arch = arch.to_ascii_lowercase();
    let variant = variant.unwrap_or("").to_ascii_lowercase();
    let with_v = |v: &str| {
        if v.is_empty() || v.starts_with('v') {
            v.to_owned()
        } else {
            format!("v{v}")
        }
    };
    match arch.as_str() {
        "x86_64" | "x86-64" | "amd64" => {
            let v = with_v(&variant);
            (
                "amd64".to_owned(),
                if v == "v1" { String::new() } else { v },
            )
        }
        "aarch64" | "arm64" => {
            let v = with_v(&variant);
            (
                "arm64".to_owned(),
                if v == "v8" { String::new() } else { v },
            )
        }
        "armhf" => ("arm".to_owned(), "v7".to_owned()),
        "armel" => ("arm".to_owned(), "v6".to_owned()),
        "arm" => {
            let v = with_v(&variant);
            (
                "arm".to_owned(),
                if v.is_empty() { "v7".to_owned() } else { v },
            )
        }
        "i386" | "i686" | "x86" => ("386".to_owned(), variant),
        _ => (arch, variant),
    }
}

/// The variants a (normalized) platform runs, best first.
fn compatible_variants(arch: &str, variant: &str) -> Vec<String> {
    let older = |levels: &[&str]| -> Vec<String> {
        match levels.iter().position(|l| *l == variant) {
            Some(i) => levels[..=i].iter().rev().map(|l| (*l).to_owned()).collect(),
            None => vec![variant.to_owned()],
        }
    };
    match arch {
        "arm" => older(&["v5", "v6", "v7", "v8"]),
        "amd64" => older(&["", "v2", "v3", "v4"]),
        _ => vec![variant.to_owned()],
    }
}

/// The entry of an image index for `platform`: the exact match if there is one, else the best
/// compatible variant; the first of equals.
pub fn select_platform<'a>(
    entries: &'a [ImageIndexEntry],
    platform: &Platform,
) -> Option<&'a ImageIndexEntry> {
    entries
        .iter()
        .filter_map(|e| Some((platform.rank(e.platform.as_ref()?)?, e)))
        .min_by_key(|(rank, _)| *rank)
        .map(|(_, e)| e)
}

/// How a [`Registry`] reaches registries and caches what it learns.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// The platform picked from multi-platform images ([`Platform::node`] by default).
    pub platform: Platform,
    /// How long one lookup may take, all requests included (5 s by default: the webhook must
    /// answer within the API server's timeout).
    pub timeout: Duration,
    /// Registries (`host:port`, or `host` for the default port) reached over plain HTTP, as
    /// with Docker's `--insecure-registry`.
    pub insecure_registries: Vec<String>,
    /// Whether `localhost` and loopback addresses are reached over plain HTTP, whatever port.
    pub insecure_localhost: bool,
    /// How long a tag's digest is trusted before the registry is asked again (60 s by default).
    /// Digest-pinned references are cached until evicted.
    pub tag_ttl: Duration,
    /// How many entries each cache (tags, manifests, configurations) keeps (1024 by default);
    /// registry clients, one per registry and credentials, are kept up to 64.
    pub cache_capacity: NonZeroUsize,
    /// The largest image configuration blob accepted (1 MiB by default).
    pub max_config_size: u64,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            platform: Platform::node(),
            timeout: Duration::from_secs(5),
            insecure_registries: Vec::new(),
            insecure_localhost: false,
            tag_ttl: Duration::from_secs(60),
            cache_capacity: NonZeroUsize::new(1024).unwrap_or(NonZeroUsize::MIN),
            max_config_size: 1024 * 1024,
        }
    }
}

/// Why the original entrypoint of an image could not be read. The messages name the image and
/// the registry and fit a Kubernetes Event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// The image reference does not parse.
    #[error("invalid image reference {image:?}: {reason}")]
    InvalidReference {
        /// The reference as given.
        image: String,
        /// Why it does not parse.
        reason: String,
    },
    /// The registry could not be reached, did not answer in time, or failed (5xx, 429).
    #[error("registry {registry} is unreachable for {image}: {reason}")]
    Unreachable {
        /// `host[:port]`.
        registry: String,
        /// The normalized image reference.
        image: String,
        /// What happened (connection refused, timeout after 5s, 503, ...).
        reason: String,
    },
    /// The registry refused the credentials, or wants some and the pod's pull secrets have none.
    #[error(
        "registry {registry} refused access to {image}: unauthorized (no pull secret of the pod \
         or its ServiceAccount grants access)"
    )]
    Unauthorized {
        /// `host[:port]`.
        registry: String,
        /// The normalized image reference.
        image: String,
    },
    /// The registry has no such repository, tag or digest.
    #[error("image {image} not found in registry {registry}")]
    NotFound {
        /// `host[:port]`.
        registry: String,
        /// The normalized image reference.
        image: String,
    },
    /// A multi-platform image without an entry for the configured platform.
    #[error("image {image} has no manifest for platform {platform} (it has: {})", available.join(", "))]
    NoPlatform {
        /// The normalized image reference.
        image: String,
        /// The platform looked for.
        platform: String,
        /// The platforms the image index lists.
        available: Vec<String>,
    },
    /// The registry answered something that is not a valid manifest or image configuration
    /// (or one too large, or whose digest does not match).
    #[error("registry {registry} sent a malformed answer for {image}: {reason}")]
    Malformed {
        /// `host[:port]`.
        registry: String,
        /// The normalized image reference.
        image: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// A user name and password for one registry, from a pull secret.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Credentials {
    /// The user name.
    pub username: String,
    /// The password (or token).
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// A registry key of a docker config (`https://index.docker.io/v1/`, `reg.example.com:5000`,
/// `*.example.com/team`), parsed the way the kubelet does.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RegistryKey {
    /// Lowercase host, maybe with `*` and `?` globs per DNS label; Docker Hub's aliases are
    /// [`DOCKER_HUB`].
    host: String,
    port: Option<String>,
    /// Repository path prefix, without leading or trailing `/`.
    path: String,
}

impl RegistryKey {
    fn parse(key: &str) -> Option<Self> {
        let rest = key
            .strip_prefix("https://")
            .or_else(|| key.strip_prefix("http://"))
            .unwrap_or(key);
        let (host_port, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (host, port) = split_host_port(host_port);
        if host.is_empty() {
            return None;
        }
        let mut host = host.to_ascii_lowercase();
        if DOCKER_HUB_ALIASES.contains(&host.as_str()) && port.is_none() {
            host = DOCKER_HUB.to_owned();
        }
        // `https://index.docker.io/v1/` names the registry, not a `v1` repository.
        let path = path.trim_matches('/');
        let path = ["v1", "v2"]
            .iter()
            .find_map(|api| {
                (path == *api)
                    .then_some("")
                    .or_else(|| path.strip_prefix(&format!("{api}/")))
            })
            .unwrap_or(path);
        Some(Self {
            host,
            port: port.map(str::to_owned),
            path: path.to_owned(),
        })
    }

    /// Whether the key covers `registry/repository` (hosts matched label by label with globs,
    /// ports equal, the key's path a prefix of the repository, segment-wise).
    fn matches(&self, registry: &str, repository: &str) -> bool {
        let (host, port) = split_host_port(registry);
        let mut host = host.to_ascii_lowercase();
        if DOCKER_HUB_ALIASES.contains(&host.as_str()) && port.is_none() {
            host = DOCKER_HUB.to_owned();
        }
        let labels: Vec<&str> = host.split('.').collect();
        let patterns: Vec<&str> = self.host.split('.').collect();
        labels.len() == patterns.len()
            && patterns.iter().zip(&labels).all(|(p, l)| glob(p, l))
            && self.port.as_deref() == port
            && (self.path.is_empty()
                || repository == self.path
                || repository
                    .strip_prefix(&self.path)
                    .is_some_and(|rest| rest.starts_with('/')))
    }

    /// More specific keys first: longer paths, then hosts without globs.
    fn specificity(&self) -> (usize, bool, usize) {
        (self.path.len(), !self.host.contains('*'), self.host.len())
    }
}

/// `host` and `port` of `host[:port]` (`[v6]:port` too).
fn split_host_port(s: &str) -> (&str, Option<&str>) {
    if let Some(rest) = s.strip_prefix('[')
        && let Some((host, after)) = rest.split_once(']')
    {
        return (host, after.strip_prefix(':'));
    }
    match s.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => (host, Some(port)),
        _ => (s, None),
    }
}

/// Shell-style matching of one DNS label: `*` any run of characters, `?` one.
fn glob(pattern: &str, s: &str) -> bool {
    let (p, s): (Vec<char>, Vec<char>) = (pattern.chars().collect(), s.chars().collect());
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, si));
            pi += 1;
        } else if let Some((star_p, star_s)) = star {
            pi = star_p + 1;
            si = star_s + 1;
            star = Some((star_p, star_s + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// One entry of a docker config.
#[derive(Debug, Default, Deserialize)]
struct DockerConfigEntry {
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    /// base64 of `username:password`; wins over the two fields, as for the kubelet.
    #[serde(default)]
    auth: Option<String>,
}

impl DockerConfigEntry {
    fn credentials(&self) -> Option<Credentials> {
        let (username, password) = match self.auth.as_deref().filter(|a| !a.is_empty()) {
            Some(auth) => {
                let decoded = BASE64.decode(auth.trim()).ok()?;
                let decoded = String::from_utf8(decoded).ok()?;
                let (u, p) = decoded.split_once(':')?;
                (u.to_owned(), p.to_owned())
            }
            None => (
                self.username.clone().unwrap_or_default(),
                self.password.clone().unwrap_or_default(),
            ),
        };
        (!username.is_empty() || !password.is_empty()).then_some(Credentials { username, password })
    }
}

/// `.dockerconfigjson`: `{"auths": {...}}`.
#[derive(Debug, Deserialize)]
struct DockerConfigJson {
    #[serde(default)]
    auths: BTreeMap<String, DockerConfigEntry>,
}

/// Registry credentials from a pod's pull secrets, looked up per image as the kubelet does.
#[derive(Debug, Clone, Default)]
pub struct PullAuth {
    /// In secret order; lookups sort the matches by specificity.
    entries: Vec<(RegistryKey, Credentials)>,
}

impl PullAuth {
    /// No credentials: every registry is accessed anonymously.
    pub fn anonymous() -> Self {
        Self::default()
    }

    /// The credentials of `secrets` of type `kubernetes.io/dockerconfigjson` (key
    /// `.dockerconfigjson`, registries under `auths`) and `kubernetes.io/dockercfg` (key
    /// `.dockercfg`, registries at the top level); each registry entry has `auth` (base64 of
    /// `user:password`) or `username` and `password`. Other secrets, and entries that do not
    /// parse, are skipped (with a debug log).
    pub fn from_secrets(secrets: &[Secret]) -> Self {
        let mut entries = Vec::new();
        for secret in secrets {
            let name = secret.metadata.name.as_deref().unwrap_or("");
            let (key, json) = match secret.type_.as_deref() {
                Some(DOCKER_CONFIG_JSON_TYPE) => (".dockerconfigjson", true),
                Some(DOCKER_CFG_TYPE) => (".dockercfg", false),
                other => {
                    debug!(secret = name, r#type = ?other, "not a pull secret, skipped");
                    continue;
                }
            };
            let Some(data) = secret.data.as_ref().and_then(|d| d.get(key)) else {
                debug!(secret = name, key, "pull secret without its key, skipped");
                continue;
            };
            let auths = if json {
                serde_json::from_slice::<DockerConfigJson>(&data.0).map(|c| c.auths)
            } else {
                serde_json::from_slice::<BTreeMap<String, DockerConfigEntry>>(&data.0)
            };
            let auths = match auths {
                Ok(auths) => auths,
                Err(e) => {
                    debug!(secret = name, error = %e, "pull secret does not parse, skipped");
                    continue;
                }
            };
            for (registry, entry) in auths {
                match (RegistryKey::parse(&registry), entry.credentials()) {
                    (Some(key), Some(credentials)) => entries.push((key, credentials)),
                    _ => debug!(
                        secret = name,
                        registry, "pull secret entry unusable, skipped"
                    ),
                }
            }
        }
        Self { entries }
    }

    /// Whether there are no credentials at all.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The credentials for `image` (a reference such as `busybox` or
    /// `reg.example.com:5000/team/app:v1`), most specific first; empty when none match or the
    /// reference does not parse.
    pub fn credentials_for(&self, image: &str) -> Vec<&Credentials> {
        match normalize_reference(image) {
            Ok(reference) => self.lookup(&reference),
            Err(_) => Vec::new(),
        }
    }

    fn lookup(&self, reference: &Reference) -> Vec<&Credentials> {
        let mut matches: Vec<&(RegistryKey, Credentials)> = self
            .entries
            .iter()
            .filter(|(key, _)| key.matches(reference.registry(), reference.repository()))
            .collect();
        // Stable: equally specific keys keep the secrets' order.
        matches.sort_by_key(|(key, _)| std::cmp::Reverse(key.specificity()));
        let mut out: Vec<&Credentials> = Vec::new();
        for (_, credentials) in matches {
            if !out.contains(&credentials) {
                out.push(credentials);
            }
        }
        out
    }
}

/// The pull credentials of `pod`: its `imagePullSecrets` and those of its ServiceAccount
/// (`default` unless it names one), read from the pod's namespace (`metadata.namespace`; the
/// webhook must fill it from the admission request when the pod has none). Secrets or a
/// ServiceAccount that do not exist are skipped with a debug log, other API errors with a
/// warning.
pub async fn pull_auth_for_pod(client: &kube::Client, pod: &Pod) -> PullAuth {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    match &pod.spec {
        Some(spec) => pull_auth(client, namespace, spec).await,
        None => pull_auth(client, namespace, &PodSpec::default()).await,
    }
}

/// [`pull_auth_for_pod`] for a pod spec in `namespace`.
pub async fn pull_auth(client: &kube::Client, namespace: &str, spec: &PodSpec) -> PullAuth {
    let mut names: Vec<String> = spec
        .image_pull_secrets
        .iter()
        .flatten()
        .map(|r| r.name.clone())
        .collect();
    #[allow(deprecated)]
    let account = spec
        .service_account_name
        .as_deref()
        .or(spec.service_account.as_deref())
        .filter(|name| !name.is_empty())
        .unwrap_or("default");
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    match accounts.get_opt(account).await {
        Ok(Some(sa)) => names.extend(
            sa.image_pull_secrets
                .iter()
                .flatten()
                .map(|r| r.name.clone()),
        ),
        Ok(None) => debug!(namespace, account, "service account not found"),
        Err(e) => warn!(namespace, account, error = %e, "cannot read the service account"),
    }
    let secrets_api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let mut secrets = Vec::new();
    let mut seen = Vec::new();
    for name in names {
        if name.is_empty() || seen.contains(&name) {
            continue;
        }
        match secrets_api.get_opt(&name).await {
            Ok(Some(secret)) => secrets.push(secret),
            Ok(None) => debug!(namespace, secret = name, "pull secret not found, skipped"),
            Err(e) => warn!(namespace, secret = name, error = %e, "cannot read pull secret"),
        }
        seen.push(name);
    }
    PullAuth::from_secrets(&secrets)
}

/// Reads images' `ENTRYPOINT` and `CMD` from their registries, with caches. Cheap to clone:
/// clones share the caches.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

struct Inner {
    config: RegistryConfig,
    /// One client per registry and credentials: an `oci_client::Client` keeps the first
    /// credentials (and tokens) it sees for a registry.
    clients: Mutex<LruCache<(String, Option<Credentials>), oci_client::Client>>,
    /// Tag reference -> manifest digest, with when it was learnt.
    tags: Mutex<LruCache<String, (String, Instant)>>,
    /// Manifest digest (as referenced: an index's, or an image manifest's) -> command.
    manifests: Mutex<LruCache<String, ImageCommand>>,
    /// Image configuration digest -> command.
    configs: Mutex<LruCache<String, ImageCommand>>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

/// A cache behind a mutex that no one holds across an `.await`.
fn cached<K: Hash + Eq, V: Clone>(cache: &Mutex<LruCache<K, V>>, key: &K) -> Option<V> {
    cache
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(key)
        .cloned()
}

fn remember<K: Hash + Eq, V>(cache: &Mutex<LruCache<K, V>>, key: K, value: V) {
    cache
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .put(key, value);
}

/// The parts of an image configuration we read.
#[derive(Debug, Deserialize)]
struct ConfigFile {
    #[serde(default, deserialize_with = "object_or_null")]
    config: Option<ContainerConfig>,
}

/// `config` as Go's decoder reads it (and so containerd and the kubelet): an object or `null`.
/// serde's derive would also take an array for the struct, reading its fields by position, so a
/// blob the runtime refuses would give a command (found by the `image_config` fuzz target).
fn object_or_null<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<ContainerConfig>, D::Error> {
    struct Visit;
    impl<'de> serde::de::Visitor<'de> for Visit {
        type Value = Option<ContainerConfig>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an object or null")
        }

        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_map(self)
        }

        fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            ContainerConfig::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                .map(Some)
        }
    }
    d.deserialize_option(Visit)
}

#[derive(Debug, Deserialize)]
struct ContainerConfig {
    #[serde(rename = "Entrypoint", default)]
    entrypoint: Option<Vec<String>>,
    #[serde(rename = "Cmd", default)]
    cmd: Option<Vec<String>>,
}

/// The image and registry a lookup is about, for error messages.
struct Target {
    image: String,
    registry: String,
}

impl Target {
    fn unreachable(&self, reason: impl Into<String>) -> RegistryError {
        RegistryError::Unreachable {
            registry: self.registry.clone(),
            image: self.image.clone(),
            reason: reason.into(),
        }
    }

    fn malformed(&self, reason: impl Into<String>) -> RegistryError {
        RegistryError::Malformed {
            registry: self.registry.clone(),
            image: self.image.clone(),
            reason: reason.into(),
        }
    }

    fn not_found(&self) -> RegistryError {
        RegistryError::NotFound {
            registry: self.registry.clone(),
            image: self.image.clone(),
        }
    }

    fn unauthorized(&self) -> RegistryError {
        RegistryError::Unauthorized {
            registry: self.registry.clone(),
            image: self.image.clone(),
        }
    }

    /// What an `oci_client` error means for the webhook.
    fn classify(&self, e: OciDistributionError) -> RegistryError {
        use OciDistributionError as E;
        match e {
            E::RequestError(e) => self.unreachable(error_chain(&e)),
            E::UnauthorizedError { .. } | E::AuthenticationFailure(_) => self.unauthorized(),
            E::RegistryError { envelope, .. } => {
                let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
                if codes
                    .iter()
                    .any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied))
                {
                    self.unauthorized()
                } else if codes.iter().any(|c| {
                    matches!(
                        c,
                        OciErrorCode::ManifestUnknown
                            | OciErrorCode::NameUnknown
                            | OciErrorCode::NotFound
                            | OciErrorCode::BlobUnknown
                            | OciErrorCode::ManifestBlobUnknown
                            | OciErrorCode::NameInvalid
                    )
                }) {
                    self.not_found()
                } else if codes.contains(&&OciErrorCode::Toomanyrequests) {
                    self.unreachable(format!("rate limited: {envelope}"))
                } else {
                    self.malformed(envelope.to_string())
                }
            }
            E::ServerError { code, message, .. } => match code {
                401 | 403 => self.unauthorized(),
                404 => self.not_found(),
                429 | 500..=599 => self.unreachable(format!("HTTP {code}: {}", short(&message))),
                _ => self.malformed(format!("HTTP {code}: {}", short(&message))),
            },
            other => self.malformed(other.to_string()),
        }
    }

    /// An error while streaming a blob: the connection broke, or the content does not match its
    /// digest.
    fn classify_io(&self, e: &std::io::Error) -> RegistryError {
        match e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<reqwest::Error>())
        {
            Some(e) => self.unreachable(error_chain(e)),
            None => self.malformed(format!("image configuration: {e}")),
        }
    }
}

/// An error and its sources, `: `-separated (reqwest's own message hides the cause).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// At most 200 characters of a registry's message.
fn short(message: &str) -> String {
    let message = message.trim();
    match message.char_indices().nth(200) {
        Some((i, _)) => format!("{}...", &message[..i]),
        None => message.to_owned(),
    }
}

/// The `ENTRYPOINT` and `CMD` of an image configuration blob (OCI `config.Entrypoint` and
/// `config.Cmd`; Docker's are the same fields); absent or `null` ones are empty.
pub fn image_command_from_config(data: &[u8]) -> Result<ImageCommand, serde_json::Error> {
    let file: ConfigFile = serde_json::from_slice(data)?;
    let config = file.config.unwrap_or(ContainerConfig {
        entrypoint: None,
        cmd: None,
    });
    Ok(ImageCommand {
        entrypoint: config.entrypoint.unwrap_or_default(),
        cmd: config.cmd.unwrap_or_default(),
    })
}

/// `image` parsed and normalized as Docker and containerd do it (`busybox` is
/// `docker.io/library/busybox:latest`).
pub fn normalize_reference(image: &str) -> Result<Reference, RegistryError> {
    let reference = Reference::try_from(image).map_err(|e| RegistryError::InvalidReference {
        image: image.to_owned(),
        reason: e.to_string(),
    })?;
    // oci-spec's domain split leaves out one of Docker's rules (distribution/reference's
    // `splitDockerDomain`): a first element with upper-case letters is a registry host
    // (`Registry/team/app` is host `Registry`), as repository paths are lower-case. Without it
    // the lookup would ask Docker Hub about an image the kubelet pulls from another registry.
    let host = image
        .split_once('/')
        .map(|(first, _)| first)
        .filter(|first| {
            !first.contains(['.', ':'])
                && *first != "localhost"
                && first.bytes().any(|b| b.is_ascii_uppercase())
        });
    let Some(host) = host else {
        return Ok(reference);
    };
    let Some(repository) = reference
        .repository()
        .strip_prefix(host)
        .and_then(|r| r.strip_prefix('/'))
    else {
        return Ok(reference);
    };
    let (host, repository) = (host.to_owned(), repository.to_owned());
    Ok(
        match (
            reference.tag().map(str::to_owned),
            reference.digest().map(str::to_owned),
        ) {
            (Some(tag), Some(digest)) => {
                Reference::with_tag_and_digest(host, repository, tag, digest)
            }
            (None, Some(digest)) => Reference::with_digest(host, repository, digest),
            (tag, None) => {
                Reference::with_tag(host, repository, tag.unwrap_or_else(|| "latest".to_owned()))
            }
        },
    )
}

impl Registry {
    /// A registry client with empty caches.
    pub fn new(config: RegistryConfig) -> Self {
        let capacity = config.cache_capacity;
        Self {
            inner: Arc::new(Inner {
                clients: Mutex::new(LruCache::new(
                    capacity.min(NonZeroUsize::new(MAX_CLIENTS).unwrap_or(NonZeroUsize::MIN)),
                )),
                tags: Mutex::new(LruCache::new(capacity)),
                manifests: Mutex::new(LruCache::new(capacity)),
                configs: Mutex::new(LruCache::new(capacity)),
                config,
            }),
        }
    }

    /// The configuration it was made with.
    pub fn config(&self) -> &RegistryConfig {
        &self.inner.config
    }

    /// The `ENTRYPOINT` and `CMD` of `image` for the configured platform, with the credentials
    /// of `auth` that match the image's registry (each tried in turn while the registry says
    /// unauthorized; anonymous when none match).
    ///
    /// Cached: a digest-pinned reference until evicted, a tag's digest for
    /// [`RegistryConfig::tag_ttl`], image configurations by digest. The whole lookup takes at
    /// most [`RegistryConfig::timeout`].
    ///
    /// Note that the caches are shared by all callers: an image that one pod's credentials
    /// could read is answered from the cache for another pod without them. Only the command is
    /// disclosed, and the kubelet still needs credentials to pull the image.
    pub async fn image_command(
        &self,
        image: &str,
        auth: &PullAuth,
    ) -> Result<ImageCommand, RegistryError> {
        let reference = normalize_reference(image)?;
        let target = Target {
            image: reference.whole(),
            registry: reference.resolve_registry().to_owned(),
        };
        if let Some(command) = self.cached_command(&reference) {
            debug!(image = target.image, "image command from the cache");
            return Ok(command);
        }
        let credentials: Vec<Option<Credentials>> = {
            let found = auth.lookup(&reference);
            if found.is_empty() {
                vec![None]
            } else {
                found.into_iter().cloned().map(Some).collect()
            }
        };
        let timeout = self.inner.config.timeout;
        let attempts = async {
            let mut last = None;
            for credentials in credentials {
                match self.fetch(&reference, &target, credentials).await {
                    Err(e @ RegistryError::Unauthorized { .. }) => last = Some(e),
                    done => return done,
                }
            }
            Err(last.unwrap_or_else(|| target.unauthorized()))
        };
        match tokio::time::timeout(timeout, attempts).await {
            Ok(result) => result,
            Err(_) => Err(target.unreachable(format!("no answer within {timeout:?}"))),
        }
    }

    /// The command of `image` if the caches know it (a digest seen, or a tag learnt less than the
    /// tag TTL ago), without asking the registry.
    pub fn cached_image_command(&self, image: &str) -> Option<ImageCommand> {
        self.cached_command(&normalize_reference(image).ok()?)
    }

    fn cached_command(&self, reference: &Reference) -> Option<ImageCommand> {
        let digest = match reference.digest() {
            Some(digest) => digest.to_owned(),
            None => {
                let (digest, learnt) = cached(&self.inner.tags, &reference.whole())?;
                if learnt.elapsed() > self.inner.config.tag_ttl {
                    return None;
                }
                digest
            }
        };
        cached(&self.inner.manifests, &digest)
    }

    /// Whether `registry` (`host[:port]`) is reached over plain HTTP.
    fn plain_http(&self, registry: &str) -> bool {
        let config = &self.inner.config;
        if config
            .insecure_registries
            .iter()
            .any(|r| r.eq_ignore_ascii_case(registry))
        {
            return true;
        }
        let (host, _) = split_host_port(registry);
        config.insecure_localhost
            && (host.eq_ignore_ascii_case("localhost")
                || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback()))
    }

    fn client(
        &self,
        target: &Target,
        credentials: &Option<Credentials>,
    ) -> Result<oci_client::Client, RegistryError> {
        let key = (target.registry.clone(), credentials.clone());
        if let Some(client) = cached(&self.inner.clients, &key) {
            return Ok(client);
        }
        let timeout = self.inner.config.timeout;
        let config = ClientConfig {
            protocol: if self.plain_http(&target.registry) {
                ClientProtocol::Http
            } else {
                ClientProtocol::Https
            },
            connect_timeout: Some(timeout),
            read_timeout: Some(timeout),
            ..ClientConfig::default()
        };
        let client = oci_client::Client::try_from(config)
            .map_err(|e| target.unreachable(format!("cannot make an HTTP client: {e}")))?;
        remember(&self.inner.clients, key, client.clone());
        Ok(client)
    }

    async fn fetch(
        &self,
        reference: &Reference,
        target: &Target,
        credentials: Option<Credentials>,
    ) -> Result<ImageCommand, RegistryError> {
        let client = self.client(target, &credentials)?;
        let auth = match credentials {
            Some(c) => RegistryAuth::Basic(c.username, c.password),
            None => RegistryAuth::Anonymous,
        };
        let (manifest, digest) = client
            .pull_manifest(reference, &auth)
            .await
            .map_err(|e| target.classify(e))?;
        if reference.digest().is_none() {
            remember(
                &self.inner.tags,
                reference.whole(),
                (digest.clone(), Instant::now()),
            );
        }
        if let Some(command) = cached(&self.inner.manifests, &digest) {
            return Ok(command);
        }
        let image_manifest = match manifest {
            OciManifest::Image(image) => image,
            OciManifest::ImageIndex(index) => {
                let platform = &self.inner.config.platform;
                let Some(entry) = select_platform(&index.manifests, platform) else {
                    return Err(RegistryError::NoPlatform {
                        image: target.image.clone(),
                        platform: platform.to_string(),
                        available: index
                            .manifests
                            .iter()
                            .filter_map(|e| e.platform.as_ref())
                            .map(|p| {
                                let mut s = format!("{}/{}", p.os, p.architecture);
                                if let Some(v) = &p.variant {
                                    s = format!("{s}/{v}");
                                }
                                s
                            })
                            .collect(),
                    });
                };
                debug!(image = target.image, digest = entry.digest, %platform, "picked from the index");
                let platform_reference = reference.clone_with_digest(entry.digest.clone());
                match client
                    .pull_manifest(&platform_reference, &auth)
                    .await
                    .map_err(|e| target.classify(e))?
                {
                    (OciManifest::Image(image), _) => image,
                    (OciManifest::ImageIndex(_), _) => {
                        return Err(target.malformed(format!(
                            "the index entry {} for {platform} is another index",
                            entry.digest
                        )));
                    }
                }
            }
        };
        let command = self
            .config_command(&client, reference, target, &image_manifest.config)
            .await?;
        remember(&self.inner.manifests, digest, command.clone());
        Ok(command)
    }

    /// The command of the image configuration `descriptor`, from the cache or the registry.
    async fn config_command(
        &self,
        client: &oci_client::Client,
        reference: &Reference,
        target: &Target,
        descriptor: &OciDescriptor,
    ) -> Result<ImageCommand, RegistryError> {
        if let Some(command) = cached(&self.inner.configs, &descriptor.digest) {
            return Ok(command);
        }
        let max = self.inner.config.max_config_size;
        if u64::try_from(descriptor.size).map_or(true, |size| size > max) {
            return Err(target.malformed(format!(
                "image configuration of {} bytes (the limit is {max})",
                descriptor.size
            )));
        }
        let mut stream = client
            .pull_blob_stream(reference, descriptor)
            .await
            .map_err(|e| target.classify(e))?;
        let mut data = Vec::new();
        // The stream checks the digest when it ends.
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| target.classify_io(&e))?;
            if (data.len() + chunk.len()) as u64 > max {
                return Err(
                    target.malformed(format!("image configuration larger than {max} bytes"))
                );
            }
            data.extend_from_slice(&chunk);
        }
        let command = image_command_from_config(&data)
            .map_err(|e| target.malformed(format!("image configuration: {e}")))?;
        remember(
            &self.inner.configs,
            descriptor.digest.clone(),
            command.clone(),
        );
        Ok(command)
    }
}

/// The webhook's image lookup: the pull secrets of the pod and of its ServiceAccount, then every
/// image concurrently through one [`Registry`].
#[derive(Clone)]
pub struct PodImageLookup {
    pub registry: Registry,
    pub client: kube::Client,
}

impl fmt::Debug for PodImageLookup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PodImageLookup")
            .field("registry", &self.registry)
            .finish_non_exhaustive()
    }
}

impl crate::webhook::ImageLookup for PodImageLookup {
    fn lookup<'a>(
        &'a self,
        pod: &'a Pod,
        images: Vec<String>,
    ) -> futures::future::BoxFuture<'a, HashMap<String, Result<ImageCommand, String>>> {
        Box::pin(async move {
            // Cached commands first: reading the pod's pull secrets costs two API calls, which
            // only a registry request needs.
            let mut found = HashMap::new();
            let mut missing = Vec::new();
            for image in images {
                match self.registry.cached_image_command(&image) {
                    Some(command) => {
                        found.insert(image, Ok(command));
                    }
                    None => missing.push(image),
                }
            }
            if missing.is_empty() {
                return found;
            }
            let auth = pull_auth_for_pod(&self.client, pod).await;
            let auth = &auth;
            let lookups = missing.into_iter().map(|image| async move {
                let result = self
                    .registry
                    .image_command(&image, auth)
                    .await
                    .map_err(|e| e.to_string());
                (image, result)
            });
            found.extend(futures::future::join_all(lookups).await);
            found
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::{ByteString, apimachinery::pkg::apis::meta::v1::ObjectMeta};
    use serde_json::json;

    use super::*;

    #[test]
    fn an_image_config_is_an_object_or_null_as_go_reads_it() {
        let read = |blob: &str| image_command_from_config(blob.as_bytes());
        let command = read(r#"{"config": {"Entrypoint": ["/bin/app"], "Cmd": null}}"#).unwrap();
        assert_eq!(command.entrypoint, ["/bin/app"]);
        assert!(command.cmd.is_empty());
        for empty in [r#"{"config": null}"#, r#"{"os": "linux"}"#] {
            assert_eq!(read(empty).unwrap(), ImageCommand::default(), "{empty}");
        }
        // The fuzz target's find: an array is not a config (serde's derive read it by position).
        for bad in [
            r#"{"config": []}"#,
            r#"{"config": [["/bin/sh"]]}"#,
            r#"{"config": 1}"#,
        ] {
            assert!(read(bad).is_err(), "{bad}");
        }
    }

    fn secret(name: &str, type_: &str, key: &str, data: serde_json::Value) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                ..ObjectMeta::default()
            },
            type_: Some(type_.to_owned()),
            data: Some(BTreeMap::from([(
                key.to_owned(),
                ByteString(serde_json::to_vec(&data).unwrap()),
            )])),
            ..Secret::default()
        }
    }

    fn config_json(auths: serde_json::Value) -> Secret {
        secret(
            "pull",
            DOCKER_CONFIG_JSON_TYPE,
            ".dockerconfigjson",
            json!({ "auths": auths }),
        )
    }

    fn basic(user: &str, password: &str) -> serde_json::Value {
        json!({ "auth": BASE64.encode(format!("{user}:{password}")) })
    }

    fn users(auth: &PullAuth, image: &str) -> Vec<String> {
        auth.credentials_for(image)
            .into_iter()
            .map(|c| format!("{}:{}", c.username, c.password))
            .collect()
    }

    #[test]
    fn dockerconfigjson_auth_and_username_password() {
        let auth = PullAuth::from_secrets(&[config_json(json!({
            "reg.example.com": basic("alice", "pa:ss"),
            "other.example.com": { "username": "bob", "password": "pw" },
            // `auth` wins over the fields, as for the kubelet.
            "both.example.com": { "auth": BASE64.encode("carol:right"), "username": "x", "password": "wrong" },
        }))]);
        assert_eq!(users(&auth, "reg.example.com/app:v1"), ["alice:pa:ss"]);
        assert_eq!(users(&auth, "other.example.com/team/app"), ["bob:pw"]);
        assert_eq!(users(&auth, "both.example.com/app"), ["carol:right"]);
        assert!(users(&auth, "elsewhere.example.com/app").is_empty());
    }

    #[test]
    fn dockercfg_has_no_auths_wrapper() {
        let auth = PullAuth::from_secrets(&[secret(
            "legacy",
            DOCKER_CFG_TYPE,
            ".dockercfg",
            json!({ "https://reg.example.com": basic("dave", "pw") }),
        )]);
        assert_eq!(users(&auth, "reg.example.com/app"), ["dave:pw"]);
    }

    #[test]
    fn other_and_broken_secrets_are_skipped() {
        let opaque = secret(
            "opaque",
            "Opaque",
            ".dockerconfigjson",
            json!({"auths": {}}),
        );
        let mut broken = config_json(json!({}));
        broken.data = Some(BTreeMap::from([(
            ".dockerconfigjson".to_owned(),
            ByteString(b"{not json".to_vec()),
        )]));
        let missing_key = secret("nokey", DOCKER_CONFIG_JSON_TYPE, "other", json!({}));
        let bad_base64 = config_json(json!({ "reg.example.com": { "auth": "%%%" } }));
        let good = config_json(json!({ "reg.example.com": basic("erin", "pw") }));
        let auth = PullAuth::from_secrets(&[opaque, broken, missing_key, bad_base64, good]);
        assert_eq!(users(&auth, "reg.example.com/app"), ["erin:pw"]);
        assert!(PullAuth::from_secrets(&[]).is_empty());
    }

    #[test]
    fn docker_hub_keys_are_equivalent() {
        for key in [
            "https://index.docker.io/v1/",
            "index.docker.io",
            "docker.io",
            "https://registry-1.docker.io/v2/",
        ] {
            let auth = PullAuth::from_secrets(&[config_json(json!({ key: basic("hub", "pw") }))]);
            for image in [
                "busybox",
                "library/busybox:1.36",
                "docker.io/library/busybox",
                "index.docker.io/user/app",
                "user/app",
            ] {
                assert_eq!(users(&auth, image), ["hub:pw"], "key {key}, image {image}");
            }
            assert!(users(&auth, "quay.io/user/app").is_empty(), "key {key}");
        }
    }

    #[test]
    fn hosts_match_with_ports_globs_and_paths() {
        let auth = PullAuth::from_secrets(&[config_json(json!({
            "reg.example.com:5000": basic("port", "pw"),
            "*.glob.example.com": basic("glob", "pw"),
            "paths.example.com/team": basic("team", "pw"),
            "paths.example.com": basic("host", "pw"),
        }))]);
        assert_eq!(users(&auth, "reg.example.com:5000/app"), ["port:pw"]);
        assert!(users(&auth, "reg.example.com/app").is_empty());
        assert!(users(&auth, "reg.example.com:5001/app").is_empty());
        assert_eq!(users(&auth, "a.glob.example.com/app"), ["glob:pw"]);
        // A glob stands for one label.
        assert!(users(&auth, "glob.example.com/app").is_empty());
        assert!(users(&auth, "a.b.glob.example.com/app").is_empty());
        // The most specific key first, then the others that match.
        assert_eq!(
            users(&auth, "paths.example.com/team/app"),
            ["team:pw", "host:pw"]
        );
        assert_eq!(users(&auth, "paths.example.com/teamx/app"), ["host:pw"]);
        assert_eq!(users(&auth, "PATHS.example.com/other"), ["host:pw"]);
    }

    #[test]
    fn credentials_from_several_secrets_keep_their_order() {
        let first = config_json(json!({ "reg.example.com": basic("first", "pw") }));
        let second = config_json(json!({ "https://reg.example.com/": basic("second", "pw") }));
        let auth = PullAuth::from_secrets(&[first, second]);
        assert_eq!(
            users(&auth, "reg.example.com/app"),
            ["first:pw", "second:pw"]
        );
    }

    #[test]
    fn credentials_debug_hides_the_password() {
        let c = Credentials {
            username: "u".to_owned(),
            password: "hunter2".to_owned(),
        };
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    fn index(platforms: serde_json::Value) -> Vec<ImageIndexEntry> {
        let entries: Vec<_> = platforms
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
            .map(|(i, p)| {
                json!({
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": format!("sha256:{i:064}"),
                    "size": 100,
                    "platform": p,
                })
            })
            .collect();
        serde_json::from_value(json!(entries)).unwrap()
    }

    fn pick(entries: &[ImageIndexEntry], platform: &str) -> Option<usize> {
        let platform: Platform = platform.parse().unwrap();
        select_platform(entries, &platform)
            .map(|e| entries.iter().position(|x| x.digest == e.digest).unwrap())
    }

    #[test]
    fn platform_selection() {
        let entries = index(json!([
            { "os": "unknown", "architecture": "unknown" },
            { "os": "windows", "architecture": "amd64" },
            { "os": "linux", "architecture": "amd64" },
            { "os": "linux", "architecture": "arm64", "variant": "v8" },
            { "os": "linux", "architecture": "arm", "variant": "v6" },
            { "os": "linux", "architecture": "arm", "variant": "v7" },
            { "os": "linux", "architecture": "ppc64le" },
        ]));
        assert_eq!(pick(&entries, "linux/amd64"), Some(2));
        assert_eq!(pick(&entries, "windows/amd64"), Some(1));
        assert_eq!(pick(&entries, "linux/arm64"), Some(3));
        assert_eq!(pick(&entries, "linux/arm64/v8"), Some(3));
        assert_eq!(pick(&entries, "linux/aarch64"), Some(3));
        assert_eq!(pick(&entries, "linux/arm/v7"), Some(5));
        assert_eq!(pick(&entries, "linux/arm"), Some(5));
        assert_eq!(pick(&entries, "linux/arm/v6"), Some(4));
        // An ARMv8 CPU in 32-bit mode runs v7 best.
        assert_eq!(pick(&entries, "linux/arm/v8"), Some(5));
        // amd64 v3 (AVX2) still runs baseline amd64.
        assert_eq!(pick(&entries, "linux/amd64/v3"), Some(2));
        assert_eq!(pick(&entries, "linux/s390x"), None);
    }

    #[test]
    fn platform_variants_that_cannot_run_are_not_picked() {
        let entries = index(json!([
            { "os": "linux", "architecture": "arm", "variant": "v7" },
            { "os": "linux", "architecture": "amd64", "variant": "v3" },
            { "os": "linux", "architecture": "arm64" },
        ]));
        assert_eq!(pick(&entries, "linux/arm/v6"), None);
        assert_eq!(pick(&entries, "linux/amd64"), None);
        assert_eq!(pick(&entries, "linux/amd64/v4"), Some(1));
        // arm64 without a variant is v8.
        assert_eq!(pick(&entries, "linux/arm64/v8"), Some(2));
    }

    #[test]
    fn platforms_parse_and_print() {
        let p: Platform = "linux/arm64/v8".parse().unwrap();
        assert_eq!(p, Platform::new("linux", "arm64", Some("v8")));
        assert_eq!(p.to_string(), "linux/arm64/v8");
        assert_eq!(
            "linux/amd64".parse::<Platform>().unwrap().to_string(),
            "linux/amd64"
        );
        for bad in ["", "linux", "linux/", "/amd64", "a/b/c/d", "linux/arm/"] {
            assert!(bad.parse::<Platform>().is_err(), "{bad:?}");
        }
        if cfg!(all(target_os = "linux", target_arch = "x86_64")) {
            assert_eq!(Platform::node().to_string(), "linux/amd64");
        }
    }

    #[test]
    fn references_normalize_like_docker() {
        let r = normalize_reference("busybox").unwrap();
        assert_eq!(r.whole(), "docker.io/library/busybox:latest");
        assert_eq!(r.resolve_registry(), "index.docker.io");
        assert_eq!(
            normalize_reference("user/app:1").unwrap().whole(),
            "docker.io/user/app:1"
        );
        let r = normalize_reference("localhost:5000/team/app").unwrap();
        assert_eq!(
            (r.registry(), r.repository(), r.tag()),
            ("localhost:5000", "team/app", Some("latest"))
        );
        let digest = format!("sha256:{}", "a".repeat(64));
        let r = normalize_reference(&format!("reg.example.com/app:v1@{digest}")).unwrap();
        assert_eq!(r.digest(), Some(digest.as_str()));
        // Found by the image_reference fuzz target: an upper-case first element is a registry
        // host, as for Docker and containerd, not a Docker Hub namespace (which would not even
        // print back to a reference that parses).
        let pinned = format!("Reg/app:v1@{digest}");
        for (image, whole) in [
            ("Registry/team/app", "Registry/team/app:latest"),
            ("qDp0/org/repo:v2", "qDp0/org/repo:v2"),
            (pinned.as_str(), pinned.as_str()),
        ] {
            let r = normalize_reference(image).unwrap();
            assert_eq!(r.whole(), whole, "{image}");
            assert_eq!(Some(r.registry()), image.split('/').next(), "{image}");
            assert_eq!(normalize_reference(&r.whole()).unwrap().whole(), whole);
        }
        let auth = PullAuth::from_secrets(&[config_json(json!({ "registry": basic("u", "p") }))]);
        assert_eq!(users(&auth, "Registry/team/app"), ["u:p"]);
        assert!(
            users(&auth, "registry/team/app").is_empty(),
            "a Docker Hub namespace"
        );
        for bad in [
            "",
            "reg.example.com/App",
            "app@sha256:short",
            "reg.example.com/app:",
        ] {
            assert!(
                matches!(
                    normalize_reference(bad),
                    Err(RegistryError::InvalidReference { .. })
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn plain_http_only_where_configured() {
        let registry = Registry::new(RegistryConfig {
            insecure_registries: vec!["reg.internal:5000".to_owned()],
            ..RegistryConfig::default()
        });
        assert!(registry.plain_http("reg.internal:5000"));
        assert!(!registry.plain_http("reg.internal:5001"));
        assert!(!registry.plain_http("127.0.0.1:5000"));
        let registry = Registry::new(RegistryConfig {
            insecure_localhost: true,
            ..RegistryConfig::default()
        });
        for local in [
            "127.0.0.1:5000",
            "localhost:1234",
            "[::1]:5000",
            "localhost",
        ] {
            assert!(registry.plain_http(local), "{local}");
        }
        assert!(!registry.plain_http("reg.example.com"));
    }

    #[test]
    fn registry_errors_are_classified() {
        let target = Target {
            image: "reg.example.com/app:v1".to_owned(),
            registry: "reg.example.com".to_owned(),
        };
        let server = |code| OciDistributionError::ServerError {
            code,
            url: "https://reg.example.com/v2/app/manifests/v1".to_owned(),
            message: "nope".to_owned(),
        };
        assert!(matches!(
            target.classify(server(404)),
            RegistryError::NotFound { .. }
        ));
        assert!(matches!(
            target.classify(server(403)),
            RegistryError::Unauthorized { .. }
        ));
        assert!(matches!(
            target.classify(server(503)),
            RegistryError::Unreachable { .. }
        ));
        assert!(matches!(
            target.classify(server(400)),
            RegistryError::Malformed { .. }
        ));
        let envelope: oci_client::errors::OciEnvelope = serde_json::from_value(json!({
            "errors": [{ "code": "MANIFEST_UNKNOWN", "message": "manifest unknown" }]
        }))
        .unwrap();
        assert!(matches!(
            target.classify(OciDistributionError::RegistryError {
                envelope,
                url: String::new()
            }),
            RegistryError::NotFound { .. }
        ));
        let message = target
            .classify(OciDistributionError::UnauthorizedError { url: String::new() })
            .to_string();
        assert!(
            message.contains("reg.example.com/app:v1") && message.contains("unauthorized"),
            "{message}"
        );
    }
}

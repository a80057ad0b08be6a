//! Registry credentials from pull secrets (`kubernetes.io/dockerconfigjson` and
//! `kubernetes.io/dockercfg`), matched per image the way the kubelet does, and the pull secrets of
//! a pod and of its ServiceAccount, read from the API server.

use std::{collections::BTreeMap, fmt};

use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
use k8s_openapi::api::core::v1::{Pod, PodSpec, Secret, ServiceAccount};
use kube::Api;
use oci_client::Reference;
use serde::Deserialize;
use tracing::{debug, warn};

use super::reference::{normalize_reference, split_host_port};

/// The secret type holding a `~/.docker/config.json` (`.dockerconfigjson`, with `auths`).
pub const DOCKER_CONFIG_JSON_TYPE: &str = "kubernetes.io/dockerconfigjson";
/// The legacy secret type holding a `~/.dockercfg` (`.dockercfg`, without `auths`).
pub const DOCKER_CFG_TYPE: &str = "kubernetes.io/dockercfg";

/// Docker Hub's canonical name; `index.docker.io` and `registry-1.docker.io` are the same registry.
const DOCKER_HUB: &str = "docker.io";
const DOCKER_HUB_ALIASES: [&str; 3] = ["docker.io", "index.docker.io", "registry-1.docker.io"];

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

    pub(super) fn lookup(&self, reference: &Reference) -> Vec<&Credentials> {
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

#[cfg(test)]
pub(super) mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::{ByteString, apimachinery::pkg::apis::meta::v1::ObjectMeta};
    use serde_json::json;

    use super::*;

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

    pub(in crate::registry) fn config_json(auths: serde_json::Value) -> Secret {
        secret(
            "pull",
            DOCKER_CONFIG_JSON_TYPE,
            ".dockerconfigjson",
            json!({ "auths": auths }),
        )
    }

    pub(in crate::registry) fn basic(user: &str, password: &str) -> serde_json::Value {
        json!({ "auth": BASE64.encode(format!("{user}:{password}")) })
    }

    pub(in crate::registry) fn users(auth: &PullAuth, image: &str) -> Vec<String> {
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
}

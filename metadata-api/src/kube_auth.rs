//! `--auth kubernetes`: callers send a projected ServiceAccount token, checked with a TokenReview.
//!
//! # Pod tokens
//!
//! A pod mounts a projected token whose audience is the metadata API's (`--token-audience`). The
//! API sends it to the Kubernetes API server in a TokenReview (`spec.audiences` set), which also
//! checks that the pod the token is bound to still exists with the same UID. The review's extra
//! claims `authentication.kubernetes.io/pod-name` and `pod-uid` name the pod, the username
//! `system:serviceaccount:NS:SA` its namespace. The API reads the pod and maps its labels to a log
//! context ([`crate::pod_context`]); the token is then a [`Scope::Write`] principal for exactly
//! that context. A pod without those labels is refused (403).
//!
//! # Collector tokens
//!
//! Tokens of the ServiceAccounts named by `--collector-service-account` are collectors. A
//! collector's node is its pod's `spec.nodeName`; it may create, append to and read `ebpf` streams
//! only of contexts that a pod on that node has, or had until a grace period ago
//! (`--deleted-pod-grace`): the collector ships the output of pods that ended before it did. A
//! watch of the pods that carry [`labels::WORKFLOW`] keeps the context → node index.
//!
//! # People
//!
//! A token that is not issued for the API's audience (a user's, from their kubeconfig; a
//! ServiceAccount token from `kubectl create token`) is reviewed for the API server's own
//! audience. The user it names is a reader of every context, and each stream it reads is checked
//! with a SubjectAccessReview: may this user `get pods/log` in the namespace the stream's pod ran
//! in? The RBAC that governs `kubectl logs` then governs these logs. A stream whose namespace is
//! not known (written with key-file tokens) is not readable this way. Answers are cached per
//! user and namespace for [`ACCESS_TTL`], as the API server's own delegating authorizer does.
//!
//! # Caching and load
//!
//! Reviews are cached by SHA-256 of the token, in a bounded cache: successes until the token's
//! `exp` or [`MAX_SUCCESS_TTL`], whichever is sooner, refusals for [`FAILURE_TTL`]. At most
//! `--token-review-concurrency` reviews run at once, so a flood of bad tokens cannot hammer the API
//! server; a caller that waits longer than [`REVIEW_QUEUE_TIMEOUT`] for its turn gets a 503.
//!
//! Error bodies never say why a token failed; the reason is logged at debug level.

use std::{
    collections::{HashMap, VecDeque},
    fmt,
    str::FromStr,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use futures::StreamExt;
use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus},
    authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec},
    core::v1::Pod,
};
use kube::{
    Client,
    api::{Api, PostParams},
    runtime::{WatchStreamExt, watcher},
};
use sha2::{Digest, Sha256};
use tokio::sync::{Semaphore, watch};

use crate::{
    auth::{Context, MAX_TOKEN_LEN, Principal, Scope, User},
    pod_context::{context_for_labels, labels},
};

/// Longest a successful review is trusted without asking again.
pub const MAX_SUCCESS_TTL: Duration = Duration::from_secs(300);
/// How long a refused token stays refused without asking again.
pub const FAILURE_TTL: Duration = Duration::from_secs(10);
/// How long a SubjectAccessReview's answer counts, allowed or not (the API server's delegating
/// authorizer caches for as long).
pub const ACCESS_TTL: Duration = Duration::from_secs(10);
/// Longest a request waits for a free TokenReview slot.
pub const REVIEW_QUEUE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest start-up waits for the first list of pods.
const INDEX_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Extra claim naming the pod a token is bound to.
pub const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
/// Extra claim with the UID of the pod a token is bound to.
pub const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";

/// Flags of `--auth kubernetes`.
#[derive(Debug, Clone, clap::Args)]
pub struct KubeAuthArgs {
    /// Audience pod tokens must be issued for (the projected token's `audience`).
    #[arg(
        long,
        env = "RELAY_METADATA_API_TOKEN_AUDIENCE",
        default_value = crate::auth::AUDIENCE
    )]
    pub token_audience: String,
    /// A collector's ServiceAccount, `NAMESPACE:NAME` (repeatable).
    #[arg(
        long = "collector-service-account",
        env = "RELAY_METADATA_API_COLLECTOR_SERVICE_ACCOUNTS",
        value_delimiter = ',',
        default_value = "relay-system:relay-collector"
    )]
    pub collector_service_accounts: Vec<ServiceAccountRef>,
    /// How long a collector may still write for a deleted pod's context.
    #[arg(long, env = "RELAY_METADATA_API_DELETED_POD_GRACE", default_value = "15m", value_parser = humantime::parse_duration)]
    pub deleted_pod_grace: Duration,
    /// TokenReviews in flight at most.
    #[arg(
        long,
        env = "RELAY_METADATA_API_TOKEN_REVIEW_CONCURRENCY",
        default_value = "8"
    )]
    pub token_review_concurrency: usize,
    /// Reviewed tokens kept in the cache at most.
    #[arg(
        long,
        env = "RELAY_METADATA_API_TOKEN_CACHE_SIZE",
        default_value = "10000"
    )]
    pub token_cache_size: usize,
}

/// A ServiceAccount, `NAMESPACE:NAME`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServiceAccountRef {
    pub namespace: String,
    pub name: String,
}

/// A `NAMESPACE:NAME` that is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expected NAMESPACE:NAME, got {0:?}")]
pub struct ServiceAccountRefError(String);

impl FromStr for ServiceAccountRef {
    type Err = ServiceAccountRefError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once(':') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains(':') => {
                Ok(Self {
                    namespace: ns.to_owned(),
                    name: name.to_owned(),
                })
            }
            _ => Err(ServiceAccountRefError(s.to_owned())),
        }
    }
}

impl fmt::Display for ServiceAccountRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.namespace, self.name)
    }
}

/// The ServiceAccount a TokenReview username names (`system:serviceaccount:NS:NAME`); `None`
/// for users that are not service accounts.
pub fn parse_service_account_username(username: &str) -> Option<ServiceAccountRef> {
    let rest = username.strip_prefix("system:serviceaccount:")?;
    rest.parse().ok()
}

/// Why a request was not authenticated or not allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Invalid, expired, wrong-audience or unbound token: 401.
    #[error("a valid bearer token is required")]
    Unauthenticated,
    /// A valid token that may not write anything: 403.
    #[error("{0}")]
    Forbidden(&'static str),
    /// The API server could not be asked: 503.
    #[error("authentication is unavailable")]
    Unavailable,
}

/// Kubernetes auth that cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot configure the Kubernetes client")]
    Client(#[source] Box<kube::Error>),
    #[error("the pod watch did not list the pods within {0:?}")]
    IndexTimeout(Duration),
    #[error("--token-review-concurrency and --token-cache-size must be at least 1")]
    Zero,
}

/// What a reviewed token is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Identity {
    Pod {
        context: Context,
        namespace: String,
        pod: String,
    },
    Collector {
        node: String,
    },
    /// A person (or any account) reading with a token for the API server's audience.
    User(Arc<User>),
}

/// A cached review outcome and when it stops counting.
#[derive(Debug, Clone)]
struct Cached {
    outcome: Result<Identity, AuthError>,
    until: Instant,
}

/// Review outcomes by token hash, bounded in size, each with its own expiry.
#[derive(Debug)]
pub(crate) struct TokenCache {
    entries: quick_cache::sync::Cache<[u8; 32], Cached>,
}

impl TokenCache {
    fn new(capacity: usize) -> Self {
        Self {
            entries: quick_cache::sync::Cache::new(capacity),
        }
    }

    fn key(token: &str) -> [u8; 32] {
        Sha256::digest(token.as_bytes()).into()
    }

    fn get(&self, key: &[u8; 32], now: Instant) -> Option<Result<Identity, AuthError>> {
        let hit = self.entries.get(key)?;
        if now < hit.until {
            return Some(hit.outcome);
        }
        self.entries.remove_if(key, |c| c.until <= now);
        None
    }

    fn insert(&self, key: [u8; 32], outcome: Result<Identity, AuthError>, until: Instant) {
        self.entries.insert(key, Cached { outcome, until });
    }
}

/// When a review outcome stops being trusted: refusals after [`FAILURE_TTL`], successes at the
/// token's `exp` (seconds since the epoch) or after [`MAX_SUCCESS_TTL`], whichever is sooner.
fn cache_until(success: bool, exp: Option<u64>, now: Instant, wall: SystemTime) -> Instant {
    if !success {
        return now + FAILURE_TTL;
    }
    let now_secs = wall.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let left = exp.map_or(MAX_SUCCESS_TTL, |exp| {
        Duration::from_secs(exp.saturating_sub(now_secs))
    });
    now + left.min(MAX_SUCCESS_TTL)
}

/// The `exp` claim of a JWT, unverified (the TokenReview verified it; this only bounds caching).
fn token_exp(token: &str) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct Exp {
        exp: u64,
    }
    jsonwebtoken::dangerous::insecure_decode_claims::<Exp>(token)
        .ok()
        .map(|c| c.exp)
}

/// The audiences a JWT names (`aud`, a string or a list), unverified: it only chooses which
/// review a token gets, and that review verifies it. Empty for a token that is not a JWT.
fn token_audiences(token: &str) -> Vec<String> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Aud {
        One(String),
        Many(Vec<String>),
    }
    #[derive(serde::Deserialize)]
    struct Claims {
        aud: Option<Aud>,
    }
    match jsonwebtoken::dangerous::insecure_decode_claims::<Claims>(token).map(|c| c.aud) {
        Ok(Some(Aud::One(a))) => vec![a],
        Ok(Some(Aud::Many(a))) => a,
        _ => Vec::new(),
    }
}

/// The cache key of a SubjectAccessReview: the namespace and everything about the user that
/// the review sends, hashed from their JSON (which keeps apart values that merely concatenate
/// alike).
fn access_key(user: &User, namespace: &str) -> [u8; 32] {
    let json = serde_json::to_vec(&(namespace, user)).unwrap_or_default();
    Sha256::digest(json).into()
}

/// Where a pod with a log context runs, or ran.
#[derive(Debug, Clone)]
struct Placement {
    node: String,
    namespace: String,
    gone_at: Option<Instant>,
}

/// Context → pods → node, for the pods of the watch, plus deleted pods for a grace period.
#[derive(Debug)]
pub(crate) struct NodeIndex {
    grace: Duration,
    by_context: HashMap<String, HashMap<String, Placement>>,
    context_of: HashMap<String, String>,
    /// Deleted pods by deletion time, oldest first (uid).
    gone: VecDeque<(Instant, String)>,
    /// The uids seen since the watch (re)started its list.
    relisting: Option<Vec<String>>,
}

impl NodeIndex {
    fn new(grace: Duration) -> Self {
        Self {
            grace,
            by_context: HashMap::new(),
            context_of: HashMap::new(),
            gone: VecDeque::new(),
            relisting: None,
        }
    }

    /// A pod (of `namespace`) was added or changed.
    fn apply(
        &mut self,
        uid: &str,
        namespace: &str,
        context: Option<String>,
        node: Option<String>,
        now: Instant,
    ) {
        if let Some(seen) = &mut self.relisting {
            seen.push(uid.to_owned());
        }
        let (Some(context), Some(node)) = (context, node) else {
            // Not (or no longer) a tenant pod, or not scheduled yet.
            self.delete(uid, now);
            return;
        };
        if self.context_of.get(uid).is_some_and(|c| *c != context) {
            self.forget(uid);
        }
        self.context_of.insert(uid.to_owned(), context.clone());
        self.by_context.entry(context).or_default().insert(
            uid.to_owned(),
            Placement {
                node,
                namespace: namespace.to_owned(),
                gone_at: None,
            },
        );
    }

    /// A pod was deleted: it still counts for its node for the grace period.
    fn delete(&mut self, uid: &str, now: Instant) {
        let placement = self
            .context_of
            .get(uid)
            .and_then(|c| self.by_context.get_mut(c))
            .and_then(|pods| pods.get_mut(uid));
        if let Some(p) = placement
            && p.gone_at.is_none()
        {
            p.gone_at = Some(now);
            self.gone.push_back((now, uid.to_owned()));
        }
        self.prune(now);
    }

    /// The watch starts listing again: pods it does not list were deleted meanwhile.
    fn relist_start(&mut self) {
        self.relisting = Some(Vec::new());
    }

    fn relist_done(&mut self, now: Instant) {
        let Some(seen) = self.relisting.take() else {
            return;
        };
        let seen: std::collections::HashSet<String> = seen.into_iter().collect();
        let missing: Vec<String> = self
            .context_of
            .keys()
            .filter(|uid| !seen.contains(*uid))
            .cloned()
            .collect();
        for uid in missing {
            self.delete(&uid, now);
        }
    }

    fn forget(&mut self, uid: &str) {
        if let Some(context) = self.context_of.remove(uid)
            && let Some(pods) = self.by_context.get_mut(&context)
        {
            pods.remove(uid);
            if pods.is_empty() {
                self.by_context.remove(&context);
            }
        }
    }

    fn prune(&mut self, now: Instant) {
        while let Some((at, uid)) = self.gone.front() {
            if now.duration_since(*at) < self.grace {
                break;
            }
            let uid = uid.clone();
            self.gone.pop_front();
            // Only if it is still gone (a relist may have seen it again).
            let still_gone = self
                .context_of
                .get(&uid)
                .and_then(|c| self.by_context.get(c))
                .and_then(|pods| pods.get(&uid))
                .is_some_and(|p| p.gone_at.is_some());
            if still_gone {
                self.forget(&uid);
            }
        }
    }

    /// The namespace of a pod of `context` that is on `node`, or was until less than the grace
    /// period ago; `None` if there is none.
    fn runs(&self, node: &str, context: &str, now: Instant) -> Option<&str> {
        self.by_context.get(context).and_then(|pods| {
            pods.values()
                .find(|p| {
                    p.node == node
                        && p.gone_at
                            .is_none_or(|at| now.duration_since(at) < self.grace)
                })
                .map(|p| p.namespace.as_str())
        })
    }
}

/// The `kubernetes` authenticator: TokenReviews, their cache and the pod index.
pub struct KubeAuth {
    client: Client,
    audience: String,
    collectors: Vec<ServiceAccountRef>,
    cache: TokenCache,
    /// SubjectAccessReview answers by [`access_key`]: allowed, and until when.
    access: quick_cache::sync::Cache<[u8; 32], (bool, Instant)>,
    reviews: Semaphore,
    index: Arc<Mutex<NodeIndex>>,
}

impl fmt::Debug for KubeAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubeAuth")
            .field("audience", &self.audience)
            .field("collectors", &self.collectors)
            .finish_non_exhaustive()
    }
}

impl KubeAuth {
    /// Connects with the usual configuration (in-cluster, or `KUBECONFIG`), starts the pod
    /// watch and waits until it has listed the pods.
    pub async fn start(args: &KubeAuthArgs) -> Result<Arc<Self>, StartError> {
        let client = Client::try_default()
            .await
            .map_err(|e| StartError::Client(Box::new(e)))?;
        Self::start_with(client, args).await
    }

    /// [`start`](Self::start) with a given client.
    pub async fn start_with(client: Client, args: &KubeAuthArgs) -> Result<Arc<Self>, StartError> {
        if args.token_review_concurrency == 0 || args.token_cache_size == 0 {
            return Err(StartError::Zero);
        }
        let index = Arc::new(Mutex::new(NodeIndex::new(args.deleted_pod_grace)));
        let (ready_tx, mut ready_rx) = watch::channel(false);
        tokio::spawn(watch_pods(client.clone(), index.clone(), ready_tx));
        tokio::time::timeout(INDEX_READY_TIMEOUT, ready_rx.wait_for(|r| *r))
            .await
            .ok()
            .and_then(Result::ok)
            .ok_or(StartError::IndexTimeout(INDEX_READY_TIMEOUT))?;
        Ok(Arc::new(Self {
            client,
            audience: args.token_audience.clone(),
            collectors: args.collector_service_accounts.clone(),
            cache: TokenCache::new(args.token_cache_size),
            access: quick_cache::sync::Cache::new(args.token_cache_size),
            reviews: Semaphore::new(args.token_review_concurrency),
            index,
        }))
    }

    /// The principal a ServiceAccount token stands for.
    pub async fn authenticate(&self, token: &str) -> Result<Principal, AuthError> {
        if token.is_empty() || token.len() > MAX_TOKEN_LEN {
            return Err(AuthError::Unauthenticated);
        }
        let key = TokenCache::key(token);
        let identity = match self.cache.get(&key, Instant::now()) {
            Some(outcome) => outcome?,
            None => self.review_cached(token, key).await?,
        };
        Ok(match identity {
            Identity::Pod {
                context,
                namespace,
                pod,
            } => Principal {
                context,
                scope: Scope::Write,
                node: None,
                namespace: Some(namespace),
                user: None,
                pod: Some(pod),
            },
            Identity::Collector { node } => Principal {
                context: Context::prefix("workflows").map_err(|_| AuthError::Unavailable)?,
                scope: Scope::Collector,
                node: Some(node),
                namespace: None,
                user: None,
                pod: None,
            },
            Identity::User(user) => Principal {
                context: Context::prefix("workflows").map_err(|_| AuthError::Unavailable)?,
                scope: Scope::Read,
                node: None,
                namespace: None,
                user: Some(user),
                pod: None,
            },
        })
    }

    /// Whether `user` may read the logs of pods in `namespace` (`get pods/log`), as the API
    /// server's RBAC (or other authorizer) says; cached for [`ACCESS_TTL`].
    pub async fn may_read_logs(&self, user: &User, namespace: &str) -> Result<bool, AuthError> {
        let key = access_key(user, namespace);
        let now = Instant::now();
        if let Some(hit) = self.access.get(&key)
            && now < hit.1
        {
            return Ok(hit.0);
        }
        let _permit = tokio::time::timeout(REVIEW_QUEUE_TIMEOUT, self.reviews.acquire())
            .await
            .map_err(|_| AuthError::Unavailable)?
            .map_err(|_| AuthError::Unavailable)?;
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(user.username.clone()),
                uid: user.uid.clone(),
                groups: Some(user.groups.clone()),
                extra: Some(user.extra.clone()),
                resource_attributes: Some(ResourceAttributes {
                    namespace: Some(namespace.to_owned()),
                    verb: Some("get".to_owned()),
                    resource: Some("pods".to_owned()),
                    subresource: Some("log".to_owned()),
                    ..ResourceAttributes::default()
                }),
                ..SubjectAccessReviewSpec::default()
            },
            ..SubjectAccessReview::default()
        };
        let reviewed = Api::<SubjectAccessReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "SubjectAccessReview failed.");
                AuthError::Unavailable
            })?;
        let allowed = reviewed.status.is_some_and(|s| s.allowed);
        tracing::debug!(user = %user.username, namespace, allowed, "SubjectAccessReview done.");
        self.access
            .insert(key, (allowed, Instant::now() + ACCESS_TTL));
        Ok(allowed)
    }

    async fn review_cached(&self, token: &str, key: [u8; 32]) -> Result<Identity, AuthError> {
        let _permit = tokio::time::timeout(REVIEW_QUEUE_TIMEOUT, self.reviews.acquire())
            .await
            .map_err(|_| {
                tracing::warn!("Too many TokenReviews waiting; refusing a request with 503.");
                AuthError::Unavailable
            })?
            .map_err(|_| AuthError::Unavailable)?;
        // Another request may have reviewed the same token while this one waited.
        if let Some(outcome) = self.cache.get(&key, Instant::now()) {
            return outcome;
        }
        let outcome = self.review(token).await;
        match &outcome {
            Err(AuthError::Unavailable) => {}
            Ok(_) => self.cache.insert(
                key,
                outcome.clone(),
                cache_until(true, token_exp(token), Instant::now(), SystemTime::now()),
            ),
            Err(_) => self.cache.insert(
                key,
                outcome.clone(),
                cache_until(false, None, Instant::now(), SystemTime::now()),
            ),
        }
        outcome
    }

    async fn review(&self, token: &str) -> Result<Identity, AuthError> {
        if !token_audiences(token).contains(&self.audience) {
            return self.review_user(token).await;
        }
        let status = self
            .token_review(token, Some(vec![self.audience.clone()]))
            .await?;
        let (sa, pod_name, pod_uid) = self.reviewed_pod(&status)?;
        let pod = Api::<Pod>::namespaced(self.client.clone(), &sa.namespace)
            .get_opt(&pod_name)
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "Cannot read the pod of a token.");
                AuthError::Unavailable
            })?;
        let Some(pod) = pod.filter(|p| p.metadata.uid.as_deref() == Some(pod_uid.as_str())) else {
            tracing::debug!(namespace = %sa.namespace, pod = %pod_name, "Token of a pod that is gone.");
            return Err(AuthError::Unauthenticated);
        };
        if self.collectors.contains(&sa) {
            let node = pod.spec.and_then(|s| s.node_name).ok_or_else(|| {
                tracing::debug!(namespace = %sa.namespace, pod = %pod_name, "Collector pod without a node.");
                AuthError::Forbidden("the collector's pod is not scheduled on a node")
            })?;
            return Ok(Identity::Collector { node });
        }
        let context = pod
            .metadata
            .labels
            .as_ref()
            .and_then(context_for_labels)
            .and_then(|c| Context::stream(&c).ok())
            .ok_or_else(|| {
                tracing::debug!(namespace = %sa.namespace, pod = %pod_name, "Pod without log context labels.");
                AuthError::Forbidden(
                    "the pod has no log context: it needs the relay.sh workflow labels of a Tekton step or Knative trigger pod",
                )
            })?;
        Ok(Identity::Pod {
            context,
            namespace: sa.namespace,
            pod: pod_name,
        })
    }

    /// A token not issued for this API: reviewed for the API server's own audiences (no
    /// `spec.audiences`), so a kubeconfig's token works as it does for `kubectl`.
    async fn review_user(&self, token: &str) -> Result<Identity, AuthError> {
        let status = self.token_review(token, None).await?;
        let user = status
            .user
            .filter(|_| status.authenticated == Some(true))
            .and_then(|u| {
                Some((
                    u.username.filter(|n| !n.is_empty())?,
                    u.uid,
                    u.groups,
                    u.extra,
                ))
            });
        let Some((username, uid, groups, extra)) = user else {
            tracing::debug!(error = ?status.error, "User token refused.");
            return Err(AuthError::Unauthenticated);
        };
        Ok(Identity::User(Arc::new(User {
            username,
            uid: uid.filter(|u| !u.is_empty()),
            groups: groups.unwrap_or_default(),
            extra: extra.unwrap_or_default(),
        })))
    }

    /// What the API server says of `token` for `audiences` (`None`: its own audiences).
    async fn token_review(
        &self,
        token: &str,
        audiences: Option<Vec<String>>,
    ) -> Result<TokenReviewStatus, AuthError> {
        let started = Instant::now();
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences,
            },
            ..TokenReview::default()
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "TokenReview failed.");
                AuthError::Unavailable
            })?;
        tracing::debug!(elapsed = ?started.elapsed(), "TokenReview done.");
        Ok(reviewed.status.unwrap_or_default())
    }

    /// The ServiceAccount, pod name and pod UID of an authenticated review.
    fn reviewed_pod(
        &self,
        status: &TokenReviewStatus,
    ) -> Result<(ServiceAccountRef, String, String), AuthError> {
        let refuse = |why: &str| {
            tracing::debug!(reason = why, error = ?status.error, "Token refused.");
            AuthError::Unauthenticated
        };
        if status.authenticated != Some(true) {
            return Err(refuse("not authenticated"));
        }
        if let Some(auds) = status.audiences.as_ref().filter(|a| !a.is_empty())
            && !auds.contains(&self.audience)
        {
            return Err(refuse("wrong audience"));
        }
        let user = status.user.as_ref().ok_or_else(|| refuse("no user"))?;
        let sa = user
            .username
            .as_deref()
            .and_then(parse_service_account_username)
            .ok_or_else(|| refuse("not a service account"))?;
        let extra = |key: &str| {
            user.extra
                .as_ref()
                .and_then(|e| e.get(key))
                .and_then(|v| v.first())
                .filter(|v| !v.is_empty())
                .cloned()
        };
        let pod_name = extra(POD_NAME_EXTRA).ok_or_else(|| refuse("not bound to a pod"))?;
        let pod_uid = extra(POD_UID_EXTRA).ok_or_else(|| refuse("not bound to a pod"))?;
        Ok((sa, pod_name, pod_uid))
    }

    /// Whether a pod of `context` runs on `node`, or was deleted less than the grace period ago.
    /// The namespace of a pod of `context` on `node` (see [`NodeIndex::runs`]), `None` if no
    /// pod of it runs there.
    pub fn node_runs(&self, node: &str, context: &Context) -> Option<String> {
        self.index
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .runs(node, context.as_str(), Instant::now())
            .map(str::to_owned)
    }
}

/// Keeps `index` current from a watch of the pods with a workflow label; sets `ready` after the
/// first complete list.
async fn watch_pods(client: Client, index: Arc<Mutex<NodeIndex>>, ready: watch::Sender<bool>) {
    let config = watcher::Config::default()
        .labels(labels::WORKFLOW)
        .any_semantic();
    let mut events = std::pin::pin!(watcher(Api::<Pod>::all(client), config).default_backoff());
    while let Some(event) = events.next().await {
        let event = match event {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "Pod watch failed; retrying.");
                continue;
            }
        };
        let now = Instant::now();
        let mut index = index.lock().unwrap_or_else(PoisonError::into_inner);
        match event {
            watcher::Event::Init => index.relist_start(),
            watcher::Event::InitApply(pod) | watcher::Event::Apply(pod) => {
                if let Some(uid) = pod.metadata.uid.as_deref() {
                    let context = pod.metadata.labels.as_ref().and_then(context_for_labels);
                    let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
                    let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
                    index.apply(uid, namespace, context, node, now);
                }
            }
            watcher::Event::Delete(pod) => {
                if let Some(uid) = pod.metadata.uid.as_deref() {
                    index.delete(uid, now);
                }
            }
            watcher::Event::InitDone => {
                index.relist_done(now);
                ready.send_replace(true);
            }
        }
        index.prune(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_account_usernames() {
        let sa = |ns: &str, name: &str| ServiceAccountRef {
            namespace: ns.into(),
            name: name.into(),
        };
        assert_eq!(
            parse_service_account_username("system:serviceaccount:tenant:default"),
            Some(sa("tenant", "default"))
        );
        assert_eq!(
            parse_service_account_username("system:serviceaccount:relay-system:relay-collector"),
            Some(sa("relay-system", "relay-collector"))
        );
        for bad in [
            "system:serviceaccount:tenant",
            "system:serviceaccount::x",
            "system:serviceaccount:x:",
            "system:serviceaccount:a:b:c",
            "system:node:n1",
            "admin",
            "",
        ] {
            assert_eq!(parse_service_account_username(bad), None, "{bad:?}");
        }
        assert_eq!(
            "relay-system:relay-collector".parse::<ServiceAccountRef>(),
            Ok(sa("relay-system", "relay-collector"))
        );
        assert!("nocolon".parse::<ServiceAccountRef>().is_err());
    }

    #[test]
    fn cache_expiry() {
        let now = Instant::now();
        let wall = UNIX_EPOCH + Duration::from_secs(1_000_000);
        // Refusals: briefly.
        assert_eq!(
            cache_until(false, Some(2_000_000), now, wall),
            now + FAILURE_TTL
        );
        // Successes: until exp when that is sooner than the cap.
        assert_eq!(
            cache_until(true, Some(1_000_060), now, wall),
            now + Duration::from_secs(60)
        );
        assert_eq!(
            cache_until(true, Some(2_000_000), now, wall),
            now + MAX_SUCCESS_TTL
        );
        assert_eq!(cache_until(true, None, now, wall), now + MAX_SUCCESS_TTL);
        // Already expired: not cached at all.
        assert_eq!(cache_until(true, Some(999_000), now, wall), now);

        let cache = TokenCache::new(4);
        let key = TokenCache::key("t");
        let ctx = Context::stream("workflows/w/triggers/t").unwrap();
        cache.insert(
            key,
            Ok(Identity::Pod {
                context: ctx.clone(),
                namespace: "tenant".into(),
                pod: "p".into(),
            }),
            now + Duration::from_secs(60),
        );
        assert_eq!(
            cache.get(&key, now),
            Some(Ok(Identity::Pod {
                context: ctx,
                namespace: "tenant".into(),
                pod: "p".into(),
            }))
        );
        assert_eq!(cache.get(&key, now + Duration::from_secs(60)), None);
        // The expired entry is gone, not just hidden.
        assert_eq!(cache.get(&key, now), None);
        assert_eq!(cache.get(&TokenCache::key("other"), now), None);
        // Bounded: far more entries than capacity leave at most about capacity behind.
        for i in 0..100 {
            cache.insert(
                TokenCache::key(&i.to_string()),
                Err(AuthError::Unauthenticated),
                now + FAILURE_TTL,
            );
        }
        assert!(cache.entries.len() <= 8, "{}", cache.entries.len());
    }

    #[test]
    fn token_exp_is_read_unverified() {
        // {"alg":"none"}.{"exp":1234}.sig
        let token = "eyJhbGciOiJub25lIn0.eyJleHAiOjEyMzR9.c2ln";
        assert_eq!(token_exp(token), Some(1234));
        assert_eq!(token_exp("not a jwt"), None);
    }

    #[test]
    fn node_index_keeps_deleted_pods_for_the_grace_period() {
        let grace = Duration::from_secs(900);
        let t0 = Instant::now();
        let mut ix = NodeIndex::new(grace);
        let ctx = "workflows/w/runs/r/steps/s";
        ix.apply("u1", "ns", Some(ctx.into()), Some("n1".into()), t0);
        ix.apply("u2", "ns", Some("workflows/w/triggers/t".into()), None, t0);
        assert_eq!(ix.runs("n1", ctx, t0), Some("ns"));
        assert!(ix.runs("n2", ctx, t0).is_none());
        // Unscheduled pods are on no node.
        assert!(ix.runs("n1", "workflows/w/triggers/t", t0).is_none());
        ix.delete("u1", t0 + Duration::from_secs(10));
        assert_eq!(
            ix.runs("n1", ctx, t0 + Duration::from_secs(10) + grace / 2),
            Some("ns")
        );
        ix.prune(t0 + Duration::from_secs(11) + grace);
        assert!(
            ix.runs("n1", ctx, t0 + Duration::from_secs(11) + grace)
                .is_none()
        );
        assert!(ix.by_context.is_empty() && ix.context_of.is_empty());

        // A relist that misses a pod counts it as deleted then.
        ix.apply("u3", "ns", Some(ctx.into()), Some("n1".into()), t0);
        ix.relist_start();
        ix.apply("u4", "ns", Some(ctx.into()), Some("n2".into()), t0);
        let t1 = t0 + Duration::from_secs(100);
        ix.relist_done(t1);
        assert_eq!(
            ix.runs("n1", ctx, t1 + grace - Duration::from_secs(1)),
            Some("ns")
        );
        ix.prune(t1 + grace);
        assert!(ix.runs("n1", ctx, t1 + grace).is_none());
        assert_eq!(ix.runs("n2", ctx, t1 + grace), Some("ns"));

        // Relabelled pods move to their new context.
        ix.apply(
            "u4",
            "other",
            Some("workflows/x/triggers/t".into()),
            Some("n2".into()),
            t1,
        );
        assert!(ix.runs("n2", ctx, t1).is_none());
        assert_eq!(ix.runs("n2", "workflows/x/triggers/t", t1), Some("other"));
    }
}

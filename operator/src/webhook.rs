//! The mutating admission webhook: wraps the containers of new pods in tenant namespaces with the
//! log-shipping entrypoint ([`crate::mutate`]), over HTTPS with a certificate that is reloaded
//! when the TLS upkeep ([`crate::webhook_tls`]) renews it.
//!
//! Answers come from memory: the tenants from a reflector [`Store`], image entrypoints from an
//! [`ImageLookup`] and the key names of Secrets a container takes whole through `envFrom` (for
//! its `RELAY_REDACT_ENV` list) from a [`SecretKeyLookup`], both concurrently and bounded by
//! deadlines well under the API server's webhook timeout. Only pod
//! `CREATE` is mutated; everything else is allowed unchanged. A review that cannot be read is
//! answered as invalid (or with a 400 when it carries no request uid to answer), never with a
//! panic. When the webhook cannot decide (the tenant cache has not synced, an internal error) it
//! answers with an HTTP error, so the webhook's `failurePolicy` decides.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use futures::StreamExt;
use futures::future::BoxFuture;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use k8s_openapi::api::core::v1::{Container, ObjectReference, Pod, Secret};
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use kube::core::{DynamicObject, ObjectMeta};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::controller;
use crate::crd::Tenant;
use crate::mutate::{self, ImageCommand, Injection, SkipReason};
use crate::tls::WebhookTls;

/// The path the API server posts reviews to (`clientConfig.service.path` in
/// `deploy/base/webhook.yaml`).
pub const MUTATE_PATH: &str = "/mutate-pods";
/// Reporting controller name of the webhook's Events.
pub const EVENT_REPORTER: &str = "relay-operator-webhook";
/// Event reason: a pod was admitted unwrapped (or refused) because its tenant's tools are not
/// ready.
pub const REASON_TOOLS_NOT_READY: &str = "ToolsNotReady";
/// Event reason: containers were left unwrapped because their image's entrypoint could not be
/// looked up.
pub const REASON_IMAGE_LOOKUP_FAILED: &str = "ImageLookupFailed";
/// Event reason: the keys of a Secret that wrapped containers take whole through `envFrom` could
/// not be read, so their values are not redacted from captured logs.
pub const REASON_SECRET_KEYS_UNKNOWN: &str = "SecretKeysUnknown";

/// How the webhook mutates and what it accepts.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// Metadata API base URL as pods reach it (`RELAY_METADATA_API_URL`).
    pub api_url: String,
    /// Audience of the projected ServiceAccount token (the metadata API's).
    pub audience: String,
    /// Path of the projected token in wrapped containers.
    pub token_path: String,
    /// Refuse pods of a tenant whose tools are not ready, instead of admitting them unwrapped.
    pub deny_when_not_ready: bool,
    /// Deadline for looking up all of a pod's images; keep it well under the webhook's
    /// `timeoutSeconds` (5 s in `deploy/base/webhook.yaml`).
    pub image_lookup_timeout: Duration,
    /// Deadline for reading the key names of a pod's `envFrom` Secrets, concurrently with the
    /// image lookups; a Secret not read by then lists no keys.
    pub secret_lookup_timeout: Duration,
    /// How long a review waits for the tenant cache's first sync before answering with 503.
    pub cache_sync_timeout: Duration,
    /// Largest review body accepted (413 beyond).
    pub max_body_bytes: usize,
    /// How long a client may take for the TLS handshake.
    pub tls_handshake_timeout: Duration,
}

impl WebhookConfig {
    /// The defaults: token at [`mutate::DEFAULT_TOKEN_PATH`], admit unwrapped when tools are not
    /// ready, 3 s image lookup deadline, 2 s Secret lookup deadline, 1 s cache sync wait, 4 MiB
    /// bodies, 10 s handshakes.
    pub fn new(api_url: impl Into<String>, audience: impl Into<String>) -> Self {
        Self {
            api_url: api_url.into(),
            audience: audience.into(),
            token_path: mutate::DEFAULT_TOKEN_PATH.to_owned(),
            deny_when_not_ready: false,
            image_lookup_timeout: Duration::from_secs(3),
            secret_lookup_timeout: Duration::from_secs(2),
            cache_sync_timeout: Duration::from_secs(1),
            max_body_bytes: 4 << 20,
            tls_handshake_timeout: Duration::from_secs(10),
        }
    }

    fn injection(&self, claim_name: &str) -> Injection {
        Injection {
            claim_name: claim_name.to_owned(),
            api_url: self.api_url.clone(),
            audience: self.audience.clone(),
            token_path: self.token_path.clone(),
        }
    }
}

/// Looks up the `ENTRYPOINT` and `CMD` of images, for containers without `command`.
pub trait ImageLookup: Send + Sync + 'static {
    /// The command of each of `images` (distinct references, as written in `pod`'s containers),
    /// resolved concurrently, with `pod`'s pull secrets and ServiceAccount. An image missing from
    /// the map counts as failed. The webhook bounds the whole call by
    /// [`WebhookConfig::image_lookup_timeout`].
    fn lookup<'a>(
        &'a self,
        pod: &'a Pod,
        images: Vec<String>,
    ) -> BoxFuture<'a, HashMap<String, Result<ImageCommand, String>>>;
}

/// An [`ImageLookup`] for running without registry access: every lookup fails, so containers
/// without `command` stay unwrapped.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoImageLookup;

impl ImageLookup for NoImageLookup {
    fn lookup<'a>(
        &'a self,
        _pod: &'a Pod,
        images: Vec<String>,
    ) -> BoxFuture<'a, HashMap<String, Result<ImageCommand, String>>> {
        let failed = images
            .into_iter()
            .map(|image| (image, Err("image lookup disabled".to_owned())))
            .collect();
        Box::pin(futures::future::ready(failed))
    }
}

/// The key names of each looked-up Secret, or why they are unknown.
pub type SecretKeys = HashMap<String, Result<Vec<String>, String>>;

/// Reads the key names of Secrets, for the `RELAY_REDACT_ENV` list of containers that take all of
/// a Secret's keys through `envFrom` without a prefix ([`mutate::secrets_to_read`]).
pub trait SecretKeyLookup: Send + Sync + 'static {
    /// The key names of each of `names` (distinct Secrets in `namespace`), read concurrently. A
    /// Secret missing from the map counts as failed. The webhook bounds the whole call by
    /// [`WebhookConfig::secret_lookup_timeout`]. Only key names leave it, never values.
    fn keys<'a>(&'a self, namespace: &'a str, names: Vec<String>) -> BoxFuture<'a, SecretKeys>;
}

/// A [`SecretKeyLookup`] reading the Secrets from the API server (`get secrets` in the pods'
/// namespaces).
#[derive(Clone)]
pub struct ApiSecretKeys {
    pub client: Client,
}

impl fmt::Debug for ApiSecretKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiSecretKeys").finish_non_exhaustive()
    }
}

impl SecretKeyLookup for ApiSecretKeys {
    fn keys<'a>(&'a self, namespace: &'a str, names: Vec<String>) -> BoxFuture<'a, SecretKeys> {
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        Box::pin(async move {
            let reads = names.into_iter().map(|name| {
                let secrets = secrets.clone();
                async move {
                    let keys = match secrets.get_opt(&name).await {
                        // The values go out of scope here, unread.
                        Ok(Some(secret)) => Ok(secret
                            .data
                            .into_iter()
                            .flat_map(|d| d.into_keys())
                            .chain(secret.string_data.into_iter().flat_map(|d| d.into_keys()))
                            .collect()),
                        Ok(None) => Err("not found".to_owned()),
                        Err(e) => Err(e.to_string()),
                    };
                    (name, keys)
                }
            });
            futures::future::join_all(reads).await.into_iter().collect()
        })
    }
}

/// A [`SecretKeyLookup`] for running without reading Secrets: every lookup fails, so Secrets
/// taken whole through `envFrom` list no keys.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoSecretKeyLookup;

impl SecretKeyLookup for NoSecretKeyLookup {
    fn keys<'a>(&'a self, _namespace: &'a str, names: Vec<String>) -> BoxFuture<'a, SecretKeys> {
        let failed = names
            .into_iter()
            .map(|name| (name, Err("secret lookup disabled".to_owned())))
            .collect();
        Box::pin(futures::future::ready(failed))
    }
}

/// What became of one admission review.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Containers were wrapped; the response carries a patch.
    Mutated,
    /// Allowed as it came: not a pod CREATE, no tenant, already injected, nothing to wrap.
    Unchanged,
    /// Admitted unwrapped because the tenant's tools are not ready.
    NotReady,
    /// Refused because the tenant's tools are not ready ([`WebhookConfig::deny_when_not_ready`]).
    Denied,
    /// The review could not be read.
    Invalid,
    /// The webhook could not decide (answered with an HTTP error).
    Error,
}

impl Outcome {
    /// A stable name, for metric labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Mutated => "mutated",
            Self::Unchanged => "unchanged",
            Self::NotReady => "not_ready",
            Self::Denied => "denied",
            Self::Invalid => "invalid",
            Self::Error => "error",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// The webhook's Prometheus metrics. Clones share the same series.
#[derive(Debug, Clone)]
pub struct WebhookMetrics {
    admissions: Family<OutcomeLabels, Counter>,
    skipped: Family<ReasonLabels, Counter>,
    latency: Histogram,
}

impl Default for WebhookMetrics {
    fn default() -> Self {
        Self {
            admissions: Family::default(),
            skipped: Family::default(),
            // 0.5 ms .. ~4 s
            latency: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
        }
    }
}

impl WebhookMetrics {
    /// Registers the metrics under the `relay_operator_webhook` prefix of `registry`:
    /// `relay_operator_webhook_admissions_total{outcome}`,
    /// `relay_operator_webhook_skipped_containers_total{reason}` and
    /// `relay_operator_webhook_admission_duration_seconds`.
    pub fn register(&self, registry: &mut Registry) {
        let sub = registry.sub_registry_with_prefix("relay_operator_webhook");
        sub.register(
            "admissions",
            "Admission reviews answered, by outcome",
            self.admissions.clone(),
        );
        sub.register(
            "skipped_containers",
            "Containers of mutated pods left unwrapped, by reason",
            self.skipped.clone(),
        );
        sub.register(
            "admission_duration_seconds",
            "Time to answer an admission review",
            self.latency.clone(),
        );
    }

    /// Reviews answered with `outcome` so far.
    pub fn admissions(&self, outcome: Outcome) -> u64 {
        self.admissions
            .get_or_create(&OutcomeLabels {
                outcome: outcome.as_str(),
            })
            .get()
    }

    /// Containers skipped for `reason` so far.
    pub fn skipped(&self, reason: SkipReason) -> u64 {
        self.skipped
            .get_or_create(&ReasonLabels {
                reason: reason.as_str(),
            })
            .get()
    }
}

/// A reflector store of all tenants and the future that keeps it current (run it on the
/// runtime; it ends only when the process does).
pub fn tenant_reflector(client: Client) -> (Store<Tenant>, impl Future<Output = ()> + Send) {
    let (store, writer) = reflector::store();
    let stream = reflector::reflector(
        writer,
        watcher(Api::<Tenant>::all(client), watcher::Config::default()).default_backoff(),
    );
    let run = stream.for_each(|event| {
        if let Err(e) = event {
            tracing::warn!(error = %e, "tenant watch failed; retrying");
        }
        futures::future::ready(())
    });
    (store, run)
}

/// The webhook's state: configuration, the tenant cache, the image and Secret lookups, Events,
/// metrics.
pub struct Webhook {
    config: WebhookConfig,
    tenants: Store<Tenant>,
    images: Arc<dyn ImageLookup>,
    secrets: Arc<dyn SecretKeyLookup>,
    events: Recorder,
    metrics: WebhookMetrics,
}

impl fmt::Debug for Webhook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Webhook")
            .field("config", &self.config)
            .field("tenants", &self.tenants.len())
            .field("metrics", &self.metrics)
            .finish_non_exhaustive()
    }
}

/// The answer to one review, before it becomes an HTTP response.
#[derive(Debug)]
pub enum Reply {
    /// 200 with this review.
    Review(Box<AdmissionReview<DynamicObject>>),
    /// An HTTP error: the request could not be answered with a review.
    Status(StatusCode, String),
}

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        match self {
            Self::Review(review) => axum::Json(*review).into_response(),
            Self::Status(code, message) => (code, message).into_response(),
        }
    }
}

/// Failed lookups that left something out of a mutation, described for an Event.
#[derive(Debug, Default)]
struct Failures {
    /// Images of containers left unwrapped.
    images: Vec<String>,
    /// `envFrom` Secrets of wrapped containers whose keys are not listed.
    secrets: Vec<String>,
}

/// An event to publish about a tenant.
struct Note {
    reason: &'static str,
    message: String,
}

impl Webhook {
    /// A webhook answering from `tenants`, looking images up with `images` and the keys of
    /// `envFrom` Secrets with `secrets` (for example [`ApiSecretKeys`]), and publishing Events
    /// with `events` (for example `Recorder::new(client, EVENT_REPORTER.into())`).
    pub fn new(
        config: WebhookConfig,
        tenants: Store<Tenant>,
        images: Arc<dyn ImageLookup>,
        secrets: Arc<dyn SecretKeyLookup>,
        events: Recorder,
        metrics: WebhookMetrics,
    ) -> Self {
        Self {
            config,
            tenants,
            images,
            secrets,
            events,
            metrics,
        }
    }

    /// The metrics this webhook updates.
    pub fn metrics(&self) -> &WebhookMetrics {
        &self.metrics
    }

    /// Answers one review body, records its outcome and latency, and publishes its Events in
    /// the background.
    pub async fn review(&self, body: &[u8]) -> Reply {
        let started = Instant::now();
        let (outcome, reply) = self.decide(body).await;
        self.metrics
            .admissions
            .get_or_create(&OutcomeLabels {
                outcome: outcome.as_str(),
            })
            .inc();
        self.metrics
            .latency
            .observe(started.elapsed().as_secs_f64());
        reply
    }

    async fn decide(&self, body: &[u8]) -> (Outcome, Reply) {
        let review: AdmissionReview<DynamicObject> = match serde_json::from_slice(body) {
            Ok(review) => review,
            Err(e) => {
                tracing::warn!(error = %e, "unreadable admission review");
                return bad_request(format!("not an AdmissionReview: {e}"));
            }
        };
        let types = review.types.clone();
        let request: AdmissionRequest<DynamicObject> = match review.try_into() {
            Ok(request) => request,
            Err(_) => return bad_request("AdmissionReview without a request".to_owned()),
        };
        let invalid = |message: String| {
            tracing::warn!(uid = %request.uid, %message, "invalid admission review");
            let mut response = AdmissionResponse::invalid(&message);
            response.uid = request.uid.clone();
            (Outcome::Invalid, review_reply(response))
        };
        if types.kind != "AdmissionReview" || types.api_version != "admission.k8s.io/v1" {
            return invalid(format!(
                "expected an admission.k8s.io/v1 AdmissionReview, got {} {}",
                types.api_version, types.kind
            ));
        }
        if !(request.kind.group.is_empty() && request.kind.kind == "Pod") {
            return invalid(format!(
                "this webhook reviews pods, not {}/{} {}",
                request.kind.group, request.kind.version, request.kind.kind
            ));
        }
        let allow = AdmissionResponse::from(&request);
        if request.operation != Operation::Create || request.sub_resource.is_some() {
            return (Outcome::Unchanged, review_reply(allow));
        }
        let Some(object) = request.object.as_ref() else {
            return invalid("pod CREATE without an object".to_owned());
        };
        let pod: Pod = match serde_json::to_value(object).and_then(serde_json::from_value) {
            Ok(pod) => pod,
            Err(e) => return invalid(format!("object is not a pod: {e}")),
        };
        let Some(namespace) = request
            .namespace
            .clone()
            .or_else(|| pod.metadata.namespace.clone())
            .filter(|ns| !ns.is_empty())
        else {
            return invalid("pod CREATE without a namespace".to_owned());
        };
        let pod_name = pod_display_name(&pod.metadata, &request.name);
        // The operator's own tools Job pods fill the tools volume: they run before the tools are
        // ready (and must, also when not-ready pods are denied) and are never wrapped.
        if pod.labels().contains_key(controller::TENANT_UID_LABEL) {
            return (Outcome::Unchanged, review_reply(allow));
        }

        if tokio::time::timeout(
            self.config.cache_sync_timeout,
            self.tenants.wait_until_ready(),
        )
        .await
        .is_err()
        {
            tracing::warn!(%namespace, pod = %pod_name, "tenant cache not synced yet");
            return (
                Outcome::Error,
                Reply::Status(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "tenant cache not synced yet".to_owned(),
                ),
            );
        }
        let Some(tenant) = self.tenant_of(&namespace) else {
            return (Outcome::Unchanged, review_reply(allow));
        };
        let Some(claim) = tenant.usable_tools_claim() else {
            let tenant_name = tenant.name_any();
            if self.config.deny_when_not_ready {
                let message = format!(
                    "pod {namespace}/{pod_name} refused: the tools of tenant {tenant_name} are \
                     not ready yet, and the operator is set to refuse pods until they are"
                );
                tracing::info!(%namespace, pod = %pod_name, "refused: tools not ready");
                return (Outcome::Denied, review_reply(allow.deny(message)));
            }
            tracing::info!(%namespace, pod = %pod_name, "admitted unwrapped: tools not ready");
            self.publish(
                &tenant,
                &namespace,
                &pod_name,
                Note {
                    reason: REASON_TOOLS_NOT_READY,
                    message: format!(
                        "pod {pod_name} admitted without log-shipping entrypoint: the tools of \
                         tenant {tenant_name} are not ready"
                    ),
                },
            );
            return (Outcome::NotReady, review_reply(allow));
        };

        let injection = self.config.injection(claim);
        let mutation = match self.mutate(&pod, &injection, &namespace, &pod_name).await {
            Ok((mutation, failures)) => {
                if !failures.secrets.is_empty() {
                    self.publish(
                        &tenant,
                        &namespace,
                        &pod_name,
                        Note {
                            reason: REASON_SECRET_KEYS_UNKNOWN,
                            message: format!(
                                "pod {pod_name}: values of Secrets taken whole through envFrom \
                                 are not redacted from captured logs, their keys could not be \
                                 read: {}",
                                failures.secrets.join("; ")
                            ),
                        },
                    );
                }
                let failures = failures.images;
                if !failures.is_empty() {
                    self.publish(
                        &tenant,
                        &namespace,
                        &pod_name,
                        Note {
                            reason: REASON_IMAGE_LOOKUP_FAILED,
                            message: format!(
                                "pod {pod_name}: containers left without log-shipping \
                                 entrypoint, their image's entrypoint is unknown: {}",
                                failures.join("; ")
                            ),
                        },
                    );
                }
                mutation
            }
            Err(e) => {
                tracing::error!(%namespace, pod = %pod_name, error = %e, "cannot mutate pod");
                return (
                    Outcome::Error,
                    Reply::Status(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
                );
            }
        };
        for skipped in &mutation.skipped {
            self.metrics
                .skipped
                .get_or_create(&ReasonLabels {
                    reason: skipped.reason.as_str(),
                })
                .inc();
        }
        if mutation.patch.0.is_empty() {
            return (Outcome::Unchanged, review_reply(allow));
        }
        match allow.with_patch(mutation.patch) {
            Ok(response) => {
                tracing::debug!(%namespace, pod = %pod_name, "pod mutated");
                (Outcome::Mutated, review_reply(response))
            }
            Err(e) => (
                Outcome::Error,
                Reply::Status(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            ),
        }
    }

    /// Mutates `pod`, first without lookups to learn which images it needs, then, if it needs
    /// images or the keys of `envFrom` Secrets, with the looked-up commands and keys (both looked
    /// up concurrently). Also returns a description of each failed lookup that matters: images of
    /// containers left unwrapped, Secrets of wrapped containers.
    async fn mutate(
        &self,
        pod: &Pod,
        injection: &Injection,
        namespace: &str,
        pod_name: &str,
    ) -> Result<(mutate::Mutation, Failures), mutate::MutateError> {
        let mut wanted: BTreeSet<String> = BTreeSet::new();
        let first = {
            let asked = std::cell::RefCell::new(BTreeSet::new());
            let record = |c: &Container| {
                if let Some(image) = c.image.as_ref().filter(|i| !i.is_empty()) {
                    asked.borrow_mut().insert(image.clone());
                }
                None
            };
            let first = mutate::mutate(pod, injection, &record, &|_| None)?;
            wanted.append(&mut asked.borrow_mut());
            first
        };
        let secrets = mutate::secrets_to_read(pod);
        if wanted.is_empty() && secrets.is_empty() {
            return Ok((first, Failures::default()));
        }
        let (results, keys) = tokio::join!(
            self.lookup_images(pod, namespace, wanted),
            self.lookup_secret_keys(namespace, secrets),
        );
        let resolve = |c: &Container| {
            c.image
                .as_ref()
                .and_then(|i| results.get(i))
                .and_then(|r| r.as_ref().ok())
                .cloned()
        };
        let secret_keys = |name: &str| keys.get(name).and_then(|r| r.as_ref().ok()).cloned();
        let mutation = mutate::mutate(pod, injection, &resolve, &secret_keys)?;
        let containers = || pod.spec.iter().flat_map(|spec| &spec.containers);
        let images: Vec<String> = mutation
            .skipped
            .iter()
            .filter(|s| s.reason == SkipReason::UnresolvedImage)
            .map(|s| {
                let image = containers()
                    .find(|c| c.name == s.container)
                    .and_then(|c| c.image.clone())
                    .unwrap_or_default();
                let error = match results.get(&image) {
                    Some(Err(e)) => e.clone(),
                    Some(Ok(_)) => "resolved".to_owned(),
                    None => "no answer from the image lookup".to_owned(),
                };
                tracing::info!(
                    %namespace, pod = %pod_name, container = %s.container, %image, %error,
                    "container left unwrapped: image lookup failed"
                );
                format!("container {} (image {image}): {error}", s.container)
            })
            .collect();
        let mut secrets = Vec::new();
        if !mutation.patch.0.is_empty() {
            let wrapped =
                containers().filter(|c| !mutation.skipped.iter().any(|s| s.container == c.name));
            for c in wrapped {
                let mut seen = BTreeSet::new();
                for secret in mutate::unprefixed_secret_refs(c).filter(|s| seen.insert(*s)) {
                    let error = match keys.get(secret) {
                        Some(Ok(_)) => continue,
                        Some(Err(e)) => e.clone(),
                        None => "no answer from the secret lookup".to_owned(),
                    };
                    tracing::info!(
                        %namespace, pod = %pod_name, container = %c.name, %secret, %error,
                        "keys of an envFrom secret unknown: its values are not redacted"
                    );
                    secrets.push(format!("container {} (secret {secret}): {error}", c.name));
                }
            }
        }
        Ok((mutation, Failures { images, secrets }))
    }

    /// The commands of `images`, bounded by [`WebhookConfig::image_lookup_timeout`].
    async fn lookup_images(
        &self,
        pod: &Pod,
        namespace: &str,
        images: BTreeSet<String>,
    ) -> HashMap<String, Result<ImageCommand, String>> {
        if images.is_empty() {
            return HashMap::new();
        }
        let images: Vec<String> = images.into_iter().collect();
        let timeout = self.config.image_lookup_timeout;
        // The review's object often has no namespace; the lookup needs it for pull secrets.
        let mut placed = pod.clone();
        placed
            .metadata
            .namespace
            .get_or_insert_with(|| namespace.to_owned());
        match tokio::time::timeout(timeout, self.images.lookup(&placed, images.clone())).await {
            Ok(results) => results,
            Err(_) => images
                .into_iter()
                .map(|i| (i, Err(format!("lookup timed out after {timeout:?}"))))
                .collect(),
        }
    }

    /// The key names of `names` in `namespace`, bounded by
    /// [`WebhookConfig::secret_lookup_timeout`].
    async fn lookup_secret_keys(&self, namespace: &str, names: BTreeSet<String>) -> SecretKeys {
        if names.is_empty() {
            return HashMap::new();
        }
        let names: Vec<String> = names.into_iter().collect();
        let timeout = self.config.secret_lookup_timeout;
        match tokio::time::timeout(timeout, self.secrets.keys(namespace, names.clone())).await {
            Ok(keys) => keys,
            Err(_) => names
                .into_iter()
                .map(|n| (n, Err(format!("lookup timed out after {timeout:?}"))))
                .collect(),
        }
    }

    /// The tenant of `namespace`: the first by name when there are several.
    fn tenant_of(&self, namespace: &str) -> Option<Arc<Tenant>> {
        self.tenants
            .state()
            .into_iter()
            .filter(|t| t.namespace().as_deref() == Some(namespace))
            .min_by(|a, b| a.name_any().cmp(&b.name_any()))
    }

    /// Publishes a warning Event on `tenant` about the pod, in the background.
    fn publish(&self, tenant: &Tenant, namespace: &str, pod_name: &str, note: Note) {
        let regarding = tenant.object_ref(&());
        let pod = ObjectReference {
            api_version: Some("v1".to_owned()),
            kind: Some("Pod".to_owned()),
            namespace: Some(namespace.to_owned()),
            name: Some(pod_name.to_owned()),
            ..Default::default()
        };
        let event = Event {
            type_: EventType::Warning,
            reason: note.reason.to_owned(),
            note: Some(note.message),
            action: "AdmitPod".to_owned(),
            secondary: Some(pod),
        };
        let recorder = self.events.clone();
        tokio::spawn(async move {
            if let Err(e) = recorder.publish(&event, &regarding).await {
                tracing::warn!(error = %e, reason = %event.reason, "cannot publish event");
            }
        });
    }
}

fn review_reply(response: AdmissionResponse) -> Reply {
    Reply::Review(Box::new(response.into_review()))
}

fn bad_request(message: String) -> (Outcome, Reply) {
    (
        Outcome::Invalid,
        Reply::Status(StatusCode::BAD_REQUEST, message),
    )
}

/// The pod's name, or its `generateName` followed by `*` when the API server has not named it
/// yet.
fn pod_display_name(meta: &ObjectMeta, request_name: &str) -> String {
    meta.name
        .clone()
        .filter(|n| !n.is_empty())
        .or_else(|| Some(request_name.to_owned()).filter(|n| !n.is_empty()))
        .or_else(|| meta.generate_name.as_ref().map(|g| format!("{g}*")))
        .unwrap_or_else(|| "<unnamed>".to_owned())
}

async fn mutate_handler(State(webhook): State<Arc<Webhook>>, body: Bytes) -> Reply {
    webhook.review(&body).await
}

/// The webhook's routes: `POST` [`MUTATE_PATH`], with the body limit of the configuration.
pub fn router(webhook: Arc<Webhook>) -> Router {
    let limit = webhook.config.max_body_bytes;
    Router::new()
        .route(MUTATE_PATH, post(mutate_handler))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(webhook)
}

/// Why the webhook server stopped or could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("invalid TLS material: {0}")]
    Material(String),
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("accepting connections: {0}")]
    Accept(#[from] std::io::Error),
}

/// The serving certificate the TLS handshakes see, swapped when the material changes.
#[derive(Debug)]
struct ReloadingCert {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().map(|key| Arc::clone(&key))
    }
}

fn certified_key(tls: &WebhookTls, provider: &CryptoProvider) -> Result<CertifiedKey, ServeError> {
    let certs = CertificateDer::pem_slice_iter(tls.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ServeError::Material(format!("certificate: {e}")))?;
    if certs.is_empty() {
        return Err(ServeError::Material("no certificate".to_owned()));
    }
    let key = PrivateKeyDer::from_pem_slice(tls.key_pem.as_bytes())
        .map_err(|e| ServeError::Material(format!("private key: {e}")))?;
    Ok(CertifiedKey::from_der(certs, key, provider)?)
}

/// Whether `tls`'s serving certificate and key load into rustls and belong together.
pub(crate) fn material_loads(tls: &WebhookTls) -> bool {
    certified_key(tls, &rustls::crypto::aws_lc_rs::default_provider()).is_ok()
}

/// Serves the webhook over HTTPS (HTTP/1.1 and HTTP/2) on `listener` until `shutdown`
/// completes, then waits up to 10 s for open connections to finish.
///
/// The certificate is `tls`'s current value and follows its changes: new handshakes get a new
/// certificate as soon as it is sent. Material that does not parse is logged and ignored (the
/// previous certificate stays); at start it is an error.
pub async fn serve(
    listener: TcpListener,
    mut tls: watch::Receiver<WebhookTls>,
    webhook: Arc<Webhook>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let initial = certified_key(&tls.borrow_and_update(), &provider)?;
    let cert = Arc::new(ReloadingCert {
        current: RwLock::new(Arc::new(initial)),
    });
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(cert.clone());
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(config));

    let reload = {
        let provider = Arc::clone(&provider);
        async move {
            while tls.changed().await.is_ok() {
                let material = tls.borrow_and_update().clone();
                match certified_key(&material, &provider) {
                    Ok(key) => {
                        if let Ok(mut current) = cert.current.write() {
                            *current = Arc::new(key);
                            tracing::info!("webhook serving certificate reloaded");
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "new webhook certificate rejected; keeping the old one");
                    }
                }
            }
        }
    };
    let reload = tokio::spawn(reload);

    let service = TowerToHyperService::new(router(Arc::clone(&webhook)));
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    let handshake_timeout = webhook.config.tls_handshake_timeout;
    let mut shutdown = std::pin::pin!(shutdown);
    let result = loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) if is_transient(&e) => {
                    tracing::warn!(error = %e, "accept failed; continuing");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                Err(e) => break Err(ServeError::Accept(e)),
            },
            () = &mut shutdown => break Ok(()),
        };
        let acceptor = acceptor.clone();
        let service = service.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let conn = builder.serve_connection(TokioIo::new(tls), service);
            if let Err(e) = watcher.watch(conn.into_owned()).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    };
    reload.abort();
    if tokio::time::timeout(Duration::from_secs(10), graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("webhook connections still open after 10 s; closing");
    }
    result
}

/// Errors of `accept` that concern one connection or a momentary shortage, not the listener.
fn is_transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock
    ) || e
        .raw_os_error()
        .is_some_and(|code| code == 24 || code == 23) // EMFILE, ENFILE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_name_falls_back_to_generate_name() {
        let named = ObjectMeta {
            name: Some("p".to_owned()),
            ..Default::default()
        };
        assert_eq!(pod_display_name(&named, ""), "p");
        let generated = ObjectMeta {
            generate_name: Some("job-".to_owned()),
            ..Default::default()
        };
        assert_eq!(pod_display_name(&generated, ""), "job-*");
        assert_eq!(pod_display_name(&generated, "from-request"), "from-request");
        assert_eq!(pod_display_name(&ObjectMeta::default(), ""), "<unnamed>");
    }

    #[tokio::test]
    async fn no_image_lookup_fails_every_image() {
        let pod = Pod::default();
        let got = NoImageLookup
            .lookup(&pod, vec!["a".to_owned(), "b".to_owned()])
            .await;
        assert_eq!(got.len(), 2);
        for image in ["a", "b"] {
            assert_eq!(
                got.get(image),
                Some(&Err("image lookup disabled".to_owned()))
            );
        }
    }

    #[tokio::test]
    async fn no_secret_key_lookup_fails_every_secret() {
        let got = NoSecretKeyLookup
            .keys("ns", vec!["a".to_owned(), "b".to_owned()])
            .await;
        assert_eq!(got.len(), 2);
        for name in ["a", "b"] {
            assert_eq!(
                got.get(name),
                Some(&Err("secret lookup disabled".to_owned()))
            );
        }
    }
}

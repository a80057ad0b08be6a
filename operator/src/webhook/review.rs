//! Answering one admission review: read it, find the pod's tenant, mutate the pod with what the
//! lookups found ([`crate::mutate`]), count what became of it ([`Outcome`]), and tell the tenant in
//! an Event what was left out.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use k8s_openapi::api::core::v1::{Container, ObjectReference, Pod};
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use kube::core::{DynamicObject, ObjectMeta};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::Store;
use kube::{Resource, ResourceExt};

use super::{
    ImageLookup, REASON_IMAGE_LOOKUP_FAILED, REASON_SECRET_KEYS_UNKNOWN, REASON_TOOLS_NOT_READY,
    SecretKeyLookup, WebhookConfig, WebhookMetrics,
};
use crate::controller;
use crate::crd::Tenant;
use crate::mutate::{self, Injection, SkipReason};

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

/// The webhook's state: configuration, the tenant cache, the image and Secret lookups, Events,
/// metrics.
pub struct Webhook {
    pub(super) config: WebhookConfig,
    pub(super) tenants: Store<Tenant>,
    pub(super) images: Arc<dyn ImageLookup>,
    pub(super) secrets: Arc<dyn SecretKeyLookup>,
    pub(super) events: Recorder,
    pub(super) metrics: WebhookMetrics,
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
    /// `envFrom` Secrets with `secrets` (for example [`ApiSecretKeys`](super::ApiSecretKeys)),
    /// and publishing Events with `events` (for example
    /// `Recorder::new(client, EVENT_REPORTER.into())`).
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
        self.metrics.record_admission(outcome, started.elapsed());
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
            self.metrics.record_skipped(skipped.reason);
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
}

//! AdmissionReview bodies through the webhook's own review handling (`Webhook::review`, what
//! `POST /mutate-pods` calls), with a ready tenant in `tenant-a`, a tenant whose tools are not
//! ready in `tenant-b`, and image lookups answered from the image names (see
//! `operator_fuzz::image_command`).
//!
//! Checked, beyond not panicking:
//! - a body that is not an AdmissionReview with a request gets a 400, anything else a review
//!   answering the request's uid (a pod without a spec: a 500, so the failure policy decides);
//! - the review carries a patch exactly when pod mutation changes the pod: a ready tenant's pod
//!   CREATE, not the operator's own tools Job pods;
//! - the patch is the one `mutate` makes, which passes `operator_fuzz::check_mutation` (applied
//!   to the pod's JSON it gives the mutated pod; same command run; idempotent; nothing else
//!   touched).
#![no_main]

use std::{collections::HashMap, sync::Arc, sync::OnceLock, time::Duration};

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Client,
    core::{
        DynamicObject,
        admission::{AdmissionRequest, AdmissionReview, Operation},
    },
    runtime::{events::Recorder, reflector, watcher},
};
use libfuzzer_sys::fuzz_target;
use operator::{
    controller::TENANT_UID_LABEL,
    crd::{Tenant, TenantSpec, TenantStatus},
    mutate::{self, ImageCommand},
    webhook::{
        EVENT_REPORTER, ImageLookup, NoSecretKeyLookup, Reply, Webhook, WebhookConfig,
        WebhookMetrics,
    },
};
use operator_fuzz::{API_URL, AUDIENCE, CLAIM, NAMESPACE, NOT_READY_NAMESPACE};

/// Answers every image from its name.
struct Images;

impl ImageLookup for Images {
    fn lookup<'a>(
        &'a self,
        _pod: &'a Pod,
        images: Vec<String>,
    ) -> BoxFuture<'a, HashMap<String, Result<ImageCommand, String>>> {
        let found = images
            .into_iter()
            .map(|image| {
                let command =
                    operator_fuzz::image_command(&image).ok_or_else(|| "unknown image".to_owned());
                (image, command)
            })
            .collect();
        Box::pin(futures::future::ready(found))
    }
}

struct Harness {
    rt: tokio::runtime::Runtime,
    webhook: Webhook,
    /// Kept, so the tenant store stays as it is.
    _tenants: reflector::store::Writer<Tenant>,
}

fn tenant(namespace: &str, claim: Option<&str>) -> Tenant {
    let mut t = Tenant::new("tenant", TenantSpec::default());
    t.metadata.namespace = Some(namespace.to_owned());
    t.status = Some(TenantStatus {
        tools_volume_claim: claim.map(str::to_owned),
        ..TenantStatus::default()
    });
    t
}

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        let (store, mut writer) = reflector::store::<Tenant>();
        writer.apply_watcher_event(&watcher::Event::Init);
        writer.apply_watcher_event(&watcher::Event::InitApply(tenant(NAMESPACE, Some(CLAIM))));
        writer.apply_watcher_event(&watcher::Event::InitApply(tenant(
            NOT_READY_NAMESPACE,
            None,
        )));
        writer.apply_watcher_event(&watcher::Event::InitDone);
        // Events go to an API server that refuses them at once.
        let client = rt.block_on(async {
            let api = tower::service_fn(|_req: http::Request<kube::client::Body>| async {
                let mut resp = http::Response::new(kube::client::Body::from(Vec::new()));
                *resp.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
                Ok::<_, std::convert::Infallible>(resp)
            });
            Client::new(api, "default")
        });
        let mut config = WebhookConfig::new(API_URL, AUDIENCE);
        config.cache_sync_timeout = Duration::from_secs(5);
        let webhook = Webhook::new(
            config,
            store,
            Arc::new(Images),
            Arc::new(NoSecretKeyLookup),
            Recorder::new(client, EVENT_REPORTER.into()),
            WebhookMetrics::default(),
        );
        Harness {
            rt,
            webhook,
            _tenants: writer,
        }
    })
}

/// Whether the webhook must hand `request` to pod mutation (see `Webhook::review`).
fn mutable(
    review_kind: (&str, &str),
    request: &AdmissionRequest<DynamicObject>,
    pod: &Pod,
) -> bool {
    let namespace = request
        .namespace
        .clone()
        .or_else(|| pod.metadata.namespace.clone())
        .unwrap_or_default();
    review_kind == ("admission.k8s.io/v1", "AdmissionReview")
        && request.kind.group.is_empty()
        && request.kind.kind == "Pod"
        && request.operation == Operation::Create
        && request.sub_resource.is_none()
        && namespace == NAMESPACE
        && !pod
            .metadata
            .labels
            .as_ref()
            .is_some_and(|l| l.contains_key(TENANT_UID_LABEL))
}

fuzz_target!(|data: &[u8]| {
    let h = harness();
    let reply = h.rt.block_on(h.webhook.review(data));

    let review: AdmissionReview<DynamicObject> = match serde_json::from_slice(data) {
        Ok(review) => review,
        Err(_) => {
            assert!(
                matches!(reply, Reply::Status(http::StatusCode::BAD_REQUEST, _)),
                "an unreadable review answered {reply:?}"
            );
            return;
        }
    };
    let kind = (review.types.api_version.clone(), review.types.kind.clone());
    let request: Result<AdmissionRequest<DynamicObject>, _> = review.try_into();
    let Ok(request) = request else {
        assert!(
            matches!(reply, Reply::Status(http::StatusCode::BAD_REQUEST, _)),
            "a review without a request answered {reply:?}"
        );
        return;
    };
    // The pod as the webhook reads it.
    let pod: Option<Pod> = request.object.as_ref().and_then(|o| {
        serde_json::to_value(o)
            .and_then(serde_json::from_value)
            .ok()
    });
    let wanted = pod
        .as_ref()
        .is_some_and(|pod| mutable((&kind.0, &kind.1), &request, pod));
    let mutation = pod.as_ref().filter(|_| wanted).map(|pod| {
        mutate::mutate(
            pod,
            &operator_fuzz::injection(),
            &operator_fuzz::resolve,
            &|_| None,
        )
    });

    let review = match reply {
        Reply::Review(review) => review,
        Reply::Status(code, message) => {
            assert!(
                code == http::StatusCode::INTERNAL_SERVER_ERROR
                    && matches!(mutation, Some(Err(mutate::MutateError::MissingSpec))),
                "a readable review answered {code}: {message}"
            );
            return;
        }
    };
    let response = review.response.expect("a review answers with a response");
    assert_eq!(response.uid, request.uid, "answered another request");
    let Some(patch) = response.patch else {
        if let Some(Ok(m)) = &mutation {
            assert!(
                m.patch.0.is_empty(),
                "not patched, but mutate patches {:?}",
                m.patch
            );
        }
        return;
    };
    assert!(response.allowed, "a patch on a refusal");
    let Some(Ok(m)) = mutation else {
        panic!("patched a request that is not a ready tenant's pod CREATE: {request:?}");
    };
    let pod = pod.expect("a mutated pod");
    let patch: json_patch::Patch = serde_json::from_slice(&patch).expect("the patch is JSON Patch");
    assert_eq!(patch, m.patch, "the webhook's patch is not the mutation's");

    // The API server applies the patch to the object in its own encoding, which for every field
    // the operator knows is the pod's JSON: `check_mutation` applies it there. (Not to the input's
    // text: a field the fuzzer left out, such as `mountPath`, is always there in what an API
    // server sends.)
    operator_fuzz::check_mutation(&pod, &m);
});

//! `--auth kubernetes` against the real kube-apiserver test bed: bound ServiceAccount tokens from
//! TokenRequest, checked by the real binary with TokenReview, over real HTTP.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use common::kube_bed::{AUDIENCE, Bed, TENANT, knative_labels, tekton_labels};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::Api as KubeResource;
use metadata_api::auth::Scope;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use testbed::kube::SERVICE_ACCOUNT_ISSUER;

const STEP_CTX: &str = "workflows/w1/runs/r1/steps/build";
const TRIGGER_CTX: &str = "workflows/w1/triggers/sync-1";

async fn status_of(r: reqwest::Response) -> (StatusCode, Value) {
    let status = r.status();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Creates a stream and returns the status and body.
async fn create_stream(api: &common::Api, body: Value) -> (StatusCode, Value) {
    status_of(api.create(body).await).await
}

/// A bound-token-shaped JWT for `pod` of `tenant/runner`, signed ES256 with `key_pem` (PKCS#8).
fn signed_token(key_pem: &str, pod: &str, uid: &str, sa_uid: &str, exp: u64) -> String {
    let b64 = base64::engine::general_purpose::STANDARD;
    let body: String = key_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    let der = b64.decode(body).unwrap();
    let key = jsonwebtoken::EncodingKey::from_ec_der(&der);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = json!({
        "aud": [AUDIENCE],
        "iss": SERVICE_ACCOUNT_ISSUER,
        "sub": format!("system:serviceaccount:{TENANT}:runner"),
        "iat": now - 7200,
        "nbf": now - 7200,
        "exp": exp,
        "kubernetes.io": {
            "namespace": TENANT,
            "pod": {"name": pod, "uid": uid},
            "serviceaccount": {"name": "runner", "uid": sa_uid},
        },
    });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256),
        &claims,
        &key,
    )
    .unwrap()
}

#[tokio::test]
async fn pod_tokens_write_only_their_own_context() {
    let Some(bed) = Bed::start(&[]).await else {
        return;
    };
    let step_uid = bed
        .pod(TENANT, "step", "runner", "n1", tekton_labels("r1", "build"))
        .await;
    let trigger_uid = bed
        .pod(TENANT, "trigger", "runner", "n1", knative_labels())
        .await;
    let plain_uid = bed.pod(TENANT, "plain", "runner", "n1", json!({})).await;

    // A Tekton step pod writes into its context, and only there.
    let token = bed
        .token(TENANT, "runner", "step", &step_uid, AUDIENCE)
        .await;
    let step = bed.http(&token);
    // It says it is another pod: the token's word counts.
    let (status, body) = create_stream(&step, json!({"name": "stdout", "pod": "impostor"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["context"], STEP_CTX);
    let id = body["id"].as_str().unwrap().to_owned();
    step.put_at(&id, 0, b"hello\n").await;
    // The stream records the namespace its pod runs in (the tenant its budget is charged to, and
    // whose RBAC says who reads it), and the pod's name.
    let status = step.status(&id).await;
    assert_eq!(status["namespace"], TENANT);
    assert_eq!(status["pod"], "step");
    // Latency: a fresh token's first request (TokenReview and pod read), the same token cached,
    // and an HMAC token of the same context for comparison.
    let get_status = |api: common::Api, id: String| async move {
        let started = Instant::now();
        let r = api
            .req(Method::GET, &format!("/logs/{id}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        started.elapsed()
    };
    let fresh = bed.http(
        &bed.token(TENANT, "runner", "step", &step_uid, AUDIENCE)
            .await,
    );
    let reviewed = get_status(fresh.clone(), id.clone()).await;
    let rounds = 100;
    let mut cached = Duration::ZERO;
    let mut hmac = Duration::ZERO;
    let hmac_api = bed.http(&bed.api.token(STEP_CTX, Scope::Write));
    for _ in 0..rounds {
        cached += get_status(fresh.clone(), id.clone()).await;
        hmac += get_status(hmac_api.clone(), id.clone()).await;
    }
    eprintln!(
        "GET /logs/{{id}}: first with a new token (TokenReview + pod read) {reviewed:?}, \
         cached {:?}, HMAC token {:?}",
        cached / rounds,
        hmac / rounds
    );
    let (status, _) = create_stream(&step, json!({"name": "stdout", "context": TRIGGER_CTX})).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = create_stream(
        &step,
        json!({"name": "stdout", "source": "ebpf", "context": STEP_CTX}),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // A Knative trigger pod writes into its trigger context.
    let token = bed
        .token(TENANT, "runner", "trigger", &trigger_uid, AUDIENCE)
        .await;
    let trigger = bed.http(&token);
    let (status, body) = create_stream(&trigger, json!({"name": "stdout"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["context"], TRIGGER_CTX);
    let (status, _) = create_stream(&trigger, json!({"name": "stdout", "context": STEP_CTX})).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // ... and cannot see the step's stream.
    let (status, _) = status_of(
        trigger
            .req(Method::GET, &format!("/logs/{id}"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // A pod without the labels: authenticated, but nothing to write to.
    let token = bed
        .token(TENANT, "runner", "plain", &plain_uid, AUDIENCE)
        .await;
    let (status, body) = create_stream(&bed.http(&token), json!({"name": "stdout"})).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("labels"),
        "{body}"
    );

    // Wrong audience.
    let token = bed
        .token(TENANT, "runner", "step", &step_uid, "some-other-service")
        .await;
    let (status, body) = create_stream(&bed.http(&token), json!({"name": "stdout"})).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["message"], "a valid bearer token is required");

    // A token of the API server's own signing key: accepted while valid (so the shape is right),
    // refused once expired; the same claims under another key are refused.
    let key_pem = std::fs::read_to_string(bed.kube.service_account_signing_key_path()).unwrap();
    let sa_uid = KubeResource::<ServiceAccount>::namespaced(bed.client.clone(), TENANT)
        .get("runner")
        .await
        .unwrap()
        .metadata
        .uid
        .unwrap();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let valid = signed_token(&key_pem, "step", &step_uid, &sa_uid, now + 600);
    let (status, body) = create_stream(&bed.http(&valid), json!({"name": "stderr"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let expired = signed_token(&key_pem, "step", &step_uid, &sa_uid, now - 60);
    let (status, _) = create_stream(&bed.http(&expired), json!({"name": "stderr"})).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let other_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let forged = signed_token(
        &other_key.serialize_pem(),
        "step",
        &step_uid,
        &sa_uid,
        now + 600,
    );
    let (status, _) = create_stream(&bed.http(&forged), json!({"name": "stderr"})).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = create_stream(&bed.http("not-a-token"), json!({"name": "stderr"})).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // A token bound to a pod that was deleted: the TokenReview refuses it.
    let doomed_uid = bed
        .pod(
            TENANT,
            "doomed",
            "runner",
            "n1",
            tekton_labels("r1", "doomed"),
        )
        .await;
    let doomed = bed
        .token(TENANT, "runner", "doomed", &doomed_uid, AUDIENCE)
        .await;
    bed.delete_pod(TENANT, "doomed").await;
    let (status, _) = create_stream(&bed.http(&doomed), json!({"name": "stdout"})).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // HMAC read tokens minted from the key file still read.
    let reader = bed.http(&bed.api.token("workflows/w1", Scope::Read));
    let r = reader
        .req(Method::GET, "/api/workflows/w1/runs/r1/steps/build/logs")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let text = r.text().await.unwrap();
    assert!(text.contains("hello"), "{text}");
}

#[tokio::test]
async fn collector_tokens_write_only_for_pods_on_their_node() {
    let grace = Duration::from_secs(4);
    let Some(bed) = Bed::start(&["--deleted-pod-grace", "4s"]).await else {
        return;
    };
    let collector_uid = bed
        .pod(
            "relay-system",
            "collector-n1",
            "relay-collector",
            "n1",
            json!({}),
        )
        .await;
    bed.pod(TENANT, "step-a", "runner", "n1", tekton_labels("r1", "a"))
        .await;
    bed.pod(TENANT, "step-b", "runner", "n2", tekton_labels("r1", "b"))
        .await;
    let ctx_a = "workflows/w1/runs/r1/steps/a";
    let ctx_b = "workflows/w1/runs/r1/steps/b";
    let token = bed
        .token(
            "relay-system",
            "relay-collector",
            "collector-n1",
            &collector_uid,
            AUDIENCE,
        )
        .await;
    let collector = bed.http(&token);
    let ebpf = |ctx: &str, name: &str| json!({"name": name, "source": "ebpf", "context": ctx});

    // The API watches pods: wait until it has seen step-a (created after it started).
    let deadline = Instant::now() + Duration::from_secs(30);
    let id = loop {
        let (status, body) = create_stream(&collector, ebpf(ctx_a, "stdout")).await;
        if status == StatusCode::OK {
            break body["id"].as_str().unwrap().to_owned();
        }
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
        assert!(Instant::now() < deadline, "step-a never became writable");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    collector.put_at(&id, 0, b"captured\n").await;
    // Not the collector's namespace: that of the pod whose output it captured.
    assert_eq!(collector.status(&id).await["namespace"], TENANT);
    // step-b is on another node (and has been listed: step-a, created later, was seen).
    let (status, body) = create_stream(&collector, ebpf(ctx_b, "stdout")).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    // Not entrypoint streams, even on its node.
    let (status, _) = create_stream(
        &collector,
        json!({"name": "x", "source": "entrypoint", "context": ctx_a}),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // After step-a is deleted, the collector may still ship its output for the grace period,
    // and no longer after it.
    bed.delete_pod(TENANT, "step-a").await;
    let deleted = Instant::now();
    let deadline = deleted + grace + Duration::from_secs(30);
    let mut n = 0;
    let refused_at = loop {
        n += 1;
        let (status, body) = create_stream(&collector, ebpf(ctx_a, &format!("late-{n}"))).await;
        match status {
            StatusCode::OK => {
                // The grace may run out between the create and the append: the append is then
                // refused like a write to any stream the token may not reach (404).
                let r = collector
                    .patch(
                        body["id"].as_str().unwrap(),
                        "bytes 0-4/*",
                        b"late\n".to_vec(),
                    )
                    .await;
                match r.status() {
                    StatusCode::ACCEPTED => {}
                    StatusCode::NOT_FOUND => break Instant::now(),
                    other => panic!("unexpected {other}: {}", r.text().await.unwrap()),
                }
            }
            StatusCode::FORBIDDEN => break Instant::now(),
            other => panic!("unexpected {other}: {body}"),
        }
        assert!(
            Instant::now() < deadline,
            "deleted pod's context never expired"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(n > 1, "refused right after the deletion");
    assert!(
        refused_at.duration_since(deleted) >= grace,
        "refused {:?} after the deletion, before the grace period ended",
        refused_at.duration_since(deleted)
    );
    // Appending to the stream it made earlier is refused now too.
    let r = collector
        .patch(&id, "bytes 9-13/*", b"more\n".to_vec())
        .await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
}

/// A person reads a step's logs with their own token while RBAC lets them `get pods/log` in the
/// pod's namespace; once the RoleBinding is gone, within the API's 10 s answer cache, they no
/// longer do. Prints what the TokenReview and SubjectAccessReview cost a read.
#[tokio::test]
async fn people_read_by_their_rbac_and_lose_access_when_it_is_revoked() {
    use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
    use kube::api::{DeleteParams, PostParams};

    let Some(bed) = Bed::start(&[]).await else {
        return;
    };
    let step_uid = bed
        .pod(TENANT, "step", "runner", "n1", tekton_labels("r1", "build"))
        .await;
    let step = bed.http(
        &bed.token(TENANT, "runner", "step", &step_uid, AUDIENCE)
            .await,
    );
    let id = step.stream("stdout").await;
    step.put_at(&id, 0, b"built\n").await;

    let role: Role = serde_json::from_value(json!({
        "metadata": {"name": "logs"},
        "rules": [{"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]}],
    }))
    .unwrap();
    KubeResource::<Role>::namespaced(bed.client.clone(), TENANT)
        .create(&PostParams::default(), &role)
        .await
        .unwrap();
    let bindings = KubeResource::<RoleBinding>::namespaced(bed.client.clone(), TENANT);
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "bob-logs"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "logs"},
        "subjects": [{"kind": "User", "name": "bob", "apiGroup": "rbac.authorization.k8s.io"}],
    }))
    .unwrap();
    bindings
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();

    let bob = bed.http(&bed.kube.user_token("bob"));
    let logs = "/api/workflows/w1/runs/r1/steps/build/logs";
    let read = |api: common::Api| async move {
        let started = Instant::now();
        let r = api.req(Method::GET, logs).send().await.unwrap();
        let status = r.status();
        (status, r.text().await.unwrap(), started.elapsed())
    };
    // RBAC takes a moment to see a new binding: the first allowed answer.
    let deadline = Instant::now() + Duration::from_secs(30);
    let first = loop {
        let (status, body, took) = read(bob.clone()).await;
        if status == StatusCode::OK {
            assert_eq!(body, "built\n");
            break took;
        }
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
        assert!(Instant::now() < deadline, "bob never got to read");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let rounds = 100;
    let mut cached = Duration::ZERO;
    let mut hmac = Duration::ZERO;
    let reader = bed.http(&bed.api.token("workflows/w1", Scope::Read));
    for _ in 0..rounds {
        let (status, _, took) = read(bob.clone()).await;
        assert_eq!(status, StatusCode::OK);
        cached += took;
        let (status, _, took) = read(reader.clone()).await;
        assert_eq!(status, StatusCode::OK);
        hmac += took;
    }
    eprintln!(
        "GET step logs as a person: first (TokenReview + SubjectAccessReview) {first:?}, cached \
         {:?}, HMAC read token {:?}",
        cached / rounds,
        hmac / rounds
    );

    bindings
        .delete("bob-logs", &DeleteParams::default())
        .await
        .unwrap();
    let revoked = Instant::now();
    let deadline = revoked + Duration::from_secs(30);
    loop {
        let (status, body, _) = read(bob.clone()).await;
        if status == StatusCode::NOT_FOUND {
            break;
        }
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(
            Instant::now() < deadline,
            "bob still reads 30 s after the revocation"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("revoked after {:?}", revoked.elapsed());
    // The stream by id is as closed to him as the step's logs.
    let r = bob
        .req(Method::GET, &format!("/logs/{id}/data"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
}

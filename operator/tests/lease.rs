//! Leader election on a real API server's Lease: one holder at a time, hand-over on release and
//! on expiry.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::client;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use operator::lease::{Elector, LeaseConfig};
use testbed::kube::KubeApi;

fn config(identity: &str) -> LeaseConfig {
    let mut config = LeaseConfig::new("default", "relay-operator-test", identity);
    config.lease_duration = Duration::from_secs(2);
    config.renew_deadline = Duration::from_millis(1500);
    config.renew_every = Duration::from_millis(200);
    config
}

async fn holder(client: &kube::Client) -> Option<String> {
    Api::<Lease>::namespaced(client.clone(), "default")
        .get("relay-operator-test")
        .await
        .ok()?
        .spec?
        .holder_identity
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_holder_at_a_time_with_hand_over_on_release_and_expiry() {
    let Some(kube) = tokio::task::spawn_blocking(KubeApi::start_or_skip)
        .await
        .unwrap()
    else {
        return;
    };
    let client = client(&kube).await;
    let mut a = Elector::new(client.clone(), config("a"));
    let mut b = Elector::new(client.clone(), config("b"));

    assert!(
        a.try_acquire_or_renew().await.unwrap(),
        "a takes a free lease"
    );
    assert!(
        !b.try_acquire_or_renew().await.unwrap(),
        "b cannot take a held lease"
    );
    assert!(a.try_acquire_or_renew().await.unwrap(), "a renews");
    assert_eq!(holder(&client).await.as_deref(), Some("a"));

    // Released: b takes over at once.
    a.release().await.unwrap();
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), b.acquire())
        .await
        .expect("b takes the released lease");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(holder(&client).await.as_deref(), Some("b"));

    // b holds and renews in the background; a cannot take it while it does.
    let holding = tokio::spawn(async move {
        b.hold().await;
        b
    });
    let deadline = Instant::now() + Duration::from_secs(4);
    while Instant::now() < deadline {
        assert!(
            !a.try_acquire_or_renew().await.unwrap(),
            "a took a renewed lease"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // b stops renewing (crashed): a takes over once a whole lease duration passed unrenewed.
    holding.abort();
    let stopped = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !a.try_acquire_or_renew().await.unwrap() {
        assert!(
            Instant::now() < deadline,
            "a did not take the expired lease"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        stopped.elapsed() >= Duration::from_secs(2),
        "{:?}",
        stopped.elapsed()
    );
    assert_eq!(holder(&client).await.as_deref(), Some("a"));
    let lease = Api::<Lease>::namespaced(client.clone(), "default")
        .get("relay-operator-test")
        .await
        .unwrap();
    assert_eq!(lease.spec.unwrap().lease_transitions, Some(2));
}

//! The operator keeps the collector DaemonSet applied on a real API server: created with the
//! configured image, restored when changed or deleted, never re-rolled by a no-op apply.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{client, wait_for};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use operator::daemonset::{self, CollectorConfig};
use serde_json::json;
use testbed::kube::KubeApi;

const WAIT: Duration = Duration::from_secs(30);

fn image(ds: &DaemonSet) -> Option<String> {
    ds.spec.as_ref()?.template.spec.as_ref()?.containers[0]
        .image
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_collector_daemonset_is_applied_restored_and_left_alone_when_unchanged() {
    let Some(kube) = tokio::task::spawn_blocking(KubeApi::start_or_skip)
        .await
        .unwrap()
    else {
        return;
    };
    let client = client(&kube).await;
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "relay-system"}})).unwrap(),
        )
        .await
        .unwrap();
    let mut config = CollectorConfig::new("relay-system", "relay/collector:1.2.3");
    config.extra_args = vec!["--poll-interval".to_owned(), "5ms".to_owned()];
    config.resync = Duration::from_millis(300);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(daemonset::run(client.clone(), config, async move {
        let _ = stopped.await;
    }));
    let api = Api::<DaemonSet>::namespaced(client.clone(), "relay-system");

    let created = wait_for("the DaemonSet", WAIT, || async {
        api.get_opt("relay-collector").await.unwrap()
    })
    .await;
    assert_eq!(image(&created).as_deref(), Some("relay/collector:1.2.3"));
    let args = created
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0]
        .args
        .clone()
        .unwrap();
    assert!(
        args.ends_with(&["--poll-interval".to_owned(), "5ms".to_owned()]),
        "{args:?}"
    );

    // Resyncs apply the same object: the generation (a rollout) does not move.
    let generation = created.metadata.generation;
    let version = created.metadata.resource_version.clone();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let later = api.get("relay-collector").await.unwrap();
    assert_eq!(later.metadata.generation, generation);
    assert_eq!(later.metadata.resource_version, version);

    // Someone changes the image: restored.
    api.patch(
        "relay-collector",
        &PatchParams::default(),
        &Patch::Strategic(json!({"spec": {"template": {"spec": {"containers": [
            {"name": "collector", "image": "evil/collector:latest"}]}}}})),
    )
    .await
    .unwrap();
    wait_for("the image to be restored", WAIT, || async {
        let ds = api.get("relay-collector").await.unwrap();
        (image(&ds).as_deref() == Some("relay/collector:1.2.3")).then_some(())
    })
    .await;

    // Deleted: created again.
    api.delete("relay-collector", &DeleteParams::default())
        .await
        .unwrap();
    wait_for("the DaemonSet to come back", WAIT, || async {
        let ds = api.get_opt("relay-collector").await.unwrap()?;
        (ds.metadata.uid != created.metadata.uid).then_some(())
    })
    .await;

    stop.send(()).unwrap();
    tokio::time::timeout(WAIT, task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

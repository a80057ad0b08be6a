//! The node's pods, and with a namespace selector the selected namespaces, kept current by `kube`
//! reflectors: the only part of attribution that talks to the API server. [`PodIndex::lookup`]
//! finds a container cgroup's pod by UID and asks [`super::selection`] whether it is captured and
//! [`super::pod`] who the container is.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::{StreamExt, TryStreamExt, future};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use kube::runtime::reflector::{self, ObjectRef, Store, store::WriterDropped};
use kube::runtime::{WatchStreamExt, watcher};
use tracing::{Instrument, debug, info, info_span, warn};

use super::{
    cgroup_path::ContainerCgroup,
    pod::{Attribution, attribute, context_for_pod},
    selection::{Selection, is_dns_subdomain},
};

/// A [`PodIndex`] that cannot start or become ready.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid node name {node:?}")]
    Node { node: String },
    #[error("cannot list the pods of node {node}")]
    List {
        node: String,
        // Boxed: kube's error is large and this is a cold path.
        #[source]
        source: Box<kube::Error>,
    },
    #[error("cannot list the namespaces")]
    ListNamespaces {
        #[source]
        source: Box<kube::Error>,
    },
    #[error("the {watch} watch stopped before its first list completed")]
    WatchStopped {
        /// `pod` or `namespace`.
        watch: &'static str,
        #[source]
        source: WriterDropped,
    },
}

/// Drops what the index does not need and keeps unselected objects out of it. An object that
/// changes so that it is no longer selected becomes a delete, so the store forgets it.
fn filter_event<K: kube::Resource>(
    event: watcher::Event<K>,
    selects: impl Fn(&K) -> bool,
) -> Option<watcher::Event<K>> {
    let event = event.modify(|object| object.meta_mut().managed_fields = None);
    match event {
        watcher::Event::Apply(object) if !selects(&object) => Some(watcher::Event::Delete(object)),
        watcher::Event::InitApply(object) if !selects(&object) => None,
        event => Some(event),
    }
}

/// The names of the selected namespaces as the namespace watch reported them, to tell when one is
/// added: a namespace that becomes selected, or one a relist brings.
#[derive(Debug, Default)]
struct NamespaceNames {
    current: HashSet<String>,
    /// Collected between a relist's `Init` and `InitDone`.
    relist: Option<HashSet<String>>,
}

/// What one event changed in the set of selected namespaces (names sorted).
#[derive(Debug, Default, PartialEq, Eq)]
struct NamespaceChanges {
    added: Vec<String>,
    removed: Vec<String>,
}

impl NamespaceNames {
    /// Follows one (filtered) event.
    fn apply(&mut self, event: &watcher::Event<Namespace>) -> NamespaceChanges {
        let mut changes = NamespaceChanges::default();
        match event {
            watcher::Event::Apply(ns) => {
                let name = ns.name_any();
                if self.current.insert(name.clone()) {
                    changes.added.push(name);
                }
            }
            watcher::Event::Delete(ns) => {
                let name = ns.name_any();
                if self.current.remove(&name) {
                    changes.removed.push(name);
                }
            }
            watcher::Event::Init => self.relist = Some(HashSet::new()),
            watcher::Event::InitApply(ns) => {
                self.relist
                    .get_or_insert_with(HashSet::new)
                    .insert(ns.name_any());
            }
            watcher::Event::InitDone => {
                let listed = self.relist.take().unwrap_or_default();
                changes.added = listed.difference(&self.current).cloned().collect();
                changes.removed = self.current.difference(&listed).cloned().collect();
                changes.added.sort_unstable();
                changes.removed.sort_unstable();
                self.current = listed;
            }
        }
        changes
    }
}

/// Why [`PodIndex::lookup`] has no attribution for a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Miss {
    /// Not known yet, or never attributable; ask again until the attribution hold ends.
    NotYet,
    /// Its pod is known and its namespace not selected: not attributable until a namespace is
    /// added.
    NamespaceNotSelected,
    /// Its pod is known, selected, and has no log context (neither a Tekton step nor a Knative
    /// trigger by its labels, e.g. the operator's tools Job): never attributable.
    NoContext,
}

/// The selected pods of one node, kept current by a `kube` reflector, and with a namespace
/// selector the selected namespaces, kept current by a second one.
///
/// Lookups scan the store for the pod UID under its read lock and clone one `Arc`: a node holds
/// at most the kubelet's `maxPods` (110 by default), and lookups happen once per new container
/// cgroup, not per write, so a second index keyed by UID would cost more in consistency (it must
/// follow the reflector's relists) than it saves.
#[derive(Debug, Clone)]
pub struct PodIndex {
    store: Store<Pod>,
    /// `Some` with a namespace selector.
    namespaces: Option<Store<Namespace>>,
    selection: Arc<Selection>,
    namespaces_added: Arc<AtomicU64>,
}

impl PodIndex {
    /// Checks that `client` may list the pods of `node` (and, with a namespace selector, the
    /// namespaces), then returns the index and the future that keeps it current. The caller spawns
    /// the future; it runs until dropped, retrying a failed watch with backoff and logging each
    /// failure.
    pub async fn start(
        client: kube::Client,
        node: &str,
        selection: Selection,
    ) -> Result<(Self, impl Future<Output = ()> + Send + 'static), Error> {
        // A node name is a DNS subdomain; checking it keeps the field selector well formed.
        if !is_dns_subdomain(node) {
            return Err(Error::Node {
                node: node.to_owned(),
            });
        }
        let selection = Arc::new(selection);
        let api: Api<Pod> = Api::all(client.clone());
        let fields = format!("spec.nodeName={node}");
        let labels = selection.label_selector().to_string();
        // Fail at start on RBAC or connection problems, which the watcher would retry forever.
        api.list_metadata(
            &ListParams::default()
                .fields(&fields)
                .labels(&labels)
                .limit(1),
        )
        .await
        .map_err(|source| Error::List {
            node: node.to_owned(),
            source: Box::new(source),
        })?;
        let namespaces_added = Arc::new(AtomicU64::new(0));
        let namespace_watch = match selection.namespace_selector() {
            Some(selector) => Some(
                watch_namespaces(
                    Api::all(client),
                    selector.to_string(),
                    selection.clone(),
                    namespaces_added.clone(),
                )
                .await?,
            ),
            None => None,
        };
        let (namespaces, namespace_driver) = namespace_watch.unzip();

        let config = watcher::Config::default()
            .fields(&fields)
            .labels(&labels)
            // List from the API server's watch cache, as client-go informers (the kubelet's
            // too) do: a DaemonSet relisting from etcd on every node at once is heavy.
            .any_semantic();
        let (store, writer) = reflector::store();
        let filter = selection.clone();
        let events = watcher(api, config)
            .default_backoff()
            .try_filter_map(move |event| {
                future::ready(Ok(filter_event(event, |pod| filter.selects(pod))))
            })
            .reflect(writer);
        let pod_driver = async move {
            let mut events = std::pin::pin!(events);
            while let Some(event) = events.next().await {
                match event {
                    Ok(watcher::Event::InitDone) => debug!("Listed pods."),
                    Ok(_) => {}
                    Err(error) => {
                        warn!(
                            error = &error as &dyn std::error::Error,
                            "Pod watch failed; retrying."
                        )
                    }
                }
            }
            warn!("Pod watch ended.");
        }
        .instrument(info_span!("pod_watch", node));
        let driver = async move {
            match namespace_driver {
                Some(namespace_driver) => {
                    future::join(pod_driver, namespace_driver).await;
                }
                None => pod_driver.await,
            }
        };
        Ok((
            Self {
                store,
                namespaces,
                selection,
                namespaces_added,
            },
            driver,
        ))
    }

    /// Waits until the first list of pods (and of namespaces) is in the index. Errors when the
    /// driver future was dropped before that.
    pub async fn wait_ready(&self) -> Result<(), Error> {
        self.store
            .wait_until_ready()
            .await
            .map_err(|source| Error::WatchStopped {
                watch: "pod",
                source,
            })?;
        if let Some(namespaces) = &self.namespaces {
            namespaces
                .wait_until_ready()
                .await
                .map_err(|source| Error::WatchStopped {
                    watch: "namespace",
                    source,
                })?;
        }
        Ok(())
    }

    /// Who a container cgroup writes for. [`Miss::NotYet`] when its pod is not known (yet, or
    /// at all: pods the pod selector leaves out are not in the index) or has not (yet) reported
    /// the container's id; [`Miss::NamespaceNotSelected`] when the pod is known but its namespace
    /// is not selected (now: see [`PodIndex::namespaces_added`]); [`Miss::NoContext`] when the
    /// pod's labels give no log context (they are set when Tekton or Knative create the pod).
    pub fn lookup(&self, cgroup: &ContainerCgroup) -> Result<Attribution, Miss> {
        let pod = self
            .store
            .find(|pod| pod.metadata.uid.as_deref() == Some(cgroup.pod_uid.as_str()))
            .ok_or(Miss::NotYet)?;
        let namespace = match (&self.namespaces, pod.metadata.namespace.as_deref()) {
            (Some(namespaces), Some(name)) => namespaces.get(&ObjectRef::new(name)),
            _ => None,
        };
        if !self.selection.selects_in(&pod, namespace.as_deref()) {
            return Err(Miss::NamespaceNotSelected);
        }
        if context_for_pod(&pod).is_none() {
            return Err(Miss::NoContext);
        }
        attribute(&pod, &cgroup.container_id).ok_or(Miss::NotYet)
    }

    /// How many times a namespace became selected since the start (the first list included): a
    /// change of this number means pods that were not attributable may be now.
    pub fn namespaces_added(&self) -> u64 {
        self.namespaces_added.load(Ordering::Relaxed)
    }
}

/// Checks that `api` may list namespaces, then returns the store of the selected ones and the
/// future that keeps it current, counting namespaces added in `added`.
async fn watch_namespaces(
    api: Api<Namespace>,
    labels: String,
    selection: Arc<Selection>,
    added: Arc<AtomicU64>,
) -> Result<(Store<Namespace>, impl Future<Output = ()> + Send + 'static), Error> {
    api.list_metadata(&ListParams::default().labels(&labels).limit(1))
        .await
        .map_err(|source| Error::ListNamespaces {
            source: Box::new(source),
        })?;
    let config = watcher::Config::default().labels(&labels).any_semantic();
    let (store, writer) = reflector::store();
    let events = watcher(api, config)
        .default_backoff()
        .try_filter_map(move |event| {
            future::ready(Ok(filter_event(event, |ns| {
                selection.selects_namespace(ns)
            })))
        })
        .reflect(writer);
    let driver = async move {
        let mut events = std::pin::pin!(events);
        let mut names = NamespaceNames::default();
        while let Some(event) = events.next().await {
            match event {
                Ok(event) => {
                    let changes = names.apply(&event);
                    if !changes.added.is_empty() {
                        added.fetch_add(1, Ordering::Relaxed);
                    }
                    for namespace in &changes.added {
                        info!(namespace, "Namespace selected.");
                    }
                    for namespace in &changes.removed {
                        info!(namespace, "Namespace no longer selected.");
                    }
                }
                Err(error) => {
                    warn!(
                        error = &error as &dyn std::error::Error,
                        "Namespace watch failed; retrying."
                    )
                }
            }
        }
        warn!("Namespace watch ended.");
    }
    .instrument(info_span!("namespace_watch", selector = %labels));
    Ok((store, driver))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::attribution::kubernetes::{
        cgroup_path::Qos,
        fixtures::{CID, in_namespace, namespace, pod},
    };

    #[test]
    fn pods_without_a_log_context_are_never_attributable() {
        let (store, mut writer) = reflector::store();
        let status = json!({"containerStatuses": [{
            "name": "c", "containerID": format!("containerd://{CID}"), "restartCount": 0,
            "image": "i", "imageID": "", "ready": true,
        }]});
        let tools_job = pod(json!({
            "metadata": {"name": "t", "namespace": "tenant", "uid": "u-tools",
                          "labels": {"job-name": "tenant-tools-1"}},
            "status": status,
        }));
        let step = pod(json!({
            "metadata": {"name": "s", "namespace": "tenant", "uid": "u-step",
                          "labels": {"tekton.dev/taskRun": "tr", "relay.sh/workflow": "w",
                                     "relay.sh/run": "7", "relay.sh/step": "build"}},
        }));
        writer.apply_watcher_event(&watcher::Event::Apply(tools_job));
        writer.apply_watcher_event(&watcher::Event::Apply(step));
        let index = PodIndex {
            store,
            namespaces: None,
            selection: Arc::new(Selection::new(vec![], None, "relay-system").expect("selection")),
            namespaces_added: Arc::default(),
        };
        let cgroup = |pod_uid: &str| ContainerCgroup {
            pod_uid: pod_uid.to_owned(),
            container_id: CID.to_owned(),
            qos: Qos::BestEffort,
        };
        assert_eq!(
            index.lookup(&cgroup("u-tools")).err(),
            Some(Miss::NoContext)
        );
        // A step pod whose status does not name the container yet: asked again later.
        assert_eq!(index.lookup(&cgroup("u-step")).err(), Some(Miss::NotYet));
        assert_eq!(index.lookup(&cgroup("u-other")).err(), Some(Miss::NotYet));
    }

    #[test]
    fn namespaces_added_and_removed_by_watch_events() {
        use watcher::Event::{Apply, Delete, Init, InitApply, InitDone};
        let ns = |name: &str| namespace(name, json!({"relay.sh/tenant": "true"}));
        let mut names = NamespaceNames::default();
        // (event, namespaces it adds, namespaces it removes)
        let steps: [(_, &[&str], &[&str]); 16] = [
            (Init, &[], &[]),
            (InitApply(ns("a")), &[], &[]),
            (InitApply(ns("b")), &[], &[]),
            (InitDone, &["a", "b"], &[]),
            // Already there: a label or annotation changed.
            (Apply(ns("a")), &[], &[]),
            (Apply(ns("c")), &["c"], &[]),
            (Delete(ns("c")), &[], &["c"]),
            (Apply(ns("c")), &["c"], &[]),
            // A relist after the watch was down: what it misses is removed...
            (Init, &[], &[]),
            (InitApply(ns("a")), &[], &[]),
            (InitDone, &[], &["b", "c"]),
            // ...and what it brings back is added.
            (Init, &[], &[]),
            (InitApply(ns("a")), &[], &[]),
            (InitApply(ns("b")), &[], &[]),
            (InitDone, &["b"], &[]),
            (Delete(ns("x")), &[], &[]),
        ];
        for (i, (event, added, removed)) in steps.into_iter().enumerate() {
            let want = NamespaceChanges {
                added: added.iter().map(ToString::to_string).collect(),
                removed: removed.iter().map(ToString::to_string).collect(),
            };
            assert_eq!(names.apply(&event), want, "step {i}");
        }
        let mut current: Vec<&str> = names.current.iter().map(String::as_str).collect();
        current.sort_unstable();
        assert_eq!(current, ["a", "b"]);
    }

    #[test]
    fn unselected_namespaces_stay_out_of_the_store() {
        let selection = Selection::new(vec![], None, "relay-system")
            .and_then(|s| s.with_namespace_selector("relay.sh/tenant=true"))
            .expect("valid");
        let filter_event =
            |event| filter_event(event, |ns: &Namespace| selection.selects_namespace(ns));
        let labelled = namespace("t", json!({"relay.sh/tenant": "true"}));
        let unlabelled = namespace("t", json!({}));
        assert!(matches!(
            filter_event(watcher::Event::Apply(labelled.clone())),
            Some(watcher::Event::Apply(_))
        ));
        // The label removed: the store forgets the namespace.
        assert!(matches!(
            filter_event(watcher::Event::Apply(unlabelled.clone())),
            Some(watcher::Event::Delete(_))
        ));
        assert!(filter_event(watcher::Event::InitApply(unlabelled)).is_none());
        assert!(matches!(
            filter_event(watcher::Event::InitApply(labelled)),
            Some(watcher::Event::InitApply(_))
        ));
    }

    #[test]
    fn unselected_pods_stay_out_of_the_index() {
        let selection = Selection::new(vec![], Some("capture"), "relay-system").expect("valid");
        let selected = pod(json!({"metadata": {
            "name": "p", "namespace": "t", "labels": {"capture": ""},
            "managedFields": [{"manager": "kubectl"}],
        }}));
        let unselected = in_namespace("t", json!({}));
        let filter_event = |event| filter_event(event, |pod: &Pod| selection.selects(pod));

        let Some(watcher::Event::Apply(kept)) =
            filter_event(watcher::Event::Apply(selected.clone()))
        else {
            panic!("a selected pod is applied");
        };
        assert_eq!(kept.metadata.managed_fields, None);
        assert!(matches!(
            filter_event(watcher::Event::InitApply(selected.clone())),
            Some(watcher::Event::InitApply(_))
        ));
        assert!(matches!(
            filter_event(watcher::Event::Delete(selected)),
            Some(watcher::Event::Delete(_))
        ));
        // No longer selected: forget it.
        assert!(matches!(
            filter_event(watcher::Event::Apply(unselected.clone())),
            Some(watcher::Event::Delete(_))
        ));
        assert!(filter_event(watcher::Event::InitApply(unselected.clone())).is_none());
        assert!(matches!(
            filter_event(watcher::Event::Delete(unselected)),
            Some(watcher::Event::Delete(_))
        ));
        assert!(matches!(
            filter_event(watcher::Event::Init),
            Some(watcher::Event::Init)
        ));
        assert!(matches!(
            filter_event(watcher::Event::InitDone),
            Some(watcher::Event::InitDone)
        ));
    }
}

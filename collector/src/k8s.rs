//! Kubernetes mode: which tenant pod, container and log context a container cgroup writes for.
//!
//! # Pod labels
//!
//! A pod's log context comes from its labels alone, by the rules of
//! [`metadata_api::pod_context`] (documented there, with the
//! [`labels`](metadata_api::pod_context::labels)), which the metadata
//! API's `kubernetes` auth mode applies too, so a pod's own token and the collector agree on its
//! context.
//!
//! # Selection
//!
//! The collector watches the pods scheduled on its node (field selector `spec.nodeName`). A
//! [`Selection`] narrows them by namespace (a list of names, a label selector on the Namespace
//! objects, or both) and by a label selector on the pods; system namespaces and the collector's
//! own are never selected. Label selectors are parsed here, so a typo fails at start with a clear
//! error instead of as a watch that retries forever; each then goes to the API server with its
//! watch (fewer objects cross the wire and sit in memory) and is also evaluated locally. Namespace
//! names are evaluated locally only: a field selector cannot OR several namespaces.
//!
//! Namespace labels change while pods run: the operator labels every namespace holding a `Tenant`
//! with `relay.sh/tenant=true`. So a pod's namespace is not checked when the pod enters the index
//! but at each lookup, against a second reflector of the selected namespaces
//! ([`Selection::selects_in`] is the whole decision). A namespace that becomes selected can make
//! cgroups attributable that the capture engine already told the kernel to pass over;
//! [`PodIndex::namespaces_added`] counts such changes so that the engine has the kernel look at
//! them again.
//!
//! # Testing
//!
//! Everything here but [`PodIndex`] is a pure function of a `Pod` or a `Namespace` and has table
//! tests. The reflectors behind `PodIndex` need an API server; they are not mocked but tested with
//! the collector against the real kube-apiserver test bed (`collector/tests/kubernetes.rs`).

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::{StreamExt, TryStreamExt, future};
use k8s_openapi::api::core::v1::{ContainerStatus, Namespace, Pod};
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use kube::core::{Expression, Selector, SelectorExt};
use kube::runtime::reflector::{self, ObjectRef, Store, store::WriterDropped};
use kube::runtime::{WatchStreamExt, watcher};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::cgroup_path::ContainerCgroup;

/// Namespaces whose pods are never selected, whatever the configuration says.
pub const SYSTEM_NAMESPACES: [&str; 3] = ["kube-system", "kube-public", "kube-node-lease"];

/// A [`Selection`] that cannot be made: configuration the collector must refuse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectionError {
    #[error("invalid label selector {selector:?}")]
    LabelSelector {
        selector: String,
        #[source]
        source: SelectorError,
    },
    #[error("invalid namespace selector {selector:?}")]
    NamespaceSelector {
        selector: String,
        #[source]
        source: SelectorError,
    },
    #[error(
        "namespace {namespace:?} is never selected: it is a system namespace or the collector's own"
    )]
    SystemNamespace { namespace: String },
    #[error("invalid namespace name {namespace:?}")]
    Namespace { namespace: String },
}

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

/// One term of a label selector that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    #[error("empty term (stray comma?)")]
    EmptyTerm,
    #[error("set-based term {term:?} is not supported: use `k=v`, `k!=v`, `k` or `!k`")]
    SetBased { term: String },
    #[error("{key:?} in term {term:?} is not a label key")]
    Key { term: String, key: String },
    #[error("{value:?} in term {term:?} is not a label value")]
    Value { term: String, value: String },
}

/// The log context of a tenant pod, from its labels; `None` for any other pod.
/// The rules are [`metadata_api::pod_context::context_for_labels`]'s.
pub fn context_for_pod(pod: &Pod) -> Option<String> {
    metadata_api::pod_context::context_for_labels(pod.metadata.labels.as_ref()?)
}

/// Whose output a container's writes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attribution {
    pub namespace: String,
    pub pod: String,
    pub pod_uid: String,
    /// The container's name in the pod spec (regular, init or ephemeral).
    pub container: String,
    /// Which run of the container this is: the pod status's `restartCount` for it.
    pub restart_count: u32,
    /// The log context, from [`context_for_pod`].
    pub context: String,
    /// The container's variables from Secrets, from [`secret_env`].
    pub secret_env: String,
    /// Why the container has no entrypoint streams, from [`entrypoint_absent`].
    pub entrypoint_absent: Option<&'static str>,
}

/// Why container `name` of `pod` has no entrypoint streams, from the variables its spec gives it
/// (see [`crate::capture::entrypoint_absent`]); `None` when the spec does not name it.
pub fn entrypoint_absent(pod: &Pod, name: &str) -> Option<&'static str> {
    let spec = pod.spec.as_ref()?;
    let env = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .find(|c| c.name == name)
        .map(|c| &c.env)
        .or_else(|| {
            spec.ephemeral_containers
                .iter()
                .flatten()
                .find(|c| c.name == name)
                .map(|c| &c.env)
        })?;
    crate::capture::entrypoint_absent(env.iter().flatten().map(|e| {
        (
            e.name.as_bytes(),
            e.value.as_deref().unwrap_or_default().as_bytes(),
        )
    }))
}

/// The variables container `name` of `pod` gets from Secrets, as a `redact::EnvSelector` list:
/// an `env` entry with a `secretKeyRef` by name, an `envFrom` `secretRef` with a prefix as
/// `PREFIX*` (the operator's webhook gives wrapped containers the same list as
/// `RELAY_REDACT_ENV`; this covers the containers it does not wrap: init containers, sidecars,
/// pods it did not see). An `envFrom` `secretRef` without a prefix names keys only the Secret
/// knows, which the collector does not read.
pub fn secret_env(pod: &Pod, name: &str) -> String {
    use k8s_openapi::api::core::v1::{EnvFromSource, EnvVar};
    let Some(spec) = pod.spec.as_ref() else {
        return String::new();
    };
    let lists = |env: &Option<Vec<EnvVar>>, from: &Option<Vec<EnvFromSource>>| {
        let named = env
            .iter()
            .flatten()
            .filter(|e| {
                e.value_from
                    .as_ref()
                    .is_some_and(|v| v.secret_key_ref.is_some())
            })
            .map(|e| e.name.clone());
        let prefixed = from
            .iter()
            .flatten()
            .filter(|f| f.secret_ref.is_some())
            .filter_map(|f| f.prefix.as_deref().filter(|p| !p.is_empty()))
            .map(|p| format!("{p}*"));
        named.chain(prefixed).collect::<Vec<_>>().join(",")
    };
    let regular = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .find(|c| c.name == name)
        .map(|c| lists(&c.env, &c.env_from));
    regular
        .or_else(|| {
            spec.ephemeral_containers
                .iter()
                .flatten()
                .find(|c| c.name == name)
                .map(|c| lists(&c.env, &c.env_from))
        })
        .unwrap_or_default()
}

/// The attribution of the container with runtime id `container_id` (no `containerd://` scheme)
/// in `pod`, or `None` when the pod has no log context or no container status with that id.
///
/// The id is matched against each regular, init and ephemeral container's current `containerID`,
/// then its last terminated one (the run before a restart, `restartCount - 1`): a crash-looping
/// container's old cgroup can be looked up after the kubelet has reported the new run. A new
/// container's cgroup exists before the kubelet reports its id, so `None` can mean "not yet".
pub fn attribute(pod: &Pod, container_id: &str) -> Option<Attribution> {
    let context = context_for_pod(pod)?;
    let status = pod.status.as_ref()?;
    let statuses = [
        &status.container_statuses,
        &status.init_container_statuses,
        &status.ephemeral_container_statuses,
    ];
    let statuses = || statuses.into_iter().flatten().flatten();
    let restart_count = |s: &ContainerStatus| u32::try_from(s.restart_count).unwrap_or(0);
    let (found, restart_count) = statuses()
        .find(|s| runtime_id(s.container_id.as_deref()) == Some(container_id))
        .map(|s| (s, restart_count(s)))
        .or_else(|| {
            statuses()
                .find(|s| {
                    let last = s.last_state.as_ref().and_then(|l| l.terminated.as_ref());
                    runtime_id(last.and_then(|t| t.container_id.as_deref())) == Some(container_id)
                })
                .map(|s| (s, restart_count(s).saturating_sub(1)))
        })?;
    let meta = &pod.metadata;
    Some(Attribution {
        namespace: meta.namespace.clone()?,
        pod: meta.name.clone()?,
        pod_uid: meta.uid.clone()?,
        container: found.name.clone(),
        restart_count,
        context,
        secret_env: secret_env(pod, &found.name),
        entrypoint_absent: entrypoint_absent(pod, &found.name),
    })
}

/// The id in a status `containerID` (`containerd://<id>`, `cri-o://<id>`, `docker://<id>`).
fn runtime_id(container_id: Option<&str>) -> Option<&str> {
    container_id
        .and_then(|id| id.split_once("://"))
        .map(|(_, id)| id)
        .filter(|id| !id.is_empty())
}

/// Which of the node's pods the collector captures.
#[derive(Debug, Clone)]
pub struct Selection {
    /// Empty: every namespace but the excluded ones.
    namespaces: Vec<String>,
    /// The collector's own namespace, excluded like the system ones.
    own_namespace: String,
    labels: Selector,
    /// Labels a pod's Namespace object must match; `None`: namespaces are not chosen by label.
    namespace_labels: Option<Selector>,
}

impl Selection {
    /// `namespaces` empty selects all but the system namespaces and `own_namespace`; naming one of
    /// those is an error. `label_selector` takes the equality forms `k=v` (or `k==v`), `k!=v`,
    /// `k` and `!k`, comma-separated; an empty one selects everything, as in Kubernetes.
    pub fn new(
        namespaces: Vec<String>,
        label_selector: Option<&str>,
        own_namespace: &str,
    ) -> Result<Self, SelectionError> {
        for namespace in &namespaces {
            if !is_dns_label(namespace) {
                return Err(SelectionError::Namespace {
                    namespace: namespace.clone(),
                });
            }
            if is_excluded(namespace, own_namespace) {
                return Err(SelectionError::SystemNamespace {
                    namespace: namespace.clone(),
                });
            }
        }
        let labels = match label_selector {
            Some(selector) => {
                parse_label_selector(selector).map_err(|source| SelectionError::LabelSelector {
                    selector: selector.to_owned(),
                    source,
                })?
            }
            None => Selector::default(),
        };
        Ok(Self {
            namespaces,
            own_namespace: own_namespace.to_owned(),
            labels,
            namespace_labels: None,
        })
    }

    /// Also requires a pod's Namespace to match `selector` (the forms of `label_selector` in
    /// [`Selection::new`]), on top of the namespace names and the pod label selector.
    pub fn with_namespace_selector(mut self, selector: &str) -> Result<Self, SelectionError> {
        let parsed =
            parse_label_selector(selector).map_err(|source| SelectionError::NamespaceSelector {
                selector: selector.to_owned(),
                source,
            })?;
        self.namespace_labels = Some(parsed);
        Ok(self)
    }

    /// Whether the collector may capture `pod`'s containers, judging by the pod alone: its
    /// namespace's name and its labels. With a namespace selector, [`Selection::selects_in`] also
    /// needs the pod's Namespace.
    pub fn selects(&self, pod: &Pod) -> bool {
        let Some(namespace) = pod.metadata.namespace.as_deref() else {
            return false;
        };
        if !self.selects_namespace_name(namespace) {
            return false;
        }
        match &pod.metadata.labels {
            Some(labels) => self.labels.matches(labels),
            None => self.labels.matches(&Default::default()),
        }
    }

    /// Whether the pods of `namespace` are captured: its name is selected and, with a namespace
    /// selector, its labels match it.
    pub fn selects_namespace(&self, namespace: &Namespace) -> bool {
        let Some(name) = namespace.metadata.name.as_deref() else {
            return false;
        };
        if !self.selects_namespace_name(name) {
            return false;
        }
        match (&self.namespace_labels, &namespace.metadata.labels) {
            (None, _) => true,
            (Some(selector), Some(labels)) => selector.matches(labels),
            (Some(selector), None) => selector.matches(&Default::default()),
        }
    }

    /// The whole decision: whether the collector captures `pod`'s containers, where `namespace` is
    /// the pod's Namespace as the collector knows it (`None`: not known, or not selected). Without
    /// a namespace selector the Namespace object does not matter.
    pub fn selects_in(&self, pod: &Pod, namespace: Option<&Namespace>) -> bool {
        if !self.selects(pod) {
            return false;
        }
        if self.namespace_labels.is_none() {
            return true;
        }
        namespace.is_some_and(|ns| {
            ns.metadata.name.is_some()
                && ns.metadata.name == pod.metadata.namespace
                && self.selects_namespace(ns)
        })
    }

    fn selects_namespace_name(&self, namespace: &str) -> bool {
        !is_excluded(namespace, &self.own_namespace)
            && (self.namespaces.is_empty() || self.namespaces.iter().any(|n| n == namespace))
    }

    /// The parsed label selector, as sent to the API server.
    pub fn label_selector(&self) -> &Selector {
        &self.labels
    }

    /// The parsed namespace selector, as sent to the API server; `None` when not given.
    pub fn namespace_selector(&self) -> Option<&Selector> {
        self.namespace_labels.as_ref()
    }
}

fn is_excluded(namespace: &str, own_namespace: &str) -> bool {
    namespace == own_namespace || SYSTEM_NAMESPACES.contains(&namespace)
}

/// Parses the equality-based label selector forms into kube's [`Selector`], which renders them
/// back for the API server and matches them locally.
fn parse_label_selector(selector: &str) -> Result<Selector, SelectorError> {
    if selector.trim().is_empty() {
        return Ok(Selector::default());
    }
    selector.split(',').map(parse_term).collect()
}

fn parse_term(term: &str) -> Result<Expression, SelectorError> {
    let t = term.trim();
    if t.is_empty() {
        return Err(SelectorError::EmptyTerm);
    }
    if t.contains(['(', ')']) {
        return Err(SelectorError::SetBased { term: t.to_owned() });
    }
    let key_err = |key: &str| SelectorError::Key {
        term: t.to_owned(),
        key: key.to_owned(),
    };
    let (key, value, equal) = if let Some((k, v)) = t.split_once("!=") {
        (k, Some(v), false)
    } else if let Some((k, v)) = t.split_once("==").or_else(|| t.split_once('=')) {
        (k, Some(v), true)
    } else if let Some(k) = t.strip_prefix('!') {
        let k = k.trim();
        return if is_label_key(k) {
            Ok(Expression::DoesNotExist(k.to_owned()))
        } else {
            Err(key_err(k))
        };
    } else {
        (t, None, true)
    };
    let key = key.trim();
    if !is_label_key(key) {
        return Err(key_err(key));
    }
    let Some(value) = value else {
        return Ok(Expression::Exists(key.to_owned()));
    };
    let value = value.trim();
    if !is_label_value(value) {
        return Err(SelectorError::Value {
            term: t.to_owned(),
            value: value.to_owned(),
        });
    }
    Ok(if equal {
        Expression::Equal(key.to_owned(), value.to_owned())
    } else {
        Expression::NotEqual(key.to_owned(), value.to_owned())
    })
}

/// A label key: an optional DNS subdomain prefix and `/`, then a name (Kubernetes
/// `IsQualifiedName`).
fn is_label_key(key: &str) -> bool {
    let name = match key.split_once('/') {
        Some((prefix, name)) => {
            if !is_dns_subdomain(prefix) {
                return false;
            }
            name
        }
        None => key,
    };
    !name.is_empty() && is_label_value(name)
}

/// At most 63 characters of `[A-Za-z0-9_.-]`, beginning and ending alphanumeric; may be empty.
fn is_label_value(value: &str) -> bool {
    let bytes = value.as_bytes();
    match (bytes.first(), bytes.last()) {
        (None, _) | (_, None) => true,
        (Some(first), Some(last)) => {
            bytes.len() <= 63
                && first.is_ascii_alphanumeric()
                && last.is_ascii_alphanumeric()
                && bytes
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        }
    }
}

fn is_dns_subdomain(s: &str) -> bool {
    (1..=253).contains(&s.len()) && s.split('.').all(is_dns_label)
}

/// RFC 1123 label: 1-63 of `[a-z0-9-]`, beginning and ending alphanumeric (namespace names too).
fn is_dns_label(s: &str) -> bool {
    let bytes = s.as_bytes();
    (1..=63).contains(&bytes.len())
        && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
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
    use serde_json::{Value, json};

    use super::*;

    const CID: &str = "0765f197c9158576f202e50498b488cd0d2b022fb2462b0a629f214bb51cd57d";

    fn pod(value: Value) -> Pod {
        serde_json::from_value(value).expect("a Pod")
    }

    fn labelled(labels: Value) -> Pod {
        pod(json!({
            "metadata": { "name": "p", "namespace": "tenant", "uid": "u", "labels": labels },
        }))
    }

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
            qos: crate::cgroup_path::Qos::BestEffort,
        };
        assert_eq!(
            index.lookup(&cgroup("u-tools")).err(),
            Some(Miss::NoContext)
        );
        // A step pod whose status does not name the container yet: asked again later.
        assert_eq!(index.lookup(&cgroup("u-step")).err(), Some(Miss::NotYet));
        assert_eq!(index.lookup(&cgroup("u-other")).err(), Some(Miss::NotYet));
    }

    /// The rules themselves are tested in `metadata_api::pod_context`.
    #[test]
    fn contexts_come_from_pod_labels() {
        let got = context_for_pod(&labelled(json!({
            "serving.knative.dev/revision": "r-1", "relay.sh/workflow": "w", "relay.sh/trigger-sync-id": "t1",
        })));
        assert_eq!(got.as_deref(), Some("workflows/w/triggers/t1"));
        assert_eq!(
            context_for_pod(&pod(json!({"metadata": {"name": "p"}}))),
            None
        );
    }

    fn step_pod(status: Value) -> Pod {
        pod(json!({
            "metadata": {
                "name": "build-pod", "namespace": "tenant", "uid": "2cde702b-a0cf-438d-a228-fb164e54434b",
                "labels": {"tekton.dev/taskRun": "tr", "relay.sh/workflow": "w", "relay.sh/run": "7", "relay.sh/step": "build"},
            },
            "status": status,
        }))
    }

    fn container(name: &str, id: Option<String>, restarts: i32) -> Value {
        json!({"name": name, "containerID": id, "restartCount": restarts, "image": "i", "imageID": "", "ready": true})
    }

    fn attributed(container: &str, restart_count: u32) -> Option<Attribution> {
        Some(Attribution {
            namespace: "tenant".into(),
            pod: "build-pod".into(),
            pod_uid: "2cde702b-a0cf-438d-a228-fb164e54434b".into(),
            container: container.into(),
            restart_count,
            context: "workflows/w/runs/7/steps/build".into(),
            secret_env: String::new(),
            entrypoint_absent: None,
        })
    }

    #[test]
    fn the_spec_tells_why_a_container_has_no_entrypoint_streams() {
        let p = pod(json!({
            "metadata": {"name": "p"},
            "spec": {
                "containers": [
                    {"name": "step-build", "env": [
                        {"name": "RELAY_METADATA_API_URL", "value": "http://relay"},
                    ]},
                    // tektoncd/pipeline pkg/pod/pod.go: every step of a hermetic TaskRun.
                    {"name": "step-offline", "env": [{"name": "TEKTON_HERMETIC", "value": "1"}]},
                    {"name": "sidecar-db"},
                ],
            },
        }));
        assert_eq!(entrypoint_absent(&p, "step-build"), None);
        assert!(entrypoint_absent(&p, "step-offline").is_some_and(|w| w.contains("hermetic")));
        assert!(
            entrypoint_absent(&p, "sidecar-db").is_some_and(|w| w.contains("does not run under"))
        );
        assert_eq!(entrypoint_absent(&p, "missing"), None);
    }

    #[test]
    fn secret_variables_come_from_the_container_spec() {
        let p = pod(json!({
            "metadata": {"name": "p"},
            "spec": {
                "containers": [{"name": "app", "env": [
                    {"name": "PLAIN", "value": "x"},
                    {"name": "PW", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
                ], "envFrom": [
                    {"secretRef": {"name": "a"}, "prefix": "A_"},
                    {"secretRef": {"name": "b"}},
                    {"configMapRef": {"name": "c"}, "prefix": "C_"},
                ]}],
                "initContainers": [{"name": "init", "env": [
                    {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "t"}}},
                ]}],
            },
        }));
        assert_eq!(secret_env(&p, "app"), "PW,A_*");
        assert_eq!(secret_env(&p, "init"), "TOKEN");
        assert_eq!(secret_env(&p, "missing"), "");
    }

    #[test]
    fn attribute_finds_any_kind_of_container() {
        let other = "f".repeat(64);
        let cases = [
            (
                json!({"containerStatuses": [container("a", Some(format!("containerd://{other}")), 0), container("step-build", Some(format!("containerd://{CID}")), 2)]}),
                attributed("step-build", 2),
            ),
            (
                json!({"containerStatuses": [container("step-build", Some(format!("cri-o://{CID}")), 0)]}),
                attributed("step-build", 0),
            ),
            (
                json!({"containerStatuses": [container("step-build", Some(format!("docker://{CID}")), 0)]}),
                attributed("step-build", 0),
            ),
            (
                json!({"initContainerStatuses": [container("prepare", Some(format!("containerd://{CID}")), 1)],
                       "containerStatuses": [container("step-build", Some(format!("containerd://{other}")), 0)]}),
                attributed("prepare", 1),
            ),
            (
                json!({"ephemeralContainerStatuses": [container("debugger", Some(format!("containerd://{CID}")), 0)]}),
                attributed("debugger", 0),
            ),
            // The run before a restart.
            (
                json!({"containerStatuses": [{
                    "name": "step-build", "containerID": format!("containerd://{other}"), "restartCount": 3,
                    "lastState": {"terminated": {"containerID": format!("containerd://{CID}"), "exitCode": 1}},
                    "image": "i", "imageID": "", "ready": false,
                }]}),
                attributed("step-build", 2),
            ),
            // Unknown, not yet reported, or not an id of this pod.
            (
                json!({"containerStatuses": [container("step-build", Some(format!("containerd://{other}")), 0)]}),
                None,
            ),
            (
                json!({"containerStatuses": [container("step-build", None, 0)]}),
                None,
            ),
            (
                json!({"containerStatuses": [container("step-build", Some(CID.to_owned()), 0)]}),
                None,
            ),
            (
                json!({"containerStatuses": [container("step-build", Some("containerd://".to_owned()), 0)]}),
                None,
            ),
            (json!({}), None),
        ];
        for (status, want) in cases {
            assert_eq!(attribute(&step_pod(status.clone()), CID), want, "{status}");
        }
        let no_status = pod(json!({"metadata": {"name": "build-pod", "namespace": "tenant"}}));
        assert_eq!(attribute(&no_status, CID), None);
        assert_eq!(
            attribute(
                &step_pod(
                    json!({"containerStatuses": [container("c", Some("containerd://".to_owned()), 0)]})
                ),
                ""
            ),
            None
        );
    }

    #[test]
    fn attribute_needs_a_context() {
        let mut p = step_pod(
            json!({"containerStatuses": [container("c", Some(format!("containerd://{CID}")), 0)]}),
        );
        assert!(attribute(&p, CID).is_some());
        p.metadata.labels = None;
        assert_eq!(attribute(&p, CID), None);
    }

    fn in_namespace(namespace: &str, labels: Value) -> Pod {
        pod(json!({"metadata": {"name": "p", "namespace": namespace, "labels": labels}}))
    }

    #[test]
    fn selection_by_namespace() {
        let all = Selection::new(vec![], None, "relay-system").expect("valid");
        let some =
            Selection::new(vec!["a".into(), "b".into()], None, "relay-system").expect("valid");
        let cases = [
            ("tenant", true, false),
            ("a", true, true),
            ("b", true, true),
            ("kube-system", false, false),
            ("kube-public", false, false),
            ("kube-node-lease", false, false),
            ("relay-system", false, false),
        ];
        for (namespace, by_all, by_some) in cases {
            let p = in_namespace(namespace, json!({}));
            assert_eq!(all.selects(&p), by_all, "{namespace}");
            assert_eq!(some.selects(&p), by_some, "{namespace}");
        }
        let no_namespace = pod(json!({"metadata": {"name": "p"}}));
        assert!(!all.selects(&no_namespace));
    }

    #[test]
    fn selection_rejects_excluded_or_invalid_namespaces() {
        for namespace in [
            "kube-system",
            "kube-public",
            "kube-node-lease",
            "relay-system",
        ] {
            let err = Selection::new(vec!["a".into(), namespace.into()], None, "relay-system")
                .expect_err(namespace);
            assert!(
                matches!(err, SelectionError::SystemNamespace { .. }),
                "{err}"
            );
        }
        for namespace in ["", "A", "a_b", "-a", &"a".repeat(64)] {
            let err =
                Selection::new(vec![namespace.into()], None, "relay-system").expect_err(namespace);
            assert!(matches!(err, SelectionError::Namespace { .. }), "{err}");
        }
    }

    #[test]
    fn selection_by_labels() {
        let cases = [
            ("", json!({}), true),
            ("  ", json!({"a": "1"}), true),
            ("app=web", json!({"app": "web"}), true),
            ("app==web", json!({"app": "web"}), true),
            ("app = web", json!({"app": "web"}), true),
            ("app=web", json!({"app": "db"}), false),
            ("app=web", json!({}), false),
            ("app!=web", json!({"app": "db"}), true),
            ("app!=web", json!({}), true),
            ("app!=web", json!({"app": "web"}), false),
            ("app", json!({"app": ""}), true),
            ("app", json!({}), false),
            ("!app", json!({}), true),
            ("!app", json!({"app": "x"}), false),
            ("app=", json!({"app": ""}), true),
            ("app=", json!({"app": "x"}), false),
            (
                "relay.sh/capture=ebpf,!skip,tier!=infra",
                json!({"relay.sh/capture": "ebpf", "tier": "app"}),
                true,
            ),
            (
                "relay.sh/capture=ebpf,!skip,tier!=infra",
                json!({"relay.sh/capture": "ebpf", "skip": "1"}),
                false,
            ),
        ];
        for (selector, labels, want) in cases {
            let selection = Selection::new(vec![], Some(selector), "relay-system").expect(selector);
            assert_eq!(
                selection.selects(&in_namespace("tenant", labels.clone())),
                want,
                "{selector} on {labels}"
            );
        }
        let selection = Selection::new(vec![], Some("app"), "relay-system").expect("valid");
        assert!(!selection.selects(&pod(json!({"metadata": {"name": "p", "namespace": "t"}}))));
    }

    fn namespace(name: &str, labels: Value) -> Namespace {
        serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}}))
            .expect("a Namespace")
    }

    #[test]
    fn selection_by_namespace_labels() {
        let tenants = Selection::new(vec![], None, "relay-system")
            .and_then(|s| s.with_namespace_selector("relay.sh/tenant=true"))
            .expect("valid");
        let listed = Selection::new(vec!["a".into()], None, "relay-system")
            .and_then(|s| s.with_namespace_selector("relay.sh/tenant=true"))
            .expect("valid");
        let with_pod_selector = Selection::new(vec![], Some("capture"), "relay-system")
            .and_then(|s| s.with_namespace_selector("relay.sh/tenant=true"))
            .expect("valid");
        let tenant = json!({"relay.sh/tenant": "true"});
        // (pod's namespace, its labels or None when the collector does not know it, pod labels,
        //  selected by `tenants`, by `listed`, by `with_pod_selector`)
        let cases = [
            ("a", Some(tenant.clone()), json!({}), true, true, false),
            (
                "a",
                Some(tenant.clone()),
                json!({"capture": ""}),
                true,
                true,
                true,
            ),
            (
                "b",
                Some(tenant.clone()),
                json!({"capture": ""}),
                true,
                false,
                true,
            ),
            (
                "a",
                Some(json!({"relay.sh/tenant": "false"})),
                json!({"capture": ""}),
                false,
                false,
                false,
            ),
            (
                "a",
                Some(json!({})),
                json!({"capture": ""}),
                false,
                false,
                false,
            ),
            ("a", None, json!({"capture": ""}), false, false, false),
            // The label does not let the collector into excluded namespaces.
            (
                "kube-system",
                Some(tenant.clone()),
                json!({"capture": ""}),
                false,
                false,
                false,
            ),
            (
                "relay-system",
                Some(tenant.clone()),
                json!({"capture": ""}),
                false,
                false,
                false,
            ),
        ];
        for (name, ns_labels, pod_labels, by_tenants, by_listed, by_pod_selector) in cases {
            let ns = ns_labels.clone().map(|labels| namespace(name, labels));
            let p = in_namespace(name, pod_labels.clone());
            let case = format!("{name} {ns_labels:?} {pod_labels}");
            assert_eq!(tenants.selects_in(&p, ns.as_ref()), by_tenants, "{case}");
            assert_eq!(listed.selects_in(&p, ns.as_ref()), by_listed, "{case}");
            assert_eq!(
                with_pod_selector.selects_in(&p, ns.as_ref()),
                by_pod_selector,
                "{case}"
            );
            if let Some(ns) = &ns {
                assert_eq!(tenants.selects_namespace(ns), by_tenants, "{case}");
                assert_eq!(listed.selects_namespace(ns), by_listed, "{case}");
            }
        }
        // Another namespace's object does not stand in for the pod's.
        let elsewhere = namespace("b", tenant.clone());
        assert!(!tenants.selects_in(&in_namespace("a", json!({})), Some(&elsewhere)));
        let nameless: Namespace =
            serde_json::from_value(json!({"metadata": {"labels": tenant}})).expect("a Namespace");
        assert!(!tenants.selects_namespace(&nameless));
        assert!(!tenants.selects_in(&pod(json!({"metadata": {"name": "p"}})), Some(&nameless)));
    }

    #[test]
    fn without_a_namespace_selector_the_namespace_object_does_not_matter() {
        let selection = Selection::new(vec![], Some("capture"), "relay-system").expect("valid");
        assert_eq!(selection.namespace_selector(), None);
        let p = in_namespace("a", json!({"capture": ""}));
        assert!(selection.selects_in(&p, None));
        assert!(selection.selects_in(&p, Some(&namespace("a", json!({})))));
        assert!(!selection.selects_in(&in_namespace("a", json!({})), None));
        assert!(!selection.selects_in(&in_namespace("kube-system", json!({"capture": ""})), None));
        assert!(selection.selects_namespace(&namespace("a", json!({}))));
        assert!(!selection.selects_namespace(&namespace("relay-system", json!({}))));
    }

    #[test]
    fn namespace_selector_renders_and_rejects_typos() {
        let selection = Selection::new(vec![], None, "x")
            .and_then(|s| s.with_namespace_selector(" relay.sh/tenant = true ,!skip"))
            .expect("valid");
        assert_eq!(
            selection
                .namespace_selector()
                .map(ToString::to_string)
                .as_deref(),
            Some("relay.sh/tenant=true,!skip")
        );
        let cases = [
            ("relay.sh/tenant=true,", SelectorError::EmptyTerm),
            (
                "relay.sh/tenant in (true)",
                SelectorError::SetBased {
                    term: "relay.sh/tenant in (true)".into(),
                },
            ),
            (
                "relay.sh//tenant=true",
                SelectorError::Key {
                    term: "relay.sh//tenant=true".into(),
                    key: "relay.sh//tenant".into(),
                },
            ),
        ];
        for (selector, want) in cases {
            let err = Selection::new(vec![], None, "x")
                .and_then(|s| s.with_namespace_selector(selector))
                .expect_err(selector);
            match err {
                SelectionError::NamespaceSelector {
                    selector: s,
                    source,
                } => {
                    assert_eq!(s, selector);
                    assert_eq!(source, want, "{selector}");
                }
                other => panic!("{selector}: {other}"),
            }
        }
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
    fn label_selector_renders_for_the_api_server() {
        let selection =
            Selection::new(vec![], Some(" a = 1 ,b!=2,c, !d,e==5"), "x").expect("valid");
        assert_eq!(selection.label_selector().to_string(), "a=1,b!=2,c,!d,e=5");
    }

    #[test]
    fn label_selector_errors() {
        let set_based = |term: &str| SelectorError::SetBased { term: term.into() };
        let key = |term: &str, key: &str| SelectorError::Key {
            term: term.into(),
            key: key.into(),
        };
        let value = |term: &str, value: &str| SelectorError::Value {
            term: term.into(),
            value: value.into(),
        };
        let long = "a".repeat(64);
        let cases = [
            ("a=1,", SelectorError::EmptyTerm),
            (",a", SelectorError::EmptyTerm),
            ("a,,b", SelectorError::EmptyTerm),
            ("env in (a,b)", set_based("env in (a")),
            ("env notin (a)", set_based("env notin (a)")),
            ("=v", key("=v", "")),
            ("!", key("!", "")),
            ("!=v", key("!=v", "")),
            ("-a=v", key("-a=v", "-a")),
            ("a/b/c=v", key("a/b/c=v", "a/b/c")),
            ("Example.com/a=v", key("Example.com/a=v", "Example.com/a")),
            ("/a=v", key("/a=v", "/a")),
            ("a/=v", key("a/=v", "a/")),
            ("!a=b", key("!a=b", "!a")),
            ("a=b=c", value("a=b=c", "b=c")),
            ("a=-b", value("a=-b", "-b")),
            ("a!=b c", value("a!=b c", "b c")),
        ];
        for (selector, want) in cases {
            let err = Selection::new(vec![], Some(selector), "x").expect_err(selector);
            match err {
                SelectionError::LabelSelector {
                    selector: s,
                    source,
                } => {
                    assert_eq!(s, selector);
                    assert_eq!(source, want, "{selector}");
                }
                other => panic!("{selector}: {other}"),
            }
        }
        assert!(Selection::new(vec![], Some(&format!("{long}=v")), "x").is_err());
        assert!(Selection::new(vec![], Some(&format!("k={long}")), "x").is_err());
        assert!(
            Selection::new(vec![], Some(&format!("example.com/{}=v", &long[1..])), "x").is_ok()
        );
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

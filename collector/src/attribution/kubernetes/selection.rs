//! Which of the node's pods the collector captures.
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
//! [`PodIndex::namespaces_added`](super::PodIndex::namespaces_added) counts such changes so that
//! the engine has the kernel look at them again.

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::core::{Expression, Selector, SelectorExt};

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

pub(super) fn is_dns_subdomain(s: &str) -> bool {
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::attribution::kubernetes::fixtures::{in_namespace, namespace, pod};

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
}

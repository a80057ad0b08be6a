//! What a command reads: `step/W/R/S`, `trigger/W/T` or `pod/NAME`, and the log context it is.

use std::{collections::BTreeMap, fmt};

use contract::names::valid_context_segment;

use crate::error::Error;

/// A command's target as the user wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Step {
        workflow: String,
        run: String,
        step: String,
    },
    Trigger {
        workflow: String,
        trigger: String,
    },
    /// A pod, looked up in the namespace to find its context.
    Pod(String),
}

/// The syntax, for messages and `--help`.
pub const SYNTAX: &str = "step/WORKFLOW/RUN/STEP, trigger/WORKFLOW/TRIGGER or pod/NAME";

impl std::str::FromStr for Target {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a target: expected {SYNTAX}");
        let (kind, rest) = s.split_once('/').ok_or_else(bad)?;
        let segs: Vec<&str> = rest.split('/').collect();
        let valid = |n: usize| segs.len() == n && segs.iter().all(|p| valid_context_segment(p));
        match kind {
            "step" | "steps" if valid(3) => Ok(Self::Step {
                workflow: segs[0].to_owned(),
                run: segs[1].to_owned(),
                step: segs[2].to_owned(),
            }),
            "trigger" | "triggers" if valid(2) => Ok(Self::Trigger {
                workflow: segs[0].to_owned(),
                trigger: segs[1].to_owned(),
            }),
            "pod" | "pods" | "po" if segs.len() == 1 && valid_pod_name(segs[0]) => {
                Ok(Self::Pod(segs[0].to_owned()))
            }
            _ => Err(bad()),
        }
    }
}

/// A DNS subdomain (RFC 1123), as pod names are.
fn valid_pod_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && name
            .bytes()
            .last()
            .is_some_and(|b| b.is_ascii_alphanumeric())
}

/// A log context (`workflows/W/runs/R/steps/S` or `workflows/W/triggers/T`) and, for a trigger
/// pod, the pod whose replica alone is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Context {
    pub path: String,
    pub pod: Option<String>,
}

impl Context {
    pub fn of(target: &Target) -> Option<Self> {
        let path = match target {
            Target::Step {
                workflow,
                run,
                step,
            } => format!("workflows/{workflow}/runs/{run}/steps/{step}"),
            Target::Trigger { workflow, trigger } => {
                format!("workflows/{workflow}/triggers/{trigger}")
            }
            Target::Pod(_) => return None,
        };
        Some(Self { path, pod: None })
    }

    /// The context of pod `name` with these labels (`contract::pod_context`); a trigger pod's
    /// reads name the pod, so that only its replica is read.
    pub fn of_pod(
        namespace: &str,
        name: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<Self, Error> {
        let path = contract::pod_context::context_for_labels(labels).ok_or_else(|| {
            Error::NotFound(format!(
                "pod {namespace}/{name} has no relay log context: it is neither a Tekton step pod \
                 nor a Knative trigger pod with relay.sh labels"
            ))
        })?;
        let pod = path.contains("/triggers/").then(|| name.to_owned());
        Ok(Self { path, pod })
    }

    /// The route of the context's logs.
    pub fn logs_path(&self) -> String {
        format!("/api/{}/logs", self.path)
    }

    /// The route of the context's capture report.
    pub fn report_path(&self) -> String {
        format!("/api/{}/logs/capture-report", self.path)
    }

    /// The step or trigger: the container a stream without one (`stdout`) belongs to.
    pub fn last_segment(&self) -> &str {
        self.path.rsplit('/').next().unwrap_or(&self.path)
    }
}

impl fmt::Display for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.path)?;
        if let Some(pod) = &self.pod {
            write!(f, " (pod {pod})")?;
        }
        Ok(())
    }
}

/// The container stream `name` belongs to, as the API's `--prefix` names it: `app.stdout` and
/// `app.stdout.1` are `app`'s, a Knative `user-container.{uid}.stdout` is
/// `user-container.{uid}`'s, and `stdout` is `default`'s (the step or trigger).
pub fn container_of<'a>(name: &'a str, default: &'a str) -> &'a str {
    let base = match name.rsplit_once('.') {
        Some((base, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => base,
        _ => name,
    };
    match base.rsplit_once('.') {
        Some((container, _)) => container,
        None => default,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        let step: Target = "step/w/7/build".parse().unwrap_or(Target::Pod("x".into()));
        assert_eq!(
            step,
            Target::Step {
                workflow: "w".into(),
                run: "7".into(),
                step: "build".into()
            }
        );
        assert_eq!(
            Context::of(&step).map(|c| c.logs_path()).as_deref(),
            Some("/api/workflows/w/runs/7/steps/build/logs")
        );
        let trigger: Target = "trigger/w/t1".parse().unwrap_or(Target::Pod("x".into()));
        assert_eq!(
            Context::of(&trigger).map(|c| c.report_path()).as_deref(),
            Some("/api/workflows/w/triggers/t1/logs/capture-report")
        );
        assert_eq!("pod/p-1".parse::<Target>(), Ok(Target::Pod("p-1".into())));
        for bad in [
            "step/w/7",
            "step/w/7/s/x",
            "step/w/../s",
            "trigger/w",
            "trigger/w/a b",
            "pod/",
            "pod/A",
            "pod/a/b",
            "job/x",
            "w/r/s",
        ] {
            assert!(bad.parse::<Target>().is_err(), "{bad}");
        }
    }

    #[test]
    fn pods_map_to_their_context() {
        let labels = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<BTreeMap<_, _>>()
        };
        let step = Context::of_pod(
            "ns",
            "p",
            &labels(&[
                ("tekton.dev/taskRun", "tr"),
                ("relay.sh/workflow", "w"),
                ("relay.sh/run", "7"),
                ("relay.sh/step", "s"),
            ]),
        );
        assert_eq!(
            step.ok(),
            Some(Context {
                path: "workflows/w/runs/7/steps/s".into(),
                pod: None
            })
        );
        let trigger = Context::of_pod(
            "ns",
            "p",
            &labels(&[
                ("serving.knative.dev/revision", "r"),
                ("relay.sh/workflow", "w"),
                ("relay.sh/trigger-sync-id", "t"),
            ]),
        );
        assert_eq!(
            trigger.ok(),
            Some(Context {
                path: "workflows/w/triggers/t".into(),
                pod: Some("p".into())
            })
        );
        let none = Context::of_pod("ns", "p", &labels(&[("app", "x")]));
        assert!(matches!(none, Err(Error::NotFound(_))));
    }

    #[test]
    fn streams_belong_to_containers() {
        for (name, want) in [
            ("app.stdout", "app"),
            ("app.stderr.2", "app"),
            ("user-container.1a2b3c4d.stdout", "user-container.1a2b3c4d"),
            ("stdout", "step"),
            ("stderr.1", "step"),
        ] {
            assert_eq!(container_of(name, "step"), want, "{name}");
        }
    }
}

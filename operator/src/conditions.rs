//! `Tenant` status conditions: their types and reasons, one constructor per condition, and
//! [`set_condition`] to merge a new condition into a status.
//!
//! Every constructor takes the `observed_generation` the reconciler acted on, so a reader can tell
//! a stale condition from a current one (linkerd `policy-controller/k8s/status/src/index.rs`).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// Condition types.
pub mod types {
    /// The tools volume for the current tools version is filled and can be mounted.
    pub const TOOLS_READY: &str = "ToolsReady";
    /// The tenant is fully served: pods created now get the entrypoint injected.
    pub const READY: &str = "Ready";
}

/// Condition reasons (UpperCamelCase, as the API conventions require).
pub mod reasons {
    /// `spec.entrypointInjection.volumeClaimTemplate` is rejected; the message says why.
    pub const INVALID_VOLUME_CLAIM_TEMPLATE: &str = "InvalidVolumeClaimTemplate";
    /// The Job that installs the tools into the volume has not finished yet.
    pub const TOOLS_JOB_RUNNING: &str = "ToolsJobRunning";
    /// The Job that installs the tools into the volume failed.
    pub const TOOLS_JOB_FAILED: &str = "ToolsJobFailed";
    /// The tools volume is filled.
    pub const TOOLS_READY: &str = "ToolsReady";
    /// Everything the tenant needs is in place.
    pub const READY: &str = "Ready";
}

/// Condition statuses.
pub mod status {
    /// The condition holds.
    pub const TRUE: &str = "True";
    /// The condition does not hold.
    pub const FALSE: &str = "False";
    /// The operator cannot tell yet.
    pub const UNKNOWN: &str = "Unknown";
}

/// The current time, as conditions record it.
pub fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

fn condition(
    type_: &str,
    status: &str,
    reason: &str,
    message: String,
    observed_generation: Option<i64>,
    now: Time,
) -> Condition {
    Condition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message,
        observed_generation,
        last_transition_time: now,
    }
}

/// `ToolsReady=False`: the volume claim template is invalid, so no tools volume is created.
pub fn invalid_volume_claim_template(
    observed_generation: Option<i64>,
    message: impl Into<String>,
    now: Time,
) -> Condition {
    condition(
        types::TOOLS_READY,
        status::FALSE,
        reasons::INVALID_VOLUME_CLAIM_TEMPLATE,
        message.into(),
        observed_generation,
        now,
    )
}

/// `ToolsReady=False`: the Job installing tools `version` into `claim` is still running.
pub fn tools_job_running(
    observed_generation: Option<i64>,
    claim: &str,
    version: &str,
    now: Time,
) -> Condition {
    condition(
        types::TOOLS_READY,
        status::FALSE,
        reasons::TOOLS_JOB_RUNNING,
        format!("installing tools {version} into PersistentVolumeClaim {claim}"),
        observed_generation,
        now,
    )
}

/// `ToolsReady=False`: the Job installing the tools failed; `message` says how.
pub fn tools_job_failed(
    observed_generation: Option<i64>,
    message: impl Into<String>,
    now: Time,
) -> Condition {
    condition(
        types::TOOLS_READY,
        status::FALSE,
        reasons::TOOLS_JOB_FAILED,
        message.into(),
        observed_generation,
        now,
    )
}

/// `ToolsReady=True`: `claim` holds tools `version`.
pub fn tools_ready(
    observed_generation: Option<i64>,
    claim: &str,
    version: &str,
    now: Time,
) -> Condition {
    condition(
        types::TOOLS_READY,
        status::TRUE,
        reasons::TOOLS_READY,
        format!("PersistentVolumeClaim {claim} holds tools {version}"),
        observed_generation,
        now,
    )
}

/// `Ready=True`: the tenant is fully served; new pods mount `claim`.
///
/// The message is never empty: Kubernetes' `Condition` requires one, and an empty string is
/// serialized as absent.
pub fn ready(observed_generation: Option<i64>, claim: &str, now: Time) -> Condition {
    condition(
        types::READY,
        status::TRUE,
        reasons::READY,
        format!("new pods get the entrypoint from PersistentVolumeClaim {claim}"),
        observed_generation,
        now,
    )
}

/// `Ready=False`, carrying the reason and message of the condition that blocks it (for example
/// the `ToolsReady=False` condition), so `kubectl get` shows the cause on the summary condition.
pub fn not_ready(observed_generation: Option<i64>, blocking: &Condition, now: Time) -> Condition {
    condition(
        types::READY,
        status::FALSE,
        &blocking.reason,
        blocking.message.clone(),
        observed_generation,
        now,
    )
}

/// The condition of type `type_`, if any.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Returns `conditions` with `new` in place of the condition of the same type (appended when
/// there is none). When the status does not change, the existing `lastTransitionTime` is kept:
/// it records when the status last changed, not when the operator last looked.
pub fn set_condition(mut conditions: Vec<Condition>, mut new: Condition) -> Vec<Condition> {
    match conditions.iter_mut().find(|c| c.type_ == new.type_) {
        Some(existing) => {
            if existing.status == new.status {
                new.last_transition_time = existing.last_transition_time.clone();
            }
            *existing = new;
        }
        None => conditions.push(new),
    }
    conditions
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn at(seconds: i64) -> Time {
        Time(Timestamp::from_second(seconds).expect("valid timestamp"))
    }

    #[test]
    fn constructors_set_type_status_reason_and_generation() {
        let cases = [
            (
                invalid_volume_claim_template(Some(1), "bad", at(0)),
                types::TOOLS_READY,
                status::FALSE,
                reasons::INVALID_VOLUME_CLAIM_TEMPLATE,
            ),
            (
                tools_job_running(Some(2), "tools-v1", "v1", at(0)),
                types::TOOLS_READY,
                status::FALSE,
                reasons::TOOLS_JOB_RUNNING,
            ),
            (
                tools_job_failed(Some(3), "BackoffLimitExceeded", at(0)),
                types::TOOLS_READY,
                status::FALSE,
                reasons::TOOLS_JOB_FAILED,
            ),
            (
                tools_ready(Some(4), "tools-v1", "v1", at(0)),
                types::TOOLS_READY,
                status::TRUE,
                reasons::TOOLS_READY,
            ),
            (
                ready(Some(5), "tools-v1", at(0)),
                types::READY,
                status::TRUE,
                reasons::READY,
            ),
        ];
        for (i, (c, type_, status, reason)) in cases.into_iter().enumerate() {
            assert_eq!(c.type_, type_, "case {i}");
            assert_eq!(c.status, status, "case {i}");
            assert_eq!(c.reason, reason, "case {i}");
            assert_eq!(c.observed_generation, Some(i as i64 + 1), "case {i}");
            assert_eq!(c.last_transition_time, at(0), "case {i}");
        }
    }

    #[test]
    fn not_ready_carries_the_blocking_reason() {
        let blocking = tools_job_failed(Some(7), "Job tools-v1 failed", at(0));
        let c = not_ready(Some(7), &blocking, at(1));
        assert_eq!(c.type_, types::READY);
        assert_eq!(c.status, status::FALSE);
        assert_eq!(c.reason, reasons::TOOLS_JOB_FAILED);
        assert_eq!(c.message, "Job tools-v1 failed");
        assert_eq!(c.observed_generation, Some(7));
    }

    #[test]
    fn set_condition_appends_a_new_type() {
        let conditions = set_condition(Vec::new(), ready(Some(1), "tools-v1", at(10)));
        let conditions = set_condition(
            conditions,
            tools_job_running(Some(1), "tools-v1", "v1", at(11)),
        );
        let types: Vec<_> = conditions.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(types, [types::READY, types::TOOLS_READY]);
    }

    #[test]
    fn set_condition_keeps_transition_time_when_status_is_unchanged() {
        let conditions = vec![tools_job_running(Some(1), "tools-v1", "v1", at(10))];
        let conditions = set_condition(
            conditions,
            tools_job_failed(Some(2), "Job tools-v1 failed", at(20)),
        );
        assert_eq!(conditions.len(), 1);
        let c = &conditions[0];
        // Same status (False): the time stays, everything else is updated.
        assert_eq!(c.last_transition_time, at(10));
        assert_eq!(c.reason, reasons::TOOLS_JOB_FAILED);
        assert_eq!(c.message, "Job tools-v1 failed");
        assert_eq!(c.observed_generation, Some(2));
    }

    #[test]
    fn set_condition_updates_transition_time_when_status_changes() {
        let conditions = vec![
            ready(Some(1), "tools-v1", at(5)),
            tools_job_running(Some(1), "tools-v1", "v1", at(10)),
        ];
        let conditions = set_condition(conditions, tools_ready(Some(1), "tools-v1", "v1", at(30)));
        assert_eq!(conditions.len(), 2);
        let c = find(&conditions, types::TOOLS_READY).expect("ToolsReady is set");
        assert_eq!(c.status, status::TRUE);
        assert_eq!(c.last_transition_time, at(30));
        // Other types are left alone, in place.
        assert_eq!(conditions[0], ready(Some(1), "tools-v1", at(5)));
    }

    #[test]
    fn find_returns_none_for_an_absent_type() {
        assert!(find(&[ready(None, "c", at(0))], types::TOOLS_READY).is_none());
    }
}

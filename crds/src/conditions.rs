//! Condition types and reasons: the one place that names them.
//!
//! `kubectl wait --for=condition=Complete ij/<name>` works because `Complete` is set to `True`
//! when a job succeeds (and `Failed` to `True` when it fails), as `batch/v1` Jobs do.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// InpaintJob condition: the job is in its pool's queue (or waits to get there).
pub const QUEUED: &str = "Queued";
/// InpaintJob condition: a worker is processing the job.
pub const RUNNING: &str = "Running";
/// InpaintJob condition: the job succeeded.
pub const COMPLETE: &str = "Complete";
/// InpaintJob condition: the job failed for good (or was cancelled).
pub const FAILED: &str = "Failed";

/// InpaintPool condition: the worker Deployment is applied and its replicas follow the queue.
pub const READY: &str = "Ready";
/// InpaintPool condition: the pool wants more workers than are ready (GPU nodes being provisioned).
pub const SCALING: &str = "Scaling";

/// Condition reasons (one-word CamelCase).
pub mod reasons {
    /// The job is in the queue.
    pub const ENQUEUED: &str = "Enqueued";
    /// The job names an InpaintPool that does not exist (yet).
    pub const POOL_NOT_FOUND: &str = "PoolNotFound";
    /// The queue (Redis) could not be reached; the operator retries.
    pub const QUEUE_UNAVAILABLE: &str = "QueueUnavailable";
    /// A worker claimed the job.
    pub const CLAIMED: &str = "Claimed";
    /// A worker died and the job went back to the queue.
    pub const RETRYING: &str = "Retrying";
    /// The result is stored.
    pub const SUCCEEDED: &str = "Succeeded";
    /// The input (image, mask, URIs) was unusable; retrying will not help.
    pub const INVALID_INPUT: &str = "InvalidInput";
    /// Every attempt failed; the job was dead-lettered.
    pub const ATTEMPTS_EXHAUSTED: &str = "AttemptsExhausted";
    /// The worker failed without a reason of its own (its reasons, e.g. `InputNotFound`,
    /// `OutOfMemory`, `AddressNotAllowed`, reach the status as they are).
    pub const WORKER_ERROR: &str = "WorkerError";
    /// `timeoutSeconds` passed before the job finished.
    pub const DEADLINE_EXCEEDED: &str = "DeadlineExceeded";
    /// The job was deleted or cancelled before it finished.
    pub const CANCELLED: &str = "Cancelled";
    /// The job finished; the condition no longer applies.
    pub const FINISHED: &str = "Finished";
    /// Pool: Deployment applied.
    pub const DEPLOYMENT_APPLIED: &str = "DeploymentApplied";
    /// Pool: waiting for GPU workers to become ready.
    pub const WAITING_FOR_CAPACITY: &str = "WaitingForCapacity";
    /// Pool: as many ready workers as wanted.
    pub const AT_DESIRED_REPLICAS: &str = "AtDesiredReplicas";
}

/// `metav1.Condition.status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}

impl ConditionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ConditionStatus::True => "True",
            ConditionStatus::False => "False",
            ConditionStatus::Unknown => "Unknown",
        }
    }
}

impl From<bool> for ConditionStatus {
    fn from(b: bool) -> Self {
        if b {
            ConditionStatus::True
        } else {
            ConditionStatus::False
        }
    }
}

pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Whether the condition `type_` is present with status `True`.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    find(conditions, type_).is_some_and(|c| c.status == ConditionStatus::True.as_str())
}

/// Upserts a condition. `lastTransitionTime` moves only when the status value changes,
/// as the API conventions ask; reason, message and generation are always refreshed.
pub fn set(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: ConditionStatus,
    reason: &str,
    message: String,
    observed_generation: Option<i64>,
    now: Time,
) {
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            if c.status != status.as_str() {
                c.status = status.as_str().to_string();
                c.last_transition_time = now;
            }
            c.reason = reason.to_string();
            c.message = message;
            c.observed_generation = observed_generation;
        }
        None => conditions.push(Condition {
            type_: type_.to_string(),
            status: status.as_str().to_string(),
            reason: reason.to_string(),
            message,
            observed_generation,
            last_transition_time: now,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> Time {
        Time(jiff::Timestamp::from_second(secs).expect("valid timestamp"))
    }

    #[test]
    fn transition_time_moves_only_on_status_change() {
        let mut cs = Vec::new();
        set(
            &mut cs,
            QUEUED,
            ConditionStatus::True,
            reasons::ENQUEUED,
            "in queue".into(),
            Some(1),
            t(10),
        );
        set(
            &mut cs,
            QUEUED,
            ConditionStatus::True,
            reasons::ENQUEUED,
            "still".into(),
            Some(2),
            t(20),
        );
        assert_eq!(cs.len(), 1);
        assert_eq!(cs[0].last_transition_time, t(10));
        assert_eq!(cs[0].message, "still");
        assert_eq!(cs[0].observed_generation, Some(2));
        set(
            &mut cs,
            QUEUED,
            ConditionStatus::False,
            reasons::CLAIMED,
            "claimed".into(),
            Some(2),
            t(30),
        );
        assert_eq!(cs[0].last_transition_time, t(30));
        assert_eq!(cs[0].status, "False");
        assert!(!is_true(&cs, QUEUED));
        set(
            &mut cs,
            RUNNING,
            ConditionStatus::True,
            reasons::CLAIMED,
            "w1".into(),
            None,
            t(30),
        );
        assert!(is_true(&cs, RUNNING));
        assert_eq!(cs.len(), 2);
        assert!(find(&cs, COMPLETE).is_none());
    }
}

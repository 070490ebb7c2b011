//! The one place that names every Redis key, consumer group and hash field of the protocol.
//!
//! With the default prefix `pawfect`:
//!
//! | key | type | content |
//! |---|---|---|
//! | `pawfect:jobs:{pool}` | stream, group `workers` | normal-priority entries of the pool |
//! | `pawfect:jobs:{pool}:high` | stream, group `workers` | high-priority entries of the pool |
//! | `pawfect:job:{uid}` | hash | state of one job (fields in [`field`]) |
//! | `pawfect:events` | stream, group `operator` | what happened to jobs (claimed, progress, …) |
//! | `pawfect:dead:{pool}` | stream | jobs that used up their attempts |
//! | `pawfect:workers:{pool}` | hash | worker name → `{"seen": ms, "job": uid or null}` |
//! | `pawfect:pools` | set | every pool that ever had a job or a worker |
//! | `pawfect:server` | hash | `run_id` of the Redis server and `since` (ms) a claim first saw it |
//!
//! Pool names and uids must not contain `:` or whitespace (Kubernetes names and uids never do),
//! so `{pool}:high` of one pool can never be the stream of another pool.

use pawfect_api::Priority;

use crate::error::QueueError;

/// Default key prefix.
pub const DEFAULT_PREFIX: &str = "pawfect";
/// Consumer group of the workers on each job stream.
pub const WORKERS_GROUP: &str = "workers";
/// Consumer group of the operator on the events stream.
pub const OPERATOR_GROUP: &str = "operator";

/// Fields of the job hash `{prefix}:job:{uid}`.
pub mod field {
    /// `queued` | `running` | `succeeded` | `failed` | `cancelled`.
    pub const STATE: &str = "state";
    pub const NAMESPACE: &str = "namespace";
    pub const NAME: &str = "name";
    pub const POOL: &str = "pool";
    /// `high` | `normal`.
    pub const PRIORITY: &str = "priority";
    /// Attempts started so far (each claim or reclaim adds one; a hand-back gives it back).
    pub const ATTEMPT: &str = "attempt";
    pub const MAX_ATTEMPTS: &str = "max_attempts";
    /// Consumer (worker pod) that holds the job; empty while queued.
    pub const WORKER: &str = "worker";
    /// Stream key of the job's current entry.
    pub const STREAM: &str = "stream";
    /// Id of the job's current stream entry.
    pub const ENTRY: &str = "entry";
    /// The `InpaintJobSpec` as JSON.
    pub const SPEC: &str = "spec";
    pub const STAGE: &str = "stage";
    pub const STEP: &str = "step";
    pub const TOTAL_STEPS: &str = "total_steps";
    /// `StageTimings` as JSON.
    pub const TIMINGS: &str = "timings";
    /// `StageWork` as JSON: the work the model stages issued (FLOP and bytes per stage).
    pub const WORK: &str = "work";
    pub const CAPTION: &str = "caption";
    pub const PROMPT: &str = "prompt";
    pub const PROMPT_SOURCE: &str = "prompt_source";
    pub const OUTPUT: &str = "output";
    pub const REASON: &str = "reason";
    pub const MESSAGE: &str = "message";
    /// `1` once a cancel was requested for a running job.
    pub const CANCEL: &str = "cancel";
    /// Milliseconds since the Unix epoch (Redis server clock), like every `*_at` field.
    pub const ENQUEUED_AT: &str = "enqueued_at";
    pub const CLAIMED_AT: &str = "claimed_at";
    pub const HEARTBEAT_AT: &str = "heartbeat_at";
    pub const FINISHED_AT: &str = "finished_at";
}

/// Fields of a job stream entry.
pub mod entry_field {
    pub const UID: &str = "uid";
    pub const NAMESPACE: &str = "namespace";
    pub const NAME: &str = "name";
    /// Attempts used when the entry was written.
    pub const ATTEMPT: &str = "attempt";
    pub const SPEC: &str = "spec";
}

/// Key names under one prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// Keys under `prefix` (validated: non-empty, no whitespace).
    pub fn new(prefix: &str) -> Result<Self, QueueError> {
        if prefix.is_empty() || prefix.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(QueueError::InvalidName {
                what: "key prefix",
                value: prefix.to_string(),
                reason: "must be non-empty and free of whitespace",
            });
        }
        Ok(Keys {
            prefix: prefix.to_string(),
        })
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Normal-priority stream of a pool.
    pub fn jobs(&self, pool: &str) -> String {
        format!("{}:jobs:{pool}", self.prefix)
    }

    /// High-priority stream of a pool.
    pub fn jobs_high(&self, pool: &str) -> String {
        format!("{}:jobs:{pool}:high", self.prefix)
    }

    /// The stream a job of this priority goes to.
    pub fn stream(&self, pool: &str, priority: Priority) -> String {
        match priority {
            Priority::High => self.jobs_high(pool),
            Priority::Normal => self.jobs(pool),
        }
    }

    /// Hash of one job.
    pub fn job(&self, uid: &str) -> String {
        format!("{}:job:{uid}", self.prefix)
    }

    /// Events stream (one for all pools).
    pub fn events(&self) -> String {
        format!("{}:events", self.prefix)
    }

    /// Dead-letter stream of a pool.
    pub fn dead(&self, pool: &str) -> String {
        format!("{}:dead:{pool}", self.prefix)
    }

    /// Worker registry hash of a pool.
    pub fn workers(&self, pool: &str) -> String {
        format!("{}:workers:{pool}", self.prefix)
    }

    /// Set of pool names.
    pub fn pools(&self) -> String {
        format!("{}:pools", self.prefix)
    }

    /// Hash of the Redis server's `run_id` and `since` (ms): when a claim first saw this
    /// server run, so reclaims wait a lease after a restart.
    pub fn server(&self) -> String {
        format!("{}:server", self.prefix)
    }
}

/// Checks a pool name, job uid or worker name for use in keys and as a consumer name.
pub(crate) fn validate_name(what: &'static str, value: &str) -> Result<(), QueueError> {
    let reason = if value.is_empty() {
        Some("must not be empty")
    } else if value.len() > 253 {
        Some("must be at most 253 bytes")
    } else if value.contains(':') {
        Some("must not contain ':'")
    } else if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Some("must not contain whitespace or control characters")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(QueueError::InvalidName {
            what,
            value: value.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_names() {
        let k = Keys::new("pawfect").unwrap();
        assert_eq!(k.jobs("default"), "pawfect:jobs:default");
        assert_eq!(k.jobs_high("default"), "pawfect:jobs:default:high");
        assert_eq!(k.stream("t4", Priority::High), "pawfect:jobs:t4:high");
        assert_eq!(k.stream("t4", Priority::Normal), "pawfect:jobs:t4");
        assert_eq!(k.job("1234"), "pawfect:job:1234");
        assert_eq!(k.events(), "pawfect:events");
        assert_eq!(k.dead("t4"), "pawfect:dead:t4");
        assert_eq!(k.workers("t4"), "pawfect:workers:t4");
        assert_eq!(k.pools(), "pawfect:pools");
        assert_eq!(k.server(), "pawfect:server");
    }

    #[test]
    fn bad_names_are_rejected() {
        assert!(Keys::new("").is_err());
        assert!(Keys::new("a b").is_err());
        assert!(validate_name("pool", "default").is_ok());
        assert!(validate_name("pool", "t4-pool.x_1").is_ok());
        for bad in ["", "a:high", "a b", "tab\t", &"x".repeat(254)] {
            let err = validate_name("pool", bad).unwrap_err();
            assert!(err.to_string().contains("pool"), "{err}");
        }
    }
}

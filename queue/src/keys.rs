//! The one place that names every Redis key, consumer group and hash field of the protocol.
//!
//! Every key a worker touches lies under its pool's own prefix `{prefix}:p:{pool}:`, so one
//! Redis ACL key pattern per pool (`~{prefix}:p:{pool}:*`, [`Keys::pool_pattern`]) gives a
//! pool's workers their jobs and nothing of any other pool. With the default prefix `pawfect`
//! and the queue pool `media/t4` (`<namespace>/<InpaintPool>`):
//!
//! | key | type | content |
//! |---|---|---|
//! | `pawfect:p:media/t4:jobs` | stream, group `workers` | normal-priority entries of the pool |
//! | `pawfect:p:media/t4:jobs:high` | stream, group `workers` | high-priority entries of the pool |
//! | `pawfect:p:media/t4:job:{uid}` | hash | state of one job of the pool (fields in [`field`]) |
//! | `pawfect:p:media/t4:events` | stream, group `operator` | what happened to the pool's jobs (claimed, progress, …) |
//! | `pawfect:p:media/t4:dead` | stream | the pool's jobs that used up their attempts |
//! | `pawfect:p:media/t4:workers` | hash | worker name → `{"seen": ms, "job": uid or null}` |
//! | `pawfect:p:media/t4:server` | hash | `run_id` of the Redis server and `since` (ms) a claim of the pool first saw it |
//! | `pawfect:pools` | set | every pool the operator queued a job for or made a user for (operator only) |
//!
//! Pool names and uids must not contain `:`, whitespace or the glob characters `*?[]\`
//! (Kubernetes names and uids never do), so `{pool}:` of one pool is never a prefix of another
//! pool's keys and a pool's pattern matches its own keys only.

use pawfect_api::Priority;

use crate::error::QueueError;

/// Default key prefix.
pub const DEFAULT_PREFIX: &str = "pawfect";
/// Consumer group of the workers on each job stream.
pub const WORKERS_GROUP: &str = "workers";
/// Consumer group of the operator on the events stream.
pub const OPERATOR_GROUP: &str = "operator";

/// Fields of the job hash `{prefix}:p:{pool}:job:{uid}`.
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

    /// The prefix every key of a pool starts with: `{prefix}:p:{pool}:`.
    pub fn pool_base(&self, pool: &str) -> String {
        format!("{}:p:{pool}:", self.prefix)
    }

    /// The ACL key pattern that covers every key of a pool and of no other pool.
    pub fn pool_pattern(&self, pool: &str) -> String {
        format!("{}*", self.pool_base(pool))
    }

    /// Normal-priority stream of a pool.
    pub fn jobs(&self, pool: &str) -> String {
        format!("{}jobs", self.pool_base(pool))
    }

    /// High-priority stream of a pool.
    pub fn jobs_high(&self, pool: &str) -> String {
        format!("{}jobs:high", self.pool_base(pool))
    }

    /// The stream a job of this priority goes to.
    pub fn stream(&self, pool: &str, priority: Priority) -> String {
        match priority {
            Priority::High => self.jobs_high(pool),
            Priority::Normal => self.jobs(pool),
        }
    }

    /// What job hash keys of a pool start with (the scripts append the uid they read from an
    /// entry): `job(pool, uid) == job_prefix(pool) + uid`.
    pub fn job_prefix(&self, pool: &str) -> String {
        format!("{}job:", self.pool_base(pool))
    }

    /// Hash of one job.
    pub fn job(&self, pool: &str, uid: &str) -> String {
        format!("{}{uid}", self.job_prefix(pool))
    }

    /// Events stream of a pool (the operator reads every pool's through one group).
    pub fn events(&self, pool: &str) -> String {
        format!("{}events", self.pool_base(pool))
    }

    /// Dead-letter stream of a pool.
    pub fn dead(&self, pool: &str) -> String {
        format!("{}dead", self.pool_base(pool))
    }

    /// Worker registry hash of a pool.
    pub fn workers(&self, pool: &str) -> String {
        format!("{}workers", self.pool_base(pool))
    }

    /// Hash of the Redis server's `run_id` and `since` (ms): when a claim of the pool first saw
    /// this server run, so reclaims wait a lease after a restart.
    pub fn server(&self, pool: &str) -> String {
        format!("{}server", self.pool_base(pool))
    }

    /// Set of pool names (written and read by the operator only).
    pub fn pools(&self) -> String {
        format!("{}:pools", self.prefix)
    }

    /// Key patterns of the layout before pools had their own prefix (`{prefix}:jobs:*`,
    /// `{prefix}:job:*`, `{prefix}:events`, …), for the operator's upgrade check.
    pub fn legacy_patterns(&self) -> [String; 6] {
        let p = &self.prefix;
        [
            format!("{p}:jobs:*"),
            format!("{p}:job:*"),
            format!("{p}:events"),
            format!("{p}:dead:*"),
            format!("{p}:workers:*"),
            format!("{p}:server"),
        ]
    }

    /// Name of the Redis ACL user of a pool's workers: `{prefix}:{pool}`.
    pub fn pool_user(&self, pool: &str) -> String {
        format!("{}:{pool}", self.prefix)
    }

    /// The pool of an events stream key of [`events`](Self::events) (None for other keys).
    pub fn pool_of_events(&self, key: &str) -> Option<String> {
        let rest = key.strip_prefix(&format!("{}:p:", self.prefix))?;
        let pool = rest.strip_suffix(":events")?;
        (!pool.contains(':')).then(|| pool.to_string())
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
    } else if value.contains(['*', '?', '[', ']', '\\']) {
        Some("must not contain the glob characters * ? [ ] \\")
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
        let p = "media/t4";
        assert_eq!(k.jobs(p), "pawfect:p:media/t4:jobs");
        assert_eq!(k.jobs_high(p), "pawfect:p:media/t4:jobs:high");
        assert_eq!(k.stream(p, Priority::High), "pawfect:p:media/t4:jobs:high");
        assert_eq!(k.stream(p, Priority::Normal), "pawfect:p:media/t4:jobs");
        assert_eq!(k.job(p, "1234"), "pawfect:p:media/t4:job:1234");
        assert_eq!(k.job(p, "1234"), format!("{}1234", k.job_prefix(p)));
        assert_eq!(k.events(p), "pawfect:p:media/t4:events");
        assert_eq!(k.dead(p), "pawfect:p:media/t4:dead");
        assert_eq!(k.workers(p), "pawfect:p:media/t4:workers");
        assert_eq!(k.server(p), "pawfect:p:media/t4:server");
        assert_eq!(k.pools(), "pawfect:pools");
        assert_eq!(k.pool_user(p), "pawfect:media/t4");
        assert_eq!(k.pool_of_events(&k.events(p)).as_deref(), Some(p));
        assert_eq!(k.pool_of_events(&k.jobs(p)), None);
        assert_eq!(k.pool_of_events("other:p:media/t4:events"), None);
    }

    /// Every key of a pool matches its pattern; no key of another pool does, also where one
    /// pool's name starts with another's or two namespaces have a pool of the same name.
    #[test]
    fn a_pool_pattern_covers_its_own_keys_only() {
        fn glob(pattern: &str, key: &str) -> bool {
            // The patterns are `literal*` (names hold no other glob character).
            let lit = pattern.strip_suffix('*').unwrap();
            assert!(!lit.contains(['*', '?', '[', ']', '\\']));
            key.starts_with(lit)
        }
        let k = Keys::new("pawfect").unwrap();
        let pools = [
            "media/t4",
            "media/t4-big",
            "other/t4",
            "media/t",
            "media.x/t4",
        ];
        let keys_of = |p: &str| {
            vec![
                k.jobs(p),
                k.jobs_high(p),
                k.job(p, "u-1"),
                k.events(p),
                k.dead(p),
                k.workers(p),
                k.server(p),
            ]
        };
        for a in pools {
            for b in pools {
                for key in keys_of(b) {
                    assert_eq!(glob(&k.pool_pattern(a), &key), a == b, "{a} vs {key}");
                }
            }
            assert!(!glob(&k.pool_pattern(a), &k.pools()));
        }
    }

    #[test]
    fn bad_names_are_rejected() {
        assert!(Keys::new("").is_err());
        assert!(Keys::new("a b").is_err());
        assert!(validate_name("pool", "default").is_ok());
        assert!(validate_name("pool", "t4-pool.x_1").is_ok());
        for bad in [
            "",
            "a:high",
            "a b",
            "tab\t",
            "a*",
            "a?",
            "a[1]",
            &"x".repeat(254),
        ] {
            let err = validate_name("pool", bad).unwrap_err();
            assert!(err.to_string().contains("pool"), "{err}");
        }
    }
}

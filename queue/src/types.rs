//! Values that cross the queue: job identity, state, results, outcomes.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use jiff::Timestamp;
use pawfect_api::{JobPhase, JobProgress, Priority, StageTimings, StageWork};
use serde::{Deserialize, Serialize};

use crate::error::QueueError;
use crate::keys::field;

/// Which InpaintJob a queue job is: its Kubernetes uid (the queue key) and where it lives.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct JobRef {
    pub uid: String,
    pub namespace: String,
    pub name: String,
}

impl JobRef {
    pub fn new(
        uid: impl Into<String>,
        namespace: impl Into<String>,
        name: impl Into<String>,
    ) -> Self {
        JobRef {
            uid: uid.into(),
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

/// State of a job in the queue (field `state` of the job hash).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// An entry waits in the pool's stream (or was delivered and is being claimed).
    Queued,
    /// A worker holds the entry.
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }

    /// The InpaintJob phase this state maps to.
    pub fn phase(self) -> JobPhase {
        match self {
            JobState::Queued => JobPhase::Queued,
            JobState::Running => JobPhase::Running,
            JobState::Succeeded => JobPhase::Succeeded,
            JobState::Failed => JobPhase::Failed,
            JobState::Cancelled => JobPhase::Cancelled,
        }
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobState {
    type Err = QueueError;
    fn from_str(s: &str) -> Result<Self, QueueError> {
        Ok(match s {
            "queued" => JobState::Queued,
            "running" => JobState::Running,
            "succeeded" => JobState::Succeeded,
            "failed" => JobState::Failed,
            "cancelled" => JobState::Cancelled,
            other => {
                return Err(QueueError::protocol(
                    "job state",
                    format!("unknown state {other:?}"),
                ));
            }
        })
    }
}

pub(crate) fn parse_priority(s: &str) -> Result<Priority, QueueError> {
    match s {
        "high" => Ok(Priority::High),
        "normal" => Ok(Priority::Normal),
        other => Err(QueueError::protocol(
            "priority",
            format!("unknown priority {other:?}"),
        )),
    }
}

/// Where a running job is in the pipeline (payload of `progress` events).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    /// Pipeline stage (fetch, mask, crop, caption, encode, denoise, decode, stitch, store).
    pub stage: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_steps: Option<u32>,
}

impl Progress {
    pub fn new(stage: impl Into<String>, step: Option<u32>, total_steps: Option<u32>) -> Self {
        Progress {
            stage: stage.into(),
            step,
            total_steps,
        }
    }

    /// The InpaintJob status form (with the one-line summary).
    pub fn to_job_progress(&self) -> JobProgress {
        JobProgress::new(&self.stage, self.step, self.total_steps)
    }
}

/// What a successful attempt produced (payload of `succeeded` events).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobResult {
    /// URI the result was written to.
    pub output: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caption: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// Where the prompt came from: `prompt`, `sceneLabels`, `caption` or `fallback`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_source: Option<String>,
    #[serde(default)]
    pub timings: StageTimings,
    /// Work the model stages issued; absent from workers that do not count it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub work: Option<StageWork>,
}

/// Why a job failed or stopped (payload of `failed`, `retrying` and `cancelled` events).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorInfo {
    /// One-word CamelCase reason (see `pawfect_api::conditions::reasons`).
    pub reason: String,
    pub message: String,
}

impl ErrorInfo {
    pub fn new(reason: impl Into<String>, message: impl Into<String>) -> Self {
        ErrorInfo {
            reason: reason.into(),
            message: message.into(),
        }
    }
}

/// A failed attempt as the worker reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub reason: String,
    pub message: String,
    /// Whether another attempt may succeed (out of memory, storage hiccup: yes; unusable
    /// input: no). A retryable failure requeues the job while attempts remain.
    pub retryable: bool,
}

impl Failure {
    /// A failure another attempt may fix.
    pub fn retryable(reason: impl Into<String>, message: impl Into<String>) -> Self {
        Failure {
            reason: reason.into(),
            message: message.into(),
            retryable: true,
        }
    }

    /// A failure no retry will fix (e.g. `InvalidInput`).
    pub fn permanent(reason: impl Into<String>, message: impl Into<String>) -> Self {
        Failure {
            reason: reason.into(),
            message: message.into(),
            retryable: false,
        }
    }
}

/// Reply to [`Queue::enqueue`](crate::Queue::enqueue).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Enqueued {
    /// False when the uid was already known: nothing was added.
    pub created: bool,
    /// State of the job now (a known job may be running or finished).
    pub state: JobState,
    /// Id of the job's current stream entry (none once finished).
    pub entry_id: Option<String>,
}

/// Reply to [`Queue::cancel`](crate::Queue::cancel).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CancelOutcome {
    /// The job was waiting: its entry is gone and it is `cancelled` (a `cancelled` event was sent).
    Cancelled,
    /// The job is running: its cancel flag is set; the worker stops at its next check and
    /// acknowledges with a `cancelled` event (or a dead worker's entry is cancelled when reclaimed).
    Requested,
    /// The job had already finished in this state.
    AlreadyFinished(JobState),
    /// The queue does not know the uid.
    NotFound,
}

/// Reply to the terminal calls of a [`Claim`](crate::Claim) (complete, fail, cancelled, hand back).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The job is now in this terminal state because of this call.
    Finished(JobState),
    /// The job went back to its stream (retryable failure, hand-back); `attempt` attempts are used.
    Requeued { attempt: u32 },
    /// A retryable failure with no attempts left: the job failed (`AttemptsExhausted`) and was
    /// copied to the dead-letter stream.
    DeadLettered,
    /// The job had already finished in this state (e.g. another worker completed it after a
    /// reclaim). This claim's entry was acknowledged; nothing else changed and no event was sent.
    AlreadyFinished(JobState),
    /// Another worker holds the job now (this worker missed its lease). Nothing changed.
    Lost,
    /// The queue no longer knows the job (forgotten); the entry was acknowledged.
    NotFound,
}

/// What a running worker should do, as seen by a heartbeat, a progress report or a check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Standing {
    /// The claim is valid: keep going.
    Active,
    /// A cancel was requested: stop and call [`Claim::cancelled`](crate::Claim::cancelled).
    CancelRequested,
    /// The claim is no longer this worker's (taken over after a missed lease, finished
    /// elsewhere, or forgotten): stop and drop the claim without completing it.
    Lost,
}

impl Standing {
    /// True unless the worker should keep going.
    pub fn should_stop(self) -> bool {
        self != Standing::Active
    }
}

/// Everything the queue knows about a job (the job hash), for resync.
#[derive(Clone, Debug, PartialEq)]
pub struct JobRecord {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub pool: String,
    /// `None`: a priority this version does not know (a newer operator wrote it). The record
    /// stays readable so that the job's status can show what happened to it (a worker fails
    /// such a job at its claim with `InvalidInput`).
    pub priority: Option<Priority>,
    pub state: JobState,
    /// Attempts started (each claim or reclaim adds one; a hand-back gives it back).
    pub attempt: u32,
    pub max_attempts: u32,
    /// Worker holding (running) or last holding (finished) the job.
    pub worker: Option<String>,
    /// Stream and entry id of the job's current entry (none once finished).
    pub stream: Option<String>,
    pub entry_id: Option<String>,
    pub progress: Option<Progress>,
    pub timings: Option<StageTimings>,
    pub work: Option<StageWork>,
    pub caption: Option<String>,
    pub prompt: Option<String>,
    pub prompt_source: Option<String>,
    pub output: Option<String>,
    /// Reason and message of the failure or cancellation (or of the last retried failure).
    pub reason: Option<String>,
    pub message: Option<String>,
    pub cancel_requested: bool,
    pub enqueued_at: Option<Timestamp>,
    pub claimed_at: Option<Timestamp>,
    pub heartbeat_at: Option<Timestamp>,
    pub finished_at: Option<Timestamp>,
}

impl JobRecord {
    pub(crate) fn from_hash(uid: &str, mut h: HashMap<String, String>) -> Result<Self, QueueError> {
        let mut take = |k: &str| h.remove(k).filter(|v| !v.is_empty());
        let state: JobState = take(field::STATE)
            .ok_or_else(|| QueueError::protocol("job hash", format!("job {uid} has no state")))?
            .parse()?;
        let priority = parse_priority(take(field::PRIORITY).as_deref().unwrap_or("normal")).ok();
        let stage = take(field::STAGE);
        let step = parse_opt_u32("step", take(field::STEP))?;
        let total_steps = parse_opt_u32("total_steps", take(field::TOTAL_STEPS))?;
        let timings = match take(field::TIMINGS) {
            Some(t) => Some(serde_json::from_str(&t).map_err(|source| QueueError::Json {
                what: "job timings",
                source,
            })?),
            None => None,
        };
        let work = match take(field::WORK) {
            Some(t) => Some(serde_json::from_str(&t).map_err(|source| QueueError::Json {
                what: "job work counts",
                source,
            })?),
            None => None,
        };
        Ok(JobRecord {
            uid: uid.to_string(),
            namespace: take(field::NAMESPACE).unwrap_or_default(),
            name: take(field::NAME).unwrap_or_default(),
            pool: take(field::POOL).unwrap_or_default(),
            priority,
            state,
            // Counters another version or a person wrote as something else than a number read
            // as their defaults, for the same reason (the claim refused such a job).
            attempt: parse_opt_u32("attempt", take(field::ATTEMPT))
                .ok()
                .flatten()
                .unwrap_or(0),
            max_attempts: parse_opt_u32("max_attempts", take(field::MAX_ATTEMPTS))
                .ok()
                .flatten()
                .unwrap_or(1),
            worker: take(field::WORKER),
            stream: take(field::STREAM),
            entry_id: take(field::ENTRY),
            progress: stage.map(|stage| Progress {
                stage,
                step,
                total_steps,
            }),
            timings,
            work,
            caption: take(field::CAPTION),
            prompt: take(field::PROMPT),
            prompt_source: take(field::PROMPT_SOURCE),
            output: take(field::OUTPUT),
            reason: take(field::REASON),
            message: take(field::MESSAGE),
            cancel_requested: take(field::CANCEL).as_deref() == Some("1"),
            enqueued_at: parse_opt_ts(take(field::ENQUEUED_AT))?,
            claimed_at: parse_opt_ts(take(field::CLAIMED_AT))?,
            heartbeat_at: parse_opt_ts(take(field::HEARTBEAT_AT))?,
            finished_at: parse_opt_ts(take(field::FINISHED_AT))?,
        })
    }
}

/// A worker in a pool's registry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerInfo {
    pub name: String,
    /// Last heartbeat or poll of the worker (Redis clock).
    pub last_seen: Timestamp,
    /// Uid of the job it runs; none while idle.
    pub job: Option<String>,
}

/// A job entry held by a worker (from the consumer group's pending list): the truth about
/// who is busy, whether or not the worker is still alive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BusyWorker {
    /// Consumer (worker) holding the entry.
    pub worker: String,
    pub uid: String,
    pub priority: Priority,
    pub entry_id: String,
    /// Milliseconds since the last delivery or heartbeat of the entry.
    pub idle_ms: u64,
    /// Times the entry was delivered (heartbeats do not count).
    pub deliveries: u64,
}

/// An entry of a pool's dead-letter stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetter {
    pub id: String,
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub priority: Priority,
    pub attempt: u32,
    pub max_attempts: u32,
    /// Worker that held the job last.
    pub worker: Option<String>,
    /// Always `AttemptsExhausted`.
    pub reason: String,
    pub message: String,
    /// Reason of the last failed attempt (`WorkerLost` when its worker stopped heartbeating).
    pub last_reason: String,
    /// The job spec as JSON.
    pub spec: String,
    pub at: Timestamp,
}

/// A value as JSON for Redis (spec, timings, event payloads).
pub(crate) fn to_json<T: Serialize>(what: &'static str, v: &T) -> Result<String, QueueError> {
    serde_json::to_string(v).map_err(|source| QueueError::Json { what, source })
}

pub(crate) fn parse_opt_u32(
    what: &'static str,
    v: Option<String>,
) -> Result<Option<u32>, QueueError> {
    v.map(|s| {
        s.parse::<u32>()
            .map_err(|_| QueueError::protocol("number field", format!("{what} = {s:?}")))
    })
    .transpose()
}

pub(crate) fn parse_ts(ms: &str) -> Result<Timestamp, QueueError> {
    let n: i64 = ms
        .parse()
        .map_err(|_| QueueError::protocol("timestamp", format!("not a number: {ms:?}")))?;
    Timestamp::from_millisecond(n)
        .map_err(|e| QueueError::protocol("timestamp", format!("{ms}: {e}")))
}

pub(crate) fn parse_opt_ts(v: Option<String>) -> Result<Option<Timestamp>, QueueError> {
    v.map(|s| parse_ts(&s)).transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trip() {
        for s in [
            JobState::Queued,
            JobState::Running,
            JobState::Succeeded,
            JobState::Failed,
            JobState::Cancelled,
        ] {
            assert_eq!(s.as_str().parse::<JobState>().unwrap(), s);
            assert_eq!(s.phase().as_str().to_lowercase(), s.as_str());
        }
        assert!("done".parse::<JobState>().is_err());
    }

    #[test]
    fn record_from_hash() {
        let h: HashMap<String, String> = [
            ("state", "running"),
            ("namespace", "ns"),
            ("name", "j"),
            ("pool", "default"),
            ("priority", "high"),
            ("attempt", "2"),
            ("max_attempts", "3"),
            ("worker", "w-1"),
            ("stage", "denoise"),
            ("step", "4"),
            ("total_steps", "20"),
            ("timings", r#"{"fetch":12}"#),
            ("cancel", "1"),
            ("enqueued_at", "1700000000123"),
            ("caption", ""),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let r = JobRecord::from_hash("u1", h).unwrap();
        assert_eq!(r.state, JobState::Running);
        assert_eq!(r.priority, Some(Priority::High));
        assert_eq!(r.attempt, 2);
        assert_eq!(r.worker.as_deref(), Some("w-1"));
        assert_eq!(
            r.progress,
            Some(Progress::new("denoise", Some(4), Some(20)))
        );
        assert_eq!(r.timings.unwrap().fetch, Some(12));
        assert!(r.cancel_requested);
        assert_eq!(r.enqueued_at.unwrap().as_millisecond(), 1_700_000_000_123);
        assert_eq!(r.caption, None);
        // Fields another version may write differently stay readable (their defaults);
        // a hash without a state is not a job.
        let odd: HashMap<String, String> = [
            ("state".to_string(), "failed".to_string()),
            ("attempt".to_string(), "x".to_string()),
            ("max_attempts".to_string(), "three".to_string()),
            ("priority".to_string(), "low".to_string()),
        ]
        .into();
        let r = JobRecord::from_hash("u", odd).unwrap();
        assert_eq!((r.attempt, r.max_attempts, r.priority), (0, 1, None));
        let stateless: HashMap<String, String> = [("attempt".to_string(), "1".to_string())].into();
        assert!(JobRecord::from_hash("u", stateless).is_err());
    }
}

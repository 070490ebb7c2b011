//! InpaintJob status as pure functions of (job, current status, queue state, now), and the
//! Kubernetes Events that a status transition publishes.
//!
//! The queue's job hash is the source of truth while a job is in flight: every reconcile maps
//! the hash to a status, so events from the queue only make that happen sooner, and a lost
//! event never leaves a job stuck. Once a status is terminal it never changes again.

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use pawfect_api::conditions::{self, ConditionStatus, reasons};
use pawfect_api::job::format_duration;
use pawfect_api::redact_uri;
use pawfect_api::{
    InpaintJob, InpaintJobStatus, JobPhase, JobProgress, PromptOrigin, StageTimings, StageWork,
};

/// State of a job in its queue hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueState {
    /// In a pool stream, not claimed (also after a worker handed it back or died).
    Queued,
    /// Claimed by a worker.
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

/// What the queue knows about one job (its hash), in the operator's terms.
#[derive(Clone, Debug, PartialEq)]
pub struct QueueJob {
    pub state: QueueState,
    /// Attempts started so far.
    pub attempt: u32,
    pub max_attempts: u32,
    /// Worker (pod name) holding the job, or the last one that did.
    pub worker: Option<String>,
    pub stage: Option<String>,
    pub step: Option<u32>,
    pub total_steps: Option<u32>,
    pub timings: Option<StageTimings>,
    /// Work the model stages issued (the worker's counts).
    pub work: Option<StageWork>,
    pub caption: Option<String>,
    pub prompt: Option<String>,
    /// The queue's word for where the prompt came from (`PromptOrigin::as_str`).
    pub prompt_source: Option<String>,
    pub output: Option<String>,
    /// Failure reason (one CamelCase word, see `pawfect_api::conditions::reasons`).
    pub reason: Option<String>,
    pub message: Option<String>,
    pub enqueued_at: Option<Timestamp>,
    pub claimed_at: Option<Timestamp>,
    pub finished_at: Option<Timestamp>,
}

/// A Kubernetes Event to publish about a job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobEvent {
    pub warning: bool,
    pub reason: String,
    pub action: &'static str,
    pub note: String,
}

fn time(t: Timestamp) -> Time {
    Time(t)
}

fn base(job: &InpaintJob, old: Option<&InpaintJobStatus>) -> InpaintJobStatus {
    let mut s = old.cloned().unwrap_or_default();
    s.observed_generation = job.metadata.generation;
    s
}

/// Sets `type_` to False with `reason` if the condition is present (a condition that never
/// applied is not added just to say it does not).
fn settle(s: &mut InpaintJobStatus, type_: &str, reason: &str, message: &str, now: Timestamp) {
    if s.condition(type_).is_some() {
        let g = s.observed_generation;
        s.set_condition(type_, ConditionStatus::False, reason, message, g, time(now));
    }
}

fn set(
    s: &mut InpaintJobStatus,
    type_: &str,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    now: Timestamp,
) {
    let g = s.observed_generation;
    s.set_condition(type_, status.into(), reason, message, g, time(now));
}

fn refresh_duration(s: &mut InpaintJobStatus, now: Timestamp) {
    let Some(start) = s.queued_at.as_ref().map(|t| t.0) else {
        s.duration = None;
        return;
    };
    let end = s.completed_at.as_ref().map_or(now, |t| t.0);
    s.duration = Some(format_duration(end.duration_since(start).as_secs()));
}

fn pool_of(job: &InpaintJob) -> &str {
    &job.spec.pool
}

/// The job waits because its InpaintPool does not exist.
pub fn pool_not_found(
    job: &InpaintJob,
    old: Option<&InpaintJobStatus>,
    now: Timestamp,
) -> InpaintJobStatus {
    let mut s = base(job, old);
    s.phase = Some(JobPhase::Pending);
    let msg = format!(
        "InpaintPool {:?} not found in namespace {:?}; the job is queued once it exists",
        pool_of(job),
        job.namespace().unwrap_or_default()
    );
    set(
        &mut s,
        conditions::QUEUED,
        false,
        reasons::POOL_NOT_FOUND,
        msg.clone(),
        now,
    );
    s.reason = Some(reasons::POOL_NOT_FOUND.into());
    s.message = Some(msg);
    s
}

/// The job could not be enqueued because the queue is unreachable (the operator retries).
pub fn queue_unavailable(
    job: &InpaintJob,
    old: Option<&InpaintJobStatus>,
    error: &str,
    now: Timestamp,
) -> InpaintJobStatus {
    let mut s = base(job, old);
    s.phase = Some(s.phase.unwrap_or(JobPhase::Pending));
    let msg = format!("cannot reach the queue, retrying: {error}");
    set(
        &mut s,
        conditions::QUEUED,
        false,
        reasons::QUEUE_UNAVAILABLE,
        msg.clone(),
        now,
    );
    s.reason = Some(reasons::QUEUE_UNAVAILABLE.into());
    s.message = Some(msg);
    s
}

/// The job was (or already had been) put into its pool's queue.
pub fn enqueued(
    job: &InpaintJob,
    old: Option<&InpaintJobStatus>,
    now: Timestamp,
) -> InpaintJobStatus {
    let mut s = base(job, old);
    s.phase = Some(JobPhase::Queued);
    s.queued_at = s.queued_at.take().or(Some(time(now)));
    waiting_in_queue(&mut s, job, now);
    refresh_duration(&mut s, now);
    s
}

/// `Queued` condition, reason and message of a job waiting in its pool's queue.
fn waiting_in_queue(s: &mut InpaintJobStatus, job: &InpaintJob, now: Timestamp) {
    let msg = format!(
        "in the {} queue of pool {:?}",
        job.spec.priority.as_str(),
        pool_of(job)
    );
    set(
        s,
        conditions::QUEUED,
        true,
        reasons::ENQUEUED,
        msg.clone(),
        now,
    );
    s.reason = Some(reasons::ENQUEUED.into());
    s.message = Some(msg);
}

/// `timeoutSeconds` passed: the job is cancelled in the queue and failed.
pub fn deadline_exceeded(
    job: &InpaintJob,
    old: Option<&InpaintJobStatus>,
    now: Timestamp,
) -> InpaintJobStatus {
    let mut s = base(job, old);
    let msg = format!(
        "not finished within timeoutSeconds={}; cancelled",
        job.spec.timeout_seconds
    );
    finish_failed(&mut s, reasons::DEADLINE_EXCEEDED, &msg, now, now);
    s.phase = Some(JobPhase::Failed);
    s
}

fn finish_failed(
    s: &mut InpaintJobStatus,
    reason: &str,
    msg: &str,
    completed: Timestamp,
    now: Timestamp,
) {
    settle(s, conditions::QUEUED, reasons::FINISHED, msg, now);
    settle(s, conditions::RUNNING, reasons::FINISHED, msg, now);
    set(s, conditions::FAILED, true, reason, msg, now);
    s.completed_at = Some(time(completed));
    s.reason = Some(reason.to_string());
    s.message = Some(msg.to_string());
    refresh_duration(s, now);
}

/// The worker's failure reason (`InputNotFound`, `AddressNotAllowed`, `OutputIsInput`, …)
/// passes through to the status, the `Failed` condition and the Event, so `kubectl get ij`
/// says why; a missing reason, or one that is not a CamelCase word (a condition reason must
/// be one), becomes `WorkerError`.
fn failure_reason(r: Option<&str>) -> String {
    match r {
        Some(r) if is_reason_word(r) => r.to_string(),
        _ => reasons::WORKER_ERROR.to_string(),
    }
}

/// One CamelCase word of at most 64 ASCII letters and digits.
fn is_reason_word(r: &str) -> bool {
    r.len() <= 64
        && r.starts_with(|c: char| c.is_ascii_uppercase())
        && r.chars().all(|c| c.is_ascii_alphanumeric())
}

/// The status that mirrors the queue's view of a job that was enqueued.
pub fn from_queue(
    job: &InpaintJob,
    old: Option<&InpaintJobStatus>,
    q: &QueueJob,
    now: Timestamp,
) -> InpaintJobStatus {
    let mut s = base(job, old);
    if s.phase.is_some_and(JobPhase::is_terminal) {
        return s;
    }
    s.queued_at = s
        .queued_at
        .take()
        .or(q.enqueued_at.map(time))
        .or(Some(time(now)));
    if q.attempt > 0 {
        s.attempts = Some(q.attempt);
    }
    if let Some(w) = q.worker.as_deref().filter(|w| !w.is_empty()) {
        s.worker = Some(w.to_string());
    }
    if let Some(stage) = q.stage.as_deref().filter(|st| !st.is_empty()) {
        s.progress = Some(JobProgress::new(stage, q.step, q.total_steps));
    }
    if q.timings.is_some() {
        s.timings = q.timings.clone();
    }
    if q.work.is_some() {
        s.work = q.work.clone();
    }
    if q.caption.is_some() {
        s.caption = q.caption.clone();
    }
    if q.prompt.is_some() {
        s.prompt = q.prompt.clone();
    }
    // A word this version does not know (a newer worker's) is left out rather than failing the
    // status write; the prompt itself is still reported.
    if let Some(origin) = q.prompt_source.as_deref().and_then(PromptOrigin::parse) {
        s.prompt_source = Some(origin);
    }
    let attempts = format!("attempt {}/{}", q.attempt.max(1), q.max_attempts.max(1));
    match q.state {
        QueueState::Queued => {
            s.phase = Some(JobPhase::Queued);
            // Back in the queue after an attempt: a retryable failure (attempt kept), or a
            // worker that shut down and handed the job back (attempt given back, reason set).
            let back = q.attempt > 0 || q.reason.as_deref().is_some_and(|r| !r.is_empty());
            if back {
                let what = if q.attempt > 0 {
                    format!("attempt {}/{} did not finish", q.attempt, q.max_attempts)
                } else {
                    "the worker stopped before finishing".to_string()
                };
                let msg = match q.message.as_deref().map(redact_uri) {
                    Some(m) if !m.is_empty() => format!("{what} ({m}); back in the queue"),
                    _ => format!("{what}; back in the queue"),
                };
                set(
                    &mut s,
                    conditions::QUEUED,
                    true,
                    reasons::RETRYING,
                    msg.clone(),
                    now,
                );
                settle(&mut s, conditions::RUNNING, reasons::RETRYING, &msg, now);
                s.reason = Some(reasons::RETRYING.into());
                s.message = Some(msg);
                s.progress = None;
            } else {
                waiting_in_queue(&mut s, job, now);
            }
        }
        QueueState::Running => {
            s.phase = Some(JobPhase::Running);
            let worker = s.worker.clone().unwrap_or_else(|| "a worker".into());
            let msg = format!("claimed by {worker} ({attempts})");
            settle(&mut s, conditions::QUEUED, reasons::CLAIMED, &msg, now);
            set(
                &mut s,
                conditions::RUNNING,
                true,
                reasons::CLAIMED,
                msg.clone(),
                now,
            );
            if let Some(c) = q.claimed_at {
                s.started_at = Some(time(c));
            } else if s.started_at.is_none() {
                s.started_at = Some(time(now));
            }
            s.reason = Some(reasons::CLAIMED.into());
            s.message = Some(msg);
        }
        QueueState::Succeeded => {
            s.phase = Some(JobPhase::Succeeded);
            let output = redact_uri(q.output.as_deref().unwrap_or(&job.spec.output));
            let msg = format!("result written to {output}");
            settle(&mut s, conditions::QUEUED, reasons::FINISHED, &msg, now);
            // A succeeded job ran, even when this status never showed it Running (the job
            // finished between two reconciles): Running is False either way, not absent.
            set(
                &mut s,
                conditions::RUNNING,
                false,
                reasons::FINISHED,
                &msg,
                now,
            );
            set(
                &mut s,
                conditions::COMPLETE,
                true,
                reasons::SUCCEEDED,
                msg.clone(),
                now,
            );
            s.output = Some(output);
            if s.started_at.is_none() {
                s.started_at = q.claimed_at.map(time);
            }
            s.completed_at = Some(time(q.finished_at.unwrap_or(now)));
            s.reason = Some(reasons::SUCCEEDED.into());
            s.message = Some(msg);
            refresh_duration(&mut s, now);
        }
        QueueState::Failed => {
            let reason = failure_reason(q.reason.as_deref());
            let msg = q
                .message
                .as_deref()
                .map(redact_uri)
                .filter(|m| !m.is_empty())
                .unwrap_or_else(|| format!("failed ({attempts})"));
            finish_failed(&mut s, &reason, &msg, q.finished_at.unwrap_or(now), now);
            s.phase = Some(JobPhase::Failed);
        }
        QueueState::Cancelled => {
            let msg = q
                .message
                .as_deref()
                .map(redact_uri)
                .filter(|m| !m.is_empty())
                .unwrap_or_else(|| "cancelled".into());
            finish_failed(
                &mut s,
                reasons::CANCELLED,
                &msg,
                q.finished_at.unwrap_or(now),
                now,
            );
            s.phase = Some(JobPhase::Cancelled);
        }
    }
    if !s.phase.is_some_and(JobPhase::is_terminal) {
        refresh_duration(&mut s, now);
    }
    s
}

/// Whether `new` differs from `old` in anything but the printed duration (which moves with
/// the clock and alone is not worth a write).
pub fn changed(old: Option<&InpaintJobStatus>, new: &InpaintJobStatus) -> bool {
    let Some(old) = old else { return true };
    let mut a = old.clone();
    let mut b = new.clone();
    a.duration = None;
    b.duration = None;
    a != b
}

/// Kubernetes Events for the transition from `old` to `new`.
pub fn events(old: Option<&InpaintJobStatus>, new: &InpaintJobStatus) -> Vec<JobEvent> {
    let old_phase = old.and_then(|s| s.phase);
    let old_reason = old.and_then(|s| s.reason.as_deref());
    let new_phase = new.phase.unwrap_or_default();
    let note = new.message.clone().unwrap_or_default();
    let ev = |warning, reason: &str, action| JobEvent {
        warning,
        reason: reason.to_string(),
        action,
        note: note.clone(),
    };
    let same_phase = old_phase == Some(new_phase);
    match new_phase {
        JobPhase::Pending => {
            if new.reason.as_deref() == Some(reasons::POOL_NOT_FOUND)
                && old_reason != Some(reasons::POOL_NOT_FOUND)
            {
                vec![ev(true, reasons::POOL_NOT_FOUND, "Enqueue")]
            } else if new.reason.as_deref() == Some(reasons::QUEUE_UNAVAILABLE)
                && old_reason != Some(reasons::QUEUE_UNAVAILABLE)
            {
                vec![ev(true, reasons::QUEUE_UNAVAILABLE, "Enqueue")]
            } else {
                vec![]
            }
        }
        JobPhase::Queued => {
            let retry = new.reason.as_deref() == Some(reasons::RETRYING);
            let attempts_moved = old.and_then(|s| s.attempts) != new.attempts;
            let was_retry = old_reason == Some(reasons::RETRYING);
            if retry && (!same_phase || attempts_moved || !was_retry) {
                vec![ev(true, reasons::RETRYING, "Retry")]
            } else if !same_phase && !retry {
                vec![ev(false, reasons::ENQUEUED, "Enqueue")]
            } else {
                vec![]
            }
        }
        JobPhase::Running => {
            let reclaimed = old.and_then(|s| s.attempts) != new.attempts;
            if !same_phase || reclaimed {
                vec![ev(false, reasons::CLAIMED, "Claim")]
            } else {
                vec![]
            }
        }
        JobPhase::Succeeded | JobPhase::Failed | JobPhase::Cancelled if !same_phase => {
            let reason = match new_phase {
                JobPhase::Succeeded => reasons::SUCCEEDED.to_string(),
                JobPhase::Cancelled => reasons::CANCELLED.to_string(),
                _ => failure_reason(new.reason.as_deref()),
            };
            let action = match new_phase {
                JobPhase::Succeeded => "Complete",
                JobPhase::Cancelled => "Cancel",
                _ => "Fail",
            };
            vec![ev(new_phase != JobPhase::Succeeded, &reason, action)]
        }
        _ => vec![],
    }
}

/// When the job must be finished: creation time + `timeoutSeconds`.
pub fn deadline(job: &InpaintJob) -> Option<Timestamp> {
    let created = job.metadata.creation_timestamp.as_ref()?.0;
    let secs = i64::try_from(job.spec.timeout_seconds).ok()?;
    created
        .checked_add(jiff::SignedDuration::from_secs(secs))
        .ok()
}

/// When a finished job is to be deleted: `completedAt` + `ttlSecondsAfterFinished`.
pub fn expiry(job: &InpaintJob) -> Option<Timestamp> {
    let ttl = i64::try_from(job.spec.ttl_seconds_after_finished?).ok()?;
    let done = job.status.as_ref()?.completed_at.as_ref()?.0;
    done.checked_add(jiff::SignedDuration::from_secs(ttl)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use pawfect_api::conditions::{COMPLETE, FAILED, QUEUED, RUNNING, is_true};
    use serde_json::json;

    fn ts(s: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + s).unwrap()
    }

    fn job() -> InpaintJob {
        let mut j = InpaintJob::new(
            "rex",
            serde_json::from_value(json!({
                "image": "s3://b/rex.jpg", "mask": "s3://b/rex-mask.png", "output": "s3://b/rex-out.png",
                "pool": "t4", "ttlSecondsAfterFinished": 60
            }))
            .unwrap(),
        );
        j.metadata.namespace = Some("pets".into());
        j.metadata.generation = Some(1);
        j.metadata.creation_timestamp = Some(Time(ts(0)));
        j
    }

    fn q(state: QueueState) -> QueueJob {
        QueueJob {
            state,
            attempt: 0,
            max_attempts: 3,
            worker: None,
            stage: None,
            step: None,
            total_steps: None,
            timings: None,
            work: None,
            caption: None,
            prompt: None,
            prompt_source: None,
            output: None,
            reason: None,
            message: None,
            enqueued_at: Some(ts(1)),
            claimed_at: None,
            finished_at: None,
        }
    }

    fn running(attempt: u32, worker: &str, step: u32) -> QueueJob {
        QueueJob {
            attempt,
            worker: Some(worker.into()),
            stage: Some("denoise".into()),
            step: Some(step),
            total_steps: Some(20),
            claimed_at: Some(ts(5)),
            ..q(QueueState::Running)
        }
    }

    #[test]
    fn succeeded_straight_from_queued_says_it_ran() {
        let j = job();
        let s0 = enqueued(&j, None, ts(1));
        let done = QueueJob {
            attempt: 1,
            worker: Some("t4-worker-abc".into()),
            claimed_at: Some(ts(5)),
            finished_at: Some(ts(9)),
            ..q(QueueState::Succeeded)
        };
        let s = from_queue(&j, Some(&s0), &done, ts(10));
        assert_eq!(s.phase, Some(JobPhase::Succeeded));
        let r = s.condition(RUNNING).expect("a Running condition");
        assert_eq!(
            (r.status.as_str(), r.reason.as_str()),
            ("False", reasons::FINISHED)
        );
        assert!(!is_true(&s.conditions, QUEUED));
        assert!(is_true(&s.conditions, COMPLETE));
        assert_eq!(s.started_at, Some(Time(ts(5))));
    }

    #[test]
    fn lifecycle_queued_running_succeeded() {
        let j = job();
        let s0 = enqueued(&j, None, ts(1));
        assert_eq!(s0.phase, Some(JobPhase::Queued));
        assert!(is_true(&s0.conditions, QUEUED));
        assert_eq!(s0.observed_generation, Some(1));
        assert_eq!(s0.queued_at, Some(Time(ts(1))));
        assert_eq!(events(None, &s0)[0].reason, reasons::ENQUEUED);
        // Same queue state again: nothing changes, no event.
        let s0b = from_queue(&j, Some(&s0), &q(QueueState::Queued), ts(3));
        assert!(!changed(Some(&s0), &s0b), "{s0:?}\n{s0b:?}");
        assert!(events(Some(&s0), &s0b).is_empty());

        let s1 = from_queue(&j, Some(&s0), &running(1, "t4-worker-abc", 3), ts(6));
        assert_eq!(s1.phase, Some(JobPhase::Running));
        assert!(!is_true(&s1.conditions, QUEUED));
        assert!(is_true(&s1.conditions, RUNNING));
        assert_eq!(s1.worker.as_deref(), Some("t4-worker-abc"));
        assert_eq!(s1.attempts, Some(1));
        assert_eq!(s1.started_at, Some(Time(ts(5))));
        assert_eq!(
            s1.progress.as_ref().and_then(|p| p.summary.as_deref()),
            Some("denoise 3/20")
        );
        let e = events(Some(&s0), &s1);
        assert_eq!(e.len(), 1);
        assert_eq!(
            (e[0].reason.as_str(), e[0].warning),
            (reasons::CLAIMED, false)
        );

        // Progress: a status change without an event.
        let s2 = from_queue(&j, Some(&s1), &running(1, "t4-worker-abc", 12), ts(9));
        assert!(changed(Some(&s1), &s2));
        assert!(events(Some(&s1), &s2).is_empty());

        let done = QueueJob {
            timings: Some(StageTimings {
                denoise: Some(50_000),
                total: Some(61_000),
                ..Default::default()
            }),
            work: Some(
                StageWork {
                    denoise: Some(pawfect_api::WorkCounts {
                        f16_gemm_flop: 1_000_000_000_000_000,
                        ..Default::default()
                    }),
                    ..Default::default()
                }
                .with_total(),
            ),
            caption: Some("a dog on green grass".into()),
            prompt: Some("green grass, seamless continuation, no objects".into()),
            prompt_source: Some("caption".into()),
            output: Some("s3://b/rex-out.png".into()),
            finished_at: Some(ts(66)),
            stage: Some("store".into()),
            step: None,
            total_steps: None,
            state: QueueState::Succeeded,
            ..running(1, "t4-worker-abc", 20)
        };
        let s3 = from_queue(&j, Some(&s2), &done, ts(67));
        assert_eq!(s3.phase, Some(JobPhase::Succeeded));
        assert!(is_true(&s3.conditions, COMPLETE));
        assert!(!is_true(&s3.conditions, RUNNING));
        assert!(s3.condition(FAILED).is_none());
        assert_eq!(s3.completed_at, Some(Time(ts(66))));
        assert_eq!(s3.duration.as_deref(), Some("1m5s"));
        assert_eq!(s3.output.as_deref(), Some("s3://b/rex-out.png"));
        assert_eq!(s3.timings.as_ref().and_then(|t| t.total), Some(61_000));
        assert_eq!(s3.work, done.work);
        assert_eq!(s3.caption.as_deref(), Some("a dog on green grass"));
        assert_eq!(s3.prompt_source, Some(PromptOrigin::Caption));
        assert_eq!(events(Some(&s2), &s3)[0].reason, reasons::SUCCEEDED);

        // Terminal is sticky: a later (e.g. cancelled) hash does not change it.
        let s4 = from_queue(&j, Some(&s3), &q(QueueState::Cancelled), ts(80));
        assert_eq!(s4, s3);
        assert!(events(Some(&s3), &s4).is_empty());
        assert_eq!(
            expiry(&InpaintJob {
                status: Some(s3),
                ..j
            }),
            Some(ts(126))
        );
    }

    #[test]
    fn retry_and_reclaim_publish_warnings() {
        let j = job();
        let s1 = from_queue(&j, None, &running(1, "w-a", 4), ts(6));
        let back = QueueJob {
            message: Some("worker w-a stopped".into()),
            ..QueueJob {
                attempt: 1,
                worker: Some("w-a".into()),
                ..q(QueueState::Queued)
            }
        };
        let s2 = from_queue(&j, Some(&s1), &back, ts(70));
        assert_eq!(s2.phase, Some(JobPhase::Queued));
        assert_eq!(s2.reason.as_deref(), Some(reasons::RETRYING));
        assert!(s2.progress.is_none());
        assert!(
            s2.message
                .as_deref()
                .unwrap()
                .contains("worker w-a stopped")
        );
        let e = events(Some(&s1), &s2);
        assert_eq!(
            (e[0].reason.as_str(), e[0].warning),
            (reasons::RETRYING, true)
        );
        // Taken over directly by another worker (XAUTOCLAIM): Running → Running, new attempt.
        let s3 = from_queue(&j, Some(&s1), &running(2, "w-b", 0), ts(71));
        assert_eq!(s3.worker.as_deref(), Some("w-b"));
        assert_eq!(events(Some(&s1), &s3)[0].reason, reasons::CLAIMED);
    }

    #[test]
    fn handed_back_job_is_retrying() {
        let j = job();
        let s1 = from_queue(&j, None, &running(1, "w-a", 4), ts(6));
        let back = QueueJob {
            attempt: 0,
            worker: Some("w-a".into()),
            reason: Some("HandedBack".into()),
            message: Some("worker shutting down".into()),
            ..q(QueueState::Queued)
        };
        let s2 = from_queue(&j, Some(&s1), &back, ts(20));
        assert_eq!(s2.phase, Some(JobPhase::Queued));
        assert_eq!(s2.reason.as_deref(), Some(reasons::RETRYING));
        assert_eq!(
            s2.message.as_deref(),
            Some("the worker stopped before finishing (worker shutting down); back in the queue")
        );
        let e = events(Some(&s1), &s2);
        assert_eq!(
            (e[0].reason.as_str(), e[0].warning),
            (reasons::RETRYING, true)
        );
        assert!(events(Some(&s2), &from_queue(&j, Some(&s2), &back, ts(30))).is_empty());
    }

    #[test]
    fn failures_keep_known_reasons() {
        let j = job();
        let s1 = from_queue(&j, None, &running(1, "w", 1), ts(6));
        for (given, want) in [
            (Some("InvalidInput"), reasons::INVALID_INPUT),
            (Some("AttemptsExhausted"), reasons::ATTEMPTS_EXHAUSTED),
            // The worker's own reason reaches the status: it says why.
            (Some("OutOfMemory"), "OutOfMemory"),
            (Some("AddressNotAllowed"), "AddressNotAllowed"),
            (Some("OutputIsInput"), "OutputIsInput"),
            // Not a condition reason word: the generic one.
            (Some("not a word"), reasons::WORKER_ERROR),
            (Some(""), reasons::WORKER_ERROR),
            (None, reasons::WORKER_ERROR),
        ] {
            let f = QueueJob {
                reason: given.map(String::from),
                message: Some("mask is empty".into()),
                finished_at: Some(ts(8)),
                ..running(1, "w", 1)
            };
            let f = QueueJob {
                state: QueueState::Failed,
                ..f
            };
            let s = from_queue(&j, Some(&s1), &f, ts(9));
            assert_eq!(s.phase, Some(JobPhase::Failed));
            assert_eq!(s.reason.as_deref(), Some(want));
            assert_eq!(s.condition(FAILED).map(|c| c.reason.as_str()), Some(want));
            assert!(!is_true(&s.conditions, RUNNING));
            assert!(s.condition(COMPLETE).is_none());
            let e = events(Some(&s1), &s);
            assert_eq!((e[0].reason.as_str(), e[0].warning), (want, true));
            assert_eq!(e[0].note, "mask is empty");
        }
        let c = from_queue(&j, Some(&s1), &q(QueueState::Cancelled), ts(9));
        assert_eq!(c.phase, Some(JobPhase::Cancelled));
        assert_eq!(
            c.condition(FAILED).map(|c| c.reason.as_str()),
            Some(reasons::CANCELLED)
        );
    }

    /// A message with a pre-signed URL (written by any worker version, or by hand) reaches
    /// neither the status, its conditions, nor the Events with its signature or credentials.
    #[test]
    fn uri_secrets_never_reach_the_status_or_events() {
        let j = job();
        let s1 = from_queue(&j, None, &running(1, "w", 1), ts(6));
        let signed = "photo: https://ci:pa55@b.s3.amazonaws.com/dog.jpg?X-Amz-Signature=5ec7e7: HTTP status 403";
        for state in [
            QueueState::Failed,
            QueueState::Queued,
            QueueState::Cancelled,
        ] {
            let q = QueueJob {
                state,
                reason: Some("InputNotFound".into()),
                message: Some(signed.into()),
                output: Some("https://b/out.png?sig=5ec7e7".into()),
                finished_at: Some(ts(8)),
                ..running(1, "w", 1)
            };
            let s = from_queue(&j, Some(&s1), &q, ts(9));
            let mut shown = vec![s.message.clone().unwrap_or_default()];
            shown.extend(s.conditions.iter().map(|c| c.message.clone()));
            shown.extend(events(Some(&s1), &s).into_iter().map(|e| e.note));
            for text in &shown {
                assert!(!text.contains("5ec7e7"), "{state:?}: {text}");
                assert!(!text.contains("pa55"), "{state:?}: {text}");
            }
            assert!(
                s.message.as_deref().is_some_and(
                    |m| m.contains("https://REDACTED@b.s3.amazonaws.com/dog.jpg?REDACTED")
                ),
                "{state:?}: {:?}",
                s.message
            );
        }
        let done = QueueJob {
            state: QueueState::Succeeded,
            output: Some("https://b/out.png?sig=5ec7e7".into()),
            finished_at: Some(ts(8)),
            ..running(1, "w", 1)
        };
        let s = from_queue(&j, Some(&s1), &done, ts(9));
        assert_eq!(s.output.as_deref(), Some("https://b/out.png?REDACTED"));
        assert!(!s.message.unwrap_or_default().contains("5ec7e7"));
    }

    #[test]
    fn pool_not_found_and_deadline() {
        let j = job();
        let p = pool_not_found(&j, None, ts(1));
        assert_eq!(p.phase, Some(JobPhase::Pending));
        let c = p.condition(QUEUED).unwrap();
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", reasons::POOL_NOT_FOUND)
        );
        assert!(c.message.contains("\"t4\""));
        assert_eq!(events(None, &p)[0].reason, reasons::POOL_NOT_FOUND);
        // Still missing: no new event, no change.
        let p2 = pool_not_found(&j, Some(&p), ts(30));
        assert!(!changed(Some(&p), &p2));
        assert!(events(Some(&p), &p2).is_empty());
        // Then the pool appears.
        let s = enqueued(&j, Some(&p2), ts(40));
        assert!(is_true(&s.conditions, QUEUED));
        assert_eq!(events(Some(&p2), &s)[0].reason, reasons::ENQUEUED);

        assert_eq!(deadline(&j), Some(ts(600)));
        let d = deadline_exceeded(&j, Some(&s), ts(600));
        assert_eq!(d.phase, Some(JobPhase::Failed));
        assert_eq!(d.reason.as_deref(), Some(reasons::DEADLINE_EXCEEDED));
        assert!(!is_true(&d.conditions, QUEUED));
        assert!(is_true(&d.conditions, FAILED));
        let e = events(Some(&s), &d);
        assert_eq!(
            (e[0].reason.as_str(), e[0].warning),
            (reasons::DEADLINE_EXCEEDED, true)
        );
    }
}

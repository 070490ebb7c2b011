//! The InpaintJob controller.
//!
//! One reconcile of a job, after the finalizer is in place:
//! 1. a finished job only waits for `ttlSecondsAfterFinished`, then is deleted;
//! 2. past `timeoutSeconds` the job is cancelled in the queue and fails with `DeadlineExceeded`;
//! 3. the job hash is read: if the queue knows the job, the status mirrors it (this is also
//!    the resync after restarts or lost events); if not, the job is enqueued once its
//!    InpaintPool exists (idempotent per uid: a retried reconcile never queues twice);
//! 4. the status is written with server-side apply (field manager `pawfect-operator`) only when
//!    it changed, and each transition publishes a Kubernetes Event.
//!
//! Deleting a job cancels it in the queue (a waiting job leaves the stream, a running one is
//! flagged and its worker stops between denoise steps) before the finalizer is removed.

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event as K8sEvent, EventType};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Resource, ResourceExt};
use pawfect_api::{InpaintJob, InpaintJobStatus, InpaintPool, JOB_FINALIZER, JobPhase};
use pawfect_queue::{CancelOutcome, JobRecord, JobRef, JobState};
use serde_json::json;
use tracing::{debug, info, warn};

use crate::status::{self, QueueJob, QueueState};
use crate::{Context, Error, FIELD_MANAGER, Result, queue_pool};

/// The queue's job hash in the operator's terms.
pub fn queue_view(r: &JobRecord) -> QueueJob {
    QueueJob {
        state: match r.state {
            JobState::Queued => QueueState::Queued,
            JobState::Running => QueueState::Running,
            JobState::Succeeded => QueueState::Succeeded,
            JobState::Failed => QueueState::Failed,
            JobState::Cancelled => QueueState::Cancelled,
        },
        attempt: r.attempt,
        max_attempts: r.max_attempts,
        worker: r.worker.clone(),
        stage: r.progress.as_ref().map(|p| p.stage.clone()),
        step: r.progress.as_ref().and_then(|p| p.step),
        total_steps: r.progress.as_ref().and_then(|p| p.total_steps),
        timings: r.timings.clone(),
        work: r.work.clone(),
        caption: r.caption.clone(),
        prompt: r.prompt.clone(),
        prompt_source: r.prompt_source.clone(),
        output: r.output.clone(),
        reason: r.reason.clone(),
        message: r.message.clone(),
        enqueued_at: r.enqueued_at,
        claimed_at: r.claimed_at,
        finished_at: r.finished_at,
    }
}

fn namespace(job: &InpaintJob) -> Result<String> {
    job.namespace().ok_or(Error::MissingField {
        kind: "InpaintJob",
        field: "metadata.namespace",
    })
}

/// The queue pool of a job: `<namespace>/<spec.pool>`, whose keys hold its hash.
fn job_pool(job: &InpaintJob) -> Result<String> {
    Ok(queue_pool(&namespace(job)?, &job.spec.pool))
}

fn uid(job: &InpaintJob) -> Result<String> {
    job.uid().ok_or(Error::MissingField {
        kind: "InpaintJob",
        field: "metadata.uid",
    })
}

/// The unfinished jobs that wait for `pool` to exist (never enqueued), to wake when it appears.
pub fn waiting_for_pool<'a>(
    pool: &InpaintPool,
    jobs: impl IntoIterator<Item = &'a InpaintJob>,
) -> Vec<kube::runtime::reflector::ObjectRef<InpaintJob>> {
    let ns = pool.namespace();
    let name = pool.name_any();
    jobs.into_iter()
        .filter(|j| {
            j.namespace() == ns
                && j.spec.pool == name
                && !j.is_finished()
                && j.status
                    .as_ref()
                    .and_then(|s| s.queued_at.as_ref())
                    .is_none()
        })
        .map(kube::runtime::reflector::ObjectRef::from_obj)
        .collect()
}

/// Reconciles one InpaintJob (entry point of the controller).
pub async fn reconcile(job: Arc<InpaintJob>, ctx: Arc<Context>) -> Result<Action> {
    ctx.job_backlog
        .start(&kube::runtime::reflector::ObjectRef::from_obj(&*job));
    let _timer = ctx.metrics.reconcile("job");
    let ns = namespace(&job)?;
    let api: Api<InpaintJob> = Api::namespaced(ctx.client.clone(), &ns);
    finalizer(&api, JOB_FINALIZER, job, |event| async {
        match event {
            Finalizer::Apply(job) => apply(&job, &ctx).await,
            Finalizer::Cleanup(job) => cleanup(&job, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

/// Retry policy after a failed reconcile.
pub fn error_policy(job: Arc<InpaintJob>, error: &Error, ctx: Arc<Context>) -> Action {
    warn!(job = %job.name_any(), namespace = ?job.namespace(), %error, "job reconcile failed");
    ctx.metrics.reconcile_failed("job", error.metric_label());
    Action::requeue(ctx.settings.error_retry)
}

fn until(now: Timestamp, t: Timestamp) -> Duration {
    Duration::try_from(t.duration_since(now)).unwrap_or(Duration::ZERO)
}

async fn apply(job: &InpaintJob, ctx: &Context) -> Result<Action> {
    let now = Timestamp::now();
    if job.is_finished() {
        return expire(job, ctx, now).await;
    }
    let ns = namespace(job)?;
    let uid = uid(job)?;
    let old = job.status.as_ref();

    if let Some(deadline) = status::deadline(job)
        && now >= deadline
    {
        return timed_out(job, ctx, &uid, now).await;
    }

    let pool = job_pool(job)?;
    let record = match ctx.queue.get_job(&pool, &uid).await {
        Ok(r) => r,
        Err(e) => return queue_down(job, ctx, e, now).await,
    };
    let new = match record {
        Some(r) => status::from_queue(job, old, &queue_view(&r), now),
        None => {
            if !pool_exists(ctx, &ns, &job.spec.pool).await? {
                let new = status::pool_not_found(job, old, now);
                write_status(job, ctx, new).await?;
                return Ok(Action::requeue(ctx.settings.pool_missing_retry));
            }
            let mut spec = job.spec.clone();
            spec.pool = queue_pool(&ns, &job.spec.pool);
            let job_ref = JobRef::new(uid.clone(), ns.clone(), job.name_any());
            let enq = match ctx.queue.enqueue(&job_ref, &spec).await {
                Ok(e) => e,
                Err(e) => return queue_down(job, ctx, e, now).await,
            };
            if enq.created {
                info!(job = %job.name_any(), namespace = %ns, pool = %spec.pool, "enqueued");
                ctx.wake_pool(&ns, &job.spec.pool);
            }
            status::enqueued(job, old, now)
        }
    };
    let finished = new.phase.is_some_and(JobPhase::is_terminal);
    let resync = if new.phase == Some(JobPhase::Running) {
        ctx.settings.job_resync
    } else {
        ctx.settings.queued_resync
    };
    if finished {
        return finished_with(job, ctx, new, now).await;
    }
    write_status(job, ctx, new).await?;
    let to_deadline = status::deadline(job).map_or(resync, |d| until(now, d));
    Ok(Action::requeue(
        to_deadline.min(resync) + Duration::from_millis(50),
    ))
}

/// Whether the job's InpaintPool exists: yes when the operator's pool cache has it, else asked
/// of the API server (a cache still filling, or a pool created a moment ago, must not fail a
/// job as PoolNotFound).
async fn pool_exists(ctx: &Context, ns: &str, pool: &str) -> Result<bool> {
    let cached = ctx.pools.as_ref().is_some_and(|s| {
        s.get(&kube::runtime::reflector::ObjectRef::new(pool).within(ns))
            .is_some()
    });
    if cached {
        return Ok(true);
    }
    let pools: Api<InpaintPool> = Api::namespaced(ctx.client.clone(), ns);
    Ok(pools.get_opt(pool).await?.is_some())
}

/// Records a queue outage on the job (once) and fails the reconcile so it is retried.
async fn queue_down(
    job: &InpaintJob,
    ctx: &Context,
    err: pawfect_queue::QueueError,
    now: Timestamp,
) -> Result<Action> {
    if job
        .status
        .as_ref()
        .and_then(|s| s.queued_at.as_ref())
        .is_none()
    {
        let new = status::queue_unavailable(job, job.status.as_ref(), &err.to_string(), now);
        write_status(job, ctx, new).await?;
    }
    Err(Error::Queue(err))
}

async fn timed_out(job: &InpaintJob, ctx: &Context, uid: &str, now: Timestamp) -> Result<Action> {
    let old = job.status.as_ref();
    let pool = job_pool(job)?;
    let record = ctx.queue.get_job(&pool, uid).await?;
    let new = match record {
        // It finished just before the deadline: keep the real outcome.
        Some(r) if r.state.is_terminal() => status::from_queue(job, old, &queue_view(&r), now),
        Some(_) => {
            let outcome = ctx.queue.cancel(&pool, uid).await?;
            debug!(job = %job.name_any(), ?outcome, "deadline: cancel");
            match outcome {
                CancelOutcome::AlreadyFinished(_) => match ctx.queue.get_job(&pool, uid).await? {
                    Some(r) => status::from_queue(job, old, &queue_view(&r), now),
                    None => status::deadline_exceeded(job, old, now),
                },
                _ => status::deadline_exceeded(job, old, now),
            }
        }
        None => status::deadline_exceeded(job, old, now),
    };
    finished_with(job, ctx, new, now).await
}

/// Writes a terminal status and schedules the job's `ttlSecondsAfterFinished`: the watch does
/// not bring a job back for its status (see `trigger`), so its expiry is a timer set here.
async fn finished_with(
    job: &InpaintJob,
    ctx: &Context,
    new: InpaintJobStatus,
    now: Timestamp,
) -> Result<Action> {
    let mut done = job.clone();
    done.status = Some(new.clone());
    write_status(job, ctx, new).await?;
    Ok(match status::expiry(&done) {
        Some(at) => Action::requeue(until(now, at) + Duration::from_millis(50)),
        None => Action::await_change(),
    })
}

/// What of a job's watch events deserves a reconcile: a new spec (generation), the start of
/// its deletion, or its finalizer added or gone. Status-only updates — nearly all of them are
/// the operator's own writes, two or more per job — do not: the status is derived from the
/// queue, whose events and the reconciles' timers bring the job back when it matters. (Used as
/// a `predicate_filter`: an event whose value equals the last one seen is dropped.)
pub fn trigger(job: &InpaintJob) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let m = job.meta();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    m.generation.hash(&mut h);
    m.deletion_timestamp.is_some().hash(&mut h);
    m.finalizers
        .as_ref()
        .is_some_and(|f| f.iter().any(|x| x == JOB_FINALIZER))
        .hash(&mut h);
    Some(h.finish())
}

/// A finished job: deleted `ttlSecondsAfterFinished` after it finished.
async fn expire(job: &InpaintJob, ctx: &Context, now: Timestamp) -> Result<Action> {
    match status::expiry(job) {
        None => Ok(Action::await_change()),
        Some(at) if now >= at => {
            let ns = namespace(job)?;
            let api: Api<InpaintJob> = Api::namespaced(ctx.client.clone(), &ns);
            info!(job = %job.name_any(), namespace = %ns, "ttlSecondsAfterFinished passed: deleting");
            match api
                .delete(&job.name_any(), &DeleteParams::background())
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.is_not_found() => {}
                Err(e) => return Err(e.into()),
            }
            Ok(Action::await_change())
        }
        Some(at) => Ok(Action::requeue(until(now, at) + Duration::from_millis(50))),
    }
}

/// The job is being deleted: cancel its queue work, then the finalizer goes.
async fn cleanup(job: &InpaintJob, ctx: &Context) -> Result<Action> {
    let uid = uid(job)?;
    let pool = job_pool(job)?;
    if job.is_finished() {
        // Its hash would expire anyway; drop it now.
        if let Err(e) = ctx.queue.forget(&pool, &uid).await {
            debug!(job = %job.name_any(), %e, "forget failed (the hash expires on its own)");
        }
        return Ok(Action::await_change());
    }
    let outcome = ctx.queue.cancel(&pool, &uid).await?;
    info!(job = %job.name_any(), namespace = ?job.namespace(), ?outcome, "deleted: cancelled in the queue");
    let note = match outcome {
        CancelOutcome::Cancelled => "deleted while waiting: removed from the queue",
        CancelOutcome::Requested => "deleted while running: the worker stops at its next check",
        CancelOutcome::AlreadyFinished(_) => "deleted after it finished in the queue",
        CancelOutcome::NotFound => "deleted before it was queued",
    };
    if !matches!(outcome, CancelOutcome::AlreadyFinished(_)) {
        ctx.metrics.job_finished(
            &job.namespace().unwrap_or_default(),
            &job.spec.pool,
            JobPhase::Cancelled.as_str(),
            pawfect_api::conditions::reasons::CANCELLED,
            None,
        );
    }
    publish(
        ctx,
        job,
        &status::JobEvent {
            warning: false,
            reason: pawfect_api::conditions::reasons::CANCELLED.into(),
            action: "Cancel",
            note: note.into(),
        },
    )
    .await;
    Ok(Action::await_change())
}

/// Writes `new` as the job's status (server-side apply of the status subresource) if it
/// differs from the current one, publishes the transition's events and counts finished jobs.
async fn write_status(job: &InpaintJob, ctx: &Context, new: InpaintJobStatus) -> Result<()> {
    let old = job.status.as_ref();
    if !status::changed(old, &new) {
        return Ok(());
    }
    let ns = namespace(job)?;
    let api: Api<InpaintJob> = Api::namespaced(ctx.client.clone(), &ns);
    let patch = json!({
        "apiVersion": InpaintJob::api_version(&()),
        "kind": InpaintJob::kind(&()),
        "status": new,
    });
    api.patch_status(
        &job.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(patch),
    )
    .await?;
    let was_terminal = old.and_then(|s| s.phase).is_some_and(JobPhase::is_terminal);
    if let Some(phase) = new.phase.filter(|p| p.is_terminal() && !was_terminal) {
        let seconds = match (&new.queued_at, &new.completed_at) {
            (Some(q), Some(c)) => Some(c.0.duration_since(q.0).as_secs_f64().max(0.0)),
            _ => None,
        };
        ctx.metrics.job_finished(
            &ns,
            &job.spec.pool,
            phase.as_str(),
            new.reason.as_deref().unwrap_or(""),
            seconds,
        );
    }
    for ev in status::events(old, &new) {
        publish(ctx, job, &ev).await;
    }
    Ok(())
}

/// Publishes a Kubernetes Event about the job; failures are logged, never fatal.
async fn publish(ctx: &Context, job: &InpaintJob, ev: &status::JobEvent) {
    let event = K8sEvent {
        type_: if ev.warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: ev.reason.clone(),
        note: Some(ev.note.clone()),
        action: ev.action.into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &job.object_ref(&())).await {
        warn!(job = %job.name_any(), reason = %ev.reason, %e, "cannot publish event");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures;
    use serde_json::json;

    #[test]
    fn only_spec_deletion_and_finalizer_changes_trigger_a_reconcile() {
        let base = fixtures::job(0, json!({}));
        let mut with_status = base.clone();
        with_status.status = Some(crate::status::enqueued(&base, None, Timestamp::now()));
        with_status.metadata.resource_version = Some("42".into());
        assert_eq!(trigger(&base), trigger(&with_status), "status-only update");

        let mut new_spec = base.clone();
        new_spec.metadata.generation = Some(base.metadata.generation.unwrap_or(0) + 1);
        let mut deleting = base.clone();
        deleting.metadata.deletion_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::now()),
        );
        let mut finalized = base.clone();
        finalized.metadata.finalizers = Some(vec![JOB_FINALIZER.into()]);
        let mut other_finalizer = base.clone();
        other_finalizer.metadata.finalizers = Some(vec!["example.com/other".into()]);
        for (what, j) in [
            ("new generation", &new_spec),
            ("deletion started", &deleting),
            ("our finalizer added", &finalized),
        ] {
            assert_ne!(trigger(&base), trigger(j), "{what}");
        }
        assert_eq!(
            trigger(&base),
            trigger(&other_finalizer),
            "someone else's finalizer"
        );
    }

    #[test]
    fn a_new_pool_wakes_only_the_jobs_waiting_for_it() {
        let p = fixtures::pool(
            fixtures::NS,
            fixtures::POOL,
            json!({"worker": {"image": "w"}}),
        );
        let waiting = fixtures::job(0, json!({}));
        let mut other_pool = fixtures::job(0, json!({"pool": "cpu"}));
        other_pool.metadata.name = Some("other".into());
        let mut other_ns = fixtures::job(0, json!({}));
        other_ns.metadata.namespace = Some("elsewhere".into());
        let mut queued = fixtures::job(0, json!({}));
        queued.metadata.name = Some("queued".into());
        queued.status = Some(crate::status::enqueued(&queued, None, Timestamp::now()));
        let refs = waiting_for_pool(&p, [&waiting, &other_pool, &other_ns, &queued]);
        assert_eq!(refs, vec![crate::job_ref(fixtures::NS, fixtures::JOB)]);
    }
}

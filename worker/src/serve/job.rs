//! One claimed job: heartbeat, pipeline, progress events, cancellation, the final report.
//!
//! The pipeline checks a stop flag between stages and after every denoising step. The flag is
//! raised by the heartbeat (a cancel request, or the claim was lost to another worker), by the
//! answer to a progress report (same), or by the drain timeout after shutdown was requested.
//! What is reported at the end follows from the result and the flag:
//!
//! | result | flag | report |
//! |---|---|---|
//! | Ok | any | `complete` (first result wins in the queue) |
//! | cancelled | cancel request | `cancelled` |
//! | cancelled | lost | nothing (another worker holds the job) |
//! | cancelled / still running | drain timeout | `hand_back` (`HandedBack`; the attempt is not counted) |
//! | error | — | `fail` with the reason; retryable reasons go back to the queue while attempts remain |

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use pawfect_api::redact_uri;
use pawfect_queue::{Claim, Failure, JobResult, JobState, Outcome, Queue, QueueError, Standing};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::Instrument;

use super::Shared;
use crate::pipeline::{
    FailureReason, JobOutcome, JobParams, Observer, Pipeline, PipelineError, Progress, Stage,
};
use crate::storage::WriteFence;

/// Why a running job should stop; the first cause wins.
#[derive(Default)]
struct StopFlag(AtomicU8);

const RUN: u8 = 0;
const CANCEL: u8 = 1;
const LOST: u8 = 2;
const DRAIN: u8 = 3;

impl StopFlag {
    fn raise(&self, why: u8) {
        let _ = self
            .0
            .compare_exchange(RUN, why, Ordering::AcqRel, Ordering::Acquire);
    }
    fn get(&self) -> u8 {
        self.0.load(Ordering::Acquire)
    }
    fn apply(&self, standing: Standing) {
        match standing {
            Standing::Active => {}
            Standing::CancelRequested => self.raise(CANCEL),
            Standing::Lost => self.raise(LOST),
        }
    }
}

/// The pipeline's observer: progress goes to the reporter task, the stop flag answers
/// `cancelled`.
struct QueueObserver {
    tx: mpsc::UnboundedSender<Progress>,
    stop: Arc<StopFlag>,
    stage: Option<Stage>,
}

impl Observer for QueueObserver {
    fn progress(&mut self, p: Progress) {
        if self.stage != Some(p.stage) {
            tracing::debug!(stage = p.stage.as_str(), "stage");
            self.stage = Some(p.stage);
        }
        let _ = self.tx.send(p);
    }
    fn cancelled(&self) -> bool {
        self.stop.get() != RUN
    }
}

/// Sends progress reports in order; consecutive reports of one stage are merged into the
/// newest, so a slow Redis never holds the pipeline back.
async fn report_progress(
    claim: Claim,
    mut rx: mpsc::UnboundedReceiver<Progress>,
    stop: Arc<StopFlag>,
) {
    let mut pending: Vec<Progress> = Vec::new();
    while let Some(first) = rx.recv().await {
        pending.push(first);
        while let Ok(p) = rx.try_recv() {
            pending.push(p);
        }
        let mut batch: Vec<Progress> = Vec::with_capacity(pending.len());
        for p in pending.drain(..) {
            match batch.last_mut() {
                Some(last) if last.stage == p.stage => *last = p,
                _ => batch.push(p),
            }
        }
        for p in batch {
            let report = pawfect_queue::Progress::new(p.stage.as_str(), p.step, p.total);
            match claim.progress(&report).await {
                Ok(standing) => stop.apply(standing),
                Err(e) => tracing::warn!(error = %e, "progress report failed"),
            }
        }
    }
}

/// How a job ends, as reported to the queue.
enum End {
    Complete(Box<JobOutcome>),
    Fail(PipelineError),
    Cancelled,
    HandBack(&'static str),
    Lost,
}

/// Runs one claimed job to its end (never fails: every error is reported on the job).
pub async fn run_claim(
    claim: Claim,
    queue: &Queue,
    pipeline: &Arc<Pipeline>,
    shared: &Arc<Shared>,
    drain_timeout: Duration,
    shutdown: watch::Receiver<bool>,
) {
    let span = tracing::info_span!(
        "job",
        uid = %claim.uid(),
        job = %format!("{}/{}", claim.job().namespace, claim.job().name),
        attempt = claim.attempt(),
    );
    run(claim, queue, pipeline, shared, drain_timeout, shutdown)
        .instrument(span)
        .await
}

async fn run(
    claim: Claim,
    queue: &Queue,
    pipeline: &Arc<Pipeline>,
    shared: &Arc<Shared>,
    drain_timeout: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    shared.metrics.busy.set(1);
    tracing::info!(
        reclaimed_from = claim.reclaimed_from().unwrap_or(""),
        priority = claim.priority().as_str(),
        max_attempts = claim.max_attempts(),
        "claimed"
    );
    match queue.get_job(claim.pool(), claim.uid()).await {
        Ok(Some(rec)) => {
            if let (Some(enq), Some(cl)) = (rec.enqueued_at, rec.claimed_at) {
                let wait = cl.duration_since(enq).as_secs_f64().max(0.0);
                shared.metrics.queue_wait_seconds.observe(wait);
            }
        }
        Ok(None) => {}
        Err(e) => tracing::debug!(error = %e, "reading the job record failed"),
    }

    // The heartbeat runs until the end is reported.
    let mut heartbeat = None;
    let end = if *shutdown.borrow() {
        End::HandBack("the worker is shutting down")
    } else {
        let hb = claim.start_heartbeat();
        let stop = Arc::new(StopFlag::default());
        let watcher = {
            let mut rx = hb.subscribe();
            let stop = stop.clone();
            tokio::spawn(async move {
                loop {
                    let s = *rx.borrow_and_update();
                    stop.apply(s);
                    if rx.changed().await.is_err() {
                        break;
                    }
                }
            })
        };
        heartbeat = Some(hb);
        let (tx, rx) = mpsc::unbounded_channel();
        let reporter = tokio::spawn(
            report_progress(claim.clone(), rx, stop.clone()).instrument(tracing::Span::current()),
        );
        let observer = Box::new(QueueObserver {
            tx,
            stop: stop.clone(),
            stage: None,
        });
        let seed = uuid::Uuid::new_v4().as_u64_pair().0;
        let params = JobParams {
            spec: claim.spec().clone(),
            default_seed: seed,
        };
        // Pre-signed URLs carry their signature in the query: never logged.
        tracing::info!(
            image = %redact_uri(&params.spec.image),
            mask = %redact_uri(&params.spec.mask),
            output = %redact_uri(&params.spec.output),
            steps = params.spec.steps,
            seed = params.seed(),
            "running"
        );

        let fence: Arc<dyn WriteFence> = Arc::new(ClaimFence::new(
            claim.clone(),
            queue.config().heartbeat_interval(),
            shared,
        ));
        let mut running = Box::pin(pipeline.run_fenced(params, observer, Some(fence)));
        let mut deadline: Option<Instant> = None;
        let result = loop {
            tokio::select! {
                r = &mut running => break Some(r),
                _ = shutdown.wait_for(|s| *s), if deadline.is_none() => {
                    deadline = Some(Instant::now() + drain_timeout);
                    tracing::info!(
                        drain_timeout_ms = drain_timeout.as_millis() as u64,
                        "shutdown requested: finishing the current job"
                    );
                }
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    stop.raise(DRAIN);
                    break None;
                }
            }
        };
        // Dropping the run also drops the observer (once the pipeline thread returns): the
        // reporter sends what is left, then ends.
        drop(running);
        if result.is_some() {
            let _ = tokio::time::timeout(Duration::from_secs(5), reporter).await;
        } else {
            reporter.abort();
        }
        watcher.abort();
        match result {
            None => End::HandBack("the worker shut down before the job finished"),
            Some(Ok(outcome)) => End::Complete(Box::new(outcome)),
            Some(Err(e)) if e.reason == FailureReason::Cancelled => match stop.get() {
                CANCEL => End::Cancelled,
                LOST => End::Lost,
                DRAIN => End::HandBack("the worker shut down before the job finished"),
                _ => End::Fail(e),
            },
            Some(Err(e)) => End::Fail(e),
        }
    };
    finish(&claim, &end, shared, queue.config().heartbeat_interval()).await;
    drop(heartbeat);
    shared.metrics.busy.set(0);
}

/// The job's output is put in place only while this attempt holds the job (the attempt
/// number is the token, see [`Claim::holds`]) and no cancel was requested. While Redis cannot be reached the check is
/// retried: after an outage the queue leaves a live worker a lease to come back.
struct ClaimFence {
    claim: Claim,
    retry_cap: Duration,
    #[cfg(feature = "test-faults")]
    freeze: std::sync::atomic::AtomicBool,
}

impl ClaimFence {
    fn new(claim: Claim, retry_cap: Duration, shared: &Shared) -> Self {
        #[cfg(feature = "test-faults")]
        let freeze = shared
            .faults
            .get()
            .is_some_and(|f| super::faults::freezes_store(f, &claim.spec().output));
        #[cfg(not(feature = "test-faults"))]
        let _ = shared;
        ClaimFence {
            claim,
            retry_cap,
            #[cfg(feature = "test-faults")]
            freeze: std::sync::atomic::AtomicBool::new(freeze),
        }
    }
}

impl WriteFence for ClaimFence {
    fn check(&self) -> futures::future::BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            #[cfg(feature = "test-faults")]
            if self.freeze.swap(false, Ordering::AcqRel) {
                super::faults::freeze_self();
            }
            let mut backoff = Duration::from_millis(100);
            loop {
                // The attempt must hold the job, and no cancel may have been asked for (a job
                // deleted while it ran must not leave an output; the failure this turns into
                // ends the job cancelled, as the queue finishes a failing job with a pending
                // cancel). A cancel is never taken back, so reading it second misses nothing
                // set before this check.
                let holds = match self.claim.holds().await {
                    Ok(true) => self.claim.is_cancelled().await.map(|c| (true, c)),
                    Ok(false) => Ok((false, false)),
                    Err(e) => Err(e),
                };
                match holds {
                    Ok((true, false)) => return Ok(()),
                    Ok((true, true)) => {
                        return Err("a cancel was requested: the output is not put in place".into());
                    }
                    Ok((false, _)) => {
                        return Err(format!(
                            "attempt {} no longer holds the job (taken over or finished elsewhere)",
                            self.claim.attempt()
                        ));
                    }
                    Err(e) if e.is_transient() => {
                        tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "checking the claim before storing the output failed");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(self.retry_cap);
                    }
                    Err(e) => return Err(format!("the claim could not be checked: {e}")),
                }
            }
        })
    }
}

/// Reports the end of the job, retrying while Redis is unreachable (every call is idempotent),
/// for as long as it takes: a result already stored must not be lost to an outage. The retries
/// come at least every `retry_cap` (a fraction of the lease), so after a Redis restart the report
/// lands within the lease the queue leaves a live worker before reclaiming its job.
async fn finish(claim: &Claim, end: &End, shared: &Shared, retry_cap: Duration) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let r: Result<Outcome, QueueError> = match end {
            End::Complete(o) => {
                let result = JobResult {
                    output: redact_uri(&o.output),
                    caption: o.prompt.caption.clone(),
                    prompt: Some(o.prompt.text.clone()),
                    prompt_source: Some(o.prompt.origin.as_str().to_string()),
                    timings: o.timings.clone(),
                    work: Some(o.work.clone()),
                };
                claim.complete(&result).await
            }
            End::Fail(e) => {
                // The message lands in the job's status and Events: no URI credentials.
                let failure = Failure {
                    reason: e.reason.as_str().to_string(),
                    message: redact_uri(&e.message),
                    retryable: e.retryable,
                };
                claim.fail(&failure).await
            }
            End::Cancelled => claim.cancelled("cancelled while running").await,
            End::HandBack(why) => {
                claim
                    .hand_back(pawfect_queue::reasons::HANDED_BACK, why)
                    .await
            }
            End::Lost => {
                tracing::warn!("the job was taken over by another worker: not reporting");
                shared.metrics.job_finished("lost", "");
                return;
            }
        };
        match r {
            Ok(outcome) => {
                record(end, &outcome, shared);
                return;
            }
            Err(e) if e.is_transient() => {
                shared.metrics.queue_errors.inc();
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "reporting the job's end failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(retry_cap);
            }
            Err(e) => {
                shared.metrics.queue_errors.inc();
                tracing::error!(error = %e, "reporting the job's end failed; the queue will hand the job to another worker after the lease");
                return;
            }
        }
    }
}

fn record(end: &End, outcome: &Outcome, shared: &Shared) {
    let reason = match end {
        End::Fail(e) => e.reason.as_str(),
        _ => "",
    };
    let label = match outcome {
        Outcome::Finished(JobState::Succeeded) => "succeeded",
        Outcome::Finished(JobState::Cancelled) => "cancelled",
        Outcome::Finished(_) | Outcome::DeadLettered => "failed",
        Outcome::Requeued { .. } if matches!(end, End::HandBack(_)) => "handed_back",
        Outcome::Requeued { .. } => "requeued",
        Outcome::AlreadyFinished(_) => "duplicate",
        Outcome::Lost | Outcome::NotFound => "lost",
    };
    shared.metrics.job_finished(label, reason);
    match end {
        End::Complete(o) => {
            shared.metrics.observe_timings(&o.timings);
            tracing::info!(
                ?outcome,
                output = %redact_uri(&o.output),
                prompt = %o.prompt.text,
                prompt_source = o.prompt.origin.as_str(),
                crops = o.crops,
                timings = ?o.timings,
                "succeeded"
            );
        }
        End::Fail(e) => tracing::warn!(
            ?outcome,
            reason = e.reason.as_str(),
            retryable = e.retryable,
            message = %redact_uri(&e.message),
            "failed"
        ),
        End::Cancelled => tracing::info!(?outcome, "cancelled"),
        End::HandBack(why) => tracing::info!(?outcome, why, "handed back"),
        End::Lost => {}
    }
}

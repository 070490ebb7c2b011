//! The queue protocol against a real redis-server: enqueue, claim, lease, reclaim,
//! dead-letter, completion, cancellation, depth, priority.

mod common;

use std::time::Duration;

use common::{all_events, count, job, setup, spec};
use pawfect_api::{Priority, QueueDepth, StageTimings, StageWork, WorkCounts};
use pawfect_queue::{
    CancelOutcome, EventKind, Failure, JobResult, JobState, Outcome, Progress, Standing,
};

const WAIT: Duration = Duration::from_secs(5);

fn result(output: &str) -> JobResult {
    JobResult {
        output: output.to_string(),
        caption: Some("a dog on grass".into()),
        prompt: Some("grass, seamless continuation, no objects".into()),
        prompt_source: Some("caption".into()),
        timings: StageTimings {
            denoise: Some(1200),
            total: Some(1500),
            ..Default::default()
        },
        work: Some(
            StageWork {
                denoise: Some(WorkCounts {
                    f16_gemm_flop: 1 << 50,
                    attention_flop: 7,
                    ..Default::default()
                }),
                ..Default::default()
            }
            .with_total(),
        ),
    }
}

fn depth(waiting: u64, running: u64) -> QueueDepth {
    QueueDepth { waiting, running }
}

#[tokio::test]
async fn enqueue_twice_gives_one_entry() {
    let (_redis, q) = setup(60_000).await;
    let a = q
        .enqueue(&job("u1"), &spec("default", "normal", 3))
        .await
        .unwrap();
    assert!(a.created);
    assert_eq!(a.state, JobState::Queued);
    let b = q
        .enqueue(&job("u1"), &spec("default", "normal", 3))
        .await
        .unwrap();
    assert!(!b.created);
    assert_eq!(b.state, JobState::Queued);
    assert_eq!(a.entry_id, b.entry_id);
    assert_eq!(q.depth("default").await.unwrap(), depth(1, 0));

    // Once claimed, a re-enqueue still adds nothing and reports the running state.
    let mut w = q.worker("default", "w1").await.unwrap();
    let c = w.claim(WAIT).await.unwrap().expect("claim");
    let again = q
        .enqueue(&job("u1"), &spec("default", "normal", 3))
        .await
        .unwrap();
    assert!(!again.created);
    assert_eq!(again.state, JobState::Running);
    assert_eq!(q.depth("default").await.unwrap(), depth(0, 1));
    c.complete(&result("file:///o.png")).await.unwrap();
    assert!(w.claim(Duration::from_millis(300)).await.unwrap().is_none());

    let rec = q.get_job("default", "u1").await.unwrap().unwrap();
    assert_eq!(rec.namespace, "pets");
    assert_eq!(rec.name, "job-u1");
    assert_eq!(rec.pool, "default");
    assert_eq!(rec.state, JobState::Succeeded);
    assert_eq!(q.pools().await.unwrap(), vec!["default".to_string()]);
}

#[tokio::test]
async fn bad_names_are_rejected_before_redis() {
    let (_redis, q) = setup(60_000).await;
    let err = q
        .enqueue(&job("u:1"), &spec("default", "normal", 3))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("job uid"), "{err}");
    let err = q.depth("a b").await.unwrap_err();
    assert!(err.to_string().contains("pool"), "{err}");
    assert!(q.worker("default", "").await.is_err());
}

#[tokio::test]
async fn high_priority_is_claimed_first() {
    let (_redis, q) = setup(60_000).await;
    q.enqueue(&job("n1"), &spec("p", "normal", 3))
        .await
        .unwrap();
    q.enqueue(&job("n2"), &spec("p", "normal", 3))
        .await
        .unwrap();
    q.enqueue(&job("h1"), &spec("p", "high", 3)).await.unwrap();
    q.enqueue(&job("h2"), &spec("p", "high", 3)).await.unwrap();
    let mut w = q.worker("p", "w1").await.unwrap();
    let mut order = Vec::new();
    while let Some(c) = w.claim(Duration::from_millis(300)).await.unwrap() {
        order.push((c.uid().to_string(), c.priority()));
        assert_eq!(
            c.complete(&result("file:///o")).await.unwrap(),
            Outcome::Finished(JobState::Succeeded)
        );
    }
    assert_eq!(
        order,
        vec![
            ("h1".to_string(), Priority::High),
            ("h2".to_string(), Priority::High),
            ("n1".to_string(), Priority::Normal),
            ("n2".to_string(), Priority::Normal),
        ]
    );
}

#[tokio::test]
async fn a_blocked_worker_wakes_for_a_new_job() {
    let (_redis, q) = setup(60_000).await;
    let mut w = q.worker("p", "w1").await.unwrap();
    let waiter = tokio::spawn(async move {
        let c = w.claim(Duration::from_secs(10)).await.unwrap();
        c.map(|c| (c.uid().to_string(), c.attempt(), c.spec().output.clone()))
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    q.enqueue(&job("late"), &spec("p", "normal", 3))
        .await
        .unwrap();
    let got = waiter.await.unwrap();
    assert_eq!(
        got,
        Some(("late".to_string(), 1, "file:///out/dog.png".to_string()))
    );
}

#[tokio::test]
async fn depth_stays_right_through_the_lifecycle() {
    let (_redis, q) = setup(60_000).await;
    assert_eq!(q.depth("p").await.unwrap(), depth(0, 0));
    for uid in ["a", "b", "c", "d"] {
        q.enqueue(&job(uid), &spec("p", "normal", 3)).await.unwrap();
    }
    q.enqueue(&job("h"), &spec("p", "high", 3)).await.unwrap();
    assert_eq!(q.depth("p").await.unwrap(), depth(5, 0));

    let mut w = q.worker("p", "w1").await.unwrap();
    let h = w.claim(WAIT).await.unwrap().unwrap();
    assert_eq!(h.uid(), "h");
    assert_eq!(q.depth("p").await.unwrap(), depth(4, 1));
    h.complete(&result("file:///h")).await.unwrap();
    assert_eq!(q.depth("p").await.unwrap(), depth(4, 0));

    // Cancel a waiting job in the middle of the undelivered range.
    assert_eq!(q.cancel("p", "c").await.unwrap(), CancelOutcome::Cancelled);
    assert_eq!(q.depth("p").await.unwrap(), depth(3, 0));

    let a = w.claim(WAIT).await.unwrap().unwrap();
    assert_eq!(a.uid(), "a");
    assert_eq!(q.depth("p").await.unwrap(), depth(2, 1));
    // Cancel a running job: still running until the worker stops.
    assert_eq!(q.cancel("p", "a").await.unwrap(), CancelOutcome::Requested);
    assert_eq!(q.depth("p").await.unwrap(), depth(2, 1));
    assert_eq!(
        a.cancelled("stopped").await.unwrap(),
        Outcome::Finished(JobState::Cancelled)
    );
    assert_eq!(q.depth("p").await.unwrap(), depth(2, 0));

    let b = w.claim(WAIT).await.unwrap().unwrap();
    assert_eq!(b.uid(), "b");
    assert_eq!(
        b.fail(&Failure::retryable("WorkerError", "out of memory"))
            .await
            .unwrap(),
        Outcome::Requeued { attempt: 1 }
    );
    assert_eq!(q.depth("p").await.unwrap(), depth(2, 0));
    let d = w.claim(WAIT).await.unwrap().unwrap();
    assert_eq!(d.uid(), "d");
    assert_eq!(
        d.fail(&Failure::permanent("InvalidInput", "empty mask"))
            .await
            .unwrap(),
        Outcome::Finished(JobState::Failed)
    );
    assert_eq!(q.depth("p").await.unwrap(), depth(1, 0));
    let b2 = w.claim(WAIT).await.unwrap().unwrap();
    assert_eq!((b2.uid(), b2.attempt()), ("b", 2));
    assert_eq!(q.depth("p").await.unwrap(), depth(0, 1));
    b2.complete(&result("file:///b")).await.unwrap();
    assert_eq!(q.depth("p").await.unwrap(), depth(0, 0));

    let d = q.get_job("p", "d").await.unwrap().unwrap();
    assert_eq!(d.state, JobState::Failed);
    assert_eq!(d.reason.as_deref(), Some("InvalidInput"));
    assert_eq!(d.message.as_deref(), Some("empty mask"));
    assert!(
        q.dead_letters("p", 10).await.unwrap().is_empty(),
        "permanent failures are not dead-lettered"
    );
}

#[tokio::test]
async fn dead_consumer_is_reclaimed_after_the_lease() {
    let (_redis, q) = setup(300).await;
    q.enqueue(&job("j"), &spec("p", "normal", 3)).await.unwrap();
    let mut dead = q.worker("p", "dead-worker").await.unwrap();
    let first = dead.claim(WAIT).await.unwrap().unwrap();
    assert_eq!(first.attempt(), 1);
    // `dead-worker` never heartbeats again.

    let mut alive = q.worker("p", "alive-worker").await.unwrap();
    let second = alive
        .claim(WAIT)
        .await
        .unwrap()
        .expect("reclaimed after the lease");
    assert_eq!(second.uid(), "j");
    assert_eq!(second.attempt(), 2);
    assert_eq!(second.reclaimed_from(), Some("dead-worker"));
    assert_eq!(second.entry_id(), first.entry_id());
    let rec = q.get_job("p", "j").await.unwrap().unwrap();
    assert_eq!(
        (rec.state, rec.attempt, rec.worker.as_deref()),
        (JobState::Running, 2, Some("alive-worker"))
    );
    assert_eq!(q.depth("p").await.unwrap(), depth(0, 1));

    // The old holder learns it lost the job and cannot take it back.
    assert_eq!(first.heartbeat().await.unwrap(), Standing::Lost);
    assert_eq!(first.standing().await.unwrap(), Standing::Lost);
    assert_eq!(
        first
            .progress(&Progress::new("denoise", Some(3), Some(20)))
            .await
            .unwrap(),
        Standing::Lost
    );
    assert_eq!(
        first
            .fail(&Failure::retryable("WorkerError", "x"))
            .await
            .unwrap(),
        Outcome::Lost
    );
    assert_eq!(
        first.hand_back("HandedBack", "x").await.unwrap(),
        Outcome::Lost
    );
    let busy = q.busy_workers("p").await.unwrap();
    assert_eq!(busy.len(), 1);
    assert_eq!(
        (busy[0].worker.as_str(), busy[0].uid.as_str()),
        ("alive-worker", "j")
    );
    assert_eq!(busy[0].deliveries, 2);

    assert_eq!(
        second.complete(&result("file:///j")).await.unwrap(),
        Outcome::Finished(JobState::Succeeded)
    );
    let ev = all_events(&q).await;
    let claims: Vec<(u32, Option<&str>)> = ev
        .iter()
        .filter(|e| e.kind == EventKind::Claimed)
        .map(|e| (e.attempt, e.worker.as_deref()))
        .collect();
    assert_eq!(
        claims,
        vec![(1, Some("dead-worker")), (2, Some("alive-worker"))]
    );
    assert_eq!(count(&ev, "j", EventKind::Succeeded), 1);
}

#[tokio::test]
async fn a_heartbeating_job_is_never_stolen() {
    // Lease 800 ms, heartbeat every 133 ms.
    let (_redis, q) = setup(800).await;
    q.enqueue(&job("long"), &spec("p", "normal", 3))
        .await
        .unwrap();
    let mut holder = q.worker("p", "holder").await.unwrap();
    let claim = holder.claim(WAIT).await.unwrap().unwrap();
    let hb = claim.start_heartbeat();

    // Another worker keeps trying for many leases.
    let mut thief = q.worker("p", "thief").await.unwrap();
    let started = std::time::Instant::now();
    let mut tries = 0;
    while started.elapsed() < Duration::from_millis(3000) {
        assert!(
            thief
                .claim(Duration::from_millis(100))
                .await
                .unwrap()
                .is_none(),
            "job stolen"
        );
        tries += 1;
    }
    assert!(tries > 5);
    assert_eq!(hb.standing(), Standing::Active);
    let rec = q.get_job("p", "long").await.unwrap().unwrap();
    assert_eq!((rec.attempt, rec.worker.as_deref()), (1, Some("holder")));
    let busy = q.busy_workers("p").await.unwrap();
    assert_eq!(
        busy[0].deliveries, 1,
        "heartbeats must not count as deliveries"
    );
    let workers = q.workers("p").await.unwrap();
    let h = workers.iter().find(|w| w.name == "holder").unwrap();
    assert_eq!(h.job.as_deref(), Some("long"));
    let t = workers.iter().find(|w| w.name == "thief").unwrap();
    assert_eq!(t.job, None);

    drop(hb);
    assert_eq!(
        claim.complete(&result("file:///long")).await.unwrap(),
        Outcome::Finished(JobState::Succeeded)
    );
    let workers = q.workers("p").await.unwrap();
    assert!(workers.iter().all(|w| w.job.is_none()));
}

#[tokio::test]
async fn dead_letter_after_max_attempts_keeps_the_reason() {
    let (_redis, q) = setup(250).await;

    // Retryable failures until the attempts are used up.
    q.enqueue(&job("flaky"), &spec("p", "normal", 2))
        .await
        .unwrap();
    let mut w = q.worker("p", "w1").await.unwrap();
    let c1 = w.claim(WAIT).await.unwrap().unwrap();
    assert_eq!(
        c1.fail(&Failure::retryable("WorkerError", "CUDA out of memory"))
            .await
            .unwrap(),
        Outcome::Requeued { attempt: 1 }
    );
    let c2 = w.claim(WAIT).await.unwrap().unwrap();
    assert_eq!(c2.attempt(), 2);
    assert_eq!(
        c2.fail(&Failure::retryable("WorkerError", "CUDA out of memory"))
            .await
            .unwrap(),
        Outcome::DeadLettered
    );
    // Retrying the same call is harmless.
    assert_eq!(
        c2.fail(&Failure::retryable("WorkerError", "CUDA out of memory"))
            .await
            .unwrap(),
        Outcome::AlreadyFinished(JobState::Failed)
    );
    let rec = q.get_job("p", "flaky").await.unwrap().unwrap();
    assert_eq!(rec.state, JobState::Failed);
    assert_eq!(rec.reason.as_deref(), Some("AttemptsExhausted"));
    let msg = rec.message.unwrap();
    assert!(
        msg.contains("WorkerError") && msg.contains("CUDA out of memory") && msg.contains("2 of 2"),
        "{msg}"
    );

    // Workers that die: the reclaim that would exceed the attempts dead-letters instead.
    q.enqueue(&job("poison"), &spec("p", "normal", 2))
        .await
        .unwrap();
    let mut a = q.worker("p", "a").await.unwrap();
    let _first = a.claim(WAIT).await.unwrap().unwrap();
    let mut b = q.worker("p", "b").await.unwrap();
    let second = b.claim(WAIT).await.unwrap().unwrap();
    assert_eq!((second.uid(), second.attempt()), ("poison", 2));
    let mut c = q.worker("p", "c").await.unwrap();
    assert!(c.claim(Duration::from_secs(1)).await.unwrap().is_none());
    assert_eq!(q.depth("p").await.unwrap(), depth(0, 0));
    let rec = q.get_job("p", "poison").await.unwrap().unwrap();
    assert_eq!(
        (rec.state, rec.reason.as_deref()),
        (JobState::Failed, Some("AttemptsExhausted"))
    );

    let dead = q.dead_letters("p", 10).await.unwrap();
    assert_eq!(dead.len(), 2);
    let poison = dead.iter().find(|d| d.uid == "poison").unwrap();
    assert_eq!(poison.reason, "AttemptsExhausted");
    assert_eq!(poison.last_reason, "WorkerLost");
    assert_eq!((poison.attempt, poison.max_attempts), (2, 2));
    assert_eq!(poison.worker.as_deref(), Some("b"));
    assert!(poison.spec.contains("dog-mask.png"));
    let flaky = dead.iter().find(|d| d.uid == "flaky").unwrap();
    assert_eq!(flaky.last_reason, "WorkerError");
    assert!(flaky.message.contains("CUDA out of memory"));

    let ev = all_events(&q).await;
    assert_eq!(count(&ev, "flaky", EventKind::Retrying), 1);
    for uid in ["flaky", "poison"] {
        let failed: Vec<_> = ev
            .iter()
            .filter(|e| e.uid == uid && e.kind == EventKind::Failed)
            .collect();
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0].error().unwrap().reason, "AttemptsExhausted");
    }
}

#[tokio::test]
async fn a_reclaimed_job_completed_twice_shows_one_success() {
    let (_redis, q) = setup(250).await;

    // Reclaimer finishes first, then the slow original holder.
    q.enqueue(&job("j1"), &spec("p", "normal", 3))
        .await
        .unwrap();
    let mut slow = q.worker("p", "slow").await.unwrap();
    let c_slow = slow.claim(WAIT).await.unwrap().unwrap();
    let mut fast = q.worker("p", "fast").await.unwrap();
    let c_fast = fast.claim(WAIT).await.unwrap().unwrap();
    assert_eq!(c_fast.uid(), "j1");
    assert_eq!(
        c_fast.complete(&result("file:///fast")).await.unwrap(),
        Outcome::Finished(JobState::Succeeded)
    );
    assert_eq!(
        c_slow.complete(&result("file:///slow")).await.unwrap(),
        Outcome::AlreadyFinished(JobState::Succeeded)
    );
    // Repeating a completion is harmless too.
    assert_eq!(
        c_fast.complete(&result("file:///fast")).await.unwrap(),
        Outcome::AlreadyFinished(JobState::Succeeded)
    );
    let rec = q.get_job("p", "j1").await.unwrap().unwrap();
    assert_eq!(rec.output.as_deref(), Some("file:///fast"));
    assert_eq!(rec.worker.as_deref(), Some("fast"));

    // The original holder finishes first while the reclaimer still runs: first result wins,
    // the reclaimer sees its claim lost.
    q.enqueue(&job("j2"), &spec("p", "normal", 3))
        .await
        .unwrap();
    let c_slow = slow.claim(WAIT).await.unwrap().unwrap();
    let c_fast = fast.claim(WAIT).await.unwrap().unwrap();
    assert_eq!((c_fast.uid(), c_fast.attempt()), ("j2", 2));
    assert_eq!(
        c_slow.complete(&result("file:///slow")).await.unwrap(),
        Outcome::Finished(JobState::Succeeded)
    );
    assert_eq!(c_fast.heartbeat().await.unwrap(), Standing::Lost);
    assert_eq!(
        c_fast.complete(&result("file:///fast")).await.unwrap(),
        Outcome::AlreadyFinished(JobState::Succeeded)
    );
    assert_eq!(q.depth("p").await.unwrap(), depth(0, 0));
    assert!(q.busy_workers("p").await.unwrap().is_empty());

    let ev = all_events(&q).await;
    assert_eq!(count(&ev, "j1", EventKind::Succeeded), 1);
    assert_eq!(count(&ev, "j2", EventKind::Succeeded), 1);
    let s = ev
        .iter()
        .find(|e| e.uid == "j2" && e.kind == EventKind::Succeeded)
        .unwrap();
    assert_eq!(s.result().unwrap().output, "file:///slow");
    assert_eq!(s.result().unwrap().timings.denoise, Some(1200));
    // The work counts travel in the event and stay in the job hash, unrounded (2⁵⁰ FLOP).
    assert_eq!(s.result().unwrap().work, result("").work);
    let rec = q.get_job("p", "j2").await.unwrap().unwrap();
    assert_eq!(rec.work, result("").work);
    assert_eq!(
        rec.work.and_then(|w| w.total).map(|t| t.f16_gemm_flop),
        Some(1 << 50)
    );
}

#[tokio::test]
async fn cancel_a_waiting_and_a_running_job() {
    // Lease 600 ms: heartbeats every 100 ms carry the cancel flag.
    let (_redis, q) = setup(600).await;
    q.enqueue(&job("run"), &spec("p", "normal", 3))
        .await
        .unwrap();
    q.enqueue(&job("wait"), &spec("p", "normal", 3))
        .await
        .unwrap();
    let mut w = q.worker("p", "w1").await.unwrap();
    let running = w.claim(WAIT).await.unwrap().unwrap();
    assert_eq!(running.uid(), "run");
    let hb = running.start_heartbeat();

    // Waiting: gone at once, never claimed.
    assert_eq!(
        q.cancel("p", "wait").await.unwrap(),
        CancelOutcome::Cancelled
    );
    assert_eq!(
        q.cancel("p", "wait").await.unwrap(),
        CancelOutcome::AlreadyFinished(JobState::Cancelled)
    );
    let rec = q.get_job("p", "wait").await.unwrap().unwrap();
    assert_eq!(
        (rec.state, rec.reason.as_deref()),
        (JobState::Cancelled, Some("Cancelled"))
    );
    assert!(rec.finished_at.is_some());
    let mut other = q.worker("p", "w2").await.unwrap();
    assert!(
        other
            .claim(Duration::from_millis(300))
            .await
            .unwrap()
            .is_none()
    );

    // Running: flagged; the worker sees it between steps, then confirms.
    assert!(!running.is_cancelled().await.unwrap());
    assert_eq!(
        running
            .progress(&Progress::new("denoise", Some(1), Some(20)))
            .await
            .unwrap(),
        Standing::Active
    );
    assert_eq!(
        q.cancel("p", "run").await.unwrap(),
        CancelOutcome::Requested
    );
    assert!(running.is_cancelled().await.unwrap());
    assert_eq!(
        running
            .progress(&Progress::new("denoise", Some(2), Some(20)))
            .await
            .unwrap(),
        Standing::CancelRequested
    );
    let mut hb = hb;
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(5), hb.stopped())
            .await
            .unwrap(),
        Standing::CancelRequested
    );
    assert_eq!(
        running.cancelled("cancelled at step 2").await.unwrap(),
        Outcome::Finished(JobState::Cancelled)
    );
    assert_eq!(
        running.cancelled("again").await.unwrap(),
        Outcome::AlreadyFinished(JobState::Cancelled)
    );
    assert_eq!(
        q.cancel("p", "run").await.unwrap(),
        CancelOutcome::AlreadyFinished(JobState::Cancelled)
    );
    assert_eq!(
        q.cancel("p", "nope").await.unwrap(),
        CancelOutcome::NotFound
    );
    assert_eq!(q.depth("p").await.unwrap(), depth(0, 0));

    let ev = all_events(&q).await;
    for uid in ["run", "wait"] {
        assert_eq!(count(&ev, uid, EventKind::Cancelled), 1);
    }
    let run = ev
        .iter()
        .find(|e| e.uid == "run" && e.kind == EventKind::Cancelled)
        .unwrap();
    assert_eq!(run.error().unwrap().message, "cancelled at step 2");
    assert_eq!(run.worker.as_deref(), Some("w1"));
    let prog: Vec<_> = ev
        .iter()
        .filter_map(|e| e.progress())
        .map(|p| p.step)
        .collect();
    assert_eq!(prog, vec![Some(1), Some(2)]);
}

#[tokio::test]
async fn a_cancelled_job_of_a_dead_worker_is_cancelled_on_reclaim() {
    let (_redis, q) = setup(250).await;
    q.enqueue(&job("j"), &spec("p", "normal", 3)).await.unwrap();
    let mut dead = q.worker("p", "dead").await.unwrap();
    let _c = dead.claim(WAIT).await.unwrap().unwrap();
    assert_eq!(q.cancel("p", "j").await.unwrap(), CancelOutcome::Requested);
    let mut w = q.worker("p", "w").await.unwrap();
    assert!(w.claim(Duration::from_secs(1)).await.unwrap().is_none());
    assert_eq!(
        q.job_state("p", "j").await.unwrap(),
        Some(JobState::Cancelled)
    );
    assert_eq!(q.depth("p").await.unwrap(), depth(0, 0));
}

#[tokio::test]
async fn hand_back_requeues_without_using_an_attempt() {
    let (_redis, q) = setup(60_000).await;
    q.enqueue(&job("j"), &spec("p", "high", 1)).await.unwrap();
    let mut w = q.worker("p", "leaving").await.unwrap();
    let c = w.claim(WAIT).await.unwrap().unwrap();
    assert_eq!(c.attempt(), 1);
    assert_eq!(
        c.hand_back("HandedBack", "worker shutting down")
            .await
            .unwrap(),
        Outcome::Requeued { attempt: 0 }
    );
    assert_eq!(
        c.hand_back("HandedBack", "again").await.unwrap(),
        Outcome::Lost
    );
    assert_eq!(q.depth("p").await.unwrap(), depth(1, 0));
    let rec = q.get_job("p", "j").await.unwrap().unwrap();
    assert_eq!(
        (rec.state, rec.attempt, rec.worker),
        (JobState::Queued, 0, None)
    );
    assert_eq!(w.leave().await.unwrap(), 0);

    let mut next = q.worker("p", "next").await.unwrap();
    let c = next.claim(WAIT).await.unwrap().unwrap();
    assert_eq!(
        (c.uid(), c.attempt(), c.priority()),
        ("j", 1, Priority::High)
    );
    c.complete(&result("file:///j")).await.unwrap();
    let ev = all_events(&q).await;
    let r = ev.iter().find(|e| e.kind == EventKind::Retrying).unwrap();
    assert_eq!(r.error().unwrap().reason, "HandedBack");
    assert_eq!(r.worker.as_deref(), Some("leaving"));
    let names: Vec<String> = q
        .workers("p")
        .await
        .unwrap()
        .into_iter()
        .map(|w| w.name)
        .collect();
    assert_eq!(
        names,
        vec!["next".to_string()],
        "leave removes the worker from the registry"
    );
}

#[tokio::test]
async fn a_restarted_worker_resumes_its_own_job_at_once() {
    let (_redis, q) = setup(60_000).await;
    q.enqueue(&job("j"), &spec("p", "normal", 3)).await.unwrap();
    let mut before = q.worker("p", "pod-0").await.unwrap();
    let c = before.claim(WAIT).await.unwrap().unwrap();
    assert_eq!(c.attempt(), 1);
    drop(before);
    // Same pod name after a container restart: no need to wait a 60 s lease.
    let mut after = q.worker("p", "pod-0").await.unwrap();
    let c2 = after
        .claim(Duration::from_millis(500))
        .await
        .unwrap()
        .expect("own job resumed");
    assert_eq!(
        (c2.uid(), c2.attempt(), c2.reclaimed_from()),
        ("j", 2, Some("pod-0"))
    );
}

#[tokio::test]
async fn forget_and_prune() {
    let (_redis, q) = setup(60_000).await;
    q.enqueue(&job("a"), &spec("p", "normal", 3)).await.unwrap();
    q.enqueue(&job("b"), &spec("p", "normal", 3)).await.unwrap();
    let mut w = q.worker("p", "w").await.unwrap();
    let a = w.claim(WAIT).await.unwrap().unwrap();
    assert!(q.forget("p", "a").await.unwrap());
    assert!(!q.forget("p", "a").await.unwrap());
    assert_eq!(a.heartbeat().await.unwrap(), Standing::Lost);
    assert_eq!(
        a.complete(&result("file:///a")).await.unwrap(),
        Outcome::NotFound
    );
    assert!(q.forget("p", "b").await.unwrap());
    assert_eq!(q.depth("p").await.unwrap(), depth(0, 0));
    assert_eq!(q.get_job("p", "b").await.unwrap(), None);
    assert!(w.claim(Duration::from_millis(300)).await.unwrap().is_none());

    assert_eq!(q.workers("p").await.unwrap().len(), 1);
    assert_eq!(
        q.prune_workers("p", Duration::from_secs(3600))
            .await
            .unwrap(),
        0
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        q.prune_workers("p", Duration::from_millis(10))
            .await
            .unwrap(),
        1
    );
    assert!(q.workers("p").await.unwrap().is_empty());
}

#[tokio::test]
async fn finished_jobs_expire() {
    let (redis, _) = setup(60_000).await;
    let cfg = pawfect_queue::QueueConfig {
        finished_ttl: Duration::from_millis(300),
        ..common::config(&redis.url(), 60_000)
    };
    let q = pawfect_queue::Queue::connect(cfg).await.unwrap();
    q.enqueue(&job("j"), &spec("p", "normal", 3)).await.unwrap();
    let mut w = q.worker("p", "w").await.unwrap();
    let c = w.claim(WAIT).await.unwrap().unwrap();
    c.complete(&result("file:///j")).await.unwrap();
    assert!(q.get_job("p", "j").await.unwrap().is_some());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while q.get_job("p", "j").await.unwrap().is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "finished job never expired"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn events_reader_redelivers_unacked_events_after_a_restart() {
    let (_redis, q) = setup(60_000).await;
    q.enqueue(&job("j"), &spec("p", "normal", 3)).await.unwrap();
    let mut w = q.worker("p", "w").await.unwrap();
    let c = w.claim(WAIT).await.unwrap().unwrap();
    c.progress(&Progress::new("fetch", None, None))
        .await
        .unwrap();

    let mut r1 = q.events("operator-0").await.unwrap();
    let batch = r1.next(10, Duration::from_millis(100)).await.unwrap();
    assert_eq!(
        batch.iter().map(|e| e.kind).collect::<Vec<_>>(),
        vec![EventKind::Claimed, EventKind::Progress]
    );
    r1.ack(&batch[..1]).await.unwrap();
    drop(r1);

    // Same consumer name after a restart: its unacked event comes first.
    let mut r2 = q.events("operator-0").await.unwrap();
    let again = r2.next(10, Duration::from_millis(100)).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].id, batch[1].id);
    assert_eq!(again[0].progress().unwrap().stage, "fetch");
    r2.ack(&again[..1]).await.unwrap();
    assert!(
        r2.next(10, Duration::from_millis(100))
            .await
            .unwrap()
            .is_empty()
    );

    c.complete(&result("file:///j")).await.unwrap();
    let done = r2.next(10, Duration::from_millis(500)).await.unwrap();
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].kind, EventKind::Succeeded);
    assert_eq!(
        (
            done[0].namespace.as_str(),
            done[0].name.as_str(),
            done[0].pool.as_str()
        ),
        ("pets", "job-j", "p")
    );
}

#[tokio::test]
async fn events_of_another_consumer_are_taken_over_when_idle() {
    let (redis, _) = setup(60_000).await;
    let cfg = pawfect_queue::QueueConfig {
        events_redeliver_after: Duration::from_millis(200),
        ..common::config(&redis.url(), 60_000)
    };
    let q = pawfect_queue::Queue::connect(cfg).await.unwrap();
    q.enqueue(&job("j"), &spec("p", "normal", 3)).await.unwrap();
    let mut w = q.worker("p", "w").await.unwrap();
    w.claim(WAIT).await.unwrap().unwrap();

    let mut old_pod = q.events("operator-abc").await.unwrap();
    assert_eq!(
        old_pod
            .next(10, Duration::from_millis(100))
            .await
            .unwrap()
            .len(),
        1
    );
    drop(old_pod); // crashed before acking

    let mut new_pod = q.events("operator-xyz").await.unwrap();
    let mut got = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while got.is_empty() && std::time::Instant::now() < deadline {
        got = new_pod.next(10, Duration::from_millis(100)).await.unwrap();
    }
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].kind, EventKind::Claimed);
}

#[tokio::test]
async fn leave_hands_back_what_the_worker_still_holds() {
    let (_redis, q) = setup(60_000).await;
    q.enqueue(&job("held"), &spec("p", "normal", 3))
        .await
        .unwrap();
    q.enqueue(&job("flagged"), &spec("p", "high", 3))
        .await
        .unwrap();
    let mut a = q.worker("p", "a").await.unwrap();
    let flagged = a.claim(WAIT).await.unwrap().unwrap();
    assert_eq!(flagged.uid(), "flagged");
    let held = a.claim(WAIT).await.unwrap().unwrap();
    assert_eq!(held.uid(), "held");
    assert_eq!(
        q.cancel("p", "flagged").await.unwrap(),
        CancelOutcome::Requested
    );
    assert_eq!(q.depth("p").await.unwrap(), depth(0, 2));

    // Shut down without finishing either claim.
    assert_eq!(a.leave().await.unwrap(), 1);
    assert_eq!(q.depth("p").await.unwrap(), depth(1, 0));
    assert_eq!(
        q.job_state("p", "flagged").await.unwrap(),
        Some(JobState::Cancelled)
    );
    let rec = q.get_job("p", "held").await.unwrap().unwrap();
    assert_eq!(
        (rec.state, rec.attempt, rec.worker),
        (JobState::Queued, 0, None)
    );
    assert!(q.workers("p").await.unwrap().is_empty());
    assert_eq!(held.heartbeat().await.unwrap(), Standing::Lost);

    let mut b = q.worker("p", "b").await.unwrap();
    let again = b.claim(WAIT).await.unwrap().unwrap();
    assert_eq!((again.uid(), again.attempt()), ("held", 1));
    let ev = all_events(&q).await;
    let r: Vec<_> = ev
        .iter()
        .filter(|e| e.kind == EventKind::Retrying)
        .collect();
    assert_eq!(r.len(), 1);
    assert_eq!(
        (r[0].uid.as_str(), r[0].error().unwrap().reason.as_str()),
        ("held", "HandedBack")
    );
    assert_eq!(count(&ev, "flagged", EventKind::Cancelled), 1);
}

#[tokio::test]
async fn keys_of_the_old_layout_are_counted() {
    let (redis, q) = setup(60_000).await;
    q.enqueue(&job("new"), &spec("pets/default", "normal", 3))
        .await
        .unwrap();
    assert_eq!(
        q.legacy_keys(100).await.unwrap(),
        0,
        "the new layout is not counted"
    );
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    for key in [
        "pawfect:job:u1",
        "pawfect:job:u2",
        "pawfect:jobs:pets/default",
        "pawfect:events",
        "pawfect:server",
        "other:job:u3",
    ] {
        let _: () = redis::cmd("HSET")
            .arg(key)
            .arg("state")
            .arg("queued")
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    assert_eq!(q.legacy_keys(100).await.unwrap(), 5);
    assert_eq!(
        q.legacy_keys(3).await.unwrap(),
        3,
        "counting stops at the limit"
    );
}

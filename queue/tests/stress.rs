//! Many consumers at once, and Redis crashing under load.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{all_events, config, job, spec};
use pawfect_api::QueueDepth;
use pawfect_queue::testing::RedisServer;
use pawfect_queue::{EventKind, JobResult, JobState, Outcome, Queue, QueueError};

fn result(uid: &str) -> JobResult {
    JobResult {
        output: format!("file:///out/{uid}.png"),
        ..Default::default()
    }
}

/// Uids known to be succeeded, shared by the consumers of a test.
type Done = Arc<Mutex<HashSet<String>>>;

fn done_count(done: &Done) -> usize {
    done.lock().unwrap().len()
}

/// Claims and completes until `done` holds `total` uids; returns (uid, attempt, outcome) of
/// each completion it made and the number of transient errors it rode out.
async fn consume(
    queue: Queue,
    name: String,
    done: Done,
    total: usize,
) -> (Vec<(String, u32, Outcome)>, usize) {
    let mut session = loop {
        match queue.worker("p", &name).await {
            Ok(s) => break s,
            Err(e) => {
                assert!(e.is_transient(), "{name}: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let mut mine = Vec::new();
    let mut errors = 0;
    while done_count(&done) < total {
        let claim = match session.claim(Duration::from_millis(200)).await {
            Ok(Some(c)) => c,
            Ok(None) => continue,
            Err(e) => {
                assert!(e.is_transient(), "{name}: claim: {e}");
                errors += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let outcome = loop {
            match claim.complete(&result(claim.uid())).await {
                Ok(o) => break o,
                Err(e) => {
                    assert!(e.is_transient(), "{name}: complete: {e}");
                    errors += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        match outcome {
            // AlreadyFinished: the reply of an applied completion was lost in a crash and the
            // retry saw it done, or another worker took the job over and finished it first.
            Outcome::Finished(JobState::Succeeded)
            | Outcome::AlreadyFinished(JobState::Succeeded) => {
                done.lock().unwrap().insert(claim.uid().to_string());
                mine.push((claim.uid().to_string(), claim.attempt(), outcome));
            }
            other => panic!("{name}: unexpected outcome {other:?} for {}", claim.uid()),
        }
    }
    (mine, errors)
}

async fn retry<T>(mut f: impl AsyncFnMut() -> Result<T, QueueError>) -> T {
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) => {
                assert!(e.is_transient(), "{e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_consumers_complete_every_job_exactly_once() {
    const PER_CONSUMER: usize = 500;
    const TOTAL: usize = 4 * PER_CONSUMER;
    let redis = RedisServer::start().unwrap();
    let q = Queue::connect(config(&redis.url(), 60_000)).await.unwrap();
    let done: Done = Arc::default();

    // Consumers start first and block; the producer feeds them (a mix of priorities).
    let consumers: Vec<_> = (0..4)
        .map(|i| {
            tokio::spawn(consume(
                q.clone(),
                format!("worker-{i}"),
                done.clone(),
                TOTAL,
            ))
        })
        .collect();
    let producer = {
        let q = q.clone();
        tokio::spawn(async move {
            for i in 0..TOTAL {
                let prio = if i % 5 == 0 { "high" } else { "normal" };
                let uid = format!("job-{i:04}");
                let e = q.enqueue(&job(&uid), &spec("p", prio, 3)).await.unwrap();
                assert!(e.created);
                // Re-enqueue some while they may be running: never a second entry.
                if i % 7 == 0 {
                    assert!(
                        !q.enqueue(&job(&uid), &spec("p", prio, 3))
                            .await
                            .unwrap()
                            .created
                    );
                }
            }
        })
    };
    producer.await.unwrap();

    let mut by_uid: HashMap<String, Vec<(String, u32, Outcome)>> = HashMap::new();
    for (i, c) in consumers.into_iter().enumerate() {
        let (mine, errors) = tokio::time::timeout(Duration::from_secs(120), c)
            .await
            .expect("consumers finish")
            .unwrap();
        assert_eq!(errors, 0);
        for (uid, attempt, outcome) in mine {
            by_uid
                .entry(uid)
                .or_default()
                .push((format!("worker-{i}"), attempt, outcome));
        }
    }
    assert_eq!(by_uid.len(), TOTAL);
    for (uid, runs) in &by_uid {
        assert_eq!(runs.len(), 1, "{uid} completed {runs:?}");
        assert_eq!(runs[0].1, 1, "{uid} needed a second attempt: {runs:?}");
        assert_eq!(runs[0].2, Outcome::Finished(JobState::Succeeded));
        assert_eq!(
            q.job_state("p", uid).await.unwrap(),
            Some(JobState::Succeeded)
        );
    }
    assert_eq!(
        q.depth("p").await.unwrap(),
        QueueDepth {
            waiting: 0,
            running: 0
        }
    );

    let ev = all_events(&q).await;
    let mut succeeded: HashMap<&str, usize> = HashMap::new();
    let mut claimed: HashMap<&str, usize> = HashMap::new();
    for e in &ev {
        match e.kind {
            EventKind::Succeeded => *succeeded.entry(&e.uid).or_default() += 1,
            EventKind::Claimed => *claimed.entry(&e.uid).or_default() += 1,
            other => panic!("unexpected event {other:?} for {}", e.uid),
        }
    }
    assert_eq!(succeeded.len(), TOTAL);
    assert!(succeeded.values().all(|&n| n == 1));
    assert!(claimed.values().all(|&n| n == 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_crash_with_aof_loses_nothing() {
    const TOTAL: usize = 300;
    let mut redis = RedisServer::start_aof().unwrap();
    // A short lease: a claim whose reply was lost in the crash is taken over soon.
    let q = Queue::connect(config(&redis.url(), 500)).await.unwrap();
    for i in 0..TOTAL {
        let prio = if i % 4 == 0 { "high" } else { "normal" };
        q.enqueue(&job(&format!("job-{i:03}")), &spec("p", prio, 5))
            .await
            .unwrap();
    }
    let done: Done = Arc::default();
    let consumers: Vec<_> = (0..3)
        .map(|i| {
            tokio::spawn(consume(
                q.clone(),
                format!("worker-{i}"),
                done.clone(),
                TOTAL,
            ))
        })
        .collect();

    // Crash Redis (SIGKILL) mid-run, twice, and bring it back on the same port and data.
    for crash_at in [TOTAL / 4, TOTAL / 2] {
        while done_count(&done) < crash_at {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        redis.kill().unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        redis.restart().unwrap();
    }

    let mut completed: Vec<String> = Vec::new();
    let mut errors = 0;
    for c in consumers {
        let (mine, e) = tokio::time::timeout(Duration::from_secs(120), c)
            .await
            .expect("consumers finish")
            .unwrap();
        errors += e;
        completed.extend(mine.into_iter().map(|(uid, _, _)| uid));
    }
    assert!(errors > 0, "the crash should have been noticed");
    let distinct: HashSet<&String> = completed.iter().collect();
    assert_eq!(distinct.len(), TOTAL, "every job completed");
    for i in 0..TOTAL {
        let uid = format!("job-{i:03}");
        let rec = retry(async || q.get_job("p", &uid).await)
            .await
            .expect("job kept");
        assert_eq!(rec.state, JobState::Succeeded, "{uid}");
        assert_eq!(
            rec.output.as_deref(),
            Some(format!("file:///out/{uid}.png").as_str())
        );
    }
    assert_eq!(
        retry(async || q.depth("p").await).await,
        QueueDepth {
            waiting: 0,
            running: 0
        }
    );
    let ev = all_events(&q).await;
    let mut succeeded: HashMap<&str, usize> = HashMap::new();
    for e in ev.iter().filter(|e| e.kind == EventKind::Succeeded) {
        *succeeded.entry(&e.uid).or_default() += 1;
    }
    assert_eq!(succeeded.len(), TOTAL, "a success event for every job");
    assert!(
        succeeded.values().all(|&n| n == 1),
        "no job succeeded twice"
    );
}

//! A Redis outage longer than the lease, against a real redis-server stopped and restarted on
//! its AOF: a job whose worker lived through the outage (and finished during it) is neither
//! taken over nor charged an attempt; a job whose worker died is still taken over once the
//! restarted server has been up for a lease.

mod common;

use std::time::{Duration, Instant};

use common::{all_events, config, count, job, spec};
use pawfect_api::StageTimings;
use pawfect_queue::testing::RedisServer;
use pawfect_queue::{EventKind, JobResult, JobState, Outcome, Queue};

const LEASE_MS: u64 = 500;

fn result(output: &str) -> JobResult {
    JobResult {
        output: output.to_string(),
        caption: None,
        prompt: Some("grass".into()),
        prompt_source: Some("prompt".into()),
        timings: StageTimings::default(),
        work: None,
    }
}

/// Awaits the call until Redis answers (the connections reconnect after the restart).
macro_rules! answered {
    ($call:expr) => {{
        // Reconnecting to a local server takes milliseconds; 20 s only bounds a broken run.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match $call.await {
                Ok(v) => break v,
                Err(e) if e.is_transient() && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("{e}"),
            }
        }
    }};
}

#[tokio::test]
async fn an_outage_longer_than_the_lease_costs_a_live_worker_nothing() {
    let mut redis = RedisServer::start_aof().unwrap();
    let q = Queue::connect(config(&redis.url(), LEASE_MS))
        .await
        .unwrap();
    // One attempt only: a reclaim after the outage would dead-letter it.
    q.enqueue(&job("done"), &spec("p", "normal", 1))
        .await
        .unwrap();
    q.enqueue(&job("orphan"), &spec("p", "normal", 2))
        .await
        .unwrap();
    let mut live = q.worker("p", "live").await.unwrap();
    let done = live.claim(Duration::from_secs(5)).await.unwrap().unwrap();
    assert_eq!((done.uid(), done.attempt()), ("done", 1));
    let mut dead = q.worker("p", "dead").await.unwrap();
    let orphan = dead.claim(Duration::from_secs(5)).await.unwrap().unwrap();
    assert_eq!((orphan.uid(), orphan.attempt()), ("orphan", 1));
    drop(orphan); // `dead` never heartbeats or reports again.
    let mut other = q.worker("p", "other").await.unwrap();

    // Down for three leases; `live` finishes its job meanwhile and stores its output.
    redis.stop().unwrap();
    tokio::time::sleep(Duration::from_millis(LEASE_MS * 3)).await;
    redis.restart().unwrap();

    // Both entries look idle for three leases, but the server is new: nothing is taken over.
    let got = answered!(other.claim(Duration::ZERO));
    assert!(got.is_none(), "taken over right after the restart: {got:?}");

    // The live worker's report gets through: the job is done, on its first attempt.
    assert_eq!(
        answered!(done.complete(&result("file:///out/done.png"))),
        Outcome::Finished(JobState::Succeeded)
    );
    let rec = q.get_job("p", "done").await.unwrap().unwrap();
    assert_eq!(
        (rec.state, rec.attempt, rec.worker.as_deref()),
        (JobState::Succeeded, 1, Some("live"))
    );

    // The dead worker's job is taken over once the new server has been up for a lease.
    let again = other
        .claim(Duration::from_secs(10))
        .await
        .unwrap()
        .expect("the orphan is reclaimed");
    assert_eq!(
        (again.uid(), again.attempt(), again.reclaimed_from()),
        ("orphan", 2, Some("dead"))
    );

    assert!(q.dead_letters("p", 10).await.unwrap().is_empty());
    let events = all_events(&q).await;
    assert_eq!(count(&events, "done", EventKind::Claimed), 1);
    assert_eq!(count(&events, "done", EventKind::Succeeded), 1);
    assert_eq!(count(&events, "done", EventKind::Failed), 0);
}

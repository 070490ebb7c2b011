//! Jobs a worker must not run, as other versions, tools or people may write them into the
//! queue: an unknown priority, a `max_attempts` or `attempt` that is not a number, a hash
//! without a state or with an unknown one, a spec outside the CRD's limits. Each fails at its
//! first claim, permanently, with `InvalidInput` and the real reason: it is never left running
//! to be reclaimed once per lease and dead-lettered as `WorkerLost`.

mod common;

use std::time::Duration;

use common::{all_events, count, job, setup, spec};
use pawfect_queue::{EventKind, JobState, Queue};

/// Lease of these tests: short, so a reclaim loop would show within the test.
const LEASE_MS: u64 = 300;

async fn raw(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// State, reason and message of a job, read from the hash itself.
async fn reason(
    conn: &mut redis::aio::MultiplexedConnection,
    q: &Queue,
    uid: &str,
) -> (Option<String>, Option<String>, Option<String>) {
    redis::cmd("HMGET")
        .arg(q.keys().job("p", uid))
        .arg("state")
        .arg("reason")
        .arg("message")
        .query_async(conn)
        .await
        .unwrap()
}

fn spec_json(change: serde_json::Value) -> String {
    let mut v = serde_json::to_value(spec("p", "normal", 3)).unwrap();
    for (k, x) in change.as_object().unwrap() {
        v[k] = x.clone();
    }
    v.to_string()
}

#[tokio::test]
async fn jobs_a_worker_cannot_run_fail_at_the_first_claim() {
    let (redis, q) = setup(LEASE_MS).await;
    let mut conn = raw(&redis.url()).await;
    // uid, hash field, value written over the enqueued one, expected part of the message.
    let cases: Vec<(&str, &str, String, &str)> = vec![
        (
            "prio",
            "priority",
            "low".into(),
            "the job's priority \"low\" is not one this worker knows",
        ),
        (
            "max",
            "max_attempts",
            "three".into(),
            "the job's max_attempts \"three\" is not a number",
        ),
        (
            "attempt",
            "attempt",
            "1.5".into(),
            "the job's attempt \"2.5\" is not a number",
        ),
        (
            "spec",
            "spec",
            "{\"image\": 3}".into(),
            "the queued spec is not a valid InpaintJobSpec",
        ),
        (
            "steps",
            "spec",
            spec_json(serde_json::json!({"steps": 0})),
            "outside the InpaintJob limits: spec.steps = 0 is outside 1 ≤ steps ≤ 100",
        ),
        (
            "guidance",
            "spec",
            spec_json(serde_json::json!({"guidanceScale": 1e300})),
            "outside the InpaintJob limits: spec.guidanceScale = ",
        ),
        (
            "seed",
            "spec",
            spec_json(serde_json::json!({"seed": u64::MAX})),
            "outside the InpaintJob limits: spec.seed = 18446744073709551615 is outside",
        ),
        (
            "paused",
            "state",
            "paused".into(),
            "the job hash has state paused, which is not queued or running",
        ),
    ];
    for (uid, field, value, _) in &cases {
        q.enqueue(&job(uid), &spec("p", "normal", 3)).await.unwrap();
        let _: () = redis::cmd("HSET")
            .arg(q.keys().job("p", uid))
            .arg(*field)
            .arg(value)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    q.enqueue(&job("stateless"), &spec("p", "normal", 3))
        .await
        .unwrap();
    let _: () = redis::cmd("HDEL")
        .arg(q.keys().job("p", "stateless"))
        .arg("state")
        .query_async(&mut conn)
        .await
        .unwrap();
    q.enqueue(&job("good"), &spec("p", "normal", 3))
        .await
        .unwrap();

    // One claim goes past every job it must not run and gets the good one.
    let mut w = q.worker("p", "w1").await.unwrap();
    let c = w
        .claim(Duration::from_secs(5))
        .await
        .unwrap()
        .expect("the good job");
    assert_eq!((c.uid(), c.attempt()), ("good", 1));
    // The good job stays held; only the others could come back.
    let _hb = c.start_heartbeat();

    // Well past the lease nothing comes back: none of them is still running somewhere.
    tokio::time::sleep(Duration::from_millis(LEASE_MS * 3)).await;
    let mut other = q.worker("p", "w2").await.unwrap();
    assert!(
        other
            .claim(Duration::from_millis(300))
            .await
            .unwrap()
            .is_none(),
        "a failed job was claimed again"
    );

    let mut expected: Vec<(&str, &str)> = cases.iter().map(|(u, _, _, m)| (*u, *m)).collect();
    expected.push(("stateless", "the job hash has no state"));
    let events = all_events(&q).await;
    for (uid, message) in expected {
        let (state, reason_, msg) = reason(&mut conn, &q, uid).await;
        assert_eq!(state.as_deref(), Some("failed"), "{uid}");
        assert_eq!(reason_.as_deref(), Some("InvalidInput"), "{uid}");
        let msg = msg.unwrap_or_default();
        assert!(msg.contains(message), "{uid}: {msg}");
        // The operator reads the same through `get_job`, whatever field was unreadable, so the
        // job's status can say it failed and why.
        let rec = q
            .get_job("p", uid)
            .await
            .unwrap_or_else(|e| panic!("{uid}: get_job: {e}"))
            .unwrap_or_else(|| panic!("{uid}: no record"));
        assert_eq!(rec.state, JobState::Failed, "{uid}");
        assert_eq!(rec.reason.as_deref(), Some("InvalidInput"), "{uid}");
        assert_eq!(rec.message.as_deref(), Some(msg.as_str()), "{uid}");
        if uid == "prio" {
            assert_eq!(rec.priority, None, "an unknown priority reads as None");
        }
        if uid == "attempt" {
            // Its events carry the unreadable attempt: readers skip them as malformed.
            continue;
        }
        assert_eq!(count(&events, uid, EventKind::Failed), 1, "{uid}");
        assert_eq!(count(&events, uid, EventKind::Retrying), 0, "{uid}");
        assert!(
            count(&events, uid, EventKind::Claimed) <= 1,
            "{uid} claimed more than once"
        );
        let failed = events
            .iter()
            .find(|e| e.uid == uid && e.kind == EventKind::Failed)
            .unwrap();
        assert_eq!(failed.error().unwrap().reason, "InvalidInput", "{uid}");
    }
    // A hash that is not a claimable job is never marked running.
    for uid in ["stateless", "paused"] {
        assert_eq!(count(&events, uid, EventKind::Claimed), 0, "{uid}");
    }
    assert!(q.dead_letters("p", 10).await.unwrap().is_empty());
    assert_eq!(
        q.job_state("p", "good").await.unwrap(),
        Some(JobState::Running)
    );
    assert_eq!(
        q.depth("p").await.unwrap(),
        pawfect_api::QueueDepth {
            waiting: 0,
            running: 1
        }
    );
}

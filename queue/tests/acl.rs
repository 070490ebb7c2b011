//! Pool users against a real redis-server with ACLs: two namespaces each have a pool named
//! `default`; each pool's workers log in as the pool's own user (`Queue::apply_pool_user`).
//! A's user runs the whole worker side of the protocol on A's jobs with exactly
//! `acl::WORKER_COMMANDS`, and can read, claim, complete, enqueue or cancel none of B's jobs,
//! nor read B's streams or events. Passwords: several at once (rotation), deletion.

mod common;

use std::time::Duration;

use common::{config, count, job, spec};
use pawfect_api::StageTimings;
use pawfect_queue::acl::Password;
use pawfect_queue::testing::RedisServer;
use pawfect_queue::{
    CancelOutcome, EventKind, Failure, JobRef, JobResult, JobState, Outcome, Progress, Queue,
    QueueError, Standing,
};

const A: &str = "team-a/default";
const B: &str = "team-b/default";
const WAIT: Duration = Duration::from_secs(5);

/// `%XX` for every byte but unreserved ones (user names hold `:` and `/`).
fn pct(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn user_url(server: &RedisServer, user: &str, password: &str) -> String {
    format!(
        "redis://{}:{}@127.0.0.1:{}/",
        pct(user),
        pct(password),
        server.port()
    )
}

/// A queue handle logged in as the pool's own user, and its URL.
async fn pool_queue(server: &RedisServer, admin: &Queue, pool: &str) -> (Queue, String) {
    let password = admin.generate_password().await.unwrap();
    let user = admin
        .apply_pool_user(pool, &[Password::Plain(&password)])
        .await
        .unwrap();
    let url = user_url(server, &user, &password);
    let q = Queue::connect(config(&url, 1_000)).await.unwrap();
    (q, url)
}

fn job_in(pool: &str, uid: &str) -> JobRef {
    let ns = pool.split('/').next().unwrap();
    JobRef::new(uid, ns, format!("job-{uid}"))
}

fn result() -> JobResult {
    JobResult {
        output: "file:///out/a.png".into(),
        caption: None,
        prompt: Some("grass".into()),
        prompt_source: Some("prompt".into()),
        timings: StageTimings::default(),
        ..Default::default()
    }
}

fn noperm<T: std::fmt::Debug>(what: &str, r: Result<T, QueueError>) {
    match r {
        Err(e) if is_noperm(&e.to_string()) => {}
        other => panic!("{what}: expected NOPERM, got {other:?}"),
    }
}

/// Redis' NOPERM error, as redis-rs prints it (inside a script Redis words it otherwise).
fn is_noperm(text: &str) -> bool {
    text.to_ascii_lowercase().contains("noperm")
        || text.contains("can't access at least one of the keys")
}

#[tokio::test]
async fn a_pool_user_reaches_its_own_pool_only() {
    let server = RedisServer::start().unwrap();
    let admin = Queue::connect(config(&server.url(), 1_000)).await.unwrap();
    for pool in [A, B] {
        admin.ensure_pool(pool).await.unwrap();
        for uid in ["1", "2", "3", "4"] {
            let uid = format!("{}-{uid}", &pool[..6]);
            admin
                .enqueue(&job_in(pool, &uid), &spec(pool, "normal", 2))
                .await
                .unwrap();
        }
    }
    let (qa, qa_url) = pool_queue(&server, &admin, A).await;

    // A's whole worker protocol, under A's user: claim, heartbeat, progress, complete; a
    // retryable failure and its re-claim; a hand-back; a cancel seen and confirmed; leave;
    // a blocking claim that waits for a job enqueued meanwhile.
    let mut w = qa.worker(A, "wa").await.unwrap();
    let c = w.claim(WAIT).await.unwrap().expect("A claims its job");
    assert_eq!(c.uid(), "team-a-1");
    assert_eq!(c.heartbeat().await.unwrap(), Standing::Active);
    let hb = c.start_heartbeat();
    c.progress(&Progress::new("denoise", Some(1), Some(2)))
        .await
        .unwrap();
    assert!(c.holds().await.unwrap());
    assert_eq!(
        c.complete(&result()).await.unwrap(),
        Outcome::Finished(JobState::Succeeded)
    );
    hb.stop();
    let c = w.claim(WAIT).await.unwrap().expect("second job");
    assert_eq!(
        c.fail(&Failure::retryable("OutOfMemory", "try again"))
            .await
            .unwrap(),
        Outcome::Requeued { attempt: 1 }
    );
    let c = w.claim(WAIT).await.unwrap().expect("third job");
    assert_eq!(
        c.hand_back("HandedBack", "draining").await.unwrap(),
        Outcome::Requeued { attempt: 0 }
    );
    let c = w.claim(WAIT).await.unwrap().expect("a job again");
    assert_eq!(
        admin.cancel(A, c.uid()).await.unwrap(),
        CancelOutcome::Requested
    );
    assert!(c.is_cancelled().await.unwrap());
    assert_eq!(
        c.cancelled("stopped").await.unwrap(),
        Outcome::Finished(JobState::Cancelled)
    );
    let rec = qa.get_job(A, "team-a-1").await.unwrap().unwrap();
    assert_eq!(rec.state, JobState::Succeeded);
    w.leave().await.unwrap();
    let mut w = qa.worker(A, "wa2").await.unwrap();
    while let Some(c) = w.claim(Duration::from_millis(300)).await.unwrap() {
        c.complete(&result()).await.unwrap();
    }
    let waiter = tokio::spawn(async move {
        let c = w.claim(Duration::from_secs(10)).await.unwrap();
        let uid = c.as_ref().map(|c| c.uid().to_string());
        if let Some(c) = c {
            c.complete(&result()).await.unwrap();
        }
        w.leave().await.unwrap();
        uid
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    admin
        .enqueue(&job_in(A, "team-a-late"), &spec(A, "high", 2))
        .await
        .unwrap();
    assert_eq!(waiter.await.unwrap().as_deref(), Some("team-a-late"));

    // Nothing of B: not its jobs, streams, events, registry or the pool list.
    noperm("B's job hash", qa.get_job(B, "team-b-1").await);
    noperm(
        "a worker session in B",
        qa.worker(B, "wa").await.map(|_| ()),
    );
    noperm(
        "enqueue into B",
        qa.enqueue(&job("x"), &spec(B, "normal", 1)).await,
    );
    noperm("cancel in B", qa.cancel(B, "team-b-1").await);
    noperm("forget in B", qa.forget(B, "team-b-1").await);
    noperm("B's depth", qa.depth(B).await);
    noperm("B's workers", qa.workers(B).await);
    noperm("B's dead letters", qa.dead_letters(B, 10).await);
    noperm("the pool list", qa.pools().await);
    noperm("an events reader", qa.events("op").await.map(|_| ()));
    // Nor its own enqueue: enqueue lists the pool, the operator's job.
    noperm(
        "enqueue into A",
        qa.enqueue(&job("y"), &spec(A, "normal", 1)).await,
    );
    let k = admin.keys().clone();
    let mut raw = redis::Client::open(qa_url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    for (what, cmd) in [
        ("XRANGE B's events", {
            let mut c = redis::cmd("XRANGE");
            c.arg(k.events(B)).arg("-").arg("+");
            c
        }),
        ("XREADGROUP B's jobs", {
            let mut c = redis::cmd("XREADGROUP");
            c.arg("GROUP")
                .arg("workers")
                .arg("wa")
                .arg("STREAMS")
                .arg(k.jobs(B))
                .arg(">");
            c
        }),
        ("HSET B's job (complete it)", {
            let mut c = redis::cmd("HSET");
            c.arg(k.job(B, "team-b-1")).arg("state").arg("succeeded");
            c
        }),
        ("XADD to B's events", {
            let mut c = redis::cmd("XADD");
            c.arg(k.events(B)).arg("*").arg("type").arg("succeeded");
            c
        }),
        ("a script that reaches B's job from A's keys", {
            let mut c = redis::cmd("EVAL");
            c.arg("return redis.call('HGETALL', ARGV[1])")
                .arg(1)
                .arg(k.jobs(A))
                .arg(k.job(B, "team-b-1"));
            c
        }),
        ("KEYS", {
            let mut c = redis::cmd("KEYS");
            c.arg("*");
            c
        }),
        ("FLUSHALL", redis::cmd("FLUSHALL")),
        ("ACL SETUSER", {
            let mut c = redis::cmd("ACL");
            c.arg("SETUSER").arg(k.pool_user(A)).arg("+@all").arg("~*");
            c
        }),
    ] {
        let r: redis::RedisResult<redis::Value> = cmd.query_async(&mut raw).await;
        match r {
            Err(e) if is_noperm(&e.to_string()) => {}
            other => panic!("{what}: expected NOPERM, got {other:?}"),
        }
    }

    // B's jobs are all still waiting, untouched.
    let depth = admin.depth(B).await.unwrap();
    assert_eq!((depth.waiting, depth.running), (4, 0));
    for uid in ["team-b-1", "team-b-2", "team-b-3", "team-b-4"] {
        let rec = admin.get_job(B, uid).await.unwrap().unwrap();
        assert_eq!(rec.state, JobState::Queued, "{uid}");
        assert_eq!(rec.attempt, 0, "{uid}");
    }
    // A's events are in A's stream, B's stream has none: the operator's reader sees A's only,
    // each with its pool.
    let mut reader = admin.events("operator-0").await.unwrap();
    let mut events = Vec::new();
    loop {
        let batch = reader.next(100, Duration::from_millis(50)).await.unwrap();
        if batch.is_empty() {
            break;
        }
        reader.ack(&batch).await.unwrap();
        events.extend(batch);
    }
    assert!(events.iter().all(|e| e.pool == A), "{events:?}");
    assert_eq!(count(&events, "team-a-1", EventKind::Succeeded), 1);
    assert_eq!(count(&events, "team-a-late", EventKind::Claimed), 1);
}

#[tokio::test]
async fn events_about_another_namespace_are_dropped() {
    let server = RedisServer::start().unwrap();
    let admin = Queue::connect(config(&server.url(), 1_000)).await.unwrap();
    admin.ensure_pool(A).await.unwrap();
    admin.ensure_pool(B).await.unwrap();
    // A's user writes a forged event about a job of team-b into A's own stream.
    let password = admin.generate_password().await.unwrap();
    let user = admin
        .apply_pool_user(A, &[Password::Plain(&password)])
        .await
        .unwrap();
    let client = redis::Client::open(user_url(&server, &user, &password)).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let k = admin.keys().clone();
    for (ns, uid) in [("team-b", "forged"), ("team-a", "real")] {
        let _: String = redis::cmd("XADD")
            .arg(k.events(A))
            .arg("*")
            .arg("type")
            .arg("claimed")
            .arg("uid")
            .arg(uid)
            .arg("namespace")
            .arg(ns)
            .arg("name")
            .arg(uid)
            .arg("pool")
            .arg(B)
            .arg("attempt")
            .arg("1")
            .arg("worker")
            .arg("w")
            .arg("ts")
            .arg("1700000000000")
            .arg("payload")
            .arg("")
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let mut reader = admin.events("operator-0").await.unwrap();
    let batch = reader.next(100, Duration::from_millis(100)).await.unwrap();
    assert_eq!(batch.len(), 1, "{batch:?}");
    assert_eq!(batch[0].uid, "real");
    // The pool is the stream's, not what the entry claims.
    assert_eq!(batch[0].pool, A);
    reader.ack(&batch).await.unwrap();
    assert!(
        reader
            .next(100, Duration::from_millis(100))
            .await
            .unwrap()
            .is_empty(),
        "the forged event was acknowledged and dropped"
    );
}

#[tokio::test]
async fn passwords_rotate_and_users_go_with_their_pool() {
    let server = RedisServer::start().unwrap();
    let admin = Queue::connect(config(&server.url(), 1_000)).await.unwrap();
    let old = admin.generate_password().await.unwrap();
    assert_eq!(old.len(), 64, "256 bits in hex");
    let user = admin
        .apply_pool_user(A, &[Password::Plain(&old)])
        .await
        .unwrap();
    let login = |pw: String| {
        let url = user_url(&server, &user, &pw);
        async move {
            let q = Queue::connect(config(&url, 1_000)).await?;
            q.ping().await.map(|()| q)
        }
    };
    let old_session = login(old.clone()).await.unwrap();

    // Rotation: a new password, the old one still accepted through its digest.
    let hashes = admin.pool_user_password_hashes(A).await.unwrap();
    assert_eq!(hashes.len(), 1);
    let new = admin.generate_password().await.unwrap();
    admin
        .apply_pool_user(A, &[Password::Plain(&new), Password::Sha256(&hashes[0])])
        .await
        .unwrap();
    login(old.clone()).await.unwrap();
    login(new.clone()).await.unwrap();
    assert_eq!(admin.pool_user_password_hashes(A).await.unwrap().len(), 2);
    // Rolled: only the new one. A connection logged in earlier keeps working.
    admin
        .apply_pool_user(A, &[Password::Plain(&new)])
        .await
        .unwrap();
    let err = login(old.clone()).await.unwrap_err();
    assert!(err.to_string().contains("authentication failed"), "{err}");
    let q = login(new.clone()).await.unwrap();
    old_session.ping().await.unwrap();

    // The pool is gone: so is its user, and Redis closes its connections.
    assert_eq!(admin.pools_with_users().await.unwrap(), vec![A.to_string()]);
    assert!(admin.delete_pool_user(A).await.unwrap());
    assert!(admin.pools_with_users().await.unwrap().is_empty());
    assert!(!admin.delete_pool_user(A).await.unwrap());
    assert!(admin.pool_user_password_hashes(A).await.unwrap().is_empty());
    let err = login(new.clone()).await.unwrap_err();
    assert!(err.to_string().contains("authentication failed"), "{err}");
    let mut closed = None;
    for _ in 0..50 {
        if let Err(e) = q.ping().await {
            closed = Some(e);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let err = closed.expect("a deleted user's connection was closed");
    // Transient: a worker keeps retrying (its final report too) until the user is back, as
    // after a restart of Redis without an ACL file, when the operator sets the user up again.
    assert!(err.is_transient(), "{err:?}");
    // Until the connection's own reconnect attempts have all been refused at login (the user
    // stays away longer than they last, as while the operator waits for Redis to come back):
    // the handle must still log in again afterwards, not keep that refusal for good. The
    // attempts last at most their count times the heartbeat interval; 30 s covers them.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match q.ping().await {
            Err(e) if e.to_string().contains("authentication failed") => {
                assert!(e.is_transient(), "{e:?}");
                break;
            }
            Err(e) => assert!(e.is_transient(), "{e:?}"),
            Ok(()) => panic!("a deleted user logged in"),
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no login refusal within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    admin
        .apply_pool_user(A, &[Password::Plain(&new)])
        .await
        .unwrap();
    let mut back = false;
    for _ in 0..100 {
        match q.ping().await {
            Ok(()) => {
                back = true;
                break;
            }
            Err(e) => assert!(e.is_transient(), "{e:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(back, "the same handle works again once the user is back");
}

//! Reconcile tests: each drives `job::reconcile` / `pool::reconcile` against the mock API
//! server (asserting every request's verb, path and body) and a real `redis-server`, where a
//! test plays the worker through the queue's worker API.

use std::sync::Arc;
use std::time::Duration;

use http::{Method, StatusCode};
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::controller::Action;
use pawfect_api::conditions::reasons;
use pawfect_api::{InpaintJob, InpaintPool, JOB_FINALIZER, StageTimings, StageWork, WorkCounts};
use pawfect_queue::{Failure, JobResult, JobState, Progress};
use serde_json::{Value, json};

use crate::fixtures::*;
use crate::{Result, job, pool, queue_pool};

async fn run_job(env: &TestEnv, j: &InpaintJob) -> tokio::task::JoinHandle<Result<Action>> {
    let (j, ctx) = (Arc::new(j.clone()), env.ctx.clone());
    tokio::spawn(async move { job::reconcile(j, ctx).await })
}

async fn done(h: tokio::task::JoinHandle<Result<Action>>) -> Action {
    tokio::time::timeout(Duration::from_secs(10), h)
        .await
        .expect("reconcile finished")
        .expect("reconcile did not panic")
        .expect("reconcile succeeded")
}

fn cond<'a>(status: &'a Value, type_: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == type_))
        .unwrap_or(&Value::Null)
}

fn qpool() -> String {
    queue_pool(NS, POOL)
}

/// Worker `t4-worker-a` of the pool claims the queued job (the session is kept alive with it).
async fn claim_as_worker_a(env: &TestEnv) -> (pawfect_queue::WorkerSession, pawfect_queue::Claim) {
    let mut session = env.queue.worker(&qpool(), "t4-worker-a").await.unwrap();
    let claim = session
        .claim(Duration::from_millis(100))
        .await
        .unwrap()
        .expect("claimed");
    (session, claim)
}

/// Applies a status patch: asserts the SSA envelope and returns the job with that status.
async fn expect_status(env: &mut TestEnv, j: &InpaintJob) -> (Value, InpaintJob) {
    let uri = status_uri::<InpaintJob>(NS, JOB);
    let mut updated = None;
    let body = env
        .api
        .expect_with(Method::PATCH, &uri, |b| {
            let u = with_status(j, b);
            updated = Some(u.clone());
            (StatusCode::OK, serde_json::to_value(&u).unwrap())
        })
        .await;
    assert_eq!(body["apiVersion"], "inpaint.pawfect.dev/v1alpha1");
    assert_eq!(body["kind"], "InpaintJob");
    (body["status"].clone(), updated.unwrap())
}

async fn expect_event(env: &mut TestEnv, reason: &str, type_: &str) -> Value {
    let ev = env.api.expect_event(NS).await;
    assert_eq!(ev["reason"], reason, "{ev}");
    assert_eq!(ev["type"], type_, "{ev}");
    assert_eq!(ev["regarding"]["kind"], "InpaintJob");
    assert_eq!(ev["regarding"]["name"], JOB);
    assert_eq!(ev["reportingController"], "pawfect-operator");
    ev
}

/// A pool object as the API server returns it.
fn pool_json() -> Value {
    serde_json::to_value(pool(
        NS,
        POOL,
        json!({"maxReplicas": 2, "worker": {"image": "w:1"}}),
    ))
    .unwrap()
}

/// Reconciles a new finalized job through GET pool → enqueue → Queued status → event.
async fn enqueue(env: &mut TestEnv, j: &InpaintJob) -> InpaintJob {
    let h = run_job(env, j).await;
    env.api
        .expect(
            Method::GET,
            &format!("/apis/inpaint.pawfect.dev/v1alpha1/namespaces/{NS}/inpaintpools/{POOL}"),
            StatusCode::OK,
            pool_json(),
        )
        .await;
    let (status, updated) = expect_status(env, j).await;
    assert_eq!(status["phase"], "Queued");
    assert_eq!(cond(&status, "Queued")["status"], "True");
    assert_eq!(cond(&status, "Queued")["reason"], reasons::ENQUEUED);
    assert_eq!(status["observedGeneration"], 1);
    assert!(status["queuedAt"].is_string());
    expect_event(env, reasons::ENQUEUED, "Normal").await;
    // Resynced after 5 minutes (or woken by its claim event); the 600 s deadline is later.
    let action = done(h).await;
    assert_eq!(action, Action::requeue(Duration::from_millis(300_050)));
    updated
}

#[tokio::test]
async fn new_job_gets_the_finalizer_first() {
    let mut env = TestEnv::new().await;
    let j = job(0, json!({}));
    let h = run_job(&env, &j).await;
    let body = env
        .api
        .expect(
            Method::PATCH,
            &format!("{}?", job_path(JOB)),
            StatusCode::OK,
            serde_json::to_value(finalized(j.clone())).unwrap(),
        )
        .await;
    assert_eq!(
        body,
        json!([
            {"op": "test", "path": "/metadata/finalizers", "value": null},
            {"op": "add", "path": "/metadata/finalizers", "value": [JOB_FINALIZER]}
        ])
    );
    assert_eq!(done(h).await, Action::await_change());
    // Nothing was queued before the finalizer was in place.
    assert_eq!(env.queue.get_job(&qpool(), JOB_UID).await.unwrap(), None);
}

#[tokio::test]
async fn new_job_is_enqueued_exactly_once() {
    let mut env = TestEnv::new().await;
    let j = finalized(job(0, json!({"priority": "high"})));
    let queued = enqueue(&mut env, &j).await;

    let rec = env
        .queue
        .get_job(&qpool(), JOB_UID)
        .await
        .unwrap()
        .expect("in the queue");
    assert_eq!(rec.state, JobState::Queued);
    assert_eq!((rec.namespace.as_str(), rec.name.as_str()), (NS, JOB));
    assert_eq!(rec.pool, qpool());
    let d = env.queue.depth(&qpool()).await.unwrap();
    assert_eq!((d.waiting, d.running), (1, 0));

    // Reconciling again (a retry, a resync, a second event) queues nothing and writes nothing.
    for _ in 0..2 {
        let h = run_job(&env, &queued).await;
        env.api.expect_silence().await;
        done(h).await;
    }
    // Even a reconcile that did not see its own status write (stale cache) finds the job
    // in the queue and only writes the status.
    let h = run_job(&env, &j).await;
    let (status, _) = expect_status(&mut env, &j).await;
    assert_eq!(status["phase"], "Queued");
    expect_event(&mut env, reasons::ENQUEUED, "Normal").await;
    done(h).await;
    let d = env.queue.depth(&qpool()).await.unwrap();
    assert_eq!((d.waiting, d.running), (1, 0), "queued twice");
}

#[tokio::test]
async fn job_waits_for_a_missing_pool() {
    let mut env = TestEnv::new().await;
    let j = finalized(job(0, json!({})));
    let h = run_job(&env, &j).await;
    env.api
        .expect(
            Method::GET,
            &format!("/apis/inpaint.pawfect.dev/v1alpha1/namespaces/{NS}/inpaintpools/{POOL}"),
            StatusCode::NOT_FOUND,
            not_found("inpaintpools", POOL),
        )
        .await;
    let (status, _) = expect_status(&mut env, &j).await;
    assert_eq!(status["phase"], "Pending");
    let c = cond(&status, "Queued");
    assert_eq!(c["status"], "False");
    assert_eq!(c["reason"], reasons::POOL_NOT_FOUND);
    assert!(c["message"].as_str().unwrap().contains("\"t4\""), "{c}");
    expect_event(&mut env, reasons::POOL_NOT_FOUND, "Warning").await;
    assert_eq!(done(h).await, Action::requeue(Duration::from_secs(30)));
    assert_eq!(env.queue.get_job(&qpool(), JOB_UID).await.unwrap(), None);
}

#[tokio::test]
async fn queue_events_drive_the_status_to_complete() {
    let mut env = TestEnv::new().await;
    let j = finalized(job(0, json!({})));
    let j = enqueue(&mut env, &j).await;

    // A worker claims the job.
    let (_session, claim) = claim_as_worker_a(&env).await;
    let h = run_job(&env, &j).await;
    let (status, j) = expect_status(&mut env, &j).await;
    assert_eq!(status["phase"], "Running");
    assert_eq!(status["worker"], "t4-worker-a");
    assert_eq!(status["attempts"], 1);
    assert!(status["startedAt"].is_string());
    assert_eq!(cond(&status, "Queued")["status"], "False");
    assert_eq!(cond(&status, "Running")["status"], "True");
    expect_event(&mut env, reasons::CLAIMED, "Normal").await;
    // Running jobs are resynced every minute.
    assert_eq!(
        done(h).await,
        Action::requeue(Duration::from_millis(60_050))
    );

    // Progress: status only, no event.
    claim
        .progress(&Progress::new("denoise", Some(5), Some(20)))
        .await
        .unwrap();
    let h = run_job(&env, &j).await;
    let (status, j) = expect_status(&mut env, &j).await;
    assert_eq!(
        status["progress"],
        json!({"stage": "denoise", "step": 5, "totalSteps": 20, "summary": "denoise 5/20"})
    );
    done(h).await;

    claim
        .complete(&JobResult {
            output: "file:///data/rex-out.png".into(),
            caption: Some("a dog on green grass".into()),
            prompt: Some("green grass, seamless continuation, no objects".into()),
            prompt_source: Some("caption".into()),
            timings: StageTimings {
                fetch: Some(12),
                denoise: Some(900),
                total: Some(1000),
                ..Default::default()
            },
            work: Some(
                StageWork {
                    encode: Some(WorkCounts {
                        f16_gemm_flop: 3,
                        memory_bound_bytes: 5,
                        ..Default::default()
                    }),
                    denoise: Some(WorkCounts {
                        f16_gemm_flop: 1 << 52,
                        attention_flop: 1 << 40,
                        memory_bound_bytes: 11,
                        ..Default::default()
                    }),
                    ..Default::default()
                }
                .with_total(),
            ),
        })
        .await
        .unwrap();
    let h = run_job(&env, &j).await;
    let (status, j) = expect_status(&mut env, &j).await;
    assert_eq!(status["phase"], "Succeeded");
    assert_eq!(status["output"], "file:///data/rex-out.png");
    assert_eq!(status["caption"], "a dog on green grass");
    assert_eq!(status["promptSource"], "caption");
    assert_eq!(
        status["prompt"],
        "green grass, seamless continuation, no objects"
    );
    assert_eq!(
        status["timings"],
        json!({"fetch": 12, "denoise": 900, "total": 1000})
    );
    // The worker's counts, per stage and summed, copied from the queue unrounded.
    let counts = |f16: u64, att: u64, mem: u64| json!({"f16GemmFlop": f16, "int8GemmOp": 0, "attentionFlop": att, "memoryBoundBytes": mem});
    assert_eq!(
        status["work"],
        json!({
            "encode": counts(3, 0, 5),
            "denoise": counts(1 << 52, 1 << 40, 11),
            "total": counts((1 << 52) + 3, 1 << 40, 16),
        })
    );
    assert!(status["completedAt"].is_string());
    assert!(status["duration"].is_string());
    assert_eq!(cond(&status, "Complete")["status"], "True");
    assert_eq!(cond(&status, "Running")["status"], "False");
    assert_eq!(cond(&status, "Failed"), &Value::Null);
    expect_event(&mut env, reasons::SUCCEEDED, "Normal").await;
    // Finished without a TTL: nothing more to do until the object changes.
    assert_eq!(done(h).await, Action::await_change());

    // The next reconcile (the status watch event) keeps the job as it is.
    let h = run_job(&env, &j).await;
    env.api.expect_silence().await;
    assert_eq!(done(h).await, Action::await_change());
}

#[tokio::test]
async fn the_reconcile_that_finishes_a_job_sets_its_ttl_timer() {
    // Status-only watch events do not trigger reconciles (`job::trigger`), so the write of the
    // terminal status itself must schedule the deletion.
    let mut env = TestEnv::new().await;
    let j = finalized(job(0, json!({"ttlSecondsAfterFinished": 60})));
    let j = enqueue(&mut env, &j).await;
    let (_session, claim) = claim_as_worker_a(&env).await;
    let h = run_job(&env, &j).await;
    let (_, j) = expect_status(&mut env, &j).await;
    expect_event(&mut env, reasons::CLAIMED, "Normal").await;
    done(h).await;
    claim
        .complete(&JobResult {
            output: "file:///data/rex-out.png".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let h = run_job(&env, &j).await;
    let (status, _) = expect_status(&mut env, &j).await;
    assert_eq!(status["phase"], "Succeeded");
    expect_event(&mut env, reasons::SUCCEEDED, "Normal").await;
    // `Action` keeps its delay private; its Debug form shows it (`requeue_after: Some(59.9…s)`).
    let action = format!("{:?}", done(h).await);
    let after: f64 = action
        .split("Some(")
        .nth(1)
        .and_then(|r| r.split("s)").next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("a finished job with a TTL is requeued for it: {action}"));
    // 60 s from completedAt (written this reconcile) + the 50 ms margin; the test's own
    // run time comes off it.
    assert!(after <= 60.05 && after > 55.0, "{action}");
}

#[tokio::test]
async fn worker_failure_fails_the_job() {
    let mut env = TestEnv::new().await;
    let j = finalized(job(0, json!({})));
    let j = enqueue(&mut env, &j).await;
    let mut session = env.queue.worker(&qpool(), "t4-worker-b").await.unwrap();
    let claim = session
        .claim(Duration::from_millis(100))
        .await
        .unwrap()
        .expect("claimed");
    claim
        .fail(&Failure::permanent(reasons::INVALID_INPUT, "mask is empty"))
        .await
        .unwrap();
    // Claim and failure both happened before the operator looked: straight to Failed.
    let h = run_job(&env, &j).await;
    let (status, _) = expect_status(&mut env, &j).await;
    assert_eq!(status["phase"], "Failed");
    assert_eq!(status["reason"], reasons::INVALID_INPUT);
    assert_eq!(status["message"], "mask is empty");
    assert_eq!(status["worker"], "t4-worker-b");
    let c = cond(&status, "Failed");
    assert_eq!(
        (c["status"].as_str(), c["reason"].as_str()),
        (Some("True"), Some(reasons::INVALID_INPUT))
    );
    assert_eq!(cond(&status, "Complete"), &Value::Null);
    let ev = expect_event(&mut env, reasons::INVALID_INPUT, "Warning").await;
    assert_eq!(ev["note"], "mask is empty");
    done(h).await;
}

#[tokio::test]
async fn deleting_a_waiting_job_cancels_it_and_removes_the_finalizer() {
    let mut env = TestEnv::new().await;
    let j = finalized(job(0, json!({})));
    let j = enqueue(&mut env, &j).await;
    let h = run_job(&env, &deleting(j.clone())).await;
    let ev = expect_event(&mut env, reasons::CANCELLED, "Normal").await;
    assert!(ev["note"].as_str().unwrap().contains("waiting"), "{ev}");
    let body = env
        .api
        .expect(
            Method::PATCH,
            &format!("{}?", job_path(JOB)),
            StatusCode::OK,
            serde_json::to_value(&j).unwrap(),
        )
        .await;
    assert_eq!(
        body,
        json!([
            {"op": "test", "path": "/metadata/finalizers/0", "value": JOB_FINALIZER},
            {"op": "remove", "path": "/metadata/finalizers/0"}
        ])
    );
    assert_eq!(done(h).await, Action::await_change());
    let rec = env.queue.get_job(&qpool(), JOB_UID).await.unwrap().unwrap();
    assert_eq!(rec.state, JobState::Cancelled);
    let d = env.queue.depth(&qpool()).await.unwrap();
    assert_eq!((d.waiting, d.running), (0, 0));
}

#[tokio::test]
async fn deleting_a_running_job_asks_its_worker_to_stop() {
    let mut env = TestEnv::new().await;
    let j = finalized(job(0, json!({})));
    let j = enqueue(&mut env, &j).await;
    let (_session, claim) = claim_as_worker_a(&env).await;
    let h = run_job(&env, &deleting(j.clone())).await;
    let ev = expect_event(&mut env, reasons::CANCELLED, "Normal").await;
    assert!(ev["note"].as_str().unwrap().contains("running"), "{ev}");
    env.api
        .expect(
            Method::PATCH,
            &format!("{}?", job_path(JOB)),
            StatusCode::OK,
            serde_json::to_value(&j).unwrap(),
        )
        .await;
    done(h).await;
    assert!(
        claim.is_cancelled().await.unwrap(),
        "the worker sees the cancel request"
    );
}

#[tokio::test]
async fn timeout_cancels_and_fails_with_deadline_exceeded() {
    let mut env = TestEnv::new().await;
    // Created 10 minutes and 5 seconds ago with a 600 s timeout; queued and claimed.
    let j = finalized(job(605, json!({})));
    let j = enqueue_without_reconcile_checks(&mut env, &j).await;
    let (_session, claim) = claim_as_worker_a(&env).await;
    let h = run_job(&env, &j).await;
    let (status, _) = expect_status(&mut env, &j).await;
    assert_eq!(status["phase"], "Failed");
    assert_eq!(status["reason"], reasons::DEADLINE_EXCEEDED);
    let c = cond(&status, "Failed");
    assert_eq!(
        (c["status"].as_str(), c["reason"].as_str()),
        (Some("True"), Some(reasons::DEADLINE_EXCEEDED))
    );
    assert_eq!(cond(&status, "Queued")["status"], "False");
    assert!(status["completedAt"].is_string());
    expect_event(&mut env, reasons::DEADLINE_EXCEEDED, "Warning").await;
    assert_eq!(done(h).await, Action::await_change());
    assert!(claim.is_cancelled().await.unwrap());
}

/// Puts the job into the queue directly and returns it with a Queued status (for tests that
/// start later in the lifecycle).
async fn enqueue_without_reconcile_checks(env: &mut TestEnv, j: &InpaintJob) -> InpaintJob {
    let mut spec = j.spec.clone();
    spec.pool = qpool();
    env.queue
        .enqueue(&pawfect_queue::JobRef::new(JOB_UID, NS, JOB), &spec)
        .await
        .unwrap();
    let mut j = j.clone();
    j.status = Some(crate::status::enqueued(&j, None, Timestamp::now()));
    j
}

#[tokio::test]
async fn finished_job_is_deleted_after_its_ttl() {
    let mut env = TestEnv::new().await;
    let mut j = finalized(job(300, json!({"ttlSecondsAfterFinished": 60})));
    let mut s = crate::status::enqueued(&j, None, Timestamp::now());
    s.phase = Some(pawfect_api::JobPhase::Succeeded);

    // Finished 30 s ago: wait the other 30 s, no API call.
    s.completed_at = Some(Time(Timestamp::now() - jiff::SignedDuration::from_secs(30)));
    j.status = Some(s.clone());
    let h = run_job(&env, &j).await;
    env.api.expect_silence().await;
    let a = done(h).await;
    assert_ne!(a, Action::await_change(), "requeued for the TTL");

    // Finished 61 s ago: deleted.
    s.completed_at = Some(Time(Timestamp::now() - jiff::SignedDuration::from_secs(61)));
    j.status = Some(s);
    let h = run_job(&env, &j).await;
    let body = env
        .api
        .expect(
            Method::DELETE,
            &format!("{}?", job_path(JOB)),
            StatusCode::OK,
            serde_json::to_value(deleting(j.clone())).unwrap(),
        )
        .await;
    assert_eq!(body["propagationPolicy"], "Background");
    assert_eq!(done(h).await, Action::await_change());
}

// ---------------------------------------------------------------- pools

const POOL_NS: &str = "media";

fn deployment_uri(ssa: bool) -> String {
    let base = format!("/apis/apps/v1/namespaces/{POOL_NS}/deployments/t4-worker");
    if ssa {
        format!("{base}?&force=true&fieldManager=pawfect-operator")
    } else {
        base
    }
}

fn deployment(replicas: i32, ready: i32) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "t4-worker", "namespace": POOL_NS, "resourceVersion": "5"},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app.kubernetes.io/name": "pawfect-worker", "inpaint.pawfect.dev/pool": "t4"}},
            "template": {"spec": {"containers": [{"name": "worker", "image": "w:1"}]}}
        },
        "status": {"replicas": replicas, "readyReplicas": ready}
    })
}

/// A running worker pod, Ready.
fn pod(name: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": POOL_NS},
        "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}
    })
}

/// The pool as the API server returns it after a status apply.
fn pool_reply(p: &InpaintPool, patch: &Value) -> (StatusCode, Value) {
    let mut p = p.clone();
    p.status = Some(serde_json::from_value(patch["status"].clone()).unwrap());
    (StatusCode::OK, serde_json::to_value(p).unwrap())
}

async fn run_pool(env: &TestEnv, p: &InpaintPool) -> tokio::task::JoinHandle<Result<Action>> {
    let (p, ctx) = (Arc::new(p.clone()), env.ctx.clone());
    tokio::spawn(async move { pool::reconcile(p, ctx).await })
}

async fn put_jobs(env: &TestEnv, n: usize) {
    for i in 0..n {
        let spec = serde_json::from_value(json!({
            "image": "file:///i.png", "mask": "file:///m.png", "output": "file:///o.png",
            "pool": queue_pool(POOL_NS, POOL)
        }))
        .unwrap();
        env.queue
            .enqueue(
                &pawfect_queue::JobRef::new(format!("uid-{i}"), POOL_NS, format!("job-{i}")),
                &spec,
            )
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn new_pool_gets_its_deployment_at_min_replicas() {
    let mut env = TestEnv::new().await;
    let p = pool(
        POOL_NS,
        POOL,
        json!({"minReplicas": 1, "maxReplicas": 3, "pollIntervalSeconds": 7, "worker": {"image": "ghcr.io/pawfect/worker:0.1"}}),
    );
    let h = run_pool(&env, &p).await;
    env.api
        .expect(
            Method::GET,
            &deployment_uri(false),
            StatusCode::NOT_FOUND,
            not_found("deployments", "t4-worker"),
        )
        .await;
    let applied = env
        .api
        .expect_with(Method::PATCH, &deployment_uri(true), |b| {
            (StatusCode::OK, b.clone())
        })
        .await;
    assert_eq!(applied["apiVersion"], "apps/v1");
    assert_eq!(applied["kind"], "Deployment");
    assert_eq!(applied["spec"]["replicas"], 1);
    assert_eq!(
        applied["metadata"]["ownerReferences"][0]["kind"],
        "InpaintPool"
    );
    assert_eq!(
        applied["metadata"]["ownerReferences"][0]["uid"],
        "uid-pool-t4"
    );
    let c = &applied["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["image"], "ghcr.io/pawfect/worker:0.1");
    assert_eq!(
        c["args"][4], "media/t4",
        "workers consume the pool's namespaced queue"
    );
    assert_eq!(c["resources"]["limits"]["nvidia.com/gpu"], "1");

    let uri = status_uri::<InpaintPool>(POOL_NS, POOL);
    let st = env
        .api
        .expect_with(Method::PATCH, &uri, |b| pool_reply(&p, b))
        .await;
    assert_eq!(st["kind"], "InpaintPool");
    let s = &st["status"];
    assert_eq!(s["desiredReplicas"], 1);
    assert_eq!(s["readyReplicas"], 0);
    assert_eq!(s["queue"], json!({"waiting": 0, "running": 0}));
    assert!(s["lastScaleTime"].is_string());
    assert_eq!(cond(s, "Ready")["reason"], reasons::DEPLOYMENT_APPLIED);
    assert_eq!(cond(s, "Scaling")["reason"], reasons::WAITING_FOR_CAPACITY);
    assert_eq!(done(h).await, Action::requeue(Duration::from_secs(7)));
}

fn secret_uri(ssa: bool) -> String {
    let base = format!("/api/v1/namespaces/{POOL_NS}/secrets/t4-redis-user");
    if ssa {
        format!("{base}?&force=true&fieldManager=pawfect-operator")
    } else {
        base
    }
}

/// Logs in to the test Redis as `user`.
async fn login(env: &TestEnv, user: &str, password: &str) -> pawfect_queue::Result<()> {
    let pct = |s: &str| -> String {
        s.bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect()
    };
    let url = format!(
        "redis://{}:{}@127.0.0.1:{}/",
        pct(user),
        pct(password),
        env.redis.port()
    );
    let q = pawfect_queue::Queue::connect(pawfect_queue::QueueConfig::new(url)).await?;
    q.ping().await
}

/// One pool reconcile of a pool without a Deployment, with `--pool-redis-users`: the Secret
/// answers `secret` to the GET; returns the Secret applied (if any) and the Deployment applied.
async fn reconcile_with_users(
    env: &mut TestEnv,
    p: &InpaintPool,
    secret: Option<Value>,
) -> (Option<Value>, Value) {
    let h = run_pool(env, p).await;
    env.api
        .expect(
            Method::GET,
            &deployment_uri(false),
            StatusCode::NOT_FOUND,
            not_found("deployments", "t4-worker"),
        )
        .await;
    let applied_secret = match secret {
        Some(s) => {
            env.api
                .expect(Method::GET, &secret_uri(false), StatusCode::OK, s)
                .await;
            None
        }
        None => {
            env.api
                .expect(
                    Method::GET,
                    &secret_uri(false),
                    StatusCode::NOT_FOUND,
                    not_found("secrets", "t4-redis-user"),
                )
                .await;
            Some(
                env.api
                    .expect_with(Method::PATCH, &secret_uri(true), |b| {
                        let mut b = b.clone();
                        b["metadata"]["uid"] = json!("secret-uid-1");
                        (StatusCode::OK, b)
                    })
                    .await,
            )
        }
    };
    let deploy = env
        .api
        .expect_with(Method::PATCH, &deployment_uri(true), |b| {
            (StatusCode::OK, b.clone())
        })
        .await;
    let uri = status_uri::<InpaintPool>(POOL_NS, POOL);
    env.api
        .expect_with(Method::PATCH, &uri, |b| pool_reply(p, b))
        .await;
    done(h).await;
    (applied_secret, deploy)
}

#[tokio::test]
async fn a_pool_gets_its_own_redis_user_and_secret() {
    let mut env = TestEnv::with_pool_users(true).await;
    let p = pool(POOL_NS, POOL, json!({"worker": {"image": "w:1"}}));
    let (secret, deploy) = reconcile_with_users(&mut env, &p, None).await;
    let secret = secret.expect("a new Secret");
    assert_eq!(secret["kind"], "Secret");
    assert_eq!(
        secret["metadata"]["ownerReferences"][0]["kind"],
        "InpaintPool"
    );
    assert_eq!(
        secret["metadata"]["ownerReferences"][0]["uid"],
        "uid-pool-t4"
    );
    let typed: k8s_openapi::api::core::v1::Secret = serde_json::from_value(secret.clone()).unwrap();
    let data = typed.data.clone().unwrap();
    let user = String::from_utf8(data["username"].0.clone()).unwrap();
    let password = String::from_utf8(data["password"].0.clone()).unwrap();
    assert_eq!(user, "pawfect:media/t4");
    assert_eq!(password.len(), 64, "ACL GENPASS: 256 bits in hex");

    // The workers log in as that user, with the password from that Secret.
    let t = &deploy["spec"]["template"];
    assert_eq!(
        t["metadata"]["annotations"]["inpaint.pawfect.dev/redis-credentials"],
        "secret-uid-1"
    );
    let env_vars = t["spec"]["containers"][0]["env"].as_array().unwrap();
    let var = |n: &str| env_vars.iter().find(|e| e["name"] == n).cloned();
    assert_eq!(var("PAWFECT_REDIS_USERNAME").unwrap()["value"], user);
    assert_eq!(
        var("PAWFECT_REDIS_PASSWORD").unwrap()["valueFrom"]["secretKeyRef"],
        json!({"name": "t4-redis-user", "key": "password", "optional": false})
    );
    // The user exists, reaches this pool's keys only, and the pool is listed.
    login(&env, &user, &password).await.unwrap();
    assert_eq!(
        env.queue.pools_with_users().await.unwrap(),
        vec![qpool_media()]
    );
    assert!(env.queue.pools().await.unwrap().contains(&qpool_media()));

    // Redis restarted without an ACL file and forgot the user: the next reconcile (the Secret
    // is there) makes it again with the same password, and writes no Secret.
    env.queue.delete_pool_user(&qpool_media()).await.unwrap();
    assert!(login(&env, &user, &password).await.is_err());
    let mut existing = secret.clone();
    existing["metadata"]["uid"] = json!("secret-uid-1");
    let (again, _) = reconcile_with_users(&mut env, &p, Some(existing)).await;
    assert!(again.is_none(), "the Secret is kept");
    login(&env, &user, &password).await.unwrap();

    // Rotation: the Secret deleted. A new password; the old one stays valid (its digest is
    // noted on the new Secret) until the Deployment has rolled.
    let (rotated, _) = reconcile_with_users(&mut env, &p, None).await;
    let rotated = rotated.expect("a new Secret");
    let typed: k8s_openapi::api::core::v1::Secret =
        serde_json::from_value(rotated.clone()).unwrap();
    let new_password = String::from_utf8(typed.data.unwrap()["password"].0.clone()).unwrap();
    assert_ne!(new_password, password);
    assert!(
        rotated["metadata"]["annotations"][crate::pool_user::PREVIOUS_ANNOTATION]
            .as_str()
            .is_some_and(|h| h.len() == 64),
        "{rotated}"
    );
    login(&env, &user, &new_password).await.unwrap();
    login(&env, &user, &password).await.unwrap();
    // No Deployment runs old pods any more (none at all here): the old digest goes.
    let mut current = rotated.clone();
    current["metadata"]["uid"] = json!("secret-uid-2");
    let h = run_pool(&env, &p).await;
    env.api
        .expect(
            Method::GET,
            &deployment_uri(false),
            StatusCode::NOT_FOUND,
            not_found("deployments", "t4-worker"),
        )
        .await;
    env.api
        .expect(Method::GET, &secret_uri(false), StatusCode::OK, current)
        .await;
    let trimmed = env
        .api
        .expect_with(Method::PATCH, &secret_uri(true), |b| {
            let mut b = b.clone();
            b["metadata"]["uid"] = json!("secret-uid-2");
            (StatusCode::OK, b)
        })
        .await;
    assert!(
        trimmed["metadata"]["annotations"]
            .get(crate::pool_user::PREVIOUS_ANNOTATION)
            .is_none(),
        "{trimmed}"
    );
    env.api
        .expect_with(Method::PATCH, &deployment_uri(true), |b| {
            (StatusCode::OK, b.clone())
        })
        .await;
    let uri = status_uri::<InpaintPool>(POOL_NS, POOL);
    env.api
        .expect_with(Method::PATCH, &uri, |b| pool_reply(&p, b))
        .await;
    done(h).await;
    assert!(
        login(&env, &user, &password).await.is_err(),
        "old password gone"
    );
    login(&env, &user, &new_password).await.unwrap();
}

#[tokio::test]
async fn users_of_deleted_pools_are_swept() {
    use pawfect_queue::acl::Password;
    let mut env = TestEnv::with_pool_users(true).await;
    for p in ["media/t4", "media/gone", "other/x"] {
        env.queue
            .apply_pool_user(p, &[Password::Plain("pw-1234")])
            .await
            .unwrap();
    }
    let ctx = env.ctx.clone();
    let h = tokio::spawn(async move { crate::pool_user::sweep(&ctx, Some(POOL_NS)).await });
    let t4 =
        serde_json::to_value(pool(POOL_NS, POOL, json!({"worker": {"image": "w:1"}}))).unwrap();
    env.api
        .expect(
            Method::GET,
            &format!("/apis/inpaint.pawfect.dev/v1alpha1/namespaces/{POOL_NS}/inpaintpools?"),
            StatusCode::OK,
            json!({"apiVersion": "inpaint.pawfect.dev/v1alpha1", "kind": "InpaintPoolList",
                "metadata": {}, "items": [t4]}),
        )
        .await;
    let gone = tokio::time::timeout(Duration::from_secs(10), h)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(gone, vec!["media/gone".to_string()]);
    // The existing pool keeps its user; another namespace is not this operator's to sweep.
    assert_eq!(
        env.queue.pools_with_users().await.unwrap(),
        vec!["media/t4".to_string(), "other/x".to_string()]
    );
}

fn qpool_media() -> String {
    queue_pool(POOL_NS, POOL)
}

#[tokio::test]
async fn burst_scales_up_and_marks_busy_and_idle_pods() {
    let mut env = TestEnv::new().await;
    put_jobs(&env, 4).await;
    // Worker a is busy with one job; 3 wait.
    let mut session = env
        .queue
        .worker(&queue_pool(POOL_NS, POOL), "t4-worker-a")
        .await
        .unwrap();
    let _claim = session
        .claim(Duration::from_millis(100))
        .await
        .unwrap()
        .expect("claimed");
    let p = pool(
        POOL_NS,
        POOL,
        json!({"maxReplicas": 3, "worker": {"image": "w:1"}}),
    );
    let h = run_pool(&env, &p).await;
    env.api
        .expect(
            Method::GET,
            &deployment_uri(false),
            StatusCode::OK,
            deployment(2, 2),
        )
        .await;
    env.api
        .expect(
            Method::GET,
            &format!("/api/v1/namespaces/{POOL_NS}/pods?&labelSelector=app.kubernetes.io%2Fname%3Dpawfect-worker%2Cinpaint.pawfect.dev%2Fpool%3Dt4"),
            StatusCode::OK,
            json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": [pod("t4-worker-a"), pod("t4-worker-b")]}),
        )
        .await;
    let busy = env
        .api
        .expect(
            Method::PATCH,
            &format!("/api/v1/namespaces/{POOL_NS}/pods/t4-worker-a?"),
            StatusCode::OK,
            pod("t4-worker-a"),
        )
        .await;
    assert_eq!(
        busy,
        json!({"metadata": {"annotations": {
            "controller.kubernetes.io/pod-deletion-cost": "1000",
            "cluster-autoscaler.kubernetes.io/safe-to-evict": "false",
            "karpenter.sh/do-not-disrupt": "true"
        }}})
    );
    let idle = env
        .api
        .expect(
            Method::PATCH,
            &format!("/api/v1/namespaces/{POOL_NS}/pods/t4-worker-b?"),
            StatusCode::OK,
            pod("t4-worker-b"),
        )
        .await;
    assert_eq!(
        idle["metadata"]["annotations"]["controller.kubernetes.io/pod-deletion-cost"],
        "0"
    );
    assert_eq!(
        idle["metadata"]["annotations"]["cluster-autoscaler.kubernetes.io/safe-to-evict"],
        "true"
    );
    let applied = env
        .api
        .expect_with(Method::PATCH, &deployment_uri(true), |b| {
            (StatusCode::OK, b.clone())
        })
        .await;
    // 3 waiting + 1 running = 4, capped at maxReplicas 3.
    assert_eq!(applied["spec"]["replicas"], 3);
    let st = env
        .api
        .expect_with(
            Method::PATCH,
            &status_uri::<InpaintPool>(POOL_NS, POOL),
            |b| pool_reply(&p, b),
        )
        .await;
    let s = &st["status"];
    assert_eq!(s["queue"], json!({"waiting": 3, "running": 1}));
    assert_eq!(
        (
            s["desiredReplicas"].as_u64(),
            s["replicas"].as_u64(),
            s["busyWorkers"].as_u64()
        ),
        (Some(3), Some(2), Some(1))
    );
    assert_eq!(cond(s, "Scaling")["status"], "True");
    done(h).await;
}

#[tokio::test]
async fn drain_keeps_busy_workers_and_marks_them_before_scaling_down() {
    let mut env = TestEnv::new().await;
    put_jobs(&env, 1).await;
    let mut session = env
        .queue
        .worker(&queue_pool(POOL_NS, POOL), "t4-worker-b")
        .await
        .unwrap();
    let _claim = session
        .claim(Duration::from_millis(100))
        .await
        .unwrap()
        .expect("claimed");
    // No delay: demand (1 running job) asks for 1 of the 3 replicas at once.
    let p = pool(
        POOL_NS,
        POOL,
        json!({"maxReplicas": 3, "scaleDownDelaySeconds": 0, "worker": {"image": "w:1"}}),
    );
    let h = run_pool(&env, &p).await;
    env.api
        .expect(
            Method::GET,
            &deployment_uri(false),
            StatusCode::OK,
            deployment(3, 3),
        )
        .await;
    let mut a = pod("t4-worker-a");
    // Pod a already carries the idle marks: it is not patched again.
    a["metadata"]["annotations"] = json!({
        "controller.kubernetes.io/pod-deletion-cost": "0",
        "cluster-autoscaler.kubernetes.io/safe-to-evict": "true",
        "karpenter.sh/do-not-disrupt": "false"
    });
    env.api
        .expect_with(Method::GET, &format!("/api/v1/namespaces/{POOL_NS}/pods?&labelSelector=app.kubernetes.io%2Fname%3Dpawfect-worker%2Cinpaint.pawfect.dev%2Fpool%3Dt4"), |_| {
            (StatusCode::OK, json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": [a.clone(), pod("t4-worker-b"), pod("t4-worker-c")]}))
        })
        .await;
    let b = env
        .api
        .expect(
            Method::PATCH,
            &format!("/api/v1/namespaces/{POOL_NS}/pods/t4-worker-b?"),
            StatusCode::OK,
            pod("t4-worker-b"),
        )
        .await;
    assert_eq!(
        b["metadata"]["annotations"]["controller.kubernetes.io/pod-deletion-cost"],
        "1000"
    );
    env.api
        .expect(
            Method::PATCH,
            &format!("/api/v1/namespaces/{POOL_NS}/pods/t4-worker-c?"),
            StatusCode::OK,
            pod("t4-worker-c"),
        )
        .await;
    let applied = env
        .api
        .expect_with(Method::PATCH, &deployment_uri(true), |b| {
            (StatusCode::OK, b.clone())
        })
        .await;
    assert_eq!(
        applied["spec"]["replicas"], 1,
        "down to the one busy worker"
    );
    env.api
        .expect_with(
            Method::PATCH,
            &status_uri::<InpaintPool>(POOL_NS, POOL),
            |b| pool_reply(&p, b),
        )
        .await;
    done(h).await;
}

// ---------------------------------------------------------------- start-up

#[tokio::test]
async fn start_up_check_explains_missing_crds() {
    use crate::run::{StartError, check_crds};
    let mut env = TestEnv::new().await;
    let client = env.ctx.client.clone();
    let h = tokio::spawn(async move { check_crds(&client, Some("media")).await });
    env.api
        .expect(
            Method::GET,
            "/apis/inpaint.pawfect.dev/v1alpha1/namespaces/media/inpaintjobs?&limit=1",
            StatusCode::OK,
            json!({"apiVersion": "inpaint.pawfect.dev/v1alpha1", "kind": "InpaintJobList", "metadata": {}, "items": []}),
        )
        .await;
    env.api
        .expect(
            Method::GET,
            "/apis/inpaint.pawfect.dev/v1alpha1/namespaces/media/inpaintpools?&limit=1",
            StatusCode::NOT_FOUND,
            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                   "message": "the server could not find the requested resource", "reason": "NotFound", "code": 404}),
        )
        .await;
    let err = h.await.unwrap().unwrap_err();
    assert!(
        matches!(
            err,
            StartError::CrdMissing {
                kind: "InpaintPool",
                ..
            }
        ),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains("inpaintpools.inpaint.pawfect.dev"), "{msg}");
    assert!(msg.contains("kubectl apply -f crds/"), "{msg}");

    // Forbidden says to check RBAC (all namespaces).
    let client = env.ctx.client.clone();
    let h = tokio::spawn(async move { check_crds(&client, None).await });
    env.api
        .expect(
            Method::GET,
            "/apis/inpaint.pawfect.dev/v1alpha1/inpaintjobs?&limit=1",
            StatusCode::FORBIDDEN,
            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                   "message": "inpaintjobs is forbidden", "reason": "Forbidden", "code": 403}),
        )
        .await;
    let msg = h.await.unwrap().unwrap_err().to_string();
    assert!(
        msg.contains("RBAC") && msg.contains("all namespaces"),
        "{msg}"
    );
}

// ---------------------------------------------------------------- queue outages

async fn done_err(h: tokio::task::JoinHandle<Result<Action>>) -> crate::Error {
    tokio::time::timeout(Duration::from_secs(30), h)
        .await
        .expect("reconcile finished")
        .expect("reconcile did not panic")
        .expect_err("reconcile failed")
}

#[tokio::test]
async fn job_shows_a_queue_outage_and_retries() {
    let mut env = TestEnv::new().await;
    env.redis.kill().unwrap();
    let j = finalized(job(0, json!({})));
    let h = run_job(&env, &j).await;
    let (status, _) = expect_status(&mut env, &j).await;
    assert_eq!(status["phase"], "Pending");
    let c = cond(&status, "Queued");
    assert_eq!(
        (c["status"].as_str(), c["reason"].as_str()),
        (Some("False"), Some(reasons::QUEUE_UNAVAILABLE))
    );
    expect_event(&mut env, reasons::QUEUE_UNAVAILABLE, "Warning").await;
    let err = done_err(h).await;
    assert_eq!(err.metric_label(), "queue", "{err}");
}

#[tokio::test]
async fn pool_keeps_its_replicas_while_the_queue_is_down() {
    let mut env = TestEnv::new().await;
    env.redis.kill().unwrap();
    let p = pool(
        POOL_NS,
        POOL,
        json!({"maxReplicas": 3, "scaleDownDelaySeconds": 0, "worker": {"image": "w:1"}}),
    );
    let h = run_pool(&env, &p).await;
    env.api
        .expect(
            Method::GET,
            &deployment_uri(false),
            StatusCode::OK,
            deployment(2, 2),
        )
        .await;
    env.api
        .expect(
            Method::GET,
            &format!("/api/v1/namespaces/{POOL_NS}/pods?&labelSelector=app.kubernetes.io%2Fname%3Dpawfect-worker%2Cinpaint.pawfect.dev%2Fpool%3Dt4"),
            StatusCode::OK,
            json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": [pod("t4-worker-a"), pod("t4-worker-b")]}),
        )
        .await;
    // No pod marks (who is busy is unknown); the replicas stay at 2 although the delay is 0.
    let applied = env
        .api
        .expect_with(Method::PATCH, &deployment_uri(true), |b| {
            (StatusCode::OK, b.clone())
        })
        .await;
    assert_eq!(applied["spec"]["replicas"], 2);
    let st = env
        .api
        .expect_with(
            Method::PATCH,
            &status_uri::<InpaintPool>(POOL_NS, POOL),
            |b| pool_reply(&p, b),
        )
        .await;
    let r = cond(&st["status"], "Ready");
    assert_eq!(
        (r["status"].as_str(), r["reason"].as_str()),
        (Some("False"), Some(reasons::QUEUE_UNAVAILABLE))
    );
    let err = done_err(h).await;
    assert_eq!(err.metric_label(), "queue", "{err}");
}

//! End to end: the operator's reconcilers over an in-memory Kubernetes API server, a real
//! `redis-server`, and real `pawfect-worker serve` processes (tiny fixture models, CPU, `file://`
//! storage) started and stopped by a kubelet double from the Deployment the operator applies.
//!
//! One test, in phases that share the processes (model loads cost time on two cores):
//! 1. an InpaintPool at `minReplicas: 0` with an empty queue: the Deployment is applied with
//!    0 replicas and no worker runs;
//! 2. an InpaintJob goes Queued → (the pool scales to 1) Running with progress → Complete with
//!    timings, caption, prompt and an output PNG of the input's size;
//! 3. a second job, running on a second worker whose process is SIGKILLed mid-job: the queue
//!    reclaims it and it completes once, after two attempts;
//! 4. the pool drains back to zero after `scaleDownDelaySeconds`;
//! 5. a burst of five jobs takes the pool to `maxReplicas` (3, never more); when all but one
//!    are done the pool shrinks to one worker — the busy one, never SIGTERMed (deletion-cost
//!    annotations) — and to zero once that job is done too.
//!
//! Each job's photo is served over HTTP and held until the test opens its gate, so a job stays
//! Running (stage `fetch`) exactly as long as a phase needs. No timing is asserted: every wait
//! is for an eventual condition with a generous timeout.

mod controllers;
mod fake_api;
mod kubelet;

#[allow(dead_code, clippy::all)]
#[path = "../../worker/tests/common/mod.rs"]
mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use common::http::{Route, Server};
use common::jobs::{Inputs, photo, png_rgb};
use common::models::models_dir;
use k8s_openapi::api::apps::v1::Deployment;
use pawfect_api::conditions::{self, reasons};
use pawfect_api::{InpaintJobStatus, InpaintPoolStatus, JobPhase};
use pawfect_operator::deployment::WorkerConnection;
use pawfect_operator::events::Triggers;
use pawfect_operator::metrics::Metrics;
use pawfect_operator::{Context, Settings, pool};
use pawfect_queue::testing::RedisServer;
use pawfect_queue::{Queue, QueueConfig};
use serde_json::json;
use tokio::sync::watch;

use fake_api::{FakeApi, Res};
use kubelet::Kubelet;

const NS: &str = "pets";
const POOL: &str = "t4";
const DEPLOYMENT: &str = "t4-worker";
const PREFIX: &str = "e2e";
const MAX_REPLICAS: u32 = 3;
/// Long enough for anything on a slow two-core runner; the test takes far less.
const WAIT: Duration = Duration::from_secs(90);

struct Env {
    api: FakeApi,
    kubelet: Kubelet,
    queue: Queue,
    record: controllers::Record,
    inputs: Inputs,
    http: Server,
    gates: std::collections::HashMap<String, watch::Sender<bool>>,
    redis_url: String,
}

impl Env {
    fn job_status(&self, name: &str) -> Option<InpaintJobStatus> {
        let j = self.api.get(Res::Jobs, NS, name)?;
        serde_json::from_value(j["status"].clone()).ok()
    }

    fn job_uid(&self, name: &str) -> String {
        self.api.get(Res::Jobs, NS, name).unwrap()["metadata"]["uid"]
            .as_str()
            .unwrap()
            .to_string()
    }

    fn phase(&self, name: &str) -> Option<JobPhase> {
        self.job_status(name).and_then(|s| s.phase)
    }

    fn pool_status(&self) -> Option<InpaintPoolStatus> {
        let p = self.api.get(Res::Pools, NS, POOL)?;
        serde_json::from_value(p["status"].clone()).ok()
    }

    fn deployment(&self) -> Option<Deployment> {
        self.api.get_as(Res::Deployments, NS, DEPLOYMENT)
    }

    fn replicas(&self) -> Option<i32> {
        self.deployment()?.spec.replicas
    }

    /// Creates job `name` whose photo is held at `/<name>.png` until [`Env::release`].
    fn create_job(&mut self, name: &str) {
        let path = format!("/{name}.png");
        let (tx, rx) = watch::channel(false);
        self.http.route(
            &path,
            Route {
                gate: Some(rx),
                ..Route::ok(png_rgb(&photo(self.inputs.width, self.inputs.height)))
            },
        );
        self.gates.insert(name.to_string(), tx);
        self.api.create(
            Res::Jobs,
            json!({
                "metadata": {"name": name, "namespace": NS},
                "spec": {
                    "image": self.http.url(&path),
                    "mask": self.inputs.uri("mask.png"),
                    "output": self.inputs.out(&format!("{name}.png")),
                    "pool": POOL,
                    "steps": 3,
                    "seed": 7,
                    "maxAttempts": 3,
                }
            }),
        );
    }

    fn release(&self, name: &str) {
        self.gates[name].send_replace(true);
    }

    /// Everything worth seeing when a wait fails.
    fn dump(&self) -> String {
        let mut out = String::new();
        for j in self.api.list(Res::Jobs) {
            out.push_str(&format!("job {}: {}\n", j["metadata"]["name"], j["status"]));
        }
        if let Some(p) = self.api.get(Res::Pools, NS, POOL) {
            out.push_str(&format!("pool status: {}\n", p["status"]));
        }
        if let Some(d) = self.api.get(Res::Deployments, NS, DEPLOYMENT) {
            out.push_str(&format!(
                "deployment replicas {} status {}\n",
                d["spec"]["replicas"], d["status"]
            ));
        }
        out.push_str(&format!(
            "pods: {:?}\nterminations: {:?}\ncrashes: {:?}\nunexpected calls: {:?}\nreconcile errors: {:?}\n",
            self.kubelet.active_pods(),
            self.kubelet.terminations(),
            self.kubelet.crashes(),
            self.api.unexpected(),
            self.record.errors(),
        ));
        for pod in self.kubelet.all_pods() {
            let logs = self.kubelet.logs(&pod);
            let tail: Vec<&str> = logs.lines().rev().take(30).collect();
            out.push_str(&format!(
                "logs of {pod} (last lines first):\n{}\n",
                tail.join("\n")
            ));
        }
        out
    }

    async fn wait_for<T>(&self, what: &str, mut f: impl FnMut(&Env) -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(v) = f(self) {
                return v;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}\n{}",
                self.dump()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn wait_phase(&self, job: &str, phase: JobPhase) -> InpaintJobStatus {
        self.wait_for(&format!("job {job} {phase:?}"), |e| {
            e.job_status(job).filter(|s| s.phase == Some(phase))
        })
        .await
    }

    /// Waits for job `job` to be Running on a ready pod, reporting progress.
    async fn wait_running(&self, job: &str) -> (InpaintJobStatus, String) {
        let s = self
            .wait_for(&format!("job {job} running with progress"), |e| {
                e.job_status(job).filter(|s| {
                    s.phase == Some(JobPhase::Running)
                        && s.progress.as_ref().is_some_and(|p| p.stage.is_some())
                        && s.worker.is_some()
                })
            })
            .await;
        let worker = s.worker.clone().unwrap();
        assert!(
            self.kubelet.active_pods().contains_key(&worker),
            "job {job} runs on {worker}, which is no pod\n{}",
            self.dump()
        );
        (s, worker)
    }

    async fn wait_replicas(&self, n: i32) {
        self.wait_for(&format!("{n} replicas, all ready, none terminating"), |e| {
            let pods = e.kubelet.active_pods();
            let ok = e.replicas() == Some(n)
                && pods.len() == n as usize
                && pods.values().all(|r| *r)
                && e.kubelet.all_pods().len() == n as usize;
            ok.then_some(())
        })
        .await
    }

    /// Checks a job that succeeded: status fields (against the queue's job hash) and the
    /// output file.
    async fn check_succeeded(&self, name: &str, attempts: u32) -> InpaintJobStatus {
        let s = self.job_status(name).unwrap();
        assert_eq!(s.phase, Some(JobPhase::Succeeded), "{s:?}");
        let complete = s
            .condition(conditions::COMPLETE)
            .expect("Complete condition");
        assert_eq!(
            (complete.status.as_str(), complete.reason.as_str()),
            ("True", reasons::SUCCEEDED)
        );
        let running = s.condition(conditions::RUNNING).expect("Running condition");
        assert_eq!(running.status, "False", "{s:?}");
        assert_eq!(s.attempts, Some(attempts), "{s:?}");
        assert_eq!(s.observed_generation, Some(1));
        assert!(s.queued_at.is_some() && s.started_at.is_some() && s.completed_at.is_some());
        let t = s.timings.clone().expect("timings");
        for (stage, v) in [
            ("fetch", t.fetch),
            ("mask", t.mask),
            ("crop", t.crop),
            ("caption", t.caption),
            ("encode", t.encode),
            ("denoise", t.denoise),
            ("decode", t.decode),
            ("stitch", t.stitch),
            ("store", t.store),
            ("total", t.total),
        ] {
            assert!(v.is_some(), "job {name}: timing {stage} missing: {t:?}");
        }
        // The fixture Florence-2 has random weights: its caption may be empty (the worker then
        // reports none) and the prompt is the neutral fallback. The status carries what the
        // worker reported.
        let rec = self
            .queue
            .get_job(&self.job_uid(name))
            .await
            .unwrap()
            .expect("the job hash");
        assert_eq!(s.caption, rec.caption);
        assert_eq!(s.prompt, rec.prompt);
        assert_eq!(s.timings, rec.timings);
        assert_eq!(s.worker, rec.worker);
        assert!(
            s.prompt.as_deref().is_some_and(|p| !p.is_empty()),
            "prompt: {s:?}"
        );
        let want = self.inputs.out(&format!("{name}.png"));
        assert_eq!(s.output.as_deref(), Some(want.as_str()));
        let file = self.inputs.root.join("out").join(format!("{name}.png"));
        let bytes = std::fs::read(&file).unwrap();
        assert_eq!(
            image::guess_format(&bytes).unwrap(),
            image::ImageFormat::Png
        );
        let img = image::load_from_memory(&bytes).unwrap();
        assert_eq!(
            (img.width(), img.height()),
            (self.inputs.width, self.inputs.height)
        );
        s
    }
}

/// Every entry of the queue's events stream, as its fields.
async fn queue_events(url: &str, queue: &Queue) -> Vec<std::collections::HashMap<String, String>> {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(queue.keys().events())
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    reply
        .ids
        .iter()
        .map(|e| {
            e.map
                .iter()
                .filter_map(|(k, v)| {
                    Some((
                        k.clone(),
                        <String as redis::FromRedisValue>::from_redis_value_ref(v).ok()?,
                    ))
                })
                .collect()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_redis_and_worker_processes() {
    let started = std::time::Instant::now();
    let redis = RedisServer::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let inputs = Inputs::create(tmp.path());
    let models = models_dir(tmp.path());
    let logs = tmp.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let http = Server::start().await;

    let connect = || async {
        Queue::connect(QueueConfig {
            prefix: PREFIX.into(),
            ..QueueConfig::new(redis.url())
        })
        .await
        .unwrap()
    };
    let api = FakeApi::default();
    let metrics = Arc::new(Metrics::default());
    let worker_conn = WorkerConnection {
        redis_url: redis.url(),
        password_secret: None,
        queue_prefix: PREFIX.into(),
    };
    let (job_tx, job_rx) = futures::channel::mpsc::unbounded();
    let (pool_tx, pool_rx) = futures::channel::mpsc::unbounded();
    let mut ctx = Context::new(
        api.client(),
        connect().await,
        metrics.clone(),
        worker_conn,
        Some("pawfect-operator-e2e".into()),
    );
    ctx.settings = Settings {
        job_resync: controllers::REQUEUE,
        queued_resync: controllers::REQUEUE,
        pool_missing_retry: controllers::REQUEUE,
        error_retry: controllers::REQUEUE,
    };
    ctx.pool_wake = Some(pool_tx.clone());
    let ctx = Arc::new(ctx);

    let (stop_tx, stop_rx) = watch::channel(false);
    let events_queue = connect().await;
    let events_metrics = metrics.clone();
    let events_task = tokio::spawn(async move {
        let triggers = Triggers {
            jobs: job_tx,
            pools: pool_tx,
        };
        pawfect_operator::events::run(
            events_queue,
            "operator-e2e".into(),
            triggers,
            &events_metrics,
            Duration::from_millis(200),
        )
        .await;
    });
    let record = controllers::Record::default();
    let controllers_task = tokio::spawn(controllers::run(
        api.clone(),
        ctx.clone(),
        job_rx,
        pool_rx,
        record.clone(),
        stop_rx.clone(),
    ));
    let kubelet = Kubelet::new(
        api.clone(),
        connect().await,
        NS,
        DEPLOYMENT,
        &pawfect_operator::queue_pool(NS, POOL),
        PathBuf::from(env!("CARGO_BIN_EXE_pawfect-worker-e2e")),
        &logs,
    );
    let kubelet_task = tokio::spawn(kubelet.clone().run(stop_rx.clone()));
    let mut env = Env {
        api: api.clone(),
        kubelet,
        queue: connect().await,
        record,
        inputs,
        http,
        gates: Default::default(),
        redis_url: redis.url(),
    };

    // 1. The pool, idle: Deployment applied at 0 replicas, no worker.
    api.create(
        Res::Pools,
        json!({
            "metadata": {"name": POOL, "namespace": NS},
            "spec": {
                "minReplicas": 0,
                "maxReplicas": MAX_REPLICAS,
                "jobsPerReplica": 1,
                "pollIntervalSeconds": 1,
                "scaleDownDelaySeconds": 3,
                "worker": {
                    "image": "ghcr.io/pawfect-inpaint/worker:e2e",
                    "modelVariant": "q8_0",
                    "terminationGracePeriodSeconds": 20,
                    "modelVolume": {"hostPath": models.display().to_string(), "mountPath": "/models"},
                    "resources": {"limits": {"nvidia.com/gpu": "0"}},
                    "args": [
                        "--device", "cpu",
                        "--allow-root", env.inputs.root.display().to_string(),
                        "--http-allow-plain", "--http-allow-cidrs", "127.0.0.1/32",
                        "--crop-min-side", "128", "--crop-max-side", "256",
                        "--caption-beams", "1", "--log-format", "json"
                    ],
                    "env": [
                        {"name": "PAWFECT_LEASE", "value": "2s"},
                        {"name": "RUST_LOG", "value": "info"}
                    ]
                }
            }
        }),
    );
    let ps = env
        .wait_for("pool status", |e| {
            e.pool_status().filter(|s| {
                conditions::is_true(&s.conditions, conditions::READY)
                    && s.observed_generation == Some(1)
            })
        })
        .await;
    assert_eq!(ps.desired_replicas, 0);
    let d = env.deployment().expect("the worker Deployment");
    assert_eq!(d.spec.replicas, Some(0));
    let c = &d.spec.template.spec.as_ref().unwrap().containers[0];
    let args = c.args.clone().unwrap();
    let pool_arg = args.iter().position(|a| a == "--pool").unwrap();
    assert_eq!(args[pool_arg + 1], format!("{NS}/{POOL}"));
    let env_of = |name: &str| {
        c.env
            .iter()
            .flatten()
            .find(|e| e.name == name)
            .and_then(|e| e.value.clone())
    };
    assert_eq!(
        env_of("PAWFECT_REDIS_URL").as_deref(),
        Some(env.redis_url.as_str())
    );
    assert_eq!(env_of("PAWFECT_QUEUE_PREFIX").as_deref(), Some(PREFIX));
    // A few more pool reconciles: still nothing to run.
    let (_, pools_before) = env.record.counts();
    env.wait_for("pool reconciles", |e| {
        (e.record.counts().1 >= pools_before + 2).then_some(())
    })
    .await;
    assert_eq!(env.replicas(), Some(0));
    assert!(env.kubelet.all_pods().is_empty());

    // 2. A job: Queued → Running with progress → Complete.
    env.create_job("rex");
    let queued = env.wait_phase("rex", JobPhase::Queued).await;
    let q = queued.condition(conditions::QUEUED).unwrap();
    assert_eq!(
        (q.status.as_str(), q.reason.as_str()),
        ("True", reasons::ENQUEUED)
    );
    let (running, worker_a) = env.wait_running("rex").await;
    assert_eq!(running.attempts, Some(1));
    let r = running.condition(conditions::RUNNING).unwrap();
    assert_eq!(
        (r.status.as_str(), r.reason.as_str()),
        ("True", reasons::CLAIMED)
    );
    assert_eq!(
        running.progress.as_ref().unwrap().stage.as_deref(),
        Some("fetch")
    );
    assert_eq!(env.replicas(), Some(1), "one job, one worker");

    // 3. A second job on a second worker, SIGKILLed mid-job.
    env.create_job("kill");
    let (_, worker_b) = env.wait_running("kill").await;
    assert_ne!(worker_a, worker_b);
    assert_eq!(env.replicas(), Some(2), "two jobs, two workers");
    env.kubelet.signal_pod(&worker_b, "-KILL");
    env.wait_for("the killed worker restarted", |e| {
        (e.kubelet.restarts(&worker_b) >= 1).then_some(())
    })
    .await;
    env.release("kill");
    env.release("rex");

    env.wait_phase("rex", JobPhase::Succeeded).await;
    let rex = env.check_succeeded("rex", 1).await;
    assert_eq!(rex.worker.as_deref(), Some(worker_a.as_str()));
    // Every status the operator wrote, in order: Queued, then Running with progress, then
    // Succeeded, never anything after the terminal one.
    let writes = env.api.status_writes(Res::Jobs, NS, "rex");
    let phases: Vec<String> = writes
        .iter()
        .map(|w| w["phase"].as_str().unwrap_or("").to_string())
        .collect();
    let first = |p: &str| phases.iter().position(|x| x == p).unwrap_or(usize::MAX);
    assert!(
        first("Queued") < first("Running") && first("Running") < first("Succeeded"),
        "{phases:?}"
    );
    assert_eq!(phases.last().map(String::as_str), Some("Succeeded"));
    assert_eq!(phases.iter().filter(|p| *p == "Succeeded").count(), 1);

    env.wait_phase("kill", JobPhase::Succeeded).await;
    let killed = env.check_succeeded("kill", 2).await;
    let uid = env.job_uid("kill");
    // The whole events stream (the operator's consumer group has read and acknowledged it).
    let events = queue_events(&env.redis_url, &env.queue).await;
    let of = |kind: &str| {
        events
            .iter()
            .filter(|e| {
                e.get("uid") == Some(&uid) && e.get("type").map(String::as_str) == Some(kind)
            })
            .count()
    };
    assert_eq!(of("claimed"), 2, "claimed twice: {events:?}");
    assert_eq!(of("succeeded"), 1, "completed once: {events:?}");
    let crashes = env.kubelet.crashes();
    assert_eq!(crashes.len(), 1, "{crashes:?}");
    assert_eq!(crashes[0].0, worker_b);
    eprintln!("killed job completed by {:?}", killed.worker);

    // Kubernetes Events on the jobs.
    let reasons_of = |job: &str| -> Vec<String> {
        env.api
            .list(Res::Events)
            .iter()
            .filter(|e| e["regarding"]["name"] == job)
            .map(|e| e["reason"].as_str().unwrap_or("").to_string())
            .collect()
    };
    let rex_events = reasons_of("rex");
    for want in [reasons::ENQUEUED, reasons::CLAIMED, reasons::SUCCEEDED] {
        assert!(
            rex_events.iter().any(|r| r == want),
            "{want} missing: {rex_events:?}"
        );
    }

    // 4. Idle: back to zero after the scale-down delay.
    env.wait_replicas(0).await;
    let ps = env.pool_status().unwrap();
    assert_eq!(
        (ps.desired_replicas, ps.queue.waiting, ps.queue.running),
        (0, 0, 0)
    );

    // 5. A burst: up to maxReplicas; down to the one busy worker; to zero.
    let burst: Vec<String> = (0..5).map(|i| format!("burst-{i}")).collect();
    for b in &burst {
        env.create_job(b);
    }
    env.wait_replicas(MAX_REPLICAS as i32).await;
    let running: Vec<(String, String)> = env
        .wait_for("three burst jobs running", |e| {
            let r: Vec<(String, String)> = burst
                .iter()
                .filter_map(|b| {
                    let s = e.job_status(b)?;
                    (s.phase == Some(JobPhase::Running) && s.progress.is_some())
                        .then(|| (b.clone(), s.worker.clone().unwrap_or_default()))
                })
                .collect();
            (r.len() == MAX_REPLICAS as usize).then_some(r)
        })
        .await;
    let waiting = burst
        .iter()
        .filter(|b| env.phase(b) == Some(JobPhase::Queued))
        .count();
    assert_eq!(waiting, burst.len() - MAX_REPLICAS as usize);
    let ps = env
        .wait_for("pool status at the peak", |e| {
            e.pool_status().filter(|s| {
                s.queue.running == MAX_REPLICAS as u64 && s.busy_workers == MAX_REPLICAS
            })
        })
        .await;
    assert_eq!(ps.desired_replicas, MAX_REPLICAS);
    assert_eq!(ps.queue.waiting, 2);

    let (kept_job, kept_pod) = running[0].clone();
    for b in burst.iter().filter(|b| **b != kept_job) {
        env.release(b);
    }
    for b in burst.iter().filter(|b| **b != kept_job) {
        env.wait_phase(b, JobPhase::Succeeded).await;
        env.check_succeeded(b, 1).await;
    }
    env.wait_replicas(1).await;
    assert_eq!(
        env.kubelet.active_pods().keys().collect::<Vec<_>>(),
        vec![&kept_pod],
        "the busy worker stays"
    );
    assert_eq!(env.phase(&kept_job), Some(JobPhase::Running));
    // The operator marked it busy: highest deletion cost, not evictable.
    let kept = env.api.get(Res::Pods, NS, &kept_pod).unwrap();
    let ann = &kept["metadata"]["annotations"];
    assert_eq!(ann[pool::DELETION_COST], pool::BUSY_COST, "{ann}");
    assert_eq!(ann[pool::SAFE_TO_EVICT], "false", "{ann}");
    assert!(
        !env.kubelet.terminations().iter().any(|t| t.pod == kept_pod),
        "the busy worker got SIGTERM"
    );
    env.release(&kept_job);
    env.wait_phase(&kept_job, JobPhase::Succeeded).await;
    env.check_succeeded(&kept_job, 1).await;
    env.wait_replicas(0).await;

    // Across all phases.
    assert!(
        env.kubelet.max_replicas_seen() <= MAX_REPLICAS,
        "replicas above maxReplicas: {}",
        env.kubelet.max_replicas_seen()
    );
    let terms = env.kubelet.terminations();
    assert!(terms.len() >= MAX_REPLICAS as usize + 2, "{terms:?}");
    for t in &terms {
        assert!(!t.busy, "a busy worker got SIGTERM: {t:?}\n{}", env.dump());
        assert_eq!(t.deletion_cost.as_deref(), Some("0"), "{t:?}");
        assert_eq!(t.exit, Some(Some(0)), "{t:?}");
    }
    assert_eq!(env.api.unexpected(), Vec::<String>::new());
    assert_eq!(env.record.errors(), Vec::<String>::new());
    let (jobs_n, pools_n) = env.record.counts();
    eprintln!(
        "e2e: {} s, {jobs_n} job and {pools_n} pool reconciles, {} API calls, {} pods SIGTERMed",
        started.elapsed().as_secs(),
        env.api.calls().len(),
        terms.len()
    );

    stop_tx.send_replace(true);
    controllers_task.await.unwrap();
    kubelet_task.await.unwrap();
    events_task.abort();
}

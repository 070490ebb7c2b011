//! End to end on a real Kubernetes control plane (kube-apiserver + etcd + kube-controller-manager
//! from `scripts/local-k8s.sh`, through `pawfect-control-plane`), a real `redis-server`, the real
//! `pawfect-operator` binary (two replicas, leader election through a real Lease, authenticated
//! as the chart's ServiceAccount with the chart's RBAC) and real `pawfect-worker serve` processes
//! (tiny fixture models, CPU, `file://` storage). The controller-manager turns the operator's
//! worker Deployment into ReplicaSets and Pods and picks the scale-down victims; `kubelet.rs`
//! plays the node: it binds the pods and runs their container as a process.
//!
//! One test, in phases that share the processes (model loads cost time on two cores):
//! 1. an InpaintPool at `minReplicas: 0` with an empty queue: the Deployment is applied with
//!    0 replicas and no worker runs;
//! 2. an InpaintJob goes Queued → (the pool scales to 1) Running with progress → Complete with
//!    timings, caption, prompt and an output PNG of the input's size; `kubectl wait
//!    --for=condition=Complete` returns;
//! 3. a second job, running on a second worker whose process is SIGKILLed mid-job: the container
//!    restarts, the queue reclaims the job and it completes once, after two attempts;
//! 4. the pool drains back to zero after `scaleDownDelaySeconds`;
//! 5. a burst of five jobs takes the pool to `maxReplicas` (3, never more); when all but one
//!    are done the pool shrinks to one worker — the busy one, never SIGTERMed (the real
//!    ReplicaSet controller reading the operator's pod-deletion-cost) — and to zero once that
//!    job is done too;
//! 6. a running job deleted (`kubectl delete`): cancelled in the queue, its output never written;
//! 7. the leading operator replica SIGKILLed mid-job: the standby takes the Lease over and the
//!    job completes;
//! 8. the API server SIGKILLed and restarted mid-job: every watch breaks (and, its watch cache
//!    rebuilt, old resource versions are gone); the job completes and a new job runs;
//! 9. fields owned by others survive the operator's server-side apply: an annotation set with
//!    `kubectl annotate` and the restart stamp of `kubectl rollout restart`, across a pool change
//!    that makes the operator apply the Deployment again;
//! 10. the pool deleted: the garbage collector removes its Deployment and ReplicaSets.
//!
//! Each job's photo is served over HTTP and held until the test opens its gate, so a job stays
//! Running (stage `fetch`) exactly as long as a phase needs. No timing is asserted: every wait
//! is for an eventual condition with a generous timeout.

mod cluster;
mod kubelet;
// Shared with the soak and the scale run, which use other parts of it (the process id).
#[allow(dead_code)]
mod operator;

#[allow(dead_code, clippy::all)]
#[path = "../../worker/tests/common/mod.rs"]
mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::http::{Route, Server};
use common::jobs::{Inputs, photo, png_rgb};
use common::models::models_dir;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use pawfect_api::conditions::{self, reasons};
use pawfect_api::{InpaintJob, InpaintJobStatus, InpaintPool, InpaintPoolStatus, JobPhase};
use pawfect_control_plane::ControlPlane;
use pawfect_operator::pool;
use pawfect_queue::testing::RedisServer;
use pawfect_queue::{JobState, Queue};
use serde_json::json;
use tokio::sync::watch;

use cluster::{SYSTEM_NS, node_names, queue, start_operators, tail};
use kubelet::Kubelet;
use operator::Replica;

const POOL: &str = "t4";
const DEPLOYMENT: &str = "t4-worker";
const PREFIX: &str = "e2e";
const MAX_REPLICAS: u32 = 3;
/// Long enough for anything on a slow two-core runner; the test takes far less.
const WAIT: Duration = Duration::from_secs(120);

/// Every phase each job's status went through, as the watch saw it (repeats folded).
type PhaseLog = Arc<Mutex<HashMap<String, Vec<String>>>>;

struct Env {
    cp: ControlPlane,
    client: Client,
    ns: String,
    kubelet: Kubelet,
    queue: Queue,
    inputs: Inputs,
    http: Server,
    gates: Mutex<HashMap<String, watch::Sender<bool>>>,
    redis_url: String,
    operators: Vec<Replica>,
    phases: PhaseLog,
}

impl Env {
    fn jobs(&self) -> Api<InpaintJob> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    fn pools(&self) -> Api<InpaintPool> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    fn deployments(&self) -> Api<Deployment> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    async fn job(&self, name: &str) -> Option<InpaintJob> {
        self.jobs().get_opt(name).await.ok().flatten()
    }

    async fn job_status(&self, name: &str) -> Option<InpaintJobStatus> {
        self.job(name).await.and_then(|j| j.status)
    }

    async fn phase(&self, name: &str) -> Option<JobPhase> {
        self.job_status(name).await.and_then(|s| s.phase)
    }

    async fn pool_status(&self) -> Option<InpaintPoolStatus> {
        self.pools().get_opt(POOL).await.ok().flatten()?.status
    }

    async fn deployment(&self) -> Option<Deployment> {
        self.deployments().get_opt(DEPLOYMENT).await.ok().flatten()
    }

    async fn replicas(&self) -> Option<i32> {
        self.deployment().await?.spec.replicas
    }

    /// Creates job `name` whose photo is held at `/<name>.png` until [`Env::release`].
    async fn create_job(&self, name: &str) {
        let path = format!("/{name}.png");
        let (tx, rx) = watch::channel(false);
        self.http.route(
            &path,
            Route {
                gate: Some(rx),
                ..Route::ok(png_rgb(&photo(self.inputs.width, self.inputs.height)))
            },
        );
        self.gates.lock().unwrap().insert(name.to_string(), tx);
        let job: InpaintJob = serde_json::from_value(json!({
            "apiVersion": "inpaint.pawfect.dev/v1alpha1",
            "kind": "InpaintJob",
            "metadata": {"name": name, "namespace": self.ns},
            "spec": {
                "image": self.http.url(&path),
                "mask": self.inputs.uri("mask.png"),
                "output": self.inputs.out(&format!("{name}.png")),
                "pool": POOL,
                "steps": 3,
                "seed": 7,
                "maxAttempts": 3,
            }
        }))
        .expect("an InpaintJob");
        self.jobs()
            .create(&PostParams::default(), &job)
            .await
            .unwrap_or_else(|e| panic!("create job {name}: {e}"));
    }

    /// `kubectl ARGS` as the admin. It blocks (e.g. `kubectl wait`): the runtime's other thread
    /// keeps the kubelet going meanwhile.
    fn kubectl(&self, args: &[&str]) -> Result<String, String> {
        tokio::task::block_in_place(|| self.cp.kubectl_run(args))
    }

    fn release(&self, name: &str) {
        self.gates.lock().unwrap()[name].send_replace(true);
    }

    fn output_file(&self, name: &str) -> PathBuf {
        self.inputs.root.join("out").join(format!("{name}.png"))
    }

    /// Everything worth seeing when a wait fails.
    async fn dump(&self) -> String {
        let mut out = String::new();
        if let Ok(jobs) = self.jobs().list(&ListParams::default()).await {
            for j in jobs {
                out.push_str(&format!(
                    "job {}: {}\n",
                    j.name_any(),
                    serde_json::to_string(&j.status).unwrap_or_default()
                ));
            }
        }
        out.push_str(&format!("phases seen: {:?}\n", self.phases.lock().unwrap()));
        out.push_str(&format!(
            "pool status: {}\n",
            serde_json::to_string(&self.pool_status().await).unwrap_or_default()
        ));
        if let Some(d) = self.deployment().await {
            out.push_str(&format!(
                "deployment replicas {:?} status {}\n",
                d.spec.replicas,
                serde_json::to_string(&d.status).unwrap_or_default()
            ));
        }
        if let Ok(pods) = Api::<Pod>::namespaced(self.client.clone(), &self.ns)
            .list(&ListParams::default())
            .await
        {
            for p in pods {
                out.push_str(&format!(
                    "pod {} node {:?} deleting {} annotations {:?}\n",
                    p.name_any(),
                    p.spec.as_ref().and_then(|s| s.node_name.clone()),
                    p.metadata.deletion_timestamp.is_some(),
                    p.metadata.annotations
                ));
            }
        }
        out.push_str(&format!(
            "kubelet pods: {:?}\nterminations: {:?}\ncrashes: {:?}\nproblems: {:?}\n",
            self.kubelet.active_pods(),
            self.kubelet.terminations(),
            self.kubelet.crashes(),
            self.kubelet.problems(),
        ));
        for op in &self.operators {
            out.push_str(&format!(
                "operator {} (started {} times), last lines:\n{}\n",
                op.identity,
                op.starts(),
                tail(&op.log(), 40)
            ));
        }
        for pod in self.kubelet.all_pods() {
            out.push_str(&format!(
                "logs of {pod}, last lines:\n{}\n",
                tail(&self.kubelet.logs(&pod), 30)
            ));
        }
        out.push_str(&format!(
            "kube-controller-manager, last lines:\n{}\n",
            self.cp.log_tail("kube-controller-manager", 20)
        ));
        out
    }

    async fn wait_for<T, F, Fut>(&self, what: &str, mut f: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Option<T>>,
    {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(v) = f().await {
                return v;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("timed out waiting for {what}\n{}", self.dump().await);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn wait_phase(&self, job: &str, phase: JobPhase) -> InpaintJobStatus {
        self.wait_for(&format!("job {job} {phase:?}"), || async move {
            self.job_status(job)
                .await
                .filter(|s| s.phase == Some(phase))
        })
        .await
    }

    /// Waits for job `job` to be Running on a ready pod, reporting progress.
    async fn wait_running(&self, job: &str) -> (InpaintJobStatus, String) {
        let s = self
            .wait_for(&format!("job {job} running with progress"), || async move {
                self.job_status(job).await.filter(|s| {
                    s.phase == Some(JobPhase::Running)
                        && s.progress.as_ref().is_some_and(|p| p.stage.is_some())
                        && s.worker.is_some()
                })
            })
            .await;
        let worker = s.worker.clone().unwrap();
        assert!(
            self.kubelet.active_pods().contains_key(&worker),
            "job {job} runs on {worker}, which is no pod of this kubelet\n{}",
            self.dump().await
        );
        (s, worker)
    }

    async fn wait_replicas(&self, n: i32) {
        self.wait_for(
            &format!("{n} replicas, all ready, none terminating"),
            || async move {
                let pods = self.kubelet.active_pods();
                let ok = self.replicas().await == Some(n)
                    && pods.len() == n as usize
                    && pods.values().all(|r| *r)
                    && self.kubelet.all_pods().len() == n as usize;
                ok.then_some(())
            },
        )
        .await
    }

    /// The pod annotations the operator wrote on `pod`.
    async fn pod_annotations(&self, pod: &str) -> BTreeMap<String, String> {
        Api::<Pod>::namespaced(self.client.clone(), &self.ns)
            .get(pod)
            .await
            .unwrap_or_else(|e| panic!("pod {pod}: {e}"))
            .metadata
            .annotations
            .unwrap_or_default()
    }

    /// Checks a job that succeeded: status fields (against the queue's job hash), the phases it
    /// went through and the output file.
    async fn check_succeeded(&self, name: &str, attempts: u32) -> InpaintJobStatus {
        let job = self.job(name).await.expect("the job");
        let uid = job.uid().unwrap();
        let s = job.status.clone().unwrap_or_default();
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
            .get_job(&format!("{}/{POOL}", self.ns), &uid)
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
        let bytes = std::fs::read(self.output_file(name)).unwrap();
        assert_eq!(
            image::guess_format(&bytes).unwrap(),
            image::ImageFormat::Png
        );
        let img = image::load_from_memory(&bytes).unwrap();
        assert_eq!(
            (img.width(), img.height()),
            (self.inputs.width, self.inputs.height)
        );
        // Phases only move forward (the watch may miss a short one: a job can finish between two
        // status writes of Queued and Running), and nothing follows Succeeded.
        // The watch sees Succeeded a moment after a GET may.
        let seen = self
            .wait_for(
                &format!("the watch to see job {name} Succeeded"),
                || async move {
                    let seen = self.phases.lock().unwrap().get(name).cloned()?;
                    (seen.last().map(String::as_str) == Some("Succeeded")).then_some(seen)
                },
            )
            .await;
        let order = ["Queued", "Running", "Succeeded"];
        let ranks: Vec<usize> = seen
            .iter()
            .map(|p| {
                order
                    .iter()
                    .position(|o| o == p)
                    .unwrap_or_else(|| panic!("job {name}: phase {p} seen: {seen:?}"))
            })
            .collect();
        assert!(
            ranks.windows(2).all(|w| w[0] < w[1]),
            "job {name}: phases out of order: {seen:?}"
        );
        s
    }

    /// The Lease holder among the operator replicas (None while nobody holds it).
    async fn leader(&self) -> Option<String> {
        let leases = Api::<Lease>::namespaced(self.client.clone(), SYSTEM_NS)
            .list(&ListParams::default())
            .await
            .ok()?;
        let holders: Vec<String> = leases
            .items
            .into_iter()
            .filter_map(|l| l.spec?.holder_identity)
            .filter(|h| self.operators.iter().any(|o| &o.identity == h))
            .collect();
        match holders.as_slice() {
            [one] => Some(one.clone()),
            [] => None,
            many => panic!("more than one Lease held by the operators: {many:?}"),
        }
    }

    /// Kubernetes Event reasons about `job`.
    async fn event_reasons(&self, job: &str) -> Vec<String> {
        Api::<Event>::namespaced(self.client.clone(), &self.ns)
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(job))
            .filter_map(|e| e.reason)
            .collect()
    }
}

/// Every entry of a pool's events stream, as its fields.
async fn queue_events(url: &str, queue: &Queue, pool: &str) -> Vec<HashMap<String, String>> {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(queue.keys().events(pool))
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

/// Records every job's phase as a watch on the real server sees it.
fn record_phases(client: Client, ns: &str, log: PhaseLog) -> tokio::task::JoinHandle<()> {
    let api: Api<InpaintJob> = Api::namespaced(client, ns);
    tokio::spawn(async move {
        let mut stream = watcher(api, watcher::Config::default())
            .default_backoff()
            .applied_objects()
            .boxed();
        while let Some(item) = stream.next().await {
            let Ok(job) = item else { continue };
            let Some(phase) = job.status.as_ref().and_then(|s| s.phase) else {
                continue;
            };
            let mut log = log.lock().unwrap();
            let seen = log.entry(job.name_any()).or_default();
            let p = phase.as_str().to_string();
            if seen.last() != Some(&p) {
                seen.push(p);
            }
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_and_workers_on_a_real_control_plane() {
    let started = std::time::Instant::now();
    let cp = ControlPlane::start().unwrap_or_else(|e| panic!("the control plane: {e}"));
    let client = cp.client().await;
    let redis = RedisServer::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let inputs = Inputs::create(tmp.path());
    let models = models_dir(tmp.path());
    let logs = tmp.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let http = Server::start().await;
    let redis_url = redis.url();
    let connect = || queue(&redis_url, PREFIX);

    // The CRDs and the chart's RBAC; the operator, two replicas, as the chart's ServiceAccount.
    let operators = start_operators(
        &cp,
        &client,
        Path::new(env!("CARGO_BIN_EXE_pawfect-operator-e2e")),
        &redis.url(),
        PREFIX,
        &logs,
    )
    .await;

    let ns = cp.namespace(&client, "pets").await;
    let nodes = node_names(&client).await;
    let kubelet = Kubelet::new(
        client.clone(),
        connect().await,
        &ns,
        &pawfect_operator::queue_pool(&ns, POOL),
        nodes,
        PathBuf::from(env!("CARGO_BIN_EXE_pawfect-worker-e2e")),
        &logs,
    );
    let (stop_tx, stop_rx) = watch::channel(false);
    let kubelet_task = tokio::spawn(kubelet.clone().run(stop_rx.clone()));
    let phases = PhaseLog::default();
    let phases_task = record_phases(client.clone(), &ns, phases.clone());
    let env = &Env {
        cp,
        client: client.clone(),
        ns: ns.clone(),
        kubelet,
        queue: connect().await,
        inputs,
        http,
        gates: Default::default(),
        redis_url: redis.url(),
        operators,
        phases,
    };
    let leader = env
        .wait_for("an operator replica leads", move || async move {
            env.leader().await
        })
        .await;
    assert_eq!(leader, "operator-a", "the first replica started leads");

    // 1. The pool, idle: Deployment applied at 0 replicas, no worker.
    let pool: InpaintPool = serde_json::from_value(json!({
        "apiVersion": "inpaint.pawfect.dev/v1alpha1",
        "kind": "InpaintPool",
        "metadata": {"name": POOL, "namespace": ns},
        "spec": {
            "minReplicas": 0,
            "maxReplicas": MAX_REPLICAS,
            "jobsPerReplica": 1,
            "pollIntervalSeconds": 1,
            "scaleDownDelaySeconds": 3,
            "worker": {
                "image": "ghcr.io/pawfect-inpaint/worker:e2e",
                "modelVariant": "q8_0",
                "terminationGracePeriodSeconds": 30,
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
    }))
    .expect("an InpaintPool");
    env.pools()
        .create(&PostParams::default(), &pool)
        .await
        .unwrap_or_else(|e| panic!("create pool: {e}"));
    let ps = env
        .wait_for("pool Ready", move || async move {
            env.pool_status().await.filter(|s| {
                conditions::is_true(&s.conditions, conditions::READY)
                    && s.observed_generation == Some(1)
            })
        })
        .await;
    assert_eq!(ps.desired_replicas, 0);
    let d = env.deployment().await.expect("the worker Deployment");
    let owner = d.owner_references();
    assert!(
        owner
            .iter()
            .any(|o| o.kind == "InpaintPool" && o.name == POOL && o.controller == Some(true)),
        "{owner:?}"
    );
    assert_eq!(d.spec.replicas, Some(0));
    let c = &d.spec.template.spec.as_ref().unwrap().containers[0];
    let args = c.args.clone().unwrap();
    let pool_arg = args.iter().position(|a| a == "--pool").unwrap();
    assert_eq!(args[pool_arg + 1], format!("{ns}/{POOL}"));
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
    // The chart's operator gives the pool a Redis user of its own (`operator.poolRedisUsers`):
    // the workers log in as it, with the password from the pool's Secret.
    let pool_user = format!("{PREFIX}:{ns}/{POOL}");
    assert_eq!(
        env_of("PAWFECT_REDIS_USERNAME").as_deref(),
        Some(pool_user.as_str())
    );
    let password_ref = c
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "PAWFECT_REDIS_PASSWORD")
        .and_then(|e| e.value_from.as_ref()?.secret_key_ref.clone())
        .expect("the password from a Secret");
    assert_eq!(password_ref.name, format!("{POOL}-redis-user"));
    assert_eq!(
        env.queue.pools_with_users().await.unwrap(),
        vec![format!("{ns}/{POOL}")]
    );
    // The controller-manager saw it (a ReplicaSet at 0) and no pod exists.
    env.wait_for("the Deployment's ReplicaSet", move || async move {
        let rs = Api::<ReplicaSet>::namespaced(env.client.clone(), &env.ns)
            .list(&ListParams::default())
            .await
            .ok()?;
        (rs.items.len() == 1).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(env.replicas().await, Some(0));
    assert!(env.kubelet.all_pods().is_empty());

    // 2. A job: Queued → Running with progress → Complete.
    env.create_job("rex").await;
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
    assert_eq!(env.replicas().await, Some(1), "one job, one worker");

    // 3. A second job on a second worker, SIGKILLed mid-job.
    env.create_job("kill").await;
    let (_, worker_b) = env.wait_running("kill").await;
    assert_ne!(worker_a, worker_b);
    assert_eq!(env.replicas().await, Some(2), "two jobs, two workers");
    env.kubelet.signal_pod(&worker_b, "-KILL");
    let worker_b_ref = &worker_b;
    env.wait_for("the killed worker restarted", move || async move {
        (env.kubelet.restarts(worker_b_ref) >= 1).then_some(())
    })
    .await;
    env.release("kill");
    env.release("rex");

    // `kubectl wait`, as a user scripts it.
    let out = env
        .kubectl(&[
            "wait",
            "--for=condition=Complete",
            "inpaintjob/rex",
            "-n",
            &ns,
            "--timeout=120s",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(out.contains("condition met"), "{out}");
    let rex = env.check_succeeded("rex", 1).await;
    assert_eq!(rex.worker.as_deref(), Some(worker_a.as_str()));

    env.wait_phase("kill", JobPhase::Succeeded).await;
    let killed = env.check_succeeded("kill", 2).await;
    let uid = env.job("kill").await.unwrap().uid().unwrap();
    let events = queue_events(&env.redis_url, &env.queue, &format!("{ns}/{POOL}")).await;
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
    // The restart shows in the pod's status, as `kubectl get pods` shows it.
    let restarted = Api::<Pod>::namespaced(env.client.clone(), &ns)
        .get(&worker_b)
        .await
        .unwrap();
    let restart_count = restarted
        .status
        .and_then(|s| s.container_statuses)
        .and_then(|c| c.first().map(|c| c.restart_count));
    assert_eq!(restart_count, Some(1));

    // Kubernetes Events on the jobs.
    let rex_events = env.event_reasons("rex").await;
    for want in [reasons::ENQUEUED, reasons::CLAIMED, reasons::SUCCEEDED] {
        assert!(
            rex_events.iter().any(|r| r == want),
            "{want} missing: {rex_events:?}"
        );
    }

    // 4. Idle: back to zero after the scale-down delay.
    env.wait_replicas(0).await;
    let ps = env.pool_status().await.unwrap();
    assert_eq!(
        (ps.desired_replicas, ps.queue.waiting, ps.queue.running),
        (0, 0, 0)
    );

    // 5. A burst: up to maxReplicas; down to the one busy worker; to zero.
    let burst: Vec<String> = (0..5).map(|i| format!("burst-{i}")).collect();
    for b in &burst {
        env.create_job(b).await;
    }
    env.wait_replicas(MAX_REPLICAS as i32).await;
    let burst_ref = &burst;
    let running: Vec<(String, String)> = env
        .wait_for("three burst jobs running", move || async move {
            let mut r = Vec::new();
            for b in burst_ref {
                if let Some(s) = env.job_status(b).await
                    && s.phase == Some(JobPhase::Running)
                    && s.progress.is_some()
                {
                    r.push((b.clone(), s.worker.clone().unwrap_or_default()));
                }
            }
            (r.len() == MAX_REPLICAS as usize).then_some(r)
        })
        .await;
    let mut waiting = 0;
    for b in &burst {
        if env.phase(b).await == Some(JobPhase::Queued) {
            waiting += 1;
        }
    }
    assert_eq!(waiting, burst.len() - MAX_REPLICAS as usize);
    let ps = env
        .wait_for("pool status at the peak", move || async move {
            env.pool_status().await.filter(|s| {
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
    assert_eq!(env.phase(&kept_job).await, Some(JobPhase::Running));
    // The operator marked it busy: highest deletion cost, not evictable.
    let ann = env.pod_annotations(&kept_pod).await;
    assert_eq!(
        ann.get(pool::DELETION_COST).map(String::as_str),
        Some(pool::BUSY_COST),
        "{ann:?}"
    );
    assert_eq!(
        ann.get(pool::SAFE_TO_EVICT).map(String::as_str),
        Some("false"),
        "{ann:?}"
    );
    assert!(
        !env.kubelet.terminations().iter().any(|t| t.pod == kept_pod),
        "the busy worker got SIGTERM"
    );
    env.release(&kept_job);
    env.wait_phase(&kept_job, JobPhase::Succeeded).await;
    env.check_succeeded(&kept_job, 1).await;
    env.wait_replicas(0).await;

    // 6. A running job deleted: cancelled in the queue, its output never written.
    env.create_job("gone").await;
    env.wait_running("gone").await;
    let gone_uid = env.job("gone").await.unwrap().uid().unwrap();
    env.kubectl(&["delete", "inpaintjob", "gone", "-n", &ns, "--timeout=60s"])
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(env.job("gone").await.is_none(), "kubectl delete returned");
    env.release("gone");
    let gone_uid_ref = &gone_uid;
    let state = env
        .wait_for(
            "the deleted job cancelled in the queue",
            move || async move {
                let rec = env
                    .queue
                    .get_job(&format!("{}/{POOL}", env.ns), gone_uid_ref)
                    .await
                    .ok()
                    .flatten()?;
                matches!(rec.state, JobState::Cancelled).then_some(rec.state)
            },
        )
        .await;
    assert!(matches!(state, JobState::Cancelled));
    assert!(
        !env.output_file("gone").exists(),
        "a cancelled job wrote its output"
    );
    let gone_reasons: Vec<String> = Api::<Event>::namespaced(env.client.clone(), &ns)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.uid.as_deref()) == Some(gone_uid.as_str()))
        .filter_map(|e| e.reason)
        .collect();
    assert!(
        gone_reasons.iter().any(|r| r == reasons::CANCELLED),
        "{gone_reasons:?}"
    );
    env.wait_replicas(0).await;

    // 7. The leader SIGKILLed mid-job: the standby takes the Lease over.
    env.create_job("failover").await;
    env.wait_running("failover").await;
    let leader = env.leader().await.expect("a leader");
    let (lead, standby) = if env.operators[0].identity == leader {
        (0, 1)
    } else {
        (1, 0)
    };
    env.operators[lead].kill_and_hold();
    env.release("failover");
    let standby_id = env.operators[standby].identity.clone();
    let standby_ref = &standby_id;
    env.wait_for("the standby leads", move || async move {
        (env.leader().await.as_ref() == Some(standby_ref)).then_some(())
    })
    .await;
    env.wait_phase("failover", JobPhase::Succeeded).await;
    env.check_succeeded("failover", 1).await;
    env.operators[lead].resume();
    env.wait_replicas(0).await;

    // 8. The API server SIGKILLed and restarted while a job runs.
    env.create_job("restart").await;
    env.wait_running("restart").await;
    env.release("restart");
    tokio::task::block_in_place(|| env.cp.restart("kube-apiserver"))
        .unwrap_or_else(|e| panic!("{e}"));
    env.wait_phase("restart", JobPhase::Succeeded).await;
    env.check_succeeded("restart", 1).await;
    // Watches resumed: a job created after the restart runs too.
    env.create_job("after").await;
    env.release("after");
    env.wait_phase("after", JobPhase::Succeeded).await;
    env.check_succeeded("after", 1).await;
    env.wait_replicas(0).await;

    // 9. Fields owned by others survive the operator's apply.
    env.kubectl(&[
        "annotate",
        "deployment",
        DEPLOYMENT,
        "-n",
        &ns,
        "team.example.com/owner=ml-platform",
    ])
    .unwrap_or_else(|e| panic!("{e}"));
    env.kubectl(&["rollout", "restart", "deployment", DEPLOYMENT, "-n", &ns])
        .unwrap_or_else(|e| panic!("{e}"));
    env.pools()
        .patch(
            POOL,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"scaleDownDelaySeconds": 4}})),
        )
        .await
        .unwrap();
    env.wait_for("the pool at generation 2", move || async move {
        env.pool_status()
            .await
            .filter(|s| s.observed_generation == Some(2))
    })
    .await;
    let d = env.deployment().await.unwrap();
    let annotations = d.metadata.annotations.clone().unwrap_or_default();
    assert_eq!(
        annotations
            .get("team.example.com/owner")
            .map(String::as_str),
        Some("ml-platform"),
        "{annotations:?}"
    );
    let template_annotations = d
        .spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.annotations.clone())
        .unwrap_or_default();
    assert!(
        template_annotations.contains_key("kubectl.kubernetes.io/restartedAt"),
        "{template_annotations:?}"
    );
    let managers: Vec<String> = d
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter_map(|f| f.manager.clone())
        .collect();
    assert!(
        managers.iter().any(|m| m.starts_with("kubectl")),
        "{managers:?}"
    );

    // 10. The pool deleted: its Deployment and ReplicaSets are garbage-collected.
    env.pools()
        .delete(POOL, &DeleteParams::default())
        .await
        .unwrap();
    env.wait_for("the worker Deployment collected", move || async move {
        let rs = Api::<ReplicaSet>::namespaced(env.client.clone(), &env.ns)
            .list(&ListParams::default())
            .await
            .ok()?;
        (env.deployment().await.is_none() && rs.items.is_empty()).then_some(())
    })
    .await;

    // Across all phases.
    assert!(
        env.kubelet.max_active() <= MAX_REPLICAS as usize,
        "pods above maxReplicas: {}",
        env.kubelet.max_active()
    );
    let terms = env.kubelet.terminations();
    assert!(terms.len() >= MAX_REPLICAS as usize + 2, "{terms:?}");
    for t in &terms {
        assert!(
            !t.busy,
            "a busy worker got SIGTERM: {t:?}\n{}",
            env.dump().await
        );
        assert_eq!(t.deletion_cost.as_deref(), Some("0"), "{t:?}");
        assert_eq!(t.exit, Some(Some(0)), "{t:?}");
    }
    assert_eq!(env.kubelet.problems(), Vec::<String>::new());
    let errors: Vec<String> = env
        .operators
        .iter()
        .flat_map(|o| {
            o.log()
                .lines()
                .filter(|l| l.contains("\"level\":\"ERROR\"") && l.contains("reconcile"))
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect();
    eprintln!(
        "e2e: {} s, {} pods SIGTERMed, operator starts {:?}, {} reconcile errors logged",
        started.elapsed().as_secs(),
        terms.len(),
        env.operators.iter().map(|o| o.starts()).collect::<Vec<_>>(),
        errors.len()
    );

    stop_tx.send_replace(true);
    kubelet_task.await.unwrap();
    phases_task.abort();
}

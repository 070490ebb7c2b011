//! Soak: the whole system under the faults a cluster throws at it, then every job accounted for.
//!
//! The real control plane (kube-apiserver, etcd, kube-controller-manager), a real `redis-server`
//! with `appendfsync always`, the real operator binary (two replicas, leader election through a
//! Lease, the chart's RBAC), a pool of real `pawfect-worker serve` processes on the fixture
//! models (`kubelet.rs` runs them), and `PAWFECT_SOAK_JOBS` InpaintJobs (default 60) applied in
//! waves: normal and high priority, some with an explicit prompt, some with bad inputs that must
//! fail with their reason, some deleted while they run. After each wave one fault fires (a fault
//! on a busy worker first adds jobs held busy until it is done, the "anchors"), in an
//! order drawn from `PAWFECT_SOAK_SEED` (default 1), every kind at least once:
//!
//! - a busy worker SIGKILLed;
//! - the leading operator SIGKILLed (the standby takes the Lease over);
//! - kube-apiserver SIGKILLed and restarted; etcd SIGKILLed and restarted;
//! - Redis SIGKILLed and restarted on its AOF;
//! - Redis stopped for `PAWFECT_SOAK_REDIS_OUTAGE_S` (default 30) seconds, longer than the lease:
//!   workers and operator ride it out without a restart;
//! - a busy worker frozen (SIGSTOP) until its job was taken over, then resumed: its late
//!   completion and its late write must not win;
//! - a worker SIGTERMed while it loads its models: it exits 0, not by the signal.
//!
//! At the end, from the API server and the queue both: every job Succeeded (with its output,
//! unchanged since the moment it was first seen Succeeded), Failed with the reason its bad input
//! calls for, or — deleted — Cancelled in the queue with no output; 0 lost, 0 stuck, no phase
//! going backwards, every status equal to the queue's record, no entry left in the pool's
//! streams, the pool back to zero replicas, no worker the operator knew busy chosen for a
//! scale-down and every scaled-down worker exiting cleanly. One
//! JSON line `soak-summary: {…}` (also written to `PAWFECT_SOAK_SUMMARY` when set); the test
//! fails listing every violation. `bench/soak.sh` runs the long form.

mod cluster;
// Shared with the phased test, which uses more of them (holding a replica down, pod logs).
#[allow(dead_code)]
mod kubelet;
#[allow(dead_code)]
mod operator;

#[allow(dead_code, clippy::all)]
#[path = "../../worker/tests/common/mod.rs"]
mod common;

use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::http::{Route, Server};
use common::jobs::{Inputs, photo, png_rgb};
use common::models::models_dir;
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use pawfect_api::{InpaintJob, InpaintPool, JobPhase};
use pawfect_control_plane::ControlPlane;
use pawfect_queue::testing::{RedisServer, RedisServerOptions};
use pawfect_queue::{JobState, Queue};
use serde_json::json;
use tokio::sync::watch;

use cluster::{SYSTEM_NS, node_names, queue, start_operators, tail};
use kubelet::Kubelet;
use operator::Replica;

const POOL: &str = "soak";
const DEPLOYMENT: &str = "soak-worker";
const PREFIX: &str = "soak";
const MAX_REPLICAS: u32 = 3;
/// The workers' lease: a frozen or killed worker's job is taken over after this.
const LEASE: Duration = Duration::from_secs(2);
/// Attempts of a good job: each worker kill, freeze or outage may cost one; far more than any
/// seed's faults can take from one job.
const MAX_ATTEMPTS: u32 = 10;
/// Longest wait for anything eventual (a fault's effect, a wave to drain): generous for a
/// two-core runner under load.
const WAIT: Duration = Duration::from_secs(240);

/// The run's knobs, from the environment.
struct Config {
    jobs: usize,
    seed: u64,
    redis_outage: Duration,
    summary: Option<PathBuf>,
}

impl Config {
    fn from_env() -> Config {
        let num = |name: &str, default: u64| -> u64 {
            std::env::var(name)
                .ok()
                .map(|v| {
                    v.parse()
                        .unwrap_or_else(|_| panic!("{name}={v:?} is not a number"))
                })
                .unwrap_or(default)
        };
        Config {
            jobs: num("PAWFECT_SOAK_JOBS", 60) as usize,
            seed: num("PAWFECT_SOAK_SEED", 1),
            redis_outage: Duration::from_secs(num("PAWFECT_SOAK_REDIS_OUTAGE_S", 30)),
            summary: std::env::var_os("PAWFECT_SOAK_SUMMARY").map(PathBuf::from),
        }
    }
}

/// SplitMix64: a seeded schedule that is the same on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Fault {
    KillBusyWorker,
    KillLeader,
    RestartApiServer,
    RestartEtcd,
    KillRedis,
    RedisOutage,
    FreezeWorker,
    TermWhileLoading,
}

const FAULTS: [Fault; 8] = [
    Fault::KillBusyWorker,
    Fault::KillLeader,
    Fault::RestartApiServer,
    Fault::RestartEtcd,
    Fault::KillRedis,
    Fault::RedisOutage,
    Fault::FreezeWorker,
    Fault::TermWhileLoading,
];

/// A bad input and the reason its job must fail with (all refused before the model, never
/// retried).
const BAD_INPUTS: [(&str, &str, &str); 4] = [
    ("text.png", "mask.png", "InvalidImage"),
    ("truncated.png", "mask.png", "InvalidImage"),
    ("photo.png", "mask-empty.png", "EmptyMask"),
    ("photo.png", "mask-wrong-aspect.png", "MaskSizeMismatch"),
];

#[derive(Clone, Debug, PartialEq, Eq)]
enum Kind {
    Normal,
    High,
    Prompt,
    Bad {
        reason: &'static str,
    },
    Deleted,
    /// Created by a fault that needs busy workers; its photo is held until the fault is done,
    /// then it must succeed like any good job.
    Anchor,
}

#[derive(Clone, Debug)]
struct Planned {
    name: String,
    kind: Kind,
}

/// The jobs, one in ten of each special kind, in a seeded order.
fn plan(jobs: usize, rng: &mut Rng) -> Vec<Planned> {
    let mut v: Vec<Planned> = (0..jobs)
        .map(|i| {
            let kind = match i % 10 {
                0 => {
                    let (_, _, reason) = BAD_INPUTS[(i / 10) % BAD_INPUTS.len()];
                    Kind::Bad { reason }
                }
                1 => Kind::Deleted,
                2 | 3 => Kind::High,
                4 | 5 => Kind::Prompt,
                _ => Kind::Normal,
            };
            Planned {
                name: format!("j{i:05}"),
                kind,
            }
        })
        .collect();
    rng.shuffle(&mut v);
    v
}

/// What the phase watch saw of each job: its phases in order (repeats folded) and the hash of
/// its output at the moment it was first seen Succeeded.
#[derive(Default)]
struct Seen {
    phases: HashMap<String, Vec<JobPhase>>,
    output_at_success: HashMap<String, Option<u64>>,
}

fn file_hash(path: &Path) -> Option<u64> {
    let bytes = std::fs::read(path).ok()?;
    let mut h = DefaultHasher::new();
    bytes.hash(&mut h);
    Some(h.finish())
}

struct Env {
    cp: ControlPlane,
    client: Client,
    ns: String,
    kubelet: Kubelet,
    queue: Queue,
    redis: Mutex<RedisServer>,
    inputs: Inputs,
    http: Server,
    gates: Mutex<HashMap<String, watch::Sender<bool>>>,
    operators: Vec<Replica>,
    seen: Arc<Mutex<Seen>>,
    /// While this file is absent, a starting worker holds in its model loading.
    load_gate: PathBuf,
    /// Every violation found, with what the test was doing.
    violations: Mutex<Vec<String>>,
    /// Faults fired, by kind.
    fired: Mutex<BTreeMap<String, u32>>,
    /// Uid of every job created.
    uids: Mutex<HashMap<String, String>>,
    redis_outage: Duration,
    /// The pods' log files (`<pod>.<restart>.log`).
    logs: PathBuf,
    /// Jobs the faults created ([`Kind::Anchor`]), accounted for with the planned ones.
    anchors: Mutex<Vec<Planned>>,
}

impl Env {
    fn jobs(&self) -> Api<InpaintJob> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    fn output_path(&self, name: &str) -> PathBuf {
        self.inputs.root.join("out").join(format!("{name}.png"))
    }

    fn violation(&self, v: String) {
        eprintln!("soak: VIOLATION: {v}");
        self.violations.lock().unwrap().push(v);
    }

    async fn create(&self, p: &Planned) {
        let mut spec = json!({
            "image": self.inputs.uri("photo.png"),
            "mask": self.inputs.uri("mask.png"),
            "output": self.inputs.out(&format!("{}.png", p.name)),
            "pool": POOL,
            "steps": 2,
            "seed": 7,
            "maxAttempts": MAX_ATTEMPTS,
        });
        match &p.kind {
            Kind::Normal => {}
            Kind::High => spec["priority"] = json!("high"),
            Kind::Prompt => spec["prompt"] = json!("short green grass, soft daylight"),
            Kind::Bad { reason } => {
                let (image, mask, _) = BAD_INPUTS
                    .iter()
                    .find(|(_, _, r)| r == reason)
                    .expect("a bad input of this reason");
                spec["image"] = json!(self.inputs.uri(image));
                spec["mask"] = json!(self.inputs.uri(mask));
            }
            Kind::Deleted | Kind::Anchor => {
                // Its photo is held (until the job is deleted, or the fault is done), so it
                // is still running when that happens.
                let path = format!("/{}.png", p.name);
                let (tx, rx) = watch::channel(false);
                self.http.route(
                    &path,
                    Route {
                        gate: Some(rx),
                        ..Route::ok(png_rgb(&photo(self.inputs.width, self.inputs.height)))
                    },
                );
                self.gates.lock().unwrap().insert(p.name.clone(), tx);
                spec["image"] = json!(self.http.url(&path));
            }
        }
        let job: InpaintJob = serde_json::from_value(json!({
            "apiVersion": "inpaint.pawfect.dev/v1alpha1",
            "kind": "InpaintJob",
            "metadata": {"name": p.name, "namespace": self.ns},
            "spec": spec,
        }))
        .expect("an InpaintJob");
        // The API server may be restarting: try until it takes the job.
        let deadline = Instant::now() + WAIT;
        loop {
            match self.jobs().create(&PostParams::default(), &job).await {
                Ok(created) => {
                    let uid = created.uid().unwrap_or_default();
                    self.uids.lock().unwrap().insert(p.name.clone(), uid);
                    return;
                }
                // Created by an earlier try whose reply was lost.
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    if let Ok(j) = self.jobs().get(&p.name).await {
                        let uid = j.uid().unwrap_or_default();
                        self.uids.lock().unwrap().insert(p.name.clone(), uid);
                    }
                    return;
                }
                Err(e) if Instant::now() < deadline => {
                    eprintln!("soak: create {}: {e} (retrying)", p.name);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => panic!("create job {}: {e}", p.name),
            }
        }
    }

    async fn wait_for<T, F, Fut>(&self, what: &str, mut f: F) -> Option<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Option<T>>,
    {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(v) = f().await {
                return Some(v);
            }
            if Instant::now() > deadline {
                self.violation(format!("timed out waiting for {what}"));
                return None;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// A job Running on a live pod of this kubelet, with its worker.
    async fn busy_job(&self) -> Option<(String, String)> {
        let jobs = self.jobs().list(&ListParams::default()).await.ok()?;
        let pods = self.kubelet.active_pods();
        jobs.items.into_iter().find_map(|j| {
            let s = j.status.as_ref()?;
            let w = s.worker.clone()?;
            let deleting = j.metadata.deletion_timestamp.is_some();
            (s.phase == Some(JobPhase::Running) && !deleting && pods.contains_key(&w))
                .then(|| (j.name_any(), w))
        })
    }

    async fn leader(&self) -> Option<usize> {
        let leases = Api::<Lease>::namespaced(self.client.clone(), SYSTEM_NS)
            .list(&ListParams::default())
            .await
            .ok()?;
        let holder = leases
            .items
            .into_iter()
            .find_map(|l| l.spec?.holder_identity)?;
        self.operators.iter().position(|o| o.identity == holder)
    }

    fn redis<T>(&self, f: impl FnOnce(&mut RedisServer) -> T) -> T {
        tokio::task::block_in_place(|| f(&mut self.redis.lock().unwrap()))
    }

    async fn fire(&self, fault: Fault) {
        eprintln!("soak: fault {fault:?}");
        let t = Instant::now();
        // A fault on a busy worker gets one (two for a freeze: another worker must take the
        // frozen one's job over) that stays busy until the fault is done, however quickly the
        // wave's own jobs finished.
        let held = match fault {
            Fault::KillBusyWorker => 1,
            Fault::FreezeWorker => 2,
            _ => 0,
        };
        let mut anchors = Vec::new();
        for _ in 0..held {
            let n = self.anchors.lock().unwrap().len();
            let a = Planned {
                name: format!("anchor{n:04}"),
                kind: Kind::Anchor,
            };
            self.create(&a).await;
            self.anchors.lock().unwrap().push(a.clone());
            anchors.push(a.name);
        }
        self.fire_now(fault).await;
        for name in &anchors {
            if let Some(g) = self.gates.lock().unwrap().get(name) {
                g.send_replace(true);
            }
        }
        *self
            .fired
            .lock()
            .unwrap()
            .entry(format!("{fault:?}"))
            .or_default() += 1;
        eprintln!(
            "soak: fault {fault:?} done in {:.1} s",
            t.elapsed().as_secs_f64()
        );
    }

    async fn fire_now(&self, fault: Fault) {
        match fault {
            Fault::KillBusyWorker => {
                let Some((job, pod)) = self.wait_for("a busy worker", || self.busy_job()).await
                else {
                    return;
                };
                eprintln!("soak: SIGKILL {pod} (running {job})");
                self.kubelet.signal_pod(&pod, "-KILL");
            }
            Fault::KillLeader => {
                let Some(i) = self.wait_for("a leader", || self.leader()).await else {
                    return;
                };
                eprintln!("soak: SIGKILL leader {}", self.operators[i].identity);
                self.operators[i].kill();
            }
            Fault::RestartApiServer | Fault::RestartEtcd => {
                let component = if fault == Fault::RestartEtcd {
                    "etcd"
                } else {
                    "kube-apiserver"
                };
                if let Err(e) = tokio::task::block_in_place(|| self.cp.restart(component)) {
                    self.violation(format!("restart {component}: {e}"));
                }
            }
            Fault::KillRedis => {
                if let Err(e) = self.redis(|r| r.kill().and_then(|()| r.restart())) {
                    self.violation(format!("Redis restart on its AOF: {e}"));
                }
            }
            Fault::RedisOutage => {
                if let Err(e) = self.redis(|r| r.stop()) {
                    self.violation(format!("stop Redis: {e}"));
                }
                tokio::time::sleep(self.redis_outage).await;
                if let Err(e) = self.redis(|r| r.restart()) {
                    self.violation(format!("start Redis after the outage: {e}"));
                }
            }
            Fault::FreezeWorker => {
                // Another live worker must be there to take the job over.
                let Some((job, pod)) = self
                    .wait_for("a busy worker and another one", || async {
                        let busy = self.busy_job().await?;
                        (self.kubelet.active_pods().len() >= 2).then_some(busy)
                    })
                    .await
                else {
                    return;
                };
                eprintln!("soak: SIGSTOP {pod} (running {job})");
                self.kubelet.signal_pod(&pod, "-STOP");
                let (job_ref, pod_ref) = (&job, &pod);
                // Frozen until its job moved on: another worker took it, or it finished
                // there (Succeeded by the other worker, or Cancelled when it was deleted).
                self.wait_for("the frozen worker's job taken over", || async move {
                    let j = self.jobs().get_opt(job_ref).await.ok()?;
                    let Some(j) = j else { return Some(()) };
                    let s = j.status?;
                    let moved = s.worker.as_deref() != Some(pod_ref.as_str())
                        || matches!(
                            s.phase,
                            Some(JobPhase::Succeeded | JobPhase::Failed | JobPhase::Cancelled)
                        );
                    moved.then_some(())
                })
                .await;
                // A lease more, so its stale attempt is well behind the one that took over.
                tokio::time::sleep(LEASE).await;
                eprintln!("soak: SIGCONT {pod}");
                self.kubelet.signal_pod(&pod, "-CONT");
            }
            Fault::TermWhileLoading => {
                let busy: Vec<String> = match self
                    .queue
                    .busy_workers(&pawfect_operator::queue_pool(&self.ns, POOL))
                    .await
                {
                    Ok(b) => b.into_iter().map(|b| b.worker).collect(),
                    Err(_) => Vec::new(),
                };
                // A live pod, busy if one is (an idle one may be the next scale-down victim,
                // and a deleted pod is not restarted); the wave just created keeps the pool
                // up. Its next start holds in the model loading.
                let busy = &busy;
                let Some(pod) = self
                    .wait_for("a live worker", || async move {
                        let pods = self.kubelet.active_pods();
                        pods.keys()
                            .find(|p| busy.contains(p))
                            .or_else(|| pods.keys().next())
                            .cloned()
                    })
                    .await
                else {
                    return;
                };
                let _ = std::fs::remove_file(&self.load_gate);
                let before = self.kubelet.restarts(&pod);
                self.kubelet.signal_pod(&pod, "-KILL");
                let pod_ref = &pod;
                self.wait_for("the killed worker restarted", || async move {
                    (self.kubelet.restarts(pod_ref) > before).then_some(())
                })
                .await;
                // Loading: the hold's warning is in its log.
                self.wait_for("the worker holding in its model loading", || async move {
                    let restart = self.kubelet.restarts(pod_ref);
                    let log = self.logs.join(format!("{pod_ref}.{restart}.log"));
                    let text = std::fs::read_to_string(log).unwrap_or_default();
                    text.contains("model loading waits").then_some(())
                })
                .await;
                let crashes_before = self.kubelet.crashes().len();
                eprintln!("soak: SIGTERM {pod} while it loads");
                self.kubelet.signal_pod(&pod, "-TERM");
                let exit = self
                    .wait_for("the loading worker's exit", || async move {
                        self.kubelet
                            .crashes()
                            .into_iter()
                            .skip(crashes_before)
                            .find(|(p, _)| p == pod_ref)
                            .map(|(_, status)| status)
                    })
                    .await;
                std::fs::write(&self.load_gate, b"").unwrap();
                if let Some(exit) = exit
                    && exit != "exit status: 0"
                {
                    self.violation(format!(
                        "a worker SIGTERMed while loading ended with {exit}, not a clean exit"
                    ));
                }
            }
        }
    }

    /// Deletes each job of kind Deleted once it runs, then lets its held photo go.
    async fn delete_when_running(&self, name: String) {
        let name_ref = &name;
        self.wait_for(
            &format!("job {name} running, to delete it"),
            || async move {
                let s = self.jobs().get_opt(name_ref).await.ok()??.status?;
                (s.phase == Some(JobPhase::Running)).then_some(())
            },
        )
        .await;
        let deadline = Instant::now() + WAIT;
        loop {
            match self.jobs().delete(&name, &DeleteParams::default()).await {
                Ok(_) => break,
                Err(kube::Error::Api(s)) if s.code == 404 => break,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("soak: delete {name}: {e} (retrying)");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => {
                    self.violation(format!("delete {name}: {e}"));
                    break;
                }
            }
        }
        // Gone from the API (the operator's finalizer cancelled it in the queue), then the
        // photo is let go: the attempt must notice the cancel and write nothing.
        self.wait_for(&format!("deleted job {name} gone"), || async move {
            match self.jobs().get_opt(name_ref).await {
                Ok(None) => Some(()),
                _ => None,
            }
        })
        .await;
        if let Some(g) = self.gates.lock().unwrap().get(&name) {
            g.send_replace(true);
        }
    }

    /// Jobs not yet finished (deleted ones count until gone).
    async fn outstanding(&self) -> Option<usize> {
        let jobs = self.jobs().list(&ListParams::default()).await.ok()?;
        Some(
            jobs.items
                .iter()
                .filter(|j| {
                    !matches!(
                        j.status.as_ref().and_then(|s| s.phase),
                        Some(JobPhase::Succeeded | JobPhase::Failed | JobPhase::Cancelled)
                    )
                })
                .count(),
        )
    }
}

/// Records every job's phases, and the output's hash the first time it is seen Succeeded.
fn watch_jobs(client: Client, ns: &str, out_dir: PathBuf, seen: Arc<Mutex<Seen>>) {
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
            let name = job.name_any();
            let mut seen = seen.lock().unwrap();
            let phases = seen.phases.entry(name.clone()).or_default();
            if phases.last() != Some(&phase) {
                phases.push(phase);
            }
            if phase == JobPhase::Succeeded && !seen.output_at_success.contains_key(&name) {
                let hash = file_hash(&out_dir.join(format!("{name}.png")));
                seen.output_at_success.insert(name, hash);
            }
        }
    });
}

/// The queue's record of a job, read again while the connection recovers from the Redis
/// restarts the soak made (a call on a connection broken by one fails once).
async fn get_job(
    queue: &Queue,
    pool: &str,
    uid: &str,
) -> Result<Option<pawfect_queue::JobRecord>, pawfect_queue::QueueError> {
    let mut last = None;
    for _ in 0..20 {
        match queue.get_job(pool, uid).await {
            Err(e) if e.is_transient() => {
                last = Some(e);
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            other => return other,
        }
    }
    Err(last.expect("an error after retries"))
}

/// `succeeded` entries of the queue's events stream, by job uid.
async fn completions_by_uid(url: &str, events: &str) -> HashMap<String, u32> {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(events)
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    let field = |e: &redis::streams::StreamId, k: &str| -> Option<String> {
        <String as redis::FromRedisValue>::from_redis_value_ref(e.map.get(k)?).ok()
    };
    let mut n = HashMap::new();
    for e in &reply.ids {
        if field(e, "type").as_deref() == Some("succeeded")
            && let Some(uid) = field(e, "uid")
        {
            *n.entry(uid).or_default() += 1;
        }
    }
    n
}

fn rank(p: JobPhase) -> u8 {
    match p {
        JobPhase::Pending => 0,
        JobPhase::Queued => 1,
        JobPhase::Running => 2,
        JobPhase::Succeeded | JobPhase::Failed | JobPhase::Cancelled => 3,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_under_faults() {
    let cfg = Config::from_env();
    let started = Instant::now();
    let mut rng = Rng(cfg.seed);
    let planned = plan(cfg.jobs, &mut rng);

    let cp = ControlPlane::start().unwrap_or_else(|e| panic!("the control plane: {e}"));
    let client = cp.client().await;
    let redis = RedisServer::start_with(RedisServerOptions {
        aof: true,
        ..Default::default()
    })
    .unwrap();
    let redis_url = redis.url();
    let tmp = tempfile::tempdir().unwrap();
    let inputs = Inputs::create(tmp.path());
    let models = models_dir(tmp.path());
    let logs = tmp.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let load_gate = tmp.path().join("models-may-load");
    std::fs::write(&load_gate, b"").unwrap();
    let http = Server::start().await;
    let connect = || queue(&redis_url, PREFIX);
    let operators = start_operators(
        &cp,
        &client,
        Path::new(env!("CARGO_BIN_EXE_pawfect-operator-e2e")),
        &redis_url,
        PREFIX,
        &logs,
    )
    .await;
    let ns = cp.namespace(&client, "soak").await;
    let nodes = node_names(&client).await;
    let queue_pool = pawfect_operator::queue_pool(&ns, POOL);
    let kubelet = Kubelet::new(
        client.clone(),
        connect().await,
        &ns,
        &queue_pool,
        nodes,
        PathBuf::from(env!("CARGO_BIN_EXE_pawfect-worker-e2e")),
        &logs,
    );
    let (stop_tx, stop_rx) = watch::channel(false);
    let kubelet_task = tokio::spawn(kubelet.clone().run(stop_rx));
    let seen = Arc::new(Mutex::new(Seen::default()));
    watch_jobs(client.clone(), &ns, inputs.root.join("out"), seen.clone());
    let env = &Env {
        cp,
        client: client.clone(),
        ns: ns.clone(),
        kubelet,
        queue: connect().await,
        redis: Mutex::new(redis),
        inputs,
        http,
        gates: Default::default(),
        operators,
        seen,
        load_gate,
        violations: Default::default(),
        fired: Default::default(),
        uids: Default::default(),
        redis_outage: cfg.redis_outage,
        logs: logs.clone(),
        anchors: Default::default(),
    };

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
                "image": "ghcr.io/pawfect-inpaint/worker:soak",
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
                    {"name": "PAWFECT_LEASE", "value": format!("{}s", LEASE.as_secs())},
                    {"name": "PAWFECT_TEST_FAULTS", "value": format!("hold-load@{}", env.load_gate.display())},
                    {"name": "RUST_LOG", "value": "info"}
                ]
            }
        }
    }))
    .expect("an InpaintPool");
    Api::<InpaintPool>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &pool)
        .await
        .unwrap_or_else(|e| panic!("create pool: {e}"));

    // Waves of jobs, one fault after each; every kind fires at least once.
    let waves = FAULTS.len().max(cfg.jobs / 10).max(1);
    let mut schedule = Vec::new();
    while schedule.len() < waves {
        let mut round = FAULTS.to_vec();
        rng.shuffle(&mut round);
        schedule.extend(round);
    }
    schedule.truncate(waves.max(FAULTS.len()));
    let per_wave = cfg.jobs.div_ceil(waves);
    // Deleted jobs are deleted once they run, concurrently with the waves.
    let (del_tx, mut del_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let deleter = async {
        let mut deleting = futures::stream::FuturesUnordered::new();
        let mut open = true;
        loop {
            tokio::select! {
                name = del_rx.recv(), if open => match name {
                    Some(name) => deleting.push(env.delete_when_running(name)),
                    None => open = false,
                },
                Some(()) = deleting.next(), if !deleting.is_empty() => {}
                else => break,
            }
        }
    };
    let waves_done = async {
        for (w, fault) in schedule.iter().enumerate() {
            for p in planned.iter().skip(w * per_wave).take(per_wave) {
                env.create(p).await;
                if p.kind == Kind::Deleted {
                    let _ = del_tx.send(p.name.clone());
                }
            }
            // The fault lands while the wave's jobs are queued or running.
            tokio::time::sleep(Duration::from_millis(200 * rng.below(10) as u64)).await;
            env.fire(*fault).await;
            // Keep the backlog bounded, so every wave's fault meets a system at work, not a
            // flood.
            env.wait_for("the backlog to shrink", || async {
                env.outstanding()
                    .await
                    .filter(|n| *n <= 2 * MAX_REPLICAS as usize + per_wave)
                    .map(|_| ())
            })
            .await;
        }
        drop(del_tx);
    };
    tokio::join!(waves_done, deleter);

    // Drain: every job finished, the pool back at zero.
    env.wait_for("every job finished", || async {
        env.outstanding().await.filter(|n| *n == 0).map(|_| ())
    })
    .await;
    env.wait_for("the pool back at zero replicas", || async {
        let d =
            Api::<k8s_openapi::api::apps::v1::Deployment>::namespaced(env.client.clone(), &env.ns)
                .get_opt(DEPLOYMENT)
                .await
                .ok()??;
        (d.spec.replicas == Some(0) && env.kubelet.all_pods().is_empty()).then_some(())
    })
    .await;
    // The frozen worker's late write, if any, has had time to land (and must not have).
    tokio::time::sleep(LEASE * 2).await;

    // Accounting: every job, from the API server and the queue.
    let api_jobs: HashMap<String, InpaintJob> = env
        .jobs()
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|j| (j.name_any(), j))
        .collect();
    let mut counts: BTreeMap<&str, u32> = BTreeMap::new();
    let (all_phases, output_at_success) = {
        let seen = env.seen.lock().unwrap();
        (seen.phases.clone(), seen.output_at_success.clone())
    };
    let anchors = env.anchors.lock().unwrap().clone();
    for p in planned.iter().chain(&anchors) {
        let api = api_jobs.get(&p.name);
        let phases = all_phases.get(&p.name).cloned().unwrap_or_default();
        if phases.windows(2).any(|w| rank(w[0]) > rank(w[1])) {
            env.violation(format!("{}: phases went backwards: {phases:?}", p.name));
        }
        if p.kind == Kind::Deleted {
            if api.is_some() {
                env.violation(format!("{}: deleted but still in the API", p.name));
            }
            if env.output_path(&p.name).exists() {
                env.violation(format!("{}: deleted, yet its output was written", p.name));
            }
            let uid = env.uids.lock().unwrap().get(&p.name).cloned();
            let state = match &uid {
                Some(uid) => get_job(&env.queue, &queue_pool, uid)
                    .await
                    .ok()
                    .flatten()
                    .map(|r| r.state),
                None => None,
            };
            if state != Some(JobState::Cancelled) {
                env.violation(format!(
                    "{}: deleted, its queue record says {state:?}, not cancelled",
                    p.name
                ));
            }
            *counts.entry("cancelled").or_default() += 1;
            continue;
        }
        let Some(job) = api else {
            env.violation(format!("{}: lost (not in the API)", p.name));
            *counts.entry("lost").or_default() += 1;
            continue;
        };
        let status = job.status.clone().unwrap_or_default();
        let uid = job.uid().unwrap_or_default();
        let rec = match get_job(&env.queue, &queue_pool, &uid).await {
            Ok(Some(r)) => r,
            other => {
                env.violation(format!("{}: no queue record ({other:?})", p.name));
                *counts.entry("lost").or_default() += 1;
                continue;
            }
        };
        let phase = status.phase;
        let want_state = match phase {
            Some(JobPhase::Succeeded) => JobState::Succeeded,
            Some(JobPhase::Failed) => JobState::Failed,
            Some(JobPhase::Cancelled) => JobState::Cancelled,
            other => {
                env.violation(format!(
                    "{}: stuck in {other:?} (queue: {:?})",
                    p.name, rec.state
                ));
                *counts.entry("stuck").or_default() += 1;
                continue;
            }
        };
        if rec.state != want_state {
            env.violation(format!(
                "{}: status says {phase:?}, the queue {:?}",
                p.name, rec.state
            ));
        }
        if status.attempts != Some(rec.attempt) || status.worker != rec.worker {
            env.violation(format!(
                "{}: status attempts/worker {:?}/{:?}, queue {}/{:?}",
                p.name, status.attempts, status.worker, rec.attempt, rec.worker
            ));
        }
        match (&p.kind, phase) {
            (Kind::Bad { reason }, Some(JobPhase::Failed)) => {
                *counts.entry("failed").or_default() += 1;
                if status.reason.as_deref() != Some(reason) || rec.reason.as_deref() != Some(reason)
                {
                    env.violation(format!(
                        "{}: failed with {:?} (queue {:?}), its input calls for {reason}",
                        p.name, status.reason, rec.reason
                    ));
                }
                if env.output_path(&p.name).exists() {
                    env.violation(format!("{}: failed, yet an output exists", p.name));
                }
            }
            (Kind::Bad { reason }, other) => {
                env.violation(format!("{}: bad input ({reason}) ended {other:?}", p.name))
            }
            (_, Some(JobPhase::Succeeded)) => {
                *counts.entry("succeeded").or_default() += 1;
                if status.output != rec.output || status.output.is_none() {
                    env.violation(format!(
                        "{}: output {:?} vs queue {:?}",
                        p.name, status.output, rec.output
                    ));
                }
                let now = file_hash(&env.output_path(&p.name));
                match output_at_success.get(&p.name) {
                    None => env.violation(format!("{}: Succeeded never seen by the watch", p.name)),
                    Some(None) => env.violation(format!(
                        "{}: no output file when it was seen Succeeded",
                        p.name
                    )),
                    Some(at) if *at != now => {
                        *counts.entry("output_replaced").or_default() += 1;
                        env.violation(format!(
                            "{}: its output changed after it was seen Succeeded",
                            p.name
                        ))
                    }
                    Some(_) => {}
                }
                if p.kind == Kind::Prompt
                    && status.prompt_source != Some(pawfect_api::PromptOrigin::Prompt)
                {
                    env.violation(format!(
                        "{}: explicit prompt, source {:?}",
                        p.name, status.prompt_source
                    ));
                }
            }
            (_, other) => env.violation(format!(
                "{}: a good job ended {other:?}: {:?} {:?}",
                p.name, status.reason, status.message
            )),
        }
    }
    // Each job completed once in the queue's own history: a stale attempt (the frozen worker,
    // a killed one's) never completed a job a second time.
    let url = env.redis(|r| r.url());
    let completions = completions_by_uid(&url, &env.queue.keys().events(&queue_pool)).await;
    let uids = env.uids.lock().unwrap().clone();
    for (name, uid) in &uids {
        let n = completions.get(uid).copied().unwrap_or(0);
        if n > 1 {
            env.violation(format!("{name}: {n} succeeded events in the queue"));
        }
    }
    match env.queue.depth(&queue_pool).await {
        Ok(d) if d.waiting == 0 && d.running == 0 => {}
        other => env.violation(format!("entries left in the pool's streams: {other:?}")),
    }
    // Scale-down victims: the operator must only pick pods it marked idle (deletion cost 0),
    // and each must exit cleanly. One that claimed a job between the operator's decision and
    // the SIGTERM (under a steady flow of jobs that race is inherent) drains it: it finishes
    // the job or hands it back, which the job checks above account for.
    let mut drained_busy = 0;
    for t in env.kubelet.terminations() {
        if t.deletion_cost.as_deref() != Some("0") {
            env.violation(format!("a worker not marked idle was scaled down: {t:?}"));
        }
        if t.exit != Some(Some(0)) {
            env.violation(format!(
                "a scaled-down worker did not exit cleanly: {t:?}, last lines:\n{}",
                tail(&env.kubelet.logs(&t.pod), 20)
            ));
        }
        if t.busy {
            drained_busy += 1;
        }
    }
    if env.kubelet.max_active() > MAX_REPLICAS as usize {
        env.violation(format!(
            "{} pods at once, above maxReplicas {MAX_REPLICAS}",
            env.kubelet.max_active()
        ));
    }
    for p in env.kubelet.problems() {
        env.violation(format!("kubelet: {p}"));
    }
    let fired = env.fired.lock().unwrap().clone();
    for f in FAULTS {
        if !fired.contains_key(&format!("{f:?}")) {
            env.violation(format!("fault {f:?} never fired"));
        }
    }

    let violations = env.violations.lock().unwrap().clone();
    let summary = json!({
        "seed": cfg.seed,
        "jobs": cfg.jobs,
        "anchor_jobs": anchors.len(),
        "outcomes": counts,
        "faults": fired,
        "worker_crashes": env.kubelet.crashes().len(),
        "worker_sigterms": env.kubelet.terminations().len(),
        "worker_sigterms_busy_drained": drained_busy,
        "operator_starts": env.operators.iter().map(|o| o.starts()).collect::<Vec<_>>(),
        "redis_outage_s": cfg.redis_outage.as_secs(),
        "seconds": started.elapsed().as_secs(),
        "violations": violations.len(),
    });
    println!("soak-summary: {summary}");
    if let Some(path) = &cfg.summary {
        std::fs::write(path, format!("{summary}\n")).unwrap();
    }
    if !violations.is_empty() {
        let mut dump = String::new();
        for op in &env.operators {
            dump.push_str(&format!(
                "operator {} (started {} times), last lines:\n{}\n",
                op.identity,
                op.starts(),
                tail(&op.log(), 30)
            ));
        }
        panic!(
            "{} violations:\n{}\n{dump}",
            violations.len(),
            violations.join("\n")
        );
    }
    stop_tx.send_replace(true);
    kubelet_task.await.unwrap();
}

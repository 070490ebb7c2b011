//! The kubelet and the Deployment/ReplicaSet controllers, played over the fake API server for
//! one worker Deployment: real `pawfect-worker serve` processes as its pods.
//!
//! - Pods follow `spec.replicas` of the Deployment the operator applied. A pod runs the
//!   container of the pod template: its command (`pawfect-worker`, this package's build of the
//!   worker binary), its args with `$(VAR)` references expanded, its env (values and the
//!   `metadata.name` / `metadata.namespace` field references), the model volume's `mountPath`
//!   mapped to its `hostPath`. Each pod has its own network namespace in a cluster; here each
//!   gets its own port on 127.0.0.1 in place of the container port.
//! - Readiness: the template's readiness probe path (`/readyz`) on that port; the pod's Ready
//!   condition and the Deployment's `status.replicas` / `readyReplicas` follow.
//! - Scale-down picks its victims the way the ReplicaSet controller does (`getPodsToDelete`):
//!   not-ready pods first, then the lowest `controller.kubernetes.io/pod-deletion-cost`, then
//!   the youngest. A victim gets a deletionTimestamp and SIGTERM, SIGKILL after
//!   `terminationGracePeriodSeconds`, and leaves the API once its process exited.
//! - A container that exits on its own (a crash, SIGKILL from the test) is restarted in the same
//!   pod (`restartPolicy: Always`).
//!
//! Every SIGTERM is recorded with whether the queue had the pod busy at that moment, which the
//! test asserts never happens: the operator's deletion-cost annotations must steer the scale-down
//! to idle workers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Container;
use pawfect_operator::pool::DELETION_COST;
use pawfect_queue::Queue;
use serde_json::{Value, json};
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::fake_api::{FakeApi, Res};

const TICK: Duration = Duration::from_millis(100);

/// A SIGTERM the kubelet sent to a pod's worker.
#[derive(Clone, Debug)]
pub struct Termination {
    pub pod: String,
    /// The queue had a job claimed by this worker when the signal went.
    pub busy: bool,
    /// The pod's deletion cost annotation then.
    pub deletion_cost: Option<String>,
    /// Exit code once the process exited (None: still running, or killed by a signal).
    pub exit: Option<Option<i32>>,
}

struct PodProc {
    child: Child,
    port: u16,
    ready: bool,
    restarts: u32,
    created: u64,
    terminating: Option<(Instant, Duration)>,
}

#[derive(Default)]
struct Inner {
    pods: BTreeMap<String, PodProc>,
    terminations: Vec<Termination>,
    /// Crashes (container exits without a deletion): pod, exit status.
    crashes: Vec<(String, String)>,
    max_replicas_seen: u32,
    created: u64,
}

/// Handle on the kubelet double.
#[derive(Clone)]
pub struct Kubelet {
    inner: Arc<Mutex<Inner>>,
    api: FakeApi,
    queue: Queue,
    namespace: String,
    deployment: String,
    queue_pool: String,
    worker_bin: PathBuf,
    log_dir: PathBuf,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("a free port")
        .local_addr()
        .expect("bound")
        .port()
}

fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("kubelet: kill {sig} {pid} failed (already gone?)");
    }
}

async fn http_status(port: u16, path: &str) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: pod\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf);
        text.split_whitespace().nth(1)?.parse().ok()
    };
    tokio::time::timeout(Duration::from_secs(2), fut)
        .await
        .ok()
        .flatten()
}

/// Replaces `$(NAME)` by the value of env var NAME (Kubernetes' dependent variable expansion).
fn expand(s: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = s.to_string();
    for (k, v) in env {
        out = out.replace(&format!("$({k})"), v);
    }
    out
}

impl Kubelet {
    pub fn new(
        api: FakeApi,
        queue: Queue,
        namespace: &str,
        deployment: &str,
        queue_pool: &str,
        worker_bin: PathBuf,
        log_dir: &Path,
    ) -> Kubelet {
        Kubelet {
            inner: Arc::default(),
            api,
            queue,
            namespace: namespace.into(),
            deployment: deployment.into(),
            queue_pool: queue_pool.into(),
            worker_bin,
            log_dir: log_dir.to_path_buf(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn terminations(&self) -> Vec<Termination> {
        self.lock().terminations.clone()
    }

    pub fn crashes(&self) -> Vec<(String, String)> {
        self.lock().crashes.clone()
    }

    pub fn max_replicas_seen(&self) -> u32 {
        self.lock().max_replicas_seen
    }

    /// Pods not being deleted, with whether they are ready.
    pub fn active_pods(&self) -> BTreeMap<String, bool> {
        self.lock()
            .pods
            .iter()
            .filter(|(_, p)| p.terminating.is_none())
            .map(|(n, p)| (n.clone(), p.ready))
            .collect()
    }

    /// Every pod with a process, terminating ones included.
    pub fn all_pods(&self) -> Vec<String> {
        self.lock().pods.keys().cloned().collect()
    }

    pub fn restarts(&self, pod: &str) -> u32 {
        self.lock().pods.get(pod).map_or(0, |p| p.restarts)
    }

    /// Sends `sig` (e.g. `-KILL`) to the worker process of `pod`.
    pub fn signal_pod(&self, pod: &str, sig: &str) {
        let pid = self
            .lock()
            .pods
            .get(pod)
            .and_then(|p| p.child.id())
            .unwrap_or_else(|| panic!("pod {pod} has no running process"));
        signal(pid, sig);
    }

    /// Log files of a pod's containers (for failure messages).
    pub fn logs(&self, pod: &str) -> String {
        let mut out = String::new();
        if let Ok(dir) = std::fs::read_dir(&self.log_dir) {
            let mut files: Vec<PathBuf> = dir
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(pod))
                })
                .collect();
            files.sort();
            for f in files {
                out.push_str(&format!("--- {}\n", f.display()));
                out.push_str(&std::fs::read_to_string(&f).unwrap_or_default());
            }
        }
        out
    }

    /// Runs until `stop` turns true, then SIGKILLs whatever still runs.
    pub async fn run(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        loop {
            if *stop.borrow() {
                break;
            }
            self.step().await;
            tokio::select! {
                _ = tokio::time::sleep(TICK) => {}
                _ = stop.changed() => {}
            }
        }
        let mut inner = self.lock();
        for p in inner.pods.values_mut() {
            let _ = p.child.start_kill();
        }
    }

    async fn step(&self) {
        let Some(d) =
            self.api
                .get_as::<Deployment>(Res::Deployments, &self.namespace, &self.deployment)
        else {
            return;
        };
        let spec = d.spec.clone();
        let replicas = u32::try_from(spec.replicas.unwrap_or(1)).unwrap_or(0);
        let template = spec.template.clone();
        let pod_spec = template.spec.clone().unwrap_or_default();
        let container = pod_spec
            .containers
            .first()
            .cloned()
            .expect("the pod template has a container");
        let grace = Duration::from_secs(
            u64::try_from(pod_spec.termination_grace_period_seconds.unwrap_or(30)).unwrap_or(30),
        );

        self.reap();
        let busy = match self.queue.busy_workers(&self.queue_pool).await {
            Ok(b) => b.into_iter().map(|b| b.worker).collect::<Vec<_>>(),
            Err(e) => {
                // Redis goes away when a test fails; otherwise the next tick tries again.
                eprintln!("kubelet: cannot read the queue: {e}");
                return;
            }
        };
        {
            let mut inner = self.lock();
            inner.max_replicas_seen = inner.max_replicas_seen.max(replicas);
            // Grace period over: SIGKILL.
            for p in inner.pods.values_mut() {
                if let Some((since, g)) = p.terminating
                    && since.elapsed() > g
                {
                    let _ = p.child.start_kill();
                }
            }
        }
        let active: Vec<(String, bool, u64)> = self
            .lock()
            .pods
            .iter()
            .filter(|(_, p)| p.terminating.is_none())
            .map(|(n, p)| (n.clone(), p.ready, p.created))
            .collect();
        let n = u32::try_from(active.len()).unwrap_or(u32::MAX);
        if n < replicas {
            for _ in n..replicas {
                self.create_pod(&d, &template, &container);
            }
        } else if n > replicas {
            // The ReplicaSet controller's order: not ready first, then the lowest deletion
            // cost, then the youngest.
            let mut ranked: Vec<(bool, i64, std::cmp::Reverse<u64>, String)> = active
                .iter()
                .map(|(name, ready, created)| {
                    let cost = self.deletion_cost(name);
                    let c = cost.as_deref().and_then(|c| c.parse().ok()).unwrap_or(0);
                    (*ready, c, std::cmp::Reverse(*created), name.clone())
                })
                .collect();
            ranked.sort();
            for (_, _, _, name) in ranked.into_iter().take((n - replicas) as usize) {
                let cost = self.deletion_cost(&name);
                self.api.update(Res::Pods, &self.namespace, &name, |o| {
                    o["metadata"]["deletionTimestamp"] =
                        serde_json::to_value(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                            jiff::Timestamp::now(),
                        ))
                        .expect("time serializes");
                });
                let mut inner = self.lock();
                let Some(p) = inner.pods.get_mut(&name) else {
                    continue;
                };
                p.terminating = Some((Instant::now(), grace));
                if let Some(pid) = p.child.id() {
                    signal(pid, "-TERM");
                }
                inner.terminations.push(Termination {
                    pod: name.clone(),
                    busy: busy.contains(&name),
                    deletion_cost: cost,
                    exit: None,
                });
            }
        }

        // Readiness probes.
        let probe_path = container
            .readiness_probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .and_then(|h| h.path.clone())
            .expect("the worker container has an HTTP readiness probe");
        let unready: Vec<(String, u16)> = self
            .lock()
            .pods
            .iter()
            .filter(|(_, p)| !p.ready && p.terminating.is_none())
            .map(|(n, p)| (n.clone(), p.port))
            .collect();
        for (name, port) in unready {
            if http_status(port, &probe_path).await == Some(200) {
                if let Some(p) = self.lock().pods.get_mut(&name) {
                    p.ready = true;
                }
                self.api.update(Res::Pods, &self.namespace, &name, |o| {
                    o["status"] = json!({"phase": "Running", "conditions": [
                        {"type": "Ready", "status": "True"}
                    ]});
                });
            }
        }

        // Deployment status (the Deployment controller's part).
        let (count, ready) = {
            let inner = self.lock();
            let active = inner.pods.values().filter(|p| p.terminating.is_none());
            let count = active.clone().count();
            let ready = active.filter(|p| p.ready).count();
            (count, ready)
        };
        let generation = d.metadata.generation;
        self.api
            .update(Res::Deployments, &self.namespace, &self.deployment, |o| {
                o["status"] = json!({
                    "observedGeneration": generation,
                    "replicas": count,
                    "updatedReplicas": count,
                    "readyReplicas": ready,
                    "availableReplicas": ready,
                });
            });
    }

    fn deletion_cost(&self, pod: &str) -> Option<String> {
        self.api.get(Res::Pods, &self.namespace, pod).and_then(|o| {
            o["metadata"]["annotations"][DELETION_COST]
                .as_str()
                .map(str::to_string)
        })
    }

    /// Processes that exited: deleted pods leave, others restart.
    fn reap(&self) {
        let mut inner = self.lock();
        let mut gone = Vec::new();
        let mut crashed = Vec::new();
        for (name, p) in inner.pods.iter_mut() {
            if let Ok(Some(status)) = p.child.try_wait() {
                if p.terminating.is_some() {
                    gone.push((name.clone(), status.code()));
                } else {
                    crashed.push((name.clone(), status.to_string()));
                }
            }
        }
        for (name, code) in gone {
            inner.pods.remove(&name);
            if let Some(t) = inner.terminations.iter_mut().rev().find(|t| t.pod == name) {
                t.exit = Some(code);
            }
            self.api.remove(Res::Pods, &self.namespace, &name);
        }
        drop(inner);
        for (name, status) in crashed {
            self.lock().crashes.push((name.clone(), status));
            self.restart(&name);
        }
    }

    fn create_pod(
        &self,
        d: &Deployment,
        template: &k8s_openapi::api::core::v1::PodTemplateSpec,
        c: &Container,
    ) {
        let n = {
            let mut inner = self.lock();
            inner.created += 1;
            inner.created
        };
        let name = format!("{}-{n:05x}", self.deployment);
        let labels = template.metadata.as_ref().and_then(|m| m.labels.clone());
        let annotations = template
            .metadata
            .as_ref()
            .and_then(|m| m.annotations.clone());
        let spec = serde_json::to_value(template.spec.clone()).expect("serializes");
        self.api.create(
            Res::Pods,
            json!({
                "metadata": {
                    "name": name, "namespace": self.namespace,
                    "labels": labels, "annotations": annotations,
                    "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                        "name": d.metadata.name, "uid": d.metadata.uid, "controller": true}]
                },
                "spec": spec,
                "status": {"phase": "Pending"}
            }),
        );
        let (child, port) = self.spawn(&name, c, 0);
        self.lock().pods.insert(
            name,
            PodProc {
                child,
                port,
                ready: false,
                restarts: 0,
                created: n,
                terminating: None,
            },
        );
    }

    fn restart(&self, name: &str) {
        let pod: Value = self
            .api
            .get(Res::Pods, &self.namespace, name)
            .expect("a pod with a process is in the API");
        // The pod's own spec (as the kubelet has it), not the Deployment's current template.
        let c: Container =
            serde_json::from_value(pod["spec"]["containers"][0].clone()).expect("a container");
        let restarts = self.restarts(name) + 1;
        let (child, port) = self.spawn(name, &c, restarts);
        if let Some(p) = self.lock().pods.get_mut(name) {
            p.child = child;
            p.port = port;
            p.ready = false;
            p.restarts = restarts;
        }
        self.api.update(Res::Pods, &self.namespace, name, |o| {
            o["status"] = json!({"phase": "Running", "conditions": [
                {"type": "Ready", "status": "False"}
            ]});
        });
    }

    /// Starts the container of pod `name`.
    fn spawn(&self, name: &str, c: &Container, restart: u32) -> (Child, u16) {
        let pod: Value = self
            .api
            .get(Res::Pods, &self.namespace, name)
            .expect("the pod exists");
        assert_eq!(
            c.command.as_deref(),
            Some(&["pawfect-worker".to_string()][..]),
            "the worker image's command"
        );
        let mut env = BTreeMap::new();
        for e in c.env.iter().flatten() {
            let value = match (&e.value, &e.value_from) {
                (Some(v), None) => expand(v, &env),
                (None, Some(from)) => {
                    let path = from
                        .field_ref
                        .as_ref()
                        .map(|f| f.field_path.as_str())
                        .unwrap_or_else(|| {
                            panic!("env {} needs more than a field reference", e.name)
                        });
                    match path {
                        "metadata.name" => name.to_string(),
                        "metadata.namespace" => self.namespace.clone(),
                        other => panic!("env {}: field {other} not provided", e.name),
                    }
                }
                _ => panic!("env {}: unsupported source", e.name),
            };
            env.insert(e.name.clone(), value);
        }
        // Volume mounts: the mount path stands for the volume's host path.
        let volumes: BTreeMap<String, String> = pod["spec"]["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| {
                Some((
                    v["name"].as_str()?.to_string(),
                    v["hostPath"]["path"].as_str()?.to_string(),
                ))
            })
            .collect();
        let mounts: Vec<(String, String)> = c
            .volume_mounts
            .iter()
            .flatten()
            .filter_map(|m| Some((m.mount_path.clone(), volumes.get(&m.name)?.clone())))
            .collect();
        let http_port = c
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some("http"))
            .map(|p| p.container_port)
            .expect("a port named http");
        let port = free_port();
        let args: Vec<String> = c
            .args
            .iter()
            .flatten()
            .map(|a| {
                let mut a = expand(a, &env);
                if a == format!("0.0.0.0:{http_port}") {
                    a = format!("127.0.0.1:{port}");
                }
                for (mount, host) in &mounts {
                    if let Some(rest) = a.strip_prefix(mount.as_str())
                        && (rest.is_empty() || rest.starts_with('/'))
                    {
                        a = format!("{host}{rest}");
                    }
                }
                a
            })
            .collect();
        let log = self.log_dir.join(format!("{name}.{restart}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(&self.worker_bin)
            .args(&args)
            .env_clear()
            .envs(&env)
            .env("HOME", &self.log_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(file))
            .kill_on_drop(true)
            .spawn()
            .expect("the worker starts");
        (child, port)
    }
}

//! The kubelet's part of a cluster, for the pods of one namespace on the real API server: the real
//! kube-controller-manager creates the worker Deployment's ReplicaSets and Pods and picks the
//! scale-down victims; this plays what a node does with them, with real `pawfect-worker serve`
//! processes as the containers.
//!
//! - Binding: a new pod without a node is bound (`pods/binding`, as the scheduler does) to one of
//!   the fake T4 nodes, round robin.
//! - Running: the pod's container runs as a process: its command (`pawfect-worker`, this
//!   package's build of the worker binary), its args with `$(VAR)` references expanded, its env
//!   (values and the `metadata.name` / `metadata.namespace` / `spec.nodeName` field references),
//!   the volume mounts' paths mapped to their `hostPath`. Each pod gets its own port on
//!   127.0.0.1 in place of the container port (a pod's network namespace in a cluster).
//! - Status: phase, container status (restart count, running/terminated) and the Ready condition
//!   follow the process and the template's HTTP readiness probe, written to `pods/status`.
//! - Deletion: a pod with a deletionTimestamp gets SIGTERM, SIGKILL once its grace period
//!   (`metadata.deletionGracePeriodSeconds`) is over, and is removed from the API (delete with
//!   grace 0 and the pod's UID as precondition) once its process exited.
//! - A container that exits on its own (a crash, SIGKILL from the test) is restarted in the same
//!   pod (`restartPolicy: Always`), its restart count raised.
//! - The API server may be away (a restart under test): the processes keep running and the next
//!   tick catches up, as a kubelet does.
//!
//! Every SIGTERM is recorded with whether the queue had the pod busy at that moment, which the
//! test asserts never happens: the operator's deletion-cost annotations must steer the real
//! ReplicaSet controller's scale-down to idle workers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Pod, Secret};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use kube::{Client, ResourceExt};
use pawfect_operator::pool::DELETION_COST;
use pawfect_queue::Queue;
use serde_json::json;
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::common::process::free_port;

const TICK: Duration = Duration::from_millis(200);

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
    uid: String,
    child: Child,
    port: u16,
    ready: bool,
    restarts: u32,
    /// Since when, and for how long, it may shut down.
    terminating: Option<(Instant, Duration)>,
}

#[derive(Default)]
struct Inner {
    pods: BTreeMap<String, PodProc>,
    terminations: Vec<Termination>,
    /// Crashes (container exits without a deletion): pod, exit status.
    crashes: Vec<(String, String)>,
    /// What the kubelet could not do (a pod it cannot run, an API call refused for good).
    problems: Vec<String>,
    /// Most pods with a process at once, terminating ones excluded.
    max_active: usize,
    bound: usize,
    /// The last pod list failed (printed once per outage).
    api_away: bool,
}

/// Handle on the kubelet.
#[derive(Clone)]
pub struct Kubelet {
    inner: Arc<Mutex<Inner>>,
    pods: Api<Pod>,
    secrets: Api<Secret>,
    queue: Queue,
    namespace: String,
    queue_pool: String,
    nodes: Vec<String>,
    worker_bin: PathBuf,
    log_dir: PathBuf,
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

/// The pod's (only) container.
fn container_of(pod: &Pod) -> Option<Container> {
    pod.spec.as_ref()?.containers.first().cloned()
}

fn now() -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Time {
    k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::now())
}

impl Kubelet {
    pub fn new(
        client: Client,
        queue: Queue,
        namespace: &str,
        queue_pool: &str,
        nodes: Vec<String>,
        worker_bin: PathBuf,
        log_dir: &Path,
    ) -> Kubelet {
        assert!(
            !nodes.is_empty(),
            "the kubelet needs a node to bind pods to"
        );
        Kubelet {
            inner: Arc::default(),
            pods: Api::namespaced(client.clone(), namespace),
            secrets: Api::namespaced(client, namespace),
            queue,
            namespace: namespace.into(),
            queue_pool: queue_pool.into(),
            nodes,
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

    pub fn problems(&self) -> Vec<String> {
        self.lock().problems.clone()
    }

    pub fn max_active(&self) -> usize {
        self.lock().max_active
    }

    /// Pods with a process and no deletion, with whether they are ready.
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
                        .is_some_and(|n| n.starts_with(&format!("{pod}.")))
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

    fn problem(&self, what: String) {
        eprintln!("kubelet: {what}");
        self.lock().problems.push(what);
    }

    async fn step(&self) {
        let listed = match self.pods.list(&ListParams::default()).await {
            Ok(l) => {
                self.lock().api_away = false;
                l.items
            }
            // The API server restarting: the containers keep running, the next tick catches up.
            Err(e) => {
                if !std::mem::replace(&mut self.lock().api_away, true) {
                    eprintln!("kubelet: cannot list pods: {e} (retrying every tick)");
                }
                return;
            }
        };
        self.reap().await;
        let busy = match self.queue.busy_workers(&self.queue_pool).await {
            Ok(b) => b.into_iter().map(|b| b.worker).collect::<Vec<_>>(),
            Err(e) => {
                eprintln!("kubelet: cannot read the queue: {e}");
                return;
            }
        };
        // Pods gone from the API (deleted with grace 0 by someone else): stop their process.
        {
            let mut inner = self.lock();
            let uids: Vec<String> = listed.iter().filter_map(|p| p.uid()).collect();
            inner.pods.retain(|name, p| {
                let keep = uids.contains(&p.uid);
                if !keep {
                    eprintln!("kubelet: pod {name} left the API; stopping its process");
                    let _ = p.child.start_kill();
                }
                keep
            });
        }
        for pod in &listed {
            let name = pod.name_any();
            let uid = pod.uid().unwrap_or_default();
            let known = self.lock().pods.get(&name).is_some_and(|p| p.uid == uid);
            let deleting = pod.metadata.deletion_timestamp.is_some();
            match (known, deleting) {
                (false, false) => {
                    if pod
                        .spec
                        .as_ref()
                        .and_then(|s| s.node_name.as_ref())
                        .is_none()
                    {
                        self.bind_and_start(pod).await;
                    }
                }
                (false, true) => {
                    // Deleted before it ever ran here.
                    self.remove(&name, &uid).await;
                }
                (true, true) => self.terminate(pod, &busy),
                (true, false) => {}
            }
        }
        {
            let mut inner = self.lock();
            for p in inner.pods.values_mut() {
                if let Some((since, grace)) = p.terminating
                    && since.elapsed() > grace
                {
                    let _ = p.child.start_kill();
                }
            }
            let active = inner
                .pods
                .values()
                .filter(|p| p.terminating.is_none())
                .count();
            inner.max_active = inner.max_active.max(active);
        }
        self.probe(&listed).await;
    }

    /// SIGTERM on the first sight of a deletionTimestamp.
    fn terminate(&self, pod: &Pod, busy: &[String]) {
        let name = pod.name_any();
        let grace = Duration::from_secs(
            pod.metadata
                .deletion_grace_period_seconds
                .and_then(|g| u64::try_from(g).ok())
                .unwrap_or(30),
        );
        let cost = pod
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(DELETION_COST).cloned());
        let mut inner = self.lock();
        let Some(p) = inner.pods.get_mut(&name) else {
            return;
        };
        if p.terminating.is_some() {
            return;
        }
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

    /// Deletes the pod object for good (its process is gone).
    async fn remove(&self, name: &str, uid: &str) {
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(uid.to_string()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match self.pods.delete(name, &dp).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
            Err(e) => eprintln!("kubelet: delete pod {name}: {e} (next tick tries again)"),
        }
    }

    /// Processes that exited: deleted pods leave the API, others restart.
    async fn reap(&self) {
        let mut gone = Vec::new();
        let mut crashed = Vec::new();
        {
            let mut inner = self.lock();
            for (name, p) in inner.pods.iter_mut() {
                if let Ok(Some(status)) = p.child.try_wait() {
                    if p.terminating.is_some() {
                        gone.push((name.clone(), p.uid.clone(), status.code()));
                    } else {
                        crashed.push((name.clone(), status.to_string()));
                    }
                }
            }
            for (name, _, code) in &gone {
                inner.pods.remove(name);
                if let Some(t) = inner.terminations.iter_mut().rev().find(|t| t.pod == *name) {
                    t.exit = Some(*code);
                }
            }
        }
        for (name, uid, _) in gone {
            self.remove(&name, &uid).await;
        }
        for (name, status) in crashed {
            self.lock().crashes.push((name.clone(), status));
            self.restart(&name).await;
        }
    }

    async fn bind_and_start(&self, pod: &Pod) {
        let name = pod.name_any();
        let node = {
            let mut inner = self.lock();
            inner.bound += 1;
            self.nodes[inner.bound % self.nodes.len()].clone()
        };
        let binding = json!({
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": name, "uid": pod.uid()},
            "target": {"apiVersion": "v1", "kind": "Node", "name": node},
        });
        if let Err(e) = self
            .pods
            .create_subresource::<_, serde_json::Value>(
                "binding",
                &name,
                &PostParams::default(),
                &binding,
            )
            .await
        {
            // Already bound or deleted meanwhile, or the server away: the next list says.
            eprintln!("kubelet: bind {name} to {node}: {e}");
            return;
        }
        let Some(c) = container_of(pod) else {
            self.problem(format!("pod {name} has no container"));
            return;
        };
        let (child, port) = match self.spawn(pod, &node, &c, 0).await {
            Ok(x) => x,
            Err(e) => {
                self.problem(format!("pod {name}: {e}"));
                return;
            }
        };
        self.lock().pods.insert(
            name.clone(),
            PodProc {
                uid: pod.uid().unwrap_or_default(),
                child,
                port,
                ready: false,
                restarts: 0,
                terminating: None,
            },
        );
        self.write_status(&name, &c.name, false, 0).await;
    }

    async fn restart(&self, name: &str) {
        let pod = match self.pods.get(name).await {
            Ok(p) => p,
            Err(e) => {
                eprintln!("kubelet: restart {name}: {e} (next tick tries again)");
                return;
            }
        };
        // The pod's own spec (as the kubelet has it), not the Deployment's current template.
        let Some(c) = container_of(&pod) else {
            return;
        };
        let node = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default();
        let restarts = self.restarts(name) + 1;
        match self.spawn(&pod, &node, &c, restarts).await {
            Ok((child, port)) => {
                if let Some(p) = self.lock().pods.get_mut(name) {
                    p.child = child;
                    p.port = port;
                    p.ready = false;
                    p.restarts = restarts;
                }
                self.write_status(name, &c.name, false, restarts).await;
            }
            Err(e) => self.problem(format!("restart {name}: {e}")),
        }
    }

    /// Readiness probes of pods not ready yet.
    async fn probe(&self, listed: &[Pod]) {
        let unready: Vec<(String, u16)> = self
            .lock()
            .pods
            .iter()
            .filter(|(_, p)| !p.ready && p.terminating.is_none())
            .map(|(n, p)| (n.clone(), p.port))
            .collect();
        for (name, port) in unready {
            let Some(pod) = listed.iter().find(|p| p.name_any() == name) else {
                continue;
            };
            let Some(c) = pod.spec.as_ref().and_then(|s| s.containers.first()) else {
                continue;
            };
            let Some(path) = c
                .readiness_probe
                .as_ref()
                .and_then(|p| p.http_get.as_ref())
                .and_then(|h| h.path.clone())
            else {
                self.problem(format!("pod {name}: no HTTP readiness probe"));
                continue;
            };
            if http_status(port, &path).await == Some(200) {
                let restarts = self.restarts(&name);
                if self.write_status(&name, &c.name, true, restarts).await
                    && let Some(p) = self.lock().pods.get_mut(&name)
                {
                    p.ready = true;
                }
            }
        }
    }

    /// Writes the pod's status as a kubelet does; whether the server took it.
    async fn write_status(&self, name: &str, container: &str, ready: bool, restarts: u32) -> bool {
        let status = if ready { "True" } else { "False" };
        let t = now();
        let patch = json!({"status": {
            "phase": "Running",
            "hostIP": "127.0.0.1",
            "podIP": "127.0.0.1",
            "podIPs": [{"ip": "127.0.0.1"}],
            "startTime": t,
            "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": t},
                {"type": "Initialized", "status": "True", "lastTransitionTime": t},
                {"type": "ContainersReady", "status": status, "lastTransitionTime": t},
                {"type": "Ready", "status": status, "lastTransitionTime": t},
            ],
            "containerStatuses": [{
                "name": container,
                "image": "pawfect-worker",
                "imageID": "",
                "ready": ready,
                "started": true,
                "restartCount": restarts,
                "state": {"running": {"startedAt": t}},
            }],
        }});
        match self
            .pods
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => true,
            Err(e) => {
                eprintln!("kubelet: status of {name}: {e} (next tick tries again)");
                false
            }
        }
    }

    /// Starts the container `c` of `pod`.
    async fn spawn(
        &self,
        pod: &Pod,
        node: &str,
        c: &Container,
        restart: u32,
    ) -> Result<(Child, u16), String> {
        let name = pod.name_any();
        if c.command.as_deref() != Some(&["pawfect-worker".to_string()][..]) {
            return Err(format!(
                "container command {:?} is not the worker image's `pawfect-worker`",
                c.command
            ));
        }
        let mut env = BTreeMap::new();
        for e in c.env.iter().flatten() {
            let value = match (&e.value, &e.value_from) {
                (Some(v), None) => expand(v, &env),
                (None, None) => String::new(),
                (None, Some(from)) if from.secret_key_ref.is_some() => {
                    // As the kubelet does: the key of a Secret in the pod's namespace.
                    let Some(r) = from.secret_key_ref.as_ref() else {
                        continue;
                    };
                    let secret = self
                        .secrets
                        .get(&r.name)
                        .await
                        .map_err(|err| format!("env {}: Secret {}: {err}", e.name, r.name))?;
                    let bytes = secret
                        .data
                        .as_ref()
                        .and_then(|d| d.get(&r.key))
                        .ok_or_else(|| {
                            format!("env {}: Secret {} has no key {}", e.name, r.name, r.key)
                        })?;
                    String::from_utf8(bytes.0.clone()).map_err(|_| {
                        format!(
                            "env {}: Secret {} key {} is not UTF-8",
                            e.name, r.name, r.key
                        )
                    })?
                }
                (None, Some(from)) => {
                    let path = from
                        .field_ref
                        .as_ref()
                        .map(|f| f.field_path.as_str())
                        .ok_or_else(|| {
                            format!("env {}: only field references are provided here", e.name)
                        })?;
                    match path {
                        "metadata.name" => name.clone(),
                        "metadata.namespace" => self.namespace.clone(),
                        "spec.nodeName" => node.to_string(),
                        other => return Err(format!("env {}: field {other} not provided", e.name)),
                    }
                }
                _ => return Err(format!("env {}: value and valueFrom", e.name)),
            };
            env.insert(e.name.clone(), value);
        }
        // Volume mounts: the mount path stands for the volume's host path.
        let volumes: BTreeMap<String, String> = pod
            .spec
            .iter()
            .flat_map(|s| s.volumes.iter().flatten())
            .filter_map(|v| Some((v.name.clone(), v.host_path.as_ref()?.path.clone())))
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
            .ok_or("no container port named http")?;
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
        let file = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
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
            .map_err(|e| format!("{}: {e}", self.worker_bin.display()))?;
        Ok((child, port))
    }
}

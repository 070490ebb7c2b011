//! Scale: many InpaintJobs through the operator on the real control plane, measured.
//!
//! The real control plane, a real `redis-server`, the operator binary (two replicas, leader
//! election, the chart's RBAC), `PAWFECT_SCALE_POOLS` pools (default 5, one namespace each,
//! `maxReplicas` 3) of real `pawfect-worker serve` processes with the fast stand-in model
//! (`PAWFECT_TEST_FAST_MODEL`: no model, every other stage real), and `PAWFECT_SCALE_JOBS`
//! InpaintJobs (default 10 000) created at `PAWFECT_SCALE_RATE` jobs/s (default 50), round robin
//! over the pools. Measured:
//!
//! - the operator's CPU seconds and peak RSS (`/proc`, both replicas, sampled every second);
//! - API requests by resource and verb, from kube-apiserver's own `apiserver_request_total`
//!   (before and after), per job for the resources the operator writes;
//! - status lag: from the job's `finished_at` in the queue (Redis clock) to the moment a watch
//!   on the API server sees `status.phase: Succeeded` (same host clock), p50 / p99 / max;
//! - throughput: jobs Succeeded per second between the first and the last.
//! - the reconcile queue: the operators' `pawfect_operator_reconcile_queue_depth` sampled every
//!   second (max and mean, per controller) and the `…_queue_wait_seconds` histogram at the end
//!   (p50/p99 as the upper bound of their bucket);
//! - where the machine's CPU went: CPU seconds of every process by role (kube-apiserver, etcd,
//!   kube-controller-manager, redis, operator, workers, this harness) and the machine's busy
//!   fraction over the run, which says whether a target missed is the operator's or the host's.
//!
//! Every job must end Succeeded. One JSON line `scale-summary: {…}` (and `PAWFECT_SCALE_SUMMARY`).
//! Ignored in the test command (it takes many minutes); `bench/scale.sh` runs it.

#[allow(dead_code)]
mod cluster;
#[allow(dead_code)]
mod kubelet;
#[allow(dead_code)]
mod operator;

#[allow(dead_code, clippy::all)]
#[path = "../../worker/tests/common/mod.rs"]
mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::jobs::Inputs;
use common::process::http_get;
use futures::StreamExt;
use kube::api::{Api, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use pawfect_api::{InpaintJob, InpaintPool, JobPhase};
use pawfect_control_plane::ControlPlane;
use pawfect_queue::JobState;
use pawfect_queue::testing::RedisServer;
use serde_json::json;
use tokio::sync::watch;

use cluster::{node_names, queue, start_operators};
use kubelet::Kubelet;

const PREFIX: &str = "scale";
const MAX_REPLICAS: u32 = 3;
/// Longest wait for the last job after the last creation.
const DRAIN: Duration = Duration::from_secs(1800);

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name}={v:?} is not a number"))
        })
        .unwrap_or(default)
}

/// kube-apiserver's own `/metrics` text.
async fn api_metrics(client: &Client) -> String {
    let req = http::Request::get("/metrics")
        .body(Vec::new())
        .expect("a request");
    client.request_text(req).await.unwrap_or_default()
}

/// Sum of the samples of `name` by (resource[/subresource], verb).
fn by_resource_verb(text: &str, name: &str) -> BTreeMap<(String, String), f64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name).and_then(|r| r.strip_prefix('{')) else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let label = |k: &str| -> String {
            labels
                .split(',')
                .find_map(|kv| kv.strip_prefix(&format!("{k}=\"")))
                .map(|v| v.trim_end_matches('"').to_string())
                .unwrap_or_default()
        };
        let mut resource = label("resource");
        let sub = label("subresource");
        if !sub.is_empty() {
            resource = format!("{resource}/{sub}");
        }
        let v: f64 = value.trim().parse().unwrap_or(0.0);
        *out.entry((resource, label("verb"))).or_default() += v;
    }
    out
}

/// `apiserver_request_total` by (resource[/subresource], verb).
fn api_requests(text: &str) -> BTreeMap<(String, String), f64> {
    by_resource_verb(text, "apiserver_request_total")
}

/// Mean server-side latency (s) of the requests between two scrapes, for the verbs and
/// resources the operator writes: how long kube-apiserver itself took (APF queueing, etcd and
/// its CPU included), which the operator's reconciles wait on.
fn server_latency(before: &str, after: &str) -> BTreeMap<String, f64> {
    let d = |name: &str| {
        let (b, a) = (
            by_resource_verb(before, name),
            by_resource_verb(after, name),
        );
        a.into_iter()
            .map(|(k, v)| {
                let old = b.get(&k).copied().unwrap_or(0.0);
                (k, v - old)
            })
            .collect::<BTreeMap<_, _>>()
    };
    let (sum, count) = (
        d("apiserver_request_duration_seconds_sum"),
        d("apiserver_request_duration_seconds_count"),
    );
    let mut out = BTreeMap::new();
    for (res, verb) in [
        ("inpaintjobs/status", "APPLY"),
        ("inpaintjobs/status", "PATCH"),
        ("inpaintjobs", "PATCH"),
        ("events", "POST"),
        ("inpaintjobs", "POST"),
    ] {
        let k = (res.to_string(), verb.to_string());
        if let (Some(s), Some(&n)) = (sum.get(&k), count.get(&k))
            && n > 0.0
        {
            out.insert(format!("{verb} {res}"), s / n);
        }
    }
    out
}

/// CPU seconds (user + system) and peak RSS (MiB) of a process, from `/proc`.
fn proc_usage(pid: u32) -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let after = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // USER_HZ is 100 on every Linux this runs on (sysconf(_SC_CLK_TCK)).
    let cpu = ticks / 100.0;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let hwm_kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some((cpu, hwm_kib / 1024.0))
}

/// CPU seconds of every process on the machine by role, from `/proc` (pid -> role and the last
/// value seen, so processes that exit between samples keep what they had used at the last one).
fn sample_roles(seen: &mut HashMap<u32, (&'static str, f64)>) {
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        // `comm` is the executable name cut at 15 bytes.
        let role = match comm.trim() {
            _ if pid == me => "harness",
            "kube-apiserver" => "kube-apiserver",
            "etcd" => "etcd",
            c if c.starts_with("kube-controller") => "kube-controller-manager",
            "redis-server" => "redis",
            c if c.starts_with("pawfect-operato") => "operator",
            c if c.starts_with("pawfect-worker") => "workers",
            _ => continue,
        };
        if let Some((cpu, _)) = proc_usage(pid) {
            seen.insert(pid, (role, cpu));
        }
    }
}

/// (busy, total) jiffies of all CPUs since boot, from the first line of `/proc/stat`.
fn machine_jiffies() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: f64 = f.iter().sum();
    // idle and iowait are the 4th and 5th fields.
    let idle = f.get(3).copied().unwrap_or(0.0) + f.get(4).copied().unwrap_or(0.0);
    (total - idle, total)
}

/// Value of the series `name{labels}` in an OpenMetrics text.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// Cumulative buckets `(le, count)` of histogram `name` with `labels`, summed over `texts`.
fn histogram(texts: &[String], name: &str, labels: &str) -> Vec<(f64, f64)> {
    let mut out: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
    let prefix = format!("{name}_bucket{{");
    for text in texts {
        for l in text.lines() {
            let Some(rest) = l.strip_prefix(&prefix) else {
                continue;
            };
            let Some((set, count)) = rest.split_once("} ") else {
                continue;
            };
            if !set.split(',').any(|kv| kv == labels) {
                continue;
            }
            let Some(le) = set.split(',').find_map(|kv| kv.strip_prefix("le=")) else {
                continue;
            };
            let le = match le.trim_matches('"') {
                "+Inf" => f64::INFINITY,
                v => v.parse().unwrap_or(f64::INFINITY),
            };
            let count: f64 = count.trim().parse().unwrap_or(0.0);
            out.entry(le.to_bits()).or_insert((le, 0.0)).1 += count;
        }
    }
    let mut v: Vec<(f64, f64)> = out.into_values().collect();
    v.sort_by(|a, b| a.0.total_cmp(&b.0));
    v
}

/// Upper bound of the bucket that holds quantile `q` (a histogram's resolution: one bucket).
fn bucket_quantile(buckets: &[(f64, f64)], q: f64) -> f64 {
    let total = buckets.last().map_or(0.0, |b| b.1);
    if total == 0.0 {
        return f64::NAN;
    }
    buckets
        .iter()
        .find(|b| b.1 >= q * total)
        .map_or(f64::NAN, |b| b.0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn now_ms() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark of many minutes: bench/scale.sh"]
async fn scale_many_jobs() {
    let jobs = env_num("PAWFECT_SCALE_JOBS", 10_000) as usize;
    let pools = env_num("PAWFECT_SCALE_POOLS", 5).max(1) as usize;
    let rate = env_num("PAWFECT_SCALE_RATE", 50).max(1);
    let summary_path = std::env::var_os("PAWFECT_SCALE_SUMMARY").map(PathBuf::from);
    let started = Instant::now();

    let cp = ControlPlane::start().unwrap_or_else(|e| panic!("the control plane: {e}"));
    let client = cp.client().await;
    let redis = RedisServer::start().unwrap();
    let redis_url = redis.url();
    let tmp = tempfile::tempdir().unwrap();
    let inputs = Inputs::create(tmp.path());
    let models = tmp.path().join("no-models");
    std::fs::create_dir_all(&models).unwrap();
    let logs = tmp.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
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
    let nodes = node_names(&client).await;

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut namespaces = Vec::new();
    let mut kubelet_tasks = Vec::new();
    for i in 0..pools {
        let ns = cp.namespace(&client, &format!("scale{i}")).await;
        let pool = format!("p{i}");
        let kubelet = Kubelet::new(
            client.clone(),
            connect().await,
            &ns,
            &pawfect_operator::queue_pool(&ns, &pool),
            nodes.clone(),
            PathBuf::from(env!("CARGO_BIN_EXE_pawfect-worker-e2e")),
            &logs,
        );
        kubelet_tasks.push(tokio::spawn(kubelet.run(stop_rx.clone())));
        let p: InpaintPool = serde_json::from_value(json!({
            "apiVersion": "inpaint.pawfect.dev/v1alpha1",
            "kind": "InpaintPool",
            "metadata": {"name": pool, "namespace": ns},
            "spec": {
                "minReplicas": 0,
                "maxReplicas": MAX_REPLICAS,
                "jobsPerReplica": 1,
                "pollIntervalSeconds": 1,
                "scaleDownDelaySeconds": 10,
                "worker": {
                    "image": "ghcr.io/pawfect-inpaint/worker:scale",
                    "terminationGracePeriodSeconds": 30,
                    "modelVolume": {"hostPath": models.display().to_string(), "mountPath": "/models"},
                    "resources": {"limits": {"nvidia.com/gpu": "0"}},
                    "args": [
                        "--device", "cpu", "--no-caption",
                        "--allow-root", inputs.root.display().to_string(),
                        "--crop-min-side", "128", "--crop-max-side", "256",
                        "--log-format", "json"
                    ],
                    "env": [
                        {"name": "PAWFECT_TEST_FAST_MODEL", "value": "1"},
                        {"name": "RUST_LOG", "value": "warn"}
                    ]
                }
            }
        }))
        .expect("an InpaintPool");
        Api::<InpaintPool>::namespaced(client.clone(), &ns)
            .create(&PostParams::default(), &p)
            .await
            .unwrap_or_else(|e| panic!("create pool: {e}"));
        namespaces.push((ns, pool));
    }

    // When a watch first saw each job Succeeded (ms since the epoch).
    let seen: Arc<Mutex<HashMap<String, i64>>> = Arc::default();
    {
        let seen = seen.clone();
        let api: Api<InpaintJob> = Api::all(client.clone());
        tokio::spawn(async move {
            let mut stream = watcher(api, watcher::Config::default())
                .default_backoff()
                .applied_objects()
                .boxed();
            while let Some(item) = stream.next().await {
                let Ok(job) = item else { continue };
                if job.status.as_ref().and_then(|s| s.phase) == Some(JobPhase::Succeeded) {
                    let t = now_ms();
                    seen.lock()
                        .unwrap()
                        .entry(job.uid().unwrap_or_default())
                        .or_insert(t);
                }
            }
        });
    }
    // The operator's CPU and peak RSS, sampled.
    let usage: Arc<Mutex<(f64, f64)>> = Arc::default();
    let sampler = {
        let usage = usage.clone();
        let pids = Arc::new(Mutex::new(Vec::<u32>::new()));
        let sampler_pids = pids.clone();
        let task = tokio::spawn(async move {
            // CPU of processes that exited is lost; nothing restarts the replicas here.
            loop {
                let ps = sampler_pids.lock().unwrap().clone();
                let mut cpu = 0.0;
                let mut peak: f64 = 0.0;
                for pid in ps {
                    if let Some((c, rss)) = proc_usage(pid) {
                        cpu += c;
                        peak = peak.max(rss);
                    }
                }
                {
                    let mut u = usage.lock().unwrap();
                    u.0 = u.0.max(cpu);
                    u.1 = u.1.max(peak);
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        *pids.lock().unwrap() = operators.iter().filter_map(|o| o.pid()).collect();
        task
    };

    // Every process's CPU by role, the machine's CPU, and the operators' reconcile queues.
    let roles: Arc<Mutex<HashMap<u32, (&'static str, f64)>>> = Arc::default();
    let depths: Arc<Mutex<Vec<(f64, f64)>>> = Arc::default();
    let ports: Vec<u16> = operators.iter().filter_map(|o| o.http_port()).collect();
    let system_sampler = {
        let (roles, depths, ports) = (roles.clone(), depths.clone(), ports.clone());
        tokio::spawn(async move {
            loop {
                sample_roles(&mut roles.lock().unwrap());
                let (mut job, mut pool) = (0.0_f64, 0.0_f64);
                for &port in &ports {
                    if let Some((200, text)) = http_get(port, "/metrics").await {
                        let d = |c: &str| {
                            metric(
                                &text,
                                &format!(
                                    "pawfect_operator_reconcile_queue_depth{{controller=\"{c}\"}}"
                                ),
                            )
                            .unwrap_or(0.0)
                        };
                        job = job.max(d("job"));
                        pool = pool.max(d("pool"));
                    }
                }
                depths.lock().unwrap().push((job, pool));
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };
    let machine_before = machine_jiffies();

    let before_text = api_metrics(&client).await;
    let before = api_requests(&before_text);
    let create_started = Instant::now();
    let api_of =
        |i: usize| -> Api<InpaintJob> { Api::namespaced(client.clone(), &namespaces[i].0) };
    let mut uids: Vec<(usize, String)> = Vec::with_capacity(jobs);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for n in 0..jobs {
        tick.tick().await;
        let i = n % pools;
        let name = format!("j{n:06}");
        let job: InpaintJob = serde_json::from_value(json!({
            "apiVersion": "inpaint.pawfect.dev/v1alpha1",
            "kind": "InpaintJob",
            "metadata": {"name": name, "namespace": namespaces[i].0},
            "spec": {
                "image": inputs.uri("photo.png"),
                "mask": inputs.uri("mask.png"),
                "output": inputs.out(&format!("{name}.png")),
                "pool": namespaces[i].1,
                "steps": 2,
                "seed": n,
            }
        }))
        .expect("an InpaintJob");
        let created = api_of(i)
            .create(&PostParams::default(), &job)
            .await
            .unwrap_or_else(|e| panic!("create {name}: {e}"));
        uids.push((i, created.uid().unwrap_or_default()));
    }
    let create_s = create_started.elapsed().as_secs_f64();
    eprintln!("scale: {jobs} jobs created in {create_s:.1} s");

    // Drain: every job Succeeded as the watch sees it.
    let deadline = Instant::now() + DRAIN;
    loop {
        let done = seen.lock().unwrap().len();
        if done >= jobs {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {done} of {jobs} jobs Succeeded after {} s",
            DRAIN.as_secs()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let after_text = api_metrics(&client).await;
    let after = api_requests(&after_text);
    sampler.abort();
    system_sampler.abort();
    let machine_after = machine_jiffies();
    let mut operator_texts = Vec::new();
    for &port in &ports {
        if let Some((200, text)) = http_get(port, "/metrics").await {
            operator_texts.push(text);
        }
    }

    let queue = connect().await;
    let seen = seen.lock().unwrap().clone();
    let mut lags = Vec::with_capacity(jobs);
    let (mut first, mut last) = (i64::MAX, i64::MIN);
    for (i, uid) in &uids {
        let (ns, pool) = &namespaces[*i];
        let rec = queue
            .get_job(&pawfect_operator::queue_pool(ns, pool), uid)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("job {uid} has no queue record"));
        assert_eq!(rec.state, JobState::Succeeded, "{rec:?}");
        let finished = rec
            .finished_at
            .map(|t| t.as_millisecond())
            .expect("finished_at");
        first = first.min(finished);
        last = last.max(finished);
        lags.push((seen[uid] - finished) as f64 / 1000.0);
    }
    lags.sort_by(f64::total_cmp);
    let mut requests: BTreeMap<String, f64> = BTreeMap::new();
    for (k, v) in &after {
        let d = v - before.get(k).copied().unwrap_or(0.0);
        if d > 0.0 {
            requests.insert(format!("{} {}", k.1, k.0), d);
        }
    }
    // What the operator writes per job: job and job-status requests other than the test's own
    // creates (one POST per job) and the watches (long-lived).
    let operator_job_requests: f64 = requests
        .iter()
        .filter(|(k, _)| {
            let (verb, res) = k.split_once(' ').unwrap_or_default();
            res.starts_with("inpaintjobs")
                && verb != "WATCH"
                && !(verb == "POST" && res == "inpaintjobs")
        })
        .map(|(_, v)| v)
        .sum();
    let (cpu_s, peak_rss_mib) = *usage.lock().unwrap();
    let mut cpu_by_role: BTreeMap<&str, f64> = BTreeMap::new();
    for (role, cpu) in roles.lock().unwrap().values() {
        *cpu_by_role.entry(role).or_default() += cpu;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let busy = (machine_after.0 - machine_before.0) / (machine_after.1 - machine_before.1);
    let depths = depths.lock().unwrap().clone();
    let depth_stats = |i: usize| {
        let v: Vec<f64> = depths
            .iter()
            .map(|d| if i == 0 { d.0 } else { d.1 })
            .collect();
        let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
        json!({"max": v.iter().copied().fold(0.0, f64::max), "mean": mean, "samples": v.len()})
    };
    let wait = |c: &str| {
        let b = histogram(
            &operator_texts,
            "pawfect_operator_reconcile_queue_wait_seconds",
            &format!("controller=\"{c}\""),
        );
        let series = |m: &str| -> f64 {
            operator_texts
                .iter()
                .filter_map(|t| metric(t, &format!("pawfect_operator_{m}{{controller=\"{c}\"}}")))
                .sum()
        };
        let (n, sum) = (
            series("reconcile_duration_seconds_count"),
            series("reconcile_duration_seconds_sum"),
        );
        json!({
            "reconciles": series("reconcile_total"),
            "reconciles_per_job": series("reconcile_total") / jobs as f64,
            "reconcile_mean_s": if n > 0.0 { sum / n } else { f64::NAN },
            "queue_wait_p50_le_s": bucket_quantile(&b, 0.5),
            "queue_wait_p99_le_s": bucket_quantile(&b, 0.99),
        })
    };
    let span_s = (last - first) as f64 / 1000.0;
    let summary = json!({
        "jobs": jobs,
        "pools": pools,
        "create_rate_target": rate,
        "create_rate_achieved": jobs as f64 / create_s,
        "throughput_jobs_per_s": if span_s > 0.0 { jobs as f64 / span_s } else { f64::NAN },
        "status_lag_s": {
            "p50": percentile(&lags, 0.5),
            "p99": percentile(&lags, 0.99),
            "max": lags.last().copied().unwrap_or(f64::NAN),
        },
        "operator_cpu_s": cpu_s,
        "operator_peak_rss_mib": peak_rss_mib,
        "operator_job_requests_per_job": operator_job_requests / jobs as f64,
        "reconcile_queue_depth": {"job": depth_stats(0), "pool": depth_stats(1)},
        "reconciles": {"job": wait("job"), "pool": wait("pool")},
        "cpu_s_by_role": cpu_by_role,
        "machine": {"cores": cores, "busy_fraction": busy},
        "api_requests": requests,
        "api_server_latency_mean_s": server_latency(&before_text, &after_text),
        "seconds": started.elapsed().as_secs(),
    });
    println!("scale-summary: {summary}");
    if let Some(p) = &summary_path {
        std::fs::write(p, format!("{summary}\n")).unwrap();
        // The operators' last /metrics, kept next to the summary for a closer look.
        std::fs::write(p.with_extension("metrics.txt"), operator_texts.join("\n")).unwrap();
        std::fs::write(p.with_extension("apiserver-metrics.txt"), &after_text).unwrap();
    }
    stop_tx.send_replace(true);
    for t in kubelet_tasks {
        let _ = t.await;
    }
    drop(operators);
}

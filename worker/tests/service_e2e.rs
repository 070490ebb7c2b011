//! End to end: real `redis-server`, real `pawfect-worker serve` processes on the tiny fixture
//! models (FLUX.1-Fill-dev Q8_0 GGUF picked by PAWFECT_MODEL_VARIANT, Florence-2), `file://`
//! storage in a temporary directory, jobs enqueued through `pawfect-queue`.
//!
//! - every bad input fails with its reason (a model error mid-denoise and an out-of-memory
//!   injected through `PAWFECT_TEST_FAULTS`) while the same process then completes a good job;
//!   results, events, timings, metrics, and the job uid on every log line of a job;
//! - SIGKILL mid-job: another worker process takes the job over and completes it once;
//! - SIGTERM: the current job finishes within the drain timeout (exit 0), or is handed back
//!   when the timeout is shorter (exit 0), and another worker completes it.
//!
//! Crops are kept small (128–256 px) so the suite stays quick on two CPU cores.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::http::{Route, Server};
use common::jobs::*;
use common::models::models_dir;
use common::process::{Worker, free_port, http_get};
use pawfect_queue::testing::RedisServer;
use pawfect_queue::{EventKind, JobState, Queue};
use tokio::process::Command;
use tokio::sync::watch;

const LEASE: Duration = Duration::from_secs(2);
const MAX_BYTES: u64 = 64 * 1024;

fn spawn_worker(
    redis: &RedisServer,
    models: &Path,
    root: &Path,
    name: &str,
    drain: &str,
    logs: &Path,
) -> Worker {
    let http = free_port();
    let log = logs.join(format!("{name}.log"));
    let file = std::fs::File::create(&log).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_pawfect-worker"))
        .arg("serve")
        .arg("--models")
        .arg(models)
        .args(["--device", "cpu", "--pool", "test", "--worker-name", name])
        .args(["--http-addr", &format!("127.0.0.1:{http}")])
        .arg("--allow-root")
        .arg(root)
        .args(["--crop-min-side", "128", "--crop-max-side", "256"])
        .args(["--max-input-bytes", &MAX_BYTES.to_string()])
        .args(["--http-timeout", "3s", "--drain-timeout", drain])
        // The test server listens on 127.0.0.1, refused by default.
        .args(["--http-allow-plain", "--http-allow-cidrs", "127.0.0.1/32"])
        .args(["--caption-beams", "1", "--log-format", "json"])
        .env("PAWFECT_REDIS_URL", redis.url())
        .env("PAWFECT_QUEUE_PREFIX", "e2e")
        .env("PAWFECT_MODEL_VARIANT", "q8_0")
        .env("PAWFECT_LEASE", format!("{}ms", LEASE.as_millis()))
        .env(
            "PAWFECT_TEST_FAULTS",
            "model-error@explode mid-denoise,oom@needs too much memory",
        )
        .env("RUST_LOG", "info")
        .env_remove("PAWFECT_MODELS")
        .stdout(Stdio::null())
        .stderr(Stdio::from(file))
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    Worker { child, http, log }
}

fn signal(w: &Worker, sig: &str) {
    let pid = w.child.id().expect("running").to_string();
    let ok = std::process::Command::new("kill")
        .args([sig, &pid])
        .status()
        .unwrap();
    assert!(ok.success());
}

async fn exit_code(w: &mut Worker, within: Duration) -> i32 {
    match tokio::time::timeout(within, w.child.wait()).await {
        Ok(Ok(status)) => status.code().unwrap_or(-1),
        _ => panic!(
            "worker did not exit in {within:?}:\n{}",
            std::fs::read_to_string(&w.log).unwrap_or_default()
        ),
    }
}

async fn connect(redis: &RedisServer) -> Queue {
    let mut cfg = queue_config(&redis.url(), LEASE);
    cfg.prefix = "e2e".into();
    Queue::connect(cfg).await.unwrap()
}

fn log_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_then_a_good_job_in_one_process() {
    let redis = RedisServer::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let inp = Inputs::create(tmp.path());
    let models = models_dir(tmp.path());
    let http = Server::start().await;
    http_routes(&http, MAX_BYTES);
    let queue = connect(&redis).await;
    let mut w = spawn_worker(&redis, &models, &inp.root, "w1", "10s", tmp.path());
    w.wait_ready().await;

    let unreachable = format!("http://127.0.0.1:{}/photo.png", free_port());
    let mut cases = bad_cases(&inp, &http, &unreachable);
    let mut model_error = inp.good(&inp.out("model-error.png"));
    model_error.prompt = Some("grass, explode mid-denoise".into());
    let mut oom = inp.good(&inp.out("oom.png"));
    oom.prompt = Some("grass that needs too much memory".into());
    // Retried once: the second attempt finds its prompt's embeddings cached.
    oom.max_attempts = 2;
    cases.push(BadCase {
        name: "model error mid-denoise",
        spec: model_error,
        reason: "ModelError",
        message_starts: "injected model error at step 1",
    });
    cases.push(BadCase {
        name: "CUDA out of memory",
        spec: oom,
        reason: "AttemptsExhausted",
        message_starts: "OutOfMemory: out of memory: injected CUDA_ERROR_OUT_OF_MEMORY at step 1",
    });
    for (i, c) in cases.iter().enumerate() {
        enqueue(&queue, &format!("bad-{i}"), &c.spec).await;
    }
    let mut good = inp.good(&inp.out("good.png"));
    good.steps = 3;
    good.seed = Some(7);
    enqueue(&queue, "good", &good).await;

    let mut oom_attempts = 0;
    for (i, c) in cases.iter().enumerate() {
        let rec = wait_finished(&queue, &format!("bad-{i}"), Duration::from_secs(60)).await;
        if c.reason == "AttemptsExhausted" {
            oom_attempts = rec.attempt;
        }
        assert_eq!(rec.state, JobState::Failed, "{}: {rec:?}", c.name);
        assert_eq!(rec.reason.as_deref(), Some(c.reason), "{}: {rec:?}", c.name);
        let msg = rec.message.clone().unwrap_or_default();
        assert!(
            msg.starts_with(c.message_starts),
            "{}: message {msg:?}",
            c.name
        );
        check_refused_once(c, &rec);
    }
    let rec = wait_finished(&queue, "good", Duration::from_secs(120)).await;
    check_result(&inp, &rec, "good.png");
    assert_eq!(rec.worker.as_deref(), Some("w1"), "the same process");
    // The fixture Florence-2 has random weights: its caption names no surface, so the prompt
    // is the neutral fallback.
    assert_eq!(rec.prompt_source.as_deref(), Some("fallback"));
    assert!(
        rec.prompt
            .as_deref()
            .unwrap_or("")
            .ends_with("seamless continuation, no objects")
    );

    let events = all_events(&queue).await;
    let steps: Vec<(Option<u32>, Option<u32>)> = of(&events, "good", EventKind::Progress)
        .iter()
        .filter_map(|e| {
            e.progress()
                .filter(|p| p.stage == "denoise")
                .map(|p| (p.step, p.total_steps))
        })
        .collect();
    assert_eq!(steps.last(), Some(&(Some(3), Some(3))), "{steps:?}");
    let done = of(&events, "good", EventKind::Succeeded);
    assert_eq!(done.len(), 1);
    let t = &done[0].result().unwrap().timings;
    assert!(
        t.encode.is_some() && t.denoise.is_some() && t.decode.is_some() && t.total.is_some(),
        "{t:?}"
    );
    // Work counts: the same in the event and in the job hash (what the operator copies into
    // the InpaintJob status), every model stage counted (no prompt in the spec: Florence-2
    // captioned), the total their sum, and the denoise stage 3 steps over one crop's fixed
    // shapes, so a multiple of 3 in every class.
    let work = done[0].result().unwrap().work.clone().expect("work counts");
    assert_eq!(rec.work.as_ref(), Some(&work));
    let stages = [work.caption, work.encode, work.denoise, work.decode];
    let mut sum = pawfect_api::WorkCounts::default();
    for (name, s) in ["caption", "encode", "denoise", "decode"]
        .iter()
        .zip(stages)
    {
        let s = s.unwrap_or_else(|| panic!("{name} not counted: {work:?}"));
        assert!(
            s.f16_gemm_flop > 0 && s.memory_bound_bytes > 0,
            "{name}: {s:?}"
        );
        // GGUF Q8_0 dequantized for the matmuls (the CPU default): no int8 GEMM.
        assert_eq!(s.int8_gemm_op, 0, "{name}: {s:?}");
        sum += s;
    }
    assert_eq!(work.total, Some(sum));
    let d = work.denoise.unwrap_or_default();
    assert!(d.attention_flop > 0, "{d:?}");
    for v in [d.f16_gemm_flop, d.attention_flop, d.memory_bound_bytes] {
        assert_eq!(v % 3, 0, "denoise over 3 equal steps: {d:?}");
    }

    let (status, metrics) = http_get(w.http, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    for needle in [
        "pawfect_worker_jobs_total{outcome=\"succeeded\",reason=\"\"} 1",
        "pawfect_worker_jobs_total{outcome=\"failed\",reason=\"ModelError\"} 1",
        "pawfect_worker_jobs_total{outcome=\"failed\",reason=\"InvalidImage\"} 2",
        "pawfect_worker_stage_seconds_count{stage=\"denoise\"} 1",
        "pawfect_worker_models_loaded{variant=\"q8_0\",device=\"cpu\"} 1",
        "pawfect_worker_model_load_seconds",
    ] {
        assert!(metrics.contains(needle), "{needle} missing:\n{metrics}");
    }
    // Three prompts reached the model (the model error's, the out-of-memory's, the good job's
    // fallback); every attempt after the first of the out-of-memory job found its embeddings
    // cached. The bad inputs failed before the model.
    assert_eq!(oom_attempts, 2, "the out-of-memory job ran twice");
    for needle in [
        "pawfect_worker_prompt_cache_misses_total 3".to_string(),
        format!(
            "pawfect_worker_prompt_cache_hits_total {}",
            oom_attempts - 1
        ),
        "pawfect_worker_prompt_cache_entries 3".to_string(),
        "pawfect_worker_prompt_cache_evictions_total 0".to_string(),
    ] {
        assert!(metrics.contains(&needle), "{needle} missing:\n{metrics}");
    }
    assert_eq!(http_get(w.http, "/healthz").await.map(|r| r.0), Some(200));

    signal(&w, "-TERM");
    assert_eq!(exit_code(&mut w, Duration::from_secs(20)).await, 0);

    // Every line logged while a job ran names its uid.
    let lines = log_lines(&w.log);
    let job_lines: Vec<_> = lines
        .iter()
        .filter(|l| {
            let msg = l["fields"]["message"].as_str().unwrap_or("");
            ["claimed", "running", "prompt chosen", "succeeded", "failed"].contains(&msg)
        })
        .collect();
    assert!(
        job_lines.len() > cases.len() * 2,
        "{} job lines",
        job_lines.len()
    );
    for l in job_lines {
        assert!(
            l["span"]["uid"].as_str().is_some_and(|u| !u.is_empty()),
            "no uid: {l}"
        );
    }
    assert!(
        lines
            .iter()
            .any(|l| l["fields"]["message"] == "models loaded" && l["fields"]["load_ms"].is_u64()),
        "load time logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_job_then_reclaimed_and_sigterm_drains() {
    let redis = RedisServer::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let inp = Inputs::create(tmp.path());
    let models = models_dir(tmp.path());
    let queue = connect(&redis).await;
    // Photos served over HTTP, each held until its gate opens: a worker is then mid-job
    // (claimed, heartbeating, fetching) for as long as the test wants.
    let http = Server::start().await;
    let photo = png_rgb(&photo(W, H));
    let mut gates = Vec::new();
    for path in ["/held-1.png", "/held-2.png", "/held-3.png"] {
        let (tx, rx) = watch::channel(false);
        http.route(
            path,
            Route {
                gate: Some(rx),
                ..Route::ok(photo.clone())
            },
        );
        gates.push(tx);
    }
    let held = |path: &str, out: &str| {
        let mut s = inp.spec(&http.url(path), &inp.uri("mask.png"), &inp.out(out));
        s.max_attempts = 2;
        s.steps = 2;
        s
    };

    // SIGKILL mid-job: nothing is lost, another process completes the job once.
    let mut a = spawn_worker(&redis, &models, &inp.root, "a", "10s", tmp.path());
    a.wait_ready().await;
    enqueue(&queue, "killed", &held("/held-1.png", "killed.png")).await;
    let rec = wait_state(&queue, "killed", JobState::Running, Duration::from_secs(20)).await;
    assert_eq!(rec.worker.as_deref(), Some("a"));
    signal(&a, "-KILL");
    assert_ne!(exit_code(&mut a, Duration::from_secs(10)).await, 0);
    let mut b = spawn_worker(&redis, &models, &inp.root, "b", "10s", tmp.path());
    b.wait_ready().await;
    let _ = gates[0].send(true);
    let rec = wait_finished(&queue, "killed", Duration::from_secs(60)).await;
    assert_eq!(rec.state, JobState::Succeeded, "{rec:?}");
    assert_eq!(rec.worker.as_deref(), Some("b"));
    assert_eq!(rec.attempt, 2);
    assert!(inp.root.join("out/killed.png").is_file());
    let events = all_events(&queue).await;
    let claims: Vec<_> = of(&events, "killed", EventKind::Claimed)
        .iter()
        .map(|e| e.worker.clone().unwrap_or_default())
        .collect();
    assert_eq!(claims, vec!["a".to_string(), "b".to_string()]);
    assert_eq!(
        of(&events, "killed", EventKind::Succeeded).len(),
        1,
        "completed once"
    );

    // SIGTERM with a drain long enough: the job finishes, the process exits 0.
    enqueue(&queue, "drained", &held("/held-2.png", "drained.png")).await;
    wait_state(
        &queue,
        "drained",
        JobState::Running,
        Duration::from_secs(20),
    )
    .await;
    signal(&b, "-TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The first answer of /readyz after SIGTERM (a loaded machine may drop a probe: retried for
    // up to 5 s; the job is still held, so the worker is still draining throughout).
    let mut ready = None;
    for _ in 0..25 {
        ready = http_get(b.http, "/readyz").await.map(|r| r.0);
        if ready.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(ready, Some(503), "not ready while draining");
    let _ = gates[1].send(true);
    assert_eq!(exit_code(&mut b, Duration::from_secs(60)).await, 0);
    let rec = queue.get_job(POOL, "drained").await.unwrap().unwrap();
    assert_eq!(rec.state, JobState::Succeeded, "{rec:?}");
    assert_eq!(rec.worker.as_deref(), Some("b"));

    // SIGTERM with a short drain: the job goes back to the queue (attempt not counted), the
    // process exits 0, and the next worker completes it.
    let mut c = spawn_worker(&redis, &models, &inp.root, "c", "300ms", tmp.path());
    c.wait_ready().await;
    enqueue(&queue, "handed", &held("/held-3.png", "handed.png")).await;
    wait_state(&queue, "handed", JobState::Running, Duration::from_secs(20)).await;
    signal(&c, "-TERM");
    assert_eq!(exit_code(&mut c, Duration::from_secs(20)).await, 0);
    let rec = queue.get_job(POOL, "handed").await.unwrap().unwrap();
    assert_eq!(rec.state, JobState::Queued, "{rec:?}");
    assert_eq!(rec.attempt, 0);
    let events = all_events(&queue).await;
    let back = of(&events, "handed", EventKind::Retrying);
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].error().unwrap().reason, "HandedBack");
    let _ = gates[2].send(true);
    let mut d = spawn_worker(&redis, &models, &inp.root, "d", "10s", tmp.path());
    let rec = wait_finished(&queue, "handed", Duration::from_secs(60)).await;
    assert_eq!(rec.state, JobState::Succeeded, "{rec:?}");
    assert_eq!(rec.worker.as_deref(), Some("d"));
    signal(&d, "-TERM");
    assert_eq!(exit_code(&mut d, Duration::from_secs(20)).await, 0);
}

//! The queue loop in-process against a real redis-server, with a small deterministic inpainter
//! behind the pipeline's `Inpainter` trait (the model-independent half of the service): bad
//! inputs fail with their reasons while the same worker keeps serving, results, events and
//! timings, cancellation mid-denoise, model errors, out-of-memory, drain and hand-back,
//! reclaim after a worker dies.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::http::Server;
use common::jobs::*;
use image::{GrayImage, RgbImage};
use pawfect_queue::testing::RedisServer;
use pawfect_queue::{EventKind, JobState, Queue};
use pawfect_worker::pipeline::{
    CaptionError, Captioner, InpaintError, InpaintParams, Inpainted, Inpainter, ModelTimings,
    Models, PipelineConfig, PromptRules, RulePrompt, Step,
};
use pawfect_worker::serve::{self, Loaded, ServeConfig};
use pawfect_worker::storage::{HttpPolicy, StorageConfig};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Paints the masked pixels one colour, one step at a time. Prompts containing `fail at step N`
/// or `out of memory` make it fail like a model would.
struct Filler {
    step_delay: Duration,
}

impl Inpainter for Filler {
    fn inpaint(
        &self,
        image: &RgbImage,
        mask: &GrayImage,
        prompt: &str,
        params: &InpaintParams,
        progress: &mut dyn FnMut(Step) -> bool,
    ) -> Result<Inpainted, InpaintError> {
        let fail_at = prompt
            .split("fail at step ")
            .nth(1)
            .and_then(|s| s.trim().parse::<u32>().ok());
        let t = std::time::Instant::now();
        for step in 1..=params.steps {
            std::thread::sleep(self.step_delay);
            if fail_at == Some(step) {
                return Err(InpaintError::Model(format!(
                    "non-finite latents at step {step}"
                )));
            }
            if prompt.contains("out of memory") {
                return Err(InpaintError::from_backend(
                    "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")",
                ));
            }
            if !progress(Step {
                step,
                total: params.steps,
            }) {
                return Err(InpaintError::Cancelled);
            }
        }
        let mut out = image.clone();
        for (o, m) in out.pixels_mut().zip(mask.pixels()) {
            if m.0[0] > 0 {
                o.0 = [20, 180, 40];
            }
        }
        Ok(Inpainted {
            image: out,
            timings: ModelTimings {
                encode_ms: 1,
                denoise_ms: t.elapsed().as_millis() as u64,
                decode_ms: 1,
            },
            work: Default::default(),
        })
    }
}

struct Caption;
impl Captioner for Caption {
    fn caption(&self, _: &RgbImage) -> Result<String, CaptionError> {
        Ok("a dog on green grass".into())
    }
}

struct Rules;
impl PromptRules for Rules {
    fn for_caption(&self, caption: &str) -> RulePrompt {
        let surface = caption.contains("grass").then(|| "green grass".to_string());
        RulePrompt {
            prompt: format!(
                "{}, seamless continuation, no objects",
                surface.as_deref().unwrap_or("background")
            ),
            neutral: surface.is_none(),
            surface,
            note: None,
        }
    }
    fn for_labels(&self, labels: &[String]) -> RulePrompt {
        RulePrompt {
            prompt: format!("{}, seamless continuation, no objects", labels.join(", ")),
            surface: labels.first().cloned(),
            neutral: false,
            note: None,
        }
    }
    fn neutral(&self) -> RulePrompt {
        RulePrompt {
            prompt: "background, seamless continuation, no objects".into(),
            surface: None,
            neutral: true,
            note: None,
        }
    }
}

const MAX_BYTES: u64 = 64 * 1024;

struct Worker {
    handle: JoinHandle<Result<(), serve::ServeError>>,
    shutdown: watch::Sender<bool>,
    http: std::net::SocketAddr,
}

async fn start_worker(
    redis: &RedisServer,
    root: &std::path::Path,
    name: &str,
    lease: Duration,
    drain: Duration,
    step_delay: Duration,
) -> Worker {
    let mut pipeline = PipelineConfig::default();
    pipeline.limits.max_bytes = MAX_BYTES;
    let config = ServeConfig {
        pool: "test".into(),
        worker_name: name.into(),
        queue: queue_config(&redis.url(), lease),
        storage: StorageConfig {
            allow_roots: vec![root.to_path_buf()],
            http_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_millis(500),
            // The test server listens on 127.0.0.1, refused by default.
            http_policy: HttpPolicy {
                allow_plain: true,
                allow: vec!["127.0.0.1/32".parse().unwrap()],
                deny: Vec::new(),
            },
            ..StorageConfig::default()
        },
        pipeline,
        drain_timeout: drain,
        claim_wait: Duration::from_millis(300),
        model_variant: "test".into(),
        device: "cpu".into(),
        faults: Vec::new(),
    };
    let listener = serve::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let http = listener.local_addr().unwrap();
    let (tx, rx) = watch::channel(false);
    let load = move || -> Result<Loaded, String> {
        Ok(Loaded {
            models: Models {
                inpainter: Arc::new(Filler { step_delay }),
                captioner: Some(Arc::new(Caption)),
                rules: Arc::new(Rules),
            },
            gpu_memory: None,
        })
    };
    let handle = tokio::spawn(serve::run(config, listener, load, rx));
    Worker {
        handle,
        shutdown: tx,
        http,
    }
}

async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    let status = buf.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = buf.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

async fn wait_ready(addr: std::net::SocketAddr) {
    for _ in 0..200 {
        if get(addr, "/readyz").await.0 == 200 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("worker never ready");
}

fn unreachable_url() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("http://127.0.0.1:{port}/photo.png")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_fail_with_reasons_and_the_worker_keeps_serving() {
    let redis = RedisServer::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let inp = Inputs::create(tmp.path());
    let http = Server::start().await;
    http_routes(&http, MAX_BYTES);
    let queue = Queue::connect(queue_config(&redis.url(), Duration::from_secs(5)))
        .await
        .unwrap();
    let w = start_worker(
        &redis,
        &inp.root,
        "w1",
        Duration::from_secs(5),
        Duration::from_secs(5),
        Duration::ZERO,
    )
    .await;
    wait_ready(w.http).await;
    assert_eq!(get(w.http, "/healthz").await.0, 200);

    let mut cases = bad_cases(&inp, &http, &unreachable_url());
    // Failures inside the model: an error mid-denoise, and out-of-memory (retryable: 2 attempts).
    let mut model_error = inp.good(&inp.out("model-error.png"));
    model_error.prompt = Some("grass, fail at step 2".into());
    let mut oom = inp.good(&inp.out("oom.png"));
    oom.prompt = Some("out of memory".into());
    oom.max_attempts = 2;
    cases.push(BadCase {
        name: "model error mid-denoise",
        spec: model_error,
        reason: "ModelError",
        message_starts: "non-finite latents at step 2",
    });
    cases.push(BadCase {
        name: "out of memory",
        spec: oom,
        reason: "AttemptsExhausted",
        message_starts: "OutOfMemory: out of memory: DriverError(CUDA_ERROR_OUT_OF_MEMORY",
    });
    for (i, c) in cases.iter().enumerate() {
        enqueue(&queue, &format!("bad-{i}"), &c.spec).await;
    }
    let mut good = inp.good(&inp.out("good.png"));
    good.steps = 5;
    enqueue(&queue, "good", &good).await;

    for (i, c) in cases.iter().enumerate() {
        let rec = wait_finished(&queue, &format!("bad-{i}"), Duration::from_secs(30)).await;
        assert_eq!(rec.state, JobState::Failed, "{}: {rec:?}", c.name);
        assert_eq!(rec.reason.as_deref(), Some(c.reason), "{}: {rec:?}", c.name);
        let msg = rec.message.clone().unwrap_or_default();
        assert!(
            msg.starts_with(c.message_starts),
            "{}: message {msg:?}",
            c.name
        );
        assert_eq!(rec.worker.as_deref(), Some("w1"));
        check_refused_once(c, &rec);
    }
    let rec = wait_finished(&queue, "good", Duration::from_secs(30)).await;
    check_result(&inp, &rec, "good.png");
    assert_eq!(
        rec.prompt.as_deref(),
        Some("green grass, seamless continuation, no objects")
    );
    assert_eq!(rec.caption.as_deref(), Some("a dog on green grass"));
    assert_eq!(rec.prompt_source.as_deref(), Some("caption"));
    assert_eq!(rec.output.as_deref(), Some(inp.out("good.png").as_str()));
    assert!(
        !inp.root.join("out/model-error.png").exists(),
        "no output for a failed job"
    );

    let events = all_events(&queue).await;
    assert_eq!(of(&events, "good", EventKind::Claimed).len(), 1);
    let stages: Vec<String> = of(&events, "good", EventKind::Progress)
        .iter()
        .map(|e| e.progress().unwrap().stage.clone())
        .collect();
    for stage in [
        "fetch", "mask", "crop", "caption", "encode", "denoise", "decode", "stitch", "store",
    ] {
        assert!(
            stages.iter().any(|s| s == stage),
            "progress of {stage}: {stages:?}"
        );
    }
    let last_denoise = of(&events, "good", EventKind::Progress)
        .into_iter()
        .filter_map(|e| e.progress().filter(|p| p.stage == "denoise").cloned())
        .next_back()
        .unwrap();
    assert_eq!(
        (last_denoise.step, last_denoise.total_steps),
        (Some(5), Some(5))
    );
    let done = of(&events, "good", EventKind::Succeeded);
    assert_eq!(done.len(), 1);
    let result = done[0].result().unwrap();
    assert_eq!(result.prompt_source.as_deref(), Some("caption"));
    assert!(result.timings.denoise.is_some() && result.timings.total.is_some());
    // The retryable out-of-memory job was retried once before it failed.
    let oom_uid = format!("bad-{}", cases.len() - 1);
    let retries = of(&events, &oom_uid, EventKind::Retrying);
    assert_eq!(retries.len(), 1);
    assert_eq!(retries[0].error().unwrap().reason, "OutOfMemory");

    let (status, metrics) = get(w.http, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains("pawfect_worker_jobs_total{outcome=\"succeeded\",reason=\"\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("pawfect_worker_jobs_total{outcome=\"failed\",reason=\"EmptyMask\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("pawfect_worker_stage_seconds_count{stage=\"denoise\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("pawfect_worker_model_load_seconds"),
        "{metrics}"
    );
    assert!(
        metrics.contains("pawfect_worker_queue_wait_seconds_count"),
        "{metrics}"
    );

    w.shutdown.send(true).unwrap();
    w.handle.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_mid_denoise_and_prompt_sources() {
    let redis = RedisServer::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let inp = Inputs::create(tmp.path());
    let queue = Queue::connect(queue_config(&redis.url(), Duration::from_secs(5)))
        .await
        .unwrap();
    let w = start_worker(
        &redis,
        &inp.root,
        "w1",
        Duration::from_secs(5),
        Duration::from_secs(5),
        Duration::from_millis(50),
    )
    .await;

    let mut slow = inp.good(&inp.out("slow.png"));
    slow.steps = 100;
    enqueue(&queue, "slow", &slow).await;
    wait_denoising(&queue, "slow", Duration::from_secs(20)).await;
    assert_eq!(
        queue.cancel(POOL, "slow").await.unwrap(),
        pawfect_queue::CancelOutcome::Requested
    );
    let rec = wait_finished(&queue, "slow", Duration::from_secs(10)).await;
    assert_eq!(rec.state, JobState::Cancelled, "{rec:?}");
    assert!(!inp.root.join("out/slow.png").exists());

    let mut labels = inp.good(&inp.out("labels.png"));
    labels.scene_labels = Some(vec!["gravel path".into()]);
    enqueue(&queue, "labels", &labels).await;
    let mut explicit = inp.good(&inp.out("explicit.png"));
    explicit.prompt = Some("  wooden deck  ".into());
    enqueue(&queue, "explicit", &explicit).await;
    let rec = wait_finished(&queue, "labels", Duration::from_secs(20)).await;
    assert_eq!(
        rec.prompt.as_deref(),
        Some("gravel path, seamless continuation, no objects")
    );
    assert_eq!(rec.prompt_source.as_deref(), Some("sceneLabels"));
    assert_eq!(rec.caption, None);
    let rec = wait_finished(&queue, "explicit", Duration::from_secs(20)).await;
    assert_eq!(rec.prompt.as_deref(), Some("wooden deck"));
    assert_eq!(rec.prompt_source.as_deref(), Some("prompt"));

    w.shutdown.send(true).unwrap();
    w.handle.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_finishes_or_hands_back_and_a_dead_worker_is_replaced() {
    let redis = RedisServer::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let inp = Inputs::create(tmp.path());
    let lease = Duration::from_millis(1500);
    let queue = Queue::connect(queue_config(&redis.url(), lease))
        .await
        .unwrap();

    // Drain within the timeout: the job completes, then the worker stops.
    let a = start_worker(
        &redis,
        &inp.root,
        "a",
        lease,
        Duration::from_secs(10),
        Duration::from_millis(30),
    )
    .await;
    let mut job = inp.good(&inp.out("drained.png"));
    job.steps = 10;
    enqueue(&queue, "drained", &job).await;
    wait_denoising(&queue, "drained", Duration::from_secs(20)).await;
    a.shutdown.send(true).unwrap();
    a.handle.await.unwrap().unwrap();
    let rec = queue.get_job(POOL, "drained").await.unwrap().unwrap();
    assert_eq!(
        rec.state,
        JobState::Succeeded,
        "finished while draining: {rec:?}"
    );
    let (status, _) = (get_or_closed(a.http).await, ());
    assert_eq!(status, None, "http server stopped");

    // Drain timeout shorter than the job: handed back, the attempt not counted.
    let b = start_worker(
        &redis,
        &inp.root,
        "b",
        lease,
        Duration::from_millis(200),
        Duration::from_millis(50),
    )
    .await;
    let mut long = inp.good(&inp.out("handed.png"));
    long.steps = 100; // the CRD's maximum: 5 s at 50 ms a step
    // The hand-back does not count; the reclaim after the worker died does.
    long.max_attempts = 2;
    enqueue(&queue, "handed", &long).await;
    wait_denoising(&queue, "handed", Duration::from_secs(20)).await;
    b.shutdown.send(true).unwrap();
    b.handle.await.unwrap().unwrap();
    let rec = queue.get_job(POOL, "handed").await.unwrap().unwrap();
    assert_eq!(rec.state, JobState::Queued, "{rec:?}");
    assert_eq!(rec.attempt, 0, "a hand-back gives the attempt back");
    let events = all_events(&queue).await;
    let back = of(&events, "handed", EventKind::Retrying);
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].error().unwrap().reason, "HandedBack");

    // A worker that dies mid-job (its task is dropped: no heartbeat, no report) loses nothing:
    // another worker takes the job over after the lease and completes it once.
    let c = start_worker(
        &redis,
        &inp.root,
        "c",
        lease,
        Duration::from_secs(5),
        Duration::from_millis(50),
    )
    .await;
    let rec = wait_state(&queue, "handed", JobState::Running, Duration::from_secs(20)).await;
    assert_eq!(rec.worker.as_deref(), Some("c"));
    wait_denoising(&queue, "handed", Duration::from_secs(20)).await;
    c.handle.abort();
    let d = start_worker(
        &redis,
        &inp.root,
        "d",
        lease,
        Duration::from_secs(5),
        Duration::ZERO,
    )
    .await;
    let rec = wait_finished(&queue, "handed", Duration::from_secs(30)).await;
    assert_eq!(rec.state, JobState::Succeeded, "{rec:?}");
    assert_eq!(rec.worker.as_deref(), Some("d"));
    let events = all_events(&queue).await;
    assert_eq!(
        of(&events, "handed", EventKind::Succeeded).len(),
        1,
        "completed once"
    );
    let claims: Vec<_> = of(&events, "handed", EventKind::Claimed)
        .iter()
        .map(|e| e.worker.clone().unwrap_or_default())
        .collect();
    assert_eq!(claims, vec!["c".to_string(), "d".to_string()]);
    d.shutdown.send(true).unwrap();
    d.handle.await.unwrap().unwrap();
}

/// The status of GET /healthz, or None when nothing answers.
async fn get_or_closed(addr: std::net::SocketAddr) -> Option<u16> {
    tokio::net::TcpStream::connect(addr).await.ok()?;
    Some(get(addr, "/healthz").await.0)
}

/// Redis goes away for three leases while a job runs; the job finishes meanwhile. Its worker
/// checks its claim and reports for as long as Redis is away, and the restarted queue leaves it
/// a lease before taking anything over: the job is recorded on its first (and only allowed)
/// attempt, by the worker that ran it, although another worker claims right after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_longer_than_the_lease_costs_no_attempt() {
    let mut redis = RedisServer::start_aof().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let inp = Inputs::create(tmp.path());
    let lease = Duration::from_secs(1);
    let queue = Queue::connect(queue_config(&redis.url(), lease))
        .await
        .unwrap();
    let a = start_worker(
        &redis,
        &inp.root,
        "a",
        lease,
        Duration::from_secs(5),
        Duration::from_millis(100),
    )
    .await;
    wait_ready(a.http).await;
    // Another worker of the pool, claiming as fast as it can from the moment Redis is back.
    let mut other = queue.worker("test", "other").await.unwrap();

    let mut job = inp.good(&inp.out("outage.png"));
    // 20 steps of 100 ms: done about two seconds into the three-lease outage.
    job.steps = 20;
    job.max_attempts = 1;
    enqueue(&queue, "outage", &job).await;
    let rec = wait_denoising(&queue, "outage", Duration::from_secs(20)).await;
    assert_eq!(rec.worker.as_deref(), Some("a"));
    redis.stop().unwrap();
    tokio::time::sleep(lease * 3).await;
    redis.restart().unwrap();

    // The connections reconnect: transient errors until Redis answers.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let rec = loop {
        match other.claim(Duration::ZERO).await {
            Ok(Some(c)) => panic!("taken over after the outage: {c:?}"),
            Ok(None) => {}
            Err(e) => assert!(e.is_transient(), "{e}"),
        }
        match queue.get_job(POOL, "outage").await {
            Ok(Some(rec)) if rec.state.is_terminal() => break rec,
            Ok(_) => {}
            Err(e) => assert!(e.is_transient(), "{e}"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not finished in 30 s after the restart"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(rec.state, JobState::Succeeded, "{rec:?}");
    assert_eq!(rec.attempt, 1, "{rec:?}");
    assert_eq!(rec.worker.as_deref(), Some("a"));
    check_result(&inp, &rec, "outage.png");
    assert!(queue.dead_letters("test", 10).await.unwrap().is_empty());
    let events = all_events(&queue).await;
    assert_eq!(of(&events, "outage", EventKind::Claimed).len(), 1);
    assert_eq!(of(&events, "outage", EventKind::Succeeded).len(), 1);
    assert!(of(&events, "outage", EventKind::Failed).is_empty());

    a.shutdown.send(true).unwrap();
    a.handle.await.unwrap().unwrap();
}

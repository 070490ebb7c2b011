//! What a job may not make a worker do, tried against a real `pawfect-worker serve` process (tiny
//! fixture models, CPU) and a real `redis-server`:
//!
//! - read or write object-store locations outside `--allow-prefix` (a look-alike bucket, a
//!   sibling prefix, `..` and `%2e%2e` escapes, double slashes): refused at once with
//!   `OutsideAllowedPrefixes`, not retried, and the store is never contacted — the worker's S3
//!   endpoint is a local HTTP server that records every request, and one job inside the
//!   prefixes shows that it does reach it;
//! - overwrite its own input (the output spelled differently from the photo): `OutputIsInput`,
//!   the photo untouched;
//! - replace an existing output when the pool is create-only (`--no-overwrite`): `OutputExists`;
//! - leak a pre-signed URL's signature or a URL's password into the job's message, the queue's
//!   events or the worker's log.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::http::{Route, Server};
use common::jobs::*;
use common::models::models_dir;
use common::process::{Worker, free_port};
use pawfect_queue::testing::RedisServer;
use pawfect_queue::{JobState, Queue};
use tokio::process::Command;

const LEASE: Duration = Duration::from_secs(2);

/// A worker whose S3 endpoint is `s3` (plain http to loopback, static test credentials).
fn spawn_worker(
    redis: &RedisServer,
    models: &Path,
    root: &Path,
    s3: &Server,
    extra: &[&str],
    name: &str,
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
        .args(["--allow-prefix", "s3://photos/in/"])
        .args(extra)
        .args(["--crop-min-side", "128", "--crop-max-side", "256"])
        .args(["--http-allow-plain", "--http-allow-cidrs", "127.0.0.1/32"])
        .args(["--caption-beams", "1", "--log-format", "json"])
        .env("PAWFECT_REDIS_URL", redis.url())
        .env("PAWFECT_QUEUE_PREFIX", "guards")
        .env("PAWFECT_MODEL_VARIANT", "q8_0")
        .env("PAWFECT_LEASE", format!("{}ms", LEASE.as_millis()))
        .env("AWS_ENDPOINT", s3.url(""))
        .env("AWS_ALLOW_HTTP", "true")
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_REGION", "us-east-1")
        // The worker's own debug lines too: none of them may carry a secret either.
        .env("RUST_LOG", "info,pawfect_worker=debug")
        .env_remove("PAWFECT_MODELS")
        .env_remove("PAWFECT_TEST_FAULTS")
        .stdout(Stdio::null())
        .stderr(Stdio::from(file))
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    Worker { child, http, log }
}

async fn connect(redis: &RedisServer) -> Queue {
    let mut cfg = queue_config(&redis.url(), LEASE);
    cfg.prefix = "guards".into();
    Queue::connect(cfg).await.unwrap()
}

/// Every file below `dir`, relative, sorted.
fn files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_outside_the_prefixes_or_over_their_inputs_fail_and_write_nothing() {
    let redis = RedisServer::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let inp = Inputs::create(tmp.path());
    let models = models_dir(tmp.path());
    let s3 = Server::start().await;
    let queue = connect(&redis).await;
    let mut w = spawn_worker(&redis, &models, &inp.root, &s3, &[], "w1", tmp.path());
    w.wait_ready().await;
    let before = files(&inp.root);
    let photo_bytes = std::fs::read(inp.root.join("photo.png")).unwrap();

    let photo = inp.uri("photo.png");
    let mask = inp.uri("mask.png");
    let out = inp.out("never.png");
    // Retries allowed: a refusal must still end the job on its first attempt.
    let spec = |image: &str, mask: &str, output: &str| {
        let mut s = inp.spec(image, mask, output);
        s.max_attempts = 3;
        s
    };
    let outside = "OutsideAllowedPrefixes";
    let cases = [
        (
            "look-alike bucket",
            spec("s3://photos-evil/in/dog.png", &mask, &out),
            outside,
            "photo: s3://photos-evil/in/dog.png is outside the allowed object-store prefixes (s3://photos/in/)",
        ),
        (
            "sibling prefix",
            spec(&photo, "s3://photos/in-evil/mask.png", &out),
            outside,
            "mask: s3://photos/in-evil/mask.png is outside",
        ),
        (
            "dot-dot out of the prefix",
            spec(&photo, &mask, "s3://photos/in/../out/x.png"),
            outside,
            "output: s3://photos/in/../out/x.png is outside",
        ),
        (
            "encoded dot-dot",
            spec(&photo, &mask, "s3://photos/in/%2e%2e/out/x.png"),
            outside,
            "output: s3://photos/in/%2e%2e/out/x.png is outside",
        ),
        (
            "double slash",
            spec("s3://photos/in//dog.png", &mask, &out),
            outside,
            "photo: s3://photos/in//dog.png is outside",
        ),
        (
            "userinfo in front of the bucket",
            spec("s3://x@photos/in/dog.png", &mask, &out),
            outside,
            "photo: s3://REDACTED@photos/in/dog.png is outside",
        ),
        (
            "another object store",
            spec(&photo, &mask, "gs://photos/in/x.png"),
            outside,
            "output: gs://photos/in/x.png is outside",
        ),
        (
            "output is the photo, spelled differently",
            spec(
                &photo,
                &mask,
                &format!("file://{}/out/../photo.png", inp.root.display()),
            ),
            "OutputIsInput",
            "output: file://",
        ),
        (
            "output is the mask",
            spec(&photo, &mask, &mask),
            "OutputIsInput",
            "output: file://",
        ),
    ];
    for (i, (_, s, _, _)) in cases.iter().enumerate() {
        enqueue(&queue, &format!("refused-{i}"), s).await;
    }
    for (i, (name, _, reason, starts)) in cases.iter().enumerate() {
        let rec = wait_finished(&queue, &format!("refused-{i}"), Duration::from_secs(60)).await;
        assert_eq!(rec.state, JobState::Failed, "{name}: {rec:?}");
        assert_eq!(rec.reason.as_deref(), Some(*reason), "{name}: {rec:?}");
        assert_eq!(rec.attempt, 1, "{name}: not retried: {rec:?}");
        let msg = rec.message.clone().unwrap_or_default();
        assert!(msg.starts_with(starts), "{name}: {msg:?}");
    }
    assert!(
        s3.targets().is_empty(),
        "the object store was contacted for refused jobs: {:?}",
        s3.targets()
    );
    assert_eq!(files(&inp.root), before, "nothing written below the root");
    assert_eq!(
        std::fs::read(inp.root.join("photo.png")).unwrap(),
        photo_bytes
    );

    // Inside the prefixes the store is asked (and answers 404): the check above could fail.
    enqueue(
        &queue,
        "inside",
        &spec("s3://photos/in/dog.png", &mask, &out),
    )
    .await;
    let rec = wait_finished(&queue, "inside", Duration::from_secs(60)).await;
    assert_eq!(rec.reason.as_deref(), Some("InputNotFound"), "{rec:?}");
    assert_eq!(s3.targets(), ["/photos/in/dog.png"]);
    assert_eq!(files(&inp.root), before);
    drop(w);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_only_never_replaces_an_output() {
    let redis = RedisServer::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let inp = Inputs::create(tmp.path());
    let models = models_dir(tmp.path());
    let s3 = Server::start().await;
    let queue = connect(&redis).await;
    let existing = inp.root.join("out/existing.png");
    std::fs::write(&existing, b"keep me").unwrap();
    let mut w = spawn_worker(
        &redis,
        &models,
        &inp.root,
        &s3,
        &["--no-overwrite"],
        "w1",
        tmp.path(),
    );
    w.wait_ready().await;

    let mut taken = inp.good(&inp.out("existing.png"));
    taken.max_attempts = 3;
    enqueue(&queue, "taken", &taken).await;
    let rec = wait_finished(&queue, "taken", Duration::from_secs(60)).await;
    assert_eq!(rec.reason.as_deref(), Some("OutputExists"), "{rec:?}");
    assert_eq!(rec.attempt, 1, "not retried: {rec:?}");
    assert!(
        rec.message
            .as_deref()
            .unwrap_or("")
            .contains("exists already and is not replaced"),
        "{rec:?}"
    );
    assert_eq!(std::fs::read(&existing).unwrap(), b"keep me");

    // A new output is written once; a second job for it is then refused.
    let mut fresh = inp.good(&inp.out("fresh.png"));
    fresh.steps = 2;
    enqueue(&queue, "fresh", &fresh).await;
    let rec = wait_finished(&queue, "fresh", Duration::from_secs(120)).await;
    assert_eq!(rec.state, JobState::Succeeded, "{rec:?}");
    let first = std::fs::read(inp.root.join("out/fresh.png")).unwrap();
    let mut again = fresh.clone();
    again.seed = Some(99);
    enqueue(&queue, "again", &again).await;
    let rec = wait_finished(&queue, "again", Duration::from_secs(60)).await;
    assert_eq!(rec.reason.as_deref(), Some("OutputExists"), "{rec:?}");
    assert_eq!(
        std::fs::read(inp.root.join("out/fresh.png")).unwrap(),
        first
    );
    drop(w);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_url_never_shows_in_the_message_events_or_log() {
    const SIGNATURE: &str = "d3adb33fs1gnature";
    const PASSWORD: &str = "hunter2pw";
    let redis = RedisServer::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let inp = Inputs::create(tmp.path());
    let models = models_dir(tmp.path());
    let s3 = Server::start().await;
    let images = Server::start().await;
    let signed = format!("/dog.png?X-Amz-Credential=AKIA&X-Amz-Signature={SIGNATURE}");
    images.route(&signed, Route::status(403));
    let queue = connect(&redis).await;
    let mut w = spawn_worker(&redis, &models, &inp.root, &s3, &[], "w1", tmp.path());
    w.wait_ready().await;

    let image = images.url(&signed);
    let with_password =
        images
            .url("/mask.png?token=x")
            .replacen("http://", &format!("http://ci:{PASSWORD}@"), 1);
    let mut denied = inp.spec(&image, &inp.uri("mask.png"), &inp.out("x.png"));
    denied.max_attempts = 1;
    enqueue(&queue, "signed", &denied).await;
    let mut missing = inp.spec(&inp.uri("photo.png"), &with_password, &inp.out("y.png"));
    missing.max_attempts = 1;
    enqueue(&queue, "password", &missing).await;

    for uid in ["signed", "password"] {
        let rec = wait_finished(&queue, uid, Duration::from_secs(60)).await;
        assert_eq!(rec.state, JobState::Failed, "{rec:?}");
        let msg = rec.message.clone().unwrap_or_default();
        assert!(msg.contains("?REDACTED"), "{uid}: {msg}");
        for secret in [SIGNATURE, PASSWORD] {
            assert!(!msg.contains(secret), "{uid}: {msg}");
        }
    }
    // The URL did reach the image server, signature and all: only what is shown is redacted.
    assert_eq!(images.hits(&signed), 1);
    let events = all_events(&queue).await;
    assert!(!events.is_empty());
    for e in &events {
        let text = format!("{e:?}");
        for secret in [SIGNATURE, PASSWORD] {
            assert!(!text.contains(secret), "event {text}");
        }
    }
    drop(w);
    let log = std::fs::read_to_string(tmp.path().join("w1.log")).unwrap();
    assert!(
        log.contains("\"running\""),
        "the claims were logged:\n{log}"
    );
    assert!(
        log.contains("?REDACTED"),
        "the URIs were logged, redacted:\n{log}"
    );
    for secret in [SIGNATURE, PASSWORD] {
        assert!(!log.contains(secret), "{secret} in the log:\n{log}");
    }
}

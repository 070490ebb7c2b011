//! The real `pawfect-worker serve` process against a real redis-server that serves TLS only
//! (plaintext port off), its certificate signed by a CA generated here, logged in as its pool's
//! own ACL user (exactly `acl::WORKER_COMMANDS` on the pool's keys): with `--redis-ca-file`
//! the worker claims and finishes a job; without it, it claims nothing and keeps logging why
//! (the server's issuer is unknown; a private CA must be the Redis CA file).

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::jobs::*;
use common::models::models_dir;
use pawfect_queue::acl::Password;
use pawfect_queue::testing::{RedisServer, TestCa};
use pawfect_queue::{JobState, Queue, QueueConfig};
use tokio::process::Command;

const LEASE: Duration = Duration::from_secs(2);

struct User {
    name: String,
    password: String,
}

fn worker(redis: &RedisServer, user: &User, models: &Path, root: &Path, log: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pawfect-worker"));
    cmd.arg("serve")
        .arg("--models")
        .arg(models)
        .args(["--device", "cpu", "--pool", POOL, "--worker-name", "w1"])
        .args(["--http-addr", "127.0.0.1:0"])
        .arg("--allow-root")
        .arg(root)
        .args(["--crop-min-side", "128", "--crop-max-side", "256"])
        .args(["--caption-beams", "1"])
        .env("PAWFECT_REDIS_URL", redis.url())
        .env("PAWFECT_REDIS_USERNAME", &user.name)
        .env("PAWFECT_REDIS_PASSWORD", &user.password)
        .env("PAWFECT_QUEUE_PREFIX", "tls")
        .env("PAWFECT_MODEL_VARIANT", "q8_0")
        .env("PAWFECT_LEASE", format!("{}ms", LEASE.as_millis()))
        .env("RUST_LOG", "info")
        .env_remove("PAWFECT_MODELS")
        .env_remove("PAWFECT_REDIS_CA_FILE")
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(log).unwrap()))
        .kill_on_drop(true);
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_claims_and_finishes_a_job_over_tls() {
    let ca = TestCa::generate().unwrap();
    let redis = RedisServer::start_tls(&ca).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let inp = Inputs::create(tmp.path());
    let models = models_dir(tmp.path());
    let queue = Queue::connect(QueueConfig {
        prefix: "tls".into(),
        ca_file: Some(ca.ca_file()),
        ..queue_config(&redis.url(), LEASE)
    })
    .await
    .unwrap();
    // The pool's own user: the worker gets nothing else.
    let password = queue.generate_password().await.unwrap();
    let name = queue
        .apply_pool_user(POOL, &[Password::Plain(&password)])
        .await
        .unwrap();
    let user = User { name, password };

    let mut good = inp.good(&inp.out("tls.png"));
    good.steps = 2;
    good.seed = Some(3);
    enqueue(&queue, "tls-1", &good).await;

    // Without the CA the worker cannot trust the server: it claims nothing and says why.
    let log = tmp.path().join("no-ca.log");
    let mut untrusting = worker(&redis, &user, &models, &inp.root, &log)
        .spawn()
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("queue unreachable") {
            break text;
        }
        assert!(
            untrusting.try_wait().unwrap().is_none(),
            "worker exited: {text}"
        );
        assert!(tokio::time::Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(text.contains("UnknownIssuer"), "{text}");
    assert!(text.contains("Redis CA file"), "{text}");
    untrusting.kill().await.unwrap();
    let rec = queue.get_job(POOL, "tls-1").await.unwrap().unwrap();
    assert_eq!(rec.state, JobState::Queued, "{rec:?}");
    let log = tmp.path().join("w1.log");
    let mut w = worker(&redis, &user, &models, &inp.root, &log)
        .arg("--redis-ca-file")
        .arg(ca.ca_file())
        .spawn()
        .unwrap();
    let rec = wait_finished(&queue, "tls-1", Duration::from_secs(120)).await;
    assert_eq!(
        rec.state,
        JobState::Succeeded,
        "{rec:?}\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert_eq!(rec.worker.as_deref(), Some("w1"));
    check_result(&inp, &rec, "tls.png");
    // A clean shutdown (leave the pool) under the same user.
    let pid = w.id().expect("running").to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = tokio::time::timeout(Duration::from_secs(30), w.wait())
        .await
        .expect("exits after SIGTERM")
        .unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "{status}: {text}");
    assert!(
        !text.contains("NOPERM"),
        "the worker needed a command or key its user lacks:\n{text}"
    );
    let workers = queue.workers(POOL).await.unwrap();
    assert!(workers.is_empty(), "left the pool: {workers:?}");
}

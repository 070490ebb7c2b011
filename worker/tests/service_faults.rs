//! Real `pawfect-worker serve` processes under faults injected through `PAWFECT_TEST_FAULTS`,
//! against a real `redis-server`, on the tiny fixture models:
//!
//! - SIGTERM in the first moments of a worker's life (while its models load) ends it with exit
//!   status 0, promptly, instead of killing it by the signal;
//! - a worker frozen (SIGSTOP) mid-write, past its lease, resumes after another worker took the
//!   job over and finished it: its stale attempt does not replace the finished output.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::jobs::*;
use common::models::models_dir;
use common::process::{free_port, http_get};
use pawfect_queue::testing::RedisServer;
use pawfect_queue::{EventKind, JobState, Queue};
use tokio::process::{Child, Command};

const LEASE: Duration = Duration::from_secs(2);

struct Worker {
    child: Child,
    pid: u32,
    http: u16,
    log: PathBuf,
}

fn spawn_worker(redis_url: &str, dir: &Path, root: &Path, name: &str, faults: &str) -> Worker {
    let http = free_port();
    let log = dir.join(format!("{name}.log"));
    let file = std::fs::File::create(&log).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_pawfect-worker"))
        .arg("serve")
        .arg("--models")
        .arg(models_dir(&dir.join(name)))
        .args(["--device", "cpu", "--pool", "test", "--worker-name", name])
        .args(["--http-addr", &format!("127.0.0.1:{http}")])
        .arg("--allow-root")
        .arg(root)
        .args(["--crop-min-side", "128", "--crop-max-side", "256"])
        .args(["--caption-beams", "1", "--log-format", "json"])
        .env("PAWFECT_REDIS_URL", redis_url)
        .env("PAWFECT_QUEUE_PREFIX", "faults")
        .env("PAWFECT_MODEL_VARIANT", "q8_0")
        .env("PAWFECT_LEASE", format!("{}ms", LEASE.as_millis()))
        .env("PAWFECT_TEST_FAULTS", faults)
        .env("RUST_LOG", "info")
        .env_remove("PAWFECT_MODELS")
        .stdout(Stdio::null())
        .stderr(Stdio::from(file))
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = child.id().expect("running");
    Worker {
        child,
        pid,
        http,
        log,
    }
}

impl Worker {
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill")
            .args([sig, &self.pid.to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    async fn exit_code(&mut self, within: Duration) -> Option<i32> {
        match tokio::time::timeout(within, self.child.wait()).await {
            Ok(Ok(status)) => status.code(),
            _ => panic!("worker did not exit in {within:?}:\n{}", self.log_text()),
        }
    }

    /// A field of /proc/PID/status (e.g. `SigCgt`).
    fn proc_status(&self, field: &str) -> Option<String> {
        let text = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{field}:")))
            .map(|v| v.trim().to_string())
    }

    /// Whether the process catches SIGTERM (bit 15 of the caught-signals mask).
    fn catches_sigterm(&self) -> bool {
        self.proc_status("SigCgt")
            .and_then(|m| u64::from_str_radix(&m, 16).ok())
            .is_some_and(|m| m & (1 << (15 - 1)) != 0)
    }

    /// Whether the process is stopped (state `T`).
    fn is_stopped(&self) -> bool {
        self.proc_status("State")
            .is_some_and(|s| s.starts_with('T'))
    }

    async fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.http, path).await
    }

    async fn wait_ready(&mut self) {
        // Model loading on two shared CPU cores: 60 s bounds a hung start, not a slow one.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while tokio::time::Instant::now() < deadline {
            if let Some((200, _)) = self.get("/readyz").await {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("worker exited with {status}:\n{}", self.log_text());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("worker never ready:\n{}", self.log_text());
    }
}

/// Polls `cond` every 5 ms until it holds; panics after `within` (a bound on a hung process).
async fn wait_until(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_in_the_first_moments_exits_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    // Model loading waits for a file that never appears: the worker stays in its first phase.
    let never = tmp.path().join("never");
    let unreachable = format!("redis://127.0.0.1:{}/", free_port());
    let mut w = spawn_worker(
        &unreachable,
        tmp.path(),
        &root,
        "w",
        &format!("hold-load@{}", never.display()),
    );
    // The first moment a SIGTERM can be anything but fatal: the handler exists. Signalled right
    // then, the worker must exit 0 by itself, models never loaded.
    wait_until(
        "the worker never caught SIGTERM",
        Duration::from_secs(20),
        || w.catches_sigterm(),
    )
    .await;
    w.signal("-TERM");
    // Promptly: nothing to drain; 10 s only bounds a worker that waits for its models.
    assert_eq!(
        w.exit_code(Duration::from_secs(10)).await,
        Some(0),
        "{}",
        w.log_text()
    );
    assert!(!w.log_text().contains("models loaded"), "{}", w.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_stale_attempt_cannot_replace_the_output() {
    let redis = RedisServer::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let inp = Inputs::create(tmp.path());
    let mut cfg = queue_config(&redis.url(), LEASE);
    cfg.prefix = "faults".into();
    let queue = Queue::connect(cfg).await.unwrap();

    // `a` freezes itself (SIGSTOP) once its result is in the temporary file, right before the
    // output is put in place.
    let mut a = spawn_worker(
        &redis.url(),
        tmp.path(),
        &inp.root,
        "a",
        "freeze-store@frozen.png",
    );
    a.wait_ready().await;
    let mut spec = inp.good(&inp.out("frozen.png"));
    spec.steps = 2;
    // The takeover is the second attempt.
    spec.max_attempts = 3;
    enqueue(&queue, "frozen", &spec).await;
    // The fixture pipeline on CPU takes seconds; 120 s bounds a hung run.
    wait_until("worker a never froze", Duration::from_secs(120), || {
        a.is_stopped()
    })
    .await;
    let output = inp.root.join("out/frozen.png");
    assert!(
        !output.exists(),
        "the output was put in place before the freeze"
    );
    let rec = queue.get_job(POOL, "frozen").await.unwrap().unwrap();
    assert_eq!(
        (rec.state, rec.attempt, rec.worker.as_deref()),
        (JobState::Running, 1, Some("a"))
    );

    // `b` takes the job over after the lease and finishes it while `a` is frozen.
    let mut b = spawn_worker(&redis.url(), tmp.path(), &inp.root, "b", "");
    b.wait_ready().await;
    let rec = wait_finished(&queue, "frozen", Duration::from_secs(120)).await;
    assert_eq!(
        (rec.state, rec.attempt, rec.worker.as_deref()),
        (JobState::Succeeded, 2, Some("b")),
        "{rec:?}"
    );
    let before = std::fs::metadata(&output).unwrap();
    let bytes = std::fs::read(&output).unwrap();

    // `a` resumes, finishes its stale attempt and tries to put its output in place.
    a.signal("-CONT");
    // Its attempt ends as a duplicate of a finished job; 60 s bounds a hung worker.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let metrics = a.get("/metrics").await.map(|r| r.1).unwrap_or_default();
        if metrics.contains("pawfect_worker_jobs_total{outcome=\"duplicate\"") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "a never reported its stale attempt:\n{metrics}\n{}",
            a.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = std::fs::metadata(&output).unwrap();
    assert_eq!(
        (after.ino(), after.mtime_nsec()),
        (before.ino(), before.mtime_nsec()),
        "the stale attempt replaced the output"
    );
    assert_eq!(std::fs::read(&output).unwrap(), bytes);
    let names: Vec<String> = std::fs::read_dir(inp.root.join("out"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        vec!["frozen.png".to_string()],
        "temporary files left"
    );
    let rec = queue.get_job(POOL, "frozen").await.unwrap().unwrap();
    assert_eq!(
        (rec.state, rec.worker.as_deref()),
        (JobState::Succeeded, Some("b"))
    );
    let events = all_events(&queue).await;
    assert_eq!(of(&events, "frozen", EventKind::Succeeded).len(), 1);
    assert!(
        a.log_text().contains("no longer holds the job"),
        "{}",
        a.log_text()
    );

    for w in [&mut a, &mut b] {
        w.signal("-TERM");
        assert_eq!(w.exit_code(Duration::from_secs(20)).await, Some(0));
    }
}

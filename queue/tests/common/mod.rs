//! Shared helpers of the queue tests: a real redis-server per test and tiny job specs.
#![allow(dead_code)]

use std::time::Duration;

use pawfect_api::InpaintJobSpec;
use pawfect_queue::testing::RedisServer;
use pawfect_queue::{Event, EventKind, JobRef, Queue, QueueConfig};

/// Config for tests: short lease, fast heartbeat, short blocking reads.
pub fn config(url: &str, lease_ms: u64) -> QueueConfig {
    QueueConfig {
        lease: Duration::from_millis(lease_ms),
        heartbeat_interval: Some(Duration::from_millis((lease_ms / 6).max(5))),
        block_interval: Duration::from_millis(200),
        ..QueueConfig::new(url)
    }
}

pub async fn setup(lease_ms: u64) -> (RedisServer, Queue) {
    let server = RedisServer::start().expect("redis-server");
    let queue = Queue::connect(config(&server.url(), lease_ms))
        .await
        .expect("connect");
    (server, queue)
}

pub fn spec(pool: &str, priority: &str, max_attempts: u32) -> InpaintJobSpec {
    serde_json::from_value(serde_json::json!({
        "image": "file:///in/dog.png",
        "mask": "file:///in/dog-mask.png",
        "output": "file:///out/dog.png",
        "pool": pool,
        "priority": priority,
        "maxAttempts": max_attempts,
    }))
    .expect("spec")
}

pub fn job(uid: &str) -> JobRef {
    JobRef::new(uid, "pets", format!("job-{uid}"))
}

/// Every event not yet read through the operator group (read and acknowledged).
pub async fn all_events(queue: &Queue) -> Vec<Event> {
    let mut reader = queue.events("test-reader").await.expect("reader");
    let mut out = Vec::new();
    loop {
        let batch = reader
            .next(1000, Duration::from_millis(50))
            .await
            .expect("events");
        if batch.is_empty() {
            break;
        }
        reader.ack(&batch).await.expect("ack");
        out.extend(batch);
    }
    out
}

pub fn count(events: &[Event], uid: &str, kind: EventKind) -> usize {
    events
        .iter()
        .filter(|e| e.uid == uid && e.kind == kind)
        .count()
}

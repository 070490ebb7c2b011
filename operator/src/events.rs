//! Reads the queue's events stream (consumer group `operator`) and wakes the controllers:
//! every event wakes its InpaintJob (whose reconcile maps the job hash to the status), and
//! every event except progress also wakes the job's pool (a claim or an end changes the
//! queue depth and which workers are busy).
//!
//! The events only make things happen sooner: job and pool reconciles read the queue itself,
//! so an event lost or read twice changes nothing.

use std::time::Duration;

use futures::channel::mpsc::UnboundedSender;
use kube::runtime::reflector::ObjectRef;
use pawfect_api::{InpaintJob, InpaintPool};
use pawfect_queue::{Event, EventKind, Queue};
use tracing::{debug, warn};

use crate::metrics::Metrics;
use crate::{job_ref, split_queue_pool};

/// Where one event sends the controllers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wake {
    pub job: ObjectRef<InpaintJob>,
    pub pool: Option<ObjectRef<InpaintPool>>,
}

/// The controllers an event wakes (pure).
pub fn wake_for(ev: &Event) -> Wake {
    let pool = if ev.kind == EventKind::Progress {
        None
    } else {
        split_queue_pool(&ev.pool).map(|(ns, p)| ObjectRef::new(p).within(ns))
    };
    Wake {
        job: job_ref(&ev.namespace, &ev.name),
        pool,
    }
}

/// Channels into the controllers' `reconcile_on` streams.
#[derive(Clone)]
pub struct Triggers {
    pub jobs: UnboundedSender<ObjectRef<InpaintJob>>,
    pub pools: UnboundedSender<ObjectRef<InpaintPool>>,
}

impl Triggers {
    /// Sends the wake-ups of `ev`; false once the controllers are gone.
    pub fn send(&self, ev: &Event) -> bool {
        let w = wake_for(ev);
        let mut ok = self.jobs.unbounded_send(w.job).is_ok();
        if let Some(p) = w.pool {
            ok &= self.pools.unbounded_send(p).is_ok();
        }
        ok
    }
}

/// Batch size of one read of the events stream.
const BATCH: usize = 128;

/// Reads events until the controllers stop listening. Errors (Redis down) are logged and
/// retried with a growing pause; the reconciles' own resync covers the gap.
pub async fn run(
    queue: Queue,
    consumer: String,
    triggers: Triggers,
    metrics: &Metrics,
    block: Duration,
) {
    let mut pause = Duration::from_millis(200);
    let mut reader = loop {
        match queue.events(&consumer).await {
            Ok(r) => break r,
            Err(e) => {
                warn!(%e, "cannot open the queue's events stream; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(10));
            }
        }
    };
    pause = Duration::from_millis(200);
    loop {
        match reader.next(BATCH, block).await {
            Ok(events) => {
                pause = Duration::from_millis(200);
                if events.is_empty() {
                    if triggers.jobs.is_closed() {
                        return;
                    }
                    continue;
                }
                for ev in &events {
                    debug!(kind = %ev.kind, job = %ev.name, namespace = %ev.namespace, "queue event");
                    metrics.queue_event(ev.kind.as_str());
                    if !triggers.send(ev) {
                        return;
                    }
                }
                if let Err(e) = reader.ack(&events).await {
                    warn!(%e, "cannot acknowledge queue events (they will be read again)");
                }
            }
            Err(e) => {
                warn!(%e, "reading the queue's events failed; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(10));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use pawfect_api::StageTimings;
    use pawfect_queue::testing::RedisServer;
    use pawfect_queue::{JobRef, JobResult, Progress, QueueConfig};

    #[tokio::test]
    async fn queue_events_wake_the_job_and_its_pool() {
        let redis = RedisServer::start().unwrap();
        let queue = Queue::connect(QueueConfig::new(redis.url())).await.unwrap();
        let spec = serde_json::from_value(serde_json::json!({
            "image": "file:///i.png", "mask": "file:///m.png", "output": "file:///o.png",
            "pool": crate::queue_pool("pets", "t4")
        }))
        .unwrap();
        queue
            .enqueue(&JobRef::new("uid-1", "pets", "rex"), &spec)
            .await
            .unwrap();
        let mut session = queue.worker("pets/t4", "t4-worker-a").await.unwrap();
        let claim = session
            .claim(Duration::from_millis(100))
            .await
            .unwrap()
            .unwrap();
        claim
            .progress(&Progress::new("denoise", Some(1), Some(2)))
            .await
            .unwrap();
        claim
            .complete(&JobResult {
                output: "file:///o.png".into(),
                timings: StageTimings::default(),
                ..Default::default()
            })
            .await
            .unwrap();

        let (jobs_tx, mut jobs_rx) = futures::channel::mpsc::unbounded();
        let (pools_tx, mut pools_rx) = futures::channel::mpsc::unbounded();
        let metrics = std::sync::Arc::new(Metrics::default());
        let m = metrics.clone();
        let q = queue.clone();
        let task = tokio::spawn(async move {
            let triggers = Triggers {
                jobs: jobs_tx,
                pools: pools_tx,
            };
            run(
                q,
                "op-test".into(),
                triggers,
                &m,
                Duration::from_millis(100),
            )
            .await;
        });
        let want_job = job_ref("pets", "rex");
        let want_pool: ObjectRef<InpaintPool> = ObjectRef::new("t4").within("pets");
        for _ in 0..3 {
            let r = tokio::time::timeout(Duration::from_secs(5), jobs_rx.next())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(r, want_job);
        }
        // claimed and succeeded wake the pool; progress does not.
        for _ in 0..2 {
            let r = tokio::time::timeout(Duration::from_secs(5), pools_rx.next())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(r, want_pool);
        }
        assert!(
            tokio::time::timeout(Duration::from_millis(300), pools_rx.next())
                .await
                .is_err()
        );
        // Acknowledged: a second reader of the group gets nothing again.
        drop(jobs_rx);
        drop(pools_rx);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
        let mut again = queue.events("op-test").await.unwrap();
        assert!(
            again
                .next(10, Duration::from_millis(50))
                .await
                .unwrap()
                .is_empty()
        );
        let text = metrics.encode().unwrap();
        assert!(
            text.contains(r#"pawfect_operator_queue_events_total{kind="progress"} 1"#),
            "{text}"
        );
    }
}

//! Prometheus metrics of the operator (served on `/metrics` in the OpenMetrics text format).
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `pawfect_operator_queue_jobs` | gauge | namespace, pool, state (`waiting`/`running`) |
//! | `pawfect_operator_pool_replicas` | gauge | namespace, pool, kind (`desired`/`current`/`ready`/`busy`) |
//! | `pawfect_operator_pool_scale_total` | counter | namespace, pool, direction (`up`/`down`) |
//! | `pawfect_operator_reconcile_total` | counter | controller (`job`/`pool`) |
//! | `pawfect_operator_reconcile_errors_total` | counter | controller, error |
//! | `pawfect_operator_reconcile_duration_seconds` | histogram | controller |
//! | `pawfect_operator_reconcile_queue_depth` | gauge | controller (objects waiting for a reconcile) |
//! | `pawfect_operator_reconcile_queue_wait_seconds` | histogram | controller (first trigger to reconcile start) |
//! | `pawfect_operator_jobs_finished_total` | counter | namespace, pool, phase, reason |
//! | `pawfect_operator_job_duration_seconds` | histogram | pool, phase (queued to finished) |
//! | `pawfect_operator_queue_events_total` | counter | kind |

use std::time::Instant;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;
type HistogramFamily = Family<Labels, Histogram, fn() -> Histogram>;

fn reconcile_histogram() -> Histogram {
    // 1 ms … ~33 s
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

fn queue_wait_histogram() -> Histogram {
    // 1 ms … ~9 min: a backlog under load is measured, not clipped at a few seconds
    Histogram::new(exponential_buckets(0.001, 2.0, 20))
}

fn job_histogram() -> Histogram {
    // 1 s … ~4.5 h
    Histogram::new(exponential_buckets(1.0, 2.0, 15))
}

/// Every metric of the operator and the registry that encodes them.
pub struct Metrics {
    registry: Registry,
    queue_jobs: Family<Labels, Gauge>,
    pool_replicas: Family<Labels, Gauge>,
    pool_scale: Family<Labels, Counter>,
    reconciles: Family<Labels, Counter>,
    reconcile_errors: Family<Labels, Counter>,
    reconcile_duration: HistogramFamily,
    reconcile_queue_depth: Family<Labels, Gauge>,
    reconcile_queue_wait: HistogramFamily,
    jobs_finished: Family<Labels, Counter>,
    job_duration: HistogramFamily,
    queue_events: Family<Labels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("pawfect_operator");
        let queue_jobs = Family::<Labels, Gauge>::default();
        registry.register(
            "queue_jobs",
            "Jobs of a pool's queue by state (waiting, running)",
            queue_jobs.clone(),
        );
        let pool_replicas = Family::<Labels, Gauge>::default();
        registry.register(
            "pool_replicas",
            "Worker replicas of a pool: desired (autoscaler), current (Deployment spec), ready, busy",
            pool_replicas.clone(),
        );
        let pool_scale = Family::<Labels, Counter>::default();
        registry.register(
            "pool_scale",
            "Changes of a pool's replicas by direction",
            pool_scale.clone(),
        );
        let reconciles = Family::<Labels, Counter>::default();
        registry.register("reconcile", "Reconciles run", reconciles.clone());
        let reconcile_errors = Family::<Labels, Counter>::default();
        registry.register(
            "reconcile_errors",
            "Reconciles that failed",
            reconcile_errors.clone(),
        );
        let reconcile_duration = HistogramFamily::new_with_constructor(reconcile_histogram);
        registry.register(
            "reconcile_duration_seconds",
            "Duration of a reconcile",
            reconcile_duration.clone(),
        );
        let reconcile_queue_depth = Family::<Labels, Gauge>::default();
        registry.register(
            "reconcile_queue_depth",
            "Objects waiting for a reconcile (triggered, reconcile not started)",
            reconcile_queue_depth.clone(),
        );
        let reconcile_queue_wait = HistogramFamily::new_with_constructor(queue_wait_histogram);
        registry.register(
            "reconcile_queue_wait_seconds",
            "Time from an object's first unserved trigger to the start of its reconcile",
            reconcile_queue_wait.clone(),
        );
        let jobs_finished = Family::<Labels, Counter>::default();
        registry.register(
            "jobs_finished",
            "InpaintJobs that reached a terminal phase",
            jobs_finished.clone(),
        );
        let job_duration = HistogramFamily::new_with_constructor(job_histogram);
        registry.register(
            "job_duration_seconds",
            "Time from queued to finished of an InpaintJob",
            job_duration.clone(),
        );
        let queue_events = Family::<Labels, Counter>::default();
        registry.register(
            "queue_events",
            "Events read from the queue's events stream",
            queue_events.clone(),
        );
        Metrics {
            registry,
            queue_jobs,
            pool_replicas,
            pool_scale,
            reconciles,
            reconcile_errors,
            reconcile_duration,
            reconcile_queue_depth,
            reconcile_queue_wait,
            jobs_finished,
            job_duration,
            queue_events,
        }
    }
}

/// What a pool poll observed and decided.
#[derive(Clone, Copy, Debug, Default)]
pub struct PoolSample {
    pub waiting: u64,
    pub running: u64,
    pub desired: u32,
    pub current: u32,
    pub ready: u32,
    pub busy: u32,
}

fn gauge_value(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Metrics {
    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        encode(&mut out, &self.registry)?;
        Ok(out)
    }

    /// Starts timing a reconcile of `controller`; the time is recorded when the guard drops.
    pub fn reconcile(&self, controller: &'static str) -> ReconcileTimer<'_> {
        self.reconciles
            .get_or_create(&vec![("controller", controller.to_string())])
            .inc();
        ReconcileTimer {
            metrics: self,
            controller,
            start: Instant::now(),
        }
    }

    pub fn reconcile_queue_depth(&self, controller: &'static str, depth: usize) {
        self.reconcile_queue_depth
            .get_or_create(&vec![("controller", controller.to_string())])
            .set(i64::try_from(depth).unwrap_or(i64::MAX));
    }

    pub fn reconcile_queue_wait(&self, controller: &'static str, seconds: f64) {
        self.reconcile_queue_wait
            .get_or_create(&vec![("controller", controller.to_string())])
            .observe(seconds);
    }

    pub fn reconcile_failed(&self, controller: &'static str, error: &str) {
        self.reconcile_errors
            .get_or_create(&vec![
                ("controller", controller.to_string()),
                ("error", error.to_string()),
            ])
            .inc();
    }

    pub fn pool(&self, namespace: &str, pool: &str, s: PoolSample) {
        let l = |k: &'static str, v: &str| {
            vec![
                ("namespace", namespace.to_string()),
                ("pool", pool.to_string()),
                (k, v.to_string()),
            ]
        };
        self.queue_jobs
            .get_or_create(&l("state", "waiting"))
            .set(gauge_value(s.waiting));
        self.queue_jobs
            .get_or_create(&l("state", "running"))
            .set(gauge_value(s.running));
        for (kind, v) in [
            ("desired", s.desired),
            ("current", s.current),
            ("ready", s.ready),
            ("busy", s.busy),
        ] {
            self.pool_replicas
                .get_or_create(&l("kind", kind))
                .set(i64::from(v));
        }
        if s.desired != s.current {
            let dir = if s.desired > s.current { "up" } else { "down" };
            self.pool_scale.get_or_create(&l("direction", dir)).inc();
        }
    }

    /// Forgets the series of a deleted pool.
    pub fn pool_removed(&self, namespace: &str, pool: &str) {
        let l = |k: &'static str, v: &str| {
            vec![
                ("namespace", namespace.to_string()),
                ("pool", pool.to_string()),
                (k, v.to_string()),
            ]
        };
        for st in ["waiting", "running"] {
            self.queue_jobs.remove(&l("state", st));
        }
        for kind in ["desired", "current", "ready", "busy"] {
            self.pool_replicas.remove(&l("kind", kind));
        }
    }

    pub fn job_finished(
        &self,
        namespace: &str,
        pool: &str,
        phase: &str,
        reason: &str,
        seconds: Option<f64>,
    ) {
        self.jobs_finished
            .get_or_create(&vec![
                ("namespace", namespace.to_string()),
                ("pool", pool.to_string()),
                ("phase", phase.to_string()),
                ("reason", reason.to_string()),
            ])
            .inc();
        if let Some(s) = seconds {
            self.job_duration
                .get_or_create(&vec![
                    ("pool", pool.to_string()),
                    ("phase", phase.to_string()),
                ])
                .observe(s);
        }
    }

    pub fn queue_event(&self, kind: &str) {
        self.queue_events
            .get_or_create(&vec![("kind", kind.to_string())])
            .inc();
    }
}

/// Records a reconcile's duration on drop.
pub struct ReconcileTimer<'a> {
    metrics: &'a Metrics,
    controller: &'static str,
    start: Instant,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.metrics
            .reconcile_duration
            .get_or_create(&vec![("controller", self.controller.to_string())])
            .observe(self.start.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_pool_and_job_metrics() {
        let m = Metrics::default();
        m.pool(
            "media",
            "t4",
            PoolSample {
                waiting: 3,
                running: 2,
                desired: 5,
                current: 2,
                ready: 2,
                busy: 2,
            },
        );
        m.job_finished("media", "t4", "Succeeded", "Succeeded", Some(42.0));
        drop(m.reconcile("pool"));
        m.reconcile_failed("job", "queue");
        let text = m.encode().unwrap();
        for needle in [
            r#"pawfect_operator_queue_jobs{namespace="media",pool="t4",state="waiting"} 3"#,
            r#"pawfect_operator_pool_replicas{namespace="media",pool="t4",kind="desired"} 5"#,
            r#"pawfect_operator_pool_scale_total{namespace="media",pool="t4",direction="up"} 1"#,
            r#"pawfect_operator_jobs_finished_total{namespace="media",pool="t4",phase="Succeeded",reason="Succeeded"} 1"#,
            r#"pawfect_operator_job_duration_seconds_count{pool="t4",phase="Succeeded"} 1"#,
            r#"pawfect_operator_reconcile_total{controller="pool"} 1"#,
            r#"pawfect_operator_reconcile_errors_total{controller="job",error="queue"} 1"#,
            r#"pawfect_operator_reconcile_duration_seconds_count{controller="pool"} 1"#,
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
        m.pool_removed("media", "t4");
        let text = m.encode().unwrap();
        assert!(!text.contains(r#"pawfect_operator_queue_jobs{namespace="media""#));
    }
}

//! Pawfect Inpaint operator: the InpaintJob and InpaintPool controllers, the queue-depth
//! autoscaler of the GPU worker pools, and the wiring of the `pawfect-operator` binary.
//!
//! - [`job`]: finalizer, exactly-once enqueue, status from the queue's job hash (server-side
//!   apply, field manager [`FIELD_MANAGER`]), `timeoutSeconds`, `ttlSecondsAfterFinished`,
//!   cancel on delete, Kubernetes Events.
//! - [`pool`]: the worker Deployment `<pool>-worker` (built by [`deployment`]), its replicas
//!   (decided by [`autoscaler`]), pod-deletion-cost / safe-to-evict annotations, pool status.
//! - [`pool_user`]: each pool's own Redis user, its Secret and the sweep of deleted pools' users.
//! - [`events`]: reads the queue's events streams and wakes the controllers.
//! - [`status`]: the status mapping as pure functions.
//! - [`run`]: the `pawfect-operator run` process (controllers, HTTP, leader election).

pub mod autoscaler;
pub mod backlog;
pub mod default_pool;
pub mod deployment;
pub mod events;
pub mod http;
pub mod job;
pub mod metrics;
pub mod pool;
pub mod pool_user;
pub mod run;
pub mod status;

#[cfg(test)]
pub mod fixtures;
#[cfg(test)]
mod reconcile_tests;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::channel::mpsc::UnboundedSender;
use kube::Client;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use pawfect_api::{InpaintJob, InpaintPool};
use pawfect_queue::Queue;

use crate::deployment::WorkerConnection;
use crate::metrics::Metrics;

/// Field manager of every server-side apply the operator makes (statuses, Deployments).
pub const FIELD_MANAGER: &str = "pawfect-operator";
/// Name the operator reports Kubernetes Events under.
pub const REPORTER: &str = "pawfect-operator";

/// Errors of a reconcile.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[source] kube::Error),
    #[error("queue: {0}")]
    Queue(#[from] pawfect_queue::QueueError),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("{kind} has no {field}")]
    MissingField {
        kind: &'static str,
        field: &'static str,
    },
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
}

impl From<kube::Error> for Error {
    fn from(e: kube::Error) -> Self {
        Error::Kube(e)
    }
}

impl Error {
    /// Short label for the errors metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Queue(_) => "queue",
            Error::Finalizer(e) => match e.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(inner)
                | kube::runtime::finalizer::Error::CleanupFailed(inner) => inner.metric_label(),
                _ => "finalizer",
            },
            Error::MissingField { .. } => "invalid_object",
            Error::Json(_) => "json",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Timing knobs of the controllers.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Longest time between two reconciles of a running job (resync from the job hash,
    /// should every event be lost).
    pub job_resync: Duration,
    /// The same for a job waiting in the queue (its claim event wakes it; this only bounds
    /// the delay should that event be lost, and keeps a long backlog cheap).
    pub queued_resync: Duration,
    /// Retry interval of a job whose pool does not exist (pool creation also wakes it).
    pub pool_missing_retry: Duration,
    /// Retry interval after a failed reconcile.
    pub error_retry: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            job_resync: Duration::from_secs(60),
            queued_resync: Duration::from_secs(300),
            pool_missing_retry: Duration::from_secs(30),
            error_retry: Duration::from_secs(10),
        }
    }
}

/// Shared state of both controllers.
pub struct Context {
    pub client: Client,
    pub queue: Queue,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// How workers reach Redis.
    pub worker: WorkerConnection,
    pub settings: Settings,
    /// Wakes the pool controller (a job was enqueued, a queue event arrived).
    pub pool_wake: Option<UnboundedSender<ObjectRef<InpaintPool>>>,
    /// Autoscaler history per pool (`namespace/name`), with the time the pool was last seen.
    pub scale_history: Mutex<HashMap<String, (autoscaler::History, jiff::Timestamp)>>,
    /// Log format the worker pods get as `PAWFECT_LOG_FORMAT` (`text`/`json`; `None`: the
    /// workers' own default). `pawfect-operator run` passes its own `--log-format`.
    pub worker_log_format: Option<&'static str>,
    /// Whether pools may mount their models from a `hostPath`. `pawfect-operator run` sets it
    /// from `--allow-host-path-models` (off unless given); a context built here for tests or
    /// embedding allows it, as before the flag existed.
    pub allow_host_path_models: bool,
    /// Whether each pool's workers log in as a Redis user of their own (`pool_user`), made and
    /// kept by the pool reconcile; off: they get the shared password. `pawfect-operator run`
    /// sets it from `--pool-redis-users`.
    pub pool_redis_users: bool,
    /// The pool controller's cache of InpaintPools (a job's pool is looked up here before the
    /// API server is asked); `None` asks the API server every time.
    pub pools: Option<kube::runtime::reflector::Store<InpaintPool>>,
    /// Jobs and pools waiting for their reconcile (the reconcile queue depth metrics).
    pub job_backlog: Arc<backlog::Backlog<InpaintJob>>,
    pub pool_backlog: Arc<backlog::Backlog<InpaintPool>>,
}

impl Context {
    pub fn new(
        client: Client,
        queue: Queue,
        metrics: Arc<Metrics>,
        worker: WorkerConnection,
        reporter_instance: Option<String>,
    ) -> Self {
        let reporter = Reporter {
            controller: REPORTER.into(),
            instance: reporter_instance,
        };
        Context {
            pools: None,
            job_backlog: Arc::new(backlog::Backlog::new("job", metrics.clone())),
            pool_backlog: Arc::new(backlog::Backlog::new("pool", metrics.clone())),
            recorder: Recorder::new(client.clone(), reporter),
            client,
            queue,
            metrics,
            worker,
            settings: Settings::default(),
            pool_wake: None,
            scale_history: Mutex::new(HashMap::new()),
            worker_log_format: None,
            allow_host_path_models: true,
            pool_redis_users: false,
        }
    }

    /// Asks the pool controller to reconcile a pool soon.
    pub fn wake_pool(&self, namespace: &str, pool: &str) {
        if let Some(tx) = &self.pool_wake {
            // A closed channel means the operator is shutting down.
            let _ = tx.unbounded_send(ObjectRef::new(pool).within(namespace));
        }
    }
}

/// The queue pool of an InpaintPool: `<namespace>/<pool>`. Pools of the same name in two
/// namespaces thus never share a queue (nor workers). The workers of a pool get it as
/// `--pool`, and jobs are enqueued under it.
pub fn queue_pool(namespace: &str, pool: &str) -> String {
    format!("{namespace}/{pool}")
}

/// The (namespace, pool) of a queue pool name made by [`queue_pool`].
pub fn split_queue_pool(queue_pool: &str) -> Option<(&str, &str)> {
    queue_pool
        .split_once('/')
        .filter(|(ns, p)| !ns.is_empty() && !p.is_empty())
}

/// Object reference of an InpaintJob for triggers.
pub fn job_ref(namespace: &str, name: &str) -> ObjectRef<InpaintJob> {
    ObjectRef::new(name).within(namespace)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_pool_round_trip() {
        assert_eq!(queue_pool("media", "t4"), "media/t4");
        assert_eq!(split_queue_pool("media/t4"), Some(("media", "t4")));
        assert_eq!(split_queue_pool("t4"), None);
        assert_eq!(split_queue_pool("/t4"), None);
    }
}

//! `pawfect-worker serve`: the queue loop of one worker.
//!
//! 1. Serves `/healthz`, `/readyz`, `/metrics` right away (see [`http`]).
//! 2. Loads the models once (time logged and exported as `pawfect_worker_model_load_seconds`);
//!    a shutdown requested meanwhile ends the worker at once.
//! 3. Connects to Redis (retrying until it answers) and joins its pool.
//! 4. Claims one job at a time (high priority first; jobs of dead workers are taken over), runs
//!    the pipeline with heartbeats, progress events and cancellation checks between denoise
//!    steps, and reports the result or the failure with its reason (see [`job`]).
//! 5. On shutdown (SIGTERM): stops claiming, lets the current job finish within the drain
//!    timeout or hands it back to the queue, leaves the pool, returns `Ok` (exit 0).
//!
//! Every log line of a job carries its uid (the `job` span).

#[cfg(feature = "test-faults")]
pub mod fast_model;
#[cfg(feature = "test-faults")]
pub mod faults;
pub mod http;
pub mod job;
pub mod metrics;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use pawfect_queue::{Queue, QueueConfig, QueueError, WorkerSession};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::pipeline::{Inpainter, Models, Pipeline, PipelineConfig};
use crate::storage::{Storage, StorageConfig, StorageError};
pub use metrics::Metrics;

pub use crate::pipeline::adapters::GpuMemoryProbe;

/// The variable that asks for injected faults; a binary built without `test-faults` refuses to
/// start when it is set, rather than silently running without the faults a test expects.
pub const TEST_FAULTS_ENV: &str = "PAWFECT_TEST_FAULTS";
/// The variable that asks for the fast stand-in model ([`fast_model`], scale tests); refused
/// like [`TEST_FAULTS_ENV`].
pub const TEST_FAST_MODEL_ENV: &str = "PAWFECT_TEST_FAST_MODEL";

/// Everything `serve` needs besides the models.
pub struct ServeConfig {
    pub pool: String,
    pub worker_name: String,
    pub queue: QueueConfig,
    pub storage: StorageConfig,
    pub pipeline: PipelineConfig,
    /// How long a running job may go on after shutdown was requested before it is handed back.
    pub drain_timeout: Duration,
    /// Longest single claim call (shutdown is noticed between claims).
    pub claim_wait: Duration,
    /// Labels of the `models_loaded` metric.
    pub model_variant: String,
    pub device: String,
    /// Injected faults (tests only, see [`faults`]).
    #[cfg(feature = "test-faults")]
    pub faults: Vec<faults::Fault>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("loading the models failed: {0}")]
    Models(String),
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    #[error("queue: {0}")]
    Queue(#[from] QueueError),
    #[error("http server: {0}")]
    Http(#[from] std::io::Error),
}

/// What the model loader hands over.
pub struct Loaded {
    pub models: Models,
    /// Reads the GPU memory of the device the models are on (CUDA only).
    pub gpu_memory: Option<GpuMemoryProbe>,
}

/// State shared by the loop and the HTTP endpoints.
pub struct Shared {
    pub metrics: Metrics,
    models_loaded: AtomicBool,
    queue_ok: AtomicBool,
    draining: AtomicBool,
    gpu_memory: std::sync::OnceLock<GpuMemoryProbe>,
    /// The loaded inpainter, for the metrics it keeps itself (its prompt cache).
    inpainter: std::sync::OnceLock<Arc<dyn Inpainter>>,
    /// Injected faults that act outside the inpainter (tests only).
    #[cfg(feature = "test-faults")]
    faults: std::sync::OnceLock<Vec<faults::Fault>>,
}

impl Shared {
    fn new() -> Self {
        Shared {
            metrics: Metrics::new(),
            models_loaded: AtomicBool::new(false),
            queue_ok: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            gpu_memory: std::sync::OnceLock::new(),
            inpainter: std::sync::OnceLock::new(),
            #[cfg(feature = "test-faults")]
            faults: std::sync::OnceLock::new(),
        }
    }

    /// Ok when the worker takes jobs, else why not.
    pub fn readiness(&self) -> Result<(), &'static str> {
        if !self.models_loaded.load(Ordering::Acquire) {
            Err("models are loading")
        } else if self.draining.load(Ordering::Acquire) {
            Err("shutting down")
        } else if !self.queue_ok.load(Ordering::Acquire) {
            Err("queue unreachable")
        } else {
            Ok(())
        }
    }

    fn update_ready(&self) {
        self.metrics.ready.set(i64::from(self.readiness().is_ok()));
    }

    fn set_queue_ok(&self, ok: bool) {
        self.queue_ok.store(ok, Ordering::Release);
        self.update_ready();
    }

    /// Reads what the device and the models measure themselves into the metrics.
    pub fn refresh_model_metrics(&self) {
        if let Some((used, total)) = self.gpu_memory.get().and_then(|probe| probe()) {
            self.metrics.set_gpu_memory(used, total);
        }
        if let Some(u) = self.inpainter.get().and_then(|i| i.prompt_cache()) {
            self.metrics.set_prompt_cache(&u);
        }
    }
}

/// Binds the HTTP address.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, ServeError> {
    Ok(TcpListener::bind(addr).await?)
}

/// Runs a worker until `shutdown` turns true (see the module docs). `load` builds the models
/// (on a blocking thread); an error there ends `run` with [`ServeError::Models`].
pub async fn run<F>(
    config: ServeConfig,
    listener: TcpListener,
    load: F,
    shutdown: watch::Receiver<bool>,
) -> Result<(), ServeError>
where
    F: FnOnce() -> Result<Loaded, String> + Send + 'static,
{
    let ServeConfig {
        pool,
        worker_name,
        queue: queue_config,
        storage,
        pipeline: pipeline_config,
        drain_timeout,
        claim_wait,
        model_variant,
        device,
        #[cfg(feature = "test-faults")]
        faults,
    } = config;
    let shared = Arc::new(Shared::new());
    #[cfg(feature = "test-faults")]
    let _ = shared.faults.set(faults.clone());
    shared.update_ready();
    let http_addr = listener.local_addr()?;
    // The endpoints stay up while a job drains; they stop once the loop has ended.
    let (http_stop, http_stopped) = watch::channel(false);
    let http = tokio::spawn(http::serve(listener, shared.clone(), http_stopped));
    // Not ready from the moment shutdown is requested (a running job may still drain).
    {
        let shared = shared.clone();
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            if shutdown.wait_for(|s| *s).await.is_ok() {
                shared.draining.store(true, Ordering::Release);
                shared.update_ready();
            }
        });
    }
    tracing::info!(%http_addr, pool = %pool, worker = %worker_name, "worker starting");

    let storage = Storage::new(storage)?;
    let started = Instant::now();
    // A shutdown while the models load ends the worker at once (it holds no job yet); the
    // loader's thread is left to the process exit.
    let loader = tokio::task::spawn_blocking(load);
    let loaded = tokio::select! {
        r = loader => r.map_err(|e| ServeError::Models(format!("model loader panicked: {e}")))?,
        true = requested(shutdown.clone()) => {
            tracing::info!("shutdown requested while the models load: stopping");
            let _ = http_stop.send(true);
            let _ = http.await;
            return Ok(());
        }
    };
    let Loaded { models, gpu_memory } = match loaded {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "loading the models failed");
            http.abort();
            return Err(ServeError::Models(e));
        }
    };
    if let Some(probe) = gpu_memory {
        let _ = shared.gpu_memory.set(probe);
    }
    #[cfg(feature = "test-faults")]
    let mut models = models;
    #[cfg(feature = "test-faults")]
    if !faults.is_empty() {
        tracing::warn!(
            ?faults,
            "{} is set: injecting faults into matching jobs",
            faults::ENV
        );
        models.inpainter = Arc::new(faults::FaultyInpainter::new(models.inpainter, faults));
    }
    let load_time = started.elapsed();
    shared
        .metrics
        .model_load_seconds
        .set(load_time.as_secs_f64());
    shared
        .metrics
        .models_loaded
        .get_or_create(&metrics::ModelLabels {
            variant: model_variant.clone(),
            device: device.clone(),
        })
        .set(1);
    shared.models_loaded.store(true, Ordering::Release);
    let _ = shared.inpainter.set(models.inpainter.clone());
    shared.refresh_model_metrics();
    tracing::info!(
        load_ms = load_time.as_millis() as u64,
        variant = %model_variant,
        device = %device,
        "models loaded"
    );
    let pipeline = Arc::new(Pipeline::new(models, storage, pipeline_config));

    let result = claim_loop(
        &pool,
        &worker_name,
        queue_config,
        pipeline,
        &shared,
        drain_timeout,
        claim_wait,
        shutdown.clone(),
    )
    .await;
    shared.draining.store(true, Ordering::Release);
    shared.update_ready();
    let _ = http_stop.send(true);
    let _ = http.await;
    tracing::info!("worker stopped");
    result
}

/// Resolves to true once shutdown is requested (false if it never can be: the sender is gone).
async fn requested(mut shutdown: watch::Receiver<bool>) -> bool {
    shutdown.wait_for(|s| *s).await.is_ok()
}

#[allow(clippy::too_many_arguments)]
async fn claim_loop(
    pool: &str,
    worker_name: &str,
    queue_config: QueueConfig,
    pipeline: Arc<Pipeline>,
    shared: &Arc<Shared>,
    drain_timeout: Duration,
    claim_wait: Duration,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ServeError> {
    let Some(mut session) =
        join_pool(pool, worker_name, queue_config, shared, &mut shutdown).await?
    else {
        return Ok(());
    };
    let mut backoff = Duration::from_millis(200);
    while !*shutdown.borrow() {
        match session.claim(claim_wait).await {
            Ok(Some(claim)) => {
                shared.set_queue_ok(true);
                backoff = Duration::from_millis(200);
                job::run_claim(
                    claim,
                    session.queue(),
                    &pipeline,
                    shared,
                    drain_timeout,
                    shutdown.clone(),
                )
                .await;
            }
            Ok(None) => {
                shared.set_queue_ok(true);
                backoff = Duration::from_millis(200);
            }
            Err(e) => {
                shared.metrics.queue_errors.inc();
                shared.set_queue_ok(false);
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "claim failed");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.wait_for(|s| *s) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
    tracing::info!("shutdown requested: no more claims");
    shared.draining.store(true, Ordering::Release);
    shared.update_ready();
    if let Err(e) = session.leave().await {
        tracing::warn!(error = %e, "leaving the pool failed");
    }
    Ok(())
}

/// Connects and joins the pool, retrying until Redis answers or shutdown is requested
/// (then None).
async fn join_pool(
    pool: &str,
    worker_name: &str,
    config: QueueConfig,
    shared: &Shared,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Option<WorkerSession>, ServeError> {
    config.validate()?;
    let mut backoff = Duration::from_millis(200);
    loop {
        if *shutdown.borrow() {
            return Ok(None);
        }
        let attempt = async {
            let queue = Queue::connect(config.clone()).await?;
            queue.worker(pool, worker_name).await
        };
        match attempt.await {
            Ok(session) => {
                shared.set_queue_ok(true);
                tracing::info!("joined the pool");
                return Ok(Some(session));
            }
            Err(
                e @ (QueueError::InvalidName { .. }
                | QueueError::Config(_)
                | QueueError::CaFile { .. }),
            ) => {
                return Err(e.into());
            }
            Err(e) => {
                shared.metrics.queue_errors.inc();
                shared.set_queue_ok(false);
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "queue unreachable");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.wait_for(|s| *s) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

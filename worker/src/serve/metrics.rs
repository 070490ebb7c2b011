//! Prometheus metrics of a worker (`/metrics`, OpenMetrics text).

use std::sync::atomic::AtomicU64;

use pawfect_api::StageTimings;

use crate::pipeline::PromptCacheUsage;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// succeeded, failed, requeued, cancelled, handed_back, lost
    pub outcome: String,
    /// Failure reason (empty on success).
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabels {
    pub stage: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GpuMemoryLabels {
    /// used, total
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub variant: String,
    pub device: String,
}

/// Every metric the worker exports, prefixed `pawfect_worker_`.
pub struct Metrics {
    pub registry: Registry,
    pub jobs: Family<OutcomeLabels, Counter>,
    pub stage_seconds: Family<StageLabels, Histogram>,
    pub job_seconds: Histogram,
    pub queue_wait_seconds: Histogram,
    pub model_load_seconds: Gauge<f64, AtomicU64>,
    pub models_loaded: Family<ModelLabels, Gauge>,
    pub ready: Gauge,
    pub busy: Gauge,
    pub queue_errors: Counter,
    pub gpu_memory_bytes: Family<GpuMemoryLabels, Gauge>,
    pub prompt_cache_hits: Counter,
    pub prompt_cache_misses: Counter,
    pub prompt_cache_evictions: Counter,
    pub prompt_cache_entries: Gauge,
    pub prompt_cache_bytes: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("pawfect_worker");
        let jobs = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "jobs",
            "Jobs finished by this worker, by outcome and reason",
            jobs.clone(),
        );
        let stage_seconds = Family::<StageLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 20))
        });
        registry.register(
            "stage_seconds",
            "Time per pipeline stage (fetch, mask, crop, caption, encode, denoise, decode, stitch, store)",
            stage_seconds.clone(),
        );
        let job_seconds = Histogram::new(exponential_buckets(0.05, 2.0, 16));
        registry.register(
            "job_seconds",
            "Claim-to-result time of succeeded jobs",
            job_seconds.clone(),
        );
        let queue_wait_seconds = Histogram::new(exponential_buckets(0.01, 2.0, 20));
        registry.register(
            "queue_wait_seconds",
            "Time from enqueue to claim of the jobs this worker claimed",
            queue_wait_seconds.clone(),
        );
        let model_load_seconds = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "model_load_seconds",
            "Time it took to load the models at start-up",
            model_load_seconds.clone(),
        );
        let models_loaded = Family::<ModelLabels, Gauge>::default();
        registry.register(
            "models_loaded",
            "1 once the models are loaded",
            models_loaded.clone(),
        );
        let ready = Gauge::default();
        registry.register("ready", "1 while the worker takes jobs", ready.clone());
        let busy = Gauge::default();
        registry.register("busy", "1 while a job runs", busy.clone());
        let queue_errors = Counter::default();
        registry.register(
            "queue_errors",
            "Failed calls to the queue (Redis)",
            queue_errors.clone(),
        );
        let gpu_memory_bytes = Family::<GpuMemoryLabels, Gauge>::default();
        registry.register(
            "gpu_memory_bytes",
            "GPU memory of the device the models run on (CUDA only)",
            gpu_memory_bytes.clone(),
        );
        let prompt_cache_hits = Counter::default();
        registry.register(
            "prompt_cache_hits",
            "Prompts whose T5 + CLIP embeddings came from the prompt cache (same token ids)",
            prompt_cache_hits.clone(),
        );
        let prompt_cache_misses = Counter::default();
        registry.register(
            "prompt_cache_misses",
            "Prompts the text encoders had to encode",
            prompt_cache_misses.clone(),
        );
        let prompt_cache_evictions = Counter::default();
        registry.register(
            "prompt_cache_evictions",
            "Prompt embeddings dropped from the cache to stay within its byte budget",
            prompt_cache_evictions.clone(),
        );
        let prompt_cache_entries = Gauge::default();
        registry.register(
            "prompt_cache_entries",
            "Prompt embeddings held in the cache",
            prompt_cache_entries.clone(),
        );
        let prompt_cache_bytes = Gauge::default();
        registry.register(
            "prompt_cache_bytes",
            "Host memory held by the prompt cache (its budget: --prompt-cache-mib)",
            prompt_cache_bytes.clone(),
        );
        Metrics {
            registry,
            jobs,
            stage_seconds,
            job_seconds,
            queue_wait_seconds,
            model_load_seconds,
            models_loaded,
            ready,
            busy,
            queue_errors,
            gpu_memory_bytes,
            prompt_cache_hits,
            prompt_cache_misses,
            prompt_cache_evictions,
            prompt_cache_entries,
            prompt_cache_bytes,
        }
    }

    pub fn job_finished(&self, outcome: &str, reason: &str) {
        self.jobs
            .get_or_create(&OutcomeLabels {
                outcome: outcome.to_string(),
                reason: reason.to_string(),
            })
            .inc();
    }

    /// Observes every stage with a timing.
    pub fn observe_timings(&self, t: &StageTimings) {
        let stages = [
            ("fetch", t.fetch),
            ("mask", t.mask),
            ("crop", t.crop),
            ("caption", t.caption),
            ("encode", t.encode),
            ("denoise", t.denoise),
            ("decode", t.decode),
            ("stitch", t.stitch),
            ("store", t.store),
        ];
        for (stage, ms) in stages {
            if let Some(ms) = ms {
                self.stage_seconds
                    .get_or_create(&StageLabels {
                        stage: stage.to_string(),
                    })
                    .observe(ms as f64 / 1000.0);
            }
        }
        if let Some(total) = t.total {
            self.job_seconds.observe(total as f64 / 1000.0);
        }
    }

    pub fn set_gpu_memory(&self, used: u64, total: u64) {
        for (kind, v) in [("used", used), ("total", total)] {
            self.gpu_memory_bytes
                .get_or_create(&GpuMemoryLabels { kind: kind.into() })
                .set(v as i64);
        }
    }

    /// Mirrors the model's own prompt-cache counts (cumulative since load, so the counters are
    /// set, not added to).
    pub fn set_prompt_cache(&self, u: &PromptCacheUsage) {
        use std::sync::atomic::Ordering::Relaxed;
        self.prompt_cache_hits.inner().store(u.hits, Relaxed);
        self.prompt_cache_misses.inner().store(u.misses, Relaxed);
        self.prompt_cache_evictions
            .inner()
            .store(u.evictions, Relaxed);
        self.prompt_cache_entries
            .set(i64::try_from(u.entries).unwrap_or(i64::MAX));
        self.prompt_cache_bytes
            .set(i64::try_from(u.bytes).unwrap_or(i64::MAX));
    }

    /// The OpenMetrics text.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

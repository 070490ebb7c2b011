//! `InpaintJob`: one photo, one mask, one result.
// Each `printcolumn(...)` repeats keys such as `type_`, which clippy reads as duplicates.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::conditions::{self, ConditionStatus};
use crate::limits;

/// Default number of denoising steps (FLUX.1-Fill-dev, see DESIGN.md).
pub const DEFAULT_STEPS: u32 = 20;
/// Default guidance scale (FLUX.1-Fill-dev's distilled guidance).
pub const DEFAULT_GUIDANCE: f64 = 30.0;
/// Pool a job goes to when it names none.
pub const DEFAULT_POOL: &str = "default";
/// Attempts (first try included) before a job is dead-lettered.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
/// Wall-clock limit from creation to completion.
pub const DEFAULT_TIMEOUT_SECONDS: u64 = 600;

/// What to inpaint: the photo, the mask (white = fill) and where to write the result.
///
/// The spec is immutable once created: to change a job, delete it and create a new one.
// Its bounds are the constants of `limits` (read by the attributes below), which workers also
// check at claim (`limits::check_limits`).
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "inpaint.pawfect.dev",
    version = "v1alpha1",
    kind = "InpaintJob",
    plural = "inpaintjobs",
    namespaced,
    status = "InpaintJobStatus",
    shortname = "ij",
    category = "pawfect",
    derive = "PartialEq",
    doc = "An InpaintJob removes the masked object from a photo and fills the background.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Progress",
        type_ = "string",
        json_path = ".status.progress.summary"
    ),
    printcolumn(name = "Worker", type_ = "string", json_path = ".status.worker"),
    printcolumn(name = "Duration", type_ = "string", json_path = ".status.duration"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.reason",
        priority = 1
    ),
    printcolumn(
        name = "Output",
        type_ = "string",
        json_path = ".status.output",
        priority = 1
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self == oldSelf").message("spec is immutable: delete the InpaintJob and create a new one"))]
// Exact strings: CEL has no URI normalisation for s3/gs/az; the worker compares the parsed,
// normalised URIs again at claim.
#[x_kube(validation = Rule::new("self.output != self.image && self.output != self.mask").message("output must differ from image and mask: the job would overwrite its own input"))]
pub struct InpaintJobSpec {
    /// URI of the photo (s3://, gs://, az://, file://, http(s)://). PNG, JPEG or WebP.
    #[schemars(length(min = limits::URI_LEN_MIN))]
    pub image: String,
    /// URI of the mask: same size as the photo (or resized, see the worker's mask policy); white = fill.
    #[schemars(length(min = limits::URI_LEN_MIN))]
    pub mask: String,
    /// URI the result is written to (the format follows the extension: .png, .jpg, .webp).
    #[schemars(length(min = limits::URI_LEN_MIN))]
    pub output: String,
    /// Prompt override. Without it the worker builds one from `sceneLabels` or from a caption of the area.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = limits::PROMPT_LEN_MAX))]
    pub prompt: Option<String>,
    /// Labels of the surfaces around the mask (e.g. from SAM3): build the prompt without captioning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = limits::SCENE_LABELS_MAX), inner(length(max = limits::SCENE_LABEL_LEN_MAX)))]
    pub scene_labels: Option<Vec<String>>,
    /// Denoising steps.
    #[serde(default = "default_steps")]
    #[schemars(range(min = limits::STEPS_MIN, max = limits::STEPS_MAX))]
    pub steps: u32,
    /// Guidance scale (FLUX guidance embedding).
    #[serde(default = "default_guidance")]
    #[schemars(range(min = limits::GUIDANCE_SCALE_MIN, max = limits::GUIDANCE_SCALE_MAX))]
    pub guidance_scale: f64,
    /// Seed of the initial noise (at most 2^53 − 1, exact in every JSON client); random when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = limits::SEED_MAX))]
    pub seed: Option<u64>,
    /// InpaintPool (same namespace) whose workers run this job.
    #[serde(default = "default_pool")]
    #[schemars(length(min = limits::POOL_LEN_MIN, max = limits::POOL_LEN_MAX))]
    pub pool: String,
    /// Queue priority: `high` jobs are claimed before any `normal` job.
    #[serde(default)]
    pub priority: Priority,
    /// Attempts (the first included) before the job fails for good.
    #[serde(default = "default_max_attempts")]
    #[schemars(range(min = limits::MAX_ATTEMPTS_MIN, max = limits::MAX_ATTEMPTS_MAX))]
    pub max_attempts: u32,
    /// Seconds from creation until the job is cancelled and marked Failed (DeadlineExceeded).
    #[serde(default = "default_timeout_seconds")]
    #[schemars(range(min = limits::TIMEOUT_SECONDS_MIN, max = limits::TIMEOUT_SECONDS_MAX))]
    pub timeout_seconds: u64,
    /// First-Block Cache of the denoise loop: steps whose first transformer block barely changed
    /// reuse the rest of the transformer's output from the last full step. Off when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheSpec>,
    /// Seconds after the job finished (Succeeded, Failed or Cancelled) before it is deleted. Kept forever when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub ttl_seconds_after_finished: Option<u64>,
}

/// First-Block Cache settings, with the meaning of diffusers' `FirstBlockCacheConfig`.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CacheSpec {
    /// A step skips every transformer block after the first when the first block's residual
    /// moved by at most this much since the last fully computed step (mean |Δ| / mean |residual|).
    /// 0 computes every step; larger values skip more steps and cost fidelity (bench/RESULTS.md).
    #[schemars(range(min = limits::CACHE_THRESHOLD_MIN, max = limits::CACHE_THRESHOLD_MAX))]
    pub threshold: f64,
}

fn default_steps() -> u32 {
    DEFAULT_STEPS
}
fn default_guidance() -> f64 {
    DEFAULT_GUIDANCE
}
fn default_pool() -> String {
    DEFAULT_POOL.to_string()
}
fn default_max_attempts() -> u32 {
    DEFAULT_MAX_ATTEMPTS
}
fn default_timeout_seconds() -> u64 {
    DEFAULT_TIMEOUT_SECONDS
}

/// Queue priority.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub enum Priority {
    High,
    #[default]
    Normal,
}

impl Priority {
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Normal => "normal",
        }
    }
}

/// Where the prompt of a job comes from, in order of precedence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PromptSource<'a> {
    /// `spec.prompt`, used as given.
    Explicit(&'a str),
    /// `spec.sceneLabels`: surfaces named by the caller.
    SceneLabels(&'a [String]),
    /// Neither: caption the area around the mask.
    Caption,
}

impl InpaintJobSpec {
    /// The effective prompt source: a non-blank `prompt` wins, then non-empty `sceneLabels`,
    /// else the worker captions the crop.
    pub fn prompt_source(&self) -> PromptSource<'_> {
        if let Some(p) = self
            .prompt
            .as_deref()
            .map(str::trim)
            .filter(|p| !p.is_empty())
        {
            return PromptSource::Explicit(p);
        }
        match self.scene_labels.as_deref() {
            Some(labels) if labels.iter().any(|l| !l.trim().is_empty()) => {
                PromptSource::SceneLabels(labels)
            }
            _ => PromptSource::Caption,
        }
    }
}

/// Where the prompt a job ran with came from (`status.promptSource`; the worker's
/// `caption` and `inpaint` commands print the same words).
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub enum PromptOrigin {
    /// `spec.prompt`, as given.
    Prompt,
    /// `spec.sceneLabels`.
    SceneLabels,
    /// A caption of the crop around the mask.
    Caption,
    /// Nothing usable (no surface found, captioning failed or off): the neutral prompt.
    Fallback,
}

impl PromptOrigin {
    pub const ALL: [PromptOrigin; 4] = [
        PromptOrigin::Prompt,
        PromptOrigin::SceneLabels,
        PromptOrigin::Caption,
        PromptOrigin::Fallback,
    ];

    /// The word in `status.promptSource` and in the queue's `prompt_source` field.
    pub fn as_str(self) -> &'static str {
        match self {
            PromptOrigin::Prompt => "prompt",
            PromptOrigin::SceneLabels => "sceneLabels",
            PromptOrigin::Caption => "caption",
            PromptOrigin::Fallback => "fallback",
        }
    }

    /// The origin named by `s`; `None` for a word this version does not know (a newer worker's).
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|o| o.as_str() == s)
    }
}

impl std::fmt::Display for PromptOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Lifecycle of a job. `Succeeded`, `Failed` and `Cancelled` are terminal.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum JobPhase {
    /// Seen by the operator, not yet in the queue (e.g. its pool does not exist yet).
    #[default]
    Pending,
    /// In its pool's queue, waiting for a worker.
    Queued,
    /// Claimed by a worker.
    Running,
    Succeeded,
    Failed,
    /// Deleted or cancelled before it finished.
    Cancelled,
}

impl JobPhase {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobPhase::Succeeded | JobPhase::Failed | JobPhase::Cancelled
        )
    }
    pub fn as_str(self) -> &'static str {
        match self {
            JobPhase::Pending => "Pending",
            JobPhase::Queued => "Queued",
            JobPhase::Running => "Running",
            JobPhase::Succeeded => "Succeeded",
            JobPhase::Failed => "Failed",
            JobPhase::Cancelled => "Cancelled",
        }
    }
}

/// Where the worker is in the pipeline.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct JobProgress {
    /// Pipeline stage (fetch, mask, crop, caption, encode, denoise, decode, stitch, store).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    /// Denoising step done (within `totalSteps`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_steps: Option<u32>,
    /// One-line form for `kubectl get`, e.g. `denoise 12/20`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
}

impl JobProgress {
    pub fn new(stage: &str, step: Option<u32>, total_steps: Option<u32>) -> Self {
        let summary = match (step, total_steps) {
            (Some(s), Some(t)) => format!("{stage} {s}/{t}"),
            _ => stage.to_string(),
        };
        JobProgress {
            stage: Some(stage.to_string()),
            step,
            total_steps,
            summary: Some(summary),
        }
    }
}

/// Milliseconds spent per pipeline stage.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct StageTimings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fetch: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crop: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caption: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encode: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub denoise: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decode: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stitch: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<u64>,
    /// Wall time of the attempt, claim to stored result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
}

/// Work one stage issued, by class, as the worker counted it where the model code issues each
/// op (the rules: `pawfect_models::accounting`).
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct WorkCounts {
    /// Dense GEMM FLOP in f16/bf16/f32 (dequantized GGUF weights included): `2·M·N·K` per matmul.
    #[serde(default)]
    pub f16_gemm_flop: u64,
    /// 8-bit integer GEMM ops (`2·M·N·K`); zero unless GGUF weights use the quantized kernels.
    #[serde(default)]
    pub int8_gemm_op: u64,
    /// Scaled-dot-product attention FLOP: `4·B·H·Lq·Lk·D`.
    #[serde(default)]
    pub attention_flop: u64,
    /// Bytes read and written by elementwise, normalization, RoPE, modulation, residual and
    /// softmax ops outside fused attention.
    #[serde(default)]
    pub memory_bound_bytes: u64,
}

impl std::ops::AddAssign for WorkCounts {
    fn add_assign(&mut self, o: Self) {
        self.f16_gemm_flop = self.f16_gemm_flop.saturating_add(o.f16_gemm_flop);
        self.int8_gemm_op = self.int8_gemm_op.saturating_add(o.int8_gemm_op);
        self.attention_flop = self.attention_flop.saturating_add(o.attention_flop);
        self.memory_bound_bytes = self.memory_bound_bytes.saturating_add(o.memory_bound_bytes);
    }
}

/// Work issued per model stage of an attempt, and their sum.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct StageWork {
    /// Florence-2 captioning (absent when the prompt came from the spec).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caption: Option<WorkCounts>,
    /// VAE encode of the masked crop, T5 and CLIP (T5 and CLIP skipped on a prompt-cache hit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encode: Option<WorkCounts>,
    /// The FLUX transformer over every step (with its conditioning and the Euler steps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub denoise: Option<WorkCounts>,
    /// VAE decode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decode: Option<WorkCounts>,
    /// The sum of the stages above.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<WorkCounts>,
    /// Denoise steps over every crop: run through the whole transformer, or served by the
    /// First-Block Cache (`spec.cache`). Absent from workers that do not report them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<DenoiseSteps>,
}

/// How the denoise steps of a job ran.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DenoiseSteps {
    /// Steps that ran every transformer block.
    pub computed: u32,
    /// Steps that ran the first block only and reused the cached residual of the others.
    pub cached: u32,
}

impl StageWork {
    /// Sets `total` to the sum of the stages.
    pub fn with_total(mut self) -> Self {
        let mut t = WorkCounts::default();
        for s in [self.caption, self.encode, self.denoise, self.decode]
            .into_iter()
            .flatten()
        {
            t += s;
        }
        self.total = Some(t);
        self
    }
}

/// Observed state of an InpaintJob. Written only by the operator.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct InpaintJobStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<JobPhase>,
    /// `Queued`, `Running`, `Complete`, `Failed` (see `conditions` module for reasons).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Attempts started so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
    /// Worker (pod name) of the current or last attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queued_at: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<Time>,
    /// Queued-to-finished (or to now while running), e.g. `1m23s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<JobProgress>,
    /// Caption of the area around the mask (when the prompt came from a caption).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caption: Option<String>,
    /// The prompt the model saw.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// Where that prompt came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_source: Option<PromptOrigin>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timings: Option<StageTimings>,
    /// Work the model stages issued (GEMM and attention FLOP, memory-bound bytes), per stage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub work: Option<StageWork>,
    /// Where the result was written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// One-word CamelCase reason of the last transition (e.g. `InvalidInput`, `DeadlineExceeded`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl InpaintJob {
    /// Current phase (`Pending` when no status was written yet).
    pub fn phase(&self) -> JobPhase {
        self.status
            .as_ref()
            .and_then(|s| s.phase)
            .unwrap_or_default()
    }
    pub fn is_finished(&self) -> bool {
        self.phase().is_terminal()
    }
}

impl InpaintJobStatus {
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        conditions::find(&self.conditions, type_)
    }
    /// Sets a condition; `lastTransitionTime` changes only when the status changes.
    pub fn set_condition(
        &mut self,
        type_: &str,
        status: ConditionStatus,
        reason: &str,
        message: impl Into<String>,
        observed_generation: Option<i64>,
        now: Time,
    ) {
        conditions::set(
            &mut self.conditions,
            type_,
            status,
            reason,
            message.into(),
            observed_generation,
            now,
        );
    }
}

/// `1m23s`-style duration for the printer column.
pub fn format_duration(seconds: i64) -> String {
    let s = seconds.max(0);
    let (h, m, s) = (s / 3600, (s % 3600) / 60, s % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s}s"),
        _ => format!("{h}h{m}m{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> InpaintJobSpec {
        serde_json::from_value(serde_json::json!({
            "image": "s3://b/dog.jpg", "mask": "s3://b/mask.png", "output": "s3://b/out.png"
        }))
        .expect("minimal spec parses")
    }

    #[test]
    fn defaults_fill_in() {
        let s = spec();
        assert_eq!(s.steps, 20);
        assert_eq!(s.guidance_scale, 30.0);
        assert_eq!(s.pool, "default");
        assert_eq!(s.priority, Priority::Normal);
        assert_eq!(s.max_attempts, 3);
        assert_eq!(s.timeout_seconds, 600);
        assert_eq!(s.ttl_seconds_after_finished, None);
    }

    #[test]
    fn prompt_origin_words_round_trip_through_serde() {
        for o in PromptOrigin::ALL {
            assert_eq!(serde_json::to_value(o).unwrap(), o.as_str());
            assert_eq!(PromptOrigin::parse(o.as_str()), Some(o));
        }
        assert_eq!(PromptOrigin::parse("scene-labels"), None);
    }

    #[test]
    fn prompt_source_precedence() {
        let mut s = spec();
        assert_eq!(s.prompt_source(), PromptSource::Caption);
        s.scene_labels = Some(vec![" ".into()]);
        assert_eq!(
            s.prompt_source(),
            PromptSource::Caption,
            "blank labels ignored"
        );
        s.scene_labels = Some(vec!["grass".into(), "gravel path".into()]);
        assert!(matches!(s.prompt_source(), PromptSource::SceneLabels(l) if l.len() == 2));
        s.prompt = Some("   ".into());
        assert!(
            matches!(s.prompt_source(), PromptSource::SceneLabels(_)),
            "blank prompt ignored"
        );
        s.prompt = Some(" green lawn ".into());
        assert_eq!(s.prompt_source(), PromptSource::Explicit("green lawn"));
    }

    #[test]
    fn terminal_phases() {
        let terminal: Vec<_> = [
            JobPhase::Pending,
            JobPhase::Queued,
            JobPhase::Running,
            JobPhase::Succeeded,
            JobPhase::Failed,
            JobPhase::Cancelled,
        ]
        .into_iter()
        .filter(|p| p.is_terminal())
        .collect();
        assert_eq!(
            terminal,
            vec![JobPhase::Succeeded, JobPhase::Failed, JobPhase::Cancelled]
        );
    }

    #[test]
    fn progress_summary() {
        assert_eq!(
            JobProgress::new("denoise", Some(12), Some(20))
                .summary
                .as_deref(),
            Some("denoise 12/20")
        );
        assert_eq!(
            JobProgress::new("fetch", None, None).summary.as_deref(),
            Some("fetch")
        );
    }

    #[test]
    fn durations() {
        assert_eq!(format_duration(0), "0s");
        assert_eq!(format_duration(59), "59s");
        assert_eq!(format_duration(83), "1m23s");
        assert_eq!(format_duration(3723), "1h2m3s");
        assert_eq!(format_duration(-5), "0s");
    }

    #[test]
    fn priority_serialises_lowercase() {
        assert_eq!(
            serde_json::to_value(Priority::High).ok(),
            Some("high".into())
        );
        assert!(serde_json::from_value::<Priority>("urgent".into()).is_err());
    }
}

//! The inpainting pipeline of one job, one file per stage (DESIGN.md "Worker pipeline"):
//!
//! | stage | file | timing field |
//! |---|---|---|
//! | fetch + validate | [`fetch`] | `fetch` |
//! | mask cleanup | [`mask`] | `mask` |
//! | crop geometry | [`crop`] | `crop` |
//! | prompt (caption) | [`prompt`] | `caption` |
//! | encode, denoise, decode | [`inpaint`] (inside the model) | `encode`, `denoise`, `decode` |
//! | stitch | [`stitch`] | `stitch` |
//! | store | [`store`] | `store` |
//!
//! The models sit behind two narrow traits, [`Inpainter`] and [`Captioner`] (plus the
//! [`PromptRules`] that turn captions into prompts), so the same stages run in `serve`, in the
//! `inpaint` CLI and in tests. Every failure carries a [`FailureReason`] that the queue reports.

pub mod adapters;
pub mod crop;
pub mod fetch;
pub mod inpaint;
pub mod mask;
pub mod prompt;
pub mod stitch;
pub mod store;

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use image::{GrayImage, RgbImage};
use pawfect_api::{InpaintJobSpec, StageTimings};

use crate::storage::{Storage, StorageError, WriteFence};
pub use crop::{Crop, CropConfig};
pub use fetch::{DecodeError, InputLimits, MaskSizePolicy};
pub use inpaint::{InpaintError, InpaintParams, Inpainted, Inpainter, ModelTimings, Step};
pub use mask::{CleanMask, MaskConfig, MaskError};
pub use prompt::{CaptionError, Captioner, Prompt, PromptOrigin, PromptRules, RulePrompt};
pub use store::{OutputFormat, StoreError};

/// An axis-aligned rectangle of pixels: `[x, x + w) × [y, y + h)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Rect {
    pub x: u32,
    pub y: u32,
    pub w: u32,
    pub h: u32,
}

impl Rect {
    pub const fn new(x: u32, y: u32, w: u32, h: u32) -> Self {
        Rect { x, y, w, h }
    }
    pub fn right(&self) -> u32 {
        self.x + self.w
    }
    pub fn bottom(&self) -> u32 {
        self.y + self.h
    }
    pub fn area(&self) -> u64 {
        self.w as u64 * self.h as u64
    }
    pub fn contains(&self, other: &Rect) -> bool {
        other.x >= self.x
            && other.y >= self.y
            && other.right() <= self.right()
            && other.bottom() <= self.bottom()
    }
    /// Grown by `m` on every side, clipped to a `width`×`height` frame.
    pub fn expand(&self, m: u32, width: u32, height: u32) -> Rect {
        let x = self.x.saturating_sub(m);
        let y = self.y.saturating_sub(m);
        let r = (self.right().saturating_add(m)).min(width);
        let b = (self.bottom().saturating_add(m)).min(height);
        Rect::new(x, y, r - x, b - y)
    }
    /// Bounding box of the non-zero pixels of `mask`.
    pub fn bounding(mask: &GrayImage) -> Option<Rect> {
        let (w, h) = mask.dimensions();
        crop::tight(mask, Rect::new(0, 0, w, h))
    }
}

/// The pipeline stages, as reported in progress events and timings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stage {
    Fetch,
    Mask,
    Crop,
    Caption,
    Encode,
    Denoise,
    Decode,
    Stitch,
    Store,
}

impl Stage {
    pub const ALL: [Stage; 9] = [
        Stage::Fetch,
        Stage::Mask,
        Stage::Crop,
        Stage::Caption,
        Stage::Encode,
        Stage::Denoise,
        Stage::Decode,
        Stage::Stitch,
        Stage::Store,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Fetch => "fetch",
            Stage::Mask => "mask",
            Stage::Crop => "crop",
            Stage::Caption => "caption",
            Stage::Encode => "encode",
            Stage::Denoise => "denoise",
            Stage::Decode => "decode",
            Stage::Stitch => "stitch",
            Stage::Store => "store",
        }
    }
}

/// Where a job is: a stage, and within `denoise` the step (counted over all crops).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    pub stage: Stage,
    pub step: Option<u32>,
    pub total: Option<u32>,
}

impl Progress {
    pub fn stage(stage: Stage) -> Self {
        Progress {
            stage,
            step: None,
            total: None,
        }
    }
}

/// Receives a job's progress and tells whether it was cancelled. Called from the thread that
/// runs the job; `cancelled` is polled between stages and after every denoising step.
pub trait Observer: Send {
    fn progress(&mut self, progress: Progress);
    fn cancelled(&self) -> bool;
}

/// An [`Observer`] that ignores progress and never cancels.
pub struct NoObserver;

impl Observer for NoObserver {
    fn progress(&mut self, _: Progress) {}
    fn cancelled(&self) -> bool {
        false
    }
}

/// Why a job failed: a one-word CamelCase reason, as the job's status shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FailureReason {
    /// Photo bytes are not a PNG/JPEG/WebP image, or are corrupt or truncated.
    InvalidImage,
    /// Mask bytes are not an image, or are corrupt or truncated.
    InvalidMask,
    /// Photo (or mask) over the pixel limit.
    ImageTooLarge,
    /// Photo below the minimum size.
    ImageTooSmall,
    /// Mask size differs from the photo's beyond the mask size policy.
    MaskSizeMismatch,
    /// Nothing to fill: no white pixel, or only specks.
    EmptyMask,
    /// The mask covers (almost) the whole photo.
    MaskCoversImage,
    /// An input does not exist (404, no such file).
    InputNotFound,
    /// An input's location could not be reached (connection, timeout, 5xx). Retryable.
    InputUnreachable,
    /// An input is larger than the byte limit.
    InputTooLarge,
    /// A URI can't be parsed.
    InvalidUri,
    /// A URI's scheme is not one of file, s3, gs, az, http(s).
    UnsupportedScheme,
    /// A `file://` URI outside the worker's allowed roots.
    OutsideAllowedRoots,
    /// The storage refused the credentials.
    AccessDenied,
    /// The output location can't be written (or is read-only, like http).
    OutputNotWritable,
    /// The output URI's extension names no supported format.
    UnsupportedOutputFormat,
    /// A storage backend failed in a way that may pass. Retryable.
    StorageError,
    /// The model failed.
    ModelError,
    /// The device ran out of memory. Retryable (memory is freed; another attempt or worker
    /// may have room).
    OutOfMemory,
    /// The job was cancelled while running.
    Cancelled,
}

impl FailureReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::InvalidImage => "InvalidImage",
            FailureReason::InvalidMask => "InvalidMask",
            FailureReason::ImageTooLarge => "ImageTooLarge",
            FailureReason::ImageTooSmall => "ImageTooSmall",
            FailureReason::MaskSizeMismatch => "MaskSizeMismatch",
            FailureReason::EmptyMask => "EmptyMask",
            FailureReason::MaskCoversImage => "MaskCoversImage",
            FailureReason::InputNotFound => "InputNotFound",
            FailureReason::InputUnreachable => "InputUnreachable",
            FailureReason::InputTooLarge => "InputTooLarge",
            FailureReason::InvalidUri => "InvalidUri",
            FailureReason::UnsupportedScheme => "UnsupportedScheme",
            FailureReason::OutsideAllowedRoots => "OutsideAllowedRoots",
            FailureReason::AccessDenied => "AccessDenied",
            FailureReason::OutputNotWritable => "OutputNotWritable",
            FailureReason::UnsupportedOutputFormat => "UnsupportedOutputFormat",
            FailureReason::StorageError => "StorageError",
            FailureReason::ModelError => "ModelError",
            FailureReason::OutOfMemory => "OutOfMemory",
            FailureReason::Cancelled => "Cancelled",
        }
    }
}

impl std::fmt::Display for FailureReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed job: its reason, a message for people, and whether another attempt may succeed.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{reason}: {message}")]
pub struct PipelineError {
    pub reason: FailureReason,
    pub message: String,
    pub retryable: bool,
}

impl PipelineError {
    pub fn new(reason: FailureReason, message: impl Into<String>) -> Self {
        PipelineError {
            reason,
            message: message.into(),
            retryable: matches!(
                reason,
                FailureReason::InputUnreachable
                    | FailureReason::StorageError
                    | FailureReason::OutOfMemory
            ),
        }
    }

    fn cancelled() -> Self {
        PipelineError::new(FailureReason::Cancelled, "cancelled")
    }

    /// A storage error while reading `what` ("photo", "mask") or writing the output.
    pub fn storage(err: StorageError, what: &str, writing: bool) -> Self {
        let retryable = err.is_transient();
        let reason = match &err {
            StorageError::InvalidUri { .. } => FailureReason::InvalidUri,
            StorageError::UnsupportedScheme { .. } => FailureReason::UnsupportedScheme,
            StorageError::OutsideRoots { .. } => FailureReason::OutsideAllowedRoots,
            StorageError::AccessDenied { .. } if writing => FailureReason::OutputNotWritable,
            StorageError::AccessDenied { .. } => FailureReason::AccessDenied,
            StorageError::ReadOnly { .. } | StorageError::NotWritable { .. } => {
                FailureReason::OutputNotWritable
            }
            StorageError::NotFound { .. } => FailureReason::InputNotFound,
            StorageError::TooLarge { .. } => FailureReason::InputTooLarge,
            StorageError::Unreachable { .. } | StorageError::HttpStatus { .. } if !writing => {
                FailureReason::InputUnreachable
            }
            _ => FailureReason::StorageError,
        };
        PipelineError {
            reason,
            message: format!("{what}: {err}"),
            retryable,
        }
    }

    fn decode(err: DecodeError, what: &str, is_mask: bool) -> Self {
        let reason = match (&err, is_mask) {
            (DecodeError::TooLarge { .. }, _) => FailureReason::ImageTooLarge,
            (DecodeError::TooSmall { .. }, false) => FailureReason::ImageTooSmall,
            (DecodeError::MaskSize { .. }, _) => FailureReason::MaskSizeMismatch,
            (_, true) => FailureReason::InvalidMask,
            (_, false) => FailureReason::InvalidImage,
        };
        PipelineError::new(reason, format!("{what}: {err}"))
    }

    fn model(err: InpaintError) -> Self {
        match err {
            InpaintError::Cancelled => PipelineError::cancelled(),
            InpaintError::OutOfMemory(m) => {
                PipelineError::new(FailureReason::OutOfMemory, format!("out of memory: {m}"))
            }
            e => PipelineError::new(FailureReason::ModelError, e.to_string()),
        }
    }
}

impl From<MaskError> for PipelineError {
    fn from(e: MaskError) -> Self {
        let reason = match e {
            MaskError::Empty { .. } | MaskError::OnlySpecks { .. } => FailureReason::EmptyMask,
            MaskError::CoversImage { .. } => FailureReason::MaskCoversImage,
        };
        PipelineError::new(reason, format!("mask: {e}"))
    }
}

impl From<StoreError> for PipelineError {
    fn from(e: StoreError) -> Self {
        let reason = match e {
            StoreError::UnsupportedFormat(_) => FailureReason::UnsupportedOutputFormat,
            StoreError::Encode(_) => FailureReason::StorageError,
        };
        PipelineError::new(reason, e.to_string())
    }
}

/// How the stages are set up.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PipelineConfig {
    pub limits: InputLimits,
    pub mask: MaskConfig,
    pub crop: CropConfig,
    /// One crop: the whole photo at its size rounded down to multiples of 16 (diffusers' path).
    pub full_frame: bool,
    /// With `full_frame`: return the model's raw output (no stitch), as diffusers does.
    pub raw_output: bool,
}

/// The models behind a pipeline.
#[derive(Clone)]
pub struct Models {
    pub inpainter: Arc<dyn Inpainter>,
    pub captioner: Option<Arc<dyn Captioner>>,
    pub rules: Arc<dyn PromptRules>,
}

/// The sampling and prompt parameters of a job (from its spec).
#[derive(Clone, Debug, PartialEq)]
pub struct JobParams {
    pub spec: InpaintJobSpec,
    /// Seed used when the spec has none.
    pub default_seed: u64,
}

impl JobParams {
    pub fn seed(&self) -> u64 {
        self.spec.seed.unwrap_or(self.default_seed)
    }
}

/// A processed photo (stages 2–8).
#[derive(Clone, Debug)]
pub struct Processed {
    pub image: RgbImage,
    pub prompt: Prompt,
    pub crops: Vec<Crop>,
    pub mask: CleanMask,
    pub timings: StageTimings,
}

/// A finished job.
#[derive(Clone, Debug)]
pub struct JobOutcome {
    pub output: String,
    pub prompt: Prompt,
    pub crops: usize,
    pub timings: StageTimings,
}

fn ms(since: Instant) -> u64 {
    since.elapsed().as_millis() as u64
}

/// Runs the stages over one job.
pub struct Pipeline {
    pub models: Models,
    pub storage: Storage,
    pub config: PipelineConfig,
}

impl Pipeline {
    pub fn new(models: Models, storage: Storage, config: PipelineConfig) -> Self {
        Pipeline {
            models,
            storage,
            config,
        }
    }

    /// Decodes and validates a photo and its mask (the CPU half of stage 1).
    pub fn decode(
        &self,
        image: &[u8],
        mask: &[u8],
    ) -> Result<(RgbImage, GrayImage), PipelineError> {
        let limits = &self.config.limits;
        let photo = fetch::decode_image(image, limits)
            .map_err(|e| PipelineError::decode(e, "photo", false))?;
        let (w, h) = photo.dimensions();
        let mask = fetch::decode_mask(mask, limits, w, h)
            .map_err(|e| PipelineError::decode(e, "mask", true))?;
        Ok((photo, mask))
    }

    /// Stages 2–8 on a decoded photo and mask. Blocking (runs the models).
    pub fn process(
        &self,
        photo: RgbImage,
        mask: &GrayImage,
        params: &JobParams,
        observer: &mut dyn Observer,
    ) -> Result<Processed, PipelineError> {
        let mut timings = StageTimings::default();
        let check = |o: &dyn Observer| {
            if o.cancelled() {
                Err(PipelineError::cancelled())
            } else {
                Ok(())
            }
        };

        check(observer)?;
        observer.progress(Progress::stage(Stage::Mask));
        let t = Instant::now();
        let clean = mask::clean(mask, &self.config.mask)?;
        timings.mask = Some(ms(t));
        tracing::debug!(
            coverage = clean.coverage,
            specks_removed = clean.specks_removed,
            radius = clean.radius,
            "mask cleaned"
        );

        check(observer)?;
        observer.progress(Progress::stage(Stage::Crop));
        let t = Instant::now();
        let (w, h) = photo.dimensions();
        let crops = if self.config.full_frame {
            let m = self.config.crop.multiple.max(1);
            let whole = Rect::new(0, 0, w, h);
            vec![Crop {
                region: whole,
                target: ((w / m * m).max(m), (h / m * m).max(m)),
                cell: whole,
            }]
        } else {
            crop::plan(&clean.dilated, clean.bbox, &self.config.crop)
        };
        timings.crop = Some(ms(t));
        tracing::debug!(crops = crops.len(), ?crops, "crops planned");

        check(observer)?;
        observer.progress(Progress::stage(Stage::Caption));
        let t = Instant::now();
        let first = crops[0];
        let prompt = prompt::choose(
            &params.spec,
            &*self.models.rules,
            self.models.captioner.as_deref(),
            || inpaint::model_input(&photo, &clean.dilated, &first).0,
        );
        timings.caption = Some(ms(t));
        tracing::info!(
            prompt = %prompt.text,
            source = prompt.origin.as_str(),
            caption = prompt.caption.as_deref().unwrap_or(""),
            note = prompt.note.as_deref().unwrap_or(""),
            "prompt chosen"
        );

        let steps = params.spec.steps.max(1);
        let total = steps * crops.len() as u32;
        let mut model = ModelTimings::default();
        let mut stitch_ms = 0u64;
        let mut composite = photo;
        for (i, crop) in crops.iter().enumerate() {
            check(observer)?;
            observer.progress(Progress::stage(Stage::Encode));
            let (input, input_mask) = inpaint::model_input(&composite, &clean.dilated, crop);
            let sample = InpaintParams {
                steps,
                guidance: params.spec.guidance_scale,
                seed: params.seed().wrapping_add(i as u64),
            };
            let offset = steps * i as u32;
            let mut on_step = |s: Step| -> bool {
                let step = offset + s.step.min(steps);
                observer.progress(Progress {
                    stage: Stage::Denoise,
                    step: Some(step),
                    total: Some(total),
                });
                if s.step >= s.total {
                    observer.progress(Progress::stage(Stage::Decode));
                }
                !observer.cancelled()
            };
            let out = self
                .models
                .inpainter
                .inpaint(&input, &input_mask, &prompt.text, &sample, &mut on_step)
                .map_err(PipelineError::model)?;
            model += out.timings;
            if out.image.dimensions() != crop.target {
                return Err(PipelineError::new(
                    FailureReason::ModelError,
                    format!(
                        "the model returned {:?} pixels for a {:?} input",
                        out.image.dimensions(),
                        crop.target
                    ),
                ));
            }

            check(observer)?;
            observer.progress(Progress::stage(Stage::Stitch));
            let t = Instant::now();
            if self.config.full_frame && self.config.raw_output {
                composite = out.image;
            } else {
                let patch = inpaint::region_output(out.image, crop);
                stitch::paste(
                    &mut composite,
                    &patch,
                    crop,
                    &clean.dilated,
                    clean.radius,
                    self.config.crop.blend_px,
                );
            }
            stitch_ms += ms(t);
        }
        timings.encode = Some(model.encode_ms);
        timings.denoise = Some(model.denoise_ms);
        timings.decode = Some(model.decode_ms);
        timings.stitch = Some(stitch_ms);
        Ok(Processed {
            image: composite,
            prompt,
            crops,
            mask: clean,
            timings,
        })
    }

    /// A whole job: fetch, process, store. `observer` moves to the thread that runs the model.
    pub async fn run(
        self: &Arc<Self>,
        params: JobParams,
        observer: Box<dyn Observer>,
    ) -> Result<JobOutcome, PipelineError> {
        self.run_fenced(params, observer, None).await
    }

    /// [`run`](Self::run), with the output written only while `fence` allows it
    /// ([`Storage::write_fenced`]: a queue job's claim).
    pub async fn run_fenced(
        self: &Arc<Self>,
        params: JobParams,
        mut observer: Box<dyn Observer>,
        fence: Option<Arc<dyn WriteFence>>,
    ) -> Result<JobOutcome, PipelineError> {
        let started = Instant::now();
        let output = params.spec.output.clone();
        observer.progress(Progress::stage(Stage::Fetch));
        let t = Instant::now();
        // Refuse unwritable outputs before any work is spent.
        let format = OutputFormat::from_uri(&output)?;
        self.storage
            .check_writable(&output)
            .await
            .map_err(|e| PipelineError::storage(e, "output", true))?;
        let max = self.config.limits.max_bytes;
        let (image, mask) = tokio::join!(
            self.storage.read(&params.spec.image, max),
            self.storage.read(&params.spec.mask, max)
        );
        let image = image.map_err(|e| PipelineError::storage(e, "photo", false))?;
        let mask = mask.map_err(|e| PipelineError::storage(e, "mask", false))?;

        let this = Arc::clone(self);
        let span = tracing::Span::current();
        let processed = tokio::task::spawn_blocking(move || {
            let _entered = span.enter();
            let (photo, mask) = this.decode(&image, &mask)?;
            let fetch_ms = ms(t);
            let mut p = this.process(photo, &mask, &params, &mut *observer)?;
            p.timings.fetch = Some(fetch_ms);
            let t = Instant::now();
            let bytes = store::encode(&p.image, format)?;
            Ok::<_, PipelineError>((p, bytes, t, observer))
        })
        .await
        .map_err(|e| PipelineError::new(FailureReason::ModelError, format!("job thread: {e}")))?;
        let (p, bytes, t, mut observer) = processed?;
        if observer.cancelled() {
            return Err(PipelineError::cancelled());
        }
        observer.progress(Progress::stage(Stage::Store));
        let bytes = Bytes::from(bytes);
        match &fence {
            Some(fence) => self.storage.write_fenced(&output, bytes, &**fence).await,
            None => self.storage.write(&output, bytes).await,
        }
        .map_err(|e| PipelineError::storage(e, "output", true))?;
        let mut timings = p.timings;
        timings.store = Some(ms(t));
        timings.total = Some(ms(started));
        Ok(JobOutcome {
            output,
            prompt: p.prompt,
            crops: p.crops.len(),
            timings,
        })
    }
}

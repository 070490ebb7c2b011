//! One job through the stages: [`Pipeline::run`] fetches, processes and stores;
//! [`Pipeline::process`] is the blocking middle (mask → crop → prompt → fill each crop → stitch),
//! one function per stage below it, each timed into its `status.timings` field and preceded by a
//! cancellation check and a progress report.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use image::{GrayImage, RgbImage};
use pawfect_api::{InpaintJobSpec, StageTimings, StageWork};
use pawfect_models::accounting;

use super::adapters::work_counts;
use super::crop::{self, Crop, CropConfig};
use super::error::{FailureReason, PipelineError};
use super::fetch::{self, InputLimits};
use super::geometry::Rect;
use super::inpaint::{self, InpaintParams, Inpainter, ModelTimings, ModelWork, Step};
use super::mask::{self, CleanMask, MaskConfig};
use super::progress::{Observer, Progress, Stage};
use super::prompt::{self, Captioner, Prompt, PromptRules};
use super::stitch;
use super::store::{self, OutputFormat};
use crate::storage::{Storage, WriteFence};

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
    /// Work the model stages issued (caption, encode, denoise, decode, total).
    pub work: StageWork,
}

/// A finished job.
#[derive(Clone, Debug)]
pub struct JobOutcome {
    pub output: String,
    pub prompt: Prompt,
    pub crops: usize,
    pub timings: StageTimings,
    pub work: StageWork,
}

fn ms(since: Instant) -> u64 {
    since.elapsed().as_millis() as u64
}

/// Fails with `Cancelled` once the job was cancelled.
fn check(observer: &dyn Observer) -> Result<(), PipelineError> {
    if observer.cancelled() {
        Err(PipelineError::cancelled())
    } else {
        Ok(())
    }
}

/// Enters `stage`: checks for cancellation, reports the stage, and times `f` into `slot`.
fn timed<T>(
    observer: &mut dyn Observer,
    stage: Stage,
    slot: &mut Option<u64>,
    f: impl FnOnce() -> Result<T, PipelineError>,
) -> Result<T, PipelineError> {
    check(observer)?;
    observer.progress(Progress::stage(stage));
    let t = Instant::now();
    let out = f();
    *slot = Some(ms(t));
    out
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
        let clean = timed(observer, Stage::Mask, &mut timings.mask, || {
            self.clean_mask(mask)
        })?;
        let crops = timed(observer, Stage::Crop, &mut timings.crop, || {
            Ok(self.plan_crops(&photo, &clean))
        })?;
        let (prompt, caption_work) = timed(observer, Stage::Caption, &mut timings.caption, || {
            Ok(accounting::measure(|| {
                self.choose_prompt(&photo, &clean, &crops[0], params)
            }))
        })?;
        let caption_work = work_counts(caption_work);
        let (image, model, model_work, stitch_ms) =
            self.fill(photo, &clean, &crops, &prompt, params, observer)?;
        let work = StageWork {
            // Only when Florence-2 ran (a spec prompt or labels skip it).
            caption: (prompt.caption.is_some() || caption_work != Default::default())
                .then_some(caption_work),
            encode: Some(model_work.encode),
            denoise: Some(model_work.denoise),
            decode: Some(model_work.decode),
            total: None,
            steps: (model_work.steps != Default::default()).then_some(model_work.steps),
        }
        .with_total();
        timings.encode = Some(model.encode_ms);
        timings.denoise = Some(model.denoise_ms);
        timings.decode = Some(model.decode_ms);
        timings.stitch = Some(stitch_ms);
        Ok(Processed {
            image,
            prompt,
            crops,
            mask: clean,
            timings,
            work,
        })
    }

    /// Stage 2 (`mask.rs`): binarize, drop specks, close, dilate, feather.
    fn clean_mask(&self, mask: &GrayImage) -> Result<CleanMask, PipelineError> {
        let clean = mask::clean(mask, &self.config.mask)?;
        tracing::debug!(
            coverage = clean.coverage,
            specks_removed = clean.specks_removed,
            radius = clean.radius,
            "mask cleaned"
        );
        Ok(clean)
    }

    /// Stage 3 (`crop.rs`): the crops to fill, or the whole frame with `full_frame`.
    fn plan_crops(&self, photo: &RgbImage, clean: &CleanMask) -> Vec<Crop> {
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
        tracing::debug!(crops = crops.len(), ?crops, "crops planned");
        crops
    }

    /// Stage 4 (`prompt.rs`): the spec's prompt or labels, else a caption of the first crop.
    fn choose_prompt(
        &self,
        photo: &RgbImage,
        clean: &CleanMask,
        first: &Crop,
        params: &JobParams,
    ) -> Prompt {
        let prompt = prompt::choose(
            &params.spec,
            &*self.models.rules,
            self.models.captioner.as_deref(),
            || inpaint::model_input(photo, &clean.dilated, first).0,
        );
        tracing::info!(
            prompt = %prompt.text,
            source = prompt.origin.as_str(),
            caption = prompt.caption.as_deref().unwrap_or(""),
            note = prompt.note.as_deref().unwrap_or(""),
            "prompt chosen"
        );
        prompt
    }

    /// Stages 5–7 per crop, in order: the model fills the crop (`inpaint.rs`: encode, denoise,
    /// decode) and the result is stitched into the composite (`stitch.rs`), so that a later crop
    /// sees the earlier ones' fill. Returns the composite, the model's timings and work summed
    /// over the crops and the stitch time.
    fn fill(
        &self,
        photo: RgbImage,
        clean: &CleanMask,
        crops: &[Crop],
        prompt: &Prompt,
        params: &JobParams,
        observer: &mut dyn Observer,
    ) -> Result<(RgbImage, ModelTimings, ModelWork, u64), PipelineError> {
        let steps = params.spec.steps.max(1);
        let total = steps * crops.len() as u32;
        let mut model = ModelTimings::default();
        let mut work = ModelWork::default();
        let mut stitch_ms = 0u64;
        let mut composite = photo;
        for (i, crop) in crops.iter().enumerate() {
            check(observer)?;
            observer.progress(Progress::stage(Stage::Encode));
            let out =
                self.fill_crop(&composite, clean, crop, i, prompt, params, total, observer)?;
            model += out.timings;
            work += out.work;
            let mut slot = None;
            composite = timed(observer, Stage::Stitch, &mut slot, || {
                Ok(self.stitch(composite, out.image, crop, clean))
            })?;
            stitch_ms += slot.unwrap_or(0);
        }
        Ok((composite, model, work, stitch_ms))
    }

    /// The model on crop `index` of `total` steps in all, reporting each step.
    #[allow(clippy::too_many_arguments)]
    fn fill_crop(
        &self,
        composite: &RgbImage,
        clean: &CleanMask,
        crop: &Crop,
        index: usize,
        prompt: &Prompt,
        params: &JobParams,
        total: u32,
        observer: &mut dyn Observer,
    ) -> Result<inpaint::Inpainted, PipelineError> {
        let steps = params.spec.steps.max(1);
        let (input, input_mask) = inpaint::model_input(composite, &clean.dilated, crop);
        let sample = InpaintParams {
            steps,
            guidance: params.spec.guidance_scale,
            seed: params.seed().wrapping_add(index as u64),
            cache_threshold: params.spec.cache.as_ref().map(|c| c.threshold),
        };
        let offset = steps * index as u32;
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
        Ok(out)
    }

    /// Stage 8 for one crop: the model's output pasted over the masked pixels only (or, with
    /// `full_frame` + `raw_output`, the model's output as is).
    fn stitch(
        &self,
        mut composite: RgbImage,
        filled: RgbImage,
        crop: &Crop,
        clean: &CleanMask,
    ) -> RgbImage {
        if self.config.full_frame && self.config.raw_output {
            return filled;
        }
        let patch = inpaint::region_output(filled, crop);
        stitch::paste(
            &mut composite,
            &patch,
            crop,
            &clean.dilated,
            clean.radius,
            self.config.crop.blend_px,
        );
        composite
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
        // Refuse locations outside the roots and prefixes, and an output that is an input,
        // before anything is read; then unwritable outputs, before any work is spent.
        self.storage
            .check_job(&params.spec.image, &params.spec.mask, &output)
            .map_err(|(what, e)| PipelineError::storage(e, what, what == "output"))?;
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
            work: p.work,
        })
    }
}

//! `pawfect-worker inpaint`: one photo + mask → the photo without the masked object.
//!
//! By default the same stages as `serve` run on local files: decode and validate (EXIF
//! orientation, pixel limit, mask size policy), mask cleanup, crops around the mask, the prompt
//! (`--prompt` › `--labels` › a Florence-2 caption of the crop › the neutral prompt), FLUX.1-Fill-dev
//! on each crop, a feathered stitch that leaves every pixel outside the dilated mask untouched,
//! and the encoded result. The per-stage timings are printed.
//!
//! `--full-frame` keeps the diffusers-equivalent path (`FluxFillPipeline`): the whole image
//! (sides multiples of 16) and the mask (binarized at 128) go through FLUX as they are, and the
//! raw output is written; `--noise` loads diffusers' initial noise for parity runs.
//!
//! ```text
//! pawfect-worker inpaint --models DIR --image photo.jpg --mask mask.png --out result.png
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use clap::Args;
use pawfect_api::{CacheSpec, InpaintJobSpec, Priority, StageTimings, StageWork};
use serde::Serialize;

use super::models::{CaptionArgs, FluxArgs, parse_dtype};
use super::serve::PipelineArgs;
use crate::pipeline::adapters::{FluxInpainter, SurfaceRules};
use crate::pipeline::{
    Captioner, JobParams, Models, Observer, OutputFormat, Pipeline, Progress, Stage, store,
};
use crate::storage::{Storage, StorageConfig};
use pawfect_models::flux::{InpaintOptions, Step};

/// The prompt of `--full-frame` runs without `--prompt`.
pub const NEUTRAL_PROMPT: &str = "seamless continuation of the surrounding background, no objects";

#[derive(Debug, Clone, Args)]
pub struct InpaintArgs {
    #[command(flatten)]
    pub flux: FluxArgs,
    /// FLUX transformer weights as `serve` picks them: the variant's GGUF in --models
    /// (`bf16`: the diffusers or BFL weights). Unset: the diffusers or BFL weights, as `bf16`.
    #[arg(long, env = "PAWFECT_MODEL_VARIANT", value_parser = super::serve::parse_variant)]
    pub model_variant: Option<pawfect_models::weights::ModelVariant>,
    #[command(flatten)]
    pub caption: CaptionArgs,
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// Input photo (PNG/JPEG/WebP). With --full-frame, width and height must be multiples of 16.
    #[arg(long)]
    pub image: PathBuf,
    /// Mask (white = remove): same size as the photo, or resized (see --mask-size-policy).
    #[arg(long)]
    pub mask: PathBuf,
    /// Output image (format from the extension: .png, .jpg, .webp).
    #[arg(long)]
    pub out: PathBuf,
    /// Prompt (default: from --labels, else a caption of the crop, else the neutral prompt).
    #[arg(long)]
    pub prompt: Option<String>,
    /// Surfaces around the mask (comma-separated, e.g. `grass,gravel path`): prompt without captioning.
    #[arg(long, value_delimiter = ',')]
    pub labels: Vec<String>,
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    #[arg(long, default_value_t = 30.0)]
    pub guidance: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// First-Block Cache threshold (a job's `spec.cache.threshold`, 0–1): a step whose first
    /// transformer block moved by at most this much since the last full step skips the others.
    /// Off when unset.
    #[arg(long, value_parser = parse_cache_threshold)]
    pub cache_threshold: Option<f64>,
    /// Whole frame through FLUX, no cleanup, crop or stitch (diffusers' FluxFillPipeline).
    #[arg(long)]
    pub full_frame: bool,
    /// With --full-frame: initial noise as safetensors (tensor `noise`, or the only tensor),
    /// `[1,16,H/8,W/8]` or packed.
    #[arg(long, requires = "full_frame")]
    pub noise: Option<PathBuf>,
    /// Print the summary (prompt, crops, timings) as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

fn parse_cache_threshold(s: &str) -> Result<f64, String> {
    use pawfect_api::limits::{CACHE_THRESHOLD_MAX, CACHE_THRESHOLD_MIN};
    let v: f64 = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    if (CACHE_THRESHOLD_MIN..=CACHE_THRESHOLD_MAX).contains(&v) {
        Ok(v)
    } else {
        Err(format!(
            "{v} is outside {CACHE_THRESHOLD_MIN:?}..={CACHE_THRESHOLD_MAX:?}"
        ))
    }
}

fn load_noise(path: &Path) -> Result<Tensor> {
    let mut ts = candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("reading {}", path.display()))?;
    if let Some(t) = ts.remove("noise") {
        return Ok(t);
    }
    if ts.len() == 1
        && let Some((_, t)) = ts.into_iter().next()
    {
        return Ok(t);
    }
    bail!(
        "{}: expected a tensor named `noise` (or exactly one tensor)",
        path.display()
    )
}

fn progress_bar(len: u64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg:8} {bar:40} {pos}/{len} [{elapsed_precise}<{eta_precise}]",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

pub fn run(a: &InpaintArgs) -> Result<()> {
    if a.full_frame {
        full_frame(a)
    } else {
        staged(a)
    }
}

/// The diffusers-equivalent path.
fn full_frame(a: &InpaintArgs) -> Result<()> {
    let device = a.flux.device()?;
    let image = image::open(&a.image)
        .with_context(|| format!("reading {}", a.image.display()))?
        .to_rgb8();
    let mask = image::open(&a.mask)
        .with_context(|| format!("reading {}", a.mask.display()))?
        .to_luma8();
    let fill = a.flux.load(&device, a.model_variant)?;
    let opts = InpaintOptions {
        steps: a.steps,
        guidance: a.guidance,
        seed: a.seed,
        noise: a.noise.as_deref().map(load_noise).transpose()?,
        max_sequence_length: a.flux.max_sequence_length,
        time_dtype: a.flux.time_dtype.as_deref().map(parse_dtype).transpose()?,
        cache_threshold: a.cache_threshold.map(|t| t as f32),
    };
    let bar = progress_bar(a.steps as u64);
    bar.set_message("denoise");
    let mut progress = |s: Step| {
        bar.set_position(s.step as u64);
        true
    };
    let prompt = a.prompt.as_deref().unwrap_or(NEUTRAL_PROMPT);
    let out = fill.inpaint(&image, &mask, prompt, &opts, &mut progress)?;
    bar.finish_and_clear();
    out.image
        .save(&a.out)
        .with_context(|| format!("writing {}", a.out.display()))?;
    tracing::info!(
        out = %a.out.display(),
        encode_ms = out.timings.encode_ms,
        denoise_ms = out.timings.denoise_ms,
        decode_ms = out.timings.decode_ms,
        steps_cached = ?out.steps_skipped,
        "done"
    );
    Ok(())
}

/// Shows the stages on stderr.
struct BarObserver {
    bar: indicatif::ProgressBar,
}

impl Observer for BarObserver {
    fn progress(&mut self, p: Progress) {
        self.bar.set_message(p.stage.as_str());
        if let (Some(step), Some(total)) = (p.step, p.total) {
            self.bar.set_length(total as u64);
            self.bar.set_position(step as u64);
        }
    }
    fn cancelled(&self) -> bool {
        false
    }
}

#[derive(Serialize)]
struct CropSummary {
    region: [u32; 4],
    target: [u32; 2],
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Summary {
    output: String,
    prompt: String,
    prompt_source: &'static str,
    caption: Option<String>,
    note: Option<String>,
    crops: Vec<CropSummary>,
    mask_coverage: f64,
    specks_removed: u64,
    /// Denoise steps per crop and the T5 sequence length (text tokens), as run.
    steps: usize,
    max_sequence_length: usize,
    timings: StageTimings,
    /// Work the model stages issued, per stage and in total (`pawfect_models::accounting`).
    work: StageWork,
    load_ms: u64,
}

/// The pipeline of `serve` on local files.
fn staged(a: &InpaintArgs) -> Result<()> {
    let started = Instant::now();
    let format = OutputFormat::from_uri(&a.out.to_string_lossy())?;
    let device = a.flux.device()?;
    let fill = a.flux.load(&device, a.model_variant)?;
    // A caption is only needed when neither a prompt nor labels are given.
    let captioner = if a.prompt.is_none() && a.labels.is_empty() {
        a.caption.load(&a.flux.models, &device, a.flux.download)?
    } else {
        None
    };
    let load_ms = started.elapsed().as_millis() as u64;
    let models = Models {
        inpainter: Arc::new(FluxInpainter::new(fill, a.flux.max_sequence_length)),
        captioner: captioner.map(|c| Arc::new(c) as Arc<dyn Captioner>),
        rules: Arc::new(SurfaceRules),
    };
    let storage = Storage::new(StorageConfig::default())?;
    let pipeline = Pipeline::new(models, storage, a.pipeline.config());

    let total = Instant::now();
    let t = Instant::now();
    let image =
        std::fs::read(&a.image).with_context(|| format!("reading {}", a.image.display()))?;
    let mask = std::fs::read(&a.mask).with_context(|| format!("reading {}", a.mask.display()))?;
    let (photo, mask) = pipeline.decode(&image, &mask)?;
    let fetch_ms = t.elapsed().as_millis() as u64;

    let spec = InpaintJobSpec {
        image: a.image.display().to_string(),
        mask: a.mask.display().to_string(),
        output: a.out.display().to_string(),
        prompt: a.prompt.clone(),
        scene_labels: (!a.labels.is_empty()).then(|| a.labels.clone()),
        steps: u32::try_from(a.steps).context("--steps")?,
        guidance_scale: a.guidance as f64,
        seed: Some(a.seed),
        pool: pawfect_api::job::DEFAULT_POOL.to_string(),
        priority: Priority::Normal,
        max_attempts: pawfect_api::job::DEFAULT_MAX_ATTEMPTS,
        timeout_seconds: pawfect_api::job::DEFAULT_TIMEOUT_SECONDS,
        ttl_seconds_after_finished: None,
        cache: a.cache_threshold.map(|threshold| CacheSpec { threshold }),
    };
    let params = JobParams {
        spec,
        default_seed: a.seed,
    };
    let mut observer = BarObserver {
        bar: progress_bar(a.steps as u64),
    };
    let processed = pipeline.process(photo, &mask, &params, &mut observer);
    observer.bar.finish_and_clear();
    let p = processed?;

    observer.progress(Progress::stage(Stage::Store));
    let t = Instant::now();
    let bytes = store::encode(&p.image, format)?;
    write_atomic(&a.out, &bytes)?;
    let mut timings = p.timings.clone();
    timings.fetch = Some(fetch_ms);
    timings.store = Some(t.elapsed().as_millis() as u64);
    timings.total = Some(total.elapsed().as_millis() as u64);

    let summary = Summary {
        output: a.out.display().to_string(),
        prompt: p.prompt.text.clone(),
        prompt_source: p.prompt.origin.as_str(),
        caption: p.prompt.caption.clone(),
        note: p.prompt.note.clone(),
        crops: p
            .crops
            .iter()
            .map(|c| CropSummary {
                region: [c.region.x, c.region.y, c.region.w, c.region.h],
                target: [c.target.0, c.target.1],
            })
            .collect(),
        mask_coverage: p.mask.coverage,
        specks_removed: p.mask.specks_removed,
        steps: a.steps,
        max_sequence_length: a.flux.max_sequence_length,
        timings,
        work: p.work.clone(),
        load_ms,
    };
    if a.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        print_summary(&summary);
    }
    Ok(())
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", uuid::Uuid::new_v4().simple()));
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("writing {}", path.display()));
    }
    Ok(())
}

fn print_summary(s: &Summary) {
    println!("prompt:  {} ({})", s.prompt, s.prompt_source);
    if let Some(c) = &s.caption {
        println!("caption: {c}");
    }
    if let Some(n) = &s.note {
        println!("note:    {n}");
    }
    println!(
        "mask:    {:.2}% of the photo after cleanup ({} speck pixels removed)",
        s.mask_coverage * 100.0,
        s.specks_removed
    );
    for (i, c) in s.crops.iter().enumerate() {
        println!(
            "crop {}:  {}x{} at ({}, {}) -> model {}x{}",
            i + 1,
            c.region[2],
            c.region[3],
            c.region[0],
            c.region[1],
            c.target[0],
            c.target[1]
        );
    }
    let t = &s.timings;
    println!("stage      ms");
    for (name, v) in [
        ("fetch", t.fetch),
        ("mask", t.mask),
        ("crop", t.crop),
        ("caption", t.caption),
        ("encode", t.encode),
        ("denoise", t.denoise),
        ("decode", t.decode),
        ("stitch", t.stitch),
        ("store", t.store),
        ("total", t.total),
    ] {
        println!(
            "{name:<8} {:>6}",
            v.map(|v| v.to_string()).unwrap_or_default()
        );
    }
    println!("stage    GEMM FLOP  int8 op  attn FLOP  mem bytes");
    let w = &s.work;
    for (name, c) in [
        ("caption", w.caption),
        ("encode", w.encode),
        ("denoise", w.denoise),
        ("decode", w.decode),
        ("total", w.total),
    ] {
        if let Some(c) = c {
            println!(
                "{name:<8} {:>9.3e} {:>8.3e} {:>10.3e} {:>10.3e}",
                c.f16_gemm_flop as f64,
                c.int8_gemm_op as f64,
                c.attention_flop as f64,
                c.memory_bound_bytes as f64
            );
        }
    }
    if let Some(st) = w.steps
        && st.cached > 0
    {
        println!(
            "steps:   {} computed, {} served by the first-block cache",
            st.computed, st.cached
        );
    }
    println!("(models loaded in {} ms)", s.load_ms);
    println!("wrote {}", s.output);
}

//! `pawfect-worker caption`: Florence-2 caption of an image and the surface prompt it yields.
//!
//! ```text
//! pawfect-worker caption --models /models --image crop.png [--task <DETAILED_CAPTION>] [--beams 3] [--print-ids]
//! ```

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use candle_core::{DType, Device};
use clap::{Args, ValueEnum};
use serde::Serialize;

use crate::surface_prompt::SurfacePrompt;
use pawfect_models::florence2::{Florence2, HUB_REPO, Task};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DeviceArg {
    /// CUDA device 0 when the binary has CUDA support and a GPU is present, else the CPU.
    Auto,
    Cpu,
    Cuda,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DTypeArg {
    F32,
    F16,
}

#[derive(Debug, Args)]
pub struct CaptionArgs {
    /// Florence-2 checkpoint folder, or a models root holding `Florence-2-base/`.
    #[arg(long, required_unless_present = "download")]
    pub models: Option<PathBuf>,
    /// Download the model from the Hugging Face Hub (microsoft/Florence-2-base unless --repo).
    #[arg(long)]
    pub download: bool,
    /// Hub repository for --download.
    #[arg(long, default_value = HUB_REPO)]
    pub repo: String,
    /// Image to caption (PNG, JPEG or WebP).
    #[arg(long)]
    pub image: PathBuf,
    /// Task token: <CAPTION>, <DETAILED_CAPTION> or <MORE_DETAILED_CAPTION>.
    #[arg(long, default_value = "<DETAILED_CAPTION>")]
    pub task: String,
    /// Beams (1 = greedy); default from the checkpoint's generation config.
    #[arg(long)]
    pub beams: Option<usize>,
    /// Maximum generated tokens; default from the checkpoint, else 256.
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// Print the generated token ids.
    #[arg(long)]
    pub print_ids: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    #[arg(long, value_enum, default_value = "auto")]
    pub device: DeviceArg,
    /// Compute dtype; default f16 on CUDA, f32 on the CPU.
    #[arg(long, value_enum)]
    pub dtype: Option<DTypeArg>,
    /// Caption this many times and report each run's time (the first includes warm-up).
    #[arg(long, default_value_t = 1)]
    pub repeat: usize,
}

#[derive(Serialize)]
struct Output {
    task: String,
    caption: String,
    ids: Vec<u32>,
    prompt: String,
    surface: Option<String>,
    source: String,
    note: Option<String>,
    device: String,
    dtype: String,
    num_beams: usize,
    load_ms: f64,
    caption_ms: Vec<f64>,
}

fn pick_device(d: DeviceArg) -> anyhow::Result<Device> {
    Ok(match d {
        DeviceArg::Cpu => Device::Cpu,
        DeviceArg::Cuda => Device::new_cuda(0).context("opening CUDA device 0")?,
        DeviceArg::Auto if candle_core::utils::cuda_is_available() => {
            Device::new_cuda(0).context("opening CUDA device 0")?
        }
        DeviceArg::Auto => Device::Cpu,
    })
}

pub fn run(args: CaptionArgs) -> anyhow::Result<()> {
    if args.repeat == 0 {
        bail!("--repeat must be at least 1");
    }
    let task: Task = args.task.parse()?;
    let device = pick_device(args.device)?;
    let dtype = match (args.dtype, device.is_cuda()) {
        (Some(DTypeArg::F32), _) | (None, false) => DType::F32,
        (Some(DTypeArg::F16), _) | (None, true) => DType::F16,
    };
    let image = image::open(&args.image)
        .with_context(|| format!("reading image {}", args.image.display()))?
        .to_rgb8();

    let t0 = Instant::now();
    let model = match (&args.models, args.download) {
        (_, true) => crate::download::florence::load_from_hub(&args.repo, None, &device, dtype)?,
        (Some(dir), false) => Florence2::load(dir, &device, dtype)?,
        (None, false) => bail!("--models DIR or --download is required"),
    };
    device.synchronize()?;
    let load_ms = t0.elapsed().as_secs_f64() * 1e3;

    let mut gcfg = model.default_generation();
    if let Some(b) = args.beams {
        if b == 0 {
            bail!("--beams must be at least 1");
        }
        gcfg.num_beams = b;
    }
    if let Some(n) = args.max_new_tokens {
        gcfg.max_new_tokens = n;
    }

    let mut caption_ms = Vec::with_capacity(args.repeat);
    let mut caption = None;
    for _ in 0..args.repeat {
        let t = Instant::now();
        let c = model.caption(&image, task, &gcfg)?;
        device.synchronize()?;
        caption_ms.push(t.elapsed().as_secs_f64() * 1e3);
        caption = Some(c);
    }
    let Some(caption) = caption else {
        bail!("no caption produced")
    };
    let prompt = SurfacePrompt::from_caption(&caption.text);

    if args.json {
        let out = Output {
            task: task.token().to_string(),
            caption: caption.text,
            ids: caption.ids,
            prompt: prompt.prompt,
            surface: prompt.surface,
            source: prompt.source.to_string(),
            note: prompt.note,
            device: format!("{:?}", device.location()),
            dtype: format!("{dtype:?}").to_lowercase(),
            num_beams: gcfg.num_beams,
            load_ms,
            caption_ms,
        };
        println!("{}", serde_json::to_string(&out)?);
    } else {
        println!("caption: {}", caption.text);
        if args.print_ids {
            let ids: Vec<String> = caption.ids.iter().map(u32::to_string).collect();
            println!("ids: {}", ids.join(" "));
        }
        println!("prompt: {}", prompt.prompt);
        println!("source: {}", prompt.source);
        if let Some(note) = &prompt.note {
            println!("note: {note}");
        }
        let runs: Vec<String> = caption_ms.iter().map(|ms| format!("{ms:.1}")).collect();
        eprintln!(
            "load {load_ms:.0} ms; caption ({} beams, {} tokens) {} ms",
            gcfg.num_beams,
            caption.ids.len().saturating_sub(1),
            runs.join(" / ")
        );
    }
    Ok(())
}

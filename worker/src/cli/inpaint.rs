//! `pawfect-worker inpaint`: one image + mask + prompt → inpainted image, on the full frame.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use clap::Args;

use crate::models::flux::{
    FluxFill, FluxLoadOptions, InpaintOptions, Placement, QuantMatmul, Step,
};
use crate::weights::{FluxModelPaths, FluxOverrides, download_flux};

/// The prompt used when none is given (until captioning picks one).
pub const NEUTRAL_PROMPT: &str = "seamless continuation of the surrounding background, no objects";

#[derive(Debug, Clone, Args)]
pub struct InpaintArgs {
    /// The FLUX.1-Fill-dev diffusers folder, or a folder containing `FLUX.1-Fill-dev/`.
    #[arg(long, env = "PAWFECT_MODELS")]
    pub models: PathBuf,
    /// Input image (PNG/JPEG/WebP); width and height must be multiples of 16.
    #[arg(long)]
    pub image: PathBuf,
    /// Mask, same size as the image; white (≥ 128) = fill.
    #[arg(long)]
    pub mask: PathBuf,
    /// Output image (format from the extension).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value = NEUTRAL_PROMPT)]
    pub prompt: String,
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    #[arg(long, default_value_t = 30.0)]
    pub guidance: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Initial noise as safetensors (tensor `noise`, or the only tensor): `[1,16,H/8,W/8]` or packed.
    #[arg(long)]
    pub noise: Option<PathBuf>,
    /// Transformer compute dtype: f32, f16, bf16 (default f16 on CUDA, f32 on CPU; never bf16 on a T4).
    #[arg(long)]
    pub dtype: Option<String>,
    /// cpu, cuda or cuda:N (default: cuda when built with it and present).
    #[arg(long)]
    pub device: Option<String>,
    /// T5 device (default: the main device). `cpu` keeps T5-XXL off a 16 GB card.
    #[arg(long)]
    pub t5_device: Option<String>,
    /// T5 dtype (default: the transformer dtype; f32 when T5 runs on the CPU).
    #[arg(long)]
    pub t5_dtype: Option<String>,
    /// VAE dtype (default f32; the FLUX VAE is unreliable in f16).
    #[arg(long)]
    pub vae_dtype: Option<String>,
    /// CLIP dtype (default f32).
    #[arg(long)]
    pub clip_dtype: Option<String>,
    /// GGUF transformer (city96 layout, e.g. flux1-fill-dev-Q5_K_M.gguf).
    #[arg(long)]
    pub transformer_gguf: Option<PathBuf>,
    /// BFL single-file transformer (flux1-fill-dev.safetensors).
    #[arg(long)]
    pub transformer_file: Option<PathBuf>,
    /// BFL ae.safetensors.
    #[arg(long)]
    pub vae_file: Option<PathBuf>,
    /// GGUF T5-XXL encoder.
    #[arg(long)]
    pub t5_gguf: Option<PathBuf>,
    /// GGUF matmul: auto, dequant-f16, dequant, native.
    #[arg(long, default_value = "auto")]
    pub gguf_matmul: String,
    /// Tile the VAE above this many pixels (e.g. 512 on a 16 GB card).
    #[arg(long)]
    pub vae_tile: Option<usize>,
    #[arg(long, default_value_t = 512)]
    pub max_sequence_length: usize,
    /// Dtype of the timestep rounding chain (default: bf16 for f16/bf16, f32 for f32).
    #[arg(long)]
    pub time_dtype: Option<String>,
    /// Download missing files from the Hub (gated: HF_TOKEN).
    #[arg(long)]
    pub download: bool,
}

fn parse_dtype(s: &str) -> Result<DType> {
    Ok(match s {
        "f32" | "float32" => DType::F32,
        "f16" | "float16" | "fp16" => DType::F16,
        "bf16" | "bfloat16" => DType::BF16,
        o => bail!("unknown dtype {o} (f32, f16, bf16)"),
    })
}

pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::new_cuda(0)?),
        o => match o.strip_prefix("cuda:") {
            Some(i) => Ok(Device::new_cuda(i.parse().context("cuda:N")?)?),
            None => bail!("unknown device {o} (cpu, cuda, cuda:N)"),
        },
    }
}

fn default_device() -> Device {
    Device::cuda_if_available(0).unwrap_or(Device::Cpu)
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

pub fn run(a: &InpaintArgs) -> Result<()> {
    let device = match &a.device {
        Some(d) => parse_device(d)?,
        None => default_device(),
    };
    let dtype = match &a.dtype {
        Some(d) => parse_dtype(d)?,
        None if device.is_cuda() => DType::F16,
        None => DType::F32,
    };
    let overrides = FluxOverrides {
        transformer_gguf: a.transformer_gguf.clone(),
        transformer_file: a.transformer_file.clone(),
        vae_file: a.vae_file.clone(),
        t5_gguf: a.t5_gguf.clone(),
    };
    let mut models = a.models.clone();
    if a.download {
        models = download_flux(&a.models, None, &overrides)?;
    }
    let paths = FluxModelPaths::resolve(&models, &overrides)?;

    let mut o = FluxLoadOptions::new(device.clone(), dtype);
    if let Some(d) = &a.t5_device {
        let dev = parse_device(d)?;
        let t5_dtype = if dev.is_cpu() { DType::F32 } else { dtype };
        o.t5 = Placement {
            device: dev,
            dtype: t5_dtype,
        };
    }
    if let Some(d) = &a.t5_dtype {
        o.t5.dtype = parse_dtype(d)?;
    }
    if let Some(d) = &a.vae_dtype {
        o.vae.dtype = parse_dtype(d)?;
    }
    if let Some(d) = &a.clip_dtype {
        o.clip.dtype = parse_dtype(d)?;
    }
    o.quant_matmul = a
        .gguf_matmul
        .parse::<QuantMatmul>()
        .map_err(anyhow::Error::msg)?;
    if let Some(t) = a.vae_tile {
        o.vae_tiling = true;
        o.vae_tile = Some(t);
    }
    let image = image::open(&a.image)
        .with_context(|| format!("reading {}", a.image.display()))?
        .to_rgb8();
    let mask = image::open(&a.mask)
        .with_context(|| format!("reading {}", a.mask.display()))?
        .to_luma8();

    tracing::info!(root = %paths.root.display(), ?device, ?dtype, "loading FLUX.1-Fill-dev");
    let t = std::time::Instant::now();
    let fill = FluxFill::load(&paths, &o)?;
    tracing::info!(ms = t.elapsed().as_millis() as u64, "loaded");

    let opts = InpaintOptions {
        steps: a.steps,
        guidance: a.guidance,
        seed: a.seed,
        noise: a.noise.as_deref().map(load_noise).transpose()?,
        max_sequence_length: a.max_sequence_length,
        time_dtype: a.time_dtype.as_deref().map(parse_dtype).transpose()?,
    };
    let bar = indicatif::ProgressBar::new(a.steps as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "denoise {bar:40} {pos}/{len} [{elapsed_precise}<{eta_precise}]",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut progress = |s: Step| {
        bar.set_position(s.step as u64);
        true
    };
    let out = fill.inpaint(&image, &mask, &a.prompt, &opts, &mut progress)?;
    bar.finish_and_clear();
    out.image
        .save(&a.out)
        .with_context(|| format!("writing {}", a.out.display()))?;
    tracing::info!(
        out = %a.out.display(),
        encode_ms = out.timings.encode_ms,
        denoise_ms = out.timings.denoise_ms,
        decode_ms = out.timings.decode_ms,
        "done"
    );
    Ok(())
}

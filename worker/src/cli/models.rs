//! Model flags shared by `inpaint` and `serve`, and loading the models behind the pipeline.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device};
use clap::Args;
use pawfect_models::weights::ModelVariant;

use crate::download::{download_flux, florence::load_from_hub};
use crate::pipeline::adapters::{FlorenceCaptioner, FluxInpainter, SurfaceRules};
use crate::pipeline::{Captioner, Models};
use pawfect_models::florence2::{Florence2, HUB_REPO, Task};
use pawfect_models::flux::{FluxFill, FluxLoadOptions, Placement, QuantMatmul};
use pawfect_models::weights::{FluxModelPaths, FluxOverrides, find_flux_gguf, overrides_for};

/// FLUX.1-Fill-dev: where the files are and how it runs.
#[derive(Debug, Clone, Args)]
pub struct FluxArgs {
    /// Models directory: the FLUX.1-Fill-dev diffusers folder, or a folder containing
    /// `FLUX.1-Fill-dev/` (and `Florence-2-base/`, and GGUF transformers).
    #[arg(long, env = "PAWFECT_MODELS")]
    pub models: PathBuf,
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
    /// VAE tiling: `auto` (tiles of 256 px on a CUDA card under 24 GiB, e.g. a 16 GB T4, where an
    /// untiled f32 VAE needs 17 GB at a 1024×768 crop; untiled elsewhere, as diffusers), `off`,
    /// or a tile size in pixels (a multiple of 16, at least 64).
    #[arg(long, env = "PAWFECT_VAE_TILE", default_value = "auto", value_parser = parse_vae_tile)]
    pub vae_tile: VaeTile,
    #[arg(long, default_value_t = 512)]
    pub max_sequence_length: usize,
    /// Precision of the transformer's token GEMMs: `f16` (the compute dtype) or `int8` (W8A8,
    /// quantized at load; CPU only in this build). A pool selects it with the worker env.
    #[arg(long, env = "PAWFECT_PRECISION", default_value = "f16")]
    pub precision: pawfect_models::flux::Precision,
    /// Host memory for the prompt-embedding cache, MiB (0: off). Prompts with the same token ids
    /// reuse their T5 + CLIP embeddings, bit for bit; one prompt at 512 T5 tokens takes 8 MiB.
    #[arg(long, env = "PAWFECT_PROMPT_CACHE_MIB", default_value_t = 256)]
    pub prompt_cache_mib: usize,
    /// Dtype of the timestep rounding chain (default: bf16 for f16/bf16, f32 for f32).
    #[arg(long)]
    pub time_dtype: Option<String>,
    /// Download missing files from the Hub (gated: HF_TOKEN).
    #[arg(long)]
    pub download: bool,
}

/// Florence-2 (captions of the crop for the prompt).
#[derive(Debug, Clone, Args)]
pub struct CaptionArgs {
    /// Florence-2 checkpoint folder (default: `Florence-2-base/` under --models).
    #[arg(long, env = "PAWFECT_FLORENCE")]
    pub florence: Option<PathBuf>,
    /// Do not load Florence-2: prompts come from the job (prompt, scene labels) or the
    /// neutral fallback.
    #[arg(long)]
    pub no_caption: bool,
    /// Caption beams (default: the checkpoint's, 3 for Florence-2-base; 1 = greedy).
    #[arg(long)]
    pub caption_beams: Option<usize>,
}

/// `--vae-tile`: see [`FluxArgs::vae_tile`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VaeTile {
    Auto,
    Off,
    Pixels(usize),
}

/// Cards with less memory than this get a tiled VAE under `--vae-tile auto`.
pub const VAE_TILE_AUTO_BELOW_BYTES: u64 = 24 << 30;
/// The tile size `auto` picks: measured to keep the whole default T4 configuration under
/// 15 GB (bench/RESULTS.md, "The default T4 configuration").
pub const VAE_TILE_AUTO_PIXELS: usize = 256;

pub fn parse_vae_tile(s: &str) -> std::result::Result<VaeTile, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "auto" => Ok(VaeTile::Auto),
        "off" | "0" | "none" => Ok(VaeTile::Off),
        n => match n.parse::<usize>() {
            Ok(px) if px >= 64 && px % 16 == 0 => Ok(VaeTile::Pixels(px)),
            Ok(px) => Err(format!(
                "VAE tile {px}: use a multiple of 16 of at least 64 pixels (or auto, off)"
            )),
            Err(_) => Err(format!(
                "VAE tile {s:?}: use auto, off or a size in pixels such as 256"
            )),
        },
    }
}

/// The VAE tile size for a setting on a device: `auto` tiles only on a CUDA card with less than
/// [`VAE_TILE_AUTO_BELOW_BYTES`] (an unknown size counts as small).
pub fn vae_tile_for(setting: VaeTile, cuda: bool, total_bytes: Option<u64>) -> Option<usize> {
    match setting {
        VaeTile::Off => None,
        VaeTile::Pixels(px) => Some(px),
        VaeTile::Auto if cuda && total_bytes.is_none_or(|t| t < VAE_TILE_AUTO_BELOW_BYTES) => {
            Some(VAE_TILE_AUTO_PIXELS)
        }
        VaeTile::Auto => None,
    }
}

pub fn parse_dtype(s: &str) -> Result<DType> {
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

/// The GGUF transformer of `variant` in the models directory (or its FLUX folder), chosen by
/// [`pawfect_models::weights::variant`]'s table (e.g. `flux1-fill-dev-Q5_K_M.gguf`, else
/// `flux1-fill-dev-Q5_K_S.gguf`, logged). `bf16` uses the diffusers or BFL weights (None).
pub fn gguf_for_variant(models: &Path, variant: ModelVariant) -> Result<Option<PathBuf>> {
    Ok(find_flux_gguf(models, variant)?.map(|(p, _)| p))
}

impl FluxArgs {
    pub fn device(&self) -> Result<Device> {
        match &self.device {
            Some(d) => parse_device(d),
            None => Ok(default_device()),
        }
    }

    /// Resolves the files (downloading them with `--download`) and loads the pipeline on
    /// `device`. `variant` picks the GGUF transformer unless a transformer file is given.
    pub fn load(&self, device: &Device, variant: Option<ModelVariant>) -> Result<FluxFill> {
        let dtype = match &self.dtype {
            Some(d) => parse_dtype(d)?,
            None if device.is_cuda() => DType::F16,
            None => DType::F32,
        };
        let given = FluxOverrides {
            transformer_gguf: self.transformer_gguf.clone(),
            transformer_file: self.transformer_file.clone(),
            vae_file: self.vae_file.clone(),
            t5_gguf: self.t5_gguf.clone(),
        };
        // The variant's GGUF transformer, and a T5 GGUF when the FLUX folder has no T5 weights.
        let (overrides, _choices) = overrides_for(&self.models, variant, &given)?;
        let mut models = self.models.clone();
        if self.download {
            models = download_flux(&self.models, None, &overrides)?;
        }
        let paths = FluxModelPaths::resolve(&models, &overrides)?;

        let mut o = FluxLoadOptions::new(device.clone(), dtype);
        if let Some(d) = &self.t5_device {
            let dev = parse_device(d)?;
            let t5_dtype = if dev.is_cpu() { DType::F32 } else { dtype };
            o.t5 = Placement {
                device: dev,
                dtype: t5_dtype,
            };
        }
        if let Some(d) = &self.t5_dtype {
            o.t5.dtype = parse_dtype(d)?;
        }
        if let Some(d) = &self.vae_dtype {
            o.vae.dtype = parse_dtype(d)?;
        }
        if let Some(d) = &self.clip_dtype {
            o.clip.dtype = parse_dtype(d)?;
        }
        o.prompt_cache_bytes = self.prompt_cache_mib.saturating_mul(1 << 20);
        o.precision = self.precision;
        o.quant_matmul = self
            .gguf_matmul
            .parse::<QuantMatmul>()
            .map_err(anyhow::Error::msg)?;
        let total = crate::pipeline::adapters::gpu_memory(device)
            .and_then(|probe| probe())
            .map(|(_, total)| total);
        if let Some(t) = vae_tile_for(self.vae_tile, device.is_cuda(), total) {
            o.vae_tiling = true;
            o.vae_tile = Some(t);
        }
        tracing::info!(setting = ?self.vae_tile, tile = ?o.vae_tile, "VAE tiling");
        tracing::info!(
            root = %paths.root.display(),
            transformer = ?paths.transformer,
            ?device,
            ?dtype,
            "loading FLUX.1-Fill-dev"
        );
        let t = Instant::now();
        let fill = FluxFill::load(&paths, &o)?;
        tracing::info!(
            ms = t.elapsed().as_millis() as u64,
            "FLUX.1-Fill-dev loaded"
        );
        Ok(fill)
    }
}

impl CaptionArgs {
    /// Loads Florence-2 on `device` (f16 on CUDA, f32 on the CPU), unless `--no-caption`;
    /// with `download`, fetches microsoft/Florence-2-base when it is not on disk.
    pub fn load(
        &self,
        models: &Path,
        device: &Device,
        download: bool,
    ) -> Result<Option<FlorenceCaptioner>> {
        if self.no_caption {
            return Ok(None);
        }
        let dir = self
            .florence
            .clone()
            .unwrap_or_else(|| models.to_path_buf());
        let dtype = if device.is_cuda() {
            DType::F16
        } else {
            DType::F32
        };
        let t = Instant::now();
        let model = match Florence2::load(&dir, device, dtype) {
            Ok(m) => m,
            Err(e) if download => {
                tracing::info!(error = %e, repo = HUB_REPO, "Florence-2 not on disk: downloading");
                load_from_hub(HUB_REPO, None, device, dtype)?
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "loading Florence-2 from {} (pass --florence DIR, --download to fetch \
                         {HUB_REPO}, or --no-caption to run without captions)",
                        dir.display()
                    )
                });
            }
        };
        let mut generation = model.default_generation();
        if let Some(b) = self.caption_beams {
            if b == 0 {
                bail!("--caption-beams must be at least 1");
            }
            generation.num_beams = b;
        }
        tracing::info!(
            dir = %model.dir().display(),
            ?dtype,
            beams = generation.num_beams,
            ms = t.elapsed().as_millis() as u64,
            "Florence-2 loaded"
        );
        Ok(Some(FlorenceCaptioner::new(
            model,
            Task::DetailedCaption,
            generation,
        )))
    }
}

/// Everything the pipeline runs on, and the device the models use.
pub struct Loaded {
    pub models: Models,
    pub device: Device,
}

/// Loads FLUX (and Florence-2 unless disabled) for the pipeline.
pub fn load_models(
    flux: &FluxArgs,
    caption: &CaptionArgs,
    variant: Option<ModelVariant>,
) -> Result<Loaded> {
    let device = flux.device()?;
    let fill = flux.load(&device, variant)?;
    let captioner = caption.load(&flux.models, &device, flux.download)?;
    Ok(Loaded {
        models: Models {
            inpainter: Arc::new(FluxInpainter::new(fill, flux.max_sequence_length)),
            captioner: captioner.map(|c| Arc::new(c) as Arc<dyn Captioner>),
            rules: Arc::new(SurfaceRules),
        },
        device,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variant_files() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "flux1-fill-dev-Q5_K_M.gguf",
            "flux1-fill-dev-Q4_K_M.gguf",
            "flux1-dev-Q8_0.gguf",
            "t5-v1_1-xxl-encoder-Q5_K_M.gguf",
        ] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        let got = gguf_for_variant(dir.path(), ModelVariant::Q5KM)
            .unwrap()
            .unwrap();
        assert!(got.ends_with("flux1-fill-dev-Q5_K_M.gguf"), "{got:?}");
        let got = gguf_for_variant(dir.path(), ModelVariant::Q4KM)
            .unwrap()
            .unwrap();
        assert!(got.ends_with("flux1-fill-dev-Q4_K_M.gguf"), "{got:?}");
        assert_eq!(
            gguf_for_variant(dir.path(), ModelVariant::Bf16).unwrap(),
            None
        );
        let e = gguf_for_variant(dir.path(), ModelVariant::Q8_0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("flux1-fill-dev-Q8_0.gguf"), "{e}");
        let e = gguf_for_variant(dir.path(), ModelVariant::Q4_0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("PAWFECT_MODEL_VARIANT=q4_0"), "{e}");
    }

    #[test]
    fn vae_tile_settings_parse() {
        assert_eq!(parse_vae_tile("auto"), Ok(VaeTile::Auto));
        assert_eq!(parse_vae_tile("OFF"), Ok(VaeTile::Off));
        assert_eq!(parse_vae_tile("0"), Ok(VaeTile::Off));
        assert_eq!(parse_vae_tile("512"), Ok(VaeTile::Pixels(512)));
        for bad in ["40", "250", "big", "-16"] {
            assert!(parse_vae_tile(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn vae_tiles_on_small_cards_only_when_auto() {
        const GIB: u64 = 1 << 30;
        let t4 = Some(15 * GIB);
        let h100 = Some(80 * GIB);
        for (setting, cuda, total, want) in [
            (VaeTile::Auto, true, t4, Some(VAE_TILE_AUTO_PIXELS)),
            (
                VaeTile::Auto,
                true,
                Some(24 * GIB - 1),
                Some(VAE_TILE_AUTO_PIXELS),
            ),
            (VaeTile::Auto, true, Some(24 * GIB), None),
            (VaeTile::Auto, true, h100, None),
            (VaeTile::Auto, true, None, Some(VAE_TILE_AUTO_PIXELS)),
            (VaeTile::Auto, false, None, None),
            (VaeTile::Off, true, t4, None),
            (VaeTile::Pixels(512), true, h100, Some(512)),
            (VaeTile::Pixels(512), false, None, Some(512)),
        ] {
            assert_eq!(
                vae_tile_for(setting, cuda, total),
                want,
                "{setting:?} cuda={cuda} {total:?}"
            );
        }
    }
}

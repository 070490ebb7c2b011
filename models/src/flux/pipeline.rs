//! `FluxFill`: diffusers' `FluxFillPipeline` (image + mask + prompt → inpainted image) on candle.

use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::config::{SchedulerConfig, TransformerConfig, VaeConfig, read_json};
use super::first_block_cache::FirstBlockCache;
use super::prompt_cache::{DEFAULT_PROMPT_CACHE_BYTES, PromptCacheStats};
use super::sampling::{
    Rope, euler_step, model_time_inputs, pack_latents, pack_mask, sigmas, timesteps, unpack_latents,
};
use super::text::{Encoded, PromptEmbeds, PromptTokenizer, TextEncoders};
use super::transformer::{FluxTransformer, Layout, Loader};
use super::vae::AutoEncoder;
use crate::accounting::{self, WorkCounts};
use crate::checkpoint::{GgufStore, LinearOpts, QuantMatmul, SafetensorsStore, WeightStore};
use crate::clip::{ClipTextConfig, ClipTextModel};
use crate::error::{ModelError, Result};
use crate::t5::{T5Config, T5Encoder};
use crate::weights::{FluxModelPaths, T5Files, TransformerFiles};

/// Device and dtype of one component.
#[derive(Debug, Clone)]
pub struct Placement {
    pub device: Device,
    pub dtype: DType,
}

/// How to load the pipeline.
#[derive(Debug, Clone)]
pub struct FluxLoadOptions {
    /// Transformer device and compute dtype (f16 on T4: never bf16 on sm_75).
    pub transformer: Placement,
    /// T5-XXL. Default: the transformer's device and dtype. On a 16 GB card a GGUF transformer
    /// and an f16 T5-XXL (9.5 GB) do not fit together: use a GGUF T5 or put T5 on the CPU.
    pub t5: Placement,
    /// CLIP-L. Default: the transformer's device, f32.
    pub clip: Placement,
    /// VAE. Default: the transformer's device, f32 (the FLUX VAE is unreliable in f16).
    pub vae: Placement,
    /// How GGUF weights are multiplied (transformer and T5).
    pub quant_matmul: QuantMatmul,
    /// VAE tile size in pixels; `None` uses the VAE config's `sample_size` (1024, diffusers'
    /// threshold) — but note diffusers' pipeline does not tile at all unless asked.
    pub vae_tile: Option<usize>,
    /// Whether to tile the VAE at all (diffusers' default: no).
    pub vae_tiling: bool,
    /// Bytes of host memory for cached prompt embeddings ([`super::prompt_cache`]; 0: off).
    pub prompt_cache_bytes: usize,
    /// Precision of the transformer's token GEMMs.
    pub precision: Precision,
}

/// Precision of the FLUX transformer's token GEMMs (attention projections, MLPs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Precision {
    /// In the compute dtype (f16 on a T4), GGUF weights dequantized for the call.
    #[default]
    Float,
    /// W8A8 int8 ([`crate::int8`]), quantized at load from whatever weights were given.
    Int8,
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f16" | "float" => Ok(Precision::Float),
            "int8" => Ok(Precision::Int8),
            _ => Err(format!("unknown precision {s:?} (f16 or int8)")),
        }
    }
}

impl FluxLoadOptions {
    /// Every component on `device`; the transformer and T5 in `dtype`, CLIP and the VAE in f32.
    pub fn new(device: Device, dtype: DType) -> Self {
        let p = |dtype| Placement {
            device: device.clone(),
            dtype,
        };
        Self {
            transformer: p(dtype),
            t5: p(dtype),
            clip: p(DType::F32),
            vae: p(DType::F32),
            quant_matmul: QuantMatmul::Auto,
            vae_tile: None,
            vae_tiling: false,
            prompt_cache_bytes: DEFAULT_PROMPT_CACHE_BYTES,
            precision: Precision::Float,
        }
    }
}

/// Per-request options.
#[derive(Debug, Clone)]
pub struct InpaintOptions {
    pub steps: usize,
    pub guidance: f32,
    /// Seed of the initial noise (the pipeline's own generator, not torch's). Ignored with `noise`.
    pub seed: u64,
    /// Initial noise, unpacked `[1, 16, H/8, W/8]` or packed `[1, L, 64]` (to reproduce a diffusers run).
    pub noise: Option<Tensor>,
    pub max_sequence_length: usize,
    /// Dtype of the timestep/guidance rounding chain (see `model_time_inputs`). `None`: bf16 when
    /// the transformer runs in f16/bf16 (the shipped bf16 recipe), f32 in f32 (diffusers in f32).
    pub time_dtype: Option<DType>,
    /// First-Block Cache threshold ([`super::first_block_cache`]); `None` computes every block
    /// of every step.
    pub cache_threshold: Option<f32>,
}

impl Default for InpaintOptions {
    fn default() -> Self {
        Self {
            steps: 20,
            guidance: 30.0,
            seed: 0,
            noise: None,
            max_sequence_length: 512,
            time_dtype: None,
            cache_threshold: None,
        }
    }
}

/// Progress of the denoise loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    pub step: usize,
    pub total: usize,
}

/// Wall time per stage.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FillTimings {
    pub encode_ms: f64,
    pub denoise_ms: f64,
    pub decode_ms: f64,
}

/// Work issued per stage ([`crate::accounting`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FillWork {
    /// VAE encode of the masked image, and T5 + CLIP unless the prompt cache had the prompt.
    pub encode: WorkCounts,
    /// Every denoise step: conditioning, transformer, Euler step.
    pub denoise: WorkCounts,
    /// VAE decode.
    pub decode: WorkCounts,
}

/// Result of `FluxFill::inpaint`.
#[derive(Debug, Clone)]
pub struct FillOutput {
    pub image: image::RgbImage,
    pub timings: FillTimings,
    pub work: FillWork,
    /// The prompt's embeddings came from the prompt cache.
    pub prompt_cached: bool,
    /// Denoise steps (0-based) the First-Block Cache skipped; empty without it.
    pub steps_skipped: Vec<usize>,
}

/// Intermediate tensors of one run (for parity tests and debugging).
#[derive(Debug, Clone)]
pub struct FillTrace {
    /// `[1, L, 320]`: packed masked-image latents (64) then packed mask (256).
    pub condition: Tensor,
    pub sigmas: Vec<f32>,
    /// Packed latents after the last step `[1, L, 64]` (f32).
    pub latents: Tensor,
    /// Decoded image `[1, 3, H, W]` in [0, 1] (f32), before quantization to u8.
    pub image: Tensor,
    /// The First-Block Cache's relative change per step (`None`: nothing to compare, or no cache).
    pub cache_diffs: Vec<Option<f32>>,
}

/// The loaded FLUX.1-Fill-dev pipeline.
pub struct FluxFill {
    pub transformer: FluxTransformer,
    pub vae: AutoEncoder,
    pub text: TextEncoders,
    scheduler: SchedulerConfig,
}

fn elapsed_ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// Sync a device so stage timings are real (CUDA is asynchronous).
fn sync(d: &Device) -> Result<()> {
    Ok(d.synchronize()?)
}

/// Deterministic standard normal noise (SplitMix64 + Box–Muller), independent of the device.
pub fn seeded_noise(seed: u64, shape: (usize, usize, usize, usize)) -> Result<Tensor> {
    let n = shape.0 * shape.1 * shape.2 * shape.3;
    let mut state = seed ^ 0x9E37_79B9_7F4A_7C15;
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut v = Vec::with_capacity(n + 1);
    while v.len() < n {
        let u1 = ((next() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        let u2 = ((next() >> 11) as f64) / (1u64 << 53) as f64;
        let r = (-2.0 * u1.ln()).sqrt();
        let th = 2.0 * std::f64::consts::PI * u2;
        v.push((r * th.cos()) as f32);
        v.push((r * th.sin()) as f32);
    }
    v.truncate(n);
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

/// Refuses bf16 on CUDA cards below compute capability 8.0 (T4 = 7.5): candle builds no bf16
/// kernels for them although `Device::supports_bf16()` says yes.
pub fn check_dtype(device: &Device, dtype: DType) -> Result<()> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device
        && dtype == DType::BF16
    {
        use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
        let major = d
            .cuda_stream()
            .context()
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
            .map_err(|e| {
                ModelError::InvalidInput(format!("cannot read the compute capability: {e:?}"))
            })?;
        if major < 8 {
            return Err(ModelError::InvalidInput(format!(
                "bf16 needs a GPU of compute capability 8.0 or newer (this one is {major}.x): use f16"
            )));
        }
    }
    let _ = (device, dtype);
    Ok(())
}

impl FluxFill {
    pub fn load(paths: &FluxModelPaths, o: &FluxLoadOptions) -> Result<Self> {
        for p in [&o.transformer, &o.t5, &o.clip, &o.vae] {
            check_dtype(&p.device, p.dtype)?;
        }
        // transformer
        let tp = &o.transformer;
        let lopts = LinearOpts {
            dtype: tp.dtype,
            quant: o.quant_matmul,
        };
        let store: Box<dyn WeightStore> = match &paths.transformer {
            TransformerFiles::Diffusers(files) => {
                Box::new(SafetensorsStore::open(files, &tp.device)?)
            }
            TransformerFiles::Bfl(f) => {
                Box::new(SafetensorsStore::open(std::slice::from_ref(f), &tp.device)?)
            }
            TransformerFiles::Gguf(f) => Box::new(GgufStore::open(f, &tp.device)?),
        };
        let layout = Loader::detect_layout(store.as_ref())?;
        let cfg = match &paths.transformer_config {
            Some(p) => read_json::<TransformerConfig>(p)?,
            None if layout == Layout::Diffusers => TransformerConfig::fill_dev(),
            None => Loader::infer_config(store.as_ref(), layout)?,
        };
        let loader = Loader {
            store: store.as_ref(),
            layout,
            opts: lopts,
        };
        let mut transformer = FluxTransformer::load(&loader, &cfg)?;
        if o.precision == Precision::Int8 {
            transformer.quantize_token_gemms_int8()?;
        }
        drop(store);

        // VAE
        let vcfg = match &paths.vae_config {
            Some(p) => read_json::<VaeConfig>(p)?,
            None => VaeConfig::flux(),
        };
        let mut vae = AutoEncoder::load(&vcfg, &paths.vae, o.vae.dtype, &o.vae.device)?;
        if o.vae_tiling {
            vae.set_tiling(Some(o.vae_tile.unwrap_or(vcfg.sample_size)));
        }

        // text encoders
        let ccfg: ClipTextConfig = read_json(&paths.clip_config)?;
        // SAFETY: read-only mapping of model files (see SafetensorsStore::open).
        let vb = unsafe {
            VarBuilder::from_mmaped_safetensors(&paths.clip_weights, o.clip.dtype, &o.clip.device)
        }
        .map_err(|e| {
            ModelError::bad_file(paths.clip_weights.first().cloned().unwrap_or_default(), e)
        })?;
        let clip = ClipTextModel::load(vb, &ccfg)?;
        let t5cfg = match &paths.t5_config {
            Some(p) => read_json::<T5Config>(p)?,
            None => T5Config::v1_1_xxl(),
        };
        let t5store: Box<dyn WeightStore> = match &paths.t5 {
            T5Files::Safetensors(files) => Box::new(SafetensorsStore::open(files, &o.t5.device)?),
            T5Files::Gguf(f) => Box::new(GgufStore::open(f, &o.t5.device)?),
        };
        let t5 = T5Encoder::load(
            t5store.as_ref(),
            &t5cfg,
            o.t5.dtype,
            LinearOpts {
                dtype: o.t5.dtype,
                quant: o.quant_matmul,
            },
        )?;
        let text = TextEncoders::new(
            PromptTokenizer::clip(&paths.tokenizer)?,
            PromptTokenizer::t5(&paths.tokenizer_2)?,
            clip,
            t5,
            o.prompt_cache_bytes,
        );
        let scheduler = match &paths.scheduler_config {
            Some(p) => read_json::<SchedulerConfig>(p)?,
            None => SchedulerConfig::default(),
        };
        Ok(Self {
            transformer,
            vae,
            text,
            scheduler,
        })
    }

    pub fn scheduler(&self) -> &SchedulerConfig {
        &self.scheduler
    }

    /// Pixel multiple required for width and height (16 for FLUX: VAE ×8, then 2×2 packing).
    pub fn size_multiple(&self) -> usize {
        self.vae.config().scale_factor() * 2
    }

    /// T5 + CLIP embeddings of a prompt (cached).
    pub fn encode_prompt(
        &self,
        prompt: &str,
        max_sequence_length: usize,
    ) -> Result<Arc<PromptEmbeds>> {
        self.text.encode(prompt, max_sequence_length)
    }

    /// What the prompt cache did and holds.
    pub fn prompt_cache_stats(&self) -> PromptCacheStats {
        self.text.cache_stats()
    }

    /// Packed conditioning `[1, L, 320]` (masked-image latents | mask) on the transformer device.
    pub fn condition(&self, image: &image::RgbImage, mask: &image::GrayImage) -> Result<Tensor> {
        let (w, h) = image.dimensions();
        let (w, h) = (w as usize, h as usize);
        let m = self.size_multiple();
        if (w, h) != (mask.width() as usize, mask.height() as usize) {
            return Err(ModelError::InvalidInput(format!(
                "image is {w}x{h} but mask is {}x{}",
                mask.width(),
                mask.height()
            )));
        }
        if w == 0 || h == 0 || w % m != 0 || h % m != 0 {
            return Err(ModelError::InvalidInput(format!(
                "image size {w}x{h} must be a non-zero multiple of {m}"
            )));
        }
        let cpu = Device::Cpu;
        // VaeImageProcessor: x/255·2−1 (f32); mask: /255 then binarize at 0.5 (≥ 128 → 1).
        let mut px = vec![0f32; 3 * w * h];
        for (x, y, p) in image.enumerate_pixels() {
            for c in 0..3 {
                px[c * w * h + y as usize * w + x as usize] = (p.0[c] as f32 / 255.0) * 2.0 - 1.0;
            }
        }
        let mk: Vec<f32> = mask
            .pixels()
            .map(|p| if p.0[0] >= 128 { 1.0 } else { 0.0 })
            .collect();
        let init = Tensor::from_vec(px, (1, 3, h, w), &cpu)?;
        let mask_t = Tensor::from_vec(mk, (1, 1, h, w), &cpu)?;
        let masked = init.broadcast_mul(&(1.0 - &mask_t)?)?;
        let lat = self.vae.scale_latents(&self.vae.encode_mean(&masked)?)?;
        let dev = self.transformer.device();
        let lat = pack_latents(&lat)?.to_device(dev)?;
        let mask_p = pack_mask(&mask_t, self.vae.config().scale_factor())?.to_device(dev)?;
        Ok(Tensor::cat(&[lat, mask_p], 2)?)
    }

    /// Inpaints `mask` (white = fill) of `image` (sizes multiple of 16) guided by `prompt`.
    /// `progress` is called after each denoise step; returning `false` cancels (`ModelError::Cancelled`).
    pub fn inpaint(
        &self,
        image: &image::RgbImage,
        mask: &image::GrayImage,
        prompt: &str,
        opts: &InpaintOptions,
        progress: &mut dyn FnMut(Step) -> bool,
    ) -> Result<FillOutput> {
        let (out, _) = self.inpaint_traced(image, mask, prompt, opts, progress)?;
        Ok(out)
    }

    /// `inpaint` that also returns intermediate tensors.
    pub fn inpaint_traced(
        &self,
        image: &image::RgbImage,
        mask: &image::GrayImage,
        prompt: &str,
        opts: &InpaintOptions,
        progress: &mut dyn FnMut(Step) -> bool,
    ) -> Result<(FillOutput, FillTrace)> {
        if opts.steps == 0 {
            return Err(ModelError::InvalidInput("steps must be at least 1".into()));
        }
        let mut cache = opts.cache_threshold.map(FirstBlockCache::new).transpose()?;
        let dev = self.transformer.device().clone();
        let dtype = self.transformer.dtype();
        let (w, h) = (image.width() as usize, image.height() as usize);
        let t0 = Instant::now();
        let (encoded, encode_work) = accounting::measure(|| -> Result<_> {
            let cond = self.condition(image, mask)?;
            Ok((
                cond,
                self.text.encode_cached(prompt, opts.max_sequence_length)?,
            ))
        });
        let (
            cond,
            Encoded {
                embeds: emb,
                cached: prompt_cached,
            },
        ) = encoded?;
        sync(&dev)?;
        let encode_ms = elapsed_ms(t0);

        let t1 = Instant::now();
        let vs = self.vae.config().scale_factor();
        let (lh, lw) = (2 * (h / (vs * 2)), 2 * (w / (vs * 2)));
        let lc = self.vae.config().latent_channels;
        let l = (lh / 2) * (lw / 2);
        let noise = match &opts.noise {
            Some(n) if n.dims() == [1, lc, lh, lw] => pack_latents(&n.to_dtype(DType::F32)?)?,
            Some(n) if n.dims() == [1, l, 4 * lc] => n.to_dtype(DType::F32)?,
            Some(n) => {
                return Err(ModelError::InvalidInput(format!(
                    "noise has shape {:?}, expected [1, {lc}, {lh}, {lw}] or [1, {l}, {}]",
                    n.dims(),
                    4 * lc
                )));
            }
            None => pack_latents(&seeded_noise(opts.seed, (1, lc, lh, lw))?)?,
        };
        let mut latents = noise.to_device(&dev)?;
        let sig = sigmas(opts.steps, h, w, vs, &self.scheduler);
        let ts = timesteps(&sig, &self.scheduler);
        let time_dtype = opts.time_dtype.unwrap_or(if dtype == DType::F32 {
            DType::F32
        } else {
            DType::BF16
        });
        let t5 = emb.t5.to_device(&dev)?.to_dtype(dtype)?;
        let pooled = emb.pooled.to_device(&dev)?.to_dtype(dtype)?;
        let rope = Rope::new(
            t5.dim(1)?,
            lh / 2,
            lw / 2,
            &self.transformer.config().axes_dims_rope,
            self.transformer.config().theta,
            &dev,
        )?;
        let cond = cond.to_dtype(dtype)?;
        let mut denoise_work = WorkCounts::default();
        for (i, &t) in ts.iter().enumerate() {
            let (next, step_work) = accounting::measure(|| -> Result<Tensor> {
                let (tm, gm) = model_time_inputs(t, opts.guidance, time_dtype);
                let temb = self.transformer.conditioning(&[tm], Some(&[gm]), &pooled)?;
                let lat = latents.to_dtype(dtype)?;
                let x = accounting::ew(&[&lat, &cond], Tensor::cat(&[&lat, &cond], 2)?);
                let v = self
                    .transformer
                    .forward_cached(&x, &t5, &temb, &rope, cache.as_mut())?;
                euler_step(&latents, &v, sig[i], sig[i + 1])
            });
            latents = next?;
            denoise_work += step_work;
            sync(&dev)?;
            if !progress(Step {
                step: i + 1,
                total: ts.len(),
            }) {
                return Err(ModelError::Cancelled);
            }
        }
        let denoise_ms = elapsed_ms(t1);

        let t2 = Instant::now();
        let (img, decode_work) = accounting::measure(|| -> Result<Tensor> {
            let z = self
                .vae
                .unscale_latents(&unpack_latents(&latents, lh, lw)?)?;
            let img = self.vae.decode(&z)?;
            let out = ((&img * 0.5)? + 0.5)?.clamp(0f32, 1f32)?;
            accounting::elementwise(&[&img], &out);
            Ok(out)
        });
        let img = img?.to_device(&Device::Cpu)?;
        let data = img.flatten_all()?.to_vec1::<f32>()?;
        let mut out = image::RgbImage::new(w as u32, h as u32);
        for (x, y, p) in out.enumerate_pixels_mut() {
            for c in 0..3 {
                let v = data[c * w * h + y as usize * w + x as usize];
                p.0[c] = (v * 255.0).round_ties_even() as u8;
            }
        }
        let decode_ms = elapsed_ms(t2);
        let trace = FillTrace {
            condition: cond,
            sigmas: sig,
            latents,
            image: img,
            cache_diffs: cache
                .as_ref()
                .map(|c| c.diffs().to_vec())
                .unwrap_or_default(),
        };
        Ok((
            FillOutput {
                image: out,
                timings: FillTimings {
                    encode_ms,
                    denoise_ms,
                    decode_ms,
                },
                work: FillWork {
                    encode: encode_work,
                    denoise: denoise_work,
                    decode: decode_work,
                },
                prompt_cached,
                steps_skipped: cache.map(|c| c.skipped().to_vec()).unwrap_or_default(),
            },
            trace,
        ))
    }
}

//! FLUX.1-Fill-dev (transformer, text encoders, VAE, sampling, pipeline), numerically following
//! diffusers' `FluxFillPipeline` (0.42): explicit size (multiple of 16), binarized mask, masked image
//! encoded with the VAE posterior **mean**, 8×8 space-to-depth mask, 2×2 packing, 64|64|256 channel
//! order, dynamic-shift sigmas, Euler step in f32, schedule / timestep embedding / RoPE in f32–f64.
//!
//! Weights: the diffusers folder, BFL single files (`flux1-fill-dev.safetensors`, `ae.safetensors`) or
//! GGUF (city96 transformer files; T5 encoders with HF or llama.cpp names). See [`crate::weights`].
//!
//! Placement on a 16 GB T4 (sm_75: f16 only, bf16 is refused): a Q5_K_M transformer (~8.4 GB) and an
//! f16 T5-XXL (9.5 GB) do not fit together, so the default of "everything on one device" only suits
//! big cards. On a T4 use `--transformer-gguf …Q5_K_M.gguf --t5-gguf t5-v1_1-xxl-encoder-Q5_K_M.gguf`
//! (T5 ≈ 3.4 GB, all on the GPU, ≈ 12.5 GB) or `--t5-device cpu` (T5 runs once per new prompt; results
//! are cached). The VAE must be tiled there (candle's im2col convolutions need ~17 GB transient for an
//! untiled 1024×768 f32 decode): the CLI's `--vae-tile auto` picks 256-pixel tiles on cards under
//! 24 GiB (bench/RESULTS.md, "Default T4 worker configuration"). CLIP and the VAE run in f32 by default.
//!
//! ```text
//! let paths = FluxModelPaths::resolve(models_dir, &FluxOverrides::default())?;
//! let fill = FluxFill::load(&paths, &FluxLoadOptions::new(device, DType::F16))?;
//! let out = fill.inpaint(&image, &mask, prompt, &InpaintOptions::default(), &mut |_| true)?;
//! ```

pub mod config;
pub mod first_block_cache;
pub mod pipeline;
pub mod profile;
pub mod prompt_cache;
pub mod sampling;
pub mod text;
pub mod transformer;
pub mod vae;

pub use crate::checkpoint::QuantMatmul;
pub use crate::error::ModelError;
pub use pipeline::{
    FillOutput, FillTimings, FillTrace, FillWork, FluxFill, FluxLoadOptions, InpaintOptions,
    Placement, Precision, Step,
};
pub use prompt_cache::{DEFAULT_PROMPT_CACHE_BYTES, PromptCacheStats};

//! Stages 5–7, inpaint: text encoding, denoising and VAE decoding, inside the model behind
//! [`Inpainter`], once per crop.
//!
//! This file prepares a crop's model input (the region of the current composite, resized to the
//! model size when the crop is not native, and the dilated mask over it), calls the model with a
//! progress callback that also carries cancellation, and brings the output back to the region's
//! size.

use image::imageops::{self, FilterType};
use image::{GrayImage, RgbImage};

use pawfect_api::{DenoiseSteps, WorkCounts};

use super::crop::Crop;

/// Sampling parameters of one model call.
#[derive(Clone, Debug, PartialEq)]
pub struct InpaintParams {
    pub steps: u32,
    pub guidance: f64,
    pub seed: u64,
    /// First-Block Cache threshold (`spec.cache.threshold`); `None`: every step computed.
    pub cache_threshold: Option<f64>,
}

/// A denoising step has finished: `step` of `total` (1-based).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Step {
    pub step: u32,
    pub total: u32,
}

/// Milliseconds spent inside the model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ModelTimings {
    pub encode_ms: u64,
    pub denoise_ms: u64,
    pub decode_ms: u64,
}

impl std::ops::AddAssign for ModelTimings {
    fn add_assign(&mut self, o: Self) {
        self.encode_ms += o.encode_ms;
        self.denoise_ms += o.denoise_ms;
        self.decode_ms += o.decode_ms;
    }
}

/// Work the model issued per stage (`pawfect_models::accounting`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ModelWork {
    pub encode: WorkCounts,
    pub denoise: WorkCounts,
    pub decode: WorkCounts,
    /// Denoise steps computed in full and served by the First-Block Cache (zero for models
    /// that do not report them).
    pub steps: DenoiseSteps,
}

impl std::ops::AddAssign for ModelWork {
    fn add_assign(&mut self, o: Self) {
        self.encode += o.encode;
        self.denoise += o.denoise;
        self.decode += o.decode;
        self.steps.computed += o.steps.computed;
        self.steps.cached += o.steps.cached;
    }
}

/// A model's result: the filled image, at the input's size.
#[derive(Clone, Debug)]
pub struct Inpainted {
    pub image: RgbImage,
    pub timings: ModelTimings,
    /// What the model counted (zero for models that do not count).
    pub work: ModelWork,
}

#[derive(Debug, thiserror::Error)]
pub enum InpaintError {
    /// The progress callback asked to stop.
    #[error("cancelled")]
    Cancelled,
    /// The device ran out of memory; what the call allocated has been released.
    #[error("out of memory: {0}")]
    OutOfMemory(String),
    /// The input can't be handled by this model (size, format).
    #[error("invalid model input: {0}")]
    InvalidInput(String),
    #[error("{0}")]
    Model(String),
}

impl InpaintError {
    /// Classifies an error message of a model backend (candle/CUDA report out-of-memory as text).
    pub fn from_backend(message: impl Into<String>) -> Self {
        let message = message.into();
        let lower = message.to_ascii_lowercase();
        if lower.contains("out of memory") || lower.contains("out_of_memory") {
            InpaintError::OutOfMemory(message)
        } else {
            InpaintError::Model(message)
        }
    }
}

/// What a model's prompt-embedding cache did and holds, counted since the model was loaded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PromptCacheUsage {
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
    pub entries: u64,
    pub bytes: u64,
    pub budget: u64,
}

/// Fills the white part of `mask` in `image` (FLUX.1-Fill-dev or any model with this contract).
///
/// `image` and `mask` have the same size, a multiple of 16 per side. `progress` is called after
/// every denoising step; when it returns `false` the model stops and returns
/// [`InpaintError::Cancelled`].
pub trait Inpainter: Send + Sync {
    fn inpaint(
        &self,
        image: &RgbImage,
        mask: &GrayImage,
        prompt: &str,
        params: &InpaintParams,
        progress: &mut dyn FnMut(Step) -> bool,
    ) -> Result<Inpainted, InpaintError>;

    /// The model's prompt-embedding cache, if it has one.
    fn prompt_cache(&self) -> Option<PromptCacheUsage> {
        None
    }
}

/// The model input for `crop`: the region of `photo` and of the dilated mask, at the model size.
pub fn model_input(photo: &RgbImage, dilated: &GrayImage, crop: &Crop) -> (RgbImage, GrayImage) {
    let r = crop.region;
    let image = imageops::crop_imm(photo, r.x, r.y, r.w, r.h).to_image();
    let mask = imageops::crop_imm(dilated, r.x, r.y, r.w, r.h).to_image();
    if crop.is_native() {
        return (image, mask);
    }
    let (tw, th) = crop.target;
    let filter = if crop.scale() < 1.0 {
        FilterType::Lanczos3
    } else {
        FilterType::CatmullRom
    };
    let image = imageops::resize(&image, tw, th, filter);
    // Any coverage counts as masked: the model fills at least what the dilated mask covers.
    let mut mask = imageops::resize(&mask, tw, th, FilterType::Triangle);
    for p in mask.pixels_mut() {
        p.0[0] = if p.0[0] > 0 { 255 } else { 0 };
    }
    (image, mask)
}

/// The model's output for `crop` at the region's size.
pub fn region_output(output: RgbImage, crop: &Crop) -> RgbImage {
    if crop.is_native() {
        return output;
    }
    let r = crop.region;
    let filter = if crop.scale() > 1.0 {
        FilterType::Lanczos3
    } else {
        FilterType::CatmullRom
    };
    imageops::resize(&output, r.w, r.h, filter)
}

//! The real models behind the pipeline's traits: FLUX.1-Fill-dev ([`Inpainter`]), Florence-2
//! ([`Captioner`]) and the surface-prompt rules ([`PromptRules`]); the API's model variant mapped
//! onto the models library's own ([`model_variant`]).

use candle_core::Device;
use image::{GrayImage, RgbImage};

use super::inpaint::{
    InpaintError, InpaintParams, Inpainted, Inpainter, ModelTimings, ModelWork, PromptCacheUsage,
    Step,
};
use super::prompt::{CaptionError, Captioner, PromptRules, RulePrompt};
use crate::surface_prompt::SurfacePrompt;
use pawfect_api::{DenoiseSteps, PromptOrigin};
use pawfect_models::ModelError;
use pawfect_models::florence2::{Florence2, GenerationConfig, Task};
use pawfect_models::flux::{self, FluxFill, InpaintOptions};
use pawfect_models::weights::ModelVariant;

/// FLUX.1-Fill-dev.
pub struct FluxInpainter {
    fill: FluxFill,
    max_sequence_length: usize,
}

impl FluxInpainter {
    pub fn new(fill: FluxFill, max_sequence_length: usize) -> Self {
        FluxInpainter {
            fill,
            max_sequence_length,
        }
    }

    pub fn fill(&self) -> &FluxFill {
        &self.fill
    }
}

impl Inpainter for FluxInpainter {
    fn inpaint(
        &self,
        image: &RgbImage,
        mask: &GrayImage,
        prompt: &str,
        params: &InpaintParams,
        progress: &mut dyn FnMut(Step) -> bool,
    ) -> Result<Inpainted, InpaintError> {
        let opts = InpaintOptions {
            steps: params.steps as usize,
            guidance: params.guidance as f32,
            seed: params.seed,
            max_sequence_length: self.max_sequence_length,
            cache_threshold: params.cache_threshold.map(|t| t as f32),
            ..InpaintOptions::default()
        };
        let mut on_step = |s: flux::Step| {
            progress(Step {
                step: s.step as u32,
                total: s.total as u32,
            })
        };
        match self.fill.inpaint(image, mask, prompt, &opts, &mut on_step) {
            Ok(out) => Ok(Inpainted {
                image: out.image,
                timings: ModelTimings {
                    encode_ms: out.timings.encode_ms.round() as u64,
                    denoise_ms: out.timings.denoise_ms.round() as u64,
                    decode_ms: out.timings.decode_ms.round() as u64,
                },
                work: ModelWork {
                    encode: work_counts(out.work.encode),
                    denoise: work_counts(out.work.denoise),
                    decode: work_counts(out.work.decode),
                    steps: DenoiseSteps {
                        computed: (opts.steps - out.steps_skipped.len()) as u32,
                        cached: out.steps_skipped.len() as u32,
                    },
                },
            }),
            Err(ModelError::Cancelled) => Err(InpaintError::Cancelled),
            Err(ModelError::InvalidInput(m)) => Err(InpaintError::InvalidInput(m)),
            Err(e) => Err(InpaintError::from_backend(e.to_string())),
        }
    }

    fn prompt_cache(&self) -> Option<PromptCacheUsage> {
        let s = self.fill.prompt_cache_stats();
        Some(PromptCacheUsage {
            hits: s.hits,
            misses: s.misses,
            evictions: s.evictions,
            entries: s.entries as u64,
            bytes: s.bytes as u64,
            budget: s.budget as u64,
        })
    }
}

/// The models library's work counts in the API's form (the same four classes).
pub fn work_counts(w: pawfect_models::accounting::WorkCounts) -> pawfect_api::WorkCounts {
    pawfect_api::WorkCounts {
        f16_gemm_flop: w.f16_gemm_flop,
        int8_gemm_op: w.int8_gemm_op,
        attention_flop: w.attention_flop,
        memory_bound_bytes: w.memory_bound_bytes,
    }
}

/// Florence-2 captions.
pub struct FlorenceCaptioner {
    model: Florence2,
    task: Task,
    generation: GenerationConfig,
}

impl FlorenceCaptioner {
    pub fn new(model: Florence2, task: Task, generation: GenerationConfig) -> Self {
        FlorenceCaptioner {
            model,
            task,
            generation,
        }
    }
}

impl Captioner for FlorenceCaptioner {
    fn caption(&self, image: &RgbImage) -> Result<String, CaptionError> {
        self.model
            .caption(image, self.task, &self.generation)
            .map(|c| c.text)
            .map_err(|e| CaptionError(e.to_string()))
    }
}

/// `surface_prompt`: "{surface}, seamless continuation, no objects".
pub struct SurfaceRules;

fn rule(p: SurfacePrompt) -> RulePrompt {
    RulePrompt {
        prompt: p.prompt,
        surface: p.surface,
        neutral: p.source == PromptOrigin::Fallback,
        note: p.note,
    }
}

impl PromptRules for SurfaceRules {
    fn for_caption(&self, caption: &str) -> RulePrompt {
        rule(SurfacePrompt::from_caption(caption))
    }
    fn for_labels(&self, labels: &[String]) -> RulePrompt {
        rule(SurfacePrompt::from_labels(labels))
    }
    fn neutral(&self) -> RulePrompt {
        rule(SurfacePrompt::neutral())
    }
}

/// Reads the GPU memory (used, total bytes) of the device the models run on.
pub type GpuMemoryProbe = Box<dyn Fn() -> Option<(u64, u64)> + Send + Sync>;

/// Reads (used, total) bytes of the GPU `device` is on; None for the CPU.
pub fn gpu_memory(device: &Device) -> Option<GpuMemoryProbe> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        let ctx = d.cuda_stream().context().clone();
        return Some(Box::new(move || {
            let (free, total) = ctx.mem_get_info().ok()?;
            Some(((total - free) as u64, total as u64))
        }));
    }
    let _ = device;
    None
}

/// The CRD's `spec.worker.modelVariant` as the models library's variant. Exhaustive on both
/// sides: a variant added to the API does not compile until it is mapped here.
pub fn model_variant(v: pawfect_api::ModelVariant) -> ModelVariant {
    use pawfect_api::ModelVariant as Api;
    match v {
        Api::Q4_0 => ModelVariant::Q4_0,
        Api::Q4KM => ModelVariant::Q4KM,
        Api::Q5KM => ModelVariant::Q5KM,
        Api::Q8_0 => ModelVariant::Q8_0,
        Api::Bf16 => ModelVariant::Bf16,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_variants_keep_their_names() {
        // The operator passes the CRD's name as PAWFECT_MODEL_VARIANT; both enums must spell it alike.
        for v in ModelVariant::ALL {
            let api: pawfect_api::ModelVariant =
                serde_json::from_value(serde_json::Value::String(v.as_str().into())).unwrap();
            assert_eq!(model_variant(api), v);
            assert_eq!(api.as_str(), v.as_str());
        }
        assert_eq!(
            model_variant(pawfect_api::ModelVariant::default()),
            ModelVariant::default()
        );
    }
}

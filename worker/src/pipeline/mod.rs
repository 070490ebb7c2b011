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
//! Around them: [`run`] drives one job through the stages ([`Pipeline::run`], one function per
//! stage), [`error`] maps every stage's failure to the one-word reason a job's status shows,
//! [`progress`] names the stages and carries progress and cancellation, [`geometry`] is the
//! pixel rectangle the crops are made of.
//!
//! The models sit behind two narrow traits, [`Inpainter`] and [`Captioner`] (plus the
//! [`PromptRules`] that turn captions into prompts), so the same stages run in `serve`, in the
//! `inpaint` CLI and in tests. Every failure carries a [`FailureReason`] that the queue reports.

pub mod adapters;
pub mod crop;
pub mod error;
pub mod fetch;
pub mod geometry;
pub mod inpaint;
pub mod mask;
pub mod progress;
pub mod prompt;
pub mod run;
pub mod stitch;
pub mod store;

pub use crop::{Crop, CropConfig};
pub use error::{FailureReason, PipelineError};
pub use fetch::{DecodeError, InputLimits, MaskSizePolicy};
pub use geometry::Rect;
pub use inpaint::{
    InpaintError, InpaintParams, Inpainted, Inpainter, ModelTimings, ModelWork, PromptCacheUsage,
    Step,
};
pub use mask::{CleanMask, MaskConfig, MaskError};
pub use pawfect_api::PromptOrigin;
pub use progress::{NoObserver, Observer, Progress, Stage};
pub use prompt::{CaptionError, Captioner, Prompt, PromptRules, RulePrompt};
pub use run::{JobOutcome, JobParams, Models, Pipeline, PipelineConfig, Processed};
pub use store::{OutputFormat, StoreError};

//! FLUX.1-Fill-dev (transformer, text encoders, VAE, sampling, pipeline), numerically following
//! diffusers' `FluxFillPipeline`.
//!
//! ```text
//! let paths = FluxModelPaths::resolve(models_dir, &FluxOverrides::default())?;
//! let fill = FluxFill::load(&paths, &FluxLoadOptions::new(device, DType::F16))?;
//! let out = fill.inpaint(&image, &mask, prompt, &InpaintOptions::default(), &mut |_| true)?;
//! ```

pub mod config;
pub mod error;
pub mod pipeline;
pub mod sampling;
pub mod store;
pub mod text;
pub mod transformer;
pub mod vae;

pub use error::FluxError;
pub use pipeline::{
    FillOutput, FillTimings, FillTrace, FluxFill, FluxLoadOptions, InpaintOptions, Placement, Step,
};
pub use store::QuantMatmul;

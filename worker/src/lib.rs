//! Pawfect Inpaint worker: models (candle) and, with their issues, the pipeline and queue loop.

pub mod cli;
pub mod models;
pub mod surface_prompt;
pub mod weights;

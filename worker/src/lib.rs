//! Pawfect Inpaint worker: models (candle), the pipeline stages, storage and the queue loop.

pub mod cli;
pub mod models;
pub mod pipeline;
pub mod serve;
pub mod storage;
pub mod surface_prompt;
pub mod weights;

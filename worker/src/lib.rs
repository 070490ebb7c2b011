//! Pawfect Inpaint worker: models (candle), the pipeline stages, storage and the queue loop.

pub mod models;
pub mod pipeline;
pub mod storage;

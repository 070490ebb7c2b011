//! Pawfect Inpaint worker: the pipeline stages over the `pawfect-models` library, storage, the
//! queue loop, metrics and the CLIs.

pub mod cli;
pub mod download;
pub mod pipeline;
pub mod serve;
pub mod storage;
pub mod surface_prompt;

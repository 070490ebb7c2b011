//! Pawfect Inpaint's model library, on candle: one folder or file per model, configs as plain
//! structs, numerically following the reference implementations (diffusers, transformers, ggml).
//!
//! - [`flux`]: FLUX.1-Fill-dev — transformer, VAE, sampling, text conditioning and the Fill
//!   pipeline maths ([`flux::FluxFill`]).
//! - [`florence2`]: Florence-2 (DaViT vision tower, BART encoder–decoder, beam search) for
//!   `<DETAILED_CAPTION>`.
//! - [`t5`], [`clip`]: the text encoders FLUX uses.
//! - [`checkpoint`]: reading weights from safetensors and GGUF files (dense or quantised
//!   matmuls), shared by every model.
//! - [`weights`]: where a model's files are in a models directory (diffusers folders, single
//!   files, GGUF variants) and checking that a directory is complete.
//! - [`error`]: the library's error type.
//! - [`accounting`]: per-stage counts of the work a model call issued (GEMM and attention FLOP,
//!   memory-bound bytes), counted where the ops are issued.
//!
//! The library has no runtime: no async, no network, no Kubernetes or queue types. Downloading
//! weights and running jobs belong to the applications (`pawfect-worker`, benchmarks).

pub mod accounting;
pub mod checkpoint;
pub mod clip;
pub mod error;
pub mod florence2;
pub mod flux;
pub mod int8;
pub mod t5;
pub mod weights;

pub use error::{ModelError, Result};

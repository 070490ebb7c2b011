//! Hot-path ops of the FLUX transformer and Florence-2, with one API on every device.
//!
//! Each op has a reference path written with plain candle ops (used on CPU, and as the
//! ground truth in tests) and, with the `cuda` feature, a fused CUDA kernel used on the GPU.
//! Model code calls only these functions.

mod reference;

pub use reference::*;

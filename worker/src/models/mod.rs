//! Model ports, one folder per model (candle-transformers style).

pub mod clip;
pub mod florence2;
pub mod flux;
pub mod t5;

//! Model ports, one folder per model (candle-transformers style).

pub mod florence2;
pub mod flux;

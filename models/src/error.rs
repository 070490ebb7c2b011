//! The model library's error type (weights, checkpoints, FLUX, T5, CLIP; Florence-2 has its own
//! [`crate::florence2::Florence2Error`]).

use std::path::PathBuf;

/// What can go wrong finding, loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The denoise loop was stopped by the progress callback.
    #[error("cancelled")]
    Cancelled,
    /// Model files are missing from the models directory.
    #[error("missing model files in {}:\n  {}\n{hint}", root.display(), files.join("\n  "))]
    MissingFiles {
        root: PathBuf,
        files: Vec<String>,
        hint: String,
    },
    /// A file exists but could not be read or parsed.
    #[error("{}: {msg}", path.display())]
    BadFile { path: PathBuf, msg: String },
    /// A GGUF tensor has a type this build cannot run.
    #[error("{}: tensor {tensor} has unsupported GGUF type {dtype} (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K)", path.display())]
    UnsupportedGguf {
        path: PathBuf,
        tensor: String,
        dtype: String,
    },
    /// A checkpoint does not have the expected tensor or shape.
    #[error("weights: {0}")]
    Weights(String),
    /// Bad caller input (image size, mask, options).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// Tokenizer failure.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A numeric failure inside candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

impl ModelError {
    pub fn bad_file(path: impl Into<PathBuf>, msg: impl std::fmt::Display) -> Self {
        ModelError::BadFile {
            path: path.into(),
            msg: msg.to_string(),
        }
    }
}

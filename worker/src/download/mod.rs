//! Downloading model weights from the Hugging Face Hub (`pawfect-worker fetch-models`).
//!
//! This lives in the worker, not in `pawfect-models`: the models library only finds and loads files
//! on disk, so that using it pulls in no HTTP client, TLS stack or Hub credentials. Downloading is
//! an operational step of the CLI (gated repositories, tokens, resumable caches, symlinked layouts).
//!
//! - [`hub`]: the Hub client (the Hugging Face cache layout, resumable, `HF_TOKEN`/`HF_ENDPOINT`).
//! - [`lock`]: `DIR/<variant>.lock`, the commit and sha256 of every file, recorded by
//!   `fetch-models --write-lock` and verified by every later download.
//! - [`plan`]: which files a `--variant` needs and the `models/` layout `fetch-models` makes.
//! - [`flux`]: the FLUX.1-Fill-dev diffusers folder; [`florence`]: Florence-2.

use pawfect_models::error::ModelError;
use pawfect_models::florence2::Florence2Error;

pub mod florence;
pub mod flux;
pub mod hub;
pub mod lock;
pub mod plan;

pub use flux::{FluxParts, download_flux, download_flux_parts};

/// What can go wrong downloading models.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    /// One file of a repository could not be downloaded.
    #[error("download of {repo}/{file} failed: {msg}")]
    Failed {
        repo: String,
        file: String,
        msg: String,
    },
    /// A repository could not be downloaded.
    #[error("downloading {repo}: {msg}")]
    Repo { repo: String, msg: String },
    /// A downloaded file is not what the model loader expects.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A downloaded Florence-2 checkpoint does not load.
    #[error(transparent)]
    Florence(#[from] Florence2Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

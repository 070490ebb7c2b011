//! Downloading Florence-2 (`microsoft/Florence-2-base` by default) into the Hugging Face cache.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use hf_hub::{Repo, RepoType, api::sync::ApiBuilder};
use pawfect_models::florence2::Florence2;

use super::DownloadError;

/// Downloads `repo` (e.g. [`pawfect_models::florence2::HUB_REPO`]) into the Hugging Face cache and returns its folder.
pub fn download(repo: &str, revision: Option<&str>) -> Result<PathBuf, DownloadError> {
    let derr = |msg: String| DownloadError::Repo {
        repo: repo.to_string(),
        msg,
    };
    let api = ApiBuilder::from_env()
        .build()
        .map_err(|e| derr(e.to_string()))?;
    let r = match revision {
        Some(rev) => api.repo(Repo::with_revision(
            repo.to_string(),
            RepoType::Model,
            rev.to_string(),
        )),
        None => api.repo(Repo::new(repo.to_string(), RepoType::Model)),
    };
    let config = r
        .get("config.json")
        .map_err(|e| derr(format!("config.json: {e}")))?;
    r.get("tokenizer.json")
        .map_err(|e| derr(format!("tokenizer.json: {e}")))?;
    for optional in [
        "generation_config.json",
        "preprocessor_config.json",
        "processor_config.json",
    ] {
        let _ = r.get(optional);
    }
    if let Err(e1) = r.get("model.safetensors") {
        r.get("pytorch_model.bin")
            .map_err(|e2| derr(format!("model.safetensors: {e1}; pytorch_model.bin: {e2}")))?;
    }
    config
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| derr("no snapshot folder".into()))
}

/// [`download`] then [`Florence2::load`].
pub fn load_from_hub(
    repo: &str,
    revision: Option<&str>,
    device: &Device,
    dtype: DType,
) -> Result<Florence2, DownloadError> {
    Ok(Florence2::load(download(repo, revision)?, device, dtype)?)
}

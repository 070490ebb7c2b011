//! Downloading the FLUX.1-Fill-dev diffusers folder (configs, tokenizers, CLIP, and whatever the
//! single-file / GGUF overrides do not replace) through the Hub client of [`super::hub`].

use std::path::{Path, PathBuf};

use pawfect_models::error::ModelError;
use pawfect_models::weights::{FLUX_FILL_REPO, FluxOverrides};

use super::DownloadError;

/// Which parts of the FLUX.1-Fill-dev diffusers folder a download leaves out (those replaced by
/// single files or GGUFs). Configs and tokenizers always come.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FluxParts {
    pub skip_transformer: bool,
    pub skip_t5: bool,
    pub skip_vae: bool,
}

impl From<&FluxOverrides> for FluxParts {
    fn from(o: &FluxOverrides) -> Self {
        FluxParts {
            skip_transformer: o.transformer_gguf.is_some() || o.transformer_file.is_some(),
            skip_t5: o.t5_gguf.is_some(),
            skip_vae: o.vae_file.is_some(),
        }
    }
}

/// Downloads the diffusers folder of FLUX.1-Fill-dev into `models/hub` (the Hugging Face cache
/// layout, resumable) and returns the snapshot folder. Components replaced by overrides are skipped.
/// `token` defaults to `HF_TOKEN`; `HF_ENDPOINT` is honoured.
pub fn download_flux(
    models: &Path,
    token: Option<String>,
    o: &FluxOverrides,
) -> Result<PathBuf, DownloadError> {
    let mut options = crate::download::hub::HubOptions::from_env();
    if let Some(t) = token.filter(|t| !t.is_empty()) {
        options.token = Some(t);
    }
    let hub =
        crate::download::hub::Hub::new(&models.join("hub"), options).map_err(|e| hub_err("", e))?;
    download_flux_parts(&hub, FluxParts::from(o))
}

fn hub_err(file: &str, e: crate::download::hub::HubError) -> DownloadError {
    let msg = e.to_string();
    let msg = msg
        .strip_prefix(&format!("{FLUX_FILL_REPO}/{file}: "))
        .unwrap_or(&msg)
        .to_string();
    DownloadError::Failed {
        repo: FLUX_FILL_REPO.into(),
        file: file.into(),
        msg,
    }
}

/// [`download_flux`] through an existing client, leaving out `parts`.
pub fn download_flux_parts(
    hub: &crate::download::hub::Hub,
    parts: FluxParts,
) -> Result<PathBuf, DownloadError> {
    let get = |f: &str| hub.get(FLUX_FILL_REPO, f).map_err(|e| hub_err(f, e));
    let mut files: Vec<String> = vec![
        "model_index.json".into(),
        "scheduler/scheduler_config.json".into(),
        "text_encoder/config.json".into(),
        "text_encoder/model.safetensors".into(),
        "tokenizer/vocab.json".into(),
        "tokenizer/merges.txt".into(),
        "tokenizer_2/tokenizer.json".into(),
        "text_encoder_2/config.json".into(),
        "transformer/config.json".into(),
        "vae/config.json".into(),
    ];
    if !parts.skip_vae {
        files.push("vae/diffusion_pytorch_model.safetensors".into());
    }
    let mut snapshot = None;
    for f in &files {
        let p = get(f)?;
        if snapshot.is_none() {
            snapshot = crate::download::hub::snapshot_dir(&p, f);
        }
    }
    // Not read by the loader; kept with the tokenizers when the repository has them (asked
    // for only when listed, so that a second run makes no request for them).
    let listed = hub.list(FLUX_FILL_REPO).ok().map(|l| l.files);
    for f in [
        "tokenizer/tokenizer_config.json",
        "tokenizer/special_tokens_map.json",
        "tokenizer_2/tokenizer_config.json",
        "tokenizer_2/special_tokens_map.json",
    ] {
        if listed.as_ref().is_some_and(|l| !l.iter().any(|x| x == f)) {
            continue;
        }
        match hub.get(FLUX_FILL_REPO, f) {
            Ok(_) => {}
            Err(crate::download::hub::HubError::NotFound { .. }) => {
                tracing::debug!(file = f, "not in the repo")
            }
            Err(e) => return Err(hub_err(f, e)),
        }
    }
    let shards =
        |index: &str| -> Result<Vec<String>, DownloadError> {
            let p = get(index)?;
            let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p)?)
                .map_err(|e| ModelError::BadFile {
                    path: p.clone(),
                    msg: e.to_string(),
                })?;
            let mut out: Vec<String> = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .map(|m| {
                    m.values()
                        .filter_map(|x| x.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            out.sort();
            out.dedup();
            if out.is_empty() {
                return Err(ModelError::BadFile {
                    path: p.clone(),
                    msg: "no weight_map".into(),
                }
                .into());
            }
            Ok(out)
        };
    if !parts.skip_t5 {
        for s in shards("text_encoder_2/model.safetensors.index.json")? {
            get(&format!("text_encoder_2/{s}"))?;
        }
    }
    if !parts.skip_transformer {
        for s in shards("transformer/diffusion_pytorch_model.safetensors.index.json")? {
            get(&format!("transformer/{s}"))?;
        }
    }
    snapshot.ok_or_else(|| DownloadError::Failed {
        repo: FLUX_FILL_REPO.into(),
        file: "model_index.json".into(),
        msg: "no snapshot folder".into(),
    })
}

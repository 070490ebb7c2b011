//! Finding model files: the Hugging Face diffusers layout of FLUX.1-Fill-dev with optional
//! single-file overrides (BFL `flux1-fill-dev.safetensors` / `ae.safetensors`, GGUF transformer,
//! GGUF T5), and downloading it through `hf-hub` when asked.

use std::path::{Path, PathBuf};

use crate::models::flux::error::{FluxError, Result};
use crate::models::flux::vae::VaeWeights;

/// The gated Hub repository of FLUX.1-Fill-dev (accept the license, then set `HF_TOKEN`).
pub const FLUX_FILL_REPO: &str = "black-forest-labs/FLUX.1-Fill-dev";
/// The folder name looked for under a models root.
pub const FLUX_FILL_DIR: &str = "FLUX.1-Fill-dev";

/// Transformer weights.
#[derive(Debug, Clone, PartialEq)]
pub enum TransformerFiles {
    /// `transformer/` of the diffusers folder (one file or shards).
    Diffusers(Vec<PathBuf>),
    /// BFL single file (`flux1-fill-dev.safetensors`).
    Bfl(PathBuf),
    /// GGUF file (city96 layout: BFL names).
    Gguf(PathBuf),
}

/// T5 weights.
#[derive(Debug, Clone, PartialEq)]
pub enum T5Files {
    Safetensors(Vec<PathBuf>),
    Gguf(PathBuf),
}

/// Optional replacements for parts of the diffusers folder.
#[derive(Debug, Clone, Default)]
pub struct FluxOverrides {
    pub transformer_gguf: Option<PathBuf>,
    /// BFL single-file transformer.
    pub transformer_file: Option<PathBuf>,
    /// BFL `ae.safetensors` (or a diffusers VAE file).
    pub vae_file: Option<PathBuf>,
    pub t5_gguf: Option<PathBuf>,
}

/// Every file the FLUX Fill pipeline reads.
#[derive(Debug, Clone)]
pub struct FluxModelPaths {
    pub root: PathBuf,
    pub transformer: TransformerFiles,
    /// `transformer/config.json` when present (needed for non-standard sizes; FLUX.1-Fill-dev
    /// values are used otherwise).
    pub transformer_config: Option<PathBuf>,
    pub vae: VaeWeights,
    pub vae_config: Option<PathBuf>,
    pub clip_config: PathBuf,
    pub clip_weights: Vec<PathBuf>,
    pub t5: T5Files,
    pub t5_config: Option<PathBuf>,
    pub tokenizer: PathBuf,
    pub tokenizer_2: PathBuf,
    pub scheduler_config: Option<PathBuf>,
}

/// The diffusers folder for a `--models` argument: the folder itself when it holds
/// `model_index.json`, else `DIR/FLUX.1-Fill-dev`, else a downloaded snapshot under `DIR/hub`.
pub fn find_root(models: &Path) -> PathBuf {
    if models.join("model_index.json").is_file() {
        return models.to_path_buf();
    }
    let sub = models.join(FLUX_FILL_DIR);
    if sub.is_dir() {
        return sub;
    }
    if let Some(snap) = hub_snapshot(&models.join("hub")) {
        return snap;
    }
    models.to_path_buf()
}

fn hub_snapshot(cache: &Path) -> Option<PathBuf> {
    let repo = cache.join(format!("models--{}", FLUX_FILL_REPO.replace('/', "--")));
    let main = std::fs::read_to_string(repo.join("refs").join("main")).ok()?;
    let snap = repo.join("snapshots").join(main.trim());
    snap.is_dir().then_some(snap)
}

/// The weight files of a component: `index` (sharded, listed in the index json) or `single`.
/// Missing files are appended to `missing` (relative to `root`).
fn component_files(
    root: &Path,
    sub: &str,
    index: &str,
    single: &str,
    missing: &mut Vec<String>,
) -> Vec<PathBuf> {
    let dir = root.join(sub);
    let index_path = dir.join(index);
    if index_path.is_file() {
        let shards = std::fs::read_to_string(&index_path)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v.get("weight_map").and_then(|m| m.as_object()).cloned())
            .map(|m| {
                let mut files: Vec<String> = m
                    .values()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect();
                files.sort();
                files.dedup();
                files
            });
        match shards {
            Some(files) if !files.is_empty() => {
                let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
                for (f, p) in files.iter().zip(&paths) {
                    if !p.is_file() {
                        missing.push(format!("{sub}/{f}"));
                    }
                }
                return paths;
            }
            _ => {
                missing.push(format!("{sub}/{index} (unreadable weight_map)"));
                return vec![];
            }
        }
    }
    let p = dir.join(single);
    if !p.is_file() {
        missing.push(format!("{sub}/{single} (or {sub}/{index} with its shards)"));
    }
    vec![p]
}

fn need(root: &Path, rel: &str, missing: &mut Vec<String>) -> PathBuf {
    let p = root.join(rel);
    if !p.exists() {
        missing.push(rel.to_string());
    }
    p
}

fn optional(root: &Path, rel: &str) -> Option<PathBuf> {
    let p = root.join(rel);
    p.is_file().then_some(p)
}

/// How to get missing files.
pub fn fetch_hint() -> String {
    format!(
        "Download them from the gated Hub repo {FLUX_FILL_REPO} (accept its license, then \
         `HF_TOKEN=hf_... pawfect-worker inpaint --download --models DIR ...`, or \
         `huggingface-cli download {FLUX_FILL_REPO} --local-dir DIR/{FLUX_FILL_DIR}`), or pass single-file \
         overrides (--transformer-gguf, --transformer-file, --vae-file, --t5-gguf)."
    )
}

impl FluxModelPaths {
    /// Resolves every file offline; the error lists all missing files.
    pub fn resolve(models: &Path, o: &FluxOverrides) -> Result<Self> {
        let root = find_root(models);
        let mut missing = vec![];
        let check_file = |p: &Path, missing: &mut Vec<String>| {
            if !p.is_file() {
                missing.push(p.display().to_string());
            }
        };
        // Single files next to the folder (the BFL repo layout) are used when the diffusers
        // component is absent.
        let bfl_beside = |name: &str| {
            [root.join(name), models.join(name)]
                .into_iter()
                .find(|p| p.is_file())
        };

        let transformer = if let Some(g) = &o.transformer_gguf {
            check_file(g, &mut missing);
            TransformerFiles::Gguf(g.clone())
        } else if let Some(f) = &o.transformer_file {
            check_file(f, &mut missing);
            TransformerFiles::Bfl(f.clone())
        } else if !root.join("transformer").is_dir()
            && bfl_beside("flux1-fill-dev.safetensors").is_some()
        {
            TransformerFiles::Bfl(bfl_beside("flux1-fill-dev.safetensors").unwrap_or_default())
        } else {
            TransformerFiles::Diffusers(component_files(
                &root,
                "transformer",
                "diffusion_pytorch_model.safetensors.index.json",
                "diffusion_pytorch_model.safetensors",
                &mut missing,
            ))
        };
        let vae = if let Some(f) = &o.vae_file {
            check_file(f, &mut missing);
            if f.is_file() && crate::models::flux::vae::is_ldm_vae(f)? {
                VaeWeights::Bfl(f.clone())
            } else {
                VaeWeights::Diffusers(f.clone())
            }
        } else if !root.join("vae").is_dir() && bfl_beside("ae.safetensors").is_some() {
            VaeWeights::Bfl(bfl_beside("ae.safetensors").unwrap_or_default())
        } else {
            VaeWeights::Diffusers(need(
                &root,
                "vae/diffusion_pytorch_model.safetensors",
                &mut missing,
            ))
        };
        let t5 = if let Some(g) = &o.t5_gguf {
            check_file(g, &mut missing);
            T5Files::Gguf(g.clone())
        } else {
            T5Files::Safetensors(component_files(
                &root,
                "text_encoder_2",
                "model.safetensors.index.json",
                "model.safetensors",
                &mut missing,
            ))
        };
        let t5_config = if o.t5_gguf.is_some() {
            optional(&root, "text_encoder_2/config.json")
        } else {
            Some(need(&root, "text_encoder_2/config.json", &mut missing))
        };
        let clip_config = need(&root, "text_encoder/config.json", &mut missing);
        let clip_weights = component_files(
            &root,
            "text_encoder",
            "model.safetensors.index.json",
            "model.safetensors",
            &mut missing,
        );
        let tokenizer = root.join("tokenizer");
        if !tokenizer.join("tokenizer.json").is_file() {
            need(&root, "tokenizer/vocab.json", &mut missing);
            need(&root, "tokenizer/merges.txt", &mut missing);
        }
        let tokenizer_2 = root.join("tokenizer_2");
        need(&root, "tokenizer_2/tokenizer.json", &mut missing);
        let transformer_config = optional(&root, "transformer/config.json");
        if matches!(transformer, TransformerFiles::Diffusers(_)) && transformer_config.is_none() {
            missing.push("transformer/config.json".into());
        }
        let vae_config = optional(&root, "vae/config.json");
        if matches!(vae, VaeWeights::Diffusers(_)) && o.vae_file.is_none() && vae_config.is_none() {
            missing.push("vae/config.json".into());
        }
        if !missing.is_empty() {
            return Err(FluxError::MissingFiles {
                root,
                files: missing,
                hint: fetch_hint(),
            });
        }
        Ok(Self {
            scheduler_config: optional(&root, "scheduler/scheduler_config.json"),
            root,
            transformer,
            transformer_config,
            vae,
            vae_config,
            clip_config,
            clip_weights,
            t5,
            t5_config,
            tokenizer,
            tokenizer_2,
        })
    }
}

/// Downloads the diffusers folder of FLUX.1-Fill-dev into `models/hub` (the Hugging Face cache
/// layout, resumable) and returns the snapshot folder. Components replaced by overrides are skipped.
/// `token` defaults to `HF_TOKEN`.
pub fn download_flux(models: &Path, token: Option<String>, o: &FluxOverrides) -> Result<PathBuf> {
    use hf_hub::api::sync::ApiBuilder;
    let token = token
        .or_else(|| std::env::var("HF_TOKEN").ok())
        .filter(|t| !t.is_empty());
    let cache = models.join("hub");
    std::fs::create_dir_all(&cache)?;
    let err = |file: &str, e: &dyn std::fmt::Display| FluxError::Download {
        repo: FLUX_FILL_REPO.into(),
        file: file.into(),
        msg: if token.is_none() {
            format!("{e} (the repo is gated: set HF_TOKEN after accepting its license)")
        } else {
            e.to_string()
        },
    };
    let api = ApiBuilder::new()
        .with_cache_dir(cache)
        .with_token(token.clone())
        .with_progress(true)
        .build()
        .map_err(|e| err("", &e))?;
    let repo = api.model(FLUX_FILL_REPO.to_string());
    let get = |f: &str| repo.get(f).map_err(|e| err(f, &e));
    let mut files: Vec<String> = vec![
        "model_index.json".into(),
        "scheduler/scheduler_config.json".into(),
        "text_encoder/config.json".into(),
        "text_encoder/model.safetensors".into(),
        "tokenizer/vocab.json".into(),
        "tokenizer/merges.txt".into(),
        "tokenizer/tokenizer_config.json".into(),
        "tokenizer/special_tokens_map.json".into(),
        "tokenizer_2/tokenizer.json".into(),
        "tokenizer_2/tokenizer_config.json".into(),
        "tokenizer_2/special_tokens_map.json".into(),
        "text_encoder_2/config.json".into(),
        "transformer/config.json".into(),
        "vae/config.json".into(),
    ];
    if o.vae_file.is_none() {
        files.push("vae/diffusion_pytorch_model.safetensors".into());
    }
    let mut first = None;
    for f in &files {
        let p = get(f)?;
        if first.is_none() {
            first = p.parent().map(Path::to_path_buf);
        }
    }
    let shards = |index: &str| -> Result<Vec<String>> {
        let p = get(index)?;
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p)?)
            .map_err(|e| FluxError::bad_file(&p, e))?;
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
        Ok(out)
    };
    if o.t5_gguf.is_none() {
        for s in shards("text_encoder_2/model.safetensors.index.json")? {
            get(&format!("text_encoder_2/{s}"))?;
        }
    }
    if o.transformer_gguf.is_none() && o.transformer_file.is_none() {
        for s in shards("transformer/diffusion_pytorch_model.safetensors.index.json")? {
            get(&format!("transformer/{s}"))?;
        }
    }
    first.ok_or_else(|| err("model_index.json", &"no snapshot folder"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offline_error_lists_every_missing_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("model_index.json"), "{}").expect("write");
        std::fs::create_dir_all(dir.path().join("transformer")).expect("mkdir");
        std::fs::write(
            dir.path().join("transformer/diffusion_pytorch_model.safetensors.index.json"),
            r#"{"weight_map": {"a": "diffusion_pytorch_model-00001-of-00002.safetensors", "b": "diffusion_pytorch_model-00002-of-00002.safetensors"}}"#,
        )
        .expect("write");
        let e =
            FluxModelPaths::resolve(dir.path(), &FluxOverrides::default()).expect_err("must fail");
        let msg = e.to_string();
        for f in [
            "transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
            "transformer/diffusion_pytorch_model-00002-of-00002.safetensors",
            "transformer/config.json",
            "vae/diffusion_pytorch_model.safetensors",
            "text_encoder/config.json",
            "text_encoder_2/model.safetensors",
            "tokenizer/vocab.json",
            "tokenizer_2/tokenizer.json",
            FLUX_FILL_REPO,
            "HF_TOKEN",
        ] {
            assert!(msg.contains(f), "{f} not in: {msg}");
        }
    }

    #[test]
    fn root_is_found_below_a_models_dir() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sub = dir.path().join(FLUX_FILL_DIR);
        std::fs::create_dir_all(&sub).expect("mkdir");
        std::fs::write(sub.join("model_index.json"), "{}").expect("write");
        assert_eq!(find_root(dir.path()), sub);
        assert_eq!(find_root(&sub), sub);
    }
}

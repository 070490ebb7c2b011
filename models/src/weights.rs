//! Finding model files: the Hugging Face diffusers layout of FLUX.1-Fill-dev with optional
//! single-file overrides (BFL `flux1-fill-dev.safetensors` / `ae.safetensors`, GGUF transformer,
//! GGUF T5). Downloading them is the worker's business (`pawfect-worker fetch-models`).

use std::path::{Path, PathBuf};

pub use variant::ModelVariant;

use crate::error::{ModelError, Result};
use crate::flux::vae::VaeWeights;

pub mod check;
pub mod variant;

use variant::{GgufChoice, GgufKind, choose_gguf, choose_t5_on_disk, gguf_tags};

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
        "Fetch them with `HF_TOKEN=hf_... pawfect-worker fetch-models --models DIR --variant VARIANT` \
         (the FLUX.1-Fill-dev diffusers files from the gated Hub repo {FLUX_FILL_REPO} — accept its \
         licence first — a GGUF transformer, a T5-XXL encoder GGUF and Florence-2-base; \
         `pawfect-worker fetch-models --models DIR --check` lists what is there), or pass single-file \
         overrides (--transformer-gguf, --transformer-file, --vae-file, --t5-gguf)."
    )
}

/// GGUF files directly in `models` and in its FLUX folder: `(file name, path)`, models first.
fn gguf_files_on_disk(models: &Path) -> Vec<(String, PathBuf)> {
    let mut out: Vec<(String, PathBuf)> = Vec::new();
    for dir in [models.to_path_buf(), find_root(models)] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut here: Vec<(String, PathBuf)> = entries
            .flatten()
            .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
            .filter(|(n, p)| n.to_ascii_lowercase().ends_with(".gguf") && p.is_file())
            .collect();
        here.sort();
        for (n, p) in here {
            if !out.iter().any(|(m, _)| *m == n) {
                out.push((n, p));
            }
        }
    }
    out
}

fn path_of(files: &[(String, PathBuf)], name: &str) -> Option<PathBuf> {
    files
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, p)| p.clone())
}

/// The GGUF transformer of `variant` in the models directory (or its FLUX folder), chosen by
/// [`variant::choose_gguf`] (a fallback tag is logged). `bf16`: `None` (diffusers or BFL weights).
pub fn find_flux_gguf(
    models: &Path,
    variant: ModelVariant,
) -> Result<Option<(PathBuf, GgufChoice)>> {
    let tags = gguf_tags(variant);
    if tags.is_empty() {
        return Ok(None);
    }
    let files = gguf_files_on_disk(models);
    let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    match choose_gguf(&names, GgufKind::FluxFill, tags) {
        Ok(c) => {
            if c.is_fallback() {
                tracing::warn!(
                    variant = variant.as_str(),
                    wanted = c.wanted,
                    using = %c.name,
                    "no {} GGUF transformer on disk: using {} instead",
                    c.wanted,
                    c.name
                );
            }
            let path = path_of(&files, &c.name).unwrap_or_else(|| models.join(&c.name));
            Ok(Some((path, c)))
        }
        Err(e) => Err(ModelError::MissingFiles {
            root: models.to_path_buf(),
            files: vec![format!(
                "PAWFECT_MODEL_VARIANT={}: a FLUX.1-Fill-dev GGUF transformer named like \
                 flux1-fill-dev-{}.gguf ({e})",
                variant.as_str(),
                tags.join(".gguf or flux1-fill-dev-")
            )],
            hint: format!(
                "{} Or pass --transformer-gguf FILE, or use PAWFECT_MODEL_VARIANT=bf16 for the \
                 diffusers/BFL weights.",
                fetch_hint()
            ),
        }),
    }
}

/// A T5-XXL encoder GGUF (`t5*xxl*encoder*.gguf`) in the models directory or its FLUX folder:
/// the one tagged for `variant` if there is one, else the most precise (logged).
pub fn find_t5_gguf(models: &Path, variant: Option<ModelVariant>) -> Option<(PathBuf, GgufChoice)> {
    let files = gguf_files_on_disk(models);
    let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    let c = choose_t5_on_disk(&names, variant)?;
    let path = path_of(&files, &c.name)?;
    let candidates = names.iter().filter(|n| variant::is_t5_gguf(n)).count();
    if c.is_fallback() || candidates > 1 {
        tracing::info!(
            using = %c.name,
            wanted = c.wanted,
            candidates,
            "T5-XXL encoder GGUF chosen among several or by fallback"
        );
    }
    Some((path, c))
}

/// Whether the diffusers folder holds T5 weights (`text_encoder_2/model.safetensors` or its
/// shard index).
pub fn has_t5_weights(root: &Path) -> bool {
    let d = root.join("text_encoder_2");
    d.join("model.safetensors").is_file() || d.join("model.safetensors.index.json").is_file()
}

/// What `serve`/`inpaint` load from `models`: `given` (command-line overrides) completed with
/// the GGUF transformer of `variant` and, when the FLUX folder has no T5 weights, a T5-XXL
/// encoder GGUF from the models directory. The choices (and fallbacks) are returned for logs.
pub fn overrides_for(
    models: &Path,
    variant: Option<ModelVariant>,
    given: &FluxOverrides,
) -> Result<(FluxOverrides, Vec<GgufChoice>)> {
    let mut o = given.clone();
    let mut choices = Vec::new();
    if o.transformer_gguf.is_none()
        && o.transformer_file.is_none()
        && let Some(v) = variant
        && let Some((p, c)) = find_flux_gguf(models, v)?
    {
        o.transformer_gguf = Some(p);
        choices.push(c);
    }
    if o.t5_gguf.is_none()
        && !has_t5_weights(&find_root(models))
        && let Some((p, c)) = find_t5_gguf(models, variant)
    {
        tracing::info!(t5 = %p.display(), "no text_encoder_2 weights: using the T5-XXL encoder GGUF");
        o.t5_gguf = Some(p);
        choices.push(c);
    }
    Ok((o, choices))
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
            if f.is_file() && crate::flux::vae::is_ldm_vae(f)? {
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
            let before = missing.len();
            let files = component_files(
                &root,
                "text_encoder_2",
                "model.safetensors.index.json",
                "model.safetensors",
                &mut missing,
            );
            if missing.len() > before && !has_t5_weights(&root) {
                missing.push(format!(
                    "(or, instead of text_encoder_2 weights, a T5-XXL encoder GGUF such as \
                     t5-v1_1-xxl-encoder-Q8_0.gguf in {})",
                    models.display()
                ));
            }
            T5Files::Safetensors(files)
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
            return Err(ModelError::MissingFiles {
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
            "pawfect-worker fetch-models",
            "T5-XXL encoder GGUF",
        ] {
            assert!(msg.contains(f), "{f} not in: {msg}");
        }
    }

    fn touch(p: &Path) {
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, b"x").expect("write");
    }

    #[test]
    fn serve_resolution_finds_the_variant_gguf_and_a_t5_gguf() {
        let dir = tempfile::tempdir().expect("tempdir");
        let m = dir.path();
        touch(&m.join(FLUX_FILL_DIR).join("model_index.json"));
        for f in [
            "flux1-fill-dev-Q5_K_S.gguf",
            "flux1-fill-dev-Q8_0.gguf",
            "t5-v1_1-xxl-encoder-Q8_0.gguf",
            "t5-v1_1-xxl-encoder-Q5_K_M.gguf",
            "t5-v1_1-xxl-encoder-Q3_K_S.gguf",
        ] {
            touch(&m.join(f));
        }
        let name = |p: &Option<PathBuf>| {
            p.as_ref()
                .and_then(|p| p.file_name())
                .map(|n| n.to_string_lossy().into_owned())
        };
        let table: &[(Option<ModelVariant>, Option<&str>, &str)] = &[
            (
                Some(ModelVariant::Q5KM),
                Some("flux1-fill-dev-Q5_K_S.gguf"),
                "t5-v1_1-xxl-encoder-Q5_K_M.gguf",
            ),
            (
                Some(ModelVariant::Q8_0),
                Some("flux1-fill-dev-Q8_0.gguf"),
                "t5-v1_1-xxl-encoder-Q8_0.gguf",
            ),
            (
                Some(ModelVariant::Bf16),
                None,
                "t5-v1_1-xxl-encoder-Q8_0.gguf",
            ),
            // No variant (inpaint without --model-variant): the most precise T5.
            (None, None, "t5-v1_1-xxl-encoder-Q8_0.gguf"),
        ];
        for (v, transformer, t5) in table {
            let (o, choices) = overrides_for(m, *v, &FluxOverrides::default()).expect("resolves");
            assert_eq!(name(&o.transformer_gguf).as_deref(), *transformer, "{v:?}");
            assert_eq!(name(&o.t5_gguf).as_deref(), Some(*t5), "{v:?}");
            assert_eq!(
                choices.iter().any(|c| c.is_fallback()),
                *v == Some(ModelVariant::Q5KM)
            );
        }
        // --t5-gguf wins; T5 weights in the FLUX folder win over a GGUF next to it.
        let given = FluxOverrides {
            t5_gguf: Some(m.join("mine.gguf")),
            ..FluxOverrides::default()
        };
        let (o, _) = overrides_for(m, None, &given).expect("resolves");
        assert_eq!(o.t5_gguf, given.t5_gguf);
        touch(
            &m.join(FLUX_FILL_DIR)
                .join("text_encoder_2/model.safetensors"),
        );
        let (o, _) = overrides_for(m, Some(ModelVariant::Q5KM), &FluxOverrides::default())
            .expect("resolves");
        assert_eq!(o.t5_gguf, None);
        // No GGUF for the variant: the error lists what is there and how to fetch it.
        let e = overrides_for(m, Some(ModelVariant::Q4_0), &FluxOverrides::default())
            .expect_err("no Q4_0")
            .to_string();
        for s in [
            "PAWFECT_MODEL_VARIANT=q4_0",
            "flux1-fill-dev-Q4_0.gguf",
            "flux1-fill-dev-Q5_K_S.gguf, flux1-fill-dev-Q8_0.gguf",
            "pawfect-worker fetch-models",
        ] {
            assert!(e.contains(s), "{s} not in {e}");
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

//! Filling a models directory from the Hub (`pawfect-worker fetch-models`).
//!
//! Everything is downloaded into `DIR/hub` (the Hub's cache layout: resumable, and a second run
//! finds complete files without a request), then `DIR` gets the layout `serve --models DIR`
//! reads, as relative symbolic links into `DIR/hub` (the volume may be mounted elsewhere):
//!
//! ```text
//! DIR/FLUX.1-Fill-dev            -> hub/models--black-forest-labs--FLUX.1-Fill-dev/snapshots/<sha>
//! DIR/flux1-fill-dev-Q5_K_S.gguf -> hub/models--YarvixPA--FLUX.1-Fill-dev-gguf/snapshots/<sha>/…
//! DIR/t5-v1_1-xxl-encoder-Q5_K_M.gguf -> hub/models--city96--t5-v1_1-xxl-encoder-gguf/snapshots/<sha>/…
//! DIR/Florence-2-base            -> hub/models--microsoft--Florence-2-base/snapshots/<sha>
//! ```

use std::path::{Path, PathBuf};

use pawfect_models::florence2::HUB_REPO as FLORENCE_REPO;
use pawfect_models::florence2::weights::MODEL_FOLDER as FLORENCE_DIR;
use pawfect_models::weights::FLUX_FILL_DIR;
use pawfect_models::weights::variant::{
    GgufChoice, GgufKind, ModelVariant, NoGgufMatch, choose_gguf, gguf_tags, t5_tags,
};

use super::hub::{Fetched, Hub, HubError, snapshot_dir};
use super::{DownloadError, FluxParts, download_flux_parts};

/// GGUF conversions of FLUX.1-Fill-dev (Q3_K_S … Q8_0, no Q5_K_M).
pub const DEFAULT_GGUF_REPO: &str = "YarvixPA/FLUX.1-Fill-dev-gguf";
/// GGUF T5-XXL encoders (llama.cpp `enc.blk.N` names).
pub const DEFAULT_T5_GGUF_REPO: &str = "city96/t5-v1_1-xxl-encoder-gguf";

/// Where the T5-XXL encoder comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum T5Source {
    /// A GGUF encoder (fits next to a quantized transformer on a 16 GB card).
    Gguf,
    /// The diffusers `text_encoder_2` safetensors (9.5 GB in f16).
    Full,
}

impl T5Source {
    /// GGUF for quantized variants, the full encoder for `bf16`.
    pub fn default_for(variant: ModelVariant) -> Self {
        if gguf_tags(variant).is_empty() {
            T5Source::Full
        } else {
            T5Source::Gguf
        }
    }
}

/// What to fetch.
#[derive(Debug, Clone)]
pub struct FetchPlan {
    pub variant: ModelVariant,
    pub gguf_repo: String,
    pub t5: T5Source,
    pub t5_gguf_repo: String,
    pub florence: bool,
}

impl FetchPlan {
    /// The defaults for `variant`.
    pub fn new(variant: ModelVariant) -> Self {
        FetchPlan {
            variant,
            gguf_repo: DEFAULT_GGUF_REPO.into(),
            t5: T5Source::default_for(variant),
            t5_gguf_repo: DEFAULT_T5_GGUF_REPO.into(),
            florence: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(transparent)]
    Hub(#[from] HubError),
    #[error(transparent)]
    Download(#[from] DownloadError),
    #[error("{repo}: {source}")]
    NoGguf {
        repo: String,
        #[source]
        source: NoGgufMatch,
    },
    #[error("{repo}: {msg}")]
    Repo { repo: String, msg: String },
    #[error("linking {}: {source}", path.display())]
    Link {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A link made in the models directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub path: PathBuf,
    /// Relative to the models directory.
    pub target: PathBuf,
}

/// What [`fetch_models`] did.
#[derive(Debug, Clone)]
pub struct FetchOutcome {
    pub flux_snapshot: PathBuf,
    pub transformer: Option<GgufChoice>,
    pub t5: Option<GgufChoice>,
    pub florence: Option<PathBuf>,
    pub links: Vec<Link>,
    /// Things in the way of a link, left alone.
    pub warnings: Vec<String>,
    pub fetched: Vec<Fetched>,
}

fn pick(
    hub: &Hub,
    repo: &str,
    kind: GgufKind,
    tags: &[&'static str],
) -> Result<(PathBuf, GgufChoice), FetchError> {
    let listing = hub.list(repo)?;
    let choice = choose_gguf(&listing.files, kind, tags).map_err(|source| FetchError::NoGguf {
        repo: repo.into(),
        source,
    })?;
    if choice.is_fallback() {
        tracing::warn!(
            repo,
            wanted = choice.wanted,
            using = %choice.name,
            "{repo} publishes no {} GGUF: using {} ({})",
            choice.wanted,
            choice.name,
            choice.tag
        );
    } else {
        tracing::info!(repo, file = %choice.name, "GGUF chosen");
    }
    let path = hub.get(repo, &choice.name)?;
    Ok((path, choice))
}

/// The files of Florence-2 that are read (`config.json`, `tokenizer.json`, the weights) or kept
/// with them, among those `repo` lists.
pub fn florence_files(listing: &[String]) -> Result<Vec<String>, String> {
    let has = |f: &str| listing.iter().any(|x| x == f);
    let mut files = Vec::new();
    for f in ["config.json", "tokenizer.json"] {
        if !has(f) {
            return Err(format!("no {f} in the repository"));
        }
        files.push(f.to_string());
    }
    for f in [
        "tokenizer_config.json",
        "generation_config.json",
        "preprocessor_config.json",
        "processor_config.json",
    ] {
        if has(f) {
            files.push(f.to_string());
        }
    }
    if has("model.safetensors") {
        files.push("model.safetensors".into());
    } else if has("pytorch_model.bin") {
        files.push("pytorch_model.bin".into());
    } else {
        return Err("no model.safetensors or pytorch_model.bin in the repository".into());
    }
    Ok(files)
}

/// Makes `models/name` a relative link to `target` (under `models`), replacing a link that points
/// elsewhere. A real file or folder in the way is left alone (returned as a warning).
pub fn link(models: &Path, name: &str, target: &Path) -> Result<Result<Link, String>, FetchError> {
    let path = models.join(name);
    let rel = target
        .strip_prefix(models)
        .map_err(|_| FetchError::Link {
            path: path.clone(),
            source: std::io::Error::other(format!(
                "{} is not inside {}",
                target.display(),
                models.display()
            )),
        })?
        .to_path_buf();
    let lerr = |source| FetchError::Link {
        path: path.clone(),
        source,
    };
    match std::fs::symlink_metadata(&path) {
        Ok(m) if m.file_type().is_symlink() => {
            if std::fs::read_link(&path).ok().as_deref() == Some(rel.as_path()) {
                return Ok(Ok(Link { path, target: rel }));
            }
            tracing::info!(link = %path.display(), "replacing a stale link");
            std::fs::remove_file(&path).map_err(lerr)?;
        }
        Ok(_) => {
            return Ok(Err(format!(
                "{} exists and is not a link: left as it is (it is what serve will use)",
                path.display()
            )));
        }
        Err(_) => {}
    }
    symlink(&rel, &path).map_err(lerr)?;
    Ok(Ok(Link { path, target: rel }))
}

#[cfg(unix)]
fn symlink(target: &Path, link: &Path) -> std::io::Result<()> {
    std::os::unix::fs::symlink(target, link)
}

#[cfg(not(unix))]
fn symlink(_target: &Path, _link: &Path) -> std::io::Result<()> {
    Err(std::io::Error::other(
        "symbolic links are only made on Unix",
    ))
}

/// Removes links directly in `models` that point into `hub/` but no longer resolve.
pub fn remove_dangling_links(models: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(models) else {
        return removed;
    };
    for e in entries.flatten() {
        let p = e.path();
        let is_link = std::fs::symlink_metadata(&p)
            .map(|m| m.file_type().is_symlink())
            .unwrap_or(false);
        let into_hub = std::fs::read_link(&p)
            .map(|t| t.starts_with("hub"))
            .unwrap_or(false);
        if is_link && into_hub && !p.exists() && std::fs::remove_file(&p).is_ok() {
            tracing::info!(link = %p.display(), "removed a dangling link");
            removed.push(p);
        }
    }
    removed
}

/// Downloads what `plan` asks for into `models/hub` (through `hub`, whose cache must be
/// `models/hub`) and links it into `models`.
pub fn fetch_models(
    models: &Path,
    plan: &FetchPlan,
    hub: &Hub,
) -> Result<FetchOutcome, FetchError> {
    let quantized = !gguf_tags(plan.variant).is_empty();
    let parts = FluxParts {
        skip_transformer: quantized,
        skip_t5: plan.t5 == T5Source::Gguf,
        skip_vae: false,
    };
    tracing::info!(
        variant = plan.variant.as_str(),
        transformer = if quantized { plan.gguf_repo.as_str() } else { "diffusers" },
        t5 = ?plan.t5,
        florence = plan.florence,
        endpoint = hub.endpoint(),
        "fetching models into {}",
        models.display()
    );
    let flux_snapshot = download_flux_parts(hub, parts)?;
    let transformer = if quantized {
        Some(pick(
            hub,
            &plan.gguf_repo,
            GgufKind::FluxFill,
            gguf_tags(plan.variant),
        )?)
    } else {
        None
    };
    let t5 = match plan.t5 {
        T5Source::Gguf => Some(pick(
            hub,
            &plan.t5_gguf_repo,
            GgufKind::T5Encoder,
            &t5_tags(plan.variant),
        )?),
        T5Source::Full => None,
    };
    let florence = if plan.florence {
        let listing = hub.list(FLORENCE_REPO)?;
        let files = florence_files(&listing.files).map_err(|msg| FetchError::Repo {
            repo: FLORENCE_REPO.into(),
            msg,
        })?;
        let mut snapshot = None;
        for f in &files {
            let p = hub.get(FLORENCE_REPO, f)?;
            snapshot = snapshot.or_else(|| snapshot_dir(&p, f));
        }
        snapshot
    } else {
        None
    };

    remove_dangling_links(models);
    let mut links = Vec::new();
    let mut warnings = Vec::new();
    let mut add = |name: &str, target: &Path| -> Result<(), FetchError> {
        match link(models, name, target)? {
            Ok(l) => links.push(l),
            Err(w) => {
                tracing::warn!("{w}");
                warnings.push(w);
            }
        }
        Ok(())
    };
    add(FLUX_FILL_DIR, &flux_snapshot)?;
    for (path, _) in transformer.iter().chain(t5.iter()) {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        add(&name, path)?;
    }
    if let Some(f) = &florence {
        add(FLORENCE_DIR, f)?;
    }
    Ok(FetchOutcome {
        flux_snapshot,
        transformer: transformer.map(|(_, c)| c),
        t5: t5.map(|(_, c)| c),
        florence,
        links,
        warnings,
        fetched: hub.fetched(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn florence_file_choice() {
        let l = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let both = l(&[
            "config.json",
            "tokenizer.json",
            "pytorch_model.bin",
            "model.safetensors",
            "processor_config.json",
            "modeling_florence2.py",
        ]);
        assert_eq!(
            florence_files(&both).unwrap(),
            [
                "config.json",
                "tokenizer.json",
                "processor_config.json",
                "model.safetensors"
            ]
        );
        let bin = l(&["config.json", "tokenizer.json", "pytorch_model.bin"]);
        assert_eq!(
            florence_files(&bin).unwrap().last().unwrap(),
            "pytorch_model.bin"
        );
        assert!(florence_files(&l(&["config.json", "tokenizer.json"])).is_err());
        assert!(
            florence_files(&l(&["config.json", "model.safetensors"]))
                .unwrap_err()
                .contains("tokenizer.json")
        );
    }

    #[cfg(unix)]
    #[test]
    fn links_are_relative_and_replaced_when_stale() {
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path();
        let a = m.join("hub/models--x--y/snapshots/a");
        let b = m.join("hub/models--x--y/snapshots/b");
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        let l = link(m, "Y", &a).unwrap().unwrap();
        assert_eq!(l.target, Path::new("hub/models--x--y/snapshots/a"));
        assert_eq!(std::fs::read_link(m.join("Y")).unwrap(), l.target);
        // Same target: untouched; new target: replaced.
        link(m, "Y", &a).unwrap().unwrap();
        link(m, "Y", &b).unwrap().unwrap();
        assert_eq!(
            std::fs::read_link(m.join("Y")).unwrap(),
            Path::new("hub/models--x--y/snapshots/b")
        );
        // A real folder in the way stays.
        std::fs::create_dir_all(m.join("Z")).unwrap();
        assert!(link(m, "Z", &a).unwrap().is_err());
        assert!(m.join("Z").is_dir());
        // Dangling links into hub/ go, others stay.
        std::fs::remove_dir_all(&b).unwrap();
        std::os::unix::fs::symlink("/nonexistent", m.join("other")).unwrap();
        assert_eq!(remove_dangling_links(m), vec![m.join("Y")]);
        assert!(std::fs::symlink_metadata(m.join("other")).is_ok());
        // Outside the models folder: refused.
        assert!(link(m, "W", Path::new("/tmp")).is_err());
    }
}

//! Is a models directory complete for a variant? Offline: the files `serve` would load are
//! resolved exactly as `serve` resolves them, then each weight file is checked without loading
//! it (GGUF header, tensor types and length; safetensors header and length).

use std::path::{Path, PathBuf};

use super::variant::ModelVariant;

use super::variant::GgufChoice;
use super::{FluxModelPaths, FluxOverrides, T5Files, TransformerFiles, overrides_for};
use crate::checkpoint::inspect_gguf;
use crate::florence2::weights as florence_weights;
use crate::flux::ModelError;
use crate::flux::vae::VaeWeights;

/// What to check.
#[derive(Debug, Clone)]
pub struct CheckOptions {
    pub variant: ModelVariant,
    /// Florence-2-base must be there too.
    pub florence: bool,
}

/// One file that is there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedFile {
    /// What it is (`transformer`, `t5`, `vae`, `florence`, ...).
    pub role: &'static str,
    pub path: PathBuf,
    pub bytes: u64,
    /// What was found inside (tensor count and types), when it was inspected.
    pub detail: String,
}

/// The outcome of [`check_models`].
#[derive(Debug, Clone, Default)]
pub struct CheckReport {
    pub files: Vec<CheckedFile>,
    /// GGUF choices (and fallbacks) as `serve` makes them.
    pub choices: Vec<GgufChoice>,
    /// Everything wrong, one line each (empty: complete).
    pub problems: Vec<String>,
}

impl CheckReport {
    pub fn is_complete(&self) -> bool {
        self.problems.is_empty()
    }

    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.bytes).sum()
    }
}

fn size(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// Checks a safetensors file without loading it: the header parses and the file holds every
/// tensor's bytes. Returns `"N tensors"`.
pub fn inspect_safetensors(path: &Path) -> Result<String, String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let len = f.metadata().map_err(|e| e.to_string())?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n)
        .map_err(|_| "truncated: no safetensors header".to_string())?;
    let n = u64::from_le_bytes(n);
    if n > 100 << 20 || 8 + n > len {
        return Err(format!(
            "truncated or not safetensors: header of {n} bytes, file of {len}"
        ));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|e| e.to_string())?;
    let v: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| format!("bad safetensors header: {e}"))?;
    let obj = v
        .as_object()
        .ok_or_else(|| "bad safetensors header: not an object".to_string())?;
    let mut end = 0u64;
    let mut count = 0usize;
    for (name, t) in obj {
        if name == "__metadata__" {
            continue;
        }
        count += 1;
        let stop = t
            .get("data_offsets")
            .and_then(|o| o.get(1))
            .and_then(|x| x.as_u64())
            .ok_or_else(|| format!("tensor {name}: no data_offsets"))?;
        end = end.max(stop);
    }
    if 8 + n + end > len {
        return Err(format!(
            "truncated: tensor data needs {} bytes but the file has {len} (an interrupted \
             download? fetch it again)",
            8 + n + end
        ));
    }
    Ok(format!("{count} tensors"))
}

impl CheckReport {
    fn weight(&mut self, role: &'static str, path: &Path) {
        let lower = path.to_string_lossy().to_ascii_lowercase();
        let result = if lower.ends_with(".gguf") {
            inspect_gguf(path)
                .map(|s| {
                    let types: Vec<String> =
                        s.types.iter().map(|(t, n)| format!("{n}×{t}")).collect();
                    format!("GGUF, {} tensors: {}", s.tensors, types.join(" "))
                })
                .map_err(|e| e.to_string())
        } else if lower.ends_with(".safetensors") {
            inspect_safetensors(path).map_err(|e| format!("{}: {e}", path.display()))
        } else if path.is_file() && size(path) > 0 {
            Ok(String::new())
        } else {
            Err(format!("{}: empty or missing", path.display()))
        };
        match result {
            Ok(detail) => self.files.push(CheckedFile {
                role,
                path: path.to_path_buf(),
                bytes: size(path),
                detail,
            }),
            Err(e) => self.problems.push(e),
        }
    }

    fn plain(&mut self, role: &'static str, path: &Path) {
        if path.is_file() {
            self.files.push(CheckedFile {
                role,
                path: path.to_path_buf(),
                bytes: size(path),
                detail: String::new(),
            });
        }
    }

    fn json(&mut self, role: &'static str, path: &Path) {
        match std::fs::read(path)
            .map_err(|e| e.to_string())
            .and_then(|b| {
                serde_json::from_slice::<serde_json::Value>(&b).map_err(|e| e.to_string())
            }) {
            Ok(_) => self.plain(role, path),
            Err(e) => self.problems.push(format!("{}: {e}", path.display())),
        }
    }
}

/// Checks that `models` holds what `serve --models DIR` with `PAWFECT_MODEL_VARIANT=variant`
/// loads, naming every problem.
pub fn check_models(models: &Path, o: &CheckOptions) -> CheckReport {
    let mut r = CheckReport::default();
    if !models.is_dir() {
        r.problems
            .push(format!("{}: no such directory", models.display()));
        return r;
    }
    let placeholder = models.join("(no GGUF transformer for the variant)");
    let overrides = match overrides_for(models, Some(o.variant), &FluxOverrides::default()) {
        Ok((ov, choices)) => {
            r.choices = choices;
            ov
        }
        Err(e) => {
            r.problems.push(e.to_string());
            FluxOverrides {
                transformer_gguf: Some(placeholder.clone()),
                ..FluxOverrides::default()
            }
        }
    };
    match FluxModelPaths::resolve(models, &overrides) {
        Ok(p) => {
            match &p.transformer {
                TransformerFiles::Diffusers(files) => {
                    for f in files {
                        r.weight("transformer", f);
                    }
                }
                TransformerFiles::Bfl(f) | TransformerFiles::Gguf(f) => r.weight("transformer", f),
            }
            match &p.vae {
                VaeWeights::Diffusers(f) | VaeWeights::Bfl(f) => r.weight("vae", f),
            }
            for f in &p.clip_weights {
                r.weight("clip", f);
            }
            match &p.t5 {
                T5Files::Safetensors(files) => {
                    for f in files {
                        r.weight("t5", f);
                    }
                }
                T5Files::Gguf(f) => r.weight("t5", f),
            }
            let configs = [
                Some(p.clip_config.clone()),
                p.t5_config.clone(),
                p.transformer_config.clone(),
                p.vae_config.clone(),
                p.scheduler_config.clone(),
                Some(p.tokenizer_2.join("tokenizer.json")),
            ];
            for c in configs.into_iter().flatten() {
                r.json("config", &c);
            }
            for t in ["vocab.json", "merges.txt", "tokenizer.json"] {
                r.plain("tokenizer", &p.tokenizer.join(t));
            }
        }
        Err(ModelError::MissingFiles { root, files, .. }) => {
            let placeholder = placeholder.display().to_string();
            for f in files.into_iter().filter(|f| *f != placeholder) {
                if f.starts_with('(') {
                    r.problems.push(f);
                } else if Path::new(&f).is_absolute() {
                    r.problems.push(format!("missing {f}"));
                } else {
                    r.problems
                        .push(format!("missing {}", root.join(&f).display()));
                }
            }
            // Still say what is wrong with the GGUFs that are there.
            for (role, g) in [
                ("transformer", &overrides.transformer_gguf),
                ("t5", &overrides.t5_gguf),
            ] {
                if let Some(g) = g.as_ref().filter(|g| g.is_file()) {
                    r.weight(role, g);
                }
            }
        }
        Err(e) => r.problems.push(e.to_string()),
    }
    if o.florence {
        match florence_weights::resolve_model_dir(models)
            .and_then(|d| florence_weights::check_files(&d).map(|w| (d, w)))
        {
            Ok((dir, weights)) => {
                r.json("florence", &dir.join("config.json"));
                r.json("florence", &dir.join("tokenizer.json"));
                for w in &weights {
                    r.weight("florence", w);
                }
            }
            Err(e) => r.problems.push(format!(
                "Florence-2 (captions; run with --no-caption to do without): {e}"
            )),
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncated_safetensors_are_caught() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.safetensors");
        let t =
            candle_core::Tensor::zeros((4, 4), candle_core::DType::F32, &candle_core::Device::Cpu)
                .unwrap();
        candle_core::safetensors::save(&std::collections::HashMap::from([("w", t)]), &p).unwrap();
        assert_eq!(inspect_safetensors(&p).unwrap(), "1 tensors");
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 1]).unwrap();
        assert!(inspect_safetensors(&p).unwrap_err().contains("truncated"));
        std::fs::write(&p, &bytes[..4]).unwrap();
        assert!(inspect_safetensors(&p).unwrap_err().contains("truncated"));
    }
}

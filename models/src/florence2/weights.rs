//! Checkpoint discovery and loading, for both layouts, into one set of (native) tensor names.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use super::Florence2Error;
use super::config::Layout;

/// Folder name looked for under a models root.
pub const MODEL_FOLDER: &str = "Florence-2-base";

const WEIGHT_FILES: [&str; 3] = [
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
];

/// `path` is the checkpoint folder itself or a root holding `Florence-2-base/`.
pub fn resolve_model_dir(path: &Path) -> Result<PathBuf, Florence2Error> {
    if path.join("config.json").is_file() {
        return Ok(path.to_owned());
    }
    let nested = path.join(MODEL_FOLDER);
    if nested.join("config.json").is_file() {
        return Ok(nested);
    }
    if !path.exists() {
        return Err(Florence2Error::MissingFiles {
            dir: path.to_owned(),
            missing: vec!["the folder itself".into()],
        });
    }
    Err(Florence2Error::MissingFiles {
        dir: path.to_owned(),
        missing: vec!["config.json".into(), format!("{MODEL_FOLDER}/config.json")],
    })
}

/// The weight files of a checkpoint folder, and an error naming every missing file.
pub fn check_files(dir: &Path) -> Result<Vec<PathBuf>, Florence2Error> {
    let mut missing = Vec::new();
    for f in ["config.json", "tokenizer.json"] {
        if !dir.join(f).is_file() {
            missing.push(f.to_string());
        }
    }
    let weights = weight_files(dir)?;
    if weights.is_empty() {
        missing.push(format!("model weights ({})", WEIGHT_FILES.join(" or ")));
    }
    if missing.is_empty() {
        Ok(weights)
    } else {
        Err(Florence2Error::MissingFiles {
            dir: dir.to_owned(),
            missing,
        })
    }
}

fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, Florence2Error> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let bytes = std::fs::read(&index).map_err(|source| Florence2Error::Io {
            path: index.clone(),
            source,
        })?;
        let v: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|source| Florence2Error::Json {
                path: index.clone(),
                source,
            })?;
        let Some(map) = v.get("weight_map").and_then(|m| m.as_object()) else {
            return Err(Florence2Error::Weights {
                path: index,
                msg: "no weight_map".into(),
            });
        };
        let mut files: Vec<String> = map
            .values()
            .filter_map(|f| f.as_str().map(str::to_string))
            .collect();
        files.sort();
        files.dedup();
        let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
        let absent: Vec<String> = files
            .iter()
            .zip(&paths)
            .filter(|(_, p)| !p.is_file())
            .map(|(f, _)| f.clone())
            .collect();
        if !absent.is_empty() {
            return Err(Florence2Error::MissingFiles {
                dir: dir.to_owned(),
                missing: absent,
            });
        }
        return Ok(paths);
    }
    let bin = dir.join("pytorch_model.bin");
    if bin.is_file() {
        return Ok(vec![bin]);
    }
    Ok(vec![])
}

/// Reads every tensor of the weight files (on the CPU, in their stored dtype).
pub fn read_tensors(files: &[PathBuf]) -> Result<HashMap<String, Tensor>, Florence2Error> {
    let mut all = HashMap::new();
    for f in files {
        let werr = |e: candle_core::Error| Florence2Error::Weights {
            path: f.clone(),
            msg: e.to_string(),
        };
        if f.extension().and_then(|e| e.to_str()) == Some("bin") {
            for (k, t) in candle_core::pickle::read_all(f).map_err(werr)? {
                all.insert(k, t);
            }
        } else {
            all.extend(candle_core::safetensors::load(f, &Device::Cpu).map_err(werr)?);
        }
    }
    Ok(all)
}

/// Detects the layout from the tensor names.
pub fn detect_layout(tensors: &HashMap<String, Tensor>) -> Option<Layout> {
    if tensors
        .keys()
        .any(|k| k.starts_with("model.vision_tower.") || k.starts_with("model.language_model."))
    {
        Some(Layout::Native)
    } else if tensors
        .keys()
        .any(|k| k.starts_with("vision_tower.") || k.starts_with("language_model."))
    {
        Some(Layout::Original)
    } else {
        None
    }
}

/// Native name of an original remote-code tensor (`None` for tensors Florence-2 does not use, such
/// as DaViT's classification head).
pub fn original_to_native(key: &str) -> Option<String> {
    if let Some(rest) = key.strip_prefix("vision_tower.") {
        if rest.starts_with("convs.") {
            return Some(format!(
                "model.vision_tower.{}",
                rest.replace(".proj.", ".conv.")
            ));
        }
        if !rest.starts_with("blocks.") {
            return None;
        }
        let mut r = rest.to_string();
        for (a, b) in [
            (".window_attn.norm.", ".norm1."),
            (".channel_attn.norm.", ".norm1."),
            (".ffn.norm.", ".norm2."),
            (".window_attn.fn.", ".window_attn."),
            (".channel_attn.fn.", ".channel_attn."),
            (".ffn.fn.net.", ".ffn."),
            (".conv1.fn.dw.", ".conv1."),
            (".conv2.fn.dw.", ".conv2."),
        ] {
            r = r.replace(a, b);
        }
        return Some(format!("model.vision_tower.{r}"));
    }
    if key == "image_projection" {
        return Some("model.multi_modal_projector.image_projection.weight".into());
    }
    for (prefix, native) in [
        (
            "image_proj_norm.",
            "model.multi_modal_projector.image_proj_norm.",
        ),
        (
            "image_pos_embed.",
            "model.multi_modal_projector.image_position_embed.",
        ),
        (
            "visual_temporal_embed.",
            "model.multi_modal_projector.visual_temporal_embed.",
        ),
        ("language_model.model.", "model.language_model."),
    ] {
        if let Some(rest) = key.strip_prefix(prefix) {
            return Some(format!("{native}{rest}"));
        }
    }
    match key {
        "language_model.lm_head.weight" => Some("lm_head.weight".into()),
        "language_model.final_logits_bias" => Some("final_logits_bias".into()),
        _ => None,
    }
}

/// Renames the tensors of either layout to native names (the original `image_projection`, used as
/// `x @ P`, is transposed into a Linear weight).
pub fn to_native(
    tensors: HashMap<String, Tensor>,
    path: &Path,
) -> Result<(HashMap<String, Tensor>, Layout), Florence2Error> {
    let layout = detect_layout(&tensors).ok_or_else(|| Florence2Error::Weights {
        path: path.to_owned(),
        msg: "no Florence-2 tensors (expected model.vision_tower.* or vision_tower.* names)".into(),
    })?;
    if layout == Layout::Native {
        return Ok((tensors, layout));
    }
    let mut out = HashMap::with_capacity(tensors.len());
    for (k, t) in tensors {
        let Some(nk) = original_to_native(&k) else {
            continue;
        };
        let t = if k == "image_projection" {
            t.t()
                .and_then(|t| t.contiguous())
                .map_err(|e| Florence2Error::Weights {
                    path: path.to_owned(),
                    msg: e.to_string(),
                })?
        } else {
            t
        };
        out.insert(nk, t);
    }
    Ok((out, layout))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn original_names_map_to_native() {
        let cases = [
            (
                "vision_tower.convs.0.proj.weight",
                Some("model.vision_tower.convs.0.conv.weight"),
            ),
            (
                "vision_tower.convs.2.norm.bias",
                Some("model.vision_tower.convs.2.norm.bias"),
            ),
            (
                "vision_tower.blocks.2.7.spatial_block.conv1.fn.dw.weight",
                Some("model.vision_tower.blocks.2.7.spatial_block.conv1.weight"),
            ),
            (
                "vision_tower.blocks.0.0.spatial_block.window_attn.norm.weight",
                Some("model.vision_tower.blocks.0.0.spatial_block.norm1.weight"),
            ),
            (
                "vision_tower.blocks.0.0.spatial_block.window_attn.fn.proj.bias",
                Some("model.vision_tower.blocks.0.0.spatial_block.window_attn.proj.bias"),
            ),
            (
                "vision_tower.blocks.3.0.channel_block.channel_attn.fn.qkv.weight",
                Some("model.vision_tower.blocks.3.0.channel_block.channel_attn.qkv.weight"),
            ),
            (
                "vision_tower.blocks.3.0.channel_block.ffn.fn.net.fc2.weight",
                Some("model.vision_tower.blocks.3.0.channel_block.ffn.fc2.weight"),
            ),
            (
                "vision_tower.blocks.1.0.channel_block.ffn.norm.weight",
                Some("model.vision_tower.blocks.1.0.channel_block.norm2.weight"),
            ),
            (
                "image_projection",
                Some("model.multi_modal_projector.image_projection.weight"),
            ),
            (
                "image_pos_embed.row_embeddings.weight",
                Some("model.multi_modal_projector.image_position_embed.row_embeddings.weight"),
            ),
            (
                "language_model.model.encoder.layers.5.fc1.weight",
                Some("model.language_model.encoder.layers.5.fc1.weight"),
            ),
            ("language_model.lm_head.weight", Some("lm_head.weight")),
            ("vision_tower.head.weight", None),
            ("vision_tower.norms.weight", None),
        ];
        for (orig, native) in cases {
            assert_eq!(original_to_native(orig).as_deref(), native, "{orig}");
        }
    }

    #[test]
    fn missing_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), "{}").unwrap();
        let err = check_files(dir.path()).unwrap_err().to_string();
        assert!(err.contains("tokenizer.json"), "{err}");
        assert!(err.contains("pytorch_model.bin"), "{err}");
        let err = resolve_model_dir(&dir.path().join("nope"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("nope"), "{err}");
        let root = tempfile::tempdir().unwrap();
        let err = resolve_model_dir(root.path()).unwrap_err().to_string();
        assert!(err.contains("Florence-2-base/config.json"), "{err}");
        std::fs::create_dir(root.path().join(MODEL_FOLDER)).unwrap();
        std::fs::write(root.path().join(MODEL_FOLDER).join("config.json"), "{}").unwrap();
        assert_eq!(
            resolve_model_dir(root.path()).unwrap(),
            root.path().join(MODEL_FOLDER)
        );
    }
}

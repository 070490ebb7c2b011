//! Prompt encoding for FLUX: CLIP-L pooled output and T5 last hidden state, tokenized like
//! diffusers' `FluxFillPipeline.encode_prompt` (pad to max length, truncate, no attention mask),
//! with a [`PromptCache`] keyed by the token ids.

use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{Device, Tensor};
use serde_json::{Value, json};
use tokenizers::{
    PaddingDirection, PaddingParams, PaddingStrategy, Tokenizer, TruncationDirection,
    TruncationParams, TruncationStrategy,
};

use super::prompt_cache::{PromptCache, PromptCacheStats, PromptKey};
use crate::clip::ClipTextModel;
use crate::error::{ModelError, Result};
use crate::t5::T5Encoder;

/// The CLIP pre-tokenizer split pattern of transformers' `CLIPTokenizer`.
const CLIP_SPLIT: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

fn read_json_opt(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::bad_file(path, e))?;
    Ok(Some(
        serde_json::from_str(&text).map_err(|e| ModelError::bad_file(path, e))?,
    ))
}

/// A special token from tokenizer_config.json / special_tokens_map.json (string or AddedToken object).
fn special(dir: &Path, key: &str) -> Result<Option<String>> {
    for f in ["tokenizer_config.json", "special_tokens_map.json"] {
        if let Some(v) = read_json_opt(&dir.join(f))? {
            match v.get(key) {
                Some(Value::String(s)) => return Ok(Some(s.clone())),
                Some(Value::Object(o)) => {
                    if let Some(Value::String(s)) = o.get("content") {
                        return Ok(Some(s.clone()));
                    }
                }
                _ => {}
            }
        }
    }
    Ok(None)
}

fn model_max_length(dir: &Path) -> Result<Option<usize>> {
    Ok(read_json_opt(&dir.join("tokenizer_config.json"))?
        .and_then(|v| v.get("model_max_length").and_then(Value::as_u64))
        .map(|v| v as usize))
}

/// Builds transformers 5.x's `CLIPTokenizer` pipeline (which it builds from the vocabulary and merges
/// whatever else a tokenizer.json says) from `vocab.json` + `merges.txt` (the Hub's FLUX `tokenizer/`
/// folder has no tokenizer.json) or from the model section of a tokenizer.json.
fn clip_tokenizer(dir: &Path) -> Result<Tokenizer> {
    let json_path = dir.join("tokenizer.json");
    let vocab_path = dir.join("vocab.json");
    let (vocab, merges): (serde_json::Map<String, Value>, Vec<Value>) = if json_path.is_file() {
        let v = read_json_opt(&json_path)?.unwrap_or(Value::Null);
        let model = v.get("model").cloned().unwrap_or(Value::Null);
        match (model.get("vocab"), model.get("merges")) {
            (Some(Value::Object(vocab)), Some(Value::Array(merges))) => {
                (vocab.clone(), merges.clone())
            }
            _ => return Err(ModelError::bad_file(&json_path, "not a BPE tokenizer")),
        }
    } else {
        let vocab = match read_json_opt(&vocab_path)? {
            Some(Value::Object(m)) => m,
            _ => {
                return Err(ModelError::bad_file(
                    &vocab_path,
                    "missing or not a JSON object",
                ));
            }
        };
        let merges_path = dir.join("merges.txt");
        let text = std::fs::read_to_string(&merges_path)
            .map_err(|e| ModelError::bad_file(&merges_path, e))?;
        let merges = text
            .lines()
            .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
            .map(|l| Value::String(l.to_string()))
            .collect();
        (vocab, merges)
    };
    let bos = special(dir, "bos_token")?.unwrap_or_else(|| "<|startoftext|>".into());
    let eos = special(dir, "eos_token")?.unwrap_or_else(|| "<|endoftext|>".into());
    let unk = special(dir, "unk_token")?.unwrap_or_else(|| "<|endoftext|>".into());
    let id = |t: &str| -> Result<u64> {
        vocab
            .get(t)
            .and_then(Value::as_u64)
            .ok_or_else(|| ModelError::bad_file(&vocab_path, format!("no token {t}")))
    };
    let (bos_id, eos_id) = (id(&bos)?, id(&eos)?);
    let added = |t: &str, i: u64| json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true});
    let mut added_tokens = vec![added(&bos, bos_id)];
    if eos != bos {
        added_tokens.push(added(&eos, eos_id));
    }
    let spec = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "NFC"},
            {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "},
            {"type": "Lowercase"}
        ]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": CLIP_SPLIT}, "behavior": "Removed", "invert": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
        ]},
        "post_processor": {"type": "RobertaProcessing", "sep": [eos, eos_id], "cls": [bos, bos_id],
                           "trim_offsets": false, "add_prefix_space": false},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "</w>", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges}
    });
    Tokenizer::from_bytes(spec.to_string().as_bytes()).map_err(|e| ModelError::bad_file(dir, e))
}

/// A tokenizer that pads/truncates to a fixed length like `padding="max_length", truncation=True`.
pub struct PromptTokenizer {
    tok: Tokenizer,
    pad_id: u32,
    pad_token: String,
    pub max_length: usize,
}

impl PromptTokenizer {
    /// CLIP: `tokenizer/` (tokenizer.json if present, else vocab.json + merges.txt).
    pub fn clip(dir: &Path) -> Result<Self> {
        let tok = clip_tokenizer(dir)?;
        let pad = special(dir, "pad_token")?.unwrap_or_else(|| "<|endoftext|>".into());
        let max = model_max_length(dir)?.unwrap_or(77).min(77);
        Self::new(tok, pad, max, dir)
    }

    /// T5: `tokenizer_2/tokenizer.json`, with the normalizer and pre-tokenizer transformers 5.x's
    /// `T5Tokenizer` uses for it: only the SentencePiece `Precompiled` normalizer of the file (if any),
    /// then whitespace split + Metaspace (`▁`, prepended always).
    pub fn t5(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let mut v =
            read_json_opt(&path)?.ok_or_else(|| ModelError::bad_file(&path, "file not found"))?;
        let precompiled = {
            let n = v.get("normalizer").cloned().unwrap_or(Value::Null);
            let list = match n.get("type").and_then(Value::as_str) {
                Some("Sequence") => n
                    .get("normalizers")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default(),
                Some(_) => vec![n],
                None => vec![],
            };
            list.into_iter()
                .find(|x| x.get("type").and_then(Value::as_str) == Some("Precompiled"))
        };
        if let Value::Object(m) = &mut v {
            m.insert("normalizer".into(), precompiled.unwrap_or(Value::Null));
            m.insert(
                "pre_tokenizer".into(),
                json!({"type": "Sequence", "pretokenizers": [
                    {"type": "WhitespaceSplit"},
                    {"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": "always", "split": true}
                ]}),
            );
        }
        let tok = Tokenizer::from_bytes(v.to_string().as_bytes())
            .map_err(|e| ModelError::bad_file(&path, e))?;
        let pad = special(dir, "pad_token")?.unwrap_or_else(|| "<pad>".into());
        Self::new(tok, pad, 512, dir)
    }

    fn new(tok: Tokenizer, pad_token: String, max_length: usize, dir: &Path) -> Result<Self> {
        let pad_id = tok.token_to_id(&pad_token).ok_or_else(|| {
            ModelError::bad_file(dir, format!("pad token {pad_token} not in the vocabulary"))
        })?;
        Ok(Self {
            tok,
            pad_id,
            pad_token,
            max_length,
        })
    }

    /// Token ids padded/truncated to `max_length` (special tokens included).
    pub fn encode(&self, text: &str, max_length: usize) -> Result<Vec<u32>> {
        let mut tok = self.tok.clone();
        tok.with_truncation(Some(TruncationParams {
            direction: TruncationDirection::Right,
            max_length,
            strategy: TruncationStrategy::LongestFirst,
            stride: 0,
        }))
        .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        tok.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(max_length),
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id: self.pad_id,
            pad_type_id: 0,
            pad_token: self.pad_token.clone(),
        }));
        let enc = tok
            .encode(text, true)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }
}

/// Text conditioning for one prompt: T5 states `[1, S, 4096]` and CLIP pooled `[1, 768]` (f32).
#[derive(Debug, Clone)]
pub struct PromptEmbeds {
    pub t5: Tensor,
    pub pooled: Tensor,
}

/// CLIP + T5 with their tokenizers and a prompt cache.
pub struct TextEncoders {
    pub clip_tok: PromptTokenizer,
    pub t5_tok: PromptTokenizer,
    pub clip: ClipTextModel,
    pub t5: T5Encoder,
    cache: Mutex<PromptCache>,
}

/// Embeddings of one prompt and whether they came from the cache.
#[derive(Debug, Clone)]
pub struct Encoded {
    pub embeds: Arc<PromptEmbeds>,
    pub cached: bool,
}

impl TextEncoders {
    /// `cache_bytes`: the [`PromptCache`] budget (0 turns it off).
    pub fn new(
        clip_tok: PromptTokenizer,
        t5_tok: PromptTokenizer,
        clip: ClipTextModel,
        t5: T5Encoder,
        cache_bytes: usize,
    ) -> Self {
        Self {
            clip_tok,
            t5_tok,
            clip,
            t5,
            cache: Mutex::new(PromptCache::new(cache_bytes)),
        }
    }

    /// What the prompt cache did and holds.
    pub fn cache_stats(&self) -> PromptCacheStats {
        self.lock_cache().stats()
    }

    /// The cache (its state stays consistent through a panic elsewhere: every update is
    /// complete before the lock is released).
    fn lock_cache(&self) -> std::sync::MutexGuard<'_, PromptCache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn ids(ids: Vec<u32>, device: &Device) -> Result<Tensor> {
        let n = ids.len();
        Ok(Tensor::from_vec(ids, (1, n), device)?)
    }

    /// Encodes `prompt` (T5 with `max_sequence_length` tokens).
    pub fn encode(&self, prompt: &str, max_sequence_length: usize) -> Result<Arc<PromptEmbeds>> {
        Ok(self.encode_cached(prompt, max_sequence_length)?.embeds)
    }

    /// Encodes `prompt`, from the cache when the same token ids were encoded recently.
    pub fn encode_cached(&self, prompt: &str, max_sequence_length: usize) -> Result<Encoded> {
        let key = PromptKey {
            clip: self.clip_tok.encode(prompt, self.clip_tok.max_length)?,
            t5: self.t5_tok.encode(prompt, max_sequence_length)?,
        };
        let found = self.lock_cache().get(&key);
        if let Some(embeds) = found {
            return Ok(Encoded {
                embeds,
                cached: true,
            });
        }
        // Encoded without the lock, so that reading the cache's counts never waits for T5.
        let pooled = self
            .clip
            .pooled(&Self::ids(key.clip.clone(), self.clip.device())?)?;
        let t5 = self
            .t5
            .forward(&Self::ids(key.t5.clone(), self.t5.device())?)?;
        let embeds = self
            .lock_cache()
            .insert(key, Arc::new(PromptEmbeds { t5, pooled }))?;
        Ok(Encoded {
            embeds,
            cached: false,
        })
    }
}

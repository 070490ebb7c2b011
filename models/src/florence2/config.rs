//! Florence-2 configuration, read from either checkpoint layout.
//!
//! * original remote-code `config.json`: `vision_config` with `dim_embed`, `image_pos_embed`,
//!   `visual_temporal_embedding`, `image_feature_source`; generation settings inside `text_config`.
//! * native transformers `config.json`: `vision_config` with `embed_dim`, `max_position_embeddings`,
//!   `max_temporal_embeddings`; generation settings in `generation_config.json`.
//!
//! Values missing from a file take the Florence-2-base defaults.

use std::path::Path;

use serde_json::Value;

use super::Florence2Error;

/// DaViT vision tower and projector settings.
#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    pub in_channels: usize,
    pub depths: Vec<usize>,
    pub embed_dim: Vec<usize>,
    pub num_heads: Vec<usize>,
    pub num_groups: Vec<usize>,
    pub patch_size: Vec<usize>,
    pub patch_stride: Vec<usize>,
    pub patch_padding: Vec<usize>,
    pub patch_prenorm: Vec<bool>,
    pub window_size: usize,
    pub mlp_ratio: f64,
    pub qkv_bias: bool,
    pub activation: Activation,
    /// Width of the projected image tokens (= the language model's `d_model`).
    pub projection_dim: usize,
    pub max_temporal_embeddings: usize,
    /// Rows/columns of the learned 2-D position table.
    pub max_position_embeddings: usize,
}

impl VisionConfig {
    /// Florence-2-base.
    pub fn base() -> Self {
        Self {
            in_channels: 3,
            depths: vec![1, 1, 9, 1],
            embed_dim: vec![128, 256, 512, 1024],
            num_heads: vec![4, 8, 16, 32],
            num_groups: vec![4, 8, 16, 32],
            patch_size: vec![7, 3, 3, 3],
            patch_stride: vec![4, 2, 2, 2],
            patch_padding: vec![3, 1, 1, 1],
            patch_prenorm: vec![false, true, true, true],
            window_size: 12,
            mlp_ratio: 4.0,
            qkv_bias: true,
            activation: Activation::Gelu,
            projection_dim: 768,
            max_temporal_embeddings: 100,
            max_position_embeddings: 50,
        }
    }

    pub fn num_stages(&self) -> usize {
        self.embed_dim.len()
    }

    fn validate(&self) -> Result<(), String> {
        let n = self.embed_dim.len();
        let lens = [
            ("depths", self.depths.len()),
            ("num_heads", self.num_heads.len()),
            ("num_groups", self.num_groups.len()),
            ("patch_size", self.patch_size.len()),
            ("patch_stride", self.patch_stride.len()),
            ("patch_padding", self.patch_padding.len()),
            ("patch_prenorm", self.patch_prenorm.len()),
        ];
        if n == 0 {
            return Err("vision_config has no stages".into());
        }
        for (name, len) in lens {
            if len != n {
                return Err(format!(
                    "vision_config.{name} has {len} entries, embed_dim has {n}"
                ));
            }
        }
        for i in 0..n {
            let c = self.embed_dim[i];
            if self.num_heads[i] == 0 || !c.is_multiple_of(self.num_heads[i]) {
                return Err(format!(
                    "stage {i}: embed_dim {c} not divisible by num_heads {}",
                    self.num_heads[i]
                ));
            }
            if self.num_groups[i] == 0 || !c.is_multiple_of(self.num_groups[i]) {
                return Err(format!(
                    "stage {i}: embed_dim {c} not divisible by num_groups {}",
                    self.num_groups[i]
                ));
            }
            if self.patch_stride[i] == 0 || self.patch_size[i] == 0 {
                return Err(format!("stage {i}: zero patch size or stride"));
            }
        }
        if self.window_size == 0 {
            return Err("vision_config.window_size is 0".into());
        }
        if self.max_temporal_embeddings == 0 {
            return Err("max_temporal_embeddings is 0".into());
        }
        Ok(())
    }
}

/// Activation of the MLPs (`activation_function`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// Exact erf GELU (`"gelu"`).
    Gelu,
    /// tanh-approximated GELU (`"gelu_new"`, `"gelu_pytorch_tanh"`, `"gelu_fast"`).
    GeluTanh,
    Relu,
}

impl Activation {
    fn parse(s: &str) -> Result<Self, String> {
        match s {
            "gelu" => Ok(Self::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Self::GeluTanh),
            "relu" => Ok(Self::Relu),
            other => Err(format!("unsupported activation_function {other:?}")),
        }
    }
}

/// BART language model settings.
#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub d_model: usize,
    pub encoder_layers: usize,
    pub decoder_layers: usize,
    pub encoder_attention_heads: usize,
    pub decoder_attention_heads: usize,
    pub encoder_ffn_dim: usize,
    pub decoder_ffn_dim: usize,
    pub max_position_embeddings: usize,
    pub activation: Activation,
    pub scale_embedding: bool,
    pub pad_token_id: u32,
    pub bos_token_id: u32,
    pub eos_token_id: u32,
    pub decoder_start_token_id: u32,
}

impl TextConfig {
    /// Florence-2-base (original vocabulary).
    pub fn base() -> Self {
        Self {
            vocab_size: 51289,
            d_model: 768,
            encoder_layers: 6,
            decoder_layers: 6,
            encoder_attention_heads: 12,
            decoder_attention_heads: 12,
            encoder_ffn_dim: 3072,
            decoder_ffn_dim: 3072,
            max_position_embeddings: 1024,
            activation: Activation::Gelu,
            scale_embedding: false,
            pad_token_id: 1,
            bos_token_id: 0,
            eos_token_id: 2,
            decoder_start_token_id: 2,
        }
    }

    fn validate(&self) -> Result<(), String> {
        for (name, d, h) in [
            ("encoder", self.d_model, self.encoder_attention_heads),
            ("decoder", self.d_model, self.decoder_attention_heads),
        ] {
            if h == 0 || d % h != 0 {
                return Err(format!(
                    "text_config: d_model {d} not divisible by {name}_attention_heads {h}"
                ));
            }
        }
        if self.vocab_size == 0 {
            return Err("text_config.vocab_size is 0".into());
        }
        Ok(())
    }
}

/// Which checkpoint layout a folder holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// microsoft/Florence-2-* remote-code checkpoint (`vision_tower.*`, `language_model.model.*`).
    Original,
    /// transformers `Florence2ForConditionalGeneration` (`model.*`, `lm_head.weight`).
    Native,
}

/// `early_stopping` of beam search.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EarlyStopping {
    /// Stop as soon as `num_beams` hypotheses are finished (`true`).
    True,
    /// Heuristic stop when no running beam can beat the finished ones at the current length (`false`).
    False,
    /// Canonical beam search: stop only when no better hypothesis can exist (`"never"`).
    Never,
}

/// Generation settings (a subset of transformers' `GenerationConfig` that Florence-2 uses).
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationConfig {
    pub num_beams: usize,
    pub max_new_tokens: usize,
    pub length_penalty: f64,
    pub early_stopping: EarlyStopping,
    /// 0 disables.
    pub no_repeat_ngram_size: usize,
    pub forced_bos_token_id: Option<u32>,
    pub forced_eos_token_id: Option<u32>,
    pub eos_token_id: u32,
    pub pad_token_id: u32,
    pub decoder_start_token_id: u32,
}

/// New tokens generated when neither the checkpoint nor the caller sets `max_new_tokens`.
/// (transformers' own fallback, `max_length = 20`, cuts detailed captions off.)
pub const DEFAULT_MAX_NEW_TOKENS: usize = 256;

impl Default for GenerationConfig {
    /// Florence-2-base's settings: beam 3, no-repeat 3, early stopping, forced `<s>` / `</s>`.
    fn default() -> Self {
        Self {
            num_beams: 3,
            max_new_tokens: DEFAULT_MAX_NEW_TOKENS,
            length_penalty: 1.0,
            early_stopping: EarlyStopping::True,
            no_repeat_ngram_size: 3,
            forced_bos_token_id: Some(0),
            forced_eos_token_id: Some(2),
            eos_token_id: 2,
            pad_token_id: 1,
            decoder_start_token_id: 2,
        }
    }
}

impl GenerationConfig {
    /// Greedy decoding with the other settings unchanged.
    pub fn greedy(mut self) -> Self {
        self.num_beams = 1;
        self
    }

    pub fn with_beams(mut self, num_beams: usize) -> Self {
        self.num_beams = num_beams;
        self
    }

    pub fn with_max_new_tokens(mut self, n: usize) -> Self {
        self.max_new_tokens = n;
        self
    }

    /// Reads generation settings the way transformers does: `generation_config.json` when present
    /// (missing keys = transformers' defaults, i.e. no forced tokens, beams 1), otherwise the model
    /// config (`text_config`, then the top level).
    fn from_checkpoint(
        gcfg: Option<&Value>,
        config: &Value,
        text: &TextConfig,
    ) -> Result<Self, String> {
        let text_cfg = config.get("text_config");
        let lookup = |key: &str| -> Option<&Value> {
            match gcfg {
                Some(g) => g.get(key),
                None => text_cfg
                    .and_then(|t| t.get(key))
                    .or_else(|| config.get(key)),
            }
        };
        let usize_of = |key: &str| -> Result<Option<usize>, String> {
            match lookup(key) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v.as_u64().map(|x| Some(x as usize)).ok_or_else(|| {
                    format!("generation setting {key} is not an unsigned integer: {v}")
                }),
            }
        };
        let token_of = |key: &str| -> Result<Option<u32>, String> {
            match lookup(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Array(a)) if a.len() == 1 => a[0]
                    .as_u64()
                    .map(|x| Some(x as u32))
                    .ok_or_else(|| format!("generation setting {key} is not a token id")),
                Some(v) => v.as_u64().map(|x| Some(x as u32)).ok_or_else(|| {
                    format!("generation setting {key} is not a single token id: {v}")
                }),
            }
        };
        let early_stopping = match lookup("early_stopping") {
            None | Some(Value::Null) | Some(Value::Bool(false)) => EarlyStopping::False,
            Some(Value::Bool(true)) => EarlyStopping::True,
            Some(Value::String(s)) if s == "never" => EarlyStopping::Never,
            Some(v) => {
                return Err(format!(
                    "early_stopping must be true, false or \"never\", got {v}"
                ));
            }
        };
        let length_penalty = match lookup("length_penalty") {
            None | Some(Value::Null) => 1.0,
            Some(v) => v
                .as_f64()
                .ok_or_else(|| format!("length_penalty is not a number: {v}"))?,
        };
        Ok(Self {
            num_beams: usize_of("num_beams")?.unwrap_or(1).max(1),
            max_new_tokens: usize_of("max_new_tokens")?.unwrap_or(DEFAULT_MAX_NEW_TOKENS),
            length_penalty,
            early_stopping,
            no_repeat_ngram_size: usize_of("no_repeat_ngram_size")?.unwrap_or(0),
            forced_bos_token_id: token_of("forced_bos_token_id")?,
            forced_eos_token_id: token_of("forced_eos_token_id")?,
            eos_token_id: token_of("eos_token_id")?.unwrap_or(text.eos_token_id),
            pad_token_id: token_of("pad_token_id")?.unwrap_or(text.pad_token_id),
            decoder_start_token_id: token_of("decoder_start_token_id")?
                .unwrap_or(text.decoder_start_token_id),
        })
    }
}

/// Image preprocessing (`preprocessor_config.json`, or the `image_processor` entry of
/// `processor_config.json`).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessorConfig {
    pub do_resize: bool,
    pub height: usize,
    pub width: usize,
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
}

impl Default for ImageProcessorConfig {
    /// Florence-2-base: 768×768 bicubic, ImageNet mean/std.
    fn default() -> Self {
        Self {
            do_resize: true,
            height: 768,
            width: 768,
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: [0.485, 0.456, 0.406],
            image_std: [0.229, 0.224, 0.225],
        }
    }
}

impl ImageProcessorConfig {
    fn from_value(v: &Value) -> Result<Self, String> {
        let mut c = Self::default();
        if let Some(b) = v.get("do_resize").and_then(Value::as_bool) {
            c.do_resize = b;
        }
        if let Some(size) = v.get("size") {
            match (
                size.get("height"),
                size.get("width"),
                size.get("shortest_edge"),
            ) {
                (Some(h), Some(w), _) => {
                    c.height = h.as_u64().ok_or("size.height is not an integer")? as usize;
                    c.width = w.as_u64().ok_or("size.width is not an integer")? as usize;
                }
                (_, _, Some(_)) => return Err(
                    "size.shortest_edge resizing is not supported (Florence-2 uses height/width)"
                        .into(),
                ),
                _ => return Err(format!("unsupported size {size}")),
            }
        }
        if let Some(r) = v.get("resample") {
            // 3 = PIL.Image.BICUBIC, the only filter Florence-2 checkpoints use.
            if r.as_u64() != Some(3) {
                return Err(format!("resample {r} is not supported (only 3 = bicubic)"));
            }
        }
        if v.get("do_center_crop").and_then(Value::as_bool) == Some(true) {
            return Err(
                "do_center_crop is not supported (Florence-2 resizes without cropping)".into(),
            );
        }
        if let Some(b) = v.get("do_rescale").and_then(Value::as_bool) {
            c.do_rescale = b;
        }
        if let Some(f) = v.get("rescale_factor").and_then(Value::as_f64) {
            c.rescale_factor = f;
        }
        if let Some(b) = v.get("do_normalize").and_then(Value::as_bool) {
            c.do_normalize = b;
        }
        let triple = |key: &str| -> Result<Option<[f32; 3]>, String> {
            match v.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Array(a)) if a.len() == 3 => {
                    let mut out = [0f32; 3];
                    for (o, x) in out.iter_mut().zip(a) {
                        *o = x
                            .as_f64()
                            .ok_or_else(|| format!("{key} holds a non-number"))?
                            as f32;
                    }
                    Ok(Some(out))
                }
                Some(Value::Number(n)) => {
                    let x = n.as_f64().unwrap_or(0.0) as f32;
                    Ok(Some([x; 3]))
                }
                Some(other) => Err(format!("{key} must be 3 numbers, got {other}")),
            }
        };
        if let Some(m) = triple("image_mean")? {
            c.image_mean = m;
        }
        if let Some(s) = triple("image_std")? {
            if s.contains(&0.0) {
                return Err("image_std holds a zero".into());
            }
            c.image_std = s;
        }
        if c.height == 0 || c.width == 0 {
            return Err("image size is zero".into());
        }
        Ok(c)
    }
}

/// Everything a checkpoint folder says about the model.
#[derive(Debug, Clone)]
pub struct Florence2Config {
    pub vision: VisionConfig,
    pub text: TextConfig,
    pub generation: GenerationConfig,
    pub image: ImageProcessorConfig,
    /// `<image>` placeholder id of native checkpoints.
    pub image_token_id: Option<u32>,
    /// Layout that `config.json` is written in.
    pub config_layout: Layout,
}

fn read_json(path: &Path) -> Result<Value, Florence2Error> {
    let bytes = std::fs::read(path).map_err(|source| Florence2Error::Io {
        path: path.to_owned(),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|source| Florence2Error::Json {
        path: path.to_owned(),
        source,
    })
}

fn get_usize_vec(v: &Value, key: &str) -> Result<Option<Vec<usize>>, String> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_u64()
                    .map(|u| u as usize)
                    .ok_or_else(|| format!("{key} holds a non-integer"))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        Some(other) => Err(format!("{key} must be a list, got {other}")),
    }
}

fn get_usize(v: &Value, key: &str) -> Result<Option<usize>, String> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_u64()
            .map(|u| Some(u as usize))
            .ok_or_else(|| format!("{key} is not an unsigned integer: {x}")),
    }
}

impl Florence2Config {
    /// Reads `config.json` (+ `generation_config.json`, `preprocessor_config.json` or
    /// `processor_config.json` when present) from a checkpoint folder.
    pub fn from_dir(dir: &Path) -> Result<Self, Florence2Error> {
        let cfg_path = dir.join("config.json");
        let config = read_json(&cfg_path)?;
        let gen_path = dir.join("generation_config.json");
        let gcfg = if gen_path.is_file() {
            Some(read_json(&gen_path)?)
        } else {
            None
        };
        let image = {
            let pre = dir.join("preprocessor_config.json");
            let proc = dir.join("processor_config.json");
            let bad = |path: &Path, msg: String| Florence2Error::Config {
                path: path.to_owned(),
                msg,
            };
            if pre.is_file() {
                ImageProcessorConfig::from_value(&read_json(&pre)?).map_err(|m| bad(&pre, m))?
            } else if proc.is_file() {
                match read_json(&proc)?.get("image_processor") {
                    Some(v) => ImageProcessorConfig::from_value(v).map_err(|m| bad(&proc, m))?,
                    None => ImageProcessorConfig::default(),
                }
            } else {
                ImageProcessorConfig::default()
            }
        };
        Self::from_values(&config, gcfg.as_ref(), image).map_err(|msg| Florence2Error::Config {
            path: cfg_path,
            msg,
        })
    }

    fn from_values(
        config: &Value,
        gcfg: Option<&Value>,
        image: ImageProcessorConfig,
    ) -> Result<Self, String> {
        if let Some(mt) = config.get("model_type").and_then(Value::as_str)
            && mt != "florence2"
        {
            return Err(format!("model_type is {mt:?}, expected \"florence2\""));
        }
        let empty = Value::Object(Default::default());
        let vcfg = config.get("vision_config").unwrap_or(&empty);
        let tcfg = config.get("text_config").unwrap_or(&empty);
        let original = vcfg.get("dim_embed").is_some()
            || vcfg.get("model_type").and_then(Value::as_str) == Some("davit");

        let mut vision = VisionConfig::base();
        if let Some(d) = get_usize_vec(vcfg, if original { "dim_embed" } else { "embed_dim" })? {
            vision.embed_dim = d;
        }
        macro_rules! vec_field {
            ($name:ident) => {
                if let Some(x) = get_usize_vec(vcfg, stringify!($name))? {
                    vision.$name = x;
                }
            };
        }
        vec_field!(depths);
        vec_field!(num_heads);
        vec_field!(num_groups);
        vec_field!(patch_size);
        vec_field!(patch_stride);
        vec_field!(patch_padding);
        if let Some(Value::Array(a)) = vcfg.get("patch_prenorm") {
            vision.patch_prenorm = a
                .iter()
                .map(|x| x.as_bool().ok_or("patch_prenorm holds a non-boolean"))
                .collect::<Result<_, _>>()?;
        }
        if let Some(x) = get_usize(vcfg, "in_channels")? {
            vision.in_channels = x;
        }
        if let Some(x) = get_usize(vcfg, "window_size")? {
            vision.window_size = x;
        }
        if let Some(x) = vcfg.get("mlp_ratio").and_then(Value::as_f64) {
            vision.mlp_ratio = x;
        }
        if let Some(x) = vcfg.get("qkv_bias").and_then(Value::as_bool) {
            vision.qkv_bias = x;
        }
        if let Some(x) = vcfg.get("activation_function").and_then(Value::as_str) {
            vision.activation = Activation::parse(x)?;
        }
        let projection_dim =
            get_usize(vcfg, "projection_dim")?.or(get_usize(config, "projection_dim")?);
        if original {
            if let Some(x) = vcfg
                .get("visual_temporal_embedding")
                .map(|t| get_usize(t, "max_temporal_embeddings"))
                .transpose()?
                .flatten()
            {
                vision.max_temporal_embeddings = x;
            }
            if let Some(x) = vcfg
                .get("image_pos_embed")
                .map(|t| get_usize(t, "max_pos_embeddings"))
                .transpose()?
                .flatten()
            {
                vision.max_position_embeddings = x;
            }
            if let Some(Value::Array(src)) = vcfg.get("image_feature_source") {
                let names: Vec<_> = src.iter().filter_map(Value::as_str).collect();
                if names != ["spatial_avg_pool", "temporal_avg_pool"] {
                    return Err(format!(
                        "image_feature_source {names:?} is not supported (only spatial_avg_pool, temporal_avg_pool)"
                    ));
                }
            }
            // The original DaViT builds the MLP hidden size from a fixed ratio of 4.
            vision.mlp_ratio = 4.0;
        } else {
            if let Some(x) = get_usize(vcfg, "max_temporal_embeddings")? {
                vision.max_temporal_embeddings = x;
            }
            if let Some(x) = get_usize(vcfg, "max_position_embeddings")? {
                vision.max_position_embeddings = x;
            }
        }

        let mut text = TextConfig::base();
        macro_rules! text_field {
            ($name:ident) => {
                if let Some(x) = get_usize(tcfg, stringify!($name))? {
                    text.$name = x;
                }
            };
        }
        text_field!(vocab_size);
        text_field!(d_model);
        text_field!(encoder_layers);
        text_field!(decoder_layers);
        text_field!(encoder_attention_heads);
        text_field!(decoder_attention_heads);
        text_field!(encoder_ffn_dim);
        text_field!(decoder_ffn_dim);
        text_field!(max_position_embeddings);
        if let Some(x) = tcfg.get("activation_function").and_then(Value::as_str) {
            text.activation = Activation::parse(x)?;
        }
        if let Some(x) = tcfg.get("scale_embedding").and_then(Value::as_bool) {
            text.scale_embedding = x;
        }
        for (key, slot) in [
            ("pad_token_id", &mut text.pad_token_id),
            ("bos_token_id", &mut text.bos_token_id),
            ("eos_token_id", &mut text.eos_token_id),
            ("decoder_start_token_id", &mut text.decoder_start_token_id),
        ] {
            if let Some(x) = get_usize(tcfg, key)? {
                *slot = x as u32;
            }
        }
        for key in [
            "normalize_before",
            "add_final_layer_norm",
            "add_bias_logits",
        ] {
            if tcfg.get(key).and_then(Value::as_bool) == Some(true) {
                return Err(format!(
                    "text_config.{key} = true is not supported (Florence-2 uses post-LN BART)"
                ));
            }
        }
        vision.projection_dim = projection_dim.unwrap_or(text.d_model);
        if vision.projection_dim != text.d_model {
            return Err(format!(
                "projection_dim {} differs from the language model's d_model {}",
                vision.projection_dim, text.d_model
            ));
        }
        vision.validate()?;
        text.validate()?;
        let generation = GenerationConfig::from_checkpoint(gcfg, config, &text)?;
        let image_token_id = get_usize(config, "image_token_id")?.map(|x| x as u32);
        Ok(Self {
            vision,
            text,
            generation,
            image,
            image_token_id,
            config_layout: if original {
                Layout::Original
            } else {
                Layout::Native
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn original_base() -> Value {
        json!({
            "model_type": "florence2", "projection_dim": 768, "vocab_size": 51289,
            "text_config": {
                "vocab_size": 51289, "activation_function": "gelu", "d_model": 768,
                "decoder_attention_heads": 12, "decoder_ffn_dim": 3072, "decoder_layers": 6,
                "decoder_start_token_id": 2, "early_stopping": true, "encoder_attention_heads": 12,
                "encoder_ffn_dim": 3072, "encoder_layers": 6, "eos_token_id": 2, "forced_eos_token_id": 2,
                "forced_bos_token_id": 0, "max_position_embeddings": 1024, "no_repeat_ngram_size": 3,
                "normalize_before": false, "pad_token_id": 1, "scale_embedding": false, "num_beams": 3
            },
            "vision_config": {
                "model_type": "davit", "patch_size": [7, 3, 3, 3], "patch_stride": [4, 2, 2, 2],
                "patch_padding": [3, 1, 1, 1], "patch_prenorm": [false, true, true, true],
                "dim_embed": [128, 256, 512, 1024], "num_heads": [4, 8, 16, 32], "num_groups": [4, 8, 16, 32],
                "depths": [1, 1, 9, 1], "window_size": 12, "projection_dim": 768,
                "visual_temporal_embedding": {"type": "COSINE", "max_temporal_embeddings": 100},
                "image_pos_embed": {"type": "learned_abs_2d", "max_pos_embeddings": 50},
                "image_feature_source": ["spatial_avg_pool", "temporal_avg_pool"]
            }
        })
    }

    #[test]
    fn original_base_config_reads_as_base() {
        let c =
            Florence2Config::from_values(&original_base(), None, ImageProcessorConfig::default())
                .unwrap();
        assert_eq!(c.config_layout, Layout::Original);
        assert_eq!(c.vision, VisionConfig::base());
        assert_eq!(c.text, TextConfig::base());
        // generation settings come from text_config when there is no generation_config.json
        assert_eq!(c.generation, GenerationConfig::default());
    }

    #[test]
    fn generation_config_json_wins_and_defaults_like_transformers() {
        let gcfg = json!({"num_beams": 3, "no_repeat_ngram_size": 3, "early_stopping": true, "eos_token_id": 2,
                         "pad_token_id": 1, "decoder_start_token_id": 2});
        let c = Florence2Config::from_values(
            &original_base(),
            Some(&gcfg),
            ImageProcessorConfig::default(),
        )
        .unwrap();
        assert_eq!(c.generation.forced_bos_token_id, None);
        assert_eq!(c.generation.forced_eos_token_id, None);
        assert_eq!(c.generation.num_beams, 3);
        let gcfg = json!({"early_stopping": "never", "length_penalty": 0.5, "max_new_tokens": 40});
        let c = Florence2Config::from_values(
            &original_base(),
            Some(&gcfg),
            ImageProcessorConfig::default(),
        )
        .unwrap();
        assert_eq!(c.generation.early_stopping, EarlyStopping::Never);
        assert_eq!(c.generation.length_penalty, 0.5);
        assert_eq!(c.generation.max_new_tokens, 40);
        assert_eq!(c.generation.num_beams, 1);
    }

    #[test]
    fn bad_configs_are_rejected_with_a_reason() {
        let mut v = original_base();
        v["text_config"]["normalize_before"] = json!(true);
        let e =
            Florence2Config::from_values(&v, None, ImageProcessorConfig::default()).unwrap_err();
        assert!(e.contains("normalize_before"), "{e}");
        let mut v = original_base();
        v["vision_config"]["num_heads"] = json!([4, 8, 16]);
        let e =
            Florence2Config::from_values(&v, None, ImageProcessorConfig::default()).unwrap_err();
        assert!(e.contains("num_heads"), "{e}");
        let mut v = original_base();
        v["vision_config"]["projection_dim"] = json!(512);
        assert!(Florence2Config::from_values(&v, None, ImageProcessorConfig::default()).is_err());
        let mut v = original_base();
        v["model_type"] = json!("llava");
        assert!(Florence2Config::from_values(&v, None, ImageProcessorConfig::default()).is_err());
    }

    #[test]
    fn image_processor_config_parses_and_validates() {
        let c = ImageProcessorConfig::from_value(&json!({
            "size": {"height": 96, "width": 64}, "resample": 3, "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.25, 0.25, 0.25], "rescale_factor": 0.00392156862745098
        }))
        .unwrap();
        assert_eq!((c.height, c.width), (96, 64));
        assert_eq!(c.image_mean, [0.5; 3]);
        assert!(ImageProcessorConfig::from_value(&json!({"resample": 2})).is_err());
        assert!(
            ImageProcessorConfig::from_value(&json!({"size": {"shortest_edge": 224}})).is_err()
        );
        assert!(ImageProcessorConfig::from_value(&json!({"image_std": [0.0, 1.0, 1.0]})).is_err());
    }
}

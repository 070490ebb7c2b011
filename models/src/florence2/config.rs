//! Florence-2 configuration, read from either checkpoint layout.
//!
//! * original remote-code `config.json`: `vision_config` with `dim_embed`, `image_pos_embed`,
//!   `visual_temporal_embedding`, `image_feature_source`; generation settings inside `text_config`.
//! * native transformers `config.json`: `vision_config` with `embed_dim`, `max_position_embeddings`,
//!   `max_temporal_embeddings`; generation settings in `generation_config.json`.
//!
//! Values missing from a file take the Florence-2-base defaults. The files are read through
//! `serde` into the `Raw*` mirrors at the bottom of this file (every key optional, aliases for
//! the two layouts' spellings); [`Florence2Config::from_values`] then fills the defaults,
//! rejects what this implementation does not support, and validates the shapes.

use std::path::Path;

use serde::Deserialize;
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Activation {
    /// Exact erf GELU (`"gelu"`).
    #[serde(rename = "gelu")]
    Gelu,
    /// tanh-approximated GELU (`"gelu_new"`, `"gelu_pytorch_tanh"`, `"gelu_fast"`).
    #[serde(rename = "gelu_new", alias = "gelu_pytorch_tanh", alias = "gelu_fast")]
    GeluTanh,
    #[serde(rename = "relu")]
    Relu,
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

    /// Generation settings the way transformers reads them: `generation_config.json` when present
    /// (missing keys = transformers' defaults, i.e. no forced tokens, beams 1), otherwise the model
    /// config (`text_config`, then the top level, key by key).
    fn from_raw(g: RawGeneration, text: &TextConfig) -> Result<Self, String> {
        let early_stopping = match g.early_stopping {
            None | Some(RawEarlyStopping::Bool(false)) => EarlyStopping::False,
            Some(RawEarlyStopping::Bool(true)) => EarlyStopping::True,
            Some(RawEarlyStopping::Text(s)) if s == "never" => EarlyStopping::Never,
            Some(RawEarlyStopping::Text(s)) => {
                return Err(format!(
                    "early_stopping must be true, false or \"never\", got {s:?}"
                ));
            }
        };
        Ok(Self {
            num_beams: g.num_beams.unwrap_or(1).max(1),
            max_new_tokens: g.max_new_tokens.unwrap_or(DEFAULT_MAX_NEW_TOKENS),
            length_penalty: g.length_penalty.unwrap_or(1.0),
            early_stopping,
            no_repeat_ngram_size: g.no_repeat_ngram_size.unwrap_or(0),
            forced_bos_token_id: g.forced_bos_token_id.map(TokenId::get),
            forced_eos_token_id: g.forced_eos_token_id.map(TokenId::get),
            eos_token_id: g.eos_token_id.map_or(text.eos_token_id, TokenId::get),
            pad_token_id: g.pad_token_id.map_or(text.pad_token_id, TokenId::get),
            decoder_start_token_id: g
                .decoder_start_token_id
                .map_or(text.decoder_start_token_id, TokenId::get),
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

/// `resample` value of PIL's bicubic filter, the only one Florence-2 checkpoints use.
const PIL_BICUBIC: u64 = 3;

impl ImageProcessorConfig {
    fn from_value(v: &Value) -> Result<Self, String> {
        let raw = RawImageProcessor::deserialize(v).map_err(|e| e.to_string())?;
        let mut c = Self::default();
        if let Some(size) = raw.size {
            match size {
                RawSize {
                    height: Some(h),
                    width: Some(w),
                    ..
                } => (c.height, c.width) = (h, w),
                RawSize {
                    shortest_edge: Some(_),
                    ..
                } => {
                    return Err(
                        "size.shortest_edge resizing is not supported (Florence-2 uses height/width)"
                            .into(),
                    );
                }
                _ => return Err("size needs height and width".into()),
            }
        }
        if let Some(r) = raw.resample
            && r != PIL_BICUBIC
        {
            return Err(format!("resample {r} is not supported (only 3 = bicubic)"));
        }
        if raw.do_center_crop == Some(true) {
            return Err(
                "do_center_crop is not supported (Florence-2 resizes without cropping)".into(),
            );
        }
        c.do_resize = raw.do_resize.unwrap_or(c.do_resize);
        c.do_rescale = raw.do_rescale.unwrap_or(c.do_rescale);
        c.rescale_factor = raw.rescale_factor.unwrap_or(c.rescale_factor);
        c.do_normalize = raw.do_normalize.unwrap_or(c.do_normalize);
        if let Some(m) = raw.image_mean {
            c.image_mean = m.get();
        }
        if let Some(s) = raw.image_std {
            let s = s.get();
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

/// `T::deserialize` of a JSON value, the error naming where in the file it is.
fn parse<'a, T: Deserialize<'a>>(v: &'a Value, what: &str) -> Result<T, String> {
    T::deserialize(v).map_err(|e| format!("{what}: {e}"))
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
        let raw: RawConfig = parse(config, "config.json")?;
        if let Some(mt) = &raw.model_type
            && mt != "florence2"
        {
            return Err(format!("model_type is {mt:?}, expected \"florence2\""));
        }
        let v = raw.vision_config;
        let original = v.dim_embed.is_some() || v.model_type.as_deref() == Some("davit");

        let base = VisionConfig::base();
        let embed_dim = if original { v.dim_embed } else { v.embed_dim };
        let mut vision = VisionConfig {
            in_channels: v.in_channels.unwrap_or(base.in_channels),
            depths: v.depths.unwrap_or(base.depths),
            embed_dim: embed_dim.unwrap_or(base.embed_dim),
            num_heads: v.num_heads.unwrap_or(base.num_heads),
            num_groups: v.num_groups.unwrap_or(base.num_groups),
            patch_size: v.patch_size.unwrap_or(base.patch_size),
            patch_stride: v.patch_stride.unwrap_or(base.patch_stride),
            patch_padding: v.patch_padding.unwrap_or(base.patch_padding),
            patch_prenorm: v.patch_prenorm.unwrap_or(base.patch_prenorm),
            window_size: v.window_size.unwrap_or(base.window_size),
            mlp_ratio: v.mlp_ratio.unwrap_or(base.mlp_ratio),
            qkv_bias: v.qkv_bias.unwrap_or(base.qkv_bias),
            activation: v.activation_function.unwrap_or(base.activation),
            projection_dim: base.projection_dim,
            max_temporal_embeddings: base.max_temporal_embeddings,
            max_position_embeddings: base.max_position_embeddings,
        };
        if original {
            if let Some(x) = v
                .visual_temporal_embedding
                .and_then(|t| t.max_temporal_embeddings)
            {
                vision.max_temporal_embeddings = x;
            }
            if let Some(x) = v.image_pos_embed.and_then(|t| t.max_pos_embeddings) {
                vision.max_position_embeddings = x;
            }
            if let Some(src) = v.image_feature_source
                && src != ["spatial_avg_pool", "temporal_avg_pool"]
            {
                return Err(format!(
                    "image_feature_source {src:?} is not supported (only spatial_avg_pool, temporal_avg_pool)"
                ));
            }
            // The original DaViT builds the MLP hidden size from a fixed ratio of 4.
            vision.mlp_ratio = 4.0;
        } else {
            if let Some(x) = v.max_temporal_embeddings {
                vision.max_temporal_embeddings = x;
            }
            if let Some(x) = v.max_position_embeddings {
                vision.max_position_embeddings = x;
            }
        }

        let t = raw.text_config;
        for (key, set) in [
            ("normalize_before", t.normalize_before),
            ("add_final_layer_norm", t.add_final_layer_norm),
            ("add_bias_logits", t.add_bias_logits),
        ] {
            if set == Some(true) {
                return Err(format!(
                    "text_config.{key} = true is not supported (Florence-2 uses post-LN BART)"
                ));
            }
        }
        let base = TextConfig::base();
        let text = TextConfig {
            vocab_size: t.vocab_size.unwrap_or(base.vocab_size),
            d_model: t.d_model.unwrap_or(base.d_model),
            encoder_layers: t.encoder_layers.unwrap_or(base.encoder_layers),
            decoder_layers: t.decoder_layers.unwrap_or(base.decoder_layers),
            encoder_attention_heads: t
                .encoder_attention_heads
                .unwrap_or(base.encoder_attention_heads),
            decoder_attention_heads: t
                .decoder_attention_heads
                .unwrap_or(base.decoder_attention_heads),
            encoder_ffn_dim: t.encoder_ffn_dim.unwrap_or(base.encoder_ffn_dim),
            decoder_ffn_dim: t.decoder_ffn_dim.unwrap_or(base.decoder_ffn_dim),
            max_position_embeddings: t
                .max_position_embeddings
                .unwrap_or(base.max_position_embeddings),
            activation: t.activation_function.unwrap_or(base.activation),
            scale_embedding: t.scale_embedding.unwrap_or(base.scale_embedding),
            pad_token_id: t.pad_token_id.map_or(base.pad_token_id, TokenId::get),
            bos_token_id: t.bos_token_id.map_or(base.bos_token_id, TokenId::get),
            eos_token_id: t.eos_token_id.map_or(base.eos_token_id, TokenId::get),
            decoder_start_token_id: t
                .decoder_start_token_id
                .map_or(base.decoder_start_token_id, TokenId::get),
        };
        vision.projection_dim = v
            .projection_dim
            .or(raw.projection_dim)
            .unwrap_or(text.d_model);
        if vision.projection_dim != text.d_model {
            return Err(format!(
                "projection_dim {} differs from the language model's d_model {}",
                vision.projection_dim, text.d_model
            ));
        }
        vision.validate()?;
        text.validate()?;
        let generation = match gcfg {
            Some(g) => parse(g, "generation_config.json")?,
            None => {
                let empty = Value::Object(Default::default());
                let in_text: RawGeneration =
                    parse(config.get("text_config").unwrap_or(&empty), "text_config")?;
                in_text.or(parse(config, "config.json")?)
            }
        };
        let generation = GenerationConfig::from_raw(generation, &text)?;
        Ok(Self {
            vision,
            text,
            generation,
            image,
            image_token_id: raw.image_token_id,
            config_layout: if original {
                Layout::Original
            } else {
                Layout::Native
            },
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The files as written: every key optional (missing = the base default), unknown keys ignored
// (checkpoints carry many transformers settings this model does not read), wrong types rejected
// with serde's message.

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawConfig {
    model_type: Option<String>,
    projection_dim: Option<usize>,
    image_token_id: Option<u32>,
    vision_config: RawVision,
    text_config: RawText,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawVision {
    model_type: Option<String>,
    /// Original layout's name of `embed_dim`.
    dim_embed: Option<Vec<usize>>,
    embed_dim: Option<Vec<usize>>,
    in_channels: Option<usize>,
    depths: Option<Vec<usize>>,
    num_heads: Option<Vec<usize>>,
    num_groups: Option<Vec<usize>>,
    patch_size: Option<Vec<usize>>,
    patch_stride: Option<Vec<usize>>,
    patch_padding: Option<Vec<usize>>,
    patch_prenorm: Option<Vec<bool>>,
    window_size: Option<usize>,
    mlp_ratio: Option<f64>,
    qkv_bias: Option<bool>,
    activation_function: Option<Activation>,
    projection_dim: Option<usize>,
    // native layout
    max_temporal_embeddings: Option<usize>,
    max_position_embeddings: Option<usize>,
    // original layout
    visual_temporal_embedding: Option<RawTemporalEmbedding>,
    image_pos_embed: Option<RawPosEmbed>,
    image_feature_source: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawTemporalEmbedding {
    max_temporal_embeddings: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawPosEmbed {
    max_pos_embeddings: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawText {
    vocab_size: Option<usize>,
    d_model: Option<usize>,
    encoder_layers: Option<usize>,
    decoder_layers: Option<usize>,
    encoder_attention_heads: Option<usize>,
    decoder_attention_heads: Option<usize>,
    encoder_ffn_dim: Option<usize>,
    decoder_ffn_dim: Option<usize>,
    max_position_embeddings: Option<usize>,
    activation_function: Option<Activation>,
    scale_embedding: Option<bool>,
    pad_token_id: Option<TokenId>,
    bos_token_id: Option<TokenId>,
    eos_token_id: Option<TokenId>,
    decoder_start_token_id: Option<TokenId>,
    normalize_before: Option<bool>,
    add_final_layer_norm: Option<bool>,
    add_bias_logits: Option<bool>,
}

/// The generation keys, wherever they are written (`generation_config.json`, `text_config`, the
/// top level of `config.json`).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawGeneration {
    num_beams: Option<usize>,
    max_new_tokens: Option<usize>,
    length_penalty: Option<f64>,
    early_stopping: Option<RawEarlyStopping>,
    no_repeat_ngram_size: Option<usize>,
    forced_bos_token_id: Option<TokenId>,
    forced_eos_token_id: Option<TokenId>,
    eos_token_id: Option<TokenId>,
    pad_token_id: Option<TokenId>,
    decoder_start_token_id: Option<TokenId>,
}

impl RawGeneration {
    /// Key by key: `self`'s value where set, else `other`'s.
    fn or(self, other: Self) -> Self {
        Self {
            num_beams: self.num_beams.or(other.num_beams),
            max_new_tokens: self.max_new_tokens.or(other.max_new_tokens),
            length_penalty: self.length_penalty.or(other.length_penalty),
            early_stopping: self.early_stopping.or(other.early_stopping),
            no_repeat_ngram_size: self.no_repeat_ngram_size.or(other.no_repeat_ngram_size),
            forced_bos_token_id: self.forced_bos_token_id.or(other.forced_bos_token_id),
            forced_eos_token_id: self.forced_eos_token_id.or(other.forced_eos_token_id),
            eos_token_id: self.eos_token_id.or(other.eos_token_id),
            pad_token_id: self.pad_token_id.or(other.pad_token_id),
            decoder_start_token_id: self.decoder_start_token_id.or(other.decoder_start_token_id),
        }
    }
}

/// `true`, `false` or `"never"`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawEarlyStopping {
    Bool(bool),
    Text(String),
}

/// A token id, written as a number or as a one-element list (transformers accepts both).
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(untagged)]
enum TokenId {
    One(u32),
    List([u32; 1]),
}

impl TokenId {
    fn get(self) -> u32 {
        match self {
            TokenId::One(t) | TokenId::List([t]) => t,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawImageProcessor {
    do_resize: Option<bool>,
    size: Option<RawSize>,
    resample: Option<u64>,
    do_center_crop: Option<bool>,
    do_rescale: Option<bool>,
    rescale_factor: Option<f64>,
    do_normalize: Option<bool>,
    image_mean: Option<Triple>,
    image_std: Option<Triple>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawSize {
    height: Option<usize>,
    width: Option<usize>,
    shortest_edge: Option<usize>,
}

/// Per-channel values, written as three numbers or one for all channels.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(untagged)]
enum Triple {
    Three([f32; 3]),
    One(f32),
}

impl Triple {
    fn get(self) -> [f32; 3] {
        match self {
            Triple::Three(t) => t,
            Triple::One(x) => [x; 3],
        }
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
    fn native_layout_reads_its_own_spellings() {
        let v = json!({
            "model_type": "florence2", "image_token_id": 51289,
            "text_config": {"d_model": 768, "eos_token_id": [2], "activation_function": "gelu_new"},
            "vision_config": {"embed_dim": [128, 256, 512, 1024], "max_temporal_embeddings": 7,
                              "max_position_embeddings": 9, "mlp_ratio": 2.0}
        });
        let c = Florence2Config::from_values(&v, None, ImageProcessorConfig::default()).unwrap();
        assert_eq!(c.config_layout, Layout::Native);
        assert_eq!(c.image_token_id, Some(51289));
        assert_eq!(c.text.activation, Activation::GeluTanh);
        assert_eq!(c.text.eos_token_id, 2);
        assert_eq!(
            (
                c.vision.max_temporal_embeddings,
                c.vision.max_position_embeddings
            ),
            (7, 9)
        );
        // only the original DaViT fixes the ratio at 4
        assert_eq!(c.vision.mlp_ratio, 2.0);
    }

    #[test]
    fn wrong_types_and_unknown_values_are_rejected() {
        for (field, value) in [
            ("depths", json!("1,1,9,1")),
            ("window_size", json!(-3)),
            ("activation_function", json!("swish")),
        ] {
            let mut v = original_base();
            v["vision_config"][field] = value;
            let e = Florence2Config::from_values(&v, None, ImageProcessorConfig::default())
                .unwrap_err();
            assert!(e.starts_with("config.json: "), "{field}: {e}");
        }
        let e = Florence2Config::from_values(
            &original_base(),
            Some(&json!({"early_stopping": "sometimes"})),
            ImageProcessorConfig::default(),
        )
        .unwrap_err();
        assert!(e.contains("early_stopping"), "{e}");
        assert!(ImageProcessorConfig::from_value(&json!({"image_mean": [0.5, 0.5]})).is_err());
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

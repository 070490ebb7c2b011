//! Florence-2 (DaViT vision tower, projector, BART language model, generation, processor),
//! numerically equal to transformers' `Florence2ForConditionalGeneration`.
//!
//! ```no_run
//! # use pawfect_models::florence2::{Florence2, Task};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let model = Florence2::load("/models", &candle_core::Device::Cpu, candle_core::DType::F32)?;
//! let image = image::open("crop.png")?.to_rgb8();
//! let gcfg = model.default_generation();
//! let caption = model.caption(&image, Task::DetailedCaption, &gcfg)?;
//! println!("{} {:?}", caption.text, caption.ids);
//! # Ok(()) }
//! ```
//!
//! `load` accepts the checkpoint folder or a root holding `Florence-2-base/`, in either layout:
//! the original remote-code checkpoint (`pytorch_model.bin` or safetensors with `vision_tower.*`,
//! `language_model.*` names, 51289 tokens, plain BART tokenizer) or the native transformers one
//! (`model.*` names, 51328 tokens, Florence tokens in `tokenizer.json`).

pub mod config;
pub mod generation;
pub mod language;
pub mod processor;
pub mod projector;
pub mod vision;
pub mod weights;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use image::RgbImage;

pub use config::{EarlyStopping, Florence2Config, GenerationConfig, Layout};
pub use processor::{FlorenceTokenizer, Task};

use generation::CachedDecoder;
use language::LanguageModel;
use projector::Projector;
use vision::VisionTower;

/// Hub repository of the model the worker uses.
pub const HUB_REPO: &str = "microsoft/Florence-2-base";

#[derive(Debug, thiserror::Error)]
pub enum Florence2Error {
    #[error("Florence-2 checkpoint {dir} is incomplete: missing {}", missing.join(", "))]
    MissingFiles { dir: PathBuf, missing: Vec<String> },
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing {path}: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("unsupported Florence-2 config {path}: {msg}")]
    Config { path: PathBuf, msg: String },
    #[error("Florence-2 weights {path}: {msg}")]
    Weights { path: PathBuf, msg: String },
    #[error("Florence-2 tokenizer: {0}")]
    Tokenizer(String),
    #[error("Florence-2 input: {0}")]
    Input(String),
    #[error("Florence-2 compute: {0}")]
    Candle(#[from] candle_core::Error),
}

/// A generated caption: the post-processed text and the generated ids (decoder start token first,
/// as transformers' `generate` returns them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caption {
    pub text: String,
    pub ids: Vec<u32>,
}

/// Florence-2 with its tokenizer and preprocessing, ready to caption.
pub struct Florence2 {
    vision: VisionTower,
    projector: Projector,
    lm: LanguageModel,
    tokenizer: FlorenceTokenizer,
    config: Florence2Config,
    layout: Layout,
    dir: PathBuf,
    device: Device,
    dtype: DType,
}

impl Florence2 {
    /// Loads a checkpoint from `path` (the folder, or a root with `Florence-2-base/`).
    pub fn load(
        path: impl AsRef<Path>,
        device: &Device,
        dtype: DType,
    ) -> Result<Self, Florence2Error> {
        let dir = weights::resolve_model_dir(path.as_ref())?;
        let files = weights::check_files(&dir)?;
        let config = Florence2Config::from_dir(&dir)?;
        let tokenizer = FlorenceTokenizer::from_dir(&dir)?;
        let (tensors, layout) = weights::to_native(weights::read_tensors(&files)?, &dir)?;
        let vb = VarBuilder::from_tensors(tensors, dtype, device);
        let werr = |e: candle_core::Error| Florence2Error::Weights {
            path: dir.clone(),
            msg: e.to_string(),
        };
        let vision = VisionTower::new(&config.vision, vb.pp("model.vision_tower")).map_err(werr)?;
        let projector =
            Projector::new(&config.vision, vb.pp("model.multi_modal_projector")).map_err(werr)?;
        let lm = LanguageModel::new(&config.text, vb.clone()).map_err(werr)?;
        if tokenizer.vocab_size() > config.text.vocab_size + 1 {
            // (+1: native tokenizers also hold <image>, which may sit just past an unpadded vocabulary)
            return Err(Florence2Error::Tokenizer(format!(
                "tokenizer has {} tokens but the model only {}",
                tokenizer.vocab_size(),
                config.text.vocab_size
            )));
        }
        Ok(Self {
            vision,
            projector,
            lm,
            tokenizer,
            config,
            layout,
            dir,
            device: device.clone(),
            dtype,
        })
    }

    pub fn config(&self) -> &Florence2Config {
        &self.config
    }

    /// The checkpoint's generation settings (base: beam 3, no-repeat 3, early stopping).
    pub fn default_generation(&self) -> GenerationConfig {
        self.config.generation.clone()
    }

    /// Layout of the loaded weights.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn tokenizer(&self) -> &FlorenceTokenizer {
        &self.tokenizer
    }

    /// Captions `image` with `task`.
    pub fn caption(
        &self,
        image: &RgbImage,
        task: Task,
        gcfg: &GenerationConfig,
    ) -> Result<Caption, Florence2Error> {
        let pixel_values = self.pixel_values(image)?;
        let encoder_out = self.encode_image(&pixel_values, task)?;
        let ids = self.generate_ids(&encoder_out, gcfg)?;
        let text = self.tokenizer.caption_text(&ids)?;
        Ok(Caption { text, ids })
    }

    /// Preprocessed image `[1, 3, H, W]` (f32).
    pub fn pixel_values(&self, image: &RgbImage) -> Result<Tensor, Florence2Error> {
        processor::preprocess(image, &self.config.image, &self.device)
    }

    /// Vision tower output `[B, H/32, W/32, C]` (channels-last) and, with `keep_stages`, every
    /// stage's output.
    pub fn vision_features(
        &self,
        pixel_values: &Tensor,
        keep_stages: bool,
    ) -> Result<(Tensor, Vec<Tensor>), Florence2Error> {
        let pv = pixel_values.to_device(&self.device)?.to_dtype(self.dtype)?;
        Ok(self.vision.forward_stages(&pv, keep_stages)?)
    }

    /// Projected image tokens `[B, 1 + H·W, d_model]`.
    pub fn image_tokens(&self, features: &Tensor) -> Result<Tensor, Florence2Error> {
        Ok(self.projector.forward(features)?)
    }

    /// Encoder input: image tokens followed by the embedded prompt ids.
    pub fn encoder_input(
        &self,
        image_tokens: &Tensor,
        prompt_ids: &[u32],
    ) -> Result<Tensor, Florence2Error> {
        let b = image_tokens.dim(0)?;
        let ids = Tensor::new(prompt_ids, &self.device)?
            .unsqueeze(0)?
            .repeat((b, 1))?;
        let text = self.lm.embed_tokens(&ids)?;
        Ok(Tensor::cat(&[image_tokens, &text], 1)?)
    }

    /// BART encoder output over `inputs_embeds`.
    pub fn encode(&self, inputs_embeds: &Tensor) -> Result<Tensor, Florence2Error> {
        Ok(self.lm.encode(inputs_embeds)?)
    }

    /// Pixel values and task → encoder output `[1, S, d_model]`.
    pub fn encode_image(
        &self,
        pixel_values: &Tensor,
        task: Task,
    ) -> Result<Tensor, Florence2Error> {
        let (features, _) = self.vision_features(pixel_values, false)?;
        let tokens = self.image_tokens(&features)?;
        let prompt = self.tokenizer.prompt_ids(task)?;
        self.encode(&self.encoder_input(&tokens, &prompt)?)
    }

    /// Decoder logits `[B, T, V]` (f32) for whole decoder sequences `ids` (`[B, T]`), causal.
    pub fn decoder_logits(
        &self,
        encoder_out: &Tensor,
        ids: &Tensor,
    ) -> Result<Tensor, Florence2Error> {
        let mut cache = self.lm.new_cache(encoder_out, ids.dim(0)?)?;
        let h = self.lm.decode(&ids.to_device(&self.device)?, &mut cache)?;
        Ok(self.lm.logits(&h)?.to_dtype(DType::F32)?)
    }

    /// Greedy (`num_beams == 1`) or beam-search decoding over one encoded image (`[1, S, D]`).
    pub fn generate_ids(
        &self,
        encoder_out: &Tensor,
        gcfg: &GenerationConfig,
    ) -> Result<Vec<u32>, Florence2Error> {
        if encoder_out.dim(0)? != 1 {
            return Err(Florence2Error::Input(
                "generation takes one image at a time".into(),
            ));
        }
        let mut dec = CachedDecoder::new(&self.lm, encoder_out, gcfg.num_beams.max(1))?;
        Ok(generation::generate(&mut dec, gcfg)?)
    }
}

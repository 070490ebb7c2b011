//! Configurations read from the checkpoint's own `config.json` files (diffusers layout), with the
//! FLUX.1-Fill-dev values as fallbacks for single-file checkpoints that carry no config.

use std::path::Path;

use serde::Deserialize;

use crate::error::{ModelError, Result};

pub(crate) fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::bad_file(path, e))?;
    serde_json::from_str(&text).map_err(|e| ModelError::bad_file(path, e))
}

/// `transformer/config.json` of `FluxTransformer2DModel`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct TransformerConfig {
    #[serde(default = "one")]
    pub patch_size: usize,
    pub in_channels: usize,
    #[serde(default)]
    pub out_channels: Option<usize>,
    pub num_layers: usize,
    pub num_single_layers: usize,
    pub attention_head_dim: usize,
    pub num_attention_heads: usize,
    pub joint_attention_dim: usize,
    pub pooled_projection_dim: usize,
    #[serde(default)]
    pub guidance_embeds: bool,
    #[serde(default = "default_axes")]
    pub axes_dims_rope: Vec<usize>,
    /// Not in diffusers' config (fixed at 4 there); inferred from the weights for single files.
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: f64,
    #[serde(default = "default_theta")]
    pub theta: f64,
}

fn one() -> usize {
    1
}
fn default_axes() -> Vec<usize> {
    vec![16, 56, 56]
}
fn default_mlp_ratio() -> f64 {
    4.0
}
fn default_theta() -> f64 {
    10_000.0
}

impl TransformerConfig {
    /// FLUX.1-Fill-dev (black-forest-labs/FLUX.1-Fill-dev `transformer/config.json`).
    pub fn fill_dev() -> Self {
        Self {
            patch_size: 1,
            in_channels: 384,
            out_channels: Some(64),
            num_layers: 19,
            num_single_layers: 38,
            attention_head_dim: 128,
            num_attention_heads: 24,
            joint_attention_dim: 4096,
            pooled_projection_dim: 768,
            guidance_embeds: true,
            axes_dims_rope: default_axes(),
            mlp_ratio: 4.0,
            theta: 10_000.0,
        }
    }

    pub fn hidden_size(&self) -> usize {
        self.attention_head_dim * self.num_attention_heads
    }
    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }
    pub fn mlp_hidden(&self) -> usize {
        (self.hidden_size() as f64 * self.mlp_ratio) as usize
    }

    pub fn validate(&self) -> Result<()> {
        let axes: usize = self.axes_dims_rope.iter().sum();
        if axes != self.attention_head_dim || self.axes_dims_rope.iter().any(|d| d % 2 != 0) {
            return Err(ModelError::Weights(format!(
                "axes_dims_rope {:?} must be even and sum to attention_head_dim {}",
                self.axes_dims_rope, self.attention_head_dim
            )));
        }
        if self.patch_size != 1 {
            return Err(ModelError::Weights(format!(
                "patch_size {} is not supported (FLUX uses 1)",
                self.patch_size
            )));
        }
        if self.axes_dims_rope.len() != 3 {
            return Err(ModelError::Weights(
                "axes_dims_rope must have 3 axes".into(),
            ));
        }
        Ok(())
    }
}

/// `vae/config.json` of `AutoencoderKL`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "three")]
    pub in_channels: usize,
    #[serde(default = "three")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "two")]
    pub layers_per_block: usize,
    pub latent_channels: usize,
    #[serde(default = "thirty_two")]
    pub norm_num_groups: usize,
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "default_sample_size")]
    pub sample_size: usize,
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
}

fn three() -> usize {
    3
}
fn two() -> usize {
    2
}
fn thirty_two() -> usize {
    32
}
fn default_sample_size() -> usize {
    1024
}
fn yes() -> bool {
    true
}

impl VaeConfig {
    /// The FLUX autoencoder (BFL `ae_params`, diffusers `vae/config.json`).
    pub fn flux() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            latent_channels: 16,
            norm_num_groups: 32,
            scaling_factor: 0.3611,
            shift_factor: Some(0.1159),
            sample_size: 1024,
            use_quant_conv: false,
            use_post_quant_conv: false,
            mid_block_add_attention: true,
        }
    }

    /// Pixels per latent along each axis (8 for FLUX).
    pub fn scale_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

/// `scheduler/scheduler_config.json` of `FlowMatchEulerDiscreteScheduler` (the fields FLUX uses).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct SchedulerConfig {
    #[serde(default = "default_train_steps")]
    pub num_train_timesteps: usize,
    #[serde(default = "default_shift")]
    pub shift: f64,
    #[serde(default = "yes")]
    pub use_dynamic_shifting: bool,
    #[serde(default = "default_base_shift")]
    pub base_shift: f64,
    #[serde(default = "default_max_shift")]
    pub max_shift: f64,
    #[serde(default = "default_base_seq")]
    pub base_image_seq_len: usize,
    #[serde(default = "default_max_seq")]
    pub max_image_seq_len: usize,
    #[serde(default = "default_shift_type")]
    pub time_shift_type: String,
}

fn default_train_steps() -> usize {
    1000
}
fn default_shift() -> f64 {
    3.0
}
fn default_base_shift() -> f64 {
    0.5
}
fn default_max_shift() -> f64 {
    1.15
}
fn default_base_seq() -> usize {
    256
}
fn default_max_seq() -> usize {
    4096
}
fn default_shift_type() -> String {
    "exponential".into()
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            shift: 3.0,
            use_dynamic_shifting: true,
            base_shift: 0.5,
            max_shift: 1.15,
            base_image_seq_len: 256,
            max_image_seq_len: 4096,
            time_shift_type: default_shift_type(),
        }
    }
}

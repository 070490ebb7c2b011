//! Image features → language-model tokens.
//!
//! 1. learned 2-D position: `x[h, w] += concat(column_emb[w], row_emb[h])`;
//! 2. cosine temporal embedding of frame 0 added to every token (one image = one frame);
//! 3. tokens = `[mean over all tokens; every token]` (spatial average pool first, then the
//!    temporal average pool, which is the identity for one frame) → `1 + H·W` tokens;
//! 4. `Linear(C → d_model, no bias)`, then LayerNorm.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Embedding, LayerNorm, Linear, VarBuilder};

use super::config::VisionConfig;
use super::vision::layer_norm;

pub struct Projector {
    row: Embedding,
    column: Embedding,
    /// Row 0 of the temporal table (`[C]`).
    temporal0: Tensor,
    projection: Linear,
    norm: LayerNorm,
    max_pos: usize,
}

impl Projector {
    /// `vb` points at `model.multi_modal_projector`.
    pub fn new(cfg: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        let c = *cfg
            .embed_dim
            .last()
            .ok_or_else(|| candle_core::Error::Msg("no vision stages".into()))?;
        let max_pos = cfg.max_position_embeddings;
        let row =
            candle_nn::embedding(max_pos, c / 2, vb.pp("image_position_embed.row_embeddings"))?;
        let column = candle_nn::embedding(
            max_pos,
            c - c / 2,
            vb.pp("image_position_embed.column_embeddings"),
        )?;
        let tvb = vb.pp("visual_temporal_embed");
        let temporal0 = if tvb.contains_tensor("pos_idx_to_embed") {
            tvb.get((cfg.max_temporal_embeddings, c), "pos_idx_to_embed")?
                .get(0)?
        } else {
            // sin(0) = 0 on even channels, cos(0) = 1 on odd channels.
            let v: Vec<f32> = (0..c).map(|i| if i % 2 == 1 { 1.0 } else { 0.0 }).collect();
            Tensor::from_vec(v, c, vb.device())?.to_dtype(vb.dtype())?
        };
        let projection =
            candle_nn::linear_no_bias(c, cfg.projection_dim, vb.pp("image_projection"))?;
        let norm = layer_norm(cfg.projection_dim, vb.pp("image_proj_norm"))?;
        Ok(Self {
            row,
            column,
            temporal0,
            projection,
            norm,
            max_pos,
        })
    }

    /// Channels-last features `[B, H, W, C]` → image tokens `[B, 1 + H·W, d_model]`.
    pub fn forward(&self, features: &Tensor) -> Result<Tensor> {
        let (b, h, w, c) = features.dims4()?;
        if h > self.max_pos || w > self.max_pos {
            candle_core::bail!(
                "image feature map {h}×{w} exceeds the {m}×{m} position table (input image too large)",
                m = self.max_pos
            );
        }
        let dev = features.device();
        let cols = self.column.forward(&Tensor::arange(0u32, w as u32, dev)?)?; // [W, C - C/2]
        let rows = self.row.forward(&Tensor::arange(0u32, h as u32, dev)?)?; // [H, C/2]
        let pos = Tensor::cat(
            &[
                cols.unsqueeze(0)?.broadcast_as((h, w, c - c / 2))?,
                rows.unsqueeze(1)?.broadcast_as((h, w, c / 2))?,
            ],
            2,
        )?;
        let x = features.broadcast_add(&pos)?.reshape((b, h * w, c))?;
        let x = x.broadcast_add(&self.temporal0)?;
        let pooled = mean_tokens(&x)?;
        let tokens = Tensor::cat(&[pooled, x], 1)?;
        let p = crate::accounting::nn_linear(&self.projection, &tokens)?;
        Ok(crate::accounting::ew(&[&p], self.norm.forward(&p)?))
    }
}

/// Mean over the token axis of `[B, N, C]`, accumulated in f32.
fn mean_tokens(x: &Tensor) -> Result<Tensor> {
    x.to_dtype(DType::F32)?.mean_keepdim(1)?.to_dtype(x.dtype())
}

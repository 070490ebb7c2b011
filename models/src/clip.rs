//! CLIP text tower (FLUX's `text_encoder`), written from transformers' `CLIPTextModel`: learned
//! positions, pre-LN causal transformer, final LayerNorm, pooled output at the end-of-text token
//! (transformers' rule: with the legacy `eos_token_id == 2` the position of the largest id, else
//! the first `eos_token_id`). FLUX uses only the pooled output.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, LayerNorm, Linear, VarBuilder};
use pawfect_kernels as k;
use serde::Deserialize;

use crate::accounting::{self as acct, ew, nn_linear};
use crate::error::{ModelError, Result};

/// `text_encoder/config.json`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "quick_gelu")]
    pub hidden_act: String,
    #[serde(default = "ln_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "eos")]
    pub eos_token_id: u32,
}

fn quick_gelu() -> String {
    "quick_gelu".into()
}
fn ln_eps() -> f64 {
    1e-5
}
fn eos() -> u32 {
    2
}

impl ClipTextConfig {
    /// openai/clip-vit-large-patch14 text tower (FLUX `text_encoder`).
    pub fn vit_l_14() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            max_position_embeddings: 77,
            hidden_act: quick_gelu(),
            layer_norm_eps: 1e-5,
            eos_token_id: 2,
        }
    }
}

struct Layer {
    ln1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

/// The CLIP text transformer.
pub struct ClipTextModel {
    cfg: ClipTextConfig,
    token: Embedding,
    position: Tensor,
    layers: Vec<Layer>,
    final_ln: LayerNorm,
    device: Device,
    dtype: DType,
}

impl ClipTextModel {
    /// `vb` at the checkpoint root (tensors under `text_model.` or at the root).
    pub fn load(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        match cfg.hidden_act.as_str() {
            "quick_gelu" | "gelu" => {}
            o => {
                return Err(ModelError::Weights(format!(
                    "unsupported CLIP hidden_act {o}"
                )));
            }
        }
        // transformers < 5 saved the tower under `text_model.`; 5.x saves it at the root.
        let vb = if vb.contains_tensor("text_model.embeddings.token_embedding.weight") {
            vb.pp("text_model")
        } else {
            vb
        };
        let d = cfg.hidden_size;
        let emb = vb.pp("embeddings");
        let token = candle_nn::embedding(cfg.vocab_size, d, emb.pp("token_embedding"))?;
        let position = emb
            .pp("position_embedding")
            .get((cfg.max_position_embeddings, d), "weight")?;
        let ln = |vb: VarBuilder| -> Result<LayerNorm> {
            Ok(candle_nn::layer_norm(d, cfg.layer_norm_eps, vb)?)
        };
        let lin = |i: usize, o: usize, vb: VarBuilder| -> Result<Linear> {
            Ok(candle_nn::linear(i, o, vb)?)
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let l = vb.pp(format!("encoder.layers.{i}"));
                Ok(Layer {
                    ln1: ln(l.pp("layer_norm1"))?,
                    q: lin(d, d, l.pp("self_attn.q_proj"))?,
                    k: lin(d, d, l.pp("self_attn.k_proj"))?,
                    v: lin(d, d, l.pp("self_attn.v_proj"))?,
                    out: lin(d, d, l.pp("self_attn.out_proj"))?,
                    ln2: ln(l.pp("layer_norm2"))?,
                    fc1: lin(d, cfg.intermediate_size, l.pp("mlp.fc1"))?,
                    fc2: lin(cfg.intermediate_size, d, l.pp("mlp.fc2"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg: cfg.clone(),
            token,
            position,
            layers,
            final_ln: ln(vb.pp("final_layer_norm"))?,
            device: vb.device().clone(),
            dtype: vb.dtype(),
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The MLP activation, counted as one memory-bound op.
    fn act(&self, x: &Tensor) -> Result<Tensor> {
        let y = match self.cfg.hidden_act.as_str() {
            "gelu" => x.gelu_erf()?,
            _ => (x * candle_nn::ops::sigmoid(&(x * 1.702)?)?)?,
        };
        Ok(ew(&[x], y))
    }

    /// Final-LayerNorm hidden states `[B, S, D]` for ids `[B, S]`.
    pub fn last_hidden(&self, ids: &Tensor) -> Result<Tensor> {
        let ids = ids.to_device(&self.device)?;
        let (b, s) = ids.dims2()?;
        if s > self.cfg.max_position_embeddings {
            return Err(ModelError::InvalidInput(format!(
                "{s} CLIP tokens > {}",
                self.cfg.max_position_embeddings
            )));
        }
        let (d, h) = (self.cfg.hidden_size, self.cfg.num_attention_heads);
        let hd = d / h;
        let tok = self.token.forward(&ids)?;
        let pos = self.position.narrow(0, 0, s)?;
        let mut x = ew(&[&tok, &pos], tok.broadcast_add(&pos)?);
        for l in &self.layers {
            let n = ew(&[&x], l.ln1.forward(&x)?);
            let heads = |lin: &Linear| -> Result<Tensor> {
                Ok(nn_linear(lin, &n)?
                    .reshape((b, s, h, hd))?
                    .transpose(1, 2)?
                    .contiguous()?)
            };
            acct::attention(b, h, s, s, hd);
            let a = k::attention(
                &heads(&l.q)?,
                &heads(&l.k)?,
                &heads(&l.v)?,
                1.0 / (hd as f64).sqrt(),
                true,
            )?;
            let a = a.transpose(1, 2)?.reshape((b, s, d))?;
            let o = nn_linear(&l.out, &a)?;
            x = ew(&[&x, &o], (&x + &o)?);
            let n = ew(&[&x], l.ln2.forward(&x)?);
            let m = nn_linear(&l.fc2, &self.act(&nn_linear(&l.fc1, &n)?)?)?;
            x = ew(&[&x, &m], (&x + &m)?);
        }
        Ok(ew(&[&x], self.final_ln.forward(&x)?))
    }

    /// Index of the pooled token for each row of `ids`.
    pub fn pooled_index(&self, ids: &[u32]) -> usize {
        if self.cfg.eos_token_id == 2 {
            // argmax, first occurrence
            let mut best = 0;
            for (i, &v) in ids.iter().enumerate() {
                if v > ids[best] {
                    best = i;
                }
            }
            best
        } else {
            ids.iter()
                .position(|&v| v == self.cfg.eos_token_id)
                .unwrap_or(0)
        }
    }

    /// Pooled output `[B, D]` (f32) for ids `[B, S]`.
    pub fn pooled(&self, ids: &Tensor) -> Result<Tensor> {
        let hidden = self.last_hidden(ids)?;
        let rows = ids.to_dtype(DType::U32)?.to_vec2::<u32>()?;
        let picked = rows
            .iter()
            .enumerate()
            .map(|(b, r)| Ok(hidden.get(b)?.get(self.pooled_index(r))?))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::stack(&picked, 0)?.to_dtype(DType::F32)?)
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }
}

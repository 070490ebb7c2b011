//! BART encoder/decoder (post-LN) with a KV cache, as Florence-2's language model.
//!
//! * embeddings: `shared` (× `sqrt(d)` only with `scale_embedding`), learned positions with
//!   offset 2, then `layernorm_embedding`;
//! * encoder layer: `h = LN(h + SelfAttn(h)); h = LN(h + FFN(h))`;
//! * decoder layer: `h = LN(h + CausalSelfAttn(h)); h = LN(h + CrossAttn(h, enc)); h = LN(h + FFN(h))`;
//! * LM head tied to `shared` unless `lm_head.weight` exists; `final_logits_bias` added when the
//!   checkpoint has it.

use candle_core::{D, DType, IndexOp, Module, Result, Tensor};
use candle_nn::{Embedding, LayerNorm, Linear, VarBuilder};

use super::config::{Activation, TextConfig};
use super::vision::{activate, layer_norm};
use crate::accounting::{self as acct, ew, nn_linear};

/// Positions are looked up at `position + 2` (BART's learned-position offset).
const POSITION_OFFSET: usize = 2;
/// transformers clamps fp16 encoder activations to ±(65504 − 1000).
const F16_CLAMP: f64 = 65504.0 - 1000.0;

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(d: usize, heads: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            q: candle_nn::linear(d, d, vb.pp("q_proj"))?,
            k: candle_nn::linear(d, d, vb.pp("k_proj"))?,
            v: candle_nn::linear(d, d, vb.pp("v_proj"))?,
            out: candle_nn::linear(d, d, vb.pp("out_proj"))?,
            heads,
            head_dim: d / heads,
        })
    }

    /// `[B, T, D]` → `[B, H, T, hd]`.
    fn split(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        x.reshape((b, t, self.heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()
    }

    fn kv(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((
            self.split(&nn_linear(&self.k, x)?)?,
            self.split(&nn_linear(&self.v, x)?)?,
        ))
    }

    /// Attends `x` (`[B, T, D]`) to keys/values `[B, H, S, hd]`.
    fn attend(&self, x: &Tensor, k: &Tensor, v: &Tensor, causal: bool) -> Result<Tensor> {
        let q = self.split(&nn_linear(&self.q, x)?)?;
        let (b, h, t, d) = q.dims4()?;
        acct::attention(b, h, t, k.dim(2)?, d);
        let scale = (self.head_dim as f64).powf(-0.5);
        // `[B, T, H·hd]` straight from the kernel (no transpose copy on CUDA).
        let o = pawfect_kernels::attention_merged_heads(&q, k, v, scale, causal)?;
        nn_linear(&self.out, &o)
    }
}

/// `norm(a + b)` (`b` broadcast), the add and the norm counted as one memory-bound op each.
fn add_norm(norm: &LayerNorm, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let s = ew(&[a, b], a.broadcast_add(b)?);
    Ok(ew(&[&s], norm.forward(&s)?))
}

struct FeedForward {
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl FeedForward {
    fn new(d: usize, ffn: usize, act: Activation, vb: &VarBuilder) -> Result<Self> {
        Ok(Self {
            fc1: candle_nn::linear(d, ffn, vb.pp("fc1"))?,
            fc2: candle_nn::linear(ffn, d, vb.pp("fc2"))?,
            act,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = nn_linear(&self.fc1, x)?;
        nn_linear(&self.fc2, &ew(&[&h], activate(&h, self.act)?))
    }
}

struct EncoderLayer {
    self_attn: Attention,
    self_attn_layer_norm: LayerNorm,
    ffn: FeedForward,
    final_layer_norm: LayerNorm,
}

impl EncoderLayer {
    fn new(cfg: &TextConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.d_model;
        Ok(Self {
            self_attn: Attention::new(d, cfg.encoder_attention_heads, vb.pp("self_attn"))?,
            self_attn_layer_norm: layer_norm(d, vb.pp("self_attn_layer_norm"))?,
            ffn: FeedForward::new(d, cfg.encoder_ffn_dim, cfg.activation, &vb)?,
            final_layer_norm: layer_norm(d, vb.pp("final_layer_norm"))?,
        })
    }

    fn forward(&self, h: &Tensor) -> Result<Tensor> {
        let (k, v) = self.self_attn.kv(h)?;
        let a = self.self_attn.attend(h, &k, &v, false)?;
        let h = add_norm(&self.self_attn_layer_norm, h, &a)?;
        let f = self.ffn.forward(&h)?;
        let h = add_norm(&self.final_layer_norm, &h, &f)?;
        if h.dtype() == DType::F16 {
            h.clamp(-F16_CLAMP, F16_CLAMP)
        } else {
            Ok(h)
        }
    }
}

struct DecoderLayer {
    self_attn: Attention,
    self_attn_layer_norm: LayerNorm,
    encoder_attn: Attention,
    encoder_attn_layer_norm: LayerNorm,
    ffn: FeedForward,
    final_layer_norm: LayerNorm,
}

impl DecoderLayer {
    fn new(cfg: &TextConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.d_model;
        let heads = cfg.decoder_attention_heads;
        Ok(Self {
            self_attn: Attention::new(d, heads, vb.pp("self_attn"))?,
            self_attn_layer_norm: layer_norm(d, vb.pp("self_attn_layer_norm"))?,
            encoder_attn: Attention::new(d, heads, vb.pp("encoder_attn"))?,
            encoder_attn_layer_norm: layer_norm(d, vb.pp("encoder_attn_layer_norm"))?,
            ffn: FeedForward::new(d, cfg.decoder_ffn_dim, cfg.activation, &vb)?,
            final_layer_norm: layer_norm(d, vb.pp("final_layer_norm"))?,
        })
    }

    fn forward(&self, h: &Tensor, cache: &mut LayerCache) -> Result<Tensor> {
        let (k, v) = self.self_attn.kv(h)?;
        let (k, v) = match cache.self_kv.take() {
            Some((pk, pv)) => (
                ew(&[&pk, &k], Tensor::cat(&[&pk, &k], 2)?),
                ew(&[&pv, &v], Tensor::cat(&[&pv, &v], 2)?),
            ),
            None => (k, v),
        };
        let causal = h.dim(1)? > 1;
        let a = self.self_attn.attend(h, &k, &v, causal)?;
        cache.self_kv = Some((k, v));
        let h = add_norm(&self.self_attn_layer_norm, h, &a)?;
        let c = self
            .encoder_attn
            .attend(&h, &cache.cross_k, &cache.cross_v, false)?;
        let h = add_norm(&self.encoder_attn_layer_norm, &h, &c)?;
        let f = self.ffn.forward(&h)?;
        add_norm(&self.final_layer_norm, &h, &f)
    }
}

/// Per decoder layer: the growing self-attention keys/values and the fixed cross-attention ones.
struct LayerCache {
    self_kv: Option<(Tensor, Tensor)>,
    cross_k: Tensor,
    cross_v: Tensor,
}

/// Decoder state of a batch of sequences (beams): KV caches and the number of tokens seen.
pub struct DecoderCache {
    layers: Vec<LayerCache>,
    len: usize,
}

impl DecoderCache {
    /// Number of decoder positions already processed.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Keeps row `idx[i]` of the self-attention caches as row `i` (beam reordering). The
    /// cross-attention caches are identical for every beam of one image and stay as they are.
    pub fn reorder(&mut self, idx: &[u32]) -> Result<()> {
        let Some(first) = self.layers.first() else {
            return Ok(());
        };
        let idx = Tensor::new(idx, first.cross_k.device())?;
        for l in &mut self.layers {
            if let Some((k, v)) = l.self_kv.take() {
                l.self_kv = Some((k.index_select(&idx, 0)?, v.index_select(&idx, 0)?));
            }
        }
        Ok(())
    }
}

pub struct LanguageModel {
    shared: Embedding,
    embed_scale: f64,
    enc_positions: Embedding,
    enc_ln: LayerNorm,
    enc_layers: Vec<EncoderLayer>,
    dec_positions: Embedding,
    dec_ln: LayerNorm,
    dec_layers: Vec<DecoderLayer>,
    lm_head: Tensor,
    final_logits_bias: Option<Tensor>,
    max_positions: usize,
    vocab_size: usize,
}

impl LanguageModel {
    /// `vb` is the checkpoint root (native names: `model.language_model.*`, `lm_head.*`,
    /// `final_logits_bias`).
    pub fn new(cfg: &TextConfig, vb: VarBuilder) -> Result<Self> {
        let lm = vb.pp("model.language_model");
        let d = cfg.d_model;
        let shared = candle_nn::embedding(cfg.vocab_size, d, lm.pp("shared"))?;
        let npos = cfg.max_position_embeddings + POSITION_OFFSET;
        let enc = lm.pp("encoder");
        let dec = lm.pp("decoder");
        let enc_layers = (0..cfg.encoder_layers)
            .map(|i| EncoderLayer::new(cfg, enc.pp(format!("layers.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        let dec_layers = (0..cfg.decoder_layers)
            .map(|i| DecoderLayer::new(cfg, dec.pp(format!("layers.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        let lm_head = if vb.contains_tensor("lm_head.weight") {
            vb.get((cfg.vocab_size, d), "lm_head.weight")?
        } else {
            shared.embeddings().clone()
        };
        let final_logits_bias = if vb.contains_tensor("final_logits_bias") {
            Some(
                vb.get((1, cfg.vocab_size), "final_logits_bias")?
                    .reshape(cfg.vocab_size)?,
            )
        } else {
            None
        };
        Ok(Self {
            shared,
            embed_scale: if cfg.scale_embedding {
                (d as f64).sqrt()
            } else {
                1.0
            },
            enc_positions: candle_nn::embedding(npos, d, enc.pp("embed_positions"))?,
            enc_ln: layer_norm(d, enc.pp("layernorm_embedding"))?,
            enc_layers,
            dec_positions: candle_nn::embedding(npos, d, dec.pp("embed_positions"))?,
            dec_ln: layer_norm(d, dec.pp("layernorm_embedding"))?,
            dec_layers,
            lm_head,
            final_logits_bias,
            max_positions: cfg.max_position_embeddings,
            vocab_size: cfg.vocab_size,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Token embeddings `[B, T] → [B, T, D]` (the encoder's text input).
    pub fn embed_tokens(&self, ids: &Tensor) -> Result<Tensor> {
        let e = self.shared.forward(ids)?;
        if self.embed_scale != 1.0 {
            e * self.embed_scale
        } else {
            Ok(e)
        }
    }

    fn positions(
        &self,
        table: &Embedding,
        start: usize,
        len: usize,
        like: &Tensor,
    ) -> Result<Tensor> {
        if start + len > self.max_positions {
            candle_core::bail!(
                "sequence of {} positions exceeds max_position_embeddings {}",
                start + len,
                self.max_positions
            );
        }
        let first = (start + POSITION_OFFSET) as u32;
        let idx = Tensor::arange(first, first + len as u32, like.device())?;
        table.forward(&idx)?.to_dtype(like.dtype())
    }

    /// Encoder over input embeddings `[B, S, D]` (image tokens then prompt tokens).
    pub fn encode(&self, inputs_embeds: &Tensor) -> Result<Tensor> {
        let s = inputs_embeds.dim(1)?;
        let pos = self.positions(&self.enc_positions, 0, s, inputs_embeds)?;
        let mut h = add_norm(&self.enc_ln, inputs_embeds, &pos)?;
        for layer in &self.enc_layers {
            h = layer.forward(&h)?;
        }
        Ok(h)
    }

    /// A fresh decoder cache for `batch` sequences attending to `encoder_out` (`[1 or batch, S, D]`).
    pub fn new_cache(&self, encoder_out: &Tensor, batch: usize) -> Result<DecoderCache> {
        let enc = match encoder_out.dim(0)? {
            1 if batch > 1 => encoder_out.repeat((batch, 1, 1))?,
            n if n == batch => encoder_out.clone(),
            n => candle_core::bail!("encoder batch {n} does not match decoder batch {batch}"),
        };
        let layers = self
            .dec_layers
            .iter()
            .map(|l| {
                let (cross_k, cross_v) = l.encoder_attn.kv(&enc)?;
                Ok(LayerCache {
                    self_kv: None,
                    cross_k,
                    cross_v,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(DecoderCache { layers, len: 0 })
    }

    /// Runs the decoder on `ids` (`[B, T]`, the next T tokens of every sequence) and returns the
    /// decoder output `[B, T, D]`, extending the cache.
    pub fn decode(&self, ids: &Tensor, cache: &mut DecoderCache) -> Result<Tensor> {
        let t = ids.dim(1)?;
        let e = self.embed_tokens(ids)?;
        let pos = self.positions(&self.dec_positions, cache.len, t, &e)?;
        let mut h = add_norm(&self.dec_ln, &e, &pos)?;
        for (layer, lc) in self.dec_layers.iter().zip(cache.layers.iter_mut()) {
            h = layer.forward(&h, lc)?;
        }
        cache.len += t;
        Ok(h)
    }

    /// LM head: `[.., D]` → logits `[.., V]`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let mut dims = hidden.dims().to_vec();
        let d = dims.pop().unwrap_or(0);
        let rows = hidden.elem_count() / d.max(1);
        acct::gemm(rows, self.vocab_size, d);
        let logits = hidden.reshape((rows, d))?.matmul(&self.lm_head.t()?)?;
        dims.push(self.vocab_size);
        let logits = logits.reshape(dims)?;
        match &self.final_logits_bias {
            Some(b) => logits.broadcast_add(b),
            None => Ok(logits),
        }
    }

    /// Logits of the last position of every sequence as f32 `[B, V]`.
    pub fn last_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let t = hidden.dim(1)?;
        self.logits(&hidden.i((.., t - 1, ..))?.contiguous()?)?
            .to_dtype(DType::F32)
    }

    /// Width of the model (d_model), from the embedding table.
    pub fn hidden_size(&self) -> Result<usize> {
        self.shared.embeddings().dim(D::Minus1)
    }
}

//! T5 v1.1 encoder (FLUX's `text_encoder_2`), written from transformers' `T5EncoderModel`: RMS
//! layer norms, relative position bias (bidirectional buckets) from layer 0 shared by all layers,
//! unscaled attention, gated-GELU feed-forward; no attention mask (FLUX passes none).
//!
//! Weights from safetensors (HF names) or GGUF (HF names or llama.cpp `enc.blk.N.*` names).
//! With f16/bf16 weights the residual stream, attention scores and the `wo` projection run in f32
//! (transformers keeps `wo` in f32 for fp16 for the same reason: T5-XXL activations overflow f16).

use candle_core::{D, DType, Device, Tensor};
use serde::Deserialize;

use crate::accounting::{self as acct, ew};
use crate::checkpoint::{Linear, LinearOpts, WeightStore};
use crate::error::{ModelError, Result};

/// `text_encoder_2/config.json` (the fields the encoder needs).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct T5Config {
    pub vocab_size: usize,
    pub d_model: usize,
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    #[serde(default = "buckets")]
    pub relative_attention_num_buckets: usize,
    #[serde(default = "max_distance")]
    pub relative_attention_max_distance: usize,
    #[serde(default = "eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "ff_proj")]
    pub feed_forward_proj: String,
}

fn buckets() -> usize {
    32
}
fn max_distance() -> usize {
    128
}
fn eps() -> f64 {
    1e-6
}
fn ff_proj() -> String {
    "gated-gelu".into()
}

impl T5Config {
    /// google/t5-v1_1-xxl (FLUX `text_encoder_2`).
    pub fn v1_1_xxl() -> Self {
        Self {
            vocab_size: 32128,
            d_model: 4096,
            d_kv: 64,
            d_ff: 10240,
            num_layers: 24,
            num_heads: 64,
            relative_attention_num_buckets: 32,
            relative_attention_max_distance: 128,
            layer_norm_epsilon: 1e-6,
            feed_forward_proj: "gated-gelu".into(),
        }
    }

    fn act(&self) -> Result<(bool, Act)> {
        let (gated, act) = match self.feed_forward_proj.strip_prefix("gated-") {
            Some(a) => (true, a),
            None => (false, self.feed_forward_proj.as_str()),
        };
        let act = match act {
            "gelu" | "gelu_new" => Act::GeluTanh,
            "relu" => Act::Relu,
            "silu" => Act::Silu,
            o => {
                return Err(ModelError::Weights(format!(
                    "unsupported T5 feed_forward_proj activation {o}"
                )));
            }
        };
        Ok((gated, act))
    }
}

#[derive(Debug, Clone, Copy)]
enum Act {
    GeluTanh,
    Relu,
    Silu,
}

/// Tensor naming of a T5 checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Names {
    Hf,
    LlamaCpp,
}

impl Names {
    fn embed(self, store: &dyn WeightStore) -> String {
        match self {
            Names::LlamaCpp => "token_embd.weight".into(),
            Names::Hf => ["shared.weight", "encoder.embed_tokens.weight"]
                .into_iter()
                .find(|n| store.contains(n))
                .unwrap_or("shared.weight")
                .into(),
        }
    }
    fn block(self, i: usize, part: &str) -> String {
        match self {
            Names::Hf => {
                let p = format!("encoder.block.{i}.layer");
                match part {
                    "q" | "k" | "v" | "o" => format!("{p}.0.SelfAttention.{part}"),
                    "rel" => format!("{p}.0.SelfAttention.relative_attention_bias"),
                    "attn_norm" => format!("{p}.0.layer_norm"),
                    "ffn_norm" => format!("{p}.1.layer_norm"),
                    "wi_0" | "wi_1" | "wo" => format!("{p}.1.DenseReluDense.{part}"),
                    "wi" => format!("{p}.1.DenseReluDense.wi"),
                    _ => part.into(),
                }
            }
            Names::LlamaCpp => {
                let p = format!("enc.blk.{i}");
                let s = match part {
                    "q" => "attn_q",
                    "k" => "attn_k",
                    "v" => "attn_v",
                    "o" => "attn_o",
                    "rel" => "attn_rel_b",
                    "attn_norm" => "attn_norm",
                    "ffn_norm" => "ffn_norm",
                    "wi_0" => "ffn_gate",
                    "wi_1" | "wi" => "ffn_up",
                    "wo" => "ffn_down",
                    _ => part,
                };
                format!("{p}.{s}")
            }
        }
    }
    fn final_norm(self) -> &'static str {
        match self {
            Names::Hf => "encoder.final_layer_norm.weight",
            Names::LlamaCpp => "enc.output_norm.weight",
        }
    }
}

struct Block {
    attn_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ffn_norm: Tensor,
    wi_0: Linear,
    wi_1: Option<Linear>,
    wo: Linear,
}

/// The T5 encoder stack.
pub struct T5Encoder {
    cfg: T5Config,
    embed: Tensor,
    rel_bias: Tensor,
    blocks: Vec<Block>,
    final_norm: Tensor,
    dtype: DType,
    device: Device,
    act: Act,
}

/// transformers `_relative_position_bucket` (bidirectional), computed in f32 like torch.
pub fn relative_position_bucket(rel: i64, num_buckets: usize, max_distance: usize) -> usize {
    let nb = (num_buckets / 2) as i64;
    let mut ret = if rel > 0 { nb } else { 0 };
    let n = rel.abs();
    let max_exact = nb / 2;
    if n < max_exact {
        ret += n;
    } else {
        let ratio = (n as f32 / max_exact as f32).ln()
            / ((max_distance as f64 / max_exact as f64).ln() as f32);
        let large = max_exact + (ratio * (nb - max_exact) as f32) as i64;
        ret += large.min(nb - 1);
    }
    ret as usize
}

impl T5Encoder {
    /// Loads from a store; `dtype` is the weight/compute dtype of the linears.
    pub fn load(
        store: &dyn WeightStore,
        cfg: &T5Config,
        dtype: DType,
        opts: LinearOpts,
    ) -> Result<Self> {
        let names = if store.contains("enc.blk.0.attn_q.weight") {
            Names::LlamaCpp
        } else {
            Names::Hf
        };
        let (gated, act) = cfg.act()?;
        let (dm, inner, ff) = (cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.d_ff);
        let o = LinearOpts { dtype, ..opts };
        let lin = |n: String, out: usize, inp: usize| Linear::load(store, &n, out, inp, false, o);
        let vector = |n: String| store.get(&n, &[dm], DType::F32);
        let mut blocks = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let b = |p: &str| names.block(i, p);
            let (wi_0, wi_1) = if gated {
                (lin(b("wi_0"), ff, dm)?, Some(lin(b("wi_1"), ff, dm)?))
            } else {
                (lin(b("wi"), ff, dm)?, None)
            };
            blocks.push(Block {
                attn_norm: vector(format!("{}.weight", b("attn_norm")))?,
                q: lin(b("q"), inner, dm)?,
                k: lin(b("k"), inner, dm)?,
                v: lin(b("v"), inner, dm)?,
                o: lin(b("o"), dm, inner)?,
                ffn_norm: vector(format!("{}.weight", b("ffn_norm")))?,
                wi_0,
                wi_1,
                wo: lin(b("wo"), dm, ff)?,
            });
        }
        let rel_name = format!("{}.weight", names.block(0, "rel"));
        let nb = cfg.relative_attention_num_buckets;
        let rel_bias = match store.shape(&rel_name) {
            Some(s) if s == [nb, cfg.num_heads] => store.dense(&rel_name, DType::F32)?,
            Some(s) if s == [cfg.num_heads, nb] => {
                store.dense(&rel_name, DType::F32)?.t()?.contiguous()?
            }
            Some(s) => {
                return Err(ModelError::Weights(format!(
                    "{rel_name} has shape {s:?}, expected [{nb}, {}]",
                    cfg.num_heads
                )));
            }
            None => return Err(store.missing(&rel_name)),
        };
        let embed_name = names.embed(store);
        let embed = store
            .get(&embed_name, &[cfg.vocab_size, dm], dtype)
            .or_else(|e| {
                // Some exports pad or trim the vocabulary: accept any row count covering the tokenizer.
                match store.shape(&embed_name) {
                    Some(s) if s.len() == 2 && s[1] == dm => store.dense(&embed_name, dtype),
                    _ => Err(e),
                }
            })?;
        Ok(Self {
            cfg: cfg.clone(),
            embed,
            rel_bias,
            blocks,
            final_norm: vector(names.final_norm().to_string())?,
            dtype,
            device: store.device().clone(),
            act,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// `[1, heads, S, S]` f32.
    fn position_bias(&self, s: usize) -> Result<Tensor> {
        let nb = self.cfg.relative_attention_num_buckets;
        let md = self.cfg.relative_attention_max_distance;
        let idx: Vec<u32> = (0..s)
            .flat_map(|q| {
                (0..s).map(move |k| relative_position_bucket(k as i64 - q as i64, nb, md) as u32)
            })
            .collect();
        let idx = Tensor::from_vec(idx, s * s, &self.device)?;
        let vals = self.rel_bias.index_select(&idx, 0)?; // [S*S, H]
        Ok(vals
            .reshape((s, s, self.cfg.num_heads))?
            .permute((2, 0, 1))?
            .unsqueeze(0)?
            .contiguous()?)
    }

    /// T5 layer norm: `w · x / sqrt(mean(x²) + eps)` in f32 (f32 out).
    fn norm_f32(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        let var = x.sqr()?.mean_keepdim(D::Minus1)?;
        let n = x.broadcast_div(&(var + self.cfg.layer_norm_epsilon)?.sqrt()?)?;
        Ok(n.broadcast_mul(w)?)
    }

    /// The layer norm cast to the model dtype (clamped into the f16 range for f16); counted as
    /// one memory-bound op.
    fn norm(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        let n = self.norm_f32(x, w)?;
        let n = if self.dtype == DType::F16 {
            n.clamp(-65504f32, 65504f32)?
        } else {
            n
        };
        Ok(ew(&[x, w], n.to_dtype(self.dtype)?))
    }

    fn act(&self, x: &Tensor) -> Result<Tensor> {
        let y = match self.act {
            Act::GeluTanh => x.gelu()?,
            Act::Relu => x.relu()?,
            Act::Silu => x.silu()?,
        };
        Ok(ew(&[x], y))
    }

    /// Last hidden state `[B, S, d_model]` (in the model dtype) for token ids `[B, S]`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let ids = ids.to_device(&self.device)?;
        let (b, s) = ids.dims2()?;
        let (h, dk) = (self.cfg.num_heads, self.cfg.d_kv);
        let mut x = self
            .embed
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, s, self.cfg.d_model))?
            .to_dtype(DType::F32)?;
        let bias = self.position_bias(s)?;
        for blk in &self.blocks {
            let n = self.norm(&x, &blk.attn_norm)?;
            let heads = |l: &Linear| -> Result<Tensor> {
                Ok(l.forward(&n)?
                    .reshape((b, s, h, dk))?
                    .transpose(1, 2)?
                    .to_dtype(DType::F32)?
                    .contiguous()?)
            };
            let (q, k, v) = (heads(&blk.q)?, heads(&blk.k)?, heads(&blk.v)?);
            acct::attention(b, h, s, s, dk);
            let qk = q.matmul(&k.t()?)?;
            let scores = ew(&[&qk, &bias], qk.broadcast_add(&bias)?);
            let p = ew(
                &[&scores],
                candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(self.dtype)?,
            );
            let a = p
                .matmul(&v.to_dtype(self.dtype)?)?
                .transpose(1, 2)?
                .reshape((b, s, h * dk))?;
            let o = blk.o.forward(&a)?.to_dtype(DType::F32)?;
            x = ew(&[&x, &o], (&x + &o)?);

            let n = self.norm(&x, &blk.ffn_norm)?;
            let g = self.act(&blk.wi_0.forward(&n)?.to_dtype(DType::F32)?)?;
            let hcat = match &blk.wi_1 {
                Some(w1) => {
                    let u = w1.forward(&n)?.to_dtype(DType::F32)?;
                    ew(&[&g, &u], (&g * &u)?)
                }
                None => g,
            };
            let o = blk.wo.forward_f32(&hcat)?;
            x = ew(&[&x, &o], (&x + &o)?);
        }
        self.norm(&x, &self.final_norm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_match_transformers_at_the_log_boundaries() {
        // Values computed with transformers' `_relative_position_bucket` (torch f32).
        let want = [
            (0, 0),
            (1, 17),
            (-1, 1),
            (7, 23),
            (8, 24),
            (15, 25),
            (16, 26),
            (31, 27),
            (32, 28),
            (-63, 13),
            (-64, 14),
            (127, 31),
            (128, 31),
            (-500, 15),
        ];
        for (rel, b) in want {
            assert_eq!(relative_position_bucket(rel, 32, 128), b, "rel {rel}");
        }
    }
}

//! FLUX transformer (MMDiT: double-stream then single-stream blocks), Fill configuration
//! (`in_channels` 384 → `out_channels` 64, guidance embedding), numerically following diffusers'
//! `FluxTransformer2DModel`. Weights are held in BFL's layout (fused qkv, fused `linear1`); the
//! diffusers folder is mapped onto it at load time, GGUF files use it as stored.
//!
//! Hot-path ops go through `pawfect_kernels` (fused on CUDA when available, plain candle otherwise).

use candle_core::{D, DType, Device, Tensor};
use pawfect_kernels as k;

use super::config::TransformerConfig;
use super::first_block_cache::FirstBlockCache;
use super::profile::{Profiler, RegionTime, region};
use super::sampling::{Rope, timestep_embedding};
use crate::accounting::{self as acct, ew};
use crate::checkpoint::{Linear, LinearOpts, WeightStore};
use crate::error::{ModelError, Result};

const LN_EPS: f64 = 1e-6;
const QK_EPS: f64 = 1e-6;

/// Checkpoint naming scheme of a transformer store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// BFL names (`double_blocks.N.img_attn.qkv`, …), as in `flux1-fill-dev.safetensors` and GGUF files.
    /// `prefix` is prepended to every name (ComfyUI saves under `model.diffusion_model.`).
    Bfl { comfy_prefix: bool },
    /// diffusers names (`transformer_blocks.N.attn.to_q`, …), `transformer/` of the diffusers folder.
    Diffusers,
}

/// Where one BFL tensor group lives in a store.
enum Src {
    One(String),
    Cat(Vec<String>),
    /// `final_layer.adaLN_modulation.1`: diffusers stores (scale, shift), BFL (shift, scale).
    SwapHalves(String),
}

fn diffusers_module(bfl: &str) -> Result<Src> {
    let one = |s: String| Ok(Src::One(s));
    let fixed = [
        ("img_in", "x_embedder"),
        ("txt_in", "context_embedder"),
        (
            "time_in.in_layer",
            "time_text_embed.timestep_embedder.linear_1",
        ),
        (
            "time_in.out_layer",
            "time_text_embed.timestep_embedder.linear_2",
        ),
        (
            "guidance_in.in_layer",
            "time_text_embed.guidance_embedder.linear_1",
        ),
        (
            "guidance_in.out_layer",
            "time_text_embed.guidance_embedder.linear_2",
        ),
        (
            "vector_in.in_layer",
            "time_text_embed.text_embedder.linear_1",
        ),
        (
            "vector_in.out_layer",
            "time_text_embed.text_embedder.linear_2",
        ),
        ("final_layer.linear", "proj_out"),
    ];
    if let Some((_, d)) = fixed.iter().find(|(b, _)| *b == bfl) {
        return one(d.to_string());
    }
    if bfl == "final_layer.adaLN_modulation.1" {
        return Ok(Src::SwapHalves("norm_out.linear".into()));
    }
    let parts: Vec<&str> = bfl.splitn(3, '.').collect();
    let bad = || ModelError::Weights(format!("no diffusers name for {bfl}"));
    let [kind, idx, rest] = parts.as_slice() else {
        return Err(bad());
    };
    match *kind {
        "double_blocks" => {
            let p = format!("transformer_blocks.{idx}.");
            let qkv = |xs: [&str; 3]| {
                Ok(Src::Cat(
                    xs.iter().map(|x| format!("{p}attn.{x}")).collect(),
                ))
            };
            match *rest {
                "img_mod.lin" => one(format!("{p}norm1.linear")),
                "txt_mod.lin" => one(format!("{p}norm1_context.linear")),
                "img_attn.qkv" => qkv(["to_q", "to_k", "to_v"]),
                "txt_attn.qkv" => qkv(["add_q_proj", "add_k_proj", "add_v_proj"]),
                "img_attn.proj" => one(format!("{p}attn.to_out.0")),
                "txt_attn.proj" => one(format!("{p}attn.to_add_out")),
                "img_attn.norm.query_norm" => one(format!("{p}attn.norm_q")),
                "img_attn.norm.key_norm" => one(format!("{p}attn.norm_k")),
                "txt_attn.norm.query_norm" => one(format!("{p}attn.norm_added_q")),
                "txt_attn.norm.key_norm" => one(format!("{p}attn.norm_added_k")),
                "img_mlp.0" => one(format!("{p}ff.net.0.proj")),
                "img_mlp.2" => one(format!("{p}ff.net.2")),
                "txt_mlp.0" => one(format!("{p}ff_context.net.0.proj")),
                "txt_mlp.2" => one(format!("{p}ff_context.net.2")),
                _ => Err(bad()),
            }
        }
        "single_blocks" => {
            let p = format!("single_transformer_blocks.{idx}.");
            match *rest {
                "linear1" => Ok(Src::Cat(vec![
                    format!("{p}attn.to_q"),
                    format!("{p}attn.to_k"),
                    format!("{p}attn.to_v"),
                    format!("{p}proj_mlp"),
                ])),
                "linear2" => one(format!("{p}proj_out")),
                "modulation.lin" => one(format!("{p}norm.linear")),
                "norm.query_norm" => one(format!("{p}attn.norm_q")),
                "norm.key_norm" => one(format!("{p}attn.norm_k")),
                _ => Err(bad()),
            }
        }
        _ => Err(bad()),
    }
}

/// Reads BFL-named modules from a store in either layout.
pub struct Loader<'a> {
    pub store: &'a dyn WeightStore,
    pub layout: Layout,
    pub opts: LinearOpts,
}

impl Loader<'_> {
    fn bfl_name(&self, module: &str) -> String {
        match self.layout {
            Layout::Bfl { comfy_prefix: true } => format!("model.diffusion_model.{module}"),
            _ => module.to_string(),
        }
    }

    /// A linear `[out, in]`; for fused diffusers modules `outs` gives the part sizes.
    fn linear(&self, module: &str, outs: &[usize], in_dim: usize) -> Result<Linear> {
        let out: usize = outs.iter().sum();
        match self.layout {
            Layout::Bfl { .. } => Linear::load(
                self.store,
                &self.bfl_name(module),
                out,
                in_dim,
                true,
                self.opts,
            ),
            Layout::Diffusers => match diffusers_module(module)? {
                Src::One(n) => Linear::load(self.store, &n, out, in_dim, true, self.opts),
                Src::Cat(ns) => Linear::load_cat(self.store, &ns, outs, in_dim, true, self.opts),
                Src::SwapHalves(n) => {
                    let w =
                        self.store
                            .get(&format!("{n}.weight"), &[out, in_dim], self.opts.dtype)?;
                    let b = self
                        .store
                        .get(&format!("{n}.bias"), &[out], self.opts.dtype)?;
                    let h = out / 2;
                    let w = Tensor::cat(&[w.narrow(0, h, h)?, w.narrow(0, 0, h)?], 0)?;
                    let b = Tensor::cat(&[b.narrow(0, h, h)?, b.narrow(0, 0, h)?], 0)?;
                    Linear::from_dense(w, Some(b))
                }
            },
        }
    }

    /// A QK-RMSNorm gain (`….scale` in BFL, `….weight` in diffusers). On CUDA in the compute dtype:
    /// the fused QK-RMSNorm+RoPE kernel takes a gain of the activations' dtype only, and with an f32
    /// gain every f16/bf16 call fell back to the unfused ops (≈ 2 ms instead of ≈ 40 µs per call at
    /// 4608 tokens). Elsewhere in f32 (the reference path upcasts the gain to f32 either way).
    fn norm(&self, module: &str, dim: usize) -> Result<Tensor> {
        let dtype = if self.store.device().is_cuda() {
            self.opts.dtype
        } else {
            DType::F32
        };
        let name = match self.layout {
            Layout::Bfl { .. } => format!("{}.scale", self.bfl_name(module)),
            Layout::Diffusers => match diffusers_module(module)? {
                Src::One(n) => format!("{n}.weight"),
                _ => return Err(ModelError::Weights(format!("{module} is not a norm"))),
            },
        };
        self.store.get(&name, &[dim], dtype)
    }

    fn has(&self, module: &str) -> bool {
        match self.layout {
            Layout::Bfl { .. } => self
                .store
                .contains(&format!("{}.weight", self.bfl_name(module))),
            Layout::Diffusers => match diffusers_module(module) {
                Ok(Src::One(n)) | Ok(Src::SwapHalves(n)) => {
                    self.store.contains(&format!("{n}.weight"))
                }
                Ok(Src::Cat(ns)) => ns
                    .iter()
                    .all(|n| self.store.contains(&format!("{n}.weight"))),
                Err(_) => false,
            },
        }
    }

    /// Detects the naming scheme of a store.
    pub fn detect_layout(store: &dyn WeightStore) -> Result<Layout> {
        if store.contains("x_embedder.weight") {
            Ok(Layout::Diffusers)
        } else if store.contains("img_in.weight") {
            Ok(Layout::Bfl {
                comfy_prefix: false,
            })
        } else if store.contains("model.diffusion_model.img_in.weight") {
            Ok(Layout::Bfl { comfy_prefix: true })
        } else {
            Err(ModelError::Weights(format!(
                "{}: not a FLUX transformer (neither img_in.weight nor x_embedder.weight found)",
                store.origin().display()
            )))
        }
    }

    /// The configuration of a BFL-layout checkpoint, read from tensor shapes. RoPE axes cannot be
    /// read from weights: the FLUX values are used when the head dim is 128.
    pub fn infer_config(store: &dyn WeightStore, layout: Layout) -> Result<TransformerConfig> {
        let pre = if layout == (Layout::Bfl { comfy_prefix: true }) {
            "model.diffusion_model."
        } else {
            ""
        };
        let shape = |n: &str| {
            store
                .shape(&format!("{pre}{n}"))
                .ok_or_else(|| store.missing(&format!("{pre}{n}")))
        };
        let img_in = shape("img_in.weight")?;
        let hidden = img_in[0];
        let head_dim = shape("double_blocks.0.img_attn.norm.query_norm.scale")?[0];
        let count = |kind: &str| {
            let names = store.names();
            (0..)
                .take_while(|i| {
                    names
                        .iter()
                        .any(|n| n.starts_with(&format!("{pre}{kind}.{i}.")))
                })
                .count()
        };
        let mlp = shape("double_blocks.0.img_mlp.0.weight")?[0];
        let axes = if head_dim == 128 {
            vec![16, 56, 56]
        } else {
            return Err(ModelError::Weights(format!(
                "{}: head dim {head_dim} has no known RoPE axes; provide the diffusers transformer/config.json",
                store.origin().display()
            )));
        };
        Ok(TransformerConfig {
            patch_size: 1,
            in_channels: img_in[1],
            out_channels: Some(shape("final_layer.linear.weight")?[0]),
            num_layers: count("double_blocks"),
            num_single_layers: count("single_blocks"),
            attention_head_dim: head_dim,
            num_attention_heads: hidden / head_dim,
            joint_attention_dim: shape("txt_in.weight")?[1],
            pooled_projection_dim: shape("vector_in.in_layer.weight")?[1],
            guidance_embeds: store.contains(&format!("{pre}guidance_in.in_layer.weight")),
            axes_dims_rope: axes,
            mlp_ratio: mlp as f64 / hidden as f64,
            theta: 10_000.0,
        })
    }
}

struct MlpEmbedder {
    in_layer: Linear,
    out_layer: Linear,
}

impl MlpEmbedder {
    fn load(l: &Loader, name: &str, in_dim: usize, hidden: usize) -> Result<Self> {
        Ok(Self {
            in_layer: l.linear(&format!("{name}.in_layer"), &[hidden], in_dim)?,
            out_layer: l.linear(&format!("{name}.out_layer"), &[hidden], hidden)?,
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.in_layer.forward(x)?;
        self.out_layer.forward(&ew(&[&h], h.silu()?))
    }
}

/// LayerNorm (no affine) + `(1 + scale)·x + shift`, counted as one memory-bound op.
fn norm_modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    Ok(ew(
        &[x, shift, scale],
        k::layer_norm_modulate(x, shift, scale, LN_EPS)?,
    ))
}

/// `x + gate·y`, counted as one memory-bound op.
fn gated(x: &Tensor, gate: &Tensor, y: &Tensor, clamp_f16: bool) -> Result<Tensor> {
    Ok(ew(&[x, gate, y], k::gated_residual(x, gate, y, clamp_f16)?))
}

/// A concatenation, counted as a copy (its parts read, the result written).
fn cat(parts: &[&Tensor], dim: usize) -> Result<Tensor> {
    Ok(ew(parts, Tensor::cat(parts, dim)?))
}

/// The 3 (or 6) modulation vectors `[B, H]` of an AdaLN-Zero layer.
fn chunks(m: &Tensor, n: usize) -> Result<Vec<Tensor>> {
    let h = m.dim(D::Minus1)? / n;
    (0..n).map(|i| Ok(m.narrow(D::Minus1, i * h, h)?)).collect()
}

struct StreamWeights {
    modulation: Linear,
    qkv: Linear,
    q_norm: Tensor,
    k_norm: Tensor,
    proj: Linear,
    mlp0: Linear,
    mlp2: Linear,
}

struct DoubleBlock {
    img: StreamWeights,
    txt: StreamWeights,
}

struct SingleBlock {
    modulation: Linear,
    linear1: Linear,
    linear2: Linear,
    q_norm: Tensor,
    k_norm: Tensor,
}

/// Splits a fused projection `[B, N, 3·heads·D]` into q, k, v `[B, heads, N, D]`, with
/// QK-RMSNorm and RoPE applied to q and k. q and k come back contiguous (the fused norm+RoPE reads
/// the strided views directly), v stays a strided view of `qkv` (the attention kernel reads it as
/// is; the reference path copies it).
fn qkv_heads(
    qkv: &Tensor,
    heads: usize,
    q_norm: &Tensor,
    k_norm: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, n, three_h) = qkv.dims3()?;
    let hd = three_h / 3 / heads;
    let qkv = qkv.reshape((b, n, 3, heads, hd))?;
    let part =
        |i: usize| -> Result<Tensor> { Ok(qkv.narrow(2, i, 1)?.squeeze(2)?.transpose(1, 2)?) };
    let norm_rope = |x: &Tensor, gain: &Tensor| -> Result<Tensor> {
        let y = k::qk_rmsnorm_rope(x, gain, cos, sin, QK_EPS)?;
        acct::elementwise(&[x, gain, cos, sin], &y);
        Ok(y)
    };
    let q = norm_rope(&part(0)?, q_norm)?;
    let kk = norm_rope(&part(1)?, k_norm)?;
    Ok((q, kk, part(2)?))
}

/// How attention runs when the transformer computes in f32 on a CUDA device (the fused attention
/// kernel has f16/bf16 variants only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum F32Attention {
    /// q, k and v are cast to f16 around the fused kernel, the output back to f32 (f32
    /// accumulation inside; |v| must stay below 65504, as on the f16 path).
    #[default]
    F16,
    /// The plain f32 reference: materialises the `heads × N × N` scores (2 GB at 1024², f32).
    Reference,
}

/// Joint attention over q, k, v `[B, heads, N, D]`, heads merged into `[B, N, heads·D]`.
fn attend(
    q: &Tensor,
    kk: &Tensor,
    v: &Tensor,
    scale: f64,
    f32_mode: F32Attention,
) -> Result<Tensor> {
    let (b, h, lq, d) = q.dims4()?;
    acct::attention(b, h, lq, kk.dim(2)?, d);
    if q.dtype() == DType::F32 && q.device().is_cuda() && f32_mode == F32Attention::F16 {
        let h = DType::F16;
        let o = k::attention_merged_heads(
            &q.to_dtype(h)?,
            &kk.to_dtype(h)?,
            &v.to_dtype(h)?,
            scale,
            false,
        )?;
        return Ok(o.to_dtype(DType::F32)?);
    }
    Ok(k::attention_merged_heads(q, kk, v, scale, false)?)
}

/// What every block of one forward pass reads besides its own weights and streams.
struct BlockInputs<'a> {
    /// `silu(temb)`, the input of every modulation.
    vec: &'a Tensor,
    rope: &'a Rope,
    cos_t: &'a Tensor,
    sin_t: &'a Tensor,
    cos_i: &'a Tensor,
    sin_i: &'a Tensor,
    t_len: usize,
    l_len: usize,
}

/// The FLUX transformer.
pub struct FluxTransformer {
    cfg: TransformerConfig,
    dtype: DType,
    device: Device,
    img_in: Linear,
    txt_in: Linear,
    time_in: MlpEmbedder,
    vector_in: MlpEmbedder,
    guidance_in: Option<MlpEmbedder>,
    double: Vec<DoubleBlock>,
    single: Vec<SingleBlock>,
    final_mod: Linear,
    final_linear: Linear,
    f32_attention: F32Attention,
    profiler: Option<Profiler>,
}

impl FluxTransformer {
    pub fn load(l: &Loader, cfg: &TransformerConfig) -> Result<Self> {
        cfg.validate()?;
        let h = cfg.hidden_size();
        let hd = cfg.attention_head_dim;
        let mh = cfg.mlp_hidden();
        let stream = |b: usize, s: &str| -> Result<StreamWeights> {
            let p = format!("double_blocks.{b}.{s}");
            Ok(StreamWeights {
                modulation: l.linear(&format!("{p}_mod.lin"), &[6 * h], h)?,
                qkv: l.linear(&format!("{p}_attn.qkv"), &[h, h, h], h)?,
                q_norm: l.norm(&format!("{p}_attn.norm.query_norm"), hd)?,
                k_norm: l.norm(&format!("{p}_attn.norm.key_norm"), hd)?,
                proj: l.linear(&format!("{p}_attn.proj"), &[h], h)?,
                mlp0: l.linear(&format!("{p}_mlp.0"), &[mh], h)?,
                mlp2: l.linear(&format!("{p}_mlp.2"), &[h], mh)?,
            })
        };
        let double = (0..cfg.num_layers)
            .map(|b| {
                Ok(DoubleBlock {
                    img: stream(b, "img")?,
                    txt: stream(b, "txt")?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let single = (0..cfg.num_single_layers)
            .map(|b| {
                let p = format!("single_blocks.{b}");
                Ok(SingleBlock {
                    modulation: l.linear(&format!("{p}.modulation.lin"), &[3 * h], h)?,
                    linear1: l.linear(&format!("{p}.linear1"), &[h, h, h, mh], h)?,
                    linear2: l.linear(&format!("{p}.linear2"), &[h], h + mh)?,
                    q_norm: l.norm(&format!("{p}.norm.query_norm"), hd)?,
                    k_norm: l.norm(&format!("{p}.norm.key_norm"), hd)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let guidance_in = if cfg.guidance_embeds {
            Some(MlpEmbedder::load(l, "guidance_in", 256, h)?)
        } else {
            if l.has("guidance_in.in_layer") {
                return Err(ModelError::Weights(
                    "checkpoint has guidance_in but config says guidance_embeds=false".into(),
                ));
            }
            None
        };
        Ok(Self {
            cfg: cfg.clone(),
            dtype: l.opts.dtype,
            device: l.store.device().clone(),
            img_in: l.linear("img_in", &[h], cfg.in_channels)?,
            txt_in: l.linear("txt_in", &[h], cfg.joint_attention_dim)?,
            time_in: MlpEmbedder::load(l, "time_in", 256, h)?,
            vector_in: MlpEmbedder::load(l, "vector_in", cfg.pooled_projection_dim, h)?,
            guidance_in,
            double,
            single,
            final_mod: l.linear("final_layer.adaLN_modulation.1", &[2 * h], h)?,
            final_linear: l.linear("final_layer.linear", &[cfg.out_channels()], h)?,
            f32_attention: F32Attention::default(),
            profiler: None,
        })
    }

    pub fn config(&self) -> &TransformerConfig {
        &self.cfg
    }

    /// Re-quantizes the token GEMMs to W8A8 int8 ([`crate::int8`]): every block's attention
    /// QKV and output projections, MLPs, and the single blocks' `linear1` / `linear2`, i.e. the
    /// modules torchao's `Int8DynamicActivationInt8WeightConfig` is applied to with a filter on
    /// diffusers' `transformer_blocks.*` / `single_transformer_blocks.*` linears other than the
    /// `norm*.linear` modulations. The one-token modulation GEMVs, the embedders and the final
    /// layer keep their weights. CPU only for now (see [`crate::int8`]).
    pub fn quantize_token_gemms_int8(&mut self) -> Result<()> {
        for blk in &mut self.double {
            for s in [&mut blk.img, &mut blk.txt] {
                for l in [&mut s.qkv, &mut s.proj, &mut s.mlp0, &mut s.mlp2] {
                    l.quantize_int8()?;
                }
            }
        }
        for blk in &mut self.single {
            blk.linear1.quantize_int8()?;
            blk.linear2.quantize_int8()?;
        }
        Ok(())
    }

    /// How many linears hold W8A8 int8 weights.
    pub fn int8_linears(&self) -> usize {
        let double = self.double.iter().flat_map(|b| {
            [&b.img, &b.txt]
                .into_iter()
                .flat_map(|s| [&s.qkv, &s.proj, &s.mlp0, &s.mlp2])
        });
        let single = self.single.iter().flat_map(|b| [&b.linear1, &b.linear2]);
        double
            .chain(single)
            .chain([
                &self.img_in,
                &self.txt_in,
                &self.final_mod,
                &self.final_linear,
            ])
            .filter(|l| l.is_int8())
            .count()
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// How attention runs for f32 activations on CUDA (default: f16 around the fused kernel).
    /// No effect on CPU (always the f32 reference) or in f16/bf16.
    pub fn set_f32_attention(&mut self, mode: F32Attention) {
        self.f32_attention = mode;
    }
    pub fn f32_attention(&self) -> F32Attention {
        self.f32_attention
    }

    /// Turns the per-region wall-time breakdown on or off (off by default; see
    /// [`super::profile`]: it synchronizes the device around every region, so profiled steps are
    /// slower). Turning it on clears what was accumulated.
    pub fn set_profiling(&mut self, on: bool) {
        self.profiler = on.then(Profiler::default);
    }

    /// The regions timed since profiling was turned on or last taken (empty when off).
    pub fn take_profile(&self) -> Result<Vec<RegionTime>> {
        match &self.profiler {
            Some(p) => p.take(),
            None => Ok(vec![]),
        }
    }

    fn region<T>(&self, name: &'static str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        region(self.profiler.as_ref(), &self.device, name, f)
    }

    /// The conditioning vector `temb` `[B, H]`: timestep + guidance + pooled-text embeddings.
    /// `t` and `guidance` are the values after the ×1000 scaling (see `model_time_inputs`).
    pub fn conditioning(
        &self,
        t: &[f32],
        guidance: Option<&[f32]>,
        pooled: &Tensor,
    ) -> Result<Tensor> {
        self.region("embed.conditioning", || {
            self.conditioning_inner(t, guidance, pooled)
        })
    }

    fn conditioning_inner(
        &self,
        t: &[f32],
        guidance: Option<&[f32]>,
        pooled: &Tensor,
    ) -> Result<Tensor> {
        let dt = self.dtype;
        let temb = self
            .time_in
            .forward(&timestep_embedding(t, 256, &self.device)?.to_dtype(dt)?)?;
        let temb = match (&self.guidance_in, guidance) {
            (Some(g_in), Some(g)) => {
                let g = g_in.forward(&timestep_embedding(g, 256, &self.device)?.to_dtype(dt)?)?;
                ew(&[&temb, &g], (&temb + &g)?)
            }
            (Some(_), None) => {
                return Err(ModelError::InvalidInput(
                    "this transformer needs a guidance value".into(),
                ));
            }
            (None, _) => temb,
        };
        let v = self
            .vector_in
            .forward(&pooled.to_device(&self.device)?.to_dtype(dt)?)?;
        Ok(ew(&[&temb, &v], (&temb + &v)?))
    }

    /// Velocity `[B, L, out_channels]` for packed image tokens `img` `[B, L, in_channels]` and T5
    /// states `txt` `[B, T, joint_attention_dim]`. `rope` covers `T + L` positions.
    pub fn forward(
        &self,
        img: &Tensor,
        txt: &Tensor,
        temb: &Tensor,
        rope: &Rope,
    ) -> Result<Tensor> {
        self.forward_cached(img, txt, temb, rope, None)
    }

    /// [`Self::forward`] with a First-Block Cache ([`super::first_block_cache`]): after double
    /// block 0 the cache decides whether the remaining blocks run or its residual stands in for
    /// them. `None` runs every block.
    pub fn forward_cached(
        &self,
        img: &Tensor,
        txt: &Tensor,
        temb: &Tensor,
        rope: &Rope,
        mut cache: Option<&mut FirstBlockCache>,
    ) -> Result<Tensor> {
        let dt = self.dtype;
        let (mut img, mut txt) = self.region("embed.img_in_txt_in", || {
            let img = self
                .img_in
                .forward(&img.to_device(&self.device)?.to_dtype(dt)?)?;
            let txt = self
                .txt_in
                .forward(&txt.to_device(&self.device)?.to_dtype(dt)?)?;
            Ok((img, txt))
        })?;
        let t_len = txt.dim(1)?;
        let l_len = img.dim(1)?;
        if rope.txt_len != t_len || rope.cos.dim(0)? != t_len + l_len {
            return Err(ModelError::InvalidInput(format!(
                "rope table for {} text + {} positions, inputs have {t_len} + {l_len}",
                rope.txt_len,
                rope.cos.dim(0)? - rope.txt_len
            )));
        }
        let (cos_t, sin_t) = rope.rows(0, t_len)?;
        let (cos_i, sin_i) = rope.rows(t_len, l_len)?;
        let vec = self.region("embed.silu_temb", || Ok(ew(&[temb], temb.silu()?)))?;
        let cx = BlockInputs {
            vec: &vec,
            rope,
            cos_t: &cos_t,
            sin_t: &sin_t,
            cos_i: &cos_i,
            sin_i: &sin_i,
            t_len,
            l_len,
        };

        let mut head_out = None;
        for (b, blk) in self.double.iter().enumerate() {
            let img_in = img.clone();
            (img, txt) = self.double_block(blk, &img, &txt, &cx)?;
            if b == 0
                && let Some(c) = cache.as_deref_mut()
            {
                if let Some(img_last) = c.after_head(&img_in, &img)? {
                    return self.final_layer(&img_last, &vec);
                }
                head_out = Some(img.clone());
            }
        }

        let mut x = self.region("single.cat_txt_img", || cat(&[&txt, &img], 1))?;
        for blk in &self.single {
            x = self.single_block(blk, &x, &cx)?;
        }
        let img_last = x.narrow(1, t_len, l_len)?;
        if let (Some(c), Some(head)) = (cache, head_out) {
            c.computed(&head, &img_last)?;
        }
        self.final_layer(&img_last, &vec)
    }

    /// One double-stream block: joint attention over text and image, then per-stream MLPs.
    fn double_block(
        &self,
        blk: &DoubleBlock,
        img: &Tensor,
        txt: &Tensor,
        cx: &BlockInputs,
    ) -> Result<(Tensor, Tensor)> {
        let heads = self.cfg.num_attention_heads;
        let scale = self.attention_scale();
        let (t_len, l_len) = (cx.t_len, cx.l_len);
        let (im, tm) = self.region("double.modulation", || {
            Ok((
                chunks(&blk.img.modulation.forward(cx.vec)?, 6)?,
                chunks(&blk.txt.modulation.forward(cx.vec)?, 6)?,
            ))
        })?;
        let (img_n, txt_n) = self.region("double.norm_modulate", || {
            Ok((
                norm_modulate(img, &im[0], &im[1])?,
                norm_modulate(txt, &tm[0], &tm[1])?,
            ))
        })?;
        let (iqkv, tqkv) = self.region("double.qkv_linear", || {
            Ok((blk.img.qkv.forward(&img_n)?, blk.txt.qkv.forward(&txt_n)?))
        })?;
        let ((iq, ik, iv), (tq, tk, tv)) = self.region("double.qk_norm_rope", || {
            Ok((
                qkv_heads(
                    &iqkv,
                    heads,
                    &blk.img.q_norm,
                    &blk.img.k_norm,
                    cx.cos_i,
                    cx.sin_i,
                )?,
                qkv_heads(
                    &tqkv,
                    heads,
                    &blk.txt.q_norm,
                    &blk.txt.k_norm,
                    cx.cos_t,
                    cx.sin_t,
                )?,
            ))
        })?;
        let (q, kk, v) = self.region("double.cat_qkv", || {
            Ok((
                cat(&[&tq, &iq], 2)?,
                cat(&[&tk, &ik], 2)?,
                cat(&[&tv, &iv], 2)?,
            ))
        })?;
        let attn = self.region("double.attention", || {
            attend(&q, &kk, &v, scale, self.f32_attention)
        })?;
        let txt_a = attn.narrow(1, 0, t_len)?;
        let img_a = attn.narrow(1, t_len, l_len)?;

        let (img_o, txt_o) = self.region("double.out_proj", || {
            Ok((blk.img.proj.forward(&img_a)?, blk.txt.proj.forward(&txt_a)?))
        })?;
        let (img, txt) = self.region("double.gated_residual", || {
            Ok((
                gated(img, &im[2], &img_o, false)?,
                gated(txt, &tm[2], &txt_o, false)?,
            ))
        })?;
        let (img_n2, txt_n2) = self.region("double.norm_modulate", || {
            Ok((
                norm_modulate(&img, &im[3], &im[4])?,
                norm_modulate(&txt, &tm[3], &tm[4])?,
            ))
        })?;
        let (img_h, txt_h) = self.region("double.mlp_in_gelu", || {
            Ok((
                blk.img.mlp0.forward_gelu(&img_n2)?,
                blk.txt.mlp0.forward_gelu(&txt_n2)?,
            ))
        })?;
        let (img_m, txt_m) = self.region("double.mlp_out", || {
            Ok((blk.img.mlp2.forward(&img_h)?, blk.txt.mlp2.forward(&txt_h)?))
        })?;
        self.region("double.gated_residual", || {
            Ok((
                gated(&img, &im[5], &img_m, false)?,
                gated(&txt, &tm[5], &txt_m, true)?,
            ))
        })
    }

    /// One single-stream block over the concatenated `[text, image]` tokens.
    fn single_block(&self, blk: &SingleBlock, x: &Tensor, cx: &BlockInputs) -> Result<Tensor> {
        let h = self.cfg.hidden_size();
        let heads = self.cfg.num_attention_heads;
        let scale = self.attention_scale();
        let m = self.region("single.modulation", || {
            chunks(&blk.modulation.forward(cx.vec)?, 3)
        })?;
        let xn = self.region("single.norm_modulate", || norm_modulate(x, &m[0], &m[1]))?;
        let (qkv, mlp_h) = self.region("single.linear1_qkv_mlp_in_gelu", || {
            blk.linear1.forward_split_gelu(&xn, 3 * h)
        })?;
        let (q, kk, v) = self.region("single.qk_norm_rope", || {
            qkv_heads(
                &qkv,
                heads,
                &blk.q_norm,
                &blk.k_norm,
                &cx.rope.cos,
                &cx.rope.sin,
            )
        })?;
        let attn = self.region("single.attention", || {
            attend(&q, &kk, &v, scale, self.f32_attention)
        })?;
        let cat = self.region("single.cat_attn_mlp", || {
            cat(&[&attn, &mlp_h], attn.rank() - 1)
        })?;
        let out = self.region("single.linear2", || blk.linear2.forward(&cat))?;
        self.region("single.gated_residual", || gated(x, &m[2], &out, true))
    }

    /// AdaLN-modulated norm and projection of the image tokens to the velocity.
    fn final_layer(&self, img: &Tensor, vec: &Tensor) -> Result<Tensor> {
        self.region("final_layer", || {
            let m = chunks(&self.final_mod.forward(vec)?, 2)?;
            let img = norm_modulate(img, &m[0], &m[1])?;
            self.final_linear.forward(&img)
        })
    }

    fn attention_scale(&self) -> f64 {
        1.0 / (self.cfg.attention_head_dim as f64).sqrt()
    }
}

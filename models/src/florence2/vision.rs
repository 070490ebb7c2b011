//! DaViT vision tower of Florence-2.
//!
//! Activations stay channels-last (`[B, H, W, C]`) through the whole tower, so LayerNorms, linears
//! and attention need no transposes; only the strided patch-embedding convolutions go through
//! NCHW. Each stage is a conv embedding followed by `depth` × (spatial block → channel block):
//!
//! ```text
//! x = x + dwconv1(x);  x = x + attn(norm1(x));  x = x + dwconv2(x);  x = x + mlp(norm2(x))
//! ```
//! with window attention (12×12 windows, zero padding right/bottom) in spatial blocks and
//! channel-group attention (scaled by `N^-0.5`, N = tokens) in channel blocks.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, LayerNorm, Linear, VarBuilder};

use super::config::{Activation, VisionConfig};
use crate::accounting::{self as acct, ew, nn_conv2d, nn_linear};

const LN_EPS: f64 = 1e-5;

pub(crate) fn activate(x: &Tensor, act: Activation) -> Result<Tensor> {
    match act {
        Activation::Gelu => x.gelu_erf(),
        Activation::GeluTanh => x.gelu(),
        Activation::Relu => x.relu(),
    }
}

pub(crate) fn layer_norm(size: usize, vb: VarBuilder) -> Result<LayerNorm> {
    candle_nn::layer_norm(size, LN_EPS, vb)
}

/// Patch embedding: (pre-norm →) strided conv (→ post-norm).
struct ConvEmbed {
    conv: Conv2d,
    norm: LayerNorm,
    pre_norm: bool,
}

impl ConvEmbed {
    fn new(cfg: &VisionConfig, stage: usize, vb: VarBuilder) -> Result<Self> {
        let cin = if stage == 0 {
            cfg.in_channels
        } else {
            cfg.embed_dim[stage - 1]
        };
        let cout = cfg.embed_dim[stage];
        let conv_cfg = Conv2dConfig {
            padding: cfg.patch_padding[stage],
            stride: cfg.patch_stride[stage],
            ..Default::default()
        };
        let conv = candle_nn::conv2d(cin, cout, cfg.patch_size[stage], conv_cfg, vb.pp("conv"))?;
        let pre_norm = cfg.patch_prenorm[stage];
        let norm = layer_norm(if pre_norm { cin } else { cout }, vb.pp("norm"))?;
        Ok(Self {
            conv,
            norm,
            pre_norm,
        })
    }

    /// `[B, H, W, Cin]` → `[B, H', W', Cout]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = if self.pre_norm {
            ew(&[x], self.norm.forward(x)?)
        } else {
            x.clone()
        };
        let x = nn_conv2d(&self.conv, &x.permute((0, 3, 1, 2))?.contiguous()?)?;
        let x = x.permute((0, 2, 3, 1))?.contiguous()?;
        if self.pre_norm {
            Ok(x)
        } else {
            Ok(ew(&[&x], self.norm.forward(&x)?))
        }
    }
}

/// Depthwise k×k convolution (padding k/2, bias) on a channels-last tensor, as a sum of shifted,
/// per-channel-scaled copies (avoids candle's per-group convolution loop).
struct DepthwiseConv {
    /// `[k*k, C]`: tap (dy, dx) at row dy*k + dx.
    taps: Tensor,
    bias: Tensor,
    k: usize,
}

impl DepthwiseConv {
    fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        let k = 3;
        let w = vb.get((dim, 1, k, k), "weight")?;
        let taps = w.reshape((dim, k * k))?.t()?.contiguous()?;
        let bias = vb.get(dim, "bias")?;
        Ok(Self { taps, bias, k })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, h, w, _) = x.dims4()?;
        let p = self.k / 2;
        let xp = ew(&[x], x.pad_with_zeros(1, p, p)?.pad_with_zeros(2, p, p)?);
        let mut acc = x.zeros_like()?.broadcast_add(&self.bias)?;
        for dy in 0..self.k {
            let rows = xp.narrow(1, dy, h)?;
            for dx in 0..self.k {
                let tap = self.taps.get(dy * self.k + dx)?;
                let shifted = rows.narrow(2, dx, w)?;
                // One multiply-add pass: acc and the shifted input read, acc written.
                acc = ew(
                    &[&acc, &shifted, &tap],
                    (&acc + shifted.broadcast_mul(&tap)?)?,
                );
            }
        }
        Ok(acc)
    }
}

struct Mlp {
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl Mlp {
    fn new(dim: usize, hidden: usize, act: Activation, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            fc1: candle_nn::linear(dim, hidden, vb.pp("fc1"))?,
            fc2: candle_nn::linear(hidden, dim, vb.pp("fc2"))?,
            act,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = nn_linear(&self.fc1, x)?;
        nn_linear(&self.fc2, &ew(&[&h], activate(&h, self.act)?))
    }
}

fn qkv_linear(dim: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    candle_nn::linear_b(dim, 3 * dim, bias, vb)
}

/// Multi-head self-attention inside non-overlapping windows (no shift, no relative bias).
struct WindowAttention {
    qkv: Linear,
    proj: Linear,
    heads: usize,
    window: usize,
}

impl WindowAttention {
    fn new(cfg: &VisionConfig, stage: usize, vb: VarBuilder) -> Result<Self> {
        let dim = cfg.embed_dim[stage];
        Ok(Self {
            qkv: qkv_linear(dim, cfg.qkv_bias, vb.pp("qkv"))?,
            proj: candle_nn::linear(dim, dim, vb.pp("proj"))?,
            heads: cfg.num_heads[stage],
            window: cfg.window_size,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, h, w, c) = x.dims4()?;
        let ws = self.window;
        let pad_r = (ws - w % ws) % ws;
        let pad_b = (ws - h % ws) % ws;
        let x = if pad_r > 0 || pad_b > 0 {
            ew(
                &[x],
                x.pad_with_zeros(2, 0, pad_r)?.pad_with_zeros(1, 0, pad_b)?,
            )
        } else {
            x.clone()
        };
        let (hp, wp) = (h + pad_b, w + pad_r);
        let (nh, nw) = (hp / ws, wp / ws);
        let t = ws * ws;
        let bw = b * nh * nw;
        let windows = x
            .reshape(vec![b, nh, ws, nw, ws, c])?
            .permute(vec![0, 1, 3, 2, 4, 5])?
            .contiguous()?
            .reshape((bw, t, c))?;
        let hd = c / self.heads;
        let qkv = nn_linear(&self.qkv, &windows)?.reshape(vec![bw, t, 3, self.heads, hd])?;
        let qkv = qkv.permute(vec![2, 0, 3, 1, 4])?;
        // Strided `[bw, heads, t, hd]` views: the CUDA kernel reads them in place, the reference
        // path copies them; the output comes back as `[bw, t, heads·hd]`.
        let (q, k, v) = (qkv.get(0)?, qkv.get(1)?, qkv.get(2)?);
        acct::attention(bw, self.heads, t, t, hd);
        let o = pawfect_kernels::attention_merged_heads(&q, &k, &v, (hd as f64).powf(-0.5), false)?;
        let o = nn_linear(&self.proj, &o)?;
        let o = o
            .reshape(vec![b, nh, nw, ws, ws, c])?
            .permute(vec![0, 1, 3, 2, 4, 5])?
            .reshape((b, hp, wp, c))?;
        if pad_r > 0 || pad_b > 0 {
            o.narrow(1, 0, h)?.narrow(2, 0, w)?.contiguous()
        } else {
            Ok(o)
        }
    }
}

/// Attention between channels within each channel group, over all tokens of the image.
///
/// `q, k, v: [B, G, N, C/G]`, `attn = softmax((q·N^-0.5)ᵀ k)` (`[B, G, C/G, C/G]`), `out = v·attnᵀ`.
/// The "head dim" of this product is the token count N (36864 at 768 px), so it runs as plain
/// candle ops rather than through the attention kernel. q is scaled before the product (as the
/// original code does) so that f16 sums over N tokens stay in range.
struct ChannelAttention {
    qkv: Linear,
    proj: Linear,
    groups: usize,
}

impl ChannelAttention {
    fn new(cfg: &VisionConfig, stage: usize, vb: VarBuilder) -> Result<Self> {
        let dim = cfg.embed_dim[stage];
        Ok(Self {
            qkv: qkv_linear(dim, cfg.qkv_bias, vb.pp("qkv"))?,
            proj: candle_nn::linear(dim, dim, vb.pp("proj"))?,
            groups: cfg.num_groups[stage],
        })
    }

    /// `[B, N, C]` → `[B, N, C]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        let g = self.groups;
        let cg = c / g;
        let qkv = nn_linear(&self.qkv, x)?
            .reshape(vec![b, n, 3, g, cg])?
            .permute(vec![2, 0, 3, 1, 4])?;
        let q = (qkv.get(0)? * (n as f64).powf(-0.5))?;
        let k = qkv.get(1)?.contiguous()?;
        let v = qkv.get(2)?.contiguous()?;
        let qt = q.transpose(2, 3)?.contiguous()?;
        // An attention over channels: `cg` queries and keys, the N tokens as its head dim.
        acct::attention(b, g, cg, cg, n);
        let scores = qt.matmul(&k)?;
        let attn = ew(&[&scores], candle_nn::ops::softmax_last_dim(&scores)?);
        let o = v.matmul(&attn.t()?.contiguous()?)?;
        let o = o.transpose(1, 2)?.reshape((b, n, c))?;
        nn_linear(&self.proj, &o)
    }
}

enum Mixer {
    Window(WindowAttention),
    Channel(ChannelAttention),
}

/// Spatial (window attention) or channel (group attention) block.
struct Block {
    conv1: DepthwiseConv,
    norm1: LayerNorm,
    mixer: Mixer,
    conv2: DepthwiseConv,
    norm2: LayerNorm,
    ffn: Mlp,
}

impl Block {
    fn new(cfg: &VisionConfig, stage: usize, spatial: bool, vb: VarBuilder) -> Result<Self> {
        let dim = cfg.embed_dim[stage];
        let mixer = if spatial {
            Mixer::Window(WindowAttention::new(cfg, stage, vb.pp("window_attn"))?)
        } else {
            Mixer::Channel(ChannelAttention::new(cfg, stage, vb.pp("channel_attn"))?)
        };
        Ok(Self {
            conv1: DepthwiseConv::new(dim, vb.pp("conv1"))?,
            norm1: layer_norm(dim, vb.pp("norm1"))?,
            mixer,
            conv2: DepthwiseConv::new(dim, vb.pp("conv2"))?,
            norm2: layer_norm(dim, vb.pp("norm2"))?,
            ffn: Mlp::new(
                dim,
                (dim as f64 * cfg.mlp_ratio) as usize,
                cfg.activation,
                vb.pp("ffn"),
            )?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, h, w, c) = x.dims4()?;
        let d1 = self.conv1.forward(x)?;
        let x = ew(&[x, &d1], (x + &d1)?);
        let n = ew(&[&x], self.norm1.forward(&x)?);
        let a = match &self.mixer {
            Mixer::Window(m) => m.forward(&n)?,
            Mixer::Channel(m) => m
                .forward(&n.reshape((b, h * w, c))?)?
                .reshape((b, h, w, c))?,
        };
        let x = ew(&[&x, &a], (&x + &a)?);
        let d2 = self.conv2.forward(&x)?;
        let x = ew(&[&x, &d2], (&x + &d2)?);
        let n2 = ew(&[&x], self.norm2.forward(&x)?);
        let f = self.ffn.forward(&n2)?;
        Ok(ew(&[&x, &f], (&x + &f)?))
    }
}

/// The DaViT backbone (without the classification head and final norms, which Florence-2 drops).
pub struct VisionTower {
    convs: Vec<ConvEmbed>,
    /// Per stage: the blocks in order (spatial, channel, spatial, channel, ...).
    blocks: Vec<Vec<Block>>,
}

impl VisionTower {
    /// `vb` points at the tower (`model.vision_tower`).
    pub fn new(cfg: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        let mut convs = Vec::with_capacity(cfg.num_stages());
        let mut blocks = Vec::with_capacity(cfg.num_stages());
        for stage in 0..cfg.num_stages() {
            convs.push(ConvEmbed::new(cfg, stage, vb.pp(format!("convs.{stage}")))?);
            let mut stage_blocks = Vec::with_capacity(2 * cfg.depths[stage]);
            for j in 0..cfg.depths[stage] {
                let vbj = vb.pp(format!("blocks.{stage}.{j}"));
                stage_blocks.push(Block::new(cfg, stage, true, vbj.pp("spatial_block"))?);
                stage_blocks.push(Block::new(cfg, stage, false, vbj.pp("channel_block"))?);
            }
            blocks.push(stage_blocks);
        }
        Ok(Self { convs, blocks })
    }

    /// Pixel values `[B, 3, H, W]` → features `[B, H/32, W/32, C_last]` (channels-last), and the
    /// output of every stage when `keep_stages` is set.
    pub fn forward_stages(
        &self,
        pixel_values: &Tensor,
        keep_stages: bool,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut x = pixel_values.permute((0, 2, 3, 1))?.contiguous()?;
        let mut stages = Vec::new();
        for (conv, blocks) in self.convs.iter().zip(&self.blocks) {
            x = conv.forward(&x)?;
            for block in blocks {
                x = block.forward(&x)?;
            }
            if keep_stages {
                stages.push(x.clone());
            }
        }
        Ok((x, stages))
    }

    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        Ok(self.forward_stages(pixel_values, false)?.0)
    }
}

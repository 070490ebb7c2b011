//! FLUX autoencoder (diffusers `AutoencoderKL` with the FLUX config), loadable from the diffusers
//! `vae/` folder or BFL's `ae.safetensors`. Encoding returns the posterior **mean** (as BFL's
//! reference and the FLUX Fill recipe do); optional tiling follows diffusers' `tiled_encode` /
//! `tiled_decode` (same tile grid and linear blending).

use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Module, Shape, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, GroupNorm, Linear, VarBuilder};

use crate::accounting::{self as acct, ew, nn_conv2d, nn_linear};
use pawfect_kernels as k;

use super::config::VaeConfig;
use crate::error::{ModelError, Result};

const EPS: f64 = 1e-6;

/// Serves diffusers `AutoencoderKL` names from a BFL / LDM-named `ae.safetensors`.
struct LdmVaeBackend {
    st: MmapedSafetensors,
    n_blocks: usize,
}

impl LdmVaeBackend {
    fn ldm_name(&self, name: &str) -> String {
        let mut n = name.to_string();
        for side in ["encoder", "decoder"] {
            n = n.replace(
                &format!("{side}.conv_norm_out."),
                &format!("{side}.norm_out."),
            );
            n = n.replace(
                &format!("{side}.mid_block.resnets.0."),
                &format!("{side}.mid.block_1."),
            );
            n = n.replace(
                &format!("{side}.mid_block.resnets.1."),
                &format!("{side}.mid.block_2."),
            );
            let attn = format!("{side}.mid_block.attentions.0.");
            if n.starts_with(&attn) {
                let rest = &n[attn.len()..];
                let rest = rest
                    .replacen("group_norm.", "norm.", 1)
                    .replacen("to_q.", "q.", 1)
                    .replacen("to_k.", "k.", 1)
                    .replacen("to_v.", "v.", 1)
                    .replacen("to_out.0.", "proj_out.", 1);
                n = format!("{side}.mid.attn_1.{rest}");
            }
        }
        let parts: Vec<&str> = n.split('.').collect();
        if parts.len() > 5 && parts[0] == "encoder" && parts[1] == "down_blocks" {
            let i = parts[2];
            n = if parts[3] == "resnets" {
                format!(
                    "encoder.down.{i}.block.{}.{}",
                    parts[4],
                    parts[5..].join(".")
                )
            } else {
                format!("encoder.down.{i}.downsample.{}", parts[5..].join("."))
            };
        } else if parts.len() > 5 && parts[0] == "decoder" && parts[1] == "up_blocks" {
            let i = parts[2]
                .parse::<usize>()
                .map(|i| self.n_blocks.saturating_sub(1 + i))
                .unwrap_or(usize::MAX);
            n = if parts[3] == "resnets" {
                format!("decoder.up.{i}.block.{}.{}", parts[4], parts[5..].join("."))
            } else {
                format!("decoder.up.{i}.upsample.{}", parts[5..].join("."))
            };
        }
        n.replace("conv_shortcut", "nin_shortcut")
    }

    fn load(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let ldm = self.ldm_name(name);
        let t = self.st.load(&ldm, dev)?;
        // LDM attention projections are 1x1 convolutions.
        let t = if ldm.contains(".mid.attn_1.") && t.rank() == 4 {
            t.flatten_from(1)?
        } else {
            t
        };
        t.to_dtype(dtype)
    }
}

impl candle_nn::var_builder::SimpleBackend for LdmVaeBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.load(name, dtype, dev)?;
        if t.shape() != &s {
            candle_core::bail!(
                "shape mismatch for {name} ({}): {:?} vs {s:?}",
                self.ldm_name(name),
                t.dims()
            )
        }
        Ok(t)
    }
    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, dtype, dev)
    }
    fn contains_tensor(&self, name: &str) -> bool {
        self.st.get(&self.ldm_name(name)).is_ok()
    }
}

fn conv(
    cin: usize,
    cout: usize,
    ksize: usize,
    stride: usize,
    padding: usize,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding,
        stride,
        ..Default::default()
    };
    Ok(candle_nn::conv2d(cin, cout, ksize, cfg, vb)?)
}

fn gn(groups: usize, c: usize, vb: VarBuilder) -> Result<GroupNorm> {
    Ok(candle_nn::group_norm(groups, c, EPS, vb)?)
}

/// GroupNorm then SiLU, each counted as one memory-bound op (the norm's own gain and bias are
/// a few vectors: left out).
fn norm_silu(norm: &GroupNorm, x: &Tensor) -> Result<Tensor> {
    let n = ew(&[x], norm.forward(x)?);
    Ok(ew(&[&n], n.silu()?))
}

/// `a + b`, counted as one memory-bound op.
fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(ew(&[a, b], (a + b)?))
}

struct Resnet {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    shortcut: Option<Conv2d>,
}

impl Resnet {
    fn new(cin: usize, cout: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm1: gn(groups, cin, vb.pp("norm1"))?,
            conv1: conv(cin, cout, 3, 1, 1, vb.pp("conv1"))?,
            norm2: gn(groups, cout, vb.pp("norm2"))?,
            conv2: conv(cout, cout, 3, 1, 1, vb.pp("conv2"))?,
            shortcut: if cin != cout {
                Some(conv(cin, cout, 1, 1, 0, vb.pp("conv_shortcut"))?)
            } else {
                None
            },
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = nn_conv2d(&self.conv1, &norm_silu(&self.norm1, x)?)?;
        let h = nn_conv2d(&self.conv2, &norm_silu(&self.norm2, &h)?)?;
        let s = match &self.shortcut {
            Some(c) => nn_conv2d(c, x)?,
            None => x.clone(),
        };
        add(&s, &h)
    }
}

struct Attention {
    norm: GroupNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
}

impl Attention {
    fn new(c: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm: gn(groups, c, vb.pp("group_norm"))?,
            q: candle_nn::linear(c, c, vb.pp("to_q"))?,
            k: candle_nn::linear(c, c, vb.pp("to_k"))?,
            v: candle_nn::linear(c, c, vb.pp("to_v"))?,
            out: candle_nn::linear(c, c, vb.pp("to_out.0"))?,
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let n = ew(&[x], self.norm.forward(x)?)
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let heads = |t: Tensor| -> Result<Tensor> { Ok(t.unsqueeze(1)?.contiguous()?) };
        let q = heads(nn_linear(&self.q, &n)?)?;
        let kk = heads(nn_linear(&self.k, &n)?)?;
        let v = heads(nn_linear(&self.v, &n)?)?;
        acct::attention(b, 1, h * w, h * w, c);
        let a = k::attention(&q, &kk, &v, 1.0 / (c as f64).sqrt(), false)?.squeeze(1)?;
        let a = nn_linear(&self.out, &a)?
            .transpose(1, 2)?
            .reshape((b, c, h, w))?;
        add(&a, x)
    }
}

struct MidBlock {
    res0: Resnet,
    attn: Option<Attention>,
    res1: Resnet,
}

impl MidBlock {
    fn new(c: usize, groups: usize, attn: bool, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            res0: Resnet::new(c, c, groups, vb.pp("resnets.0"))?,
            attn: if attn {
                Some(Attention::new(c, groups, vb.pp("attentions.0"))?)
            } else {
                None
            },
            res1: Resnet::new(c, c, groups, vb.pp("resnets.1"))?,
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.res0.forward(x)?;
        if let Some(a) = &self.attn {
            h = a.forward(&h)?;
        }
        self.res1.forward(&h)
    }
}

struct Encoder {
    conv_in: Conv2d,
    down: Vec<(Vec<Resnet>, Option<Conv2d>)>,
    mid: MidBlock,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(cfg: &VaeConfig, vb: VarBuilder) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let g = cfg.norm_num_groups;
        let mut down = Vec::with_capacity(ch.len());
        let mut cin = ch[0];
        for (i, &cout) in ch.iter().enumerate() {
            let vbi = vb.pp(format!("down_blocks.{i}"));
            let resnets = (0..cfg.layers_per_block)
                .map(|j| {
                    Resnet::new(
                        if j == 0 { cin } else { cout },
                        cout,
                        g,
                        vbi.pp(format!("resnets.{j}")),
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let ds = if i + 1 < ch.len() {
                Some(conv(cout, cout, 3, 2, 0, vbi.pp("downsamplers.0.conv"))?)
            } else {
                None
            };
            down.push((resnets, ds));
            cin = cout;
        }
        let last = *ch.last().unwrap_or(&ch[0]);
        Ok(Self {
            conv_in: conv(cfg.in_channels, ch[0], 3, 1, 1, vb.pp("conv_in"))?,
            down,
            mid: MidBlock::new(last, g, cfg.mid_block_add_attention, vb.pp("mid_block"))?,
            norm_out: gn(g, last, vb.pp("conv_norm_out"))?,
            conv_out: conv(last, 2 * cfg.latent_channels, 3, 1, 1, vb.pp("conv_out"))?,
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = nn_conv2d(&self.conv_in, x)?;
        for (resnets, ds) in &self.down {
            for r in resnets {
                h = r.forward(&h)?;
            }
            if let Some(d) = ds {
                // diffusers Downsample2D(padding=0): pad right and bottom by one, then stride 2.
                let padded = ew(&[&h], h.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?);
                h = nn_conv2d(d, &padded)?;
            }
        }
        let h = self.mid.forward(&h)?;
        Ok(nn_conv2d(&self.conv_out, &norm_silu(&self.norm_out, &h)?)?)
    }
}

struct Decoder {
    conv_in: Conv2d,
    mid: MidBlock,
    up: Vec<(Vec<Resnet>, Option<Conv2d>)>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(cfg: &VaeConfig, vb: VarBuilder) -> Result<Self> {
        let rev: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let g = cfg.norm_num_groups;
        let mut up = Vec::with_capacity(rev.len());
        let mut cin = rev[0];
        for (i, &cout) in rev.iter().enumerate() {
            let vbi = vb.pp(format!("up_blocks.{i}"));
            let resnets = (0..cfg.layers_per_block + 1)
                .map(|j| {
                    Resnet::new(
                        if j == 0 { cin } else { cout },
                        cout,
                        g,
                        vbi.pp(format!("resnets.{j}")),
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let us = if i + 1 < rev.len() {
                Some(conv(cout, cout, 3, 1, 1, vbi.pp("upsamplers.0.conv"))?)
            } else {
                None
            };
            up.push((resnets, us));
            cin = cout;
        }
        let first = *rev.last().unwrap_or(&rev[0]);
        Ok(Self {
            conv_in: conv(cfg.latent_channels, rev[0], 3, 1, 1, vb.pp("conv_in"))?,
            mid: MidBlock::new(rev[0], g, cfg.mid_block_add_attention, vb.pp("mid_block"))?,
            up,
            norm_out: gn(g, first, vb.pp("conv_norm_out"))?,
            conv_out: conv(first, cfg.out_channels, 3, 1, 1, vb.pp("conv_out"))?,
        })
    }
    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let mut h = self.mid.forward(&nn_conv2d(&self.conv_in, z)?)?;
        for (resnets, us) in &self.up {
            for r in resnets {
                h = r.forward(&h)?;
            }
            if let Some(u) = us {
                let (_, _, hh, ww) = h.dims4()?;
                let up = ew(&[&h], h.upsample_nearest2d(hh * 2, ww * 2)?);
                h = nn_conv2d(u, &up)?;
            }
        }
        Ok(nn_conv2d(&self.conv_out, &norm_silu(&self.norm_out, &h)?)?)
    }
}

/// Where the VAE weights come from.
#[derive(Debug, Clone)]
pub enum VaeWeights {
    /// `vae/diffusion_pytorch_model.safetensors` (diffusers names).
    Diffusers(PathBuf),
    /// BFL `ae.safetensors` (LDM names).
    Bfl(PathBuf),
}

/// The FLUX autoencoder.
pub struct AutoEncoder {
    cfg: VaeConfig,
    encoder: Encoder,
    decoder: Decoder,
    dtype: DType,
    device: Device,
    /// Tile size in pixels (diffusers `tile_sample_min_size`); inputs larger than this are tiled.
    tile_sample: Option<usize>,
}

impl AutoEncoder {
    pub fn load(
        cfg: &VaeConfig,
        weights: &VaeWeights,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        if cfg.use_quant_conv || cfg.use_post_quant_conv {
            return Err(ModelError::Weights(
                "VAE configs with quant_conv are not FLUX VAEs".into(),
            ));
        }
        let path = match weights {
            VaeWeights::Diffusers(p) | VaeWeights::Bfl(p) => p.clone(),
        };
        if !path.is_file() {
            return Err(ModelError::bad_file(&path, "file not found"));
        }
        let map = |e: candle_core::Error| ModelError::bad_file(&path, e);
        // SAFETY: read-only mapping of a model file (see SafetensorsStore::open).
        let st = unsafe { MmapedSafetensors::new(&path) }.map_err(map)?;
        let vb = match weights {
            VaeWeights::Diffusers(_) => {
                VarBuilder::from_backend(Box::new(st), dtype, device.clone())
            }
            VaeWeights::Bfl(_) => VarBuilder::from_backend(
                Box::new(LdmVaeBackend {
                    st,
                    n_blocks: cfg.block_out_channels.len(),
                }),
                dtype,
                device.clone(),
            ),
        };
        let encoder =
            Encoder::new(cfg, vb.pp("encoder")).map_err(|e| ModelError::bad_file(&path, e))?;
        let decoder =
            Decoder::new(cfg, vb.pp("decoder")).map_err(|e| ModelError::bad_file(&path, e))?;
        Ok(Self {
            cfg: cfg.clone(),
            encoder,
            decoder,
            dtype,
            device: device.clone(),
            tile_sample: None,
        })
    }

    pub fn config(&self) -> &VaeConfig {
        &self.cfg
    }
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Tile inputs larger than `pixels` (a multiple of the scale factor); `None` disables tiling.
    pub fn set_tiling(&mut self, pixels: Option<usize>) {
        self.tile_sample = pixels;
    }

    fn tiles(&self) -> Option<(usize, usize)> {
        self.tile_sample.map(|s| (s, s / self.cfg.scale_factor()))
    }

    /// Posterior mean `[B, latent_channels, H/8, W/8]` of images `[B, 3, H, W]` in [-1, 1] (unscaled).
    pub fn encode_mean(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.to_device(&self.device)?.to_dtype(self.dtype)?;
        let (_, _, h, w) = x.dims4()?;
        let moments = match self.tiles() {
            Some((ts, tl)) if h > ts || w > ts => tiled(&x, ts, tl, |t| self.encoder.forward(t))?,
            _ => self.encoder.forward(&x)?,
        };
        Ok(moments
            .narrow(1, 0, self.cfg.latent_channels)?
            .to_dtype(DType::F32)?)
    }

    /// Images `[B, 3, H, W]` (about [-1, 1], f32) from unscaled latents.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let z = z.to_device(&self.device)?.to_dtype(self.dtype)?;
        let (_, _, h, w) = z.dims4()?;
        let out = match self.tiles() {
            Some((ts, tl)) if h > tl || w > tl => tiled(&z, tl, ts, |t| self.decoder.forward(t))?,
            _ => self.decoder.forward(&z)?,
        };
        Ok(out.to_dtype(DType::F32)?)
    }

    /// `(mean − shift)·scale`: the latents the transformer sees.
    pub fn scale_latents(&self, mean: &Tensor) -> Result<Tensor> {
        let shift = self.cfg.shift_factor.unwrap_or(0.0);
        Ok(((mean - shift)? * self.cfg.scaling_factor)?)
    }

    /// `z/scale + shift`.
    pub fn unscale_latents(&self, z: &Tensor) -> Result<Tensor> {
        let shift = self.cfg.shift_factor.unwrap_or(0.0);
        Ok(((z / self.cfg.scaling_factor)? + shift)?)
    }
}

/// diffusers' tiling: tiles of `tile_in` input cells every `0.75·tile_in`, each mapped to
/// `tile_out` output cells; tiles are blended linearly over `0.25·tile_out` cells with the tile
/// above and to the left (already blended, as diffusers blends in place), then cropped to
/// `tile_out − blend`.
fn tiled(
    x: &Tensor,
    tile_in: usize,
    tile_out: usize,
    f: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let overlap = (tile_in as f64 * 0.75) as usize;
    let blend = (tile_out as f64 * 0.25) as usize;
    let limit = tile_out - blend;
    let (_, _, h, w) = x.dims4()?;
    if overlap == 0 {
        return Err(ModelError::InvalidInput(format!(
            "VAE tile of {tile_in} is too small"
        )));
    }
    let mut rows: Vec<Vec<Tensor>> = vec![];
    for i in (0..h).step_by(overlap) {
        let mut row = vec![];
        for j in (0..w).step_by(overlap) {
            let t = x
                .narrow(2, i, tile_in.min(h - i))?
                .narrow(3, j, tile_in.min(w - j))?;
            row.push(f(&t)?);
        }
        rows.push(row);
    }
    let mut out_rows = Vec::with_capacity(rows.len());
    for i in 0..rows.len() {
        for j in 0..rows[i].len() {
            let mut t = rows[i][j].clone();
            if i > 0 {
                t = blend_axis(&rows[i - 1][j], &t, blend, 2)?;
            }
            if j > 0 {
                t = blend_axis(&rows[i][j - 1], &t, blend, 3)?;
            }
            rows[i][j] = t;
        }
        let parts = rows[i]
            .iter()
            .map(|t| -> Result<Tensor> {
                let (_, _, th, tw) = t.dims4()?;
                Ok(t.narrow(2, 0, limit.min(th))?.narrow(3, 0, limit.min(tw))?)
            })
            .collect::<Result<Vec<_>>>()?;
        out_rows.push(Tensor::cat(&parts, 3)?);
    }
    Ok(Tensor::cat(&out_rows, 2)?)
}

/// `b[.., y] = a[.., -e + y]·(1 − y/e) + b[.., y]·(y/e)` for `y < e` along `dim`.
fn blend_axis(a: &Tensor, b: &Tensor, extent: usize, dim: usize) -> Result<Tensor> {
    let e = extent.min(a.dim(dim)?).min(b.dim(dim)?);
    if e == 0 {
        return Ok(b.clone());
    }
    let na = a.dim(dim)?;
    let nb = b.dim(dim)?;
    let dev = b.device();
    let wb: Vec<f32> = (0..e).map(|y| y as f32 / e as f32).collect();
    let wa: Vec<f32> = wb.iter().map(|v| 1.0 - v).collect();
    let mut shape = vec![1usize; 4];
    shape[dim] = e;
    let wa = Tensor::from_vec(wa, shape.clone(), dev)?.to_dtype(b.dtype())?;
    let wb = Tensor::from_vec(wb, shape, dev)?.to_dtype(b.dtype())?;
    let head = (a.narrow(dim, na - e, e)?.broadcast_mul(&wa)?
        + b.narrow(dim, 0, e)?.broadcast_mul(&wb)?)?;
    if nb == e {
        return Ok(head);
    }
    Ok(Tensor::cat(&[head, b.narrow(dim, e, nb - e)?], dim)?)
}

/// Whether a safetensors file is a BFL / LDM-named autoencoder.
pub fn is_ldm_vae(path: &Path) -> Result<bool> {
    // SAFETY: read-only mapping of a model file (see SafetensorsStore::open).
    let st = unsafe { MmapedSafetensors::new(path) }.map_err(|e| ModelError::bad_file(path, e))?;
    Ok(st.get("encoder.down.0.block.0.conv1.weight").is_ok())
}

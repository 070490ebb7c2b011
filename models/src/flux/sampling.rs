//! Schedule, timestep conditioning, latent packing and position tables of diffusers'
//! `FluxFillPipeline`, computed the way diffusers computes them (numerics noted per function).

use candle_core::{DType, Device, Tensor};

use super::config::SchedulerConfig;
use crate::error::{ModelError, Result};

/// diffusers `calculate_shift` (f64, not clamped): `mu` for a packed image sequence length.
pub fn calculate_shift(image_seq_len: usize, cfg: &SchedulerConfig) -> f64 {
    let m = (cfg.max_shift - cfg.base_shift)
        / (cfg.max_image_seq_len as f64 - cfg.base_image_seq_len as f64);
    let b = cfg.base_shift - m * cfg.base_image_seq_len as f64;
    image_seq_len as f64 * m + b
}

/// numpy `linspace(start, stop, n)` (f64, endpoint included).
fn linspace(start: f64, stop: f64, n: usize) -> Vec<f64> {
    match n {
        0 => vec![],
        1 => vec![start],
        _ => {
            let step = (stop - start) / (n - 1) as f64;
            let mut v: Vec<f64> = (0..n).map(|i| i as f64 * step + start).collect();
            v[n - 1] = stop;
            v
        }
    }
}

/// The pipeline's sigmas for `steps` steps at `height`×`width` pixels, with the terminal 0
/// appended (`steps + 1` values), exactly as `FluxFillPipeline` + `FlowMatchEulerDiscreteScheduler`
/// compute them: `linspace(1, 1/N, N)` in f64 cast to f32, then the time shift in f32.
pub fn sigmas(
    steps: usize,
    height: usize,
    width: usize,
    vae_scale: usize,
    cfg: &SchedulerConfig,
) -> Vec<f32> {
    let seq = (height / vae_scale / 2) * (width / vae_scale / 2);
    let mu = calculate_shift(seq, cfg);
    let base: Vec<f32> = linspace(1.0, 1.0 / steps as f64, steps)
        .into_iter()
        .map(|s| s as f32)
        .collect();
    let mut out: Vec<f32> = if cfg.use_dynamic_shifting {
        let linear = cfg.time_shift_type == "linear";
        // numpy: the Python float is cast to the array dtype (f32) before each op.
        let e = if linear { mu as f32 } else { mu.exp() as f32 };
        base.iter()
            .map(|&t| e / (e + (1.0f32 / t - 1.0f32)))
            .collect()
    } else {
        let s = cfg.shift as f32;
        base.iter()
            .map(|&t| s * t / (1.0f32 + (s - 1.0f32) * t))
            .collect()
    };
    out.push(0.0);
    out
}

/// `timesteps = sigmas * num_train_timesteps` (f32), one per step.
pub fn timesteps(sigmas: &[f32], cfg: &SchedulerConfig) -> Vec<f32> {
    let n = cfg.num_train_timesteps as f32;
    sigmas[..sigmas.len().saturating_sub(1)]
        .iter()
        .map(|&s| s * n)
        .collect()
}

/// Rounds an f32 to the nearest value of `dtype` (round-to-nearest-even), as a tensor cast does.
pub fn round_to(x: f32, dtype: DType) -> f32 {
    match dtype {
        DType::BF16 => half::bf16::from_f32(x).to_f32(),
        DType::F16 => half::f16::from_f32(x).to_f32(),
        _ => x,
    }
}

/// The timestep and guidance values the transformer's sinusoidal embeddings see, after the
/// pipeline's and transformer's casts to `dtype`: `t → dtype`, `/1000` (in `dtype`), then in the
/// transformer `→ dtype`, `×1000` (in `dtype`); guidance `→ dtype`, `×1000`. With bf16 (the
/// shipped recipe) t = 993.58 becomes 992 and guidance 30 becomes 29952.
pub fn model_time_inputs(t: f32, guidance: f32, dtype: DType) -> (f32, f32) {
    let ts = round_to(round_to(t, dtype) / 1000.0, dtype);
    let t_model = round_to(round_to(ts, dtype) * 1000.0, dtype);
    let g_model = round_to(round_to(guidance, dtype) * 1000.0, dtype);
    (t_model, g_model)
}

/// diffusers `get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)` in f32:
/// `[cos(t·f), sin(t·f)]` with `f_k = exp(-ln(10000)·k/(dim/2))`. Returns `[B, dim]` f32.
pub fn timestep_embedding(t: &[f32], dim: usize, device: &Device) -> Result<Tensor> {
    let half = dim / 2;
    let c = (-(10_000f64).ln()) as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|k| ((c * k as f32) / half as f32).exp())
        .collect();
    let mut out = Vec::with_capacity(t.len() * dim);
    for &tv in t {
        let args: Vec<f32> = freqs.iter().map(|f| tv * f).collect();
        out.extend(args.iter().map(|a| a.cos()));
        out.extend(args.iter().map(|a| a.sin()));
        if dim % 2 == 1 {
            out.push(0.0);
        }
    }
    Ok(Tensor::from_vec(out, (t.len(), dim), device)?)
}

/// `_pack_latents`: `[B, C, h, w]` → `[B, (h/2)(w/2), 4C]`, feature index `c·4 + py·2 + px`.
pub fn pack_latents(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if h % 2 != 0 || w % 2 != 0 {
        return Err(ModelError::InvalidInput(format!(
            "latent size {h}x{w} is not even"
        )));
    }
    Ok(x.reshape((b, c, h / 2, 2, w / 2, 2))?
        .permute((0, 2, 4, 1, 3, 5))?
        .reshape((b, (h / 2) * (w / 2), c * 4))?)
}

/// `_unpack_latents`: `[B, (h/2)(w/2), 4C]` → `[B, C, h, w]` for latent size `h`×`w`.
pub fn unpack_latents(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (b, l, c4) = x.dims3()?;
    if l != (h / 2) * (w / 2) || c4 % 4 != 0 {
        return Err(ModelError::InvalidInput(format!(
            "cannot unpack {:?} to {h}x{w} latents",
            x.dims()
        )));
    }
    Ok(x.reshape((b, h / 2, w / 2, c4 / 4, 2, 2))?
        .permute((0, 3, 1, 4, 2, 5))?
        .reshape((b, c4 / 4, h, w))?)
}

/// FLUX Fill mask conditioning: `[B, 1, H, W]` pixel mask → 8×8 space-to-depth `[B, 64, h, w]`
/// (channel `dy·8 + dx`) → packed `[B, (h/2)(w/2), 256]`.
pub fn pack_mask(mask: &Tensor, vae_scale: usize) -> Result<Tensor> {
    let (b, c, hh, ww) = mask.dims4()?;
    if c != 1 || hh % vae_scale != 0 || ww % vae_scale != 0 {
        return Err(ModelError::InvalidInput(format!(
            "mask {:?} is not [B,1,H,W] with H,W multiples of {vae_scale}",
            mask.dims()
        )));
    }
    let (h, w) = (hh / vae_scale, ww / vae_scale);
    let s2d = mask
        .reshape((b, h, vae_scale, w, vae_scale))?
        .permute((0, 2, 4, 1, 3))?
        .reshape((b, vae_scale * vae_scale, h, w))?;
    pack_latents(&s2d)
}

/// Rotary tables of `FluxPosEmbed` for `[txt (all-zero ids); img ([0, row, col], row-major)]`:
/// angles in f64 (`pos · 1/θ^(2k/d)` per axis), cos/sin cast to f32, one value per pair: `[S, D/2]`.
#[derive(Debug, Clone)]
pub struct Rope {
    pub cos: Tensor,
    pub sin: Tensor,
    pub txt_len: usize,
}

impl Rope {
    pub fn new(
        txt_len: usize,
        h2: usize,
        w2: usize,
        axes: &[usize],
        theta: f64,
        device: &Device,
    ) -> Result<Self> {
        let half: usize = axes.iter().sum::<usize>() / 2;
        let s = txt_len + h2 * w2;
        let mut cos = Vec::with_capacity(s * half);
        let mut sin = Vec::with_capacity(s * half);
        let freqs: Vec<Vec<f64>> = axes
            .iter()
            .map(|&d| {
                (0..d / 2)
                    .map(|k| 1.0 / theta.powf((2 * k) as f64 / d as f64))
                    .collect()
            })
            .collect();
        let mut push = |ids: [f64; 3]| {
            for (axis, fs) in freqs.iter().enumerate() {
                for f in fs {
                    let a = ids[axis] * f;
                    cos.push(a.cos() as f32);
                    sin.push(a.sin() as f32);
                }
            }
        };
        for _ in 0..txt_len {
            push([0.0, 0.0, 0.0]);
        }
        for r in 0..h2 {
            for c in 0..w2 {
                push([0.0, r as f64, c as f64]);
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (s, half), device)?,
            sin: Tensor::from_vec(sin, (s, half), device)?,
            txt_len,
        })
    }

    /// Rows `start..start+len`.
    pub fn rows(&self, start: usize, len: usize) -> Result<(Tensor, Tensor)> {
        Ok((
            self.cos.narrow(0, start, len)?,
            self.sin.narrow(0, start, len)?,
        ))
    }
}

/// One Euler step of `FlowMatchEulerDiscreteScheduler` in f32:
/// `latents + (σ_next − σ)·v` (the product first, as diffusers does).
pub fn euler_step(
    latents: &Tensor,
    velocity: &Tensor,
    sigma: f32,
    sigma_next: f32,
) -> Result<Tensor> {
    let dt = sigma_next - sigma;
    let v = velocity.to_dtype(DType::F32)?.affine(dt as f64, 0.0)?;
    let out = (latents.to_dtype(DType::F32)? + v)?;
    crate::accounting::elementwise(&[latents, velocity], &out);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_time_chain_matches_the_documented_values() {
        assert_eq!(
            model_time_inputs(993.58, 30.0, DType::BF16),
            (992.0, 29952.0)
        );
        assert_eq!(
            model_time_inputs(1000.0, 3.5, DType::BF16),
            (1000.0, 3504.0)
        );
        assert_eq!(model_time_inputs(986.98, 30.0, DType::BF16).0, 988.0);
        let (t, g) = model_time_inputs(500.0, 30.0, DType::F32);
        assert!((t - 500.0).abs() < 1e-3 && g == 30_000.0);
    }

    #[test]
    fn shift_is_dynamic_and_unclamped() {
        let cfg = SchedulerConfig::default();
        assert!((calculate_shift(4096, &cfg) - 1.15).abs() < 1e-12);
        assert!((calculate_shift(256, &cfg) - 0.5).abs() < 1e-12);
        assert!(calculate_shift(102 * 77, &cfg) > 1.15);
        let s = sigmas(50, 1024, 1024, 8, &cfg);
        assert_eq!(s.len(), 51);
        assert_eq!(s[0], 1.0);
        assert_eq!(s[50], 0.0);
        assert!(
            (s[1] - 0.99358).abs() < 1e-5 && (s[49] - 0.06055).abs() < 1e-5,
            "{:?}",
            &s[..3]
        );
    }

    #[test]
    fn pack_unpack_roundtrip_and_layout() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::arange(0f32, 2.0 * 3.0 * 4.0 * 6.0, &dev)?.reshape((2, 3, 4, 6))?;
        let p = pack_latents(&x)?;
        assert_eq!(p.dims(), &[2, 6, 12]);
        // token (row 0, col 1), feature c=1, py=1, px=0 → x[0, 1, 1, 2]
        let v = p.get(0)?.get(1)?.get(4 + 2)?.to_scalar::<f32>()?;
        assert_eq!(v, x.get(0)?.get(1)?.get(1)?.get(2)?.to_scalar::<f32>()?);
        let back = unpack_latents(&p, 4, 6)?;
        assert_eq!(
            back.flatten_all()?.to_vec1::<f32>()?,
            x.flatten_all()?.to_vec1::<f32>()?
        );
        Ok(())
    }

    #[test]
    fn mask_space_to_depth_channel_order() -> Result<()> {
        let dev = Device::Cpu;
        // 16x16 mask with a single pixel at (y=9, x=3): latent (1, 0), dy=1, dx=3 → channel 11;
        // packed token 0 (h2=0, w2=0), feature = 11·4 + py·2 + px with py=1, px=0.
        let mut m = vec![0f32; 256];
        m[9 * 16 + 3] = 1.0;
        let mask = Tensor::from_vec(m, (1, 1, 16, 16), &dev)?;
        let p = pack_mask(&mask, 8)?;
        assert_eq!(p.dims(), &[1, 1, 256]);
        let v = p.flatten_all()?.to_vec1::<f32>()?;
        let idx: Vec<usize> = v
            .iter()
            .enumerate()
            .filter(|(_, x)| **x != 0.0)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(idx, vec![11 * 4 + 2]);
        Ok(())
    }

    #[test]
    fn rope_text_rows_are_identity() -> Result<()> {
        let r = Rope::new(3, 2, 2, &[4, 6, 6], 10_000.0, &Device::Cpu)?;
        assert_eq!(r.cos.dims(), &[7, 8]);
        let c = r.cos.narrow(0, 0, 3)?.flatten_all()?.to_vec1::<f32>()?;
        assert!(c.iter().all(|v| *v == 1.0));
        // last image token (row 1, col 1): axis 1 pair 0 has angle 1·1 = 1 rad.
        let v = r.cos.get(6)?.to_vec1::<f32>()?;
        assert!((v[2] - 1f64.cos() as f32).abs() < 1e-7 && v[0] == 1.0);
        Ok(())
    }
}

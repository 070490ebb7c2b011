//! Plain-candle reference implementations. Numerics follow diffusers / transformers:
//! reductions in f32, results cast back to the input dtype.

use candle_core::{D, DType, Result, Tensor};

/// Largest finite f16, the bound diffusers clips FLUX activations to in fp16.
pub const F16_MAX: f64 = 65504.0;

/// `softmax(q·kᵀ·scale)·v` for q `[B, H, Nq, D]`, k and v `[B, H, Nk, D]`.
///
/// With `causal`, query `i` sees keys `0..=i + (Nk - Nq)` (the usual alignment when the
/// queries are the last `Nq` positions, as in a decoder with a KV cache).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, causal: bool) -> Result<Tensor> {
    let dtype = q.dtype();
    let (q, k, v) = (
        q.to_dtype(DType::F32)?,
        k.to_dtype(DType::F32)?,
        v.to_dtype(DType::F32)?,
    );
    let mut scores = (q.contiguous()?.matmul(&k.t()?.contiguous()?)? * scale)?;
    if causal {
        let (nq, nk) = (q.dim(2)?, k.dim(2)?);
        if nq > nk {
            candle_core::bail!("causal attention needs Nq <= Nk, got Nq={nq} Nk={nk}");
        }
        let offset = nk - nq;
        let mask: Vec<f32> = (0..nq)
            .flat_map(|i| {
                (0..nk).map(move |j| {
                    if j > i + offset {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (nq, nk), q.device())?;
        scores = scores.broadcast_add(&mask)?;
    }
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    probs.matmul(&v.contiguous()?)?.to_dtype(dtype)
}

/// LayerNorm over the last dim without affine parameters.
pub fn layer_norm_no_affine(x: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    xc.broadcast_div(&(var + eps)?.sqrt()?)?.to_dtype(dtype)
}

/// `(1 + scale) · LN(x) + shift` (AdaLayerNorm modulation). `x` is `[B, N, C]`; `shift` and
/// `scale` broadcast against it (`[B, 1, C]` or `[B, C]`).
pub fn layer_norm_modulate(x: &Tensor, shift: &Tensor, scale: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let n = layer_norm_no_affine(&x.to_dtype(DType::F32)?, eps)?;
    let (shift, scale) = (as_row(shift, x)?, as_row(scale, x)?);
    n.broadcast_mul(&(scale.to_dtype(DType::F32)? + 1.0)?)?
        .broadcast_add(&shift.to_dtype(DType::F32)?)?
        .to_dtype(dtype)
}

/// `x + gate · y`, clipped to ±65504 when `clamp_f16` is set and the dtype is f16 (as diffusers does
/// at the end of FLUX blocks). `gate` broadcasts against `y` (`[B, 1, C]` or `[B, C]`).
pub fn gated_residual(x: &Tensor, gate: &Tensor, y: &Tensor, clamp_f16: bool) -> Result<Tensor> {
    let gate = as_row(gate, y)?;
    let out = (x + y.broadcast_mul(&gate)?)?;
    if clamp_f16 && out.dtype() == DType::F16 {
        out.clamp(-F16_MAX, F16_MAX)
    } else {
        Ok(out)
    }
}

/// RMSNorm over the head dim, then rotary embedding on interleaved pairs (FLUX).
///
/// `x` is `[B, H, N, D]`, `weight` `[D]`, `cos` and `sin` `[N, D/2]` (f32; one angle per pair).
/// Computed in f32: `n = x / sqrt(mean(x²) + eps) · weight`, then for each pair
/// `(a, b) → (a·cos − b·sin, b·cos + a·sin)`.
pub fn qk_rmsnorm_rope(
    x: &Tensor,
    weight: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let rms = (xf.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?;
    let n = xf
        .broadcast_div(&rms)?
        .broadcast_mul(&weight.to_dtype(DType::F32)?)?;
    // diffusers casts the normed q/k back to the input dtype before RoPE.
    let n = n.to_dtype(dtype)?.to_dtype(DType::F32)?;
    rope_interleaved(&n, cos, sin)?.to_dtype(dtype)
}

/// Rotary embedding on interleaved pairs, in f32. `x` `[B, H, N, D]`, `cos`/`sin` `[N, D/2]`.
pub fn rope_interleaved(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    let (b, h, n, d) = x.dims4()?;
    if d % 2 != 0 {
        candle_core::bail!("rope needs an even head dim, got {d}");
    }
    let (cos, sin) = (cos.to_dtype(DType::F32)?, sin.to_dtype(DType::F32)?);
    if cos.dims() != [n, d / 2] || sin.dims() != [n, d / 2] {
        candle_core::bail!(
            "rope cos/sin must be [{n}, {}], got {:?} and {:?}",
            d / 2,
            cos.dims(),
            sin.dims()
        );
    }
    let x = x.to_dtype(DType::F32)?.reshape((b, h, n, d / 2, 2))?;
    let a = x.narrow(D::Minus1, 0, 1)?.squeeze(D::Minus1)?;
    let bb = x.narrow(D::Minus1, 1, 1)?.squeeze(D::Minus1)?;
    let ra = (a.broadcast_mul(&cos)? - bb.broadcast_mul(&sin)?)?;
    let rb = (bb.broadcast_mul(&cos)? + a.broadcast_mul(&sin)?)?;
    Tensor::stack(&[ra, rb], D::Minus1)?
        .reshape((b, h, n, d))?
        .to_dtype(dtype)
}

/// `gelu_tanh(x + bias)`, the epilogue of FLUX's MLP input linears. `bias` is `[C]`.
pub fn bias_gelu_tanh(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    x.to_dtype(DType::F32)?
        .broadcast_add(&bias.to_dtype(DType::F32)?)?
        .gelu()?
        .to_dtype(dtype)
}

/// `[B, C]` → `[B, 1, C]` when `like` is rank 3; otherwise unchanged.
fn as_row(t: &Tensor, like: &Tensor) -> Result<Tensor> {
    if t.rank() == 2 && like.rank() == 3 {
        t.unsqueeze(1)
    } else {
        Ok(t.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, IndexOp};

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .and_then(|d| d.abs())
            .and_then(|d| d.flatten_all())
            .and_then(|d| d.max(0))
            .and_then(|d| d.to_scalar::<f32>())
            .expect("diff")
    }

    #[test]
    fn attention_matches_explicit_softmax() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (1, 2, 5, 8), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (1, 2, 7, 8), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (1, 2, 7, 8), &dev)?;
        let out = attention(&q, &k, &v, 0.25, false)?;
        // one row by hand
        let s = (q.i((0, 1, 3))?.unsqueeze(0)?.matmul(&k.i((0, 1))?.t()?)? * 0.25)?;
        let e = s.exp()?;
        let p = e.broadcast_div(&e.sum_keepdim(1)?)?;
        let row = p.matmul(&v.i((0, 1))?)?.squeeze(0)?;
        assert!(max_abs_diff(&out.i((0, 1, 3))?, &row) < 1e-5);
        Ok(())
    }

    #[test]
    fn causal_attention_ignores_the_future() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (1, 1, 4, 8), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (1, 1, 4, 8), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (1, 1, 4, 8), &dev)?;
        let full = attention(&q, &k, &v, 0.3, true)?;
        // The first query sees only the first key: output = v[0].
        assert!(max_abs_diff(&full.i((0, 0, 0))?, &v.i((0, 0, 0))?) < 1e-6);
        // Decoding the last position alone with the whole cache gives the same row.
        let last = attention(&q.narrow(2, 3, 1)?, &k, &v, 0.3, true)?;
        assert!(max_abs_diff(&last.i((0, 0, 0))?, &full.i((0, 0, 3))?) < 1e-6);
        assert!(attention(&k, &q.narrow(2, 0, 2)?, &v.narrow(2, 0, 2)?, 1.0, true).is_err());
        Ok(())
    }

    #[test]
    fn modulate_is_affine_of_layer_norm() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 3.0, (2, 6, 16), &dev)?;
        let shift = Tensor::randn(0f32, 1.0, (2, 16), &dev)?;
        let scale = Tensor::randn(0f32, 1.0, (2, 16), &dev)?;
        let out = layer_norm_modulate(&x, &shift, &scale, 1e-6)?;
        let ln = candle_nn::LayerNorm::new_no_bias(Tensor::ones(16, DType::F32, &dev)?, 1e-6);
        let want = candle_core::Module::forward(&ln, &x)?
            .broadcast_mul(&(scale.unsqueeze(1)? + 1.0)?)?
            .broadcast_add(&shift.unsqueeze(1)?)?;
        assert!(max_abs_diff(&out, &want) < 1e-5);
        Ok(())
    }

    #[test]
    fn gated_residual_clamps_only_f16() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[[60000f32, 1.0]]], &dev)?;
        let y = Tensor::new(&[[[10000f32, 1.0]]], &dev)?;
        let g = Tensor::new(&[[1f32, 2.0]], &dev)?;
        let f32_out = gated_residual(&x, &g, &y, true)?;
        assert_eq!(f32_out.flatten_all()?.to_vec1::<f32>()?, vec![70000.0, 3.0]);
        let h = gated_residual(
            &x.to_dtype(DType::F16)?,
            &g.to_dtype(DType::F16)?,
            &y.to_dtype(DType::F16)?,
            true,
        )?;
        let h = h.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(h, vec![65504.0, 3.0]);
        Ok(())
    }

    #[test]
    fn rope_rotates_pairs() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::new(&[1f32, 0.0, 0.0, 1.0], &dev)?.reshape((1, 1, 1, 4))?;
        let half = std::f32::consts::FRAC_PI_2;
        let cos = Tensor::new(&[[half.cos(), 1.0]], &dev)?;
        let sin = Tensor::new(&[[half.sin(), 0.0]], &dev)?;
        let out = rope_interleaved(&x, &cos, &sin)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let want = [0.0f32, 1.0, 0.0, 1.0];
        for (o, w) in out.iter().zip(want) {
            assert!((o - w).abs() < 1e-6, "{out:?}");
        }
        assert!(rope_interleaved(&x, &cos.narrow(1, 0, 1)?, &sin,).is_err());
        Ok(())
    }

    #[test]
    fn rmsnorm_rope_with_zero_angle_is_rmsnorm() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 2.0, (1, 2, 3, 8), &dev)?;
        let w = Tensor::randn(0f32, 1.0, 8, &dev)?;
        let cos = Tensor::ones((3, 4), DType::F32, &dev)?;
        let sin = Tensor::zeros((3, 4), DType::F32, &dev)?;
        let out = qk_rmsnorm_rope(&x, &w, &cos, &sin, 1e-6)?;
        let want = candle_nn::ops::rms_norm(&x, &w, 1e-6)?;
        assert!(max_abs_diff(&out, &want) < 1e-5);
        Ok(())
    }

    #[test]
    fn bias_gelu_matches_candle_gelu() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 2.0, (3, 8), &dev)?;
        let b = Tensor::randn(0f32, 1.0, 8, &dev)?;
        let want = x.broadcast_add(&b)?.gelu()?;
        assert!(max_abs_diff(&bias_gelu_tanh(&x, &b)?, &want) < 1e-6);
        Ok(())
    }
}

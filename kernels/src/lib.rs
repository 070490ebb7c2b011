//! Hot-path ops of the FLUX transformer and Florence-2, with one API on every device.
//!
//! Each public function checks its input shapes (a clear error on a mismatch), then runs either
//! a fused CUDA kernel (with the `cuda` feature, on CUDA tensors of a supported dtype and shape)
//! or the plain-candle reference in [`reference`], which is the CPU implementation and the ground
//! truth the kernels are checked against.
//!
//! Fused paths (CUDA, `cuda` feature):
//!
//! | op | dtypes | fused when |
//! |---|---|---|
//! | [`attention`], [`attention_merged_heads`] | f16; bf16 on builds for compute capability >= 8.0 | head dim 32, 64 or 128, `v` with the same head dim |
//! | [`layer_norm_modulate`], [`layer_norm_no_affine`] | f32, f16, bf16 (>= 8.0) | all inputs of one dtype, C <= 16384 for f16/bf16, 8192 for f32 (2048 if a row is not a multiple of 16 bytes) |
//! | [`gated_residual`] | f32, f16, bf16 (>= 8.0) | always (after the shape checks) |
//! | [`qk_rmsnorm_rope`], [`rope_interleaved`] | f32, f16, bf16 (>= 8.0) | head dim <= 256, weight of the dtype of `x`, cos/sin in f32 |
//! | [`bias_gelu_tanh`] | f32, f16, bf16 (>= 8.0) | bias of the dtype of `x` |
//! | [`linear_bias`], [`linear_bias_gelu_tanh`] (cuBLASLt epilogue) | f16, bf16 (>= 8.0) | always (after the shape checks) |
//!
//! Anything else runs the reference path. Non-contiguous inputs are accepted everywhere; the
//! attention and RoPE kernels read strided `[B, H, N, D]` views (e.g. a transposed `[B, N, H, D]`)
//! without a copy, the others copy such inputs first. Outputs are always contiguous.

pub mod fallback;
pub mod reference;

#[cfg(feature = "cuda")]
mod cuda;

use candle_core::{DType, Result, Tensor};

pub use reference::F16_MAX;

/// Compute capability the CUDA kernels of this build target (`CUDA_COMPUTE_CAP` at build time),
/// or `None` without the `cuda` feature.
pub fn build_compute_cap() -> Option<u32> {
    #[cfg(feature = "cuda")]
    {
        Some(cuda::BUILD_COMPUTE_CAP)
    }
    #[cfg(not(feature = "cuda"))]
    {
        None
    }
}

/// Fill the output buffer of every fused kernel with NaN before the kernel runs, so that an
/// element a kernel fails to write shows up in checks. Off by default; costs one memset per call.
pub fn set_poison_outputs(on: bool) {
    POISON.store(on, std::sync::atomic::Ordering::Relaxed);
}

static POISON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn poison_outputs() -> bool {
    POISON.load(std::sync::atomic::Ordering::Relaxed)
}

/// A shape or dtype the op cannot take.
#[derive(Debug, thiserror::Error)]
#[error("pawfect-kernels {op}: {msg}")]
pub struct ShapeError {
    pub op: &'static str,
    pub msg: String,
}

fn shape_err(op: &'static str, msg: String) -> candle_core::Error {
    candle_core::Error::wrap(ShapeError { op, msg })
}

/// `softmax(q·kᵀ·scale)·v` for q `[B, H, Nq, D]`, k `[B, H, Nk, D]`, v `[B, H, Nk, Dv]`; returns
/// `[B, H, Nq, Dv]` in the dtype of `q`.
///
/// With `causal`, query `i` sees keys `0..=i + (Nk - Nq)` (the queries are the last `Nq`
/// positions, as in a decoder with a KV cache), which needs `Nq <= Nk`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, causal: bool) -> Result<Tensor> {
    check_attention(q, k, v, scale, causal)?;
    #[cfg(feature = "cuda")]
    if let Some(out) = cuda::attention(q, k, v, scale, causal, false)? {
        return Ok(out);
    }
    fallback::note("attention", q);
    reference::attention(q, k, v, scale, causal)
}

/// [`attention`] with the heads merged into the output: returns `[B, Nq, H·Dv]`, what an attention
/// block feeds its output projection, without the transpose copy that
/// `attention(..)?.transpose(1, 2)?.reshape(..)` costs. The fused kernel writes this layout directly.
pub fn attention_merged_heads(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    causal: bool,
) -> Result<Tensor> {
    check_attention(q, k, v, scale, causal)?;
    #[cfg(feature = "cuda")]
    if let Some(out) = cuda::attention(q, k, v, scale, causal, true)? {
        return Ok(out);
    }
    fallback::note("attention_merged_heads", q);
    reference::attention_merged_heads(q, k, v, scale, causal)
}

/// LayerNorm over the last dim without affine parameters (f32 statistics).
pub fn layer_norm_no_affine(x: &Tensor, eps: f64) -> Result<Tensor> {
    if x.rank() == 0 || x.dims().last() == Some(&0) {
        return Err(shape_err(
            "layer_norm_no_affine",
            format!("x needs a non-empty last dim, got {:?}", x.dims()),
        ));
    }
    #[cfg(feature = "cuda")]
    if let Some(out) = cuda::layer_norm(x, None, eps)? {
        return Ok(out);
    }
    fallback::note("layer_norm_no_affine", x);
    reference::layer_norm_no_affine(x, eps)
}

/// `(1 + scale) · LN(x) + shift` (AdaLayerNorm modulation, LayerNorm without affine parameters).
///
/// `x` is `[B, N, C]`; `shift` and `scale` are `[B, C]`, `[B, 1, C]`, `[1, C]`, `[1, 1, C]` or `[C]`.
pub fn layer_norm_modulate(x: &Tensor, shift: &Tensor, scale: &Tensor, eps: f64) -> Result<Tensor> {
    const OP: &str = "layer_norm_modulate";
    let (b, _, c) = x
        .dims3()
        .map_err(|_| shape_err(OP, format!("x must be [B, N, C], got {:?}", x.dims())))?;
    if c == 0 {
        return Err(shape_err(OP, "x has an empty last dim".into()));
    }
    let per_batch = mod_rows(OP, "shift", shift, b, c)?;
    if mod_rows(OP, "scale", scale, b, c)? != per_batch {
        // Valid for the reference (it broadcasts each separately); the kernel wants one layout.
        fallback::note("layer_norm_modulate", x);
        return reference::layer_norm_modulate(x, shift, scale, eps);
    }
    #[cfg(feature = "cuda")]
    if let Some(out) = cuda::layer_norm(x, Some((shift, scale, per_batch)), eps)? {
        return Ok(out);
    }
    fallback::note("layer_norm_modulate", x);
    reference::layer_norm_modulate(x, shift, scale, eps)
}

/// `x + gate · y`, clipped to ±65504 when `clamp_f16` is set and the dtype is f16 (as diffusers
/// does at the end of FLUX blocks in fp16). `x` and `y` are `[B, N, C]` (or `[N, C]`), all three of
/// one dtype; `gate` is `[B, C]`, `[B, 1, C]`, `[1, C]`, `[1, 1, C]` or `[C]` (`[1, C]` or `[C]` for
/// rank-2 inputs).
pub fn gated_residual(x: &Tensor, gate: &Tensor, y: &Tensor, clamp_f16: bool) -> Result<Tensor> {
    const OP: &str = "gated_residual";
    if x.dims() != y.dims() {
        return Err(shape_err(
            OP,
            format!(
                "x and y must have one shape, got {:?} and {:?}",
                x.dims(),
                y.dims()
            ),
        ));
    }
    if x.dtype() != y.dtype() || x.dtype() != gate.dtype() {
        return Err(shape_err(
            OP,
            format!(
                "x, gate and y must share a dtype, got {:?}, {:?}, {:?}",
                x.dtype(),
                gate.dtype(),
                y.dtype()
            ),
        ));
    }
    let (b, c) = match *x.dims() {
        [b, _, c] => (b, c),
        [_, c] => (1, c),
        _ => {
            return Err(shape_err(
                OP,
                format!("x must be [B, N, C] or [N, C], got {:?}", x.dims()),
            ));
        }
    };
    let per_batch = mod_rows(OP, "gate", gate, b, c)?;
    if x.rank() == 2 && gate.rank() > 2 {
        return Err(shape_err(
            OP,
            format!(
                "gate for a rank-2 x must be [C] or [1, C], got {:?}",
                gate.dims()
            ),
        ));
    }
    #[cfg(feature = "cuda")]
    if let Some(out) = cuda::gated_residual(x, gate, y, per_batch, clamp_f16)? {
        return Ok(out);
    }
    let _ = per_batch;
    fallback::note("gated_residual", x);
    reference::gated_residual(x, gate, y, clamp_f16)
}

/// RMSNorm over the head dim, then rotary embedding on interleaved pairs (FLUX).
///
/// `x` is `[B, H, N, D]` (any strides, e.g. a transposed `[B, N, H, D]` view), `weight` `[D]`,
/// `cos` and `sin` `[N, D/2]` (f32; one angle per pair). Computed in f32:
/// `n = x / sqrt(mean(x²) + eps) · weight`, rounded to the dtype of `x`, then for each pair
/// `(a, b) → (a·cos − b·sin, b·cos + a·sin)`. Returns a contiguous `[B, H, N, D]`.
pub fn qk_rmsnorm_rope(
    x: &Tensor,
    weight: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    const OP: &str = "qk_rmsnorm_rope";
    let (_, _, n, d) = check_rope(OP, x, cos, sin)?;
    if weight.dims() != [d] {
        return Err(shape_err(
            OP,
            format!("weight must be [{d}], got {:?}", weight.dims()),
        ));
    }
    #[cfg(feature = "cuda")]
    if let Some(out) = cuda::rms_rope(x, Some(weight), cos, sin, eps)? {
        return Ok(out);
    }
    let _ = n;
    fallback::note("qk_rmsnorm_rope", x);
    reference::qk_rmsnorm_rope(x, weight, cos, sin, eps)
}

/// Rotary embedding on interleaved pairs, in f32. `x` `[B, H, N, D]`, `cos`/`sin` `[N, D/2]`.
pub fn rope_interleaved(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    check_rope("rope_interleaved", x, cos, sin)?;
    #[cfg(feature = "cuda")]
    if let Some(out) = cuda::rms_rope(x, None, cos, sin, 0.0)? {
        return Ok(out);
    }
    fallback::note("rope_interleaved", x);
    reference::rope_interleaved(x, cos, sin)
}

/// `gelu_tanh(x + bias)`, the epilogue of FLUX's MLP input linears. `x` is `[..., C]`, `bias` `[C]`.
pub fn bias_gelu_tanh(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    const OP: &str = "bias_gelu_tanh";
    let c = match x.dims().last() {
        Some(&c) if c > 0 => c,
        _ => {
            return Err(shape_err(
                OP,
                format!("x needs a non-empty last dim, got {:?}", x.dims()),
            ));
        }
    };
    if bias.dims() != [c] {
        return Err(shape_err(
            OP,
            format!("bias must be [{c}], got {:?}", bias.dims()),
        ));
    }
    #[cfg(feature = "cuda")]
    if let Some(out) = cuda::bias_gelu(x, bias)? {
        return Ok(out);
    }
    fallback::note("bias_gelu_tanh", x);
    reference::bias_gelu_tanh(x, bias)
}

/// `x · wᵀ + bias` (a linear layer with its bias): `x` `[..., K]`, `w` `[N, K]`, `bias` `[N]`, all
/// of one dtype; returns `[..., N]`. On CUDA (f16, bf16 on >= 8.0) one cuBLASLt matmul adds the
/// bias in its epilogue, instead of a matmul followed by a broadcast add over the whole output.
pub fn linear_bias(x: &Tensor, w: &Tensor, bias: &Tensor) -> Result<Tensor> {
    check_linear("linear_bias", x, w, bias)?;
    #[cfg(feature = "cuda")]
    if let Some(out) = cuda::linear(x, w, bias, false)? {
        return Ok(out);
    }
    fallback::note("linear_bias", x);
    reference::linear_bias(x, w, bias)
}

/// `gelu_tanh(x · wᵀ + bias)` (FLUX's MLP input linears), shapes as [`linear_bias`]. On CUDA the
/// bias and GELU(tanh) run in the cuBLASLt epilogue (`CUBLASLT_EPILOGUE_GELU_BIAS`).
pub fn linear_bias_gelu_tanh(x: &Tensor, w: &Tensor, bias: &Tensor) -> Result<Tensor> {
    check_linear("linear_bias_gelu_tanh", x, w, bias)?;
    #[cfg(feature = "cuda")]
    if let Some(out) = cuda::linear(x, w, bias, true)? {
        return Ok(out);
    }
    fallback::note("linear_bias_gelu_tanh", x);
    reference::linear_bias_gelu_tanh(x, w, bias)
}

fn check_linear(op: &'static str, x: &Tensor, w: &Tensor, bias: &Tensor) -> Result<()> {
    let k = match x.dims().last() {
        Some(&k) if k > 0 => k,
        _ => {
            return Err(shape_err(
                op,
                format!("x needs a non-empty last dim, got {:?}", x.dims()),
            ));
        }
    };
    let n = match *w.dims() {
        [n, wk] if wk == k && n > 0 => n,
        _ => {
            return Err(shape_err(
                op,
                format!("w must be [N, {k}], got {:?}", w.dims()),
            ));
        }
    };
    if bias.dims() != [n] {
        return Err(shape_err(
            op,
            format!("bias must be [{n}], got {:?}", bias.dims()),
        ));
    }
    if x.dtype() != w.dtype() || x.dtype() != bias.dtype() {
        return Err(shape_err(
            op,
            format!(
                "x, w and bias must share a dtype, got {:?}, {:?}, {:?}",
                x.dtype(),
                w.dtype(),
                bias.dtype()
            ),
        ));
    }
    Ok(())
}

fn check_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, causal: bool) -> Result<()> {
    const OP: &str = "attention";
    let (b, h, nq, d) = q
        .dims4()
        .map_err(|_| shape_err(OP, format!("q must be [B, H, Nq, D], got {:?}", q.dims())))?;
    let (kb, kh, nk, kd) = k
        .dims4()
        .map_err(|_| shape_err(OP, format!("k must be [B, H, Nk, D], got {:?}", k.dims())))?;
    if (kb, kh, kd) != (b, h, d) {
        return Err(shape_err(
            OP,
            format!(
                "k must be [{b}, {h}, Nk, {d}] to match q, got {:?}",
                k.dims()
            ),
        ));
    }
    match *v.dims() {
        [vb, vh, vn, _] if (vb, vh, vn) == (b, h, nk) => {}
        _ => {
            return Err(shape_err(
                OP,
                format!(
                    "v must be [{b}, {h}, {nk}, Dv] to match k, got {:?}",
                    v.dims()
                ),
            ));
        }
    }
    if q.dtype() != k.dtype() || q.dtype() != v.dtype() {
        return Err(shape_err(
            OP,
            format!(
                "q, k and v must share a dtype, got {:?}, {:?}, {:?}",
                q.dtype(),
                k.dtype(),
                v.dtype()
            ),
        ));
    }
    if nq == 0 || nk == 0 || d == 0 {
        return Err(shape_err(
            OP,
            format!("empty inputs: q {:?}, k {:?}", q.dims(), k.dims()),
        ));
    }
    if causal && nq > nk {
        return Err(shape_err(
            OP,
            format!("causal attention needs Nq <= Nk, got Nq={nq} Nk={nk}"),
        ));
    }
    if !(scale.is_finite() && scale > 0.0) {
        return Err(shape_err(
            OP,
            format!("scale must be finite and positive, got {scale}"),
        ));
    }
    Ok(())
}

fn check_rope(
    op: &'static str,
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<(usize, usize, usize, usize)> {
    let (b, h, n, d) = x
        .dims4()
        .map_err(|_| shape_err(op, format!("x must be [B, H, N, D], got {:?}", x.dims())))?;
    if d == 0 || d % 2 != 0 {
        return Err(shape_err(
            op,
            format!("the head dim must be even and non-zero, got {d}"),
        ));
    }
    if cos.dims() != [n, d / 2] || sin.dims() != [n, d / 2] {
        return Err(shape_err(
            op,
            format!(
                "cos/sin must be [{n}, {}], got {:?} and {:?}",
                d / 2,
                cos.dims(),
                sin.dims()
            ),
        ));
    }
    if !matches!(
        x.dtype(),
        DType::F16 | DType::BF16 | DType::F32 | DType::F64
    ) {
        return Err(shape_err(
            op,
            format!("x must be a float tensor, got {:?}", x.dtype()),
        ));
    }
    Ok((b, h, n, d))
}

/// Checks a modulation tensor (shift, scale, gate) against `x` `[B, N, C]`: returns whether it has
/// one row per batch (`[B, C]`, `[B, 1, C]` with B > 1) rather than one row for all.
fn mod_rows(op: &'static str, name: &str, t: &Tensor, b: usize, c: usize) -> Result<bool> {
    match *t.dims() {
        [tc] if tc == c => Ok(false),
        [1, tc] | [1, 1, tc] if tc == c => Ok(false),
        [tb, tc] | [tb, 1, tc] if tb == b && tc == c => Ok(b > 1),
        _ => Err(shape_err(
            op,
            format!(
                "{name} must be [B, C], [B, 1, C], [1, C] or [C] with B={b}, C={c}; got {:?}",
                t.dims()
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn rand(shape: &[usize], dtype: DType) -> Tensor {
        Tensor::randn(0f32, 1.0, shape, &Device::Cpu)
            .and_then(|t| t.to_dtype(dtype))
            .expect("randn")
    }

    fn err_text(r: Result<Tensor>) -> String {
        match r {
            Ok(t) => panic!("expected an error, got a tensor of shape {:?}", t.dims()),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn public_api_runs_the_reference_on_cpu() -> Result<()> {
        let q = rand(&[1, 2, 5, 8], DType::F32);
        let k = rand(&[1, 2, 7, 8], DType::F32);
        let v = rand(&[1, 2, 7, 8], DType::F32);
        let a = attention(&q, &k, &v, 0.3, false)?;
        let r = reference::attention(&q, &k, &v, 0.3, false)?;
        assert_eq!(a.dims(), [1, 2, 5, 8]);
        let diff = (a - r)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);
        Ok(())
    }

    #[test]
    fn attention_shape_errors_are_clear() {
        let q = rand(&[1, 2, 5, 8], DType::F32);
        let k = rand(&[1, 2, 7, 8], DType::F32);
        let v = rand(&[1, 2, 7, 8], DType::F32);
        let e = err_text(attention(&q.flatten(0, 1).unwrap(), &k, &v, 1.0, false));
        assert!(e.contains("q must be [B, H, Nq, D]"), "{e}");
        let e = err_text(attention(
            &q,
            &rand(&[1, 2, 7, 4], DType::F32),
            &v,
            1.0,
            false,
        ));
        assert!(e.contains("k must be [1, 2, Nk, 8]"), "{e}");
        let e = err_text(attention(
            &q,
            &k,
            &rand(&[1, 2, 6, 8], DType::F32),
            1.0,
            false,
        ));
        assert!(e.contains("v must be [1, 2, 7, Dv]"), "{e}");
        let e = err_text(attention(
            &q,
            &k,
            &v.to_dtype(DType::F16).unwrap(),
            1.0,
            false,
        ));
        assert!(e.contains("share a dtype"), "{e}");
        let e = err_text(attention(&k, &q, &q, 1.0, true));
        assert!(e.contains("Nq <= Nk"), "{e}");
        let e = err_text(attention(&q, &k, &v, f64::NAN, false));
        assert!(e.contains("scale"), "{e}");
        let m = attention_merged_heads(&q, &k, &v, 0.3, false).unwrap();
        let want = attention(&q, &k, &v, 0.3, false)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((1, 5, 16))
            .unwrap();
        assert_eq!(m.dims(), [1, 5, 16]);
        assert_eq!(
            m.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            want.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        // Dv != D is fine (reference path).
        assert_eq!(
            attention(&q, &k, &rand(&[1, 2, 7, 3], DType::F32), 1.0, false)
                .unwrap()
                .dims(),
            [1, 2, 5, 3]
        );
    }

    #[test]
    fn modulation_shapes() -> Result<()> {
        let x = rand(&[2, 3, 8], DType::F32);
        for shape in [&[2, 8][..], &[2, 1, 8], &[1, 8], &[1, 1, 8], &[8]] {
            let m = rand(shape, DType::F32);
            assert_eq!(
                layer_norm_modulate(&x, &m, &m, 1e-6)?.dims(),
                [2, 3, 8],
                "{shape:?}"
            );
            assert_eq!(
                gated_residual(&x, &m, &x, false)?.dims(),
                [2, 3, 8],
                "{shape:?}"
            );
        }
        // Mixed layouts of shift and scale still work.
        let out = layer_norm_modulate(
            &x,
            &rand(&[8], DType::F32),
            &rand(&[2, 8], DType::F32),
            1e-6,
        )?;
        assert_eq!(out.dims(), [2, 3, 8]);
        let e = err_text(layer_norm_modulate(
            &x,
            &rand(&[3, 8], DType::F32),
            &rand(&[8], DType::F32),
            1e-6,
        ));
        assert!(
            e.contains("shift must be [B, C]") && e.contains("B=2, C=8"),
            "{e}"
        );
        let e = err_text(layer_norm_modulate(
            &x.flatten(0, 1)?,
            &rand(&[8], DType::F32),
            &rand(&[8], DType::F32),
            1e-6,
        ));
        assert!(e.contains("x must be [B, N, C]"), "{e}");
        let e = err_text(gated_residual(&x, &rand(&[2, 7], DType::F32), &x, false));
        assert!(e.contains("gate must be"), "{e}");
        let e = err_text(gated_residual(
            &x,
            &rand(&[8], DType::F32),
            &rand(&[2, 3, 7], DType::F32),
            false,
        ));
        assert!(e.contains("one shape"), "{e}");
        let e = err_text(gated_residual(&x, &rand(&[8], DType::F16), &x, false));
        assert!(e.contains("share a dtype"), "{e}");
        let x2 = rand(&[3, 8], DType::F32);
        assert_eq!(
            gated_residual(&x2, &rand(&[1, 8], DType::F32), &x2, false)?.dims(),
            [3, 8]
        );
        let e = err_text(gated_residual(
            &x2,
            &rand(&[1, 1, 8], DType::F32),
            &x2,
            false,
        ));
        assert!(e.contains("rank-2"), "{e}");
        Ok(())
    }

    #[test]
    fn rope_and_gelu_shape_errors() -> Result<()> {
        let x = rand(&[1, 2, 3, 8], DType::F32);
        let cs = rand(&[3, 4], DType::F32);
        let w = rand(&[8], DType::F32);
        assert_eq!(
            qk_rmsnorm_rope(&x, &w, &cs, &cs, 1e-6)?.dims(),
            [1, 2, 3, 8]
        );
        let e = err_text(qk_rmsnorm_rope(&x, &rand(&[4], DType::F32), &cs, &cs, 1e-6));
        assert!(e.contains("weight must be [8]"), "{e}");
        let e = err_text(qk_rmsnorm_rope(
            &x,
            &w,
            &rand(&[3, 8], DType::F32),
            &cs,
            1e-6,
        ));
        assert!(e.contains("cos/sin must be [3, 4]"), "{e}");
        let e = err_text(rope_interleaved(&rand(&[1, 2, 3, 7], DType::F32), &cs, &cs));
        assert!(e.contains("even"), "{e}");
        let e = err_text(rope_interleaved(&rand(&[2, 3, 8], DType::F32), &cs, &cs));
        assert!(e.contains("x must be [B, H, N, D]"), "{e}");
        let e = err_text(bias_gelu_tanh(
            &rand(&[4, 8], DType::F32),
            &rand(&[4], DType::F32),
        ));
        assert!(e.contains("bias must be [8]"), "{e}");
        let e = err_text(layer_norm_no_affine(
            &Tensor::zeros(0, DType::F32, &candle_core::Device::Cpu)?,
            1e-6,
        ));
        assert!(e.contains("non-empty"), "{e}");
        Ok(())
    }

    #[test]
    fn linear_shape_errors() -> Result<()> {
        let x = rand(&[2, 3, 8], DType::F32);
        let w = rand(&[5, 8], DType::F32);
        let b = rand(&[5], DType::F32);
        assert_eq!(linear_bias(&x, &w, &b)?.dims(), [2, 3, 5]);
        assert_eq!(linear_bias_gelu_tanh(&x, &w, &b)?.dims(), [2, 3, 5]);
        let e = err_text(linear_bias(&x, &rand(&[5, 7], DType::F32), &b));
        assert!(e.contains("w must be [N, 8]"), "{e}");
        let e = err_text(linear_bias(&x, &w, &rand(&[4], DType::F32)));
        assert!(e.contains("bias must be [5]"), "{e}");
        let e = err_text(linear_bias_gelu_tanh(&x, &w.to_dtype(DType::F16)?, &b));
        assert!(e.contains("share a dtype"), "{e}");
        Ok(())
    }

    #[test]
    fn layer_norm_no_affine_normalises() -> Result<()> {
        let x = ((rand(&[4, 64], DType::F32) * 3.0)? + 5.0)?;
        let y = layer_norm_no_affine(&x, 1e-6)?;
        let mean = y
            .mean_keepdim(1)?
            .abs()?
            .max(0)?
            .squeeze(0)?
            .to_scalar::<f32>()?;
        let var = y.sqr()?.mean_keepdim(1)?;
        let var_err = (var - 1.0)?.abs()?.max(0)?.squeeze(0)?.to_scalar::<f32>()?;
        assert!(mean < 1e-5 && var_err < 1e-4, "{mean} {var_err}");
        Ok(())
    }

    #[test]
    fn no_cuda_build_reports_no_cap() {
        #[cfg(not(feature = "cuda"))]
        assert_eq!(build_compute_cap(), None);
        #[cfg(feature = "cuda")]
        assert!(build_compute_cap().is_some_and(|c| c >= 75));
    }
}

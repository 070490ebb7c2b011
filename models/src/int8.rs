//! W8A8: int8 weights per output channel, int8 activations per token (dynamic), int32
//! accumulation, dequantized to float with the two scales — the scheme of torchao's
//! `Int8DynamicActivationInt8WeightConfig()` (0.18, `Int8Tensor`, defaults: symmetric, per row,
//! full int8 range), reproduced operation for operation so that the same inputs give the same
//! floats:
//!
//! - For each row `r` (a weight's output channel, or an activation's token) of length `K`:
//!   `amax = max |r|`, `scale = max(amax / 127.5, ε_f32)` (torchao divides by
//!   `(q_max − q_min) / 2` with `q_min = −128`, `q_max = 127`), and
//!   `q = clamp(round_half_even(r · (1 / scale)), −128, 127)` (a multiplication by the f32
//!   reciprocal, not a division). So `±amax` maps to about ±127.5 before rounding: `+amax`
//!   gives 127 either way (128 is clamped), `−amax` gives −128 or −127 depending on which side
//!   of the tie the rounded reciprocal puts it.
//! - `y[t, n] = (f32(Σ_k q_x[t, k] · q_w[n, k]) · scale_x[t]) · scale_w[n]`, then `+ bias`: the
//!   sum is exact (int32 in torchao, f64 of small integers here), its conversion to f32 rounds
//!   once, and the two scale products round in that order.
//!
//! This file is the CPU reference of the scheme (what the parity tests run); GPU kernels
//! (`mma.sync.m8n8k16.s8` on sm_75, IMMA on sm_80+) are not part of it yet, and an int8 linear
//! on a CUDA device is refused with a clear error rather than run slowly.

use candle_core::{DType, Device, Tensor};

use crate::error::{ModelError, Result};

/// Quantized range of a value (torchao's int8 bounds).
const Q_MIN: f32 = -128.0;
const Q_MAX: f32 = 127.0;
/// `(Q_MAX − Q_MIN) / 2`: the divisor of the symmetric scale.
const HALF_RANGE: f32 = 127.5;

/// An int8 weight `[out, in]` with one f32 scale per output channel.
#[derive(Debug, Clone)]
pub struct Int8Weight {
    /// The quantized values, stored as `q + 128` in `u8` (candle has no `i8`), `[out, in]`.
    q: Tensor,
    /// `[out]` f32.
    scale: Tensor,
}

/// Quantizes every row of `rows × k` values: the int8 values (as f32) and the row scales.
pub fn quantize_rows(x: &[f32], k: usize) -> (Vec<f32>, Vec<f32>) {
    let k = k.max(1);
    let mut q = Vec::with_capacity(x.len());
    let mut scales = Vec::with_capacity(x.len() / k);
    for row in x.chunks(k) {
        let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = (amax / HALF_RANGE).max(f32::EPSILON);
        let inv = 1.0 / scale;
        q.extend(
            row.iter()
                .map(|v| (v * inv).round_ties_even().clamp(Q_MIN, Q_MAX)),
        );
        scales.push(scale);
    }
    (q, scales)
}

fn cpu_only(t: &Tensor, what: &str) -> Result<()> {
    if t.device().is_cpu() {
        Ok(())
    } else {
        Err(ModelError::InvalidInput(format!(
            "int8 {what} runs on the CPU only in this build (no CUDA int8 kernels yet): \
             use float precision on the GPU"
        )))
    }
}

impl Int8Weight {
    /// Quantizes a float weight `[out, in]` per output channel.
    pub fn quantize(w: &Tensor) -> Result<Self> {
        cpu_only(w, "weights")?;
        let (n, k) = w.dims2()?;
        let data = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let (q, scale) = quantize_rows(&data, k);
        let stored: Vec<u8> = q.iter().map(|v| (*v as i32 + 128) as u8).collect();
        Ok(Self {
            q: Tensor::from_vec(stored, (n, k), &Device::Cpu)?,
            scale: Tensor::from_vec(scale, n, &Device::Cpu)?,
        })
    }

    pub fn out_dim(&self) -> usize {
        self.q.dims()[0]
    }

    /// The int8 values as integers in `dtype` (f64: exact products and sums).
    fn values(&self, dtype: DType) -> Result<Tensor> {
        Ok((self.q.to_dtype(dtype)? - 128.0)?)
    }

    /// The weight the scheme stands for, `q · scale`, in f32 `[out, in]`.
    pub fn dequantize(&self) -> Result<Tensor> {
        Ok(self
            .values(DType::F32)?
            .broadcast_mul(&self.scale.unsqueeze(1)?)?)
    }

    /// `x · Wᵀ` for `x` `[rows, in]` (any float dtype, quantized per row after a cast to f32):
    /// f32 `[rows, out]`, without the bias.
    pub fn matmul(&self, x: &Tensor) -> Result<Tensor> {
        cpu_only(x, "activations")?;
        let (rows, k) = x.dims2()?;
        let (wn, wk) = self.q.dims2()?;
        if k != wk {
            return Err(ModelError::InvalidInput(format!(
                "int8 linear of {wk} inputs on rows of {k}"
            )));
        }
        let data = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let (q, sx) = quantize_rows(&data, k);
        let qx = Tensor::from_vec(q, (rows, k), &Device::Cpu)?.to_dtype(DType::F64)?;
        // |Σ q·q| ≤ 128² · K: exact in f64 for any K below 2^38.
        let acc = qx.matmul(&self.values(DType::F64)?.t()?)?;
        let acc = acc.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let sw = self.scale.to_vec1::<f32>()?;
        let mut y = Vec::with_capacity(rows * wn);
        for (t, row) in acc.chunks(wn.max(1)).enumerate() {
            y.extend(row.iter().zip(&sw).map(|(a, s)| (a * sx[t]) * s));
        }
        Ok(Tensor::from_vec(y, (rows, wn), &Device::Cpu)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rounding rules by hand: the row maximum maps to 127; its negative to −127 here (f32
    /// 1/(1/127.5) is just below 127.5, so −127.4999… rounds to −127, as in torchao); halves
    /// round to even; an all-zero row gets the ε scale (every value 0).
    #[test]
    fn quantizes_as_torchao() {
        let (q, s) = quantize_rows(&[1.0, -1.0, 0.5, 0.25, 0.0, 0.0, 0.0, 0.0], 4);
        assert_eq!(s, vec![1.0 / 127.5, f32::EPSILON]);
        // 0.5·127.5 = 63.75 → 64; 0.25·127.5 = 31.875 → 32
        assert_eq!(q, vec![127.0, -127.0, 64.0, 32.0, 0.0, 0.0, 0.0, 0.0]);
        // A value exactly between two levels: 2.5/scale with scale = 1 (amax 127.5) → 2 (even).
        let (q, _) = quantize_rows(&[127.5, 2.5, 3.5], 3);
        assert_eq!(q, vec![127.0, 2.0, 4.0]);
    }

    #[test]
    fn matmul_is_the_integer_product_rescaled() -> Result<()> {
        let w = Tensor::new(&[[1.0f32, -2.0], [0.5, 4.0]], &Device::Cpu)?;
        let x = Tensor::new(&[[2.0f32, 1.0]], &Device::Cpu)?;
        let iw = Int8Weight::quantize(&w)?;
        let y = iw.matmul(&x)?.to_vec2::<f32>()?;
        let (qx, sx) = quantize_rows(&[2.0, 1.0], 2);
        let (qw, sw) = quantize_rows(&[1.0, -2.0, 0.5, 4.0], 2);
        let want: Vec<f32> = (0..2)
            .map(|n| ((qx[0] * qw[2 * n] + qx[1] * qw[2 * n + 1]) * sx[0]) * sw[n])
            .collect();
        assert_eq!(y[0], want);
        // Close to the float product: within the two quantization steps.
        let exact = [2.0 - 2.0, 1.0 + 4.0];
        for (a, b) in y[0].iter().zip(exact) {
            assert!((a - b).abs() < 0.1, "{a} vs {b}");
        }
        Ok(())
    }
}

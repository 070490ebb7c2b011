//! Which ops ran their plain-candle reference path on a CUDA tensor.
//!
//! On CUDA every op should take its fused kernel; an input the kernel does not take (a dtype mix,
//! a layout) silently falls back to the reference path, which is correct but much slower (a
//! mismatched gain dtype once sent every FLUX QK-RMSNorm+RoPE call there and doubled the step
//! time). The first fallback of each op logs a warning; [`counts`] gives the totals so harnesses
//! can print or check them. CPU tensors are not counted: the reference path is their
//! implementation.

use std::collections::BTreeMap;
use std::sync::Mutex;

use candle_core::{DType, Tensor};

static COUNTS: Mutex<BTreeMap<&'static str, u64>> = Mutex::new(BTreeMap::new());

/// Records that `op` is about to run the reference path for an input on `x`'s device.
pub fn note(op: &'static str, x: &Tensor) {
    if !x.device().is_cuda() {
        return;
    }
    let Ok(mut counts) = COUNTS.lock() else {
        return;
    };
    let n = counts.entry(op).or_insert(0);
    *n += 1;
    if *n == 1 {
        // f16/bf16 inputs are the fast path's own dtypes: falling back there is a bug worth a
        // warning. f32 falls back by design for some shapes (e.g. the f32 VAE's single-head
        // attention over 512 channels), so it is only logged at debug level.
        if matches!(x.dtype(), DType::F16 | DType::BF16) {
            tracing::warn!(
                op,
                dtype = ?x.dtype(),
                shape = ?x.dims(),
                "pawfect-kernels: {op} ran the unfused reference path on a CUDA tensor (an input \
                 the fused kernel does not take); results are right but slow"
            );
        } else {
            tracing::debug!(op, dtype = ?x.dtype(), shape = ?x.dims(), "pawfect-kernels: {op} reference path on CUDA");
        }
    }
}

/// How many times each op fell back on CUDA since the process started.
pub fn counts() -> BTreeMap<&'static str, u64> {
    COUNTS.lock().map(|c| c.clone()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn cpu_tensors_are_not_counted() -> candle_core::Result<()> {
        let x = Tensor::zeros((2, 3), DType::F32, &Device::Cpu)?;
        note("cpu_probe", &x);
        assert!(!counts().contains_key("cpu_probe"));
        Ok(())
    }
}

//! First-Block Cache: a denoise step whose first transformer block changed little since the last
//! fully computed step skips every other block and reuses that step's residual of the rest.
//!
//! Semantics of diffusers' `FirstBlockCacheConfig(threshold)` (`hooks/first_block_cache.py`,
//! 0.42), step for step, so that a threshold means the same thing here and there:
//!
//! - The head block (double block 0) always runs. Its image-stream residual `r = out − in` is
//!   compared with `r_prev`, the head residual of the **last step that computed every block** (a
//!   skipped step does not replace it): `diff = mean|r − r_prev| / mean|r_prev|`.
//! - No `r_prev` yet (the first step of a denoise loop), or `diff > threshold`: the remaining
//!   blocks run; `r` becomes `r_prev`, and the tail residual `t = image stream after the last
//!   single block − image stream after the head block` is kept.
//! - Otherwise the step is skipped: the image stream after the last block is taken as
//!   `head output + t`, and the final layer runs on it as usual.
//!
//! Only the image stream is kept: diffusers also keeps the text stream's tail residual, but the
//! final layer reads only image tokens, so the velocity is the same. The state lives for one
//! denoise loop (one crop); a new [`FirstBlockCache`] per loop, as diffusers resets its state per
//! pipeline call. The diff is reduced in f32 whatever the compute dtype (diffusers reduces in the
//! compute dtype: in bf16 a diff within bf16 rounding of the threshold can decide differently).
//!
//! What it costs: two `[1, L, hidden]` tensors kept on the device (19 MB each in f16 for the
//! standard 3072-token crop) and one memory-bound pass over three of them per step.

use candle_core::{DType, Tensor};

use crate::accounting as acct;
use crate::error::{ModelError, Result};

/// The cache state of one denoise loop.
#[derive(Debug)]
pub struct FirstBlockCache {
    threshold: f32,
    /// Head-block image residual of the last fully computed step.
    head_residual: Option<Tensor>,
    /// Image stream after the last block minus after the head block, of that step.
    tail_residual: Option<Tensor>,
    /// The relative change measured at each step (`None` when there was nothing to compare).
    diffs: Vec<Option<f32>>,
    /// Steps (0-based, in the order they ran) that skipped the remaining blocks.
    skipped: Vec<usize>,
}

impl FirstBlockCache {
    /// A cache that skips when the relative change is at most `threshold` (≥ 0, finite).
    pub fn new(threshold: f32) -> Result<Self> {
        if !threshold.is_finite() || threshold < 0.0 {
            return Err(ModelError::InvalidInput(format!(
                "first-block cache threshold must be a finite number ≥ 0, got {threshold}"
            )));
        }
        Ok(Self {
            threshold,
            head_residual: None,
            tail_residual: None,
            diffs: Vec::new(),
            skipped: Vec::new(),
        })
    }

    pub fn threshold(&self) -> f32 {
        self.threshold
    }

    /// Steps that skipped the remaining blocks (0-based).
    pub fn skipped(&self) -> &[usize] {
        &self.skipped
    }

    /// The relative change of the head residual measured at each step so far.
    pub fn diffs(&self) -> &[Option<f32>] {
        &self.diffs
    }

    /// Decides the current step from the head block's image input and output. Returns the
    /// image stream after the last block when the step is skipped, `None` when every block must
    /// run (then call [`Self::computed`] with the image stream after the last block).
    pub fn after_head(&mut self, head_in: &Tensor, head_out: &Tensor) -> Result<Option<Tensor>> {
        let step = self.diffs.len();
        let r = acct::ew(&[head_out, head_in], (head_out - head_in)?);
        let diff = match &self.head_residual {
            Some(prev) => {
                let r32 = r.to_dtype(DType::F32)?;
                let p32 = prev.to_dtype(DType::F32)?;
                let num = (&r32 - &p32)?.abs()?.mean_all()?;
                let den = p32.abs()?.mean_all()?;
                // One fused pass would read both residuals once: counted so.
                acct::elementwise(&[&r, prev], &num);
                Some(num.to_scalar::<f32>()? / den.to_scalar::<f32>()?)
            }
            None => None,
        };
        self.diffs.push(diff);
        // diffusers: compute when there is no previous residual or `diff > threshold`; a NaN
        // diff (0/0: a head residual of zeros) compares false there too, and so skips.
        let compute = match diff {
            None => true,
            Some(d) => d > self.threshold,
        };
        if compute {
            self.head_residual = Some(r);
            self.tail_residual = None;
            return Ok(None);
        }
        let tail = self.tail_residual.as_ref().ok_or_else(|| {
            ModelError::InvalidInput(format!(
                "first-block cache: step {step} skipped before a computed step finished"
            ))
        })?;
        self.skipped.push(step);
        Ok(Some(acct::ew(&[head_out, tail], (head_out + tail)?)))
    }

    /// Records the tail residual of a fully computed step.
    pub fn computed(&mut self, head_out: &Tensor, last_out: &Tensor) -> Result<()> {
        self.tail_residual = Some(acct::ew(&[last_out, head_out], (last_out - head_out)?));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(v: &[f32]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    #[test]
    fn rejects_bad_thresholds() {
        for bad in [-0.1, f32::NAN, f32::INFINITY] {
            assert!(FirstBlockCache::new(bad).is_err(), "{bad}");
        }
    }

    /// The decision rule by hand: step 0 computes, a change of exactly 0.25 against the last
    /// computed residual skips at threshold 0.25 (`>` computes), a larger one computes, and a
    /// skipped step does not move the reference.
    #[test]
    fn decides_against_the_last_computed_step() {
        let mut c = FirstBlockCache::new(0.25).unwrap();
        let zero = t(&[0.0, 0.0]);
        // step 0: residual [4, 4]
        assert!(c.after_head(&zero, &t(&[4.0, 4.0])).unwrap().is_none());
        c.computed(&t(&[4.0, 4.0]), &t(&[5.0, 7.0])).unwrap();
        // step 1: residual [5, 4]: mean|Δ| = 0.5, mean|r_prev| = 4 → 0.125 ≤ 0.25: skip
        let out = c.after_head(&zero, &t(&[5.0, 4.0])).unwrap().unwrap();
        assert_eq!(out.to_vec1::<f32>().unwrap(), vec![6.0, 7.0]); // head out + [1, 3]
        // step 2: residual [6, 4]: mean|Δ| vs [4, 4] (step 1 did not replace it) = 1 → 0.25: skip
        assert!(c.after_head(&zero, &t(&[6.0, 4.0])).unwrap().is_some());
        // step 3: residual [7, 4]: 1.5 / 4 = 0.375 > 0.25: compute
        assert!(c.after_head(&zero, &t(&[7.0, 4.0])).unwrap().is_none());
        assert_eq!(c.skipped(), &[1, 2]);
        assert_eq!(c.diffs(), &[None, Some(0.125), Some(0.25), Some(0.375)]);
    }
}

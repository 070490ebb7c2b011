//! Work accounting: how much work a model call issued, by class, counted where the model code
//! issues each op, from the shapes it really ran (never from a separate formula).
//!
//! Classes ([`WorkCounts`]):
//!
//! - `f16_gemm_flop`: dense GEMMs in f16, bf16 or f32, GGUF weights dequantized for the call
//!   included: `2·M·N·K` per matmul, `M` the rows of the input (all leading dims), `N` the
//!   outputs, `K` the inputs. Every linear layer counts where it is called, with its real input.
//!   A convolution counts as the GEMM it is (im2col): `M = B·H_out·W_out`, `N = C_out`,
//!   `K = C_in/groups·k_h·k_w`. A bias or GELU applied to a GEMM's output counts as part of the
//!   GEMM (the cuBLASLt epilogue on CUDA), on every device, so a CPU run and a GPU run of one job
//!   report the same FLOP.
//! - `int8_gemm_op`: GEMMs on 8-bit integers, `2·M·N·K` ops: GGUF weights multiplied by candle's
//!   quantized kernels (`QuantMatmul::Native`: q8_1 activations, integer dot products). Zero in
//!   the default configurations, which dequantize.
//! - `attention_flop`: scaled-dot-product attention, `4·B·H·L_q·L_k·D` (`2·B·H·L_q·L_k·D` each
//!   for `QKᵀ` and `PV`, `D` the head dim). Its softmax and scaling are not counted separately:
//!   they are inside the fused kernel on CUDA. A model that materializes the scores (T5, CLIP,
//!   Florence-2) counts its softmax and score bias in `memory_bound_bytes` too.
//! - `memory_bound_bytes`: bytes read and written by the elementwise, normalization, RoPE,
//!   modulation, residual, softmax-outside-attention, up-sampling and concatenation ops. The
//!   rule: for each such op, the sum over its tensor operands of `elements × dtype size`
//!   (each operand at its own size, a broadcast operand such as a modulation vector or a norm
//!   gain read once) plus `elements × dtype size` of its output. The gains and biases of
//!   candle's own norm layers (GroupNorm, LayerNorm), which they do not expose, are left out: a
//!   few vectors against activations of thousands of rows. A fused kernel counts as one op
//!   (its inputs once, its output once), and so does the same op on the reference path, so the
//!   count does not depend on the device. Zero-padding counts like a concatenation. Views
//!   (reshape, narrow, transpose, chunk) move nothing and count zero; layout copies
//!   (`contiguous`, the latents' 2×2 packing), dtype casts, device copies and the VAE's tile
//!   blending are not counted.
//!
//! Counting: [`measure`] runs a closure with a fresh counter for the current thread and returns
//! what it issued; the model code adds to the innermost counter of its thread ([`gemm`],
//! [`attention`], [`elementwise`], …) and does nothing when no counter is open, so code outside a
//! measurement pays one thread-local read per op. A nested [`measure`] also adds its counts to the
//! enclosing one when it ends. Counters are per thread: the model code issues every op on the
//! thread that called it (candle may spread one kernel over threads, never the issuing), and two
//! measurements on two threads (parallel tests, two jobs) never see each other's work. Counting
//! is a few integer adds per op, no device synchronization.

use std::cell::RefCell;
use std::ops::{Add, AddAssign};

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

/// Work of one stage or job, by class (see the module documentation for the rules).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkCounts {
    pub f16_gemm_flop: u64,
    pub int8_gemm_op: u64,
    pub attention_flop: u64,
    pub memory_bound_bytes: u64,
}

impl AddAssign for WorkCounts {
    fn add_assign(&mut self, o: Self) {
        self.f16_gemm_flop += o.f16_gemm_flop;
        self.int8_gemm_op += o.int8_gemm_op;
        self.attention_flop += o.attention_flop;
        self.memory_bound_bytes += o.memory_bound_bytes;
    }
}

impl Add for WorkCounts {
    type Output = Self;
    fn add(mut self, o: Self) -> Self {
        self += o;
        self
    }
}

thread_local! {
    /// Open measurements of this thread, innermost last.
    static OPEN: RefCell<Vec<WorkCounts>> = const { RefCell::new(Vec::new()) };
}

/// Closes the innermost measurement even when the closure panics or returns early.
struct Open;

impl Drop for Open {
    fn drop(&mut self) {
        OPEN.with(|o| {
            let mut o = o.borrow_mut();
            if let Some(done) = o.pop()
                && let Some(outer) = o.last_mut()
            {
                *outer += done;
            }
        });
    }
}

/// Runs `f` with a fresh counter on this thread; returns its result and the work it issued.
pub fn measure<T>(f: impl FnOnce() -> T) -> (T, WorkCounts) {
    OPEN.with(|o| o.borrow_mut().push(WorkCounts::default()));
    let guard = Open;
    let out = f();
    let counts = OPEN.with(|o| o.borrow().last().copied().unwrap_or_default());
    drop(guard);
    (out, counts)
}

fn add(f: impl FnOnce(&mut WorkCounts)) {
    OPEN.with(|o| {
        if let Some(c) = o.borrow_mut().last_mut() {
            f(c);
        }
    });
}

fn product(xs: &[u64]) -> u64 {
    xs.iter().copied().fold(1u64, u64::saturating_mul)
}

/// A dense GEMM `[m, k] · [k, n]`: `2·m·n·k` f16/f32 FLOP.
pub fn gemm(m: usize, n: usize, k: usize) {
    let flop = product(&[2, m as u64, n as u64, k as u64]);
    add(|c| c.f16_gemm_flop = c.f16_gemm_flop.saturating_add(flop));
}

/// A GEMM on 8-bit integers `[m, k] · [k, n]`: `2·m·n·k` ops.
pub fn int8_gemm(m: usize, n: usize, k: usize) {
    let ops = product(&[2, m as u64, n as u64, k as u64]);
    add(|c| c.int8_gemm_op = c.int8_gemm_op.saturating_add(ops));
}

/// Scaled-dot-product attention of `b·h` heads, `lq` queries over `lk` keys, head dim `d`:
/// `4·b·h·lq·lk·d` FLOP.
pub fn attention(b: usize, h: usize, lq: usize, lk: usize, d: usize) {
    let flop = product(&[4, b as u64, h as u64, lq as u64, lk as u64, d as u64]);
    add(|c| c.attention_flop = c.attention_flop.saturating_add(flop));
}

/// Bytes of a tensor: elements × dtype size.
pub fn bytes_of(t: &Tensor) -> u64 {
    (t.elem_count() as u64).saturating_mul(t.dtype().size_in_bytes() as u64)
}

/// A memory-bound op that read `inputs` and wrote `output` (see the module rule).
pub fn elementwise(inputs: &[&Tensor], output: &Tensor) {
    let b = inputs
        .iter()
        .fold(bytes_of(output), |s, t| s.saturating_add(bytes_of(t)));
    add(|c| c.memory_bound_bytes = c.memory_bound_bytes.saturating_add(b));
}

/// A memory-bound op of `bytes` read and written in all (for ops without a tensor output).
pub fn memory_bound(bytes: u64) {
    add(|c| c.memory_bound_bytes = c.memory_bound_bytes.saturating_add(bytes));
}

/// Counts `out` as a memory-bound op over `inputs` and hands it back (for expressions).
pub fn ew(inputs: &[&Tensor], out: Tensor) -> Tensor {
    elementwise(inputs, &out);
    out
}

/// `candle_nn::Linear` (weight `[out, in]`) on `x`, counted as a GEMM over all leading dims.
pub fn nn_linear(l: &candle_nn::Linear, x: &Tensor) -> candle_core::Result<Tensor> {
    use candle_core::Module;
    let (n, k) = l.weight().dims2()?;
    let m = x.elem_count() / k.max(1);
    gemm(m, n, k);
    l.forward(x)
}

/// `candle_nn::Conv2d` on `x` `[B, C, H, W]`, counted as its im2col GEMM.
pub fn nn_conv2d(c: &candle_nn::Conv2d, x: &Tensor) -> candle_core::Result<Tensor> {
    use candle_core::Module;
    let y = c.forward(x)?;
    let (cout, cin_g, kh, kw) = c.weight().dims4()?;
    let (b, _, ho, wo) = y.dims4()?;
    gemm(b * ho * wo, cout, cin_g * kh * kw);
    Ok(y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn counts_only_inside_a_measurement_and_nests() {
        gemm(1, 2, 3); // no counter open: nothing happens
        let ((), outer) = measure(|| {
            gemm(2, 3, 4);
            let ((), inner) = measure(|| attention(1, 2, 3, 4, 5));
            assert_eq!(
                inner,
                WorkCounts {
                    attention_flop: 4 * 2 * 3 * 4 * 5,
                    ..Default::default()
                }
            );
            int8_gemm(1, 1, 8);
        });
        assert_eq!(
            outer,
            WorkCounts {
                f16_gemm_flop: 2 * 2 * 3 * 4,
                int8_gemm_op: 16,
                attention_flop: 480,
                memory_bound_bytes: 0,
            }
        );
    }

    #[test]
    fn elementwise_bytes_are_operands_plus_output() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 3, 4), DType::F16, &dev)?;
        let g = Tensor::zeros((1, 1, 4), DType::F32, &dev)?;
        let ((), c) = measure(|| elementwise(&[&x, &g], &x));
        // x read (24 × 2 B) and written (24 × 2 B), the gain read once (4 × 4 B).
        assert_eq!(c.memory_bound_bytes, 48 + 48 + 16);
        Ok(())
    }

    #[test]
    fn threads_count_apart() {
        let a = std::thread::spawn(|| measure(|| (0..10).for_each(|_| gemm(1, 1, 1))).1);
        let ((), here) = measure(|| gemm(1, 1, 1));
        let there = a.join().map(|c| c.f16_gemm_flop).unwrap_or(0);
        assert_eq!((here.f16_gemm_flop, there), (2, 20));
    }

    #[test]
    fn a_panicking_measurement_closes() {
        let r = std::panic::catch_unwind(|| measure(|| -> u8 { panic!("boom") }));
        assert!(r.is_err());
        let ((), c) = measure(|| gemm(1, 1, 1));
        assert_eq!(c.f16_gemm_flop, 2);
        OPEN.with(|o| assert!(o.borrow().is_empty()));
    }
}

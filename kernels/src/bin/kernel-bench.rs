//! Micro-benchmarks of the fused CUDA ops at FLUX shapes, next to candle's plain ops.
//!
//! Shapes: FLUX at 1024² (4096 image + 512 text tokens = 4608, 24 heads × 128, hidden 3072, MLP
//! 12288) and at a 512² crop (1024 + 512 = 1536 tokens). Each case: 3 warm-up runs, then the median
//! of `--reps` runs timed with CUDA events; inputs rotate over enough sets to exceed the L2 cache
//! (≥ 128 MB per round). Bandwidth counts each input read once and the output written once;
//! attention FLOP/s count 4·B·H·Nq·Nk·D (halved for causal).
//!
//! Usage: `kernel-bench [--reps N]` (on a CUDA machine).

use anyhow::{Context, Result};
use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
use candle_core::{CudaDevice, DType, Device, Module, Tensor};
use pawfect_kernels as pk;

struct Bench {
    dev: Device,
    cuda: CudaDevice,
    reps: usize,
}

#[derive(Clone, Copy)]
enum Work {
    Bytes(f64),
    Flops(f64),
}

impl Bench {
    /// Median milliseconds of `f(i)` (i = rep index, for rotating inputs).
    fn time(&self, f: &dyn Fn(usize) -> Result<Tensor>) -> Result<f64> {
        for i in 0..3 {
            f(i)?;
        }
        self.dev.synchronize()?;
        let stream = self.cuda.cuda_stream();
        let mut ms = Vec::with_capacity(self.reps);
        for i in 0..self.reps {
            let e0 = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
            let out = f(i)?;
            let e1 = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
            ms.push(e0.elapsed_ms(&e1)? as f64);
            drop(out);
        }
        ms.sort_by(f64::total_cmp);
        Ok(ms[ms.len() / 2])
    }

    fn randn(&self, shape: &[usize], dtype: DType) -> Result<Tensor> {
        Ok(Tensor::randn(0f32, 1.0, shape, &self.dev)?.to_dtype(dtype)?)
    }

    /// `sets` independent inputs of `shape`.
    fn sets(&self, n: usize, shape: &[usize], dtype: DType) -> Result<Vec<Tensor>> {
        (0..n).map(|_| self.randn(shape, dtype)).collect()
    }
}

/// Prints one result line: time, rate and the speed-up over `base_ms`.
fn row(op: &str, shape: &str, dtype: DType, imp: &str, ms: f64, work: Work, base_ms: Option<f64>) {
    let rate = match work {
        Work::Bytes(b) => format!("{:7.2} TB/s", b / (ms * 1e-3) / 1e12),
        Work::Flops(f) => format!("{:7.1} TFLOP/s", f / (ms * 1e-3) / 1e12),
    };
    let speedup = base_ms
        .map(|b| format!("{:6.1}x", b / ms))
        .unwrap_or_default();
    println!(
        "{op:<20} {shape:<22} {:<5} {imp:<22} {:>10.1} us  {rate:<16} {speedup}",
        format!("{dtype:?}").to_lowercase(),
        ms * 1e3
    );
}

/// Input sets needed so that one round over them moves at least 128 MB.
fn n_sets(bytes_per_call: f64) -> usize {
    ((128e6 / bytes_per_call).ceil() as usize).clamp(1, 8)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let reps = args
        .iter()
        .position(|a| a == "--reps")
        .and_then(|i| args.get(i + 1))
        .map(|s| s.parse::<usize>())
        .transpose()
        .context("--reps N")?
        .unwrap_or(20);
    let dev = Device::new_cuda(0)?;
    let cuda = match &dev {
        Device::Cuda(c) => c.clone(),
        _ => anyhow::bail!("expected a CUDA device"),
    };
    let cap = pk::build_compute_cap().context("built without the cuda feature")?;
    let b = Bench { dev, cuda, reps };
    println!("kernel-bench: kernels built for compute capability {cap}; median of {reps} runs");
    println!(
        "{:<20} {:<22} {:<5} {:<22} {:>13}  {:<16} vs plain",
        "op", "shape", "dtype", "impl", "time", "rate"
    );

    // Ceilings: device-to-device copy and a large f16 GEMM.
    {
        let t = b.randn(&[512 * 1024 * 1024], DType::F16)?;
        let ms = b.time(&|_| Ok(t.copy()?))?;
        row(
            "ceiling: copy",
            "1 GiB",
            DType::F16,
            "cuMemcpyDtoD",
            ms,
            Work::Bytes(2.0 * 1024f64.powi(3)),
            None,
        );
        let x = b.randn(&[4608, 3072], DType::F16)?;
        let w = b.randn(&[3072, 12288], DType::F16)?;
        let ms = b.time(&|_| Ok(x.matmul(&w)?))?;
        row(
            "ceiling: gemm",
            "4608x3072x12288",
            DType::F16,
            "cuBLAS (candle)",
            ms,
            Work::Flops(2.0 * 4608.0 * 3072.0 * 12288.0),
            None,
        );
    }

    let mut dtypes = vec![DType::F16];
    if cap >= 80 {
        dtypes.push(DType::BF16);
    }
    let tokens = [(4608usize, "1024²"), (1536, "512²")];

    // Attention.
    for &(n, tag) in &tokens {
        for &dt in &dtypes {
            let (h, d) = (24usize, 128usize);
            let bytes = (4 * h * n * d * 2) as f64;
            let ns = n_sets(bytes);
            let q = b.sets(ns, &[1, h, n, d], dt)?;
            let k = b.sets(ns, &[1, h, n, d], dt)?;
            let v = b.sets(ns, &[1, h, n, d], dt)?;
            let scale = 1.0 / (d as f64).sqrt();
            let work = Work::Flops(4.0 * (h * n * n * d) as f64);
            let shape = format!("{tag} 1x{h}x{n}x{d}");
            let plain = b.time(&|i| {
                let i = i % ns;
                let s = (q[i].matmul(&k[i].t()?)? * scale)?;
                Ok(candle_nn::ops::softmax_last_dim(&s)?.matmul(&v[i])?)
            })?;
            row(
                "attention",
                &shape,
                dt,
                "candle matmul+softmax",
                plain,
                work,
                None,
            );
            let fused = b.time(&|i| {
                Ok(pk::attention(
                    &q[i % ns],
                    &k[i % ns],
                    &v[i % ns],
                    scale,
                    false,
                )?)
            })?;
            row("attention", &shape, dt, "fused", fused, work, Some(plain));
            // The block's next step wants [B, N, H·D]: transpose + copy vs writing it directly.
            let plain_t = b.time(&|i| {
                let o = pk::attention(&q[i % ns], &k[i % ns], &v[i % ns], scale, false)?;
                Ok(o.transpose(1, 2)?.reshape((1, n, h * d))?)
            })?;
            row(
                "attention→[B,N,H·D]",
                &shape,
                dt,
                "fused + transpose copy",
                plain_t,
                work,
                None,
            );
            let merged = b.time(&|i| {
                Ok(pk::attention_merged_heads(
                    &q[i % ns],
                    &k[i % ns],
                    &v[i % ns],
                    scale,
                    false,
                )?)
            })?;
            row(
                "attention→[B,N,H·D]",
                &shape,
                dt,
                "fused, merged heads",
                merged,
                work,
                Some(plain_t),
            );
        }
    }
    // Florence-2-like attention (head dim 64), fused only.
    for &(n, causal) in &[(1024usize, false), (1024, true)] {
        let (h, d, dt) = (12usize, 64usize, DType::F16);
        let q = b.randn(&[1, h, n, d], dt)?;
        let k = b.randn(&[1, h, n, d], dt)?;
        let v = b.randn(&[1, h, n, d], dt)?;
        let f = 4.0 * (h * n * n * d) as f64 * if causal { 0.5 } else { 1.0 };
        let ms = b.time(&|_| Ok(pk::attention(&q, &k, &v, 0.125, causal)?))?;
        row(
            "attention",
            &format!("1x{h}x{n}x{d}{}", if causal { " causal" } else { "" }),
            dt,
            "fused",
            ms,
            Work::Flops(f),
            None,
        );
    }

    for &(n, tag) in &tokens {
        for &dt in &dtypes {
            let c = 3072usize;
            let el = (n * c) as f64;
            let es = dt.size_in_bytes() as f64;
            let shape = format!("{tag} {n}x{c}");

            // LayerNorm + modulate: x in, out, shift and scale rows.
            let bytes = (2.0 * el + 2.0 * c as f64) * es;
            let ns = n_sets(bytes);
            let x = b.sets(ns, &[1, n, c], dt)?;
            let shift = b.randn(&[1, c], dt)?;
            let scale = b.randn(&[1, c], dt)?;
            let ln = candle_nn::LayerNorm::new_no_bias(Tensor::ones(c, dt, &b.dev)?, 1e-6);
            let plain = b.time(&|i| {
                let n = ln.forward(&x[i % ns])?;
                Ok(n.broadcast_mul(&(scale.unsqueeze(1)? + 1.0)?)?
                    .broadcast_add(&shift.unsqueeze(1)?)?)
            })?;
            row(
                "layer_norm_modulate",
                &shape,
                dt,
                "candle LayerNorm+bcast",
                plain,
                Work::Bytes(bytes),
                None,
            );
            let ms = b.time(&|i| Ok(pk::layer_norm_modulate(&x[i % ns], &shift, &scale, 1e-6)?))?;
            row(
                "layer_norm_modulate",
                &shape,
                dt,
                "fused",
                ms,
                Work::Bytes(bytes),
                Some(plain),
            );

            // Gated residual: x, y in, out, gate row.
            let bytes = (3.0 * el + c as f64) * es;
            let ns = n_sets(bytes);
            let x = b.sets(ns, &[1, n, c], dt)?;
            let y = b.sets(ns, &[1, n, c], dt)?;
            let gate = b.randn(&[1, c], dt)?;
            let plain =
                b.time(&|i| Ok((&x[i % ns] + y[i % ns].broadcast_mul(&gate.unsqueeze(1)?)?)?))?;
            row(
                "gated_residual",
                &shape,
                dt,
                "candle bcast mul+add",
                plain,
                Work::Bytes(bytes),
                None,
            );
            let ms = b.time(&|i| {
                Ok(pk::gated_residual(
                    &x[i % ns],
                    &gate,
                    &y[i % ns],
                    dt == DType::F16,
                )?)
            })?;
            row(
                "gated_residual",
                &shape,
                dt,
                "fused (+f16 clamp)",
                ms,
                Work::Bytes(bytes),
                Some(plain),
            );

            // Bias + GELU(tanh) on the MLP hidden (4 × 3072).
            let cm = 4 * c;
            let el = (n * cm) as f64;
            let bytes = (2.0 * el + cm as f64) * es;
            let ns = n_sets(bytes);
            let x = b.sets(ns, &[n, cm], dt)?;
            let bias = b.randn(&[cm], dt)?;
            let plain = b.time(&|i| Ok(x[i % ns].broadcast_add(&bias)?.gelu()?))?;
            let shape_m = format!("{tag} {n}x{cm}");
            row(
                "bias_gelu_tanh",
                &shape_m,
                dt,
                "candle bcast add+gelu",
                plain,
                Work::Bytes(bytes),
                None,
            );
            let ms = b.time(&|i| Ok(pk::bias_gelu_tanh(&x[i % ns], &bias)?))?;
            row(
                "bias_gelu_tanh",
                &shape_m,
                dt,
                "fused",
                ms,
                Work::Bytes(bytes),
                Some(plain),
            );

            // Linears with a bias: 3072 -> 12288 with GELU (MLP in) and 3072 -> 9216 (qkv).
            for &(nout, act) in &[(cm, true), (3 * c, false)] {
                let xs = b.randn(&[n, c], dt)?;
                let w = (b.randn(&[nout, c], dt)? * (1.0 / (c as f64).sqrt()))?;
                let bias = b.randn(&[nout], dt)?;
                let work = Work::Flops(2.0 * (n * c * nout) as f64);
                let shape_l = format!("{tag} {n}x{c}->{nout}");
                let (name, lin) = if act {
                    (
                        "linear+bias+gelu",
                        candle_nn::Linear::new(w.clone(), Some(bias.clone())),
                    )
                } else {
                    (
                        "linear+bias",
                        candle_nn::Linear::new(w.clone(), Some(bias.clone())),
                    )
                };
                let plain = b.time(&|_| {
                    let y = lin.forward(&xs)?;
                    Ok(if act { y.gelu()? } else { y })
                })?;
                row(
                    name,
                    &shape_l,
                    dt,
                    "candle Linear (+gelu)",
                    plain,
                    work,
                    None,
                );
                let mm = b.time(&|_| Ok(xs.matmul(&w.t()?)?))?;
                row(
                    name,
                    &shape_l,
                    dt,
                    "matmul alone (floor)",
                    mm,
                    work,
                    Some(plain),
                );
                if act {
                    let ms = b.time(&|_| Ok(pk::bias_gelu_tanh(&xs.matmul(&w.t()?)?, &bias)?))?;
                    row(
                        name,
                        &shape_l,
                        dt,
                        "matmul + fused epilogue",
                        ms,
                        work,
                        Some(plain),
                    );
                    let ms = b.time(&|_| Ok(pk::linear_bias_gelu_tanh(&xs, &w, &bias)?))?;
                    row(
                        name,
                        &shape_l,
                        dt,
                        "cuBLASLt GELU_BIAS",
                        ms,
                        work,
                        Some(plain),
                    );
                } else {
                    let ms = b.time(&|_| Ok(pk::linear_bias(&xs, &w, &bias)?))?;
                    row(name, &shape_l, dt, "cuBLASLt BIAS", ms, work, Some(plain));
                }
            }

            // QK RMSNorm + RoPE on q [1, 24, N, 128].
            let (h, d) = (24usize, 128usize);
            let el = (h * n * d) as f64;
            let bytes = 2.0 * el * es + (n * d) as f64 * 4.0 + d as f64 * es;
            let ns = n_sets(bytes);
            let x = b.sets(ns, &[1, h, n, d], dt)?;
            let xt: Vec<Tensor> = (0..ns)
                .map(|_| Ok(b.randn(&[1, n, h, d], dt)?.transpose(1, 2)?))
                .collect::<Result<_>>()?;
            let w = b.randn(&[d], dt)?;
            let ang = Tensor::rand(0f32, 100.0, (n, d / 2), &b.dev)?;
            let (cos, sin) = (ang.cos()?, ang.sin()?);
            let (cos_t, sin_t) = (cos.to_dtype(dt)?, sin.to_dtype(dt)?);
            let plain = b.time(&|i| {
                let nrm = candle_nn::ops::rms_norm(&x[i % ns], &w, 1e-6)?;
                Ok(candle_nn::rotary_emb::rope_i(&nrm, &cos_t, &sin_t)?)
            })?;
            let shape_r = format!("{tag} 1x{h}x{n}x{d}");
            row(
                "qk_rmsnorm_rope",
                &shape_r,
                dt,
                "candle rms_norm+rope_i",
                plain,
                Work::Bytes(bytes),
                None,
            );
            let ms = b.time(&|i| Ok(pk::qk_rmsnorm_rope(&x[i % ns], &w, &cos, &sin, 1e-6)?))?;
            row(
                "qk_rmsnorm_rope",
                &shape_r,
                dt,
                "fused",
                ms,
                Work::Bytes(bytes),
                Some(plain),
            );
            let ms = b.time(&|i| Ok(pk::qk_rmsnorm_rope(&xt[i % ns], &w, &cos, &sin, 1e-6)?))?;
            row(
                "qk_rmsnorm_rope",
                &shape_r,
                dt,
                "fused, [B,N,H,D] view",
                ms,
                Work::Bytes(bytes),
                Some(plain),
            );
        }
    }
    Ok(())
}

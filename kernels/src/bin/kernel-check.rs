//! Checks every fused CUDA op against the plain-candle reference computed in f32.
//!
//! For each op, dtype and shape: fresh random inputs (cuRAND), the fused op run twice with its
//! output buffer NaN-filled first (so an unwritten element fails), the two runs compared bit for
//! bit (a difference means a race), then `‖out − ref‖ / ‖ref‖` against the reference run on the
//! same inputs upcast to f32. Tolerances: 2e-3 for f16, 1e-2 for bf16, 1e-5 for f32.
//!
//! Usage: `kernel-check [--quick]` (on a CUDA machine; exit code 1 if any check fails).

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use pawfect_kernels as pk;
use pawfect_kernels::reference as rf;

fn tol(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => 2e-3,
        DType::BF16 => 1e-2,
        _ => 1e-5,
    }
}

/// Random `shape` with the given std and mean, rounded to `dtype`.
fn rnd(dev: &Device, shape: &[usize], std: f32, mean: f32, dtype: DType) -> Result<Tensor> {
    Ok(((Tensor::randn(0f32, std, shape, dev)? + mean as f64)?).to_dtype(dtype)?)
}

fn f32_(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(DType::F32)?)
}

struct Outcome {
    rel: f64,
    nan: usize,
    same: bool,
}

fn compare(a: &Tensor, a2: &Tensor, want: &Tensor) -> Result<Outcome> {
    if a.dims() != want.dims() {
        bail!("shape {:?}, want {:?}", a.dims(), want.dims());
    }
    let a32 = f32_(a)?.flatten_all()?;
    let w32 = f32_(want)?.flatten_all()?;
    let av: Vec<f32> = a32.to_vec1()?;
    let wv: Vec<f32> = w32.to_vec1()?;
    let nan = av.iter().filter(|v| !v.is_finite()).count();
    let (mut num, mut den) = (0f64, 0f64);
    for (x, y) in av.iter().zip(&wv) {
        let d = (*x as f64) - (*y as f64);
        num += d * d;
        den += (*y as f64) * (*y as f64);
    }
    let bits = |t: &Tensor| -> Result<Vec<u16>> {
        Ok(match t.dtype() {
            DType::F32 => t
                .flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .map(|v| (v.to_bits() >> 16) as u16 ^ v.to_bits() as u16)
                .collect(),
            DType::F16 => t
                .flatten_all()?
                .to_vec1::<half::f16>()?
                .iter()
                .map(|v| v.to_bits())
                .collect(),
            DType::BF16 => t
                .flatten_all()?
                .to_vec1::<half::bf16>()?
                .iter()
                .map(|v| v.to_bits())
                .collect(),
            dt => bail!("unexpected dtype {dt:?}"),
        })
    };
    let same = if a.dtype() == DType::F32 {
        let x: Vec<u32> = a
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .map(|v| v.to_bits())
            .collect();
        let y: Vec<u32> = a2
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .map(|v| v.to_bits())
            .collect();
        x == y
    } else {
        bits(a)? == bits(a2)?
    };
    Ok(Outcome {
        rel: (num / den.max(1e-30)).sqrt(),
        nan,
        same,
    })
}

struct Report {
    fails: usize,
    rows: usize,
}

impl Report {
    fn check(
        &mut self,
        op: &str,
        shape: &str,
        dtype: DType,
        run: impl Fn() -> Result<Tensor>,
        want: Tensor,
    ) -> Result<()> {
        let a = run().with_context(|| format!("{op} {shape} {dtype:?}"))?;
        let a2 = run()?;
        let o = compare(&a, &a2, &want).with_context(|| format!("{op} {shape} {dtype:?}"))?;
        let ok = o.rel <= tol(dtype) && o.nan == 0 && o.same;
        self.rows += 1;
        if !ok {
            self.fails += 1;
        }
        println!(
            "{:<5} {op:<22} {shape:<34} {:<5} rel_err {:.2e} (tol {:.0e})  non_finite {}  repeat_identical {}",
            if ok { "ok" } else { "FAIL" },
            format!("{dtype:?}").to_lowercase(),
            o.rel,
            tol(dtype),
            o.nan,
            o.same
        );
        Ok(())
    }
}

fn main() -> Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let dev = Device::new_cuda(0)?;
    let cap = pk::build_compute_cap().context("built without the cuda feature")?;
    println!("kernel-check: kernels built for compute capability {cap}");
    pk::set_poison_outputs(true);
    let mut dtypes = vec![DType::F16];
    if cap >= 80 {
        dtypes.push(DType::BF16);
    }
    let mut r = Report { fails: 0, rows: 0 };

    // ---- attention: (B, H, Nq, Nk, D, causal, transposed [B, N, H, D] input)
    let mut attn: Vec<(usize, usize, usize, usize, usize, bool, bool)> = vec![
        (1, 24, 1536, 1536, 128, false, false), // FLUX 512² (1024 image + 512 text tokens)
        (1, 24, 1536, 1536, 128, false, true),  // same, q/k/v as [B, N, H, D] views
        (2, 3, 77, 77, 128, false, false),
        (2, 3, 200, 200, 128, true, false),
        (1, 12, 577, 577, 64, false, false), // DaViT-/ViT-like, ragged N
        (1, 12, 33, 33, 64, true, false),    // decoder self-attention
        (2, 8, 1, 300, 64, true, false),     // one decode step with a KV cache
        (2, 8, 5, 300, 64, true, true),
        (1, 4, 100, 250, 32, false, false), // cross-attention, Nq != Nk
        (1, 4, 129, 129, 32, true, false),
    ];
    if !quick {
        attn.insert(0, (1, 24, 4608, 4608, 128, false, false)); // FLUX 1024²
    }
    for &(b, h, nq, nk, d, causal, transposed) in &attn {
        for &dt in &dtypes {
            let mk = |n: usize| -> Result<Tensor> {
                if transposed {
                    Ok(rnd(&dev, &[b, n, h, d], 1.0, 0.0, dt)?.transpose(1, 2)?)
                } else {
                    rnd(&dev, &[b, h, n, d], 1.0, 0.0, dt)
                }
            };
            let (q, k, v) = (mk(nq)?, mk(nk)?, mk(nk)?);
            // Larger logits on some shapes to exercise the online max.
            let q = if nq % 2 == 1 { (q * 3.0)? } else { q };
            let scale = 1.0 / (d as f64).sqrt();
            let want = rf::attention(&f32_(&q)?, &f32_(&k)?, &f32_(&v)?, scale, causal)?;
            let shape = format!(
                "{b}x{h}x{nq}x{nk}x{d}{}{}",
                if causal { " causal" } else { "" },
                if transposed { " bnhd" } else { "" }
            );
            r.check(
                "attention",
                &shape,
                dt,
                || Ok(pk::attention(&q, &k, &v, scale, causal)?),
                want.clone(),
            )?;
            let (wb, wh, wn, wd) = want.dims4()?;
            let want_m = want.transpose(1, 2)?.reshape((wb, wn, wh * wd))?;
            r.check(
                "attention_merged_heads",
                &shape,
                dt,
                || Ok(pk::attention_merged_heads(&q, &k, &v, scale, causal)?),
                want_m,
            )?;
        }
    }

    let mut ew_dtypes = dtypes.clone();
    ew_dtypes.push(DType::F32);

    // ---- LayerNorm + modulate: (x shape, modulation shape)
    let ln: Vec<(Vec<usize>, Vec<usize>)> = vec![
        (vec![1, 4608, 3072], vec![1, 3072]),
        (vec![2, 1536, 3072], vec![2, 1, 3072]),
        (vec![2, 577, 768], vec![768]),
        (vec![1, 37, 100], vec![1, 100]), // C not a multiple of 8: scalar path
    ];
    for (xs, ms) in &ln {
        for &dt in &ew_dtypes {
            let x = rnd(&dev, xs, 3.0, 2.0, dt)?;
            let shift = rnd(&dev, ms, 1.0, 0.0, dt)?;
            let scale = rnd(&dev, ms, 0.5, 0.0, dt)?;
            let want = rf::layer_norm_modulate(&f32_(&x)?, &f32_(&shift)?, &f32_(&scale)?, 1e-6)?;
            let shape = format!("{xs:?} mod {ms:?}");
            r.check(
                "layer_norm_modulate",
                &shape,
                dt,
                || Ok(pk::layer_norm_modulate(&x, &shift, &scale, 1e-6)?),
                want,
            )?;
            let want = rf::layer_norm_no_affine(&f32_(&x)?, 1e-6)?;
            r.check(
                "layer_norm_no_affine",
                &format!("{xs:?}"),
                dt,
                || Ok(pk::layer_norm_no_affine(&x, 1e-6)?),
                want,
            )?;
        }
    }

    // ---- gated residual: (x shape, gate shape, magnitude); large magnitudes overflow f16.
    // With a magnitude, x and y are uniform in ±magnitude (finite in f16) and x + gate·y overflows
    // the f16 range often.
    let gr: Vec<(Vec<usize>, Vec<usize>, f32)> = vec![
        (vec![1, 4608, 3072], vec![1, 3072], 0.0),
        (vec![2, 1536, 3072], vec![2, 1, 3072], 60000.0),
        (vec![1, 10, 13], vec![13], 0.0),
    ];
    for (xs, gs, mag) in &gr {
        for &dt in &ew_dtypes {
            let big = |shape: &[usize]| -> Result<Tensor> {
                Ok((Tensor::rand(-1f32, 1.0, shape, &dev)? * *mag as f64)?.to_dtype(dt)?)
            };
            let (x, y) = if *mag > 0.0 {
                (big(xs)?, big(xs)?)
            } else {
                (rnd(&dev, xs, 1.0, 0.0, dt)?, rnd(&dev, xs, 1.0, 0.0, dt)?)
            };
            let g = rnd(&dev, gs, 1.0, 0.0, dt)?;
            for clamp in [false, true] {
                if *mag > 0.0 && (!clamp || dt != DType::F16) {
                    continue; // overflowing without the clamp is not a comparable result
                }
                let mut want = rf::gated_residual(&f32_(&x)?, &f32_(&g)?, &f32_(&y)?, false)?;
                if clamp && dt == DType::F16 {
                    want = want.clamp(-pk::F16_MAX, pk::F16_MAX)?;
                }
                let shape = format!("{xs:?} gate {gs:?}{}", if clamp { " clamp" } else { "" });
                r.check(
                    "gated_residual",
                    &shape,
                    dt,
                    || Ok(pk::gated_residual(&x, &g, &y, clamp)?),
                    want,
                )?;
            }
        }
    }

    // ---- QK RMSNorm + RoPE: (B, H, N, D, transposed)
    let rp: Vec<(usize, usize, usize, usize, bool)> = vec![
        (1, 24, 4608, 128, false),
        (1, 24, 1536, 128, true),
        (2, 12, 77, 64, false),
        (1, 3, 10, 6, true),
    ];
    for &(b, h, n, d, transposed) in &rp {
        for &dt in &ew_dtypes {
            let x = if transposed {
                rnd(&dev, &[b, n, h, d], 2.0, 0.0, dt)?.transpose(1, 2)?
            } else {
                rnd(&dev, &[b, h, n, d], 2.0, 0.0, dt)?
            };
            let w = rnd(&dev, &[d], 0.3, 1.0, dt)?;
            let ang = (Tensor::rand(0f32, 100.0, (n, d / 2), &dev)?).to_dtype(DType::F32)?;
            let (cos, sin) = (ang.cos()?, ang.sin()?);
            let want = rf::qk_rmsnorm_rope(&f32_(&x)?, &f32_(&w)?, &cos, &sin, 1e-6)?;
            let shape = format!("{b}x{h}x{n}x{d}{}", if transposed { " bnhd" } else { "" });
            r.check(
                "qk_rmsnorm_rope",
                &shape,
                dt,
                || Ok(pk::qk_rmsnorm_rope(&x, &w, &cos, &sin, 1e-6)?),
                want,
            )?;
            let want = rf::rope_interleaved(&f32_(&x)?, &cos, &sin)?;
            r.check(
                "rope_interleaved",
                &shape,
                dt,
                || Ok(pk::rope_interleaved(&x, &cos, &sin)?),
                want,
            )?;
        }
    }

    // ---- bias + GELU(tanh)
    let bg: Vec<Vec<usize>> = vec![
        vec![4608, 12288],
        vec![1, 1536, 12288],
        vec![7, 100],
        vec![3, 5, 9],
    ];
    for xs in &bg {
        for &dt in &ew_dtypes {
            let c = xs[xs.len() - 1];
            let x = rnd(&dev, xs, 2.0, 0.0, dt)?;
            let b = rnd(&dev, &[c], 1.0, 0.0, dt)?;
            let want = rf::bias_gelu_tanh(&f32_(&x)?, &f32_(&b)?)?;
            r.check(
                "bias_gelu_tanh",
                &format!("{xs:?}"),
                dt,
                || Ok(pk::bias_gelu_tanh(&x, &b)?),
                want,
            )?;
        }
    }

    println!(
        "kernel-check: {} of {} checks failed (compute capability {cap} build)",
        r.fails, r.rows
    );
    if r.fails > 0 {
        std::process::exit(1);
    }
    Ok(())
}

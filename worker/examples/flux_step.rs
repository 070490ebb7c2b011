//! One FLUX transformer step from files, timed: the GPU parity/speed harness (`bench/flux_gpu.sh`).
//!
//! `flux_step --weights DIR --inputs IN.safetensors[,IN2…] --out OUT.safetensors[,OUT2…] [--dtype f16]
//!  [--device cuda] [--iters 3] [--time-dtype f16] [--gguf FILE] [--quant auto|dequant-f16|dequant|native]
//!  [--f32-attention f16|reference] [--ref FILE[:NAME][,…]]`
//!
//! `DIR` is a diffusers `transformer/` folder (config.json + safetensors); with `--gguf` the weights
//! come from that GGUF file and `DIR/config.json` (if present) gives the configuration.
//! `IN.safetensors` holds `hidden_states` `[1, L, in_channels]`, `encoder_hidden_states` `[1, T, joint_dim]`,
//! `pooled` `[1, pooled_dim]`, `timestep` `[1]` (the value diffusers passes, t/1000), `guidance` `[1]`,
//! and scalars `latent_h`, `latent_w` (packed grid). Several inputs (e.g. several image sizes) run
//! one after the other on the once-loaded model. For each, writes `sample` to the matching `--out`
//! and prints a JSON line with timings; with `--ref` also the relative L2 error against the
//! reference tensor (`NAME`, default the file's only tensor).
//!
//! `flux_step --linear-bench [--device cuda]` times FLUX-shaped GGUF linears through the two
//! CUDA paths (dequantize-to-f16 + cuBLAS vs candle's MMQ kernels) against a dense f16 matmul.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use pawfect_worker::models::flux::config::TransformerConfig;
use pawfect_worker::models::flux::sampling::{Rope, model_time_inputs};
use pawfect_worker::models::flux::store::{
    GgufStore, LinearOpts, QuantMatmul, SafetensorsStore, WeightStore,
};
use pawfect_worker::models::flux::transformer::{F32Attention, FluxTransformer, Loader};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn dtype(s: &str) -> Result<DType> {
    Ok(match s {
        "f32" => DType::F32,
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        o => bail!("dtype {o}"),
    })
}

fn device(s: &str) -> Result<Device> {
    Ok(if s == "cpu" {
        Device::Cpu
    } else {
        Device::new_cuda(0)?
    })
}

fn linear_bench(dev: &Device) -> Result<()> {
    // (tokens, in, out): double-block qkv, single-block linear1, mlp down; 4608 = 1024² + 512 text.
    let shapes = [
        (4608usize, 3072usize, 9216usize),
        (4608, 3072, 21504),
        (4608, 12288, 3072),
        (1536, 3072, 21504),
    ];
    let iters = 10;
    for (m, k, n) in shapes {
        let x = Tensor::randn(0f32, 1.0, (m, k), dev)?.to_dtype(DType::F16)?;
        let w = Tensor::randn(0f32, 0.02, (n, k), &Device::Cpu)?;
        let flops = 2.0 * (m * k * n) as f64;
        let wd = w.to_dtype(DType::F16)?.to_device(dev)?;
        let time = |f: &dyn Fn() -> Result<Tensor>| -> Result<f64> {
            f()?;
            dev.synchronize()?;
            let t = Instant::now();
            for _ in 0..iters {
                f()?;
            }
            dev.synchronize()?;
            Ok(t.elapsed().as_secs_f64() / iters as f64)
        };
        let dense = time(&|| Ok(x.matmul(&wd.t()?)?))?;
        println!(
            "{{\"shape\":[{m},{k},{n}],\"kind\":\"dense_f16\",\"ms\":{:.3},\"tflops\":{:.1}}}",
            dense * 1e3,
            flops / dense / 1e12
        );
        for q in [
            GgmlDType::Q8_0,
            GgmlDType::Q4_0,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
        ] {
            let qt = Arc::new(QTensor::quantize_onto(&w, q, dev)?);
            let mm = QMatMul::from_arc(qt.clone())?;
            let via_f16 = time(&|| Ok(x.matmul(&qt.dequantize_f16(dev)?.t()?)?))?;
            let mmq = time(&|| Ok(mm.forward(&x)?))?;
            for (kind, s) in [("dequant_f16_cublas", via_f16), ("candle_mmq", mmq)] {
                println!(
                    "{{\"shape\":[{m},{k},{n}],\"kind\":\"{kind}\",\"qtype\":\"{q:?}\",\"ms\":{:.3},\"tflops\":{:.1}}}",
                    s * 1e3,
                    flops / s / 1e12
                );
            }
        }
    }
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dev = device(&arg(&args, "--device").unwrap_or_else(|| "cuda".into()))?;
    if args.iter().any(|a| a == "--linear-bench") {
        return linear_bench(&dev);
    }
    let weights = PathBuf::from(arg(&args, "--weights").context("--weights")?);
    let list = |name: &str| -> Result<Vec<PathBuf>> {
        Ok(arg(&args, name)
            .with_context(|| name.to_string())?
            .split(',')
            .map(PathBuf::from)
            .collect())
    };
    let inputs = list("--inputs")?;
    let outs = list("--out")?;
    if inputs.len() != outs.len() {
        bail!("--inputs and --out need the same number of files");
    }
    let refs: Vec<String> = arg(&args, "--ref")
        .map(|r| r.split(',').map(String::from).collect())
        .unwrap_or_default();
    if !refs.is_empty() && refs.len() != inputs.len() {
        bail!("--ref needs one reference per input");
    }
    let dt = dtype(&arg(&args, "--dtype").unwrap_or_else(|| "f16".into()))?;
    let time_dt = dtype(&arg(&args, "--time-dtype").unwrap_or_else(|| "f16".into()))?;
    let iters: usize = arg(&args, "--iters")
        .unwrap_or_else(|| "3".into())
        .parse()?;
    let quant: QuantMatmul = arg(&args, "--quant")
        .unwrap_or_else(|| "auto".into())
        .parse()
        .map_err(anyhow::Error::msg)?;
    let f32_attention = match arg(&args, "--f32-attention").as_deref() {
        None | Some("f16") => F32Attention::F16,
        Some("reference") => F32Attention::Reference,
        Some(o) => bail!("--f32-attention {o} (f16 or reference)"),
    };

    let t = Instant::now();
    let store: Box<dyn WeightStore> = match arg(&args, "--gguf") {
        Some(g) => Box::new(GgufStore::open(&PathBuf::from(g), &dev)?),
        None => {
            let mut files: Vec<PathBuf> = std::fs::read_dir(&weights)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
                .collect();
            files.sort();
            Box::new(SafetensorsStore::open(&files, &dev)?)
        }
    };
    let layout = Loader::detect_layout(store.as_ref())?;
    let cfg_file = weights.join("config.json");
    let cfg: TransformerConfig = if cfg_file.is_file() {
        serde_json::from_str(&std::fs::read_to_string(&cfg_file)?)?
    } else {
        Loader::infer_config(store.as_ref(), layout)?
    };
    let mut tr = FluxTransformer::load(
        &Loader {
            store: store.as_ref(),
            layout,
            opts: LinearOpts { dtype: dt, quant },
        },
        &cfg,
    )?;
    tr.set_f32_attention(f32_attention);
    drop(store);
    dev.synchronize()?;
    let load_s = t.elapsed().as_secs_f64();

    for (i, (input, out)) in inputs.iter().zip(&outs).enumerate() {
        let mut inp = candle_core::safetensors::load(input, &dev)?;
        let mut take = |n: &str| inp.remove(n).with_context(|| format!("input {n}"));
        let x = take("hidden_states")?;
        let txt = take("encoder_hidden_states")?;
        let pooled = take("pooled")?;
        let scalar = |t: Tensor| -> Result<f32> {
            Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?[0])
        };
        let ts = scalar(take("timestep")?)?;
        let g = scalar(take("guidance")?)?;
        let lh = scalar(take("latent_h")?)? as usize;
        let lw = scalar(take("latent_w")?)? as usize;
        let (tm, gm) = model_time_inputs(ts * 1000.0, g, time_dt);
        let rope = Rope::new(txt.dim(1)?, lh, lw, &cfg.axes_dims_rope, cfg.theta, &dev)?;

        let step = || -> Result<Tensor> {
            let temb = tr.conditioning(&[tm], Some(&[gm]), &pooled)?;
            Ok(tr.forward(&x, &txt, &temb, &rope)?)
        };
        let y = step()?; // warm-up
        dev.synchronize()?;
        let mut times = vec![];
        for _ in 0..iters {
            let t = Instant::now();
            step()?;
            dev.synchronize()?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let y = y.to_dtype(DType::F32)?;
        let finite = y
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .all(|v| v.is_finite());
        let rel = match refs.get(i) {
            Some(r) => {
                let (file, name) = match r.split_once(':') {
                    Some((f, n)) => (f, Some(n)),
                    None => (r.as_str(), None),
                };
                let mut m = candle_core::safetensors::load(file, &Device::Cpu)?;
                let want = match name {
                    Some(n) => m
                        .remove(n)
                        .with_context(|| format!("{file}: no tensor {n}"))?,
                    None if m.len() == 1 => m.into_values().next().context("empty")?,
                    None => bail!("{file} holds several tensors: name one as FILE:NAME"),
                };
                let want = want.to_dtype(DType::F32)?;
                let got = y.to_device(&Device::Cpu)?.reshape(want.shape())?;
                let num = (got - &want)?.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt();
                let den = want.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt();
                format!(",\"rel_err_vs_ref\":{:.3e}", num / den.max(1e-30))
            }
            None => String::new(),
        };
        candle_core::safetensors::save(&[("sample", y)].into_iter().collect(), out)?;
        times.sort_by(|a, b| a.total_cmp(b));
        let median = times
            .get(times.len() / 2)
            .map_or("null".to_string(), |m| format!("{m:.1}"));
        println!(
            "{{\"input\":{:?},\"tokens\":{},\"load_s\":{load_s:.1},\"step_ms_median\":{median},\"step_ms_all\":{times:?},\"finite\":{finite},\"t_model\":{tm},\"g_model\":{gm}{rel}}}",
            input.display(),
            x.dim(1)? + txt.dim(1)?,
        );
    }
    Ok(())
}

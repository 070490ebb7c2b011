//! One FLUX transformer step from files, timed: the GPU parity/speed harness (`bench/flux_gpu.sh`).
//!
//! `flux_step --weights DIR --inputs IN.safetensors[,IN2…] --out OUT.safetensors[,OUT2…] [--dtype f16]
//!  [--device cuda] [--iters 3] [--time-dtype f16] [--gguf FILE] [--quant auto|dequant-f16|dequant|native]
//!  [--f32-attention f16|reference] [--ref FILE[:NAME][,…]] [--profile]`
//!
//! `DIR` is a diffusers `transformer/` folder (config.json + safetensors); with `--gguf` the weights
//! come from that GGUF file and `DIR/config.json` (if present) gives the configuration.
//! `IN.safetensors` holds `hidden_states` `[1, L, in_channels]`, `encoder_hidden_states` `[1, T, joint_dim]`,
//! `pooled` `[1, pooled_dim]`, `timestep` `[1]` (the value diffusers passes, t/1000), `guidance` `[1]`,
//! and scalars `latent_h`, `latent_w` (packed grid). Several inputs (e.g. several image sizes) run
//! one after the other on the once-loaded model. For each, writes `sample` to the matching `--out`
//! and prints a JSON line with timings; with `--ref` also the relative L2 error against the
//! reference tensor (`NAME`, default the file's only tensor). With `--profile`, after the timed
//! steps, `--iters` more steps run with the transformer's region timer on (a device sync around
//! every region, so these steps are slower than the plain ones) and a JSON line gives, per region,
//! the ms per step, the share of the profiled step and the calls per step.
//!
//! `flux_step --pipeline MODELS --image IMG --mask MASK --noise NOISE.safetensors --prompt P --out TRACE
//!  [--steps 4] [--dtype f16] [--vae-dtype f16] [--clip-dtype f16] [--time-dtype f16] [--runs 2]
//!  [--diffusers DTRACE.safetensors]` runs the whole Fill pipeline (`FluxFill::inpaint_traced`, the
//! code path of `pawfect-worker inpaint`) `--runs` times, prints the stage timings of each run, and
//! saves its intermediate tensors (`t5`, `pooled`, `cond`, `z` = unscaled latents before decoding,
//! `image` in [0, 1]). With `--diffusers` (diffusers' `t5`, `pooled`, `cond`, `z` of the same run,
//! see `bench/flux_gpu_pipeline.py`) it also saves the pieces that split a difference by component:
//! `z_dinputs` (the Rust denoise loop fed diffusers' text embeddings and condition), `image_dz`
//! (the Rust VAE decoding diffusers' `z`), and `image_dz_vae32` / `image_vae32` (an f32 Rust VAE
//! decoding diffusers' / its own `z`).
//!
//! `flux_step --linear-bench [--device cuda]` times FLUX-shaped GGUF linears through the two
//! CUDA paths (dequantize-to-f16 + cuBLAS vs candle's MMQ kernels) against a dense f16 matmul.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use pawfect_models::checkpoint::{
    GgufStore, LinearOpts, QuantMatmul, SafetensorsStore, WeightStore,
};
use pawfect_models::flux::config::{TransformerConfig, VaeConfig};
use pawfect_models::flux::pipeline::{FluxFill, FluxLoadOptions, InpaintOptions};
use pawfect_models::flux::sampling::{
    Rope, euler_step, model_time_inputs, pack_latents, sigmas, timesteps, unpack_latents,
};
use pawfect_models::flux::transformer::{F32Attention, FluxTransformer, Loader};
use pawfect_models::flux::vae::AutoEncoder;
use pawfect_models::weights::{FluxModelPaths, FluxOverrides};

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

fn to_img(t: &Tensor) -> Result<Tensor> {
    Ok(((t * 0.5)? + 0.5)?
        .clamp(0f32, 1f32)?
        .to_device(&Device::Cpu)?)
}

fn pipeline(args: &[String], dev: &Device, models: &str) -> Result<()> {
    let need = |n: &str| arg(args, n).with_context(|| format!("{n} is required with --pipeline"));
    let dt = |n: &str, d: &str| dtype(&arg(args, n).unwrap_or_else(|| d.into()));
    let paths = FluxModelPaths::resolve(&PathBuf::from(models), &FluxOverrides::default())?;
    let mut o = FluxLoadOptions::new(dev.clone(), dt("--dtype", "f16")?);
    o.t5.dtype = dt("--dtype", "f16")?;
    o.vae.dtype = dt("--vae-dtype", "f16")?;
    o.clip.dtype = dt("--clip-dtype", "f16")?;
    let t = Instant::now();
    let fill = FluxFill::load(&paths, &o)?;
    dev.synchronize()?;
    println!("{{\"load_s\":{:.1}}}", t.elapsed().as_secs_f64());

    let image = image::open(need("--image")?)?.to_rgb8();
    let mask = image::open(need("--mask")?)?.to_luma8();
    let mut noise = candle_core::safetensors::load(need("--noise")?, &Device::Cpu)?;
    let noise = noise
        .remove("noise")
        .context("noise file: no tensor `noise`")?;
    let prompt = need("--prompt")?;
    let opts = InpaintOptions {
        steps: arg(args, "--steps").unwrap_or_else(|| "4".into()).parse()?,
        noise: Some(noise.clone()),
        time_dtype: Some(dt("--time-dtype", "f16")?),
        ..InpaintOptions::default()
    };
    let runs: usize = arg(args, "--runs").unwrap_or_else(|| "2".into()).parse()?;
    let mut trace = None;
    for run in 0..runs.max(1) {
        let t = Instant::now();
        let (out, tr) = fill.inpaint_traced(&image, &mask, &prompt, &opts, &mut |_| true)?;
        let tm = out.timings;
        println!(
            "{{\"run\":{run},\"steps\":{},\"total_s\":{:.2},\"encode_ms\":{:.0},\"denoise_ms\":{:.0},\"ms_per_step\":{:.1},\"decode_ms\":{:.0}}}",
            opts.steps,
            t.elapsed().as_secs_f64(),
            tm.encode_ms,
            tm.denoise_ms,
            tm.denoise_ms / opts.steps as f64,
            tm.decode_ms
        );
        trace = Some(tr);
    }
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis();
    println!("{{\"runs_done_unix_ms\":{now_ms}}}");
    let tr = trace.context("no run")?;
    let emb = fill.encode_prompt(&prompt, opts.max_sequence_length)?;
    let (w, h) = (image.width() as usize, image.height() as usize);
    let vs = fill.vae.config().scale_factor();
    let (lh, lw) = (2 * (h / (vs * 2)), 2 * (w / (vs * 2)));
    let unscaled = |lat: &Tensor| -> Result<Tensor> {
        Ok(fill.vae.unscale_latents(&unpack_latents(lat, lh, lw)?)?)
    };
    let f32c =
        |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?) };
    let z = unscaled(&tr.latents)?;
    let mut saved: Vec<(String, Tensor)> = vec![
        ("t5".into(), f32c(&emb.t5)?),
        ("pooled".into(), f32c(&emb.pooled)?),
        ("cond".into(), f32c(&tr.condition)?),
        ("z".into(), f32c(&z)?),
        ("image".into(), f32c(&tr.image)?),
    ];
    if let Some(dfile) = arg(args, "--diffusers") {
        let mut d = candle_core::safetensors::load(&dfile, dev)?;
        let mut take = |n: &str| {
            d.remove(n)
                .with_context(|| format!("{dfile}: no tensor {n}"))
        };
        let (d_t5, d_pooled, d_cond, d_z) =
            (take("t5")?, take("pooled")?, take("cond")?, take("z")?);
        // The denoise loop of `inpaint_traced`, fed diffusers' embeddings and condition.
        let tr_ = &fill.transformer;
        let tdt = tr_.dtype();
        let sig = sigmas(opts.steps, h, w, vs, fill.scheduler());
        let ts = timesteps(&sig, fill.scheduler());
        let t5 = d_t5.to_dtype(tdt)?;
        let pooled = d_pooled.to_dtype(tdt)?;
        let cond = d_cond.to_dtype(tdt)?;
        let rope = Rope::new(
            t5.dim(1)?,
            lh / 2,
            lw / 2,
            &tr_.config().axes_dims_rope,
            tr_.config().theta,
            dev,
        )?;
        let mut lat = pack_latents(&noise.to_dtype(DType::F32)?)?.to_device(dev)?;
        let time_dtype = opts.time_dtype.unwrap_or(DType::BF16);
        for (i, &t) in ts.iter().enumerate() {
            let (tm, gm) = model_time_inputs(t, opts.guidance, time_dtype);
            let temb = tr_.conditioning(&[tm], Some(&[gm]), &pooled)?;
            let x = Tensor::cat(&[lat.to_dtype(tdt)?, cond.clone()], 2)?;
            let v = tr_.forward(&x, &t5, &temb, &rope)?;
            lat = euler_step(&lat, &v, sig[i], sig[i + 1])?;
        }
        saved.push(("z_dinputs".into(), f32c(&unscaled(&lat)?)?));
        saved.push(("image_dz".into(), f32c(&to_img(&fill.vae.decode(&d_z)?)?)?));
        let vcfg: VaeConfig = match &paths.vae_config {
            Some(p) => serde_json::from_str(&std::fs::read_to_string(p)?)?,
            None => VaeConfig::flux(),
        };
        let vae32 = AutoEncoder::load(&vcfg, &paths.vae, DType::F32, dev)?;
        saved.push((
            "image_dz_vae32".into(),
            f32c(&to_img(&vae32.decode(&d_z)?)?)?,
        ));
        saved.push(("image_vae32".into(), f32c(&to_img(&vae32.decode(&z)?)?)?));
    }
    candle_core::safetensors::save(&saved.into_iter().collect(), need("--out")?)?;
    Ok(())
}

fn main() -> Result<()> {
    let result = run();
    // Ops that ran their unfused path on the GPU (should be none on the f16 path).
    eprintln!(
        "{{\"kernel_fallbacks\":{:?}}}",
        pawfect_kernels::fallback::counts()
    );
    result
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dev = device(&arg(&args, "--device").unwrap_or_else(|| "cuda".into()))?;
    if args.iter().any(|a| a == "--linear-bench") {
        return linear_bench(&dev);
    }
    if let Some(models) = arg(&args, "--pipeline") {
        return pipeline(&args, &dev, &models);
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
    let profile = args.iter().any(|a| a == "--profile");
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

        let step = |tr: &FluxTransformer| -> Result<Tensor> {
            let temb = tr.conditioning(&[tm], Some(&[gm]), &pooled)?;
            Ok(tr.forward(&x, &txt, &temb, &rope)?)
        };
        let y = step(&tr)?; // warm-up
        dev.synchronize()?;
        let mut times = vec![];
        for _ in 0..iters {
            let t = Instant::now();
            step(&tr)?;
            dev.synchronize()?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        if profile && iters > 0 {
            tr.set_profiling(true);
            let t = Instant::now();
            for _ in 0..iters {
                step(&tr)?;
            }
            dev.synchronize()?;
            let profiled_ms = t.elapsed().as_secs_f64() * 1e3 / iters as f64;
            let regions = tr.take_profile()?;
            tr.set_profiling(false);
            let summed: f64 =
                regions.iter().map(|r| r.total.as_secs_f64()).sum::<f64>() * 1e3 / iters as f64;
            let rows: Vec<String> = regions
                .iter()
                .map(|r| {
                    let ms = r.total.as_secs_f64() * 1e3 / iters as f64;
                    format!(
                        "{{\"region\":{:?},\"ms_per_step\":{ms:.2},\"pct_of_profiled_step\":{:.1},\"calls_per_step\":{}}}",
                        r.name,
                        100.0 * ms / profiled_ms,
                        r.calls / iters as u64
                    )
                })
                .collect();
            println!(
                "{{\"input\":{:?},\"profile_iters\":{iters},\"profiled_step_ms\":{profiled_ms:.1},\"regions_sum_ms\":{summed:.1},\"regions\":[{}]}}",
                input.display(),
                rows.join(",")
            );
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

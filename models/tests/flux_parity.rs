//! FLUX.1-Fill parity against diffusers on the tiny fixture pipeline (`tools/fixtures_flux.py`).
//!
//! The fixture folder is `$PAWFECT_FIXTURES/flux` (default `tests/fixtures/flux` at the workspace
//! root); `tools/check_fixture_seeds.sh` runs these tests on fixtures of several seeds. Every bound
//! carries its reason where it is used: tokens and packing exact, sigmas ≤ 1e-6, f32 encoder / VAE
//! / transformer outputs relative L2 error ≤ 1e-4 (`DENSE_TOL`), 2-step latents ≤ 1e-3, decoded
//! image mean absolute error ≤ 1/255; GGUF: ≤ 1e-4 against the exact (gguf-py f32) reference, and
//! bounds derived from diffusers' f16 rounding, from the f16 / 8-bit device paths and, on CUDA,
//! from the f16 attention that f32 runs through by default (see the GGUF section).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use pawfect_models::checkpoint::{
    GgufStore, Linear, LinearOpts, QuantMatmul, SafetensorsStore, WeightStore,
};
use pawfect_models::flux::config::{TransformerConfig, VaeConfig};
use pawfect_models::flux::profile::RegionTime;
use pawfect_models::flux::sampling::{Rope, model_time_inputs, pack_latents, sigmas, timesteps};
use pawfect_models::flux::transformer::{F32Attention, FluxTransformer, Loader};
use pawfect_models::flux::vae::{AutoEncoder, VaeWeights};
use pawfect_models::flux::{FluxFill, FluxLoadOptions, InpaintOptions, ModelError, Step};
use pawfect_models::weights::{FluxModelPaths, FluxOverrides};
use serde_json::Value;

type R<T = ()> = Result<T, Box<dyn std::error::Error>>;

fn fixtures() -> PathBuf {
    let base = std::env::var_os("PAWFECT_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join("tests")
                .join("fixtures")
        });
    base.join("flux")
}

fn manifest() -> R<Value> {
    Ok(serde_json::from_str(&std::fs::read_to_string(
        fixtures().join("manifest.json"),
    )?)?)
}

fn load(rel: &str) -> R<Tensor> {
    load_named(rel, "data")
}

fn load_named(rel: &str, name: &str) -> R<Tensor> {
    let mut m = candle_core::safetensors::load(fixtures().join(rel), &Device::Cpu)?;
    Ok(m.remove(name)
        .ok_or_else(|| format!("{rel} has no tensor {name}"))?)
}

/// ‖a − b‖₂ / ‖b‖₂
fn rel_err(a: &Tensor, b: &Tensor) -> R<f64> {
    assert_eq!(a.dims(), b.dims(), "shape");
    let a = a.to_dtype(DType::F64)?.flatten_all()?;
    let b = b.to_dtype(DType::F64)?.flatten_all()?;
    let num = (&a - &b)?.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    let den = b.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    Ok(num / den.max(1e-30))
}

/// f32 against f32 on the same weights: the two sides differ only in operation order (matmul
/// blocking, libm vs torch exp / sin); measured ≈ 5e-5 on the transformer, where sin/cos of
/// guidance·1000 rad amplify 1-ulp differences, ≤ 1e-5 elsewhere.
const DENSE_TOL: f64 = 1e-4;

fn check(name: &str, a: &Tensor, b: &Tensor, tol: f64) -> R {
    let e = rel_err(a, b)?;
    eprintln!("{name}: rel err {e:.3e} (bound {tol:.3e})");
    assert!(e <= tol, "{name}: rel err {e:.3e} > {tol:e}");
    Ok(())
}

fn paths(o: &FluxOverrides) -> R<FluxModelPaths> {
    Ok(FluxModelPaths::resolve(&fixtures().join("pipeline"), o)?)
}

fn pipeline() -> R<FluxFill> {
    Ok(FluxFill::load(
        &paths(&FluxOverrides::default())?,
        &FluxLoadOptions::new(Device::Cpu, DType::F32),
    )?)
}

fn prompt() -> R<String> {
    Ok(manifest()?["prompt"].as_str().ok_or("prompt")?.to_string())
}

fn t5_len() -> R<usize> {
    Ok(manifest()?["t5_len"].as_u64().ok_or("t5_len")? as usize)
}

fn ids(t: &Tensor) -> R<Vec<u32>> {
    Ok(t.to_dtype(DType::I64)?
        .flatten_all()?
        .to_vec1::<i64>()?
        .into_iter()
        .map(|v| v as u32)
        .collect())
}

#[test]
fn flux_parity_tokenizers() -> R {
    let fill = pipeline()?;
    let m = manifest()?;
    let len = t5_len()?;
    let p = prompt()?;
    assert_eq!(
        fill.text.clip_tok.encode(&p, 77)?,
        ids(&load_named("ref/token_ids.safetensors", "clip")?)?
    );
    assert_eq!(
        fill.text.t5_tok.encode(&p, len)?,
        ids(&load_named("ref/token_ids.safetensors", "t5")?)?
    );
    for name in ["long", "odd"] {
        let text = m[format!("text_{name}")].as_str().ok_or("text")?;
        let clip = ids(&load_named(
            "ref/token_ids.safetensors",
            &format!("clip_ids_{name}"),
        )?)?;
        let t5 = ids(&load_named(
            "ref/token_ids.safetensors",
            &format!("t5_ids_{name}"),
        )?)?;
        assert_eq!(fill.text.clip_tok.encode(text, 77)?, clip, "clip {name}");
        assert_eq!(fill.text.t5_tok.encode(text, len)?, t5, "t5 {name}");
    }
    Ok(())
}

#[test]
fn flux_parity_text_encoders() -> R {
    let fill = pipeline()?;
    let emb = fill.encode_prompt(&prompt()?, t5_len()?)?;
    check(
        "clip pooled",
        &emb.pooled,
        &load("ref/clip_pooled.safetensors")?,
        DENSE_TOL,
    )?;
    check("t5", &emb.t5, &load("ref/t5.safetensors")?, DENSE_TOL)?;
    // cached: the same embeddings object
    let again = fill.encode_prompt(&prompt()?, t5_len()?)?;
    assert!(Arc::ptr_eq(&emb, &again));
    Ok(())
}

/// Bit-level equality of two tensors (same shape, dtype and every value's bits).
fn same_bits(a: &Tensor, b: &Tensor) -> R<bool> {
    let bits = |t: &Tensor| -> R<Vec<u32>> {
        Ok(t.to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?
            .into_iter()
            .map(f32::to_bits)
            .collect())
    };
    Ok(a.dims() == b.dims() && a.dtype() == b.dtype() && bits(a)? == bits(b)?)
}

/// The prompt cache is lossless and keyed by what the encoders see: a hit is bit-identical to
/// an encode with the cache off, texts with the same token ids share an entry, other texts
/// miss, and the counts say so.
#[test]
fn flux_prompt_cache_is_exact_and_keyed_by_token_ids() -> R {
    let fill = pipeline()?;
    let mut off = FluxLoadOptions::new(Device::Cpu, DType::F32);
    off.prompt_cache_bytes = 0;
    let uncached = FluxFill::load(&paths(&FluxOverrides::default())?, &off)?;
    let len = t5_len()?;
    let p = prompt()?;

    let first = fill.text.encode_cached(&p, len)?;
    let second = fill.text.encode_cached(&p, len)?;
    assert!(!first.cached && second.cached);
    let fresh = uncached.text.encode_cached(&p, len)?;
    assert!(!fresh.cached);
    for (got, name) in [(&first, "miss"), (&second, "hit")] {
        assert!(
            same_bits(&got.embeds.t5, &fresh.embeds.t5)?,
            "t5 of the {name}"
        );
        assert!(
            same_bits(&got.embeds.pooled, &fresh.embeds.pooled)?,
            "pooled of the {name}"
        );
    }

    // Two texts that differ only past both truncation lengths (CLIP 77 tokens, T5 `len`; each
    // word is at least one token) have the same ids, so the second is a hit.
    let long = "grass ".repeat(80 + len);
    let (a, b) = (format!("{long}cat"), format!("{long}dog"));
    assert_eq!(
        fill.text.clip_tok.encode(&a, 77)?,
        fill.text.clip_tok.encode(&b, 77)?
    );
    assert_eq!(
        fill.text.t5_tok.encode(&a, len)?,
        fill.text.t5_tok.encode(&b, len)?
    );
    assert!(!fill.text.encode_cached(&a, len)?.cached);
    assert!(fill.text.encode_cached(&b, len)?.cached);
    // The same text at another T5 length is another key.
    assert!(!fill.text.encode_cached(&p, len + 1)?.cached);

    let s = fill.prompt_cache_stats();
    assert_eq!(
        (s.hits, s.misses, s.entries, s.evictions),
        (2, 3, 3, 0),
        "{s:?}"
    );
    assert!(s.bytes > 0 && s.bytes <= s.budget, "{s:?}");
    assert_eq!(uncached.prompt_cache_stats().entries, 0);

    // A whole run reports the hit, and gives the same image as with the cache off.
    let (w, h) = (32u32, 32u32);
    let image =
        image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 8) as u8, (y * 8) as u8, 90]));
    let mask = image::GrayImage::from_fn(w, h, |x, _| image::Luma([if x >= 16 { 255 } else { 0 }]));
    let opts = InpaintOptions {
        steps: 1,
        max_sequence_length: len,
        ..InpaintOptions::default()
    };
    let run = fill.inpaint(&image, &mask, &p, &opts, &mut |_| true)?;
    let plain = uncached.inpaint(&image, &mask, &p, &opts, &mut |_| true)?;
    assert!(run.prompt_cached && !plain.prompt_cached);
    assert_eq!(run.image, plain.image);
    Ok(())
}

#[test]
fn flux_parity_schedules() -> R {
    let m = manifest()?;
    let cfg = Default::default();
    for case in m["schedules"].as_array().ok_or("schedules")? {
        let c: Vec<usize> = case
            .as_array()
            .ok_or("case")?
            .iter()
            .map(|v| v.as_u64().unwrap_or(0) as usize)
            .collect();
        let (n, h, w) = (c[0], c[1], c[2]);
        let s = sigmas(n, h, w, 8, &cfg);
        let want = load_named("ref/schedules.safetensors", &format!("sigmas_{n}_{h}x{w}"))?
            .to_vec1::<f32>()?;
        assert_eq!(s.len(), want.len());
        // Both evaluate the same f32 formula; 1e-6 ≈ 8 ulp of 1.0 allows exp() differences.
        for (a, b) in s.iter().zip(&want) {
            assert!(
                (a - b).abs() <= 1e-6,
                "sigmas {n} {h}x{w}: {s:?} vs {want:?}"
            );
        }
        let t = timesteps(&s, &cfg);
        let want_t = load_named(
            "ref/schedules.safetensors",
            &format!("timesteps_{n}_{h}x{w}"),
        )?
        .to_vec1::<f32>()?;
        // timesteps = sigma·1000: the sigma bound times 1000.
        for (a, b) in t.iter().zip(&want_t) {
            assert!(
                (a - b).abs() <= 1e-3,
                "timesteps {n} {h}x{w}: {t:?} vs {want_t:?}"
            );
        }
    }
    Ok(())
}

fn inputs() -> R<(image::RgbImage, image::GrayImage)> {
    let image = image::open(fixtures().join("image.png"))?.to_rgb8();
    let mask = image::open(fixtures().join("mask.png"))?.to_luma8();
    Ok((image, mask))
}

#[test]
fn flux_parity_packing_and_condition() -> R {
    let fill = pipeline()?;
    let noise = load_named("noise.safetensors", "noise")?;
    let packed = pack_latents(&noise)?;
    assert_eq!(
        packed.flatten_all()?.to_vec1::<f32>()?,
        load("ref/packed_noise.safetensors")?
            .flatten_all()?
            .to_vec1::<f32>()?,
        "packed noise"
    );
    let (image, mask) = inputs()?;
    let cond = fill.condition(&image, &mask)?;
    let mask_lat = cond.narrow(2, 64, 256)?;
    assert_eq!(
        mask_lat.flatten_all()?.to_vec1::<f32>()?,
        load("ref/mask_latents.safetensors")?
            .flatten_all()?
            .to_vec1::<f32>()?,
        "mask latents"
    );
    check(
        "masked image latents",
        &cond.narrow(2, 0, 64)?,
        &load("ref/masked_image_latents.safetensors")?,
        DENSE_TOL,
    )?;
    // bad input is refused
    let small = image::RgbImage::new(40, 32);
    let small_mask = image::GrayImage::new(40, 32);
    assert!(matches!(
        fill.condition(&small, &small_mask),
        Err(ModelError::InvalidInput(_))
    ));
    assert!(matches!(
        fill.condition(&image, &image::GrayImage::new(16, 16)),
        Err(ModelError::InvalidInput(_))
    ));
    Ok(())
}

fn vae(weights: VaeWeights) -> R<AutoEncoder> {
    let cfg: VaeConfig = serde_json::from_str(&std::fs::read_to_string(
        fixtures().join("pipeline/vae/config.json"),
    )?)?;
    Ok(AutoEncoder::load(&cfg, &weights, DType::F32, &Device::Cpu)?)
}

#[test]
fn flux_parity_vae() -> R {
    let init = load("ref/init_image.safetensors")?;
    let noise = load_named("noise.safetensors", "noise")?;
    for (tag, w) in [
        (
            "diffusers",
            VaeWeights::Diffusers(
                fixtures().join("pipeline/vae/diffusion_pytorch_model.safetensors"),
            ),
        ),
        (
            "bfl",
            VaeWeights::Bfl(fixtures().join("bfl/ae.safetensors")),
        ),
    ] {
        let mut v = vae(w)?;
        check(
            &format!("vae encode mean ({tag})"),
            &v.encode_mean(&init)?,
            &load("ref/vae_encode_mean.safetensors")?,
            DENSE_TOL,
        )?;
        check(
            &format!("vae decode ({tag})"),
            &v.decode(&noise)?,
            &load("ref/vae_decode.safetensors")?,
            DENSE_TOL,
        )?;
        v.set_tiling(Some(v.config().sample_size));
        check(
            &format!("vae tiled decode ({tag})"),
            &v.decode(&noise)?,
            &load("ref/vae_decode_tiled.safetensors")?,
            DENSE_TOL,
        )?;
        check(
            &format!("vae tiled encode ({tag})"),
            &v.encode_mean(&init)?,
            &load("ref/vae_encode_tiled.safetensors")?,
            DENSE_TOL,
        )?;
    }
    Ok(())
}

fn transformer_cfg() -> R<TransformerConfig> {
    Ok(serde_json::from_str(&std::fs::read_to_string(
        fixtures().join("pipeline/transformer/config.json"),
    )?)?)
}

/// Velocity for the fixture's step-0 input; with `check_temb` also compares the conditioning vector
/// (only meaningful for the dense weights the reference `temb` was computed with).
fn run_transformer(store: &dyn WeightStore, quant: QuantMatmul, check_temb: bool) -> R<Tensor> {
    Ok(run_transformer_with(store, quant, check_temb, false, F32Attention::default())?.0)
}

/// [`run_transformer`] with the f32 attention mode set (it only acts on CUDA).
fn run_transformer_attn(
    store: &dyn WeightStore,
    quant: QuantMatmul,
    attn: F32Attention,
) -> R<Tensor> {
    Ok(run_transformer_with(store, quant, false, false, attn)?.0)
}

/// [`run_transformer`], optionally with the region timer on; returns the timed regions too. Runs
/// on the store's device (inputs moved there), output back on the CPU.
fn run_transformer_with(
    store: &dyn WeightStore,
    quant: QuantMatmul,
    check_temb: bool,
    profile: bool,
    attn: F32Attention,
) -> R<(Tensor, Vec<RegionTime>)> {
    run_transformer_prepared(store, quant, check_temb, profile, attn, |_| Ok(()))
}

/// [`run_transformer_with`] with `prepare` applied to the loaded transformer (e.g. int8).
fn run_transformer_prepared(
    store: &dyn WeightStore,
    quant: QuantMatmul,
    check_temb: bool,
    profile: bool,
    attn: F32Attention,
    prepare: impl FnOnce(&mut FluxTransformer) -> R,
) -> R<(Tensor, Vec<RegionTime>)> {
    let dev = store.device().clone();
    let layout = Loader::detect_layout(store)?;
    let loader = Loader {
        store,
        layout,
        opts: LinearOpts {
            dtype: DType::F32,
            quant,
        },
    };
    let mut tr = FluxTransformer::load(&loader, &transformer_cfg()?)?;
    prepare(&mut tr)?;
    tr.set_profiling(profile);
    tr.set_f32_attention(attn);
    let m = manifest()?;
    let t0 = m["t0"].as_f64().ok_or("t0")? as f32;
    let guidance = m["guidance"].as_f64().ok_or("guidance")? as f32;
    let (tm, gm) = model_time_inputs(t0, guidance, DType::F32);
    let pooled = load("ref/clip_pooled.safetensors")?.to_device(&dev)?;
    let temb = tr.conditioning(&[tm], Some(&[gm]), &pooled)?;
    if check_temb {
        // sin/cos of guidance·1000 (3·10⁴ rad) magnify 1-ulp differences of exp() between libm and torch.
        check(
            "temb",
            &temb.to_device(&Device::Cpu)?,
            &load("ref/temb.safetensors")?,
            DENSE_TOL,
        )?;
    }
    let x = load("ref/transformer_in.safetensors")?.to_device(&dev)?;
    let t5 = load("ref/t5.safetensors")?.to_device(&dev)?;
    let (h, w) = (
        m["height"].as_u64().ok_or("h")? as usize,
        m["width"].as_u64().ok_or("w")? as usize,
    );
    let rope = Rope::new(
        t5.dim(1)?,
        h / 16,
        w / 16,
        &tr.config().axes_dims_rope,
        10_000.0,
        &dev,
    )?;
    let y = tr.forward(&x, &t5, &temb, &rope)?;
    Ok((y.to_device(&Device::Cpu)?, tr.take_profile()?))
}

/// One W8A8 linear against torchao's `Int8DynamicActivationInt8WeightConfig` on the same
/// weight and a real activation (single block 0's `proj_out` input): the scheme reproduces
/// torchao operation for operation (exact integer sums, the same roundings in the same order),
/// so the outputs are equal up to the last f32 rounding of the bias add.
#[test]
fn flux_parity_int8_linear_equals_torchao() -> R {
    let f = fixtures().join("ref/int8_linear.safetensors");
    let ts = candle_core::safetensors::load(&f, &Device::Cpu)?;
    let get = |k: &str| ts.get(k).cloned().ok_or(format!("{}: no {k}", f.display()));
    let mut lin = Linear::from_dense(get("weight")?, Some(get("bias")?))?;
    lin.quantize_int8()?;
    assert!(lin.is_int8());
    let x = get("x")?;
    let (y, work) = pawfect_models::accounting::measure(|| lin.forward(&x));
    let (y, want) = (
        y?.flatten_all()?.to_vec1::<f32>()?,
        get("y")?.flatten_all()?.to_vec1::<f32>()?,
    );
    assert_eq!(y.len(), want.len());
    let mut worst = 0f32;
    for (a, b) in y.iter().zip(&want) {
        // One f32 rounding of |b|: the only op whose operand order could differ is the bias add.
        let ulp = f32::EPSILON * b.abs().max(f32::MIN_POSITIVE);
        worst = worst.max((a - b).abs() / ulp);
    }
    eprintln!(
        "int8 linear vs torchao: worst {worst} ulp over {} outputs",
        y.len()
    );
    assert!(
        worst <= 1.0,
        "int8 linear differs from torchao by {worst} ulp"
    );
    // Counted as int8 GEMM work, not f16.
    assert!(work.int8_gemm_op > 0 && work.f16_gemm_flop == 0, "{work:?}");
    Ok(())
}

/// The int8 transformer (every token GEMM W8A8) against torchao's on diffusers' transformer,
/// and against the f32 transformer.
#[test]
fn flux_parity_int8_transformer() -> R {
    let store = SafetensorsStore::open(
        &[fixtures().join("bfl/flux1-fill-dev.safetensors")],
        &Device::Cpu,
    )?;
    let mut quantized = 0;
    let (ours, _) = run_transformer_prepared(
        &store,
        QuantMatmul::Auto,
        false,
        false,
        F32Attention::default(),
        |tr| {
            tr.quantize_token_gemms_int8()?;
            quantized = tr.int8_linears();
            Ok(())
        },
    )?;
    let m = manifest()?;
    // Our fused qkv / linear1 are diffusers' separate to_q, to_k, to_v (and proj_mlp) stacked:
    // per-output-channel scales and one per-token activation scale make the two the same math.
    let fused = m["int8"]["linears"].as_u64().ok_or("int8.linears")?;
    eprintln!("int8 linears: ours {quantized} (fused), torchao {fused}");
    let cfg = transformer_cfg()?;
    let (nd, ns) = (cfg.num_layers as u64, cfg.num_single_layers as u64);
    // Per double block: qkv, proj, mlp.0, mlp.2 of two streams (diffusers: to_q/k/v,
    // add_q/k/v_proj, to_out.0, to_add_out, ff and ff_context's two each); per single block:
    // linear1 and linear2 (diffusers: to_q/k/v, proj_mlp, proj_out).
    assert_eq!(quantized as u64, 8 * nd + 2 * ns, "our int8 set");
    assert_eq!(fused, 12 * nd + 5 * ns, "torchao's int8 set");
    let want = load("ref/int8_transformer_out.safetensors")?;
    let dense = load("ref/transformer_out.safetensors")?;
    let vs_torchao = rel_err(&ours, &want)?;
    let quant_err = rel_err(&want, &dense)?;
    eprintln!("int8 vs torchao {vs_torchao:.3e}; torchao int8 vs f32 {quant_err:.3e}");
    // Not equal to f32 rounding at this level: an activation within f32 noise of a rounding
    // boundary of the int8 grid lands on the other level, and this tiny random model carries
    // such flips to its output (torchao against itself, inputs moved by one f32 rounding:
    // `int8.rounding_spread`, about half the quantization error). The scheme itself is pinned
    // by the exact layer test above; here ours must stay within that spread (2×: four samples
    // of it), and within the 2e-2 of f32.
    let spread = m["int8"]["rounding_spread"]
        .as_array()
        .ok_or("int8.rounding_spread")?
        .iter()
        .filter_map(Value::as_f64)
        .fold(0f64, f64::max);
    eprintln!("torchao's own spread under f32 rounding of its inputs: {spread:.3e}");
    assert!(
        vs_torchao <= 2.0 * spread,
        "int8 vs torchao {vs_torchao:e} beyond 2x torchao's rounding spread {spread:e}"
    );
    // The bound for the tiny fixture: int8 within 2e-2 of f32.
    check("int8 transformer vs f32", &ours, &dense, 2e-2)?;
    Ok(())
}

#[test]
fn flux_parity_transformer_profiled_is_identical() -> R {
    let store = SafetensorsStore::open(
        &[fixtures().join("bfl/flux1-fill-dev.safetensors")],
        &Device::Cpu,
    )?;
    let (plain, none) = run_transformer_with(
        &store,
        QuantMatmul::Auto,
        false,
        false,
        F32Attention::default(),
    )?;
    assert!(none.is_empty(), "regions timed with profiling off");
    let (profiled, regions) = run_transformer_with(
        &store,
        QuantMatmul::Auto,
        false,
        true,
        F32Attention::default(),
    )?;
    let diff = (&plain - &profiled)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert_eq!(diff, 0.0, "profiling changed the output");
    let cfg = transformer_cfg()?;
    let calls = |name: &str| regions.iter().find(|r| r.name == name).map(|r| r.calls);
    assert_eq!(calls("embed.conditioning"), Some(1));
    assert_eq!(calls("double.attention"), Some(cfg.num_layers as u64));
    assert_eq!(
        calls("double.norm_modulate"),
        Some(2 * cfg.num_layers as u64)
    );
    assert_eq!(
        calls("single.attention"),
        Some(cfg.num_single_layers as u64)
    );
    assert_eq!(calls("final_layer"), Some(1));
    Ok(())
}

#[test]
fn flux_parity_transformer() -> R {
    let want = load("ref/transformer_out.safetensors")?;
    let p = paths(&FluxOverrides::default())?;
    let files = match &p.transformer {
        pawfect_models::weights::TransformerFiles::Diffusers(f) => f.clone(),
        other => return Err(format!("unexpected {other:?}").into()),
    };
    assert!(files.len() > 1, "the fixture transformer is sharded");
    let store = SafetensorsStore::open(&files, &Device::Cpu)?;
    check(
        "transformer (diffusers folder)",
        &run_transformer(&store, QuantMatmul::Auto, true)?,
        &want,
        DENSE_TOL,
    )?;
    let bfl = SafetensorsStore::open(
        &[fixtures().join("bfl/flux1-fill-dev.safetensors")],
        &Device::Cpu,
    )?;
    check(
        "transformer (BFL file)",
        &run_transformer(&bfl, QuantMatmul::Auto, true)?,
        &want,
        DENSE_TOL,
    )?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// GGUF. Two references per fixture file (`tools/fixtures_flux.py`):
// - `ref/gguf_exact_transformer_out`: diffusers' dense transformer on gguf-py's exact f32
//   dequantization of the file. `tests/gguf_dequant.rs` shows our dequantization equals gguf-py's
//   bit for bit, so ours against it is f32 against f32 on identical weights.
// - `ref/gguf_transformer_out`: diffusers' GGUF model. Its `dequantize_gguf_tensor` evaluates
//   `d·q` (and the K-quant scale products) in float16 and only then casts to `compute_dtype`, so
//   its weights carry f16 rounding errors (the fixture manifest records them per file:
//   `gguf_*_diffusers_weights`: Q8_0 max |ΔW|/|W| = 2⁻¹¹ exactly, and the same dequantizer asked for
//   float32 equals gguf-py). It is kept as a second reference with a bound derived from that rounding.

/// Unit roundoff of IEEE f16 (11-bit significand, round to nearest): 2⁻¹¹.
const U16: f64 = 1.0 / 2048.0;

/// The GGUF fixture files: (manifest tag, file, quantized type).
const GGUF_FILES: [(&str, &str, &str); 2] = [
    ("q8_0", "gguf/flux1-fill-dev-Q8_0.gguf", "Q8_0"),
    ("q5_k", "gguf/flux1-fill-dev-Q5_K.gguf", "Q5_K"),
];

/// Number of quantized (block-format) tensors of a GGUF store: each is one linear layer's weight
/// (1-D tensors and the layers city96 keeps in F32/F16 are stored unquantized).
fn quantized_layers(store: &GgufStore) -> R<usize> {
    let mut n = 0;
    for name in store.names() {
        if store.quantized(&name)?.is_some() {
            assert!(name.ends_with(".weight"), "{name}");
            n += 1;
        }
    }
    assert!(n > 0, "{}: no quantized tensor", store.origin().display());
    Ok(n)
}

fn open_gguf(rel: &str, dev: &Device) -> R<GgufStore> {
    Ok(GgufStore::open(&fixtures().join(rel), dev)?)
}

/// The model-level error of `n` independent layer perturbations: each layer whose weights (or
/// inputs) carry an elementwise relative error of rms ≤ ε changes its output by a relative ≈ ε
/// (`‖ΔW·x‖/‖W·x‖ ≈ ‖ΔW‖_F/‖W‖_F` for weights without structure, which the fixture's Gaussian
/// weights are); the layers' errors are independent and reach the output with gain ≈ 1 through
/// the residual stream and the norms, so they add in quadrature: √n·ε.
fn layers_bound(n: usize, eps: f64) -> f64 {
    (n as f64).sqrt() * eps
}

/// Per-layer ε of diffusers' f16 dequantization.
/// Q8_0: `fl16(d·q)`, one rounding of an exact product (d is f16, q an 8-bit integer, product exact
/// in f32): |ΔW| ≤ u·|W|, ε = u.
/// Q5_K: `fl16(fl16(fl16(d·sc)·q) − fl16(dmin·m))`, four roundings: with a = d·sc·q ≥ 0,
/// b = dmin·m ≥ 0, W = a − b: ΔW ≈ a(δ₁+δ₃) − b·δ₂ + W·δ₄, |δᵢ| ≤ u independent, so
/// E[ΔW²] ≤ u²·E[2a² + b² + W²]. In a Gaussian sub-block of 32 weights (std σ) the min is ≈ −2σ,
/// so b ≈ 2σ and a = W + b: E[2a² + b² + W²] = 3σ² + 3b² ≈ 15σ², ε = √15·u ≈ 3.9u ≤ 4u.
/// (The manifest's measured weight-level rel. L2: Q8_0 ≈ 0.43u, Q5_K ≈ 1.7u.)
fn diffusers_rounding_eps(ty: &str) -> f64 {
    match ty {
        "Q8_0" => U16,
        "Q5_K" => 4.0 * U16,
        o => panic!("no rounding model for {o}"),
    }
}

/// Ours (exact f32 dequantization, `QuantMatmul::Dequant`, f32 compute) against the exact
/// reference: the dense transformer's bound — same weights bit for bit, both f32, only the f32
/// operation order differs.
const GGUF_EXACT_TOL: f64 = DENSE_TOL;

#[test]
fn flux_parity_gguf_exact_reference() -> R {
    for (tag, file, _) in GGUF_FILES {
        let want = load_named("ref/gguf_exact_transformer_out.safetensors", tag)?;
        let store = open_gguf(file, &Device::Cpu)?;
        quantized_layers(&store)?;
        check(
            &format!("gguf {tag} (dequant, f32) vs exact f32 reference"),
            &run_transformer(&store, QuantMatmul::Dequant, false)?,
            &want,
            GGUF_EXACT_TOL,
        )?;
    }
    Ok(())
}

#[test]
fn flux_parity_gguf_diffusers_reference() -> R {
    for (tag, file, ty) in GGUF_FILES {
        let store = open_gguf(file, &Device::Cpu)?;
        let n = quantized_layers(&store)?;
        let ours = run_transformer(&store, QuantMatmul::Dequant, false)?;
        // diffusers' weights are f16-rounded (see `diffusers_rounding_eps`); ours are exact.
        let tol = layers_bound(n, diffusers_rounding_eps(ty));
        let want = load_named("ref/gguf_transformer_out.safetensors", tag)?;
        eprintln!("gguf {tag}: {n} quantized layers, bound √{n}·ε = {tol:.2e}");
        check(
            &format!("gguf {tag} (dequant, f32) vs diffusers' f16-dequantizing GGUF model"),
            &ours,
            &want,
            tol,
        )?;
    }
    Ok(())
}

/// `PAWFECT_TEST_DEVICE=cuda` (a build with `--features cuda`) runs the device-path tests on GPU 0;
/// default the CPU.
fn test_device() -> R<Device> {
    match std::env::var("PAWFECT_TEST_DEVICE").as_deref() {
        Ok("cuda") => Ok(Device::new_cuda(0)?),
        Ok("cpu") | Err(_) => Ok(Device::Cpu),
        Ok(o) => Err(format!("PAWFECT_TEST_DEVICE={o}: cpu or cuda").into()),
    }
}

/// Per-layer ε of `QuantMatmul::DequantF16` (the GPU default): three f16 roundings, each ≤ u
/// elementwise: the weight (`dequantize_f16` = one rounding of the exact value: checked on the CPU
/// by gguf_dequant.rs; the CUDA kernel computes `d·q` / `d·sc·q − m` in f32 and rounds once), the
/// input cast to f16, and the f16 output; the products are summed in f32 (cuBLAS
/// CUBLAS_COMPUTE_32F, candle's default without `gemm_reduced_precision_f16`; the CPU gemm
/// widens f16 to f32). Worst case added linearly: 3u.
const DEQUANT_F16_EPS: f64 = 3.0 * U16;

/// Per-layer ε of `QuantMatmul::Native` (candle's quantized kernels): the weights are used exactly
/// but the activations are quantized to 8 bits per block (CPU: Q8_0 blocks of 32 for Q8_0 weights,
/// Q8_K blocks of 256 for K-quants; CUDA MMQ: Q8_1 blocks of 32 for every type) with step
/// Δ = amax/127 (Q8_K: amax/128). Rounding error uniform in ±Δ/2: rms Δ/√12, relative to the
/// block's rms c/(127·√12) with c = amax/rms, the block crest factor: ≈ 2.4 (32) / 3.0 (256) for
/// Gaussian data; c ≤ 4 allows for the heavier tails of modulated / GELU activations.
const NATIVE_EPS: f64 = 4.0 / (127.0 * 3.464_101_615_137_754);

/// Measured errors of one test, each with its bound: every check is measured and printed before
/// any is asserted, so one run reports all of them.
#[derive(Default)]
struct Checks {
    rows: Vec<(String, f64, f64)>,
}

impl Checks {
    fn measure(&mut self, name: String, a: &Tensor, b: &Tensor, tol: f64) -> R {
        let e = rel_err(a, b)?;
        eprintln!("{name}: rel err {e:.3e} (bound {tol:.3e})");
        self.rows.push((name, e, tol));
        Ok(())
    }

    /// Fails with every check over its bound.
    fn finish(self) -> R {
        let n = self.rows.len();
        let over: Vec<String> = self
            .rows
            .into_iter()
            .filter(|(_, e, tol)| e.is_nan() || e > tol)
            .map(|(name, e, tol)| format!("  {name}: rel err {e:.3e} > {tol:.3e}"))
            .collect();
        if over.is_empty() {
            return Ok(());
        }
        Err(format!(
            "{} of {n} checks over their bound:\n{}",
            over.len(),
            over.join("\n")
        )
        .into())
    }
}

/// The bound of a path whose error sources are independent: their model-level errors add in
/// quadrature; `DENSE_TOL`, the f32 operation-order allowance that every device path keeps, is a
/// worst case and adds linearly.
fn combined_bound(parts: &[f64]) -> f64 {
    DENSE_TOL + parts.iter().map(|p| p * p).sum::<f64>().sqrt()
}

/// Largest |gain| of the QK-RMSNorms (`*.query_norm.scale`, `*.key_norm.scale`): (query, key).
fn qk_norm_gains(store: &dyn WeightStore) -> R<(f64, f64)> {
    let (mut gq, mut gk) = (0f64, 0f64);
    for name in store.names() {
        let g = if name.ends_with("query_norm.scale") {
            &mut gq
        } else if name.ends_with("key_norm.scale") {
            &mut gk
        } else {
            continue;
        };
        let m = store
            .dense(&name, DType::F32)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        *g = g.max(m as f64);
    }
    if gq == 0.0 || gk == 0.0 {
        return Err(format!("{}: no QK-norm gains", store.origin().display()).into());
    }
    Ok((gq, gk))
}

/// The model-level error that `F32Attention::F16` (the f32 default on CUDA: q, k, v cast to f16
/// around the fused kernel, which also rounds P to f16 for the P·V mma and writes O in f16; both
/// products accumulate in f32) adds, derived from the precision alone:
/// - each of the five roundings (q, k, v, P, O) has a relative error of rms ≤ u/√3 (round to
///   nearest: the absolute error is uniform within ±½ ulp and ½ ulp ≤ u·|x|), independent;
/// - v, P and O enter the output linearly: u/√3 each (O = Σⱼ Pⱼvⱼ is a convex combination);
/// - q and k enter through the logits: Δsⱼ = (Σᵢ qᵢkⱼᵢ(δqᵢ + δkⱼᵢ))/√D has rms
///   √(2/3)·u·m with m² = E[qᵢ²kᵢ²] ≤ √(E[qᵢ⁴]E[kᵢ⁴]) = 3·g_q²·g_k² (RMS-normalized rows of
///   Gaussian-like entries times the norm gains g; the fourth moment of a Gaussian is 3·σ⁴,
///   RoPE rotations keep it), whatever the alignment of q and k; the softmax passes them on as
///   ΔO = Σⱼ Pⱼ·Δsⱼ·(vⱼ − O), relative gain ≤ 1 for v rows without structure;
/// - per call in quadrature: ε² = (u²/3)·(3 + 2m²) = u²·(1 + 2·g_q²·g_k²);
/// - `num_layers + num_single_layers` calls, independent, reaching the output with gain ≈ 1
///   like the linear layers: √(calls)·ε (`layers_bound`).
///
/// Zero on the CPU, where attention always is the f32 reference.
fn f16_attention_bound(store: &dyn WeightStore, dev: &Device) -> R<f64> {
    if !dev.is_cuda() {
        return Ok(0.0);
    }
    let cfg = transformer_cfg()?;
    let (gq, gk) = qk_norm_gains(store)?;
    let eps = U16 * (1.0 + 2.0 * gq * gq * gk * gk).sqrt();
    Ok(layers_bound(cfg.num_layers + cfg.num_single_layers, eps))
}

/// The dense f32 weights of a GGUF file dequantized on the CPU (bit for bit gguf-py's, see
/// gguf_dequant.rs), as a safetensors store on `dev`.
fn dequantized_store(file: &str, dev: &Device, dir: &Path) -> R<SafetensorsStore> {
    let cpu = open_gguf(file, &Device::Cpu)?;
    let mut tensors = std::collections::HashMap::new();
    for name in cpu.names() {
        let t = cpu.dense(&name, DType::F32)?;
        tensors.insert(name, t);
    }
    let name = Path::new(file).file_name().ok_or("file name")?;
    let path = dir.join(name).with_extension("safetensors");
    candle_core::safetensors::save(&tensors, &path)?;
    Ok(SafetensorsStore::open(&[path], dev)?)
}

/// The dense f32 transformer and the quantized matmul modes on `test_device()`, each with both f32
/// attention modes, against the exact references; every error printed, then all asserted. On the
/// CPU (CI) `DequantF16` emulates the GPU's f16 path (f16 weights × f16 inputs with f32 sums, the
/// premise of its bound on either device) and the attention mode has no effect. f32 GEMMs on CUDA
/// run with CUBLAS_COMPUTE_32F: candle's `gemm_reduced_precision_f32` (TF32) is off by default and
/// the project never turns it on, so the reference-attention runs keep the f32 bounds. For the GPU run
/// (H100): `PAWFECT_FIXTURES=<dir> PAWFECT_TEST_DEVICE=cuda cargo test -p pawfect-models --features
/// cuda --test flux_parity gguf_device_paths -- --nocapture` (bench/gguf_parity_gpu.sh).
#[test]
fn flux_parity_gguf_device_paths() -> R {
    use F32Attention::{F16, Reference};
    let dev = test_device()?;
    let loc = dev.location();
    eprintln!("device: {dev:?}");
    let mut c = Checks::default();
    let dense = SafetensorsStore::open(&[fixtures().join("bfl/flux1-fill-dev.safetensors")], &dev)?;
    let attn = f16_attention_bound(&dense, &dev)?;
    eprintln!("f16 attention bound on {loc:?}: {attn:.3e}");
    let want = load("ref/transformer_out.safetensors")?;
    let dense_ref = run_transformer_attn(&dense, QuantMatmul::Auto, Reference)?;
    let dense_f16 = run_transformer_attn(&dense, QuantMatmul::Auto, F16)?;
    // f32 throughout: the dense bound.
    c.measure(
        format!("dense f32 (reference attention) on {loc:?} vs diffusers f32"),
        &dense_ref,
        &want,
        DENSE_TOL,
    )?;
    // The default f32 attention on CUDA carries the f16 attention rounding.
    c.measure(
        format!("dense f32 on {loc:?} vs diffusers f32"),
        &dense_f16,
        &want,
        combined_bound(&[attn]),
    )?;
    // The same run but for attention: the f16 attention rounding alone (0 on the CPU).
    c.measure(
        format!("dense f32 f16 attention vs reference attention on {loc:?}"),
        &dense_f16,
        &dense_ref,
        attn,
    )?;
    let dir = tempfile::tempdir()?;
    for (tag, file, _) in GGUF_FILES {
        let want = load_named("ref/gguf_exact_transformer_out.safetensors", tag)?;
        let store = open_gguf(file, &dev)?;
        let n = quantized_layers(&store)?;
        let attn = f16_attention_bound(&store, &dev)?;
        let mut dequant_f16_attn = None;
        for (mode, eps) in [
            // f32 weights equal to the exact ones (on CUDA the K-quant kernels may fuse d·q − m:
            // ≤ 1 f32 ulp, far inside DENSE_TOL): no term of its own.
            (QuantMatmul::Dequant, 0.0),
            (QuantMatmul::DequantF16, DEQUANT_F16_EPS),
            (QuantMatmul::Native, NATIVE_EPS),
        ] {
            let layers = layers_bound(n, eps);
            let out_ref = run_transformer_attn(&store, mode, Reference)?;
            let out_f16 = run_transformer_attn(&store, mode, F16)?;
            // The mode's own rounding (√n·ε) on top of f32.
            c.measure(
                format!("gguf {tag} {mode:?} (reference attention) on {loc:?} vs exact reference"),
                &out_ref,
                &want,
                combined_bound(&[layers]),
            )?;
            // The default attention adds its f16 rounding, independent of the mode's.
            c.measure(
                format!("gguf {tag} {mode:?} on {loc:?} vs exact reference"),
                &out_f16,
                &want,
                combined_bound(&[layers, attn]),
            )?;
            // Same mode, the attention differs: its f16 rounding, and the mode's activation
            // roundings (f16 casts, 8-bit blocks) decorrelate between the two runs once their
            // inputs differ, so at worst each run carries its own √n·ε: √(attn² + 2·(√n·ε)²).
            // On the CPU the attention mode does nothing: the two runs are identical.
            let between = if dev.is_cuda() {
                (attn * attn + 2.0 * layers * layers).sqrt()
            } else {
                0.0
            };
            c.measure(
                format!("gguf {tag} {mode:?} f16 attention vs reference attention on {loc:?}"),
                &out_f16,
                &out_ref,
                between,
            )?;
            if mode == QuantMatmul::Dequant {
                dequant_f16_attn = Some(out_f16);
            }
        }
        // Dequantized on the device against the same weights dequantized on the CPU and run as a
        // dense model, both with the default attention: only the dequantization kernels differ
        // (≤ 1 f32 ulp per weight), so the dense f32 bound.
        let dense = dequantized_store(file, &dev, dir.path())?;
        c.measure(
            format!("gguf {tag} Dequant on {loc:?} vs dense f32 on its CPU-dequantized weights"),
            dequant_f16_attn.as_ref().ok_or("no Dequant run")?,
            &run_transformer_attn(&dense, QuantMatmul::Auto, F16)?,
            DENSE_TOL,
        )?;
    }
    c.finish()
}

fn fixture_opts() -> R<InpaintOptions> {
    let m = manifest()?;
    Ok(InpaintOptions {
        steps: m["steps"].as_u64().ok_or("steps")? as usize,
        guidance: m["guidance"].as_f64().ok_or("guidance")? as f32,
        noise: Some(load_named("noise.safetensors", "noise")?),
        max_sequence_length: t5_len()?,
        ..Default::default()
    })
}

#[test]
fn flux_parity_pipeline_two_steps() -> R {
    let fill = pipeline()?;
    let (image, mask) = inputs()?;
    let mut seen = vec![];
    let (out, trace) = fill.inpaint_traced(
        &image,
        &mask,
        &prompt()?,
        &fixture_opts()?,
        &mut |s: Step| {
            seen.push(s);
            true
        },
    )?;
    assert_eq!(
        seen,
        vec![Step { step: 1, total: 2 }, Step { step: 2, total: 2 }]
    );
    // Two transformer calls and Euler steps, each at DENSE_TOL, through the f32 VAE encode of the
    // condition; 10× the single-call bound leaves room for the growth over the steps.
    check(
        "latents after 2 steps",
        &trace.latents,
        &load("ref/latents_2steps.safetensors")?,
        1e-3,
    )?;
    let want = load("ref/image_2steps.safetensors")?;
    let mae = (&trace.image - &want)?
        .abs()?
        .mean_all()?
        .to_scalar::<f32>()?;
    eprintln!("decoded image mean abs err {mae:.3e}");
    // One 8-bit level: the latents' 1e-3 through the decoder stays far below a quantization step.
    assert!(mae <= 1.0 / 255.0, "decoded image mean abs error {mae}");
    let expected = image::open(fixtures().join("expected_2steps.png"))?.to_rgb8();
    let mae8 = out
        .image
        .as_raw()
        .iter()
        .zip(expected.as_raw())
        .map(|(a, b)| (*a as f64 - *b as f64).abs())
        .sum::<f64>()
        / expected.as_raw().len() as f64;
    eprintln!("u8 image mean abs err {mae8:.3} / 255");
    // u8 PNGs: a value within one level of a rounding boundary may land on the other side.
    assert!(mae8 <= 1.0, "u8 image mean abs error {mae8}");
    Ok(())
}

/// First-Block Cache against diffusers' `FirstBlockCacheConfig` on the same pipeline
/// (`manifest.fbcache`: a threshold the generator chose from this seed's own changes, at least 1 %
/// away from every change it observed, skipping at least one step and computing one after it).
#[test]
fn flux_parity_first_block_cache() -> R {
    let m = manifest()?;
    let fb = &m["fbcache"];
    let steps = fb["steps"].as_u64().ok_or("fbcache.steps")? as usize;
    let threshold = fb["threshold"].as_f64().ok_or("fbcache.threshold")?;
    let skipped: Vec<usize> = serde_json::from_value(fb["skipped"].clone())?;
    let changes: Vec<Option<f64>> = serde_json::from_value(fb["changes"].clone())?;
    let fill = pipeline()?;
    let (image, mask) = inputs()?;
    let opts = InpaintOptions {
        steps,
        cache_threshold: Some(threshold as f32),
        ..fixture_opts()?
    };
    let (out, trace) = fill.inpaint_traced(&image, &mask, &prompt()?, &opts, &mut |_| true)?;
    assert_eq!(out.steps_skipped, skipped, "steps skipped");
    assert_eq!(
        trace.cache_diffs.len(),
        changes.len(),
        "one change per step"
    );
    for (i, (ours, theirs)) in trace.cache_diffs.iter().zip(&changes).enumerate() {
        match (ours, theirs) {
            (None, None) => {}
            (Some(a), Some(b)) => {
                // A ratio of two f32 means of the same residuals, each side within the dense
                // transformer's 1e-4 of the other: 10× that leaves the latents' growth over steps.
                let e = (*a as f64 - b).abs() / b.abs();
                eprintln!("step {i}: change {a:.6} vs diffusers {b:.6} (rel {e:.2e})");
                assert!(e <= 1e-3, "step {i}: change {a} vs diffusers {b}");
            }
            _ => panic!("step {i}: change {ours:?} vs diffusers {theirs:?}"),
        }
    }
    // The 2-step run's bound (10 × DENSE_TOL for 2 calls), scaled by the 4× more transformer calls
    // whose errors add up through the Euler steps.
    let bound = 4.0 * 1e-3;
    let want = load("ref/latents_fbcache.safetensors")?;
    check(
        "latents with the first-block cache",
        &trace.latents,
        &want,
        bound,
    )?;
    let err = rel_err(&trace.latents, &want)?;
    let dense = InpaintOptions {
        cache_threshold: None,
        ..opts
    };
    let (_, dense) = fill.inpaint_traced(&image, &mask, &prompt()?, &dense, &mut |_| true)?;
    check(
        "latents without the cache",
        &dense.latents,
        &load("ref/latents_fbcache_dense.safetensors")?,
        bound,
    )?;
    assert!(dense.cache_diffs.is_empty());
    // The skipped steps changed the result by far more than our distance to diffusers' cached
    // run: the comparison above did tell a cached run from a dense one.
    let moved = rel_err(&trace.latents, &dense.latents)?;
    eprintln!("cached vs dense: rel {moved:.3e}");
    assert!(
        moved > 10.0 * err,
        "cached vs dense {moved:e}, vs diffusers {err:e}"
    );
    Ok(())
}

/// A threshold of 0 computes every step (a change is never ≤ 0 unless the head block's residual
/// did not move at all), and gives the dense result bit for bit.
#[test]
fn flux_first_block_cache_threshold_zero_is_dense() -> R {
    let fill = pipeline()?;
    let (image, mask) = inputs()?;
    let opts = fixture_opts()?;
    let cached = InpaintOptions {
        cache_threshold: Some(0.0),
        ..opts.clone()
    };
    let (a, ta) = fill.inpaint_traced(&image, &mask, &prompt()?, &cached, &mut |_| true)?;
    let (_, tb) = fill.inpaint_traced(&image, &mask, &prompt()?, &opts, &mut |_| true)?;
    assert!(a.steps_skipped.is_empty());
    assert!(same_bits(&ta.latents, &tb.latents)?);
    // Bad thresholds are refused before any work.
    for bad in [-1.0, f32::NAN] {
        let o = InpaintOptions {
            cache_threshold: Some(bad),
            ..opts.clone()
        };
        let e = fill.inpaint(&image, &mask, &prompt()?, &o, &mut |_| true);
        assert!(
            matches!(e, Err(ModelError::InvalidInput(_))),
            "{bad}: {e:?}"
        );
    }
    Ok(())
}

#[test]
fn flux_parity_cancel_stops_the_loop() -> R {
    let fill = pipeline()?;
    let (image, mask) = inputs()?;
    let mut calls = 0;
    let r = fill.inpaint(&image, &mask, "x", &fixture_opts()?, &mut |_| {
        calls += 1;
        false
    });
    assert!(matches!(r, Err(ModelError::Cancelled)), "{r:?}");
    assert_eq!(calls, 1);
    Ok(())
}

#[test]
fn flux_parity_missing_files_are_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let e = FluxModelPaths::resolve(dir.path(), &FluxOverrides::default()).expect_err("empty dir");
    let msg = e.to_string();
    assert!(
        msg.contains("transformer/") && msg.contains("black-forest-labs/FLUX.1-Fill-dev"),
        "{msg}"
    );
}

/// llama.cpp's GGUF names for the HF T5 encoder tensors (written independently of the loader).
fn llama_cpp_t5_name(hf: &str) -> Option<String> {
    if hf == "shared.weight" {
        return Some("token_embd.weight".into());
    }
    if hf == "encoder.final_layer_norm.weight" {
        return Some("enc.output_norm.weight".into());
    }
    let rest = hf.strip_prefix("encoder.block.")?;
    let (i, rest) = rest.split_once('.')?;
    let part = match rest {
        "layer.0.SelfAttention.q.weight" => "attn_q",
        "layer.0.SelfAttention.k.weight" => "attn_k",
        "layer.0.SelfAttention.v.weight" => "attn_v",
        "layer.0.SelfAttention.o.weight" => "attn_o",
        "layer.0.SelfAttention.relative_attention_bias.weight" => "attn_rel_b",
        "layer.0.layer_norm.weight" => "attn_norm",
        "layer.1.DenseReluDense.wi_0.weight" => "ffn_gate",
        "layer.1.DenseReluDense.wi_1.weight" => "ffn_up",
        "layer.1.DenseReluDense.wo.weight" => "ffn_down",
        "layer.1.layer_norm.weight" => "ffn_norm",
        _ => return None,
    };
    Some(format!("enc.blk.{i}.{part}.weight"))
}

#[test]
fn flux_parity_t5_gguf_llama_cpp_names() -> R {
    use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
    use pawfect_models::t5::{T5Config, T5Encoder};
    let p = paths(&FluxOverrides::default())?;
    let files = match &p.t5 {
        pawfect_models::weights::T5Files::Safetensors(f) => f.clone(),
        other => return Err(format!("unexpected {other:?}").into()),
    };
    let st = SafetensorsStore::open(&files, &Device::Cpu)?;
    let cfg: T5Config = serde_json::from_str(&std::fs::read_to_string(
        fixtures().join("pipeline/text_encoder_2/config.json"),
    )?)?;
    let ids_t = load_named("ref/token_ids.safetensors", "t5")?.to_dtype(DType::U32)?;
    let want = load("ref/t5.safetensors")?;
    let dir = tempfile::tempdir()?;
    let write = |tag: &str, tensors: &[(String, QTensor)]| -> R<GgufStore> {
        let path = dir.path().join(format!("t5-{tag}.gguf"));
        let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        gguf_file::write(&mut std::fs::File::create(&path)?, &[], &refs)?;
        Ok(GgufStore::open(&path, &Device::Cpu)?)
    };
    let run = |store: &GgufStore| -> R<Tensor> {
        let opts = LinearOpts {
            dtype: DType::F32,
            quant: QuantMatmul::Auto,
        };
        Ok(T5Encoder::load(store, &cfg, DType::F32, opts)?.forward(&ids_t)?)
    };
    let mut f32s = vec![];
    let mut q8 = vec![];
    let mut q8_dequant = vec![];
    for name in st.names() {
        let Some(gname) = llama_cpp_t5_name(&name) else {
            continue;
        };
        let t = st.dense(&name, DType::F32)?;
        f32s.push((gname.clone(), QTensor::quantize(&t, GgmlDType::F32)?));
        let q = if t.rank() == 2 && t.dim(1)? % 32 == 0 && !gname.contains("rel_b") {
            QTensor::quantize(&t, GgmlDType::Q8_0)?
        } else {
            QTensor::quantize(&t, GgmlDType::F32)?
        };
        q8_dequant.push((
            gname.clone(),
            QTensor::quantize(&q.dequantize(&Device::Cpu)?, GgmlDType::F32)?,
        ));
        q8.push((gname, q));
    }
    check(
        "t5 from GGUF (F32, llama.cpp names)",
        &run(&write("f32", &f32s)?)?,
        &want,
        DENSE_TOL,
    )?;
    // The quantized path equals the same model with the dequantized weights, and stays near f32.
    // (QuantMatmul::Auto on the CPU is Dequant: the same f32 weights, the same ops: ≤ 1e-5.)
    let out_q8 = run(&write("q8", &q8)?)?;
    check(
        "t5 Q8_0 vs its dequantized weights",
        &out_q8,
        &run(&write("q8-dequant", &q8_dequant)?)?,
        1e-5,
    )?;
    // Q8_0 noise through the unscaled T5 attention of this tiny random model: a few per cent.
    check("t5 Q8_0 vs f32 weights", &out_q8, &want, 0.15)?;
    Ok(())
}

#[test]
fn flux_parity_f16_path_on_cpu() -> R {
    // The f16 code path (clamps, f32 islands, casts) end to end on the CPU, against the f32 reference.
    let mut o = FluxLoadOptions::new(Device::Cpu, DType::F16);
    o.t5.dtype = DType::F16;
    let fill = FluxFill::load(&paths(&FluxOverrides::default())?, &o)?;
    let (image, mask) = inputs()?;
    let opts = InpaintOptions {
        time_dtype: Some(DType::F32),
        ..fixture_opts()?
    };
    let (_, trace) = fill.inpaint_traced(&image, &mask, &prompt()?, &opts, &mut |_| true)?;
    let e = rel_err(&trace.latents, &load("ref/latents_2steps.safetensors")?)?;
    eprintln!("f16 pipeline latents after 2 steps vs f32 diffusers: rel err {e:.3e}");
    // f16 activations (u = 4.9e-4 per op) through ~40 layers and two steps, √(#ops)·u-sized.
    assert!(e < 2e-2, "f16 latents rel err {e}");
    let emb = fill.encode_prompt(&prompt()?, t5_len()?)?;
    let e = rel_err(&emb.t5, &load("ref/t5.safetensors")?)?;
    eprintln!("f16 T5 vs f32: rel err {e:.3e}");
    // The same for the 2-layer T5 alone (fewer ops, no steps).
    assert!(e < 1e-2, "f16 t5 rel err {e}");
    Ok(())
}

#[test]
fn flux_parity_seeded_noise_is_deterministic() -> R {
    use pawfect_models::flux::pipeline::seeded_noise;
    let a = seeded_noise(3, (1, 16, 4, 6))?;
    let b = seeded_noise(3, (1, 16, 4, 6))?;
    let c = seeded_noise(4, (1, 16, 4, 6))?;
    assert_eq!(
        a.flatten_all()?.to_vec1::<f32>()?,
        b.flatten_all()?.to_vec1::<f32>()?
    );
    assert_ne!(
        a.flatten_all()?.to_vec1::<f32>()?,
        c.flatten_all()?.to_vec1::<f32>()?
    );
    let mean = a.mean_all()?.to_scalar::<f32>()?;
    let var = a.sqr()?.mean_all()?.to_scalar::<f32>()?;
    // 384 standard normals: mean and variance within ~4 standard errors (0.05, 0.07).
    assert!(
        mean.abs() < 0.2 && (var - 1.0).abs() < 0.3,
        "mean {mean} var {var}"
    );
    Ok(())
}
